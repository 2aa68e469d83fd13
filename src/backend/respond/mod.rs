//! Answering requests. `ResponseSender` owns a request's response factory and guarantees exactly
//! one final response (its `Drop` sends a flags-only FINAL, or an error if nothing was sent);
//! `Job` owns the unreleased request and, on drop, reports its statistics and releases it.
//! `Shaper` decides what each response says and `build_outputs` turns that into output tensors
//! (both pure, tested in their files), filtered to the outputs the model declares.
//!
//! The `Responder` is one thread per model: it submits parsed requests to the engine (events
//! come back on one shared channel tagged by `SeqId`), turns events into responses (a delta per
//! response when streaming, one full response otherwise), polls Triton for cancellation every
//! `CANCEL_POLL` and aborts cancelled requests in the engine, refreshes the model's custom
//! metrics every `METRICS_INTERVAL` and observes the engine's request timings into them (and
//! owns them: they are deleted when the thread ends), logs the engine's incidents (a panicked
//! step, a rebuild), and drains an instance's requests before that instance is finalized. It
//! never blocks Triton's Execute thread.
//!
//! Streaming, the first token always goes out as a response of its own, even when its text is
//! held back (an incomplete UTF-8 character, a possible stop string) and the delta is empty:
//! Triton's time-to-first-response histogram (`nv_inference_first_response_histogram_ms`, in
//! Triton releases after 2.51) then measures the time to the first token. Later empty text
//! deltas are not sent.
//!
//! Four files: `shape` (events → response content), `outputs` (response content → output
//! tensors), `sender` (`ResponseSender` and `Job`, the release obligations) and this one (the
//! `Responder` thread).

mod outputs;
mod sender;
mod shape;

use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use triton_api::{ErrorCode, TritonError};

use super::metrics::{METRICS_INTERVAL, ModelMetrics};
use super::parse::ParsedRequest;
use crate::engine::{EngineHandle, Incident, RequestTimings};
use crate::request::{FinishReason, RequestError, SeqId, TokenEvent};
use crate::tokenizer::Tokenizer;
pub use outputs::{OutputTensor, ResponseData, build_outputs, declared_only};
pub use sender::{Job, ResponseSender};
use shape::Shaper;

/// How often in-flight requests are checked for cancellation.
pub const CANCEL_POLL: Duration = Duration::from_millis(20);

/// A request waiting for the responder to submit it.
pub struct NewJob {
    /// The request and its response sender.
    pub job: Job,
    /// What to submit to the engine and how to shape the responses.
    pub parsed: ParsedRequest,
}

enum Intake {
    New(Box<NewJob>),
    /// Finish every request of this instance (ModelInstanceFinalize), then reply.
    Drain {
        instance_id: usize,
        done: Sender<()>,
    },
}

/// A request in the engine.
struct Active {
    job: Job,
    /// What each response says.
    shaper: Shaper,
    /// The model's outputs carry a batch dimension.
    batched: bool,
}

impl Active {
    /// Applies one engine event; returns true when the request is finished (and answered).
    fn on_event(&mut self, ev: TokenEvent, model: &ModelOutputs) -> bool {
        match ev {
            TokenEvent::Started { prompt_ids } => {
                self.shaper.set_prompt_ids(prompt_ids);
                self.job.mark_compute_start();
                false
            }
            TokenEvent::Token {
                token_id,
                text,
                logprobs,
                finish,
            } => {
                self.job.mark_compute_start();
                let tokenizer = model.tokenizer.as_deref();
                match self
                    .shaper
                    .on_token(token_id, text, logprobs, finish, tokenizer)
                {
                    Some((d, final_flag)) => {
                        self.send(&d, final_flag, &model.declared);
                        final_flag
                    }
                    None => false,
                }
            }
            TokenEvent::Finished {
                reason: FinishReason::Abort,
                ..
            } => {
                self.abort_error();
                true
            }
            TokenEvent::Finished { text, reason } => {
                let tokenizer = model.tokenizer.as_deref();
                let d = self.shaper.on_finished(text, reason, tokenizer);
                self.send(&d, true, &model.declared);
                true
            }
            TokenEvent::Error(msg) => {
                self.job
                    .sender
                    .send_error(&TritonError::internal(format!("generation failed: {msg}")));
                true
            }
            // UNAVAILABLE: the request itself is fine; the client may retry (or an operator has
            // to reload the model, as the message says).
            TokenEvent::Unavailable(msg) => {
                self.job
                    .sender
                    .send_error(&TritonError::new(ErrorCode::Unavailable, msg));
                true
            }
        }
    }

    fn abort_error(&mut self) {
        self.job.sender.send_error(&TritonError::new(
            ErrorCode::Unavailable,
            "the request was aborted: the model is shutting down or being unloaded",
        ));
    }

    fn send(&mut self, d: &ResponseData, final_flag: bool, declared: &[String]) {
        let outputs = declared_only(build_outputs(d, self.batched), declared);
        if let Err(e) = self.job.sender.send(&outputs, final_flag) {
            triton_api::log::warn(&format!("cannot send a response: {e}"));
        }
        if final_flag {
            self.job.success = true;
        }
    }
}

/// What every response of a model needs besides its request's own state.
struct ModelOutputs {
    /// The outputs the model's configuration declares (the only ones a response may carry).
    declared: Vec<String>,
    /// Decodes the tokens of the `logprobs` JSON.
    tokenizer: Option<Arc<Tokenizer>>,
}

/// The response thread of one model.
pub struct Responder {
    /// None once shutting down: dropping the sender ends the thread's intake.
    intake: Option<Sender<Intake>>,
    thread: Option<JoinHandle<()>>,
}

/// What the response thread serves: the model's engine, its incidents (logged under the model's
/// name) and its metrics.
pub struct ResponderSetup {
    /// The model's name, for log lines.
    pub model_name: String,
    /// Where requests go (`submit_to`, all events on one channel) and stats come from.
    pub engine: EngineHandle,
    /// The engine's incidents (`Engine::incidents`), logged as they arrive.
    pub incidents: Receiver<Incident>,
    /// The engine's request timings (`Engine::request_timings`), observed into the metrics (and
    /// drained even when no metric takes them).
    pub timings: Option<Receiver<RequestTimings>>,
    /// The model's outputs have a batch dimension.
    pub batched: bool,
    /// The outputs the model's configuration declares; responses carry only these.
    pub declared_outputs: Vec<String>,
    /// The model's tokenizer (names the tokens of the `logprobs` output).
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The model's metrics, refreshed every `METRICS_INTERVAL` and dropped with the thread
    /// (possibly with no set at all: switched off, or metrics disabled on the server).
    pub metrics: ModelMetrics,
}

impl Responder {
    /// Sets the metrics once (before the model reports ready), then starts the response
    /// thread; fails only when the thread cannot be spawned.
    pub fn start(mut setup: ResponderSetup) -> Result<Self, TritonError> {
        // Set the gauges before the model is reported ready (the thread refreshes them later).
        refresh_metrics(&setup.engine, &mut setup.metrics);
        let (intake_tx, intake_rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("ferrum-responder".into())
            .spawn(move || run(setup, intake_rx))
            .map_err(|e| TritonError::internal(format!("cannot start the response thread: {e}")))?;
        Ok(Responder {
            intake: Some(intake_tx),
            thread: Some(thread),
        })
    }

    /// Hands a parsed request over; on failure (thread gone) the request gets an error.
    pub fn submit(&self, job: NewJob) {
        let unavailable = TritonError::new(ErrorCode::Unavailable, "the model is shutting down");
        match &self.intake {
            Some(tx) => {
                if let Err(crossbeam_channel::SendError(Intake::New(nj))) =
                    tx.send(Intake::New(Box::new(job)))
                {
                    nj.job.fail(&unavailable);
                }
            }
            None => job.job.fail(&unavailable),
        }
    }

    /// Finishes every request of `instance_id` (with an error if still running) and waits.
    pub fn drain(&self, instance_id: usize) {
        let (tx, rx) = crossbeam_channel::bounded(1);
        if self.intake.as_ref().is_some_and(|i| {
            i.send(Intake::Drain {
                instance_id,
                done: tx,
            })
            .is_ok()
        }) {
            let _ = rx.recv();
        }
    }
}

impl Drop for Responder {
    fn drop(&mut self) {
        // Closing the intake ends the thread after it fails whatever is still in flight.
        self.intake = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Logs an engine incident: at error level when requests failed or the model stopped serving,
/// at info level when it serves again.
fn log_incident(model_name: &str, incident: &Incident) {
    let level = match incident {
        Incident::StepPanicked { .. } | Incident::RebuildFailed { .. } => {
            triton_api::log::Level::Error
        }
        Incident::Rebuilt { .. } => triton_api::log::Level::Info,
    };
    triton_api::triton_log!(level, "ferrum: model '{model_name}': {incident}");
}

/// Sets the metrics from the engine's current statistics (`ModelMetrics::update` gives up a set
/// Triton refuses); asks the engine nothing when no set is exported.
fn refresh_metrics(engine: &EngineHandle, metrics: &mut ModelMetrics) {
    if metrics.is_empty() {
        return;
    }
    if let Some(stats) = engine.stats() {
        metrics.update(&stats);
    }
}

fn run(setup: ResponderSetup, intake: Receiver<Intake>) {
    let ResponderSetup {
        model_name,
        engine,
        mut incidents,
        timings,
        batched,
        declared_outputs,
        tokenizer,
        mut metrics,
    } = setup;
    let model_outputs = ModelOutputs {
        declared: declared_outputs,
        tokenizer,
    };
    let mut timings = timings.unwrap_or_else(crossbeam_channel::never);
    let (events_tx, events_rx) = crossbeam_channel::unbounded::<(SeqId, TokenEvent)>();
    let mut active: HashMap<SeqId, Active> = HashMap::new();
    let mut last_poll = Instant::now();
    let mut last_metrics = Instant::now();
    loop {
        select! {
            recv(intake) -> msg => match msg {
                Ok(Intake::New(nj)) => {
                    let NewJob { job, parsed } = *nj;
                    let mut shaper = Shaper::new(&parsed, Vec::new());
                    match engine.submit_to(parsed.generate, events_tx.clone()) {
                        Ok((seq_id, prompt_ids)) => {
                            shaper.set_prompt_ids(prompt_ids);
                            active.insert(seq_id, Active { job, shaper, batched });
                        }
                        Err(e @ RequestError::Unavailable(_)) => {
                            job.fail(&TritonError::new(ErrorCode::Unavailable, e.to_string()))
                        }
                        Err(e) => job.fail(&TritonError::invalid_arg(e.to_string())),
                    }
                }
                Ok(Intake::Drain { instance_id, done }) => {
                    let ids: Vec<SeqId> =
                        active.iter().filter(|(_, a)| a.job.instance_id() == instance_id).map(|(id, _)| *id).collect();
                    for id in ids {
                        engine.abort(id);
                        if let Some(mut a) = active.remove(&id) {
                            a.abort_error();
                        }
                    }
                    let _ = done.send(());
                }
                Err(_) => break,
            },
            recv(events_rx) -> msg => {
                if let Ok((seq_id, ev)) = msg {
                    let done = active
                        .get_mut(&seq_id)
                        .is_some_and(|a| a.on_event(ev, &model_outputs));
                    if done {
                        active.remove(&seq_id);
                    }
                }
            },
            recv(incidents) -> msg => match msg {
                Ok(incident) => log_incident(&model_name, &incident),
                // The engine is gone (shutting down): stop selecting on a closed channel.
                Err(_) => incidents = crossbeam_channel::never(),
            },
            recv(timings) -> msg => match msg {
                Ok(t) => metrics.observe(&t),
                Err(_) => timings = crossbeam_channel::never(),
            },
            default(CANCEL_POLL) => {},
        }
        if last_poll.elapsed() >= CANCEL_POLL {
            last_poll = Instant::now();
            let cancelled: Vec<SeqId> = active
                .iter()
                .filter(|(_, a)| a.job.sender.is_cancelled())
                .map(|(id, _)| *id)
                .collect();
            for id in cancelled {
                engine.abort(id);
                if let Some(a) = active.remove(&id) {
                    a.job.fail(&TritonError::new(
                        ErrorCode::Cancelled,
                        "the request was cancelled",
                    ));
                }
            }
        }
        if last_metrics.elapsed() >= METRICS_INTERVAL {
            // Answered by the engine between steps (it holds no request back meanwhile: events
            // are only produced by the step that is finishing).
            refresh_metrics(&engine, &mut metrics);
            last_metrics = Instant::now();
        }
    }
    // Shutdown: abort whatever is left and answer it.
    for (id, mut a) in active.drain() {
        engine.abort(id);
        a.abort_error();
    }
}
