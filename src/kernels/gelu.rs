//! GELU (tanh approximation or exact erf) as one element-wise pass, with a one-pass
//! derivative for the backward instead of candle's graph of composite ops.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::config::Activation;
use crate::error::Result;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const INV_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;
const INV_SQRT_2PI: f32 = 0.398_942_3;

fn gelu(x: f32, act: Activation) -> f32 {
    match act {
        Activation::GeluTanh => 0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh()),
        Activation::GeluErf => 0.5 * x * (1.0 + libm::erff(x * INV_SQRT_2)),
    }
}

fn gelu_grad(x: f32, act: Activation) -> f32 {
    match act {
        Activation::GeluTanh => {
            let t = (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh();
            0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * x * x)
        }
        Activation::GeluErf => 0.5 * (1.0 + libm::erff(x * INV_SQRT_2)) + x * (-0.5 * x * x).exp() * INV_SQRT_2PI,
    }
}

fn map(storage: &CpuStorage, layout: &Layout, f: impl Fn(f32) -> f32 + Sync) -> candle_core::Result<(CpuStorage, Shape)> {
    let data = crate::kernels::contiguous_f32(storage, layout, "fused gelu")?;
    let out: Vec<f32> = data.par_iter().with_min_len(4096).map(|&x| f(x)).collect();
    Ok((CpuStorage::F32(out), layout.shape().clone()))
}

struct Gelu(Activation);
struct GeluGrad(Activation);

impl CustomOp1 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let act = self.0;
        map(s, l, move |x| gelu_grad(x, act))
    }
}

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let act = self.0;
        map(s, l, move |x| gelu(x, act))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let d = arg.contiguous()?.apply_op1_no_bwd(&GeluGrad(self.0))?;
        Ok(Some(grad_res.mul(&d)?))
    }
}

/// GELU of an f32 CPU tensor in one pass (backward in one pass too).
pub fn fused_gelu(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op1(Gelu(act))?)
}
