//! PDF text, parsed in a child process with its own memory and time limits.
//!
//! pdf-extract (over lopdf) inflates a PDF's streams whole, with no bound,
//! and its object parser recurses once per level of nesting. So a 1 MB
//! file can ask for gigabytes (a compressed stream of text that inflates a
//! thousandfold took this machine's daemon to 7.8 GB and an allocation
//! abort), and 400 KB of nested arrays overflows the stack: both kill the
//! process, not a worker, and the daemon would meet the same file again
//! after its restart. Neither can be caught in process (an abort is not a
//! panic). So the daemon parses each PDF in a child, its own executable run
//! as `ragd __pdf-text` ([`child_main`]): the child caps its own memory
//! (RLIMIT_DATA) before it reads the file from stdin, and writes the text to
//! stdout; the parent kills it past a time budget and reads at most
//! `max_text_bytes` of text. A child that dies takes only that file with
//! it, to the DLQ with the reason. A child costs a few milliseconds to
//! start and stop (about 4 ms for a debug build's 1 GB executable), against
//! tens to hundreds for the parse of a real PDF (BENCHMARKS.md, "PDFs in a
//! child process").

use super::parse::ParseError;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use wait_timeout::ChildExt;

/// The argument that makes the ragd executable a PDF parser child.
pub const CHILD_ARG: &str = "__pdf-text";

/// Where PDFs are parsed.
#[derive(Clone, Debug, Default)]
pub enum PdfParser {
    /// In this process: for tests and benches that have no ragd executable
    /// to run; a hostile PDF can take the process down.
    #[default]
    InProcess,
    /// In a child process: `exe __pdf-text MEMORY_BYTES`.
    Isolated {
        exe: PathBuf,
        /// The child's data limit (heap and private mappings).
        memory_bytes: u64,
        /// More text than this is not read: the file is skipped.
        max_text_bytes: u64,
    },
}

impl PdfParser {
    /// The daemon's: this very executable (`/proc/self/exe`, which stays
    /// the running binary's image even once an upgrade replaces the file).
    pub fn isolated(memory_bytes: u64, max_text_bytes: u64) -> PdfParser {
        let exe = PathBuf::from("/proc/self/exe");
        let exe = if exe.exists() {
            exe
        } else {
            std::env::current_exe().unwrap_or(exe)
        };
        PdfParser::Isolated {
            exe,
            memory_bytes,
            max_text_bytes,
        }
    }

    pub fn extract(&self, bytes: &[u8]) -> Result<String, ParseError> {
        match self {
            PdfParser::InProcess => extract_in_process(bytes),
            PdfParser::Isolated {
                exe,
                memory_bytes,
                max_text_bytes,
            } => extract_isolated(
                exe,
                *memory_bytes,
                *max_text_bytes,
                time_budget(bytes.len()),
                bytes,
            ),
        }
    }
}

/// Not a PDF at all: said before any parser (or child) is started.
fn check_header(bytes: &[u8]) -> Result<(), ParseError> {
    if bytes.starts_with(b"%PDF-") {
        Ok(())
    } else {
        Err(malformed("missing %PDF- header"))
    }
}

fn malformed(message: impl Into<String>) -> ParseError {
    ParseError::Malformed {
        format: "pdf",
        message: message.into(),
    }
}

/// pdf-extract here; its panics (it has some on malformed input) become
/// errors.
pub fn extract_in_process(bytes: &[u8]) -> Result<String, ParseError> {
    check_header(bytes)?;
    match std::panic::catch_unwind(|| pdf_extract::extract_text_from_mem(bytes)) {
        Ok(Ok(text)) => Ok(text),
        Ok(Err(e)) => Err(malformed(e.to_string())),
        Err(_) => Err(malformed("the PDF parser gave up on this file")),
    }
}

/// How long a child may take: 30 s, and 10 s more per MB, some ten times
/// pdf-extract's pace on ordinary files (about 1 s a MB on one core).
pub fn time_budget(bytes: usize) -> Duration {
    Duration::from_secs(30) + Duration::from_secs_f64(bytes as f64 / 1e5)
}

/// Exit codes of [`child_main`].
const EXIT_MALFORMED: i32 = 2;
const EXIT_USAGE: i32 = 64;

/// `bytes`' text from a child `exe __pdf-text memory_bytes`, killed after
/// `budget`; more than `max_text_bytes` of text skips the file.
pub fn extract_isolated(
    exe: &std::path::Path,
    memory_bytes: u64,
    max_text_bytes: u64,
    budget: Duration,
    bytes: &[u8],
) -> Result<String, ParseError> {
    check_header(bytes)?;
    let mut child = Command::new(exe)
        .arg(CHILD_ARG)
        .arg(memory_bytes.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            ParseError::Unavailable(format!("starting the PDF parser {}: {e}", exe.display()))
        })?;
    let (mut stdin, stdout, stderr) = (
        child.stdin.take().expect("piped"),
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    // Three pipes at once, or a full one would stall the child: the file
    // in, the text and the child's complaints out.
    let (status, text, complaint) = std::thread::scope(|s| {
        // A child that dies before it has read everything closes the pipe:
        // its status says why, not this write's error.
        s.spawn(move || {
            let _ = stdin.write_all(bytes);
        });
        let text = s.spawn(move || read_at_most(stdout, max_text_bytes + 1));
        let complaint = s.spawn(move || read_at_most(stderr, 64 << 10));
        let status = match child.wait_timeout(budget) {
            Ok(Some(status)) => Ok(status),
            Ok(None) | Err(_) => {
                // Killed before the readers are joined: they end with it.
                let _ = child.kill();
                let _ = child.wait();
                Err(())
            }
        };
        (
            status,
            text.join().unwrap_or_default(),
            complaint.join().unwrap_or_default(),
        )
    });
    let complaint = String::from_utf8_lossy(&complaint);
    let Ok(status) = status else {
        return Err(malformed(format!("not parsed within {budget:?}")));
    };
    if text.len() as u64 > max_text_bytes {
        // The child may have died of the closed pipe: the size is the news.
        return Err(ParseError::Unsupported(format!(
            "its text is over the {max_text_bytes} byte limit ([chunker] max_file_bytes)"
        )));
    }
    // Killed, not by us (that was the budget, above): the kernel's OOM
    // killer, which picks whatever is biggest when the node runs out of
    // memory (the child's own limit makes a failed allocation, below).
    if std::os::unix::process::ExitStatusExt::signal(&status) == Some(libc::SIGKILL) {
        return Err(ParseError::Unavailable(format!(
            "the PDF parser was killed ({status}): is the node out of memory?"
        )));
    }
    match status.code() {
        Some(0) => String::from_utf8(text)
            .map_err(|_| malformed("the PDF parser wrote text that is not UTF-8")),
        Some(EXIT_MALFORMED) => Err(malformed(complaint.trim().to_string())),
        _ if complaint.contains("memory allocation of") => Err(malformed(format!(
            "needs more than {} MiB of memory to parse ([chunker] pdf_memory_mb)",
            memory_bytes >> 20
        ))),
        _ if complaint.contains("overflowed its stack") => Err(malformed(
            "nested too deeply for the PDF parser (its stack overflowed)",
        )),
        _ => Err(malformed(format!(
            "the PDF parser died ({status}){}",
            complaint
                .lines()
                .rfind(|l| !l.trim().is_empty())
                .map(|l| format!(": {l}"))
                .unwrap_or_default()
        ))),
    }
}

/// Reads `r` to its end, keeping at most `max` bytes (the rest is left
/// unread: the pipe closes when `r` is dropped).
fn read_at_most(r: impl Read, max: u64) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = r.take(max).read_to_end(&mut out);
    out
}

/// `ragd __pdf-text MEMORY_BYTES`: reads a PDF from stdin and writes its
/// text to stdout, under a data limit of MEMORY_BYTES. Exits 0 with the
/// text, [`EXIT_MALFORMED`] with the parser's error on stderr; an abort
/// (allocation failure, stack overflow) is the parent's to read.
pub fn child_main(args: &[String]) -> i32 {
    let Some(memory) = args.first().and_then(|a| a.parse::<u64>().ok()) else {
        eprintln!("usage: ragd {CHILD_ARG} MEMORY_BYTES < file.pdf");
        return EXIT_USAGE;
    };
    // Before the file is read: its bytes count too. No core file: a
    // crash here is the file's, reported by the parent.
    let limit = libc::rlimit {
        rlim_cur: memory as libc::rlim_t,
        rlim_max: memory as libc::rlim_t,
    };
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: setrlimit reads the struct it is given; nothing else.
    let set = unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::setrlimit(libc::RLIMIT_DATA, &limit)
    };
    if set != 0 {
        eprintln!(
            "setting the memory limit: {}",
            std::io::Error::last_os_error()
        );
        return EXIT_USAGE;
    }
    let mut bytes = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut bytes) {
        eprintln!("reading the PDF: {e}");
        return EXIT_USAGE;
    }
    match extract_in_process(&bytes) {
        Ok(text) => {
            drop(bytes);
            let mut out = std::io::stdout().lock();
            // The parent stops reading past its text limit: a write that
            // fails then is no news.
            let _ = out.write_all(text.as_bytes()).and_then(|()| out.flush());
            0
        }
        Err(ParseError::Malformed { message, .. }) => {
            eprintln!("{message}");
            EXIT_MALFORMED
        }
        Err(e) => {
            eprintln!("{e}");
            EXIT_MALFORMED
        }
    }
}
