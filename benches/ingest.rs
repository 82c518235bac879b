//! Ingest at scale (issue #5, goal 5): N files dropped at once into the
//! watched folder of a running `ragd up` (embedded store, default
//! pipeline). Reports
//!
//! * the daemon's throughput, from the drop to the last file indexed. The
//!   files are written into a staging folder first and dropped as one
//!   folder rename into the watched tree (as a `mv` of a folder into a
//!   share does), so the writing costs the measured window nothing;
//! * the reference: the embedder's own throughput on a sample of the same
//!   texts, in this process before the daemon starts and again after its
//!   burst (same model, same batch limits as the daemon's config, same
//!   GEMM library), so the ratio says how much the pipeline around the
//!   model costs;
//! * where the burst's CPU went: the model's threads' share, the rest of
//!   the daemon's CPU per document, the idle share, and context switches
//!   per document (each wakes a thread, and a wake-up on a core the model
//!   is using stalls the model's other thread at its next join);
//! * the daemon's peak RSS (VmHWM, model included), at the end of the
//!   burst and after the HNSW build that follows it (the index is built
//!   when the writes pause; until then new points are searched
//!   exhaustively), with that build's time;
//! * whether every file is accounted for: seen = indexed = N, N points (one
//!   chunk per file), none skipped or dead-lettered.
//!
//! Build with the test build's features and profile, then run:
//!
//!     cargo test --workspace --bench ingest --no-run
//!     RAGD_BLAS=$(./ops/fetch-blas.sh) RAGD_BENCH_FILES=100000 \
//!         ~/.cache/ragd-target/debug/deps/ingest-<hash>
//!
//! RAGD_BENCH_FILES (default 10,000) and RAGD_BENCH_SAMPLE (texts for the
//! reference, default 10,000). Prints one JSON line.

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use ragd_actors::model::{BatchPolicy, Cpu, Encoder};
use std::time::{Duration, Instant};

/// File `i`: one short paragraph (about 30 tokens), one chunk.
fn doc(i: usize) -> String {
    format!(
        "Note {i}: meeting room {r} on floor {f} is booked by the {t} team every {d} for the review of ticket {i}.",
        r = i % 211,
        f = i % 17,
        t = TEAMS[i % TEAMS.len()],
        d = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"][i % 5],
    )
}

/// CPU time of a process, in clock ticks (the kernel's USER_HZ, 100 a
/// second), in all and in the model's threads (`ragd-model-N`, and the
/// batcher threads that drive them, `ragd-embedder`/`ragd-query-embed`);
/// and its threads' context switches.
#[derive(Default)]
struct ThreadCpu {
    total: u64,
    model: u64,
    switches: u64,
}

impl ThreadCpu {
    fn of(pid: u32) -> ThreadCpu {
        // utime and stime: fields 14 and 15 of stat, counted after the
        // command name (which may hold spaces) and its closing parenthesis.
        let ticks = |stat: &str| -> u64 {
            stat.rsplit_once(')')
                .map(|(_, rest)| {
                    let f: Vec<&str> = rest.split_whitespace().collect();
                    f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)
                })
                .unwrap_or(0)
        };
        let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap_or_default();
        let proc = std::path::PathBuf::from(format!("/proc/{pid}"));
        // The process's total includes threads that have exited since.
        let mut cpu = ThreadCpu {
            total: ticks(&read(proc.join("stat"))),
            ..Default::default()
        };
        for task in std::fs::read_dir(proc.join("task"))
            .into_iter()
            .flatten()
            .flatten()
        {
            let comm = read(task.path().join("comm"));
            if comm.starts_with("ragd-model")
                || comm.starts_with("ragd-embedder")
                || comm.starts_with("ragd-query-emb")
            {
                cpu.model += ticks(&read(task.path().join("stat")));
            }
            cpu.switches += read(task.path().join("status"))
                .lines()
                .filter(|l| l.contains("ctxt_switches:"))
                .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                .sum::<u64>();
        }
        cpu
    }

    /// The difference from an earlier reading (threads that exited in
    /// between lose their switches, so that count is a floor).
    fn since(&self, before: &ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            total: self.total.saturating_sub(before.total),
            model: self.model.saturating_sub(before.model),
            switches: self.switches.saturating_sub(before.switches),
        }
    }
}

fn main() {
    let n = env_usize("RAGD_BENCH_FILES", 10_000);
    let sample = env_usize("RAGD_BENCH_SAMPLE", 10_000).min(n);

    // The reference: the model alone, batch limits as config/default.toml's
    // [model] batch_max_tokens and batch_max_size (the daemon's defaults).
    let policy = BatchPolicy {
        max_tokens: 8192,
        max_batch: 64,
    };
    let texts: Vec<String> = (0..sample).map(doc).collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let enc = Encoder::<Cpu>::load(&model_dir(), policy, &Default::default()).expect("model");
    enc.embed(&refs[..refs.len().min(256)]).unwrap(); // warm-up
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // The share of the cores that `ticks` of CPU make over `secs`.
    let share = |ticks: u64, secs: f64| ticks as f64 / 100.0 / (cores * secs);
    // Docs/s, and the share of the cores the model used meanwhile (its
    // serial steps, tokenising for one, leave a core idle).
    let reference = || {
        let cpu = ThreadCpu::of(std::process::id());
        let t = Instant::now();
        // In the daemon's unit of work: the embedder hands the model the
        // chunks of the documents it has (at most max_in_flight, 256).
        for part in refs.chunks(256) {
            enc.embed(part).unwrap();
        }
        let took = t.elapsed().as_secs_f64();
        let used = ThreadCpu::of(std::process::id()).since(&cpu).total;
        (sample as f64 / took, share(used, took))
    };
    // Measured before the daemon starts and again once it is idle after
    // the burst; the ratio is against their mean, so a machine that drifts
    // (a shared VM) over the run does not bias it either way.
    let (reference_before, reference_cpu_before) = reference();

    let ws = Workspace::with_extra(&std::env::var("RAGD_BENCH_EXTRA").unwrap_or_default());
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |_| true);
    // Staged beside the watched folder (same filesystem, so the rename is
    // one atomic step), then dropped.
    let staging = ws.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let t = Instant::now();
    for i in 0..n {
        std::fs::write(staging.join(format!("doc-{i:06}.txt")), doc(i)).unwrap();
    }
    let written = t.elapsed();
    let cpu_before = ThreadCpu::of(d.pid());
    let started = Instant::now();
    std::fs::rename(&staging, ws.kb().join("burst")).unwrap();
    let ledger = d.wait_ledger(Duration::from_secs(4 * 3600), |l| {
        let done = ["indexed", "skipped", "dead_lettered"]
            .iter()
            .map(|k| l[k].as_u64().unwrap_or(0))
            .sum::<u64>();
        done >= n as u64
    });
    let took = started.elapsed();
    let cpu = ThreadCpu::of(d.pid()).since(&cpu_before);
    let rss_ingest_mib = d.peak_rss_kib() / 1024;
    // Counted now, not before the drop: a build that `optimize_every`
    // started during the burst and finished is not the one after it.
    let builds_before = d.admin_json("/index")["optimizations"]
        .as_u64()
        .unwrap_or(0);
    // Then the HNSW build the pause after the burst starts: its time, and
    // the peak memory with it.
    let built = Instant::now();
    let deadline = built + Duration::from_secs(3600);
    loop {
        let index = d.admin_json("/index");
        if index["optimizations"].as_u64().unwrap_or(0) > builds_before
            && index["optimizing"] == false
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no index build after the burst: {index}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let build_after = built.elapsed();
    let rss_mib = d.peak_rss_kib() / 1024;
    let points = d.admin_json("/index")["points"].as_u64().unwrap_or(0);
    let rate = n as f64 / took.as_secs_f64();
    let (reference_after, reference_cpu_after) = reference();
    let reference = (reference_before + reference_after) / 2.0;
    let per_doc_ms = |ticks: u64| ticks as f64 * 10.0 / n as f64;
    // The model's pass sizes during the run (the batcher logs each pass at
    // debug level): small passes cost more per text.
    let log = d.log();
    let pass_field = |l: &str, field: &str| -> Option<u64> {
        l.split(field)
            .nth(1)?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    let pass_lines = || log.lines().filter(|l| l.contains("embedding pass"));
    let mut passes: Vec<usize> = pass_lines()
        .filter_map(|l| pass_field(l, "texts=").map(|n| n as usize))
        .collect();
    // The model thread's waits for work before each pass (the first one
    // included the idle time before the burst, so it is left out).
    let waited_s = pass_lines()
        .filter_map(|l| pass_field(l, "waited_us="))
        .skip(1)
        .sum::<u64>() as f64
        / 1e6;
    passes.sort_unstable();
    let pct = |p: f64| {
        passes
            .get(((passes.len() as f64 - 1.0) * p) as usize)
            .copied()
    };
    let accounted = ledger["seen"].as_u64() == Some(n as u64)
        && ledger["indexed"].as_u64() == Some(n as u64)
        && ledger["skipped"].as_u64() == Some(0)
        && ledger["dead_lettered"].as_u64() == Some(0)
        && points == n as u64;
    println!(
        "{}",
        serde_json::json!({
            "case": format!("ingest/{n}"),
            "gemm": ragd_actors::model::gemm_name(),
            "files": n,
            "write_s": written.as_secs_f64(),
            "seconds": took.as_secs_f64(),
            "docs_per_s": rate,
            "embedder_docs_per_s": reference,
            "embedder_docs_per_s_before_after": [reference_before, reference_after],
            "reference_sample": sample,
            "ratio": rate / reference,
            // Where the burst's CPU went: the model's threads, the rest of
            // the daemon (per document), and the cores' time neither used.
            "embedder_cpu_share": (reference_cpu_before + reference_cpu_after) / 2.0,
            "cpu_model_share": share(cpu.model, took.as_secs_f64()),
            "cpu_pipeline_ms_per_doc": per_doc_ms(cpu.total.saturating_sub(cpu.model)),
            "cpu_idle_share": 1.0 - share(cpu.total, took.as_secs_f64()),
            "context_switches_per_doc": cpu.switches as f64 / n as f64,
            // The share of the burst the model thread sat waiting for texts.
            "model_starved_share": waited_s / took.as_secs_f64(),
            "peak_rss_mib_ingest": rss_ingest_mib,
            "index_build_after_s": build_after.as_secs_f64(),
            "peak_rss_mib": rss_mib,
            "points": points,
            "passes": passes.len(),
            "pass_texts_p10_p50_p90": [pct(0.1), pct(0.5), pct(0.9)],
            "ledger": ledger,
            "every_file_accounted_for": accounted,
        })
    );
    if !accounted {
        eprintln!("not every file is accounted for: {ledger}, {points} points");
        std::process::exit(1);
    }
}
