//! AdamW with nanoMoE's decay groups, gradient clipping and nanoGPT's learning-rate schedule.
//!
//! candle's AdamW has one weight decay for all variables; this one decays only the tensors
//! nanoMoE decays, and follows torch.optim.AdamW's update order exactly so that losses match
//! PyTorch step for step.

use candle_core::{backprop::GradStore, Tensor, Var};

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
    m: Tensor,
    v: Tensor,
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
            slots.push(Slot {
                name: name.to_string(),
                var: var.clone(),
                decay: decays(name, var.dims()),
                m: var.as_tensor().zeros_like()?,
                v: var.as_tensor().zeros_like()?,
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
        self.step += 1;
        let c = &self.cfg;
        let t = self.step as i32;
        let bc1 = 1.0 - c.beta1.powi(t);
        let bc2 = 1.0 - c.beta2.powi(t);
        for s in &mut self.slots {
            let Some(g) = grads.get(&s.var) else { continue };
            // Gradients carry candle's op graph; detach so that moments do not keep every
            // step's graph alive.
            let g = &g.detach();
            let mut p = s.var.as_tensor().detach();
            if s.decay && c.weight_decay != 0.0 {
                p = (p * (1.0 - c.lr * c.weight_decay))?;
            }
            s.m = ((&s.m * c.beta1)? + (g * (1.0 - c.beta1))?)?.detach();
            s.v = ((&s.v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?.detach();
            let denom = ((s.v.sqrt()? / bc2.sqrt())? + c.eps)?;
            let update = (s.m.div(&denom)? * (c.lr / bc1))?;
            s.var.set(&(p - update)?.detach())?;
        }
        Ok(())
    }

    /// (name, first moment, second moment) of every parameter, for checkpoints.
    pub fn state(&self) -> Vec<(String, Tensor, Tensor)> {
        self.slots.iter().map(|s| (s.name.clone(), s.m.clone(), s.v.clone())).collect()
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
            s.m = m;
            s.v = v;
        }
        self.step = step;
        Ok(())
    }
}

/// Scales gradients so that their global L2 norm is at most `max_norm` (torch's
/// clip_grad_norm_). Returns the norm before clipping.
pub fn clip_grad_norm(params: &ParamStore, grads: &mut GradStore, max_norm: f64) -> Result<f64> {
    let mut total = 0f64;
    for (_, var) in params.iter() {
        if let Some(g) = grads.get(var) {
            total += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        }
    }
    let norm = total.sqrt();
    if max_norm > 0.0 {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for (_, var) in params.iter() {
                if let Some(g) = grads.get(var) {
                    let scaled = (g.detach() * coef)?;
                    grads.insert(var, scaled);
                }
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
