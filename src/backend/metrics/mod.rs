//! The model's custom Triton metrics, in two family sets, each switched by one model key:
//! tensorrtllm_backend's `nv_trt_llm_*` gauges (`trtllm`, `enable_trtllm_metrics`) and vLLM's
//! `vllm:*` histograms, counters and gauges (`vllm`, `enable_vllm_metrics`).
//!
//! `ModelMetrics` is created in ModelInitialize and owned by the model's response thread, which
//! refreshes it from `EngineHandle::stats` every `METRICS_INTERVAL` and observes each
//! `RequestTimings` the engine reports; it is dropped with the model (metrics first, then their
//! families), so nothing outlives an unload. It only mirrors what the engine reports: it must
//! never hold engine state or block on anything but `stats`. A set Triton refuses (metrics
//! disabled in the server, a name registered differently by another backend) is left out with a
//! warning and the model serves without it.

pub mod trtllm;
pub mod vllm;

use std::time::Duration;

use crate::config::MetricSets;
use crate::engine::{EngineStats, RequestTimings};
use trtllm::TrtllmMetrics;
use vllm::VllmMetrics;

/// How often the response thread refreshes the metrics.
pub const METRICS_INTERVAL: Duration = Duration::from_millis(100);

/// The metric sets a model exports.
pub struct ModelMetrics {
    model: String,
    trtllm: Option<TrtllmMetrics>,
    vllm: Option<VllmMetrics>,
}

impl ModelMetrics {
    /// Creates the sets `sets` switches on for `model`; a set that cannot be created is logged
    /// and left out. `max_model_len` sizes the token-count buckets.
    pub fn new(model: &str, version: u64, sets: MetricSets, max_model_len: usize) -> Self {
        let warn = |set: &str, e: &dyn std::fmt::Display| {
            triton_api::triton_log!(
                triton_api::log::Level::Warn,
                "ferrum: model '{model}' serves without its {set} metrics: {e}"
            );
        };
        let trtllm = match sets.trtllm.then(|| TrtllmMetrics::new(model, version)) {
            Some(Err(e)) => {
                warn("nv_trt_llm_*", &e);
                None
            }
            other => other.and_then(Result::ok),
        };
        let vllm = match sets
            .vllm
            .then(|| VllmMetrics::new(model, version, max_model_len))
        {
            Some(Err(e)) => {
                warn("vllm:*", &e);
                None
            }
            other => other.and_then(Result::ok),
        };
        ModelMetrics {
            model: model.to_string(),
            trtllm,
            vllm,
        }
    }

    /// True when no set is exported (nothing to refresh or observe).
    pub fn is_empty(&self) -> bool {
        self.trtllm.is_none() && self.vllm.is_none()
    }

    /// Whether the vLLM set is exported (so request timings are observed).
    pub fn has_vllm(&self) -> bool {
        self.vllm.is_some()
    }

    /// Refreshes every set from `stats`. A set Triton refuses a value for is logged once and
    /// dropped (deleted) rather than retried every interval.
    pub fn update(&mut self, stats: &EngineStats) {
        if let Some(Err(e)) = self.trtllm.as_ref().map(|m| m.update(stats)) {
            self.give_up("nv_trt_llm_*", &e);
            self.trtllm = None;
        }
        if let Some(Err(e)) = self.vllm.as_mut().map(|m| m.update(stats)) {
            self.give_up("vllm:*", &e);
            self.vllm = None;
        }
    }

    /// Observes a finished request's timings (vLLM set); a refusal drops that set, as `update`.
    pub fn observe(&mut self, timings: &RequestTimings) {
        if let Some(Err(e)) = self.vllm.as_ref().map(|m| m.observe(timings)) {
            self.give_up("vllm:*", &e);
            self.vllm = None;
        }
    }

    fn give_up(&self, set: &str, e: &dyn std::fmt::Display) {
        triton_api::log::warn(&format!(
            "ferrum: model '{}': {set} metrics disabled: {e}",
            self.model
        ));
    }
}
