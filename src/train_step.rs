//! One optimisation step as nanoGPT's train.py takes it: gradient accumulation over micro
//! batches (loss / steps each), global-norm clipping, AdamW.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{backprop::GradStore, DType, Tensor, TensorId};

use crate::dist::{all_reduce_buckets, Comm, Reduction, Single};
use crate::error::{Error, Result};
use crate::gpt::GPT;
use crate::grad_sink::GradSink;
use crate::moe_parallel::ExpertShard;
use crate::optim::{clip_coefficient, grad_norm, grad_sq_sum, AdamW};
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
    let step = Step { micro_batches, seeds: None, micro_total: micro_batches.len(), grad_clip, overlap_reduce: false };
    train_step_on(model, opt, &step, &(Arc::new(Single) as Arc<dyn Comm>))
}

/// One rank's part of a step.
pub struct Step<'a> {
    /// This rank's micro batches.
    pub micro_batches: &'a [(Tensor, Tensor)],
    /// The model generator's seed before each micro batch (dropout, router noise), so that
    /// a micro batch draws the same numbers whichever rank runs it; None: not reseeded.
    pub seeds: Option<&'a [u64]>,
    /// Micro batches of the whole step over all ranks (each loss is divided by it).
    pub micro_total: usize,
    pub grad_clip: f64,
    /// Start the experts' gradient all-reduces during the last backward pass (see
    /// [`train_step_on`]); otherwise every all-reduce runs after it.
    pub overlap_reduce: bool,
}

/// A data-parallel step: every rank runs forward/backward on its own micro batches, the
/// gradients and the loss terms are summed over ranks (bucketed all-reduce), and every rank
/// clips and applies the same AdamW update to the same weights. With N ranks taking
/// micro batches k = r, r + N, ... this equals one process running all of them in turn.
///
/// With `overlap_reduce`, the experts' weight gradients, which reach the [`GradSink`]
/// during the backward pass, start their all-reduce there in the last micro batch,
/// overlapping the rest of the backward (candle's own backward returns its gradients only
/// at the end).
pub fn train_step_on(model: &GPT, opt: &mut AdamW, step: &Step, comm_arc: &Arc<dyn Comm>) -> Result<StepStats> {
    let comm: &dyn Comm = comm_arc.as_ref();
    let micro_batches = step.micro_batches;
    if step.micro_total == 0 || (micro_batches.is_empty() && comm.size() == 1) {
        return Err(Error::Input("a training step needs at least one micro batch".into()));
    }
    let n = step.micro_total as f64;
    let mut grads = None;
    let mut terms = [0f64; 7];
    let overlap = step.overlap_reduce && comm.size() > 1 && model.expert_shard().is_none();
    let started: Arc<Mutex<HashMap<TensorId, Reduction>>> = Arc::default();
    let mut last_sink = None;
    for (i, (x, y)) in micro_batches.iter().enumerate() {
        if let Some(seeds) = step.seeds {
            model.set_seed(seeds[i]);
        }
        let sink = if overlap && i + 1 == micro_batches.len() {
            overlapping_sink(model.params(), grads.as_ref(), comm_arc.clone(), started.clone())
        } else {
            GradSink::new()
        };
        let (loss, losses, _) = model.forward_loss_with_sink(x, y, &sink)?;
        let loss = loss.ok_or_else(|| Error::Input("every target of a micro batch is ignored".into()))?;
        let values = [
            loss.to_scalar::<f32>()?,
            scalar(&losses.ntp_loss)?,
            scalar(&losses.aux_loss)?,
            scalar(&losses.router_z_loss)?,
            scalar(&losses.router_ortho_loss)?,
            scalar(&losses.experts_ortho_loss)?,
            scalar(&losses.gate_output_loss)?,
        ];
        for (t, v) in terms.iter_mut().zip(values) {
            *t += (v / n as f32) as f64;
        }
        let mut g = sink.backward(&(loss / n)?)?;
        for (_, var) in model.params().iter() {
            if let Some(t) = g.remove(var) {
                g.insert(var, t.detach());
            }
        }
        accumulate(model.params(), &mut grads, g)?;
        last_sink = Some(sink);
    }
    let mut grads = match grads {
        Some(g) => g,
        None => GradStore::default(),
    };
    // Experts held by one rank (expert parallelism) already have their whole gradient:
    // the all-to-all's backward brought every rank's contribution here.
    let sharded = |name: &str| model.expert_shard().is_some() && ExpertShard::is_sharded(name);
    if comm.size() > 1 {
        // Started all-reduces whose gradient candle added to after the deposit are redone.
        let started = std::mem::take(&mut *started.lock().unwrap_or_else(|e| e.into_inner()));
        let done: std::collections::HashSet<TensorId> =
            started.keys().copied().filter(|&id| !last_sink.as_ref().is_some_and(|s| s.was_mixed(id))).collect();
        let skip = |name: &str| sharded(name) || model.params().var(name).is_some_and(|v| done.contains(&v.id()));
        comm.all_reduce_f64(&mut terms)?;
        all_reduce_grads(model.params(), &mut grads, comm, &skip)?;
        for (id, reduction) in started {
            let sum = reduction.wait()?;
            if !done.contains(&id) {
                continue;
            }
            let var = model.params().iter().map(|(_, v)| v).find(|v| v.id() == id).expect("a parameter's id");
            grads.insert(var, Tensor::from_vec(sum, var.shape(), var.device())?.to_dtype(var.dtype())?);
        }
    }
    let mut stats = StepStats {
        loss: terms[0] as f32,
        ntp_loss: terms[1] as f32,
        aux_loss: terms[2] as f32,
        router_z_loss: terms[3] as f32,
        router_ortho_loss: terms[4] as f32,
        experts_ortho_loss: terms[5] as f32,
        gate_output_loss: terms[6] as f32,
        grad_norm: 0.0,
    };
    stats.grad_norm = if model.expert_shard().is_some() {
        let mut sq = [grad_sq_sum(model.params(), &grads, sharded)?];
        comm.all_reduce_f64(&mut sq)?;
        (grad_sq_sum(model.params(), &grads, |n| !sharded(n))? + sq[0]).sqrt()
    } else {
        grad_norm(model.params(), &grads)?
    };
    opt.step_scaled(&grads, clip_coefficient(stats.grad_norm, step.grad_clip))?;
    Ok(stats)
}

/// A sink that starts each deposited parameter's all-reduce at its deposit, on the sum of
/// the earlier micro batches' gradient (`prev`) and this one's. (A weight deposited twice
/// starts twice; the later, complete sum is the one kept.)
fn overlapping_sink(params: &ParamStore, prev: Option<&GradStore>, comm: Arc<dyn Comm>, started: Arc<Mutex<HashMap<TensorId, Reduction>>>) -> GradSink {
    let mut earlier: HashMap<TensorId, Option<Tensor>> = HashMap::new();
    for (_, var) in params.iter() {
        earlier.insert(var.id(), prev.and_then(|g| g.get(var)).cloned());
    }
    GradSink::with_hook(Arc::new(move |id, g| {
        let Some(before) = earlier.get(&id) else { return Ok(()) };
        let total = match before {
            Some(p) => (p + g)?,
            None => g.clone(),
        };
        let buf: Vec<f32> = total.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        let r = comm.start_all_reduce_f32(buf).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        started.lock().unwrap_or_else(|e| e.into_inner()).insert(id, r);
        Ok(())
    }))
}

/// Floats per all-reduce message (16 MiB).
const BUCKET: usize = 4 << 20;

/// Sums every parameter's gradient over ranks (a parameter this rank has no gradient for
/// contributes zeros, so every rank sends the same buffers).
fn all_reduce_grads(params: &ParamStore, grads: &mut GradStore, comm: &dyn Comm, skip: &dyn Fn(&str) -> bool) -> Result<()> {
    let mut bufs: Vec<Vec<f32>> = Vec::new();
    let params: Vec<_> = params.iter().filter(|(n, _)| !skip(n)).collect();
    for (_, var) in params.iter() {
        bufs.push(match grads.get(var) {
            Some(g) => g.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?,
            None => vec![0f32; var.elem_count()],
        });
    }
    let mut parts: Vec<&mut [f32]> = bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
    all_reduce_buckets(comm, &mut parts, BUCKET)?;
    for ((_, var), b) in params.into_iter().zip(bufs) {
        let t = Tensor::from_vec(b, var.shape(), var.device())?.to_dtype(var.dtype())?;
        grads.insert(var, t);
    }
    Ok(())
}
