//! LayerNorm (without its bias, which is a cheap broadcast add) in one pass per row, with a
//! one-pass backward: dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat)),
//! dw = sum over rows of dy * xhat, where dxhat = dy * w.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::math::{self, multiversion};
use crate::kernels::{contiguous_f32, with_f32};

const NAME: &str = "fused layer norm";

struct LayerNormOp {
    eps: f32,
}

/// (mean, 1 / sqrt(var + eps)) of a row.
#[inline(always)]
fn stats(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = math::sum(row) / n;
    let mut acc = [0f32; 16];
    let split = row.len() / 16 * 16;
    for c in row[..split].chunks_exact(16) {
        for i in 0..16 {
            acc[i] += (c[i] - mean) * (c[i] - mean);
        }
    }
    let var = (acc.iter().sum::<f32>() + row[split..].iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>()) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
fn forward_row_body(row: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let (mean, rstd) = stats(row, eps);
    for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
        *o = (v - mean) * rstd * g;
    }
}

/// dx of one row, and dw accumulated into `acc`.
#[inline(always)]
fn backward_row_body(row: &[f32], drow: &[f32], w: &[f32], eps: f32, out: &mut [f32], acc: &mut [f32]) {
    let c = w.len();
    let (mean, rstd) = stats(row, eps);
    let (mut m1, mut m2) = ([0f32; 16], [0f32; 16]);
    let split = c / 16 * 16;
    for j0 in (0..split).step_by(16) {
        for l in 0..16 {
            let j = j0 + l;
            let xhat = (row[j] - mean) * rstd;
            let dxhat = drow[j] * w[j];
            m1[l] += dxhat;
            m2[l] += dxhat * xhat;
            acc[j] += drow[j] * xhat;
        }
    }
    let (mut s1, mut s2) = (m1.iter().sum::<f32>(), m2.iter().sum::<f32>());
    for j in split..c {
        let xhat = (row[j] - mean) * rstd;
        let dxhat = drow[j] * w[j];
        s1 += dxhat;
        s2 += dxhat * xhat;
        acc[j] += drow[j] * xhat;
    }
    let (m1, m2) = (s1 / c as f32, s2 / c as f32);
    for j in 0..c {
        let xhat = (row[j] - mean) * rstd;
        out[j] = rstd * (drow[j] * w[j] - m1 - xhat * m2);
    }
}

multiversion!(fn forward_row(row: &[f32], w: &[f32], eps: f32, out: &mut [f32]) => forward_row_body);
multiversion!(fn backward_row(row: &[f32], drow: &[f32], w: &[f32], eps: f32, out: &mut [f32], acc: &mut [f32]) => backward_row_body);

impl CustomOp2 for LayerNormOp {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous_f32(s1, l1, NAME)?, contiguous_f32(s2, l2, NAME)?);
        let c = w.len();
        let mut y = crate::kernels::for_overwrite(x.len());
        y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(out, row)| forward_row(row, w, self.eps, out));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let eps = self.eps;
        let (dx, dw) = with_f32(x, NAME, |xs| {
            with_f32(w, NAME, |ws| {
                with_f32(dy, NAME, |dys| {
                    let c = ws.len();
                    let mut dx = crate::kernels::for_overwrite(xs.len());
                    // dw is summed over fixed blocks of rows, then over the blocks in order:
                    // the same bits whatever the thread count or scheduling (exact resume).
                    const ROWS: usize = 64;
                    let partial: Vec<Vec<f32>> = dx
                        .par_chunks_mut(c * ROWS)
                        .zip(xs.par_chunks(c * ROWS))
                        .zip(dys.par_chunks(c * ROWS))
                        .map(|((out, rows), drows)| {
                            let mut acc = vec![0f32; c];
                            for ((o, row), drow) in out.chunks_mut(c).zip(rows.chunks(c)).zip(drows.chunks(c)) {
                                backward_row(row, drow, ws, eps, o, &mut acc);
                            }
                            acc
                        })
                        .collect();
                    let mut dw = vec![0f32; c];
                    for p in &partial {
                        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
                    }
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
        Some(b) => crate::kernels::bias::add_bias(&y, b)?,
        None => y,
    })
}

/// [`fused_layer_norm`] as stages of a residual chain (`kernels::residual`).
pub(crate) fn stages(w: &Tensor, b: Option<&Tensor>, eps: f64) -> Vec<crate::kernels::residual::Stage> {
    let mut s = vec![crate::kernels::residual::Stage::Op2(Box::new(LayerNormOp { eps: eps as f32 }), w.clone())];
    s.extend(b.map(crate::kernels::bias::stage));
    s
}
