//! In-process fuzzing of every loader of untrusted files (`examples/fuzz.rs` runs it;
//! `tests/fuzz_regressions.rs` replays what it found).
//!
//! A *case* is the files of one directory. Each [`Target`] writes a case into a scratch
//! directory and calls the loader a user would reach with it (`from_pretrained`,
//! `Tokenizer::from_dir`, `load_ckpt`, `Dataset::open`, the training settings), then uses
//! what loaded (a forward pass, encoding, a batch). A loader may refuse an input with an
//! error; a panic is a bug. The scratch directory keeps the last case, so an abort (memory
//! limit) leaves its input on disk.

pub mod mutate;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

use crate::checkpoint::SaveOptions;
use crate::config::GPTConfig;
use crate::error::{Error, Result};
use crate::gpt::GPT;
use crate::tokenizer::Tokenizer;

/// What a case is fed to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// config.json alone (`read_config`).
    Config,
    /// A single-file model directory (`GPT::from_pretrained`, then a forward pass).
    Model,
    /// A sharded model directory (index + shards).
    Sharded,
    /// tokenizer.json + tokenizer_config.json (`Tokenizer::from_dir`, encode, decode, save).
    Tokenizer,
    /// A torch.save `ckpt.pt` (`convert::load_ckpt`).
    Ckpt,
    /// A prepared data directory (`Dataset::open`, id checks, a batch).
    Data,
    /// A training config file (`Resolved::resolve`, validation, the model config).
    Settings,
    /// A GGUF file (`gguf::load`, its tokenizer, then a forward pass).
    Gguf,
}

impl Target {
    pub const ALL: [Target; 8] = [Target::Config, Target::Model, Target::Sharded, Target::Tokenizer, Target::Ckpt, Target::Data, Target::Settings, Target::Gguf];

    pub fn name(self) -> &'static str {
        match self {
            Target::Config => "config",
            Target::Model => "model",
            Target::Sharded => "sharded",
            Target::Tokenizer => "tokenizer",
            Target::Ckpt => "ckpt",
            Target::Data => "data",
            Target::Settings => "settings",
            Target::Gguf => "gguf",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        Target::ALL.into_iter().find(|t| t.name() == s)
    }
}

/// The files of one directory: (relative name, bytes).
pub type Case = Vec<(String, Vec<u8>)>;

/// What a loader did with a case.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Loaded,
    Refused(String),
}

/// Reads a directory's files into a case (not recursive).
pub fn read_case(dir: &Path) -> Result<Case> {
    let mut case = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))? {
        let p = e.map_err(|e| Error::file(dir, e))?.path();
        if p.is_file() {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            case.push((name, std::fs::read(&p).map_err(|e| Error::file(&p, e))?));
        }
    }
    case.sort();
    Ok(case)
}

/// Writes a case into `dir`, replacing what was there.
pub fn write_case(case: &Case, dir: &Path) -> Result<()> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
    for (name, bytes) in case {
        std::fs::write(dir.join(name), bytes).map_err(|e| Error::file(dir.join(name), e))?;
    }
    Ok(())
}

fn tiny(n_exp: usize) -> GPTConfig {
    GPTConfig { block_size: 16, vocab_size: 40, n_layer: 2, n_head: 2, n_embd: 16, n_exp, stride: 2, moe_top_k: 2.min(n_exp), ..Default::default() }
}

/// Valid inputs to mutate: generated here, plus every case directory under
/// `corpus/<target>/` (e.g. ckpt.pt files written by PyTorch).
pub fn seeds(target: Target, corpus: &Path, scratch: &Path) -> Result<Vec<Case>> {
    let mut out = Vec::new();
    let dir = scratch.join("seed");
    let model = |cfg: &GPTConfig, opts: &SaveOptions| -> Result<Case> {
        let m = GPT::new_seeded(cfg, 1, &Device::Cpu)?;
        let _ = std::fs::remove_dir_all(&dir);
        m.save_pretrained_with(&dir, opts)?;
        read_case(&dir)
    };
    let configs = [tiny(1), tiny(4), tiny(4).with_seed_architecture(true), GPTConfig { bias: false, ..tiny(4).with_seed_architecture(false) }];
    match target {
        Target::Config | Target::Model => {
            for c in &configs {
                let mut case = model(c, &SaveOptions::default())?;
                if target == Target::Config {
                    case.retain(|(n, _)| n == "config.json");
                }
                out.push(case);
            }
        }
        Target::Sharded => {
            out.push(model(&tiny(4), &SaveOptions { max_shard_size: 8 << 10, ..Default::default() })?);
            out.push(model(&tiny(1), &SaveOptions { max_shard_size: 4 << 10, dtype: crate::checkpoint::SaveDType::BF16 })?);
        }
        Target::Tokenizer => {
            for t in [Tokenizer::char_level("Hello, world!\nThe quick brown fox jumps over the lazy dog. 0123456789 ünï\n")?, Tokenizer::gpt2()?] {
                let _ = std::fs::remove_dir_all(&dir);
                t.save_pretrained(&dir, Some(64))?;
                out.push(read_case(&dir)?);
            }
        }
        Target::Data => {
            let text = crate::train::grammar::corpus(300, 3).0;
            let input = scratch.join("seed-input.txt");
            std::fs::write(&input, &text).map_err(|e| Error::file(&input, e))?;
            for tk in ["char", "gpt2"] {
                let _ = std::fs::remove_dir_all(&dir);
                crate::train::prepare::prepare(&crate::train::prepare::PrepareOptions {
                    inputs: vec![input.clone()],
                    tokenizer: tk.into(),
                    val_fraction: 0.1,
                    out: dir.clone(),
                    progress: false,
                    text_column: "text".into(),
                })?;
                let mut case = read_case(&dir)?;
                // The GPT-2 tokenizer file is fuzzed by its own target.
                case.retain(|(n, b)| !(n == "tokenizer.json" && b.len() > 100_000));
                out.push(case);
            }
        }
        Target::Settings => {
            for text in [
                "# a settings file\nbatch_size = 8\nblock_size = 32\nn_layer = 2\nn_head = 2\nn_embd = 64\nn_exp = 4\nmax_iters = 10\nlearning_rate = 1e-3\n",
                "out_dir = \"out\"\ndata_dir = \"builtin:grammar\"\ngradient_accumulation_steps = 4\ndropout = 0.1\nuse_aux_loss = true\naux_loss_weight = 0.01\ntrain_capacity = 1.25\nstride = 2\nmoe_top_k = 2\nnorm_type = \"rmsnorm\"\nqk_norm = true\nactivation_function = \"relu2\"\nexpert_mlp = \"swiglu\"\n",
            ] {
                out.push(vec![("train.toml".into(), text.as_bytes().to_vec())]);
            }
        }
        Target::Gguf => {
            use crate::weight::WeightFormat;
            let tok = Tokenizer::char_level("Hello, world!\nThe quick brown fox jumps over the lazy dog.\n")?;
            let wide = |c: GPTConfig| GPTConfig { n_embd: 32, vocab_size: tok.vocab_size(), ..c };
            for (c, f) in [
                (wide(tiny(1)), WeightFormat::Quant(crate::quant::QKind::Q8_0)),
                (wide(tiny(4)), WeightFormat::Quant(crate::quant::QKind::Q4_0)),
                (wide(tiny(4).with_seed_architecture(true)), WeightFormat::F16),
            ] {
                let m = GPT::new_seeded(&c, 1, &Device::Cpu)?;
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).map_err(|e| Error::file(&dir, e))?;
                let extras = crate::gguf::GgufExtras { tokenizer: Some(&tok), eos_token_id: Some(0), ..Default::default() };
                crate::gguf::save(&m, &dir.join("model.gguf"), f, &extras)?;
                out.push(read_case(&dir)?);
            }
        }
        Target::Ckpt => {}
    }
    let extra = corpus.join(target.name());
    if let Ok(rd) = std::fs::read_dir(&extra) {
        let mut dirs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_dir()).collect();
        dirs.sort();
        for d in dirs {
            out.push(read_case(&d)?);
        }
    }
    Ok(out)
}

/// Writes `case` into `dir` and feeds it to the target's loader. `Err` is a panic's message.
pub fn run_case(target: Target, case: &Case, dir: &Path) -> std::result::Result<Outcome, String> {
    write_case(case, dir).map_err(|e| format!("cannot write the case: {e}"))?;
    match crate::runtime::catch_panic(|| load(target, dir)) {
        Ok(Ok(())) => Ok(Outcome::Loaded),
        Ok(Err(e)) => Ok(Outcome::Refused(e.to_string())),
        Err(p) => Err(p),
    }
}

fn load(target: Target, dir: &Path) -> Result<()> {
    let one_token = || Tensor::new(&[[0u32]], &Device::Cpu);
    match target {
        Target::Config => {
            let (c, _) = crate::checkpoint::read_config(dir)?;
            c.size().ok_or_else(|| Error::Config("size overflows".into()))?;
        }
        Target::Model | Target::Sharded => {
            let m = GPT::from_pretrained(dir)?;
            m.forward(&one_token()?, None)?;
        }
        Target::Tokenizer => {
            let t = Tokenizer::from_dir(dir)?;
            let ids = t.encode("Hello, world! The fox 123 ünï\n")?;
            t.decode(&ids)?;
            let n = (t.vocab_size() as u32).min(50);
            t.decode(&(0..n).collect::<Vec<_>>())?;
            // (A vocabulary with holes saves, but the tokenizers library prints every hole.)
            if t.id_holes() == 0 {
                t.to_json()?;
            }
            t.eos_token_id();
        }
        Target::Ckpt => {
            let m = crate::convert::load_ckpt(&dir.join("ckpt.pt"))?;
            m.forward(&one_token()?, None)?;
        }
        Target::Data => {
            let ds = crate::train::data::Dataset::open(dir)?;
            let vocab = ds.meta.vocab_size;
            for split in [&ds.train, &ds.val] {
                split.check_ids(vocab)?;
                if split.len() > 9 {
                    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
                    crate::train::data::get_batch(split, 2, 8, vocab, &mut rng, &Device::Cpu)?;
                }
            }
        }
        Target::Gguf => {
            let p = dir.join("model.gguf");
            let m = crate::gguf::load(&p)?;
            crate::gguf::read_tokenizer(&p)?;
            m.gpt.forward(&one_token()?, None)?;
        }
        Target::Settings => {
            let p = dir.join("train.toml");
            let text = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, e))?;
            let r = crate::train::Resolved::resolve(Some(("train.toml", &text)), &[])?;
            r.train.validate()?;
            let c = r.model_config(crate::train::settings::default_model(), 64)?;
            c.size().ok_or_else(|| Error::Config("size overflows".into()))?;
        }
    }
    Ok(())
}
