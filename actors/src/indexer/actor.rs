//! The Indexer stage: the single writer of the vector store.
//!
//! One worker on purpose: writes to a document happen in the order its
//! versions were seen, and a version is written only if it is still the
//! current one (checked just before the write), so an overtaken version can
//! never land after its successor was pruned against. Deletions pass through
//! the same queue to keep that order.

use super::VectorStore;
use crate::bridge::Port;
use crate::cache_guard::CacheHandle;
use crate::ledger::{Ledger, Outcome};
use crate::messages::{EmbeddedDoc, IndexedEvent};
use crate::pool::{JobErrors, Stage};
use crate::version_pruner::VersionPrunerStage;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

// A deletion queued takes as much room as a document (a few hundred
// bytes); boxing the document would cost an allocation for each instead.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum IndexJob {
    Upsert(EmbeddedDoc),
    Delete {
        doc_id: String,
        /// The watcher's sequence of the deletion (see `DocMeta::seq`).
        #[serde(default)]
        seq: u64,
    },
    /// From the ingest node whose ledger admitted the document: its
    /// deletion settled there, every version seen before it closed, so no
    /// older job of it is still on its way. An index node may then forget
    /// it (see `Ledger::release`). (Upgrade index nodes before ingest
    /// nodes: an older one dead-letters this job, which is harmless.)
    Forget {
        doc_id: String,
        /// The deletion's seq: a later deletion is not released by it.
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
    /// When the store's index is rebuilt (see [`Optimizer`]).
    pub optimizer: Arc<Optimizer>,
    /// On a cluster's index node: prunes what this write made old, here,
    /// before the events go on (see [`IndexerStage::write`]).
    pub prune: Option<Arc<VersionPrunerStage>>,
    /// On a cluster's index node: the name of this node's model
    /// ([`crate::model::fingerprint`]). A document whose text keys were
    /// made under another (an embed node given another model) is refused:
    /// its vectors would answer this model's questions with unrelated
    /// text, and the store would hold two models' vectors. It waits in the
    /// dead-letter queue for a replay once the embed node is put right.
    pub model_id: Option<String>,
    /// Told which partitions each write put new text in, so that no cached
    /// answer computed before it is served (see `cache_guard`).
    pub cache: CacheHandle,
}

/// When to run the store's optimizer (the HNSW build), `[index]`
/// optimize_every and optimize_idle_ms.
#[derive(Clone, Debug)]
pub struct OptimizePolicy {
    /// Once the writes pause for this long, new points are indexed.
    pub idle: Duration,
    /// During a burst that does not pause: after this many new points,
    /// since the points not yet in the graph are searched exhaustively
    /// (fine for tens of thousands, slow beyond).
    pub every: u64,
}

/// Runs the store's optimizer when the writes pause, or after
/// `policy.every` points when they do not, one run at a time and in the
/// background.
///
/// Why not simply every N points: an HNSW build of tens of thousands of
/// points takes the CPU for tens of seconds, and during a burst that is the
/// CPU the embedder needs (BENCHMARKS.md, "Ingest at scale"). Qdrant's own
/// advice for bulk loads is the same: index after the upload.
pub struct Optimizer {
    store: Arc<dyn VectorStore>,
    policy: OptimizePolicy,
    /// Points written since the last run started.
    written: AtomicU64,
    last_write: Mutex<Instant>,
    running: AtomicBool,
    /// Set at shutdown: a build started then could not finish, and the
    /// final flush would wait for it.
    stopped: AtomicBool,
    /// Runs finished (admin `/index`: a bench waits for the build after a
    /// burst with it).
    finished: AtomicU64,
}

impl Optimizer {
    pub fn new(store: Arc<dyn VectorStore>, policy: OptimizePolicy) -> Arc<Optimizer> {
        Arc::new(Optimizer {
            store,
            policy,
            // One run after the first pause even with no writes: a store
            // opened from disk may hold points outside the graph (written
            // just before a stop, moved by an upgrade, or left by a new
            // hnsw_m), and searching them exhaustively would go on until
            // the next write.
            written: AtomicU64::new(1),
            last_write: Mutex::new(Instant::now()),
            running: Default::default(),
            stopped: Default::default(),
            finished: Default::default(),
        })
    }

    /// Watches for pauses in the writes until the optimizer is dropped
    /// everywhere else.
    pub fn watch_for_pauses(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let tick = (self.policy.idle / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(tick).await;
                let Some(me) = weak.upgrade() else { return };
                if me.written.load(Ordering::Relaxed) > 0
                    && me.last_write.lock().elapsed() >= me.policy.idle
                {
                    me.start();
                }
            }
        });
    }

    /// `n` points were written.
    pub fn wrote(self: &Arc<Self>, n: u64) {
        *self.last_write.lock() = Instant::now();
        if self.written.fetch_add(n, Ordering::Relaxed) + n >= self.policy.every {
            self.start();
        }
    }

    /// Whether a run is going on, and how many have finished.
    pub fn state(&self) -> (bool, u64) {
        (
            self.running.load(Ordering::SeqCst),
            self.finished.load(Ordering::SeqCst),
        )
    }

    /// No new runs from now on (shutdown).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Starts a run unless one is running. Points written during a run
    /// count toward the next.
    fn start(self: &Arc<Self>) {
        if self.stopped.load(Ordering::SeqCst) || self.running.swap(true, Ordering::SeqCst) {
            return;
        }
        self.written.store(0, Ordering::Relaxed);
        let me = self.clone();
        tokio::spawn(async move {
            if let Err(e) = me.store.optimize().await {
                // Search still works on unoptimised segments.
                tracing::warn!("vector store optimisation failed: {e:#}");
            }
            me.finished.fetch_add(1, Ordering::SeqCst);
            me.running.store(false, Ordering::SeqCst);
        });
    }
}

/// The most jobs the Indexer takes in one write, and their most bytes
/// (chunk text and vectors) together: a burst goes into the store in few
/// large writes (one lock and one blocking-pool trip, or one request per
/// division to a Qdrant server, well under its 32 MiB request limit), while
/// a lone change is still written at once.
pub const WRITE_BATCH: usize = 64;
pub const WRITE_BATCH_BYTES: u64 = 8 << 20;

impl Stage for IndexerStage {
    type In = IndexJob;

    async fn process(&self, job: IndexJob) -> anyhow::Result<()> {
        if let Some(e) = self.refused(&job) {
            return Err(e);
        }
        self.write(vec![job]).await
    }

    fn max_batch(&self) -> usize {
        WRITE_BATCH
    }

    fn max_batch_bytes(&self) -> u64 {
        WRITE_BATCH_BYTES
    }

    async fn process_batch(&self, jobs: Vec<IndexJob>) -> anyhow::Result<JobErrors> {
        let mut refused = JobErrors::new();
        let mut admitted = Vec::with_capacity(jobs.len());
        for (i, job) in jobs.into_iter().enumerate() {
            match self.refused(&job) {
                Some(e) => refused.push((i, e)),
                None => admitted.push(job),
            }
        }
        self.write(admitted).await.map(|()| refused)
    }
}

impl IndexerStage {
    /// Why this job may not be written, if it may not: see
    /// [`IndexerStage::model_id`]. A document without text keys (from an
    /// embed node older than them) cannot tell and is taken.
    fn refused(&self, job: &IndexJob) -> Option<anyhow::Error> {
        let (Some(model), IndexJob::Upsert(doc)) = (&self.model_id, job) else {
            return None;
        };
        let foreign = doc
            .keys
            .iter()
            .zip(&doc.chunks)
            .any(|(k, c)| *k != crate::embedder::text_key(model, &c.text));
        foreign.then(|| {
            anyhow::anyhow!(
                "embedded by another model than this index node's ({model}): its chunks' \
                 text keys are not this model's. Give the embed nodes the same model.embedder \
                 as the index nodes, then replay the dead letters"
            )
        })
    }
}

impl IndexerStage {
    /// Decides each job in order (the current-version check), writes every
    /// admitted version in one call, then hands the events on in order.
    ///
    /// On a bus it prunes first, itself: the pruner decides with the
    /// versions its ledger has seen, and only the node that indexed a
    /// document's job has (a pruner consuming the `indexed` topic in a
    /// group of its own got its partitions apart from the indexer's, and
    /// with two index nodes it kept old versions and deleted documents
    /// searchable). The job is committed after both, so a node that dies
    /// between them writes and prunes again on redelivery.
    async fn write(&self, jobs: Vec<IndexJob>) -> anyhow::Result<()> {
        let mut writes = Vec::new();
        let mut events = Vec::with_capacity(jobs.len());
        for job in jobs {
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
                            Outcome::Skipped(crate::ledger::SUPERSEDED.into()),
                        );
                        if self.observe {
                            // The ledger that admitted it is on the ingest node.
                            events.push(IndexedEvent::Superseded {
                                doc_id: doc.meta.doc_id,
                                version: doc.meta.version,
                            });
                        }
                        continue;
                    }
                    events.push(IndexedEvent::Indexed {
                        doc_id: doc.meta.doc_id.clone(),
                        version: doc.meta.version.clone(),
                        seq: doc.meta.seq,
                    });
                    writes.push(doc);
                }
                IndexJob::Delete { doc_id, seq } => {
                    if self.observe {
                        // One that the document outran (it came back
                        // since) still goes on: the pruner finds the
                        // document wanted and removes nothing, and the
                        // ledger that admitted the deletion closes it.
                        self.ledger.observe(&doc_id, None, seq);
                    }
                    events.push(IndexedEvent::Deleted { doc_id, seq });
                }
                IndexJob::Forget { doc_id, seq } => {
                    if self.observe {
                        self.ledger.release(&doc_id, seq);
                    }
                }
            }
        }
        if !writes.is_empty() {
            let written = async {
                self.store.upsert_docs(&writes).await?;
                let points = writes.iter().map(|d| d.chunks.len() as u64).sum();
                self.optimizer.wrote(points);
                if self.observe {
                    self.undo_overtaken(&writes, &mut events).await?;
                }
                anyhow::Ok(())
            }
            .await;
            // Told even when the write failed: it may have failed part
            // way, with some of the new text searchable already, and the
            // job may never come back (dead-lettered) to tell it then.
            let mut partitions: Vec<_> = writes.iter().map(|d| d.meta.partition.clone()).collect();
            partitions.sort();
            partitions.dedup();
            self.cache.indexed(&partitions).await;
            written?;
        }
        if let Some(pruner) = &self.prune {
            pruner.prune(events.clone()).await?;
        }
        self.out.send_all(events).await
    }
}

impl IndexerStage {
    /// On a bus, where other index nodes write the same store: reads back
    /// the documents just written and removes each one that another node
    /// has overtaken meanwhile (see [`super::overtaken`]); its events
    /// become `Superseded`, as for a version the ledger refused, and the
    /// ledger learns the newer version.
    async fn undo_overtaken(
        &self,
        writes: &[EmbeddedDoc],
        events: &mut [IndexedEvent],
    ) -> anyhow::Result<()> {
        let mut ids: Vec<String> = writes.iter().map(|d| d.meta.doc_id.clone()).collect();
        ids.sort();
        ids.dedup();
        let stored = self.store.versions_of(&ids).await?;
        let metas: Vec<&crate::messages::DocMeta> = writes.iter().map(|d| &d.meta).collect();
        let removals = super::overtaken(&metas, &stored);
        if removals.is_empty() {
            return Ok(());
        }
        for r in &removals {
            // (`overtaken` always keeps the newer version.)
            let Some(newer) = r.keep.as_deref() else {
                continue;
            };
            let seq = r.seen_before.unwrap_or(0);
            tracing::warn!(
                doc = %r.doc_id,
                newer,
                "a late write of an older version (this node lost the document's partition \
                 while writing it); removing it again"
            );
            self.ledger.observe(&r.doc_id, Some(newer), seq);
        }
        metrics::counter!("ragd_index_overtaken_total").increment(removals.len() as u64);
        match &self.prune {
            Some(pruner) => pruner.remove(&removals).await?,
            None => {
                self.store.remove(&removals).await?;
            }
        }
        for e in events.iter_mut() {
            if let IndexedEvent::Indexed {
                doc_id, version, ..
            } = e
            {
                // (The version kept may be one written here: its text was
                // seen again later, by another node.)
                let gone = |r: &&super::Removal| {
                    r.doc_id == *doc_id && r.keep.as_deref() != Some(version.as_str())
                };
                if removals.iter().any(|r| gone(&r)) {
                    *e = IndexedEvent::Superseded {
                        doc_id: std::mem::take(doc_id),
                        version: std::mem::take(version),
                    };
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::indexer::edge::EdgeStore;
    use crate::ledger::DocStatus;
    use crate::messages::{Chunk, DocMeta, Partition};
    use crate::pool::PoolQueue;
    use crate::stats::ActorStats;
    use crate::version_pruner::tests::pruner;

    /// One chunk of kb:hr/leave.md at `version`, seen at `seq`.
    pub(crate) fn embedded(version: &str, seq: u64) -> EmbeddedDoc {
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
            keys: vec![],
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
            prune: None,
            model_id: Some("minilm".into()),
            cache: crate::version_pruner::tests::no_cache(),
            optimizer: Optimizer::new(
                store.clone(),
                OptimizePolicy {
                    idle: Duration::from_secs(3600),
                    every: u64::MAX,
                },
            ),
        };
        (stage, out)
    }

    /// The versions in the store, in order.
    pub(crate) async fn versions(store: &Arc<dyn VectorStore>) -> Vec<String> {
        let stored = store.indexed_versions().await.unwrap();
        stored.into_iter().map(|v| v.version).collect()
    }

    /// Each write tells the cache the partitions it put new text in: an
    /// answer cached for a scope that sees one is not served after it.
    /// With the cache down the write goes on, and the cache is told once
    /// it is back.
    #[tokio::test]
    async fn a_write_makes_the_answers_cached_for_its_partition_stale_cache_down_or_not() {
        use crate::cache_guard::{CacheHandle, CachedAnswer, SemanticCache};
        use crate::version_pruner::tests::Unreachable;
        use std::sync::atomic::Ordering::SeqCst;
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        let cache = Arc::new(Unreachable::new(false));
        let (mut stage, _out) = index_node(&store, Ledger::new(8));
        stage.cache = CacheHandle::new("no-cache-actor", cache.clone());
        let (hr, eng) = (
            crate::indexer::Scope {
                divisions: vec!["hr".into()],
                access_levels: vec!["public".into()],
            },
            crate::indexer::Scope {
                divisions: vec!["eng".into()],
                access_levels: vec!["public".into()],
            },
        );
        let q = [1.0, 0.0, 0.0, 0.0];
        let cache_an_answer = || async {
            let answer = CachedAnswer {
                answer: Some("no leave policy found".into()),
                sources: vec![],
            };
            for s in [&hr, &eng] {
                let as_of = cache.as_of(s).await.unwrap();
                cache.store(&q, s, 5, answer.clone(), &as_of).await.unwrap();
                assert!(cache.lookup(&q, s, 5).await.unwrap().is_some());
            }
        };
        cache_an_answer().await;
        stage
            .process(IndexJob::Upsert(embedded("v1", 1_000)))
            .await
            .unwrap();
        assert_eq!(cache.lookup(&q, &hr, 5).await.unwrap(), None);
        assert!(cache.lookup(&q, &eng, 5).await.unwrap().is_some());

        cache_an_answer().await;
        cache.down.store(true, SeqCst);
        stage
            .process(IndexJob::Upsert(embedded("v2", 2_000)))
            .await
            .unwrap();
        assert_eq!(versions(&store).await, ["v1", "v2"]);
        assert_eq!(stage.cache.owed_generations(), 1);
        cache.down.store(false, SeqCst);
        let deadline = Instant::now() + Duration::from_secs(20);
        while cache.lookup(&q, &hr, 5).await.unwrap().is_some() {
            assert!(Instant::now() < deadline, "the cache was never told");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(stage.cache.owed_generations(), 0);
        assert!(cache.lookup(&q, &eng, 5).await.unwrap().is_some());
    }

    /// A write that fails may have put its text in the store all the
    /// same: the cache is told, or an answer cached before it would hide
    /// that text until its TTL (the job may be dead-lettered, never to
    /// come back and tell it).
    #[tokio::test]
    async fn a_write_that_failed_part_way_still_makes_cached_answers_stale() {
        use crate::cache_guard::{CacheHandle, CachedAnswer, SemanticCache};
        use crate::version_pruner::tests::Unreachable;
        let dir = tempfile::tempdir().unwrap();
        let counted = Arc::new(Counted {
            inner: EdgeStore::open(dir.path(), 4).unwrap(),
            runs: Default::default(),
            fail_writes: true.into(),
        });
        let store: Arc<dyn VectorStore> = counted.clone();
        let cache = Arc::new(Unreachable::new(false));
        let (mut stage, _out) = index_node(&store, Ledger::new(8));
        stage.cache = CacheHandle::new("no-cache-actor", cache.clone());
        let hr = crate::indexer::Scope {
            divisions: vec!["hr".into()],
            access_levels: vec!["public".into()],
        };
        let q = [1.0, 0.0, 0.0, 0.0];
        let answer = CachedAnswer {
            answer: Some("no leave policy found".into()),
            sources: vec![],
        };
        let as_of = cache.as_of(&hr).await.unwrap();
        cache.store(&q, &hr, 5, answer, &as_of).await.unwrap();
        let failed = stage.process(IndexJob::Upsert(embedded("v1", 1_000))).await;
        assert!(failed.is_err(), "the write did not fail");
        assert_eq!(versions(&store).await, ["v1"], "the text is not in");
        assert_eq!(cache.lookup(&q, &hr, 5).await.unwrap(), None);
    }

    /// An index node takes documents embedded by its own model, and
    /// those that carry no text keys to tell; one whose keys were made
    /// under another model fails on its own (the pool dead-letters it
    /// after its attempts), naming the fix, and the others are written.
    #[tokio::test]
    async fn a_document_embedded_by_another_model_is_refused_alone() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        let (stage, out) = index_node(&store, Ledger::new(8));
        let keyed = |version: &str, seq: u64, model: &str| {
            let mut d = embedded(version, seq);
            d.meta.doc_id = format!("kb:{model}-{version}.md");
            d.keys = vec![crate::embedder::text_key(model, &d.chunks[0].text)];
            IndexJob::Upsert(d)
        };
        let mut unkeyed = embedded("v3", 3_000);
        unkeyed.meta.doc_id = "kb:unkeyed.md".into();
        let errors = stage
            .process_batch(vec![
                keyed("v1", 1_000, "minilm"),
                keyed("v2", 2_000, "another model"),
                IndexJob::Upsert(unkeyed),
            ])
            .await
            .unwrap();
        assert_eq!(errors.len(), 1, "{errors:?}");
        let (i, e) = &errors[0];
        assert_eq!(*i, 1);
        let e = format!("{e:#}");
        assert!(
            e.contains("embedded by another model") && e.contains("replay"),
            "{e}"
        );
        let mut written: Vec<String> = store
            .indexed_versions()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.doc_id)
            .collect();
        written.sort();
        assert_eq!(written, ["kb:minilm-v1.md", "kb:unkeyed.md"]);
        assert_eq!(out.len(), 2, "events for the two written");
        let alone = stage.process(keyed("v4", 4_000, "another model")).await;
        assert!(alone.is_err(), "one at a time as well");
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
        // The stale deletion goes on to the pruner, which removes nothing
        // (the ledger that admitted it must see it end).
        let events = out.drain();
        assert!(
            matches!(
                &events[..],
                [
                    IndexedEvent::Superseded { .. },
                    IndexedEvent::Deleted { .. }
                ]
            ),
            "{events:?}"
        );
        pruner(&store, after.ledger.clone())
            .process_batch(events)
            .await
            .unwrap();
        assert_eq!(versions(&store).await, vec!["v2".to_string()]);
        // Still indexed, as far as this node knows.
        assert_eq!(
            after.ledger.status("kb:hr/leave.md"),
            Some(DocStatus::Indexed)
        );
        // The ordering survives through the stored seq: a ledger that
        // starts empty lets the stale version through, and only reading
        // the store back after the write (see the next test) takes it out.
        let (unseeded, out) = index_node(&store, Ledger::new(8));
        unseeded
            .process(IndexJob::Upsert(embedded("v1", 1_000)))
            .await
            .unwrap();
        assert_eq!(versions(&store).await, vec!["v2".to_string()]);
        assert!(matches!(
            &out.drain()[..],
            [IndexedEvent::Superseded { .. }]
        ));
    }

    /// Two index nodes on one store. A started writing v1, then its group
    /// dropped it for not answering; B inherited the partition, wrote v1
    /// (redelivered) and v2, and pruned. A's write of v1 lands after all
    /// that: A reads the store back, removes v1 again, and reports it
    /// superseded. Done in the other order (A's write before B's prune),
    /// the prune removes it.
    #[tokio::test]
    async fn a_late_write_from_a_node_that_lost_the_partition_is_undone() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        let node = |ledger: Arc<Ledger>| {
            let (mut stage, out) = index_node(&store, ledger.clone());
            stage.prune = Some(Arc::new(pruner(&store, ledger)));
            (stage, out)
        };
        let (a, a_out) = node(Ledger::new(8));
        let (b, b_out) = node(Ledger::new(8));
        let doc_id = "kb:hr/leave.md";
        for (v, seq) in [("v1", 1_000), ("v2", 2_000)] {
            b.process(IndexJob::Upsert(embedded(v, seq))).await.unwrap();
        }
        assert_eq!(versions(&store).await, ["v2"]);
        assert_eq!(b_out.drain().len(), 2);

        a.process(IndexJob::Upsert(embedded("v1", 1_000)))
            .await
            .unwrap();
        assert_eq!(versions(&store).await, ["v2"], "the late v1 stayed");
        let events = a_out.drain();
        assert!(
            matches!(&events[..], [IndexedEvent::Superseded { version, .. }] if version == "v1"),
            "{events:?}"
        );
        assert_eq!(a.ledger.latest_version(doc_id).as_deref(), Some("v2"));

        // The file changed back to v1 meanwhile (seen again at 4_000, on
        // B), while A, cut off, still writes v1 and v2 as first seen: its
        // v1 leaves B's newer copy as it is (an older write does not make
        // it look older), its v2 goes again, and only v2 is superseded.
        b.process(IndexJob::Upsert(embedded("v1", 4_000)))
            .await
            .unwrap();
        assert_eq!(versions(&store).await, ["v1"]);
        let (late, late_out) = node(Ledger::new(8));
        late.process_batch(vec![
            IndexJob::Upsert(embedded("v1", 1_000)),
            IndexJob::Upsert(embedded("v2", 2_000)),
        ])
        .await
        .unwrap();
        let stored = store.indexed_versions().await.unwrap();
        assert_eq!(
            stored
                .iter()
                .map(|v| (v.version.as_str(), v.seq))
                .collect::<Vec<_>>(),
            [("v1", 4_000)]
        );
        let events = late_out.drain();
        assert!(
            matches!(
                &events[..],
                [IndexedEvent::Indexed { version: v1, .. }, IndexedEvent::Superseded { version: v2, .. }]
                    if v1 == "v1" && v2 == "v2"
            ),
            "{events:?}"
        );
        assert_eq!(late.ledger.latest_version(doc_id).as_deref(), Some("v1"));

        // A version newer than the store's is written as usual, by either.
        a.process(IndexJob::Upsert(embedded("v3", 5_000)))
            .await
            .unwrap();
        assert_eq!(versions(&store).await, ["v3"]);
        assert!(matches!(&a_out.drain()[..], [IndexedEvent::Indexed { .. }]));
    }

    /// An index node keeps a deletion while a version seen before it may
    /// still arrive, and forgets it once the ingest node's `Forget` says
    /// none can.
    #[tokio::test]
    async fn an_index_node_forgets_a_deletion_when_the_ingest_node_says() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        let ledger = Ledger::with_memory(8, Duration::ZERO, true);
        let (stage, out) = index_node(&store, ledger.clone());
        let pruner = pruner(&store, ledger.clone());
        let doc_id = "kb:hr/leave.md".to_string();
        stage
            .process(IndexJob::Upsert(embedded("v1", 1_000)))
            .await
            .unwrap();
        let delete = IndexJob::Delete {
            doc_id: doc_id.clone(),
            seq: 3_000,
        };
        stage.process(delete).await.unwrap();
        pruner.process_batch(out.drain()).await.unwrap();
        assert!(versions(&store).await.is_empty());
        // Deleted, and held: v2, seen before the deletion, comes late.
        assert_eq!(ledger.status(&doc_id), Some(DocStatus::Deleted));
        stage
            .process(IndexJob::Upsert(embedded("v2", 2_000)))
            .await
            .unwrap();
        pruner.process_batch(out.drain()).await.unwrap();
        assert!(versions(&store).await.is_empty(), "the late v2 was written");

        stage
            .process(IndexJob::Forget {
                doc_id: doc_id.clone(),
                seq: 3_000,
            })
            .await
            .unwrap();
        assert!(out.is_empty(), "a release reports nothing");
        assert_eq!(ledger.status(&doc_id), None);
        assert_eq!(ledger.counts().forgotten, 1);
        // A later version is a document like any new one.
        stage
            .process(IndexJob::Upsert(embedded("v3", 4_000)))
            .await
            .unwrap();
        pruner.process_batch(out.drain()).await.unwrap();
        assert_eq!(versions(&store).await, vec!["v3".to_string()]);
    }

    /// On a bus the index node prunes what its write made old before the
    /// events go on: an `indexed` event means the old version is gone, and
    /// the versions are settled in this node's ledger.
    #[tokio::test]
    async fn on_a_bus_the_indexer_prunes_before_the_events_go_on() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir.path(), 4).unwrap());
        let ledger = Ledger::with_memory(8, Duration::from_secs(60), true);
        let (mut stage, out) = index_node(&store, ledger.clone());
        stage.prune = Some(Arc::new(pruner(&store, ledger.clone())));
        let doc_id = "kb:hr/leave.md";
        stage
            .process(IndexJob::Upsert(embedded("v1", 1_000)))
            .await
            .unwrap();
        stage
            .process(IndexJob::Upsert(embedded("v2", 2_000)))
            .await
            .unwrap();
        assert_eq!(versions(&store).await, vec!["v2".to_string()]);
        assert_eq!(ledger.status(doc_id), Some(DocStatus::Indexed));
        assert_eq!(ledger.counts().in_flight, 0);
        stage
            .process(IndexJob::Delete {
                doc_id: doc_id.into(),
                seq: 3_000,
            })
            .await
            .unwrap();
        assert!(versions(&store).await.is_empty());
        assert_eq!(ledger.status(doc_id), Some(DocStatus::Deleted));
        let events = out.drain();
        assert!(
            matches!(
                &events[..],
                [
                    IndexedEvent::Indexed { .. },
                    IndexedEvent::Indexed { .. },
                    IndexedEvent::Deleted { .. }
                ]
            ),
            "{events:?}"
        );
    }

    /// The real store, with its optimisations counted; while `fail_writes`
    /// is set, a write fails after it is done (a write cut off part way:
    /// the text searchable, the caller told it failed).
    struct Counted {
        inner: EdgeStore,
        runs: std::sync::atomic::AtomicUsize,
        fail_writes: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl VectorStore for Counted {
        fn backend(&self) -> &'static str {
            "counted"
        }
        async fn upsert(&self, d: &DocMeta, c: &[Chunk], v: &[Vec<f32>]) -> anyhow::Result<()> {
            self.inner.upsert(d, c, v).await?;
            if self.fail_writes.load(Ordering::SeqCst) {
                anyhow::bail!("the connection dropped before the write was acknowledged");
            }
            Ok(())
        }
        async fn search(
            &self,
            v: &[f32],
            s: &crate::indexer::Scope,
            l: usize,
        ) -> anyhow::Result<Vec<crate::indexer::Hit>> {
            self.inner.search(v, s, l).await
        }
        async fn remove(&self, r: &[crate::indexer::Removal]) -> anyhow::Result<Vec<Vec<String>>> {
            self.inner.remove(r).await
        }
        async fn hide(&self, r: &[crate::indexer::Removal]) -> anyhow::Result<()> {
            self.inner.hide(r).await
        }
        async fn holds_all(&self, h: &[crate::indexer::Hit]) -> anyhow::Result<bool> {
            self.inner.holds_all(h).await
        }
        async fn indexed_versions(&self) -> anyhow::Result<Vec<crate::indexer::StoredVersion>> {
            self.inner.indexed_versions().await
        }
        async fn versions_of(
            &self,
            d: &[String],
        ) -> anyhow::Result<Vec<crate::indexer::StoredVersion>> {
            self.inner.versions_of(d).await
        }
        async fn count(&self, d: Option<&str>) -> anyhow::Result<u64> {
            self.inner.count(d).await
        }
        async fn count_hidden(&self) -> anyhow::Result<u64> {
            self.inner.count_hidden().await
        }
        async fn flush(&self) -> anyhow::Result<()> {
            self.inner.flush().await
        }
        async fn optimize(&self) -> anyhow::Result<()> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            self.inner.optimize().await
        }
        async fn keyed_texts(
            &self,
            k: &[i64],
            l: usize,
        ) -> anyhow::Result<Vec<crate::indexer::KeyedText>> {
            self.inner.keyed_texts(k, l).await
        }
        async fn texts(
            &self,
            p: crate::indexer::TextPage,
        ) -> anyhow::Result<(Vec<crate::indexer::StoredText>, Option<u64>)> {
            self.inner.texts(p).await
        }
        async fn set_text_keys(&self, k: &[(u64, i64)]) -> anyhow::Result<()> {
            self.inner.set_text_keys(k).await
        }
    }

    #[tokio::test]
    async fn the_index_is_built_when_writes_pause_or_a_burst_grows_past_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Counted {
            inner: EdgeStore::open(dir.path(), 4).unwrap(),
            runs: Default::default(),
            fail_writes: Default::default(),
        });
        let runs = || store.runs.load(Ordering::SeqCst);
        let optimizer = Optimizer::new(
            store.clone(),
            OptimizePolicy {
                idle: Duration::from_secs(1),
                every: 1_000,
            },
        );
        optimizer.watch_for_pauses();
        let settle = || tokio::time::sleep(Duration::from_millis(200));

        // A steady trickle, well under the limit, never pauses long enough
        // (writes 100 ms apart against a 1 s pause).
        for _ in 0..20 {
            optimizer.wrote(1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(runs(), 0, "no build while the writes keep coming");
        // They pause: one build.
        tokio::time::sleep(Duration::from_millis(1_800)).await;
        assert_eq!(runs(), 1, "a pause builds what was written");
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(runs(), 1, "nothing new, no new build");

        // A burst past the limit builds at once, without waiting for a pause.
        optimizer.wrote(1_000);
        settle().await;
        assert_eq!(runs(), 2, "the limit starts a build during a burst");

        // After a stop, nothing starts.
        optimizer.stop();
        optimizer.wrote(1_000);
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(runs(), 2, "no build after a stop");

        // A store just opened gets one build after the first pause, writes
        // or not (it may hold points outside the graph).
        let fresh = Optimizer::new(
            store.clone(),
            OptimizePolicy {
                idle: Duration::from_millis(200),
                every: 1_000,
            },
        );
        fresh.watch_for_pauses();
        tokio::time::sleep(Duration::from_millis(1_000)).await;
        assert_eq!(runs(), 3, "one build after opening");
    }
}
