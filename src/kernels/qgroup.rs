//! Products of 8-bit activation rows with q8_0 / q4_0 weights in the grouped layout
//! (`quant::grouped`: 16 weight rows interleaved, 4 weights per 32-bit lane), on AVX-512
//! VNNI: one `vpdpbusd` multiplies 4 weights of each of 16 rows by the same 4 activation
//! bytes (broadcast) and adds them into the rows' 16 integer sums. A block of 32 weights
//! x 16 rows is 8 of them (q8_0) or 4 loads unpacked into 8 (q4_0), then one conversion
//! and one FMA with the 16 rows' scales times the activation block's; the row-layout
//! kernel (`qmatvec`) spends a sign, a `maddubs`, a `madd`, a conversion and an FMA per
//! block and row. Decoding and prompts both run here (up to 4 activation rows share each
//! weight load).
//!
//! The weights are the unsigned operand (q8_0 stored + 128, q4_0's nibbles 0..15), the
//! activations the signed one; the offset times the activation block's sum is taken off
//! the integer sum, which is then exact. Each output is the same sequence of operations in
//! any call (exact integer sums, then one FMA per block in block order), so a row's result
//! does not depend on the rows computed with it. The rows past the last whole group run
//! through the row-layout kernel.

use crate::kernels::qmatvec::QActs;
use crate::quant::grouped::{grouped_rows, GROUP};
use crate::quant::{QKind, BLOCK};

/// Whether this CPU runs the kernel (AVX-512 F, BW and VNNI).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") && is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use super::*;
    use std::arch::x86_64::*;

    /// Sums of R activation rows (from `r0`) with the 16 rows of the group at `g` (its
    /// block 0; `nb` blocks follow), into `out[r]`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    #[inline]
    pub unsafe fn group<const Q4: bool, const R: usize>(g: *const u8, nb: usize, a: &QActs, r0: usize, out: &mut [[f32; GROUP]; R]) {
        let gb = GROUP * if Q4 { 18 } else { 34 };
        let offset = if Q4 { 8 } else { 128 };
        let low = _mm512_set1_epi8(15);
        let mut acc = [_mm512_setzero_ps(); R];
        let aq = a.q.as_ptr().add(r0 * a.k);
        for b in 0..nb {
            let p = g.add(b * gb);
            _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(2048) as *const i8);
            let mut s = [_mm512_setzero_si512(); R];
            let x = |r: usize, i: usize| _mm512_set1_epi32(aq.add(r * a.k + b * BLOCK + i).cast::<i32>().read_unaligned());
            if Q4 {
                for st in 0..4 {
                    let raw = _mm512_loadu_si512(p.add(32 + st * 64).cast());
                    let lo = _mm512_and_si512(raw, low);
                    let hi = _mm512_and_si512(_mm512_srli_epi16(raw, 4), low);
                    for (r, s) in s.iter_mut().enumerate() {
                        *s = _mm512_dpbusd_epi32(*s, lo, x(r, 4 * st));
                        *s = _mm512_dpbusd_epi32(*s, hi, x(r, 16 + 4 * st));
                    }
                }
            } else {
                for st in 0..8 {
                    let w = _mm512_loadu_si512(p.add(32 + st * 64).cast());
                    for (r, s) in s.iter_mut().enumerate() {
                        *s = _mm512_dpbusd_epi32(*s, w, x(r, 4 * st));
                    }
                }
            }
            let scales = _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
            for (r, (s, acc)) in s.iter().zip(acc.iter_mut()).enumerate() {
                let row = r0 + r;
                let exact = _mm512_sub_epi32(*s, _mm512_set1_epi32(offset * a.s[row * nb + b]));
                let d = _mm512_mul_ps(scales, _mm512_set1_ps(a.d[row * nb + b]));
                *acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), d, *acc);
            }
        }
        for (o, acc) in out.iter_mut().zip(acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), acc);
        }
    }
}

/// out [m, len] = the activations times weight rows n0..n0 + len of one grouped matrix `w`
/// (`row_bytes` a row; its rows past the last whole group in the row layout, through
/// `tail`, the row-layout block kernel).
///
/// # Safety
/// [`available`] is true; `w` is a whole grouped matrix of `kind` with rows of `a.k`.
pub unsafe fn block(kind: QKind, a: &QActs, w: &[u8], row_bytes: usize, n0: usize, out: &mut [f32], tail: crate::kernels::qmatvec::BlockFn) {
    let m = a.m;
    let len = out.len() / m.max(1);
    let nb = a.k / BLOCK;
    let n = w.len() / row_bytes.max(1);
    debug_assert!(row_bytes == kind.row_bytes(a.k) && n0 + len <= n);
    let full = grouped_rows(n);
    let gb = GROUP * kind.block_bytes() * nb; // bytes of a group (all its blocks)
    let mut j = n0;
    while j < (n0 + len).min(full) {
        let g = j / GROUP;
        let (c0, c1) = (j - g * GROUP, (GROUP).min(n0 + len - g * GROUP));
        let gp = w.as_ptr().add(g * gb);
        let mut r = 0;
        let mut put = |r: usize, o: &[f32; GROUP]| {
            out[r * len + (g * GROUP + c0 - n0)..r * len + (g * GROUP + c1 - n0)].copy_from_slice(&o[c0..c1]);
        };
        while r + 4 <= m {
            let mut o = [[0f32; GROUP]; 4];
            match kind {
                QKind::Q8_0 => vnni::group::<false, 4>(gp, nb, a, r, &mut o),
                QKind::Q4_0 => vnni::group::<true, 4>(gp, nb, a, r, &mut o),
            }
            for (i, o) in o.iter().enumerate() {
                put(r + i, o);
            }
            r += 4;
        }
        while r < m {
            let mut o = [[0f32; GROUP]; 1];
            match kind {
                QKind::Q8_0 => vnni::group::<false, 1>(gp, nb, a, r, &mut o),
                QKind::Q4_0 => vnni::group::<true, 1>(gp, nb, a, r, &mut o),
            }
            put(r, &o[0]);
            r += 1;
        }
        j = g * GROUP + c1;
    }
    if n0 + len > full {
        // The rows after the groups, in the row layout.
        let t0 = n0.max(full);
        let tlen = n0 + len - t0;
        let mut part = vec![0f32; m * tlen];
        tail(a, &w[full * row_bytes..], row_bytes, t0 - full, &mut part);
        for r in 0..m {
            out[r * len + (t0 - n0)..r * len + len].copy_from_slice(&part[r * tlen..(r + 1) * tlen]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::qmatvec::{self, tests::exact};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    /// The grouped kernel against the exact sums of the quantized operands, on matrices with
    /// and without rows after the groups and output blocks that start inside a group; every
    /// row alone gives the bits it gives in a batch.
    #[test]
    fn grouped_products_equal_the_exact_sums_and_rows_are_independent() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI (the row-layout kernels run instead)");
            return;
        }
        let mut rng = StdRng::seed_from_u64(9);
        for kind in [QKind::Q8_0, QKind::Q4_0] {
            for (m, k, n) in [(1, 32, 16), (3, 96, 70), (7, 256, 129), (16, 384, 200), (5, 64, 7)] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.5..0.5)).collect();
                let rows = crate::quant::quantize(kind, &wf, k);
                let want = exact(kind, &x, m, k, &rows, n);
                let q = crate::quant::QTensor::quantize(kind, &wf, vec![n, k]).unwrap().into_grouped();
                let y = qmatvec::product_q(&q, 0, &x, m);
                for (i, (&a, &b)) in y.iter().zip(&want).enumerate() {
                    assert!((a as f64 - b).abs() <= 1e-4 * (1.0 + b.abs()), "{kind:?} {m}x{k}x{n} at {i}: {a} vs {b}");
                }
                for r in 0..m {
                    assert_eq!(qmatvec::product_q(&q, 0, &x[r * k..(r + 1) * k], 1), y[r * n..(r + 1) * n].to_vec(), "{kind:?} row {r} differs alone");
                }
                // A block of outputs starting inside a group (rows 5..n) equals those columns.
                let a = qmatvec::quantize_acts(&x, m, k);
                let rb = kind.row_bytes(k);
                let mut part = vec![0f32; m * (n - 5)];
                unsafe { block(kind, &a, &q.data, rb, 5, &mut part, qmatvec::block_fn(kind, false)) };
                for r in 0..m {
                    assert_eq!(&part[r * (n - 5)..(r + 1) * (n - 5)], &y[r * n + 5..(r + 1) * n], "{kind:?} {m}x{k}x{n} from row 5");
                }
            }
        }
    }
}
