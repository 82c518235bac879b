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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// An optimisation is running (in the background: see [`Self::optimize`]).
    pub optimizing: Arc<AtomicBool>,
}

impl IndexerStage {
    /// Starts the store's optimizer unless it is running already; says
    /// whether it started. In the background: an HNSW build takes minutes
    /// at 100k points, and the single indexer waiting for it held back
    /// every document behind it (BENCHMARKS.md, 100,000-file drop).
    fn optimize(&self) -> bool {
        if self.optimizing.swap(true, Ordering::SeqCst) {
            return false;
        }
        let (store, running) = (self.store.clone(), self.optimizing.clone());
        tokio::spawn(async move {
            if let Err(e) = store.optimize().await {
                // Search still works on unoptimised segments.
                tracing::warn!("vector store optimisation failed: {e:#}");
            }
            running.store(false, Ordering::SeqCst);
        });
        true
    }
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
                // Counted from the last run that started: points written
                // while one runs start the next once it is done.
                if self.written_since_optimize.fetch_add(n, Ordering::Relaxed) + n
                    >= self.optimize_every
                    && self.optimize()
                {
                    self.written_since_optimize.store(0, Ordering::Relaxed);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::indexer::edge::EdgeStore;
    use crate::messages::{Chunk, DocMeta, Partition};
    use crate::pool::PoolQueue;
    use crate::stats::ActorStats;

    fn embedded(version: &str, seq: u64) -> EmbeddedDoc {
        EmbeddedDoc {
            meta: DocMeta {
                doc_id: "kb:hr/leave.md".into(),
                source: "kb".into(),
                uri: "hr/leave.md".into(),
                path: "/nowhere/hr/leave.md".into(),
                version: version.into(),
                partition: Partition {
                    division: "hr".into(),
                    access_level: "public".into(),
                },
                size: 1,
                seq,
            },
            chunks: vec![Chunk {
                index: 0,
                text: format!("leave policy {version}"),
            }],
            vectors: vec![vec![1.0, 0.0, 0.0, 0.0]],
        }
    }

    type Out = Arc<PoolQueue<IndexedEvent>>;

    fn index_node(store: &Arc<dyn VectorStore>, ledger: Arc<Ledger>) -> (IndexerStage, Out) {
        let out = PoolQueue::new(Arc::new(ActorStats::default()));
        let stage = IndexerStage {
            store: store.clone(),
            ledger,
            out: Port::Local(out.clone()),
            observe: true,
            optimize_every: u64::MAX,
            written_since_optimize: AtomicU64::new(0),
            optimizing: Default::default(),
        };
        (stage, out)
    }

    async fn versions(store: &Arc<dyn VectorStore>) -> Vec<String> {
        let stored = store.indexed_versions().await.unwrap();
        stored.into_iter().map(|v| v.version).collect()
    }

    #[tokio::test]
    async fn a_restarted_index_node_refuses_an_older_version_redelivered_late() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        // Before the restart: v2, seen after v1, is indexed.
        let (before, _) = index_node(&store, Ledger::new(8));
        before
            .process(IndexJob::Upsert(embedded("v2", 2_000)))
            .await
            .unwrap();

        // After it: the ledger starts from the store; v1 and a deletion that
        // the watcher saw before v2 arrive late. Neither may win.
        let ledger = Ledger::new(8);
        ledger.seed(&store.indexed_versions().await.unwrap());
        let (after, out) = index_node(&store, ledger);
        after
            .process(IndexJob::Upsert(embedded("v1", 1_000)))
            .await
            .unwrap();
        assert_eq!(out.len(), 1, "v1 reported superseded");
        let delete = IndexJob::Delete {
            doc_id: "kb:hr/leave.md".into(),
            seq: 1_500,
        };
        after.process(delete).await.unwrap();
        assert_eq!(out.len(), 1, "the stale deletion reached the pruner");
        assert_eq!(versions(&store).await, vec!["v2".to_string()]);
        // The ordering survives only through the stored seq: a ledger that
        // starts empty writes the stale version.
        let (unseeded, _) = index_node(&store, Ledger::new(8));
        unseeded
            .process(IndexJob::Upsert(embedded("v1", 1_000)))
            .await
            .unwrap();
        assert_eq!(
            versions(&store).await,
            vec!["v1".to_string(), "v2".to_string()]
        );
    }
}
