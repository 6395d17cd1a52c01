//! SwiGLU's gating (Shazeer 2020, "GLU Variants Improve Transformer"): y = silu(g) * u,
//! element-wise, in one pass, with a one-pass backward for both inputs:
//! dg = dy * u * s * (1 + g * (1 - s)) with s = sigmoid(g), du = dy * g * s.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::math::{self, multiversion};
use crate::kernels::{contiguous_f32, with_f32};

const NAME: &str = "fused swiglu";
/// Elements per parallel task.
const CHUNK: usize = 8192;

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + math::exp(-x))
}

#[inline(always)]
fn forward_body(g: &[f32], u: &[f32], y: &mut [f32]) {
    let n = y.len().min(g.len()).min(u.len());
    let (g, u, y) = (&g[..n], &u[..n], &mut y[..n]);
    for i in 0..n {
        y[i] = g[i] * sigmoid(g[i]) * u[i];
    }
}

#[inline(always)]
fn backward_body(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    let n = dg.len().min(du.len()).min(g.len()).min(u.len()).min(dy.len());
    let (g, u, dy, dg, du) = (&g[..n], &u[..n], &dy[..n], &mut dg[..n], &mut du[..n]);
    for i in 0..n {
        let s = sigmoid(g[i]);
        du[i] = dy[i] * g[i] * s;
        dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
    }
}

multiversion!(fn forward_slice(g: &[f32], u: &[f32], y: &mut [f32]) => forward_body);
multiversion!(fn backward_slice(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) => backward_body);

/// y = silu(g) * u over slices (single-threaded: for kernels that already run a task per
/// thread).
pub(crate) fn forward_into(g: &[f32], u: &[f32], y: &mut [f32]) {
    forward_slice(g, u, y)
}

/// dg, du of y = silu(g) * u for the incoming dy, over slices (single-threaded).
pub(crate) fn backward_into(g: &[f32], u: &[f32], dy: &[f32], dg: &mut [f32], du: &mut [f32]) {
    backward_slice(g, u, dy, dg, du)
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "fused-swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (g, u) = (contiguous_f32(s1, l1, NAME)?, contiguous_f32(s2, l2, NAME)?);
        if g.len() != u.len() {
            candle_core::bail!("{NAME}: gate and up have {} and {} elements", g.len(), u.len());
        }
        let mut y = vec![0f32; g.len()];
        y.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK).zip(u.par_chunks(CHUNK))).for_each(|(o, (g, u))| forward_slice(g, u, o));
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(&self, g: &Tensor, u: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (dg, du) = with_f32(g, NAME, |gs| {
            with_f32(u, NAME, |us| {
                with_f32(dy, NAME, |dys| {
                    let (mut dg, mut du) = (vec![0f32; gs.len()], vec![0f32; gs.len()]);
                    dg.par_chunks_mut(CHUNK)
                        .zip(du.par_chunks_mut(CHUNK))
                        .zip(gs.par_chunks(CHUNK).zip(us.par_chunks(CHUNK)).zip(dys.par_chunks(CHUNK)))
                        .for_each(|((dg, du), ((g, u), dy))| backward_slice(g, u, dy, dg, du));
                    Ok((dg, du))
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dg, g.shape(), g.device())?), Some(Tensor::from_vec(du, u.shape(), u.device())?)))
    }
}

/// silu(gate) * up of two f32 CPU tensors of one shape.
pub fn fused_swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.shape() != up.shape() {
        return Err(crate::error::Error::Msg(format!("swiglu: gate {:?} and up {:?} differ in shape", gate.dims(), up.dims())));
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu)?)
}
