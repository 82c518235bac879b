//! Ingest throughput of real `ragd` processes: the local bus vs the Kafka
//! bus on one node, and a Kafka cluster with 1 vs 2 embed nodes. Same
//! corpus, same machine, same run; the broker is tansu on SQLite storage
//! (its memory storage lost messages under concurrent producers; see
//! BENCHMARKS.md); the vector store is the Qdrant-API test
//! server (qdrant-edge) in every case, so only the bus and the node layout
//! differ. Needs `./ops/services.sh install` (tansu, Valkey).
//!
//!     cargo bench --profile dev --bench cluster [N]     # N notes, default 600
//!
//! Prints one JSON line per case.

#[path = "../tests/common/mod.rs"]
mod common;
use common::*;
use ragd_actors::testkit::qdrant::QdrantTestServer;
use ragd_actors::testkit::{Tansu, Valkey};
use std::time::{Duration, Instant};

/// Starts the ingest node last and times it from its start to every note
/// indexed.
fn run(case: &str, n: usize, others: &[Workspace], ingest: &Workspace) {
    // RAGD_BENCH_LOG: the nodes' RAGD_LOG (e.g. ragd_actors::bridge=trace).
    let log = std::env::var("RAGD_BENCH_LOG").unwrap_or_else(|_| "info".into());
    let env = [("RAGD_LOG", log.as_str())];
    let _others: Vec<Daemon> = others
        .iter()
        .map(|w| Daemon::start_with_env(w, &env))
        .collect();
    let t = Instant::now();
    let d = Daemon::start_with_env(ingest, &env);
    d.wait_ledger(Duration::from_secs(600), |l| l["indexed"] == n);
    let s = t.elapsed().as_secs_f64();
    println!(
        "{}",
        serde_json::json!({ "case": case, "docs": n, "seconds": s, "docs_per_s": n as f64 / s })
    );
}

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(600);
    // RAGD_BENCH_CASES=cluster: only the cases whose name contains it.
    let only = std::env::var("RAGD_BENCH_CASES").unwrap_or_default();
    let qdrant = QdrantTestServer::start();
    let valkey = Valkey::start();

    // The Qdrant collection and Redis index of one case.
    let services = |case: &str| shared_services_toml(&qdrant.url, &valkey.url(), case);
    let kafka = |broker: &Tansu, name: &str, roles: &[&str]| {
        kafka_node_toml(name, roles, &broker.brokers(), 64)
    };

    // One node, local bus.
    if "local bus, 1 node".contains(only.as_str()) {
        let local = Workspace::with_extra(&services("local"));
        write_notes(&local, n);
        run("local bus, 1 node", n, &[], &local);
    }

    // One node with every role, Kafka bus: the bus's own cost.
    if "kafka bus, 1 node (all roles)".contains(only.as_str()) {
        let broker = Tansu::start_persistent();
        let one = Workspace::with_extra(&format!(
            "{}{}",
            kafka(&broker, "all-1", &["all"]),
            services("kafka1")
        ));
        write_notes(&one, n);
        run("kafka bus, 1 node (all roles)", n, &[], &one);
        drop(broker);
    }

    // A cluster: ingest, index, and 1 or 2 embed nodes (fresh broker each).
    for embeds in [1, 2] {
        if !format!("kafka cluster, {embeds} embed node(s)").contains(only.as_str()) {
            continue;
        }
        let broker = Tansu::start_persistent();
        let c = format!("embed{embeds}");
        let node = |name: &str, roles: &[&str]| {
            Workspace::with_extra(&format!("{}{}", kafka(&broker, name, roles), services(&c)))
        };
        let mut others = vec![node("index-1", &["index"])];
        for i in 0..embeds {
            others.push(node(&format!("embed-{i}"), &["embed"]));
        }
        let ingest = node("ingest-1", &["ingest"]);
        write_notes(&ingest, n);
        run(
            &format!("kafka cluster, {embeds} embed node(s)"),
            n,
            &others,
            &ingest,
        );
    }
}
