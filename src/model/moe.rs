//! The Mixture-of-Experts layer that replaces the MLP in every `stride`-th block,
//! with nanoMoE's routing semantics so that its checkpoints behave identically.
//!
//! router:  logits = x W_g^T (+ softplus(x W_noise^T) * N(0,1) when training with noisy
//!          top-k, Shazeer et al. 2017 eq. 4) -> top-k -> softmax over the k chosen logits
//!          (Shazeer et al. 2017 eq. 3-5).
//! capacity per expert = floor(k * factor * tokens / n_exp), rounded up to even, at least
//!          min_capacity (Switch Transformer, Fedus et al. 2021, eq. 3). Every first choice
//!          is placed before any second choice, earlier tokens before later ones; a choice
//!          past its expert's capacity is dropped (the residual stream carries the token).
//! losses:  aux = n_exp * sum_e f_e P_e (Switch Transformer eq. 4-6), router z-loss =
//!          mean_t logsumexp(logits_t)^2 (ST-MoE, Zoph et al. 2022, eq. 5).
//!
//! Dispatch is by index: the routing plan is computed from the router logits, tokens are
//! gathered into an [n_exp, capacity, n_embd] batch (empty slots point at a zero row),
//! and expert outputs are scattered back with `index_add`, so memory is linear in tokens
//! (nanoMoE's reference builds a dense one-hot [tokens, n_exp, capacity] tensor instead).
//! Slots fill in order, so each expert's tokens are the first rows of its batch, and the
//! expert products skip the empty slots after them (the reference multiplies them too).

use crate::kernels::Precision;
use candle_core::{DType, Tensor};
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

use crate::config::{Activation, GPTConfig};
use crate::error::Result;
use crate::grad_sink::GradSink;
use crate::moe_parallel::ExpertShard;
use crate::nn;
use crate::params::ParamStore;
use std::sync::Arc;
use crate::weight::{expert_products, ExpertJob, Mat};

/// How tokens are limited per expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Routing {
    /// nanoMoE semantics: train_capacity in training, eval_capacity otherwise.
    #[default]
    Capacity,
    /// No capacity limit: no token is ever dropped (an inference option).
    Dropless,
}

/// Expert capacity for `tokens` tokens with capacity factor `factor`.
pub fn expert_capacity(cfg: &GPTConfig, tokens: usize, factor: f64) -> usize {
    // Same operation order as nanoMoE's get_capacity, in f64 like Python floats.
    let mut cap = (cfg.moe_top_k as f64 * factor * tokens as f64 / cfg.n_exp as f64).floor() as usize;
    cap += cap % 2;
    cap.max(cfg.min_capacity)
}

/// The discrete routing decisions of one MoE layer for one forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingPlan {
    pub n_exp: usize,
    pub k: usize,
    /// Slots per expert.
    pub capacity: usize,
    /// Expert of each (token, choice), [tokens * k], best choice first.
    pub experts: Vec<u32>,
    /// Slot of each (token, choice) within its expert, `None` when dropped.
    pub slots: Vec<Option<u32>>,
}

impl RoutingPlan {
    /// Top-k selection and capacity assignment from router logits `[tokens][n_exp]`.
    /// `capacity` None = dropless. Ties in the logits go to the lower expert index.
    pub fn new(logits: &[Vec<f32>], n_exp: usize, k: usize, capacity: Option<usize>) -> Self {
        Self::from_choices(top_k_choices(logits, n_exp, k), n_exp, k, capacity)
    }

    /// Capacity assignment for given top-k choices `[tokens * k]` (best first per token).
    pub fn from_choices(experts: Vec<u32>, n_exp: usize, k: usize, capacity: Option<usize>) -> Self {
        let n = experts.len() / k.max(1);
        let capacity = capacity.unwrap_or_else(|| {
            let mut counts = vec![0usize; n_exp];
            for &e in &experts {
                counts[e as usize] += 1;
            }
            counts.into_iter().max().unwrap_or(0).max(1)
        });
        let mut fill = vec![0u32; n_exp];
        let mut slots = vec![None; n * k];
        for j in 0..k {
            for t in 0..n {
                let e = experts[t * k + j] as usize;
                if (fill[e] as usize) < capacity {
                    slots[t * k + j] = Some(fill[e]);
                    fill[e] += 1;
                }
            }
        }
        RoutingPlan { n_exp, k, capacity, experts, slots }
    }

    pub fn tokens(&self) -> usize {
        self.experts.len() / self.k
    }

    /// Tokens each expert processes (after drops).
    pub fn tokens_per_expert(&self) -> Vec<usize> {
        let mut c = vec![0; self.n_exp];
        for (e, s) in self.experts.iter().zip(&self.slots) {
            if s.is_some() {
                c[*e as usize] += 1;
            }
        }
        c
    }

    /// f_e of the aux loss: mean over tokens of how many of its k choices went to e.
    pub fn choice_fraction(&self) -> Vec<f32> {
        let mut f = vec![0f32; self.n_exp];
        for &e in &self.experts {
            f[e as usize] += 1.0;
        }
        let n = self.tokens().max(1) as f32;
        f.iter_mut().for_each(|x| *x /= n);
        f
    }

    pub fn dropped(&self) -> usize {
        self.slots.iter().filter(|s| s.is_none()).count()
    }
}

/// Each token's k best experts, best first (ties to the lower index), `[tokens * k]`.
pub fn top_k_choices(logits: &[Vec<f32>], n_exp: usize, k: usize) -> Vec<u32> {
    let mut experts = Vec::with_capacity(logits.len() * k);
    let mut order: Vec<u32> = (0..n_exp as u32).collect();
    for row in logits {
        order.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]).then(a.cmp(&b)));
        experts.extend_from_slice(&order[..k]);
        order.sort_unstable();
    }
    experts
}

/// Per-layer routing statistics of one forward pass.
#[derive(Debug, Clone, PartialEq)]
pub struct MoeStats {
    pub layer: usize,
    pub tokens_per_expert: Vec<usize>,
    /// (token, choice) assignments dropped for capacity.
    pub dropped: usize,
    pub assignments: usize,
    /// Mean entropy (nats) of the full softmax over router logits.
    pub router_entropy: f32,
}

/// What one MoE layer returns besides its output.
pub struct MoeOutput {
    pub y: Tensor,
    pub aux_loss: Tensor,
    pub z_loss: Tensor,
    /// The seed's losses: training with SwiGLU experts, each when switched on.
    pub router_ortho_loss: Option<Tensor>,
    pub experts_ortho_loss: Option<Tensor>,
    pub gate_output_loss: Option<Tensor>,
    pub stats: MoeStats,
}

/// Tensors of one MoE layer (names as in nanoMoE: mlp.router.w_g, mlp.experts.c_fc, ...).
pub struct MoeLayer {
    pub(crate) layer: usize,
    w_g: Tensor,
    w_noise: Option<Tensor>,
    /// SwiGLU experts' gate [E, C, 4C] (then c_fc is the "up" projection).
    gate_proj: Option<Mat>,
    c_fc: Mat,
    c_proj: Mat,
    fc_bias: Option<Tensor>,
    proj_bias: Option<Tensor>,
    pub(crate) n_exp: usize,
    pub(crate) k: usize,
    act: Activation,
    dropout: f64,
    /// Expert parallelism: the experts here are this rank's share (see `moe_parallel`).
    shard: Option<Arc<ExpertShard>>,
}

pub struct MoeCtx<'a> {
    pub cfg: &'a GPTConfig,
    pub training: bool,
    pub routing: Routing,
    pub rng: Option<&'a mut StdRng>,
    /// Where the experts' weight gradients go (see [`GradSink`]); None: candle's store.
    pub sink: Option<&'a GradSink>,
    /// The experts' products: f32, or bf16 with f32 sums (mixed-precision training).
    pub prec: Precision,
}

impl MoeLayer {
    /// `shard`: the expert tensors in `p` are this rank's share of them.
    pub fn load(cfg: &GPTConfig, p: &ParamStore, prefix: &str, layer: usize, shard: Option<Arc<ExpertShard>>) -> Result<Self> {
        let opt = |n: &str| -> Result<Option<Tensor>> {
            Ok(if p.var(&format!("{prefix}.{n}")).is_some() { Some(p.get(&format!("{prefix}.{n}"))?) } else { None })
        };
        Ok(MoeLayer {
            layer,
            w_g: p.get(&format!("{prefix}.router.w_g.weight"))?,
            w_noise: opt("router.w_noise.weight")?,
            gate_proj: if p.has(&format!("{prefix}.experts.gate_proj")) { Some(p.mat(&format!("{prefix}.experts.gate_proj"))?) } else { None },
            c_fc: p.mat(&format!("{prefix}.experts.c_fc"))?,
            c_proj: p.mat(&format!("{prefix}.experts.c_proj"))?,
            fc_bias: opt("experts.fc_bias")?,
            proj_bias: opt("experts.proj_bias")?,
            n_exp: cfg.n_exp,
            k: cfg.moe_top_k,
            act: cfg.activation()?,
            dropout: cfg.dropout,
            shard,
        })
    }

    /// The same layer on weights that track no gradients (inference).
    pub fn detached(&self) -> Self {
        let d = |t: &Option<Tensor>| t.as_ref().map(Tensor::detach);
        MoeLayer {
            layer: self.layer,
            w_g: self.w_g.detach(),
            w_noise: d(&self.w_noise),
            gate_proj: self.gate_proj.as_ref().map(Mat::detached),
            c_fc: self.c_fc.detached(),
            c_proj: self.c_proj.detached(),
            fc_bias: d(&self.fc_bias),
            proj_bias: d(&self.proj_bias),
            n_exp: self.n_exp,
            k: self.k,
            act: self.act,
            dropout: self.dropout,
            shard: self.shard.clone(),
        }
    }

    /// x: [B, T, C] -> y: [B, T, C] plus losses and statistics.
    pub fn forward(&self, x: &Tensor, ctx: &mut MoeCtx) -> Result<MoeOutput> {
        let (b, t, c) = x.dims3()?;
        let n = b * t;
        let device = x.device();
        let x_flat = x.reshape((n, c))?;

        // ---- router (kept in f32) ----
        let xr = x_flat.to_dtype(DType::F32)?;
        let mut logits = nn::linear(&xr, &self.w_g.to_dtype(DType::F32)?, None)?; // [N, E]
        if ctx.training && ctx.cfg.use_noisy_top_k {
            if let (Some(w_noise), Some(rng)) = (&self.w_noise, ctx.rng.as_deref_mut()) {
                let scale = nn::softplus(&nn::linear(&xr, &w_noise.to_dtype(DType::F32)?, None)?)?;
                let z: Vec<f32> = (0..n * self.n_exp).map(|_| StandardNormal.sample(rng)).collect();
                let z = Tensor::from_vec(z, (n, self.n_exp), device)?;
                logits = (logits + scale.mul(&z)?)?;
            }
        }
        let z_loss = nn::logsumexp_last(&logits)?.sqr()?.mean_all()?;

        let logits_host: Vec<Vec<f32>> = logits.detach().to_vec2()?;
        if let Some(shard) = &self.shard {
            let out = self.forward_sharded(shard, &x_flat, &logits, &logits_host, z_loss, ctx)?;
            return Ok(MoeOutput { y: out.y.reshape((b, t, c))?, ..out });
        }
        let capacity = match ctx.routing {
            Routing::Dropless => None,
            Routing::Capacity => {
                let factor = if ctx.training { ctx.cfg.train_capacity } else { ctx.cfg.eval_capacity };
                Some(expert_capacity(ctx.cfg, n, factor))
            }
        };
        let plan = RoutingPlan::new(&logits_host, self.n_exp, self.k, capacity);

        let idx = Tensor::from_slice(&plan.experts, (n, self.k), device)?;
        let top_logits = logits.gather(&idx, 1)?; // [N, k]
        let probs = nn::softmax_last(&top_logits)?; // [N, k]

        // aux loss = n_exp * sum_e f_e * P_e with P_e = mean_t prob(t, e)
        //          = n_exp / N * sum_{t,j} f_{e(t,j)} * prob(t, j)
        let f = plan.choice_fraction();
        let fw: Vec<f32> = plan.experts.iter().map(|&e| f[e as usize]).collect();
        let fw = Tensor::from_vec(fw, (n, self.k), device)?;
        let aux_loss = ((probs.mul(&fw)?.sum_all()? * (self.n_exp as f64 / n as f64))?).to_dtype(DType::F32)?;

        let mut gate_output_loss = None;
        let y = if ctx.training {
            self.experts_batched(&x_flat, &plan, &probs, ctx, &mut gate_output_loss)?
        } else {
            self.experts_grouped(&x_flat, &plan, &probs)?
        };
        let seed_loss = |on: bool| ctx.training && on && self.gate_proj.is_some();
        let router_ortho_loss = if seed_loss(ctx.cfg.use_router_ortho_loss) { Some(self.router_ortho_loss(ctx.cfg.router_ortho_neg_corr_weight)?) } else { None };
        let experts_ortho_loss = if seed_loss(ctx.cfg.use_experts_ortho_loss) { Some(self.experts_ortho_loss()?) } else { None };

        let stats = MoeStats {
            layer: self.layer,
            tokens_per_expert: plan.tokens_per_expert(),
            dropped: plan.dropped(),
            assignments: plan.experts.len(),
            router_entropy: mean_entropy(&logits_host),
        };
        Ok(MoeOutput { y: y.reshape((b, t, c))?, aux_loss, z_loss, router_ortho_loss, experts_ortho_loss, gate_output_loss, stats })
    }

    /// The seed's router-orthogonality loss: sum over experts e and gate columns j of
    /// w * <w_g[e], gate_proj[e][:, j]>^2 (w = 1, or `neg_weight` where the dot product is
    /// negative); gate_proj's gradient scaled by 0.1.
    fn router_ortho_loss(&self, neg_weight: f64) -> Result<Tensor> {
        let gate = self.gate_proj.as_ref().expect("SwiGLU experts").dense()?;
        let gate = nn::scale_grad(&gate.to_dtype(DType::F32)?, 0.1)?; // [E, C, I]
        let w_g = self.w_g.to_dtype(DType::F32)?.unsqueeze(2)?; // [E, C, 1]
        let dots = w_g.broadcast_mul(&gate)?.sum(1)?; // [E, I]
        let host: Vec<f32> = dots.flatten_all()?.to_vec1()?;
        let weights: Vec<f32> = host.iter().map(|&d| if d < 0.0 { neg_weight as f32 } else { 1.0 }).collect();
        let weights = Tensor::from_vec(weights, dots.shape(), dots.device())?;
        Ok(dots.sqr()?.mul(&weights)?.sum_all()?)
    }

    /// The seed's experts-orthogonality loss: the flattened c_fc of every expert normalised
    /// (norm + 1e-12), mean over the E x E matrix of the squared strict upper triangle of
    /// their Gram matrix.
    fn experts_ortho_loss(&self) -> Result<Tensor> {
        let e = self.n_exp;
        let w = self.c_fc.dense()?.to_dtype(DType::F32)?.reshape((e, ()))?;
        let norm = (w.sqr()?.sum_keepdim(1)?.sqrt()? + 1e-12)?;
        let x = w.broadcast_div(&norm)?;
        let gram = x.matmul(&x.t()?)?;
        let upper: Vec<f32> = (0..e * e).map(|i| if i % e > i / e { 1.0 } else { 0.0 }).collect();
        let upper = Tensor::from_vec(upper, (e, e), gram.device())?;
        Ok((gram.sqr()?.mul(&upper)?.sum_all()? / (e * e) as f64)?)
    }
    /// Training path: every expert runs on an [E, capacity, C] batch gathered by index
    /// (empty slots read a zero row), outputs are scattered back with `index_add`.
    fn experts_batched(&self, x: &Tensor, plan: &RoutingPlan, probs: &Tensor, ctx: &mut MoeCtx, gate_output_loss: &mut Option<Tensor>) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let device = x.device();
        let x_flat = x;
        // ---- dispatch: [E, cap, C] batch gathered from x (row N is zeros) ----
        let cap = plan.capacity;
        let mut disp = vec![n as u32; self.n_exp * cap];
        let mut kept_pair = Vec::new(); // index into probs.flatten()
        let mut kept_slot = Vec::new(); // row in the [E * cap] expert output
        let mut kept_tok = Vec::new(); // token receiving it
        for (pair, (&e, s)) in plan.experts.iter().zip(&plan.slots).enumerate() {
            if let Some(s) = s {
                let row = e as usize * cap + *s as usize;
                disp[row] = (pair / self.k) as u32;
                kept_pair.push(pair as u32);
                kept_slot.push(row as u32);
                kept_tok.push((pair / self.k) as u32);
            }
        }
        let x_ext = Tensor::cat(&[x_flat, &Tensor::zeros((1, c), x.dtype(), device)?], 0)?;
        let disp = Tensor::from_vec(disp, self.n_exp * cap, device)?;
        let xe = x_ext.index_select(&disp, 0)?.reshape((self.n_exp, cap, c))?;
        // Slots fill in order, so expert e's tokens are its first filled[e] rows.
        let filled = plan.tokens_per_expert();
        let ye = self.run_experts(&xe, Some(&filled), ctx, gate_output_loss)?;

        // ---- combine: y[t] = sum_j prob(t, j) * expert_out(slot(t, j)) ----
        let m = kept_pair.len();
        Ok(if m == 0 {
            Tensor::zeros((n, c), x.dtype(), device)?
        } else {
            let rows = ye.index_select(&Tensor::from_vec(kept_slot, m, device)?, 0)?;
            let w = probs
                .flatten_all()?
                .index_select(&Tensor::from_vec(kept_pair, m, device)?, 0)?
                .to_dtype(x.dtype())?;
            let contrib = rows.broadcast_mul(&w.unsqueeze(1)?)?;
            Tensor::zeros((n, c), x.dtype(), device)?.index_add(&Tensor::from_vec(kept_tok, m, device)?, &contrib, 0)?
        })
    }

    /// Every expert of this layer (or of this rank's share) on its batch xe [E, cap, C];
    /// returns [E * cap, C]. `filled`: how many of each expert's rows hold tokens (the rest
    /// are empty slots' zero rows, whose outputs nothing reads), when the batch is laid out
    /// that way.
    pub(crate) fn run_experts(&self, xe: &Tensor, filled: Option<&[usize]>, ctx: &mut MoeCtx, gate_output_loss: &mut Option<Tensor>) -> Result<Tensor> {
        let (n_exp, cap, c) = xe.dims3()?;
        let (c_fc, c_proj) = (self.c_fc.dense()?, self.c_proj.dense()?);
        let h = match &self.gate_proj {
            Some(gate_proj) => {
                let (h, loss) = swiglu_experts(xe, gate_proj.dense()?, c_fc, filled, ctx.sink, ctx.cfg.use_gate_output_loss, ctx.prec)?;
                *gate_output_loss = loss;
                h
            }
            None => {
                let mut h = nn::expert_matmul_filled(xe, c_fc, filled, ctx.sink, ctx.prec)?;
                if let Some(bias) = &self.fc_bias {
                    h = nn::add_bias(&h, bias)?;
                }
                nn::activation(&h, self.act)?
            }
        };
        let mut ye = nn::expert_matmul_filled(&h, c_proj, filled, ctx.sink, ctx.prec)?;
        if let Some(bias) = &self.proj_bias {
            ye = nn::add_bias(&ye, bias)?;
        }
        if ctx.training && self.dropout > 0.0 {
            if let Some(rng) = ctx.rng.as_deref_mut() {
                ye = nn::dropout(&ye, self.dropout, rng)?;
            }
        }
        Ok(ye.reshape((n_exp * cap, c))?)
    }

    /// Inference path: only the experts that received tokens run, each on exactly its
    /// tokens (no capacity padding), so decoding one token reads k experts' weights, not all.
    fn experts_grouped(&self, x: &Tensor, plan: &RoutingPlan, probs: &Tensor) -> Result<Tensor> {
        let mut per_expert: Vec<(Vec<u32>, Vec<u32>)> = vec![(Vec::new(), Vec::new()); self.n_exp];
        for (pair, (&e, s)) in plan.experts.iter().zip(&plan.slots).enumerate() {
            if s.is_some() {
                per_expert[e as usize].0.push((pair / self.k) as u32);
                per_expert[e as usize].1.push(pair as u32);
            }
        }
        let probs = probs.flatten_all()?;
        if let Some(y) = self.experts_streamed(x, &per_expert, &probs)? {
            return Ok(y);
        }
        self.experts_one_by_one(x, per_expert, &probs)
    }

    /// [`experts_grouped`](Self::experts_grouped) one expert after the other, each product
    /// on its own (prompts; experts in the training layout).
    fn experts_one_by_one(&self, x: &Tensor, per_expert: Vec<(Vec<u32>, Vec<u32>)>, probs: &Tensor) -> Result<Tensor> {
        let (n, c) = x.dims2()?;
        let device = x.device();
        let mut y = Tensor::zeros((n, c), x.dtype(), device)?;
        for (e, (toks, pairs)) in per_expert.into_iter().enumerate() {
            if toks.is_empty() {
                continue;
            }
            let m = toks.len();
            let toks = Tensor::from_vec(toks, m, device)?;
            let xe = if m == n && n == 1 { x.clone() } else { x.index_select(&toks, 0)? };
            let gate = self.gate_proj.as_ref().map(|g| g.expert(&xe, e)).transpose()?;
            let h = self.expert_hidden(e, self.c_fc.expert(&xe, e)?, gate)?;
            y = self.add_expert_output(y, e, self.c_proj.expert(&h, e)?, &toks, &pairs, probs)?;
        }
        Ok(y)
    }

    /// Expert `e`'s hidden activations from its up product (and, SwiGLU experts, its gate
    /// product).
    fn expert_hidden(&self, e: usize, up: Tensor, gate: Option<Tensor>) -> Result<Tensor> {
        match gate {
            Some(g) => nn::swiglu(&g, &up),
            None => {
                let up = match &self.fc_bias {
                    Some(bias) => nn::add_bias(&up, &bias.get(e)?)?,
                    None => up,
                };
                nn::activation(&up, self.act)
            }
        }
    }

    /// `y` plus expert `e`'s down product (its bias added) at the rows `toks`, each weighted
    /// by the routing probability of its (token, choice) pair in `pairs`.
    fn add_expert_output(&self, y: Tensor, e: usize, down: Tensor, toks: &Tensor, pairs: &[u32], probs: &Tensor) -> Result<Tensor> {
        let ye = match &self.proj_bias {
            Some(bias) => nn::add_bias(&down, &bias.get(e)?)?,
            None => down,
        };
        let w = probs.index_select(&Tensor::from_slice(pairs, pairs.len(), y.device())?, 0)?.to_dtype(y.dtype())?;
        Ok(y.index_add(toks, &ye.broadcast_mul(&w.unsqueeze(1)?)?, 0)?)
    }

    /// Decoding (at most `MAX_ROWS` rows per expert, experts [E, N, K]): every active
    /// expert's up (and gate) product in one parallel pass, then every down product in
    /// another ([`expert_products`]), instead of a pass per product - the same numbers as
    /// [`experts_one_by_one`](Self::experts_one_by_one), bit for bit. None when the layer
    /// does not qualify.
    fn experts_streamed(&self, x: &Tensor, per_expert: &[(Vec<u32>, Vec<u32>)], probs: &Tensor) -> Result<Option<Tensor>> {
        let (n, c) = x.dims2()?;
        let rows_ok = per_expert.iter().all(|(t, _)| t.len() <= crate::kernels::matvec::MAX_ROWS);
        let nk = self.c_fc.is_nk() && self.c_proj.is_nk() && self.gate_proj.as_ref().is_none_or(Mat::is_nk);
        if !rows_ok || !nk || x.dtype() != DType::F32 || !x.device().is_cpu() {
            return Ok(None);
        }
        let device = x.device();
        let xh: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let active: Vec<usize> = (0..per_expert.len()).filter(|&e| !per_expert[e].0.is_empty()).collect();
        if active.is_empty() {
            return Ok(Some(Tensor::zeros((n, c), x.dtype(), device)?));
        }
        let xe: Vec<Vec<f32>> = active.iter().map(|&e| per_expert[e].0.iter().flat_map(|&t| xh[t as usize * c..(t as usize + 1) * c].iter().copied()).collect()).collect();
        let mut jobs = expert_jobs(&self.c_fc, &active, &xe, c);
        if let Some(g) = &self.gate_proj {
            jobs.extend(expert_jobs(g, &active, &xe, c));
        }
        let Some(mut up) = expert_products(&jobs, c)? else { return Ok(None) };
        let hidden = up[0].len() / per_expert[active[0]].0.len();
        let h = if self.gate_proj.is_none() && self.fc_bias.is_none() {
            // The plain activation, every expert's rows in place at once (the bits of
            // `expert_hidden`'s fused op, a pass of its own per expert).
            use rayon::prelude::*;
            up.par_iter()
                .map(|u| {
                    let mut h = crate::kernels::for_overwrite(u.len());
                    crate::kernels::gelu::activate_slice(u, &mut h, self.act);
                    h
                })
                .collect()
        } else {
            let mut gates = up.split_off(active.len()).into_iter();
            let mut h = Vec::with_capacity(active.len());
            for (u, &e) in up.into_iter().zip(&active) {
                let m = per_expert[e].0.len();
                let gate = gates.next().map(|g| Tensor::from_vec(g, (m, hidden), device)).transpose()?;
                let hi = self.expert_hidden(e, Tensor::from_vec(u, (m, hidden), device)?, gate)?;
                h.push(hi.flatten_all()?.to_vec1::<f32>()?);
            }
            h
        };
        let jobs = expert_jobs(&self.c_proj, &active, &h, hidden);
        let Some(down) = expert_products(&jobs, hidden)? else { return Ok(None) };
        if self.proj_bias.is_none() && probs.dtype() == DType::F32 {
            // y[t] += prob(t, j) * out_e[row], expert after expert in order, as
            // `add_expert_output`'s index_add of the weighted rows adds them (from zero).
            let p: Vec<f32> = probs.to_vec1()?;
            let mut y = vec![0f32; n * c];
            for (d, &e) in down.iter().zip(&active) {
                let (toks, pairs) = &per_expert[e];
                for ((&t, &pair), row) in toks.iter().zip(pairs).zip(d.chunks_exact(c)) {
                    let w = p[pair as usize];
                    for (acc, &v) in y[t as usize * c..(t as usize + 1) * c].iter_mut().zip(row) {
                        *acc += v * w;
                    }
                }
            }
            return Ok(Some(Tensor::from_vec(y, (n, c), device)?));
        }
        let mut y = Tensor::zeros((n, c), x.dtype(), device)?;
        for (d, &e) in down.into_iter().zip(&active) {
            let (toks, pairs) = &per_expert[e];
            let m = toks.len();
            y = self.add_expert_output(y, e, Tensor::from_vec(d, (m, c), device)?, &Tensor::from_slice(toks, m, device)?, pairs, probs)?;
        }
        Ok(Some(y))
    }
}

/// The seed's SwiGLU experts on the dispatched batch xe [E, cap, C]: silu(xe w_gate) *
/// (xe w_up), and with `gate_loss` its gate-output loss on xe w_gate. f32 CPU tensors take
/// the fused op (one product pass forward and one backward, the loss's gradient joined to
/// it: `kernels::swiglu_experts`); others the separate products.
pub(crate) fn swiglu_experts(xe: &Tensor, w_gate: &Tensor, w_up: &Tensor, filled: Option<&[usize]>, sink: Option<&GradSink>, gate_loss: bool, prec: Precision) -> Result<(Tensor, Option<Tensor>)> {
    use crate::kernels::swiglu_experts as fused;
    if [xe, w_gate, w_up].iter().all(|t| t.dtype() == DType::F32 && t.device().is_cpu()) {
        let state = fused::SwiGluState::new();
        let h = fused::swiglu_experts_filled(xe, w_gate, w_up, filled, sink, &state, 0.1, prec)?;
        let loss = if gate_loss { Some(fused::gate_output_loss(&h, &state)?) } else { None };
        return Ok((h, loss));
    }
    swiglu_experts_composite(xe, w_gate, w_up, sink, gate_loss, prec)
}

/// [`swiglu_experts`] from separate ops (the fused op's reference).
pub(crate) fn swiglu_experts_composite(xe: &Tensor, w_gate: &Tensor, w_up: &Tensor, sink: Option<&GradSink>, gate_loss: bool, prec: Precision) -> Result<(Tensor, Option<Tensor>)> {
    let g = nn::expert_matmul(xe, w_gate, sink, prec)?;
    let loss = if gate_loss { Some(gate_output_loss_of(&g, xe, w_gate, sink, prec)?) } else { None };
    Ok((nn::swiglu(&g, &nn::expert_matmul(xe, w_up, sink, prec)?)?, loss))
}

/// One product per active expert `active[i]` on its rows `xs[i]` (rows of length k).
fn expert_jobs<'a>(w: &'a Mat, active: &[usize], xs: &'a [Vec<f32>], k: usize) -> Vec<ExpertJob<'a>> {
    active.iter().zip(xs).map(|(&e, x)| ExpertJob { w, e, x, m: x.len() / k.max(1) }).collect()
}

/// The seed's gate-output loss of one layer: (scale_grad(x, 0.1) gate_proj)^2 averaged over
/// features, then over the rows of the [E, cap] batch whose value is not zero (padding
/// slots are zero rows). `g` is the layer's gate product x gate_proj, reused: the seed
/// computes it a second time through the gradient scaler.
fn gate_output_loss_of(g: &Tensor, xe: &Tensor, gate_proj: &Tensor, sink: Option<&GradSink>, prec: Precision) -> Result<Tensor> {
    let g = nn::gate_loss_tap(g, xe, gate_proj, 0.1, sink, prec)?;
    let rows = g.sqr()?.mean_keepdim(2)?; // [E, cap, 1]
    let host: Vec<f32> = rows.flatten_all()?.to_vec1()?;
    let kept = host.iter().filter(|&&v| v > 0.0).count();
    if kept == 0 {
        return Ok(Tensor::zeros((), DType::F32, xe.device())?);
    }
    let mask: Vec<f32> = host.iter().map(|&v| if v > 0.0 { 1.0 } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, rows.shape(), xe.device())?;
    Ok((rows.mul(&mask)?.sum_all()? / kept as f64)?)
}

pub(crate) fn mean_entropy(logits: &[Vec<f32>]) -> f32 {
    if logits.is_empty() {
        return 0.0;
    }
    let mut total = 0f64;
    for row in logits {
        let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let z: f64 = row.iter().map(|&v| (v as f64 - m).exp()).sum();
        let lz = z.ln();
        total -= row.iter().map(|&v| {
            let lp = v as f64 - m - lz;
            lp.exp() * lp
        }).sum::<f64>();
    }
    (total / logits.len() as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn cfg(n_exp: usize, k: usize) -> GPTConfig {
        GPTConfig { n_exp, moe_top_k: k, min_capacity: 1, ..GPTConfig::tiny() }
    }

    #[test]
    fn capacity_formula_matches_nanomoe() {
        let c = GPTConfig { n_exp: 8, moe_top_k: 2, min_capacity: 4, ..GPTConfig::tiny() };
        // floor(2 * 1.25 * 100 / 8) = 31 -> 32 (even)
        assert_eq!(expert_capacity(&c, 100, 1.25), 32);
        // floor(2 * 2.0 * 3 / 8) = 1 -> 2 -> min_capacity 4
        assert_eq!(expert_capacity(&c, 3, 2.0), 4);
        // floor(2 * 2.0 * 12 / 8) = 6
        assert_eq!(expert_capacity(&c, 12, 2.0), 6);
        let c1 = cfg(4, 1);
        // floor(1 * 1.0 * 5 / 4) = 1 -> 2
        assert_eq!(expert_capacity(&c1, 5, 1.0), 2);
    }

    #[test]
    fn first_choices_take_precedence_and_earlier_tokens_win() {
        // 3 experts, top-2, capacity 2.
        let logits = vec![
            vec![3.0, 2.0, 0.0], // t0: e0, e1
            vec![0.0, 3.0, 2.0], // t1: e1, e2
            vec![3.0, 0.0, 2.0], // t2: e0, e2
            vec![3.0, 2.0, 0.0], // t3: e0, e1
        ];
        let p = RoutingPlan::new(&logits, 3, 2, Some(2));
        assert_eq!(p.experts, vec![0, 1, 1, 2, 0, 2, 0, 1]);
        // first choices: t0->e0 s0, t1->e1 s0, t2->e0 s1, t3->e0 dropped (full)
        // second choices: t0->e1 s1, t1->e2 s0, t2->e2 s1, t3->e1 dropped (full)
        assert_eq!(p.slots, vec![Some(0), Some(1), Some(0), Some(0), Some(1), Some(1), None, None]);
        assert_eq!(p.tokens_per_expert(), vec![2, 2, 2]);
        assert_eq!(p.dropped(), 2);
        assert_eq!(p.choice_fraction(), vec![0.75, 0.75, 0.5]);
        // Dropless keeps everything.
        let d = RoutingPlan::new(&logits, 3, 2, None);
        assert_eq!(d.capacity, 3);
        assert_eq!(d.dropped(), 0);
    }

    /// The streamed decoding path gives the bits of the one-expert-at-a-time path, in every
    /// weight format with [E, N, K] experts, for bias-free GELU experts (nanoMoE's default),
    /// GELU experts with biases (GPT-2's) and SwiGLU experts.
    #[test]
    fn streamed_experts_equal_one_by_one_bit_for_bit() {
        use crate::params::{param_specs, ParamStore};
        use crate::quant::QKind;
        let base = GPTConfig { n_embd: 32, n_exp: 4, moe_top_k: 2, stride: 1, ..GPTConfig::tiny() };
        for cfg in [base.clone(), GPTConfig { bias: true, ..base.clone() }, base.clone().with_seed_architecture(true)] {
            let trained = ParamStore::init(&param_specs(&cfg), 3, &candle_core::Device::Cpu).unwrap();
            let stores = [
                trained.clone().into_inference_layout().unwrap(),
                trained.clone().into_dtype(DType::BF16, |n, t| crate::params::is_weight_matrix(n, t.rank())).unwrap().into_inference_layout().unwrap(),
                trained.clone().into_quantized(QKind::Q8_0).unwrap(),
                trained.clone().into_quantized(QKind::Q4_0).unwrap(),
            ];
            let mut rng = StdRng::seed_from_u64(1);
            let n = 7;
            let x: Vec<f32> = (0..n * 32).map(|_| StandardNormal.sample(&mut rng)).collect();
            let x = Tensor::from_vec(x, (n, 32), &candle_core::Device::Cpu).unwrap();
            let logits: Vec<Vec<f32>> = (0..n).map(|_| (0..4).map(|_| StandardNormal.sample(&mut rng)).collect()).collect();
            let plan = RoutingPlan::new(&logits, 4, 2, None);
            let probs = Tensor::from_vec((0..n * 2).map(|i| 0.1 + i as f32 * 0.05).collect::<Vec<f32>>(), n * 2, &candle_core::Device::Cpu).unwrap();
            for p in &stores {
                let layer = MoeLayer::load(&cfg, p, "transformer.h.0.mlp", 0, None).unwrap();
                let mut per_expert = vec![(Vec::new(), Vec::new()); 4];
                for (pair, &e) in plan.experts.iter().enumerate() {
                    per_expert[e as usize].0.push((pair / 2) as u32);
                    per_expert[e as usize].1.push(pair as u32);
                }
                let streamed = layer.experts_streamed(&x, &per_expert, &probs).unwrap().expect("qualifies");
                let one = layer.experts_one_by_one(&x, per_expert, &probs).unwrap();
                let (a, b): (Vec<f32>, Vec<f32>) = (streamed.flatten_all().unwrap().to_vec1().unwrap(), one.flatten_all().unwrap().to_vec1().unwrap());
                assert!(a.iter().any(|v| *v != 0.0));
                assert_eq!(a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), b.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), "{:?}", layer.c_fc.format());
            }
            // The training layout does not qualify.
            let layer = MoeLayer::load(&cfg, &trained, "transformer.h.0.mlp", 0, None).unwrap();
            assert!(layer.experts_streamed(&x, &[(vec![0], vec![0]), (vec![], vec![]), (vec![], vec![]), (vec![], vec![])], &probs).unwrap().is_none());
        }
    }

    /// The fused SwiGLU experts against the separate ops: values, the gate-output loss, and
    /// the gradients of x and both weights (through a sink too), with padding rows in x.
    #[test]
    fn fused_swiglu_experts_match_the_separate_ops() {
        use candle_core::{Device, Var};
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(9);
        let (e, m, c, i) = (3, 5, 8, 12);
        let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let mut xv = r(e * m * c);
        xv[(m - 1) * c..m * c].fill(0.0); // a padding slot of expert 0
        xv[(2 * m - 2) * c..2 * m * c].fill(0.0); // two of expert 1
        let x = Var::from_vec(xv, (e, m, c), &Device::Cpu).unwrap();
        let wg = Var::from_vec(r(e * c * i), (e, c, i), &Device::Cpu).unwrap();
        let wu = Var::from_vec(r(e * c * i), (e, c, i), &Device::Cpu).unwrap();
        let gy = Tensor::from_vec(r(e * m * i), (e, m, i), &Device::Cpu).unwrap();
        let max = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        // Also told which rows hold tokens (4, 3 and 5 of 5): the products skip the padding
        // rows, with the same h, loss and gradients when nothing reads the padding rows' h
        // (their upstream gradient zero, as the combine step gives).
        let filled = [m - 1, m - 2, m];
        let mut keep = vec![1f32; e * m * i];
        for (j, &f) in filled.iter().enumerate() {
            keep[(j * m + f) * i..(j + 1) * m * i].fill(0.0);
        }
        let gy_unread = gy.mul(&Tensor::from_vec(keep, (e, m, i), &Device::Cpu).unwrap()).unwrap();
        for (rows, gy) in [(None, &gy), (Some(&filled[..]), &gy_unread)] {
            for gate_loss in [true, false] {
                let objective = |h: &Tensor, l: &Option<Tensor>| {
                    let mut o = h.mul(gy).unwrap().sum_all().unwrap();
                    if let Some(l) = l {
                        o = (o + (l * 3.0).unwrap()).unwrap();
                    }
                    o
                };
                let (hf, lf) = swiglu_experts(&x, &wg, &wu, rows, None, gate_loss, Precision::F32).unwrap();
                let (hc, lc) = swiglu_experts_composite(&x, &wg, &wu, None, gate_loss, Precision::F32).unwrap();
                assert!(max(&hf, &hc) < 1e-5);
                if gate_loss {
                    let (a, b) = (lf.as_ref().unwrap().to_scalar::<f32>().unwrap(), lc.as_ref().unwrap().to_scalar::<f32>().unwrap());
                    assert!(a > 0.0 && (a - b).abs() < 1e-5 * b.abs().max(1.0), "{a} vs {b}");
                }
                let gf = objective(&hf, &lf).backward().unwrap();
                let gc = objective(&hc, &lc).backward().unwrap();
                for v in [&x, &wg, &wu] {
                    let d = max(gf.get(v).unwrap(), gc.get(v).unwrap());
                    assert!(d < 1e-4, "filled rows {rows:?}, gate loss {gate_loss}: gradient differs by {d}");
                }
                // Through a sink: the weights' gradients deposited, the same numbers.
                let sink = GradSink::new();
                let (hs, ls) = swiglu_experts(&x, &wg, &wu, rows, Some(&sink), gate_loss, Precision::F32).unwrap();
                let gs = sink.backward(&objective(&hs, &ls)).unwrap();
                for v in [&x, &wg, &wu] {
                    assert_eq!(max(gf.get(v).unwrap(), gs.get(v).unwrap()), 0.0);
                }
            }
        }
    }

    #[test]
    fn ties_go_to_the_lower_expert() {
        let p = RoutingPlan::new(&[vec![1.0, 1.0, 1.0, 1.0]], 4, 2, None);
        assert_eq!(p.experts, vec![0, 1]);
    }
}
