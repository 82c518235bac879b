//! Semantic cache in Redis, shared by every query node.
//!
//! Layout (all keys under `prefix`):
//!
//! * `e:<id>`: one hash per cached response: `vec` (f32 LE blob), `scope`
//!   (TAG: hash of the canonical scope and of the embedding model's
//!   [`crate::model::fingerprint`]), `top_k` (TAG), `value` (JSON),
//!   `as_of` (the scope's generations it was computed under). It
//!   expires after the TTL; a hit reads it and never extends it. Nodes
//!   that share the cache but not the model (a rolling model upgrade, or
//!   another model of the same dimension) never see each other's entries:
//!   a question's vector from one model is meaningless next to another's.
//!   Nor do nodes whose answers are made otherwise (another reranker,
//!   number of candidates or LLM: the node folds those into `model`).
//! * `cites:<version>:<doc id>`: set of entry keys citing that doc version;
//!   `versions:<doc id>`: set of that doc's versions that entries cite. The
//!   VersionPruner's invalidation walks these to delete every entry citing a
//!   version other than the one kept, and a stale hit's drop to delete
//!   those citing a version gone from the store.
//! * `gen:<partition hash>`: the partition's generation, set to a new
//!   random value by the Indexer after each write to it (no TTL: under a
//!   `volatile-*` eviction policy Redis never evicts it). Random, not a
//!   counter: a counter whose key is lost (evicted, deleted by hand, a
//!   Redis that restarted empty while a query ran) starts again at 1 and
//!   would make an old entry's `as_of` current again. A partition never
//!   written to gets one from the first answer stored for it (see
//!   [`STORE_SCRIPT`]), so no entry is stored under "none". A lookup reads its
//!   scope's in the same round trip as its search, and an entry whose
//!   `as_of` differs is stale: a miss, deleted (by a script that checks
//!   it against the generations there are then, so an entry stored since
//!   under newer ones stays). The store script refuses an answer whose
//!   lookup read other generations than there are now.
//! * `pruned:<doc id>`: tombstone (the version kept, "" when deleted), so a
//!   response computed from a version pruned while its query ran is never
//!   stored: the store is one script that checks the tombstones and writes
//!   only if none applies, and the invalidation writes the tombstones
//!   before it reads what to delete. Whichever runs first, the other sees
//!   it, and no step of either can leave a stale entry behind.
//!
//! Lookup is one `FT.SEARCH` with the scope and top_k filters inside the KNN
//! query. Every command has a deadline; a failure opens a short circuit during
//! which the cache is bypassed (a miss, counted in
//! `ragd_cache_bypassed_total`), so a Redis outage costs queries nothing but
//! their cache. The index is (re)created when missing, so a Redis that comes
//! back empty serves again without a ragd restart.

use super::{scope_partitions, AsOf, CachedAnswer, Probe, SemanticCache};
use crate::hex;
use crate::indexer::{Removal, Removed, Scope};
use crate::messages::Partition;
use anyhow::{anyhow, bail, Context};
use async_trait::async_trait;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub struct RedisSettings {
    pub url: String,
    pub index: String,
    pub prefix: String,
    /// What entries are kept apart by: the embedding model's
    /// [`crate::model::fingerprint`], and on a node what else makes its
    /// answers (the reranker, the LLM: `Config::answers_id`).
    pub model: String,
    pub dim: usize,
    pub threshold: f32,
    pub ttl: Duration,
    /// Deadline of one command.
    pub timeout: Duration,
}

pub struct RedisCache {
    s: RedisSettings,
    conn: ConnectionManager,
    /// The index exists and has our dimension (checked once per connection
    /// life; reset when Redis says the index is gone).
    ready: AtomicBool,
    /// While set and in the future, the cache is bypassed without trying.
    down_until: Mutex<Option<Instant>>,
}

/// Lua: `as_of`, the generations of keys `KEYS[first + 1 ..]` as
/// [`AsOf::from_generations`] writes them (the same string, compared as
/// is), and `gens[j]`, each key's generation (false when it has none). A
/// macro, not a const: `concat!` takes literals only.
macro_rules! as_of_lua {
    () => {
        r"
local now, gens = {}, {}
for j = 1, #KEYS - first do
  local g = redis.call('GET', KEYS[first + j])
  gens[j] = g
  if g then
    table.insert(now, (j - 1) .. '=' .. g)
  end
end
local as_of = table.concat(now, ',')
"
    };
}

/// Stores one response unless its scope's generations moved on since its
/// lookup read them, or a tombstone says a version it cites was pruned (see
/// the module docs): check and write as one step, so that neither a write
/// nor an invalidation can fall between them. Returns 1 if stored.
///
/// A partition never written to has no generation yet: the script gives
/// it one (ARGV's last, with the key's place appended) and stores the
/// entry under it. Stored under "none" instead, the entry would be
/// current again whenever the key is lost (evicted, deleted), even after
/// a write set it in between.
///
/// KEYS: the entry; per cited (doc, version) its tombstone, then its cites
/// set, then its doc's versions set; the scope's generation keys. ARGV:
/// ttl, the hash's fields (vec, scope, top_k, value, as_of), the number of
/// cited versions, then those versions, then a new generation.
const STORE_SCRIPT: &str = concat!(
    r"
local n = tonumber(ARGV[7])
local first = 1 + 3 * n
local ttl = ARGV[1]
",
    as_of_lua!(),
    r"
if as_of ~= ARGV[6] then
  return 0
end
for i = 1, n do
  local kept = redis.call('GET', KEYS[1 + i])
  if kept and kept ~= ARGV[7 + i] then
    return 0
  end
end
local all = {}
for j = 1, #KEYS - first do
  local g = gens[j]
  if not g then
    g = ARGV[8 + n] .. '.' .. j
    redis.call('SET', KEYS[first + j], g)
  end
  table.insert(all, (j - 1) .. '=' .. g)
end
redis.call('HSET', KEYS[1], 'vec', ARGV[2], 'scope', ARGV[3], 'top_k', ARGV[4], 'value', ARGV[5], 'as_of', table.concat(all, ','))
redis.call('EXPIRE', KEYS[1], ttl)
for i = 1, n do
  redis.call('SADD', KEYS[1 + n + i], KEYS[1])
  redis.call('EXPIRE', KEYS[1 + n + i], ttl)
  redis.call('SADD', KEYS[1 + 2 * n + i], ARGV[7 + i])
  redis.call('EXPIRE', KEYS[1 + 2 * n + i], ttl)
end
return 1
"
);

/// Deletes an entry found stale, unless it is current after all: between
/// a lookup's read of the generations and this, another query may have
/// stored a fresh entry under the same key (the same question), computed
/// under generations newer than the lookup read. KEYS: the entry, then
/// its scope's generation keys. Returns 1 if deleted.
const DROP_STALE_SCRIPT: &str = concat!(
    r"
local first = 1
",
    as_of_lua!(),
    r"
if redis.call('HGET', KEYS[1], 'as_of') == as_of then
  return 0
end
return redis.call('DEL', KEYS[1])
"
);

/// After a failed command, how long queries skip Redis before trying again.
const COOL_OFF: Duration = Duration::from_secs(1);

/// The TAG value for a scope under a model: a hash of the scope's
/// canonical form and of the model's fingerprint (TAG values must not
/// contain separators, and hex needs no escaping in queries).
pub fn scope_tag(scope: &Scope, model: &str) -> String {
    let s = scope.clone().canonical();
    let mut h = Sha256::new();
    h.update(model.as_bytes());
    h.update([0x1d]);
    for d in &s.divisions {
        h.update(d.as_bytes());
        h.update([0x1f]);
    }
    h.update([0x1e]);
    for a in &s.access_levels {
        h.update(a.as_bytes());
        h.update([0x1f]);
    }
    hex(&h.finalize()[..12])
}

fn blob(vector: &[f32]) -> Vec<u8> {
    vector.iter().flat_map(|f| f.to_le_bytes()).collect()
}

/// The FT.SEARCH query for a lookup: scope (and model) and top_k filtered
/// inside KNN.
pub fn lookup_query(scope: &Scope, model: &str, top_k: usize) -> String {
    format!(
        "(@scope:{{{}}} @top_k:{{{top_k}}})=>[KNN 1 @vec $vec AS dist]",
        scope_tag(scope, model)
    )
}

impl RedisCache {
    /// Connects (lazily: a Redis that is down at startup only means the
    /// cache is bypassed until it answers). When Redis answers now, checks
    /// that the search module is loaded and that the index fits the model,
    /// and fails with a clear message otherwise.
    pub async fn connect(s: RedisSettings) -> anyhow::Result<RedisCache> {
        let client = redis::Client::open(s.url.as_str())
            .context("cache.redis_url is not a valid Redis URL")?;
        let cfg = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500))
            .set_connection_timeout(Some(s.timeout))
            .set_response_timeout(Some(s.timeout));
        let conn = ConnectionManager::new_lazy_with_config(client, cfg)?;
        let cache = RedisCache {
            s,
            conn,
            ready: AtomicBool::new(false),
            down_until: Mutex::new(None),
        };
        match cache.setup().await {
            Ok(()) => {}
            Err(e) if is_unreachable(&e) => {
                tracing::warn!(
                    "Redis cache unreachable at startup ({e:#}); queries bypass the cache until it answers"
                );
            }
            Err(e) => return Err(e),
        }
        Ok(cache)
    }

    fn conn(&self) -> ConnectionManager {
        self.conn.clone()
    }

    /// One command with the deadline.
    async fn within<T>(
        &self,
        what: &str,
        f: impl Future<Output = redis::RedisResult<T>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.s.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(anyhow::Error::new(e).context(format!("redis {what}"))),
            Err(_) => Err(anyhow!(Unreachable(format!(
                "redis {what}: no answer within {:?}",
                self.s.timeout
            )))),
        }
    }

    /// Module present, index present with our dimension.
    async fn setup(&self) -> anyhow::Result<()> {
        let modules: Value = self
            .within(
                "MODULE LIST",
                redis::cmd("MODULE")
                    .arg("LIST")
                    .query_async(&mut self.conn()),
            )
            .await?;
        if !has_search_module(&modules) {
            bail!(
                "the Redis at cache.redis_url has no search module (FT.CREATE / FT.SEARCH): \
                 use Redis 8, Redis Stack, or load RediSearch (--loadmodule redisearch.so)"
            );
        }
        let created: redis::RedisResult<Value> = tokio::time::timeout(
            self.s.timeout.max(Duration::from_secs(2)),
            redis::cmd("FT.CREATE")
                .arg(&self.s.index)
                .arg("ON")
                .arg("HASH")
                .arg("PREFIX")
                .arg(1)
                .arg(format!("{}e:", self.s.prefix))
                .arg("SCHEMA")
                .arg("scope")
                .arg("TAG")
                .arg("top_k")
                .arg("TAG")
                .arg("vec")
                .arg("VECTOR")
                .arg("HNSW")
                .arg(6)
                .arg("TYPE")
                .arg("FLOAT32")
                .arg("DIM")
                .arg(self.s.dim)
                .arg("DISTANCE_METRIC")
                .arg("COSINE")
                .query_async(&mut self.conn()),
        )
        .await
        .map_err(|_| anyhow!(Unreachable("redis FT.CREATE: no answer".into())))?;
        match created {
            Ok(_) => {
                tracing::info!(index = %self.s.index, dim = self.s.dim, "created the Redis cache index")
            }
            Err(e)
                if e.to_string()
                    .to_ascii_lowercase()
                    .contains("already exists") =>
            {
                let info: Value = self
                    .within(
                        "FT.INFO",
                        redis::cmd("FT.INFO")
                            .arg(&self.s.index)
                            .query_async(&mut self.conn()),
                    )
                    .await?;
                if let Some(dim) = index_dim(&info) {
                    if dim != self.s.dim {
                        bail!(
                            "the Redis cache index {:?} holds {dim}-dimensional vectors but the \
                             embedding model makes {}: set cache.redis_index to another name \
                             (or drop the index: FT.DROPINDEX {} DD)",
                            self.s.index,
                            self.s.dim,
                            self.s.index
                        );
                    }
                }
            }
            Err(e) => return Err(anyhow::Error::new(e).context("redis FT.CREATE")),
        }
        self.ready.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Runs `op` unless the circuit is open; a failure opens it. Returns
    /// None when the cache was bypassed.
    async fn guarded<T, F, Fut>(&self, what: &'static str, op: F) -> anyhow::Result<Option<T>>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<T>>,
    {
        if let Some(until) = *self.down_until.lock() {
            if Instant::now() < until {
                metrics::counter!("ragd_cache_bypassed_total", "op" => what).increment(1);
                return Ok(None);
            }
        }
        let result = async {
            if !self.ready.load(Ordering::SeqCst) {
                self.setup().await?;
            }
            match op().await {
                Err(e) if index_missing(&e) => {
                    // Redis restarted empty: build the index, try once more.
                    self.ready.store(false, Ordering::SeqCst);
                    self.setup().await?;
                    op().await
                }
                r => r,
            }
        }
        .await;
        match result {
            Ok(v) => {
                if self.down_until.lock().take().is_some() {
                    tracing::info!("Redis cache answers again");
                }
                Ok(Some(v))
            }
            Err(e) => {
                let first = self
                    .down_until
                    .lock()
                    .replace(Instant::now() + COOL_OFF)
                    .is_none();
                if first {
                    tracing::warn!("Redis cache unavailable, bypassing it: {e:#}");
                }
                metrics::counter!("ragd_cache_bypassed_total", "op" => what).increment(1);
                Err(e)
            }
        }
    }

    /// One entry per (question vector, scope, top_k): storing the same
    /// question again overwrites it.
    fn entry_key(&self, vec_blob: &[u8], tag: &str, top_k: usize) -> String {
        let mut h = Sha256::new();
        h.update(vec_blob);
        h.update(tag.as_bytes());
        h.update(top_k.to_le_bytes());
        format!("{}e:{}", self.s.prefix, hex(&h.finalize()[..16]))
    }

    fn cites_key(&self, doc_id: &str, version: &str) -> String {
        format!("{}cites:{version}:{doc_id}", self.s.prefix)
    }

    fn versions_key(&self, doc_id: &str) -> String {
        format!("{}versions:{doc_id}", self.s.prefix)
    }

    fn pruned_key(&self, doc_id: &str) -> String {
        format!("{}pruned:{doc_id}", self.s.prefix)
    }

    /// A partition's generation (hashed: divisions and access levels are
    /// free text).
    fn generation_key(&self, p: &Partition) -> String {
        let mut h = Sha256::new();
        h.update(p.division.as_bytes());
        h.update([0x1f]);
        h.update(p.access_level.as_bytes());
        format!("{}gen:{}", self.s.prefix, hex(&h.finalize()[..12]))
    }

    fn generation_keys(&self, scope: &Scope) -> Vec<String> {
        (scope_partitions(scope).iter())
            .map(|p| self.generation_key(p))
            .collect()
    }

    async fn do_as_of(&self, scope: &Scope) -> anyhow::Result<AsOf> {
        let keys = self.generation_keys(scope);
        if keys.is_empty() {
            return Ok(AsOf::default());
        }
        let generations: Vec<Option<String>> = self
            .within(
                "MGET generations",
                redis::cmd("MGET").arg(keys).query_async(&mut self.conn()),
            )
            .await?;
        Ok(AsOf::from_generations(generations))
    }

    /// One round trip: the scope's generations, then the search.
    async fn do_probe(&self, vector: &[f32], scope: &Scope, top_k: usize) -> anyhow::Result<Probe> {
        let keys = self.generation_keys(scope);
        let mut p = redis::pipe();
        if !keys.is_empty() {
            p.cmd("MGET").arg(&keys);
        }
        p.cmd("FT.SEARCH")
            .arg(&self.s.index)
            .arg(lookup_query(scope, &self.s.model, top_k))
            .arg("PARAMS")
            .arg(2)
            .arg("vec")
            .arg(blob(vector))
            .arg("SORTBY")
            .arg("dist")
            .arg("LIMIT")
            .arg(0)
            .arg(1)
            .arg("RETURN")
            .arg(3)
            .arg("dist")
            .arg("value")
            .arg("as_of")
            .arg("DIALECT")
            .arg(2);
        let mut replies: Vec<Value> = self
            .within(
                "MGET generations, FT.SEARCH",
                p.query_async(&mut self.conn()),
            )
            .await?;
        let reply = replies.pop().context("no FT.SEARCH reply")?;
        let as_of = match replies.pop() {
            Some(generations) => {
                let generations: Vec<Option<String>> = redis::from_redis_value(generations)
                    .context("an MGET reply that is not strings")?;
                AsOf::from_generations(generations)
            }
            None => AsOf::default(),
        };
        let Some(found) = first_result(&reply)? else {
            return Ok(Probe {
                found: None,
                as_of: Some(as_of),
            });
        };
        // COSINE distance is 1 - cosine similarity.
        let similarity = 1.0 - found.dist.max(0.0);
        if similarity < f64::from(self.s.threshold) {
            return Ok(Probe {
                found: None,
                as_of: Some(as_of),
            });
        }
        // (An entry stored before generations were kept has none: stale.)
        if found.as_of.as_deref() != Some(as_of.0.as_str()) {
            // Its partitions were written to since: never served again,
            // so it goes now rather than at its TTL, and a question near
            // it finds the fresh entries behind it.
            if let Err(e) = self.drop_stale(&found.key, &keys).await {
                tracing::debug!("{e:#}");
            }
            metrics::counter!("ragd_cache_stale_generation_total").increment(1);
            return Ok(Probe {
                found: None,
                as_of: Some(as_of),
            });
        }
        let value: CachedAnswer =
            serde_json::from_slice(&found.value).context("a cached value that is not ours")?;
        Ok(Probe {
            found: Some(value),
            as_of: Some(as_of),
        })
    }

    /// Deletes entry `key` unless it is current under the generations of
    /// `generation_keys` (its scope's); true if deleted. See
    /// [`DROP_STALE_SCRIPT`].
    async fn drop_stale(&self, key: &str, generation_keys: &[String]) -> anyhow::Result<bool> {
        let mut drop = redis::cmd("EVAL");
        drop.arg(DROP_STALE_SCRIPT)
            .arg(1 + generation_keys.len())
            .arg(key)
            .arg(generation_keys);
        let mut conn = self.conn();
        let dropped: i64 = self
            .within("drop a stale entry", drop.query_async(&mut conn))
            .await?;
        Ok(dropped == 1)
    }

    async fn do_store(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
        value: &CachedAnswer,
        as_of: &AsOf,
    ) -> anyhow::Result<()> {
        let (vec_blob, tag) = (blob(vector), scope_tag(scope, &self.s.model));
        let key = self.entry_key(&vec_blob, &tag, top_k);
        let ttl = self.s.ttl.as_secs().max(1);
        let mut cited: Vec<(&str, &str)> = value
            .sources
            .iter()
            .map(|h| (h.doc_id.as_str(), h.version.as_str()))
            .collect();
        cited.sort();
        cited.dedup();
        // As STORE_SCRIPT says.
        let generations = self.generation_keys(scope);
        let mut eval = redis::cmd("EVAL");
        eval.arg(STORE_SCRIPT)
            .arg(1 + 3 * cited.len() + generations.len())
            .arg(&key);
        for (doc, _) in &cited {
            eval.arg(self.pruned_key(doc));
        }
        for (doc, version) in &cited {
            eval.arg(self.cites_key(doc, version));
        }
        for (doc, _) in &cited {
            eval.arg(self.versions_key(doc));
        }
        eval.arg(generations);
        eval.arg(ttl)
            .arg(&vec_blob)
            .arg(&tag)
            .arg(top_k)
            .arg(serde_json::to_vec(value)?)
            .arg(&as_of.0)
            .arg(cited.len());
        for (_, version) in &cited {
            eval.arg(*version);
        }
        eval.arg(new_generation()?);
        let stored: i64 = self
            .within("store", eval.query_async(&mut self.conn()))
            .await?;
        if stored == 0 {
            metrics::counter!("ragd_cache_stores_refused_total").increment(1);
        }
        Ok(())
    }

    /// Three round trips for the whole batch, whatever its size: the
    /// tombstones and each document's cached versions, the entries citing
    /// the removed ones, then their deletion.
    async fn do_invalidate_all(&self, removals: &[Removal]) -> anyhow::Result<usize> {
        if removals.is_empty() {
            return Ok(0);
        }
        let ttl = self.s.ttl.as_secs().max(1);
        let mut p = redis::pipe();
        for r in removals {
            p.cmd("SET")
                .arg(self.pruned_key(&r.doc_id))
                .arg(r.keep.as_deref().unwrap_or(""))
                .arg("EX")
                .arg(ttl)
                .ignore()
                .cmd("SMEMBERS")
                .arg(self.versions_key(&r.doc_id));
        }
        let cached: Vec<Vec<String>> = self
            .within(
                "SET tombstones, SMEMBERS versions",
                p.query_async(&mut self.conn()),
            )
            .await?;
        let removed = Removed::by(removals);
        let mut stale = BTreeSet::new();
        for (r, versions) in removals.iter().zip(cached) {
            for v in versions {
                if removed.contains(&r.doc_id, &v) {
                    stale.insert((r.doc_id.as_str(), v));
                }
            }
        }
        self.drop_versions(&stale).await
    }

    /// Deletes the entries citing these (document, version) pairs, and
    /// their citation sets: two round trips.
    async fn drop_versions(&self, stale: &BTreeSet<(&str, String)>) -> anyhow::Result<usize> {
        if stale.is_empty() {
            return Ok(0);
        }
        let mut p = redis::pipe();
        for (doc_id, v) in stale {
            p.cmd("SMEMBERS").arg(self.cites_key(doc_id, v));
        }
        let citing: Vec<Vec<String>> = self
            .within("SMEMBERS cites", p.query_async(&mut self.conn()))
            .await?;
        let mut p = redis::pipe();
        for ((doc_id, v), entries) in stale.iter().zip(&citing) {
            if !entries.is_empty() {
                p.cmd("DEL").arg(entries);
            }
            p.cmd("DEL")
                .arg(self.cites_key(doc_id, v))
                .ignore()
                .cmd("SREM")
                .arg(self.versions_key(doc_id))
                .arg(v)
                .ignore();
        }
        // Never an empty reply, whatever was ignored.
        p.cmd("ECHO").arg(0);
        let removed: Vec<usize> = self
            .within("DEL entries", p.query_async(&mut self.conn()))
            .await?;
        // An entry citing two removed versions is deleted once and counted
        // once (the second DEL finds nothing).
        Ok(removed.iter().sum())
    }
}

#[async_trait]
impl SemanticCache for RedisCache {
    fn backend(&self) -> &'static str {
        "redis"
    }

    async fn probe(&self, vector: &[f32], scope: &Scope, top_k: usize) -> anyhow::Result<Probe> {
        // Bypassed: a miss, and nothing to store.
        Ok(self
            .guarded("lookup", || self.do_probe(vector, scope, top_k))
            .await?
            .unwrap_or_default())
    }

    async fn as_of(&self, scope: &Scope) -> anyhow::Result<AsOf> {
        self.do_as_of(scope).await
    }

    async fn store(
        &self,
        vector: &[f32],
        scope: &Scope,
        top_k: usize,
        value: CachedAnswer,
        as_of: &AsOf,
    ) -> anyhow::Result<()> {
        self.guarded("store", || {
            self.do_store(vector, scope, top_k, &value, as_of)
        })
        .await?;
        Ok(())
    }

    /// Not guarded by the circuit, like an invalidation: owed ones reach
    /// Redis as soon as it answers.
    async fn indexed(&self, partitions: &[Partition]) -> anyhow::Result<()> {
        if partitions.is_empty() {
            return Ok(());
        }
        let mut p = redis::pipe();
        for partition in partitions {
            p.cmd("SET")
                .arg(self.generation_key(partition))
                .arg(new_generation()?)
                .ignore();
        }
        p.cmd("ECHO").arg(0);
        let r: anyhow::Result<Vec<i64>> = self
            .within("SET generations", p.query_async(&mut self.conn()))
            .await;
        if r.is_err() {
            metrics::counter!("ragd_cache_generation_errors_total").increment(1);
        }
        r.map(|_| ())
    }

    async fn invalidate(&self, doc_id: &str, keep: Option<&str>) -> anyhow::Result<usize> {
        let removal = Removal::new(doc_id, keep);
        self.invalidate_all(&[removal]).await
    }

    async fn drop_citing(&self, cited: &[(String, String)]) -> anyhow::Result<usize> {
        let stale: BTreeSet<(&str, String)> =
            cited.iter().map(|(d, v)| (d.as_str(), v.clone())).collect();
        let dropped = self.guarded("drop", || self.drop_versions(&stale)).await?;
        Ok(dropped.unwrap_or(0))
    }

    async fn invalidate_all(&self, removals: &[Removal]) -> anyhow::Result<usize> {
        // Not guarded by the circuit: an invalidation is always attempted,
        // so owed ones (see `CacheHandle::invalidate_all`) reach Redis as
        // soon as it answers, not once a circuit that failed lookups
        // opened closes. (A missed one serves nothing outdated, since hits
        // are checked against the store, but leaves a useless entry.)
        let r = async {
            if !self.ready.load(Ordering::SeqCst) {
                self.setup().await?;
            }
            self.do_invalidate_all(removals).await
        }
        .await;
        if r.is_err() {
            metrics::counter!("ragd_cache_invalidation_errors_total").increment(1);
        }
        r
    }
}

/// Marks errors that mean "no answer" rather than "wrong answer".
#[derive(Debug)]
struct Unreachable(String);
impl std::fmt::Display for Unreachable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Unreachable {}

/// A generation no other write has had (64 random bits: see the module
/// docs for why not a counter).
fn new_generation() -> anyhow::Result<String> {
    let g = getrandom::u64().map_err(|e| anyhow!("no randomness for a cache generation: {e}"))?;
    Ok(format!("{g:016x}"))
}

fn is_unreachable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<Unreachable>().is_some()
            || c.downcast_ref::<redis::RedisError>().is_some_and(|r| {
                r.is_io_error()
                    || r.is_timeout()
                    || r.is_connection_refusal()
                    || r.is_connection_dropped()
            })
    })
}

fn index_missing(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}").to_ascii_lowercase();
    text.contains("unknown index name") || text.contains("no such index")
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

fn has_search_module(modules: &Value) -> bool {
    let Value::Array(list) = modules else {
        return false;
    };
    list.iter().any(|m| {
        let fields: Vec<Value> = match m {
            Value::Array(f) => f.clone(),
            Value::Map(kv) => kv
                .iter()
                .flat_map(|(k, v)| [k.clone(), v.clone()])
                .collect(),
            _ => return false,
        };
        fields.chunks(2).any(|kv| {
            kv.len() == 2
                && text(&kv[0]).as_deref() == Some("name")
                && text(&kv[1]).is_some_and(|n| {
                    let n = n.to_ascii_lowercase();
                    n == "search" || n == "ft"
                })
        })
    })
}

/// The `dim` of the vector field in an FT.INFO reply, wherever it sits.
fn index_dim(info: &Value) -> Option<usize> {
    fn walk(v: &Value) -> Option<usize> {
        match v {
            Value::Array(items) => {
                for pair in items.windows(2) {
                    if text(&pair[0]).is_some_and(|k| k.eq_ignore_ascii_case("dim")) {
                        match &pair[1] {
                            Value::Int(n) => return usize::try_from(*n).ok(),
                            other => {
                                if let Some(n) = text(other).and_then(|t| t.parse().ok()) {
                                    return Some(n);
                                }
                            }
                        }
                    }
                }
                items.iter().find_map(walk)
            }
            Value::Map(kv) => kv.iter().find_map(|(k, v)| {
                if text(k).is_some_and(|k| k.eq_ignore_ascii_case("dim")) {
                    if let Value::Int(n) = v {
                        return usize::try_from(*n).ok();
                    }
                }
                walk(v)
            }),
            _ => None,
        }
    }
    walk(info)
}

/// The first FT.SEARCH result.
struct Found {
    key: String,
    dist: f64,
    value: Vec<u8>,
    as_of: Option<String>,
}

/// The first FT.SEARCH result, if any.
fn first_result(reply: &Value) -> anyhow::Result<Option<Found>> {
    let Value::Array(items) = reply else {
        bail!("unexpected FT.SEARCH reply: {reply:?}");
    };
    let (Some(key), Some(Value::Array(fields))) = (items.get(1).and_then(text), items.get(2))
    else {
        return Ok(None);
    };
    let mut dist = None;
    let mut value = None;
    let mut as_of = None;
    for kv in fields.chunks(2) {
        match (text(&kv[0]).as_deref(), kv.get(1)) {
            (Some("dist"), Some(v)) => dist = text(v).and_then(|t| t.parse::<f64>().ok()),
            (Some("value"), Some(Value::BulkString(b))) => value = Some(b.clone()),
            (Some("as_of"), Some(v)) => as_of = text(v),
            _ => {}
        }
    }
    match (dist, value) {
        (Some(dist), Some(value)) => Ok(Some(Found {
            key,
            dist,
            value,
            as_of,
        })),
        // The entry expired between the KNN and the read of its fields.
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    //! Against a real Valkey with the search module (crate::testkit).
    use super::*;
    use crate::cache_guard::test_support::{a_batch, hit, one_document_twice, scope};
    use crate::testkit::Valkey;

    fn settings(v: &Valkey, dim: usize, ttl: Duration) -> RedisSettings {
        RedisSettings {
            url: v.url(),
            index: "ragd-cache-test".into(),
            prefix: "t:".into(),
            model: "test-model".into(),
            dim,
            threshold: 0.98,
            ttl,
            timeout: Duration::from_millis(250),
        }
    }

    impl RedisCache {
        /// Stores as a query that read the generations just now would.
        async fn store_now(
            &self,
            vector: &[f32],
            scope: &Scope,
            top_k: usize,
            value: CachedAnswer,
        ) -> anyhow::Result<()> {
            let as_of = self.as_of(scope).await?;
            self.store(vector, scope, top_k, value, &as_of).await
        }
    }

    fn answer(cites: &[(&str, &str)]) -> CachedAnswer {
        CachedAnswer {
            answer: Some("sixteen weeks".into()),
            sources: cites.iter().map(|(d, v)| hit(d, v, "hr")).collect(),
        }
    }

    #[tokio::test]
    async fn hits_near_questions_in_the_same_scope_and_top_k_only() {
        let v = Valkey::start();
        let cache = RedisCache::connect(settings(&v, 3, Duration::from_secs(60)))
            .await
            .unwrap();
        let value = answer(&[("a", "v1")]);
        let q = [1.0f32, 0.0, 0.0];
        cache
            .store_now(&q, &scope(&["hr"]), 5, value.clone())
            .await
            .unwrap();
        // 0.99 cosine: a hit; 0.95: a miss.
        let near = [0.99f32, 0.141, 0.0];
        let far = [0.95f32, 0.312, 0.0];
        assert_eq!(
            cache.lookup(&near, &scope(&["hr"]), 5).await.unwrap(),
            Some(value.clone())
        );
        assert_eq!(cache.lookup(&far, &scope(&["hr"]), 5).await.unwrap(), None);
        // The scope filter runs inside FT.SEARCH: another scope or top_k
        // finds nothing even for the very same vector.
        assert_eq!(
            cache.lookup(&q, &scope(&["hr", "eng"]), 5).await.unwrap(),
            None
        );
        assert_eq!(cache.lookup(&q, &scope(&["eng"]), 5).await.unwrap(), None);
        assert_eq!(cache.lookup(&q, &scope(&["hr"]), 3).await.unwrap(), None);
        // Same scope written in another order is the same scope.
        let mut reordered = scope(&["hr"]);
        reordered.access_levels = vec!["internal".into(), "internal".into()];
        assert!(cache.lookup(&q, &reordered, 5).await.unwrap().is_some());
    }

    /// Two nodes sharing the cache with different models (a rolling
    /// upgrade): neither is served the other's answers, however near the
    /// vectors, and an invalidation still reaches every entry.
    #[tokio::test]
    async fn nodes_with_another_model_never_hit_each_others_entries() {
        let v = Valkey::start();
        let old = RedisCache::connect(settings(&v, 3, Duration::from_secs(60)))
            .await
            .unwrap();
        let new = RedisCache::connect(RedisSettings {
            model: "another-model".into(),
            ..settings(&v, 3, Duration::from_secs(60))
        })
        .await
        .unwrap();
        let (q, s) = ([1.0f32, 0.0, 0.0], scope(&["hr"]));
        old.store_now(&q, &s, 5, answer(&[("a", "v1")]))
            .await
            .unwrap();
        assert_eq!(new.lookup(&q, &s, 5).await.unwrap(), None);
        new.store_now(&q, &s, 5, answer(&[("a", "v1"), ("b", "v1")]))
            .await
            .unwrap();
        let got = |c: Option<CachedAnswer>| c.map(|a| a.sources.len());
        assert_eq!(got(old.lookup(&q, &s, 5).await.unwrap()), Some(1));
        assert_eq!(got(new.lookup(&q, &s, 5).await.unwrap()), Some(2));
        // A's pruning (from whichever node) drops both models' entries.
        old.invalidate_all(&[Removal::new("a", Some("v2"))])
            .await
            .unwrap();
        assert_eq!(old.lookup(&q, &s, 5).await.unwrap(), None);
        assert_eq!(new.lookup(&q, &s, 5).await.unwrap(), None);
    }

    #[tokio::test]
    async fn entries_expire_and_a_hit_does_not_extend_their_life() {
        let v = Valkey::start();
        let cache = RedisCache::connect(settings(&v, 2, Duration::from_secs(2)))
            .await
            .unwrap();
        let s = scope(&["hr"]);
        cache
            .store_now(&[1.0, 0.0], &s, 5, answer(&[("a", "v1")]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert!(cache.lookup(&[1.0, 0.0], &s, 5).await.unwrap().is_some());
        // 2.4 s after the store: gone, although it was hit at 1.2 s.
        tokio::time::sleep(Duration::from_millis(1200)).await;
        assert_eq!(cache.lookup(&[1.0, 0.0], &s, 5).await.unwrap(), None);
    }

    /// A write on one node (its Indexer) makes every answer stored by any
    /// node for a scope that sees the partition stale: missed and deleted
    /// at the next lookup; an answer whose lookup came before the write is
    /// refused by the store script; a scope that does not see it keeps
    /// its answers.
    #[tokio::test]
    async fn a_write_on_one_node_makes_stale_the_answers_of_every_node_that_see_it() {
        let v = Valkey::start();
        let ttl = Duration::from_secs(60);
        let node_a = RedisCache::connect(settings(&v, 2, ttl)).await.unwrap();
        let node_b = RedisCache::connect(settings(&v, 2, ttl)).await.unwrap();
        let (hr, eng, both) = (scope(&["hr"]), scope(&["eng"]), scope(&["hr", "eng"]));
        let q = [1.0, 0.0];
        for s in [&hr, &eng, &both] {
            let as_of = node_a.as_of(s).await.unwrap();
            node_a
                .store(&q, s, 5, answer(&[("leave", "v1")]), &as_of)
                .await
                .unwrap();
            assert!(node_b.lookup(&q, s, 5).await.unwrap().is_some());
        }
        let exists = |s: &Scope, top_k: usize| {
            let key = node_a.entry_key(&blob(&q), &scope_tag(s, "test-model"), top_k);
            let mut conn = node_a.conn();
            async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<i64>(&mut conn)
                    .await
                    .unwrap()
                    == 1
            }
        };
        // Node A answers a question for hr while node B writes.
        let before = node_a.probe(&q, &hr, 3).await.unwrap().as_of.unwrap();
        let hr_internal = Partition {
            division: "hr".into(),
            access_level: "internal".into(),
        };
        node_b.indexed(&[hr_internal]).await.unwrap();
        assert_eq!(node_a.lookup(&q, &hr, 5).await.unwrap(), None);
        assert_eq!(node_a.lookup(&q, &both, 5).await.unwrap(), None);
        assert!(!exists(&hr, 5).await && !exists(&both, 5).await, "kept");
        assert!(node_a.lookup(&q, &eng, 5).await.unwrap().is_some());
        node_a
            .store(&q, &hr, 3, answer(&[("leave", "v1")]), &before)
            .await
            .unwrap();
        assert!(!exists(&hr, 3).await, "stored");
        assert_eq!(node_b.lookup(&q, &hr, 3).await.unwrap(), None);
        // Asked again: stored as of the write, served to every node.
        let after = node_a.probe(&q, &hr, 3).await.unwrap().as_of.unwrap();
        assert_ne!(after, before);
        node_a
            .store(&q, &hr, 3, answer(&[("leave", "v2")]), &after)
            .await
            .unwrap();
        assert_eq!(
            node_b.lookup(&q, &hr, 3).await.unwrap(),
            Some(answer(&[("leave", "v2")]))
        );
        // An entry stored before generations were kept (no as_of): stale.
        let key = node_a.entry_key(&blob(&q), &scope_tag(&eng, "test-model"), 5);
        redis::cmd("HDEL")
            .arg(key)
            .arg("as_of")
            .query_async::<i64>(&mut node_a.conn())
            .await
            .unwrap();
        assert_eq!(node_a.lookup(&q, &eng, 5).await.unwrap(), None);
    }

    /// A generation whose key was lost (evicted, deleted by hand, a Redis
    /// that restarted empty) never comes back to a value an entry was
    /// stored under; and a lookup that read older generations than an
    /// entry was stored under (a fresh answer stored between its read and
    /// its drop) leaves the entry be.
    #[tokio::test]
    async fn generations_never_repeat_and_a_late_lookup_keeps_a_fresh_entry() {
        let v = Valkey::start();
        let cache = RedisCache::connect(settings(&v, 2, Duration::from_secs(60)))
            .await
            .unwrap();
        let hr = scope(&["hr"]);
        let part = Partition {
            division: "hr".into(),
            access_level: "internal".into(),
        };
        let q = [1.0, 0.0];
        cache.indexed(std::slice::from_ref(&part)).await.unwrap();
        let old = cache.as_of(&hr).await.unwrap();
        cache
            .store(&q, &hr, 5, answer(&[("leave", "v1")]), &old)
            .await
            .unwrap();
        assert!(cache.lookup(&q, &hr, 5).await.unwrap().is_some());
        redis::cmd("DEL")
            .arg(cache.generation_key(&part))
            .query_async::<i64>(&mut cache.conn())
            .await
            .unwrap();
        cache.indexed(std::slice::from_ref(&part)).await.unwrap();
        assert_ne!(cache.as_of(&hr).await.unwrap(), old);
        assert_eq!(
            cache.lookup(&q, &hr, 5).await.unwrap(),
            None,
            "an answer from before the write was served"
        );
        // Stored fresh; a lookup that read the generations before that
        // write judged it stale, and drops it only if it still is.
        let now = cache.as_of(&hr).await.unwrap();
        cache
            .store(&q, &hr, 5, answer(&[("leave", "v2")]), &now)
            .await
            .unwrap();
        let entry = cache.entry_key(&blob(&q), &scope_tag(&hr, "test-model"), 5);
        let keys = cache.generation_keys(&hr);
        assert!(!cache.drop_stale(&entry, &keys).await.unwrap(), "dropped");
        assert!(cache.lookup(&q, &hr, 5).await.unwrap().is_some());
        cache.indexed(std::slice::from_ref(&part)).await.unwrap();
        assert!(cache.drop_stale(&entry, &keys).await.unwrap(), "kept");

        // A partition never written to: the answer is stored under a
        // generation made then, not under none, so losing the key makes
        // it stale too.
        let eng = scope(&["eng"]);
        let none = cache.as_of(&eng).await.unwrap();
        cache
            .store(&q, &eng, 5, answer(&[("build", "b1")]), &none)
            .await
            .unwrap();
        assert!(cache.lookup(&q, &eng, 5).await.unwrap().is_some());
        assert_ne!(cache.as_of(&eng).await.unwrap(), none, "no generation made");
        redis::cmd("DEL")
            .arg(cache.generation_keys(&eng))
            .query_async::<i64>(&mut cache.conn())
            .await
            .unwrap();
        assert_eq!(cache.as_of(&eng).await.unwrap(), none);
        assert_eq!(cache.lookup(&q, &eng, 5).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_pruned_version_invalidates_every_entry_citing_it_on_every_node() {
        let v = Valkey::start();
        let ttl = Duration::from_secs(60);
        let node_a = RedisCache::connect(settings(&v, 2, ttl)).await.unwrap();
        let node_b = RedisCache::connect(settings(&v, 2, ttl)).await.unwrap();
        let s = scope(&["hr"]);
        node_a
            .store_now(
                &[1.0, 0.0],
                &s,
                5,
                answer(&[("leave", "v1"), ("pay", "p1")]),
            )
            .await
            .unwrap();
        node_a
            .store_now(&[0.0, 1.0], &s, 5, answer(&[("pay", "p1")]))
            .await
            .unwrap();
        // Shared: node B hits what node A stored.
        assert!(node_b.lookup(&[1.0, 0.0], &s, 5).await.unwrap().is_some());
        // Keeping the cited version removes nothing.
        assert_eq!(node_b.invalidate("leave", Some("v1")).await.unwrap(), 0);
        assert!(node_a.lookup(&[1.0, 0.0], &s, 5).await.unwrap().is_some());
        // Node B's pruner drops leave@v1: the entry citing it is gone for
        // both nodes; the entry citing only pay@p1 stays.
        assert_eq!(node_b.invalidate("leave", Some("v2")).await.unwrap(), 1);
        assert_eq!(node_a.lookup(&[1.0, 0.0], &s, 5).await.unwrap(), None);
        assert_eq!(node_b.lookup(&[1.0, 0.0], &s, 5).await.unwrap(), None);
        assert!(node_a.lookup(&[0.0, 1.0], &s, 5).await.unwrap().is_some());
        // A deleted document takes every version with it.
        assert_eq!(node_a.invalidate("pay", None).await.unwrap(), 1);
        assert_eq!(node_b.lookup(&[0.0, 1.0], &s, 5).await.unwrap(), None);
    }

    #[tokio::test]
    async fn a_batch_of_removals_drops_what_each_would_in_turn() {
        let v = Valkey::start();
        let cache = RedisCache::connect(settings(&v, 2, Duration::from_secs(60)))
            .await
            .unwrap();
        let s = scope(&["hr"]);
        let (a, b, c, ad) = ([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]);
        let cites: [(_, &[(&str, &str)]); 4] = [
            (a, &[("a", "v1")]),
            (b, &[("b", "v1")]),
            (c, &[("c", "v1")]),
            (ad, &[("a", "v2"), ("d", "v1")]),
        ];
        for (q, sources) in cites {
            cache.store_now(&q, &s, 5, answer(sources)).await.unwrap();
        }
        assert_eq!(cache.invalidate_all(&a_batch()).await.unwrap(), 2);
        let cached = |q: [f32; 2]| {
            let cache = &cache;
            let s = s.clone();
            async move { cache.lookup(&q, &s, 5).await.unwrap().is_some() }
        };
        assert_eq!(
            (
                cached(a).await,
                cached(b).await,
                cached(c).await,
                cached(ad).await
            ),
            (false, false, true, true)
        );
        // One document twice: what either removal removes goes.
        assert_eq!(
            cache.invalidate_all(&one_document_twice()).await.unwrap(),
            1
        );
        assert!(!cached(ad).await);
        assert!(cached(c).await);
        assert_eq!(cache.invalidate_all(&[]).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn an_answer_from_a_version_pruned_mid_query_is_not_kept() {
        let v = Valkey::start();
        let cache = RedisCache::connect(settings(&v, 2, Duration::from_secs(60)))
            .await
            .unwrap();
        let s = scope(&["hr"]);
        // The pruner went by first (v1 → v2) while a query computed from v1.
        cache.invalidate("leave", Some("v2")).await.unwrap();
        cache
            .store_now(&[1.0, 0.0], &s, 5, answer(&[("leave", "v1")]))
            .await
            .unwrap();
        assert_eq!(cache.lookup(&[1.0, 0.0], &s, 5).await.unwrap(), None);
        // Nothing of it was written, not even for a moment: no entry and no
        // citation (a store used to write, then check, then delete, and a
        // failed check left the entry).
        let mut conn = cache.conn();
        let entries: Vec<String> = redis::cmd("KEYS")
            .arg("t:e:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(entries.is_empty(), "{entries:?}");
        let versions: Vec<String> = redis::cmd("SMEMBERS")
            .arg(cache.versions_key("leave"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(versions.is_empty(), "{versions:?}");
        // An answer from the kept version is cached as usual.
        cache
            .store_now(&[1.0, 0.0], &s, 5, answer(&[("leave", "v2")]))
            .await
            .unwrap();
        assert!(cache.lookup(&[1.0, 0.0], &s, 5).await.unwrap().is_some());
    }

    /// A stale hit drops what cites the version gone from the store, and
    /// nothing else: the document's current version stays cached and is
    /// cached again at once (no tombstone).
    #[tokio::test]
    async fn dropping_a_gone_version_keeps_the_current_one_cacheable() {
        let v = Valkey::start();
        let cache = RedisCache::connect(settings(&v, 2, Duration::from_secs(60)))
            .await
            .unwrap();
        let s = scope(&["hr"]);
        let (old, new, both) = ([1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]);
        let cites: [(_, &[(&str, &str)]); 3] = [
            (old, &[("leave", "v1")]),
            (new, &[("leave", "v2")]),
            (both, &[("pay", "p1"), ("leave", "v1")]),
        ];
        for (q, sources) in cites {
            cache.store_now(&q, &s, 5, answer(sources)).await.unwrap();
        }
        let gone = [("leave".to_string(), "v1".to_string())];
        assert_eq!(cache.drop_citing(&gone).await.unwrap(), 2);
        let cached = |q: [f32; 2]| {
            let (cache, s) = (&cache, s.clone());
            async move { cache.lookup(&q, &s, 5).await.unwrap().is_some() }
        };
        assert!(!cached(old).await && !cached(both).await);
        assert!(cached(new).await, "the current version's entry went too");
        cache
            .store_now(&old, &s, 5, answer(&[("leave", "v2")]))
            .await
            .unwrap();
        assert!(cached(old).await, "a tombstone refused the current version");
        assert_eq!(cache.drop_citing(&gone).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn a_redis_without_the_search_module_is_refused_with_a_clear_message() {
        let v = Valkey::start_without_search();
        let e = RedisCache::connect(settings(&v, 2, Duration::from_secs(60)))
            .await
            .err()
            .expect("must refuse");
        assert!(format!("{e:#}").contains("no search module"), "{e:#}");
    }

    #[tokio::test]
    async fn an_index_of_another_dimension_is_refused_with_a_clear_message() {
        let v = Valkey::start();
        RedisCache::connect(settings(&v, 4, Duration::from_secs(60)))
            .await
            .unwrap();
        let e = RedisCache::connect(settings(&v, 8, Duration::from_secs(60)))
            .await
            .err()
            .expect("must refuse");
        let text = format!("{e:#}");
        assert!(
            text.contains("4-dimensional") && text.contains("makes 8"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn redis_down_means_fast_misses_and_the_cache_comes_back_by_itself() {
        let mut v = Valkey::start();
        let cache = RedisCache::connect(settings(&v, 2, Duration::from_secs(60)))
            .await
            .unwrap();
        let s = scope(&["hr"]);
        cache
            .store_now(&[1.0, 0.0], &s, 5, answer(&[("a", "v1")]))
            .await
            .unwrap();
        v.stop();
        for _ in 0..5 {
            let t = Instant::now();
            let r = cache.lookup(&[1.0, 0.0], &s, 5).await;
            assert!(!matches!(r, Ok(Some(_))), "{r:?}");
            assert!(
                t.elapsed() < Duration::from_millis(600),
                "{:?}",
                t.elapsed()
            );
            assert!(
                cache
                    .store_now(&[1.0, 0.0], &s, 5, answer(&[("a", "v1")]))
                    .await
                    .is_ok()
                    || t.elapsed() < Duration::from_millis(600)
            );
        }
        // Back, and empty (no persistence): the index is rebuilt on use.
        v.restart();
        tokio::time::sleep(COOL_OFF + Duration::from_millis(100)).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let _ = cache
                .store_now(&[1.0, 0.0], &s, 5, answer(&[("a", "v1")]))
                .await;
            if let Ok(Some(_)) = cache.lookup(&[1.0, 0.0], &s, 5).await {
                break;
            }
            assert!(Instant::now() < deadline, "the cache never came back");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    #[tokio::test]
    async fn redis_down_at_startup_is_a_bypass_not_a_failure() {
        let port = crate::testkit::free_port();
        let mut s = settings(&Valkey::start(), 2, Duration::from_secs(60));
        s.url = format!("redis://127.0.0.1:{port}/");
        let cache = RedisCache::connect(s).await.unwrap();
        assert_eq!(
            cache
                .lookup(&[1.0, 0.0], &scope(&["hr"]), 5)
                .await
                .ok()
                .flatten(),
            None
        );
    }

    #[test]
    fn the_lookup_filters_scope_and_top_k_inside_the_knn_query() {
        let q = lookup_query(&scope(&["hr", "eng"]), "m", 5);
        let tag = scope_tag(&scope(&["eng", "hr"]), "m");
        assert_eq!(
            q,
            format!("(@scope:{{{tag}}} @top_k:{{5}})=>[KNN 1 @vec $vec AS dist]")
        );
        assert!(tag.chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(tag, scope_tag(&scope(&["hr"]), "m"));
        assert_ne!(tag, scope_tag(&scope(&["eng", "hr"]), "another model"));
    }
}
