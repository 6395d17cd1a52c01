//! Expert parallelism (GShard, Lepikhin et al. 2020, sec. 2.2 and 3.2): each of N ranks
//! holds n_exp / N experts of every MoE layer and its own rows of every batch; tokens
//! travel to the rank of their expert and back with two all-to-all exchanges per layer,
//! whose backward passes are the same exchanges reversed.
//!
//! Routing is decided over the global batch, exactly as one process would: every rank
//! gathers every token's top-k choices (rank order = row order of the global batch), builds
//! the same [`RoutingPlan`] - capacity from the global token count, first choices before
//! second, earlier rows first - and so the same drops, the same f_e of the aux loss and the
//! same statistics. Each rank's loss terms are means over its own rows; the trainer divides
//! them by N and sums gradients over ranks, which gives the global means.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};

use crate::dist::Comm;
use crate::error::{Error, Result};
use crate::moe::{expert_capacity, mean_entropy, top_k_choices, MoeCtx, MoeLayer, MoeOutput, MoeStats, Routing, RoutingPlan};
use crate::nn;
use crate::params::ParamStore;

/// This rank's share of every MoE layer's experts.
#[derive(Clone)]
pub struct ExpertShard {
    pub comm: Arc<dyn Comm>,
    /// Experts per layer over all ranks.
    pub n_exp: usize,
}

impl ExpertShard {
    pub fn new(comm: Arc<dyn Comm>, n_exp: usize) -> Result<Self> {
        let ranks = comm.size();
        if n_exp == 0 || n_exp % ranks != 0 {
            return Err(Error::Config(format!(
                "expert_parallel needs n_exp ({n_exp}) to be a multiple of the {ranks} processes (each holds n_exp / N experts)"
            )));
        }
        Ok(ExpertShard { comm, n_exp })
    }

    pub fn per_rank(&self) -> usize {
        self.n_exp / self.comm.size()
    }

    /// The experts rank `rank` holds.
    pub fn experts_of(&self, rank: usize) -> Range<usize> {
        rank * self.per_rank()..(rank + 1) * self.per_rank()
    }

    /// Whether a parameter is split over ranks: the experts' weights and biases.
    pub fn is_sharded(name: &str) -> bool {
        name.contains(".mlp.experts.")
    }

    /// This rank's slice (dim 0) of each expert tensor; every other tensor as it is.
    pub fn slice(&self, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let mine = self.experts_of(self.comm.rank());
        tensors
            .into_iter()
            .map(|(n, t)| {
                if Self::is_sharded(&n) {
                    if t.dim(0)? != self.n_exp {
                        return Err(Error::Config(format!("{n} has {} experts, expected n_exp = {}", t.dim(0)?, self.n_exp)));
                    }
                    let s = t.narrow(0, mine.start, mine.len())?.contiguous()?;
                    Ok((n, s))
                } else {
                    Ok((n, t))
                }
            })
            .collect()
    }

    /// [`slice`](Self::slice) of a whole parameter store.
    pub fn slice_params(&self, params: &ParamStore) -> Result<ParamStore> {
        ParamStore::from_tensors(self.slice(tensors_of(params))?)
    }

    /// [`gather`](Self::gather) of a whole parameter store (a collective).
    pub fn gather_params(&self, params: &ParamStore) -> Result<ParamStore> {
        ParamStore::from_tensors(self.gather(tensors_of(params))?)
    }

    /// [`slice`](Self::slice) of AdamW's moments, (name, m, v) as [`AdamW::state`](crate::optim::AdamW::state) gives them.
    pub fn slice_moments(&self, moments: Vec<(String, Tensor, Tensor)>) -> Result<Vec<(String, Tensor, Tensor)>> {
        map_moments(moments, |t| self.slice(t))
    }

    /// [`gather`](Self::gather) of AdamW's moments (a collective).
    pub fn gather_moments(&self, moments: Vec<(String, Tensor, Tensor)>) -> Result<Vec<(String, Tensor, Tensor)>> {
        map_moments(moments, |t| self.gather(t))
    }

    /// Every rank's slices of the expert tensors put back together (a collective: every
    /// rank calls it with the same names in the same order); other tensors pass through.
    pub fn gather(&self, tensors: Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>> {
        let mine = self.experts_of(self.comm.rank());
        tensors
            .into_iter()
            .map(|(n, t)| {
                if !Self::is_sharded(&n) {
                    return Ok((n, t));
                }
                let mut dims = t.dims().to_vec();
                let per = dims[0];
                dims[0] = per * self.comm.size();
                let row: usize = t.elem_count() / per.max(1);
                // A sum of zeros and one rank's slice at each place is that slice, exactly.
                let mut full = vec![0f32; row * dims[0]];
                let local: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                full[mine.start * row..mine.start * row + local.len()].copy_from_slice(&local);
                self.comm.all_reduce_f32(&mut full)?;
                Ok((n, Tensor::from_vec(full, dims, t.device())?.to_dtype(t.dtype())?))
            })
            .collect()
    }
}

fn tensors_of(params: &ParamStore) -> Vec<(String, Tensor)> {
    params.iter().map(|(n, v)| (n.to_string(), v.as_tensor().clone())).collect()
}

/// `f` applied to each parameter's m and v (both named after the parameter).
fn map_moments(
    moments: Vec<(String, Tensor, Tensor)>,
    f: impl Fn(Vec<(String, Tensor)>) -> Result<Vec<(String, Tensor)>>,
) -> Result<Vec<(String, Tensor, Tensor)>> {
    moments
        .into_iter()
        .map(|(n, m, v)| {
            let mut mv = f(vec![(n.clone(), m), (n.clone(), v)])?.into_iter().map(|(_, t)| t);
            let (m, v) = (mv.next().expect("m"), mv.next().expect("v"));
            Ok((n, m, v))
        })
        .collect()
}

/// rows [S, C] -> rows [R, C]: `send[r]` rows to rank r, `recv[r]` rows from it. Its
/// gradient is the same exchange with the counts swapped.
struct AllToAll {
    comm: Arc<dyn Comm>,
    send: Vec<usize>,
    recv: Vec<usize>,
    cols: usize,
}

impl CustomOp1 for AllToAll {
    fn name(&self) -> &'static str {
        "expert-all-to-all"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = match s {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("expert all-to-all: rows must be f32"),
        };
        let (start, end) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("expert all-to-all: rows not contiguous".into()))?;
        let data = &data[start..end];
        let c = self.cols;
        if data.len() != self.send.iter().sum::<usize>() * c {
            candle_core::bail!("expert all-to-all: {} values for {} rows of {c}", data.len(), self.send.iter().sum::<usize>());
        }
        let mut at = 0;
        let parts: Vec<Vec<f32>> = self
            .send
            .iter()
            .map(|&r| {
                let p = data[at..at + r * c].to_vec();
                at += r * c;
                p
            })
            .collect();
        let got = self.comm.all_to_all_f32(&parts).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let mut out = Vec::with_capacity(self.recv.iter().sum::<usize>() * c);
        for (r, (g, &want)) in got.iter().zip(&self.recv).enumerate() {
            if g.len() != want * c {
                candle_core::bail!("expert all-to-all: rank {r} sent {} values, expected {} rows of {c}", g.len(), want);
            }
            out.extend_from_slice(g);
        }
        let rows = self.recv.iter().sum::<usize>();
        Ok((CpuStorage::F32(out), Shape::from((rows, c))))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let back = AllToAll { comm: self.comm.clone(), send: self.recv.clone(), recv: self.send.clone(), cols: self.cols };
        Ok(Some(grad.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&back)?))
    }
}

fn exchange(rows: &Tensor, comm: &Arc<dyn Comm>, send: &[usize], recv: &[usize]) -> Result<Tensor> {
    let (_, c) = rows.dims2()?;
    let dtype = rows.dtype();
    let op = AllToAll { comm: comm.clone(), send: send.to_vec(), recv: recv.to_vec(), cols: c };
    Ok(rows.to_dtype(DType::F32)?.contiguous()?.apply_op1(op)?.to_dtype(dtype)?)
}

impl MoeLayer {
    /// The layer on this rank's rows `x_flat` [n, C], with its router `logits` [n, E]
    /// (noise already added) and z-loss: routes over the global batch, sends each kept
    /// (token, choice) to its expert's rank and the results back.
    pub(crate) fn forward_sharded(
        &self,
        shard: &ExpertShard,
        x_flat: &Tensor,
        logits: &Tensor,
        logits_host: &[Vec<f32>],
        z_loss: Tensor,
        ctx: &mut MoeCtx,
    ) -> Result<MoeOutput> {
        let (n, c) = x_flat.dims2()?;
        let device = x_flat.device();
        let comm = &shard.comm;
        let (rank, ranks) = (comm.rank(), comm.size());
        let (e_all, k) = (self.n_exp, self.k);

        // ---- the global plan ----
        let local = top_k_choices(logits_host, e_all, k);
        let choices: Vec<u64> = local.iter().map(|&e| e as u64).collect();
        let all = comm.all_gather_u64(&choices)?;
        let all: Vec<u32> = all.into_iter().map(|e| e as u32).collect();
        let n_global = n * ranks;
        let capacity = match ctx.routing {
            Routing::Dropless => None,
            Routing::Capacity => {
                let factor = if ctx.training { ctx.cfg.train_capacity } else { ctx.cfg.eval_capacity };
                Some(expert_capacity(ctx.cfg, n_global, factor))
            }
        };
        let plan = RoutingPlan::from_choices(all, e_all, k, capacity);
        let cap = plan.capacity;
        let off = rank * n * k; // this rank's first (token, choice) in the global plan

        let idx = Tensor::from_slice(&local, (n, k), device)?;
        let probs = nn::softmax_last(&logits.gather(&idx, 1)?)?; // [n, k]
        // aux = n_exp * sum_e f_e P_e with f_e over the global batch, P_e over these rows.
        let f = plan.choice_fraction();
        let fw: Vec<f32> = local.iter().map(|&e| f[e as usize]).collect();
        let fw = Tensor::from_vec(fw, (n, k), device)?;
        let aux_loss = ((probs.mul(&fw)?.sum_all()? * (e_all as f64 / n.max(1) as f64))?).to_dtype(DType::F32)?;
        let mut entropy = [mean_entropy(logits_host) as f64 * n as f64];
        comm.all_reduce_f64(&mut entropy)?;

        // ---- who sends what where ----
        let per = shard.per_rank();
        let owner = |e: u32| e as usize / per;
        let mut send_tok: Vec<Vec<u32>> = vec![Vec::new(); ranks];
        let mut send_pair: Vec<Vec<u32>> = vec![Vec::new(); ranks];
        for pair in off..off + n * k {
            if plan.slots[pair].is_some() {
                let q = owner(plan.experts[pair]);
                send_tok[q].push(((pair - off) / k) as u32);
                send_pair[q].push((pair - off) as u32);
            }
        }
        // Rows arrive from ranks in rank order, each in its pair order: their slots here.
        let mut recv_rows: Vec<u32> = Vec::new();
        let mut recv_counts = vec![0usize; ranks];
        for (p, count) in recv_counts.iter_mut().enumerate() {
            for pair in p * n * k..(p + 1) * n * k {
                if let Some(s) = plan.slots[pair] {
                    if owner(plan.experts[pair]) == rank {
                        let e_here = plan.experts[pair] as usize - rank * per;
                        recv_rows.push((e_here * cap + s as usize) as u32);
                        *count += 1;
                    }
                }
            }
        }
        let send_counts: Vec<usize> = send_tok.iter().map(Vec::len).collect();
        let send_tok: Vec<u32> = send_tok.concat();
        let send_pair: Vec<u32> = send_pair.concat();
        let (s_rows, r_rows) = (send_tok.len(), recv_rows.len());

        // ---- dispatch: this rank's rows out, its experts' rows in, into [E/N, cap, C] ----
        let send_idx = Tensor::from_vec(send_tok, s_rows, device)?;
        let xs = x_flat.index_select(&send_idx, 0)?;
        let xr = exchange(&xs, comm, &send_counts, &recv_counts)?;
        let mut disp = vec![r_rows as u32; per * cap];
        for (i, &row) in recv_rows.iter().enumerate() {
            disp[row as usize] = i as u32;
        }
        let xr_ext = Tensor::cat(&[&xr, &Tensor::zeros((1, c), xr.dtype(), device)?], 0)?;
        let xe = xr_ext.index_select(&Tensor::from_vec(disp, per * cap, device)?, 0)?.reshape((per, cap, c))?;
        let mut gate_output_loss = None;
        let ye = self.run_experts(&xe, None, ctx, &mut gate_output_loss)?; // [E/N * cap, C]

        // ---- combine: results back to their rows' ranks, weighted by the gate ----
        let back = ye.index_select(&Tensor::from_vec(recv_rows, r_rows, device)?, 0)?;
        let yr = exchange(&back, comm, &recv_counts, &send_counts)?; // [s_rows, C]
        let w = probs.flatten_all()?.index_select(&Tensor::from_vec(send_pair, s_rows, device)?, 0)?.to_dtype(x_flat.dtype())?;
        let y = Tensor::zeros((n, c), x_flat.dtype(), device)?.index_add(&send_idx, &yr.broadcast_mul(&w.unsqueeze(1)?)?, 0)?;

        let stats = MoeStats {
            layer: self.layer,
            tokens_per_expert: plan.tokens_per_expert(),
            dropped: plan.dropped(),
            assignments: plan.experts.len(),
            router_entropy: (entropy[0] / n_global.max(1) as f64) as f32,
        };
        Ok(MoeOutput { y, aux_loss, z_loss, router_ortho_loss: None, experts_ortho_loss: None, gate_output_loss, stats })
    }
}
