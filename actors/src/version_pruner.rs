//! The VersionPruner: once a version is durable, its document's other
//! versions go (and every chunk of a deleted document), and cached answers
//! citing them are invalidated (or, with the cache down, owed: see
//! [`CacheHandle::invalidate_all`]).
//!
//! The new version is written before the old ones are deleted, so a query
//! always finds the document; after the prune, no old text is returned.

use crate::cache_guard::CacheHandle;
use crate::embedder::deleted::DeletedVectors;
use crate::indexer::{Removal, VectorStore};
use crate::ledger::Ledger;
use crate::messages::IndexedEvent;
use crate::pool::{Job, JobErrors, Stage};
use std::sync::Arc;

pub struct VersionPrunerStage {
    pub store: Arc<dyn VectorStore>,
    pub ledger: Arc<Ledger>,
    pub cache: CacheHandle,
    /// Where the texts of a document removed whole are kept for this
    /// node's embedder, should the file come back (see
    /// [`crate::embedder::deleted`]); `None` on a node that does not embed.
    pub deleted: Option<Arc<DeletedVectors>>,
}

/// The most events the pruner takes at once: one store call (a scroll,
/// paged, and at most one delete) prunes them all (and, on a node that
/// embeds, one read keeps what goes whole).
pub const PRUNE_BATCH: usize = 64;

impl Stage for VersionPrunerStage {
    type In = IndexedEvent;

    async fn process(&self, event: IndexedEvent) -> anyhow::Result<()> {
        self.prune(vec![event]).await
    }

    fn max_batch(&self) -> usize {
        PRUNE_BATCH
    }

    async fn process_batch(&self, events: Vec<IndexedEvent>) -> anyhow::Result<JobErrors> {
        self.prune(events).await.map(|()| vec![])
    }
}

impl VersionPrunerStage {
    /// Prunes after `events` (at most [`PRUNE_BATCH`] make one store call)
    /// and ends their versions in the ledger.
    pub async fn prune(&self, events: Vec<IndexedEvent>) -> anyhow::Result<()> {
        let mut removals = Vec::new();
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            match &event {
                IndexedEvent::Indexed {
                    doc_id,
                    version,
                    seq,
                } => {
                    // Only versions seen before it go, so it never prunes
                    // a successor, even one written between a check here
                    // and the removal. One overtaken while its event
                    // waited (saved again meanwhile) still prunes what it
                    // replaced: else that older text stayed searchable
                    // beside it until the successor was indexed, and for
                    // good if the successor went to the DLQ. Without a seq
                    // (an event from an older node) nothing orders them:
                    // only the current version prunes.
                    if *seq > 0 || self.ledger.is_current(doc_id, version) {
                        removals.push(Removal::new(doc_id, Some(version)).seen_before(*seq));
                    }
                }
                // Nothing was written: nothing to prune.
                IndexedEvent::Superseded { .. } | IndexedEvent::Skipped { .. } => {}
                IndexedEvent::Deleted { doc_id, seq } => {
                    // Re-created since? Then its new version is on its way
                    // and will prune; deleting now would open a gap. (And
                    // one re-created and written after this check was seen
                    // after the deletion, so the seq guard spares it.) A
                    // file grown past the size limit is deleted, then
                    // recorded as skipped: nothing of it stays either.
                    if self.ledger.wants_nothing_indexed(doc_id) {
                        removals.push(Removal::new(doc_id, None).seen_before(*seq));
                    }
                }
            }
            outcomes.push(event);
        }
        self.remove(&removals).await?;
        // After the removals: a version ends once what it replaced is gone.
        for event in outcomes {
            self.ledger
                .finish(event.doc_id(), event.version(), event.outcome());
        }
        Ok(())
    }

    /// Removes from the store and the cache.
    pub async fn remove(&self, removals: &[Removal]) -> anyhow::Result<()> {
        if removals.is_empty() {
            return Ok(());
        }
        // The cache first, so that its tombstones keep an answer computed
        // from the old version meanwhile from being cached. It never fails
        // the prune: what it cannot take now is owed, and a cached answer
        // citing removed text is not served (its sources are checked
        // against the store on every hit).
        self.cache.invalidate_all(removals).await;
        // What goes whole is kept for the embedder, in one read.
        if let Some(deleted) = &self.deleted {
            let whole: Vec<String> = (removals.iter())
                .filter(|r| r.keep.is_none())
                .map(|r| r.doc_id.clone())
                .collect();
            let limit = crate::embedder::deleted::PER_BATCH;
            match self.store.keyed_texts_of(&whole, limit).await {
                Ok(texts) => deleted.keep(texts),
                // Only a saving lost: the removal goes on.
                Err(e) => tracing::debug!(docs = whole.len(), "not kept for reuse: {e:#}"),
            }
        }
        let removed = self.store.remove(removals).await?;
        for (r, versions) in removals.iter().zip(&removed) {
            if !versions.is_empty() {
                tracing::debug!(doc = %r.doc_id, ?versions, "pruned old versions");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cache_guard::embedded::EmbeddedCache;
    use crate::cache_guard::{AsOf, CachedAnswer, Probe};
    use crate::indexer::actor::tests::{embedded, versions};
    use crate::indexer::edge::EdgeStore;
    use std::time::Duration;

    /// A handle on an embedded cache, with no CacheGuard actor.
    pub(crate) fn no_cache() -> CacheHandle {
        let cache = EmbeddedCache::new(0.98, 10, Duration::from_secs(60));
        CacheHandle::new("no-cache-actor", Arc::new(cache))
    }

    pub(crate) fn pruner(store: &Arc<dyn VectorStore>, ledger: Arc<Ledger>) -> VersionPrunerStage {
        let cache: Arc<dyn crate::cache_guard::SemanticCache> =
            Arc::new(EmbeddedCache::new(0.98, 10, Duration::from_secs(60)));
        pruner_with(store, ledger, cache)
    }

    fn pruner_with(
        store: &Arc<dyn VectorStore>,
        ledger: Arc<Ledger>,
        cache: Arc<dyn crate::cache_guard::SemanticCache>,
    ) -> VersionPrunerStage {
        VersionPrunerStage {
            store: store.clone(),
            ledger,
            cache: CacheHandle::new("no-cache-actor", cache),
            deleted: None,
        }
    }

    /// The embedded cache, unable to invalidate or to take a write's
    /// generations (Redis unreachable) while `down`; it records the first
    /// document of every invalidation asked of it. Injects the fault.
    pub(crate) struct Unreachable {
        pub(crate) inner: EmbeddedCache,
        pub(crate) down: std::sync::atomic::AtomicBool,
        asked: parking_lot::Mutex<Vec<String>>,
    }

    impl Unreachable {
        pub(crate) fn new(down: bool) -> Unreachable {
            Unreachable {
                inner: EmbeddedCache::new(0.98, 10, Duration::from_secs(60)),
                down: down.into(),
                asked: Default::default(),
            }
        }
    }

    #[async_trait::async_trait]
    impl crate::cache_guard::SemanticCache for Unreachable {
        fn backend(&self) -> &'static str {
            "unreachable"
        }
        async fn probe(
            &self,
            v: &[f32],
            scope: &crate::indexer::Scope,
            top_k: usize,
        ) -> anyhow::Result<Probe> {
            self.inner.probe(v, scope, top_k).await
        }
        async fn as_of(&self, scope: &crate::indexer::Scope) -> anyhow::Result<AsOf> {
            self.inner.as_of(scope).await
        }
        async fn store(
            &self,
            v: &[f32],
            scope: &crate::indexer::Scope,
            top_k: usize,
            value: CachedAnswer,
            as_of: &AsOf,
        ) -> anyhow::Result<()> {
            self.inner.store(v, scope, top_k, value, as_of).await
        }
        async fn indexed(&self, partitions: &[crate::messages::Partition]) -> anyhow::Result<()> {
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                anyhow::bail!("connection refused");
            }
            self.inner.indexed(partitions).await
        }
        async fn invalidate(&self, doc_id: &str, keep: Option<&str>) -> anyhow::Result<usize> {
            self.invalidate_all(&[crate::indexer::Removal::new(doc_id, keep)])
                .await
        }
        async fn invalidate_all(
            &self,
            removals: &[crate::indexer::Removal],
        ) -> anyhow::Result<usize> {
            self.asked.lock().push(removals[0].doc_id.clone());
            if self.down.load(std::sync::atomic::Ordering::SeqCst) {
                anyhow::bail!("connection refused");
            }
            self.inner.invalidate_all(removals).await
        }
        async fn drop_citing(&self, cited: &[(String, String)]) -> anyhow::Result<usize> {
            self.inner.drop_citing(cited).await
        }
    }

    /// With the cache down, prunes go on: the old version leaves the
    /// store and the new one is reported done at once. The answer cached
    /// from the old version stays in the cache, but the CacheGuard does
    /// not serve it (its source is no longer stored). The invalidation is
    /// owed; a later prune queues behind it without a call of its own;
    /// once the cache is back, the owed ones are sent and the entry goes.
    /// One whose invalidation was lost altogether is dropped when a lookup
    /// finds it stale.
    #[tokio::test]
    async fn with_the_cache_down_pruning_goes_on_and_no_removed_text_is_served() {
        use crate::cache_guard::{CacheGuard, CacheGuardArgs, SemanticCache};
        use crate::indexer::Scope;
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        for (v, seq) in [("v1", 1_000), ("v2", 2_000)] {
            let d = embedded(v, seq);
            store.upsert(&d.meta, &d.chunks, &d.vectors).await.unwrap();
        }
        let scope = Scope {
            divisions: vec!["hr".into()],
            access_levels: vec!["public".into()],
        };
        let q = [1.0, 0.0, 0.0, 0.0];
        // An answer computed from v1, as the query path would cache it.
        let mut sources = store.search(&q, &scope, 10).await.unwrap();
        sources.retain(|h| h.version == "v1");
        assert_eq!(sources.len(), 1);
        let answer = CachedAnswer {
            answer: Some("from v1".into()),
            sources,
        };
        let cache = Arc::new(Unreachable::new(true));
        cache
            .store(&q, &scope, 5, answer.clone(), &AsOf::default())
            .await
            .unwrap();
        let name = format!("cache-guard-{}", std::process::id());
        let (guard, _h) = ractor::Actor::spawn(
            Some(name.clone()),
            CacheGuard,
            CacheGuardArgs {
                cache: cache.clone(),
                store: store.clone(),
                stats: Default::default(),
            },
        )
        .await
        .unwrap();
        let handle = CacheHandle::new(name, cache.clone());
        assert_eq!(
            handle.lookup(&q, &scope, 5).await,
            Some(answer.clone()),
            "served while v1 is stored"
        );

        let doc = "kb:hr/leave.md";
        let ledger = Ledger::new(8);
        assert!(ledger.admit(doc, Some("v2")).await);
        let pruner = VersionPrunerStage {
            store: store.clone(),
            ledger: ledger.clone(),
            cache: handle.clone(),
            deleted: None,
        };
        pruner
            .process(IndexedEvent::Indexed {
                doc_id: doc.into(),
                version: "v2".into(),
                seq: 2_000,
            })
            .await
            .unwrap();
        assert_eq!(versions(&store).await, ["v2"]);
        assert_eq!(ledger.status(doc), Some(crate::ledger::DocStatus::Indexed));
        assert_eq!(handle.owed(), 1);
        assert_eq!(
            cache.lookup(&q, &scope, 5).await.unwrap(),
            Some(answer),
            "still in the cache"
        );
        assert_eq!(handle.lookup(&q, &scope, 5).await, None, "but not served");

        // Another document's deletion, while one is owed: queued, no call.
        let other = "kb:hr/other.md";
        assert!(ledger.admit(other, None).await);
        pruner
            .process(IndexedEvent::Deleted {
                doc_id: other.into(),
                seq: 3_000,
            })
            .await
            .unwrap();
        assert_eq!(
            ledger.status(other),
            Some(crate::ledger::DocStatus::Deleted)
        );
        assert!(
            !cache.asked.lock().iter().any(|d| d == other),
            "{:?}",
            cache.asked.lock()
        );

        cache.down.store(false, SeqCst);
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while handle.owed() > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the owed invalidations were never sent"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            cache.lookup(&q, &scope, 5).await.unwrap(),
            None,
            "invalidated once back"
        );
        // Both were sent, the oldest first.
        let asked = cache.asked.lock().clone();
        assert_eq!(asked[asked.len() - 2..], [doc, other], "{asked:?}");

        // An entry whose invalidation was lost (v2 removed behind the
        // cache's back): not served, and dropped from the cache.
        let fresh = CachedAnswer {
            answer: Some("from v2".into()),
            sources: store.search(&q, &scope, 10).await.unwrap(),
        };
        cache
            .store(&q, &scope, 5, fresh.clone(), &AsOf::default())
            .await
            .unwrap();
        assert_eq!(handle.lookup(&q, &scope, 5).await, Some(fresh));
        let lost = crate::indexer::Removal::new(doc, None);
        store.remove(std::slice::from_ref(&lost)).await.unwrap();
        assert_eq!(handle.lookup(&q, &scope, 5).await, None);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.lookup(&q, &scope, 5).await.unwrap().is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "the stale entry stayed in the cache"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        guard.stop(None);
    }

    /// A file deleted and re-created at once: the ledger still says
    /// "deleted" when the pruner checks, and the new version is written
    /// before the deletion's removal reaches the store. It was seen after
    /// the deletion, so it stays.
    #[tokio::test]
    async fn a_late_deletion_spares_a_version_seen_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        for (v, seq) in [("v1", 1_000), ("v2", 3_000)] {
            let d = embedded(v, seq);
            store.upsert(&d.meta, &d.chunks, &d.vectors).await.unwrap();
        }
        let pruner = pruner(&store, Ledger::new(8));
        let deleted = |seq| IndexedEvent::Deleted {
            doc_id: "kb:hr/leave.md".into(),
            seq,
        };
        pruner.process(deleted(2_000)).await.unwrap();
        assert_eq!(versions(&store).await, ["v2"], "v1 deleted, v2 kept");
        // From an older node, with no seq: every version goes.
        pruner.process(deleted(0)).await.unwrap();
        assert!(versions(&store).await.is_empty());
    }

    /// A document deleted whole leaves its texts and vectors with the
    /// pruner's `deleted`, for this node's embedder should the file come
    /// back; a prune of old versions keeps nothing (the current version
    /// holds what did not change).
    #[tokio::test]
    async fn a_document_deleted_whole_leaves_its_vectors_for_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        let keyed = |version: &str, seq, key| crate::messages::EmbeddedDoc {
            keys: vec![key],
            ..embedded(version, seq)
        };
        store
            .upsert_docs(&[keyed("v1", 1_000, 11), keyed("v2", 2_000, 12)])
            .await
            .unwrap();
        let (doc, ledger) = ("kb:hr/leave.md", Ledger::new(8));
        ledger.observe(doc, Some("v2"), 2_000);
        let deleted = Arc::new(DeletedVectors::new(1 << 20));
        let pruner = VersionPrunerStage {
            deleted: Some(deleted.clone()),
            ..pruner(&store, ledger.clone())
        };
        pruner
            .process(IndexedEvent::Indexed {
                doc_id: doc.into(),
                version: "v2".into(),
                seq: 2_000,
            })
            .await
            .unwrap();
        assert_eq!(versions(&store).await, ["v2"]);
        assert_eq!(deleted.bytes(), 0, "a prune keeps nothing");
        ledger.observe(doc, None, 3_000);
        pruner
            .process(IndexedEvent::Deleted {
                doc_id: doc.into(),
                seq: 3_000,
            })
            .await
            .unwrap();
        assert!(versions(&store).await.is_empty());
        let found = deleted.find(&[(12, "leave policy v2"), (11, "leave policy v1")]);
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            [(12, vec![1.0, 0.0, 0.0, 0.0])]
        );
    }

    /// A version overtaken while its event waited (the file saved again
    /// before the pruner took it) still prunes what it replaced, and no
    /// version seen after it: not its successor, nor an older text seen
    /// again (a revert), which is written again with its new seq.
    #[tokio::test]
    async fn an_overtaken_version_still_prunes_what_it_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        let write = |v: &'static str, seq| {
            let store = store.clone();
            async move {
                let d = embedded(v, seq);
                store.upsert(&d.meta, &d.chunks, &d.vectors).await.unwrap();
            }
        };
        let doc = "kb:hr/leave.md";
        let indexed = |version: &str, seq| IndexedEvent::Indexed {
            doc_id: doc.into(),
            version: version.into(),
            seq,
        };
        write("v1", 1_000).await;
        write("v2", 2_000).await;
        let ledger = Ledger::new(8);
        ledger.observe(doc, Some("v3"), 3_000);
        let pruner = pruner(&store, ledger.clone());
        pruner.process(indexed("v2", 2_000)).await.unwrap();
        assert_eq!(versions(&store).await, ["v2"], "v1 stayed beside v2");
        write("v3", 3_000).await;
        pruner.process(indexed("v3", 3_000)).await.unwrap();
        assert_eq!(versions(&store).await, ["v3"]);
        // Reverted to v2's text (seen again at 5 000) while v4's event
        // waited: v4 prunes v3, and v2, written again, stays.
        write("v4", 4_000).await;
        ledger.observe(doc, Some("v2"), 5_000);
        write("v2", 5_000).await;
        pruner.process(indexed("v4", 4_000)).await.unwrap();
        assert_eq!(versions(&store).await, ["v2", "v4"]);
        pruner.process(indexed("v2", 5_000)).await.unwrap();
        assert_eq!(versions(&store).await, ["v2"]);
    }

    /// The race the seq guard closes: v2 is current when the pruner checks,
    /// and v3, seen since, is written before v2's prune reaches the store.
    /// Pruning "every version but v2" would delete v3, and v3's own prune
    /// then v2: the document would vanish from the index.
    #[tokio::test]
    async fn a_late_prune_never_removes_a_version_seen_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        for (v, seq) in [("v1", 1_000), ("v2", 2_000), ("v3", 3_000)] {
            let d = embedded(v, seq);
            store.upsert(&d.meta, &d.chunks, &d.vectors).await.unwrap();
        }
        // This node's ledger has seen v2 only (v3 came through another
        // ingest path, or just after the check).
        let ledger = Ledger::new(8);
        ledger.observe("kb:hr/leave.md", Some("v2"), 2_000);
        let pruner = pruner(&store, ledger);
        let indexed = |version: &str, seq| IndexedEvent::Indexed {
            doc_id: "kb:hr/leave.md".into(),
            version: version.into(),
            seq,
        };
        pruner.process(indexed("v2", 2_000)).await.unwrap();
        assert_eq!(versions(&store).await, ["v2", "v3"], "v1 pruned, v3 kept");
        // An event from an older node carries no seq: the old rule, every
        // other version.
        pruner.process(indexed("v2", 0)).await.unwrap();
        assert_eq!(versions(&store).await, ["v2"]);
    }
}
