//! Typed payloads that travel between stages, and the versioned wire envelope
//! that carries them across nodes. Everything here is plain data: serde makes
//! it cross a Kafka topic later without the stages knowing.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Wire-format version of [`Envelope`]; a consumer rejects any other value.
pub const ENVELOPE_VERSION: u32 = 1;

/// A company partition: who may see a chunk.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Partition {
    pub division: String,
    pub access_level: String,
}

/// What identifies one version of one document, and where it lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocMeta {
    /// Stable id: `source name` + `:` + uri.
    pub doc_id: String,
    pub source: String,
    /// Path relative to the source root, `/`-separated.
    pub uri: String,
    /// Where the node that saw the file can read it.
    pub path: PathBuf,
    /// Content hash (hex sha256 prefix); the version of the document.
    pub version: String,
    pub partition: Partition,
    pub size: u64,
    /// When the watcher saw this version (ns since the epoch): orders the
    /// versions of a document on nodes that have no watcher (see
    /// `Ledger::observe`).
    #[serde(default)]
    pub seq: u64,
}

/// Nanoseconds since the epoch, never equal twice in one process: the
/// watcher's observation order.
pub fn next_seq() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(seen) => last = seen,
        }
    }
}

/// A source event: the watcher saw a new version of a document, or saw it go.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum DocEvent {
    Upsert(DocMeta),
    Delete { doc_id: String },
}

impl DocEvent {
    pub fn doc_id(&self) -> &str {
        match self {
            DocEvent::Upsert(m) => &m.doc_id,
            DocEvent::Delete { doc_id } => doc_id,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    pub index: u32,
    /// Heading trail and body: what is embedded and what a query returns.
    pub text: String,
}

/// A document version split into chunks (the Chunker's output).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChunkedDoc {
    pub meta: DocMeta,
    pub chunks: Vec<Chunk>,
}

/// A document version with one vector per chunk (the Embedder's output).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EmbeddedDoc {
    pub meta: DocMeta,
    pub chunks: Vec<Chunk>,
    pub vectors: Vec<Vec<f32>>,
    /// Each chunk's text key ([`crate::embedder::text_key`]), stored with
    /// its point: the embedder finds the vector of a text it already
    /// embedded by it (see [`crate::indexer::stored_vectors`]). Empty
    /// from a node that sends none; its points are then not found so.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<i64>,
}

/// What the Indexer tells the VersionPruner: this version is durable now.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum IndexedEvent {
    Indexed {
        doc_id: String,
        version: String,
        /// The version's `DocMeta::seq`: the pruner removes only versions
        /// seen before it (0, from an older node: every other version).
        #[serde(default)]
        seq: u64,
    },
    Deleted {
        doc_id: String,
        /// The deletion's seq: the pruner removes only versions seen before
        /// it (0, from an older node: every version).
        #[serde(default)]
        seq: u64,
    },
    /// A newer version overtook this one before it was written (cluster:
    /// the ingest node's ledger closes the version on it).
    Superseded { doc_id: String, version: String },
    /// The chunker ended this version without indexing it (superseded, no
    /// text in it, changed or gone before it was read). No longer sent:
    /// the chunker runs on the node that admitted the version and ends it
    /// in that node's ledger. Still read, from a node of an older release
    /// during a rolling upgrade.
    Skipped {
        doc_id: String,
        version: String,
        reason: String,
    },
}

/// The versioned envelope for anything that crosses a node boundary.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Envelope<T> {
    pub v: u32,
    pub key: String,
    pub payload: T,
}

impl<T> Envelope<T> {
    pub fn new(key: impl Into<String>, payload: T) -> Self {
        Envelope {
            v: ENVELOPE_VERSION,
            key: key.into(),
            payload,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_round_trips_and_carries_its_version() {
        let env = Envelope::new(
            "src:a.md",
            DocEvent::Delete {
                doc_id: "src:a.md".into(),
            },
        );
        let wire = serde_json::to_string(&env).unwrap();
        let back: Envelope<DocEvent> = serde_json::from_str(&wire).unwrap();
        assert_eq!(back.v, ENVELOPE_VERSION);
        assert_eq!(back.payload.doc_id(), "src:a.md");
    }
}
