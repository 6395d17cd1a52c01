//! Kernel parity with PyTorch: every fused CPU kernel's output and input gradients against
//! the torch ops it replaces (tests/python/kernel_ref.py, computed in float64), on random
//! inputs whose sizes leave remainders after the kernels' vector widths, chunks and blocks.
//! (The composite-candle parity tests live next to each kernel in `nn.rs`; the training
//! parity tests run all of them together.) Needs the Python environment of `./scripts/test`.

mod common;
use common::python;

use std::collections::HashMap;
use std::process::Command;

use candle_core::{DType, Device, Tensor, Var};
use nanomoe::config::Activation;
use nanomoe::kernels::attention::{causal_attention, CausalMask};
use nanomoe::kernels::{bias, cross_entropy, expert_matmul, gelu, layer_norm, linear, linear_cross_entropy, matvec, rms_norm, swiglu, swiglu_experts};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

struct Case {
    spec: serde_json::Value,
    /// Float inputs (gradients compared) and integer ones (targets).
    vars: Vec<(&'static str, Var)>,
    ints: Vec<(&'static str, Tensor)>,
    y: Tensor,
}

fn rand_var(rng: &mut StdRng, dims: &[usize], scale: f32) -> Var {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n).map(|_| rng.random_range(-scale..scale)).collect();
    Var::from_tensor(&Tensor::from_vec(v, dims, &Device::Cpu).unwrap()).unwrap()
}

fn targets(rng: &mut StdRng, n: usize, vocab: usize) -> (Vec<Option<u32>>, Tensor) {
    let t: Vec<Option<u32>> = (0..n).map(|i| if i % 5 == 3 { None } else { Some(rng.random_range(0..vocab as u32)) }).collect();
    let as_i64: Vec<i64> = t.iter().map(|v| v.map(i64::from).unwrap_or(-1)).collect();
    (t, Tensor::from_vec(as_i64, n, &Device::Cpu).unwrap())
}

/// Filled rows of each expert of the "experts_filled" case (of 9).
const FILLED: [usize; 4] = [9, 4, 0, 6];

fn cases() -> Vec<Case> {
    let mut rng = StdRng::seed_from_u64(11);
    let mut out = Vec::new();
    let case = |name: &str, kind: &str, extra: serde_json::Value, vars: Vec<(&'static str, Var)>, ints: Vec<(&'static str, Tensor)>, y: Tensor| {
        let mut spec = json!({"name": name, "kind": kind});
        let inputs: Vec<&str> = vars.iter().map(|(n, _)| *n).chain(ints.iter().map(|(n, _)| *n)).collect();
        spec["inputs"] = json!(inputs);
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        Case { spec, vars, ints, y }
    };

    // LayerNorm: rows of 37 (remainder after 16 lanes), weight and bias.
    let (x, w, b) = (rand_var(&mut rng, &[13, 37], 2.0), rand_var(&mut rng, &[37], 1.5), rand_var(&mut rng, &[37], 0.5));
    let y = layer_norm::fused_layer_norm(&x, &w, Some(&b), 1e-5).unwrap();
    out.push(case("ln", "layer_norm", json!({"eps": 1e-5}), vec![("x", x), ("w", w), ("b", b)], vec![], y));

    // GELU, both forms, over more than one parallel chunk (8192) with a remainder.
    for (name, act) in [("gelu_tanh", Activation::GeluTanh), ("gelu_erf", Activation::GeluErf)] {
        let x = rand_var(&mut rng, &[20011], 5.0);
        let y = gelu::fused_gelu(&x, act).unwrap();
        out.push(case(name, name, json!({}), vec![("x", x)], vec![], y));
    }

    // The seed's kernels. RMSNorm with a weight (eps 1e-6), rows of 37.
    let (x, w) = (rand_var(&mut rng, &[13, 37], 2.0), rand_var(&mut rng, &[37], 1.5));
    let y = rms_norm::fused_rms_norm(&x, Some(&w), 1e-6).unwrap();
    out.push(case("rms", "rms_norm", json!({"eps": 1e-6}), vec![("x", x), ("w", w)], vec![], y));
    // QK-norm on a fused qkv [2, 5, 3 x 3 heads x 6]: torch's F.rms_norm with its default eps on
    // every head of q and k, v passed through.
    let qkv = rand_var(&mut rng, &[2, 5, 54], 2.0);
    let y = rms_norm::fused_qk_norm(&qkv, 6, nanomoe::nn::QK_NORM_EPS).unwrap();
    out.push(case("qkn", "qk_norm", json!({"n_head": 3}), vec![("qkv", qkv)], vec![], y));
    // ReLU^2 and SwiGLU over more than one parallel chunk (8192) with a remainder.
    let x = rand_var(&mut rng, &[20011], 5.0);
    let y = gelu::fused_gelu(&x, Activation::Relu2).unwrap();
    out.push(case("relu2", "relu2", json!({}), vec![("x", x)], vec![], y));
    let (g, u) = (rand_var(&mut rng, &[20011], 8.0), rand_var(&mut rng, &[20011], 2.0));
    let y = swiglu::fused_swiglu(&g, &u).unwrap();
    out.push(case("swiglu", "swiglu", json!({}), vec![("g", g), ("u", u)], vec![], y));

    // Causal attention, left padding in the second row, head size 4.
    let qkv = rand_var(&mut rng, &[2, 9, 36], 1.5);
    let y = causal_attention(&qkv, 3, CausalMask { past: 0, pad: Some(vec![0, 3]) }).unwrap();
    out.push(case("attn", "attention", json!({"n_head": 3, "pad": [0, 3]}), vec![("qkv", qkv)], vec![], y));

    // Cross-entropy with ignored targets (every fifth), vocabulary 67.
    let logits = rand_var(&mut rng, &[23, 67], 4.0);
    let (t, tt) = targets(&mut rng, 23, 67);
    let y = cross_entropy::cross_entropy(&logits, &t).unwrap().unwrap();
    out.push(case("ce", "cross_entropy", json!({}), vec![("logits", logits)], vec![("targets", tt)], y));

    // Output layer fused with the cross-entropy.
    let (h, w) = (rand_var(&mut rng, &[19, 24], 1.0), rand_var(&mut rng, &[53, 24], 1.0));
    let (t, tt) = targets(&mut rng, 19, 53);
    let y = linear_cross_entropy::linear_cross_entropy(&h, &w, &t).unwrap().unwrap();
    out.push(case("lce", "linear_cross_entropy", json!({}), vec![("h", h), ("w", w)], vec![("targets", tt)], y));

    // nn.Linear product with leading dimensions (more rows than the weight-streaming path).
    let (x, w) = (rand_var(&mut rng, &[2, 13, 33], 1.0), rand_var(&mut rng, &[41, 33], 1.0));
    let y = linear::linear(&x, &w).unwrap();
    out.push(case("linear", "linear", json!({}), vec![("x", x), ("w", w)], vec![], y));

    // The mixed-precision products (operands rounded to bf16, f32 sums), on the unit this CPU
    // has (AMX, AVX512-BF16 or emulated): the linear layer (sizes past one 32-wide tile in every dimension),
    // the output layer with the loss (its weight gradient runs transposed), the experts.
    let bf16 = nanomoe::kernels::Precision::Bf16;
    let (x, w) = (rand_var(&mut rng, &[3, 25, 70], 1.0), rand_var(&mut rng, &[41, 70], 1.0));
    let y = linear::linear_in(&x, &w, bf16).unwrap();
    out.push(case("linear_bf16", "linear", json!({"bf16": true}), vec![("x", x), ("w", w)], vec![], y));
    let (h, w) = (rand_var(&mut rng, &[45, 40], 1.0), rand_var(&mut rng, &[130, 40], 1.0));
    let (t, tt) = targets(&mut rng, 45, 130);
    let y = linear_cross_entropy::linear_cross_entropy_in(&h, &w, &t, bf16).unwrap().unwrap();
    out.push(case("lce_bf16", "linear_cross_entropy", json!({"bf16": true}), vec![("h", h), ("w", w)], vec![("targets", tt)], y));
    let (x, w) = (rand_var(&mut rng, &[3, 37, 33], 1.0), rand_var(&mut rng, &[3, 33, 20], 1.0));
    let y = expert_matmul::expert_matmul_in(&x, &w, None, bf16).unwrap();
    out.push(case("experts_bf16", "expert_matmul", json!({"bf16": true}), vec![("x", x), ("w", w)], vec![], y));

    // Expert biases: one row per expert.
    let (x, b) = (rand_var(&mut rng, &[3, 7, 10], 1.0), rand_var(&mut rng, &[3, 1, 10], 1.0));
    let y = bias::add_bias(&x, &b).unwrap();
    out.push(case("bias", "bias", json!({}), vec![("x", x), ("b", b)], vec![], y));

    // Expert matmul (its backward transposes w in 8 x 8 blocks: 12 x 9 leaves remainders).
    let (x, w) = (rand_var(&mut rng, &[5, 7, 12], 1.0), rand_var(&mut rng, &[5, 12, 9], 1.0));
    let y = expert_matmul::expert_matmul(&x, &w, None).unwrap();
    out.push(case("experts", "expert_matmul", json!({}), vec![("x", x), ("w", w)], vec![], y));
    // A capacity-padded batch: expert e's tokens in its first FILLED[e] rows, zeros after
    // (a full expert, a partial one, an empty one); the op reads only the filled rows, the
    // reference multiplies them all (the upstream gradient is zero on the empty slots, as
    // the combine step gives).
    let (e, m, k) = (4, 9, 12);
    let mut xv: Vec<f32> = (0..e * m * k).map(|_| rng.random_range(-1.0..1.0)).collect();
    for (i, &f) in FILLED.iter().enumerate() {
        xv[(i * m + f) * k..(i + 1) * m * k].fill(0.0);
    }
    let x = Var::from_vec(xv, (e, m, k), &Device::Cpu).unwrap();
    let w = rand_var(&mut rng, &[e, k, 10], 1.0);
    let y = nanomoe::nn::expert_matmul_filled(&x, &w, Some(&FILLED), None, nanomoe::kernels::Precision::F32).unwrap();
    out.push(case("experts_filled", "expert_matmul", json!({}), vec![("x", x), ("w", w)], vec![], y));
    // The gate-output loss's tap on a product: [bmm(x, w); bmm(scale_grad(x, 0.1), w)] from
    // one product (x gets 0.1 of the second half's gradient, w all of it).
    let (x, w) = (rand_var(&mut rng, &[3, 7, 12], 1.0), rand_var(&mut rng, &[3, 12, 9], 1.0));
    let g = expert_matmul::expert_matmul(&x, &w, None).unwrap();
    let tap = expert_matmul::gate_loss_tap(&g, &x, &w, 0.1, None, nanomoe::kernels::Precision::F32).unwrap();
    let y = Tensor::cat(&[&g, &tap], 0).unwrap();
    out.push(case("gate_tap", "gate_loss_tap", json!({}), vec![("x", x), ("w", w)], vec![], y));

    // The seed's SwiGLU experts as one op, with its gate-output loss: [h; loss] (x's rows 3
    // of expert 0 and 5..7 of expert 1 are padding, left out of the loss's mean; 12 x 10
    // weights leave remainders after the transpose's 8 x 8 blocks).
    let (e, m, c, i) = (3, 7, 12, 10);
    let mut xv: Vec<f32> = (0..e * m * c).map(|_| rng.random_range(-1.0..1.0)).collect();
    xv[3 * c..4 * c].fill(0.0);
    xv[(m + 5) * c..(m + 7) * c].fill(0.0);
    let x = Var::from_vec(xv, (e, m, c), &Device::Cpu).unwrap();
    let (wg, wu) = (rand_var(&mut rng, &[e, c, i], 1.0), rand_var(&mut rng, &[e, c, i], 1.0));
    let state = swiglu_experts::SwiGluState::new();
    let h = swiglu_experts::swiglu_experts(&x, &wg, &wu, None, &state, 0.1, nanomoe::kernels::Precision::F32).unwrap();
    let loss = swiglu_experts::gate_output_loss(&h, &state).unwrap();
    let y = Tensor::cat(&[h.flatten_all().unwrap(), loss.reshape(1).unwrap()], 0).unwrap();
    out.push(case("swiglu_experts", "swiglu_experts", json!({}), vec![("x", x), ("wg", wg), ("wu", wu)], vec![], y));

    // Weight streaming for a few rows, both layouts (6 rows: a group of 4 and two single).
    let (x, w) = (rand_var(&mut rng, &[6, 70], 1.0), rand_var(&mut rng, &[150, 70], 1.0));
    let y = matvec::linear_nk(&x, &w).unwrap();
    out.push(case("mv_nk", "linear_nk", json!({}), vec![("x", x), ("w", w)], vec![], y));
    let (x, w) = (rand_var(&mut rng, &[6, 70], 1.0), rand_var(&mut rng, &[70, 150], 1.0));
    let y = matvec::matmul_kn(&x, &w).unwrap();
    out.push(case("mv_kn", "matmul_kn", json!({}), vec![("x", x), ("w", w)], vec![], y));
    out
}

#[test]
fn every_fused_kernel_matches_pytorch_values_and_gradients() {
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(12);
    let cases = cases();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut ours: HashMap<String, Tensor> = HashMap::new();
    for c in &cases {
        let name = c.spec["name"].as_str().unwrap();
        // Upstream gradient; zero on padded attention rows (their outputs are unspecified).
        let gy = {
            let n = c.y.elem_count();
            let mut v: Vec<f32> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
            if name == "attn" {
                let (t, ch) = (9, 12);
                v[t * ch..(t + 3) * ch].fill(0.0); // row 1, positions 0..3
            }
            if name == "experts_filled" {
                for (i, &f) in FILLED.iter().enumerate() {
                    v[(i * 9 + f) * 10..(i + 1) * 9 * 10].fill(0.0);
                }
            }
            if name == "lce_bf16" {
                // A power of two: the reference scales the logits' gradient before rounding
                // it, the kernel after (alpha of the product).
                v[0] = 0.5;
            }
            Tensor::from_vec(v, c.y.shape(), &Device::Cpu).unwrap()
        };
        let grads = c.y.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
        ours.insert(format!("{name}.y"), c.y.clone());
        for (inp, var) in &c.vars {
            tensors.insert(format!("{name}.{inp}"), var.as_tensor().clone());
            let g = grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient for {inp}"));
            ours.insert(format!("{name}.d{inp}"), g.clone());
        }
        for (inp, t) in &c.ints {
            tensors.insert(format!("{name}.{inp}"), t.clone());
        }
        tensors.insert(format!("{name}.gy"), gy);
    }
    let specs: Vec<_> = cases.iter().map(|c| c.spec.clone()).collect();
    let (spec_path, in_path, out_path) = (tmp.path().join("cases.json"), tmp.path().join("in.safetensors"), tmp.path().join("ref.safetensors"));
    std::fs::write(&spec_path, serde_json::to_string(&specs).unwrap()).unwrap();
    candle_core::safetensors::save(&tensors, &in_path).unwrap();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/kernel_ref.py");
    let st = Command::new(python()).arg(&script).arg(&spec_path).arg(&in_path).arg(&out_path).status().unwrap();
    assert!(st.success(), "kernel_ref.py failed");
    let reference = candle_core::safetensors::load(&out_path, &Device::Cpu).unwrap();
    assert_eq!(reference.len(), ours.len(), "reference tensors: {:?}", reference.keys().collect::<Vec<_>>());
    let mut names: Vec<_> = ours.keys().cloned().collect();
    names.sort();
    for key in names {
        let a = ours[&key].to_dtype(DType::F32).unwrap();
        let mut b = reference[&key].clone();
        if key == "attn.y" {
            // Compare real tokens only: zero both sides' padded query rows.
            let mut keep = vec![1f32; 2 * 9 * 12];
            keep[9 * 12..12 * 12].fill(0.0);
            let keep = Tensor::from_vec(keep, (2, 9, 12), &Device::Cpu).unwrap();
            b = b.mul(&keep).unwrap();
            let a2 = a.mul(&keep).unwrap();
            check(&key, &a2, &b);
            continue;
        }
        check(&key, &a, &b);
    }
}

fn check(key: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{key}: shape");
    let a = ours.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = reference.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(&b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= 2e-5 + 2e-5 * scale, "{key}: max difference {worst} (reference max |v| {scale})");
}
