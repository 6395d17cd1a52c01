//! Text generation: HF-style `generate` with a KV cache, and nanoGPT's `generate`.
//!
//! Logits processors run in transformers' order: repetition penalty, then temperature,
//! top-k, top-p, min-p. When a sequence would pass `block_size`, the context is cropped
//! to its last `block_size` tokens and re-encoded (as nanoGPT crops `idx`), so cached
//! and uncached generation stay identical.

use candle_core::Tensor;
use rand::{rngs::StdRng, Rng, SeedableRng};

use crate::error::{input_err, Result};
use crate::gpt::{ids_from_tensor, KvCache, GPT};

#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    pub max_new_tokens: usize,
    /// Sample from the processed distribution; false = greedy (argmax). Unlike
    /// transformers, sampling is the default, as in nanoGPT's sample.py.
    pub do_sample: bool,
    pub temperature: f64,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub min_p: Option<f64>,
    /// > 1 discourages tokens already in the sequence (CTRL, Keskar et al. 2019).
    pub repetition_penalty: f64,
    /// Stop a sequence once it emits this id.
    pub eos_token_id: Option<u32>,
    /// Id used to left-pad prompts of different lengths (default: eos, else 0).
    pub pad_token_id: Option<u32>,
    /// Same seed, same output. None: seeded from the OS.
    pub seed: Option<u64>,
    pub use_cache: bool,
    /// Prompts are run through the model at most this many tokens at a time (with the KV
    /// cache): bounds the activations of long prompts, and is what `nanomoe serve` does,
    /// whose output equals `generate`'s for the same chunk size.
    pub prefill_chunk: usize,
}

/// Default of [`GenerationConfig::prefill_chunk`].
pub const DEFAULT_PREFILL_CHUNK: usize = 512;

impl Default for GenerationConfig {
    fn default() -> Self {
        GenerationConfig {
            max_new_tokens: 20,
            do_sample: true,
            temperature: 1.0,
            top_k: None,
            top_p: None,
            min_p: None,
            repetition_penalty: 1.0,
            eos_token_id: None,
            pad_token_id: None,
            seed: None,
            use_cache: true,
            prefill_chunk: DEFAULT_PREFILL_CHUNK,
        }
    }
}

impl GenerationConfig {
    pub fn greedy(max_new_tokens: usize) -> Self {
        GenerationConfig { max_new_tokens, do_sample: false, ..Default::default() }
    }

    pub fn validate(&self) -> Result<()> {
        if self.do_sample && !(self.temperature > 0.0 && self.temperature.is_finite()) {
            return Err(input_err!("temperature must be > 0 when sampling, got {}", self.temperature));
        }
        if self.top_k == Some(0) {
            return Err(input_err!("top_k must be at least 1"));
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err(input_err!("top_p must be in (0, 1], got {p}"));
            }
        }
        if let Some(p) = self.min_p {
            if !(0.0..=1.0).contains(&p) {
                return Err(input_err!("min_p must be in [0, 1], got {p}"));
            }
        }
        if self.prefill_chunk == 0 {
            return Err(input_err!("prefill_chunk must be at least 1"));
        }
        if !(self.repetition_penalty > 0.0) {
            return Err(input_err!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// Applies the configured processors to one row of logits in place, then picks a token.
/// NaN or +Inf logits are an error (they would otherwise silently pick token 0).
pub(crate) fn next_token(logits: &mut [f32], context: &[u32], cfg: &GenerationConfig, rng: &mut StdRng) -> Result<u32> {
    if !all_finite_or_neg_inf(logits) {
        let i = logits.iter().position(|&l| unusable(l)).unwrap_or(0);
        return Err(crate::error::Error::Msg(format!(
            "the model's logits are not finite (token {i}: {}): its weights hold NaN or Inf values, or its activations overflowed",
            logits[i]
        )));
    }
    Ok(pick_token(logits, context, cfg, rng))
}

/// [`next_token`] of a row of raw logits, which it leaves as they are: greedy picks with no
/// repetition penalty read the row where it lies, in one pass that checks it and finds its
/// largest logit (a serving step picks 16 rows of 50k), the other settings a copy.
pub(crate) fn next_token_of(row: &[f32], context: &[u32], cfg: &GenerationConfig, rng: &mut StdRng) -> Result<u32> {
    if cfg.repetition_penalty == 1.0 {
        if !cfg.do_sample {
            return greedy(row);
        }
        // top-k as `pick_token` applies it: only below the vocabulary's size.
        let picked = match cfg.top_k.filter(|&k| k < row.len()) {
            None => whole_probs(row, cfg.temperature as f32).map(|probs| draw_from(probs, cfg, rng)),
            Some(0) => None,
            Some(_) => sample_top_k(row, cfg, rng),
        };
        if let Some(id) = picked {
            return Ok(id);
        }
    }
    next_token(&mut row.to_vec(), context, cfg, rng)
}

/// The raw row's largest logit for sampling at temperature `temp` on it in place: None
/// when the row needs `next_token`'s other paths - an unusable logit (its error), every
/// logit -Inf, or a temperature that is not a positive finite number.
fn sampling_max(row: &[f32], temp: f32) -> Option<f32> {
    if !(temp > 0.0 && temp.is_finite()) {
        return None;
    }
    checked_max(row).map(|(max, _)| max).filter(|&max| max != f32::NEG_INFINITY)
}

/// [`pick_token`]'s probabilities for sampling over the whole vocabulary (no top-k, no
/// penalty: what a client that sends only a temperature, or top-p or min-p, asks for) from a
/// row it leaves as it is. The processed logits (l - max) / T go straight into the buffer
/// the softmax works in, the row checked and its maximum found in the same scan as the
/// greedy pick: gone are the copy of the row, a processing pass over it, a scan for -Inf and
/// the softmax's own copy. The same values through the same softmax: the same bits, then
/// the same draw. None when the row needs `next_token`'s other paths: an unusable logit (its
/// error), every logit -Inf, a processed logit of -Inf (a masked token, or one the
/// processing sends there: `pick_token` then draws among the others alone), or a
/// temperature that is not a positive finite number.
fn whole_probs(row: &[f32], temp: f32) -> Option<Vec<f32>> {
    let max = sampling_max(row, temp)?;
    let mut probs = crate::kernels::for_overwrite(row.len());
    let mut dead = false;
    for (p, &l) in probs.iter_mut().zip(row) {
        let v = (l - max) / temp;
        dead |= v == f32::NEG_INFINITY;
        *p = v;
    }
    if dead {
        return None;
    }
    softmax_in_place(&mut probs);
    Some(probs)
}

/// [`pick_token`]'s sampling with top-k (no penalty) on a row it leaves as it is, without
/// the processed copy (l - max) / T that four more scans then read. The processing is
/// monotone (never reverses two logits, in `total_cmp`'s order too), so the k-th largest
/// processed logit is the processed k-th largest raw one, found on the raw row; the tokens
/// `pick_token` keeps - processed logit not below it and not -Inf - are the raw logits at or
/// above the raw k-th, and any just below it that the rounding of the processing makes equal
/// (found among the few raw logits within a margin far wider than that rounding). Their
/// processed logits are computed as `pick_token` computes them, in id order, and drawn from
/// in the same way: the same token from the same random numbers. None (nothing drawn) when
/// the row needs `next_token`'s other paths: an unusable logit (its error), every logit
/// -Inf, or a temperature that is not a positive finite number.
fn sample_top_k(row: &[f32], cfg: &GenerationConfig, rng: &mut StdRng) -> Option<u32> {
    let k = cfg.top_k?;
    let temp = cfg.temperature as f32;
    let max = sampling_max(row, temp)?;
    let t = |l: f32| (l - max) / temp;
    let raw_kth = kth_largest_isa(row, k);
    let kth = t(raw_kth);
    // Raw logits below `lo` process to less than `kth`: (l - max) / T rounds at most half an
    // ulp twice, far inside 2^-16 of the magnitudes involved.
    let lo = if raw_kth == f32::NEG_INFINITY { f32::NEG_INFINITY } else { raw_kth - (raw_kth.abs() + max.abs() + (raw_kth - max).abs()) * f32::powi(2.0, -16) - f32::MIN_POSITIVE };
    let mut live = Vec::with_capacity(k + 8);
    let mut compact = Vec::with_capacity(k + 8);
    let mut keep = |i: usize, l: f32| {
        let v = t(l);
        if v >= kth && v != f32::NEG_INFINITY {
            live.push(i as u32);
            compact.push(v);
        }
    };
    let chunks = row.chunks_exact(SCAN);
    let tail = row.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        if chunk.iter().fold(false, |any, &l| any | (l >= lo)) {
            for (i, &l) in chunk.iter().enumerate() {
                if l >= lo {
                    keep(c * SCAN + i, l);
                }
            }
        }
    }
    for (i, &l) in row[tail..].iter().enumerate() {
        if l >= lo {
            keep(tail + i, l);
        }
    }
    Some(live[draw(&compact, cfg, rng) as usize])
}

// The k-th largest's skip test over 16 logits at a time in one AVX-512 compare.
crate::kernels::math::multiversion!(fn kth_largest_isa(v: &[f32], k: usize) -> f32 => kth_largest);

/// [`next_token`] with greedy settings and no penalty: the same checks, the same error and
/// the same token as [`all_finite_or_neg_inf`] and then [`argmax`], in one scan.
fn greedy(v: &[f32]) -> Result<u32> {
    match checked_max(v) {
        Some((_, first)) => Ok(first),
        // Its error, naming the first unusable logit.
        None => next_token(&mut v.to_vec(), &[], &GenerationConfig::greedy(1), &mut StdRng::seed_from_u64(0)),
    }
}

/// The largest logit of v (`math::max`'s value: the same lanes and folds) and argmax's
/// first index of it (0 when every logit is -Inf, or there are none), in one scan; None
/// when a logit is unusable (NaN or +Inf). Each lane keeps the index where its maximum
/// first appeared (a strictly larger value replaces it, so that is the lane's first value
/// equal to its maximum); the first index of the largest logit is the least of those of the
/// lanes that hold it, else the tail's.
fn checked_max(v: &[f32]) -> Option<(f32, u32)> {
    let (lanes, at, bad) = greedy_scan(v);
    let tail = v.len() - v.len() % SCAN;
    let rest = &v[tail..];
    if bad || rest.iter().any(|&l| unusable(l)) {
        return None;
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    if max == f32::NEG_INFINITY {
        return Some((max, 0));
    }
    let first = (0..SCAN).filter(|&i| lanes[i] == max).map(|i| at[i]).min();
    let in_rest = rest.iter().position(|&x| x == max).map(|i| (tail + i) as u32);
    Some((max, first.or(in_rest).unwrap_or(0)))
}

/// [`checked_max`]'s scan of v's whole SCAN-lane chunks: each lane's maximum, the index where it
/// first appeared, and whether any logit was unusable.
#[inline(always)]
fn greedy_scan_body(v: &[f32]) -> ([f32; SCAN], [u32; SCAN], bool) {
    let mut lanes = [f32::NEG_INFINITY; SCAN];
    let mut at = [0u32; SCAN];
    let mut bad = [false; SCAN];
    for (j, c) in v.chunks_exact(SCAN).enumerate() {
        let base = (j * SCAN) as u32;
        for i in 0..SCAN {
            bad[i] |= unusable(c[i]);
            let up = c[i] > lanes[i];
            lanes[i] = if up { c[i] } else { lanes[i] };
            at[i] = if up { base + i as u32 } else { at[i] };
        }
    }
    (lanes, at, bad.iter().any(|&b| b))
}

crate::kernels::math::multiversion!(fn greedy_scan_portable(v: &[f32]) -> ([f32; SCAN], [u32; SCAN], bool) => greedy_scan_body);

/// [`greedy_scan_body`] for this CPU: in one AVX-512 register each where it has them (the
/// compiled loop kept the lanes on the stack, a masked store and a reload every 16 logits),
/// else the loop compiled for AVX2 or the baseline.
fn greedy_scan(v: &[f32]) -> ([f32; SCAN], [u32; SCAN], bool) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { greedy_scan_zmm(v) };
    }
    greedy_scan_portable(v)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn greedy_scan_zmm(v: &[f32]) -> ([f32; SCAN], [u32; SCAN], bool) {
    use std::arch::x86_64::*;
    let mut lanes = _mm512_set1_ps(f32::NEG_INFINITY);
    let mut at = _mm512_setzero_si512();
    let mut idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    let (step, inf) = (_mm512_set1_epi32(SCAN as i32), _mm512_set1_ps(f32::INFINITY));
    let mut bad: __mmask16 = 0;
    for c in v.chunks_exact(SCAN) {
        let x = _mm512_loadu_ps(c.as_ptr());
        // Unusable: not below +Inf (NaN compares unordered: true).
        bad |= _mm512_cmp_ps_mask::<_CMP_NLT_UQ>(x, inf);
        // c[i] > lanes[i] (false for NaN, as `>`).
        let up = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(x, lanes);
        lanes = _mm512_mask_mov_ps(lanes, up, x);
        at = _mm512_mask_mov_epi32(at, up, idx);
        idx = _mm512_add_epi32(idx, step);
    }
    let (mut l, mut a) = ([0f32; SCAN], [0u32; SCAN]);
    _mm512_storeu_ps(l.as_mut_ptr(), lanes);
    _mm512_storeu_si512(a.as_mut_ptr() as *mut _, at);
    (l, a, bad != 0)
}

/// The greedy next token of every row of `logits` [S, V] (rows scanned in parallel), with
/// [`next_token`]'s check that no logit is NaN or +Inf.
pub fn greedy_tokens(logits: &Tensor) -> Result<Vec<u32>> {
    use rayon::prelude::*;
    let logits = logits.to_dtype(candle_core::DType::F32)?;
    let v = logits.dim(1)?;
    let (cfg, rng) = (GenerationConfig::greedy(1), StdRng::seed_from_u64(0));
    crate::kernels::with_f32(&logits, "greedy_tokens", |flat| {
        Ok(flat.par_chunks(v).map(|row| next_token_of(row, &[], &cfg, &mut rng.clone())).collect::<Vec<_>>())
    })?
    .into_iter()
    .collect()
}

fn pick_token(logits: &mut [f32], context: &[u32], cfg: &GenerationConfig, rng: &mut StdRng) -> u32 {
    if cfg.repetition_penalty != 1.0 {
        let p = cfg.repetition_penalty as f32;
        let mut seen = vec![false; logits.len()];
        for &t in context {
            let t = t as usize;
            if t < logits.len() && !seen[t] {
                seen[t] = true;
                logits[t] = if logits[t] < 0.0 { logits[t] * p } else { logits[t] / p };
            }
        }
    }
    if !cfg.do_sample {
        return argmax(logits);
    }
    // (l - max) / T, not l / T: the same distribution, and a tiny T cannot overflow to
    // Inf - Inf = NaN (it becomes greedy, as the limit says).
    let temp = cfg.temperature as f32;
    let max = crate::kernels::math::max(logits);
    logits.iter_mut().for_each(|l| *l = (*l - max) / temp);
    if let Some(k) = cfg.top_k.filter(|&k| k < logits.len()) {
        let kth = kth_largest(logits, k);
        logits.iter_mut().for_each(|l| *l = if *l < kth { f32::NEG_INFINITY } else { *l });
    }
    // Tokens whose logit is -Inf (top-k's cut, masked tokens) get probability 0 and are
    // never drawn: the rest runs on the others alone, in id order (the same distribution,
    // up to the rounding of the softmax's lane sums; after top-k 40, 40 tokens instead of
    // GPT-2's 50k).
    if !logits.chunks(SCAN).any(|c| c.iter().fold(false, |dead, &l| dead | (l == f32::NEG_INFINITY))) {
        return draw(logits, cfg, rng);
    }
    let live = live_tokens(logits);
    if live.is_empty() {
        return draw(logits, cfg, rng);
    }
    let compact: Vec<f32> = live.iter().map(|&i| logits[i as usize]).collect();
    live[draw(&compact, cfg, rng) as usize]
}

/// The ids whose logit is not -Inf, in order: SCAN lanes at a time, skipping the chunks
/// with none (after top-k 40, nearly all of GPT-2's 50k logits).
fn live_tokens(logits: &[f32]) -> Vec<u32> {
    let mut live = Vec::new();
    let chunks = logits.chunks_exact(SCAN);
    let split = logits.len() - chunks.remainder().len();
    for (c, chunk) in chunks.enumerate() {
        if chunk.iter().fold(false, |any, &l| any | (l != f32::NEG_INFINITY)) {
            live.extend((0..SCAN).filter(|&i| chunk[i] != f32::NEG_INFINITY).map(|i| (c * SCAN + i) as u32));
        }
    }
    live.extend((split..logits.len()).filter(|&i| logits[i] != f32::NEG_INFINITY).map(|i| i as u32));
    live
}

/// The k-th largest of `v` (1 <= k <= v.len()) in `f32::total_cmp`'s order: what a
/// descending sort puts at k - 1. One pass keeps candidates above a threshold that only
/// rises: when 4k have gathered, the k largest of them stay and the smallest of those
/// becomes the threshold (an element not above it cannot move the k-th largest: k kept
/// ones are at least as large). On GPT-2's 50k logits, with k = 40, a few hundred
/// elements pass the threshold; selecting over a copy of all of them took ~0.1 ms per
/// token and sequence.
#[inline(always)]
fn kth_largest(v: &[f32], k: usize) -> f32 {
    use std::cmp::Ordering::Greater;
    debug_assert!(k >= 1 && k <= v.len());
    let desc = |a: &f32, b: &f32| b.total_cmp(a);
    let cap = 4 * k;
    let mut kept: Vec<f32> = Vec::with_capacity(cap);
    let mut floor: Option<f32> = None;
    let mut take = |x: f32, floor: &mut Option<f32>| {
        if floor.is_none_or(|f| x.total_cmp(&f) == Greater) {
            kept.push(x);
            if kept.len() == cap {
                kept.select_nth_unstable_by(k - 1, desc);
                kept.truncate(k);
                *floor = Some(kept[k - 1]);
            }
        }
    };
    // SCAN elements at a time: a chunk whose elements are all below the floor (by `<`,
    // which implies below in total order) is skipped after one vector compare.
    let chunks = v.chunks_exact(SCAN);
    let rest = chunks.remainder();
    for chunk in chunks {
        if let Some(f) = floor {
            if !chunk.iter().fold(false, |any, &x| any | (x >= f)) {
                continue;
            }
        }
        for &x in chunk {
            take(x, &mut floor);
        }
    }
    for &x in rest {
        take(x, &mut floor);
    }
    *kept.select_nth_unstable_by(k - 1, desc).1
}

/// Softmax, top-p, min-p and the draw, on processed logits.
fn draw(logits: &[f32], cfg: &GenerationConfig, rng: &mut StdRng) -> u32 {
    draw_from(softmax(logits), cfg, rng)
}

/// [`draw`] from the softmax of the processed logits.
fn draw_from(mut probs: Vec<f32>, cfg: &GenerationConfig, rng: &mut StdRng) -> u32 {
    if let Some(top_p) = cfg.top_p.filter(|&p| p < 1.0) {
        let keep = nucleus(&probs, top_p);
        probs.iter_mut().zip(&keep).for_each(|(p, k)| if !k { *p = 0.0 });
    }
    if let Some(min_p) = cfg.min_p.filter(|&p| p > 0.0) {
        // The largest probability, by the 16-lane scan (none is negative or NaN).
        let max = crate::kernels::math::max(&probs);
        let floor = (min_p as f32) * max;
        probs.iter_mut().for_each(|p| if *p < floor { *p = 0.0 });
    }
    sample(&probs, rng)
}

/// The tokens top-p sampling keeps: the smallest set of most likely tokens (ties: the lower
/// id first) whose mass, summed in that order, reaches `top_p` (all tokens of probability
/// above 0 when none does). Only the head of that order
/// is sorted: the first m tokens of it are selected in linear time (m = 64, then 4x more
/// until the walk through them reaches `top_p`), then sorted - the same tokens, in the same
/// order, with the same sums as sorting the whole vocabulary (which took ~4 ms per token
/// and sequence at 50k tokens).
fn nucleus(probs: &[f32], top_p: f64) -> Vec<bool> {
    let before = |a: &usize, b: &usize| probs[*b].total_cmp(&probs[*a]).then(a.cmp(b));
    // Tokens of probability 0 (top-k's cut) add nothing to the walk, and keeping them or
    // not draws the same token.
    let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
    let n = order.len();
    let mut keep = vec![false; probs.len()];
    if n == 0 {
        return keep;
    }
    let mut m = 64.min(n);
    loop {
        if m < n {
            order.select_nth_unstable_by(m - 1, before);
        }
        let head = &mut order[..m];
        head.sort_unstable_by(before);
        let mut cum = 0.0f64;
        for (j, &i) in head.iter().enumerate() {
            cum += probs[i] as f64;
            if cum >= top_p || (j + 1 == m && m == n) {
                for &i in &head[..=j] {
                    keep[i] = true;
                }
                return keep;
            }
        }
        m = (4 * m).min(n);
    }
}

/// Lanes of the vocabulary scans below: independent running values the compiler keeps in
/// vector registers (a scan of 50k logits per sequence and step, ~6 % of a 16-sequence
/// decoding step when it ran one element at a time).
const SCAN: usize = 16;

/// A logit no token can be picked by: NaN or +Inf (-Inf is a masked token).
#[inline(always)]
fn unusable(l: f32) -> bool {
    l.is_nan() | (l == f32::INFINITY)
}

/// No [`unusable`] logit.
fn all_finite_or_neg_inf(v: &[f32]) -> bool {
    let mut bad = [false; SCAN];
    let chunks = v.chunks_exact(SCAN);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..SCAN {
            bad[i] |= unusable(c[i]);
        }
    }
    !bad.iter().any(|&b| b) && !rest.iter().any(|&l| unusable(l))
}

/// The first index of the largest logit (no NaN: `next_token` checked).
fn argmax(v: &[f32]) -> u32 {
    let mut lanes = [f32::NEG_INFINITY; SCAN];
    let chunks = v.chunks_exact(SCAN);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..SCAN {
            lanes[i] = if c[i] > lanes[i] { c[i] } else { lanes[i] };
        }
    }
    let max = lanes.iter().chain(rest).fold(f32::NEG_INFINITY, |m, &x| if x > m { x } else { m });
    v.iter().position(|&x| x == max).unwrap_or(0) as u32
}

/// Probabilities of processed logits, in vector registers (`kernels::math`'s exp, whose
/// polynomial gives the same bits on every instruction set; 0 where e^x is below f32's
/// normal range, as for -Inf): ~20 µs for 50k logits, where the one-at-a-time loop with the
/// C library's expf took ~0.3 ms per sequence and token.
fn softmax(v: &[f32]) -> Vec<f32> {
    let mut e = v.to_vec();
    softmax_in_place(&mut e);
    e
}

#[inline(always)]
fn softmax_body(e: &mut [f32]) {
    use crate::kernels::math;
    let m = math::max(e);
    e.iter_mut().for_each(|x| {
        let d = *x - m;
        *x = if d < -87.0 { 0.0 } else { math::exp(d) };
    });
    let inv = 1.0 / math::sum(e);
    e.iter_mut().for_each(|x| *x *= inv);
}

crate::kernels::math::multiversion!(fn softmax_in_place(e: &mut [f32]) => softmax_body);

/// Weights per block of [`sample`]'s walk.
const DRAW_BLOCK: usize = 64;

/// Draws an index from unnormalised non-negative weights: the first whose running sum (in
/// index order) passes u x total. The walk goes a block of 64 weights at a time by the
/// blocks' sums, then through the block u falls in - a few hundred steps for GPT-2's 50k
/// weights instead of ~75k dependent additions (the total, then half the row on average:
/// ~80 us per token and sequence, when each sum waited on the one before). The sums are in
/// f64, whose rounding is far below any weight a draw can land on; when it leaves u past
/// the block u was found in, or past all of them, the last positive weight there is drawn.
fn sample(weights: &[f32], rng: &mut StdRng) -> u32 {
    let sums: Vec<f64> = weights.chunks(DRAW_BLOCK).map(block_sum).collect();
    let total: f64 = sums.iter().sum();
    let mut r = rng.random::<f64>() * total;
    let last_positive = |w: &[f32]| w.iter().rposition(|&w| w > 0.0);
    for (b, &s) in sums.iter().enumerate() {
        if s > 0.0 && r < s {
            let block = &weights[b * DRAW_BLOCK..(b * DRAW_BLOCK + DRAW_BLOCK).min(weights.len())];
            for (i, &w) in block.iter().enumerate() {
                if w > 0.0 {
                    if r < w as f64 {
                        return (b * DRAW_BLOCK + i) as u32;
                    }
                    r -= w as f64;
                }
            }
            return (b * DRAW_BLOCK + last_positive(block).unwrap_or(0)) as u32;
        }
        r -= s;
    }
    last_positive(weights).unwrap_or(0) as u32
}

/// The f64 sum of a block's weights, in 8 lanes (one vector register) added by a tree.
#[inline(always)]
fn block_sum(w: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = w.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for l in 0..8 {
            acc[l] += c[l] as f64;
        }
    }
    let (a, b) = ((acc[0] + acc[4]) + (acc[2] + acc[6]), (acc[1] + acc[5]) + (acc[3] + acc[7]));
    rest.iter().fold(a + b, |t, &x| t + x as f64)
}

impl GPT {
    /// Generates continuations of a batch of prompts. Returns each prompt followed by its
    /// new tokens (stopping after `eos_token_id` when set).
    pub fn generate(&self, input_ids: &Tensor, cfg: &GenerationConfig) -> Result<Vec<Vec<u32>>> {
        let prompts = ids_from_tensor(input_ids, self.config.vocab_size)?;
        crate::runtime::on_compute_pool(|| self.generate_with(&prompts, cfg, |_, _| {}))
    }

    /// [`GPT::generate`] for prompts of any lengths, calling `on_token(row, id)` for each new
    /// token as it is produced (streaming). Runs on the calling thread: from outside rayon's
    /// pool, wrap it in [`crate::runtime::on_compute_pool`] when `on_token` is `Send`
    /// (the command line runs everything there).
    pub fn generate_with(
        &self,
        prompts: &[Vec<u32>],
        cfg: &GenerationConfig,
        mut on_token: impl FnMut(usize, u32),
    ) -> Result<Vec<Vec<u32>>> {
        cfg.validate()?;
        if prompts.is_empty() || prompts.iter().any(Vec::is_empty) {
            return Err(input_err!("every prompt needs at least one token"));
        }
        let vocab = self.config.vocab_size;
        for p in prompts {
            if let Some(&bad) = p.iter().find(|&&t| t as usize >= vocab) {
                return Err(input_err!("token id {bad} is out of range for vocab_size {vocab}"));
            }
        }
        let block = self.config.block_size;
        let pad_id = cfg.pad_token_id.or(cfg.eos_token_id).unwrap_or(0);
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        // Left-padded working rows.
        let mut rows: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| {
                let mut r = vec![pad_id; longest - p.len()];
                r.extend_from_slice(p);
                r
            })
            .collect();
        let mut pads: Vec<usize> = prompts.iter().map(|p| longest - p.len()).collect();
        let padded = pads.iter().any(|&p| p > 0);
        let mut rng = match cfg.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let mut done = vec![false; rows.len()];
        let mut generated: Vec<Vec<u32>> = vec![Vec::new(); rows.len()];
        let mut cache = KvCache::with_capacity(longest.saturating_add(cfg.max_new_tokens));
        let mut fed = 0usize; // positions of each row already in the cache
        let _hot = crate::runtime::keep_workers_hot();
        for _ in 0..cfg.max_new_tokens {
            let len = rows[0].len();
            let pad_arg = padded.then_some(pads.as_slice());
            let logits = if cfg.use_cache && fed > 0 && len <= block {
                let new: Vec<Vec<u32>> = rows.iter().map(|r| r[fed..].to_vec()).collect();
                fed = len;
                self.forward_step(&new, Some(&mut cache), pad_arg)?
            } else {
                // (Re-)encode the whole context, cropped to its last block_size tokens.
                let start = len.saturating_sub(block);
                if start > 0 {
                    pads.iter_mut().for_each(|p| *p = p.saturating_sub(start));
                    rows.iter_mut().for_each(|r| {
                        r.drain(..start);
                    });
                }
                let pad_arg = padded.then_some(pads.as_slice());
                cache.clear();
                fed = rows[0].len();
                if cfg.use_cache {
                    let mut logits = None;
                    for start in (0..fed).step_by(cfg.prefill_chunk) {
                        let end = (start + cfg.prefill_chunk).min(fed);
                        let chunk: Vec<Vec<u32>> = rows.iter().map(|r| r[start..end].to_vec()).collect();
                        logits = Some(self.forward_step(&chunk, Some(&mut cache), pad_arg)?);
                    }
                    logits.expect("a non-empty context")
                } else {
                    self.forward_step(&rows, None, pad_arg)?
                }
            };
            let logits: Vec<Vec<f32>> = logits.to_dtype(candle_core::DType::F32)?.to_vec2()?;
            for (i, mut row_logits) in logits.into_iter().enumerate() {
                let tok = if done[i] {
                    pad_id
                } else {
                    let t = next_token(&mut row_logits, &rows[i][pads[i]..], cfg, &mut rng)?;
                    on_token(i, t);
                    generated[i].push(t);
                    done[i] = Some(t) == cfg.eos_token_id;
                    t
                };
                rows[i].push(tok);
            }
            if done.iter().all(|&d| d) {
                break;
            }
        }
        Ok(prompts.iter().zip(generated).map(|(p, g)| [p.as_slice(), &g].concat()).collect())
    }

    /// nanoGPT's `generate(idx, max_new_tokens, temperature, top_k)`: samples with the
    /// model's generator (see [`GPT::set_seed`]); returns idx with the new tokens, [B, T + n].
    pub fn generate_legacy(&self, idx: &Tensor, max_new_tokens: usize, temperature: f64, top_k: Option<usize>) -> Result<Tensor> {
        let prompts = ids_from_tensor(idx, self.config.vocab_size)?;
        let seed = self.next_seed();
        let cfg = GenerationConfig { max_new_tokens, temperature, top_k, seed: Some(seed), ..Default::default() };
        let out = crate::runtime::on_compute_pool(|| self.generate_with(&prompts, &cfg, |_, _| {}))?;
        let (b, t) = (out.len(), out[0].len());
        let flat: Vec<u32> = out.into_iter().flatten().collect();
        Ok(Tensor::from_vec(flat, (b, t), idx.device())?.to_dtype(idx.dtype())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// top-k and top-p as they were computed by sorting the whole vocabulary: the oracle of
    /// the linear-time selections.
    fn filtered_by_sorting(logits: &[f32], top_k: Option<usize>, top_p: Option<f64>, min_p: Option<f64>) -> Vec<f32> {
        let mut logits = logits.to_vec();
        if let Some(k) = top_k.filter(|&k| k < logits.len()) {
            let mut sorted = logits.clone();
            sorted.sort_by(|a, b| b.total_cmp(a));
            let kth = sorted[k - 1];
            logits.iter_mut().for_each(|l| if *l < kth { *l = f32::NEG_INFINITY });
        }
        let mut probs = softmax(&logits);
        if let Some(top_p) = top_p {
            let mut order: Vec<usize> = (0..probs.len()).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let (mut cum, mut keep) = (0.0f64, vec![false; probs.len()]);
            for &i in &order {
                keep[i] = true;
                cum += probs[i] as f64;
                if cum >= top_p {
                    break;
                }
            }
            probs.iter_mut().zip(&keep).for_each(|(p, k)| if !k { *p = 0.0 });
        }
        if let Some(min_p) = min_p {
            let floor = (min_p as f32) * probs.iter().cloned().fold(0.0f32, f32::max);
            probs.iter_mut().for_each(|p| if *p < floor { *p = 0.0 });
        }
        probs
    }

    /// The selections keep exactly the tokens full sorts keep, and the same token is drawn
    /// (also with min-p, and from the live tokens alone after top-k or masking, whose
    /// softmax sums round apart from the full vector's only in the last bits): flat and
    /// peaked distributions, many tied logits, masked tokens, vocabularies around the first
    /// selection's 64, k and p at their edges (p above the total mass keeps everything).
    #[test]
    fn top_k_and_top_p_select_what_sorting_selects() {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(11);
        for n in [1usize, 2, 63, 64, 65, 257, 5000, 50304] {
            for case in 0..12 {
                let mut logits: Vec<f32> = (0..n)
                    .map(|_| match case % 3 {
                        0 => rng.random::<f32>() * 4.0,
                        1 => rng.random::<f32>() * 40.0 - 20.0,
                        _ => rng.random_range(0..5) as f32,
                    })
                    .collect();
                // Masked tokens (-Inf) in a third of the cases, never all of them.
                if case % 4 == 3 {
                    logits.iter_mut().skip(1).step_by(3).for_each(|l| *l = f32::NEG_INFINITY);
                }
                let top_k = [None, Some(1), Some(40), Some(n.saturating_sub(1).max(1)), Some(n)][case % 5];
                let top_p = [0.05, 0.5, 0.9, 0.999, 0.999_999_9, 0.95][case % 6];
                let min_p = [None, Some(0.05)][case % 2];
                let cfg = GenerationConfig { do_sample: true, top_k, top_p: Some(top_p), min_p, ..Default::default() };
                let expect = filtered_by_sorting(&logits, top_k, Some(top_p), min_p);
                let kept: Vec<bool> = filtered_by_sorting(&logits, top_k, Some(top_p), None).iter().map(|&p| p > 0.0).collect();
                // What the selections keep: the nucleus of the top-k softmax.
                let mut l = logits.clone();
                if let Some(k) = top_k.filter(|&k| k < n) {
                    let kth = *l.clone().select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1;
                    l.iter_mut().for_each(|v| if *v < kth { *v = f32::NEG_INFINITY });
                }
                assert_eq!(nucleus(&softmax(&l), top_p), kept, "n {n}, case {case}, k {top_k:?}, p {top_p}");
                let seed = rng.random::<u64>();
                let got = next_token(&mut logits.clone(), &[], &cfg, &mut StdRng::seed_from_u64(seed)).unwrap();
                assert_eq!(got, sample(&expect, &mut StdRng::seed_from_u64(seed)), "n {n}, case {case}");
            }
        }
    }

    /// The one-pass k-th largest is the value a selection over a copy finds, bit for bit:
    /// ties, -Inf, -0.0 beside 0.0, sorted and reversed inputs, k from 1 to n, lengths
    /// around the lanes and the first threshold (4k).
    #[test]
    fn kth_largest_is_what_selection_finds() {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(5);
        for n in [1usize, 2, 15, 16, 17, 40, 160, 161, 1000, 50304] {
            for case in 0..8 {
                let mut v: Vec<f32> = (0..n)
                    .map(|_| match case % 4 {
                        0 => rng.random::<f32>() * 4.0 - 2.0,
                        1 => rng.random_range(0..4) as f32 - 2.0,
                        2 => [0.0, -0.0, 1.0, f32::NEG_INFINITY][rng.random_range(0..4)],
                        _ => rng.random::<f32>(),
                    })
                    .collect();
                match case {
                    4 => v.sort_by(f32::total_cmp),
                    5 => v.sort_by(|a, b| b.total_cmp(a)),
                    _ => {}
                }
                for k in [1, 2, 40, n / 2, n - 1, n].into_iter().filter(|&k| k >= 1 && k <= n) {
                    let want = *v.clone().select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1;
                    assert_eq!(kth_largest(&v, k).to_bits(), want.to_bits(), "n {n}, case {case}, k {k}");
                }
            }
        }
    }

    /// The lane scans give what one element at a time gives: the first index of the largest
    /// value (ties, -Inf, lengths that are not a multiple of the lanes), and the same check.
    #[test]
    fn vocabulary_scans_match_the_plain_loops() {
        use rand::Rng;
        let mut rng = StdRng::seed_from_u64(3);
        for len in [0usize, 1, 5, 16, 17, 33, 1000, 50257] {
            for _ in 0..20 {
                let mut v: Vec<f32> = (0..len).map(|_| (rng.random_range(0..40) as f32) - 30.0).collect();
                if len > 3 && rng.random_range(0..2) == 0 {
                    v[len / 2] = f32::NEG_INFINITY;
                }
                let mut best = 0;
                for (i, &x) in v.iter().enumerate() {
                    if x > v[best] {
                        best = i;
                    }
                }
                assert_eq!(argmax(&v), best as u32, "len {len}");
                assert!(all_finite_or_neg_inf(&v));
                if len > 0 {
                    for bad in [f32::NAN, f32::INFINITY] {
                        let mut w = v.clone();
                        w[rng.random_range(0..len)] = bad;
                        assert!(!all_finite_or_neg_inf(&w));
                    }
                }
            }
        }
        assert_eq!(argmax(&[f32::NEG_INFINITY; 40]), 0);
        for len in [0usize, 1, 15, 16, 17, 100, 50257] {
            let v: Vec<f32> = (0..len).map(|_| if rng.random_range(0..3) == 0 { 1.5 } else { f32::NEG_INFINITY }).collect();
            let want: Vec<u32> = (0..len as u32).filter(|&i| v[i as usize] != f32::NEG_INFINITY).collect();
            assert_eq!(live_tokens(&v), want, "len {len}");
        }
    }

    #[test]
    fn top_k_and_top_p_filter() {
        let mut rng = StdRng::seed_from_u64(0);
        let cfg = GenerationConfig { top_k: Some(1), ..Default::default() };
        for _ in 0..20 {
            let mut l = vec![0.0, 3.0, 1.0, 2.0];
            assert_eq!(next_token(&mut l, &[], &cfg, &mut rng).unwrap(), 1);
        }
        // top_p = 0.5 keeps only the dominant token.
        let cfg = GenerationConfig { top_p: Some(0.5), ..Default::default() };
        for _ in 0..20 {
            let mut l = vec![0.0, 5.0, 1.0, 2.0];
            assert_eq!(next_token(&mut l, &[], &cfg, &mut rng).unwrap(), 1);
        }
        // min_p = 0.5 removes tokens below half the top probability.
        let cfg = GenerationConfig { min_p: Some(0.5), ..Default::default() };
        for _ in 0..20 {
            let mut l = vec![0.0, 5.0, 1.0, 2.0];
            assert_eq!(next_token(&mut l, &[], &cfg, &mut rng).unwrap(), 1);
        }
    }

    #[test]
    fn repetition_penalty_follows_ctrl() {
        let mut rng = StdRng::seed_from_u64(0);
        let cfg = GenerationConfig { repetition_penalty: 2.0, do_sample: false, ..Default::default() };
        // token 1 (logit 3, seen) -> 1.5 ; token 2 (logit 2) wins.
        let mut l = vec![0.0, 3.0, 2.0, -1.0];
        assert_eq!(next_token(&mut l, &[1, 3], &cfg, &mut rng).unwrap(), 2);
        assert_eq!(l, vec![0.0, 1.5, 2.0, -2.0]);
    }

    #[test]
    fn tiny_temperature_is_greedy_and_nan_logits_are_errors() {
        let mut rng = StdRng::seed_from_u64(0);
        let cfg = GenerationConfig { temperature: 1e-45, ..Default::default() };
        for _ in 0..20 {
            let mut l = vec![0.5, -1.0, 2.25, 2.0];
            assert_eq!(next_token(&mut l, &[], &cfg, &mut rng).unwrap(), 2);
        }
        for bad in [f32::NAN, f32::INFINITY] {
            for cfg in [GenerationConfig::default(), GenerationConfig::greedy(1)] {
                let mut l = vec![0.5, bad, 2.25];
                let e = next_token(&mut l, &[], &cfg, &mut rng).unwrap_err().to_string();
                assert_eq!(e, format!("the model's logits are not finite (token 1: {bad}): its weights hold NaN or Inf values, or its activations overflowed"));
            }
        }
        let e = GenerationConfig { temperature: f64::INFINITY, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.to_string(), "invalid input: temperature must be > 0 when sampling, got inf");
    }

    /// n logits for the scans' edge cases: about one in `one_in` each -Inf (masked), 0.0,
    /// -0.0 or `tie` (repeated), the others uniform in (-6, 6).
    fn logit_row(rng: &mut StdRng, n: usize, one_in: u32, tie: f32) -> Vec<f32> {
        use rand::Rng;
        (0..n)
            .map(|_| match rng.random_range(0..one_in) {
                0 => f32::NEG_INFINITY,
                1 => 0.0,
                2 => -0.0,
                3 => tie,
                _ => rng.random_range(-6.0f32..6.0),
            })
            .collect()
    }

    /// The sampling settings of case `case` of the in-place pick tests: temperatures down to
    /// 1e-30, top-p, min-p, with `top_k`.
    fn sampling_case(case: usize, top_k: Option<usize>) -> GenerationConfig {
        GenerationConfig {
            top_k,
            temperature: [0.8, 1.0, 1.7, 1e-30][case % 3 + (case / 30)],
            top_p: [None, Some(0.95), Some(0.5)][case % 3],
            min_p: if case % 5 == 0 { Some(0.1) } else { None },
            ..Default::default()
        }
    }

    /// `next_token_of` on `row` gives `next_token`'s token (or error) from a generator seeded
    /// with `seed`, and uses as many of its random numbers.
    fn assert_picks_as_next_token(row: &[f32], cfg: &GenerationConfig, seed: u64, what: &str) {
        use rand::Rng;
        let (mut a, mut b) = (StdRng::seed_from_u64(seed), StdRng::seed_from_u64(seed));
        let want = next_token(&mut row.to_vec(), &[], cfg, &mut a);
        let got = next_token_of(row, &[], cfg, &mut b);
        assert_eq!(got.as_ref().ok(), want.as_ref().ok(), "{what}, {cfg:?}");
        assert_eq!(a.random::<u64>(), b.random::<u64>(), "{what}: random numbers used");
    }

    /// The copy-free greedy pick gives `next_token`'s token (ties to the first, -Inf masks,
    /// both zeros, rows of every length around the scan's lanes) and its error, and leaves
    /// the row as it was.
    #[test]
    fn greedy_picks_without_a_copy_match_next_token() {
        let mut rng = StdRng::seed_from_u64(5);
        let cfg = GenerationConfig::greedy(1);
        for n in 1..70 {
            for case in 0..20 {
                let row = logit_row(&mut rng, n, 10, 1.5);
                let kept = row.clone();
                // This CPU's scan and the portable loop agree (lanes, indices, the check).
                let (a, b) = (greedy_scan(&row), greedy_scan_body(&row));
                assert_eq!((a.0.map(f32::to_bits), a.1, a.2), (b.0.map(f32::to_bits), b.1, b.2));
                let want = next_token(&mut row.clone(), &[], &cfg, &mut StdRng::seed_from_u64(0)).unwrap();
                assert_eq!(next_token_of(&row, &[3], &cfg, &mut StdRng::seed_from_u64(0)).unwrap(), want, "n {n}, case {case}");
                assert_eq!(row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), kept.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
            }
        }
        for n in [0, 1, 16, 40] {
            let row = vec![f32::NEG_INFINITY; n];
            assert_eq!(next_token_of(&row, &[], &cfg, &mut StdRng::seed_from_u64(0)).unwrap(), 0);
        }
        let mut row = vec![-1.0f32; 50];
        for i in [47, 35, 18, 3] {
            row[i] = 2.0;
            assert_eq!(next_token_of(&row, &[], &cfg, &mut StdRng::seed_from_u64(0)).unwrap(), i as u32);
        }
        for bad in [f32::NAN, f32::INFINITY] {
            for at in [1, 20, 33] {
                let mut row = vec![0.5f32; 40];
                row[at] = bad;
                let e = next_token_of(&row, &[], &cfg, &mut StdRng::seed_from_u64(0)).unwrap_err().to_string();
                assert_eq!(e, format!("the model's logits are not finite (token {at}: {bad}): its weights hold NaN or Inf values, or its activations overflowed"));
            }
        }
    }

    /// Top-k sampling on the row in place draws what `next_token` draws on a copy: the same
    /// token and the same random numbers used, over rows with ties, zeros, -Inf masks and
    /// lengths around the scan's lanes, for several k, temperatures, top-p and min-p.
    #[test]
    fn top_k_sampling_in_place_matches_next_token() {
        let mut gen = StdRng::seed_from_u64(8);
        let mut drawn = 0;
        for n in [2, 15, 16, 17, 40, 100, 333] {
            for case in 0..40 {
                let row = logit_row(&mut gen, n, 12, 1.25);
                let k = [1, 2, 5, 40][case % 4].min(n - 1).max(1);
                let cfg = sampling_case(case, Some(k));
                assert_picks_as_next_token(&row, &cfg, case as u64, &format!("n {n}, case {case}"));
                drawn += usize::from(sample_top_k(&row, &cfg, &mut StdRng::seed_from_u64(0)).is_some());
            }
        }
        // The in-place path ran (rows with a finite logit), not only the fallback.
        assert!(drawn > 200, "{drawn}");
        // A logit just below the k-th that the processing rounds onto it is kept, as
        // `pick_token` keeps it: (1 - 1e6) and (1 - ulp - 1e6) are the same f32.
        let below = f32::from_bits(1.0f32.to_bits() - 1);
        let row = [1e6, 1.0, below, -5.0, 0.5];
        // (A temperature of 1e6 keeps the three comparable: the draw can land on each.)
        let cfg = GenerationConfig { top_k: Some(2), temperature: 1e6, ..Default::default() };
        let mut seen = [0; 5];
        for seed in 0..300 {
            let want = next_token(&mut row.to_vec(), &[], &cfg, &mut StdRng::seed_from_u64(seed)).unwrap();
            assert_eq!(next_token_of(&row, &[], &cfg, &mut StdRng::seed_from_u64(seed)).unwrap(), want);
            seen[want as usize] += 1;
        }
        assert!(seen[0] > 0 && seen[1] > 0 && seen[2] > 0 && seen[3] + seen[4] == 0, "{seen:?}");
        let all_masked = vec![f32::NEG_INFINITY; 20];
        assert!(sample_top_k(&all_masked, &GenerationConfig { top_k: Some(3), ..Default::default() }, &mut StdRng::seed_from_u64(0)).is_none());
    }

    /// Sampling over the whole vocabulary (no top-k, no penalty) from the row where it lies:
    /// the probabilities bit for bit those `pick_token` draws from (its processing, then its
    /// softmax), and `next_token`'s token from the same random numbers - temperatures,
    /// top-p and min-p, ties, both zeros, -Inf masks (the fallback), a processing that
    /// overflows to -Inf, and rows of every length around the scan's lanes.
    #[test]
    fn whole_vocabulary_sampling_in_place_matches_next_token() {
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        let mut gen = StdRng::seed_from_u64(9);
        let mut drawn = 0;
        for n in [1, 2, 15, 16, 17, 40, 100, 333, 1000] {
            for case in 0..40 {
                // Masked tokens in a quarter of the rows only, so that most take the path.
                let row = logit_row(&mut gen, n, if case % 4 == 0 { 12 } else { 1 << 30 }, 1.25);
                let cfg = sampling_case(case, if case % 7 == 0 { Some(n) } else { None });
                assert_picks_as_next_token(&row, &cfg, case as u64, &format!("n {n}, case {case}"));
                let temp = cfg.temperature as f32;
                if let Some(probs) = whole_probs(&row, temp) {
                    let max = crate::kernels::math::max(&row);
                    let processed: Vec<f32> = row.iter().map(|&l| (l - max) / temp).collect();
                    assert_eq!(bits(&probs), bits(&softmax(&processed)), "n {n}, case {case}");
                    drawn += 1;
                }
            }
        }
        // The in-place path ran, not only the fallback.
        assert!(drawn > 200, "{drawn}");
        // (l - max) overflows to -Inf for -3e38 under a maximum of 3e38: `pick_token` draws
        // among the others alone, and so does the fallback this path hands the row to.
        let row = [3e38, -3e38, 1.0, 2e38];
        let cfg = GenerationConfig { temperature: 1e38, ..Default::default() };
        assert!(whole_probs(&row, 1e38).is_none());
        for seed in 0..50 {
            let want = next_token(&mut row.to_vec(), &[], &cfg, &mut StdRng::seed_from_u64(seed)).unwrap();
            assert_eq!(next_token_of(&row, &[], &cfg, &mut StdRng::seed_from_u64(seed)).unwrap(), want);
        }
        // Every logit -Inf, NaN and +Inf: the fallback's draw and errors.
        let cfg = GenerationConfig::default();
        for row in [vec![f32::NEG_INFINITY; 20], vec![0.5, f32::NAN], vec![f32::INFINITY, 0.0]] {
            assert!(whole_probs(&row, 1.0).is_none());
            let want = next_token(&mut row.clone(), &[], &cfg, &mut StdRng::seed_from_u64(1));
            let got = next_token_of(&row, &[], &cfg, &mut StdRng::seed_from_u64(1));
            assert_eq!(got.map_err(|e| e.to_string()), want.map_err(|e| e.to_string()));
        }
    }

    /// The draw is the inverse of the weights' running sum at u x total (u the random number
    /// it takes): the drawn weight is positive and its running sums before and after it
    /// bracket u x total, for weights of every size from denormal to 1e30, zeros and
    /// rows of every length around the 64-weight blocks and their 8 lanes.
    #[test]
    fn draws_invert_the_running_sum() {
        use rand::Rng;
        let mut gen = StdRng::seed_from_u64(12);
        for n in [1usize, 2, 7, 8, 9, 63, 64, 65, 129, 1000, 50304] {
            for case in 0..30 {
                let w: Vec<f32> = (0..n)
                    .map(|_| match (case % 3, gen.random_range(0..10)) {
                        (_, 0) => 0.0,
                        (0, _) => gen.random::<f32>(),
                        (1, _) => 10f32.powf(gen.random_range(-40.0f32..30.0)),
                        _ => gen.random::<f32>() * 1e-40,
                    })
                    .collect();
                if w.iter().all(|&x| x == 0.0) {
                    continue;
                }
                let seed = gen.random::<u64>();
                let i = sample(&w, &mut StdRng::seed_from_u64(seed)) as usize;
                let u = StdRng::seed_from_u64(seed).random::<f64>();
                let total: f64 = w.iter().map(|&x| x as f64).sum();
                let before: f64 = w[..i].iter().map(|&x| x as f64).sum();
                let at = u * total;
                let slack = 1e-9 * total;
                assert!(w[i] > 0.0, "n {n}, case {case}: drew a zero weight at {i}");
                assert!(before - slack <= at && at <= before + w[i] as f64 + slack, "n {n}, case {case}: {i} holds [{before}, {}] but u x total is {at}", before + w[i] as f64);
            }
        }
        // All zeros: index 0, as the sampler always answered.
        assert_eq!(sample(&[0.0; 70], &mut StdRng::seed_from_u64(1)), 0);
    }

    #[test]
    fn bad_generation_configs_are_named() {
        let e = GenerationConfig { top_p: Some(1.5), ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.to_string(), "invalid input: top_p must be in (0, 1], got 1.5");
        let e = GenerationConfig { temperature: 0.0, ..Default::default() }.validate().unwrap_err();
        assert_eq!(e.to_string(), "invalid input: temperature must be > 0 when sampling, got 0");
        assert!(GenerationConfig { temperature: 0.0, do_sample: false, ..Default::default() }.validate().is_ok());
    }
}
