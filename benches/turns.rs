//! How long a small document waits for the embedding model while a long
//! one is being embedded: the embedder's batcher as the daemon starts it
//! (`[model] batch_max_size` 64: on CPU a model call is one pass of at
//! most 64 texts and 8,192 tokens; RAGD_BENCH_CALL_TEXTS sets the call's
//! texts, 256 as before 2026-12-01), the real model on CPU.
//!
//! A large request of RAGD_BENCH_CHUNKS chunk-sized texts (default 1,024,
//! ~190 tokens each: a ~1 MB document) is sent, then, RAGD_BENCH_AFTER_MS
//! later (default 1,000), a one-sentence request. Reported: the small
//! request's wait, and the reference measured in the same run: the time the
//! large request still had to go when the small one was sent, which is what
//! the small one waited before the batcher took turns (it ran each request
//! whole). Also the large request's total and its time alone (same texts,
//! nothing else sent), to show turns cost the large one nothing.
//!
//!     cargo test --workspace --bench turns --no-run
//!     RAGD_BLAS=$(./ops/fetch-blas.sh) ~/.cache/ragd-target/debug/deps/turns-<hash>
//!
//! Prints one JSON line.

#[path = "../tests/common/mod.rs"]
mod common;
use common::{env_usize, model_dir, Rng};
use ragd_actors::embedder::Batcher;
use ragd_actors::model::{AnyEncoder, BatchPolicy, Device};
use std::sync::Arc;
use std::time::{Duration, Instant};

const WORDS: &[&str] = &[
    "policy",
    "office",
    "badge",
    "visitor",
    "security",
    "review",
    "access",
    "record",
    "travel",
    "expense",
    "invoice",
    "contract",
    "deadline",
    "rotation",
    "handover",
    "deployment",
    "the",
    "a",
    "of",
    "and",
    "to",
    "every",
    "must",
    "within",
    "after",
    "before",
    "quarterly",
    "team",
];

/// A chunk of about 190 model tokens.
fn chunk(rng: &mut Rng) -> String {
    rng.words(WORDS, 180)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let chunks = env_usize("RAGD_BENCH_CHUNKS", 1024);
    let after = Duration::from_millis(env_usize("RAGD_BENCH_AFTER_MS", 1000) as u64);
    let policy = BatchPolicy {
        max_tokens: 8192,
        max_batch: 64,
    };
    // The daemon's call size on CPU; RAGD_BENCH_CALL_TEXTS=256 is what it
    // was before a call was one pass there.
    let call = env_usize(
        "RAGD_BENCH_CALL_TEXTS",
        ragd_actors::embedder::call_texts(Device::Cpu, policy.max_batch),
    );
    let encoder = Arc::new(AnyEncoder::load(&model_dir(), policy, Device::Cpu)?);
    let batcher = Batcher::start("bench-embedder", encoder, call);
    let mut rng = Rng(11);
    let large: Vec<String> = (0..chunks).map(|_| chunk(&mut rng)).collect();
    let small = vec!["Who signs off a badge exception?".to_string()];
    // Warm: the first calls pay for allocations the others reuse (a
    // reference measured cold came out 20-30% slow).
    batcher
        .embed(large[..(2 * 256).min(chunks)].to_vec())
        .await?;

    let start = Instant::now();
    let run = {
        let batcher = batcher.clone();
        let large = large.clone();
        tokio::spawn(async move {
            batcher.embed(large).await?;
            anyhow::Ok(Instant::now())
        })
    };
    tokio::time::sleep(after).await;
    let sent = Instant::now();
    batcher.embed(small).await?;
    let small_wait_s = sent.elapsed().as_secs_f64();
    let large_done = run.await??;
    let large_s = (large_done - start).as_secs_f64();

    let t = Instant::now();
    batcher.embed(large.clone()).await?;
    let alone_s = t.elapsed().as_secs_f64();
    // What the small request waited when each request ran whole: the rest
    // of the large one (alone, from the moment the small one was sent).
    let rest_s = (alone_s - (sent - start).as_secs_f64()).max(0.0);
    let r = |x: f64| (x * 1000.0).round() / 1000.0;
    println!(
        "{}",
        serde_json::json!({
            "case": format!("turns/{chunks}"),
            "small_wait_s": r(small_wait_s),
            "reference_rest_of_large_s": r(rest_s),
            "small_wait_vs_reference": r(small_wait_s / rest_s),
            "large_with_small_s": r(large_s),
            "large_alone_s": r(alone_s),
            "large_with_vs_alone": r(large_s / alone_s),
            "call_texts": call,
            "calls": chunks.div_ceil(call),
        })
    );
    Ok(())
}
