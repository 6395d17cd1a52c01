//! GGUF files and quantized weights: exact round trips (f32, f16, bf16 and the quantized
//! formats give back the bits of the model they came from), the `gpt2` / `nanomoe`
//! architectures, quantized logits near f32, and clear errors for broken or hostile files.

use candle_core::{DType, Device, Tensor};
use nanomoe::gguf::{self, GgufExtras};
use nanomoe::quant::QKind;
use nanomoe::{GPTConfig, WeightFormat, GPT};

fn configs() -> Vec<(&'static str, GPTConfig)> {
    let dense = GPTConfig { block_size: 64, vocab_size: 97, n_layer: 2, n_head: 4, n_embd: 64, bias: true, ..Default::default() };
    let nobias = GPTConfig { bias: false, ..dense.clone() };
    let moe = GPTConfig { n_layer: 3, n_exp: 4, moe_top_k: 2, stride: 2, ..dense.clone() };
    let seed = GPTConfig { n_layer: 3, n_exp: 4, moe_top_k: 2, moe_start_layer: 1, bias: false, ..dense.clone() }.with_seed_architecture(true);
    vec![("dense", dense), ("dense-nobias", nobias), ("moe", moe), ("seed", seed)]
}

fn ids() -> Tensor {
    Tensor::new(&[[3u32, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26]], &Device::Cpu).unwrap()
}

fn logits(m: &GPT) -> Vec<f32> {
    m.forward(&ids(), None).unwrap().logits.flatten_all().unwrap().to_vec1().unwrap()
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("nanomoe-gguf-test-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

#[test]
fn every_format_round_trips_to_the_same_bits() {
    for (name, cfg) in configs() {
        let m = GPT::new_seeded(&cfg, 3, &Device::Cpu).unwrap();
        let arch = if name.starts_with("dense") { "gpt2" } else { "nanomoe" };
        for format in [WeightFormat::F32, WeightFormat::F16, WeightFormat::BF16, WeightFormat::Quant(QKind::Q8_0), WeightFormat::Quant(QKind::Q4_0)] {
            let path = tmp(&format!("{name}-{}.gguf", format.name()));
            gguf::save(&m, &path, format, &GgufExtras::default()).unwrap();
            let back = gguf::load(&path).unwrap();
            assert_eq!(back.architecture, arch, "{name}");
            assert_eq!(back.gpt.config, m.config, "{name} {format:?}: config");
            assert_eq!(back.gpt.weight_format(), format, "{name}");
            // The same model stored in memory the same way gives the same bits.
            let same = GPT::new_seeded(&cfg, 3, &Device::Cpu).unwrap().with_weight_dtype(format).unwrap();
            assert_eq!(bits(&logits(&back.gpt)), bits(&logits(&same)), "{name} {format:?}");
            if format == WeightFormat::F32 {
                // The directory loaded for inference gives the same bits; the trainable
                // model (experts [E, K, N], another summation order) the same to rounding.
                let dir = tmp(&format!("{name}-dir"));
                m.save_pretrained(&dir).unwrap();
                let loaded = GPT::from_pretrained_with_weight_dtype(&dir, WeightFormat::F32, &Device::Cpu).unwrap();
                assert_eq!(bits(&logits(&back.gpt)), bits(&logits(&loaded)), "{name}: f32");
                let (a, b) = (logits(&back.gpt), logits(&m));
                let d = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(d < 1e-5, "{name}: f32 GGUF vs the trainable model: {d}");
            }
            // A quantized model written again is the same file.
            if let WeightFormat::Quant(_) = format {
                let again = tmp(&format!("{name}-{}-again.gguf", format.name()));
                gguf::save(&back.gpt, &again, WeightFormat::F32, &GgufExtras::default()).unwrap();
                assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(&path).unwrap(), "{name} {format:?}: rewritten");
            }
        }
    }
}

#[test]
fn quantized_logits_stay_near_f32() {
    for (name, cfg) in configs() {
        let m = GPT::new_seeded(&cfg, 3, &Device::Cpu).unwrap();
        let f = logits(&m);
        let scale = f.iter().fold(0f32, |a, v| a.max(v.abs()));
        for (kind, tol) in [(QKind::Q8_0, 0.02), (QKind::Q4_0, 0.15)] {
            let q = logits(&GPT::new_seeded(&cfg, 3, &Device::Cpu).unwrap().with_weight_dtype(kind).unwrap());
            let d = f.iter().zip(&q).fold(0f32, |a, (x, y)| a.max((x - y).abs()));
            assert!(d <= tol * scale, "{name} {kind:?}: max logit error {d} of {scale}");
            assert!(d > 0.0, "{name} {kind:?}: quantization changed nothing");
        }
    }
}

#[test]
fn quantized_models_compute_the_loss_and_refuse_training_and_safetensors() {
    let cfg = &configs()[2].1;
    let mut m = GPT::new_seeded(cfg, 3, &Device::Cpu).unwrap().with_weight_dtype(QKind::Q8_0).unwrap();
    let f = GPT::new_seeded(cfg, 3, &Device::Cpu).unwrap();
    let t = Tensor::new(&[[14u32, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 4]], &Device::Cpu).unwrap();
    let (lq, _, _) = m.forward_loss(&ids(), &t).unwrap();
    let (lf, _, _) = f.forward_loss(&ids(), &t).unwrap();
    let (lq, lf) = (lq.unwrap().to_scalar::<f32>().unwrap(), lf.unwrap().to_scalar::<f32>().unwrap());
    assert!((lq - lf).abs() < 0.01 * lf, "{lq} vs {lf}");
    let e = m.save_pretrained(tmp("q-dir")).unwrap_err().to_string();
    assert!(e.starts_with("invalid input: tensor transformer.wte.weight is stored as q8_0: a quantized model is saved as GGUF"), "{e}");
    m.train();
    let e = m.forward(&ids(), Some(&t)).map(|_| ()).unwrap_err().to_string();
    assert!(e.contains("q8_0 weights are for inference only"), "{e}");
    let e = GPT::new_seeded(cfg, 3, &Device::Cpu).unwrap().with_weight_dtype(QKind::Q4_0).unwrap().with_weight_dtype(DType::F32).map(|_| ()).unwrap_err().to_string();
    assert_eq!(e, "invalid input: the weights are stored as q4_0; they cannot be converted to f32");
}

/// A small valid GGUF file's bytes and the offset where its tensor data starts.
fn sample() -> (Vec<u8>, usize) {
    let m = GPT::new_seeded(&configs()[0].1, 3, &Device::Cpu).unwrap();
    let p = tmp("sample.gguf");
    gguf::save(&m, &p, WeightFormat::Quant(QKind::Q8_0), &GgufExtras::default()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let f = gguf::GgufFile::open(&p).unwrap();
    (bytes, f.data_start)
}

fn load_err(bytes: &[u8]) -> String {
    let p = tmp("bad.gguf");
    std::fs::write(&p, bytes).unwrap();
    match gguf::load(&p) {
        Ok(_) => panic!("loaded a broken file"),
        Err(e) => e.to_string().replacen(&format!("{}: ", p.display()), "", 1),
    }
}

/// Position of the first tensor entry's name, and of the u32 type after its dimensions.
fn first_tensor_entry(bytes: &[u8]) -> (usize, usize) {
    let name = b"token_embd.weight";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap();
    let nd = u32::from_le_bytes(bytes[at + name.len()..at + name.len() + 4].try_into().unwrap()) as usize;
    (at - 8, at + name.len() + 4 + 8 * nd)
}

#[test]
fn broken_and_hostile_files_get_clear_errors() {
    let (good, data_start) = sample();
    assert!(gguf::load(&tmp("sample.gguf")).is_ok());
    // Wrong magic.
    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    assert_eq!(load_err(&b), "not a valid GGUF file: wrong magic \"GGML\" (expected \"GGUF\")");
    // Unsupported version.
    let mut b = good.clone();
    b[4..8].copy_from_slice(&7u32.to_le_bytes());
    assert_eq!(load_err(&b), "not a valid GGUF file: unsupported version 7 (nanomoe reads 2 and 3)");
    // Truncated anywhere: in the header, the metadata, the tensor table, the data.
    for cut in [2, 10, 30, 200, data_start - 5, data_start + 100, good.len() - 1] {
        let e = load_err(&good[..cut]);
        assert!(e.starts_with("not a valid GGUF file: truncated") || e.contains("lies past the end of the data"), "cut at {cut}: {e}");
    }
    // Absurd counts are refused before anything is allocated.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(load_err(&b).starts_with("not a valid GGUF file: truncated: 18446744073709551615 tensors"), "{}", load_err(&b));
    // An unknown tensor type.
    let (_, ty_at) = first_tensor_entry(&good);
    let mut b = good.clone();
    b[ty_at..ty_at + 4].copy_from_slice(&14u32.to_le_bytes());
    assert_eq!(load_err(&b), "not a valid GGUF file: tensor token_embd.weight has GGML type 14; nanomoe reads f32, f16, bf16, q8_0 and q4_0");
    // A tensor past the end of the file.
    let mut b = good.clone();
    b[ty_at + 4..ty_at + 12].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let e = load_err(&b);
    assert!(e.starts_with("not a valid GGUF file: tensor token_embd.weight (") && e.contains("lies past the end of the data"), "{e}");
    // Dimensions whose product overflows.
    let mut b = good.clone();
    let (name_at, _) = first_tensor_entry(&good);
    let dims_at = name_at + 8 + "token_embd.weight".len() + 4;
    b[dims_at..dims_at + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
    b[dims_at + 8..dims_at + 16].copy_from_slice(&(1u64 << 62).to_le_bytes());
    let e = load_err(&b);
    assert!(e.starts_with("not a valid GGUF file: tensor token_embd.weight of q8_0"), "{e}");
    // Too many dimensions.
    let mut b = good.clone();
    b[dims_at - 4..dims_at].copy_from_slice(&9u32.to_le_bytes());
    assert_eq!(load_err(&b), "not a valid GGUF file: tensor token_embd.weight has 9 dimensions (1 to 4 allowed)");
    // An architecture nanomoe does not run.
    let arch = b"gpt2";
    let at = good.windows(arch.len()).position(|w| w == arch).unwrap();
    let mut b = good.clone();
    b[at..at + 4].copy_from_slice(b"bert");
    assert_eq!(load_err(&b), "architecture \"bert\" is not one nanomoe runs (gpt2, nanomoe)");
}

#[test]
fn the_chat_template_travels_in_the_file() {
    let m = GPT::new_seeded(&configs()[0].1, 3, &Device::Cpu).unwrap();
    let template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{{ eos_token }}{% endfor %}<|assistant|>";
    let path = tmp("chat.gguf");
    gguf::save(&m, &path, WeightFormat::F32, &GgufExtras { chat_template: Some(template), eos_token_id: Some(5), ..Default::default() }).unwrap();
    let chat = nanomoe::serve::ChatTemplate::from_gguf(&path).unwrap();
    assert_eq!(chat.source, template);
    assert!(chat.from_tokenizer);
    let msgs = [serde_json::json!({"role": "user", "content": "hi"})];
    // No tokenizer.ggml.tokens here: the eos token renders empty.
    assert_eq!(chat.render(&msgs).unwrap(), "<|user|>hi<|assistant|>");
    // Without one, the documented plain template.
    let plain = tmp("plain.gguf");
    gguf::save(&m, &plain, WeightFormat::F32, &GgufExtras::default()).unwrap();
    assert!(!nanomoe::serve::ChatTemplate::from_gguf(&plain).unwrap().from_tokenizer);
}
