//! Training: exact resume (in process and after kill -9), bad input, data preparation.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nanomoe::train::data::Dataset;
use nanomoe::train::prepare::{list_inputs, prepare, PrepareOptions};
use nanomoe::train::{train, Resolved};
use nanomoe::GPT;
mod common;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_nanomoe")
}

/// A tiny MoE run on the built-in corpus.
fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "--n_layer=2",
        "--n_head=2",
        "--n_embd=16",
        "--block_size=16",
        "--batch_size=4",
        "--max_iters=20",
        "--lr_decay_iters=20",
        "--warmup_iters=2",
        "--eval_interval=5",
        "--eval_iters=2",
        "--log_interval=5",
        "--dropout=0.1",
        "--use_noisy_top_k=true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.push(format!("--out_dir={}", out.display()));
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

fn run(out: &Path, extra: &[&str]) -> nanomoe::train::Outcome {
    train(&Resolved::resolve(None, &args(out, extra)).unwrap()).unwrap()
}

fn params(dir: &Path) -> Vec<(String, Vec<f32>)> {
    let m = GPT::from_pretrained(dir).unwrap();
    m.params().iter().map(|(n, v)| (n.to_string(), v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())).collect()
}

/// (iter, loss) of every logged training step in metrics.jsonl.
fn logged_losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()) // a kill can tear the last line
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["iter"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let a = run(&straight, &["--always_save_checkpoint=true"]);
    let split = tmp.path().join("split");
    let first = run(&split, &["--max_iters=10", "--always_save_checkpoint=true"]);
    assert_eq!(first.iters, 10);
    let b = run(&split, &["--init_from=resume", "--always_save_checkpoint=true"]);
    assert_eq!(b.iters, 20);
    let tail: Vec<(u64, f32)> = a.train_losses.iter().filter(|(i, _)| *i > 10).copied().collect();
    assert_eq!(tail, b.train_losses);
    assert_eq!(params(&straight.join("model")), params(&split.join("model")));
    // Only the last keep_last_states (2) states are kept.
    let states: Vec<_> = std::fs::read_dir(straight.join("state")).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("step-")).collect();
    assert_eq!(states.len(), 2);
    // Plots are written as PNG.
    for p in ["loss.png", "experts.png"] {
        let bytes = std::fs::read(straight.join(p)).unwrap();
        assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "{p}");
    }
    // The saved model is an HF directory with the tokenizer.
    assert!(straight.join("model/tokenizer.json").is_file());
    assert!(straight.join("model/config.json").is_file());
}

/// A kill after the last state was written but before the model directories were: they
/// hold an earlier step's weights, and resuming from that state (no step left to train)
/// writes them again from it.
#[test]
fn resuming_after_a_kill_between_the_state_and_the_models_rewrites_the_models() {
    let tmp = tempfile::tempdir().unwrap();
    let done = tmp.path().join("done");
    run(&done, &["--always_save_checkpoint=true"]);
    let earlier = tmp.path().join("earlier");
    run(&earlier, &["--max_iters=10", "--always_save_checkpoint=true"]);
    let want = params(&done.join("model"));
    // The directories as the kill leaves them: the final state, older models.
    for d in ["model", "best"] {
        std::fs::remove_dir_all(done.join(d)).unwrap();
        std::fs::create_dir(done.join(d)).unwrap();
        for f in std::fs::read_dir(earlier.join("model")).unwrap() {
            let f = f.unwrap();
            std::fs::copy(f.path(), done.join(d).join(f.file_name())).unwrap();
        }
    }
    assert_ne!(params(&done.join("model")), want);
    run(&done, &["--init_from=resume", "--always_save_checkpoint=true"]);
    assert_eq!(params(&done.join("model")), want);
}

#[test]
fn out_dir_with_another_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    run(&out, &["--max_iters=5"]);
    let e = train(&Resolved::resolve(None, &args(&out, &["--max_iters=5"])).unwrap()).unwrap_err().to_string();
    assert_eq!(
        e,
        format!("invalid config: out_dir {} holds another run; continue it with --init_from=resume or replace it with --overwrite=true", out.display())
    );
    run(&out, &["--max_iters=5", "--overwrite=true"]);
}

fn cli(args: &[String]) -> (i32, String, String) {
    let o = Command::new(bin()).args(args).output().unwrap();
    (o.status.code().unwrap_or(-1), String::from_utf8_lossy(&o.stdout).into(), String::from_utf8_lossy(&o.stderr).into())
}

#[test]
fn kill_9_during_training_and_checkpoints_then_resume_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["--max_iters=40", "--lr_decay_iters=40", "--eval_interval=2", "--always_save_checkpoint=true"];
    let straight = tmp.path().join("straight");
    let mut a = vec!["train".to_string()];
    a.extend(args(&straight, &extra));
    assert_eq!(cli(&a).0, 0);

    let killed = tmp.path().join("killed");
    let mut a = vec!["train".to_string()];
    a.extend(args(&killed, &extra));
    // Kill at several moments: as soon as a state directory is being written (a temporary
    // directory under state/), and at arbitrary times; resume each time.
    for round in 0..6 {
        let mut cmd = a.clone();
        if killed.join("state/latest").exists() {
            cmd.push("--init_from=resume".into());
        } else {
            cmd.push("--overwrite=true".into()); // killed before its first checkpoint
        }
        let mut child = Command::new(bin()).args(&cmd).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
                assert!(status.success(), "round {round}: {status}: {err}");
                break;
            }
            let writing = std::fs::read_dir(killed.join("state")).map(|d| d.filter_map(|e| e.ok()).any(|e| e.file_name().to_string_lossy().contains(".tmp-"))).unwrap_or(false);
            if (round % 2 == 0 && writing) || (round % 2 == 1 && start.elapsed() > Duration::from_millis(300 + 200 * round as u64)) {
                child.kill().unwrap(); // SIGKILL
                child.wait().unwrap();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let mut resume = a.clone();
    resume.push("--init_from=resume".into());
    let step: u64 = std::fs::read_to_string(killed.join("state/latest")).unwrap().trim().trim_start_matches("step-").parse().unwrap_or(u64::MAX);
    let (code, out, err) = cli(&resume);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("resuming {} from step {step} (", killed.display())), "{out}");
    assert_eq!(params(&straight.join("model")), params(&killed.join("model")));
    // Every logged step's loss equals the straight run's.
    let s: std::collections::BTreeMap<u64, f64> = logged_losses(&straight).into_iter().collect();
    for (i, l) in logged_losses(&killed) {
        assert_eq!(s[&i], l, "step {i}");
    }
}

#[test]
fn a_full_disk_during_a_checkpoint_keeps_the_previous_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let mut a = vec!["train".to_string()];
    a.extend(args(&out, &["--max_iters=5", "--always_save_checkpoint=true"]));
    assert_eq!(cli(&a).0, 0);
    let before = std::fs::read_to_string(out.join("state/latest")).unwrap();
    // Continue with a file-size limit too small for a state: writes fail as on a full disk.
    let mut more = a.clone();
    more.retain(|x| !x.starts_with("--max_iters"));
    more.extend(["--max_iters=10".to_string(), "--init_from=resume".to_string()]);
    let script = format!("trap '' XFSZ; ulimit -f 8; exec {} {}", bin(), more.iter().map(|s| format!("'{s}'")).collect::<Vec<_>>().join(" "));
    let o = Command::new("bash").arg("-c").arg(&script).output().unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("error: ") && err.trim_end().lines().count() == 1, "{err}");
    assert_eq!(std::fs::read_to_string(out.join("state/latest")).unwrap(), before);
    // The previous state still resumes.
    let (code, _, e) = cli(&more);
    assert_eq!(code, 0, "{e}");
}

fn write(p: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn bad_data_gets_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path().join("data");
    let text: String = (0..200).map(|i| format!("line {i} of some text\n")).collect();
    write(&tmp.path().join("in.txt"), text.as_bytes());
    let opts = PrepareOptions { inputs: vec![tmp.path().join("in.txt")], tokenizer: "char".into(), val_fraction: 0.1, out: d.clone(), progress: false, text_column: "text".into() };
    prepare(&opts).unwrap();
    let ds = d.display().to_string();
    let count = std::cell::Cell::new(0);
    let err = |extra: &[&str]| {
        count.set(count.get() + 1);
        let out = tmp.path().join(format!("o{}", count.get()));
        let mut e = vec![format!("--data_dir={ds}")];
        e.extend(extra.iter().map(|s| s.to_string()));
        let e: Vec<&str> = e.iter().map(String::as_str).collect();
        train(&Resolved::resolve(None, &args(&out, &e)).unwrap()).unwrap_err().to_string()
    };
    // block_size larger than the val split
    let val_tokens = Dataset::open(&d).unwrap().meta.val_tokens;
    assert_eq!(err(&["--block_size=900"]), format!("invalid input: val split has {val_tokens} tokens, fewer than block_size + 1 = 901"));
    // odd-sized .bin
    let mut bytes = std::fs::read(d.join("train.bin")).unwrap();
    bytes.push(0);
    write(&d.join("train.bin"), &bytes);
    assert_eq!(err(&[]), format!("{}: size {} bytes is not a multiple of the token width 2", d.join("train.bin").display(), bytes.len()));
    // ids outside the model's vocabulary
    bytes.pop();
    let n = bytes.len();
    bytes[n - 2..].copy_from_slice(&500u16.to_le_bytes());
    write(&d.join("train.bin"), &bytes);
    let e = err(&["--vocab_size=40", "--max_iters=200"]);
    assert!(e.starts_with("invalid input: train split holds token id 500 at position"), "{e}");
    assert!(e.ends_with("outside the model's vocab_size 40"), "{e}");
    // empty .bin
    write(&d.join("train.bin"), b"");
    assert_eq!(err(&[]), format!("{}: is empty", d.join("train.bin").display()));
    // missing data
    let missing = tmp.path().join("nope");
    let e = train(&Resolved::resolve(None, &args(&tmp.path().join("m"), &[&format!("--data_dir={}", missing.display())])).unwrap()).unwrap_err().to_string();
    assert_eq!(e, format!("{}: no such data directory (prepare one with `nanomoe prepare`)", missing.display()));
    // vocabulary of the data larger than the model's
    prepare(&opts).unwrap();
    let e = err(&["--vocab_size=5"]);
    assert_eq!(e, "invalid config: the data's vocabulary (23 tokens) is larger than the model's vocab_size 5");
}

#[test]
fn fine_tuning_checks_block_size_and_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    run(&base, &["--max_iters=3"]);
    let model = base.join("model").display().to_string();
    let ft = tmp.path().join("ft");
    let e = train(&Resolved::resolve(None, &args(&ft, &[&format!("--init_from={model}"), "--block_size=64"])).unwrap()).unwrap_err().to_string();
    assert_eq!(e, "invalid config: block_size 64 is larger than the model's block_size 16");
    // A smaller block_size crops the position embeddings and trains.
    let o = train(&Resolved::resolve(None, &args(&ft, &[&format!("--init_from={model}"), "--block_size=8", "--max_iters=3"])).unwrap()).unwrap();
    assert_eq!(GPT::from_pretrained(o.out_dir.join("model")).unwrap().config.block_size, 8);
    // Data made with another tokenizer is refused.
    let d = tmp.path().join("data");
    write(&tmp.path().join("in.txt"), "abcdefghijklmnopqrstuvwxyz\n".repeat(50).as_bytes());
    prepare(&PrepareOptions { inputs: vec![tmp.path().join("in.txt")], tokenizer: "char".into(), val_fraction: 0.1, out: d.clone(), progress: false, text_column: "text".into() }).unwrap();
    let e = train(&Resolved::resolve(None, &args(&tmp.path().join("ft2"), &[&format!("--init_from={model}"), &format!("--data_dir={}", d.display())])).unwrap()).unwrap_err().to_string();
    assert!(e.starts_with("invalid config: the data's tokenizer (28 tokens) disagrees with the model's in"), "{e}");
}


#[test]
fn prepare_writes_nanogpt_format() {
    let tmp = tempfile::tempdir().unwrap();
    let (text, is_shakespeare) = common::sample_text();
    let input = tmp.path().join("input.txt");
    write(&input, text.as_bytes());
    for tk in ["char", "gpt2"] {
        let d = tmp.path().join(tk);
        let meta = prepare(&PrepareOptions { inputs: vec![input.clone()], tokenizer: tk.into(), val_fraction: 0.1, out: d.clone(), progress: false, text_column: "text".into() }).unwrap();
        assert_eq!(meta.dtype, "uint16");
        let ds = Dataset::open(&d).unwrap();
        let tok = nanomoe::tokenizer::Tokenizer::from_dir(&d).unwrap();
        let ids = |s: &nanomoe::train::data::Split| (0..s.len()).map(|i| s.get(i)).collect::<Vec<u32>>();
        let all = [tok.decode(&ids(&ds.train)).unwrap(), tok.decode(&ids(&ds.val)).unwrap()].concat();
        assert_eq!(all, text, "{tk}");
        let share = ds.val.len() as f64 / (ds.train.len() + ds.val.len()) as f64;
        assert!((share - 0.1).abs() < 0.01, "{tk}: {share}");
        if tk == "char" {
            let mut chars: Vec<char> = text.chars().collect();
            chars.sort_unstable();
            chars.dedup();
            assert_eq!(meta.vocab_size as usize, chars.len() + 1); // the characters + <unk>
            if is_shakespeare {
                assert_eq!(meta.vocab_size, 66);
            }
            assert_eq!(ds.train.len() + ds.val.len(), text.chars().count());
        } else {
            assert_eq!(ds.train.len() + ds.val.len(), tiktoken_rs::r50k_base().unwrap().encode_ordinary(&text).len());
        }
    }
    // A directory of files is read in sorted order.
    let dir = tmp.path().join("in");
    write(&dir.join("b.txt"), b"second file\n");
    write(&dir.join("a.txt"), b"first file\n");
    write(&dir.join("sub/c.txt"), b"third file\n");
    assert_eq!(list_inputs(&dir).unwrap(), vec![dir.join("a.txt"), dir.join("b.txt"), dir.join("sub/c.txt")]);
    let e = prepare(&PrepareOptions { inputs: vec![dir.join("a.txt")], tokenizer: "char".into(), val_fraction: 1.5, out: tmp.path().join("x"), progress: false, text_column: "text".into() }).unwrap_err();
    assert_eq!(e.to_string(), "invalid input: --val-fraction must be in [0, 1), got 1.5");
    write(&dir.join("empty.txt"), b"");
    let e = prepare(&PrepareOptions { inputs: vec![dir.join("empty.txt")], tokenizer: "char".into(), val_fraction: 0.1, out: tmp.path().join("x"), progress: false, text_column: "text".into() }).unwrap_err();
    assert_eq!(e.to_string(), format!("invalid input: the input ({}) has no text", dir.join("empty.txt").display()));
    assert!(!tmp.path().join("x").exists());
}

#[test]
fn presets_parse_and_describe_their_models() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read_to_string(&p).unwrap();
        let name = p.file_stem().unwrap().to_string_lossy().to_string();
        let r = Resolved::resolve(Some((&name, &text)), &[]).unwrap();
        let m = r.model_config(nanomoe::train::settings::default_model(), 50304).unwrap();
        seen.push((name, m.n_layer, m.n_embd, m.n_exp, m.moe_top_k, m.stride));
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("gpt2-124m".to_string(), 12, 768, 1, 2, 1),
            ("nano-moe".to_string(), 6, 384, 8, 2, 2),
            ("shakespeare-char".to_string(), 4, 128, 1, 2, 1),
            ("shakespeare-char-moe".to_string(), 4, 128, 8, 2, 2),
        ]
    );
}

#[test]
fn trained_models_generate_text_from_prompts() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    run(&out, &["--max_iters=5"]);
    let model = out.join("model").display().to_string();
    let (code, stdout, err) = cli(&["generate".into(), model.clone(), "--prompt".into(), "the small".into(), "--max-new-tokens".into(), "12".into(), "--seed".into(), "3".into()]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout.starts_with("the small"), "{stdout}");
    let (code, streamed, _) = cli(&["generate".into(), model.clone(), "--prompt".into(), "the small".into(), "--max-new-tokens".into(), "12".into(), "--seed".into(), "3".into(), "--stream".into()]);
    assert_eq!(code, 0);
    assert_eq!(streamed, stdout, "streamed text equals the printed text");
    let p = tmp.path().join("prompt.txt");
    std::fs::write(&p, "the small").unwrap();
    let (_, from_file, _) = cli(&["generate".into(), model.clone(), "--prompt".into(), format!("FILE:{}", p.display()), "--max-new-tokens".into(), "12".into(), "--seed".into(), "3".into()]);
    assert_eq!(from_file, stdout);
    let (code, json_out, _) = cli(&["generate".into(), model.clone(), "--prompt".into(), "the".into(), "--max-new-tokens".into(), "4".into(), "--seed".into(), "3".into(), "--json".into()]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(json_out.trim()).unwrap();
    let ids: Vec<u32> = v["ids"][0].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
    assert!(!ids.is_empty() && ids.len() <= 4);
    let tok = nanomoe::tokenizer::Tokenizer::from_dir(&out.join("model")).unwrap();
    assert_eq!(tok.decode(&ids).unwrap(), v["text"][0].as_str().unwrap());
    let (code, sample, _) = cli(&["sample".into(), model.clone(), "--num-samples".into(), "2".into(), "--max-new-tokens".into(), "20".into()]);
    assert_eq!(code, 0);
    assert_eq!(sample.matches("---------------").count(), 2);
    // The built-in corpus evaluates as training made it.
    let (code, ev, e) = cli(&["eval".into(), model, "--data".into(), "builtin:grammar".into(), "--iters".into(), "2".into()]);
    assert_eq!(code, 0, "{e}");
    assert!(ev.starts_with("val loss "), "{ev}");
}

#[test]
fn bf16_mixed_precision_tracks_float32_and_bad_dtypes_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let f = run(&tmp.path().join("f32"), &["--dropout=0.0"]);
    let b = run(&tmp.path().join("bf16"), &["--dropout=0.0", "--dtype=bfloat16"]);
    assert_eq!(f.train_losses.len(), b.train_losses.len());
    assert_ne!(f.train_losses, b.train_losses, "dtype=bfloat16 changed nothing");
    for ((i, lf), (j, lb)) in f.train_losses.iter().zip(&b.train_losses) {
        assert_eq!(i, j);
        // bf16 operands carry 8 bits of mantissa: the losses drift apart, slowly.
        assert!((lf - lb).abs() <= 0.02 * lf.abs(), "step {i}: float32 {lf}, bfloat16 {lb}");
    }
    let (fv, bv) = (f.best_val_loss.unwrap(), b.best_val_loss.unwrap());
    assert!((fv - bv).abs() <= 0.02 * fv, "best val loss {fv} against {bv}");
    for (dtype, want) in [
        ("float16", "dtype float16 is not supported for training (it needs loss scaling); use bfloat16 or float32"),
        ("int8", "unknown dtype \"int8\" (expected float32 or bfloat16)"),
    ] {
        let e = Resolved::resolve(None, &args(&tmp.path().join("x"), &[&format!("--dtype={dtype}")])).unwrap_err().to_string();
        assert!(e.contains(want), "{e}");
    }
}
