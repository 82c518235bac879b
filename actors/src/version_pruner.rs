//! The VersionPruner: once a version is durable, its document's other
//! versions go (and every chunk of a deleted document), and cached answers
//! citing them are invalidated.
//!
//! The new version is written before the old ones are deleted, so a query
//! always finds the document; after the prune, no old text is returned.

use crate::cache_guard::CacheHandle;
use crate::indexer::{Removal, VectorStore};
use crate::ledger::Ledger;
use crate::messages::IndexedEvent;
use crate::pool::{Job, JobErrors, Stage};
use std::sync::Arc;

pub struct VersionPrunerStage {
    pub store: Arc<dyn VectorStore>,
    pub ledger: Arc<Ledger>,
    pub cache: CacheHandle,
    /// How long one prune tries to invalidate the cache before it fails
    /// ([`INVALIDATION_BUDGET`]).
    pub invalidation_budget: std::time::Duration,
}

/// See [`VersionPrunerStage::invalidation_budget`]: a Redis failover or a
/// network blip passes within it; a longer outage fails the job, which the
/// pool retries and, after its attempts, dead-letters (replayable).
pub const INVALIDATION_BUDGET: std::time::Duration = std::time::Duration::from_secs(60);

/// The most events the pruner takes at once: one store call (a scroll,
/// paged, and at most one delete) prunes them all.
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
    async fn prune(&self, events: Vec<IndexedEvent>) -> anyhow::Result<()> {
        let mut removals = Vec::new();
        let mut outcomes = Vec::with_capacity(events.len());
        for event in events {
            match &event {
                IndexedEvent::Indexed {
                    doc_id,
                    version,
                    seq,
                } => {
                    // An overtaken version must not prune its successor:
                    // not when it is known to be overtaken here, and not
                    // when its successor is written between this check and
                    // the removal (only versions seen before it go).
                    if self.ledger.is_current(doc_id, version) {
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
        if !removals.is_empty() {
            // The cache first: a prune that fails (or dies) here is done
            // again whole, whereas one that removed first and then failed
            // would find nothing to remove next time and never tell the
            // cache. The invalidation's tombstones keep an answer computed
            // from the old version meanwhile from being cached.
            self.cache
                .invalidate_all(&removals, self.invalidation_budget)
                .await?;
            let removed = self.store.remove(&removals).await?;
            for (r, versions) in removals.iter().zip(&removed) {
                if !versions.is_empty() {
                    tracing::debug!(doc = %r.doc_id, ?versions, "pruned old versions");
                }
            }
        }
        // After the removals: a version ends once what it replaced is gone.
        for event in outcomes {
            self.ledger
                .finish(event.doc_id(), event.version(), event.outcome());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_guard::embedded::EmbeddedCache;
    use crate::cache_guard::CachedAnswer;
    use crate::indexer::actor::tests::{embedded, versions};
    use crate::indexer::edge::EdgeStore;
    use std::time::Duration;

    fn pruner(store: &Arc<dyn VectorStore>, ledger: Arc<Ledger>) -> VersionPrunerStage {
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
            cache: CacheHandle {
                actor_name: "no-cache-actor".into(),
                cache,
            },
            invalidation_budget: Duration::from_millis(500),
        }
    }

    /// A cache that cannot invalidate (Redis unreachable) for its first
    /// `failures` calls; otherwise the embedded cache. Injects the fault.
    struct Unreachable {
        inner: EmbeddedCache,
        failures: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl crate::cache_guard::SemanticCache for Unreachable {
        fn backend(&self) -> &'static str {
            "unreachable"
        }
        async fn lookup(
            &self,
            v: &[f32],
            scope: &crate::indexer::Scope,
            top_k: usize,
        ) -> anyhow::Result<Option<CachedAnswer>> {
            self.inner.lookup(v, scope, top_k).await
        }
        async fn store(
            &self,
            v: &[f32],
            scope: &crate::indexer::Scope,
            top_k: usize,
            value: CachedAnswer,
        ) -> anyhow::Result<()> {
            self.inner.store(v, scope, top_k, value).await
        }
        async fn invalidate(&self, doc_id: &str, keep: Option<&str>) -> anyhow::Result<usize> {
            use std::sync::atomic::Ordering::SeqCst;
            let left = self.failures.load(SeqCst);
            if left > 0 {
                self.failures.store(left - 1, SeqCst);
                anyhow::bail!("connection refused");
            }
            self.inner.invalidate(doc_id, keep).await
        }
    }

    /// The cache cannot be told: the prune tries again within its budget,
    /// and past it fails (to be retried by the pool) having removed
    /// nothing and without reporting the version done; the retry drops
    /// the cached answer citing the old version, then the version.
    #[tokio::test]
    async fn a_failed_invalidation_fails_the_prune_until_it_succeeds() {
        use crate::cache_guard::SemanticCache;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        for (v, seq) in [("v1", 1_000), ("v2", 2_000)] {
            let d = embedded(v, seq);
            store.upsert(&d.meta, &d.chunks, &d.vectors).await.unwrap();
        }
        let cache = Arc::new(Unreachable {
            inner: EmbeddedCache::new(0.98, 10, Duration::from_secs(60)),
            // The budget (500 ms) holds three tries, at 0, 100 and 300 ms:
            // the first prune fails, and its retry gets through at its
            // second try.
            failures: 4.into(),
        });
        let doc = "kb:hr/leave.md";
        let cited = crate::cache_guard::test_support::hit(doc, "v1", "hr");
        let answer = CachedAnswer {
            answer: Some("from v1".into()),
            sources: vec![cited],
        };
        let scope = crate::cache_guard::test_support::scope(&["hr"]);
        let q = [1.0, 0.0, 0.0, 0.0];
        cache.store(&q, &scope, 5, answer).await.unwrap();

        let ledger = Ledger::new(8);
        assert!(ledger.admit(doc, Some("v2")).await);
        let pruner = pruner_with(&store, ledger.clone(), cache.clone());
        let event = IndexedEvent::Indexed {
            doc_id: doc.into(),
            version: "v2".into(),
            seq: 2_000,
        };
        let err = pruner.process(event.clone()).await.unwrap_err();
        assert!(format!("{err:#}").contains("connection refused"), "{err:#}");
        assert_eq!(
            versions(&store).await,
            ["v1", "v2"],
            "nothing removed before the cache is told"
        );
        assert_eq!(ledger.status(doc), Some(crate::ledger::DocStatus::InFlight));
        assert!(cache.lookup(&q, &scope, 5).await.unwrap().is_some());

        pruner.process(event).await.unwrap();
        assert_eq!(versions(&store).await, ["v2"]);
        assert_eq!(cache.lookup(&q, &scope, 5).await.unwrap(), None);
        assert_eq!(ledger.status(doc), Some(crate::ledger::DocStatus::Indexed));
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
