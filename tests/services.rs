//! The query path on real services: the shared Redis semantic cache (a real
//! Valkey with the search module) and LLM answers (a local chat-completions
//! endpoint that injects faults).

mod common;
use common::*;
use ragd_actors::testkit::{FakeLlm, Step, Valkey};
use std::time::Duration;

const LEAVE_V1: &str =
    "# Parental leave\n\nParental leave is sixteen weeks at full pay for every employee.\n";
const LEAVE_V2: &str =
    "# Parental leave\n\nParental leave is twenty weeks at full pay for every employee.\n";
const QUESTION: &str = "how long is parental leave?";

fn redis_cache(v: &Valkey) -> String {
    format!(
        "[cache]\nbackend = \"redis\"\nredis_url = \"{}\"\nredis_index = \"e2e-cache\"\n",
        v.url()
    )
}

#[test]
fn two_query_nodes_share_the_redis_cache_and_an_update_invalidates_it_on_both() {
    let valkey = Valkey::start();
    let a = Workspace::with_extra(&redis_cache(&valkey));
    let b = Workspace::with_extra(&redis_cache(&valkey));
    b.share_kb_of(&a);
    a.write("hr/leave.md", LEAVE_V1);
    let node_a = a.start();
    let node_b = b.start();
    for n in [&node_a, &node_b] {
        n.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);
    }

    // A miss on A, stored in Redis; then a hit on B.
    let first = node_a.ask(HR_TOKEN, QUESTION);
    assert_eq!(first["cached"], false, "{first}");
    assert!(texts(&first).contains("sixteen weeks"), "{first}");
    let on_b = wait_for("B hits A's cached answer", Duration::from_secs(10), || {
        let r = node_b.ask(HR_TOKEN, QUESTION);
        (r["cached"] == true).then_some(r)
    });
    assert_eq!(on_b["sources"], first["sources"]);
    // Another principal's scope never sees it (a miss, computed afresh).
    let eng = node_b.ask(ENG_TOKEN, QUESTION);
    assert_eq!(eng["cached"], false, "{eng}");
    assert!(!texts(&eng).contains("sixteen"), "{eng}");

    // Update the cited document: both nodes index v2 and prune v1, and
    // each prune deletes the shared entry.
    a.write("hr/leave.md", LEAVE_V2);
    for n in [&node_a, &node_b] {
        // top_k 4 never hits the top_k 5 entry: this only waits for the
        // node's index to hold v2 alone.
        n.wait_until("v2 indexed", Duration::from_secs(120), || {
            let t = texts(&n.ask_top(HR_TOKEN, QUESTION, 4));
            t.contains("twenty weeks") && !t.contains("sixteen")
        });
    }
    for n in [&node_a, &node_b] {
        let r = n.ask(HR_TOKEN, QUESTION);
        let t = texts(&r);
        assert!(
            t.contains("twenty weeks") && !t.contains("sixteen"),
            "old text after the update: {r}"
        );
    }
    let metrics = metrics_text(&node_a);
    assert!(metrics.contains("ragd_cache_lookups_total"), "{metrics}");
}

/// A document indexed after a question was answered and cached is in the
/// next answer to it, not missing from a cached one until the TTL: the
/// Indexer moves its partition's generation in Redis, and every cached
/// answer whose scope sees that partition is stale. Scopes that do not see
/// it keep their cached answers.
#[test]
fn a_new_document_is_in_the_next_answer_not_missing_from_a_cached_one() {
    let valkey = Valkey::start();
    let (ws, d) = leave_answered_from_the_cache(&valkey);
    ws.write(
        "eng/build.txt",
        "# Build cache\n\nThe build cache lives on the shared runner disk.\n",
    );
    d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 2);
    let build = "where is the build cache?";
    assert_eq!(d.ask(ENG_TOKEN, build)["cached"], false);
    d.wait_until("the eng answer cached", Duration::from_secs(10), || {
        d.ask(ENG_TOKEN, build)["cached"] == true
    });
    // Written after: eng/build.txt moved eng's generation, not hr's.
    d.wait_until("the hr answer cached", Duration::from_secs(10), || {
        d.ask(HR_TOKEN, QUESTION)["cached"] == true
    });

    ws.write(
        "hr/adoption.md",
        "# Adoption leave\n\nParents who adopt get the same parental leave, starting on the day of placement.\n",
    );
    d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 3);
    let r = d.ask(HR_TOKEN, QUESTION);
    assert_eq!(r["cached"], false, "{r}");
    assert!(
        source_uris(&r).contains(&"hr/adoption.md".to_string()),
        "{r}"
    );
    assert_eq!(d.ask(ENG_TOKEN, build)["cached"], true);
    let metrics = metrics_text(&d);
    assert!(
        metrics.contains("ragd_cache_stale_generation_total"),
        "{metrics}"
    );
}

/// A daemon caching in `valkey` whose answer on parental leave (v1) is
/// cached.
fn leave_answered_from_the_cache(valkey: &Valkey) -> (Workspace, Daemon) {
    let ws = Workspace::with_extra(&redis_cache(valkey));
    ws.write("hr/leave.md", LEAVE_V1);
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);
    assert_eq!(d.ask(HR_TOKEN, QUESTION)["cached"], false);
    d.wait_until("a cache hit", Duration::from_secs(10), || {
        d.ask(HR_TOKEN, QUESTION)["cached"] == true
    });
    (ws, d)
}

#[test]
fn with_redis_down_queries_still_answer_and_the_cache_comes_back() {
    let mut valkey = Valkey::start();
    let (_ws, d) = leave_answered_from_the_cache(&valkey);

    valkey.stop();
    for _ in 0..3 {
        let r = d.ask(HR_TOKEN, QUESTION);
        assert_eq!(r["cached"], false, "{r}");
        assert!(texts(&r).contains("sixteen weeks"), "{r}");
        let took = r["timings_ms"]["total"].as_f64().unwrap();
        assert!(took < 2000.0, "a query waited {took} ms on a dead cache");
    }
    let metrics = metrics_text(&d);
    assert!(metrics.contains("ragd_cache_bypassed_total"), "{metrics}");

    // Back (empty): the daemon rebuilds the index and caches again.
    valkey.restart();
    d.wait_until("the cache to serve again", Duration::from_secs(30), || {
        d.ask(HR_TOKEN, QUESTION)["cached"] == true
    });
}

/// Redis stops answering (paused: a partition, so what it holds survives)
/// while a document changes. The update is indexed and the old version
/// pruned all the same: the invalidation is owed, not waited for (the
/// pruner used to wait a minute per attempt, and the old text stayed
/// searchable). Once Redis answers again, with the answer cached from the
/// old text still in it, no answer quotes the old text, and the cache
/// serves the new one.
#[test]
fn an_update_with_redis_unreachable_is_pruned_and_the_old_answer_never_served() {
    let valkey = Valkey::start();
    let (ws, d) = leave_answered_from_the_cache(&valkey);

    valkey.pause();
    ws.write("hr/leave.md", LEAVE_V2);
    d.wait_until(
        "the update indexed and pruned",
        Duration::from_secs(40),
        || {
            let t = texts(&d.ask(HR_TOKEN, QUESTION));
            t.contains("twenty weeks") && !t.contains("sixteen")
        },
    );
    let metrics = metrics_text(&d);
    assert!(
        metrics.contains("ragd_cache_invalidations_owed 1"),
        "{metrics}"
    );

    valkey.resume();
    for _ in 0..5 {
        let r = d.ask(HR_TOKEN, QUESTION);
        assert!(!texts(&r).contains("sixteen"), "the old text served: {r}");
    }
    d.wait_until("the new answer cached", Duration::from_secs(30), || {
        let r = d.ask(HR_TOKEN, QUESTION);
        r["cached"] == true && texts(&r).contains("twenty weeks")
    });
}

#[test]
fn a_redis_without_search_stops_the_daemon_with_a_clear_message() {
    let valkey = Valkey::start_without_search();
    let ws = Workspace::with_extra(&redis_cache(&valkey));
    let (ok, _, stderr) = ws.ragd(&["check", "--config", ws.config().to_str().unwrap()]);
    // `check` validates the config file only; `up` meets Redis.
    assert!(ok, "{stderr}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ragd"))
        .args(["up", "--config"])
        .arg(ws.config())
        .env("RAGD_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("no search module"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

fn llm_config(llm: &FakeLlm, extra: &str) -> String {
    format!(
        "[llm]\nbase_url = \"{}\"\nmodel = \"fake-model\"\napi_key_env = \"RAGD_TEST_LLM_KEY\"\nmin_backoff_ms = 50\nmax_backoff_ms = 200\n{extra}\n",
        llm.url
    )
}

#[test]
fn llm_answers_cite_sources_and_only_successful_answers_are_cached() {
    // Every attempt of the first query fails (1 try + 2 retries); the
    // second's answer is cut off at max_tokens.
    let llm = FakeLlm::start(vec![
        Step::Status(500, None),
        Step::Status(429, None),
        Step::Status(503, None),
        Step::Reply("Parental leave is", "length"),
    ]);
    let ws = Workspace::with_extra(&llm_config(&llm, "max_retries = 2"));
    ws.write("hr/leave.md", LEAVE_V1);
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);

    let failed = d.ask(HR_TOKEN, QUESTION);
    assert!(failed["answer"].is_null(), "{failed}");
    let why = failed["answer_error"].as_str().unwrap_or_default();
    assert!(why.contains("3 attempt") && why.contains("503"), "{failed}");
    // The provider's response is for the node's log, not for principals.
    assert!(!why.contains("scripted failure"), "{failed}");
    assert!(
        texts(&failed).contains("sixteen weeks"),
        "sources still returned: {failed}"
    );
    assert_eq!(llm.arrivals().len(), 3);

    // Not cached: the next asker gets a fresh attempt. Its answer is cut
    // short: shown, but not cached either.
    std::thread::sleep(Duration::from_millis(300));
    let cut = d.ask(HR_TOKEN, QUESTION);
    assert_eq!(cut["cached"], false, "a failed answer was cached: {cut}");
    assert_eq!(cut["answer"], "Parental leave is", "{cut}");
    assert_eq!(cut["answer_incomplete"], true, "{cut}");
    assert!(texts(&cut).contains("sixteen weeks"), "{cut}");
    std::thread::sleep(Duration::from_millis(300));
    let ok = d.ask(HR_TOKEN, QUESTION);
    assert_eq!(ok["cached"], false, "a cut-short answer was cached: {ok}");
    let answer = ok["answer"].as_str().unwrap_or_default();
    assert!(
        answer.contains("sixteen weeks") && answer.contains("[1]"),
        "{ok}"
    );
    assert!(ok.get("answer_error").is_none(), "{ok}");
    assert!(ok.get("answer_incomplete").is_none(), "{ok}");
    // The prompt carried the reranked sources, numbered.
    let prompt = llm.requests()[4]["messages"][1]["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(prompt.contains("[1] hr/leave.md"), "{prompt}");
    assert_eq!(llm.requests()[4]["model"], "fake-model");

    // That one is cached, answer included; the LLM is not called again.
    let calls = llm.arrivals().len();
    let hit = d.wait_for_cached(QUESTION);
    assert_eq!(hit["answer"], ok["answer"]);
    assert_eq!(llm.arrivals().len(), calls);
}

#[test]
fn the_api_key_comes_from_the_named_environment_variable() {
    let llm = FakeLlm::start(vec![]);
    let ws = Workspace::with_extra(&llm_config(&llm, ""));
    ws.write("hr/leave.md", LEAVE_V1);
    let d = Daemon::start_with_env(&ws, &[("RAGD_TEST_LLM_KEY", "sk-test-123")]);
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);
    let r = d.ask(HR_TOKEN, QUESTION);
    assert!(r["answer"].is_string(), "{r}");
    assert_eq!(llm.auth_headers()[0].as_deref(), Some("Bearer sk-test-123"));
    assert!(
        !d.log().contains("sk-test-123"),
        "the key leaked into the log"
    );
}

#[test]
fn the_daemon_runs_on_the_qdrant_backend_through_qdrant_client() {
    use ragd_actors::testkit::qdrant::QdrantTestServer;
    let server = QdrantTestServer::start();
    let ws = Workspace::with_extra(&format!(
        "[index]\nbackend = \"qdrant\"\nqdrant_url = \"{}\"\nqdrant_collection = \"e2e\"\nshard_number = 2\n",
        server.url
    ));
    ws.write("hr/leave.md", LEAVE_V1);
    ws.write(
        "eng/oncall.md",
        "# On-call\n\nThe on-call engineer carries the pager for one week and gets a day off after.\n",
    );
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 2);
    // One shard key per division, each holding its own documents.
    assert_eq!(
        server.shard_keys("e2e"),
        vec!["eng".to_string(), "hr".to_string()]
    );
    assert_eq!(server.sharding("e2e"), Some((2, 1)));
    assert!(server.points_in("e2e", "hr") >= 1 && server.points_in("e2e", "eng") >= 1);

    let r = d.ask(HR_TOKEN, QUESTION);
    assert!(texts(&r).contains("sixteen weeks"), "{r}");
    assert!(source_uris(&r).iter().all(|u| u.starts_with("hr/")), "{r}");
    // The eng reader's search never addressed the hr shard key.
    let e = d.ask(ENG_TOKEN, QUESTION);
    assert!(!texts(&e).contains("sixteen"), "{e}");
    let last = server
        .calls()
        .into_iter()
        .rfind(|c| c.method == "query")
        .unwrap();
    assert_eq!(last.shard_keys, vec!["eng".to_string()]);

    // Update and delete go through the server too.
    ws.write("hr/leave.md", LEAVE_V2);
    d.wait_until("v2 only", Duration::from_secs(120), || {
        let t = texts(&d.ask_top(HR_TOKEN, QUESTION, 4));
        t.contains("twenty weeks") && !t.contains("sixteen")
    });
    std::fs::remove_file(ws.kb().join("hr/leave.md")).unwrap();
    d.wait_until("the document gone", Duration::from_secs(120), || {
        server.points_in("e2e", "hr") == 0
    });

    // A search the server refuses is a 500: asking again will not help.
    server.reject_next("query");
    let body = serde_json::json!({ "question": "who carries the pager?" }).to_string();
    let (status, resp) = d.query_raw(Some(ENG_TOKEN), &body);
    assert_eq!(status, 500, "{resp}");
    let why = resp["error"].as_str().unwrap();
    assert!(why.contains("the vector store failed the search"), "{why}");

    // With the server gone a query fails with a 503 that says what failed
    // but not where the backend lives: that is for the node's log.
    let url = server.url.clone();
    drop(server);
    let (status, resp) = d.query_raw(Some(ENG_TOKEN), &body);
    assert_eq!(status, 503, "{resp}");
    let why = resp["error"].as_str().unwrap();
    assert!(why.contains("the vector store did not answer"), "{why}");
    let host = url.trim_start_matches("http://");
    assert!(!why.contains(host), "{why}");
    assert!(d.log().contains(host), "the log lacks the details");
}

/// A node switched from the embedded store to Qdrant fills the new
/// collection without embedding again what the embedded store, still in
/// its data folder, holds.
#[test]
fn a_switch_to_qdrant_reuses_the_embedded_store_s_vectors() {
    use ragd_actors::testkit::qdrant::QdrantTestServer;
    let server = QdrantTestServer::start();
    let ws = Workspace::new();
    ws.write("hr/leave.md", LEAVE_V1);
    ws.write("eng/build.txt", "The build cache is cleaned nightly.\n");
    let out = ws.ingest(&[]);
    let chunks: f64 = out
        .split_once("chunks: ")
        .and_then(|(_, rest)| rest.split_once(" embedded, 0 reused"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("{out}"));
    assert!(chunks >= 2.0, "{out}");

    let cfg = ws.config();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let qdrant = text.replacen(
        "[[sources]]",
        &format!(
            "[index]\nbackend = \"qdrant\"\nqdrant_url = \"{}\"\nqdrant_collection = \"moved\"\n[[sources]]",
            server.url
        ),
        1,
    );
    std::fs::write(&cfg, qdrant).unwrap();
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 2);
    let counted =
        |v: &str| metric_where(&d, "ragd_embedder_chunks_total", &format!("vector=\"{v}\""));
    assert_eq!((counted("embedded"), counted("reused")), (0.0, chunks));
    let points = server.points_in("moved", "hr") + server.points_in("moved", "eng");
    assert_eq!(points as f64, chunks);
    let r = d.ask(HR_TOKEN, QUESTION);
    assert!(texts(&r).contains("sixteen weeks"), "{r}");
    assert!(d.log().contains("is still there"), "{}", d.log());
}

/// While the Qdrant server does not answer, the indexer pauses (admin
/// /actors says so) instead of spending the documents' attempts: nothing is
/// dead-lettered, however long it lasts, and once the server is back every
/// document written meanwhile is indexed.
#[test]
fn a_qdrant_outage_pauses_indexing_and_dead_letters_nothing() {
    use ragd_actors::testkit::qdrant::QdrantTestServer;
    let server = QdrantTestServer::start();
    // Quick retries everywhere: without the pause, three attempts 50 and
    // 100 ms apart would take each document to the DLQ within a second.
    let ws = Workspace::with_extra(&format!(
        "[index]\nbackend = \"qdrant\"\nqdrant_url = \"{}\"\nqdrant_collection = \"outage\"\nmax_retries = 1\n[pipeline]\nretry_base_ms = 50\nretry_cap_ms = 400\n",
        server.url
    ));
    ws.write("hr/leave.md", LEAVE_V1);
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);

    server.go_down();
    for i in 0..3 {
        ws.write(&format!("eng/note-{i}.md"), note(i));
    }
    d.wait_until("the indexer paused", Duration::from_secs(60), || {
        actor(&d, "indexer")["status"] == "paused"
    });
    let why = actor(&d, "indexer")["last_error"].to_string();
    assert!(
        why.contains("qdrant") && why.contains("unavailable"),
        "{why}"
    );
    // Dozens of attempts' worth of time.
    std::thread::sleep(Duration::from_secs(4));
    let ledger = d.ledger();
    assert_eq!(ledger["dead_lettered"], 0, "{ledger}");
    assert_eq!(ledger["indexed"], 1, "{ledger}");
    assert_eq!(actor(&d, "indexer")["status"], "paused");
    assert_eq!(metric(&d, "ragd_actor_paused"), 1.0);

    server.clear_faults();
    d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 4);
    let ledger = d.ledger();
    assert_eq!(ledger["dead_lettered"], 0, "{ledger}");
    assert!(d.admin_json("/dlq")["entries"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(actor(&d, "indexer")["status"], "running");
    assert_eq!(metric(&d, "ragd_actor_paused"), 0.0);
    assert!(server.points_in("outage", "eng") >= 3);
}

/// Past `[query] max_concurrent` queries in flight, a query is shed at once
/// with 503 and Retry-After, not queued; once one finishes, the next is
/// answered. (The slow LLM holds the one slot.)
#[test]
fn queries_past_the_concurrency_limit_are_shed_with_retry_after() {
    let llm = FakeLlm::start(vec![Step::Slow(Duration::from_secs(4))]);
    let ws = Workspace::with_extra(&llm_config(&llm, ""));
    let config = std::fs::read_to_string(ws.config()).unwrap().replacen(
        "[query]\n",
        "[query]\nmax_concurrent = 1\n",
        1,
    );
    std::fs::write(ws.config(), config).unwrap();
    ws.write("hr/leave.md", LEAVE_V1);
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);

    std::thread::scope(|scope| {
        let slow = scope.spawn(|| d.ask(HR_TOKEN, QUESTION));
        wait_for(
            "the first query at the LLM",
            Duration::from_secs(30),
            || (!llm.arrivals().is_empty()).then_some(()),
        );
        let shed = reqwest::blocking::Client::new()
            .post(format!("{}/v1/query", d.query))
            .bearer_auth(HR_TOKEN)
            .json(&serde_json::json!({ "question": "who approves travel?" }))
            .send()
            .unwrap();
        assert_eq!(shed.status().as_u16(), 503);
        assert_eq!(shed.headers()["retry-after"], "1");
        let body: serde_json::Value = shed.json().unwrap();
        assert!(
            body["error"].as_str().unwrap().contains("max_concurrent"),
            "{body}"
        );
        let first = slow.join().unwrap();
        assert!(first["answer"].is_string(), "{first}");
    });
    // The slot is free again.
    let next = d.ask(HR_TOKEN, "who approves travel?");
    assert!(next["sources"].is_array(), "{next}");
    assert!(metric(&d, "ragd_queries_shed_total") >= 1.0);
}

/// A query bounded by `[query] timeout_secs`: an LLM slower than that
/// (within its own timeout) gets the caller a 504 naming the step, once
/// the time is up, not once the LLM gives up; the slot is free again and
/// the next query is answered.
#[test]
fn a_query_past_its_timeout_gets_504_naming_the_step() {
    let llm = FakeLlm::start(vec![Step::Slow(Duration::from_secs(60))]);
    let ws = Workspace::with_extra(&llm_config(&llm, "timeout_secs = 120"));
    let config = std::fs::read_to_string(ws.config()).unwrap().replacen(
        "[query]\n",
        "[query]\ntimeout_secs = 2\nmax_concurrent = 1\n",
        1,
    );
    std::fs::write(ws.config(), config).unwrap();
    ws.write("hr/leave.md", LEAVE_V1);
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);
    let t = std::time::Instant::now();
    let body = serde_json::json!({ "question": QUESTION }).to_string();
    let (status, r) = d.query_raw(Some(HR_TOKEN), &body);
    let took = t.elapsed();
    assert_eq!(status, 504, "{r}");
    let e = r["error"].as_str().unwrap();
    assert!(e.contains("within 2s") && e.contains("the LLM"), "{r}");
    assert!(took < Duration::from_secs(10), "waited {took:?}");
    // Its slot (the only one) is free: the next query is answered.
    let next = d.ask(HR_TOKEN, QUESTION);
    assert!(texts(&next).contains("sixteen weeks"), "{next}");
}

/// SIGTERM while a query waits on a slow LLM: the node stops within its
/// bounds and still shuts down in order (actors stopped, store flushed),
/// rather than waiting on the query's handler, which held the node.
#[test]
fn sigterm_during_a_slow_query_still_shuts_down_in_order() {
    let llm = FakeLlm::start(vec![Step::Slow(Duration::from_secs(120))]);
    let ws = Workspace::with_extra(&llm_config(&llm, "timeout_secs = 120"));
    ws.write("hr/leave.md", LEAVE_V1);
    let mut d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);
    let query = d.query.clone();
    std::thread::spawn(move || {
        let _ = reqwest::blocking::Client::builder()
            .timeout(None)
            .build()
            .unwrap()
            .post(format!("{query}/v1/query"))
            .bearer_auth(HR_TOKEN)
            .json(&serde_json::json!({ "question": QUESTION }))
            .send();
    });
    wait_for("the query at the LLM", Duration::from_secs(30), || {
        (!llm.arrivals().is_empty()).then_some(())
    });
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &d.child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let stopped = wait_for("the node to stop", Duration::from_secs(60), || {
        d.child.try_wait().unwrap()
    });
    assert!(stopped.success(), "{}", d.log());
    let log = d.log();
    assert!(log.contains("shut down: actors stopped"), "{log}");
}
