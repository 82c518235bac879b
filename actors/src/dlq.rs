//! The dead-letter queue: where a document goes after its attempts are spent,
//! with the stage, the error and the original payload, so an operator can
//! look at it, fix the cause and replay it.
//!
//! Embedded backend: an append-only JSON-lines log. Replaying appends a
//! `replayed` record instead of rewriting the file, so a crash mid-write can
//! lose at most the line being written, never earlier entries.
//!
//! An entry waits for a replay until one comes, or until its document moves
//! on without one (see [`Settled`]): a newer version of the file came (the
//! operator fixed it, or it changed), or the file was deleted. Either way
//! there is nothing left to replay.

use anyhow::Context;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DlqEntry {
    pub id: u64,
    /// Unix seconds.
    pub at: u64,
    pub stage: String,
    pub error: String,
    pub attempts: u32,
    pub doc_id: String,
    pub version: Option<String>,
    /// The message the stage failed on, as it was.
    pub payload: serde_json::Value,
    #[serde(default)]
    pub replayed: bool,
    /// Set when the document moved on without a replay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub settled: Option<Settled>,
}

/// How an entry's document moved on without a replay: its failed version
/// is no longer the document's, so the entry no longer waits (an
/// operator's list of what to look at, or an alert on the entries
/// waiting, would otherwise keep it for good).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Settled {
    /// A newer version of the file came (fixed, or changed) and was taken
    /// in; should it fail too, it has an entry of its own.
    Superseded,
    /// The file was deleted.
    Deleted,
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub(crate) enum Record {
    Entry(DlqEntry),
    Replayed { id: u64 },
    Settled { id: u64, how: Settled },
}

pub trait DeadLetters: Send + Sync {
    /// Stores the entry (its `id` is assigned here) and returns the id.
    fn push(&self, entry: DlqEntry) -> anyhow::Result<u64>;
    fn list(&self) -> anyhow::Result<Vec<DlqEntry>>;
    /// One page of the entries, in id order (an operator's listing: the
    /// queue may hold many thousands).
    fn page(&self, q: &PageQuery) -> anyhow::Result<Page> {
        let entries = self.list()?.into_iter().filter(|e| e.id > q.after);
        Ok(Page::of(entries, q))
    }
    /// Entry `id`, if there is one.
    fn get(&self, id: u64) -> anyhow::Result<Option<DlqEntry>> {
        Ok(self.list()?.into_iter().find(|e| e.id == id))
    }
    /// Marks entry `id` replayed and returns it; of two calls for one
    /// entry, one fails with [`AlreadyReplayed`].
    fn mark_replayed(&self, id: u64) -> anyhow::Result<DlqEntry>;
    /// The entry holding `version` of `doc_id`, unless it was replayed (or
    /// settled). The watcher asks this for every document it sees, so
    /// backends answer from memory without copying the whole queue.
    fn pending(&self, doc_id: &str, version: &str) -> Option<DlqEntry>;
    /// An entry of `version` waiting for a replay, of any document: the
    /// same content in the same partition, dead-lettered under another
    /// name (a copy, or a file moved). Asked for every version the watcher
    /// takes in, so answered from memory; `None` for a backend without an
    /// index of versions.
    fn pending_version(&self, _version: &str) -> Option<DlqEntry> {
        None
    }
    /// Marks `how` every entry of `doc_id` still waiting, but those of
    /// `current` (the version just taken in: its entry, if any, is the one
    /// it waits on), and returns their ids. Entries with no version (a
    /// deletion that failed) are settled too: the version or deletion
    /// taken in does their work again. The watcher calls it for each
    /// version it takes in and each deletion, so a backend answers the
    /// usual case (no entry of the document) from memory.
    fn settle(&self, doc_id: &str, current: Option<&str>, how: Settled)
        -> anyhow::Result<Vec<u64>>;
    /// The documents with an entry waiting for a replay: a full scan
    /// settles those whose file went while no ragd looked (see
    /// `source_watcher::rescan`). Not "": a bus message with no key names
    /// no document.
    fn waiting_docs(&self) -> Vec<String> {
        let entries = self.list().unwrap_or_default().into_iter();
        let waiting = entries.filter(|e| e.waiting() && !e.doc_id.is_empty());
        let docs: BTreeSet<String> = waiting.map(|e| e.doc_id).collect();
        docs.into_iter().collect()
    }
}

/// Which entries a [`DeadLetters::page`] holds: up to `limit` with ids
/// above `after`, only those not replayed yet with `pending_only`.
#[derive(Clone, Debug, PartialEq)]
pub struct PageQuery {
    pub after: u64,
    pub limit: usize,
    pub pending_only: bool,
}

#[derive(Debug)]
pub struct Page {
    pub entries: Vec<DlqEntry>,
    /// Whether entries follow the page's last.
    pub more: bool,
}

impl Page {
    /// The page of `entries` (in id order, above `q.after` already).
    fn of(entries: impl Iterator<Item = DlqEntry>, q: &PageQuery) -> Page {
        let mut entries = entries.filter(|e| !q.pending_only || e.waiting());
        let page: Vec<DlqEntry> = entries.by_ref().take(q.limit).collect();
        let more = entries.next().is_some();
        Page {
            entries: page,
            more,
        }
    }
}

/// [`DeadLetters::mark_replayed`] of an entry that was replayed already.
#[derive(Debug)]
pub struct AlreadyReplayed(pub u64);

impl std::fmt::Display for AlreadyReplayed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DLQ entry {} was replayed already", self.0)
    }
}

impl std::error::Error for AlreadyReplayed {}

/// The most of an entry's payload held in memory. Every node holds every
/// entry, and a rejected bus message's payload is up to 64 KiB of raw
/// text: a longer one is held as a preview, and the whole stays in the log
/// or on the topic. (Stage payloads are document metadata, far below.)
pub const PAYLOAD_IN_MEMORY: usize = 4 << 10;

/// The entries a backend holds in memory, in id order, with the pending
/// ones indexed by document and version: the watcher asks about every
/// document it sees, which must not scan a long queue each time.
pub struct Held {
    entries: Vec<DlqEntry>,
    /// doc id -> version -> ids of its entries waiting for a replay.
    pending: HashMap<String, HashMap<String, BTreeSet<u64>>>,
    /// version -> ids of its entries waiting for a replay, of any document.
    by_version: HashMap<String, BTreeSet<u64>>,
    /// doc id -> ids of its entries with no version waiting for a replay:
    /// a deletion that failed every attempt, a bus message that named
    /// none. The document's next version or deletion settles them (it
    /// does their work again: a new version's index prunes every other).
    unversioned: HashMap<String, BTreeSet<u64>>,
    /// Where the whole payload of entry `id` is, for a preview to say.
    whole_at: Box<dyn Fn(u64) -> String + Send>,
}

impl Held {
    pub fn new(whole_at: impl Fn(u64) -> String + Send + 'static) -> Held {
        Held {
            entries: Vec::new(),
            pending: HashMap::new(),
            by_version: HashMap::new(),
            unversioned: HashMap::new(),
            whole_at: Box::new(whole_at),
        }
    }

    /// Adds an entry; false (and nothing added) when its id is held
    /// already, which only a log edited by hand has.
    pub fn insert(&mut self, mut e: DlqEntry) -> bool {
        let at = self.entries.partition_point(|x| x.id < e.id);
        if self.entries.get(at).is_some_and(|x| x.id == e.id) {
            return false;
        }
        if let serde_json::Value::String(s) = &e.payload {
            if s.len() > PAYLOAD_IN_MEMORY {
                let cut = s.floor_char_boundary(PAYLOAD_IN_MEMORY);
                e.payload = serde_json::Value::String(format!(
                    "{}… [cut here: {} bytes in all; the whole payload is in {}]",
                    &s[..cut],
                    s.len(),
                    (self.whole_at)(e.id)
                ));
            }
        }
        self.index(&e, true);
        // (Ids come in order: the log's are assigned so, the topic's are
        // offsets. This is a push then.)
        self.entries.insert(at, e);
        true
    }

    fn index(&mut self, e: &DlqEntry, add: bool) {
        if !e.waiting() {
            return;
        }
        let Some(version) = e.version.as_ref() else {
            file_id(&mut self.unversioned, &e.doc_id, e.id, add);
            return;
        };
        file_id(&mut self.by_version, version, e.id, add);
        let versions = self.pending.entry(e.doc_id.clone()).or_default();
        file_id(versions, version, e.id, add);
        if versions.is_empty() {
            self.pending.remove(&e.doc_id);
        }
    }

    pub fn get(&self, id: u64) -> Option<&DlqEntry> {
        let at = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        Some(&self.entries[at])
    }

    /// Sets entry `id`'s replayed mark and returns the entry; None when
    /// there is no such entry.
    pub fn set_replayed(&mut self, id: u64, replayed: bool) -> Option<DlqEntry> {
        self.mark(id, |e| e.replayed = replayed)
    }

    /// Sets entry `id`'s settled mark and returns the entry; None when
    /// there is no such entry.
    pub fn set_settled(&mut self, id: u64, how: Option<Settled>) -> Option<DlqEntry> {
        self.mark(id, |e| e.settled = how)
    }

    /// Changes entry `id`'s marks, its place in the index of pending
    /// entries with them.
    fn mark(&mut self, id: u64, change: impl FnOnce(&mut DlqEntry)) -> Option<DlqEntry> {
        let at = self.entries.binary_search_by_key(&id, |e| e.id).ok()?;
        let e = self.entries[at].clone();
        self.index(&e, false);
        change(&mut self.entries[at]);
        let e = self.entries[at].clone();
        self.index(&e, true);
        Some(e)
    }

    /// The entries of `doc_id` waiting for a replay, but those of version
    /// `except` (those with no version too).
    pub fn waiting_of(&self, doc_id: &str, except: Option<&str>) -> Vec<u64> {
        let versions = self.pending.get(doc_id).into_iter().flatten();
        let others = versions.filter(|(v, _)| Some(v.as_str()) != except);
        let unversioned = self.unversioned.get(doc_id).into_iter().flatten();
        let mut ids: Vec<u64> = (others.flat_map(|(_, ids)| ids.iter()))
            .chain(unversioned)
            .copied()
            .collect();
        ids.sort_unstable();
        ids
    }

    /// See [`DeadLetters::waiting_docs`].
    pub fn waiting_docs(&self) -> Vec<String> {
        let docs = self.pending.keys().chain(self.unversioned.keys());
        let named: BTreeSet<&String> = docs.filter(|d| !d.is_empty()).collect();
        named.into_iter().cloned().collect()
    }

    /// The first entry holding `version` of `doc_id` still waiting for a
    /// replay.
    pub fn pending(&self, doc_id: &str, version: &str) -> Option<DlqEntry> {
        let id = *self.pending.get(doc_id)?.get(version)?.first()?;
        self.get(id).cloned()
    }

    /// See [`DeadLetters::pending_version`]: the first such entry.
    pub fn pending_version(&self, version: &str) -> Option<DlqEntry> {
        let id = *self.by_version.get(version)?.first()?;
        self.get(id).cloned()
    }

    pub fn last_id(&self) -> u64 {
        self.entries.last().map_or(0, |e| e.id)
    }

    pub fn list(&self) -> Vec<DlqEntry> {
        self.entries.clone()
    }

    /// See [`DeadLetters::page`]: found by binary search, copied no
    /// further than the page.
    pub fn page(&self, q: &PageQuery) -> Page {
        let start = self.entries.partition_point(|e| e.id <= q.after);
        let rest = self.entries[start..].iter();
        Page::of(rest.filter(|e| !q.pending_only || e.waiting()).cloned(), q)
    }
}

/// The log plus its entries in memory: the watcher asks "is this version
/// dead-lettered?" for every document it sees, which must not re-read the
/// file each time. The file stays the source of truth across restarts.
///
/// Two locks: a change holds `tail` throughout (so what it checked in
/// `held` stays true until it is written) but `held` only to read it and,
/// once the record is on disk, to apply it. A reader takes `held` alone,
/// so the watcher's question never waits for a change's fsync.
pub struct FileDlq {
    path: PathBuf,
    tail: Mutex<Tail>,
    held: Mutex<Held>,
}

/// The log file and where its last whole record ends.
struct Tail {
    file: File,
    end: u64,
}

impl FileDlq {
    pub fn open(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating DLQ folder {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening DLQ log {}", path.display()))?;
        // A crash can leave a torn last line; start the next record on a
        // fresh line so it is not glued to the torn one.
        let len = file.metadata()?.len();
        if len > 0 {
            use std::io::{Read, Seek, SeekFrom};
            let mut last = [0u8; 1];
            let mut reader = File::open(&path)?;
            reader.seek(SeekFrom::Start(len - 1))?;
            reader.read_exact(&mut last)?;
            if last[0] != b'\n' {
                (&file).write_all(b"\n")?;
            }
        }
        let end = file.metadata()?.len();
        let log = path.display().to_string();
        let mut held = Held::new(move |_| format!("the DLQ log {log}"));
        for e in Self::read(&path)? {
            if !held.insert(e) {
                tracing::warn!(path = %path.display(), "DLQ log: a second entry with one id is ignored");
            }
        }
        Ok(FileDlq {
            path,
            tail: Mutex::new(Tail { file, end }),
            held: Mutex::new(held),
        })
    }

    /// Reads entries without holding a writer (for `ragd dlq list` while the
    /// daemon runs).
    pub fn read(path: &Path) -> anyhow::Result<Vec<DlqEntry>> {
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mut entries: Vec<DlqEntry> = Vec::new();
        // id -> its place in `entries` (the first entry of an id).
        let mut at = HashMap::new();
        // Split on bytes, not lines of text: a record torn inside a
        // multi-byte character is not UTF-8, and must not fail the read.
        for line in BufReader::new(file).split(b'\n') {
            let line = line.with_context(|| format!("reading {}", path.display()))?;
            // A torn line (a crash, a write cut short) is ignored, not fatal.
            match serde_json::from_slice::<Record>(&line) {
                Ok(Record::Entry(e)) => {
                    at.entry(e.id).or_insert(entries.len());
                    entries.push(e);
                }
                Ok(Record::Replayed { id }) => {
                    if let Some(&i) = at.get(&id) {
                        entries[i].replayed = true;
                    }
                }
                Ok(Record::Settled { id, how }) => {
                    if let Some(&i) = at.get(&id) {
                        entries[i].settled = Some(how);
                    }
                }
                Err(_) => continue,
            }
        }
        Ok(entries)
    }

    /// Appends `record` durably, or not at all as far as a reader can
    /// tell: a write or sync that fails is cut off again, and where that
    /// fails too (or a crash tore a record earlier) the next record starts
    /// on a line of its own, so the torn one cannot take it along.
    fn append(&self, tail: &mut Tail, record: &Record) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        let len = tail.file.metadata()?.len();
        if len != tail.end {
            line.insert(0, b'\n');
        }
        let written = tail
            .file
            .write_all(&line)
            .and_then(|()| tail.file.sync_data());
        match written {
            Ok(()) => {
                tail.end = len + line.len() as u64;
                Ok(())
            }
            Err(e) => {
                // (A failed sync may have left the record whole: cut off,
                // its id is not taken by a record the caller thinks lost.)
                let _ = tail.file.set_len(len);
                Err(e).with_context(|| format!("writing {}", self.path.display()))
            }
        }
    }
}

impl DeadLetters for FileDlq {
    fn push(&self, mut entry: DlqEntry) -> anyhow::Result<u64> {
        let mut tail = self.tail.lock();
        // (Only changes, under `tail`, add entries: this id stays free.)
        entry.id = self.held.lock().last_id() + 1;
        entry.replayed = false;
        entry.settled = None;
        self.append(&mut tail, &Record::Entry(entry.clone()))?;
        let id = entry.id;
        self.held.lock().insert(entry);
        Ok(id)
    }

    fn list(&self) -> anyhow::Result<Vec<DlqEntry>> {
        Ok(self.held.lock().list())
    }

    fn page(&self, q: &PageQuery) -> anyhow::Result<Page> {
        Ok(self.held.lock().page(q))
    }

    fn get(&self, id: u64) -> anyhow::Result<Option<DlqEntry>> {
        Ok(self.held.lock().get(id).cloned())
    }

    fn pending(&self, doc_id: &str, version: &str) -> Option<DlqEntry> {
        self.held.lock().pending(doc_id, version)
    }

    fn pending_version(&self, version: &str) -> Option<DlqEntry> {
        self.held.lock().pending_version(version)
    }

    fn waiting_docs(&self) -> Vec<String> {
        self.held.lock().waiting_docs()
    }

    fn mark_replayed(&self, id: u64) -> anyhow::Result<DlqEntry> {
        let mut tail = self.tail.lock();
        let replayed = (self.held.lock().get(id))
            .with_context(|| format!("no DLQ entry with id {id}"))?
            .replayed;
        if replayed {
            return Err(AlreadyReplayed(id).into());
        }
        self.append(&mut tail, &Record::Replayed { id })?;
        (self.held.lock().set_replayed(id, true))
            .with_context(|| format!("no DLQ entry with id {id}"))
    }

    fn settle(
        &self,
        doc_id: &str,
        current: Option<&str>,
        how: Settled,
    ) -> anyhow::Result<Vec<u64>> {
        // The usual case, no entry of the document, answered without
        // waiting on a change being written.
        if self.held.lock().waiting_of(doc_id, current).is_empty() {
            return Ok(vec![]);
        }
        let mut tail = self.tail.lock();
        let ids = self.held.lock().waiting_of(doc_id, current);
        for &id in &ids {
            self.append(&mut tail, &Record::Settled { id, how })?;
            self.held.lock().set_settled(id, Some(how));
        }
        Ok(ids)
    }
}

impl DlqEntry {
    /// Still waiting for a replay: neither replayed nor settled.
    pub fn waiting(&self) -> bool {
        !self.replayed && self.settled.is_none()
    }

    /// "pending", "replayed", "superseded" or "deleted".
    pub fn status(&self) -> &'static str {
        match (self.replayed, self.settled) {
            (true, _) => "replayed",
            (false, Some(Settled::Superseded)) => "superseded",
            (false, Some(Settled::Deleted)) => "deleted",
            (false, None) => "pending",
        }
    }

    /// The entry for `job` failing in `stage` (its id is assigned on push).
    pub fn for_job<J: crate::pool::Job>(stage: &str, error: &str, attempts: u32, job: &J) -> Self {
        DlqEntry {
            id: 0,
            at: now_secs(),
            stage: stage.to_string(),
            error: error.to_string(),
            attempts,
            doc_id: job.doc_id().to_string(),
            version: job.version().map(str::to_string),
            payload: job.payload(),
            replayed: false,
            settled: None,
        }
    }
}

/// Adds entry `id` under `key` in one of [`Held`]'s indexes, or takes it
/// out (and the key with its last entry).
fn file_id(index: &mut HashMap<String, BTreeSet<u64>>, key: &str, id: u64, add: bool) {
    if add {
        index.entry(key.to_string()).or_default().insert(id);
    } else if let Some(ids) = index.get_mut(key) {
        ids.remove(&id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes written to the log behind the DLQ's back (a torn record).
    fn append_raw(path: &Path, bytes: &[u8]) {
        let mut log = std::fs::OpenOptions::new().append(true).open(path).unwrap();
        log.write_all(bytes).unwrap();
    }

    fn entry(doc: &str) -> DlqEntry {
        DlqEntry {
            id: 0,
            at: now_secs(),
            stage: "chunker".into(),
            error: "malformed pdf".into(),
            attempts: 3,
            doc_id: doc.into(),
            version: Some("abc".into()),
            payload: serde_json::json!({"path": doc}),
            replayed: false,
            settled: None,
        }
    }

    #[test]
    fn pending_entries_are_found_by_document_and_version_until_replayed() {
        let mut held = Held::new(|_| "nowhere".into());
        let with = |id, doc: &str, version: Option<&str>| DlqEntry {
            id,
            version: version.map(str::to_string),
            ..entry(doc)
        };
        // Two entries of one version (it failed again after a replay), one
        // of another version, one without a version (a deletion).
        for e in [
            with(1, "a", Some("v1")),
            with(2, "a", Some("v2")),
            with(3, "a", Some("v1")),
            with(4, "b", None),
        ] {
            assert!(held.insert(e));
        }
        assert!(!held.insert(with(2, "c", Some("v1"))), "a second id 2");
        let pending = |h: &Held, doc, v| h.pending(doc, v).map(|e| e.id);
        // Of any document (a copy of a file in the DLQ).
        let of_version = |h: &Held, v| h.pending_version(v).map(|e| e.id);
        assert_eq!(pending(&held, "a", "v1"), Some(1));
        assert_eq!(pending(&held, "a", "v2"), Some(2));
        assert_eq!(pending(&held, "a", "v3"), None);
        assert_eq!(pending(&held, "b", "v1"), None);
        assert_eq!(pending(&held, "c", "v1"), None);
        assert_eq!(of_version(&held, "v1"), Some(1));
        assert_eq!(of_version(&held, "v3"), None);
        assert!(held.set_replayed(1, true).unwrap().replayed);
        assert_eq!(pending(&held, "a", "v1"), Some(3));
        assert_eq!(of_version(&held, "v1"), Some(3));
        held.set_replayed(3, true);
        assert_eq!(pending(&held, "a", "v1"), None);
        assert_eq!(of_version(&held, "v1"), None);
        assert_eq!(of_version(&held, "v2"), Some(2));
        // A replay that could not be written waits again.
        held.set_replayed(3, false);
        assert_eq!(pending(&held, "a", "v1"), Some(3));
        assert_eq!(of_version(&held, "v1"), Some(3));
        held.set_settled(2, Some(Settled::Deleted));
        assert_eq!(of_version(&held, "v2"), None);
        assert!(held.set_replayed(9, true).is_none());
        // Out of order (a log edited by hand): still found, listed in order.
        assert!(held.insert(with(0, "d", Some("v1"))));
        assert_eq!(held.get(0).unwrap().doc_id, "d");
        assert_eq!(held.get(4).unwrap().doc_id, "b");
        let ids: Vec<u64> = held.list().iter().map(|e| e.id).collect();
        assert_eq!(ids, [0, 1, 2, 3, 4]);
        assert_eq!(held.last_id(), 4);
    }

    /// A document that moved on (a newer version taken in, or deleted)
    /// leaves its entries of other versions settled: no longer pending,
    /// nor listed as waiting, and so after a reopen. The current version's
    /// own entry, and other documents', still wait.
    #[test]
    fn an_entry_whose_document_moved_on_waits_no_more() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let dlq = FileDlq::open(&path).unwrap();
        let of = |doc: &str, version: &str| DlqEntry {
            version: Some(version.into()),
            ..entry(doc)
        };
        for e in [of("a", "v1"), of("a", "v2"), of("b", "v1"), of("c", "v1")] {
            dlq.push(e).unwrap();
        }
        assert_eq!(
            dlq.settle("a", Some("v2"), Settled::Superseded).unwrap(),
            [1]
        );
        assert!(dlq.pending("a", "v1").is_none());
        assert_eq!(dlq.pending("a", "v2").map(|e| e.id), Some(2));
        assert_eq!(dlq.settle("b", None, Settled::Deleted).unwrap(), [3]);
        assert!(dlq.settle("b", None, Settled::Deleted).unwrap().is_empty());
        assert!(dlq.settle("z", None, Settled::Deleted).unwrap().is_empty());
        // A replayed entry is the replay's, not settled after it.
        dlq.mark_replayed(4).unwrap();
        assert!(dlq
            .settle("c", Some("v9"), Settled::Superseded)
            .unwrap()
            .is_empty());
        let statuses = |entries: Vec<DlqEntry>| -> Vec<&'static str> {
            entries.iter().map(DlqEntry::status).collect()
        };
        let want = ["superseded", "pending", "deleted", "replayed"];
        assert_eq!(statuses(dlq.list().unwrap()), want);
        let waiting = PageQuery {
            after: 0,
            limit: 10,
            pending_only: true,
        };
        let ids: Vec<u64> = dlq
            .page(&waiting)
            .unwrap()
            .entries
            .iter()
            .map(|e| e.id)
            .collect();
        assert_eq!(ids, [2]);
        drop(dlq);
        assert_eq!(statuses(FileDlq::read(&path).unwrap()), want);
        let dlq = FileDlq::open(&path).unwrap();
        assert_eq!(statuses(dlq.list().unwrap()), want);
        assert!(dlq.pending("a", "v1").is_none() && dlq.pending("b", "v1").is_none());
        assert!(dlq.pending("a", "v2").is_some());
    }

    /// An entry with no version (a deletion that failed every attempt, a
    /// bus message that named none) is settled by its document's next
    /// version or deletion, as one with a version is, and so after a
    /// reopen. A full scan looks at its document (not at "": a message
    /// with no key names none).
    #[test]
    fn an_entry_with_no_version_is_settled_by_its_documents_next_job() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let dlq = FileDlq::open(&path).unwrap();
        let unversioned = |doc: &str| DlqEntry {
            stage: "indexer".into(),
            version: None,
            ..entry(doc)
        };
        for doc in ["a", "b", "c", ""] {
            dlq.push(unversioned(doc)).unwrap();
        }
        assert_eq!(dlq.waiting_docs(), ["a", "b", "c"]);
        // (Reopened: the index is rebuilt from the log.)
        drop(dlq);
        let dlq = FileDlq::open(&path).unwrap();
        assert_eq!(
            dlq.settle("a", Some("v2"), Settled::Superseded).unwrap(),
            [1]
        );
        assert_eq!(dlq.settle("b", None, Settled::Deleted).unwrap(), [2]);
        assert!(dlq.settle("b", None, Settled::Deleted).unwrap().is_empty());
        dlq.mark_replayed(3).unwrap();
        assert!(dlq.settle("c", None, Settled::Deleted).unwrap().is_empty());
        let statuses: Vec<&str> = dlq.list().unwrap().iter().map(DlqEntry::status).collect();
        assert_eq!(statuses, ["superseded", "deleted", "replayed", "pending"]);
    }

    #[test]
    fn pages_go_in_id_order_from_after_and_say_whether_more_follow() {
        let dir = tempfile::tempdir().unwrap();
        let dlq = FileDlq::open(dir.path().join("dlq.jsonl")).unwrap();
        for doc in ["a", "b", "c", "d", "e"] {
            dlq.push(entry(doc)).unwrap();
        }
        dlq.mark_replayed(2).unwrap();
        dlq.mark_replayed(4).unwrap();
        let page = |after, limit, pending_only| {
            let q = PageQuery {
                after,
                limit,
                pending_only,
            };
            let p = dlq.page(&q).unwrap();
            let ids: Vec<u64> = p.entries.iter().map(|e| e.id).collect();
            (ids, p.more)
        };
        assert_eq!(page(0, 2, false), (vec![1, 2], true));
        assert_eq!(page(2, 2, false), (vec![3, 4], true));
        assert_eq!(page(4, 2, false), (vec![5], false));
        assert_eq!(page(0, 10, false), (vec![1, 2, 3, 4, 5], false));
        assert_eq!(page(5, 10, false), (vec![], false));
        // Only those waiting for a replay: the replayed ones are skipped,
        // not counted against the limit.
        assert_eq!(page(0, 2, true), (vec![1, 3], true));
        assert_eq!(page(3, 2, true), (vec![5], false));
        // The trait's default (a backend without an index) pages alike.
        struct Listed(Vec<DlqEntry>);
        impl DeadLetters for Listed {
            fn push(&self, _: DlqEntry) -> anyhow::Result<u64> {
                unreachable!()
            }
            fn list(&self) -> anyhow::Result<Vec<DlqEntry>> {
                Ok(self.0.clone())
            }
            fn mark_replayed(&self, _: u64) -> anyhow::Result<DlqEntry> {
                unreachable!()
            }
            fn pending(&self, _: &str, _: &str) -> Option<DlqEntry> {
                None
            }
            fn settle(&self, _: &str, _: Option<&str>, _: Settled) -> anyhow::Result<Vec<u64>> {
                unreachable!()
            }
        }
        let listed = Listed(dlq.list().unwrap());
        let q = PageQuery {
            after: 1,
            limit: 2,
            pending_only: true,
        };
        let p = listed.page(&q).unwrap();
        let ids: Vec<u64> = p.entries.iter().map(|e| e.id).collect();
        assert_eq!((ids, p.more), (vec![3, 5], false));
    }

    #[test]
    fn a_long_payload_is_held_as_a_preview_and_logged_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let dlq = FileDlq::open(&path).unwrap();
        // Multi-byte characters, so a cut at a byte count lands inside one.
        let long = "é".repeat(40 << 10);
        let raw = DlqEntry {
            payload: serde_json::Value::String(long.clone()),
            ..entry("a")
        };
        let id = dlq.push(raw).unwrap();
        let short = dlq.push(entry("b")).unwrap();
        let held = dlq.get(id).unwrap().unwrap();
        let preview = held.payload.as_str().unwrap();
        assert!(preview.len() < PAYLOAD_IN_MEMORY + 200, "{}", preview.len());
        assert!(long.starts_with(preview.split('…').next().unwrap()));
        assert!(preview.contains(&format!("{} bytes in all", long.len())));
        assert!(preview.contains(&path.display().to_string()), "{preview}");
        // Small payloads are held as they are, and the log keeps the whole.
        assert_eq!(dlq.get(short).unwrap().unwrap().payload, entry("b").payload);
        let logged = FileDlq::read(&path).unwrap();
        assert_eq!(logged[0].payload.as_str(), Some(long.as_str()));
        // Reopened, the preview again, and ids go on after the last.
        drop(dlq);
        let dlq = FileDlq::open(&path).unwrap();
        assert_eq!(dlq.get(id).unwrap().unwrap().payload, held.payload);
        assert_eq!(dlq.push(entry("c")).unwrap(), 3);
    }

    #[test]
    fn entries_survive_reopen_and_replay_is_recorded_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let dlq = FileDlq::open(&path).unwrap();
        assert_eq!(dlq.push(entry("a")).unwrap(), 1);
        assert_eq!(dlq.push(entry("b")).unwrap(), 2);
        drop(dlq);
        // A torn line from a crash must not hide the entries before it.
        append_raw(&path, b"{\"record\":\"entr");
        let dlq = FileDlq::open(&path).unwrap();
        assert_eq!(dlq.list().unwrap().len(), 2);
        assert_eq!(dlq.mark_replayed(2).unwrap().doc_id, "b");
        assert!(dlq.mark_replayed(2).unwrap_err().is::<AlreadyReplayed>());
        assert!(dlq.mark_replayed(9).is_err());
        let listed = FileDlq::read(&path).unwrap();
        assert_eq!(
            listed.iter().map(|e| e.replayed).collect::<Vec<_>>(),
            vec![false, true]
        );
    }

    /// A record torn inside a multi-byte character (a file named
    /// `Résumé.pdf`, cut off by a crash or a full disk) is not UTF-8: it is
    /// skipped like any torn line, and the node still starts.
    #[test]
    fn a_record_torn_inside_a_character_does_not_stop_the_log_opening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let dlq = FileDlq::open(&path).unwrap();
        dlq.push(entry("kb:Résumé.pdf")).unwrap();
        drop(dlq);
        let record = serde_json::to_vec(&Record::Entry(entry("kb:é"))).unwrap();
        let cut = record.windows(2).position(|w| w == "é".as_bytes()).unwrap() + 1;
        assert!(std::str::from_utf8(&record[..cut]).is_err());
        append_raw(&path, &record[..cut]);
        let dlq = FileDlq::open(&path).unwrap();
        let docs: Vec<_> = dlq.list().unwrap().into_iter().map(|e| e.doc_id).collect();
        assert_eq!(docs, ["kb:Résumé.pdf"]);
        assert_eq!(FileDlq::read(&path).unwrap().len(), 1);
    }

    /// Part of a record left behind while the log is open (a write cut
    /// short) must not swallow the next record: it would be acked as
    /// dead-lettered and then gone after a restart.
    #[test]
    fn a_record_after_a_torn_write_is_on_a_line_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dlq.jsonl");
        let dlq = FileDlq::open(&path).unwrap();
        dlq.push(entry("a")).unwrap();
        append_raw(&path, b"{\"record\":\"entr");
        assert_eq!(dlq.push(entry("b")).unwrap(), 2);
        assert_eq!(dlq.mark_replayed(2).unwrap().doc_id, "b");
        drop(dlq);
        let listed = FileDlq::read(&path).unwrap();
        let docs: Vec<_> = listed
            .iter()
            .map(|e| (e.doc_id.as_str(), e.replayed))
            .collect();
        assert_eq!(docs, [("a", false), ("b", true)]);
    }
}
