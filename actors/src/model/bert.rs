//! A BERT encoder on burn, loaded from a Hugging Face folder.
//!
//! The same code serves the sentence embedder (mean pooling over the
//! attention mask, L2-normalised, as sentence-transformers does) and the
//! cross-encoder (`BertForSequenceClassification`: [CLS] → pooler dense + tanh
//! → classifier), so parity with one checks most of the other.

use anyhow::{bail, Context};
use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::{gelu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use rayon::prelude::*;
use serde::Deserialize;
use std::any::TypeId;
use std::collections::HashMap;
use std::path::Path;

#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub id2label: Option<HashMap<String, String>>,
    #[serde(default)]
    pub num_labels: Option<usize>,
}

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

impl BertConfig {
    pub fn load(dir: &Path) -> anyhow::Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading model config {}", path.display()))?;
        let cfg: BertConfig = serde_json::from_str(&text)
            .with_context(|| format!("parsing model config {}", path.display()))?;
        if cfg.hidden_act != "gelu" {
            bail!(
                "{}: hidden_act {:?} is not supported (only exact \"gelu\")",
                path.display(),
                cfg.hidden_act
            );
        }
        if cfg.num_attention_heads == 0 || !cfg.hidden_size.is_multiple_of(cfg.num_attention_heads)
        {
            bail!(
                "{}: hidden_size must be a multiple of num_attention_heads",
                path.display()
            );
        }
        Ok(cfg)
    }

    pub fn labels(&self) -> usize {
        self.num_labels
            .or_else(|| self.id2label.as_ref().map(|m| m.len()))
            .unwrap_or(1)
    }
}

/// The safetensors file as f32 arrays, with both key layouts accepted
/// (`bert.encoder…` as saved by `BertFor*` heads, `encoder…` by `BertModel`).
struct Weights {
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

impl Weights {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .with_context(|| format!("parsing {}", path.display()))?;
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let data = view.data();
            let values: Vec<f32> = match view.dtype() {
                safetensors::Dtype::F32 => data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect(),
                safetensors::Dtype::F16 => data
                    .chunks_exact(2)
                    .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                safetensors::Dtype::BF16 => data
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                    .collect(),
                // Integer buffers (position_ids) are not weights.
                _ => continue,
            };
            tensors.insert(name, (view.shape().to_vec(), values));
        }
        Ok(Weights { tensors })
    }

    fn take(&mut self, name: &str) -> anyhow::Result<(Vec<usize>, Vec<f32>)> {
        self.tensors
            .remove(name)
            .or_else(|| self.tensors.remove(&format!("bert.{name}")))
            .with_context(|| format!("weight {name:?} missing from model.safetensors"))
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name) || self.tensors.contains_key(&format!("bert.{name}"))
    }

    fn tensor<B: Backend, const D: usize>(
        &mut self,
        name: &str,
        shape: [usize; D],
        device: &B::Device,
    ) -> anyhow::Result<Tensor<B, D>> {
        let (got, values) = self.take(name)?;
        if got != shape {
            bail!("weight {name:?} has shape {got:?}, config says {shape:?}");
        }
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    /// HF stores Linear weights as [out, in]; burn's Linear wants [in, out].
    fn linear<B: Backend>(
        &mut self,
        name: &str,
        d_in: usize,
        d_out: usize,
        device: &B::Device,
    ) -> anyhow::Result<Linear<B>> {
        let (shape, w) = self.take(&format!("{name}.weight"))?;
        if shape != [d_out, d_in] {
            bail!("weight {name}.weight has shape {shape:?}, expected [{d_out}, {d_in}]");
        }
        let mut t = vec![0f32; w.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                t[i * d_out + o] = w[o * d_in + i];
            }
        }
        let weight = Tensor::from_data(TensorData::new(t, [d_in, d_out]), device);
        let bias = self.tensor::<B, 1>(&format!("{name}.bias"), [d_out], device)?;
        Ok(Linear {
            weight: Param::from_tensor(weight),
            bias: Some(Param::from_tensor(bias)),
        })
    }

    fn layer_norm<B: Backend>(
        &mut self,
        name: &str,
        d: usize,
        eps: f64,
        device: &B::Device,
    ) -> anyhow::Result<LayerNorm<B>> {
        let mut ln = LayerNormConfig::new(d).with_epsilon(eps).init::<B>(device);
        ln.gamma = Param::from_tensor(self.tensor(&format!("{name}.weight"), [d], device)?);
        ln.beta = Some(Param::from_tensor(self.tensor(
            &format!("{name}.bias"),
            [d],
            device,
        )?));
        Ok(ln)
    }

    fn embedding<B: Backend>(
        &mut self,
        name: &str,
        n: usize,
        d: usize,
        device: &B::Device,
    ) -> anyhow::Result<Embedding<B>> {
        let (shape, w) = self.take(&format!("{name}.weight"))?;
        if shape.len() != 2 || shape[1] != d || shape[0] < n.min(1) {
            bail!("embedding {name} has shape {shape:?}, expected [_, {d}]");
        }
        let rows = shape[0];
        Ok(Embedding {
            weight: Param::from_tensor(Tensor::from_data(TensorData::new(w, [rows, d]), device)),
        })
    }
}

/// One linear layer computing several side by side (outputs concatenated).
fn concat_linear<B: Backend, const N: usize>(parts: [Linear<B>; N]) -> Linear<B> {
    let (weights, biases): (Vec<_>, Vec<_>) = parts
        .into_iter()
        .map(|l| {
            let bias = l.bias.expect("BERT linears have a bias").val();
            (l.weight.val(), bias)
        })
        .unzip();
    Linear {
        weight: Param::from_tensor(Tensor::cat(weights, 1)),
        bias: Some(Param::from_tensor(Tensor::cat(biases, 0))),
    }
}

/// burn's CPU backend, flex: some of its kernels run on one thread, which
/// the functions below work around.
fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<burn::backend::Flex>()
}

/// The additive attention bias over keys, [n, 1, s, s]: 0 where attended,
/// -10000 at padding (exp(-10000) is 0 in f32, and the value stays finite
/// in f16). None when nothing is padded, as at batch 1.
fn attention_bias<B: Backend>(b: &Batch, dev: &B::Device) -> Option<Tensor<B, 4>> {
    if b.mask.iter().all(|m| *m != 0.0) {
        return None;
    }
    let (n, s) = (b.batch, b.seq);
    let mut bias = Vec::with_capacity(n * s * s);
    for row in b.mask.chunks(s) {
        for _ in 0..s {
            bias.extend(row.iter().map(|m| (1.0 - m) * -10000.0));
        }
    }
    Some(Tensor::from_data(TensorData::new(bias, [n, 1, s, s]), dev))
}

/// The padding mask over keys as booleans, [n, heads, s, s], true where a
/// key is padding. burn's CUDA backend runs its flash-attention kernels
/// only for a boolean mask; an additive bias sends it to the unfused
/// matmul-softmax-matmul path. None when nothing is padded.
fn attention_mask<B: Backend>(
    b: &Batch,
    heads: usize,
    dev: &B::Device,
) -> Option<Tensor<B, 4, Bool>> {
    if b.mask.iter().all(|m| *m != 0.0) {
        return None;
    }
    let (n, s) = (b.batch, b.seq);
    let mut mask = Vec::with_capacity(n * heads * s * s);
    for row in b.mask.chunks(s) {
        for _ in 0..heads * s {
            mask.extend(row.iter().map(|m| *m == 0.0));
        }
    }
    Some(Tensor::from_data(
        TensorData::new(mask, [n, heads, s, s]),
        dev,
    ))
}

/// Whether a GPU backend passes padding as a boolean mask (flash attention)
/// rather than an additive bias: `RAGD_GPU_ATTENTION=flash`. Off by default
/// until it is measured faster and at parity on a GPU (BENCHMARKS.md).
fn gpu_flash_attention() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("RAGD_GPU_ATTENTION").is_ok_and(|v| v == "flash"))
}

/// softmax(q·kᵀ/√d + bias)·v over [n, heads, s, d], keys under `mask`
/// ignored.
///
/// Long texts use burn's fused attention: on flex it never builds the
/// [n, heads, s, s] scores tensor (54 MB per layer for 32 chunks), but it
/// runs on one thread and first copies q, k and v to contiguous memory, so
/// there the heads are split across rayon's threads. For short texts those
/// copies outweigh the scores, and plain matmuls on the strided views win.
fn self_attention<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    bias: Option<Tensor<B, 4>>,
    mask: Option<Tensor<B, 4, Bool>>,
) -> Tensor<B, 4> {
    let opts = AttentionModuleOptions::default();
    let [_, heads, s, d] = q.dims();
    if !is_flex::<B>() {
        return attention(q, k, v, mask, bias, opts);
    }
    if s < 64 {
        let scores = q
            .matmul(k.swap_dims(2, 3))
            .mul_scalar(1.0 / (d as f64).sqrt());
        let scores = match bias {
            Some(b) => scores + b,
            None => scores,
        };
        return softmax(scores, 3).matmul(v);
    }
    let parts = rayon::current_num_threads().min(heads);
    if parts <= 1 {
        return attention(q, k, v, None, bias, opts);
    }
    let outs: Vec<Tensor<B, 4>> = (0..parts)
        .into_par_iter()
        .map(|i| {
            let (start, end) = (i * heads / parts, (i + 1) * heads / parts);
            let part = |t: &Tensor<B, 4>| t.clone().narrow(1, start, end - start);
            attention(part(&q), part(&k), part(&v), None, bias.clone(), opts)
        })
        .collect();
    Tensor::cat(outs, 1)
}

/// GELU with the exact erf, as BERT defines it. On flex, burn's gelu runs
/// libm's scalar erff on one thread (a tenth of a chunk batch's time), so
/// there it is computed on the host over rayon's threads instead.
fn gelu_exact<B: Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    if !is_flex::<B>() {
        return gelu(x);
    }
    let dev = x.device();
    let mut data = x.into_data();
    let done = match data.as_mut_slice::<f32>() {
        Ok(v) => {
            v.par_chunks_mut(16 * 1024)
                .for_each(|c| c.iter_mut().for_each(|e| *e = gelu_f32(*e)));
            true
        }
        Err(_) => false,
    };
    let x = Tensor::from_data(data, &dev);
    if done {
        x
    } else {
        gelu(x) // not f32: leave it to burn
    }
}

/// 0.5·x·(1 + erf(x/√2)), erf by Abramowitz & Stegun 7.1.26 (absolute error
/// under 1.5e-7). Branch-free and without libm calls, so the loop over a
/// slice vectorises, unlike libm's erff (branches, two exps in the tails).
fn gelu_f32(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let a = z.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let erf_abs = 1.0 - poly * exp_non_positive(-a * a);
    let erf = erf_abs.copysign(z);
    0.5 * x * (1.0 + erf)
}

/// e^x for x ≤ 0 (relative error ~2e-7; x is clamped at -87, where e^x is
/// ~1e-38, nothing to GELU): x = k·ln2 + r with
/// |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial, 2^k built in the
/// exponent bits. Plain arithmetic, so the compiler vectorises it.
fn exp_non_positive(x: f32) -> f32 {
    let x = x.max(-87.0);
    // Round to nearest by truncating x·log2(e) - 0.5 (it is negative).
    let k = (x * std::f32::consts::LOG2_E - 0.5) as i32;
    let kf = k as f32;
    let r = x - kf * 0.693_145_75 - kf * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    p * f32::from_bits(((k + 127) as u32) << 23)
}

struct Layer<B: Backend> {
    /// Query, key and value side by side ([h, 3h]): one GEMM instead of three.
    qkv: Linear<B>,
    attn_out: Linear<B>,
    attn_norm: LayerNorm<B>,
    ffn_in: Linear<B>,
    ffn_out: Linear<B>,
    ffn_norm: LayerNorm<B>,
}

pub struct Bert<B: Backend> {
    cfg: BertConfig,
    word: Embedding<B>,
    position: Embedding<B>,
    token_type: Embedding<B>,
    emb_norm: LayerNorm<B>,
    layers: Vec<Layer<B>>,
    /// `BertForSequenceClassification` heads: pooler (dense + tanh) and
    /// classifier. Absent for sentence encoders.
    head: Option<(Linear<B>, Linear<B>)>,
    device: B::Device,
}

/// A padded batch: token ids, token type ids and the attention mask, all
/// [batch, seq] row-major.
pub struct Batch {
    pub ids: Vec<i64>,
    pub type_ids: Vec<i64>,
    pub mask: Vec<f32>,
    pub batch: usize,
    pub seq: usize,
}

impl<B: Backend> Bert<B> {
    /// Loads `config.json` and `model.safetensors` from `dir`. With
    /// `classifier`, also the pooler and classification head.
    pub fn load(dir: &Path, classifier: bool, device: &B::Device) -> anyhow::Result<Self> {
        let cfg = BertConfig::load(dir)?;
        let mut w = Weights::load(&dir.join("model.safetensors"))?;
        let (h, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        let word = w.embedding("embeddings.word_embeddings", 1, h, device)?;
        let position = w.embedding(
            "embeddings.position_embeddings",
            cfg.max_position_embeddings,
            h,
            device,
        )?;
        let token_type = w.embedding("embeddings.token_type_embeddings", 1, h, device)?;
        let emb_norm = w.layer_norm("embeddings.LayerNorm", h, eps, device)?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let ff = cfg.intermediate_size;
            layers.push(Layer {
                qkv: concat_linear([
                    w.linear(&format!("{p}.attention.self.query"), h, h, device)?,
                    w.linear(&format!("{p}.attention.self.key"), h, h, device)?,
                    w.linear(&format!("{p}.attention.self.value"), h, h, device)?,
                ]),
                attn_out: w.linear(&format!("{p}.attention.output.dense"), h, h, device)?,
                attn_norm: w.layer_norm(
                    &format!("{p}.attention.output.LayerNorm"),
                    h,
                    eps,
                    device,
                )?,
                ffn_in: w.linear(&format!("{p}.intermediate.dense"), h, ff, device)?,
                ffn_out: w.linear(&format!("{p}.output.dense"), ff, h, device)?,
                ffn_norm: w.layer_norm(&format!("{p}.output.LayerNorm"), h, eps, device)?,
            });
        }
        let head = if classifier {
            if !w.has("classifier.weight") {
                bail!(
                    "{} has no classifier weights: not a BertForSequenceClassification model",
                    dir.display()
                );
            }
            let pooler = w.linear("pooler.dense", h, h, device)?;
            let labels = cfg.labels();
            // `classifier.` sits beside `bert.`, never under it.
            let classifier = w.linear("classifier", h, labels, device)?;
            Some((pooler, classifier))
        } else {
            None
        };
        Ok(Bert {
            cfg,
            word,
            position,
            token_type,
            emb_norm,
            layers,
            head,
            device: device.clone(),
        })
    }

    pub fn config(&self) -> &BertConfig {
        &self.cfg
    }

    pub fn hidden_size(&self) -> usize {
        self.cfg.hidden_size
    }

    /// Whether batches should be padded to a few recurring shapes, and the
    /// longest length allowed. burn's CUDA backend compiles (NVRTC) and
    /// autotunes kernels per shape: on an H200, one run with a new shape per
    /// batch spent minutes compiling (BENCHMARKS.md). flex runs any shape
    /// as is, and padding would only cost it compute.
    pub fn shape_bucket(&self) -> Option<usize> {
        (!is_flex::<B>()).then_some(self.cfg.max_position_embeddings)
    }

    /// Last hidden state, [batch * seq, hidden]: row `r * seq + t` is token
    /// `t` of text `r`. The hidden state stays 2-D on purpose: burn's default
    /// linear turns a [n, s, h] input into n small GEMMs, one per text, while
    /// [n * s, h] is one large GEMM that the backend can thread and block
    /// well; layer norm, residual adds and GELU then run on contiguous rows.
    fn encode(&self, b: &Batch) -> Tensor<B, 2> {
        let (n, s, h) = (b.batch, b.seq, self.cfg.hidden_size);
        let heads = self.cfg.num_attention_heads;
        let d = h / heads;
        let dev = &self.device;
        let ids: Tensor<B, 2, Int> = Tensor::from_data(TensorData::new(b.ids.clone(), [n, s]), dev);
        let types: Tensor<B, 2, Int> =
            Tensor::from_data(TensorData::new(b.type_ids.clone(), [n, s]), dev);
        // Positions as [n, s], not a broadcast [1, s]: the three embeddings
        // then add as same-shape contiguous tensors (flex's fast path).
        let positions: Vec<i64> = (0..n).flat_map(|_| 0..s as i64).collect();
        let positions: Tensor<B, 2, Int> =
            Tensor::from_data(TensorData::new(positions, [n, s]), dev);
        let x = self.word.forward(ids)
            + self.token_type.forward(types)
            + self.position.forward(positions);
        let mut x = self.emb_norm.forward(x.reshape([n * s, h]));
        let (bias, mask) = if !is_flex::<B>() && gpu_flash_attention() {
            (None, attention_mask::<B>(b, heads, dev))
        } else {
            (attention_bias::<B>(b, dev), None)
        };
        for l in &self.layers {
            let qkv = l.qkv.forward(x.clone());
            let split = |i: usize| {
                qkv.clone()
                    .slice([0..n * s, i * h..(i + 1) * h])
                    .reshape([n, s, heads, d])
                    .swap_dims(1, 2)
            };
            let ctx = self_attention(split(0), split(1), split(2), bias.clone(), mask.clone())
                .swap_dims(1, 2)
                .reshape([n * s, h]);
            let x1 = l.attn_norm.forward(l.attn_out.forward(ctx) + x);
            let ff = l.ffn_out.forward(gelu_exact(l.ffn_in.forward(x1.clone())));
            x = l.ffn_norm.forward(ff + x1);
        }
        x
    }

    /// Sentence embeddings, [batch, hidden]: mean over attended tokens,
    /// L2-normalised. Queued, not awaited: on a GPU the result is ready once
    /// [`Bert::rows`] reads it.
    pub fn embed_launch(&self, b: &Batch) -> Tensor<B, 2> {
        let (n, s, h) = (b.batch, b.seq, self.cfg.hidden_size);
        let x = self.encode(b).reshape([n, s, h]);
        let mask: Tensor<B, 3> =
            Tensor::from_data(TensorData::new(b.mask.clone(), [n, s, 1]), &self.device);
        let summed = (x * mask.clone()).sum_dim(1).reshape([n, h]);
        // Every row has at least its [CLS] and [SEP], so neither the count
        // nor the norm is zero (and 1e-12 would be 0 in f16 anyway).
        let counts = mask.sum_dim(1).reshape([n, 1]);
        let mean = summed / counts;
        let norm = mean.clone().powi_scalar(2).sum_dim(1).sqrt();
        mean / norm
    }

    /// Waits for a [batch, k] result and copies it to the host as f32 rows.
    pub fn rows(t: Tensor<B, 2>) -> Vec<Vec<f32>> {
        let [_, k] = t.dims();
        let flat: Vec<f32> = t.into_data().convert::<f32>().iter::<f32>().collect();
        flat.chunks(k.max(1)).map(<[f32]>::to_vec).collect()
    }

    /// Cross-encoder logits, [batch, labels], queued as in
    /// [`Bert::embed_launch`].
    pub fn classify_launch(&self, b: &Batch) -> anyhow::Result<Tensor<B, 2>> {
        let Some((pooler, classifier)) = &self.head else {
            bail!("this model was loaded without a classification head");
        };
        let (n, h) = (b.batch, self.cfg.hidden_size);
        let x = self.encode(b).reshape([n, b.seq, h]);
        let cls = x.slice([0..n, 0..1]).reshape([n, h]);
        let pooled = pooler.forward(cls).tanh();
        Ok(classifier.forward(pooled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn fast_exp_matches_std_on_the_non_positive_half_line() {
        let mut worst = 0f32;
        for i in 0..=200_000 {
            let x = -(i as f32) * 4.35e-4; // 0 down to -87
            let (got, want) = (exp_non_positive(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
        }
        assert!(worst < 1e-6, "worst relative error {worst}");
    }

    #[test]
    fn host_gelu_matches_burns_exact_gelu() {
        let dev = Default::default();
        let xs: Vec<f32> = (0..40_001).map(|i| -10.0 + i as f32 * 5e-4).collect();
        let n = xs.len();
        let t = || Tensor::<Flex, 2>::from_data(TensorData::new(xs.clone(), [1, n]), &dev);
        let ours = gelu_exact(t()).into_data().to_vec::<f32>().unwrap();
        let burn = gelu(t()).into_data().to_vec::<f32>().unwrap();
        let worst = ours
            .iter()
            .zip(&burn)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-6, "worst absolute difference {worst}");
    }
}
