//! Matrix products in bf16 with f32 sums: the mixed-precision training path (`--dtype
//! bf16`, as nanoGPT's `dtype = 'bfloat16'` runs its products under autocast). Operands are
//! f32 (the master weights and f32 activations) rounded to bf16 (nearest, ties to even) as
//! they are packed; every product of two bf16 values is exact in f32 and the sums are f32.
//!
//! Three units compute them, the best the CPU has chosen once at run time ([`bf16_unit`]):
//! - AMX (Intel Sapphire Rapids and later: `amx-tile` + `amx-bf16`, and Linux's permission
//!   for the tile state): `tdpbf16ps` multiplies a 16 x 32 bf16 tile by a 32 x 16 one into
//!   16 x 16 f32 sums, 16 K FLOPs an instruction. The kernel keeps 2 x 2 sum tiles (32 x 32
//!   of the output) and streams two A tiles (rows, 32 k each) and two B tiles (k-pairs x 16
//!   columns, "VNNI" order: the two k values of a column side by side) through them.
//! - AVX512-BF16 (AMD Zen 4 and later, Intel Cooper Lake and later): `vdpbf16ps` adds the
//!   products of 16 k-pairs into 16 f32 sums, twice an f32 FMA's work. The micro-kernel
//!   keeps 8 rows x 32 columns of sums in registers, broadcasts one k-pair of each A row
//!   and reads the same packed B panels as the tiles.
//! - Elsewhere (or with `NANOMOE_BF16_UNIT=emulated`) the same rounding is applied and the
//!   products run through the f32 gemm: the same numbers up to the order of the f32 sums,
//!   at f32 speed (slower, for the rounding).
//!
//! Both hardware units share the packing (A row-major bf16, B in 16-column panels of
//! k-pairs, packed once per product) and the task split (column blocks of 512, row blocks
//! of up to 256, k in passes sized to the unit's cache).

use std::sync::OnceLock;

use rayon::prelude::*;

use crate::kernels::math::multiversion;

/// How a training step's matrix products compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Operands rounded to bf16, f32 sums (mixed precision; weights stay f32).
    Bf16,
}

impl Precision {
    /// `float32` / `f32` or `bfloat16` / `bf16` (nanoGPT's `dtype` values and ours).
    pub fn parse(s: &str) -> crate::error::Result<Self> {
        match s {
            "float32" | "f32" => Ok(Precision::F32),
            "bfloat16" | "bf16" => Ok(Precision::Bf16),
            "float16" | "f16" => Err(crate::error::Error::Input(
                "dtype float16 is not supported for training (it needs loss scaling); use bfloat16 or float32".into(),
            )),
            other => Err(crate::error::Error::Input(format!("unknown dtype {other:?} (expected float32 or bfloat16)"))),
        }
    }
}

/// Which unit computes the bf16 products on this machine, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bf16Unit {
    /// AMX tiles (`tdpbf16ps`).
    Amx,
    /// AVX-512 with the BF16 extension (`vdpbf16ps`).
    Avx512Bf16,
    /// The f32 gemm on bf16-rounded operands.
    Emulated,
}

impl Bf16Unit {
    /// The name the training log, `bench ceilings` and `NANOMOE_BF16_UNIT` use.
    pub fn name(self) -> &'static str {
        match self {
            Bf16Unit::Amx => "amx",
            Bf16Unit::Avx512Bf16 => "avx512-bf16",
            Bf16Unit::Emulated => "emulated",
        }
    }

    /// Every unit this CPU (and kernel) can run, best first; `Emulated` always.
    pub fn available() -> Vec<Bf16Unit> {
        let mut v = Vec::new();
        if detect_amx() {
            v.push(Bf16Unit::Amx);
        }
        if detect_avx512_bf16() {
            v.push(Bf16Unit::Avx512Bf16);
        }
        v.push(Bf16Unit::Emulated);
        v
    }
}

/// The unit bf16 products run on here, chosen once: the best available, or the best at or
/// below the one `NANOMOE_BF16_UNIT` (`amx`, `avx512-bf16`, `emulated`) names, which lets
/// one machine run and compare the slower paths.
pub fn bf16_unit() -> Bf16Unit {
    static UNIT: OnceLock<Bf16Unit> = OnceLock::new();
    *UNIT.get_or_init(|| {
        let cap = match std::env::var("NANOMOE_BF16_UNIT").as_deref() {
            Ok("avx512-bf16") => Bf16Unit::Avx512Bf16,
            Ok("emulated") => Bf16Unit::Emulated,
            _ => Bf16Unit::Amx,
        };
        Bf16Unit::available().into_iter().find(|&u| u >= cap).unwrap_or(Bf16Unit::Emulated)
    })
}

fn detect_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// AMX with BF16: CPUID, then Linux's `arch_prctl(ARCH_REQ_XCOMP_PERM, XTILEDATA)`, which a
/// process must ask before its threads may touch the tile registers (asking again is
/// harmless).
fn detect_amx() -> bool {
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    {
        if core::arch::x86_64::__cpuid(0).eax < 7 {
            return false;
        }
        let l7 = core::arch::x86_64::__cpuid_count(7, 0);
        let (bf16, tile) = ((l7.edx >> 22) & 1 == 1, (l7.edx >> 24) & 1 == 1);
        if !(bf16 && tile) {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: a plain syscall with integer arguments; failure is reported by its result.
        let rc = unsafe { libc::syscall(libc::SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) };
        rc == 0
    }
    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    false
}

/// f32 -> bf16 bits, rounding to nearest with ties to even (NaN stays a quiet NaN).
/// Branch-free, so that loops over it vectorize.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7fff_ffff) > 0x7f80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

#[inline(always)]
fn convert_body(src: &[f32], dst: &mut [u16]) {
    for (d, &s) in dst.iter_mut().zip(src) {
        *d = to_bf16(s);
    }
}
multiversion!(fn convert(src: &[f32], dst: &mut [u16]) => convert_body);

/// Rows 2p and 2p + 1 of a row-major B (`r1` empty past the last row) into every panel's
/// k-pair row p: column c goes to u32 `(c / 16) * panel + p * 16 + c % 16` of `out`, the
/// two values side by side (little-endian: the even k in the low half). The rows are read
/// once, front to back; one dispatch per pair of rows.
#[inline(always)]
fn interleave_body(r0: &[f32], r1: &[f32], out: U32Out, panel: usize, p: usize) {
    let n = r0.len();
    for (j, c0) in (0..n).step_by(16).enumerate() {
        let nc = 16.min(n - c0);
        let mut v = [0u32; 16];
        if r1.is_empty() {
            for (d, &a) in v.iter_mut().zip(&r0[c0..c0 + nc]) {
                *d = to_bf16(a) as u32;
            }
        } else {
            for ((d, &a), &b) in v.iter_mut().zip(&r0[c0..c0 + nc]).zip(&r1[c0..c0 + nc]) {
                *d = to_bf16(a) as u32 | (to_bf16(b) as u32) << 16;
            }
        }
        // SAFETY: inside the packed buffer (the caller sized it for every panel and pair);
        // the pairs of different tasks are different u32s.
        unsafe { std::ptr::copy_nonoverlapping(v.as_ptr(), out.0.add(j * panel + p * 16), nc) };
    }
}
multiversion!(fn interleave(r0: &[f32], r1: &[f32], out: U32Out, panel: usize, p: usize) => interleave_body);

/// The packed buffer that tasks writing different k-pairs share.
#[derive(Clone, Copy)]
struct U32Out(*mut u32);
unsafe impl Send for U32Out {}
unsafe impl Sync for U32Out {}

/// Up to 16 rows of a transposed operand (`src[c * cs + r]` is row r's k = c) into rows of
/// `kp` bf16: 32 k at a time through a 16 x 32 tile in L1 (the scattered 2-byte stores stay
/// in one kilobyte), then 64-byte row segments out.
#[inline(always)]
fn transpose16_body(src: &[f32], cs: usize, nr: usize, k: usize, kp: usize, rows: &mut [u16]) {
    let mut tile = [[0u16; 32]; 16];
    for c0 in (0..k).step_by(32) {
        let w = 32.min(k - c0);
        for c in 0..w {
            let col = &src[(c0 + c) * cs..(c0 + c) * cs + nr];
            for (r, &v) in col.iter().enumerate() {
                tile[r][c] = to_bf16(v);
            }
        }
        for (r, t) in tile[..nr].iter().enumerate() {
            rows[r * kp + c0..r * kp + c0 + w].copy_from_slice(&t[..w]);
        }
    }
}
multiversion!(fn transpose16(src: &[f32], cs: usize, nr: usize, k: usize, kp: usize, rows: &mut [u16]) => transpose16_body);

/// x rounded to the nearest bf16, as f32.
#[inline(always)]
pub fn round_bf16(x: f32) -> f32 {
    f32::from_bits((to_bf16(x) as u32) << 16)
}

/// Rows and columns of the output a 2 x 2 tile group covers; the padding unit of M, N and K.
const T: usize = 32;
/// Columns of a task.
const NT: usize = 512;
/// Rows of a task, at most.
const MT: usize = 256;

/// An operand in memory: element (r, c) at `p + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct Src {
    p: *const f32,
    rs: usize,
    cs: usize,
}
unsafe impl Send for Src {}
unsafe impl Sync for Src {}

impl Src {
    /// The same memory read as the transposed matrix.
    fn t(self) -> Src {
        Src { p: self.p, rs: self.cs, cs: self.rs }
    }
}

/// The output: element (r, c) at `p + r * rs + c * cs`.
#[derive(Clone, Copy)]
struct Dst {
    p: *mut f32,
    rs: usize,
    cs: usize,
}
unsafe impl Send for Dst {}
unsafe impl Sync for Dst {}

/// A [rows, k] row-major bf16 copy of `a` ([m, k]), zero-padded to `mp` rows and `kp` columns.
fn pack_a(a: Src, m: usize, k: usize, mp: usize, kp: usize, par: bool) -> Vec<u16> {
    let mut out = vec![0u16; mp * kp];
    let fill = |(i0, rows): (usize, &mut [u16])| {
        let a: Src = a; // captured whole (Send + Sync), not its raw-pointer field
        let i0 = i0 * 16;
        let nr = 16.min(m.saturating_sub(i0));
        if nr == 0 {
            return; // padding rows: zeros
        }
        // SAFETY (all reads): rows < m and columns < k are inside the operand.
        if a.cs == 1 {
            for r in 0..nr {
                let src = unsafe { std::slice::from_raw_parts(a.p.add((i0 + r) * a.rs), k) };
                convert(src, &mut rows[r * kp..r * kp + k]);
            }
        } else if a.rs == 1 {
            // A transpose: the 16 rows' values of one k are contiguous.
            let src = unsafe { std::slice::from_raw_parts(a.p.add(i0), (k - 1) * a.cs + nr) };
            transpose16(src, a.cs, nr, k, kp, rows);
        } else {
            for r in 0..nr {
                for c in 0..k {
                    rows[r * kp + c] = to_bf16(unsafe { *a.p.add((i0 + r) * a.rs + c * a.cs) });
                }
            }
        }
    };
    if par {
        out.par_chunks_mut(16 * kp).enumerate().for_each(fill);
    } else {
        out.chunks_mut(16 * kp).enumerate().for_each(fill);
    }
    out
}

/// b ([k, n]) in panels of 16 columns, each [kp / 2][16] u32: the two k values of a column
/// side by side (the layout `tdpbf16ps` reads); zero-padded to `np` columns and `kp` rows.
fn pack_b(b: Src, k: usize, n: usize, np: usize, kp: usize, par: bool) -> Vec<u32> {
    let panel = kp / 2 * 16; // u32 per panel
    let mut out = vec![0u32; np / 16 * panel];
    if b.cs == 1 {
        // Rows contiguous (activations, weights in a backward product): each pair of rows
        // read once into all panels.
        let o = U32Out(out.as_mut_ptr());
        let pair = |p: usize| {
            let (b, o): (Src, U32Out) = (b, o);
            // SAFETY: rows < k, columns < n are inside the operand.
            let r0 = unsafe { std::slice::from_raw_parts(b.p.add(2 * p * b.rs), n) };
            let r1 = if 2 * p + 1 < k { unsafe { std::slice::from_raw_parts(b.p.add((2 * p + 1) * b.rs), n) } } else { &[] };
            interleave(r0, r1, o, panel, p);
        };
        if par {
            (0..k.div_ceil(2)).into_par_iter().with_min_len(8).for_each(pair);
        } else {
            (0..k.div_ceil(2)).for_each(pair);
        }
        return out;
    }
    let fill = |(j, dst): (usize, &mut [u32])| {
        let b: Src = b;
        let c0 = j * 16;
        let nc = 16.min(n.saturating_sub(c0));
        if nc == 0 {
            return; // a padding panel: zeros
        }
        // SAFETY (all reads): rows < k and columns < n are inside the operand.
        if b.rs == 1 {
            // Columns contiguous (a transposed weight): a column converted in order is
            // already its k-pairs, one u32 each; they go to every 16th u32.
            let mut col = vec![0u16; k.div_ceil(2) * 2];
            for c in 0..nc {
                let src = unsafe { std::slice::from_raw_parts(b.p.add((c0 + c) * b.cs), k) };
                convert(src, &mut col[..k]);
                for (p, pair) in col.chunks_exact(2).enumerate() {
                    dst[p * 16 + c] = pair[0] as u32 | (pair[1] as u32) << 16;
                }
            }
        } else {
            for kk in 0..k {
                for c in 0..nc {
                    let v = to_bf16(unsafe { *b.p.add(kk * b.rs + (c0 + c) * b.cs) }) as u32;
                    dst[(kk / 2) * 16 + c] |= v << (16 * (kk & 1));
                }
            }
        }
    };
    if par {
        out.par_chunks_mut(panel).enumerate().for_each(fill);
    } else {
        out.chunks_mut(panel).enumerate().for_each(fill);
    }
    out
}

/// dst = (dst when `add`) + alpha * lhs rhs, lhs [m, k] and rhs [k, n] rounded to bf16, f32
/// sums; the arguments are those of `kernels::mm` (strides in elements, dst row stride
/// `dst_rs`; `threads` 1 runs on the calling thread).
///
/// # Safety
/// As for `kernels::mm`: the pointers cover every element the sizes and strides address,
/// dst does not overlap the operands, and no other thread touches them meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_bf16(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, add: bool, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, alpha: f32, threads: usize) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for r in 0..m {
            for c in 0..n {
                let d = dst.add(r * dst_rs + c);
                *d = if add { *d } else { 0.0 };
            }
        }
        return;
    }
    gemm_on(bf16_unit(), m, n, k, dst, dst_rs, add, lhs, lhs_rs, lhs_cs, rhs, rhs_rs, rhs_cs, alpha, threads)
}

/// [`gemm_bf16`] on a given unit (one that [`Bf16Unit::available`] lists), k > 0.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_on(unit: Bf16Unit, m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, add: bool, lhs: *const f32, lhs_rs: usize, lhs_cs: usize, rhs: *const f32, rhs_rs: usize, rhs_cs: usize, alpha: f32, threads: usize) {
    let (a, b) = (Src { p: lhs, rs: lhs_rs, cs: lhs_cs }, Src { p: rhs, rs: rhs_rs, cs: rhs_cs });
    match unit {
        Bf16Unit::Emulated => emulated(m, n, k, dst, dst_rs, add, a, b, alpha, threads),
        unit if lhs_cs != 1 && rhs_cs == 1 && n < m => {
            // A transposed lhs (a weight gradient: dy^T x, D^T h) is packed by a transpose,
            // a row-major rhs by a cheap interleave. C^T = rhs^T lhs^T swaps the roles, so the
            // smaller operand is the one transposed (for the output layer's dw = D^T h: h,
            // 256 wide, instead of the [tokens, 50257] D), and C^T is written transposed.
            tiled(unit, n, m, k, Dst { p: dst, rs: 1, cs: dst_rs }, add, b.t(), a.t(), alpha, threads)
        }
        unit => tiled(unit, m, n, k, Dst { p: dst, rs: dst_rs, cs: 1 }, add, a, b, alpha, threads),
    }
}

/// The rounding, then the f32 gemm on the rounded copies.
#[allow(clippy::too_many_arguments)]
unsafe fn emulated(m: usize, n: usize, k: usize, dst: *mut f32, dst_rs: usize, add: bool, a: Src, b: Src, alpha: f32, threads: usize) {
    let round = |s: Src, rows: usize, cols: usize| -> Vec<f32> {
        let mut v = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                v[r * cols + c] = round_bf16(*s.p.add(r * s.rs + c * s.cs));
            }
        }
        v
    };
    let (ar, br) = (round(a, m, k), round(b, k, n));
    super::gemm_f32(m, n, k, dst, dst_rs, add, ar.as_ptr(), k, 1, br.as_ptr(), n, 1, alpha, threads);
}

/// The product of row-major a [m, k] and b [k, n] on one unit, without the dispatch (for the
/// parity tests), on `threads` threads.
#[cfg(test)]
pub(crate) fn product_on(unit: Bf16Unit, m: usize, n: usize, k: usize, a: &[f32], b: &[f32], threads: usize) -> Vec<f32> {
    assert!(a.len() >= m * k && b.len() >= k * n && k > 0);
    let (sa, sb) = (Src { p: a.as_ptr(), rs: k, cs: 1 }, Src { p: b.as_ptr(), rs: n, cs: 1 });
    let mut out = vec![0f32; m * n];
    // SAFETY: the operands and the output cover the sizes (checked above).
    unsafe {
        match unit {
            Bf16Unit::Emulated => emulated(m, n, k, out.as_mut_ptr(), n, false, sa, sb, 1.0, threads),
            unit => tiled(unit, m, n, k, Dst { p: out.as_mut_ptr(), rs: n, cs: 1 }, false, sa, sb, 1.0, threads),
        }
    }
    out
}

/// Packs both operands, then runs the unit's tasks: column blocks of NT (a pass's panels,
/// KC x NT bf16, stay in L2 while the task's row blocks pass by), row blocks sized so that
/// every thread gets ~2 tasks.
#[allow(clippy::too_many_arguments)]
unsafe fn tiled(unit: Bf16Unit, m: usize, n: usize, k: usize, dst: Dst, add: bool, a: Src, b: Src, alpha: f32, threads: usize) {
    let (mp, np, kp) = (m.div_ceil(T) * T, n.div_ceil(T) * T, k.div_ceil(T) * T);
    let par = threads > 1;
    let (ap, bp) = if par { rayon::join(|| pack_a(a, m, k, mp, kp, true), || pack_b(b, k, n, np, kp, true)) } else { (pack_a(a, m, k, mp, kp, false), pack_b(b, k, n, np, kp, false)) };
    // The panels' bytes as bf16 (little-endian: each u32's even k first).
    // SAFETY: the same memory, u16's alignment divides u32's.
    let bp = std::slice::from_raw_parts(bp.as_ptr().cast::<u16>(), bp.len() * 2);
    let nt = NT.min(np);
    let ncol = np.div_ceil(nt);
    let want_rows = (2 * threads).div_ceil(ncol).max(1);
    let mt = (mp.div_ceil(want_rows).div_ceil(T) * T).clamp(T, MT);
    let nrow = mp.div_ceil(mt);
    let run = |t: usize| {
        let dst: Dst = dst;
        let (r0, c0) = (t / ncol * mt, t % ncol * nt);
        let block = Block { a: &ap, b: bp, kp, rows: (r0, (r0 + mt).min(mp)), cols: (c0, (c0 + nt).min(np)), m, n, dst, add, alpha };
        match unit {
            Bf16Unit::Amx => amx::task(&block),
            _ => dp::task(&block),
        }
    };
    if par {
        (0..nrow * ncol).into_par_iter().for_each(run);
    } else {
        (0..nrow * ncol).for_each(run);
    }
}

/// One task of [`tiled`]: rows `rows` x columns `cols` of the padded output (multiples of
/// 32) from the packed operands, written to `dst` (the first m x n) as alpha * sum, added
/// when `add`.
struct Block<'a> {
    a: &'a [u16],
    b: &'a [u16],
    kp: usize,
    rows: (usize, usize),
    cols: (usize, usize),
    m: usize,
    n: usize,
    dst: Dst,
    add: bool,
    alpha: f32,
}

impl Block<'_> {
    /// Whether the 32 x 32 block at (i, j) keeps its partial sums in dst itself between
    /// k passes: it lies inside [m, n] of a plain dst (row-major, alpha 1, overwritten).
    fn direct(&self, i: usize, j: usize) -> bool {
        self.dst.cs == 1 && !self.add && self.alpha == 1.0 && i + T <= self.m && j + T <= self.n
    }

    /// A scratch of the task's size for the blocks that are not direct (edges, alpha,
    /// accumulation, a transposed dst), or none when every block is direct. The units
    /// write it before anything reads it.
    fn scratch(&self) -> Vec<f32> {
        let ((r0, r1), (c0, c1)) = (self.rows, self.cols);
        let mut v = Vec::new();
        if (r0..r1).step_by(T).any(|i| (c0..c1).step_by(T).any(|j| !self.direct(i, j))) {
            v.reserve_exact((r1 - r0) * (c1 - c0));
        }
        v
    }

    /// Where row `i` (of the 32-row block at `ib`), column `j` of the sums lives, and its
    /// row stride: dst for a direct block, the scratch otherwise.
    fn sums(&self, scratch: *mut f32, ib: usize, i: usize, j: usize) -> (*mut f32, usize) {
        if self.direct(ib, j) {
            // SAFETY: inside dst (the block lies inside [m, n]).
            (unsafe { self.dst.p.add(i * self.dst.rs + j) }, self.dst.rs)
        } else {
            let cols = self.cols.1 - self.cols.0;
            // SAFETY: inside the scratch (the task's rows and columns).
            (unsafe { scratch.add((i - self.rows.0) * cols + (j - self.cols.0)) }, cols)
        }
    }

    /// The scratch's blocks to dst, with alpha and the accumulation.
    ///
    /// # Safety
    /// `scratch` was written for every block that is not direct.
    unsafe fn finish(&self, scratch: *const f32) {
        let ((r0, r1), (c0, c1)) = (self.rows, self.cols);
        let cols = c1 - c0;
        for i in (r0..r1).step_by(T) {
            for j in (c0..c1).step_by(T) {
                if self.direct(i, j) {
                    continue;
                }
                for r in i..(i + T).min(self.m) {
                    for c in j..(j + T).min(self.n) {
                        let d = self.dst.p.add(r * self.dst.rs + c * self.dst.cs);
                        let v = self.alpha * *scratch.add((r - r0) * cols + (c - c0));
                        *d = if self.add { *d + v } else { v };
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use super::*;
    use std::arch::asm;

    /// k per pass over a task's block of B (a 32-row block of A, 32 x KC bf16, stays in L1
    /// across the task's columns; the pass's panels, KC x 512 bf16, in L2).
    const KC: usize = 512;

    /// The tile configuration (palette 1): tmm0-3 sums (16 rows x 16 f32), tmm4-5 A (16 rows
    /// x 32 bf16), tmm6-7 B (16 k-pairs x 16 columns x 2 bf16); every tile 16 x 64 bytes.
    #[repr(C, align(64))]
    struct TileConfig {
        palette: u8,
        start_row: u8,
        reserved: [u8; 14],
        colsb: [u16; 16],
        rows: [u8; 16],
    }

    const CONFIG: TileConfig = TileConfig {
        palette: 1,
        start_row: 0,
        reserved: [0; 14],
        colsb: [64, 64, 64, 64, 64, 64, 64, 64, 0, 0, 0, 0, 0, 0, 0, 0],
        rows: [16, 16, 16, 16, 16, 16, 16, 16, 0, 0, 0, 0, 0, 0, 0, 0],
    };

    macro_rules! tile_load {
        ($t:literal, $p:expr, $stride:expr) => {
            asm!(concat!("tileloadd tmm", $t, ", [{p} + {s}*1]"), p = in(reg) $p, s = in(reg) $stride, options(nostack, readonly))
        };
    }
    macro_rules! tile_store {
        ($t:literal, $p:expr, $stride:expr) => {
            asm!(concat!("tilestored [{p} + {s}*1], tmm", $t), p = in(reg) $p, s = in(reg) $stride, options(nostack))
        };
    }

    /// One task on the tiles: for each k pass, each 32-row block of A against every 32-column
    /// block of the task.
    ///
    /// # Safety
    /// AMX is available ([`detect_amx`]) and the block's buffers are those [`tiled`] packed.
    pub(super) unsafe fn task(t: &Block) {
        let kp = t.kp;
        let a_stride = kp * 2;
        let ((r0, r1), (c0, c1)) = (t.rows, t.cols);
        let mut scratch = t.scratch();
        let sp = scratch.as_mut_ptr();
        asm!("ldtilecfg [{}]", in(reg) &CONFIG as *const TileConfig, options(nostack, readonly));
        for k0 in (0..kp).step_by(KC) {
            let k1 = (k0 + KC).min(kp);
            for i in (r0..r1).step_by(T) {
                let a0 = t.a.as_ptr().add(i * kp);
                let a1 = a0.add(16 * kp);
                for j in (c0..c1).step_by(T) {
                    let (cp, row) = t.sums(sp, i, i, j);
                    let cs = row * 4;
                    if k0 == 0 {
                        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack, nomem));
                    } else {
                        tile_load!("0", cp, cs);
                        tile_load!("1", cp.add(16), cs);
                        tile_load!("2", cp.add(16 * row), cs);
                        tile_load!("3", cp.add(16 * row + 16), cs);
                    }
                    let b0 = t.b.as_ptr().add(j / 16 * kp * 16);
                    let b1 = b0.add(kp * 16);
                    for kk in (k0..k1).step_by(T) {
                        tile_load!("4", a0.add(kk), a_stride);
                        tile_load!("5", a1.add(kk), a_stride);
                        tile_load!("6", b0.add(kk * 16), 64usize);
                        tile_load!("7", b1.add(kk * 16), 64usize);
                        asm!(
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            options(nostack, nomem)
                        );
                    }
                    tile_store!("0", cp, cs);
                    tile_store!("1", cp.add(16), cs);
                    tile_store!("2", cp.add(16 * row), cs);
                    tile_store!("3", cp.add(16 * row + 16), cs);
                }
            }
        }
        asm!("tilerelease", options(nostack, nomem));
        t.finish(sp);
    }
}

#[cfg(target_arch = "x86_64")]
mod dp {
    use super::*;
    use std::arch::x86_64::*;

    /// k per pass: a 32-column micro-panel of B (KC / 2 pairs x 2 panels x 64 bytes = 16 KiB)
    /// stays in L1 while the task's rows pass by; the task's A block (256 x KC bf16) in L2.
    const KC: usize = 256;
    /// Rows of the micro-kernel: 8 rows x 2 vectors of 16 sums = 16 of the 32 registers.
    const MR: usize = 8;

    /// One task with `vdpbf16ps`: for each k pass and 32-column micro-panel of B, every
    /// 8-row strip of A.
    ///
    /// # Safety
    /// AVX-512 F and BF16 are available and the block's buffers are those [`tiled`] packed.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub(super) unsafe fn task(t: &Block) {
        let kp = t.kp;
        let ((r0, r1), (c0, c1)) = (t.rows, t.cols);
        let mut scratch = t.scratch();
        let sp = scratch.as_mut_ptr();
        for k0 in (0..kp).step_by(KC) {
            let pairs = (KC.min(kp - k0)) / 2;
            for j in (c0..c1).step_by(T) {
                // Panel j / 16 is [kp / 2] pairs x 16 columns, 64 bytes a pair.
                let b0 = t.b.as_ptr().add(j / 16 * kp * 16 + k0 * 16);
                let b1 = b0.add(kp * 16);
                for i in (r0..r1).step_by(MR) {
                    let (cp, row) = t.sums(sp, i - (i - r0) % T, i, j);
                    micro(t.a.as_ptr().add(i * kp + k0), kp, b0, b1, pairs, cp, row, k0 == 0);
                }
            }
        }
        t.finish(sp);
    }

    /// Sums of 8 rows x 32 columns at `c` (row stride `row`): zeroed (`fresh`) or loaded,
    /// plus `pairs` k-pairs of A's rows (at `a`, row stride `kp` bf16) against the two
    /// panels' pairs (`b0`, `b1`, 16 columns each), stored back.
    #[target_feature(enable = "avx512f,avx512bf16")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn micro(a: *const u16, kp: usize, b0: *const u16, b1: *const u16, pairs: usize, c: *mut f32, row: usize, fresh: bool) {
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        if !fresh {
            for (r, s) in acc.iter_mut().enumerate() {
                s[0] = _mm512_loadu_ps(c.add(r * row));
                s[1] = _mm512_loadu_ps(c.add(r * row + 16));
            }
        }
        for p in 0..pairs {
            let x0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(p * 32).cast()));
            let x1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(p * 32).cast()));
            for (r, s) in acc.iter_mut().enumerate() {
                // Row r's k-pair p, in every lane (a broadcast operand of the instruction).
                let pair = a.add(r * kp + 2 * p).cast::<i32>().read_unaligned();
                let y: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                s[0] = _mm512_dpbf16_ps(s[0], x0, y);
                s[1] = _mm512_dpbf16_ps(s[1], x1, y);
            }
        }
        for (r, s) in acc.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * row), s[0]);
            _mm512_storeu_ps(c.add(r * row + 16), s[1]);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod amx {
    pub(super) unsafe fn task(_: &super::Block) {
        unreachable!("no AMX off x86_64")
    }
}
#[cfg(not(target_arch = "x86_64"))]
mod dp {
    pub(super) unsafe fn task(_: &super::Block) {
        unreachable!("no AVX-512 off x86_64")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rand(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even mantissa (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        // 1 + 3 * 2^-8 is halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0 + 1.0 / 65536.0), 0x3f81);
        assert_eq!(to_bf16(-2.5), 0xc020);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        assert_eq!(round_bf16(f32::MAX), f32::INFINITY);
        // Every bf16 value survives the round trip.
        for bits in (0u32..=0xffff).step_by(7) {
            let x = f32::from_bits(bits << 16);
            if !x.is_nan() {
                assert_eq!(to_bf16(x), bits as u16);
            }
        }
    }

    /// The tiles against the rounded f32 product, on shapes with every kind of edge (m, n, k
    /// not multiples of 16 or 32, k past one KC pass, more than one task).
    #[test]
    fn units_equal_the_rounded_f32_product() {
        let units = Bf16Unit::available();
        if units.len() == 1 {
            eprintln!("skipped: this CPU (or kernel) has neither AMX nor AVX512-BF16; the emulated path is what runs");
            return;
        }
        for &(m, n, k) in &[(1, 1, 1), (5, 7, 3), (32, 32, 32), (33, 17, 65), (300, 600, 1100), (64, 1000, 40), (2, 50, 700)] {
            let (a, b) = (rand(m * k, 1 + m as u64), rand(k * n, 2 + n as u64));
            let e = product_on(Bf16Unit::Emulated, m, n, k, &a, &b, 1);
            for &unit in &units[..units.len() - 1] {
                for threads in [1, 2] {
                    let t = product_on(unit, m, n, k, &a, &b, threads);
                    for (i, (x, y)) in t.iter().zip(&e).enumerate() {
                        let tol = 1e-5 * (k as f32).sqrt().max(1.0);
                        assert!((x - y).abs() <= tol, "{} ({m}, {n}, {k}) threads {threads} element {i}: {x} against {y}", unit.name());
                    }
                }
            }
        }
    }

    /// Strided operands (transposes), alpha and accumulation into dst, through the dispatch.
    #[test]
    fn strides_alpha_and_add() {
        let (m, n, k) = (37, 45, 70);
        let (at, bt) = (rand(k * m, 3), rand(n * k, 4)); // a^T [k, m], b^T [n, k]
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| round_bf16(at[p * m + i]) as f64 * round_bf16(bt[j * k + p]) as f64).sum();
                want[i * n + j] = 0.5 + 2.0 * s as f32;
            }
        }
        for (unit, threads) in Bf16Unit::available().into_iter().flat_map(|u| [(u, 1), (u, 2)]) {
            let mut d = vec![0.5f32; m * (n + 3)];
            unsafe { gemm_on(unit, m, n, k, d.as_mut_ptr(), n + 3, true, at.as_ptr(), 1, m, bt.as_ptr(), 1, k, 2.0, threads) };
            for i in 0..m {
                for j in 0..n {
                    assert!((d[i * (n + 3) + j] - want[i * n + j]).abs() < 1e-4, "{} ({i}, {j}) threads {threads}", unit.name());
                }
                assert!(d[i * (n + 3) + n..(i + 1) * (n + 3)].iter().all(|&v| v == 0.5), "row {i}'s padding was written ({})", unit.name());
            }
        }
    }

    /// A transposed lhs with a row-major rhs and fewer columns than rows (a weight gradient
    /// dy^T x): computed as C^T = rhs^T lhs^T and written transposed.
    #[test]
    fn weight_gradient_shape_is_computed_transposed() {
        let (m, n, k) = (300, 40, 129);
        let (at, b) = (rand(k * m, 5), rand(k * n, 6)); // lhs^T [k, m] (dy), rhs [k, n] (x)
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k).map(|p| round_bf16(at[p * m + i]) as f64 * round_bf16(b[p * n + j]) as f64).sum();
                want[i * n + j] = -1.0 + 0.5 * s as f32;
            }
        }
        for (unit, threads) in Bf16Unit::available().into_iter().flat_map(|u| [(u, 1), (u, 2)]) {
            let mut d = vec![-1f32; m * n];
            unsafe { gemm_on(unit, m, n, k, d.as_mut_ptr(), n, true, at.as_ptr(), 1, m, b.as_ptr(), n, 1, 0.5, threads) };
            for (i, (x, y)) in d.iter().zip(&want).enumerate() {
                assert!((x - y).abs() < 1e-4, "{} element {i}: {x} against {y} (threads {threads})", unit.name());
            }
        }
    }
}
