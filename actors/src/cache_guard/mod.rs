//! CacheGuard: the semantic cache in front of the query path.
//!
//! A question whose vector is within `threshold` cosine of an earlier one,
//! asked with the same scope and top_k, gets the earlier response. An entry
//! is served only when the principal may see every chunk it cites, and an
//! entry citing a document version the VersionPruner removed is dropped at
//! once.

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

use crate::indexer::{Hit, Removal, Scope};
use crate::stats::ActorStats;
use anyhow::Context;
use async_trait::async_trait;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CachedAnswer {
    pub answer: Option<String>,
    pub sources: Vec<Hit>,
}

#[async_trait]
pub trait SemanticCache: Send + Sync {
    fn backend(&self) -> &'static str;
    async fn lookup(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
    ) -> anyhow::Result<Option<CachedAnswer>>;
    async fn store(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
        value: CachedAnswer,
    ) -> anyhow::Result<()>;
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
}

/// Invalidates, trying again while the cache fails, for up to `budget`,
/// then returns the error. A missed invalidation would serve removed text
/// until the entries expire, so the caller does not go on without it (the
/// pruner's job fails and is retried, a node's start fails); the retries
/// here ride out a blip without restarting a worker for each failure.
///
/// | retry | delay |
/// |-------|-------|
/// | 1 | 100 ms |
/// | 2 | 200 ms |
/// | … | doubling |
/// | 6+ | 5 s (cap) |
pub async fn invalidate_retrying(
    cache: &dyn SemanticCache,
    removals: &[Removal],
    budget: Duration,
) -> anyhow::Result<usize> {
    let started = std::time::Instant::now();
    let mut delay = Duration::from_millis(100);
    loop {
        match cache.invalidate_all(removals).await {
            Ok(n) => return Ok(n),
            Err(e) if started.elapsed() + delay > budget => {
                return Err(e).context("invalidating the cached answers that cite removed versions")
            }
            Err(e) => {
                tracing::warn!("cache invalidation failed: {e:#}; trying again in {delay:?}");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
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
        reply: RpcReplyPort<Option<CachedAnswer>>,
    },
    Store {
        vector: Vec<f32>,
        scope: Scope,
        top_k: usize,
        value: CachedAnswer,
    },
}

pub struct CacheGuard;

pub struct CacheGuardArgs {
    pub cache: Arc<dyn SemanticCache>,
    pub stats: Arc<ActorStats>,
}

impl Actor for CacheGuard {
    type Msg = CacheMsg;
    type State = CacheGuardArgs;
    type Arguments = CacheGuardArgs;

    async fn pre_start(
        &self,
        _: ActorRef<CacheMsg>,
        args: CacheGuardArgs,
    ) -> Result<CacheGuardArgs, ActorProcessingErr> {
        args.stats.set_status("running");
        args.stats
            .set_note(format!("backend: {}", args.cache.backend()));
        Ok(args)
    }

    async fn handle(
        &self,
        _: ActorRef<CacheMsg>,
        msg: CacheMsg,
        st: &mut CacheGuardArgs,
    ) -> Result<(), ActorProcessingErr> {
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
                let cache = st.cache.clone();
                let stats = st.stats.clone();
                tokio::spawn(async move {
                    let found = match cache.lookup(&vector, &scope, top_k).await {
                        Ok(found) => found.filter(|v| visible(v, &scope)),
                        Err(e) => {
                            // A broken cache is a miss, never a failed query.
                            stats.set_error(format!("lookup: {e:#}"));
                            None
                        }
                    };
                    metrics::counter!("ragd_cache_lookups_total", "result" => if found.is_some() { "hit" } else { "miss" }).increment(1);
                    stats.processed();
                    let _ = reply.send(found);
                });
                return Ok(());
            }
            CacheMsg::Store {
                vector,
                scope,
                top_k,
                value,
            } => {
                if let Err(e) = st.cache.store(&vector, &scope, top_k, value).await {
                    st.stats.set_error(format!("store: {e:#}"));
                }
            }
        }
        st.stats.processed();
        Ok(())
    }
}

/// How the query path and the VersionPruner reach the cache.
#[derive(Clone)]
pub struct CacheHandle {
    pub actor_name: String,
    /// Invalidation goes straight to the backend: it must not be lost while
    /// the CacheGuard actor restarts.
    pub cache: Arc<dyn SemanticCache>,
}

impl CacheHandle {
    fn actor(&self) -> Option<ActorRef<CacheMsg>> {
        ActorRef::where_is(&self.actor_name)
    }

    pub async fn lookup(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
    ) -> Option<CachedAnswer> {
        let actor = self.actor()?;
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
            Ok(ractor::rpc::CallResult::Success(found)) => found,
            _ => None,
        }
    }

    pub fn store(&self, vector: &[f32], scope: &Scope, top_k: usize, value: CachedAnswer) {
        if let Some(actor) = self.actor() {
            let _ = actor.cast(CacheMsg::Store {
                vector: vector.to_vec(),
                scope: scope.clone(),
                top_k,
                value,
            });
        }
    }

    /// Drops the cached answers that cite what `removals` removed, trying
    /// again for up to `budget` (see [`invalidate_retrying`]).
    pub async fn invalidate_all(
        &self,
        removals: &[Removal],
        budget: Duration,
    ) -> anyhow::Result<()> {
        let n = invalidate_retrying(self.cache.as_ref(), removals, budget).await?;
        if n > 0 {
            tracing::debug!(docs = removals.len(), n, "invalidated cached answers");
        }
        Ok(())
    }
}
