//! Training data: nanoGPT's `train.bin` / `val.bin` (flat little-endian token ids, uint16,
//! or uint32 when the vocabulary needs it, as `meta.json` records), memory-mapped, and
//! random-window batches drawn from a seeded generator.

use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const META_FILE: &str = "meta.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    pub vocab_size: usize,
    /// "uint16" or "uint32"
    pub dtype: String,
    pub train_tokens: u64,
    pub val_tokens: u64,
    /// "char", "gpt2" or the path the tokenizer came from.
    pub tokenizer: String,
}

impl Meta {
    pub fn width(&self) -> Result<usize> {
        match self.dtype.as_str() {
            "uint16" => Ok(2),
            "uint32" => Ok(4),
            d => Err(Error::Input(format!("meta.json: unknown dtype {d:?} (expected uint16 or uint32)"))),
        }
    }

    pub fn read(dir: &Path) -> Result<Self> {
        let p = dir.join(META_FILE);
        let s = std::fs::read_to_string(&p).map_err(|e| Error::file(&p, format!("{e} (prepare data with `nanomoe prepare`)")))?;
        serde_json::from_str(&s).map_err(|e| Error::file(&p, format!("invalid meta.json: {e}")))
    }
}

enum Tokens {
    Memory(Vec<u32>),
    Mapped { map: memmap2::Mmap, width: usize },
}

/// One split's token stream.
pub struct Split {
    name: String,
    tokens: Tokens,
    len: usize,
}

impl Split {
    pub fn from_vec(name: &str, ids: Vec<u32>) -> Self {
        let len = ids.len();
        Split { name: name.into(), tokens: Tokens::Memory(ids), len }
    }

    pub fn open(path: &Path, width: usize) -> Result<Self> {
        let f = File::open(path).map_err(|e| Error::file(path, e))?;
        let size = f.metadata().map_err(|e| Error::file(path, e))?.len() as usize;
        if size == 0 {
            return Err(Error::file(path, "is empty"));
        }
        if !size.is_multiple_of(width) {
            return Err(Error::file(path, format!("size {size} bytes is not a multiple of the token width {width}")));
        }
        // SAFETY: read-only map of a file this process does not modify.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::file(path, e))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        Ok(Split { name, tokens: Tokens::Mapped { map, width }, len: size / width })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Checks that every id is below `vocab` (one pass over the data).
    pub fn check_ids(&self, vocab: usize) -> Result<()> {
        for i in 0..self.len {
            let t = self.get(i);
            if t as usize >= vocab {
                return Err(Error::Input(format!(
                    "{} split holds token id {t} at position {i}, outside the model's vocab_size {vocab}",
                    self.name
                )));
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: usize) -> u32 {
        match &self.tokens {
            Tokens::Memory(v) => v[i],
            Tokens::Mapped { map, width: 2 } => u16::from_le_bytes([map[2 * i], map[2 * i + 1]]) as u32,
            Tokens::Mapped { map, .. } => u32::from_le_bytes([map[4 * i], map[4 * i + 1], map[4 * i + 2], map[4 * i + 3]]),
        }
    }
}

/// Train and val splits plus what they were made with.
pub struct Dataset {
    pub train: Split,
    pub val: Split,
    pub meta: Meta,
    /// Where the tokenizer files are (a prepared directory), if on disk.
    pub dir: Option<PathBuf>,
}

impl Dataset {
    pub fn open(dir: &Path) -> Result<Self> {
        if !dir.is_dir() {
            return Err(Error::file(dir, "no such data directory (prepare one with `nanomoe prepare`)"));
        }
        let meta = Meta::read(dir)?;
        let w = meta.width()?;
        let train = Split::open(&dir.join("train.bin"), w)?;
        let val = Split::open(&dir.join("val.bin"), w)?;
        Ok(Dataset { train, val, meta, dir: Some(dir.to_path_buf()) })
    }

    pub fn split(&self, name: &str) -> Result<&Split> {
        match name {
            "train" => Ok(&self.train),
            "val" => Ok(&self.val),
            other => Err(Error::Input(format!("unknown split {other:?} (train or val)"))),
        }
    }
}

/// A batch of `batch_size` random windows: inputs [B, T] and next-token targets [B, T].
pub fn get_batch(split: &Split, batch_size: usize, block_size: usize, vocab: usize, rng: &mut StdRng, device: &Device) -> Result<(Tensor, Tensor)> {
    if split.len() <= block_size {
        return Err(Error::Input(format!(
            "{} split has {} tokens, fewer than block_size + 1 = {}",
            split.name,
            split.len(),
            block_size + 1
        )));
    }
    let mut x = Vec::with_capacity(batch_size * block_size);
    let mut y = Vec::with_capacity(batch_size * block_size);
    for _ in 0..batch_size {
        let start = rng.random_range(0..split.len() - block_size);
        for i in start..start + block_size + 1 {
            let t = split.get(i);
            if t as usize >= vocab {
                return Err(Error::Input(format!(
                    "{} split holds token id {t} at position {i}, outside the model's vocab_size {vocab}",
                    split.name
                )));
            }
            if i < start + block_size {
                x.push(t);
            }
            if i > start {
                y.push(t as i64);
            }
        }
    }
    Ok((Tensor::from_vec(x, (batch_size, block_size), device)?, Tensor::from_vec(y, (batch_size, block_size), device)?))
}
