//! The Indexer stage: the single writer of the vector store.
//!
//! One worker on purpose: writes to a document happen in the order its
//! versions were seen, and a version is written only if it is still the
//! current one (checked just before the write), so an overtaken version can
//! never land after its successor was pruned against. Deletions pass through
//! the same queue to keep that order.

use super::VectorStore;
use crate::bridge::Port;
use crate::ledger::{Ledger, Outcome};
use crate::messages::{EmbeddedDoc, IndexedEvent};
use crate::pool::Stage;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum IndexJob {
    Upsert(EmbeddedDoc),
    Delete {
        doc_id: String,
        /// The watcher's sequence of the deletion (see `DocMeta::seq`).
        #[serde(default)]
        seq: u64,
    },
}

pub struct IndexerStage {
    pub store: Arc<dyn VectorStore>,
    pub ledger: Arc<Ledger>,
    pub out: Port<IndexedEvent>,
    /// On a cluster's index node, which has no watcher: learn each
    /// document's current version from the jobs (`Ledger::observe`).
    pub observe: bool,
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
                if self.observe {
                    self.ledger.observe(id, Some(version), doc.meta.seq);
                }
                if !self.ledger.is_current(id, version) {
                    self.ledger.finish(
                        id,
                        Some(version),
                        Outcome::Skipped("superseded by a newer version".into()),
                    );
                    if self.observe {
                        // The ledger that admitted it is on the ingest node.
                        self.out
                            .send(IndexedEvent::Superseded {
                                doc_id: doc.meta.doc_id.clone(),
                                version: doc.meta.version.clone(),
                            })
                            .await?;
                    }
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
                self.out
                    .send(IndexedEvent::Indexed {
                        doc_id: doc.meta.doc_id,
                        version: doc.meta.version,
                    })
                    .await?;
            }
            IndexJob::Delete { doc_id, seq } => {
                if self.observe && !self.ledger.observe(&doc_id, None, seq) {
                    return Ok(()); // the document came back since
                }
                self.out.send(IndexedEvent::Deleted { doc_id }).await?;
            }
        }
        Ok(())
    }
}
