//! A residual branch `x + f(x)`, with `f` a chain of this module's fused ops (a block's
//! norm, projections, attention or activation), as one node of candle's graph.
//!
//! candle's backward gives every input of every node a zero-filled gradient tensor and adds
//! the node's gradient to it (`GradStore::or_insert`, then `add`): two extra passes over
//! each activation a block passes from op to op - for a 4 x 256 block on 2048 tokens ~40 MB
//! per block, 7-8 % of a training step in `memset` and candle's addition. Here the chain's
//! backward hands each gradient straight to the op before it, the weights' gradients go to
//! the [`GradSink`], and candle sees one input, x.
//!
//! The ops are the same ones the unfused graph runs, called through their own `bwd`, so the
//! values and gradients are the same bits (the test below checks that).

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::grad_sink::GradSink;
use crate::kernels::contiguous_f32;

const NAME: &str = "residual chain";

/// One op of a chain.
pub(crate) enum Stage {
    /// op(x).
    Op1(Box<dyn CustomOp1 + Send + Sync>),
    /// op(x, w) for a trained weight w (its gradient goes to the sink).
    Op2(Box<dyn CustomOp2 + Send + Sync>, Tensor),
}

/// A borrowed op, for `apply_op*_no_bwd` (which take a sized op by reference).
struct By1<'a>(&'a (dyn CustomOp1 + Send + Sync));
struct By2<'a>(&'a (dyn CustomOp2 + Send + Sync));

impl CustomOp1 for By1<'_> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd(s, l)
    }
}

impl CustomOp2 for By2<'_> {
    fn name(&self) -> &'static str {
        self.0.name()
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        self.0.cpu_fwd(s1, l1, s2, l2)
    }
}

struct Residual {
    stages: Vec<Stage>,
    sink: GradSink,
    /// Each stage's input (x first) and f(x), from the forward pass; taken by the backward.
    acts: Mutex<Vec<Tensor>>,
}

impl CustomOp2 for Residual {
    fn name(&self) -> &'static str {
        "residual-chain"
    }

    /// x + f(x): the block's residual addition.
    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sf: &CpuStorage, lf: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, f) = (contiguous_f32(sx, lx, NAME)?, contiguous_f32(sf, lf, NAME)?);
        if lx.shape() != lf.shape() {
            candle_core::bail!("{NAME}: the branch maps {:?} to {:?}", lx.dims(), lf.dims());
        }
        let mut y = crate::kernels::for_overwrite(x.len());
        const CHUNK: usize = 1 << 14;
        y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK).zip(f.par_chunks(CHUNK))).for_each(|(o, (a, b))| {
            o.iter_mut().zip(a.iter().zip(b)).for_each(|(o, (a, b))| *o = a + b);
        });
        Ok((CpuStorage::F32(y), lx.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _f: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let acts = std::mem::take(&mut *self.acts.lock().unwrap_or_else(|e| e.into_inner()));
        if acts.len() != self.stages.len() + 1 {
            candle_core::bail!("{NAME}: backward ran twice on one forward pass");
        }
        let mut g = dy.clone();
        for (i, stage) in self.stages.iter().enumerate().rev() {
            let (input, output) = (&acts[i], &acts[i + 1]);
            let dx = match stage {
                Stage::Op1(op) => op.bwd(input, output, &g)?,
                Stage::Op2(op, w) => {
                    let (dx, dw) = op.bwd(input, &w.detach(), output, &g)?;
                    if let Some(dw) = dw {
                        self.sink.deposit(w, dw)?;
                    }
                    dx
                }
            };
            g = match dx {
                Some(dx) => dx,
                None => candle_core::bail!("{NAME}: {} passed no gradient to its input", stage.name()),
            };
        }
        // The identity path plus the branch's.
        Ok((Some((dy + g)?), None))
    }
}

impl Stage {
    fn name(&self) -> &'static str {
        match self {
            Stage::Op1(op) => op.name(),
            Stage::Op2(op, _) => op.name(),
        }
    }
}

/// `x + f(x)` for an f32 CPU `x`, `f` the stages applied in order, as one graph node whose
/// backward runs the stages' own backwards and deposits the weights' gradients in `sink`
/// (so the loss must go through [`GradSink::backward`]).
pub(crate) fn residual(x: &Tensor, stages: Vec<Stage>, sink: &GradSink) -> Result<Tensor> {
    let x = x.contiguous()?;
    let mut acts = Vec::with_capacity(stages.len() + 1);
    acts.push(x.detach());
    for stage in &stages {
        let input = acts.last().expect("x is in");
        let y = match stage {
            Stage::Op1(op) => input.apply_op1_no_bwd(&By1(op.as_ref()))?,
            Stage::Op2(op, w) => input.apply_op2_no_bwd(&w.contiguous()?.detach(), &By2(op.as_ref()))?,
        };
        acts.push(y);
    }
    let f = acts.last().expect("x is in").clone();
    let op = Residual { stages, sink: sink.clone(), acts: Mutex::new(acts) };
    Ok(x.apply_op2(&f, op)?)
}
