//! `nanomoe convert`: nanoGPT / nanoMoE training checkpoints (`ckpt.pt`) and HF model
//! directories into HF directories nanomoe and transformers load.
//!
//! A `ckpt.pt` is a zip holding a pickle. Pickles can name any Python callable; this reader
//! never executes anything (candle's pickle reader only builds a tree of values), and it
//! refuses, before reading any tensor, a file whose pickle names anything other than the
//! tensor-rebuilding functions, storage types and containers that `torch.save` of tensors and
//! plain values produces.

use std::io::Read;
use std::path::Path;

use candle_core::pickle::{Object, PthTensors, Stack};
use candle_core::DType;
use serde_json::{Map, Value};

use crate::checkpoint::SaveOptions;
use crate::config::GPTConfig;
use crate::error::{Error, Result};
use crate::gpt::GPT;
use crate::params::ParamStore;

/// Classes a tensors-and-plain-values pickle may name.
fn allowed(module: &str, name: &str) -> bool {
    match module {
        "torch._utils" => matches!(name, "_rebuild_tensor_v2" | "_rebuild_parameter" | "_rebuild_tensor"),
        "torch" => name.ends_with("Storage"),
        "torch.storage" => name == "UntypedStorage",
        "collections" => name == "OrderedDict",
        _ => false,
    }
}

fn check(obj: &Object) -> std::result::Result<(), String> {
    match obj {
        Object::Class { module_name, class_name } => {
            if allowed(module_name, class_name) {
                Ok(())
            } else {
                Err(format!("{module_name}.{class_name}"))
            }
        }
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            check(callable)?;
            check(args)
        }
        Object::PersistentLoad(o) => check(o),
        Object::Tuple(v) | Object::List(v) => v.iter().try_for_each(check),
        Object::Dict(kv) => kv.iter().try_for_each(|(k, v)| {
            check(k)?;
            check(v)
        }),
        Object::Int(_) | Object::Long(_) | Object::Float(_) | Object::Unicode(_) | Object::Bool(_) | Object::None | Object::Mark => Ok(()),
    }
}

fn plain(obj: &Object) -> Option<Value> {
    Some(match obj {
        Object::Int(i) => Value::from(*i),
        Object::Long(i) => Value::from(*i),
        Object::Float(f) => Value::from(*f),
        Object::Bool(b) => Value::Bool(*b),
        Object::Unicode(s) => Value::String(s.clone()),
        Object::None => Value::Null,
        _ => return None,
    })
}

/// Reads and vets the pickle of a torch.save zip; returns its top-level dict.
fn read_pickle(path: &Path) -> Result<Vec<(Object, Object)>> {
    let file = std::fs::File::open(path).map_err(|e| Error::file(path, e))?;
    let mut zip = zip::ZipArchive::new(std::io::BufReader::new(file))
        .map_err(|e| Error::file(path, format!("not a PyTorch checkpoint (torch.save zip): {e}")))?;
    let name = zip
        .file_names()
        .filter_map(|n| n.ok().map(|n| n.into_owned()))
        .find(|n| n.ends_with("data.pkl"))
        .ok_or_else(|| Error::file(path, "not a PyTorch checkpoint: no data.pkl inside"))?;
    let mut bytes = Vec::new();
    zip.by_name(&name)
        .map_err(|e| Error::file(path, e))?
        .read_to_end(&mut bytes)
        .map_err(|e| Error::file(path, e))?;
    let mut stack = Stack::empty();
    stack
        .read_loop(&mut std::io::BufReader::new(bytes.as_slice()))
        .map_err(|e| Error::file(path, format!("unreadable pickle: {e}")))?;
    let obj = stack.finalize().map_err(|e| Error::file(path, format!("unreadable pickle: {e}")))?;
    check(&obj).map_err(|what| {
        Error::file(path, format!("refusing to load: the pickle references {what}, which is neither a tensor nor a plain value"))
    })?;
    match obj {
        Object::Dict(kv) => Ok(kv),
        _ => Err(Error::file(path, "not a nanoGPT checkpoint: the pickle is not a dict")),
    }
}

/// Loads a nanoGPT / nanoMoE `ckpt.pt` (keys `model` and `model_args`).
pub fn load_ckpt(path: &Path) -> Result<GPT> {
    let top = read_pickle(path)?;
    let get = |key: &str| top.iter().find(|(k, _)| *k == Object::Unicode(key.into())).map(|(_, v)| v);
    let args = match get("model_args") {
        Some(Object::Dict(kv)) => kv,
        _ => return Err(Error::file(path, "not a nanoGPT checkpoint: no model_args dict")),
    };
    let mut cfg = Map::new();
    for (k, v) in args {
        if let (Object::Unicode(k), Some(v)) = (k, plain(v)) {
            cfg.insert(k.clone(), v);
        }
    }
    if get("model").is_none() {
        return Err(Error::file(path, "not a nanoGPT checkpoint: no model state_dict"));
    }
    let pth = PthTensors::new(path, Some("model")).map_err(|e| Error::file(path, format!("cannot read the model tensors: {e}")))?;
    let mut names: Vec<String> = pth.tensor_infos().keys().cloned().collect();
    names.sort();
    let config = ckpt_config(cfg, &names).map_err(|e| Error::file(path, e))?;
    let mut tensors = Vec::new();
    let mut lm_head = None;
    for n in names {
        let t = pth
            .get(&n)
            .map_err(|e| Error::file(path, format!("tensor {n}: {e}")))?
            .ok_or_else(|| Error::file(path, format!("tensor {n} is missing")))?
            .to_dtype(DType::F32)?;
        let name = n.strip_prefix("_orig_mod.").unwrap_or(&n).to_string();
        if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
            continue; // the causal-mask buffer of nanoGPT without flash attention
        }
        if name == "lm_head.weight" {
            lm_head = Some(t);
            continue;
        }
        tensors.push((name, t));
    }
    if let (Some(head), Some((_, wte))) = (lm_head, tensors.iter().find(|(n, _)| n == "transformer.wte.weight")) {
        if head.dims() != wte.dims() || (&head - wte)?.abs()?.max_all()?.to_scalar::<f32>()? != 0.0 {
            return Err(Error::file(path, "lm_head.weight differs from transformer.wte.weight; untied output embeddings are not supported"));
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
