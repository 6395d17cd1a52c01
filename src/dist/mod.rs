//! Training on several processes: a small communicator trait with the collectives data-
//! and expert-parallel training need, one process ([`Single`]) and MPI ([`mpi`], behind
//! the cargo feature `mpi`, started by `mpirun`). A future NCCL communicator implements
//! the same trait.
//!
//! Every collective must be entered by every rank in the same order. Implementations end
//! the whole job (with a message naming the collective) when one waits longer than its
//! timeout, so that a rank that died or hangs never leaves the others waiting forever.

#[cfg(feature = "mpi")]
pub mod mpi;

use crate::error::{Error, Result};

/// The collectives of distributed training. Buffers are summed element-wise in a fixed
/// order, so every rank receives bit-identical results.
pub trait Comm: Send + Sync {
    /// This process's rank, 0..size.
    fn rank(&self) -> usize;
    /// Number of processes.
    fn size(&self) -> usize;
    /// `buf` summed over ranks, in place.
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()>;
    /// Starts summing `buf` over ranks and returns at once; [`Reduction::wait`] gives the
    /// sum. Collectives run in the order they are called, started or blocking, so every
    /// rank must start them in the same order too. (Default: the blocking all-reduce.)
    fn start_all_reduce_f32(&self, mut buf: Vec<f32>) -> Result<Reduction> {
        self.all_reduce_f32(&mut buf)?;
        Ok(Reduction::Ready(buf))
    }
    /// `buf` summed over ranks, in place.
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()>;
    /// Every rank's `mine` (the same length on each), concatenated in rank order.
    fn all_gather_u64(&self, mine: &[u64]) -> Result<Vec<u64>>;
    /// `send[r]` goes to rank r; returns what each rank sent here, in rank order.
    fn all_to_all_f32(&self, send: &[Vec<f32>]) -> Result<Vec<Vec<f32>>>;
    /// Payload bytes this rank has put into collectives so far: each all-reduce's and
    /// all-gather's whole buffer, each all-to-all's rows for other ranks (for the
    /// benchmark's bytes per step; what the wire carries depends on the MPI algorithm).
    fn bytes_sent(&self) -> u64;
    /// Seconds the calling threads have been blocked on collectives so far (moving data,
    /// and waiting for slower ranks; started all-reduces count from their `wait`).
    fn seconds_in_collectives(&self) -> f64 {
        0.0
    }
    /// Whether this rank prints and writes files (rank 0).
    fn is_main(&self) -> bool {
        self.rank() == 0
    }
}

/// An all-reduce under way (see [`Comm::start_all_reduce_f32`]).
pub enum Reduction {
    Ready(Vec<f32>),
    /// The result to come, and the nanosecond counter that time blocked in `wait` adds to.
    Pending(std::sync::mpsc::Receiver<Result<Vec<f32>>>, std::sync::Arc<std::sync::atomic::AtomicU64>),
}

impl Reduction {
    /// The sum over ranks, once every rank has contributed.
    pub fn wait(self) -> Result<Vec<f32>> {
        match self {
            Reduction::Ready(v) => Ok(v),
            Reduction::Pending(rx, blocked_ns) => {
                let t = std::time::Instant::now();
                let out = rx.recv().map_err(|_| Error::Msg("the MPI thread ended during an all-reduce".into()));
                blocked_ns.fetch_add(t.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
                out?
            }
        }
    }
}

/// One process: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Comm for Single {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_f32(&self, _: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_f64(&self, _: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, mine: &[u64]) -> Result<Vec<u64>> {
        Ok(mine.to_vec())
    }
    fn all_to_all_f32(&self, send: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        Ok(send.to_vec())
    }
    fn bytes_sent(&self) -> u64 {
        0
    }
}

/// The process count a launcher (mpirun of Open MPI or MPICH, or a PMI launcher) started
/// this process with, from its environment; None when not started by one.
pub fn launched_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.trim().parse::<usize>().ok())
}

/// The communicator this process was started with: MPI's world under `mpirun` (when built
/// with the `mpi` feature), else [`Single`]. `timeout_s` bounds every collective's wait.
pub fn from_env(timeout_s: f64) -> Result<std::sync::Arc<dyn Comm>> {
    let launched = launched_size().unwrap_or(1);
    #[cfg(feature = "mpi")]
    if launched > 1 {
        return Ok(std::sync::Arc::new(mpi::MpiComm::init(timeout_s)?));
    }
    let _ = timeout_s;
    if launched > 1 {
        return Err(Error::Config(format!(
            "started as one of {launched} processes, but this nanomoe was built without MPI: \
             build it with `cargo build --release --features mpi` (needs libopenmpi-dev and libclang-dev)"
        )));
    }
    Ok(std::sync::Arc::new(Single))
}

/// Sums the parameter-sized buffers of every rank in place, `bucket` floats at a time
/// (large messages in few calls, without one buffer the size of the whole model).
pub fn all_reduce_buckets(comm: &dyn Comm, parts: &mut [&mut [f32]], bucket: usize) -> Result<()> {
    if comm.size() == 1 {
        return Ok(());
    }
    let bucket = bucket.max(1);
    let mut staging: Vec<f32> = Vec::with_capacity(bucket);
    // (part, offset, len) of every piece in the current bucket.
    let mut pieces: Vec<(usize, usize, usize)> = Vec::new();
    let flush = |staging: &mut Vec<f32>, pieces: &mut Vec<(usize, usize, usize)>, parts: &mut [&mut [f32]]| -> Result<()> {
        if staging.is_empty() {
            return Ok(());
        }
        comm.all_reduce_f32(staging)?;
        let mut at = 0;
        for &(p, off, len) in pieces.iter() {
            parts[p][off..off + len].copy_from_slice(&staging[at..at + len]);
            at += len;
        }
        staging.clear();
        pieces.clear();
        Ok(())
    };
    for p in 0..parts.len() {
        let mut off = 0;
        while off < parts[p].len() {
            let len = (parts[p].len() - off).min(bucket - staging.len());
            staging.extend_from_slice(&parts[p][off..off + len]);
            pieces.push((p, off, len));
            off += len;
            if staging.len() == bucket {
                flush(&mut staging, &mut pieces, parts)?;
            }
        }
    }
    flush(&mut staging, &mut pieces, parts)
}

/// Fails unless every rank holds the same `value` (e.g. a hash of the weights): catches
/// ranks that loaded different states or drifted apart. `what` names the value.
pub fn check_same(comm: &dyn Comm, value: u64, what: &str) -> Result<()> {
    let all = comm.all_gather_u64(&[value])?;
    if let Some(r) = all.iter().position(|&v| v != all[0]) {
        return Err(Error::Msg(format!(
            "rank {r}'s {what} differs from rank 0's (are out_dir and data_dir the same files on every rank?)"
        )));
    }
    Ok(())
}

/// The contiguous share of `n` items that rank `rank` of `size` takes (earlier ranks take
/// one more when `n` does not divide evenly).
pub fn share(n: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    let base = n / size;
    let extra = n % size;
    let start = rank * base + rank.min(extra);
    start..start + base + usize::from(rank < extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_everything_once() {
        for n in 0..20 {
            for size in 1..6 {
                let mut next = 0;
                for r in 0..size {
                    let s = share(n, r, size);
                    assert_eq!(s.start, next);
                    next = s.end;
                }
                assert_eq!(next, n);
            }
        }
    }

    #[test]
    fn single_process_collectives_are_identities() {
        let c = Single;
        let mut a = vec![1.0f32, 2.0];
        let mut parts = [&mut a[..]];
        all_reduce_buckets(&c, &mut parts, 1).unwrap();
        assert_eq!(a, vec![1.0, 2.0]);
        assert_eq!(c.all_gather_u64(&[7]).unwrap(), vec![7]);
        check_same(&c, 3, "x").unwrap();
    }
}
