//! Turning a file's bytes into text with its section headings.
//!
//! Every format is reduced to the same shape, a list of sections each with its
//! heading trail, so the splitter can keep headings as context whatever the
//! source format was.

use std::path::Path;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ParseError {
    /// Not a format we index: skipped with this reason, never retried.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A supported format that failed to parse: retried, then dead-lettered.
    #[error("malformed {format}: {message}")]
    Malformed {
        format: &'static str,
        message: String,
    },
}

/// A run of body text under a heading trail ("Benefits > Parental leave").
#[derive(Debug, Clone, PartialEq)]
pub struct Section {
    pub headings: Vec<String>,
    pub body: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Format {
    Text,
    Markdown,
    Html,
    Pdf,
}

impl Format {
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "txt" | "text" | "log" | "rst" => Some(Format::Text),
            "md" | "markdown" => Some(Format::Markdown),
            "html" | "htm" => Some(Format::Html),
            "pdf" => Some(Format::Pdf),
            _ => None,
        }
    }
}

pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Section>, ParseError> {
    let format = Format::from_path(path).ok_or_else(|| {
        ParseError::Unsupported(format!(
            "no parser for extension {:?}",
            path.extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
    })?;
    match format {
        Format::Pdf => parse_pdf(bytes),
        _ => {
            let text = decode_text(bytes)?;
            Ok(match format {
                Format::Markdown => markdown_sections(&text),
                Format::Html => markdown_sections(&html_to_markdown(&text)),
                _ => vec![Section {
                    headings: vec![],
                    body: text,
                }],
            })
        }
    }
}

/// Text formats must be UTF-8 and not binary: a NUL byte or invalid UTF-8
/// means someone named a binary file `.txt`, which is skipped, not indexed as
/// garbage.
fn decode_text(bytes: &[u8]) -> Result<String, ParseError> {
    let probe = &bytes[..bytes.len().min(8192)];
    if probe.contains(&0) {
        return Err(ParseError::Unsupported("binary content (NUL bytes)".into()));
    }
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ParseError::Unsupported(format!("not UTF-8 text: {e}")))?;
    Ok(text.strip_prefix('\u{feff}').unwrap_or(text).to_string())
}

fn parse_pdf(bytes: &[u8]) -> Result<Vec<Section>, ParseError> {
    if !bytes.starts_with(b"%PDF-") {
        return Err(ParseError::Malformed {
            format: "pdf",
            message: "missing %PDF- header".into(),
        });
    }
    // pdf-extract panics on some malformed inputs instead of returning an
    // error; a parse failure must reach the DLQ, not take the worker down.
    let owned = bytes.to_vec();
    let result = std::panic::catch_unwind(move || pdf_extract::extract_text_from_mem(&owned));
    let text = match result {
        Ok(Ok(text)) => text,
        Ok(Err(e)) => {
            return Err(ParseError::Malformed {
                format: "pdf",
                message: e.to_string(),
            })
        }
        Err(_) => {
            return Err(ParseError::Malformed {
                format: "pdf",
                message: "the PDF parser gave up on this file".into(),
            })
        }
    };
    Ok(vec![Section {
        headings: vec![],
        body: normalise_whitespace(&text),
    }])
}

fn normalise_whitespace(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut blank = 0;
    for line in text.lines() {
        let line = line.trim_end();
        if line.trim().is_empty() {
            blank += 1;
            continue;
        }
        if !out.is_empty() {
            out.push_str(if blank > 0 { "\n\n" } else { "\n" });
        }
        blank = 0;
        out.push_str(line);
    }
    out
}

/// Splits Markdown at ATX headings (`#`..`######`) outside code fences.
pub fn markdown_sections(text: &str) -> Vec<Section> {
    let mut sections = Vec::new();
    let mut trail: Vec<(usize, String)> = Vec::new();
    let mut body = String::new();
    let mut in_fence = false;
    let flush = |trail: &[(usize, String)], body: &mut String, sections: &mut Vec<Section>| {
        if !body.trim().is_empty() {
            sections.push(Section {
                headings: trail.iter().map(|(_, h)| h.clone()).collect(),
                body: body.trim().to_string(),
            });
        }
        body.clear();
    };
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("```") || trimmed.starts_with("~~~") {
            in_fence = !in_fence;
        }
        let level = trimmed.chars().take_while(|c| *c == '#').count();
        let is_heading =
            !in_fence && (1..=6).contains(&level) && trimmed[level..].starts_with([' ', '\t']);
        if is_heading {
            flush(&trail, &mut body, &mut sections);
            let title = trimmed[level..]
                .trim()
                .trim_end_matches('#')
                .trim()
                .to_string();
            trail.retain(|(l, _)| *l < level);
            trail.push((level, title));
        } else {
            body.push_str(line);
            body.push('\n');
        }
    }
    flush(&trail, &mut body, &mut sections);
    sections
}

/// Keeps an HTML page's main text as Markdown-ish lines: headings become `#`
/// lines, navigation chrome and scripts are dropped. When the page marks its
/// main content (`<main>`, `<article>`, `role="main"`), only that is kept.
pub fn html_to_markdown(html: &str) -> String {
    use scraper::{Html, Node, Selector};
    let doc = Html::parse_document(html);
    let main_sel = Selector::parse("main, article, [role=main]").expect("static selector");
    let body_sel = Selector::parse("body").expect("static selector");
    let root = doc
        .select(&main_sel)
        .next()
        .or_else(|| doc.select(&body_sel).next())
        .unwrap_or_else(|| doc.root_element());

    const SKIP: &[&str] = &[
        "script", "style", "noscript", "nav", "header", "footer", "aside", "form", "template",
        "svg", "iframe", "button",
    ];
    const BLOCK: &[&str] = &[
        "p",
        "div",
        "section",
        "li",
        "tr",
        "br",
        "pre",
        "blockquote",
        "table",
        "ul",
        "ol",
        "dd",
        "dt",
    ];
    // An explicit stack, not recursion: html5ever nests elements as deep as
    // the file does, and 100,000 nested <div>s (500 KB) would overflow a
    // thread's stack, which aborts the whole daemon.
    enum Step<'a> {
        Visit(ego_tree::NodeRef<'a, Node>),
        Push(&'static str),
        /// A heading's text starts at this byte of the output: trim it.
        EndHeading(usize),
    }
    let mut out = String::new();
    let mut stack: Vec<Step> = root.children().rev().map(Step::Visit).collect();
    while let Some(step) = stack.pop() {
        let child = match step {
            Step::Visit(node) => node,
            Step::Push(s) => {
                out.push_str(s);
                continue;
            }
            Step::EndHeading(start) => {
                let text = out[start..].trim().to_string();
                out.truncate(start);
                out.push_str(&text);
                out.push_str("\n\n");
                continue;
            }
        };
        match child.value() {
            Node::Text(t) => {
                let t = t.text.split_whitespace().collect::<Vec<_>>().join(" ");
                if !t.is_empty() {
                    if !out.is_empty() && !out.ends_with(['\n', ' ']) {
                        out.push(' ');
                    }
                    out.push_str(&t);
                }
            }
            Node::Element(el) => {
                let name = el.name();
                if SKIP.contains(&name) || el.attr("hidden").is_some() {
                    continue;
                }
                let heading = match name {
                    "h1" => 1,
                    "h2" => 2,
                    "h3" => 3,
                    "h4" => 4,
                    "h5" => 5,
                    "h6" => 6,
                    _ => 0,
                };
                if heading > 0 {
                    out.push_str("\n\n");
                    out.push_str(&"#".repeat(heading));
                    out.push(' ');
                    stack.push(Step::EndHeading(out.len()));
                } else if BLOCK.contains(&name) {
                    out.push('\n');
                    stack.push(Step::Push("\n"));
                }
                stack.extend(child.children().rev().map(Step::Visit));
            }
            _ => {}
        }
    }
    normalise_whitespace(&out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_headings_form_a_trail_and_fences_are_not_headings() {
        let md = "# Handbook\nintro\n## Leave\n### Parental\nask HR\n```\n# not a heading\n```\n## Travel\nbook early\n";
        let s = markdown_sections(md);
        assert_eq!(s[0].headings, vec!["Handbook"]);
        assert_eq!(s[1].headings, vec!["Handbook", "Leave", "Parental"]);
        assert!(s[1].body.contains("# not a heading"));
        assert_eq!(s[2].headings, vec!["Handbook", "Travel"]);
    }

    #[test]
    fn html_keeps_main_text_and_drops_chrome() {
        let html = r#"<html><head><script>var x=1;</script><style>p{}</style></head><body>
            <nav>Home | About</nav><header>Site</header>
            <main><h1>Expenses</h1><p>Submit receipts within 30 days.</p><script>track()</script></main>
            <footer>Copyright</footer></body></html>"#;
        let md = html_to_markdown(html);
        assert!(md.contains("# Expenses"), "{md}");
        assert!(md.contains("Submit receipts within 30 days."));
        for chrome in ["Home | About", "Copyright", "var x", "track()", "Site"] {
            assert!(!md.contains(chrome), "kept {chrome:?} in {md}");
        }
    }

    /// Deep nesting is data, not a reason to crash: a stack overflow
    /// aborts the process, which no panic handler catches. Run on a thread
    /// with a 256 KiB stack, an eighth of what a blocking-pool thread has.
    #[test]
    fn deeply_nested_documents_parse_without_recursion() {
        let depth = 20_000;
        let html = format!(
            "<html><body>{}<h2>Pay <b>bands</b></h2>deep text{}</body></html>",
            "<div><span>".repeat(depth),
            "</span></div>".repeat(depth)
        );
        let md = "> ".repeat(depth) + "deep quote\n";
        let (html_md, sections) = std::thread::Builder::new()
            .stack_size(256 * 1024)
            .spawn(move || {
                let sections = parse(Path::new("deep.md"), md.as_bytes()).unwrap();
                (html_to_markdown(&html), sections)
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(
            html_md.contains("## Pay bands\n\ndeep text"),
            "{html_md:.200}"
        );
        assert!(
            sections.iter().any(|s| s.body.contains("deep quote")),
            "{sections:?}"
        );
    }

    #[test]
    fn binary_and_unknown_files_are_unsupported_and_bad_pdfs_malformed() {
        let p = Path::new("a.txt");
        assert!(matches!(
            parse(p, b"ab\0cd"),
            Err(ParseError::Unsupported(_))
        ));
        assert!(matches!(
            parse(p, &[0xff, 0xfe, 0x41]),
            Err(ParseError::Unsupported(_))
        ));
        assert!(matches!(
            parse(Path::new("a.exe"), b"MZ"),
            Err(ParseError::Unsupported(_))
        ));
        assert!(matches!(
            parse(Path::new("a.pdf"), b"%PDF-1.4 garbage"),
            Err(ParseError::Malformed { .. })
        ));
        assert!(matches!(
            parse(Path::new("a.pdf"), b"hello"),
            Err(ParseError::Malformed { .. })
        ));
    }
}
