//! AdamW with nanoMoE's decay groups, gradient clipping and nanoGPT's learning-rate schedule.
//!
//! candle's AdamW has one weight decay for all variables; this one decays only the tensors
//! nanoMoE decays, and follows torch.optim.AdamW's update order exactly so that losses match
//! PyTorch step for step.

use candle_core::{backprop::GradStore, CpuStorage, DType, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::error::Result;
use crate::params::ParamStore;

/// nanoMoE's rule: tensors with >= 2 dims decay (matmul weights, embeddings, expert weights);
/// biases never do (expert biases are 3-D but still biases), nor layer-norm parameters.
pub fn decays(name: &str, shape: &[usize]) -> bool {
    shape.len() >= 2 && !name.ends_with("bias")
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdamWConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 6e-4, beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    /// First and second moments, flat, updated in place with the parameter.
    m: Vec<f32>,
    v: Vec<f32>,
}

/// The scalars of one update.
#[derive(Clone, Copy)]
struct Hyper {
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// 1 - lr * weight_decay for decayed tensors, else 1.
    decay_factor: f32,
    bc1: f32,
    bc2_sqrt: f32,
    /// Gradient clipping coefficient (1 = none).
    grad_scale: f32,
}

/// One fused pass over a parameter, its gradient and its moments, in torch.optim.AdamW's
/// order: p *= 1 - lr wd; m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2;
/// p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps). The parameter is updated in place.
struct Update<'a> {
    m: std::cell::RefCell<&'a mut [f32]>,
    v: std::cell::RefCell<&'a mut [f32]>,
    h: Hyper,
}

impl candle_core::InplaceOp2 for Update<'_> {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        const CHUNK: usize = 16384;
        let CpuStorage::F32(p) = s1 else { candle_core::bail!("AdamW updates f32 parameters") };
        let Some((a, b)) = l1.contiguous_offsets() else { candle_core::bail!("AdamW needs contiguous parameters") };
        let g = crate::kernels::contiguous_f32(s2, l2, "AdamW")?;
        let (mut m, mut v) = (self.m.borrow_mut(), self.v.borrow_mut());
        let h = self.h;
        if g.len() != b - a || m.len() != g.len() {
            candle_core::bail!("AdamW: gradient, parameter and moments differ in size");
        }
        p[a..b]
            .par_chunks_mut(CHUNK)
            .zip(g.par_chunks(CHUNK))
            .zip(m.par_chunks_mut(CHUNK).zip(v.par_chunks_mut(CHUNK)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let gi = g[i] * h.grad_scale;
                    let pi = p[i] * h.decay_factor;
                    let mi = m[i] + (1.0 - h.beta1) * (gi - m[i]);
                    let vi = v[i] * h.beta2 + (1.0 - h.beta2) * gi * gi;
                    m[i] = mi;
                    v[i] = vi;
                    p[i] = pi - (h.lr / h.bc1) * (mi / (vi.sqrt() / h.bc2_sqrt + h.eps));
                }
            });
        Ok(())
    }
}

pub struct AdamW {
    pub cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

impl AdamW {
    pub fn new(params: &ParamStore, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = Vec::new();
        for (name, var) in params.iter() {
            if var.dtype() != DType::F32 {
                return Err(crate::error::Error::Input(format!("AdamW trains f32 parameters; {name} is {:?}", var.dtype())));
            }
            slots.push(Slot {
                name: name.to_string(),
                var: var.clone(),
                decay: decays(name, var.dims()),
                m: vec![0.0; var.elem_count()],
                v: vec![0.0; var.elem_count()],
            });
        }
        Ok(AdamW { cfg, slots, step: 0 })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    pub fn set_lr(&mut self, lr: f64) {
        self.cfg.lr = lr;
    }

    /// Number of parameters in the decayed and non-decayed groups.
    pub fn group_sizes(&self) -> (usize, usize) {
        let mut d = (0, 0);
        for s in &self.slots {
            if s.decay {
                d.0 += s.var.elem_count();
            } else {
                d.1 += s.var.elem_count();
            }
        }
        d
    }

    /// One update from `grads` (variables without a gradient are left alone, as torch does).
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// One update from `grads` times `grad_scale` (the clipping coefficient, applied in the
    /// same pass instead of rewriting every gradient first).
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = &self.cfg;
        let t = self.step as i32;
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            let h = Hyper {
                lr: c.lr as f32,
                beta1: c.beta1 as f32,
                beta2: c.beta2 as f32,
                eps: c.eps as f32,
                decay_factor: if s.decay { (1.0 - c.lr * c.weight_decay) as f32 } else { 1.0 },
                bc1: (1.0 - c.beta1.powi(t)) as f32,
                bc2_sqrt: (1.0 - c.beta2.powi(t)).sqrt() as f32,
                grad_scale: grad_scale as f32,
            };
            let update = Update { m: std::cell::RefCell::new(&mut s.m), v: std::cell::RefCell::new(&mut s.v), h };
            s.var.as_tensor().inplace_op2(&g.contiguous()?, &update)?;
        }
        Ok(())
    }

    /// (name, first moment, second moment) of every parameter, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor, Tensor)> {
        self.slots
            .iter()
            .map(|s| {
                let t = |x: &[f32]| Tensor::from_slice(x, s.var.shape(), s.var.device()).expect("moments match their parameter");
                (s.name.clone(), t(&s.m), t(&s.v))
            })
            .collect()
    }

    /// Restores moments and step count saved by [`AdamW::state`].
    pub fn load_state(&mut self, step: u64, moments: Vec<(String, Tensor, Tensor)>) -> Result<()> {
        let mut by_name: std::collections::HashMap<String, (Tensor, Tensor)> =
            moments.into_iter().map(|(n, m, v)| (n, (m, v))).collect();
        for s in &mut self.slots {
            let (m, v) = by_name.remove(&s.name).ok_or_else(|| {
                crate::error::Error::Checkpoint(format!("optimizer state lacks moments for {}", s.name))
            })?;
            if m.dims() != s.var.dims() || v.dims() != s.var.dims() {
                return Err(crate::error::Error::Checkpoint(format!(
                    "optimizer moments of {} have shape {:?}, expected {:?}",
                    s.name,
                    m.dims(),
                    s.var.dims()
                )));
            }
            s.m = m.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            s.v = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        }
        self.step = step;
        Ok(())
    }
}

/// Global L2 norm of the gradients of `params` (sums of squares in f64, no temporaries).
pub fn grad_norm(params: &ParamStore, grads: &GradStore) -> Result<f64> {
    Ok(grad_sq_sum(params, grads, |_| true)?.sqrt())
}

/// Sum of the squared gradients of the parameters whose names pass `keep`.
pub fn grad_sq_sum(params: &ParamStore, grads: &GradStore, keep: impl Fn(&str) -> bool) -> Result<f64> {
    let mut total = 0f64;
    for (name, var) in params.iter() {
        if !keep(name) {
            continue;
        }
        if let Some(g) = grads.get(var) {
            total += crate::kernels::with_f32(&g.to_dtype(DType::F32)?, "gradient norm", |x| {
                // Partial sums over fixed chunks, added in order: deterministic.
                let parts: Vec<f64> = x.par_chunks(16384).map(|c| c.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>()).collect();
                Ok(parts.iter().sum::<f64>())
            })?;
        }
    }
    Ok(total)
}

/// torch's clip_grad_norm_ coefficient: max_norm / (norm + 1e-6) when below 1, else 1
/// (and 1 when clipping is off, max_norm <= 0).
pub fn clip_coefficient(norm: f64, max_norm: f64) -> f64 {
    if max_norm > 0.0 {
        (max_norm / (norm + 1e-6)).min(1.0)
    } else {
        1.0
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm` (torch's
/// clip_grad_norm_). Returns the norm before clipping. (The trainer instead passes the
/// coefficient to [`AdamW::step_scaled`].)
pub fn clip_grad_norm(params: &ParamStore, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let norm = grad_norm(params, grads)?;
    let coef = clip_coefficient(norm, max_norm);
    if coef < 1.0 {
        for (_, var) in params.iter() {
            if let Some(g) = grads.get(var) {
                let scaled = (g.detach() * coef)?;
                grads.insert(var, scaled);
            }
        }
    }
    Ok(norm)
}

/// nanoGPT's schedule: linear warmup, cosine decay to `min_lr` at `decay_iters`, then flat.
pub fn lr_at(it: u64, lr: f64, min_lr: f64, warmup_iters: u64, decay_iters: u64, decay_lr: bool) -> f64 {
    if !decay_lr {
        return lr;
    }
    if it < warmup_iters {
        return lr * (it + 1) as f64 / (warmup_iters + 1) as f64;
    }
    if it > decay_iters {
        return min_lr;
    }
    let span = decay_iters.saturating_sub(warmup_iters).max(1) as f64;
    let ratio = (it - warmup_iters) as f64 / span;
    let coeff = 0.5 * (1.0 + (std::f64::consts::PI * ratio).cos());
    min_lr + coeff * (lr - min_lr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decay_groups_follow_nanomoe() {
        assert!(decays("transformer.h.0.attn.c_attn.weight", &[48, 16]));
        assert!(decays("transformer.wte.weight", &[50, 16]));
        assert!(decays("transformer.h.1.mlp.experts.c_fc", &[4, 16, 64]));
        assert!(!decays("transformer.h.1.mlp.experts.fc_bias", &[4, 1, 64]));
        assert!(!decays("transformer.h.1.mlp.experts.proj_bias", &[4, 1, 16]));
        assert!(!decays("transformer.h.0.ln_1.weight", &[16]));
        assert!(!decays("transformer.h.0.attn.c_attn.bias", &[48]));
    }

    #[test]
    fn schedule_matches_nanogpt() {
        let f = |it| lr_at(it, 1e-3, 1e-4, 10, 100, true);
        assert!((f(0) - 1e-3 / 11.0).abs() < 1e-12);
        assert!((f(10) - 1e-3).abs() < 1e-12);
        assert!((f(55) - (1e-4 + 0.5 * 9e-4)).abs() < 1e-12);
        assert!((f(100) - 1e-4).abs() < 1e-12);
        assert_eq!(f(1000), 1e-4);
        assert_eq!(lr_at(5, 1e-3, 1e-4, 10, 100, false), 1e-3);
    }
}
