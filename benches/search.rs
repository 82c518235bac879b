//! Vector search at scale in the embedded store (qdrant-edge): builds an
//! index of N chunks (384-d, default 1,000,000) spread over 12 partitions
//! (4 divisions × 3 access levels), then runs top-50 searches as the query
//! path does, for two callers: one who may see 4 of the partitions (about a
//! third of the points) and one who may see 1. Reports build time, peak
//! memory, latency percentiles and recall@50 against an exact (brute-force)
//! search over the same points and filter, for each `hnsw_ef` asked for.
//!
//! Build with the test build's features and profile, then run:
//!
//!     cargo test --workspace --bench search --no-run
//!     RAGD_BLAS=$(./ops/fetch-blas.sh) RAGD_BENCH_POINTS=100000 RAGD_BENCH_EF=0,256,512 \
//!         ~/.cache/ragd-target/debug/deps/search-<hash>
//!
//! RAGD_BENCH_POINTS (default 1,000,000), RAGD_BENCH_QUERIES (200),
//! RAGD_BENCH_EF (comma-separated; 0 is the store's default),
//! RAGD_BENCH_M and RAGD_BENCH_EF_CONSTRUCT (the index's shape).
//!
//! The vectors are real: all-MiniLM-L6-v2 embeddings of the distinct lines
//! of prose found on the machine (RAGD_BENCH_CORPUS, colon-separated
//! folders; default the cargo registry's sources, Python's library and
//! /usr/share/doc: about 1.3 million lines here), embedded once and cached
//! (a million take about 45 minutes on two cores). The queries are lines of
//! the same corpus that are not indexed. RAGD_BENCH_DATA=synthetic instead
//! draws unit vectors around 2,000 topic centroids (the first version of
//! this bench; far noisier than real text, so HNSW finds it much harder).
//! Prints one JSON object.

#[path = "../tests/common/mod.rs"]
mod common;
use common::{env_usize, model_dir, normalise, proc_status_kib, Rng};
use ragd_actors::indexer::edge::EdgeStore;
use ragd_actors::indexer::HnswSettings;
use ragd_actors::indexer::{Scope, VectorStore};
use ragd_actors::messages::{Chunk, DocMeta, Partition};
use ragd_actors::model::{BatchPolicy, Cpu, Encoder};
use std::path::PathBuf;
use std::time::Instant;

const DIM: usize = 384;
const TOPICS: usize = 2_000;
const CHUNKS_PER_DOC: usize = 50;
const DIVISIONS: [&str; 4] = ["hr", "engineering", "finance", "general"];
const LEVELS: [&str; 3] = ["public", "internal", "confidential"];

/// A point near a random topic: its centroid plus noise, on the unit sphere.
/// Stored chunks and queries are drawn alike.
fn draw(rng: &mut Rng, centroids: &[Vec<f32>]) -> Vec<f32> {
    let t = (rng.next_u64() % centroids.len() as u64) as usize;
    normalise(
        centroids[t]
            .iter()
            .map(|c| c + 0.06 * rng.normal())
            .collect(),
    )
}

/// FNV-1a, 64-bit: a stable hash for cache keys and partition choice (std's
/// hasher may change between Rust releases, which would re-embed a million
/// texts for nothing).
fn fnv(mut h: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
const FNV0: u64 = 0xcbf2_9ce4_8422_2325;

/// One line of real documentation, from a file that decides its partition.
struct Line {
    text: String,
    partition: u8,
}

/// Every distinct line of prose (20 to 300 characters, comment markers
/// stripped) under `roots`: all lines of the text, Markdown and
/// reStructuredText files, and the comment lines of the Rust and Python
/// files (their code is left out: a company's documentation is mostly
/// prose). Files are read in path order, then the lines are shuffled by a
/// fixed hash, so N points are a sample of the whole corpus and not of its
/// first crates. A file's lines share one partition (a division owns its
/// documents), chosen by the file's path.
fn corpus(roots: &[PathBuf]) -> Vec<Line> {
    let mut files: Vec<PathBuf> = roots
        .iter()
        .flat_map(|r| walkdir::WalkDir::new(r).follow_links(false))
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_file())
        .map(|e| e.into_path())
        .collect();
    files.sort();
    let mut seen = std::collections::HashSet::new();
    let mut lines = Vec::new();
    for f in &files {
        let comment: Option<&str> = match f.extension().and_then(|e| e.to_str()) {
            Some("md" | "txt" | "rst") => None,
            Some("rs") => Some("//"),
            Some("py") => Some("#"),
            _ => continue,
        };
        let Ok(text) = std::fs::read_to_string(f) else {
            continue; // not UTF-8: not prose
        };
        let partition = (fnv(FNV0, f.as_os_str().as_encoded_bytes()) % 12) as u8;
        for l in text.lines() {
            let l = l.trim();
            if comment.is_some_and(|c| !l.starts_with(c)) {
                continue;
            }
            let l = l.trim_start_matches(['/', '!', '#', '*']).trim();
            if (20..=300).contains(&l.len()) && seen.insert(fnv(FNV0, l.as_bytes())) {
                lines.push(Line {
                    text: l.to_string(),
                    partition,
                });
            }
        }
    }
    lines.sort_by_cached_key(|l| fnv(0x5eed, l.text.as_bytes()));
    lines
}

/// Real MiniLM embeddings of the first `n` of `texts`, kept under
/// `~/.cache/ragd/bench-search/` (a million short texts take most of an hour
/// on two cores). The file is keyed by the model and the whole corpus and
/// holds the embeddings of a prefix of it: a larger run embeds only the
/// lines a smaller one did not, and an interrupted run resumes.
fn embeddings(texts: &[&str], n: usize) -> anyhow::Result<Vec<f32>> {
    use std::io::Write;
    let model = model_dir();
    let mut key = fnv(FNV0, &std::fs::read(model.join("config.json"))?);
    key = fnv(
        key,
        &std::fs::metadata(model.join("model.safetensors"))?
            .len()
            .to_le_bytes(),
    );
    for t in texts {
        key = fnv(key, t.as_bytes());
        key = fnv(key, &[0]);
    }
    let dir = PathBuf::from(std::env::var("HOME")?).join(".cache/ragd/bench-search");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{key:016x}.f32"));
    let bytes = std::fs::read(&path).unwrap_or_default();
    let done = (bytes.len() / (DIM * 4)).min(n);
    let mut flat: Vec<f32> = bytemuck::pod_collect_to_vec(&bytes[..done * DIM * 4]);
    drop(bytes);
    if done < n {
        eprintln!(
            "{done} embeddings cached in {}; embedding {} more",
            path.display(),
            n - done
        );
        // Whole vectors only: cut a torn tail left by an interrupted run.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        file.set_len((done * DIM * 4) as u64)?;
        let mut file = std::io::BufWriter::new(file);
        let enc = Encoder::<Cpu>::load(&model, BatchPolicy::default(), &Default::default())?;
        let t = Instant::now();
        for (i, part) in texts[done..n].chunks(1024).enumerate() {
            for v in enc.embed(part)? {
                file.write_all(bytemuck::cast_slice(&v))?;
                flat.extend_from_slice(&v);
            }
            file.flush()?;
            if i % 20 == 19 {
                let k = flat.len() / DIM - done;
                eprintln!(
                    "embedded {k} of {} ({:.0} texts/s)",
                    n - done,
                    k as f64 / t.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(flat)
}

/// Dot product in 16 lanes, which the compiler vectorises (a plain
/// iterator sum stays scalar): the exact search reads every point.
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let points = env_usize("RAGD_BENCH_POINTS", 1_000_000);
    let queries = env_usize("RAGD_BENCH_QUERIES", 200);
    let synthetic = std::env::var("RAGD_BENCH_DATA").is_ok_and(|d| d == "synthetic");

    // Every vector is kept (flat) for the exact search, with its partition
    // and its text; the queries come from the same source.
    let (flat, part, texts, qs) = if synthetic {
        let mut rng = Rng(42);
        let centroids: Vec<Vec<f32>> = (0..TOPICS)
            .map(|_| normalise((0..DIM).map(|_| rng.normal()).collect()))
            .collect();
        let mut flat = Vec::with_capacity(points * DIM);
        for _ in 0..points {
            flat.extend(draw(&mut rng, &centroids));
        }
        let part: Vec<u8> = (0..points)
            .map(|i| ((i / CHUNKS_PER_DOC) % 12) as u8)
            .collect();
        let texts: Vec<String> = (0..points).map(|i| format!("chunk {i}")).collect();
        let qs: Vec<Vec<f32>> = (0..queries).map(|_| draw(&mut rng, &centroids)).collect();
        (flat, part, texts, qs)
    } else {
        let roots: Vec<PathBuf> = match std::env::var("RAGD_BENCH_CORPUS") {
            Ok(r) => std::env::split_paths(&r).collect(),
            Err(_) => vec![
                PathBuf::from(std::env::var("HOME")?).join(".cargo/registry/src"),
                "/usr/lib/python3".into(),
                "/usr/share/doc".into(),
            ],
        };
        let t = Instant::now();
        let mut lines = corpus(&roots);
        eprintln!(
            "corpus: {} distinct lines ({:.1} s)",
            lines.len(),
            t.elapsed().as_secs_f64()
        );
        anyhow::ensure!(
            lines.len() >= points + queries,
            "the corpus has {} lines, fewer than {points} points + {queries} queries",
            lines.len()
        );
        // The queries are the first lines and the points the next ones, so
        // a larger run's texts extend a smaller one's (and its cache).
        let refs: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
        let mut flat = embeddings(&refs, queries + points)?;
        drop(refs);
        let qs: Vec<Vec<f32>> = flat[..queries * DIM]
            .chunks(DIM)
            .map(<[f32]>::to_vec)
            .collect();
        flat.drain(..queries * DIM);
        lines.truncate(queries + points);
        lines.drain(..queries);
        let part = lines.iter().map(|l| l.partition).collect();
        let texts = lines.into_iter().map(|l| l.text).collect();
        (flat, part, texts, qs)
    };

    let dir = tempfile::tempdir()?;
    // RAGD_BENCH_M / RAGD_BENCH_EF_CONSTRUCT: the index's shape
    // ([index] hnsw_m, hnsw_ef_construct); the store's defaults otherwise.
    let defaults = HnswSettings::default();
    let hnsw = HnswSettings {
        m: env_usize("RAGD_BENCH_M", defaults.m),
        ef_construct: env_usize("RAGD_BENCH_EF_CONSTRUCT", defaults.ef_construct),
        ef: 0,
    };
    let store = EdgeStore::open_with(dir.path(), DIM, &hnsw)?;
    // Documents of up to 50 chunks, each within one partition.
    let mut order: Vec<usize> = (0..points).collect();
    order.sort_by_key(|&i| part[i]);
    let t = Instant::now();
    let mut docs = 0;
    for group in order.chunk_by(|a, b| part[*a] == part[*b]) {
        for members in group.chunks(CHUNKS_PER_DOC) {
            let d = docs;
            docs += 1;
            let p = part[members[0]] as usize;
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
            let chunks: Vec<Chunk> = members
                .iter()
                .enumerate()
                .map(|(i, &m)| Chunk {
                    index: i as u32,
                    text: texts[m].clone(),
                })
                .collect();
            let vectors: Vec<Vec<f32>> = members
                .iter()
                .map(|&m| flat[m * DIM..(m + 1) * DIM].to_vec())
                .collect();
            store.upsert(&meta, &chunks, &vectors).await?;
        }
    }
    let upsert_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    store.optimize().await?;
    let index_s = t.elapsed().as_secs_f64();
    // The flat copy is the benchmark's, not the store's.
    let flat_kib = (flat.len() * 4 / 1024) as u64;

    // Two callers: one who sees 2 divisions × 2 levels (4 of the 12
    // partitions, a third of the points) and one who sees a single
    // partition (a twelfth: the harder case for a filtered graph search).
    let scopes = [
        (
            "4_of_12",
            Scope {
                divisions: vec!["hr".into(), "general".into()],
                access_levels: vec!["public".into(), "internal".into()],
            },
        ),
        (
            "1_of_12",
            Scope {
                divisions: vec!["finance".into()],
                access_levels: vec!["confidential".into()],
            },
        ),
    ];
    // RAGD_BENCH_EF: comma-separated hnsw_ef values to sweep; 0 is the
    // store's default (the query path's).
    let efs: Vec<usize> = std::env::var("RAGD_BENCH_EF")
        .unwrap_or_else(|_| "0".into())
        .split(',')
        .map(|e| e.trim().parse())
        .collect::<Result<_, _>>()?;
    let mut results = Vec::new();
    for (name, scope) in &scopes {
        let allowed: Vec<bool> = (0..DIVISIONS.len() * LEVELS.len())
            .map(|p| scope.allows(DIVISIONS[p / LEVELS.len()], LEVELS[p % LEVELS.len()]))
            .collect();
        let visible = part.iter().filter(|p| allowed[**p as usize]).count();
        // Exact top-50 over the caller's partitions, by cosine (unit
        // vectors: the dot product): the score of the 50th best.
        let kth: Vec<f32> = qs
            .iter()
            .map(|q| {
                let mut exact: Vec<f32> = flat
                    .chunks_exact(DIM)
                    .enumerate()
                    .filter(|(i, _)| allowed[part[*i] as usize])
                    .map(|(_, v)| dot(v, q))
                    .collect();
                exact.select_nth_unstable_by(49, |a, b| b.total_cmp(a));
                exact[49]
            })
            .collect();
        for &ef in &efs {
            store.set_search_ef((ef > 0).then_some(ef));
            // Warm-up: the first searches fault the index pages in.
            for q in qs.iter().take(10) {
                store.search(q, scope, 50).await?;
            }
            let mut lat_ms = Vec::with_capacity(queries);
            let mut recall_sum = 0.0;
            for (q, kth) in qs.iter().zip(&kth) {
                let t = Instant::now();
                let hits = store.search(q, scope, 50).await?;
                lat_ms.push(t.elapsed().as_secs_f64() * 1e3);
                assert!(hits
                    .iter()
                    .all(|h| scope.allows(&h.division, &h.access_level)));
                // A hit counts when it scores at least the exact 50th best
                // (less a rounding hair): it is then one of the true top 50.
                let found = hits.iter().filter(|h| h.score >= kth - 1e-5).count();
                recall_sum += found.min(50) as f64 / 50.0;
            }
            lat_ms.sort_by(f64::total_cmp);
            let pct = |p: f64| {
                let v = lat_ms[((p / 100.0 * lat_ms.len() as f64) as usize).min(lat_ms.len() - 1)];
                (v * 100.0).round() / 100.0
            };
            results.push(serde_json::json!({
                "scope": name, "visible_points": visible,
                "hnsw_ef": if ef == 0 { serde_json::json!("default") } else { ef.into() },
                "p50_ms": pct(50.0), "p95_ms": pct(95.0), "p99_ms": pct(99.0),
                "recall_at_50": (recall_sum / queries as f64 * 1000.0).round() / 1000.0,
            }));
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "data": if synthetic { "synthetic" } else { "corpus" },
            "points": points, "dim": DIM, "partitions": 12, "queries": queries,
            "hnsw_m": hnsw.m, "hnsw_ef_construct": hnsw.ef_construct,
            "upsert_s": (upsert_s * 10.0).round() / 10.0,
            "index_build_s": (index_s * 10.0).round() / 10.0,
            "peak_rss_mib": proc_status_kib("self", "VmHWM:") / 1024,
            "rss_after_mib": proc_status_kib("self", "VmRSS:") / 1024,
            "bench_flat_copy_mib": flat_kib / 1024,
            "searches": results,
        })
    );
    Ok(())
}
