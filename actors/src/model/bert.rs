//! A BERT encoder on burn, loaded from a Hugging Face folder.
//!
//! The same code serves the sentence embedder (mean pooling over the
//! attention mask, L2-normalised, as sentence-transformers does) and the
//! cross-encoder (`BertForSequenceClassification`: [CLS] → pooler dense + tanh
//! → classifier), so parity with one checks most of the other.

use anyhow::{bail, Context};
use burn::module::Param;
use burn::nn::{Embedding, LayerNorm, LayerNormConfig, Linear};
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Int, Tensor, TensorData};
use serde::Deserialize;

use super::cpu;
use burn::backend::flex::FlexTensor;
use std::any::{Any, TypeId};
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

/// burn's CPU backend, flex: the model takes the packed forward pass there
/// (see [`super::cpu`]).
fn is_flex<B: Backend>() -> bool {
    TypeId::of::<B>() == TypeId::of::<burn::backend::Flex>()
}

/// The additive attention bias over keys, [n, 1, s, s]: 0 where attended,
/// -10000 at padding (exp(-10000) is 0 in f32, and the value stays finite
/// in f16). None when nothing is padded, as at batch 1.
fn attention_bias<B: Backend>(b: &Batch, dev: &B::Device) -> Option<Tensor<B, 4>> {
    if !b.needs_mask::<B>() {
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
    if !b.needs_mask::<B>() {
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

/// A tensor's values on the host, as f32: no copy on flex when the tensor
/// is not shared.
fn host<B: Backend, const D: usize>(t: Tensor<B, D>) -> TensorData {
    t.into_data().convert::<f32>()
}

/// The f32 values of host data. bytemuck's plain cast (size and alignment
/// checks) rather than `TensorData::as_slice`, whose checked cast walks every
/// element: a sixth of a chunk batch's time in a profile. Only for data made
/// f32 by [`host`] or `TensorData::new`.
fn f32s(d: &TensorData) -> &[f32] {
    bytemuck::cast_slice(&d.bytes)
}

fn vec_of<B: Backend>(t: Tensor<B, 1>) -> Vec<f32> {
    f32s(&host(t)).to_vec()
}

/// The layers' parameters for the packed CPU path, sharing the weights'
/// buffers with burn's parameters. None unless every weight is a
/// contiguous f32 flex tensor.
fn host_layers<B: Backend>(layers: &[Layer<B>]) -> Option<Vec<cpu::HostLayer>> {
    let linear = |l: &Linear<B>| {
        let prim: Box<dyn Any> = Box::new(l.weight.val().into_primitive().tensor());
        let weight = *prim.downcast::<FlexTensor>().ok()?;
        cpu::HostLinear::new(weight, vec_of(l.bias.as_ref()?.val()))
    };
    let norm = |n: &LayerNorm<B>| Some((vec_of(n.gamma.val()), vec_of(n.beta.as_ref()?.val())));
    layers
        .iter()
        .map(|l| {
            Some(cpu::HostLayer {
                qkv: linear(&l.qkv)?,
                attn_out: linear(&l.attn_out)?,
                attn_norm: norm(&l.attn_norm)?,
                ffn_in: linear(&l.ffn_in)?,
                ffn_out: linear(&l.ffn_out)?,
                ffn_norm: norm(&l.ffn_norm)?,
            })
        })
        .collect()
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
    /// flex only: the layers for the packed CPU path ([`super::cpu`]),
    /// their weights shared with the burn parameters above. None: burn ops
    /// over padded batches, the path GPU backends take.
    packed: Option<Vec<cpu::HostLayer>>,
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

impl Batch {
    /// Whether any position is padding (none at batch 1, or when every text
    /// has the same length).
    fn padded(&self) -> bool {
        self.mask.contains(&0.0)
    }

    /// Whether attention gets the padding mask. On a JIT backend always,
    /// padded or not: attention without a mask runs kernels of its own,
    /// which a rare unpadded batch (every text exactly a bucket's length)
    /// would compile and tune mid-service instead of at warm-up
    /// ([`super::Encoder::warm_up`]). flex skips it when nothing is padded.
    fn needs_mask<B: Backend>(&self) -> bool {
        !is_flex::<B>() || self.padded()
    }
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
            head,
            device: device.clone(),
            packed: if is_flex::<B>() {
                tracing::info!(gemm = %cpu::gemm_name(), "{}: packed CPU forward pass", dir.display());
                Some(host_layers(&layers).context("model weights are not contiguous f32")?)
            } else {
                None
            },
            layers,
        })
    }

    /// The same model without the packed CPU path: burn ops over padded
    /// batches, as on a GPU. For tests that compare the two on the CPU.
    #[cfg(test)]
    pub(crate) fn unpacked(mut self) -> Self {
        self.packed = None;
        self
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
            let opts = AttentionModuleOptions::default();
            let ctx = attention(
                split(0),
                split(1),
                split(2),
                mask.clone(),
                bias.clone(),
                opts,
            )
            .swap_dims(1, 2)
            .reshape([n * s, h]);
            let x1 = l.attn_norm.forward(l.attn_out.forward(ctx) + x);
            let ff = l.ffn_out.forward(gelu(l.ffn_in.forward(x1.clone())));
            x = l.ffn_norm.forward(ff + x1);
        }
        x
    }

    /// Last hidden state of the real tokens only, [total, hidden] on the
    /// host (see [`super::cpu`]): text r's tokens are rows
    /// `starts[r] .. starts[r] + lens[r]`. burn looks up and normalises the
    /// embeddings; the layers run as host kernels on the burn parameters'
    /// buffers.
    fn encode_packed(&self, b: &Batch, layers: &[cpu::HostLayer]) -> (Vec<f32>, cpu::Packing) {
        let h = self.cfg.hidden_size;
        let dev = &self.device;
        let p = cpu::Packing::from_mask(&b.mask, b.batch, b.seq);
        let t = p.total;
        let ids = p.pack(&b.ids, b.seq);
        let types = p.pack(&b.type_ids, b.seq);
        let positions: Vec<i64> = p.lens.iter().flat_map(|&l| 0..l as i64).collect();
        let int = |v: Vec<i64>| Tensor::<B, 2, Int>::from_data(TensorData::new(v, [1, t]), dev);
        let x = self.word.forward(int(ids))
            + self.token_type.forward(int(types))
            + self.position.forward(int(positions));
        let mut x = f32s(&host(self.emb_norm.forward(x).reshape([t, h]))).to_vec();
        let eps = self.cfg.layer_norm_eps as f32;
        cpu::encode_layers(&mut x, &p, layers, self.cfg.num_attention_heads, eps);
        (x, p)
    }

    /// Sentence embeddings, [batch, hidden]: mean over attended tokens,
    /// L2-normalised. Queued, not awaited: on a GPU the result is ready once
    /// [`Bert::rows`] reads it.
    pub fn embed_launch(&self, b: &Batch) -> Tensor<B, 2> {
        let (n, s, h) = (b.batch, b.seq, self.cfg.hidden_size);
        if let Some(layers) = &self.packed {
            let (x, p) = self.encode_packed(b, layers);
            let mut out = vec![0f32; n * h];
            for (r, row) in out.chunks_exact_mut(h).enumerate() {
                let (start, len) = (p.starts[r], p.lens[r].max(1));
                for tok in x[start * h..].chunks_exact(h).take(p.lens[r]) {
                    row.iter_mut().zip(tok).for_each(|(a, v)| *a += v);
                }
                row.iter_mut().for_each(|a| *a /= len as f32);
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
                row.iter_mut().for_each(|a| *a /= norm);
            }
            return Tensor::from_data(TensorData::new(out, [n, h]), &self.device);
        }
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
        let cls = if let Some(layers) = &self.packed {
            let (x, p) = self.encode_packed(b, layers);
            // A row without tokens (none comes from the tokenizer, which
            // adds [CLS] and [SEP]) scores from zeros, not a neighbour's row.
            let zeros = vec![0f32; h];
            let rows: Vec<f32> = p
                .starts
                .iter()
                .zip(&p.lens)
                .flat_map(|(&start, &len)| match len {
                    0 => zeros.iter().copied(),
                    _ => x[start * h..(start + 1) * h].iter().copied(),
                })
                .collect();
            Tensor::from_data(TensorData::new(rows, [n, h]), &self.device)
        } else {
            let x = self.encode(b).reshape([n, b.seq, h]);
            x.slice([0..n, 0..1]).reshape([n, h])
        };
        let pooled = pooler.forward(cls).tanh();
        Ok(classifier.forward(pooled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    #[test]
    fn host_gelu_matches_burns_exact_gelu() {
        let dev = Default::default();
        let xs: Vec<f32> = (0..40_000).map(|i| -10.0 + i as f32 * 5e-4).collect();
        let n = xs.len();
        let bias = vec![0.0; 100];
        let mut ours = xs.clone();
        cpu::bias_gelu(&mut ours, &bias);
        let t = Tensor::<Flex, 2>::from_data(TensorData::new(xs, [1, n]), &dev);
        let burn = gelu(t).into_data().to_vec::<f32>().unwrap();
        let worst = ours
            .iter()
            .zip(&burn)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 2e-6, "worst absolute difference {worst}");
    }
}
