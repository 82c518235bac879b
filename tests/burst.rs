//! Bursts and crashes: thousands of files at once, kill -9 mid-ingest,
//! SIGTERM mid-ingest. Every file must end accounted for, once.

mod common;
use common::*;
use std::time::{Duration, Instant};

fn write_many(ws: &Workspace, dir: &str, n: usize) {
    let root = ws.kb().join(dir);
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..n {
        std::fs::write(
            root.join(format!("note-{i:05}.txt")),
            format!(
                "Note {i}: the meeting room {i} is booked by team {}.",
                i % 97
            ),
        )
        .unwrap();
    }
}

#[test]
fn a_burst_of_10k_files_is_accounted_for_with_bounded_memory() {
    const N: u64 = 10_000;
    let ws = Workspace::new();
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(60), |_| true);
    let started = Instant::now();
    // Straight into the watched folder, as fast as we can: far more events
    // than the kernel queue holds, so the overflow → rescan path runs too.
    write_many(&ws, "burst", N as usize);
    let ledger = d.wait_ledger(Duration::from_secs(1500), |l| {
        l["indexed"].as_u64() == Some(N)
    });
    let took = started.elapsed();
    assert_eq!(ledger["seen"].as_u64(), Some(N), "{ledger}");
    assert_eq!(ledger["dead_lettered"], 0, "{ledger}");
    assert_eq!(ledger["skipped"], 0, "{ledger}");
    let points = d.admin_json("/index")["points"].as_u64().unwrap();
    assert_eq!(points, N, "one chunk per note, no duplicates");
    let rss_mib = d.peak_rss_kib() / 1024;
    println!(
        "burst: {N} files in {:.1}s ({:.0} docs/s), peak RSS {rss_mib} MiB",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64()
    );
    // Model (~90 MB of weights, held twice during load) plus a bounded pipeline.
    assert!(rss_mib < 1536, "peak RSS {rss_mib} MiB");
    // Searchable: a question about the notes finds notes.
    let r = d.ask(HR_TOKEN, "which team booked the meeting room?");
    assert!(
        source_uris(&r).iter().all(|u| u.starts_with("burst/note-")),
        "{r}"
    );
}

#[test]
fn kill_9_mid_ingest_then_restart_completes_without_duplicates() {
    const N: u64 = 400;
    let ws = Workspace::new();
    write_many(&ws, "notes", N as usize);
    let mut d = ws.start();
    d.wait_until("some documents indexed", Duration::from_secs(300), || {
        d.ledger()["indexed"].as_u64().unwrap_or(0) >= 40
    });
    let at_kill = d.ledger();
    d.kill9();
    assert!(
        at_kill["indexed"].as_u64().unwrap() < N,
        "killed too late to test anything: {at_kill}"
    );
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(600), |l| {
        l["indexed"].as_u64() == Some(N)
    });
    assert_eq!(ledger["seen"].as_u64(), Some(N), "{ledger}");
    assert_eq!(
        d.admin_json("/index")["points"].as_u64(),
        Some(N),
        "no duplicate or stale points"
    );
}

#[test]
fn sigterm_finishes_in_flight_work_and_the_next_start_resumes() {
    const N: u64 = 300;
    let ws = Workspace::new();
    write_many(&ws, "notes", N as usize);
    let mut d = ws.start();
    d.wait_until("ingest under way", Duration::from_secs(300), || {
        d.ledger()["indexed"].as_u64().unwrap_or(0) >= 20
    });
    let status = d.sigterm();
    assert!(status.success(), "ragd exited with {status}: {}", d.log());
    assert!(d.log().contains("stopped"), "graceful shutdown logged");
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(600), |l| {
        l["indexed"].as_u64() == Some(N)
    });
    assert_eq!(
        d.admin_json("/index")["points"].as_u64(),
        Some(N),
        "{ledger}"
    );
}
