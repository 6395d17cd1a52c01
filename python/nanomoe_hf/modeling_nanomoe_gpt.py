"""nanomoe / nanoMoE GPT for transformers (remote code, model_type "nanomoe_gpt").

GPT-2's architecture with a Mixture-of-Experts layer in place of the MLP in every
`stride`-th block - or the seed's (askerlee/nanoMoE): RMSNorm, QK-norm, ReLU^2 MLPs and
SwiGLU experts, as config.json states (norm_type, qk_norm, activation_function, expert_mlp,
moe_placement, moe_start_layer). Routing follows nanoMoE (and nanomoe's Rust model) exactly:
top-k over router logits, softmax over the k chosen logits (Shazeer et al. 2017, eq. 3-5),
expert capacity floor(k * factor * tokens / n_exp) rounded up to even and at least
min_capacity (Switch Transformer eq. 3), all first choices placed before second choices and
earlier tokens before later ones; choices past capacity are dropped. Aux loss: Switch
Transformer eq. 4-6; router z-loss: ST-MoE eq. 5.

Weights use nn.Linear layouts ([out, in]) and nanoMoE's tensor names.
"""
import importlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

try:
    from .configuration_nanomoe_gpt import GPTConfig
except ImportError:  # loaded as a plain module (no import statement here: transformers
    # 4.46-4.50 scan remote code for imports, this fallback included, and would require it)
    GPTConfig = importlib.import_module("configuration_nanomoe_gpt").GPTConfig

# transformers 5.x names the cache field "cache"; earlier versions "past_key_values".
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def _gelu(x, name):
    if name == "relu2":  # the seed's ReLU^2 (So et al. 2021, "Primer")
        r = F.relu(x)
        return r * r
    return F.gelu(x, approximate="tanh") if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast") else F.gelu(x)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward, gradient times alpha backward (the seed's GradientScaler)."""

    @staticmethod
    def forward(ctx, x, alpha):
        ctx.alpha = alpha
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.alpha, None


class LayerNorm(nn.Module):
    """LayerNorm (GPT-2: weight, optional bias) or RMSNorm (the seed: weight only)."""

    def __init__(self, ndim, bias, eps, rms=False):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias and not rms else None
        self.eps = eps
        self.rms = rms

    def forward(self, x):
        if self.rms:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def _norm(config):
    return LayerNorm(config.n_embd, config.bias, config.layer_norm_epsilon, rms=config.norm_type == "rmsnorm")


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual = True  # GPT-2's scaled init of residual projections
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.layer_idx = layer_idx
        self.qk_norm = config.qk_norm

    def forward(self, x, mask, cache=None):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hd = C // self.n_head
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k = k.view(B, T, self.n_head, hd).transpose(1, 2)
        v = v.view(B, T, self.n_head, hd).transpose(1, 2)
        if self.qk_norm:  # no weight, torch's default eps (as the seed)
            q, k = F.rms_norm(q, (hd,)), F.rms_norm(k, (hd,))
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(~mask, torch.finfo(att.dtype).min)
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual = True
        self.dropout = nn.Dropout(config.dropout)
        self.act = config.activation_function

    def forward(self, x):
        return self.dropout(self.c_proj(_gelu(self.c_fc(x), self.act)))


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w_g = nn.Linear(config.n_embd, config.n_exp, bias=False)
        self.w_noise = nn.Linear(config.n_embd, config.n_exp, bias=False) if config.use_noisy_top_k else None


class MLPExperts(nn.Module):
    def __init__(self, config):
        super().__init__()
        e, d = config.n_exp, config.n_embd
        swiglu = config.expert_mlp == "swiglu"
        # SwiGLU (the seed's Qwen3 experts): silu(x gate_proj) * (x c_fc), then c_proj; no biases.
        self.gate_proj = nn.Parameter(torch.empty(e, d, 4 * d)) if swiglu else None
        self.c_fc = nn.Parameter(torch.empty(e, d, 4 * d))
        self.c_proj = nn.Parameter(torch.empty(e, 4 * d, d))
        self.fc_bias = nn.Parameter(torch.zeros(e, 1, 4 * d)) if config.bias and not swiglu else None
        self.proj_bias = nn.Parameter(torch.zeros(e, 1, d)) if config.bias and not swiglu else None
        self.dropout = nn.Dropout(config.dropout)
        self.act = config.activation_function

    def gate_output(self, e, x):
        """The seed's gate-output loss terms of these rows: mean of (x gate_proj)^2 per row, with
        x's gradient scaled by 0.1."""
        g = _ScaleGrad.apply(x, 0.1) @ self.gate_proj[e]
        return (g * g).mean(-1)

    def expert(self, e, x):
        if self.gate_proj is not None:
            return self.dropout((F.silu(x @ self.gate_proj[e]) * (x @ self.c_fc[e])) @ self.c_proj[e])
        h = x @ self.c_fc[e]
        if self.fc_bias is not None:
            h = h + self.fc_bias[e]
        h = _gelu(h, self.act) @ self.c_proj[e]
        if self.proj_bias is not None:
            h = h + self.proj_bias[e]
        return self.dropout(h)


class MOELayer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.router = Router(config)
        self.experts = MLPExperts(config)
        self.config = config

    def capacity(self, tokens):
        c = self.config
        factor = c.train_capacity if self.training else c.eval_capacity
        cap = math.floor(c.moe_top_k * factor * tokens / c.n_exp)
        cap += cap % 2
        return max(cap, c.min_capacity)

    def forward(self, x):
        c = self.config
        B, T, C = x.shape
        N, E, K = B * T, c.n_exp, c.moe_top_k
        xf = x.reshape(N, C)
        xr = xf.float() if c.router_use_full_prec else xf
        logits = F.linear(xr, self.router.w_g.weight.to(xr.dtype))
        if self.training and self.router.w_noise is not None:
            noise = F.softplus(F.linear(xr, self.router.w_noise.weight.to(xr.dtype)))
            logits = logits + noise * torch.randn_like(noise)
        z_loss = torch.logsumexp(logits.float(), dim=-1).pow(2).mean()
        top_logits, top_idx = logits.topk(K, dim=-1)  # [N, K]
        probs = F.softmax(top_logits.float(), dim=-1)  # [N, K]

        # aux loss: n_exp * sum_e f_e * P_e (f_e: share of choices, P_e: mean router prob)
        onehot = F.one_hot(top_idx, E).float()  # [N, K, E]
        f = onehot.sum(1).mean(0)
        P = (onehot * probs.unsqueeze(-1)).sum(1).mean(0)
        aux_loss = E * (f * P).sum()

        # position of every (token, choice) in its expert: first choices before second ones
        rank = onehot.permute(1, 0, 2).reshape(K * N, E).cumsum(0) - 1
        rank = (rank.reshape(K, N, E) * onehot.permute(1, 0, 2)).sum(-1).permute(1, 0)  # [N, K]
        kept = rank < self.capacity(N)

        y = torch.zeros_like(xf)
        seed = self.training and self.experts.gate_proj is not None  # the seed's extra losses
        gate_rows = []
        for e in range(E):
            tok, choice = ((top_idx == e) & kept).nonzero(as_tuple=True)
            if tok.numel() == 0:
                continue
            out = self.experts.expert(e, xf[tok])
            # (.to(y.dtype): under autocast the experts' products come back in bf16/f16.)
            y = y.index_add(0, tok, (out * probs[tok, choice].unsqueeze(-1).to(out.dtype)).to(y.dtype))
            if seed and c.use_gate_output_loss:
                gate_rows.append(self.experts.gate_output(e, xf[tok]))
        extra = {}
        if seed and c.use_gate_output_loss:
            rows = torch.cat(gate_rows) if gate_rows else xf.new_zeros(0)
            rows = rows[rows > 0]  # the seed averages over the non-zero rows of its padded batch
            extra["gate_output_loss"] = rows.mean() if rows.numel() else xf.new_zeros(())
        if seed and c.use_router_ortho_loss:
            # sum_e,j w * <w_g[e], gate_proj[e][:, j]>^2, gate_proj's gradient scaled by 0.1
            dots = (self.router.w_g.weight.unsqueeze(-1) * _ScaleGrad.apply(self.experts.gate_proj, 0.1)).sum(1)
            w = torch.where(dots < 0, torch.full_like(dots, c.router_ortho_neg_corr_weight), torch.ones_like(dots))
            extra["router_ortho_loss"] = (dots * dots * w).sum()
        if seed and c.use_experts_ortho_loss:
            W = self.experts.c_fc.reshape(E, -1).float()
            X = W / (W.norm(dim=1, keepdim=True) + 1e-12)
            extra["experts_ortho_loss"] = (torch.triu(X @ X.t(), diagonal=1) ** 2).mean()
        stats = {"tokens_per_expert": (onehot * kept.unsqueeze(-1)).sum((0, 1)), "dropped": (~kept).sum()}
        return y.reshape(B, T, C), aux_loss, z_loss, extra, stats


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = _norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = _norm(config)
        i, s = layer_idx, config.stride
        in_stride = (i % s == 0) if config.moe_placement == "start" else ((i + 1) % s == 0)
        self.use_moe = config.n_exp > 1 and i >= config.moe_start_layer and in_stride
        self.mlp = MOELayer(config) if self.use_moe else MLP(config)

    def forward(self, x, mask, cache=None):
        x = x + self.attn(self.ln_1(x), mask, cache)
        if self.use_moe:
            y, aux, z, extra, stats = self.mlp(self.ln_2(x))
            return x + y, aux, z, extra
        return x + self.mlp(self.ln_2(x)), None, None, {}


class GPTPreTrainedModel(PreTrainedModel):
    config_class = GPTConfig
    base_model_prefix = "transformer"
    _no_split_modules = ["Block"]
    _keys_to_ignore_on_load_unexpected = [r"\.attn\.bias$", r"\.attn\.masked_bias$"]

    @torch.no_grad()
    def _init_weights(self, module):
        c = self.config

        def normal(p, fan_in, resid=False):
            if c.use_switch_tfm_init:  # Switch Transformer p. 10
                std = (c.switch_tfm_init_scale / fan_in) ** 0.5
                nn.init.trunc_normal_(p, mean=0.0, std=std, a=-2 * std, b=2 * std)
            else:
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.n_layer) if resid else 0.02)

        if isinstance(module, nn.Linear):
            normal(module.weight, module.weight.shape[-1], resid=getattr(module, "is_residual", False))
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, MLPExperts):
            if module.gate_proj is not None:
                normal(module.gate_proj, module.gate_proj.shape[-2])
            normal(module.c_fc, module.c_fc.shape[-2])
            normal(module.c_proj, module.c_proj.shape[-2], resid=True)
            if module.fc_bias is not None:
                nn.init.zeros_(module.fc_bias)
                nn.init.zeros_(module.proj_bias)
        elif isinstance(module, LayerNorm):
            nn.init.ones_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


class GPT(GPTPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=_norm(config),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.transformer.wte

    def set_input_embeddings(self, value):
        self.transformer.wte = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # Past block_size tokens the context is cropped to its last block_size tokens, as in
        # nanoGPT's generate and `nanomoe generate` (the position embeddings end there): each
        # such step re-encodes the window into a fresh cache. Otherwise only the tokens the
        # cache lacks are fed.
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        block = self.config.block_size
        past = cache.get_seq_length() if cache is not None else 0
        if input_ids.shape[1] > block:
            input_ids = input_ids[:, -block:]
            if attention_mask is not None:
                attention_mask = attention_mask[:, -block:]
            if cache is not None:
                cache, past = DynamicCache(), 0
        return {"input_ids": input_ids[:, past:], "attention_mask": attention_mask,
                "use_cache": kwargs.get("use_cache"), _CACHE_FIELD: cache}

    def forward(self, input_ids=None, cache=None, attention_mask=None, position_ids=None, labels=None,
                use_cache=None, return_dict=None, past_key_values=None, idx=None, targets=None, **kwargs):
        legacy = idx is not None
        if legacy:
            input_ids = idx
        if cache is None:
            cache = past_key_values
        c = self.config
        B, T = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        total = past + T
        if total > c.block_size:
            raise ValueError(f"sequence length {total} exceeds block_size {c.block_size}")
        dev = input_ids.device
        if position_ids is None:
            position_ids = torch.arange(past, total, device=dev).unsqueeze(0).expand(B, T)
        # mask[b, 1, i, j]: query i may attend to key j
        causal = torch.arange(total, device=dev).unsqueeze(0) <= torch.arange(past, total, device=dev).unsqueeze(1)
        mask = causal.view(1, 1, T, total)
        if attention_mask is not None:
            mask = mask & attention_mask[:, -total:].bool().view(B, 1, 1, total)
        x = self.transformer.drop(self.transformer.wte(input_ids) + self.transformer.wpe(position_ids))
        aux_total, z_total, extra_total = None, None, {}
        for block in self.transformer.h:
            x, aux, z, extra = block(x, mask, cache)
            if aux is not None:
                aux_total = aux if aux_total is None else aux_total + aux
                z_total = z if z_total is None else z_total + z
            for k, v in extra.items():
                extra_total[k] = v if k not in extra_total else extra_total[k] + v
        x = self.transformer.ln_f(x)

        if legacy:  # nanoGPT / nanoMoE call: targets pre-shifted, -1 ignored
            if targets is None:
                return self.lm_head(x[:, [-1], :]), None, {}
            logits = self.lm_head(x)
            ntp = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            loss = self._add_moe_losses(ntp, aux_total, z_total, extra_total)
            return logits, loss, {"ntp_loss": ntp, "aux_loss": aux_total, "router_z_loss": z_total, **extra_total}

        logits = self.lm_head(x)
        loss = None
        if labels is not None:
            shift_logits = logits[:, :-1, :].reshape(-1, logits.size(-1)).float()
            shift_labels = labels[:, 1:].reshape(-1).to(dev)
            loss = self._add_moe_losses(F.cross_entropy(shift_logits, shift_labels, ignore_index=-100), aux_total, z_total,
                                        extra_total)
        if return_dict is False:
            return tuple(v for v in (loss, logits, cache) if v is not None)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})

    def _add_moe_losses(self, loss, aux, z, extra):
        c = self.config
        if c.n_exp > 1 and c.use_aux_loss and aux is not None:
            loss = loss + c.aux_loss_weight * aux
        if c.n_exp > 1 and c.use_router_z_loss and z is not None:
            loss = loss + c.router_z_loss_weight * z
        # The seed's terms (SwiGLU experts, training, each when switched on), in its order.
        for k in ("router_ortho_loss", "experts_ortho_loss", "gate_output_loss"):
            if k in extra:
                loss = loss + getattr(c, k + "_weight") * extra[k]
        return loss
