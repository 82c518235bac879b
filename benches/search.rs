//! Vector search at scale in the embedded store (qdrant-edge): builds an
//! index of N chunks (384-d, default 1,000,000) spread over 12 partitions
//! (4 divisions × 3 access levels), then runs top-50 searches scoped to a
//! caller who may see 4 of them (a third of the points), as the query path
//! does. Reports build time, peak memory, latency percentiles and recall@50
//! against an exact (brute-force) search over the same points and filter.
//!
//!     cargo bench --profile dev --bench search
//!     RAGD_BENCH_POINTS=100000 RAGD_BENCH_QUERIES=200 cargo bench --profile dev --bench search
//!
//! The vectors are synthetic but shaped like sentence embeddings: unit
//! vectors around 2,000 topic centroids (uniform random vectors have no
//! neighbourhoods, which no real corpus looks like). Queries are fresh
//! draws from the same topics. Prints one JSON object.

use ragd_actors::indexer::edge::EdgeStore;
use ragd_actors::indexer::{Scope, VectorStore};
use ragd_actors::messages::{Chunk, DocMeta, Partition};
use std::time::Instant;

const DIM: usize = 384;
const TOPICS: usize = 2_000;
const CHUNKS_PER_DOC: usize = 50;
const DIVISIONS: [&str; 4] = ["hr", "engineering", "finance", "general"];
const LEVELS: [&str; 3] = ["public", "internal", "confidential"];

/// splitmix64: a deterministic, dependency-free generator is all a
/// benchmark's data needs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn unit(&mut self) -> f32 {
        ((self.next() >> 40) as f32 + 0.5) / (1u64 << 24) as f32
    }
    /// Standard normal (Box–Muller).
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.unit(), self.unit());
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    }
}

fn normalise(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// A point near a random topic: its centroid plus noise, on the unit sphere.
/// Stored chunks and queries are drawn alike.
fn draw(rng: &mut Rng, centroids: &[Vec<f32>]) -> Vec<f32> {
    let t = (rng.next() % centroids.len() as u64) as usize;
    normalise(
        centroids[t]
            .iter()
            .map(|c| c + 0.06 * rng.normal())
            .collect(),
    )
}

fn rss_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let points = env("RAGD_BENCH_POINTS", 1_000_000);
    let queries = env("RAGD_BENCH_QUERIES", 200);
    let dir = tempfile::tempdir()?;
    let store = EdgeStore::open(dir.path(), DIM)?;
    let mut rng = Rng(42);
    let centroids: Vec<Vec<f32>> = (0..TOPICS)
        .map(|_| normalise((0..DIM).map(|_| rng.normal()).collect()))
        .collect();

    // Every vector is kept (flat) for the exact search, with its partition.
    let mut flat: Vec<f32> = Vec::with_capacity(points * DIM);
    let mut part: Vec<u8> = Vec::with_capacity(points);
    let t = Instant::now();
    let docs = points.div_ceil(CHUNKS_PER_DOC);
    for d in 0..docs {
        let p = d % (DIVISIONS.len() * LEVELS.len());
        let meta = DocMeta {
            doc_id: format!("bench:doc-{d}"),
            source: "bench".into(),
            uri: format!("doc-{d}.md"),
            path: format!("/bench/doc-{d}.md").into(),
            version: "v1".into(),
            partition: Partition {
                division: DIVISIONS[p / LEVELS.len()].into(),
                access_level: LEVELS[p % LEVELS.len()].into(),
            },
            size: 1,
            seq: d as u64,
        };
        let n = CHUNKS_PER_DOC.min(points - d * CHUNKS_PER_DOC);
        let chunks: Vec<Chunk> = (0..n)
            .map(|i| Chunk {
                index: i as u32,
                text: format!("chunk {i} of document {d}"),
            })
            .collect();
        let vectors: Vec<Vec<f32>> = (0..n).map(|_| draw(&mut rng, &centroids)).collect();
        for v in &vectors {
            flat.extend_from_slice(v);
            part.push(p as u8);
        }
        store.upsert(&meta, &chunks, &vectors).await?;
    }
    let upsert_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    store.optimize().await?;
    let index_s = t.elapsed().as_secs_f64();
    // The flat copy is the benchmark's, not the store's.
    let flat_kib = (flat.len() * 4 / 1024) as u64;

    // The caller sees 2 divisions × 2 levels: 4 of the 12 partitions.
    let scope = Scope {
        divisions: vec!["hr".into(), "general".into()],
        access_levels: vec!["public".into(), "internal".into()],
    };
    let allowed: Vec<bool> = (0..DIVISIONS.len() * LEVELS.len())
        .map(|p| scope.allows(DIVISIONS[p / LEVELS.len()], LEVELS[p % LEVELS.len()]))
        .collect();
    let qs: Vec<Vec<f32>> = (0..queries).map(|_| draw(&mut rng, &centroids)).collect();
    // Warm-up: the first searches fault the index pages in.
    for q in qs.iter().take(10) {
        store.search(q, &scope, 50).await?;
    }
    let mut lat_ms = Vec::with_capacity(queries);
    let mut recall_sum = 0.0;
    for q in &qs {
        let t = Instant::now();
        let hits = store.search(q, &scope, 50).await?;
        lat_ms.push(t.elapsed().as_secs_f64() * 1e3);
        // Exact top-50 over the caller's partitions, by cosine (unit vectors:
        // the dot product), compared by score rank since ids differ in form.
        let mut exact: Vec<(f32, usize)> = flat
            .chunks_exact(DIM)
            .enumerate()
            .filter(|(i, _)| allowed[part[*i] as usize])
            .map(|(i, v)| (v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(), i))
            .collect();
        exact.select_nth_unstable_by(49, |a, b| b.0.total_cmp(&a.0));
        let kth = exact[..50].iter().map(|e| e.0).fold(f32::MAX, f32::min);
        assert!(hits
            .iter()
            .all(|h| scope.allows(&h.division, &h.access_level)));
        // A hit counts when it scores at least the exact 50th best (less a
        // rounding hair): it is then one of the true top 50.
        let found = hits.iter().filter(|h| h.score >= kth - 1e-5).count();
        recall_sum += found.min(50) as f64 / 50.0;
    }
    lat_ms.sort_by(f64::total_cmp);
    let pct = |p: f64| lat_ms[((p / 100.0 * lat_ms.len() as f64) as usize).min(lat_ms.len() - 1)];
    println!(
        "{}",
        serde_json::json!({
            "points": points, "dim": DIM, "partitions": 12, "visible_fraction": 4.0 / 12.0,
            "queries": queries,
            "upsert_s": (upsert_s * 10.0).round() / 10.0,
            "index_build_s": (index_s * 10.0).round() / 10.0,
            "peak_rss_mib": rss_kib("VmHWM:") / 1024,
            "rss_after_mib": rss_kib("VmRSS:") / 1024,
            "bench_flat_copy_mib": flat_kib / 1024,
            "p50_ms": (pct(50.0) * 100.0).round() / 100.0,
            "p95_ms": (pct(95.0) * 100.0).round() / 100.0,
            "p99_ms": (pct(99.0) * 100.0).round() / 100.0,
            "recall_at_50": (recall_sum / queries as f64 * 1000.0).round() / 1000.0,
        })
    );
    Ok(())
}
