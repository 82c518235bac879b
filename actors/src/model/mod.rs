//! Models: the burn BERT shared by the Embedder and the Reranker, with the
//! tokenizer and dynamic batching by token budget.

pub mod bert;
mod cpu;

/// Which library runs the CPU backend's GEMMs (OpenBLAS or the gemm
/// crate), for logs and benchmark labels.
pub use cpu::{gemm_name, name_model_threads};

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

/// Which backend runs the model, and in which float type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// burn flex, f32.
    Cpu,
    /// burn-cuda, f32: the reference precision.
    Cuda,
    /// burn-cuda, f16 weights and activations (f16 tensor cores); parity
    /// with f32 is tested (cosine ≥ 0.999, see BENCHMARKS.md).
    #[serde(rename = "cuda-f16")]
    CudaF16,
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda),
            "cuda-f16" => Ok(Device::CudaF16),
            other => Err(format!("unknown device {other:?} (cpu, cuda or cuda-f16)")),
        }
    }
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

/// Names the model in `dir` by its files' contents (config, tokenizer,
/// weights and the sentence-transformers settings, where present): two
/// folders holding the same model get the same name, whatever their paths.
/// A cache shared by several nodes keys on it, so that vectors from
/// another model are never compared with this one's.
pub fn fingerprint(dir: &Path) -> anyhow::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let files = [
        "config.json",
        "tokenizer.json",
        "model.safetensors",
        "sentence_bert_config.json",
    ];
    for name in files {
        let path = dir.join(name);
        let mut file = match std::fs::File::open(&path) {
            Ok(f) => f,
            // Only the settings file is optional; without one of the
            // others the model does not load in the first place.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                h.update(format!("{name}: none\n"));
                continue;
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        h.update(format!("{name}: {}\n", file.metadata()?.len()));
        std::io::copy(&mut file, &mut h).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(crate::hex(&h.finalize()[..8]))
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

/// Pads a batch to its longest member. With `bucket` (a JIT-compiling GPU
/// backend, see [`Bert::shape_bucket`]) the length is also rounded up to a
/// multiple of 32 (at most `bucket`) and the rows to a power of two, so a
/// handful of shapes recur instead of one per length; the extra rows attend
/// to one padding token and are dropped, the extra columns are masked.
fn pad(encodings: &[&Encoding], bucket: Option<usize>) -> Batch {
    let longest = encodings.iter().map(|e| e.len()).max().unwrap_or(1).max(1);
    let (n, seq) = padded_shape(encodings.len(), longest, bucket);
    let mut b = Batch {
        ids: vec![0; n * seq],
        type_ids: vec![0; n * seq],
        mask: vec![0.0; n * seq],
        batch: n,
        seq,
    };
    for r in encodings.len()..n {
        b.mask[r * seq] = 1.0;
    }
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

/// The (rows, length) a batch of `rows` texts, the longest `longest`
/// tokens, is padded to (see [`pad`]).
fn padded_shape(rows: usize, longest: usize, bucket: Option<usize>) -> (usize, usize) {
    match bucket {
        Some(cap) => (
            rows.next_power_of_two(),
            longest.next_multiple_of(32).min(cap.max(longest)),
        ),
        None => (rows, longest),
    }
}

impl BatchPolicy {
    /// Every padded shape, (rows, length), that [`batched`] can give a
    /// bucketing backend (cap `bucket`) for texts of at most `max_len`
    /// tokens. A length bucket holds the lengths that round up to it, and a
    /// row count `r` (a power of two) takes at least `r / 2 + 1` texts, so
    /// the shape occurs when that many texts of the bucket's shortest length
    /// fit the policy.
    pub fn bucket_shapes(&self, max_len: usize, bucket: usize) -> Vec<(usize, usize)> {
        let mut shortest: Vec<(usize, usize)> = Vec::new(); // (length, shortest text)
        for len in 1..=max_len.max(1) {
            let (_, seq) = padded_shape(1, len, Some(bucket));
            if shortest.last().is_none_or(|&(s, _)| s != seq) {
                shortest.push((seq, len));
            }
        }
        let mut shapes = Vec::new();
        for (seq, len) in shortest {
            let mut rows = 1;
            while rows <= self.max_batch.max(1).next_power_of_two() {
                let texts = if rows == 1 { 1 } else { rows / 2 + 1 };
                if texts <= self.max_batch && (texts == 1 || texts * len <= self.max_tokens) {
                    shapes.push((rows, seq));
                }
                rows *= 2;
            }
        }
        shapes
    }
}

/// Runs one forward pass of every shape in [`BatchPolicy::bucket_shapes`],
/// so that a JIT backend compiles and tunes every kernel the model will
/// need now (kept in the kernel cache, see [`use_kernel_cache`]) rather than
/// on the first query or batch of each shape. Returns the number of shapes,
/// 0 on a backend that does not bucket (flex runs any shape as is).
fn warm_up<P, T>(
    policy: &BatchPolicy,
    tokenizer: &Tokenizer,
    bucket: Option<usize>,
    mut launch: impl FnMut(&Batch) -> anyhow::Result<P>,
    mut read: impl FnMut(P) -> anyhow::Result<Vec<T>>,
) -> anyhow::Result<usize> {
    let Some(cap) = bucket else {
        return Ok(0);
    };
    let max_len = tokenizer.get_truncation().map_or(cap, |t| t.max_length);
    let shapes = policy.bucket_shapes(max_len.min(cap), cap);
    let started = std::time::Instant::now();
    for &(n, seq) in &shapes {
        // One real token a row: every row padded, as nearly all batches
        // are. Kernels depend on shapes, not on values.
        let mut mask = vec![0.0; n * seq];
        for r in 0..n {
            mask[r * seq] = 1.0;
        }
        let b = Batch {
            ids: vec![0; n * seq],
            type_ids: vec![0; n * seq],
            mask,
            batch: n,
            seq,
        };
        read(launch(&b)?)?;
        tracing::debug!(rows = n, length = seq, "warmed up");
    }
    tracing::info!(
        shapes = shapes.len(),
        secs = started.elapsed().as_secs_f32(),
        "GPU kernels warmed up for every batch shape"
    );
    Ok(shapes.len())
}

/// Runs the model over `encodings` in length-sorted batches and returns the
/// results in input order.
///
/// `launch` queues a batch's forward pass and `read` waits for its result.
/// One batch stays queued ahead of the one being read: on a GPU, whose
/// kernels run asynchronously, the device works on batch k+1 while the host
/// copies batch k's result back and pads the next one. On the CPU backend
/// `launch` does the work itself and the order changes nothing.
fn batched<P, T: Clone>(
    encodings: &[Encoding],
    policy: &BatchPolicy,
    bucket: Option<usize>,
    mut launch: impl FnMut(&Batch) -> anyhow::Result<P>,
    mut read: impl FnMut(P) -> anyhow::Result<Vec<T>>,
) -> anyhow::Result<Vec<T>> {
    let mut order: Vec<usize> = (0..encodings.len()).collect();
    order.sort_by_key(|&i| encodings[i].len());
    let lengths: Vec<usize> = order.iter().map(|&i| encodings[i].len()).collect();
    let mut out: Vec<Option<T>> = vec![None; encodings.len()];
    let mut store = |range: std::ops::Range<usize>, results: Vec<T>| {
        for (slot, r) in order[range].iter().zip(results) {
            out[*slot] = Some(r);
        }
    };
    let mut queued: Option<(std::ops::Range<usize>, P)> = None;
    for range in policy.cut(&lengths) {
        let members: Vec<&Encoding> = order[range.clone()]
            .iter()
            .map(|&i| &encodings[i])
            .collect();
        // Padding rows, if any, come last: `store` zips them away.
        let pass = launch(&pad(&members, bucket))?;
        if let Some((done, p)) = queued.replace((range, pass)) {
            store(done, read(p)?);
        }
    }
    if let Some((done, p)) = queued {
        store(done, read(p)?);
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
        batched(
            &encodings,
            &self.policy,
            self.model.shape_bucket(),
            |b| Ok(self.model.embed_launch(b)),
            |t| Ok(Bert::rows(t)),
        )
    }

    /// Compiles and tunes the kernels of every batch shape now, on a JIT
    /// backend (see [`warm_up`]); the number of shapes run.
    pub fn warm_up(&self) -> anyhow::Result<usize> {
        warm_up(
            &self.policy,
            &self.tokenizer,
            self.model.shape_bucket(),
            |b| Ok(self.model.embed_launch(b)),
            |t| Ok(Bert::rows(t)),
        )
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

    /// As [`Encoder::warm_up`].
    pub fn warm_up(&self) -> anyhow::Result<usize> {
        warm_up(
            &self.policy,
            &self.tokenizer,
            self.model.shape_bucket(),
            |b| self.model.classify_launch(b),
            |t| Ok(Bert::rows(t)),
        )
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
        batched(
            &encodings,
            &self.policy,
            self.model.shape_bucket(),
            |b| self.model.classify_launch(b),
            |t| Ok(Bert::rows(t).into_iter().map(|row| row[0]).collect()),
        )
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

#[cfg(feature = "cuda")]
pub type GpuF16 = burn::backend::Cuda<half::f16, i32>;

/// burn-wgpu on Vulkan, f32 and f16: the cubecl JIT path of burn-cuda on any
/// Vulkan device, Mesa's CPU rasteriser included (parity tests only).
#[cfg(feature = "vulkan")]
pub type Vulkan = burn::backend::Vulkan<f32, i32>;

#[cfg(feature = "vulkan")]
pub type VulkanF16 = burn::backend::Vulkan<half::f16, i32>;

/// Whether this machine can run burn-cuda, as a clear error: without the
/// NVIDIA driver, NVRTC or a GPU, cubecl panics on its device thread and the
/// load dies with a RecvError.
#[cfg(feature = "cuda")]
fn cuda_ready() -> anyhow::Result<()> {
    use cudarc::driver::result as driver;
    // SAFETY: each only tries to dlopen the library by its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        anyhow::bail!(
            "device \"cuda\": no NVIDIA driver (libcuda.so) found; run on a GPU node, or set [model] device = \"cpu\""
        );
    }
    if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        anyhow::bail!(
            "device \"cuda\": NVRTC (libnvrtc.so) not found; ragd compiles its GPU kernels at run time: install CUDA's NVRTC or add its folder to LD_LIBRARY_PATH"
        );
    }
    driver::init()
        .map_err(|e| anyhow::anyhow!("device \"cuda\": the NVIDIA driver did not start: {e}"))?;
    match driver::device::get_count() {
        Ok(n) if n > 0 => Ok(()),
        Ok(_) => anyhow::bail!("device \"cuda\": the NVIDIA driver sees no GPU"),
        Err(e) => anyhow::bail!("device \"cuda\": counting GPUs: {e}"),
    }
}

#[cfg(not(feature = "cuda"))]
fn no_cuda<T>() -> anyhow::Result<T> {
    anyhow::bail!("device \"cuda\" and \"cuda-f16\" need a ragd built with --features cuda")
}

/// Keeps what a GPU backend compiles and tunes in `dir`: its kernels
/// (PTX from NVRTC on CUDA) and its autotune picks. A restarted GPU node
/// then loads them instead of compiling and benchmarking candidate kernels
/// again, which on a cold H200 took minutes (BENCHMARKS.md). Without it
/// cubecl tunes into a `target/` folder it finds from the working directory
/// (or the user's cache folder) and compiles on every start.
///
/// cubecl reads its configuration once per process, so this must run before
/// the first GPU model loads; a later call changes nothing and says so in
/// the log. The `cubecl.toml` of the working directory and the `CUBECL_*`
/// variables still apply; only the cache locations are set here. The
/// kernels are keyed by their code, not by the GPU: empty the folder when a
/// node moves to another GPU model. Does nothing in a build without a GPU
/// backend.
pub fn use_kernel_cache(dir: &Path) -> anyhow::Result<()> {
    #[cfg(any(feature = "cuda", feature = "vulkan"))]
    {
        use cubecl_runtime::config::{cache::CacheConfig, CubeClRuntimeConfig, RuntimeConfig};
        let mut state = CubeClRuntimeConfig::storage().lock();
        if state.is_some() {
            tracing::warn!(
                dir = %dir.display(),
                "GPU kernel cache not moved: the GPU backend has already read its configuration"
            );
            return Ok(());
        }
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the GPU kernel cache {}", dir.display()))?;
        let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
        config.compilation.cache = Some(CacheConfig::File(dir.to_path_buf()));
        config.autotune.cache = CacheConfig::File(dir.to_path_buf());
        *state = Some(std::sync::Arc::new(config));
    }
    #[cfg(not(any(feature = "cuda", feature = "vulkan")))]
    let _ = dir;
    Ok(())
}

/// Dispatches a method call on an `Any*` model to the backend it holds.
macro_rules! on_backend {
    ($self:ident, $ty:ident, $m:ident => $e:expr) => {
        match $self {
            $ty::Cpu($m) => $e,
            #[cfg(feature = "cuda")]
            $ty::Cuda($m) => $e,
            #[cfg(feature = "cuda")]
            $ty::CudaF16($m) => $e,
        }
    };
}

/// Loads a model generic over the backend onto the one `device` names.
macro_rules! load_on {
    ($ty:ident, $model:ident, $device:expr, $dir:expr, $policy:expr) => {
        match $device {
            Device::Cpu => Ok($ty::Cpu($model::load($dir, $policy, &Default::default())?)),
            #[cfg(feature = "cuda")]
            Device::Cuda => {
                cuda_ready()?;
                Ok($ty::Cuda($model::load($dir, $policy, &Default::default())?))
            }
            #[cfg(feature = "cuda")]
            Device::CudaF16 => {
                cuda_ready()?;
                Ok($ty::CudaF16($model::load(
                    $dir,
                    $policy,
                    &Default::default(),
                )?))
            }
            #[cfg(not(feature = "cuda"))]
            Device::Cuda | Device::CudaF16 => no_cuda(),
        }
    };
}

/// An embedder on whichever backend the node was configured with.
pub enum AnyEncoder {
    Cpu(Encoder<Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(Encoder<Gpu>),
    #[cfg(feature = "cuda")]
    CudaF16(Encoder<GpuF16>),
}

impl AnyEncoder {
    pub fn load(dir: &Path, policy: BatchPolicy, device: Device) -> anyhow::Result<Self> {
        load_on!(AnyEncoder, Encoder, device, dir, policy)
    }
    pub fn embed(&self, texts: &[&str]) -> anyhow::Result<Vec<Vec<f32>>> {
        on_backend!(self, AnyEncoder, e => e.embed(texts))
    }
    pub fn warm_up(&self) -> anyhow::Result<usize> {
        on_backend!(self, AnyEncoder, e => e.warm_up())
    }
    pub fn dim(&self) -> usize {
        on_backend!(self, AnyEncoder, e => e.dim())
    }
    pub fn tokenizer(&self) -> &Tokenizer {
        on_backend!(self, AnyEncoder, e => e.tokenizer())
    }
    /// See [`reads_a_word`].
    pub fn reads_a_word(&self, text: &str) -> bool {
        reads_a_word(self.tokenizer(), text)
    }
}

/// Whether the model makes anything of `text` (as much of it as it reads)
/// but its unknown token. A text of emoji alone, or of characters its
/// vocabulary lacks, is nothing but `[UNK]`, and embeds to about the same
/// vector as any other such text: as a question, it finds whatever lies
/// nearest that vector, and the semantic cache takes one such question
/// for another ("ℵ℘℘" got the cached answer to "😀🎉"). A tokenizer
/// without an unknown token reads everything.
pub fn reads_a_word(tokenizer: &Tokenizer, text: &str) -> bool {
    let tokenizers::ModelWrapper::WordPiece(model) = tokenizer.get_model() else {
        return true;
    };
    let Some(unknown) = tokenizer.token_to_id(&model.unk_token) else {
        return true;
    };
    match tokenizer.encode_fast(text, false) {
        Ok(e) => e.get_ids().iter().any(|&id| id != unknown),
        // Not this check's to refuse: the embedder reports it.
        Err(_) => true,
    }
}

pub enum AnyCrossEncoder {
    Cpu(CrossEncoder<Cpu>),
    #[cfg(feature = "cuda")]
    Cuda(CrossEncoder<Gpu>),
    #[cfg(feature = "cuda")]
    CudaF16(CrossEncoder<GpuF16>),
}

impl AnyCrossEncoder {
    pub fn load(dir: &Path, policy: BatchPolicy, device: Device) -> anyhow::Result<Self> {
        load_on!(AnyCrossEncoder, CrossEncoder, device, dir, policy)
    }
    pub fn warm_up(&self) -> anyhow::Result<usize> {
        on_backend!(self, AnyCrossEncoder, e => e.warm_up())
    }
    pub fn score(&self, query: &str, passages: &[&str]) -> anyhow::Result<Vec<f32>> {
        on_backend!(self, AnyCrossEncoder, e => e.score(query, passages))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same files in two folders: one name. Any byte of the weights
    /// changed: another.
    #[test]
    fn a_model_is_named_by_its_files_not_its_folder() {
        let real =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2");
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        for dir in [a.path(), b.path()] {
            for name in ["config.json", "tokenizer.json", "model.safetensors"] {
                std::fs::copy(real.join(name), dir.join(name)).unwrap();
            }
        }
        let name = fingerprint(a.path()).unwrap();
        assert_eq!(name.len(), 16);
        assert_eq!(fingerprint(b.path()).unwrap(), name);
        let weights = b.path().join("model.safetensors");
        let mut bytes = std::fs::read(&weights).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&weights, bytes).unwrap();
        assert_ne!(fingerprint(b.path()).unwrap(), name);
        // Its max_seq_length changes what the vectors are of.
        std::fs::write(a.path().join("sentence_bert_config.json"), "{}").unwrap();
        assert_ne!(fingerprint(a.path()).unwrap(), name);
    }

    fn minilm() -> Encoder<Cpu> {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../models/all-MiniLM-L6-v2");
        Encoder::<Cpu>::load(&dir, BatchPolicy::default(), &Default::default()).unwrap()
    }

    /// The padded burn-ops path, as GPUs run it, on the CPU.
    fn minilm_unpacked() -> Encoder<Cpu> {
        let enc = minilm();
        Encoder {
            model: enc.model.unpacked(),
            ..enc
        }
    }

    /// Emoji alone, or letters the vocabulary lacks, are nothing but
    /// `[UNK]`, and embed alike: those questions are the ones refused. A
    /// word, or punctuation, the model knows is enough.
    #[test]
    fn a_text_of_unknown_tokens_only_reads_no_word() {
        let enc = minilm();
        for text in ["😀🎉", "ℵ℘℘", "🚗 🚗", "", "\u{1}"] {
            assert!(!reads_a_word(enc.tokenizer(), text), "{text:?}");
        }
        for text in ["office 😀", "?", "café", "東京", "Qu'est-ce que c'est"] {
            assert!(reads_a_word(enc.tokenizer(), text), "{text:?}");
        }
        // And the embeddings say why: two such texts are one vector, as
        // far as a 0.98 cache threshold can tell.
        let v = enc.embed(&["😀🎉", "ℵ℘℘"]).unwrap();
        let cosine: f32 = v[0].iter().zip(&v[1]).map(|(a, b)| a * b).sum();
        assert!(cosine > 0.98, "{cosine}");
    }

    fn worst_difference(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs()))
            .fold(0f32, f32::max)
    }

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

    /// The warm-up's shapes are exactly those that batching produces: every
    /// batch of many random length mixes pads to a listed shape, and every
    /// listed shape is the padding of some batch the policy allows.
    #[test]
    fn warm_up_shapes_are_exactly_the_shapes_batches_take() {
        for (policy, max_len, cap) in [
            (
                BatchPolicy {
                    max_tokens: 8192,
                    max_batch: 64,
                },
                256,
                512,
            ),
            (
                BatchPolicy {
                    max_tokens: 8192,
                    max_batch: 64,
                },
                512,
                512,
            ),
            (
                BatchPolicy {
                    max_tokens: 1000,
                    max_batch: 100,
                },
                500,
                500,
            ),
            (
                BatchPolicy {
                    max_tokens: 50,
                    max_batch: 3,
                },
                128,
                512,
            ),
        ] {
            let shapes = policy.bucket_shapes(max_len, cap);
            let listed: std::collections::HashSet<_> = shapes.iter().copied().collect();
            assert_eq!(listed.len(), shapes.len(), "a shape listed twice");
            let mut seen = std::collections::HashSet::new();
            // A fixed-seed LCG: reproducible, and no dependency for it.
            let mut state = 0x2545_f491_4f6c_dd1du64;
            let mut next = |n: usize| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 33) as usize % n
            };
            for _ in 0..3000 {
                let count = 1 + next(300);
                // Lengths spread over all of 1..=max_len, or clustered.
                let (lo, span) = match next(3) {
                    0 => (1, max_len),
                    _ => {
                        let lo = 1 + next(max_len);
                        (lo, (1 + next(40)).min(max_len + 1 - lo))
                    }
                };
                let mut lengths: Vec<usize> = (0..count).map(|_| lo + next(span)).collect();
                lengths.sort_unstable();
                for range in policy.cut(&lengths) {
                    let longest = lengths[range.end - 1];
                    let shape = padded_shape(range.len(), longest, Some(cap));
                    assert!(
                        listed.contains(&shape),
                        "{shape:?} not warmed up ({policy:?})"
                    );
                    seen.insert(shape);
                }
            }
            for &(rows, seq) in &shapes {
                // The fewest texts that pad to `rows`, at the shortest length
                // that pads to `seq`.
                let texts = if rows == 1 { 1 } else { rows / 2 + 1 };
                let len = (1..=max_len)
                    .find(|&l| padded_shape(1, l, Some(cap)).1 == seq)
                    .unwrap();
                let lengths = vec![len; texts];
                assert_eq!(
                    policy.cut(&lengths),
                    vec![0..texts],
                    "({rows}, {seq}) unreachable"
                );
                assert_eq!(padded_shape(texts, len, Some(cap)), (rows, seq));
            }
            assert!(
                seen.len() * 2 > shapes.len(),
                "the random batches hardly cover the shapes"
            );
        }
        // all-MiniLM-L6-v2 (256 tokens) under the default policy: 8 length
        // buckets of 32, rows 1 to 64 in powers of two.
        let default = BatchPolicy {
            max_tokens: 8192,
            max_batch: 64,
        };
        assert_eq!(default.bucket_shapes(256, 512).len(), 8 * 7);
    }

    /// Shape buckets (the GPU path) pad rows and columns, yet every real
    /// text's embedding stays what it is unpadded. Checked on the CPU
    /// backend, where the same padding can be forced.
    #[test]
    fn shape_buckets_change_no_embedding() {
        // The padded burn path: flex's packed path has no padding to change
        // anything.
        let enc = minilm_unpacked();
        let texts = [
            "a",
            "how do I request parental leave?",
            "The build cache lives on the shared NFS volume and is cleaned every night.",
        ];
        let encodings = enc.tokenizer.encode_batch(texts.to_vec(), true).unwrap();
        let refs: Vec<&Encoding> = encodings.iter().collect();
        let b = pad(&refs, Some(512));
        assert_eq!((b.batch, b.seq), (4, 32), "3 rows → 4, longest → 32");
        assert_eq!(&b.mask[3 * 32..4 * 32].iter().sum::<f32>(), &1.0);
        let bucketed = batched(
            &encodings,
            &enc.policy,
            Some(512),
            |b| Ok(enc.model.embed_launch(b)),
            |t| Ok(Bert::rows(t)),
        )
        .unwrap();
        let plain = enc.embed(&texts).unwrap();
        assert_eq!(bucketed.len(), 3);
        let worst = worst_difference(&bucketed, &plain);
        assert!(worst < 1e-5, "padding changed an embedding by {worst}");
    }

    /// The CPU's packed path (host kernels, no padding) against burn's ops
    /// over a padded batch, on texts of very different lengths in one batch.
    #[test]
    fn packed_cpu_path_matches_the_padded_burn_path() {
        let (packed, plain) = (minilm(), minilm_unpacked());
        let long = "The build cache lives on the shared NFS volume and is cleaned every night. "
            .repeat(12);
        let texts = ["a", "how do I request parental leave?", long.as_str()];
        let (a, b) = (packed.embed(&texts).unwrap(), plain.embed(&texts).unwrap());
        let worst = worst_difference(&a, &b);
        assert!(worst < 1e-5, "packed and padded differ by {worst}");
    }
}
