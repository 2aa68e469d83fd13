//! Request parsing: any bytes as a JSON request body, turned into the `RawRequest` Triton's
//! request would give (`backend::parse::RawRequest`: input tensors with their raw data, request
//! parameters) and run through `backend::parse::parse`, which reads every tensor and parameter,
//! the `sampling_parameters` JSON, applies the model defaults and validates the result with
//! `GenerateRequest::new` (against a real tokenizer, the hf_tiny fixture, or none).
//!
//! Two body forms, as clients send them to Triton:
//! - the KServe v2 `infer` body: `{"inputs": [{"name", "datatype", "shape", "data"}], "parameters":
//!   {...}}`; an input may give `"raw": "<hex>"` instead of `data`, its exact bytes (so malformed
//!   BYTES length prefixes and short buffers are reachable too);
//! - Triton's `generate` body: `{"text_input": "...", "max_tokens": 3, ...}`: a key naming one of
//!   ferrum's inputs becomes that tensor (its declared dtype, shape `[n]`), every other key a
//!   request parameter, like Triton's generate endpoint does.
//!
//! An optional `"model"` object sets what the harness's model looks like: `max_batch_size` (0),
//! `decoupled` (true), `tokenizer` (true), `max_model_len` (2048), `default_max_tokens` (16),
//! `apply_chat_template` (false) and `ignored` (parameter names). Errors are expected; a panic,
//! abort, hang or out-of-memory is a bug.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};
use triton_api::{DataType, InputTensor, ParamValue};
use triton_ferrum::backend::parse::{INPUTS, ParseContext, RawRequest, parse};
use triton_ferrum::config::RequestDefaults;
use triton_ferrum::request::{ModelInfo, SamplingParams};
use triton_ferrum::tokenizer::Tokenizer;

const DATA_TYPES: [DataType; 15] = [
    DataType::Invalid,
    DataType::Bool,
    DataType::Uint8,
    DataType::Uint16,
    DataType::Uint32,
    DataType::Uint64,
    DataType::Int8,
    DataType::Int16,
    DataType::Int32,
    DataType::Int64,
    DataType::Fp16,
    DataType::Fp32,
    DataType::Fp64,
    DataType::Bytes,
    DataType::Bf16,
];

/// The hf_tiny fixture tokenizer (with its chat template), loaded once.
fn tokenizer() -> Arc<Tokenizer> {
    static TOKENIZER: OnceLock<Arc<Tokenizer>> = OnceLock::new();
    TOKENIZER
        .get_or_init(|| {
            // This file is built by the fuzz crate (fuzz/) and by the main crate's corpus replay
            // test (the repository root).
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            let root = if manifest.ends_with("fuzz") {
                manifest.join("..")
            } else {
                manifest.to_path_buf()
            };
            let dir = root.join("tests/fixtures/tokenizer/hf_tiny");
            match Tokenizer::from_hf_dir(&dir) {
                Ok(Some(t)) => Arc::new(t),
                other => panic!(
                    "the hf_tiny fixture tokenizer does not load from {}: {other:?}",
                    dir.display()
                ),
            }
        })
        .clone()
}

/// The KServe v2 name of a datatype (`INT32`, `BYTES`, ...).
fn kserve_name(dtype: DataType) -> &'static str {
    match dtype {
        DataType::Bytes => "BYTES",
        d => d.config_name().trim_start_matches("TYPE_"),
    }
}

fn data_type(name: &str) -> DataType {
    DATA_TYPES
        .into_iter()
        .find(|&d| kserve_name(d) == name)
        .unwrap_or(DataType::Invalid)
}

fn as_i64(v: &Value) -> i64 {
    match v {
        Value::Bool(b) => i64::from(*b),
        Value::Number(n) => n
            .as_i64()
            .or_else(|| n.as_u64().map(|u| u as i64))
            .or_else(|| n.as_f64().map(|f| f as i64))
            .unwrap_or(0),
        _ => 0,
    }
}

fn as_f64(v: &Value) -> f64 {
    match v {
        Value::Bool(b) => f64::from(u8::from(*b)),
        Value::Number(n) => n.as_f64().unwrap_or(0.0),
        _ => 0.0,
    }
}

/// Elements of a JSON value (a list, nested lists flattened, or one scalar) encoded as `dtype`.
fn encode(dtype: DataType, v: &Value) -> Vec<u8> {
    let mut elems = Vec::new();
    flatten(v, &mut elems);
    if dtype == DataType::Bytes {
        let strings: Vec<Vec<u8>> = elems
            .iter()
            .map(|e| match e {
                Value::String(s) => s.as_bytes().to_vec(),
                other => other.to_string().into_bytes(),
            })
            .collect();
        return triton_api::serialize_bytes(strings.iter().map(Vec::as_slice));
    }
    let mut out = Vec::new();
    for e in elems {
        match dtype {
            DataType::Fp32 => out.extend((as_f64(e) as f32).to_le_bytes()),
            DataType::Fp64 => out.extend(as_f64(e).to_le_bytes()),
            // Half precision: the top 16 bits of the f32 (bf16 by truncation); FP16 readers get
            // arbitrary but well-formed bit patterns either way.
            DataType::Fp16 | DataType::Bf16 => {
                out.extend(&(as_f64(e) as f32).to_bits().to_le_bytes()[2..]);
            }
            d => {
                let size = d.byte_size().unwrap_or(1);
                out.extend(&as_i64(e).to_le_bytes()[..size]);
            }
        }
    }
    out
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

fn hex(s: &str) -> Vec<u8> {
    s.as_bytes()
        .chunks_exact(2)
        .filter_map(|p| u8::from_str_radix(std::str::from_utf8(p).ok()?, 16).ok())
        .collect()
}

fn param(v: &Value) -> ParamValue {
    match v {
        Value::String(s) => ParamValue::String(s.clone()),
        Value::Bool(b) => ParamValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => ParamValue::Int(i),
            None => ParamValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        _ => ParamValue::Bytes,
    }
}

fn params(obj: Option<&Value>) -> Vec<(String, ParamValue)> {
    obj.and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), param(v))).collect())
        .unwrap_or_default()
}

/// A KServe v2 `infer` body's inputs.
fn infer_inputs(inputs: &[Value]) -> Vec<InputTensor> {
    inputs
        .iter()
        .map(|t| {
            let dtype = data_type(t.get("datatype").and_then(Value::as_str).unwrap_or(""));
            let shape = t
                .get("shape")
                .and_then(Value::as_array)
                .map(|s| s.iter().map(as_i64).collect())
                .unwrap_or_default();
            let data = match (t.get("raw").and_then(Value::as_str), t.get("data")) {
                (Some(raw), _) => hex(raw),
                (None, Some(d)) => encode(dtype, d),
                (None, None) => vec![],
            };
            InputTensor {
                name: t
                    .get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                dtype,
                shape,
                data,
            }
        })
        .collect()
}

/// A `generate` body: ferrum's inputs become tensors, other keys request parameters.
fn generate_request(body: &Map<String, Value>, batched: bool) -> RawRequest {
    let mut raw = RawRequest::default();
    for (key, v) in body {
        if key == "model" {
            continue;
        }
        if key == "parameters" {
            raw.params.extend(params(Some(v)));
            continue;
        }
        let Some(spec) = INPUTS.iter().find(|s| s.name == key) else {
            raw.params.push((key.clone(), param(v)));
            continue;
        };
        let mut elems = Vec::new();
        flatten(v, &mut elems);
        let mut shape = vec![elems.len() as i64];
        if batched {
            shape.insert(0, 1);
        }
        raw.inputs.push(InputTensor {
            name: key.clone(),
            dtype: spec.dtype,
            shape,
            data: encode(spec.dtype, v),
        });
    }
    raw
}

/// Runs one input; true when it parsed into a valid request (what the corpus replay test checks
/// of the seeds: the `bad_*` ones must fail, the others pass).
pub fn run(data: &[u8]) -> bool {
    let Ok(Value::Object(body)) = serde_json::from_slice::<Value>(data) else {
        return false;
    };
    let model = body.get("model").cloned().unwrap_or(Value::Null);
    let get_u = |key: &str, default: u64, max: u64| {
        model
            .get(key)
            .and_then(Value::as_u64)
            .unwrap_or(default)
            .min(max) as usize
    };
    let get_b =
        |key: &str, default: bool| model.get(key).and_then(Value::as_bool).unwrap_or(default);
    let max_batch_size = get_u("max_batch_size", 0, 1024);
    let tokenizer = get_b("tokenizer", true).then(tokenizer);
    let info = ModelInfo {
        vocab_size: tokenizer.as_ref().map_or(400, |t| t.vocab_size()),
        max_model_len: get_u("max_model_len", 2048, 1 << 20).max(2),
        eos_token_ids: tokenizer
            .as_ref()
            .map(|t| t.eos_token_ids().to_vec())
            .unwrap_or_default(),
        tokenizer,
        bans_words: get_b("bans_words", true),
    };
    let defaults = RequestDefaults {
        max_tokens: get_u("default_max_tokens", 16, 1 << 20).max(1),
        sampling: SamplingParams::default(),
        exclude_input_in_output: false,
        apply_chat_template: get_b("apply_chat_template", false),
    };
    let ignored: Vec<String> = model
        .get("ignored")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| Some(v.as_str()?.to_string()))
                .collect()
        })
        .unwrap_or_default();
    let raw = match body.get("inputs").and_then(Value::as_array) {
        Some(inputs) => RawRequest {
            inputs: infer_inputs(inputs),
            params: params(body.get("parameters")),
        },
        None => generate_request(&body, max_batch_size > 0),
    };
    let ctx = ParseContext {
        max_batch_size,
        decoupled: get_b("decoupled", true),
        model: &info,
        defaults: &defaults,
        ignored_parameters: &ignored,
    };
    match parse(&raw, &ctx) {
        Ok(parsed) => !parsed.generate.prompt_ids().is_empty(),
        Err(e) => {
            let _ = e.to_string();
            false
        }
    }
}
