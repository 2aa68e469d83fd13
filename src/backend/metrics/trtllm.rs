//! The model's gauges in tensorrtllm_backend's families (`enable_trtllm_metrics`), so its
//! dashboards and Triton's ORCA load reporting (which reads `nv_trt_llm_kv_cache_block_metrics`
//! `used`, `max` and `tokens_per`) work unchanged:
//!
//! - `nv_trt_llm_kv_cache_block_metrics{model, version, kv_cache_block_type}`: `max` (blocks in
//!   the KV cache), `free`, `used`, `tokens_per` (tokens per block), `reused` (blocks taken from
//!   the prefix cache since load, `enable_kv_cache_reuse`), `fraction` (used / max: the KV
//!   utilization that load balancers such as the Gateway API inference extension read);
//! - `nv_trt_llm_request_metrics{model, version, request_type}`: `active` (requests in the
//!   engine), `max` (`max_num_seqs`), `scheduled` (running: in every step's batch), `waiting`.
//!
//! `TrtllmMetrics` only mirrors engine statistics (`super::ModelMetrics` owns it): it must never
//! hold engine state.

use triton_api::TritonError;
use triton_api::metrics::{Metric, MetricFamily};

use crate::engine::EngineStats;

/// The KV cache gauges' family, named as in tensorrtllm_backend (ORCA reads it); its categories
/// are the `kv_cache_block_type` label.
pub const KV_CACHE_FAMILY: &str = "nv_trt_llm_kv_cache_block_metrics";
/// The request gauges' family, named as in tensorrtllm_backend; its categories are the
/// `request_type` label.
pub const REQUEST_FAMILY: &str = "nv_trt_llm_request_metrics";
const KV_CACHE_HELP: &str = "KV cache block metrics (ferrum)";
const REQUEST_HELP: &str = "Request metrics (ferrum)";
const KV_CACHE_LABEL: &str = "kv_cache_block_type";
const REQUEST_LABEL: &str = "request_type";

/// The value of every exported gauge for `stats`: (family, category label value, value).
pub fn gauge_values(stats: &EngineStats) -> [(&'static str, &'static str, f64); 10] {
    let fraction = match stats.num_kv_blocks_total {
        0 => 0.0,
        total => stats.num_kv_blocks_used as f64 / total as f64,
    };
    [
        (KV_CACHE_FAMILY, "max", stats.num_kv_blocks_total as f64),
        (KV_CACHE_FAMILY, "free", stats.num_kv_blocks_free as f64),
        (KV_CACHE_FAMILY, "used", stats.num_kv_blocks_used as f64),
        (KV_CACHE_FAMILY, "tokens_per", stats.block_size as f64),
        (
            KV_CACHE_FAMILY,
            "reused",
            (stats.num_reused_prompt_tokens / stats.block_size.max(1) as u64) as f64,
        ),
        (KV_CACHE_FAMILY, "fraction", fraction),
        (
            REQUEST_FAMILY,
            "active",
            (stats.num_running + stats.num_waiting) as f64,
        ),
        (REQUEST_FAMILY, "max", stats.max_num_seqs as f64),
        (REQUEST_FAMILY, "scheduled", stats.num_running as f64),
        (REQUEST_FAMILY, "waiting", stats.num_waiting as f64),
    ]
}

/// The gauges of one model (labels `model`, `version` and the family's category label).
pub struct TrtllmMetrics {
    /// In `gauge_values` order. Declared before the families: dropped (deleted) first.
    gauges: Vec<Metric>,
    _families: [MetricFamily; 2],
}

impl TrtllmMetrics {
    /// Fails when the server has metrics disabled, or another backend registered a family of
    /// the same name differently; callers serve without metrics then.
    pub fn new(model: &str, version: u64) -> Result<Self, TritonError> {
        let kv = MetricFamily::gauge(KV_CACHE_FAMILY, KV_CACHE_HELP)?;
        let req = MetricFamily::gauge(REQUEST_FAMILY, REQUEST_HELP)?;
        let version = version.to_string();
        let mut gauges = Vec::new();
        for (family_name, category, _) in gauge_values(&EngineStats::default()) {
            let (family, label) = if family_name == KV_CACHE_FAMILY {
                (&kv, KV_CACHE_LABEL)
            } else {
                (&req, REQUEST_LABEL)
            };
            gauges.push(family.metric(&[
                ("model", model),
                ("version", &version),
                (label, category),
            ])?);
        }
        Ok(TrtllmMetrics {
            gauges,
            _families: [kv, req],
        })
    }

    /// Sets every gauge from `stats` (`gauge_values`). An error is Triton refusing a value.
    pub fn update(&self, stats: &EngineStats) -> Result<(), TritonError> {
        for (gauge, (_, _, value)) in self.gauges.iter().zip(gauge_values(stats)) {
            gauge.set(value)?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn value(stats: &EngineStats, family: &str, category: &str) -> f64 {
        gauge_values(stats)
            .into_iter()
            .find(|(f, c, _)| *f == family && *c == category)
            .unwrap()
            .2
    }

    #[test]
    fn gauges_mirror_engine_stats() {
        let stats = EngineStats {
            num_kv_blocks_total: 4096,
            num_kv_blocks_used: 7,
            num_kv_blocks_free: 4089,
            block_size: 16,
            num_running: 3,
            num_waiting: 2,
            max_num_seqs: 32,
            num_reused_prompt_tokens: 480,
            ..EngineStats::default()
        };
        assert_eq!(value(&stats, KV_CACHE_FAMILY, "max"), 4096.0);
        assert_eq!(value(&stats, KV_CACHE_FAMILY, "used"), 7.0);
        assert_eq!(value(&stats, KV_CACHE_FAMILY, "free"), 4089.0);
        assert_eq!(value(&stats, KV_CACHE_FAMILY, "tokens_per"), 16.0);
        assert_eq!(value(&stats, KV_CACHE_FAMILY, "reused"), 30.0);
        assert_eq!(value(&stats, KV_CACHE_FAMILY, "fraction"), 7.0 / 4096.0);
        assert_eq!(
            value(&EngineStats::default(), KV_CACHE_FAMILY, "fraction"),
            0.0,
            "no blocks: 0, not NaN"
        );
        assert_eq!(value(&stats, REQUEST_FAMILY, "active"), 5.0);
        assert_eq!(value(&stats, REQUEST_FAMILY, "scheduled"), 3.0);
        assert_eq!(value(&stats, REQUEST_FAMILY, "waiting"), 2.0);
        assert_eq!(value(&stats, REQUEST_FAMILY, "max"), 32.0);
    }

    #[test]
    fn exported_names_are_the_tensorrtllm_ones() {
        // ORCA load reporting and tensorrtllm dashboards match these exact strings.
        let labels: Vec<(&str, &str)> = gauge_values(&EngineStats::default())
            .iter()
            .map(|(f, c, _)| (*f, *c))
            .collect();
        assert_eq!(
            labels,
            [
                ("nv_trt_llm_kv_cache_block_metrics", "max"),
                ("nv_trt_llm_kv_cache_block_metrics", "free"),
                ("nv_trt_llm_kv_cache_block_metrics", "used"),
                ("nv_trt_llm_kv_cache_block_metrics", "tokens_per"),
                ("nv_trt_llm_kv_cache_block_metrics", "reused"),
                ("nv_trt_llm_kv_cache_block_metrics", "fraction"),
                ("nv_trt_llm_request_metrics", "active"),
                ("nv_trt_llm_request_metrics", "max"),
                ("nv_trt_llm_request_metrics", "scheduled"),
                ("nv_trt_llm_request_metrics", "waiting"),
            ]
        );
    }
}
