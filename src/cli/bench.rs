//! `nanomoe bench`: our side of the benchmarks. `bench/bench.py` runs these next to the
//! PyTorch / transformers reference on the same weights and inputs and prints ratios.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Subcommand;
use serde_json::json;

use nanomoe::grad_sink::GradSink;
use nanomoe::moe::{MoeCtx, MoeLayer, Routing};
use nanomoe::optim::{AdamW, AdamWConfig};
use nanomoe::params::{param_specs, ParamStore};
use nanomoe::train_step::train_step;
use nanomoe::{GPTConfig, GenerationConfig, GPT};

#[derive(Subcommand)]
pub enum Bench {
    /// Training steps (forward, backward, AdamW) on the batches of an inputs file.
    Train {
        /// A model directory (its weights are the starting point of every run).
        model: PathBuf,
        /// safetensors with int64 `x` and `y` of shape [steps, batch, block].
        #[arg(long)]
        inputs: PathBuf,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// The products' precision: float32, or bfloat16 (mixed precision, as `train --dtype`).
        #[arg(long, default_value = "float32")]
        dtype: String,
    },
    /// Greedy decoding of `new_tokens` tokens from a one-token prompt (with --batch B, B
    /// sequences decoded together, B tokens per step; with --packed as well, each with its
    /// own KV cache in packed passes: what `serve` runs with B clients).
    Decode {
        /// A model directory or Hub repo id.
        model: PathBuf,
        /// Tokens to generate per run (per sequence).
        #[arg(long, default_value_t = 128, value_parser = at_least_one)]
        new_tokens: usize,
        /// Sequences decoded together (each from a different one-token prompt; at most 4096).
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Decode the batch as `serve` does: one KV cache per sequence, passes of at most
        /// 32 rows (`GPT::forward_packed`), each row's next token picked as serve picks it
        /// (instead of one [B, T] batch through `generate`).
        #[arg(long)]
        packed: bool,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = at_least_one)]
        repeats: usize,
    },
    /// One forward pass over `tokens` tokens (batch 1), into a fresh KV cache, logits of the
    /// last position only (what a prompt costs before generation).
    Prefill {
        /// A model directory or Hub repo id.
        model: PathBuf,
        /// Prompt length.
        #[arg(long, default_value_t = 512, value_parser = at_least_one)]
        tokens: usize,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 3, value_parser = at_least_one)]
        repeats: usize,
    },
    /// The machine's ceilings the benchmarks report shares of: f32 sgemm GFLOP/s with the gemm
    /// crate on every compute thread, and streaming read bandwidth.
    Ceilings {
        /// Size of the square matrices.
        #[arg(long, default_value_t = 2048)]
        n: usize,
        /// Size of the buffer read, MiB (well beyond the caches).
        #[arg(long, default_value_t = 1024)]
        mib: usize,
        /// Timed runs of each.
        #[arg(long, default_value_t = 7)]
        repeats: usize,
    },
    /// GFLOP/s of the decoding product x [M, K] times an f32 weight [N, K] (nn.Linear's
    /// layout), as batched decoding and `serve` run it: with `--copies 1` the weight stays in
    /// the caches, with many it streams from memory (the two bounds of a decoding step).
    Product {
        /// Activation rows (decoding sequences).
        #[arg(long, default_value_t = 16)]
        m: usize,
        /// Input width.
        #[arg(long, default_value_t = 768)]
        k: usize,
        /// Output width (weight rows).
        #[arg(long, default_value_t = 3072)]
        n: usize,
        /// Distinct weight matrices used in turn.
        #[arg(long, default_value_t = 16)]
        copies: usize,
        /// Timed runs.
        #[arg(long, default_value_t = 7)]
        repeats: usize,
        /// The kernel: panels (inference weights, what decoding runs; here f32), matvec (the
        /// [N, K] dot-product kernel of weights not in panels) or gemm (the gemm crate).
        #[arg(long, default_value = "panels")]
        kernel: String,
    },
    /// Forward + backward of one MoE layer (training mode) on `tokens` tokens.
    MoeLayer {
        /// Experts in the layer.
        #[arg(long)]
        experts: usize,
        /// Experts each token is routed to.
        #[arg(long, default_value_t = 2)]
        top_k: usize,
        /// Tokens in the batch.
        #[arg(long, default_value_t = 2048, value_parser = at_least_one)]
        tokens: usize,
        /// Model width (the experts' hidden size is 4x).
        #[arg(long, default_value_t = 256)]
        n_embd: usize,
        /// Timed runs (the median is reported).
        #[arg(long, default_value_t = 5, value_parser = at_least_one)]
        repeats: usize,
    },
}

/// A count that must be at least 1 (timed runs, tokens): a median of no runs does not exist.
fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(n) => Ok(n),
        Err(e) => Err(e.to_string()),
    }
}

fn report(case: &str, times: &[f64], tokens_per_run: f64) -> Result<()> {
    println!("{}", summary(case, times, tokens_per_run));
    Ok(())
}

/// The JSON line of [`report`]: every run's time, the median, the range and tokens/s.
fn summary(case: &str, times: &[f64], tokens_per_run: f64) -> serde_json::Value {
    let mut sorted = times.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = sorted[sorted.len() / 2];
    json!({
        "case": case,
        "times_s": times,
        "median_s": median,
        "min_s": sorted[0],
        "max_s": sorted[sorted.len() - 1],
        "tokens_per_sec": tokens_per_run / median,
    })
}

fn load_inputs(path: &Path) -> Result<(Tensor, Tensor)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let get = |n: &str| -> Result<Tensor> {
        let v = st.tensor(n).map_err(|e| anyhow::anyhow!("{}: tensor {n}: {e}", path.display()))?;
        if v.dtype() != safetensors::Dtype::I64 {
            bail!("{}: tensor {n} must be int64", path.display());
        }
        Ok(Tensor::from_raw_buffer(v.data(), DType::I64, v.shape(), &Device::Cpu)?)
    };
    Ok((get("x")?, get("y")?))
}

pub fn run(b: Bench, model_dir: impl Fn(&Path) -> Result<PathBuf>) -> Result<()> {
    match b {
        Bench::Train { model, inputs, warmup, dtype } => {
            let precision = nanomoe::kernels::Precision::parse(&dtype)?;
            let mut gpt = GPT::from_pretrained(model_dir(&model)?)?;
            gpt.train();
            gpt.set_precision(precision);
            let (x, y) = load_inputs(&inputs)?;
            let (steps, batch, block) = x.dims3()?;
            let mut opt = AdamW::new(gpt.params(), AdamWConfig { lr: 1e-4, ..Default::default() })?;
            let mut times = Vec::new();
            for s in 0..steps {
                let mb = vec![(x.get(s)?.to_dtype(DType::U32)?, y.get(s)?)];
                let t = Instant::now();
                train_step(&gpt, &mut opt, &mb, 1.0)?;
                if s >= warmup {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            if times.is_empty() {
                bail!("no timed steps: the inputs hold {steps} steps, warmup is {warmup}");
            }
            report("train", &times, (batch * block) as f64)
        }
        Bench::Decode { model, new_tokens, batch, packed, repeats } => {
            if batch == 0 || batch > 4096 {
                bail!("--batch must be 1 to 4096, got {batch}");
            }
            let gpt = super::inference_model(&model_dir(&model)?)?;
            let prompt: Vec<Vec<u32>> = (0..batch as u32).map(|i| vec![i % gpt.config.vocab_size as u32]).collect();
            let cfg = GenerationConfig::greedy(new_tokens);
            if packed {
                packed_decode(&gpt, &prompt, 4)?; // warm up
                let (mut times, mut steps) = (Vec::new(), Vec::new());
                for _ in 0..repeats {
                    let t = Instant::now();
                    steps.extend(packed_decode(&gpt, &prompt, new_tokens)?);
                    times.push(t.elapsed().as_secs_f64());
                }
                // Every step's time, as a client of `serve` sees its inter-token gaps
                // without the HTTP side: the median and the tail.
                steps.sort_by(|a, b| a.total_cmp(b));
                let at = |q: f64| 1e3 * steps[((q * (steps.len() - 1) as f64).round() as usize).min(steps.len() - 1)];
                eprintln!("decode steps: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} steps)", at(0.5), at(0.9), at(0.99), at(1.0), steps.len());
                let mut v = summary("decode", &times, (new_tokens * batch) as f64);
                v["step_ms"] = json!({"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0), "steps": steps.len()});
                println!("{v}");
                return Ok(());
            }
            gpt.generate_with(&prompt, &GenerationConfig::greedy(4), |_, _| {})?; // warm up
            let mut times = Vec::new();
            for _ in 0..repeats {
                let t = Instant::now();
                gpt.generate_with(&prompt, &cfg, |_, _| {})?;
                times.push(t.elapsed().as_secs_f64());
            }
            report("decode", &times, (new_tokens * batch) as f64)
        }
        Bench::Prefill { model, tokens, repeats } => {
            let gpt = super::inference_model(&model_dir(&model)?)?;
            let ids: Vec<u32> = (0..tokens as u32).map(|i| (i * 7919) % gpt.config.vocab_size as u32).collect();
            // What a prompt costs before generation (and what llama-bench's -p measures):
            // every position through the blocks, the output layer on the last one only.
            let rows = [ids];
            gpt.forward_step(&rows, Some(&mut nanomoe::KvCache::new()), None)?;
            let mut times = Vec::new();
            for _ in 0..repeats {
                let t = Instant::now();
                gpt.forward_step(&rows, Some(&mut nanomoe::KvCache::new()), None)?;
                times.push(t.elapsed().as_secs_f64());
            }
            report("prefill", &times, tokens as f64)
        }
        Bench::Ceilings { n, mib, repeats } => {
            if repeats == 0 || n == 0 || mib == 0 {
                bail!("--n, --mib and --repeats must be at least 1");
            }
            nanomoe::runtime::check_memory(|| "the ceilings' buffers".into(), (3 * n * n * 4 + (mib << 20)) as u128)?;
            let sgemm = nanomoe::kernels::ceiling::sgemm_gflops(n, repeats);
            let bf16 = nanomoe::kernels::ceiling::gemm_gflops(n, repeats, nanomoe::kernels::Precision::Bf16);
            let read = nanomoe::kernels::ceiling::read_bandwidth_gbs(mib << 20, repeats);
            println!("{}", json!({"case": "ceilings", "threads": rayon::current_num_threads(), "sgemm_n": n, "sgemm_gflops": sgemm,
                "bf16_gemm_gflops": bf16, "bf16_unit": nanomoe::kernels::bf16_gemm::bf16_unit().name(), "read_mib": mib, "read_gbs": read}));
            Ok(())
        }
        Bench::Product { m, k, n, copies, repeats, kernel } => {
            use nanomoe::kernels::ceiling::ProductKernel;
            let pk = match kernel.as_str() {
                "panels" => ProductKernel::Panels,
                "matvec" => ProductKernel::Matvec,
                "gemm" => ProductKernel::Gemm,
                other => bail!("--kernel must be panels, matvec or gemm, got {other:?}"),
            };
            if [m, k, n, copies, repeats].contains(&0) {
                bail!("--m, --k, --n, --copies and --repeats must be at least 1");
            }
            nanomoe::runtime::check_memory(|| "the product's weights".into(), (copies as u128) * (n * k * 4) as u128)?;
            let g = nanomoe::kernels::ceiling::decode_product_gflops(m, k, n, copies, repeats, pk)?;
            println!("{}", json!({"case": "product", "kernel": kernel, "m": m, "k": k, "n": n,
                "copies": copies, "threads": rayon::current_num_threads(), "gflops": g, "median_gflops": nanomoe::kernels::ceiling::median_of(&g)}));
            Ok(())
        }
        Bench::MoeLayer { experts, top_k, tokens, n_embd, repeats } => {
            let cfg = GPTConfig { n_layer: 1, n_head: 1, n_embd, vocab_size: 8, block_size: 8, n_exp: experts, moe_top_k: top_k, ..Default::default() };
            cfg.validate()?;
            let specs: Vec<_> = param_specs(&cfg).into_iter().filter(|s| s.name.contains(".mlp.")).collect();
            let store = ParamStore::init(&specs, 0, &Device::Cpu)?;
            let layer = MoeLayer::load(&cfg, &store, "transformer.h.0.mlp", 0, None)?;
            let x = Tensor::randn(0f32, 1f32, (1, tokens, n_embd), &Device::Cpu)?;
            let mut times = Vec::new();
            for i in 0..repeats + 1 {
                let t = Instant::now();
                let sink = GradSink::new();
                let mut ctx = MoeCtx { cfg: &cfg, training: true, routing: Routing::Capacity, rng: None, sink: Some(&sink), prec: nanomoe::kernels::Precision::F32 };
                let out = layer.forward(&x, &mut ctx)?;
                let loss = (out.y.sqr()?.mean_all()? + out.aux_loss)?;
                sink.backward(&loss)?;
                if i > 0 {
                    times.push(t.elapsed().as_secs_f64());
                }
            }
            report(&format!("moe-layer-{experts}"), &times, tokens as f64)
        }
    }
}

/// Greedy decoding of every prompt for `new_tokens` tokens as `serve` runs its sequences:
/// one KV cache each, passes of at most `MAX_PACKED_TOKENS` rows, one token per sequence
/// and step.
/// Returns each step's time in seconds.
fn packed_decode(gpt: &GPT, prompts: &[Vec<u32>], new_tokens: usize) -> Result<Vec<f64>> {
    // On a worker of the pool with the others kept awake, as serve's engine runs.
    nanomoe::runtime::on_compute_pool(|| {
        let _hot = nanomoe::runtime::keep_workers_hot();
        packed_steps(gpt, prompts, new_tokens)
    })
}

fn packed_steps(gpt: &GPT, prompts: &[Vec<u32>], new_tokens: usize) -> Result<Vec<f64>> {
    use nanomoe::gpt::{KvCache, PackedSeq, MAX_PACKED_TOKENS};
    let mut caches: Vec<KvCache> = prompts.iter().map(|p| KvCache::with_capacity(p.len() + new_tokens)).collect();
    let mut next: Vec<Vec<u32>> = prompts.to_vec();
    let mut steps = Vec::with_capacity(new_tokens);
    for _ in 0..new_tokens {
        let t = Instant::now();
        for (caches, next) in caches.chunks_mut(MAX_PACKED_TOKENS).zip(next.chunks_mut(MAX_PACKED_TOKENS)) {
            let mut seqs: Vec<PackedSeq> = caches.iter_mut().zip(next.iter()).map(|(cache, ids)| PackedSeq { ids, cache }).collect();
            let (logits, _) = gpt.forward_packed(&mut seqs)?;
            let picks = nanomoe::generate::greedy_tokens(&logits)?;
            for (ids, id) in next.iter_mut().zip(picks) {
                *ids = vec![id];
            }
        }
        steps.push(t.elapsed().as_secs_f64());
    }
    Ok(steps)
}
