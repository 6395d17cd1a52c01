//! The fuzz harness: mutates valid inputs of every loader of untrusted files and reports
//! what panicked (a bug), what was slow, and the peak memory.
//!
//!   cargo run --release --example fuzz -- [--seconds 60] [--seed 1] [--target all|config|model|...]
//!
//! Run it under a memory limit (`ulimit -v`, as ./scripts/test does): an input that makes a
//! loader allocate beyond the limit aborts the process, and its files stay in
//! `<work>/<target>/`. Panicking inputs are saved under `--crashes` (default fuzz/crashes);
//! once fixed, move them to fuzz/regressions/<target>/, which `tests/fuzz_regressions.rs`
//! replays.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use nanomoe::fuzz::{mutate::mutate, run_case, seeds, Case, Outcome, Target};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

struct Stats {
    tried: u64,
    loaded: u64,
    refused: u64,
    panics: u64,
    slowest: Duration,
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok()))
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--help" || a == "-h") {
        println!("usage: fuzz [--seconds 60] [--iters N] [--seed 1] [--target all|{}] [--corpus fuzz/corpus] [--crashes fuzz/crashes] [--work DIR]",
            Target::ALL.map(|t| t.name()).join("|"));
        return;
    }
    let seconds: f64 = arg(&args, "--seconds", 60.0);
    let iters: u64 = arg(&args, "--iters", u64::MAX);
    let seed: u64 = arg(&args, "--seed", 1);
    let target: String = arg(&args, "--target", "all".to_string());
    let corpus: PathBuf = arg(&args, "--corpus", PathBuf::from("fuzz/corpus"));
    let crashes: PathBuf = arg(&args, "--crashes", PathBuf::from("fuzz/crashes"));
    let work: PathBuf = arg(&args, "--work", std::env::temp_dir().join(format!("nanomoe-fuzz-{}", std::process::id())));
    let targets: Vec<Target> = if target == "all" {
        Target::ALL.to_vec()
    } else {
        match Target::parse(&target) {
            Some(t) => vec![t],
            None => {
                eprintln!("unknown target {target:?}");
                std::process::exit(2);
            }
        }
    };
    nanomoe::runtime::set_threads(1).expect("one thread");
    let mut all: Vec<(Target, Vec<Case>, Stats)> = Vec::new();
    for &t in &targets {
        let s = seeds(t, &corpus, &work.join("seeds")).unwrap_or_else(|e| panic!("seeds of {}: {e}", t.name()));
        // Every seed must load: otherwise the harness would only test error paths.
        for (i, case) in s.iter().enumerate() {
            match run_case(t, case, &work.join(t.name())) {
                Ok(Outcome::Loaded) => {}
                other => panic!("seed {i} of {} does not load: {other:?}", t.name()),
            }
        }
        if s.is_empty() {
            eprintln!("{}: no seeds (put case directories in {})", t.name(), corpus.join(t.name()).display());
            continue;
        }
        all.push((t, s, Stats { tried: 0, loaded: 0, refused: 0, panics: 0, slowest: Duration::ZERO }));
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed().as_secs_f64() < seconds && n < iters {
        let k = (n as usize) % all.len();
        n += 1;
        let (t, seeds, stats) = &mut all[k];
        let mut case = seeds[rng.random_range(0..seeds.len())].clone();
        // One to three mutations, each of one file.
        for _ in 0..rng.random_range(1..=3) {
            let f = rng.random_range(0..case.len());
            case[f].1 = mutate(&case[f].1, &mut rng);
        }
        let t0 = Instant::now();
        let r = run_case(*t, &case, &work.join(t.name()));
        let took = t0.elapsed();
        stats.tried += 1;
        stats.slowest = stats.slowest.max(took);
        if took > Duration::from_secs(5) {
            eprintln!("slow: {} case {} took {:.1} s", t.name(), stats.tried, took.as_secs_f64());
        }
        match r {
            Ok(Outcome::Loaded) => stats.loaded += 1,
            Ok(Outcome::Refused(_)) => stats.refused += 1,
            Err(msg) => {
                stats.panics += 1;
                let dir = crashes.join(format!("{}-{seed}-{n}", t.name()));
                let _ = nanomoe::fuzz::write_case(&case, &dir);
                eprintln!("PANIC in {}: {msg} (case saved to {})", t.name(), dir.display());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    println!("{:<10} {:>8} {:>8} {:>8} {:>7} {:>10}", "target", "inputs", "loaded", "refused", "panics", "slowest");
    let mut total = (0, 0);
    for (t, _, s) in &all {
        println!("{:<10} {:>8} {:>8} {:>8} {:>7} {:>8.0}ms", t.name(), s.tried, s.loaded, s.refused, s.panics, s.slowest.as_secs_f64() * 1e3);
        total.0 += s.tried;
        total.1 += s.panics;
    }
    println!("{} inputs in {:.0} s (seed {seed}), {} panics, peak memory {:.0} MB", total.0, start.elapsed().as_secs_f64(), total.1, peak_rss_mb());
    if total.1 > 0 {
        std::process::exit(1);
    }
}
