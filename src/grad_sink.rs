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
//! Depositors: the experts' products, and the residual chains (`kernels::residual`) that run
//! a block's branches as one node, for every weight inside them.
//!
//! Only graphs built with a sink need [`GradSink::backward`]; a plain `loss.backward()` on
//! such a graph leaves the deposited weights without gradients.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};

use crate::error::Result;

/// Called with a weight's id and the sum of its deposits so far, at every deposit (during
/// the backward pass: the trainer starts that gradient's all-reduce there).
pub type DepositHook = Arc<dyn Fn(TensorId, &Tensor) -> candle_core::Result<()> + Send + Sync>;

/// A shared, cloneable deposit box for weight gradients, keyed by the weight's tensor id.
#[derive(Clone, Default)]
pub struct GradSink {
    deposits: Arc<Mutex<HashMap<TensorId, Tensor>>>,
    hook: Option<DepositHook>,
    /// Weights that got a gradient from candle as well as deposits in the last backward.
    mixed: Arc<Mutex<HashSet<TensorId>>>,
}

impl GradSink {
    pub fn new() -> Self {
        Self::default()
    }

    /// A sink that also hands every deposit's running sum to `hook`.
    pub fn with_hook(hook: DepositHook) -> Self {
        GradSink { hook: Some(hook), ..Self::default() }
    }

    /// Whether `id`'s gradient in the last [`backward`](Self::backward) was more than its
    /// deposits (candle computed a part of it too).
    pub fn was_mixed(&self, id: TensorId) -> bool {
        self.mixed.lock().map(|m| m.contains(&id)).unwrap_or(true)
    }

    /// Adds `grad` to what `target` has received so far (kernels call this from `bwd`).
    pub(crate) fn deposit(&self, target: &Tensor, grad: Tensor) -> candle_core::Result<()> {
        let mut map = self.lock()?;
        let sum = match map.remove(&target.id()) {
            Some(prev) => (prev + grad)?,
            None => grad,
        };
        if let Some(hook) = &self.hook {
            hook(target.id(), &sum)?;
        }
        map.insert(target.id(), sum);
        Ok(())
    }

    /// `loss.backward()`, plus the gradients deposited during it (added to any candle
    /// computed for the same tensor). Deposits left from an earlier pass are discarded.
    pub fn backward(&self, loss: &Tensor) -> Result<GradStore> {
        self.lock()?.clear();
        let mut mixed = self.mixed.lock().map_err(|_| candle_core::Error::Msg("gradient sink: poisoned".into()))?;
        mixed.clear();
        let mut grads = loss.backward()?;
        for (id, g) in self.lock()?.drain() {
            let sum = match grads.get_id(id) {
                Some(prev) => {
                    mixed.insert(id);
                    (prev + g)?
                }
                None => g,
            };
            grads.insert_id(id, sum);
        }
        Ok(grads)
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>>> {
        self.deposits.lock().map_err(|_| candle_core::Error::Msg("gradient sink: a thread panicked while depositing".into()))
    }
}
