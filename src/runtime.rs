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
/// the kernel: glibc maps blocks above its mmap threshold (at most 32 MB) fresh each time and
/// unmaps them on free, so each training step page-faults its activations and gradients in
/// again. With mapping off (M_MMAP_MAX = 0) and trimming off, freed blocks are reused.
/// (glibc refuses an mmap threshold above 32 MB, so raising the threshold is not enough.)
/// Measured: 4x256 training step ~0.53 -> ~0.45 s (before the fused kernels); the MoE layer
/// with 64 experts, whose 134 MB gradients were mapped fresh every step, lost its page-fault
/// time (14 % of samples). Returns whether glibc took both settings; a no-op elsewhere.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // M_TRIM_THRESHOLD = -1, M_MMAP_MAX = -4 (malloc.h)
        libc::mallopt(-1, i32::MAX) == 1 && libc::mallopt(-4, 0) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}
