//! Chunking throughput: the Chunker (parse + split by model tokens, the
//! default 200-token chunks with 32 tokens of overlap) on large files.
//!
//! On a GPU node the embedder runs tens of thousands of tokens a second,
//! so the chunker pool must keep well ahead of that for ingestion to stay
//! limited by embedding compute. Two references, measured in the same run
//! on the same text:
//!
//! * `one_pass`: the model's tokenizer over the whole text once, without
//!   splitting, 64 KiB (cut at a line end) at a time, as one call on a
//!   whole megabyte costs more per token: the least any token-exact
//!   chunking can cost;
//! * `stock`: text-splitter's MarkdownSplitter with its own tokenizers
//!   sizer, same budget and overlap: what the crate does out of the box.
//!
//! Cases (RAGD_BENCH_BYTES each, default 1 MB): `markdown` (headings,
//! paragraphs of sentences), `plain` (one body of sentences, a .txt), `log`
//! (one line per event, no sentence ends), `blob` (letters and digits
//! without a separator, as in a key or hex dump: WordPiece's `[UNK]`). Build with the test build's
//! profile, then run:
//!
//!     cargo test --workspace --bench chunk --no-run
//!     ~/.cache/ragd-target/debug/deps/chunk-<hash>
//!
//! RAGD_BENCH_STOCK=0 skips the stock splitter (slow on large inputs).
//! RAGD_BENCH_FILES=a.pdf:b.html also chunks those files, any format ragd
//! reads, and reports the parse's time apart from the split's.
//! Prints one JSON object per case.

#[path = "../tests/common/mod.rs"]
mod common;
use common::{env_usize, model_dir, Rng};
use ragd_actors::chunker::parse::ParseError;
use ragd_actors::chunker::{Chunker, ChunkerSettings};
use std::path::Path;
use std::time::Instant;
use text_splitter::{ChunkConfig, MarkdownSplitter};
use tokenizers::Tokenizer;

// One per line would be 150 lines of a word list.
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "the", "office", "policy", "requires", "every", "employee", "to", "report", "incidents",
    "within", "two", "business", "days", "and", "security", "team", "reviews", "access", "logs",
    "monthly", "visitors", "must", "sign", "in", "at", "reception", "badge", "readers",
    "record", "entries", "exceptions", "are", "approved", "by", "division", "head", "quarterly",
    "budget", "travel", "expenses", "reimbursed", "after", "receipts", "submitted", "through",
    "portal", "onboarding", "checklist", "includes", "laptop", "provisioning", "accounts",
    "training", "confidential", "documents", "stored", "encrypted", "shares", "backups", "run",
    "nightly", "retention", "period", "is", "seven", "years", "for", "financial", "records",
    "of", "contracts", "signed", "counterparty", "legal", "review", "deadline", "escalation",
    "on-call", "rotation", "pager", "handover", "runbook", "deployment", "rollback", "staging",
    "production", "latency", "throughput", "capacity", "planning", "datacenter", "network",
    "firewall", "rules", "vendor", "assessment", "questionnaire", "procurement", "invoice",
    "payment", "terms", "net", "thirty", "holiday", "calendar", "leave", "requests", "manager",
    "approval", "payroll", "cutoff", "benefits", "enrolment", "window", "pension",
    "contributions", "matched", "up", "percent", "salary", "a", "an", "with", "from", "this",
    "that", "which", "when", "where", "should", "may", "not", "be", "all", "each", "any", "its",
    "their", "our", "new", "old", "internationalisation", "interoperability", "acknowledgement",
    "responsibilities",
];

fn sentence(rng: &mut Rng) -> String {
    let n = 8 + (rng.next_u64() % 18) as usize;
    let mut s = String::new();
    for i in 0..n {
        let w = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
        if i == 0 {
            let mut c = w.chars();
            s.extend(c.next().map(|c| c.to_ascii_uppercase()));
            s.push_str(c.as_str());
        } else {
            s.push(' ');
            s.push_str(w);
            if rng.next_u64().is_multiple_of(12) {
                s.push(',');
            }
            if rng.next_u64().is_multiple_of(40) {
                s.push_str(&format!(" {}", rng.next_u64() % 10_000));
            }
        }
    }
    s.push('.');
    s
}

fn paragraph(rng: &mut Rng) -> String {
    let n = 3 + (rng.next_u64() % 5) as usize;
    (0..n).map(|_| sentence(rng)).collect::<Vec<_>>().join(" ")
}

fn markdown(bytes: usize, rng: &mut Rng) -> String {
    let mut s = String::new();
    let mut p = 0;
    while s.len() < bytes {
        if p % 12 == 0 {
            s.push_str(&format!("# Handbook part {}\n\n", p / 12));
        } else if p % 4 == 0 {
            s.push_str(&format!("## Section {p}: {}\n\n", sentence(rng)));
        }
        s.push_str(&paragraph(rng));
        s.push_str("\n\n");
        p += 1;
    }
    s
}

fn plain(bytes: usize, rng: &mut Rng) -> String {
    let mut s = String::new();
    while s.len() < bytes {
        s.push_str(&paragraph(rng));
        s.push('\n');
    }
    s
}

fn log(bytes: usize, rng: &mut Rng) -> String {
    let mut s = String::new();
    let mut i = 0u64;
    while s.len() < bytes {
        s.push_str(&format!(
            "2026-11-30T{:02}:{:02}:{:02}Z worker={} job=ingest-{} state={} queue={} latency={}ms\n",
            i / 3600 % 24,
            i / 60 % 60,
            i % 60,
            rng.next_u64() % 64,
            rng.next_u64() % 100_000,
            ["ok", "retry", "done", "queued"][(rng.next_u64() % 4) as usize],
            rng.next_u64() % 500,
            rng.next_u64() % 2_000,
        ));
        i += 1;
    }
    s
}

/// `text` in pieces of about 64 KiB, each ending at a line end.
fn pieces(text: &str) -> impl Iterator<Item = &str> {
    let mut rest = text;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(64 << 10);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let cut = match rest[..end].rfind('\n') {
            Some(i) if end < rest.len() => i + 1,
            _ => end,
        };
        let (piece, after) = rest.split_at(cut);
        rest = after;
        Some(piece)
    })
}

fn blob(bytes: usize, rng: &mut Rng) -> String {
    const ALNUM: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
    (0..bytes)
        .map(|_| ALNUM[(rng.next_u64() % ALNUM.len() as u64) as usize] as char)
        .collect()
}

fn main() -> anyhow::Result<()> {
    let bytes = env_usize("RAGD_BENCH_BYTES", 1 << 20);
    let stock = env_usize("RAGD_BENCH_STOCK", 1) != 0;
    let mut tokenizer = Tokenizer::from_file(model_dir().join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    // Off, as text-splitter's documentation asks (and as ragd's chunker
    // does): the model's tokenizer.json truncates to 128 tokens and pads.
    tokenizer
        .with_truncation(None)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    tokenizer.with_padding(None);
    let settings = ChunkerSettings::default();
    let chunker = Chunker::new(tokenizer.clone(), settings.clone())?;
    let mut rng = Rng(7);
    let cases = [
        ("markdown", "handbook.md", markdown(bytes, &mut rng)),
        ("plain", "handbook.txt", plain(bytes, &mut rng)),
        ("log", "worker.log", log(bytes, &mut rng)),
        ("blob", "keys.txt", blob(bytes, &mut rng)),
    ];
    // Your own files, any format ragd reads: the time to parse (PDF, HTML
    // to text) against the time to split what the parser gives.
    for file in std::env::var("RAGD_BENCH_FILES")
        .unwrap_or_default()
        .split(':')
        .filter(|f| !f.is_empty())
    {
        let path = Path::new(file);
        let bytes = std::fs::read(path)?;
        let t = Instant::now();
        let sections = ragd_actors::chunker::parse::parse(path, &bytes)
            .map_err(|e| anyhow::anyhow!("{file}: {e}"))?;
        let parse_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let chunks = chunker.split(&sections);
        let split_s = t.elapsed().as_secs_f64();
        let text: usize = sections.iter().map(|s| s.body.len()).sum();
        let tokens: usize = chunks.iter().map(|c| chunker.count_tokens(&c.text)).sum();
        println!(
            "{}",
            serde_json::json!({
                "file": file,
                "file_mb": bytes.len() as f64 / 1e6,
                "text_mb": text as f64 / 1e6,
                "chunks": chunks.len(),
                "chunk_tokens": tokens,
                "parse_s": parse_s,
                "split_s": split_s,
                "tokens_per_s": (tokens as f64 / (parse_s + split_s)).round(),
            })
        );
    }
    for (case, file, text) in &cases {
        let mb = text.len() as f64 / 1e6;

        let t = Instant::now();
        let tokens: usize = pieces(text).map(|p| chunker.count_tokens(p)).sum();
        let one_pass_s = t.elapsed().as_secs_f64();

        let t = Instant::now();
        // The blob is cut to size, then left out whole: no word of it is
        // known to the model (each is one `[UNK]`).
        let (chunks, skipped) = match chunker.chunk_file(Path::new(file), text.as_bytes()) {
            Ok(chunks) => (chunks.len(), None),
            Err(ParseError::Unsupported(reason)) => (0, Some(reason)),
            Err(e) => anyhow::bail!("{case}: {e}"),
        };
        let ragd_s = t.elapsed().as_secs_f64();

        let stock_run = stock.then(|| {
            let config = ChunkConfig::new(settings.max_tokens)
                .with_sizer(&tokenizer)
                .with_overlap(settings.overlap_tokens)
                .expect("overlap < size");
            let t = Instant::now();
            let n = MarkdownSplitter::new(config).chunks(text).count();
            (t.elapsed().as_secs_f64(), n)
        });
        let (stock_s, stock_chunks) = (stock_run.map(|s| s.0), stock_run.map(|s| s.1));

        let per_s = |s: f64| (tokens as f64 / s).round();
        println!(
            "{}",
            serde_json::json!({
                "case": case,
                "mb": (mb * 100.0).round() / 100.0,
                "tokens": tokens,
                "chunks": chunks,
                "skipped": skipped,
                "stock_chunks": stock_chunks,
                "ragd_mb_per_s": ((mb / ragd_s) * 100.0).round() / 100.0,
                "one_pass_tokens_per_s": per_s(one_pass_s),
                "ragd_tokens_per_s": per_s(ragd_s),
                "ragd_s_per_mb": ((ragd_s / mb) * 100.0).round() / 100.0,
                "stock_tokens_per_s": stock_s.map(per_s),
                "ragd_vs_one_pass": ((one_pass_s / ragd_s) * 1000.0).round() / 1000.0,
                "ragd_vs_stock": stock_s.map(|s| ((s / ragd_s) * 100.0).round() / 100.0),
            })
        );
    }
    Ok(())
}
