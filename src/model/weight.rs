//! Weight matrices as the forward passes use them: a candle tensor (training, and what
//! inference does not pack), panels of f32, bf16 or f16 weights (inference), or quantized
//! blocks (q8_0 / q4_0, inference only), and the [`WeightFormat`] a model's matrices are
//! stored in.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::{input_err, Result};
use crate::kernels::panels::Panels;
use crate::kernels::{qgemm, qmatvec};
use crate::nn;
use crate::quant::{QKind, QTensor};

/// How the weight matrices of a model are stored (routers, norms, biases and the position
/// embedding always stay f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    F32,
    BF16,
    F16,
    /// GGML block formats: 8 or 4 bits per weight plus an f16 scale per 32.
    Quant(QKind),
}

impl WeightFormat {
    pub const NAMES: &'static str = "f32, bf16, f16, q8_0 or q4_0";

    pub fn parse(s: &str) -> Option<WeightFormat> {
        match s {
            "f32" => Some(WeightFormat::F32),
            "bf16" => Some(WeightFormat::BF16),
            "f16" => Some(WeightFormat::F16),
            _ => QKind::parse(s).map(WeightFormat::Quant),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightFormat::F32 => "f32",
            WeightFormat::BF16 => "bf16",
            WeightFormat::F16 => "f16",
            WeightFormat::Quant(k) => k.name(),
        }
    }

    /// The candle dtype of dense formats.
    pub fn dtype(self) -> Option<DType> {
        match self {
            WeightFormat::F32 => Some(DType::F32),
            WeightFormat::BF16 => Some(DType::BF16),
            WeightFormat::F16 => Some(DType::F16),
            WeightFormat::Quant(_) => None,
        }
    }
}

impl From<DType> for WeightFormat {
    fn from(d: DType) -> Self {
        match d {
            DType::BF16 => WeightFormat::BF16,
            DType::F16 => WeightFormat::F16,
            _ => WeightFormat::F32,
        }
    }
}

impl From<QKind> for WeightFormat {
    fn from(k: QKind) -> Self {
        WeightFormat::Quant(k)
    }
}

/// Weight rows dequantized at a time for a prompt's product (at most 4096 x K f32).
const DEQUANT_ROWS: usize = 4096;

/// `x [.., K] @ w^T` for matrix `e` of a quantized weight. Grouped weights (CPUs with
/// AVX-512 VNNI) take their kernel for any number of rows. Otherwise a few rows (decoding)
/// take the integer kernel on 8-bit activations; more (prompts) the integer GEMM (`qgemm`) on the
/// same 8-bit activations, or, on CPUs without AVX2, f32 products on the weights
/// dequantized DEQUANT_ROWS rows at a time. Either way a given number of rows always takes
/// the same path, so a sequence's result does not depend on what it is batched with.
fn quant_product(x: &Tensor, q: &QTensor, e: usize) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    let m = x.elem_count() / k.max(1);
    if q.grouped || m <= crate::kernels::matvec::MAX_ROWS || k != q.cols() || e >= q.matrices() {
        return qmatvec::qlinear(x, q, e);
    }
    if qgemm::available() {
        return qmatvec::qlinear_with(x, q, e, |xs, m, k, w, n| qgemm::product(q.kind, xs, m, k, w, n));
    }
    let x2 = x.reshape((m, k))?;
    let (n, rb) = (q.rows(), q.kind.row_bytes(k));
    let bytes = q.matrix(e);
    let mut parts = Vec::with_capacity(n.div_ceil(DEQUANT_ROWS));
    for r0 in (0..n).step_by(DEQUANT_ROWS) {
        let rows = DEQUANT_ROWS.min(n - r0);
        let w = crate::quant::dequantize(q.kind, &bytes[r0 * rb..(r0 + rows) * rb]);
        let w = Tensor::from_vec(w, (rows, k), x.device())?;
        parts.push(nn::linear(&x2, &w, None)?);
    }
    let y = if parts.len() == 1 { parts.pop().expect("one part") } else { Tensor::cat(&parts, 1)? };
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = n;
    Ok(y.reshape(out)?)
}

/// `x [.., K] @ w^T` for matrix `e` of packed f32 weights, any number of rows.
fn panels_product(x: &Tensor, p: &Panels, e: usize) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    if k != p.cols() || e >= p.matrices() {
        return Err(input_err!("x is {dims:?} but the weight is {} matrices of [{}, {}] (matrix {e})", p.matrices(), p.rows(), p.cols()));
    }
    let m = x.elem_count() / k.max(1);
    // The activations read in place (no copy of a prompt's rows).
    let y = if m == 0 { Vec::new() } else { crate::kernels::with_f32(&x.to_dtype(DType::F32)?, "panels", |xs| Ok(p.product(e, xs, m)))? };
    let mut out = dims.to_vec();
    *out.last_mut().expect("rank >= 1") = p.rows();
    Ok(Tensor::from_vec(y, out, x.device())?)
}

/// One weight: a tensor, quantized blocks, or panels. Linear weights are [N, K] (torch's [out, in])
/// either way; expert stacks are [E, K, N] as tensors (nanoMoE's layout, what training
/// takes) and [E, N, K] in the inference layout and when quantized (the blocks run along
/// what a product sums over, as in GGUF's `*_exps`).
#[derive(Clone)]
pub enum Mat {
    Dense(Tensor),
    /// An expert stack [E, N, K] (see `ParamStore::into_inference_layout`).
    DenseNk(Tensor),
    Quant(Arc<QTensor>),
    /// f32, bf16 or f16 weights for inference: [N, K] matrices (or an expert stack
    /// [E, N, K]) in panels of 48 rows, the layout of the batch-invariant product kernel
    /// (`kernels::panels`).
    Panels(Arc<Panels>),
}

impl Mat {
    pub fn detached(&self) -> Self {
        match self {
            Mat::Dense(t) => Mat::Dense(t.detach()),
            Mat::DenseNk(t) => Mat::DenseNk(t.detach()),
            Mat::Quant(q) => Mat::Quant(q.clone()),
            Mat::Panels(p) => Mat::Panels(p.clone()),
        }
    }

    /// The tensor, for what needs one (training and its losses).
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Mat::Dense(t) => Ok(t),
            Mat::DenseNk(_) => Err(input_err!("the experts are in the inference layout ([experts, out, in]); load the model with `from_pretrained` to train")),
            Mat::Quant(q) => Err(input_err!("{} weights are for inference only; load the model in f32 to train", q.kind.name())),
            Mat::Panels(_) => Err(input_err!("the weights are packed for inference; load the model with `from_pretrained` to train")),
        }
    }

    pub fn format(&self) -> WeightFormat {
        match self {
            Mat::Dense(t) | Mat::DenseNk(t) => t.dtype().into(),
            Mat::Quant(q) => WeightFormat::Quant(q.kind),
            Mat::Panels(p) => p.elem().dtype().into(),
        }
    }

    /// `x @ w^T + b` for a linear weight [N, K]; x [.., K].
    pub fn linear(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        self.linear_in(x, b, crate::kernels::Precision::F32)
    }

    /// [`Mat::linear`] with dense products in the given precision (training).
    pub fn linear_in(&self, x: &Tensor, b: Option<&Tensor>, prec: crate::kernels::Precision) -> Result<Tensor> {
        match self {
            Mat::Dense(w) | Mat::DenseNk(w) => nn::linear_in(x, w, b, prec),
            Mat::Quant(_) | Mat::Panels(_) => {
                let y = self.expert(x, 0)?;
                match b {
                    Some(b) => Ok(y.broadcast_add(b)?),
                    None => Ok(y),
                }
            }
        }
    }

    /// `x [M, K] @` expert `e`'s matrix (K -> N).
    pub fn expert(&self, x: &Tensor, e: usize) -> Result<Tensor> {
        match self {
            Mat::Dense(w) => nn::matmul_kn(x, &w.get(e)?),
            Mat::DenseNk(w) => nn::linear(x, &w.get(e)?, None),
            Mat::Quant(q) => quant_product(x, q, e),
            Mat::Panels(p) => panels_product(x, p, e),
        }
    }

    /// Rows `ids` of an embedding [V, C], as f32 [len, C].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Mat::Dense(w) | Mat::DenseNk(w) => Ok(w.index_select(ids, 0)?.to_dtype(DType::F32)?),
            Mat::Quant(q) => gather_rows(ids, q.rows(), q.cols(), |i, o| q.row(i, o)),
            Mat::Panels(p) => gather_rows(ids, p.rows(), p.cols(), |i, o| p.row(0, i, o)),
        }
    }

    /// Output size of a linear weight (N).
    pub fn out_dim(&self) -> Result<usize> {
        Ok(match self {
            Mat::Dense(w) | Mat::DenseNk(w) => w.dim(0)?,
            Mat::Quant(q) => q.rows(),
            Mat::Panels(p) => p.rows(),
        })
    }
}

/// Rows `ids` of an embedding of `rows` x `cols` held in some other layout, each written by
/// `row(i, out)`: f32 [len, cols].
fn gather_rows(ids: &Tensor, rows: usize, cols: usize, row: impl Fn(usize, &mut [f32])) -> Result<Tensor> {
    let ids: Vec<u32> = ids.to_vec1()?;
    let mut out = vec![0f32; ids.len() * cols];
    for (o, &i) in out.chunks_mut(cols.max(1)).zip(&ids) {
        if i as usize >= rows {
            return Err(input_err!("token id {i} is out of range for an embedding of {rows} rows"));
        }
        row(i as usize, o);
    }
    Ok(Tensor::from_vec(out, (ids.len(), cols), &candle_core::Device::Cpu)?)
}

/// One product of [`expert_products`]: rows `x` [m, K] times expert `e`'s matrix of `w`.
pub struct ExpertJob<'a> {
    pub w: &'a Mat,
    pub e: usize,
    pub x: &'a [f32],
    pub m: usize,
}

/// The rows of one [N, K] matrix as the block kernels read them.
enum Rows<'a> {
    F32(&'a [f32]),
    BF16(&'a [half::bf16]),
    F16(&'a [half::f16]),
    Quant(QKind, bool, &'a [u8], qmatvec::QActs),
    Panels(&'a Panels),
}

impl Mat {
    /// Whether the matrices are [N, K] with the output rows whole: an expert stack in the
    /// inference layout, quantized, or in panels.
    pub fn is_nk(&self) -> bool {
        matches!(self, Mat::DenseNk(_) | Mat::Quant(_) | Mat::Panels(_))
    }
}

/// Several experts' decoding products (each at most [`MAX_ROWS`](crate::kernels::matvec::MAX_ROWS)
/// rows, weights [E, N, K]: [`Mat::is_nk`]) in one parallel pass over blocks of all their
/// outputs, instead of one pass per product: a MoE layer decoding 16 sequences runs up to
/// 16 small products per projection, each of which alone splits too thinly to keep the
/// threads on the weights. Results are those of [`Mat::expert`], bit for bit (the block
/// kernels sum each output the same way in any block). None when a job does not qualify.
pub fn expert_products(jobs: &[ExpertJob], k: usize) -> Result<Option<Vec<Vec<f32>>>> {
    use rayon::prelude::*;
    if jobs.iter().any(|j| !j.w.is_nk() || j.m > crate::kernels::matvec::MAX_ROWS || j.x.len() != j.m * k) {
        return Ok(None);
    }
    // One read guard per distinct dense stack, held over the pass.
    let mut guards = Vec::new();
    for j in jobs {
        if let Mat::DenseNk(t) = j.w {
            if !guards.iter().any(|(p, _)| std::ptr::eq(*p, t)) {
                guards.push((t as *const Tensor, t.storage_and_layout()));
            }
        }
    }
    let mut rows = Vec::with_capacity(jobs.len());
    let mut sizes = Vec::with_capacity(jobs.len());
    for j in jobs {
        let (r, n) = match j.w {
            Mat::Quant(q) => {
                if q.cols() != k || j.e >= q.matrices() {
                    return Err(input_err!("expert products: {:?} matrix {} for rows of {k}", q.shape, j.e));
                }
                (Rows::Quant(q.kind, q.grouped, q.matrix(j.e), qmatvec::quantize_acts(j.x, j.m, k)), q.rows())
            }
            Mat::DenseNk(t) => {
                let (e, n, kk) = t.dims3()?;
                if kk != k || j.e >= e {
                    return Err(input_err!("expert products: {:?} matrix {} for rows of {k}", t.dims(), j.e));
                }
                let (storage, layout) = &guards.iter().find(|(p, _)| std::ptr::eq(*p, t)).expect("a guard per stack").1;
                let Some((a, _)) = layout.contiguous_offsets() else { return Ok(None) };
                let (a, b) = (a + j.e * n * k, a + (j.e + 1) * n * k);
                let r = match &**storage {
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F32(w)) => Rows::F32(&w[a..b]),
                    candle_core::Storage::Cpu(candle_core::CpuStorage::BF16(w)) => Rows::BF16(&w[a..b]),
                    candle_core::Storage::Cpu(candle_core::CpuStorage::F16(w)) => Rows::F16(&w[a..b]),
                    _ => return Ok(None),
                };
                (r, n)
            }
            Mat::Panels(p) => {
                if p.cols() != k || j.e >= p.matrices() {
                    return Err(input_err!("expert products: {} matrices of [{}, {}], matrix {} for rows of {k}", p.matrices(), p.rows(), p.cols(), j.e));
                }
                (Rows::Panels(p), p.rows())
            }
            Mat::Dense(_) => unreachable!("checked: [E, N, K] weights only"),
        };
        rows.push(r);
        sizes.push(n);
    }
    // Blocks of a multiple of 16 outputs, about one per thread and product (whole weight
    // rows either way): the products themselves keep every thread busy.
    let threads = rayon::current_num_threads().max(1);
    let tasks: Vec<(usize, usize, usize)> = sizes
        .iter()
        .enumerate()
        .flat_map(|(i, &n)| {
            // Packed weights: whole panels.
            let unit = if matches!(rows[i], Rows::Panels(_)) { crate::kernels::panels::WIDTH } else { 16 };
            let size = (n.div_ceil(threads).div_ceil(unit) * unit).max(64usize.div_ceil(unit) * unit).min(n.max(1));
            (0..n).step_by(size.max(1)).map(move |n0| (i, n0, size.min(n - n0)))
        })
        .collect();
    let parts: Vec<Vec<f32>> = tasks
        .par_iter()
        .map(|&(i, n0, len)| {
            let (j, n) = (&jobs[i], sizes[i]);
            // Whole panels, written straight into a block of their own.
            if let Rows::Panels(p) = &rows[i] {
                let p0 = n0 / crate::kernels::panels::WIDTH;
                return p.block(j.e, j.x, j.m, p0, (n0 + len).div_ceil(crate::kernels::panels::WIDTH));
            }
            let mut out = vec![0f32; j.m * len];
            match &rows[i] {
                Rows::F32(w) => crate::kernels::matvec::block_nk_fn::<f32>()(j.x, j.m, k, w, n, n0, &mut out),
                Rows::BF16(w) => crate::kernels::matvec::block_nk_fn::<half::bf16>()(j.x, j.m, k, w, n, n0, &mut out),
                Rows::F16(w) => crate::kernels::matvec::block_nk_fn::<half::f16>()(j.x, j.m, k, w, n, n0, &mut out),
                Rows::Quant(kind, grouped, w, acts) => qmatvec::block_fn(*kind, *grouped)(acts, w, kind.row_bytes(k), n0, &mut out),
                Rows::Panels(_) => {} // returned above
            }
            out
        })
        .collect();
    let mut outs: Vec<Vec<f32>> = jobs.iter().zip(&sizes).map(|(j, &n)| vec![0f32; j.m * n]).collect();
    for (&(i, n0, len), part) in tasks.iter().zip(&parts) {
        let n = sizes[i];
        for r in 0..jobs[i].m {
            outs[i][r * n + n0..r * n + n0 + len].copy_from_slice(&part[r * len..(r + 1) * len]);
        }
    }
    drop(rows);
    drop(guards);
    Ok(Some(outs))
}
