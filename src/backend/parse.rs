//! Request parsing: the tensors and parameters of one Triton request → a validated
//! `GenerateRequest` plus how to answer it (`ParsedRequest`). Pure code over copied data
//! (`RawRequest`), so every rule is unit-tested without a server.
//!
//! Accepted interfaces (names, dtypes, dims in `INPUTS`): the union of tensorrtllm_backend's
//! text (`ensemble`) and token (`tensorrt_llm`) interfaces, and Triton's vLLM backend interface
//! (`sampling_parameters` JSON). Old and new names are both accepted (`random_seed`/`seed`,
//! `min_length`/`min_tokens`). Precedence for a setting given more than once: tensor >
//! `sampling_parameters` JSON > request parameter > model default. Every error names the field,
//! the value and the bound. This module must never call Triton or the engine.

use serde_json::Value;
use triton_api::{DataType, InputTensor, ParamValue};

use crate::config::RequestDefaults;
use crate::request::{GenerateRequest, Prompt, RequestError, SamplingParams, StopCriteria};
use crate::tokenizer::{ChatMessage, Tokenizer};

/// An input the backend declares: name, dtype, dims (without the batch dimension).
pub struct TensorSpec {
    pub name: &'static str,
    pub dtype: DataType,
    pub dims: &'static [i64],
}

const fn spec(name: &'static str, dtype: DataType, dims: &'static [i64]) -> TensorSpec {
    TensorSpec { name, dtype, dims }
}

/// Every input ferrum accepts; all optional (a request needs `text_input` or `input_ids`).
pub const INPUTS: &[TensorSpec] = &[
    spec("text_input", DataType::Bytes, &[1]),
    spec("input_ids", DataType::Int32, &[-1]),
    spec("input_lengths", DataType::Int32, &[1]),
    spec("max_tokens", DataType::Int32, &[1]),
    spec("request_output_len", DataType::Int32, &[1]),
    spec("stream", DataType::Bool, &[1]),
    spec("streaming", DataType::Bool, &[1]),
    spec("temperature", DataType::Fp32, &[1]),
    spec("top_k", DataType::Int32, &[1]),
    spec("runtime_top_k", DataType::Int32, &[1]),
    spec("top_p", DataType::Fp32, &[1]),
    spec("runtime_top_p", DataType::Fp32, &[1]),
    spec("min_p", DataType::Fp32, &[1]),
    spec("repetition_penalty", DataType::Fp32, &[1]),
    spec("presence_penalty", DataType::Fp32, &[1]),
    spec("frequency_penalty", DataType::Fp32, &[1]),
    spec("min_tokens", DataType::Int32, &[1]),
    spec("min_length", DataType::Int32, &[1]),
    spec("seed", DataType::Uint64, &[1]),
    spec("random_seed", DataType::Uint64, &[1]),
    spec("end_id", DataType::Int32, &[1]),
    spec("pad_id", DataType::Int32, &[1]),
    spec("stop_words", DataType::Bytes, &[-1]),
    spec("bad_words", DataType::Bytes, &[-1]),
    spec("stop_words_list", DataType::Int32, &[2, -1]),
    spec("bad_words_list", DataType::Int32, &[2, -1]),
    spec("ignore_eos", DataType::Bool, &[1]),
    spec("apply_chat_template", DataType::Bool, &[1]),
    spec("return_log_probs", DataType::Bool, &[1]),
    spec("exclude_input_in_output", DataType::Bool, &[1]),
    spec("beam_width", DataType::Int32, &[1]),
    spec("num_return_sequences", DataType::Int32, &[1]),
    spec("sampling_parameters", DataType::Bytes, &[1]),
];

/// Every output ferrum may produce (dims without the batch dimension).
pub const OUTPUTS: &[TensorSpec] = &[
    spec("text_output", DataType::Bytes, &[-1]),
    spec("output_ids", DataType::Int32, &[-1, -1]),
    spec("sequence_length", DataType::Int32, &[-1]),
    spec("finish_reason", DataType::Bytes, &[-1]),
    spec("cum_log_probs", DataType::Fp32, &[-1]),
    spec("output_log_probs", DataType::Fp32, &[-1, -1]),
    spec("num_input_tokens", DataType::Uint32, &[1]),
    spec("num_output_tokens", DataType::Uint32, &[1]),
];

/// One request's inputs and parameters, copied out of Triton.
#[derive(Debug, Clone, Default)]
pub struct RawRequest {
    pub inputs: Vec<InputTensor>,
    pub params: Vec<(String, ParamValue)>,
}

/// What parsing needs to know about the model.
pub struct ParseContext<'a> {
    /// > 0: every tensor carries a leading batch dimension (which must be 1).
    pub max_batch_size: usize,
    pub decoupled: bool,
    pub max_model_len: usize,
    pub defaults: &'a RequestDefaults,
    pub tokenizer: Option<&'a Tokenizer>,
}

/// Which tensors carry the prompt and the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// `text_input` → `text_output`.
    Text,
    /// `input_ids` → `output_ids` + `sequence_length`.
    Tokens,
}

#[derive(Debug, Clone)]
pub struct ParsedRequest {
    pub generate: GenerateRequest,
    pub interface: Interface,
    /// Send each delta as its own response (decoupled models only).
    pub stream: bool,
    /// Leave the prompt out of non-streaming outputs.
    pub exclude_input_in_output: bool,
    pub return_log_probs: bool,
    /// The prompt text as sent (prepended to `text_output` when the input is not excluded).
    pub prompt_text: Option<String>,
}

/// Settings collected from all sources before validation; `None` = not given.
#[derive(Debug, Default)]
struct Fields {
    max_tokens: Option<(&'static str, i64)>,
    min_tokens: Option<(&'static str, i64)>,
    temperature: Option<f64>,
    top_k: Option<(&'static str, i64)>,
    top_p: Option<(&'static str, f64)>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    seed: Option<u64>,
    logprobs: Option<i64>,
    stop_strings: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: Option<bool>,
    stream: Option<bool>,
    exclude_input_in_output: Option<bool>,
    apply_chat_template: Option<bool>,
    return_log_probs: Option<bool>,
}

fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    bound: impl Into<String>,
) -> RequestError {
    RequestError::invalid(field, value, bound)
}

fn static_name(name: &str) -> &'static str {
    INPUTS
        .iter()
        .find(|s| s.name == name)
        .map_or("input", |s| s.name)
}

/// A tensor with its batch dimension (if any) checked and removed.
struct Tensor<'a> {
    field: &'static str,
    dtype: DataType,
    shape: Vec<i64>,
    data: &'a [u8],
}

impl<'a> Tensor<'a> {
    fn new(t: &'a InputTensor, max_batch_size: usize) -> Result<Self, RequestError> {
        let field = static_name(&t.name);
        let mut shape = t.shape.clone();
        if max_batch_size > 0 {
            match shape.first() {
                Some(1) => {
                    shape.remove(0);
                }
                Some(&b) => {
                    return Err(invalid(
                        field,
                        format!("batch size {b}"),
                        "the batch dimension must be 1: ferrum takes one sequence per request (send separate requests; the engine batches them)",
                    ));
                }
                None => {
                    return Err(invalid(
                        field,
                        "shape []",
                        "a batched model needs a leading batch dimension of 1",
                    ));
                }
            }
        }
        Ok(Tensor {
            field,
            dtype: t.dtype,
            shape,
            data: &t.data,
        })
    }

    fn num_elements(&self) -> usize {
        self.shape.iter().map(|&d| d.max(0) as usize).product()
    }

    fn ints(&self) -> Result<Vec<i64>, RequestError> {
        let n = self.num_elements();
        let elem = self.dtype.byte_size().unwrap_or(0);
        let wrong = || {
            invalid(
                self.field,
                format!("{} data", self.dtype.config_name()),
                "expected an integer tensor",
            )
        };
        if elem == 0
            || matches!(
                self.dtype,
                DataType::Fp16 | DataType::Fp32 | DataType::Fp64 | DataType::Bf16
            )
        {
            return Err(wrong());
        }
        if self.data.len() != n * elem {
            return Err(invalid(
                self.field,
                format!("{} bytes for shape {:?}", self.data.len(), self.shape),
                "size mismatch",
            ));
        }
        let out = self
            .data
            .chunks_exact(elem)
            .map(|c| {
                let mut b = [0u8; 8];
                b[..elem].copy_from_slice(c);
                match self.dtype {
                    DataType::Bool | DataType::Uint8 => c[0] as i64,
                    DataType::Int8 => c[0] as i8 as i64,
                    DataType::Uint16 => u16::from_le_bytes([c[0], c[1]]) as i64,
                    DataType::Int16 => i16::from_le_bytes([c[0], c[1]]) as i64,
                    DataType::Uint32 => u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
                    DataType::Int32 => i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as i64,
                    // u64 seeds above i64::MAX wrap; `seed_u64` reads them exactly.
                    _ => i64::from_le_bytes(b),
                }
            })
            .collect();
        Ok(out)
    }

    fn floats(&self) -> Result<Vec<f64>, RequestError> {
        match self.dtype {
            DataType::Fp32 => {
                if self.data.len() != self.num_elements() * 4 {
                    return Err(invalid(
                        self.field,
                        format!("{} bytes", self.data.len()),
                        "size mismatch",
                    ));
                }
                Ok(self
                    .data
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f64)
                    .collect())
            }
            DataType::Fp64 => {
                if self.data.len() != self.num_elements() * 8 {
                    return Err(invalid(
                        self.field,
                        format!("{} bytes", self.data.len()),
                        "size mismatch",
                    ));
                }
                Ok(self
                    .data
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                    .collect())
            }
            DataType::Bytes | DataType::Fp16 | DataType::Bf16 | DataType::Invalid => Err(invalid(
                self.field,
                format!("{} data", self.dtype.config_name()),
                "expected TYPE_FP32 (or another numeric type)",
            )),
            _ => Ok(self.ints()?.into_iter().map(|i| i as f64).collect()),
        }
    }

    fn strings(&self) -> Result<Vec<String>, RequestError> {
        if self.dtype != DataType::Bytes {
            return Err(invalid(
                self.field,
                format!("{} data", self.dtype.config_name()),
                "expected TYPE_STRING (BYTES)",
            ));
        }
        let mut out = Vec::new();
        let mut rest = self.data;
        while !rest.is_empty() {
            if rest.len() < 4 {
                return Err(invalid(
                    self.field,
                    "truncated BYTES element",
                    "each element needs a 4-byte length",
                ));
            }
            let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let Some(bytes) = rest.get(4..4 + len) else {
                return Err(invalid(
                    self.field,
                    format!("element length {len}"),
                    "exceeds the tensor's bytes",
                ));
            };
            let s = std::str::from_utf8(bytes).map_err(|e| {
                invalid(
                    self.field,
                    format!("invalid UTF-8 at byte {}", e.valid_up_to()),
                    "must be valid UTF-8 text",
                )
            })?;
            out.push(s.to_string());
            rest = &rest[4 + len..];
        }
        Ok(out)
    }

    fn one<T>(&self, v: Vec<T>) -> Result<T, RequestError> {
        let n = v.len();
        let mut it = v.into_iter();
        match (it.next(), n) {
            (Some(x), 1) => Ok(x),
            _ => Err(invalid(
                self.field,
                format!("{n} elements (shape {:?})", self.shape),
                "must have exactly one element",
            )),
        }
    }

    fn int(&self) -> Result<i64, RequestError> {
        let v = self.ints()?;
        self.one(v)
    }
    fn float(&self) -> Result<f64, RequestError> {
        let v = self.floats()?;
        self.one(v)
    }
    fn boolean(&self) -> Result<bool, RequestError> {
        let v = self.ints()?;
        Ok(self.one(v)? != 0)
    }
    fn seed_u64(&self) -> Result<u64, RequestError> {
        if self.dtype == DataType::Uint64 && self.data.len() == 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(self.data);
            return Ok(u64::from_le_bytes(b));
        }
        let v = self.int()?;
        u64::try_from(v).map_err(|_| invalid(self.field, v, "must be >= 0"))
    }
}

/// Parses and validates one request.
pub fn parse(raw: &RawRequest, ctx: &ParseContext<'_>) -> Result<ParsedRequest, RequestError> {
    let mut f = Fields::default();

    // 1. Request parameters (generate-endpoint keys that are not inputs): known keys only;
    //    others (Triton's own, e.g. `triton_enable_empty_final_response`) are ignored.
    let param_obj: serde_json::Map<String, Value> = raw
        .params
        .iter()
        .filter(|(k, _)| {
            SAMPLING_KEYS.contains(&k.as_str()) || REQUEST_PARAM_KEYS.contains(&k.as_str())
        })
        .filter_map(|(k, v)| {
            let jv = match v {
                ParamValue::String(s) => Value::String(s.clone()),
                ParamValue::Int(i) => Value::from(*i),
                ParamValue::Bool(b) => Value::Bool(*b),
                ParamValue::Double(d) => Value::from(*d),
                ParamValue::Bytes => return None,
            };
            Some((k.clone(), jv))
        })
        .collect();
    apply_json(&mut f, &param_obj, "parameters", true)?;

    // 2. The vLLM-style `sampling_parameters` JSON: strict, an unknown key is an error.
    let mut prompt: Option<(Interface, Prompt, Option<String>)> = None;
    let mut input_ids: Option<Vec<i64>> = None;
    let mut input_lengths: Option<i64> = None;
    for t in &raw.inputs {
        if t.name == "sampling_parameters" {
            let tensor = Tensor::new(t, ctx.max_batch_size)?;
            let strings = tensor.strings()?;
            let text = tensor.one(strings)?;
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                invalid(
                    "sampling_parameters",
                    format!("{text:?}"),
                    format!("must be a JSON object: {e}"),
                )
            })?;
            let obj = v.as_object().ok_or_else(|| {
                invalid(
                    "sampling_parameters",
                    format!("{text:?}"),
                    "must be a JSON object",
                )
            })?;
            apply_json(&mut f, obj, "sampling_parameters", false)?;
        }
    }

    // 3. Tensors.
    for t in &raw.inputs {
        let tensor = Tensor::new(t, ctx.max_batch_size)?;
        match t.name.as_str() {
            "sampling_parameters" => {}
            "text_input" => {
                let strings = tensor.strings()?;
                let text = tensor.one(strings)?;
                if text.is_empty() {
                    return Err(RequestError::EmptyPrompt);
                }
                prompt = Some((Interface::Text, Prompt::Text(text.clone()), Some(text)));
            }
            "input_ids" => input_ids = Some(tensor.ints()?),
            "input_lengths" => input_lengths = Some(tensor.int()?),
            "max_tokens" | "request_output_len" => {
                f.max_tokens = Some((tensor.field, tensor.int()?))
            }
            "min_tokens" | "min_length" => f.min_tokens = Some((tensor.field, tensor.int()?)),
            "stream" | "streaming" => f.stream = Some(tensor.boolean()?),
            "temperature" => f.temperature = Some(tensor.float()?),
            "top_k" | "runtime_top_k" => f.top_k = Some((tensor.field, tensor.int()?)),
            "top_p" | "runtime_top_p" => f.top_p = Some((tensor.field, tensor.float()?)),
            "min_p" => f.min_p = Some(tensor.float()?),
            "repetition_penalty" => f.repetition_penalty = Some(tensor.float()?),
            "presence_penalty" => f.presence_penalty = Some(tensor.float()?),
            "frequency_penalty" => f.frequency_penalty = Some(tensor.float()?),
            "seed" | "random_seed" => f.seed = Some(tensor.seed_u64()?),
            "end_id" => {
                let id = tensor.int()?;
                if id >= 0 {
                    f.stop_token_ids.push(token_id(tensor.field, id)?);
                }
            }
            "pad_id" => {
                tensor.int()?;
            }
            "stop_words" => f
                .stop_strings
                .extend(tensor.strings()?.into_iter().filter(|s| !s.is_empty())),
            "bad_words" => {
                if let Some(w) = tensor.strings()?.into_iter().find(|s| !s.is_empty()) {
                    return Err(invalid(
                        "bad_words",
                        format!("{w:?}"),
                        "bad words are not supported by ferrum; send an empty list",
                    ));
                }
            }
            "stop_words_list" => {
                for seq in word_list(&tensor)? {
                    match seq.as_slice() {
                        [one] => f.stop_token_ids.push(*one),
                        many => {
                            let tok = ctx.tokenizer.ok_or(RequestError::NoTokenizer {
                                field: "stop_words_list",
                            })?;
                            let s = tok
                                .decode(many, false)
                                .map_err(|e| RequestError::Tokenizer(e.to_string()))?;
                            if !s.is_empty() {
                                f.stop_strings.push(s);
                            }
                        }
                    }
                }
            }
            "bad_words_list" => {
                if let Some(seq) = word_list(&tensor)?.first() {
                    return Err(invalid(
                        "bad_words_list",
                        format!("{seq:?}"),
                        "bad words are not supported by ferrum; send an empty list",
                    ));
                }
            }
            "ignore_eos" => f.ignore_eos = Some(tensor.boolean()?),
            "apply_chat_template" => f.apply_chat_template = Some(tensor.boolean()?),
            "return_log_probs" => f.return_log_probs = Some(tensor.boolean()?),
            "exclude_input_in_output" => f.exclude_input_in_output = Some(tensor.boolean()?),
            "beam_width" | "num_return_sequences" => {
                let n = tensor.int()?;
                if n != 1 {
                    return Err(invalid(
                        tensor.field,
                        n,
                        "must be 1: beam search and multiple sequences are not supported",
                    ));
                }
            }
            other => {
                return Err(RequestError::InvalidValue {
                    field: "input",
                    value: format!("'{other}'"),
                    bound: "not an input ferrum accepts (see docs/configuration.md)".into(),
                });
            }
        }
    }

    // The prompt.
    if let Some(ids) = input_ids {
        if prompt.is_some() {
            return Err(invalid(
                "input_ids",
                "given together with text_input",
                "send either text_input or input_ids",
            ));
        }
        let mut ids = ids;
        if let Some(len) = input_lengths {
            if len < 0 || len as usize > ids.len() {
                return Err(invalid(
                    "input_lengths",
                    len,
                    format!("must be in [0, {}] (the length of input_ids)", ids.len()),
                ));
            }
            ids.truncate(len as usize);
        }
        if ids.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        let ids = ids
            .into_iter()
            .map(|id| token_id("input_ids", id))
            .collect::<Result<Vec<_>, _>>()?;
        prompt = Some((Interface::Tokens, Prompt::TokenIds(ids), None));
    }
    let Some((interface, mut prompt, prompt_text)) = prompt else {
        return Err(invalid(
            "text_input",
            "missing",
            "a request needs text_input (BYTES) or input_ids (INT32)",
        ));
    };
    if interface == Interface::Text
        && f.apply_chat_template
            .unwrap_or(ctx.defaults.apply_chat_template)
    {
        let tok = ctx.tokenizer.ok_or(RequestError::NoTokenizer {
            field: "apply_chat_template",
        })?;
        let text = prompt_text.clone().unwrap_or_default();
        let rendered = tok
            .apply_chat_template(&[ChatMessage::new("user", text)], true)
            .map_err(|e| {
                invalid(
                    "apply_chat_template",
                    "true",
                    format!("the chat template cannot be applied: {e}"),
                )
            })?;
        // The template already holds any BOS token: encode without adding specials.
        prompt = Prompt::TokenIds(
            tok.encode(&rendered, false)
                .map_err(|e| RequestError::Tokenizer(e.to_string()))?,
        );
    }

    let stream = f.stream.unwrap_or(false);
    if stream && !ctx.decoupled {
        return Err(invalid(
            "stream",
            "true",
            "streaming needs a decoupled model (model_transaction_policy { decoupled: true }); use stream=false",
        ));
    }

    let defaults = ctx.defaults;
    let (max_field, max_tokens) = f
        .max_tokens
        .unwrap_or(("max_tokens", defaults.max_tokens as i64));
    if max_tokens < 1 || max_tokens as usize >= ctx.max_model_len {
        return Err(invalid(
            max_field,
            max_tokens,
            format!(
                "must be in [1, {}] (the model's context is {} tokens)",
                ctx.max_model_len - 1,
                ctx.max_model_len
            ),
        ));
    }
    let (min_field, min_tokens) = f.min_tokens.unwrap_or(("min_tokens", 0));
    if min_tokens < 0 {
        return Err(invalid(min_field, min_tokens, "must be >= 0"));
    }
    let top_k = match f.top_k {
        None => defaults.sampling.top_k,
        Some((field, k)) if k < 0 => {
            return Err(invalid(field, k, "must be >= 0 (0 disables top-k)"));
        }
        Some((_, k)) => k as usize,
    };
    let logprobs = match (f.logprobs, f.return_log_probs.unwrap_or(false)) {
        (Some(n), _) if n < 0 => return Err(invalid("logprobs", n, "must be >= 0")),
        (Some(n), _) => Some(n as usize),
        (None, true) => Some(0),
        (None, false) => None,
    };
    let return_log_probs = logprobs.is_some();
    let sampling = SamplingParams {
        temperature: f
            .temperature
            .map_or(defaults.sampling.temperature, |v| v as f32),
        top_k,
        top_p: f.top_p.map_or(defaults.sampling.top_p, |(_, v)| v as f32),
        min_p: f.min_p.map_or(defaults.sampling.min_p, |v| v as f32),
        repetition_penalty: f
            .repetition_penalty
            .map_or(defaults.sampling.repetition_penalty, |v| v as f32),
        presence_penalty: f
            .presence_penalty
            .map_or(defaults.sampling.presence_penalty, |v| v as f32),
        frequency_penalty: f
            .frequency_penalty
            .map_or(defaults.sampling.frequency_penalty, |v| v as f32),
        seed: f.seed.or(defaults.sampling.seed),
        logprobs,
    };
    // Report the field name the client used for top_p.
    if let (
        Some((field, v)),
        Err(RequestError::InvalidValue {
            field: "top_p",
            bound,
            ..
        }),
    ) = (f.top_p, sampling.validate())
    {
        return Err(invalid(field, v, bound));
    }
    sampling.validate()?;
    let stop = StopCriteria {
        max_tokens: max_tokens as usize,
        min_tokens: min_tokens as usize,
        stop_token_ids: f.stop_token_ids,
        stop_strings: f.stop_strings,
        ignore_eos: f.ignore_eos.unwrap_or(false),
    };
    stop.validate()?;
    let detokenize = interface == Interface::Text || !stop.stop_strings.is_empty();
    Ok(ParsedRequest {
        generate: GenerateRequest {
            prompt,
            sampling,
            stop,
            detokenize,
        },
        interface,
        stream,
        exclude_input_in_output: f
            .exclude_input_in_output
            .unwrap_or(defaults.exclude_input_in_output),
        return_log_probs,
        prompt_text,
    })
}

fn token_id(field: &'static str, id: i64) -> Result<u32, RequestError> {
    u32::try_from(id).map_err(|_| invalid(field, id, "token ids must be >= 0"))
}

/// tensorrtllm's word list `[2, N]`: row 0 the flattened token ids, row 1 the end offset of
/// each word (padded with -1).
fn word_list(t: &Tensor<'_>) -> Result<Vec<Vec<u32>>, RequestError> {
    let v = t.ints()?;
    if v.is_empty() {
        return Ok(vec![]);
    }
    if t.shape.len() != 2 || t.shape[0] != 2 {
        return Err(invalid(
            t.field,
            format!("shape {:?}", t.shape),
            "must be [2, N]: row 0 token ids, row 1 end offsets",
        ));
    }
    let n = t.shape[1].max(0) as usize;
    let (ids, offsets) = v.split_at(n);
    let mut words = Vec::new();
    let mut start = 0usize;
    for &end in offsets.iter().take_while(|&&o| o >= 0) {
        let end = end as usize;
        if end < start || end > n {
            return Err(invalid(
                t.field,
                format!("offset {end}"),
                format!("offsets must be ascending and <= {n}"),
            ));
        }
        if end > start {
            words.push(
                ids[start..end]
                    .iter()
                    .map(|&id| token_id(t.field, id))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
        start = end;
    }
    Ok(words)
}

/// Keys of the vLLM `sampling_parameters` JSON (and of request parameters) ferrum accepts.
const SAMPLING_KEYS: &[&str] = &[
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "stop",
    "stop_token_ids",
    "ignore_eos",
    "logprobs",
    "n",
    "best_of",
];

/// Request-parameter keys that are not sampling settings.
const REQUEST_PARAM_KEYS: &[&str] = &[
    "stream",
    "exclude_input_in_output",
    "apply_chat_template",
    "return_log_probs",
];

fn json_f64(field: &'static str, v: &Value) -> Result<f64, RequestError> {
    v.as_f64()
        .ok_or_else(|| invalid(field, v, "must be a number"))
}

fn json_i64(field: &'static str, v: &Value) -> Result<i64, RequestError> {
    if let Some(i) = v.as_i64() {
        return Ok(i);
    }
    match v.as_f64() {
        Some(x) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(x as i64),
        _ => Err(invalid(field, v, "must be an integer")),
    }
}

fn json_bool(field: &'static str, v: &Value) -> Result<bool, RequestError> {
    match v {
        Value::Bool(b) => Ok(*b),
        Value::String(s) if s.eq_ignore_ascii_case("true") => Ok(true),
        Value::String(s) if s.eq_ignore_ascii_case("false") => Ok(false),
        _ => Err(invalid(field, v, "must be true or false")),
    }
}

/// Applies a JSON object of settings. `lenient`: unknown keys are skipped (request
/// parameters); otherwise they are an error naming the key (`sampling_parameters`).
fn apply_json(
    f: &mut Fields,
    obj: &serde_json::Map<String, Value>,
    source: &'static str,
    lenient: bool,
) -> Result<(), RequestError> {
    for (key, v) in obj {
        if v.is_null() {
            continue;
        }
        let Some(&field) = SAMPLING_KEYS
            .iter()
            .chain(REQUEST_PARAM_KEYS)
            .find(|k| **k == key.as_str())
        else {
            if lenient {
                continue;
            }
            return Err(invalid(
                source,
                format!("unknown key '{key}'"),
                format!("accepted keys: {}", SAMPLING_KEYS.join(", ")),
            ));
        };
        if source == "sampling_parameters" && REQUEST_PARAM_KEYS.contains(&field) {
            return Err(invalid(
                source,
                format!("unknown key '{key}'"),
                format!("accepted keys: {}", SAMPLING_KEYS.join(", ")),
            ));
        }
        match field {
            "max_tokens" => f.max_tokens = Some((field, json_i64(field, v)?)),
            "min_tokens" => f.min_tokens = Some((field, json_i64(field, v)?)),
            "temperature" => f.temperature = Some(json_f64(field, v)?),
            "top_k" => {
                // vLLM: -1 disables top-k.
                let k = json_i64(field, v)?;
                f.top_k = Some((field, if k == -1 { 0 } else { k }));
            }
            "top_p" => f.top_p = Some((field, json_f64(field, v)?)),
            "min_p" => f.min_p = Some(json_f64(field, v)?),
            "repetition_penalty" => f.repetition_penalty = Some(json_f64(field, v)?),
            "presence_penalty" => f.presence_penalty = Some(json_f64(field, v)?),
            "frequency_penalty" => f.frequency_penalty = Some(json_f64(field, v)?),
            "seed" => {
                let s = json_i64(field, v)?;
                f.seed = Some(u64::try_from(s).map_err(|_| invalid(field, s, "must be >= 0"))?);
            }
            "stop" => match v {
                Value::String(s) if s.is_empty() => {}
                Value::String(s) => f.stop_strings.push(s.clone()),
                Value::Array(items) => {
                    for item in items {
                        let s = item.as_str().ok_or_else(|| {
                            invalid(field, item, "stop must be a string or a list of strings")
                        })?;
                        if !s.is_empty() {
                            f.stop_strings.push(s.to_string());
                        }
                    }
                }
                other => {
                    return Err(invalid(
                        field,
                        other,
                        "stop must be a string or a list of strings",
                    ));
                }
            },
            "stop_token_ids" => {
                let items = v
                    .as_array()
                    .ok_or_else(|| invalid(field, v, "must be a list of token ids"))?;
                for item in items {
                    f.stop_token_ids
                        .push(token_id(field, json_i64(field, item)?)?);
                }
            }
            "ignore_eos" => f.ignore_eos = Some(json_bool(field, v)?),
            "logprobs" => f.logprobs = Some(json_i64(field, v)?),
            "n" | "best_of" => {
                let n = json_i64(field, v)?;
                if n != 1 {
                    return Err(invalid(
                        field,
                        n,
                        "must be 1: multiple sequences per request are not supported",
                    ));
                }
            }
            "stream" => f.stream = Some(json_bool(field, v)?),
            "exclude_input_in_output" => f.exclude_input_in_output = Some(json_bool(field, v)?),
            "apply_chat_template" => f.apply_chat_template = Some(json_bool(field, v)?),
            "return_log_probs" => f.return_log_probs = Some(json_bool(field, v)?),
            _ => {}
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn defaults() -> RequestDefaults {
        RequestDefaults {
            max_tokens: 16,
            sampling: SamplingParams::default(),
            exclude_input_in_output: false,
            apply_chat_template: false,
        }
    }

    fn bytes_tensor(name: &str, shape: Vec<i64>, elems: &[&[u8]]) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Bytes,
            shape,
            data: triton_api::serialize_bytes(elems.iter().copied()),
        }
    }

    fn text(s: &str) -> InputTensor {
        bytes_tensor("text_input", vec![1], &[s.as_bytes()])
    }

    fn i32s(name: &str, shape: Vec<i64>, v: &[i32]) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Int32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    fn f32s(name: &str, v: f32) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Fp32,
            shape: vec![1],
            data: v.to_le_bytes().to_vec(),
        }
    }

    fn boolean(name: &str, v: bool) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Bool,
            shape: vec![1],
            data: vec![v as u8],
        }
    }

    fn u64s(name: &str, v: u64) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Uint64,
            shape: vec![1],
            data: v.to_le_bytes().to_vec(),
        }
    }

    fn run(inputs: Vec<InputTensor>) -> Result<ParsedRequest, RequestError> {
        run_with(inputs, vec![], 0, true)
    }

    fn run_with(
        inputs: Vec<InputTensor>,
        params: Vec<(String, ParamValue)>,
        max_batch_size: usize,
        decoupled: bool,
    ) -> Result<ParsedRequest, RequestError> {
        let d = defaults();
        let ctx = ParseContext {
            max_batch_size,
            decoupled,
            max_model_len: 2048,
            defaults: &d,
            tokenizer: None,
        };
        parse(&RawRequest { inputs, params }, &ctx)
    }

    fn err_text(inputs: Vec<InputTensor>) -> String {
        run(inputs).unwrap_err().to_string()
    }

    #[test]
    fn text_interface_with_defaults() {
        let p = run(vec![text("Hello")]).unwrap();
        assert_eq!(p.interface, Interface::Text);
        assert_eq!(p.generate.prompt, Prompt::Text("Hello".into()));
        assert_eq!(p.generate.stop.max_tokens, 16);
        assert!(p.generate.detokenize);
        assert!(!p.stream && !p.exclude_input_in_output && !p.return_log_probs);
        assert_eq!(p.generate.sampling, SamplingParams::default());
    }

    #[test]
    fn ensemble_tensors_map_onto_the_request() {
        let p = run(vec![
            text("Hi"),
            i32s("max_tokens", vec![1], &[5]),
            boolean("stream", true),
            f32s("temperature", 0.7),
            i32s("top_k", vec![1], &[40]),
            f32s("top_p", 0.9),
            f32s("min_p", 0.05),
            f32s("repetition_penalty", 1.1),
            f32s("presence_penalty", 0.5),
            f32s("frequency_penalty", 0.25),
            i32s("min_length", vec![1], &[2]),
            u64s("random_seed", u64::MAX),
            i32s("end_id", vec![1], &[7]),
            i32s("pad_id", vec![1], &[0]),
            bytes_tensor("stop_words", vec![2], &[b"\n\n", b""]),
            bytes_tensor("bad_words", vec![1], &[b""]),
            boolean("return_log_probs", true),
            boolean("exclude_input_in_output", true),
            i32s("beam_width", vec![1], &[1]),
            boolean("ignore_eos", true),
        ])
        .unwrap();
        let s = &p.generate.sampling;
        assert_eq!(
            (s.temperature, s.top_k, s.top_p, s.min_p),
            (0.7, 40, 0.9, 0.05)
        );
        assert_eq!(
            (
                s.repetition_penalty,
                s.presence_penalty,
                s.frequency_penalty
            ),
            (1.1, 0.5, 0.25)
        );
        assert_eq!(s.seed, Some(u64::MAX));
        assert_eq!(s.logprobs, Some(0));
        let st = &p.generate.stop;
        assert_eq!((st.max_tokens, st.min_tokens, st.ignore_eos), (5, 2, true));
        assert_eq!(st.stop_token_ids, vec![7]);
        assert_eq!(st.stop_strings, vec!["\n\n".to_string()]);
        assert!(p.stream && p.exclude_input_in_output && p.return_log_probs);
    }

    #[test]
    fn token_interface_with_batch_dimension() {
        let p = run_with(
            vec![
                i32s("input_ids", vec![1, 4], &[1, 2, 3, 0]),
                i32s("input_lengths", vec![1, 1], &[3]),
                i32s("request_output_len", vec![1, 1], &[9]),
                InputTensor {
                    name: "streaming".into(),
                    dtype: DataType::Bool,
                    shape: vec![1, 1],
                    data: vec![1],
                },
                i32s("runtime_top_k", vec![1, 1], &[3]),
                // stop words: [5] and [6, 7]; offsets [1, 3] padded with -1.
                i32s("stop_words_list", vec![1, 2, 3], &[5, 6, 7, 1, 3, -1]),
            ],
            vec![],
            8,
            true,
        );
        // [6, 7] needs a tokenizer to become a stop string.
        assert_eq!(
            p.unwrap_err(),
            RequestError::NoTokenizer {
                field: "stop_words_list"
            }
        );
        let p = run_with(
            vec![
                i32s("input_ids", vec![1, 4], &[1, 2, 3, 0]),
                i32s("input_lengths", vec![1, 1], &[3]),
                i32s("request_output_len", vec![1, 1], &[9]),
                i32s("stop_words_list", vec![1, 2, 2], &[5, 6, 1, 2]),
                i32s("min_tokens", vec![1, 1], &[1]),
            ],
            vec![],
            8,
            false,
        )
        .unwrap();
        assert_eq!(p.interface, Interface::Tokens);
        assert_eq!(p.generate.prompt, Prompt::TokenIds(vec![1, 2, 3]));
        assert_eq!(p.generate.stop.max_tokens, 9);
        assert_eq!(p.generate.stop.min_tokens, 1);
        assert_eq!(p.generate.stop.stop_token_ids, vec![5, 6]);
        assert!(!p.generate.detokenize);
    }

    #[test]
    fn vllm_sampling_parameters_and_request_parameters() {
        let sp = r#"{"temperature": 0.5, "top_k": -1, "max_tokens": 7, "stop": ["END"], "seed": 3, "ignore_eos": false, "n": 1, "min_p": 0.1, "logprobs": 2}"#;
        let params = vec![
            ("temperature".to_string(), ParamValue::Double(0.9)),
            ("stream".to_string(), ParamValue::Bool(true)),
            (
                "triton_enable_empty_final_response".to_string(),
                ParamValue::Bool(true),
            ),
            ("max_tokens".to_string(), ParamValue::Int(3)),
        ];
        let p = run_with(
            vec![
                text("x"),
                bytes_tensor("sampling_parameters", vec![1], &[sp.as_bytes()]),
            ],
            params,
            0,
            true,
        )
        .unwrap();
        // sampling_parameters wins over request parameters.
        assert_eq!(p.generate.sampling.temperature, 0.5);
        assert_eq!(p.generate.sampling.top_k, 0);
        assert_eq!(p.generate.sampling.min_p, 0.1);
        assert_eq!(p.generate.sampling.seed, Some(3));
        assert_eq!(p.generate.sampling.logprobs, Some(2));
        assert_eq!(p.generate.stop.max_tokens, 7);
        assert_eq!(p.generate.stop.stop_strings, vec!["END".to_string()]);
        assert!(p.stream);
        // Tensors win over sampling_parameters.
        let p = run(vec![
            text("x"),
            i32s("max_tokens", vec![1], &[4]),
            bytes_tensor("sampling_parameters", vec![1], &[sp.as_bytes()]),
        ])
        .unwrap();
        assert_eq!(p.generate.stop.max_tokens, 4);
        // Request parameters alone (the generate endpoint's `parameters` object).
        let p = run_with(
            vec![text("x")],
            vec![
                ("max_tokens".into(), ParamValue::Int(3)),
                ("seed".into(), ParamValue::Int(11)),
            ],
            0,
            false,
        )
        .unwrap();
        assert_eq!(p.generate.stop.max_tokens, 3);
        assert_eq!(p.generate.sampling.seed, Some(11));
    }

    #[test]
    fn bad_inputs_name_field_value_and_bound() {
        let cases: Vec<(Vec<InputTensor>, &[&str])> = vec![
            (vec![], &["text_input", "missing"]),
            (vec![text("")], &["empty"]),
            (
                vec![bytes_tensor("text_input", vec![1], &[b"\xff\xfe"])],
                &["text_input", "UTF-8"],
            ),
            (
                vec![InputTensor {
                    name: "text_input".into(),
                    dtype: DataType::Int32,
                    shape: vec![1],
                    data: vec![0; 4],
                }],
                &["text_input", "TYPE_INT32", "TYPE_STRING"],
            ),
            (
                vec![bytes_tensor("text_input", vec![2], &[b"a", b"b"])],
                &["text_input", "2 elements", "exactly one"],
            ),
            (
                vec![text("x"), i32s("max_tokens", vec![1], &[0])],
                &["max_tokens", "0", "[1, 2047]"],
            ),
            (
                vec![text("x"), i32s("max_tokens", vec![1], &[-3])],
                &["max_tokens", "-3"],
            ),
            (
                vec![text("x"), i32s("max_tokens", vec![1], &[5000])],
                &["max_tokens", "5000", "context"],
            ),
            (vec![text("x"), f32s("top_p", 0.0)], &["top_p", "(0, 1]"]),
            (
                vec![text("x"), f32s("runtime_top_p", 1.5)],
                &["runtime_top_p", "1.5"],
            ),
            (
                vec![text("x"), f32s("temperature", -1.0)],
                &["temperature", "-1"],
            ),
            (
                vec![text("x"), i32s("beam_width", vec![1], &[4])],
                &["beam_width", "4", "must be 1"],
            ),
            (
                vec![
                    text("x"),
                    bytes_tensor("sampling_parameters", vec![1], &[br#"{"temprature": 1}"#]),
                ],
                &["sampling_parameters", "temprature"],
            ),
            (
                vec![
                    text("x"),
                    bytes_tensor("sampling_parameters", vec![1], &[b"{oops"]),
                ],
                &["sampling_parameters", "JSON"],
            ),
            (
                vec![
                    text("x"),
                    bytes_tensor("sampling_parameters", vec![1], &[br#"{"n": 2}"#]),
                ],
                &["'n'", "2"],
            ),
            (
                vec![text("x"), i32s("input_ids", vec![1], &[1])],
                &["input_ids", "text_input"],
            ),
            (vec![i32s("input_ids", vec![0], &[])], &["empty"]),
            (
                vec![i32s("input_ids", vec![2], &[1, -5])],
                &["input_ids", "-5"],
            ),
            (
                vec![text("x"), bytes_tensor("bad_words", vec![1], &[b"no"])],
                &["bad_words", "not supported"],
            ),
            (
                vec![text("x"), i32s("min_tokens", vec![1], &[-1])],
                &["min_tokens", "-1"],
            ),
            (
                vec![
                    text("x"),
                    i32s("max_tokens", vec![1], &[2]),
                    i32s("min_tokens", vec![1], &[3]),
                ],
                &["min_tokens", "3"],
            ),
            (
                vec![text("x"), i32s("unknown_thing", vec![1], &[1])],
                &["unknown_thing"],
            ),
        ];
        for (inputs, needles) in cases {
            let names: Vec<String> = inputs.iter().map(|t| t.name.clone()).collect();
            let e = err_text(inputs);
            for n in needles {
                assert!(e.contains(n), "{names:?}: '{e}' lacks '{n}'");
            }
        }
    }

    #[test]
    fn stream_needs_a_decoupled_model_and_batch_must_be_one() {
        let e = run_with(vec![text("x"), boolean("stream", true)], vec![], 0, false)
            .unwrap_err()
            .to_string();
        assert!(e.contains("stream") && e.contains("decoupled"), "{e}");
        let e = run_with(
            vec![bytes_tensor("text_input", vec![2, 1], &[b"a", b"b"])],
            vec![],
            8,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("text_input") && e.contains("batch size 2"),
            "{e}"
        );
        // Unbatched model: a [1, 1] tensor is fine for a scalar.
        assert!(run(vec![bytes_tensor("text_input", vec![1, 1], &[b"a"])]).is_ok());
    }

    #[test]
    fn chat_template_without_tokenizer_is_a_clear_error() {
        let e = run(vec![text("x"), boolean("apply_chat_template", true)]).unwrap_err();
        assert_eq!(
            e,
            RequestError::NoTokenizer {
                field: "apply_chat_template"
            }
        );
    }

    #[test]
    fn every_declared_input_is_handled() {
        // Each declared input must be accepted by the parser (no "not an input" error).
        for s in INPUTS {
            let t = match s.dtype {
                DataType::Bytes => bytes_tensor(s.name, vec![1], &[b"{}"]),
                DataType::Int32 if s.dims.len() == 2 => i32s(s.name, vec![2, 0], &[]),
                DataType::Int32 => i32s(s.name, vec![1], &[1]),
                DataType::Fp32 => f32s(s.name, 0.5),
                DataType::Bool => boolean(s.name, false),
                DataType::Uint64 => u64s(s.name, 1),
                other => panic!("unexpected dtype {other:?}"),
            };
            let mut inputs = vec![t];
            if s.name != "text_input" && s.name != "input_ids" {
                inputs.push(text("x"));
            }
            if let Err(e) = run(inputs) {
                assert!(!e.to_string().contains("not an input"), "{}: {e}", s.name);
            }
        }
    }
}
