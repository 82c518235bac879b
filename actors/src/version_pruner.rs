//! The VersionPruner: once a version is durable, its document's other
//! versions go (and every chunk of a deleted document), and cached answers
//! citing them are invalidated.
//!
//! The new version is written before the old ones are deleted, so a query
//! always finds the document; after the prune, no old text is returned.

use crate::cache_guard::CacheHandle;
use crate::indexer::VectorStore;
use crate::ledger::{Ledger, Outcome};
use crate::messages::IndexedEvent;
use crate::pool::Stage;
use std::sync::Arc;

pub struct VersionPrunerStage {
    pub store: Arc<dyn VectorStore>,
    pub ledger: Arc<Ledger>,
    pub cache: CacheHandle,
}

impl Stage for VersionPrunerStage {
    type In = IndexedEvent;

    async fn process(&self, event: IndexedEvent) -> anyhow::Result<()> {
        match event {
            IndexedEvent::Indexed { doc_id, version } => {
                // An overtaken version must not prune its successor.
                if self.ledger.is_current(&doc_id, &version) {
                    let removed = self.store.delete_other_versions(&doc_id, &version).await?;
                    self.cache.invalidate(&doc_id, Some(&version)).await;
                    if !removed.is_empty() {
                        tracing::debug!(doc = %doc_id, ?removed, "pruned old versions");
                    }
                }
                self.ledger
                    .finish(&doc_id, Some(&version), Outcome::Indexed);
            }
            IndexedEvent::Superseded { doc_id, version } => self.ledger.finish(
                &doc_id,
                Some(&version),
                Outcome::Skipped("superseded by a newer version".into()),
            ),
            IndexedEvent::Deleted { doc_id } => {
                // Re-created since? Then its new version is on its way and
                // will prune; deleting now would open a gap.
                if self.ledger.latest_version(&doc_id).is_none() {
                    self.store.delete_doc(&doc_id).await?;
                    self.cache.invalidate(&doc_id, None).await;
                }
                self.ledger.finish(&doc_id, None, Outcome::Deleted);
            }
        }
        Ok(())
    }
}
