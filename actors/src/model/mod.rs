//! Models: the burn BERT shared by the Embedder and the Reranker, with the
//! tokenizer and dynamic batching by token budget.

pub mod bert;

use anyhow::Context;
use bert::{Batch, Bert};
use std::path::{Path, PathBuf};
use tokenizers::{Encoding, Tokenizer, TruncationParams, TruncationStrategy};

/// How texts are grouped into forward passes. A batch is padded to its
/// longest member, so texts are sorted by length first and a batch is cut when
/// `rows × longest` would pass `max_tokens`: short texts go many at a time,
/// long ones few, and little compute is spent on padding.
#[derive(Clone, Debug)]
pub struct BatchPolicy {
    pub max_tokens: usize,
    pub max_batch: usize,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy {
            max_tokens: 8192,
            max_batch: 128,
        }
    }
}

impl BatchPolicy {
    /// Splits lengths (already sorted) into consecutive batches.
    pub fn cut(&self, sorted_lengths: &[usize]) -> Vec<std::ops::Range<usize>> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < sorted_lengths.len() {
            let mut end = start + 1;
            let mut longest = sorted_lengths[start];
            while end < sorted_lengths.len() && end - start < self.max_batch {
                let l = longest.max(sorted_lengths[end]);
                if (end - start + 1) * l > self.max_tokens {
                    break;
                }
                longest = l;
                end += 1;
            }
            out.push(start..end);
            start = end;
        }
        out
    }
}

/// Which backend runs the model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    Cpu,
    Cuda,
}

/// Reads the sentence-transformers max_seq_length when the folder has one.
fn max_seq_length(dir: &Path, fallback: usize) -> usize {
    let path = dir.join("sentence_bert_config.json");
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v.get("max_seq_length")?.as_u64())
        .map(|n| n as usize)
        .unwrap_or(fallback)
}

pub fn load_tokenizer(dir: &Path, max_len: usize) -> anyhow::Result<Tokenizer> {
    let path = dir.join("tokenizer.json");
    let mut tok = Tokenizer::from_file(&path)
        .map_err(|e| anyhow::anyhow!("loading {}: {e}", path.display()))?;
    // Saved tokenizers often carry a fixed padding and a shorter truncation
    // from training; we pad per batch and truncate at the model's length.
    tok.with_padding(None);
    tok.with_truncation(Some(TruncationParams {
        max_length: max_len,
        strategy: TruncationStrategy::LongestFirst,
        ..Default::default()
    }))
    .map_err(|e| anyhow::anyhow!("tokenizer truncation: {e}"))?;
    Ok(tok)
}

fn pad(encodings: &[&Encoding]) -> Batch {
    let seq = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
    let n = encodings.len();
    let mut b = Batch {
        ids: vec![0; n * seq],
        type_ids: vec![0; n * seq],
        mask: vec![0.0; n * seq],
        batch: n,
        seq,
    };
    for (r, e) in encodings.iter().enumerate() {
        for (c, ((id, ty), m)) in e
            .get_ids()
            .iter()
            .zip(e.get_type_ids())
            .zip(e.get_attention_mask())
            .enumerate()
        {
            b.ids[r * seq + c] = *id as i64;
            b.type_ids[r * seq + c] = *ty as i64;
            b.mask[r * seq + c] = *m as f32;
        }
    }
    b
}

/// Runs `f` over `encodings` in length-sorted batches and returns the
/// results in input order.
fn batched<T: Clone>(
    encodings: &[Encoding],
    policy: &BatchPolicy,
    mut f: impl FnMut(&Batch) -> anyhow::Result<Vec<T>>,
) -> anyhow::Result<Vec<T>> {
    let mut order: Vec<usize> = (0..encodings.len()).collect();
    order.sort_by_key(|&i| encodings[i].len());
    let lengths: Vec<usize> = order.iter().map(|&i| encodings[i].len()).collect();
    let mut out: Vec<Option<T>> = vec![None; encodings.len()];
    for range in policy.cut(&lengths) {
        let members: Vec<&Encoding> = order[range.clone()]
            .iter()
            .map(|&i| &encodings[i])
            .collect();
        let results = f(&pad(&members))?;
        for (slot, r) in order[range].iter().zip(results) {
            out[*slot] = Some(r);
        }
    }
    Ok(out
        .into_iter()
        .map(|r| r.expect("every row computed"))
        .collect())
}

/// A sentence encoder (all-MiniLM-L6-v2 and friends).
pub struct Encoder<B: Backend> {
    model: Bert<B>,
    tokenizer: Tokenizer,
    policy: BatchPolicy,
    dir: PathBuf,
}

impl<B: Backend> Encoder<B> {
    pub fn load(dir: &Path, policy: BatchPolicy, device: &B::Device) -> anyhow::Result<Self> {
        let model = Bert::load(dir, false, device)
            .with_context(|| format!("loading embedding model from {}", dir.display()))?;
        let max_len = max_seq_length(dir, model.config().max_position_embeddings)
            .min(model.config().max_position_embeddings);
        let tokenizer = load_tokenizer(dir, max_len)?;
        Ok(Encoder {
            model,
            tokenizer,
            policy,
            dir: dir.to_path_buf(),
        })
    }

    pub fn dim(&self) -> usize {
        self.model.hidden_size()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        if texts.is_empty() {
            return Ok(vec![]);
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        batched(&encodings, &self.policy, |b| Ok(self.model.embed(b)))
    }

    /// Tokens each text takes (special tokens included, after truncation).
    pub fn token_counts(&self, texts: &[&str]) -> anyhow::Result<Vec<usize>> {
        let enc = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        Ok(enc.iter().map(Encoding::len).collect())
    }
}

/// A BERT cross-encoder scoring (query, passage) pairs.
pub struct CrossEncoder<B: Backend> {
    model: Bert<B>,
    tokenizer: Tokenizer,
    policy: BatchPolicy,
}

impl<B: Backend> CrossEncoder<B> {
    pub fn load(dir: &Path, policy: BatchPolicy, device: &B::Device) -> anyhow::Result<Self> {
        let model = Bert::load(dir, true, device)
            .with_context(|| format!("loading cross-encoder from {}", dir.display()))?;
        let max_len = model.config().max_position_embeddings.min(512);
        let tokenizer = load_tokenizer(dir, max_len)?;
        Ok(CrossEncoder {
            model,
            tokenizer,
            policy,
        })
    }

    pub fn score(&self, query: &str, passages: &[&str]) -> anyhow::Result<Vec<f32>> {
        if passages.is_empty() {
            return Ok(vec![]);
        }
        let pairs: Vec<tokenizers::EncodeInput> = passages
            .iter()
            .map(|p| (query.to_string(), p.to_string()).into())
            .collect();
        let encodings = self
            .tokenizer
            .encode_batch(pairs, true)
            .map_err(|e| anyhow::anyhow!("tokenizing: {e}"))?;
        batched(&encodings, &self.policy, |b| self.model.classify(b))
    }
}

/// The CPU backend: burn's flex (see BENCHMARKS.md for the choice).
pub type Cpu = burn::backend::Flex;

/// The backend trait the model code is generic over (for benches and tools
/// outside this crate that pick a backend).
pub use burn::tensor::backend::Backend;

/// burn ndarray on the system OpenBLAS: measured against flex in the
/// embedding benchmark (see BENCHMARKS.md), not used by the daemon.
#[cfg(feature = "ndarray")]
pub type NdArrayBlas = burn::backend::NdArray<f32>;

#[cfg(feature = "cuda")]
pub type Gpu = burn::backend::Cuda<f32, i32>;

/// An embedder on whichever backend the node was configured with.
pub enum AnyEncoder {
    Cpu(Encoder<Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(Encoder<Gpu>),
}

impl AnyEncoder {
    pub fn load(dir: &Path, policy: BatchPolicy, device: Device) -> anyhow::Result<Self> {
        match device {
            Device::Cpu => Ok(AnyEncoder::Cpu(Encoder::load(
                dir,
                policy,
                &Default::default(),
            )?)),
            #[cfg(feature = "cuda")]
            Device::Cuda => Ok(AnyEncoder::Cuda(Encoder::load(
                dir,
                policy,
                &Default::default(),
            )?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => {
                anyhow::bail!("device = \"cuda\" needs a ragd built with --features cuda")
            }
        }
    }
    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        match self {
            AnyEncoder::Cpu(e) => e.embed(texts),
            #[cfg(feature = "cuda")]
            AnyEncoder::Cuda(e) => e.embed(texts),
        }
    }
    pub fn dim(&self) -> usize {
        match self {
            AnyEncoder::Cpu(e) => e.dim(),
            #[cfg(feature = "cuda")]
            AnyEncoder::Cuda(e) => e.dim(),
        }
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        match self {
            AnyEncoder::Cpu(e) => e.tokenizer(),
            #[cfg(feature = "cuda")]
            AnyEncoder::Cuda(e) => e.tokenizer(),
        }
    }
}

pub enum AnyCrossEncoder {
    Cpu(CrossEncoder<Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(CrossEncoder<Gpu>),
}

impl AnyCrossEncoder {
    pub fn load(dir: &Path, policy: BatchPolicy, device: Device) -> anyhow::Result<Self> {
        match device {
            Device::Cpu => Ok(AnyCrossEncoder::Cpu(CrossEncoder::load(
                dir,
                policy,
                &Default::default(),
            )?)),
            #[cfg(feature = "cuda")]
            Device::Cuda => Ok(AnyCrossEncoder::Cuda(CrossEncoder::load(
                dir,
                policy,
                &Default::default(),
            )?)),
            #[cfg(not(feature = "cuda"))]
            Device::Cuda => {
                anyhow::bail!("device = \"cuda\" needs a ragd built with --features cuda")
            }
        }
    }
    pub fn score(&self, query: &str, passages: &[&str]) -> anyhow::Result<Vec<f32>> {
        match self {
            AnyCrossEncoder::Cpu(e) => e.score(query, passages),
            #[cfg(feature = "cuda")]
            AnyCrossEncoder::Cuda(e) => e.score(query, passages),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_respect_the_token_budget_and_size() {
        let p = BatchPolicy {
            max_tokens: 100,
            max_batch: 3,
        };
        let cuts = p.cut(&[10, 10, 10, 10, 40, 60, 200]);
        assert_eq!(cuts, vec![0..3, 3..5, 5..6, 6..7]);
        // A single text longer than the budget still gets its own batch.
        assert_eq!(p.cut(&[500]), vec![0..1]);
    }
}
