//! Turning a file's bytes into text with its section headings.
//!
//! Every format is reduced to the same shape, a list of sections each with its
//! heading trail, so the splitter can keep headings as context whatever the
//! source format was.

use super::pdf::PdfParser;
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
    /// Not parsed for want of the node's resources (the PDF parser's
    /// process could not start, or the system killed it): not the file's
    /// fault, so its stage pauses and tries again (see
    /// [`crate::pool::unavailable`]) rather than dead-letter good files.
    #[error("cannot parse it now: {0}")]
    Unavailable(String),
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

/// [`parse_with`] PDFs parsed in this process (tests, benches).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Vec<Section>, ParseError> {
    parse_with(path, bytes, &PdfParser::InProcess)
}

pub fn parse_with(path: &Path, bytes: &[u8], pdf: &PdfParser) -> Result<Vec<Section>, ParseError> {
    let format = Format::from_path(path).ok_or_else(|| {
        ParseError::Unsupported(format!(
            "no parser for extension {:?}",
            path.extension()
                .map(|e| e.to_string_lossy().into_owned())
                .unwrap_or_default()
        ))
    })?;
    match format {
        Format::Pdf => parse_pdf(bytes, pdf),
        _ => {
            let text = decode_text(bytes, format)?;
            Ok(match format {
                Format::Markdown => markdown_sections(&text_of(&text)?),
                Format::Html => markdown_sections(&text_of(&html_to_markdown(&text))?),
                _ => vec![Section {
                    headings: vec![],
                    body: text_of(&text)?.into_owned(),
                }],
            })
        }
    }
}

/// A run of at least this many base64 (or hex) characters, digits among
/// them, is encoded data, not words: no word of prose or code is this
/// long. (The pieces a run ends in are `/`, `+`, `=`, `-`, `_`: a URL path
/// of words has no digits and is kept.)
const ENCODED_RUN: usize = 256;

/// A line of only base64 characters (letters of both cases and digits
/// among them), at least this long, in a block of [`ENCODED_BLOCK`] or
/// more: a PEM certificate or key, a MIME part (64 or 76 a line).
const ENCODED_LINE: usize = 40;
const ENCODED_BLOCK: usize = 3;

fn is_base64(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b'-' | b'_')
}

/// `text` without encoded data: an image inlined as a `data:` URI (a
/// Markdown editor's pasted screenshot, an exported page), a PEM
/// certificate in a runbook, a base64 attachment. The BERT pre-tokenizer
/// splits base64 at its `+` and `/` into pieces WordPiece spells, so such
/// data became chunks of meaningless tokens: a 2 MB Markdown file with one
/// pasted screenshot was ~4,000 chunks, minutes of embedding on CPU, and
/// as many junk vectors in its partition (unlike a key dump, whose
/// unbroken words are `[UNK]` and left out). The prose around it stays.
pub fn without_encoded_data(text: &str) -> std::borrow::Cow<'_, str> {
    let encoded_line = |line: &str| {
        let b = line.trim().as_bytes();
        b.len() >= ENCODED_LINE
            && b.iter().all(|&c| is_base64(c))
            && b.iter().any(u8::is_ascii_digit)
            && b.iter().any(u8::is_ascii_uppercase)
            && b.iter().any(u8::is_ascii_lowercase)
    };
    let lines: Vec<&str> = text.split('\n').collect();
    let mut dropped = vec![false; lines.len()];
    let mut i = 0;
    while i < lines.len() {
        let start = i;
        while i < lines.len() && encoded_line(lines[i]) {
            i += 1;
        }
        if i - start >= ENCODED_BLOCK {
            dropped[start..i].iter_mut().for_each(|d| *d = true);
        }
        i = i.max(start + 1);
    }
    let kept: Vec<std::borrow::Cow<str>> = (lines.iter().zip(&dropped))
        .filter(|(_, d)| !**d)
        .map(|(line, _)| without_runs(line))
        .collect();
    let cut = kept.iter().any(|l| matches!(l, std::borrow::Cow::Owned(_)));
    if !cut && !dropped.contains(&true) {
        return std::borrow::Cow::Borrowed(text);
    }
    std::borrow::Cow::Owned(kept.join("\n"))
}

/// [`without_encoded_data`], or why there is nothing left to index.
fn text_of(text: &str) -> Result<std::borrow::Cow<'_, str>, ParseError> {
    let kept = without_encoded_data(text);
    if matches!(kept, std::borrow::Cow::Owned(_)) && kept.trim().is_empty() {
        return Err(ParseError::Unsupported(
            "no text: only encoded data (base64 or hex: a key, an image or an attachment)".into(),
        ));
    }
    Ok(kept)
}

/// `line` without its runs of [`ENCODED_RUN`] or more base64 characters
/// with a digit among them.
fn without_runs(line: &str) -> std::borrow::Cow<'_, str> {
    let bytes = line.as_bytes();
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if !is_base64(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && is_base64(bytes[i]) {
            i += 1;
        }
        if i - start >= ENCODED_RUN && bytes[start..i].iter().any(u8::is_ascii_digit) {
            cuts.push((data_uri_head(&line[..start]).unwrap_or(start), i));
        }
    }
    if cuts.is_empty() {
        return std::borrow::Cow::Borrowed(line);
    }
    // (Runs are ASCII, so each cut is at a character boundary.)
    let mut out = String::with_capacity(line.len());
    let mut at = 0;
    for (start, end) in cuts {
        out.push_str(&line[at..start]);
        at = end;
    }
    out.push_str(&line[at..]);
    std::borrow::Cow::Owned(out)
}

/// Where the head of a `data:` URI (`data:image/png;base64,`) that
/// `before` ends with starts: it goes with the data it names.
fn data_uri_head(before: &str) -> Option<usize> {
    let at = before.rfind("data:")?;
    let media = &before[at + "data:".len()..];
    let plain = |c: char| c.is_ascii_alphanumeric() || "/+.-_;=".contains(c);
    (media.ends_with(";base64,")
        && media.len() <= 128
        && media[..media.len() - 1].chars().all(plain))
    .then_some(at)
}

/// A text format's bytes as text. UTF-8 is the rule; a byte-order mark
/// names another Unicode encoding (Windows tools save "Unicode" text as
/// UTF-16 with one); text in neither is in a legacy encoding, an HTML
/// page's declared one or else the one chardetng (Firefox's detector)
/// guesses, e.g. Windows-1252 or Shift_JIS. UTF-8 with a few bad bytes (a
/// file cut mid-character, a stray byte) stays UTF-8, each bad sequence
/// one replacement character. A NUL byte, or unreadable characters all
/// over the decoded text, mean someone named a binary file `.txt`: it is
/// skipped, not indexed as garbage.
fn decode_text(bytes: &[u8], format: Format) -> Result<String, ParseError> {
    use encoding_rs::{Encoding, UTF_8};
    let probe = &bytes[..bytes.len().min(8192)];
    let unicode = Encoding::for_bom(bytes).or_else(|| unmarked_utf16(probe).map(|e| (e, 0)));
    let (text, encoding) = if let Some((encoding, bom)) = unicode {
        (
            encoding.decode_without_bom_handling(&bytes[bom..]).0,
            encoding,
        )
    } else {
        if probe.contains(&0) {
            return Err(ParseError::Unsupported("binary content (NUL bytes)".into()));
        }
        if let Ok(text) = std::str::from_utf8(bytes) {
            return Ok(text.to_string());
        }
        let declared = match format {
            Format::Html => declared_charset(bytes),
            _ => None,
        };
        let encoding = if mostly_utf8(bytes) {
            UTF_8
        } else {
            declared.unwrap_or_else(|| {
                // The first 64 KiB say enough, and a huge file costs no more.
                let sample = &bytes[..bytes.len().min(64 << 10)];
                let mut detector = chardetng::EncodingDetector::new();
                detector.feed(sample, sample.len() == bytes.len());
                detector.guess(None, false)
            })
        };
        (encoding.decode_without_bom_handling(bytes).0, encoding)
    };
    // (ESC: a log's colour codes.)
    let unreadable = text
        .chars()
        .filter(|c| {
            *c == char::REPLACEMENT_CHARACTER
                || (c.is_control() && !c.is_ascii_whitespace() && *c != '\u{1b}')
        })
        .count();
    if unreadable * 100 > text.chars().count() {
        return Err(ParseError::Unsupported(format!(
            "binary content (unreadable characters, read as {})",
            encoding.name()
        )));
    }
    Ok(text.into_owned())
}

/// UTF-16 without a byte-order mark (.NET's and some exporters' default),
/// told by its NUL bytes: text mostly in the first 256 code points has one
/// in nearly every other byte, the high one of each unit (at odd offsets
/// little-endian, at even ones big-endian), and hardly any in the others.
/// Binary data rarely looks like that, and what does is read as control
/// characters and skipped all the same. Chinese, Japanese or Korean text
/// has few NULs, from its line breaks, spaces and digits (and a few
/// characters such as '一'); it is taken as UTF-16 in the byte order in
/// which it then reads as text in nearly every unit (see
/// [`reads_as_text`]), if only one. Text in a legacy encoding has no NUL
/// at all.
fn unmarked_utf16(probe: &[u8]) -> Option<&'static encoding_rs::Encoding> {
    let units = probe.len() / 2;
    if units < 2 {
        return None;
    }
    let zeros = |at: usize| {
        probe[at..]
            .iter()
            .step_by(2)
            .take(units)
            .filter(|b| **b == 0)
            .count()
    };
    let (even, odd) = (zeros(0), zeros(1));
    let mostly = |n: usize| n * 10 >= units * 9;
    let hardly = |n: usize| n * 50 <= units;
    if mostly(odd) && hardly(even) {
        Some(encoding_rs::UTF_16LE)
    } else if mostly(even) && hardly(odd) {
        Some(encoding_rs::UTF_16BE)
    } else {
        // ASCII (or UTF-8) with a few stray NULs is no UTF-16: nearly
        // every unit of it is two printable ASCII bytes, which CJK text has
        // in a fifth of its units or fewer (and read as UTF-16, ASCII
        // pairs are CJK ideographs: letters).
        let ascii = |b: u8| matches!(b, b' '..=b'~' | b'\t' | b'\n' | b'\r');
        let pairs = (probe.chunks_exact(2))
            .filter(|p| ascii(p[0]) && ascii(p[1]))
            .count();
        if even + odd < 2 || pairs * 4 >= units * 3 {
            return None;
        }
        // Either order: a CJK character's low byte is NUL too now and then
        // ('一', U+3000's ideographic space), so both sides may have some.
        // The order whose text reads as text, if only one does. (A probe
        // cut mid-pair ends in a replacement character: one in thousands.)
        let reads = |e: &'static encoding_rs::Encoding| {
            reads_as_text(&e.decode_without_bom_handling(&probe[..units * 2]).0)
        };
        match (reads(encoding_rs::UTF_16LE), reads(encoding_rs::UTF_16BE)) {
            (true, false) => Some(encoding_rs::UTF_16LE),
            (false, true) => Some(encoding_rs::UTF_16BE),
            _ => None,
        }
    }
}

/// Whether nearly every character of `text` (19 in 20) is a letter or
/// digit of any script, white space or punctuation: what text decoded
/// with the wrong encoding, or binary data, is not (it lands in private
/// use, surrogates, symbols and scripts scattered over the whole range).
fn reads_as_text(text: &str) -> bool {
    let (mut all, mut good) = (0usize, 0usize);
    for c in text.chars() {
        all += 1;
        let punctuation = c.is_ascii_punctuation()
            || matches!(c, '\u{2000}'..='\u{206f}' | '\u{3000}'..='\u{303f}' | '\u{ff00}'..='\u{ffef}');
        good += usize::from(c.is_alphanumeric() || c.is_whitespace() || punctuation);
    }
    all >= 8 && good * 20 >= all * 19
}

/// Whether bytes that are not valid UTF-8 are still UTF-8 text with a few
/// bad bytes: more well-formed multi-byte characters than malformed
/// sequences. Text in a legacy encoding has hardly any well-formed ones
/// (an accented letter followed by a plain one is malformed UTF-8).
fn mostly_utf8(bytes: &[u8]) -> bool {
    let (mut good, mut bad) = (0usize, 0usize);
    for chunk in bytes.utf8_chunks() {
        good += chunk.valid().chars().filter(|c| !c.is_ascii()).count();
        bad += usize::from(!chunk.invalid().is_empty());
    }
    good > bad
}

/// The encoding an HTML page declares in a `<meta>` tag in its first 1024
/// bytes (`<meta charset="…">` or `content="text/html; charset=…"`), as
/// the HTML standard's pre-scan finds it (simplified: the first known
/// label wins). A page declaring UTF-16 without a byte-order mark is read
/// as UTF-8, and `x-user-defined` as Windows-1252, as browsers do.
fn declared_charset(bytes: &[u8]) -> Option<&'static encoding_rs::Encoding> {
    fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
        hay.windows(needle.len()).position(|w| w == needle)
    }
    let head = bytes[..bytes.len().min(1024)].to_ascii_lowercase();
    let mut rest = &head[..];
    while let Some(at) = find(rest, b"<meta") {
        let tag = &rest[at..];
        let tag = &tag[..find(tag, b">").unwrap_or(tag.len())];
        rest = &rest[at + tag.len()..];
        let mut attrs = tag;
        while let Some(at) = find(attrs, b"charset") {
            attrs = &attrs[at + 7..];
            let Some(value) = attrs.trim_ascii_start().strip_prefix(b"=") else {
                continue;
            };
            let value = value.trim_ascii_start();
            let value = value
                .strip_prefix(b"\"")
                .or(value.strip_prefix(b"'"))
                .unwrap_or(value);
            let end = value
                .iter()
                .position(|b| !(b.is_ascii_alphanumeric() || b"-_:.".contains(b)))
                .unwrap_or(value.len());
            if let Some(e) = encoding_rs::Encoding::for_label(&value[..end]) {
                return Some(match e {
                    e if e == encoding_rs::X_USER_DEFINED => encoding_rs::WINDOWS_1252,
                    e => e.output_encoding(),
                });
            }
        }
    }
    None
}

fn parse_pdf(bytes: &[u8], pdf: &PdfParser) -> Result<Vec<Section>, ParseError> {
    let text = pdf.extract(bytes)?;
    Ok(vec![Section {
        headings: vec![],
        body: normalise_whitespace(&text_of(&text)?),
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
///
/// Building the tree can take time that grows with the square of the
/// page: html5ever checks the whole stack of open elements at each block
/// start tag (100,000 nested `<div>`s took 48 s; a 20 MB file of them
/// would hold a chunker for days), and rebuilds misnested formatting
/// elements. Two guards, after which the page is read from its tokens
/// alone, without a tree:
///
/// * a page that nests deeper than [`MAX_HTML_DEPTH`], as one pass of the
///   tokenizer measures it (the usual case, decided from the input alone);
/// * a tree that is not built within [`tree_budget`]: the guarantee, for
///   markup the measure does not see through.
pub fn html_to_markdown(html: &str) -> String {
    let depth = flat_html(html, false).max_depth;
    if depth > MAX_HTML_DEPTH {
        tracing::debug!(depth, "HTML nested too deep for a tree; reading its tokens");
        return normalise_whitespace(&flat_html(html, true).text);
    }
    let budget = tree_budget(html.len());
    html_tree_to_markdown(html, budget).unwrap_or_else(|| {
        tracing::warn!(
            bytes = html.len(),
            "HTML not built as a tree within {budget:?}; reading its tokens"
        );
        normalise_whitespace(&flat_html(html, true).text)
    })
}

/// Time to build a page's tree: 2 s plus 1 s per MB, some fifty times what
/// html5ever needs for ordinary markup on one core.
pub fn tree_budget(bytes: usize) -> std::time::Duration {
    std::time::Duration::from_secs(2) + std::time::Duration::from_secs_f64(bytes as f64 / 1e6)
}

/// Deeper than any real page (browsers stop nesting at 512 and add
/// elements as siblings beyond it); the tree is built up to it.
pub const MAX_HTML_DEPTH: usize = 512;

const SKIP: &[&str] = &[
    "script", "style", "noscript", "nav", "header", "footer", "aside", "form", "template", "svg",
    "iframe", "button",
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

fn heading_level(name: &str) -> usize {
    match name {
        "h1" => 1,
        "h2" => 2,
        "h3" => 3,
        "h4" => 4,
        "h5" => 5,
        "h6" => 6,
        _ => 0,
    }
}

/// A page read from its tokens: its text (chrome skipped, headings and
/// blocks marked as in the tree's reading) and how deep its elements nest.
struct FlatHtml {
    text: String,
    max_depth: usize,
}

/// One linear pass of html5ever's tokenizer (no tree builder); the text is
/// read only if `want_text`.
fn flat_html(html: &str, want_text: bool) -> FlatHtml {
    use html5ever::tendril::StrTendril;
    use html5ever::tokenizer::states::RawKind;
    use html5ever::tokenizer::{
        BufferQueue, TagKind, Token, TokenSink, TokenSinkResult, Tokenizer,
    };
    use std::cell::RefCell;

    /// Elements whose end tag may be left out (and the void ones, which
    /// have none): not counted, or every unclosed `<p>` would look like a
    /// level of nesting. None of them nests in itself without a counted
    /// element between (as `<rb>` and `<optgroup>` do, which are counted).
    const UNCOUNTED: &[&str] = &[
        "html", "head", "body", "p", "li", "dt", "dd", "option", "tr", "td", "th", "thead",
        "tbody", "tfoot", "colgroup", "caption", "area", "base", "br", "col", "embed", "hr", "img",
        "input", "link", "meta", "source", "track", "wbr",
    ];
    /// An end tag does not close elements below these (the spec's "has an
    /// element in scope").
    const SCOPE: &[&str] = &[
        "applet", "caption", "html", "table", "td", "th", "marquee", "object", "template", "svg",
        "math",
    ];
    /// Closed by the adoption agency, which may keep or re-open them.
    const FORMATTING: &[&str] = &[
        "a", "b", "big", "code", "em", "font", "i", "nobr", "s", "small", "strike", "strong", "tt",
        "u",
    ];
    /// The spec's "special" elements: an end tag of any other element is
    /// ignored when one of these is open above it.
    #[rustfmt::skip]
    const SPECIAL: &[&str] = &[
        "address", "applet", "area", "article", "aside", "base", "basefont", "bgsound",
        "blockquote", "body", "br", "button", "caption", "center", "col", "colgroup", "dd",
        "details", "dir", "div", "dl", "dt", "embed", "fieldset", "figcaption", "figure", "footer",
        "form", "frame", "frameset", "h1", "h2", "h3", "h4", "h5", "h6", "head", "header",
        "hgroup", "hr", "html", "iframe", "img", "input", "keygen", "li", "link", "listing",
        "main", "marquee", "menu", "meta", "nav", "noembed", "noframes", "noscript", "object",
        "ol", "p", "param", "plaintext", "pre", "script", "search", "section", "select", "source",
        "style", "summary", "table", "tbody", "td", "template", "textarea", "tfoot", "th", "thead",
        "title", "tr", "track", "ul", "wbr", "xmp", "isindex",
    ];
    /// SVG and MathML elements (lower case, as tokenized) that stay
    /// foreign content: in them a tag may close itself (`<path/>`). The
    /// integration points (`<title>`, `<desc>`, `<foreignObject>`, `<mi>`…)
    /// hold HTML again and are not here; neither is anything the tree
    /// builder would break out of foreign content for.
    #[rustfmt::skip]
    const FOREIGN: &[&str] = &[
        "g", "defs", "symbol", "use", "path", "circle", "rect", "line", "polyline", "polygon",
        "ellipse", "text", "tspan", "textpath", "lineargradient", "radialgradient", "stop",
        "clippath", "mask", "pattern", "filter", "marker", "image", "switch", "view", "animate",
        "animatetransform", "animatemotion", "set", "mpath", "feblend", "fecolormatrix",
        "fecomponenttransfer", "fecomposite", "feconvolvematrix", "fediffuselighting",
        "fedisplacementmap", "fedistantlight", "fedropshadow", "feflood", "fefunca", "fefuncb",
        "fefuncg", "fefuncr", "fegaussianblur", "feimage", "femerge", "femergenode",
        "femorphology", "feoffset", "fepointlight", "fespecularlighting", "fespotlight", "fetile",
        "feturbulence", "mrow", "mfrac", "msqrt", "mroot", "msub", "msup", "msubsup", "munder",
        "mover", "munderover", "mtable", "mtr", "mtd", "mstyle", "mspace", "mpadded", "mphantom",
        "menclose", "semantics", "mprescripts", "none", "mmultiscripts",
    ];
    /// How far below the top an end tag looks for its element, and the
    /// foreign-content check for its context.
    const REACH: usize = 16;

    #[derive(Default)]
    struct State {
        text: String,
        /// The counted elements open, as the tree builder would have them
        /// at least: an end tag closes one only where the tree builder
        /// does too, as far as this model of it goes. It leaves out what
        /// needs the builder's full state (formatting elements it reopens,
        /// a <select> it closes for a <textarea>, ...): for those the time
        /// budget of [`html_to_markdown`] holds.
        open: Vec<html5ever::LocalName>,
        max_depth: usize,
        /// Open `<svg>` and `<math>` elements.
        foreign: usize,
        /// Open `<select>` elements (in which html5ever ignores `<style>`,
        /// so its content is markup).
        selects: usize,
        /// Whether to read the text (the second pass), or only measure.
        want_text: bool,
        /// Inside a skipped element, open at this depth, of this name:
        /// skipping ends when the element is closed, by its end tag or its
        /// parent's.
        skipping: Option<(usize, String)>,
    }

    impl State {
        /// Whether the tree builder is certainly in SVG or MathML content:
        /// only foreign elements between the top and an `<svg>` or
        /// `<math>`. When unsure, a self-closed tag counts as open.
        fn surely_foreign(&self) -> bool {
            for open in self.open.iter().rev().take(REACH) {
                match &**open {
                    "svg" | "math" => return true,
                    name if FOREIGN.contains(&name) => {}
                    _ => return false,
                }
            }
            false
        }

        /// The text's side of a tag: skipped elements, headings, blocks.
        fn read_tag(&mut self, tag: &html5ever::tokenizer::Tag, start: bool, counted: bool) {
            let name: &str = &tag.name;
            if let Some((level, skipped)) = &self.skipping {
                // Closed by its parent, or (when the measure could not
                // close it: far below the top) by its own end tag.
                if self.open.len() < *level || (!start && name == skipped.as_str()) {
                    self.skipping = None;
                }
                return;
            }
            let level = heading_level(name);
            if start {
                let hidden = tag.attrs.iter().any(|a| &*a.name.local == "hidden");
                // Only an element whose end is seen can be skipped: not a
                // void one, nor one whose end tag may be left out.
                if counted && (SKIP.contains(&name) || hidden || name == "title") {
                    self.skipping = Some((self.open.len(), name.to_string()));
                } else if level > 0 {
                    self.text.push_str("\n\n");
                    self.text.push_str(&"#".repeat(level));
                    self.text.push(' ');
                } else if BLOCK.contains(&name) {
                    self.text.push('\n');
                }
            } else if level > 0 {
                self.text.push_str("\n\n");
            } else if BLOCK.contains(&name) {
                self.text.push('\n');
            }
        }

        fn close(&mut self, name: &str) {
            let special = SPECIAL.contains(&name);
            let mut at = None;
            for (i, open) in self.open.iter().enumerate().rev().take(REACH) {
                let open: &str = open;
                if open == name {
                    at = Some(i);
                    break;
                }
                // Only the current node closes a formatting element here;
                // another end tag stops at a scope boundary, and one of a
                // non-special element at any special one.
                if FORMATTING.contains(&name)
                    || SCOPE.contains(&open)
                    || (!special && SPECIAL.contains(&open))
                {
                    break;
                }
            }
            let Some(i) = at else {
                return;
            };
            // </svg> closes the SVG only from inside its content: an HTML
            // element above it (one that broke out) means the tree builder
            // left the SVG already and ignores the end tag.
            let foreign_root = name == "svg" || name == "math";
            if foreign_root && !self.open[i + 1..].iter().all(|o| FOREIGN.contains(&&**o)) {
                return;
            }
            // `</form>` takes the form off the stack, not what is open in
            // it.
            let closed: Vec<_> = if name == "form" {
                vec![self.open.remove(i)]
            } else {
                self.open.drain(i..).collect()
            };
            for closed in closed {
                self.foreign -= usize::from(&*closed == "svg" || &*closed == "math");
                self.selects -= usize::from(&*closed == "select");
            }
        }
    }
    struct Sink(RefCell<State>);

    impl TokenSink for Sink {
        type Handle = ();

        fn process_token(&self, token: Token, _line: u64) -> TokenSinkResult<()> {
            let mut st = self.0.borrow_mut();
            let st = &mut *st;
            match token {
                Token::TagToken(tag) => {
                    let name: &str = &tag.name;
                    let start = tag.kind == TagKind::StartTag;
                    // `<div/>` opens a div like `<div>` does: only in SVG
                    // and MathML does a tag close itself.
                    let foreign = name == "svg" || name == "math";
                    let closes_itself = tag.self_closing
                        && (foreign || (FOREIGN.contains(&name) && st.surely_foreign()));
                    // In SVG and MathML an <input> or <td> is a foreign
                    // element like any other, and stays open.
                    let counted = (!UNCOUNTED.contains(&name) || st.foreign > 0) && !closes_itself;
                    if counted {
                        if start {
                            st.open.push(tag.name.clone());
                            st.max_depth = st.max_depth.max(st.open.len());
                            st.foreign += usize::from(foreign);
                            st.selects += usize::from(name == "select");
                        } else {
                            st.close(name);
                        }
                    }
                    // Their content is text to the tree builder's
                    // tokenizer, never tags. (Not where SVG or MathML may
                    // be open, whose <title> or <style> holds markup:
                    // reading that as text would hide its nesting.)
                    let raw = match name {
                        // (`<style/>` is a <style> all the same.)
                        _ if st.foreign > 0 || st.selects > 0 || !start => None,
                        "script" => Some(RawKind::ScriptData),
                        "style" | "noscript" | "iframe" | "xmp" | "noembed" | "noframes" => {
                            Some(RawKind::Rawtext)
                        }
                        "title" | "textarea" => Some(RawKind::Rcdata),
                        _ => None,
                    };
                    if st.want_text {
                        st.read_tag(&tag, start, counted);
                    }
                    if let Some(kind) = raw {
                        return TokenSinkResult::RawData(kind);
                    }
                }
                Token::CharacterTokens(t) if st.want_text && st.skipping.is_none() => {
                    let words = t.split_whitespace().collect::<Vec<_>>().join(" ");
                    if !words.is_empty() {
                        if t.starts_with(char::is_whitespace)
                            && !st.text.is_empty()
                            && !st.text.ends_with(['\n', ' '])
                        {
                            st.text.push(' ');
                        }
                        st.text.push_str(&words);
                        if t.ends_with(char::is_whitespace) {
                            st.text.push(' ');
                        }
                    }
                }
                _ => {}
            }
            TokenSinkResult::Continue
        }
    }

    let input = BufferQueue::default();
    input.push_back(StrTendril::from(html));
    let state = State {
        want_text,
        ..State::default()
    };
    let tokenizer = Tokenizer::new(Sink(RefCell::new(state)), Default::default());
    let _ = tokenizer.feed(&input);
    tokenizer.end();
    let st = tokenizer.sink.0.into_inner();
    FlatHtml {
        text: st.text,
        max_depth: st.max_depth,
    }
}

/// The page's main text read from its tree, or None when the tree took
/// longer than `budget` to build (checked between slices of the input).
fn html_tree_to_markdown(html: &str, budget: std::time::Duration) -> Option<String> {
    use html5ever::tendril::TendrilSink;
    use scraper::{Html, HtmlTreeSink, Node, Selector};
    const SLICE: usize = 16 * 1024;
    let started = std::time::Instant::now();
    // As Html::parse_document, fed a slice at a time.
    let mut parser = html5ever::driver::parse_document(
        HtmlTreeSink::new(Html::new_document()),
        Default::default(),
    );
    let mut rest = html;
    while !rest.is_empty() {
        let mut end = rest.len().min(SLICE);
        while !rest.is_char_boundary(end) {
            end += 1;
        }
        parser.process(rest[..end].into());
        rest = &rest[end..];
        if started.elapsed() > budget {
            return None;
        }
    }
    let doc = parser.finish();
    let main_sel = Selector::parse("main, article, [role=main]").expect("static selector");
    let body_sel = Selector::parse("body").expect("static selector");
    let root = doc
        .select(&main_sel)
        .next()
        .or_else(|| doc.select(&body_sel).next())
        .unwrap_or_else(|| doc.root_element());

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
                let heading = heading_level(name);
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
    Some(normalise_whitespace(&out))
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

    /// How deep a page nests, as the tree builder will see it: omitted end
    /// tags and void elements are no nesting, `<div/>` is, and SVG's
    /// self-closed shapes are not.
    #[test]
    fn nesting_depth_counts_what_stays_open() {
        let depth = |html: String| flat_html(&html, false).max_depth;
        assert_eq!(depth("<div><div><b>x</b></div></div>".into()), 3);
        let paragraphs = "<p>para<br><img src=x>".repeat(2_000);
        assert_eq!(
            depth(format!("<html><body><ul>{}<li>x</ul>", paragraphs)),
            1
        );
        assert_eq!(depth("<div/>".repeat(600)), 600);
        let svg = format!("<svg>{}</svg>", "<path d='M0'/>".repeat(2_000));
        assert_eq!(depth(svg), 1);
        let icons = "<svg><g><path d='M0'/><circle r='1'/></g></svg>".repeat(2_000);
        assert_eq!(depth(icons), 2);
        // Tags in scripts are text.
        assert_eq!(
            depth(format!("<script>{}</script>", "<div>".repeat(900))),
            1
        );
    }

    /// Markup built to nest deep in the tree while its tags look balanced:
    /// end tags the tree builder ignores (a `</div>` outside the table it
    /// is in, a `</span>` above an open `<div>`), elements that nest in
    /// themselves without end tags, and SVG whose `<title>` holds markup.
    /// The measure never reads far below the tree's real depth.
    #[test]
    fn nesting_depth_is_not_fooled_by_ignored_end_tags() {
        fn tree_depth(html: &str) -> usize {
            let doc = scraper::Html::parse_document(html);
            doc.tree
                .root()
                .descendants()
                .map(|n| n.ancestors().count())
                .max()
                .unwrap_or(0)
        }
        let n = 1_500;
        for (prefix, pattern, close) in [
            ("", "<div><table><td></div>", ""),
            ("", "<span><div></span>", ""),
            ("", "<b><div></b>x", ""),
            ("", "<rb>", ""),
            ("", "<optgroup>", ""),
            ("", "<section><li>", ""),
            ("", "<div>", "</x></y>"),
            ("", "<div></x>", ""),
            // SVG's <style> holds markup (a <div> breaks out of the SVG);
            // in SVG's <title>, and after a <div> broke out, <path/> is an
            // HTML element, and stays open.
            ("<svg><style>", "<div>", ""),
            ("<svg><title>", "<path/>", ""),
            ("<svg><div>", "<path/>", ""),
            ("<svg><g>", "<div/>", ""),
            // Found by review: a self-closed <style/> is a <style>; in a
            // <select> a <style> is ignored and its content is markup; in
            // SVG an <input> stays open; </form> closes only the form.
            ("", "<div><style/></div></style>", ""),
            ("<select><style></select>", "<div>", ""),
            ("<svg>", "<input>", ""),
            ("", "<form><div></form>", ""),
            // <xmp> holds raw text; a <span> breaks out of SVG, after
            // which </svg> is ignored.
            ("", "<div><xmp></div></xmp>", ""),
            ("", "<svg><span></svg>", ""),
        ] {
            let html = format!("{prefix}{}{}", pattern.repeat(n), close.repeat(n));
            let (measured, real) = (flat_html(&html, false).max_depth, tree_depth(&html));
            assert!(
                real > 1_000 && measured * 4 >= real,
                "{pattern}: measured {measured}, the tree nests {real}"
            );
        }
        // Ordinary sloppy pages stay well under the limit.
        let sloppy = "<div><p>Text <b>bold <i>both</b> italic</i> <span>open\n</div>".repeat(2_000);
        let measured = flat_html(&sloppy, false).max_depth;
        assert!(measured < 16, "{measured}");
    }

    /// A page nested a million levels deep (5 MB) is read from its tokens:
    /// built as a tree it would take html5ever days (its time grows with
    /// depth squared: 100,000 levels took 48 s). The reading still drops
    /// scripts and chrome and marks headings.
    #[test]
    fn a_page_nested_too_deep_for_a_tree_is_read_flat() {
        let depth = 1_000_000;
        let html = format!(
            "<html><head><title>T</title></head><body>{}<script>var secret = '<div>';</script>\
             <nav>Menu</nav><h1>Pay  bands</h1><p>Deep <b>text</b> here.</p><div hidden>gone</div>\
             <img hidden src=x><p hidden>A hidden paragraph's end is not seen: kept.\
             <div><nav>Menu 2</div>After the nav.{}",
            "<div>".repeat(depth),
            "</div>".repeat(depth)
        );
        assert!(flat_html(&html, false).max_depth > MAX_HTML_DEPTH);
        let md = html_to_markdown(&html);
        assert!(md.contains("# Pay bands\n"), "{md:.300}");
        assert!(md.contains("Deep text here."), "{md:.300}");
        // Skipping ends with the skipped element, also when its parent
        // closes it, and never starts on one whose end is not seen.
        assert!(
            md.contains("kept.") && md.contains("After the nav."),
            "{md:.300}"
        );
        for chrome in ["secret", "Menu", "gone", "T\n"] {
            assert!(!md.contains(chrome), "kept {chrome:?} in {md:.300}");
        }
        // Up to the limit the page is read as a tree, main content first.
        let shallow = html.replace(&"<div>".repeat(depth), &"<div>".repeat(MAX_HTML_DEPTH - 10));
        let shallow = shallow.replace(&"</div>".repeat(depth), "");
        assert!(flat_html(&shallow, false).max_depth <= MAX_HTML_DEPTH);
        assert_eq!(
            Some(html_to_markdown(&shallow)),
            html_tree_to_markdown(&shallow, tree_budget(shallow.len()))
        );
    }

    /// The guarantee behind the measure: a tree not built within its time
    /// budget is given up for the token reading (here a budget of zero).
    #[test]
    fn a_tree_over_its_time_budget_gives_way_to_the_token_reading() {
        let html = "<main><h1>Leave</h1><p>Ask HR.</p></main><footer>f</footer>".repeat(2_000);
        assert_eq!(
            html_tree_to_markdown(&html, std::time::Duration::ZERO),
            None
        );
        let tree = html_tree_to_markdown(&html, tree_budget(html.len())).unwrap();
        assert!(tree.starts_with("# Leave\n\nAsk HR."), "{tree:.100}");
        let flat = normalise_whitespace(&flat_html(&html, true).text);
        assert!(
            flat.contains("# Leave\n\nAsk HR.") && !flat.contains('f'),
            "{flat:.100}"
        );
    }

    fn body(path: &str, bytes: &[u8]) -> String {
        let sections = parse(Path::new(path), bytes).unwrap();
        sections.iter().map(|s| s.body.as_str()).collect()
    }

    /// `n` base64 characters of pseudo-random bytes, as an encoder gives.
    fn base64_of_noise(n: usize) -> String {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ALPHABET[(x % 64) as usize] as char
            })
            .collect()
    }

    /// Encoded data (a screenshot pasted as a `data:` URI, a PEM
    /// certificate, a base64 blob in a page) is left out of every format;
    /// the prose around it stays, and text without any is not touched.
    #[test]
    fn encoded_data_is_left_out_and_the_prose_kept() {
        let blob = base64_of_noise(200_000);
        let md = format!(
            "# Guide\n\nTake a screenshot of the window.\n\n\
             ![the dialog](data:image/png;base64,{blob}==)\n\nThen describe it.\n"
        );
        let got = body("guide.md", md.as_bytes());
        assert!(got.contains("Take a screenshot of the window."), "{got}");
        assert!(got.contains("![the dialog]()"), "{got}");
        assert!(got.contains("Then describe it."), "{got}");
        assert!(got.len() < 200, "{} bytes kept", got.len());

        let pem: Vec<String> = (0..12).map(|i| base64_of_noise(64 + i)).collect();
        let txt = format!(
            "Install the CA first:\r\n-----BEGIN CERTIFICATE-----\r\n{}\r\n\
             -----END CERTIFICATE-----\r\nThen restart the proxy.\r\n",
            pem.join("\r\n")
        );
        let got = body("runbook.txt", txt.as_bytes());
        assert_eq!(
            got,
            "Install the CA first:\r\n-----BEGIN CERTIFICATE-----\r\n\
             -----END CERTIFICATE-----\r\nThen restart the proxy.\r\n"
        );

        let html =
            format!("<p>Visitors park on level two.</p><p>{blob}</p><p>Bikes go in the rack.</p>");
        let got = body("parking.html", html.as_bytes());
        assert!(
            got.contains("level two") && got.contains("the rack"),
            "{got}"
        );
        assert!(got.len() < 100, "{} bytes kept", got.len());

        // Kept as they are: prose, a long path of words (no digits), two
        // lines of base64 (not a block), a run short of the limit, and
        // letters or punctuation alone (a setext underline).
        let words = "docs/".repeat(70);
        let two = format!("{}\n{}", base64_of_noise(64), base64_of_noise(64));
        let short = base64_of_noise(200);
        let rule = "=".repeat(80);
        for text in [
            "Plain prose, with a URL: https://example.com/a/b?c=1.",
            words.as_str(),
            two.as_str(),
            short.as_str(),
            &format!("Title\n{rule}\n{rule}\n{rule}"),
        ] {
            assert!(
                matches!(without_encoded_data(text), std::borrow::Cow::Borrowed(t) if t == text),
                "{text}"
            );
        }
    }

    #[test]
    fn text_in_other_encodings_is_decoded() {
        // UTF-16 with a byte-order mark (Notepad's "Unicode"), both orders.
        let text = "Le parking ferme à minuit. 駐車場は深夜に閉まります。";
        let mut le = vec![0xff, 0xfe];
        let mut be = vec![0xfe, 0xff];
        for unit in text.encode_utf16() {
            le.extend(unit.to_le_bytes());
            be.extend(unit.to_be_bytes());
        }
        assert_eq!(body("a.txt", &le), text);
        assert_eq!(body("a.txt", &be), text);
        // Without a mark, from its NUL bytes, when the text is mostly in
        // the first 256 code points.
        let plain = "Bicycles go in the basement rack; café on the 2nd floor.";
        let le: Vec<u8> = plain.encode_utf16().flat_map(u16::to_le_bytes).collect();
        let be: Vec<u8> = plain.encode_utf16().flat_map(u16::to_be_bytes).collect();
        assert_eq!(body("a.md", &le), plain);
        assert_eq!(body("a.md", &be), plain);
        assert_eq!(unmarked_utf16(b"a\0"), None, "too short to tell");
        // Chinese, Japanese and Korean without a mark: few NULs (line
        // breaks, spaces, digits), all on one side. The same texts in
        // legacy encodings have none, and are not taken for UTF-16.
        for cjk in [
            "停车场午夜关闭。\n请在晚上十一点前取车，2 号门除外。\n",
            "駐車場は深夜に閉まります。\n23 時までに車を出してください。\n",
            "주차장은 자정에 닫습니다.\n오후 11시 전에 차를 빼 주세요.\n",
            // NULs on both sides: '一' and the ideographic space have theirs
            // in the low byte.
            "　一月一日停车场关闭。\n一号门一直开放。\n",
        ] {
            let le: Vec<u8> = cjk.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let be: Vec<u8> = cjk.encode_utf16().flat_map(u16::to_be_bytes).collect();
            assert_eq!(decode_text(&le, Format::Text).unwrap(), cjk);
            assert_eq!(decode_text(&be, Format::Text).unwrap(), cjk);
            for legacy in [
                encoding_rs::GBK,
                encoding_rs::SHIFT_JIS,
                encoding_rs::EUC_KR,
            ] {
                let (bytes, _, lossy) = legacy.encode(cjk);
                if !lossy {
                    assert_eq!(unmarked_utf16(&bytes), None, "{cjk} in {}", legacy.name());
                }
            }
        }
        // ASCII with a few stray NULs is not UTF-16 (read so, it would be
        // CJK ideographs).
        let stray = [
            &b"Bicycles go in the basement rack, "[..],
            b"\0\0",
            b"caf\xc3\xa9 on the 2nd floor.",
        ]
        .concat();
        assert_eq!(unmarked_utf16(&stray), None);
        // Binary data with NULs on one side does not read as text.
        let binary: Vec<u8> = (0..4096u32)
            .flat_map(|i| {
                [
                    (i * 37 % 251) as u8,
                    0,
                    (i * 91 % 253) as u8 | 1,
                    (i % 7) as u8,
                ]
            })
            .collect();
        assert_eq!(unmarked_utf16(&binary), None);
        // UTF-8 with a mark: the mark is no text.
        assert_eq!(body("a.txt", b"\xef\xbb\xbfhello"), "hello");
        // UTF-8 with a few bad bytes stays UTF-8: a stray byte, a file
        // cut mid-character.
        let long = "Привет, мир. ".repeat(20);
        let stray = [long.as_bytes(), b"\xff", long.as_bytes()].concat();
        assert_eq!(body("a.txt", &stray), format!("{long}\u{fffd}{long}"));
        let whole = format!("{long}мир");
        let cut = &whole.as_bytes()[..whole.len() - 1];
        assert_eq!(body("a.log", cut), format!("{long}ми\u{fffd}"));
        // A UTF-16 file cut to an odd length keeps its text.
        let mut odd = vec![0xff, 0xfe];
        odd.extend(long.encode_utf16().flat_map(u16::to_le_bytes));
        odd.push(b'x');
        assert_eq!(body("a.txt", &odd), format!("{long}\u{fffd}"));
        // Behind a mark, binary data is still binary.
        let e = parse(Path::new("a.txt"), b"\xef\xbb\xbf\x01\x02\x03\0\0\0\x04x").unwrap_err();
        assert!(
            matches!(&e, ParseError::Unsupported(r) if r.starts_with("binary content")),
            "{e:?}"
        );

        // No mark, not UTF-8: a legacy encoding, guessed from the bytes.
        let guessed = [
            (
                encoding_rs::WINDOWS_1252,
                "Les congés payés: cinq semaines par an, café crème offert à la cantine.",
            ),
            (
                encoding_rs::SHIFT_JIS,
                "有給休暇は年に二十日です。申請は人事部のポータルから行ってください。",
            ),
            (
                encoding_rs::WINDOWS_1251,
                "Отпуск по уходу за ребёнком оформляется через портал отдела кадров.",
            ),
        ];
        for (encoding, text) in guessed {
            let (bytes, _, unmappable) = encoding.encode(text);
            assert!(!unmappable && std::str::from_utf8(&bytes).is_err());
            assert_eq!(body("a.md", &bytes), text, "{}", encoding.name());
        }

        // HTML: the page's declared charset, over any guess (here a wrong
        // one, to tell them apart), in either form of <meta>, past other
        // tags' charsets and a "charset" that sets none.
        let (cyrillic, _, _) =
            encoding_rs::WINDOWS_1251.encode("Отпуск оформляется через портал отдела кадров.");
        let as_koi8 = encoding_rs::KOI8_R.decode_without_bom_handling(&cyrillic).0;
        for head in [
            &b"<meta charset=\"koi8-r\">"[..],
            b"<script charset=utf-8 src=a.js></script><META HTTP-EQUIV='Content-Type' \
              CONTENT='text/html; charset=KOI8-R'>",
            b"<meta name=charset-note content=x><meta charset = 'koi8-r'>",
        ] {
            let page = [head, b"<p>", &cyrillic, b"</p>"].concat();
            assert_eq!(body("a.html", &page).trim(), as_koi8, "{:?}", head);
        }
        assert_ne!(
            body("a.html", &[b"<p>", &cyrillic[..], b"</p>"].concat()).trim(),
            as_koi8
        );
        assert_eq!(
            declared_charset(b"<meta charset = 'Shift_JIS'>"),
            Some(encoding_rs::SHIFT_JIS)
        );
        assert_eq!(
            declared_charset(b"<meta charset=utf-16>"),
            Some(encoding_rs::UTF_8),
            "a page cannot declare UTF-16 without a mark"
        );
        assert_eq!(declared_charset(b"<meta charset=klingon>"), None);
        assert_eq!(declared_charset(b"<p>no declaration</p>"), None);
    }

    #[test]
    fn binary_and_unknown_files_are_unsupported_and_bad_pdfs_malformed() {
        let p = Path::new("a.txt");
        assert!(matches!(
            parse(p, b"ab\0cd"),
            Err(ParseError::Unsupported(_))
        ));
        // A UTF-16 byte-order mark before an odd byte.
        assert!(matches!(
            parse(p, &[0xff, 0xfe, 0x41]),
            Err(ParseError::Unsupported(_))
        ));
        // Binary data with no NUL byte, not UTF-8: control characters
        // whatever the encoding.
        let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 255 + 1) as u8).collect();
        let e = parse(p, &noise).unwrap_err();
        assert!(
            matches!(&e, ParseError::Unsupported(r) if r.starts_with("binary content")),
            "{e:?}"
        );
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
