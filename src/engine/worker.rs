//! The worker: one step of the loop (intake → schedule → execute → sample → update → emit) over
//! the scheduler, the executor and each request's state; a step's events are delivered while the
//! device runs the next one (`deliver`).

use super::*;

pub(super) fn seed_base() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x5eed, |d| d.as_nanos() as u64)
}

/// Per-request state kept by the engine thread.
/// Sampling state (RNG, penalty history, `min_tokens`) is the executor's.
pub(super) struct SeqState {
    pub(super) detok: Option<IncrementalDecoder>,
    pub(super) stop_strings: Option<StopStringMatcher>,
    pub(super) events: EventSink,
    pub(super) num_generated: usize,
    pub(super) max_tokens: usize,
    /// Ids that end generation: stop_token_ids plus EOS unless ignore_eos.
    pub(super) stop_ids: Vec<u32>,
    /// The prompt holds `FaultInjection::panic_token_id`: a step that schedules it panics.
    pub(super) injects_panic: bool,
    /// Prompt length in tokens (for its timings).
    pub(super) num_prompt_tokens: usize,
    /// The request's timing, when the engine reports timings (`Worker::timings`).
    pub(super) clock: Option<RequestClock>,
    /// How long it may wait for its first step, if bounded.
    pub(super) queue_limit: Option<QueueLimit>,
}

/// A request's bound on waiting for its first step.
pub(super) struct QueueLimit {
    pub(super) submitted_at: Instant,
    pub(super) timeout: Duration,
    /// The request set it (else it is the model's `queue_timeout_microseconds`).
    pub(super) from_request: bool,
}

pub(super) struct Worker {
    pub(super) executor: Box<dyn Executor>,
    pub(super) scheduler: Scheduler,
    pub(super) info: Arc<ModelInfo>,
    pub(super) seqs: HashMap<SeqId, SeqState>,
    pub(super) stats: EngineStats,
    pub(super) seed_base: u64,
    /// Sequences `deliver` removed while the executor was busy with a step: the executor drops
    /// their sampling state once the step returns.
    pub(super) removed: Vec<SeqId>,
    /// The last step's tokens, accepted but not yet delivered (`step`, `deliver`).
    pub(super) pending: Vec<PendingToken>,
    pub(super) faults: FaultInjection,
    /// Where a request's sink goes when dropped before its final event (`EventSink`).
    pub(super) orphans: Sender<Orphan>,
    /// Where each request's `RequestTimings` goes when its final event is sent; None: requests
    /// are not timed.
    pub(super) timings: Option<Sender<RequestTimings>>,
    /// Queue deadlines of requests with a `QueueLimit`, earliest first; an entry whose request
    /// has been scheduled (or has left) by then is dropped when it comes up (`expire_waiting`).
    pub(super) queue_deadlines: BinaryHeap<Reverse<(Instant, SeqId)>>,
}

impl Worker {
    /// Serves until shutdown (then every request it holds gets its final event). A panic
    /// unwinds out of here to `Supervisor::run`, which never calls this worker again.
    pub(super) fn serve(&mut self, commands: &Receiver<Command>) {
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
            if !self.executor.overlaps() {
                // Nothing to overlap with: deliver before planning, so that a request stopped by
                // a string or left by its client holds no seat or blocks in the next plan.
                self.flush_pending();
                if !self.scheduler.has_work() {
                    continue;
                }
            }
            self.expire_waiting();
            if !self.scheduler.has_work() {
                continue;
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
    pub(super) fn handle(&mut self, cmd: Command) -> bool {
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
    pub(super) fn snapshot(&self) -> EngineStats {
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
            max_num_seqs: self.scheduler.config().batching.max_num_seqs,
            // Earlier workers' schedulers (a rebuild starts a new one) plus this one's.
            num_reused_prompt_tokens: self.stats.num_reused_prompt_tokens
                + self.scheduler.num_reused_tokens(),
            ..self.stats.clone()
        }
    }

    pub(super) fn admit(&mut self, sub: Submission) {
        let Submission {
            seq_id,
            request,
            events,
            arrival,
        } = sub;
        let prompt_ids = request.prompt_ids().to_vec();
        let (sampling, stop) = (request.sampling(), request.stop());
        let mut events = EventSink {
            seq_id,
            target: Some(events),
            orphans: self.orphans.clone(),
        };
        let info = &self.info;
        let max_tokens = stop.max_tokens.min(info.max_model_len - prompt_ids.len());
        let priority = request.queue().priority;
        if let Err(e) =
            self.scheduler
                .add_with_priority(seq_id, prompt_ids.clone(), max_tokens, priority)
        {
            events.send(TokenEvent::Error(e.to_string()));
            return;
        }
        let detok = match (&info.tokenizer, request.detokenize()) {
            (Some(t), true) => Some(IncrementalDecoder::new(t.clone(), &prompt_ids, true)),
            _ => None,
        };
        let stop_strings = (detok.is_some() && !stop.stop_strings.is_empty())
            .then(|| StopStringMatcher::new(stop.stop_strings.clone()));
        let mut stop_ids = stop.stop_token_ids.clone();
        if !stop.ignore_eos {
            stop_ids.extend(&info.eos_token_ids);
        }
        let seed = sampling
            .seed
            .unwrap_or(self.seed_base ^ seq_id.0.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let setup = SamplingSetup {
            params: sampling,
            seed,
            prompt_ids: &prompt_ids,
            suppressed_ids: &stop_ids,
            min_tokens: stop.min_tokens,
        };
        if let Err(e) = self.executor.add_request(seq_id, &setup) {
            self.scheduler.remove(seq_id);
            events.send(TokenEvent::Error(e.to_string()));
            return;
        }
        self.stats.num_prompt_tokens += prompt_ids.len() as u64;
        let injects_panic = self
            .faults
            .panic_token_id
            .is_some_and(|id| prompt_ids.contains(&id));
        events.send(TokenEvent::Started {
            prompt_ids: prompt_ids.clone(),
        });
        let own_timeout = request.queue().queue_timeout;
        let queue_limit = own_timeout
            .or(self.scheduler.config().batching.queue_timeout)
            .map(|timeout| QueueLimit {
                submitted_at: arrival,
                timeout,
                from_request: own_timeout.is_some(),
            });
        if let Some(deadline) = queue_limit
            .as_ref()
            .and_then(|l| l.submitted_at.checked_add(l.timeout))
        {
            self.queue_deadlines.push(Reverse((deadline, seq_id)));
        }
        self.seqs.insert(
            seq_id,
            SeqState {
                detok,
                stop_strings,
                events,
                num_generated: 0,
                max_tokens,
                stop_ids,
                injects_panic,
                num_prompt_tokens: prompt_ids.len(),
                clock: self.timings.as_ref().map(|_| RequestClock::new(arrival)),
                queue_limit,
            },
        );
    }

    /// Ends every request whose queue deadline has passed while it still waits for its first
    /// step: it leaves the scheduler and the executor, and gets one `Unavailable` naming the
    /// bound and how long it waited. Runs before every schedule.
    pub(super) fn expire_waiting(&mut self) {
        let now = Instant::now();
        while let Some(&Reverse((deadline, seq_id))) = self.queue_deadlines.peek() {
            if deadline > now {
                break;
            }
            self.queue_deadlines.pop();
            if !self.scheduler.is_new(seq_id) {
                continue; // scheduled (or gone) in time
            }
            self.scheduler.remove(seq_id);
            self.executor.remove_request(seq_id);
            let Some(mut state) = self.seqs.remove(&seq_id) else {
                continue;
            };
            self.stats.num_queue_timeouts += 1;
            let msg = match &state.queue_limit {
                Some(l) => format!(
                    "queue timeout: the request waited {:.1} ms without being scheduled, the most \
                     is the {} queue_timeout_microseconds ({}); retry later",
                    now.duration_since(l.submitted_at).as_secs_f64() * 1e3,
                    if l.from_request {
                        "request's"
                    } else {
                        "model's"
                    },
                    l.timeout.as_micros()
                ),
                None => "queue timeout".into(),
            };
            state.events.send(TokenEvent::Unavailable(msg));
        }
        // Entries of requests scheduled long before their deadline: keep the heap near the
        // number of requests held.
        if self.queue_deadlines.len() > 2 * self.seqs.len() + 64 {
            let scheduler = &self.scheduler;
            self.queue_deadlines
                .retain(|Reverse((_, id))| scheduler.is_new(*id));
        }
    }

    pub(super) fn finish_aborted(&mut self, id: SeqId) {
        // Its last token, accepted but not delivered yet, goes out first, as it would have
        // without the overlap (it may end the request: then there is nothing left to abort).
        if self.pending.iter().any(|p| p.seq_id == id) {
            let (own, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.pending)
                .into_iter()
                .partition(|p| p.seq_id == id);
            self.pending = rest;
            deliver(
                own,
                &mut self.seqs,
                &mut self.scheduler,
                &mut self.stats,
                &mut self.removed,
                self.timings.as_ref(),
            );
            self.drop_removed();
        }
        self.scheduler.remove(id);
        self.executor.remove_request(id);
        if let Some(mut state) = self.seqs.remove(&id) {
            self.stats.num_aborted += 1;
            state.events.send(TokenEvent::Finished {
                text: String::new(),
                reason: FinishReason::Abort,
            });
            report_timings(
                self.timings.as_ref(),
                id,
                &mut state,
                RequestOutcome::Aborted,
                None,
            );
        }
    }

    /// Runs one step. Its tokens are accepted at once (sampler, penalties, stop ids, max_tokens,
    /// the scheduler), so the next step can be scheduled; their delivery (detokenization, stop
    /// strings, events) is left in `pending` and runs while the device works on the next step
    /// (`deliver`).
    pub(super) fn step(&mut self, plan: SchedulePlan) {
        self.stats.num_steps += 1;
        self.stats.num_preemptions += plan.preempted.len() as u64;
        // With timings: a request's queue time ends when a step first computes part of it. A
        // chunk that samples is stamped in the loop below (which looks its state up anyway);
        // only the earlier chunks of a chunked prompt are looked up here, never a decode.
        let started = self.timings.as_ref().map(|_| Instant::now());
        if let Some(at) = started {
            for s in plan.seqs.iter().filter(|s| !s.sample) {
                if let Some(clock) = self
                    .seqs
                    .get_mut(&s.seq_id)
                    .and_then(|st| st.clock.as_mut())
                {
                    clock.scheduled(at);
                }
            }
        }
        let outs = match self.sample_step(&plan) {
            Ok(outs) => outs,
            Err(e) => {
                // A failed step fails the requests in it; the engine keeps serving the rest. What
                // the previous step produced goes out first.
                self.flush_pending();
                for s in &plan.seqs {
                    self.scheduler.remove(s.seq_id);
                    self.executor.remove_request(s.seq_id);
                    if let Some(mut state) = self.seqs.remove(&s.seq_id) {
                        state
                            .events
                            .send(TokenEvent::Error(format!("execution failed: {e}")));
                        report_timings(
                            self.timings.as_ref(),
                            s.seq_id,
                            &mut state,
                            RequestOutcome::Failed,
                            None,
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
            if let (Some(clock), Some(at)) = (&mut state.clock, started) {
                clock.scheduled(at);
            }
            let Some(out) = out else {
                continue;
            };
            let token_id = out.token_id;
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
            self.executor.remove_request(p.seq_id);
            p.finished_state = self.seqs.remove(&p.seq_id).map(Box::new);
        }
    }

    /// Delivers the tokens still pending (when no further step will run them in its shadow).
    pub(super) fn flush_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        deliver(
            pending,
            &mut self.seqs,
            &mut self.scheduler,
            &mut self.stats,
            &mut self.removed,
            self.timings.as_ref(),
        );
        self.drop_removed();
    }

    /// Drops the executor's state of the sequences `deliver` removed.
    fn drop_removed(&mut self) {
        for id in self.removed.drain(..) {
            self.executor.remove_request(id);
        }
    }
}

/// A sampled token accepted by `Worker::step` and not yet delivered.
pub(super) struct PendingToken {
    pub(super) seq_id: SeqId,
    pub(super) token_id: u32,
    pub(super) logprobs: Option<crate::request::TokenLogprobs>,
    /// Stop id or max_tokens (a stop string is found on delivery).
    pub(super) finish: Option<FinishReason>,
    /// The state of a sequence that finished with this token: it has left the engine's map (and
    /// the scheduler) already.
    pub(super) finished_state: Option<Box<SeqState>>,
}

/// Detokenizes, matches stop strings and sends the events of one step's tokens, in order. A
/// sequence stopped by a string here may already be in the next step on the device: it leaves
/// the scheduler and the map now, and that step's token for it is dropped (`Worker::step` skips
/// sequences it no longer tracks). A request aborted since the step has no state: its token is
/// dropped (its final event went out with the abort). Sequences it removes are listed in
/// `removed` (the executor, busy with the step, drops their sampling state afterwards). With
/// `timings`, each token's delivery is timed (one clock read per call) and a request that ends
/// here reports its timings.
pub(super) fn deliver(
    pending: Vec<PendingToken>,
    seqs: &mut HashMap<SeqId, SeqState>,
    scheduler: &mut Scheduler,
    stats: &mut EngineStats,
    removed: &mut Vec<SeqId>,
    timings: Option<&Sender<RequestTimings>>,
) {
    let now = match (timings, pending.is_empty()) {
        (Some(_), false) => Some(Instant::now()),
        _ => None,
    };
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
        if let (Some(clock), Some(at)) = (&mut state.clock, now) {
            clock.token(at);
        }
        let delivered = state.events.send(ev);
        let outcome = if finish.is_some() {
            stats.num_finished += 1;
            RequestOutcome::Completed
        } else if !delivered {
            stats.num_aborted += 1; // the client is gone: abort
            RequestOutcome::Aborted
        } else {
            continue;
        };
        report_timings(timings, seq_id, state, outcome, now);
        if finished_state.is_none() {
            scheduler.remove(seq_id);
            seqs.remove(&seq_id);
            removed.push(seq_id);
        }
    }
}

impl Worker {
    /// Executes the plan; the executor samples one token per sampling sequence (plan order; None
    /// for a sequence the engine no longer tracks).
    pub(super) fn sample_step(
        &mut self,
        plan: &SchedulePlan,
    ) -> crate::Result<Vec<Option<Sampled>>> {
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
        // The previous step's tokens are delivered while the device runs this one (or before
        // it, on an executor that does not overlap).
        let pending = std::mem::take(&mut self.pending);
        let (seqs, scheduler, stats, removed) = (
            &mut self.seqs,
            &mut self.scheduler,
            &mut self.stats,
            &mut self.removed,
        );
        let timings = self.timings.as_ref();
        let mut overlap = Some(move || deliver(pending, seqs, scheduler, stats, removed, timings));
        let outs = self.executor.execute(plan, &mut || {
            if let Some(f) = overlap.take() {
                f();
            }
        });
        // A step that failed before its overlap point still delivers them.
        if let Some(f) = overlap.take() {
            f();
        }
        self.drop_removed();
        // A sequence delivery ended meanwhile has no state here: its token is dropped.
        Ok(outs?
            .into_iter()
            .zip(plan.seqs.iter().filter(|s| s.sample))
            .map(|(o, s)| self.seqs.contains_key(&s.seq_id).then_some(o))
            .collect())
    }
}

/// Sends the timings of a request that just got its final event (when requests are timed); `at`
/// is when (None: now).
pub(super) fn report_timings(
    timings: Option<&Sender<RequestTimings>>,
    seq_id: SeqId,
    state: &mut SeqState,
    outcome: RequestOutcome,
    at: Option<Instant>,
) {
    let (Some(tx), Some(clock)) = (timings, state.clock.take()) else {
        return;
    };
    let at = at.unwrap_or_else(Instant::now);
    // Nobody listening any more (the model is unloading) is fine.
    let _ = tx.send(clock.finish(seq_id, state.num_prompt_tokens, outcome, at));
}
