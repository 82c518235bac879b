//! The Chunker stage: reads a document version, parses and splits it.

use super::parse::ParseError;
use super::Chunker;
use crate::bridge::Port;
use crate::indexer::actor::IndexJob;
use crate::ledger::{Ledger, Outcome};
use crate::messages::{ChunkedDoc, DocMeta};
use crate::pool::{unavailable, JobErrors, Stage};
use crate::source_watcher::{doc_version, on_source, read_counting};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What reading a version found: its bytes (`Read<Vec<u8>>`), then, once
/// parsed, its chunks (`Read<Result<Vec<Chunk>, ParseError>>`).
enum Read<T> {
    TooBig,
    Changed,
    /// Its source did not answer (see [`ChunkerStage::hang_after`]).
    Hung,
    Got(T),
}

impl<T> Read<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Read<U> {
        match self {
            Read::TooBig => Read::TooBig,
            Read::Changed => Read::Changed,
            Read::Hung => Read::Hung,
            Read::Got(t) => Read::Got(f(t)),
        }
    }
}

type Fetch = Read<Vec<u8>>;
type Parsed = Read<Result<Vec<crate::messages::Chunk>, ParseError>>;

pub struct ChunkerStage {
    pub chunker: Arc<Chunker>,
    pub ledger: Arc<Ledger>,
    pub out: Port<ChunkedDoc>,
    /// The indexer's input, for what an unindexable version leaves behind
    /// (see [`ChunkerStage::settle`]).
    pub deletes: Port<IndexJob>,
    pub max_file_bytes: u64,
    /// How long a read under one source root may go without progress
    /// before that source counts as hanging (a hard-mounted share whose
    /// server is gone blocks every read of it for as long as it is gone).
    /// The watcher's [`crate::source_watcher::HANG_AFTER`] in a node.
    pub hang_after: Duration,
}

/// The most documents the chunker reads and parses in one batch, and
/// their most bytes together: a burst of small files costs a read and a
/// parse trip to the blocking pool per batch, while a large file still goes
/// alone and a batch never holds more than a few MiB of text at once.
pub const CHUNK_BATCH: usize = 32;
pub const CHUNK_BATCH_BYTES: u64 = 4 << 20;

impl Stage for ChunkerStage {
    type In = DocMeta;

    async fn process(&self, meta: DocMeta) -> anyhow::Result<()> {
        match self.process_batch(vec![meta]).await?.pop() {
            Some((_, e)) => Err(e),
            None => Ok(()),
        }
    }

    fn max_batch(&self) -> usize {
        CHUNK_BATCH
    }

    fn max_batch_bytes(&self) -> u64 {
        CHUNK_BATCH_BYTES
    }

    /// Reads and checks the batch's current versions (one trip to the
    /// blocking pool per source root: see [`ChunkerStage::fetch`]), parses
    /// them in one more (each trip wakes a thread, and during a burst on
    /// the model's cores), then hands the parsed ones on together. A file
    /// that fails fails alone.
    async fn process_batch(&self, metas: Vec<DocMeta>) -> anyhow::Result<JobErrors> {
        let mut todo = Vec::with_capacity(metas.len());
        for (i, meta) in metas.into_iter().enumerate() {
            if self.ledger.is_current(&meta.doc_id, &meta.version) {
                todo.push((i, meta));
            } else {
                self.skip(&meta, crate::ledger::SUPERSEDED.into());
            }
        }
        if todo.is_empty() {
            return Ok(vec![]);
        }
        let files: Vec<_> = todo.iter().map(|(_, m)| m.clone()).collect();
        let fetched = self.fetch(&files).await;
        let chunker = self.chunker.clone();
        let reads = tokio::task::spawn_blocking(move || {
            (files.iter().zip(fetched))
                .map(|(m, f)| Ok(f?.map(|bytes| chunker.chunk_file(&m.path, &bytes))))
                .collect::<Vec<std::io::Result<Parsed>>>()
        })
        .await
        .map_err(|e| anyhow::anyhow!("chunker task panicked: {e}"))?;
        let mut out = Vec::with_capacity(todo.len());
        let mut unindexable = Vec::new();
        let mut errors = JobErrors::new();
        for ((i, meta), read) in todo.into_iter().zip(reads) {
            match self.settle(&meta, read, &mut unindexable) {
                Ok(Some(chunks)) => out.push(ChunkedDoc { meta, chunks }),
                Ok(None) => {}
                Err(e) => errors.push((i, e)),
            }
        }
        // Deletion's seq is the version's, so a newer version is spared.
        let deletes = unindexable
            .iter()
            .filter(|(m, _)| self.ledger.is_current(&m.doc_id, &m.version))
            .map(|(m, _)| IndexJob::Delete {
                doc_id: m.doc_id.clone(),
                seq: m.seq,
            })
            .collect();
        self.out.send_all(out).await?;
        self.deletes.send_all(deletes).await?;
        // Only once the deletions are on their way: a batch whose sends
        // failed runs again, and finds these versions still current.
        for (m, reason) in unindexable {
            self.ledger
                .finish_unindexable(&m.doc_id, &m.version, m.seq, reason);
        }
        Ok(errors)
    }
}

/// Reads the document (at most `max` bytes, counting each MiB on
/// `progress`) and checks it is still the version probed.
fn fetch_one(
    meta: &DocMeta,
    max: u64,
    chunking: &str,
    progress: &AtomicU64,
) -> std::io::Result<Fetch> {
    let Some(bytes) = read_counting(&std::fs::File::open(&meta.path)?, max, progress)? else {
        return Ok(Read::TooBig);
    };
    if doc_version(&bytes, &meta.partition, chunking) != meta.version {
        return Ok(Read::Changed);
    }
    Ok(Read::Got(bytes))
}

/// The root of the source `meta` is under: its path less its uri's parts
/// (the watcher makes the path so). Reads are guarded per root, as the
/// watcher guards its own calls (see [`on_source`]).
fn root_of(meta: &DocMeta) -> &Path {
    let parts = meta.uri.split('/').count();
    meta.path.ancestors().nth(parts).unwrap_or(&meta.path)
}

/// What one trip of reads under a root has read so far; taken whole when
/// the trip is given up on, after which the trip reads no further.
#[derive(Default)]
struct Fetched {
    got: Vec<std::io::Result<Fetch>>,
    given_up: bool,
}

/// A read that failed (other than for a missing file). Marked
/// [`unavailable`] when the storage does not answer: a network or FUSE
/// mount that went away (ENOTCONN, ESTALE, EHOSTUNREACH, …) or fails its
/// reads (EIO, a soft NFS mount's timeout): every file there fails alike,
/// and the chunker pauses rather than dead-letter them. So too when the
/// node is out of file handles or memory (EMFILE, ENFILE, ENOMEM: a burst
/// of open files elsewhere in the process): three attempts would pass in
/// a second and dead-letter a good file. A file of its own that fails so
/// (a bad sector) is found out once the others succeed (see
/// [`crate::pool`]).
fn read_failed(meta: &DocMeta, e: std::io::Error) -> anyhow::Error {
    use std::io::ErrorKind::*;
    let down = matches!(
        e.kind(),
        NotConnected
            | TimedOut
            | StaleNetworkFileHandle
            | HostUnreachable
            | NetworkDown
            | NetworkUnreachable
            | ConnectionReset
            | ConnectionAborted
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EMFILE | libc::ENFILE | libc::ENOMEM)
    );
    let e = anyhow::anyhow!("reading {}: {e}", meta.path.display());
    if down {
        unavailable(e)
    } else {
        e
    }
}

impl ChunkerStage {
    /// Reads `files` (not parsing them): under each source root in one
    /// trip to the blocking pool, guarded as the watcher's own calls are
    /// ([`on_source`], which shares its record of roots that hang with the
    /// watcher). A root whose reads make no progress for
    /// [`ChunkerStage::hang_after`] is given up on: what it read stands,
    /// the rest is [`Read::Hung`], and while the call given up on has not
    /// returned, reads under that root are not tried (each would hold a
    /// blocking thread for good). A hung version ends skipped with
    /// [`crate::ledger::SOURCE_HUNG`]; the watcher then looks at it again,
    /// which waits until the source answers. So chunking goes on for the
    /// other sources, and nothing of the hung one is lost or dead-lettered.
    async fn fetch(&self, files: &[DocMeta]) -> Vec<std::io::Result<Fetch>> {
        let mut roots: BTreeMap<PathBuf, Vec<usize>> = BTreeMap::new();
        for (i, m) in files.iter().enumerate() {
            roots.entry(root_of(m).to_path_buf()).or_default().push(i);
        }
        let trips = roots.into_iter().map(|(root, at)| {
            let metas: Vec<DocMeta> = at.iter().map(|&i| files[i].clone()).collect();
            async move { at.into_iter().zip(self.fetch_under(&root, metas).await) }
        });
        let mut out: Vec<_> = futures::future::join_all(trips)
            .await
            .into_iter()
            .flatten()
            .collect();
        out.sort_by_key(|(i, _)| *i);
        out.into_iter().map(|(_, f)| f).collect()
    }

    /// [`ChunkerStage::fetch`] of files under one source root.
    async fn fetch_under(&self, root: &Path, metas: Vec<DocMeta>) -> Vec<std::io::Result<Fetch>> {
        let n = metas.len();
        let fetched = Arc::new(parking_lot::Mutex::new(Fetched::default()));
        let (shared, max) = (fetched.clone(), self.max_file_bytes);
        let chunking: Arc<str> = self.chunker.fingerprint().into();
        let read = on_source(root, self.hang_after, move |progress| {
            for m in &metas {
                let f = fetch_one(m, max, &chunking, progress);
                progress.fetch_add(1, Ordering::SeqCst);
                let mut fetched = shared.lock();
                if fetched.given_up {
                    return;
                }
                fetched.got.push(f);
            }
        })
        .await;
        let mut fetched = fetched.lock();
        fetched.given_up = true;
        let mut got = std::mem::take(&mut fetched.got);
        drop(fetched);
        if read.is_none() {
            metrics::counter!("ragd_chunker_hung_reads_total").increment((n - got.len()) as u64);
        }
        got.resize_with(n, || Ok(Read::Hung));
        got
    }

    /// Ends `meta`'s version skipped, in the ledger of the node that
    /// admitted it: this one's (the watcher hands its versions to its own
    /// node's chunker, on a cluster too).
    fn skip(&self, meta: &DocMeta, reason: String) {
        let skipped = Outcome::Skipped(reason);
        self.ledger
            .finish(&meta.doc_id, Some(&meta.version), skipped);
    }

    /// What becomes of one read: its chunks to hand on, nothing (skipped,
    /// with the reason in the ledger), or an error to retry.
    ///
    /// A version with nothing to index (binary, not UTF-8, no text: the
    /// file was emptied or overwritten) still replaces the one before it:
    /// it goes to `unindexable`, to end skipped and, when it is the
    /// document's latest, send a deletion, so the old version's text is no
    /// longer found.
    fn settle(
        &self,
        meta: &DocMeta,
        read: std::io::Result<Parsed>,
        unindexable: &mut Vec<(DocMeta, String)>,
    ) -> anyhow::Result<Option<Vec<crate::messages::Chunk>>> {
        let parsed = match read {
            Ok(Read::Got(parsed)) => parsed,
            Ok(Read::TooBig) => {
                let reason = format!("file grew over the {} byte limit", self.max_file_bytes);
                self.skip(meta, reason);
                return Ok(None);
            }
            // Changed after the watcher hashed it; the watcher's next event
            // carries the new version.
            Ok(Read::Changed) => {
                self.skip(meta, crate::ledger::CHANGED_WHILE_QUEUED.into());
                return Ok(None);
            }
            // The watcher reads it again once its source answers (see
            // [`ChunkerStage::fetch`]); what the index has of it stands.
            Ok(Read::Hung) => {
                self.skip(meta, crate::ledger::SOURCE_HUNG.into());
                return Ok(None);
            }
            // Gone since the watcher saw it: its deletion event follows.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.skip(meta, crate::ledger::REMOVED_BEFORE_READ.into());
                return Ok(None);
            }
            Err(e) => return Err(read_failed(meta, e)),
        };
        match parsed {
            Ok(chunks) => Ok(Some(chunks)),
            Err(ParseError::Unsupported(reason)) => {
                unindexable.push((meta.clone(), reason));
                Ok(None)
            }
            Err(e @ ParseError::Malformed { .. }) => Err(e.into()),
            Err(ParseError::Unavailable(why)) => Err(unavailable(anyhow::anyhow!(
                "parsing {}: {why}",
                meta.path.display()
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pool::is_unavailable;
    use std::io::{Error, ErrorKind};

    /// Storage that does not answer, or a node out of file handles, pauses
    /// the chunker; a file that cannot be read is that file's failure.
    #[test]
    fn a_mount_that_does_not_answer_is_unavailable_a_bad_file_is_not() {
        let meta = DocMeta {
            doc_id: "kb:hr/leave.md".into(),
            source: "kb".into(),
            uri: "hr/leave.md".into(),
            path: "/mnt/kb/hr/leave.md".into(),
            version: "v1".into(),
            partition: crate::messages::Partition {
                division: "hr".into(),
                access_level: "public".into(),
            },
            size: 1,
            seq: 1,
        };
        let down = [
            libc::ENOTCONN,
            libc::ESTALE,
            libc::EIO,
            libc::ETIMEDOUT,
            libc::EHOSTUNREACH,
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOMEM,
        ];
        for errno in down {
            let e = read_failed(&meta, Error::from_raw_os_error(errno));
            assert!(is_unavailable(&e), "{e:#}");
            assert!(e.to_string().contains("/mnt/kb/hr/leave.md"), "{e}");
        }
        for e in [
            Error::from_raw_os_error(libc::EACCES),
            Error::from_raw_os_error(libc::EISDIR),
            Error::new(ErrorKind::InvalidData, "not a file"),
        ] {
            let e = read_failed(&meta, e);
            assert!(!is_unavailable(&e), "{e:#}");
        }
    }
}
