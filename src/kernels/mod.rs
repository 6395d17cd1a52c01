//! Fused CPU kernels as candle custom ops, each with a backward pass and a parity test of
//! values and gradients against the composite candle version (in `nn`); the training
//! parity tests against PyTorch run through all of them.
//!
//! - `bf16_gemm`: products in bf16 with f32 sums (mixed-precision training), on AMX
//!   tiles where the CPU has them.
//! - `attention`: causal self-attention per (batch row, head), backward from the saved LSE.
//! - `layer_norm`, `rms_norm` (also weightless, for QK-norm), `gelu` (GELU and ReLU^2),
//!   `swiglu`, `bias`: element-wise / per-row ops with one-pass backwards.
//! - `cross_entropy`, `linear_cross_entropy`: log-softmax + NLL, optionally fused with the
//!   output layer so that no logits tensor is kept.
//! - `residual`: a block's residual branch x + f(x), f a chain of these ops, as one
//!   graph node (no zero-filled gradient and addition per op in candle's backward).
//! - `linear`: x w^T for nn.Linear weights, any leading dimensions, no reshapes or
//!   transposes in the graph.
//! - `expert_matmul`: the experts' batched product, one thread per expert; the gate-output
//!   loss's tap on it.
//! - `ceiling`: the machine's sgemm and read-bandwidth ceilings, for the benchmarks.
//! - `matvec`: weight-streaming products of a few rows with f32, bf16 or f16 tensors (a
//!   model in the training layout; inference loads pack their weights in panels).
//! - `panels`: f32, bf16 and f16 inference weights packed in panels of 48 rows, and their
//!   product kernel (decoding, serving and prompts alike, batch-invariant).
//! - `qmatvec`: products with quantized weights (q8_0 / q4_0) on 8-bit activations.
//! - `qgemm`: the same for prompts: integer GEMMs on weights repacked 8 rows per register.
//! - `transpose`: 8 x 8 block transposes for the experts' backward.
//! - `math`: vectorizable exp/tanh/erf and the per-instruction-set `multiversion!`.

use candle_core::{CpuStorage, Layout, Storage, Tensor};

pub mod attention;
pub mod bf16_gemm;
pub mod bias;
pub mod ceiling;
pub mod cross_entropy;
pub mod expert_matmul;
pub mod gelu;
pub mod layer_norm;
pub mod linear;
pub mod linear_cross_entropy;
pub mod math;
pub mod matvec;
pub mod panels;
pub mod qgemm;
pub mod qgroup;
pub mod qmatvec;
pub mod residual;
pub mod rms_norm;
pub mod swiglu;
pub mod swiglu_experts;
pub mod transpose;

/// Whether the CPU runs the decoding kernels' intrinsics (`matvec`, `qmatvec`): AVX2, FMA
/// and F16C.
pub fn has_avx2_fma_f16c() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// y [m, n] for products computed a block of output columns at a time: `block(n0, out)`
/// fills `out` ([m, len] for columns n0..n0+len), blocks of a multiple of 16 columns (at
/// least `min_block`, about 4 per thread) run in parallel, then are laid side by side.
pub fn by_column_blocks(m: usize, n: usize, min_block: usize, block: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    use rayon::prelude::*;
    if m == 0 || n == 0 {
        // No rows (an MoE layer given no tokens) or no outputs: nothing for a block to do.
        return Vec::new();
    }
    let threads = rayon::current_num_threads().max(1);
    let size = (n.div_ceil(threads * 4).div_ceil(16) * 16).max(min_block).min(n.max(1));
    let nblocks = n.div_ceil(size);
    let mut parts: Vec<Vec<f32>> = (0..nblocks)
        .into_par_iter()
        .map(|bi| {
            let n0 = bi * size;
            let mut out = vec![0f32; m * size.min(n - n0)];
            block(n0, &mut out);
            out
        })
        .collect();
    if nblocks == 1 {
        return parts.pop().unwrap_or_default();
    }
    let mut y = vec![0f32; m * n];
    for (bi, part) in parts.iter().enumerate() {
        let n0 = bi * size;
        let len = part.len() / m;
        for r in 0..m {
            y[r * n + n0..r * n + n0 + len].copy_from_slice(&part[r * len..(r + 1) * len]);
        }
    }
    y
}

pub use bf16_gemm::Precision;

/// dst[m x n] = alpha * lhs[m x k] rhs[k x n] through the gemm crate (the one candle uses),
/// reading the operands in place: strides are in elements, (row, column); dst is row-major
/// with row stride `dst_rs`. `threads` 1 runs on the calling thread (kernels that already
/// run one task per thread), more splits the product over rayon's pool.
///
/// # Safety
/// The pointers must cover every element the sizes and strides address, dst must not
/// overlap the operands, and no other thread may write what this one reads or writes.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, alpha: f32, threads: usize) {
    gemm_f32(m, n, k, dst, dst_rs, false, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, alpha, threads)
}

/// [`mm`] in the given precision: f32, or operands rounded to bf16 with f32 sums
/// ([`bf16_gemm`]).
///
/// # Safety
/// As for [`mm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm_in(prec: Precision, m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, alpha: f32, threads: usize) {
    gemm_in(prec, m, n, k, dst, dst_rs, false, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, alpha, threads)
}

/// [`mm_in`] adding to dst instead of overwriting it: dst += alpha * lhs rhs, on the
/// calling thread.
///
/// # Safety
/// As for [`mm`].
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn mm_add_in(prec: Precision, m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, alpha: f32) {
    gemm_in(prec, m, n, k, dst, dst_rs, true, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, alpha, 1)
}

/// dst = (dst when `add`) + alpha * lhs rhs in `prec`: the gemm crate or [`bf16_gemm`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_in(prec: Precision, m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, add: bool, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, alpha: f32, threads: usize) {
    let product = match prec {
        Precision::F32 => gemm_f32,
        Precision::Bf16 => bf16_gemm::gemm_bf16,
    };
    product(m, n, k, dst, dst_rs, add, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, alpha, threads)
}

/// dst = (dst when `add`) + alpha * lhs rhs through the gemm crate (see [`mm`]).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, add: bool, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, alpha: f32, threads: usize) {
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let keep = if add { 1.0 } else { 0.0 };
    gemm::gemm(m, n, k, dst, 1, dst_rs as isize, add, lhs, lhs_cs as isize, lhs_rs as isize, rhs, rhs_cs as isize, rhs_rs as isize, keep, alpha, false, false, false, par)
}

/// A vector whose every element `fill` writes through the pointer it gets (gemm with
/// `read_dst = false` writes its whole destination): skips zero-filling outputs and
/// gradients that a product overwrites anyway (at 64 experts, a pass over all expert
/// weights per product).
pub(crate) fn written_by(len: usize, fill: impl FnOnce(*mut f32)) -> Vec<f32> {
    let mut v: Vec<std::mem::MaybeUninit<f32>> = Vec::with_capacity(len);
    // SAFETY: MaybeUninit elements may be uninitialised.
    unsafe { v.set_len(len) };
    fill(v.as_mut_ptr().cast());
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: `fill` initialised all `len` elements; same allocation, layout and capacity.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), len, v.capacity()) }
}

/// `len` f32 for a kernel that writes every element before anything reads it: no zero-fill
/// pass (in a 4 x 256 training step the outputs and gradients of GELU, the norms, attention
/// and the residual additions were ~150 MB of `memset`, ~2 % of the step). candle allocates
/// its own op outputs the same way.
#[allow(clippy::uninit_vec)]
pub(crate) fn for_overwrite(len: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; f32 has no invalid values, and callers write every
    // element before reading it.
    unsafe { v.set_len(len) };
    v
}

/// The f32 elements of a contiguous CPU storage, or an error naming the kernel.
pub(crate) fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, kernel: &str) -> candle_core::Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{kernel} needs f32 inputs"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{kernel} needs contiguous inputs"),
    }
}

/// Runs `f` on the f32 elements of a CPU tensor (made contiguous first).
pub(crate) fn with_f32<T>(t: &Tensor, kernel: &str, f: impl FnOnce(&[f32]) -> candle_core::Result<T>) -> candle_core::Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(contiguous_f32(s, layout, kernel)?),
        _ => candle_core::bail!("{kernel} runs on the CPU"),
    }
}
