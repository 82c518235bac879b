//! The chunker pool's pace on PDFs with one parser worker against more.
//!
//! One core parses PDFs (pdf-extract) at tens of thousands of tokens a
//! second, while a GPU embeds several hundred thousand: on a GPU node, or
//! an ingest node feeding embed nodes, one parser would be the pipeline's
//! limit. This runs the daemon's chunker stage (read, version check, parse,
//! split, hand on) in its supervised pool over N one-page PDFs on disk, and
//! times it from the queue filled to every document handed on, with the
//! pool fixed at one worker (the reference, what ragd ran before the pool
//! grew) and then allowed to grow to 2, 4, … and every core. The
//! downstream queue is only counted, so nothing but the chunker runs.
//! Each PDF is parsed as the daemon does, in a child process (the ragd
//! executable; see chunker::pdf); a last run parses in this process with
//! one worker, to show what the child costs.
//!
//!     cargo test --workspace --bench parse_pool --no-run
//!     ~/.cache/ragd-target/debug/deps/parse_pool-<hash>
//!
//! RAGD_BENCH_FILES (default 2000) PDFs of RAGD_BENCH_LINES (default 45)
//! lines each, or as many copies of the PDF RAGD_BENCH_PDF names (a real
//! one, with its fonts, parses several times slower than these). Prints
//! one JSON line per pool size.

#[path = "../tests/common/mod.rs"]
mod common;
use common::{env_usize, model_dir, valid_pdf, Rng};
use ragd_actors::bridge::Port;
use ragd_actors::chunker::actor::ChunkerStage;
use ragd_actors::chunker::{Chunker, ChunkerSettings};
use ragd_actors::dlq::{DeadLetters, FileDlq};
use ragd_actors::ledger::Ledger;
use ragd_actors::messages::{next_seq, DocMeta, Partition};
use ragd_actors::pool::{Pool, PoolArgs, PoolQueue, PoolSettings};
use ragd_actors::source_watcher::doc_version;
use ragd_actors::stats::ActorStats;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "office", "policy", "requires", "every", "employee", "to", "report", "incidents",
    "within", "two", "business", "days", "security", "team", "reviews", "access", "logs",
    "travel", "expenses", "are", "reimbursed", "after", "receipts", "submitted", "through",
    "portal", "invoice", "payment", "terms", "quarterly", "budget", "approved", "division",
];

fn line(rng: &mut Rng) -> String {
    rng.words(WORDS, 11)
}

async fn run(
    chunker: &Arc<Chunker>,
    metas: &[DocMeta],
    min: usize,
    max: usize,
    dir: &std::path::Path,
) -> anyhow::Result<f64> {
    let ledger = Ledger::new(metas.len());
    for m in metas {
        ledger.admit(&m.doc_id, Some(&m.version)).await;
    }
    let out = PoolQueue::new(Arc::new(ActorStats::default()));
    let queue = PoolQueue::new(Arc::new(ActorStats::default()));
    let stats = Arc::new(ActorStats::default());
    let dlq: Arc<dyn DeadLetters> = Arc::new(FileDlq::open(dir.join(format!("dlq-{max}.jsonl")))?);
    queue.submit_all(metas.iter().cloned());
    let t = Instant::now();
    let (pool, handle) = ractor::Actor::spawn(
        None,
        Pool::<ChunkerStage>::default(),
        PoolArgs {
            name: "chunker".into(),
            stage: Arc::new(ChunkerStage {
                chunker: chunker.clone(),
                ledger: ledger.clone(),
                out: Port::Local(out.clone()),
                deletes: Port::Local(PoolQueue::new(stats.clone())),
                max_file_bytes: 20 << 20,
                hang_after: ragd_actors::source_watcher::HANG_AFTER,
            }),
            queue: queue.clone(),
            settings: PoolSettings {
                min,
                max,
                ..Default::default()
            },
            ledger,
            dlq: dlq.clone(),
        },
    )
    .await?;
    while out.len() < metas.len() {
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(1200),
            "{} of {} handed on",
            out.len(),
            metas.len()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let s = t.elapsed().as_secs_f64();
    pool.stop(None);
    handle.await?;
    anyhow::ensure!(dlq.list()?.is_empty(), "a PDF was dead-lettered");
    Ok(s)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = env_usize("RAGD_BENCH_FILES", 2000);
    let lines = env_usize("RAGD_BENCH_LINES", 45);
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get());
    let tokenizer = tokenizers::Tokenizer::from_file(model_dir().join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    // As the daemon parses PDFs: each in a child, the ragd executable.
    let isolated = ragd_actors::chunker::pdf::PdfParser::Isolated {
        exe: env!("CARGO_BIN_EXE_ragd").into(),
        memory_bytes: 1 << 30,
        max_text_bytes: 20 << 20,
    };
    let chunker = Arc::new(Chunker::new(
        tokenizer.clone(),
        ChunkerSettings {
            pdf: isolated,
            ..Default::default()
        },
    )?);
    // The cost of the child: the same parse in this process.
    let in_process = Arc::new(Chunker::new(tokenizer, ChunkerSettings::default())?);
    let dir = tempfile::tempdir()?;
    let partition = Partition {
        division: "finance".into(),
        access_level: "internal".into(),
    };
    let given = match std::env::var("RAGD_BENCH_PDF") {
        Ok(p) if !p.is_empty() => Some(std::fs::read(&p)?),
        _ => None,
    };
    let mut rng = Rng(11);
    let mut metas = Vec::with_capacity(n);
    for i in 0..n {
        let bytes = match &given {
            Some(b) => b.clone(),
            None => {
                let text: Vec<String> = (0..lines).map(|_| line(&mut rng)).collect();
                valid_pdf(&text.iter().map(String::as_str).collect::<Vec<_>>())
            }
        };
        let path = dir.path().join(format!("report-{i}.pdf"));
        std::fs::write(&path, &bytes)?;
        metas.push(DocMeta {
            doc_id: format!("kb:report-{i}.pdf"),
            source: "kb".into(),
            uri: format!("report-{i}.pdf"),
            path,
            version: doc_version(&bytes, &partition, chunker.fingerprint()),
            partition: partition.clone(),
            size: bytes.len() as u64,
            seq: next_seq(),
        });
    }
    // The tokens handed on: the same in every run.
    let mut tokens = 0;
    for m in &metas {
        let chunks = chunker
            .chunk_file(&m.path, &std::fs::read(&m.path)?)
            .map_err(|e| anyhow::anyhow!("{}: {e}", m.uri))?;
        tokens += chunks
            .iter()
            .map(|c| chunker.count_tokens(&c.text))
            .sum::<usize>();
    }
    let mut sizes = vec![1];
    let mut w = 2;
    while w < cores {
        sizes.push(w);
        w *= 2;
    }
    if cores > 1 {
        sizes.push(cores);
    }
    let mut reference = None;
    let runs = sizes
        .into_iter()
        .map(|max| ("child", max))
        .chain([("in_process", 1)]);
    for (pdf, max) in runs {
        // The reference is a fixed pool of one; the others start at one
        // and grow, as the daemon's pool does.
        let chunker = if pdf == "child" {
            &chunker
        } else {
            &in_process
        };
        let s = run(chunker, &metas, 1, max, dir.path()).await?;
        let per_s = tokens as f64 / s;
        let base = *reference.get_or_insert(per_s);
        println!(
            "{}",
            serde_json::json!({
                "pdf_parsed": pdf,
                "max_workers": max,
                "cores": cores,
                "files": n,
                "seconds": (s * 1000.0).round() / 1000.0,
                "files_per_s": (n as f64 / s).round(),
                "tokens_per_s": per_s.round(),
                "vs_one_worker": ((per_s / base) * 100.0).round() / 100.0,
            })
        );
    }
    Ok(())
}
