//! The MLP activations - GELU (tanh approximation or exact erf) and ReLU^2 (the seed's) -
//! as one element-wise pass, with a one-pass backward dx = dy * act'(x), instead of
//! candle's graph of composite ops. The loops use the vectorizable exp/tanh/erf of `math`
//! and are compiled per instruction set.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::config::Activation;
use crate::error::Result;
use crate::kernels::contiguous_f32;
use crate::kernels::math::{self, multiversion};

const NAME: &str = "fused gelu";
const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;
/// Elements per parallel task.
const CHUNK: usize = 8192;

#[inline(always)]
fn gelu_tanh(x: f32) -> f32 {
    0.5 * x * (1.0 + math::tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))
}

#[inline(always)]
fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + math::erf(x * INV_SQRT_2))
}

#[inline(always)]
fn gelu_tanh_grad(x: f32) -> f32 {
    let t = math::tanh(SQRT_2_OVER_PI * (x + 0.044715 * x * x * x));
    0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
}

/// Phi(x) + x phi(x), with the one exp(-x^2 / 2) that erf(x / sqrt 2) and phi share.
#[inline(always)]
fn gelu_erf_grad(x: f32) -> f32 {
    let a = (x * INV_SQRT_2).abs();
    let e = math::exp(-a * a);
    0.5 * (1.0 + math::erf_with_exp(a, e).copysign(x)) + x * e * INV_SQRT_2PI
}

// Plain index loops: with iterator adapters (a zip of zips) LLVM kept the adapter's `fold`
// out of line - compiled without the caller's AVX-512 - and the exact GELU's backward ran
// scalar (7 % of a training step).
#[inline(always)]
fn forward_body(x: &[f32], y: &mut [f32], mode: u8) {
    let n = y.len().min(x.len());
    let (x, y) = (&x[..n], &mut y[..n]);
    if mode == RELU2 {
        for i in 0..n {
            let r = x[i].max(0.0);
            y[i] = r * r;
        }
    } else if mode == ERF {
        for i in 0..n {
            y[i] = gelu_erf(x[i]);
        }
    } else {
        for i in 0..n {
            y[i] = gelu_tanh(x[i]);
        }
    }
}

#[inline(always)]
fn backward_body(x: &[f32], dy: &[f32], dx: &mut [f32], mode: u8) {
    let n = dx.len().min(x.len()).min(dy.len());
    let (x, dy, dx) = (&x[..n], &dy[..n], &mut dx[..n]);
    if mode == RELU2 {
        for i in 0..n {
            dx[i] = dy[i] * 2.0 * x[i].max(0.0);
        }
    } else if mode == ERF {
        for i in 0..n {
            dx[i] = dy[i] * gelu_erf_grad(x[i]);
        }
    } else {
        for i in 0..n {
            dx[i] = dy[i] * gelu_tanh_grad(x[i]);
        }
    }
}

multiversion!(fn forward_slice(x: &[f32], y: &mut [f32], mode: u8) => forward_body);
multiversion!(fn backward_slice(x: &[f32], dy: &[f32], dx: &mut [f32], mode: u8) => backward_body);

const TANH: u8 = 0;
const ERF: u8 = 1;
const RELU2: u8 = 2;

fn mode(act: Activation) -> u8 {
    match act {
        Activation::GeluTanh => TANH,
        Activation::GeluErf => ERF,
        Activation::Relu2 => RELU2,
    }
}

struct Gelu(Activation);
struct GeluBackward(Activation);

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, NAME)?;
        let m = mode(self.0);
        let mut y = crate::kernels::for_overwrite(x.len());
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, i)| forward_slice(i, o, m));
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad_res.contiguous()?, &GeluBackward(self.0))?))
    }
}

impl CustomOp2 for GeluBackward {
    fn name(&self) -> &'static str {
        "fused-gelu-backward"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, dy) = (contiguous_f32(s1, l1, NAME)?, contiguous_f32(s2, l2, NAME)?);
        let m = mode(self.0);
        let mut dx = crate::kernels::for_overwrite(x.len());
        dx.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK))).for_each(|(o, (i, g))| backward_slice(i, g, o, m));
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// The activation of `x` into `y` (equal lengths) on this thread: the bits of
/// [`fused_gelu`], which runs the same loop over chunks of the tensor.
pub(crate) fn activate_slice(x: &[f32], y: &mut [f32], act: Activation) {
    forward_slice(x, y, mode(act))
}

/// [`fused_gelu`] as a stage of a residual chain (`kernels::residual`).
pub(crate) fn stage(act: Activation) -> crate::kernels::residual::Stage {
    crate::kernels::residual::Stage::Op1(Box::new(Gelu(act)))
}

/// GELU or ReLU^2 of an f32 CPU tensor in one pass (backward in one pass too).
pub fn fused_gelu(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Gelu(act))?)
}
