//! Sub-commands of the `nanomoe` binary.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use nanomoe::checkpoint::{self, SaveDType, SaveOptions};
use nanomoe::{GPTConfig, GenerationConfig, Routing, WeightFormat, GPT};

mod bench;

#[derive(Parser)]
#[command(name = "nanomoe", version, about = "Train, run and share GPT-2-style models with Mixture-of-Experts layers, HuggingFace-native")]
struct Cli {
    /// Revision (branch, tag or commit) for MODEL arguments that are Hub repo ids.
    #[arg(long, global = true, default_value = "main", help_heading = "Global options")]
    revision: String,
    /// Weight storage of inference commands (generate, sample, forward, eval, serve, bench
    /// decode and prefill): f32; bf16 or f16 (half the memory); q8_0 or q4_0 (GGML's blocks:
    /// 8.5 or 4.5 bits per weight, integer dot products on activations quantized to 8 bits
    /// per block of 32, as llama.cpp does). Activations between layers and sums stay f32.
    /// A GGUF MODEL keeps the types it holds.
    #[arg(long, global = true, help_heading = "Global options")]
    weight_dtype: Option<String>,
    /// Compute threads (0 = RAYON_NUM_THREADS when set, else one per core; at most 4 per core).
    #[arg(long, global = true, default_value_t = 0, help_heading = "Global options")]
    threads: usize,
    #[command(subcommand)]
    cmd: Cmd,
}

static REVISION: std::sync::OnceLock<String> = std::sync::OnceLock::new();
static WEIGHT_FORMAT: std::sync::OnceLock<Option<WeightFormat>> = std::sync::OnceLock::new();

/// A model for inference from a directory or a GGUF file, its weights stored as
/// --weight-dtype says (a GGUF file's as it holds them, unless --weight-dtype is given).
pub(crate) fn inference_model(dir: &Path) -> Result<GPT> {
    let requested = WEIGHT_FORMAT.get().copied().flatten();
    if nanomoe::gguf::is_gguf_path(dir) {
        let gpt = nanomoe::gguf::load_gpt(dir)?;
        return Ok(match requested {
            Some(f) => gpt.with_weight_dtype(f)?,
            None => gpt,
        });
    }
    Ok(GPT::from_pretrained_with_weight_dtype(dir, requested.unwrap_or(WeightFormat::F32), &Device::Cpu)?)
}

/// A MODEL argument as a directory (or a GGUF file): itself, or a Hub repo id at --revision.
fn model_dir(model: &Path) -> Result<PathBuf> {
    if nanomoe::gguf::is_gguf_path(model) {
        if !model.is_file() {
            bail!("{}: no such file", model.display());
        }
        return Ok(model.to_path_buf());
    }
    let rev = REVISION.get().map(String::as_str).unwrap_or("main");
    Ok(nanomoe::auto::resolve_model_dir_at(model, rev)?)
}

#[derive(Subcommand)]
enum Cmd {
    /// Create a randomly initialised model and save it as an HF directory.
    New {
        /// A config file (JSON) or an inline JSON object, e.g. '{"n_layer":2,"n_exp":4}'.
        /// Default: nanoMoE's setup (6 layers, 384 wide, 8 experts, top-2, stride 2).
        #[arg(long)]
        config: Option<String>,
        /// The directory to write (config.json, model.safetensors, generation_config.json).
        #[arg(long)]
        out: PathBuf,
        /// Seed of the random initialisation.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight dtype on disk: f32, f16 or bf16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Shard weights above this size (e.g. 5GB, 200MB).
        #[arg(long, default_value = "50GB")]
        max_shard_size: String,
    },
    /// Convert a nanoGPT/nanoMoE ckpt.pt, an HF model directory or a GGUF file into an HF
    /// directory, or into a GGUF file (--out NAME.gguf) llama.cpp reads.
    Convert {
        /// A ckpt.pt (nanoGPT, wolfecameron/nanoMoE or askerlee/nanoMoE train.py), an HF
        /// model directory, or a .gguf file. Pickles are read without running any code.
        input: PathBuf,
        /// The HF directory to write, or a file ending in .gguf: GGUF v3, llama.cpp's `gpt2`
        /// architecture for dense GPT-2 models, `nanomoe` for the others, with the tokenizer.
        #[arg(long)]
        out: PathBuf,
        /// Weight dtype on disk: f32, f16 or bf16; for GGUF also q8_0 or q4_0 (GGML's blocks
        /// of 32 weights with an f16 scale; norms, biases and routers stay f32).
        #[arg(long, default_value = "f32")]
        dtype: String,
    },
    /// Upload a model directory to the Hub (creates the repo; --revision picks the branch).
    Push {
        /// The model directory to upload.
        dir: PathBuf,
        /// The Hub repo, owner/name (HF_TOKEN or $HF_HOME/token authenticates; HF_ENDPOINT).
        repo: String,
        /// Create the repo as private.
        #[arg(long)]
        private: bool,
        /// The commit message.
        #[arg(long, default_value = "Upload model with nanomoe")]
        message: String,
    },
    /// Our side of the benchmarks (bench/bench.py runs it next to PyTorch); prints JSON.
    #[command(subcommand)]
    Bench(bench::Bench),
    /// Architecture, parameter counts, dtype and files of a model.
    Info {
        /// A model directory, a Hub repo id (owner/name), or gpt2 / gpt2-medium / gpt2-large / gpt2-xl.
        model: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run a forward pass; prints {"loss": ..., "losses": {...}} as JSON.
    Forward {
        /// A model directory, a Hub repo id (owner/name), or gpt2 / gpt2-medium / gpt2-large / gpt2-xl.
        model: PathBuf,
        /// Token ids: rows separated by ';', ids by ','. E.g. 1,2,3;4,5,6
        #[arg(long)]
        ids: String,
        /// HF-style labels (shifted inside the model, -100 ignored), same shape as --ids.
        #[arg(long, allow_hyphen_values = true)]
        labels: Option<String>,
        /// Write the logits [B, T, V] to this safetensors file as tensor `logits`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// MoE routing without a capacity limit.
        #[arg(long)]
        dropless: bool,
    },
    /// Train a model, nanoGPT style: `nanomoe train [CONFIG.toml] [--key=value ...]`.
    /// With no arguments: a small MoE on the built-in grammar corpus.
    #[command(disable_help_flag = false)]
    Train {
        /// A TOML config file, then --key=value overrides (e.g. --batch_size=16).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Tokenize text into nanoGPT's train.bin / val.bin + meta.json + tokenizer files.
    Prepare {
        /// A text file, or a directory of text files.
        #[arg(long, required_unless_present = "dataset")]
        input: Option<PathBuf>,
        /// A named dataset to download (needs network access): shakespeare.
        #[arg(long, conflicts_with = "input")]
        dataset: Option<String>,
        /// char, gpt2, or a path to a tokenizer.json.
        #[arg(long, default_value = "char")]
        tokenizer: String,
        /// Share of the tokens that go to val.bin (taken from the end, as nanoGPT does).
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// Column holding the text in parquet inputs.
        #[arg(long, default_value = "text")]
        text_column: String,
        /// The data directory to write (train.bin, val.bin, meta.json, tokenizer files).
        #[arg(long)]
        out: PathBuf,
    },
    /// Loss, perplexity and MoE statistics of a model on a prepared dataset.
    Eval {
        /// A model directory, a Hub repo id (owner/name), or gpt2 / gpt2-medium / gpt2-large / gpt2-xl.
        model: PathBuf,
        /// A directory made by `prepare`, or builtin:grammar / builtin:arithmetic (the corpora
        /// `train` generates, with its default seed).
        #[arg(long)]
        data: PathBuf,
        /// train or val.
        #[arg(long, default_value = "val")]
        split: String,
        /// Batches to average over.
        #[arg(long, default_value_t = 50)]
        iters: u64,
        /// Sequences (of block_size tokens) per batch.
        #[arg(long, default_value_t = 8)]
        batch_size: usize,
        /// Seed of the batches' random offsets.
        #[arg(long, default_value_t = 1337)]
        seed: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Sample text from a model (nanoGPT's sample.py), streaming.
    Sample {
        /// A model directory, a Hub repo id (owner/name), or gpt2 / gpt2-medium / gpt2-large / gpt2-xl.
        model: PathBuf,
        /// Start text; FILE:path reads a file. Default: a newline.
        #[arg(long, default_value = "\n")]
        prompt: String,
        /// Samples to draw.
        #[arg(long, default_value_t = 1)]
        num_samples: usize,
        /// Tokens per sample.
        #[arg(long, default_value_t = 200)]
        max_new_tokens: usize,
        /// Softmax temperature (< 1 sharper, > 1 more random).
        #[arg(long, default_value_t = 0.8)]
        temperature: f64,
        /// Sample only among the k most likely tokens.
        #[arg(long, default_value_t = 200)]
        top_k: usize,
        /// Random seed.
        #[arg(long, default_value_t = 1337)]
        seed: u64,
    },
    /// Build, save or run a tokenizer: prints the ids of --text (or the text of --decode).
    Tokenize {
        /// char, gpt2, or a tokenizer.json / model directory.
        #[arg(long, default_value = "gpt2")]
        tokenizer: String,
        /// Corpus a character-level tokenizer is built from.
        #[arg(long)]
        corpus: Option<PathBuf>,
        /// Write tokenizer.json and tokenizer_config.json into this directory.
        #[arg(long)]
        save: Option<PathBuf>,
        /// Text to encode; FILE:path reads a file.
        #[arg(long)]
        text: Option<String>,
        /// Comma-separated ids to decode.
        #[arg(long, conflicts_with = "text")]
        decode: Option<String>,
    },
    /// Serve the model over HTTP with OpenAI's API (/v1/completions, /v1/chat/completions,
    /// /v1/models, /health, /metrics), continuous batching and streaming.
    ///
    /// Requests join the running batch as slots free up and leave it at token boundaries;
    /// prompts are prefilled in chunks between decoding steps; MoE layers route dropless.
    /// Greedy output (temperature 0) equals `nanomoe generate --greedy --dropless` for the
    /// same --prefill-chunk, alone or in a full batch. Listens on 127.0.0.1 unless --host
    /// says otherwise. Example:
    ///   nanomoe serve out/model --port 8000
    ///   curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
    ///        -d '{"prompt": "Once upon a time", "max_tokens": 32, "temperature": 0}'
    #[command(verbatim_doc_comment)]
    Serve {
        /// A model directory, a Hub repo id (owner/name), or gpt2 / gpt2-medium / gpt2-large / gpt2-xl.
        model: PathBuf,
        /// The address to listen on (0.0.0.0 for every interface).
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        /// The port (0: any free port; the address is printed).
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// The model name clients use (default: MODEL as given).
        #[arg(long)]
        served_model_name: Option<String>,
        /// Most sequences decoded together (each of a request's n choices is one).
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Most requests waiting for a slot; more get 429 at once.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// Prompt tokens per prefill pass (between decoding steps of the running batch).
        #[arg(long, default_value_t = nanomoe::generate::DEFAULT_PREFILL_CHUNK)]
        prefill_chunk: usize,
        /// Require `Authorization: Bearer KEY` on every endpoint but /health
        /// (default: the NANOMOE_API_KEY environment variable, if set).
        #[arg(long)]
        api_key: Option<String>,
        /// Largest request body in bytes.
        #[arg(long, default_value_t = 1 << 20)]
        max_body: usize,
        /// Seconds running requests get to finish after SIGINT/SIGTERM.
        #[arg(long, default_value_t = 30)]
        shutdown_grace: u64,
    },
    /// Generate from a text prompt (--prompt) or token ids (--ids), HF generate style:
    /// sampling by default, --greedy for argmax, the KV cache unless --no-cache.
    Generate {
        /// A model directory, a Hub repo id (owner/name), or gpt2 / gpt2-medium / gpt2-large / gpt2-xl.
        model: PathBuf,
        /// Prompt ids: rows separated by ';', ids by ','.
        #[arg(long, required_unless_present = "prompt", conflicts_with = "prompt")]
        ids: Option<String>,
        /// Text prompt (needs a tokenizer in the model directory); FILE:path reads a file.
        #[arg(long)]
        prompt: Option<String>,
        /// Print text as it is generated.
        #[arg(long, requires = "prompt")]
        stream: bool,
        /// Tokens to generate per prompt (fewer if eos comes first).
        #[arg(long, default_value_t = 32)]
        max_new_tokens: usize,
        /// Greedy decoding (argmax) instead of sampling.
        #[arg(long, conflicts_with_all = ["temperature", "top_k", "top_p", "min_p"])]
        greedy: bool,
        /// Softmax temperature when sampling [default: 1.0].
        #[arg(long)]
        temperature: Option<f64>,
        /// Sample only among the k most likely tokens.
        #[arg(long)]
        top_k: Option<usize>,
        /// Nucleus sampling: the smallest set of tokens holding this much probability.
        #[arg(long)]
        top_p: Option<f64>,
        /// Drop tokens less likely than min_p times the most likely one.
        #[arg(long)]
        min_p: Option<f64>,
        /// CTRL's penalty on tokens already in the context (1.0 = none).
        #[arg(long, default_value_t = 1.0)]
        repetition_penalty: f64,
        /// Random seed (default: a fresh one each run).
        #[arg(long)]
        seed: Option<u64>,
        /// Do not stop at the eos token of generation_config.json.
        #[arg(long)]
        ignore_eos: bool,
        /// Recompute the whole context every step instead of using the KV cache.
        #[arg(long)]
        no_cache: bool,
        /// MoE routing without a capacity limit.
        #[arg(long)]
        dropless: bool,
        /// Run the prompt through the model at most this many tokens at a time (what
        /// `nanomoe serve --prefill-chunk` does; equal chunks give equal outputs).
        #[arg(long, default_value_t = nanomoe::generate::DEFAULT_PREFILL_CHUNK)]
        prefill_chunk: usize,
        /// Print {"ids": [[...]]} (new tokens only).
        #[arg(long)]
        json: bool,
    },
}

pub fn run() -> Result<()> {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand) {
                e.exit();
            }
            return Err(anyhow!("{}", e.to_string().lines().next().unwrap_or("invalid arguments")));
        }
    };
    let _ = REVISION.set(cli.revision.clone());
    let weight_format = match cli.weight_dtype.as_deref() {
        None => None,
        Some(s) => match WeightFormat::parse(s) {
            Some(f) => Some(f),
            None => bail!("--weight-dtype must be one of {}, got '{s}'", WeightFormat::NAMES),
        },
    };
    let weight_format_name = weight_format.map(WeightFormat::name).unwrap_or("f32");
    if weight_format.is_some_and(|f| f != WeightFormat::F32) && matches!(cli.cmd, Cmd::Train { .. } | Cmd::Bench(bench::Bench::Train { .. }) | Cmd::Bench(bench::Bench::MoeLayer { .. })) {
        bail!("--weight-dtype {weight_format_name} is for inference commands; training keeps f32 weights");
    }
    let _ = WEIGHT_FORMAT.set(weight_format);
    if matches!(cli.cmd, Cmd::Train { .. } | Cmd::Bench(bench::Bench::Train { .. }) | Cmd::Bench(bench::Bench::MoeLayer { .. })) {
        // Training allocates the same activations every step; inference keeps memory low.
        // (Before the pool's threads exist: each takes its malloc arena when it starts.)
        let _ = nanomoe::runtime::keep_freed_memory();
    }
    nanomoe::runtime::set_threads(cli.threads)?;
    if let Cmd::Serve { .. } = cli.cmd {
        // The server's engine takes a thread of the compute pool itself; the HTTP side
        // runs on tokio's threads.
        return execute(cli);
    }
    nanomoe::runtime::on_compute_pool(move || execute(cli))
}

fn execute(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::New { config, out, seed, dtype, max_shard_size } => cmd_new(config.as_deref(), &out, seed, &dtype, &max_shard_size),
        Cmd::Info { model, json } => cmd_info(&model, json),
        Cmd::Bench(b) => bench::run(b, model_dir),
        Cmd::Push { dir, repo, private, message } => {
            let opts = nanomoe::hub_upload::PushOptions { private, revision: cli.revision.clone(), message };
            let client = nanomoe::hub::HubClient::from_env();
            let commit = client.push_folder(&dir, &repo, &opts)?;
            println!("pushed {} to {}/{} (commit {commit})", dir.display(), client.endpoint, repo);
            Ok(())
        }
        Cmd::Convert { input, out, dtype } if nanomoe::gguf::is_gguf_path(&out) => {
            let format = WeightFormat::parse(&dtype).ok_or_else(|| anyhow!("--dtype must be one of {} for a GGUF file, got '{dtype}'", WeightFormat::NAMES))?;
            let m = nanomoe::gguf::convert(&input, &out, format)?;
            let arch = if nanomoe::gguf::uses_gpt2_arch(&m.config) { "gpt2" } else { "nanomoe" };
            let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
            println!("converted {} to {} (GGUF v3, architecture {arch}, {} parameters, {}, {size} bytes)", input.display(), out.display(), m.num_params(), m.weight_format().name().replace("f32", format.name()));
            Ok(())
        }
        Cmd::Convert { input, out, dtype } => {
            if nanomoe::gguf::is_gguf_path(&input) {
                let m = nanomoe::gguf::load(&input)?;
                if m.gpt.params().is_quantized() {
                    bail!("{} holds {} weights: an HF directory is written from a GGUF file with f32, f16 or bf16 weights", input.display(), m.gpt.weight_format().name());
                }
                let opts = SaveOptions { dtype: SaveDType::parse(&dtype)?, ..Default::default() };
                m.gpt.save_pretrained_with(&out, &opts)?;
                if let Some(t) = &m.tokenizer {
                    t.save_pretrained(&out, Some(m.gpt.config.block_size))?;
                }
                println!("converted {} to {} ({} parameters, {})", input.display(), out.display(), m.gpt.num_params(), opts.dtype.hf_name());
                return Ok(());
            }
            let opts = SaveOptions { dtype: SaveDType::parse(&dtype)?, ..Default::default() };
            let m = nanomoe::convert::convert(&input, &out, &opts)?;
            println!(
                "converted {} to {} ({}, {} parameters, {})",
                input.display(),
                out.display(),
                if m.config.is_moe() { "nanomoe_gpt" } else { "gpt2" },
                m.num_params(),
                opts.dtype.hf_name()
            );
            Ok(())
        }
        Cmd::Train { args } => cmd_train(&args),
        Cmd::Prepare { input, dataset, tokenizer, val_fraction, text_column, out } => cmd_prepare(input, dataset, tokenizer, val_fraction, text_column, out),
        Cmd::Eval { model, data, split, iters, batch_size, seed, json } => cmd_eval(&model, &data, &split, iters, batch_size, seed, json),
        Cmd::Sample { model, prompt, num_samples, max_new_tokens, temperature, top_k, seed } => {
            cmd_sample(&model, &prompt, num_samples, max_new_tokens, temperature, top_k, seed)
        }
        Cmd::Tokenize { tokenizer, corpus, save, text, decode } => cmd_tokenize(&tokenizer, corpus.as_deref(), save.as_deref(), text, decode),
        Cmd::Serve { model, host, port, served_model_name, max_batch, max_queue, prefill_chunk, api_key, max_body, shutdown_grace } => {
            let dir = model_dir(&model)?;
            let gpt = inference_model(&dir)?;
            let tok = model_tokenizer(&dir).map_err(|e| anyhow!("{e} (nanomoe serve needs the model's tokenizer)"))?;
            let chat = if nanomoe::gguf::is_gguf_path(&dir) { nanomoe::serve::ChatTemplate::from_gguf(&dir)? } else { nanomoe::serve::ChatTemplate::from_dir(&dir)? };
            let eos = generation_eos(&dir)?;
            let api_key = api_key.or_else(|| std::env::var("NANOMOE_API_KEY").ok().filter(|k| !k.is_empty()));
            let opts = nanomoe::serve::ServeOptions {
                host,
                port,
                name: served_model_name.unwrap_or_else(|| model.display().to_string()),
                api_key,
                max_body,
                engine: nanomoe::serve::EngineOptions { max_batch, max_queue, prefill_chunk },
                shutdown_grace: std::time::Duration::from_secs(shutdown_grace),
            };
            Ok(nanomoe::serve::serve(gpt, tok, chat, eos, opts)?)
        }
        Cmd::Forward { model, ids, labels, out, dropless } => cmd_forward(&model, &ids, labels.as_deref(), out.as_deref(), dropless),
        Cmd::Generate {
            model,
            ids,
            prompt,
            stream,
            max_new_tokens,
            greedy,
            temperature,
            top_k,
            top_p,
            min_p,
            repetition_penalty,
            seed,
            ignore_eos,
            no_cache,
            dropless,
            prefill_chunk,
            json,
        } => {
            let gen = GenerationConfig {
                max_new_tokens,
                do_sample: !greedy,
                temperature: temperature.unwrap_or(1.0),
                top_k,
                top_p,
                min_p,
                repetition_penalty,
                eos_token_id: None,
                pad_token_id: None,
                seed,
                use_cache: !no_cache,
                prefill_chunk,
            };
            let input = match (ids, prompt) {
                (Some(ids), _) => PromptArg::Ids(ids),
                (None, Some(p)) => PromptArg::Text(read_prompt(&p)?),
                (None, None) => bail!("give --ids or --prompt"),
            };
            cmd_generate(&model, input, gen, GenerateFlags { ignore_eos, dropless, json, stream })
        }
    }
}

fn load_config_arg(arg: &str) -> Result<GPTConfig> {
    let text = if arg.trim_start().starts_with('{') {
        arg.to_string()
    } else {
        std::fs::read_to_string(arg).with_context(|| format!("cannot read config file {arg}"))?
    };
    let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("config {arg:?} is not valid JSON: {e}"))?;
    let cfg = if v.get("model_type").and_then(Value::as_str) == Some("gpt2") {
        GPTConfig::from_gpt2_json(&v)?
    } else {
        GPTConfig::from_json_value(&v)?
    };
    Ok(cfg)
}

fn cmd_new(config: Option<&str>, out: &Path, seed: u64, dtype: &str, max_shard_size: &str) -> Result<()> {
    let cfg = match config {
        Some(c) => load_config_arg(c)?,
        None => GPTConfig::nano_moe(),
    };
    let opts = SaveOptions { dtype: SaveDType::parse(dtype)?, max_shard_size: checkpoint::parse_size(max_shard_size)? };
    let model = GPT::new_seeded(&cfg, seed, &Device::Cpu)?;
    model.save_pretrained_with(out, &opts)?;
    println!(
        "saved a {} model with {} parameters to {}",
        if cfg.is_moe() { "nanomoe_gpt (MoE)" } else { "gpt2 (dense)" },
        model.num_params(),
        out.display()
    );
    Ok(())
}

fn cmd_info_gguf(path: &Path, as_json: bool) -> Result<()> {
    let file = nanomoe::gguf::GgufFile::open(path)?;
    let m = nanomoe::gguf::load(path)?;
    let cfg = &m.gpt.config;
    let mut types = std::collections::BTreeMap::<&str, usize>::new();
    for t in &file.tensors {
        *types.entry(t.ty.name()).or_default() += 1;
    }
    let bytes = std::fs::metadata(path)?.len();
    if as_json {
        let v = json!({
            "format": "gguf",
            "version": file.version,
            "architecture": m.architecture,
            "config": serde_json::to_value(cfg)?,
            "parameters": m.gpt.num_params(),
            "active_parameters": m.gpt.num_active_params(),
            "weight_format": m.gpt.weight_format().name(),
            "tensor_types": types,
            "tensors": file.tensors.len(),
            "metadata_keys": file.metadata.len(),
            "tokenizer": m.tokenizer.is_some(),
            "eos_token_id": m.eos_token_id,
            "bytes": bytes,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model:      {} (GGUF v{}, {bytes} bytes)", path.display(), file.version);
    println!("arch:       {}", m.architecture);
    println!(
        "shape:      {} layers, {} heads, {} wide, block {}, vocab {}, {:?}, {}",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size, cfg.norm_type, cfg.activation_function
    );
    if cfg.is_moe() {
        println!("moe:        {} experts, top-{}, stride {}", cfg.n_exp, cfg.moe_top_k, cfg.stride);
    }
    println!("params:     {} ({} active per token)", m.gpt.num_params(), m.gpt.num_active_params());
    println!("weights:    {} ({} tensors: {types:?})", m.gpt.weight_format().name(), file.tensors.len());
    println!("tokenizer:  {}, eos {:?}", if m.tokenizer.is_some() { "yes" } else { "none" }, m.eos_token_id);
    Ok(())
}

fn cmd_info(model: &Path, as_json: bool) -> Result<()> {
    let dir = model_dir(model)?;
    if nanomoe::gguf::is_gguf_path(&dir) {
        return cmd_info_gguf(&dir, as_json);
    }
    let (cfg, format) = checkpoint::read_config(&dir)?;
    let files = checkpoint::weight_files(&dir)?;
    let mut dtypes = std::collections::BTreeSet::new();
    let mut total = 0usize;
    for f in &files {
        let (n, d) = safetensors_summary(f)?;
        total += n;
        dtypes.extend(d);
    }
    let gpt = GPT::from_pretrained(&dir)?;
    let mut listing = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let e = entry?;
        let size = e.metadata().map(|m| m.len()).unwrap_or(0);
        listing.push((e.file_name().to_string_lossy().to_string(), size));
    }
    listing.sort();
    let arch = match format {
        checkpoint::Format::Gpt2 => "gpt2",
        checkpoint::Format::NanoMoe => "nanomoe_gpt",
    };
    let moe_layers: Vec<usize> = (0..cfg.n_layer).filter(|&i| cfg.is_moe_layer(i)).collect();
    let dtypes: Vec<String> = dtypes.into_iter().collect();
    if as_json {
        let v = json!({
            "model_type": arch,
            "config": serde_json::to_value(&cfg)?,
            "parameters": gpt.num_params(),
            "active_parameters": gpt.num_active_params(),
            "stored_elements": total,
            "moe_layers": moe_layers,
            "dtype": dtypes,
            "files": listing.iter().map(|(n, s)| json!({"name": n, "bytes": s})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("model:      {}", dir.display());
    println!("model_type: {arch}");
    println!(
        "shape:      {} layers, {} heads, {} wide, block {}, vocab {}, bias {}, {}",
        cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size, cfg.bias, cfg.activation_function
    );
    println!(
        "blocks:     {:?} eps {}, qk-norm {}, experts {:?}",
        cfg.norm_type, cfg.layer_norm_epsilon, cfg.qk_norm, cfg.expert_mlp
    );
    if cfg.is_moe() {
        println!(
            "moe:        {} experts, top-{}, stride {} (MoE blocks {:?}), capacity train {} / eval {} (min {})",
            cfg.n_exp, cfg.moe_top_k, cfg.stride, moe_layers, cfg.train_capacity, cfg.eval_capacity, cfg.min_capacity
        );
    }
    println!("parameters: {} total, {} active per token", fmt_count(gpt.num_params()), fmt_count(gpt.num_active_params()));
    println!("dtype:      {}", dtypes.join(", "));
    println!("files:");
    for (n, s) in listing {
        println!("  {n:<40} {s:>12} bytes");
    }
    Ok(())
}

fn fmt_count(n: usize) -> String {
    if n >= 1_000_000_000 {
        format!("{:.2}B ({n})", n as f64 / 1e9)
    } else if n >= 1_000_000 {
        format!("{:.2}M ({n})", n as f64 / 1e6)
    } else {
        n.to_string()
    }
}

/// Element count and dtypes of a safetensors file, read from its header only.
fn safetensors_summary(path: &Path) -> Result<(usize, Vec<String>)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).with_context(|| format!("{}: truncated safetensors file", path.display()))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        bail!("{}: safetensors header of {n} bytes is not plausible", path.display());
    }
    let mut h = vec![0u8; n as usize];
    f.read_exact(&mut h).with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    let v: Value = serde_json::from_slice(&h).with_context(|| format!("{}: invalid safetensors header", path.display()))?;
    let mut count = 0usize;
    let mut dtypes = Vec::new();
    for (k, t) in v.as_object().into_iter().flatten() {
        if k == "__metadata__" {
            continue;
        }
        let shape: Vec<usize> = serde_json::from_value(t["shape"].clone()).unwrap_or_default();
        count += shape.iter().product::<usize>();
        if let Some(d) = t["dtype"].as_str() {
            if !dtypes.iter().any(|x| x == d) {
                dtypes.push(d.to_string());
            }
        }
    }
    Ok((count, dtypes))
}

/// Parses "1,2,3;4,5,6" into rows.
fn parse_rows(s: &str, what: &str) -> Result<Vec<Vec<i64>>> {
    let rows: Vec<Vec<i64>> = s
        .split(';')
        .map(|row| {
            row.split(',')
                .map(|x| x.trim().parse::<i64>().map_err(|_| anyhow!("{what}: {x:?} is not an integer")))
                .collect::<Result<Vec<i64>>>()
        })
        .collect::<Result<_>>()?;
    if rows.iter().any(Vec::is_empty) {
        bail!("{what}: empty row");
    }
    Ok(rows)
}

fn rows_tensor(rows: &[Vec<i64>], what: &str) -> Result<Tensor> {
    let t = rows[0].len();
    if rows.iter().any(|r| r.len() != t) {
        bail!("{what}: all rows must have the same length");
    }
    let flat: Vec<i64> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu)?)
}

fn scalar(t: &Option<Tensor>) -> Result<Value> {
    Ok(match t {
        Some(t) => json!(t.to_dtype(DType::F32)?.to_scalar::<f32>()?),
        None => Value::Null,
    })
}

fn cmd_forward(model: &Path, ids: &str, labels: Option<&str>, out: Option<&Path>, dropless: bool) -> Result<()> {
    let mut gpt = inference_model(&model_dir(model)?)?;
    if dropless {
        gpt.set_routing(Routing::Dropless);
    }
    let ids = rows_tensor(&parse_rows(ids, "--ids")?, "--ids")?;
    let labels = match labels {
        Some(l) => {
            let t = rows_tensor(&parse_rows(l, "--labels")?, "--labels")?;
            if t.dims() != ids.dims() {
                bail!("--labels has shape {:?} but --ids has shape {:?}", t.dims(), ids.dims());
            }
            Some(t)
        }
        None => None,
    };
    let o = gpt.forward(&ids, labels.as_ref())?;
    if let Some(path) = out {
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        let tmp = dir.join(format!(".{}.tmp-{}", path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default(), std::process::id()));
        checkpoint::write_safetensors(&tmp, &[("logits".to_string(), o.logits.clone())], SaveDType::F32)?;
        std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    }
    let v = json!({
        "loss": scalar(&o.loss)?,
        "losses": {
            "ntp_loss": scalar(&o.aux.ntp_loss)?,
            "aux_loss": scalar(&o.aux.aux_loss)?,
            "router_z_loss": scalar(&o.aux.router_z_loss)?,
        },
        "shape": o.logits.dims(),
    });
    println!("{}", serde_json::to_string(&v)?);
    Ok(())
}

fn cmd_prepare(input: Option<PathBuf>, dataset: Option<String>, tokenizer: String, val_fraction: f64, text_column: String, out: PathBuf) -> Result<()> {
    use std::io::IsTerminal;
    let input = match (input, dataset) {
        (Some(i), _) => i,
        (None, Some(d)) if d == "shakespeare" => {
            // The canonical tiny-shakespeare text (Karpathy's char-rnn data).
            const URL: &str = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt";
            let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            std::fs::create_dir_all(parent)?;
            let dest = parent.join(format!("{}-input.txt", out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_else(|| "data".into())));
            if !dest.is_file() {
                eprintln!("downloading tiny-shakespeare to {}", dest.display());
                if let Err(e) = nanomoe::hub::download_url(URL, &dest) {
                    bail!("cannot download the shakespeare dataset ({e}); offline, download tiny-shakespeare's input.txt yourself and pass --input input.txt");
                }
            }
            dest
        }
        (None, Some(d)) => bail!("unknown dataset {d:?} (known: shakespeare)"),
        (None, None) => bail!("give --input or --dataset"),
    };
    let inputs = nanomoe::train::prepare::list_inputs(&input)?;
    let opts = nanomoe::train::prepare::PrepareOptions { inputs, tokenizer, val_fraction, out: out.clone(), progress: std::io::stderr().is_terminal(), text_column };
    let meta = nanomoe::train::prepare::prepare(&opts)?;
    println!(
        "wrote {}: {} train and {} val tokens ({}), vocab_size {} ({} tokenizer)",
        out.display(),
        meta.train_tokens,
        meta.val_tokens,
        meta.dtype,
        meta.vocab_size,
        meta.tokenizer
    );
    println!("next: {} train --data_dir={} --out_dir=out", self_command(), out.display());
    Ok(())
}

fn cmd_eval(model: &Path, data: &Path, split: &str, iters: u64, batch_size: usize, seed: u64, as_json: bool) -> Result<()> {
    let dir = model_dir(model)?;
    let mut gpt = inference_model(&dir)?;
    // A built-in corpus is regenerated with training's default seed: the text `train` used.
    let corpus_seed = nanomoe::train::TrainSettings::default().seed;
    let (ds, _) = nanomoe::train::run::open_data(&data.to_string_lossy(), corpus_seed)?;
    if ds.meta.vocab_size > gpt.config.vocab_size {
        bail!("the data's vocabulary ({} tokens) is larger than the model's vocab_size {}", ds.meta.vocab_size, gpt.config.vocab_size);
    }
    if iters == 0 || batch_size == 0 {
        bail!("--iters and --batch-size must be at least 1");
    }
    let r = nanomoe::train::run::evaluate(&mut gpt, ds.split(split)?, batch_size, iters, seed)?;
    if as_json {
        println!("{}", serde_json::to_string(&json!({"split": split, "loss": r.loss, "perplexity": r.loss.exp(), "weights": gpt.weight_format().name(), "moe": r.moe}))?);
    } else {
        println!(
            "{split} loss {:.4}, perplexity {:.3} ({iters} batches of {batch_size} x {}, {} weights)",
            r.loss,
            r.loss.exp(),
            gpt.config.block_size,
            gpt.weight_format().name()
        );
        for l in &r.moe {
            println!("  layer {}: tokens per expert {:?}, drop rate {:.2}%, router entropy {:.3}", l.layer, l.tokens_per_expert, 100.0 * l.drop_rate, l.router_entropy);
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn cmd_sample(model: &Path, prompt: &str, num_samples: usize, max_new_tokens: usize, temperature: f64, top_k: usize, seed: u64) -> Result<()> {
    let dir = model_dir(model)?;
    let gpt = inference_model(&dir)?;
    let tok = model_tokenizer(&dir)?;
    let text = read_prompt(&prompt.replace("\\n", "\n"))?;
    let ids = tok.encode(&text)?;
    if ids.is_empty() {
        bail!("the prompt encodes to no tokens");
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= gpt.config.vocab_size) {
        bail!("the tokenizer produced id {bad}, outside the model's vocab_size {}: tokenizer and model disagree", gpt.config.vocab_size);
    }
    for k in 0..num_samples {
        let gen = GenerationConfig { max_new_tokens, temperature, top_k: Some(top_k), seed: Some(seed.wrapping_add(k as u64)), ..Default::default() };
        let mut printer = StreamPrinter::new(&tok, &ids)?;
        gpt.generate_with(std::slice::from_ref(&ids), &gen, |_, t| printer.push(t))?;
        println!("\n---------------");
    }
    Ok(())
}

fn cmd_train(args: &[String]) -> Result<()> {
    let (file, overrides) = match args.first() {
        Some(a) if !a.starts_with("--") => (Some(a.as_str()), &args[1..]),
        _ => (None, args),
    };
    let text = match file {
        Some(f) => Some(std::fs::read_to_string(f).with_context(|| format!("cannot read config file {f}"))?),
        None => None,
    };
    let resolved = nanomoe::train::Resolved::resolve(file.zip(text.as_deref()), overrides)?;
    // One process, or one of `mpirun -np N`'s (data-parallel training; rank 0 prints).
    let comm = nanomoe::dist::from_env(resolved.train.collective_timeout)?;
    let out = match nanomoe::train::run::train_with(&resolved, &comm) {
        Ok(o) => o,
        Err(e) => {
            if comm.size() > 1 {
                // No MPI_Finalize (it could wait for ranks still in a collective): exit, and
                // mpirun ends the others.
                std::mem::forget(comm);
            }
            return Err(e.into());
        }
    };
    if !comm.is_main() {
        return Ok(());
    }
    let dir = out.out_dir.join("model");
    println!("saved the model to {} (best by val loss: {})", dir.display(), out.out_dir.join("best").display());
    let me = self_command();
    let prompt = match resolved.train.data_dir.as_str() {
        nanomoe::train::settings::BUILTIN_ARITHMETIC => "12+34=",
        nanomoe::train::settings::BUILTIN_GRAMMAR => "the small",
        _ => "",
    };
    println!("next:");
    if prompt.is_empty() {
        println!("  {me} sample {}", dir.display()); // (the default prompt is a newline)
    } else {
        println!("  {me} sample {} --prompt \"{prompt}\"", dir.display());
    }
    println!("  {me} eval {} --data {}", dir.display(), resolved.train.data_dir);
    let gen = format!(
        "from transformers import AutoModelForCausalLM, AutoTokenizer; d = '{}'; t = AutoTokenizer.from_pretrained(d, trust_remote_code=True); \
         m = AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True); \
         print(t.decode(m.generate(**t('{}', return_tensors='pt'), max_new_tokens=40, do_sample=False)[0]))",
        dir.display(),
        if prompt.is_empty() { "\\n" } else { prompt }
    );
    match test_python() {
        Some(py) => println!("  {py} -c \"{gen}\""),
        None => println!("  python3 -c \"{gen}\"   (needs torch and transformers: ./scripts/test installs them in ~/.cache/nanomoe/venv-v2)"),
    }
    Ok(())
}

/// How to run this binary again from the current directory: `nanomoe` when that is what PATH
/// finds, else its path (./target/release/nanomoe after `cargo run --release`).
fn self_command() -> String {
    let Ok(exe) = std::env::current_exe() else { return "nanomoe".into() };
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join("nanomoe").canonicalize().ok().as_ref() == exe.canonicalize().ok().as_ref()))
        .unwrap_or(false);
    if on_path {
        return "nanomoe".into();
    }
    match std::env::current_dir().ok().and_then(|cwd| exe.strip_prefix(&cwd).ok().map(|p| p.to_path_buf())) {
        Some(rel) => format!("./{}", rel.display()),
        None => exe.display().to_string(),
    }
}

/// The Python of ./scripts/test's environment (torch + transformers), if it exists.
fn test_python() -> Option<String> {
    let home = std::env::var_os("HOME")?;
    let p = PathBuf::from(home).join(".cache/nanomoe/venv-v2/bin/python");
    p.is_file().then(|| p.display().to_string())
}

fn cmd_tokenize(spec: &str, corpus: Option<&Path>, save: Option<&Path>, text: Option<String>, decode: Option<String>) -> Result<()> {
    let corpus_text = match corpus {
        Some(p) => Some(std::fs::read_to_string(p).with_context(|| format!("cannot read corpus {}", p.display()))?),
        None => None,
    };
    if spec == "char" && corpus_text.is_none() {
        bail!("--tokenizer char needs --corpus FILE");
    }
    if save.is_none() && text.is_none() && decode.is_none() {
        bail!("nothing to do: give --text TEXT, --decode IDS or --save DIR (see nanomoe tokenize --help)");
    }
    let tok = nanomoe::tokenizer::Tokenizer::from_spec(spec, corpus_text.as_deref())?;
    if let Some(dir) = save {
        tok.save_pretrained(dir, None)?;
        eprintln!("saved tokenizer ({} tokens) to {}", tok.vocab_size(), dir.display());
    }
    if let Some(t) = text {
        let ids = tok.encode(&read_prompt(&t)?)?;
        println!("{}", serde_json::to_string(&json!({ "ids": ids }))?);
    }
    if let Some(d) = decode {
        let ids: Vec<u32> = d
            .split(',')
            .map(|x| x.trim().parse::<u32>().map_err(|_| anyhow!("--decode: {x:?} is not a token id")))
            .collect::<Result<_>>()?;
        if let Some(bad) = ids.iter().find(|&&i| i as usize >= tok.vocab_size()) {
            bail!("--decode: token id {bad} is out of range for a vocabulary of {}", tok.vocab_size());
        }
        println!("{}", serde_json::to_string(&json!({ "text": tok.decode(&ids)? }))?);
    }
    Ok(())
}

/// A text prompt argument: the text itself, or FILE:path.
pub fn read_prompt(arg: &str) -> Result<String> {
    match arg.strip_prefix("FILE:") {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("cannot read prompt file {path}")),
        None => Ok(arg.to_string()),
    }
}

enum PromptArg {
    Ids(String),
    Text(String),
}

struct GenerateFlags {
    ignore_eos: bool,
    dropless: bool,
    json: bool,
    stream: bool,
}

/// eos_token_id of a model directory's generation_config.json, if any.
pub fn generation_eos(dir: &Path) -> Result<Option<u32>> {
    if nanomoe::gguf::is_gguf_path(dir) {
        return Ok(nanomoe::gguf::read_eos(dir)?);
    }
    let p = dir.join(checkpoint::GENERATION_CONFIG_FILE);
    match std::fs::read_to_string(&p) {
        Ok(s) => {
            let v: Value = serde_json::from_str(&s).map_err(|e| anyhow!("{}: not valid JSON: {e}", p.display()))?;
            Ok(v.get("eos_token_id").and_then(Value::as_u64).map(|x| x as u32))
        }
        Err(_) => Ok(None),
    }
}

/// The tokenizer of a model directory, or a clear error.
pub fn model_tokenizer(dir: &Path) -> Result<nanomoe::tokenizer::Tokenizer> {
    if nanomoe::gguf::is_gguf_path(dir) {
        return nanomoe::gguf::read_tokenizer(dir)?.0.ok_or_else(|| anyhow!("{} holds no tokenizer: give token ids with --ids", dir.display()));
    }
    if !dir.join(nanomoe::tokenizer::TOKENIZER_FILE).is_file() {
        bail!("{} has no tokenizer.json: give token ids with --ids", dir.display());
    }
    Ok(nanomoe::tokenizer::Tokenizer::from_dir(dir)?)
}

fn cmd_generate(model: &Path, input: PromptArg, mut gen: GenerationConfig, flags: GenerateFlags) -> Result<()> {
    let dir = model_dir(model)?;
    let mut gpt = inference_model(&dir)?;
    if flags.dropless {
        gpt.set_routing(Routing::Dropless);
    }
    if !flags.ignore_eos {
        gen.eos_token_id = generation_eos(&dir)?;
    }
    let vocab = gpt.config.vocab_size;
    let (prompts, tokenizer) = match input {
        PromptArg::Ids(ids) => {
            let rows = parse_rows(&ids, "--ids")?;
            let mut prompts = Vec::with_capacity(rows.len());
            for r in &rows {
                let mut p = Vec::with_capacity(r.len());
                for &v in r {
                    if v < 0 || v as usize >= vocab {
                        bail!("token id {v} is out of range for vocab_size {vocab}");
                    }
                    p.push(v as u32);
                }
                prompts.push(p);
            }
            (prompts, None)
        }
        PromptArg::Text(text) => {
            let tok = model_tokenizer(&dir)?;
            let ids = tok.encode(&text)?;
            if ids.is_empty() {
                bail!("the prompt encodes to no tokens");
            }
            if let Some(bad) = ids.iter().find(|&&t| t as usize >= vocab) {
                bail!("the tokenizer produced id {bad}, outside the model's vocab_size {vocab}: tokenizer and model disagree");
            }
            (vec![ids], Some(tok))
        }
    };
    let out = if flags.stream {
        let tok = tokenizer.as_ref().expect("--stream requires --prompt");
        let mut printer = StreamPrinter::new(tok, &prompts[0])?;
        let out = gpt.generate_with(&prompts, &gen, |_, t| printer.push(t))?;
        println!();
        out
    } else {
        gpt.generate_with(&prompts, &gen, |_, _| {})?
    };
    let new: Vec<Vec<u32>> = out.iter().zip(&prompts).map(|(o, p)| o[p.len()..].to_vec()).collect();
    match (&tokenizer, flags.json) {
        (Some(tok), true) => {
            let texts: Vec<String> = new.iter().map(|r| tok.decode(r)).collect::<nanomoe::Result<_>>()?;
            println!("{}", serde_json::to_string(&json!({ "ids": new, "text": texts }))?);
        }
        (None, true) => println!("{}", serde_json::to_string(&json!({ "ids": new }))?),
        (Some(tok), false) => {
            if !flags.stream {
                println!("{}", tok.decode(&out[0])?);
            }
        }
        (None, false) => {
            for row in new {
                println!("{}", row.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(","));
            }
        }
    }
    Ok(())
}

/// Prints decoded text as tokens arrive, holding back bytes that do not form whole
/// characters yet.
pub struct StreamPrinter<'a> {
    tok: &'a nanomoe::tokenizer::Tokenizer,
    ids: Vec<u32>,
    printed: usize,
}

impl<'a> StreamPrinter<'a> {
    pub fn new(tok: &'a nanomoe::tokenizer::Tokenizer, prompt: &[u32]) -> Result<Self> {
        let mut p = StreamPrinter { tok, ids: prompt.to_vec(), printed: 0 };
        let text = tok.decode(prompt)?;
        print!("{text}");
        p.printed = text.len();
        Ok(p)
    }

    pub fn push(&mut self, id: u32) {
        use std::io::Write;
        self.ids.push(id);
        if let Ok(text) = self.tok.decode(&self.ids) {
            if !text.ends_with('\u{fffd}') && text.len() >= self.printed && text.is_char_boundary(self.printed) {
                print!("{}", &text[self.printed..]);
                self.printed = text.len();
                let _ = std::io::stdout().flush();
            }
        }
    }
}
