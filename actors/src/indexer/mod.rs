//! The vector store behind the Indexer, VersionPruner and the query path.
//!
//! Every backend implements [`VectorStore`] and must pass
//! [`conformance::run_all`]. Point ids are deterministic in (doc id, version,
//! chunk index), so a re-delivered document overwrites itself instead of
//! adding duplicates.

pub mod actor;
pub mod conformance;
pub mod edge;
pub mod model_check;
pub mod qdrant;

use crate::messages::{Chunk, DocMeta, EmbeddedDoc, Partition};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashSet;

/// The partitions a search may look at: `division ∈ divisions` and
/// `access_level ∈ access_levels`. Empty lists match nothing, never all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Scope {
    pub divisions: Vec<String>,
    pub access_levels: Vec<String>,
}

/// The HNSW index's shape (`[index]` hnsw_m, hnsw_ef_construct, hnsw_ef),
/// for both backends.
#[derive(Clone, Debug, PartialEq)]
pub struct HnswSettings {
    /// Links per point: more is better recall, more memory, slower builds.
    pub m: usize,
    /// Breadth of the search that picks a new point's links.
    pub ef_construct: usize,
    /// Breadth of a query's search (at least its limit); 0: max(4 × limit,
    /// 256).
    pub ef: usize,
}

impl Default for HnswSettings {
    fn default() -> Self {
        HnswSettings {
            m: 16,
            ef_construct: 100,
            ef: 0,
        }
    }
}

impl HnswSettings {
    /// Fewer links than this make a graph that loses points (`ef` 0 means
    /// "the default"). The config reports it with its other errors; the
    /// store refuses to open with it.
    pub fn check(&self) -> Result<(), String> {
        if self.m < 4 || self.ef_construct < 4 {
            return Err(format!(
                "index.hnsw_m ({}) and index.hnsw_ef_construct ({}) must be at least 4",
                self.m, self.ef_construct
            ));
        }
        Ok(())
    }

    /// The `hnsw_ef` of a search for `limit` results. The default is what
    /// the search bench needed at a million real chunks for recall@50 ≥ 0.95
    /// (0.956, p95 5 ms; 128 gave 0.90: BENCHMARKS.md, "Search at scale").
    pub fn search_ef(&self, limit: usize) -> usize {
        match self.ef {
            0 => (limit * 4).max(256),
            ef => ef.max(limit),
        }
    }
}

impl Scope {
    pub fn allows(&self, division: &str, access_level: &str) -> bool {
        self.divisions.iter().any(|d| d == division)
            && self.access_levels.iter().any(|a| a == access_level)
    }
    pub fn is_empty(&self) -> bool {
        self.divisions.is_empty() || self.access_levels.is_empty()
    }
    /// Canonical form: sorted and deduplicated, so equal scopes compare equal.
    pub fn canonical(mut self) -> Self {
        self.divisions.sort();
        self.divisions.dedup();
        self.access_levels.sort();
        self.access_levels.dedup();
        self
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    pub doc_id: String,
    pub uri: String,
    pub version: String,
    pub division: String,
    pub access_level: String,
    pub chunk_index: u32,
    pub text: String,
    pub score: f32,
}

/// One document version found in a store.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoredVersion {
    pub doc_id: String,
    pub version: String,
    /// The watcher's sequence of this version (`DocMeta::seq`), kept in
    /// every point so that an index node that restarts still refuses an
    /// older version that is redelivered late (0 for points written before
    /// it was stored).
    pub seq: u64,
    /// The partition it was filed in (None for points without one).
    pub partition: Option<Partition>,
}

/// Collects the versions a scroll finds, once each (every chunk of a version
/// carries the same fields), keeping the highest seq seen.
#[derive(Default)]
pub(crate) struct Versions(std::collections::BTreeMap<(String, String), (u64, Option<Partition>)>);

impl Versions {
    pub(crate) fn add(
        &mut self,
        doc_id: String,
        version: String,
        seq: u64,
        partition: Option<Partition>,
    ) {
        let e = self.0.entry((doc_id, version)).or_default();
        e.0 = e.0.max(seq);
        if e.1.is_none() {
            e.1 = partition;
        }
    }

    pub(crate) fn into_vec(self) -> Vec<StoredVersion> {
        self.0
            .into_iter()
            .map(|((doc_id, version), (seq, partition))| StoredVersion {
                doc_id,
                version,
                seq,
                partition,
            })
            .collect()
    }
}

/// A document's partition under the sources' rules now; `None` when no
/// configured source holds it.
pub type PartitionOf<'a> = &'a dyn Fn(&str) -> Option<Partition>;

/// The division and access level of hidden points ([`VectorStore::hide`]).
/// No scope holds it: the config refuses division and access level names
/// with control characters.
pub const HIDDEN: &str = "\u{1}hidden";

impl Partition {
    /// See [`HIDDEN`].
    pub fn hidden() -> Partition {
        Partition {
            division: HIDDEN.into(),
            access_level: HIDDEN.into(),
        }
    }
}

/// See [`removals_at_start`]: a millisecond, in seqs.
const PAST_NEWEST: u64 = 1_000_000;

/// What a node starting up removes from the store, before it serves or
/// takes work: what a failed or lost prune left, and what its sources no
/// longer file where the store has it.
///
/// * With `prune` (a node that runs the VersionPruner), every version of
///   a document but its newest (by the watcher's seq): a prune that failed
///   for good, or whose event was lost, left them searchable, and nothing
///   else would ever remove them (the next scan finds the file unchanged).
/// * With `partition_of` (a node that runs the watcher and has the
///   sources' rules), to hide ([`VectorStore::hide`]), every version of a
///   document whose source is no longer configured (`None` from
///   `partition_of`; the scan deletes it), and every version of one whose
///   newest version is filed in another partition than the rules now give
///   it. The scan re-indexes the file in its new partition, but it
///   reaches it only later; until then the old copy would answer those
///   who may see the old partition only. Hidden rather than removed, its
///   vectors serve the new version: a changed rule, or a renamed source,
///   costs no embedding.
///
/// Each removal spares versions seen after the newest found here, which
/// another node may be writing meanwhile. (Removing a document whole, it
/// names a bound a millisecond past its newest seq: seqs are nanoseconds,
/// and the stores compare them as f64, to ~256 ns, so one past it would
/// round back onto it and spare the very version to remove.)
pub fn removals_at_start(
    stored: &[StoredVersion],
    prune: bool,
    partition_of: Option<PartitionOf>,
) -> AtStart {
    let mut docs: std::collections::BTreeMap<&str, Vec<&StoredVersion>> = Default::default();
    for v in stored {
        docs.entry(&v.doc_id).or_default().push(v);
    }
    let mut at_start = AtStart::default();
    for (doc_id, versions) in docs {
        let newest = *versions
            .iter()
            .max_by_key(|v| v.seq)
            .expect("a document has a version");
        let whole = || Removal::new(doc_id, None).seen_before(newest.seq + PAST_NEWEST);
        if let Some(partition_of) = partition_of {
            match (partition_of(doc_id), &newest.partition) {
                (None, was) => {
                    // Hidden, not removed: the scan deletes it, after the
                    // files that moved into another source meanwhile (a
                    // source renamed) have reused its vectors. It keeps its stored version for
                    // that (see `source_watcher::waits_for_moves`).
                    if was.as_ref() != Some(&Partition::hidden()) {
                        at_start.hide.push(whole());
                    }
                    continue;
                }
                (Some(now), Some(was)) if now != *was => {
                    // (Hidden at an earlier start: nothing more to do to
                    // it, but it is still to index anew.)
                    if *was != Partition::hidden() {
                        at_start.hide.push(whole());
                    }
                    at_start.hidden.push(doc_id.to_string());
                    continue;
                }
                _ => {}
            }
        }
        if prune && versions.len() > 1 {
            let removal = Removal::new(doc_id, Some(&newest.version)).seen_before(newest.seq);
            at_start.remove.push(removal);
        }
    }
    at_start
}

/// What [`removals_at_start`] finds.
#[derive(Debug, Default, PartialEq)]
pub struct AtStart {
    pub remove: Vec<Removal>,
    /// Documents to hide ([`VectorStore::hide`]).
    pub hide: Vec<Removal>,
    /// Every document hidden, now or at an earlier start: each is indexed
    /// anew, whatever its stored version says.
    pub hidden: Vec<String>,
}

/// What an index node undoes after a write to a store other index nodes
/// write too: each document of `written` of which the store, read back
/// after the write (`stored`, see [`VectorStore::versions_of`]), holds a
/// version seen later than the newest written here loses every version
/// seen before that one (the one written here among them).
///
/// Why: a node that the group dropped for not answering (a long pause, a
/// network split) may still finish a write it had started, after the
/// node that inherited its partitions wrote a newer version and pruned
/// against it; nothing else would ever remove the old text. Any such late
/// write either lands before the newer version's prune, which removes it,
/// or after, when the newer version is in the store and this read finds
/// it. A version with no seq (from a node that sends none) cannot be
/// ordered and is left as written.
pub fn overtaken(written: &[&DocMeta], stored: &[StoredVersion]) -> Vec<Removal> {
    let mut newest_written: std::collections::BTreeMap<&str, &DocMeta> = Default::default();
    for d in written {
        let e = newest_written.entry(&d.doc_id).or_insert(d);
        if d.seq > e.seq {
            *e = d;
        }
    }
    let mut newest_stored: std::collections::HashMap<&str, &StoredVersion> = Default::default();
    for v in stored {
        let e = newest_stored.entry(&v.doc_id).or_insert(v);
        if v.seq > e.seq {
            *e = v;
        }
    }
    newest_written
        .into_iter()
        .filter_map(|(doc_id, w)| {
            let n = newest_stored.get(doc_id)?;
            (w.seq > 0 && n.seq > w.seq && n.version != w.version)
                .then(|| Removal::new(doc_id, Some(&n.version)).seen_before(n.seq))
        })
        .collect()
}

/// What to delete of one document: every version but `keep`, or, with no
/// `keep`, all of it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Removal {
    pub doc_id: String,
    pub keep: Option<String>,
    /// Only versions seen before this `seq` (and points that carry none,
    /// written before ragd stored it). The pruner sets the kept version's
    /// seq, so a newer version written while its prune was on its way
    /// survives it. Like the ledger's ordering on index nodes, this trusts
    /// the watchers' clocks: a version seen after the clock stepped back
    /// leaves an older one in place until the next change. (Stores compare
    /// it as an f64: to ~256 ns at today's nanosecond seqs, far finer than
    /// two versions of one file are ever seen apart.)
    pub seen_before: Option<u64>,
}

impl Removal {
    /// Every version of `doc_id` but `keep` (all of them for `None`),
    /// whenever seen.
    pub fn new(doc_id: &str, keep: Option<&str>) -> Removal {
        Removal {
            doc_id: doc_id.to_string(),
            keep: keep.map(str::to_string),
            seen_before: None,
        }
    }

    /// The same, for versions seen before `seq` only; 0 (an event from a
    /// node that sends no seq) leaves it unguarded.
    pub fn seen_before(self, seq: u64) -> Removal {
        Removal {
            seen_before: (seq > 0).then_some(seq),
            ..self
        }
    }
}

#[async_trait]
pub trait VectorStore: Send + Sync {
    fn backend(&self) -> &'static str;
    /// Writes every chunk of one document version; visible to searches when
    /// it returns, durable after [`VectorStore::flush`]. A chunk already
    /// stored with a later seq (the same text seen again since) is left
    /// as it is: a version delivered late must not make the current one
    /// look older than it is (see [`overtaken`]).
    async fn upsert(
        &self,
        doc: &DocMeta,
        chunks: &[Chunk],
        vectors: &[Vec<f32>],
    ) -> anyhow::Result<()>;
    /// [`VectorStore::upsert`] for several documents, in as few writes as
    /// the backend can (the Indexer writes a burst this way).
    async fn upsert_docs(&self, docs: &[EmbeddedDoc]) -> anyhow::Result<()> {
        for d in docs {
            self.upsert(&d.meta, &d.chunks, &d.vectors).await?;
        }
        Ok(())
    }
    /// Top `limit` chunks by cosine similarity, looking only inside `scope`.
    async fn search(&self, vector: &[f32], scope: &Scope, limit: usize)
        -> anyhow::Result<Vec<Hit>>;
    /// Deletes every version of `doc_id` except `keep`; returns the versions
    /// removed.
    async fn delete_other_versions(&self, doc_id: &str, keep: &str) -> anyhow::Result<Vec<String>> {
        let removal = Removal::new(doc_id, Some(keep));
        Ok(self.remove(&[removal]).await?.pop().unwrap_or_default())
    }
    /// Deletes every chunk of `doc_id`; returns the versions removed.
    async fn delete_doc(&self, doc_id: &str) -> anyhow::Result<Vec<String>> {
        let removal = Removal::new(doc_id, None);
        Ok(self.remove(&[removal]).await?.pop().unwrap_or_default())
    }
    /// [`VectorStore::delete_other_versions`] or [`VectorStore::delete_doc`]
    /// for each removal, honouring [`Removal::seen_before`], in as few calls
    /// as the backend can (the VersionPruner's batches); the versions
    /// removed, per removal. Every backend's deletions go through this.
    async fn remove(&self, removals: &[Removal]) -> anyhow::Result<Vec<Vec<String>>>;
    /// Takes the points [`VectorStore::remove`] would remove out of every
    /// search, and keeps them: filed in the [`HIDDEN`] partition, which no
    /// scope holds. A document whose partition rule changed is hidden at
    /// start rather than deleted (see [`removals_at_start`]): none of its
    /// old readers sees it from then, and its vectors stay for the embedder
    /// ([`stored_vectors`]) until its new version is written and the
    /// pruner removes the old.
    async fn hide(&self, removals: &[Removal]) -> anyhow::Result<()>;
    /// Whether the store still holds every chunk `hits` cite (by document,
    /// version and chunk), in the partition each hit names. A cached answer
    /// is served only then: not one that cites a version pruned since
    /// (its invalidation failed or was lost with the cache down), nor one
    /// whose document moved to another partition (same text, same points,
    /// but the cached copy would show it to the old partition's readers).
    async fn holds_all(&self, hits: &[Hit]) -> anyhow::Result<bool>;
    /// Every document version in the store.
    async fn indexed_versions(&self) -> anyhow::Result<Vec<StoredVersion>>;
    /// The versions stored of these documents (as
    /// [`VectorStore::indexed_versions`] tells them), in one lookup: an
    /// index node reads back what it wrote (see [`overtaken`]).
    async fn versions_of(&self, doc_ids: &[String]) -> anyhow::Result<Vec<StoredVersion>>;
    /// Number of points, optionally only those of one document.
    async fn count(&self, doc_id: Option<&str>) -> anyhow::Result<u64>;
    /// Number of points hidden ([`VectorStore::hide`]): waiting to be
    /// indexed anew in their new partition, or deleted.
    async fn count_hidden(&self) -> anyhow::Result<u64>;
    /// Makes every write so far durable.
    async fn flush(&self) -> anyhow::Result<()>;
    /// Builds search indexes for grown segments (a no-op where the engine
    /// does it by itself).
    async fn optimize(&self) -> anyhow::Result<()>;
    /// Up to `limit` points whose text key ([`EmbeddedDoc::keys`]) is one
    /// of `keys`, of any document and partition, with their text and
    /// vector (see [`stored_vectors`]).
    async fn keyed_texts(&self, keys: &[i64], limit: usize) -> anyhow::Result<Vec<KeyedText>>;
    /// Up to `limit` points of these documents (any version) that have a
    /// text key, with their text and vector: what the pruner keeps of the
    /// documents it deletes (see [`crate::embedder::deleted`]). A backend
    /// that cannot tell returns none: only a saving is lost.
    async fn keyed_texts_of(
        &self,
        _doc_ids: &[String],
        _limit: usize,
    ) -> anyhow::Result<Vec<KeyedText>> {
        Ok(vec![])
    }
    /// One page of points in id order, from `page.from` on, with their
    /// text and text key (and vector, where asked); the next page's start
    /// comes back (none after the last). The model check and the text-key
    /// backfill read the store this way (see [`model_check`]).
    async fn texts(&self, page: TextPage) -> anyhow::Result<(Vec<StoredText>, Option<u64>)>;
    /// Sets each point's text key, by point id, in as few writes as the
    /// backend can; a point deleted meanwhile is skipped, not an error.
    async fn set_text_keys(&self, keys: &[(u64, i64)]) -> anyhow::Result<()>;
}

/// Which points [`VectorStore::texts`] reads.
#[derive(Clone, Copy, Debug, Default)]
pub struct TextPage {
    /// The first point id of the page (none: the store's first).
    pub from: Option<u64>,
    pub limit: usize,
    pub with_vectors: bool,
    /// Only points without a text key.
    pub unkeyed: bool,
}

/// A point's text as [`VectorStore::texts`] reads it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredText {
    pub id: u64,
    pub key: Option<i64>,
    pub text: String,
    /// Where [`TextPage::with_vectors`].
    pub vector: Option<Vec<f32>>,
}

/// A chunk's text and vector as a store holds them, found by its text key.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyedText {
    pub key: i64,
    pub text: String,
    pub vector: Vec<f32>,
}

/// See [`stored_vectors`].
const LOOKUP_ROUNDS: usize = 4;
const LOOKUP_KEYS: usize = 256;

/// The vectors `store` already holds for these texts (each with its text
/// key), by key: the embedder reuses them rather than embedding the same
/// text again. A file copied, renamed or moved to another folder is a new
/// document of the same text, and most chunks of an edited one are
/// unchanged: without this, each costs a full embedding (minutes of CPU
/// for a large folder moved).
///
/// Reusing a vector shows nothing across partitions: it is a function of
/// the text alone, which the document asking for it holds itself. A point
/// counts only if its stored text is the chunk's own, so a key that two
/// texts share (64 bits of a hash) costs an embedding, never a wrong
/// vector; and the key covers the model (see
/// [`crate::embedder::text_key`]), so a store written by another model
/// offers nothing.
pub async fn stored_vectors(
    store: &dyn VectorStore,
    wanted: &[(i64, &str)],
) -> anyhow::Result<std::collections::HashMap<i64, Vec<f32>>> {
    let mut found = std::collections::HashMap::new();
    // A long document's chunks (25,000 for a 20 MB file) a few hundred at
    // a time: each answer stays around a megabyte (a Qdrant server's
    // replies are limited in size).
    for part in wanted.chunks(LOOKUP_KEYS) {
        let mut missing: std::collections::BTreeMap<i64, &str> = part.iter().copied().collect();
        // A text that many documents share (a footer, a disclaimer) has as
        // many points, which could fill a page. Each round asks only for
        // the keys not found yet, so one such text takes a round at most.
        for _ in 0..LOOKUP_ROUNDS {
            if missing.is_empty() {
                break;
            }
            let keys: Vec<i64> = missing.keys().copied().collect();
            let limit = keys.len() + 16;
            let page = store.keyed_texts(&keys, limit).await?;
            let more = page.len() >= limit;
            for t in page {
                if missing.get(&t.key) == Some(&t.text.as_str()) {
                    missing.remove(&t.key);
                    found.insert(t.key, t.vector);
                }
            }
            if !more {
                break;
            }
        }
    }
    Ok(found)
}

/// The versions a batch of removals takes out, as one after the other
/// would: a version of a document goes when any removal of that document
/// does not keep it. (The caches' invalidation reads it; the seq guard plays
/// no part there, since a cached answer dropped too many is only a miss.)
pub struct Removed<'a>(std::collections::HashMap<&'a str, Vec<Option<&'a str>>>);

impl<'a> Removed<'a> {
    pub fn by(removals: &'a [Removal]) -> Removed<'a> {
        let mut keeps: std::collections::HashMap<&str, Vec<Option<&str>>> = Default::default();
        for r in removals {
            keeps.entry(&r.doc_id).or_default().push(r.keep.as_deref());
        }
        Removed(keeps)
    }

    pub fn contains(&self, doc_id: &str, version: &str) -> bool {
        self.0
            .get(doc_id)
            .is_some_and(|keeps| keeps.iter().any(|k| *k != Some(version)))
    }
}

/// What a batched [`VectorStore::remove`] found, told per removal: the
/// versions of its document other than the one it keeps.
pub(crate) fn removed_per_doc(removals: &[Removal], found: &[StoredVersion]) -> Vec<Vec<String>> {
    let mut by_doc: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for v in found {
        by_doc.entry(&v.doc_id).or_default().push(&v.version);
    }
    removals
        .iter()
        .map(|r| {
            let versions = by_doc.get(r.doc_id.as_str()).map_or(&[][..], Vec::as_slice);
            versions
                .iter()
                .filter(|v| Some(**v) != r.keep.as_deref())
                .map(|v| v.to_string())
                .collect()
        })
        .collect()
}

/// The argument checks every backend's `upsert` makes.
pub fn check_upsert(
    chunks: &[Chunk],
    vectors: &[Vec<f32>],
    keys: &[i64],
    dim: usize,
) -> anyhow::Result<()> {
    anyhow::ensure!(chunks.len() == vectors.len(), "one vector per chunk");
    anyhow::ensure!(
        keys.is_empty() || keys.len() == chunks.len(),
        "one text key per chunk, or none"
    );
    for v in vectors {
        anyhow::ensure!(
            v.len() == dim,
            "vector of size {} for a store of size {dim}",
            v.len()
        );
    }
    Ok(())
}

/// The argument checks every backend's `search` makes; Ok(false) when
/// nothing can match (an empty scope matches nothing, never everything).
pub fn check_search(
    vector: &[f32],
    scope: &Scope,
    limit: usize,
    dim: usize,
) -> anyhow::Result<bool> {
    if scope.is_empty() || limit == 0 {
        return Ok(false);
    }
    anyhow::ensure!(
        vector.len() == dim,
        "query vector of size {} for a store of size {dim}",
        vector.len()
    );
    Ok(true)
}

/// Deterministic point id: the first 8 bytes of sha256(doc id, version, index).
/// Whether `found` (the cited points the store has: id, division, access
/// level) backs every hit, in its partition.
pub(crate) fn all_found(hits: &[Hit], found: &HashSet<(u64, String, String)>) -> bool {
    hits.iter().all(|h| {
        let id = point_id(&h.doc_id, &h.version, h.chunk_index);
        found.contains(&(id, h.division.clone(), h.access_level.clone()))
    })
}

/// The points `hits` are, each once.
pub(crate) fn hit_ids(hits: &[Hit]) -> Vec<u64> {
    let mut ids: Vec<u64> = hits
        .iter()
        .map(|h| point_id(&h.doc_id, &h.version, h.chunk_index))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

pub fn point_id(doc_id: &str, version: &str, chunk_index: u32) -> u64 {
    let mut h = Sha256::new();
    h.update(doc_id.as_bytes());
    h.update([0]);
    h.update(version.as_bytes());
    h.update([0]);
    h.update(chunk_index.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(doc: &str, version: &str, seq: u64, division: &str) -> StoredVersion {
        StoredVersion {
            doc_id: doc.into(),
            version: version.into(),
            seq,
            partition: Some(Partition {
                division: division.into(),
                access_level: "internal".into(),
            }),
        }
    }

    #[test]
    fn at_start_old_versions_and_moved_documents_go() {
        let found = [
            stored("kb:a.md", "v1", 10, "eng"),
            stored("kb:a.md", "v2", 20, "eng"),
            stored("kb:b.md", "v1", 10, "eng"),
            stored("kb:hr/c.md", "v1", 10, "eng"),
            stored("kb:hr/c.md", "v2", 30, "eng"),
            stored("wiki:d.md", "v1", 10, "eng"),
        ];
        // An index node: a.md and c.md keep their newest.
        let pruned = removals_at_start(&found, true, None);
        assert!(pruned.hide.is_empty() && pruned.hidden.is_empty());
        assert_eq!(
            pruned.remove,
            [
                Removal::new("kb:a.md", Some("v2")).seen_before(20),
                Removal::new("kb:hr/c.md", Some("v2")).seen_before(30),
            ]
        );
        // An ingest node whose rules now file hr/ under hr, with no wiki
        // source any more: c.md and d.md are hidden whole (and nothing
        // seen after their newest version).
        let rules = |doc: &str| -> Option<Partition> {
            let uri = doc.strip_prefix("kb:")?;
            let division = if uri.starts_with("hr/") { "hr" } else { "eng" };
            Some(Partition {
                division: division.into(),
                access_level: "internal".into(),
            })
        };
        let moved = removals_at_start(&found, false, Some(&rules));
        assert_eq!(
            moved,
            AtStart {
                remove: vec![],
                // c.md is filed elsewhere now: hidden for its new version.
                // d.md's source is gone: hidden for the scan to delete,
                // not to index anew.
                hide: vec![
                    Removal::new("kb:hr/c.md", None).seen_before(30 + PAST_NEWEST),
                    Removal::new("wiki:d.md", None).seen_before(10 + PAST_NEWEST),
                ],
                hidden: vec!["kb:hr/c.md".into()],
            }
        );
        // Both roles: each document once, moved ones whole.
        let both = removals_at_start(&found, true, Some(&rules));
        assert_eq!((both.remove.len(), both.hide.len()), (1, 2));
        // Nothing to do on a store in order.
        assert_eq!(
            removals_at_start(&found[2..3], true, Some(&rules)),
            AtStart::default()
        );
        // Hidden at an earlier start and not indexed since: not hidden
        // again, still to index anew.
        let mut was_hidden = stored("kb:hr/c.md", "v2", 30, "eng");
        was_hidden.partition = Some(Partition::hidden());
        let again = removals_at_start(&[was_hidden.clone()], true, Some(&rules));
        assert_eq!(
            again,
            AtStart {
                hidden: vec!["kb:hr/c.md".into()],
                ..Default::default()
            }
        );
        // Nor one of a source gone, still to delete.
        was_hidden.doc_id = "wiki:d.md".into();
        let again = removals_at_start(&[was_hidden], true, Some(&rules));
        assert_eq!(again, AtStart::default());
    }

    #[test]
    fn a_write_overtaken_in_the_store_is_undone() {
        let meta = |doc: &str, version: &str, seq: u64| DocMeta {
            doc_id: doc.into(),
            source: "kb".into(),
            uri: doc.into(),
            path: doc.into(),
            version: version.into(),
            partition: Partition {
                division: "eng".into(),
                access_level: "internal".into(),
            },
            size: 1,
            seq,
        };
        let written = [
            meta("a", "v1", 10),
            meta("b", "v1", 10),
            meta("c", "v1", 10),
            meta("c", "v2", 20),
            meta("d", "v1", 0),
            meta("e", "v1", 30),
        ];
        let stored = [
            // a: another node wrote v2, seen later, meanwhile.
            stored("a", "v1", 10, "eng"),
            stored("a", "v2", 20, "eng"),
            // b: only what was written here.
            stored("b", "v1", 10, "eng"),
            // c: both versions written here; the pruner sees to v1.
            stored("c", "v1", 10, "eng"),
            stored("c", "v2", 20, "eng"),
            // d: no seq, no order.
            stored("d", "v1", 0, "eng"),
            stored("d", "v2", 20, "eng"),
            // e: the same text seen again later elsewhere (a change undone).
            stored("e", "v1", 40, "eng"),
        ];
        let written: Vec<&DocMeta> = written.iter().collect();
        assert_eq!(
            overtaken(&written, &stored),
            [Removal::new("a", Some("v2")).seen_before(20)]
        );
        // A store that holds nothing of them (deleted meanwhile) undoes
        // nothing here: the ingest node deletes again once told.
        assert!(overtaken(&written, &[]).is_empty());
    }

    #[test]
    fn point_ids_are_deterministic_and_distinct() {
        assert_eq!(point_id("a", "v1", 0), point_id("a", "v1", 0));
        assert_ne!(point_id("a", "v1", 0), point_id("a", "v1", 1));
        assert_ne!(point_id("a", "v1", 0), point_id("a", "v2", 0));
        // The separator keeps ("ab","c") and ("a","bc") apart.
        assert_ne!(point_id("ab", "c", 0), point_id("a", "bc", 0));
    }

    #[test]
    fn the_search_breadth_defaults_from_the_limit_and_never_falls_below_it() {
        let default = HnswSettings::default();
        assert_eq!(default.search_ef(50), 256);
        assert_eq!(default.search_ef(100), 400);
        let narrow = HnswSettings {
            ef: 64,
            ..Default::default()
        };
        assert_eq!(narrow.search_ef(10), 64);
        assert_eq!(narrow.search_ef(100), 100);
    }

    #[test]
    fn empty_scope_allows_nothing() {
        let s = Scope {
            divisions: vec!["hr".into()],
            access_levels: vec![],
        };
        assert!(s.is_empty());
        assert!(!s.allows("hr", "public"));
    }
}
