//! `BackendConfig`: every ferrum setting of a Triton model, parsed once from the `parameters`
//! of its config.pbtxt (all values are strings there) into validated types. An unknown key or a
//! bad value fails the model load with a message naming the key, the value and what is allowed;
//! nothing downstream re-checks. This module never touches Triton or device code: it maps JSON
//! straight to `BackendConfig`, whose `engine` is the `EngineOptions` the engine starts with
//! (no second copy of any setting). Every key is documented in
//! docs/configuration.md (a test checks that the two agree).

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::dtype::DType;
use crate::engine::{Device, EngineOptions};
use crate::executor::{CudaExecOptions, ParallelOptions};
use crate::kv_cache::{KvCacheDtype, KvCacheOptions};
use crate::model::quant::QuantizationOption;
use crate::ops::linear::WeightFormat;
use crate::request::SamplingParams;
use crate::scheduler::{BatchingOptions, SchedulerPolicy};

/// Why a model's `parameters` were rejected at load; each variant names the key and, where there
/// is one, the offending value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// The `parameters` map failed to deserialize (an unknown key, which serde names together with
    /// the list of known keys); holds serde's message.
    #[error("invalid model configuration parameters: {0}")]
    Parameters(String),
    /// A parameter was given without a `string_value` (e.g. as `int_value`).
    #[error("parameter '{key}' must have a string_value in config.pbtxt")]
    NotAString {
        /// The parameter's key as written in config.pbtxt.
        key: String,
    },
    /// A key's value does not parse or is out of range.
    #[error("invalid value for parameter '{key}': '{value}' ({expected})")]
    InvalidValue {
        /// The parameter key (for the `default_*` sampling keys, the config key, not the request
        /// field).
        key: &'static str,
        /// The value as written.
        value: String,
        /// What is allowed, e.g. "must be an integer in [1, 4096]".
        expected: String,
    },
    /// A `model_path`/`tokenizer_path` resolved to no existing file or folder.
    #[error("parameter '{key}' = '{value}': no such file or folder (looked at {tried})")]
    PathNotFound {
        /// `model_path` or `tokenizer_path`.
        key: &'static str,
        /// The path as written.
        value: String,
        /// The candidate paths that were checked, comma-separated (version folder first, then model
        /// folder).
        tried: String,
    },
    /// The model configuration Triton passed is not valid JSON; holds serde_json's message.
    #[error("the model configuration is not valid JSON: {0}")]
    Json(String),
}

impl ConfigError {
    fn invalid(key: &'static str, value: &str, expected: impl Into<String>) -> Self {
        ConfigError::InvalidValue {
            key,
            value: value.to_string(),
            expected: expected.into(),
        }
    }
}

/// The raw `parameters` map: every key ferrum knows, as strings. `deny_unknown_fields` turns a
/// typo into a load error naming the key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawParameters {
    model_path: Option<String>,
    tokenizer_path: Option<String>,
    device: Option<String>,
    gpu_device_ids: Option<String>,
    tensor_parallel_size: Option<String>,
    weight_format: Option<String>,
    dtype: Option<String>,
    quantization: Option<String>,
    max_num_seqs: Option<String>,
    max_queue_size: Option<String>,
    queue_timeout_microseconds: Option<String>,
    max_num_batched_tokens: Option<String>,
    max_tokens_in_paged_kv_cache: Option<String>,
    kv_cache_free_gpu_mem_fraction: Option<String>,
    kv_cache_dtype: Option<String>,
    block_size: Option<String>,
    max_model_len: Option<String>,
    enable_chunked_context: Option<String>,
    batch_scheduler_policy: Option<String>,
    enable_kv_cache_reuse: Option<String>,
    cuda_graph_mode: Option<String>,
    cuda_warmup: Option<String>,
    exclude_input_in_output: Option<String>,
    apply_chat_template: Option<String>,
    ignored_request_parameters: Option<String>,
    enable_trtllm_metrics: Option<String>,
    enable_vllm_metrics: Option<String>,
    default_max_tokens: Option<String>,
    default_temperature: Option<String>,
    default_top_k: Option<String>,
    default_top_p: Option<String>,
    default_min_p: Option<String>,
    default_repetition_penalty: Option<String>,
}

/// Every key `BackendConfig` accepts (for docs and tests).
pub const PARAMETER_KEYS: &[&str] = &[
    "model_path",
    "tokenizer_path",
    "device",
    "gpu_device_ids",
    "tensor_parallel_size",
    "weight_format",
    "dtype",
    "quantization",
    "max_num_seqs",
    "max_queue_size",
    "queue_timeout_microseconds",
    "max_num_batched_tokens",
    "max_tokens_in_paged_kv_cache",
    "kv_cache_free_gpu_mem_fraction",
    "kv_cache_dtype",
    "block_size",
    "max_model_len",
    "enable_chunked_context",
    "batch_scheduler_policy",
    "enable_kv_cache_reuse",
    "cuda_graph_mode",
    "cuda_warmup",
    "exclude_input_in_output",
    "apply_chat_template",
    "ignored_request_parameters",
    "enable_trtllm_metrics",
    "enable_vllm_metrics",
    "default_max_tokens",
    "default_temperature",
    "default_top_k",
    "default_top_p",
    "default_min_p",
    "default_repetition_penalty",
];

/// Defaults applied to a request field the request leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestDefaults {
    /// `max_tokens` of a request that sends none (`default_max_tokens`, 1..=2^20; default 128).
    pub max_tokens: usize,
    /// Sampling parameters of a request that sends none of its own (`default_temperature`,
    /// `default_top_k`, `default_top_p`, `default_min_p`, `default_repetition_penalty`), validated
    /// like request values.
    pub sampling: SamplingParams,
    /// Whether non-streaming outputs leave out the prompt when the request does not say
    /// (`exclude_input_in_output`; default true: Triton's OpenAI frontend never sends the flag
    /// for a chat completion, whose answer must not repeat the templated prompt.
    /// tensorrtllm_backend's default is false).
    pub exclude_input_in_output: bool,
    /// Whether `text_input` is formatted with the model's chat template as one user message when
    /// the request does not say (`apply_chat_template`; default false).
    pub apply_chat_template: bool,
}

/// Validated settings of one ferrum model.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendConfig {
    /// How to load and run the model. `model` is the resolved `model_path` (.gguf file, folder
    /// with one .gguf, or HF folder; default: the version folder), `tokenizer` the resolved
    /// `tokenizer_path`; a plain `cuda` device takes its ordinal from `gpu_device_ids[0]`
    /// (kept in `engine.parallel`, empty with `cpu`). Every other field is named after its key
    /// in `EngineOptions`'s docs.
    pub engine: EngineOptions,
    /// What a request gets for the fields it leaves out.
    pub defaults: RequestDefaults,
    /// Request parameters ignored besides Triton's `triton_*` keys (`ignored_request_parameters`,
    /// comma-separated; e.g. HTTP headers Triton forwards as parameters); any other parameter
    /// that names no field fails the request.
    pub ignored_request_parameters: Vec<String>,
    /// Which custom metric family sets the model exports on Triton's metrics endpoint.
    pub metrics: MetricSets,
}

/// The custom metric family sets of a model, each switched on or off by one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricSets {
    /// tensorrtllm_backend's `nv_trt_llm_*` gauges (`enable_trtllm_metrics`; default true).
    pub trtllm: bool,
    /// vLLM's `vllm:*` histograms, counters and gauges (`enable_vllm_metrics`; default true).
    pub vllm: bool,
}

/// The Triton-level facts of a model configuration the backend needs besides `parameters`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfigInfo {
    /// Triton's `max_batch_size` (0 when absent): greater than 0 means requests carry a leading
    /// batch dimension.
    pub max_batch_size: usize,
    /// Whether `model_transaction_policy { decoupled: true }` is set, i.e. a request may get many
    /// responses.
    pub decoupled: bool,
    /// The names of the outputs the configuration declares (after auto-completion, every
    /// output ferrum has when the config declared none). Responses carry only these: Triton
    /// refuses a response with an output its model does not declare, and a config written for
    /// another backend (TensorRT-LLM's `llmapi` model) declares fewer than ferrum can send.
    pub outputs: Vec<String>,
}

/// Where the model lives: `model_dir` holds config.pbtxt, `version_dir` is `model_dir/<version>`.
#[derive(Debug, Clone)]
pub struct ModelLocation {
    /// The model's folder in the repository, where config.pbtxt lives.
    pub model_dir: PathBuf,
    /// `model_dir/<version>`: the folder relative `model_path`/`tokenizer_path` values are tried in
    /// first.
    pub version_dir: PathBuf,
}

/// `max_queue_size` of a model that sets none: this many waiting requests per `max_num_seqs`.
pub const DEFAULT_QUEUE_PER_SEQ: usize = 4;

/// The most ranks `tensor_parallel_size` may ask for.
pub const MAX_TENSOR_PARALLEL_SIZE: usize = 64;
/// The longest `queue_timeout_microseconds` (an hour), for the model key and the request
/// parameter alike.
pub const MAX_QUEUE_TIMEOUT_MICROSECONDS: u64 = 3_600_000_000;

/// `max_tokens` of a request that sends none, unless `default_max_tokens` says otherwise.
pub const DEFAULT_MAX_TOKENS: usize = 128;

impl BackendConfig {
    /// Parses the `parameters` object of a model configuration JSON
    /// (`{"key": {"string_value": "..."}}`).
    pub fn from_model_config(
        config: &serde_json::Value,
        loc: &ModelLocation,
    ) -> Result<Self, ConfigError> {
        let mut map = serde_json::Map::new();
        if let Some(params) = config.get("parameters").and_then(|p| p.as_object()) {
            for (key, v) in params {
                let s = v
                    .get("string_value")
                    .and_then(|s| s.as_str())
                    .ok_or_else(|| ConfigError::NotAString { key: key.clone() })?;
                map.insert(key.clone(), serde_json::Value::String(s.to_string()));
            }
        }
        let raw: RawParameters = serde_json::from_value(serde_json::Value::Object(map))
            .map_err(|e| ConfigError::Parameters(e.to_string()))?;
        Self::from_raw(raw, loc)
    }

    fn from_raw(raw: RawParameters, loc: &ModelLocation) -> Result<Self, ConfigError> {
        let model_path = match &raw.model_path {
            Some(p) => resolve_path("model_path", p, loc)?,
            None => loc.version_dir.clone(),
        };
        let tokenizer_path = raw
            .tokenizer_path
            .as_deref()
            .map(|p| resolve_path("tokenizer_path", p, loc))
            .transpose()?;
        let defaults = EngineOptions::new(PathBuf::new());
        let device = match raw.device.as_deref() {
            None => Device::Auto,
            Some(s) => s.parse().map_err(|_| {
                ConfigError::invalid("device", s, "expected auto, cpu, cuda or cuda:N")
            })?,
        };
        let gpu_device_ids = match raw.gpu_device_ids.as_deref() {
            None => vec![],
            Some(s) => s
                .split(',')
                .filter(|t| !t.trim().is_empty())
                .map(|t| t.trim().parse::<usize>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| {
                    ConfigError::invalid(
                        "gpu_device_ids",
                        s,
                        "expected a comma-separated list of GPU ordinals, e.g. 0,1",
                    )
                })?,
        };
        if device == Device::Cpu && !gpu_device_ids.is_empty() {
            return Err(ConfigError::invalid(
                "gpu_device_ids",
                raw.gpu_device_ids.as_deref().unwrap_or_default(),
                "must be empty when device is cpu",
            ));
        }
        let tensor_parallel_size = parse_count(
            "tensor_parallel_size",
            raw.tensor_parallel_size.as_deref(),
            defaults.parallel.tensor_parallel_size,
            1,
            MAX_TENSOR_PARALLEL_SIZE,
        )?;
        let weight_format = match raw.weight_format.as_deref() {
            None | Some("auto") => None,
            Some("f32") => Some(WeightFormat::F32),
            Some("q8") => Some(WeightFormat::Q8),
            Some(s) => {
                return Err(ConfigError::invalid(
                    "weight_format",
                    s,
                    "expected auto, f32 or q8",
                ));
            }
        };
        let quantization = match raw.quantization.as_deref() {
            None => QuantizationOption::Auto,
            Some(s) => s
                .parse()
                .map_err(|_| ConfigError::invalid("quantization", s, "expected auto or fp8"))?,
        };
        let kv_cache_dtype = match raw.kv_cache_dtype.as_deref() {
            None => KvCacheDtype::Auto,
            Some(s) => s.parse().map_err(|_| {
                ConfigError::invalid("kv_cache_dtype", s, "expected auto, fp8 or fp8_e4m3")
            })?,
        };
        let dtype = match raw.dtype.as_deref() {
            None | Some("auto") => None,
            Some("bfloat16") => Some(DType::BF16),
            Some("float16") => Some(DType::F16),
            Some("float32") => Some(DType::F32),
            Some(s) => {
                return Err(ConfigError::invalid(
                    "dtype",
                    s,
                    "expected auto, bfloat16, float16 or float32",
                ));
            }
        };
        if device == Device::Cpu && matches!(dtype, Some(DType::BF16 | DType::F16)) {
            return Err(ConfigError::invalid(
                "dtype",
                raw.dtype.as_deref().unwrap_or_default(),
                "the CPU engine computes in float32: use auto or float32 with device cpu",
            ));
        }
        let max_num_seqs = parse_count(
            "max_num_seqs",
            raw.max_num_seqs.as_deref(),
            defaults.batching.max_num_seqs,
            1,
            4096,
        )?;
        // Requests waiting beyond the running ones; a served model is never unbounded.
        let max_queue_size = parse_count(
            "max_queue_size",
            raw.max_queue_size.as_deref(),
            DEFAULT_QUEUE_PER_SEQ * max_num_seqs,
            0,
            1 << 20,
        )?;
        // 0: no limit on how long a new request waits for its first step.
        let queue_timeout = parse_count(
            "queue_timeout_microseconds",
            raw.queue_timeout_microseconds.as_deref(),
            0,
            0,
            MAX_QUEUE_TIMEOUT_MICROSECONDS as usize,
        )?;
        let queue_timeout =
            (queue_timeout > 0).then(|| std::time::Duration::from_micros(queue_timeout as u64));
        let max_num_batched_tokens = parse_count(
            "max_num_batched_tokens",
            raw.max_num_batched_tokens.as_deref(),
            defaults.batching.max_num_batched_tokens,
            1,
            1 << 20,
        )?;
        let max_tokens_in_paged_kv_cache = raw
            .max_tokens_in_paged_kv_cache
            .as_deref()
            .map(|s| parse_count("max_tokens_in_paged_kv_cache", Some(s), 0, 1, 1 << 30))
            .transpose()?;
        let kv_cache_free_gpu_mem_fraction = match raw.kv_cache_free_gpu_mem_fraction.as_deref() {
            None => defaults.kv.free_gpu_mem_fraction,
            Some(s) => match s.trim().parse::<f32>() {
                Ok(f) if f > 0.0 && f <= 1.0 => f,
                _ => {
                    return Err(ConfigError::invalid(
                        "kv_cache_free_gpu_mem_fraction",
                        s,
                        "must be a number in (0, 1]",
                    ));
                }
            },
        };
        let block_size = parse_count(
            "block_size",
            raw.block_size.as_deref(),
            defaults.kv.block_size,
            1,
            256,
        )?;
        if !block_size.is_power_of_two() {
            return Err(ConfigError::invalid(
                "block_size",
                &block_size.to_string(),
                "must be a power of two in [1, 256]",
            ));
        }
        let max_model_len = raw
            .max_model_len
            .as_deref()
            .map(|s| parse_count("max_model_len", Some(s), 0, 2, 1 << 20))
            .transpose()?;
        let enable_chunked_context = parse_bool(
            "enable_chunked_context",
            raw.enable_chunked_context.as_deref(),
            defaults.batching.enable_chunked_prefill,
        )?;
        let batch_scheduler_policy = match raw.batch_scheduler_policy.as_deref() {
            None => defaults.batching.policy,
            Some(v) => SchedulerPolicy::parse(v).ok_or_else(|| {
                ConfigError::invalid(
                    "batch_scheduler_policy",
                    v,
                    format!("one of {}", SchedulerPolicy::NAMES.join(", ")),
                )
            })?,
        };
        let enable_kv_cache_reuse = parse_bool(
            "enable_kv_cache_reuse",
            raw.enable_kv_cache_reuse.as_deref(),
            defaults.batching.enable_prefix_caching,
        )?;
        let cuda_graph_mode = parse_bool(
            "cuda_graph_mode",
            raw.cuda_graph_mode.as_deref(),
            defaults.cuda.cuda_graphs,
        )?;
        let cuda_warmup = parse_bool(
            "cuda_warmup",
            raw.cuda_warmup.as_deref(),
            defaults.cuda.warm_up,
        )?;
        let exclude_input_in_output = parse_bool(
            "exclude_input_in_output",
            raw.exclude_input_in_output.as_deref(),
            true,
        )?;
        let apply_chat_template = parse_bool(
            "apply_chat_template",
            raw.apply_chat_template.as_deref(),
            false,
        )?;
        let max_tokens = parse_count(
            "default_max_tokens",
            raw.default_max_tokens.as_deref(),
            DEFAULT_MAX_TOKENS,
            1,
            1 << 20,
        )?;
        let mut sampling = SamplingParams::default();
        if let Some(s) = raw.default_temperature.as_deref() {
            sampling.temperature = parse_f32("default_temperature", s)?;
        }
        if let Some(s) = raw.default_top_k.as_deref() {
            sampling.top_k = parse_count("default_top_k", Some(s), 0, 0, 1 << 20)?;
        }
        if let Some(s) = raw.default_top_p.as_deref() {
            sampling.top_p = parse_f32("default_top_p", s)?;
        }
        if let Some(s) = raw.default_min_p.as_deref() {
            sampling.min_p = parse_f32("default_min_p", s)?;
        }
        if let Some(s) = raw.default_repetition_penalty.as_deref() {
            sampling.repetition_penalty = parse_f32("default_repetition_penalty", s)?;
        }
        // The defaults obey the same bounds as request values; name the config key on failure.
        if let Err(crate::request::RequestError::InvalidValue {
            field,
            value,
            bound,
        }) = sampling.validate()
        {
            let key = match field {
                "temperature" => "default_temperature",
                "top_p" => "default_top_p",
                "min_p" => "default_min_p",
                "repetition_penalty" => "default_repetition_penalty",
                other => other,
            };
            return Err(ConfigError::InvalidValue {
                key,
                value,
                expected: bound,
            });
        }
        // A plain `cuda` takes its ordinal from `gpu_device_ids`.
        let device = match (device, gpu_device_ids.first()) {
            (Device::Cuda { ordinal: 0 }, Some(&id)) => Device::Cuda { ordinal: id },
            (d, _) => d,
        };
        let ignored_request_parameters = raw
            .ignored_request_parameters
            .as_deref()
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(|k| {
                let ok = k
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
                match ok {
                    true => Ok(k.to_string()),
                    false => Err(ConfigError::invalid(
                        "ignored_request_parameters",
                        k,
                        "expected comma-separated parameter names (letters, digits, '_', '-', '.')",
                    )),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let metrics = MetricSets {
            trtllm: parse_bool(
                "enable_trtllm_metrics",
                raw.enable_trtllm_metrics.as_deref(),
                true,
            )?,
            vllm: parse_bool(
                "enable_vllm_metrics",
                raw.enable_vllm_metrics.as_deref(),
                true,
            )?,
        };
        Ok(BackendConfig {
            engine: EngineOptions {
                model: model_path,
                tokenizer: tokenizer_path,
                device,
                weight_format,
                dtype,
                quantization,
                max_model_len,
                batching: BatchingOptions {
                    max_num_seqs,
                    max_queue_size: Some(max_queue_size),
                    queue_timeout,
                    max_num_batched_tokens,
                    enable_chunked_prefill: enable_chunked_context,
                    policy: batch_scheduler_policy,
                    enable_prefix_caching: enable_kv_cache_reuse,
                },
                kv: KvCacheOptions {
                    block_size,
                    max_tokens: max_tokens_in_paged_kv_cache,
                    free_gpu_mem_fraction: kv_cache_free_gpu_mem_fraction,
                    dtype: kv_cache_dtype,
                },
                cuda: CudaExecOptions {
                    cuda_graphs: cuda_graph_mode,
                    warm_up: cuda_warmup,
                    ..defaults.cuda
                },
                parallel: ParallelOptions {
                    tensor_parallel_size,
                    gpu_device_ids,
                },
                ..defaults
            },
            defaults: RequestDefaults {
                max_tokens,
                sampling,
                exclude_input_in_output,
                apply_chat_template,
            },
            ignored_request_parameters,
            metrics,
        })
    }
}

impl ModelConfigInfo {
    /// Reads `max_batch_size`, the decoupled transaction policy and the declared output names
    /// from the model configuration JSON; missing keys mean 0, not decoupled and no outputs.
    pub fn from_model_config(config: &serde_json::Value) -> Self {
        ModelConfigInfo {
            max_batch_size: config
                .get("max_batch_size")
                .and_then(|v| v.as_u64())
                .unwrap_or(0) as usize,
            decoupled: config
                .get("model_transaction_policy")
                .and_then(|p| p.get("decoupled"))
                .and_then(|d| d.as_bool())
                .unwrap_or(false),
            outputs: config
                .get("output")
                .and_then(|o| o.as_array())
                .into_iter()
                .flatten()
                .filter_map(|o| o.get("name").and_then(|n| n.as_str()).map(str::to_owned))
                .collect(),
        }
    }
}

/// An absolute path, or one relative to the version folder, or else to the model folder.
fn resolve_path(
    key: &'static str,
    value: &str,
    loc: &ModelLocation,
) -> Result<PathBuf, ConfigError> {
    let p = Path::new(value);
    let candidates: Vec<PathBuf> = if p.is_absolute() {
        vec![p.to_path_buf()]
    } else {
        vec![loc.version_dir.join(p), loc.model_dir.join(p)]
    };
    candidates
        .iter()
        .find(|c| c.exists())
        .cloned()
        .ok_or_else(|| ConfigError::PathNotFound {
            key,
            value: value.to_string(),
            tried: candidates
                .iter()
                .map(|c| c.display().to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })
}

fn parse_count(
    key: &'static str,
    value: Option<&str>,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    let Some(s) = value else { return Ok(default) };
    match s.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError::invalid(
            key,
            s,
            format!("must be an integer in [{min}, {max}]"),
        )),
    }
}

fn parse_f32(key: &'static str, s: &str) -> Result<f32, ConfigError> {
    match s.trim().parse::<f32>() {
        Ok(f) if f.is_finite() => Ok(f),
        _ => Err(ConfigError::invalid(key, s, "must be a finite number")),
    }
}

/// `true`/`false` (also `1`/`0`, `yes`/`no`, any case).
pub fn parse_bool(
    key: &'static str,
    value: Option<&str>,
    default: bool,
) -> Result<bool, ConfigError> {
    let Some(s) = value else { return Ok(default) };
    match s.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" => Ok(false),
        _ => Err(ConfigError::invalid(key, s, "expected true or false")),
    }
}

#[cfg(test)]
mod tests;
