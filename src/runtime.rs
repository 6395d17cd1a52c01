//! Process-wide settings for the CPU backend: the thread count and the allocator.

/// Sizes the compute threads: rayon's global pool (our kernels) and candle's matrix
/// multiplications (which read `RAYON_NUM_THREADS`). Call before any tensor work; 0 keeps
/// the default (`RAYON_NUM_THREADS` when set, else one thread per core). Returns the count
/// in effect.
pub fn set_threads(n: usize) -> usize {
    if n > 0 {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        // Fails only when the pool already exists (a second call); the count then stays.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Without the variable candle counts the cores again (reading /proc/cpuinfo) on
        // every matrix multiplication: ~5 % of decoding time.
        std::env::set_var("RAYON_NUM_THREADS", rayon::current_num_threads().to_string());
    }
    rayon::current_num_threads()
}

/// Keeps freed memory in the process for reuse instead of returning every large block to
/// the kernel (glibc maps blocks above a threshold fresh each time, so each training step
/// page-faults its activations in again). Measured on the 4x256 training benchmark:
/// ~0.53 -> ~0.45 s per step. A no-op on other C libraries.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // M_TRIM_THRESHOLD = -1, M_MMAP_THRESHOLD = -3 (malloc.h)
        libc::mallopt(-3, 1 << 30);
        libc::mallopt(-1, i32::MAX);
    }
}
