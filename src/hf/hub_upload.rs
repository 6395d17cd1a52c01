//! `push_to_hub`: uploads a model directory with the Hub's HTTP API - create the repo
//! (an existing one is fine), preupload (which files go through LFS), LFS batch upload
//! (basic or multipart) with verify, then one NDJSON commit with every file. A README model
//! card is generated when the directory has none.

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hub::{safe_relative, HubClient};

fn up_err(msg: impl Into<String>) -> Error {
    Error::Msg(msg.into())
}

#[derive(Debug, Clone)]
pub struct PushOptions {
    pub private: bool,
    pub revision: String,
    pub message: String,
}

impl Default for PushOptions {
    fn default() -> Self {
        PushOptions { private: false, revision: "main".into(), message: "Upload model with nanomoe".into() }
    }
}

struct LocalFile {
    path: String,
    data: Vec<u8>,
    sha256: String,
}

fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn collect(dir: &Path) -> Result<Vec<LocalFile>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let abs = dir.join(&rel);
        for e in fs::read_dir(&abs).map_err(|e| Error::file(&abs, e))? {
            let e = e.map_err(|e| Error::file(&abs, e))?;
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with('.') {
                continue; // hidden and temporary files
            }
            let r = rel.join(&name);
            let p = dir.join(&r);
            if p.is_dir() {
                stack.push(r);
            } else if p.is_file() {
                let data = fs::read(&p).map_err(|e| Error::file(&p, e))?;
                let path = r.to_string_lossy().replace('\\', "/");
                out.push(LocalFile { sha256: sha256_hex(&data), path, data });
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

/// A model card for a directory that has none.
pub fn model_card(dir: &Path, repo: &str) -> Result<String> {
    let (cfg, format) = crate::checkpoint::read_config(dir)?;
    let model = crate::gpt::GPT::from_pretrained(dir)?;
    // nanomoe_gpt directories need the remote code; MoE layers are what the name says.
    let remote = format == crate::checkpoint::Format::NanoMoe;
    let moe = cfg.is_moe();
    let mut s = String::new();
    s.push_str("---\nlibrary_name: transformers\ntags:\n- nanomoe\n");
    if moe {
        s.push_str("- mixture-of-experts\n");
    }
    if !remote {
        s.push_str("- gpt2\n");
    }
    s.push_str("---\n\n");
    s.push_str(&format!("# {repo}\n\n"));
    s.push_str(&format!(
        "A GPT-2-style language model{} made with nanomoe (Rust, HuggingFace-native).\n\n",
        if moe { " with Mixture-of-Experts layers" } else { "" }
    ));
    s.push_str("| | |\n|---|---|\n");
    s.push_str(&format!("| layers / heads / width | {} / {} / {} |\n", cfg.n_layer, cfg.n_head, cfg.n_embd));
    s.push_str(&format!(
        "| blocks | {}, {}{}{} |\n",
        if cfg.norm_type == crate::config::NormType::RmsNorm { "RMSNorm" } else { "LayerNorm" },
        cfg.activation_function,
        if cfg.qk_norm { ", QK-norm" } else { "" },
        if moe && cfg.swiglu_experts() { ", SwiGLU experts" } else { "" }
    ));
    s.push_str(&format!("| context (block_size) | {} |\n| vocabulary | {} |\n", cfg.block_size, cfg.vocab_size));
    if moe {
        s.push_str(&format!("| experts | {} per MoE layer, top-{}, every {} block(s) |\n", cfg.n_exp, cfg.moe_top_k, cfg.stride));
    }
    s.push_str(&format!("| parameters | {} total, {} active per token |\n", model.num_params(), model.num_active_params()));
    // Training data and loss, when the directory sits in a training run's out_dir.
    if let Some(run) = dir.parent() {
        if let Ok(text) = fs::read_to_string(run.join("state").join("latest")) {
            let info = run.join("state").join(text.trim()).join("state.json");
            if let Ok(v) = fs::read_to_string(&info).map(|t| serde_json::from_str::<Value>(&t).unwrap_or(Value::Null)) {
                if let Some(d) = v["settings"]["data_dir"].as_str() {
                    s.push_str(&format!("| training data | {d} |\n"));
                }
                if let Some(l) = v["best_val_loss"].as_f64() {
                    s.push_str(&format!("| best val loss | {l:.4} after {} steps |\n", v["iter"]));
                }
            }
        }
    }
    s.push_str("\n## Use in Python\n\n```python\nfrom transformers import AutoModelForCausalLM\n");
    if remote {
        s.push_str(&format!("model = AutoModelForCausalLM.from_pretrained(\"{repo}\", trust_remote_code=True)\n"));
    } else {
        s.push_str(&format!("model = AutoModelForCausalLM.from_pretrained(\"{repo}\")\n"));
    }
    s.push_str("```\n\n## Use with nanomoe\n\n```sh\n");
    s.push_str(&format!("nanomoe info {repo}\nnanomoe sample {repo} --prompt \"Hello\"\n```\n"));
    Ok(s)
}

impl HubClient {
    fn post_json(&self, url: &str, body: &Value, content_type: &str) -> Result<ureq::http::Response<ureq::Body>> {
        self.send("POST", url, content_type, body.to_string().into_bytes())
    }

    /// Sends a body; the token only goes to the endpoint.
    fn send(&self, method: &str, url: &str, content_type: &str, body: Vec<u8>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = ureq::http::Request::builder().method(method).uri(url).header("Content-Type", content_type);
        if let Some(t) = self.token() {
            if url.starts_with(&format!("{}/", self.endpoint)) {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
        }
        let req = req.body(body).map_err(|e| up_err(format!("invalid request URL {url}: {e}")))?;
        self.upload_agent().run(req).map_err(|e| up_err(format!("network unreachable: cannot reach {} ({e})", crate::hub::host_of(url))))
    }

    fn check(&self, resp: &mut ureq::http::Response<ureq::Body>, what: &str, repo: &str) -> Result<Value> {
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().unwrap_or_default();
        if !(200..300).contains(&status) {
            let hint = match status {
                401 => ": unauthorized - set HF_TOKEN to a token with write access",
                403 => ": forbidden - the token has no write access to this repo",
                404 => ": not found",
                _ => "",
            };
            return Err(up_err(format!("{what} for {repo} failed: HTTP {status}{hint}")));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Uploads every file of `dir` to `repo` in one commit; returns the commit id.
    pub fn push_folder(&self, dir: &Path, repo: &str, opts: &PushOptions) -> Result<String> {
        if self.offline {
            return Err(up_err("HF_HUB_OFFLINE is set: cannot push to the Hub"));
        }
        if !crate::hf_cache::is_repo_id(repo) || !repo.contains('/') {
            return Err(Error::Input(format!("{repo:?} is not a valid repo id (owner/name)")));
        }
        if self.token().is_none() {
            return Err(up_err("pushing needs a token: set HF_TOKEN (or log in so that $HF_HOME/token exists)"));
        }
        if !dir.join("config.json").is_file() {
            return Err(Error::file(dir, "is not a model directory (no config.json)"));
        }
        let mut files = collect(dir)?;
        if !files.iter().any(|f| f.path == "README.md") {
            let card = model_card(dir, repo)?.into_bytes();
            files.push(LocalFile { path: "README.md".into(), sha256: sha256_hex(&card), data: card });
        }
        for f in &files {
            if !safe_relative(&f.path) {
                return Err(up_err(format!("file name {:?} cannot be uploaded", f.path)));
            }
        }
        let (owner, name) = repo.split_once('/').expect("checked");
        let ep = &self.endpoint;

        // 1. create the repo (409: it exists)
        let mut r = self.post_json(&format!("{ep}/api/repos/create"), &json!({"name": name, "organization": owner, "private": opts.private, "type": "model"}), "application/json")?;
        if r.status().as_u16() != 409 {
            self.check(&mut r, "creating the repo", repo)?;
        }

        // 2. preupload: which files are LFS
        let rev = crate::hub::urlencode(&opts.revision);
        let listing: Vec<Value> = files
            .iter()
            .map(|f| {
                let sample = base64::engine::general_purpose::STANDARD.encode(&f.data[..f.data.len().min(512)]);
                json!({"path": f.path, "size": f.data.len(), "sample": sample})
            })
            .collect();
        let mut r = self.post_json(&format!("{ep}/api/models/{repo}/preupload/{rev}"), &json!({"files": listing}), "application/json")?;
        let pre = self.check(&mut r, "preupload", repo)?;
        let lfs: std::collections::HashSet<String> = pre["files"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|f| f["uploadMode"] == "lfs")
            .filter_map(|f| f["path"].as_str().map(String::from))
            .collect();

        // 3. LFS batch, uploads, verify
        let lfs_files: Vec<&LocalFile> = files.iter().filter(|f| lfs.contains(&f.path)).collect();
        if !lfs_files.is_empty() {
            let objects: Vec<Value> = lfs_files.iter().map(|f| json!({"oid": f.sha256, "size": f.data.len()})).collect();
            let body = json!({"operation": "upload", "transfers": ["basic", "multipart"], "objects": objects, "hash_algo": "sha256", "ref": {"name": opts.revision}});
            let mut r = self.send("POST", &format!("{ep}/{repo}.git/info/lfs/objects/batch"), "application/vnd.git-lfs+json", body.to_string().into_bytes())?;
            let batch = self.check(&mut r, "LFS batch", repo)?;
            for obj in batch["objects"].as_array().into_iter().flatten() {
                let oid = obj["oid"].as_str().unwrap_or("");
                let f = lfs_files.iter().find(|f| f.sha256 == oid).ok_or_else(|| up_err(format!("LFS batch answered for unknown object {oid}")))?;
                if let Some(err) = obj.get("error") {
                    return Err(up_err(format!("LFS upload of {} refused: {}", f.path, err)));
                }
                let Some(upload) = obj["actions"].get("upload") else { continue }; // already stored
                self.lfs_upload(upload, f, repo)?;
                if let Some(verify) = obj["actions"].get("verify") {
                    let href = verify["href"].as_str().unwrap_or("");
                    let mut r = self.send("POST", href, "application/vnd.git-lfs+json", json!({"oid": f.sha256, "size": f.data.len()}).to_string().into_bytes())?;
                    self.check(&mut r, &format!("verifying {}", f.path), repo)?;
                }
            }
        }

        // 4. one NDJSON commit with every file
        let mut nd = String::new();
        nd.push_str(&json!({"key": "header", "value": {"summary": opts.message, "description": ""}}).to_string());
        nd.push('\n');
        for f in &files {
            let line = if lfs.contains(&f.path) {
                json!({"key": "lfsFile", "value": {"path": f.path, "algo": "sha256", "oid": f.sha256, "size": f.data.len()}})
            } else {
                json!({"key": "file", "value": {"path": f.path, "encoding": "base64", "content": base64::engine::general_purpose::STANDARD.encode(&f.data)}})
            };
            nd.push_str(&line.to_string());
            nd.push('\n');
        }
        let mut r = self.send("POST", &format!("{ep}/api/models/{repo}/commit/{rev}"), "application/x-ndjson", nd.into_bytes())?;
        let done = self.check(&mut r, "the commit", repo)?;
        Ok(done["commitOid"].as_str().unwrap_or_default().to_string())
    }

    fn lfs_upload(&self, upload: &Value, f: &LocalFile, repo: &str) -> Result<()> {
        let href = upload["href"].as_str().ok_or_else(|| up_err(format!("LFS upload of {} has no href", f.path)))?;
        let header = &upload["header"];
        match header.get("chunk_size").and_then(|c| c.as_str().and_then(|s| s.parse::<usize>().ok()).or(c.as_u64().map(|x| x as usize))) {
            None => {
                let mut r = self.send("PUT", href, "application/octet-stream", f.data.clone())?;
                self.check(&mut r, &format!("uploading {}", f.path), repo)?;
            }
            Some(chunk) if chunk > 0 => {
                let mut parts = Vec::new();
                for (i, piece) in f.data.chunks(chunk).enumerate() {
                    let key = format!("{:05}", i + 1);
                    let url = header[&key].as_str().ok_or_else(|| up_err(format!("multipart upload of {} lacks the URL of part {}", f.path, i + 1)))?;
                    let mut r = self.send("PUT", url, "application/octet-stream", piece.to_vec())?;
                    let etag = r.headers().get("etag").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    self.check(&mut r, &format!("uploading part {} of {}", i + 1, f.path), repo)?;
                    parts.push(json!({"partNumber": i + 1, "etag": etag}));
                }
                let mut r = self.post_json(href, &json!({"oid": f.sha256, "parts": parts}), "application/vnd.git-lfs+json")?;
                self.check(&mut r, &format!("completing the upload of {}", f.path), repo)?;
            }
            Some(_) => return Err(up_err(format!("multipart upload of {} has chunk size 0", f.path))),
        }
        Ok(())
    }
}

impl crate::gpt::GPT {
    /// Saves the model into a temporary directory and pushes it to `repo` (owner/name).
    pub fn push_to_hub(&self, repo: &str) -> Result<String> {
        self.push_to_hub_with(repo, &PushOptions::default())
    }

    pub fn push_to_hub_with(&self, repo: &str, opts: &PushOptions) -> Result<String> {
        let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let tmp = std::env::temp_dir().join(format!("nanomoe-push-{}-{stamp}", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        self.save_pretrained(&tmp)?;
        let res = HubClient::from_env().push_folder(&tmp, repo, opts);
        let _ = fs::remove_dir_all(&tmp);
        res
    }
}
