//! Where a JIT backend's cold start goes: embeds the batches given on the
//! command line on burn-wgpu (Vulkan; lavapipe runs it on a CPU) and prints
//! each call's time. With `CUBECL_DEBUG_LOG=stderr`, cubecl logs every
//! kernel compilation and autotune run in between (BENCHMARKS.md counts
//! them per call).
//!
//!     cargo run -p ragd-actors --features vulkan --example jit_probe -- 1x5 1x45 8x5-15 16x90-170
//!
//! `NxA-B`: N texts of A to B words (spread evenly), in one call.

use ragd_actors::model::{BatchPolicy, Encoder, Vulkan, VulkanF16};
use std::path::Path;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let model = std::env::var("RAGD_MODEL").unwrap_or_else(|_| "models/all-MiniLM-L6-v2".into());
    let specs: Vec<String> = std::env::args().skip(1).collect();
    match std::env::var("RAGD_PROBE_F16").is_ok() {
        false => probe::<Vulkan>(Path::new(&model), &specs),
        true => probe::<VulkanF16>(Path::new(&model), &specs),
    }
}

fn probe<B: ragd_actors::model::Backend>(model: &Path, specs: &[String]) -> anyhow::Result<()>
where
    B::Device: Default,
{
    let t = Instant::now();
    let enc = Encoder::<B>::load(model, BatchPolicy::default(), &Default::default())?;
    eprintln!("load: {:?}", t.elapsed());
    for spec in specs {
        let parse = || -> Option<(usize, usize, usize)> {
            let (n, words) = spec.split_once('x')?;
            let (lo, hi) = words.split_once('-').unwrap_or((words, words));
            Some((n.parse().ok()?, lo.parse().ok()?, hi.parse().ok()?))
        };
        let (n, lo, hi) = parse().ok_or_else(|| anyhow::anyhow!("{spec:?}: want NxA or NxA-B"))?;
        let texts: Vec<String> = (0..n)
            .map(|i| "alpha ".repeat(lo + (hi - lo) * i / n))
            .collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let t = Instant::now();
        enc.embed(&refs)?;
        eprintln!("{spec}: {:?}", t.elapsed());
    }
    Ok(())
}
