//! ragd: keeps a company's documents continuously indexed and answers
//! questions from them.

mod config;
mod http;
mod llm;
mod node;

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::Config;
use node::{Mode, Node};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

const DEFAULT_CONFIG: &str = "config/default.toml";

#[derive(Parser)]
#[command(
    name = "ragd",
    version,
    about = "A RAG pipeline daemon: watches document folders, keeps them indexed, answers questions",
    long_about = "ragd watches document folders, splits and embeds every document on a local BERT \
model, keeps a vector index in step with the files (updates replace, deletions remove) and \
answers questions over HTTP, showing each caller only the partitions (division, access level) \
their token allows.\n\nStart with `ragd up`, then `ragd ask --token TOKEN \"question\"`."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: scan and watch the sources, ingest, serve queries and the admin API.
    Up {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "RAGD_CONFIG")]
        config: PathBuf,
    },
    /// Ingest once with a progress bar, and exit when every file is accounted for.
    /// With PATHs (inside the configured sources), only those are scanned.
    /// Stop the daemon first: both use the same data folder, which one ragd
    /// at a time may use (a second is refused, naming the first).
    Ingest {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "RAGD_CONFIG")]
        config: PathBuf,
        paths: Vec<PathBuf>,
    },
    /// Ask a running daemon a question.
    Ask {
        /// Your API token (a [[principals]] token).
        #[arg(long, env = "RAGD_TOKEN")]
        token: String,
        #[arg(long, default_value_t = 5)]
        top_k: usize,
        /// Query API base URL; defaults to the config's [query] bind.
        #[arg(long)]
        url: Option<String>,
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "RAGD_CONFIG")]
        config: PathBuf,
        /// Print the raw JSON response.
        #[arg(long)]
        json: bool,
        question: String,
    },
    /// Show a running daemon's actor tree and ingest ledger.
    Status {
        #[command(flatten)]
        admin: AdminTarget,
    },
    /// List a running daemon's documents from its ingest ledger: which were
    /// skipped or dead-lettered, and why. One line per document.
    Docs {
        /// Only documents in this state: indexed, deleted, skipped,
        /// dead_lettered or in_flight.
        #[arg(long)]
        status: Option<String>,
        /// Only documents whose id starts with this (`SOURCE:` or
        /// `SOURCE:folder/`).
        #[arg(long, default_value = "")]
        prefix: String,
        /// At most this many (up to 1000); the last line says how to go on.
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// Start after this document id (the previous page's last).
        #[arg(long)]
        after: Option<String>,
        #[command(flatten)]
        admin: AdminTarget,
    },
    /// Embed texts with a sentence encoder: one JSON array per line per text.
    Embed {
        /// Hugging Face model folder (config.json, model.safetensors, tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// cpu, cuda or cuda-f16 (the GPU ones need a build with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: ragd_actors::model::Device,
        #[arg(required = true)]
        texts: Vec<String>,
    },
    /// Score passages against a query with a cross-encoder: one score per line per passage.
    Rerank {
        /// Cross-encoder folder (BertForSequenceClassification).
        #[arg(long)]
        model: PathBuf,
        /// cpu, cuda or cuda-f16 (the GPU ones need a build with --features cuda).
        #[arg(long, default_value = "cpu")]
        device: ragd_actors::model::Device,
        #[arg(long)]
        query: String,
        #[arg(required = true)]
        passages: Vec<String>,
    },
    /// The dead-letter queue: documents that failed every attempt.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Validate a config file and report every problem at once.
    Check {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "RAGD_CONFIG")]
        config: PathBuf,
    },
}

/// Where a client command finds a running daemon's admin API.
#[derive(clap::Args)]
struct AdminTarget {
    /// Admin API base URL; defaults to the config's [admin] bind.
    #[arg(long)]
    url: Option<String>,
    /// Admin token; defaults to the config's [admin] token.
    #[arg(long, env = "RAGD_ADMIN_TOKEN")]
    token: Option<String>,
    #[arg(long, short, default_value = DEFAULT_CONFIG, env = "RAGD_CONFIG")]
    config: PathBuf,
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead-lettered documents (reads the DLQ log; works with or without the daemon).
    List {
        #[arg(long, short, default_value = DEFAULT_CONFIG, env = "RAGD_CONFIG")]
        config: PathBuf,
    },
    /// Ingest a dead-lettered document again (after fixing it), through the running daemon.
    Replay {
        id: u64,
        #[command(flatten)]
        admin: AdminTarget,
    },
}

/// The log filter unless RAGD_LOG sets one. qdrant-edge warns at every
/// start and index build that globals of the Qdrant server's own start-up
/// (feature flags, a multi-mmap probe) were not set; it then uses their
/// defaults, which is what the embedded store wants, and the operator can
/// do nothing about the warnings.
const DEFAULT_LOG: &str =
    "info,qdrant_edge::common::flags=error,qdrant_edge::common::mmap::ops=error";

fn main() {
    // A PDF parser child (chunker::pdf): before anything else starts, so
    // the child is one thread that reads stdin and writes stdout.
    // (args_os: a path that is not UTF-8 is a legal argument, for clap.)
    let mut args = std::env::args_os();
    if args
        .nth(1)
        .is_some_and(|a| a == ragd_actors::chunker::pdf::CHILD_ARG)
    {
        let rest: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
        std::process::exit(ragd_actors::chunker::pdf::child_main(&rest));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RAGD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG)),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log file or journald gets plain text
        // that grep and log shippers can read.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Up { .. }
            | Command::Ingest { .. }
            | Command::Embed { .. }
            | Command::Rerank { .. }
    ) {
        // These run the model; naming its threads starts them.
        ragd_actors::model::name_model_threads();
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = runtime.block_on(run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
    // Blocking tasks (model loads, a stuck read) must not hold the exit.
    runtime.shutdown_timeout(Duration::from_secs(1));
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// [`load`] for a node that serves: settings that expose it are refused.
fn load_servable(path: &std::path::Path) -> anyhow::Result<Config> {
    load(path)?.servable().map_err(|e| anyhow::anyhow!("{e}"))
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Up { config } => up(load_servable(&config)?).await,
        Command::Ingest { config, paths } => ingest(load(&config)?, paths).await,
        Command::Ask {
            token,
            top_k,
            url,
            config,
            json,
            question,
        } => {
            let base = match url {
                Some(u) => u,
                None => format!("http://{}", load(&config)?.query_bind),
            };
            ask(&base, &token, &question, top_k, json).await
        }
        Command::Status { admin } => {
            let (base, token) = admin.resolve()?;
            status(&base, token.as_deref()).await
        }
        Command::Docs {
            status,
            prefix,
            limit,
            after,
            admin,
        } => {
            let (base, token) = admin.resolve()?;
            let mut query = vec![("prefix", prefix), ("limit", limit.to_string())];
            query.extend(status.map(|s| ("status", s)));
            query.extend(after.map(|a| ("after", a)));
            let req = reqwest::Client::new()
                .get(format!("{base}/ingest/documents"))
                .query(&query);
            let page = admin_request(req, token.as_deref()).await?;
            for d in page["documents"].as_array().into_iter().flatten() {
                let s = |k: &str| d[k].as_str().unwrap_or_default().to_string();
                match d["reason"].as_str() {
                    Some(reason) => println!("{}\t{}\t{reason}", s("doc_id"), s("status")),
                    None => println!("{}\t{}", s("doc_id"), s("status")),
                }
            }
            if let Some(next) = page["next"].as_str() {
                eprintln!("(more: --after {next:?})");
            }
            Ok(())
        }
        Command::Embed {
            model,
            device,
            texts,
        } => {
            let enc = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<Vec<f32>>> {
                let enc = ragd_actors::model::AnyEncoder::load(&model, Default::default(), device)?;
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                enc.embed(&refs)
            })
            .await??;
            for v in enc {
                println!("{}", serde_json::to_string(&v)?);
            }
            Ok(())
        }
        Command::Rerank {
            model,
            device,
            query,
            passages,
        } => {
            let scores = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<f32>> {
                let ce =
                    ragd_actors::model::AnyCrossEncoder::load(&model, Default::default(), device)?;
                let refs: Vec<&str> = passages.iter().map(String::as_str).collect();
                ce.score(&query, &refs)
            })
            .await??;
            for s in scores {
                println!("{s}");
            }
            Ok(())
        }
        Command::Dlq {
            command: DlqCommand::List { config },
        } => {
            let cfg = load(&config)?;
            let entries = match &cfg.bus {
                config::Bus::Local => ragd_actors::dlq::FileDlq::read(&cfg.dlq_path())?,
                // The cluster's DLQ is the `dlq` topic: read it to its end.
                config::Bus::Kafka(settings) => {
                    use ragd_actors::dlq::DeadLetters;
                    // A listing only reads: it never creates topics; a
                    // cluster that never started says which are missing.
                    let settings = ragd_actors::bridge::kafka::KafkaSettings {
                        create_topics: false,
                        ..settings.clone()
                    };
                    let kafka = ragd_actors::bridge::kafka::Kafka::connect(settings).await?;
                    tokio::task::spawn_blocking(move || {
                        ragd_actors::bridge::kafka::KafkaDlq::open(kafka, |_| {})
                    })
                    .await??
                    .list()?
                }
            };
            if entries.is_empty() {
                println!("the dead-letter queue is empty");
            }
            for e in entries {
                println!(
                    "{}\t{}\t{}\tattempts={}\t{}\t{}",
                    e.id,
                    e.status(),
                    e.doc_id,
                    e.attempts,
                    e.stage,
                    e.error
                );
            }
            Ok(())
        }
        Command::Dlq {
            command: DlqCommand::Replay { id, admin },
        } => {
            let (base, token) = admin.resolve()?;
            let resp = admin_request(
                reqwest::Client::new().post(format!("{base}/dlq/{id}/replay")),
                token.as_deref(),
            )
            .await?;
            println!("{}", resp);
            Ok(())
        }
        Command::Check { config } => {
            let cfg = load_servable(&config)?;
            for w in &cfg.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: ok ({} sources, {} principals, data in {})",
                cfg.path.display(),
                cfg.sources.len(),
                cfg.principals.len(),
                cfg.data_dir.display()
            );
            Ok(())
        }
    }
}

impl AdminTarget {
    /// The admin API's base URL and token: as given, else from the config.
    fn resolve(self) -> anyhow::Result<(String, Option<String>)> {
        match (self.url, self.token) {
            (Some(u), t) => Ok((u, t)),
            (None, t) => {
                let cfg = load(&self.config)?;
                Ok((
                    format!("http://{}", cfg.admin_bind),
                    t.or(cfg.admin_token.map(|s| s.0)),
                ))
            }
        }
    }
}

async fn admin_request(
    req: reqwest::RequestBuilder,
    token: Option<&str>,
) -> anyhow::Result<serde_json::Value> {
    let req = match token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let resp = req
        .send()
        .await
        .context("is ragd running? the admin API did not answer")?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    if !status.is_success() {
        anyhow::bail!(
            "{status}: {}",
            body.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("request failed")
        );
    }
    Ok(body)
}

async fn up(cfg: Config) -> anyhow::Result<()> {
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let (query_bind, admin_bind) = (cfg.query_bind, cfg.admin_bind);
    // Bind before the slow start-up so a taken port fails fast.
    // Only query nodes serve queries; every node serves the admin API.
    let query_listener = if cfg.roles.query {
        Some(
            tokio::net::TcpListener::bind(query_bind)
                .await
                .with_context(|| format!("binding the query API on {query_bind}"))?,
        )
    } else {
        None
    };
    let admin_listener = tokio::net::TcpListener::bind(admin_bind)
        .await
        .with_context(|| format!("binding the admin API on {admin_bind}"))?;
    let node = Arc::new(Node::start(cfg, Mode::Daemon, vec![]).await?);
    tracing::info!(%query_bind, %admin_bind, "ragd is up");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let serve = |listener: tokio::net::TcpListener, router: axum::Router| {
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|s| *s).await;
                })
                .await;
        })
    };
    let q = query_listener.map(|l| serve(l, http::query_router(node.clone())));
    let a = serve(admin_listener, http::admin_router(node.clone(), metrics));

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupt: shutting down"),
    }
    // A second signal: the operator will not wait for the bounded steps
    // below (each waits at most 30 s).
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        tracing::warn!("second signal: stopping now, without the graceful shutdown");
        std::process::exit(130);
    });
    let _ = stop_tx.send(true);
    // Queries under way get 10 s to answer; one still waiting for the LLM
    // after that does not hold the shutdown (it gets an error as the
    // actors stop).
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        if let Some(q) = q {
            let _ = q.await;
        }
        let _ = a.await;
    })
    .await;
    node.shutdown(Duration::from_secs(30)).await;
    tracing::info!("stopped");
    Ok(())
}

async fn ingest(cfg: Config, paths: Vec<PathBuf>) -> anyhow::Result<()> {
    // Without the role no watcher runs: it would report 0 documents, done.
    anyhow::ensure!(
        cfg.roles.ingest,
        "{}: node.roles has no \"ingest\", so this node reads no sources; run \
         `ragd ingest` with an ingest node's config",
        cfg.path.display()
    );
    let mut only = Vec::new();
    for p in paths {
        let c = p
            .canonicalize()
            .with_context(|| format!("{}", p.display()))?;
        if !cfg.sources.iter().any(|s| c.starts_with(&s.root)) {
            anyhow::bail!("{} is not inside any configured source", p.display());
        }
        only.push(c);
    }
    let node = Node::start(cfg, Mode::Ingest, only).await?;
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30} {pos}/{len} documents  {msg}",
        )
        .expect("static template"),
    );
    let started = std::time::Instant::now();
    loop {
        let c = node.ledger.counts();
        bar.set_length(c.seen);
        bar.set_position(c.seen - c.in_flight);
        bar.set_message(format!(
            "indexed {} · deleted {} · skipped {} · dead-lettered {} · in flight {}",
            c.indexed, c.deleted, c.skipped, c.dead_lettered, c.in_flight
        ));
        if node.settled() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish();
    let (store, ledger, chunks) = (node.store.clone(), node.ledger.clone(), node.chunks.clone());
    let c = node.ledger.counts();
    // What the scan could not see (a source root missing, a share with
    // nothing mounted, one that hangs) is in none of the counts.
    let unseen: Vec<String> = node
        .sources
        .lock()
        .values()
        .filter_map(|v| v.unseen.clone())
        .collect();
    node.shutdown(Duration::from_secs(5)).await;
    store.optimize().await?;
    println!(
        "{} documents in {:.1}s: {} indexed, {} deleted, {} skipped, {} dead-lettered",
        c.seen,
        started.elapsed().as_secs_f64(),
        c.indexed,
        c.deleted,
        c.skipped,
        c.dead_lettered
    );
    let (embedded, reused) = chunks.counts();
    println!(
        "  chunks: {embedded} embedded, {reused} reused (their text was in the index already)"
    );
    for why in unseen {
        println!("  note: {why}");
    }
    // Which ones, and why: the counts alone leave an operator guessing.
    const SHOWN: usize = 20;
    for (status, count) in [("dead_lettered", c.dead_lettered), ("skipped", c.skipped)] {
        let query = ragd_actors::ledger::DocQuery {
            status: Some(status.into()),
            ..Default::default()
        };
        for d in ledger.documents(&query, SHOWN) {
            let reason = match &d.status {
                ragd_actors::ledger::DocStatus::Skipped(r)
                | ragd_actors::ledger::DocStatus::DeadLettered(r) => r.as_str(),
                _ => "",
            };
            println!("  {status}: {}: {reason}", d.doc_id);
        }
        if count > SHOWN as u64 {
            println!("  … and {} more {status}", count - SHOWN as u64);
        }
    }
    Ok(())
}

async fn ask(
    base: &str,
    token: &str,
    question: &str,
    top_k: usize,
    json: bool,
) -> anyhow::Result<()> {
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/query"))
        .bearer_auth(token)
        .json(&serde_json::json!({ "question": question, "top_k": top_k }))
        .send()
        .await
        .with_context(|| format!("is ragd running? {base} did not answer"))?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.context("reading the response")?;
    if !status.is_success() {
        anyhow::bail!(
            "{status}: {}",
            body.get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("query failed")
        );
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let r: http::QueryResponse = serde_json::from_value(body)?;
    match (&r.answer, &r.answer_error) {
        (Some(a), _) => println!("{a}\n"),
        (None, Some(why)) => println!("(no answer: {why}; the best passages follow)\n"),
        (None, None) => println!("(no answer: no LLM configured; the best passages follow)\n"),
    }
    for (i, s) in r.sources.iter().enumerate() {
        let text: String = s.text.chars().take(300).collect();
        println!(
            "[{}] {} ({} / {}, chunk {}, score {:.3})\n    {}\n",
            i + 1,
            s.uri,
            s.division,
            s.access_level,
            s.chunk_index,
            s.score,
            text.replace('\n', "\n    ")
        );
    }
    if r.cached {
        println!("(served from the semantic cache)");
    }
    Ok(())
}

async fn status(base: &str, token: Option<&str>) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let actors = admin_request(client.get(format!("{base}/actors")), token).await?;
    // Only ingest nodes keep a ledger (the others answer 409): their status
    // is the actor tree alone.
    let ingest = match actors["roles"].as_array() {
        Some(roles) if !roles.iter().any(|r| r == "ingest") => None,
        _ => Some(admin_request(client.get(format!("{base}/ingest")), token).await?),
    };
    fn print(v: &serde_json::Value, depth: usize) {
        let s = |k: &str| v.get(k).cloned().unwrap_or_default();
        let mut line = format!(
            "{}{} [{}] processed={} queue={} restarts={}",
            "  ".repeat(depth),
            s("name").as_str().unwrap_or("?"),
            s("status").as_str().unwrap_or("?"),
            s("processed"),
            s("queue_depth"),
            s("restarts")
        );
        if let Some(w) = v.get("workers").and_then(|w| w.as_u64()) {
            line.push_str(&format!(" workers={w}"));
        }
        if let Some(e) = v.get("last_error").and_then(|e| e.as_str()) {
            line.push_str(&format!(" last_error={e:?}"));
        }
        if let Some(n) = v.get("note").and_then(|e| e.as_str()) {
            line.push_str(&format!(" ({n})"));
        }
        println!("{line}");
        for c in v
            .get("children")
            .and_then(|c| c.as_array())
            .into_iter()
            .flatten()
        {
            print(c, depth + 1);
        }
    }
    for root in actors
        .get("actors")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        print(root, 0);
    }
    match ingest {
        Some(ledger) => println!("\ningest: {ledger}"),
        None => println!(
            "\nno ingest role (roles: {}): the ingest ledger is on the ingest nodes",
            actors["roles"]
        ),
    }
    Ok(())
}
