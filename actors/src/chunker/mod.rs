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
            let config = ChunkConfig::new(budget)
                .with_sizer(&self.tokenizer)
                .with_overlap(overlap)
                .expect("overlap < budget by construction");
            let splitter = MarkdownSplitter::new(config);
            for body in splitter.chunks(&section.body) {
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

    pub fn count_tokens(&self, text: &str) -> usize {
        self.tokenizer
            .encode_fast(text, false)
            .map(|e| e.len())
            .unwrap_or(text.len())
    }
}
