//! Engine behaviour on a tiny fixture model: in-flight batching invariance (with chunked prefill
//! and preemption), aborts, seeds, stop conditions, and request validation errors.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use triton_ferrum::engine::is_final;
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::{
    FinishReason, Prompt, RequestError, SamplingParams, StopCriteria, TokenEvent,
};

fn model_dir() -> std::path::PathBuf {
    fixtures().join("models/llama_gqa_llama3")
}

fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 101 + 5) % 300 + 3)
        .collect()
}

/// Greedy outputs of 16 mixed-length requests arriving at different steps equal their outputs
/// when run alone — with a small token budget (chunked prefill) and a KV cache too small for all
/// of them at once (preemption and recompute).
#[test]
fn batch_invariance_under_chunking_and_preemption() {
    batch_invariance(false);
}

/// The same with prefix caching on: preempted requests may resume from their own cached blocks.
#[test]
fn batch_invariance_under_chunking_and_preemption_with_kv_cache_reuse() {
    batch_invariance(true);
}

fn batch_invariance(kv_cache_reuse: bool) {
    let lens = [1usize, 3, 7, 12, 20, 33, 5, 2, 17, 9, 41, 4, 26, 11, 8, 15];
    let max_tokens = 12;
    let alone = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
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

    let batched = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |o| {
        o.max_num_batched_tokens = 16;
        o.block_size = 4;
        // 28 blocks * 4 = 112 token slots: far less than the ~400 the 16 requests need together.
        o.max_tokens_in_paged_kv_cache = Some(112);
        o.max_num_seqs = 16;
        o.max_model_len = Some(64);
        o.enable_kv_cache_reuse = kv_cache_reuse;
    });
    let handle = batched.handle();
    let mut streams = vec![];
    for (i, &n) in lens.iter().enumerate() {
        let mut s = handle
            .submit(greedy(prompt(n, i as u32), max_tokens, None))
            .unwrap();
        // Let the engine take a few steps between arrivals.
        if i % 4 == 3 {
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
            o.block_size = 4;
            o.enable_kv_cache_reuse = reuse;
        });
        let h = e.handle();
        // The first request alone fills the cache; the rest arrive together.
        let mut outs = vec![collect(&h, greedy(prompts[0].clone(), max_tokens, Some(2)))];
        let streams: Vec<_> = prompts[1..]
            .iter()
            .map(|p| h.submit(greedy(p.clone(), max_tokens, Some(2))).unwrap())
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
    let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |o| {
        o.block_size = 4;
        o.max_tokens_in_paged_kv_cache = Some(64);
        o.max_model_len = Some(64);
    });
    let handle = e.handle();
    let idle = handle.stats().unwrap();
    assert_eq!(
        (idle.num_kv_blocks_total, idle.block_size, idle.max_num_seqs),
        (16, 4, 64),
        "64 tokens of KV cache in blocks of 4: {idle:?}"
    );
    assert_eq!(idle.num_kv_blocks_used, 0);
    assert_eq!(idle.num_kv_blocks_free, 16);
    let mut s = handle.submit(greedy(prompt(10, 1), 50, None)).unwrap();
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
    let s = handle.submit(greedy(prompt(5, 3), 100, None)).unwrap();
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
    let err = |req| handle.submit(req).err().unwrap();
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
    // The engine still serves after all of that.
    assert_eq!(
        collect(&handle, greedy(prompt(3, 1), 2, None))
            .output_ids
            .len(),
        2
    );
}
