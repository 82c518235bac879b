//! The VersionPruner: once a version is durable, its document's other
//! versions go (and every chunk of a deleted document), and cached answers
//! citing them are invalidated.
//!
//! The new version is written before the old ones are deleted, so a query
//! always finds the document; after the prune, no old text is returned.

use crate::cache_guard::CacheHandle;
use crate::indexer::{Removal, VectorStore};
use crate::ledger::{Ledger, Outcome};
use crate::messages::IndexedEvent;
use crate::pool::{JobErrors, Stage};
use std::sync::Arc;

pub struct VersionPrunerStage {
    pub store: Arc<dyn VectorStore>,
    pub ledger: Arc<Ledger>,
    pub cache: CacheHandle,
}

/// The most events the pruner takes at once: one store call (a scroll and
/// at most one delete) prunes them all.
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
            match event {
                IndexedEvent::Indexed { doc_id, version } => {
                    // An overtaken version must not prune its successor.
                    if self.ledger.is_current(&doc_id, &version) {
                        removals.push(Removal {
                            doc_id: doc_id.clone(),
                            keep: Some(version.clone()),
                        });
                    }
                    outcomes.push((doc_id, Some(version), Outcome::Indexed));
                }
                IndexedEvent::Superseded { doc_id, version } => outcomes.push((
                    doc_id,
                    Some(version),
                    Outcome::Skipped("superseded by a newer version".into()),
                )),
                IndexedEvent::Deleted { doc_id } => {
                    // Re-created since? Then its new version is on its way
                    // and will prune; deleting now would open a gap.
                    if self.ledger.latest_version(&doc_id).is_none() {
                        removals.push(Removal {
                            doc_id: doc_id.clone(),
                            keep: None,
                        });
                    }
                    outcomes.push((doc_id, None, Outcome::Deleted));
                }
            }
        }
        if !removals.is_empty() {
            let removed = self.store.remove(&removals).await?;
            for (r, versions) in removals.iter().zip(&removed) {
                if !versions.is_empty() {
                    tracing::debug!(doc = %r.doc_id, ?versions, "pruned old versions");
                }
            }
            self.cache.invalidate_all(&removals).await;
        }
        for (doc_id, version, outcome) in outcomes {
            self.ledger.finish(&doc_id, version.as_deref(), outcome);
        }
        Ok(())
    }
}
