//! Training states: everything `--init_from=resume` needs to continue exactly - weights,
//! AdamW moments, the step, the best val loss and the settings. Batches and dropout are
//! drawn from generators seeded by (seed, step), so no generator state needs saving.
//!
//! Layout: out_dir/state/step-XXXXXXXX/{model.safetensors, optimizer.safetensors,
//! state.json}, and out_dir/state/latest naming the newest complete one. Each state is
//! written into a temporary directory and renamed into place; `latest` is updated only
//! afterwards, so a crash at any point leaves the previous state intact.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{write_safetensors, AtomicDir, SaveDType};
use crate::config::GPTConfig;
use crate::error::{Error, Result};
use crate::params::ParamStore;
use crate::tokenizer::write_atomic;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StateInfo {
    /// Optimizer steps completed.
    pub iter: u64,
    pub best_val_loss: Option<f64>,
    pub tokens_seen: u64,
    pub model: GPTConfig,
    pub settings: serde_json::Value,
}

pub fn state_root(out_dir: &Path) -> PathBuf {
    out_dir.join("state")
}

fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::file(path, e))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| Error::file(path, format!("not a valid safetensors file: {e}")))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(Error::file(path, format!("tensor {name} is not F32")));
        }
        out.push((name, Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), &Device::Cpu)?));
    }
    Ok(out)
}

/// Writes a state and points `latest` at it; keeps the newest `keep` states.
/// `moments`: AdamW's (name, m, v) for each parameter ([`AdamW::state`]).
pub fn save_state(out_dir: &Path, info: &StateInfo, params: &ParamStore, moments_in: &[(String, Tensor, Tensor)], keep: usize) -> Result<()> {
    let root = state_root(out_dir);
    std::fs::create_dir_all(&root).map_err(|e| Error::file(&root, e))?;
    let name = format!("step-{:08}", info.iter);
    let dir = AtomicDir::new(&root.join(&name))?;
    let weights: Vec<(String, Tensor)> = params.iter().map(|(n, v)| (n.to_string(), v.as_tensor().clone())).collect();
    write_safetensors(&dir.path("model.safetensors"), &weights, SaveDType::F32)?;
    let mut moments = Vec::new();
    for (n, m, v) in moments_in {
        moments.push((format!("m.{n}"), m.clone()));
        moments.push((format!("v.{n}"), v.clone()));
    }
    write_safetensors(&dir.path("optimizer.safetensors"), &moments, SaveDType::F32)?;
    dir.write_json("state.json", &serde_json::to_value(info).expect("serializes"))?;
    dir.commit()?;
    write_atomic(&root.join("latest"), name.as_bytes())?;
    // Prune older states.
    let mut states: Vec<String> = std::fs::read_dir(&root)
        .map_err(|e| Error::file(&root, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("step-") && !n.contains(".tmp"))
        .collect();
    states.sort();
    while states.len() > keep {
        let old = states.remove(0);
        if old != name {
            let _ = std::fs::remove_dir_all(root.join(old));
        }
    }
    Ok(())
}

/// The newest complete state of a run.
pub struct LoadedState {
    pub info: StateInfo,
    pub params: ParamStore,
    pub moments: Vec<(String, Tensor, Tensor)>,
}

pub fn load_latest(out_dir: &Path) -> Result<LoadedState> {
    let root = state_root(out_dir);
    let latest = root.join("latest");
    let name = std::fs::read_to_string(&latest)
        .map_err(|e| Error::file(&latest, format!("{e}: nothing to resume in {} (start over with --overwrite=true)", out_dir.display())))?;
    let mut dir = root.join(name.trim());
    if !dir.join("state.json").is_file() {
        // Killed while that state was being replaced: fall back to the newest complete one.
        let mut complete: Vec<PathBuf> = std::fs::read_dir(&root)
            .map_err(|e| Error::file(&root, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("step-")) && p.join("state.json").is_file())
            .collect();
        complete.sort();
        dir = complete.pop().ok_or_else(|| Error::file(&dir, format!("missing, and no other complete state in {}: start over with --overwrite=true", root.display())))?;
    }
    let info_path = dir.join("state.json");
    let info: StateInfo = serde_json::from_str(&std::fs::read_to_string(&info_path).map_err(|e| Error::file(&info_path, e))?)
        .map_err(|e| Error::file(&info_path, format!("invalid training state: {e}")))?;
    let params = ParamStore::from_tensors(read_tensors(&dir.join("model.safetensors"))?)?;
    let mut m = std::collections::BTreeMap::new();
    let mut v = std::collections::BTreeMap::new();
    for (n, t) in read_tensors(&dir.join("optimizer.safetensors"))? {
        if let Some(p) = n.strip_prefix("m.") {
            m.insert(p.to_string(), t);
        } else if let Some(p) = n.strip_prefix("v.") {
            v.insert(p.to_string(), t);
        }
    }
    let moments = m
        .into_iter()
        .map(|(n, mt)| {
            let vt = v.remove(&n).ok_or_else(|| Error::file(&dir, format!("optimizer state lacks v.{n}")))?;
            Ok((n, mt, vt))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LoadedState { info, params, moments })
}
