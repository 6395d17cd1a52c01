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
    /// Biases in Linears and LayerNorms, like GPT-2. false: a bit better and faster.
    pub bias: bool,
    /// "gelu_new" (tanh approximation, GPT-2) or "gelu" (exact erf, PyTorch nanoGPT).
    pub activation_function: String,
    pub layer_norm_epsilon: f64,

    // ---- Mixture of Experts -------------------------------------------------------------
    /// Number of experts; 1 means a dense model.
    pub n_exp: usize,
    /// Experts each token is routed to. (`top_k` in older nanoMoE configs.)
    pub moe_top_k: usize,
    /// With n_exp > 1, block i has an MoE layer when (i + 1) % stride == 0.
    pub stride: usize,
    /// Switch Transformer load-balancing loss (Fedus et al. 2021, eq. 4-6).
    pub use_aux_loss: bool,
    pub aux_loss_weight: f64,
    /// ST-MoE router z-loss (Zoph et al. 2022, eq. 5).
    pub use_router_z_loss: bool,
    pub router_z_loss_weight: f64,
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
            activation_function: "gelu_new".into(),
            layer_norm_epsilon: 1e-5,
            n_exp: 1,
            moe_top_k: 2,
            stride: 1,
            use_aux_loss: false,
            aux_loss_weight: 0.01,
            use_router_z_loss: false,
            router_z_loss_weight: 0.001,
            use_noisy_top_k: false,
            train_capacity: 1.25,
            eval_capacity: 2.0,
            min_capacity: 4,
            use_switch_tfm_init: false,
            switch_tfm_init_scale: 1.0,
            router_use_full_prec: false,
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
}

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

    pub fn is_moe(&self) -> bool {
        self.n_exp > 1
    }

    /// Whether block `i` carries an MoE layer.
    pub fn is_moe_layer(&self, i: usize) -> bool {
        self.n_exp > 1 && (i + 1).is_multiple_of(self.stride)
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    pub fn activation(&self) -> Result<Activation> {
        match self.activation_function.as_str() {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Ok(Activation::GeluTanh),
            "gelu" => Ok(Activation::GeluErf),
            other => Err(Error::Config(format!(
                "activation_function {other:?} is not supported (use \"gelu_new\" or \"gelu\")"
            ))),
        }
    }

    /// Token id used as bos/eos in written configs: GPT-2's `<|endoftext|>` when it is in
    /// the vocabulary, else the last id.
    pub fn eos_token_id(&self) -> u32 {
        if self.vocab_size > GPT2_EOS as usize {
            GPT2_EOS
        } else {
            (self.vocab_size.max(1) - 1) as u32
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
            if self.stride > self.n_layer {
                return bad(format!(
                    "stride ({}) is larger than n_layer ({}): no block would be MoE",
                    self.stride, self.n_layer
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
                ("switch_tfm_init_scale", self.switch_tfm_init_scale),
            ] {
                if !(v >= 0.0) || !v.is_finite() {
                    return bad(format!("{name} must be >= 0, got {v}"));
                }
            }
        }
        Ok(())
    }

    /// Parses a nanomoe config object (config.json of a `nanomoe_gpt` model, or a user's
    /// config). Accepts the legacy key `top_k` for `moe_top_k`; both present and different is
    /// an error. Unknown keys (HF bookkeeping such as `architectures`) are ignored.
    pub fn from_json_value(v: &Value) -> Result<Self> {
        let mut obj = match v {
            Value::Object(m) => m.clone(),
            _ => return Err(Error::Config("config must be a JSON object".into())),
        };
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
        let known: Map<String, Value> = obj
            .into_iter()
            .filter(|(k, _)| KNOWN_FIELDS.contains(&k.as_str()))
            .collect();
        let cfg: GPTConfig = serde_json::from_value(Value::Object(known))
            .map_err(|e| Error::Config(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_json_str(s: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(s).map_err(|e| Error::Config(format!("not valid JSON: {e}")))?;
        Self::from_json_value(&v)
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
        let d = GPTConfig::default();
        let cfg = GPTConfig {
            block_size: get("n_positions")?,
            vocab_size: get("vocab_size")?,
            n_layer: get("n_layer")?,
            n_head: get("n_head")?,
            n_embd: get("n_embd")?,
            dropout: v.get("resid_pdrop").and_then(Value::as_f64).unwrap_or(0.0),
            bias: v.get("bias").and_then(Value::as_bool).unwrap_or(true),
            activation_function: v
                .get("activation_function")
                .and_then(Value::as_str)
                .unwrap_or("gelu_new")
                .to_string(),
            layer_norm_epsilon: v.get("layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5),
            n_exp: 1,
            ..d
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// `config.json` of a dense model saved as a native HF GPT-2 directory.
    pub fn to_gpt2_json(&self, dtype: &str) -> Value {
        let eos = self.eos_token_id();
        json!({
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
            "bos_token_id": eos,
            "eos_token_id": eos,
            "dtype": dtype,
            // nanomoe's own key: with bias=false the written biases are zeros.
            "bias": self.bias,
        })
    }

    /// `config.json` of an MoE model (`model_type` "nanomoe_gpt").
    pub fn to_nanomoe_json(&self, dtype: &str) -> Value {
        let mut m = Map::new();
        m.insert("architectures".into(), json!(["GPT"]));
        m.insert("model_type".into(), json!(crate::auto::NANOMOE_MODEL_TYPE));
        m.insert(
            "auto_map".into(),
            json!({
                "AutoConfig": "configuration_nanomoe_gpt.GPTConfig",
                "AutoModelForCausalLM": "modeling_nanomoe_gpt.GPT",
            }),
        );
        if let Value::Object(fields) = serde_json::to_value(self).expect("config serializes") {
            m.extend(fields);
        }
        let eos = self.eos_token_id();
        m.insert("bos_token_id".into(), json!(eos));
        m.insert("eos_token_id".into(), json!(eos));
        m.insert("tie_word_embeddings".into(), json!(true));
        m.insert("dtype".into(), json!(dtype));
        Value::Object(m)
    }
}

const KNOWN_FIELDS: &[&str] = &[
    "block_size",
    "vocab_size",
    "n_layer",
    "n_head",
    "n_embd",
    "dropout",
    "bias",
    "activation_function",
    "layer_norm_epsilon",
    "n_exp",
    "moe_top_k",
    "stride",
    "use_aux_loss",
    "aux_loss_weight",
    "use_router_z_loss",
    "router_z_loss_weight",
    "use_noisy_top_k",
    "train_capacity",
    "eval_capacity",
    "min_capacity",
    "use_switch_tfm_init",
    "switch_tfm_init_scale",
    "router_use_full_prec",
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
                "invalid config: activation_function \"relu\" is not supported (use \"gelu_new\" or \"gelu\")",
            ),
            (r#"{"n_layer": "two"}"#, "invalid config: invalid type: string \"two\", expected usize"),
            ("[1]", "invalid config: config must be a JSON object"),
        ];
        for (json, msg) in cases {
            assert_eq!(GPTConfig::from_json_str(json).unwrap_err().to_string(), msg, "{json}");
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
}
