//! The HuggingFace side: model directories, the Hub, conversion of others' checkpoints,
//! tokenizers.
//! - [`checkpoint`]: HF-format directories (`gpt2` and `nanomoe_gpt`), safetensors I/O; GPT-2's
//!   Conv1D transpose lives only here.
//! - [`auto`]: `AutoModelForCausalLM`, `from_pretrained`, `save_pretrained`.
//! - [`convert`]: nanoGPT / nanoMoE `ckpt.pt` and HF directories -> HF directories.
//! - [`hf_cache`]: the local HuggingFace cache shared with Python.
//! - [`hub`]: loading by repo id from the Hub into that cache.
//! - [`hub_upload`]: `push_to_hub`: create, preupload, LFS upload, NDJSON commit.
//! - [`pickle`]: a bounded, non-executing reader of `torch.save` zips.
//! - [`tokenizer`]: character-level and GPT-2 tokenizers, saved as tokenizer.json.

pub mod auto;
pub mod checkpoint;
pub mod convert;
pub mod hf_cache;
pub mod hub;
pub mod hub_upload;
pub mod pickle;
pub mod tokenizer;
