//! The library's push_to_hub and from_pretrained by repo id, against the stand-in Hub of
//! tests/python (started as a subprocess; needs the Python environment of ./scripts/test).

mod common;
use common::python;

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use candle_core::{Device, Tensor};
use nanomoe::{AutoModelForCausalLM, GPTConfig, GPT};

#[test]
fn push_to_hub_then_load_by_repo_id() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python");
    let mut server = Command::new(python())
        .current_dir(&dir)
        .args(["-c", "import sys; from hub_standin import Hub, TOKEN; h = Hub(); print(h.endpoint, TOKEN, flush=True); sys.stdin.read(); print(len(h.store_auth_seen), flush=True)"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let mut parts = line.split_whitespace();
    let (endpoint, token) = (parts.next().unwrap().to_string(), parts.next().unwrap().to_string());
    let tmp = tempfile::tempdir().unwrap();
    std::env::set_var("HF_ENDPOINT", &endpoint);
    std::env::set_var("HF_TOKEN", &token);
    std::env::set_var("HF_HUB_CACHE", tmp.path().join("cache"));
    std::env::set_var("HF_HOME", tmp.path().join("home"));
    std::env::remove_var("HF_HUB_OFFLINE");

    let cfg = GPTConfig { block_size: 16, vocab_size: 40, n_layer: 2, n_head: 2, n_embd: 16, n_exp: 4, stride: 2, ..Default::default() };
    let model = GPT::new_seeded(&cfg, 9, &Device::Cpu).unwrap();
    let commit = model.push_to_hub("rust/api-model").unwrap();
    assert_eq!(commit.len(), 40);
    let back = AutoModelForCausalLM::from_pretrained("rust/api-model").unwrap();
    let x = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
    let d = (model.forward(&x, None).unwrap().logits - back.forward(&x, None).unwrap().logits).unwrap();
    assert_eq!(d.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);
    // The same commit at a revision sha.
    assert!(AutoModelForCausalLM::from_pretrained_revision("rust/api-model", &commit).is_ok());
    let e = AutoModelForCausalLM::from_pretrained_revision("rust/api-model", "nope").err().unwrap().to_string();
    assert_eq!(e, "revision \"nope\" not found in repo rust/api-model");

    server.stdin.take().unwrap().write_all(b"done").unwrap();
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "0", "the token reached the file store");
    server.wait().unwrap();
}
