//! GGUF both ways: a nanomoe model written as a GGUF file llama.cpp reads, and GGUF files
//! (ours, or llama.cpp's `convert_hf_to_gguf.py` output for GPT-2) loaded as a [`GPT`]
//! whose quantized tensors stay quantized, read in place from the mapped file.
//!
//! - Dense GPT-2-architecture models (LayerNorm, tanh-GELU, no MoE, no QK-norm) use
//!   llama.cpp's `gpt2` architecture: its tensor names (`token_embd`, `blk.N.attn_qkv`, ...)
//!   and keys (`gpt2.block_count`, ...), with zero biases written when the model has none.
//! - Every other nanomoe model uses architecture `nanomoe`, with llama.cpp's MoE names
//!   (`ffn_gate_inp` for the router, `ffn_up_exps` / `ffn_gate_exps` / `ffn_down_exps` for
//!   the experts, [E, N, K] with rows along what the product sums over) and keys
//!   (`nanomoe.expert_count`, `nanomoe.expert_used_count`, ...).
//! - Both carry the whole nanomoe config (`nanomoe.config_json`, plus each scalar field as
//!   `nanomoe.config.<field>`), the HF tokenizer (`tokenizer.huggingface.json`) and, for
//!   byte-level BPE tokenizers, llama.cpp's `tokenizer.ggml.*` arrays.

pub mod format;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use half::{bf16, f16};
use serde_json::{json, Value as Json};

use crate::config::GPTConfig;
use crate::error::{Error, Result};
use crate::gpt::GPT;
use crate::kernels::panels::{Elem, Panels};
use crate::params::{is_expert_stack, is_packable, is_quantizable, is_weight_matrix, panel_dims, ParamStore};
use crate::quant::{QBytes, QKind, QTensor};
use crate::tokenizer::Tokenizer;
use crate::weight::WeightFormat;
pub use format::{GgmlType, GgufFile, OutTensor, Value};

/// Whether a path names a GGUF file (by its extension).
pub fn is_gguf_path(p: &Path) -> bool {
    p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// llama.cpp's `general.file_type` of a weight format.
fn file_type(f: WeightFormat) -> u32 {
    match f {
        WeightFormat::F32 => 0,
        WeightFormat::F16 => 1,
        WeightFormat::Quant(QKind::Q4_0) => 2,
        WeightFormat::Quant(QKind::Q8_0) => 7,
        WeightFormat::BF16 => 32,
    }
}

/// Whether a model is written with llama.cpp's `gpt2` architecture.
pub fn uses_gpt2_arch(c: &GPTConfig) -> bool {
    c.is_gpt2_architecture() && !c.is_moe() && matches!(c.activation(), Ok(crate::config::Activation::GeluTanh))
}

/// Our tensor name -> the GGUF one.
fn gguf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "transformer.wte.weight" => Some("token_embd.weight"),
        "transformer.wpe.weight" => Some("position_embd.weight"),
        "transformer.ln_f.weight" => Some("output_norm.weight"),
        "transformer.ln_f.bias" => Some("output_norm.bias"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = name.strip_prefix("transformer.h.")?;
    let (i, part) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let mapped = match part {
        "ln_1.weight" => "attn_norm.weight",
        "ln_1.bias" => "attn_norm.bias",
        "attn.c_attn.weight" => "attn_qkv.weight",
        "attn.c_attn.bias" => "attn_qkv.bias",
        "attn.c_proj.weight" => "attn_output.weight",
        "attn.c_proj.bias" => "attn_output.bias",
        "ln_2.weight" => "ffn_norm.weight",
        "ln_2.bias" => "ffn_norm.bias",
        "mlp.c_fc.weight" => "ffn_up.weight",
        "mlp.c_fc.bias" => "ffn_up.bias",
        "mlp.c_proj.weight" => "ffn_down.weight",
        "mlp.c_proj.bias" => "ffn_down.bias",
        "mlp.router.w_g.weight" => "ffn_gate_inp.weight",
        "mlp.router.w_noise.weight" => "ffn_gate_inp_noise.weight",
        "mlp.experts.gate_proj" => "ffn_gate_exps.weight",
        "mlp.experts.c_fc" => "ffn_up_exps.weight",
        "mlp.experts.c_proj" => "ffn_down_exps.weight",
        "mlp.experts.fc_bias" => "ffn_up_exps.bias",
        "mlp.experts.proj_bias" => "ffn_down_exps.bias",
        _ => return None,
    };
    Some(format!("blk.{i}.{mapped}"))
}

/// Little-endian bytes of f32 values in a GGML type (dense types only).
fn encode_dense(ty: GgmlType, x: &[f32]) -> Vec<u8> {
    match ty {
        GgmlType::F32 => x.iter().flat_map(|v| v.to_le_bytes()).collect(),
        GgmlType::F16 => x.iter().flat_map(|&v| f16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::BF16 => x.iter().flat_map(|&v| bf16::from_f32(v).to_le_bytes()).collect(),
        GgmlType::Q(_) => unreachable!("quantized tensors are encoded by the quantizer"),
    }
}

/// Values of a tensor's bytes as f32.
fn decode_to_f32(ty: GgmlType, b: &[u8]) -> Vec<f32> {
    let size = match ty {
        GgmlType::Q(k) => return crate::quant::dequantize(k, b),
        GgmlType::F32 => 4,
        GgmlType::F16 | GgmlType::BF16 => 2,
    };
    let mut out = vec![0f32; b.len() / size];
    decode_dense_into(ty, b, &mut out);
    out
}

/// A dense (f32, f16, bf16) tensor's bytes as f32 values, into `out` (one per element).
fn decode_dense_into(ty: GgmlType, b: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => out.iter_mut().zip(b.chunks_exact(4)).for_each(|(o, c)| *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        GgmlType::F16 => out.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, c)| *o = f16::from_le_bytes([c[0], c[1]]).to_f32()),
        GgmlType::BF16 => out.iter_mut().zip(b.chunks_exact(2)).for_each(|(o, c)| *o = bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        GgmlType::Q(_) => unreachable!("quantized blocks are dequantized whole"),
    }
}

/// A dense tensor's values, read in chunks of 16 MiB whose mapped pages are dropped once
/// copied.
fn read_values<T>(file: &GgufFile, t: &format::TensorInfo, size: usize, conv: impl Fn(&[u8]) -> T) -> Vec<T> {
    let (start, len) = file.range(t);
    let mut out = Vec::with_capacity(len / size);
    let chunk = (16 << 20) / size * size;
    let mut off = 0;
    while off < len {
        let n = chunk.min(len - off);
        out.extend(file.map[start + off..start + off + n].chunks_exact(size).map(&conv));
        file.release_range(start + off, n);
        off += n;
    }
    out
}

/// What to store with a model in a GGUF file besides its weights.
#[derive(Default)]
pub struct GgufExtras<'a> {
    pub name: Option<&'a str>,
    pub tokenizer: Option<&'a Tokenizer>,
    pub eos_token_id: Option<u32>,
    pub bos_token_id: Option<u32>,
    /// A Jinja chat template (tokenizer_config.json's), written as `tokenizer.chat_template`.
    pub chat_template: Option<&'a str>,
}

/// Writes `gpt` as a GGUF v3 file with weight matrices in `format` (matrices whose rows are
/// not whole blocks, norms, biases, routers and - for quantized formats - the position
/// embedding are f32). A model with quantized weights is written as it is (its format).
pub fn save(gpt: &GPT, path: &Path, format: WeightFormat, extras: &GgufExtras) -> Result<()> {
    let c = &gpt.config;
    let gpt2 = uses_gpt2_arch(c);
    let arch = if gpt2 { "gpt2" } else { "nanomoe" };
    let format = if gpt.params().is_quantized() { gpt.weight_format() } else { format };
    let mut md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str(extras.name.unwrap_or("nanomoe model").into())),
        ("general.file_type".into(), Value::U32(file_type(format))),
    ];
    if matches!(format, WeightFormat::Quant(_)) {
        md.push(("general.quantization_version".into(), Value::U32(2)));
    }
    let key = |k: &str| format!("{arch}.{k}");
    md.push((key("context_length"), Value::U32(c.block_size as u32)));
    md.push((key("embedding_length"), Value::U32(c.n_embd as u32)));
    md.push((key("feed_forward_length"), Value::U32(4 * c.n_embd as u32)));
    md.push((key("block_count"), Value::U32(c.n_layer as u32)));
    md.push((key("attention.head_count"), Value::U32(c.n_head as u32)));
    match c.norm_type {
        crate::config::NormType::LayerNorm => md.push((key("attention.layer_norm_epsilon"), Value::F32(c.layer_norm_epsilon as f32))),
        crate::config::NormType::RmsNorm => md.push((key("attention.layer_norm_rms_epsilon"), Value::F32(c.layer_norm_epsilon as f32))),
    }
    if c.is_moe() {
        md.push((key("expert_count"), Value::U32(c.n_exp as u32)));
        md.push((key("expert_used_count"), Value::U32(c.moe_top_k as u32)));
    }
    let cfg_json = c.to_nanomoe_json(format.name());
    md.push(("nanomoe.config_json".into(), Value::Str(cfg_json.to_string())));
    if let Json::Object(fields) = &cfg_json {
        for (k, v) in fields {
            let v = match v {
                Json::Bool(b) => Value::Bool(*b),
                Json::Number(n) if n.is_u64() => Value::U64(n.as_u64().expect("u64")),
                Json::Number(n) if n.is_i64() => Value::I64(n.as_i64().expect("i64")),
                Json::Number(n) => Value::F64(n.as_f64().unwrap_or(f64::NAN)),
                Json::String(s) => Value::Str(s.clone()),
                _ => continue,
            };
            md.push((format!("nanomoe.config.{k}"), v));
        }
    }
    // (Without a byte-level BPE tokenizer there is no llama.cpp vocabulary to write:
    // llama.cpp sizes its output by the vocabulary, so such a file runs in nanomoe only.)
    if let Some(tok) = extras.tokenizer {
        let text = tok.to_json()?;
        if let Some((tokens, types, merges)) = ggml_bpe_vocab(&text, c.vocab_size)? {
            md.push(("tokenizer.ggml.model".into(), Value::Str("gpt2".into())));
            md.push(("tokenizer.ggml.pre".into(), Value::Str("gpt-2".into())));
            md.push(("tokenizer.ggml.tokens".into(), Value::strings(tokens)));
            md.push(("tokenizer.ggml.token_type".into(), Value::Array(5, types.into_iter().map(Value::I32).collect())));
            md.push(("tokenizer.ggml.merges".into(), Value::strings(merges)));
        }
        md.push(("tokenizer.huggingface.json".into(), Value::Str(text)));
    }
    if let Some(id) = extras.eos_token_id {
        md.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(id)));
    }
    if let Some(t) = extras.chat_template {
        md.push(("tokenizer.chat_template".into(), Value::Str(t.to_string())));
    }
    if let Some(id) = extras.bos_token_id.or(extras.eos_token_id) {
        md.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(id)));
    }

    let mut tensors = Vec::new();
    let params = gpt.params();
    // Dense tensors, then quantized ones, in the store's order.
    let mut names: Vec<String> = params.sizes().map(|(n, _)| n.to_string()).collect();
    if gpt2 && !c.bias {
        // llama.cpp's gpt2 needs every bias: zeros where the model has none.
        for s in crate::checkpoint::gpt2_bias_specs(c) {
            names.push(s.name);
        }
    }
    let quantized: std::collections::HashMap<&str, &Arc<QTensor>> = params.quantized().collect();
    for name in names {
        let gname = gguf_name(&name).ok_or_else(|| Error::Msg(format!("no GGUF name for tensor {name}")))?;
        if let Some(q) = quantized.get(name.as_str()) {
            tensors.push(OutTensor { name: gname, shape: q.shape.clone(), ty: GgmlType::Q(q.kind), data: q.row_blocks().into_owned() });
            continue;
        }
        let t = match params.has(&name) {
            true => params.get(&name)?.to_dtype(DType::F32)?,
            false => {
                let s = crate::checkpoint::gpt2_bias_specs(c).into_iter().find(|s| s.name == name).expect("a bias spec");
                Tensor::zeros(s.shape.as_slice(), DType::F32, &Device::Cpu)?
            }
        };
        let logical = t.dims().to_vec();
        // Expert stacks go out [E, N, K]; their biases [E, N].
        let t = if is_expert_stack(&name) { t.transpose(1, 2)?.contiguous()? } else if name.ends_with("_bias") { t.squeeze(1)? } else { t };
        let shape = t.dims().to_vec();
        let x: Vec<f32> = t.flatten_all()?.to_vec1()?;
        let matrix = is_weight_matrix(&name, shape.len()) && !name.contains(".router.");
        let ty = match format {
            WeightFormat::Quant(k) if matrix && is_quantizable(&name, &logical) => GgmlType::Q(k),
            WeightFormat::F16 if matrix => GgmlType::F16,
            WeightFormat::BF16 if matrix => GgmlType::BF16,
            _ => GgmlType::F32,
        };
        let data = match ty {
            GgmlType::Q(k) => crate::quant::quantize(k, &x, *shape.last().expect("a matrix")),
            dense => encode_dense(dense, &x),
        };
        tensors.push(OutTensor { name: gname, shape, ty, data });
    }
    format::write(path, &md, &tensors)
}

/// llama.cpp's view of a byte-level BPE tokenizer.json: tokens by id (padded to the model's
/// vocabulary with `[PADn]`), their types (1 normal, 3 control, 5 unused) and the merges.
fn ggml_bpe_vocab(text: &str, vocab_size: usize) -> Result<Option<(Vec<String>, Vec<i32>, Vec<String>)>> {
    let v: Json = serde_json::from_str(text).map_err(|e| Error::Msg(format!("tokenizer.json: {e}")))?;
    let model = &v["model"];
    let byte_level = v["pre_tokenizer"]["type"] == "ByteLevel"
        || v["pre_tokenizer"]["pretokenizers"].as_array().is_some_and(|a| a.iter().any(|p| p["type"] == "ByteLevel"));
    if model["type"] != "BPE" || !byte_level {
        return Ok(None);
    }
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; vocab_size];
    if let Some(m) = model["vocab"].as_object() {
        for (tok, id) in m {
            if let Some(id) = id.as_u64().filter(|&i| (i as usize) < vocab_size) {
                tokens[id as usize] = Some((tok.clone(), 1));
            }
        }
    }
    for a in v["added_tokens"].as_array().into_iter().flatten() {
        if let (Some(id), Some(content)) = (a["id"].as_u64().filter(|&i| (i as usize) < vocab_size), a["content"].as_str()) {
            let ty = if a["special"].as_bool().unwrap_or(false) { 3 } else { 4 };
            tokens[id as usize] = Some((content.to_string(), ty));
        }
    }
    let merges = model["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) if p.len() == 2 => Some(format!("{} {}", p[0].as_str()?, p[1].as_str()?)),
            _ => None,
        })
        .collect();
    let (toks, types) = tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or((format!("[PAD{i}]"), 5))).unzip();
    Ok(Some((toks, types, merges)))
}

/// A GPT-2 byte-level BPE tokenizer.json built from llama.cpp's arrays (for GGUF files
/// without `tokenizer.huggingface.json`, e.g. from `convert_hf_to_gguf.py`).
fn tokenizer_from_ggml(file: &GgufFile) -> Result<Option<Tokenizer>> {
    if file.get("tokenizer.ggml.model").and_then(Value::as_str) != Some("gpt2") {
        return Ok(None);
    }
    let (Some(Value::Array(_, tokens)), Some(Value::Array(_, merges))) = (file.get("tokenizer.ggml.tokens"), file.get("tokenizer.ggml.merges")) else {
        return Err(Error::Input("tokenizer.ggml.model is gpt2 but tokenizer.ggml.tokens or .merges is missing".into()));
    };
    let types: Vec<i64> = match file.get("tokenizer.ggml.token_type") {
        Some(Value::Array(_, t)) => t.iter().map(|v| match v {
            Value::I32(x) => *x as i64,
            v => v.as_u64().map(|x| x as i64).unwrap_or(1),
        }).collect(),
        _ => vec![1; tokens.len()],
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let Some(t) = t.as_str() else { return Err(Error::Input(format!("tokenizer.ggml.tokens[{i}] is not a string"))) };
        match types.get(i).copied().unwrap_or(1) {
            3 | 4 => added.push(json!({"id": i, "content": t, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": types[i] == 3})),
            5 => continue,
            _ => {}
        }
        vocab.insert(t.to_string(), json!(i));
    }
    let merges: Vec<Json> = merges.iter().filter_map(|m| m.as_str().map(|s| json!(s))).collect();
    let tj = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "", "end_of_word_suffix": "",
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": merges},
    });
    Ok(Some(Tokenizer::from_json_str(&tj.to_string())?))
}

/// A model read from a GGUF file, with what the file says about its tokens.
pub struct GgufModel {
    pub gpt: GPT,
    pub tokenizer: Option<Tokenizer>,
    pub eos_token_id: Option<u32>,
    pub architecture: String,
    /// `tokenizer.chat_template`, when the file has one.
    pub chat_template: Option<String>,
}

/// The tokenizer a GGUF file carries: its HF tokenizer.json, else one rebuilt from
/// llama.cpp's GPT-2 BPE arrays.
fn tokenizer_of(file: &GgufFile) -> Result<Option<Tokenizer>> {
    match file.get("tokenizer.huggingface.json") {
        Some(v) => Ok(Some(Tokenizer::from_json_str(v.as_str().ok_or_else(|| Error::Input("tokenizer.huggingface.json is not a string".into()))?)?)),
        None => tokenizer_from_ggml(file),
    }
}

fn eos_of(file: &GgufFile) -> Option<u32> {
    file.get("tokenizer.ggml.eos_token_id").and_then(Value::as_u64).map(|v| v as u32)
}

/// Names the end-of-text token of a tokenizer by its id.
fn with_eos(mut tok: Option<Tokenizer>, eos: Option<u32>) -> Option<Tokenizer> {
    if let (Some(t), Some(id)) = (tok.as_mut(), eos) {
        t.eos_token = t.id_to_token(id);
    }
    tok
}

/// The nanomoe config of a GGUF file: `nanomoe.config_json` when present, else llama.cpp's
/// `gpt2.*` keys.
fn config_of(file: &GgufFile, arch: &str) -> Result<GPTConfig> {
    if let Some(v) = file.get("nanomoe.config_json") {
        let s = v.as_str().ok_or_else(|| Error::Input("nanomoe.config_json is not a string".into()))?;
        let j: Json = serde_json::from_str(s).map_err(|e| Error::Input(format!("nanomoe.config_json is not valid JSON: {e}")))?;
        return GPTConfig::from_model_json(&j);
    }
    if arch != "gpt2" {
        return Err(Error::Input(format!("architecture {arch} without nanomoe.config_json")));
    }
    let u = |k: &str| -> Result<u64> {
        file.get(&format!("gpt2.{k}")).and_then(Value::as_u64).ok_or_else(|| Error::Input(format!("gpt2.{k} is missing or not an integer")))
    };
    let eps = file.get("gpt2.attention.layer_norm_epsilon").and_then(Value::as_f64).unwrap_or(1e-5);
    let vocab = file
        .tensors
        .iter()
        .find(|t| t.name == "token_embd.weight")
        .map(|t| t.shape()[0])
        .ok_or_else(|| Error::Input("tensor token_embd.weight is missing".into()))?;
    let ff = u("feed_forward_length")?;
    let d = u("embedding_length")?;
    if ff != 4 * d {
        return Err(Error::Input(format!("gpt2.feed_forward_length {ff} is not 4 x embedding_length {d} (nanomoe's MLP width)")));
    }
    GPTConfig::from_gpt2_json(&json!({
        "model_type": "gpt2",
        "n_layer": u("block_count")?,
        "n_head": u("attention.head_count")?,
        "n_embd": d,
        "n_positions": u("context_length")?,
        "vocab_size": vocab,
        "layer_norm_epsilon": eps,
        "activation_function": "gelu_new",
    }))
}

/// GGUF name -> ours, for every tensor a config has (plus the zero biases of a bias-free
/// model written as gpt2).
fn name_map(c: &GPTConfig) -> std::collections::HashMap<String, String> {
    let mut m = std::collections::HashMap::new();
    for s in crate::params::param_specs(c) {
        if let Some(g) = gguf_name(&s.name) {
            m.insert(g, s.name);
        }
    }
    m
}

/// Loads a GGUF file. Quantized weight matrices stay quantized (read from the mapped file);
/// f16 / bf16 matrices stay in their dtype; everything else becomes f32.
pub fn load(path: &Path) -> Result<GgufModel> {
    load_impl(path, true)
}

/// [`load`] without building the tokenizer (what inference commands that take token ids, or
/// read the tokenizer separately with [`read_tokenizer`], need: a GPT-2 tokenizer's tables
/// take tens of MB).
pub fn load_gpt(path: &Path) -> Result<GPT> {
    Ok(load_impl(path, false)?.gpt)
}

fn load_impl(path: &Path, with_tokenizer: bool) -> Result<GgufModel> {
    let file = GgufFile::open(path)?;
    load_file(&file, with_tokenizer).map_err(|e| match e {
        Error::Input(m) | Error::Checkpoint(m) | Error::Config(m) => Error::file(path, m),
        e => e,
    })
}

fn load_file(file: &GgufFile, with_tokenizer: bool) -> Result<GgufModel> {
    let arch = file.get("general.architecture").and_then(Value::as_str).ok_or_else(|| Error::Input("general.architecture is missing".into()))?.to_string();
    if arch != "gpt2" && arch != "nanomoe" {
        return Err(Error::Input(format!("architecture {arch:?} is not one nanomoe runs (gpt2, nanomoe)")));
    }
    let config = config_of(file, &arch)?;
    // The config's sizes are only claims: the file must hold that many values before the
    // parameter list is built.
    let held: u128 = file.tensors.iter().map(|t| t.ne.iter().map(|&d| d as u128).product::<u128>()).sum();
    let size = config.size().ok_or_else(|| Error::Config("the model's size overflows".into()))?;
    if size.parameters > held {
        return Err(Error::Input(format!("the config describes {} parameters but the file's tensors hold {held} values", size.parameters)));
    }
    let names = name_map(&config);
    let bias_names: std::collections::HashMap<String, String> = if arch == "gpt2" && !config.bias {
        crate::checkpoint::gpt2_bias_specs(&config).into_iter().filter_map(|s| gguf_name(&s.name).map(|g| (g, s.name))).collect()
    } else {
        Default::default()
    };
    let mut dense = Vec::new();
    let mut quant = Vec::new();
    let mut panels = Vec::new();
    let mut output: Option<&format::TensorInfo> = None;
    for t in &file.tensors {
        if t.name == "output.weight" {
            output = Some(t);
            continue;
        }
        if let Some(ours) = bias_names.get(&t.name) {
            // A bias-free model written as gpt2: its biases must be the zeros we wrote.
            if decode_to_f32(t.ty, file.data(t)).iter().any(|&v| v != 0.0) {
                return Err(Error::Input(format!("tensor {} is not zero but the config says bias=false ({ours})", t.name)));
            }
            continue;
        }
        let Some(ours) = names.get(&t.name) else {
            return Err(Error::Input(format!("unexpected tensor {} (shape {:?}) not used by this config", t.name, t.shape())));
        };
        let mut shape = t.shape();
        let keep_quant = matches!(t.ty, GgmlType::Q(_)) && is_weight_matrix(ours, shape.len()) && !ours.contains(".router.") && ours != "transformer.wpe.weight";
        if let (true, GgmlType::Q(kind)) = (keep_quant, t.ty) {
            let (offset, len) = file.range(t);
            // In this CPU's layout: grouped (a copy, after which the file's pages go), or
            // read in place from the mapped file.
            let q = QTensor::new(kind, shape, QBytes::Mapped { map: file.map.clone(), offset, len })?.for_this_cpu();
            if q.grouped {
                file.release_range(offset, len);
            }
            quant.push((ours.clone(), q));
            continue;
        }
        if ours.ends_with("_bias") && shape.len() == 2 {
            shape.insert(1, 1);
        }
        let matrix = is_weight_matrix(ours, shape.len()) && !ours.contains(".router.");
        // f32, f16 and bf16 matrices go straight from the file into panels of their type (the
        // inference layout of dense weights, `ParamStore::into_inference_layout`), the file's
        // pages dropped as packing goes.
        let elem = match t.ty {
            GgmlType::F32 => Some(Elem::F32),
            GgmlType::F16 => Some(Elem::F16),
            GgmlType::BF16 => Some(Elem::BF16),
            _ => None,
        };
        if let (Some(elem), true, Some((e, n, k))) = (elem, is_packable(ours, &shape), panel_dims(&shape)) {
            let (start, len) = file.range(t);
            let (map, mut freed, size) = (&file.map, 0, elem.size());
            let packed = Panels::pack_as(
                elem,
                e,
                n,
                k,
                |e, i, out| {
                    let off = start + (e * n + i) * k * size;
                    decode_dense_into(t.ty, &map[off..off + k * size], out);
                },
                |e, rows_end| {
                    let end = ((e * n + rows_end) * k * size).min(len);
                    file.release_range(start + freed, end - freed);
                    freed = end;
                },
            )?;
            panels.push((ours.clone(), packed));
            continue;
        }
        // Matrices keep f16 / bf16; everything else (and quantized vectors) becomes f32.
        // Read straight into a variable's storage (no second copy), the file's pages dropped
        // as reading goes: memory holds the model plus a few MB.
        let var = |v: Result<Var>| -> Result<Tensor> { Ok(v?.as_tensor().clone()) };
        let tensor = match t.ty {
            GgmlType::F32 => var(Var::from_vec(read_values(file, t, 4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])), shape.as_slice(), &Device::Cpu).map_err(Error::from))?,
            GgmlType::F16 if matrix => var(Var::from_vec(read_values(file, t, 2, |b| f16::from_le_bytes([b[0], b[1]])), shape.as_slice(), &Device::Cpu).map_err(Error::from))?,
            GgmlType::BF16 if matrix => var(Var::from_vec(read_values(file, t, 2, |b| bf16::from_le_bytes([b[0], b[1]])), shape.as_slice(), &Device::Cpu).map_err(Error::from))?,
            ty => Tensor::from_vec(decode_to_f32(ty, file.data(t)), shape.as_slice(), &Device::Cpu)?,
        };
        // Expert stacks stay [E, N, K]: the inference layout (`ParamStore::from_parts`).
        if is_expert_stack(ours) && shape.len() != 3 {
            return Err(Error::Input(format!("tensor {} has shape {shape:?}, expected [experts, rows, cols]", t.name)));
        }
        file.release(t);
        dense.push((ours.clone(), tensor));
    }
    if let Some(out) = output {
        // Tied embeddings only: an output layer must equal token_embd.
        let emb = file.tensors.iter().find(|t| t.name == "token_embd.weight").ok_or_else(|| Error::Input("tensor token_embd.weight is missing".into()))?;
        if out.ty != emb.ty || out.ne != emb.ne || file.data(out) != file.data(emb) {
            return Err(Error::Input("output.weight differs from token_embd.weight; untied output embeddings are not supported".into()));
        }
    }
    let params = ParamStore::from_parts(dense, quant, panels)?;
    let gpt = GPT::from_params(config, params)?;
    let eos_token_id = eos_of(file).filter(|&v| (v as usize) < gpt.config.vocab_size);
    let tokenizer = if with_tokenizer { with_eos(tokenizer_of(file)?, eos_token_id) } else { None };
    let chat_template = file.get("tokenizer.chat_template").and_then(Value::as_str).map(str::to_string);
    Ok(GgufModel { gpt, tokenizer, eos_token_id, architecture: arch, chat_template })
}

/// The tokenizer and end-of-text id a GGUF file carries (its metadata only is read).
pub fn read_tokenizer(path: &Path) -> Result<(Option<Tokenizer>, Option<u32>)> {
    let file = GgufFile::open(path)?;
    let eos = eos_of(&file);
    let tok = tokenizer_of(&file).map_err(|e| match e {
        Error::Input(m) => Error::file(path, m),
        e => e,
    })?;
    Ok((with_eos(tok, eos), eos))
}

/// The end-of-text id a GGUF file names (no tokenizer is built).
pub fn read_eos(path: &Path) -> Result<Option<u32>> {
    Ok(eos_of(&GgufFile::open(path)?))
}

/// Converts a model (an HF directory, a nanoGPT / nanoMoE ckpt.pt, or a GGUF file) into a
/// GGUF file with weight matrices in `format`; the tokenizer and end-of-text id of a
/// directory go with it.
pub fn convert(input: &Path, out: &Path, format: WeightFormat) -> Result<GPT> {
    // The chat template goes along: a GGUF's own key, a directory's tokenizer_config.json.
    let (gpt, tok, eos, chat_template) = if is_gguf_path(input) {
        let m = load(input)?;
        (m.gpt, m.tokenizer, m.eos_token_id, m.chat_template)
    } else if input.is_dir() {
        let gpt = GPT::from_pretrained(input)?;
        let tok = if input.join(crate::tokenizer::TOKENIZER_FILE).is_file() { Some(Tokenizer::from_dir(input)?) } else { None };
        let eos = crate::checkpoint::read_generation_eos(input)?.or(gpt.config.eos_token_id).or_else(|| tok.as_ref().and_then(Tokenizer::eos_token_id));
        let chat_template = std::fs::read_to_string(input.join(crate::tokenizer::TOKENIZER_CONFIG_FILE))
            .ok()
            .and_then(|s| serde_json::from_str::<Json>(&s).ok())
            .and_then(|v| v.get("chat_template").and_then(Json::as_str).map(str::to_string));
        (gpt, tok, eos, chat_template)
    } else if input.is_file() {
        (crate::convert::load_ckpt(input)?, None, None, None)
    } else {
        return Err(Error::file(input, "no such file or directory"));
    };
    if gpt.params().is_quantized() && gpt.weight_format() != format {
        return Err(Error::Input(format!("{} holds {} weights; it can only be written as {}", input.display(), gpt.weight_format().name(), gpt.weight_format().name())));
    }
    let name = input.file_stem().and_then(|s| s.to_str()).map(str::to_string);
    let extras = GgufExtras { name: name.as_deref(), tokenizer: tok.as_ref(), eos_token_id: eos, bos_token_id: None, chat_template: chat_template.as_deref() };
    save(&gpt, out, format, &extras)?;
    Ok(gpt)
}
