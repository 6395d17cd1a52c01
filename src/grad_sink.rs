//! Weight gradients that fused kernels hand over directly instead of through candle's
//! `GradStore`.
//!
//! candle's backward accumulates every gradient it gets as `zeros_like(var) + grad`: a
//! zero-filled tensor and an addition, two extra passes over the weight (candle-core
//! `backprop.rs`, `or_insert`). For the experts' weights - 134 MB at 64 experts of a
//! 256-wide layer - that was a third of what grew between 8 and 64 experts. A kernel given
//! a sink deposits its weight gradient here and tells candle there is none;
//! [`GradSink::backward`] runs candle's pass and then moves the deposits into its store.
//!
//! Only graphs built with a sink need [`GradSink::backward`]; a plain `loss.backward()` on
//! such a graph leaves the deposited weights without gradients.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};

use crate::error::Result;

/// A shared, cloneable deposit box for weight gradients, keyed by the weight's tensor id.
#[derive(Clone, Default)]
pub struct GradSink(Arc<Mutex<HashMap<TensorId, Tensor>>>);

impl GradSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `grad` to what `target` has received so far (kernels call this from `bwd`).
    pub(crate) fn deposit(&self, target: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        let mut map = self.lock()?;
        let sum = match map.remove(&target.id()) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        map.insert(target.id(), sum);
        Ok(())
    }

    /// `loss.backward()`, plus the gradients deposited during it (added to any candle
    /// computed for the same tensor). Deposits left from an earlier pass are discarded.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.lock()?.clear();
        let mut grads = loss.backward()?;
        for (id, g) in self.lock()?.drain() {
            let sum = match grads.get_id(id) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(grads)
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>>> {
        self.0.lock().map_err(|_| candle_core::Error::Msg("gradient sink: a thread panicked while depositing".into()))
    }
}
