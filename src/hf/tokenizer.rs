//! Tokenizers that travel with the model as `tokenizer.json` + `tokenizer_config.json`
//! (`"tokenizer_class": "PreTrainedTokenizerFast"`, so transformers' AutoTokenizer loads
//! exactly this tokenizer instead of rebuilding a GPT2Tokenizer that drops whitespace).
//!
//! Two come out of the box:
//! - character level, built from a corpus: a BPE with no merges, a `<unk>` for unseen
//!   characters and a Fuse decoder; ids are the sorted characters' indices, as nanoGPT's
//!   shakespeare_char prepare.py assigns them, with `<unk>` last;
//! - GPT-2's byte-level BPE, offline: vocabulary and merges are rebuilt from the GPT-2
//!   (r50k_base) ranks that the tiktoken-rs crate embeds.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::OnceLock;

use serde_json::{json, Value};
use tokenizers::decoders::fuse::Fuse;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::AddedToken;

use crate::error::{Error, Result};

pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const TOKENIZER_CONFIG_FILE: &str = "tokenizer_config.json";
pub const UNK: &str = "<unk>";
pub const ENDOFTEXT: &str = "<|endoftext|>";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    pub eos_token: Option<String>,
    pub bos_token: Option<String>,
    pub unk_token: Option<String>,
}

fn tk_err(e: impl std::fmt::Display) -> Error {
    Error::Msg(format!("tokenizer: {e}"))
}

/// GPT-2's reversible byte -> printable-character map (bytes_to_unicode in its encoder.py).
pub fn byte_to_char() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..256u32 {
        let printable = (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).expect("valid")
        } else {
            let c = char::from_u32(next).expect("valid");
            next += 1;
            c
        };
    }
    table
}

/// GPT-2's tokens in rank (= id) order, read from the r50k_base ranks tiktoken-rs embeds.
fn gpt2_ranks() -> Result<Vec<Vec<u8>>> {
    let bpe = tiktoken_rs::r50k_base_singleton();
    (0..50256u32).map(|id| bpe.decode_bytes(&[id]).map_err(|e| tk_err(format!("GPT-2 rank {id}: {e:?}")))).collect()
}

/// Rebuilds BPE merges from ranks: each multi-byte token is what byte-pair merging of its
/// bytes, using only lower-ranked tokens, leaves in exactly two parts.
fn merges_from_ranks(by_rank: &[Vec<u8>]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let rank_of: HashMap<&[u8], usize> = by_rank.iter().enumerate().map(|(i, b)| (b.as_slice(), i)).collect();
    let mut merges = Vec::new();
    for (rank, token) in by_rank.iter().enumerate() {
        if token.len() < 2 {
            continue;
        }
        let mut parts: Vec<Vec<u8>> = token.iter().map(|&b| vec![b]).collect();
        loop {
            let mut best: Option<(usize, usize)> = None;
            for i in 0..parts.len() - 1 {
                let joined = [parts[i].as_slice(), parts[i + 1].as_slice()].concat();
                if let Some(&r) = rank_of.get(joined.as_slice()) {
                    if r < rank && best.is_none_or(|(_, br)| r < br) {
                        best = Some((i, r));
                    }
                }
            }
            let Some((i, _)) = best else { break };
            let right = parts.remove(i + 1);
            parts[i].extend(right);
        }
        if parts.len() != 2 {
            return Err(tk_err(format!("cannot derive the merge of GPT-2 token {rank}")));
        }
        merges.push((parts[0].clone(), parts[1].clone()));
    }
    Ok(merges)
}

fn gpt2_tokenizer_json() -> Result<&'static str> {
    static JSON: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    JSON.get_or_init(|| build_gpt2_json().map_err(|e| e.to_string())).as_deref().map_err(tk_err)
}

fn build_gpt2_json() -> Result<String> {
    let table = byte_to_char();
    let show = |b: &[u8]| -> String { b.iter().map(|&x| table[x as usize]).collect() };
    let by_rank = gpt2_ranks()?;
    let vocab: Vocab = by_rank.iter().enumerate().map(|(i, b)| (show(b), i as u32)).collect();
    let merges: Vec<(String, String)> = merges_from_ranks(&by_rank)?.iter().map(|(a, b)| (show(a), show(b))).collect();
    let bpe = BPE::builder().vocab_and_merges(vocab, merges).build().map_err(tk_err)?;
    let mut tok = tokenizers::Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).trim_offsets(true).use_regex(true)));
    tok.with_decoder(Some(ByteLevel::default().add_prefix_space(false)));
    tok.with_post_processor(Some(ByteLevel::default().trim_offsets(false)));
    tok.add_special_tokens(&[AddedToken::from(ENDOFTEXT, true)]);
    tok.to_string(false).map_err(tk_err)
}

impl Tokenizer {
    /// Character-level tokenizer over the characters of `corpus`.
    pub fn char_level(corpus: &str) -> Result<Self> {
        let chars: BTreeSet<char> = corpus.chars().collect();
        Self::char_level_from_chars(chars)
    }

    pub fn char_level_from_chars(chars: BTreeSet<char>) -> Result<Self> {
        if chars.is_empty() {
            return Err(Error::Input("cannot build a character-level tokenizer from an empty corpus".into()));
        }
        let mut vocab: Vocab = chars.iter().enumerate().map(|(i, c)| (c.to_string(), i as u32)).collect();
        vocab.insert(UNK.to_string(), chars.len() as u32);
        let bpe = BPE::builder().vocab_and_merges(vocab, vec![]).unk_token(UNK.into()).build().map_err(tk_err)?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_decoder(Some(Fuse::new()));
        inner.add_special_tokens(&[AddedToken::from(UNK, true)]);
        Ok(Tokenizer { inner, eos_token: None, bos_token: None, unk_token: Some(UNK.into()) })
    }

    /// GPT-2's byte-level BPE (50257 tokens, `<|endoftext|>` = 50256), built offline.
    pub fn gpt2() -> Result<Self> {
        let inner: tokenizers::Tokenizer = gpt2_tokenizer_json()?.parse().map_err(tk_err)?;
        Ok(Tokenizer {
            inner,
            eos_token: Some(ENDOFTEXT.into()),
            bos_token: Some(ENDOFTEXT.into()),
            unk_token: Some(ENDOFTEXT.into()),
        })
    }

    /// `char`, `gpt2`, or a path to a tokenizer.json (or a directory holding one).
    pub fn from_spec(spec: &str, corpus_for_char: Option<&str>) -> Result<Self> {
        match spec {
            "gpt2" => Self::gpt2(),
            "char" => Self::char_level(corpus_for_char.ok_or_else(|| Error::Input("a character-level tokenizer needs a corpus".into()))?),
            path => {
                let p = Path::new(path);
                if p.is_dir() {
                    Self::from_dir(p)
                } else {
                    Self::from_file(p)
                }
            }
        }
    }

    /// Reads `tokenizer.json` (and `tokenizer_config.json` next to it when present).
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::file(path, e))?;
        let mut t = Self::from_json_str(&text).map_err(|e| match e {
            Error::Input(m) => Error::file(path, m),
            e => e,
        })?;
        let cfg_path = path.with_file_name(TOKENIZER_CONFIG_FILE);
        if cfg_path.is_file() {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).map_err(|e| Error::file(&cfg_path, e))?)
                .map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?;
            let tok = |k: &str| -> Option<String> {
                match v.get(k) {
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(String::from),
                    _ => None,
                }
            };
            t.eos_token = tok("eos_token");
            t.bos_token = tok("bos_token");
            t.unk_token = tok("unk_token");
        }
        Ok(t)
    }

    /// A tokenizer from the text of a tokenizer.json (no special tokens named).
    pub fn from_json_str(text: &str) -> Result<Self> {
        // Parsed once: checked as JSON, then handed to the tokenizers library.
        let v: Value = serde_json::from_str(text).map_err(|e| Error::Input(format!("not a valid tokenizer.json: {e}")))?;
        check_token_ids(&v).map_err(|e| Error::Input(format!("not a valid tokenizer.json: {e}")))?;
        let inner: tokenizers::Tokenizer = crate::runtime::catch_panic(|| serde_json::from_value::<tokenizers::Tokenizer>(v))
            .map_err(|p| Error::Input(format!("not a valid tokenizer.json: the tokenizers library failed on it ({p})")))?
            .map_err(|e| Error::Input(format!("not a valid tokenizer.json: {e}")))?;
        Ok(Tokenizer { inner, eos_token: None, bos_token: None, unk_token: None })
    }

    /// The token of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The tokenizer of a model directory, if it has one.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join(TOKENIZER_FILE))
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = crate::runtime::catch_panic(|| self.inner.encode_fast(text, false)).map_err(tk_err)?;
        Ok(enc.map_err(tk_err)?.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        crate::runtime::catch_panic(|| self.inner.decode(ids, false)).map_err(tk_err)?.map_err(tk_err)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.eos_token.as_deref().and_then(|t| self.token_to_id(t))
    }

    /// How many ids below the largest have no token (the tokenizers library warns, listing
    /// each, when it saves such a vocabulary).
    pub fn id_holes(&self) -> usize {
        let vocab = self.inner.get_vocab(true);
        let max = vocab.values().max().map(|&m| m as usize + 1).unwrap_or(0);
        max.saturating_sub(vocab.len())
    }

    /// tokenizer.json as text.
    pub fn to_json(&self) -> Result<String> {
        crate::runtime::catch_panic(|| self.inner.to_string(false)).map_err(tk_err)?.map_err(tk_err)
    }

    pub fn config_json(&self, model_max_length: Option<usize>) -> Value {
        let mut v = json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "clean_up_tokenization_spaces": false,
            "add_prefix_space": false,
        });
        for (k, t) in [("eos_token", &self.eos_token), ("bos_token", &self.bos_token), ("unk_token", &self.unk_token)] {
            if let Some(t) = t {
                v[k] = json!(t);
            }
        }
        if let Some(n) = model_max_length {
            v["model_max_length"] = json!(n);
        }
        v
    }

    /// Writes tokenizer.json and tokenizer_config.json into `dir` (each written to a temporary
    /// file and renamed into place).
    pub fn save_pretrained(&self, dir: &Path, model_max_length: Option<usize>) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::file(dir, e))?;
        let mut cfg = serde_json::to_string_pretty(&self.config_json(model_max_length)).expect("json");
        cfg.push('\n');
        write_atomic(&dir.join(TOKENIZER_FILE), self.to_json()?.as_bytes())?;
        write_atomic(&dir.join(TOKENIZER_CONFIG_FILE), cfg.as_bytes())
    }
}

/// Token ids above this are refused when reading tokenizer.json: the largest vocabularies in
/// use hold ~256k tokens, and the tokenizers library walks every id up to the largest one when
/// it saves (an id of 1e9 asked for 4 GiB).
pub const MAX_TOKEN_ID: u64 = 1 << 24;

/// Checks the ids in tokenizer.json's vocabulary and added tokens before the tokenizers
/// library reads it.
fn check_token_ids(v: &Value) -> std::result::Result<(), String> {
    let mut ids: Vec<&Value> = Vec::new();
    if let Some(Value::Object(vocab)) = v.pointer("/model/vocab") {
        ids.extend(vocab.values());
    }
    if let Some(Value::Array(added)) = v.get("added_tokens") {
        ids.extend(added.iter().filter_map(|t| t.get("id")));
    }
    for id in ids {
        match id.as_u64() {
            Some(i) if i < MAX_TOKEN_ID => {}
            _ => return Err(format!("token id {id} is out of range (ids must be integers below {MAX_TOKEN_ID})")),
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let res = (|| -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::file(path, e));
    }
    Ok(())
}
