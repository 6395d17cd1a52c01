//! The seed's architecture everywhere the GPT-2 one works: save/load round trip, KV-cached
//! generation equal to uncached, bf16 weights for decoding, HF-style and legacy forward.
//! (Parity with the seed's own code: tests/seed_parity.rs and tests/python/test_seed.py.)

use candle_core::{DType, Device, Tensor};
use nanomoe::config::{ExpertMlp, NormType};
use nanomoe::{GPTConfig, GenerationConfig, Routing, GPT};

fn seed_moe() -> GPTConfig {
    GPTConfig { block_size: 48, vocab_size: 61, n_layer: 4, n_head: 2, n_embd: 32, n_exp: 4, moe_top_k: 2, moe_start_layer: 1, ..Default::default() }
        .with_seed_architecture(true)
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

#[test]
fn seed_models_save_load_and_generate_with_the_cache() {
    let cfg = seed_moe();
    assert_eq!((cfg.norm_type, cfg.expert_mlp), (NormType::RmsNorm, ExpertMlp::SwiGlu));
    let mut model = GPT::new_seeded(&cfg, 3, &Device::Cpu).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    model.save_pretrained(tmp.path()).unwrap();
    let back = GPT::from_pretrained(tmp.path()).unwrap();
    assert_eq!(back.config, cfg);
    let ids = Tensor::new(&[[1u32, 5, 9, 13, 2, 40, 33, 7]], &Device::Cpu).unwrap();
    let (a, b) = (model.forward(&ids, None).unwrap().logits, back.forward(&ids, None).unwrap().logits);
    assert_eq!(max_diff(&a, &b), 0.0);
    // Legacy forward without targets: the last position's logits of the HF forward.
    let (last, _, _) = model.forward_legacy(&ids, None).unwrap();
    assert!(max_diff(&last.squeeze(1).unwrap(), &a.narrow(1, 7, 1).unwrap().squeeze(1).unwrap()) < 1e-5);
    // No token dropped: cached and uncached greedy decoding agree, past the prompt.
    model.set_routing(Routing::Dropless);
    let cached = model.generate(&ids, &GenerationConfig::greedy(20)).unwrap();
    let uncached = model.generate(&ids, &GenerationConfig { use_cache: false, ..GenerationConfig::greedy(20) }).unwrap();
    assert_eq!(cached, uncached);
    assert_eq!(cached[0].len(), 28);
}

#[test]
fn seed_models_decode_with_bf16_weights() {
    let model = GPT::new_seeded(&seed_moe(), 4, &Device::Cpu).unwrap();
    let ids = vec![vec![3u32, 8, 21, 34, 55]];
    let f32_logits = model.forward_step(&ids, None, None).unwrap();
    let bf16 = GPT::new_seeded(&seed_moe(), 4, &Device::Cpu).unwrap().with_weight_dtype(DType::BF16).unwrap();
    assert_eq!(bf16.weight_dtype(), DType::BF16);
    let gate = bf16.params().get("transformer.h.1.mlp.experts.gate_proj").unwrap();
    assert_eq!(gate.dtype(), DType::BF16);
    let logits = bf16.forward_step(&ids, None, None).unwrap();
    let d = max_diff(&f32_logits, &logits);
    assert!(d > 0.0 && d < 2e-2, "bf16 logits differ by {d}");
}
