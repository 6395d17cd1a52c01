//! Bad input gets a clear error naming the problem: library and command line.

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use nanomoe::checkpoint::{write_safetensors, SaveDType};
use nanomoe::{AutoModelForCausalLM, GPTConfig, GPT};

fn cfg() -> GPTConfig {
    GPTConfig { block_size: 8, vocab_size: 20, n_layer: 1, n_head: 2, n_embd: 8, ..Default::default() }
}

fn saved(dir: &Path, c: &GPTConfig) {
    GPT::new_seeded(c, 1, &Device::Cpu).unwrap().save_pretrained(dir).unwrap();
}

fn err(dir: &Path) -> String {
    match AutoModelForCausalLM::from_pretrained(dir) {
        Ok(_) => panic!("loaded {}", dir.display()),
        Err(e) => e.to_string(),
    }
}

/// Rewrites model.safetensors through `edit` on its (name, tensor) list.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut ts: Vec<(String, Tensor)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, Tensor::from_raw_buffer(v.data(), DType::F32, v.shape(), &Device::Cpu).unwrap()))
        .collect();
    edit(&mut ts);
    write_safetensors(&path, &ts, SaveDType::F32).unwrap();
}

#[test]
fn checkpoint_errors_name_the_tensor_and_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    let f = d.join("model.safetensors");

    saved(&d, &cfg());
    edit_weights(&d, |ts| ts.retain(|(n, _)| n != "transformer.h.0.ln_2.bias"));
    assert_eq!(err(&d), format!("{}: missing tensor transformer.h.0.ln_2.bias (expected shape [8])", d.display()));

    saved(&d, &cfg());
    edit_weights(&d, |ts| ts.push(("transformer.h.7.mlp.c_fc.weight".into(), Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap())));
    assert_eq!(err(&d), format!("{}: unexpected tensor transformer.h.7.mlp.c_fc.weight (shape [2, 2]) not used by this config", f.display()));

    saved(&d, &cfg());
    edit_weights(&d, |ts| {
        for (n, t) in ts.iter_mut() {
            if n == "transformer.wpe.weight" {
                *t = Tensor::zeros((4, 8), DType::F32, &Device::Cpu).unwrap();
            }
        }
    });
    assert_eq!(err(&d), format!("{}: tensor transformer.wpe.weight has shape [4, 8], expected [8, 8]", f.display()));

    // Truncated file.
    saved(&d, &cfg());
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    assert!(err(&d).starts_with(&format!("{}: not a valid safetensors file:", f.display())), "{}", err(&d));
    std::fs::write(&f, b"abc").unwrap();
    assert!(err(&d).starts_with(&format!("{}: not a valid safetensors file:", f.display())));

    // Untied lm_head.
    saved(&d, &cfg());
    edit_weights(&d, |ts| ts.push(("lm_head.weight".into(), Tensor::ones((20, 8), DType::F32, &Device::Cpu).unwrap())));
    assert_eq!(err(&d), format!("{}: lm_head.weight differs from transformer.wte.weight; untied output embeddings are not supported", d.display()));
    // The inference load compares it with the packed embedding: one element off is enough.
    saved(&d, &cfg());
    edit_weights(&d, |ts| {
        let wte = ts.iter().find(|(n, _)| n == "transformer.wte.weight").unwrap().1.clone();
        let mut v: Vec<f32> = wte.flatten_all().unwrap().to_vec1().unwrap();
        v[8 * 13 + 5] += 1e-3;
        ts.push(("lm_head.weight".into(), Tensor::from_vec(v, (20, 8), &Device::Cpu).unwrap()));
    });
    for dtype in [DType::F32, DType::BF16] {
        let e = GPT::from_pretrained_with_weight_dtype(&d, dtype, &Device::Cpu).map(|_| ()).unwrap_err().to_string();
        assert_eq!(e, format!("{}: lm_head.weight differs from transformer.wte.weight; untied output embeddings are not supported", d.display()));
    }

    // A tied lm_head equal to wte, keys without the transformer. prefix, and attn.bias buffers load.
    saved(&d, &cfg());
    edit_weights(&d, |ts| {
        let wte = ts.iter().find(|(n, _)| n == "transformer.wte.weight").unwrap().1.clone();
        for (n, _) in ts.iter_mut() {
            *n = n.trim_start_matches("transformer.").to_string();
        }
        ts.push(("lm_head.weight".into(), wte));
        ts.push(("h.0.attn.bias".into(), Tensor::ones((1, 1, 8, 8), DType::F32, &Device::Cpu).unwrap()));
    });
    AutoModelForCausalLM::from_pretrained(&d).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let trainable = GPT::from_pretrained(&d).unwrap().forward(&ids, None).unwrap().logits;
    let packed = GPT::from_pretrained_with_weight_dtype(&d, DType::F32, &Device::Cpu).unwrap().forward(&ids, None).unwrap().logits;
    let diff = (trainable - packed).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(diff < 1e-5, "the tied model loaded for inference differs by {diff}");
}

#[test]
fn config_and_directory_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    saved(&d, &cfg());
    std::fs::write(d.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    assert_eq!(err(&d), "unknown model_type \"llama\"; supported model types: gpt2, nanomoe_gpt");
    std::fs::write(d.join("config.json"), "{not json").unwrap();
    assert!(err(&d).starts_with(&format!("{}: not valid JSON", d.join("config.json").display())));
    let arch = "norm_type, layer_norm_epsilon, qk_norm, activation_function, expert_mlp, moe_placement";
    let cases = [
        (r#"{"model_type": "nanomoe_gpt", "activation_function": "gelu", "n_exp": 4, "moe_top_k": 9}"#, "moe_top_k (9) must be between 1 and n_exp (4)".to_string()),
        // Which architecture a nanomoe_gpt config describes is never guessed.
        (
            r#"{"model_type": "nanomoe_gpt", "n_exp": 4}"#,
            format!("config.json does not say which architecture it is: it has none of nanomoe's {arch} and none of askerlee/nanoMoE's use_qwen3_moe_mlp, moe_start_layer, use_router_ortho_loss, use_experts_ortho_loss, use_gate_output_loss, router_ortho_loss_weight, router_ortho_neg_corr_weight, experts_ortho_loss_weight, gate_output_loss_weight"),
        ),
        (
            r#"{"model_type": "nanomoe_gpt", "n_exp": 4, "norm_type": "rmsnorm"}"#,
            format!("ambiguous architecture: config.json sets norm_type but not layer_norm_epsilon, qk_norm, activation_function, expert_mlp, moe_placement; state all of {arch}"),
        ),
        (
            r#"{"model_type": "nanomoe_gpt", "n_exp": 4, "activation_function": "gelu", "use_qwen3_moe_mlp": true}"#,
            format!("ambiguous architecture: config.json has nanomoe's activation_function and askerlee/nanoMoE's use_qwen3_moe_mlp; state all of {arch}"),
        ),
        // A key that may change the computation and that nanomoe does not implement.
        (
            r#"{"model_type": "nanomoe_gpt", "n_exp": 4, "moe_start_layer": 0, "rope_theta": 10000.0}"#,
            "unknown config key \"rope_theta\": nanomoe does not implement it and it may change the model's computation".to_string(),
        ),
    ];
    for (json, msg) in cases {
        std::fs::write(d.join("config.json"), json).unwrap();
        assert_eq!(err(&d), format!("{}: invalid config: {msg}", d.join("config.json").display()), "{json}");
    }
    std::fs::remove_file(d.join("config.json")).unwrap();
    assert_eq!(err(&d), format!("{}: no config.json: not a model directory", d.join("config.json").display()));
    let missing = tmp.path().join("nope/deeper");
    assert_eq!(err(&missing), format!("{}: no such directory, and not a Hub repo id (owner/name, or gpt2, gpt2-medium, gpt2-large, gpt2-xl)", missing.display()));

    saved(&d, &cfg());
    std::fs::remove_file(d.join("model.safetensors")).unwrap();
    assert_eq!(err(&d), format!("{}: no model.safetensors or model.safetensors.index.json", d.display()));
}

#[test]
fn forward_input_errors() {
    let m = GPT::new(&cfg(), &Device::Cpu).unwrap();
    let long = Tensor::zeros((1, 9), DType::U32, &Device::Cpu).unwrap();
    assert_eq!(m.forward(&long, None).err().unwrap().to_string(), "invalid input: sequence length 9 exceeds block_size 8 of this model");
    let bad = Tensor::new(&[[1u32, 20]], &Device::Cpu).unwrap();
    assert_eq!(m.forward(&bad, None).err().unwrap().to_string(), "invalid input: token id 20 is out of range for vocab_size 20");
    let neg = Tensor::new(&[[1i64, -3]], &Device::Cpu).unwrap();
    assert_eq!(m.forward(&neg, None).err().unwrap().to_string(), "invalid input: token id -3 is out of range for vocab_size 20");
    let ok = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
    let badlab = Tensor::new(&[[1i64, -5, 3]], &Device::Cpu).unwrap();
    assert_eq!(
        m.forward(&ok, Some(&badlab)).err().unwrap().to_string(),
        "invalid input: label -5 is out of range for vocab_size 20 (use -100 to ignore a position)"
    );
    let shape = Tensor::new(&[[1i64, 2]], &Device::Cpu).unwrap();
    assert_eq!(m.forward(&ok, Some(&shape)).err().unwrap().to_string(), "invalid input: labels must have the same shape as input_ids");
    let float = Tensor::new(&[[1f32, 2.]], &Device::Cpu).unwrap();
    assert_eq!(m.forward(&float, None).err().unwrap().to_string(), "invalid input: input ids must be an integer tensor, got F32");
    let gen = nanomoe::GenerationConfig::greedy(3);
    assert_eq!(m.generate(&bad, &gen).err().unwrap().to_string(), "invalid input: token id 20 is out of range for vocab_size 20");
    assert_eq!(
        GPT::from_pretrained_gpt2("gpt3").err().unwrap().to_string(),
        "invalid input: unknown GPT-2 model \"gpt3\"; choose one of gpt2, gpt2-medium, gpt2-large, gpt2-xl"
    );
}

fn cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_nanomoe")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).to_string(), String::from_utf8_lossy(&out.stderr).to_string())
}

#[test]
fn cli_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    let ds = d.to_str().unwrap();
    let (code, out, _) = cli(&["new", "--config", r#"{"n_layer":1,"n_head":2,"n_embd":8,"vocab_size":20,"block_size":8}"#, "--out", ds]);
    assert_eq!(code, 0);
    assert!(out.contains("saved a gpt2 (dense) model"), "{out}");
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["generate", ds, "--ids", "1,2,x"], "error: --ids: \"x\" is not an integer".into()),
        (vec!["generate", ds, "--ids", "1,25"], "error: token id 25 is out of range for vocab_size 20".into()),
        (vec!["forward", ds, "--ids", "1,2,3,4,5,6,7,8,9"], "error: invalid input: sequence length 9 exceeds block_size 8 of this model".into()),
        (vec!["forward", ds, "--ids", "1,2;3"], "error: --ids: all rows must have the same length".into()),
        (vec!["forward", ds, "--ids", "1,2", "--labels", "1"], "error: --labels has shape [1, 1] but --ids has shape [1, 2]".into()),
        (vec!["new", "--config", r#"{"n_embd": 10, "n_head": 3}"#, "--out", ds], "error: invalid config: n_embd (10) must be divisible by n_head (3)".into()),
        (vec!["new", "--config", "/does/not/exist.json", "--out", ds], "error: cannot read config file /does/not/exist.json: No such file or directory (os error 2)".into()),
        (vec!["info", "/does/not/exist"], "error: /does/not/exist: no such directory, and not a Hub repo id (owner/name, or gpt2, gpt2-medium, gpt2-large, gpt2-xl)".into()),
        (vec!["generate", ds, "--ids", "1", "--top-p", "2"], "error: invalid input: top_p must be in (0, 1], got 2".into()),
        (vec!["generate", ds, "--ids", "1", "--frobnicate"], "error: unexpected argument '--frobnicate' found".into()),
        (vec!["new", "--config", "{}", "--out", ds, "--dtype", "f8"], "error: invalid input: unknown dtype \"f8\" (use f32, f16 or bf16)".into()),
        (vec!["prepare", "--dataset", "wikitext", "--out", ds], "error: unknown dataset \"wikitext\" (known: shakespeare)".into()),
        (vec!["generate", ds, "--ids", "1", "--weight-dtype", "q5_1"], "error: --weight-dtype must be one of f32, bf16, f16, q8_0 or q4_0, got 'q5_1'".into()),
        (vec!["train", "--weight-dtype", "bf16"], "error: --weight-dtype bf16 is for inference commands; training keeps f32 weights".into()),
    ];
    for (args, msg) in cases {
        let (code, _, err) = cli(&args);
        assert_ne!(code, 0, "{args:?}");
        assert_eq!(err.trim_end(), msg, "{args:?}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}");
    }
    // A failed `new` left the earlier model intact.
    assert!(GPT::from_pretrained(&d).is_ok());
}

/// Sizes no machine can hold are refused before anything is allocated, naming the need.
#[test]
fn cli_absurd_sizes_are_refused_before_allocating() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    let ds = d.to_str().unwrap();
    assert_eq!(cli(&["new", "--config", r#"{"n_layer":1,"n_head":2,"n_embd":8,"vocab_size":64,"block_size":8}"#, "--out", ds]).0, 0);
    // The built-in corpora evaluate as train makes them.
    let (code, out, err) = cli(&["eval", ds, "--data", "builtin:grammar", "--iters", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.starts_with("val loss "), "{out}");
    let cores = std::thread::available_parallelism().unwrap().get();
    let out_dir = tmp.path().join("t");
    let o = format!("--out_dir={}", out_dir.display());
    let cases: Vec<(Vec<&str>, String)> = vec![
        (vec!["--threads", "100000", "info", ds], format!("error: invalid config: --threads 100000 is more than 4 per core (this machine has {cores} cores; at most {})", 4 * cores)),
        (vec!["eval", ds, "--data", "builtin:grammar", "--batch-size", "1000000000000"], "error: invalid config: evaluating batches of 1000000000000 x block_size 8 needs at least 3.1 PB of memory but this machine has ".into()),
        (vec!["train", "--batch_size=1000000000000", "--max_iters=1", &o], "error: invalid config: training 1582720 parameters with batch_size 1000000000000 x block_size 32 x gradient_accumulation_steps 1 needs at least 1.1 EB of memory".into()),
        (vec!["train", "--gradient_accumulation_steps=4611686018427387904", "--max_iters=1", &o], "error: invalid config: training 1582720 parameters with batch_size 64 x block_size 32 x gradient_accumulation_steps 4611686018427387904 needs at least 2^76 B of memory".into()),
        (vec!["train", "--n_layer=1000000000", "--max_iters=1", &o], "error: invalid config: n_layer 1000000000, n_embd 128, n_exp 4, vocab_size 28, block_size 32 describe a model of 393728000007808 parameters".into()),
        (vec!["new", "--config", r#"{"n_embd": 4611686018427387904, "n_head": 1}"#, "--out", ds], "error: invalid config: n_layer 12, n_embd 4611686018427387904, n_exp 1, vocab_size 50304, block_size 1024 describe a model of more parameters than a 128-bit count holds".into()),
        (vec!["tokenize"], "error: nothing to do: give --text TEXT, --decode IDS or --save DIR (see nanomoe tokenize --help)".into()),
    ];
    for (args, msg) in cases {
        let (code, _, err) = cli(&args);
        assert_ne!(code, 0, "{args:?}");
        assert!(err.starts_with(&msg), "{args:?}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{args:?}");
    }
    assert!(!out_dir.join("model").exists());
    // A config.json that claims more parameters than its weight files hold.
    let cfg = d.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    v["n_layer"] = 10000.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let (_, _, err) = cli(&["info", ds]);
    assert_eq!(err.trim_end(), format!("error: {ds}: config.json describes 8720592 parameters (at least 17441184 bytes in 16-bit) but the weight files hold 7288 bytes"));
    v["n_layer"] = 100000.into();
    std::fs::write(&cfg, v.to_string()).unwrap();
    let (_, _, err) = cli(&["generate", ds, "--ids", "1"]);
    assert!(err.starts_with(&format!("error: {}: invalid config: n_layer 100000, n_embd 8, n_exp 1, vocab_size 64, block_size 8 describe a model of 1200004 tensors", cfg.display())), "{err}");
}

#[test]
fn cli_forward_and_generate_outputs() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("m");
    let ds = d.to_str().unwrap();
    let conf = r#"{"n_layer":2,"n_head":2,"n_embd":8,"vocab_size":20,"block_size":16,"n_exp":4,"stride":1,"use_aux_loss":true}"#;
    assert_eq!(cli(&["new", "--config", conf, "--out", ds, "--seed", "3"]).0, 0);
    let lp = tmp.path().join("logits.safetensors");
    let (code, out, err) = cli(&["forward", ds, "--ids", "1,2,3;4,5,6", "--labels", "1,2,-100;4,5,6", "--out", lp.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    // The CLI loads for inference: experts in the inference layout ([E, N, K]), whose
    // products sum in another order than the training layout's - the same numbers to
    // rounding, and exactly those of the library's inference loader.
    let m = GPT::from_pretrained_with_weight_dtype(&d, DType::F32, &Device::Cpu).unwrap();
    let trainable = GPT::from_pretrained(&d).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3], [4, 5, 6]], &Device::Cpu).unwrap();
    let labels = Tensor::new(&[[1i64, 2, -100], [4, 5, 6]], &Device::Cpu).unwrap();
    let o = m.forward(&ids, Some(&labels)).unwrap();
    let loss = o.loss.unwrap().to_scalar::<f32>().unwrap() as f64;
    let t = trainable.forward(&ids, Some(&labels)).unwrap();
    assert!((t.loss.unwrap().to_scalar::<f32>().unwrap() as f64 - loss).abs() < 1e-5);
    assert!((t.logits - &o.logits).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap() < 1e-5);
    assert!((v["loss"].as_f64().unwrap() - loss).abs() < 1e-6);
    assert!(v["losses"]["aux_loss"].as_f64().unwrap() > 0.0);
    assert!(v["losses"]["router_z_loss"].as_f64().is_some());
    let bytes = std::fs::read(&lp).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor("logits").unwrap();
    assert_eq!(t.shape(), &[2, 3, 20]);
    let file = Tensor::from_raw_buffer(t.data(), DType::F32, t.shape(), &Device::Cpu).unwrap();
    assert_eq!((file - &o.logits).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap(), 0.0);

    let (code, out, _) = cli(&["generate", ds, "--ids", "1,2,3", "--greedy", "--max-new-tokens", "5", "--json", "--ignore-eos"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    let expect = m.generate(&Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap(), &nanomoe::GenerationConfig::greedy(5)).unwrap();
    let got: Vec<u32> = v["ids"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert_eq!(got, expect[0][3..].to_vec());

    let (code, out, _) = cli(&["info", ds, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["model_type"], "nanomoe_gpt");
    assert_eq!(v["parameters"].as_u64().unwrap() as usize, m.num_params());
    assert_eq!(v["active_parameters"].as_u64().unwrap() as usize, m.num_active_params());
}

/// A torch.save zip holding `pickle` as its data.pkl (and `extra` entries).
fn torch_zip(path: &std::path::Path, pickle: &[u8], extra: &[(&str, &[u8])]) {
    use std::io::Write;
    let mut z = zip::ZipWriter::new(std::fs::File::create(path).unwrap());
    let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    z.start_file("archive/data.pkl", opts).unwrap();
    z.write_all(pickle).unwrap();
    for (name, bytes) in extra {
        z.start_file(*name, opts).unwrap();
        z.write_all(bytes).unwrap();
    }
    z.finish().unwrap();
}

/// Hostile ckpt.pt files: each is refused with one line naming the problem, quickly and
/// without memory growth (billion laughs, deep nesting, lengths beyond the file, short
/// tensor argument tuples, tensors beyond their storage) and nothing is written.
#[test]
fn cli_hostile_pickles_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("ckpt.pt");
    let out = tmp.path().join("out");
    let mut laughs = b"\x80\x02]q\x00K\x01a".to_vec();
    for _ in 0..60 {
        laughs.extend(b"h\x00h\x00\x86q\x00");
    }
    laughs.push(b'.');
    let mut deep = b"\x80\x02".to_vec();
    deep.extend(std::iter::repeat_n(b'(', 100_000));
    deep.push(b'.');
    let mut nested = b"\x80\x02".to_vec();
    nested.extend(std::iter::repeat_n(b']', 1_000_000));
    nested.extend(std::iter::repeat_n(b'a', 999_999));
    nested.push(b'.');
    // {'model_args': {...}, 'model': {'transformer.wte.weight': _rebuild_tensor_v2(storage, 0, (20, 8), (8, 1))}}
    let state = |storage_id: &[u8], size: &[u8]| -> Vec<u8> {
        let mut v = b"\x80\x02}(X\x0a\x00\x00\x00model_args}(X\x07\x00\x00\x00n_layerK\x01X\x06\x00\x00\x00n_headK\x02X\x06\x00\x00\x00n_embdK\x08X\x0a\x00\x00\x00block_sizeK\x08X\x0a\x00\x00\x00vocab_sizeK\x14uX\x05\x00\x00\x00model}(X\x16\x00\x00\x00transformer.wte.weightctorch._utils\n_rebuild_tensor_v2\n(".to_vec();
        v.extend(storage_id);
        v.extend(b"QK\x00");
        v.extend(size);
        v.extend(b"K\x08K\x01\x86\x89}tRuu.");
        v
    };
    let storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\xa0t";
    let short_storage = b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nt";
    let cases: Vec<(Vec<u8>, Vec<(&str, Vec<u8>)>, &str)> = vec![
        (laughs, vec![], "unreadable pickle: the pickle ("),
        (deep, vec![], "unreadable pickle: a MARK where a value was expected at byte 100003"),
        (nested, vec![], "unreadable pickle: values nest deeper than 64 levels"),
        (b"\x80\x02X\xff\xff\xff\x7f.".to_vec(), vec![], "unreadable pickle: a length of 2147483647 bytes at byte 7 exceeds the 1 that remain"),
        (b"\x80\x02cbuiltins\neval\n.".to_vec(), vec![], "refusing to load: the pickle references builtins.eval, which is neither a tensor nor a plain value"),
        (state(short_storage, b"K\x14K\x08\x86"), vec![], "tensor transformer.wte.weight: the storage id is not ('storage', class, key, location, numel): 2 items"),
        (state(storage, b"K\x14K\x08\x86"), vec![("archive/data/0", vec![0u8; 16]), ("archive/data/1", vec![0u8; 4096])], "tensor transformer.wte.weight: storage archive/data/0 holds 16 bytes, the tensor needs 640"),
        (state(storage, b"J\x00\x00\x00\x40J\x00\x00\x00\x40\x86"), vec![("archive/data/1", vec![0u8; 4096])], "tensor transformer.wte.weight has shape [1073741824, 1073741824], expected [20, 8]"),
    ];
    for (pickle, extra, msg) in cases {
        let extra: Vec<(&str, &[u8])> = extra.iter().map(|(n, b)| (*n, b.as_slice())).collect();
        torch_zip(&p, &pickle, &extra);
        let (code, _, err) = cli(&["convert", p.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        assert_ne!(code, 0);
        assert!(err.starts_with(&format!("error: {}: {msg}", p.display())), "{msg}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{err}");
        assert!(!out.exists());
    }
}
