//! The machine's ceilings that benchmarks report shares of: f32 matrix-product throughput
//! with the gemm crate (what nanomoe's kernels run) on rayon's pool, and streaming memory
//! bandwidth (what batch-1 decoding is bound by).

use std::time::Instant;

use rayon::prelude::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// f32 C = A B for square n x n matrices on every thread of rayon's pool: GFLOP/s of each
/// of `repeats` timed runs (after one untimed run).
pub fn sgemm_gflops(n: usize, repeats: usize) -> Vec<f64> {
    gemm_gflops(n, repeats, crate::kernels::Precision::F32)
}

/// [`sgemm_gflops`] for the given precision: with bf16, the mixed-precision training
/// product (f32 operands rounded to bf16 as they are packed, f32 sums; on [`crate::kernels::bf16_gemm::bf16_unit`]).
pub fn gemm_gflops(n: usize, repeats: usize, prec: crate::kernels::Precision) -> Vec<f64> {
    let a: Vec<f32> = (0..n * n).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let b: Vec<f32> = (0..n * n).map(|i| ((i % 89) as f32 - 44.0) / 89.0).collect();
    let mut c = vec![0f32; n * n];
    let threads = rayon::current_num_threads();
    let mut out = Vec::new();
    for r in 0..=repeats {
        let t = Instant::now();
        // SAFETY: a, b, c are n x n, row-major, and c does not overlap a or b.
        unsafe { crate::kernels::mm_in(prec, n, n, n, c.as_mut_ptr(), n, a.as_ptr(), n, 1, b.as_ptr(), n, 1, 1.0, threads) };
        let s = t.elapsed().as_secs_f64();
        if r > 0 {
            out.push(2.0 * (n as f64).powi(3) / s / 1e9);
        }
    }
    std::hint::black_box(&c);
    out
}

/// GB/s of reading a `bytes`-sized f32 buffer once (a sum, split over rayon's pool), for each
/// of `repeats` timed runs: the bound of weight-streaming decoding.
pub fn read_bandwidth_gbs(bytes: usize, repeats: usize) -> Vec<f64> {
    let v: Vec<f32> = (0..bytes / 4).map(|i| (i % 7) as f32).collect();
    let chunk = (v.len() / (4 * rayon::current_num_threads())).max(1 << 16);
    let mut out = Vec::new();
    for r in 0..=repeats {
        let t = Instant::now();
        let s: f32 = v.par_chunks(chunk).map(|c| {
            // 32 independent sums (eight 4-lane vectors even without AVX), so the adds'
            // latency is not the bound.
            let mut acc = [0f32; 32];
            for x in c.chunks_exact(32) {
                for k in 0..32 {
                    acc[k] += x[k];
                }
            }
            acc.iter().sum::<f32>()
        }).sum();
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        if r > 0 {
            out.push(bytes as f64 / secs / 1e9);
        }
    }
    out
}

/// The median of a set of measurements.
pub fn median_of(v: &[f64]) -> f64 {
    median(v.to_vec())
}

/// The kernels [`decode_product_gflops`] can time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProductKernel {
    /// Inference weights in panels (`kernels::panels`, here f32): what decoding and serving run.
    Panels,
    /// The [N, K] dot-product kernel (`kernels::matvec`: tensors not in panels, as a model in
    /// the training layout holds them).
    Matvec,
    /// The gemm crate, reading w in place as the transposed operand.
    Gemm,
}

/// GFLOP/s of the decoding product y = x w^T (x [m, k], w [n, k] f32) with `kernel`, for
/// each of `repeats` timed runs. `copies` distinct weight matrices are used in turn, so with
/// enough of them every run reads its weights from memory (as decoding does) and with one
/// they stay in the caches: the two bounds a decoding step sits between.
pub fn decode_product_gflops(m: usize, k: usize, n: usize, copies: usize, repeats: usize, kernel: ProductKernel) -> crate::Result<Vec<f64>> {
    let x: Vec<f32> = (0..m * k).map(|i| ((i % 97) as f32 - 48.0) / 97.0).collect();
    let ws: Vec<Vec<f32>> = (0..copies.max(1)).map(|c| (0..n * k).map(|i| (((i + c) % 89) as f32 - 44.0) / 89.0).collect()).collect();
    let panels = match kernel {
        ProductKernel::Panels => ws.iter().map(|w| crate::kernels::panels::Panels::pack(w, 1, n, k)).collect::<crate::Result<Vec<_>>>()?,
        _ => Vec::new(),
    };
    let threads = rayon::current_num_threads();
    // On a worker of the pool with the others polling for work, as decoding runs its
    // products: from outside the pool each product would first wait for sleeping workers
    // to wake up.
    crate::runtime::on_compute_pool(|| {
        let _hot = crate::runtime::keep_workers_hot();
        timed_products(&x, m, k, n, &ws, &panels, repeats, kernel, threads)
    })
}

#[allow(clippy::too_many_arguments)]
fn timed_products(x: &[f32], m: usize, k: usize, n: usize, ws: &[Vec<f32>], panels: &[crate::kernels::panels::Panels], repeats: usize, kernel: ProductKernel, threads: usize) -> crate::Result<Vec<f64>> {
    let mut out = Vec::new();
    let mut y = vec![0f32; m * n];
    for r in 0..=repeats {
        let t = Instant::now();
        for (c, w) in ws.iter().enumerate() {
            match kernel {
                // SAFETY: x is [m, k], w [n, k] read as [k, n] with strides (1, k), y [m, n].
                ProductKernel::Gemm => unsafe { crate::kernels::mm_in(crate::kernels::Precision::F32, m, n, k, y.as_mut_ptr(), n, x.as_ptr(), k, 1, w.as_ptr(), 1, k, 1.0, threads) },
                ProductKernel::Matvec => y = crate::kernels::matvec::product(x, m, k, w, n, true),
                ProductKernel::Panels => y = panels[c].product(0, x, m),
            }
            std::hint::black_box(&y);
        }
        let s = t.elapsed().as_secs_f64();
        if r > 0 {
            out.push(2.0 * (m * k * n * ws.len()) as f64 / s / 1e9);
        }
    }
    Ok(out)
}
