//! Custom Prometheus gauges through Triton's metrics C API (`TRITONSERVER_MetricFamily*`,
//! `TRITONSERVER_Metric*`), served on Triton's metrics endpoint next to its own metrics.
//!
//! Ownership: a `MetricFamily` is shared (`Arc`) by the family handle and every `Metric` made
//! from it, so the family is deleted only after its last metric (Triton refuses to delete a
//! family that still has metrics). Label parameters live only for the `MetricNew` call. Names
//! are checked against Prometheus' rules before they reach Triton (its Prometheus library
//! throws on invalid names). This module never decides what to measure: that is the backend's.

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

/// The Triton object behind a `MetricFamily`; deleted when the last `Arc` goes.
struct FamilyHandle {
    raw: *mut sys::TRITONSERVER_MetricFamily,
    name: String,
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

/// A gauge family (one metric name; its metrics differ by labels).
#[derive(Clone)]
pub struct MetricFamily {
    handle: Arc<FamilyHandle>,
}

impl MetricFamily {
    /// Creates (or joins, when another model already made it with the same description) the
    /// gauge family `name`. Fails when metrics are disabled in the server or the name is invalid.
    pub fn gauge(name: &str, description: &str) -> Result<Self, TritonError> {
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
                    sys::TRITONSERVER_METRIC_KIND_GAUGE,
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
            }),
        })
    }

    /// The family's metric name, as Prometheus shows it.
    pub fn name(&self) -> &str {
        &self.handle.name
    }

    /// A metric of this family with the given `(label name, label value)` pairs.
    pub fn metric(&self, labels: &[(&str, &str)]) -> Result<Metric, TritonError> {
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
        // SAFETY: the family is live (we hold its Arc), `ptrs` holds `ptrs.len()` live
        // parameters that outlive the call (`params` is dropped after it); valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONSERVER_MetricNew(
                    &mut raw,
                    self.handle.raw,
                    ptrs.as_ptr().cast_mut(),
                    ptrs.len() as u64,
                ),
            )
        }
        .map_err(|e| e.context(format!("creating a metric of '{family}'")))?;
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

/// One labelled gauge; deleted on drop (before its family, which it keeps alive).
pub struct Metric {
    raw: *mut sys::TRITONSERVER_Metric,
    family: Arc<FamilyHandle>,
}

// SAFETY: Triton's metrics are Prometheus gauges (atomic values), safe to set from any thread;
// this handle is owned and deleted once, in Drop.
unsafe impl Send for Metric {}

impl Metric {
    /// Sets the gauge to `value`.
    pub fn set(&self, value: f64) -> Result<(), TritonError> {
        let api = api()?;
        // SAFETY: the metric is live (deleted only in Drop) and a gauge.
        unsafe { check(api, api.TRITONSERVER_MetricSet(self.raw, value)) }
            .map_err(|e| e.context(format!("setting a metric of '{}'", self.family.name)))
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
    fn outside_tritonserver_families_fail_without_panicking() {
        let Err(e) = MetricFamily::gauge("ferrum_test_gauge", "x") else {
            panic!("created a metric family outside tritonserver")
        };
        assert_eq!(e.code(), ErrorCode::Unavailable);
    }
}
