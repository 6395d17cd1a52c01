//! The output layer and the cross-entropy in one op: loss = mean over rows of
//! logsumexp(h w^T) - (h w^T)[target]. The forward turns the logits buffer in place into
//! the loss's gradient with respect to them, (softmax - onehot) / count, and keeps it; the
//! backward is then two products, dh = g D w and dw = g D^T h. Compared with a separate
//! lm_head and cross-entropy this saves the logits' gradient tensor and candle's zero-filled
//! accumulator for it - with GPT-2's vocabulary, three passes over a [tokens, 50257] buffer
//! per step (Liger Kernel and llm.c fuse the same way).

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::cross_entropy::{encode_targets, IGNORE};
use crate::kernels::math::{self, multiversion};
use crate::kernels::{contiguous_f32, mm_in, with_f32, Precision};

const NAME: &str = "fused linear cross-entropy";

struct LinearCrossEntropy {
    targets: Arc<Vec<u32>>,
    count: usize,
    prec: Precision,
    /// (softmax - onehot) / count of every row, [N, V], from the forward.
    grad_logits: Mutex<Option<Vec<f32>>>,
}

/// One row of logits -> its loss; the row becomes (softmax - onehot) * inv_count.
#[inline(always)]
fn row_body(row: &mut [f32], target: usize, inv_count: f32) -> f32 {
    let max = math::max(row);
    let picked = row[target];
    row.iter_mut().for_each(|v| *v = math::exp(*v - max));
    let sum = math::sum(row);
    let scale = inv_count / sum;
    row.iter_mut().for_each(|v| *v *= scale);
    row[target] -= inv_count;
    max + sum.ln() - picked
}

multiversion!(fn row_loss(row: &mut [f32], target: usize, inv_count: f32) -> f32 => row_body);


impl CustomOp2 for LinearCrossEntropy {
    fn name(&self) -> &'static str {
        "fused-linear-cross-entropy"
    }

    fn cpu_fwd(&self, sh: &CpuStorage, lh: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (h, w) = (contiguous_f32(sh, lh, NAME)?, contiguous_f32(sw, lw, NAME)?);
        let (n, c) = lh.shape().dims2()?;
        let (v, c2) = lw.shape().dims2()?;
        if c != c2 || n != self.targets.len() {
            candle_core::bail!("{NAME}: h {:?}, w {:?}, {} targets", lh.dims(), lw.dims(), self.targets.len());
        }
        let mut logits = vec![0f32; n * v];
        // logits = h w^T
        unsafe { mm_in(self.prec, n, v, c, logits.as_mut_ptr(), v, h.as_ptr(), c, 1, w.as_ptr(), 1, c, 1.0, rayon::current_num_threads()) };
        let inv = 1.0 / self.count as f32;
        let losses: Vec<f64> = logits
            .par_chunks_mut(v)
            .zip(self.targets.par_iter())
            .map(|(row, &t)| {
                if t == IGNORE {
                    row.fill(0.0);
                    0.0
                } else {
                    row_loss(row, t as usize, inv) as f64
                }
            })
            .collect();
        // Summed in row order: the same bits whatever the scheduling.
        let total: f64 = losses.iter().sum();
        *self.grad_logits.lock().unwrap_or_else(|e| e.into_inner()) = Some(logits);
        Ok((CpuStorage::F32(vec![(total / self.count as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, h: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = grad.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let saved = self.grad_logits.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(d) = saved else { candle_core::bail!("{NAME}: backward ran twice or before the forward") };
        let (n, c) = h.dims2()?;
        let v = w.dim(0)?;
        let (dh, dw) = with_f32(h, NAME, |hs| {
            with_f32(w, NAME, |ws| {
                let mut dh = vec![0f32; n * c];
                let mut dw = vec![0f32; v * c];
                unsafe {
                    // dh = g D w: [n x v] [v x c]
                    mm_in(self.prec, n, c, v, dh.as_mut_ptr(), c, d.as_ptr(), v, 1, ws.as_ptr(), c, 1, g, rayon::current_num_threads());
                    // dw = g D^T h: [v x n] [n x c]
                    mm_in(self.prec, v, c, n, dw.as_mut_ptr(), c, d.as_ptr(), 1, v, hs.as_ptr(), c, 1, g, rayon::current_num_threads());
                }
                Ok((dh, dw))
            })
        })?;
        Ok((Some(Tensor::from_vec(dh, (n, c), h.device())?), Some(Tensor::from_vec(dw, (v, c), w.device())?)))
    }
}

/// Mean cross-entropy of the logits `h [N, C] @ w^T` (w [V, C], f32 CPU) against `targets`
/// (`None` = ignored), without returning the logits; `None` when every target is ignored.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[Option<u32>]) -> Result<Option<Tensor>> {
    linear_cross_entropy_in(h, w, targets, Precision::F32)
}

/// [`linear_cross_entropy`] with the output layer's products in the given precision (the
/// softmax and the loss stay f32).
pub fn linear_cross_entropy_in(h: &Tensor, w: &Tensor, targets: &[Option<u32>], prec: Precision) -> Result<Option<Tensor>> {
    let (n, _) = h.dims2()?;
    if n != targets.len() {
        return Err(Error::Input(format!("{} targets for {n} rows", targets.len())));
    }
    let (t, count) = encode_targets(targets);
    if count == 0 {
        return Ok(None);
    }
    let op = LinearCrossEntropy { targets: Arc::new(t), count, prec, grad_logits: Mutex::new(None) };
    Ok(Some(h.contiguous()?.apply_op2(&w.contiguous()?, op)?))
}
