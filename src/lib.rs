//! nanomoe: train, run and share GPT-2-style language models with Mixture-of-Experts
//! layers (nanoGPT + MoE), HuggingFace-native in both directions.
//!
//! Table of contents:
//! - [`model`]: the model, a file per component - [`config`] (`GPTConfig`: sizes and the
//!   architecture, GPT-2's or the seed's), [`params`], [`nn`] (ops with a backward pass),
//!   [`moe`] (router, capacity, dispatch, experts, losses), [`gpt`] (blocks, forward passes,
//!   KV cache), [`generate`].
//! - [`kernels`]: fused CPU kernels (candle custom ops with a backward pass; the decoding
//!   products in f32/bf16/f16 and, `qmatvec`, on quantized blocks; `bf16_gemm`, the
//!   mixed-precision training products, on AMX tiles where the CPU has them).
//! - [`quant`]: GGML's q8_0 / q4_0 block formats; [`weight`] (`WeightFormat`, a weight as
//!   a tensor or quantized blocks); [`gguf`]: GGUF files read and written (llama.cpp's
//!   `gpt2` architecture, or `nanomoe`).
//! - [`hf`]: the HuggingFace side - [`checkpoint`] (directories, safetensors), [`auto`]
//!   (`AutoModelForCausalLM`), [`convert`] (others' checkpoints), [`hub`] / [`hub_upload`]
//!   (download, push), [`hf_cache`], [`tokenizer`], [`pickle`] (torch.save zips, bounded).
//! - training: [`grad_sink`] (weight gradients that bypass candle's accumulation), [`optim`]
//!   (AdamW with nanoMoE's decay groups, clipping, the LR schedule), [`train_step`], [`train`]
//!   (data, settings, the loop, resumable states).
//! - [`dist`]: training on several processes - the communicator trait, one process, MPI
//!   (feature `mpi`).
//! - [`serve`]: the OpenAI-compatible server with continuous batching.
//! - [`runtime`]: thread count, workers kept awake through decoding loops, memory checks,
//!   allocator settings; [`error`]: the error type.
//! - [`fuzz`]: the fuzz harness's targets (every loader of untrusted files) and mutator.
//!
//! Each component is also re-exported at the crate root (`nanomoe::config`, `nanomoe::gpt`, ...).

pub mod dist;
pub mod error;
pub mod fuzz;
pub mod gguf;
pub mod grad_sink;
pub mod hf;
pub mod kernels;
pub mod model;
pub mod optim;
pub mod quant;
pub mod runtime;
pub mod serve;
pub mod train;
pub mod train_step;

pub use hf::{auto, checkpoint, convert, hf_cache, hub, hub_upload, pickle, tokenizer};
pub use model::{config, generate, gpt, moe, moe_parallel, nn, params, weight};

pub use auto::AutoModelForCausalLM;
pub use checkpoint::{SaveDType, SaveOptions};
pub use config::GPTConfig;
pub use error::{Error, Result};
pub use generate::GenerationConfig;
pub use gpt::{CausalLMOutput, KvCache, Losses, GPT};
pub use moe::{MoeStats, Routing};
pub use weight::WeightFormat;
