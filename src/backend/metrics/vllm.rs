//! The model's LLM serving metrics under vLLM's names (`enable_vllm_metrics`), so dashboards,
//! autoscalers and routers written for vLLM (and for Triton's vllm_backend) read a ferrum model
//! unchanged. Labels are vllm_backend's: `model` (the Triton model name) and `version`.
//!
//! - histograms, observed from the engine's `RequestTimings`:
//!   `vllm:time_to_first_token_seconds`, `vllm:time_per_output_token_seconds` (each interval
//!   between two tokens of a request), `vllm:e2e_request_latency_seconds`,
//!   `vllm:request_queue_time_seconds` (arrival to first scheduled), `vllm:request_prompt_tokens`,
//!   `vllm:request_generation_tokens`; the first two for every request that produced tokens
//!   (aborted ones too, as vLLM observes them per token), the others for completed requests only;
//! - counters, advanced from the engine's statistics: `vllm:prompt_tokens_total`,
//!   `vllm:generation_tokens_total`;
//! - gauges, set from the engine's statistics: `vllm:num_requests_running`,
//!   `vllm:num_requests_waiting`, `vllm:gpu_cache_usage_perc` and its newer name
//!   `vllm:kv_cache_usage_perc` (used KV blocks / all, 0 to 1, on the CPU engine too).
//!
//! Bucket boundaries are vLLM's own (v1 `PrometheusStatLogger`), each list a superset of
//! vllm_backend's shorter one, so a query on either's `le` values works; token counts use vLLM's
//! 1-2-5 series up to `max_model_len`. Everything here is pure but `VllmMetrics`, which only
//! forwards values to Triton.

use triton_api::TritonError;
use triton_api::metrics::{Metric, MetricFamily};

use crate::engine::{EngineStats, RequestOutcome, RequestTimings};

/// vLLM's time-to-first-token buckets (seconds).
pub const TTFT_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
/// vLLM's time-per-output-token buckets (seconds).
pub const TPOT_BUCKETS: &[f64] = &[
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
/// vLLM's request latency buckets (seconds): end-to-end and queue time.
pub const REQUEST_LATENCY_BUCKETS: &[f64] = &[
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... while not above `max` (at least `[1]`).
pub fn token_count_buckets(max: usize) -> Vec<f64> {
    let mut buckets = vec![];
    let mut scale = 1usize;
    'outer: loop {
        for m in [1, 2, 5] {
            match scale.checked_mul(m) {
                Some(b) if b <= max => buckets.push(b as f64),
                _ => break 'outer,
            }
        }
        match scale.checked_mul(10) {
            Some(s) => scale = s,
            None => break,
        }
    }
    if buckets.is_empty() {
        buckets.push(1.0);
    }
    buckets
}

/// The histograms, in `VllmMetrics`'s order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Histogram {
    /// `vllm:time_to_first_token_seconds`.
    TimeToFirstToken,
    /// `vllm:time_per_output_token_seconds`.
    TimePerOutputToken,
    /// `vllm:e2e_request_latency_seconds`.
    E2eLatency,
    /// `vllm:request_queue_time_seconds`.
    QueueTime,
    /// `vllm:request_prompt_tokens`.
    PromptTokens,
    /// `vllm:request_generation_tokens`.
    GenerationTokens,
}

impl Histogram {
    /// Every histogram, in `VllmMetrics`'s order.
    pub const ALL: [Histogram; 6] = [
        Histogram::TimeToFirstToken,
        Histogram::TimePerOutputToken,
        Histogram::E2eLatency,
        Histogram::QueueTime,
        Histogram::PromptTokens,
        Histogram::GenerationTokens,
    ];

    /// The family name, as vLLM exports it.
    pub fn name(self) -> &'static str {
        match self {
            Histogram::TimeToFirstToken => "vllm:time_to_first_token_seconds",
            Histogram::TimePerOutputToken => "vllm:time_per_output_token_seconds",
            Histogram::E2eLatency => "vllm:e2e_request_latency_seconds",
            Histogram::QueueTime => "vllm:request_queue_time_seconds",
            Histogram::PromptTokens => "vllm:request_prompt_tokens",
            Histogram::GenerationTokens => "vllm:request_generation_tokens",
        }
    }

    fn help(self) -> &'static str {
        match self {
            Histogram::TimeToFirstToken => "Histogram of time to first token in seconds.",
            Histogram::TimePerOutputToken => "Histogram of time per output token in seconds.",
            Histogram::E2eLatency => "Histogram of end to end request latency in seconds.",
            Histogram::QueueTime => "Histogram of time spent in WAITING phase for request.",
            Histogram::PromptTokens => "Number of prefill tokens processed.",
            Histogram::GenerationTokens => "Number of generation tokens processed.",
        }
    }

    /// The bucket boundaries for a model of context `max_model_len`.
    pub fn buckets(self, max_model_len: usize) -> Vec<f64> {
        match self {
            Histogram::TimeToFirstToken => TTFT_BUCKETS.to_vec(),
            Histogram::TimePerOutputToken => TPOT_BUCKETS.to_vec(),
            Histogram::E2eLatency | Histogram::QueueTime => REQUEST_LATENCY_BUCKETS.to_vec(),
            Histogram::PromptTokens | Histogram::GenerationTokens => {
                token_count_buckets(max_model_len)
            }
        }
    }
}

/// The observations one finished request makes: its first token and every interval between
/// tokens whatever its outcome; latency, queue time and token counts only when it completed.
pub fn observations(t: &RequestTimings) -> Vec<(Histogram, f64)> {
    let mut out = Vec::with_capacity(t.inter_token_latencies.len() + 5);
    if let Some(ttft) = t.time_to_first_token {
        out.push((Histogram::TimeToFirstToken, ttft.as_secs_f64()));
    }
    out.extend(
        t.inter_token_latencies
            .iter()
            .map(|&s| (Histogram::TimePerOutputToken, f64::from(s))),
    );
    if t.outcome == RequestOutcome::Completed {
        out.push((Histogram::E2eLatency, t.e2e_latency.as_secs_f64()));
        if let Some(q) = t.queue_time {
            out.push((Histogram::QueueTime, q.as_secs_f64()));
        }
        out.push((Histogram::PromptTokens, t.num_prompt_tokens as f64));
        out.push((Histogram::GenerationTokens, t.num_generated_tokens as f64));
    }
    out
}

/// `vllm:prompt_tokens_total` and `vllm:generation_tokens_total`.
pub const COUNTERS: [(&str, &str); 2] = [
    (
        "vllm:prompt_tokens_total",
        "Number of prefill tokens processed.",
    ),
    (
        "vllm:generation_tokens_total",
        "Number of generation tokens processed.",
    ),
];

/// The engine's token counters as last exported, to advance the Prometheus counters by what
/// was added since.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenTotals {
    prompt: u64,
    generation: u64,
}

impl TokenTotals {
    /// What `stats` adds to the exported totals, in `COUNTERS` order, and remembers it. A total
    /// below the last one (never expected: the engine's counters survive rebuilds) adds nothing
    /// and counts on from there.
    pub fn advance(&mut self, stats: &EngineStats) -> [f64; 2] {
        let delta = |now: u64, last: &mut u64| {
            let d = now.saturating_sub(*last);
            *last = now;
            d as f64
        };
        [
            delta(stats.num_prompt_tokens, &mut self.prompt),
            delta(stats.num_generated_tokens, &mut self.generation),
        ]
    }
}

/// The gauges: (family, help, value for `stats`).
pub fn gauge_values(stats: &EngineStats) -> [(&'static str, &'static str, f64); 4] {
    let usage = match stats.num_kv_blocks_total {
        0 => 0.0,
        total => stats.num_kv_blocks_used as f64 / total as f64,
    };
    [
        (
            "vllm:num_requests_running",
            "Number of requests in model execution batches.",
            stats.num_running as f64,
        ),
        (
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed.",
            stats.num_waiting as f64,
        ),
        (
            "vllm:gpu_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            usage,
        ),
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            usage,
        ),
    ]
}

/// The vLLM-named metrics of one model.
pub struct VllmMetrics {
    /// In `Histogram::ALL` order.
    histograms: Vec<Metric>,
    /// In `COUNTERS` order.
    counters: Vec<Metric>,
    /// In `gauge_values` order.
    gauges: Vec<Metric>,
    totals: TokenTotals,
}

impl VllmMetrics {
    /// Creates every family and the model's metric in each. Fails when the server has metrics
    /// disabled or another backend registered one of the names differently.
    pub fn new(model: &str, version: u64, max_model_len: usize) -> Result<Self, TritonError> {
        let version = version.to_string();
        let labels = [("model", model), ("version", version.as_str())];
        let mut histograms = Vec::new();
        for h in Histogram::ALL {
            let family = MetricFamily::histogram(h.name(), h.help())?;
            histograms.push(family.histogram_metric(&labels, &h.buckets(max_model_len))?);
        }
        let mut counters = Vec::new();
        for (name, help) in COUNTERS {
            counters.push(MetricFamily::counter(name, help)?.metric(&labels)?);
        }
        let mut gauges = Vec::new();
        for (name, help, _) in gauge_values(&EngineStats::default()) {
            gauges.push(MetricFamily::gauge(name, help)?.metric(&labels)?);
        }
        Ok(VllmMetrics {
            histograms,
            counters,
            gauges,
            totals: TokenTotals::default(),
        })
    }

    /// Sets the gauges and advances the counters from `stats`.
    pub fn update(&mut self, stats: &EngineStats) -> Result<(), TritonError> {
        for (gauge, (_, _, value)) in self.gauges.iter().zip(gauge_values(stats)) {
            gauge.set(value)?;
        }
        for (counter, delta) in self.counters.iter().zip(self.totals.advance(stats)) {
            if delta > 0.0 {
                counter.increment(delta)?;
            }
        }
        Ok(())
    }

    /// Observes one finished request (`observations`).
    pub fn observe(&self, timings: &RequestTimings) -> Result<(), TritonError> {
        for (h, value) in observations(timings) {
            self.histograms[h as usize].observe(value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::request::SeqId;

    fn timings(outcome: RequestOutcome, itl: &[f32]) -> RequestTimings {
        RequestTimings {
            seq_id: SeqId(1),
            outcome,
            num_prompt_tokens: 9,
            num_generated_tokens: itl.len() + 1,
            queue_time: Some(Duration::from_millis(3)),
            time_to_first_token: Some(Duration::from_millis(40)),
            inter_token_latencies: itl.to_vec(),
            e2e_latency: Duration::from_millis(70),
        }
    }

    #[test]
    fn token_buckets_follow_vllms_1_2_5_series_up_to_the_context() {
        assert_eq!(
            token_count_buckets(100),
            [1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0]
        );
        assert_eq!(
            token_count_buckets(8192),
            [
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0
            ]
        );
        assert_eq!(token_count_buckets(1), [1.0]);
        assert_eq!(token_count_buckets(0), [1.0], "never empty");
        let huge = token_count_buckets(usize::MAX);
        assert!(huge.windows(2).all(|w| w[0] < w[1]) && huge.len() > 50);
    }

    #[test]
    fn every_histogram_has_valid_buckets_and_a_vllm_name() {
        for h in Histogram::ALL {
            assert_eq!(Histogram::ALL[h as usize], h, "ALL is in declaration order");
            assert!(h.name().starts_with("vllm:"));
            triton_api::metrics::check_buckets(&h.buckets(4096)).unwrap();
        }
        // vllm_backend's shorter lists are subsets, so its dashboards' `le` values exist here.
        for (ours, theirs) in [
            (TTFT_BUCKETS, &[0.001, 0.02, 0.1, 0.75, 2.5, 7.5, 10.0][..]),
            (TPOT_BUCKETS, &[0.01, 0.025, 0.15, 0.4, 1.0, 2.5][..]),
            (
                REQUEST_LATENCY_BUCKETS,
                &[1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0][..],
            ),
        ] {
            assert!(theirs.iter().all(|b| ours.contains(b)), "{theirs:?}");
        }
    }

    #[test]
    fn a_completed_request_observes_every_histogram() {
        let obs = observations(&timings(RequestOutcome::Completed, &[0.01, 0.02]));
        assert_eq!(
            obs,
            [
                (Histogram::TimeToFirstToken, 0.04),
                (Histogram::TimePerOutputToken, f64::from(0.01f32)),
                (Histogram::TimePerOutputToken, f64::from(0.02f32)),
                (Histogram::E2eLatency, 0.07),
                (Histogram::QueueTime, 0.003),
                (Histogram::PromptTokens, 9.0),
                (Histogram::GenerationTokens, 3.0),
            ]
        );
    }

    #[test]
    fn aborted_and_failed_requests_observe_only_their_tokens() {
        for outcome in [RequestOutcome::Aborted, RequestOutcome::Failed] {
            let obs = observations(&timings(outcome, &[0.5]));
            assert_eq!(
                obs,
                [
                    (Histogram::TimeToFirstToken, 0.04),
                    (Histogram::TimePerOutputToken, 0.5),
                ]
            );
        }
        let mut none = timings(RequestOutcome::Aborted, &[]);
        none.time_to_first_token = None;
        assert!(observations(&none).is_empty());
    }

    #[test]
    fn counters_advance_by_what_the_engine_added() {
        let mut totals = TokenTotals::default();
        let stats = |prompt, generated| EngineStats {
            num_prompt_tokens: prompt,
            num_generated_tokens: generated,
            ..EngineStats::default()
        };
        assert_eq!(totals.advance(&stats(10, 4)), [10.0, 4.0]);
        assert_eq!(totals.advance(&stats(10, 4)), [0.0, 0.0]);
        assert_eq!(totals.advance(&stats(25, 9)), [15.0, 5.0]);
        // A total that went back adds nothing and is the new base.
        assert_eq!(totals.advance(&stats(5, 9)), [0.0, 0.0]);
        assert_eq!(totals.advance(&stats(7, 10)), [2.0, 1.0]);
    }

    #[test]
    fn gauges_mirror_running_waiting_and_kv_usage() {
        let stats = EngineStats {
            num_running: 3,
            num_waiting: 5,
            num_kv_blocks_total: 200,
            num_kv_blocks_used: 50,
            ..EngineStats::default()
        };
        let values: Vec<(&str, f64)> = gauge_values(&stats)
            .iter()
            .map(|(n, _, v)| (*n, *v))
            .collect();
        assert_eq!(
            values,
            [
                ("vllm:num_requests_running", 3.0),
                ("vllm:num_requests_waiting", 5.0),
                ("vllm:gpu_cache_usage_perc", 0.25),
                ("vllm:kv_cache_usage_perc", 0.25),
            ]
        );
        assert_eq!(gauge_values(&EngineStats::default())[2].2, 0.0, "not NaN");
    }
}
