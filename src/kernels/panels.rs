//! Inference weights (f32, or bf16 / f16: widened exactly to f32 as they are read) packed in
//! panels, and the one product kernel that reads them.
//!
//! A weight [N, K] (torch's nn.Linear layout) is stored as panels of [`WIDTH`] output rows:
//! panel p holds, for k = 0..K in order, the WIDTH weights w[p * WIDTH + j, k] side by side
//! (the last panel padded with zeros). A product then walks one panel straight through
//! memory and, for every k, multiplies one activation per row (broadcast) by WIDTH weights
//! (three AVX-512 registers): an outer-product tile, as BLAS microkernels run, with each
//! activation load shared by 48 outputs. The [N, K] dot-product kernel (`matvec`) loads a
//! vector of activations for every vector of weights, and with its weights streaming from
//! memory ran 16 decoding rows at ~45 % of the f32 FMA ceiling on a Zen 4 EPYC core, where
//! this tile runs at ~90 % (in-cache: ~80 % against ~100 %).
//!
//! Every output is one fused multiply-add chain over k in order, starting from zero, in
//! every tile, on every instruction set and in the portable loops (`f32::mul_add` rounds as
//! the FMA instruction does): a row's result is the same bits whether it is decoded alone,
//! with 31 others, or as one of a prompt's 512 positions. That is what keeps serving's
//! batching from changing a sequence's output (`GPT::forward_packed`), and what the tests
//! check against a scalar loop, exactly.

use rayon::prelude::*;

use crate::error::{input_err, Result};
use crate::kernels::matvec::Weight;

/// Output rows per panel: three AVX-512 registers (six AVX2 ones).
pub const WIDTH: usize = 48;

/// A cache line of f32s: the panels' storage unit, so that every panel row (192 bytes)
/// starts on a cache line.
#[derive(Clone, Copy, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// What panels hold: f32 weights, or bf16 / f16 ones (half the bytes to stream; every
/// product widens them to f32 exactly and sums as for f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Elem {
    F32,
    BF16,
    F16,
}

impl Elem {
    /// Bytes per weight.
    pub fn size(self) -> usize {
        match self {
            Elem::F32 => 4,
            Elem::BF16 | Elem::F16 => 2,
        }
    }

    pub fn dtype(self) -> candle_core::DType {
        match self {
            Elem::F32 => candle_core::DType::F32,
            Elem::BF16 => candle_core::DType::BF16,
            Elem::F16 => candle_core::DType::F16,
        }
    }

    /// The element type of a candle dtype that panels can hold.
    pub fn of(dtype: candle_core::DType) -> Option<Elem> {
        match dtype {
            candle_core::DType::F32 => Some(Elem::F32),
            candle_core::DType::BF16 => Some(Elem::BF16),
            candle_core::DType::F16 => Some(Elem::F16),
            _ => None,
        }
    }
}

/// One or more matrices [N, K] (an expert stack: E of them) in panels.
pub struct Panels {
    elem: Elem,
    matrices: usize,
    rows: usize,
    cols: usize,
    data: Vec<Line>,
}

impl Panels {
    /// Packs `matrices` row-major [rows, cols] matrices laid one after the other in `w`.
    pub fn pack(w: &[f32], matrices: usize, rows: usize, cols: usize) -> Result<Panels> {
        if w.len() != matrices * rows * cols {
            return Err(input_err!("panels: {} values for {matrices} matrices of [{rows}, {cols}]", w.len()));
        }
        Self::pack_with(matrices, rows, cols, |e, i, out| out.copy_from_slice(&w[(e * rows + i) * cols..(e * rows + i + 1) * cols]), |_, _| {})
    }

    /// Packs matrices whose rows `row(e, i, out)` writes (as f32), panel by panel in order,
    /// a batch of panels at a time (in parallel): `done(e, rows_end)` is told after each
    /// batch that rows ..rows_end of matrix e are no longer needed (a loader frees their
    /// pages there, so packing holds about one batch of the source at a time).
    pub fn pack_with(matrices: usize, rows: usize, cols: usize, row: impl Fn(usize, usize, &mut [f32]) + Sync, done: impl FnMut(usize, usize)) -> Result<Panels> {
        Self::pack_as(Elem::F32, matrices, rows, cols, row, done)
    }

    /// [`Panels::pack_with`] holding `elem` weights: each value `row` writes is rounded to
    /// it (exactly kept when it came from a weight of that type).
    pub fn pack_as(elem: Elem, matrices: usize, rows: usize, cols: usize, row: impl Fn(usize, usize, &mut [f32]) + Sync, done: impl FnMut(usize, usize)) -> Result<Panels> {
        if matrices == 0 || rows == 0 || cols == 0 {
            return Err(input_err!("panels: cannot pack {matrices} matrices of [{rows}, {cols}]"));
        }
        let per = rows.div_ceil(WIDTH);
        let total = (matrices as u128) * (per as u128) * ((cols * WIDTH) as u128);
        let bytes = total * elem.size() as u128;
        crate::runtime::check_memory(|| format!("panels of {matrices} x [{rows}, {cols}]"), bytes)?;
        let mut data = vec![Line::default(); bytes.div_ceil(64) as usize];
        let total = total as usize;
        let ptr = data.as_mut_ptr();
        // SAFETY: `Line` is 16 plain f32s with no padding (64 bytes, align 64), at least
        // `total` elements of any of the three types.
        match elem {
            Elem::F32 => fill(unsafe { std::slice::from_raw_parts_mut(ptr as *mut f32, total) }, |v| v, matrices, rows, cols, row, done),
            Elem::BF16 => fill(unsafe { std::slice::from_raw_parts_mut(ptr as *mut half::bf16, total) }, half::bf16::from_f32, matrices, rows, cols, row, done),
            Elem::F16 => fill(unsafe { std::slice::from_raw_parts_mut(ptr as *mut half::f16, total) }, half::f16::from_f32, matrices, rows, cols, row, done),
        }
        Ok(Panels { elem, matrices, rows, cols, data })
    }

    /// The weights' type.
    pub fn elem(&self) -> Elem {
        self.elem
    }

    pub fn matrices(&self) -> usize {
        self.matrices
    }

    /// N: output rows of each matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// K: what a product sums over.
    pub fn cols(&self) -> usize {
        self.cols
    }

    pub fn elem_count(&self) -> usize {
        self.matrices * self.rows * self.cols
    }

    fn panels_per_matrix(&self) -> usize {
        self.rows.div_ceil(WIDTH)
    }

    /// The weights as elements of type W (which must be the panels' [`Elem`]).
    fn flat<W: Weight>(&self) -> &[W] {
        assert_eq!(std::mem::size_of::<W>(), self.elem.size(), "panels: read as another type");
        let len = self.matrices * self.panels_per_matrix() * self.cols * WIDTH;
        // SAFETY: `pack_as` sized the lines for `len` elements of the panels' type.
        unsafe { std::slice::from_raw_parts(self.data.as_ptr() as *const W, len) }
    }

    /// Panel p of matrix e: [cols][WIDTH].
    fn panel<W: Weight>(&self, e: usize, p: usize) -> &[W] {
        let len = self.cols * WIDTH;
        let i = e * self.panels_per_matrix() + p;
        &self.flat::<W>()[i * len..(i + 1) * len]
    }

    /// Row `i` of matrix `e` (an embedding row when the matrix is tied to the output layer),
    /// as f32.
    pub fn row(&self, e: usize, i: usize, out: &mut [f32]) {
        fn read<W: Weight>(p: &Panels, e: usize, i: usize, out: &mut [f32]) {
            let panel = p.panel::<W>(e, i / WIDTH);
            for (kk, o) in out.iter_mut().enumerate().take(p.cols) {
                *o = panel[kk * WIDTH + i % WIDTH].f();
            }
        }
        match self.elem {
            Elem::F32 => read::<f32>(self, e, i, out),
            Elem::BF16 => read::<half::bf16>(self, e, i, out),
            Elem::F16 => read::<half::f16>(self, e, i, out),
        }
    }

    /// Matrix `e` back as row-major [rows, cols], widened to f32 (saving, converting).
    pub fn unpack(&self, e: usize) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols).enumerate().for_each(|(i, row)| self.row(e, i, row));
        out
    }

    /// y [m, rows] = x [m, cols] times matrix e transposed (torch's `x @ w.T`), in parallel
    /// over ranges of panels.
    pub fn product(&self, e: usize, x: &[f32], m: usize) -> Vec<f32> {
        let (n, per) = (self.rows, self.panels_per_matrix());
        assert!(e < self.matrices && x.len() == m * self.cols, "panels: product shapes");
        // Every element is written below (the tiles of every panel, all rows).
        let mut y = crate::kernels::for_overwrite(m * n);
        // About one range per thread for a few rows (each thread then streams one long run of
        // weights), four per thread for prompts (the tail's imbalance matters more there).
        let threads = rayon::current_num_threads().max(1);
        let tasks = if m <= crate::kernels::matvec::MAX_ROWS { threads } else { 4 * threads };
        let size = per.div_ceil(tasks).max(1);
        let out = SendPtr(y.as_mut_ptr());
        (0..per.div_ceil(size)).into_par_iter().for_each(|t| {
            let (p0, p1) = (t * size, ((t + 1) * size).min(per));
            // SAFETY: each task writes only the columns of its own panels, of every row.
            unsafe { self.block_into(e, x, m, p0, p1, out.get(), n, 0) };
        });
        y
    }

    /// Columns of panels p0..p1 of matrix e, for every row of x: into out (row stride ldo,
    /// matrix column c at out[r * ldo + c - c0]).
    ///
    /// # Safety
    /// out must hold m rows of stride ldo covering columns c0.. of these panels (clipped to
    /// `rows`), and nothing else may access them meanwhile.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn block_into(&self, e: usize, x: &[f32], m: usize, p0: usize, p1: usize, out: *mut f32, ldo: usize, c0: usize) {
        unsafe fn run<W: Weight>(pn: &Panels, e: usize, x: &[f32], m: usize, p0: usize, p1: usize, out: *mut f32, ldo: usize, c0: usize) {
            let tile = kernel::<W>();
            for p in p0..p1 {
                let width = WIDTH.min(pn.rows - p * WIDTH);
                tile(x, m, pn.cols, pn.panel::<W>(e, p).as_ptr(), out.add(p * WIDTH - c0), ldo, width);
            }
        }
        match self.elem {
            Elem::F32 => run::<f32>(self, e, x, m, p0, p1, out, ldo, c0),
            Elem::BF16 => run::<half::bf16>(self, e, x, m, p0, p1, out, ldo, c0),
            Elem::F16 => run::<half::f16>(self, e, x, m, p0, p1, out, ldo, c0),
        }
    }

    /// The columns of panels p0..p1 of matrix e as a block [m, len] (`expert_products`).
    pub fn block(&self, e: usize, x: &[f32], m: usize, p0: usize, p1: usize) -> Vec<f32> {
        let c0 = p0 * WIDTH;
        let len = (p1 * WIDTH).min(self.rows) - c0;
        // Every element is written: the panels' columns, all rows.
        let mut out = crate::kernels::for_overwrite(m * len);
        // SAFETY: out is [m, len] and holds exactly these columns.
        unsafe { self.block_into(e, x, m, p0, p1, out.as_mut_ptr(), len, c0) };
        out
    }
}

/// Writes every panel of `flat` (matrices of [rows, cols], the last panel's spare rows left
/// zero) from the source rows, a batch of panels at a time (in parallel).
fn fill<T: Copy + Send + Sync>(flat: &mut [T], conv: fn(f32) -> T, matrices: usize, rows: usize, cols: usize, row: impl Fn(usize, usize, &mut [f32]) + Sync, mut done: impl FnMut(usize, usize)) {
    let per = rows.div_ceil(WIDTH);
    let panel_len = cols * WIDTH;
    // ~8 MB of source rows per batch.
    let batch = ((8 << 20) / (panel_len * 4)).max(rayon::current_num_threads()).max(1);
    for (e, matrix) in flat.chunks_mut(per * panel_len).take(matrices).enumerate() {
        for (b, panels) in matrix.chunks_mut(batch * panel_len).enumerate() {
            panels.par_chunks_mut(panel_len).enumerate().for_each(|(i, panel)| {
                let p = b * batch + i;
                let mut buf = vec![0f32; cols];
                for j in 0..WIDTH.min(rows - p * WIDTH) {
                    row(e, p * WIDTH + j, &mut buf);
                    for (kk, &v) in buf.iter().enumerate() {
                        panel[kk * WIDTH + j] = conv(v);
                    }
                }
            });
            done(e, (((b + 1) * batch) * WIDTH).min(rows));
        }
    }
}

#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
// SAFETY: the tasks sharing it write disjoint elements.
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}
impl SendPtr {
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// Rows 0..m of x times one panel: out[r * ldo + j] for j < width.
type PanelFn<W> = unsafe fn(&[f32], usize, usize, *const W, *mut f32, usize, usize);

/// The instruction sets this CPU can run the kernel with, best first: AVX-512, AVX2 + FMA
/// (+ F16C), the portable loops (all give the same bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    #[cfg(target_arch = "x86_64")]
    Avx512,
    #[cfg(target_arch = "x86_64")]
    Avx2,
    Portable,
}

fn isas() -> Vec<Isa> {
    let mut k = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            k.push(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
            k.push(Isa::Avx2);
        }
    }
    k.push(Isa::Portable);
    k
}

fn kernel_on<W: Weight>(isa: Isa) -> PanelFn<W> {
    match isa {
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => avx512::panel::<W>,
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => avx2::panel::<W>,
        Isa::Portable => portable::<W>,
    }
}

fn kernel<W: Weight>() -> PanelFn<W> {
    static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
    kernel_on::<W>(*BEST.get_or_init(|| isas()[0]))
}

/// The portable loops: the same chains of fused multiply-adds.
unsafe fn portable<W: Weight>(x: &[f32], m: usize, k: usize, panel: *const W, out: *mut f32, ldo: usize, width: usize) {
    let panel = std::slice::from_raw_parts(panel, k * WIDTH);
    for r in 0..m {
        let xr = &x[r * k..(r + 1) * k];
        let mut acc = [0f32; WIDTH];
        for (kk, &a) in xr.iter().enumerate() {
            let w = &panel[kk * WIDTH..(kk + 1) * WIDTH];
            for j in 0..WIDTH {
                acc[j] = a.mul_add(w[j].f(), acc[j]);
            }
        }
        std::ptr::copy_nonoverlapping(acc.as_ptr(), out.add(r * ldo), width);
    }
}

/// Tiles of R rows x the panel's 48 columns in three 16-lane registers (R = 8: 24
/// accumulators, 3 weight registers, one broadcast), then 4, 2 and 1 rows.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{Weight, WIDTH};
    use std::arch::x86_64::*;

    /// One row's 48 outputs (`width` of them kept) from its three accumulators.
    #[inline(always)]
    unsafe fn store(acc: &[__m512; 3], o: *mut f32, width: usize) {
        if width == WIDTH {
            for (v, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(o.add(16 * v), *acc);
            }
        } else {
            let mut t = [0f32; WIDTH];
            for (v, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(t.as_mut_ptr().add(16 * v), *acc);
            }
            std::ptr::copy_nonoverlapping(t.as_ptr(), o, width);
        }
    }

    /// No prefetch: the tile finds its span in L1 (a middle tile of a serving step's span).
    const NONE: u8 = 0;
    /// Into L1, AHEAD k-steps on: the first tile over a panel, which reads it from memory.
    const NEAR: u8 = 1;
    /// Into L2, a whole SPAN on: the last tile over a serving step's span, which computes
    /// from L1 while the next span (of this panel, or the next panel: they lie end to end)
    /// comes in, so that the memory is not idle while the tiles after the first compute.
    const NEXT: u8 = 2;

    /// Rows 0..R of x over k0..k1 of the panel, continuing the chains in acc[0..R] (or
    /// starting them from zero when k0 is 0), prefetching as PF says.
    #[inline(always)]
    unsafe fn span<W: Weight, const R: usize, const PF: u8>(x: *const f32, k: usize, (k0, k1): (usize, usize), panel: *const W, acc: *mut [__m512; 3]) {
        let mut a = [[_mm512_setzero_ps(); 3]; R];
        if k0 > 0 {
            for (r, a) in a.iter_mut().enumerate() {
                *a = *acc.add(r);
            }
        }
        for kk in k0..k1 {
            let w = panel.add(kk * WIDTH);
            // The cache lines of one k-step's weights (3 for f32, 2 for 16-bit), AHEAD or
            // SPAN k-steps on (a hint: past the last panel nothing is read).
            let lines = (WIDTH * std::mem::size_of::<W>()).div_ceil(64);
            if PF == NEAR {
                let f = w.wrapping_add(AHEAD * WIDTH) as *const i8;
                for line in 0..lines {
                    _mm_prefetch::<_MM_HINT_T0>(f.wrapping_add(64 * line));
                }
            } else if PF == NEXT {
                let f = w.wrapping_add(SPAN * WIDTH) as *const i8;
                for line in 0..lines {
                    _mm_prefetch::<_MM_HINT_T1>(f.wrapping_add(64 * line));
                }
            }
            let wv = [W::load16(w), W::load16(w.add(16)), W::load16(w.add(32))];
            for (r, a) in a.iter_mut().enumerate() {
                let b = _mm512_set1_ps(*x.add(r * k + kk));
                for v in 0..3 {
                    a[v] = _mm512_fmadd_ps(b, wv[v], a[v]);
                }
            }
        }
        for (r, a) in a.iter().enumerate() {
            *acc.add(r) = *a;
        }
    }

    /// k-steps per span of a serving step ([`panel`]): 24 KB of f32 panel, which stays in L1 while every
    /// row tile passes over it.
    const SPAN: usize = 128;

    /// How far ahead of its reads the first tile of a span prefetches: 32 k-steps, 6 KB
    /// (16 left the weights waiting on memory; 64 was no better).
    const AHEAD: usize = 32;

    /// [`span`] for R rows: NEAR when `first` (the first tile over the panel), NEXT when
    /// `next` (the last of several tiles over a serving step's span), else no prefetch.
    #[inline(always)]
    unsafe fn tile<W: Weight, const R: usize>(first: bool, next: bool, x: *const f32, k: usize, ks: (usize, usize), panel: *const W, acc: *mut [__m512; 3]) {
        if first {
            span::<W, R, NEAR>(x, k, ks, panel, acc)
        } else if next {
            span::<W, R, NEXT>(x, k, ks, panel, acc)
        } else {
            span::<W, R, NONE>(x, k, ks, panel, acc)
        }
    }

    /// Rows 0..m (at most [`MAX_ROWS`](crate::kernels::matvec::MAX_ROWS)) over k-steps ks of
    /// the panel, in tiles of 8, then 4, 2 and 1 rows, each row's chains continued in
    /// acc[row]. When `first` is set (the first pass over the panel), its first tile
    /// prefetches NEAR, and over a whole span of a serving step its last tile NEXT.
    #[inline(always)]
    unsafe fn tiles<W: Weight>(first: bool, xp: *const f32, m: usize, k: usize, ks: (usize, usize), panel: *const W, acc: *mut [__m512; 3]) {
        let next = first && m > 8 && ks.1 - ks.0 == SPAN;
        let mut r = 0;
        while r + 8 <= m {
            tile::<W, 8>(first && r == 0, next && r + 8 == m, xp.add(r * k), k, ks, panel, acc.add(r));
            r += 8;
        }
        if r + 4 <= m {
            tile::<W, 4>(first && r == 0, next && r + 4 == m, xp.add(r * k), k, ks, panel, acc.add(r));
            r += 4;
        }
        if r + 2 <= m {
            tile::<W, 2>(first && r == 0, next && r + 2 == m, xp.add(r * k), k, ks, panel, acc.add(r));
            r += 2;
        }
        if r < m {
            tile::<W, 1>(first && r == 0, next && r + 1 == m, xp.add(r * k), k, ks, panel, acc.add(r));
        }
    }

    /// Every row's tile runs over the whole panel (the first from memory, the others from
    /// L2), up to 32 rows at a time - except for 9 to 32 rows (a serving step), which take
    /// the panel a span of SPAN k-steps at a time, every row tile over the span before the
    /// next (accumulators parked in memory between spans). Each tile then re-reads the span
    /// from L1, and the weights stream from memory while the tiles compute, where
    /// whole-panel tiles read the panel from memory in the first tile's pass only and left
    /// the memory idle during the others'; the last tile over a span asks for the next
    /// span (NEXT), so the memory stays busy while the tiles after the first compute too.
    /// The same chains in the same order: the same bits.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn panel<W: Weight>(x: &[f32], m: usize, k: usize, panel: *const W, out: *mut f32, ldo: usize, width: usize) {
        const MAX: usize = crate::kernels::matvec::MAX_ROWS;
        debug_assert!(x.len() >= m * k);
        let xp = x.as_ptr();
        let len = if m > 8 && m <= MAX { SPAN } else { k };
        // Every row's accumulators are written by its tile's first span before any span
        // reads them (no zeroing: a 6 KB memset per panel showed in a step's profile).
        let mut acc = [const { std::mem::MaybeUninit::<[__m512; 3]>::uninit() }; MAX];
        let ap = acc.as_mut_ptr() as *mut [__m512; 3];
        for c0 in (0..m).step_by(MAX) {
            let mc = MAX.min(m - c0);
            if k == 0 {
                // Empty sums (no k-step writes the accumulators).
                for r in 0..mc {
                    *ap.add(r) = [_mm512_setzero_ps(); 3];
                }
            }
            let mut k0 = 0;
            while k0 < k {
                let ks = (k0, (k0 + len).min(k));
                tiles::<W>(c0 == 0, xp.add(c0 * k), mc, k, ks, panel, ap);
                k0 = ks.1;
            }
            for r in 0..mc {
                // SAFETY: rows 0..mc were written above.
                store(&*ap.add(r), out.add((c0 + r) * ldo), width);
            }
        }
    }
}

/// AVX2 + FMA (16 registers): each half of a panel (24 columns, three 8-lane registers) in
/// tiles of 4 rows (12 accumulators), then 2 and 1.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Weight, WIDTH};
    use std::arch::x86_64::*;

    const HALF: usize = WIDTH / 2;

    #[inline(always)]
    unsafe fn tile<W: Weight, const R: usize>(x: *const f32, k: usize, panel: *const W, out: *mut f32, ldo: usize, cols: usize) {
        let mut acc = [[_mm256_setzero_ps(); 3]; R];
        for kk in 0..k {
            let w = panel.add(kk * WIDTH);
            let wv = [W::load8(w), W::load8(w.add(8)), W::load8(w.add(16))];
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm256_set1_ps(*x.add(r * k + kk));
                for v in 0..3 {
                    acc[v] = _mm256_fmadd_ps(a, wv[v], acc[v]);
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut t = [0f32; HALF];
            for (v, acc) in acc.iter().enumerate() {
                _mm256_storeu_ps(t.as_mut_ptr().add(8 * v), *acc);
            }
            std::ptr::copy_nonoverlapping(t.as_ptr(), out.add(r * ldo), cols);
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn panel<W: Weight>(x: &[f32], m: usize, k: usize, panel: *const W, out: *mut f32, ldo: usize, width: usize) {
        debug_assert!(x.len() >= m * k);
        let xp = x.as_ptr();
        for h in 0..2 {
            let cols = HALF.min(width.saturating_sub(h * HALF));
            if cols == 0 {
                break;
            }
            let (p, o) = (panel.add(h * HALF), out.add(h * HALF));
            let mut r = 0;
            while r + 4 <= m {
                tile::<W, 4>(xp.add(r * k), k, p, o.add(r * ldo), ldo, cols);
                r += 4;
            }
            if r + 2 <= m {
                tile::<W, 2>(xp.add(r * k), k, p, o.add(r * ldo), ldo, cols);
                r += 2;
            }
            if r < m {
                tile::<W, 1>(xp.add(r * k), k, p, o.add(r * ldo), ldo, cols);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, Rng, SeedableRng};

    fn rand(n: usize, rng: &mut StdRng) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The definition: every output one fused multiply-add chain over k from zero.
    fn chain(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * n];
        for r in 0..m {
            for j in 0..n {
                let mut s = 0f32;
                for kk in 0..k {
                    s = x[r * k + kk].mul_add(w[j * k + kk], s);
                }
                y[r * n + j] = s;
            }
        }
        y
    }

    /// Matrix 0 of `p` (of W weights) times x [m, K], panel by panel, with each kernel this
    /// CPU runs.
    fn on_every_kernel<W: Weight>(p: &Panels, x: &[f32], m: usize) -> Vec<(Isa, Vec<f32>)> {
        let (n, k) = (p.rows(), p.cols());
        isas()
            .into_iter()
            .map(|isa| {
                let f = kernel_on::<W>(isa);
                let mut y = vec![0f32; m * n];
                for pi in 0..n.div_ceil(WIDTH) {
                    // SAFETY: y is [m, n]; panel pi's columns are within it.
                    unsafe { f(x, m, k, p.panel::<W>(0, pi).as_ptr(), y.as_mut_ptr().add(pi * WIDTH), n, WIDTH.min(n - pi * WIDTH)) };
                }
                (isa, y)
            })
            .collect()
    }

    #[test]
    fn products_equal_the_fused_chain_bit_for_bit_for_any_rows() {
        let mut rng = StdRng::seed_from_u64(7);
        // Remainders after the panels, the 8-, 4- and 2-row tiles; serving steps' 9 to 32
        // rows in spans of k (a part span, an exact one); a prompt's many rows.
        for (m, k, n) in [(1, 5, 1), (3, 37, 50), (7, 64, 96), (16, 130, 145), (15, 300, 97), (32, 257, 50), (9, 128, 48), (33, 96, 200), (70, 40, 49)] {
            let x = rand(m * k, &mut rng);
            let w = rand(n * k, &mut rng);
            let p = Panels::pack(&w, 1, n, k).unwrap();
            let want = chain(&x, m, k, &w, n);
            let got = p.product(0, &x, m);
            assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{m}x{k}x{n}: not the chain's bits");
            // Every kernel this CPU runs (the AVX2 and portable ones too).
            for (isa, y) in on_every_kernel::<f32>(&p, &x, m) {
                assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{m}x{k}x{n}: {isa:?}");
            }
            // Each row alone gives its bits in the batch (batch-invariant decoding).
            for r in 0..m {
                let one = p.product(0, &x[r * k..(r + 1) * k], 1);
                assert!(one.iter().zip(&got[r * n..(r + 1) * n]).all(|(a, b)| a.to_bits() == b.to_bits()), "{m}x{k}x{n}: row {r} alone");
            }
            // Against an f64 sum: the chain is a product, not just a deterministic one.
            for r in 0..m {
                for j in 0..n {
                    let exact: f64 = (0..k).map(|kk| x[r * k + kk] as f64 * w[j * k + kk] as f64).sum();
                    assert!((got[r * n + j] as f64 - exact).abs() < 1e-5 * k as f64, "{m}x{k}x{n}: ({r}, {j})");
                }
            }
        }
    }

    /// bf16 and f16 panels: the chain over the exactly widened weights, on every kernel
    /// this CPU runs, for decoding rows, serving steps (spans) and prompts; rows read back
    /// exactly.
    #[test]
    fn half_precision_panels_run_the_chain_of_the_widened_weights() {
        fn check<W: Weight + PartialEq + std::fmt::Debug>(elem: Elem, conv: fn(f32) -> W, rng: &mut StdRng) {
            for (m, k, n) in [(1, 37, 50), (4, 200, 96), (16, 300, 145), (13, 129, 48), (40, 64, 100)] {
                let x = rand(m * k, rng);
                let w: Vec<W> = rand(n * k, rng).into_iter().map(conv).collect();
                let wide: Vec<f32> = w.iter().map(|v| v.f()).collect();
                let want = chain(&x, m, k, &wide, n);
                let p = Panels::pack_as(elem, 1, n, k, |_, i, out| out.copy_from_slice(&wide[i * k..(i + 1) * k]), |_, _| {}).unwrap();
                assert_eq!(p.elem(), elem);
                let got = p.product(0, &x, m);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{elem:?} {m}x{k}x{n}: not the chain's bits");
                for (isa, y) in on_every_kernel::<W>(&p, &x, m) {
                    assert!(y.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{elem:?} {m}x{k}x{n}: {isa:?}");
                }
                assert_eq!(p.unpack(0), wide, "{elem:?}: rows back exactly");
            }
        }
        let mut rng = StdRng::seed_from_u64(9);
        check::<half::bf16>(Elem::BF16, half::bf16::from_f32, &mut rng);
        check::<half::f16>(Elem::F16, half::f16::from_f32, &mut rng);
    }

    #[test]
    fn stacks_unpack_and_rows_round_trip_exactly() {
        let mut rng = StdRng::seed_from_u64(8);
        let (e, n, k) = (3, 50, 17);
        let w = rand(e * n * k, &mut rng);
        let p = Panels::pack(&w, e, n, k).unwrap();
        for i in 0..e {
            assert_eq!(p.unpack(i), w[i * n * k..(i + 1) * n * k]);
            let x = rand(2 * k, &mut rng);
            let got = p.product(i, &x, 2);
            assert_eq!(got, chain(&x, 2, k, &w[i * n * k..(i + 1) * n * k], n));
            let b = p.block(i, &x, 2, 1, 2);
            assert_eq!(b.len(), 2 * 2, "panel 1 holds columns 48 and 49");
            assert_eq!(b, [got[48], got[49], got[n + 48], got[n + 49]]);
        }
        let mut row = vec![0f32; k];
        p.row(1, 49, &mut row);
        assert_eq!(row, w[(n + 49) * k..(n + 50) * k]);
        assert_eq!(Panels::pack(&w, 2, n, k).err().map(|e| e.to_string()), Some(format!("invalid input: panels: {} values for 2 matrices of [{n}, {k}]", e * n * k)));
        assert_eq!(Panels::pack(&[], 1, 0, k).err().map(|e| e.to_string()), Some(format!("invalid input: panels: cannot pack 1 matrices of [0, {k}]")));
    }
}
