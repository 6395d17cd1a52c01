//! Fused CPU kernels as candle custom ops, each with a backward pass and a gradient parity
//! test against the composite candle version.

pub mod cross_entropy;
pub mod gelu;
pub mod layer_norm;
