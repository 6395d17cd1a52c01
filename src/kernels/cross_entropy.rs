//! Cross-entropy fused with log-softmax: one pass per row for the forward (max, log-sum-exp,
//! picked logit) and one for the backward ((softmax - onehot) * grad / count, from the
//! log-sum-exp the forward kept), instead of the eight full-size tensors the composite
//! version materialises. Rows are vectorized (math::exp) per instruction set.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::math::{self, multiversion};
use crate::kernels::{contiguous_f32, with_f32};

const NAME: &str = "fused cross-entropy";

/// Target id meaning "ignore this row".
pub(crate) const IGNORE: u32 = u32::MAX;

/// Targets as ids (ignored rows as [`IGNORE`]) and the number of rows that count.
pub(crate) fn encode_targets(targets: &[Option<u32>]) -> (Vec<u32>, usize) {
    let t: Vec<u32> = targets.iter().map(|t| t.unwrap_or(IGNORE)).collect();
    let count = t.iter().filter(|&&x| x != IGNORE).count();
    (t, count)
}

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
    count: usize,
    vocab: usize,
    /// Log-sum-exp of every row, from the forward pass.
    lse: Mutex<Option<Vec<f32>>>,
}

#[inline(always)]
fn row_lse_body(row: &[f32], scratch: &mut [f32]) -> f32 {
    let max = math::max(row);
    scratch.iter_mut().zip(row).for_each(|(e, &v)| *e = math::exp(v - max));
    max + math::sum(scratch).ln()
}

#[inline(always)]
fn row_grad_body(row: &[f32], lse: f32, g: f32, out: &mut [f32]) {
    out.iter_mut().zip(row).for_each(|(o, &x)| *o = math::exp(x - lse) * g);
}

multiversion!(fn row_lse(row: &[f32], scratch: &mut [f32]) -> f32 => row_lse_body);
multiversion!(fn row_grad(row: &[f32], lse: f32, g: f32, out: &mut [f32]) => row_grad_body);

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "fused-cross-entropy"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, NAME)?;
        let v = self.vocab;
        let lse: Vec<f32> = x
            .par_chunks(v)
            .zip(self.targets.par_iter())
            .map_init(|| vec![0f32; v], |scratch, (row, &t)| if t == IGNORE { 0.0 } else { row_lse(row, scratch) })
            .collect();
        let total: f64 = lse
            .iter()
            .zip(x.chunks(v))
            .zip(self.targets.iter())
            .filter(|(_, &t)| t != IGNORE)
            .map(|((&l, row), &t)| (l - row[t as usize]) as f64)
            .sum();
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(vec![(total / self.count as f64) as f32]), Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let g = grad_res.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()? / self.count as f32;
        let v = self.vocab;
        let saved = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let grad = with_f32(arg, NAME, |x| {
            let lse = match saved {
                Some(l) => l,
                None => x.par_chunks(v).map_init(|| vec![0f32; v], |s, row| row_lse(row, s)).collect(),
            };
            let mut grad = vec![0f32; x.len()];
            grad.par_chunks_mut(v).zip(x.par_chunks(v)).zip(self.targets.par_iter().zip(lse.par_iter())).for_each(|((out, row), (&t, &l))| {
                if t == IGNORE {
                    return;
                }
                row_grad(row, l, g, out);
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
    let (t, count) = encode_targets(targets);
    if count == 0 {
        return Ok(None);
    }
    let op = CrossEntropy { targets: Arc::new(t), count, vocab: v, lse: Mutex::new(None) };
    Ok(Some(logits.contiguous()?.apply_op1(op)?))
}
