//! Embedding throughput of ragd's burn encoder: tokens/s and texts/s for
//! batch sizes 1, 32 and 128 and texts of ~16 and ~200 tokens.
//!
//!     cargo bench --bench embed            # prints one JSON object per case
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
    for (label, words) in [("short", 12usize), ("chunk", 170usize)] {
        for batch in [1usize, 32, 128] {
            let name = format!("{label}/b{batch}");
            if filter.as_ref().is_some_and(|f| !name.contains(f.as_str())) {
                continue;
            }
            let policy = BatchPolicy {
                max_tokens: usize::MAX,
                max_batch: batch,
            };
            let enc =
                Encoder::<ragd_actors::model::Cpu>::load(dir.as_ref(), policy, &Default::default())
                    .expect("model");
            let total = if batch == 1 { 64 } else { batch * 4 };
            let texts: Vec<String> = (0..total).map(|i| text(i, words)).collect();
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let tokens: usize = enc.token_counts(&refs).unwrap().iter().sum();
            // Warm-up pass.
            enc.embed(&refs[..batch.min(total)]).unwrap();
            let mut best = f64::MAX;
            for _ in 0..3 {
                let t = Instant::now();
                for chunk in refs.chunks(batch) {
                    enc.embed(chunk).unwrap();
                }
                best = best.min(t.elapsed().as_secs_f64());
            }
            println!(
                "{}",
                serde_json::json!({
                    "impl": "ragd-burn-flex", "case": name, "texts": total, "tokens": tokens,
                    "seconds": best, "texts_per_s": total as f64 / best, "tokens_per_s": tokens as f64 / best,
                })
            );
        }
    }
}
