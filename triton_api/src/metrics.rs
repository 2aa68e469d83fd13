//! Custom Prometheus gauges, counters and histograms through Triton's metrics C API
//! (`TRITONSERVER_MetricFamily*`, `TRITONSERVER_Metric*`, and for histograms
//! `TRITONSERVER_MetricArgs*`, TRITONSERVER API 1.34+), served on Triton's metrics endpoint next
//! to its own metrics.
//!
//! Ownership: a `MetricFamily` is shared (`Arc`) by the family handle and every `Metric` made
//! from it, so the family is deleted only after its last metric (Triton refuses to delete a
//! family that still has metrics). Label parameters and histogram args live only for the call
//! that creates the metric (Triton copies them). Names, bucket boundaries and the operation's
//! kind (set a gauge, increment a counter, observe a histogram) are checked here before they
//! reach Triton, whose Prometheus library throws on invalid names. This module never decides
//! what to measure: that is the backend's.

use std::ffi::c_void;
use std::sync::Arc;

use crate::error::{c_string, check};
use crate::{ErrorCode, TritonError, api, sys};

/// True when `name` is a valid Prometheus metric name: `[a-zA-Z_:][a-zA-Z0-9_:]*`.
pub fn is_valid_metric_name(name: &str) -> bool {
    valid_identifier(name, true)
}

/// True when `name` is a valid, non-reserved Prometheus label name: `[a-zA-Z_][a-zA-Z0-9_]*`,
/// not starting with `__`.
pub fn is_valid_label_name(name: &str) -> bool {
    valid_identifier(name, false) && !name.starts_with("__")
}

fn valid_identifier(name: &str, allow_colon: bool) -> bool {
    let ok = |c: char, first: bool| {
        c.is_ascii_alphabetic()
            || c == '_'
            || (allow_colon && c == ':')
            || (!first && c.is_ascii_digit())
    };
    let mut chars = name.chars();
    match chars.next() {
        Some(c) if ok(c, true) => chars.all(|c| ok(c, false)),
        _ => false,
    }
}

/// Checks histogram bucket boundaries (the upper bounds, `le`, without `+Inf`, which Prometheus
/// adds): at least one, all finite, strictly increasing. The error names the offending value.
pub fn check_buckets(buckets: &[f64]) -> Result<(), String> {
    if buckets.is_empty() {
        return Err("no bucket boundaries: at least one is needed".into());
    }
    if let Some(b) = buckets.iter().find(|b| !b.is_finite()) {
        return Err(format!(
            "bucket boundary {b} must be finite (+Inf is always added)"
        ));
    }
    if let Some(w) = buckets.windows(2).find(|w| w[0] >= w[1]) {
        return Err(format!(
            "bucket boundaries must increase strictly: {} is followed by {}",
            w[0], w[1]
        ));
    }
    Ok(())
}

/// A family's Prometheus metric type (`TRITONSERVER_MetricKind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`increment` by a value >= 0).
    Counter,
    /// Goes up and down (`set`, `increment`).
    Gauge,
    /// Samples counted into buckets, with their sum and count (`observe`).
    Histogram,
}

impl MetricKind {
    fn to_raw(self) -> sys::TRITONSERVER_MetricKind {
        match self {
            MetricKind::Counter => sys::TRITONSERVER_METRIC_KIND_COUNTER,
            MetricKind::Gauge => sys::TRITONSERVER_METRIC_KIND_GAUGE,
            MetricKind::Histogram => sys::TRITONSERVER_METRIC_KIND_HISTOGRAM,
        }
    }

    fn name(self) -> &'static str {
        match self {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        }
    }
}

/// The Triton object behind a `MetricFamily`; deleted when the last `Arc` goes.
struct FamilyHandle {
    raw: *mut sys::TRITONSERVER_MetricFamily,
    name: String,
    kind: MetricKind,
}

// SAFETY: Triton's metric families are thread-safe (Prometheus registry objects guarded by
// Triton); the handle is only deleted once, in Drop, after every metric holding it is gone.
unsafe impl Send for FamilyHandle {}
// SAFETY: as above; `&FamilyHandle` is only used to pass the pointer to `MetricNew`.
unsafe impl Sync for FamilyHandle {}

impl Drop for FamilyHandle {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: the family is live, has no metrics left (each `Metric` holds an `Arc` to this
        // handle), and is deleted only here.
        if let Err(e) = unsafe { check(api, api.TRITONSERVER_MetricFamilyDelete(self.raw)) } {
            crate::log::error(&format!("cannot delete metric family '{}': {e}", self.name));
        }
    }
}

/// A metric family: one metric name and kind; its metrics differ by labels.
#[derive(Clone)]
pub struct MetricFamily {
    handle: Arc<FamilyHandle>,
}

impl MetricFamily {
    /// Creates (or joins, when another model already made it with the same description) the
    /// gauge family `name`. Fails when metrics are disabled in the server or the name is invalid.
    pub fn gauge(name: &str, description: &str) -> Result<Self, TritonError> {
        Self::new(MetricKind::Gauge, name, description)
    }

    /// Like `gauge`, for a counter family.
    pub fn counter(name: &str, description: &str) -> Result<Self, TritonError> {
        Self::new(MetricKind::Counter, name, description)
    }

    /// Like `gauge`, for a histogram family (its metrics are made by `histogram_metric`).
    pub fn histogram(name: &str, description: &str) -> Result<Self, TritonError> {
        Self::new(MetricKind::Histogram, name, description)
    }

    fn new(kind: MetricKind, name: &str, description: &str) -> Result<Self, TritonError> {
        if !is_valid_metric_name(name) {
            return Err(TritonError::invalid_arg(format!(
                "invalid metric name '{name}': must match [a-zA-Z_:][a-zA-Z0-9_:]*"
            )));
        }
        let api = api()?;
        let c_name = c_string(name);
        let c_desc = c_string(description);
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid out-pointer and NUL-terminated strings, which Triton copies.
        unsafe {
            check(
                api,
                api.TRITONSERVER_MetricFamilyNew(
                    &mut raw,
                    kind.to_raw(),
                    c_name.as_ptr(),
                    c_desc.as_ptr(),
                ),
            )
        }
        .map_err(|e| e.context(format!("creating metric family '{name}'")))?;
        if raw.is_null() {
            return Err(TritonError::internal(format!(
                "creating metric family '{name}': Triton returned no family"
            )));
        }
        Ok(MetricFamily {
            handle: Arc::new(FamilyHandle {
                raw,
                name: name.to_string(),
                kind,
            }),
        })
    }

    /// The family's metric name, as Prometheus shows it.
    pub fn name(&self) -> &str {
        &self.handle.name
    }

    /// The family's kind.
    pub fn kind(&self) -> MetricKind {
        self.handle.kind
    }

    /// A gauge or counter of this family with the given `(label name, label value)` pairs.
    pub fn metric(&self, labels: &[(&str, &str)]) -> Result<Metric, TritonError> {
        if self.kind() == MetricKind::Histogram {
            return Err(TritonError::invalid_arg(format!(
                "metric '{}' is a histogram: create its metrics with bucket boundaries \
                 (histogram_metric)",
                self.name()
            )));
        }
        self.new_metric(labels, None)
    }

    /// A histogram of this family with the given labels and bucket boundaries (upper bounds in
    /// increasing order, without `+Inf`; see `check_buckets`).
    pub fn histogram_metric(
        &self,
        labels: &[(&str, &str)],
        buckets: &[f64],
    ) -> Result<Metric, TritonError> {
        let family = self.name();
        if self.kind() != MetricKind::Histogram {
            return Err(TritonError::invalid_arg(format!(
                "metric '{family}' is a {}, not a histogram: it takes no bucket boundaries",
                self.kind().name()
            )));
        }
        check_buckets(buckets)
            .map_err(|e| TritonError::invalid_arg(format!("histogram '{family}': {e}")))?;
        let args = HistogramArgs::new(api()?, buckets)
            .map_err(|e| e.context(format!("histogram '{family}': setting its buckets")))?;
        self.new_metric(labels, Some(&args))
    }

    fn new_metric(
        &self,
        labels: &[(&str, &str)],
        args: Option<&HistogramArgs>,
    ) -> Result<Metric, TritonError> {
        let family = self.name();
        if let Some((bad, _)) = labels.iter().find(|(k, _)| !is_valid_label_name(k)) {
            return Err(TritonError::invalid_arg(format!(
                "metric '{family}': invalid label name '{bad}': must match [a-zA-Z_][a-zA-Z0-9_]* and not start with __"
            )));
        }
        let api = api()?;
        let mut params = Vec::with_capacity(labels.len());
        for (key, value) in labels {
            params.push(LabelParam::new(api, key, value).ok_or_else(|| {
                TritonError::internal(format!(
                    "metric '{family}': cannot create label {key}=\"{value}\""
                ))
            })?);
        }
        let ptrs: Vec<*const sys::TRITONSERVER_Parameter> =
            params.iter().map(|p| p.raw.cast_const()).collect();
        let mut raw = std::ptr::null_mut();
        let status = match args {
            // SAFETY: the family is live (we hold its Arc), `ptrs` holds `ptrs.len()` live
            // parameters that outlive the call (`params` is dropped after it); valid out-pointer.
            None => unsafe {
                check(
                    api,
                    api.TRITONSERVER_MetricNew(
                        &mut raw,
                        self.handle.raw,
                        ptrs.as_ptr().cast_mut(),
                        ptrs.len() as u64,
                    ),
                )
            },
            // SAFETY: as above; `args` is a live histogram args object (Triton copies its
            // buckets), deleted after the call.
            Some(args) => unsafe {
                check(
                    api,
                    api.TRITONSERVER_MetricNewWithArgs(
                        &mut raw,
                        self.handle.raw,
                        ptrs.as_ptr().cast_mut(),
                        ptrs.len() as u64,
                        args.raw.cast_const(),
                    ),
                )
            },
        };
        status.map_err(|e| e.context(format!("creating a metric of '{family}'")))?;
        drop(params);
        if raw.is_null() {
            return Err(TritonError::new(
                ErrorCode::Internal,
                format!("creating a metric of '{family}': Triton returned no metric"),
            ));
        }
        Ok(Metric {
            raw,
            family: self.handle.clone(),
        })
    }
}

/// `TRITONSERVER_MetricArgs` holding histogram buckets; deleted on drop.
struct HistogramArgs {
    raw: *mut sys::TRITONSERVER_MetricArgs,
    api: &'static sys::TritonApi,
}

impl HistogramArgs {
    fn new(api: &'static sys::TritonApi, buckets: &[f64]) -> Result<Self, TritonError> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: valid out-pointer.
        unsafe { check(api, api.TRITONSERVER_MetricArgsNew(&mut raw)) }?;
        if raw.is_null() {
            return Err(TritonError::internal("Triton returned no metric args"));
        }
        let args = HistogramArgs { raw, api };
        // SAFETY: `args.raw` is live; `buckets` holds `buckets.len()` values, which Triton copies.
        unsafe {
            check(
                api,
                api.TRITONSERVER_MetricArgsSetHistogram(
                    args.raw,
                    buckets.as_ptr(),
                    buckets.len() as u64,
                ),
            )
        }?;
        Ok(args)
    }
}

impl Drop for HistogramArgs {
    fn drop(&mut self) {
        // SAFETY: the args are live and deleted only here.
        if let Err(e) = unsafe { check(self.api, self.api.TRITONSERVER_MetricArgsDelete(self.raw)) }
        {
            crate::log::error(&format!("cannot delete metric args: {e}"));
        }
    }
}

/// One labelled gauge, counter or histogram; deleted on drop (before its family, which it keeps
/// alive).
pub struct Metric {
    raw: *mut sys::TRITONSERVER_Metric,
    family: Arc<FamilyHandle>,
}

// SAFETY: Triton's metrics are Prometheus gauges, counters and histograms (atomic values or
// internally locked), safe to update from any thread; this handle is owned and deleted once, in
// Drop.
unsafe impl Send for Metric {}

impl Metric {
    /// Sets the gauge to `value`.
    pub fn set(&self, value: f64) -> Result<(), TritonError> {
        self.expect_kind("set", &[MetricKind::Gauge])?;
        let api = api()?;
        // SAFETY: the metric is live (deleted only in Drop) and a gauge.
        unsafe { check(api, api.TRITONSERVER_MetricSet(self.raw, value)) }
            .map_err(|e| e.context(format!("setting a metric of '{}'", self.family.name)))
    }

    /// Adds `value` to a counter (`value` must be >= 0) or a gauge.
    pub fn increment(&self, value: f64) -> Result<(), TritonError> {
        self.expect_kind("increment", &[MetricKind::Counter, MetricKind::Gauge])?;
        if self.family.kind == MetricKind::Counter && (value.is_nan() || value < 0.0) {
            return Err(TritonError::invalid_arg(format!(
                "counter '{}' only goes up: cannot add {value}",
                self.family.name
            )));
        }
        let api = api()?;
        // SAFETY: the metric is live and a counter or gauge.
        unsafe { check(api, api.TRITONSERVER_MetricIncrement(self.raw, value)) }
            .map_err(|e| e.context(format!("incrementing a metric of '{}'", self.family.name)))
    }

    /// Samples `value` into a histogram.
    pub fn observe(&self, value: f64) -> Result<(), TritonError> {
        self.expect_kind("observe", &[MetricKind::Histogram])?;
        let api = api()?;
        // SAFETY: the metric is live and a histogram.
        unsafe { check(api, api.TRITONSERVER_MetricObserve(self.raw, value)) }
            .map_err(|e| e.context(format!("observing a metric of '{}'", self.family.name)))
    }

    fn expect_kind(&self, op: &str, kinds: &[MetricKind]) -> Result<(), TritonError> {
        match kinds.contains(&self.family.kind) {
            true => Ok(()),
            false => Err(TritonError::invalid_arg(format!(
                "metric '{}' is a {}: it does not support {op}",
                self.family.name,
                self.family.kind.name()
            ))),
        }
    }
}

impl Drop for Metric {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: the metric is live and deleted only here; its family is still alive (we hold
        // an Arc to it, released after this body runs).
        if let Err(e) = unsafe { check(api, api.TRITONSERVER_MetricDelete(self.raw)) } {
            crate::log::error(&format!(
                "cannot delete a metric of '{}': {e}",
                self.family.name
            ));
        }
    }
}

/// A `TRITONSERVER_Parameter` of type STRING used as a metric label; deleted on drop.
struct LabelParam {
    raw: *mut sys::TRITONSERVER_Parameter,
}

impl LabelParam {
    /// None when Triton could not create the parameter.
    fn new(api: &sys::TritonApi, key: &str, value: &str) -> Option<Self> {
        let c_key = c_string(key);
        let c_value = c_string(value);
        // SAFETY: for STRING parameters `value` is the C string itself; Triton copies both
        // strings, which are valid for the call.
        let raw = unsafe {
            api.TRITONSERVER_ParameterNew(
                c_key.as_ptr(),
                sys::TRITONSERVER_PARAMETER_STRING,
                c_value.as_ptr().cast::<c_void>(),
            )
        };
        (!raw.is_null()).then_some(LabelParam { raw })
    }
}

impl Drop for LabelParam {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: the parameter is live and deleted only here.
        unsafe { api.TRITONSERVER_ParameterDelete(self.raw) };
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_name_rules() {
        assert!(is_valid_metric_name("nv_trt_llm_kv_cache_block_metrics"));
        assert!(is_valid_metric_name("ns:sub_total2"));
        assert!(!is_valid_metric_name(""));
        assert!(!is_valid_metric_name("2abc"));
        assert!(!is_valid_metric_name("kv-cache"));
        assert!(!is_valid_metric_name("kv cache"));
        assert!(is_valid_label_name("kv_cache_block_type"));
        assert!(is_valid_label_name("_x1"));
        assert!(!is_valid_label_name("a:b"));
        assert!(!is_valid_label_name("__name__"));
        assert!(!is_valid_label_name("9"));
    }

    #[test]
    fn invalid_names_are_rejected_before_reaching_triton() {
        // The name check runs first, so the message names the metric even outside tritonserver.
        let Err(e) = MetricFamily::gauge("bad-name", "x") else {
            panic!("accepted an invalid metric name")
        };
        assert_eq!(e.code(), ErrorCode::InvalidArg);
        assert!(e.message().contains("bad-name"), "{}", e.message());
    }

    #[test]
    fn bucket_boundaries_must_be_finite_and_increase_strictly() {
        assert!(check_buckets(&[0.001, 0.5, 1.0, 2560.0]).is_ok());
        assert!(check_buckets(&[1.0]).is_ok());
        assert!(check_buckets(&[]).unwrap_err().contains("at least one"));
        let e = check_buckets(&[1.0, 2.0, 2.0]).unwrap_err();
        assert!(e.contains("2 is followed by 2"), "{e}");
        let e = check_buckets(&[5.0, 1.0]).unwrap_err();
        assert!(e.contains("5 is followed by 1"), "{e}");
        let e = check_buckets(&[1.0, f64::INFINITY]).unwrap_err();
        assert!(e.contains("inf") && e.contains("finite"), "{e}");
        assert!(check_buckets(&[f64::NAN]).unwrap_err().contains("NaN"));
    }

    #[test]
    fn outside_tritonserver_families_fail_without_panicking() {
        for family in [
            MetricFamily::counter("ferrum_test_counter", "x"),
            MetricFamily::histogram("ferrum_test_histogram", "x"),
        ] {
            let Err(e) = family else {
                panic!("created a metric family outside tritonserver")
            };
            assert_eq!(e.code(), ErrorCode::Unavailable);
        }
        let Err(e) = MetricFamily::gauge("ferrum_test_gauge", "x") else {
            panic!("created a metric family outside tritonserver")
        };
        assert_eq!(e.code(), ErrorCode::Unavailable);
    }
}
