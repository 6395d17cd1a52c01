//! The training loop, in the spirit of nanoGPT's train.py.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{rngs::StdRng, SeedableRng};
use serde_json::json;

use crate::config::GPTConfig;
use std::sync::Arc;

use crate::dist::{check_same, share, Comm, Single};
use crate::moe_parallel::ExpertShard;
use crate::error::{Error, Result};
use crate::gpt::GPT;
use crate::moe::MoeStats;
use crate::optim::{lr_at, AdamW, AdamWConfig};
use crate::params::ParamStore;
use crate::tokenizer::Tokenizer;
use crate::train::{arithmetic, grammar};
use crate::train::data::{get_batch, Dataset, Meta, Split};
use crate::train::settings::{default_model, Resolved, TrainSettings, BUILTIN_ARITHMETIC, BUILTIN_GRAMMAR};
use crate::train::state::{load_latest, save_state, StateInfo};
use candle_core::Tensor;
use crate::train_step::{train_step_on, Step};

/// splitmix64 of a few words: independent, reproducible generator seeds.
pub fn mix(words: &[u64]) -> u64 {
    let mut h = 0x9E37_79B9_7F4A_7C15u64;
    for &w in words {
        h ^= w.wrapping_add(0x9E37_79B9_7F4A_7C15).wrapping_add(h << 6).wrapping_add(h >> 2);
        let mut z = h;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        h = z ^ (z >> 31);
    }
    h
}

/// Result of a training run.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub out_dir: PathBuf,
    pub iters: u64,
    pub best_val_loss: Option<f64>,
    pub last_val_loss: Option<f64>,
    pub accuracy: Option<f64>,
    pub train_losses: Vec<(u64, f32)>,
}

/// Eval result of one split.
#[derive(Debug, Clone)]
pub struct EvalResult {
    pub loss: f64,
    pub moe: Vec<LayerStats>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerStats {
    pub layer: usize,
    pub tokens_per_expert: Vec<usize>,
    pub drop_rate: f64,
    pub router_entropy: f64,
}

/// Per-layer statistics of `n` evaluated batches (`stats` holds this rank's share of them;
/// the sums are completed over ranks by the caller).
fn aggregate(stats: &[Vec<MoeStats>], n: f64) -> Vec<LayerStats> {
    let mut out: Vec<LayerStats> = Vec::new();
    let n = n.max(1.0);
    for batch in stats {
        for s in batch {
            let entry = match out.iter_mut().find(|l| l.layer == s.layer) {
                Some(e) => e,
                None => {
                    out.push(LayerStats { layer: s.layer, tokens_per_expert: vec![0; s.tokens_per_expert.len()], drop_rate: 0.0, router_entropy: 0.0 });
                    out.last_mut().expect("pushed")
                }
            };
            for (a, b) in entry.tokens_per_expert.iter_mut().zip(&s.tokens_per_expert) {
                *a += b;
            }
            entry.drop_rate += s.dropped as f64 / s.assignments.max(1) as f64 / n;
            entry.router_entropy += s.router_entropy as f64 / n;
        }
    }
    out
}

/// Mean next-token loss over `iters` random batches of a split (eval mode), with MoE stats.
pub fn evaluate(model: &mut GPT, split: &Split, batch_size: usize, iters: u64, seed: u64) -> Result<EvalResult> {
    evaluate_on(model, split, batch_size, iters, seed, &Single)
}

/// [`evaluate`] with the batches shared out over ranks: every rank gets the result over
/// all `iters` batches (the same batches one process evaluates).
pub fn evaluate_on(model: &mut GPT, split: &Split, batch_size: usize, iters: u64, seed: u64, comm: &dyn Comm) -> Result<EvalResult> {
    let was_training = model.is_training();
    model.eval();
    let mut total = 0f64;
    let mut stats = Vec::new();
    let block = model.config.block_size;
    let vocab = model.config.vocab_size;
    let tokens = batch_size as u128 * block as u128;
    crate::runtime::check_memory(
        || format!("evaluating batches of {batch_size} x block_size {block}"),
        tokens.saturating_mul(model.config.activation_bytes_per_token(false) + 8),
    )?;
    // Expert parallel: every rank takes its rows of every batch (the MoE layers route the
    // whole batch together); otherwise ranks share the batches out.
    let ep = model.expert_shard().is_some();
    let mine = if ep { 0..iters as usize } else { share(iters as usize, comm.rank(), comm.size()) };
    for k in mine.start as u64..mine.end as u64 {
        let mut rng = StdRng::seed_from_u64(mix(&[seed, k]));
        let (mut x, mut y) = get_batch(split, batch_size, block, vocab, &mut rng, model.device())?;
        if ep {
            let rows = share(batch_size, comm.rank(), comm.size());
            (x, y) = (x.narrow(0, rows.start, rows.len())?, y.narrow(0, rows.start, rows.len())?);
        }
        let (_, losses, s) = model.forward_loss(&x, &y)?;
        total += losses.ntp_loss.map(|l| l.to_scalar::<f32>()).transpose()?.unwrap_or(0.0) as f64;
        stats.push(s);
    }
    if was_training {
        model.train();
    }
    let mut moe = aggregate(&stats, iters as f64);
    if ep && comm.size() > 1 {
        // The routing statistics are already the global batch's, the same on every rank.
        let mut t = [total];
        comm.all_reduce_f64(&mut t)?;
        total = t[0] / comm.size() as f64;
    } else if comm.size() > 1 {
        // Every rank lists every MoE layer (a rank may have evaluated no batch).
        let mut all = Vec::new();
        for layer in (0..model.config.n_layer).filter(|&i| model.config.is_moe_layer(i)) {
            all.push(moe.iter().find(|l| l.layer == layer).cloned().unwrap_or(LayerStats {
                layer,
                tokens_per_expert: vec![0; model.config.n_exp],
                drop_rate: 0.0,
                router_entropy: 0.0,
            }));
        }
        let mut flat = vec![total];
        for l in &all {
            flat.extend(l.tokens_per_expert.iter().map(|&c| c as f64));
            flat.extend([l.drop_rate, l.router_entropy]);
        }
        comm.all_reduce_f64(&mut flat)?;
        total = flat[0];
        let mut at = 1;
        for l in &mut all {
            for c in &mut l.tokens_per_expert {
                *c = flat[at] as usize;
                at += 1;
            }
            l.drop_rate = flat[at];
            l.router_entropy = flat[at + 1];
            at += 2;
        }
        moe = all;
    }
    Ok(EvalResult { loss: total / iters as f64, moe })
}

/// Whether gradient all-reduces should overlap the backward pass: only where this machine
/// has a core to spare for each process's MPI thread (MPI polls while it waits, and on a
/// machine whose cores all compute that slows the step down: 2 processes on 2 cores,
/// 0.89-1.02x one process with overlap, 1.09-1.13x without).
fn overlap_reduce(ranks: usize, threads: usize) -> bool {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let here = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "PMIX_LOCAL_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse::<usize>().ok())
        .unwrap_or(ranks);
    ranks > 1 && threads > 0 && cores >= here * (threads + 1)
}

/// A fingerprint of the weights (FNV-1a over their bits), to check that ranks agree.
fn weights_hash(model: &GPT) -> Result<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for (name, v) in model.params().iter() {
        if model.expert_shard().is_some() && ExpertShard::is_sharded(name) {
            continue; // each rank's own experts
        }
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
        let x: Vec<f32> = v.as_tensor().to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1()?;
        for f in x {
            h = (h ^ f.to_bits() as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    Ok(h)
}

/// FLOPs per token of a forward + backward pass (PaLM appendix B, as nanoGPT estimates).
pub fn flops_per_token(model: &GPT) -> f64 {
    let c = &model.config;
    let n = model.num_active_params() as f64 - (c.block_size * c.n_embd) as f64;
    6.0 * n + 12.0 * (c.n_layer * c.n_embd * c.block_size) as f64
}

/// A prepared data directory, or a built-in corpus (`builtin:grammar`, `builtin:arithmetic`,
/// generated from `seed` as training does), with its tokenizer when it has one.
pub fn open_data(data_dir: &str, seed: u64) -> Result<(Dataset, Option<Tokenizer>)> {
    let builtin = match data_dir {
        BUILTIN_ARITHMETIC => Some((arithmetic::tokenizer()?, arithmetic::corpus(60_000, seed))),
        BUILTIN_GRAMMAR => Some((grammar::tokenizer()?, grammar::corpus(30_000, seed))),
        _ => None,
    };
    if let Some((tok, (train, val))) = builtin {
        let train = tok.encode(&train)?;
        let val = tok.encode(&val)?;
        let meta = Meta {
            vocab_size: tok.vocab_size(),
            dtype: "uint16".into(),
            train_tokens: train.len() as u64,
            val_tokens: val.len() as u64,
            tokenizer: "char".into(),
        };
        return Ok((Dataset { train: Split::from_vec("train", train), val: Split::from_vec("val", val), meta, dir: None }, Some(tok)));
    }
    let ds = Dataset::open(Path::new(data_dir))?;
    let tok_path = Path::new(data_dir).join(crate::tokenizer::TOKENIZER_FILE);
    let tok = if tok_path.is_file() { Some(Tokenizer::from_file(&tok_path)?) } else { None };
    Ok((ds, tok))
}

/// Whether `dir` holds another run's outputs.
fn holds_run(dir: &Path) -> bool {
    ["state", "model", "best", "metrics.jsonl"].iter().any(|f| dir.join(f).exists())
}

fn crop_block_size(model: GPT, block: usize) -> Result<GPT> {
    if block == model.config.block_size {
        return Ok(model);
    }
    if block > model.config.block_size {
        return Err(Error::Config(format!("block_size {block} is larger than the model's block_size {}", model.config.block_size)));
    }
    let mut tensors = Vec::new();
    for (n, v) in model.params().iter() {
        let t = v.as_tensor().clone();
        let t = if n == "transformer.wpe.weight" { t.narrow(0, 0, block)?.contiguous()? } else { t };
        tensors.push((n.to_string(), t));
    }
    let cfg = GPTConfig { block_size: block, ..model.config.clone() };
    GPT::from_params(cfg, ParamStore::from_tensors(tensors)?)
}

fn check_tokenizers(model_dir: &Path, data_tok: Option<&Tokenizer>) -> Result<()> {
    let p = model_dir.join(crate::tokenizer::TOKENIZER_FILE);
    if let (Some(dt), true) = (data_tok, p.is_file()) {
        let mt = Tokenizer::from_file(&p)?;
        let probe = "The quick brown fox, 12345!\n  jumps over the lazy dog.";
        if mt.vocab_size() != dt.vocab_size() || mt.encode(probe)? != dt.encode(probe)? {
            return Err(Error::Config(format!(
                "the data's tokenizer ({} tokens) disagrees with the model's in {} ({} tokens)",
                dt.vocab_size(),
                model_dir.display(),
                mt.vocab_size()
            )));
        }
    }
    Ok(())
}

/// Prints through the progress bar when one is shown.
struct Log {
    bar: ProgressBar,
    /// None on ranks other than 0, which print and write nothing.
    metrics: Option<std::fs::File>,
}

impl Log {
    fn line(&self, s: &str) {
        if self.metrics.is_none() {
            return;
        }
        if self.bar.is_hidden() {
            println!("{s}");
        } else {
            self.bar.println(s);
        }
    }
    fn metric(&mut self, v: serde_json::Value) -> Result<()> {
        match &mut self.metrics {
            Some(m) => writeln!(m, "{v}").map_err(|e| Error::Msg(format!("cannot write metrics.jsonl: {e}"))),
            None => Ok(()),
        }
    }
}

/// Refuses batch sizes and models this machine cannot hold, before allocating them: weights
/// (unless `weights_loaded`), gradients and AdamW's two moments (4 x 4 bytes per parameter),
/// the activations of one micro-batch and the token ids of every micro-batch of a step.
fn check_training_memory(cfg: &GPTConfig, s: &TrainSettings, weights_loaded: bool) -> Result<()> {
    let parameters = cfg.size().map(|z| z.parameters).unwrap_or(u128::MAX);
    let tokens = s.batch_size as u128 * cfg.block_size as u128;
    let need = parameters.saturating_mul(if weights_loaded { 12 } else { 16 })
        .saturating_add(tokens.saturating_mul(cfg.activation_bytes_per_token(true)))
        .saturating_add(tokens.saturating_mul(s.gradient_accumulation_steps as u128).saturating_mul(8));
    crate::runtime::check_memory(
        || format!(
            "training {parameters} parameters with batch_size {} x block_size {} x gradient_accumulation_steps {}",
            s.batch_size, cfg.block_size, s.gradient_accumulation_steps
        ),
        need,
    )
}

/// Trains as the settings say; returns what happened.
pub fn train(resolved: &Resolved) -> Result<Outcome> {
    train_with(resolved, &(Arc::new(Single) as Arc<dyn Comm>))
}

/// Trains one model on every rank of `comm` (data parallel, as nanoGPT's DDP: the step's
/// `gradient_accumulation_steps` micro batches are shared out over the ranks, rank r taking
/// k = r, r + N, ...; gradients are summed over ranks; every rank applies the same update).
/// With `expert_parallel`, each rank instead holds n_exp / N experts of every MoE layer and
/// takes its rows (batch_size / N) of every micro batch, whose MoE layers route all rows
/// together as one process does (see [`crate::moe_parallel`]).
/// Rank 0 alone prints and writes files. With one rank this is [`train`].
pub fn train_with(resolved: &Resolved, comm: &Arc<dyn Comm>) -> Result<Outcome> {
    crate::runtime::set_threads(resolved.train.threads)?;
    crate::runtime::on_compute_pool(|| train_on_pool(resolved, comm))
}

fn train_on_pool(resolved: &Resolved, comm_arc: &Arc<dyn Comm>) -> Result<Outcome> {
    let comm: &dyn Comm = comm_arc.as_ref();
    let s = &resolved.train;
    let device = Device::Cpu;
    let out_dir = PathBuf::from(&s.out_dir);
    let resuming = s.init_from == "resume";
    let (ranks, rank, main) = (comm.size() as u64, comm.rank(), comm.is_main());
    let ep = s.expert_parallel && ranks > 1;
    if ep && s.batch_size % ranks as usize != 0 {
        return Err(Error::Config(format!(
            "expert_parallel: batch_size {} is not a multiple of the {ranks} processes: each takes batch_size / N rows of every micro batch",
            s.batch_size
        )));
    }
    if !ep && s.gradient_accumulation_steps % ranks != 0 {
        return Err(Error::Config(format!(
            "gradient_accumulation_steps {} is not a multiple of the {ranks} processes: each takes an equal share of every step's micro batches",
            s.gradient_accumulation_steps
        )));
    }
    // Every rank decides on rank 0's view of out_dir, before rank 0 changes anything.
    let held = comm.all_gather_u64(&[holds_run(&out_dir) as u64])?[0] == 1;
    if !resuming && held {
        if !s.overwrite {
            return Err(Error::Config(format!(
                "out_dir {} holds another run; continue it with --init_from=resume or replace it with --overwrite=true",
                out_dir.display()
            )));
        }
        if main {
            for f in ["state", "model", "best"] {
                let _ = std::fs::remove_dir_all(out_dir.join(f));
            }
            let _ = std::fs::remove_file(out_dir.join("metrics.jsonl"));
        }
    }
    let (data, tokenizer) = open_data(&s.data_dir, s.seed)?;
    let vocab = data.meta.vocab_size;

    // ---- model ----
    let opt_cfg = AdamWConfig { lr: s.learning_rate, beta1: s.beta1, beta2: s.beta2, eps: 1e-8, weight_decay: s.weight_decay };
    let (mut model, mut opt, mut iter, mut best_val, mut tokens_seen) = match s.init_from.as_str() {
        "resume" => {
            let st = load_latest(&out_dir)?;
            let model = GPT::from_params(st.info.model.clone(), st.params)?;
            let mut opt = AdamW::new(model.params(), opt_cfg.clone())?;
            opt.load_state(st.info.iter, st.moments)?;
            (model, opt, st.info.iter, st.info.best_val_loss, st.info.tokens_seen)
        }
        "scratch" => {
            let mut cfg = resolved.model_config(default_model(), vocab)?;
            // An end-of-text id only when the tokenizer defines one.
            if cfg.eos_token_id.is_none() {
                cfg.eos_token_id = tokenizer.as_ref().and_then(|t| t.eos_token_id()).filter(|&id| (id as usize) < cfg.vocab_size);
                cfg.bos_token_id = cfg.bos_token_id.or(cfg.eos_token_id);
            }
            check_training_memory(&cfg, s, false)?;
            let model = GPT::new_seeded(&cfg, s.seed, &device)?;
            let opt = AdamW::new(model.params(), opt_cfg.clone())?;
            (model, opt, 0, None, 0)
        }
        other => {
            let model = if other.starts_with("gpt2") {
                GPT::from_pretrained_gpt2(other)?
            } else {
                let dir = crate::auto::resolve_model_dir(Path::new(other))?;
                check_tokenizers(&dir, tokenizer.as_ref())?;
                GPT::from_pretrained(&dir)?
            };
            let block = resolved.model.get("block_size").and_then(|v| v.as_u64()).map(|b| b as usize).unwrap_or(model.config.block_size);
            let mut model = crop_block_size(model, block)?;
            if let Some(d) = resolved.model.get("dropout").and_then(|v| v.as_f64()) {
                model.config.dropout = d;
                model.config.validate()?;
            }
            let opt = AdamW::new(model.params(), opt_cfg.clone())?;
            (model, opt, 0, None, 0)
        }
    };
    if s.init_from != "scratch" {
        check_training_memory(&model.config, s, true)?;
    }
    if ep {
        let c = &model.config;
        if !c.is_moe() {
            return Err(Error::Config("expert_parallel needs an MoE model (n_exp > 1)".into()));
        }
        for (on, key) in [(c.use_router_ortho_loss, "use_router_ortho_loss"), (c.use_experts_ortho_loss, "use_experts_ortho_loss"), (c.use_gate_output_loss, "use_gate_output_loss")] {
            if on && c.n_exp > 0 {
                return Err(Error::Config(format!("expert_parallel does not implement the seed's {key} (it needs every expert's weights on one rank); switch it off or train without expert_parallel")));
            }
        }
        // Keep this rank's experts (and their AdamW moments when resuming).
        let shard = ExpertShard::new(comm_arc.clone(), c.n_exp)?;
        let resumed_moments = if resuming { Some(shard.slice_moments(opt.state())?) } else { None };
        let full: Vec<(String, Tensor)> = model.params().iter().map(|(n, v)| (n.to_string(), v.as_tensor().clone())).collect();
        let cfg = model.config.clone();
        model = GPT::from_params_sharded(cfg, ParamStore::from_tensors(full)?, Some(shard))?;
        let step = opt.step_count();
        opt = AdamW::new(model.params(), opt_cfg.clone())?;
        if let Some(moments) = resumed_moments {
            opt.load_state(step, moments)?;
        }
    }
    if vocab > model.config.vocab_size {
        return Err(Error::Config(format!(
            "the data's vocabulary ({vocab} tokens) is larger than the model's vocab_size {}",
            model.config.vocab_size
        )));
    }
    let overlap = match s.overlap_grad_reduce.as_str() {
        "on" => true,
        "off" => false,
        _ => overlap_reduce(ranks as usize, s.threads),
    };
    let block = model.config.block_size;
    for split in [&data.train, &data.val] {
        if split.len() <= block {
            return Err(Error::Input(format!(
                "{} split has {} tokens, fewer than block_size + 1 = {}",
                split.name(),
                split.len(),
                block + 1
            )));
        }
        split.check_ids(model.config.vocab_size)?;
    }
    check_same(comm, weights_hash(&model)?, "initial weights")?;
    if main {
        std::fs::create_dir_all(&out_dir).map_err(|e| Error::file(&out_dir, e))?;
    }
    let settings_json = serde_json::to_value(s).expect("serializes");
    let tokens_per_iter = (s.batch_size * block) as u64 * s.gradient_accumulation_steps;
    let fpt = flops_per_token(&model);

    let bar = ProgressBar::new(s.max_iters);
    bar.set_style(
        ProgressStyle::with_template("{bar:30} {pos}/{len} {msg} [{elapsed} < {eta}]").expect("template").progress_chars("=> "),
    );
    bar.set_position(iter);
    let metrics = if main {
        let path = out_dir.join("metrics.jsonl");
        Some(std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(|e| Error::file(&path, e))?)
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        None
    };
    let mut log = Log { bar, metrics };
    model.set_precision(crate::kernels::Precision::parse(&s.dtype)?);
    log.line(&format!(
        "training {} ({} params, {} active) on {} ({} train / {} val tokens), {} tokens per step, {} steps",
        if model.config.is_moe() { format!("an MoE GPT with {} experts, top-{}", model.config.n_exp, model.config.moe_top_k) } else { "a dense GPT".to_string() },
        model.num_params(),
        model.num_active_params(),
        s.data_dir,
        data.train.len(),
        data.val.len(),
        tokens_per_iter,
        s.max_iters
    ));
    if model.precision() == crate::kernels::Precision::Bf16 {
        use crate::kernels::bf16_gemm::{bf16_unit, Bf16Unit};
        log.line(match bf16_unit() {
            Bf16Unit::Amx => "dtype bfloat16: the matrix products round their operands to bf16 and sum in f32, on AMX tiles",
            Bf16Unit::Avx512Bf16 => "dtype bfloat16: the matrix products round their operands to bf16 and sum in f32, with AVX512-BF16",
            Bf16Unit::Emulated => "dtype bfloat16: this CPU has neither AMX nor AVX512-BF16: the products are emulated in f32 on bf16-rounded operands, slower than float32",
        });
    }
    if ep {
        log.line(&format!(
            "expert parallel over {ranks} processes: each holds {} of every MoE layer's {} experts and takes {} rows of every micro batch",
            model.config.n_exp / ranks as usize,
            model.config.n_exp,
            s.batch_size / ranks as usize
        ));
    } else if ranks > 1 {
        log.line(&format!("data parallel over {ranks} processes: {} micro batches each per step", s.gradient_accumulation_steps / ranks));
    }
    if resuming {
        log.line(&format!(
            "resuming {} from step {iter} ({tokens_seen} tokens seen, best val loss {})",
            out_dir.display(),
            best_val.map(|v| format!("{v:.4}")).unwrap_or_else(|| "none yet".into())
        ));
    }

    let save_models = |model: &GPT, best: bool| -> Result<()> {
        let dirs: &[&str] = if best { &["model", "best"] } else { &["model"] };
        for d in dirs {
            let p = out_dir.join(d);
            model.save_pretrained(&p)?;
            if let Some(t) = &tokenizer {
                t.save_pretrained(&p, Some(model.config.block_size))?;
            }
        }
        Ok(())
    };

    let start_iter = if resuming { iter } else { u64::MAX };
    let mut train_losses = Vec::new();
    let mut last_val = None;
    model.train();
    let mut window = Instant::now();
    let mut window_tokens = 0u64;
    let (mut window_steps, mut window_bytes, mut window_comm) = (0u64, comm.bytes_sent(), comm.seconds_in_collectives());
    loop {
        let lr = lr_at(iter, s.learning_rate, s.min_lr, s.warmup_iters, s.lr_decay_iters, s.decay_lr);
        if iter % s.eval_interval == 0 || iter >= s.max_iters {
            let tr = evaluate_on(&mut model, &data.train, s.batch_size, s.eval_iters, mix(&[s.seed, iter, 1]), comm)?;
            let va = evaluate_on(&mut model, &data.val, s.batch_size, s.eval_iters, mix(&[s.seed, iter, 2]), comm)?;
            if ranks > 1 {
                check_same(comm, weights_hash(&model)?, &format!("weights at step {iter}"))?;
            }
            last_val = Some(va.loss);
            log.line(&format!("step {iter}: train loss {:.4}, val loss {:.4} (ppl {:.2})", tr.loss, va.loss, va.loss.exp()));
            for l in &va.moe {
                log.line(&format!(
                    "  layer {} experts {:?} drop {:.1}% entropy {:.3}",
                    l.layer,
                    l.tokens_per_expert,
                    100.0 * l.drop_rate,
                    l.router_entropy
                ));
            }
            log.metric(json!({"iter": iter, "train_loss": tr.loss, "val_loss": va.loss, "lr": lr, "moe": va.moe}))?;
            if main {
                if let Err(e) = crate::train::plot::plot_run(&out_dir) {
                    log.line(&format!("warning: {e}"));
                }
            }
            let improved = best_val.is_none_or(|b| va.loss < b);
            if improved {
                best_val = Some(va.loss);
            }
            // At the step a run resumed from, the state on disk is already this one; but a
            // kill between writing it and the model directories can have left those older,
            // so they are written again (best too when this step set the best val loss).
            let resumed_here = iter > 0 && iter == start_iter;
            let checkpoint = iter > 0 && iter != start_iter && (improved || s.always_save_checkpoint || iter >= s.max_iters);
            if checkpoint || resumed_here {
                let best = improved || (resumed_here && best_val == Some(va.loss));
                let info = StateInfo { iter, best_val_loss: best_val, tokens_seen, model: model.config.clone(), settings: settings_json.clone() };
                if let Some(shard) = model.expert_shard() {
                    // Every rank sends its experts; rank 0 writes them all.
                    let (full, moments) = (shard.gather_params(model.params())?, shard.gather_moments(opt.state())?);
                    if main {
                        if checkpoint {
                            save_state(&out_dir, &info, &full, &moments, s.keep_last_states)?;
                        }
                        save_models(&GPT::from_params(model.config.clone(), full)?, best)?;
                    }
                } else if main {
                    if checkpoint {
                        save_state(&out_dir, &info, model.params(), &opt.state(), s.keep_last_states)?;
                    }
                    save_models(&model, best)?;
                }
            }
        }
        if iter >= s.max_iters || s.eval_only {
            break;
        }
        opt.set_lr(lr);
        // This rank's micro batches, each with its own data and dropout/noise seeds, so
        // that the step is the same on any number of ranks.
        let mut micro = Vec::new();
        let mut seeds = Vec::new();
        let (first, every) = if ep { (0, 1) } else { (rank as u64, ranks as usize) };
        for k in (first..s.gradient_accumulation_steps).step_by(every) {
            let mut rng = StdRng::seed_from_u64(mix(&[s.seed, iter, 4, k]));
            let (x, y) = get_batch(&data.train, s.batch_size, block, model.config.vocab_size, &mut rng, &device)?;
            if ep {
                // This rank's rows; its own dropout masks and router noise.
                let rows = share(s.batch_size, rank, ranks as usize);
                micro.push((x.narrow(0, rows.start, rows.len())?, y.narrow(0, rows.start, rows.len())?));
                seeds.push(if rank == 0 { mix(&[s.seed, iter, 3, k]) } else { mix(&[s.seed, iter, 3, k, rank as u64]) });
            } else {
                micro.push((x, y));
                seeds.push(mix(&[s.seed, iter, 3, k]));
            }
        }
        // Each rank's losses are means over its rows: with expert parallelism they are also
        // divided by N, so that their sum over ranks is the global mean.
        let micro_total = s.gradient_accumulation_steps as usize * if ep { ranks as usize } else { 1 };
        let step = Step { micro_batches: &micro, seeds: Some(&seeds), micro_total, grad_clip: s.grad_clip, overlap_reduce: overlap };
        let st = train_step_on(&model, &mut opt, &step, comm_arc)?;
        if !st.loss.is_finite() {
            return Err(Error::Msg(format!("loss became {} at step {iter}; lower learning_rate", st.loss)));
        }
        iter += 1;
        tokens_seen += tokens_per_iter;
        window_tokens += tokens_per_iter;
        window_steps += 1;
        train_losses.push((iter, st.loss));
        if iter % s.log_interval == 0 || iter == s.max_iters {
            let secs = window.elapsed().as_secs_f64().max(1e-9);
            let tps = window_tokens as f64 / secs;
            let mfu = tps * fpt / s.peak_flops;
            log.bar.set_message(format!("loss {:.4} lr {:.2e} {:.0} tok/s mfu {:.1}%", st.loss, lr, tps, 100.0 * mfu));
            if main && log.bar.is_hidden() {
                println!("iter {iter}: loss {:.4}, lr {lr:.2e}, {tps:.0} tok/s, mfu {:.1}%", st.loss, 100.0 * mfu);
            }
            log.metric(json!({"iter": iter, "loss": st.loss, "ntp_loss": st.ntp_loss, "aux_loss": st.aux_loss,
                "router_z_loss": st.router_z_loss, "router_ortho_loss": st.router_ortho_loss, "experts_ortho_loss": st.experts_ortho_loss,
                "gate_output_loss": st.gate_output_loss, "grad_norm": st.grad_norm, "lr": lr, "tokens_per_sec": tps, "mfu": mfu}))?;
            if ranks > 1 {
                // Payload this rank sent per step (collectives of evaluations included).
                let (sent, busy) = (comm.bytes_sent(), comm.seconds_in_collectives());
                let steps = window_steps.max(1) as f64;
                log.metric(json!({"iter": iter, "bytes_sent_per_step": (sent - window_bytes) as f64 / steps,
                    "seconds_blocked_in_collectives_per_step": (busy - window_comm) / steps}))?;
                (window_bytes, window_comm) = (sent, busy);
            }
            window = Instant::now();
            window_tokens = 0;
            window_steps = 0;
        }
        log.bar.set_position(iter);
    }
    log.bar.finish_and_clear();
    let unsaved = comm.all_gather_u64(&[!out_dir.join("model").is_dir() as u64])?[0] == 1;
    if let Some(shard) = model.expert_shard() {
        let full = GPT::from_params(model.config.clone(), shard.gather_params(model.params())?)?;
        if main && unsaved {
            save_models(&full, true)?;
        }
        model = full; // (rank 0 measures the built-in tasks' accuracy on the whole model)
    } else if main && unsaved {
        save_models(&model, true)?;
    }
    let accuracy = match s.data_dir.as_str() {
        _ if !main => None,
        BUILTIN_ARITHMETIC => {
            let tok = tokenizer.as_ref().expect("builtin data has a tokenizer");
            let (acc, examples) = arithmetic::accuracy(&mut model, tok, &arithmetic::test_problems(500, s.seed))?;
            println!("samples (answers are written least-significant digit first):");
            for (p, got, ok) in examples {
                println!("  {p}{got}  {}", if ok { "right" } else { "wrong" });
            }
            println!("accuracy on 500 held-out additions: {:.1}%", 100.0 * acc);
            Some(acc)
        }
        BUILTIN_GRAMMAR => {
            let tok = tokenizer.as_ref().expect("builtin data has a tokenizer");
            let (acc, examples) = grammar::acceptance(&mut model, tok, 200, s.seed)?;
            println!("samples:");
            for (line, ok) in examples {
                println!("  {line:<45} {}", if ok { "grammatical" } else { "NOT grammatical" });
            }
            println!("success: the grammar accepts {:.1}% of 200 sampled sentences", 100.0 * acc);
            Some(acc)
        }
        _ => None,
    };
    Ok(Outcome { out_dir, iters: iter, best_val_loss: best_val, last_val_loss: last_val, accuracy, train_losses })
}
