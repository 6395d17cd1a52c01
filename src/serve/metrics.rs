//! The server's counters, gauges and histograms, rendered in Prometheus' text format
//! (`GET /metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

use crate::moe::MoeStats;

const TTFT_BOUNDS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];
const ITL_BOUNDS: &[f64] = &[0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56];
const BATCH_BOUNDS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0];

#[derive(Debug, Clone)]
struct Histogram {
    bounds: &'static [f64],
    /// Observations at most each bound (not cumulative; summed when rendered).
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram { bounds, counts: vec![0; bounds.len()], sum: 0.0, count: 0 }
    }
    fn observe(&mut self, v: f64) {
        if let Some(i) = self.bounds.iter().position(|&b| v <= b) {
            self.counts[i] += 1;
        }
        self.sum += v;
        self.count += 1;
    }
    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cum = 0;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            let _ = writeln!(out, "{name}_bucket{{le=\"{b}\"}} {cum}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum {}\n{name}_count {}", self.count, self.sum, self.count);
    }
}

#[derive(Debug)]
struct Inner {
    requests: BTreeMap<(&'static str, u16), u64>,
    prompt_tokens: u64,
    generation_tokens: u64,
    queue_depth: usize,
    running: usize,
    batch_size: Histogram,
    ttft: Histogram,
    itl: Histogram,
    /// (layer index, tokens per expert) of each MoE layer, summed over every pass.
    expert_tokens: BTreeMap<usize, Vec<u64>>,
    dropped_tokens: u64,
}

/// Shared by the HTTP handlers and the engine; every update takes a short lock.
#[derive(Debug)]
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                requests: BTreeMap::new(),
                prompt_tokens: 0,
                generation_tokens: 0,
                queue_depth: 0,
                running: 0,
                batch_size: Histogram::new(BATCH_BOUNDS),
                ttft: Histogram::new(TTFT_BOUNDS),
                itl: Histogram::new(ITL_BOUNDS),
                expert_tokens: BTreeMap::new(),
                dropped_tokens: 0,
            }),
        }
    }
}

impl Metrics {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        f(&mut self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }
    pub fn request(&self, endpoint: &'static str, status: u16) {
        self.with(|m| *m.requests.entry((endpoint, status)).or_default() += 1);
    }
    pub fn prompt_tokens(&self, n: usize) {
        self.with(|m| m.prompt_tokens += n as u64);
    }
    pub fn generated_token(&self, since_previous: Option<f64>) {
        self.with(|m| {
            m.generation_tokens += 1;
            if let Some(s) = since_previous {
                m.itl.observe(s);
            }
        });
    }
    pub fn first_token(&self, seconds: f64) {
        self.with(|m| m.ttft.observe(seconds));
    }
    pub fn decode_step(&self, batch: usize) {
        self.with(|m| m.batch_size.observe(batch as f64));
    }
    pub fn occupancy(&self, queue_depth: usize, running: usize) {
        self.with(|m| {
            m.queue_depth = queue_depth;
            m.running = running;
        });
    }
    pub fn moe(&self, stats: &[MoeStats]) {
        if stats.is_empty() {
            return;
        }
        self.with(|m| {
            for s in stats {
                let row = m.expert_tokens.entry(s.layer).or_insert_with(|| vec![0; s.tokens_per_expert.len()]);
                for (acc, &t) in row.iter_mut().zip(&s.tokens_per_expert) {
                    *acc += t as u64;
                }
                m.dropped_tokens += s.dropped as u64;
            }
        });
    }

    /// Prometheus' text exposition format.
    pub fn render(&self) -> String {
        let m = self.with(|m| {
            (m.requests.clone(), m.prompt_tokens, m.generation_tokens, m.queue_depth, m.running, m.batch_size.clone(), m.ttft.clone(), m.itl.clone(), m.expert_tokens.clone(), m.dropped_tokens)
        });
        let (requests, prompt, generated, queue, running, batch, ttft, itl, experts, dropped) = m;
        let mut out = String::new();
        let _ = writeln!(out, "# HELP nanomoe_requests_total HTTP requests answered, by endpoint and status.\n# TYPE nanomoe_requests_total counter");
        for ((ep, status), n) in &requests {
            let _ = writeln!(out, "nanomoe_requests_total{{endpoint=\"{ep}\",status=\"{status}\"}} {n}");
        }
        let counter = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(&mut out, "nanomoe_prompt_tokens_total", "Prompt tokens prefilled.", prompt);
        counter(&mut out, "nanomoe_generation_tokens_total", "Tokens generated.", generated);
        gauge(&mut out, "nanomoe_queue_depth", "Requests waiting for a slot.", queue);
        gauge(&mut out, "nanomoe_running_sequences", "Sequences in the running batch (prefilling or decoding).", running);
        batch.render(&mut out, "nanomoe_batch_size", "Sequences per decoding step.");
        ttft.render(&mut out, "nanomoe_time_to_first_token_seconds", "From a request's arrival to its first generated token.");
        itl.render(&mut out, "nanomoe_inter_token_latency_seconds", "Between consecutive tokens of one sequence.");
        let _ = writeln!(out, "# HELP nanomoe_expert_tokens_total Tokens routed to each expert of each MoE layer.\n# TYPE nanomoe_expert_tokens_total counter");
        for (layer, row) in &experts {
            for (e, n) in row.iter().enumerate() {
                let _ = writeln!(out, "nanomoe_expert_tokens_total{{layer=\"{layer}\",expert=\"{e}\"}} {n}");
            }
        }
        if !experts.is_empty() {
            counter(&mut out, "nanomoe_expert_dropped_tokens_total", "Token-expert assignments dropped by capacity (0 when routing is dropless).", dropped);
        }
        out
    }
}
