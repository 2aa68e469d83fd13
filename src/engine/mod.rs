//! The engine thread: the one owner of the scheduler, the KV cache (inside the executor) and every
//! request's sampling and detokenization state. Other threads talk to it only through a cheap,
//! cloneable `EngineHandle` (submit, abort) over a channel; each request's events come back on its
//! own channel. Loop: intake → schedule → execute → sample → update → emit, where a step's
//! events (detokenization, stop strings, sending) are emitted while the device runs the next
//! step.
//!
//! Guarantees: every accepted request receives exactly one final event (`finish` set, `Finished`
//! or `Error`), also on abort, executor failure and shutdown; a removed request's KV blocks are
//! freed at once (`Scheduler::remove`).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

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
    events: EventSink,
}

/// Where a request's events go: its own channel (`submit`), or a channel shared by many
/// requests with each event tagged by its `SeqId` (`submit_to`, e.g. one response thread
/// serving every request of a Triton model).
enum EventSink {
    Own(Sender<TokenEvent>),
    Shared(Sender<(SeqId, TokenEvent)>),
}

impl EventSink {
    /// False when the receiving side is gone.
    fn send(&self, seq_id: SeqId, ev: TokenEvent) -> bool {
        match self {
            EventSink::Own(tx) => tx.send(ev).is_ok(),
            EventSink::Shared(tx) => tx.send((seq_id, ev)).is_ok(),
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
    )
}

impl EngineHandle {
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Validates and tokenizes the request on the caller's thread, then queues it.
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream, RequestError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (seq_id, prompt_ids) = self.enqueue(request, EventSink::Own(tx))?;
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
        self.enqueue(request, EventSink::Shared(events))
    }

    fn enqueue(
        &self,
        request: GenerateRequest,
        events: EventSink,
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
    thread: Option<JoinHandle<()>>,
}

impl Engine {
    pub fn start(
        executor: Box<dyn Executor>,
        scheduler_config: SchedulerConfig,
        info: ModelInfo,
    ) -> crate::Result<Engine> {
        let scheduler = Scheduler::new(scheduler_config)?;
        let (tx, rx) = crossbeam_channel::unbounded();
        let info = Arc::new(info);
        let worker = Worker {
            executor,
            scheduler,
            info: info.clone(),
            seqs: HashMap::new(),
            stats: EngineStats::default(),
            seed_base: seed_base(),
            sample_batch: SampleBatch::new(),
            pending: Vec::new(),
        };
        let thread = std::thread::Builder::new()
            .name("ferrum-engine".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| crate::Error::Engine(format!("cannot start the engine thread: {e}")))?;
        Ok(Engine {
            handle: EngineHandle {
                commands: tx,
                next_id: Arc::new(AtomicU64::new(1)),
                info,
            },
            thread: Some(thread),
        })
    }

    pub fn handle(&self) -> EngineHandle {
        self.handle.clone()
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
}

impl Worker {
    fn run(mut self, commands: Receiver<Command>) {
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
            num_reused_prompt_tokens: self.scheduler.num_reused_tokens(),
            block_size: kv.block_size(),
            num_running: self.scheduler.num_running(),
            num_waiting: self.scheduler.num_waiting(),
            max_num_seqs: self.scheduler.config().max_num_seqs,
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
        let info = &self.info;
        let max_tokens = request
            .stop
            .max_tokens
            .min(info.max_model_len - prompt_ids.len());
        if let Err(e) = self.scheduler.add(seq_id, prompt_ids.clone(), max_tokens) {
            events.send(seq_id, TokenEvent::Error(e.to_string()));
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
        events.send(
            seq_id,
            TokenEvent::Started {
                prompt_ids: prompt_ids.clone(),
            },
        );
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
        if let Some(state) = self.seqs.remove(&id) {
            self.stats.num_aborted += 1;
            state.events.send(
                id,
                TokenEvent::Finished {
                    text: String::new(),
                    reason: FinishReason::Abort,
                },
            );
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
                    if let Some(state) = self.seqs.remove(&s.seq_id) {
                        state.events.send(
                            s.seq_id,
                            TokenEvent::Error(format!("execution failed: {e}")),
                        );
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
        let delivered = state.events.send(seq_id, ev);
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
