//! The grouped layout of q8_0 / q4_0 matrices: what the AVX-512 VNNI kernel
//! (`kernels::qgroup`) reads, built once when a model loads, as llama.cpp repacks its
//! quantized weights into interleaved rows for its CPU kernels.
//!
//! A matrix of N rows is cut into groups of [`GROUP`] = 16 consecutive rows; the last N % 16
//! rows (GPT-2's vocabulary is 50,257 = 16 x 3,141 + 1) stay in the row layout after the
//! groups. A group keeps its 16 rows' block b together, in the same bytes as the 16 blocks
//! it replaces (so the layout has the size of the GGUF data and converts in one pass):
//!
//! - the 16 rows' f16 scales (32 bytes), then
//! - the weights in steps of 4 consecutive weights per row, 16 rows x 4 bytes (64 bytes, one
//!   512-bit register: lane j holds row j's 4 weights) a step:
//!   - q8_0: 8 steps (weights 4s..4s+3), each byte the weight + 128 (unsigned: `vpdpbusd`
//!     multiplies unsigned by signed bytes; the kernel takes 128 x the activations' block
//!     sum off);
//!   - q4_0: 4 steps of the block's own bytes 4s..4s+3: the low nibbles are weights
//!     4s..4s+3, the high ones 16+4s..16+4s+3 (unsigned 0..15; the kernel takes 8 x the
//!     activations' block sum off).

use super::{QKind, BLOCK};

/// Rows of a group.
pub const GROUP: usize = 16;

/// Bytes of the weights of one step of a group (16 rows x 4 weights, or nibble pairs).
const STEP: usize = 64;

/// Rows of an `n`-row matrix in groups (the rest stay in the row layout).
pub fn grouped_rows(n: usize) -> usize {
    n / GROUP * GROUP
}

/// Steps of a group-block: q8_0's 32 weights 4 at a time, q4_0's 16 nibble-pair bytes.
fn steps(kind: QKind) -> usize {
    match kind {
        QKind::Q8_0 => BLOCK / 4,
        QKind::Q4_0 => BLOCK / 8,
    }
}

/// One block (row-layout bytes, `kind.block_bytes()` long) into row `j` of a group-block.
fn put(kind: QKind, blk: &[u8], j: usize, dst: &mut [u8]) {
    dst[2 * j..2 * j + 2].copy_from_slice(&blk[..2]);
    let w = &blk[2..];
    for s in 0..steps(kind) {
        for t in 0..4 {
            let v = w[4 * s + t];
            dst[32 + s * STEP + j * 4 + t] = if kind == QKind::Q8_0 { v ^ 0x80 } else { v };
        }
    }
}

/// Row `j` of a group-block back into a row-layout block.
fn get(kind: QKind, src: &[u8], j: usize, blk: &mut [u8]) {
    blk[..2].copy_from_slice(&src[2 * j..2 * j + 2]);
    for s in 0..steps(kind) {
        for t in 0..4 {
            let v = src[32 + s * STEP + j * 4 + t];
            blk[2 + 4 * s + t] = if kind == QKind::Q8_0 { v ^ 0x80 } else { v };
        }
    }
}

/// One matrix (`n` rows of `nb` blocks) from the row layout (`src`) into the grouped one
/// (`dst`, the same length).
pub fn group_matrix(kind: QKind, n: usize, nb: usize, src: &[u8], dst: &mut [u8]) {
    let bb = kind.block_bytes();
    let gb = GROUP * bb;
    debug_assert!(src.len() == n * nb * bb && dst.len() == src.len());
    let full = grouped_rows(n);
    for g in 0..full / GROUP {
        for b in 0..nb {
            let out = &mut dst[(g * nb + b) * gb..(g * nb + b + 1) * gb];
            for j in 0..GROUP {
                let at = ((g * GROUP + j) * nb + b) * bb;
                put(kind, &src[at..at + bb], j, out);
            }
        }
    }
    let tail = full * nb * bb;
    dst[tail..].copy_from_slice(&src[tail..]);
}

/// Block `b` of row `r` of a grouped matrix (`n` rows of `nb` blocks) in the row layout.
pub fn block_of(kind: QKind, n: usize, nb: usize, m: &[u8], r: usize, b: usize, blk: &mut [u8]) {
    let bb = kind.block_bytes();
    let full = grouped_rows(n);
    if r < full {
        let at = ((r / GROUP) * nb + b) * GROUP * bb;
        get(kind, &m[at..at + GROUP * bb], r % GROUP, blk);
    } else {
        let at = full * nb * bb + ((r - full) * nb + b) * bb;
        blk.copy_from_slice(&m[at..at + bb]);
    }
}

/// One grouped matrix back in the row layout (GGUF's).
pub fn ungroup_matrix(kind: QKind, n: usize, nb: usize, src: &[u8], dst: &mut [u8]) {
    let bb = kind.block_bytes();
    for r in 0..n {
        for b in 0..nb {
            let at = (r * nb + b) * bb;
            block_of(kind, n, nb, src, r, b, &mut dst[at..at + bb]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Row layout -> groups -> row layout is the identity, for matrices with and without a
    /// tail of rows, and every row read from the groups equals the row layout's.
    #[test]
    fn grouping_round_trips_and_rows_read_back() {
        for kind in [QKind::Q8_0, QKind::Q4_0] {
            for (n, nb) in [(16, 1), (33, 3), (5, 2), (48, 4)] {
                let bb = kind.block_bytes();
                let src: Vec<u8> = (0..n * nb * bb).map(|i| (i * 131 + i / 7) as u8).collect();
                let mut g = vec![0u8; src.len()];
                group_matrix(kind, n, nb, &src, &mut g);
                if n >= GROUP {
                    assert_ne!(g, src, "{kind:?} {n}x{nb}: the layout did not change");
                }
                let mut back = vec![0u8; src.len()];
                ungroup_matrix(kind, n, nb, &g, &mut back);
                assert_eq!(back, src, "{kind:?} {n}x{nb}");
            }
        }
        // q8_0: a group's step holds the weights + 128, row j in lane j.
        let mut src = vec![0u8; GROUP * 34];
        for j in 0..GROUP {
            src[j * 34 + 2] = (-(j as i8)) as u8; // row j's weight 0
        }
        let mut g = vec![0u8; src.len()];
        group_matrix(QKind::Q8_0, GROUP, 1, &src, &mut g);
        for j in 0..GROUP {
            assert_eq!(g[32 + j * 4] as i32 - 128, -(j as i32));
        }
    }
}
