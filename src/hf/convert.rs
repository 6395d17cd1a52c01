//! `nanomoe convert`: nanoGPT / nanoMoE training checkpoints (`ckpt.pt`) and HF model
//! directories into HF directories nanomoe and transformers load.
//!
//! A `ckpt.pt` is a zip holding a pickle. Pickles can name any Python callable; the reader
//! ([`crate::pickle`]) never executes anything, and refuses a file whose pickle names anything
//! other than the tensor-rebuilding functions, storage types and containers that `torch.save`
//! of tensors and plain values produces.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use serde_json::{Map, Value};

use crate::checkpoint::SaveOptions;
use crate::config::GPTConfig;
use crate::error::{Error, Result};
use crate::gpt::GPT;
use crate::params::ParamStore;
use crate::pickle::{Pickled, TensorRef, TorchZip};

/// Loads a nanoGPT / nanoMoE `ckpt.pt` (keys `model` and `model_args`). Every tensor's shape
/// is checked against the config before its data is read, and the config's size against the
/// file's.
pub fn load_ckpt(path: &Path) -> Result<GPT> {
    let (mut zip, top) = TorchZip::open(path)?;
    if !matches!(top, Pickled::Dict(_)) {
        return Err(Error::file(path, "not a nanoGPT checkpoint: the pickle is not a dict"));
    }
    let Some(Pickled::Dict(args)) = top.get("model_args") else {
        return Err(Error::file(path, "not a nanoGPT checkpoint: no model_args dict"));
    };
    let mut cfg = Map::new();
    for (k, v) in args {
        if let (Pickled::Str(k), Some(v)) = (k, v.to_json()) {
            cfg.insert(k.clone(), v);
        }
    }
    let Some(Pickled::Dict(state)) = top.get("model") else {
        return Err(Error::file(path, "not a nanoGPT checkpoint: no model state_dict"));
    };
    let mut refs: BTreeMap<String, TensorRef> = BTreeMap::new();
    for (k, v) in state {
        let (Pickled::Str(k), Some(r)) = (k, TensorRef::from_pickled(v)) else { continue };
        let r = r.map_err(|e| Error::file(path, format!("tensor {k}: {e}")))?;
        let name = k.strip_prefix("_orig_mod.").unwrap_or(k).to_string();
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
            continue; // the causal-mask buffer of nanoGPT without flash attention
        }
        if refs.insert(name.clone(), r).is_some() {
            return Err(Error::file(path, format!("tensor {name} appears twice")));
        }
    }
    let names: Vec<String> = refs.keys().cloned().collect();
    let config = ckpt_config(cfg, &names).map_err(|e| Error::file(path, e))?;
    let size = config.size().ok_or_else(|| Error::file(path, "the model's size overflows"))?;
    if size.parameters.saturating_mul(2) > zip.file_len() as u128 {
        return Err(Error::file(
            path,
            format!("model_args describe {} parameters but the file holds {} bytes", size.parameters, zip.file_len()),
        ));
    }
    crate::runtime::check_memory(|| format!("converting a model of {} parameters", size.parameters), size.parameters * 8)?;
    let expected: BTreeMap<String, Vec<usize>> = crate::params::param_specs(&config).into_iter().map(|s| (s.name, s.shape)).collect();
    let mut tensors = Vec::new();
    let mut lm_head = None;
    for (name, r) in &refs {
        let want = if name == "lm_head.weight" { expected.get("transformer.wte.weight") } else { expected.get(name) };
        let Some(want) = want else {
            return Err(Error::file(path, format!("unexpected tensor {name} (shape {:?}) not used by this config", r.shape)));
        };
        if &r.shape != want {
            return Err(Error::file(path, format!("tensor {name} has shape {:?}, expected {want:?}", r.shape)));
        }
        let t = zip.read_tensor(name, r, &Device::Cpu)?;
        if name == "lm_head.weight" {
            lm_head = Some(t);
        } else {
            tensors.push((name.clone(), t));
        }
    }
    if let Some(head) = lm_head {
        match tensors.iter().find(|(n, _)| n == "transformer.wte.weight") {
            Some((_, wte)) if (&head - wte)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0 => {}
            Some(_) => return Err(Error::file(path, "lm_head.weight differs from transformer.wte.weight; untied output embeddings are not supported")),
            None => tensors.push(("transformer.wte.weight".into(), head)),
        }
    }
    let params = ParamStore::from_tensors(tensors)?;
    GPT::from_params(config, params).map_err(|e| Error::file(path, e))
}

/// The config of a ckpt.pt from its `model_args` and tensor names. The seed's train.py
/// (askerlee/nanoMoE) writes its own keys: the seed's architecture. nanoGPT's and
/// wolfecameron/nanoMoE's write none of them: LayerNorm and exact GELU, with the MoE blocks
/// where the tensors have them - wolfecameron's train.py places them at i % stride == 0,
/// nanomoe and the seed at (i + 1) % stride == 0.
fn ckpt_config(mut args: Map<String, Value>, tensor_names: &[String]) -> Result<GPTConfig> {
    let seed = crate::config::SEED_KEYS.iter().any(|k| args.contains_key(*k));
    if seed {
        return GPTConfig::from_model_json(&Value::Object(args));
    }
    args.entry("activation_function").or_insert(Value::from("gelu"));
    args.entry("layer_norm_epsilon").or_insert(Value::from(1e-5));
    args.insert("norm_type".into(), Value::from("layernorm"));
    args.insert("qk_norm".into(), Value::Bool(false));
    args.insert("expert_mlp".into(), Value::from("mlp"));
    let routed: Vec<usize> = tensor_names
        .iter()
        .filter_map(|n| n.strip_prefix("_orig_mod.").unwrap_or(n).strip_prefix("transformer.h.")?.strip_suffix(".mlp.router.w_g.weight")?.parse().ok())
        .collect();
    let mut last_err = None;
    for placement in ["end", "start"] {
        args.insert("moe_placement".into(), Value::from(placement));
        let cfg = GPTConfig::from_model_json(&Value::Object(args.clone()))?;
        let mut expected: Vec<usize> = (0..cfg.n_layer).filter(|&i| cfg.is_moe_layer(i)).collect();
        let mut found = routed.clone();
        expected.sort_unstable();
        found.sort_unstable();
        if expected == found {
            return Ok(cfg);
        }
        last_err = Some(format!("the checkpoint has MoE layers at blocks {found:?}; its config (n_exp {}, stride {}) places them at {expected:?} or at the other stride convention", cfg.n_exp, cfg.stride));
    }
    Err(Error::Checkpoint(last_err.unwrap_or_default()))
}

/// Tokenizer-related files copied along when converting a model directory.
const TOKENIZER_FILES: &[&str] = &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt"];

/// Converts `input` (a ckpt.pt, or an HF model directory) into an HF directory at `out`.
pub fn convert(input: &Path, out: &Path, opts: &SaveOptions) -> Result<GPT> {
    if input.is_dir() {
        let model = GPT::from_pretrained(input)?;
        model.save_pretrained_with(out, opts)?;
        for f in TOKENIZER_FILES {
            let src = input.join(f);
            if src.is_file() && input.canonicalize().ok() != out.canonicalize().ok() {
                let bytes = std::fs::read(&src).map_err(|e| Error::file(&src, e))?;
                crate::tokenizer::write_atomic(&out.join(f), &bytes)?;
            }
        }
        return Ok(model);
    }
    if !input.is_file() {
        return Err(Error::file(input, "no such file or directory"));
    }
    let model = load_ckpt(input)?;
    model.save_pretrained_with(out, opts)?;
    Ok(model)
}
