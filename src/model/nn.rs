//! Building blocks with a backward pass: each dispatches f32 CPU tensors to a fused kernel
//! of `kernels` (which has its own backward) and keeps a composite version from candle
//! ops (the reference of the kernel's parity test, and the path for other dtypes).
//!
//! candle-nn's fused `LayerNorm`, `ops::softmax_last_dim`, `ops::layer_norm` and `sdpa`
//! have no backward and silently drop gradients, so they are never used here.

use crate::kernels::Precision;
use candle_core::{DType, Tensor, D};
use rand::Rng;

use crate::config::Activation;
use crate::error::Result;

/// `x @ w^T + b` with `w` stored as torch's nn.Linear does: [out, in].
/// `x` may have any number of leading dimensions.
/// A few rows (decoding) of an f32 CPU `x` go through the weight-streaming kernel; `w` may
/// be stored in another dtype than `x` (bf16 inference weights), products stay in x's dtype.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_in(x, w, b, Precision::F32)
}

/// [`linear`] with the products in the given precision: with bf16 an f32 CPU product always
/// takes the fused op (its forward and both backward products round their operands to bf16).
pub fn linear_in(x: &Tensor, w: &Tensor, b: Option<&Tensor>, prec: Precision) -> Result<Tensor> {
    let dims = x.dims();
    let many_rows = x.elem_count() / dims[dims.len() - 1].max(1) > crate::kernels::matvec::MAX_ROWS;
    // A few f32 rows go to the weight-streaming kernel, unless the products must be bf16.
    if (many_rows || prec == Precision::Bf16) && x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() && x.elem_count() > 0 {
        let y = crate::kernels::linear::linear_in(x, w, prec)?;
        return match b {
            Some(b) => add_bias(&y, b),
            None => Ok(y),
        };
    }
    linear_composite(x, w, b)
}

/// [`linear`] from candle ops (and the weight-streaming kernel for a few rows): the
/// reference of the fused kernel's test and the path for other dtypes.
pub fn linear_composite(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let in_dim = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.reshape((lead, in_dim))?;
    let y = if lead <= crate::kernels::matvec::MAX_ROWS && x.dtype() == DType::F32 && x.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        crate::kernels::matvec::linear_nk(&x2, w)?
    } else {
        x2.matmul(&w.to_dtype(x.dtype())?.t()?)?
    };
    let y = match b {
        Some(b) => add_bias(&y, b)?,
        None => y,
    };
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dim(0)?);
    Ok(y.reshape(out_dims)?)
}

/// LayerNorm over the last dimension (biased variance, as torch). f32 CPU tensors use the
/// fused kernel.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() {
        return crate::kernels::layer_norm::fused_layer_norm(x, w, b, eps);
    }
    layer_norm_composite(x, w, b, eps)
}

/// LayerNorm from composite candle ops (the reference of the fused kernel's tests).
pub fn layer_norm_composite(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?;
    Ok(match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    })
}

/// The MLP activation (GELU, either form, or ReLU^2). f32 CPU tensors use the fused kernel.
pub fn activation(x: &Tensor, act: Activation) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        return crate::kernels::gelu::fused_gelu(x, act);
    }
    activation_composite(x, act)
}

/// The activation from candle's own ops (the reference of the fused kernel's tests).
pub fn activation_composite(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::GeluTanh => x.gelu()?,
        Activation::GeluErf => x.gelu_erf()?,
        Activation::Relu2 => x.relu()?.sqr()?,
    })
}

/// RMSNorm over the last dimension: x / sqrt(mean(x^2) + eps) (* w when given), as torch's
/// `nn.RMSNorm` / `F.rms_norm`. f32 CPU tensors use the fused kernel.
pub fn rms_norm(x: &Tensor, w: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    if x.dtype() == DType::F32 && w.is_none_or(|w| w.dtype() == DType::F32) && x.device().is_cpu() {
        return crate::kernels::rms_norm::fused_rms_norm(x, w, eps);
    }
    rms_norm_composite(x, w, eps)
}

/// RMSNorm from composite candle ops (the reference of the fused kernel's tests).
pub fn rms_norm_composite(x: &Tensor, w: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    let y = x.broadcast_div(&(ms + eps)?.sqrt()?)?;
    Ok(match w {
        Some(w) => y.broadcast_mul(&w.to_dtype(y.dtype())?)?,
        None => y,
    })
}

/// torch's default eps of `F.rms_norm` for f32 (the seed's QK-norm passes none).
pub const QK_NORM_EPS: f64 = f32::EPSILON as f64;

/// QK-norm on a fused qkv projection [.., 3C]: each head's q and k RMS-normalised without
/// a weight (eps [`QK_NORM_EPS`]), v unchanged.
pub fn qk_norm(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = qkv.dims().to_vec();
    let c = dims[dims.len() - 1] / 3;
    let hd = c / n_head;
    if qkv.dtype() == DType::F32 && qkv.device().is_cpu() {
        return crate::kernels::rms_norm::fused_qk_norm(qkv, hd, QK_NORM_EPS);
    }
    qk_norm_composite(qkv, n_head)
}

/// [`qk_norm`] from candle ops (the reference of the fused kernel's tests).
pub fn qk_norm_composite(qkv: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = qkv.dims().to_vec();
    let last = dims.len() - 1;
    let c = dims[last] / 3;
    let mut head_dims = dims[..last].to_vec();
    head_dims.extend([n_head, c / n_head]);
    let norm = |t: Tensor| -> Result<Tensor> {
        let mut back = dims[..last].to_vec();
        back.push(c);
        rms_norm_composite(&t.reshape(head_dims.as_slice())?, None, QK_NORM_EPS)?.reshape(back).map_err(Into::into)
    };
    let q = norm(qkv.narrow(last, 0, c)?)?;
    let k = norm(qkv.narrow(last, c, c)?)?;
    Ok(Tensor::cat(&[&q, &k, &qkv.narrow(last, 2 * c, c)?], last)?)
}

/// Identity forward, gradient times `alpha` backward (the seed's `GradientScaler`).
pub fn scale_grad(x: &Tensor, alpha: f64) -> Result<Tensor> {
    struct ScaleGrad(f64);
    impl candle_core::CustomOp1 for ScaleGrad {
        fn name(&self) -> &'static str {
            "scale-grad"
        }
        fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
            let x = crate::kernels::contiguous_f32(s, l, "scale-grad")?;
            Ok((candle_core::CpuStorage::F32(x.to_vec()), l.shape().clone()))
        }
        fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
            Ok(Some((grad * self.0)?))
        }
    }
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        return Ok(x.contiguous()?.apply_op1(ScaleGrad(alpha))?);
    }
    // Other dtypes: x * a + stop_gradient(x * (1 - a)).
    Ok(((x * alpha)? + (x * (1.0 - alpha))?.detach())?)
}

/// SwiGLU's gating: silu(gate) * up (Shazeer 2020), element-wise. f32 CPU tensors use the
/// fused kernel (one pass forward, one pass backward for both inputs).
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dtype() == DType::F32 && up.dtype() == DType::F32 && gate.device().is_cpu() {
        return crate::kernels::swiglu::fused_swiglu(gate, up);
    }
    swiglu_composite(gate, up)
}

/// [`swiglu`] from candle ops (the reference of the fused kernel's tests).
pub fn swiglu_composite(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    Ok((gate.silu()? * up)?)
}

/// `x [M, K] @ w` for w [K, N] (an expert's matrix), with the same choice of kernel as
/// [`linear`].
pub fn matmul_kn(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (m, _) = x.dims2()?;
    if m <= crate::kernels::matvec::MAX_ROWS && x.dtype() == DType::F32 && x.device().is_cpu() && matches!(w.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        return crate::kernels::matvec::matmul_kn(x, w);
    }
    Ok(x.matmul(&w.to_dtype(x.dtype())?)?)
}

/// x + b where b holds one row of x's last dimension (a linear layer's bias, [N]) or one per
/// group of leading rows (the experts' biases, [E, 1, N] for x [E, cap, N]).
pub fn add_bias(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && b.dtype() == DType::F32 && x.device().is_cpu() {
        return crate::kernels::bias::add_bias(x, b);
    }
    Ok(x.broadcast_add(&b.to_dtype(x.dtype())?)?)
}

/// The experts' batched product `x [E, cap, K] @ w [E, K, N]`: expert-parallel kernel for
/// f32 CPU tensors (w's gradient into `sink` when given), candle's batched matmul otherwise.
pub fn expert_matmul(x: &Tensor, w: &Tensor, sink: Option<&crate::grad_sink::GradSink>, prec: Precision) -> Result<Tensor> {
    expert_matmul_filled(x, w, None, sink, prec)
}

/// [`expert_matmul`] of a capacity-padded batch whose expert e holds tokens in its first
/// `filled[e]` rows only (the rest are empty slots nothing reads): f32 CPU tensors skip the
/// empty rows (`kernels::expert_matmul::expert_matmul_filled`); other devices compute them
/// all.
pub fn expert_matmul_filled(x: &Tensor, w: &Tensor, filled: Option<&[usize]>, sink: Option<&crate::grad_sink::GradSink>, prec: Precision) -> Result<Tensor> {
    if x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() {
        return crate::kernels::expert_matmul::expert_matmul_filled(x, w, filled, sink, prec);
    }
    Ok(x.matmul(&w.to_dtype(x.dtype())?)?)
}

/// `g = expert_matmul(x, w)` as `expert_matmul(scale_grad(x, alpha), w)` would give it:
/// the same values, x's gradient from a loss on it scaled by `alpha`, w's in full - without
/// a second product on f32 CPU tensors.
pub fn gate_loss_tap(g: &Tensor, x: &Tensor, w: &Tensor, alpha: f32, sink: Option<&crate::grad_sink::GradSink>, prec: Precision) -> Result<Tensor> {
    if g.dtype() == DType::F32 && x.dtype() == DType::F32 && w.dtype() == DType::F32 && x.device().is_cpu() {
        return crate::kernels::expert_matmul::gate_loss_tap(g, x, w, alpha, sink, prec);
    }
    expert_matmul(&scale_grad(x, alpha as f64)?, w, sink, prec)
}

/// Attention scores of masked positions are replaced by this (not -inf: a fully masked
/// row, as a left-padding query has, then stays finite).
const MASKED: f32 = -1e30;

/// Multi-head attention from candle ops (the reference of the fused kernel's tests, and the
/// path for other dtypes, attention dropout, and gradients through a KV cache):
/// q [B, Tq, C], k and v [B, Tk, C], `mask` [B or 1, 1, Tq, Tk] of 1 = may attend.
pub fn attention_composite(q: &Tensor, k: &Tensor, v: &Tensor, n_head: usize, mask: &Tensor, dropout: Option<(f64, &mut rand::rngs::StdRng)>) -> Result<Tensor> {
    let (b, tq, c) = q.dims3()?;
    let hd = c / n_head;
    let heads = |x: &Tensor| -> Result<Tensor> {
        let t = x.dim(1)?;
        Ok(x.reshape((b, t, n_head, hd))?.transpose(1, 2)?.contiguous()?)
    };
    let (q, k, v) = (heads(q)?, heads(k)?, heads(v)?);
    let att = (q.matmul(&k.t()?)? * (1.0 / (hd as f64).sqrt()))?;
    let fill = Tensor::new(MASKED, q.device())?.to_dtype(att.dtype())?.broadcast_as(att.shape())?;
    let att = mask.broadcast_as(att.shape())?.where_cond(&att, &fill)?;
    let mut att = softmax_last(&att)?;
    if let Some((p, rng)) = dropout {
        att = self::dropout(&att, p, rng)?;
    }
    Ok(att.matmul(&v)?.transpose(1, 2)?.reshape((b, tq, c))?)
}

/// Numerically stable softmax over the last dimension.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// log-sum-exp over the last dimension (keeps nothing of that dimension).
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok((s + max)?.squeeze(D::Minus1)?)
}

/// softplus(x) = log(1 + e^x), computed as max(x, 0) + log(1 + e^-|x|).
pub fn softplus(x: &Tensor) -> Result<Tensor> {
    let tail = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    Ok((x.relu()? + tail)?)
}

/// Mean cross-entropy of `logits` [N, V] against `targets` (N ids; `None` = ignored).
/// Returns `None` when every target is ignored. f32 CPU logits use the fused kernel.
pub fn cross_entropy(logits: &Tensor, targets: &[Option<u32>]) -> Result<Option<Tensor>> {
    if logits.dtype() == DType::F32 && logits.device().is_cpu() {
        return crate::kernels::cross_entropy::cross_entropy(logits, targets);
    }
    cross_entropy_composite(logits, targets)
}

/// Mean cross-entropy of the logits `h [N, C] @ w^T` (w [V, C]: the tied output embedding)
/// without materialising them for the caller: the fused kernel for f32 CPU tensors,
/// [`linear`] + [`cross_entropy`] otherwise.
pub fn linear_cross_entropy(h: &Tensor, w: &Tensor, targets: &[Option<u32>], prec: Precision) -> Result<Option<Tensor>> {
    if h.dtype() == DType::F32 && w.dtype() == DType::F32 && h.device().is_cpu() {
        return crate::kernels::linear_cross_entropy::linear_cross_entropy_in(h, w, targets, prec);
    }
    cross_entropy(&linear_in(h, w, None, prec)?, targets)
}

/// Cross-entropy from composite candle ops (any dtype or device; the reference of the
/// fused kernel's tests).
pub fn cross_entropy_composite(logits: &Tensor, targets: &[Option<u32>]) -> Result<Option<Tensor>> {
    let (n, _v) = logits.dims2()?;
    debug_assert_eq!(n, targets.len());
    let keep: Vec<u32> = (0..n as u32).filter(|&i| targets[i as usize].is_some()).collect();
    if keep.is_empty() {
        return Ok(None);
    }
    let device = logits.device();
    let tgt: Vec<u32> = keep.iter().filter_map(|&i| targets[i as usize]).collect();
    let rows = if keep.len() == n {
        logits.clone()
    } else {
        logits.index_select(&Tensor::new(keep.as_slice(), device)?, 0)?
    };
    let logits = rows.to_dtype(DType::F32)?;
    let lse = logsumexp_last(&logits)?;
    let picked = logits.gather(&Tensor::new(tgt.as_slice(), device)?.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok(Some((lse - picked)?.mean_all()?))
}

/// Inverted dropout with a caller-owned RNG (training only; reproducible from a seed).
pub fn dropout(x: &Tensor, p: f64, rng: &mut impl Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let scale = (1.0 / (1.0 - p)) as f32;
    let mask: Vec<f32> = (0..n).map(|_| if rng.random::<f64>() < p { 0.0 } else { scale }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn layer_norm_matches_definition_and_has_gradients() {
        let x = Var::from_tensor(&t(&[1., 2., 4., -1., 0., 3.], &[2, 3])).unwrap();
        let w = Var::from_tensor(&t(&[1., 0.5, 2.], &[3])).unwrap();
        let b = Var::from_tensor(&t(&[0., 1., -1.], &[3])).unwrap();
        let y = layer_norm(&x, &w, Some(&b), 1e-5).unwrap();
        let row: Vec<f32> = y.get(0).unwrap().to_vec1().unwrap();
        let (m, var) = (7.0f32 / 3.0, ((1.0f32 - 7. / 3.).powi(2) + (2.0f32 - 7. / 3.).powi(2) + (4.0f32 - 7. / 3.).powi(2)) / 3.0);
        let expect = [(1. - m) / (var + 1e-5).sqrt(), (2. - m) / (var + 1e-5).sqrt() * 0.5 + 1., (4. - m) / (var + 1e-5).sqrt() * 2. - 1.];
        for (a, e) in row.iter().zip(expect) {
            assert!((a - e).abs() < 1e-5, "{a} vs {e}");
        }
        let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            let gv = g.get(v).expect("gradient present");
            assert!(gv.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        }
    }

    #[test]
    fn fused_layer_norm_matches_composite_values_and_gradients() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(1);
        let (n, c) = (23, 48);
        let mut r = |k: usize, s: f32| -> Vec<f32> { (0..k).map(|_| rng.random_range(-s..s)).collect() };
        let (xd, wd, bd, gd) = (r(n * c, 3.0), r(c, 2.0), r(c, 1.0), r(n * c, 1.0));
        let x = Var::from_tensor(&t(&xd, &[n, c])).unwrap();
        let w = Var::from_tensor(&t(&wd, &[c])).unwrap();
        let b = Var::from_tensor(&t(&bd, &[c])).unwrap();
        let gy = t(&gd, &[n, c]);
        let max = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        for bias in [true, false] {
            let bo = if bias { Some(b.as_tensor()) } else { None };
            let fy = crate::kernels::layer_norm::fused_layer_norm(&x, &w, bo, 1e-5).unwrap();
            let cy = layer_norm_composite(&x, &w, bo, 1e-5).unwrap();
            assert!(max(&fy, &cy) < 1e-5);
            let gf = fy.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = cy.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in [("x", &x), ("w", &w)] {
                let d = max(gf.get(v).unwrap(), gc.get(v).unwrap());
                assert!(d < 1e-4, "bias {bias}: d{name} differs by {d}");
            }
            if bias {
                assert!(max(gf.get(&b).unwrap(), gc.get(&b).unwrap()) < 1e-5);
            }
        }
    }

    #[test]
    fn softmax_and_logsumexp_are_stable() {
        let x = t(&[1000., 1001., 1002.], &[1, 3]);
        let s: Vec<f32> = softmax_last(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let z = 1.0 + (-1f32).exp() + (-2f32).exp();
        assert!((s[2] - 1.0 / z).abs() < 1e-6);
        let l: Vec<f32> = logsumexp_last(&x).unwrap().to_vec1().unwrap();
        assert!((l[0] - (1002.0 + z.ln())).abs() < 1e-3);
    }

    #[test]
    fn softplus_matches_definition() {
        let x = t(&[-30., -1., 0., 2., 40.], &[5]);
        let y: Vec<f32> = softplus(&x).unwrap().to_vec1().unwrap();
        for (xi, yi) in [-30f32, -1., 0., 2., 40.].iter().zip(y) {
            let e = if *xi > 20. { *xi } else { (1.0 + xi.exp()).ln() };
            assert!((yi - e).abs() < 1e-5, "{xi}: {yi} vs {e}");
        }
    }

    #[test]
    fn fused_cross_entropy_matches_composite_values_and_gradients() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(0);
        let (n, v) = (37, 101);
        let data: Vec<f32> = (0..n * v).map(|_| rng.random_range(-8.0..8.0)).collect();
        let targets: Vec<Option<u32>> = (0..n).map(|i| if i % 5 == 3 { None } else { Some(rng.random_range(0..v as u32)) }).collect();
        let x = Var::from_tensor(&t(&data, &[n, v])).unwrap();
        let fused = crate::kernels::cross_entropy::cross_entropy(&x, &targets).unwrap().unwrap();
        let comp = cross_entropy_composite(&x, &targets).unwrap().unwrap();
        let (a, b) = (fused.to_scalar::<f32>().unwrap(), comp.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        // Scale the loss so the incoming gradient is not 1.
        let ga = (fused * 3.0).unwrap().backward().unwrap();
        let gb = (comp * 3.0).unwrap().backward().unwrap();
        let (ga, gb) = (ga.get(&x).unwrap(), gb.get(&x).unwrap());
        let d = (ga - gb).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d < 1e-6, "gradient difference {d}");
        // Ignored rows get no gradient.
        let row3: Vec<f32> = ga.get(3).unwrap().to_vec1().unwrap();
        assert!(row3.iter().all(|&g| g == 0.0));
    }

    #[test]
    fn fused_gelu_matches_composite_values_and_gradients() {
        let data: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) / 250.0).collect();
        for act in [Activation::GeluTanh, Activation::GeluErf] {
            let x = Var::from_tensor(&t(&data, &[4001])).unwrap();
            let a = crate::kernels::gelu::fused_gelu(&x, act).unwrap();
            let b = activation_composite(&x, act).unwrap();
            let d = (&a - &b).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 2e-6, "{act:?} values differ by {d}");
            let w = t(&data.iter().map(|v| v.sin()).collect::<Vec<_>>(), &[4001]);
            let ga = a.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let gb = b.mul(&w).unwrap().sum_all().unwrap().backward().unwrap();
            let d = (ga.get(&x).unwrap() - gb.get(&x).unwrap()).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 2e-5, "{act:?} gradients differ by {d}");
        }
    }

    /// A [rows, 1, tq, tk] mask tensor as the model builds it.
    fn mask_tensor(rows: usize, tq: usize, tk: usize, pad: &[usize]) -> Tensor {
        let past = tk - tq;
        let mut m = Vec::new();
        for r in 0..rows {
            for i in 0..tq {
                for j in 0..tk {
                    m.push(u8::from(j <= past + i && j >= pad.get(r).copied().unwrap_or(0)));
                }
            }
        }
        Tensor::from_vec(m, (rows, 1, tq, tk), &Device::Cpu).unwrap()
    }

    #[test]
    fn fused_attention_matches_composite_values_and_gradients() {
        use crate::kernels::attention::{cached_attention, causal_attention, CausalMask};
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(2);
        let (b, h, hd) = (3, 4, 8);
        let c = h * hd;
        let max = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        // 11 positions: one query chunk; 150: three (the kernel computes each chunk over the
        // keys its last query sees), with left padding that covers whole chunks and ends
        // inside one. Fully padded query rows included.
        for (tl, pads) in [(11, vec![0usize, 4, 10]), (150, vec![0usize, 70, 129])] {
            let data: Vec<f32> = (0..b * tl * 3 * c).map(|_| rng.random_range(-2.0..2.0)).collect();
            let gd: Vec<f32> = (0..b * tl * c).map(|_| rng.random_range(-1.0..1.0)).collect();
            let gy = t(&gd, &[b, tl, c]);
            for pad in [None, Some(pads)] {
                let qkv = Var::from_tensor(&t(&data, &[b, tl, 3 * c])).unwrap();
                let mask = CausalMask { past: 0, pad: pad.clone() };
                let fused = causal_attention(&qkv, h, mask).unwrap();
                let rows = if pad.is_some() { b } else { 1 };
                let mt = mask_tensor(rows, tl, tl, pad.as_deref().unwrap_or(&[]));
                let (q, k, v) = (qkv.narrow(2, 0, c).unwrap(), qkv.narrow(2, c, c).unwrap(), qkv.narrow(2, 2 * c, c).unwrap());
                let comp = attention_composite(&q, &k, &v, h, &mt, None).unwrap();
                let dv = max(&fused, &comp);
                assert!(dv < 1e-5, "{tl} positions, pad {pad:?}: values differ by {dv}");
                let gf = fused.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
                let gc = comp.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
                let (gf, gc) = (gf.get(&qkv).unwrap(), gc.get(&qkv).unwrap());
                let dg = max(gf, gc);
                assert!(dg < 1e-5, "{tl} positions, pad {pad:?}: gradients differ by {dg}");
                assert!(gf.abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 1.0);
            }
        }
        // Cached keys: 4 new queries after 7 cached positions, and 100 (two chunks) after 50,
        // with padding.
        for (tq, tk, pad) in [(4, 11, vec![0usize, 3, 9]), (100, 150, vec![0usize, 60, 120])] {
            let r = |n: usize, rng: &mut StdRng| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let q = t(&r(b * tq * c, &mut rng), &[b, tq, c]);
            let k = t(&r(b * tk * c, &mut rng), &[b, tk, c]);
            let v = t(&r(b * tk * c, &mut rng), &[b, tk, c]);
            let fused = cached_attention(&q, &k, &v, tk, h, &CausalMask { past: tk - tq, pad: Some(pad.clone()) }).unwrap();
            // The same keys at the front of larger buffers (a KV cache with spare capacity).
            let spare = |x: &Tensor| Tensor::cat(&[x, &t(&r(b * 5 * c, &mut StdRng::seed_from_u64(9)), &[b, 5, c])], 1).unwrap();
            let in_buffers = cached_attention(&q, &spare(&k), &spare(&v), tk, h, &CausalMask { past: tk - tq, pad: Some(pad.clone()) }).unwrap();
            assert_eq!(max(&fused, &in_buffers), 0.0);
            let comp = attention_composite(&q, &k, &v, h, &mask_tensor(b, tq, tk, &pad), None).unwrap();
            let d = max(&fused, &comp);
            assert!(d < 1e-5, "{tq} queries after {}: values differ by {d}", tk - tq);
        }
    }

    #[test]
    fn packed_cached_attention_gives_each_sequence_its_own_bits() {
        use crate::kernels::attention::{cached_attention, cached_attention_packed, CachedSeq, CausalMask};
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(5);
        let max = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        // Head widths with and without a remainder after 16 lanes; sequences decoding one
        // token, a short chunk (the direct loops), a long one (the gemm products), padded
        // rows (one fully padded: it attends uniformly) and spare cache capacity.
        for (h, hd) in [(6, 64), (3, 20), (2, 7)] {
            let c = h * hd;
            let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            let shapes: [(usize, usize, usize, Option<Vec<usize>>); 5] = [(1, 1, 37, None), (1, 5, 9, None), (2, 1, 130, Some(vec![0, 50])), (1, 20, 20, None), (2, 3, 12, Some(vec![2, 12]))];
            let mut seqs = Vec::new();
            for (b, tq, tk, pad) in shapes {
                let cap = tk + 4;
                seqs.push(CachedSeq { q: t(&r(b * tq * c), &[b, tq, c]), k: t(&r(b * cap * c), &[b, cap, c]), v: t(&r(b * cap * c), &[b, cap, c]), tk, mask: CausalMask { past: tk - tq, pad } });
            }
            let packed = cached_attention_packed(&seqs, h).unwrap();
            for (s, got) in seqs.iter().zip(&packed) {
                let alone = cached_attention(&s.q, &s.k, &s.v, s.tk, h, &s.mask).unwrap();
                assert_eq!(max(got, &alone), 0.0, "hd {hd}: {:?} packed differs from alone", s.q.dims());
                let (b, tq, _) = s.q.dims3().unwrap();
                let pad = s.mask.pad.clone().unwrap_or_default();
                let (k, v) = (s.k.narrow(1, 0, s.tk).unwrap(), s.v.narrow(1, 0, s.tk).unwrap());
                let comp = attention_composite(&s.q, &k, &v, h, &mask_tensor(b, tq, s.tk, &pad), None).unwrap();
                let d = max(got, &comp);
                assert!(d < 1e-5, "hd {hd}: {:?} differs from the composite by {d}", s.q.dims());
            }
        }
        let bad = CachedSeq { q: t(&[0.0; 8], &[1, 1, 8]), k: t(&[0.0; 16], &[1, 2, 8]), v: t(&[0.0; 16], &[1, 2, 8]), tk: 3, mask: CausalMask::default() };
        assert_eq!(cached_attention_packed(&[bad], 2).err().map(|e| e.to_string()), Some("invalid input: fused attention: q [1, 1, 8], k [1, 2, 8], v [1, 2, 8], 3 cached positions and 2 heads do not fit".into()));
    }

    /// Queries read in place in a packed projection give each sequence the bits of
    /// `cached_attention` alone, and rows that do not add up are refused.
    #[test]
    fn attention_on_packed_projection_rows_gives_each_sequence_its_own_bits() {
        use crate::kernels::attention::{cached_attention, cached_attention_rows, CausalMask, PackedRows};
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(6);
        for (h, hd) in [(6, 64), (3, 20)] {
            let c = h * hd;
            let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-2.0..2.0)).collect() };
            // Decoding rows, a short chunk (the direct loops) and a long one (the products).
            let shapes = [(1, 37), (5, 9), (1, 130), (40, 45), (1, 1)];
            let n: usize = shapes.iter().map(|s| s.0).sum();
            let qkv = t(&r(n * 3 * c), &[1, n, 3 * c]);
            let mut seqs = Vec::new();
            let mut off = 0;
            for (tq, tk) in shapes {
                let cap = tk + 3;
                seqs.push(PackedRows { off, t: tq, k: t(&r(cap * c), &[1, cap, c]), v: t(&r(cap * c), &[1, cap, c]), tk, mask: CausalMask { past: tk - tq, pad: None } });
                off += tq;
            }
            let y = cached_attention_rows(&qkv, &seqs, h).unwrap();
            assert_eq!(y.dims(), [1, n, c]);
            for s in &seqs {
                let q = qkv.narrow(1, s.off, s.t).unwrap().narrow(2, 0, c).unwrap();
                let alone = cached_attention(&q, &s.k, &s.v, s.tk, h, &s.mask).unwrap();
                let got = y.narrow(1, s.off, s.t).unwrap();
                let bits = |x: &Tensor| x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&got), bits(&alone), "hd {hd}: rows {}..{}", s.off, s.off + s.t);
            }
            let short = &seqs[..2];
            assert_eq!(cached_attention_rows(&qkv, short, h).err().map(|e| e.to_string()), Some(format!("invalid input: fused attention: the sequences hold 6 of the {n} packed rows")));
        }
    }

    #[test]
    fn expert_matmul_matches_batched_matmul_values_and_gradients() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(4);
        let (e, m, k, n) = (5, 7, 12, 9);
        let mut r = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let x = Var::from_tensor(&t(&r(e * m * k), &[e, m, k])).unwrap();
        let w = Var::from_tensor(&t(&r(e * k * n), &[e, k, n])).unwrap();
        let gy = t(&r(e * m * n), &[e, m, n]);
        let fused = crate::kernels::expert_matmul::expert_matmul(&x, &w, None).unwrap();
        let comp = x.matmul(&w).unwrap();
        let max = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max(&fused, &comp) < 1e-5);
        let gf = fused.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = comp.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w] {
            assert!(max(gf.get(v).unwrap(), gc.get(v).unwrap()) < 1e-5);
        }
        // Through a sink: the same gradients, w's deposited and added back by its backward.
        let sink = crate::grad_sink::GradSink::new();
        let sunk = crate::kernels::expert_matmul::expert_matmul(&x, &w, Some(&sink)).unwrap();
        let gs = sink.backward(&sunk.mul(&gy).unwrap().sum_all().unwrap()).unwrap();
        for v in [&x, &w] {
            assert_eq!(max(gf.get(v).unwrap(), gs.get(v).unwrap()), 0.0);
        }
    }

    #[test]
    fn linear_kernel_matches_candle_matmul_values_and_gradients() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(6);
        // Leading dimensions [3, 11] (more rows than the weight-streaming path takes), odd sizes.
        let (lead, k, n) = ([3usize, 11], 21, 37);
        let mut r = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let x = Var::from_tensor(&t(&r(lead[0] * lead[1] * k), &[lead[0], lead[1], k])).unwrap();
        let w = Var::from_tensor(&t(&r(n * k), &[n, k])).unwrap();
        let b = Var::from_tensor(&t(&r(n), &[n])).unwrap();
        let gy = t(&r(lead[0] * lead[1] * n), &[lead[0], lead[1], n]);
        let fused = linear(&x, &w, Some(&b)).unwrap();
        let comp = linear_composite(&x, &w, Some(&b)).unwrap();
        assert_eq!(fused.dims(), &[3, 11, 37]);
        let max = |a: &Tensor, b: &Tensor| (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(max(&fused, &comp) < 1e-5);
        let gf = fused.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = comp.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &w, &b] {
            assert!(max(gf.get(v).unwrap(), gc.get(v).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn bias_add_matches_broadcast_add_values_and_gradients() {
        let x = Var::from_tensor(&t(&(0..60).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), &[3, 4, 5])).unwrap();
        let gy = t(&(0..60).map(|i| (i as f32 * 0.91).cos()).collect::<Vec<_>>(), &[3, 4, 5]);
        for bshape in [vec![5usize], vec![3, 1, 5]] {
            let n: usize = bshape.iter().product();
            let b = Var::from_tensor(&t(&(0..n).map(|i| i as f32 - 4.0).collect::<Vec<_>>(), &bshape)).unwrap();
            let fused = crate::kernels::bias::add_bias(&x, &b).unwrap();
            let comp = x.broadcast_add(&b).unwrap();
            assert_eq!((&fused - &comp).unwrap().abs().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
            let gf = fused.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
            let gc = comp.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
            for v in [&x, &b] {
                let d = (gf.get(v).unwrap() - gc.get(v).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
                assert!(d < 1e-5, "{bshape:?}: gradient differs by {d}");
            }
        }
    }

    #[test]
    fn fused_linear_cross_entropy_matches_composite_values_and_gradients() {
        use rand::{rngs::StdRng, Rng, SeedableRng};
        let mut rng = StdRng::seed_from_u64(6);
        let (n, c, v) = (19, 24, 301);
        let mut r = |len: usize, s: f32| -> Vec<f32> { (0..len).map(|_| rng.random_range(-s..s)).collect() };
        let h = Var::from_tensor(&t(&r(n * c, 1.0), &[n, c])).unwrap();
        let w = Var::from_tensor(&t(&r(v * c, 0.5), &[v, c])).unwrap();
        let targets: Vec<Option<u32>> = (0..n).map(|i| if i % 6 == 2 { None } else { Some((i * 37 % v) as u32) }).collect();
        let fused = crate::kernels::linear_cross_entropy::linear_cross_entropy(&h, &w, &targets).unwrap().unwrap();
        let comp = cross_entropy_composite(&h.matmul(&w.t().unwrap()).unwrap(), &targets).unwrap().unwrap();
        let (a, b) = (fused.to_scalar::<f32>().unwrap(), comp.to_scalar::<f32>().unwrap());
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        let gf = (fused * 2.5).unwrap().backward().unwrap();
        let gc = (comp * 2.5).unwrap().backward().unwrap();
        for (name, var) in [("h", &h), ("w", &w)] {
            let d = (gf.get(var).unwrap() - gc.get(var).unwrap()).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            assert!(d < 1e-5, "d{name} differs by {d}");
        }
    }

    #[test]
    fn cross_entropy_ignores_positions() {
        let logits = t(&[0., 0., 0., 0., 10., 0.], &[2, 3]);
        let l = cross_entropy(&logits, &[Some(2), None]).unwrap().unwrap();
        assert!((l.to_scalar::<f32>().unwrap() - 3f32.ln()).abs() < 1e-6);
        assert!(cross_entropy(&logits, &[None, None]).unwrap().is_none());
    }
}
