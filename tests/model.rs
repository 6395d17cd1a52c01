//! Model behaviour without Python: round trips, KV cache, gradients, forward semantics,
//! generation and bad input.

use candle_core::{DType, Device, Tensor};
use nanomoe::checkpoint::{self, SaveDType, SaveOptions};
use nanomoe::{AutoModelForCausalLM, GPTConfig, GenerationConfig, KvCache, Routing, GPT};

fn dense_cfg() -> GPTConfig {
    GPTConfig { block_size: 24, vocab_size: 50, n_layer: 2, n_head: 2, n_embd: 16, ..Default::default() }
}

fn moe_cfg() -> GPTConfig {
    GPTConfig { n_layer: 3, n_exp: 4, moe_top_k: 2, stride: 2, use_aux_loss: true, use_router_z_loss: true, ..dense_cfg() }
}

fn ids(rows: &[&[u32]]) -> Tensor {
    let t = rows[0].len();
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

fn logits(m: &GPT, x: &Tensor) -> Tensor {
    m.forward(x, None).unwrap().logits
}

fn sample_ids() -> Tensor {
    ids(&[&[1, 5, 9, 2, 7, 3, 3, 8, 0, 49, 12, 6], &[4, 4, 4, 10, 11, 12, 13, 2, 1, 0, 30, 31]])
}

#[test]
fn dense_and_moe_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for (name, cfg) in [("dense", dense_cfg()), ("moe", moe_cfg()), ("nobias", GPTConfig { bias: false, activation_function: "gelu".into(), ..dense_cfg() })] {
        let m = GPT::new_seeded(&cfg, 7, &Device::Cpu).unwrap();
        let path = dir.path().join(name);
        m.save_pretrained(&path).unwrap();
        let back = AutoModelForCausalLM::from_pretrained(&path).unwrap();
        assert_eq!(back.config, cfg, "{name}");
        let x = sample_ids();
        assert_eq!(max_diff(&logits(&m, &x), &logits(&back, &x)), 0.0, "{name}");
        let cfg_json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
        let expect_type = if cfg.is_moe() { "nanomoe_gpt" } else { "gpt2" };
        assert_eq!(cfg_json["model_type"], expect_type);
        assert!(path.join("generation_config.json").is_file());
        // Nothing temporary is left next to the model.
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()).map(|e| e.file_name()).filter(|n| n.to_string_lossy().contains(".tmp-")).collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
}

#[test]
fn gpt2_format_stores_conv1d_transposed_and_omits_lm_head() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = GPTConfig { bias: false, ..dense_cfg() };
    let m = GPT::new_seeded(&cfg, 1, &Device::Cpu).unwrap();
    m.save_pretrained(dir.path()).unwrap();
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(meta.metadata().as_ref().unwrap().get("format").map(String::as_str), Some("pt"));
    let names: Vec<String> = st.names().into_iter().map(String::from).collect();
    assert!(!names.iter().any(|n| n.contains("lm_head")));
    // Conv1D: [in, out]
    assert_eq!(st.tensor("transformer.h.0.attn.c_attn.weight").unwrap().shape(), &[16, 48]);
    assert_eq!(st.tensor("transformer.h.1.mlp.c_proj.weight").unwrap().shape(), &[64, 16]);
    // bias=false still writes (zero) biases, as GPT-2 requires them.
    let b = st.tensor("transformer.h.0.mlp.c_fc.bias").unwrap();
    assert_eq!(b.shape(), &[64]);
    assert!(b.data().iter().all(|&x| x == 0));
    // The transpose is right: the written c_attn equals the model's weight transposed.
    let w = m.params().get("transformer.h.0.attn.c_attn.weight").unwrap();
    let file = st.tensor("transformer.h.0.attn.c_attn.weight").unwrap();
    let file = Tensor::from_raw_buffer(file.data(), DType::F32, file.shape(), &Device::Cpu).unwrap();
    assert_eq!(max_diff(&w.t().unwrap(), &file), 0.0);
}

#[test]
fn sharded_save_loads_back() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = moe_cfg();
    let m = GPT::new_seeded(&cfg, 3, &Device::Cpu).unwrap();
    let opts = SaveOptions { max_shard_size: 20_000, ..Default::default() };
    m.save_pretrained_with(dir.path(), &opts).unwrap();
    assert!(!dir.path().join("model.safetensors").exists());
    let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.path().join("model.safetensors.index.json")).unwrap()).unwrap();
    assert!(index["metadata"]["total_size"].as_u64().unwrap() > 0);
    let shards: std::collections::BTreeSet<&str> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 2, "{shards:?}");
    assert!(shards.iter().all(|s| s.ends_with(&format!("-of-{:05}.safetensors", shards.len()))));
    let back = GPT::from_pretrained(dir.path()).unwrap();
    let x = sample_ids();
    assert_eq!(max_diff(&logits(&m, &x), &logits(&back, &x)), 0.0);
    // Saving unsharded into the same directory removes the stale shards.
    m.save_pretrained(dir.path()).unwrap();
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    assert!(names.iter().all(|n| !n.contains("-of-") && n != "model.safetensors.index.json"), "{names:?}");
}

#[test]
fn half_precision_weights_load() {
    let dir = tempfile::tempdir().unwrap();
    let m = GPT::new_seeded(&moe_cfg(), 5, &Device::Cpu).unwrap();
    for dt in [SaveDType::BF16, SaveDType::F16] {
        let p = dir.path().join(format!("{dt:?}"));
        m.save_pretrained_with(&p, &SaveOptions { dtype: dt, ..Default::default() }).unwrap();
        let back = GPT::from_pretrained(&p).unwrap();
        for (name, v) in m.params().iter() {
            let rounded = v.as_tensor().to_dtype(match dt { SaveDType::BF16 => DType::BF16, _ => DType::F16 }).unwrap().to_dtype(DType::F32).unwrap();
            assert_eq!(max_diff(&rounded, &back.params().get(name).unwrap()), 0.0, "{name}");
        }
        let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["dtype"], dt.hf_name());
    }
}

#[test]
fn saving_keeps_other_files_and_a_failed_save_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let m = GPT::new_seeded(&dense_cfg(), 5, &Device::Cpu).unwrap();
    m.save_pretrained(dir.path()).unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), "{}").unwrap();
    let before = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    // A write that never commits leaves the target untouched and no temp dir behind.
    {
        let w = checkpoint::AtomicDir::new(dir.path()).unwrap();
        w.write_bytes("model.safetensors", b"garbage").unwrap();
    }
    assert_eq!(std::fs::read(dir.path().join("model.safetensors")).unwrap(), before);
    let own = format!(".{}.tmp-", dir.path().file_name().unwrap().to_string_lossy());
    let parent_entries = std::fs::read_dir(dir.path().parent().unwrap()).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with(&own)).count();
    assert_eq!(parent_entries, 0);
    // A real save keeps files it does not write.
    m.save_pretrained(dir.path()).unwrap();
    assert_eq!(std::fs::read_to_string(dir.path().join("tokenizer.json")).unwrap(), "{}");
}

#[test]
fn kv_cache_matches_full_forward() {
    for cfg in [dense_cfg(), moe_cfg()] {
        let mut m = GPT::new_seeded(&cfg, 11, &Device::Cpu).unwrap();
        m.set_routing(Routing::Dropless);
        let seq: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3];
        let full = logits(&m, &ids(&[&seq])).squeeze(0).unwrap();
        let mut cache = KvCache::new();
        let first = m.forward_step(&[seq[..4].to_vec()], Some(&mut cache), None).unwrap();
        assert!(max_diff(&first.squeeze(0).unwrap(), &full.get(3).unwrap()) < 1e-5);
        for t in 4..seq.len() {
            let step = m.forward_step(&[vec![seq[t]]], Some(&mut cache), None).unwrap();
            assert!(max_diff(&step.squeeze(0).unwrap(), &full.get(t).unwrap()) < 1e-5, "position {t}");
        }
        assert_eq!(cache.seq_len(), seq.len());
    }
}

#[test]
fn kv_caches_reserved_up_front_decode_the_same_bits() {
    for cfg in [dense_cfg(), moe_cfg()] {
        let mut m = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap();
        m.set_routing(Routing::Dropless);
        let seq: Vec<u32> = (0..cfg.block_size as u32).map(|i| (i * 7 + 3) % 50).collect();
        // Growing by doubling, room for everything at once, and an absurd request (capped at
        // the block size).
        let mut caches = [KvCache::new(), KvCache::with_capacity(cfg.block_size), KvCache::with_capacity(usize::MAX)];
        let steps: Vec<Vec<Tensor>> = caches
            .iter_mut()
            .map(|cache| {
                let mut out = vec![m.forward_step(&[seq[..3].to_vec()], Some(cache), None).unwrap()];
                for &t in &seq[3..] {
                    out.push(m.forward_step(&[vec![t]], Some(cache), None).unwrap());
                }
                out
            })
            .collect();
        for (i, other) in steps[1..].iter().enumerate() {
            for (pos, (a, b)) in steps[0].iter().zip(other).enumerate() {
                assert_eq!(max_diff(a, b), 0.0, "reserved cache {i}, step {pos}");
            }
        }
        assert!(caches.iter().all(|c| c.seq_len() == cfg.block_size));
    }
}

#[test]
fn cached_and_uncached_greedy_generation_are_identical() {
    for cfg in [dense_cfg(), moe_cfg()] {
        let m = GPT::new_seeded(&cfg, 2, &Device::Cpu).unwrap();
        let prompt = ids(&[&[1, 2, 3], &[7, 8, 9]]);
        // 40 new tokens passes block_size 24: exercises the cropping path too.
        let cached = m.generate(&prompt, &GenerationConfig::greedy(40)).unwrap();
        let uncached = m.generate(&prompt, &GenerationConfig { use_cache: false, ..GenerationConfig::greedy(40) }).unwrap();
        assert_eq!(cached, uncached);
        assert_eq!(cached[0].len(), 43);
        // Sampling with a seed is reproducible, and also equal with and without the cache.
        let s = GenerationConfig { max_new_tokens: 30, temperature: 0.9, top_k: Some(10), top_p: Some(0.9), seed: Some(42), ..Default::default() };
        let a = m.generate(&prompt, &s).unwrap();
        assert_eq!(a, m.generate(&prompt, &s).unwrap());
        assert_eq!(a, m.generate(&prompt, &GenerationConfig { use_cache: false, ..s.clone() }).unwrap());
        assert_ne!(a, m.generate(&prompt, &GenerationConfig { seed: Some(43), ..s }).unwrap());
    }
}

#[test]
fn ragged_batches_equal_single_prompts() {
    let m = GPT::new_seeded(&dense_cfg(), 4, &Device::Cpu).unwrap();
    let prompts = vec![vec![5u32, 6, 7, 8, 9], vec![1u32, 2]];
    let cfg = GenerationConfig::greedy(8);
    let batch = m.generate_with(&prompts, &cfg, |_, _| {}).unwrap();
    for (p, b) in prompts.iter().zip(&batch) {
        let single = m.generate_with(&[p.clone()], &cfg, |_, _| {}).unwrap();
        assert_eq!(&single[0], b);
    }
    // Streaming callback sees every new token in order.
    let mut seen = vec![Vec::new(); 2];
    m.generate_with(&prompts, &cfg, |row, tok| seen[row].push(tok)).unwrap();
    for (s, (b, p)) in seen.iter().zip(batch.iter().zip(&prompts)) {
        assert_eq!(&b[p.len()..], s.as_slice());
    }
}

#[test]
fn generation_stops_at_eos() {
    let m = GPT::new_seeded(&dense_cfg(), 2, &Device::Cpu).unwrap();
    let free = m.generate(&ids(&[&[1, 2, 3]]), &GenerationConfig::greedy(10)).unwrap();
    let eos = free[0][5]; // the third generated token
    let first = free[0][3..].iter().position(|&t| t == eos).unwrap();
    let stopped = m.generate(&ids(&[&[1, 2, 3]]), &GenerationConfig { eos_token_id: Some(eos), ..GenerationConfig::greedy(10) }).unwrap();
    assert_eq!(stopped[0], free[0][..3 + first + 1].to_vec());
}

#[test]
fn hf_labels_are_shifted_and_legacy_targets_are_not() {
    let m = GPT::new_seeded(&moe_cfg(), 9, &Device::Cpu).unwrap();
    let x = sample_ids();
    let mut labels: Vec<Vec<i64>> = x.to_dtype(DType::I64).unwrap().to_vec2().unwrap();
    labels[1][4] = -100;
    let l = Tensor::new(labels.clone(), &Device::Cpu).unwrap();
    let hf = m.forward(&x, Some(&l)).unwrap();
    let t = x.dim(1).unwrap();
    let idx = x.narrow(1, 0, t - 1).unwrap();
    let mut tg: Vec<Vec<i64>> = labels.iter().map(|r| r[1..].to_vec()).collect();
    tg[1][3] = -1;
    let tg = Tensor::new(tg, &Device::Cpu).unwrap();
    let (_, legacy_loss, losses) = m.forward_legacy(&idx, Some(&tg)).unwrap();
    let a = hf.aux.ntp_loss.unwrap().to_scalar::<f32>().unwrap();
    let b = losses.ntp_loss.unwrap().to_scalar::<f32>().unwrap();
    assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    // The total adds the weighted aux and z losses.
    let aux = hf.aux.aux_loss.unwrap().to_scalar::<f32>().unwrap();
    let z = hf.aux.router_z_loss.unwrap().to_scalar::<f32>().unwrap();
    let total = hf.loss.unwrap().to_scalar::<f32>().unwrap();
    assert!((total - (a + 0.01 * aux + 0.001 * z)).abs() < 1e-5);
    assert!(legacy_loss.is_some());
    // Without targets, legacy forward returns the last position only.
    let (last, none, _) = m.forward_legacy(&x, None).unwrap();
    assert!(none.is_none());
    assert_eq!(last.dims(), &[2, 1, 50]);
    let full = logits(&m, &x);
    assert!(max_diff(&last.squeeze(1).unwrap(), &full.narrow(1, t - 1, 1).unwrap().squeeze(1).unwrap()) < 1e-6);
}

#[test]
fn every_parameter_gets_a_gradient() {
    let cfgs = [
        dense_cfg(),
        GPTConfig { dropout: 0.1, ..dense_cfg() },
        GPTConfig { use_noisy_top_k: true, use_switch_tfm_init: true, dropout: 0.1, train_capacity: 4.0, ..moe_cfg() },
        GPTConfig { bias: false, moe_top_k: 1, stride: 1, n_layer: 2, train_capacity: 4.0, ..moe_cfg() },
    ];
    for cfg in cfgs {
        let mut m = GPT::new_seeded(&cfg, 1, &Device::Cpu).unwrap();
        m.train();
        m.set_seed(3);
        // Every vocabulary id and position appears, so every embedding row gets gradient.
        let row: Vec<u32> = (0..24).collect();
        let row2: Vec<u32> = (24..48).collect();
        let row3: Vec<u32> = (26..50).collect();
        let x = ids(&[&row, &row2, &row3]);
        let out = m.forward(&x, Some(&x)).unwrap();
        let grads = out.loss.unwrap().backward().unwrap();
        for (name, var) in m.params().iter() {
            let g = grads.get(var).unwrap_or_else(|| panic!("{name}: no gradient ({cfg:?})"));
            let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(s > 0.0 && s.is_finite(), "{name}: gradient sum {s}");
        }
    }
}

#[test]
fn capacity_routing_equals_dropless_when_nothing_is_dropped() {
    let cfg = GPTConfig { eval_capacity: 8.0, ..moe_cfg() };
    let mut m = GPT::new_seeded(&cfg, 8, &Device::Cpu).unwrap();
    let x = sample_ids();
    let out = m.forward(&x, None).unwrap();
    assert!(out.moe_stats.iter().all(|s| s.dropped == 0));
    m.set_routing(Routing::Dropless);
    assert!(max_diff(&out.logits, &logits(&m, &x)) < 1e-5);
    // With a tiny capacity tokens are dropped and the output changes.
    let tight = GPTConfig { eval_capacity: 0.25, min_capacity: 1, ..moe_cfg() };
    let mut m2 = GPT::new_seeded(&tight, 8, &Device::Cpu).unwrap();
    let o2 = m2.forward(&x, None).unwrap();
    assert!(o2.moe_stats.iter().all(|s| s.dropped > 0), "{:?}", o2.moe_stats);
    m2.set_routing(Routing::Dropless);
    assert!(max_diff(&o2.logits, &logits(&m2, &x)) > 1e-4);
}

#[test]
fn parameter_counts() {
    let m = GPT::new(&moe_cfg(), &Device::Cpu).unwrap();
    let d = 16;
    let expert = d * 4 * d * 2 + 4 * d + d; // c_fc, c_proj, biases per expert
    let dense_mlp = expert;
    assert_eq!(m.num_params() - m.num_active_params(), expert * 2); // 4 experts, top-2: 2 idle
    let dense = GPT::new(&GPTConfig { n_exp: 1, ..moe_cfg() }, &Device::Cpu).unwrap();
    assert_eq!(m.num_params(), dense.num_params() - dense_mlp + 4 * expert + 4 * d);
}

#[test]
fn inference_layout_computes_the_same_model_and_saves_the_same_files() {
    // Inference loads hold the experts [E, N, K] and f32 matrices in panels (the decoding
    // kernels' layouts); the model is the same one, to rounding, and saves to the same bytes.
    let cfg = moe_cfg();
    let trainable = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap();
    let inference = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap().with_weight_dtype(DType::F32).unwrap();
    assert!(trainable.params().needs_inference_layout());
    assert!(!inference.params().needs_inference_layout());
    let name = "transformer.h.1.mlp.experts.c_fc";
    assert_eq!(inference.params().get(name).unwrap().dims(), trainable.params().get(name).unwrap().dims());
    // Held as 4 matrices [N, K] = [64, 16] packed in panels (f32 inference weights).
    match inference.params().mat(name).unwrap() {
        nanomoe::weight::Mat::Panels(p) => assert_eq!((p.matrices(), p.rows(), p.cols()), (4, 64, 16)),
        _ => panic!("{name}: f32 inference weights are packed"),
    }
    assert!(inference.params().var(name).is_none());
    let x = sample_ids();
    let d = max_diff(&logits(&trainable, &x), &logits(&inference, &x));
    assert!(d < 1e-5, "whole sequences differ by {d}");
    let (mut c1, mut c2) = (KvCache::new(), KvCache::new());
    let a = trainable.forward_step(&[vec![1, 2, 3], vec![4, 5, 6]], Some(&mut c1), None).unwrap();
    let b = inference.forward_step(&[vec![1, 2, 3], vec![4, 5, 6]], Some(&mut c2), None).unwrap();
    assert!(max_diff(&a, &b) < 1e-5);
    let dir = tempfile::tempdir().unwrap();
    trainable.save_pretrained(dir.path().join("t")).unwrap();
    inference.save_pretrained(dir.path().join("i")).unwrap();
    for f in ["model.safetensors", "config.json"] {
        assert_eq!(std::fs::read(dir.path().join("t").join(f)).unwrap(), std::fs::read(dir.path().join("i").join(f)).unwrap(), "{f}");
    }
    // Loading for inference gives this layout; training on it is refused with the reason.
    let loaded = GPT::from_pretrained_with_weight_dtype(dir.path().join("t"), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(max_diff(&logits(&loaded, &x), &logits(&inference, &x)), 0.0);
    let mut loaded = loaded;
    loaded.train();
    let labels = x.to_dtype(DType::I64).unwrap();
    let err = loaded.forward(&x, Some(&labels)).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("the weights are packed for inference; load the model with `from_pretrained` to train"), "{err}");
}

#[test]
fn inference_layout_models_quantize_like_trainable_ones() {
    // n_embd 40: matrices summing over 40 stay dense, over 160 are quantized - decided by
    // the logical [E, K, N] shape whatever layout the experts are held in.
    let cfg = GPTConfig { n_embd: 40, ..moe_cfg() };
    let direct = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap().with_weight_dtype(nanomoe::quant::QKind::Q8_0).unwrap();
    let via = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap().with_weight_dtype(DType::F32).unwrap().with_weight_dtype(nanomoe::quant::QKind::Q8_0).unwrap();
    let quantized = |m: &GPT| m.params().quantized().map(|(n, _)| n.to_string()).collect::<Vec<_>>();
    assert_eq!(quantized(&direct), quantized(&via));
    assert!(quantized(&via).contains(&"transformer.h.1.mlp.experts.c_proj".to_string()));
    assert!(!quantized(&via).contains(&"transformer.h.1.mlp.experts.c_fc".to_string()));
    let x = sample_ids();
    let d = max_diff(&logits(&direct, &x), &logits(&via, &x));
    assert!(d < 1e-5, "{d}");
}

#[test]
fn half_precision_weights_compute_exactly_with_the_rounded_weights() {
    // bf16 and f16 alike, loaded from a directory too (f16 once loaded as f32, unnoticed).
    for (cfg, half) in [(dense_cfg(), DType::BF16), (moe_cfg(), DType::BF16), (dense_cfg(), DType::F16), (moe_cfg(), DType::F16)] {
        let f32_model = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap();
        // The f32 model with every half-stored weight rounded to bf16 / f16 and back.
        let bf16 = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap().with_weight_dtype(half).unwrap();
        let rounded_params = bf16.params().with_dtype(DType::F32, |_, _| true).unwrap();
        let rounded = GPT::from_params(cfg.clone(), rounded_params).unwrap();
        assert_eq!(bf16.weight_dtype(), half);
        // Loading straight into bf16 / f16 (GPT-2 Conv1D layout for the dense model) gives the same model.
        let dir = tempfile::tempdir().unwrap();
        f32_model.save_pretrained(dir.path()).unwrap();
        let loaded = GPT::from_pretrained_with_weight_dtype(dir.path(), half, &Device::Cpu).unwrap();
        assert_eq!(loaded.weight_dtype(), half);
        for ((name, a), (_, b)) in loaded.params().iter().zip(bf16.params().iter()) {
            assert_eq!(a.dtype(), b.dtype(), "{name}");
            assert_eq!(max_diff(&a.to_dtype(DType::F32).unwrap(), &b.to_dtype(DType::F32).unwrap()), 0.0, "{name}");
        }
        for (name, v) in bf16.params().iter() {
            let want = if v.rank() >= 2 && !name.contains(".router.") && !name.ends_with("_bias") { half } else { DType::F32 };
            assert_eq!(v.dtype(), want, "{name}");
        }
        let x = sample_ids();
        // Whole sequences (matrix products) and single decoding steps (weight streaming).
        assert!(max_diff(&logits(&bf16, &x), &logits(&rounded, &x)) < 1e-4);
        let d_round = max_diff(&logits(&bf16, &x), &logits(&f32_model, &x));
        assert!(d_round > 0.0 && d_round < 0.05, "{half:?} rounding changes logits by {d_round}");
        let prompt = ids(&[&[1, 2, 3], &[7, 8, 9]]);
        let g = GenerationConfig::greedy(12);
        assert_eq!(bf16.generate(&prompt, &g).unwrap(), rounded.generate(&prompt, &g).unwrap());
        let uncached = GenerationConfig { use_cache: false, ..g.clone() };
        assert_eq!(bf16.generate(&prompt, &g).unwrap(), bf16.generate(&prompt, &uncached).unwrap());
        let mut cache = KvCache::new();
        bf16.forward_step(&[vec![1, 2, 3]], Some(&mut cache), None).unwrap();
        let step = bf16.forward_step(&[vec![4]], Some(&mut cache), None).unwrap();
        let full = logits(&rounded, &ids(&[&[1, 2, 3, 4]])).get(0).unwrap().get(3).unwrap();
        assert!(max_diff(&step.squeeze(0).unwrap(), &full) < 1e-4);
    }
}

#[test]
fn every_parameter_gets_a_gradient_in_eval_mode_too() {
    // Inference paths (fused attention, per-expert MoE dispatch, weight streaming for short
    // inputs) keep their backward passes.
    for cfg in [dense_cfg(), moe_cfg()] {
        let m = GPT::new_seeded(&cfg, 1, &Device::Cpu).unwrap();
        for x in [ids(&[&(0..24).collect::<Vec<u32>>(), &(24..48).collect::<Vec<u32>>(), &(26..50).collect::<Vec<u32>>()]), ids(&[&[1, 2, 3, 4]])] {
            let out = m.forward(&x, Some(&x)).unwrap();
            let grads = out.loss.unwrap().backward().unwrap();
            for (name, var) in m.params().iter() {
                let Some(g) = grads.get(var) else {
                    panic!("{name}: no gradient in eval mode")
                };
                let s = g.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
                // The 4-token input leaves most embedding rows and some experts unused.
                if x.dims()[1] == 24 {
                    assert!(s > 0.0 && s.is_finite(), "{name}: gradient sum {s}");
                }
            }
        }
    }
}

#[test]
fn grad_sink_gives_the_same_gradients_as_candles_backward() {
    // The training path hands the experts' weight gradients over through a GradSink, and
    // runs each block's residual branches as one chain node (kernels::residual) whose weights'
    // gradients go there too; every parameter's gradient must equal the one candle's own
    // backward computes op by op, bit for bit.
    let seed_arch = GPTConfig {
        norm_type: nanomoe::config::NormType::RmsNorm,
        qk_norm: true,
        activation_function: "relu2".into(),
        bias: false,
        ..moe_cfg()
    };
    let configs = [
        moe_cfg(),
        GPTConfig { bias: false, moe_top_k: 1, stride: 1, ..moe_cfg() },
        dense_cfg(),
        GPTConfig { bias: false, activation_function: "gelu".into(), ..dense_cfg() },
        seed_arch.clone(),
        GPTConfig { n_exp: 1, ..seed_arch },
    ];
    // Mixed precision (bf16 products) too: the chained ops take the pass's precision.
    let bf16 = [(dense_cfg(), true), (moe_cfg(), true)];
    for (cfg, half) in configs.into_iter().map(|c| (c, false)).chain(bf16) {
        let mut m = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap();
        m.train();
        if half {
            m.set_precision(nanomoe::kernels::Precision::Bf16);
        }
        let x = ids(&[&(0..24).collect::<Vec<u32>>(), &(24..48).collect::<Vec<u32>>()]);
        let y = ids(&[&(1..25).collect::<Vec<u32>>(), &(25..49).collect::<Vec<u32>>()]);
        m.set_seed(9);
        let (loss, _, _) = m.forward_loss(&x, &y).unwrap();
        let plain = loss.unwrap().backward().unwrap();
        m.set_seed(9);
        let sink = nanomoe::grad_sink::GradSink::new();
        let (loss, _, _) = m.forward_loss_with_sink(&x, &y, &sink).unwrap();
        let sunk = sink.backward(&loss.unwrap()).unwrap();
        let mut experts = 0;
        for (name, var) in m.params().iter() {
            let a = plain.get(var).unwrap_or_else(|| panic!("{name}: no gradient"));
            let b = sunk.get(var).unwrap_or_else(|| panic!("{name}: no gradient through the sink"));
            assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
            experts += usize::from(name.contains(".experts.c_"));
        }
        assert!(experts >= 2 || cfg.n_exp <= 1, "no expert weights in {cfg:?}");
        if half {
            // The precision took effect: f32 products give other gradients.
            m.set_precision(nanomoe::kernels::Precision::F32);
            m.set_seed(9);
            let (loss, _, _) = m.forward_loss(&x, &y).unwrap();
            let f32_grads = loss.unwrap().backward().unwrap();
            let w = &m.params().iter().find(|(n, _)| n.ends_with("h.0.attn.c_attn.weight")).expect("c_attn").1;
            let (a, b) = (f32_grads.get(w).unwrap(), sunk.get(w).unwrap());
            assert_ne!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
            m.set_precision(nanomoe::kernels::Precision::Bf16);
        }
        // The contract: a plain backward of a sink graph leaves the sink's weights out (the
        // experts', and every weight inside a block's branches); embeddings, the final norm
        // and the routers stay candle's.
        let (loss, _, _) = m.forward_loss_with_sink(&x, &y, &sink).unwrap();
        let bare = loss.unwrap().backward().unwrap();
        let names: Vec<String> = m.params().iter().map(|(n, _)| n.to_string()).collect();
        for (name, var) in m.params().iter() {
            let block = name.strip_prefix("transformer.h.").and_then(|r| r.split('.').next());
            let moe_block = block.is_some_and(|i| names.iter().any(|n| n.starts_with(&format!("transformer.h.{i}.mlp.router."))));
            let in_sink = name.contains(".experts.c_")
                || name.contains(".ln_1.")
                || name.contains(".attn.")
                || (block.is_some() && !moe_block && (name.contains(".ln_2.") || name.contains(".mlp.")));
            assert_eq!(bare.get(var).is_none(), in_sink, "{name}");
        }
    }
}

#[test]
fn a_cloned_kv_cache_continues_independently() {
    // The cache writes new positions into its buffers in place; a clone must own its own.
    for cfg in [dense_cfg(), moe_cfg()] {
        let mut m = GPT::new_seeded(&cfg, 12, &Device::Cpu).unwrap();
        m.set_routing(Routing::Dropless);
        let a: Vec<u32> = vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4];
        let b: Vec<u32> = [&a[..6], &[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23][..]].concat();
        let (full_a, full_b) = (logits(&m, &ids(&[&a])).squeeze(0).unwrap(), logits(&m, &ids(&[&b])).squeeze(0).unwrap());
        let mut cache_a = KvCache::new();
        m.forward_step(&[a[..6].to_vec()], Some(&mut cache_a), None).unwrap();
        let mut cache_b = cache_a.clone();
        // Interleaved steps past the first buffer size (16): both grow their buffers.
        for t in 6..a.len() {
            let sa = m.forward_step(&[vec![a[t]]], Some(&mut cache_a), None).unwrap();
            let sb = m.forward_step(&[vec![b[t]]], Some(&mut cache_b), None).unwrap();
            assert!(max_diff(&sa.squeeze(0).unwrap(), &full_a.get(t).unwrap()) < 1e-5, "original, position {t}");
            assert!(max_diff(&sb.squeeze(0).unwrap(), &full_b.get(t).unwrap()) < 1e-5, "clone, position {t}");
        }
        assert_eq!((cache_a.seq_len(), cache_b.seq_len()), (a.len(), b.len()));
    }
}
