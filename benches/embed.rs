//! Embedding throughput of ragd's burn encoder: tokens/s and texts/s for
//! batch sizes 1, 32 and 128 and texts of ~16 and ~200 tokens.
//!
//!     cargo bench --bench embed            # prints one JSON object per case
//!     RAGD_BENCH_BACKEND=ndarray cargo bench --features ndarray --bench embed
//!                                          # burn ndarray + system OpenBLAS instead of flex
//!     RAGD_BENCH_BACKEND=cuda|cuda-f16 cargo bench --features cuda --bench embed
//!                                          # burn-cuda, f32 or f16 (ops/bench/gpu.sh)
//!     RAGD_BENCH_SCALE=8                   # 8× the texts per batched case (a
//!                                          # GPU finishes the CPU sizes in ms)
//!
//!     RAGD_BENCH_RERANK=DIR                # also case rerank/q50: a cross-encoder
//!                                          # scores 50 chunk-sized passages per
//!                                          # question (ops/bench/make_cross_encoder.py)
//!
//! `ops/bench/embed.sh` runs this and the sentence-transformers reference
//! (`ops/bench/st_embed.py`) on the same texts in the same run.

use ragd_actors::model::{BatchPolicy, CrossEncoder, Encoder};
use std::time::Instant;

const WORDS: &[&str] = &[
    "policy", "leave", "request", "portal", "manager", "approval", "weeks", "budget", "travel",
    "expense", "receipt", "engineer", "incident", "on-call", "rotation", "cache", "volume",
    "nightly", "review", "office",
];

/// Deterministic pseudo-text of `words` words (the same generator as the
/// Python reference).
pub fn text(seed: usize, words: usize) -> String {
    let mut x = seed as u64 * 2654435761 + 12345;
    (0..words)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            WORDS[((x >> 33) % WORDS.len() as u64) as usize]
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() {
    let dir =
        std::env::var("RAGD_BENCH_MODEL").unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into());
    let filter = std::env::args().nth(1).filter(|a| !a.starts_with('-'));
    let backend = std::env::var("RAGD_BENCH_BACKEND").unwrap_or_else(|_| "flex".into());
    match backend.as_str() {
        "flex" => {
            // The CPU path's GEMM (OpenBLAS via RAGD_BLAS, or the gemm
            // crate) goes into the label: the figures depend on it.
            let label = format!("ragd-burn-flex, {}", ragd_actors::model::gemm_name());
            run::<ragd_actors::model::Cpu>(&label, &dir, filter.as_deref())
        }
        #[cfg(feature = "cuda")]
        "cuda" => run::<ragd_actors::model::Gpu>("ragd-burn-cuda", &dir, filter.as_deref()),
        #[cfg(feature = "cuda")]
        "cuda-f16" => {
            run::<ragd_actors::model::GpuF16>("ragd-burn-cuda-f16", &dir, filter.as_deref())
        }
        #[cfg(feature = "ndarray")]
        "ndarray" => run::<ragd_actors::model::NdArrayBlas>(
            "ragd-burn-ndarray-openblas",
            &dir,
            filter.as_deref(),
        ),
        other => {
            eprintln!(
                "unknown RAGD_BENCH_BACKEND {other:?} (flex; ndarray needs --features ndarray, cuda and cuda-f16 --features cuda)"
            );
            std::process::exit(2);
        }
    }
}

fn run<B: ragd_actors::model::Backend>(label: &str, dir: &str, filter: Option<&str>)
where
    B::Device: Default,
{
    let scale: usize = std::env::var("RAGD_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
        .max(1);
    for (kind, words) in [("short", 12usize), ("chunk", 170usize)] {
        for batch in [1usize, 32, 128] {
            let name = format!("{kind}/b{batch}");
            if filter.is_some_and(|f| !name.contains(f)) {
                continue;
            }
            let policy = BatchPolicy {
                max_tokens: usize::MAX,
                max_batch: batch,
            };
            let enc = Encoder::<B>::load(dir.as_ref(), policy, &Default::default()).expect("model");
            // Keep every case to tens of seconds on 2 cores: the ~200-token
            // texts get fewer passes (same totals as ops/bench/st_embed.py).
            let (total, passes) = match (kind, batch) {
                (_, 1) => (64, 3),
                ("short", b) => (b * 4, 3),
                (_, b) => (b * 2, 2),
            };
            // Batch 1 times single passes: 64 texts are plenty anywhere.
            let total = if batch == 1 { total } else { total * scale };
            let texts: Vec<String> = (0..total).map(|i| text(i, words)).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let tokens: usize = enc.token_counts(&refs).unwrap().iter().sum();
            // Warm-up pass over every text: a GPU backend compiles and
            // autotunes its kernels for each new shape.
            for chunk in refs.chunks(batch) {
                enc.embed(chunk).unwrap();
            }
            let mut best = f64::MAX;
            for _ in 0..passes {
                let t = Instant::now();
                for chunk in refs.chunks(batch) {
                    enc.embed(chunk).unwrap();
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{}",
                serde_json::json!({
                    "impl": label, "case": name, "texts": total, "tokens": tokens,
                    "seconds": best, "texts_per_s": total as f64 / best, "tokens_per_s": tokens as f64 / best,
                })
            );
        }
    }
    if let Some(ce_dir) = std::env::var_os("RAGD_BENCH_RERANK") {
        if filter.is_none_or(|f| "rerank/q50".contains(f)) {
            rerank::<B>(label, ce_dir.as_ref());
        }
    }
    // Last, so that a slow cold warm-up cannot cost the figures above: what
    // a GPU node's start spends on its warm-up (with the kernels the cases
    // above compiled, as after a node's first start).
    if filter.is_none_or(|f| "warm-up".contains(f)) {
        // The daemon's default batch limits (config/default.toml).
        let policy = BatchPolicy {
            max_tokens: 8192,
            max_batch: 64,
        };
        let enc = Encoder::<B>::load(dir.as_ref(), policy, &Default::default()).expect("model");
        let t = Instant::now();
        let shapes = enc.warm_up().unwrap();
        if shapes > 0 {
            println!(
                "{}",
                serde_json::json!({
                    "impl": label, "case": "warm-up", "shapes": shapes,
                    "seconds": t.elapsed().as_secs_f64(),
                })
            );
        }
    }
}

/// Cross-encoder throughput: 16 questions, each against the same 50
/// chunk-sized passages (the query path's candidates), in pairs/s and
/// tokens/s. The same case as `st_embed.py --rerank`.
fn rerank<B: ragd_actors::model::Backend>(label: &str, dir: &std::path::Path)
where
    B::Device: Default,
{
    let policy = BatchPolicy {
        max_tokens: usize::MAX,
        max_batch: 50,
    };
    let ce = CrossEncoder::<B>::load(dir, policy, &Default::default()).expect("cross-encoder");
    let passages: Vec<String> = (0..50).map(|i| text(1000 + i, 170)).collect();
    let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
    let questions: Vec<String> = (0..16).map(|i| text(5000 + i, 8)).collect();
    for q in &questions {
        ce.score(q, &refs).unwrap(); // warm-up (kernel compilation on a GPU)
    }
    let mut best = f64::MAX;
    for _ in 0..2 {
        let t = Instant::now();
        for q in &questions {
            ce.score(q, &refs).unwrap();
        }
        best = best.min(t.elapsed().as_secs_f64());
    }
    let pairs = questions.len() * refs.len();
    println!(
        "{}",
        serde_json::json!({
            "impl": label, "case": "rerank/q50", "texts": pairs,
            "seconds": best, "pairs_per_s": pairs as f64 / best,
            "ms_per_question": best * 1e3 / questions.len() as f64,
        })
    );
}
