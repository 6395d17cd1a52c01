//! The experts' batched product y[e] = x[e] w[e] (x [E, cap, K], w [E, K, N]) with one
//! thread per expert instead of every thread on every expert: with many experts each
//! product is small (cap = k * factor * tokens / E rows), and splitting each one across
//! threads costs a synchronisation per expert and product. The backward,
//! dx[e] = dy[e] w[e]^T and dw[e] = x[e]^T dy[e]: dw reads x where it is (a strided
//! product); for dx each thread transposes w[e] into a padded scratch buffer first, since
//! the gemm crate packs a transposed operand element by element (64 experts x 80 rows:
//! 20 ms for the 256 -> 1024 weights' dx, 9 ms with the scratch transpose). With a
//! [`GradSink`] the weight gradient bypasses candle's zero-fill-and-add accumulation.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::grad_sink::GradSink;
use crate::kernels::transpose::{padded_stride, transpose};
use crate::kernels::{contiguous_f32, mm_in, with_f32, written_by, Precision};

const NAME: &str = "expert matmul";

#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}


/// w's gradient `dw`: deposited in the sink when there is one (candle then gets none),
/// else returned for candle's store.
pub(crate) fn hand_over(sink: Option<&GradSink>, w: &Tensor, dw: Vec<f32>) -> candle_core::Result<Option<Tensor>> {
    let dw = Tensor::from_vec(dw, w.shape(), w.device())?;
    match sink {
        Some(sink) => {
            sink.deposit(w, dw)?;
            Ok(None)
        }
        None => Ok(Some(dw)),
    }
}

/// Rows of each expert's batch that hold tokens (the first ones; the rest are empty
/// capacity slots that nothing reads), or None for all: the rows the expert ops' products
/// read ([`expert_matmul_filled`]).
#[derive(Clone, Debug, Default)]
pub(crate) struct Filled(pub Option<Vec<usize>>);

impl Filled {
    /// Rows of expert i's batch of m that the products read.
    pub fn rows(&self, i: usize, m: usize) -> usize {
        self.0.as_ref().map_or(m, |f| f[i].min(m))
    }

    /// Fails unless there is one count per expert.
    pub fn check(&self, op: &str, e: usize) -> candle_core::Result<()> {
        match &self.0 {
            Some(f) if f.len() != e => candle_core::bail!("{op}: {} filled-row counts for {e} experts", f.len()),
            _ => Ok(()),
        }
    }
}

struct ExpertMatmul {
    sink: Option<GradSink>,
    prec: Precision,
    filled: Filled,
}

fn dims(lx: &[usize], lw: &[usize]) -> candle_core::Result<(usize, usize, usize, usize)> {
    match (lx, lw) {
        (&[e, m, k], &[e2, k2, n]) if e == e2 && k == k2 => Ok((e, m, k, n)),
        _ => candle_core::bail!("{NAME}: x {lx:?} and w {lw:?} are not [E, cap, K] and [E, K, N]"),
    }
}

/// Runs `f(e)` for every expert on rayon's pool.
fn per_expert(e: usize, f: impl Fn(usize) + Send + Sync) {
    (0..e).into_par_iter().for_each(f);
}

/// Runs `f(e, scratch)` for every expert on rayon's pool, with a scratch vector per task.
fn per_expert_with_scratch(e: usize, f: impl Fn(usize, &mut Vec<f32>) + Send + Sync) {
    (0..e).into_par_iter().for_each_init(Vec::new, |s, i| f(i, s));
}

impl CustomOp2 for ExpertMatmul {
    fn name(&self) -> &'static str {
        "expert-matmul"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (e, m, k, n) = dims(lx.dims(), lw.dims())?;
        self.filled.check(NAME, e)?;
        let (x, w) = (contiguous_f32(sx, lx, NAME)?, contiguous_f32(sw, lw, NAME)?);
        let y = written_by(e * m * n, |yp| {
            let out = Out(yp);
            per_expert(e, |i| unsafe {
                let out = &out;
                let (rows, yi) = (self.filled.rows(i, m), out.0.add(i * m * n));
                if rows > 0 {
                    mm_in(self.prec, rows, n, k, yi, n, x.as_ptr().add(i * m * k), k, 1, w.as_ptr().add(i * k * n), n, 1, 1.0, 1);
                }
                // Empty slots' rows are zero, and so is their product.
                std::ptr::write_bytes(yi.add(rows * n), 0, (m - rows) * n);
            });
        });
        Ok((CpuStorage::F32(y), Shape::from((e, m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (e, m, k, n) = dims(x.dims(), w.dims())?;
        self.filled.check(NAME, e)?;
        let (dx, dw) = with_f32(x, NAME, |xs| {
            with_f32(w, NAME, |ws| {
                with_f32(dy, NAME, |dys| {
                    let mut dx = Vec::new();
                    let dw = written_by(e * k * n, |dwp| {
                        dx = written_by(e * m * k, |dxp| {
                            let (ox, ow) = (Out(dxp), Out(dwp));
                            let ld = padded_stride(k);
                            per_expert_with_scratch(e, |i, wt| unsafe {
                                let (ox, ow) = (&ox, &ow);
                                let (xp, dyp) = (xs.as_ptr().add(i * m * k), dys.as_ptr().add(i * m * n));
                                let (rows, dxi, dwi) = (self.filled.rows(i, m), ox.0.add(i * m * k), ow.0.add(i * k * n));
                                // An empty slot's row passes no gradient: nothing reads its output.
                                std::ptr::write_bytes(dxi.add(rows * k), 0, (m - rows) * k);
                                if rows == 0 {
                                    std::ptr::write_bytes(dwi, 0, k * n);
                                    return;
                                }
                                // dx = dy w^T: [rows x n] [n x k], w^T in the scratch (n rows of stride
                                // ld) for the f32 gemm; the bf16 kernel packs w^T itself.
                                if self.prec == Precision::F32 {
                                    wt.resize(n * ld, 0.0);
                                    transpose(k, n, &ws[i * k * n..(i + 1) * k * n], n, wt, ld);
                                    mm_in(self.prec, rows, k, n, dxi, k, dyp, n, 1, wt.as_ptr(), ld, 1, 1.0, 1);
                                } else {
                                    mm_in(self.prec, rows, k, n, dxi, k, dyp, n, 1, ws.as_ptr().add(i * k * n), 1, n, 1.0, 1);
                                }
                                // dw = x^T dy: [k x rows] [rows x n]
                                mm_in(self.prec, k, n, rows, dwi, n, xp, 1, k, dyp, n, 1, 1.0, 1);
                            });
                        });
                    });
                    Ok((dx, dw))
                })
            })
        })?;
        let dw = hand_over(self.sink.as_ref(), w, dw)?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), dw))
    }
}

/// y[e] = x[e] w[e] for f32 CPU x [E, cap, K] and w [E, K, N], expert-parallel, with a
/// backward pass. With `sink`, w's gradient goes there (see [`GradSink::backward`]) when w
/// is contiguous (a copy would take the gradient under another id); x's goes to candle.
pub fn expert_matmul(x: &Tensor, w: &Tensor, sink: Option<&GradSink>) -> Result<Tensor> {
    expert_matmul_in(x, w, sink, Precision::F32)
}

/// [`expert_matmul`] with its products in the given precision.
pub fn expert_matmul_in(x: &Tensor, w: &Tensor, sink: Option<&GradSink>, prec: Precision) -> Result<Tensor> {
    expert_matmul_filled(x, w, None, sink, prec)
}

/// [`expert_matmul_in`] for a capacity-padded batch (MoE dispatch: slots fill in order)
/// whose rows after `filled[e]` in expert e are empty slots that nothing downstream reads
/// (the combine step reads only filled slots): the products skip those rows, their outputs
/// are zero and they pass no gradient. That is exactly what the full product gives them
/// for the filled rows, the weights' gradient and x's gradient, since the full product's
/// upstream gradient on unread rows is zero (where x is zero there too, as the dispatch
/// leaves it, so are its outputs). With capacity factor 1.25 at least a fifth of every
/// batch is empty slots.
pub fn expert_matmul_filled(x: &Tensor, w: &Tensor, filled: Option<&[usize]>, sink: Option<&GradSink>, prec: Precision) -> Result<Tensor> {
    let sink = sink.filter(|_| w.is_contiguous()).cloned();
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, ExpertMatmul { sink, prec, filled: Filled(filled.map(<[usize]>::to_vec)) })?)
}

/// The gate-output loss's view of g = x w (the seed's `bmm(GradientScaler(0.1)(x), w)`)
/// without a second product: forward, g itself; backward, `alpha` of the incoming gradient
/// goes back through g's own product (so x receives alpha of it, and w alpha) and the
/// missing (1 - alpha) x^T dy is added to w directly - one product instead of the three
/// (forward, dx, dw) of a separate scaled product.
struct GateLossTap {
    alpha: f32,
    sink: Option<GradSink>,
    prec: Precision,
}

impl candle_core::CustomOp3 for GateLossTap {
    fn name(&self) -> &'static str {
        "gate-loss-tap"
    }

    fn cpu_fwd(&self, sg: &CpuStorage, lg: &Layout, _sx: &CpuStorage, _lx: &Layout, _sw: &CpuStorage, _lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        Ok((CpuStorage::F32(contiguous_f32(sg, lg, "gate-loss tap")?.to_vec()), lg.shape().clone()))
    }

    fn bwd(&self, _g: &Tensor, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (e, m, k, n) = dims(x.dims(), w.dims())?;
        let beta = 1.0 - self.alpha;
        let dw = with_f32(x, NAME, |xs| {
            with_f32(dy, NAME, |dys| {
                Ok(written_by(e * k * n, |dwp| {
                    let ow = Out(dwp);
                    per_expert(e, |i| unsafe {
                        let ow = &ow;
                        // dw = beta x^T dy: [k x m] [m x n]
                        mm_in(self.prec, k, n, m, ow.0.add(i * k * n), n, xs.as_ptr().add(i * m * k), 1, k, dys.as_ptr().add(i * m * n), n, 1, beta, 1);
                    });
                }))
            })
        })?;
        let dw = hand_over(self.sink.as_ref(), w, dw)?;
        Ok((Some((dy * self.alpha as f64)?), None, dw))
    }
}

/// `g` (= [`expert_matmul`]`(x, w)`, already computed) for a loss whose gradient should reach
/// x scaled by `alpha` and w in full, as `expert_matmul(scale_grad(x, alpha), w)` would give,
/// without recomputing the product (see [`GateLossTap`]).
pub fn gate_loss_tap(g: &Tensor, x: &Tensor, w: &Tensor, alpha: f32, sink: Option<&GradSink>, prec: Precision) -> Result<Tensor> {
    let sink = sink.filter(|_| w.is_contiguous()).cloned();
    Ok(g.contiguous()?.apply_op3(&x.contiguous()?, &w.contiguous()?, GateLossTap { alpha, sink, prec })?)
}
