//! `GPTConfig`: the hyper-parameters of a nanoMoE GPT, with nanoMoE's defaults.
//!
//! The serialized form of `GPTConfig` *is* the `config.json` of a `nanomoe_gpt`
//! model directory. Dense models (n_exp == 1) are saved as native GPT-2
//! directories instead, see [`GPTConfig::to_gpt2_json`].

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// GPT-2 uses this id for `<|endoftext|>`.
pub const GPT2_EOS: u32 = 50256;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GPTConfig {
    pub block_size: usize,
    /// GPT-2's 50257 padded up to a multiple of 64 for efficiency.
    pub vocab_size: usize,
    pub n_layer: usize,
    pub n_head: usize,
    pub n_embd: usize,
    pub dropout: f64,
    /// Biases in Linears (and LayerNorms), like GPT-2. false: a bit better and faster.
    /// RMSNorm has no bias, and SwiGLU experts have none, whatever this says.
    pub bias: bool,

    // ---- Architecture: GPT-2's by default, the seed's (askerlee/nanoMoE) when stated ----
    /// Every block's two norms and the final one: LayerNorm (GPT-2: weight + bias) or
    /// RMSNorm (the seed: weight only; Zhang & Sennrich 2019).
    pub norm_type: NormType,
    /// eps of every norm: 1e-5 for GPT-2's LayerNorm, 1e-6 for the seed's RMSNorm.
    pub layer_norm_epsilon: f64,
    /// RMS-normalise q and k of every head before attention (no weight; eps = f32 machine
    /// epsilon, torch's `F.rms_norm` default) as the seed does (QK-norm, Dehghani et al. 2023).
    pub qk_norm: bool,
    /// "gelu_new" (tanh GELU, GPT-2), "gelu" (exact erf GELU, PyTorch nanoGPT/nanoMoE) or
    /// "relu2" (ReLU squared, the seed; So et al. 2021 "Primer").
    pub activation_function: String,
    /// The experts of MoE layers: "mlp" (act(x W_fc + b) W_proj + b, as the dense MLP) or
    /// "swiglu" (silu(x W_gate) * (x W_fc), then W_proj; no biases: the seed's
    /// `use_qwen3_moe_mlp`; Shazeer 2020).
    pub expert_mlp: ExpertMlp,

    // ---- Mixture of Experts -------------------------------------------------------------
    /// Number of experts; 1 means a dense model.
    pub n_exp: usize,
    /// Experts each token is routed to. (`top_k` in older nanoMoE configs.)
    pub moe_top_k: usize,
    /// With n_exp > 1, one block in every `stride` is MoE (where: `moe_placement`).
    pub stride: usize,
    /// "end": block i is MoE when (i + 1) % stride == 0 (nanomoe, the seed);
    /// "start": when i % stride == 0 (wolfecameron/nanoMoE's train.py checkpoints).
    pub moe_placement: MoePlacement,
    /// Blocks before this index are always dense (the seed's `moe_start_layer`).
    pub moe_start_layer: usize,
    /// Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6).
    pub use_aux_loss: bool,
    pub aux_loss_weight: f64,
    /// ST-MoE router z-loss (Zoph et al. 2022, eq. 5).
    pub use_router_z_loss: bool,
    pub router_z_loss_weight: f64,
    /// The seed's router-orthogonality loss (SwiGLU experts only): sum over experts e and
    /// gate columns j of w(e, j) * <w_g[e], gate_proj[e][:, j]>^2, w = 1 for positive and
    /// `router_ortho_neg_corr_weight` for negative dot products; gate_proj's gradient scaled by 0.1.
    pub use_router_ortho_loss: bool,
    pub router_ortho_loss_weight: f64,
    pub router_ortho_neg_corr_weight: f64,
    /// The seed's experts-orthogonality loss (SwiGLU experts only): mean over the n_exp x n_exp
    /// matrix of the squared upper-triangle cosine similarities of the flattened c_fc
    /// (arXiv:2601.00457 ablation).
    pub use_experts_ortho_loss: bool,
    pub experts_ortho_loss_weight: f64,
    /// The seed's gate-output loss (SwiGLU experts only): mean of (x W_gate)^2 over features,
    /// averaged over the non-zero rows of every expert's batch; x's gradient scaled by 0.1.
    pub use_gate_output_loss: bool,
    pub gate_output_loss_weight: f64,
    /// Noisy top-k gating (Shazeer et al. 2017, eq. 4), training only.
    pub use_noisy_top_k: bool,
    /// Capacity factor in training (Switch Transformer eq. 3).
    pub train_capacity: f64,
    /// Capacity factor in evaluation / inference.
    pub eval_capacity: f64,
    pub min_capacity: usize,
    /// Truncated-normal init with std sqrt(scale / fan_in) (Switch Transformer p. 10).
    pub use_switch_tfm_init: bool,
    pub switch_tfm_init_scale: f64,
    /// Keep the router in f32 even when the rest runs in lower precision.
    pub router_use_full_prec: bool,

    // ---- Tokens ---------------------------------------------------------------------------
    /// Only when the tokenizer defines them (a character vocabulary has no end of text).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<u32>,

    /// Keys of a loaded config.json that do not change the computation (`_name_or_path`,
    /// `use_cache`, ...): kept so that a load and re-save preserves them.
    #[serde(skip)]
    pub extra: Map<String, Value>,
}

/// The norm of every block and the final one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormType {
    LayerNorm,
    RmsNorm,
}

/// The shape of an MoE layer's experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExpertMlp {
    Mlp,
    SwiGlu,
}

/// Which block of every `stride` carries the MoE layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MoePlacement {
    End,
    Start,
}

impl Default for GPTConfig {
    fn default() -> Self {
        GPTConfig {
            block_size: 1024,
            vocab_size: 50304,
            n_layer: 12,
            n_head: 12,
            n_embd: 768,
            dropout: 0.0,
            bias: true,
            norm_type: NormType::LayerNorm,
            layer_norm_epsilon: 1e-5,
            qk_norm: false,
            activation_function: "gelu_new".into(),
            expert_mlp: ExpertMlp::Mlp,
            n_exp: 1,
            moe_top_k: 2,
            stride: 1,
            moe_placement: MoePlacement::End,
            moe_start_layer: 0,
            use_aux_loss: false,
            aux_loss_weight: 0.01,
            use_router_z_loss: false,
            router_z_loss_weight: 0.001,
            use_router_ortho_loss: false,
            router_ortho_loss_weight: 0.01,
            router_ortho_neg_corr_weight: 1.0,
            use_experts_ortho_loss: false,
            experts_ortho_loss_weight: 0.01,
            use_gate_output_loss: false,
            gate_output_loss_weight: 0.01,
            use_noisy_top_k: false,
            train_capacity: 1.25,
            eval_capacity: 2.0,
            min_capacity: 4,
            use_switch_tfm_init: false,
            switch_tfm_init_scale: 1.0,
            router_use_full_prec: false,
            bos_token_id: None,
            eos_token_id: None,
            extra: Map::new(),
        }
    }
}

/// The activations a config may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// tanh approximation (HF `gelu_new`, GPT-2).
    GeluTanh,
    /// exact erf GELU (PyTorch `nn.GELU()`).
    GeluErf,
    /// relu(x)^2 (the seed's MLP and MLP experts; So et al. 2021, "Primer").
    Relu2,
}

/// Keys of askerlee/nanoMoE's (the seed's) `GPTConfig` that nanomoe's earlier configs never
/// had: any of them in a config without nanomoe's architecture keys means the seed's model.
pub const SEED_KEYS: &[&str] = &[
    "use_qwen3_moe_mlp",
    "moe_start_layer",
    "use_router_ortho_loss",
    "use_experts_ortho_loss",
    "use_gate_output_loss",
    "router_ortho_loss_weight",
    "router_ortho_neg_corr_weight",
    "experts_ortho_loss_weight",
    "gate_output_loss_weight",
];

/// The architecture keys nanomoe writes into every config.json since it implements the
/// seed's architecture; a config with some but not all of them is ambiguous.
pub const ARCH_KEYS: &[&str] = &["norm_type", "layer_norm_epsilon", "qk_norm", "activation_function", "expert_mlp", "moe_placement"];

/// What nanomoe's configs before the seed's architecture carried (GPT-2's names).
const LEGACY_ARCH_KEYS: &[&str] = &["activation_function", "layer_norm_epsilon"];

impl GPTConfig {
    /// A small config for tests and examples.
    pub fn tiny() -> Self {
        GPTConfig { block_size: 32, vocab_size: 64, n_layer: 2, n_head: 2, n_embd: 16, ..Default::default() }
    }

    /// nanoMoE's published setup: 6 layers, 384 wide, 8 experts, top-2, every second block
    /// MoE, aux + z losses, Switch init, fp32 router.
    pub fn nano_moe() -> Self {
        GPTConfig {
            n_layer: 6,
            n_head: 6,
            n_embd: 384,
            bias: false,
            activation_function: "gelu".into(), // nn.GELU(), exact, as nanoMoE
            n_exp: 8,
            moe_top_k: 2,
            stride: 2,
            use_aux_loss: true,
            use_router_z_loss: true,
            use_switch_tfm_init: true,
            router_use_full_prec: true,
            ..Default::default()
        }
    }

    /// The seed's architecture (askerlee/nanoMoE `model.py`) on this config's sizes: RMSNorm
    /// (eps 1e-6, weight only) everywhere, QK-norm, ReLU^2 MLPs, and SwiGLU experts when
    /// `swiglu_experts` (its `use_qwen3_moe_mlp`).
    pub fn with_seed_architecture(self, swiglu_experts: bool) -> Self {
        GPTConfig {
            norm_type: NormType::RmsNorm,
            layer_norm_epsilon: 1e-6,
            qk_norm: true,
            activation_function: "relu2".into(),
            expert_mlp: if swiglu_experts { ExpertMlp::SwiGlu } else { ExpertMlp::Mlp },
            moe_placement: MoePlacement::End,
            ..self
        }
    }

    pub fn is_moe(&self) -> bool {
        self.n_exp > 1
    }

    /// How many blocks carry an MoE layer (counted without visiting every block).
    pub fn num_moe_layers(&self) -> usize {
        if self.n_exp <= 1 || self.stride == 0 || self.moe_start_layer >= self.n_layer {
            return 0;
        }
        // Multiples of `stride` in [lo, hi).
        let multiples = |lo: usize, hi: usize| hi.div_ceil(self.stride) - lo.div_ceil(self.stride);
        match self.moe_placement {
            MoePlacement::End => multiples(self.moe_start_layer + 1, self.n_layer + 1),
            MoePlacement::Start => multiples(self.moe_start_layer, self.n_layer),
        }
    }

    /// The number of tensors and of parameters this config describes, computed without
    /// allocating (a hostile config.json can claim any sizes); `None` if a count overflows.
    pub fn size(&self) -> Option<ModelSize> {
        let (d, e) = (self.n_embd as u128, self.n_exp as u128);
        let (layers, moe) = (self.n_layer as u128, self.num_moe_layers() as u128);
        let dense = layers - moe;
        let (b, nb) = (self.bias as u128, self.norm_bias() as u128);
        let norm = (1 + nb, d.checked_mul(1 + nb)?);
        let attn = (2 + 2 * b, d.checked_mul(d)?.checked_mul(4)?.checked_add(b * 4 * d)?);
        let mlp = (2 + 2 * b, d.checked_mul(d)?.checked_mul(8)?.checked_add(b * 5 * d)?);
        let noisy = self.use_noisy_top_k as u128;
        let swiglu = self.swiglu_experts() as u128;
        let expert_bias = b * (1 - swiglu);
        let experts = (2 + swiglu) * 4;
        let moe_layer = (
            1 + noisy + 2 + swiglu + 2 * expert_bias,
            e.checked_mul(d)?.checked_mul(1 + noisy)?
                .checked_add(e.checked_mul(d)?.checked_mul(d)?.checked_mul(experts)?)?
                .checked_add(expert_bias * e.checked_mul(5 * d)?)?,
        );
        let per_layer = |mlp: (u128, u128)| Some((2 * norm.0 + attn.0 + mlp.0, (2 * norm.1).checked_add(attn.1)?.checked_add(mlp.1)?));
        let (dl, ml) = (per_layer(mlp)?, per_layer(moe_layer)?);
        let embeddings = (self.vocab_size as u128).checked_add(self.block_size as u128)?.checked_mul(d)?;
        Some(ModelSize {
            tensors: 2 + norm.0 + dense.checked_mul(dl.0)? + moe.checked_mul(ml.0)?,
            parameters: embeddings
                .checked_add(norm.1)?
                .checked_add(dense.checked_mul(dl.1)?)?
                .checked_add(moe.checked_mul(ml.1)?)?,
        })
    }

    /// A lower bound of the memory one token of a batch takes in a forward pass (`training`:
    /// the activations kept for the backward pass, ~16 floats per layer and channel), with
    /// its vocab_size logits: to refuse absurd batch sizes before anything is allocated.
    pub fn activation_bytes_per_token(&self, training: bool) -> u128 {
        let per_layer = if training { 16 } else { 4 };
        4 * (self.n_layer as u128 * per_layer * self.n_embd as u128 + self.vocab_size as u128)
    }

    /// Whether block `i` carries an MoE layer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        let in_stride = match self.moe_placement {
            MoePlacement::End => (i + 1).is_multiple_of(self.stride),
            MoePlacement::Start => i.is_multiple_of(self.stride),
        };
        self.n_exp > 1 && i >= self.moe_start_layer && in_stride
    }

    /// Whether this config has the experts' SwiGLU gate (`mlp.experts.gate_proj`).
    pub fn swiglu_experts(&self) -> bool {
        self.expert_mlp == ExpertMlp::SwiGlu
    }

    /// Whether the norms carry a bias tensor.
    pub fn norm_bias(&self) -> bool {
        self.bias && self.norm_type == NormType::LayerNorm
    }

    /// Whether this is GPT-2's architecture (so a dense model is saved as a native `gpt2`
    /// directory transformers loads without custom code).
    pub fn is_gpt2_architecture(&self) -> bool {
        self.norm_type == NormType::LayerNorm
            && !self.qk_norm
            && matches!(self.activation().ok(), Some(Activation::GeluTanh | Activation::GeluErf))
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn activation(&self) -> Result<Activation> {
        match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::GeluErf),
            "relu2" => Ok(Activation::Relu2),
            other => Err(Error::Config(format!(
                "activation_function {other:?} is not supported (use \"gelu_new\", \"gelu\" or \"relu2\")"
            ))),
        }
    }

    /// Checks every field; the error names the field at fault.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Config(m));
        for (name, v) in [
            ("block_size", self.block_size),
            ("vocab_size", self.vocab_size),
            ("n_layer", self.n_layer),
            ("n_head", self.n_head),
            ("n_embd", self.n_embd),
            ("n_exp", self.n_exp),
        ] {
            if v == 0 {
                return bad(format!("{name} must be at least 1"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return bad(format!(
                "n_embd ({}) must be divisible by n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout must be in [0, 1), got {}", self.dropout));
        }
        self.activation()?;
        if !(self.layer_norm_epsilon > 0.0) {
            return bad(format!("layer_norm_epsilon must be > 0, got {}", self.layer_norm_epsilon));
        }
        if self.stride == 0 {
            return bad("stride must be at least 1".into());
        }
        if self.n_exp > 1 {
            if self.moe_top_k == 0 || self.moe_top_k > self.n_exp {
                return bad(format!(
                    "moe_top_k ({}) must be between 1 and n_exp ({})",
                    self.moe_top_k, self.n_exp
                ));
            }
            if self.num_moe_layers() == 0 {
                return bad(format!(
                    "no block would be MoE: stride {}, moe_start_layer {}, n_layer {}",
                    self.stride, self.moe_start_layer, self.n_layer
                ));
            }
            for (name, v) in [("train_capacity", self.train_capacity), ("eval_capacity", self.eval_capacity)] {
                if !(v > 0.0) || !v.is_finite() {
                    return bad(format!("{name} must be > 0, got {v}"));
                }
            }
            if self.min_capacity == 0 {
                return bad("min_capacity must be at least 1".into());
            }
            for (name, v) in [
                ("aux_loss_weight", self.aux_loss_weight),
                ("router_z_loss_weight", self.router_z_loss_weight),
                ("router_ortho_loss_weight", self.router_ortho_loss_weight),
                ("router_ortho_neg_corr_weight", self.router_ortho_neg_corr_weight),
                ("experts_ortho_loss_weight", self.experts_ortho_loss_weight),
                ("gate_output_loss_weight", self.gate_output_loss_weight),
                ("switch_tfm_init_scale", self.switch_tfm_init_scale),
            ] {
                if !(v >= 0.0) || !v.is_finite() {
                    return bad(format!("{name} must be >= 0, got {v}"));
                }
            }
        }
        match self.size() {
            Some(s) if s.parameters <= MAX_PARAMETERS && s.tensors <= MAX_TENSORS => {}
            s => {
                let what = match s {
                    Some(s) if s.parameters > MAX_PARAMETERS => format!("{} parameters", s.parameters),
                    Some(s) => format!("{} tensors", s.tensors),
                    None => "more parameters than a 128-bit count holds".into(),
                };
                return bad(format!(
                    "n_layer {}, n_embd {}, n_exp {}, vocab_size {}, block_size {} describe a model of {what}; \
                     nanomoe supports up to {MAX_PARAMETERS} parameters in {MAX_TENSORS} tensors",
                    self.n_layer, self.n_embd, self.n_exp, self.vocab_size, self.block_size
                ));
            }
        }
        for (name, id) in [("bos_token_id", self.bos_token_id), ("eos_token_id", self.eos_token_id)] {
            if let Some(id) = id {
                if id as usize >= self.vocab_size {
                    return bad(format!("{name} {id} is out of range for vocab_size {}", self.vocab_size));
                }
            }
        }
        Ok(())
    }

    /// Parses a config object written by a user or by nanomoe's settings (every field has
    /// GPT-2's default). Accepts the legacy key `top_k` for `moe_top_k`; both present and
    /// different is an error. HF bookkeeping keys are kept in `extra`; any other unknown key
    /// is an error naming it.
    pub fn from_json_value(v: &Value) -> Result<Self> {
        let obj = match v {
            Value::Object(m) => m.clone(),
            _ => return Err(Error::Config("config must be a JSON object".into())),
        };
        Self::from_fields(obj)
    }

    fn from_fields(mut obj: Map<String, Value>) -> Result<Self> {
        if let Some(legacy) = obj.remove("top_k") {
            match obj.get("moe_top_k") {
                Some(cur) if cur != &legacy => {
                    return Err(Error::Config(format!(
                        "both moe_top_k ({cur}) and its legacy name top_k ({legacy}) are set and differ"
                    )))
                }
                _ => {
                    obj.insert("moe_top_k".into(), legacy);
                }
            }
        }
        // The seed's name for SwiGLU experts; nanomoe writes it too, for the seed's model.py.
        if let Some(q) = obj.remove("use_qwen3_moe_mlp") {
            let q = q.as_bool().ok_or_else(|| Error::Config(format!("use_qwen3_moe_mlp must be true or false, got {q}")))?;
            let implied = if q { "swiglu" } else { "mlp" };
            match obj.get("expert_mlp") {
                Some(cur) if cur.as_str() != Some(implied) => {
                    return Err(Error::Config(format!("use_qwen3_moe_mlp ({q}) contradicts expert_mlp ({cur})")))
                }
                _ => {
                    obj.insert("expert_mlp".into(), Value::from(implied));
                }
            }
        }
        let mut known = Map::new();
        let mut extra = Map::new();
        for (k, v) in obj {
            if KNOWN_FIELDS.contains(&k.as_str()) {
                known.insert(k, v);
            } else if HF_GENERATION_KEYS.contains(&k.as_str()) || REWRITTEN_KEYS.contains(&k.as_str()) {
                // Never carried over: nanomoe writes its own (and no generation parameters).
            } else if HF_BOOKKEEPING_KEYS.contains(&k.as_str()) {
                extra.insert(k, v);
            } else {
                return Err(Error::Config(format!(
                    "unknown config key {k:?}: nanomoe does not implement it and it may change the model's computation"
                )));
            }
        }
        for key in ["bos_token_id", "eos_token_id"] {
            // HF writes null or a list for "none" / several ids; keep the first id.
            match known.get(key) {
                Some(Value::Null) => {
                    known.remove(key);
                }
                Some(Value::Array(a)) => {
                    let first = a.first().cloned();
                    match first {
                        Some(f) => known.insert(key.into(), f),
                        None => known.remove(key),
                    };
                }
                _ => {}
            }
        }
        let mut cfg: GPTConfig = serde_json::from_value(Value::Object(known)).map_err(|e| Error::Config(e.to_string()))?;
        cfg.extra = extra;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(s).map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        Self::from_json_value(&v)
    }

    /// Reads the `config.json` of a `nanomoe_gpt` directory (or the `model_args` of a
    /// `ckpt.pt`), deciding which architecture it describes:
    /// - every one of [`ARCH_KEYS`]: as stated (what nanomoe writes now);
    /// - some of them but not all: an error naming the missing ones;
    /// - nanomoe's earlier keys (`activation_function`, `layer_norm_epsilon`) and none of the
    ///   seed's: GPT-2's architecture, as nanomoe wrote it before;
    /// - the seed's keys ([`SEED_KEYS`]) and none of ours: the seed's architecture, with the
    ///   seed's defaults for its keys that are absent;
    /// - both, or neither: an error saying what is missing.
    pub fn from_model_json(v: &Value) -> Result<Self> {
        let Value::Object(obj) = v else {
            return Err(Error::Config("config must be a JSON object".into()));
        };
        let has = |k: &&str| obj.contains_key(*k);
        let arch: Vec<&str> = ARCH_KEYS.iter().copied().filter(has).collect();
        let new_arch: Vec<&str> = arch.iter().copied().filter(|k| !LEGACY_ARCH_KEYS.contains(k)).collect();
        let seed: Vec<&str> = SEED_KEYS.iter().copied().filter(has).collect();
        if arch.len() == ARCH_KEYS.len() {
            return Self::from_fields(obj.clone());
        }
        if !new_arch.is_empty() {
            let missing: Vec<&str> = ARCH_KEYS.iter().copied().filter(|k| !has(k)).collect();
            return Err(Error::Config(format!(
                "ambiguous architecture: config.json sets {} but not {}; state all of {}",
                arch.join(", "),
                missing.join(", "),
                ARCH_KEYS.join(", ")
            )));
        }
        match (arch.is_empty(), seed.is_empty()) {
            (false, true) => {
                // nanomoe before the seed's architecture: GPT-2's blocks.
                let mut o = obj.clone();
                o.entry("activation_function").or_insert(Value::from("gelu"));
                Self::from_fields(o)
            }
            (true, false) => {
                let mut o = obj.clone();
                // The seed's defaults for its own keys.
                o.entry("use_experts_ortho_loss").or_insert(Value::Bool(true));
                o.entry("use_gate_output_loss").or_insert(Value::Bool(true));
                let cfg = Self::from_fields(o)?; // use_qwen3_moe_mlp -> expert_mlp
                let swiglu = cfg.swiglu_experts();
                let cfg = cfg.with_seed_architecture(swiglu);
                cfg.validate()?;
                Ok(cfg)
            }
            (false, false) => Err(Error::Config(format!(
                "ambiguous architecture: config.json has nanomoe's {} and askerlee/nanoMoE's {}; state all of {}",
                arch.join(", "),
                seed.join(", "),
                ARCH_KEYS.join(", ")
            ))),
            (true, true) => Err(Error::Config(format!(
                "config.json does not say which architecture it is: it has none of nanomoe's {} and none of askerlee/nanoMoE's {}",
                ARCH_KEYS.join(", "),
                SEED_KEYS.join(", ")
            ))),
        }
    }

    /// Reads a GPT-2 `config.json` (model_type "gpt2").
    pub fn from_gpt2_json(v: &Value) -> Result<Self> {
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| Error::Config(format!("gpt2 config.json lacks integer field {k:?}")))
        };
        if let Some(inner) = v.get("n_inner").filter(|x| !x.is_null()) {
            let n_embd = get("n_embd")?;
            if inner.as_u64() != Some(4 * n_embd as u64) {
                return Err(Error::Config(format!("n_inner {inner} is not supported (must be 4 * n_embd)")));
            }
        }
        // GPT-2 options that change the computation and that nanomoe does not implement.
        for (key, fine) in [("scale_attn_weights", true), ("scale_attn_by_inverse_layer_idx", false), ("add_cross_attention", false)] {
            if let Some(x) = v.get(key) {
                if x.as_bool() != Some(fine) {
                    return Err(Error::Config(format!("{key} = {x} is not supported (nanomoe implements {key} = {fine})")));
                }
            }
        }
        let string = |k: &str, default: &str| -> Result<String> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default.to_string()),
                Some(Value::String(s)) => Ok(s.clone()),
                Some(x) => Err(Error::Config(format!("{k} must be a string, got {x}"))),
            }
        };
        let float = |k: &str, default: f64| -> Result<f64> {
            match v.get(k) {
                None | Some(Value::Null) => Ok(default),
                Some(x) => x.as_f64().ok_or_else(|| Error::Config(format!("{k} must be a number, got {x}"))),
            }
        };
        // transformers' GPT2Config writes 50256 as bos/eos whatever the vocabulary: an id
        // outside it can never be generated, so it is no end of text for this model.
        let vocab = get("vocab_size")?;
        let id = |k: &str| -> Option<u32> {
            let id = match v.get(k) {
                Some(Value::Array(a)) => a.first().and_then(Value::as_u64),
                Some(x) => x.as_u64(),
                None => None,
            };
            id.filter(|&i| (i as usize) < vocab).map(|i| i as u32)
        };
        let d = GPTConfig::default();
        let cfg = GPTConfig {
            block_size: get("n_positions")?,
            vocab_size: vocab,
            n_layer: get("n_layer")?,
            n_head: get("n_head")?,
            n_embd: get("n_embd")?,
            dropout: float("resid_pdrop", 0.0)?,
            bias: match v.get("bias") {
                None => true,
                Some(b) => b.as_bool().ok_or_else(|| Error::Config(format!("bias must be true or false, got {b}")))?,
            },
            activation_function: string("activation_function", "gelu_new")?,
            layer_norm_epsilon: float("layer_norm_epsilon", 1e-5)?,
            n_exp: 1,
            bos_token_id: id("bos_token_id"),
            eos_token_id: id("eos_token_id"),
            ..d
        };
        if !cfg.is_gpt2_architecture() {
            return Err(Error::Config(format!(
                "activation_function {:?} is not one GPT-2 models use (\"gelu_new\" or \"gelu\")",
                cfg.activation_function
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// `config.json` of a dense model saved as a native HF GPT-2 directory.
    pub fn to_gpt2_json(&self, dtype: &str) -> Value {
        let mut m = json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": self.vocab_size,
            "n_positions": self.block_size,
            "n_ctx": self.block_size,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": null,
            "activation_function": self.activation_function,
            "resid_pdrop": self.dropout,
            "embd_pdrop": self.dropout,
            "attn_pdrop": self.dropout,
            "layer_norm_epsilon": self.layer_norm_epsilon,
            "initializer_range": 0.02,
            "scale_attn_weights": true,
            "scale_attn_by_inverse_layer_idx": false,
            "reorder_and_upcast_attn": false,
            "use_cache": true,
            "tie_word_embeddings": true,
            "dtype": dtype,
            // nanomoe's own key: with bias=false the written biases are zeros.
            "bias": self.bias,
        });
        let o = m.as_object_mut().expect("an object");
        if let Some(id) = self.bos_token_id {
            o.insert("bos_token_id".into(), json!(id));
        }
        if let Some(id) = self.eos_token_id {
            o.insert("eos_token_id".into(), json!(id));
        }
        m
    }

    /// `config.json` of a `nanomoe_gpt` model: every field, the architecture stated
    /// explicitly, the seed's `use_qwen3_moe_mlp` (so its model.py reads SwiGLU experts
    /// right), HF's auto_map for the remote code, and the kept bookkeeping keys.
    pub fn to_nanomoe_json(&self, dtype: &str) -> Value {
        let mut m = Map::new();
        m.insert("architectures".into(), json!(["GPT"]));
        m.insert("model_type".into(), json!(NANOMOE_MODEL_TYPE));
        m.insert(
            "auto_map".into(),
            json!({
                "AutoConfig": "configuration_nanomoe_gpt.GPTConfig",
                "AutoModelForCausalLM": "modeling_nanomoe_gpt.GPT",
            }),
        );
        for (k, v) in &self.extra {
            m.insert(k.clone(), v.clone());
        }
        if let Value::Object(fields) = serde_json::to_value(self).expect("config serializes") {
            m.extend(fields);
        }
        m.insert("use_qwen3_moe_mlp".into(), json!(self.swiglu_experts()));
        m.insert("tie_word_embeddings".into(), json!(true));
        m.insert("dtype".into(), json!(dtype));
        Value::Object(m)
    }
}

/// The largest model a config may describe: 2^40 parameters (4 TiB in f32) in at most 2^20
/// tensors. Checked before anything is allocated, so a few bytes of config.json cannot ask for
/// terabytes; the weight files must then hold them too (checked when loading).
pub const MAX_PARAMETERS: u128 = 1 << 40;
pub const MAX_TENSORS: u128 = 1 << 20;

/// What a config describes: see [`GPTConfig::size`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelSize {
    pub tensors: u128,
    pub parameters: u128,
}

/// model_type of nanomoe's `nanomoe_gpt` checkpoints (and of the seed's Python HF code).
pub const NANOMOE_MODEL_TYPE: &str = "nanomoe_gpt";

const KNOWN_FIELDS: &[&str] = &[
    "block_size",
    "vocab_size",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "bias",
    "norm_type",
    "layer_norm_epsilon",
    "qk_norm",
    "activation_function",
    "expert_mlp",
    "n_exp",
    "moe_top_k",
    "stride",
    "moe_placement",
    "moe_start_layer",
    "use_aux_loss",
    "aux_loss_weight",
    "use_router_z_loss",
    "router_z_loss_weight",
    "use_router_ortho_loss",
    "router_ortho_loss_weight",
    "router_ortho_neg_corr_weight",
    "use_experts_ortho_loss",
    "experts_ortho_loss_weight",
    "use_gate_output_loss",
    "gate_output_loss_weight",
    "use_noisy_top_k",
    "train_capacity",
    "eval_capacity",
    "min_capacity",
    "use_switch_tfm_init",
    "switch_tfm_init_scale",
    "router_use_full_prec",
    "bos_token_id",
    "eos_token_id",
];

/// Keys nanomoe writes itself (from the model it saves), so a loaded value is not kept.
const REWRITTEN_KEYS: &[&str] = &["architectures", "model_type", "auto_map", "dtype", "torch_dtype", "transformers_version", "tie_word_embeddings", "_commit_hash"];

/// transformers' PretrainedConfig attributes that do not change a causal LM's computation:
/// kept through a load and re-save.
const HF_BOOKKEEPING_KEYS: &[&str] = &[
    "_name_or_path",
    "_attn_implementation_autoset",
    "_from_model_config",
    "pad_token_id",
    "sep_token_id",
    "decoder_start_token_id",
    "use_cache",
    "return_dict",
    "output_hidden_states",
    "output_attentions",
    "torchscript",
    "use_bfloat16",
    "pruned_heads",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "is_decoder",
    "add_cross_attention",
    "tie_encoder_decoder",
    "cross_attention_hidden_size",
    "finetuning_task",
    "id2label",
    "label2id",
    "num_labels",
    "problem_type",
    "tokenizer_class",
    "prefix",
    "task_specific_params",
    "initializer_range",
    "tf_legacy_loss",
];

/// Generation parameters older transformers kept in config.json: never written back (a
/// `top_k` there is the legacy name of `moe_top_k` and handled before this list).
const HF_GENERATION_KEYS: &[&str] = &[
    "max_length",
    "min_length",
    "do_sample",
    "early_stopping",
    "num_beams",
    "num_beam_groups",
    "diversity_penalty",
    "temperature",
    "top_p",
    "typical_p",
    "repetition_penalty",
    "length_penalty",
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "num_return_sequences",
    "output_scores",
    "return_dict_in_generate",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "remove_invalid_values",
    "exponential_decay_length_penalty",
    "suppress_tokens",
    "begin_suppress_tokens",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_top_k_is_read_and_never_written() {
        let c = GPTConfig::from_json_str(r#"{"n_exp": 4, "top_k": 1, "n_layer": 2}"#).unwrap();
        assert_eq!(c.moe_top_k, 1);
        let s = serde_json::to_string(&c.to_nanomoe_json("float32")).unwrap();
        assert!(!s.contains("\"top_k\""), "{s}");
        assert!(s.contains("\"moe_top_k\":1"));
    }

    #[test]
    fn legacy_top_k_conflict_is_an_error() {
        let e = GPTConfig::from_json_str(r#"{"n_exp": 4, "top_k": 1, "moe_top_k": 2}"#).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid config: both moe_top_k (2) and its legacy name top_k (1) are set and differ"
        );
        // Equal values are fine.
        assert!(GPTConfig::from_json_str(r#"{"n_exp": 4, "top_k": 2, "moe_top_k": 2}"#).is_ok());
    }

    #[test]
    fn invalid_fields_are_named() {
        let cases = [
            (r#"{"n_embd": 30, "n_head": 4}"#, "invalid config: n_embd (30) must be divisible by n_head (4)"),
            (r#"{"n_exp": 4, "moe_top_k": 5}"#, "invalid config: moe_top_k (5) must be between 1 and n_exp (4)"),
            (r#"{"n_exp": 4, "moe_top_k": 0}"#, "invalid config: moe_top_k (0) must be between 1 and n_exp (4)"),
            (r#"{"stride": 0}"#, "invalid config: stride must be at least 1"),
            (r#"{"n_exp": 4, "train_capacity": 0.0}"#, "invalid config: train_capacity must be > 0, got 0"),
            (r#"{"n_exp": 4, "eval_capacity": -1.0}"#, "invalid config: eval_capacity must be > 0, got -1"),
            (r#"{"n_layer": 0}"#, "invalid config: n_layer must be at least 1"),
            (r#"{"dropout": 1.5}"#, "invalid config: dropout must be in [0, 1), got 1.5"),
            (
                r#"{"activation_function": "relu"}"#,
                "invalid config: activation_function \"relu\" is not supported (use \"gelu_new\", \"gelu\" or \"relu2\")",
            ),
            (r#"{"n_layer": "two"}"#, "invalid config: invalid type: string \"two\", expected usize"),
            ("[1]", "invalid config: config must be a JSON object"),
            (
                r#"{"n_layer": 1000000000}"#,
                "invalid config: n_layer 1000000000, n_embd 768, n_exp 1, vocab_size 50304, block_size 1024 describe a model of \
                 7087872039421440 parameters; nanomoe supports up to 1099511627776 parameters in 1048576 tensors",
            ),
            (
                r#"{"n_layer": 18446744073709551615, "n_embd": 4611686018427387904, "n_head": 1}"#,
                "invalid config: n_layer 18446744073709551615, n_embd 4611686018427387904, n_exp 1, vocab_size 50304, \
                 block_size 1024 describe a model of more parameters than a 128-bit count holds; nanomoe supports up to \
                 1099511627776 parameters in 1048576 tensors",
            ),
            (
                r#"{"n_layer": 1000000, "n_embd": 1, "n_head": 1}"#,
                "invalid config: n_layer 1000000, n_embd 1, n_exp 1, vocab_size 50304, block_size 1024 describe a model of \
                 12000004 tensors; nanomoe supports up to 1099511627776 parameters in 1048576 tensors",
            ),
        ];
        for (json, msg) in cases {
            assert_eq!(GPTConfig::from_json_str(json).unwrap_err().to_string(), msg, "{json}");
        }
    }

    #[test]
    fn size_counts_what_param_specs_builds() {
        let base = GPTConfig { n_layer: 5, n_embd: 16, n_head: 2, vocab_size: 37, block_size: 9, ..GPTConfig::default() };
        let mut cases = vec![base.clone(), GPTConfig { bias: false, ..base.clone() }];
        for bias in [false, true] {
            for placement in [MoePlacement::End, MoePlacement::Start] {
                for (stride, start, noisy) in [(1, 0, false), (2, 0, true), (2, 3, false), (3, 1, true)] {
                    let moe = GPTConfig { n_exp: 4, moe_top_k: 2, stride, moe_start_layer: start, use_noisy_top_k: noisy, moe_placement: placement, bias, ..base.clone() };
                    cases.push(moe.clone().with_seed_architecture(true));
                    cases.push(GPTConfig { moe_placement: placement, ..moe.clone().with_seed_architecture(false) });
                    cases.push(moe);
                }
            }
        }
        for c in cases {
            let specs = crate::model::params::param_specs(&c);
            let n: usize = specs.iter().map(|s| s.shape.iter().product::<usize>()).sum();
            assert_eq!(c.num_moe_layers(), (0..c.n_layer).filter(|&i| c.is_moe_layer(i)).count(), "{c:?}");
            assert_eq!(c.size(), Some(ModelSize { tensors: specs.len() as u128, parameters: n as u128 }), "{c:?}");
        }
    }

    #[test]
    fn moe_layer_placement_follows_stride() {
        let c = GPTConfig { n_layer: 4, n_exp: 4, stride: 2, ..GPTConfig::tiny() };
        let moe: Vec<bool> = (0..4).map(|i| c.is_moe_layer(i)).collect();
        assert_eq!(moe, [false, true, false, true]);
        let dense = GPTConfig { n_layer: 4, ..GPTConfig::tiny() };
        assert!((0..4).all(|i| !dense.is_moe_layer(i)));
    }

    #[test]
    fn nanomoe_json_round_trips() {
        let c = GPTConfig { n_exp: 8, stride: 2, use_aux_loss: true, bias: false, ..GPTConfig::tiny() };
        let back = GPTConfig::from_json_value(&c.to_nanomoe_json("float32")).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn gpt2_json_round_trips() {
        let c = GPTConfig { activation_function: "gelu".into(), bias: false, ..GPTConfig::tiny() };
        let back = GPTConfig::from_gpt2_json(&c.to_gpt2_json("float32")).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn seed_configs_read_as_the_seed_architecture() {
        let v: Value = serde_json::from_str(
            r#"{"model_type": "nanomoe_gpt", "n_layer": 4, "n_exp": 4, "stride": 1, "moe_start_layer": 2,
                "use_qwen3_moe_mlp": true, "bias": true, "transformers_version": "4.57.6", "dtype": "float32",
                "_name_or_path": "x"}"#,
        )
        .unwrap();
        let c = GPTConfig::from_model_json(&v).unwrap();
        assert_eq!((c.norm_type, c.layer_norm_epsilon, c.qk_norm), (NormType::RmsNorm, 1e-6, true));
        assert_eq!((c.activation().unwrap(), c.expert_mlp, c.moe_placement), (Activation::Relu2, ExpertMlp::SwiGlu, MoePlacement::End));
        // The seed's defaults for its keys that are absent.
        assert!(c.use_experts_ortho_loss && c.use_gate_output_loss && !c.use_router_ortho_loss);
        assert_eq!((0..4).map(|i| c.is_moe_layer(i)).collect::<Vec<_>>(), [false, false, true, true]);
        assert!(!c.norm_bias() && !c.is_gpt2_architecture());
        // Written back: every architecture key, the bookkeeping kept, the writer's own keys new.
        let w = c.to_nanomoe_json("float32");
        for k in ARCH_KEYS {
            assert!(w.get(k).is_some(), "{k} missing");
        }
        assert_eq!(w["_name_or_path"], "x");
        assert!(w.get("transformers_version").is_none());
        assert_eq!(w["use_qwen3_moe_mlp"], true);
        assert_eq!(GPTConfig::from_model_json(&w).unwrap(), c);
    }

    #[test]
    fn wolfecameron_placement_and_start_layer() {
        let c = GPTConfig { n_layer: 4, n_exp: 4, stride: 2, moe_placement: MoePlacement::Start, ..GPTConfig::tiny() };
        assert_eq!((0..4).map(|i| c.is_moe_layer(i)).collect::<Vec<_>>(), [true, false, true, false]);
        let c = GPTConfig { moe_start_layer: 4, n_layer: 4, n_exp: 4, ..GPTConfig::tiny() };
        assert_eq!(c.validate().unwrap_err().to_string(), "invalid config: no block would be MoE: stride 1, moe_start_layer 4, n_layer 4");
    }
}
