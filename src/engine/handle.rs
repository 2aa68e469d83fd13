//! The engine's boundary: `EngineHandle` (submit, abort, stats) and a request's `RequestStream`;
//! `EventSink` carries each request's debt of one final event (a sink dropped unsettled hands its
//! target to the supervisor, which answers it).

use super::*;

/// Where a request's events go: its own channel (`submit`), or a channel shared by many
/// requests with each event tagged by its `SeqId` (`submit_to`, e.g. one response thread
/// serving every request of a Triton model).
pub(super) enum Route {
    Own(Sender<TokenEvent>),
    Shared(Sender<(SeqId, TokenEvent)>),
}

/// A request's route plus its place in the in-flight count. The place is given back just before
/// the final event goes out (so a client that has its answer can submit again at once), or when
/// the target is dropped without one (its receiver gone), wherever the request is then (channel,
/// worker, supervisor).
pub(super) struct EventTarget {
    route: Route,
    slot: Option<Slot>,
}

impl EventTarget {
    /// False when the receiving side is gone.
    pub(super) fn send(&mut self, seq_id: SeqId, ev: TokenEvent) -> bool {
        if is_final(&ev) {
            self.slot = None;
        }
        match &self.route {
            Route::Own(tx) => tx.send(ev).is_ok(),
            Route::Shared(tx) => tx.send((seq_id, ev)).is_ok(),
        }
    }
}

/// The bound on requests in flight (submitted, final event not yet sent):
/// `max_num_seqs + max_queue_size` (`BatchingOptions::max_queue_size`; None: unbounded).
pub(super) struct Admission {
    in_flight: AtomicUsize,
    max_num_seqs: usize,
    max_queue_size: Option<usize>,
}

/// One request's place in `Admission::in_flight`, given back when dropped.
struct Slot(Arc<Admission>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Admission {
    pub(super) fn new(max_num_seqs: usize, max_queue_size: Option<usize>) -> Arc<Self> {
        Arc::new(Admission {
            in_flight: AtomicUsize::new(0),
            max_num_seqs,
            max_queue_size,
        })
    }

    /// A place for one more request, or the busy error naming the bound.
    fn take(self: &Arc<Self>) -> Result<Slot, RequestError> {
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(self.clone());
        match self.max_queue_size {
            Some(q) if n >= self.max_num_seqs.saturating_add(q) => {
                Err(RequestError::Unavailable(format!(
                    "busy: {n} requests in flight, the most is max_num_seqs ({}) + max_queue_size \
                     ({q}); retry later",
                    self.max_num_seqs
                )))
            }
            _ => Ok(slot),
        }
    }
}

/// A request's `EventTarget` plus the debt of its final event, while a worker holds the request.
/// Sending the final event (or finding the receiver gone) settles the debt and empties the sink.
/// A sink dropped unsettled (a panic unwinding through a step, or the state of a panicked worker
/// being dropped) hands its target to the engine thread's `orphans` channel, where the
/// `Supervisor` sends the final error naming the failure: no request is lost, wherever its state
/// was when the panic struck.
pub(super) struct EventSink {
    pub(super) seq_id: SeqId,
    pub(super) target: Option<EventTarget>,
    pub(super) orphans: Sender<Orphan>,
}

/// The target of a request whose sink was dropped before its final event.
pub(super) type Orphan = (SeqId, EventTarget);

impl EventSink {
    /// False when the receiving side is gone (or the final event was sent already).
    pub(super) fn send(&mut self, ev: TokenEvent) -> bool {
        let Some(target) = &mut self.target else {
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
    pub(super) commands: Sender<Command>,
    pub(super) next_id: Arc<AtomicU64>,
    pub(super) info: Arc<ModelInfo>,
    pub(super) admission: Arc<Admission>,
}

/// The events of one request. Dropping it before the final event aborts the request.
pub struct RequestStream {
    /// The request's engine id, for `EngineHandle::abort`.
    pub seq_id: SeqId,
    /// The prompt as the engine runs it (tokenized by `submit` if it was text).
    pub prompt_ids: Vec<u32>,
    pub(super) events: Receiver<TokenEvent>,
    pub(super) commands: Sender<Command>,
    pub(super) finished: bool,
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

/// Whether `ev` ends its request's stream: a `Token` with `finish` set, `Finished`, `Error` or
/// `Unavailable`. The engine sends exactly one such event per accepted request, and it is the last.
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
    /// The model facts `submit` validates requests against (vocabulary, `max_model_len`, EOS
    /// ids, tokenizer); callers use them to validate or tokenize ahead of `submit`.
    pub fn info(&self) -> &ModelInfo {
        &self.info
    }

    /// Queues a request (validated and tokenized by `GenerateRequest::new` against `info()`).
    pub fn submit(&self, request: GenerateRequest) -> Result<RequestStream, RequestError> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (seq_id, prompt_ids) = self.enqueue(request, Route::Own(tx))?;
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
        self.enqueue(request, Route::Shared(events))
    }

    pub(super) fn enqueue(
        &self,
        request: GenerateRequest,
        route: Route,
    ) -> Result<(SeqId, Vec<u32>), RequestError> {
        if !request.is_for(&self.info) {
            return Err(RequestError::invalid(
                "request",
                "built for another model",
                format!(
                    "must be built by GenerateRequest::new with this engine's model info \
                     (vocabulary {}, context {} tokens)",
                    self.info.vocab_size, self.info.max_model_len
                ),
            ));
        }
        let events = EventTarget {
            route,
            slot: Some(self.admission.take()?),
        };
        let seq_id = SeqId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let prompt_ids = request.prompt_ids().to_vec();
        let sub = Submission {
            seq_id,
            request,
            events,
            submitted_at: Instant::now(),
        };
        self.commands
            .send(Command::Submit(Box::new(sub)))
            .map_err(|_| {
                RequestError::Unavailable(
                    "the engine is not running: it has stopped (the model is unloading or failed)"
                        .into(),
                )
            })?;
        Ok((seq_id, prompt_ids))
    }

    /// Aborts a request; its stream ends with `Finished { reason: Abort }` and its KV blocks are
    /// freed in the engine's next intake (before the next step).
    pub fn abort(&self, seq_id: SeqId) {
        let _ = self.commands.send(Command::Abort(seq_id));
    }

    /// The counters and the current KV cache and queue occupancy, answered by the engine thread
    /// at its next intake (so this waits up to one step). None once the engine has stopped.
    pub fn stats(&self) -> Option<EngineStats> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.commands.send(Command::Stats(tx)).ok()?;
        rx.recv().ok()
    }
}
