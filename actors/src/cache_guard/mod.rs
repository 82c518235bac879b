//! CacheGuard: the semantic cache in front of the query path.
//!
//! A question whose vector is within `threshold` cosine of an earlier one,
//! asked with the same scope and top_k, gets the earlier response. An entry
//! is served only when the principal may see every chunk it cites and the
//! store still holds each of them, in the partition the entry names.
//!
//! So the cache is never what keeps old text out of answers: the check
//! against the store is. Nor does it keep new text out: each partition has
//! a generation, moved on by the Indexer after every write to it (see
//! [`SemanticCache::indexed`]). A lookup reads the generations of its
//! scope's partitions (its [`AsOf`]) before the query searches, the answer
//! is stored with them, and it is served only while they stand: a document
//! indexed since the question was first answered is in the next answer,
//! not missing from a cached one for the TTL.
//!
//! Invalidation (the VersionPruner drops the entries citing what it
//! removed) keeps the cache useful, and when the cache cannot take it
//! (Redis down) it is owed and sent again in the background, while
//! pruning goes on: a cache outage never holds up the pipeline. So is a
//! write's generation.

pub mod embedded;
pub mod redis;

#[cfg(test)]
pub(crate) mod test_support {
    use crate::indexer::{Hit, Removal, Scope};

    pub fn hit(doc: &str, version: &str, division: &str) -> Hit {
        Hit {
            doc_id: doc.into(),
            uri: doc.into(),
            version: version.into(),
            division: division.into(),
            access_level: "internal".into(),
            chunk_index: 0,
            text: "t".into(),
            score: 1.0,
        }
    }

    /// The cases both caches' batch tests run: answers citing a@v1, b@v1,
    /// c@v1 and a@v2 + d@v1, then this batch, which drops the first two.
    pub fn a_batch() -> [Removal; 3] {
        [
            Removal::new("a", Some("v2")),
            Removal::new("b", None),
            Removal::new("never-cached", None),
        ]
    }

    /// One document twice in a batch: what either removal removes goes
    /// (the answer citing d@v1).
    pub fn one_document_twice() -> [Removal; 2] {
        [Removal::new("d", Some("v1")), Removal::new("d", Some("v2"))]
    }

    pub fn scope(divs: &[&str]) -> Scope {
        Scope {
            divisions: divs.iter().map(|d| d.to_string()).collect(),
            access_levels: vec!["internal".into()],
        }
    }
}

use crate::indexer::{Hit, Removal, Scope, VectorStore};
use crate::messages::Partition;
use crate::stats::ActorStats;
use async_trait::async_trait;
use backon::{ExponentialBuilder, Retryable};
use parking_lot::Mutex;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub answer: Option<String>,
    pub sources: Vec<Hit>,
}

/// The generations of a scope's partitions when a lookup read them (see
/// the module's notes): an answer is stored with the `AsOf` its query's
/// lookup got, and refused if any moved on since. Opaque; the default is
/// "before anything was indexed".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AsOf(pub(crate) String);

impl AsOf {
    /// From each partition's generation, in the scope's canonical order
    /// ([`scope_partitions`]); a partition never indexed reads as None.
    pub(crate) fn from_generations<T: std::fmt::Display>(
        generations: impl IntoIterator<Item = Option<T>>,
    ) -> AsOf {
        let mut s = String::new();
        for (i, g) in generations.into_iter().enumerate() {
            if let Some(g) = g {
                if !s.is_empty() {
                    s.push(',');
                }
                s.push_str(&format!("{i}={g}"));
            }
        }
        AsOf(s)
    }
}

/// Every partition a scope sees, in a canonical order (its divisions by
/// its access levels, each sorted).
pub fn scope_partitions(scope: &Scope) -> Vec<Partition> {
    let s = scope.clone().canonical();
    let mut out = Vec::with_capacity(s.divisions.len() * s.access_levels.len());
    for division in &s.divisions {
        for access_level in &s.access_levels {
            out.push(Partition {
                division: division.clone(),
                access_level: access_level.clone(),
            });
        }
    }
    out
}

/// What a lookup found, and as of when: what the query's answer is stored
/// with; None when the cache could not tell (down, or bypassed after a
/// failure), and then the answer is not stored.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Probe {
    pub found: Option<CachedAnswer>,
    pub as_of: Option<AsOf>,
}

#[async_trait]
pub trait SemanticCache: Send + Sync {
    fn backend(&self) -> &'static str;
    /// The nearest entry within the threshold, asked with this scope and
    /// top_k, that no write to the scope's partitions has made stale; and
    /// the scope's [`AsOf`], read before the entries.
    async fn probe(&self, vector: &[f32], scope: &Scope, top_k: usize) -> anyhow::Result<Probe>;
    /// [`SemanticCache::probe`]'s entry alone.
    async fn lookup(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
    ) -> anyhow::Result<Option<CachedAnswer>> {
        Ok(self.probe(vector, scope, top_k).await?.found)
    }
    /// The scope's [`AsOf`] now.
    async fn as_of(&self, scope: &Scope) -> anyhow::Result<AsOf>;
    /// Stores the answer unless a partition of the scope was written to
    /// since `as_of` was read (or a version it cites was pruned): checked
    /// and written as one step, so neither can slip in between.
    async fn store(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
        value: CachedAnswer,
        as_of: &AsOf,
    ) -> anyhow::Result<()>;
    /// New text is in these partitions (the Indexer wrote to them): every
    /// answer for a scope that sees one of them is stale from now on,
    /// whether cached already or still being computed.
    async fn indexed(&self, partitions: &[Partition]) -> anyhow::Result<()>;
    /// Drops entries citing `doc_id` at any version other than `keep`.
    async fn invalidate(&self, doc_id: &str, keep: Option<&str>) -> anyhow::Result<usize>;
    /// [`SemanticCache::invalidate`] for each removal (the VersionPruner's
    /// batches), in as few steps as the backend can.
    async fn invalidate_all(&self, removals: &[Removal]) -> anyhow::Result<usize> {
        let mut n = 0;
        for r in removals {
            n += self.invalidate(&r.doc_id, r.keep.as_deref()).await?;
        }
        Ok(n)
    }
    /// Drops the entries citing any of these (document, version) pairs and
    /// leaves no tombstone: for versions already gone from the store (see
    /// `drop_stale`), where an entry stored later citing one is caught on
    /// its first hit the same way, and the document's other versions are
    /// none of this call's business.
    async fn drop_citing(&self, cited: &[(String, String)]) -> anyhow::Result<usize>;
}

/// Is every cited chunk visible inside `scope`? Checked on every hit, so a
/// bug in scoping can never leak a chunk across partitions.
pub fn visible(value: &CachedAnswer, scope: &Scope) -> bool {
    value
        .sources
        .iter()
        .all(|h| scope.allows(&h.division, &h.access_level))
}

pub enum CacheMsg {
    Lookup {
        vector: Vec<f32>,
        scope: Scope,
        top_k: usize,
        reply: RpcReplyPort<Probe>,
    },
    Store {
        vector: Vec<f32>,
        scope: Scope,
        top_k: usize,
        value: CachedAnswer,
        as_of: AsOf,
    },
}

pub struct CacheGuard;

/// Stores under way at once; past it a store is dropped (an answer not
/// cached is only computed again).
pub const MAX_STORES: usize = 32;

pub struct CacheGuardState {
    args: CacheGuardArgs,
    stores: Arc<tokio::sync::Semaphore>,
}

pub struct CacheGuardArgs {
    pub cache: Arc<dyn SemanticCache>,
    /// What a hit's sources are checked against.
    pub store: Arc<dyn VectorStore>,
    pub stats: Arc<ActorStats>,
}

impl Actor for CacheGuard {
    type Msg = CacheMsg;
    type State = CacheGuardState;
    type Arguments = CacheGuardArgs;

    async fn pre_start(
        &self,
        _: ActorRef<CacheMsg>,
        args: CacheGuardArgs,
    ) -> Result<CacheGuardState, ActorProcessingErr> {
        args.stats.set_status("running");
        args.stats
            .set_note(format!("backend: {}", args.cache.backend()));
        Ok(CacheGuardState {
            args,
            stores: Arc::new(tokio::sync::Semaphore::new(MAX_STORES)),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<CacheMsg>,
        msg: CacheMsg,
        state: &mut CacheGuardState,
    ) -> Result<(), ActorProcessingErr> {
        let st = &state.args;
        match msg {
            CacheMsg::Lookup {
                vector,
                scope,
                top_k,
                reply,
            } => {
                // Lookups run concurrently: a Redis round trip must not queue
                // every other question behind it. Their number is bounded by
                // the queries in flight, each of which waits for its reply.
                let (cache, store) = (st.cache.clone(), st.store.clone());
                let stats = st.stats.clone();
                tokio::spawn(async move {
                    let (found, as_of) = match cache.probe(&vector, &scope, top_k).await {
                        Ok(p) => (p.found.filter(|v| visible(v, &scope)), p.as_of),
                        Err(e) => {
                            // A broken cache is a miss, never a failed query.
                            stats.set_error(format!("lookup: {e:#}"));
                            (None, None)
                        }
                    };
                    let (found, result, stale) = match found {
                        None => (None, "miss", None),
                        Some(v) => match store.holds_all(&v.sources).await {
                            Ok(true) => (Some(v), "hit", None),
                            // It cites text pruned or moved since, and its
                            // invalidation is owed or was lost.
                            Ok(false) => (None, "stale", Some(v)),
                            Err(e) => {
                                stats.set_error(format!("checking a hit's sources: {e:#}"));
                                (None, "miss", None)
                            }
                        },
                    };
                    metrics::counter!("ragd_cache_lookups_total", "result" => result).increment(1);
                    stats.processed();
                    let _ = reply.send(Probe { found, as_of });
                    if let Some(v) = stale {
                        drop_stale(&v, cache.as_ref(), store.as_ref(), &stats).await;
                    }
                });
            }
            CacheMsg::Store {
                vector,
                scope,
                top_k,
                value,
                as_of,
            } => {
                // Off the actor too: a slow cache (answering, so no
                // breaker opens) would otherwise hold every lookup behind
                // the stores in the mailbox, past the lookups' timeout.
                // The backends order a store against an invalidation
                // themselves (see their `store`).
                let Ok(slot) = state.stores.clone().try_acquire_owned() else {
                    metrics::counter!("ragd_cache_stores_dropped_total").increment(1);
                    return Ok(());
                };
                let (cache, stats) = (st.cache.clone(), st.stats.clone());
                tokio::spawn(async move {
                    if let Err(e) = cache.store(&vector, &scope, top_k, value, &as_of).await {
                        stats.set_error(format!("store: {e:#}"));
                    }
                    stats.processed();
                    drop(slot);
                });
            }
        }
        Ok(())
    }
}

/// Drops a stale entry from the cache (its invalidation was lost: dropped
/// while owed past [`MAX_OWED`], or owed by a node that stopped), so that
/// the questions near it miss at once rather than each checking it
/// against the store until its TTL. Only what cites the versions it cites
/// that the store no longer holds goes, with no tombstone: answers citing
/// those documents' current versions stay cached and are cached as usual.
async fn drop_stale(
    value: &CachedAnswer,
    cache: &dyn SemanticCache,
    store: &dyn VectorStore,
    stats: &ActorStats,
) {
    let gone = gone_versions(value, |hit: Hit| async move {
        store.holds_all(std::slice::from_ref(&hit)).await
    })
    .await;
    let gone = match gone {
        Ok(gone) if gone.is_empty() => return,
        Ok(gone) => gone,
        Err(e) => {
            // Not taken for "gone": that would drop entries whenever the
            // store hiccups. It stays, and its next hit checks again.
            stats.set_error(format!("checking a stale entry's sources: {e:#}"));
            return;
        }
    };
    if let Err(e) = cache.drop_citing(&gone).await {
        // (It stays until its TTL, never served.)
        stats.set_error(format!("dropping a stale entry: {e:#}"));
    }
}

/// The (document, version) pairs `value` cites that the store no longer
/// holds, each once, by `holds`; an error if the store could not tell for
/// one of them.
async fn gone_versions<F, Fut>(
    value: &CachedAnswer,
    holds: F,
) -> anyhow::Result<Vec<(String, String)>>
where
    F: Fn(Hit) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let mut seen: Vec<(String, String)> = Vec::new();
    let mut gone = Vec::new();
    for hit in &value.sources {
        let cited = (hit.doc_id.clone(), hit.version.clone());
        if seen.contains(&cited) {
            continue;
        }
        seen.push(cited.clone());
        if !holds(hit.clone()).await? {
            gone.push(cited);
        }
    }
    Ok(gone)
}

/// How the query path and the VersionPruner reach the cache.
#[derive(Clone)]
pub struct CacheHandle {
    pub actor_name: String,
    /// Invalidation goes straight to the backend: it must not be lost while
    /// the CacheGuard actor restarts.
    pub cache: Arc<dyn SemanticCache>,
    owed: Arc<Mutex<Owed>>,
}

/// Invalidations the cache could not take yet, oldest first.
#[derive(Default)]
struct Owed {
    removals: VecDeque<Removal>,
    /// Partitions written to whose generation the cache has not taken.
    partitions: BTreeSet<Partition>,
    /// Those being sent (taken out of `partitions`; one written to again
    /// meanwhile is in both).
    partitions_sending: BTreeSet<Partition>,
    /// Whether a task is sending them.
    flushing: bool,
}

impl Owed {
    /// Partitions whose generation is owed, those being sent included.
    fn generations_owed(&self) -> usize {
        self.partitions.union(&self.partitions_sending).count()
    }
}

/// The most invalidations owed at once (a few MB). Past it, more are
/// dropped: those entries then stay until their TTL, never served (their
/// sources fail the store check), only taking room.
pub const MAX_OWED: usize = 100_000;

/// How many owed invalidations go in one call when the cache is back.
const OWED_BATCH: usize = 256;

impl CacheHandle {
    pub fn new(actor_name: impl Into<String>, cache: Arc<dyn SemanticCache>) -> CacheHandle {
        CacheHandle {
            actor_name: actor_name.into(),
            cache,
            owed: Default::default(),
        }
    }

    /// How many invalidations wait for the cache to come back.
    pub fn owed(&self) -> usize {
        self.owed.lock().removals.len()
    }
    /// How many partitions' generations wait for the cache to come back.
    pub fn owed_generations(&self) -> usize {
        let o = self.owed.lock();
        o.generations_owed()
    }
    fn actor(&self) -> Option<ActorRef<CacheMsg>> {
        ActorRef::where_is(&self.actor_name)
    }

    /// What the cache holds for this question, and as of when (nothing
    /// when the cache is unavailable: a miss, and nothing to store).
    pub async fn probe(&self, vector: &[f32], scope: &Scope, top_k: usize) -> Probe {
        let Some(actor) = self.actor() else {
            return Probe::default();
        };
        let call = actor
            .call(
                |reply| CacheMsg::Lookup {
                    vector: vector.to_vec(),
                    scope: scope.clone(),
                    top_k,
                    reply,
                },
                Some(Duration::from_secs(2)),
            )
            .await;
        match call {
            Ok(ractor::rpc::CallResult::Success(probe)) => probe,
            _ => Probe::default(),
        }
    }

    /// [`CacheHandle::probe`]'s hit alone.
    pub async fn lookup(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
    ) -> Option<CachedAnswer> {
        self.probe(vector, scope, top_k).await.found
    }

    /// Stores an answer computed after the lookup that gave `as_of`.
    pub fn store(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
        value: CachedAnswer,
        as_of: AsOf,
    ) {
        if let Some(actor) = self.actor() {
            let _ = actor.cast(CacheMsg::Store {
                vector: vector.to_vec(),
                scope: scope.clone(),
                top_k,
                value,
                as_of,
            });
        }
    }

    /// Tells the cache that new text is in these partitions (see
    /// [`SemanticCache::indexed`]). If it cannot take it now, it is owed
    /// and sent again in the background, like an invalidation; meanwhile
    /// a cached answer for those partitions may miss what was just
    /// written (`ragd_cache_generations_owed` shows it). Never fails.
    pub async fn indexed(&self, partitions: &[Partition]) {
        if partitions.is_empty() {
            return;
        }
        if !self.owed.lock().flushing {
            match self.cache.indexed(partitions).await {
                Ok(()) => return,
                Err(e) => tracing::warn!(
                    "could not tell the cache that new text was indexed: {e:#}; owed until it \
                     takes it (cached answers for those partitions may miss the new text \
                     meanwhile)"
                ),
            }
        }
        let mut owed = self.owed.lock();
        // One per partition however many writes: bounded by the partitions.
        owed.partitions.extend(partitions.iter().cloned());
        let owing = owed.generations_owed();
        metrics::gauge!("ragd_cache_generations_owed").set(owing as f64);
        if !owed.flushing {
            owed.flushing = true;
            tokio::spawn(pay_owed(self.owed.clone(), self.cache.clone()));
        }
    }

    /// Drops the cached answers that cite what `removals` removed. If the
    /// cache cannot take it now, it is owed: sent again in the background,
    /// in order, until the cache takes it. While any is owed, later ones
    /// queue behind without a call of their own, so an outage costs one
    /// failed call (bounded by the backend's timeout), not one per prune.
    /// Never fails: what is owed cannot be served meanwhile (see the
    /// module's notes).
    pub async fn invalidate_all(&self, removals: &[Removal]) {
        if removals.is_empty() {
            return;
        }
        if self.owed() == 0 {
            match self.cache.invalidate_all(removals).await {
                Ok(n) => {
                    if n > 0 {
                        tracing::debug!(docs = removals.len(), n, "invalidated cached answers");
                    }
                    return;
                }
                Err(e) => tracing::warn!(
                    "cache invalidation failed: {e:#}; owed until the cache takes it \
                     (no answer citing what was removed is served meanwhile)"
                ),
            }
        }
        self.owe(removals);
    }

    fn owe(&self, removals: &[Removal]) {
        let mut owed = self.owed.lock();
        let room = MAX_OWED.saturating_sub(owed.removals.len());
        if removals.len() > room {
            let dropped = removals.len() - room;
            metrics::counter!("ragd_cache_invalidations_dropped_total").increment(dropped as u64);
            tracing::warn!(
                dropped,
                "{MAX_OWED} cache invalidations owed already; dropping more (those entries \
                 expire with their TTL and are never served)"
            );
        }
        owed.removals.extend(removals.iter().take(room).cloned());
        metrics::gauge!("ragd_cache_invalidations_owed").set(owed.removals.len() as f64);
        if !owed.flushing && !owed.removals.is_empty() {
            owed.flushing = true;
            tokio::spawn(pay_owed(self.owed.clone(), self.cache.clone()));
        }
    }
}

/// Sends what is owed until none is left: the partitions' generations
/// first (all in one call), then the invalidations, oldest first, each
/// batch until the cache takes it (100 ms doubling to 5 s between tries).
async fn pay_owed(owed: Arc<Mutex<Owed>>, cache: Arc<dyn SemanticCache>) {
    let backoff = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(5))
            .without_max_times()
    };
    loop {
        // Taken out, not copied: a write to one of them meanwhile owes it
        // again, and a generation moved on twice is as good as once.
        let partitions: Vec<Partition> = {
            let mut o = owed.lock();
            let taken: Vec<Partition> = std::mem::take(&mut o.partitions).into_iter().collect();
            o.partitions_sending = taken.iter().cloned().collect();
            taken
        };
        if !partitions.is_empty() {
            let sent = (|| cache.indexed(&partitions))
                .retry(backoff())
                .notify(|e, after| {
                    tracing::debug!("owed cache generations: {e:#}; again in {after:?}")
                })
                .await;
            debug_assert!(sent.is_ok(), "retried without a limit");
            let mut o = owed.lock();
            o.partitions_sending.clear();
            metrics::gauge!("ragd_cache_generations_owed").set(o.partitions.len() as f64);
        }
        let batch: Vec<Removal> = {
            let mut o = owed.lock();
            if o.removals.is_empty() {
                if !o.partitions.is_empty() {
                    continue;
                }
                o.flushing = false;
                tracing::info!("the cache took everything owed to it");
                return;
            }
            o.removals.iter().take(OWED_BATCH).cloned().collect()
        };
        let sent = (|| cache.invalidate_all(&batch))
            .retry(backoff())
            .notify(|e, after| {
                tracing::debug!("owed cache invalidation: {e:#}; again in {after:?}")
            })
            .await;
        debug_assert!(sent.is_ok(), "retried without a limit");
        // Only this task takes from the front; others append behind.
        let mut o = owed.lock();
        o.removals.drain(..batch.len());
        metrics::gauge!("ragd_cache_invalidations_owed").set(o.removals.len() as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache_guard::embedded::EmbeddedCache;
    use crate::indexer::actor::tests::embedded;
    use crate::indexer::edge::EdgeStore;

    /// The embedded cache, whose stores never finish (the fault: a Redis
    /// that answers, but slowly).
    struct SlowStores(EmbeddedCache);

    #[async_trait]
    impl SemanticCache for SlowStores {
        fn backend(&self) -> &'static str {
            "slow-stores"
        }
        async fn probe(
            &self,
            vector: &[f32],
            scope: &Scope,
            top_k: usize,
        ) -> anyhow::Result<Probe> {
            self.0.probe(vector, scope, top_k).await
        }
        async fn as_of(&self, scope: &Scope) -> anyhow::Result<AsOf> {
            self.0.as_of(scope).await
        }
        async fn store(
            &self,
            _: &[f32],
            _: &Scope,
            _: usize,
            _: CachedAnswer,
            _: &AsOf,
        ) -> anyhow::Result<()> {
            std::future::pending().await
        }
        async fn indexed(&self, partitions: &[Partition]) -> anyhow::Result<()> {
            self.0.indexed(partitions).await
        }
        async fn invalidate(&self, doc_id: &str, keep: Option<&str>) -> anyhow::Result<usize> {
            self.0.invalidate(doc_id, keep).await
        }
        async fn drop_citing(&self, cited: &[(String, String)]) -> anyhow::Result<usize> {
            self.0.drop_citing(cited).await
        }
    }

    /// A stale entry's sources are checked one by one: what the store no
    /// longer holds is gone (each version once); a store that fails to
    /// answer for one is not taken to have lost it.
    #[tokio::test]
    async fn a_store_error_is_not_taken_for_a_version_gone() {
        use crate::cache_guard::test_support::hit;
        let value = CachedAnswer {
            answer: None,
            sources: vec![
                hit("a", "v1", "hr"),
                hit("b", "v1", "hr"),
                hit("a", "v1", "hr"),
            ],
        };
        let asked = Mutex::new(0);
        let gone = gone_versions(&value, |h: Hit| {
            *asked.lock() += 1;
            async move { Ok(h.doc_id == "b") }
        })
        .await
        .unwrap();
        assert_eq!(gone, vec![("a".to_string(), "v1".to_string())]);
        assert_eq!(*asked.lock(), 2, "a@v1 asked twice");
        let failed = gone_versions(&value, |h: Hit| async move {
            anyhow::ensure!(h.doc_id != "b", "the store timed out");
            Ok(false)
        })
        .await;
        assert!(failed.is_err());
    }

    /// An edge store holding kb:hr/leave.md at `version` (in `dir`), and
    /// the scope that sees it.
    async fn store_with(dir: &std::path::Path, version: &str) -> (Arc<dyn VectorStore>, Scope) {
        let store: Arc<dyn VectorStore> = Arc::new(EdgeStore::open(dir, 4).unwrap());
        let d = embedded(version, 1_000);
        store.upsert(&d.meta, &d.chunks, &d.vectors).await.unwrap();
        let scope = Scope {
            divisions: vec!["hr".into()],
            access_levels: vec!["public".into()],
        };
        (store, scope)
    }

    /// A CacheGuard over `cache` and `store`, and the handle the query path
    /// reaches it with.
    async fn start_guard(
        name: &str,
        cache: Arc<dyn SemanticCache>,
        store: Arc<dyn VectorStore>,
    ) -> (ActorRef<CacheMsg>, CacheHandle) {
        let name = format!("cache-guard-{name}-{}", std::process::id());
        let (guard, _) = Actor::spawn(
            Some(name.clone()),
            CacheGuard,
            CacheGuardArgs {
                cache: cache.clone(),
                store,
                stats: Default::default(),
            },
        )
        .await
        .unwrap();
        (guard, CacheHandle::new(name, cache))
    }

    /// Lookups are answered while stores hang: a store neither holds up
    /// the actor nor queues without bound (past [`MAX_STORES`] under way,
    /// one is dropped).
    #[tokio::test]
    async fn a_lookup_is_not_held_up_behind_slow_stores() {
        let dir = tempfile::tempdir().unwrap();
        let (store, scope) = store_with(dir.path(), "v1").await;
        let q = [1.0, 0.0, 0.0, 0.0];
        let answer = CachedAnswer {
            answer: Some("sixteen weeks".into()),
            sources: store.search(&q, &scope, 10).await.unwrap(),
        };
        let cache = Arc::new(SlowStores(EmbeddedCache::new(
            0.98,
            10,
            Duration::from_secs(60),
        )));
        cache
            .0
            .store(&q, &scope, 5, answer.clone(), &AsOf::default())
            .await
            .unwrap();
        let (guard, handle) = start_guard("slow", cache, store).await;
        for _ in 0..MAX_STORES + 5 {
            handle.store(
                &[0.0, 1.0, 0.0, 0.0],
                &scope,
                5,
                answer.clone(),
                AsOf::default(),
            );
        }
        assert_eq!(handle.lookup(&q, &scope, 5).await, Some(answer));
        guard.stop(None);
    }

    /// A hit citing a version the store no longer holds (its invalidation
    /// was lost) is a miss, and drops what cites that version only: an
    /// answer citing the document's current version stays, and a new one
    /// is cached at once.
    #[tokio::test]
    async fn a_stale_hit_drops_only_the_version_that_is_gone() {
        let dir = tempfile::tempdir().unwrap();
        let (store, scope) = store_with(dir.path(), "v2").await;
        let (q_old, q_new) = ([1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]);
        let current = store.search(&q_old, &scope, 10).await.unwrap();
        let mut pruned = current.clone();
        pruned[0].version = "v1".into();
        let answer = |sources: &[Hit]| CachedAnswer {
            answer: Some("sixteen weeks".into()),
            sources: sources.to_vec(),
        };
        let cache = Arc::new(EmbeddedCache::new(0.98, 10, Duration::from_secs(60)));
        cache
            .store(&q_old, &scope, 5, answer(&pruned), &AsOf::default())
            .await
            .unwrap();
        cache
            .store(&q_new, &scope, 5, answer(&current), &AsOf::default())
            .await
            .unwrap();
        let (guard, handle) = start_guard("stale", cache.clone(), store).await;
        assert_eq!(handle.lookup(&q_old, &scope, 5).await, None);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while cache.lookup(&q_old, &scope, 5).await.unwrap().is_some() {
            assert!(std::time::Instant::now() < deadline, "never dropped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            handle.lookup(&q_new, &scope, 5).await,
            Some(answer(&current)),
            "the current version's answer went too"
        );
        cache
            .store(&q_old, &scope, 5, answer(&current), &AsOf::default())
            .await
            .unwrap();
        assert_eq!(
            handle.lookup(&q_old, &scope, 5).await,
            Some(answer(&current)),
            "a tombstone refused the current version's answer"
        );
        guard.stop(None);
    }
}
