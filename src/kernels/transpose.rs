//! Out-of-place f32 matrix transpose in 8 x 8 blocks (AVX registers where the CPU has them).
//!
//! The experts' backward needs dx = dy w^T with w stored [K, N] row-major: the gemm crate
//! packs such a transposed operand element by element, which at 64 experts (80 rows per
//! expert) took twice as long as the product itself. Transposing w once into a scratch
//! buffer and running the fast layout costs a read and an L2-resident write instead.
//!
//! Destination row strides that are powers of two (1 or 4 KiB for the usual widths) alias
//! the loads and crowd the L1 sets: measured on the 64-expert backward, dx took 11.7 ms
//! with stride 256 and 9.1 ms with 272. Callers pad them with [`padded_stride`].

/// A row stride for `cols` f32 columns: whole cache lines plus one.
pub(crate) fn padded_stride(cols: usize) -> usize {
    cols.div_ceil(16) * 16 + 16
}

/// dst[j * ldd + i] = src[i * lds + j] for i < rows, j < cols.
pub(crate) fn transpose(rows: usize, cols: usize, src: &[f32], lds: usize, dst: &mut [f32], ldd: usize) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(lds >= cols && ldd >= rows, "transpose: strides {lds}, {ldd} below {cols}, {rows}");
    assert!(src.len() >= (rows - 1) * lds + cols, "transpose: source too short");
    assert!(dst.len() >= (cols - 1) * ldd + rows, "transpose: destination too short");
    let (full_r, full_c) = (rows / 8 * 8, cols / 8 * 8);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        for i in (0..full_r).step_by(8) {
            for j in (0..full_c).step_by(8) {
                // SAFETY: AVX is present; the asserts above cover rows i..i+8 of src
                // (columns j..j+8) and rows j..j+8 of dst (columns i..i+8).
                unsafe { block8_avx(src.as_ptr().add(i * lds + j), lds, dst.as_mut_ptr().add(j * ldd + i), ldd) };
            }
        }
        scalar(rows, cols, src, lds, dst, ldd, full_r, full_c);
        return;
    }
    scalar(rows, cols, src, lds, dst, ldd, 0, 0);
}

/// The scalar transpose of everything outside the top-left `done_r x done_c` corner.
#[allow(clippy::too_many_arguments)]
fn scalar(rows: usize, cols: usize, src: &[f32], lds: usize, dst: &mut [f32], ldd: usize, done_r: usize, done_c: usize) {
    const B: usize = 8;
    for i0 in (0..rows).step_by(B) {
        for j0 in (0..cols).step_by(B) {
            if i0 + B <= done_r && j0 + B <= done_c {
                continue;
            }
            for i in i0..(i0 + B).min(rows) {
                for j in j0..(j0 + B).min(cols) {
                    dst[j * ldd + i] = src[i * lds + j];
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
unsafe fn block8_avx(s: *const f32, ls: usize, d: *mut f32, ld: usize) {
    use std::arch::x86_64::*;
    let r: [__m256; 8] = std::array::from_fn(|i| _mm256_loadu_ps(s.add(i * ls)));
    // Pairs of rows interleaved, then pairs of pairs, then the 128-bit halves swapped.
    let t0 = _mm256_unpacklo_ps(r[0], r[1]);
    let t1 = _mm256_unpackhi_ps(r[0], r[1]);
    let t2 = _mm256_unpacklo_ps(r[2], r[3]);
    let t3 = _mm256_unpackhi_ps(r[2], r[3]);
    let t4 = _mm256_unpacklo_ps(r[4], r[5]);
    let t5 = _mm256_unpackhi_ps(r[4], r[5]);
    let t6 = _mm256_unpacklo_ps(r[6], r[7]);
    let t7 = _mm256_unpackhi_ps(r[6], r[7]);
    let u0 = _mm256_shuffle_ps::<0x44>(t0, t2);
    let u1 = _mm256_shuffle_ps::<0xEE>(t0, t2);
    let u2 = _mm256_shuffle_ps::<0x44>(t1, t3);
    let u3 = _mm256_shuffle_ps::<0xEE>(t1, t3);
    let u4 = _mm256_shuffle_ps::<0x44>(t4, t6);
    let u5 = _mm256_shuffle_ps::<0xEE>(t4, t6);
    let u6 = _mm256_shuffle_ps::<0x44>(t5, t7);
    let u7 = _mm256_shuffle_ps::<0xEE>(t5, t7);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps::<0x20>(u0, u4));
    _mm256_storeu_ps(d.add(ld), _mm256_permute2f128_ps::<0x20>(u1, u5));
    _mm256_storeu_ps(d.add(2 * ld), _mm256_permute2f128_ps::<0x20>(u2, u6));
    _mm256_storeu_ps(d.add(3 * ld), _mm256_permute2f128_ps::<0x20>(u3, u7));
    _mm256_storeu_ps(d.add(4 * ld), _mm256_permute2f128_ps::<0x31>(u0, u4));
    _mm256_storeu_ps(d.add(5 * ld), _mm256_permute2f128_ps::<0x31>(u1, u5));
    _mm256_storeu_ps(d.add(6 * ld), _mm256_permute2f128_ps::<0x31>(u2, u6));
    _mm256_storeu_ps(d.add(7 * ld), _mm256_permute2f128_ps::<0x31>(u3, u7));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transposes_every_shape_and_stride_exactly() {
        for &(rows, cols) in &[(1, 1), (8, 8), (16, 24), (13, 21), (7, 9), (40, 3), (3, 40), (256, 64)] {
            for &(pad_s, pad_d) in &[(0, 0), (5, 16)] {
                let (lds, ldd) = (cols + pad_s, rows + pad_d);
                let src: Vec<f32> = (0..rows * lds).map(|v| v as f32 * 0.5 - 7.0).collect();
                let mut dst = vec![f32::NAN; cols * ldd];
                transpose(rows, cols, &src, lds, &mut dst, ldd);
                for i in 0..rows {
                    for j in 0..cols {
                        assert_eq!(dst[j * ldd + i], src[i * lds + j], "{rows}x{cols} at ({i}, {j})");
                    }
                }
                // Padding columns of the destination are left alone.
                for j in 0..cols {
                    assert!(dst[j * ldd + rows..(j * ldd + ldd).min(dst.len())].iter().all(|v| v.is_nan()));
                }
            }
        }
    }

    #[test]
    fn padded_strides_are_whole_lines_plus_one() {
        assert_eq!(padded_stride(256), 272);
        assert_eq!(padded_stride(1024), 1040);
        assert_eq!(padded_stride(100), 128);
    }
}
