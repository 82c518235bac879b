//! Node assembly: which actors a node starts and how they are wired.
//!
//! Supervision tree (every supervisor one-for-one, see
//! `ragd_actors::supervisor` for the restart policy):
//!
//! ```text
//! root
//! ├── ingest  ── source_watcher, chunker (pool, min..max workers by queue length)
//! ├── embed   ── embedder (pool, min..max workers by queue length)
//! ├── index   ── indexer (single writer), version_pruner
//! └── query   ── cache_guard, reranker
//! ```
//!
//! On a bus the indexer prunes itself, right after its write (see
//! `IndexerStage::write`): no version_pruner there.

use crate::config::{Bus, CacheBackend, Config, IndexBackend, Roles};
use anyhow::Context;
use ractor::{Actor, ActorCell, ActorRef};
use ragd_actors::bridge::kafka::{Kafka, KafkaDlq, CHUNKS, EMBEDDED, INDEXED};
use ragd_actors::bridge::Port;
use ragd_actors::cache_guard::embedded::EmbeddedCache;
use ragd_actors::cache_guard::redis::{RedisCache, RedisSettings};
use ragd_actors::cache_guard::{CacheGuard, CacheGuardArgs, CacheHandle, SemanticCache};
use ragd_actors::chunker::actor::ChunkerStage;
use ragd_actors::chunker::{Chunker, ChunkerSettings};
use ragd_actors::dlq::{DeadLetters, FileDlq};
use ragd_actors::embedder::EmbedderStage;
use ragd_actors::indexer::actor::{IndexJob, IndexerStage, OptimizePolicy, Optimizer};
use ragd_actors::indexer::edge::EdgeStore;
use ragd_actors::indexer::model_check::{self, ModelCheck, Rekey};
use ragd_actors::indexer::qdrant::{QdrantSettings, QdrantStore};
use ragd_actors::indexer::{
    removals_at_start, AtStart, PartitionOf, StoredVersion, TextPage, VectorStore,
};
use ragd_actors::ledger::{Ledger, Outcome};
use ragd_actors::messages::{ChunkedDoc, DocMeta, IndexedEvent, Partition};
use ragd_actors::model::{AnyCrossEncoder, AnyEncoder, BatchPolicy, Device};
use ragd_actors::pool::{Job, Pool, PoolArgs, PoolQueue, PoolSettings, Stage};
use ragd_actors::reranker::{PairCost, RerankMsg, Reranker, RerankerArgs};
use ragd_actors::source_watcher::{SourceWatcher, WatchMsg, WatcherArgs};
use ragd_actors::stats::{ActorStats, StatsRegistry};
use ragd_actors::supervisor::{
    ChildSpec, RestartPolicy, StartFn, Supervisor, SupervisorArgs, SupervisorMsg,
};
use ragd_actors::version_pruner::PRUNE_BATCH;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

pub const WATCHER: &str = "source_watcher";
pub const RERANKER: &str = "reranker";
pub const CACHE_GUARD: &str = "cache_guard";

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Watch the sources and serve queries.
    Daemon,
    /// Scan once; no watching, no query actors.
    Ingest,
}

/// What the HTTP layer and the CLI need from a running node.
pub struct Node {
    pub config: Config,
    pub ledger: Arc<Ledger>,
    pub registry: StatsRegistry,
    pub store: Arc<dyn VectorStore>,
    /// Questions are embedded here: one model thread batching every question
    /// waiting, so concurrent queries share forward passes and cannot
    /// oversubscribe the cores (and starve Redis sharing them).
    pub query_embedder: ragd_actors::embedder::Batcher,
    /// The embedding model, whose tokenizer tells a question it cannot
    /// read (see `ragd_actors::model::reads_a_word`).
    pub encoder: Arc<ragd_actors::model::AnyEncoder>,
    pub cache: CacheHandle,
    pub dlq: Arc<dyn DeadLetters>,
    pub scanned: Arc<AtomicBool>,
    /// How each source stands (the ingest role's watcher keeps it).
    pub sources: ragd_actors::source_watcher::SourceHealth,
    pub reranker_on: bool,
    /// None: no `[llm]` configured, answers stay null.
    pub llm: Option<Arc<crate::llm::Llm>>,
    pub root: ActorRef<SupervisorMsg>,
    /// Taken by [`Node::shutdown`].
    pub root_done: parking_lot::Mutex<Option<tokio::task::JoinHandle<()>>>,
    pub roles: Roles,
    /// The Kafka bus, when the stages of this cluster talk over it.
    pub kafka: Option<Arc<Kafka>>,
    /// When the index node builds the store's index.
    pub optimizer: Arc<Optimizer>,
    /// The chunks this node's embedder embedded, and those whose vector
    /// it found stored.
    pub chunks: Arc<ragd_actors::embedder::Tally>,
    /// One permit per query being answered (`[query] max_concurrent`).
    pub query_slots: tokio::sync::Semaphore,
    /// Setting the text keys of points written without them (see
    /// `ragd_actors::indexer::model_check`); stopped at shutdown, resumed
    /// at the next start.
    rekeying: Option<tokio::task::JoinHandle<()>>,
    /// Held for the node's life: see [`lock_data_dir`].
    _data_dir_lock: Option<std::fs::File>,
}

/// One ragd per data folder. A second (a `ragd ingest` while the daemon
/// runs, a second `ragd up` on other ports) would write the same store and
/// DLQ log; the store's own lock refused it, but with the engine's words
/// ("Can't init WAL: Kind(WouldBlock)"). The lock is the kernel's (flock),
/// so a process killed with -9 leaves none behind, and the file names the
/// holder's pid. A file system without locks (some network mounts) gets a
/// warning and no lock.
fn lock_data_dir(dir: &std::path::Path) -> anyhow::Result<Option<std::fs::File>> {
    use std::io::{Read, Write};
    let path = dir.join("ragd.lock");
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => {
            let mut holder = String::new();
            let _ = file.read_to_string(&mut holder);
            let holder = match holder.trim() {
                "" => String::new(),
                pid => format!(" (pid {pid})"),
            };
            anyhow::bail!(
                "data_dir {} is in use by another ragd{holder}: one ragd at a time per data \
                 folder (stop the daemon before a one-shot `ragd ingest`, or give this one \
                 another data_dir)",
                dir.display()
            );
        }
        Err(std::fs::TryLockError::Error(e)) => {
            tracing::warn!(
                "cannot lock {}: {e}; nothing stops a second ragd from using this data_dir",
                path.display()
            );
            return Ok(None);
        }
    }
    file.set_len(0)?;
    writeln!(file, "{}", std::process::id())?;
    Ok(Some(file))
}

/// Removes what [`removals_at_start`] finds (old versions a prune left)
/// before the node serves or takes work, and drops them from `stored`;
/// hides the documents whose partition rule changed, and gives them in
/// `stored` a version no file has, so that the scan indexes each anew (or
/// deletes it, gone meanwhile); hides those whose source is no longer
/// configured, for the scan to delete.
async fn remove_at_start(
    config: &Config,
    roles: &Roles,
    store: &dyn VectorStore,
    cache: &CacheHandle,
    stored: &mut Vec<StoredVersion>,
) -> anyhow::Result<()> {
    let sources = &config.sources;
    // On a bus, a document of a source this node does not watch is another
    // ingest node's (an office of its own), not one of a source removed
    // here: not this node's to move or retire. Its stored partition
    // stands (any, for one stored without: left alone either way).
    let mut theirs: HashMap<String, (u64, Partition)> = HashMap::new();
    if matches!(config.bus, Bus::Kafka(_)) {
        for v in stored.iter() {
            if ragd_actors::source_watcher::source_of_doc(sources, &v.doc_id).is_none() {
                let partition = v.partition.clone().unwrap_or_else(Partition::hidden);
                let e = theirs
                    .entry(v.doc_id.clone())
                    .or_insert((v.seq, partition.clone()));
                if v.seq >= e.0 {
                    *e = (v.seq, partition);
                }
            }
        }
    }
    let partition_of =
        |doc_id: &str| match ragd_actors::source_watcher::source_of_doc(sources, doc_id) {
            Some((source, uri)) => Some(source.partition_for(uri)),
            None => theirs.get(doc_id).map(|(_, p)| p.clone()),
        };
    let rules: Option<PartitionOf> = if roles.ingest {
        Some(&partition_of)
    } else {
        None
    };
    let AtStart {
        remove: removals,
        hide,
        hidden,
    } = removals_at_start(stored, roles.index, rules);
    for batch in hide.chunks(PRUNE_BATCH) {
        // No answer citing them is served either way (a hit's partition is
        // checked against the store), but none is kept for nothing.
        cache.invalidate_all(batch).await;
        store
            .hide(batch)
            .await
            .context("hiding at start the documents whose partition rule changed")?;
    }
    let moved: HashSet<&str> = hidden.iter().map(String::as_str).collect();
    let gone = hide
        .iter()
        .filter(|r| !moved.contains(r.doc_id.as_str()))
        .count();
    if gone > 0 {
        tracing::warn!(
            documents = gone,
            "their source is no longer configured: out of every search, deleted by the scan \
             (after the files that moved to another source reuse their vectors)"
        );
    }
    if !hidden.is_empty() {
        tracing::warn!(
            documents = hidden.len(),
            "their partition rule changed: out of every search until the scan indexes them \
             in their new partition (their vectors are reused)"
        );
        // Each is indexed anew, even unchanged (a rule changed and back
        // again gives its stored version): a version no file has.
        for v in stored.iter_mut() {
            if moved.contains(v.doc_id.as_str()) {
                v.version = ragd_actors::indexer::HIDDEN.to_string();
            }
        }
    }
    if removals.is_empty() {
        return Ok(());
    }
    for batch in removals.chunks(PRUNE_BATCH) {
        // As the pruner does: the cache first (owed if it is down; no
        // answer citing what goes here is served either way, since a hit's
        // sources are checked against the store, partition included).
        cache.invalidate_all(batch).await;
        store
            .remove(batch)
            .await
            .context("removing at start the old versions a prune left")?;
    }
    tracing::warn!(
        outdated = removals.len(),
        "removed at start: old versions a prune did not remove"
    );
    let keep: HashMap<&str, &str> = removals
        .iter()
        .filter_map(|r| Some((r.doc_id.as_str(), r.keep.as_deref()?)))
        .collect();
    stored.retain(|v| keep.get(v.doc_id.as_str()).is_none_or(|k| *k == v.version));
    Ok(())
}

/// Tells the index nodes each deletion that settled in this ingest node's
/// ledger (`IndexJob::Forget`), so that they may forget it too. What cannot
/// be told (the broker away past the produce timeout) is only logged: that
/// index node keeps its tombstone, a little memory and no harm.
fn forward_settled_deletions(ledger: &Ledger, out: Port<IndexJob>) {
    // A burst of deletions queues here at most this many names.
    const WAITING: usize = 10_000;
    let mut settled = ledger.settled_deletions(WAITING);
    tokio::spawn(async move {
        let mut ids = Vec::new();
        while settled.recv_many(&mut ids, 256).await > 0 {
            let jobs = ids
                .drain(..)
                .map(|(doc_id, seq)| IndexJob::Forget { doc_id, seq })
                .collect();
            if let Err(e) = out.send_all(jobs).await {
                tracing::warn!("could not tell the index nodes of settled deletions: {e:#}");
            }
        }
    });
}

/// An ingest node's check of the versions the index nodes report written
/// for documents its ledger has as gone, with their deletion ended: the
/// index node lost the tombstone that refuses such a late job (it
/// restarted, or its partition moved, before the job was delivered
/// again), and the watcher deletes the document anew (`WatchMsg::CheckGone`).
struct GoneChecks {
    ledger: Arc<Ledger>,
    /// Before the first scan ends the ledger knows too little to tell:
    /// the documents reported meanwhile that it has as gone then wait
    /// here (up to `early_max` of them), and are checked once it has.
    /// `None` from then on.
    early: parking_lot::Mutex<Option<std::collections::BTreeSet<String>>>,
    early_max: usize,
    /// Hands a document found gone to the watcher.
    tell: Box<dyn Fn(String) + Send + Sync>,
}

impl GoneChecks {
    /// At most this many names wait for the first scan (a few MB): the
    /// index nodes' backlog after a long stop can be every document.
    const EARLY: usize = 50_000;

    /// Checks for the watcher registered as [`WATCHER`].
    fn for_watcher(ledger: Arc<Ledger>, scanned: Arc<AtomicBool>) -> Arc<GoneChecks> {
        Self::start(ledger, scanned, Self::EARLY, |id| {
            if let Some(w) = ActorRef::<WatchMsg>::where_is(WATCHER) {
                let _ = w.cast(WatchMsg::CheckGone(id));
            }
        })
    }

    fn start(
        ledger: Arc<Ledger>,
        scanned: Arc<AtomicBool>,
        early_max: usize,
        tell: impl Fn(String) + Send + Sync + 'static,
    ) -> Arc<GoneChecks> {
        let checks = Arc::new(GoneChecks {
            ledger,
            early: parking_lot::Mutex::new(Some(Default::default())),
            early_max,
            tell: Box::new(tell),
        });
        let c = checks.clone();
        tokio::spawn(async move {
            while !scanned.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            let early = c.early.lock().take().unwrap_or_default();
            for id in early {
                c.check(&id);
            }
        });
        checks
    }

    /// An index node reports `doc_id` indexed.
    fn indexed(&self, doc_id: &str) {
        // (Under the lock: a name taken in after the first scan's
        // names were checked would never be.)
        if let Some(early) = self.early.lock().as_mut() {
            // One the watcher has (the scan admitted it, or found it) needs
            // no check: its deletion, should it come, removes this too.
            // So the names kept are the ones in question, not the scan's.
            if !self.ledger.gone_here(doc_id) || early.contains(doc_id) {
                return;
            }
            if early.len() < self.early_max {
                early.insert(doc_id.to_string());
            } else {
                metrics::counter!("ragd_ingest_gone_checks_dropped_total").increment(1);
            }
            return;
        }
        self.check(doc_id);
    }

    fn check(&self, doc_id: &str) {
        if self.ledger.gone_here(doc_id) {
            (self.tell)(doc_id.to_string());
        }
    }
}

/// A stage's output: the next stage's local queue, or the topic to it.
fn port<T: Job>(kafka: &Option<Arc<Kafka>>, local: &Arc<PoolQueue<T>>, topic: &str) -> Port<T> {
    match kafka {
        None => Port::Local(local.clone()),
        Some(k) => Port::Kafka {
            bus: k.clone(),
            topic: k.topic(topic),
        },
    }
}

fn child<A, F>(name: &str, make: F) -> ChildSpec
where
    A: Actor,
    F: Fn() -> (Option<String>, A, A::Arguments) + Send + Sync + 'static,
{
    let start: StartFn = Arc::new(move |sup: ActorCell| {
        let (name, actor, args) = make();
        Box::pin(async move {
            let (r, _) = Actor::spawn_linked(name, actor, args, sup).await?;
            Ok(r.get_cell())
        })
    });
    ChildSpec {
        name: name.to_string(),
        start,
    }
}

fn supervisor(name: &str, registry: &StatsRegistry, children: Vec<ChildSpec>) -> ChildSpec {
    let path = format!("root/{name}");
    let registry = registry.clone();
    // A restarted stage supervisor starts the same children again.
    child(name, move || {
        (
            None,
            Supervisor,
            SupervisorArgs {
                path: path.clone(),
                children: children.clone(),
                policy: RestartPolicy::default(),
                registry: registry.clone(),
            },
        )
    })
}

fn pool<S: Stage>(
    name: &str,
    stage: Arc<S>,
    queue: Arc<PoolQueue<S::In>>,
    settings: PoolSettings,
    ledger: &Arc<Ledger>,
    dlq: &Arc<dyn DeadLetters>,
) -> ChildSpec {
    let (name_s, ledger, dlq) = (name.to_string(), ledger.clone(), dlq.clone());
    child(name, move || {
        (
            None,
            Pool::<S>::default(),
            PoolArgs {
                name: name_s.clone(),
                stage: stage.clone(),
                queue: queue.clone(),
                settings: settings.clone(),
                ledger: ledger.clone(),
                dlq: dlq.clone(),
            },
        )
    })
}

async fn store_is_empty(store: &dyn VectorStore) -> anyhow::Result<bool> {
    let page = TextPage {
        limit: 1,
        ..Default::default()
    };
    Ok(store.texts(page).await?.0.is_empty())
}

/// [`model_check::check_model`] with this node's model.
async fn check_model(
    store: &dyn VectorStore,
    encoder: &Arc<AnyEncoder>,
    model_id: &str,
) -> anyhow::Result<ModelCheck> {
    let e = encoder.clone();
    let embed = |texts: Vec<String>| async move {
        tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            e.embed(&refs)
        })
        .await?
    };
    model_check::check_model(store, model_id, embed).await
}

/// Refuses a store that holds another model's vectors (see
/// [`model_check::check_model`]): searched with this model it would
/// answer with unrelated text, and written with it, it would mix two
/// models' vectors. What keys it needs set, where it passes.
async fn check_store(
    config: &Config,
    store: &dyn VectorStore,
    encoder: &Arc<AnyEncoder>,
    model_id: &str,
) -> anyhow::Result<Option<Rekey>> {
    match check_model(store, encoder, model_id).await? {
        ModelCheck::Empty => Ok(None),
        ModelCheck::Same { rekey } => Ok(rekey),
        ModelCheck::Other {
            checked,
            agreeing,
            closest,
        } => {
            let (what, rebuild) = match &config.index_backend {
                IndexBackend::Embedded => (
                    format!("the vector store in {}", config.index_dir().display()),
                    format!(
                        "stop ragd, delete {} and start it again (every source is read again; \
                         to go on serving from it meanwhile, build the new index with `ragd \
                         ingest` and a config whose data_dir is another folder, then point \
                         this one there)",
                        config.index_dir().display()
                    ),
                ),
                IndexBackend::Qdrant {
                    url, collection, ..
                } => (
                    format!("the Qdrant collection {collection:?} at {url}"),
                    "delete that collection, or set index.collection to a new name".to_string(),
                ),
            };
            anyhow::bail!(
                "{what} was embedded by another model than {}: of {checked} chunks read, \
                 {agreeing} have the vector this model gives their text (the others' closest \
                 cosine: {closest:.2}). Searched with this model it would answer with unrelated \
                 text. Point model.embedder at the model that built it, or build the index \
                 again with this one: {rebuild}.",
                config.embedder_model.display()
            )
        }
    }
}

/// The embedded store a switch to `index.backend = "qdrant"` left in the
/// data folder, if it holds this model's vectors: the embedder reuses
/// them (see `EmbedderStage::reuse`), so the new collection is filled
/// without embedding again what the old store held. With the keys it
/// needs set, if any (the node sets them: nothing else writes it now).
/// Anything amiss is a warning: it only saves work.
async fn left_behind(
    config: &Config,
    encoder: &Arc<AnyEncoder>,
    model_id: &str,
) -> Option<(Arc<dyn VectorStore>, Option<Rekey>)> {
    let dir = config.index_dir();
    // (Read without creating anything: most nodes have no such folder.)
    if std::fs::read_dir(&dir).map_or(true, |mut d| d.next().is_none()) {
        return None;
    }
    let opened = {
        let (dir, dim, hnsw) = (dir.clone(), encoder.dim(), config.hnsw.clone());
        tokio::task::spawn_blocking(move || EdgeStore::open_with(&dir, dim, &hnsw)).await
    };
    let store: Arc<dyn VectorStore> = match opened {
        Ok(Ok(s)) => Arc::new(s),
        Ok(Err(e)) => {
            tracing::warn!(
                "{} cannot be opened to reuse its vectors: {e:#}",
                dir.display()
            );
            return None;
        }
        Err(e) => {
            tracing::warn!("opening {}: {e}", dir.display());
            return None;
        }
    };
    let rekey = match check_model(store.as_ref(), encoder, model_id).await {
        Ok(ModelCheck::Same { rekey }) => rekey,
        Ok(ModelCheck::Empty) => return None,
        Ok(ModelCheck::Other { .. }) => {
            tracing::warn!(
                "the embedded store left in {} holds another model's vectors: not reused",
                dir.display()
            );
            return None;
        }
        Err(e) => {
            tracing::warn!(
                "{} cannot be read to reuse its vectors: {e:#}",
                dir.display()
            );
            return None;
        }
    };
    tracing::info!(
        "the embedded store in {} (from before index.backend = \"qdrant\") is still there: \
         the texts it holds are not embedded again. Delete it once the collection holds \
         every document",
        dir.display()
    );
    Some((store, rekey))
}

async fn rekey_store(store: Arc<dyn VectorStore>, model_id: String, which: Rekey) {
    let started = std::time::Instant::now();
    tracing::info!(
        ?which,
        "setting the text keys of chunks stored without them (their vectors are then reused; \
         the embedder waits for them)"
    );
    match model_check::rekey(store.as_ref(), &model_id, which).await {
        Ok(n) => tracing::info!(
            chunks = n,
            secs = started.elapsed().as_secs_f64(),
            "text keys set"
        ),
        Err(e) => tracing::warn!("setting text keys stopped (the next start goes on): {e:#}"),
    }
}

impl Node {
    pub async fn start(
        config: Config,
        mode: Mode,
        only: Vec<std::path::PathBuf>,
    ) -> anyhow::Result<Node> {
        for w in &config.warnings {
            tracing::warn!("{w}");
        }
        std::fs::create_dir_all(&config.data_dir)
            .with_context(|| format!("creating data folder {}", config.data_dir.display()))?;
        let data_dir_lock = lock_data_dir(&config.data_dir)?;
        let policy = BatchPolicy {
            max_tokens: config.batch_max_tokens,
            max_batch: config.batch_max_size,
        };
        if config.device != Device::Cpu {
            ragd_actors::model::use_kernel_cache(&config.kernel_cache_dir())?;
        }
        let (dir, device, p2) = (config.embedder_model.clone(), config.device, policy.clone());
        let encoder =
            tokio::task::spawn_blocking(move || AnyEncoder::load(&dir, p2, device)).await??;
        let encoder = Arc::new(encoder);
        tracing::info!(model = %config.embedder_model.display(), dim = encoder.dim(), "embedding model loaded");
        // Only a query node reranks: a node of the other roles would hold
        // the weights (and on a GPU, warm up its kernels) for nothing.
        let reranks = mode == Mode::Daemon && config.roles.query;
        let reranker_model = match (&config.reranker_model, reranks) {
            (Some(dir), true) => {
                let (dir, device) = (dir.clone(), config.device);
                let m = tokio::task::spawn_blocking(move || {
                    AnyCrossEncoder::load(&dir, policy, device)
                })
                .await??;
                tracing::info!("reranker on");
                Some(Arc::new(m))
            }
            (None, true) => {
                tracing::warn!("reranker off: no [reranker] model configured; query results keep the vector order");
                None
            }
            (_, false) => None,
        };
        // The reranker's weights by their contents, for the shared cache's
        // keys (see `Config::answers_id`); only a query node stores answers.
        let reranker_id = match (&config.reranker_model, &config.cache_backend) {
            (Some(dir), CacheBackend::Redis { .. }) if reranks => {
                let dir = dir.clone();
                Some(
                    tokio::task::spawn_blocking(move || ragd_actors::model::fingerprint(&dir))
                        .await??,
                )
            }
            _ => None,
        };
        if config.device != Device::Cpu && (config.roles.embed || config.roles.query) {
            // Compile and tune every batch shape's kernels before the node
            // takes work: otherwise each new shape stalls its first query
            // or batch for as long as compiling and tuning takes (minutes on
            // a cold H200). With the kernel cache this is quick after the
            // first start.
            let (e, r) = (encoder.clone(), reranker_model.clone());
            tokio::task::spawn_blocking(move || {
                e.warm_up().context("warming up the embedding model")?;
                if let Some(r) = r {
                    r.warm_up().context("warming up the reranker")?;
                }
                anyhow::Ok(())
            })
            .await??;
        }
        let store: Arc<dyn VectorStore> = match &config.index_backend {
            IndexBackend::Embedded => {
                let (dir, dim, hnsw) = (config.index_dir(), encoder.dim(), config.hnsw.clone());
                let s = tokio::task::spawn_blocking(move || EdgeStore::open_with(&dir, dim, &hnsw))
                    .await?
                    .with_context(|| {
                        "opening the vector store (is another ragd using the same data_dir?)"
                            .to_string()
                    })?;
                s.set_min_free(config.min_free_bytes);
                Arc::new(s)
            }
            IndexBackend::Qdrant {
                url,
                collection,
                api_key,
                shard_number,
                replication_factor,
                timeout,
                max_retries,
            } => Arc::new(
                QdrantStore::open(QdrantSettings {
                    url: url.clone(),
                    collection: collection.clone(),
                    api_key: api_key.as_ref().map(|k| k.0.clone()),
                    dim: encoder.dim(),
                    shard_number: *shard_number,
                    replication_factor: *replication_factor,
                    timeout: *timeout,
                    max_retries: *max_retries,
                    hnsw: config.hnsw.clone(),
                })
                .await
                .context("index.backend = \"qdrant\"")?,
            ),
        };
        let roles = config.roles;
        let kafka = match &config.bus {
            Bus::Local => None,
            Bus::Kafka(settings) => Some(
                Kafka::connect(settings.clone())
                    .await
                    .context("bus.backend = \"kafka\"")?,
            ),
        };
        // A node with the index role on a bus learns versions from the
        // jobs (`observe`), and forgets a deletion only once the ingest
        // node that admitted it says nothing older is on its way. (With
        // the ingest role too, its own watcher's deletions end in its own
        // ledger: only the others' wait.)
        let held = kafka.is_some() && roles.index;
        let ledger = Ledger::with_limits(
            config.max_in_flight,
            config.max_in_flight_bytes,
            config.forget_deleted_after,
            held,
        );
        let dlq: Arc<dyn DeadLetters> = match &kafka {
            None => Arc::new(FileDlq::open(config.dlq_path())?),
            Some(k) => {
                // Documents dead-lettered on any node close in this node's
                // ledger (only an ingest node has them open).
                let (k, l) = (k.clone(), ledger.clone());
                tokio::task::spawn_blocking(move || {
                    KafkaDlq::open(k, move |e| {
                        l.finish(
                            &e.doc_id,
                            e.version.as_deref(),
                            Outcome::DeadLettered(format!("{}: {}", e.stage, e.error)),
                        )
                    })
                })
                .await??
            }
        };
        let registry = StatsRegistry::default();
        registry.entry("root");
        // Names the embedding model by its files: in the Redis cache's keys
        // and in the text keys of the chunks (see `embedder::text_key`),
        // which the embedder makes, a node that searches or writes a store
        // checks it by (`check_store`; an empty one needs no check), and a
        // cluster's index node checks its jobs by. It reads all the
        // weights, so a node that does none of these does not.
        let redis = matches!(config.cache_backend, CacheBackend::Redis { .. });
        let reads_store = (roles.index || roles.query) && !store_is_empty(store.as_ref()).await?;
        let checks_jobs = roles.index && matches!(config.bus, Bus::Kafka(_));
        let model_id = if config.roles.embed || redis || reads_store || checks_jobs {
            let dir = config.embedder_model.clone();
            tokio::task::spawn_blocking(move || ragd_actors::model::fingerprint(&dir)).await??
        } else {
            String::new()
        };
        let rekey = if reads_store {
            check_store(&config, store.as_ref(), &encoder, &model_id).await?
        } else {
            None
        };
        // The stores whose text keys to set: this node's (only the index
        // role writes it), and one a switch to Qdrant left behind.
        let mut rekeys: Vec<(Arc<dyn VectorStore>, Rekey)> = (rekey.filter(|_| roles.index))
            .map(|which| (store.clone(), which))
            .into_iter()
            .collect();
        let left_behind = match &config.index_backend {
            IndexBackend::Qdrant { .. } if roles.embed => {
                left_behind(&config, &encoder, &model_id).await
            }
            _ => None,
        };
        let left_behind = left_behind.map(|(old, rekey)| {
            rekeys.extend(rekey.map(|which| (old.clone(), which)));
            old
        });
        // A one-shot ingest sets the keys before it reads the sources, so
        // that what it ingests finds them; the daemon does it beside its
        // work, not to hold up its start, and its embedder looks up stored
        // vectors only once they are set (see `EmbedderStage::keys_ready`).
        if mode == Mode::Ingest {
            for (s, which) in rekeys.drain(..) {
                rekey_store(s, model_id.clone(), which).await;
            }
        }
        let (keys_set, keys_ready) = tokio::sync::watch::channel(false);
        let cache_backend: Arc<dyn SemanticCache> = match &config.cache_backend {
            CacheBackend::Embedded => Arc::new(EmbeddedCache::new(
                config.cache_threshold,
                config.cache_capacity,
                Duration::from_secs(config.cache_ttl_secs),
            )),
            CacheBackend::Redis {
                url,
                index,
                prefix,
                timeout,
            } => Arc::new(
                RedisCache::connect(RedisSettings {
                    url: url.0.clone(),
                    index: index.clone(),
                    prefix: prefix.clone(),
                    model: format!("{model_id}/{}", config.answers_id(reranker_id.as_deref())),
                    dim: encoder.dim(),
                    threshold: config.cache_threshold,
                    ttl: Duration::from_secs(config.cache_ttl_secs),
                    timeout: *timeout,
                })
                .await
                .context("cache.backend = \"redis\"")?,
            ),
        };
        let cache = CacheHandle::new(CACHE_GUARD, cache_backend.clone());

        // Only the stages of this node's roles show in /actors.
        let stats = |on: bool, path: &str| {
            if on {
                registry.entry(path)
            } else {
                Arc::new(ActorStats::default())
            }
        };
        let chunk_q: Arc<PoolQueue<DocMeta>> =
            PoolQueue::new(stats(roles.ingest, "root/ingest/chunker"));
        let embed_q: Arc<PoolQueue<ChunkedDoc>> =
            PoolQueue::new(stats(roles.embed, "root/embed/embedder"));
        let index_q: Arc<PoolQueue<IndexJob>> =
            PoolQueue::new(stats(roles.index, "root/index/indexer"));
        let prune_q: Arc<PoolQueue<IndexedEvent>> = PoolQueue::new(stats(
            roles.index && kafka.is_none(),
            "root/index/version_pruner",
        ));

        // A node with the index role on a bus learns versions from the
        // jobs (`observe`); after a restart it must still refuse an older
        // version that is redelivered late, so it starts from what the
        // store holds. (With the ingest role too: its watcher's scan finds
        // a file unchanged without knowing the version's seq, which is
        // what tells a late job from a current one.)
        let mut stored = if roles.ingest || roles.index {
            store.indexed_versions().await?
        } else {
            Vec::new()
        };
        remove_at_start(&config, &roles, store.as_ref(), &cache, &mut stored).await?;
        // Oldest first, so a document caught mid-prune maps to its newest.
        stored.sort_by_key(|v| v.seq);
        if held {
            ledger.seed(&stored);
        }
        let known: BTreeMap<String, String> = if roles.ingest {
            // On a bus, only this node's sources' documents: the others
            // are other ingest nodes' (see `remove_at_start`), which its
            // scan would take as deleted.
            let bus = matches!(config.bus, Bus::Kafka(_));
            let ours = |id: &str| {
                !bus || ragd_actors::source_watcher::source_of_doc(&config.sources, id).is_some()
            };
            (stored.into_iter())
                .filter(|v| ours(&v.doc_id))
                .map(|v| (v.doc_id, v.version))
                .collect()
        } else {
            BTreeMap::new()
        };
        tracing::info!(
            documents = known.len(),
            backend = store.backend(),
            roles = ?roles.names(),
            "vector store opened"
        );
        let known = Arc::new(parking_lot::Mutex::new(known));
        // A node without a watcher has no first scan to wait for.
        let scanned = Arc::new(AtomicBool::new(!roles.ingest));
        let sources = ragd_actors::source_watcher::SourceHealth::default();

        if roles.ingest {
            tracing::info!(
                min = config.chunker_min_workers,
                max = config.chunker_max_workers,
                "chunker pool: parser workers grow from min to max while files wait"
            );
        }
        let settings = |min: usize, max: usize| PoolSettings {
            min,
            max,
            max_attempts: config.max_attempts,
            retry_base: config.retry_base,
            retry_cap: config.retry_cap,
            ..Default::default()
        };
        let tokenizer = encoder.tokenizer().clone();
        let chunker = Arc::new(Chunker::new(
            tokenizer,
            ChunkerSettings {
                max_tokens: config.chunk_max_tokens,
                overlap_tokens: config.chunk_overlap_tokens,
                // This executable, run as a child per PDF (see pdf.rs):
                // a hostile PDF takes down the child, not the node.
                pdf: ragd_actors::chunker::pdf::PdfParser::isolated(
                    config.pdf_memory_bytes,
                    config.max_file_bytes,
                ),
            },
        )?);

        let chunking: Arc<str> = chunker.fingerprint().into();
        let watcher = {
            let (specs, health, ledger, dlq, chunk_port, delete_port, known, scanned) = (
                config.sources.clone(),
                sources.clone(),
                ledger.clone(),
                dlq.clone(),
                // Always this node's own chunker, on a cluster too: the
                // chunker reads the file at the path this node's watcher
                // saw, which another ingest node may not have (an office
                // of its own), and its ledger is the one that admitted it.
                Port::Local(chunk_q.clone()),
                // Deletions skip chunking and embedding.
                port(&kafka, &index_q, EMBEDDED),
                known.clone(),
                scanned.clone(),
            );
            let others_sources = kafka.is_some();
            let (max_file_bytes, debounce, delete_grace, max_write_wait) = (
                config.max_file_bytes,
                Duration::from_millis(config.debounce_ms),
                config.delete_grace,
                config.max_write_wait,
            );
            let stats = stats(roles.ingest, &format!("root/ingest/{WATCHER}"));
            child(WATCHER, move || {
                (
                    Some(WATCHER.to_string()),
                    SourceWatcher,
                    WatcherArgs {
                        sources: specs.clone(),
                        chunking: chunking.clone(),
                        ledger: ledger.clone(),
                        dlq: dlq.clone(),
                        chunk_q: chunk_port.clone(),
                        index_q: delete_port.clone(),
                        known: known.clone(),
                        max_file_bytes,
                        watch: mode == Mode::Daemon,
                        debounce,
                        stats: stats.clone(),
                        scanned: scanned.clone(),
                        only: only.clone(),
                        retry: Default::default(),
                        delete_grace,
                        hang_after: ragd_actors::source_watcher::HANG_AFTER,
                        health: health.clone(),
                        max_write_wait,
                        being_written: Default::default(),
                        others_sources,
                    },
                )
            })
        };
        let chunker_pool = pool(
            "chunker",
            Arc::new(ChunkerStage {
                chunker,
                ledger: ledger.clone(),
                out: port(&kafka, &embed_q, CHUNKS),
                deletes: port(&kafka, &index_q, EMBEDDED),
                max_file_bytes: config.max_file_bytes,
                hang_after: ragd_actors::source_watcher::HANG_AFTER,
            }),
            chunk_q.clone(),
            settings(config.chunker_min_workers, config.chunker_max_workers),
            &ledger,
            &dlq,
        );
        let chunks = Arc::new(ragd_actors::embedder::Tally::default());
        // The pruner keeps what it deletes whole for the embedder: both in
        // this process, or neither.
        let deleted = (roles.embed && roles.index && config.deleted_vectors_bytes > 0).then(|| {
            Arc::new(ragd_actors::embedder::deleted::DeletedVectors::new(
                config.deleted_vectors_bytes,
            ))
        });
        let embedder_pool = pool(
            "embedder",
            Arc::new(EmbedderStage {
                batcher: ragd_actors::embedder::Batcher::start(
                    "ragd-embedder",
                    encoder.clone(),
                    ragd_actors::embedder::call_texts(config.device, config.batch_max_size),
                ),
                out: port(&kafka, &index_q, EMBEDDED),
                batch_docs: config.batch_max_size,
                model_id: model_id.clone(),
                ledger: kafka.is_none().then(|| ledger.clone()),
                // The store the index nodes write: this node's own, or a
                // Qdrant server every node shares. (A cluster node of the
                // embed role alone has an embedded store of its own, which
                // nothing writes.)
                reuse: (roles.index || matches!(config.index_backend, IndexBackend::Qdrant { .. }))
                    .then(|| store.clone())
                    .into_iter()
                    .chain(left_behind)
                    .collect(),
                tally: chunks.clone(),
                keys_ready: (!rekeys.is_empty()).then_some(keys_ready),
                deleted: deleted.clone(),
            }),
            embed_q.clone(),
            settings(config.embedder_min_workers, config.embedder_max_workers),
            &ledger,
            &dlq,
        );
        let optimizer = Optimizer::new(
            store.clone(),
            OptimizePolicy {
                idle: config.optimize_idle,
                every: config.optimize_every,
            },
        );
        optimizer.watch_for_pauses();
        let pruner = Arc::new(ragd_actors::version_pruner::VersionPrunerStage {
            store: store.clone(),
            ledger: ledger.clone(),
            cache: cache.clone(),
            deleted,
        });
        let indexer_pool = pool(
            "indexer",
            Arc::new(IndexerStage {
                store: store.clone(),
                ledger: ledger.clone(),
                out: port(&kafka, &prune_q, INDEXED),
                observe: kafka.is_some(),
                optimizer: optimizer.clone(),
                prune: kafka.is_some().then(|| pruner.clone()),
                // On one node the embedder is this node's: nothing to check.
                model_id: kafka.is_some().then(|| model_id.clone()),
                cache: cache.clone(),
            }),
            index_q.clone(),
            settings(1, 1),
            &ledger,
            &dlq,
        );
        let pruner_pool = kafka.is_none().then(|| {
            pool(
                "version_pruner",
                pruner,
                prune_q.clone(),
                settings(1, 1),
                &ledger,
                &dlq,
            )
        });
        let mut groups = Vec::new();
        if roles.ingest {
            groups.push(supervisor("ingest", &registry, vec![watcher, chunker_pool]));
        }
        if roles.embed {
            groups.push(supervisor("embed", &registry, vec![embedder_pool]));
        }
        if roles.index {
            let children = std::iter::once(indexer_pool).chain(pruner_pool).collect();
            groups.push(supervisor("index", &registry, children));
        }
        if mode == Mode::Daemon && roles.query {
            let reranker = {
                let (model, stats) = (
                    reranker_model.clone(),
                    registry.entry(&format!("root/query/{RERANKER}")),
                );
                // Outlives the reranker's restarts: the cost measured so far
                // keeps steering the depth.
                let cost = Arc::new(PairCost::default());
                child(RERANKER, move || {
                    (
                        Some(RERANKER.to_string()),
                        Reranker,
                        RerankerArgs {
                            model: model.clone(),
                            cost: cost.clone(),
                            stats: stats.clone(),
                        },
                    )
                })
            };
            let cache_guard = {
                let (backend, store, stats) = (
                    cache_backend.clone(),
                    store.clone(),
                    registry.entry(&format!("root/query/{CACHE_GUARD}")),
                );
                child(CACHE_GUARD, move || {
                    (
                        Some(CACHE_GUARD.to_string()),
                        CacheGuard,
                        CacheGuardArgs {
                            cache: backend.clone(),
                            store: store.clone(),
                            stats: stats.clone(),
                        },
                    )
                })
            };
            groups.push(supervisor("query", &registry, vec![cache_guard, reranker]));
        }
        let llm = match &config.llm {
            Some(c) => {
                tracing::info!(model = %c.model, endpoint = %c.base_url, "LLM answers on");
                Some(crate::llm::Llm::new(c.clone())?)
            }
            None => {
                tracing::info!("no [llm] configured: queries return sources, answer is null");
                None
            }
        };
        let (root, root_done) = Actor::spawn(
            Some("root".into()),
            Supervisor,
            SupervisorArgs {
                path: "root".into(),
                children: groups,
                policy: RestartPolicy::default(),
                registry: registry.clone(),
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("starting the supervision tree: {e}"))?;
        if let Some(k) = &kafka {
            // Inputs from the bus, one consumer group per role: nodes of the
            // same role share the partitions.
            if roles.ingest {
                let l = ledger.clone();
                let gone = GoneChecks::for_watcher(ledger.clone(), scanned.clone());
                let group = k.group(&format!("ledger-{}", config.node_name));
                k.follow::<IndexedEvent, _>(&k.topic(INDEXED), &group, move |ev| {
                    l.finish(ev.doc_id(), ev.version(), ev.outcome());
                    if let IndexedEvent::Indexed { doc_id, .. } = &ev {
                        gone.indexed(doc_id);
                    }
                })?;
                forward_settled_deletions(&ledger, port(&kafka, &index_q, EMBEDDED));
            }
            if roles.embed {
                k.consume(
                    &k.topic(CHUNKS),
                    &k.group("embed"),
                    embed_q.clone(),
                    dlq.clone(),
                )?;
            }
            if roles.index {
                k.consume(
                    &k.topic(EMBEDDED),
                    &k.group("index"),
                    index_q.clone(),
                    dlq.clone(),
                )?;
            }
        }
        let query_embedder =
            ragd_actors::embedder::Batcher::start("ragd-query-embed", encoder.clone(), 64);
        let rekeying = (!rekeys.is_empty()).then(|| {
            tokio::spawn(async move {
                for (s, which) in rekeys {
                    rekey_store(s, model_id.clone(), which).await;
                }
                // Set or not (a failure is logged): the lookups go on.
                let _ = keys_set.send(true);
            })
        });
        Ok(Node {
            rekeying,
            query_slots: tokio::sync::Semaphore::new(config.max_concurrent_queries),
            _data_dir_lock: data_dir_lock,
            config,
            ledger,
            registry,
            store,
            query_embedder,
            encoder,
            roles,
            kafka,
            cache,
            dlq,
            scanned,
            sources,
            reranker_on: reranker_model.is_some(),
            llm,
            root,
            root_done: parking_lot::Mutex::new(Some(root_done)),
            optimizer,
            chunks,
        })
    }

    pub fn reranker(&self) -> Option<ActorRef<RerankMsg>> {
        ActorRef::where_is(RERANKER)
    }

    pub fn watcher(&self) -> Option<ActorRef<WatchMsg>> {
        ActorRef::where_is(WATCHER)
    }

    /// Every document the first scan found has reached an end.
    pub fn settled(&self) -> bool {
        self.scanned.load(std::sync::atomic::Ordering::SeqCst)
            && self.ledger.counts().in_flight == 0
    }

    /// Stops taking new work, lets in-flight documents finish (up to
    /// `grace`), then stops every actor. Anything unfinished is picked up by
    /// the next start's scan.
    /// (By reference: an HTTP handler still under way holds the node too,
    /// and must not keep it from stopping; it gets errors as the actors
    /// go.)
    pub async fn shutdown(&self, grace: Duration) {
        // First: an embedder waiting for the keys (see
        // `EmbedderStage::keys_ready`) then goes on, and the grace is the
        // documents' to finish in, not the rekey's. (It resumes at the
        // next start.)
        if let Some(r) = &self.rekeying {
            r.abort();
        }
        // A build started now could not finish, and the final flush would
        // wait for it.
        self.optimizer.stop();
        if let Some(w) = self.watcher() {
            w.stop(Some(ragd_actors::supervisor::RETIRE.into()));
        }
        let deadline = tokio::time::Instant::now() + grace;
        if tokio::time::timeout(grace, self.ledger.wait_settled())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.ledger.counts().in_flight,
                "shutdown grace period over; unfinished documents resume at next start"
            );
        }
        if let Some(k) = &self.kafka {
            // What is left of the grace, but a moment at least: a worker
            // node has nothing to settle and gets it all.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            k.drain(left.max(Duration::from_secs(1))).await;
        }
        let _ = self.root.cast(SupervisorMsg::Shutdown);
        let root_done = self.root_done.lock().take();
        if let Some(done) = root_done {
            let _ = tokio::time::timeout(Duration::from_secs(30), done).await;
        }
        // The flush waits for a running index optimisation, which cannot be
        // cancelled and may take minutes: bounded, so a stop stays a stop.
        match tokio::time::timeout(Duration::from_secs(30), self.store.flush()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("final flush of the vector store failed: {e:#}"),
            Err(_) => tracing::warn!(
                "final flush still waiting for an index optimisation after 30 s; \
                 stopping without it (the next start's scan redoes the unflushed writes)"
            ),
        }
        // (Whether the flush made it is said above.)
        tracing::info!("shut down: actors stopped, the final flush done or given up");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;

    /// The `Indexed` events heard before the first scan ends wait for it
    /// (up to a bound): a late version written while the node was down is
    /// delivered at its start, often before its watcher knows the source.
    #[tokio::test]
    async fn gone_checks_wait_for_the_first_scan() {
        let ledger = Ledger::new(8);
        let scanned = Arc::new(AtomicBool::new(false));
        let told = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let t = told.clone();
        let checks = GoneChecks::start(ledger.clone(), scanned.clone(), 2, move |id| {
            t.lock().push(id)
        });
        // Heard before the scan: "kb:gone.md" the scan does not find; the
        // scan admits "kb:here.md" (after its event) and "kb:busy.md"
        // (before: it takes no room); "kb:third.md" is past the bound.
        assert!(ledger.admit("kb:busy.md", Some("v1")).await);
        for id in [
            "kb:busy.md",
            "kb:gone.md",
            "kb:here.md",
            "kb:gone.md",
            "kb:third.md",
        ] {
            checks.indexed(id);
        }
        assert!(ledger.admit("kb:here.md", Some("v1")).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(told.lock().is_empty(), "checked before the scan ended");
        scanned.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while told.lock().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(*told.lock(), ["kb:gone.md"]);
        // From then on each is checked as it comes.
        checks.indexed("kb:here.md");
        checks.indexed("kb:later.md");
        assert_eq!(*told.lock(), ["kb:gone.md", "kb:later.md"]);
    }
}
