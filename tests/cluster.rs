//! ragd as a cluster: real `ragd` processes with different roles, talking
//! through a real Kafka-protocol broker (tansu), sharing the Qdrant-API test
//! server over qdrant-edge and a real Valkey with the search module.

mod common;
use common::*;
use ragd_actors::testkit::qdrant::QdrantTestServer;
use ragd_actors::testkit::{Tansu, Valkey};
use std::time::Duration;

struct Services {
    broker: Tansu,
    qdrant: QdrantTestServer,
    valkey: Valkey,
}

impl Services {
    /// The broker on SQLite storage: it keeps its data across a restart,
    /// and tansu 0.6.0's memory storage lost messages when two producers
    /// wrote to one topic (about half the runs of the 5-process test).
    fn start() -> Services {
        Self::with_broker(Tansu::start_persistent())
    }

    fn with_broker(broker: Tansu) -> Services {
        Services {
            broker,
            qdrant: QdrantTestServer::start(),
            valkey: Valkey::start(),
        }
    }

    /// A node's config: its name and roles, and the shared services.
    fn node(&self, name: &str, roles: &[&str]) -> Workspace {
        self.node_with(name, roles, "")
    }

    /// [`Services::node`] with more config tables.
    fn node_with(&self, name: &str, roles: &[&str], extra: &str) -> Workspace {
        Workspace::with_extra(&format!(
            "{}{}{extra}",
            kafka_node_toml(name, roles, &self.broker.brokers(), 8),
            shared_services_toml(&self.qdrant.url, &self.valkey.url(), "cluster")
        ))
    }
}

fn points(s: &Services) -> usize {
    s.qdrant.points_in("cluster", "hr") + s.qdrant.points_in("cluster", "eng")
}

#[test]
fn a_five_process_cluster_ingests_shares_the_embedding_and_answers() {
    let s = Services::start();
    let ingest = s.node("ingest-1", &["ingest"]);
    let n = 40;
    write_notes(&ingest, n);
    // The shared config names a reranker: only a query node loads it.
    let fixtures = std::env::var_os("RAGD_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/fixtures"));
    let reranker = format!(
        "[reranker]\nmodel = {:?}\n",
        fixtures.join("tiny-cross-encoder").display()
    );
    let index_ws = s.node_with("index-1", &["index"], &reranker);
    let embed_ws = [s.node("embed-1", &["embed"]), s.node("embed-2", &["embed"])];
    let query_ws = s.node("query-1", &["query"]);
    let index = index_ws.start();
    let embeds: Vec<Daemon> = embed_ws.iter().map(Workspace::start).collect();
    let query = query_ws.start();
    let ingest_d = ingest.start();

    let ledger = ingest_d.wait_ledger(Duration::from_secs(240), |l| l["indexed"] == n);
    assert_eq!(ledger["dead_lettered"], 0, "{ledger}");
    assert_eq!(points(&s), n, "one point per one-chunk note, no duplicates");

    // Both embed nodes took a share of the partitions and of the work.
    for (i, e) in embeds.iter().enumerate() {
        let actors = e.admin_json("/actors");
        assert_eq!(actors["roles"], serde_json::json!(["embed"]), "{actors}");
        let consumer = &actors["kafka"][0];
        assert_eq!(consumer["topic"], "ragd.chunks", "{actors}");
        assert!(
            !consumer["assigned"].as_array().unwrap().is_empty(),
            "embed-{} got no partition: {actors}",
            i + 1
        );
        assert!(
            actor_processed(e, "embedder") > 0,
            "embed-{} did nothing: {actors}",
            i + 1
        );
    }
    // The index node runs only the index stages.
    let actors = index.admin_json("/actors");
    let names = actors["actors"].to_string();
    assert!(
        names.contains("indexer")
            && !names.contains("embedder")
            && !names.contains("source_watcher")
            && !names.contains("reranker"),
        "{names}"
    );
    assert_eq!(actors["reranker"], "off", "{actors}");
    assert!(!index.log().contains("reranker"), "{}", index.log());
    // The ingest ledger lives on the ingest node only.
    assert_eq!(index.admin_status("/ingest"), Some(409));
    assert_eq!(index.admin_status("/ingest/sources"), Some(409));
    // `ragd status` on it shows its actors, and says where the ledger is.
    let cfg = index_ws.config();
    let (ok, out, err) = index_ws.ragd(&["status", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("indexer") && out.contains("no ingest role"),
        "{out}"
    );

    // The query node answers from what the index node wrote, scoped.
    let r = query.ask(HR_TOKEN, "where is the spare badge of office 4 kept?");
    assert!(texts(&r).contains("badge number 7004"), "{r}");
    assert!(
        source_uris(&r).iter().all(|u| !u.starts_with("eng/")),
        "{r}"
    );

    // An update flows through every stage and prunes the old version.
    ingest.write(
        "hr/note-4.md",
        "# Note 4\n\nOffice 4 moved its spare badge to the security desk.\n",
    );
    query.wait_until("v2 indexed, v1 pruned", Duration::from_secs(120), || {
        let t = texts(&query.ask_top(HR_TOKEN, "where is the spare badge of office 4 kept?", 4));
        t.contains("security desk") && !t.contains("7004")
    });
    assert_eq!(points(&s), n);
}

/// Two index nodes share the `embedded` partitions, and each prunes what
/// its own writes made old: after an update only the new version is left,
/// after a deletion nothing, whichever node the document's partition went
/// to, and both nodes settle. (A pruner in a consumer group of its own got
/// other partitions than its node's indexer, and decided with a ledger that
/// had not seen those versions: old versions stayed searchable.)
#[test]
fn two_index_nodes_each_prune_what_they_wrote() {
    let s = Services::start();
    let ingest_ws = s.node("ingest-1", &["ingest"]);
    let n = 8;
    write_notes(&ingest_ws, n);
    let index = [
        s.node("index-1", &["index"]).start(),
        s.node("index-2", &["index"]).start(),
    ];
    let query = s.node("embed-1", &["embed", "query"]).start();
    let ingest = ingest_ws.start();
    ingest.wait_ledger(Duration::from_secs(240), |l| l["indexed"] == n);
    assert_eq!(points(&s), n);
    for d in &index {
        assert!(!assigned(d).is_empty(), "{}", d.admin_json("/actors"));
    }

    for i in 0..n {
        let div = if i % 2 == 0 { "hr" } else { "eng" };
        let moved =
            format!("# Note {i}\n\nOffice {i} moved its spare badge to the security desk.\n");
        ingest_ws.write(&format!("{div}/note-{i}.md"), moved);
    }
    // Every note's new text is served, and nothing of the old.
    for token in [HR_TOKEN, ENG_TOKEN] {
        query.wait_until("every update indexed", Duration::from_secs(240), || {
            let t = texts(&query.ask_top(token, "where is the spare badge kept?", n / 2));
            t.matches("security desk").count() == n / 2 && !t.contains("badge number")
        });
    }
    // (An `indexed` event goes out once its prune is done.)
    ingest.wait_ledger(Duration::from_secs(60), |l| l["in_flight"] == 0);
    assert_eq!(points(&s), n, "old versions left");
    for gone in ["hr/note-0.md", "eng/note-1.md"] {
        std::fs::remove_file(ingest_ws.kb().join(gone)).unwrap();
    }
    let ledger = ingest.wait_ledger(Duration::from_secs(120), |l| {
        l["indexed"] == n - 2 && l["deleted"] == 2
    });
    assert_eq!(points(&s), n - 2, "{ledger}");
    let in_flight = "ragd_ingest_documents{state=\"in_flight\"}";
    for d in &index {
        d.wait_until("the index node settled", Duration::from_secs(60), || {
            metric(d, in_flight) == 0.0
        });
        assert!(
            !d.admin_json("/actors")
                .to_string()
                .contains("version_pruner"),
            "the indexer prunes on a bus"
        );
    }
}

/// A long document's embedded chunks (one message, ~5 KB a chunk) pass
/// librdkafka's default 1 MB message limit: ragd raises it on its
/// producer and on the topics it creates (bus.max_message_bytes).
#[test]
fn a_document_of_hundreds_of_chunks_crosses_the_bus() {
    let s = Services::start();
    let ws = s.node("all-1", &["ingest", "embed", "index", "query"]);
    let sections = 300;
    let handbook: String = (0..sections)
        .map(|i| {
            format!(
                "## Section {i}\n\nThe spare key of cabinet {i} is kept by the facilities desk on floor {}. {}\n\n",
                i % 7,
                "Requests for it go through the ticket queue and are answered within one working day. ".repeat(12)
            )
        })
        .collect();
    ws.write("hr/handbook.md", &handbook);
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(300), |l| l["indexed"] == 1);
    assert_eq!(ledger["dead_lettered"], 0, "{ledger}");
    let chunks = points(&s);
    assert!(
        chunks >= sections,
        "{chunks} points for {sections} sections"
    );
    let r = d.ask(HR_TOKEN, "who keeps the spare key of cabinet 299?");
    assert!(texts(&r).contains("cabinet 299"), "{r}");
}

/// Two ingest nodes on one shared mount both admit every file, and each
/// chunks what it admitted: a version with no text in it is closed in
/// both ledgers, which both settle.
#[test]
fn two_ingest_nodes_both_settle_what_either_chunker_skipped() {
    let s = Services::start();
    let a_ws = s.node("ingest-a", &["ingest"]);
    let b_ws = s.node("ingest-b", &["ingest"]);
    b_ws.share_kb_of(&a_ws);
    let c_ws = s.node("embed-index", &["embed", "index"]);
    let _c = c_ws.start();
    let n = 4;
    write_notes(&a_ws, n);
    for i in 0..4 {
        a_ws.write(&format!("hr/blob-{i}.md"), [0u8, 159, 146, 150, i]);
    }
    let a = a_ws.start();
    let b = b_ws.start();
    for (name, d) in [("ingest-a", &a), ("ingest-b", &b)] {
        let ledger = d.wait_ledger(Duration::from_secs(180), |l| {
            l["indexed"] == n && l["skipped"] == 4
        });
        assert_eq!(ledger["seen"], n + 4, "{name}: {ledger}");
    }
    assert_eq!(points(&s), n);
}

/// Two ingest nodes that watch different sources (an office's file server
/// each) over one store: each chunks what its own watcher saw, so every
/// document of both is indexed, and a node that starts leaves the other
/// office's documents alone. (With a shared chunker group, a node given
/// another office's file found neither its path nor the version in its
/// ledger, and skipped it as superseded; and a node starting took the
/// other office's documents for those of a removed source, hid them and
/// deleted them.)
#[test]
fn ingest_nodes_of_different_sources_each_index_their_own() {
    let s = Services::start();
    let a_ws = s.node("ingest-a", &["ingest"]);
    let b_ws = s.node("ingest-b", &["ingest"]);
    let config = std::fs::read_to_string(b_ws.config()).unwrap();
    std::fs::write(
        b_ws.config(),
        config.replace("name = \"kb\"", "name = \"office-b\""),
    )
    .unwrap();
    let c_ws = s.node("worker", &["embed", "index", "query"]);
    let c = c_ws.start();
    let n = 8;
    write_notes(&a_ws, n);
    write_notes(&b_ws, n);
    let settled = |d: &Daemon, name: &str| {
        let ledger = d.wait_ledger(Duration::from_secs(180), |l| l["seen"] == n);
        assert_eq!(ledger["indexed"], n, "{name}: {ledger}");
    };
    // A first, alone: B then starts on a store that holds A's documents.
    let a = a_ws.start();
    settled(&a, "ingest-a");
    let b = b_ws.start();
    settled(&b, "ingest-b");
    drop(a);
    let a = a_ws.start();
    settled(&a, "ingest-a, restarted");
    assert_eq!(points(&s), 2 * n);
    // Both offices' notes are found (none hidden or deleted).
    let r = c.ask_top(
        HR_TOKEN,
        "which office keeps its spare badge in the safe?",
        20,
    );
    let ids: Vec<&str> = (r["sources"].as_array().unwrap().iter())
        .filter_map(|h| h["doc_id"].as_str())
        .collect();
    for office in ["kb:", "office-b:"] {
        let found = ids.iter().filter(|id| id.starts_with(office)).count();
        assert_eq!(found, n / 2, "{office} hr notes: {ids:?}");
    }
    drop(b);
}

/// Deleted documents leave every node's memory: the ingest node's ledger a
/// while after the deletion settled, and the index node's once the ingest
/// node tells it (over the bus) that no older version of them is on its
/// way. What stays is indexed as before.
#[test]
fn a_deleted_document_is_forgotten_by_the_ingest_and_the_index_node() {
    let s = Services::start();
    let forget = "[pipeline]\nforget_deleted_after_secs = 1\n";
    let ingest_ws = s.node_with("ingest-1", &["ingest"], forget);
    let worker_ws = s.node_with("worker-1", &["embed", "index", "query"], forget);
    let n = 4;
    write_notes(&ingest_ws, n);
    let worker = worker_ws.start();
    let ingest = ingest_ws.start();
    ingest.wait_ledger(Duration::from_secs(240), |l| l["indexed"] == n);

    std::fs::remove_file(ingest_ws.kb().join("hr/note-0.md")).unwrap();
    let ledger = ingest.wait_ledger(Duration::from_secs(120), |l| l["forgotten"] == 1);
    assert_eq!(ledger["deleted"], 1, "{ledger}");
    assert_eq!(ledger["seen"], n, "{ledger}");
    let forgotten = "ragd_ingest_documents{state=\"forgotten\"}";
    worker.wait_until("the index node forgot it", Duration::from_secs(60), || {
        metric(&worker, forgotten) == 1.0
    });
    assert_eq!(points(&s), n - 1);
    let r = worker.ask(HR_TOKEN, "where does office 0 keep its spare badge?");
    assert!(!texts(&r).contains("7000"), "{r}");

    // Back in the source: indexed like a new document.
    ingest_ws.write("hr/note-0.md", note(0));
    ingest.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == n);
    assert_eq!(points(&s), n);
}

/// A job of a deleted document delivered again after the index node lost
/// the deletion's tombstone (here: it was restarted, and the job comes
/// late; a redelivery after a partition moves is the same). The
/// index node writes it; the ingest node sees that in the `Indexed` event,
/// finds the file still gone, and deletes the document again.
#[test]
fn a_job_delivered_again_after_a_deletion_does_not_bring_the_document_back() {
    late_job_after_a_deletion(false, false);
}

/// [`a_job_delivered_again_after_a_deletion_does_not_bring_the_document_back`]
/// once the ingest node has forgotten the deletion: the source still has
/// the last word.
#[test]
fn a_job_delivered_again_after_a_forgotten_deletion_does_not_bring_it_back() {
    late_job_after_a_deletion(true, false);
}

/// [`a_job_delivered_again_after_a_deletion_does_not_bring_the_document_back`]
/// on one node with every role: its index stage's own record of the late
/// version does not make the document the source's again.
#[test]
fn a_job_delivered_again_to_a_node_with_every_role_does_not_bring_it_back() {
    late_job_after_a_deletion(false, true);
}

/// `combined`: one node with every role, else an ingest node and a worker.
fn late_job_after_a_deletion(forgotten: bool, combined: bool) {
    let s = Services::start();
    let forget = if forgotten {
        "[pipeline]\nforget_deleted_after_secs = 1\n"
    } else {
        ""
    };
    let (ingest_ws, worker_ws) = if combined {
        let all = ["ingest", "embed", "index", "query"];
        (s.node_with("node-1", &all, forget), None)
    } else {
        let worker = s.node("worker-1", &["embed", "index", "query"]);
        (s.node_with("ingest-1", &["ingest"], forget), Some(worker))
    };
    let n = 3;
    write_notes(&ingest_ws, n);
    let mut worker = worker_ws.as_ref().map(Workspace::start);
    let mut ingest = ingest_ws.start();
    ingest.wait_ledger(Duration::from_secs(240), |l| l["indexed"] == n);
    let path = ingest_ws.kb().join("hr/note-0.md");
    std::fs::remove_file(&path).unwrap();
    ingest.wait_until("the deletion pruned", Duration::from_secs(120), || {
        points(&s) == n - 1
    });
    // ... and its job done (acked, so committed when the node stops):
    // redelivered, the deletion would come again before the late version,
    // which the index node then refuses, and the path under test here (the
    // ingest node deleting a version written after the deletion) would
    // not run.
    let index_node = worker.as_ref().unwrap_or(&ingest);
    index_node.wait_until("the deletion's job done", Duration::from_secs(60), || {
        actor_processed(index_node, "indexer") == n as u64 + 1
    });
    if forgotten {
        ingest.wait_ledger(Duration::from_secs(60), |l| l["forgotten"] == 1);
    }

    // A version seen long before the deletion, as the embed stage sent it,
    // delivered while the node with the index role is down. (Stopped, not
    // killed: it leaves the consumer groups, and its successor need not
    // wait out the broker's eviction of a dead member.)
    let (index_ws, index) = match (&worker_ws, &mut worker) {
        (Some(ws), Some(d)) => (ws, d),
        _ => (&ingest_ws, &mut ingest),
    };
    assert!(index.sigterm().success());
    produce_late_note_0(&s, path);
    *index = index_ws.start();

    let again = "ragd_watcher_deleted_again_total";
    ingest.wait_until(
        "the ingest node deleted it again",
        Duration::from_secs(120),
        || metric(&ingest, again) == 1.0,
    );
    ingest.wait_until("the late version removed", Duration::from_secs(60), || {
        points(&s) == n - 1
    });
    let r = worker
        .as_ref()
        .unwrap_or(&ingest)
        .ask(HR_TOKEN, "where is the spare badge of office 0?");
    assert!(!texts(&r).contains("late drawer"), "{r}");
    let ledger = ingest.wait_ledger(Duration::from_secs(60), |l| l["in_flight"] == 0);
    // Forgotten (or lost in the restart of a node with every role), the
    // document is new to the ledger when deleted again.
    let again = (forgotten && !combined) as u64;
    assert_eq!(
        (ledger["deleted"].as_u64(), ledger["seen"].as_u64()),
        (Some(1 + again), Some(n as u64 + again)),
        "{ledger}"
    );
}

/// A late job of an old version of a document that is still there,
/// delivered to a node with every role while it was down. Its scan finds
/// the file unchanged, which says nothing of when that version was seen:
/// the seq its store keeps does, and the old version is refused.
#[test]
fn a_late_old_version_does_not_replace_the_current_one_on_a_node_with_every_role() {
    let s = Services::start();
    let ws = s.node("node-1", &["ingest", "embed", "index", "query"]);
    let n = 3;
    write_notes(&ws, n);
    let mut d = ws.start();
    d.wait_ledger(Duration::from_secs(240), |l| l["indexed"] == n);
    assert!(d.sigterm().success());
    produce_late_note_0(&s, ws.kb().join("hr/note-0.md"));
    d = ws.start();
    d.wait_until("the late job handled", Duration::from_secs(120), || {
        actor_processed(&d, "indexer") == 1
    });
    let ledger = d.wait_ledger(Duration::from_secs(60), |l| l["in_flight"] == 0);
    assert_eq!(ledger["indexed"], n, "{ledger}");
    assert_eq!(points(&s), n);
    let r = d.ask(HR_TOKEN, "where is the spare badge of office 0?");
    assert!(!texts(&r).contains("late drawer"), "{r}");
    assert!(texts(&r).contains("7000"), "{r}");
}

/// An old version of hr/note-0.md (seen at seq 1), as the embed stage
/// would send it, written to the index nodes' topic.
fn produce_late_note_0(s: &Services, path: std::path::PathBuf) {
    use ragd_actors::indexer::actor::IndexJob;
    use ragd_actors::messages::{Chunk, DocMeta, EmbeddedDoc, Envelope, Partition};
    let doc_id = "kb:hr/note-0.md";
    let late = IndexJob::Upsert(EmbeddedDoc {
        meta: DocMeta {
            doc_id: doc_id.into(),
            source: "kb".into(),
            uri: "hr/note-0.md".into(),
            path,
            version: "0ld".into(),
            partition: Partition {
                division: "hr".into(),
                access_level: "internal".into(),
            },
            size: 40,
            seq: 1,
        },
        chunks: vec![Chunk {
            index: 0,
            text: "The spare badge of office 0 is in the old late drawer.".into(),
        }],
        vectors: vec![normalise(vec![1.0; 384])],
        keys: vec![],
    });
    let envelope = serde_json::to_string(&Envelope::new(doc_id, late)).unwrap();
    produce(s, "ragd.embedded", doc_id, &envelope);
}

/// Writes one message to `topic`, as a node (or a stray client) would.
fn produce(s: &Services, topic: &str, key: &str, payload: &str) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", s.broker.brokers())
        .create()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(producer.send(
        FutureRecord::to(topic).key(key).payload(payload),
        Duration::from_secs(10),
    ))
    .map_err(|(e, _)| e)
    .unwrap();
}

#[test]
fn a_message_with_an_unknown_envelope_version_lands_in_the_dlq() {
    let s = Services::start();
    let embed_ws = s.node("embed-1", &["embed"]);
    let embed = embed_ws.start();
    // The node created the topics at start-up.
    let payload = r#"{"v":99,"key":"kb:hr/future.md","payload":{"from":"the future","meta":{"version":"f1"}}}"#;
    produce(&s, "ragd.chunks", "kb:hr/future.md", payload);

    let entries = wait_for("the DLQ entry", Duration::from_secs(60), || {
        let list = embed.admin_json("/dlq")["entries"].clone();
        (!list.as_array().unwrap().is_empty()).then_some(list)
    });
    let e = &entries[0];
    assert_eq!(e["stage"], "bridge:ragd.chunks", "{entries}");
    assert_eq!(e["doc_id"], "kb:hr/future.md", "{entries}");
    // The version it names, so the ingest ledgers close that version.
    assert_eq!(e["version"], "f1", "{entries}");
    assert!(
        e["error"]
            .as_str()
            .unwrap()
            .contains("unknown envelope version 99"),
        "{entries}"
    );
    assert!(
        e["payload"].as_str().unwrap().contains("the future"),
        "{entries}"
    );

    // A long one is held in memory as a preview that says where the whole
    // is: every node holds every entry.
    let pad = "x".repeat(30 << 10);
    let long = format!(r#"{{"v":99,"key":"kb:hr/long.md","payload":{{"pad":"{pad}"}}}}"#);
    produce(&s, "ragd.chunks", "kb:hr/long.md", &long);
    // (Read as the page after the first entry: the topic's ids page too.)
    let after = e["id"].as_u64().unwrap();
    let entries = wait_for("the second DLQ entry", Duration::from_secs(60), || {
        let list = embed.admin_json(&format!("/dlq?after={after}"))["entries"].clone();
        (list.as_array().unwrap().len() == 1).then_some(list)
    });
    let preview = entries[0]["payload"].as_str().unwrap();
    assert!(
        preview.starts_with(r#"{"v":99,"key":"kb:hr/long.md""#),
        "{preview}"
    );
    assert!(preview.len() < 5 << 10, "{}", preview.len());
    assert!(
        preview.ends_with(&format!(
            "[cut here: {} bytes in all; the whole payload is in the DLQ topic ragd.dlq at \
             offset 1]",
            long.len()
        )),
        "{}",
        &preview[4000..]
    );
    // The node is still healthy and consuming.
    assert_eq!(embed.get_status("/health"), Some(200));
}

fn assigned(d: &Daemon) -> Vec<i64> {
    let actors = d.admin_json("/actors");
    actors["kafka"][0]["assigned"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_i64()).collect())
        .unwrap_or_default()
}

// Needs a broker whose group coordinator re-forms the group when a member
// stops heartbeating: real Kafka does, tansu 0.6.0 does with the patch that
// ops/services.sh applies (ops/tansu-rebalance-on-eviction.patch).
#[test]
fn killing_an_embed_node_mid_ingest_loses_nothing_and_duplicates_nothing() {
    let s = Services::start();
    let ingest = s.node("ingest-1", &["ingest"]);
    // Enough work (~10 s on 2 cores) that the kill lands mid-ingest.
    let n = 400;
    write_notes(&ingest, n);
    let index = s.node("index-1", &["index"]).start();
    let embed_ws = [s.node("embed-1", &["embed"]), s.node("embed-2", &["embed"])];
    let mut embeds: Vec<Daemon> = embed_ws.iter().map(Workspace::start).collect();
    let ingest_d = ingest.start();
    // Kill only once both nodes own partitions and the victim has work in
    // hand, so its share must move to the survivor.
    ingest_d.wait_until("both embed nodes working", Duration::from_secs(240), || {
        embeds.iter().all(|e| !assigned(e).is_empty())
            && actor_processed(&embeds[0], "embedder") > 0
    });
    let before = ingest_d.ledger()["indexed"].as_u64().unwrap_or(0);
    assert!(before < n as u64, "all indexed before the kill: {before}");
    let survivor_before = assigned(&embeds[1]);
    embeds[0].kill9();

    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    while ingest_d.ledger()["indexed"] != n && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
    if ingest_d.ledger()["indexed"] != n {
        let log = embeds[1].log();
        let events: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("assigned") || l.contains("revoked") || l.contains("Kafka"))
            .collect();
        panic!(
            "not all indexed: {}\nsurvivor: {}\nsurvivor log: {}\nindex: {}",
            ingest_d.ledger(),
            embeds[1].admin_json("/actors"),
            events.join("\n"),
            index.admin_json("/actors")
        );
    }
    let ledger = ingest_d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == n);
    assert_eq!(ledger["dead_lettered"], 0, "{ledger}");
    assert_eq!(points(&s), n, "every note once: {ledger}");
    // The survivor took over the dead node's partitions.
    let survivor_after = assigned(&embeds[1]);
    assert!(
        survivor_after.len() > survivor_before.len(),
        "survivor had {survivor_before:?}, has {survivor_after:?}"
    );
    drop(index);
}

#[test]
fn a_poison_document_goes_to_the_dlq_topic_and_is_replayed() {
    let s = Services::start();
    let ingest = s.node("ingest-1", &["ingest"]);
    ingest.write("hr/fine.md", note(1));
    ingest.write(
        "hr/broken.pdf",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage without xref".as_slice(),
    );
    let _index = s.node("index-1", &["index"]).start();
    let _embed = s.node("embed-1", &["embed"]).start();
    let d = ingest.start();
    d.wait_ledger(Duration::from_secs(240), |l| {
        l["indexed"] == 1 && l["dead_lettered"] == 1
    });

    // `ragd dlq list` reads the cluster's DLQ from the broker.
    let config = ingest.config();
    let config = config.to_str().unwrap();
    let (ok, out, err) = ingest.ragd(&["dlq", "list", "--config", config]);
    assert!(ok, "{err}");
    let line = out
        .lines()
        .find(|l| l.contains("kb:hr/broken.pdf"))
        .unwrap_or_else(|| panic!("no DLQ entry: {out}"));
    assert!(
        line.contains("pending") && line.contains("chunker"),
        "{line}"
    );
    let id = line.split('\t').next().unwrap();

    // Replayed (still broken) by two operators at once: one replay goes
    // through, the other is told it was replayed already. A second entry,
    // the first marked replayed.
    let replays: Vec<(bool, String, String)> = std::thread::scope(|scope| {
        let replay = || ingest.ragd(&["dlq", "replay", id, "--config", config]);
        let both = [scope.spawn(replay), scope.spawn(replay)];
        both.map(|h| h.join().unwrap()).into()
    });
    assert_eq!(replays.iter().filter(|r| r.0).count(), 1, "{replays:?}");
    let refused = replays.iter().find(|r| !r.0).unwrap();
    assert!(
        format!("{}{}", refused.1, refused.2).contains("replayed already"),
        "{refused:?}"
    );
    let entries = wait_for("the replayed entry", Duration::from_secs(120), || {
        let v = d.admin_json("/dlq")["entries"].clone();
        (v.as_array().unwrap().len() == 2).then_some(v)
    });
    assert_eq!(entries[0]["replayed"], true, "{entries}");
    assert_eq!(entries[1]["doc_id"], "kb:hr/broken.pdf", "{entries}");

    // Fixed at the source: indexed through the cluster.
    ingest.write(
        "hr/broken.pdf",
        valid_pdf(&["The broken report was repaired by finance."]),
    );
    d.wait_ledger(Duration::from_secs(120), |l| {
        l["indexed"] == 2 && l["dead_lettered"] == 0
    });
}

/// An embed node given another model than the index node's (here
/// MiniLM's first three layers) cannot put its vectors in the index: the
/// index node dead-letters its documents, saying why; once the embed node
/// is put right, a replay indexes them.
#[test]
fn an_embed_node_with_another_model_cannot_write_the_index() {
    let s = Services::start();
    let ingest = s.node("ingest-1", &["ingest"]);
    ingest.write("hr/leave.md", note(1));
    let _index = s.node("index-1", &["index"]).start();
    let wrong = s.node("embed-wrong", &["embed"]);
    let three = model_variant(&wrong, "three-layers", |c| {
        c.replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 3")
    });
    std::fs::copy(config_with_model(&wrong, &three), wrong.config()).unwrap();
    let mut wrong = wrong.start();
    let d = ingest.start();
    d.wait_ledger(Duration::from_secs(240), |l| l["dead_lettered"] == 1);
    assert_eq!(points(&s), 0, "nothing of the other model's written");
    let entries = d.admin_json("/dlq")["entries"].clone();
    let entry = &entries[0];
    assert_eq!(entry["doc_id"], "kb:hr/leave.md", "{entries}");
    assert_eq!(entry["stage"], "indexer", "{entries}");
    let error = entry["error"].as_str().unwrap_or_default();
    assert!(error.contains("embedded by another model"), "{entries}");

    // Put right, and replayed.
    wrong.sigterm();
    let _embed = s.node("embed-1", &["embed"]).start();
    let config = ingest.config();
    let id = entry["id"].to_string();
    let id = id.trim_matches('"');
    let (ok, out, err) = ingest.ragd(&["dlq", "replay", id, "--config", config.to_str().unwrap()]);
    assert!(ok, "{out}{err}");
    d.wait_ledger(Duration::from_secs(120), |l| {
        l["indexed"] == 1 && l["dead_lettered"] == 0
    });
    assert!(points(&s) > 0);
}

#[test]
fn the_pipeline_waits_out_a_broker_outage_and_completes() {
    let mut s = Services::start();
    let ingest = s.node("ingest-1", &["ingest"]);
    let n = 60;
    write_notes(&ingest, n);
    let _index = s.node("index-1", &["index"]).start();
    let _embed = s.node("embed-1", &["embed"]).start();
    let d = ingest.start();
    d.wait_until("some documents indexed", Duration::from_secs(240), || {
        d.ledger()["indexed"].as_u64().unwrap_or(0) >= 5
    });
    s.broker.stop();
    std::thread::sleep(Duration::from_secs(20));
    // Nothing was lost while it was down: nothing dead-lettered either.
    assert_eq!(d.ledger()["dead_lettered"], 0);
    s.broker.restart();
    let ledger = d.wait_ledger(Duration::from_secs(300), |l| l["indexed"] == n);
    assert_eq!(ledger["dead_lettered"], 0, "{ledger}");
    assert_eq!(points(&s), n, "every note once: {ledger}");
}

/// Qdrant down while a burst goes through: the index node pauses its
/// indexer instead of spending the documents' attempts, its consumer stops
/// taking more once its queue is full, and nothing is dead-lettered; once
/// Qdrant answers again, every document is indexed once.
#[test]
fn the_pipeline_waits_out_a_qdrant_outage_and_completes() {
    let s = Services::start();
    let ingest = s.node("ingest-1", &["ingest"]);
    let n = 40;
    // Quick retries: without the pause, each document would reach the DLQ
    // within seconds.
    let quick = "[pipeline]\nretry_base_ms = 50\nretry_cap_ms = 500\n";
    let index = s.node_with("index-1", &["index"], quick).start();
    let _embed = s.node("embed-1", &["embed"]).start();
    let d = ingest.start();
    index.wait_until("the index node consumes", Duration::from_secs(120), || {
        !assigned(&index).is_empty()
    });
    // Every node is up (each checks the collection at start): Qdrant goes
    // down, then the burst comes.
    s.qdrant.go_down();
    write_notes(&ingest, n);
    index.wait_until("the indexer paused", Duration::from_secs(240), || {
        actor(&index, "indexer")["status"] == "paused"
    });
    let consumer = |d: &Daemon| d.admin_json("/actors")["kafka"][0].clone();
    index.wait_until("its consumer held back", Duration::from_secs(240), || {
        consumer(&index)["paused"] == true
    });
    std::thread::sleep(Duration::from_secs(10));
    assert_eq!(d.ledger()["dead_lettered"], 0);
    assert_eq!(d.ledger()["indexed"], 0);
    assert_eq!(actor(&index, "indexer")["status"], "paused");

    s.qdrant.clear_faults();
    let ledger = d.wait_ledger(Duration::from_secs(300), |l| l["indexed"] == n);
    assert_eq!(ledger["dead_lettered"], 0, "{ledger}");
    assert_eq!(points(&s), n, "every note once: {ledger}");
    assert_eq!(actor(&index, "indexer")["status"], "running");
}

/// A DLQ opens with every entry the topic held: `ragd dlq list` lists what
/// `open` read, and the watcher asks it about every document it sees. The
/// reader once marked a record read before it was in the list, so a
/// listing right after `open` could miss the last entry (a slow `on_entry`
/// here widens that window to certain).
#[test]
fn a_dlq_opens_with_every_entry_the_topic_holds() {
    use ragd_actors::bridge::kafka::{Kafka, KafkaDlq};
    use ragd_actors::dlq::{DeadLetters, DlqEntry, Settled};
    let broker = Tansu::start_persistent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kafka = rt
        .block_on(Kafka::connect(broker.settings("ragd.")))
        .unwrap();
    let entry = |doc: &str| DlqEntry {
        id: 0,
        at: 0,
        stage: "chunker".into(),
        error: "broken".into(),
        attempts: 3,
        doc_id: doc.into(),
        version: Some("v1".into()),
        payload: serde_json::json!({"doc": doc}),
        replayed: false,
        settled: None,
    };
    // Written as the pool writes them, from a runtime worker: an entry, its
    // replay, one whose document was then deleted (the watcher settles it),
    // and a second entry last.
    let writer = KafkaDlq::open(kafka.clone(), |_| {}).unwrap();
    let (first, deleted, second) = rt
        .block_on(rt.spawn(async move {
            let first = writer.push(entry("kb:hr/a.pdf")).unwrap();
            writer.mark_replayed(first).unwrap();
            let deleted = writer.push(entry("kb:hr/c.pdf")).unwrap();
            let settled = writer.settle("kb:hr/c.pdf", None, Settled::Deleted);
            assert_eq!(settled.unwrap(), [deleted]);
            (first, deleted, writer.push(entry("kb:hr/b.pdf")).unwrap())
        }))
        .unwrap();

    let slow = |_: &DlqEntry| std::thread::sleep(Duration::from_millis(500));
    let reader = KafkaDlq::open(kafka, slow).unwrap();
    let listed: Vec<(u64, String, &str)> = reader
        .list()
        .unwrap()
        .into_iter()
        .map(|e| (e.id, e.doc_id.clone(), e.status()))
        .collect();
    assert_eq!(
        listed,
        [
            (first, "kb:hr/a.pdf".to_string(), "replayed"),
            (deleted, "kb:hr/c.pdf".to_string(), "deleted"),
            (second, "kb:hr/b.pdf".to_string(), "pending")
        ]
    );
    assert!(reader.pending("kb:hr/b.pdf", "v1").is_some());
    assert!(reader.pending("kb:hr/c.pdf", "v1").is_none());
}
