//! The Chunker: parses a file and splits it by the embedding model's tokens.

pub mod actor;
pub mod parse;

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
}

impl Default for ChunkerSettings {
    fn default() -> Self {
        ChunkerSettings {
            max_tokens: 200,
            overlap_tokens: 32,
        }
    }
}

pub struct Chunker {
    tokenizer: Tokenizer,
    settings: ChunkerSettings,
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
        Ok(Chunker {
            tokenizer,
            settings,
        })
    }

    pub fn chunk_file(&self, path: &Path, bytes: &[u8]) -> Result<Vec<Chunk>, ParseError> {
        let sections = parse::parse(path, bytes)?;
        let chunks = self.split(&sections);
        if chunks.is_empty() {
            return Err(ParseError::Unsupported("no text content".into()));
        }
        Ok(chunks)
    }

    pub fn split(&self, sections: &[Section]) -> Vec<Chunk> {
        let mut out = Vec::new();
        for section in sections {
            let trail = section.headings.join(" > ");
            let trail_tokens = if trail.is_empty() {
                0
            } else {
                self.count_tokens(&trail) + 1
            };
            // A heading trail longer than half a chunk is cut rather than
            // allowed to crowd out the body it labels.
            let budget = self
                .settings
                .max_tokens
                .saturating_sub(trail_tokens)
                .max(self.settings.max_tokens / 2);
            let overlap = self.settings.overlap_tokens.min(budget / 2);
            for body in self.split_body(&section.body, budget, overlap) {
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
        out
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
        let config = ChunkConfig::new(budget)
            .with_sizer(&self.tokenizer)
            .with_overlap(overlap)
            .expect("overlap < budget by construction");
        MarkdownSplitter::new(config).chunks(body).collect()
    }

    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.len())
            .unwrap_or(text.len())
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
mod tests {
    use super::*;

    fn chunker(max_tokens: usize) -> Chunker {
        let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../models/all-MiniLM-L6-v2/tokenizer.json");
        let tokenizer = Tokenizer::from_file(&dir).expect("run ops/fetch-models.sh first");
        Chunker::new(
            tokenizer,
            ChunkerSettings {
                max_tokens,
                overlap_tokens: 8,
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
                    .with_sizer(&c.tokenizer)
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
}
