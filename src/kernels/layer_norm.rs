//! LayerNorm (without its bias, which is a cheap broadcast add) in one pass per row, with a
//! one-pass backward: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
//! dw = sum over rows of dy * xhat, where dxhat = dy * w.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Storage, Tensor};
use rayon::prelude::*;

use crate::error::Result;

struct LayerNormOp {
    eps: f32,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> candle_core::Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("fused layer norm needs f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("fused layer norm needs contiguous inputs"),
    }
}

/// (mean, 1 / sqrt(var + eps)) of a row.
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

fn with_slice<T>(t: &Tensor, f: impl FnOnce(&[f32]) -> candle_core::Result<T>) -> candle_core::Result<T> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    match &*storage {
        Storage::Cpu(s) => f(slice(s, layout)?),
        _ => candle_core::bail!("fused layer norm runs on the CPU"),
    }
}

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (slice(s1, l1)?, slice(s2, l2)?);
        let c = w.len();
        let mut y = vec![0f32; x.len()];
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(out, row)| {
            let (mean, rstd) = stats(row, self.eps);
            for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
                *o = (v - mean) * rstd * g;
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let eps = self.eps;
        let (dx, dw) = with_slice(x, |xs| {
            with_slice(w, |ws| {
                with_slice(dy, |dys| {
                    let c = ws.len();
                    let mut dx = vec![0f32; xs.len()];
                    let dw = dx
                        .par_chunks_mut(c)
                        .zip(xs.par_chunks(c))
                        .zip(dys.par_chunks(c))
                        .fold(
                            || vec![0f32; c],
                            |mut acc, ((out, row), drow)| {
                                let (mean, rstd) = stats(row, eps);
                                let (mut m1, mut m2) = (0f32, 0f32);
                                for j in 0..c {
                                    let xhat = (row[j] - mean) * rstd;
                                    let dxhat = drow[j] * ws[j];
                                    m1 += dxhat;
                                    m2 += dxhat * xhat;
                                    acc[j] += drow[j] * xhat;
                                }
                                let (m1, m2) = (m1 / c as f32, m2 / c as f32);
                                for j in 0..c {
                                    let xhat = (row[j] - mean) * rstd;
                                    out[j] = rstd * (drow[j] * ws[j] - m1 - xhat * m2);
                                }
                                acc
                            },
                        )
                        .reduce(|| vec![0f32; c], |mut a, b| {
                            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                            a
                        });
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

/// LayerNorm over the last dimension of an f32 CPU tensor, weight `w`, optional bias `b`.
pub fn fused_layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let y = x.contiguous()?.apply_op2(&w.contiguous()?, LayerNormOp { eps: eps as f32 })?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}
