//! Products of activation rows with quantized weights (q8_0 / q4_0 blocks, read in place),
//! as llama.cpp computes them: each activation row is quantized per block of 32 to 8 bits
//! (scale amax / 127), then every (weight block, activation block) pair is an integer dot
//! product of 32 bytes, scaled by the product of the two scales and summed in f32.
//!
//! The inner loop is AVX2 (`maddubs` / `madd` on 32 bytes; F16C for the scales) when the
//! CPU has it, else portable code; it is chosen once per product. Each row's sums are
//! formed in the same order whatever the number of rows in the call, so a sequence's
//! result does not depend on the others decoded with it (batch invariance, as in `matvec`).
//! Weights are read once per 4 activation rows; prompts run through the same kernel.

use candle_core::{DType, Tensor};

use crate::error::{input_err, Result};
use crate::quant::{QKind, QTensor, BLOCK};

/// Activation rows quantized per block: `q` [m, k] bytes, `d` [m, k / 32] scales, `s`
/// [m, k / 32] each block's sum of `q` (what the grouped kernel's unsigned weights need).
pub struct QActs {
    pub m: usize,
    pub k: usize,
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub s: Vec<i32>,
}

/// Quantizes activation rows (k a multiple of 32): d = amax / 127, q = round(x * 127 / amax),
/// halves to even (what the AVX2 rounding instruction does).
pub fn quantize_acts(x: &[f32], m: usize, k: usize) -> QActs {
    let nb = k / BLOCK;
    let mut q = vec![0i8; m * k];
    let mut d = vec![0f32; m * nb];
    for (xb, (qb, db)) in x.chunks(BLOCK).zip(q.chunks_mut(BLOCK).zip(d.iter_mut())) {
        let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
        let id = if amax == 0.0 { 0.0 } else { 127.0 / amax };
        *db = amax / 127.0;
        for (o, &v) in qb.iter_mut().zip(xb) {
            // Adding and taking away 1.5 * 2^23 rounds to the nearest integer, halves to
            // even, for |v * id| <= 127 (what `round_ties_even` does, without a libm call).
            *o = ((v * id + 12582912.0) - 12582912.0) as i8;
        }
    }
    let s = q.chunks(BLOCK).map(|b| b.iter().map(|&v| v as i32).sum()).collect();
    QActs { m, k, q, d, s }
}

/// Dot products of R activation rows (from `r0`) with one weight row (portable version).
#[inline(always)]
fn dots_portable<const R: usize>(kind: QKind, wrow: &[u8], a: &QActs, r0: usize, out: &mut [f32; R]) {
    let nb = a.k / BLOCK;
    let bb = kind.block_bytes();
    let mut acc = [0f32; R];
    let mut w = [0i8; BLOCK];
    for b in 0..nb {
        let dw = crate::quant::unpack_block(kind, &wrow[b * bb..(b + 1) * bb], &mut w);
        for (r, acc) in acc.iter_mut().enumerate() {
            let row = r0 + r;
            let q = &a.q[row * a.k + b * BLOCK..row * a.k + (b + 1) * BLOCK];
            let s: i32 = q.iter().zip(&w).map(|(&x, &y)| x as i32 * y as i32).sum();
            *acc += dw * a.d[row * nb + b] * s as f32;
        }
    }
    *out = acc;
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[inline(always)]
    unsafe fn scale(p: *const u8) -> f32 {
        let bits = (p as *const u16).read_unaligned();
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
    }

    /// R rows from r0 times one weight row; Q4: q4_0 blocks, else q8_0.
    #[inline(always)]
    pub unsafe fn dots<const Q4: bool, const R: usize>(wrow: &[u8], a: &QActs, r0: usize, out: &mut [f32; R]) {
        let nb = a.k / BLOCK;
        let bb = if Q4 { 18 } else { 34 };
        debug_assert!(wrow.len() >= nb * bb && a.q.len() >= (r0 + R) * a.k);
        let ones = _mm256_set1_epi16(1);
        let low = _mm_set1_epi8(15);
        let eight = _mm256_set1_epi8(8);
        let mut acc = [_mm256_setzero_ps(); R];
        let wp = wrow.as_ptr();
        let aq = a.q.as_ptr().add(r0 * a.k);
        let ad = a.d.as_ptr().add(r0 * nb);
        for b in 0..nb {
            let p = wp.add(b * bb);
            // Weight rows lie one after another: ask for the bytes 1 KiB ahead now, which
            // the hardware prefetcher alone leaves waiting on memory (rows are short).
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(1024) as *const i8);
            let dw = scale(p);
            let w = if Q4 {
                let q = _mm_loadu_si128(p.add(2) as *const __m128i);
                let lo = _mm_and_si128(q, low);
                let hi = _mm_and_si128(_mm_srli_epi16(q, 4), low);
                _mm256_sub_epi8(_mm256_set_m128i(hi, lo), eight)
            } else {
                _mm256_loadu_si256(p.add(2) as *const __m256i)
            };
            let aw = _mm256_sign_epi8(w, w);
            for (r, acc) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_si256(aq.add(r * a.k + b * BLOCK) as *const __m256i);
                let sx = _mm256_sign_epi8(x, w);
                let s = _mm256_madd_epi16(_mm256_maddubs_epi16(aw, sx), ones);
                let d = _mm256_set1_ps(dw * *ad.add(r * nb + b));
                *acc = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), *acc);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            *o = hsum(acc);
        }
    }

    struct Avx2<const Q4: bool>;

    impl<const Q4: bool> Dots for Avx2<Q4> {
        #[inline(always)]
        fn dots<const R: usize>(&self, wrow: &[u8], a: &QActs, r0: usize, out: &mut [f32; R]) {
            // SAFETY: only reached through `block`, which requires AVX2, FMA and F16C; the
            // reads stay inside the slices (checked by the callers' sizes).
            unsafe { dots::<Q4, R>(wrow, a, r0, out) }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn block<const Q4: bool>(a: &QActs, w: &[u8], row_bytes: usize, n0: usize, out: &mut [f32]) {
        super::block_with(&Avx2::<Q4>, a, w, row_bytes, n0, out)
    }
}

/// R activation rows times one weight row.
trait Dots {
    fn dots<const R: usize>(&self, wrow: &[u8], a: &QActs, r0: usize, out: &mut [f32; R]);
}

struct Portable(QKind);

impl Dots for Portable {
    #[inline(always)]
    fn dots<const R: usize>(&self, wrow: &[u8], a: &QActs, r0: usize, out: &mut [f32; R]) {
        dots_portable::<R>(self.0, wrow, a, r0, out)
    }
}

/// out[:, j] for the weight rows n0.. (out has `m` rows of len columns), 4 rows at a time.
#[inline(always)]
fn block_with<D: Dots>(d: &D, a: &QActs, w: &[u8], row_bytes: usize, n0: usize, out: &mut [f32]) {
    let m = a.m;
    let len = out.len() / m;
    for j in 0..len {
        let wr = &w[(n0 + j) * row_bytes..(n0 + j + 1) * row_bytes];
        let mut r = 0;
        while r + 4 <= m {
            let mut o = [0f32; 4];
            d.dots::<4>(wr, a, r, &mut o);
            for (i, v) in o.into_iter().enumerate() {
                out[(r + i) * len + j] = v;
            }
            r += 4;
        }
        while r < m {
            let mut o = [0f32; 1];
            d.dots::<1>(wr, a, r, &mut o);
            out[r * len + j] = o[0];
            r += 1;
        }
    }
}

/// A block kernel: `f(acts, w, row_bytes, n0, out)` fills out [m, len] with the quantized
/// activations times weight rows n0..n0 + len.
pub(crate) type BlockFn = fn(&QActs, &[u8], usize, usize, &mut [f32]);

/// The block kernel [`product_q`] runs on this CPU for `kind`'s blocks in the row layout, or
/// `grouped` (`quant::grouped`, which only CPUs with [`crate::kernels::qgroup::available`]
/// are given). Each output is summed the same way in any block.
pub(crate) fn block_fn(kind: QKind, grouped: bool) -> BlockFn {
    if grouped {
        // SAFETY: grouped tensors exist only where the kernel runs (`QTensor::for_this_cpu`;
        // the tests check `available` first); the callers pass whole matrices.
        return match kind {
            QKind::Q8_0 => |a, w, rb, n0, out| unsafe { crate::kernels::qgroup::block(QKind::Q8_0, a, w, rb, n0, out, pick(QKind::Q8_0, false)) },
            QKind::Q4_0 => |a, w, rb, n0, out| unsafe { crate::kernels::qgroup::block(QKind::Q4_0, a, w, rb, n0, out, pick(QKind::Q4_0, false)) },
        };
    }
    pick(kind, false)
}

fn pick(kind: QKind, portable: bool) -> BlockFn {
    #[cfg(target_arch = "x86_64")]
    if !portable && super::has_avx2_fma_f16c() {
        return match kind {
            QKind::Q8_0 => |a, w, rb, n0, out| unsafe { avx2::block::<false>(a, w, rb, n0, out) },
            QKind::Q4_0 => |a, w, rb, n0, out| unsafe { avx2::block::<true>(a, w, rb, n0, out) },
        };
    }
    let _ = portable;
    match kind {
        QKind::Q8_0 => |a, w, rb, n0, out| block_with(&Portable(QKind::Q8_0), a, w, rb, n0, out),
        QKind::Q4_0 => |a, w, rb, n0, out| block_with(&Portable(QKind::Q4_0), a, w, rb, n0, out),
    }
}

/// y [m, n] = x [m, k] times the quantized matrix `w` ([n, k] blocks), in parallel over
/// blocks of outputs. `portable` forces the portable kernel (for its test).
pub fn product(kind: QKind, x: &[f32], m: usize, k: usize, w: &[u8], n: usize, portable: bool) -> Vec<f32> {
    let a = quantize_acts(x, m, k);
    let f = pick(kind, portable);
    let rb = kind.row_bytes(k);
    super::by_column_blocks(m, n, 32, |n0, out| f(&a, w, rb, n0, out))
}

/// y [m, n] = x [m, k] times matrix `e` of `q` ([.., n, k]), in either layout, on this CPU's
/// kernel. Panics on wrong sizes (the callers check them).
pub fn product_q(q: &QTensor, e: usize, x: &[f32], m: usize) -> Vec<f32> {
    let (k, n) = (q.cols(), q.rows());
    assert!(x.len() == m * k && e < q.matrices(), "product_q: {m} rows of {} values against {:?}", x.len() / m.max(1), q.shape);
    if !q.grouped {
        return product(q.kind, x, m, k, q.matrix(e), n, false);
    }
    let a = quantize_acts(x, m, k);
    let f = block_fn(q.kind, true);
    let (rb, w) = (q.kind.row_bytes(k), q.matrix(e));
    super::by_column_blocks(m, n, 32, |n0, out| f(&a, w, rb, n0, out))
}

/// `x [.., K] @ w^T` for matrix `e` of a quantized [.., N, K] weight: [.., N], f32, no
/// gradient (quantized weights are for inference).
pub fn qlinear(x: &Tensor, w: &QTensor, e: usize) -> Result<Tensor> {
    qlinear_with(x, w, e, |xs, m, _, _, _| product_q(w, e, xs, m))
}

/// [`qlinear`] with another product `f(x, m, k, w, n)` of the same contract as [`product`].
pub fn qlinear_with(x: &Tensor, w: &QTensor, e: usize, f: impl FnOnce(&[f32], usize, usize, &[u8], usize) -> Vec<f32>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().ok_or_else(|| input_err!("qlinear: x is a scalar"))?;
    if k != w.cols() || e >= w.matrices() {
        return Err(input_err!("qlinear: x is {dims:?} but the weight is {:?} (matrix {e})", w.shape));
    }
    let m = x.elem_count() / k.max(1);
    let n = w.rows();
    let xs: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let y = f(&xs, m, k, w.matrix(e), n);
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = n;
    Ok(Tensor::from_vec(y, out, x.device())?)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The exact value of the quantized product: f64 sums of dequantized weights times
    /// dequantized activations.
    pub(crate) fn exact(kind: QKind, x: &[f32], m: usize, k: usize, w: &[u8], n: usize) -> Vec<f64> {
        let a = quantize_acts(x, m, k);
        let wf = crate::quant::dequantize(kind, w);
        let mut y = vec![0f64; m * n];
        for r in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for c in 0..k {
                    s += (a.q[r * k + c] as f64 * a.d[r * k / BLOCK + c / BLOCK] as f64) * wf[j * k + c] as f64;
                }
                y[r * n + j] = s;
            }
        }
        y
    }

    #[test]
    fn products_equal_the_dequantized_sums_and_rows_are_independent() {
        let mut rng = StdRng::seed_from_u64(5);
        for kind in [QKind::Q8_0, QKind::Q4_0] {
            for (m, k, n) in [(1, 32, 3), (3, 96, 70), (7, 256, 129), (16, 384, 200)] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.5..0.5)).collect();
                let w = crate::quant::quantize(kind, &wf, k);
                let want = exact(kind, &x, m, k, &w, n);
                for portable in [false, true] {
                    let y = product(kind, &x, m, k, &w, n, portable);
                    for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
                        assert!((a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{kind:?} {m}x{k}x{n} portable={portable} at {i}: {a} vs {b}");
                    }
                    // Each row alone gives the same bits as in the batch.
                    for r in 0..m {
                        let alone = product(kind, &x[r * k..(r + 1) * k], 1, k, &w, n, portable);
                        assert_eq!(alone, y[r * n..(r + 1) * n].to_vec(), "{kind:?} row {r} differs alone");
                    }
                }
            }
        }
    }
}
