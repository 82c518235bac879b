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
use burn::tensor::{Int, Tensor, TensorData};
use serde::Deserialize;
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

struct Layer<B: Backend> {
    query: Linear<B>,
    key: Linear<B>,
    value: Linear<B>,
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
                query: w.linear(&format!("{p}.attention.self.query"), h, h, device)?,
                key: w.linear(&format!("{p}.attention.self.key"), h, h, device)?,
                value: w.linear(&format!("{p}.attention.self.value"), h, h, device)?,
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

    /// Last hidden state, [batch, seq, hidden].
    fn encode(&self, b: &Batch) -> Tensor<B, 3> {
        let (n, s, h) = (b.batch, b.seq, self.cfg.hidden_size);
        let heads = self.cfg.num_attention_heads;
        let d = h / heads;
        let dev = &self.device;
        let ids: Tensor<B, 2, Int> = Tensor::from_data(TensorData::new(b.ids.clone(), [n, s]), dev);
        let types: Tensor<B, 2, Int> =
            Tensor::from_data(TensorData::new(b.type_ids.clone(), [n, s]), dev);
        let positions: Tensor<B, 2, Int> =
            Tensor::<B, 1, Int>::arange(0..s as i64, dev).reshape([1, s]);
        let x = self.word.forward(ids)
            + self.token_type.forward(types)
            + self.position.forward(positions);
        let mut x = self.emb_norm.forward(x);
        // Additive mask, [n, 1, 1, s]: 0 where attended, -10000 at padding
        // (exp(-10000) is 0 in f32, and the value stays finite in f16).
        let add_mask: Vec<f32> = b.mask.iter().map(|m| (1.0 - m) * -10000.0).collect();
        let add_mask: Tensor<B, 4> =
            Tensor::from_data(TensorData::new(add_mask, [n, 1, 1, s]), dev);
        let scale = 1.0 / (d as f64).sqrt();
        for l in &self.layers {
            let split = |t: Tensor<B, 3>| t.reshape([n, s, heads, d]).swap_dims(1, 2);
            let q = split(l.query.forward(x.clone()));
            let k = split(l.key.forward(x.clone()));
            let v = split(l.value.forward(x.clone()));
            let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale) + add_mask.clone();
            let ctx = softmax(scores, 3)
                .matmul(v)
                .swap_dims(1, 2)
                .reshape([n, s, h]);
            let x1 = l.attn_norm.forward(l.attn_out.forward(ctx) + x);
            let ff = l.ffn_out.forward(gelu(l.ffn_in.forward(x1.clone())));
            x = l.ffn_norm.forward(ff + x1);
        }
        x
    }

    /// Sentence embeddings: mean over attended tokens, L2-normalised.
    pub fn embed(&self, b: &Batch) -> Vec<Vec<f32>> {
        let (n, s, h) = (b.batch, b.seq, self.cfg.hidden_size);
        let x = self.encode(b);
        let mask: Tensor<B, 3> =
            Tensor::from_data(TensorData::new(b.mask.clone(), [n, s, 1]), &self.device);
        let summed = (x * mask.clone()).sum_dim(1).reshape([n, h]);
        let counts = mask.sum_dim(1).reshape([n, 1]).clamp_min(1e-9);
        let mean = summed / counts;
        let norm = mean
            .clone()
            .powi_scalar(2)
            .sum_dim(1)
            .sqrt()
            .clamp_min(1e-12);
        let out = (mean / norm).into_data().convert::<f32>();
        let flat: Vec<f32> = out.iter::<f32>().collect();
        flat.chunks(h).map(<[f32]>::to_vec).collect()
    }

    /// Cross-encoder logits of label 0, one per row.
    pub fn classify(&self, b: &Batch) -> anyhow::Result<Vec<f32>> {
        let Some((pooler, classifier)) = &self.head else {
            bail!("this model was loaded without a classification head");
        };
        let (n, h) = (b.batch, self.cfg.hidden_size);
        let x = self.encode(b);
        let cls = x.slice([0..n, 0..1]).reshape([n, h]);
        let pooled = pooler.forward(cls).tanh();
        let logits = classifier.forward(pooled);
        let labels = self.cfg.labels();
        let data = logits.into_data().convert::<f32>();
        let flat: Vec<f32> = data.iter::<f32>().collect();
        Ok(flat.chunks(labels).map(|row| row[0]).collect())
    }
}
