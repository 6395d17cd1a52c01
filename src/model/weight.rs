//! Weight matrices as the forward passes use them: a candle tensor (f32 for training; f32,
//! bf16 or f16 for inference), or quantized blocks (q8_0 / q4_0, inference only), and the
//! [`WeightFormat`] a model's matrices are stored in.

use std::sync::Arc;

use candle_core::{DType, Tensor};

use crate::error::{input_err, Result};
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

/// `x [.., K] @ w^T` for matrix `e` of a quantized weight. A few rows (decoding) take the
/// integer kernel on 8-bit activations; more (prompts) the integer GEMM (`qgemm`) on the
/// same 8-bit activations, or, on CPUs without AVX2, f32 products on the weights
/// dequantized DEQUANT_ROWS rows at a time. Either way a given number of rows always takes
/// the same path, so a sequence's result does not depend on what it is batched with.
fn quant_product(x: &Tensor, q: &QTensor, e: usize) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().unwrap_or(&0);
    let m = x.elem_count() / k.max(1);
    if m <= crate::kernels::matvec::MAX_ROWS || k != q.cols() || e >= q.matrices() {
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

/// One weight: a tensor, or quantized blocks. Linear weights are [N, K] (torch's [out, in])
/// either way; expert stacks are [E, K, N] as tensors (nanoMoE's layout) and [E, N, K] when
/// quantized (the blocks run along what a product sums over, as in GGUF's `*_exps`).
#[derive(Clone)]
pub enum Mat {
    Dense(Tensor),
    Quant(Arc<QTensor>),
}

impl Mat {
    pub fn detached(&self) -> Self {
        match self {
            Mat::Dense(t) => Mat::Dense(t.detach()),
            Mat::Quant(q) => Mat::Quant(q.clone()),
        }
    }

    /// The tensor, for what needs one (training and its losses).
    pub fn dense(&self) -> Result<&Tensor> {
        match self {
            Mat::Dense(t) => Ok(t),
            Mat::Quant(q) => Err(input_err!("{} weights are for inference only; load the model in f32 to train", q.kind.name())),
        }
    }

    pub fn format(&self) -> WeightFormat {
        match self {
            Mat::Dense(t) => t.dtype().into(),
            Mat::Quant(q) => WeightFormat::Quant(q.kind),
        }
    }

    /// `x @ w^T + b` for a linear weight [N, K]; x [.., K].
    pub fn linear(&self, x: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        match self {
            Mat::Dense(w) => nn::linear(x, w, b),
            Mat::Quant(q) => {
                let y = quant_product(x, q, 0)?;
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
            Mat::Quant(q) => quant_product(x, q, e),
        }
    }

    /// Rows `ids` of an embedding [V, C], as f32 [len, C].
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        match self {
            Mat::Dense(w) => Ok(w.index_select(ids, 0)?.to_dtype(DType::F32)?),
            Mat::Quant(q) => {
                let c = q.cols();
                let ids: Vec<u32> = ids.to_vec1()?;
                let mut out = vec![0f32; ids.len() * c];
                for (o, &i) in out.chunks_mut(c).zip(&ids) {
                    if i as usize >= q.rows() {
                        return Err(input_err!("token id {i} is out of range for an embedding of {} rows", q.rows()));
                    }
                    q.row(i as usize, o);
                }
                Ok(Tensor::from_vec(out, (ids.len(), c), &candle_core::Device::Cpu)?)
            }
        }
    }

    /// Output size of a linear weight (N).
    pub fn out_dim(&self) -> Result<usize> {
        Ok(match self {
            Mat::Dense(w) => w.dim(0)?,
            Mat::Quant(q) => q.rows(),
        })
    }
}
