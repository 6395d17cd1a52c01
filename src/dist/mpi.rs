//! [`Comm`] over MPI (rsmpi; Open MPI or MPICH), for processes started by `mpirun`.
//!
//! MPI is initialised with `MPI_THREAD_SERIALIZED`: the trainer calls collectives from its
//! compute-pool thread, one at a time (a mutex serialises them). A watchdog thread ends the
//! job when a collective waits longer than the timeout - a rank that died or hangs - with
//! a message on stderr and exit status 3, which makes `mpirun` stop every other rank.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

use super::Comm;
use crate::error::{Error, Result};

/// What the watchdog sees: the collective in progress and since when.
struct Pending {
    /// Milliseconds since `epoch` when the current collective began; 0 when none is.
    since_ms: AtomicU64,
    what: Mutex<&'static str>,
    epoch: Instant,
    stop: AtomicBool,
}

pub struct MpiComm {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    lock: Mutex<()>,
    pending: Arc<Pending>,
    bytes: AtomicU64,
    nanos: AtomicU64,
    /// Finalises MPI when dropped (after the world communicator).
    _universe: Universe,
}

// SAFETY: MPI runs at MPI_THREAD_SERIALIZED (checked in `init`) and every call through
// this type holds `lock`, so no two threads are ever inside MPI at once.
unsafe impl Send for MpiComm {}
unsafe impl Sync for MpiComm {}

impl MpiComm {
    /// Initialises MPI (once per process) and starts the collective watchdog.
    pub fn init(timeout_s: f64) -> Result<Self> {
        let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized)
            .ok_or_else(|| Error::Msg("MPI was already initialised in this process".into()))?;
        if threading < mpi::Threading::Serialized {
            return Err(Error::Msg(format!(
                "the MPI library offers thread level {threading:?}; nanomoe needs Serialized (calls from its compute thread)"
            )));
        }
        let world = universe.world();
        let rank = world.rank() as usize;
        let size = world.size() as usize;
        let pending = Arc::new(Pending { since_ms: AtomicU64::new(0), what: Mutex::new(""), epoch: Instant::now(), stop: AtomicBool::new(false) });
        if timeout_s > 0.0 {
            let p = pending.clone();
            let limit = Duration::from_secs_f64(timeout_s);
            std::thread::Builder::new()
                .name("mpi-watchdog".into())
                .spawn(move || watchdog(p, limit, rank))
                .map_err(|e| Error::Msg(format!("cannot start the MPI watchdog thread: {e}")))?;
        }
        Ok(MpiComm { world, rank, size, lock: Mutex::new(()), pending, bytes: AtomicU64::new(0), nanos: AtomicU64::new(0), _universe: universe })
    }

    /// Runs one collective under the lock and the watchdog's eye.
    fn collective<T>(&self, what: &'static str, sent_bytes: usize, f: impl FnOnce(&SimpleCommunicator) -> T) -> T {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        *self.pending.what.lock().unwrap_or_else(|e| e.into_inner()) = what;
        let now = self.pending.epoch.elapsed().as_millis() as u64;
        self.pending.since_ms.store(now.max(1), Ordering::SeqCst);
        let t = Instant::now();
        let out = f(&self.world);
        self.nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        self.pending.since_ms.store(0, Ordering::SeqCst);
        self.bytes.fetch_add(sent_bytes as u64, Ordering::Relaxed);
        out
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        self.pending.stop.store(true, Ordering::SeqCst);
    }
}

fn watchdog(p: Arc<Pending>, limit: Duration, rank: usize) {
    let tick = Duration::from_millis(200).min(limit);
    while !p.stop.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        let since = p.since_ms.load(Ordering::SeqCst);
        if since == 0 {
            continue;
        }
        let waited = p.epoch.elapsed().saturating_sub(Duration::from_millis(since));
        if waited > limit && p.since_ms.load(Ordering::SeqCst) == since {
            let what = *p.what.lock().unwrap_or_else(|e| e.into_inner());
            eprintln!(
                "error: rank {rank} waited {:.0} s in {what} for the other ranks (collective_timeout {:.0} s): \
                 a rank has died or hangs; ending the job (the last complete state in out_dir/state resumes)",
                waited.as_secs_f64(),
                limit.as_secs_f64()
            );
            std::process::exit(3);
        }
    }
}

fn count(n: usize, what: &str) -> Result<Count> {
    Count::try_from(n).map_err(|_| Error::Input(format!("{what}: {n} elements exceed one MPI message's limit of {}", Count::MAX)))
}

fn displacements(counts: &[Count]) -> Vec<Count> {
    counts.iter().scan(0, |acc, &c| {
        let d = *acc;
        *acc += c;
        Some(d)
    }).collect()
}

impl Comm for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn all_reduce_f32(&self, buf: &mut [f32]) -> Result<()> {
        count(buf.len(), "all-reduce")?;
        let send = buf.to_vec();
        self.collective("all-reduce (f32)", 4 * buf.len(), |w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
        Ok(())
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        count(buf.len(), "all-reduce")?;
        let send = buf.to_vec();
        self.collective("all-reduce (f64)", 8 * buf.len(), |w| w.all_reduce_into(&send[..], buf, SystemOperation::sum()));
        Ok(())
    }
    fn all_gather_u64(&self, mine: &[u64]) -> Result<Vec<u64>> {
        count(mine.len() * self.size, "all-gather")?;
        let mut out = vec![0u64; mine.len() * self.size];
        self.collective("all-gather", 8 * mine.len(), |w| w.all_gather_into(mine, &mut out[..]));
        Ok(out)
    }
    fn all_to_all_f32(&self, send: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        if send.len() != self.size {
            return Err(Error::Input(format!("all-to-all: {} send buffers for {} ranks", send.len(), self.size)));
        }
        let send_counts = send.iter().map(|s| count(s.len(), "all-to-all")).collect::<Result<Vec<Count>>>()?;
        let mut recv_counts = vec![0 as Count; self.size];
        self.collective("all-to-all (sizes)", 4 * self.size, |w| w.all_to_all_into(&send_counts[..], &mut recv_counts[..]));
        let flat: Vec<f32> = send.concat();
        count(flat.len(), "all-to-all")?;
        let total: usize = recv_counts.iter().map(|&c| c as usize).sum();
        count(total, "all-to-all")?;
        let mut recv = vec![0f32; total];
        let (sd, rd) = (displacements(&send_counts), displacements(&recv_counts));
        let to_others = flat.len() - send[self.rank].len();
        self.collective("all-to-all", 4 * to_others, |w| {
            let s = Partition::new(&flat[..], &send_counts[..], &sd[..]);
            let mut r = PartitionMut::new(&mut recv[..], &recv_counts[..], &rd[..]);
            w.all_to_all_varcount_into(&s, &mut r);
        });
        let mut out = Vec::with_capacity(self.size);
        for (c, d) in recv_counts.iter().zip(&rd) {
            out.push(recv[*d as usize..(*d + *c) as usize].to_vec());
        }
        Ok(out)
    }
    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    fn seconds_in_collectives(&self) -> f64 {
        self.nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }
}
