//! The continuous-batching engine: one thread of the compute pool owns the model and runs
//! steps forever. Each step admits waiting requests into free slots, then decodes one token
//! for every running sequence in packed passes ([`GPT::forward_packed`]). Admitted prompts
//! whose last chunk is all that is left ride in those passes - in the last one's free rows,
//! then in up to `JOIN_PASSES` (4) passes more - and start (their first tokens sent) when
//! the step's last pass is done, so prompts that arrive together start together and get
//! their second tokens one step later; otherwise the step first prefills one chunk of the
//! oldest prompt in a pass of its own. Requests join and leave at token boundaries; each sequence
//! has its own KV cache; a request whose client went away (its event channel closed) or
//! whose choice hit a stop string is dropped before the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use candle_core::DType;
use rand::{rngs::StdRng, SeedableRng};
use rayon::prelude::*;
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;
use crate::generate::{next_token_of, GenerationConfig};
use crate::gpt::{KvCache, PackedSeq, GPT, MAX_PACKED_TOKENS};

/// A token's log-probability under the model (log-softmax of its raw logits), with the
/// most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: u32,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// The eos token (or, decided by the HTTP side, a stop string).
    Stop,
    /// max_tokens reached.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

#[derive(Debug)]
pub enum Event {
    /// The prompt's own log-probabilities (first None), when asked for.
    Prompt { choice_base: usize, logprobs: Vec<Option<TokenLogprob>> },
    Token { choice: usize, id: u32, logprob: Option<TokenLogprob> },
    Done { choice: usize, finish: Finish },
    Error { message: String },
}

/// One prompt to complete `n` times (choices `choice_base..choice_base + n`).
pub struct Job {
    pub prompt: Vec<u32>,
    pub n: usize,
    pub choice_base: usize,
    /// Sampling settings; `max_new_tokens` is the request's max_tokens.
    pub gen: GenerationConfig,
    /// Log-probabilities of each generated token with this many alternatives.
    pub logprobs: Option<usize>,
    pub prompt_logprobs: bool,
    pub events: UnboundedSender<Event>,
    /// Set by the HTTP side per choice (index - choice_base) once a stop string matched.
    pub stopped: Arc<Vec<AtomicBool>>,
    pub arrived: Instant,
}

impl Job {
    fn gone(&self) -> bool {
        self.events.is_closed()
    }
}

#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// Most sequences (choices) running at once.
    pub max_batch: usize,
    /// Most requests waiting for a slot; more are refused at once.
    pub max_queue: usize,
    /// Prompt tokens per prefill pass.
    pub prefill_chunk: usize,
}

/// What the HTTP side holds: a way in, and the counters it needs to refuse work.
pub struct EngineHandle {
    tx: mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    draining: Arc<AtomicBool>,
    pub options: EngineOptions,
}

/// Why a request was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    QueueFull(usize),
    /// More prompts in one request than the queue holds: it could never be queued.
    TooMany(usize),
    ShuttingDown,
}

impl EngineHandle {
    /// Queues the jobs of one request, all or none.
    pub fn submit(&self, jobs: Vec<Job>) -> Result<(), Refused> {
        if self.is_draining() {
            return Err(Refused::ShuttingDown);
        }
        let n = jobs.len();
        let max = self.options.max_queue;
        if n > max {
            return Err(Refused::TooMany(n));
        }
        self.waiting
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |w| (w + n <= max).then_some(w + n))
            .map_err(Refused::QueueFull)?;
        for job in jobs {
            if self.tx.send(job).is_err() {
                return Err(Refused::ShuttingDown);
            }
        }
        Ok(())
    }

    /// Stops taking requests: waiting ones are refused, running ones finish.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }
}

/// Most passes of their own that joining prompts may add to a decoding step (see
/// [`Engine::joining`]): a bound on how long the running sequences wait for them.
const JOIN_PASSES: usize = 4;

/// A prompt being prefilled.
struct Prefill {
    job: Job,
    cache: KvCache,
    done: usize,
    prompt_lp: Vec<Option<TokenLogprob>>,
}

impl Prefill {
    /// The prompt's tokens not yet prefilled.
    fn rest(&self) -> &[u32] {
        &self.job.prompt[self.done..]
    }
}

/// Joining prompts as one step lays them out (see [`Engine::joining`]): those that ride in
/// the running sequences' last pass, then the passes of their own.
#[derive(Default)]
struct Joining {
    riding: Vec<Prefill>,
    own: Vec<Vec<Prefill>>,
}

/// A choice being decoded.
struct Seq {
    events: UnboundedSender<Event>,
    stopped: Arc<Vec<AtomicBool>>,
    /// Index into `stopped`.
    local: usize,
    choice: usize,
    gen: GenerationConfig,
    logprobs: Option<usize>,
    cache: KvCache,
    /// Prompt + generated tokens (the repetition penalty's context).
    context: Vec<u32>,
    generated: usize,
    rng: StdRng,
    last_token_at: Instant,
    arrived: Instant,
    finished: bool,
}

impl Seq {
    fn gone(&self) -> bool {
        self.events.is_closed() || self.stopped[self.local].load(Ordering::SeqCst)
    }

    /// The next token from this sequence's logits (processed as `generate` processes them),
    /// with its log-probability when the request asked for them.
    fn pick(&mut self, row: &[f32]) -> crate::Result<(u32, Option<TokenLogprob>)> {
        let lp = self.logprobs.map(|top| (log_softmax(row), top));
        let id = next_token_of(row, &self.context, &self.gen, &mut self.rng)?;
        Ok((id, lp.map(|(lp, top)| token_logprob(&lp, id, top))))
    }
}

/// Starts the engine on its own thread of the compute pool.
pub fn start(model: GPT, options: EngineOptions, metrics: Arc<Metrics>) -> (EngineHandle, std::thread::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel();
    let waiting = Arc::new(AtomicUsize::new(0));
    let draining = Arc::new(AtomicBool::new(false));
    let mut engine = Engine { model, options: options.clone(), metrics, rx, waiting: waiting.clone(), draining: draining.clone(), queue: VecDeque::new(), prefills: VecDeque::new(), running: Vec::new() };
    let thread = std::thread::Builder::new()
        .name("nanomoe-engine".into())
        .spawn(move || crate::runtime::on_compute_pool(move || engine.run()))
        .expect("spawning the engine thread");
    (EngineHandle { tx, waiting, draining, options }, thread)
}

struct Engine {
    model: GPT,
    options: EngineOptions,
    metrics: Arc<Metrics>,
    rx: mpsc::Receiver<Job>,
    waiting: Arc<AtomicUsize>,
    draining: Arc<AtomicBool>,
    queue: VecDeque<Job>,
    prefills: VecDeque<Prefill>,
    running: Vec<Seq>,
}

/// log-softmax of one row, computed in f64.
fn log_softmax(row: &[f32]) -> Vec<f32> {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
    let lse = max + row.iter().map(|&l| (l as f64 - max).exp()).sum::<f64>().ln();
    row.iter().map(|&l| (l as f64 - lse) as f32).collect()
}

fn token_logprob(lp: &[f32], id: u32, top: usize) -> TokenLogprob {
    let mut order: Vec<u32> = (0..lp.len() as u32).collect();
    let top = top.min(lp.len());
    if top > 0 {
        order.select_nth_unstable_by(top - 1, |&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
        order.truncate(top);
        order.sort_by(|&a, &b| lp[b as usize].total_cmp(&lp[a as usize]).then(a.cmp(&b)));
    }
    TokenLogprob { id, logprob: lp[id as usize], top: order.iter().take(top).map(|&t| (t, lp[t as usize])).collect() }
}

impl Engine {
    fn run(&mut self) {
        let mut hot = None;
        loop {
            let idle = self.queue.is_empty() && self.prefills.is_empty() && self.running.is_empty();
            if idle {
                hot = None;
                match self.rx.recv() {
                    Ok(job) => self.queue.push_back(job),
                    Err(_) => return, // every handle dropped: the server is gone
                }
            }
            while let Ok(job) = self.rx.try_recv() {
                self.queue.push_back(job);
            }
            // The pool's other workers stay awake while there is work (see HotWorkers).
            if hot.is_none() {
                hot = Some(crate::runtime::keep_workers_hot());
            }
            let step = crate::runtime::catch_panic(|| self.step());
            let failure = match step {
                Ok(Ok(())) => None,
                Ok(Err(e)) => Some(e.to_string()),
                Err(panic) => Some(format!("internal error: {panic}")),
            };
            if let Some(message) = failure {
                // The step's sequences cannot continue: tell their clients and drop them.
                for p in self.prefills.drain(..) {
                    let _ = p.job.events.send(Event::Error { message: message.clone() });
                }
                for s in self.running.drain(..) {
                    let _ = s.events.send(Event::Error { message: message.clone() });
                }
            }
            self.metrics.occupancy(self.queue.len(), self.used_slots());
        }
    }

    fn step(&mut self) -> crate::Result<()> {
        self.admit();
        // Sequences and prompts whose clients left are dropped before this step's passes
        // are laid out.
        self.running.retain(|s| !s.gone());
        while self.prefills.front().is_some_and(|p| p.job.gone()) {
            self.prefills.pop_front();
        }
        let joining = self.joining();
        if joining.riding.is_empty() && joining.own.is_empty() {
            self.prefill_one()?;
        }
        self.decode(joining)
    }

    /// The admitted prompts, oldest first, whose last chunk can ride in this step's decoding
    /// passes: each chunk whole in one pass of at most MAX_PACKED_TOKENS rows (so the kernels
    /// and the chunk boundaries are those a pass of its own would use), after the running
    /// sequences' rows, and at most JOIN_PASSES passes beyond those the running sequences
    /// need. Prompts that arrive together then start together: the sequences already
    /// running wait for one longer step instead of one per prompt. Prompts that want prompt
    /// logprobs take passes of their own.
    fn joining(&mut self) -> Joining {
        let mut room_in_last = match self.running.len() {
            0 => 0,
            n => MAX_PACKED_TOKENS - ((n - 1) % MAX_PACKED_TOKENS + 1),
        };
        let mut joining = Joining::default();
        while let Some(p) = self.prefills.front() {
            let rest = p.rest().len();
            if p.job.prompt_logprobs || rest == 0 || rest > self.options.prefill_chunk || rest > MAX_PACKED_TOKENS {
                break;
            }
            if rest > room_in_last {
                if joining.own.len() == JOIN_PASSES {
                    break;
                }
                joining.own.push(Vec::new());
                room_in_last = MAX_PACKED_TOKENS;
            }
            room_in_last -= rest;
            let p = self.prefills.pop_front().expect("front exists");
            joining.own.last_mut().unwrap_or(&mut joining.riding).push(p);
        }
        joining
    }

    fn used_slots(&self) -> usize {
        self.running.len() + self.prefills.iter().map(|p| p.job.n).sum::<usize>()
    }

    /// Moves waiting requests into free slots (first come, first served), dropping those
    /// whose clients left; refuses them all once the server drains.
    fn admit(&mut self) {
        let draining = self.draining.load(Ordering::SeqCst);
        let mut kept = VecDeque::with_capacity(self.queue.len());
        for job in self.queue.drain(..) {
            if job.gone() {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
            } else if draining {
                self.waiting.fetch_sub(1, Ordering::SeqCst);
                let _ = job.events.send(Event::Error { message: "the server is shutting down".into() });
            } else {
                kept.push_back(job);
            }
        }
        self.queue = kept;
        while let Some(job) = self.queue.front() {
            if self.used_slots() + job.n > self.options.max_batch {
                break;
            }
            let job = self.queue.pop_front().expect("front exists");
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            // Room for the whole completion up front: no sequence's buffers double mid-batch.
            let cache = KvCache::with_capacity(job.prompt.len().saturating_add(job.gen.max_new_tokens));
            self.prefills.push_back(Prefill { job, cache, done: 0, prompt_lp: Vec::new() });
        }
    }

    /// One chunk of the oldest admitted prompt; when it completes, its choices start.
    fn prefill_one(&mut self) -> crate::Result<()> {
        let Some(p) = self.prefills.front_mut() else { return Ok(()) };
        let total = p.job.prompt.len();
        let end = (p.done + self.options.prefill_chunk).min(total);
        let chunk = &p.job.prompt[p.done..end];
        let (last, all, stats) = self.model.prefill(chunk, &mut p.cache, p.job.prompt_logprobs)?;
        self.metrics.moe(&stats);
        self.metrics.prompt_tokens(chunk.len());
        if let Some(all) = all {
            let rows: Vec<Vec<f32>> = all.to_dtype(DType::F32)?.to_vec2()?;
            let top = p.job.logprobs.unwrap_or(0);
            if p.done == 0 {
                p.prompt_lp.push(None);
            }
            // Row i predicts prompt token done + i + 1.
            for (i, row) in rows.iter().enumerate() {
                if let Some(&next) = p.job.prompt.get(p.done + i + 1) {
                    p.prompt_lp.push(Some(token_logprob(&log_softmax(row), next, top)));
                }
            }
        }
        p.done = end;
        if end < total {
            return Ok(());
        }
        let p = self.prefills.pop_front().expect("front exists");
        let logits: Vec<f32> = last.to_dtype(DType::F32)?.to_vec1()?;
        for seq in self.start(p, logits)? {
            self.running.push(seq);
        }
        Ok(())
    }

    /// The choices of a prompt whose prefill is complete, each with its first token sent
    /// (from `logits`, the prompt's last position); those that have not finished with it.
    fn start(&self, p: Prefill, logits: Vec<f32>) -> crate::Result<Vec<Seq>> {
        let Prefill { job, cache, prompt_lp, .. } = p;
        if job.prompt_logprobs {
            let _ = job.events.send(Event::Prompt { choice_base: job.choice_base, logprobs: prompt_lp });
        }
        let mut started = Vec::with_capacity(job.n);
        let mut caches = vec![cache];
        for _ in 1..job.n {
            caches.push(caches[0].clone());
        }
        for (local, cache) in caches.into_iter().enumerate() {
            let seed = job.gen.seed.map(|s| s.wrapping_add(local as u64));
            let mut seq = Seq {
                events: job.events.clone(),
                stopped: job.stopped.clone(),
                local,
                choice: job.choice_base + local,
                gen: job.gen.clone(),
                logprobs: job.logprobs,
                cache,
                context: job.prompt.clone(),
                generated: 0,
                rng: match seed {
                    Some(s) => StdRng::seed_from_u64(s),
                    None => StdRng::from_os_rng(),
                },
                last_token_at: Instant::now(),
                arrived: job.arrived,
                finished: false,
            };
            if self.emit(&mut seq, &logits)? {
                started.push(seq);
            }
        }
        Ok(started)
    }

    /// Samples the next token of `seq` from its logits and sends it; false when the
    /// sequence has finished.
    fn emit(&self, seq: &mut Seq, logits: &[f32]) -> crate::Result<bool> {
        let (id, logprob) = seq.pick(logits)?;
        Ok(self.deliver(seq, id, logprob))
    }

    /// Sends the token `seq` picked; false when the sequence has finished.
    fn deliver(&self, seq: &mut Seq, id: u32, logprob: Option<TokenLogprob>) -> bool {
        let now = Instant::now();
        if seq.generated == 0 {
            self.metrics.first_token(now.duration_since(seq.arrived).as_secs_f64());
            self.metrics.generated_token(None);
        } else {
            self.metrics.generated_token(Some(now.duration_since(seq.last_token_at).as_secs_f64()));
        }
        seq.last_token_at = now;
        seq.generated += 1;
        seq.context.push(id);
        let _ = seq.events.send(Event::Token { choice: seq.choice, id, logprob });
        let finish = if Some(id) == seq.gen.eos_token_id {
            Some(Finish::Stop)
        } else if seq.generated >= seq.gen.max_new_tokens || seq.context.len() >= self.model.config.block_size {
            Some(Finish::Length)
        } else {
            None
        };
        if let Some(finish) = finish {
            let _ = seq.events.send(Event::Done { choice: seq.choice, finish });
            return false;
        }
        true
    }

    /// One token for every running sequence, in packed passes of at most
    /// MAX_PACKED_TOKENS rows (each sequence's result is the same in any pass); `joining`,
    /// prompts' last chunks, ride in the passes [`Engine::joining`] laid out, and their
    /// choices start from these passes.
    fn decode(&mut self, joining: Joining) -> crate::Result<()> {
        if self.running.is_empty() && joining.own.is_empty() {
            return Ok(());
        }
        if !self.running.is_empty() {
            self.metrics.decode_step(self.running.len());
        }
        let mut running = std::mem::take(&mut self.running);
        // Passes: running[a..b] and the joining prompts that ride along.
        let mut passes: Vec<(usize, usize, Vec<Prefill>)> = (0..running.len()).step_by(MAX_PACKED_TOKENS).map(|a| (a, (a + MAX_PACKED_TOKENS).min(running.len()), Vec::new())).collect();
        if let Some((_, _, last)) = passes.last_mut() {
            *last = joining.riding;
        }
        let n = running.len();
        passes.extend(joining.own.into_iter().map(|js| (n, n, js)));
        let mut result = Ok(());
        let mut started = Vec::new();
        // Joining prompts whose passes are done, with their last positions' logits.
        let mut prefilled = Vec::new();
        // Joining prompts that did not start (a pass or a start failed): back to the queue,
        // in order, so that the failure reaches their clients too.
        let mut unstarted = Vec::new();
        for (a, b, mut join) in passes {
            if result.is_err() {
                unstarted.extend(join);
                continue;
            }
            let group = &mut running[a..b];
            let last: Vec<[u32; 1]> = group.iter().map(|s| [*s.context.last().expect("a prompt")]).collect();
            let step = {
                let mut packed: Vec<PackedSeq> = group.iter_mut().zip(&last).map(|(s, t)| PackedSeq { ids: t, cache: &mut s.cache }).collect();
                for p in join.iter_mut() {
                    packed.push(PackedSeq { ids: &p.job.prompt[p.done..], cache: &mut p.cache });
                }
                self.model.forward_packed(&mut packed)
            };
            let logits = step.and_then(|(logits, stats)| {
                self.metrics.moe(&stats);
                Ok(logits.to_dtype(DType::F32)?)
            });
            // The running sequences' next tokens, picked in parallel (a vocabulary scan per
            // sequence, and a sort when sampling with top-k or top-p), then sent in order;
            // and the joining prompts' rows.
            let picked = logits.and_then(|logits| {
                let v = logits.dim(1)?;
                Ok(crate::kernels::with_f32(&logits, "serve", |flat| {
                    let (own, joined) = flat.split_at(group.len() * v);
                    let picks: Vec<_> = group.par_iter_mut().zip(own.par_chunks(v)).map(|(seq, row)| seq.pick(row)).collect();
                    Ok((picks, joined.chunks(v).map(<[f32]>::to_vec).collect::<Vec<_>>()))
                })?)
            });
            let (picks, rows) = match picked {
                Ok(p) => p,
                Err(e) => {
                    unstarted.extend(join);
                    result = Err(e);
                    continue;
                }
            };
            // One row per sequence: the group's, then each joining prompt's last position
            // (kept for the end of the step).
            for (p, row) in join.into_iter().zip(rows) {
                self.metrics.prompt_tokens(p.rest().len());
                prefilled.push((p, row));
            }
            for (seq, pick) in group.iter_mut().zip(picks) {
                match pick {
                    Ok((id, logprob)) => seq.finished = !self.deliver(seq, id, logprob),
                    Err(e) => {
                        let _ = seq.events.send(Event::Error { message: e.to_string() });
                        seq.finished = true;
                    }
                }
            }
        }
        // The joining prompts' choices start (their first tokens sent) when the step's last
        // pass is done: one started after the first of five passes would otherwise wait
        // out the other four for its second token, in the next step (as the sequences
        // running before the step do once, in any case).
        // (Not after a failed pass: the failure reaches every client of the step.)
        let mut prefilled = prefilled.into_iter();
        if result.is_ok() {
            for (p, row) in prefilled.by_ref() {
                match self.start(p, row) {
                    Ok(seqs) => started.extend(seqs),
                    Err(e) => {
                        result = Err(e);
                        break;
                    }
                }
            }
        }
        let back: Vec<Prefill> = prefilled.map(|(p, _)| p).chain(unstarted).collect();
        for p in back.into_iter().rev() {
            self.prefills.push_front(p);
        }
        running.retain(|s| !s.finished);
        running.extend(started);
        self.running = running;
        result
    }
}
