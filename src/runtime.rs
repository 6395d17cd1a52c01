//! Process-wide settings for the CPU backend: the thread count, the allocator, and the
//! guard that keeps the pool's workers awake through a decoding loop.

/// Sizes the compute threads: rayon's global pool (our kernels) and candle's matrix
/// multiplications (which read `RAYON_NUM_THREADS`), and shortens the spinning of candle's
/// element-wise pool (unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` is set). Call before any tensor work; 0 keeps
/// the default (`RAYON_NUM_THREADS` when set, else one thread per core). Returns the count
/// in effect; more than [`max_threads`] is an error (each thread spins between ops: thousands
/// on a few cores starve each other).
pub fn set_threads(n: usize) -> crate::Result<usize> {
    if n > max_threads() {
        return Err(crate::Error::Config(format!(
            "--threads {n} is more than 4 per core (this machine has {} cores; at most {})",
            max_threads() / 4,
            max_threads()
        )));
    }
    if n > 0 {
        std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        // Fails only when the pool already exists (a second call); the count then stays.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    } else if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        // Without the variable candle counts the cores again (reading /proc/cpuinfo) on
        // every matrix multiplication: ~5 % of decoding time.
        std::env::set_var("RAYON_NUM_THREADS", rayon::current_num_threads().to_string());
    }
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        // candle runs its element-wise ops on a pool of its own ("candle-bp-*" threads, read
        // when it starts), whose threads spin 25,000 rounds after every op before sleeping:
        // on 2 cores that spinning took 12 % of the samples of a training step from the
        // threads doing the work (char-vocab step 0.18 -> 0.15 s with a short spin).
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "1000");
    }
    Ok(rayon::current_num_threads())
}

/// The most compute threads [`set_threads`] accepts: 4 per core.
pub fn max_threads() -> usize {
    4 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Keeps freed memory in the process for reuse instead of returning every large block to
/// the kernel: glibc maps blocks above its mmap threshold (at most 32 MB) fresh each time and
/// unmaps them on free, so each training step page-faults its activations and gradients in
/// again. With mapping off (M_MMAP_MAX = 0) and trimming off, freed blocks are reused.
/// (glibc refuses an mmap threshold above 32 MB, so raising the threshold is not enough.)
/// Measured: 4x256 training step ~0.53 -> ~0.45 s (before the fused kernels); the MoE layer
/// with 64 experts, whose 134 MB gradients were mapped fresh every step, lost its page-fault
/// time (14 % of samples). One arena for all threads: the other arenas live in mapped
/// 64 MB heaps that glibc shrinks as blocks are freed, so work run on a pool thread (see
/// [`on_compute_pool`]) page-faulted again (7x the page faults, 64-expert layer 0.08 ->
/// 0.11 s). Returns whether glibc took the settings; a no-op elsewhere.
pub fn keep_freed_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        // M_TRIM_THRESHOLD = -1, M_MMAP_MAX = -4, M_ARENA_MAX = -8 (malloc.h)
        libc::mallopt(-1, i32::MAX) == 1 && libc::mallopt(-4, 0) == 1 && libc::mallopt(-8, 1) == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    false
}

/// Runs `f` on a worker thread of rayon's global pool and waits for it. Each parallel op
/// started from outside the pool hands its work to the pool and sleeps until the pool hands
/// it back - two thread wake-ups per op, ~50 ops per decoded token. Started from a worker,
/// the op runs on that thread at once and only the idle workers join in.
pub fn on_compute_pool<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::scope(|_| f())
}

/// While alive, the other workers of rayon's global pool poll for work instead of going to
/// sleep between parallel ops (as llama.cpp's threads stay awake through a token's graph).
/// Decoding runs ~50 parallel products per token with serial work between them (norms,
/// attention, sampling); a worker idle longer than rayon's short spin goes to sleep, and
/// waking it for the next product costs a good part of a small product's time. Measured on
/// GPT-2 124M bf16 decoding, 2 threads, alternated 5 times: 42.1 -> 46.8 tokens/s (median).
///
/// An idle worker yields its core to other threads between polls, so a server's HTTP side
/// still runs. Take it for the duration of a decoding loop, on a worker of the pool
/// ([`on_compute_pool`]); elsewhere, or with one thread, it does nothing. Dropping it (on
/// the thread that took it: the guard is not `Send`) lets the workers sleep again. A worker
/// that holds a guard of its own never polls for another's; any other job a worker runs
/// waits while that worker polls, until the guard is dropped.
pub struct HotWorkers {
    stop: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
    _not_send: std::marker::PhantomData<*const ()>,
}

thread_local! {
    /// Guards held by this thread (see [`HotWorkers`]).
    static HOT_GUARDS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// See [`HotWorkers`].
pub fn keep_workers_hot() -> HotWorkers {
    use std::sync::atomic::{AtomicBool, Ordering};
    let idle = HotWorkers { stop: None, _not_send: std::marker::PhantomData };
    if rayon::current_thread_index().is_none() || rayon::current_num_threads() < 2 {
        return idle;
    }
    HOT_GUARDS.with(|g| g.set(g.get() + 1));
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    rayon::spawn_broadcast(move |_| {
        // Every worker gets a copy, the guard's own too, which runs whenever that worker
        // next looks for work (inside a join, say): it must return at once, or the worker
        // would wait on itself. So must any worker running a decoding loop of its own.
        if HOT_GUARDS.with(|g| g.get()) > 0 {
            return;
        }
        while !flag.load(Ordering::Relaxed) {
            match rayon::yield_now() {
                Some(rayon::Yield::Executed) => {}
                // Nothing to do: give the core to any other thread that wants it, but stay
                // awake.
                _ => std::thread::yield_now(),
            }
        }
    });
    HotWorkers { stop: Some(stop), _not_send: std::marker::PhantomData }
}

impl Drop for HotWorkers {
    fn drop(&mut self) {
        if let Some(s) = &self.stop {
            s.store(true, std::sync::atomic::Ordering::Relaxed);
            HOT_GUARDS.with(|g| g.set(g.get() - 1));
        }
    }
}

/// Memory this process may still use, in bytes: the smaller of the kernel's estimate of
/// available memory (`MemAvailable`) and the room left under this cgroup's limit; `None`
/// where neither can be read (then nothing is refused for lack of memory).
pub fn available_memory() -> Option<u64> {
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let meminfo = read("/proc/meminfo").and_then(|m| {
        let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        kb.checked_mul(1024)
    });
    let cgroup = (|| {
        let max: u64 = read("/sys/fs/cgroup/memory.max")?.trim().parse().ok()?;
        let used: u64 = read("/sys/fs/cgroup/memory.current")?.trim().parse().ok()?;
        Some(max.saturating_sub(used))
    })();
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Refuses work that needs more memory than the machine has, before anything is allocated:
/// `bytes` is a lower bound of what `what` needs (so an absurd size is caught, never a
/// legitimate one). The error names the need and what is available.
pub fn check_memory(what: impl FnOnce() -> String, bytes: u128) -> crate::Result<()> {
    let available = available_memory().map(u128::from);
    if bytes > available.unwrap_or(u128::MAX) || bytes > u64::MAX as u128 {
        return Err(crate::Error::Config(format!(
            "{} needs at least {} of memory but this machine has {} available",
            what(),
            fmt_bytes(bytes),
            available.map(fmt_bytes).unwrap_or_else(|| "an unknown amount".into())
        )));
    }
    Ok(())
}

/// Bytes in decimal units: "512 B", "1.5 GB", "3.2 TB"; "2^70 B" beyond exabytes.
pub fn fmt_bytes(b: u128) -> String {
    const UNITS: [&str; 7] = ["B", "kB", "MB", "GB", "TB", "PB", "EB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1000.0 && u + 1 < UNITS.len() {
        v /= 1000.0;
        u += 1;
    }
    if v >= 1000.0 {
        return format!("2^{} B", 127 - b.leading_zeros());
    }
    if u == 0 { format!("{b} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

thread_local! {
    static QUIET_PANICS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f`, turning a panic inside it into `Err(message)` without printing it: for calls
/// into dependencies that panic on malformed input (the tokenizers crate on some malformed
/// tokenizer.json files). Panics elsewhere, and on other threads, print as usual.
pub fn catch_panic<T>(f: impl FnOnce() -> T) -> std::result::Result<T, String> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET_PANICS.with(|q| q.get()) {
                previous(info);
            }
        }));
    });
    let was = QUIET_PANICS.with(|q| q.replace(true));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
    QUIET_PANICS.with(|q| q.set(was));
    r.map_err(|p| {
        p.downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| p.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;

    /// Runs `f` on a thread of its own; fails when it has not finished within 20 s.
    fn within_20s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(20)).expect("hung: did not finish within 20 s")
    }

    /// Waits until no worker runs the guard's polling loop any more: the loop's closure, and
    /// with it its handle on the stop flag, is dropped once every worker has returned from it.
    fn released(stop: std::sync::Arc<std::sync::atomic::AtomicBool>) -> bool {
        let t = std::time::Instant::now();
        while std::sync::Arc::strong_count(&stop) > 1 {
            if t.elapsed().as_secs() > 10 {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        true
    }

    fn work(rounds: u64) -> bool {
        (0..rounds).all(|r| (0..10_000u64).into_par_iter().map(|i| i * r).sum::<u64>() == r * 10_000 * 9_999 / 2)
    }

    #[test]
    fn hot_workers_run_the_pools_work_then_let_it_go() {
        within_20s(|| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
            let ok = pool.install(|| {
                let guard = keep_workers_hot();
                let outer = guard.stop.clone().expect("a guard on a worker of 3");
                let nested = keep_workers_hot();
                let inner = nested.stop.clone().expect("a guard on a worker of 3");
                let ok = work(200);
                drop(nested);
                let ok = ok && work(50);
                drop(guard);
                (ok && work(10), outer, inner)
            });
            assert!(ok.0);
            assert!(released(ok.1) && released(ok.2), "a worker still polls after its guard was dropped");
            // Every worker must be free again: a broadcast runs on each of them.
            assert_eq!(pool.broadcast(|ctx| ctx.index()).len(), 3);
        });
    }

    #[test]
    fn hot_workers_from_two_workers_at_once_finish() {
        within_20s(|| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
            let guarded = || {
                let g = keep_workers_hot();
                (work(100), g.stop.clone().expect("a guard on a worker of 2"))
            };
            let (a, b) = pool.install(|| rayon::join(guarded, guarded));
            assert!(a.0 && b.0);
            assert!(released(a.1) && released(b.1), "a worker still polls after its guard was dropped");
            assert_eq!(pool.broadcast(|ctx| ctx.index()).len(), 2);
        });
    }

    #[test]
    fn hot_workers_outside_a_pool_or_with_one_thread_do_nothing() {
        assert!(keep_workers_hot().stop.is_none());
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        assert!(one.install(|| keep_workers_hot().stop.is_none()));
    }
}
