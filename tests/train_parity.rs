//! Training parity with PyTorch: 10 AdamW steps from identical weights and batches, Rust vs
//! torch.optim.AdamW with the same decay groups, through nanomoe's remote code. Needs the
//! Python environment of `./scripts/test` (NANOMOE_PYTHON, or ~/.cache/nanomoe/venv-v2).

mod common;
use common::python;

use std::path::PathBuf;
use std::process::Command;

use candle_core::{Device, Tensor};
use nanomoe::optim::{lr_at, AdamW, AdamWConfig};
use nanomoe::train_step::train_step;
use nanomoe::{GPTConfig, GPT};
use rand::{rngs::StdRng, Rng, SeedableRng};

type Micro = (Vec<Vec<i64>>, Vec<Vec<i64>>);

fn batches(steps: usize, accum: usize, b: usize, t: usize, vocab: usize, seed: u64) -> Vec<Vec<Micro>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..steps)
        .map(|_| {
            (0..accum)
                .map(|_| {
                    // Learnable rows: arithmetic progressions mod vocab with a random start and step.
                    let rows: Vec<Vec<i64>> = (0..b)
                        .map(|_| {
                            let (start, step) = (rng.random_range(0..vocab as i64), rng.random_range(1..4i64));
                            (0..=t as i64).map(|i| (start + i * step) % vocab as i64).collect()
                        })
                        .collect();
                    let x = rows.iter().map(|r| r[..t].to_vec()).collect();
                    let y = rows.iter().map(|r| r[1..].to_vec()).collect();
                    (x, y)
                })
                .collect()
        })
        .collect()
}

fn check(name: &str, cfg: GPTConfig, accum: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("init");
    let mut model = GPT::new_seeded(&cfg, 17, &Device::Cpu).unwrap();
    model.save_pretrained(&dir).unwrap();
    model.train();
    let steps = 10;
    let data = batches(steps, accum, 4, 16, cfg.vocab_size, 5);
    let lrs: Vec<f64> = (0..steps as u64).map(|it| lr_at(it, 3e-3, 3e-4, 3, 10, true)).collect();
    let opt_cfg = AdamWConfig { lr: lrs[0], beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 };
    let mut opt = AdamW::new(model.params(), opt_cfg).unwrap();
    let mut rust = Vec::new();
    for (step, micro) in data.iter().enumerate() {
        opt.set_lr(lrs[step]);
        let mb: Vec<(Tensor, Tensor)> = micro
            .iter()
            .map(|(x, y)| (Tensor::new(x.clone(), &Device::Cpu).unwrap(), Tensor::new(y.clone(), &Device::Cpu).unwrap()))
            .collect();
        rust.push(train_step(&model, &mut opt, &mb, 1.0).unwrap());
    }
    let run = serde_json::json!({"steps": data, "lrs": lrs, "weight_decay": 0.1, "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0});
    let run_path = tmp.path().join("run.json");
    std::fs::write(&run_path, run.to_string()).unwrap();
    let out_dir = tmp.path().join("py");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/python/train_steps.py");
    let out = Command::new(python()).arg(script).arg(&dir).arg(&run_path).arg(&out_dir).output().unwrap();
    assert!(out.status.success(), "python failed: {}", String::from_utf8_lossy(&out.stderr));
    let py: serde_json::Value = serde_json::from_slice(out.stdout.split(|&c| c == b'\n').rfind(|l| !l.is_empty()).unwrap()).unwrap();
    for (i, r) in rust.iter().enumerate() {
        for (key, ours) in [("loss", r.loss), ("ntp_loss", r.ntp_loss), ("aux_loss", r.aux_loss), ("router_z_loss", r.router_z_loss)] {
            let theirs = py[key][i].as_f64().unwrap();
            assert!((ours as f64 - theirs).abs() <= 1e-4, "{name} step {i} {key}: rust {ours} torch {theirs}");
        }
    }
    // Losses moved: the steps did something.
    assert!(rust.last().unwrap().ntp_loss < rust[0].ntp_loss - 0.1, "{name}: {rust:?}");
    // Final weights agree.
    let trained = GPT::from_pretrained(&out_dir).unwrap();
    for (pname, var) in model.params().iter() {
        let theirs = trained.params().get(pname).unwrap();
        let d = (var.as_tensor() - theirs).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d <= 1e-4, "{name} {pname}: max diff {d}");
    }
}

fn base() -> GPTConfig {
    GPTConfig { block_size: 32, vocab_size: 64, n_layer: 2, n_head: 2, n_embd: 32, ..Default::default() }
}

#[test]
fn dense_training_matches_pytorch() {
    check("dense", base(), 1);
}

#[test]
fn moe_training_with_aux_and_z_loss_matches_pytorch() {
    let cfg = GPTConfig { n_exp: 4, moe_top_k: 2, stride: 1, use_aux_loss: true, use_router_z_loss: true, bias: false, ..base() };
    check("moe", cfg, 2);
}

#[test]
fn moe_training_with_biases_and_exact_gelu_matches_pytorch() {
    // Expert biases (the bias kernel's grouped gradient), exact-erf GELU, top-1 routing.
    let cfg = GPTConfig {
        n_exp: 4,
        moe_top_k: 1,
        stride: 2,
        use_aux_loss: true,
        bias: true,
        activation_function: "gelu".into(),
        train_capacity: 2.0,
        ..base()
    };
    check("moe-bias-erf", cfg, 1);
}
