//! The Chunker: parses a file and splits it by the embedding model's tokens.

pub mod actor;
pub mod parse;
pub mod pdf;

use crate::messages::Chunk;
use parse::{ParseError, Section};
use std::path::Path;
use text_splitter::{ChunkConfig, MarkdownSplitter};
use tokenizers::Tokenizer;

#[derive(Clone, Debug)]
pub struct ChunkerSettings {
    /// Target chunk size in model tokens, heading trail included.
    pub max_tokens: usize,
    /// Tokens shared by neighbouring chunks, so a sentence cut at a boundary
    /// is still found whole in one of them.
    pub overlap_tokens: usize,
    /// Where PDFs are parsed: the daemon's in a child process
    /// ([`pdf::PdfParser::isolated`]), the default in this one.
    pub pdf: pdf::PdfParser,
}

impl Default for ChunkerSettings {
    fn default() -> Self {
        ChunkerSettings {
            max_tokens: 200,
            overlap_tokens: 32,
            pdf: pdf::PdfParser::InProcess,
        }
    }
}

pub struct Chunker {
    tokenizer: Tokenizer,
    settings: ChunkerSettings,
    /// See [`Chunker::fingerprint`].
    fingerprint: String,
    /// Whether a window's one tokenisation can size any part of it
    /// ([`WordCounts`]): set for BERT-style WordPiece tokenizers.
    word_local: Option<WordLocal>,
    /// How the model's unknown token is told apart (see [`Unknown`]); None
    /// for a tokenizer without one.
    unknown: Option<Unknown>,
}

/// Bumped when a change to parsing or splitting changes the chunks of an
/// unchanged file: every document is then chunked again at the next start
/// (see [`Chunker::fingerprint`]), its unchanged texts' vectors reused.
/// Not for a change that leaves what a search finds as it was (the few
/// tokens of a `data:` URI's head that 2026-12-01 stopped keeping): that
/// would re-read every document of every index for nothing.
pub const CHUNKING_GENERATION: u32 = 1;

/// See [`Chunker::fingerprint`].
fn fingerprint(tokenizer: &Tokenizer, settings: &ChunkerSettings) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let vocabulary = tokenizer
        .to_string(false)
        .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
    let mut h = Sha256::new();
    h.update(format!(
        "generation {CHUNKING_GENERATION}, {} tokens, {} overlapping\n",
        settings.max_tokens, settings.overlap_tokens
    ));
    h.update(vocabulary.as_bytes());
    Ok(crate::hex(&h.finalize()[..8]))
}

/// The model's unknown token (WordPiece's `[UNK]`), to find the chunks made
/// of it alone.
///
/// A word WordPiece cannot spell (longer than its 100 characters: a key, a
/// hash, a base64 line; or of characters its vocabulary lacks) is one
/// `[UNK]`, so every chunk of a key dump embeds to the same vector. That
/// vector means nothing, and thousands of copies of it wreck the HNSW
/// graph of their partition: with a 19 MB key dump indexed (7,250 such
/// chunks), every search of its partition answered with key-dump chunks
/// at a score of -0.01 and never reached the travel policy that scores
/// 0.59 (the graph's neighbour selection links a copy to one other copy
/// and nothing else, so a search that enters them stays there). So a
/// chunk whose body holds no other token is not indexed.
#[derive(Clone, Debug)]
struct Unknown {
    /// The added tokens (`[UNK]`, `[MASK]`, …): matched in the text before
    /// its words are, so a text holding one is tokenised to tell.
    added: Vec<String>,
    /// A word of ASCII letters and digits up to this long is certainly
    /// spelled (the vocabulary holds every such character, alone and as a
    /// continuation), so a body with one needs no tokenising to be
    /// readable ([`has_spelled_run`]); 0 when that does not hold.
    spelled_up_to: usize,
}

/// Whether `text` has a run of ASCII letters and digits of at most `max`
/// with nothing but ASCII whitespace or punctuation (or the text's ends)
/// on either side: the BERT pre-tokenizer makes such a run a word of its
/// own (it splits at both), which WordPiece then spells. Logs, code and
/// prose have one within their first few bytes.
fn has_spelled_run(text: &[u8], max: usize) -> bool {
    let apart =
        |b: Option<&u8>| b.is_none_or(|b| b.is_ascii_whitespace() || b.is_ascii_punctuation());
    let mut i = 0;
    while i < text.len() {
        if !text[i].is_ascii_alphanumeric() {
            i += 1;
            continue;
        }
        let start = i;
        while i < text.len() && text[i].is_ascii_alphanumeric() {
            i += 1;
        }
        let before = start.checked_sub(1).map(|j| &text[j]);
        if i - start <= max && apart(before) && apart(text.get(i)) {
            return true;
        }
    }
    false
}

fn unknown(tokenizer: &Tokenizer, local: Option<WordLocal>) -> Option<Unknown> {
    let tokenizers::ModelWrapper::WordPiece(model) = tokenizer.get_model() else {
        return None;
    };
    tokenizer.token_to_id(&model.unk_token)?;
    // What WordPiece sees of a letter: lowercased first by an uncased
    // model's normalizer (local tokenizers have only that one).
    let lowercase = matches!(
        tokenizer.get_normalizer(),
        Some(tokenizers::NormalizerWrapper::BertNormalizer(n)) if n.lowercase
    );
    let every_char = (b'0'..=b'9')
        .chain(b'a'..=b'z')
        .chain(b'A'..=b'Z')
        .all(|c| {
            let c = (if lowercase { c.to_ascii_lowercase() } else { c } as char).to_string();
            tokenizer.token_to_id(&c).is_some()
                && tokenizer
                    .token_to_id(&format!("{}{c}", model.continuing_subword_prefix))
                    .is_some()
        });
    let spelled_up_to = match local {
        Some(l) if every_char && l.unknown_over != usize::MAX => l.unknown_over,
        _ => 0,
    };
    let added = tokenizer
        .get_added_tokens_decoder()
        .values()
        .map(|t| t.content.clone())
        .collect();
    Some(Unknown {
        added,
        spelled_up_to,
    })
}

impl Chunker {
    /// `tokenizer` is the embedding model's; truncation and padding are
    /// switched off so the splitter sees every token of the text.
    pub fn new(mut tokenizer: Tokenizer, settings: ChunkerSettings) -> anyhow::Result<Self> {
        tokenizer
            .with_truncation(None)
            .map_err(|e| anyhow::anyhow!("tokenizer: {e}"))?;
        tokenizer.with_padding(None);
        anyhow::ensure!(
            settings.overlap_tokens < settings.max_tokens,
            "chunk overlap ({}) must be smaller than the chunk size ({})",
            settings.overlap_tokens,
            settings.max_tokens
        );
        let word_local = word_local(&tokenizer);
        let fingerprint = fingerprint(&tokenizer, &settings)?;
        Ok(Chunker {
            fingerprint,
            unknown: unknown(&tokenizer, word_local),
            word_local,
            tokenizer,
            settings,
        })
    }

    /// Names how this chunker chunks: the chunk size and overlap, the
    /// tokenizer that counts their tokens, and [`CHUNKING_GENERATION`]. It
    /// is part of every document's version
    /// ([`crate::source_watcher::doc_version`]), so a change to any of
    /// them chunks every document again (its old chunks searchable until
    /// the new ones are in), as a user who changed `[chunker] max_tokens`
    /// expects; the texts that come out the same keep their vectors.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    pub fn chunk_file(&self, path: &Path, bytes: &[u8]) -> Result<Vec<Chunk>, ParseError> {
        let sections = parse::parse_with(path, bytes, &self.settings.pdf)?;
        let (chunks, unreadable) = self.split_counting(&sections);
        if chunks.is_empty() {
            return Err(ParseError::Unsupported(if unreadable > 0 {
                "no text the model can read: every word is unknown to its vocabulary (a key, hash or encoded dump?)".into()
            } else {
                "no text content".into()
            }));
        }
        if unreadable > 0 {
            tracing::debug!(
                file = %path.display(),
                unreadable,
                "chunks of words unknown to the model left out"
            );
        }
        Ok(chunks)
    }

    /// The chunks of `sections`, without those whose body is unknown words
    /// only (see [`Unknown`]).
    pub fn split(&self, sections: &[Section]) -> Vec<Chunk> {
        self.split_counting(sections).0
    }

    /// [`Chunker::split`], and how many chunks it left out.
    fn split_counting(&self, sections: &[Section]) -> (Vec<Chunk>, usize) {
        let mut unreadable = 0;
        let mut out = Vec::new();
        for section in sections {
            let trail = self.heading_trail(&section.headings);
            let trail_tokens = if trail.is_empty() {
                0
            } else {
                self.count_tokens(&trail) + 1
            };
            let budget = self
                .settings
                .max_tokens
                .saturating_sub(trail_tokens)
                .max(self.settings.max_tokens / 2);
            let overlap = self.settings.overlap_tokens.min(budget / 2);
            for body in self.split_body(&section.body, budget, overlap) {
                if !self.readable(body) {
                    unreadable += 1;
                    continue;
                }
                let text = if trail.is_empty() {
                    body.to_string()
                } else {
                    format!("{trail}\n{body}")
                };
                out.push(Chunk {
                    index: out.len() as u32,
                    text,
                });
            }
        }
        (out, unreadable)
    }

    /// The section's heading trail ("Handbook > Leave"), cut to half a
    /// chunk: it labels every chunk of the section, and a longer one (a
    /// paragraph or a dump marked as a heading) would crowd out the body
    /// it labels, and be copied into each of its chunks: a 200 KB heading
    /// over 19 MB of text made some 8 GB of chunks. (Not a new
    /// [`CHUNKING_GENERATION`]: documents indexed with a long trail are
    /// few, and chunked anew when they change.)
    fn heading_trail(&self, headings: &[String]) -> String {
        let mut trail = headings.join(" > ");
        let half = self.settings.max_tokens / 2;
        // Bytes first, so a huge heading is not tokenised whole: prose
        // takes 4-6 bytes a token, seldom over 16.
        let cap = half * 16;
        let mut end = trail.len();
        if end > cap {
            end = trail.floor_char_boundary(cap);
        }
        if let Ok(e) = self.tokenizer.encode(&trail[..end], false) {
            if e.len() > half {
                // Before the first word that does not fit whole: a word
                // cut inside may tokenise to more pieces than it had.
                // (One word longer than it all is cut after half.)
                let words = e.get_word_ids();
                end = match (1..=half).rev().find(|&i| words[i] != words[i - 1]) {
                    Some(i) => e.get_offsets()[i].0,
                    None => e.get_offsets()[half - 1].1,
                };
            }
        }
        trail.truncate(end);
        trail.truncate(trail.trim_end().len());
        trail
    }

    /// Whether `body` holds a token other than the unknown one. Prose has
    /// a plain word early on and is not tokenised for this.
    pub fn readable(&self, body: &str) -> bool {
        let Some(unknown) = &self.unknown else {
            return true;
        };
        if has_spelled_run(body.as_bytes(), unknown.spelled_up_to)
            && !unknown.added.iter().any(|t| body.contains(t.as_str()))
        {
            return true;
        }
        crate::model::reads_a_word(&self.tokenizer, body)
    }

    /// `body` in chunks of at most `budget` tokens. A short body that fits
    /// is one chunk, and the splitter is not asked: it tokenises several
    /// prefixes in its search for a cut, and most sections of most
    /// documents fit (BENCHMARKS.md, "Ingest at scale"). The splitter's
    /// answer is the same one chunk whenever token counts grow with the
    /// prefix, as they do for text separated by spaces and punctuation
    /// (WordPiece can count a prefix cut inside a word higher than the
    /// whole; the shortcut's chunk is then the better one).
    fn split_body<'t>(&self, body: &'t str, budget: usize, overlap: usize) -> Vec<&'t str> {
        let whole = trim_like_the_splitter(body);
        if whole.is_empty() {
            return Vec::new();
        }
        // Only short bodies are counted whole: a long one (a 20 MB text
        // file is one section) would be tokenised in full for nothing,
        // where the splitter only probes prefixes near the budget. Text
        // that fits runs ~4-6 bytes a token; past 8 it goes to the splitter,
        // which gives the same result.
        if whole.len() <= budget * 8 && self.count_tokens(whole) <= budget {
            return vec![whole];
        }
        let mut out = Vec::new();
        for window in windows(body) {
            let words = self
                .word_local
                .and_then(|local| WordCounts::new(&self.tokenizer, local, window));
            let config = ChunkConfig::new(budget)
                .with_sizer(Measure {
                    tokenizer: &self.tokenizer,
                    budget,
                    words,
                })
                .with_overlap(overlap)
                .expect("overlap < budget by construction");
            out.extend(MarkdownSplitter::new(config).chunks(window));
        }
        out
    }

    pub fn count_tokens(&self, text: &str) -> usize {
        count(&self.tokenizer, text)
    }
}

/// A body longer than this is split a window at a time, each cut at a
/// paragraph or line end (else a space) in its second half.
/// text-splitter's work per chunk grows with the text after it: a 1 MB log
/// took 18-25 s and a 19 MB one tens of minutes, where windows of this
/// size cost the same per MB whatever the length (BENCHMARKS.md,
/// "Chunking large files"). (A chunk then never spans a window's cut, as
/// it never spans a heading.)
const WINDOW_BYTES: usize = 64 << 10;

fn windows(body: &str) -> impl Iterator<Item = &str> {
    let mut rest = body;
    std::iter::from_fn(move || {
        if rest.is_empty() {
            return None;
        }
        let mut end = rest.len().min(WINDOW_BYTES);
        while !rest.is_char_boundary(end) {
            end -= 1;
        }
        let head = &rest[..end];
        let cut = if end == rest.len() {
            end
        } else {
            ["\n\n", "\n", " "]
                .iter()
                .find_map(|sep| {
                    let at = head.rfind(sep)? + sep.len();
                    (at >= end / 2).then_some(at)
                })
                .unwrap_or(end)
        };
        let (window, after) = rest.split_at(cut);
        rest = after;
        Some(window)
    })
}

/// The most bytes a chunk may hold per token of its budget. Text runs
/// 1-6 bytes a token (CJK to English), so it never binds there.
const MAX_BYTES_PER_TOKEN: usize = 16;

/// The splitter's measure of a chunk: its model tokens, and never fewer
/// than its bytes over [`MAX_BYTES_PER_TOKEN`].
///
/// Why not the tokenizer alone: WordPiece makes any "word" longer than 100
/// characters one `[UNK]` token, so a minified script, a base64 blob or a
/// log without spaces was one chunk of any size (a 19 MB line: one chunk,
/// 19 MB in the index and in every answer citing it). And the splitter
/// measures whole sections and sentences before it cuts them: a candidate
/// far over the budget is now sized by its length, without tokenising it
/// (a 19 MB line cost a gigabyte of memory to tokenise, and a 19 MB log
/// with spaces but no sentence ends took minutes: the rest of the text
/// was tokenised again for every chunk).
struct Measure<'a> {
    tokenizer: &'a Tokenizer,
    budget: usize,
    /// The window's words and their tokens, when the tokenizer allows
    /// sizing a part of the window from them.
    words: Option<WordCounts<'a>>,
}

impl text_splitter::ChunkSizer for Measure<'_> {
    fn size(&self, chunk: &str) -> usize {
        let floor = chunk.len().div_ceil(MAX_BYTES_PER_TOKEN);
        if floor > self.budget {
            return floor;
        }
        let tokens = self
            .words
            .as_ref()
            .and_then(|w| w.count(self.tokenizer, chunk))
            .unwrap_or_else(|| count(self.tokenizer, chunk));
        tokens.max(floor)
    }
}

/// `text`'s model tokens. (text-splitter's own sizer panics on text it
/// cannot tokenise; this counts such text by its bytes.)
fn count(tokenizer: &Tokenizer, text: &str) -> usize {
    tokenizer
        .encode_fast(text, false)
        .map_or(text.len(), |e| e.len())
}

/// What a word-local tokenizer ([`word_local`]) lets the sizer skip.
#[derive(Clone, Copy, Debug)]
struct WordLocal {
    /// A run of ASCII letters and digits longer than this is one token
    /// (WordPiece's `[UNK]` for a word over its `max_input_chars_per_word`);
    /// `usize::MAX` when an added token could split such a run.
    unknown_over: usize,
}

/// Whether the tokenizer splits text into words independently of their
/// neighbours: a BERT normalizer (every step maps one character), the
/// BERT pre-tokenizer (splits at whitespace and punctuation, each decided
/// by the character alone) and WordPiece (tokenises each word by itself).
/// Then a part of a text holds the tokens of the words wholly inside it,
/// plus those of the cut words' parts tokenised alone. Not so for
/// SentencePiece or byte-level BPE, whose first word is marked.
fn word_local(tokenizer: &Tokenizer) -> Option<WordLocal> {
    use tokenizers::{ModelWrapper, NormalizerWrapper, PreTokenizerWrapper};
    let ModelWrapper::WordPiece(model) = tokenizer.get_model() else {
        return None;
    };
    let local = matches!(
        tokenizer.get_normalizer(),
        None | Some(NormalizerWrapper::BertNormalizer(_))
    ) && matches!(
        tokenizer.get_pre_tokenizer(),
        Some(PreTokenizerWrapper::BertPreTokenizer(_))
    );
    // Added tokens are cut out before the words are: one made of letters
    // and digits alone could split a long run.
    let alnum_added = tokenizer
        .get_added_tokens_decoder()
        .values()
        .any(|t| t.content.bytes().all(|b| b.is_ascii_alphanumeric()));
    local.then_some(WordLocal {
        unknown_over: if alnum_added {
            usize::MAX
        } else {
            model.max_input_chars_per_word
        },
    })
}

/// The token count of any part of a window, from one tokenisation of the
/// whole window.
///
/// text-splitter sizes a chunk by measuring candidates: each section and
/// sentence, then prefixes in a binary search, then the overlap's, about
/// fifteen per chunk. Each was a tokenisation of up to a chunk of text,
/// so chunking cost about five times tokenising the text (BENCHMARKS.md,
/// "Chunking large files"). For a [`word_local`] tokenizer, a candidate's
/// count is the tokens of the words wholly inside it (a difference of
/// running sums) plus its cut words' parts tokenised alone, which is
/// exactly what tokenising the candidate gives.
///
/// A cut part of a word longer than a chunk (a hex dump, a key, an id
/// list without separators) is itself up to a chunk of text, measured
/// about fifteen times a chunk: when it is letters and digits over
/// WordPiece's word limit, it is one `[UNK]`, counted without
/// tokenising it.
struct WordCounts<'t> {
    text: &'t str,
    local: WordLocal,
    /// Each word's byte span in `text`, in order, not overlapping.
    spans: Vec<(usize, usize)>,
    /// `before[i]`: the tokens of the words before word `i`.
    before: Vec<usize>,
}

impl<'t> WordCounts<'t> {
    /// `None` if the tokenizer fails on `text` or its words' spans are not
    /// in order on character boundaries; the sizer then tokenises each
    /// candidate.
    fn new(tokenizer: &Tokenizer, local: WordLocal, text: &'t str) -> Option<Self> {
        let encoding = tokenizer.encode(text, false).ok()?;
        let mut spans: Vec<(usize, usize)> = Vec::new();
        let mut before = vec![0];
        let mut last = None;
        for (&word, &(start, end)) in encoding.get_word_ids().iter().zip(encoding.get_offsets()) {
            match spans.last_mut() {
                Some(span) if word.is_some() && word == last => {
                    span.0 = span.0.min(start);
                    span.1 = span.1.max(end);
                    *before.last_mut()? += 1;
                }
                _ => {
                    spans.push((start, end));
                    before.push(before.last()? + 1);
                }
            }
            last = word;
        }
        // (Offsets are the tokenizer's: checked, as a part is cut at them.)
        let ordered = spans
            .iter()
            .all(|&(s, e)| s <= e && text.is_char_boundary(s) && text.is_char_boundary(e))
            && spans.windows(2).all(|w| w[0].1 <= w[1].0);
        ordered.then_some(WordCounts {
            text,
            local,
            spans,
            before,
        })
    }

    /// The tokens of `part`, a slice of the window; `None` if it is not one.
    fn count(&self, tokenizer: &Tokenizer, part: &str) -> Option<usize> {
        let a = (part.as_ptr() as usize).checked_sub(self.text.as_ptr() as usize)?;
        let b = a + part.len();
        if b > self.text.len() {
            return None;
        }
        // Words [lo, hi) lie wholly inside [a, b).
        let lo = self.spans.partition_point(|&(s, _)| s < a);
        let hi = self.spans.partition_point(|&(_, e)| e <= b);
        let mut n = self.before[hi.max(lo)] - self.before[lo];
        let clip = |s: usize, e: usize| {
            let part = &self.text[s..e];
            if part.len() > self.local.unknown_over
                && part.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                1
            } else {
                count(tokenizer, part)
            }
        };
        // The word cut at `a` (and perhaps at `b` too).
        if lo > 0 && self.spans[lo - 1].1 > a {
            n += clip(a, self.spans[lo - 1].1.min(b));
        }
        // The word cut at `b`, if it starts inside the part.
        if hi >= lo && hi < self.spans.len() && self.spans[hi].0 < b {
            n += clip(self.spans[hi].0, b);
        }
        Some(n)
    }
}

/// The trim MarkdownSplitter applies to its chunks (text-splitter's
/// `Trim::PreserveIndentation`, which it does not export): leading newlines
/// and trailing whitespace go, and leading spaces too unless the text spans
/// lines (a code block's indentation is kept).
fn trim_like_the_splitter(text: &str) -> &str {
    const NEWLINES: [char; 2] = ['\n', '\r'];
    if text.trim().contains(NEWLINES) {
        text.trim_start_matches(NEWLINES).trim_end()
    } else {
        text.trim()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn chunker(max_tokens: usize) -> Chunker {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models/all-MiniLM-L6-v2/tokenizer.json");
        let tokenizer = Tokenizer::from_file(&dir).expect("run ops/fetch-models.sh first");
        Chunker::new(
            tokenizer,
            ChunkerSettings {
                max_tokens,
                overlap_tokens: 8,
                ..Default::default()
            },
        )
        .unwrap()
    }

    /// The shortcut for a body that fits gives exactly what the splitter
    /// gives, trim included, and long bodies still go to the splitter.
    #[test]
    fn a_body_that_fits_is_the_splitters_one_chunk() {
        let c = chunker(40);
        let bodies = [
            "Plain text on one line.",
            "  leading spaces and trailing newlines\n\n",
            "\n\nA paragraph.\n\nAnother paragraph.\n",
            "```\n    indented code\n    more code\n```\n",
            "  - a list item\n  - another item\n",
            "\t\n  \n",
            "",
            "The quarterly security review covers access logs, badge readers, visitor records, the incident queue, and every exception granted since the previous review was signed off.",
            // Far over: several chunks.
            &"Every office keeps its own visitor log and sends a copy to security each week. ".repeat(12),
        ];
        // Every budget from tiny to roomy, so each body is tried at the
        // edge where it just fits and just does not.
        for budget in 4..60 {
            let overlap = (budget / 2).min(8);
            for body in bodies {
                let config = ChunkConfig::new(budget)
                    .with_sizer(Measure {
                        tokenizer: &c.tokenizer,
                        budget,
                        words: None,
                    })
                    .with_overlap(overlap)
                    .unwrap();
                let expected: Vec<&str> = MarkdownSplitter::new(config).chunks(body).collect();
                assert_eq!(
                    c.split_body(body, budget, overlap),
                    expected,
                    "{body:?} in {budget} tokens"
                );
            }
        }
        let long = "Every office keeps its own visitor log. ".repeat(12);
        assert!(c.split_body(&long, 40, 8).len() > 1);
    }

    /// A heading longer than half a chunk is cut to half a chunk in every
    /// chunk it labels, and the body keeps the rest of each chunk; one
    /// within half a chunk is kept whole.
    #[test]
    fn a_heading_trail_is_cut_to_half_a_chunk() {
        let c = chunker(64);
        let huge = "Quarterly security review of badge readers ".repeat(2_000);
        let body =
            "Every office keeps its own visitor log and sends a copy to security each week.\n\n"
                .repeat(20);
        let text = format!("# Handbook\n\n## {huge}\n\n{body}");
        let chunks = c.chunk_file(Path::new("a.md"), text.as_bytes()).unwrap();
        assert!(chunks.len() > 5, "{}", chunks.len());
        for chunk in &chunks {
            let (trail, rest) = chunk.text.split_once('\n').unwrap();
            assert!(
                trail.starts_with("Handbook > Quarterly security review"),
                "{trail}"
            );
            assert!(c.count_tokens(trail) <= 32, "{trail}");
            assert!(c.count_tokens(&chunk.text) <= 64, "{}", chunk.text);
            assert!(rest.contains("visitor log"), "{rest}");
        }
        let short = vec!["Handbook".to_string(), "Parental leave".to_string()];
        assert_eq!(c.heading_trail(&short), "Handbook > Parental leave");
        // Cut on a character's boundary, whatever the script.
        let kana = vec!["東京オフィスの規程".repeat(500)];
        let cut = c.heading_trail(&kana);
        assert!(
            cut.starts_with("東京") && c.count_tokens(&cut) <= 32,
            "{cut}"
        );
    }

    /// Text that tries the word model: punctuation, accents composed and
    /// combining, CJK, kana glued to Latin, emoji, control characters,
    /// the tokenizer's own special tokens typed in, a word too long for
    /// WordPiece (one `[UNK]`), CRLF, tabs, numbers and URLs.
    const MIXED: &str = "The café's naïve re\u{301}sume\u{301}: 3.14% of Q4-2026 (see https://intra.example/hr?id=7&x=y). \
        東京オフィスの規程は毎年見直されます。aカb漢c\tΣίσυφος Привет, мир! \
        emoji 👩‍💻 and 🇫🇷 flags; ctrl\u{7}bell\u{0}nul [MASK] [UNK]x[CLS] \
        supercalifragilisticexpialidocious-supercalifragilisticexpialidocious-\
        Pneumonoultramicroscopicsilicovolcanoconiosisxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\r\n\
        don't won’t «quoted» — dash… ellipsis\n\n## Heading\n- item one\n- item two\n";

    /// Any part of a window counts what tokenising that part gives.
    #[test]
    fn a_part_of_a_window_counts_as_its_own_tokenisation() {
        let c = chunker(200);
        let local = c.word_local.expect("MiniLM's tokenizer is BERT WordPiece");
        assert_eq!(local.unknown_over, 100);
        let text = MIXED.repeat(3);
        let words = WordCounts::new(&c.tokenizer, local, &text).expect("ordered words");
        let bounds: Vec<usize> = (0..=text.len())
            .filter(|&i| text.is_char_boundary(i))
            .collect();
        let mut rng = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            (rng % n as u64) as usize
        };
        // Every start with every end up to 24 characters on, then random
        // parts of any length.
        let mut pairs: Vec<(usize, usize)> = (0..bounds.len())
            .flat_map(|i| (i..bounds.len().min(i + 24)).map(move |j| (i, j)))
            .collect();
        pairs.extend((0..20_000).map(|_| {
            let (i, j) = (next(bounds.len()), next(bounds.len()));
            (i.min(j), i.max(j))
        }));
        for (i, j) in pairs {
            let part = &text[bounds[i]..bounds[j]];
            assert_eq!(
                words.count(&c.tokenizer, part),
                Some(count(&c.tokenizer, part)),
                "{part:?}"
            );
        }
        // Not a slice of the window: the sizer tokenises it instead.
        assert_eq!(words.count(&c.tokenizer, "elsewhere"), None);

        // Parts from every start around a run of letters and digits longer
        // than WordPiece's word limit (counted as one `[UNK]` without
        // tokenising): short ones, ones just under and over the limit, and
        // the rest of the text.
        let text = format!("an id: {} and {}x.", hex(300), hex(101));
        let words = WordCounts::new(&c.tokenizer, local, &text).unwrap();
        for i in 0..text.len() {
            let ends = (i..i + 4).chain(i + 96..i + 106).chain([text.len()]);
            for j in ends.filter(|&j| j <= text.len()) {
                let part = &text[i..j];
                assert_eq!(
                    words.count(&c.tokenizer, part),
                    Some(count(&c.tokenizer, part)),
                    "{part:?}"
                );
            }
        }
    }

    /// `n` letters and digits, mixed case, without a separator.
    fn hex(n: usize) -> String {
        (0..n)
            .map(|i| b"0123456789abcdefABCDEFxyz"[i * 7 % 25] as char)
            .collect()
    }

    /// Chunks sized from the window's words are the chunks sized by
    /// tokenising every candidate, over several windows of mixed text.
    #[test]
    fn chunks_from_word_counts_are_the_tokenised_ones() {
        let c = chunker(60);
        let body = MIXED.repeat(400) + &hex(20_000) + "\n" + MIXED;
        assert!(body.len() > 2 * WINDOW_BYTES);
        let mut direct = Chunker::new(c.tokenizer.clone(), c.settings.clone()).unwrap();
        direct.word_local = None;
        for (budget, overlap) in [(60, 8), (17, 4), (200, 32)] {
            let fast = c.split_body(&body, budget, overlap);
            assert!(fast.len() > 10);
            assert_eq!(fast, direct.split_body(&body, budget, overlap), "{budget}");
        }
    }

    /// A huge body: a log without sentence ends, a minified line without
    /// spaces (one `[UNK]` for WordPiece). Every chunk keeps to the budget
    /// in tokens and in bytes, no text is lost, and windows cut at line
    /// ends.
    #[test]
    fn huge_bodies_are_cut_to_size_and_lose_nothing() {
        let c = chunker(200);
        let log: String = (0..6_000)
            .map(|i| {
                format!(
                    "2026-11-30T10:{:02}:{:02} worker={i} state=ok queue=17 latency=3ms\n",
                    i / 60 % 60,
                    i % 60
                )
            })
            .collect();
        assert!(log.len() > 3 * WINDOW_BYTES);
        let chunks = c.split(&[Section {
            headings: vec![],
            body: log.clone(),
        }]);
        for ch in &chunks {
            assert!(c.count_tokens(&ch.text) <= 200, "{}", ch.text);
            assert!(ch.text.len() <= 200 * MAX_BYTES_PER_TOKEN);
        }
        for i in 0..6_000 {
            let line = format!("worker={i} ");
            assert!(
                chunks.iter().any(|ch| ch.text.contains(&line)),
                "{line} lost"
            );
        }
        let w: Vec<&str> = windows(&log).collect();
        assert_eq!(w.concat(), log);
        assert!(
            w.len() > 3
                && w.iter()
                    .all(|w| w.ends_with('\n') && w.len() <= WINDOW_BYTES)
        );

        let blob: String = (0..200_000u32)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        assert_eq!(c.count_tokens(&blob), 1, "WordPiece: one [UNK]");
        // Cut to size (the pieces, all `[UNK]`, are then left out: see
        // chunks_of_unknown_words_only_are_left_out).
        let pieces = c.split_body(&blob, 200, 8);
        assert!(pieces.len() >= blob.len() / (200 * MAX_BYTES_PER_TOKEN));
        assert!(pieces.iter().all(|p| p.len() <= 200 * MAX_BYTES_PER_TOKEN));
        let mut covered = 0;
        for p in &pieces {
            assert!(blob.contains(p));
            covered += p.len();
        }
        assert!(
            covered >= blob.len(),
            "text lost: {covered} of {}",
            blob.len()
        );
    }

    /// A chunk whose body is unknown words only (a key dump: one `[UNK]`
    /// each) is left out; a file of nothing else is skipped with the
    /// reason; the text around such a run is kept.
    #[test]
    fn chunks_of_unknown_words_only_are_left_out() {
        let c = chunker(200);
        let unk = c.unknown.clone().expect("WordPiece has [UNK]");
        assert_eq!(
            unk.spelled_up_to, 100,
            "every letter and digit is in the vocabulary"
        );
        // Words of 101 to 255 characters: hashes (SHA-512 in lowercase hex
        // is 128), each one `[UNK]`. (Longer runs, and blocks of lines in
        // both cases, are encoded data, left out when parsed: see
        // parse::without_encoded_data.)
        let hashes: Vec<String> = (0..300)
            .map(|i| hex(101 + i % 150).to_lowercase())
            .collect();
        let dumps = [
            (hashes.join("\n"), "no text the model can read"),
            (
                format!("{}\n{}\n", hex(30_000), hex(20_000)),
                "only encoded data",
            ),
        ];
        for (keys, why) in dumps {
            match c.chunk_file(Path::new("keys.txt"), keys.as_bytes()) {
                Err(ParseError::Unsupported(reason)) => assert!(reason.contains(why), "{reason}"),
                other => panic!("expected a skip, got {other:?}"),
            }
        }
        let mixed = format!(
            "# Expenses\n\nSubmit receipts within thirty days.\n\n{}\n\nManagers approve reports weekly.\n",
            hex(40_000)
        );
        let sections = parse::markdown_sections(&mixed);
        let (chunks, left_out) = c.split_counting(&sections);
        assert!(left_out >= 10, "{left_out}");
        let all: String = chunks.iter().map(|ch| ch.text.as_str()).collect();
        assert!(
            all.contains("Submit receipts") && all.contains("Managers approve"),
            "{all}"
        );
        for ch in &chunks {
            let body = ch.text.trim_start_matches("Expenses\n");
            assert!(c.readable(body), "{:?}", ch.text);
        }
        assert_eq!(
            chunks.iter().map(|ch| ch.index).collect::<Vec<_>>(),
            (0..chunks.len() as u32).collect::<Vec<_>>(),
            "indexes stay consecutive"
        );
        // Characters the vocabulary lacks are unknown too; CJK it has.
        assert!(!c.readable("😀 😀\n🙃"));
        assert!(c.readable("東京オフィス"));
    }

    /// `readable` is what tokenising says, with or without its shortcut.
    #[test]
    fn readable_is_what_tokenising_says() {
        let c = chunker(200);
        let tokenised = |t: &str| crate::model::reads_a_word(&c.tokenizer, t);
        let text: Vec<char> = format!(
            "{MIXED} {} 😀 ✓ {} worker=3 job=a-{}x\u{7}{} é{}, ({})",
            hex(150),
            hex(100),
            hex(99),
            hex(60),
            hex(40),
            hex(101)
        )
        .chars()
        .collect();
        for i in 0..text.len() {
            for j in [i + 1, i + 2, i + 5, i + 40, i + 120, text.len()] {
                let part: String = text[i..j.min(text.len())].iter().collect();
                if part.trim().is_empty() {
                    continue;
                }
                assert_eq!(c.readable(&part), tokenised(&part), "{part:?}");
            }
        }
    }
}
