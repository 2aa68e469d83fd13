//! Engine behaviour on a tiny fixture model: in-flight batching invariance (with chunked prefill
//! and preemption), aborts, seeds, stop conditions, request validation errors, host work
//! overlapped with steps, and surviving a panicking step (rebuild, refusals meanwhile, failing
//! closed). Queueing, priority, timings and bad words: tests/engine_serving.rs.
#![allow(clippy::unwrap_used)]

mod common;
mod engine_common;

use std::time::Duration;

use common::*;
use engine_common::*;
use triton_ferrum::engine::{
    Device, Engine, EngineHandle, EngineOptions, EngineSetup, FaultInjection, Incident, Recovery,
    is_final, options,
};
use triton_ferrum::executor::Executor;
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::{
    FinishReason, GenerateRequest, ModelInfo, Prompt, RequestError, RequestSpec, SamplingParams,
    StopCriteria, TokenEvent,
};

/// Greedy outputs of 16 mixed-length requests arriving at different steps equal their outputs
/// when run alone — with a small token budget (chunked prefill) and a KV cache too small for all
/// of them at once (preemption and recompute).
#[test]
fn batch_invariance_under_chunking_and_preemption() {
    batch_invariance(&model_dir(), WeightFormat::F32, false);
}

/// The same with prefix caching on: preempted requests may resume from their own cached blocks.
#[test]
fn batch_invariance_under_chunking_and_preemption_with_kv_cache_reuse() {
    batch_invariance(&model_dir(), WeightFormat::F32, true);
}

/// The same with 8-bit weights, whose products quantize the activations per 32-block: the Qwen2
/// fixture's layers of 64 inputs (q, k, v, o, gate/up, lm_head) are stored as `BlockQ8`, and a
/// sequence's outputs must not depend on how many rows (decode tokens, prefill chunks of other
/// requests) share its matrix products.
#[test]
fn batch_invariance_with_q8_weights() {
    batch_invariance(&fixtures().join("models/qwen2"), WeightFormat::Q8, false);
}

fn batch_invariance(model: &std::path::Path, format: WeightFormat, kv_cache_reuse: bool) {
    let lens = [1usize, 3, 7, 12, 20, 33, 5, 2, 17, 9, 41, 4, 26, 11, 8, 15];
    let max_tokens = 12;
    let alone = TestEngine::start(model, Some(format), |_| {});
    let reference: Vec<Vec<u32>> = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            collect(
                &alone.handle(),
                greedy(prompt(n, i as u32), max_tokens, None),
            )
            .output_ids
        })
        .collect();
    drop(alone);

    let batched = TestEngine::start(model, Some(format), |o| {
        o.batching.max_num_batched_tokens = 16;
        o.kv.block_size = 4;
        // 28 blocks * 4 = 112 token slots: far less than the ~400 the 16 requests need together.
        o.kv.max_tokens = Some(112);
        o.batching.max_num_seqs = 16;
        o.max_model_len = Some(64);
        o.batching.enable_prefix_caching = kv_cache_reuse;
    });
    let handle = batched.handle();
    let mut streams = vec![];
    for (i, &n) in lens.iter().enumerate() {
        let mut s = submit(&handle, greedy(prompt(n, i as u32), max_tokens, None)).unwrap();
        // Two bursts of 8, the engine taking steps between them. Each burst alone needs more
        // KV slots than the cache has (prompts + 8 × 12 outputs: 179 and 227 of 112), so
        // preemption happens however fast the engine runs the first burst.
        if i % 8 == 7 {
            let ev = s.recv().unwrap();
            assert!(matches!(ev, TokenEvent::Started { .. }));
            std::thread::sleep(Duration::from_millis(2));
        }
        streams.push(s);
    }
    for (i, mut s) in streams.into_iter().enumerate() {
        let mut out = vec![];
        let mut finals = 0;
        while let Some(ev) = s.recv() {
            finals += usize::from(is_final(&ev));
            if let TokenEvent::Token { token_id, .. } = ev {
                out.push(token_id);
            }
        }
        assert_eq!(finals, 1, "request {i}: exactly one final event");
        assert_eq!(
            out, reference[i],
            "request {i} (prompt len {}) differs when batched",
            lens[i]
        );
    }
    let stats = handle.stats().unwrap();
    assert!(
        stats.num_preemptions > 0,
        "the KV cache was sized to force preemption: {stats:?}"
    );
    assert_eq!(stats.num_finished, 16);
    assert_eq!(
        stats.num_kv_blocks_free, stats.num_kv_blocks_total,
        "idle: every block free (cached ones are evictable)"
    );
    if kv_cache_reuse {
        // Preempted requests resumed from their own cached blocks (48 tokens when written).
        assert!(stats.num_reused_prompt_tokens > 0, "{stats:?}");
    } else {
        assert_eq!(stats.num_reused_prompt_tokens, 0);
        assert_eq!(stats.num_kv_blocks_cached, 0);
    }
}

/// Prefix caching: requests sharing a 24-token system prompt (and exact repeats, and a prompt
/// that ends on a block boundary) give the tokens and logprobs they give without reuse, while
/// the engine computes only what the cache lacks.
#[test]
fn kv_cache_reuse_gives_the_same_outputs_and_skips_cached_prefixes() {
    let system = prompt(24, 7);
    let mut prompts: Vec<Vec<u32>> = (0..6u32)
        .map(|i| [system.clone(), prompt(3 + i as usize, 50 + i)].concat())
        .collect();
    prompts.push(system.clone()); // 24 tokens = 6 full blocks: the last is still computed
    prompts.push(prompts[0].clone()); // an exact repeat
    prompts.push(prompt(9, 99)); // nothing shared
    let max_tokens = 8;
    let run = |reuse: bool| {
        let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |o| {
            o.kv.block_size = 4;
            o.batching.enable_prefix_caching = reuse;
        });
        let h = e.handle();
        // The first request alone fills the cache; the rest arrive together.
        let mut outs = vec![collect(&h, greedy(prompts[0].clone(), max_tokens, Some(2)))];
        let streams: Vec<_> = prompts[1..]
            .iter()
            .map(|p| submit(&h, greedy(p.clone(), max_tokens, Some(2))).unwrap())
            .collect();
        for s in streams {
            outs.push(collect_stream(s));
        }
        (outs, h.stats().unwrap())
    };
    let (want, plain) = run(false);
    let (got, reused) = run(true);
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(g.output_ids, w.output_ids, "prompt {i}: tokens");
        for (a, b) in g.logprobs.iter().zip(&w.logprobs) {
            assert!(
                (a.logprob - b.logprob).abs() < 1e-4,
                "prompt {i}: logprob {} vs {}",
                a.logprob,
                b.logprob
            );
        }
    }
    assert_eq!(plain.num_reused_prompt_tokens, 0);
    // Every prompt after the first reuses the 24 system tokens, except the block-aligned one
    // (20: its last token is computed, so its last block is not reused), the repeat
    // (24 + 3 = 27 tokens: 6 blocks) and the unrelated one (0).
    let expected = 5 * 24 + 20 + 24;
    assert!(
        reused.num_reused_prompt_tokens >= expected as u64,
        "{} reused prompt tokens, expected >= {expected}: {reused:?}",
        reused.num_reused_prompt_tokens
    );
    assert!(reused.num_kv_blocks_cached >= 6, "{reused:?}");
    assert_eq!(reused.num_kv_blocks_free, reused.num_kv_blocks_total);
    assert_eq!(reused.num_prompt_tokens, plain.num_prompt_tokens);
}

#[test]
fn abort_ends_stream_and_frees_blocks() {
    let mut opts = triton_ferrum::engine::EngineOptions::new(model_dir());
    opts.kv.block_size = 4;
    opts.kv.max_tokens = Some(64);
    opts.max_model_len = Some(64);
    // 50 tokens of at least 2 ms each: the abort lands long before the request could end.
    let e = slow_engine(&opts, Duration::from_millis(2));
    let handle = e.handle();
    let idle = handle.stats().unwrap();
    assert_eq!(
        (idle.num_kv_blocks_total, idle.block_size, idle.max_num_seqs),
        (16, 4, 64),
        "64 tokens of KV cache in blocks of 4: {idle:?}"
    );
    assert_eq!(idle.num_kv_blocks_used, 0);
    assert_eq!(idle.num_kv_blocks_free, 16);
    let mut s = submit(&handle, greedy(prompt(10, 1), 50, None)).unwrap();
    assert!(matches!(s.recv(), Some(TokenEvent::Started { .. })));
    // Stats are answered between steps: within a step or two the request holds its blocks.
    let mut running = handle.stats().unwrap();
    for _ in 0..10 {
        if running.num_kv_blocks_used > 0 {
            break;
        }
        running = handle.stats().unwrap();
    }
    // 10 prompt tokens (+ a few generated) in blocks of 4: at least 3 blocks.
    assert!(running.num_kv_blocks_used >= 3, "{running:?}");
    assert_eq!(
        running.num_kv_blocks_used + running.num_kv_blocks_free,
        16,
        "{running:?}"
    );
    assert_eq!((running.num_running, running.num_waiting), (1, 0));
    handle.abort(s.seq_id);
    let mut last = None;
    while let Some(ev) = s.recv() {
        last = Some(ev);
    }
    match last {
        Some(TokenEvent::Finished {
            reason: FinishReason::Abort,
            ..
        }) => {}
        Some(TokenEvent::Token {
            finish: Some(FinishReason::Length),
            ..
        }) => panic!("abort was not applied"),
        other => panic!("unexpected last event {other:?}"),
    }
    // The final event goes out after the blocks are freed, and stats are answered in order.
    let after = handle.stats().unwrap();
    assert_eq!(after.num_kv_blocks_used, 0, "{after:?}");
    assert_eq!(after.num_kv_blocks_free, 16);
    assert_eq!((after.num_running, after.num_waiting), (0, 0));
    // The whole cache (16 blocks) must be usable again: a request needing all of it completes.
    let c = collect(&handle, greedy(prompt(30, 2), 34, None));
    assert_eq!(c.output_ids.len(), 34);
    assert_eq!(handle.stats().unwrap().num_aborted, 1);
}

#[test]
fn dropping_the_stream_aborts_the_request() {
    let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
    let handle = e.handle();
    let s = submit(&handle, greedy(prompt(5, 3), 100, None)).unwrap();
    drop(s);
    // The next request completes and the dropped one is counted as aborted.
    let c = collect(&handle, greedy(prompt(5, 4), 3, None));
    assert_eq!(c.output_ids.len(), 3);
    let mut aborted = 0;
    for _ in 0..100 {
        aborted = handle.stats().unwrap().num_aborted;
        if aborted == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(aborted, 1);
    assert_eq!(handle.stats().unwrap().num_kv_blocks_used, 0);
}

#[test]
fn same_seed_same_output_and_different_seed_differs() {
    let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
    let handle = e.handle();
    let run = |seed| {
        let mut req = greedy(prompt(6, 5), 24, None);
        req.sampling = SamplingParams {
            temperature: 1.5,
            seed: Some(seed),
            ..SamplingParams::default()
        };
        collect(&handle, req).output_ids
    };
    let a = run(42);
    assert_eq!(a, run(42));
    assert_ne!(a, run(43));
}

#[test]
fn stop_token_min_tokens_and_max_tokens() {
    let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
    let handle = e.handle();
    let free = collect(&handle, greedy(prompt(4, 6), 16, None));
    assert_eq!(free.finish.as_deref(), Some("length"));
    assert_eq!(free.output_ids.len(), 16);
    // Stop at the 3rd generated token's id.
    let stop_id = free.output_ids[2];
    let first = free.output_ids.iter().position(|&t| t == stop_id).unwrap();
    let mut req = greedy(prompt(4, 6), 16, None);
    req.stop.stop_token_ids = vec![stop_id];
    let c = collect(&handle, req.clone());
    assert_eq!(c.finish.as_deref(), Some("stop"));
    assert_eq!(c.output_ids, free.output_ids[..=first].to_vec());
    // min_tokens suppresses the stop id until enough tokens were generated.
    req.stop.min_tokens = first + 2;
    let c = collect(&handle, req);
    assert!(c.output_ids.len() >= first + 2);
    assert!(c.output_ids[..first + 1].iter().all(|&t| t != stop_id));
}

#[test]
fn invalid_requests_get_errors_naming_the_field() {
    let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |o| {
        o.max_model_len = Some(64)
    });
    let handle = e.handle();
    let err = |req| submit(&handle, req).err().unwrap();
    assert!(matches!(
        err(greedy(vec![], 4, None)),
        RequestError::EmptyPrompt
    ));
    let e1 = err(greedy(prompt(64, 1), 4, None));
    assert!(
        e1.to_string().contains("64") && e1.to_string().contains("context"),
        "{e1}"
    );
    let e2 = err(greedy(vec![1, 99999], 4, None));
    assert!(e2.to_string().contains("99999"), "{e2}");
    let mut r = greedy(prompt(3, 1), 4, None);
    r.sampling.top_p = 1.5;
    let e3 = err(r);
    assert!(
        e3.to_string().contains("top_p") && e3.to_string().contains("1.5"),
        "{e3}"
    );
    let mut r = greedy(prompt(3, 1), 4, None);
    r.sampling.temperature = -1.0;
    assert!(err(r).to_string().contains("temperature"));
    let mut r = greedy(prompt(3, 1), 4, None);
    r.stop = StopCriteria {
        max_tokens: 0,
        ..StopCriteria::default()
    };
    assert!(err(r).to_string().contains("max_tokens"));
    let mut r = greedy(prompt(3, 1), 4, None);
    r.prompt = Prompt::Text("hello".into());
    assert!(
        err(r).to_string().contains("tokenizer"),
        "fixture has no tokenizer"
    );
    let e4 = err(greedy(prompt(3, 1), 64, None));
    assert!(e4.to_string().contains("[1, 63]"), "{e4}");
    // Prompt + max_tokens may pass the context: the request ends there with `length`.
    let c = collect(&handle, greedy(prompt(60, 1), 63, None));
    assert_eq!(
        (c.output_ids.len(), c.finish.as_deref()),
        (4, Some("length"))
    );
    // A request validated for another model is refused, not checked again.
    let other = ModelInfo {
        max_model_len: 4096,
        ..handle.info().clone()
    };
    let req = GenerateRequest::new(greedy(prompt(100, 1), 4, None), &other).unwrap();
    let e5 = handle.submit(req).err().unwrap();
    assert!(e5.to_string().contains("another model"), "{e5}");
    // The engine still serves after all of that.
    assert_eq!(
        collect(&handle, greedy(prompt(3, 1), 2, None))
            .output_ids
            .len(),
        2
    );
}

/// With the engine's host work overlapped with the step (as on the GPU), requests stopped by a
/// string, a stop id or max_tokens (and one whose client goes away) come out exactly as on the
/// host-sampling engine: the same ids, text and finish reason, one final event each and nothing
/// after it, every block free at the end. A request stopped by a string is already in the next
/// step when its text is matched, so that step's token for it must be dropped and its blocks
/// freed.
#[test]
fn overlapped_host_work_gives_the_same_outputs() {
    let reference = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |o| {
        *o = overlap_options()
    });
    let (requests, expected) = overlap_requests(&reference);

    let engine = overlapped_engine(None, Duration::ZERO);
    let handle = engine.handle();
    // A client that goes away after its first token (of 50: the abort lands long before).
    let mut gone = {
        let mut r = greedy(prompt(5, 99), 50, None);
        r.detokenize = true;
        submit(&handle, r).unwrap()
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let ids: Vec<_> = requests
        .iter()
        .map(|r| submit_to(&handle, r.clone(), tx.clone()).unwrap().0)
        .collect();
    while !matches!(gone.recv(), Some(TokenEvent::Token { .. })) {}
    drop(gone);
    let mut events = collect_shared(&handle, &rx, &ids);
    for (i, (id, want)) in ids.iter().zip(&expected).enumerate() {
        let mut got = Collected::default();
        for ev in events.remove(id).unwrap() {
            if let TokenEvent::Token {
                token_id,
                text,
                finish,
                ..
            } = ev
            {
                got.output_ids.push(token_id);
                got.text.push_str(&text);
                got.finish = finish.map(|f| f.as_str().to_string());
            }
        }
        assert_eq!(
            (&got.output_ids, &got.text, &got.finish),
            (&want.output_ids, &want.text, &want.finish),
            "request {i} differs with overlapped host work"
        );
    }
    // The dropped client's abort is seen at the engine's next intake.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = handle.stats().unwrap();
        if stats.num_finished + stats.num_aborted == 13 || std::time::Instant::now() > deadline {
            break stats;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    assert_eq!(
        (stats.num_finished, stats.num_aborted),
        (12, 1),
        "{stats:?}"
    );
    assert_eq!(stats.num_running + stats.num_waiting, 0, "{stats:?}");
    assert_eq!(
        stats.num_kv_blocks_free, stats.num_kv_blocks_total,
        "{stats:?}"
    );
}

/// A step that fails after its overlap ran (the previous step's tokens delivered, a request
/// stopped by a string removed) fails the requests in it with one error each; those that ended
/// before get their normal final event, nothing comes after any final event, every block is
/// free, and the engine serves the next request.
#[test]
fn a_step_failing_after_its_overlap_fails_its_requests_once() {
    let reference = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |o| {
        *o = overlap_options()
    });
    let (requests, expected) = overlap_requests(&reference);
    let engine = overlapped_engine(Some(12), Duration::ZERO);
    let handle = engine.handle();
    let (tx, rx) = crossbeam_channel::unbounded();
    let ids: Vec<_> = requests
        .iter()
        .map(|r| submit_to(&handle, r.clone(), tx.clone()).unwrap().0)
        .collect();
    let events = collect_shared(&handle, &rx, &ids);
    let mut num_errors = 0;
    for (i, (id, want)) in ids.iter().zip(&expected).enumerate() {
        let evs = &events[id];
        let tokens: Vec<u32> = evs
            .iter()
            .filter_map(|ev| match ev {
                TokenEvent::Token { token_id, .. } => Some(*token_id),
                _ => None,
            })
            .collect();
        // What came out is a prefix of the reference output, whatever ended the request.
        assert!(
            want.output_ids.starts_with(&tokens),
            "request {i}: {tokens:?} vs {:?}",
            want.output_ids
        );
        match evs.last() {
            Some(TokenEvent::Error(e)) => {
                assert!(e.contains("injected failure"), "{e}");
                num_errors += 1;
            }
            Some(TokenEvent::Token {
                finish: Some(_), ..
            }) => assert_eq!(tokens, want.output_ids, "request {i} ended normally"),
            other => panic!("request {i}: last event {other:?}"),
        }
    }
    assert!(num_errors > 0, "the failing step held requests");
    let stats = handle.stats().unwrap();
    assert_eq!(stats.num_running + stats.num_waiting, 0, "{stats:?}");
    assert_eq!(
        stats.num_kv_blocks_free, stats.num_kv_blocks_total,
        "{stats:?}"
    );
    // Still serving.
    let c = collect(&handle, greedy(prompt(6, 1), 4, None));
    assert_eq!((c.output_ids.len(), c.num_final_events), (4, 1));
}

/// An abort between steps of the overlapped engine delivers every token already accepted
/// before the final `Abort` event: the events carry as many tokens as the engine counted.
#[test]
fn an_abort_on_the_overlapped_engine_delivers_the_accepted_tokens_first() {
    // 50 steps of at least 2 ms: the abort after the 3rd token lands ~90 ms before the end.
    let engine = overlapped_engine(None, Duration::from_millis(2));
    let handle = engine.handle();
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut r = greedy(prompt(5, 3), 50, None);
    r.detokenize = true;
    let (id, _) = submit_to(&handle, r, tx).unwrap();
    let mut num_tokens = 0;
    while num_tokens < 3 {
        if let (_, TokenEvent::Token { .. }) = rx.recv_timeout(Duration::from_secs(30)).unwrap() {
            num_tokens += 1;
        }
    }
    handle.abort(id);
    let mut last = None;
    while let Ok((_, ev)) = rx.recv_timeout(Duration::from_secs(30)) {
        if matches!(ev, TokenEvent::Token { .. }) {
            num_tokens += 1;
        }
        let done = is_final(&ev);
        last = Some(ev);
        if done {
            break;
        }
    }
    assert!(
        matches!(
            last,
            Some(TokenEvent::Finished {
                reason: FinishReason::Abort,
                ..
            })
        ),
        "{last:?}"
    );
    let stats = handle.stats().unwrap();
    assert_eq!(
        num_tokens as u64, stats.num_generated_tokens,
        "every accepted token was delivered before the abort: {stats:?}"
    );
    assert_eq!(
        stats.num_kv_blocks_free, stats.num_kv_blocks_total,
        "{stats:?}"
    );
}

// ---- a panicking step ----------------------------------------------------------------------------

/// A token id no `prompt()` holds (they use 3..=302 of the fixture's 311).
const POISON: u32 = 305;

fn next_incident(incidents: &crossbeam_channel::Receiver<Incident>) -> Incident {
    incidents
        .recv_timeout(Duration::from_secs(60))
        .expect("an incident within 60 s")
}

/// The events of one request, up to its final one (each within 30 s).
fn request_events(handle: &EngineHandle, req: RequestSpec) -> Vec<TokenEvent> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let (id, _) = submit_to(handle, req, tx).unwrap();
    let mut events = vec![];
    while !events.last().is_some_and(is_final) {
        let (got, ev) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("every event within 30 s");
        assert_eq!(got, id);
        events.push(ev);
    }
    events
}

fn tokens_of(events: &[TokenEvent]) -> Vec<u32> {
    events
        .iter()
        .filter_map(|ev| match ev {
            TokenEvent::Token { token_id, .. } => Some(*token_id),
            _ => None,
        })
        .collect()
}

/// A step that panics (here on a poisoned prompt, `FaultInjection`, on the engine `options`
/// starts for Triton) fails every request the engine holds with exactly one error naming the
/// panic: two midway with tokens out, the poisoned one, and one waiting for a seat. A request
/// that ended before keeps its answer. The engine reports the panic, rebuilds from the model path
/// and gives the same greedy answers as before with its whole KV cache free; the next poisoned
/// prompt costs another rebuild, not the engine.
#[test]
fn a_panicking_step_fails_every_request_in_flight_once_and_the_engine_rebuilds() {
    let mut opts = EngineOptions::new(model_dir());
    opts.device = Device::Cpu;
    opts.weight_format = Some(WeightFormat::F32);
    opts.kv.block_size = 4;
    opts.max_model_len = Some(128);
    // Three seats: the poisoned prompt waits for the short request's seat, so it is scheduled
    // (and the step panics) while two long requests are midway, however fast the steps run.
    opts.batching.max_num_seqs = 3;
    let faults = FaultInjection {
        panic_token_id: Some(POISON),
    };
    let engine = options::start_with_faults(&opts, faults).unwrap().engine;
    let (handle, incidents) = (engine.handle(), engine.incidents());
    let short = greedy(prompt(5, 1), 10, None);
    let reference = collect(&handle, short.clone());
    let before = handle.stats().unwrap();

    let requests = [
        short.clone(),
        greedy(prompt(6, 2), 100, None),
        greedy(prompt(7, 3), 100, None),
        greedy([prompt(4, 4), vec![POISON]].concat(), 10, None),
        greedy(prompt(8, 5), 10, None),
    ];
    let (tx, rx) = crossbeam_channel::unbounded();
    let ids: Vec<_> = requests
        .iter()
        .map(|r| submit_to(&handle, r.clone(), tx.clone()).unwrap().0)
        .collect();
    let events = collect_shared(&handle, &rx, &ids);
    let first = &events[&ids[0]];
    assert_eq!(tokens_of(first), reference.output_ids);
    assert!(
        matches!(
            first.last(),
            Some(TokenEvent::Token {
                finish: Some(FinishReason::Length),
                ..
            })
        ),
        "the short request ended before the panic: {first:?}"
    );
    for (i, id) in ids.iter().enumerate().skip(1) {
        let evs = &events[id];
        assert_eq!(evs.iter().filter(|ev| is_final(ev)).count(), 1, "{evs:?}");
        match evs.last() {
            Some(TokenEvent::Error(e)) => assert!(
                e.starts_with(
                    "engine failed: panic in step: injected panic: the prompt of request"
                ) && e.contains(&format!("holds token {POISON} (FERRUM_INJECT_PANIC_TOKEN)"))
                    && e.ends_with("the engine is restarting, retry the request"),
                "request {i}: {e}"
            ),
            other => panic!("request {i}: last event {other:?}"),
        }
    }
    for i in [1, 2] {
        assert!(
            tokens_of(&events[&ids[i]]).len() >= 9,
            "request {i} was midway: {:?}",
            events[&ids[i]]
        );
    }
    match next_incident(&incidents) {
        Incident::StepPanicked {
            failure,
            num_failed_requests,
            rebuilding,
        } => {
            assert!(
                failure.reason.starts_with("panic in step: injected panic"),
                "{failure}"
            );
            assert_eq!((num_failed_requests, rebuilding), (4, true));
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        next_incident(&incidents),
        Incident::Rebuilt { .. }
    ));
    // The rebuilt engine: the same answer, its whole KV cache free, the counters kept.
    assert_eq!(
        collect(&handle, short.clone()).output_ids,
        reference.output_ids
    );
    let after = handle.stats().unwrap();
    assert_eq!(after.num_engine_failures, 1, "{after:?}");
    assert_eq!(after.num_finished, before.num_finished + 2, "{after:?}");
    assert_eq!(after.num_kv_blocks_total, before.num_kv_blocks_total);
    assert_eq!(after.num_kv_blocks_free, after.num_kv_blocks_total);
    // Every poisoned prompt costs a rebuild, not the engine.
    let evs = request_events(&handle, greedy(vec![POISON], 4, None));
    assert!(
        matches!(evs.last(), Some(TokenEvent::Error(e)) if e.contains("injected panic")),
        "{evs:?}"
    );
    assert!(matches!(
        next_incident(&incidents),
        Incident::StepPanicked {
            num_failed_requests: 1,
            rebuilding: true,
            ..
        }
    ));
    assert!(matches!(
        next_incident(&incidents),
        Incident::Rebuilt { .. }
    ));
    assert_eq!(collect(&handle, short).output_ids, reference.output_ids);
    assert_eq!(handle.stats().unwrap().num_engine_failures, 2);
}

/// A rebuild opens the model path again; if it no longer holds the model the engine started
/// with (the folder was overwritten with another checkpoint since), the rebuild fails and the
/// engine fails closed, saying so, rather than serving a different model under the old facts.
#[test]
fn a_rebuild_refuses_a_model_path_that_now_holds_another_model() {
    let dir = std::env::temp_dir().join(format!("ferrum-rebuild-{}", std::process::id()));
    let copy = |from: &std::path::Path| {
        for name in ["config.json", "generation_config.json", "model.safetensors"] {
            std::fs::copy(from.join(name), dir.join(name)).unwrap();
        }
    };
    std::fs::create_dir_all(&dir).unwrap();
    copy(&model_dir());
    let mut opts = EngineOptions::new(&dir);
    opts.device = Device::Cpu;
    opts.max_model_len = Some(64);
    let faults = FaultInjection {
        panic_token_id: Some(POISON),
    };
    let engine = options::start_with_faults(&opts, faults).unwrap().engine;
    let (handle, incidents) = (engine.handle(), engine.incidents());
    assert_eq!(
        collect(&handle, greedy(prompt(5, 1), 4, None))
            .output_ids
            .len(),
        4
    );
    copy(&fixtures().join("models/gpt2"));
    let evs = request_events(&handle, greedy(vec![POISON], 4, None));
    assert!(
        matches!(evs.last(), Some(TokenEvent::Error(e)) if e.contains("injected panic")),
        "{evs:?}"
    );
    assert!(matches!(
        next_incident(&incidents),
        Incident::StepPanicked {
            rebuilding: true,
            ..
        }
    ));
    match next_incident(&incidents) {
        Incident::RebuildFailed { error } => assert!(
            error.contains("no longer holds the model the engine was started with"),
            "{error}"
        ),
        other => panic!("{other:?}"),
    }
    match &request_events(&handle, greedy(prompt(5, 1), 4, None))[..] {
        [TokenEvent::Unavailable(e)] => assert!(e.contains("reload the model"), "{e}"),
        other => panic!("{other:?}"),
    }
    drop(engine);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// On the overlapped engine (as on the GPU), the executor panics in a step before its overlap
/// delivered the previous step's tokens: requests that ended before keep their answer, every
/// other one gets exactly one error naming the panic (also one whose last token was accepted but
/// not delivered yet). While the engine rebuilds (held here at a gate), a new request is refused
/// at once with `Unavailable` saying why; then the engine gives the same answers as before. After
/// a later panic whose rebuild fails, it fails closed: every request is refused with when and
/// why, until it is dropped.
#[test]
fn requests_are_refused_with_the_reason_while_rebuilding_and_after_a_failed_rebuild() {
    let reference = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |o| {
        *o = overlap_options()
    });
    let (requests, expected) = overlap_requests(&reference);
    let opts = overlap_options();
    let (cpu, info, scheduler) = cpu_executor(&opts);
    // The test lets each rebuild through (Ok) or fails it (Err).
    let (gate_opener, gate) = crossbeam_channel::unbounded::<Result<(), String>>();
    let rebuild = move || -> triton_ferrum::Result<Box<dyn Executor>> {
        match gate.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(triton_ferrum::Error::Engine(e)),
            Err(_) => return Err(triton_ferrum::Error::Engine("the test ended".into())),
        }
        Ok(Box::new(TestExecutor::new(cpu_executor(&opts).0, true)))
    };
    let engine = Engine::start_with(
        Box::new(TestExecutor {
            panic_at_step: Some(12),
            ..TestExecutor::new(cpu, true)
        }),
        info,
        EngineSetup {
            scheduler,
            recovery: Recovery::Rebuild(Box::new(rebuild)),
            faults: FaultInjection {
                panic_token_id: Some(POISON),
            },
            report_timings: false,
        },
    )
    .unwrap();
    // Bound after `engine`, so dropped before it when an assertion fails: a rebuild waiting at
    // the gate then ends (the engine's shutdown waits for it) instead of hanging the test.
    let gate_tx = gate_opener;
    let (handle, incidents) = (engine.handle(), engine.incidents());
    let submit_all = |tx: &crossbeam_channel::Sender<_>| -> Vec<_> {
        requests
            .iter()
            .map(|r| submit_to(&handle, r.clone(), tx.clone()).unwrap().0)
            .collect()
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let ids = submit_all(&tx);
    let events = collect_shared(&handle, &rx, &ids);
    let mut num_errors = 0;
    for (i, (id, want)) in ids.iter().zip(&expected).enumerate() {
        let evs = &events[id];
        let tokens = tokens_of(evs);
        assert!(
            want.output_ids.starts_with(&tokens),
            "request {i}: {tokens:?} vs {:?}",
            want.output_ids
        );
        match evs.last() {
            Some(TokenEvent::Error(e)) => {
                assert_eq!(
                    e,
                    "engine failed: panic in step: test executor panics in step 12; the engine is restarting, retry the request",
                    "request {i}"
                );
                num_errors += 1;
            }
            Some(TokenEvent::Token {
                finish: Some(_), ..
            }) => assert_eq!(tokens, want.output_ids, "request {i} ended normally"),
            other => panic!("request {i}: last event {other:?}"),
        }
    }
    assert!(num_errors > 0, "the panicking step held requests");
    match next_incident(&incidents) {
        Incident::StepPanicked {
            num_failed_requests,
            rebuilding: true,
            ..
        } => assert_eq!(num_failed_requests, num_errors),
        other => panic!("{other:?}"),
    }

    // Rebuilding (held at the gate): a request is refused at once; stats still answer.
    let evs = request_events(&handle, greedy(prompt(6, 1), 4, None));
    match &evs[..] {
        [TokenEvent::Unavailable(e)] => assert!(
            e.starts_with("the model is not serving: the engine is restarting after it failed at ")
                && e.contains(" UTC: panic in step: test executor panics in step 12; retry"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    let stats = handle.stats().unwrap();
    assert_eq!(
        (
            stats.num_engine_failures,
            stats.num_kv_blocks_total,
            stats.num_running + stats.num_waiting
        ),
        (1, 0, 0),
        "{stats:?}"
    );
    gate_tx.send(Ok(())).unwrap();
    assert!(matches!(
        next_incident(&incidents),
        Incident::Rebuilt { .. }
    ));
    let (tx, rx) = crossbeam_channel::unbounded();
    let ids = submit_all(&tx);
    let events = collect_shared(&handle, &rx, &ids);
    for (i, (id, want)) in ids.iter().zip(&expected).enumerate() {
        assert_eq!(
            tokens_of(&events[id]),
            want.output_ids,
            "request {i} after the rebuild"
        );
    }

    // A second panic, and a rebuild that fails: the engine fails closed.
    let evs = request_events(
        &handle,
        greedy([prompt(3, 9), vec![POISON]].concat(), 4, None),
    );
    assert!(
        matches!(evs.last(), Some(TokenEvent::Error(e)) if e.contains("injected panic")),
        "{evs:?}"
    );
    assert!(matches!(
        next_incident(&incidents),
        Incident::StepPanicked {
            num_failed_requests: 1,
            rebuilding: true,
            ..
        }
    ));
    gate_tx.send(Err("no device left".into())).unwrap();
    match next_incident(&incidents) {
        Incident::RebuildFailed { error } => assert_eq!(error, "engine error: no device left"),
        other => panic!("{other:?}"),
    }
    for _ in 0..2 {
        let evs = request_events(&handle, greedy(prompt(6, 1), 4, None));
        match &evs[..] {
            [TokenEvent::Unavailable(e)] => assert!(
                e.starts_with("the model is not serving: the engine failed at ")
                    && e.contains(" UTC: panic in step: injected panic")
                    && e.ends_with(
                        "; rebuilding it failed: engine error: no device left; reload the model"
                    ),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(handle.stats().unwrap().num_engine_failures, 2);
    drop(engine);
    assert!(incidents.try_recv().is_err(), "nothing after the failure");
}

/// With `Recovery::FailClosed` (`Engine::start`, `options::start_checkpoint`), a panicked step
/// fails the requests in flight once each, and every later request is refused, saying when and
/// why the engine failed and that the model must be reloaded.
#[test]
fn a_fail_closed_engine_refuses_every_request_after_a_panic() {
    let (cpu, info, scheduler) = cpu_executor(&overlap_options());
    let engine = Engine::start_with(
        Box::new(cpu),
        info,
        EngineSetup {
            scheduler,
            recovery: Recovery::FailClosed,
            faults: FaultInjection {
                panic_token_id: Some(POISON),
            },
            report_timings: false,
        },
    )
    .unwrap();
    let (handle, incidents) = (engine.handle(), engine.incidents());
    let (tx, rx) = crossbeam_channel::unbounded();
    let ids: Vec<_> = [
        greedy(prompt(5, 1), 10, None),
        greedy([prompt(3, 2), vec![POISON]].concat(), 10, None),
    ]
    .into_iter()
    .map(|r| submit_to(&handle, r, tx.clone()).unwrap().0)
    .collect();
    let events = collect_shared(&handle, &rx, &ids);
    for id in &ids {
        match events[id].last() {
            Some(TokenEvent::Error(e)) => assert!(
                e.starts_with("engine failed: panic in step: injected panic")
                    && e.ends_with("the engine serves no more, the model must be reloaded"),
                "{e}"
            ),
            other => panic!("{other:?}"),
        }
    }
    assert!(matches!(
        next_incident(&incidents),
        Incident::StepPanicked {
            num_failed_requests: 2,
            rebuilding: false,
            ..
        }
    ));
    let evs = request_events(&handle, greedy(prompt(5, 1), 10, None));
    match &evs[..] {
        [TokenEvent::Unavailable(e)] => assert!(
            e.starts_with("the model is not serving: the engine failed at ")
                && e.contains(" UTC: panic in step: injected panic")
                && e.ends_with("; reload the model"),
            "{e}"
        ),
        other => panic!("{other:?}"),
    }
    drop(engine);
    assert!(incidents.try_recv().is_err());
}

/// The executor owns each request's penalty history and updates it with every generated token:
/// a huge repetition penalty (which also counts the prompt) plus the largest presence and
/// frequency penalties make a greedy request never repeat a token it generated, on both the
/// host-delivering and the overlapping executor (without the update the same prompt repeats,
/// checked first so the test can fail).
#[test]
fn penalties_see_every_generated_token() {
    let max_tokens = 24;
    let p = prompt(5, 9);
    let plain = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
    let out = collect(&plain.handle(), greedy(p.clone(), max_tokens, None)).output_ids;
    let distinct: std::collections::HashSet<_> = out.iter().collect();
    assert!(
        distinct.len() < out.len(),
        "the unpenalized greedy output should repeat a token: {out:?}"
    );
    drop(plain);
    let penalized = |engine: &triton_ferrum::engine::Engine| {
        let mut req = greedy(p.clone(), max_tokens, None);
        req.sampling.repetition_penalty = 1e4;
        req.sampling.presence_penalty = 2.0;
        req.sampling.frequency_penalty = 2.0;
        collect(&engine.handle(), req).output_ids
    };
    let host = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
    let overlapped = overlapped_engine(None, Duration::ZERO);
    for (kind, out) in [
        ("host", penalized(&host.engine)),
        ("overlapped", penalized(&overlapped)),
    ] {
        let distinct: std::collections::HashSet<_> = out.iter().collect();
        assert_eq!(
            distinct.len(),
            out.len(),
            "{kind}: a token repeats: {out:?}"
        );
        assert_eq!(out.len(), max_tokens, "{kind}");
    }
}

/// A request for an engine that has stopped is refused as unavailable (the request itself is
/// fine: Triton answers UNAVAILABLE, not INVALID_ARG).
#[test]
fn a_stopped_engine_refuses_requests_as_unavailable() {
    let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
    let handle = e.handle();
    assert_eq!(
        collect(&handle, greedy(prompt(3, 1), 2, None))
            .output_ids
            .len(),
        2
    );
    drop(e);
    let err = submit(&handle, greedy(prompt(3, 1), 2, None))
        .err()
        .unwrap();
    assert!(matches!(err, RequestError::Unavailable(_)), "{err:?}");
    assert!(err.to_string().contains("not running"), "{err}");
}
