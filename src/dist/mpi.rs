//! [`Comm`] over MPI (rsmpi; Open MPI or MPICH), for processes started by `mpirun`.
//!
//! One thread of its own makes every MPI call (MPI initialised there, `MPI_THREAD_FUNNELED`):
//! the trainer hands it collectives in order and either waits for each or, for gradient
//! all-reduces started during the backward pass, collects the result later - so that
//! communication overlaps computation. A watchdog thread ends the job when a collective
//! waits longer than the timeout - a rank that died or hangs - with a message on stderr
//! and exit status 3, which makes `mpirun` stop every other rank.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mpi::collective::SystemOperation;
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use mpi::Count;

use super::{Comm, Reduction};
use crate::error::{Error, Result};

/// What the watchdog sees: the collective in progress and since when.
struct Pending {
    /// Milliseconds since `epoch` when the current collective began; 0 when none is.
    since_ms: AtomicU64,
    what: Mutex<&'static str>,
    epoch: Instant,
    stop: AtomicBool,
}

/// A collective for the MPI thread.
type Job = Box<dyn FnOnce(&SimpleCommunicator) + Send>;

pub struct MpiComm {
    rank: usize,
    size: usize,
    jobs: Mutex<Option<Sender<Job>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    pending: Arc<Pending>,
    bytes: AtomicU64,
    /// Nanoseconds callers were blocked on collectives.
    blocked_ns: Arc<AtomicU64>,
}

impl MpiComm {
    /// Starts the MPI thread (which initialises MPI) and the collective watchdog.
    pub fn init(timeout_s: f64) -> Result<Self> {
        let pending = Arc::new(Pending {
            since_ms: AtomicU64::new(0),
            what: Mutex::new(""),
            epoch: Instant::now(),
            stop: AtomicBool::new(false),
        });
        let (jobs, queue) = channel::<Job>();
        let (ready_tx, ready) = channel::<Result<(usize, usize)>>();
        let thread = std::thread::Builder::new()
            .name("mpi".into())
            .spawn(move || mpi_thread(queue, ready_tx))
            .map_err(|e| Error::Msg(format!("cannot start the MPI thread: {e}")))?;
        let (rank, size) = ready.recv().map_err(|_| Error::Msg("the MPI thread ended while initialising MPI".into()))??;
        if timeout_s > 0.0 {
            let p = pending.clone();
            let limit = Duration::from_secs_f64(timeout_s);
            std::thread::Builder::new()
                .name("mpi-watchdog".into())
                .spawn(move || watchdog(p, limit, rank))
                .map_err(|e| Error::Msg(format!("cannot start the MPI watchdog thread: {e}")))?;
        }
        Ok(MpiComm { rank, size, jobs: Mutex::new(Some(jobs)), thread: Mutex::new(Some(thread)), pending, bytes: AtomicU64::new(0), blocked_ns: Arc::default() })
    }

    /// Queues `f` on the MPI thread; its result arrives on the returned receiver.
    fn start<T: Send + 'static>(&self, what: &'static str, sent_bytes: usize, f: impl FnOnce(&SimpleCommunicator) -> T + Send + 'static) -> Result<Receiver<T>> {
        let (tx, rx) = channel();
        let p = self.pending.clone();
        let job: Job = Box::new(move |w| {
            *p.what.lock().unwrap_or_else(|e| e.into_inner()) = what;
            p.since_ms.store((p.epoch.elapsed().as_millis() as u64).max(1), Ordering::SeqCst);
            let out = f(w);
            p.since_ms.store(0, Ordering::SeqCst);
            let _ = tx.send(out);
        });
        let jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.as_ref()
            .and_then(|j| j.send(job).ok())
            .ok_or_else(|| Error::Msg("the MPI thread has ended".into()))?;
        self.bytes.fetch_add(sent_bytes as u64, Ordering::Relaxed);
        Ok(rx)
    }

    /// Runs `f` on the MPI thread and waits for it.
    fn run<T: Send + 'static>(&self, what: &'static str, sent_bytes: usize, f: impl FnOnce(&SimpleCommunicator) -> T + Send + 'static) -> Result<T> {
        let rx = self.start(what, sent_bytes, f)?;
        let t = Instant::now();
        let out = rx.recv().map_err(|_| Error::Msg(format!("the MPI thread ended during {what}")));
        self.blocked_ns.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }
}

/// Owns MPI: initialises it, runs the queued collectives in order, finalises it when the
/// queue closes.
fn mpi_thread(queue: Receiver<Job>, ready: Sender<Result<(usize, usize)>>) {
    let Some((universe, threading)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        let _ = ready.send(Err(Error::Msg("MPI was already initialised in this process".into())));
        return;
    };
    if threading < mpi::Threading::Funneled {
        let _ = ready.send(Err(Error::Msg(format!(
            "the MPI library offers thread level {threading:?}; nanomoe needs Funneled (MPI on a thread of its own)"
        ))));
        return;
    }
    let world = universe.world();
    let _ = ready.send(Ok((world.rank() as usize, world.size() as usize)));
    while let Ok(job) = queue.recv() {
        job(&world);
    }
    drop(world);
    drop(universe); // MPI_Finalize
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        self.pending.stop.store(true, Ordering::SeqCst);
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
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
        let sum = self.start_all_reduce_f32(buf.to_vec())?.wait()?;
        buf.copy_from_slice(&sum);
        Ok(())
    }
    fn start_all_reduce_f32(&self, buf: Vec<f32>) -> Result<Reduction> {
        count(buf.len(), "all-reduce")?;
        let bytes = 4 * buf.len();
        let rx = self.start("all-reduce (f32)", bytes, move |w| {
            let mut out = vec![0f32; buf.len()];
            w.all_reduce_into(&buf[..], &mut out[..], SystemOperation::sum());
            Ok(out)
        })?;
        Ok(Reduction::Pending(rx, self.blocked_ns.clone()))
    }
    fn all_reduce_f64(&self, buf: &mut [f64]) -> Result<()> {
        count(buf.len(), "all-reduce")?;
        let send = buf.to_vec();
        let sum = self.run("all-reduce (f64)", 8 * buf.len(), move |w| {
            let mut out = vec![0f64; send.len()];
            w.all_reduce_into(&send[..], &mut out[..], SystemOperation::sum());
            out
        })?;
        buf.copy_from_slice(&sum);
        Ok(())
    }
    fn all_gather_u64(&self, mine: &[u64]) -> Result<Vec<u64>> {
        count(mine.len() * self.size, "all-gather")?;
        let (send, size) = (mine.to_vec(), self.size);
        self.run("all-gather", 8 * mine.len(), move |w| {
            let mut out = vec![0u64; send.len() * size];
            w.all_gather_into(&send[..], &mut out[..]);
            out
        })
    }
    fn all_to_all_f32(&self, send: &[Vec<f32>]) -> Result<Vec<Vec<f32>>> {
        if send.len() != self.size {
            return Err(Error::Input(format!("all-to-all: {} send buffers for {} ranks", send.len(), self.size)));
        }
        let send_counts = send.iter().map(|s| count(s.len(), "all-to-all")).collect::<Result<Vec<Count>>>()?;
        let flat: Vec<f32> = send.concat();
        count(flat.len(), "all-to-all")?;
        let to_others = flat.len() - send[self.rank].len();
        let size = self.size;
        let (recv, recv_counts) = self.run("all-to-all", 4 * to_others, move |w| -> Result<(Vec<f32>, Vec<Count>)> {
            let mut recv_counts = vec![0 as Count; size];
            w.all_to_all_into(&send_counts[..], &mut recv_counts[..]);
            let total: usize = recv_counts.iter().map(|&c| c as usize).sum();
            count(total, "all-to-all")?;
            let mut recv = vec![0f32; total];
            let (sd, rd) = (displacements(&send_counts), displacements(&recv_counts));
            let s = Partition::new(&flat[..], &send_counts[..], &sd[..]);
            let mut r = PartitionMut::new(&mut recv[..], &recv_counts[..], &rd[..]);
            w.all_to_all_varcount_into(&s, &mut r);
            Ok((recv, recv_counts))
        })??;
        let mut out = Vec::with_capacity(self.size);
        let mut at = 0usize;
        for &c in &recv_counts {
            out.push(recv[at..at + c as usize].to_vec());
            at += c as usize;
        }
        Ok(out)
    }
    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
    fn seconds_in_collectives(&self) -> f64 {
        self.blocked_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }
}
