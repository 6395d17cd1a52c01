//! RMSNorm (Zhang & Sennrich 2019) over the last dimension in one pass per row, with or
//! without a weight (the seed's block norms have one, its QK-norm has none), and a one-pass
//! backward: with xhat = x * rstd and dxhat = dy * w,
//! dx = rstd * (dxhat - xhat * mean(dxhat * xhat)), dw = sum over rows of dy * xhat.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::math::multiversion;
use crate::kernels::{contiguous_f32, with_f32};

const NAME: &str = "fused rms norm";
/// Rows per block of the weight gradient's fixed-order sum (same bits whatever the threads).
const ROWS: usize = 64;

/// 1 / sqrt(mean(x^2) + eps) of a row.
#[inline(always)]
fn rstd(row: &[f32], eps: f32) -> f32 {
    let mut acc = [0f32; 16];
    let split = row.len() / 16 * 16;
    for c in row[..split].chunks_exact(16) {
        for i in 0..16 {
            acc[i] += c[i] * c[i];
        }
    }
    let ss = acc.iter().sum::<f32>() + row[split..].iter().map(|&v| v * v).sum::<f32>();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

#[inline(always)]
fn forward_row_body(row: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32]) {
    let r = rstd(row, eps);
    match w {
        Some(w) => {
            for ((o, &v), &g) in out.iter_mut().zip(row).zip(w) {
                *o = v * r * g;
            }
        }
        None => {
            for (o, &v) in out.iter_mut().zip(row) {
                *o = v * r;
            }
        }
    }
}

/// dx of one row; with a weight, its gradient accumulated into `acc`.
#[inline(always)]
fn backward_row_body(row: &[f32], drow: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32], acc: &mut [f32]) {
    let c = row.len();
    let r = rstd(row, eps);
    let mut m = [0f32; 16];
    let split = c / 16 * 16;
    let dxhat = |j: usize| match w {
        Some(w) => drow[j] * w[j],
        None => drow[j],
    };
    for j0 in (0..split).step_by(16) {
        for l in 0..16 {
            let j = j0 + l;
            m[l] += dxhat(j) * row[j] * r;
        }
    }
    let mut s = m.iter().sum::<f32>();
    for j in split..c {
        s += dxhat(j) * row[j] * r;
    }
    let mean = s / c as f32;
    for j in 0..c {
        let xhat = row[j] * r;
        out[j] = r * (dxhat(j) - xhat * mean);
    }
    if w.is_some() {
        for j in 0..c {
            acc[j] += drow[j] * row[j] * r;
        }
    }
}

multiversion!(fn forward_row(row: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32]) => forward_row_body);
multiversion!(fn backward_row(row: &[f32], drow: &[f32], w: Option<&[f32]>, eps: f32, out: &mut [f32], acc: &mut [f32]) => backward_row_body);

fn forward(x: &[f32], w: Option<&[f32]>, c: usize, eps: f32) -> Vec<f32> {
    let mut y = crate::kernels::for_overwrite(x.len());
    y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(out, row)| forward_row(row, w, eps, out));
    y
}

/// (dx, dw): dw summed over fixed blocks of rows, then over the blocks in order.
fn backward(x: &[f32], dy: &[f32], w: Option<&[f32]>, c: usize, eps: f32) -> (Vec<f32>, Vec<f32>) {
    let mut dx = crate::kernels::for_overwrite(x.len());
    let partial: Vec<Vec<f32>> = dx
        .par_chunks_mut(c * ROWS)
        .zip(x.par_chunks(c * ROWS))
        .zip(dy.par_chunks(c * ROWS))
        .map(|((out, rows), drows)| {
            let mut acc = vec![0f32; if w.is_some() { c } else { 0 }];
            for ((o, row), drow) in out.chunks_mut(c).zip(rows.chunks(c)).zip(drows.chunks(c)) {
                backward_row(row, drow, w, eps, o, &mut acc);
            }
            acc
        })
        .collect();
    let mut dw = vec![0f32; if w.is_some() { c } else { 0 }];
    for p in &partial {
        dw.iter_mut().zip(p).for_each(|(a, b)| *a += b);
    }
    (dx, dw)
}

/// With a weight: x [.., C], w [C].
struct RmsNormOp {
    eps: f32,
}

impl CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (contiguous_f32(s1, l1, NAME)?, contiguous_f32(s2, l2, NAME)?);
        Ok((CpuStorage::F32(forward(x, Some(w), w.len(), self.eps)), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw) = with_f32(x, NAME, |xs| with_f32(w, NAME, |ws| with_f32(dy, NAME, |dys| Ok(backward(xs, dys, Some(ws), ws.len(), self.eps)))))?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

/// Without a weight (QK-norm): rows of `c` elements.
struct RmsNormNoWeightOp {
    eps: f32,
    c: usize,
}

impl CustomOp1 for RmsNormNoWeightOp {
    fn name(&self) -> &'static str {
        "fused-rms-norm-no-weight"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, NAME)?;
        Ok((CpuStorage::F32(forward(x, None, self.c, self.eps)), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (dx, _) = with_f32(x, NAME, |xs| with_f32(dy, NAME, |dys| Ok(backward(xs, dys, None, self.c, self.eps))))?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// RMSNorm over the last dimension of an f32 CPU tensor, with an optional weight.
pub fn fused_rms_norm(x: &Tensor, w: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    Ok(match w {
        Some(w) => x.apply_op2(&w.contiguous()?, RmsNormOp { eps: eps as f32 })?,
        None => {
            let c = x.dims().last().copied().unwrap_or(1).max(1);
            x.apply_op1(RmsNormNoWeightOp { eps: eps as f32, c })?
        }
    })
}

/// QK-norm on a fused qkv projection [.., 3C]: every head's q and k (the first 2C columns,
/// in chunks of `head_dim`) RMS-normalised without a weight, v passed through - one op, so
/// the fused attention still reads one qkv tensor.
struct QkNormOp {
    eps: f32,
    c: usize,
    head_dim: usize,
}

impl QkNormOp {
    fn rows(&self, x: &[f32], f: impl Fn(&[f32], &mut [f32]) + Sync + Send) -> Vec<f32> {
        let (c3, hd) = (3 * self.c, self.head_dim);
        let mut y = crate::kernels::for_overwrite(x.len());
        y.par_chunks_mut(c3).zip(x.par_chunks(c3)).for_each(|(out, row)| {
            for (o, r) in out[..2 * self.c].chunks_mut(hd).zip(row[..2 * self.c].chunks(hd)) {
                f(r, o);
            }
            out[2 * self.c..].copy_from_slice(&row[2 * self.c..]);
        });
        y
    }
}

impl CustomOp1 for QkNormOp {
    fn name(&self) -> &'static str {
        "fused-qk-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, NAME)?;
        let eps = self.eps;
        Ok((CpuStorage::F32(self.rows(x, |r, o| forward_row(r, None, eps, o))), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (c3, c, hd, eps) = (3 * self.c, self.c, self.head_dim, self.eps);
        let dx = with_f32(x, NAME, |xs| {
            with_f32(dy, NAME, |dys| {
                let mut dx = crate::kernels::for_overwrite(xs.len());
                dx.par_chunks_mut(c3).zip(xs.par_chunks(c3).zip(dys.par_chunks(c3))).for_each(|(out, (row, drow))| {
                    for ((o, r), d) in out[..2 * c].chunks_mut(hd).zip(row[..2 * c].chunks(hd)).zip(drow[..2 * c].chunks(hd)) {
                        backward_row(r, d, None, eps, o, &mut []);
                    }
                    out[2 * c..].copy_from_slice(&drow[2 * c..]);
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// [`fused_rms_norm`] with a weight, as a stage of a residual chain (`kernels::residual`).
pub(crate) fn stage(w: &Tensor, eps: f64) -> crate::kernels::residual::Stage {
    crate::kernels::residual::Stage::Op2(Box::new(RmsNormOp { eps: eps as f32 }), w.clone())
}

/// [`fused_qk_norm`] on a qkv tensor of width 3 `c`, as a stage of a residual chain.
pub(crate) fn qk_stage(c: usize, head_dim: usize, eps: f64) -> crate::kernels::residual::Stage {
    crate::kernels::residual::Stage::Op1(Box::new(QkNormOp { eps: eps as f32, c, head_dim }))
}

/// QK-norm of an f32 CPU qkv tensor [.., 3C] with heads of `head_dim`.
pub fn fused_qk_norm(qkv: &Tensor, head_dim: usize, eps: f64) -> Result<Tensor> {
    let c3 = qkv.dims().last().copied().unwrap_or(0);
    if c3 % 3 != 0 || head_dim == 0 || (c3 / 3) % head_dim != 0 {
        return Err(crate::error::Error::Msg(format!("qk norm: last dimension {c3} is not 3 x a multiple of head_dim {head_dim}")));
    }
    Ok(qkv.contiguous()?.apply_op1(QkNormOp { eps: eps as f32, c: c3 / 3, head_dim })?)
}
