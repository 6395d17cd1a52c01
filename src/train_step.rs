//! One optimisation step as nanoGPT's train.py takes it: gradient accumulation over micro
//! batches (loss / steps each), global-norm clipping, AdamW.

use candle_core::{backprop::GradStore, Tensor};

use crate::error::{Error, Result};
use crate::gpt::GPT;
use crate::grad_sink::GradSink;
use crate::optim::{clip_coefficient, grad_norm, AdamW};
use crate::params::ParamStore;

/// What one step measured (losses are means over the micro batches).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct StepStats {
    pub loss: f32,
    pub ntp_loss: f32,
    pub aux_loss: f32,
    pub router_z_loss: f32,
    /// The seed's terms (zero unless its SwiGLU experts have them switched on).
    pub router_ortho_loss: f32,
    pub experts_ortho_loss: f32,
    pub gate_output_loss: f32,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
}

fn scalar(t: &Option<Tensor>) -> Result<f32> {
    Ok(match t {
        Some(t) => t.to_scalar::<f32>()?,
        None => 0.0,
    })
}

/// Adds `new` into `acc` for every parameter.
fn accumulate(params: &ParamStore, acc: &mut Option<GradStore>, new: GradStore) -> Result<()> {
    match acc {
        None => *acc = Some(new),
        Some(a) => {
            for (_, var) in params.iter() {
                if let Some(g) = new.get(var) {
                    let sum = match a.get(var) {
                        Some(prev) => (prev + g)?,
                        None => g.clone(),
                    };
                    a.insert(var, sum);
                }
            }
        }
    }
    Ok(())
}

/// Runs forward/backward on each (inputs, targets) micro batch (nanoGPT targets: already
/// shifted, -1 ignored), then clips and applies one AdamW update.
pub fn train_step(model: &GPT, opt: &mut AdamW, micro_batches: &[(Tensor, Tensor)], grad_clip: f64) -> Result<StepStats> {
    if micro_batches.is_empty() {
        return Err(Error::Input("a training step needs at least one micro batch".into()));
    }
    let n = micro_batches.len() as f64;
    let mut grads = None;
    let mut stats = StepStats::default();
    for (x, y) in micro_batches {
        let sink = GradSink::new();
        let (loss, losses, _) = model.forward_loss_with_sink(x, y, &sink)?;
        let loss = loss.ok_or_else(|| Error::Input("every target of a micro batch is ignored".into()))?;
        stats.loss += loss.to_scalar::<f32>()? / n as f32;
        stats.ntp_loss += scalar(&losses.ntp_loss)? / n as f32;
        stats.aux_loss += scalar(&losses.aux_loss)? / n as f32;
        stats.router_z_loss += scalar(&losses.router_z_loss)? / n as f32;
        stats.router_ortho_loss += scalar(&losses.router_ortho_loss)? / n as f32;
        stats.experts_ortho_loss += scalar(&losses.experts_ortho_loss)? / n as f32;
        stats.gate_output_loss += scalar(&losses.gate_output_loss)? / n as f32;
        let mut g = sink.backward(&(loss / n)?)?;
        for (_, var) in model.params().iter() {
            if let Some(t) = g.remove(var) {
                g.insert(var, t.detach());
            }
        }
        accumulate(model.params(), &mut grads, g)?;
    }
    let grads = grads.expect("at least one micro batch");
    stats.grad_norm = grad_norm(model.params(), &grads)?;
    opt.step_scaled(&grads, clip_coefficient(stats.grad_norm, grad_clip))?;
    Ok(stats)
}
