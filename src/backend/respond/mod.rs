//! Answering requests. `ResponseSender` owns a request's response factory and guarantees exactly
//! one final response (its `Drop` sends a flags-only FINAL, or an error if nothing was sent);
//! `Job` owns the unreleased request and, on drop, reports its statistics and releases it.
//! `build_outputs` turns generated text/tokens into output tensors (pure, tested here).
//!
//! The `Responder` is one thread per model: it submits parsed requests to the engine (events
//! come back on one shared channel tagged by `SeqId`), turns events into responses (a delta per
//! response when streaming, one full response otherwise), polls Triton for cancellation every
//! `CANCEL_POLL` and aborts cancelled requests in the engine, refreshes the model's custom
//! metrics every `METRICS_INTERVAL` (and owns them: they are deleted when the thread ends), logs
//! the engine's incidents (a panicked step, a rebuild), and drains an instance's requests before
//! that instance is finalized. It never blocks Triton's Execute thread.
//!
//! Three files: `outputs` (response content → output tensors), `sender` (`ResponseSender` and
//! `Job`, the release obligations) and this one (the `Responder` thread).

mod outputs;
mod sender;

use std::collections::HashMap;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, select};
use triton_api::{ErrorCode, TritonError};

use super::metrics::{METRICS_INTERVAL, ModelMetrics};
use super::parse::{Interface, ParsedRequest};
use crate::engine::{EngineHandle, Incident};
use crate::request::{FinishReason, RequestError, SeqId, TokenEvent};
pub use outputs::{OutputTensor, ResponseData, build_outputs};
pub use sender::{Job, ResponseSender};

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
    interface: Interface,
    stream: bool,
    exclude_input: bool,
    return_log_probs: bool,
    prompt_text: Option<String>,
    prompt_ids: Vec<u32>,
    text: String,
    output_ids: Vec<u32>,
    logprobs: Vec<f32>,
    batched: bool,
}

impl Active {
    /// Applies one engine event; returns true when the request is finished (and answered).
    fn on_event(&mut self, ev: TokenEvent) -> bool {
        match ev {
            TokenEvent::Started { prompt_ids } => {
                self.prompt_ids = prompt_ids;
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
                self.output_ids.push(token_id);
                if let Some(lp) = logprobs {
                    self.logprobs.push(lp.logprob);
                }
                self.text.push_str(&text);
                if self.stream {
                    let lp = logprobs_tail(self.return_log_probs, &self.logprobs, 1);
                    let delta = match self.interface {
                        Interface::Text => ResponseData {
                            text: Some(text),
                            logprobs: lp,
                            ..Default::default()
                        },
                        Interface::Tokens => ResponseData {
                            token_ids: Some(vec![token_id]),
                            logprobs: lp,
                            ..Default::default()
                        },
                    };
                    match finish {
                        Some(reason) => self.finish_stream(delta, reason),
                        None => {
                            let skip = self.interface == Interface::Text
                                && delta.text.as_deref() == Some("");
                            if !skip {
                                self.send(&delta, false);
                            }
                            false
                        }
                    }
                } else {
                    match finish {
                        Some(reason) => self.finish_full(reason),
                        None => false,
                    }
                }
            }
            TokenEvent::Finished { text, reason } => {
                if reason == FinishReason::Abort {
                    self.abort_error();
                    return true;
                }
                self.text.push_str(&text);
                if self.stream {
                    let delta = match self.interface {
                        Interface::Text => ResponseData {
                            text: Some(text),
                            ..Default::default()
                        },
                        Interface::Tokens => ResponseData {
                            token_ids: Some(vec![]),
                            ..Default::default()
                        },
                    };
                    self.finish_stream(delta, reason)
                } else {
                    self.finish_full(reason)
                }
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

    fn send(&mut self, d: &ResponseData, final_flag: bool) {
        if let Err(e) = self
            .job
            .sender
            .send(&build_outputs(d, self.batched), final_flag)
        {
            triton_api::log::warn(&format!("cannot send a response: {e}"));
        }
        if final_flag {
            self.job.success = true;
        }
    }

    fn finish_stream(&mut self, mut delta: ResponseData, reason: FinishReason) -> bool {
        delta.finish = Some(reason);
        delta.num_input_tokens = Some(self.prompt_ids.len());
        delta.num_output_tokens = Some(self.output_ids.len());
        self.send(&delta, true);
        true
    }

    fn finish_full(&mut self, reason: FinishReason) -> bool {
        let mut d = ResponseData {
            finish: Some(reason),
            num_input_tokens: Some(self.prompt_ids.len()),
            num_output_tokens: Some(self.output_ids.len()),
            logprobs: logprobs_tail(self.return_log_probs, &self.logprobs, self.logprobs.len()),
            ..Default::default()
        };
        match self.interface {
            Interface::Text => {
                let text = std::mem::take(&mut self.text);
                d.text = Some(match (&self.prompt_text, self.exclude_input) {
                    (Some(p), false) => format!("{p}{text}"),
                    _ => text,
                });
            }
            Interface::Tokens => {
                let mut ids = if self.exclude_input {
                    vec![]
                } else {
                    self.prompt_ids.clone()
                };
                ids.extend_from_slice(&self.output_ids);
                d.token_ids = Some(ids);
            }
        }
        self.send(&d, true);
        true
    }
}

fn logprobs_tail(wanted: bool, all: &[f32], n: usize) -> Option<Vec<f32>> {
    wanted.then(|| all[all.len().saturating_sub(n)..].to_vec())
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
    /// The model's outputs have a batch dimension.
    pub batched: bool,
    /// The model's gauges, refreshed every `METRICS_INTERVAL` and dropped with the thread;
    /// None: serve without them (metrics disabled on the server).
    pub metrics: Option<ModelMetrics>,
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

/// Sets the metrics from the engine's current statistics; a failure is logged once, then the
/// metrics are given up (dropped, so deleted) rather than logged every interval.
fn refresh_metrics(engine: &EngineHandle, metrics: &mut Option<ModelMetrics>) {
    let Some(m) = metrics else { return };
    let Some(stats) = engine.stats() else { return };
    if let Err(e) = m.update(&stats) {
        triton_api::log::warn(&format!("ferrum: custom metrics disabled: {e}"));
        *metrics = None;
    }
}

fn run(setup: ResponderSetup, intake: Receiver<Intake>) {
    let ResponderSetup {
        model_name,
        engine,
        mut incidents,
        batched,
        mut metrics,
    } = setup;
    let (events_tx, events_rx) = crossbeam_channel::unbounded::<(SeqId, TokenEvent)>();
    let mut active: HashMap<SeqId, Active> = HashMap::new();
    let mut last_poll = Instant::now();
    let mut last_metrics = Instant::now();
    loop {
        select! {
            recv(intake) -> msg => match msg {
                Ok(Intake::New(nj)) => {
                    let NewJob { job, parsed } = *nj;
                    match engine.submit_to(parsed.generate, events_tx.clone()) {
                        Ok((seq_id, prompt_ids)) => {
                            active.insert(seq_id, Active {
                                job,
                                interface: parsed.interface,
                                stream: parsed.stream,
                                exclude_input: parsed.exclude_input_in_output,
                                return_log_probs: parsed.return_log_probs,
                                prompt_text: parsed.prompt_text,
                                prompt_ids,
                                text: String::new(),
                                output_ids: Vec::new(),
                                logprobs: Vec::new(),
                                batched,
                            });
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
                    let done = active.get_mut(&seq_id).is_some_and(|a| a.on_event(ev));
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_tail_takes_the_newest() {
        assert_eq!(logprobs_tail(true, &[1.0, 2.0, 3.0], 1), Some(vec![3.0]));
        assert_eq!(logprobs_tail(true, &[], 1), Some(vec![]));
        assert_eq!(logprobs_tail(false, &[1.0], 1), None);
    }
}
