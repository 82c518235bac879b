//! The Indexer stage: the single writer of the vector store.
//!
//! One worker on purpose: writes to a document happen in the order its
//! versions were seen, and a version is written only if it is still the
//! current one (checked just before the write), so an overtaken version can
//! never land after its successor was pruned against. Deletions pass through
//! the same queue to keep that order.

use super::VectorStore;
use crate::ledger::{Ledger, Outcome};
use crate::messages::{EmbeddedDoc, IndexedEvent};
use crate::pool::{PoolQueue, Stage};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum IndexJob {
    Upsert(EmbeddedDoc),
    Delete { doc_id: String },
}

pub struct IndexerStage {
    pub store: Arc<dyn VectorStore>,
    pub ledger: Arc<Ledger>,
    pub out: Arc<PoolQueue<IndexedEvent>>,
    /// Run the store's optimizer after this many points were written.
    pub optimize_every: u64,
    pub written_since_optimize: AtomicU64,
}

impl Stage for IndexerStage {
    type In = IndexJob;

    async fn process(&self, job: IndexJob) -> anyhow::Result<()> {
        match job {
            IndexJob::Upsert(doc) => {
                let (id, version) = (&doc.meta.doc_id, &doc.meta.version);
                if !self.ledger.is_current(id, version) {
                    self.ledger.finish(
                        id,
                        Some(version),
                        Outcome::Skipped("superseded by a newer version".into()),
                    );
                    return Ok(());
                }
                self.store
                    .upsert(&doc.meta, &doc.chunks, &doc.vectors)
                    .await?;
                let n = doc.chunks.len() as u64;
                if self.written_since_optimize.fetch_add(n, Ordering::Relaxed) + n
                    >= self.optimize_every
                {
                    self.written_since_optimize.store(0, Ordering::Relaxed);
                    if let Err(e) = self.store.optimize().await {
                        // Search still works on unoptimised segments.
                        tracing::warn!("vector store optimisation failed: {e:#}");
                    }
                }
                self.out.submit(IndexedEvent::Indexed {
                    doc_id: doc.meta.doc_id,
                    version: doc.meta.version,
                });
            }
            IndexJob::Delete { doc_id } => self.out.submit(IndexedEvent::Deleted { doc_id }),
        }
        Ok(())
    }
}
