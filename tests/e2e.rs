//! End-to-end: the real `ragd` binary on a temp folder, the real model, the
//! embedded vector store, queries over HTTP.

mod common;
use common::*;
use std::time::{Duration, Instant};

const LEAVE_V1: &str = "# Parental leave\n\nRequest parental leave through the HR portal at least four weeks ahead. Primary caregivers get twenty weeks of paid leave.\n";
const LEAVE_V2: &str = "# Parental leave\n\nRequest parental leave by emailing the people team at least six weeks ahead. Primary caregivers get twenty-six weeks of paid leave.\n";
const BUILD: &str =
    "The build cache lives on the shared NFS volume and is cleaned every night at two.\n";

/// Starts a daemon on `ws` holding the leave policy (hr) and the build
/// note (eng), both indexed: one chunk each.
fn start_with_leave_and_build(ws: &Workspace) -> Daemon {
    ws.write("hr/leave.md", LEAVE_V1);
    ws.write("eng/build.txt", BUILD);
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 2);
    d
}

#[test]
fn ingest_ask_update_delete() {
    let ws = Workspace::new();
    ws.write("hr/leave.md", LEAVE_V1);
    ws.write("eng/build.txt", BUILD);
    ws.write("notes.bin", [0u8, 1, 2, 3]);
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 2);
    assert_eq!(ledger["skipped"], 1, "{ledger}");
    assert_eq!(ledger["seen"], 3, "{ledger}");

    let r = d.ask(HR_TOKEN, "how do I request parental leave?");
    assert_eq!(r["cached"], false);
    assert!(r["answer"].is_null(), "no LLM configured: {r}");
    let top = &r["sources"][0];
    assert_eq!(top["uri"], "hr/leave.md", "{r}");
    assert_eq!(top["division"], "hr");
    assert_eq!(top["access_level"], "internal");
    assert_eq!(top["chunk_index"], 0);
    assert!(top["doc_id"].as_str().unwrap().starts_with("kb:"));
    assert!(top["text"].as_str().unwrap().contains("four weeks"));
    assert!(r["timings_ms"]["total"].as_f64().is_some());

    // Update: the new text appears and the old never again.
    ws.write("hr/leave.md", LEAVE_V2);
    let r = wait_for("the new version", Duration::from_secs(60), || {
        let r = d.ask(
            HR_TOKEN,
            "how do I request parental leave? (after the update)",
        );
        texts(&r).contains("six weeks").then_some(r)
    });
    d.wait_ledger(Duration::from_secs(60), |_| true);
    for q in [
        "how do I request parental leave?",
        "parental leave weeks",
        "HR portal four weeks",
    ] {
        let r = d.ask(HR_TOKEN, q);
        assert!(
            !texts(&r).contains("four weeks"),
            "old text after the swap: {r}"
        );
    }
    assert!(source_uris(&r).contains(&"hr/leave.md".to_string()));

    // A touch without a change re-indexes nothing.
    let before = actor_processed(&d, "indexer");
    let p = ws.kb().join("hr/leave.md");
    let f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
    f.set_modified(std::time::SystemTime::now()).unwrap();
    drop(f);
    std::thread::sleep(Duration::from_millis(1500));
    d.wait_ledger(Duration::from_secs(30), |_| true);
    assert_eq!(
        actor_processed(&d, "indexer"),
        before,
        "a touch re-indexed the document"
    );

    // Delete: gone from every answer.
    std::fs::remove_file(ws.kb().join("hr/leave.md")).unwrap();
    d.wait_ledger(Duration::from_secs(60), |l| l["deleted"] == 1);
    let r = d.ask(HR_TOKEN, "how do I request parental leave?");
    assert!(
        !source_uris(&r).contains(&"hr/leave.md".to_string()),
        "deleted file still answers: {r}"
    );
    let ledger = d.ledger();
    assert_eq!(
        (ledger["indexed"].as_u64(), ledger["deleted"].as_u64()),
        (Some(1), Some(1)),
        "{ledger}"
    );
}

/// Documents saved by Windows tools and older systems: UTF-16 with a
/// byte-order mark, Windows-1252, Shift_JIS. Each is indexed, found, and
/// quoted in its own characters.
#[test]
fn text_in_windows_and_legacy_encodings_is_indexed_and_found() {
    let ws = Workspace::new();
    let utf16 = "The parking garage under building C closes at midnight.";
    let mut bytes = vec![0xff, 0xfe];
    bytes.extend(utf16.encode_utf16().flat_map(u16::to_le_bytes));
    ws.write("parking.txt", bytes);
    ws.write(
        "cafeteria.md",
        b"# Cafeteria\n\nThe caf\xe9 serves cr\xe8me br\xfbl\xe9e every Friday afternoon.\n",
    );
    let japanese = "東京オフィスの会議室は受付で予約してください。";
    // (Shift_JIS bytes of `japanese`.)
    let sjis: Vec<u8> = [
        "93 8c 8b 9e 83 49 83 74 83 42 83 58 82 cc 89 ef 8b 63 8e ba 82 cd 8e f3 95 74 82 c5",
        "97 5c 96 f1 82 b5 82 c4 82 ad 82 be 82 b3 82 a2 81 42",
    ]
    .join(" ")
    .split(' ')
    .map(|h| u8::from_str_radix(h, 16).unwrap())
    .collect();
    ws.write("tokyo.txt", sjis);
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 3);
    assert_eq!(ledger["skipped"], 0, "{ledger}");
    for (question, uri, quoted) in [
        ("when does the parking garage close?", "parking.txt", utf16),
        (
            "what does the cafeteria serve on Fridays?",
            "cafeteria.md",
            "crème brûlée",
        ),
        ("東京オフィスの会議室の予約", "tokyo.txt", japanese),
    ] {
        let r = d.ask(ENG_TOKEN, question);
        let top = &r["sources"][0];
        assert_eq!(top["uri"], uri, "{r}");
        assert!(top["text"].as_str().unwrap().contains(quoted), "{r}");
    }
}

/// notify reports opens, and the watcher's own reads are opens: it must
/// not take them for changes, or each hash of a file schedules the next and
/// an idle daemon re-reads its whole tree forever.
#[test]
fn reading_the_files_is_not_a_change() {
    let ws = Workspace::new();
    for i in 0..20 {
        ws.write(&format!("eng/note-{i}.txt"), format!("{BUILD} Note {i}.\n"));
    }
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 20);
    let reads = metric(&d, "ragd_watcher_files_read_total");
    assert!(reads >= 20.0, "every file is read at least once: {reads}");
    // Our own readers and anyone else's: no change, nothing to read again.
    for _ in 0..3 {
        for i in 0..20 {
            std::fs::read(ws.kb().join(format!("eng/note-{i}.txt"))).unwrap();
        }
        std::thread::sleep(Duration::from_millis(700)); // past the 300 ms debounce
    }
    assert_eq!(
        metric(&d, "ragd_watcher_files_read_total"),
        reads,
        "the watcher re-read unchanged files"
    );
    // A real change still is one, and the reads stop after it.
    ws.write(
        "eng/note-0.txt",
        "The build cache moved to the object store.\n",
    );
    wait_for("the new text", Duration::from_secs(60), || {
        // Every note among the sources, so a cached answer cites the
        // changed one and is dropped when it is re-indexed.
        let r = d.ask_top(ENG_TOKEN, "where is the build cache now?", 50);
        texts(&r).contains("object store").then_some(())
    });
    let after = metric(&d, "ragd_watcher_files_read_total");
    assert!(after > reads, "the change was indexed without a read?");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(metric(&d, "ragd_watcher_files_read_total"), after);
}

#[test]
fn partitions_never_leak_also_through_the_cache() {
    let ws = Workspace::new();
    ws.write("hr/leave.md", LEAVE_V1);
    ws.write(
        "hr/salaries.md",
        "# Salary bands\n\nEngineer level three earns between sixty and seventy thousand.\n",
    );
    ws.write("eng/build.txt", BUILD);
    ws.write(
        "eng/oncall.md",
        "# On-call\n\nAcknowledge a page within five minutes and open an incident channel.\n",
    );
    ws.write("welcome.md", "# Welcome\n\nThe office opens at eight.\n");
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 5);

    let questions = [
        "how do I request parental leave?",
        "where is the build cache?",
        "what does an engineer earn?",
    ];
    for q in questions {
        for _ in 0..2 {
            let hr = d.ask(HR_TOKEN, q);
            for s in hr["sources"].as_array().unwrap() {
                assert!(
                    ["hr", "general"].contains(&s["division"].as_str().unwrap()),
                    "hr-reader got {s}"
                );
            }
            let eng = d.ask(ENG_TOKEN, q);
            for s in eng["sources"].as_array().unwrap() {
                assert!(
                    ["eng", "general"].contains(&s["division"].as_str().unwrap()),
                    "eng-reader got {s}"
                );
            }
        }
    }
    // The second ask of the same question was a cache hit, scoped to the
    // caller: the other principal's identical question was not.
    let hr = d.ask(HR_TOKEN, "how do I request parental leave?");
    assert_eq!(hr["cached"], true, "{hr}");
    let eng = d.ask(ENG_TOKEN, "how do I request parental leave?");
    assert_eq!(
        eng["cached"], true,
        "eng-reader's own earlier answer: {eng}"
    );
    assert!(
        !source_uris(&eng).iter().any(|u| u.starts_with("hr/")),
        "{eng}"
    );
    // A near-identical question hits; an unrelated one does not.
    let near = d.ask(HR_TOKEN, "How do I request parental leave");
    assert_eq!(near["cached"], true, "{near}");
    let other = d.ask(HR_TOKEN, "when does the office open?");
    assert_eq!(other["cached"], false);
}

/// A changed partition rule moves the files it covers at the next start:
/// re-indexed in the new partition, gone from the old one, although not a
/// byte of them changed, and not embedded again; the files it does not
/// cover are left alone. A file moved and moved back before it was
/// re-indexed is re-indexed all the same.
#[test]
fn a_changed_partition_rule_moves_unchanged_files() {
    let ws = Workspace::new();
    let bands =
        "# Salary bands\n\nEngineer level three earns between sixty and seventy thousand.\n";
    ws.write("hr/pay/bands.md", bands);
    ws.write("eng/build.txt", BUILD);
    let question = "what does an engineer at level three earn?";
    let mut d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 2);
    assert!(source_uris(&d.ask(HR_TOKEN, question)).contains(&"hr/pay/bands.md".to_string()));
    assert!(d.sigterm().success());

    // hr/pay is now filed under eng: the first matching rule wins.
    let config = std::fs::read_to_string(ws.config()).unwrap().replacen(
        "  [[sources.rules]]\n  prefix = \"hr\"",
        "  [[sources.rules]]\n  prefix = \"hr/pay\"\n  division = \"eng\"\n  access_level = \"internal\"\n  [[sources.rules]]\n  prefix = \"hr\"",
        1,
    );
    assert!(config.contains("hr/pay"));
    std::fs::write(ws.config(), config).unwrap();
    let d = ws.start();
    // From the first query on, before the file is embedded again: its copy
    // in the old partition went at start, so hr's readers never see it.
    let early = d.ask_top(HR_TOKEN, question, 5);
    assert!(
        !source_uris(&early).contains(&"hr/pay/bands.md".to_string()),
        "the old copy is served while the file is re-indexed: {early}"
    );
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 2);
    let eng = wait_for(
        "the file in its new partition",
        Duration::from_secs(60),
        || {
            let r = d.ask_top(ENG_TOKEN, question, 5);
            source_uris(&r)
                .contains(&"hr/pay/bands.md".to_string())
                .then_some(r)
        },
    );
    let moved = eng["sources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["uri"] == "hr/pay/bands.md")
        .unwrap();
    assert_eq!(moved["division"], "eng", "{eng}");
    d.wait_ledger(Duration::from_secs(60), |_| true);
    for q in [question, "salary bands", "sixty and seventy thousand"] {
        let hr = d.ask_top(HR_TOKEN, q, 5);
        assert!(
            !source_uris(&hr).contains(&"hr/pay/bands.md".to_string()),
            "hr-reader still sees the moved file: {hr}"
        );
    }
    assert_eq!(
        actor_processed(&d, "indexer"),
        1,
        "only the moved file is indexed again"
    );
    let chunks = |d: &Daemon, v: &str| {
        metric_where(d, "ragd_embedder_chunks_total", &format!("vector=\"{v}\""))
    };
    assert_eq!(
        (chunks(&d, "embedded"), chunks(&d, "reused")),
        (0.0, 1.0),
        "the moved file's vector is reused"
    );
    let mut d = d;
    assert!(d.sigterm().success());

    // The rule dropped, and a one-shot ingest of another file: the moved
    // file, hidden at its start, is indexed back in hr all the same (its
    // vector reused), not left out of every search until a full scan.
    let with_rule = std::fs::read_to_string(ws.config()).unwrap();
    let without = with_rule.replacen(
        "  [[sources.rules]]\n  prefix = \"hr/pay\"\n  division = \"eng\"\n  access_level = \"internal\"\n",
        "",
        1,
    );
    assert_ne!(without, with_rule);
    let only = ws.kb().join("eng/build.txt");
    let ingest_only = || ws.ingest(&[&only]);
    std::fs::write(ws.config(), &without).unwrap();
    let out = ingest_only();
    assert!(out.contains("chunks: 0 embedded, 1 reused"), "{out}");

    // The rule back, and the same ingest with the file away: hidden at
    // its start, and gone, it is deleted. Back, it is indexed as new.
    std::fs::write(ws.config(), &with_rule).unwrap();
    let bands_path = ws.kb().join("hr/pay/bands.md");
    let aside = ws.kb().with_file_name("bands.md");
    std::fs::rename(&bands_path, &aside).unwrap();
    let out = ingest_only();
    assert!(out.contains("1 deleted"), "{out}");
    std::fs::rename(&aside, &bands_path).unwrap();
    std::fs::write(ws.config(), &without).unwrap();
    let out = ws.ingest(&[]);
    assert!(out.contains("chunks: 1 embedded, 0 reused"), "{out}");

    // A start that hid it (the rule changed) and stopped before indexing
    // it anew, and the rule changed back: its stored version is the one
    // the file has again, but hidden, it is indexed anew.
    tokio::runtime::Runtime::new().unwrap().block_on(async {
        use ragd_actors::indexer::{edge::EdgeStore, Removal, VectorStore};
        let store = EdgeStore::open(&ws.data().join("index"), 384).unwrap();
        let bands = Removal::new("kb:hr/pay/bands.md", None);
        store.hide(&[bands]).await.unwrap();
        store.flush().await.unwrap();
    });
    let d = ws.start();
    wait_for("the file back in search", Duration::from_secs(60), || {
        let r = d.ask_top(HR_TOKEN, question, 5);
        source_uris(&r)
            .contains(&"hr/pay/bands.md".to_string())
            .then_some(r)
    });
    let eng = d.ask_top(ENG_TOKEN, question, 5);
    assert!(
        !source_uris(&eng).contains(&"hr/pay/bands.md".to_string()),
        "{eng}"
    );
    assert_eq!(chunks(&d, "embedded"), 0.0);
}

/// A file that grows past `max_file_bytes` is skipped, never read, and
/// what the index held of it goes: its text is no longer the file's.
#[test]
fn a_file_grown_past_the_size_limit_leaves_the_index() {
    // Two parsers at least (the default on a 2-core node is one): the
    // skip is one worker's, whichever takes the file.
    let ws = Workspace::with_extra("[chunker]\nmax_file_bytes = 2000\nmin_workers = 2\n");
    let d = start_with_leave_and_build(&ws);
    assert_eq!(actor(&d, "chunker")["workers"], 2);
    assert_eq!(d.admin_json("/index")["points"], 2);
    let question = "how do I request parental leave?";
    assert!(source_uris(&d.ask(HR_TOKEN, question)).contains(&"hr/leave.md".to_string()));

    ws.write(
        "hr/leave.md",
        format!("{LEAVE_V1}\n{}", "Appendix. ".repeat(300)),
    );
    let ledger = d.wait_ledger(Duration::from_secs(60), |l| l["skipped"] == 1);
    assert_eq!(ledger["indexed"], 1, "{ledger}");
    for q in [question, "HR portal four weeks", "parental leave"] {
        let r = d.ask_top(HR_TOKEN, q, 5);
        assert!(
            !source_uris(&r).contains(&"hr/leave.md".to_string()),
            "the skipped file still answers: {r}"
        );
    }
    // One chunk each: only the build note's is left.
    assert_eq!(d.admin_json("/index")["points"], 1);
}

/// A file overwritten with something that holds no text (binary, or
/// emptied) takes its old text out of the index with it; written again, it
/// comes back.
#[test]
fn a_file_overwritten_without_text_leaves_the_index() {
    let ws = Workspace::new();
    let d = start_with_leave_and_build(&ws);
    assert_eq!(d.admin_json("/index")["points"], 2);
    let question = "how do I request parental leave?";

    for (n, unindexable) in [&b"\x00\x01\x02binary"[..], b""].into_iter().enumerate() {
        if n > 0 {
            ws.write("hr/leave.md", LEAVE_V1);
            d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 2);
            assert_eq!(d.admin_json("/index")["points"], 2);
        }
        ws.write("hr/leave.md", unindexable);
        d.wait_ledger(Duration::from_secs(60), |l| l["skipped"] == 1);
        d.wait_until("the old text pruned", Duration::from_secs(30), || {
            d.admin_json("/index")["points"] == 1
        });
        let r = d.ask_top(HR_TOKEN, &format!("{question} ({n})"), 5);
        assert!(
            !source_uris(&r).contains(&"hr/leave.md".to_string()),
            "the old text still answers: {r}"
        );
    }

    ws.write("hr/leave.md", LEAVE_V2);
    d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 2);
    let r = d.ask_top(HR_TOKEN, question, 5);
    assert!(texts(&r).contains("six weeks"), "{r}");
    assert_eq!(d.admin_json("/index")["points"], 2);
}

/// A source configured to be polled (a network file system raises no file
/// events for other machines' changes) sees new, changed and deleted files
/// without the kernel's events.
#[test]
fn a_polled_source_sees_new_changed_and_deleted_files() {
    let ws = Workspace::new();
    let config = std::fs::read_to_string(ws.config()).unwrap().replacen(
        "access_level = \"public\"\n",
        "access_level = \"public\"\npoll_secs = 0.5\n",
        1,
    );
    std::fs::write(ws.config(), config).unwrap();
    ws.write("eng/build.txt", BUILD);
    ws.write(
        "hr/welcome.md",
        "# Welcome\n\nThe HR office opens at nine.\n",
    );
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 2);
    let reads = metric(&d, "ragd_watcher_files_read_total");
    ws.write("hr/leave.md", LEAVE_V1);
    d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 3);
    // The new file is read; its folder's new modification time makes no
    // one re-read the folder's other files.
    assert_eq!(metric(&d, "ragd_watcher_files_read_total") - reads, 1.0);
    ws.write("hr/leave.md", LEAVE_V2);
    wait_for("the changed text", Duration::from_secs(60), || {
        let r = d.ask_top(HR_TOKEN, "parental leave (poll)", 5);
        texts(&r).contains("six weeks").then_some(())
    });
    std::fs::remove_file(ws.kb().join("hr/leave.md")).unwrap();
    d.wait_ledger(Duration::from_secs(60), |l| l["deleted"] == 1);
    assert_eq!(d.admin_json("/index")["points"], 2);
}

/// "Nothing found" is not cached: the document may just not be indexed
/// yet, and the next asker must find it once it is.
#[test]
fn an_answer_without_sources_is_not_cached() {
    let ws = Workspace::new();
    ws.write("hr/leave.md", LEAVE_V1);
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);
    let question = "where is the build cache?";
    for _ in 0..2 {
        let r = d.ask(ENG_TOKEN, question);
        assert_eq!(r["sources"].as_array().unwrap().len(), 0, "{r}");
        assert_eq!(r["cached"], false, "{r}");
    }
    assert_eq!(metric(&d, "ragd_answers_not_cached_total"), 2.0);
    ws.write("eng/build.txt", BUILD);
    d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 2);
    let r = d.ask(ENG_TOKEN, question);
    assert_eq!(source_uris(&r), vec!["eng/build.txt".to_string()], "{r}");
    // An answer with sources is cached as before.
    assert_eq!(d.ask(ENG_TOKEN, question)["cached"], true);
}

#[test]
fn bad_requests_get_clear_errors_and_never_a_500() {
    let ws = Workspace::new();
    ws.write("welcome.md", "# Welcome\n\nThe office opens at eight.\n");
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 1);
    let good = r#"{"question": "when does the office open?"}"#;
    assert_eq!(d.query_raw(None, good).0, 401);
    assert_eq!(d.query_raw(Some("not-a-token"), good).0, 401);
    let post = |content_type: &str, body: String| {
        let resp = reqwest::blocking::Client::new()
            .post(format!("{}/v1/query", d.query))
            .header("content-type", content_type)
            .bearer_auth(HR_TOKEN)
            .body(body)
            .send()
            .unwrap();
        (resp.status().as_u16(), resp.text().unwrap())
    };
    // The scheme to use, on a 401 (RFC 9110).
    let anonymous = reqwest::blocking::Client::new()
        .post(format!("{}/v1/query", d.query))
        .body(good)
        .send()
        .unwrap();
    assert_eq!(anonymous.headers()["www-authenticate"], "Bearer");
    // Not JSON, or too large: said so, not a 400.
    let (status, text) = post("text/plain", good.into());
    assert_eq!(status, 415, "{text}");
    let huge = format!(r#"{{"question": "{}"}}"#, "a".repeat(100 << 10));
    let (status, text) = post("application/json", huge);
    assert!(
        status == 413 && text.contains("larger than"),
        "{status} {text}"
    );
    let (status, text) = post("application/json; charset=utf-8", good.into());
    assert_eq!(status, 200, "{text}");
    // The auth scheme's name is case-insensitive (RFC 9110).
    let lower = reqwest::blocking::Client::new()
        .post(format!("{}/v1/query", d.query))
        .header("content-type", "application/json")
        .header("authorization", format!("bearer {HR_TOKEN}"))
        .body(good)
        .send()
        .unwrap();
    assert_eq!(lower.status().as_u16(), 200);
    for (body, needle) in [
        ("{not json", "bad request body"),
        (r#"{"top_k": 5}"#, "question"),
        (r#"{"question": "   "}"#, "empty"),
        (r#"{"question": "x", "top_k": 0}"#, "top_k"),
        (r#"{"question": "x", "top_k": 100000}"#, "top_k"),
        (r#"{"question": 42}"#, "bad request body"),
        // Nothing but the model's unknown token: every such question
        // embeds alike, and the cache took one for another.
        (
            r#"{"question": "😀🎉"}"#,
            "no word the embedding model knows",
        ),
        (
            r#"{"question": "ℵ℘℘"}"#,
            "no word the embedding model knows",
        ),
    ] {
        let (status, resp) = d.query_raw(Some(HR_TOKEN), body);
        assert_eq!(status, 400, "{body} -> {resp}");
        assert!(
            resp["error"].as_str().unwrap().contains(needle),
            "{body} -> {resp}"
        );
    }
    // A known word among them is enough.
    let (status, _) = d.query_raw(Some(HR_TOKEN), r#"{"question": "office 😀?"}"#);
    assert_eq!(status, 200);
    let long = serde_json::json!({ "question": "a".repeat(5000) }).to_string();
    assert_eq!(d.query_raw(Some(HR_TOKEN), &long).0, 400);
    // Admin endpoints want the admin token; probes do not.
    assert_eq!(d.get_status("/actors"), Some(401));
    assert_eq!(d.get_status("/ready"), Some(200));
    assert_eq!(d.get_status("/metrics"), Some(200));
}

/// Text of words the model cannot spell (a key dump: each word one
/// `[UNK]`) is not indexed: all such chunks embed to one vector, and
/// thousands of copies of it buried every search of their partition (a
/// 19 MB dump answered a travel question with key chunks at -0.01, the
/// policy scoring 0.59 unreachable). A file of nothing else is skipped
/// with the reason; the prose around a key block is kept.
#[test]
fn text_the_model_cannot_read_is_not_indexed() {
    let ws = Workspace::new();
    let key = |n: usize| -> String {
        (0..n)
            .map(|i| {
                b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                    [(i * 7919 + i / 3) % 62] as char
            })
            .collect()
    };
    // Hashes, one `[UNK]` each (101 to 255 characters: longer runs are
    // taken for encoded data, as below).
    let hashes: Vec<String> = (0..2_000)
        .map(|i| key(101 + i % 150).to_lowercase())
        .collect();
    ws.write("eng/keys.txt", hashes.join("\n"));
    // Encoded data: a base64 attachment alone, and a screenshot pasted
    // into a guide as a data: URI (which was ~4,000 chunks of pieces the
    // model spells, minutes of embedding).
    ws.write("eng/attachment.txt", key(1_000_000));
    ws.write(
        "eng/guide.md",
        format!(
            "# Guide\n\nAttach a screenshot of the failing build to the ticket.\n\n\
             ![the build page](data:image/png;base64,{}==)\n",
            key(400_000)
        ),
    );
    ws.write(
        "eng/deploy.md",
        format!(
            "# Deploy\n\nRotate the signing key every ninety days.\n\n{}\n\nThe on-call engineer approves each rotation.\n",
            key(60_000)
        ),
    );
    ws.write("eng/build.txt", BUILD);
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(120), |l| {
        l["indexed"] == 3 && l["skipped"] == 2
    });
    assert_eq!(ledger["seen"], 5, "{ledger}");
    for (doc, why) in [
        ("keys.txt", "no text the model can read"),
        ("attachment.txt", "only encoded data"),
    ] {
        let page = d.admin_json(&format!("/ingest/documents?prefix=kb:eng/{doc}"));
        let reason = page["documents"][0]["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(why), "{page}");
    }
    // The prose of deploy.md and guide.md, not their key and image: a
    // chunk or two each, not thousands.
    let points = d.admin_json("/index")["points"].as_u64().unwrap();
    assert!(points <= 5, "{points} points");
    let r = d.ask(ENG_TOKEN, "what goes on a ticket about a failing build?");
    assert_eq!(r["sources"][0]["uri"], "eng/guide.md", "{r}");
    let r = d.ask(ENG_TOKEN, "how often is the signing key rotated?");
    assert_eq!(r["sources"][0]["uri"], "eng/deploy.md", "{r}");
    assert!(texts(&r).contains("ninety days"), "{r}");
}

/// PDFs that kill their parser (a stack overflow, an allocation past the
/// memory limit) kill only its child process: the daemon goes on, the
/// files go to the DLQ with the reason, and one with more text than
/// max_file_bytes is skipped.
#[test]
fn hostile_pdfs_take_down_their_parser_not_the_daemon() {
    let ws = Workspace::with_extra("[chunker]\npdf_memory_mb = 128\nmax_file_bytes = 2000000\n");
    ws.write("eng/nested.pdf", nested_pdf(200_000));
    ws.write("eng/bomb.pdf", deflated_pdf("lorem ipsum", 24_000_000));
    ws.write(
        "eng/long.pdf",
        deflated_pdf("quarterly travel budget", 100_000),
    );
    ws.write(
        "eng/expenses.pdf",
        valid_pdf(&["Submit expense reports within thirty days."]),
    );
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(180), |l| {
        l["dead_lettered"] == 2 && l["indexed"] == 1 && l["skipped"] == 1
    });
    assert_eq!(ledger["seen"], 4, "{ledger}");
    let r = d.ask(ENG_TOKEN, "how long do I have to submit an expense report?");
    assert_eq!(r["sources"][0]["uri"], "eng/expenses.pdf", "{r}");
    let reason = |id: &str| {
        let page = d.admin_json(&format!("/ingest/documents?prefix={id}"));
        page["documents"][0]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let nested = reason("kb:eng/nested.pdf");
    assert!(nested.contains("nested too deeply"), "{nested}");
    let bomb = reason("kb:eng/bomb.pdf");
    assert!(bomb.contains("needs more than 128 MiB"), "{bomb}");
    let long = reason("kb:eng/long.pdf");
    assert!(long.contains("over the 2000000 byte limit"), "{long}");
    assert_eq!(d.get_status("/health"), Some(200));
}

#[test]
fn malformed_pdf_goes_to_the_dlq_and_the_daemon_keeps_serving() {
    let ws = Workspace::new();
    ws.write("welcome.md", "# Welcome\n\nThe office opens at eight.\n");
    ws.write(
        "eng/broken.pdf",
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage without xref".as_slice(),
    );
    ws.write(
        "eng/expenses.pdf",
        valid_pdf(&["Submit expense reports within thirty days."]),
    );
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(120), |l| {
        l["dead_lettered"] == 1 && l["indexed"] == 2
    });
    assert_eq!(ledger["seen"], 3, "{ledger}");
    let r = d.ask(ENG_TOKEN, "how long do I have to submit an expense report?");
    assert_eq!(r["sources"][0]["uri"], "eng/expenses.pdf", "{r}");

    let dlq = d.admin_json("/dlq");
    assert_eq!(dlq["next"], serde_json::Value::Null, "{dlq}");
    let entry = &dlq["entries"][0];
    assert_eq!(entry["doc_id"], "kb:eng/broken.pdf");
    assert_eq!(entry["stage"], "chunker");
    assert_eq!(entry["attempts"], 3);
    assert!(entry["error"].as_str().unwrap().contains("pdf"), "{entry}");
    let (ok, out, err) = ws.ragd(&["dlq", "list", "--config", ws.config().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("kb:eng/broken.pdf") && out.contains("pending"),
        "{out}"
    );
    let actors = d.admin_json("/actors").to_string();
    assert!(
        actors.contains("malformed pdf"),
        "the chunker's last error shows: {actors}"
    );
    // Which document, and why, from the ledger: over HTTP and the CLI.
    let page = d.admin_json("/ingest/documents?status=dead_lettered");
    assert_eq!(
        page["documents"][0]["doc_id"], "kb:eng/broken.pdf",
        "{page}"
    );
    assert!(
        page["documents"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("malformed pdf"),
        "{page}"
    );
    assert_eq!(page["documents"].as_array().unwrap().len(), 1, "{page}");
    let page = d.admin_json("/ingest/documents?prefix=kb:eng/&limit=1");
    assert_eq!(
        page["documents"][0]["doc_id"], "kb:eng/broken.pdf",
        "{page}"
    );
    assert_eq!(page["next"], "kb:eng/broken.pdf", "{page}");
    let page = d.admin_json("/ingest/documents?prefix=kb:eng/&after=kb:eng/broken.pdf");
    assert_eq!(
        page["documents"][0]["doc_id"], "kb:eng/expenses.pdf",
        "{page}"
    );
    assert_eq!(page["documents"][0]["status"], "indexed", "{page}");
    assert_eq!(page["next"], serde_json::Value::Null, "{page}");
    assert_eq!(d.admin_status("/ingest/documents?status=lost"), Some(400));
    assert_eq!(d.get_status("/ingest/documents"), Some(401));
    // Each source, how it is watched, and what of it is unseen: nothing.
    let sources = d.admin_json("/ingest/sources");
    let kb = &sources["sources"][0];
    assert_eq!(kb["name"], "kb", "{sources}");
    assert_eq!(kb["watch"], "watching", "{sources}");
    assert_eq!(kb["unseen"], serde_json::Value::Null, "{sources}");
    assert_eq!(d.get_status("/ingest/sources"), Some(401));
    let (ok, out, err) = ws.ragd(&[
        "docs",
        "--status",
        "dead_lettered",
        "--config",
        ws.config().to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.starts_with("kb:eng/broken.pdf\tdead_lettered\tchunker: malformed pdf"),
        "{out}"
    );

    // Replay: the document goes through the pipeline again (and, still
    // broken, back to the DLQ as a new entry).
    let (ok, out, err) = ws.ragd(&[
        "dlq",
        "replay",
        "1",
        "--config",
        ws.config().to_str().unwrap(),
    ]);
    assert!(ok, "{out}{err}");
    let dlq = wait_for("the replayed entry", Duration::from_secs(60), || {
        let v = d.admin_json("/dlq")["entries"].clone();
        (v.as_array().unwrap().len() == 2).then_some(v)
    });
    assert_eq!(dlq[0]["replayed"], true);
    assert_eq!(dlq[1]["doc_id"], "kb:eng/broken.pdf");
    // Paged: one at a time, and only those waiting for a replay.
    let first = d.admin_json("/dlq?limit=1");
    assert_eq!(first["entries"].as_array().unwrap().len(), 1, "{first}");
    assert_eq!(first["next"], dlq[0]["id"], "{first}");
    let second = d.admin_json(&format!("/dlq?limit=1&after={}", first["next"]));
    assert_eq!(second["entries"][0]["id"], dlq[1]["id"], "{second}");
    assert_eq!(second["next"], serde_json::Value::Null, "{second}");
    let pending = d.admin_json("/dlq?pending=true")["entries"].clone();
    assert_eq!(pending.as_array().unwrap().len(), 1, "{pending}");
    assert_eq!(pending[0]["id"], dlq[1]["id"], "{pending}");
    assert_eq!(d.admin_status("/dlq?limit=0"), Some(400));
    assert_eq!(d.admin_status("/dlq?after=x"), Some(400));
    // Fixed at the source: indexed, and the ledger says so.
    ws.write(
        "eng/broken.pdf",
        valid_pdf(&["The broken report was repaired by finance."]),
    );
    d.wait_ledger(Duration::from_secs(60), |l| {
        l["indexed"] == 3 && l["dead_lettered"] == 0
    });
    let r = d.ask(ENG_TOKEN, "which report was repaired?");
    assert!(
        source_uris(&r).contains(&"eng/broken.pdf".to_string()),
        "{r}"
    );
    // And its entry waits no more: nothing is left to replay.
    let dlq = d.admin_json("/dlq")["entries"].clone();
    assert_eq!(dlq[1]["settled"], "superseded", "{dlq}");
    let pending = d.admin_json("/dlq?pending=true")["entries"].clone();
    assert_eq!(pending, serde_json::json!([]), "{pending}");
    let config = ws.config();
    let (ok, out, _) = ws.ragd(&["dlq", "list", "--config", config.to_str().unwrap()]);
    assert!(
        ok && out.lines().nth(1).unwrap().contains("\tsuperseded\t"),
        "{out}"
    );
    let id = dlq[1]["id"].to_string();
    let (ok, out, err) = ws.ragd(&["dlq", "replay", &id, "--config", config.to_str().unwrap()]);
    assert!(
        !ok && format!("{out}{err}").contains("needs no replay"),
        "{out}{err}"
    );
}

#[test]
fn no_gap_during_an_update_and_no_old_text_after_it() {
    let ws = Workspace::new();
    let d = start_with_leave_and_build(&ws);
    let question = "how do I request parental leave?";
    // Hammer the query path while the document changes.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let path = ws.kb().join("hr/leave.md");
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let tmp = path.with_file_name(".leave.md.tmp");
            std::fs::write(&tmp, LEAVE_V2).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
            std::thread::sleep(Duration::from_secs(8));
            stop.store(true, std::sync::atomic::Ordering::SeqCst);
        })
    };
    let mut swapped_at = None;
    let mut n = 0;
    let started = Instant::now();
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let r = d.ask(HR_TOKEN, question);
        n += 1;
        let t = texts(&r);
        assert!(
            source_uris(&r).contains(&"hr/leave.md".to_string()),
            "query {n}: the document was missing: {r}"
        );
        let (old, new) = (t.contains("four weeks"), t.contains("six weeks"));
        assert!(old || new, "query {n}: neither version: {r}");
        if swapped_at.is_some() {
            assert!(!old, "query {n}: old text after the swap: {r}");
        } else if new && !old {
            swapped_at = Some(started.elapsed());
        }
    }
    writer.join().unwrap();
    assert!(
        swapped_at.is_some(),
        "the update never became visible in {n} queries"
    );
    assert!(n > 10, "only {n} queries ran");
}

/// A folder renamed: its documents take their new names without being
/// embedded again (their points hold each text's vector), and a search
/// finds them all the while, under the old name until the new one is in.
#[test]
fn a_folder_moved_is_not_embedded_again_nor_missing_meanwhile() {
    const N: usize = 30;
    let ws = Workspace::new();
    for i in 0..N {
        ws.write(&format!("hr/policies/note-{i}.md"), note(i));
    }
    let d = ws.start();
    d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == N as u64);
    let chunks = |vector: &str| {
        metric_where(
            &d,
            "ragd_embedder_chunks_total",
            &format!("vector=\"{vector}\""),
        )
    };
    let embedded = chunks("embedded");
    assert_eq!(embedded, N as f64, "one chunk a note");

    let question = "where does office 3 keep its spare badge?";
    let moved = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(300));
            std::fs::rename(ws.kb().join("hr/policies"), ws.kb().join("hr/handbook")).unwrap();
            moved.store(true, std::sync::atomic::Ordering::SeqCst);
        });
        let started = Instant::now();
        let mut n = 0;
        loop {
            let r = d.ask(HR_TOKEN, question);
            n += 1;
            assert!(
                texts(&r).contains("badge number 7003"),
                "query {n}: the note was missing: {r}"
            );
            let uris = source_uris(&r);
            if moved.load(std::sync::atomic::Ordering::SeqCst)
                && uris.contains(&"hr/handbook/note-3.md".to_string())
                && !uris.iter().any(|u| u.starts_with("hr/policies/"))
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "the new names never replaced the old: {r}"
            );
        }
    });
    let ledger = d.wait_ledger(Duration::from_secs(60), |l| l["deleted"] == N as u64);
    assert_eq!(ledger["indexed"], N as u64, "{ledger}");
    assert_eq!(
        chunks("embedded"),
        embedded,
        "a moved note was embedded again"
    );
    assert_eq!(chunks("reused"), N as f64);
}

/// A folder rebuilt more slowly than the delete grace (`rm -rf site`, and
/// the build writes it again minutes later): its files leave the index
/// and every search after the grace, and come back without being embedded
/// again, their vectors kept in memory meanwhile (`[embedder]
/// deleted_vectors_mb`; with 0 they are embedded again).
#[test]
fn a_folder_rebuilt_after_the_grace_is_not_embedded_again() {
    const N: usize = 6;
    for (extra, again) in [("", 0), ("[embedder]\ndeleted_vectors_mb = 0\n", N)] {
        let ws = Workspace::with_extra(extra);
        let write = || {
            for i in 0..N {
                ws.write(&format!("hr/site/note-{i}.md"), note(i));
            }
        };
        write();
        let d = ws.start();
        d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == N as u64);
        let chunks = |vector: &str| {
            let label = format!("vector=\"{vector}\"");
            metric_where(&d, "ragd_embedder_chunks_total", &label) as usize
        };
        assert_eq!(chunks("embedded"), N, "one chunk a note");

        std::fs::remove_dir_all(ws.kb().join("hr/site")).unwrap();
        d.wait_ledger(Duration::from_secs(60), |l| l["deleted"] == N as u64);
        assert_eq!(d.admin_json("/index")["points"], 0);
        let question = "where does office 3 keep its spare badge?";
        let r = d.ask(HR_TOKEN, question);
        assert!(!texts(&r).contains("7003"), "{extra}: still found: {r}");

        write();
        let ledger = d.wait_ledger(Duration::from_secs(120), |l| {
            l["indexed"] == N as u64 && l["in_flight"] == 0
        });
        assert_eq!(ledger["deleted"], 0, "{ledger}");
        assert_eq!(
            (chunks("embedded"), chunks("reused")),
            (N + again, N - again),
            "{extra}"
        );
        let r = d.ask(HR_TOKEN, question);
        assert!(texts(&r).contains("badge number 7003"), "{extra}: {r}");
    }
}

/// The reranker under `[query] latency_budget_ms`: with room to spare it
/// scores every candidate; with a budget spent before it starts it scores
/// none, keeps the vector order, says so in the timings, and such an answer
/// is not cached. Uses the tiny cross-encoder fixture (parity-tested).
#[test]
fn the_reranker_adapts_its_depth_to_the_latency_budget() {
    let fixtures = std::env::var_os("RAGD_FIXTURES")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| repo().join("../shared/fixtures"));
    let ce = fixtures.join("tiny-cross-encoder");
    let run = |budget_ms: u64| {
        let ws = Workspace::with_extra(&format!("[reranker]\nmodel = {:?}\n", ce.display()));
        let config = std::fs::read_to_string(ws.config()).unwrap().replacen(
            "[query]\n",
            &format!("[query]\nlatency_budget_ms = {budget_ms}\n"),
            1,
        );
        std::fs::write(ws.config(), config).unwrap();
        for i in 0..8 {
            ws.write(&format!("hr/note-{i}.txt"), note(i));
        }
        let d = ws.start();
        d.wait_ledger(Duration::from_secs(120), |l| l["indexed"] == 8);
        let r = d.ask(HR_TOKEN, "who handles the parental leave?");
        (ws, d, r)
    };

    let (_ws, d, r) = run(60_000);
    let t = &r["timings_ms"];
    assert_eq!(t["candidates"], 8, "{r}");
    assert_eq!(
        t["rerank_depth"], 8,
        "no pressure: every candidate is scored: {r}"
    );
    let status = d.admin_json("/actors").to_string();
    assert!(
        status.contains("per (question, passage) pair"),
        "calibration note: {status}"
    );
    drop(d);

    // 1 ms: embedding the question alone takes longer, so nothing is left
    // for the cross-encoder.
    let (_ws, d, r) = run(1);
    let t = &r["timings_ms"];
    assert_eq!(t["candidates"], 8, "{r}");
    assert_eq!(t["rerank_depth"], 0, "the budget was spent: {r}");
    assert_eq!(r["sources"].as_array().unwrap().len(), 5, "{r}");
    // Vector order kept: scores (cosine similarities) never increase.
    let scores: Vec<f64> = r["sources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["score"].as_f64().unwrap())
        .collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // A cut-short answer is not cached: asking again is a miss again.
    std::thread::sleep(Duration::from_millis(500));
    let again = d.ask(HR_TOKEN, "who handles the parental leave?");
    assert_eq!(again["cached"], false, "{again}");
}
