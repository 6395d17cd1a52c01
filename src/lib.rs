//! nanomoe: train, run and share GPT-2-style language models with Mixture-of-Experts
//! layers (nanoGPT + MoE), HuggingFace-native in both directions.
//!
//! Table of contents:
//! - [`config`]: `GPTConfig`, the hyper-parameters (its JSON form is `config.json`).
//! - [`params`]: parameter names, shapes, initialisation and the store that owns them.
//! - [`nn`]: layer norm, linear, GELU, softmax, cross-entropy: ops with a backward pass.
//! - [`kernels`]: fused CPU kernels (candle custom ops with a backward pass).
//! - [`moe`]: the Mixture-of-Experts layer: router, capacity, dispatch, aux and z losses.
//! - [`gpt`]: the GPT model, its forward passes and the KV cache.
//! - [`generate`]: HF-style and nanoGPT-style generation.
//! - [`grad_sink`]: weight gradients handed over by kernels, bypassing candle's accumulation.
//! - [`optim`]: AdamW with nanoMoE's decay groups, gradient clipping, the LR schedule.
//! - [`train_step`]: one optimisation step with gradient accumulation.
//! - [`checkpoint`]: HF-format directories (GPT-2 and nanomoe_gpt), safetensors I/O.
//! - [`convert`]: nanoGPT / nanoMoE `ckpt.pt` and HF directories -> HF directories.
//! - [`auto`]: `AutoModelForCausalLM`, `from_pretrained`, `save_pretrained`.
//! - [`train`]: data, settings, the training loop and resumable states.
//! - [`tokenizer`]: character-level and GPT-2 tokenizers, saved as tokenizer.json.
//! - [`hub`]: loading by repo id from the HuggingFace Hub into the shared cache.
//! - [`hub_upload`]: `push_to_hub`: create, preupload, LFS upload, NDJSON commit.
//! - [`hf_cache`]: the local HuggingFace cache shared with Python.
//! - [`runtime`]: thread count and allocator settings for the CPU backend.
//! - [`error`]: the error type.

pub mod auto;
pub mod checkpoint;
pub mod config;
pub mod convert;
pub mod error;
pub mod generate;
pub mod gpt;
pub mod grad_sink;
pub mod hf_cache;
pub mod hub;
pub mod hub_upload;
pub mod kernels;
pub mod moe;
pub mod nn;
pub mod optim;
pub mod params;
pub mod runtime;
pub mod tokenizer;
pub mod train;
pub mod train_step;

pub use auto::AutoModelForCausalLM;
pub use checkpoint::{SaveDType, SaveOptions};
pub use config::GPTConfig;
pub use error::{Error, Result};
pub use generate::GenerationConfig;
pub use gpt::{CausalLMOutput, KvCache, Losses, GPT};
pub use moe::{MoeStats, Routing};
