//! Engine behaviour on a tiny fixture model: in-flight batching invariance (with chunked prefill
//! and preemption), aborts, seeds, stop conditions, request validation errors, surviving a
//! panicking step (rebuild, refusals meanwhile, failing closed), and per-request timings.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use triton_ferrum::engine::{
    Device, Engine, EngineHandle, EngineOptions, EngineSetup, FaultInjection, Incident, Recovery,
    RequestOutcome, RequestTimings, is_final, options,
};
use triton_ferrum::executor::Executor;
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::{
    FinishReason, GenerateRequest, ModelInfo, Prompt, RequestError, RequestSpec, SamplingParams,
    StopCriteria, TokenEvent,
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

/// The CPU executor behind test knobs. `on_device`: it reports that it `overlaps` host work
/// with its steps, as the CUDA executor does, so the engine plans the next step before it has
/// delivered the previous one's tokens and delivers them inside `execute` (here: before the
/// CPU step, with the plan already made: a sequence stopped by a string there is still in the
/// step, its token dropped); otherwise the engine delivers before planning. `step_time`
/// stretches every step to at least that long (a slower device, so that a test acts while a
/// request runs); with `fail_at_step`, that step fails after its overlap ran; with
/// `panic_at_step`, that step panics before anything else (before its overlap: the previous
/// step's tokens are still undelivered).
struct TestExecutor {
    cpu: triton_ferrum::executor::cpu::CpuExecutor,
    on_device: bool,
    num_steps: usize,
    fail_at_step: Option<usize>,
    panic_at_step: Option<usize>,
    step_time: Duration,
}

impl TestExecutor {
    fn new(cpu: triton_ferrum::executor::cpu::CpuExecutor, on_device: bool) -> Self {
        TestExecutor {
            cpu,
            on_device,
            num_steps: 0,
            fail_at_step: None,
            panic_at_step: None,
            step_time: Duration::ZERO,
        }
    }
}

impl triton_ferrum::executor::Executor for TestExecutor {
    fn describe(&self) -> String {
        format!("{} (test knobs)", self.cpu.describe())
    }
    fn num_kv_blocks(&self) -> usize {
        self.cpu.num_kv_blocks()
    }
    fn block_size(&self) -> usize {
        self.cpu.block_size()
    }
    fn vocab_size(&self) -> usize {
        self.cpu.vocab_size()
    }
    fn add_request(
        &mut self,
        seq_id: triton_ferrum::request::SeqId,
        setup: &triton_ferrum::executor::SamplingSetup<'_>,
    ) -> triton_ferrum::Result<()> {
        self.cpu.add_request(seq_id, setup)
    }
    fn remove_request(&mut self, seq_id: triton_ferrum::request::SeqId) {
        self.cpu.remove_request(seq_id)
    }
    /// The CPU step (its overlap first), stretched to `step_time`.
    fn execute(
        &mut self,
        plan: &triton_ferrum::scheduler::SchedulePlan,
        overlap: &mut dyn FnMut(),
    ) -> triton_ferrum::Result<Vec<triton_ferrum::sampling::Sampled>> {
        if self.panic_at_step == Some(self.num_steps + 1) {
            panic!("test executor panics in step {}", self.num_steps + 1);
        }
        let start = std::time::Instant::now();
        let out = self.cpu.execute(plan, overlap)?;
        std::thread::sleep(self.step_time.saturating_sub(start.elapsed()));
        self.num_steps += 1;
        if self.fail_at_step == Some(self.num_steps) {
            return Err(triton_ferrum::Error::Device("injected failure".into()));
        }
        Ok(out)
    }
    fn overlaps(&self) -> bool {
        self.on_device
    }
    fn logits(
        &mut self,
        plan: &triton_ferrum::scheduler::SchedulePlan,
    ) -> triton_ferrum::Result<triton_ferrum::executor::Logits> {
        self.cpu.logits(plan)
    }
}

fn overlap_options() -> triton_ferrum::engine::EngineOptions {
    let mut o = triton_ferrum::engine::EngineOptions::new(model_dir());
    o.tokenizer = Some(fixtures().join("tokenizer/hf_tiny"));
    o.kv.block_size = 4;
    o.kv.max_tokens = Some(40 * 4);
    o.batching.max_num_batched_tokens = 24;
    o.batching.max_num_seqs = 16;
    o.max_model_len = Some(64);
    o
}

/// An engine on the CPU executor wrapped by `wrap` (a test executor), with the limits of `opts`
/// (block size, KV cache tokens, batch limits, max_model_len and tokenizer).
fn engine_with(
    opts: &triton_ferrum::engine::EngineOptions,
    wrap: impl FnOnce(
        triton_ferrum::executor::cpu::CpuExecutor,
    ) -> Box<dyn triton_ferrum::executor::Executor>,
) -> triton_ferrum::engine::Engine {
    let (cpu, info, scheduler) = cpu_executor(opts);
    triton_ferrum::engine::Engine::start(wrap(cpu), scheduler, info).unwrap()
}

/// A CPU executor with the limits of `opts` (see `engine_with`), the model's facts and the
/// scheduler configuration to match.
fn cpu_executor(
    opts: &triton_ferrum::engine::EngineOptions,
) -> (
    triton_ferrum::executor::cpu::CpuExecutor,
    triton_ferrum::engine::ModelInfo,
    triton_ferrum::scheduler::SchedulerConfig,
) {
    use triton_ferrum::engine::{ModelInfo, options};
    use triton_ferrum::executor::cpu::CpuExecutor;
    use triton_ferrum::model::Checkpoint;
    use triton_ferrum::scheduler::{BatchingOptions, SchedulerConfig};

    let ckpt = Checkpoint::open(&opts.model, opts.tokenizer.as_deref()).unwrap();
    let spec = ckpt.arch.spec.clone();
    let max_model_len = opts.max_model_len.unwrap();
    let num_blocks = opts.kv.max_tokens.unwrap() / opts.kv.block_size;
    let weights = options::load_weights(&ckpt, WeightFormat::F32, false).unwrap();
    let cpu = CpuExecutor::new(spec.clone(), weights, num_blocks, opts.kv.block_size, 0).unwrap();
    let info = ModelInfo {
        vocab_size: spec.vocab_size,
        max_model_len,
        eos_token_ids: ckpt.eos_token_ids(),
        tokenizer: ckpt.tokenizer.clone(),
        bans_words: true,
    };
    let scheduler = SchedulerConfig {
        batching: BatchingOptions {
            enable_chunked_prefill: true,
            enable_prefix_caching: false,
            ..opts.batching.clone()
        },
        block_size: opts.kv.block_size,
        num_blocks,
        max_model_len,
    };
    (cpu, info, scheduler)
}

/// An engine with the limits of `opts` whose host-sampling `TestExecutor` stretches every step
/// to at least `step_time`, so that a test acts while requests run or wait.
fn slow_engine(
    opts: &triton_ferrum::engine::EngineOptions,
    step_time: Duration,
) -> triton_ferrum::engine::Engine {
    engine_with(opts, |cpu| {
        Box::new(TestExecutor {
            step_time,
            ..TestExecutor::new(cpu, false)
        })
    })
}

/// An engine on a device-sampling `TestExecutor` with the limits of `overlap_options`.
fn overlapped_engine(
    fail_at_step: Option<usize>,
    step_time: Duration,
) -> triton_ferrum::engine::Engine {
    engine_with(&overlap_options(), |cpu| {
        Box::new(TestExecutor {
            fail_at_step,
            step_time,
            ..TestExecutor::new(cpu, true)
        })
    })
}

/// Twelve text requests: every third stopped by a string, every third by a stop id, the rest by
/// max_tokens (strings and ids taken from the free-running outputs of `reference`), and what the
/// host-sampling `reference` engine gives for them, submitted together.
fn overlap_requests(
    reference: &TestEngine,
) -> (Vec<triton_ferrum::request::RequestSpec>, Vec<Collected>) {
    let request = |i: usize| {
        let mut r = greedy(prompt(3 + 5 * i, i as u32), 20, None);
        r.detokenize = true;
        r
    };
    let requests = requests_with_stops(&reference.handle(), request);
    let handle = reference.handle();
    let streams: Vec<_> = requests
        .iter()
        .map(|r| submit(&handle, r.clone()).unwrap())
        .collect();
    let expected: Vec<Collected> = streams.into_iter().map(collect_stream).collect();
    assert!(
        (0..12)
            .step_by(3)
            .all(|i| expected[i].finish.as_deref() == Some("stop")
                && expected[i].output_ids.len() < 20),
        "every stop string ends its request early: {expected:?}"
    );
    (requests, expected)
}

/// Reads a shared event channel until each of `ids` has had its final event, then until the
/// engine is idle, and returns every event per request. Fails on an event after a request's
/// final one (the requests' own streams would hide it: they end at the final event).
fn collect_shared(
    handle: &triton_ferrum::engine::EngineHandle,
    rx: &crossbeam_channel::Receiver<(triton_ferrum::request::SeqId, TokenEvent)>,
    ids: &[triton_ferrum::request::SeqId],
) -> std::collections::HashMap<triton_ferrum::request::SeqId, Vec<TokenEvent>> {
    let mut events: std::collections::HashMap<_, Vec<TokenEvent>> = Default::default();
    let mut finished = std::collections::HashSet::new();
    let mut take = |id, ev: TokenEvent, finished: &mut std::collections::HashSet<_>| {
        assert!(
            !finished.contains(&id),
            "{id:?}: {ev:?} after its final event"
        );
        if is_final(&ev) {
            finished.insert(id);
        }
        events.entry(id).or_default().push(ev);
    };
    while !ids.iter().all(|id| finished.contains(id)) {
        let (id, ev) = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("every request ends within 30 s");
        take(id, ev, &mut finished);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let stats = handle.stats().unwrap();
        while let Ok((id, ev)) = rx.try_recv() {
            take(id, ev, &mut finished);
        }
        if stats.num_running + stats.num_waiting == 0 || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    events
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

/// `max_queue_size`: with `max_num_seqs` 2 and a queue of 3, a burst of 4 × `max_num_seqs`
/// requests gets exactly 3 busy refusals (UNAVAILABLE, naming the bound) while the slow engine
/// holds the first 5; every admitted request completes, and once they have, the places are free
/// again.
#[test]
fn a_full_queue_refuses_at_once_as_busy_and_frees_its_places() {
    let mut opts = triton_ferrum::engine::EngineOptions::new(model_dir());
    opts.batching.max_num_seqs = 2;
    opts.batching.max_queue_size = Some(3);
    opts.kv.block_size = 4;
    opts.kv.max_tokens = Some(256);
    opts.max_model_len = Some(64);
    // 30 tokens of at least 5 ms each: nothing ends while the burst is submitted.
    let e = slow_engine(&opts, Duration::from_millis(5));
    let handle = e.handle();
    let results: Vec<_> = (0..8)
        .map(|i| submit(&handle, greedy(prompt(4, i), 30, None)))
        .collect();
    let (admitted, refused): (Vec<_>, Vec<_>) = results.into_iter().partition(Result::is_ok);
    assert_eq!((admitted.len(), refused.len()), (5, 3));
    for r in refused {
        let err = r.err().unwrap();
        assert!(matches!(err, RequestError::Unavailable(_)), "{err:?}");
        let msg = err.to_string();
        assert!(
            msg.contains("busy") && msg.contains("max_queue_size (3)"),
            "{msg}"
        );
    }
    for s in admitted {
        let c = collect_stream(s.unwrap());
        assert_eq!((c.output_ids.len(), c.num_final_events), (30, 1));
    }
    // Every place is back: a second burst is admitted the same way.
    let again: Vec<_> = (0..5)
        .map(|i| submit(&handle, greedy(prompt(4, i), 2, None)))
        .collect();
    assert!(again.iter().all(Result::is_ok));
    for s in again {
        assert_eq!(collect_stream(s.unwrap()).output_ids.len(), 2);
    }
}

// ---- per-request timings (EngineOptions::report_timings) ---------------------------------------

/// An engine reporting timings, one request at a time, prompts chunked by a budget of 16 tokens;
/// each step takes at least `step_time`, and with `on_device` a step's tokens are delivered
/// while the next step runs.
fn timed_engine(step_time: Duration, on_device: bool) -> Engine {
    let mut opts = overlap_options();
    opts.batching.max_num_seqs = 1;
    opts.batching.max_num_batched_tokens = 16;
    opts.kv.max_tokens = Some(256);
    opts.max_model_len = Some(128);
    let (cpu, info, scheduler) = cpu_executor(&opts);
    Engine::start_with(
        Box::new(TestExecutor {
            step_time,
            ..TestExecutor::new(cpu, on_device)
        }),
        info,
        EngineSetup {
            scheduler,
            recovery: Recovery::FailClosed,
            faults: FaultInjection::default(),
            report_timings: true,
        },
    )
    .unwrap()
}

fn next_timings(rx: &crossbeam_channel::Receiver<RequestTimings>) -> RequestTimings {
    rx.recv_timeout(Duration::from_secs(60))
        .expect("no timings within 60 s")
}

/// The parts of a completed request's timings fit together: queue <= first token <= end, and
/// the first token plus the intervals between tokens is the whole latency (the last token and
/// the final event go out in the same delivery).
fn check_timings(t: &RequestTimings, num_prompt_tokens: usize, num_generated: usize) {
    assert_eq!(t.outcome, RequestOutcome::Completed, "{t:?}");
    assert_eq!(t.num_prompt_tokens, num_prompt_tokens, "{t:?}");
    assert_eq!(t.num_generated_tokens, num_generated, "{t:?}");
    assert_eq!(t.inter_token_latencies.len(), num_generated - 1, "{t:?}");
    let queue = t.queue_time.unwrap();
    let ttft = t.time_to_first_token.unwrap();
    assert!(queue <= ttft && ttft <= t.e2e_latency, "{t:?}");
    let decode: f64 = t.inter_token_latencies.iter().map(|&s| s as f64).sum();
    let whole = ttft.as_secs_f64() + decode;
    assert!(
        (whole - t.e2e_latency.as_secs_f64()).abs() < 1e-3,
        "ttft + intervals = {whole} s, e2e = {:?}: {t:?}",
        t.e2e_latency
    );
}

#[test]
fn every_request_reports_consistent_timings_once() {
    for on_device in [false, true] {
        let step = Duration::from_millis(2);
        let e = timed_engine(step, on_device);
        let (handle, rx) = (e.handle(), e.request_timings().unwrap());
        // A: a 40-token prompt, prefilled in three chunks of at most 16 tokens. B arrives with
        // it but waits: one request runs at a time.
        let a = submit(&handle, greedy(prompt(40, 1), 12, None)).unwrap();
        let b = submit(&handle, greedy(prompt(5, 2), 7, None)).unwrap();
        let (a_id, b_id) = (a.seq_id, b.seq_id);
        let (ca, cb) = (collect_stream(a), collect_stream(b));
        assert_eq!((ca.output_ids.len(), cb.output_ids.len()), (12, 7));
        let (ta, tb) = (next_timings(&rx), next_timings(&rx));
        assert_eq!(
            (ta.seq_id, tb.seq_id),
            (a_id, b_id),
            "in the order they ended"
        );
        check_timings(&ta, 40, 12);
        check_timings(&tb, 5, 7);
        // A's queue time ends at its first chunk, two steps before its first token; every
        // interval spans at least one step.
        let (queue, ttft) = (ta.queue_time.unwrap(), ta.time_to_first_token.unwrap());
        assert!(queue + 2 * step <= ttft, "on_device {on_device}: {ta:?}");
        assert!(
            ta.inter_token_latencies
                .iter()
                .all(|&s| s >= 0.9 * step.as_secs_f32())
        );
        // B was scheduled only once A had finished: it queued for (about) A's whole latency.
        assert!(
            tb.queue_time.unwrap() + Duration::from_millis(1) >= ta.e2e_latency,
            "on_device {on_device}: B queued {:?}, A took {:?}",
            tb.queue_time,
            ta.e2e_latency
        );
        assert!(rx.try_recv().is_err(), "one timings per request");
    }
}

#[test]
fn aborted_requests_report_what_they_got() {
    let e = timed_engine(Duration::from_millis(5), false);
    let (handle, rx) = (e.handle(), e.request_timings().unwrap());
    // A runs (100 tokens of at least 5 ms); B waits behind it and is aborted before it is ever
    // scheduled.
    let mut a = submit(&handle, greedy(prompt(6, 3), 100, None)).unwrap();
    let b = submit(&handle, greedy(prompt(4, 4), 5, None)).unwrap();
    let mut seen = 0;
    while seen < 3 {
        if let Some(TokenEvent::Token { .. }) = a.recv() {
            seen += 1;
        }
    }
    handle.abort(b.seq_id);
    let tb = next_timings(&rx);
    assert_eq!((tb.seq_id, tb.outcome), (b.seq_id, RequestOutcome::Aborted));
    assert_eq!((tb.queue_time, tb.time_to_first_token), (None, None));
    assert_eq!((tb.num_prompt_tokens, tb.num_generated_tokens), (4, 0));
    // A, aborted mid-generation, reports its first token and the intervals it delivered.
    handle.abort(a.seq_id);
    let delivered = seen + collect_stream(a).output_ids.len();
    assert!(delivered < 100);
    let ta = next_timings(&rx);
    assert_eq!(ta.outcome, RequestOutcome::Aborted);
    assert_eq!(ta.num_generated_tokens, delivered, "{ta:?}");
    assert_eq!(ta.inter_token_latencies.len(), delivered - 1);
    assert!(ta.time_to_first_token.unwrap() <= ta.e2e_latency);
    assert!(rx.try_recv().is_err());
}

#[test]
fn report_timings_is_an_engine_option_and_off_by_default() {
    let tweak = |on: bool| {
        move |o: &mut EngineOptions| {
            o.report_timings = on;
            o.kv.max_tokens = Some(256);
            o.max_model_len = Some(64);
        }
    };
    let off = TestEngine::start(&model_dir(), Some(WeightFormat::F32), tweak(false));
    assert!(off.engine.request_timings().is_none());
    assert!(!EngineOptions::new(model_dir()).report_timings);
    let on = TestEngine::start(&model_dir(), Some(WeightFormat::F32), tweak(true));
    let rx = on.engine.request_timings().unwrap();
    let c = collect(&on.handle(), greedy(prompt(5, 5), 3, None));
    assert_eq!(c.output_ids.len(), 3);
    check_timings(&next_timings(&rx), 5, 3);
}

/// Options of a slow engine with one seat and `max_queue_size` places behind it.
fn one_seat_options(max_queue_size: Option<usize>) -> triton_ferrum::engine::EngineOptions {
    let mut opts = triton_ferrum::engine::EngineOptions::new(model_dir());
    opts.batching.max_num_seqs = 1;
    opts.batching.max_queue_size = max_queue_size;
    opts.kv.block_size = 4;
    opts.kv.max_tokens = Some(256);
    opts.max_model_len = Some(128);
    opts
}

/// `greedy` at a priority level.
fn at_priority(mut spec: RequestSpec, priority: i64) -> RequestSpec {
    spec.queue.priority = priority;
    spec
}

/// Under saturation (one seat, held by a long request), requests of priority 5 finish before
/// every request of priority 0 submitted before them, each level in arrival order; priority -2
/// comes last.
#[test]
fn higher_priority_requests_finish_first_under_saturation() {
    let e = slow_engine(&one_seat_options(None), Duration::from_millis(5));
    let handle = e.handle();
    let (tx, rx) = crossbeam_channel::unbounded();
    let submit_at = |salt: u32, max_tokens: usize, priority: i64| {
        let spec = at_priority(greedy(prompt(4, salt), max_tokens, None), priority);
        let req = GenerateRequest::new(spec, handle.info()).unwrap();
        handle.submit_to(req, tx.clone()).unwrap().0
    };
    // 20 steps of at least 5 ms: the others all arrive while it runs (its first token is out, so
    // it holds the seat; before its first step it would compete with them by priority).
    let blocker = submit_at(0, 20, 0);
    while !matches!(rx.recv().unwrap(), (id, TokenEvent::Token { .. }) if id == blocker) {}
    let levels = [0, 5, -2, 0, 5, 0, 5];
    let ids: Vec<_> = levels
        .iter()
        .enumerate()
        .map(|(i, &p)| submit_at(1 + i as u32, 2, p))
        .collect();
    let mut finish_order = Vec::new();
    while finish_order.len() < 1 + ids.len() {
        let (id, ev) = rx.recv_timeout(Duration::from_secs(30)).unwrap();
        if is_final(&ev) {
            assert!(
                matches!(
                    ev,
                    TokenEvent::Token {
                        finish: Some(FinishReason::Length),
                        ..
                    }
                ),
                "{id}: {ev:?}"
            );
            finish_order.push(id);
        }
    }
    // Arrival index of each level: 5 at 1, 4, 6; 0 at 0, 3, 5; -2 at 2.
    let expected: Vec<_> = std::iter::once(blocker)
        .chain([1, 4, 6, 0, 3, 5, 2].map(|i| ids[i]))
        .collect();
    assert_eq!(finish_order, expected);
}

/// `spec` with its own queue timeout.
fn with_queue_timeout(mut spec: RequestSpec, timeout: Duration) -> RequestSpec {
    spec.queue.queue_timeout = Some(timeout);
    spec
}

/// The queue timeout: while one slow request holds the only seat, a request waiting past the
/// model's bound (30 ms) or its own (10 ms) ends with one `Unavailable` naming the bound and how
/// long it waited; one with a longer bound of its own waits and completes, and so does the
/// running request, which has been in the engine far longer than 30 ms. The places of the
/// timed-out requests are free at once (`max_queue_size`).
#[test]
fn a_request_waiting_past_its_queue_timeout_gets_one_unavailable_naming_the_bound() {
    let mut opts = one_seat_options(Some(3));
    opts.batching.queue_timeout = Some(Duration::from_millis(30));
    let e = slow_engine(&opts, Duration::from_millis(5));
    let handle = e.handle();
    let hour = Duration::from_secs(3600);
    // 100 steps of at least 5 ms: everything below happens while it runs.
    let mut blocker = submit(&handle, greedy(prompt(4, 0), 100, None)).unwrap();
    assert!(matches!(blocker.recv(), Some(TokenEvent::Started { .. })));
    let model_bound = submit(&handle, greedy(prompt(4, 1), 2, None)).unwrap();
    let own_bound = submit(
        &handle,
        with_queue_timeout(greedy(prompt(4, 2), 2, None), Duration::from_millis(10)),
    )
    .unwrap();
    let patient = submit(
        &handle,
        with_queue_timeout(greedy(prompt(4, 3), 2, None), hour),
    )
    .unwrap();
    for (stream, bound, whose) in [
        (model_bound, 30_000, "model's"),
        (own_bound, 10_000, "request's"),
    ] {
        let events: Vec<TokenEvent> = stream.collect();
        let [TokenEvent::Started { .. }, TokenEvent::Unavailable(msg)] = events.as_slice() else {
            panic!("{events:?}");
        };
        assert!(
            msg.contains(&format!("the {whose} queue_timeout_microseconds ({bound})"))
                && msg.contains("without being scheduled"),
            "{msg}"
        );
        let waited_ms: f64 = msg
            .split("waited ")
            .nth(1)
            .and_then(|rest| rest.split(" ms").next())
            .and_then(|ms| ms.parse().ok())
            .unwrap_or_else(|| panic!("no wait in {msg}"));
        assert!(waited_ms >= bound as f64 / 1000.0, "{msg}");
    }
    let stats = handle.stats().unwrap();
    assert_eq!(stats.num_queue_timeouts, 2, "{stats:?}");
    assert_eq!((stats.num_running, stats.num_waiting), (1, 1), "{stats:?}");
    // Two places are free again: two more are admitted, a third is busy.
    let more: Vec<_> = (4..6)
        .map(|i| {
            submit(
                &handle,
                with_queue_timeout(greedy(prompt(4, i), 2, None), hour),
            )
            .unwrap()
        })
        .collect();
    let busy = submit(&handle, greedy(prompt(4, 6), 2, None))
        .err()
        .unwrap();
    assert!(busy.to_string().contains("busy"), "{busy}");
    let blocker = collect_stream(blocker);
    assert_eq!(
        (blocker.output_ids.len(), blocker.num_final_events),
        (100, 1)
    );
    for s in std::iter::once(patient).chain(more) {
        let c = collect_stream(s);
        assert_eq!((c.output_ids.len(), c.num_final_events), (2, 1));
    }
    assert_eq!(handle.stats().unwrap().num_queue_timeouts, 2);
}

/// `bad_words` on the CPU engine: a one-id word never appears; a two-id word [a, b] lets `a`
/// through but never `b` right after it; the greedy output without them has both.
#[test]
fn bad_words_are_never_generated_and_a_longer_word_only_when_complete() {
    let e = TestEngine::start(&model_dir(), Some(WeightFormat::F32), |_| {});
    let handle = e.handle();
    let with_bad_words = |words: Vec<Vec<u32>>| {
        let mut spec = greedy(prompt(6, 9), 16, None);
        spec.sampling.bad_words = words;
        collect(&handle, spec).output_ids
    };
    let free = with_bad_words(vec![]);
    assert_eq!(free.len(), 16);
    let single = free[3];
    let out = with_bad_words(vec![vec![single]]);
    assert_eq!(
        out[..3],
        free[..3],
        "nothing changes before the banned token"
    );
    assert!(!out.contains(&single), "{single} in {out:?}");
    let (a, b) = (free[0], free[1]);
    let out = with_bad_words(vec![vec![a, b]]);
    assert_eq!(out[0], a, "the word's first id alone is allowed");
    assert_ne!(out[1], b);
    assert!(
        !out.windows(2).any(|w| w == [a, b]),
        "[{a}, {b}] completed in {out:?}"
    );
    // An id outside the vocabulary is refused, naming the field.
    let mut spec = greedy(prompt(6, 9), 4, None);
    spec.sampling.bad_words = vec![vec![1, 1 << 30]];
    let err = GenerateRequest::new(spec, handle.info()).unwrap_err();
    assert!(err.to_string().contains("bad_words"), "{err}");
    // An engine whose sampler cannot ban words (the GPU's) refuses them when the request is
    // built, naming the field; the CPU engine's can.
    assert!(handle.info().bans_words);
    let no_bans = ModelInfo {
        bans_words: false,
        ..handle.info().clone()
    };
    let mut spec = greedy(prompt(6, 9), 4, None);
    spec.sampling.bad_words = vec![vec![7]];
    let err = GenerateRequest::new(spec, &no_bans).unwrap_err();
    assert!(
        matches!(
            err,
            RequestError::InvalidValue {
                field: "bad_words",
                ..
            }
        ),
        "{err}"
    );
}
