//! Loading models by repo id from the HuggingFace Hub, into the cache Python's
//! huggingface_hub uses (`models--owner--name/{blobs,refs,snapshots}`: blobs named by etag,
//! snapshot entries as relative symlinks), so that either side reuses what the other
//! downloaded.
//!
//! - A revision whose snapshot is complete in the cache is used without any request.
//! - `HF_HUB_OFFLINE=1`: no request at all; a cache miss names the missing file.
//! - `HF_ENDPOINT` (default https://huggingface.co), `HF_TOKEN` (else `$HF_HOME/token`). The
//!   token is sent only to the endpoint, never to the file store the Hub redirects to, and
//!   never appears in an error message.
//! - Downloads resume from `blobs/<etag>.incomplete`; LFS files are checked against the
//!   sha256 the Hub names as their etag, other files against their git blob id (the etag the
//!   Hub sends for them); nothing incomplete ever lands in a snapshot.
//! - A server that stops answering is given up on after `HF_HUB_DOWNLOAD_TIMEOUT` seconds
//!   without a byte (default 10, as huggingface_hub), however long the whole download takes;
//!   connecting has `HF_HUB_ETAG_TIMEOUT` seconds (default 10).

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::hf_cache::{hf_home, hub_cache_dir, is_repo_id, repo_folder_name};

pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

fn hub_err(msg: impl Into<String>) -> Error {
    Error::Msg(msg.into())
}

/// Files a model directory may need.
pub fn wanted(file: &str) -> bool {
    const EXACT: &[&str] = &[
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ];
    EXACT.contains(&file) || (file.starts_with("model-") && file.ends_with(".safetensors")) || (!file.contains('/') && file.ends_with(".py"))
}

/// A relative path from the server that stays inside the snapshot.
pub fn safe_relative(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && name.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
}

pub struct HubClient {
    pub endpoint: String,
    token: Option<String>,
    pub offline: bool,
    pub cache: PathBuf,
    agent: ureq::Agent,
    upload_agent: ureq::Agent,
}

/// Seconds from an environment variable (a positive number), else `default`.
fn env_seconds(name: &str, default: f64) -> Duration {
    let v = std::env::var(name).ok().and_then(|v| v.trim().parse::<f64>().ok()).filter(|v| *v > 0.0 && v.is_finite());
    Duration::from_secs_f64(v.unwrap_or(default).min(86_400.0))
}

/// An HTTP agent with the Hub's timeouts: connecting within HF_HUB_ETAG_TIMEOUT, and no
/// read (headers or body) waiting longer than HF_HUB_DOWNLOAD_TIMEOUT for a byte - an idle
/// timeout, so a large download is never cut off while data flows. No total limit.
pub(crate) fn agent(max_redirects: u32) -> ureq::Agent {
    agent_with_idle(max_redirects, env_seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0))
}

/// [`agent`] with another idle limit: uploads wait up to 5 minutes for the Hub to answer a
/// request whose body it has just received (an LFS upload or a commit it processes first).
fn agent_with_idle(max_redirects: u32, idle: Duration) -> ureq::Agent {
    ureq::Agent::config_builder()
        .max_redirects(max_redirects)
        .http_status_as_error(false)
        .timeout_connect(Some(env_seconds("HF_HUB_ETAG_TIMEOUT", 10.0)))
        .timeout_per_read(Some(idle))
        .timeout_per_write(Some(env_seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0).max(Duration::from_secs(60))))
        .user_agent(concat!("nanomoe/", env!("CARGO_PKG_VERSION")))
        .build()
        .into()
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")).unwrap_or(false)
}

impl HubClient {
    /// Configured from HF_ENDPOINT, HF_TOKEN / $HF_HOME/token, HF_HUB_OFFLINE, HF_HUB_CACHE.
    pub fn from_env() -> Self {
        let token = std::env::var("HF_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| fs::read_to_string(hf_home().join("token")).ok())
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty());
        let endpoint = std::env::var("HF_ENDPOINT").ok().filter(|e| !e.is_empty()).unwrap_or_else(|| DEFAULT_ENDPOINT.into());
        Self::new(endpoint.trim_end_matches('/').to_string(), token, env_flag("HF_HUB_OFFLINE"), hub_cache_dir())
    }

    pub fn new(endpoint: String, token: Option<String>, offline: bool, cache: PathBuf) -> Self {
        let agent = agent(0);
        let upload_agent = agent_with_idle(0, env_seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0).max(Duration::from_secs(300)));
        HubClient { endpoint, token, offline, cache, agent, upload_agent }
    }

    pub(crate) fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The agent for uploads (see [`agent_with_idle`]).
    pub(crate) fn upload_agent(&self) -> &ureq::Agent {
        &self.upload_agent
    }

    fn repo_dir(&self, repo: &str) -> PathBuf {
        self.cache.join(repo_folder_name(repo))
    }

    /// GET (or HEAD) `url`, with the token only when `url` is on the endpoint.
    fn request(&self, method: &str, url: &str, range_from: Option<u64>) -> Result<ureq::http::Response<ureq::Body>> {
        let mut req = ureq::http::Request::builder().method(method).uri(url);
        if let Some(t) = &self.token {
            if url.starts_with(&format!("{}/", self.endpoint)) {
                req = req.header("Authorization", format!("Bearer {t}"));
            }
        }
        if let Some(from) = range_from {
            req = req.header("Range", format!("bytes={from}-"));
        }
        let req = req.body(()).map_err(|e| hub_err(format!("invalid request URL {url}: {e}")))?;
        self.agent.run(req).map_err(|e| match e {
            ureq::Error::Timeout(_) => hub_err(format!("{} did not answer within {} s (HF_HUB_DOWNLOAD_TIMEOUT)", host_of(url), env_seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0).as_secs_f64())),
            e => hub_err(format!("network unreachable: cannot reach {} ({e})", host_of(url))),
        })
    }

    /// Error for a non-success Hub response.
    fn status_error(&self, resp: &ureq::http::Response<ureq::Body>, repo: &str, revision: &str, file: Option<&str>) -> Error {
        let code = resp.headers().get("x-error-code").and_then(|v| v.to_str().ok()).unwrap_or("");
        let status = resp.status().as_u16();
        let what = match (status, code) {
            (_, "RepoNotFound") => format!("repo {repo} not found on {} (if it is private or gated, set HF_TOKEN)", self.endpoint),
            (_, "RevisionNotFound") => format!("revision {revision:?} not found in repo {repo}"),
            (_, "EntryNotFound") => format!("file {} not found in {repo} at {revision}", file.unwrap_or("?")),
            (_, "GatedRepo") | (403, _) => format!("access to {repo} is restricted (gated or private): accept its terms or use a token with access"),
            (401, _) => format!("unauthorized for {repo} (401): the repo is private or gated, or HF_TOKEN is invalid"),
            (404, _) => match file {
                Some(f) => format!("file {f} not found in {repo} at {revision}"),
                None => format!("repo {repo} or revision {revision:?} not found on {}", self.endpoint),
            },
            _ => format!("the Hub answered {status} for {repo}"),
        };
        hub_err(what)
    }

    /// Commit sha and file list of `repo` at `revision`.
    pub fn repo_info(&self, repo: &str, revision: &str) -> Result<(String, Vec<String>)> {
        let url = format!("{}/api/models/{repo}/revision/{}", self.endpoint, urlencode(revision));
        let mut resp = self.request("GET", &url, None)?;
        if !resp.status().is_success() {
            return Err(self.status_error(&resp, repo, revision, None));
        }
        let v: Value = serde_json::from_str(
            &resp.body_mut().read_to_string().map_err(|e| hub_err(format!("truncated or invalid answer from the Hub for {repo}: {e}")))?,
        )
        .map_err(|e| hub_err(format!("invalid JSON from the Hub for {repo}: {e}")))?;
        let sha = v["sha"].as_str().filter(|s| s.len() >= 7 && s.chars().all(|c| c.is_ascii_hexdigit())).ok_or_else(|| hub_err(format!("the Hub's answer for {repo} has no valid commit sha")))?;
        let mut files = Vec::new();
        for s in v["siblings"].as_array().into_iter().flatten() {
            if let Some(f) = s["rfilename"].as_str() {
                if !safe_relative(f) {
                    return Err(hub_err(format!("refusing file name {f:?} from the Hub: it would escape the cache")));
                }
                files.push(f.to_string());
            }
        }
        Ok((sha.to_string(), files))
    }

    /// The cached snapshot of `repo` at `revision` if it holds a loadable model.
    pub fn cached_model(&self, repo: &str, revision: &str) -> Option<PathBuf> {
        let dir = self.repo_dir(repo);
        let sha = fs::read_to_string(dir.join("refs").join(revision)).map(|s| s.trim().to_string()).unwrap_or_else(|_| revision.to_string());
        if !safe_relative(&sha) || sha.contains('/') {
            return None;
        }
        let snap = dir.join("snapshots").join(&sha);
        let complete = snap.join("config.json").is_file() && crate::checkpoint::weight_files(&snap).map(|fs| fs.iter().all(|f| f.is_file())).unwrap_or(false);
        complete.then_some(snap)
    }

    /// Names what is missing from the cache for a model at `revision`.
    fn offline_miss(&self, repo: &str, revision: &str) -> String {
        let dir = self.repo_dir(repo);
        let sha = fs::read_to_string(dir.join("refs").join(revision)).map(|s| s.trim().to_string()).ok();
        let snap = dir.join("snapshots").join(sha.as_deref().unwrap_or(revision));
        let missing = if !snap.is_dir() {
            None
        } else if !snap.join("config.json").is_file() {
            Some("config.json".to_string())
        } else {
            match crate::checkpoint::weight_files(&snap) {
                Ok(files) => files.iter().find(|f| !f.is_file()).map(|f| f.file_name().unwrap_or_default().to_string_lossy().to_string()),
                Err(_) => Some(crate::checkpoint::WEIGHTS_FILE.to_string()),
            }
        };
        match missing {
            Some(f) => format!("HF_HUB_OFFLINE is set and {f} of {repo} at {revision} is not in the cache ({})", snap.display()),
            None => format!("HF_HUB_OFFLINE is set and the snapshot of {repo} at {revision} is not in the cache ({})", dir.display()),
        }
    }

    /// Downloads what a model directory needs (or finds it in the cache); returns the
    /// snapshot directory.
    pub fn download_model(&self, repo: &str, revision: &str) -> Result<PathBuf> {
        if !is_repo_id(repo) {
            return Err(Error::Input(format!("{repo:?} is not a valid repo id (owner/name)")));
        }
        if !safe_relative(revision) {
            return Err(Error::Input(format!("invalid revision {revision:?}")));
        }
        if let Some(snap) = self.cached_model(repo, revision) {
            return Ok(snap);
        }
        if self.offline {
            return Err(hub_err(self.offline_miss(repo, revision)));
        }
        let (sha, files) = self.repo_info(repo, revision)?;
        let files: Vec<String> = files.into_iter().filter(|f| wanted(f)).collect();
        if !files.iter().any(|f| f == "config.json") {
            return Err(hub_err(format!("repo {repo} has no config.json: not a model repo")));
        }
        let snap = self.repo_dir(repo).join("snapshots").join(&sha);
        for f in &files {
            self.download_file(repo, &sha, f, &snap)?;
        }
        if revision != sha {
            let refs = self.repo_dir(repo).join("refs");
            let target = refs.join(revision);
            if let Some(parent) = target.parent() {
                fs::create_dir_all(parent).map_err(|e| Error::file(parent, e))?;
            }
            crate::tokenizer::write_atomic(&target, sha.as_bytes())?;
        }
        Ok(snap)
    }

    /// Downloads one file into blobs/<etag> and links it from the snapshot.
    fn download_file(&self, repo: &str, sha: &str, file: &str, snap: &Path) -> Result<()> {
        let link = snap.join(file);
        if link.exists() {
            return Ok(());
        }
        let blobs = self.repo_dir(repo).join("blobs");
        fs::create_dir_all(&blobs).map_err(|e| Error::file(&blobs, e))?;
        let url = format!("{}/{repo}/resolve/{sha}/{}", self.endpoint, file.split('/').map(urlencode).collect::<Vec<_>>().join("/"));
        // The Hub's answer names the blob (etag; X-Linked-Etag = sha256 for LFS files) and may
        // redirect to a file store.
        let head = self.request("HEAD", &url, None)?;
        if !(head.status().is_success() || head.status().is_redirection()) {
            return Err(self.status_error(&head, repo, sha, Some(file)));
        }
        let header = |k: &str| head.headers().get(k).and_then(|v| v.to_str().ok()).map(|s| s.trim_start_matches("W/").trim_matches('"').to_string());
        let etag = header("x-linked-etag").or_else(|| header("etag")).ok_or_else(|| hub_err(format!("the Hub sent no etag for {file} of {repo}")))?;
        if !safe_relative(&etag) || etag.contains('/') {
            return Err(hub_err(format!("refusing etag {etag:?} for {file}: not a plain name")));
        }
        let size: Option<u64> = header("x-linked-size").or_else(|| header("content-length")).and_then(|s| s.parse().ok());
        let blob = blobs.join(&etag);
        if !blob.is_file() {
            let partial = blobs.join(format!("{etag}.incomplete"));
            self.fetch(&url, &partial, size, file)?;
            // LFS files are named by their sha256, others by their git blob id (sha1 of
            // "blob <len>\0" + content): either way a truncated or altered file is caught,
            // with or without a Content-Length.
            let hex = etag.chars().all(|c| c.is_ascii_hexdigit());
            let check = match etag.len() {
                64 if hex => Some(("sha256", sha256_file(&partial)?)),
                40 if hex => Some(("git blob id", git_blob_id(&partial)?)),
                _ => None,
            };
            if let Some((kind, got)) = check {
                if got != etag.to_ascii_lowercase() {
                    let _ = fs::remove_file(&partial);
                    return Err(hub_err(format!("{kind} of {file} is {got}, but the Hub says {etag}: download corrupted or truncated, removed")));
                }
            }
            fs::rename(&partial, &blob).map_err(|e| Error::file(&blob, e))?;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(|e| Error::file(parent, e))?;
        }
        let depth = file.matches('/').count() + 2;
        let target = format!("{}blobs/{etag}", "../".repeat(depth));
        let tmp = link.with_file_name(format!(".{}.tmp-{}", link.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), std::process::id()));
        let _ = fs::remove_file(&tmp);
        std::os::unix::fs::symlink(&target, &tmp).map_err(|e| Error::file(&tmp, e))?;
        fs::rename(&tmp, &link).map_err(|e| Error::file(&link, e))
    }

    /// GETs `url` (following redirects, the token only on the endpoint) into `partial`,
    /// resuming what is already there.
    fn fetch(&self, url: &str, partial: &Path, size: Option<u64>, file: &str) -> Result<()> {
        let have = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if size.is_some_and(|s| have > s) {
            let _ = fs::remove_file(partial);
            return self.fetch(url, partial, size, file);
        }
        let mut url = url.to_string();
        let mut resp = None;
        for _ in 0..8 {
            let r = self.request("GET", &url, (have > 0).then_some(have))?;
            if r.status().is_redirection() {
                let loc = r.headers().get("location").and_then(|v| v.to_str().ok()).ok_or_else(|| hub_err(format!("redirect without location for {file}")))?;
                url = resolve_location(&url, loc);
                continue;
            }
            resp = Some(r);
            break;
        }
        let mut resp = resp.ok_or_else(|| hub_err(format!("too many redirects downloading {file}")))?;
        let status = resp.status().as_u16();
        let resumed = status == 206;
        if !(status == 200 || resumed) {
            return Err(hub_err(format!("downloading {file} failed: HTTP {status}")));
        }
        let mut out = if resumed {
            OpenOptions::new().append(true).open(partial).map_err(|e| Error::file(partial, e))?
        } else {
            File::create(partial).map_err(|e| Error::file(partial, e))?
        };
        let mut reader = resp.body_mut().as_reader();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.to_string().contains("timeout") || e.kind() == std::io::ErrorKind::TimedOut => {
                    return Err(hub_err(format!(
                        "download of {file} is truncated: no data for {} s (HF_HUB_DOWNLOAD_TIMEOUT); run again to resume",
                        env_seconds("HF_HUB_DOWNLOAD_TIMEOUT", 10.0).as_secs_f64()
                    )))
                }
                Err(e) => return Err(hub_err(format!("download of {file} is truncated: the connection broke off ({e}); run again to resume"))),
            };
            out.write_all(&buf[..n]).map_err(|e| Error::file(partial, e))?;
        }
        out.sync_all().map_err(|e| Error::file(partial, e))?;
        let got = fs::metadata(partial).map(|m| m.len()).unwrap_or(0);
        if let Some(s) = size {
            if got != s {
                return Err(hub_err(format!("download of {file} is truncated: {got} of {s} bytes; run again to resume")));
            }
        }
        Ok(())
    }
}

/// Downloads `url` (following redirects) into `dest` through a temporary file.
pub fn download_url(url: &str, dest: &Path) -> Result<()> {
    let agent = agent(8);
    let mut resp = agent.get(url).call().map_err(|e| hub_err(format!("network unreachable: cannot reach {} ({e})", origin(url))))?;
    if !resp.status().is_success() {
        return Err(hub_err(format!("downloading {url} failed: HTTP {}", resp.status().as_u16())));
    }
    let mut bytes = Vec::new();
    resp.body_mut()
        .as_reader()
        .read_to_end(&mut bytes)
        .map_err(|e| hub_err(format!("downloading {url} broke off: {e}")))?;
    crate::tokenizer::write_atomic(dest, &bytes)
}

/// scheme://host:port of a URL, for messages.
pub(crate) fn host_of(url: &str) -> String {
    origin(url)
}

/// The URL a redirect's Location names, resolved against `base`: absolute, protocol-relative
/// (`//host/path`), absolute-path (`/path`) or relative (`path`).
fn resolve_location(base: &str, loc: &str) -> String {
    if loc.starts_with("http://") || loc.starts_with("https://") {
        return loc.to_string();
    }
    if let Some(rest) = loc.strip_prefix("//") {
        let scheme = base.split("://").next().unwrap_or("https");
        return format!("{scheme}://{rest}");
    }
    if loc.starts_with('/') {
        return format!("{}{loc}", origin(base));
    }
    let path_end = base.find(['?', '#']).unwrap_or(base.len());
    let dir_end = base[..path_end].rfind('/').map(|i| i + 1).unwrap_or(path_end);
    format!("{}{loc}", &base[..dir_end.max(origin(base).len())])
}

fn origin(url: &str) -> String {
    let scheme_end = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[scheme_end..].find('/') {
        Some(i) => url[..scheme_end + i].to_string(),
        None => url.to_string(),
    }
}

pub(crate) fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// git's blob id of a file: sha1 of "blob <length>\0" followed by the content.
fn git_blob_id(path: &Path) -> Result<String> {
    let len = fs::metadata(path).map_err(|e| Error::file(path, e))?.len();
    hash_file::<sha1::Sha1>(path, format!("blob {len}\0").as_bytes())
}

fn sha256_file(path: &Path) -> Result<String> {
    hash_file::<Sha256>(path, b"")
}

/// The hex digest of `prefix` followed by a file's content, read in 1 MiB pieces.
fn hash_file<D: Digest>(path: &Path, prefix: &[u8]) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::file(path, e))?;
    let mut h = D::new();
    h.update(prefix);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::file(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_that_escape_are_refused() {
        for bad in ["../x", "a/../../b", "/etc/passwd", "a\\b", "", "a//b", "./a"] {
            assert!(!safe_relative(bad), "{bad}");
        }
        assert!(safe_relative("model-00001-of-00002.safetensors"));
        assert!(safe_relative("sub/dir/file.json"));
        assert_eq!(origin("http://127.0.0.1:8080/a/b?c"), "http://127.0.0.1:8080");
        assert_eq!(urlencode("refs/pr/1"), "refs%2Fpr%2F1");
        let base = "https://hub.example/o/n/resolve/main/a/b.json?x=1";
        assert_eq!(resolve_location(base, "//cdn.example/f/1"), "https://cdn.example/f/1");
        assert_eq!(resolve_location("http://127.0.0.1:5/a/b", "//127.0.0.1:6/lfs/x"), "http://127.0.0.1:6/lfs/x");
        assert_eq!(resolve_location(base, "/api/x"), "https://hub.example/api/x");
        assert_eq!(resolve_location(base, "c.json"), "https://hub.example/o/n/resolve/main/a/c.json");
        assert_eq!(resolve_location(base, "http://other/y"), "http://other/y");
    }
}
