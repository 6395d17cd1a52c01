//! Bias addition y = x + b, where x is [G, R, N] (any leading shape) and b holds one
//! [N] row per group g (G = 1 for a linear layer, G = n_exp for the experts' [E, 1, N]
//! biases). candle computes the bias gradient of a broadcast add with a generic strided
//! reduction (a division per element); here db[g] = sum_r dy[g, r] is one pass, and dx
//! is dy itself.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::{contiguous_f32, with_f32};

const NAME: &str = "bias add";

struct AddBias;

fn groups(x: &[usize], b: usize) -> candle_core::Result<(usize, usize, usize)> {
    let n = *x.last().unwrap_or(&1);
    let total: usize = x.iter().product();
    if n == 0 || !b.is_multiple_of(n) || !total.is_multiple_of(b) {
        candle_core::bail!("{NAME}: a bias of {b} elements does not fit x {x:?}");
    }
    let g = b / n;
    Ok((g, total / b, n))
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "bias-add"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sb: &CpuStorage, lb: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, b) = (contiguous_f32(sx, lx, NAME)?, contiguous_f32(sb, lb, NAME)?);
        let (_, r, n) = groups(lx.dims(), b.len())?;
        let mut y = x.to_vec();
        y.par_chunks_mut(n).enumerate().for_each(|(row, out)| {
            let bias = &b[(row / r) * n..(row / r + 1) * n];
            out.iter_mut().zip(bias).for_each(|(o, &v)| *o += v);
        });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, b: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, r, n) = groups(x.dims(), b.elem_count())?;
        let db = with_f32(dy, NAME, |d| {
            Ok((0..g)
                .into_par_iter()
                .flat_map_iter(|gi| {
                    let mut acc = vec![0f32; n];
                    for row in d[gi * r * n..(gi + 1) * r * n].chunks_exact(n) {
                        acc.iter_mut().zip(row).for_each(|(a, &v)| *a += v);
                    }
                    acc
                })
                .collect::<Vec<f32>>())
        })?;
        Ok((Some(dy.clone()), Some(Tensor::from_vec(db, b.shape(), b.device())?)))
    }
}

/// [`add_bias`] as a stage of a residual chain (`kernels::residual`).
pub(crate) fn stage(b: &Tensor) -> crate::kernels::residual::Stage {
    crate::kernels::residual::Stage::Op2(Box::new(AddBias), b.clone())
}

/// x + b for f32 CPU tensors, b one row of x's last dimension per group of leading rows.
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&b.contiguous()?, AddBias)?)
}
