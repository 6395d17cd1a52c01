//! The seed's SwiGLU experts (`use_qwen3_moe_mlp`, Shazeer 2020) for training, as one op:
//! h[e] = silu(x[e] w_gate[e]) * (x[e] w_up[e]) for x [E, cap, C] and w [E, C, I], one
//! thread per expert, with one backward for the three inputs:
//!   dg, du = SwiGLU's backward of dh;  dx = dg w_gate^T + du w_up^T (one accumulation);
//!   dw_gate = x^T dg;  dw_up = x^T du.
//! As separate ops, g and u were two [E, cap, I] graph nodes whose gradients candle zero-fills
//! and adds, x got two gradients to add, and each product transposed on its own.
//!
//! The seed's gate-output loss (mean of g^2 over features, then over the rows that are not
//! padding) reads g inside the same op family: [`gate_output_loss`] takes g from the
//! forward pass, and its backward hands dL/dg to this op's backward, which joins it to dg -
//! the seed's `GradientScaler(0.1)` on x becomes dx = (dg + 0.1 dL/dg) w_gate^T while
//! dw_gate = x^T (dg + dL/dg), with no product of its own. candle runs the loss's backward
//! first: the loss op takes h as its input, so it comes after this op in the graph.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::grad_sink::GradSink;
use crate::kernels::expert_matmul::{hand_over, Filled};
use crate::kernels::transpose::{padded_stride, transpose};
use crate::kernels::{contiguous_f32, mm_add_in, mm_in, swiglu, with_f32, written_by, Precision};

const NAME: &str = "swiglu experts";

#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}

/// What the forward pass leaves for the backward: g and u, and the gate-output loss's dL/dg.
#[derive(Default)]
struct Saved {
    gu: Option<(Arc<Vec<f32>>, Vec<f32>)>,
    loss_dg: Option<Vec<f32>>,
}

/// The state one layer's [`swiglu_experts`] shares with its [`gate_output_loss`].
#[derive(Clone, Default)]
pub struct SwiGluState(Arc<Mutex<Saved>>);

impl SwiGluState {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Saved>> {
        self.0.lock().map_err(|_| candle_core::Error::Msg(format!("{NAME}: state poisoned")))
    }
}

struct SwiGluExperts {
    sink: Option<GradSink>,
    /// How much of the gate-output loss's gradient reaches x (the seed's 0.1).
    alpha: f32,
    state: SwiGluState,
    prec: Precision,
    filled: Filled,
}

fn dims(lx: &[usize], lg: &[usize], lu: &[usize]) -> candle_core::Result<(usize, usize, usize, usize)> {
    match (lx, lg) {
        (&[e, m, c], &[e2, c2, i]) if e == e2 && c == c2 && lu == lg => Ok((e, m, c, i)),
        _ => candle_core::bail!("{NAME}: x {lx:?}, gate {lg:?} and up {lu:?} are not [E, cap, C], [E, C, I], [E, C, I]"),
    }
}

impl CustomOp3 for SwiGluExperts {
    fn name(&self) -> &'static str {
        "swiglu-experts"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sg: &CpuStorage, lg: &Layout, su: &CpuStorage, lu: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (e, m, c, i) = dims(lx.dims(), lg.dims(), lu.dims())?;
        self.filled.check(NAME, e)?;
        let (x, wg, wu) = (contiguous_f32(sx, lx, NAME)?, contiguous_f32(sg, lg, NAME)?, contiguous_f32(su, lu, NAME)?);
        let mut u = Vec::new();
        let mut h = Vec::new();
        let g = written_by(e * m * i, |gp| {
            u = written_by(e * m * i, |up| {
                h = written_by(e * m * i, |hp| {
                    let (og, ou, oh) = (Out(gp), Out(up), Out(hp));
                    (0..e).into_par_iter().for_each(|j| unsafe {
                        let (og, ou, oh) = (&og, &ou, &oh);
                        let xp = x.as_ptr().add(j * m * c);
                        let (gj, uj) = (og.0.add(j * m * i), ou.0.add(j * m * i));
                        let rows = self.filled.rows(j, m);
                        if rows > 0 {
                            mm_in(self.prec, rows, i, c, gj, i, xp, c, 1, wg.as_ptr().add(j * c * i), i, 1, 1.0, 1);
                            mm_in(self.prec, rows, i, c, uj, i, xp, c, 1, wu.as_ptr().add(j * c * i), i, 1, 1.0, 1);
                        }
                        // Empty slots' zero rows give zero g and u (and h).
                        std::ptr::write_bytes(gj.add(rows * i), 0, (m - rows) * i);
                        std::ptr::write_bytes(uj.add(rows * i), 0, (m - rows) * i);
                        let (gs, us) = (std::slice::from_raw_parts(gj, m * i), std::slice::from_raw_parts(uj, m * i));
                        swiglu::forward_into(gs, us, std::slice::from_raw_parts_mut(oh.0.add(j * m * i), m * i));
                    });
                });
            });
        });
        let mut saved = self.state.lock()?;
        saved.gu = Some((Arc::new(g), u));
        saved.loss_dg = None;
        Ok((CpuStorage::F32(h), Shape::from((e, m, i))))
    }

    fn bwd(&self, x: &Tensor, wg: &Tensor, wu: &Tensor, _h: &Tensor, dh: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (e, m, c, i) = dims(x.dims(), wg.dims(), wu.dims())?;
        self.filled.check(NAME, e)?;
        let (gu, loss_dg) = {
            let mut saved = self.state.lock()?;
            (saved.gu.take(), saved.loss_dg.take())
        };
        let Some((g, u)) = gu else { candle_core::bail!("{NAME}: a second backward through one forward pass") };
        let alpha = self.alpha;
        let (dx, dwg, dwu) = with_f32(x, NAME, |xs| {
            with_f32(wg, NAME, |wgs| {
                with_f32(wu, NAME, |wus| {
                    with_f32(dh, NAME, |dhs| {
                        let (mut dx, mut dwu) = (Vec::new(), Vec::new());
                        let dwg = written_by(e * c * i, |dwgp| {
                            dwu = written_by(e * c * i, |dwup| {
                                dx = written_by(e * m * c, |dxp| {
                                    let (ox, og, ou) = (Out(dxp), Out(dwgp), Out(dwup));
                                    let ld = padded_stride(c);
                                    (0..e).into_par_iter().for_each_init(Vec::new, |wt: &mut Vec<f32>, j| unsafe {
                                        let (ox, og, ou) = (&ox, &og, &ou);
                                        let r = j * m * i..(j + 1) * m * i;
                                        let (mut dg, mut du) = (vec![0f32; m * i], vec![0f32; m * i]);
                                        swiglu::backward_into(&g[r.clone()], &u[r.clone()], &dhs[r.clone()], &mut dg, &mut du);
                                        // The loss's gradient: in full for w_gate, alpha of it for x.
                                        let dgw = match &loss_dg {
                                            Some(l) => {
                                                let l = &l[r];
                                                let dgw: Vec<f32> = dg.iter().zip(l).map(|(a, b)| a + b).collect();
                                                dg.iter_mut().zip(l).for_each(|(a, b)| *a += alpha * b);
                                                Some(dgw)
                                            }
                                            None => None,
                                        };
                                        let xp = xs.as_ptr().add(j * m * c);
                                        let dxj = ox.0.add(j * m * c);
                                        // Empty slots' rows: zero g and u, nothing reads their h, so no
                                        // gradient in either direction.
                                        let rows = self.filled.rows(j, m);
                                        std::ptr::write_bytes(dxj.add(rows * c), 0, (m - rows) * c);
                                        if rows == 0 {
                                            std::ptr::write_bytes(og.0.add(j * c * i), 0, c * i);
                                            std::ptr::write_bytes(ou.0.add(j * c * i), 0, c * i);
                                            return;
                                        }
                                        // dx = dg w_gate^T + du w_up^T: each weight [C, I] transposed into the scratch first.
                                        // (The bf16 kernel packs the transposes itself.)
                                        if self.prec == Precision::F32 {
                                            wt.resize(i * ld, 0.0);
                                            transpose(c, i, &wgs[j * c * i..(j + 1) * c * i], i, wt, ld);
                                            mm_in(self.prec, rows, c, i, dxj, c, dg.as_ptr(), i, 1, wt.as_ptr(), ld, 1, 1.0, 1);
                                            transpose(c, i, &wus[j * c * i..(j + 1) * c * i], i, wt, ld);
                                            mm_add_in(self.prec, rows, c, i, dxj, c, du.as_ptr(), i, 1, wt.as_ptr(), ld, 1, 1.0);
                                        } else {
                                            mm_in(self.prec, rows, c, i, dxj, c, dg.as_ptr(), i, 1, wgs.as_ptr().add(j * c * i), 1, i, 1.0, 1);
                                            mm_add_in(self.prec, rows, c, i, dxj, c, du.as_ptr(), i, 1, wus.as_ptr().add(j * c * i), 1, i, 1.0);
                                        }
                                        // dw = x^T d: [C x rows] [rows x I]
                                        let dgw = dgw.as_deref().unwrap_or(&dg);
                                        mm_in(self.prec, c, i, rows, og.0.add(j * c * i), i, xp, 1, c, dgw.as_ptr(), i, 1, 1.0, 1);
                                        mm_in(self.prec, c, i, rows, ou.0.add(j * c * i), i, xp, 1, c, du.as_ptr(), i, 1, 1.0, 1);
                                    });
                                });
                            });
                        });
                        Ok((dx, dwg, dwu))
                    })
                })
            })
        })?;
        let dwg = hand_over(self.sink.as_ref(), wg, dwg)?;
        let dwu = hand_over(self.sink.as_ref(), wu, dwu)?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), dwg, dwu))
    }
}

/// h = silu(x w_gate) * (x w_up) for f32 CPU x [E, cap, C] and w_gate, w_up [E, C, I], with
/// a backward for all three (the weights' gradients into `sink` when given and the weights
/// are contiguous). `state` links it to the layer's [`gate_output_loss`], whose gradient
/// reaches x scaled by `alpha`.
pub fn swiglu_experts(x: &Tensor, w_gate: &Tensor, w_up: &Tensor, sink: Option<&GradSink>, state: &SwiGluState, alpha: f32, prec: Precision) -> Result<Tensor> {
    swiglu_experts_filled(x, w_gate, w_up, None, sink, state, alpha, prec)
}

/// [`swiglu_experts`] for a capacity-padded batch whose expert e holds tokens in its first
/// `filled[e]` rows and zeros after them: the products read only the filled rows (the
/// empty slots' g, u and h are zero, and no gradient comes from or reaches them).
#[allow(clippy::too_many_arguments)]
pub fn swiglu_experts_filled(x: &Tensor, w_gate: &Tensor, w_up: &Tensor, filled: Option<&[usize]>, sink: Option<&GradSink>, state: &SwiGluState, alpha: f32, prec: Precision) -> Result<Tensor> {
    let sink = sink.filter(|_| w_gate.is_contiguous() && w_up.is_contiguous()).cloned();
    let op = SwiGluExperts { sink, alpha, state: state.clone(), prec, filled: Filled(filled.map(<[usize]>::to_vec)) };
    Ok(x.contiguous()?.apply_op3(&w_gate.contiguous()?, &w_up.contiguous()?, op)?)
}

struct GateOutputLoss {
    state: SwiGluState,
    /// Features per row (I).
    width: usize,
}

/// Rows of g whose mean square is not zero (padding slots are zero rows of x), and that mean
/// per row.
fn row_means(g: &[f32], width: usize) -> Vec<f32> {
    g.chunks(width.max(1)).map(|r| r.iter().map(|v| v * v).sum::<f32>() / width as f32).collect()
}

impl CustomOp1 for GateOutputLoss {
    fn name(&self) -> &'static str {
        "gate-output-loss"
    }

    fn cpu_fwd(&self, _s: &CpuStorage, _l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let saved = self.state.lock()?;
        let Some((g, _)) = &saved.gu else { candle_core::bail!("gate-output loss: no SwiGLU experts' forward pass to read") };
        let rows = row_means(g, self.width);
        let kept = rows.iter().filter(|&&v| v > 0.0).count();
        let loss = if kept == 0 { 0.0 } else { rows.iter().filter(|&&v| v > 0.0).sum::<f32>() / kept as f32 };
        Ok((CpuStorage::F32(vec![loss]), Shape::from(())))
    }

    fn bwd(&self, _h: &Tensor, _res: &Tensor, dloss: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let dl = dloss.to_dtype(candle_core::DType::F32)?.to_scalar::<f32>()?;
        let mut saved = self.state.lock()?;
        let Some((g, _)) = &saved.gu else { candle_core::bail!("gate-output loss: its backward ran after the experts' backward") };
        let g = g.clone();
        let rows = row_means(&g, self.width);
        let kept = rows.iter().filter(|&&v| v > 0.0).count().max(1);
        // d/dg of mean over kept rows of mean(g^2) = 2 g / (width * kept) on kept rows.
        let scale = dl * 2.0 / (self.width as f32 * kept as f32);
        let mut dg = vec![0f32; g.len()];
        for ((d, gr), &mean) in dg.chunks_mut(self.width.max(1)).zip(g.chunks(self.width.max(1))).zip(&rows) {
            if mean > 0.0 {
                d.iter_mut().zip(gr).for_each(|(d, v)| *d = scale * v);
            }
        }
        saved.loss_dg = Some(dg);
        Ok(None)
    }
}

/// The seed's gate-output loss of the layer whose experts `h` came from (see the module
/// docs): a scalar, its gradient joined to the experts' backward through `state`.
pub fn gate_output_loss(h: &Tensor, state: &SwiGluState) -> Result<Tensor> {
    let width = h.dims().last().copied().unwrap_or(0);
    Ok(h.apply_op1(GateOutputLoss { state: state.clone(), width })?)
}
