//! Host kernels for the CPU forward pass ([`super::bert::Bert`] on flex).
//!
//! burn's flex backend runs a BERT layer as a dozen separate ops, each a
//! pass over memory into a fresh tensor, several of them on one thread, and
//! attends over padding. A profile of chunk batches (BENCHMARKS.md, issue #5
//! step 2) put half the time outside the GEMMs: GELU, layer norm and bias
//! broadcasts, strided copies to split and merge the heads, a single-threaded
//! attention kernel, page faults on the fresh buffers. Here every step runs
//! on the host, on the burn parameters' own buffers, in place and spread
//! over rayon's threads:
//!
//! * the batch is *packed*: only real tokens are rows (text r owns rows
//!   `starts[r] .. starts[r] + lens[r]`), so no compute goes to padding, and
//!   attention needs no mask: a text simply attends over its own rows;
//! * attention runs per (text, head) straight out of the fused QKV rows with
//!   strided GEMMs ([`sgemm`]), writing each head's context into its columns:
//!   no head split or merge copies, no [n, heads, s, s] scores tensor;
//! * bias + GELU, and bias + residual + layer norm, are one pass each;
//! * the dense layers' GEMMs write into buffers reused by every layer.
//!
//! The loops are compiled for AVX-512 and AVX2 as well as the baseline and
//! picked at run time (`multiversion`, through `simd_versions!`), so they
//! vectorise on the CPUs that have them without building for one CPU.
//!
//! The GEMMs run on OpenBLAS when the process can load it (see [`gemm_name`]):
//! on this project's machine its single-threaded sgemm does ~120 GFLOP/s a
//! core on the model's shapes, against ~80 for the `gemm` crate flex uses
//! and PyTorch's MKL at ~100 (BENCHMARKS.md). Without it, the `gemm` crate.

use burn::backend::flex::FlexTensor;
use multiversion::multiversion;
use rayon::prelude::*;
use std::ffi::c_int;
use std::sync::OnceLock;

/// `cblas_sgemm`'s C signature.
type Sgemm = unsafe extern "C" fn(
    c_int, // layout: 101 row-major
    c_int, // transa: 111 no, 112 yes
    c_int, // transb
    c_int, // m
    c_int, // n
    c_int, // k
    f32,   // alpha
    *const f32,
    c_int, // lda
    *const f32,
    c_int, // ldb
    f32,   // beta
    *mut f32,
    c_int, // ldc
);

/// An OpenBLAS loaded at run time.
pub struct Blas {
    sgemm: Sgemm,
    path: String,
    _lib: libloading::Library,
}

/// Which library runs the host GEMMs.
#[derive(Clone, Copy)]
pub enum Gemm {
    Blas(&'static Blas),
    /// The `gemm` crate (flex's own).
    Crate,
}

static BLAS: OnceLock<Option<Blas>> = OnceLock::new();

/// The process's GEMM: OpenBLAS when `RAGD_BLAS` names one (a path), or
/// when unset and the system has `libopenblas.so.0`; the `gemm` crate when
/// none loads or `RAGD_BLAS=off`. Loaded at run time, so ragd builds and
/// runs without it (`ops/fetch-blas.sh` installs one from PyPI).
pub fn gemm_backend() -> Gemm {
    match BLAS.get_or_init(load_blas) {
        Some(blas) => Gemm::Blas(blas),
        None => Gemm::Crate,
    }
}

/// The GEMM for an attention product of `rows` rows. OpenBLAS costs more
/// per call than the gemm crate, which wins below ~32 rows.
fn gemm_for(rows: usize) -> Gemm {
    if rows < 32 {
        Gemm::Crate
    } else {
        gemm_backend()
    }
}

/// The GEMM for a dense layer of `rows` rows. Below 32 rows (a question,
/// a short text alone) the faster of the two on this CPU, measured once:
/// on a 2-core AVX-512 machine the gemm crate ran short texts one at a
/// time 1.5× faster than OpenBLAS, on a 2-core AVX2 one OpenBLAS ran them
/// 1.5× faster than the crate (2× with the columns split). The build
/// matters too: on a Zen 4 the test build's checks slowed the crate ~3×,
/// so OpenBLAS won there and the release build picks the crate
/// (BENCHMARKS.md). Hence timed, not assumed.
fn dense_gemm_for(rows: usize) -> Gemm {
    static FEW_ROWS: OnceLock<Gemm> = OnceLock::new();
    match gemm_backend() {
        Gemm::Blas(_) if rows < 32 => *FEW_ROWS.get_or_init(faster_on_few_rows),
        g => g,
    }
}

/// Times both GEMMs on a share of a short text's widest dense layer
/// ([16, 384] · [384, 768], one thread's of two), best of five rounds of
/// four calls each (a few milliseconds, once a process), and keeps the
/// faster.
fn faster_on_few_rows() -> Gemm {
    let blas = gemm_backend();
    let (m, k, n) = (16, 384, 768);
    let (a, b, mut c) = (vec![0.5f32; m * k], vec![0.25f32; k * n], vec![0f32; m * n]);
    let mut time = |g: Gemm| {
        let t = std::time::Instant::now();
        for _ in 0..4 {
            // SAFETY: a is [m, k], b is [k, n] and c is [m, n], dense.
            unsafe {
                sgemm(
                    g,
                    (m, n, k),
                    1.0,
                    (a.as_ptr(), k),
                    (b.as_ptr(), n, false),
                    (c.as_mut_ptr(), n),
                )
            };
        }
        t.elapsed()
    };
    let (mut on_blas, mut on_crate) = (std::time::Duration::MAX, std::time::Duration::MAX);
    for _ in 0..5 {
        on_blas = on_blas.min(time(blas));
        on_crate = on_crate.min(time(Gemm::Crate));
    }
    tracing::debug!(?on_blas, ?on_crate, "GEMMs of a few rows timed");
    if on_blas < on_crate {
        blas
    } else {
        Gemm::Crate
    }
}

/// For logs and benchmark labels.
pub fn gemm_name() -> String {
    match gemm_backend() {
        Gemm::Blas(b) => {
            let few = match dense_gemm_for(1) {
                Gemm::Blas(_) => "OpenBLAS too",
                Gemm::Crate => "the gemm crate",
            };
            format!(
                "OpenBLAS ({}); dense layers of fewer than 32 rows on {few}",
                b.path
            )
        }
        Gemm::Crate => "gemm crate".into(),
    }
}

/// Names the model's threads (rayon's global pool, which runs the forward
/// passes' kernels) `ragd-model-N`, so `top -H`, perf and the ingest bench
/// tell them from the pipeline's. Call before the first forward pass; later
/// (the pool already started) it changes nothing.
pub fn name_model_threads() {
    let _ = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("ragd-model-{i}"))
        .build_global();
}

fn load_blas() -> Option<Blas> {
    let explicit = std::env::var("RAGD_BLAS").ok().filter(|v| !v.is_empty());
    let candidates = match explicit.as_deref() {
        Some("off") => return None,
        Some(path) => vec![path.to_string()],
        None => vec!["libopenblas.so.0".to_string(), "libopenblas.so".to_string()],
    };
    for path in &candidates {
        // SAFETY: loading runs the library's initialisers; OpenBLAS's detect
        // the CPU and set up its thread pool, nothing else.
        let Ok(lib) = (unsafe { libloading::Library::new(path) }) else {
            continue;
        };
        // Wheels built for SciPy/NumPy (scipy-openblas32) prefix every symbol.
        for prefix in ["", "scipy_"] {
            // SAFETY: these are OpenBLAS's exported C functions with the
            // signatures declared above.
            let found = unsafe {
                (
                    lib.get::<Sgemm>(format!("{prefix}cblas_sgemm").as_bytes())
                        .map(|s| *s),
                    lib.get::<unsafe extern "C" fn(c_int)>(
                        format!("{prefix}openblas_set_num_threads").as_bytes(),
                    )
                    .map(|s| *s),
                    lib.get::<unsafe extern "C" fn() -> c_int>(
                        format!("{prefix}openblas_get_parallel").as_bytes(),
                    )
                    .map(|s| *s),
                )
            };
            if let (Ok(sgemm), Ok(set_threads), Ok(parallel)) = found {
                // ragd calls sgemm from several threads at once. A
                // sequential build (0) may lack the locking that makes that
                // safe (OpenBLAS issues 2126, 4030); the pthreads (1) and
                // OpenMP (2) builds have it.
                // SAFETY: a plain getter.
                if unsafe { parallel() } == 0 {
                    tracing::warn!(
                        "{path}: a single-threaded OpenBLAS build, not safe to call from several threads; the model uses the gemm crate"
                    );
                    break;
                }
                // One thread per call: ragd splits each GEMM over rayon's
                // threads itself, and OpenBLAS's own pool would keep spinning
                // on the cores rayon needs between calls.
                // SAFETY: a plain setter.
                unsafe { set_threads(1) };
                return Some(Blas {
                    sgemm,
                    path: path.clone(),
                    _lib: lib,
                });
            }
        }
    }
    if let Some(path) = explicit {
        tracing::warn!(
            "RAGD_BLAS={path}: no OpenBLAS (cblas_sgemm) could be loaded from it; the model uses the gemm crate"
        );
    }
    None
}

/// c = alpha · a · op(b), row-major with leading dimensions: a is [m, k]
/// (lda), op(b) is b [k, n] (ldb) or, with `b_transposed`, bᵀ for b [n, k]
/// (ldb); c is [m, n] (ldc), overwritten. Single-threaded: callers split
/// the work over rayon's threads.
///
/// # Safety
/// The pointers and leading dimensions must address matrices of those
/// shapes inside live buffers, and c must not overlap a or b.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    g: Gemm,
    (m, n, k): (usize, usize, usize),
    alpha: f32,
    (a, lda): (*const f32, usize),
    (b, ldb, b_transposed): (*const f32, usize, bool),
    (c, ldc): (*mut f32, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    match g {
        Gemm::Blas(blas) => {
            let i = |v: usize| c_int::try_from(v).expect("GEMM dimension fits a C int");
            (blas.sgemm)(
                101,
                111,
                if b_transposed { 112 } else { 111 },
                i(m),
                i(n),
                i(k),
                alpha,
                a,
                i(lda),
                b,
                i(ldb),
                0.0,
                c,
                i(ldc),
            );
        }
        Gemm::Crate => {
            // The crate takes element strides: rhs(i, j) is b[i·ldb + j],
            // or b[j·ldb + i] transposed.
            let (rhs_cs, rhs_rs) = if b_transposed {
                (ldb as isize, 1)
            } else {
                (1, ldb as isize)
            };
            gemm::gemm(
                m,
                n,
                k,
                c,
                1,
                ldc as isize,
                false,
                a,
                1,
                lda as isize,
                b,
                rhs_cs,
                rhs_rs,
                0.0,
                alpha,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

/// Below this many rows a dense layer splits its output columns over the
/// threads rather than its rows: split by rows, a short question (~15
/// rows) leaves each thread a GEMM of 7 or 8 rows that still reads the
/// whole weight; split by columns, each thread multiplies every row by
/// its share of the weight. (Short texts one at a time: 1.3× faster on
/// OpenBLAS, no change on the gemm crate; BENCHMARKS.md.)
const COLUMN_SPLIT_BELOW: usize = 64;

/// A dense layer's weight ([in, out], burn's layout) and bias. The weight
/// is the burn parameter's own flex buffer, shared, not a copy.
pub struct HostLinear {
    weight: FlexTensor,
    bias: Vec<f32>,
    d_in: usize,
    d_out: usize,
}

impl HostLinear {
    /// None when the weight is not a contiguous f32 flex tensor.
    pub fn new(weight: FlexTensor, bias: Vec<f32>) -> Option<Self> {
        let dims = weight.layout().shape().to_vec();
        let [d_in, d_out] = dims[..] else {
            return None;
        };
        weight.as_slice::<f32>()?;
        (bias.len() == d_out).then_some(HostLinear {
            weight,
            bias,
            d_in,
            d_out,
        })
    }

    pub fn bias(&self) -> &[f32] {
        &self.bias
    }

    /// out = x·W ([rows, in] · [in, out]), no bias. The rows are split
    /// evenly over rayon's threads, one single-threaded GEMM each (as fast
    /// as a threaded GEMM on large batches), or the columns for fewer than
    /// [`COLUMN_SPLIT_BELOW`] rows, into an output buffer reused across
    /// layers, where flex would allocate (and page-fault) a fresh one per
    /// call.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        let rows = x.len() / self.d_in;
        assert_eq!(out.len(), rows * self.d_out, "output is [rows, out]");
        let w = self.weight.as_slice::<f32>().expect("checked in new");
        let threads = rayon::current_num_threads();
        if threads > 1 && rows < COLUMN_SPLIT_BELOW {
            return self.matmul_by_columns(x, w, out, threads);
        }
        let per_task = rows.div_ceil(threads).max(1);
        let g = dense_gemm_for(per_task);
        out.par_chunks_mut(per_task * self.d_out)
            .zip(x.par_chunks(per_task * self.d_in))
            .for_each(|(out, x)| {
                let m = x.len() / self.d_in;
                // SAFETY: x is [m, d_in], w is [d_in, d_out] and out is
                // [m, d_out], all row-major, dense and in bounds.
                unsafe {
                    sgemm(
                        g,
                        (m, self.d_out, self.d_in),
                        1.0,
                        (x.as_ptr(), self.d_in),
                        (w.as_ptr(), self.d_out, false),
                        (out.as_mut_ptr(), self.d_out),
                    )
                };
            });
    }

    /// [`Self::matmul`] of a few rows: the output columns in blocks, one
    /// per thread.
    fn matmul_by_columns(&self, x: &[f32], w: &[f32], out: &mut [f32], threads: usize) {
        let rows = x.len() / self.d_in;
        // Column blocks of a multiple of 16 (whole SIMD registers).
        let per_task = self.d_out.div_ceil(threads).next_multiple_of(16);
        let g = dense_gemm_for(rows);
        let out_at = SharedOut(out.as_mut_ptr());
        (0..self.d_out.div_ceil(per_task))
            .into_par_iter()
            .for_each(|t| {
                let start = t * per_task;
                let n = per_task.min(self.d_out - start);
                // SAFETY: x is [rows, d_in]; the block is columns start..start+n
                // of w ([d_in, d_out]) and of out ([rows, d_out]), row-major with
                // leading dimension d_out, in bounds; the tasks' column blocks
                // are disjoint, so no two write the same element.
                unsafe {
                    sgemm(
                        g,
                        (rows, n, self.d_in),
                        1.0,
                        (x.as_ptr(), self.d_in),
                        (w.as_ptr().add(start), self.d_out, false),
                        (out_at.at(start), self.d_out),
                    )
                };
            });
    }
}

/// One encoder layer's parameters for the host path.
pub struct HostLayer {
    pub qkv: HostLinear,
    pub attn_out: HostLinear,
    pub attn_norm: (Vec<f32>, Vec<f32>),
    pub ffn_in: HostLinear,
    pub ffn_out: HostLinear,
    pub ffn_norm: (Vec<f32>, Vec<f32>),
}

/// The encoder layers over a packed hidden state `x` ([total, h], updated
/// in place). Five buffers per batch, reused by every layer.
pub fn encode_layers(x: &mut [f32], p: &Packing, layers: &[HostLayer], heads: usize, eps: f32) {
    let t = p.total;
    let Some(first) = layers.first() else {
        return;
    };
    let h = first.qkv.d_in;
    let ff = first.ffn_in.d_out;
    let mut qkv = vec![0f32; t * 3 * h];
    let mut ctx = vec![0f32; t * h];
    let mut y = vec![0f32; t * h];
    let mut inner = vec![0f32; t * ff];
    for l in layers {
        // Attention sublayer: fused QKV, attention per text and head, output
        // dense; then y = LayerNorm(y + bias + x).
        l.qkv.matmul(x, &mut qkv);
        add_bias(&mut qkv, l.qkv.bias());
        attention_into(&qkv, p, heads, h, &mut ctx);
        l.attn_out.matmul(&ctx, &mut y);
        bias_residual_norm(&mut y, l.attn_out.bias(), x, &norm(&l.attn_norm, eps));
        // Feed-forward sublayer: x = LayerNorm(dense(gelu(dense(y))) + y).
        l.ffn_in.matmul(&y, &mut inner);
        bias_gelu(&mut inner, l.ffn_in.bias());
        l.ffn_out.matmul(&inner, x);
        bias_residual_norm(x, l.ffn_out.bias(), &y, &norm(&l.ffn_norm, eps));
    }
}

fn norm((gamma, beta): &(Vec<f32>, Vec<f32>), eps: f32) -> Norm<'_> {
    Norm { gamma, beta, eps }
}

/// Where each text's tokens sit in a packed batch.
pub struct Packing {
    pub starts: Vec<usize>,
    pub lens: Vec<usize>,
    pub total: usize,
}

impl Packing {
    /// From a [batch, seq] attention mask whose rows are 1s then 0s.
    pub fn from_mask(mask: &[f32], batch: usize, seq: usize) -> Self {
        let lens: Vec<usize> = (0..batch)
            .map(|r| {
                mask[r * seq..(r + 1) * seq]
                    .iter()
                    .filter(|m| **m != 0.0)
                    .count()
            })
            .collect();
        let mut starts = Vec::with_capacity(batch);
        let mut total = 0;
        for l in &lens {
            starts.push(total);
            total += l;
        }
        Packing {
            starts,
            lens,
            total,
        }
    }

    /// Packed copy of a padded [batch, seq] array.
    pub fn pack<T: Copy>(&self, padded: &[T], seq: usize) -> Vec<T> {
        let mut out = Vec::with_capacity(self.total);
        for (r, l) in self.lens.iter().enumerate() {
            out.extend_from_slice(&padded[r * seq..r * seq + l]);
        }
        out
    }
}

/// Rows handed to one rayon task by the row-wise kernels: enough work to
/// outweigh the task's overhead, few enough to balance two or more cores.
const ROWS_PER_TASK: usize = 32;

/// A pointer that rayon tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: every task writes its own block (a (text, head) block of the
// attention context, a column block of a dense layer's output) and nothing
// reads the buffer until all tasks are done.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}
impl SharedOut {
    // A method, not `.0`: closures then capture the whole (Sync) wrapper
    // rather than the raw pointer field.
    fn at(self, offset: usize) -> *mut f32 {
        // SAFETY: callers stay inside the buffer.
        unsafe { self.0.add(offset) }
    }
}

/// Self-attention over packed rows of fused projections `qkv` ([total, 3h]:
/// query, key, value side by side, biases added). Returns the context,
/// [total, h], heads side by side as BERT concatenates them.
#[cfg(test)]
pub fn attention(qkv: &[f32], p: &Packing, heads: usize, h: usize) -> Vec<f32> {
    let mut ctx = vec![0f32; p.total * h];
    attention_into(qkv, p, heads, h, &mut ctx);
    ctx
}

/// [`attention`] into `ctx` ([total, h]; every element is written).
pub fn attention_into(qkv: &[f32], p: &Packing, heads: usize, h: usize, ctx: &mut [f32]) {
    assert_eq!(qkv.len(), p.total * 3 * h, "qkv is [total, 3h]");
    assert_eq!(ctx.len(), p.total * h, "ctx is [total, h]");
    let d = h / heads;
    let row = 3 * h;
    let scale = 1.0 / (d as f32).sqrt();
    let out = SharedOut(ctx.as_mut_ptr());
    let tasks: Vec<(usize, usize)> = (0..p.lens.len())
        .filter(|&r| p.lens[r] > 0)
        .flat_map(|r| (0..heads).map(move |hd| (r, hd)))
        .collect();
    tasks
        .par_iter()
        .for_each_init(Vec::new, |scores: &mut Vec<f32>, &(r, hd)| {
            let (start, l) = (p.starts[r], p.lens[r]);
            let g = gemm_for(l);
            scores.clear();
            scores.resize(l * l, 0.0);
            // SAFETY: the strides below address rows start..start+l and the
            // head's d columns of q, k and v, all inside `qkv`; the output
            // block (same rows, the head's columns of `ctx`) is this task's
            // alone.
            unsafe {
                let q = qkv.as_ptr().add(start * row + hd * d);
                let k = q.add(h);
                let v = q.add(2 * h);
                // scores[i, j] = scale · q_i · k_j: the right operand is kᵀ.
                sgemm(
                    g,
                    (l, l, d),
                    scale,
                    (q, row),
                    (k, row, true),
                    (scores.as_mut_ptr(), l),
                );
                softmax_rows(scores, l);
                sgemm(
                    g,
                    (l, d, l),
                    1.0,
                    (scores.as_ptr(), l),
                    (v, row, false),
                    (out.at(start * h + hd * d), h),
                );
            }
        });
}

/// x += bias, row by row ([rows, bias.len()]).
pub fn add_bias(x: &mut [f32], bias: &[f32]) {
    let w = bias.len();
    x.par_chunks_mut(w * ROWS_PER_TASK)
        .for_each(|rows| add_bias_rows(rows, bias));
}

/// x = gelu(x + bias), row by row.
pub fn bias_gelu(x: &mut [f32], bias: &[f32]) {
    let w = bias.len();
    x.par_chunks_mut(w * ROWS_PER_TASK)
        .for_each(|rows| bias_gelu_rows(rows, bias));
}

/// Layer norm parameters of one BERT LayerNorm.
pub struct Norm<'a> {
    pub gamma: &'a [f32],
    pub beta: &'a [f32],
    pub eps: f32,
}

/// y = LayerNorm(y + bias + residual), row by row: a BERT sublayer's output
/// (dense, dropout a no-op at inference, residual, norm) in one pass.
pub fn bias_residual_norm(y: &mut [f32], bias: &[f32], residual: &[f32], norm: &Norm) {
    assert_eq!(y.len(), residual.len(), "the residual is [rows, w] like y");
    let w = bias.len();
    y.par_chunks_mut(w * ROWS_PER_TASK)
        .zip(residual.par_chunks(w * ROWS_PER_TASK))
        .for_each(|(rows, res)| bias_residual_norm_rows(rows, bias, res, norm));
}

/// Compiles each row kernel for AVX-512, AVX2 and SSE4.2 (NEON on ARM) as
/// well as the baseline; the CPU picks at run time. Not multiversion's
/// `targets = "simd"`: its list leaves AVX-512 out (commented out in
/// multiversion-macros 0.8.1), so an AVX-512 CPU ran the AVX2 build.
macro_rules! simd_versions {
    ($($f:item)*) => {$(
        #[multiversion(targets(
            "x86_64+avx512f+avx512bw+avx512cd+avx512dq+avx512vl+avx2+fma",
            "x86_64+avx2+fma",
            "x86_64+sse4.2",
            "aarch64+neon"
        ))]
        $f
    )*};
}

simd_versions! {
    fn add_bias_rows(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v += b;
            }
        }
    }

    fn bias_gelu_rows(x: &mut [f32], bias: &[f32]) {
        for row in x.chunks_exact_mut(bias.len()) {
            for (v, b) in row.iter_mut().zip(bias) {
                *v = gelu(*v + b);
            }
        }
    }

    fn bias_residual_norm_rows(y: &mut [f32], bias: &[f32], residual: &[f32], norm: &Norm) {
        let w = bias.len();
        for (row, res) in y.chunks_exact_mut(w).zip(residual.chunks_exact(w)) {
            for ((v, b), r) in row.iter_mut().zip(bias).zip(res) {
                *v += b + r;
            }
            // Two passes (mean, then the mean square deviation), as PyTorch
            // computes it: one-pass E[x²] - E[x]² loses digits when |mean| ≫ std.
            let mean = sum(row) / w as f32;
            let var = fold_lanes(row, 0.0, |v| (v - mean) * (v - mean), |a, b| a + b) / w as f32;
            let inv = 1.0 / (var + norm.eps).sqrt();
            for ((v, g), b) in row.iter_mut().zip(norm.gamma).zip(norm.beta) {
                *v = (*v - mean) * inv * g + b;
            }
        }
    }

    /// Softmax of each `l`-wide row, in place.
    fn softmax_rows(s: &mut [f32], l: usize) {
        for row in s.chunks_exact_mut(l) {
            let max = fold_lanes(row, f32::NEG_INFINITY, |v| v, f32::max);
            for v in row.iter_mut() {
                *v = exp_non_positive(*v - max);
            }
            let inv = 1.0 / sum(row);
            for v in row.iter_mut() {
                *v *= inv;
            }
        }
    }
}

/// Independent accumulators for a reduction: a single one is a chain of
/// dependent operations that the compiler may not reorder (float addition is
/// not associative, and `max` must keep NaN's rules), so it would neither
/// vectorise nor pipeline.
const LANES: usize = 16;

/// `combine` over `map` of every element, with LANES accumulators. Whole
/// chunks only in the main loop and the tail on its own: with a short last
/// chunk inside the loop the accumulators lived on the stack, and the
/// store and reload was a quarter of softmax's time (perf annotate).
#[inline(always)]
fn fold_lanes(
    x: &[f32],
    init: f32,
    map: impl Fn(f32) -> f32,
    combine: impl Fn(f32, f32) -> f32,
) -> f32 {
    let mut acc = [init; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c) {
            *a = combine(*a, map(*v));
        }
    }
    let whole = acc.into_iter().fold(init, &combine);
    chunks
        .remainder()
        .iter()
        .fold(whole, |a, v| combine(a, map(*v)))
}

#[inline(always)]
fn sum(x: &[f32]) -> f32 {
    fold_lanes(x, 0.0, |v| v, |a, b| a + b)
}

/// 0.5·x·(1 + erf(x/√2)), the exact GELU BERT defines, with erf by
/// Abramowitz & Stegun 7.1.26 (absolute error under 1.5e-7). Branch-free
/// and without libm calls, so loops over it vectorise (libm's erff does not).
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
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
/// ~1e-38). x = k·ln2 + r with |r| ≤ ln2/2, e^r by its degree-6 Taylor
/// polynomial, 2^k built in the exponent bits. Plain float arithmetic, no
/// float-to-int cast (Rust's saturating `as` costs extra instructions per
/// lane), so it vectorises.
#[inline(always)]
pub fn exp_non_positive(x: f32) -> f32 {
    let x = x.max(-87.0);
    let k = (x * std::f32::consts::LOG2_E + 0.5).floor(); // -126 ..= 0
    let r = x - k * 0.693_145_75 - k * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // 2^23 + (k + 127) holds k + 127 (1 ..= 127) in its low mantissa bits;
    // shifted left by 23 it becomes the exponent field of 2^k.
    let biased = (k + (8_388_608.0 + 127.0)).to_bits() << 23;
    p * f32::from_bits(biased)
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn packing_keeps_only_attended_tokens_in_order() {
        let mask = [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let p = Packing::from_mask(&mask, 3, 3);
        assert_eq!(
            (p.starts, p.lens.clone(), p.total),
            (vec![0, 3, 4], vec![3, 1, 3], 7)
        );
        let ids = [1, 2, 3, 4, 0, 0, 5, 6, 7];
        assert_eq!(
            Packing::from_mask(&mask, 3, 3).pack(&ids, 3),
            [1, 2, 3, 4, 5, 6, 7]
        );
    }

    /// Attention against a plain scalar implementation, texts of different
    /// lengths side by side (packed): a text must attend to its own rows
    /// only, each head to its own columns.
    #[test]
    fn packed_attention_matches_a_scalar_reference() {
        let (heads, h) = (3, 12);
        let d = h / heads;
        // 37: a softmax row of whole 16-lane chunks and a tail.
        let lens = [5usize, 1, 37];
        let width = 37;
        let total: usize = lens.iter().sum();
        let mut x = 0x1234_5678u32;
        let qkv: Vec<f32> = (0..total * 3 * h)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect();
        let mut mask = vec![0.0; lens.len() * width];
        for (r, l) in lens.iter().enumerate() {
            mask[r * width..r * width + l].fill(1.0);
        }
        let p = Packing::from_mask(&mask, lens.len(), width);
        let got = attention(&qkv, &p, heads, h);
        let at =
            |t: usize, part: usize, hd: usize, i: usize| qkv[t * 3 * h + part * h + hd * d + i];
        let mut worst = 0f32;
        for (r, &l) in lens.iter().enumerate() {
            let s = p.starts[r];
            for hd in 0..heads {
                for qi in 0..l {
                    let scores: Vec<f32> = (0..l)
                        .map(|kj| {
                            (0..d)
                                .map(|i| at(s + qi, 0, hd, i) * at(s + kj, 1, hd, i))
                                .sum::<f32>()
                                / (d as f32).sqrt()
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f32::MIN, f32::max);
                    let e: Vec<f32> = scores.iter().map(|v| (v - max).exp()).collect();
                    let z: f32 = e.iter().sum();
                    for i in 0..d {
                        let want: f32 = (0..l).map(|kj| e[kj] / z * at(s + kj, 2, hd, i)).sum();
                        let diff = (got[(s + qi) * h + hd * d + i] - want).abs();
                        worst = worst.max(diff);
                    }
                }
            }
        }
        assert!(worst < 1e-5, "worst difference {worst}");
    }

    /// Both GEMMs against a scalar product, both operand layouts, on
    /// strided views (leading dimensions wider than the matrices). OpenBLAS
    /// is checked where it loads; `RAGD_TEST_BLAS=required` (ops/test.sh,
    /// after ops/fetch-blas.sh) makes its absence a failure.
    #[test]
    fn both_gemms_match_a_scalar_product() {
        let (m, n, k) = (7, 5, 9);
        let (lda, ldb, ldc) = (k + 3, n.max(k) + 2, n + 1);
        let a: Vec<f32> = (0..m * lda).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..k.max(n) * ldb)
            .map(|i| (i as f32 * 0.11).cos())
            .collect();
        let mut backends = vec![Gemm::Crate];
        match gemm_backend() {
            Gemm::Blas(blas) => backends.push(Gemm::Blas(blas)),
            Gemm::Crate => assert!(
                std::env::var("RAGD_TEST_BLAS").as_deref() != Ok("required"),
                "RAGD_TEST_BLAS=required but no OpenBLAS loaded (RAGD_BLAS={:?})",
                std::env::var("RAGD_BLAS")
            ),
        }
        for g in backends {
            for transposed in [false, true] {
                let mut c = vec![f32::NAN; m * ldc];
                // SAFETY: the shapes and leading dimensions fit the buffers.
                unsafe {
                    sgemm(
                        g,
                        (m, n, k),
                        0.5,
                        (a.as_ptr(), lda),
                        (b.as_ptr(), ldb, transposed),
                        (c.as_mut_ptr(), ldc),
                    )
                };
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k)
                            .map(|p| {
                                let bv = if transposed {
                                    b[j * ldb + p]
                                } else {
                                    b[p * ldb + j]
                                };
                                a[i * lda + p] * bv
                            })
                            .sum::<f32>()
                            * 0.5;
                        let got = c[i * ldc + j];
                        assert!((got - want).abs() < 1e-5, "c[{i},{j}] = {got}, want {want}");
                    }
                }
            }
        }
    }

    /// A few rows are split by columns (into blocks of 16, the last one
    /// short), many by rows; both give the plain product.
    #[test]
    fn a_dense_layer_gives_the_product_however_it_splits() {
        use burn::tensor::{Tensor, TensorData};
        let (d_in, d_out) = (24, 40);
        let w: Vec<f32> = (0..d_in * d_out).map(|i| (i as f32 * 0.13).sin()).collect();
        let data = TensorData::new(w.clone(), [d_in, d_out]);
        let t = Tensor::<crate::model::Cpu, 2>::from_data(data, &Default::default());
        let prim: Box<dyn std::any::Any> = Box::new(t.into_primitive().tensor());
        let weight = *prim.downcast::<FlexTensor>().unwrap();
        let linear = HostLinear::new(weight, vec![0.0; d_out]).unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        for rows in [1, 5, 31, COLUMN_SPLIT_BELOW + 6] {
            let x: Vec<f32> = (0..rows * d_in).map(|i| (i as f32 * 0.29).cos()).collect();
            let mut out = vec![f32::NAN; rows * d_out];
            pool.install(|| linear.matmul(&x, &mut out));
            for i in 0..rows {
                for j in 0..d_out {
                    let want: f32 = (0..d_in).map(|p| x[i * d_in + p] * w[p * d_out + j]).sum();
                    let got = out[i * d_out + j];
                    assert!(
                        (got - want).abs() < 1e-4,
                        "{rows} rows: [{i},{j}] = {got}, want {want}"
                    );
                }
            }
        }
    }

    /// Every length from none to three chunks and a tail: the 16-lane
    /// loop, the tail, and the largest element in either.
    #[test]
    fn lane_reductions_match_plain_ones_at_every_length() {
        for n in 0..=50 {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 20.0)
                .collect();
            let want_sum: f64 = x.iter().map(|&v| v as f64).sum();
            assert!((sum(&x) as f64 - want_sum).abs() < 1e-3, "sum of {n}");
            let want_max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(
                fold_lanes(&x, f32::NEG_INFINITY, |v| v, f32::max),
                want_max,
                "max of {n}"
            );
            for top in 0..n {
                let mut y = x.clone();
                y[top] = 1e3;
                assert_eq!(
                    fold_lanes(&y, f32::NEG_INFINITY, |v| v, f32::max),
                    1e3,
                    "max at {top} of {n}"
                );
            }
        }
    }

    #[test]
    fn fused_norm_matches_a_two_pass_layer_norm() {
        // 40 columns: two whole 16-lane chunks and a tail.
        let w = 40;
        let y0: Vec<f32> = (0..3 * w)
            .map(|i| (i as f32 * 0.37).sin() * 3.0 + 5.0)
            .collect();
        let res: Vec<f32> = (0..3 * w).map(|i| (i as f32 * 0.11).cos()).collect();
        let bias: Vec<f32> = (0..w).map(|i| i as f32 * 0.01).collect();
        let gamma: Vec<f32> = (0..w).map(|i| 1.0 + i as f32 * 0.1).collect();
        let beta: Vec<f32> = (0..w).map(|i| -(i as f32) * 0.2).collect();
        let mut y = y0.clone();
        let norm = Norm {
            gamma: &gamma,
            beta: &beta,
            eps: 1e-12,
        };
        bias_residual_norm(&mut y, &bias, &res, &norm);
        for r in 0..3 {
            let v: Vec<f64> = (0..w)
                .map(|i| (y0[r * w + i] + bias[i] + res[r * w + i]) as f64)
                .collect();
            let mean = v.iter().sum::<f64>() / w as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / w as f64;
            for i in 0..w {
                let want = (v[i] - mean) / (var + 1e-12).sqrt() * gamma[i] as f64 + beta[i] as f64;
                assert!((y[r * w + i] as f64 - want).abs() < 1e-5, "row {r} col {i}");
            }
        }
    }
}
