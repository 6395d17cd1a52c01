//! The GPT model: GPT-2's architecture or the seed's (RMSNorm, QK-norm, ReLU^2, SwiGLU
//! experts), with an MoE layer in place of the MLP in every `stride`-th block (nanoMoE).
//! Read top to bottom: norm, attention, MLP, block, model, forward passes.
//!
//! Weights are stored as torch's nn.Linear does ([out, in]) under the HF tensor names of a
//! `nanomoe_gpt` checkpoint; GPT-2's Conv1D layout is handled only in `checkpoint.rs`.

use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use rand::{rngs::StdRng, SeedableRng};

use crate::config::{Activation, GPTConfig, NormType};
use crate::error::{input_err, Result};
use crate::kernels::attention::{self, CausalMask};
use crate::kernels::residual::Stage;
use crate::kernels::{self, Precision};
use crate::grad_sink::GradSink;
use crate::moe::{MoeCtx, MoeLayer, MoeStats, Routing};
use crate::moe_parallel::ExpertShard;
use crate::nn;
use crate::params::{param_specs, ParamStore};
use crate::weight::{Mat, WeightFormat};

mod packed;
pub use packed::{PackedSeq, MAX_PACKED_TOKENS};

/// LayerNorm (weight, optional bias) or RMSNorm (weight only), per the config.
struct Norm {
    w: Tensor,
    b: Option<Tensor>,
    eps: f64,
    kind: NormType,
}

impl Norm {
    fn load(p: &ParamStore, prefix: &str, cfg: &GPTConfig) -> Result<Self> {
        Ok(Norm { w: p.get(&format!("{prefix}.weight"))?, b: opt(p, &format!("{prefix}.bias"))?, eps: cfg.layer_norm_epsilon, kind: cfg.norm_type })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.kind {
            NormType::LayerNorm => nn::layer_norm(x, &self.w, self.b.as_ref(), self.eps),
            NormType::RmsNorm => nn::rms_norm(x, Some(&self.w), self.eps),
        }
    }
    fn detached(&self) -> Self {
        Norm { w: self.w.detach(), b: self.b.as_ref().map(Tensor::detach), eps: self.eps, kind: self.kind }
    }
    /// The norm as stages of a residual chain, when its tensors are f32.
    fn stages(&self) -> Option<Vec<Stage>> {
        if self.w.dtype() != DType::F32 || self.b.as_ref().is_some_and(|b| b.dtype() != DType::F32) {
            return None;
        }
        Some(match self.kind {
            NormType::LayerNorm => kernels::layer_norm::stages(&self.w, self.b.as_ref(), self.eps),
            NormType::RmsNorm => vec![kernels::rms_norm::stage(&self.w, self.eps)],
        })
    }
}

struct Linear {
    w: Mat,
    b: Option<Tensor>,
}

impl Linear {
    fn load(p: &ParamStore, prefix: &str) -> Result<Self> {
        Ok(Linear { w: p.mat(&format!("{prefix}.weight"))?, b: opt(p, &format!("{prefix}.bias"))? })
    }
    fn forward(&self, x: &Tensor, prec: Precision) -> Result<Tensor> {
        self.w.linear_in(x, self.b.as_ref(), prec)
    }
    fn detached(&self) -> Self {
        Linear { w: self.w.detached(), b: self.b.as_ref().map(Tensor::detach) }
    }
    /// The layer as stages of a residual chain, when its weights are f32 [out, in] tensors.
    fn stages(&self, prec: Precision) -> Option<Vec<Stage>> {
        match (&self.w, &self.b) {
            (Mat::Dense(w), b) if w.dtype() == DType::F32 && b.as_ref().is_none_or(|b| b.dtype() == DType::F32) => {
                Some(kernels::linear::stages(w, b.as_ref(), prec))
            }
            _ => None,
        }
    }
}

fn opt(p: &ParamStore, name: &str) -> Result<Option<Tensor>> {
    Ok(if p.var(name).is_some() { Some(p.get(name)?) } else { None })
}

/// Keys and values ([B, T, C] each, heads side by side) of every layer for the tokens seen so far.
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    /// Positions to make room for when the buffers are first allocated (see
    /// [`KvCache::with_capacity`]).
    reserve: usize,
}

/// One layer's keys and values: buffers [B, capacity, C] whose first `len` positions are
/// filled. New positions are written in place and the buffers double when full, so a decoding
/// step copies only its own keys and values, not the whole cache as concatenation would (at
/// 900 cached tokens of GPT-2 that was 33 MB per token, plus fresh pages for it).
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl LayerKv {
    fn filled(&self) -> Result<(Tensor, Tensor)> {
        Ok((self.k.narrow(1, 0, self.len)?, self.v.narrow(1, 0, self.len)?))
    }

    /// Appends k, v [B, t, C]. Tensors that record a graph are concatenated instead (writing
    /// in place would cut their gradients).
    fn append<'a>(slot: &'a mut Option<LayerKv>, k: &Tensor, v: &Tensor, block_size: usize, reserve: usize) -> Result<&'a LayerKv> {
        let (b, t, c) = k.dims3()?;
        if k.track_op() || v.track_op() {
            let (k, v) = match slot.take() {
                Some(old) => {
                    let (pk, pv) = old.filled()?;
                    (Tensor::cat(&[&pk, k], 1)?, Tensor::cat(&[&pv, v], 1)?)
                }
                None => (k.contiguous()?, v.contiguous()?),
            };
            let len = k.dim(1)?;
            return Ok(slot.insert(LayerKv { k, v, len }));
        }
        let len = slot.as_ref().map_or(0, |l| l.len);
        if slot.as_ref().is_none_or(|l| len + t > l.k.dims()[1]) {
            let cap = (2 * (len + t)).max(16).max(reserve).min(block_size).max(len + t);
            let (nk, nv) = (Tensor::zeros((b, cap, c), k.dtype(), k.device())?, Tensor::zeros((b, cap, c), v.dtype(), v.device())?);
            if let Some(old) = slot.as_ref() {
                let (pk, pv) = old.filled()?;
                nk.slice_set(&pk.contiguous()?, 1, 0)?;
                nv.slice_set(&pv.contiguous()?, 1, 0)?;
            }
            *slot = Some(LayerKv { k: nk, v: nv, len });
        }
        let layer = slot.as_mut().expect("allocated above");
        layer.k.slice_set(&k.contiguous()?, 1, len)?;
        layer.v.slice_set(&v.contiguous()?, 1, len)?;
        layer.len = len + t;
        Ok(layer)
    }
}

/// A copy owns its buffers: the two caches can then grow apart (the buffers are written in
/// place, so sharing them would not be safe).
impl Clone for KvCache {
    fn clone(&self) -> Self {
        let copy = |l: &LayerKv| -> LayerKv {
            let deep = |t: &Tensor| t.copy().expect("copying a tensor of the same device");
            LayerKv { k: deep(&l.k), v: deep(&l.v), len: l.len }
        };
        KvCache { layers: self.layers.iter().map(|l| l.as_ref().map(copy)).collect(), reserve: self.reserve }
    }
}

impl KvCache {
    pub fn new() -> Self {
        Self::default()
    }
    /// A cache whose buffers, once allocated, hold `positions` positions (at most the
    /// model's block size) before they grow: a caller that knows how long a sequence will
    /// get (prompt + max new tokens) then never pays for doubling and copying the buffers
    /// mid-generation - a pause of every sequence decoded in the same step.
    pub fn with_capacity(positions: usize) -> Self {
        KvCache { layers: Vec::new(), reserve: positions }
    }
    /// Number of cached positions.
    pub fn seq_len(&self) -> usize {
        match self.layers.first() {
            Some(Some(l)) => l.len,
            _ => 0,
        }
    }
    pub fn clear(&mut self) {
        self.layers.clear();
    }
}

/// Per-forward options shared by every layer.
struct Ctx<'a> {
    cfg: &'a GPTConfig,
    training: bool,
    routing: Routing,
    rng: &'a mut StdRng,
    sink: Option<&'a GradSink>,
    /// The KV cache's [`KvCache::with_capacity`].
    kv_reserve: usize,
    /// The matrix products' precision ([`GPT::set_precision`]).
    prec: Precision,
}

struct CausalSelfAttention {
    c_attn: Linear,
    c_proj: Linear,
    n_head: usize,
    /// RMS-normalise every head's q and k (the seed).
    qk_norm: bool,
}

/// The attention mask of one forward pass: as a tensor for the composite path, and as
/// (past, left padding) for the fused kernel.
struct Mask {
    /// [B or 1, 1, T, T_total] of 1 = may attend.
    tensor: Tensor,
    causal: CausalMask,
}

impl CausalSelfAttention {
    /// x: [B, T, C]. The fused kernel runs for f32 CPU tensors unless attention dropout is on
    /// (or gradients are tracked through a KV cache); candle's composite ops otherwise.
    fn forward(&self, x: &Tensor, mask: &Mask, cache: Option<&mut Option<LayerKv>>, ctx: &mut Ctx) -> Result<Tensor> {
        let (_, _, c) = x.dims3()?;
        let mut qkv = self.c_attn.forward(x, ctx.prec)?;
        if self.qk_norm {
            qkv = nn::qk_norm(&qkv, self.n_head)?;
        }
        let attn_dropout = ctx.training && ctx.cfg.dropout > 0.0;
        let fused = qkv.dtype() == DType::F32 && qkv.device().is_cpu() && !attn_dropout;
        let y = match cache {
            None if fused => attention::causal_attention(&qkv, self.n_head, mask.causal.clone())?,
            cache => {
                let q = qkv.narrow(2, 0, c)?;
                let (k, v) = (qkv.narrow(2, c, c)?, qkv.narrow(2, 2 * c, c)?);
                let tracked = q.track_op() || k.track_op() || v.track_op();
                let cached = match cache {
                    Some(slot) => Some(LayerKv::append(slot, &k, &v, ctx.cfg.block_size, ctx.kv_reserve)?),
                    None => None,
                };
                match cached {
                    // Keys and values read where the cache keeps them.
                    Some(layer) if fused && !tracked => attention::cached_attention(&q, &layer.k, &layer.v, layer.len, self.n_head, &mask.causal)?,
                    cached => {
                        let (k, v) = match cached {
                            Some(layer) => layer.filled()?,
                            None => (k, v),
                        };
                        let drop = if attn_dropout { Some((ctx.cfg.dropout, &mut *ctx.rng)) } else { None };
                        nn::attention_composite(&q, &k, &v, self.n_head, &mask.tensor, drop)?
                    }
                }
            }
        };
        let mut y = self.c_proj.forward(&y, ctx.prec)?;
        if ctx.training && ctx.cfg.dropout > 0.0 {
            y = nn::dropout(&y, ctx.cfg.dropout, ctx.rng)?;
        }
        Ok(y)
    }
}

enum Mlp {
    Dense { c_fc: Linear, c_proj: Linear, act: Activation },
    Moe(MoeLayer),
}

/// Losses and routing statistics collected from the MoE layers of one forward pass.
#[derive(Default)]
struct MoeTotals {
    /// Each term summed over the MoE layers (`ntp_loss` stays empty).
    losses: Losses,
    stats: Vec<MoeStats>,
}

fn add(acc: &mut Option<Tensor>, x: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        Some(a) => (a + x)?,
        None => x,
    });
    Ok(())
}

/// The gradient sink a block's residual branches deposit their weights' gradients in when
/// they run as one chain node each (`kernels::residual`): passes that will go through
/// [`GradSink::backward`], on f32 CPU activations, without dropout (which the chains leave
/// out). None: the branches run op by op.
fn chain_sink<'a>(x: &Tensor, ctx: &Ctx<'a>) -> Option<&'a GradSink> {
    let dropout = ctx.training && ctx.cfg.dropout > 0.0;
    (x.dtype() == DType::F32 && x.device().is_cpu() && !dropout).then_some(ctx.sink).flatten()
}

struct Block {
    ln_1: Norm,
    attn: CausalSelfAttention,
    ln_2: Norm,
    mlp: Mlp,
}

impl Block {
    /// The same block on weights that track no gradients (inference).
    fn detached(&self) -> Self {
        Block {
            ln_1: self.ln_1.detached(),
            attn: CausalSelfAttention { c_attn: self.attn.c_attn.detached(), c_proj: self.attn.c_proj.detached(), n_head: self.attn.n_head, qk_norm: self.attn.qk_norm },
            ln_2: self.ln_2.detached(),
            mlp: match &self.mlp {
                Mlp::Dense { c_fc, c_proj, act } => Mlp::Dense { c_fc: c_fc.detached(), c_proj: c_proj.detached(), act: *act },
                Mlp::Moe(layer) => Mlp::Moe(layer.detached()),
            },
        }
    }

    fn forward(&self, x: &Tensor, mask: &Mask, cache: Option<&mut Option<LayerKv>>, ctx: &mut Ctx, moe: &mut MoeTotals) -> Result<Tensor> {
        let chained = match (cache.is_none(), chain_sink(x, ctx)) {
            (true, Some(sink)) => self.attn_stages(mask, ctx).map(|s| (s, sink)),
            _ => None,
        };
        let x = match chained {
            Some((stages, sink)) => kernels::residual::residual(x, stages, sink)?,
            None => (x + self.attn.forward(&self.ln_1.forward(x)?, mask, cache, ctx)?)?,
        };
        self.mlp_residual(x, ctx, moe)
    }

    /// ln_1, c_attn, QK-norm, attention and c_proj as a residual chain's stages (f32 weights).
    fn attn_stages(&self, mask: &Mask, ctx: &Ctx) -> Option<Vec<Stage>> {
        let (a, c, prec) = (&self.attn, ctx.cfg.n_embd, ctx.prec);
        let mut s = self.ln_1.stages()?;
        s.extend(a.c_attn.stages(prec)?);
        if a.qk_norm {
            s.push(kernels::rms_norm::qk_stage(c, c / a.n_head, nn::QK_NORM_EPS));
        }
        s.push(kernels::attention::stage(a.n_head, mask.causal.clone()));
        s.extend(a.c_proj.stages(prec)?);
        Some(s)
    }

    /// ln_2, c_fc, the activation and c_proj of a dense MLP as a residual chain's stages.
    fn mlp_stages(&self, prec: Precision) -> Option<Vec<Stage>> {
        let Mlp::Dense { c_fc, c_proj, act } = &self.mlp else { return None };
        let mut s = self.ln_2.stages()?;
        s.extend(c_fc.stages(prec)?);
        s.push(kernels::gelu::stage(*act));
        s.extend(c_proj.stages(prec)?);
        Some(s)
    }

    /// x + mlp(ln_2(x)): the second half of a block.
    fn mlp_residual(&self, x: Tensor, ctx: &mut Ctx, moe: &mut MoeTotals) -> Result<Tensor> {
        if let Some(sink) = chain_sink(&x, ctx) {
            if let Some(stages) = self.mlp_stages(ctx.prec) {
                return kernels::residual::residual(&x, stages, sink);
            }
        }
        let h = self.ln_2.forward(&x)?;
        let y = match &self.mlp {
            Mlp::Dense { c_fc, c_proj, act } => {
                let y = c_proj.forward(&nn::activation(&c_fc.forward(&h, ctx.prec)?, *act)?, ctx.prec)?;
                if ctx.training && ctx.cfg.dropout > 0.0 {
                    nn::dropout(&y, ctx.cfg.dropout, ctx.rng)?
                } else {
                    y
                }
            }
            Mlp::Moe(layer) => {
                let mut mctx = MoeCtx { cfg: ctx.cfg, training: ctx.training, routing: ctx.routing, rng: Some(&mut *ctx.rng), sink: ctx.sink, prec: ctx.prec };
                let out = layer.forward(&h, &mut mctx)?;
                let l = &mut moe.losses;
                for (acc, term) in [
                    (&mut l.aux_loss, Some(out.aux_loss)),
                    (&mut l.router_z_loss, Some(out.z_loss)),
                    (&mut l.router_ortho_loss, out.router_ortho_loss),
                    (&mut l.experts_ortho_loss, out.experts_ortho_loss),
                    (&mut l.gate_output_loss, out.gate_output_loss),
                ] {
                    if let Some(term) = term {
                        add(acc, term)?;
                    }
                }
                moe.stats.push(out.stats);
                out.y
            }
        };
        Ok((x + y)?)
    }
}

/// Loss terms of one forward pass. Each MoE term is the unweighted sum over MoE layers; the
/// total loss adds them times their weights when switched on. The seed's three terms
/// (router-orthogonality, experts-orthogonality, gate-output) exist only for SwiGLU experts,
/// in training, when switched on - as the seed computes them.
#[derive(Debug, Clone, Default)]
pub struct Losses {
    pub ntp_loss: Option<Tensor>,
    pub aux_loss: Option<Tensor>,
    pub router_z_loss: Option<Tensor>,
    pub router_ortho_loss: Option<Tensor>,
    pub experts_ortho_loss: Option<Tensor>,
    pub gate_output_loss: Option<Tensor>,
}

/// HF-style output of [`GPT::forward`].
pub struct CausalLMOutput {
    /// Total loss (cross-entropy + weighted aux and z losses), when labels were given.
    pub loss: Option<Tensor>,
    /// [B, T, V]
    pub logits: Tensor,
    /// Per-loss breakdown.
    pub aux: Losses,
    /// Routing statistics per MoE layer.
    pub moe_stats: Vec<MoeStats>,
}

/// The modules of the network, on one view of the parameters.
struct Net {
    wte: Mat,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: Norm,
}

impl Net {
    fn detached(&self) -> Net {
        Net { wte: self.wte.detached(), wpe: self.wpe.detach(), blocks: self.blocks.iter().map(Block::detached).collect(), ln_f: self.ln_f.detached() }
    }
}

pub struct GPT {
    pub config: GPTConfig,
    params: ParamStore,
    /// Modules on the parameters themselves: forward passes record the graph for backward.
    net: Net,
    /// The same weights (shared storage) without gradient tracking, for decoding: nothing
    /// of one step is kept alive by the next through the KV cache, and the fused kernels
    /// that have no backward can run.
    frozen: Net,
    training: bool,
    routing: Routing,
    rng: Mutex<StdRng>,
    /// Expert-parallel training: this rank holds only its share of the experts.
    shard: Option<Arc<ExpertShard>>,
    /// How the forward and backward passes on the trainable weights compute their matrix
    /// products (decoding on the inference weights is not affected).
    precision: Precision,
}

/// Mean cross-entropy through a quantized output layer, 256 rows of logits at a time (no
/// gradient: quantized weights are for inference).
fn quantized_cross_entropy(h: &Tensor, wte: &Mat, targets: &[Option<u32>]) -> Result<Option<Tensor>> {
    let n = h.dim(0)?;
    let (mut sum, mut count) = (0f64, 0usize);
    for r0 in (0..n).step_by(256) {
        let len = 256.min(n - r0);
        let tg = &targets[r0..r0 + len];
        let kept = tg.iter().filter(|t| t.is_some()).count();
        if kept == 0 {
            continue;
        }
        let logits = wte.linear(&h.narrow(0, r0, len)?, None)?;
        if let Some(l) = nn::cross_entropy(&logits, tg)? {
            sum += l.to_scalar::<f32>()? as f64 * kept as f64;
            count += kept;
        }
    }
    Ok(if count == 0 { None } else { Some(Tensor::new((sum / count as f64) as f32, h.device())?) })
}

/// Token ids of a batch, read from an integer tensor and checked against the vocabulary.
pub(crate) fn ids_from_tensor(ids: &Tensor, vocab: usize) -> Result<Vec<Vec<u32>>> {
    let ids = match ids.rank() {
        1 => ids.unsqueeze(0)?,
        2 => ids.clone(),
        r => return Err(input_err!("input ids must have shape [batch, seq_len], got rank {r} ({:?})", ids.dims())),
    };
    if ids.dtype().is_float() {
        return Err(input_err!("input ids must be an integer tensor, got {:?}", ids.dtype()));
    }
    let rows: Vec<Vec<i64>> = ids.to_dtype(DType::I64)?.to_vec2()?;
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| {
                    if v < 0 || v as usize >= vocab {
                        Err(input_err!("token id {v} is out of range for vocab_size {vocab}"))
                    } else {
                        Ok(v as u32)
                    }
                })
                .collect()
        })
        .collect()
}

fn labels_from_tensor(labels: &Tensor, ignore: i64, vocab: usize) -> Result<Vec<Vec<Option<u32>>>> {
    let labels = if labels.rank() == 1 { labels.unsqueeze(0)? } else { labels.clone() };
    if labels.rank() != 2 || labels.dtype().is_float() {
        return Err(input_err!("labels must be an integer tensor of shape [batch, seq_len], got {:?} {:?}", labels.dtype(), labels.dims()));
    }
    let rows: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
    rows.into_iter()
        .map(|r| {
            r.into_iter()
                .map(|v| match v {
                    v if v == ignore => Ok(None),
                    v if v >= 0 && (v as usize) < vocab => Ok(Some(v as u32)),
                    v => Err(input_err!("label {v} is out of range for vocab_size {vocab} (use {ignore} to ignore a position)")),
                })
                .collect()
        })
        .collect()
}

impl GPT {
    /// Random init (nanoGPT's, or Switch Transformer's with `use_switch_tfm_init`), seed 0.
    pub fn new(config: &GPTConfig, device: &Device) -> Result<Self> {
        Self::new_seeded(config, 0, device)
    }

    pub fn new_seeded(config: &GPTConfig, seed: u64, device: &Device) -> Result<Self> {
        config.validate()?;
        let params = ParamStore::init(&param_specs(config), seed, device)?;
        Self::from_params(config.clone(), params)
    }

    /// Builds the model around existing parameters (checked against the config).
    pub fn from_params(config: GPTConfig, params: ParamStore) -> Result<Self> {
        Self::from_params_sharded(config, params, None)
    }

    /// [`from_params`](Self::from_params) for expert-parallel training: `params` holds every
    /// expert; the model keeps only this rank's share of each MoE layer's experts.
    pub fn from_params_sharded(config: GPTConfig, mut params: ParamStore, shard: Option<ExpertShard>) -> Result<Self> {
        config.validate()?;
        params.check_against(&param_specs(&config))?;
        let shard = shard.map(Arc::new);
        if let Some(s) = &shard {
            params = s.slice_params(&params)?;
        }
        let act = config.activation()?;
        let mut blocks = Vec::with_capacity(config.n_layer);
        for i in 0..config.n_layer {
            let p = format!("transformer.h.{i}");
            let mlp = if config.is_moe_layer(i) {
                Mlp::Moe(MoeLayer::load(&config, &params, &format!("{p}.mlp"), i, shard.clone())?)
            } else {
                Mlp::Dense { c_fc: Linear::load(&params, &format!("{p}.mlp.c_fc"))?, c_proj: Linear::load(&params, &format!("{p}.mlp.c_proj"))?, act }
            };
            blocks.push(Block {
                ln_1: Norm::load(&params, &format!("{p}.ln_1"), &config)?,
                attn: CausalSelfAttention {
                    c_attn: Linear::load(&params, &format!("{p}.attn.c_attn"))?,
                    c_proj: Linear::load(&params, &format!("{p}.attn.c_proj"))?,
                    n_head: config.n_head,
                    qk_norm: config.qk_norm,
                },
                ln_2: Norm::load(&params, &format!("{p}.ln_2"), &config)?,
                mlp,
            });
        }
        let net = Net {
            wte: params.mat("transformer.wte.weight")?,
            wpe: params.get("transformer.wpe.weight")?,
            ln_f: Norm::load(&params, "transformer.ln_f", &config)?,
            blocks,
        };
        Ok(GPT {
            frozen: net.detached(),
            net,
            params,
            config,
            training: false,
            routing: Routing::Capacity,
            rng: Mutex::new(StdRng::seed_from_u64(0)),
            shard,
            precision: Precision::F32,
        })
    }

    /// How forward and backward passes on the trainable weights compute their matrix
    /// products: [`Precision::F32`] (the default), or [`Precision::Bf16`] - mixed precision as
    /// nanoGPT's `dtype = 'bfloat16'` (autocast): the linear layers', experts' and output
    /// layer's products round their operands to bf16 and sum in f32; weights, gradients,
    /// optimizer state, attention, norms, the router, softmax and losses stay f32. Runs on AMX
    /// tiles or AVX512-BF16 where the CPU has them ([`crate::kernels::bf16_gemm::bf16_unit`]);
    /// elsewhere the same rounding with f32 products (same numbers, slower). Decoding is not affected.
    pub fn set_precision(&mut self, precision: Precision) {
        self.precision = precision;
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// This rank's share of the experts, when training expert-parallel.
    pub fn expert_shard(&self) -> Option<&ExpertShard> {
        self.shard.as_deref()
    }

    /// For inference: stores the weight matrices (embeddings, attention, MLPs, experts; not
    /// the router, which nanoMoE keeps in f32, nor biases and norms) as `format` says: a
    /// [`DType`] (f32, bf16, f16) or a [`WeightFormat`] (also q8_0, q4_0: GGML's blocks of
    /// 32 weights with an f16 scale; matrices whose rows are not a multiple of 32 long, and
    /// the position embedding, stay dense). Decoding streams every weight once per token,
    /// so its time follows the bytes: bf16 halves it, q8_0 reads 8.5 bits per weight, q4_0
    /// 4.5 (their products quantize the activations to 8 bits per block of 32, as llama.cpp
    /// does). Activations between layers and sums stay f32. Dense expert stacks are held
    /// [E, N, K], the layout of the decoding kernels' fastest products
    /// ([`ParamStore::into_inference_layout`]). Not for training. A model whose weights are
    /// already quantized can only stay as it is.
    pub fn with_weight_dtype(self, format: impl Into<WeightFormat>) -> Result<GPT> {
        let format = format.into();
        if self.params.is_quantized() {
            return match format == self.weight_format() {
                true => self.into_inference_layout(),
                false => Err(input_err!("the weights are stored as {}; they cannot be converted to {}", self.weight_format().name(), format.name())),
            };
        }
        let GPT { config, params, net, frozen, training, routing, .. } = self;
        // Only the store references the f32 weights now: each is freed once converted.
        drop((net, frozen));
        let params = match format {
            WeightFormat::Quant(kind) => params.into_quantized(kind)?,
            dense => {
                let dtype = dense.dtype().expect("a dense format");
                params.into_dtype(dtype, |name: &str, t: &Tensor| crate::params::is_weight_matrix(name, t.rank()))?
            }
        };
        let mut gpt = Self::from_params(config, params.into_inference_layout()?)?;
        gpt.training = training;
        gpt.routing = routing;
        Ok(gpt)
    }

    /// The model with its dense expert stacks, if any, in the inference layout
    /// ([`ParamStore::into_inference_layout`]), in the same mode.
    fn into_inference_layout(self) -> Result<GPT> {
        if !self.params.needs_inference_layout() {
            return Ok(self);
        }
        let GPT { config, params, net, frozen, training, routing, .. } = self;
        drop((net, frozen));
        let mut gpt = Self::from_params(config, params.into_inference_layout()?)?;
        gpt.training = training;
        gpt.routing = routing;
        Ok(gpt)
    }

    /// How the weight matrices are stored (see [`GPT::with_weight_dtype`]).
    pub fn weight_format(&self) -> WeightFormat {
        self.params.quantized().next().map(|(_, q)| WeightFormat::Quant(q.kind)).unwrap_or_else(|| self.net.wte.format())
    }

    /// The candle dtype of dense weight matrices (f32 for quantized models, whose dense
    /// remainder is f32).
    pub fn weight_dtype(&self) -> DType {
        self.weight_format().dtype().unwrap_or(DType::F32)
    }

    pub fn params(&self) -> &ParamStore {
        &self.params
    }

    pub fn device(&self) -> &Device {
        self.net.wpe.device()
    }

    /// Training mode: dropout, noisy top-k and train capacity are on.
    pub fn train(&mut self) {
        self.training = true;
    }

    /// Evaluation mode (the default).
    pub fn eval(&mut self) {
        self.training = false;
    }

    pub fn is_training(&self) -> bool {
        self.training
    }

    /// Capacity-limited (nanoMoE, default) or dropless MoE routing.
    pub fn set_routing(&mut self, routing: Routing) {
        self.routing = routing;
    }

    /// Seeds the generator behind dropout and router noise.
    pub fn set_seed(&self, seed: u64) {
        *self.rng.lock().unwrap_or_else(|e| e.into_inner()) = StdRng::seed_from_u64(seed);
    }

    /// Draws a seed from the model's generator.
    pub(crate) fn next_seed(&self) -> u64 {
        use rand::Rng;
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).random()
    }

    /// Total number of parameters (the tied lm_head counted once).
    pub fn num_params(&self) -> usize {
        self.params.num_params()
    }

    /// Parameters used per token: an MoE layer's experts count k / n_exp.
    pub fn num_active_params(&self) -> usize {
        let c = &self.config;
        let mut n = 0usize;
        for (name, count) in self.params.sizes() {
            if name.contains(".mlp.experts.") {
                n += count / c.n_exp * c.moe_top_k;
            } else {
                n += count;
            }
        }
        n
    }

    /// Final hidden states [B, T, C] and MoE totals. `pad[b]` left-padding positions of row b
    /// are masked out as keys and do not advance positions.
    fn hidden(&self, net: &Net, ids: &[Vec<u32>], cache: Option<&mut KvCache>, pad: Option<&[usize]>, sink: Option<&GradSink>) -> Result<(Tensor, MoeTotals)> {
        let b = ids.len();
        let t = ids.first().map(Vec::len).unwrap_or(0);
        if b == 0 || t == 0 {
            return Err(input_err!("input ids are empty"));
        }
        if ids.iter().any(|r| r.len() != t) {
            return Err(input_err!("all sequences in a batch must have the same length (left-pad them)"));
        }
        let past = cache.as_ref().map(|c| c.seq_len()).unwrap_or(0);
        let total = past + t;
        if total > self.config.block_size {
            return Err(input_err!(
                "sequence length {total} exceeds block_size {} of this model",
                self.config.block_size
            ));
        }
        if let Some(pad) = pad {
            if pad.len() != b {
                return Err(input_err!("padding lengths ({}) do not match the batch size ({b})", pad.len()));
            }
        }
        let device = self.device();
        let pad_of = |r: usize| pad.map(|p| p[r]).unwrap_or(0);
        // positions and mask
        let mut pos = Vec::with_capacity(b * t);
        for r in 0..b {
            for i in 0..t {
                pos.push((past + i).saturating_sub(pad_of(r)) as u32);
            }
        }
        let mask_rows = if pad.is_some() { b } else { 1 };
        let mut mask = Vec::with_capacity(mask_rows * t * total);
        for r in 0..mask_rows {
            for i in 0..t {
                for j in 0..total {
                    mask.push(u8::from(j <= past + i && j >= pad_of(r)));
                }
            }
        }
        let mask = Mask {
            tensor: Tensor::from_vec(mask, (mask_rows, 1, t, total), device)?,
            causal: CausalMask { past, pad: pad.map(<[usize]>::to_vec) },
        };
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        // Activations are f32 whatever the weights are stored in.
        let tok = net.wte.embed(&Tensor::from_vec(flat, b * t, device)?)?;
        let pe = net.wpe.index_select(&Tensor::from_vec(pos, b * t, device)?, 0)?.to_dtype(DType::F32)?;
        let mut x = (tok + pe)?.reshape((b, t, self.config.n_embd))?;

        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let kv_reserve = cache.as_ref().map_or(0, |c| c.reserve);
        // Mixed precision applies to the passes on the trainable weights (training and its
        // evaluations, as nanoGPT's autocast context), not to decoding on `frozen`.
        let prec = if std::ptr::eq(net, &self.net) { self.precision } else { Precision::F32 };
        let mut ctx = Ctx { cfg: &self.config, training: self.training, routing: self.routing, rng: &mut rng, sink, kv_reserve, prec };
        if ctx.training && self.config.dropout > 0.0 {
            x = nn::dropout(&x, self.config.dropout, ctx.rng)?;
        }
        let mut moe = MoeTotals::default();
        match cache {
            Some(cache) => {
                cache.layers.resize_with(net.blocks.len(), || None);
                for (block, slot) in net.blocks.iter().zip(cache.layers.iter_mut()) {
                    x = block.forward(&x, &mask, Some(slot), &mut ctx, &mut moe)?;
                }
            }
            None => {
                for block in &net.blocks {
                    x = block.forward(&x, &mask, None, &mut ctx, &mut moe)?;
                }
            }
        }
        Ok((net.ln_f.forward(&x)?, moe))
    }

    fn lm_head(net: &Net, h: &Tensor) -> Result<Tensor> {
        net.wte.linear(h, None)
    }

    /// Adds the weighted MoE losses to the next-token loss, in the seed's order.
    fn total_loss(&self, ntp: Option<Tensor>, moe: &MoeTotals) -> Result<(Option<Tensor>, Losses)> {
        let c = &self.config;
        let losses = Losses { ntp_loss: ntp.clone(), ..moe.losses.clone() };
        let mut loss = ntp;
        if let (Some(l), true) = (loss.as_mut(), c.is_moe()) {
            // The seed's three terms are only present when switched on.
            for (term, on, w) in [
                (&losses.aux_loss, c.use_aux_loss, c.aux_loss_weight),
                (&losses.router_z_loss, c.use_router_z_loss, c.router_z_loss_weight),
                (&losses.router_ortho_loss, true, c.router_ortho_loss_weight),
                (&losses.experts_ortho_loss, true, c.experts_ortho_loss_weight),
                (&losses.gate_output_loss, true, c.gate_output_loss_weight),
            ] {
                if let (Some(t), true) = (term, on) {
                    *l = (&*l + (t * w)?)?;
                }
            }
        }
        Ok((loss, losses))
    }

    /// HF-style forward. `labels` ([B, T], same shape as `input_ids`) follow HF semantics:
    /// shifted inside the model, -100 ignored.
    pub fn forward(&self, input_ids: &Tensor, labels: Option<&Tensor>) -> Result<CausalLMOutput> {
        let ids = ids_from_tensor(input_ids, self.config.vocab_size)?;
        let labels = labels.map(|l| labels_from_tensor(l, -100, self.config.vocab_size)).transpose()?;
        if let Some(l) = &labels {
            if l.len() != ids.len() || l.iter().any(|r| r.len() != ids[0].len()) {
                return Err(input_err!("labels must have the same shape as input_ids"));
            }
        }
        let (h, moe) = self.hidden(&self.net, &ids, None, None, None)?;
        let logits = Self::lm_head(&self.net, &h)?;
        let ntp = match &labels {
            Some(l) => {
                let (b, t, v) = logits.dims3()?;
                if t < 2 {
                    None
                } else {
                    let shifted = logits.narrow(1, 0, t - 1)?.reshape((b * (t - 1), v))?;
                    let targets: Vec<Option<u32>> = l.iter().flat_map(|r| r[1..].iter().copied()).collect();
                    nn::cross_entropy(&shifted, &targets)?
                }
            }
            None => None,
        };
        let (loss, aux) = self.total_loss(ntp, &moe)?;
        Ok(CausalLMOutput { loss, logits, aux, moe_stats: moe.stats })
    }

    /// nanoGPT-style forward: `targets` are already shifted by the caller, -1 ignored.
    /// Without targets only the last position's logits are returned ([B, 1, V]).
    pub fn forward_legacy(&self, idx: &Tensor, targets: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>, Losses)> {
        let (logits, loss, losses, _) = self.forward_legacy_with_stats(idx, targets)?;
        Ok((logits, loss, losses))
    }

    /// [`GPT::forward_legacy`] plus the routing statistics of each MoE layer.
    pub fn forward_legacy_with_stats(&self, idx: &Tensor, targets: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>, Losses, Vec<MoeStats>)> {
        let ids = ids_from_tensor(idx, self.config.vocab_size)?;
        let (h, moe) = self.hidden(&self.net, &ids, None, None, None)?;
        match targets {
            Some(tg) => {
                let tg = labels_from_tensor(tg, -1, self.config.vocab_size)?;
                if tg.len() != ids.len() || tg.iter().any(|r| r.len() != ids[0].len()) {
                    return Err(input_err!("targets must have the same shape as idx"));
                }
                let logits = Self::lm_head(&self.net, &h)?;
                let (b, t, v) = logits.dims3()?;
                let flat: Vec<Option<u32>> = tg.into_iter().flatten().collect();
                let ntp = nn::cross_entropy(&logits.reshape((b * t, v))?, &flat)?;
                let (loss, losses) = self.total_loss(ntp, &moe)?;
                Ok((logits, loss, losses, moe.stats))
            }
            None => {
                let t = h.dim(1)?;
                let logits = Self::lm_head(&self.net, &h.narrow(1, t - 1, 1)?)?;
                let (_, losses) = self.total_loss(None, &moe)?;
                Ok((logits, None, losses, moe.stats))
            }
        }
    }

    /// The loss of nanoGPT-style `targets` (already shifted, -1 ignored) without the logits:
    /// the output layer and the cross-entropy run as one fused op, so no [B, T, V] tensor or
    /// gradient of it is kept (what the trainer and `nanomoe eval` use). Returns the total
    /// loss (None when every target is ignored), the loss terms and the routing statistics.
    pub fn forward_loss(&self, idx: &Tensor, targets: &Tensor) -> Result<(Option<Tensor>, Losses, Vec<MoeStats>)> {
        self.forward_loss_impl(idx, targets, None)
    }

    /// [`GPT::forward_loss`] for training: the gradients of the experts' weights, and of every
    /// weight inside a block's residual branches (which run as one graph node each, see
    /// `kernels::residual`), go to `sink` instead of through candle's accumulation, so take
    /// the gradients with [`GradSink::backward`] (a plain `loss.backward()` leaves those
    /// weights without).
    pub fn forward_loss_with_sink(&self, idx: &Tensor, targets: &Tensor, sink: &GradSink) -> Result<(Option<Tensor>, Losses, Vec<MoeStats>)> {
        self.forward_loss_impl(idx, targets, Some(sink))
    }

    fn forward_loss_impl(&self, idx: &Tensor, targets: &Tensor, sink: Option<&GradSink>) -> Result<(Option<Tensor>, Losses, Vec<MoeStats>)> {
        let ids = ids_from_tensor(idx, self.config.vocab_size)?;
        let tg = labels_from_tensor(targets, -1, self.config.vocab_size)?;
        if tg.len() != ids.len() || tg.iter().any(|r| r.len() != ids[0].len()) {
            return Err(input_err!("targets must have the same shape as idx"));
        }
        let (h, moe) = self.hidden(&self.net, &ids, None, None, sink)?;
        let (b, t, c) = h.dims3()?;
        let flat: Vec<Option<u32>> = tg.into_iter().flatten().collect();
        let h = h.reshape((b * t, c))?;
        let ntp = match &self.net.wte {
            Mat::Dense(wte) => nn::linear_cross_entropy(&h, wte, &flat, self.precision)?,
            quant => quantized_cross_entropy(&h, quant, &flat)?,
        };
        let (loss, losses) = self.total_loss(ntp, &moe)?;
        Ok((loss, losses, moe.stats))
    }

    /// One decoding step: runs `ids` (new tokens of every row) through the model, extending
    /// `cache`, and returns the logits of the last position [B, V]. Inference only: nothing
    /// records a graph for backward (use [`GPT::forward`] for gradients).
    pub fn forward_step(&self, ids: &[Vec<u32>], cache: Option<&mut KvCache>, pad: Option<&[usize]>) -> Result<Tensor> {
        for r in ids {
            if let Some(&bad) = r.iter().find(|&&v| v as usize >= self.config.vocab_size) {
                return Err(input_err!("token id {bad} is out of range for vocab_size {}", self.config.vocab_size));
            }
        }
        let (h, _) = self.hidden(&self.frozen, ids, cache, pad, None)?;
        let t = h.dim(1)?;
        Ok(Self::lm_head(&self.frozen, &h.narrow(1, t - 1, 1)?)?.squeeze(1)?)
    }
}
