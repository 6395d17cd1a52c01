//! Prompt-sized products with quantized weights (q8_0 / q4_0): integer GEMMs on 8-bit
//! activations, for more rows than the decoding kernel (`qmatvec`) takes.
//!
//! The activation rows are quantized per block of 32 exactly as for decoding (scale
//! amax / 127). The weights are repacked 16 rows at a time so that each 32-bit lane of two
//! registers holds 4 consecutive weights of one row; a `maddubs` of such a register with 4
//! activation bytes broadcast to every lane then advances 8 outputs at once, and a block's
//! sums stay integers until its two scales are applied (one f32 FMA per block and 8
//! outputs). Tiles are 4 activation rows x 16 weight rows. The decoding kernel instead
//! spends a sign, a `maddubs`, a `madd`, a conversion and an FMA per block and output.
//!
//! - q4_0: the activations are the unsigned operand, as x + 128, against the weights
//!   -8..7; the extra 128 x (the block's weight sum) is taken off once per block. A
//!   block's 8 `maddubs` results add up in 16 bits without overflow (8 x 2 x 255 x 8 =
//!   32,640).
//! - q8_0: signed weights, so `maddubs(|w|, sign(x, w))` as llama.cpp does, widened to 32
//!   bits at every step (2 x 127 x 127 already fills 16 bits).
//!
//! Every output is the same sequence of operations whatever the number of rows and
//! wherever its row falls in a tile (exact integer sums, then one FMA per block in block
//! order), so a row's result does not depend on the rows computed with it. AVX2 only;
//! `available()` says whether the CPU has it (the callers fall back to f32 products on the
//! dequantized weights).

use crate::kernels::qmatvec::{quantize_acts, QActs};
use crate::quant::{QKind, BLOCK};

/// Weight rows per repacked group: two registers of 8 rows, one per 32-bit lane.
const GROUP: usize = 16;
/// Bytes of one repacked block of a group: 8 steps of 4 weights x 16 rows.
const PACKED_BLOCK: usize = BLOCK * GROUP;

/// Whether this CPU runs the kernel (AVX2, FMA, F16C).
pub fn available() -> bool {
    super::has_avx2_fma_f16c()
}

/// Up to 16 weight rows repacked for the kernel: `w` [nb][8 steps][16 rows][4 weights]
/// (q4_0: the weights - 8..7 as signed bytes; q8_0: the signed bytes), `d` [nb][16] the
/// rows' block scales as f32, `off` [nb][16] (q4_0) 128 x each block's weight sum, what
/// the unsigned activations (x + 128) add. Missing rows are zeros (scale 0).
struct Packed {
    w: Vec<u8>,
    d: Vec<f32>,
    off: Vec<i32>,
}

impl Packed {
    fn new(nb: usize) -> Self {
        Packed { w: vec![0; nb * PACKED_BLOCK], d: vec![0.0; nb * GROUP], off: vec![0; nb * GROUP] }
    }

    /// Repacks `rows` (`count` <= 16 rows of `nb` blocks, `kind`'s layout).
    fn fill(&mut self, kind: QKind, rows: &[u8], count: usize, nb: usize) {
        let bb = kind.block_bytes();
        let row_bytes = nb * bb;
        let mut vals = [0i8; BLOCK];
        for j in 0..GROUP {
            for b in 0..nb {
                if j < count {
                    let blk = &rows[j * row_bytes + b * bb..j * row_bytes + (b + 1) * bb];
                    self.d[b * GROUP + j] = crate::quant::unpack_block(kind, blk, &mut vals);
                } else {
                    self.d[b * GROUP + j] = 0.0;
                    vals = [0; BLOCK];
                }
                if kind == QKind::Q4_0 {
                    self.off[b * GROUP + j] = 128 * vals.iter().map(|&v| v as i32).sum::<i32>();
                }
                let out = &mut self.w[b * PACKED_BLOCK..(b + 1) * PACKED_BLOCK];
                for step in 0..BLOCK / 4 {
                    for t in 0..4 {
                        out[step * GROUP * 4 + j * 4 + t] = vals[step * 4 + t] as u8;
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    /// Rows r0..r0+R of the activations times one packed group: 16 outputs per row, stored
    /// at `out + r * ldo` (the first `valid` of them). `xu`: the activations as unsigned
    /// bytes (x + 128; q4_0) or signed (q8_0).
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const Q4: bool, const R: usize>(p: &Packed, xq: &[u8], a: &QActs, steps: usize, r0: usize, out: *mut f32, ldo: usize, valid: usize) {
        let nb = a.k / BLOCK;
        debug_assert!(xq.len() >= (r0 + R) * a.k && p.w.len() >= nb * PACKED_BLOCK);
        let ones = _mm256_set1_epi16(1);
        let aq = xq.as_ptr().add(r0 * a.k);
        let ad = a.d.as_ptr().add(r0 * nb);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for b in 0..nb {
            let wp = p.w.as_ptr().add(b * PACKED_BLOCK);
            let xp = aq.add(b * BLOCK);
            let mut s = [[_mm256_setzero_si256(); 2]; R];
            for step in 0..steps {
                let w0 = _mm256_loadu_si256(wp.add(step * 64) as *const __m256i);
                let w1 = _mm256_loadu_si256(wp.add(step * 64 + 32) as *const __m256i);
                for (r, s) in s.iter_mut().enumerate() {
                    let x = _mm256_set1_epi32((xp.add(r * a.k + step * 4) as *const i32).read_unaligned());
                    if Q4 {
                        // (x + 128) unsigned times w in -8..7: a pair is at most 2 x 255 x 8,
                        // 8 steps at most 32,640 - no 16-bit overflow.
                        s[0] = _mm256_add_epi16(s[0], _mm256_maddubs_epi16(x, w0));
                        s[1] = _mm256_add_epi16(s[1], _mm256_maddubs_epi16(x, w1));
                    } else {
                        let p0 = _mm256_maddubs_epi16(_mm256_sign_epi8(w0, w0), _mm256_sign_epi8(x, w0));
                        let p1 = _mm256_maddubs_epi16(_mm256_sign_epi8(w1, w1), _mm256_sign_epi8(x, w1));
                        s[0] = _mm256_add_epi32(s[0], _mm256_madd_epi16(p0, ones));
                        s[1] = _mm256_add_epi32(s[1], _mm256_madd_epi16(p1, ones));
                    }
                }
            }
            let dw = [_mm256_loadu_ps(p.d.as_ptr().add(b * GROUP)), _mm256_loadu_ps(p.d.as_ptr().add(b * GROUP + 8))];
            let off = [
                _mm256_loadu_si256(p.off.as_ptr().add(b * GROUP) as *const __m256i),
                _mm256_loadu_si256(p.off.as_ptr().add(b * GROUP + 8) as *const __m256i),
            ];
            for (r, (acc, s)) in acc.iter_mut().zip(s).enumerate() {
                let dx = _mm256_set1_ps(*ad.add(r * nb + b));
                for h in 0..2 {
                    let si = if Q4 { _mm256_sub_epi32(_mm256_madd_epi16(s[h], ones), off[h]) } else { s[h] };
                    acc[h] = _mm256_fmadd_ps(_mm256_mul_ps(dw[h], dx), _mm256_cvtepi32_ps(si), acc[h]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            if valid == GROUP {
                _mm256_storeu_ps(out.add(r * ldo), acc[0]);
                _mm256_storeu_ps(out.add(r * ldo + 8), acc[1]);
            } else {
                let mut t = [0f32; GROUP];
                _mm256_storeu_ps(t.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(t.as_mut_ptr().add(8), acc[1]);
                std::ptr::copy_nonoverlapping(t.as_ptr(), out.add(r * ldo), valid);
            }
        }
    }

    /// out [m, len] = the activations times weight rows n0..n0+len.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn block<const Q4: bool>(a: &QActs, xq: &[u8], w: &[u8], n0: usize, out: &mut [f32]) {
        let kind = if Q4 { QKind::Q4_0 } else { QKind::Q8_0 };
        let (m, nb) = (a.m, a.k / BLOCK);
        let rb = kind.row_bytes(a.k);
        let len = out.len() / m.max(1);
        // The 8 steps of a block, as a number the compiler cannot see: unrolled, their loads
        // are all hoisted ahead and spill the registers.
        let steps = std::hint::black_box(BLOCK / 4);
        debug_assert_eq!(steps, BLOCK / 4);
        let mut p = Packed::new(nb);
        let o = out.as_mut_ptr();
        for g0 in (0..len).step_by(GROUP) {
            let count = GROUP.min(len - g0);
            p.fill(kind, &w[(n0 + g0) * rb..(n0 + g0 + count) * rb], count, nb);
            let mut r = 0;
            while r + TILE_ROWS <= m {
                tile::<Q4, TILE_ROWS>(&p, xq, a, steps, r, o.add(r * len + g0), len, count);
                r += TILE_ROWS;
            }
            while r < m {
                tile::<Q4, 1>(&p, xq, a, steps, r, o.add(r * len + g0), len, count);
                r += 1;
            }
        }
    }
}

/// Activation rows per tile.
const TILE_ROWS: usize = 4;

/// y [m, n] = x [m, k] times the quantized matrix `w` ([n, k] blocks of `kind`), in
/// parallel over blocks of outputs. Requires [`available`].
pub fn product(kind: QKind, x: &[f32], m: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
    assert!(available(), "qgemm::product needs AVX2, FMA and F16C");
    assert!(k.is_multiple_of(BLOCK) && x.len() == m * k && w.len() == n * kind.row_bytes(k), "qgemm::product: sizes");
    let a: QActs = quantize_acts(x, m, k);
    // q4_0 takes the activations as the unsigned operand, x + 128; q8_0 the bytes as they are.
    let shifted: Vec<u8>;
    let xq: &[u8] = if kind == QKind::Q4_0 {
        shifted = a.q.iter().map(|&v| (v as u8) ^ 0x80).collect();
        &shifted
    } else {
        // SAFETY: i8 and u8 have the same size and alignment, and every bit pattern is valid.
        unsafe { std::slice::from_raw_parts(a.q.as_ptr() as *const u8, a.q.len()) }
    };
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `available()` checked AVX2, FMA and F16C; the sizes were checked above and
        // every read and write stays inside `a`, `xq`, `w` and `out`.
        super::by_column_blocks(m, n, 32, |n0, out| unsafe {
            match kind {
                QKind::Q4_0 => avx2::block::<true>(&a, xq, w, n0, out),
                QKind::Q8_0 => avx2::block::<false>(&a, xq, w, n0, out),
            }
        })
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("available() is false off x86_64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn products_equal_the_exact_sums_of_the_quantized_operands_and_rows_are_independent() {
        if !available() {
            eprintln!("skipped: qgemm needs AVX2, FMA and F16C");
            return;
        }
        let mut rng = StdRng::seed_from_u64(11);
        for kind in [QKind::Q8_0, QKind::Q4_0] {
            for (m, k, n) in [(33, 32, 3), (37, 96, 70), (64, 256, 129), (45, 384, 16)] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.random_range(-2.0..2.0)).collect();
                let wf: Vec<f32> = (0..n * k).map(|_| rng.random_range(-0.5..0.5)).collect();
                let w = crate::quant::quantize(kind, &wf, k);
                let want = crate::kernels::qmatvec::tests::exact(kind, &x, m, k, &w, n);
                let y = product(kind, &x, m, k, &w, n);
                for (i, (&got, &want)) in y.iter().zip(&want).enumerate() {
                    assert!((got as f64 - want).abs() <= 1e-4 * (1.0 + want.abs()), "{kind:?} {m}x{k}x{n} at {i}: {got} vs {want}");
                }
                // The rows from the second on (so that tiles fall differently) give the same bits.
                let shifted = product(kind, &x[k..], m - 1, k, &w, n);
                assert_eq!(shifted, y[n..].to_vec(), "{kind:?} {m}x{k}x{n}: rows depend on their neighbours");
            }
        }
    }
}
