//! The ingest ledger: every document the watcher saw, and where it ended.
//!
//! It is also the pipeline's admission control. A document version enters the
//! pipeline only with a permit from a fixed pool, and gives it back when it
//! reaches an end (indexed, deleted, skipped, dead-lettered or superseded). So
//! however large the burst, at most `max_in_flight` documents are queued
//! between the stages, and the watcher waits instead of buffering.

use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum DocStatus {
    InFlight,
    Indexed,
    Deleted,
    Skipped(String),
    DeadLettered(String),
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Indexed,
    Deleted,
    Skipped(String),
    DeadLettered(String),
}

#[derive(Default, Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct LedgerCounts {
    pub seen: u64,
    pub indexed: u64,
    pub deleted: u64,
    pub skipped: u64,
    pub dead_lettered: u64,
    pub in_flight: u64,
}

/// Marker version for a deletion travelling through the pipeline.
pub const DELETE_VERSION: &str = "-";

struct DocEntry {
    /// The newest version the source has; `None` once the file is gone.
    latest: Option<String>,
    status: DocStatus,
    pending: HashMap<String, OwnedSemaphorePermit>,
    /// The watcher's sequence of `latest` (see [`Ledger::observe`]).
    seq: u64,
}

impl DocEntry {
    fn new() -> DocEntry {
        DocEntry {
            latest: None,
            status: DocStatus::InFlight,
            pending: HashMap::new(),
            seq: 0,
        }
    }
}

pub struct Ledger {
    docs: Mutex<HashMap<String, DocEntry>>,
    permits: Arc<Semaphore>,
    settled: Notify,
}

impl Ledger {
    pub fn new(max_in_flight: usize) -> Arc<Self> {
        Arc::new(Ledger {
            docs: Mutex::new(HashMap::new()),
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            settled: Notify::new(),
        })
    }

    /// Records a document already in its final state (found indexed at start,
    /// or skipped before it needed any pipeline work).
    pub fn record(&self, doc_id: &str, version: Option<&str>, outcome: Outcome) {
        let mut docs = self.docs.lock();
        let entry = docs.entry(doc_id.to_string()).or_insert_with(DocEntry::new);
        entry.latest = version.map(str::to_string);
        entry.status = status_of(outcome);
        drop(docs);
        self.settled.notify_waiters();
    }

    /// Waits for a permit, then admits `version` of `doc_id` (or its deletion,
    /// with `None`) into the pipeline. Returns false when that exact version is
    /// already in flight, so a re-scan does not queue it twice.
    pub async fn admit(&self, doc_id: &str, version: Option<&str>) -> bool {
        let key = version.unwrap_or(DELETE_VERSION).to_string();
        if self
            .docs
            .lock()
            .get(doc_id)
            .is_some_and(|e| e.pending.contains_key(&key))
        {
            return false;
        }
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the ledger never closes its semaphore");
        let mut docs = self.docs.lock();
        let entry = docs.entry(doc_id.to_string()).or_insert_with(DocEntry::new);
        if entry.pending.contains_key(&key) {
            return false;
        }
        entry.latest = version.map(str::to_string);
        entry.status = DocStatus::InFlight;
        entry.pending.insert(key, permit);
        true
    }

    /// A cluster's index node has no watcher of its own: it learns each
    /// document's current version from the jobs that reach it, which may
    /// arrive out of order (two embed workers, a redelivery). `seq` is the
    /// watcher's observation order; returns false for a job older than one
    /// already seen, which is then superseded. `None` is a deletion.
    pub fn observe(&self, doc_id: &str, version: Option<&str>, seq: u64) -> bool {
        let mut docs = self.docs.lock();
        let entry = docs.entry(doc_id.to_string()).or_insert_with(DocEntry::new);
        if seq < entry.seq {
            return false;
        }
        entry.seq = seq;
        entry.latest = version.map(str::to_string);
        true
    }

    /// Starts an index node's view from the versions its store holds (see
    /// `StoredVersion::seq`).
    pub fn seed(&self, stored: &[crate::indexer::StoredVersion]) {
        for v in stored {
            self.observe(&v.doc_id, Some(&v.version), v.seq);
        }
    }

    /// Is `version` still the one the source has? A version overtaken by a
    /// newer one (or by a deletion) must not be written to the index.
    pub fn is_current(&self, doc_id: &str, version: &str) -> bool {
        self.docs
            .lock()
            .get(doc_id)
            .is_some_and(|e| e.latest.as_deref() == Some(version))
    }

    pub fn latest_version(&self, doc_id: &str) -> Option<String> {
        self.docs.lock().get(doc_id).and_then(|e| e.latest.clone())
    }

    /// A pipeline job for `version` (None: the deletion) reached its end. If
    /// a newer version is still in flight the document stays in flight; a
    /// superseded version's outcome is not the document's.
    pub fn finish(&self, doc_id: &str, version: Option<&str>, outcome: Outcome) {
        let key = version.unwrap_or(DELETE_VERSION);
        let mut docs = self.docs.lock();
        if let Some(entry) = docs.get_mut(doc_id) {
            entry.pending.remove(key);
            let current = entry.latest.as_deref() == version;
            if current {
                entry.status = status_of(outcome);
            } else if entry.pending.is_empty() && entry.status == DocStatus::InFlight {
                // The version that superseded this one already finished
                // before it (or never needed the pipeline).
                entry.status = match &entry.latest {
                    None => DocStatus::Deleted,
                    Some(_) => status_of(outcome),
                };
            }
        }
        drop(docs);
        self.settled.notify_waiters();
    }

    pub fn status(&self, doc_id: &str) -> Option<DocStatus> {
        self.docs.lock().get(doc_id).map(|e| e.status.clone())
    }

    pub fn known_docs(&self) -> Vec<(String, Option<String>)> {
        self.docs
            .lock()
            .iter()
            .map(|(k, e)| (k.clone(), e.latest.clone()))
            .collect()
    }

    pub fn counts(&self) -> LedgerCounts {
        let docs = self.docs.lock();
        let mut c = LedgerCounts {
            seen: docs.len() as u64,
            ..Default::default()
        };
        for e in docs.values() {
            if !e.pending.is_empty() {
                c.in_flight += 1;
                continue;
            }
            match e.status {
                DocStatus::InFlight => c.in_flight += 1,
                DocStatus::Indexed => c.indexed += 1,
                DocStatus::Deleted => c.deleted += 1,
                DocStatus::Skipped(_) => c.skipped += 1,
                DocStatus::DeadLettered(_) => c.dead_lettered += 1,
            }
        }
        c
    }

    /// Resolves once no document is in flight.
    pub async fn wait_settled(&self) {
        loop {
            let notified = self.settled.notified();
            if self.counts().in_flight == 0 {
                return;
            }
            notified.await;
        }
    }
}

fn status_of(outcome: Outcome) -> DocStatus {
    match outcome {
        Outcome::Indexed => DocStatus::Indexed,
        Outcome::Deleted => DocStatus::Deleted,
        Outcome::Skipped(r) => DocStatus::Skipped(r),
        Outcome::DeadLettered(r) => DocStatus::DeadLettered(r),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn observe_orders_versions_by_the_watchers_sequence() {
        let ledger = Ledger::new(4);
        assert!(ledger.observe("d", Some("v2"), 20));
        // v1 was seen before v2 but arrives after it: superseded.
        assert!(!ledger.observe("d", Some("v1"), 10));
        assert!(ledger.is_current("d", "v2"));
        // A deletion seen later wins; the document has no current version.
        assert!(ledger.observe("d", None, 30));
        assert!(!ledger.is_current("d", "v2"));
        assert_eq!(ledger.latest_version("d"), None);
    }

    #[tokio::test]
    async fn admission_is_bounded_and_released_at_the_end() {
        let ledger = Ledger::new(2);
        assert!(ledger.admit("a", Some("v1")).await);
        assert!(ledger.admit("b", Some("v1")).await);
        // The third waits for a permit.
        let l2 = ledger.clone();
        let third = tokio::spawn(async move { l2.admit("c", Some("v1")).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished());
        ledger.finish("a", Some("v1"), Outcome::Indexed);
        assert!(third.await.unwrap());
        let c = ledger.counts();
        assert_eq!((c.seen, c.indexed, c.in_flight), (3, 1, 2));
    }

    #[tokio::test]
    async fn a_superseded_version_does_not_decide_the_status() {
        let ledger = Ledger::new(8);
        ledger.admit("a", Some("v1")).await;
        ledger.admit("a", Some("v2")).await;
        assert!(!ledger.is_current("a", "v1"));
        ledger.finish("a", Some("v1"), Outcome::Indexed);
        assert_eq!(ledger.counts().in_flight, 1);
        ledger.finish("a", Some("v2"), Outcome::Skipped("empty".into()));
        assert_eq!(ledger.status("a"), Some(DocStatus::Skipped("empty".into())));
        // Deleting while nothing is pending.
        ledger.admit("a", None).await;
        ledger.finish("a", None, Outcome::Deleted);
        assert_eq!(ledger.counts().deleted, 1);
        ledger.wait_settled().await;
    }
}
