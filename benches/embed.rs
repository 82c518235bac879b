//! Embedding throughput of ragd's burn encoder: tokens/s and texts/s for
//! batch sizes 1, 32 and 128 and texts of ~16 and ~200 tokens.
//!
//!     cargo bench --bench embed            # prints one JSON object per case
//!     RAGD_BENCH_BACKEND=ndarray cargo bench --features ndarray --bench embed
//!                                          # burn ndarray + system OpenBLAS instead of flex
//!
//! `ops/bench/embed.sh` runs this and the sentence-transformers reference
//! (`ops/bench/st_embed.py`) on the same texts in the same run.

use ragd_actors::model::{BatchPolicy, Encoder};
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
        "flex" => run::<ragd_actors::model::Cpu>("ragd-burn-flex", &dir, filter.as_deref()),
        #[cfg(feature = "ndarray")]
        "ndarray" => run::<ragd_actors::model::NdArrayBlas>(
            "ragd-burn-ndarray-openblas",
            &dir,
            filter.as_deref(),
        ),
        other => {
            eprintln!(
                "unknown RAGD_BENCH_BACKEND {other:?} (flex; ndarray needs --features ndarray)"
            );
            std::process::exit(2);
        }
    }
}

fn run<B: ragd_actors::model::Backend>(label: &str, dir: &str, filter: Option<&str>)
where
    B::Device: Default,
{
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
            let texts: Vec<String> = (0..total).map(|i| text(i, words)).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let tokens: usize = enc.token_counts(&refs).unwrap().iter().sum();
            // Warm-up pass.
            enc.embed(&refs[..batch.min(total)]).unwrap();
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
}
