//! Per-request timing, measured on the engine thread and handed out once per request when it
//! ends (`RequestTimings`, on `Engine::request_timings`), for serving metrics (time to first
//! token, inter-token latency, queue time, end-to-end latency). It only measures: the Triton
//! backend turns the timings into metric observations, and nothing here knows about metrics.
//!
//! ```text
//!   arrival            first scheduled        token 1         token 2  ...  token n   final event
//!   (submit)           (first step that       (delivered)     (delivered)            (sent)
//!      │                computes it)             │               │           │          │
//!      ├── queue_time ───┤                       │               │           │          │
//!      ├──────────── time_to_first_token ────────┤── interval ───┤ ... ──────┤          │
//!      ├────────────────────────────────────── e2e_latency ──────────────────┴──────────┤
//! ```
//!
//! Costs on the engine thread: one clock read per step (when the step is planned) and one per
//! delivery of a step's tokens, a `Vec` push per token, and one channel send per request; no
//! lock. A `RequestClock` exists only when someone listens (`EngineOptions::report_timings`).

use std::time::{Duration, Instant};

use crate::request::SeqId;

/// How a request ended, as far as the engine is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Finished by a stop condition or its length (`FinishReason::Stop` or `Length`).
    Completed,
    /// Aborted (`EngineHandle::abort`, the client left, shutdown) before it finished.
    Aborted,
    /// Ended by an execution error.
    Failed,
}

/// The timing of one request that the engine admitted, sent when its final event goes out.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestTimings {
    /// The request's engine id.
    pub seq_id: SeqId,
    /// How it ended.
    pub outcome: RequestOutcome,
    /// Prompt length in tokens.
    pub num_prompt_tokens: usize,
    /// Tokens delivered (one `Token` event each; a stop id counts, as in `num_output_tokens`).
    pub num_generated_tokens: usize,
    /// From arrival (`EngineHandle::submit`) to the start of the first step that computed any of
    /// it; None if no step did.
    pub queue_time: Option<Duration>,
    /// From arrival to the delivery of its first token; None without a token.
    pub time_to_first_token: Option<Duration>,
    /// Seconds between the deliveries of consecutive tokens: `num_generated_tokens - 1` values
    /// (none with fewer than two tokens).
    pub inter_token_latencies: Vec<f32>,
    /// From arrival to the final event.
    pub e2e_latency: Duration,
}

/// The clock of one request while the engine holds it.
#[derive(Debug, Clone)]
pub(super) struct RequestClock {
    arrival: Instant,
    first_scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    inter_token: Vec<f32>,
}

impl RequestClock {
    pub(super) fn new(arrival: Instant) -> Self {
        RequestClock {
            arrival,
            first_scheduled: None,
            first_token: None,
            last_token: None,
            inter_token: Vec::new(),
        }
    }

    /// A step that computes part of the request starts at `at` (only the first one counts).
    pub(super) fn scheduled(&mut self, at: Instant) {
        if self.first_scheduled.is_none() {
            self.first_scheduled = Some(at);
        }
    }

    /// A token of the request is delivered at `at`.
    pub(super) fn token(&mut self, at: Instant) {
        match self.last_token {
            None => self.first_token = Some(at),
            Some(last) => self
                .inter_token
                .push(at.saturating_duration_since(last).as_secs_f32()),
        }
        self.last_token = Some(at);
    }

    /// The request's timings, ended at `at` with `outcome`.
    pub(super) fn finish(
        self,
        seq_id: SeqId,
        num_prompt_tokens: usize,
        outcome: RequestOutcome,
        at: Instant,
    ) -> RequestTimings {
        let since_arrival = |t: Instant| t.saturating_duration_since(self.arrival);
        RequestTimings {
            seq_id,
            outcome,
            num_prompt_tokens,
            num_generated_tokens: self.first_token.map_or(0, |_| self.inter_token.len() + 1),
            queue_time: self.first_scheduled.map(since_arrival),
            time_to_first_token: self.first_token.map(since_arrival),
            inter_token_latencies: self.inter_token,
            e2e_latency: since_arrival(at),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_request_is_timed_from_arrival_through_each_token_to_its_end() {
        let t0 = Instant::now();
        let mut clock = RequestClock::new(t0);
        clock.scheduled(t0 + ms(5));
        clock.scheduled(t0 + ms(9)); // a later chunk: the first one counts
        clock.token(t0 + ms(20));
        clock.token(t0 + ms(30));
        clock.token(t0 + ms(45));
        let t = clock.finish(SeqId(7), 11, RequestOutcome::Completed, t0 + ms(50));
        assert_eq!(t.seq_id, SeqId(7));
        assert_eq!(t.outcome, RequestOutcome::Completed);
        assert_eq!(t.num_prompt_tokens, 11);
        assert_eq!(t.num_generated_tokens, 3);
        assert_eq!(t.queue_time, Some(ms(5)));
        assert_eq!(t.time_to_first_token, Some(ms(20)));
        assert_eq!(t.inter_token_latencies.len(), 2);
        assert!((t.inter_token_latencies[0] - 0.010).abs() < 1e-6);
        assert!((t.inter_token_latencies[1] - 0.015).abs() < 1e-6);
        assert_eq!(t.e2e_latency, ms(50));
    }

    #[test]
    fn a_request_aborted_while_waiting_has_no_queue_time_nor_tokens() {
        let t0 = Instant::now();
        let t = RequestClock::new(t0).finish(SeqId(1), 4, RequestOutcome::Aborted, t0 + ms(3));
        assert_eq!(t.queue_time, None);
        assert_eq!(t.time_to_first_token, None);
        assert_eq!(t.num_generated_tokens, 0);
        assert!(t.inter_token_latencies.is_empty());
        assert_eq!(t.e2e_latency, ms(3));
    }

    #[test]
    fn one_token_gives_a_first_token_time_and_no_interval() {
        let t0 = Instant::now();
        let mut clock = RequestClock::new(t0);
        clock.scheduled(t0);
        clock.token(t0 + ms(8));
        let t = clock.finish(SeqId(2), 1, RequestOutcome::Completed, t0 + ms(8));
        assert_eq!(t.num_generated_tokens, 1);
        assert_eq!(t.time_to_first_token, Some(ms(8)));
        assert!(t.inter_token_latencies.is_empty());
        assert_eq!(t.queue_time, Some(Duration::ZERO));
    }
}
