//! PDFs parsed in a child process (chunker::pdf): what a hostile or broken
//! PDF does to the child, and what the parent reports. The child is the
//! ragd executable itself, as in the daemon.

mod common;
use common::*;
use ragd_actors::chunker::parse::ParseError;
use ragd_actors::chunker::pdf::{extract_isolated, time_budget};
use std::path::Path;
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

fn ragd() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ragd"))
}

fn extract(bytes: &[u8], memory: u64, max_text: u64) -> Result<String, ParseError> {
    extract_isolated(ragd(), memory, max_text, time_budget(bytes.len()), bytes)
}

fn malformed(r: Result<String, ParseError>) -> String {
    match r {
        Err(ParseError::Malformed {
            format: "pdf",
            message,
        }) => message,
        other => panic!("expected a malformed PDF, got {other:?}"),
    }
}

#[test]
fn a_good_pdf_gives_its_text() {
    let text = extract(
        &valid_pdf(&["Submit expense reports within thirty days."]),
        256 * MIB,
        1 << 20,
    )
    .unwrap();
    assert!(
        text.contains("Submit expense reports within thirty days."),
        "{text:?}"
    );
}

#[test]
fn a_broken_pdf_gives_the_parser_s_error() {
    let message = malformed(extract(
        b"%PDF-1.4\n1 0 obj << /Type /Catalog >> garbage without xref",
        256 * MIB,
        1 << 20,
    ));
    assert!(
        !message.is_empty() && !message.contains("died"),
        "{message}"
    );
    assert_eq!(
        malformed(extract(b"not a pdf", 256 * MIB, 1 << 20)),
        "missing %PDF- header"
    );
}

/// 400 KB of nested arrays overflow the parser's stack: an abort that no
/// catch_unwind stops, in process it takes the daemon down.
#[test]
fn nesting_that_overflows_the_stack_kills_the_child_only() {
    let message = malformed(extract(&nested_pdf(200_000), 256 * MIB, 1 << 20));
    assert!(message.contains("nested too deeply"), "{message}");
}

/// About 1 MB that inflates to 400 MB of page text: in process it took
/// 7.8 GB before an allocation aborted the process.
#[test]
fn a_pdf_that_inflates_past_the_memory_limit_is_refused() {
    let bomb = deflated_pdf("lorem ipsum", 24_000_000);
    assert!(bomb.len() < 2 << 20, "{} bytes", bomb.len());
    let t = Instant::now();
    let message = malformed(extract(&bomb, 128 * MIB, 20 << 20));
    assert!(message.contains("needs more than 128 MiB"), "{message}");
    // Stopped at the limit, not after inflating it all.
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
}

/// Text past the limit is not read: the file is skipped with the reason,
/// as a file over max_file_bytes is.
#[test]
fn text_over_the_limit_skips_the_file() {
    let pdf = deflated_pdf("quarterly travel budget", 20_000);
    let all = extract(&pdf, 512 * MIB, 10 << 20).unwrap();
    assert!(all.len() > 400_000, "{}", all.len());
    match extract(&pdf, 512 * MIB, 100_000) {
        Err(ParseError::Unsupported(reason)) => {
            assert!(reason.contains("over the 100000 byte limit"), "{reason}")
        }
        other => panic!("expected a skip, got {other:?}"),
    }
}

/// A parse that takes longer than its budget is killed.
#[test]
fn a_parse_past_its_time_budget_is_killed() {
    let slow = deflated_pdf("lorem ipsum", 24_000_000);
    let t = Instant::now();
    let message = malformed(extract_isolated(
        ragd(),
        8 << 30,
        20 << 20,
        Duration::from_millis(300),
        &slow,
    ));
    assert_eq!(message, "not parsed within 300ms");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

/// A parser that cannot start, or that the system kills (the OOM killer's
/// SIGKILL), says nothing of the file: the chunker pauses and tries again
/// instead of dead-lettering every PDF in a second.
#[test]
fn a_parser_that_cannot_start_or_is_killed_is_unavailable_not_malformed() {
    let pdf = valid_pdf(&["Submit expense reports within thirty days."]);
    let unavailable = |r: Result<String, ParseError>| match r {
        Err(ParseError::Unavailable(why)) => why,
        other => panic!("expected the parser unavailable, got {other:?}"),
    };
    let missing = Path::new("/nonexistent/ragd");
    let why = unavailable(extract_isolated(
        missing,
        256 * MIB,
        1 << 20,
        time_budget(pdf.len()),
        &pdf,
    ));
    assert!(
        why.contains("starting the PDF parser /nonexistent/ragd"),
        "{why}"
    );

    // (A stand-in for the child that the kernel kills as it starts.)
    let dir = tempfile::tempdir().unwrap();
    let killed = dir.path().join("killed");
    std::fs::write(&killed, "#!/bin/sh\nkill -9 $$\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&killed, std::fs::Permissions::from_mode(0o755)).unwrap();
    // (Another test's child, forked while the script was open for
    // writing, may hold it open a moment: ETXTBSY.)
    let why = (0..100)
        .find_map(|_| {
            let why = unavailable(extract_isolated(
                &killed,
                256 * MIB,
                1 << 20,
                time_budget(pdf.len()),
                &pdf,
            ));
            let busy = why.contains("Text file busy");
            if busy {
                std::thread::sleep(Duration::from_millis(20));
            }
            (!busy).then_some(why)
        })
        .expect("the script stayed busy");
    assert!(
        why.contains("killed") && why.contains("out of memory"),
        "{why}"
    );
}
