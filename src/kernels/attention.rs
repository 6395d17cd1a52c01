//! Causal self-attention fused per (batch row, head): scores, mask, softmax and the weighted
//! sum of values in one task, reading q, k and v where the c_attn projection wrote them
//! ([B, T, 3C], head h in columns h*hd..) and writing y as [B, T, C] - no head transposes,
//! no mask tensor, no [B, H, T, T] score tensors kept between forward and backward.
//!
//! Forward keeps only the log-sum-exp of each score row ([B, H, T]); the backward recomputes
//! the probabilities from it (as FlashAttention does, Dao et al. 2022, sec. 3.1) and applies
//!   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dP * P)) * scale,
//!   dQ = dS K,    dK = dS^T Q.
//! The matrix products go through the `gemm` crate (the one candle uses) with strides, one
//! thread per task; tasks run in parallel on rayon's pool. A task works through its queries
//! in chunks of 64, each against only the keys its last query may see, so the blocks above
//! the causal diagonal are never computed (the time of a causal kernel is about half a full
//! one's at long T).
//!
//! Inference with a KV cache and fewer than 16 new queries (decoding, serving's packed
//! passes) computes scores and weighted sums with plain loops instead, a task per row and
//! group of heads, reading each cached key and value row once straight through; all the
//! packed sequences' tasks of a layer run in one parallel pass
//! ([`cached_attention_packed`]). Serving's 16-sequence nano-MoE step: attention 1.7-2.4 ->
//! 1.1-1.3 ms.

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::kernels::math::{self, multiversion};
use crate::kernels::{contiguous_f32, gemm_f32, mm, with_f32};

const NAME: &str = "fused attention";

/// Which keys each query may attend to: query i of batch row b sits at position `past + i`
/// and sees keys j with `pad[b] <= j <= past + i`. A query that sees no key at all (a
/// left-padding position) attends uniformly to every key, as the composite version's
/// finite mask fill gives, and passes no gradient to the scores.
#[derive(Debug, Clone, Default)]
pub struct CausalMask {
    pub past: usize,
    pub pad: Option<Vec<usize>>,
}

impl CausalMask {
    /// Visible keys [lo, hi) of query i in row b, out of `tk`; empty when lo >= hi.
    fn range(&self, b: usize, i: usize, tk: usize) -> (usize, usize) {
        let lo = self.pad.as_ref().map(|p| p[b]).unwrap_or(0);
        (lo, (self.past + i + 1).min(tk))
    }
}

/// Where q, k or v lives in a flat buffer: element (b, t, h * hd + d) is at
/// `off + b * bs + t * rs + h * hd + d`.
#[derive(Clone, Copy)]
struct View {
    off: usize,
    bs: usize,
    rs: usize,
}

#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    tq: usize,
    tk: usize,
    h: usize,
    hd: usize,
}

/// A raw pointer that tasks writing disjoint parts of one buffer may share.
#[derive(Clone, Copy)]
struct Out(*mut f32);
unsafe impl Send for Out {}
unsafe impl Sync for Out {}


/// A block of scores: queries i0..i0 + rows of batch row b against the first w keys, stored
/// [rows, w] (every query of the block sees only keys below w).
#[derive(Clone, Copy)]
struct Block {
    b: usize,
    i0: usize,
    rows: usize,
    w: usize,
}

/// Probabilities of the scores in `s` (a [`Block`], in place). Returns each row's
/// log-sum-exp in `lse`, or uses the given one (backward) instead of recomputing it.
#[inline(always)]
fn softmax_rows_body(s: &mut [f32], blk: Block, d: Dims, mask: &CausalMask, scale: f32, lse: &mut [f32], given: bool) {
    let w = blk.w;
    for (r, lse) in lse[..blk.rows].iter_mut().enumerate() {
        let row = &mut s[r * w..(r + 1) * w];
        let (lo, hi) = mask.range(blk.b, blk.i0 + r, d.tk);
        if lo >= hi {
            // No visible key: uniform over all tk keys (the composite version's finite fill).
            row.fill(1.0 / d.tk as f32);
            *lse = f32::NAN;
            continue;
        }
        row[..lo].fill(0.0);
        row[hi..].fill(0.0);
        let vis = &mut row[lo..hi];
        if given {
            let l = *lse;
            vis.iter_mut().for_each(|v| *v = math::exp(*v * scale - l));
        } else {
            let max = math::max(vis) * scale;
            vis.iter_mut().for_each(|v| *v = math::exp(*v * scale - max));
            let sum = math::sum(vis);
            let inv = 1.0 / sum;
            vis.iter_mut().for_each(|v| *v *= inv);
            *lse = max + sum.ln();
        }
    }
}

multiversion!(fn softmax_rows(s: &mut [f32], blk: Block, d: Dims, mask: &CausalMask, scale: f32, lse: &mut [f32], given: bool) => softmax_rows_body);

/// dS = P * (dP - rowsum(dP * P)) * scale in place of dP (a [`Block`]), zero outside the
/// visible keys.
#[inline(always)]
fn softmax_grad_rows_body(ds: &mut [f32], p: &[f32], blk: Block, d: Dims, mask: &CausalMask, scale: f32) {
    let w = blk.w;
    for r in 0..blk.rows {
        let (lo, hi) = mask.range(blk.b, blk.i0 + r, d.tk);
        let prow = &p[r * w..(r + 1) * w];
        let srow = &mut ds[r * w..(r + 1) * w];
        if lo >= hi {
            srow.fill(0.0);
            continue;
        }
        let mut acc = [0f32; 16];
        let (sv, pv) = (&srow[lo..hi], &prow[lo..hi]);
        let split = sv.len() / 16 * 16;
        for (a, c) in sv[..split].chunks_exact(16).zip(pv[..split].chunks_exact(16)) {
            for j in 0..16 {
                acc[j] += a[j] * c[j];
            }
        }
        let dot = acc.iter().sum::<f32>() + sv[split..].iter().zip(&pv[split..]).map(|(a, c)| a * c).sum::<f32>();
        srow[..lo].fill(0.0);
        srow[hi..].fill(0.0);
        srow[lo..hi].iter_mut().zip(&prow[lo..hi]).for_each(|(sv, &pv)| *sv = pv * (*sv - dot) * scale);
    }
}

multiversion!(fn softmax_grad_rows(ds: &mut [f32], p: &[f32], blk: Block, d: Dims, mask: &CausalMask, scale: f32) => softmax_grad_rows_body);

/// Queries per chunk of a (batch row, head) task. A chunk's products run over the keys its
/// last query may see, so causal attention skips the blocks above the diagonal: at T = 256
/// 10 of 16 blocks are computed, at T = 1024 136 of 256.
const QCHUNK: usize = 64;

/// Queries from which a forward task transposes its keys first (see [`Transposed`]); a
/// decoding step's one query reads the cache in place.
const TRANSPOSE_FROM: usize = 16;

/// One head's keys (or values) [tk, hd] as the right operand of S = Q K^T: transposed into
/// a row-major [hd, tk] scratch when the task has at least `from` queries, else read in
/// place. The gemm crate packs a transposed operand element by element; a task's chunks
/// reuse the one 8 x 8-block transpose (`transpose`).
enum Transposed<'a> {
    Copy(Vec<f32>, usize),
    InPlace(&'a [f32], usize),
}

impl<'a> Transposed<'a> {
    fn of(data: &'a [f32], off: usize, rs: usize, d: Dims, from: usize) -> Self {
        if d.tq < from || d.tk == 0 {
            return Transposed::InPlace(&data[off..], rs);
        }
        let ld = crate::kernels::transpose::padded_stride(d.tk);
        let mut t = vec![0f32; d.hd * ld];
        crate::kernels::transpose::transpose(d.tk, d.hd, &data[off..], rs, &mut t, ld);
        Transposed::Copy(t, ld)
    }

    /// dst [rows, w] (row stride w) = lhs [rows, hd] (row stride lrs) times the first w keys,
    /// transposed.
    ///
    /// # Safety
    /// lhs must cover rows x hd elements at its stride, dst rows x w, and w must be at most tk.
    unsafe fn rhs_product(&self, rows: usize, w: usize, hd: usize, dst: *mut f32, lhs: *const f32, lrs: usize) {
        match self {
            Transposed::Copy(t, ld) => mm(rows, w, hd, dst, w, lhs, lrs, 1, t.as_ptr(), *ld, 1, 1.0, 1),
            Transposed::InPlace(k, rs) => mm(rows, w, hd, dst, w, lhs, lrs, 1, k.as_ptr(), 1, *rs, 1.0, 1),
        }
    }
}

/// The query chunks [i0, i1) of batch row b's tasks and the keys each needs: its last
/// query's bound, or all keys when a query of the chunk sees none (a left-padding position
/// attends uniformly to every key).
fn chunks(d: Dims, mask: &CausalMask, b: usize) -> impl DoubleEndedIterator<Item = (usize, usize, usize)> + '_ {
    (0..d.tq.div_ceil(QCHUNK)).map(move |c| {
        let (i0, i1) = (c * QCHUNK, ((c + 1) * QCHUNK).min(d.tq));
        let (lo, hi) = mask.range(b, i0, d.tk);
        (i0, i1, if lo >= hi { d.tk } else { (mask.past + i1).min(d.tk) })
    })
}

/// Where one forward pass reads q, k and v, and what it computes with them.
#[derive(Clone, Copy)]
struct Operands<'a> {
    qd: &'a [f32],
    q: View,
    kd: &'a [f32],
    k: View,
    vd: &'a [f32],
    v: View,
    d: Dims,
    mask: &'a CausalMask,
    scale: f32,
}

/// Task (b, h) of a forward pass: head h's columns of y for batch row b ([B, tq, C] at `y`),
/// and its rows' log-sum-exp, with the gemm crate's products.
///
/// # Safety
/// y must hold [B, tq, C] and nothing else may write head h's columns of row b meanwhile.
unsafe fn head_forward(o: &Operands, b: usize, h: usize, y: Out, lse: &mut [f32]) {
    let d = o.d;
    let c = d.h * d.hd;
    let mut s = vec![0f32; QCHUNK.min(d.tq) * d.tk];
    let head = |w: View| w.off + b * w.bs + h * d.hd;
    let kt = Transposed::of(o.kd, head(o.k), o.k.rs, d, TRANSPOSE_FROM);
    for (i0, i1, w) in chunks(d, o.mask, b) {
        let rows = i1 - i0;
        // S = Q K^T over the keys the chunk sees, P = softmax(S), Y = P V.
        kt.rhs_product(rows, w, d.hd, s.as_mut_ptr(), o.qd.as_ptr().add(head(o.q) + i0 * o.q.rs), o.q.rs);
        softmax_rows(&mut s, Block { b, i0, rows, w }, d, o.mask, o.scale, &mut lse[i0..i1], false);
        mm(rows, d.hd, w, y.0.add(b * d.tq * c + i0 * c + h * d.hd), c, s.as_ptr(), w, 1, o.vd.as_ptr().add(head(o.v)), o.v.rs, 1, 1.0, 1);
    }
}

/// Heads h0..h1 of batch row b with plain loops (inference, fewer than [`DIRECT_BELOW`]
/// queries: a decoding step's query costs a few thousand multiply-adds per head, less than
/// the gemm crate's setup of a product), into y: [tq, (h1 - h0) * hd]. The loops walk each
/// key and value row once for all the task's heads, straight through memory (per head, a
/// row's 256 bytes at a stride of C waited on memory). Every score and output is computed as
/// [`dot_body`] and [`axpy_body`] define it, whichever heads share the task.
#[inline(always)]
fn heads_direct_body<const ZMM: bool>(o: &Operands, b: usize, h0: usize, h1: usize, y: &mut [f32]) {
    let d = o.d;
    let (c, hd, nh) = (d.h * d.hd, d.hd, h1 - h0);
    let mut lse = vec![0f32; d.tq];
    let (qb, kb, vb) = (o.q.off + b * o.q.bs, o.k.off + b * o.k.bs, o.v.off + b * o.v.bs);
    for (i0, i1, w) in chunks(d, o.mask, b) {
        let rows = i1 - i0;
        // s[h][r][j]: the scores (then probabilities) of head h0 + h.
        let mut s = vec![0f32; nh * rows * w];
        for j in 0..w {
            prefetch_rows(o.kd, kb + (j + AHEAD) * o.k.rs + h0 * hd, nh * hd);
            let kr = &o.kd[kb + j * o.k.rs..kb + j * o.k.rs + c];
            for h in h0..h1 {
                let kh = &kr[h * hd..(h + 1) * hd];
                for r in 0..rows {
                    let q0 = qb + (i0 + r) * o.q.rs + h * hd;
                    let q = &o.qd[q0..q0 + hd];
                    // SAFETY: ZMM only in `heads_direct_zmm`, compiled for AVX-512F.
                    s[((h - h0) * rows + r) * w + j] = if ZMM { unsafe { dot_zmm(q, kh) } } else { dot_body(q, kh) };
                }
            }
        }
        for s in s.chunks_mut(rows * w) {
            softmax_rows(s, Block { b, i0, rows, w }, d, o.mask, o.scale, &mut lse[i0..i1], false);
        }
        // y[r][h] = sum over j of p[h][r][j] v_j[h], each element a chain over j in order.
        let acc = &mut y[i0 * nh * hd..i1 * nh * hd];
        acc.fill(0.0);
        for j in 0..w {
            prefetch_rows(o.vd, vb + (j + AHEAD) * o.v.rs + h0 * hd, nh * hd);
            let vr = &o.vd[vb + j * o.v.rs + h0 * hd..vb + j * o.v.rs + h1 * hd];
            for r in 0..rows {
                for h in 0..nh {
                    let p = s[(h * rows + r) * w + j];
                    axpy_body(p, &vr[h * hd..(h + 1) * hd], &mut acc[(r * nh + h) * hd..(r * nh + h + 1) * hd]);
                }
            }
        }
    }
}

/// Key and value rows ahead of the one [`heads_direct_body`] works on that it asks the
/// caches for: the task reads a few hundred bytes of each row at a stride of C, a pattern the
/// hardware prefetchers pick up too late for a decoding step's few dozen rows.
const AHEAD: usize = 4;

/// Asks for the cache lines of data[at..at + len] (a hint: nothing past the end is read).
#[inline(always)]
fn prefetch_rows(data: &[f32], at: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    if at < data.len() {
        let end = (at + len).min(data.len());
        let p = data.as_ptr();
        for i in (at..end).step_by(16) {
            // SAFETY: a prefetch of an address inside `data` (SSE, on every x86-64).
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.add(i) as *const i8) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (data, at, len);
}

/// [`heads_direct_body`] for this CPU: with AVX-512F its scores in 16-lane registers
/// ([`dot_zmm`]: the same sums as [`dot_body`], which the compiler vectorized 4 lanes at a
/// time), else the portable loops compiled for AVX2 + FMA or the baseline.
fn heads_direct(o: &Operands, b: usize, h0: usize, h1: usize, y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
        // SAFETY: the CPU has the features the function is compiled for.
        return unsafe { heads_direct_zmm(o, b, h0, h1, y) };
    }
    heads_direct_portable(o, b, h0, h1, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn heads_direct_zmm(o: &Operands, b: usize, h0: usize, h1: usize, y: &mut [f32]) {
    heads_direct_body::<true>(o, b, h0, h1, y)
}

fn heads_direct_portable_body(o: &Operands, b: usize, h0: usize, h1: usize, y: &mut [f32]) {
    heads_direct_body::<false>(o, b, h0, h1, y)
}

multiversion!(fn heads_direct_portable(o: &Operands, b: usize, h0: usize, h1: usize, y: &mut [f32]) => heads_direct_portable_body);

/// [`dot_body`] in AVX-512 registers: lane l of one register takes elements l, l + 16, ... by
/// fused multiply-adds in order; the halves are added 16 -> 8 -> 4 -> 2 -> 1 as
/// [`dot_body`]'s tree adds them; the last len % 16 elements in order. The same bits.
///
/// # Safety
/// The CPU must have AVX-512F and FMA (callers are compiled for them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_zmm(q: &[f32], k: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = q.len().min(k.len());
    let split = n / SLANES * SLANES;
    let mut acc = _mm512_setzero_ps();
    let mut c = 0;
    while c < split {
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q.as_ptr().add(c)), _mm512_loadu_ps(k.as_ptr().add(c)), acc);
        c += SLANES;
    }
    let lo = _mm512_castps512_ps256(acc);
    let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(acc)));
    let v8 = _mm256_add_ps(lo, hi);
    let v4 = _mm_add_ps(_mm256_castps256_ps128(v8), _mm256_extractf128_ps::<1>(v8));
    let v2 = _mm_add_ps(v4, _mm_movehl_ps(v4, v4));
    let mut sum = _mm_cvtss_f32(_mm_add_ss(v2, _mm_shuffle_ps::<1>(v2, v2)));
    for i in split..n {
        sum = q[i].mul_add(k[i], sum);
    }
    sum
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn dot_zmm(q: &[f32], k: &[f32]) -> f32 {
    dot_body(q, k)
}

/// y [B, tq, C] (and the [B, H, tq] log-sum-exp) from q, k, v.
fn forward(o: &Operands) -> (Vec<f32>, Vec<f32>) {
    let d = o.d;
    let c = d.h * d.hd;
    let mut y = crate::kernels::for_overwrite(d.b * d.tq * c);
    let mut lse = vec![0f32; d.b * d.h * d.tq];
    let yp = Out(y.as_mut_ptr());
    lse.par_chunks_mut(d.tq).enumerate().for_each(|(task, lse)| {
        let yp = &yp;
        // SAFETY: y is [B, tq, C]; each task writes its own (row, head) columns.
        unsafe { head_forward(o, task / d.h, task % d.h, *yp, lse) };
    });
    (y, lse)
}

/// Queries per (row, head) below which inference computes attention with [`heads_direct`]
/// (decoding steps, serving's packed passes, short prompt chunks).
const DIRECT_BELOW: usize = TRANSPOSE_FROM;

/// Lanes of [`dot_body`]'s partial sums.
const SLANES: usize = 16;

/// q . k (equal lengths), always summed the same way: element i into lane i % 16 by a fused
/// multiply-add (in order of i), the 16 lanes added by a fixed pairwise tree, then the
/// len % 16 last elements in order - so a score depends on neither the other queries, the
/// heads or keys beside it, nor the instruction set.
#[inline(always)]
fn dot_body(q: &[f32], k: &[f32]) -> f32 {
    let split = q.len() / SLANES * SLANES;
    let mut acc = [0f32; SLANES];
    for c in (0..split).step_by(SLANES) {
        let a: [f32; SLANES] = q[c..c + SLANES].try_into().expect("a whole chunk");
        let b: [f32; SLANES] = k[c..c + SLANES].try_into().expect("a whole chunk");
        for l in 0..SLANES {
            acc[l] = a[l].mul_add(b[l], acc[l]);
        }
    }
    let mut width = SLANES / 2;
    while width > 0 {
        for l in 0..width {
            acc[l] += acc[l + width];
        }
        width /= 2;
    }
    let mut sum = acc[0];
    for (a, b) in q[split..].iter().zip(&k[split..]) {
        sum = a.mul_add(*b, sum);
    }
    sum
}

/// y += p x element-wise (fused multiply-adds): one step of the weighted sum of values.
#[inline(always)]
fn axpy_body(p: f32, x: &[f32], y: &mut [f32]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = p.mul_add(x, *y);
    }
}

/// The training-path op: qkv [B, T, 3C] -> y [B, T, C], no cache.
struct CausalAttention {
    n_head: usize,
    mask: CausalMask,
    lse: Mutex<Option<Vec<f32>>>,
}

impl CausalAttention {
    fn geometry(&self, dims: &[usize]) -> candle_core::Result<(Dims, View, View, View)> {
        let &[b, t, c3] = dims else { candle_core::bail!("{NAME}: qkv must be [B, T, 3C], got {dims:?}") };
        let c = c3 / 3;
        if c3 % 3 != 0 || c % self.n_head != 0 {
            candle_core::bail!("{NAME}: qkv width {c3} is not 3 * n_head * head_dim");
        }
        if let Some(p) = &self.mask.pad {
            if p.len() != b {
                candle_core::bail!("{NAME}: {} padding lengths for batch size {b}", p.len());
            }
        }
        let d = Dims { b, tq: t, tk: t, h: self.n_head, hd: c / self.n_head };
        let view = |off| View { off, bs: t * c3, rs: c3 };
        Ok((d, view(0), view(c), view(2 * c)))
    }

    fn scale(d: Dims) -> f32 {
        1.0 / (d.hd as f32).sqrt()
    }
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, NAME)?;
        let (d, q, k, v) = self.geometry(l.dims())?;
        let (y, lse) = forward(&Operands { qd: x, q, kd: x, k, vd: x, v, d, mask: &self.mask, scale: Self::scale(d) });
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = Some(lse);
        Ok((CpuStorage::F32(y), Shape::from((d.b, d.tq, d.h * d.hd))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (d, q, k, v) = self.geometry(arg.dims())?;
        let scale = Self::scale(d);
        let c = d.h * d.hd;
        let dqkv = with_f32(arg, NAME, |x| {
            let saved = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let lse = match saved {
                Some(l) => l,
                None => forward(&Operands { qd: x, q, kd: x, k, vd: x, v, d, mask: &self.mask, scale }).1,
            };
            with_f32(grad, NAME, |dy| {
                let mut dx = crate::kernels::for_overwrite(x.len());
                let dp_out = Out(dx.as_mut_ptr());
                (0..d.b * d.h).into_par_iter().for_each(|task| {
                    let (b, h) = (task / d.h, task % d.h);
                    let mut lse_row = lse[task * d.tq..(task + 1) * d.tq].to_vec();
                    let mut p = vec![0f32; QCHUNK.min(d.tq) * d.tk];
                    let mut ds = vec![0f32; QCHUNK.min(d.tq) * d.tk];
                    // P^T and dS^T of a chunk, the left operands of dV and dK (see `Transposed`).
                    let mut t = vec![0f32; crate::kernels::transpose::padded_stride(QCHUNK.min(d.tq)) * d.tk];
                    let head = |w: View| b * w.bs + w.off + h * d.hd;
                    let kt = Transposed::of(x, head(k), k.rs, d, 1);
                    let vt = Transposed::of(x, head(v), v.rs, d, 1);
                    // The last chunk first: it sees every key (no cache here, so tq = tk) and
                    // writes all of dK and dV; earlier chunks add to the keys they see.
                    for (n, (i0, i1, w)) in chunks(d, &self.mask, b).rev().enumerate() {
                        let rows = i1 - i0;
                        let add = n > 0;
                        debug_assert!(add || w == d.tk, "the last chunk sees every key");
                        unsafe {
                            let (qp, kp) = (x.as_ptr().add(head(q) + i0 * q.rs), x.as_ptr().add(head(k)));
                            let dop = dy.as_ptr().add(b * d.tq * c + i0 * c + h * d.hd);
                            let out = dp_out;
                            let (dq, dk, dv) = (out.0.add(head(q) + i0 * q.rs), out.0.add(head(k)), out.0.add(head(v)));
                            kt.rhs_product(rows, w, d.hd, p.as_mut_ptr(), qp, q.rs);
                            softmax_rows(&mut p, Block { b, i0, rows, w }, d, &self.mask, scale, &mut lse_row[i0..i1], true);
                            // dV (+)= P^T dO
                            let ldt = crate::kernels::transpose::padded_stride(rows);
                            crate::kernels::transpose::transpose(rows, w, &p, w, &mut t, ldt);
                            gemm_f32(w, d.hd, rows, dv, v.rs, add, t.as_ptr(), ldt, 1, dop, c, 1, 1.0, 1);
                            // dP = dO V^T
                            vt.rhs_product(rows, w, d.hd, ds.as_mut_ptr(), dop, c);
                            softmax_grad_rows(&mut ds, &p, Block { b, i0, rows, w }, d, &self.mask, scale);
                            // dQ = dS K, dK (+)= dS^T Q
                            mm(rows, d.hd, w, dq, q.rs, ds.as_ptr(), w, 1, kp, k.rs, 1, 1.0, 1);
                            crate::kernels::transpose::transpose(rows, w, &ds, w, &mut t, ldt);
                            gemm_f32(w, d.hd, rows, dk, k.rs, add, t.as_ptr(), ldt, 1, qp, q.rs, 1, 1.0, 1);
                        }
                    }
                });
                Ok(dx)
            })
        })?;
        Ok(Some(Tensor::from_vec(dqkv, arg.shape(), arg.device())?))
    }
}

/// Causal self-attention of an f32 CPU `qkv` [B, T, 3C] (the c_attn output, heads side by side)
/// into y [B, T, C], with a backward pass.
pub fn causal_attention(qkv: &Tensor, n_head: usize, mask: CausalMask) -> Result<Tensor> {
    Ok(qkv.contiguous()?.apply_op1(CausalAttention { n_head, mask, lse: Mutex::new(None) })?)
}

/// [`causal_attention`] as a stage of a residual chain (`kernels::residual`).
pub(crate) fn stage(n_head: usize, mask: CausalMask) -> crate::kernels::residual::Stage {
    crate::kernels::residual::Stage::Op1(Box::new(CausalAttention { n_head, mask, lse: Mutex::new(None) }))
}

/// Attention of new queries q [B, tq, C] over the first `tk` positions of cached keys and
/// values k, v [B, capacity, C] (a KV cache's buffers, read in place; inference: no
/// backward, callers use the composite version when gradients are tracked).
pub fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor, tk: usize, n_head: usize, mask: &CausalMask) -> Result<Tensor> {
    let seq = CachedSeq { q: q.clone(), k: k.clone(), v: v.clone(), tk, mask: mask.clone() };
    Ok(cached_attention_packed(std::slice::from_ref(&seq), n_head)?.pop().expect("one sequence"))
}

/// One sequence of [`cached_attention_packed`]: its new queries [B, tq, C] and its cache's
/// buffers [B, capacity, C] with `tk` positions filled.
pub struct CachedSeq {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub tk: usize,
    pub mask: CausalMask,
}

/// [`cached_attention`] of several sequences (a serving step's packed sequences), their
/// (row, head) tasks in one parallel pass: each sequence's result has the bits
/// `cached_attention` gives it alone.
pub fn cached_attention_packed(seqs: &[CachedSeq], n_head: usize) -> Result<Vec<Tensor>> {
    let mut geo = Vec::with_capacity(seqs.len());
    let mut qs = Vec::with_capacity(seqs.len());
    for s in seqs {
        let (b, tq, c) = s.q.dims3()?;
        let cap = s.k.dim(1)?;
        if s.k.dims() != [b, cap, c] || s.v.dims() != s.k.dims() || s.tk > cap || n_head == 0 || c % n_head != 0 {
            return Err(crate::error::Error::Input(format!("{NAME}: q {:?}, k {:?}, v {:?}, {} cached positions and {n_head} heads do not fit", s.q.dims(), s.k.dims(), s.v.dims(), s.tk)));
        }
        if s.mask.pad.as_ref().is_some_and(|p| p.len() != b) {
            return Err(crate::error::Error::Input(format!("{NAME}: padding lengths for {b} rows expected")));
        }
        geo.push((Dims { b, tq, tk: s.tk, h: n_head, hd: c / n_head }, View { off: 0, bs: tq * c, rs: c }, View { off: 0, bs: cap * c, rs: c }));
        qs.push(s.q.contiguous()?);
    }
    let ks: Vec<Tensor> = seqs.iter().map(|s| s.k.contiguous()).collect::<candle_core::Result<_>>()?;
    let vs: Vec<Tensor> = seqs.iter().map(|s| s.v.contiguous()).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = qs.iter().chain(&ks).chain(&vs).map(|t| t.storage_and_layout()).collect();
    let slices = cpu_slices(&guards)?;
    let n = seqs.len();
    let ops: Vec<Operands> = (0..n)
        .map(|i| {
            let (d, qv, kv) = geo[i];
            Operands { qd: slices[i], q: qv, kd: slices[n + i], k: kv, vd: slices[2 * n + i], v: kv, d, mask: &seqs[i].mask, scale: 1.0 / (d.hd as f32).sqrt() }
        })
        .collect();
    let mut ys: Vec<Vec<f32>> = ops.iter().map(|o| crate::kernels::for_overwrite(o.d.b * o.d.tq * o.d.h * o.d.hd)).collect();
    let outs: Vec<Out> = ys.iter_mut().map(|y| Out(y.as_mut_ptr())).collect();
    // SAFETY: ys[i] is [B, tq, C].
    unsafe { run_packed(&ops, &outs) };
    drop(ops);
    drop(slices);
    drop(guards);
    ys.into_iter().zip(&geo).map(|(y, (d, _, _))| Ok(Tensor::from_vec(y, (d.b, d.tq, d.h * d.hd), seqs[0].q.device())?)).collect()
}

/// The f32 data of each guarded contiguous CPU tensor (`Tensor::storage_and_layout`'s).
fn cpu_slices<'a, S: std::ops::Deref<Target = candle_core::Storage>>(guards: &'a [(S, &candle_core::Layout)]) -> Result<Vec<&'a [f32]>> {
    guards
        .iter()
        .map(|(storage, layout)| match &**storage {
            candle_core::Storage::Cpu(s) => Ok(contiguous_f32(s, layout, NAME)?),
            _ => Err(crate::error::Error::Input(format!("{NAME} runs on the CPU"))),
        })
        .collect()
}

/// The (row, head) tasks of packed sequences in one parallel pass, sequence i's y [B, tq, C]
/// (rows C apart) written at outs[i].
///
/// # Safety
/// Each outs[i] must point to B * tq * C writable f32s that no other sequence's cover.
unsafe fn run_packed(ops: &[Operands], outs: &[Out]) {
    // Direct sequences in tasks of whole rows (heads split into groups only as far as the
    // pool needs tasks: a single decoding sequence still runs on every thread), the others
    // a task per (row, head).
    let rows: usize = ops.iter().filter(|o| o.d.tq < DIRECT_BELOW).map(|o| o.d.b).sum();
    let want = 4 * rayon::current_num_threads().max(1);
    let tasks: Vec<(usize, usize, usize, usize)> = ops
        .iter()
        .enumerate()
        .flat_map(|(i, o)| {
            let (b, h) = (o.d.b, o.d.h);
            let groups = if o.d.tq < DIRECT_BELOW { want.div_ceil(rows.max(1)).clamp(1, h) } else { h };
            let per = h.div_ceil(groups);
            (0..b).flat_map(move |r| (0..h).step_by(per).map(move |h0| (i, r, h0, (h0 + per).min(h))))
        })
        .collect();
    tasks.par_iter().for_each(|&(i, b, h0, h1)| {
        let o = &ops[i];
        // SAFETY: outs[i] holds [B, tq, C] (the caller's promise); each task writes its own
        // (row, heads) columns.
        unsafe {
            if o.d.tq < DIRECT_BELOW {
                let (c, w) = (o.d.h * o.d.hd, (h1 - h0) * o.d.hd);
                let mut y = vec![0f32; o.d.tq * w];
                heads_direct(o, b, h0, h1, &mut y);
                for (r, y) in y.chunks(w).enumerate() {
                    std::ptr::copy_nonoverlapping(y.as_ptr(), outs[i].0.add(b * o.d.tq * c + r * c + h0 * o.d.hd), w);
                }
            } else {
                let mut lse = vec![0f32; o.d.tq];
                head_forward(o, b, h0, outs[i], &mut lse);
            }
        }
    });
}

/// One sequence of [`cached_attention_rows`]: its `t` new tokens are rows `off..off + t` of
/// the packed projection; its cache's buffers [1, capacity, C] hold `tk` positions.
pub struct PackedRows {
    pub off: usize,
    pub t: usize,
    pub k: Tensor,
    pub v: Tensor,
    pub tk: usize,
    pub mask: CausalMask,
}

/// [`cached_attention_packed`] for a serving step's sequences, their queries read where
/// they lie in the packed projection `qkv` [1, N, 3C] (q is its first C columns) and their
/// outputs written into one [1, N, C]: the same bits per sequence, without a query copy
/// and an output tensor per sequence and their concatenation.
pub fn cached_attention_rows(qkv: &Tensor, seqs: &[PackedRows], n_head: usize) -> Result<Tensor> {
    let (one, n, c3) = qkv.dims3()?;
    let c = c3 / 3;
    if one != 1 || c3 != 3 * c || n_head == 0 || c % n_head != 0 {
        return Err(crate::error::Error::Input(format!("{NAME}: packed projection {:?} with {n_head} heads", qkv.dims())));
    }
    let mut end = 0;
    for s in seqs {
        let cap = s.k.dim(1)?;
        if s.off != end || s.t == 0 || s.k.dims() != [1, cap, c] || s.v.dims() != s.k.dims() || s.tk > cap || s.mask.pad.is_some() {
            return Err(crate::error::Error::Input(format!("{NAME}: rows {}..{} of {n}, k {:?}, v {:?}, {} cached positions do not fit", s.off, s.off + s.t, s.k.dims(), s.v.dims(), s.tk)));
        }
        end += s.t;
    }
    if end != n {
        return Err(crate::error::Error::Input(format!("{NAME}: the sequences hold {end} of the {n} packed rows")));
    }
    let qkv = qkv.contiguous()?;
    let kvs: Vec<Tensor> = seqs.iter().flat_map(|s| [s.k.contiguous(), s.v.contiguous()]).collect::<candle_core::Result<_>>()?;
    let guards: Vec<_> = std::iter::once(&qkv).chain(&kvs).map(|t| t.storage_and_layout()).collect();
    let slices = cpu_slices(&guards)?;
    let hd = c / n_head;
    let ops: Vec<Operands> = seqs
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let cap = s.k.dim(1).expect("checked above");
            let kv = View { off: 0, bs: cap * c, rs: c };
            let d = Dims { b: 1, tq: s.t, tk: s.tk, h: n_head, hd };
            Operands { qd: slices[0], q: View { off: s.off * c3, bs: s.t * c3, rs: c3 }, kd: slices[1 + 2 * i], k: kv, vd: slices[2 + 2 * i], v: kv, d, mask: &s.mask, scale: 1.0 / (hd as f32).sqrt() }
        })
        .collect();
    let mut y = crate::kernels::for_overwrite(n * c);
    let outs: Vec<Out> = seqs.iter().map(|s| Out(y.as_mut_ptr().wrapping_add(s.off * c))).collect();
    // SAFETY: sequence i's rows off..off + t of y [N, C], disjoint (checked above).
    unsafe { run_packed(&ops, &outs) };
    drop(ops);
    drop(slices);
    drop(guards);
    Ok(Tensor::from_vec(y, (1, n, c), qkv.device())?)
}

#[cfg(test)]
mod tests {
    use rand::{rngs::StdRng, Rng, SeedableRng};

    #[test]
    fn score_kernels_give_the_same_bits() {
        let mut rng = StdRng::seed_from_u64(3);
        for n in 0..=70 {
            let q: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let k: Vec<f32> = (0..n).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let want = super::dot_body(&q, &k);
            let exact: f64 = q.iter().zip(&k).map(|(a, b)| *a as f64 * *b as f64).sum();
            assert!((want as f64 - exact).abs() < 1e-4 * (n as f64 + 1.0), "{n}: {want} against {exact}");
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU has the features.
                let got = unsafe { super::dot_zmm(&q, &k) };
                assert_eq!(got.to_bits(), want.to_bits(), "{n} elements");
            }
        }
    }
}
