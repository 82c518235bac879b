//! The embedded semantic cache at capacity: lookups with the cache full
//! (`[cache] capacity`, default 10,000 entries) of 384-d question vectors,
//! half of the lookups near a stored question (hits), half not (misses).
//!
//! The reference, measured in the same run on the same entries and
//! questions, is the Redis backend (Valkey with the search module, on
//! loopback, sharing the cores): what a node uses instead when the
//! embedded cache will not do.
//!
//!     cargo test --workspace --bench cache --no-run
//!     eval "$(./ops/services.sh install | sed 's/^/export /')"
//!     ~/.cache/ragd-target/debug/deps/cache-<hash>
//!
//! RAGD_BENCH_ENTRIES (default 10,000), RAGD_BENCH_LOOKUPS (2,000 a case),
//! RAGD_BENCH_CLIENTS (8). For 1 and for 12 scopes (one company-wide
//! scope; a principal per division and access level), it reports one
//! client's p50 / p95 lookup latency and the lookups per second of
//! RAGD_BENCH_CLIENTS concurrent clients that store each miss, as the
//! query path does. Prints one JSON object per case.

#[path = "../tests/common/mod.rs"]
mod common;
use common::{env_usize, normalise, Rng};
use ragd_actors::cache_guard::embedded::EmbeddedCache;
use ragd_actors::cache_guard::redis::{RedisCache, RedisSettings};
use ragd_actors::cache_guard::{CachedAnswer, SemanticCache};
use ragd_actors::indexer::{Hit, Scope};
use ragd_actors::testkit::Valkey;
use std::sync::Arc;
use std::time::{Duration, Instant};

const DIM: usize = 384;
const THRESHOLD: f32 = 0.98;
const TOP_K: usize = 5;

fn scopes(n: usize) -> Vec<Scope> {
    (0..n)
        .map(|i| Scope {
            divisions: vec![format!("division-{}", i / 3)],
            access_levels: vec![["public", "internal", "confidential"][i % 3].to_string()],
        })
        .collect()
}

fn answer(i: usize, scope: &Scope) -> CachedAnswer {
    CachedAnswer {
        answer: Some(format!("Answer {i}.")),
        sources: (0..TOP_K)
            .map(|k| Hit {
                doc_id: format!("kb:doc-{i}-{k}.md"),
                uri: format!("doc-{i}-{k}.md"),
                version: "v1".into(),
                division: scope.divisions[0].clone(),
                access_level: scope.access_levels[0].clone(),
                chunk_index: k as u32,
                text: "A chunk of about two hundred tokens. ".repeat(24),
                score: 0.5,
            })
            .collect(),
    }
}

/// A question near `v`: cosine about 0.995 (a rewording), so a hit.
fn near(rng: &mut Rng, v: &[f32]) -> Vec<f32> {
    normalise(v.iter().map(|x| x + 0.005 * rng.normal()).collect())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

struct Data {
    stored: Vec<(Vec<f32>, usize)>,
    /// Question, scope, whether it should hit.
    questions: Vec<(Vec<f32>, usize, bool)>,
    scopes: Vec<Scope>,
}

fn data(entries: usize, lookups: usize, n_scopes: usize) -> Data {
    let mut rng = Rng(7 + n_scopes as u64);
    let random = |rng: &mut Rng| normalise((0..DIM).map(|_| rng.normal()).collect());
    let stored: Vec<(Vec<f32>, usize)> = (0..entries)
        .map(|i| (random(&mut rng), i % n_scopes))
        .collect();
    let questions = (0..lookups)
        .map(|i| {
            if i % 2 == 0 {
                let (v, s) = &stored[(rng.next_u64() % entries as u64) as usize];
                (near(&mut rng, v), *s, true)
            } else {
                (random(&mut rng), i % n_scopes, false)
            }
        })
        .collect();
    Data {
        stored,
        questions,
        scopes: scopes(n_scopes),
    }
}

async fn fill(cache: &dyn SemanticCache, d: &Data) {
    for (i, (v, s)) in d.stored.iter().enumerate() {
        let scope = &d.scopes[*s];
        // (As of now: Redis gives a partition never written to a
        // generation at its first store, and refuses later ones as of none.)
        let as_of = cache.as_of(scope).await.unwrap();
        cache
            .store(v, scope, TOP_K, answer(i, scope), &as_of)
            .await
            .unwrap();
    }
}

/// One client: per-lookup latency in µs, sorted; panics on a wrong answer.
async fn one_client(cache: &dyn SemanticCache, d: &Data) -> Vec<f64> {
    let mut lat = Vec::with_capacity(d.questions.len());
    for (q, s, hit) in &d.questions {
        let t = Instant::now();
        let found = cache.lookup(q, &d.scopes[*s], TOP_K).await.unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        assert_eq!(found.is_some(), *hit, "{}", cache.backend());
    }
    lat.sort_by(f64::total_cmp);
    lat
}

/// `clients` concurrent clients share the questions; each miss is stored.
/// Lookups per second.
async fn many_clients(cache: Arc<dyn SemanticCache>, d: Arc<Data>, clients: usize) -> f64 {
    let t = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (cache, d) = (cache.clone(), d.clone());
            tokio::spawn(async move {
                for (i, (q, s, _)) in d.questions.iter().enumerate().skip(c).step_by(clients) {
                    let scope = &d.scopes[*s];
                    // As a query does: a miss stores as of its lookup.
                    let probe = cache.probe(q, scope, TOP_K).await.unwrap();
                    if let (None, Some(as_of)) = (probe.found, probe.as_of) {
                        cache
                            .store(q, scope, TOP_K, answer(i, scope), &as_of)
                            .await
                            .unwrap();
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    d.questions.len() as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let entries = env_usize("RAGD_BENCH_ENTRIES", 10_000);
    let lookups = env_usize("RAGD_BENCH_LOOKUPS", 2_000);
    let clients = env_usize("RAGD_BENCH_CLIENTS", 8);
    // The query node's runtime: one worker thread per core.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for n_scopes in [1, 12] {
            let d = Arc::new(data(entries, lookups, n_scopes));
            let mut row = serde_json::Map::new();
            row.insert("entries".into(), entries.into());
            row.insert("scopes".into(), n_scopes.into());
            row.insert("clients".into(), clients.into());
            let valkey = Valkey::start();
            let redis = RedisCache::connect(RedisSettings {
                url: valkey.url(),
                index: "ragd-bench-cache".into(),
                prefix: "b:".into(),
                model: "bench".into(),
                dim: DIM,
                threshold: THRESHOLD,
                ttl: Duration::from_secs(3600),
                // Queued behind 8 clients on 2 cores, not down.
                timeout: Duration::from_secs(10),
            })
            .await
            .unwrap();
            let caches: [(&str, Arc<dyn SemanticCache>); 2] = [
                ("reference", Arc::new(redis)),
                (
                    "ragd",
                    Arc::new(EmbeddedCache::new(
                        THRESHOLD,
                        entries,
                        Duration::from_secs(3600),
                    )),
                ),
            ];
            for (name, cache) in caches {
                fill(cache.as_ref(), &d).await;
                let lat = one_client(cache.as_ref(), &d).await;
                row.insert(format!("{name}_p50_us"), percentile(&lat, 0.5).into());
                row.insert(format!("{name}_p95_us"), percentile(&lat, 0.95).into());
                let per_s = many_clients(cache, d.clone(), clients).await;
                row.insert(format!("{name}_lookups_per_s"), per_s.round().into());
            }
            let ratio = |k: &str| {
                row[&format!("ragd_{k}")].as_f64().unwrap()
                    / row[&format!("reference_{k}")].as_f64().unwrap()
            };
            let (p50, tput) = (ratio("p50_us"), ratio("lookups_per_s"));
            row.insert("p50_ratio".into(), p50.into());
            row.insert("throughput_ratio".into(), tput.into());
            println!("{}", serde_json::Value::Object(row));
        }
    });
}
