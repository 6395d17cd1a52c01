//! Distributed training under `mpirun -np 2` on this one machine (built with the `mpi`
//! feature; skipped with a message when mpirun is not installed): data parallel equals
//! gradient accumulation in one process, expert parallel equals one process holding every
//! expert (with tokens dropped by capacity), runs resume on another process count, and a
//! rank that dies or hangs ends the job, leaving a state that resumes.
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mpirun() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).map(|d| d.join("mpirun")).find(|p| p.is_file())
}

macro_rules! need_mpirun {
    () => {
        match mpirun() {
            Some(m) => m,
            None => {
                eprintln!("SKIPPED: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
                return;
            }
        }
    };
}

const BIN: &str = env!("CARGO_BIN_EXE_nanomoe");

/// A small MoE on the built-in grammar corpus, one thread per process, every step logged.
fn base_args(out: &Path) -> Vec<String> {
    [
        "--eval_interval=5",
        "--eval_iters=4",
        "--log_interval=1",
        "--batch_size=8",
        "--threads=1",
        "--collective_timeout=20",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([format!("--out_dir={}", out.display())])
    .collect()
}

fn command(np: usize, args: &[String]) -> Command {
    let mut c = if np == 1 {
        Command::new(BIN)
    } else {
        let mut c = Command::new(mpirun().expect("mpirun"));
        c.args(["--allow-run-as-root", "--oversubscribe", "-np", &np.to_string(), BIN]);
        c
    };
    c.arg("train").args(args).env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
    c
}

fn train(np: usize, args: &[String]) -> Output {
    let out = command(np, args).output().expect("runs");
    assert!(
        out.status.success(),
        "{np} process(es) failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn with(mut args: Vec<String>, more: &[&str]) -> Vec<String> {
    args.extend(more.iter().map(|s| s.to_string()));
    args
}

/// (iter, loss) of every logged step and the val losses of every eval.
fn metrics(dir: &Path) -> (Vec<(u64, f64)>, Vec<(u64, f64, f64)>) {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    let (mut steps, mut evals) = (Vec::new(), Vec::new());
    for line in text.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let iter = v["iter"].as_u64().unwrap();
        if let Some(l) = v.get("loss") {
            steps.push((iter, l.as_f64().unwrap()));
        }
        if let Some(l) = v.get("val_loss") {
            let drop = v["moe"].as_array().map(|a| a.iter().map(|l| l["drop_rate"].as_f64().unwrap()).sum::<f64>()).unwrap_or(0.0);
            // (A resumed run evaluates its first step again.)
            evals.retain(|e: &(u64, f64, f64)| e.0 != iter);
            evals.push((iter, l.as_f64().unwrap(), drop));
        }
    }
    (steps, evals)
}

fn weights(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            let f = v.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            (n, v.shape().to_vec(), f)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Losses of every step and eval, and the final weights, within `tol`.
fn assert_same_run(a: &Path, b: &Path, tol: f64) {
    let (sa, ea) = metrics(a);
    let (sb, eb) = metrics(b);
    assert_eq!(sa.len(), sb.len(), "logged steps differ");
    for ((i, x), (j, y)) in sa.iter().zip(&sb) {
        assert_eq!(i, j);
        assert!((x - y).abs() <= tol, "step {i}: loss {x} vs {y}");
    }
    assert_eq!(ea.len(), eb.len(), "evals differ");
    for ((i, x, dx), (_, y, dy)) in ea.iter().zip(&eb) {
        assert!((x - y).abs() <= tol, "eval at {i}: val loss {x} vs {y}");
        assert!((dx - dy).abs() <= 1e-9, "eval at {i}: drop rates {dx} vs {dy}");
    }
    let (wa, wb) = (weights(&a.join("model")), weights(&b.join("model")));
    assert_eq!(wa.len(), wb.len());
    for ((n, sa, xa), (m, sb, xb)) in wa.iter().zip(&wb) {
        assert_eq!((n, sa), (m, sb));
        let d = xa.iter().zip(xb).map(|(p, q)| (p - q).abs()).fold(0f32, f32::max);
        assert!(d as f64 <= tol, "{n}: weights differ by {d}");
    }
}

#[test]
fn data_parallel_equals_gradient_accumulation() {
    let _ = need_mpirun!();
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    let extra = ["--max_iters=10", "--gradient_accumulation_steps=2", "--dropout=0.1", "--bias=true"];
    train(1, &with(base_args(&one), &extra));
    let out = train(2, &with(base_args(&two), &extra));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("data parallel over 2 processes: 1 micro batches each per step"), "{text}");
    assert_same_run(&one, &two, 1e-5);
    // The experts' all-reduces started during the backward pass, with two micro batches
    // per process (the earlier one's gradient added at the start).
    let (one, two) = (tmp.path().join("one-4"), tmp.path().join("two-4"));
    let extra = ["--max_iters=6", "--gradient_accumulation_steps=4", "--batch_size=4", "--dropout=0.1"];
    train(1, &with(base_args(&one), &extra));
    train(2, &with(with(base_args(&two), &extra), &["--overlap_grad_reduce=on"]));
    assert_same_run(&one, &two, 1e-5);
}

fn ep_args(out: &Path) -> Vec<String> {
    with(
        base_args(out),
        &["--n_exp=8", "--train_capacity=0.5", "--eval_capacity=0.5", "--min_capacity=1", "--expert_parallel=true", "--gradient_accumulation_steps=2"],
    )
}

#[test]
fn expert_parallel_equals_one_process_with_every_expert() {
    let _ = need_mpirun!();
    let tmp = tempfile::tempdir().unwrap();
    let (one, two) = (tmp.path().join("one"), tmp.path().join("two"));
    train(1, &with(ep_args(&one), &["--max_iters=10"]));
    let out = train(2, &with(ep_args(&two), &["--max_iters=10"]));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("expert parallel over 2 processes: each holds 4 of every MoE layer's 8 experts and takes 4 rows of every micro batch"), "{text}");
    // Capacity drops tokens, the same ones on both sides.
    let (_, evals) = metrics(&two);
    assert!(evals.iter().all(|e| e.2 > 0.1), "expected tokens dropped by capacity: {evals:?}");
    assert_same_run(&one, &two, 1e-5);
    // The saved model holds every expert.
    let w = weights(&two.join("model"));
    let fc = w.iter().find(|(n, _, _)| n == "transformer.h.1.mlp.experts.c_fc").expect("experts saved");
    assert_eq!(fc.1[0], 8);
}

#[test]
fn runs_resume_on_another_process_count() {
    let _ = need_mpirun!();
    let tmp = tempfile::tempdir().unwrap();
    // Expert parallel: 2 processes for 5 steps, then 1 process to step 10.
    let (whole, split) = (tmp.path().join("ep-whole"), tmp.path().join("ep-split"));
    train(1, &with(ep_args(&whole), &["--max_iters=10"]));
    train(2, &with(ep_args(&split), &["--max_iters=5"]));
    let out = train(1, &with(ep_args(&split), &["--max_iters=10", "--init_from=resume"]));
    assert!(String::from_utf8_lossy(&out.stdout).contains("from step 5"));
    assert_same_run(&whole, &split, 1e-5);
    // Data parallel: 1 process for 5 steps, then 2 processes to step 10.
    let (whole, split) = (tmp.path().join("dp-whole"), tmp.path().join("dp-split"));
    let extra = ["--gradient_accumulation_steps=2"];
    train(1, &with(base_args(&whole), &["--max_iters=10", extra[0]]));
    train(1, &with(base_args(&split), &["--max_iters=5", extra[0]]));
    train(2, &with(base_args(&split), &["--max_iters=10", "--init_from=resume", extra[0]]));
    assert_same_run(&whole, &split, 1e-5);
}

/// The pid of rank `rank` among the processes mpirun `parent` started.
fn rank_pid(parent: u32, rank: usize) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { continue };
        let ppid: Option<u32> = stat.rsplit(')').next().and_then(|r| r.split_whitespace().nth(1)).and_then(|p| p.parse().ok());
        if ppid != Some(parent) {
            continue;
        }
        let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        if env.split(|&b| b == 0).any(|v| v == format!("OMPI_COMM_WORLD_RANK={rank}").as_bytes()) {
            return Some(pid);
        }
    }
    None
}

/// Starts a long 2-process run, waits for its first saved state, then does `act` to rank 1;
/// returns the job's exit status, stderr and how long it took to end after `act`.
fn disturb_rank_1(out: &Path, signal: &str) -> (std::process::ExitStatus, String, Duration) {
    let args = with(base_args(out), &["--max_iters=100000", "--always_save_checkpoint=true", "--gradient_accumulation_steps=2", "--collective_timeout=10"]);
    let mut child = command(2, &args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    while !out.join("state").join("latest").is_file() {
        assert!(start.elapsed() < Duration::from_secs(120), "no state written");
        std::thread::sleep(Duration::from_millis(100));
    }
    let pid = rank_pid(child.id(), 1).expect("rank 1's process");
    let t = Instant::now();
    assert!(Command::new("kill").args([signal, &pid.to_string()]).status().unwrap().success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status, err, t.elapsed());
        }
        if t.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            panic!("the job did not end within 90 s of {signal} to rank 1");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn resumes_from_last_state(out: &Path) {
    let latest = std::fs::read_to_string(out.join("state").join("latest")).unwrap();
    let step: u64 = latest.trim().trim_start_matches("step-").parse().unwrap();
    let max_iters = format!("--max_iters={}", step + 5);
    let o = train(1, &with(base_args(out), &["--init_from=resume", "--gradient_accumulation_steps=2", &max_iters]));
    assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("from step {step}")), "{}", String::from_utf8_lossy(&o.stdout));
}

/// `disturb_rank_1` on a fresh run: the job must fail, and its last state resume.
/// Returns the job's stderr and how long it took to end.
fn job_ends_and_resumes(signal: &str) -> (String, Duration) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let (status, err, took) = disturb_rank_1(&out, signal);
    assert!(!status.success());
    resumes_from_last_state(&out);
    (err, took)
}

#[test]
fn a_dead_rank_ends_the_job_and_the_last_state_resumes() {
    let _ = need_mpirun!();
    let (_, took) = job_ends_and_resumes("-KILL");
    assert!(took < Duration::from_secs(30), "took {took:?}");
}

#[test]
fn a_hung_rank_ends_the_job_after_the_collective_timeout() {
    let _ = need_mpirun!();
    let (err, took) = job_ends_and_resumes("-STOP");
    assert!(err.contains("error: rank 0 waited") && err.contains("for the other ranks (collective_timeout 10 s): a rank has died or hangs"), "{err}");
    assert!(took >= Duration::from_secs(9) && took < Duration::from_secs(50), "took {took:?}");
}

#[test]
fn settings_that_cannot_be_shared_out_are_refused() {
    let _ = need_mpirun!();
    let tmp = tempfile::tempdir().unwrap();
    let run = |args: Vec<String>| {
        let o = command(2, &args).output().unwrap();
        assert!(!o.status.success());
        String::from_utf8_lossy(&o.stderr).to_string()
    };
    let err = run(with(base_args(&tmp.path().join("a")), &["--gradient_accumulation_steps=3"]));
    assert!(err.contains("error: invalid config: gradient_accumulation_steps 3 is not a multiple of the 2 processes: each takes an equal share of every step's micro batches"), "{err}");
    let err = run(with(base_args(&tmp.path().join("b")), &["--expert_parallel=true", "--n_exp=3"]));
    assert!(err.contains("error: invalid config: expert_parallel needs n_exp (3) to be a multiple of the 2 processes (each holds n_exp / N experts)"), "{err}");
    let err = run(with(base_args(&tmp.path().join("c")), &["--expert_parallel=true", "--batch_size=7"]));
    assert!(err.contains("error: invalid config: expert_parallel: batch_size 7 is not a multiple of the 2 processes"), "{err}");
}
