//! HF-format model directories: `config.json`, `generation_config.json` and
//! `model.safetensors` (or shards + `model.safetensors.index.json`).
//!
//! Two formats:
//! - `gpt2`: dense models, readable by transformers' GPT2LMHeadModel with no custom code.
//!   GPT-2 stores its Conv1D weights as [in, out]; [`conv1d_transpose`] is the one place
//!   that converts them.
//! - `nanomoe_gpt`: MoE models, tensor names and layouts of nanoMoE's HF checkpoints.
//!
//! Every write goes to a fresh temporary directory that replaces the target only when
//! complete, so a failure never leaves a half-written model.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::config::GPTConfig;
use crate::error::{Error, Result};
use crate::kernels::panels::Panels;
use crate::params::{param_specs, ParamSpec, ParamStore};

pub const CONFIG_FILE: &str = "config.json";
pub const GENERATION_CONFIG_FILE: &str = "generation_config.json";
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const WEIGHTS_INDEX_FILE: &str = "model.safetensors.index.json";

/// The remote code written next to every `nanomoe_gpt` model, so that transformers loads
/// it with `trust_remote_code=True`.
pub const REMOTE_CODE: &[(&str, &str)] = &[
    ("configuration_nanomoe_gpt.py", include_str!("../../python/nanomoe_hf/configuration_nanomoe_gpt.py")),
    ("modeling_nanomoe_gpt.py", include_str!("../../python/nanomoe_hf/modeling_nanomoe_gpt.py")),
];

/// Every `model_type` a model directory may have.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["gpt2", crate::config::NANOMOE_MODEL_TYPE];

/// transformers' default `max_shard_size` ("50GB").
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 50_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Gpt2,
    NanoMoe,
}

impl Format {
    /// GPT-2 for dense models of GPT-2's architecture, nanomoe_gpt for everything else.
    pub fn for_config(c: &GPTConfig) -> Self {
        if c.is_moe() || !c.is_gpt2_architecture() {
            Format::NanoMoe
        } else {
            Format::Gpt2
        }
    }
}

/// Storage dtype of written weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveDType {
    F32,
    F16,
    BF16,
}

impl SaveDType {
    fn candle(self) -> DType {
        match self {
            SaveDType::F32 => DType::F32,
            SaveDType::F16 => DType::F16,
            SaveDType::BF16 => DType::BF16,
        }
    }
    /// The name transformers writes as `dtype` in config.json.
    pub fn hf_name(self) -> &'static str {
        match self {
            SaveDType::F32 => "float32",
            SaveDType::F16 => "float16",
            SaveDType::BF16 => "bfloat16",
        }
    }
    fn st_name(self) -> &'static str {
        match self {
            SaveDType::F32 => "F32",
            SaveDType::F16 => "F16",
            SaveDType::BF16 => "BF16",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(SaveDType::F32),
            "f16" | "float16" | "fp16" => Ok(SaveDType::F16),
            "bf16" | "bfloat16" => Ok(SaveDType::BF16),
            _ => Err(Error::Input(format!("unknown dtype {s:?} (use f32, f16 or bf16)"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SaveOptions {
    pub max_shard_size: u64,
    pub dtype: SaveDType,
}

impl Default for SaveOptions {
    fn default() -> Self {
        SaveOptions { max_shard_size: DEFAULT_MAX_SHARD_SIZE, dtype: SaveDType::F32 }
    }
}

/// Whether `name` is one of GPT-2's Conv1D weights, stored [in, out] in GPT-2 files.
fn is_conv1d_weight(name: &str) -> bool {
    [".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// GPT-2 Conv1D [in, out] <-> nn.Linear [out, in]: the only transpose between formats.
fn conv1d_transpose(name: &str, t: Tensor, format: Format) -> Result<Tensor> {
    if format == Format::Gpt2 && is_conv1d_weight(name) {
        Ok(t.t()?.contiguous()?)
    } else {
        Ok(t)
    }
}

/// The bias tensors GPT-2 always has; written as zeros for a bias=false model.
pub fn gpt2_bias_specs(c: &GPTConfig) -> Vec<ParamSpec> {
    let with_bias = GPTConfig { bias: true, ..c.clone() };
    param_specs(&with_bias).into_iter().filter(|s| s.name.ends_with(".bias")).collect()
}

// ------------------------------------------------------------------------------------
// reading

fn read_json(path: &Path) -> Result<Value> {
    let s = fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
    serde_json::from_str(&s).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))
}

/// Reads `config.json` of a model directory: the config and the format it implies.
pub fn read_config(dir: &Path) -> Result<(GPTConfig, Format)> {
    let path = dir.join(CONFIG_FILE);
    if !path.is_file() {
        return Err(Error::file(&path, "no config.json: not a model directory"));
    }
    let v = read_json(&path)?;
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    let wrap = |e: Error| Error::file(&path, e);
    match model_type {
        "gpt2" => Ok((GPTConfig::from_gpt2_json(&v).map_err(wrap)?, Format::Gpt2)),
        crate::config::NANOMOE_MODEL_TYPE => Ok((GPTConfig::from_model_json(&v).map_err(wrap)?, Format::NanoMoe)),
        other => Err(Error::UnknownModelType {
            found: other.to_string(),
            supported: SUPPORTED_MODEL_TYPES.join(", "),
        }),
    }
}

/// The weight files of a directory: one file, or the shards its index names.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(WEIGHTS_FILE);
    let index = dir.join(WEIGHTS_INDEX_FILE);
    if index.is_file() {
        let v = read_json(&index)?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| Error::file(&index, "has no \"weight_map\" object"))?;
        let mut files = BTreeSet::new();
        for f in map.values() {
            let f = f.as_str().ok_or_else(|| Error::file(&index, "weight_map values must be file names"))?;
            if f.contains('/') || f.contains('\\') || f == ".." {
                return Err(Error::file(&index, format!("shard name {f:?} is not a plain file name")));
            }
            files.insert(f.to_string());
        }
        Ok(files.into_iter().map(|f| dir.join(f)).collect())
    } else if single.is_file() {
        Ok(vec![single])
    } else if dir.join("pytorch_model.bin").is_file() {
        Err(Error::file(dir, "holds only pytorch_model.bin; nanomoe reads safetensors weights"))
    } else {
        Err(Error::file(dir, format!("no {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE}")))
    }
}

fn canonical_name(name: &str) -> Option<String> {
    if name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") {
        return None; // causal-mask buffers of old GPT-2 checkpoints
    }
    if name.starts_with("transformer.") || name == "lm_head.weight" {
        Some(name.to_string())
    } else {
        Some(format!("transformer.{name}"))
    }
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    match d {
        safetensors::Dtype::F32 => Some(DType::F32),
        safetensors::Dtype::F16 => Some(DType::F16),
        safetensors::Dtype::BF16 => Some(DType::BF16),
        _ => None,
    }
}

/// Loads the weights of a model directory, checked against `config`: a missing, extra or
/// mis-shaped tensor is an error naming it and both shapes.
pub fn load_params(dir: &Path, config: &GPTConfig, format: Format, device: &Device) -> Result<ParamStore> {
    load_params_as(dir, config, format, DType::F32, device)
}

/// [`load_params`] with the weight matrices ([`crate::params::is_weight_matrix`]) stored in
/// `weight_dtype` (f32, bf16 or f16), everything else in f32.
pub fn load_params_as(dir: &Path, config: &GPTConfig, format: Format, weight_dtype: DType, device: &Device) -> Result<ParamStore> {
    let (tensors, panels) = read_params(dir, config, format, weight_dtype, false, device)?;
    debug_assert!(panels.is_empty());
    ParamStore::from_tensors_keeping_dtype(tensors)
}

/// [`load_params_as`] for inference: the store in the inference layout, weight matrices
/// packed in panels (f32, bf16 or f16) as each is read (so memory holds the model plus one tensor, not plus a
/// packed copy of the largest).
pub fn load_params_for_inference(dir: &Path, config: &GPTConfig, format: Format, weight_dtype: DType, device: &Device) -> Result<ParamStore> {
    let (tensors, panels) = read_params(dir, config, format, weight_dtype, true, device)?;
    ParamStore::from_tensors_and_panels(tensors, panels)
}

/// The checked tensors of a model directory in spec order, and with `pack` the weight
/// matrices packed (in `weight_dtype`) as they are read (tensors holding the rest).
#[allow(clippy::type_complexity)]
fn read_params(dir: &Path, config: &GPTConfig, format: Format, weight_dtype: DType, pack: bool, device: &Device) -> Result<(Vec<(String, Tensor)>, Vec<(String, Panels)>)> {
    // The config's sizes are only claims: the files must hold at least 2 bytes (f16/bf16) per
    // parameter before the parameter list is built or anything is allocated.
    let mut maps = Vec::new();
    for path in weight_files(dir)? {
        let file = File::open(&path).map_err(|e| Error::file(&path, e))?;
        // SAFETY: the map is read-only and dropped before this function returns; a file
        // changed underneath us can give wrong values but not unsafety in safe code here.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::file(&path, e))?;
        maps.push((path, mmap));
    }
    let mut files = Vec::with_capacity(maps.len());
    for (path, mmap) in &maps {
        let st = safetensors::SafeTensors::deserialize(mmap)
            .map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
        files.push((path, mmap, st));
    }
    let held: u128 = maps.iter().map(|(_, m)| m.len() as u128).sum();
    let size = config.size().ok_or_else(|| Error::Config("the model's size overflows".into()))?;
    if size.parameters.saturating_mul(2) > held {
        return Err(Error::file(
            dir,
            format!(
                "config.json describes {} parameters (at least {} bytes in 16-bit) but the weight files hold {held} bytes",
                size.parameters,
                size.parameters.saturating_mul(2)
            ),
        ));
    }
    let specs = param_specs(config);
    // Shapes as stored in the file.
    let mut expected: BTreeMap<String, Vec<usize>> = specs
        .iter()
        .map(|s| {
            let shape = if format == Format::Gpt2 && is_conv1d_weight(&s.name) {
                s.shape.iter().rev().copied().collect()
            } else {
                s.shape.clone()
            };
            (s.name.clone(), shape)
        })
        .collect();
    let zero_biases: BTreeSet<String> = if format == Format::Gpt2 && !config.bias {
        gpt2_bias_specs(config).into_iter().map(|s| {
            expected.insert(s.name.clone(), s.shape);
            s.name
        }).collect()
    } else {
        BTreeSet::new()
    };

    let mut found: BTreeMap<String, Tensor> = BTreeMap::new();
    let mut packed: BTreeMap<String, Panels> = BTreeMap::new();
    let mut lm_head: Option<Tensor> = None;
    for (path, mmap, st) in files {
        for (name, view) in st.tensors() {
            let Some(name) = canonical_name(&name) else { continue };
            let dtype = st_dtype(view.dtype()).ok_or_else(|| {
                Error::file(path, format!("tensor {name} has dtype {:?}; supported: F32, F16, BF16", view.dtype()))
            })?;
            let transpose = format == Format::Gpt2 && is_conv1d_weight(&name) && view.shape().len() == 2;
            let out = if crate::params::is_weight_matrix(&name, view.shape().len()) { weight_dtype } else { DType::F32 };
            // Bytes already copied out are dropped from this process's memory as reading goes,
            // so loading peaks at the model's size plus a few MB.
            let release = |part: &[u8]| {
                let off = part.as_ptr() as usize - mmap.as_ptr() as usize;
                // SAFETY: the map is read-only and private to this function; dropped pages
                // come back from the file if read again.
                let _ = unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, off, part.len()) };
            };
            let t = read_tensor(view.data(), dtype, view.shape(), transpose, out, device, &release)?;
            if name == "lm_head.weight" {
                lm_head = Some(t);
                continue;
            }
            let Some(shape) = expected.get(&name) else {
                return Err(Error::file(path, format!("unexpected tensor {name} (shape {:?}) not used by this config", view.shape())));
            };
            if shape.as_slice() != view.shape() {
                return Err(Error::file(
                    path,
                    format!("tensor {name} has shape {:?}, expected {:?}", view.shape(), shape),
                ));
            }
            if found.contains_key(&name) || packed.contains_key(&name) {
                return Err(Error::file(path, format!("tensor {name} appears twice")));
            }
            if pack && crate::params::packs(&name, &t) {
                packed.insert(name, crate::params::pack_tensor(&t, false)?);
            } else {
                found.insert(name, t);
            }
        }
    }
    // transformers may keep only one of two tied tensors; the seed's checkpoints can hold
    // lm_head.weight alone.
    if !found.contains_key("transformer.wte.weight") && !packed.contains_key("transformer.wte.weight") {
        if let Some(head) = lm_head.take() {
            if Some(&head.dims().to_vec()) == expected.get("transformer.wte.weight") {
                found.insert("transformer.wte.weight".into(), head);
            }
        }
    }
    for (name, shape) in &expected {
        if !found.contains_key(name) && !packed.contains_key(name) {
            return Err(Error::file(dir, format!("missing tensor {name} (expected shape {shape:?})")));
        }
    }
    if let Some(head) = lm_head {
        // Weights are tied: a separate lm_head must equal wte.
        let same = match (found.get("transformer.wte.weight"), packed.get("transformer.wte.weight")) {
            // (Compared in f32: a bf16 / f16 load holds both in its dtype.)
            (Some(wte), _) => head.dims() == wte.dims() && (&head - wte)?.abs()?.max_all()?.to_dtype(DType::F32)?.to_scalar::<f32>()? == 0.0,
            (None, Some(p)) => head.dims() == [p.rows(), p.cols()] && {
                let h: Vec<f32> = head.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                let mut row = vec![0f32; p.cols()];
                (0..p.rows()).all(|i| {
                    p.row(0, i, &mut row);
                    row[..] == h[i * p.cols()..(i + 1) * p.cols()]
                })
            },
            (None, None) => unreachable!("checked above"),
        };
        if !same {
            return Err(Error::file(dir, "lm_head.weight differs from transformer.wte.weight; untied output embeddings are not supported"));
        }
    }
    for name in &zero_biases {
        let t = found.remove(name).expect("checked above");
        if t.abs()?.max_all()?.to_scalar::<f32>()? != 0.0 {
            return Err(Error::file(dir, format!("config says bias=false but {name} is not zero")));
        }
    }
    let mut tensors = Vec::with_capacity(specs.len());
    let mut panels = Vec::new();
    for s in &specs {
        // Already transposed from Conv1D's [in, out] while reading.
        match found.remove(&s.name) {
            Some(t) => tensors.push((s.name.clone(), t)),
            None => panels.push((s.name.clone(), packed.remove(&s.name).expect("checked above"))),
        }
    }
    Ok((tensors, panels))
}

/// A tensor's little-endian f32/f16/bf16 bytes as a variable of dtype `out` (f32, bf16 or f16),
/// with no intermediate copy; `transpose` swaps the two dimensions of a matrix while
/// reading (GPT-2's Conv1D [in, out] layout, see [`conv1d_transpose`] for the write side).
/// `release` is called with each part of `bytes` once it has been read.
fn read_tensor(bytes: &[u8], dtype: DType, shape: &[usize], transpose: bool, out: DType, device: &Device, release: &dyn Fn(&[u8])) -> Result<Tensor> {
    let width = match dtype {
        DType::F32 => 4,
        DType::F16 | DType::BF16 => 2,
        _ => return Err(Error::Checkpoint(format!("unsupported dtype {dtype:?}"))),
    };
    let value = |i: usize| -> f32 {
        let b = &bytes[width * i..width * (i + 1)];
        match dtype {
            DType::F32 => f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            DType::F16 => half::f16::from_le_bytes([b[0], b[1]]).to_f32(),
            _ => half::bf16::from_le_bytes([b[0], b[1]]).to_f32(),
        }
    };
    let n: usize = shape.iter().product();
    let mut dims = shape.to_vec();
    // Element i of the output reads element src(i) of the file.
    let (r, c) = if transpose { (shape[0], shape[1]) } else { (0, 0) };
    if transpose {
        dims.reverse();
    }
    let src = |i: usize| if transpose { (i % r) * c + i / r } else { i };
    // Sequential reads release every 1M elements; a transposed matrix at the end.
    const CHUNK: usize = 1 << 20;
    fn fill<T>(n: usize, transpose: bool, width: usize, bytes: &[u8], release: &dyn Fn(&[u8]), f: impl Fn(usize) -> T) -> Vec<T> {
        let mut v = Vec::with_capacity(n);
        let mut start = 0;
        while start < n {
            let end = (start + CHUNK).min(n);
            v.extend((start..end).map(&f));
            if !transpose {
                release(&bytes[start * width..end * width]);
            }
            start = end;
        }
        if transpose {
            release(bytes);
        }
        v
    }
    let var = match out {
        DType::BF16 => candle_core::Var::from_vec(fill(n, transpose, width, bytes, release, |i| half::bf16::from_f32(value(src(i)))), dims, device)?,
        DType::F16 => candle_core::Var::from_vec(fill(n, transpose, width, bytes, release, |i| half::f16::from_f32(value(src(i)))), dims, device)?,
        _ => candle_core::Var::from_vec(fill(n, transpose, width, bytes, release, |i| value(src(i))), dims, device)?,
    };
    Ok(var.as_tensor().clone())
}

// ------------------------------------------------------------------------------------
// writing

/// A directory being written: files go into a sibling temporary directory that replaces
/// the target in [`AtomicDir::commit`]. Files of the target that are not rewritten are
/// kept, except stale weight files.
pub struct AtomicDir {
    target: PathBuf,
    tmp: PathBuf,
    committed: bool,
}

impl AtomicDir {
    pub fn new(target: &Path) -> Result<Self> {
        let parent = match target.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        fs::create_dir_all(&parent).map_err(|e| Error::file(&parent, e))?;
        if target.exists() && !target.is_dir() {
            return Err(Error::file(target, "exists and is not a directory"));
        }
        let name = target.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "model".into());
        remove_abandoned(&parent, &name);
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tmp = parent.join(format!(".{name}.tmp-{}-{stamp}", std::process::id()));
        fs::create_dir(&tmp).map_err(|e| Error::file(&tmp, e))?;
        Ok(AtomicDir { target: target.to_path_buf(), tmp, committed: false })
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.tmp.join(file)
    }

    pub fn write_bytes(&self, file: &str, bytes: &[u8]) -> Result<()> {
        let p = self.path(file);
        let mut f = File::create(&p).map_err(|e| Error::file(&p, e))?;
        f.write_all(bytes).and_then(|_| f.sync_all()).map_err(|e| Error::file(&p, e))
    }

    pub fn write_json(&self, file: &str, v: &Value) -> Result<()> {
        let mut s = serde_json::to_string_pretty(v).expect("json serializes");
        s.push('\n');
        self.write_bytes(file, s.as_bytes())
    }

    /// Replaces the target with the written directory.
    pub fn commit(mut self) -> Result<()> {
        let written: BTreeSet<String> = fs::read_dir(&self.tmp)
            .map_err(|e| Error::file(&self.tmp, e))?
            .filter_map(|e| e.ok().map(|e| e.file_name().to_string_lossy().to_string()))
            .collect();
        // (Unique like tmp: a backup left by a process killed before it removed it must not
        // block the next commit.)
        let backup = PathBuf::from(format!("{}.old", self.tmp.display()));
        if self.target.is_dir() {
            for entry in fs::read_dir(&self.target).map_err(|e| Error::file(&self.target, e))? {
                let entry = entry.map_err(|e| Error::file(&self.target, e))?;
                let name = entry.file_name().to_string_lossy().to_string();
                let stale_weights = name.starts_with("model") && name.contains(".safetensors");
                if written.contains(&name) || stale_weights {
                    continue;
                }
                let to = self.tmp.join(&name);
                if fs::hard_link(entry.path(), &to).is_err() {
                    copy_recursively(&entry.path(), &to)?;
                }
            }
            fs::rename(&self.target, &backup).map_err(|e| Error::file(&self.target, e))?;
        }
        if let Err(e) = fs::rename(&self.tmp, &self.target) {
            let _ = fs::rename(&backup, &self.target);
            return Err(Error::file(&self.target, e));
        }
        self.committed = true;
        if backup.exists() {
            let _ = fs::remove_dir_all(&backup);
        }
        Ok(())
    }
}

/// Removes the temporary and backup directories (`.NAME.tmp-PID-...`) that processes which
/// no longer run left next to `parent/NAME` (killed mid-save). Linux only (reads /proc).
fn remove_abandoned(parent: &Path, name: &str) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let prefix = format!(".{name}.tmp-");
    let Ok(rd) = fs::read_dir(parent) else { return };
    for e in rd.flatten() {
        let file = e.file_name().to_string_lossy().to_string();
        let Some(rest) = file.strip_prefix(&prefix) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

fn copy_recursively(from: &Path, to: &Path) -> Result<()> {
    if from.is_dir() {
        fs::create_dir_all(to).map_err(|e| Error::file(to, e))?;
        for e in fs::read_dir(from).map_err(|e| Error::file(from, e))? {
            let e = e.map_err(|e| Error::file(from, e))?;
            copy_recursively(&e.path(), &to.join(e.file_name()))?;
        }
    } else {
        fs::copy(from, to).map_err(|e| Error::file(from, e))?;
    }
    Ok(())
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.committed {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Writes a safetensors file from (name, tensor) pairs, with `__metadata__ {"format":"pt"}`.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], dtype: SaveDType) -> Result<u64> {
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0u64;
    let mut converted = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_dtype(dtype.candle())?.contiguous()?;
        let n = (t.elem_count() * dtype.candle().size_in_bytes()) as u64;
        header.insert(name.clone(), json!({"dtype": dtype.st_name(), "shape": t.dims(), "data_offsets": [offset, offset + n]}));
        offset += n;
        converted.push(t);
    }
    let mut h = serde_json::to_string(&Value::Object(header)).expect("json serializes");
    while !h.len().is_multiple_of(8) {
        h.push(' ');
    }
    let file = File::create(path).map_err(|e| Error::file(path, e))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let io = |e: std::io::Error| Error::file(path, e);
    w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(h.as_bytes()).map_err(io)?;
    for t in converted {
        write_tensor_bytes(&mut w, &t).map_err(io)?;
    }
    let f = w.into_inner().map_err(|e| Error::file(path, e.error()))?;
    f.sync_all().map_err(io)?;
    Ok(offset)
}

fn write_tensor_bytes(w: &mut impl Write, t: &Tensor) -> std::io::Result<()> {
    let flat = t.flatten_all().map_err(std::io::Error::other)?;
    match t.dtype() {
        DType::F32 => {
            for v in flat.to_vec1::<f32>().map_err(std::io::Error::other)? {
                w.write_all(&v.to_le_bytes())?;
            }
        }
        DType::F16 => {
            for v in flat.to_vec1::<half::f16>().map_err(std::io::Error::other)? {
                w.write_all(&v.to_le_bytes())?;
            }
        }
        DType::BF16 => {
            for v in flat.to_vec1::<half::bf16>().map_err(std::io::Error::other)? {
                w.write_all(&v.to_le_bytes())?;
            }
        }
        other => return Err(std::io::Error::other(format!("cannot write dtype {other:?}"))),
    }
    Ok(())
}

/// The tensors to write for a model, with file names and layouts of `format`.
pub fn export_tensors(config: &GPTConfig, params: &ParamStore, format: Format) -> Result<Vec<(String, Tensor)>> {
    if let Some((name, q)) = params.quantized().next() {
        return Err(Error::Input(format!(
            "tensor {name} is stored as {}: a quantized model is saved as GGUF (`nanomoe convert MODEL --out model.gguf`), or loaded with dense weights to save it as safetensors",
            q.kind.name()
        )));
    }
    let mut out = Vec::new();
    for name in params.dense_names() {
        // `get`: the tensors' own layout, whatever the store holds them in for inference.
        out.push((name.to_string(), conv1d_transpose(name, params.get(name)?.contiguous()?.detach(), format)?));
    }
    if format == Format::Gpt2 && !config.bias {
        for s in gpt2_bias_specs(config) {
            out.push((s.name.clone(), Tensor::zeros(s.shape.as_slice(), DType::F32, &Device::Cpu)?));
        }
    }
    Ok(out)
}

/// Writes weights (sharded above `max_shard_size`) into `dir`.
pub fn write_weights(dir: &AtomicDir, tensors: Vec<(String, Tensor)>, opts: &SaveOptions) -> Result<()> {
    let width = opts.dtype.candle().size_in_bytes() as u64;
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![Vec::new()];
    let mut size = 0u64;
    for (name, t) in tensors {
        let n = t.elem_count() as u64 * width;
        if size > 0 && size + n > opts.max_shard_size {
            shards.push(Vec::new());
            size = 0;
        }
        size += n;
        shards.last_mut().expect("non-empty").push((name, t));
    }
    if shards.len() == 1 {
        write_safetensors(&dir.path(WEIGHTS_FILE), &shards[0], opts.dtype)?;
        return Ok(());
    }
    let count = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    let mut total_params = 0u64;
    for (i, shard) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{:05}.safetensors", i + 1, count);
        total += write_safetensors(&dir.path(&file), shard, opts.dtype)?;
        for (name, t) in shard {
            weight_map.insert(name.clone(), json!(file));
            total_params += t.elem_count() as u64;
        }
    }
    dir.write_json(
        WEIGHTS_INDEX_FILE,
        &json!({"metadata": {"total_size": total, "total_parameters": total_params}, "weight_map": weight_map}),
    )
}

/// Parses sizes such as "50GB", "200MB", "5GiB" or a plain byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| Error::Input(format!("invalid size {s:?}")))?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(Error::Input(format!("invalid size unit in {s:?} (use B, KB, MB, GB, KiB, MiB, GiB)"))),
    };
    if n <= 0.0 {
        return Err(Error::Input(format!("size must be positive, got {s:?}")));
    }
    Ok((n * mult) as u64)
}

/// generation_config.json written next to every model.
pub fn generation_config_json(c: &GPTConfig) -> Value {
    let mut m = json!({"_from_model_config": true});
    let o = m.as_object_mut().expect("an object");
    if let Some(id) = c.bos_token_id {
        o.insert("bos_token_id".into(), json!(id));
    }
    if let Some(id) = c.eos_token_id {
        o.insert("eos_token_id".into(), json!(id));
    }
    m
}

/// Saves a model directory in the format its config implies.
pub fn save_model(dir: &Path, config: &GPTConfig, params: &ParamStore, opts: &SaveOptions) -> Result<()> {
    let format = Format::for_config(config);
    let out = AtomicDir::new(dir)?;
    let cfg_json = match format {
        Format::Gpt2 => config.to_gpt2_json(opts.dtype.hf_name()),
        Format::NanoMoe => config.to_nanomoe_json(opts.dtype.hf_name()),
    };
    out.write_json(CONFIG_FILE, &cfg_json)?;
    if format == Format::NanoMoe {
        for (name, code) in REMOTE_CODE {
            out.write_bytes(name, code.as_bytes())?;
        }
    }
    out.write_json(GENERATION_CONFIG_FILE, &generation_config_json(config))?;
    write_weights(&out, export_tensors(config, params, format)?, opts)?;
    out.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("50GB").unwrap(), 50_000_000_000);
        assert_eq!(parse_size("2MiB").unwrap(), 2 * 1024 * 1024);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("3XB").unwrap_err().to_string(), "invalid input: invalid size unit in \"3XB\" (use B, KB, MB, GB, KiB, MiB, GiB)");
    }

    #[test]
    fn directories_left_by_killed_saves_do_not_block_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("best");
        std::fs::create_dir(&target).unwrap();
        std::fs::write(target.join("config.json"), b"{}").unwrap();
        // What a process killed mid-commit leaves (pid 4294967295 never runs): a temporary
        // directory and a non-empty backup; the old naming gave every backup the same name.
        for leftover in [".best.tmp-4294967295-1", ".best.tmp-4294967295-1.old", ".best.old"] {
            std::fs::create_dir(tmp.path().join(leftover)).unwrap();
            std::fs::write(tmp.path().join(leftover).join("x"), b"x").unwrap();
        }
        for round in 0..2 {
            let d = AtomicDir::new(&target).unwrap();
            d.write_bytes("model.safetensors", format!("{round}").as_bytes()).unwrap();
            d.commit().unwrap();
        }
        assert_eq!(std::fs::read(target.join("model.safetensors")).unwrap(), b"1");
        assert!(target.join("config.json").is_file());
        let mut left: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        left.sort();
        assert_eq!(left, vec![".best.old".to_string(), "best".to_string()]);
    }

    #[test]
    fn names_are_canonicalised() {
        assert_eq!(canonical_name("h.0.ln_1.weight").unwrap(), "transformer.h.0.ln_1.weight");
        assert_eq!(canonical_name("transformer.wte.weight").unwrap(), "transformer.wte.weight");
        assert!(canonical_name("h.3.attn.bias").is_none());
        assert!(canonical_name("transformer.h.3.attn.masked_bias").is_none());
    }
}

/// The `eos_token_id` of a directory's generation_config.json (None without the file or key).
pub fn read_generation_eos(dir: &Path) -> Result<Option<u32>> {
    let p = dir.join(GENERATION_CONFIG_FILE);
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            let v: serde_json::Value = serde_json::from_str(&s).map_err(|e| Error::file(&p, format!("not valid JSON: {e}")))?;
            Ok(v.get("eos_token_id").and_then(serde_json::Value::as_u64).map(|x| x as u32))
        }
        Err(_) => Ok(None),
    }
}
