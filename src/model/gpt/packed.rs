//! Forward passes for serving (continuous batching): many independent sequences, each with
//! its own KV cache and positions, decoded in one pass.
//!
//! The new tokens of every sequence are packed into one [1, N, C] batch for the weight
//! products, norms and MoE layers - the weights are read once for all of them - while each
//! sequence attends over its own cache. Every op on the packed rows computes each row on
//! its own, in an order that does not depend on the other rows, as long as the products
//! run on the weight-streaming kernel (at most [`MAX_PACKED_TOKENS`] rows). A sequence
//! therefore decodes to the same bits alone or in a full batch, and the same as
//! [`GPT::forward_step`] on it alone: greedy output does not depend on who else is served.

use crate::kernels::Precision;
use candle_core::{DType, Tensor};

use super::{attention, CausalMask, Ctx, KvCache, LayerKv, MoeTotals, GPT};
use crate::error::{input_err, Result};
use crate::moe::MoeStats;
use crate::nn;

/// Most tokens of one packed pass for which results are batch-invariant (the
/// weight-streaming kernel's row limit; larger products use a general matrix product,
/// whose rounding depends on the number of rows).
pub const MAX_PACKED_TOKENS: usize = crate::kernels::matvec::MAX_ROWS;

/// One sequence of a packed pass: its new tokens and its cache (extended in place).
pub struct PackedSeq<'a> {
    pub ids: &'a [u32],
    pub cache: &'a mut KvCache,
}

impl GPT {
    /// Runs the new tokens of every sequence through the model, extending each sequence's
    /// cache, and returns the logits of each sequence's last new token ([S, V]) plus the
    /// routing statistics of the MoE layers over all packed tokens. Inference only.
    pub fn forward_packed(&self, seqs: &mut [PackedSeq]) -> Result<(Tensor, Vec<MoeStats>)> {
        let cfg = &self.config;
        let net = &self.frozen;
        if seqs.is_empty() {
            return Err(input_err!("a packed forward pass needs at least one sequence"));
        }
        let (mut flat, mut pos, mut last) = (Vec::new(), Vec::new(), Vec::with_capacity(seqs.len()));
        for s in seqs.iter() {
            if s.ids.is_empty() {
                return Err(input_err!("every sequence of a packed pass needs at least one new token"));
            }
            if let Some(&bad) = s.ids.iter().find(|&&v| v as usize >= cfg.vocab_size) {
                return Err(input_err!("token id {bad} is out of range for vocab_size {}", cfg.vocab_size));
            }
            let past = s.cache.seq_len();
            if past + s.ids.len() > cfg.block_size {
                return Err(input_err!("sequence length {} exceeds block_size {} of this model", past + s.ids.len(), cfg.block_size));
            }
            flat.extend_from_slice(s.ids);
            pos.extend((past..past + s.ids.len()).map(|p| p as u32));
            last.push((flat.len() - 1) as u32);
        }
        let n = flat.len();
        let device = self.device();
        let tok = net.wte.embed(&Tensor::from_vec(flat, n, device)?)?;
        let pe = net.wpe.index_select(&Tensor::from_vec(pos, n, device)?, 0)?.to_dtype(DType::F32)?;
        let mut x = (tok + pe)?.reshape((1, n, cfg.n_embd))?;

        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        let mut ctx = Ctx { cfg, training: false, routing: self.routing, rng: &mut rng, sink: None, kv_reserve: 0, prec: Precision::F32 };
        let mut moe = MoeTotals::default();
        for s in seqs.iter_mut() {
            s.cache.layers.resize_with(net.blocks.len(), || None);
        }
        let c = cfg.n_embd;
        for (li, block) in net.blocks.iter().enumerate() {
            let mut qkv = block.attn.c_attn.forward(&block.ln_1.forward(&x)?, Precision::F32)?;
            if block.attn.qk_norm {
                qkv = nn::qk_norm(&qkv, block.attn.n_head)?;
            }
            // Attention: each sequence over its own keys and values (appended first), its
            // queries read in place in qkv.
            let mut parts = Vec::with_capacity(seqs.len());
            let mut off = 0;
            for s in seqs.iter_mut() {
                let t = s.ids.len();
                let rows = qkv.narrow(1, off, t)?;
                let (k, v) = (rows.narrow(2, c, c)?, rows.narrow(2, 2 * c, c)?);
                let slot = &mut s.cache.layers[li];
                let past = slot.as_ref().map_or(0, |l| l.len);
                let layer = LayerKv::append(slot, &k, &v, cfg.block_size, s.cache.reserve)?;
                parts.push(attention::PackedRows { off, t, k: layer.k.clone(), v: layer.v.clone(), tk: layer.len, mask: CausalMask { past, pad: None } });
                off += t;
            }
            // All sequences' heads in one parallel pass, each as it would run alone.
            let y = attention::cached_attention_rows(&qkv, &parts, block.attn.n_head)?;
            drop(parts);
            let x1 = (&x + block.attn.c_proj.forward(&y, Precision::F32)?)?;
            x = block.mlp_residual(x1, &mut ctx, &mut moe)?;
        }
        let h = net.ln_f.forward(&x)?.reshape((n, c))?;
        let h_last = h.index_select(&Tensor::from_vec(last, seqs.len(), device)?, 0)?;
        Ok((GPT::lm_head(net, &h_last)?, moe.stats))
    }

    /// Prefills one sequence (or a chunk of it) into `cache`: returns the logits of its last
    /// token ([V], exactly what [`GPT::forward_step`] returns for it), those of every
    /// position ([t, V]) when `all_logits`, and the MoE routing statistics.
    pub fn prefill(&self, ids: &[u32], cache: &mut KvCache, all_logits: bool) -> Result<(Tensor, Option<Tensor>, Vec<MoeStats>)> {
        if let Some(&bad) = ids.iter().find(|&&v| v as usize >= self.config.vocab_size) {
            return Err(input_err!("token id {bad} is out of range for vocab_size {}", self.config.vocab_size));
        }
        let (h, moe) = self.hidden(&self.frozen, &[ids.to_vec()], Some(cache), None, None)?;
        let t = h.dim(1)?;
        let last = GPT::lm_head(&self.frozen, &h.narrow(1, t - 1, 1)?)?.squeeze(1)?.squeeze(0)?;
        let all = if all_logits { Some(GPT::lm_head(&self.frozen, &h.squeeze(0)?)?) } else { None };
        Ok((last, all, moe.stats))
    }
}
