//! `AutoModelForCausalLM`: loads a model directory, picking the architecture from the
//! `model_type` in its `config.json`; plus `from_pretrained` / `save_pretrained` on GPT.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use crate::weight::WeightFormat;
use crate::checkpoint::{self, SaveOptions};
use crate::error::{Error, Result};
use crate::gpt::GPT;
use crate::hf_cache;

pub use crate::checkpoint::SUPPORTED_MODEL_TYPES;
pub use crate::config::NANOMOE_MODEL_TYPE;

/// The four OpenAI GPT-2 checkpoints and their Hub repos.
pub const GPT2_REPOS: &[(&str, &str)] = &[
    ("gpt2", "openai-community/gpt2"),
    ("gpt2-medium", "openai-community/gpt2-medium"),
    ("gpt2-large", "openai-community/gpt2-large"),
    ("gpt2-xl", "openai-community/gpt2-xl"),
];

pub struct AutoModelForCausalLM;

impl AutoModelForCausalLM {
    /// Loads a model directory, or a Hub repo id (owner/name).
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<GPT> {
        GPT::from_pretrained(path)
    }

    /// Loads a Hub repo id at a revision (branch, tag or commit sha).
    pub fn from_pretrained_revision(repo_id: &str, revision: &str) -> Result<GPT> {
        GPT::from_pretrained(resolve_model_dir_at(Path::new(repo_id), revision)?)
    }
}

/// Resolves a MODEL argument: an existing directory, or a Hub repo id at `main`.
pub fn resolve_model_dir(model: &Path) -> Result<PathBuf> {
    resolve_model_dir_at(model, "main")
}

/// Resolves a MODEL argument: an existing directory, or a Hub repo id at `revision`
/// (from the local HF cache when complete there, else downloaded into it).
pub fn resolve_model_dir_at(model: &Path, revision: &str) -> Result<PathBuf> {
    if model.is_dir() {
        return Ok(model.to_path_buf());
    }
    let s = model.to_string_lossy();
    if hf_cache::is_repo_id(&s) && s.contains('/') && !model.exists() {
        return crate::hub::HubClient::from_env().download_model(&s, revision);
    }
    if let Some((name, repo)) = GPT2_REPOS.iter().find(|(n, _)| *n == s) {
        if !model.exists() {
            // OpenAI's GPT-2 by its short name, as transformers takes it; older caches hold
            // the legacy repo name.
            let hub = crate::hub::HubClient::from_env();
            if let Some(snap) = hub.cached_model(name, revision) {
                return Ok(snap);
            }
            return hub.download_model(repo, revision);
        }
    }
    if model.exists() {
        return Err(Error::file(model, "not a directory"));
    }
    let names: Vec<&str> = GPT2_REPOS.iter().map(|(n, _)| *n).collect();
    Err(Error::file(model, format!("no such directory, and not a Hub repo id (owner/name, or {})", names.join(", "))))
}

impl GPT {
    /// Loads an HF-format model directory (gpt2 or nanomoe_gpt; sharded or not; F32, F16 or
    /// BF16 weights, computed in f32) onto the CPU.
    pub fn from_pretrained(path: impl AsRef<Path>) -> Result<Self> {
        Self::from_pretrained_on(path, &Device::Cpu)
    }

    /// [`GPT::from_pretrained`] onto `device`: f32 weights in the tensors' own layout, so
    /// the model can train as well as run.
    pub fn from_pretrained_on(path: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = resolve_model_dir(path.as_ref())?;
        let (config, fmt) = checkpoint::read_config(&dir)?;
        let params = checkpoint::load_params_as(&dir, &config, fmt, DType::F32, device)?;
        GPT::from_params(config, params)
    }

    /// Loads for inference with the weight matrices stored as `format` says (f32, bf16,
    /// f16, q8_0 or q4_0; see [`GPT::with_weight_dtype`]), the experts in the inference
    /// layout: such a model does not train. Dense formats are converted while reading, so
    /// memory never holds an f32 copy of them; quantized ones are quantized from f32 one
    /// tensor at a time.
    pub fn from_pretrained_with_weight_dtype(path: impl AsRef<Path>, format: impl Into<WeightFormat>, device: &Device) -> Result<Self> {
        let format = format.into();
        let dir = resolve_model_dir(path.as_ref())?;
        let (config, fmt) = checkpoint::read_config(&dir)?;
        match format {
            WeightFormat::Quant(_) => {
                let params = checkpoint::load_params_as(&dir, &config, fmt, DType::F32, device)?;
                GPT::from_params(config, params)?.with_weight_dtype(format)
            }
            dense => {
                let params = checkpoint::load_params_for_inference(&dir, &config, fmt, dense.dtype().expect("dense"), device)?;
                GPT::from_params(config, params)
            }
        }
    }

    /// Saves as an HF directory: native GPT-2 for dense models, `nanomoe_gpt` for MoE.
    pub fn save_pretrained(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_pretrained_with(dir, &SaveOptions::default())
    }

    pub fn save_pretrained_with(&self, dir: impl AsRef<Path>, opts: &SaveOptions) -> Result<()> {
        checkpoint::save_model(dir.as_ref(), &self.config, self.params(), opts)
    }

    /// Loads OpenAI's GPT-2 (`gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`) from a local
    /// directory of that name or from the local HF cache.
    pub fn from_pretrained_gpt2(name: &str) -> Result<Self> {
        if !GPT2_REPOS.iter().any(|(n, _)| *n == name) {
            let names: Vec<&str> = GPT2_REPOS.iter().map(|(n, _)| *n).collect();
            return Err(Error::Input(format!("unknown GPT-2 model {name:?}; choose one of {}", names.join(", "))));
        }
        Self::from_pretrained(resolve_model_dir(Path::new(name))?)
    }
}
