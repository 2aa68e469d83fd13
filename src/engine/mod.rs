//! The engine thread: the one owner of the scheduler, the executor (which holds the KV cache and
//! every request's sampling state) and every request's detokenization and stop state. Other threads talk to it only through a cheap,
//! cloneable `EngineHandle` (submit, abort) over a channel; each request's events come back on its
//! own channel. Loop: intake → schedule → execute → sample → update → emit, where a step's
//! events (detokenization, stop strings, sending) are emitted while the device runs the next
//! step.
//!
//! Guarantees: every accepted request receives exactly one final event (`finish` set, `Finished`,
//! `Error` or `Unavailable`), also on abort, executor failure, a panicking step and shutdown; a
//! removed request's KV blocks are freed at once (`Scheduler::remove`).
//!
//! Failures. A step that returns an error fails the requests in it, and the engine serves on. A
//! step that panics (a bug: an executor indexing past a short block table, a broken invariant)
//! leaves the scheduler, the KV cache, the executor and the sampling state in a condition nothing
//! can trust: the engine thread catches the panic (`Supervisor::run`), sends every request it
//! held (running, waiting, or with a token not yet delivered) one `Error` naming the panic, and
//! drops all of that state. Then, with `Recovery::Rebuild`, a new executor is built (weights read
//! again) on a helper thread while new requests are refused at once with `Unavailable`, and the
//! engine serves again; with `Recovery::FailClosed`, or when the rebuild fails, every later
//! request is refused, saying when and why the engine failed. Each of these is reported on
//! `Engine::incidents` (the Triton backend logs them). `FaultInjection` makes a step panic on
//! purpose, for tests.

use std::any::Any;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::ffi::OsString;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, select};

use crate::executor::{Executor, SamplingSetup};
use crate::request::{FinishReason, GenerateRequest, RequestError, SeqId, TokenEvent};
use crate::sampling::Sampled;
use crate::scheduler::{SchedulePlan, Scheduler, SchedulerConfig};
use crate::tokenizer::{IncrementalDecoder, StopStringMatcher};

mod handle;
mod supervisor;
mod timing;
mod worker;

use handle::{Admission, EventSink, EventTarget, Orphan};
pub use handle::{EngineHandle, RequestStream, is_final};
use supervisor::*;
pub use supervisor::{
    EngineSetup, Failure, FaultInjection, INJECT_PANIC_TOKEN_VAR, Incident, Recovery,
};
use timing::RequestClock;
pub use timing::{RequestOutcome, RequestTimings};
use worker::*;

pub use crate::request::ModelInfo;

/// Counters since start, plus the KV cache and queue occupancy at the time of the
/// `EngineHandle::stats` call (read from the scheduler's `KvCacheManager`, so an aborted
/// request's blocks are already back in `num_kv_blocks_free` when its final event is out).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    /// Steps run (one executor call over one `SchedulePlan` each), failed and panicked ones
    /// included.
    pub num_steps: u64,
    /// Sequences preempted to free KV blocks (recomputed when readmitted); a sequence preempted
    /// twice counts twice.
    pub num_preemptions: u64,
    /// Prompt tokens of admitted requests, counted once at admission (not again on recompute).
    pub num_prompt_tokens: u64,
    /// Tokens sampled and accepted, stop tokens included.
    pub num_generated_tokens: u64,
    /// Requests that ended with `FinishReason::Stop` or `Length`.
    pub num_finished: u64,
    /// Requests that ended with `Abort` (`EngineHandle::abort`, a dropped `RequestStream`,
    /// shutdown) or whose receiver was gone when a token was sent; errors count in neither.
    pub num_aborted: u64,
    /// KV cache blocks in the pool; capacity in tokens is `num_kv_blocks_total * block_size`.
    pub num_kv_blocks_total: usize,
    /// Blocks held by some sequence (`num_kv_blocks_total - num_kv_blocks_free`).
    pub num_kv_blocks_used: usize,
    /// Blocks a sequence can still get: unused ones plus evictable prefix-cache blocks.
    pub num_kv_blocks_free: usize,
    /// Token positions per KV cache block.
    pub block_size: usize,
    /// Sequences holding KV blocks and a batch seat (scheduled each step).
    pub num_running: usize,
    /// Sequences admitted but not yet (or no longer, after preemption) running.
    pub num_waiting: usize,
    /// `max_num_seqs`: the most sequences that run at once.
    pub max_num_seqs: usize,
    /// Prefix caching (`enable_kv_cache_reuse`): blocks kept for reuse (in use or evictable;
    /// evictable ones also count as free), and prompt tokens whose K/V came from them instead of
    /// being computed (a recompute after preemption counts again).
    pub num_kv_blocks_cached: usize,
    /// Prompt tokens since start whose K/V came from the prefix cache (see `num_kv_blocks_cached`;
    /// kept across engine rebuilds).
    pub num_reused_prompt_tokens: u64,
    /// Steps that panicked. Each failed every request in flight and discarded the engine's state
    /// (`Recovery`).
    pub num_engine_failures: u64,
    /// Requests that waited past their queue timeout before their first step and ended with
    /// `Unavailable` (`BatchingOptions::queue_timeout`, `QueueParams::queue_timeout`).
    pub num_queue_timeouts: u64,
}

enum Command {
    Submit(Box<Submission>),
    Abort(SeqId),
    Stats(Sender<EngineStats>),
    Shutdown,
}

struct Submission {
    seq_id: SeqId,
    request: GenerateRequest,
    events: EventTarget,
    /// When `submit` took the request (the start of its queue time and latency).
    arrival: Instant,
}

/// Owns the engine thread; dropping it shuts the engine down (in-flight requests get a final
/// `Abort` event) and joins the thread.
pub struct Engine {
    handle: EngineHandle,
    incidents: Receiver<Incident>,
    timings: Option<Receiver<RequestTimings>>,
    thread: Option<JoinHandle<()>>,
}

/// Builds an executor like the one the engine started with (same model, device and limits):
/// `Recovery::Rebuild` calls it after a step panicked, once the old executor is dropped (so a
/// GPU has its memory back). It runs on a helper thread.
pub type BuildExecutor = Box<dyn FnMut() -> crate::Result<Box<dyn Executor>> + Send>;

impl Engine {
    /// Starts an engine that fails closed if a step panics, with the faults of the environment
    /// (`FaultInjection::from_env`).
    pub fn start(
        executor: Box<dyn Executor>,
        scheduler_config: SchedulerConfig,
        info: ModelInfo,
    ) -> crate::Result<Engine> {
        Self::start_with(
            executor,
            info,
            EngineSetup {
                scheduler: scheduler_config,
                recovery: Recovery::FailClosed,
                faults: FaultInjection::from_env()?,
                report_timings: false,
            },
        )
    }

    /// Starts the engine thread serving with `executor`; `setup` says how it schedules, what it
    /// does after a panicking step and which faults it injects.
    pub fn start_with(
        executor: Box<dyn Executor>,
        info: ModelInfo,
        setup: EngineSetup,
    ) -> crate::Result<Engine> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (incidents_tx, incidents) = crossbeam_channel::unbounded();
        let (orphans_tx, orphans) = crossbeam_channel::unbounded();
        let (timings_tx, timings) = match setup.report_timings {
            true => {
                let (tx, rx) = crossbeam_channel::unbounded();
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let info = Arc::new(info);
        let mut supervisor = Supervisor {
            info: info.clone(),
            scheduler_config: setup.scheduler.clone(),
            recovery: setup.recovery,
            faults: setup.faults,
            seed_base: seed_base(),
            stats: EngineStats::default(),
            orphans_tx,
            orphans,
            incidents: incidents_tx,
            timings: timings_tx,
        };
        let admission = Admission::new(
            setup.scheduler.batching.max_num_seqs,
            setup.scheduler.batching.max_queue_size,
        );
        let worker = supervisor.worker(executor, setup.scheduler)?;
        let thread = std::thread::Builder::new()
            .name("ferrum-engine".into())
            .spawn(move || supervisor.run(worker, rx))
            .map_err(|e| crate::Error::Engine(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            handle: EngineHandle {
                commands: tx,
                next_id: Arc::new(AtomicU64::new(1)),
                info,
                admission,
            },
            incidents,
            timings,
            thread: Some(thread),
        })
    }

    /// A new handle to the engine thread (cheap: channel ends and `Arc`s). It outlives the
    /// `Engine` harmlessly: after shutdown `submit` fails and `stats` returns None.
    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// The engine's incidents, in order, for one reader (every clone reads the same channel).
    pub fn incidents(&self) -> Receiver<Incident> {
        self.incidents.clone()
    }

    /// The timings of every request the engine admitted, one `RequestTimings` each as its final
    /// event goes out (not for a request refused at submission or failed by a panicking step);
    /// None unless the engine was started with `EngineSetup::report_timings`. Unbounded: its
    /// reader must keep draining it while the engine serves.
    pub fn request_timings(&self) -> Option<Receiver<RequestTimings>> {
        self.timings.clone()
    }

    /// Stops the engine thread and joins it. Every request submitted before the call gets its
    /// final event first (`Finished { reason: Abort }` while serving, `Unavailable` while
    /// refusing). Idempotent; `Drop` calls it.
    pub fn shutdown(&mut self) {
        let _ = self.handle.commands.send(Command::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub mod options;
pub use options::{Device, EngineOptions, LoadedEngine};
