//! The engine thread: the one owner of the scheduler, the KV cache (inside the executor) and every
//! request's sampling and detokenization state. Other threads talk to it only through a cheap,
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
use std::collections::HashMap;
use std::ffi::OsString;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError, select};

use crate::cuda::sampling::{RowSampling, SampleBatch, TokenHistory};
use crate::executor::Executor;
use crate::executor::cuda::row_sampling;
use crate::request::{
    FinishReason, GenerateRequest, Prompt, RequestError, SamplingParams, SeqId, TokenEvent,
};
use crate::sampling::{Penalties, Rng, Sampled, Sampler};
use crate::scheduler::{SchedulePlan, Scheduler, SchedulerConfig};
use crate::tokenizer::{IncrementalDecoder, StopStringMatcher, Tokenizer};

/// What the engine knows about its model that request validation needs.
#[derive(Clone)]
pub struct ModelInfo {
    pub vocab_size: usize,
    /// Prompt + generated tokens may not exceed this.
    pub max_model_len: usize,
    pub eos_token_ids: Vec<u32>,
    pub tokenizer: Option<Arc<Tokenizer>>,
}

/// Counters since start, plus the KV cache and queue occupancy at the time of the
/// `EngineHandle::stats` call (read from the scheduler's `KvCacheManager`, so an aborted
/// request's blocks are already back in `num_kv_blocks_free` when its final event is out).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct EngineStats {
    pub num_steps: u64,
    pub num_preemptions: u64,
    pub num_prompt_tokens: u64,
    pub num_generated_tokens: u64,
    pub num_finished: u64,
    pub num_aborted: u64,
    /// KV cache blocks in the pool; capacity in tokens is `num_kv_blocks_total * block_size`.
    pub num_kv_blocks_total: usize,
    /// Blocks held by some sequence (`num_kv_blocks_total - num_kv_blocks_free`).
    pub num_kv_blocks_used: usize,
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
    pub num_reused_prompt_tokens: u64,
    /// Steps that panicked. Each failed every request in flight and discarded the engine's state
    /// (`Recovery`).
    pub num_engine_failures: u64,
}

enum Command {
    Submit(Box<Submission>),
    Abort(SeqId),
    Stats(Sender<EngineStats>),
    Shutdown,
}

struct Submission {
    seq_id: SeqId,
    prompt_ids: Vec<u32>,
    request: GenerateRequest,
    events: EventTarget,
}

/// Where a request's events go: its own channel (`submit`), or a channel shared by many
/// requests with each event tagged by its `SeqId` (`submit_to`, e.g. one response thread
/// serving every request of a Triton model).
enum EventTarget {
    Own(Sender<TokenEvent>),
    Shared(Sender<(SeqId, TokenEvent)>),
}

impl EventTarget {
    /// False when the receiving side is gone.
    fn send(&self, seq_id: SeqId, ev: TokenEvent) -> bool {
        match self {
            EventTarget::Own(tx) => tx.send(ev).is_ok(),
            EventTarget::Shared(tx) => tx.send((seq_id, ev)).is_ok(),
        }
    }
}

/// A request's `EventTarget` plus the debt of its final event, while a worker holds the request.
/// Sending the final event (or finding the receiver gone) settles the debt and empties the sink.
/// A sink dropped unsettled (a panic unwinding through a step, or the state of a panicked worker
/// being dropped) hands its target to the engine thread's `orphans` channel, where the
/// `Supervisor` sends the final error naming the failure: no request is lost, wherever its state
/// was when the panic struck.
struct EventSink {
    seq_id: SeqId,
    target: Option<EventTarget>,
    orphans: Sender<Orphan>,
}

/// The target of a request whose sink was dropped before its final event.
type Orphan = (SeqId, EventTarget);

impl EventSink {
    /// False when the receiving side is gone (or the final event was sent already).
    fn send(&mut self, ev: TokenEvent) -> bool {
        let Some(target) = &self.target else {
            return false;
        };
        let last = is_final(&ev);
        let delivered = target.send(self.seq_id, ev);
        if last || !delivered {
            self.target = None;
        }
        delivered
    }
}

impl Drop for EventSink {
    fn drop(&mut self) {
        if let Some(target) = self.target.take() {
            // The receiver is the engine thread's own; it is only gone once that thread ends.
            let _ = self.orphans.send((self.seq_id, target));
        }
    }
}

/// A cheap, cloneable handle to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: Sender<Command>,
    next_id: Arc<AtomicU64>,
    info: Arc<ModelInfo>,
}

/// The events of one request. Dropping it before the final event aborts the request.
pub struct RequestStream {
    pub seq_id: SeqId,
    pub prompt_ids: Vec<u32>,
    events: Receiver<TokenEvent>,
    commands: Sender<Command>,
    finished: bool,
}

impl RequestStream {
    /// Next event; None after the final one (or if the engine is gone).
    pub fn recv(&mut self) -> Option<TokenEvent> {
        if self.finished {
            return None;
        }
        match self.events.recv() {
            Ok(ev) => {
                self.finished = is_final(&ev);
                Some(ev)
            }
            Err(_) => {
                self.finished = true;
                None
            }
        }
    }
}

impl Iterator for RequestStream {
    type Item = TokenEvent;
    fn next(&mut self) -> Option<TokenEvent> {
        self.recv()
    }
}

impl Drop for RequestStream {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.commands.send(Command::Abort(self.seq_id));
        }
    }
}

pub fn is_final(ev: &TokenEvent) -> bool {
    matches!(
        ev,
        TokenEvent::Token {
            finish: Some(_),
            ..
        } | TokenEvent::Finished { .. }
            | TokenEvent::Error(_)
            | TokenEvent::Unavailable(_)
    )
}

impl EngineHandle {
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Validates and tokenizes the request on the caller's thread, then queues it.
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream, RequestError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (seq_id, prompt_ids) = self.enqueue(request, EventTarget::Own(tx))?;
        Ok(RequestStream {
            seq_id,
            prompt_ids,
            events: rx,
            commands: self.commands.clone(),
            finished: false,
        })
    }

    /// Like `submit`, but the request's events go to `events`, a channel shared with other
    /// requests, tagged with the returned `SeqId`. The caller owns the request's lifetime: it
    /// must `abort` a request it stops listening to. Returns the id and the prompt's token ids.
    pub fn submit_to(
        &self,
        request: GenerateRequest,
        events: Sender<(SeqId, TokenEvent)>,
    ) -> Result<(SeqId, Vec<u32>), RequestError> {
        self.enqueue(request, EventTarget::Shared(events))
    }

    fn enqueue(
        &self,
        request: GenerateRequest,
        events: EventTarget,
    ) -> Result<(SeqId, Vec<u32>), RequestError> {
        let info = &self.info;
        let prompt_ids = match &request.prompt {
            Prompt::TokenIds(ids) => ids.clone(),
            Prompt::Text(text) => {
                let tok = info.tokenizer.as_ref().ok_or(RequestError::NoTokenizer {
                    field: "text_input",
                })?;
                tok.encode(text, true)
                    .map_err(|e| RequestError::Tokenizer(e.to_string()))?
            }
        };
        if prompt_ids.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if let Some(&bad) = prompt_ids
            .iter()
            .find(|&&id| id as usize >= info.vocab_size)
        {
            return Err(RequestError::TokenOutOfRange {
                field: "input_ids",
                token_id: bad.into(),
                vocab_size: info.vocab_size,
            });
        }
        // At least one token must fit after the prompt.
        if prompt_ids.len() >= info.max_model_len {
            return Err(RequestError::PromptTooLong {
                num_prompt_tokens: prompt_ids.len(),
                max_model_len: info.max_model_len,
            });
        }
        request.sampling.validate()?;
        request.stop.validate()?;
        if request.detokenize && info.tokenizer.is_none() && !request.stop.stop_strings.is_empty() {
            return Err(RequestError::NoTokenizer { field: "stop" });
        }
        let seq_id = SeqId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let sub = Submission {
            seq_id,
            prompt_ids: prompt_ids.clone(),
            request,
            events,
        };
        self.commands
            .send(Command::Submit(Box::new(sub)))
            .map_err(|_| RequestError::invalid("engine", "stopped", "the engine is not running"))?;
        Ok((seq_id, prompt_ids))
    }

    /// Aborts a request; its stream ends with `Finished { reason: Abort }` and its KV blocks are
    /// freed in the engine's next intake (before the next step).
    pub fn abort(&self, seq_id: SeqId) {
        let _ = self.commands.send(Command::Abort(seq_id));
    }

    pub fn stats(&self) -> Option<EngineStats> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.commands.send(Command::Stats(tx)).ok()?;
        rx.recv().ok()
    }
}

/// Owns the engine thread; dropping it shuts the engine down (in-flight requests get a final
/// `Abort` event) and joins the thread.
pub struct Engine {
    handle: EngineHandle,
    incidents: Receiver<Incident>,
    thread: Option<JoinHandle<()>>,
}

/// Builds an executor like the one the engine started with (same model, device and limits):
/// `Recovery::Rebuild` calls it after a step panicked, once the old executor is dropped (so a
/// GPU has its memory back). It runs on a helper thread.
pub type BuildExecutor = Box<dyn FnMut() -> crate::Result<Box<dyn Executor>> + Send>;

/// What the engine does after a step panicked. Either way, the state the panic interrupted is
/// dropped and every request in flight gets an error first.
pub enum Recovery {
    /// Build a new executor (and scheduler) and serve again; requests arriving meanwhile are
    /// refused with `Unavailable`. If the build fails, the engine fails closed.
    Rebuild(BuildExecutor),
    /// Serve no more: every later request is refused with `Unavailable`, saying when and why the
    /// engine failed (the model has to be reloaded).
    FailClosed,
}

/// How an engine is set up, besides its first executor and its model's facts.
pub struct EngineSetup {
    pub scheduler: SchedulerConfig,
    pub recovery: Recovery,
    pub faults: FaultInjection,
}

/// The environment variable of `FaultInjection::panic_token_id`.
pub const INJECT_PANIC_TOKEN_VAR: &str = "FERRUM_INJECT_PANIC_TOKEN";

/// Faults the engine causes on purpose, to test its failure handling, also through a real
/// tritonserver and the release library: `from_env` reads them once, when the engine starts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FaultInjection {
    /// The engine panics in the step that schedules a prompt containing this token id, where it
    /// would run the executor (`FERRUM_INJECT_PANIC_TOKEN`).
    pub panic_token_id: Option<u32>,
}

impl FaultInjection {
    /// The faults asked for by the environment (none unless `FERRUM_INJECT_PANIC_TOKEN` is set).
    pub fn from_env() -> crate::Result<Self> {
        Self::parse(std::env::var_os(INJECT_PANIC_TOKEN_VAR))
    }

    /// `FERRUM_INJECT_PANIC_TOKEN`'s value: unset or empty is no fault, anything else must be a
    /// token id (a start fails on a typo rather than silently testing nothing).
    fn parse(panic_token: Option<OsString>) -> crate::Result<Self> {
        let panic_token_id = match panic_token {
            None => None,
            Some(v) if v.is_empty() => None,
            Some(v) => match v.to_str().map(str::parse::<u32>) {
                Some(Ok(id)) => Some(id),
                _ => {
                    return Err(crate::Error::Engine(format!(
                        "{INJECT_PANIC_TOKEN_VAR} = {v:?} must be a token id (an integer from 0 \
                         to {}) or empty",
                        u32::MAX
                    )));
                }
            },
        };
        Ok(FaultInjection { panic_token_id })
    }
}

/// When and why the engine stopped serving. Displays as `<UTC time>: <reason>`.
#[derive(Debug, Clone, PartialEq)]
pub struct Failure {
    pub at: SystemTime,
    /// E.g. `panic in step: index out of bounds: the len is 3 but the index is 3`.
    pub reason: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", utc(self.at), self.reason)
    }
}

/// Something operators must hear about: the engine reports these on `Engine::incidents` (the
/// Triton backend logs them, a panic or a failed rebuild at error level). Displays as one log
/// line.
#[derive(Debug, Clone, PartialEq)]
pub enum Incident {
    /// A step panicked: `num_failed_requests` requests in flight got an error and the engine's
    /// state was dropped; `rebuilding` says whether a rebuild follows (else it fails closed).
    StepPanicked {
        failure: Failure,
        num_failed_requests: usize,
        rebuilding: bool,
    },
    /// The engine serves again after a panic; the rebuild took `took`.
    Rebuilt { took: Duration },
    /// The rebuild after a panic failed: the engine serves no more.
    RebuildFailed { error: String },
}

impl std::fmt::Display for Incident {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Incident::StepPanicked {
                failure,
                num_failed_requests,
                rebuilding,
            } => {
                write!(
                    f,
                    "engine failed at {failure}; its {num_failed_requests} request(s) in flight \
                     got an error and its state was dropped; "
                )?;
                if *rebuilding {
                    write!(
                        f,
                        "rebuilding the engine (new requests are refused until then)"
                    )
                } else {
                    write!(f, "the engine serves no more: reload the model")
                }
            }
            Incident::Rebuilt { took } => {
                write!(
                    f,
                    "engine rebuilt in {:.1} s: serving again",
                    took.as_secs_f64()
                )
            }
            Incident::RebuildFailed { error } => write!(
                f,
                "rebuilding the engine failed: {error}; the engine serves no more: reload the model"
            ),
        }
    }
}

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
        };
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
            },
            incidents,
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
    }

    /// The engine's incidents, in order, for one reader (every clone reads the same channel).
    pub fn incidents(&self) -> Receiver<Incident> {
        self.incidents.clone()
    }

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

/// The engine thread's top level: serves with one `Worker` at a time and, when a step panics,
/// answers and drops that worker and recovers (`Recovery`). It keeps what outlives a worker:
/// the counters, the orphaned sinks' channel, the recovery and the incident channel.
struct Supervisor {
    info: Arc<ModelInfo>,
    /// The configuration of every worker's scheduler (a rebuilt worker's takes `num_blocks` from
    /// its new executor).
    scheduler_config: SchedulerConfig,
    recovery: Recovery,
    faults: FaultInjection,
    seed_base: u64,
    /// The counters between workers (a worker owns them while it serves).
    stats: EngineStats,
    orphans_tx: Sender<Orphan>,
    orphans: Receiver<Orphan>,
    incidents: Sender<Incident>,
}

/// How a rebuild ended.
enum Rebuilt {
    Serving(Box<Worker>),
    Failed(String),
    ShutDown,
}

impl Supervisor {
    /// A worker serving with `executor`, the counters so far and no request.
    fn worker(
        &mut self,
        executor: Box<dyn Executor>,
        scheduler_config: SchedulerConfig,
    ) -> crate::Result<Worker> {
        let scheduler = Scheduler::new(scheduler_config)?;
        Ok(Worker {
            executor,
            scheduler,
            info: self.info.clone(),
            seqs: HashMap::new(),
            stats: std::mem::take(&mut self.stats),
            seed_base: self.seed_base,
            sample_batch: SampleBatch::new(),
            pending: Vec::new(),
            faults: self.faults,
            orphans: self.orphans_tx.clone(),
        })
    }

    fn run(mut self, mut worker: Worker, commands: Receiver<Command>) {
        loop {
            // A panic anywhere in the worker's loop (intake, schedule, execute, sample, update,
            // delivery) unwinds to here. `AssertUnwindSafe` because the worker is never trusted
            // again: the panic may have left a block table half-updated, a step half-written to
            // the KV cache, a sampler ahead of the scheduler or device state undefined. Its
            // requests are answered and everything else is dropped (`discard`).
            let served = catch_unwind(AssertUnwindSafe(|| worker.serve(&commands)));
            let payload = match served {
                Ok(()) => {
                    // Shut down; every request got its final event (none is left orphaned).
                    self.answer_orphans("the engine shut down before the request finished");
                    return;
                }
                Err(payload) => payload,
            };
            let failure = Failure {
                at: SystemTime::now(),
                reason: format!("panic in step: {}", panic_message(&*payload)),
            };
            // Dropping a panic payload may itself panic (its type is anyone's).
            let _ = catch_unwind(AssertUnwindSafe(move || drop(payload)));
            let rebuilding = matches!(self.recovery, Recovery::Rebuild(_));
            let message = if rebuilding {
                format!(
                    "engine failed: {}; the engine is restarting, retry the request",
                    failure.reason
                )
            } else {
                format!(
                    "engine failed: {}; the engine serves no more, the model must be reloaded",
                    failure.reason
                )
            };
            let num_failed_requests = self.discard(worker, &message);
            self.report(Incident::StepPanicked {
                failure: failure.clone(),
                num_failed_requests,
                rebuilding,
            });
            match self.recover(&commands, &failure) {
                Some(w) => worker = w,
                None => return,
            }
        }
    }

    /// Sends `message` as the final error of every request in `worker` (running, waiting, or
    /// with an undelivered last token) and of any request whose state the panic dropped while
    /// unwinding, then drops the worker's state. Returns how many requests it answered.
    fn discard(&mut self, worker: Worker, message: &str) -> usize {
        let Worker {
            executor,
            scheduler,
            seqs,
            pending,
            mut stats,
            ..
        } = worker;
        stats.num_engine_failures += 1;
        // Requests first, so their clients hear before the executor is torn down (a GPU's can
        // take a while): each dropped sink comes back as an orphan. Dropping what a panic
        // interrupted may panic again, which must not end the engine thread; whatever a second
        // panic leaves undropped is leaked.
        let _ = catch_unwind(AssertUnwindSafe(move || {
            drop(seqs);
            drop(pending);
        }));
        let num_answered = self.answer_orphans(message);
        let reused = catch_unwind(AssertUnwindSafe(move || {
            let reused = scheduler.num_reused_tokens();
            drop(scheduler);
            drop(executor);
            reused
        }));
        stats.num_reused_prompt_tokens += reused.unwrap_or(0);
        self.stats = stats;
        num_answered
    }

    /// Sends `message` as the final error of every orphaned request; returns how many.
    fn answer_orphans(&self, message: &str) -> usize {
        let mut num_answered = 0;
        while let Ok((seq_id, target)) = self.orphans.try_recv() {
            target.send(seq_id, TokenEvent::Error(message.to_string()));
            num_answered += 1;
        }
        num_answered
    }

    fn report(&self, incident: Incident) {
        // Nobody listening (the CLI, most tests) is fine.
        let _ = self.incidents.send(incident);
    }

    /// After a panicked step: rebuilds (with `Recovery::Rebuild`) and returns the new worker;
    /// otherwise, or when the rebuild fails, refuses every request until shutdown. None: shut
    /// down.
    fn recover(&mut self, commands: &Receiver<Command>, failure: &Failure) -> Option<Worker> {
        let refusal = match std::mem::replace(&mut self.recovery, Recovery::FailClosed) {
            Recovery::FailClosed => format!("the engine failed at {failure}; reload the model"),
            Recovery::Rebuild(build) => match self.rebuild(build, commands, failure) {
                Rebuilt::Serving(worker) => return Some(*worker),
                Rebuilt::ShutDown => return None,
                Rebuilt::Failed(error) => {
                    let refusal = format!(
                        "the engine failed at {failure}; rebuilding it failed: {error}; reload \
                         the model"
                    );
                    self.report(Incident::RebuildFailed { error });
                    refusal
                }
            },
        };
        while let Ok(cmd) = commands.recv() {
            if matches!(cmd, Command::Shutdown) {
                break;
            }
            self.refuse(cmd, &refusal);
        }
        None
    }

    /// Builds a new executor on a helper thread (weights are read again, which takes a while)
    /// while this thread keeps answering: submissions are refused at once, stats answered.
    fn rebuild(
        &mut self,
        mut build: BuildExecutor,
        commands: &Receiver<Command>,
        failure: &Failure,
    ) -> Rebuilt {
        let refusal =
            format!("the engine is restarting after it failed at {failure}; retry shortly");
        let started = Instant::now();
        let (done_tx, done) = crossbeam_channel::bounded(1);
        let builder = std::thread::Builder::new()
            .name("ferrum-rebuild".into())
            .spawn(move || {
                let built = catch_unwind(AssertUnwindSafe(&mut build)).unwrap_or_else(|p| {
                    Err(crate::Error::Engine(format!(
                        "the rebuild panicked: {}",
                        panic_message(&*p)
                    )))
                });
                let _ = done_tx.send((build, built));
            });
        let builder = match builder {
            Ok(b) => b,
            Err(e) => return Rebuilt::Failed(format!("cannot start the rebuild thread: {e}")),
        };
        loop {
            select! {
                recv(commands) -> cmd => match cmd {
                    Ok(Command::Shutdown) | Err(_) => {
                        // What the build holds (device memory) is freed before shutdown returns.
                        let _ = builder.join();
                        return Rebuilt::ShutDown;
                    }
                    Ok(cmd) => self.refuse(cmd, &refusal),
                },
                recv(done) -> built => {
                    let _ = builder.join();
                    let Ok((build, built)) = built else {
                        return Rebuilt::Failed("the rebuild thread ended without a result".into());
                    };
                    let worker = built.and_then(|executor| {
                        let scheduler_config = SchedulerConfig {
                            num_blocks: executor.num_kv_blocks(),
                            ..self.scheduler_config.clone()
                        };
                        self.worker(executor, scheduler_config)
                    });
                    return match worker {
                        Ok(worker) => {
                            self.recovery = Recovery::Rebuild(build);
                            self.report(Incident::Rebuilt { took: started.elapsed() });
                            Rebuilt::Serving(Box::new(worker))
                        }
                        Err(e) => Rebuilt::Failed(e.to_string()),
                    };
                }
            }
        }
    }

    /// Answers a command while no worker serves: a submission is refused at once with
    /// `Unavailable(refusal)`, stats report the counters (and no KV cache), an abort has nothing
    /// to abort.
    fn refuse(&self, cmd: Command, refusal: &str) {
        match cmd {
            Command::Submit(sub) => {
                sub.events
                    .send(sub.seq_id, TokenEvent::Unavailable(refusal.to_string()));
            }
            Command::Stats(tx) => {
                let _ = tx.send(EngineStats {
                    block_size: self.scheduler_config.block_size,
                    max_num_seqs: self.scheduler_config.max_num_seqs,
                    ..self.stats.clone()
                });
            }
            Command::Abort(_) | Command::Shutdown => {}
        }
    }
}

/// The message of a panic payload (`panic!` gives a `&str` or a `String`).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (
        payload.downcast_ref::<&str>(),
        payload.downcast_ref::<String>(),
    ) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(a panic payload that is not a message)".into(),
    }
}

/// `t` in UTC, e.g. `2026-12-07 10:11:12 UTC` (for messages; needs no time zone database).
fn utc(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, secs_of_day) = ((secs / 86_400) as i64, secs % 86_400);
    // Days since 1970-01-01 to a civil date (Howard Hinnant's `civil_from_days`): eras of 400
    // years (146097 days), years starting on March 1st so leap days come last.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let mp = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

fn seed_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5eed, |d| d.as_nanos() as u64)
}

/// A request's sampling state when the executor samples on its device: the same seed as its
/// host `Sampler`, so the device consumes the RNG exactly as the host would
/// (`executor::cuda::row_sampling`).
struct DeviceSampling {
    params: SamplingParams,
    rng: Rng,
    /// Penalty bookkeeping; None when every penalty is off.
    history: Option<TokenHistory>,
}

/// Per-request state kept by the engine thread.
struct SeqState {
    sampler: Sampler,
    /// Set when the executor samples on its device (then `sampler` only keeps its bookkeeping).
    device_sampling: Option<DeviceSampling>,
    detok: Option<IncrementalDecoder>,
    stop_strings: Option<StopStringMatcher>,
    events: EventSink,
    num_generated: usize,
    max_tokens: usize,
    min_tokens: usize,
    /// Ids that end generation: stop_token_ids plus EOS unless ignore_eos.
    stop_ids: Vec<u32>,
    /// The prompt holds `FaultInjection::panic_token_id`: a step that schedules it panics.
    injects_panic: bool,
}

struct Worker {
    executor: Box<dyn Executor>,
    scheduler: Scheduler,
    info: Arc<ModelInfo>,
    seqs: HashMap<SeqId, SeqState>,
    stats: EngineStats,
    seed_base: u64,
    /// The sampling rows of a device-sampled step, reused.
    sample_batch: SampleBatch,
    /// The last step's tokens, accepted but not yet delivered (`step`, `deliver`).
    pending: Vec<PendingToken>,
    faults: FaultInjection,
    /// Where a request's sink goes when dropped before its final event (`EventSink`).
    orphans: Sender<Orphan>,
}

impl Worker {
    /// Serves until shutdown (then every request it holds gets its final event). A panic
    /// unwinds out of here to `Supervisor::run`, which never calls this worker again.
    fn serve(&mut self, commands: &Receiver<Command>) {
        loop {
            // Intake: block while idle, otherwise take whatever arrived since the last step.
            if !self.scheduler.has_work() {
                self.flush_pending();
                match commands.recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
            let mut shutdown = false;
            loop {
                match commands.try_recv() {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            shutdown = true;
                            break;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        shutdown = true;
                        break;
                    }
                }
            }
            if shutdown {
                break;
            }
            if !self.scheduler.has_work() {
                continue;
            }
            if !self.executor.samples_on_device() {
                // Nothing to overlap with: deliver before planning, so that a request stopped by
                // a string or left by its client holds no seat or blocks in the next plan.
                self.flush_pending();
                if !self.scheduler.has_work() {
                    continue;
                }
            }
            let plan = self.scheduler.schedule();
            if plan.seqs.is_empty() {
                self.flush_pending();
                // Nothing fits right now (cannot happen with validated requests, but never spin).
                match commands.recv_timeout(Duration::from_millis(5)) {
                    Ok(cmd) => {
                        if !self.handle(cmd) {
                            break;
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => {}
                    Err(RecvTimeoutError::Disconnected) => break,
                }
                continue;
            }
            self.step(plan);
        }
        // Shutdown: every in-flight request gets its final event.
        self.flush_pending();
        let ids: Vec<SeqId> = self.seqs.keys().copied().collect();
        for id in ids {
            self.finish_aborted(id);
        }
    }

    /// Returns false on shutdown.
    fn handle(&mut self, cmd: Command) -> bool {
        match cmd {
            Command::Submit(sub) => self.admit(*sub),
            Command::Abort(id) => self.finish_aborted(id),
            Command::Stats(tx) => {
                let _ = tx.send(self.snapshot());
            }
            Command::Shutdown => return false,
        }
        true
    }

    /// The counters plus the current KV cache and queue occupancy.
    fn snapshot(&self) -> EngineStats {
        let kv = self.scheduler.kv();
        let num_kv_blocks_free = kv.num_free_blocks();
        EngineStats {
            num_kv_blocks_total: kv.num_blocks(),
            num_kv_blocks_used: kv.num_used_blocks(),
            num_kv_blocks_free,
            num_kv_blocks_cached: kv.num_cached_blocks(),
            block_size: kv.block_size(),
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            max_num_seqs: self.scheduler.config().max_num_seqs,
            // Earlier workers' schedulers (a rebuild starts a new one) plus this one's.
            num_reused_prompt_tokens: self.stats.num_reused_prompt_tokens
                + self.scheduler.num_reused_tokens(),
            ..self.stats.clone()
        }
    }

    fn admit(&mut self, sub: Submission) {
        let Submission {
            seq_id,
            prompt_ids,
            request,
            events,
        } = sub;
        let mut events = EventSink {
            seq_id,
            target: Some(events),
            orphans: self.orphans.clone(),
        };
        let info = &self.info;
        let max_tokens = request
            .stop
            .max_tokens
            .min(info.max_model_len - prompt_ids.len());
        if let Err(e) = self.scheduler.add(seq_id, prompt_ids.clone(), max_tokens) {
            events.send(TokenEvent::Error(e.to_string()));
            return;
        }
        let seed = request
            .sampling
            .seed
            .unwrap_or(self.seed_base ^ seq_id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let sampler = Sampler::new(&request.sampling, seed, &prompt_ids, info.vocab_size);
        let device_sampling = self.executor.samples_on_device().then(|| {
            let p = &request.sampling;
            let penalties = Penalties {
                repetition: p.repetition_penalty,
                presence: p.presence_penalty,
                frequency: p.frequency_penalty,
            };
            DeviceSampling {
                params: p.clone(),
                rng: Rng::new(seed),
                history: penalties
                    .is_enabled()
                    .then(|| TokenHistory::new(&prompt_ids, info.vocab_size)),
            }
        });
        let detok = match (&info.tokenizer, request.detokenize) {
            (Some(t), true) => Some(IncrementalDecoder::new(t.clone(), &prompt_ids, true)),
            _ => None,
        };
        let stop_strings = (detok.is_some() && !request.stop.stop_strings.is_empty())
            .then(|| StopStringMatcher::new(request.stop.stop_strings.clone()));
        let mut stop_ids = request.stop.stop_token_ids.clone();
        if !request.stop.ignore_eos {
            stop_ids.extend(&info.eos_token_ids);
        }
        self.stats.num_prompt_tokens += prompt_ids.len() as u64;
        let injects_panic = self
            .faults
            .panic_token_id
            .is_some_and(|id| prompt_ids.contains(&id));
        events.send(TokenEvent::Started {
            prompt_ids: prompt_ids.clone(),
        });
        self.seqs.insert(
            seq_id,
            SeqState {
                sampler,
                device_sampling,
                detok,
                stop_strings,
                events,
                num_generated: 0,
                max_tokens,
                min_tokens: request.stop.min_tokens,
                stop_ids,
                injects_panic,
            },
        );
    }

    fn finish_aborted(&mut self, id: SeqId) {
        // Its last token, accepted but not delivered yet, goes out first, as it would have
        // without the overlap (it may end the request: then there is nothing left to abort).
        if self.pending.iter().any(|p| p.seq_id == id) {
            let (own, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|p| p.seq_id == id);
            self.pending = rest;
            deliver(own, &mut self.seqs, &mut self.scheduler, &mut self.stats);
        }
        self.scheduler.remove(id);
        if let Some(mut state) = self.seqs.remove(&id) {
            self.stats.num_aborted += 1;
            state.events.send(TokenEvent::Finished {
                text: String::new(),
                reason: FinishReason::Abort,
            });
        }
    }

    /// Runs one step. Its tokens are accepted at once (sampler, penalties, stop ids, max_tokens,
    /// the scheduler), so the next step can be scheduled; their delivery (detokenization, stop
    /// strings, events) is left in `pending` and runs while the device works on the next step
    /// (`deliver`).
    fn step(&mut self, plan: SchedulePlan) {
        self.stats.num_steps += 1;
        self.stats.num_preemptions += plan.preempted.len() as u64;
        let outs = match self.sample_step(&plan) {
            Ok(outs) => outs,
            Err(e) => {
                // A failed step fails the requests in it; the engine keeps serving the rest. What
                // the previous step produced goes out first.
                self.flush_pending();
                for s in &plan.seqs {
                    self.scheduler.remove(s.seq_id);
                    if let Some(mut state) = self.seqs.remove(&s.seq_id) {
                        state
                            .events
                            .send(TokenEvent::Error(format!("execution failed: {e}")));
                    }
                }
                return;
            }
        };
        // `sample_step` has delivered the previous step's tokens.
        debug_assert!(self.pending.is_empty());
        let mut sampled = Vec::new();
        let sampling = plan.seqs.iter().filter(|s| s.sample);
        for (s, out) in sampling.zip(outs) {
            let Some(state) = self.seqs.get_mut(&s.seq_id) else {
                continue;
            };
            let Some(out) = out else {
                continue;
            };
            let token_id = out.token_id;
            state.sampler.accept(token_id);
            if let Some(ds) = &mut state.device_sampling
                && let Some(h) = &mut ds.history
            {
                h.accept(token_id);
            }
            state.num_generated += 1;
            self.stats.num_generated_tokens += 1;
            sampled.push((s.seq_id, token_id));
            // Stop strings are only known once the token is detokenized (`deliver`).
            let finish = if state.stop_ids.contains(&token_id) {
                Some(FinishReason::Stop)
            } else if state.num_generated >= state.max_tokens {
                Some(FinishReason::Length)
            } else {
                None
            };
            self.pending.push(PendingToken {
                seq_id: s.seq_id,
                token_id,
                logprobs: out.logprobs,
                finish,
                finished_state: None,
            });
        }
        self.scheduler.update(&plan, &sampled);
        // A finished sequence leaves the scheduler now (its blocks free for the next step); its
        // state travels with its last token until that is delivered.
        for p in self.pending.iter_mut().filter(|p| p.finish.is_some()) {
            self.scheduler.remove(p.seq_id);
            p.finished_state = self.seqs.remove(&p.seq_id).map(Box::new);
        }
    }

    /// Delivers the tokens still pending (when no further step will run them in its shadow).
    fn flush_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        deliver(
            pending,
            &mut self.seqs,
            &mut self.scheduler,
            &mut self.stats,
        );
    }
}

/// A sampled token accepted by `Worker::step` and not yet delivered.
struct PendingToken {
    seq_id: SeqId,
    token_id: u32,
    logprobs: Option<crate::request::TokenLogprobs>,
    /// Stop id or max_tokens (a stop string is found on delivery).
    finish: Option<FinishReason>,
    /// The state of a sequence that finished with this token: it has left the engine's map (and
    /// the scheduler) already.
    finished_state: Option<Box<SeqState>>,
}

/// Detokenizes, matches stop strings and sends the events of one step's tokens, in order. A
/// sequence stopped by a string here may already be in the next step on the device: it leaves
/// the scheduler and the map now, and that step's token for it is dropped (`Worker::step` skips
/// sequences it no longer tracks). A request aborted since the step has no state: its token is
/// dropped (its final event went out with the abort).
fn deliver(
    pending: Vec<PendingToken>,
    seqs: &mut HashMap<SeqId, SeqState>,
    scheduler: &mut Scheduler,
    stats: &mut EngineStats,
) {
    for p in pending {
        let PendingToken {
            seq_id,
            token_id,
            logprobs,
            mut finish,
            mut finished_state,
        } = p;
        let state = match &mut finished_state {
            Some(state) => &mut **state,
            None => match seqs.get_mut(&seq_id) {
                Some(state) => state,
                None => continue,
            },
        };
        let mut stopped_by_string = false;
        let mut text = String::new();
        // A stop id ends generation before its text (it is not detokenized).
        if finish != Some(FinishReason::Stop)
            && let Some(detok) = &mut state.detok
        {
            // A tokenizer error on one token degrades to no text for it; never kill the request.
            let delta = detok.step(token_id).unwrap_or_default();
            match &mut state.stop_strings {
                Some(m) => {
                    let r = m.push(&delta);
                    text = r.emit;
                    if r.stopped {
                        finish = Some(FinishReason::Stop);
                        stopped_by_string = true;
                    }
                }
                None => text = delta,
            }
        }
        if finish.is_some() && !stopped_by_string {
            // Flush what the detokenizer / stop matcher still held back.
            if let Some(m) = &mut state.stop_strings {
                text.push_str(&m.flush());
            }
            if let Some(detok) = &mut state.detok {
                text.push_str(&detok.flush());
            }
        }
        let ev = TokenEvent::Token {
            token_id,
            text,
            logprobs,
            finish,
        };
        let delivered = state.events.send(ev);
        if finish.is_some() {
            stats.num_finished += 1;
        } else if !delivered {
            stats.num_aborted += 1; // the client is gone: abort
        } else {
            continue;
        }
        if finished_state.is_none() {
            scheduler.remove(seq_id);
            seqs.remove(&seq_id);
        }
    }
}

impl Worker {
    /// Executes the plan and samples one token per sampling sequence (plan order; None for a
    /// sequence the engine no longer tracks): on the device when the executor samples there
    /// (only ids and requested logprobs cross back), else on the host from the logits.
    fn sample_step(&mut self, plan: &SchedulePlan) -> crate::Result<Vec<Option<Sampled>>> {
        // Testing aid: a panic where the executor is called, as if it had panicked.
        if let Some(token_id) = self.faults.panic_token_id
            && let Some(s) = plan.seqs.iter().find(|s| {
                self.seqs
                    .get(&s.seq_id)
                    .is_some_and(|state| state.injects_panic)
            })
        {
            panic!(
                "injected panic: the prompt of request {} holds token {token_id} \
                 ({INJECT_PANIC_TOKEN_VAR})",
                s.seq_id
            );
        }
        if self.executor.samples_on_device() {
            self.sample_batch.clear();
            let mut known = Vec::new();
            for s in plan.seqs.iter().filter(|s| s.sample) {
                let greedy = RowSampling::greedy();
                let state = self.seqs.get_mut(&s.seq_id);
                known.push(state.is_some());
                match state {
                    Some(state) => {
                        let suppressed: &[u32] = if state.num_generated < state.min_tokens {
                            &state.stop_ids
                        } else {
                            &[]
                        };
                        let Some(ds) = &mut state.device_sampling else {
                            return Err(crate::Error::Device(format!(
                                "sequence {:?} has no device sampling state",
                                s.seq_id
                            )));
                        };
                        let row = row_sampling(&ds.params, &mut ds.rng);
                        self.sample_batch
                            .push(&row, ds.history.as_ref(), suppressed)?;
                    }
                    // Keeps the rows aligned with the plan; its token is dropped.
                    None => self.sample_batch.push(&greedy, None, &[])?,
                }
            }
            // The previous step's tokens are delivered while the device runs this one.
            let pending = std::mem::take(&mut self.pending);
            let (seqs, scheduler, stats) = (&mut self.seqs, &mut self.scheduler, &mut self.stats);
            let mut overlap = Some(move || deliver(pending, seqs, scheduler, stats));
            let outs =
                self.executor
                    .execute_and_sample_overlapped(plan, &self.sample_batch, &mut || {
                        if let Some(f) = overlap.take() {
                            f();
                        }
                    });
            // A step that failed before its overlap point still delivers them.
            if let Some(f) = overlap.take() {
                f();
            }
            let outs = outs?;
            return Ok(outs
                .into_iter()
                .zip(known)
                .map(|(o, k)| k.then_some(o))
                .collect());
        }
        // Host sampling: the previous step's tokens went out before this plan was made (`run`).
        let mut logits = self.executor.execute(plan)?;
        let mut outs = Vec::new();
        for (row_idx, s) in plan.seqs.iter().filter(|s| s.sample).enumerate() {
            let Some(state) = self.seqs.get_mut(&s.seq_id) else {
                outs.push(None);
                continue;
            };
            let suppressed: &[u32] = if state.num_generated < state.min_tokens {
                &state.stop_ids
            } else {
                &[]
            };
            outs.push(Some(
                state.sampler.sample(logits.row_mut(row_idx), suppressed),
            ));
        }
        Ok(outs)
    }
}

pub mod options;
pub use options::{Device, EngineOptions, LoadedEngine};

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn utc_gives_civil_dates_across_leap_days_and_centuries() {
        let at = |secs| utc(UNIX_EPOCH + Duration::from_secs(secs));
        assert_eq!(at(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(at(1_700_000_000), "2023-11-14 22:13:20 UTC");
        // 2100 is no leap year.
        assert_eq!(at(4_107_542_399), "2100-02-28 23:59:59 UTC");
        assert_eq!(at(4_107_542_400), "2100-03-01 00:00:00 UTC");
    }

    #[test]
    fn the_panic_token_variable_is_a_token_id_or_empty() {
        let parse = |v: Option<&str>| FaultInjection::parse(v.map(OsString::from));
        assert_eq!(parse(None).unwrap().panic_token_id, None);
        assert_eq!(parse(Some("")).unwrap().panic_token_id, None);
        assert_eq!(parse(Some("4242")).unwrap().panic_token_id, Some(4242));
        for bad in ["-1", "abc", "4294967296", " 7"] {
            let e = parse(Some(bad)).unwrap_err().to_string();
            assert!(
                e.contains("FERRUM_INJECT_PANIC_TOKEN") && e.contains(bad),
                "{e}"
            );
        }
    }

    #[test]
    fn panic_messages_come_from_str_and_string_payloads() {
        let message = |f: fn()| panic_message(&*catch_unwind(f).unwrap_err());
        assert_eq!(message(|| panic!("plain")), "plain");
        assert_eq!(message(|| panic!("formatted {}", 7)), "formatted 7");
        assert_eq!(
            message(|| std::panic::panic_any(7u8)),
            "(a panic payload that is not a message)"
        );
    }
}
