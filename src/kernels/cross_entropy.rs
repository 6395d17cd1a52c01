//! Cross-entropy fused with log-softmax: one pass per row for the forward (max, log-sum-exp,
//! picked logit) and one for the backward ((softmax - onehot) * grad / count), instead of
//! the eight full-size tensors the composite version materialises.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::{contiguous_f32, with_f32};

const NAME: &str = "fused cross-entropy";

/// Target id meaning "ignore this row".
const IGNORE: u32 = u32::MAX;

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
    count: usize,
    vocab: usize,
}

fn row_lse(row: &[f32]) -> f32 {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = row.iter().map(|&v| (v - max).exp()).sum();
    max + sum.ln()
}

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, NAME)?;
        let v = self.vocab;
        let total: f64 = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .filter(|(_, &t)| t != IGNORE)
            .map(|(row, &t)| (row_lse(row) - row[t as usize]) as f64)
            .sum();
        Ok((CpuStorage::F32(vec![(total / self.count as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? / self.count as f32;
        let v = self.vocab;
        let grad = with_f32(arg, NAME, |x| {
            let mut grad = vec![0f32; x.len()];
            grad.par_chunks_mut(v).zip(x.par_chunks(v)).zip(self.targets.par_iter()).for_each(|((out, row), &t)| {
                if t == IGNORE {
                    return;
                }
                let lse = row_lse(row);
                for (o, &xi) in out.iter_mut().zip(row) {
                    *o = (xi - lse).exp() * g;
                }
                out[t as usize] -= g;
            });
            Ok(grad)
        })?;
        Ok(Some(Tensor::from_vec(grad, arg.shape(), arg.device())?))
    }
}

/// Mean cross-entropy of f32 CPU `logits` [N, V] against `targets` (`None` = ignored), or
/// `None` when every target is ignored.
pub fn cross_entropy(logits: &Tensor, targets: &[Option<u32>]) -> Result<Option<Tensor>> {
    let (n, v) = logits.dims2()?;
    if n != targets.len() {
        return Err(Error::Input(format!("{} targets for {n} rows of logits", targets.len())));
    }
    let t: Vec<u32> = targets.iter().map(|t| t.unwrap_or(IGNORE)).collect();
    let count = t.iter().filter(|&&x| x != IGNORE).count();
    if count == 0 {
        return Ok(None);
    }
    let op = CrossEntropy { targets: Arc::new(t), count, vocab: v };
    Ok(Some(logits.contiguous()?.apply_op1(op)?))
}
