//! y = x w^T for x [..., K] and an nn.Linear weight w [N, K], as one op with a backward.
//!
//! candle's version is four graph nodes - reshape x to [M, K], transpose w, matmul, reshape
//! y back - and candle's backward gives every node's input a zero-filled gradient plus an
//! addition, so each linear layer cost two extra passes over its input and output
//! activations and a strided addition into w's gradient. Here the products read x, w and dy
//! where they are (strided gemm calls): dx = dy w, dw = dy^T x.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};

use crate::error::Result;
use crate::kernels::{contiguous_f32, mm_in, with_f32, written_by, Precision};

const NAME: &str = "linear";

struct Linear {
    prec: Precision,
}

/// (M, K, N) for x [..., K] and w [N, K].
fn dims(x: &[usize], w: &[usize]) -> candle_core::Result<(usize, usize, usize)> {
    match (x.split_last(), w) {
        (Some((&k, lead)), &[n, k2]) if k == k2 => Ok((lead.iter().product(), k, n)),
        _ => candle_core::bail!("{NAME}: x {x:?} does not fit a weight {w:?} ([out, in])"),
    }
}

fn threads() -> usize {
    rayon::current_num_threads().max(1)
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n) = dims(lx.dims(), lw.dims())?;
        let (x, w) = (contiguous_f32(sx, lx, NAME)?, contiguous_f32(sw, lw, NAME)?);
        // y [m x n] = x [m x k] w^T [k x n]; w^T read in place (row stride 1, column stride k).
        // SAFETY: the slices cover m*k and n*k elements; y is written whole by gemm.
        let y = written_by(m * n, |yp| unsafe { mm_in(self.prec, m, n, k, yp, n, x.as_ptr(), k, 1, w.as_ptr(), 1, k, 1.0, threads()) });
        let mut out = lx.dims().to_vec();
        *out.last_mut().expect("dims checked") = n;
        Ok((CpuStorage::F32(y), Shape::from(out)))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _y: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, k, n) = dims(x.dims(), w.dims())?;
        let (dx, dw) = with_f32(x, NAME, |xs| {
            with_f32(w, NAME, |ws| {
                with_f32(dy, NAME, |dys| {
                    // SAFETY: operands cover m*k, n*k and m*n elements; outputs written whole.
                    // dx [m x k] = dy [m x n] w [n x k]
                    let dx = written_by(m * k, |p| unsafe { mm_in(self.prec, m, k, n, p, k, dys.as_ptr(), n, 1, ws.as_ptr(), k, 1, 1.0, threads()) });
                    // dw [n x k] = dy^T [n x m] x [m x k]
                    let dw = written_by(n * k, |p| unsafe { mm_in(self.prec, n, k, m, p, k, dys.as_ptr(), 1, n, xs.as_ptr(), k, 1, 1.0, threads()) });
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, w.shape(), w.device())?)))
    }
}

/// x w^T (+ b) in `prec` as stages of a residual chain (`kernels::residual`).
pub(crate) fn stages(w: &Tensor, b: Option<&Tensor>, prec: Precision) -> Vec<crate::kernels::residual::Stage> {
    let mut s = vec![crate::kernels::residual::Stage::Op2(Box::new(Linear { prec }), w.clone())];
    s.extend(b.map(crate::kernels::bias::stage));
    s
}

/// x [..., K] @ w^T for f32 CPU tensors, w [N, K]; y [..., N].
pub fn linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    linear_in(x, w, Precision::F32)
}

/// [`linear`] with its three products (forward, dx, dw) in the given precision.
pub fn linear_in(x: &Tensor, w: &Tensor, prec: Precision) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Linear { prec })?)
}
