//! Helpers shared by the engine tests (tests/engine.rs, tests/engine_serving.rs, used with
//! `mod engine_common;`): the fixture model, prompts, and `TestExecutor`, the CPU executor
//! behind test knobs (host work overlapped like the GPU's, slow, failing or panicking steps),
//! with the engines built on it. It owns no test.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use crate::common::*;
use triton_ferrum::engine::is_final;
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::TokenEvent;

pub fn model_dir() -> std::path::PathBuf {
    fixtures().join("models/llama_gqa_llama3")
}

pub fn prompt(len: usize, salt: u32) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (i * 37 + salt * 101 + 5) % 300 + 3)
        .collect()
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
pub struct TestExecutor {
    pub cpu: triton_ferrum::executor::cpu::CpuExecutor,
    pub on_device: bool,
    pub num_steps: usize,
    pub fail_at_step: Option<usize>,
    pub panic_at_step: Option<usize>,
    pub step_time: Duration,
}

impl TestExecutor {
    pub fn new(cpu: triton_ferrum::executor::cpu::CpuExecutor, on_device: bool) -> Self {
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

pub fn overlap_options() -> triton_ferrum::engine::EngineOptions {
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
pub fn engine_with(
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
pub fn cpu_executor(
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
pub fn slow_engine(
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
pub fn overlapped_engine(
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
pub fn overlap_requests(
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
pub fn collect_shared(
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
