//! The MoE layer on a hand-computed example: capacity, drop order, top-k renormalisation,
//! aux and z losses; expert outputs checked against a naive f64 reference.

use candle_core::{Device, Tensor};
use nanomoe::moe::{MoeCtx, MoeLayer, Routing};
use nanomoe::params::ParamStore;
use nanomoe::GPTConfig;

fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

#[test]
fn hand_computed_routing_losses_and_outputs() {
    // 3 experts, top-2, n_embd 3, router W_g = identity so the router logits are x itself.
    let cfg = GPTConfig { n_embd: 3, n_head: 1, n_exp: 3, moe_top_k: 2, eval_capacity: 0.75, min_capacity: 1, ..GPTConfig::tiny() };
    let x_rows = [[3.0f32, 2.0, 0.0], [0.0, 3.0, 2.0], [3.0, 0.0, 2.0], [3.0, 2.0, 0.0]];
    let dev = Device::Cpu;
    let h = 12;
    // Deterministic small expert weights.
    let fc: Vec<f32> = (0..3 * 3 * h).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.05).collect();
    let proj: Vec<f32> = (0..3 * h * 3).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.04).collect();
    let fcb: Vec<f32> = (0..3 * h).map(|i| (i % 5) as f32 * 0.01).collect();
    let pb: Vec<f32> = (0..3 * 3).map(|i| i as f32 * 0.1 - 0.3).collect();
    let eye = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.], [0., 0., 1.]], &dev).unwrap();
    let store = ParamStore::from_tensors(vec![
        ("m.router.w_g.weight".into(), eye),
        ("m.experts.c_fc".into(), Tensor::from_vec(fc.clone(), (3, 3, h), &dev).unwrap()),
        ("m.experts.c_proj".into(), Tensor::from_vec(proj.clone(), (3, h, 3), &dev).unwrap()),
        ("m.experts.fc_bias".into(), Tensor::from_vec(fcb.clone(), (3, 1, h), &dev).unwrap()),
        ("m.experts.proj_bias".into(), Tensor::from_vec(pb.clone(), (3, 1, 3), &dev).unwrap()),
    ])
    .unwrap();
    let layer = MoeLayer::load(&cfg, &store, "m", 0, None).unwrap();
    let x = Tensor::new(&x_rows, &dev).unwrap().unsqueeze(0).unwrap(); // [1, 4, 3]
    let mut ctx = MoeCtx { cfg: &cfg, training: false, routing: Routing::Capacity, rng: None, sink: None, prec: nanomoe::kernels::Precision::F32 };
    let out = layer.forward(&x, &mut ctx).unwrap();

    // capacity = floor(2 * 0.75 * 4 / 3) = 2. First choices: t0->e0, t1->e1, t2->e0, t3->e0
    // (dropped: e0 full). Second choices: t0->e1, t1->e2, t2->e2, t3->e1 (dropped: e1 full).
    assert_eq!(out.stats.tokens_per_expert, vec![2, 2, 2]);
    assert_eq!(out.stats.dropped, 2);
    assert_eq!(out.stats.assignments, 8);

    // Softmax over the two chosen logits (3 and 2): a = sigmoid(1), b = 1 - a.
    let a = 1.0 / (1.0 + (-1.0f64).exp());
    let b = 1.0 - a;
    // f = [3/4, 3/4, 2/4]; P = [3a/4, (a + 2b)/4, 2b/4]; aux = 3 * sum f P = 2.25 a + 1.875 b
    let aux = out.aux_loss.to_scalar::<f32>().unwrap() as f64;
    assert!((aux - (2.25 * a + 1.875 * b)).abs() < 1e-6, "aux {aux}");
    // Every row is a permutation of (3, 2, 0): z = ln(e^3 + e^2 + 1)^2
    let z = out.z_loss.to_scalar::<f32>().unwrap() as f64;
    let lse = (3f64.exp() + 2f64.exp() + 1.0).ln();
    assert!((z - lse * lse).abs() < 1e-5, "z {z}");

    // Expected outputs: sum of kept choices' weights times expert MLP (naive f64).
    let expert = |e: usize, xv: &[f32; 3]| -> [f64; 3] {
        let mut hid = vec![0f64; h];
        for (j, hj) in hid.iter_mut().enumerate() {
            let mut s = fcb[e * h + j] as f64;
            for i in 0..3 {
                s += xv[i] as f64 * fc[e * 3 * h + i * h + j] as f64;
            }
            *hj = gelu_tanh(s);
        }
        let mut o = [0f64; 3];
        for (i, oi) in o.iter_mut().enumerate() {
            let mut s = pb[e * 3 + i] as f64;
            for (j, hj) in hid.iter().enumerate() {
                s += hj * proj[e * h * 3 + j * 3 + i] as f64;
            }
            *oi = s;
        }
        o
    };
    let combos: [&[(usize, f64)]; 4] = [&[(0, a), (1, b)], &[(1, a), (2, b)], &[(0, a), (2, b)], &[]];
    let y: Vec<Vec<f32>> = out.y.squeeze(0).unwrap().to_vec2().unwrap();
    for (t, combo) in combos.iter().enumerate() {
        let mut expect = [0f64; 3];
        for &(e, w) in combo.iter() {
            let o = expert(e, &x_rows[t]);
            for i in 0..3 {
                expect[i] += w * o[i];
            }
        }
        for i in 0..3 {
            assert!((y[t][i] as f64 - expect[i]).abs() < 1e-5, "token {t} dim {i}: {} vs {}", y[t][i], expect[i]);
        }
    }
    // The fully dropped token contributes exactly nothing (the residual carries it).
    assert_eq!(y[3], vec![0.0, 0.0, 0.0]);

    // Dropless: t3 is served by e0 and e1 too.
    let mut ctx = MoeCtx { cfg: &cfg, training: false, routing: Routing::Dropless, rng: None, sink: None, prec: nanomoe::kernels::Precision::F32 };
    let dl = layer.forward(&x, &mut ctx).unwrap();
    assert_eq!(dl.stats.dropped, 0);
    assert_eq!(dl.stats.tokens_per_expert, vec![3, 3, 2]);
    let y3: Vec<f32> = dl.y.squeeze(0).unwrap().get(3).unwrap().to_vec1().unwrap();
    let (o0, o1) = (expert(0, &x_rows[3]), expert(1, &x_rows[3]));
    for i in 0..3 {
        assert!((y3[i] as f64 - (a * o0[i] + b * o1[i])).abs() < 1e-5);
    }
}

#[test]
fn top1_with_training_capacity() {
    // top-1: the softmax over one logit is 1; train capacity applies in training.
    let cfg = GPTConfig { n_embd: 3, n_head: 1, n_exp: 3, moe_top_k: 1, train_capacity: 1.0, eval_capacity: 9.0, min_capacity: 1, bias: false, ..GPTConfig::tiny() };
    let dev = Device::Cpu;
    let eye = Tensor::new(&[[1f32, 0., 0.], [0., 1., 0.], [0., 0., 1.]], &dev).unwrap();
    let store = ParamStore::from_tensors(vec![
        ("m.router.w_g.weight".into(), eye),
        ("m.experts.c_fc".into(), Tensor::ones((3, 3, 12), candle_core::DType::F32, &dev).unwrap()),
        ("m.experts.c_proj".into(), Tensor::ones((3, 12, 3), candle_core::DType::F32, &dev).unwrap()),
    ])
    .unwrap();
    let layer = MoeLayer::load(&cfg, &store, "m", 0, None).unwrap();
    // All 5 tokens prefer expert 0. capacity = floor(1 * 1.0 * 5 / 3) = 1 -> 2 (even).
    let x = Tensor::new(&[[[1f32, 0., 0.], [2., 0., 0.], [3., 0., 0.], [4., 0., 0.], [5., 0., 0.]]], &dev).unwrap();
    let mut ctx = MoeCtx { cfg: &cfg, training: true, routing: Routing::Capacity, rng: None, sink: None, prec: nanomoe::kernels::Precision::F32 };
    let out = layer.forward(&x, &mut ctx).unwrap();
    assert_eq!(out.stats.tokens_per_expert, vec![2, 0, 0]);
    assert_eq!(out.stats.dropped, 3);
    let y: Vec<Vec<f32>> = out.y.squeeze(0).unwrap().to_vec2().unwrap();
    // Kept: the two earliest tokens; weight 1; expert(x) = 12 * gelu(sum x) per output dim.
    for (t, row) in y.iter().enumerate() {
        let expect = if t < 2 { 12.0 * gelu_tanh((t + 1) as f64) } else { 0.0 };
        assert!(row.iter().all(|&v| (v as f64 - expect).abs() < 1e-4), "token {t}: {row:?}");
    }
    // aux with k = 1: f = [1, 0, 0], P = [1, 0, 0] -> 3.
    assert!((out.aux_loss.to_scalar::<f32>().unwrap() - 3.0).abs() < 1e-6);
    // In eval mode the capacity factor 9 keeps everyone.
    let mut ctx = MoeCtx { cfg: &cfg, training: false, routing: Routing::Capacity, rng: None, sink: None, prec: nanomoe::kernels::Precision::F32 };
    assert_eq!(layer.forward(&x, &mut ctx).unwrap().stats.dropped, 0);
}
