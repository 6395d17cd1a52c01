//! The serving engine's model side: packed decoding of many sequences (each with its own KV
//! cache and position) gives every sequence the same bits as decoding it alone, for dense,
//! MoE and seed-architecture models, f32, bf16, f16, q8_0 and q4_0 weights; chunked prefill in `generate`.

use candle_core::Device;
use nanomoe::gpt::{PackedSeq, MAX_PACKED_TOKENS};
use nanomoe::quant::QKind;
use nanomoe::{GPTConfig, GenerationConfig, KvCache, Routing, WeightFormat, GPT};
use rand::{rngs::StdRng, Rng, SeedableRng};

fn configs() -> Vec<(&'static str, GPTConfig)> {
    let dense = GPTConfig { block_size: 64, vocab_size: 97, n_layer: 2, n_head: 4, n_embd: 64, ..Default::default() };
    let moe = GPTConfig { n_layer: 3, n_exp: 4, moe_top_k: 2, stride: 2, ..dense.clone() };
    let seed = GPTConfig { n_layer: 3, n_exp: 4, moe_top_k: 2, moe_start_layer: 1, ..dense.clone() }.with_seed_architecture(true);
    vec![("dense", dense), ("moe", moe), ("seed", seed)]
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn packed_decoding_equals_decoding_alone_bit_for_bit() {
    for (name, cfg) in configs() {
        for dtype in [WeightFormat::F32, WeightFormat::BF16, WeightFormat::F16, WeightFormat::Quant(QKind::Q8_0), WeightFormat::Quant(QKind::Q4_0)] {
            let mut m = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap().with_weight_dtype(dtype).unwrap();
            m.set_routing(Routing::Dropless);
            let mut rng = StdRng::seed_from_u64(1);
            let n_seq = MAX_PACKED_TOKENS;
            let prompts: Vec<Vec<u32>> = (0..n_seq).map(|_| (0..rng.random_range(1..20)).map(|_| rng.random_range(0..97)).collect()).collect();
            // Two copies of every cache: one decoded in packed passes, one alone.
            let mut packed_caches = Vec::new();
            let mut alone_caches = Vec::new();
            let mut last = Vec::new();
            for p in &prompts {
                let mut c = KvCache::new();
                let (logits, _, _) = m.prefill(p, &mut c, false).unwrap();
                let mut alone = KvCache::new();
                let step = m.forward_step(std::slice::from_ref(p), Some(&mut alone), None).unwrap();
                assert_eq!(bits(&logits.to_vec1::<f32>().unwrap()), bits(&step.squeeze(0).unwrap().to_vec1::<f32>().unwrap()), "{name} {dtype:?}: prefill");
                packed_caches.push(c);
                alone_caches.push(alone);
                last.push(rng.random_range(0..97u32));
            }
            for step in 0..4 {
                // A different subset each step, as sequences join and leave.
                let active: Vec<usize> = (0..n_seq).filter(|i| (i + step) % 3 != 0 || step == 0).collect();
                let toks: Vec<[u32; 1]> = active.iter().map(|&i| [last[i]]).collect();
                let mut seqs: Vec<PackedSeq> = Vec::new();
                let mut refs: Vec<Option<&mut KvCache>> = packed_caches.iter_mut().map(Some).collect();
                for (k, &i) in active.iter().enumerate() {
                    seqs.push(PackedSeq { ids: &toks[k], cache: refs[i].take().unwrap() });
                }
                let (logits, _) = m.forward_packed(&mut seqs).unwrap();
                let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
                // Greedy picks of every row at once (what `bench decode --packed` runs): the
                // first of the largest logits.
                let picks = nanomoe::generate::greedy_tokens(&logits).unwrap();
                for (k, &i) in active.iter().enumerate() {
                    let alone = m.forward_step(&[vec![last[i]]], Some(&mut alone_caches[i]), None).unwrap();
                    let alone: Vec<f32> = alone.squeeze(0).unwrap().to_vec1().unwrap();
                    assert_eq!(bits(&rows[k]), bits(&alone), "{name} {dtype:?}: sequence {i} at step {step}");
                    let first_max = (0..rows[k].len()).fold(0, |b, j| if rows[k][j] > rows[k][b] { j } else { b });
                    assert_eq!(picks[k], first_max as u32, "{name} {dtype:?}: greedy pick of sequence {i} at step {step}");
                    last[i] = picks[k];
                }
            }
        }
    }
}

#[test]
fn packed_passes_check_their_input() {
    let (_, cfg) = configs().remove(0);
    let m = GPT::new_seeded(&cfg, 5, &Device::Cpu).unwrap();
    let mut c = KvCache::new();
    let e = m.forward_packed(&mut [PackedSeq { ids: &[97], cache: &mut c }]).unwrap_err();
    assert_eq!(e.to_string(), "invalid input: token id 97 is out of range for vocab_size 97");
    let e = m.forward_packed(&mut []).unwrap_err();
    assert_eq!(e.to_string(), "invalid input: a packed forward pass needs at least one sequence");
    let long = vec![1u32; 64];
    m.prefill(&long, &mut c, false).unwrap();
    let e = m.forward_packed(&mut [PackedSeq { ids: &[1], cache: &mut c }]).unwrap_err();
    assert_eq!(e.to_string(), "invalid input: sequence length 65 exceeds block_size 64 of this model");
}

#[test]
fn chunked_prefill_matches_whole_prompt_prefill_closely_and_echo_logits_agree() {
    for (name, cfg) in configs() {
        let mut m = GPT::new_seeded(&cfg, 9, &Device::Cpu).unwrap();
        m.set_routing(Routing::Dropless);
        let prompt: Vec<u32> = (0..40).map(|i| (i * 7 % 97) as u32).collect();
        let ids = candle_core::Tensor::new(prompt.as_slice(), &Device::Cpu).unwrap().unsqueeze(0).unwrap();
        let whole = m.generate(&ids, &GenerationConfig { prefill_chunk: 512, ..GenerationConfig::greedy(12) }).unwrap();
        for chunk in [1, 7, 16, 17] {
            let out = m.generate(&ids, &GenerationConfig { prefill_chunk: chunk, ..GenerationConfig::greedy(12) }).unwrap();
            assert_eq!(out, whole, "{name}: prefill chunk {chunk}");
        }
        // All-position logits of `prefill` are the HF forward's logits.
        let mut c = KvCache::new();
        let (last, all, _) = m.prefill(&prompt, &mut c, true).unwrap();
        let all = all.unwrap();
        let full = m.forward(&ids, None).unwrap().logits.squeeze(0).unwrap();
        let diff = (&all - &full).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(diff < 1e-4, "{name}: {diff}");
        let d_last = (&last - &full.get(39).unwrap()).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
        assert!(d_last < 1e-4, "{name}: {d_last}");
        let e = m.generate(&ids, &GenerationConfig { prefill_chunk: 0, ..GenerationConfig::greedy(1) }).unwrap_err();
        assert_eq!(e.to_string(), "invalid input: prefill_chunk must be at least 1");
    }
}

#[test]
fn a_prompt_packed_with_decoding_rows_equals_its_prefill_alone() {
    // What `serve` does when a joining prompt's last chunk fits into the decoding pass.
    for (name, cfg) in configs() {
        let mut m = GPT::new_seeded(&cfg, 7, &Device::Cpu).unwrap();
        m.set_routing(Routing::Dropless);
        let mut rng = StdRng::seed_from_u64(3);
        let running: Vec<Vec<u32>> = (0..9).map(|_| (0..rng.random_range(1..12)).map(|_| rng.random_range(0..97)).collect()).collect();
        let prompt: Vec<u32> = (0..MAX_PACKED_TOKENS - running.len()).map(|_| rng.random_range(0..97)).collect();
        let mut caches: Vec<KvCache> = running.iter().map(|p| {
            let mut c = KvCache::new();
            m.prefill(p, &mut c, false).unwrap();
            c
        }).collect();
        let mut alone_caches = caches.clone();
        let toks: Vec<[u32; 1]> = (0..running.len()).map(|i| [i as u32 + 1]).collect();
        let mut joining = KvCache::new();
        let mut seqs: Vec<PackedSeq> = caches.iter_mut().zip(&toks).map(|(c, t)| PackedSeq { ids: t, cache: c }).collect();
        seqs.push(PackedSeq { ids: &prompt, cache: &mut joining });
        let (logits, _) = m.forward_packed(&mut seqs).unwrap();
        let rows: Vec<Vec<f32>> = logits.to_vec2().unwrap();
        assert_eq!(rows.len(), running.len() + 1);
        let (alone, _, _) = m.prefill(&prompt, &mut KvCache::new(), false).unwrap();
        assert_eq!(bits(&rows[running.len()]), bits(&alone.to_vec1::<f32>().unwrap()), "{name}: the packed prompt");
        for (i, c) in alone_caches.iter_mut().enumerate() {
            let one = m.forward_step(&[vec![toks[i][0]]], Some(c), None).unwrap();
            assert_eq!(bits(&rows[i]), bits(&one.squeeze(0).unwrap().to_vec1::<f32>().unwrap()), "{name}: sequence {i}");
        }
    }
}

/// Many prompts submitted at once (more than the batch holds, of lengths that fit the
/// decoding passes' free rows, need passes of their own, or span several chunks): the
/// engine starts several per step, and every completion equals `generate` alone.
#[test]
fn prompts_arriving_together_complete_as_generate_does_alone() {
    use nanomoe::serve::engine::{self, EngineOptions, Event, Job};
    use nanomoe::serve::metrics::Metrics;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    for (name, cfg) in configs() {
        let model = || {
            let mut m = GPT::new_seeded(&cfg, 21, &Device::Cpu).unwrap();
            m.set_routing(Routing::Dropless);
            m
        };
        let reference = model();
        let options = EngineOptions { max_batch: 12, max_queue: 64, prefill_chunk: 20 };
        let (handle, _thread) = engine::start(model(), options, Arc::new(Metrics::default()));
        let mut rng = StdRng::seed_from_u64(8);
        let prompts: Vec<Vec<u32>> = (0..24).map(|i| (0..[1, 3, 9, 17, 30, 45][i % 6]).map(|_| rng.random_range(0..97)).collect()).collect();
        let gen = GenerationConfig::greedy(5);
        let mut receivers = Vec::new();
        for (i, prompt) in prompts.iter().enumerate() {
            let n = if i % 5 == 0 { 2 } else { 1 };
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let job = Job {
                prompt: prompt.clone(),
                n,
                choice_base: 0,
                gen: gen.clone(),
                logprobs: None,
                prompt_logprobs: false,
                events: tx,
                stopped: Arc::new((0..n).map(|_| AtomicBool::new(false)).collect()),
                arrived: std::time::Instant::now(),
            };
            handle.submit(vec![job]).unwrap_or_else(|e| panic!("{name}: prompt {i} refused: {e:?}"));
            receivers.push((n, rx));
        }
        for (i, (prompt, (n, mut rx))) in prompts.iter().zip(receivers).enumerate() {
            let mut tokens = vec![Vec::new(); n];
            let mut done = 0;
            while done < n {
                match rx.blocking_recv().unwrap_or_else(|| panic!("{name}: prompt {i}: the engine hung up")) {
                    Event::Token { choice, id, .. } => tokens[choice].push(id),
                    Event::Done { .. } => done += 1,
                    other => panic!("{name}: prompt {i}: {other:?}"),
                }
            }
            let want = reference.generate_with(std::slice::from_ref(prompt), &GenerationConfig { prefill_chunk: 20, ..gen.clone() }, |_, _| {}).unwrap();
            for (c, got) in tokens.iter().enumerate() {
                assert_eq!(got[..], want[0][prompt.len()..], "{name}: prompt {i} ({} tokens), choice {c}", prompt.len());
            }
        }
    }
}

/// Prompts that join a running batch together (some riding in the decoding pass, the rest
/// in passes of their own in the same step) get their first tokens when the step's passes
/// are done, so each gets its second token one step later: one token of a sequence that
/// runs throughout comes between a joining prompt's first and second tokens, never two.
/// (Sent after the first of several passes, a first token waited out the step's other
/// passes and then a whole step more.) All events go to one channel, in the order sent.
#[test]
fn prompts_joining_together_get_their_second_token_one_step_after_the_first() {
    use nanomoe::serve::engine::{self, EngineOptions, Event, Job};
    use nanomoe::serve::metrics::Metrics;
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    for (name, cfg) in configs() {
        // Room for a long-running sequence: it must still run when the test thread, which
        // the engine does not wait for, gets to submit the others.
        let cfg = GPTConfig { block_size: 1024, ..cfg };
        let mut model = GPT::new_seeded(&cfg, 22, &Device::Cpu).unwrap();
        model.set_routing(Routing::Dropless);
        let options = EngineOptions { max_batch: 16, max_queue: 64, prefill_chunk: 64 };
        let (handle, _thread) = engine::start(model, options, Arc::new(Metrics::default()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let job = |prompt: Vec<u32>, choice_base: usize, tokens: usize| Job {
            prompt,
            n: 1,
            choice_base,
            gen: GenerationConfig::greedy(tokens),
            logprobs: None,
            prompt_logprobs: false,
            events: tx.clone(),
            stopped: Arc::new(vec![AtomicBool::new(false)]),
            arrived: std::time::Instant::now(),
        };
        // Choice 0 runs throughout (until the test stops it); once it has its first token,
        // 12 prompts of 9 tokens (108 rows: 3 ride in the running sequence's pass, 9 take 3
        // passes of their own).
        let long = job(vec![5], 0, 1000);
        let stop_long = long.stopped.clone();
        handle.submit(vec![long]).unwrap();
        assert!(matches!(rx.blocking_recv(), Some(Event::Token { choice: 0, .. })), "{name}");
        let mut rng = StdRng::seed_from_u64(9);
        let joining: Vec<Job> = (1..=12).map(|c| job((0..9).map(|_| rng.random_range(0..97)).collect(), c, 3)).collect();
        handle.submit(joining).unwrap();
        drop(tx);
        // Tokens of choice 0 seen so far, and each joining choice's count at its first token.
        let (mut running_tokens, mut at_first, mut checked, mut finished) = (1, vec![None; 13], 0, 0);
        let mut tokens = vec![0usize; 13];
        while let Some(event) = rx.blocking_recv() {
            match event {
                Event::Token { choice: 0, .. } => running_tokens += 1,
                Event::Token { choice, .. } => {
                    tokens[choice] += 1;
                    match tokens[choice] {
                        1 => at_first[choice] = Some(running_tokens),
                        2 => {
                            let between = running_tokens - at_first[choice].expect("a first token");
                            assert_eq!(between, 1, "{name}: choice {choice}: {between} tokens of the running sequence between its first and second tokens");
                            checked += 1;
                        }
                        _ => {}
                    }
                }
                Event::Done { choice: 0, .. } => panic!("{name}: the long sequence ended before the others"),
                Event::Done { .. } => {
                    finished += 1;
                    if finished == 12 {
                        // The engine drops a stopped choice before its next step, and with
                        // it the channel's last sender.
                        stop_long[0].store(true, std::sync::atomic::Ordering::SeqCst);
                    }
                }
                other => panic!("{name}: {other:?}"),
            }
        }
        assert_eq!(checked, 12, "{name}: every joining prompt checked");
        assert!(tokens[1..].iter().all(|&t| t == 3), "{name}: {tokens:?}");
    }
}
