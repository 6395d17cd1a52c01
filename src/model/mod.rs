//! The model, one component a file, read in this order:
//! - [`config`]: `GPTConfig`, the hyper-parameters and the architecture (its JSON form is
//!   `config.json`): GPT-2's blocks by default, the seed's (askerlee/nanoMoE: RMSNorm, QK-norm,
//!   ReLU^2, SwiGLU experts) when stated.
//! - [`params`]: parameter names (the HF tensor names), shapes, initialisation, the store.
//! - [`nn`]: norms, linear, activations, attention, softmax, cross-entropy: ops with a
//!   backward pass (fused kernels for f32 CPU tensors, candle composites otherwise).
//! - [`moe`]: the Mixture-of-Experts layer: router, capacity, dispatch, experts, its losses.
//! - [`moe_parallel`]: expert parallelism - each rank's share of the experts, tokens sent
//!   to their expert's rank and back (all-to-all, forward and backward).
//! - [`gpt`]: the GPT - blocks, forward passes, the KV cache.
//! - [`generate`]: HF-style and nanoGPT-style generation.

pub mod config;
pub mod generate;
pub mod gpt;
pub mod moe;
pub mod moe_parallel;
pub mod nn;
pub mod params;
pub mod weight;
