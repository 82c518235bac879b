//! The command-line tools: embed, rerank, ingest, status, check.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn embed_prints_one_normalised_vector_per_text() {
    let ws = Workspace::new();
    let model = model_dir();
    let (ok, out, err) = ws.ragd(&[
        "embed",
        "--model",
        model.to_str().unwrap(),
        "first text",
        "second text",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<Vec<f32>> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for v in &lines {
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "norm {norm}");
    }
    assert_ne!(lines[0], lines[1]);
    let (ok, _, err) = ws.ragd(&["embed", "--model", "/nonexistent", "x"]);
    assert!(!ok);
    assert!(err.contains("config.json"), "{err}");
}

#[test]
fn rerank_prints_the_cross_encoder_scores() {
    let ws = Workspace::new();
    let dir = repo().join("../shared/fixtures/tiny-cross-encoder");
    let cases: Vec<serde_json::Value> = std::fs::read_to_string(dir.join("expected_scores.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let q = cases[0]["query"].as_str().unwrap();
    let same: Vec<&serde_json::Value> = cases
        .iter()
        .filter(|c| c["query"].as_str() == Some(q))
        .collect();
    let mut args = vec!["rerank", "--model", dir.to_str().unwrap(), "--query", q];
    args.extend(same.iter().map(|c| c["passage"].as_str().unwrap()));
    let (ok, out, err) = ws.ragd(&args);
    assert!(ok, "{err}");
    let scores: Vec<f32> = out.lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(scores.len(), same.len());
    for (s, c) in scores.iter().zip(&same) {
        assert!(
            (s - c["score"].as_f64().unwrap() as f32).abs() <= 1e-4,
            "{s} vs {c}"
        );
    }
}

/// A workspace with two short notes, one chunk each.
fn leave_and_build() -> Workspace {
    let ws = Workspace::new();
    ws.write(
        "hr/leave.md",
        "# Leave\n\nAsk the HR portal four weeks ahead.\n",
    );
    ws.write("eng/build.txt", "The build cache is cleaned nightly.\n");
    ws
}

/// `leave_and_build` ingested once, with its config's path and text: the
/// start of the tests that then edit the config.
fn ingested_once() -> (Workspace, std::path::PathBuf, String) {
    let ws = leave_and_build();
    let cfg = ws.config();
    let out = ws.ingest(&[]);
    assert!(out.contains("chunks: 2 embedded, 0 reused"), "{out}");
    let text = std::fs::read_to_string(&cfg).unwrap();
    (ws, cfg, text)
}

#[test]
fn one_shot_ingest_accounts_for_every_file_and_the_daemon_reuses_it() {
    let ws = leave_and_build();
    ws.write("eng/blob.exe", [0u8, 159, 146, 150]);
    let cfg = ws.config();
    let (ok, out, err) = ws.ragd(&["ingest", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("3 documents") && out.contains("2 indexed") && out.contains("1 skipped"),
        "{out}"
    );
    assert!(out.contains("chunks: 2 embedded, 0 reused"), "{out}");
    // A copy costs no embedding: its text is in the index already.
    std::fs::copy(
        ws.kb().join("hr/leave.md"),
        ws.kb().join("hr/leave-copy.md"),
    )
    .unwrap();
    let (ok, out, err) = ws.ragd(&["ingest", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(
        out.contains("3 indexed") && out.contains("chunks: 0 embedded, 1 reused"),
        "{out}"
    );
    let (ok, _, err) = ws.ragd(&["ingest", "--config", cfg.to_str().unwrap(), "/"]);
    assert!(
        !ok && err.contains("not inside any configured source"),
        "{err}"
    );

    // The daemon finds everything already indexed and re-does nothing.
    let d = ws.start();
    let ledger = d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 3);
    assert_eq!(ledger["in_flight"], 0);
    // A one-shot ingest meanwhile is refused, naming the daemon, and
    // changes nothing.
    let (ok, _, err) = ws.ragd(&["ingest", "--config", cfg.to_str().unwrap()]);
    let holder = format!("is in use by another ragd (pid {})", d.child.id());
    assert!(!ok && err.contains(&holder), "{err}");
    let (ok, out, err) = ws.ragd(&["status", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    for needle in [
        "root [running]",
        "embedder",
        "indexer",
        "reranker [off]",
        "ingest:",
    ] {
        assert!(out.contains(needle), "status lacks {needle:?}:\n{out}");
    }
    assert_eq!(
        actor_processed(&d, "indexer"),
        0,
        "the daemon re-indexed what ingest had done"
    );
}

/// A renamed source costs no embedding: its documents under their new ids
/// reuse the vectors of the old ones, which are out of every search from
/// the start and deleted once they have served. Through the daemon, and
/// back again through a one-shot ingest.
#[test]
fn a_renamed_source_reuses_its_vectors() {
    let (ws, cfg, kb) = ingested_once();
    let handbook = kb.replacen("name = \"kb\"", "name = \"handbook\"", 1);
    assert_ne!(handbook, kb);

    std::fs::write(&cfg, &handbook).unwrap();
    let mut d = ws.start();
    let question = "how do I request leave?";
    let early = d.ask_top(HR_TOKEN, question, 5);
    assert!(
        early["sources"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["doc_id"] != "kb:hr/leave.md"),
        "a document of a source no longer configured is served: {early}"
    );
    let ledger = d.wait_ledger(Duration::from_secs(60), |l| {
        l["indexed"] == 2 && l["deleted"] == 2
    });
    assert_eq!(ledger["in_flight"], 0, "{ledger}");
    let chunks = |d: &Daemon, v: &str| {
        metric_where(d, "ragd_embedder_chunks_total", &format!("vector=\"{v}\""))
    };
    assert_eq!((chunks(&d, "embedded"), chunks(&d, "reused")), (0.0, 2.0));
    let index = d.admin_json("/index");
    assert_eq!((&index["points"], &index["hidden"]), (&2.into(), &0.into()));
    let hits = d.ask_top(HR_TOKEN, question, 5);
    let ids = source_doc_ids(&hits);
    assert!(ids.contains(&"handbook:hr/leave.md".to_string()), "{hits}");
    assert!(ids.iter().all(|id| id.starts_with("handbook:")), "{hits}");
    assert!(d.sigterm().success());

    std::fs::write(&cfg, &kb).unwrap();
    let out = ws.ingest(&[]);
    assert!(
        out.contains("2 indexed, 2 deleted") && out.contains("chunks: 0 embedded, 2 reused"),
        "{out}"
    );
}

/// A source renamed and given other partitions in the same edit: its
/// files' versions change (the partition is part of a version), their
/// texts do not: the new names reuse the old names' vectors, and are
/// served in their new partitions. (That the old names wait for them is
/// pinned by the watcher's test
/// `a_document_of_a_source_no_longer_configured_goes_once_what_was_on_its_way_is_through`:
/// on two small files the race does not show.)
#[test]
fn a_renamed_source_with_new_partitions_reuses_its_vectors() {
    let (ws, cfg, kb) = ingested_once();
    let eng_rule = "division = \"eng\"\n  access_level = \"internal\"";
    assert!(kb.contains(eng_rule), "{kb}");
    let handbook = kb
        .replacen("name = \"kb\"", "name = \"handbook\"", 1)
        .replacen(
            eng_rule,
            "division = \"eng\"\n  access_level = \"public\"",
            1,
        );
    std::fs::write(&cfg, &handbook).unwrap();
    let out = ws.ingest(&[]);
    assert!(
        out.contains("2 indexed, 2 deleted") && out.contains("chunks: 0 embedded, 2 reused"),
        "{out}"
    );
    let mut d = ws.start();
    let hits = d.ask_top(ENG_TOKEN, "when is the build cache cleaned?", 5);
    let ids = source_doc_ids(&hits);
    assert_eq!(ids, ["handbook:eng/build.txt"], "{hits}");
    assert_eq!(hits["sources"][0]["access_level"], "public", "{hits}");
    let index = d.admin_json("/index");
    assert_eq!((&index["points"], &index["hidden"]), (&2.into(), &0.into()));
    assert!(d.sigterm().success());
}

/// A changed chunk size chunks every document again, the new way, and
/// leaves none of the old chunks behind; texts that come out the same keep
/// their vectors, and unchanged settings change nothing.
#[test]
fn a_changed_chunk_size_chunks_every_document_again() {
    use ragd_actors::indexer::{edge::EdgeStore, VectorStore};
    let ws = Workspace::new();
    let long: String = (0..40)
        .map(|i| {
            format!(
                "Office {i} keeps its spare badge number {n} in the safe.\n\n",
                n = 7000 + i
            )
        })
        .collect();
    ws.write("hr/badges.md", format!("# Badges\n\n{long}"));
    ws.write("eng/build.txt", "The build cache is cleaned nightly.\n");
    let points = || {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let store = EdgeStore::open(&ws.data().join("index"), 384).unwrap();
            let n = store.count(Some("kb:hr/badges.md")).await.unwrap();
            let versions = store.indexed_versions().await.unwrap().len();
            (n, versions)
        })
    };
    let out = ws.ingest(&[]);
    assert!(out.contains("2 indexed"), "{out}");
    let (before, versions) = points();
    assert!(before >= 2, "{before} chunks");
    assert_eq!(versions, 2);

    let cfg = ws.config();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("{text}\n[chunker]\nmax_tokens = 48\noverlap_tokens = 8\n"),
    )
    .unwrap();
    let out = ws.ingest(&[]);
    // The short file is one chunk either way: its vector is reused.
    assert!(
        out.contains("2 indexed") && out.contains(", 1 reused"),
        "{out}"
    );
    let (after, versions) = points();
    assert!(
        after > 2 * before,
        "{before} chunks of 200 tokens, {after} of 48"
    );
    assert_eq!(versions, 2, "the old versions are gone");

    let out = ws.ingest(&[]);
    assert!(out.contains("chunks: 0 embedded, 0 reused"), "{out}");
    assert_eq!(points(), (after, 2));
}

/// A store embedded by another model (here MiniLM's first three layers) is
/// refused by `ingest` and `up`, saying how to go on, and is left as it
/// was. One embedded by this model under another name (its config file
/// rewritten, its weights the same) passes, and its chunks get this
/// name's text keys: by a one-shot ingest before it reads anything, by
/// the daemon beside its work. Copies then reuse their vectors.
#[test]
fn a_store_of_another_model_is_refused_and_one_of_this_model_gets_its_keys() {
    let ws = leave_and_build();
    let cfg = ws.config();
    let three = model_variant(&ws, "three-layers", |c| {
        c.replace("\"num_hidden_layers\": 6", "\"num_hidden_layers\": 3")
    });
    let renamed = model_variant(&ws, "renamed", |c| format!("{c}\n"));
    let (ok, out, err) = ws.ragd(&[
        "ingest",
        "--config",
        config_with_model(&ws, &three).to_str().unwrap(),
    ]);
    assert!(ok && out.contains("2 indexed"), "{out}{err}");

    let index = ws.data().join("index").canonicalize().unwrap();
    for cmd in ["ingest", "up"] {
        let (ok, _, err) = ws.ragd(&[cmd, "--config", cfg.to_str().unwrap()]);
        assert!(!ok, "{cmd} took another model's store");
        for needle in [
            "was embedded by another model".to_string(),
            "of 2 chunks read, 0 have the vector".to_string(),
            format!("delete {}", index.display()),
        ] {
            assert!(
                err.contains(&needle),
                "{cmd}: {needle:?} missing from:\n{err}"
            );
        }
    }
    // Nothing changed: the model that built it finds it whole.
    let (ok, out, err) = ws.ragd(&[
        "ingest",
        "--config",
        config_with_model(&ws, &three).to_str().unwrap(),
    ]);
    assert!(
        ok && out.contains("2 indexed") && out.contains("chunks: 0 embedded, 0 reused"),
        "{out}{err}"
    );

    // Built again by this model under its other name: a copy made then
    // is ingested by this one from the stored vector.
    let built_again_by_renamed = || {
        std::fs::remove_dir_all(ws.data()).unwrap();
        let cfg = config_with_model(&ws, &renamed);
        let (ok, out, err) = ws.ragd(&["ingest", "--config", cfg.to_str().unwrap()]);
        assert!(
            ok && out.contains("chunks: 2 embedded, 0 reused"),
            "{out}{err}"
        );
    };
    built_again_by_renamed();
    std::fs::copy(
        ws.kb().join("hr/leave.md"),
        ws.kb().join("hr/leave-copy.md"),
    )
    .unwrap();
    let (ok, out, err) = ws.ragd(&["ingest", "--config", cfg.to_str().unwrap()]);
    assert!(
        ok && out.contains("chunks: 0 embedded, 1 reused"),
        "{out}{err}"
    );

    // The same for the daemon, which sets the keys once it is up.
    std::fs::remove_file(ws.kb().join("hr/leave-copy.md")).unwrap();
    built_again_by_renamed();
    let d = ws.start();
    d.wait_until("the text keys", Duration::from_secs(60), || {
        metric(&d, "ragd_text_keys_set_total") == 2.0
    });
    d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 2);
    ws.write(
        "eng/build-copy.txt",
        "The build cache is cleaned nightly.\n",
    );
    d.wait_ledger(Duration::from_secs(60), |l| l["indexed"] == 3);
    assert_eq!(
        metric_where(&d, "ragd_embedder_chunks_total", "vector=\"reused\""),
        1.0
    );
    assert_eq!(
        metric_where(&d, "ragd_embedder_chunks_total", "vector=\"embedded\""),
        0.0
    );
}

/// A source the scan could not see is in none of the counts: the
/// summary says why (here a share with nothing mounted on its folder).
#[test]
fn one_shot_ingest_says_what_it_could_not_see() {
    let ws = Workspace::new();
    ws.write("eng/build.txt", "The build cache is cleaned nightly.\n");
    let cfg = ws.config();
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text.replace("path = \"kb\"", "path = \"kb\"\nmount_point = true");
    // A second share, with nothing mounted on it either: each is named.
    std::fs::create_dir_all(ws.dir.path().join("wiki")).unwrap();
    let text = format!(
        "{text}\n[[sources]]\nname = \"wiki\"\npath = \"wiki\"\nmount_point = true\n\
         division = \"general\"\naccess_level = \"public\"\n"
    );
    std::fs::write(&cfg, text).unwrap();
    let (ok, out, err) = ws.ragd(&["ingest", "--config", cfg.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("0 documents"), "{out}");
    for root in [ws.kb(), ws.dir.path().join("wiki")] {
        let root = root.canonicalize().unwrap();
        let note = format!(
            "note: source root {} has nothing mounted on it",
            root.display()
        );
        assert!(out.contains(&note), "{note:?} missing from:\n{out}");
    }
}

#[test]
fn check_reports_every_config_error_at_once() {
    let ws = Workspace::new();
    let (ok, out, err) = ws.ragd(&["check", "--config", ws.config().to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("ok (1 sources, 2 principals"), "{out}");
    let bad = ws.dir.path().join("bad.toml");
    std::fs::write(&bad, "data_dir = 3\n").unwrap();
    let (ok, _, err) = ws.ragd(&["check", "--config", bad.to_str().unwrap()]);
    assert!(!ok && err.contains("invalid config"), "{err}");
    std::fs::write(
        &bad,
        "[query]\nbind = \"nope\"\n[chunker]\nmax_tokens = 8\n[[sources]]\npath = \"missing\"\ndivision = \"a\"\naccess_level = \"b\"\n",
    )
    .unwrap();
    let (ok, _, err) = ws.ragd(&["check", "--config", bad.to_str().unwrap()]);
    assert!(!ok);
    for needle in ["query.bind", "chunker.max_tokens", "not a folder"] {
        assert!(err.contains(needle), "{needle:?} missing from:\n{err}");
    }
    let (ok, _, err) = ws.ragd(&["up", "--config", "/nonexistent.toml"]);
    assert!(!ok && err.contains("cannot read"), "{err}");
    // An example token on an address other machines reach: refused by
    // check (and up); on loopback a warning.
    let (ok, _, err) = ws.ragd(&["check", "--config", ws.config().to_str().unwrap()]);
    assert!(ok && err.contains("example token"), "{err}");
    let open = std::fs::read_to_string(ws.config()).unwrap().replacen(
        "bind = \"127.0.0.1:",
        "bind = \"0.0.0.0:",
        1,
    );
    std::fs::write(&bad, open).unwrap();
    let (ok, _, err) = ws.ragd(&["check", "--config", bad.to_str().unwrap()]);
    assert!(
        !ok && err.contains("reachable from other machines"),
        "{err}"
    );
}

/// A variable or an argument that is not UTF-8 is legal on Linux: neither
/// panics ragd. Another tool's variable is ignored, ragd's own is refused
/// by name, and a path argument is a path like any other.
#[test]
fn environment_and_arguments_that_are_not_utf8_get_clear_answers() {
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;
    let ws = Workspace::new();
    let not_utf8 = OsStr::from_bytes(b"caf\xe9");
    let run = |args: &[&OsStr], env: &[(&str, &OsStr)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_ragd"));
        cmd.args(args).env("RAGD_LOG", "warn");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(!err.contains("panicked"), "{err}");
        (out.status.success(), err)
    };
    let config = ws.config();
    let check = [
        OsStr::new("check"),
        OsStr::new("--config"),
        config.as_os_str(),
    ];
    let (ok, err) = run(&check, &[("OTHER_TOOL", not_utf8)]);
    assert!(ok, "{err}");
    let (ok, err) = run(&check, &[("RAGD_QUERY__BIND", not_utf8)]);
    assert!(
        !ok && err.contains("RAGD_QUERY__BIND: its value is not UTF-8"),
        "{err}"
    );
    let missing = ws.dir.path().join(not_utf8);
    let (ok, err) = run(
        &[
            OsStr::new("check"),
            OsStr::new("--config"),
            missing.as_os_str(),
        ],
        &[],
    );
    assert!(!ok && err.contains("cannot read"), "{err}");
}

/// A one-shot ingest with the config of a node that reads no sources (a
/// cluster's query node) says so, rather than "0 documents" and success.
#[test]
fn one_shot_ingest_on_a_node_without_the_ingest_role_is_refused() {
    let ws = Workspace::new();
    let query = concat!(env!("CARGO_MANIFEST_DIR"), "/config/cluster/query.toml");
    let (ok, _, err) = ws.ragd(&["ingest", "--config", query]);
    assert!(!ok && err.contains("node.roles has no \"ingest\""), "{err}");
}
