//! The dead-letter queue: where a document goes after its attempts are spent,
//! with the stage, the error and the original payload, so an operator can
//! look at it, fix the cause and replay it.
//!
//! Embedded backend: an append-only JSON-lines log. Replaying appends a
//! `replayed` record instead of rewriting the file, so a crash mid-write can
//! lose at most the line being written, never earlier entries.

use anyhow::Context;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
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
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub(crate) enum Record {
    Entry(DlqEntry),
    Replayed { id: u64 },
}

pub trait DeadLetters: Send + Sync {
    /// Stores the entry (its `id` is assigned here) and returns the id.
    fn push(&self, entry: DlqEntry) -> anyhow::Result<u64>;
    fn list(&self) -> anyhow::Result<Vec<DlqEntry>>;
    /// Marks entry `id` replayed and returns it; of two calls for one
    /// entry, one fails with [`AlreadyReplayed`].
    fn mark_replayed(&self, id: u64) -> anyhow::Result<DlqEntry>;
    /// The entry holding `version` of `doc_id`, unless it was replayed. The
    /// watcher asks this for every document it sees, so backends answer
    /// from memory without copying the whole queue.
    fn pending(&self, doc_id: &str, version: &str) -> Option<DlqEntry>;
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

/// Whether `e` holds `version` of `doc_id` and still waits for a replay.
pub fn is_pending(e: &DlqEntry, doc_id: &str, version: &str) -> bool {
    !e.replayed && e.doc_id == doc_id && e.version.as_deref() == Some(version)
}

/// The log plus its entries in memory: the watcher asks "is this version
/// dead-lettered?" for every document it sees, which must not re-read the
/// file each time. The file stays the source of truth across restarts.
pub struct FileDlq {
    path: PathBuf,
    log: Mutex<(File, Vec<DlqEntry>)>,
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
        let entries = Self::read(&path)?;
        Ok(FileDlq {
            path,
            log: Mutex::new((file, entries)),
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
        for line in BufReader::new(file).lines() {
            let line = line?;
            // A torn last line from a crash is ignored, not fatal.
            match serde_json::from_str::<Record>(&line) {
                Ok(Record::Entry(e)) => entries.push(e),
                Ok(Record::Replayed { id }) => {
                    if let Some(e) = entries.iter_mut().find(|e| e.id == id) {
                        e.replayed = true;
                    }
                }
                Err(_) => continue,
            }
        }
        Ok(entries)
    }

    fn append(&self, file: &mut File, record: &Record) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(record)?;
        line.push(b'\n');
        file.write_all(&line)?;
        file.sync_data()
            .with_context(|| format!("syncing {}", self.path.display()))?;
        Ok(())
    }
}

impl DeadLetters for FileDlq {
    fn push(&self, mut entry: DlqEntry) -> anyhow::Result<u64> {
        let mut log = self.log.lock();
        let (file, entries) = &mut *log;
        entry.id = entries.iter().map(|e| e.id).max().unwrap_or(0) + 1;
        entry.replayed = false;
        self.append(file, &Record::Entry(entry.clone()))?;
        let id = entry.id;
        entries.push(entry);
        Ok(id)
    }

    fn list(&self) -> anyhow::Result<Vec<DlqEntry>> {
        Ok(self.log.lock().1.clone())
    }

    fn pending(&self, doc_id: &str, version: &str) -> Option<DlqEntry> {
        let log = self.log.lock();
        log.1
            .iter()
            .find(|e| is_pending(e, doc_id, version))
            .cloned()
    }

    fn mark_replayed(&self, id: u64) -> anyhow::Result<DlqEntry> {
        let mut log = self.log.lock();
        let (file, entries) = &mut *log;
        let entry = entries
            .iter_mut()
            .find(|e| e.id == id)
            .with_context(|| format!("no DLQ entry with id {id}"))?;
        if entry.replayed {
            return Err(AlreadyReplayed(id).into());
        }
        self.append(file, &Record::Replayed { id })?;
        entry.replayed = true;
        Ok(entry.clone())
    }
}

impl DlqEntry {
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
        }
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
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"record\":\"entr")
            .unwrap();
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
}
