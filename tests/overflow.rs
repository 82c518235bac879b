//! A kernel event-queue overflow must not lose a file: the watcher rescans.
//!
//! inotify reads `fs.inotify.max_queued_events` when an instance is created,
//! so this test lowers it to a handful of events, starts the daemon (whose
//! watcher then gets the tiny queue), puts the limit back at once, and drops
//! far more files than the queue holds. This file is its own test binary so
//! that no other test's daemon starts while the limit is low.

mod common;
use common::*;
use std::time::Duration;

const LIMIT: &str = "/proc/sys/fs/inotify/max_queued_events";

/// Puts the kernel limit back even when the test fails.
struct Restore(String);
impl Drop for Restore {
    fn drop(&mut self) {
        let _ = std::fs::write(LIMIT, &self.0);
    }
}

#[test]
fn an_inotify_queue_overflow_triggers_a_rescan_and_nothing_is_missed() {
    const N: u64 = 1500;
    let before = std::fs::read_to_string(LIMIT).expect("inotify limits are readable on Linux");
    let restore = Restore(before.trim().to_string());
    if let Err(e) = std::fs::write(LIMIT, "16") {
        // Needs root (CI runs as root). Say so loudly rather than pass quietly.
        panic!("cannot lower {LIMIT} to force an overflow: {e}; run this test as root");
    }
    let ws = Workspace::new();
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(60), |_| true);
    drop(restore);

    let root = ws.kb().join("flood");
    std::fs::create_dir_all(&root).unwrap();
    for i in 0..N {
        std::fs::write(
            root.join(format!("memo-{i:05}.txt")),
            format!("Memo {i}: parking spot {i} belongs to desk {}.", i % 31),
        )
        .unwrap();
    }
    let ledger = d.wait_ledger(Duration::from_secs(900), |l| {
        l["indexed"].as_u64() == Some(N)
    });
    assert_eq!(ledger["seen"].as_u64(), Some(N), "{ledger}");
    assert_eq!(d.admin_json("/index")["points"].as_u64(), Some(N));
    // The overflow really happened and was handled by a rescan, not by luck.
    assert!(
        d.log().contains("queue overflow"),
        "the watcher never saw an overflow; log:\n{}",
        d.log()
    );
}
