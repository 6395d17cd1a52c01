//! `nanomoe prepare`: text files -> nanoGPT's train.bin / val.bin + meta.json + tokenizer
//! files. Inputs are streamed in chunks cut at line starts, so memory stays flat on
//! multi-GB inputs; the last `val_fraction` of the text becomes the val split. The output
//! directory is written into a temporary directory and renamed into place when complete.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::checkpoint::AtomicDir;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;
use crate::train::data::{Meta, META_FILE};

const CHUNK: usize = 4 << 20;

#[derive(Debug, Clone)]
pub struct PrepareOptions {
    pub inputs: Vec<PathBuf>,
    /// "char", "gpt2" or a tokenizer.json path.
    pub tokenizer: String,
    pub val_fraction: f64,
    pub out: PathBuf,
    pub progress: bool,
    /// Column holding the text in parquet inputs (HF datasets' format).
    pub text_column: String,
}

fn is_parquet(p: &Path) -> bool {
    p.extension().is_some_and(|e| e == "parquet")
}

fn parquet_reader(path: &Path) -> Result<parquet::file::serialized_reader::SerializedFileReader<File>> {
    let f = File::open(path).map_err(|e| Error::file(path, e))?;
    parquet::file::serialized_reader::SerializedFileReader::new(f).map_err(|e| Error::file(path, format!("not a readable parquet file: {e}")))
}

fn parquet_rows(path: &Path) -> Result<u64> {
    use parquet::file::reader::FileReader;
    Ok(parquet_reader(path)?.metadata().file_metadata().num_rows().max(0) as u64)
}

/// Calls `f` with the text of every row of `column` (rows whose value is null are skipped).
fn for_each_parquet_doc(path: &Path, column: &str, mut f: impl FnMut(&str) -> Result<()>) -> Result<()> {
    use parquet::file::reader::FileReader;
    use parquet::record::Field;
    let reader = parquet_reader(path)?;
    let schema = reader.metadata().file_metadata().schema();
    let fields = schema.get_fields();
    let Some(field) = fields.iter().find(|t| t.name() == column) else {
        let names: Vec<&str> = fields.iter().map(|t| t.name()).collect();
        return Err(Error::file(path, format!("has no column {column:?} (columns: {}); choose one with --text-column", names.join(", "))));
    };
    let projection = parquet::schema::types::Type::group_type_builder(schema.name())
        .with_fields(vec![field.clone()])
        .build()
        .map_err(|e| Error::file(path, e))?;
    let rows = reader.get_row_iter(Some(projection)).map_err(|e| Error::file(path, e))?;
    for row in rows {
        let row = row.map_err(|e| Error::file(path, format!("unreadable row: {e}")))?;
        for (_, value) in row.get_column_iter() {
            match value {
                Field::Str(s) => f(s)?,
                Field::Null => {}
                other => return Err(Error::file(path, format!("column {column:?} holds {other:?}, not text"))),
            }
        }
    }
    Ok(())
}

/// The text files of an input: the file itself, or a directory's files (sorted, recursive).
pub fn list_inputs(input: &Path) -> Result<Vec<PathBuf>> {
    if input.is_file() {
        return Ok(vec![input.to_path_buf()]);
    }
    if !input.is_dir() {
        return Err(Error::file(input, "no such file or directory"));
    }
    let mut out = Vec::new();
    let mut stack = vec![input.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).map_err(|e| Error::file(&d, e))? {
            let p = e.map_err(|e| Error::file(&d, e))?.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.is_file() && !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) {
                out.push(p);
            }
        }
    }
    out.sort();
    if out.is_empty() {
        return Err(Error::file(input, "holds no files"));
    }
    if out.iter().any(|p| is_parquet(p)) && !out.iter().all(|p| is_parquet(p)) {
        return Err(Error::file(input, "mixes parquet and text files; prepare them separately"));
    }
    Ok(out)
}

/// Calls `f` with consecutive text chunks of all inputs, each cut just after a newline that
/// is followed by a non-space character (so BPE sees the same pieces as in one pass).
fn for_each_chunk(inputs: &[PathBuf], mut f: impl FnMut(&str) -> Result<()>) -> Result<()> {
    for path in inputs {
        let mut file = File::open(path).map_err(|e| Error::file(path, e))?;
        let mut carry: Vec<u8> = Vec::new();
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::file(path, e))?;
            if n == 0 {
                break;
            }
            carry.extend_from_slice(&buf[..n]);
            let cut = (1..carry.len()).rev().find(|&i| carry[i - 1] == b'\n' && !carry[i].is_ascii_whitespace());
            if let Some(cut) = cut {
                let rest = carry.split_off(cut);
                let text = std::str::from_utf8(&carry).map_err(|e| Error::file(path, format!("not UTF-8 text: {e}")))?;
                f(text)?;
                carry = rest;
            }
        }
        if !carry.is_empty() {
            let text = std::str::from_utf8(&carry).map_err(|e| Error::file(path, format!("not UTF-8 text: {e}")))?;
            f(text)?;
        }
    }
    Ok(())
}

struct BinWriter {
    w: BufWriter<File>,
    width: usize,
    count: u64,
    path: PathBuf,
}

impl BinWriter {
    fn new(path: PathBuf, width: usize) -> Result<Self> {
        let f = File::create(&path).map_err(|e| Error::file(&path, e))?;
        Ok(BinWriter { w: BufWriter::with_capacity(1 << 20, f), width, count: 0, path })
    }
    fn write(&mut self, ids: &[u32]) -> Result<()> {
        for &id in ids {
            let r = if self.width == 2 { self.w.write_all(&(id as u16).to_le_bytes()) } else { self.w.write_all(&id.to_le_bytes()) };
            r.map_err(|e| Error::file(&self.path, e))?;
        }
        self.count += ids.len() as u64;
        Ok(())
    }
    fn finish(self) -> Result<u64> {
        let f = self.w.into_inner().map_err(|e| Error::file(&self.path, e.error()))?;
        f.sync_all().map_err(|e| Error::file(&self.path, e))?;
        Ok(self.count)
    }
}

/// The tokenizer `opts` names; a character-level one is built from the characters `collect`
/// gathers in a first pass over the input.
fn make_tokenizer(opts: &PrepareOptions, bar: &ProgressBar, collect: impl FnOnce(&mut BTreeSet<char>) -> Result<()>) -> Result<Tokenizer> {
    if opts.tokenizer != "char" {
        return Tokenizer::from_spec(&opts.tokenizer, None);
    }
    bar.set_message("collecting characters");
    let mut chars = BTreeSet::new();
    collect(&mut chars)?;
    bar.set_position(0);
    Tokenizer::char_level_from_chars(chars)
}

/// The output directory being written: train.bin, val.bin, then meta.json and the tokenizer.
struct Output {
    dir: AtomicDir,
    train: BinWriter,
    val: BinWriter,
    width: usize,
}

impl Output {
    fn new(opts: &PrepareOptions, tokenizer: &Tokenizer) -> Result<Self> {
        let width = if tokenizer.vocab_size() <= 1 << 16 { 2 } else { 4 };
        let dir = AtomicDir::new(&opts.out)?;
        let train = BinWriter::new(dir.path("train.bin"), width)?;
        let val = BinWriter::new(dir.path("val.bin"), width)?;
        Ok(Output { dir, train, val, width })
    }

    /// Checks the splits, writes meta.json and the tokenizer, and puts the directory in place.
    fn finish(self, opts: &PrepareOptions, tokenizer: &Tokenizer) -> Result<Meta> {
        let meta = Meta {
            vocab_size: tokenizer.vocab_size(),
            dtype: if self.width == 2 { "uint16".into() } else { "uint32".into() },
            train_tokens: self.train.finish()?,
            val_tokens: self.val.finish()?,
            tokenizer: opts.tokenizer.clone(),
        };
        if meta.train_tokens == 0 {
            return Err(Error::Input("the input produced no training tokens".into()));
        }
        if opts.val_fraction > 0.0 && meta.val_tokens == 0 {
            return Err(Error::Input("the input is too short to split off a val set; lower --val-fraction".into()));
        }
        self.dir.write_json(META_FILE, &serde_json::to_value(&meta).expect("serializes"))?;
        tokenizer.save_pretrained(&self.dir.path(""), None)?;
        self.dir.commit()?;
        Ok(meta)
    }
}

/// Prepares a data directory; returns its meta.
pub fn prepare(opts: &PrepareOptions) -> Result<Meta> {
    if !(opts.val_fraction >= 0.0 && opts.val_fraction < 1.0) {
        return Err(Error::Input(format!("--val-fraction must be in [0, 1), got {}", opts.val_fraction)));
    }
    if opts.inputs.iter().any(|p| is_parquet(p)) {
        return prepare_parquet(opts);
    }
    let total: u64 = opts.inputs.iter().map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)).sum();
    if total == 0 {
        return Err(Error::Input(format!("the input ({}) has no text", opts.inputs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))));
    }
    let bar = if opts.progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {bytes}/{total_bytes} [{eta}]").expect("template"));

    let tokenizer = make_tokenizer(opts, &bar, |chars| {
        for_each_chunk(&opts.inputs, |t| {
            chars.extend(t.chars());
            bar.inc(t.len() as u64);
            Ok(())
        })
    })?;
    let mut out = Output::new(opts, &tokenizer)?;
    let (train, val) = (&mut out.train, &mut out.val);
    let split_at = ((1.0 - opts.val_fraction) * total as f64) as u64;
    let mut offset = 0u64;
    bar.set_message("tokenizing");
    for_each_chunk(&opts.inputs, |t| {
        let end = offset + t.len() as u64;
        if end <= split_at || opts.val_fraction == 0.0 {
            train.write(&tokenizer.encode(t)?)?;
        } else if offset >= split_at {
            val.write(&tokenizer.encode(t)?)?;
        } else {
            // Split this chunk at the first line start at or after the split point.
            let local = (split_at - offset) as usize;
            let cut = t[local..].find('\n').map(|i| local + i + 1).unwrap_or(t.len());
            train.write(&tokenizer.encode(&t[..cut])?)?;
            val.write(&tokenizer.encode(&t[cut..])?)?;
        }
        offset = end;
        bar.inc(t.len() as u64);
        Ok(())
    })?;
    bar.finish_and_clear();
    out.finish(opts, &tokenizer)
}

/// Parquet inputs: one document per row of the text column, each followed by the
/// tokenizer's end-of-text token (or a newline when it has none); the last `val_fraction`
/// of the rows become the val split.
fn prepare_parquet(opts: &PrepareOptions) -> Result<Meta> {
    let col = opts.text_column.as_str();
    let mut total_rows = 0u64;
    for p in &opts.inputs {
        total_rows += parquet_rows(p)?;
    }
    if total_rows == 0 {
        return Err(Error::Input("the parquet input has no rows".into()));
    }
    let bar = if opts.progress { ProgressBar::new(total_rows) } else { ProgressBar::hidden() };
    bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} rows [{eta}]").expect("template"));
    let tokenizer = make_tokenizer(opts, &bar, |chars| {
        chars.insert('\n'); // the document separator
        for p in &opts.inputs {
            for_each_parquet_doc(p, col, |t| {
                chars.extend(t.chars());
                bar.inc(1);
                Ok(())
            })?;
        }
        Ok(())
    })?;
    let sep: Vec<u32> = match tokenizer.eos_token_id() {
        Some(id) => vec![id],
        None => tokenizer.encode("\n")?,
    };
    let mut out = Output::new(opts, &tokenizer)?;
    let split_at = ((1.0 - opts.val_fraction) * total_rows as f64).ceil() as u64;
    let mut row = 0u64;
    bar.set_message("tokenizing");
    for p in &opts.inputs {
        for_each_parquet_doc(p, col, |t| {
            let ids = tokenizer.encode(t)?;
            let w = if row < split_at || opts.val_fraction == 0.0 { &mut out.train } else { &mut out.val };
            w.write(&ids)?;
            w.write(&sep)?;
            row += 1;
            bar.inc(1);
            Ok(())
        })?;
    }
    bar.finish_and_clear();
    out.finish(opts, &tokenizer)
}
