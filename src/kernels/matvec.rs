//! Products of a few activation rows (decoding: 1 to 32 tokens) with a large weight matrix,
//! reading each weight once straight from memory, in f32 or bf16 (always accumulated in
//! f32). A general matrix multiplication packs the weight matrix into tiles first, which
//! for one row costs more than the product itself; decoding is bound by how fast the
//! weights stream from memory, so bf16 weights halve its time.
//!
//! Two weight layouts: [N, K] (torch's nn.Linear, y = x w^T) and [K, N] (nanoMoE's expert
//! tensors, y = x w). The inner loops are compiled three times - AVX-512, AVX2 + FMA and
//! baseline - and picked at run time.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

use crate::error::Result;
use crate::kernels::contiguous_f32;

const NAME: &str = "matvec";

/// At most this many activation rows go through these kernels; more use candle's matmul.
/// 32: a serving step's 16 decoding rows plus a joining prompt's chunk of up to 16 tokens.
pub const MAX_ROWS: usize = 32;

/// A weight element: f32, bf16 or f16.
pub trait Weight: Copy + Send + Sync + 'static {
    fn f(self) -> f32;
    /// 8 weights from `p` as f32 lanes (inlined into the AVX2 kernels only).
    ///
    /// # Safety
    /// 8 elements must be readable at `p`, and the CPU must have AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
    /// 16 weights from `p` as f32 lanes (inlined into the AVX-512 kernels only).
    ///
    /// # Safety
    /// 16 elements must be readable at `p`, and the CPU must have AVX-512F.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
}

impl Weight for f32 {
    #[inline(always)]
    fn f(self) -> f32 {
        self
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        std::arch::x86_64::_mm256_loadu_ps(p)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        std::arch::x86_64::_mm512_loadu_ps(p)
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn f(self) -> f32 {
        f32::from_bits((self.to_bits() as u32) << 16)
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        let h = _mm256_loadu_si256(p as *const __m256i);
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }
}

impl Weight for half::f16 {
    /// Exact, branch-free (so the loops vectorize): the 15 low bits moved into an f32's
    /// exponent and mantissa and scaled by 2^112 (normals and subnormals alike), infinities
    /// and NaNs mapped to f32's, then the sign.
    #[inline(always)]
    fn f(self) -> f32 {
        let h = self.to_bits() as u32;
        let e = h & 0x7fff;
        let v = f32::from_bits(e << 13) * f32::from_bits(0x7780_0000);
        let v = if e >= 0x7c00 { f32::from_bits((e << 13) | 0x7f80_0000) } else { v };
        f32::from_bits(v.to_bits() | ((h & 0x8000) << 16))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
    }
    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512 {
        use std::arch::x86_64::*;
        _mm512_cvtph_ps(_mm256_loadu_si256(p as *const __m256i))
    }
}

/// How a dot product over k is summed, the same in every kernel of the [N, K] layout:
/// k's whole chunks of LANES elements go, in turn, to ACCS accumulators of LANES lanes
/// (chunk q into accumulator q % ACCS); the accumulators are added, the lanes reduced by a
/// fixed pairwise tree (8 -> 4 -> 2 -> 1), then the last k % LANES products added in order.
/// Every row's result is computed this same way however many rows share the pass, so a
/// row's product does not depend on the others (batch-invariant decoding,
/// `GPT::forward_packed`). One accumulator is one AVX2 register; two of them keep two fused
/// multiply-adds in flight per (row, output), where one chain would wait out each one's
/// latency (a half-precision row then streams at ~4 bytes a cycle, about the memory's
/// bandwidth on 2 cores, and no faster).
const LANES: usize = 8;
const ACCS: usize = 2;

/// Sum of a dot product's accumulators, in the order described at [`LANES`].
#[inline(always)]
fn reduce(acc: &[[f32; LANES]; ACCS]) -> f32 {
    let mut v: [f32; LANES] = std::array::from_fn(|i| acc[0][i] + acc[1][i]);
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            v[i] += v[i + w];
        }
        w /= 2;
    }
    v[0]
}

/// Dot products of R activation rows (row stride k) with one weight row.
#[inline(always)]
fn dots<W: Weight, const R: usize>(x: &[f32], k: usize, wr: &[W], out: &mut [f32; R]) {
    let mut acc = [[[0f32; LANES]; ACCS]; R];
    let split = k / LANES * LANES;
    for c in (0..split).step_by(LANES) {
        let q = c / LANES % ACCS;
        let wc: &[W; LANES] = wr[c..c + LANES].try_into().expect("a full chunk");
        let wv: [f32; LANES] = std::array::from_fn(|i| wc[i].f());
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv: &[f32; LANES] = x[r * k + c..r * k + c + LANES].try_into().expect("a full chunk");
            for i in 0..LANES {
                acc[q][i] += xv[i] * wv[i];
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        let mut s = reduce(acc);
        for c in split..k {
            s += x[r * k + c] * wr[c].f();
        }
        out[r] = s;
    }
}

/// y[:, n0..n0+len] for w [N, K]: each weight row read once for 4 activation rows at a
/// time. (`_n` keeps the signature equal to `block_kn`'s.)
fn block_nk<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], _n: usize, n0: usize, out: &mut [f32]) {
    let len = out.len() / m;
    for j in 0..len {
        let wr = &w[(n0 + j) * k..(n0 + j + 1) * k];
        let mut r = 0;
        while r + 4 <= m {
            let mut o = [0f32; 4];
            dots::<W, 4>(&x[r * k..], k, wr, &mut o);
            for (i, v) in o.into_iter().enumerate() {
                out[(r + i) * len + j] = v;
            }
            r += 4;
        }
        while r < m {
            let mut o = [0f32; 1];
            dots::<W, 1>(&x[r * k..], k, wr, &mut o);
            out[r * len + j] = o[0];
            r += 1;
        }
    }
}

/// The [N, K] kernel on AVX2 registers: the sums of [`LANES`] in registers, fused
/// multiply-adds over k. Decoding one sequence reads one weight row at a time straight
/// through: the block's rows are one contiguous stream, which the hardware prefetcher
/// follows at the memory's bandwidth (4 rows walked side by side with software prefetches
/// a tile ahead, as this kernel did before, read ~30 % slower on a Zen 4 EPYC: GPT-2 124M
/// f16 decoding 70 -> 100 tokens/s). Batches of 5 rows or more (batched decoding, prompt
/// chunks) take tiles of R activation rows x 3 weight rows, so each weight load serves R
/// rows and each activation load 3 weight rows. The code is compiled twice: for AVX2 (16
/// registers: R = 2) and with AVX-512VL (32 registers: R = 4); both sum every output the
/// same way, so they give the same bits.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Weight, ACCS, LANES};
    use std::arch::x86_64::*;

    /// The sum of one (row, output)'s accumulators, as [`super::reduce`] adds them.
    #[inline(always)]
    unsafe fn reduce(a: &[__m256; ACCS]) -> f32 {
        let a = _mm256_add_ps(a[0], a[1]);
        let s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// acc[r][j][Q] += x row r . weight row j over the LANES elements at c.
    #[inline(always)]
    unsafe fn step<W: Weight, const R: usize, const J: usize, const Q: usize>(x: *const f32, k: usize, wr: *const W, c: usize, acc: &mut [[[__m256; ACCS]; J]; R]) {
        let mut w = [_mm256_setzero_ps(); J];
        for (j, w) in w.iter_mut().enumerate() {
            *w = W::load8(wr.add(j * k + c));
        }
        for (r, acc) in acc.iter_mut().enumerate() {
            let xv = _mm256_loadu_ps(x.add(r * k + c));
            for (a, w) in acc.iter_mut().zip(&w) {
                a[Q] = _mm256_fmadd_ps(xv, *w, a[Q]);
            }
        }
    }

    /// R activation rows times J weight rows (both of stride k): out[r][j]. R x J x ACCS
    /// accumulators, J weight registers and one activation register.
    #[inline(always)]
    unsafe fn tile<W: Weight, const R: usize, const J: usize>(x: *const f32, k: usize, wr: *const W, out: &mut [[f32; J]; R]) {
        let mut acc = [[[_mm256_setzero_ps(); ACCS]; J]; R];
        let split = k / LANES * LANES;
        let mut c = 0;
        while c + ACCS * LANES <= split {
            if J > 1 {
                // The same columns of the next tile's rows, into L1: the hardware
                // prefetcher alone leaves interleaved rows waiting on memory (a hint: past
                // the last row it reads nothing).
                for j in 0..J {
                    _mm_prefetch::<_MM_HINT_T0>(wr.wrapping_add(J * k + j * k + c) as *const i8);
                }
            }
            step::<W, R, J, 0>(x, k, wr, c, &mut acc);
            step::<W, R, J, 1>(x, k, wr, c + LANES, &mut acc);
            c += ACCS * LANES;
        }
        // One whole chunk may be left, for accumulator 0.
        if c < split {
            step::<W, R, J, 0>(x, k, wr, c, &mut acc);
        }
        for (r, (acc, out)) in acc.iter().zip(out.iter_mut()).enumerate() {
            for (j, (acc, o)) in acc.iter().zip(out.iter_mut()).enumerate() {
                let mut s = reduce(acc);
                for c in split..k {
                    s += *x.add(r * k + c) * (*wr.add(j * k + c)).f();
                }
                *o = s;
            }
        }
    }

    /// [`tile`] compiled on its own for the instruction set (AVX-512VL or AVX2): inlined into
    /// the block's loops, the hot loop shared the registers with them and reloaded its row
    /// pointers from the stack on every pass (batched decoding ~1.4x slower).
    #[inline(always)]
    unsafe fn tile_on<W: Weight, const R: usize, const J: usize, const VL: bool>(x: *const f32, k: usize, wr: *const W, out: &mut [[f32; J]; R]) {
        if VL {
            tile_vl::<W, R, J>(x, k, wr, out)
        } else {
            tile_avx2::<W, R, J>(x, k, wr, out)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    #[inline(never)]
    unsafe fn tile_vl<W: Weight, const R: usize, const J: usize>(x: *const f32, k: usize, wr: *const W, out: &mut [[f32; J]; R]) {
        tile::<W, R, J>(x, k, wr, out)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline(never)]
    unsafe fn tile_avx2<W: Weight, const R: usize, const J: usize>(x: *const f32, k: usize, wr: *const W, out: &mut [[f32; J]; R]) {
        tile::<W, R, J>(x, k, wr, out)
    }

    /// Weight rows j..j + J (out's columns j..) for every activation row: R at a time,
    /// then singly. The J weight rows stay in L1 while the rows pass by.
    #[inline(always)]
    unsafe fn rows<W: Weight, const R: usize, const J: usize, const VL: bool>(xp: *const f32, m: usize, k: usize, wr: *const W, j: usize, len: usize, out: &mut [f32]) {
        let mut r = 0;
        while r + R <= m {
            let mut o = [[0f32; J]; R];
            tile_on::<W, R, J, VL>(xp.add(r * k), k, wr, &mut o);
            for (i, o) in o.iter().enumerate() {
                out[(r + i) * len + j..(r + i) * len + j + J].copy_from_slice(o);
            }
            r += R;
        }
        while r < m {
            let mut o = [[0f32; J]; 1];
            tile_on::<W, 1, J, VL>(xp.add(r * k), k, wr, &mut o);
            out[r * len + j..r * len + j + J].copy_from_slice(&o[0]);
            r += 1;
        }
    }

    /// The block. Up to 4 activation rows: one weight row at a time, read straight through
    /// (rows in pairs, or all 4 at once with AVX-512VL). More: 3 weight rows at a time (rows
    /// R at a time), the last weight rows singly. At 4 rows the single stream reads faster
    /// than the 3-row tiles (nano-MoE decoding 4 sequences: 370-390 -> 435-570 tokens/s,
    /// GPT-2 124M unchanged); from 5 or 6 rows on the tiles' reuse wins (GPT-2 124M f16 at
    /// 6 sequences: 180 against 260-280).
    #[inline(always)]
    unsafe fn block<W: Weight, const R: usize, const VL: bool>(x: &[f32], m: usize, k: usize, w: &[W], n0: usize, out: &mut [f32]) {
        let len = out.len() / m;
        debug_assert!(x.len() >= m * k && w.len() >= (n0 + len) * k);
        let (xp, wp) = (x.as_ptr(), w.as_ptr().add(n0 * k));
        let mut j = 0;
        if m > 4 {
            while j + 3 <= len {
                rows::<W, R, 3, VL>(xp, m, k, wp.add(j * k), j, len, out);
                j += 3;
            }
        }
        while j < len {
            if m >= 4 {
                rows::<W, R, 1, VL>(xp, m, k, wp.add(j * k), j, len, out);
            } else {
                rows::<W, 2, 1, VL>(xp, m, k, wp.add(j * k), j, len, out);
            }
            j += 1;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn block_nk<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], _n: usize, n0: usize, out: &mut [f32]) {
        block::<W, 2, false>(x, m, k, w, n0, out)
    }

    /// The same code with AVX-512VL's 32 vector registers: tiles of 4 activation rows.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl")]
    pub unsafe fn block_nk_vl<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], _n: usize, n0: usize, out: &mut [f32]) {
        block::<W, 4, true>(x, m, k, w, n0, out)
    }
}

/// The [K, N] kernel (nanoMoE's expert tensors) with AVX2 + FMA: every output column is a
/// fused multiply-add over k in order, from zero, whatever tile it falls in - 16 columns of
/// 4 rows or 64 columns of 1 row (8 accumulator registers either way), or one column - so a
/// row's result does not depend on the rows it is batched with.
#[cfg(target_arch = "x86_64")]
mod avx2_kn {
    use super::Weight;
    use std::arch::x86_64::*;

    /// Rows of w (k) per pass over a block's columns: the tiles then walk KB rows side by
    /// side (KB streams, a few dozen pages) instead of each tile walking all of k at a stride
    /// of n; partial sums go through `out` between passes (exact f32 stores and loads, so
    /// every output is still one fused multiply-add chain over k in order). 4 streams read
    /// as the hardware prefetcher follows them best: nano-MoE decoding at 16 rows ~6 % more
    /// tokens/s than 32 over six alternations (8: +4 %, 1: -10 %), batch 1 unchanged.
    const KB: usize = 4;

    /// Rows r0..r0+R times columns col..col+8*V of w over k0..k1, into out (row stride len,
    /// from oc): starting from zero when `init`, else from what out holds.
    #[inline(always)]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<W: Weight, const R: usize, const V: usize>(x: &[f32], r0: usize, k: usize, (k0, k1, init): (usize, usize, bool), w: &[W], n: usize, col: usize, out: &mut [f32], len: usize, oc: usize) {
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        if !init {
            for (r, acc) in acc.iter_mut().enumerate() {
                for (v, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm256_loadu_ps(out.as_ptr().add((r0 + r) * len + oc + 8 * v));
                }
            }
        }
        let (xp, wp) = (x.as_ptr().add(r0 * k), w.as_ptr().add(col));
        for kk in k0..k1 {
            let wr = wp.add(kk * n);
            let mut wv = [_mm256_setzero_ps(); V];
            for (v, wv) in wv.iter_mut().enumerate() {
                *wv = W::load8(wr.add(8 * v));
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm256_set1_ps(*xp.add(r * k + kk));
                for v in 0..V {
                    acc[v] = _mm256_fmadd_ps(a, wv[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (v, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(out.as_mut_ptr().add((r0 + r) * len + oc + 8 * v), *acc);
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn block_kn<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, n0: usize, out: &mut [f32]) {
        let len = out.len() / m;
        debug_assert!(x.len() >= m * k && w.len() >= (k - 1) * n + n0 + len);
        let quads = m / 4 * 4;
        let c16 = len / 16 * 16;
        let c64 = len / 64 * 64;
        let mut k0 = 0;
        loop {
            // One pass over rows k0..k1 of w (k = 0: one pass that writes the zeros).
            let ks = (k0, (k0 + KB).min(k), k0 == 0);
            for r0 in (0..quads).step_by(4) {
                for c in (0..c16).step_by(16) {
                    tile::<W, 4, 2>(x, r0, k, ks, w, n, n0 + c, out, len, c);
                }
            }
            for r in quads..m {
                for c in (0..c64).step_by(64) {
                    tile::<W, 1, 8>(x, r, k, ks, w, n, n0 + c, out, len, c);
                }
                for c in (c64..c16).step_by(16) {
                    tile::<W, 1, 2>(x, r, k, ks, w, n, n0 + c, out, len, c);
                }
            }
            k0 = ks.1;
            if k0 >= k {
                break;
            }
        }
        // Columns past the last 16: one at a time, the same fused sums.
        for r in 0..m {
            for c in c16..len {
                let mut s = 0f32;
                for kk in 0..k {
                    s = x[r * k + kk].mul_add(w[kk * n + n0 + c].f(), s);
                }
                out[r * len + c] = s;
            }
        }
    }
}

/// Output columns per tile of the portable `block_kn`.
const TILE: usize = 64;

/// y[:, n0..n0+len] for w [K, N]: rows of w scaled and added, TILE columns at a time with
/// the sums of up to 4 activation rows kept in registers over all of k (the weights of a
/// tile are read once per 4 rows; partial sums never go back to memory).
fn block_kn<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, n0: usize, out: &mut [f32]) {
    let len = out.len() / m;
    let tiles = len / TILE * TILE;
    for c in (0..tiles).step_by(TILE) {
        let mut r = 0;
        while r + 4 <= m {
            tile_kn::<W, 4>(x, r, k, w, n, n0 + c, out, len, c);
            r += 4;
        }
        while r < m {
            tile_kn::<W, 1>(x, r, k, w, n, n0 + c, out, len, c);
            r += 1;
        }
    }
    if tiles == len {
        return;
    }
    // Remaining columns: sums in the output.
    let rest = len - tiles;
    for r in 0..m {
        out[r * len + tiles..(r + 1) * len].fill(0.0);
    }
    for kk in 0..k {
        let wr = &w[kk * n + n0 + tiles..kk * n + n0 + len];
        for r in 0..m {
            let a = x[r * k + kk];
            for (o, &wv) in out[r * len + tiles..r * len + tiles + rest].iter_mut().zip(wr) {
                *o += a * wv.f();
            }
        }
    }
}

/// Rows r0..r0+R of x times columns col..col+TILE of w [K, N], into out (row stride `len`,
/// from column `oc`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tile_kn<W: Weight, const R: usize>(x: &[f32], r0: usize, k: usize, w: &[W], n: usize, col: usize, out: &mut [f32], len: usize, oc: usize) {
    let mut acc = [[0f32; TILE]; R];
    let xs = &x[r0 * k..(r0 + R) * k];
    for kk in 0..k {
        let wr: &[W; TILE] = w[kk * n + col..kk * n + col + TILE].try_into().expect("tile inside the weight");
        for (r, acc) in acc.iter_mut().enumerate() {
            let a = xs[r * k + kk];
            for (o, wv) in acc.iter_mut().zip(wr) {
                *o += a * wv.f();
            }
        }
    }
    for (r, acc) in acc.iter().enumerate() {
        out[(r0 + r) * len + oc..(r0 + r) * len + oc + TILE].copy_from_slice(acc);
    }
}

/// A block kernel: `f(x, m, k, w, n, n0, out)` fills out [m, len] with x [m, k] times the
/// weight's output columns n0..n0 + len.
pub(crate) type BlockFn<W> = fn(&[f32], usize, usize, &[W], usize, usize, &mut [f32]);

/// The [N, K] block kernel [`product`] runs on this CPU (for callers that schedule blocks
/// of several products themselves). Each output is summed the same way in any block.
pub(crate) fn block_nk_fn<W: Weight>() -> BlockFn<W> {
    pick::<W>(true)
}

/// The kernel for a weight layout: AVX2 + FMA + F16C intrinsics where the CPU has them -
/// for [N, K] weights the build with AVX-512VL's 32 registers where it has those too (the
/// same sums, bit for bit) - else the portable loops.
fn pick<W: Weight>(w_nk: bool) -> BlockFn<W> {
    #[cfg(target_arch = "x86_64")]
    if super::has_avx2_fma_f16c() {
        if w_nk && is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
            return |x, m, k, w, n, n0, out| unsafe { avx2::block_nk_vl(x, m, k, w, n, n0, out) };
        }
        return match w_nk {
            true => |x, m, k, w, n, n0, out| unsafe { avx2::block_nk(x, m, k, w, n, n0, out) },
            false => |x, m, k, w, n, n0, out| unsafe { avx2_kn::block_kn(x, m, k, w, n, n0, out) },
        };
    }
    if w_nk {
        block_nk::<W>
    } else {
        block_kn::<W>
    }
}

/// y [m, n] = x [m, k] times w ([n, k] when `w_nk`, else [k, n]), in parallel over blocks
/// of outputs.
pub fn product<W: Weight>(x: &[f32], m: usize, k: usize, w: &[W], n: usize, w_nk: bool) -> Vec<f32> {
    let f = pick::<W>(w_nk);
    // [K, N] weights are read in row segments of a block's width: one block per thread makes
    // them as long as they can be (nano-MoE's experts, 16 rows: ~10 % more tokens/s than 4
    // blocks per thread, batch 1 ~8 %). [N, K] rows are whole either way.
    let min_block = if w_nk { 64 } else { n.div_ceil(rayon::current_num_threads().max(1)) };
    super::by_column_blocks(m, n, min_block, |n0, out| f(x, m, k, w, n, n0, out))
}

/// x [M, K] times a weight, as a candle op: f32 weights get gradients for both inputs;
/// bf16 weights (inference copies) only for x.
struct MatVec {
    w_nk: bool,
}

impl MatVec {
    fn dims(&self, lx: &Layout, lw: &Layout) -> candle_core::Result<(usize, usize, usize)> {
        let (m, k) = lx.shape().dims2()?;
        let (a, b) = lw.shape().dims2()?;
        let (wk, n) = if self.w_nk { (b, a) } else { (a, b) };
        if wk != k {
            candle_core::bail!("{NAME}: x is {:?} but the weight is {:?}", lx.dims(), lw.dims());
        }
        Ok((m, k, n))
    }
}

impl CustomOp2 for MatVec {
    fn name(&self) -> &'static str {
        "matvec"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, sw: &CpuStorage, lw: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k, n) = self.dims(lx, lw)?;
        let x = contiguous_f32(sx, lx, NAME)?;
        let Some((a, b)) = lw.contiguous_offsets() else { candle_core::bail!("{NAME} needs a contiguous weight") };
        let y = match sw {
            CpuStorage::F32(w) => product(x, m, k, &w[a..b], n, self.w_nk),
            CpuStorage::BF16(w) => product(x, m, k, &w[a..b], n, self.w_nk),
            CpuStorage::F16(w) => product(x, m, k, &w[a..b], n, self.w_nk),
            _ => candle_core::bail!("{NAME} needs f32, bf16 or f16 weights"),
        };
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, dy: &Tensor) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let wf = w.to_dtype(DType::F32)?;
        let dx = if self.w_nk { dy.matmul(&wf)? } else { dy.matmul(&wf.t()?)? };
        let dw = match w.dtype() {
            DType::F32 if self.w_nk => Some(dy.t()?.matmul(x)?),
            DType::F32 => Some(x.t()?.matmul(dy)?),
            _ => None,
        };
        Ok((Some(dx), dw))
    }
}

/// `x [M, K] @ w^T` for w [N, K] (f32 or bf16), M <= [`MAX_ROWS`] best.
pub fn linear_nk(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, MatVec { w_nk: true })?)
}

/// `x [M, K] @ w` for w [K, N] (f32 or bf16), M <= [`MAX_ROWS`] best.
pub fn matmul_kn(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, MatVec { w_nk: false })?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand(n: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// No rows (an MoE layer given no tokens) is an empty product, in both layouts, not a
    /// division by zero in the block kernels.
    #[test]
    fn no_rows_give_an_empty_product() {
        let w = rand(8 * 64, &mut StdRng::seed_from_u64(2));
        for nk in [true, false] {
            assert!(product(&[], 0, 64, &w, 8, nk).is_empty());
            assert!(crate::kernels::qmatvec::product(crate::quant::QKind::Q8_0, &[], 0, 64, &crate::quant::quantize(crate::quant::QKind::Q8_0, &w, 64), 8, false).is_empty());
        }
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    #[test]
    fn f16_widening_is_exact_for_every_value() {
        for bits in 0..=u16::MAX {
            let h = half::f16::from_bits(bits);
            let (a, b) = (h.f(), h.to_f32());
            assert!(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()), "{bits:#06x}: {a} vs {b}");
        }
    }

    #[test]
    fn products_match_candle_matmul_values_and_gradients() {
        let mut rng = StdRng::seed_from_u64(3);
        // Sizes with remainders after the 64-lane chunks and the output blocks.
        for (m, k, n) in [(1, 7, 5), (3, 130, 300), (6, 64, 200), (16, 384, 1000)] {
            let x = Var::from_tensor(&Tensor::from_vec(rand(m * k, &mut rng), (m, k), &Device::Cpu).unwrap()).unwrap();
            let w_nk = Var::from_tensor(&Tensor::from_vec(rand(n * k, &mut rng), (n, k), &Device::Cpu).unwrap()).unwrap();
            let w_kn = Var::from_tensor(&w_nk.t().unwrap().contiguous().unwrap()).unwrap();
            let gy = Tensor::from_vec(rand(m * n, &mut rng), (m, n), &Device::Cpu).unwrap();
            let reference = x.matmul(&w_nk.t().unwrap()).unwrap();
            for (w, y) in [(&w_nk, linear_nk(&x, &w_nk).unwrap()), (&w_kn, matmul_kn(&x, &w_kn).unwrap())] {
                let d = max_diff(&y, &reference);
                assert!(d < 1e-4, "{m}x{k}x{n}: values differ by {d}");
                let g = y.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
                let gr = reference.mul(&gy).unwrap().sum_all().unwrap().backward().unwrap();
                assert!(max_diff(g.get(&x).unwrap(), gr.get(&x).unwrap()) < 1e-4, "{m}x{k}x{n}: dx");
                let gw_ref = gr.get(&w_nk).unwrap();
                let gw = g.get(w).unwrap();
                let gw = if gw.dims() == gw_ref.dims() { gw.clone() } else { gw.t().unwrap() };
                assert!(max_diff(&gw, gw_ref) < 1e-4, "{m}x{k}x{n}: dw");
            }
            // bf16 weights: exactly the f32 product of the rounded weights (f32 sums).
            let wb = w_nk.as_tensor().to_dtype(DType::BF16).unwrap();
            let rounded = x.matmul(&wb.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            assert!(max_diff(&linear_nk(&x, &wb).unwrap(), &rounded) < 1e-4);
            let wbk = w_kn.as_tensor().to_dtype(DType::BF16).unwrap();
            assert!(max_diff(&matmul_kn(&x, &wbk).unwrap(), &rounded) < 1e-4);
            // f16 weights likewise.
            let wh = w_nk.as_tensor().to_dtype(DType::F16).unwrap();
            let rounded = x.matmul(&wh.to_dtype(DType::F32).unwrap().t().unwrap()).unwrap();
            assert!(max_diff(&linear_nk(&x, &wh).unwrap(), &rounded) < 1e-4);
        }
    }

    /// Each row of a batch (of 4: one weight row at a time; of 7: 3-row tiles) gets exactly
    /// the bits it gets alone, in the kernel this CPU runs
    /// and in the portable one, for k with every kind of remainder (whole rounds of the four
    /// accumulators, one to three chunks left, a tail under a chunk); and the sums are the
    /// float64 dot products' to f32 accuracy.
    #[test]
    fn nk_rows_are_batch_invariant() {
        fn check<W: Weight>(conv: fn(f32) -> W, rng: &mut StdRng) {
            let mut kernels: Vec<(&str, BlockFn<W>)> = vec![("picked", pick::<W>(true)), ("portable", block_nk::<W>)];
            #[cfg(target_arch = "x86_64")]
            if crate::kernels::has_avx2_fma_f16c() {
                kernels.push(("avx2", |x, m, k, w, n, n0, out| unsafe { avx2::block_nk(x, m, k, w, n, n0, out) }));
                if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                    kernels.push(("avx512vl", |x, m, k, w, n, n0, out| unsafe { avx2::block_nk_vl(x, m, k, w, n, n0, out) }));
                } else {
                    eprintln!("no AVX-512VL on this CPU: its [N, K] kernel untested here");
                }
            }
            for (m, k) in [4, 7].into_iter().flat_map(|m| [3, 8, 16, 24, 31, 32, 40, 56, 63, 64, 100, 768].map(|k| (m, k))) {
                let n = 37;
                let x = rand(m * k, rng);
                let w: Vec<W> = rand(n * k, rng).into_iter().map(conv).collect();
                let mut results: Vec<(&str, Vec<f32>)> = vec![];
                for &(name, f) in &kernels {
                    let mut all = vec![0f32; m * n];
                    f(&x, m, k, &w, n, 0, &mut all);
                    for r in 0..m {
                        let mut one = vec![0f32; n];
                        f(&x[r * k..(r + 1) * k], 1, k, &w, n, 0, &mut one);
                        let mut two = vec![0f32; 2 * n];
                        f(&x[r * k..(r + 1) * k].repeat(2), 2, k, &w, n, 0, &mut two);
                        for j in 0..n {
                            let a = all[r * n + j];
                            assert_eq!(a.to_bits(), one[j].to_bits(), "{name} m {m} k {k} row {r} col {j}: {a} in a batch, {} alone", one[j]);
                            assert_eq!(a.to_bits(), two[n + j].to_bits(), "{name} m {m} k {k} row {r} col {j}: second of a pair");
                            let exact: f64 = (0..k).map(|c| x[r * k + c] as f64 * w[j * k + c].f() as f64).sum();
                            assert!((a as f64 - exact).abs() < 1e-5 * (k as f64).sqrt(), "{name} m {m} k {k}: {a} vs {exact}");
                        }
                    }
                    results.push((name, all));
                }
                // The vector kernels sum in the same order: the same bits (the portable
                // loops round each product before adding it, so they differ in the last bits).
                let vector: Vec<_> = results.iter().filter(|(name, _)| *name != "portable").collect();
                for (name, r) in &vector[1..] {
                    let same = r.iter().zip(&vector[0].1).all(|(a, b)| a.to_bits() == b.to_bits());
                    assert!(same, "m {m} k {k}: {name} and {} differ", vector[0].0);
                }
            }
        }
        let mut rng = StdRng::seed_from_u64(11);
        check::<f32>(|v| v, &mut rng);
        check::<half::bf16>(half::bf16::from_f32, &mut rng);
        check::<half::f16>(half::f16::from_f32, &mut rng);
    }
}
