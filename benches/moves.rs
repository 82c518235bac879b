//! Moves and edits (issue #5): what a running `ragd up` (embedded store,
//! default pipeline) spends on documents it has embedded before. N
//! documents of three sections each (three chunks) are
//!
//! 1. dropped into the watched tree as one folder (the reference: every
//!    chunk embedded, the cost a move or an edit had before the embedder
//!    reused stored vectors);
//! 2. moved, as one folder rename, to another folder of the same
//!    partition: every document takes a new name;
//! 3. edited: one section of each rewritten in place;
//! 4. rebuilt more slowly than the delete grace: the folder moved out of
//!    the tree, every document deleted, then moved back in unchanged (the
//!    time counts from the move back in; `[embedder] deleted_vectors_mb`
//!    keeps the deleted texts' vectors meanwhile).
//!
//! For each step it reports the time from the change to the last document
//! through (ledger settled, old names deleted), its ratio to step 1, and
//! the chunks the embedder embedded and reused
//! (`ragd_embedder_chunks_total`). During the move, the store's points are
//! counted every 20 ms: fewer than before means documents out of search
//! (an old name deleted before its new one was written).
//!
//! Build with the test build's features and profile, then run:
//!
//!     cargo test --workspace --bench moves --no-run
//!     RAGD_BLAS=$(./ops/fetch-blas.sh) RAGD_BENCH_FILES=1000 \
//!         ~/.cache/ragd-target/debug/deps/moves-<hash>
//!
//! RAGD_BENCH_FILES: documents (default 1,000). Prints one JSON line.

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Section `s` of document `i` (about 120 tokens), `edit` its revision.
fn section(i: usize, s: usize, edit: usize) -> String {
    let team = TEAMS[(i + s) % TEAMS.len()];
    format!(
        "## Part {s}\n\nProcedure {i}.{s} (revision {edit}): the {team} team reviews \
         ticket {i} in meeting room {r} on floor {f}. Before the review, the owner \
         collects the signed forms, checks the access list of the site, and files \
         the summary under code {code}. After the review the {team} lead sends the \
         minutes to every office that took part, archives the forms for seven years, \
         and closes ticket {i} once each action has an owner and a due date. \
         Questions about procedure {i}.{s} go to the {team} desk.\n",
        r = (i * 7 + s) % 211,
        f = (i + s) % 17,
        code = 10_000 + i * 3 + s,
    )
}

/// Document `i`, its section `edited` (if any) at revision 1.
fn doc(i: usize, edited: Option<usize>) -> String {
    let mut text = format!("# Ticket {i}\n\n");
    for s in 0..3 {
        text.push_str(&section(i, s, usize::from(edited == Some(s))));
        text.push('\n');
    }
    text
}

/// Chunks the daemon embedded and reused so far.
fn chunks(d: &Daemon) -> (f64, f64) {
    let of = |v: &str| metric_where(d, "ragd_embedder_chunks_total", &format!("vector=\"{v}\""));
    (of("embedded"), of("reused"))
}

fn main() {
    let n = env_usize("RAGD_BENCH_FILES", 1_000);
    let ws = Workspace::new();
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |_| true);

    // 1. The drop: every chunk embedded.
    let staging = ws.dir.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    for i in 0..n {
        std::fs::write(staging.join(format!("ticket-{i:05}.md")), doc(i, None)).unwrap();
    }
    let before = chunks(&d);
    let t = Instant::now();
    std::fs::rename(&staging, ws.kb().join("tickets")).unwrap();
    let ledger = d.wait_ledger(Duration::from_secs(4 * 3600), |l| l["indexed"] == n as u64);
    let ingest_s = t.elapsed().as_secs_f64();
    let after = chunks(&d);
    let ingest = (after.0 - before.0, after.1 - before.1);
    let points = d.admin_json("/index")["points"].as_u64().unwrap_or(0);

    // 2. The move, the store's points counted all the while: a document
    // out of search (its old name deleted, its new one not written yet)
    // shows as fewer points than before.
    let stop = AtomicBool::new(false);
    let lowest = AtomicU64::new(u64::MAX);
    let before = chunks(&d);
    let t = Instant::now();
    let (move_s, ledger_moved) = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let points = d.admin_json("/index")["points"].as_u64().unwrap_or(0);
                lowest.fetch_min(points, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        std::fs::create_dir_all(ws.kb().join("archive")).unwrap();
        std::fs::rename(ws.kb().join("tickets"), ws.kb().join("archive/2026")).unwrap();
        let ledger = d.wait_ledger(Duration::from_secs(4 * 3600), |l| {
            l["deleted"] == n as u64 && l["indexed"] == n as u64
        });
        let took = t.elapsed().as_secs_f64();
        // A little longer: the last old names' deletions reach the store.
        std::thread::sleep(Duration::from_secs(1));
        stop.store(true, Ordering::SeqCst);
        (took, ledger)
    });
    let after = chunks(&d);
    let moved = (after.0 - before.0, after.1 - before.1);

    // 3. One section of each document rewritten in place.
    let before = chunks(&d);
    // (Each new version is one write of the indexer's.)
    let writes = actor_processed(&d, "indexer");
    let t = Instant::now();
    for i in 0..n {
        let path = ws.kb().join(format!("archive/2026/ticket-{i:05}.md"));
        std::fs::write(path, doc(i, Some(1))).unwrap();
    }
    wait_for("the edits", Duration::from_secs(4 * 3600), || {
        let written = actor_processed(&d, "indexer") >= writes + n as u64;
        (written && d.ledger()["in_flight"] == 0).then_some(())
    });
    let edit_s = t.elapsed().as_secs_f64();
    let after = chunks(&d);
    let edited = (after.0 - before.0, after.1 - before.1);
    let points_after = d.admin_json("/index")["points"].as_u64().unwrap_or(0);

    // 4. Out of the tree past the grace, then back in as it was.
    let away = ws.dir.path().join("away");
    std::fs::rename(ws.kb().join("archive/2026"), &away).unwrap();
    d.wait_ledger(Duration::from_secs(4 * 3600), |l| {
        l["indexed"] == 0 && l["in_flight"] == 0
    });
    let points_gone = d.admin_json("/index")["points"].as_u64().unwrap_or(0);
    let before = chunks(&d);
    let t = Instant::now();
    std::fs::rename(&away, ws.kb().join("archive/2026")).unwrap();
    d.wait_ledger(Duration::from_secs(4 * 3600), |l| {
        l["indexed"] == n as u64 && l["in_flight"] == 0
    });
    let rebuild_s = t.elapsed().as_secs_f64();
    let after = chunks(&d);
    let rebuilt = (after.0 - before.0, after.1 - before.1);

    println!(
        "{}",
        serde_json::json!({
            "case": format!("moves/{n}"),
            "gemm": ragd_actors::model::gemm_name(),
            "documents": n,
            "ingest_s": ingest_s,
            "ingest_chunks_embedded_reused": [ingest.0, ingest.1],
            "move_s": move_s,
            "move_ratio": move_s / ingest_s,
            "move_chunks_embedded_reused": [moved.0, moved.1],
            "move_points_lowest": lowest.load(Ordering::SeqCst),
            "edit_s": edit_s,
            "edit_ratio": edit_s / ingest_s,
            "edit_chunks_embedded_reused": [edited.0, edited.1],
            "rebuild_s": rebuild_s,
            "rebuild_ratio": rebuild_s / ingest_s,
            "rebuild_chunks_embedded_reused": [rebuilt.0, rebuilt.1],
            "points": [points, points_after, points_gone],
            "ledger": [ledger, ledger_moved],
        })
    );
}
