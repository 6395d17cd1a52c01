//! Quantized weights in GGML's block formats, as GGUF files store them:
//!
//! - `q8_0`: blocks of 32 weights, an f16 scale `d` then 32 signed bytes; w = d * q.
//!   34 bytes per 32 weights (8.5 bits each).
//! - `q4_0`: blocks of 32 weights, an f16 scale `d` then 16 bytes of 4-bit values (weights
//!   0-15 in the low nibbles, 16-31 in the high ones); w = d * (q - 8). 18 bytes (4.5 bits).
//!
//! The quantizers are GGML's reference ones (the `gguf` Python package's are equal to them
//! bit for bit, which the tests check). A [`QTensor`] keeps the blocks exactly as a GGUF
//! file holds them - owned, or borrowed from the memory-mapped file - and the products read
//! them in place (`kernels::qmatvec`).

pub mod grouped;

use std::ops::Deref;
use std::sync::Arc;

use half::f16;

use crate::error::{input_err, Result};

/// Weights per block (both formats).
pub const BLOCK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QKind {
    Q8_0,
    Q4_0,
}

impl QKind {
    pub fn parse(s: &str) -> Option<QKind> {
        match s {
            "q8_0" => Some(QKind::Q8_0),
            "q4_0" => Some(QKind::Q4_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            QKind::Q8_0 => "q8_0",
            QKind::Q4_0 => "q4_0",
        }
    }

    /// Bytes of one block of 32 weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QKind::Q8_0 => 2 + BLOCK,
            QKind::Q4_0 => 2 + BLOCK / 2,
        }
    }

    /// Bytes of a row of `k` weights (`k` a multiple of [`BLOCK`]).
    pub fn row_bytes(self, k: usize) -> usize {
        k / BLOCK * self.block_bytes()
    }
}

/// GGML's rounding (`roundf`): halves away from zero.
#[inline]
fn roundf(x: f32) -> f32 {
    x.round()
}

/// Quantizes one block of 32 weights into `out` (`block_bytes` long), as
/// `quantize_row_q8_0_ref` / `quantize_row_q4_0_ref` do.
pub fn quantize_block(kind: QKind, x: &[f32], out: &mut [u8]) {
    debug_assert_eq!(x.len(), BLOCK);
    match kind {
        QKind::Q8_0 => {
            let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            for (o, &v) in out[2..2 + BLOCK].iter_mut().zip(x) {
                *o = roundf(v * id) as i8 as u8;
            }
        }
        QKind::Q4_0 => {
            // The value of largest magnitude, the first one on ties, with its sign.
            let mut max = 0f32;
            let mut amax = 0f32;
            for &v in x {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d == 0.0 { 0.0 } else { 1.0 / d };
            out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
            let q = |v: f32| ((v * id + 8.5).trunc() as u8).min(15);
            for j in 0..BLOCK / 2 {
                out[2 + j] = q(x[j]) | (q(x[j + BLOCK / 2]) << 4);
            }
        }
    }
}

/// The 32 weights of a block as signed integers (q4_0's shifted to -8..7), and its scale.
#[inline(always)]
pub fn unpack_block(kind: QKind, b: &[u8], w: &mut [i8; BLOCK]) -> f32 {
    let d = f16::from_le_bytes([b[0], b[1]]).to_f32();
    match kind {
        QKind::Q8_0 => {
            for (o, &v) in w.iter_mut().zip(&b[2..2 + BLOCK]) {
                *o = v as i8;
            }
        }
        QKind::Q4_0 => {
            for j in 0..BLOCK / 2 {
                w[j] = (b[2 + j] & 15) as i8 - 8;
                w[j + BLOCK / 2] = (b[2 + j] >> 4) as i8 - 8;
            }
        }
    }
    d
}

/// The weights of one block.
pub fn dequantize_block(kind: QKind, b: &[u8], out: &mut [f32]) {
    let mut w = [0i8; BLOCK];
    let d = unpack_block(kind, b, &mut w);
    for (o, &q) in out.iter_mut().zip(&w) {
        *o = d * q as f32;
    }
}

/// Quantizes rows of length `k` (a multiple of 32) into their blocks.
pub fn quantize(kind: QKind, x: &[f32], k: usize) -> Vec<u8> {
    let blocks = x.len() / BLOCK;
    let bb = kind.block_bytes();
    let mut out = vec![0u8; blocks * bb];
    debug_assert!(k % BLOCK == 0 && x.len() % k == 0);
    use rayon::prelude::*;
    out.par_chunks_mut(bb * 1024).zip(x.par_chunks(BLOCK * 1024)).for_each(|(o, x)| {
        for (ob, xb) in o.chunks_mut(bb).zip(x.chunks(BLOCK)) {
            quantize_block(kind, xb, ob);
        }
    });
    out
}

/// The weights of a run of whole blocks (in parallel).
pub fn dequantize(kind: QKind, bytes: &[u8]) -> Vec<f32> {
    use rayon::prelude::*;
    let bb = kind.block_bytes();
    let mut out = vec![0f32; bytes.len() / bb * BLOCK];
    out.par_chunks_mut(BLOCK * 256).zip(bytes.par_chunks(bb * 256)).for_each(|(o, b)| {
        for (o, b) in o.chunks_mut(BLOCK).zip(b.chunks(bb)) {
            dequantize_block(kind, b, o);
        }
    });
    out
}

/// Where the blocks of a [`QTensor`] live: its own memory, or a range of a mapped file.
#[derive(Clone)]
pub enum QBytes {
    Owned(Arc<Vec<u8>>),
    Mapped { map: Arc<memmap2::Mmap>, offset: usize, len: usize },
}

impl Deref for QBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            QBytes::Owned(v) => v,
            QBytes::Mapped { map, offset, len } => &map[*offset..*offset + *len],
        }
    }
}

/// A quantized weight: `shape` [.., N, K] as stored (row-major, the blocks along the last
/// dimension K, which is what a product sums over). A linear layer's weight is [N, K]
/// (torch's [out, in]); a stack of expert matrices [E, N, K]. The blocks are in GGUF's row
/// layout, or, when `grouped`, each matrix in the layout of [`grouped`] (the same bytes
/// rearranged for the AVX-512 VNNI kernel: [`QTensor::for_this_cpu`]).
#[derive(Clone)]
pub struct QTensor {
    pub kind: QKind,
    pub shape: Vec<usize>,
    pub data: QBytes,
    pub grouped: bool,
}

impl std::fmt::Debug for QTensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "QTensor({}, {:?})", self.kind.name(), self.shape)
    }
}

impl QTensor {
    /// Checks that `data` holds exactly the blocks of `shape`.
    pub fn new(kind: QKind, shape: Vec<usize>, data: QBytes) -> Result<Self> {
        let k = *shape.last().ok_or_else(|| input_err!("a {} tensor needs at least one dimension", kind.name()))?;
        if k % BLOCK != 0 {
            return Err(input_err!("a {} tensor's rows must be a multiple of {BLOCK} long, got shape {shape:?}", kind.name()));
        }
        let rows = shape[..shape.len() - 1].iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        let want = rows.and_then(|r| r.checked_mul(kind.row_bytes(k)));
        if want != Some(data.len()) {
            return Err(input_err!("a {} tensor of shape {shape:?} needs {want:?} bytes, got {}", kind.name(), data.len()));
        }
        Ok(QTensor { kind, shape, data, grouped: false })
    }

    /// The layout this CPU's kernels read best: grouped where the AVX-512 VNNI kernel runs
    /// ([`crate::kernels::qgroup::available`]), else as it is. Grouping copies the blocks
    /// into memory of their own (a mapped file's pages can then be dropped).
    pub fn for_this_cpu(self) -> Self {
        if self.grouped || !crate::kernels::qgroup::available() {
            return self;
        }
        self.into_grouped()
    }

    /// The tensor with its matrices in the grouped layout.
    pub fn into_grouped(self) -> Self {
        if self.grouped {
            return self;
        }
        use rayon::prelude::*;
        let (n, nb) = (self.rows(), self.cols() / BLOCK);
        let size = n * self.kind.row_bytes(self.cols());
        let mut out = vec![0u8; self.data.len()];
        if size > 0 {
            out.par_chunks_mut(size).zip(self.data.par_chunks(size)).for_each(|(d, s)| grouped::group_matrix(self.kind, n, nb, s, d));
        }
        QTensor { kind: self.kind, shape: self.shape, data: QBytes::Owned(Arc::new(out)), grouped: true }
    }

    /// The blocks in GGUF's row layout (borrowed when they are in it already).
    pub fn row_blocks(&self) -> std::borrow::Cow<'_, [u8]> {
        if !self.grouped {
            return std::borrow::Cow::Borrowed(&self.data);
        }
        let (n, nb) = (self.rows(), self.cols() / BLOCK);
        let size = n * self.kind.row_bytes(self.cols());
        let mut out = vec![0u8; self.data.len()];
        if size > 0 {
            for (d, s) in out.chunks_mut(size).zip(self.data.chunks(size)) {
                grouped::ungroup_matrix(self.kind, n, nb, s, d);
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// Quantizes f32 values of `shape` (rows along the last dimension).
    pub fn quantize(kind: QKind, x: &[f32], shape: Vec<usize>) -> Result<Self> {
        let k = *shape.last().unwrap_or(&0);
        if k == 0 || k % BLOCK != 0 || shape.iter().product::<usize>() != x.len() {
            return Err(input_err!("cannot quantize {} values of shape {shape:?} to {} (rows must be a multiple of {BLOCK})", x.len(), kind.name()));
        }
        let data = quantize(kind, x, k);
        Self::new(kind, shape, QBytes::Owned(Arc::new(data)))
    }

    /// Length of a row (K).
    pub fn cols(&self) -> usize {
        *self.shape.last().expect("checked in new")
    }

    /// Rows of one matrix (N).
    pub fn rows(&self) -> usize {
        self.shape[self.shape.len().saturating_sub(2)..self.shape.len() - 1].iter().product()
    }

    /// Matrices stacked (E for experts, else 1).
    pub fn matrices(&self) -> usize {
        self.shape[..self.shape.len().saturating_sub(2)].iter().product()
    }

    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// The blocks of matrix `e` ([N, K]).
    pub fn matrix(&self, e: usize) -> &[u8] {
        let size = self.rows() * self.kind.row_bytes(self.cols());
        &self.data[e * size..(e + 1) * size]
    }

    /// Row `r` of the tensor seen as [rows, K], dequantized.
    pub fn row(&self, r: usize, out: &mut [f32]) {
        let rb = self.kind.row_bytes(self.cols());
        if self.grouped {
            let (n, nb, bb) = (self.rows(), self.cols() / BLOCK, self.kind.block_bytes());
            let m = self.matrix(r / n.max(1));
            let mut blk = [0u8; 2 + BLOCK];
            for (b, o) in out.chunks_mut(BLOCK).enumerate().take(nb) {
                grouped::block_of(self.kind, n, nb, m, r % n, b, &mut blk[..bb]);
                dequantize_block(self.kind, &blk[..bb], o);
            }
            return;
        }
        let bytes = &self.data[r * rb..(r + 1) * rb];
        for (o, b) in out.chunks_mut(BLOCK).zip(bytes.chunks(self.kind.block_bytes())) {
            dequantize_block(self.kind, b, o);
        }
    }

    /// Every value, dequantized (row-major, `shape`).
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize(self.kind, &self.row_blocks())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i * 37 % 64) as f32 - 31.5) / 10.0).collect();
        for kind in [QKind::Q8_0, QKind::Q4_0] {
            let q = QTensor::quantize(kind, &x, vec![2, 32]).unwrap();
            assert_eq!(q.data.len(), 2 * kind.block_bytes());
            let y = q.dequantize();
            for (b, (xs, ys)) in x.chunks(32).zip(y.chunks(32)).enumerate() {
                let d = f16::from_le_bytes([q.data[b * kind.block_bytes()], q.data[b * kind.block_bytes() + 1]]).to_f32().abs();
                // Half a step, plus the f16 rounding of the scale over the range; q4_0's range
                // is -8..7 steps with the extreme at -8, so the opposite extreme may lose a step.
                let tol = if kind == QKind::Q4_0 { d * 1.0 } else { d * 0.5 } + d * 2e-3 * 128.0;
                for (a, c) in xs.iter().zip(ys) {
                    assert!((a - c).abs() <= tol, "{kind:?}: {a} vs {c} (step {d})");
                }
            }
        }
        // A zero block has a zero scale and decodes to zeros.
        let z = QTensor::quantize(QKind::Q4_0, &[0.0; 32], vec![32]).unwrap();
        assert!(z.dequantize().iter().all(|&v| v == 0.0));
    }

    #[test]
    fn wrong_sizes_are_errors() {
        let e = QTensor::quantize(QKind::Q8_0, &[0.0; 30], vec![30]).unwrap_err().to_string();
        assert!(e.contains("multiple of 32"), "{e}");
        let e = QTensor::new(QKind::Q4_0, vec![2, 32], QBytes::Owned(Arc::new(vec![0; 35]))).unwrap_err().to_string();
        assert!(e.contains("needs Some(36) bytes, got 35"), "{e}");
    }
}
