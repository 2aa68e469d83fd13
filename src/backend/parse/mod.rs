//! Request parsing: the tensors and parameters of one Triton request → a validated
//! `GenerateRequest` plus how to answer it (`ParsedRequest`). Pure code over copied data
//! (`RawRequest`), so every rule is unit-tested without a server.
//!
//! Accepted interfaces: the union of tensorrtllm_backend's text (`ensemble`) and token
//! (`tensorrt_llm`) interfaces, and Triton's vLLM backend interface (`sampling_parameters` JSON).
//! `FIELDS` is the one list of what a request may carry: for each field, the tensors (name,
//! aliases, dtype, dims: `INPUTS` is built from it), the JSON keys, and how its value is read and
//! where it is stored. Old and new names are both accepted (`random_seed`/`seed`,
//! `min_length`/`min_tokens`). Precedence for a setting given more than once: tensor >
//! `sampling_parameters` JSON > request parameter > model default; `parse` starts from the
//! defaults and applies the sources in the reverse order, each overwriting the last (stop strings
//! and stop ids accumulate instead). A value that cannot be read fails wherever it is given;
//! ranges are checked once every source is in, on the winning value only. Every error names the
//! field, the value and the bound. This module must never call Triton or the engine.
//!
//! Three files: `fields` (the table, `INPUTS`/`OUTPUTS`, and how each field is read), `tensor`
//! (reading a value from a tensor or a JSON key) and this one (the public types, `parse`, and
//! `Draft::finish`, which builds and checks the request once every source is in).
//! `frontend_tests` replays the requests of Triton's OpenAI frontend and of TensorRT-LLM's
//! llmapi model.

mod fields;
#[cfg(test)]
mod frontend_tests;
mod tensor;

use serde_json::Value;
use triton_api::{InputTensor, ParamValue};

use crate::config::RequestDefaults;
use crate::request::{
    GenerateRequest, ModelInfo, Prompt, QueueParams, RequestError, RequestSpec, SamplingParams,
    StopCriteria,
};
use crate::tokenizer::ChatMessage;
use fields::{FIELDS, Field, Kind, find};
pub use fields::{INPUTS, OUTPUTS, TensorSpec};
use tensor::{Given, Tensor};

/// One request's inputs and parameters, copied out of Triton.
#[derive(Debug, Clone, Default)]
pub struct RawRequest {
    /// Every input tensor the request carries, data copied (shape with any batch dimension).
    pub inputs: Vec<InputTensor>,
    /// The request's parameters (key, value); keys that name no field are ignored by `parse`.
    pub params: Vec<(String, ParamValue)>,
}

/// What parsing needs to know about the model.
pub struct ParseContext<'a> {
    /// > 0: every tensor carries a leading batch dimension (which must be 1).
    pub max_batch_size: usize,
    /// The model is decoupled (`model_transaction_policy { decoupled: true }`); `stream` needs it.
    pub decoupled: bool,
    /// What the request is validated against (`GenerateRequest::new`): vocabulary, context,
    /// tokenizer (also for decoding multi-token stop words; None: text fields fail with
    /// `RequestError::NoTokenizer`).
    pub model: &'a ModelInfo,
    /// What a request gets for the fields it leaves out (the model's `default_*` keys).
    pub defaults: &'a RequestDefaults,
    /// Request parameters ferrum ignores besides Triton's `triton_*` keys (the model's
    /// `ignored_request_parameters`, e.g. HTTP headers Triton forwards as parameters); any other
    /// unknown parameter is an error.
    pub ignored_parameters: &'a [String],
}

/// Which tensors carry the prompt and the answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interface {
    /// `text_input` → `text_output`.
    Text,
    /// `input_ids` → `output_ids` + `sequence_length`.
    Tokens,
}

/// A validated request plus how to answer it; goes to the responder with its `Job`.
#[derive(Debug, Clone)]
pub struct ParsedRequest {
    /// What the engine runs; `detokenize` is set for the text interface and whenever stop
    /// strings are given.
    pub generate: GenerateRequest,
    /// Which tensor carried the prompt, hence which carry the answer.
    pub interface: Interface,
    /// Send each delta as its own response (decoupled models only).
    pub stream: bool,
    /// Leave the prompt out of non-streaming outputs.
    pub exclude_input_in_output: bool,
    /// Which optional outputs the responses carry (`generate.sampling.logprobs` is Some
    /// whenever one of them needs log-probabilities).
    pub outputs: OutputSelection,
    /// The prompt text as sent (prepended to `text_output` when the input is not excluded).
    pub prompt_text: Option<String>,
}

/// The optional outputs of a request's responses, each set by a `return_*` input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputSelection {
    /// `finish_reason` on the last response (`return_finish_reason`; default on).
    pub finish_reason: bool,
    /// `num_input_tokens` on every response (`return_num_input_tokens`; default on).
    pub num_input_tokens: bool,
    /// `num_output_tokens` on every response: the tokens that response covers, so a stream's
    /// values add up to the total (`return_num_output_tokens`; default on).
    pub num_output_tokens: bool,
    /// tensorrtllm's `cum_log_probs` and `output_log_probs`: set by `return_log_probs` or by a
    /// `logprobs` count.
    pub log_probs: bool,
    /// The vLLM backend's `logprobs` JSON (`return_logprobs`).
    pub logprobs_json: bool,
    /// `cumulative_logprob`, the sum of the generated tokens' logprobs so far
    /// (`return_cumulative_logprob`, vLLM backend and llmapi).
    pub cumulative_logprob: bool,
}

impl Default for OutputSelection {
    fn default() -> Self {
        OutputSelection {
            finish_reason: true,
            num_input_tokens: true,
            num_output_tokens: true,
            log_probs: false,
            logprobs_json: false,
            cumulative_logprob: false,
        }
    }
}

/// A request's settings while its sources are applied: starts at the model defaults, and each
/// source's setters overwrite what it carries. Values whose bounds depend on the other sources
/// or need the name the client used stay raw (`(name, value)`) until `finish` checks them.
#[derive(Default)]
struct Draft {
    text: Option<String>,
    input_ids: Option<Vec<i64>>,
    input_lengths: Option<i64>,
    /// None: the model's `default_max_tokens`, capped to fit the context.
    max_tokens: Option<(&'static str, i64)>,
    min_tokens: (&'static str, i64),
    top_k: Option<(&'static str, i64)>,
    top_p: Option<(&'static str, f64)>,
    logprobs: Option<(&'static str, i64)>,
    /// Final but for `top_k`, `top_p` and `logprobs`, which `finish` fills.
    sampling: SamplingParams,
    /// Final but for `max_tokens` and `min_tokens`, which `finish` fills.
    stop: StopCriteria,
    stream: bool,
    exclude_input_in_output: bool,
    apply_chat_template: bool,
    return_log_probs: bool,
    /// `log_probs` is derived in `finish`; the other flags are final.
    outputs: OutputSelection,
    /// The priority as the client sent it, and which order it is in.
    priority: Option<(&'static str, i64, PriorityOrder)>,
    /// Microseconds, as sent.
    queue_timeout: Option<(&'static str, i64)>,
    /// Bad words as text, tokenized by `finish` (`bad_words_list` ids go straight to
    /// `sampling.bad_words`).
    bad_words: Vec<(String, BadWordForm)>,
    /// Each field read and the name it came under, in the order applied (the last one of a
    /// field is the value that counts): errors of `GenerateRequest::new` name the field as the
    /// client did.
    used: Vec<(&'static Field, &'static str)>,
}

/// How a bad word given as text becomes token sequences.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BadWordForm {
    /// Tokenized as written (tensorrtllm's `bad_words` tensor, as its preprocessing does).
    AsWritten,
    /// Tokenized as written without leading spaces, and again after one space, so the word is
    /// banned at the start of the text and inside it (vLLM's `bad_words` sampling parameter).
    AlsoAfterSpace,
}

/// The token sequences of the bad words given as text (without special tokens; duplicates and
/// words that tokenize to nothing dropped).
fn tokenize_bad_words(
    words: &[(String, BadWordForm)],
    model: &ModelInfo,
) -> Result<Vec<Vec<u32>>, RequestError> {
    if words.is_empty() {
        return Ok(vec![]);
    }
    let tok = model
        .tokenizer
        .as_deref()
        .ok_or(RequestError::NoTokenizer { field: "bad_words" })?;
    let encode = |s: &str| {
        tok.encode(s, false)
            .map_err(|e| RequestError::Tokenizer(e.to_string()))
    };
    let mut out: Vec<Vec<u32>> = Vec::new();
    for (word, form) in words {
        let forms = match form {
            BadWordForm::AsWritten => vec![encode(word)?],
            BadWordForm::AlsoAfterSpace => {
                let bare = word.trim_start();
                vec![encode(bare)?, encode(&format!(" {bare}"))?]
            }
        };
        for ids in forms {
            if !ids.is_empty() && !out.contains(&ids) {
                out.push(ids);
            }
        }
    }
    Ok(out)
}

/// Which way a client's `priority` value reads.
#[derive(Debug, Clone, Copy)]
enum PriorityOrder {
    /// Higher is scheduled first: the `priority` tensor and request parameter (the order the
    /// engine uses, as TensorRT-LLM's).
    HigherFirst,
    /// Lower is scheduled first: `priority` in `sampling_parameters` (vLLM's order).
    LowerFirst,
}

impl PriorityOrder {
    /// The engine's level (higher first) for a value checked to fit an i32, or the error naming
    /// the range and the order.
    fn level(self, name: &'static str, value: i64) -> Result<i64, RequestError> {
        let order = match self {
            PriorityOrder::HigherFirst => "higher is scheduled first",
            PriorityOrder::LowerFirst => {
                "in sampling_parameters, vLLM's order: lower is scheduled first"
            }
        };
        if i32::try_from(value).is_err() {
            return Err(invalid(
                name,
                value,
                format!("must be in [{}, {}]; {order}", i32::MIN, i32::MAX),
            ));
        }
        Ok(match self {
            PriorityOrder::HigherFirst => value,
            PriorityOrder::LowerFirst => -value,
        })
    }
}

fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    bound: impl Into<String>,
) -> RequestError {
    RequestError::invalid(field, value, bound)
}

/// The error for request parameter `key` that names no field: the closest known name when one is
/// near (at most a third of the name's characters edited), then every known name.
fn unknown_parameter(key: &str) -> RequestError {
    let known: Vec<&str> = FIELDS
        .iter()
        .filter(|f| !matches!(f.kind, Kind::Unsupported(_)))
        .flat_map(|f| f.keys.in_parameters())
        .copied()
        .collect();
    // A tensor name sent as a parameter (`random_seed`): the same field's parameter name.
    let same_field = FIELDS
        .iter()
        .find(|f| f.tensors.contains(&key))
        .and_then(|f| f.keys.in_parameters().first().copied());
    let closest = same_field.or_else(|| {
        known
            .iter()
            .map(|&k| (edit_distance(key, k), k))
            .filter(|&(d, k)| d <= k.len().max(key.len()) / 3)
            .min()
            .map(|(_, k)| k)
    });
    let hint = match closest {
        Some(k) => format!("did you mean '{k}'? "),
        None => String::new(),
    };
    invalid(
        "parameters",
        format!("unknown key '{key}'"),
        format!(
            "{hint}ferrum's request parameters: {} (and Triton's triton_* keys; a model can ignore \
             others with ignored_request_parameters)",
            known.join(", ")
        ),
    )
}

/// Levenshtein distance between `a` and `b` (characters).
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != cb)).min(row[j] + 1).min(cur + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// Parses and validates one request.
pub fn parse(raw: &RawRequest, ctx: &ParseContext<'_>) -> Result<ParsedRequest, RequestError> {
    let mut d = Draft::new(ctx.defaults);
    let tokenizer = ctx.model.tokenizer.as_deref();

    // 1. Request parameters (the generate endpoint turns every JSON key that is not an input into
    //    one). A key that names no field is an error (a misspelt `max_token` must not silently
    //    generate the default length), except Triton's own `triton_*` keys and the model's
    //    `ignored_request_parameters`.
    for (key, v) in &raw.params {
        let Some((field, key)) = find(key, |f| f.keys.in_parameters()) else {
            if key.starts_with("triton_") || ctx.ignored_parameters.iter().any(|k| k == key) {
                continue;
            }
            return Err(unknown_parameter(key));
        };
        let v = match v {
            ParamValue::String(s) => Value::String(s.clone()),
            ParamValue::Int(i) => Value::from(*i),
            ParamValue::Bool(b) => Value::Bool(*b),
            ParamValue::Double(d) => Value::from(*d),
            ParamValue::Bytes => {
                return Err(invalid(
                    key,
                    "a bytes parameter",
                    "must be a string, number or bool",
                ));
            }
        };
        field.read(Given::Json(key, &v), &mut d, tokenizer)?;
    }

    // 2. Tensors, in two passes: `sampling_parameters` first (any other tensor outranks its
    //    keys), then the others.
    for json_pass in [true, false] {
        for t in &raw.inputs {
            let found = find(&t.name, |f| f.tensors);
            if found.is_some_and(|(f, _)| matches!(f.kind, Kind::SamplingParameters)) != json_pass {
                continue;
            }
            let name = found.map_or("input", |(_, name)| name);
            let tensor = Tensor::new(t, name, ctx.max_batch_size)?;
            let Some((field, _)) = found else {
                return Err(invalid(
                    "input",
                    format!("'{}'", t.name),
                    "not an input ferrum accepts (see docs/configuration.md)",
                ));
            };
            field.read(Given::Tensor(&tensor), &mut d, tokenizer)?;
        }
    }
    d.finish(ctx)
}

impl Draft {
    fn new(defaults: &RequestDefaults) -> Self {
        Draft {
            min_tokens: ("min_tokens", 0),
            sampling: defaults.sampling.clone(),
            exclude_input_in_output: defaults.exclude_input_in_output,
            apply_chat_template: defaults.apply_chat_template,
            ..Draft::default()
        }
    }

    /// Builds the prompt, converts what the client sent to the request's types and hands the
    /// rest of the checking to `GenerateRequest::new` (tokenization, vocabulary, context, every
    /// bound), whose errors are renamed to the names the client used.
    fn finish(mut self, ctx: &ParseContext<'_>) -> Result<ParsedRequest, RequestError> {
        let (interface, prompt, prompt_text) = match (self.text.take(), self.input_ids.take()) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "input_ids",
                    "given together with text_input",
                    "send either text_input or input_ids",
                ));
            }
            (Some(text), None) => {
                let prompt = if self.apply_chat_template {
                    Prompt::Chat(vec![ChatMessage::new("user", text.clone())])
                } else {
                    Prompt::Text(text.clone())
                };
                (Interface::Text, prompt, Some(text))
            }
            (None, Some(mut ids)) => {
                if let Some(len) = self.input_lengths {
                    if len < 0 || len as usize > ids.len() {
                        return Err(invalid(
                            "input_lengths",
                            len,
                            format!("must be in [0, {}] (the length of input_ids)", ids.len()),
                        ));
                    }
                    ids.truncate(len as usize);
                }
                let ids = ids
                    .into_iter()
                    .map(|id| token_id("input_ids", id))
                    .collect::<Result<Vec<_>, _>>()?;
                (Interface::Tokens, Prompt::TokenIds(ids), None)
            }
            (None, None) => {
                return Err(invalid(
                    "text_input",
                    "missing",
                    "a request needs text_input (BYTES) or input_ids (INT32)",
                ));
            }
        };

        if self.stream && !ctx.decoupled {
            return Err(invalid(
                "stream",
                "true",
                "streaming needs a decoupled model (model_transaction_policy { decoupled: true }); use stream=false",
            ));
        }
        // Conversions to the request's unsigned types; every range is GenerateRequest::new's.
        // A default that does not fit a short context is capped; a client's value is checked.
        let max_tokens = match self.max_tokens {
            None => ctx
                .defaults
                .max_tokens
                .min(ctx.model.max_model_len.saturating_sub(1)),
            Some((name, n)) => usize::try_from(n).map_err(|_| {
                invalid(
                    name,
                    n,
                    crate::request::max_tokens_bound(ctx.model.max_model_len),
                )
            })?,
        };
        let (min_name, min_tokens) = self.min_tokens;
        let min_tokens = usize::try_from(min_tokens)
            .map_err(|_| invalid(min_name, min_tokens, "must be >= 0"))?;
        if let Some((name, k)) = self.top_k {
            self.sampling.top_k = usize::try_from(k)
                .map_err(|_| invalid(name, k, "must be >= 0 (0 disables top-k)"))?;
        }
        // A `logprobs` count sets how many alternatives each token reports; any output that
        // needs logprobs turns them on (with none).
        self.outputs.log_probs = self.return_log_probs || self.logprobs.is_some();
        let needs_logprobs =
            self.outputs.log_probs || self.outputs.logprobs_json || self.outputs.cumulative_logprob;
        self.sampling.logprobs = match self.logprobs {
            Some((name, n)) => {
                Some(usize::try_from(n).map_err(|_| invalid(name, n, "must be >= 0"))?)
            }
            None => needs_logprobs.then_some(0),
        };
        // The JSON names each token by its text.
        if self.outputs.logprobs_json && ctx.model.tokenizer.is_none() {
            return Err(RequestError::NoTokenizer {
                field: "return_logprobs",
            });
        }
        if let Some((_, p)) = self.top_p {
            self.sampling.top_p = p as f32;
        }
        self.stop.max_tokens = max_tokens;
        self.stop.min_tokens = min_tokens;
        let text_bad_words = tokenize_bad_words(&self.bad_words, ctx.model)?;
        for ids in text_bad_words {
            if !self.sampling.bad_words.contains(&ids) {
                self.sampling.bad_words.push(ids);
            }
        }
        let detokenize = interface == Interface::Text || !self.stop.stop_strings.is_empty();
        let queue = QueueParams {
            priority: match self.priority {
                Some((name, value, order)) => order.level(name, value)?,
                None => 0,
            },
            queue_timeout: match self.queue_timeout {
                Some((name, us)) => Some(queue_timeout(name, us)?),
                None => None,
            },
        };
        let spec = RequestSpec {
            prompt,
            sampling: self.sampling,
            stop: self.stop,
            detokenize,
            queue,
        };
        let used = self.used;
        let generate = GenerateRequest::new(spec, ctx.model).map_err(|e| match e {
            RequestError::InvalidValue {
                field,
                value,
                bound,
            } => RequestError::InvalidValue {
                field: client_name(&used, field),
                value,
                bound,
            },
            e => e,
        })?;
        Ok(ParsedRequest {
            interface,
            stream: self.stream,
            exclude_input_in_output: self.exclude_input_in_output,
            outputs: self.outputs,
            prompt_text,
            generate,
        })
    }
}

/// The name the client gave the field that `canonical` names (its last use, which is the value
/// that counts); `canonical` itself when the client did not send it under another name.
fn client_name(used: &[(&'static Field, &'static str)], canonical: &'static str) -> &'static str {
    used.iter()
        .rev()
        .find(|(f, _)| {
            f.tensors.contains(&canonical) || f.keys.in_parameters().contains(&canonical)
        })
        .map_or(canonical, |&(_, name)| name)
}

/// A request's `queue_timeout_microseconds`: 1 µs to an hour.
fn queue_timeout(name: &'static str, us: i64) -> Result<std::time::Duration, RequestError> {
    let max = crate::config::MAX_QUEUE_TIMEOUT_MICROSECONDS;
    match u64::try_from(us) {
        Ok(n) if (1..=max).contains(&n) => Ok(std::time::Duration::from_micros(n)),
        _ => Err(invalid(
            name,
            us,
            format!(
                "must be in [1, {max}] microseconds (leave it out for the model's \
                 queue_timeout_microseconds)"
            ),
        )),
    }
}

fn token_id(field: &'static str, id: i64) -> Result<u32, RequestError> {
    u32::try_from(id).map_err(|_| invalid(field, id, "token ids must be >= 0"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::fields::{FIELDS, Keys};
    use super::*;
    use crate::tokenizer::Tokenizer;
    use triton_api::DataType;

    pub(super) fn defaults() -> RequestDefaults {
        RequestDefaults {
            max_tokens: 16,
            sampling: SamplingParams::default(),
            exclude_input_in_output: false,
            apply_chat_template: false,
        }
    }

    pub(super) fn bytes_tensor(name: &str, shape: Vec<i64>, elems: &[&[u8]]) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Bytes,
            shape,
            data: triton_api::serialize_bytes(elems.iter().copied()),
        }
    }

    pub(super) fn text(s: &str) -> InputTensor {
        bytes_tensor("text_input", vec![1], &[s.as_bytes()])
    }

    pub(super) fn i32s(name: &str, shape: Vec<i64>, v: &[i32]) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Int32,
            shape,
            data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }

    pub(super) fn f32s(name: &str, v: f32) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Fp32,
            shape: vec![1],
            data: v.to_le_bytes().to_vec(),
        }
    }

    pub(super) fn boolean(name: &str, v: bool) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Bool,
            shape: vec![1],
            data: vec![v as u8],
        }
    }

    pub(super) fn u64s(name: &str, v: u64) -> InputTensor {
        InputTensor {
            name: name.into(),
            dtype: DataType::Uint64,
            shape: vec![1],
            data: v.to_le_bytes().to_vec(),
        }
    }

    pub(super) fn run(inputs: Vec<InputTensor>) -> Result<ParsedRequest, RequestError> {
        run_with(inputs, vec![], 0, true)
    }

    /// The tiny BPE tokenizer of tests/fixtures (400 ids, with a chat template).
    pub(super) fn tokenizer() -> std::sync::Arc<Tokenizer> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizer/hf_tiny");
        std::sync::Arc::new(Tokenizer::from_hf_dir(&dir).unwrap().unwrap())
    }

    /// A model of 2048 tokens of context with the fixture tokenizer (None: no tokenizer).
    pub(super) fn model(tokenizer: Option<std::sync::Arc<Tokenizer>>) -> ModelInfo {
        ModelInfo {
            vocab_size: 400,
            max_model_len: 2048,
            eos_token_ids: vec![],
            tokenizer,
            bans_words: true,
        }
    }

    pub(super) fn run_with(
        inputs: Vec<InputTensor>,
        params: Vec<(String, ParamValue)>,
        max_batch_size: usize,
        decoupled: bool,
    ) -> Result<ParsedRequest, RequestError> {
        run_on(
            &model(Some(tokenizer())),
            inputs,
            params,
            max_batch_size,
            decoupled,
        )
    }

    pub(super) fn run_on(
        model: &ModelInfo,
        inputs: Vec<InputTensor>,
        params: Vec<(String, ParamValue)>,
        max_batch_size: usize,
        decoupled: bool,
    ) -> Result<ParsedRequest, RequestError> {
        let d = defaults();
        let ctx = ParseContext {
            max_batch_size,
            decoupled,
            model,
            defaults: &d,
            ignored_parameters: &["x-request-id".to_string()],
        };
        parse(&RawRequest { inputs, params }, &ctx)
    }

    pub(super) fn err_text(inputs: Vec<InputTensor>) -> String {
        run(inputs).unwrap_err().to_string()
    }

    #[test]
    fn text_interface_with_defaults() {
        let p = run(vec![text("Hello")]).unwrap();
        assert_eq!(p.interface, Interface::Text);
        // Tokenized here, with the tokenizer's special tokens.
        assert_eq!(
            p.generate.prompt_ids(),
            tokenizer().encode("Hello", true).unwrap()
        );
        assert_eq!(p.prompt_text.as_deref(), Some("Hello"));
        assert_eq!(p.generate.stop().max_tokens, 16);
        assert!(p.generate.detokenize());
        assert!(!p.stream && !p.exclude_input_in_output && !p.outputs.log_probs);
        assert_eq!(*p.generate.sampling(), SamplingParams::default());
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
        let s = &p.generate.sampling();
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
        let st = &p.generate.stop();
        assert_eq!((st.max_tokens, st.min_tokens, st.ignore_eos), (5, 2, true));
        assert_eq!(st.stop_token_ids, vec![7]);
        assert_eq!(st.stop_strings, vec!["\n\n".to_string()]);
        assert!(p.stream && p.exclude_input_in_output && p.outputs.log_probs);
    }

    #[test]
    fn token_interface_with_batch_dimension() {
        let p = run_on(
            &model(None),
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
        assert_eq!(p.generate.prompt_ids(), [1, 2, 3]);
        assert_eq!(p.generate.stop().max_tokens, 9);
        assert_eq!(p.generate.stop().min_tokens, 1);
        assert_eq!(p.generate.stop().stop_token_ids, vec![5, 6]);
        assert!(!p.generate.detokenize());
    }

    #[test]
    fn shapes_whose_byte_count_overflows_are_refused() {
        // Found by the request fuzz target (fuzz/corpus/request/crash-shape-overflow): the
        // shape's element count times the element size wrapped, so a short buffer could pass the
        // size check, and `stop_words_list` then split its ids past their end.
        let fp32 = |name: &str, shape: Vec<i64>| InputTensor {
            name: name.into(),
            dtype: DataType::Fp32,
            shape,
            data: 1.0f32.to_le_bytes().to_vec(),
        };
        let prompt = || i32s("input_ids", vec![1, 2], &[1, 2]);
        for (bad, field) in [
            (i32s("input_ids", vec![1, i64::MAX], &[5, 6]), "input_ids"),
            // [2, 2^61 + 1] INT32 elements are 2^64 + 8 bytes: unchecked, the 8 bytes given.
            (
                i32s("stop_words_list", vec![1, 2, (1 << 61) + 1], &[5, 1]),
                "stop_words_list",
            ),
            (fp32("temperature", vec![1, 1 << 62, 4]), "temperature"),
        ] {
            let inputs = if field == "input_ids" {
                vec![bad]
            } else {
                vec![prompt(), bad]
            };
            let e = run_with(inputs, vec![], 8, true).unwrap_err().to_string();
            assert!(
                e.contains(field) && e.contains("byte count overflows"),
                "{field}: {e}"
            );
        }
        // A shape that fits but does not match the data says how many bytes it needs.
        let e = run_with(
            vec![i32s("input_ids", vec![1, 3], &[1, 2])],
            vec![],
            8,
            true,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("input_ids")
                && e.contains("8 bytes for shape [3]")
                && e.contains("needs 12 bytes"),
            "{e}"
        );
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
        assert_eq!(p.generate.sampling().temperature, 0.5);
        assert_eq!(p.generate.sampling().top_k, 0);
        assert_eq!(p.generate.sampling().min_p, 0.1);
        assert_eq!(p.generate.sampling().seed, Some(3));
        assert_eq!(p.generate.sampling().logprobs, Some(2));
        assert_eq!(p.generate.stop().max_tokens, 7);
        assert_eq!(p.generate.stop().stop_strings, vec!["END".to_string()]);
        assert!(p.stream);
        // Tensors win over sampling_parameters.
        let p = run(vec![
            text("x"),
            i32s("max_tokens", vec![1], &[4]),
            bytes_tensor("sampling_parameters", vec![1], &[sp.as_bytes()]),
        ])
        .unwrap();
        assert_eq!(p.generate.stop().max_tokens, 4);
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
        assert_eq!(p.generate.stop().max_tokens, 3);
        assert_eq!(p.generate.sampling().seed, Some(11));
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
                vec![text("x"), i32s("bad_words_list", vec![2, 2], &[1, 2, 3, 5])],
                &["bad_words_list", "offset 3", "<= 2"],
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
        let inputs = |chat| vec![text("x"), boolean("apply_chat_template", chat)];
        let no_tokenizer = model(None);
        let e = run_on(&no_tokenizer, inputs(true), vec![], 0, true).unwrap_err();
        assert_eq!(
            e,
            RequestError::NoTokenizer {
                field: "apply_chat_template"
            }
        );
        let e = run_on(&no_tokenizer, inputs(false), vec![], 0, true).unwrap_err();
        assert_eq!(
            e,
            RequestError::NoTokenizer {
                field: "text_input"
            }
        );
    }

    #[test]
    fn the_chat_template_is_applied_once_and_encoded_without_added_specials() {
        let tok = tokenizer();
        let rendered = tok
            .apply_chat_template(&[ChatMessage::new("user", "Hi there")], true)
            .unwrap();
        let p = run(vec![text("Hi there"), boolean("apply_chat_template", true)]).unwrap();
        assert_eq!(
            p.generate.prompt_ids(),
            tok.encode(&rendered, false).unwrap()
        );
        // The answer echoes the text as sent, not the rendered template.
        assert_eq!(p.prompt_text.as_deref(), Some("Hi there"));
    }

    #[test]
    fn the_default_max_tokens_is_capped_to_fit_the_context_and_a_clients_value_is_not() {
        let short = ModelInfo {
            max_model_len: 8,
            ..model(Some(tokenizer()))
        };
        let p = run_on(&short, vec![text("x")], vec![], 0, true).unwrap();
        assert_eq!(p.generate.stop().max_tokens, 7);
        let e = run_on(
            &short,
            vec![text("x"), i32s("max_tokens", vec![1], &[8])],
            vec![],
            0,
            true,
        )
        .unwrap_err();
        assert!(e.to_string().contains("[1, 7]"), "{e}");
    }

    #[test]
    fn an_unknown_request_parameter_is_an_error_naming_it_and_the_closest_name() {
        let with =
            |key: &str, v: ParamValue| run_with(vec![text("x")], vec![(key.into(), v)], 0, true);
        let e = with("max_token", ParamValue::Int(3))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'max_token'") && e.contains("did you mean 'max_tokens'"),
            "{e}"
        );
        let e = with("temprature", ParamValue::Double(0.5))
            .unwrap_err()
            .to_string();
        assert!(e.contains("did you mean 'temperature'"), "{e}");
        let e = with("frobnicate", ParamValue::Bool(true))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("'frobnicate'") && !e.contains("did you mean"),
            "{e}"
        );
        assert!(
            e.contains("max_tokens") && e.contains("ignored_request_parameters"),
            "{e}"
        );
        // Triton's own keys and the model's ignored ones pass; a known key still works.
        with("triton_enable_empty_final_response", ParamValue::Bool(true)).unwrap();
        with("x-request-id", ParamValue::String("abc".into())).unwrap();
        let p = with("max_tokens", ParamValue::Int(3)).unwrap();
        assert_eq!(p.generate.stop().max_tokens, 3);
        // A known key with a bytes value is refused, not skipped.
        let e = with("max_tokens", ParamValue::Bytes)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_tokens") && e.contains("bytes"), "{e}");
    }

    #[test]
    fn stop_token_ids_as_a_request_parameter_take_one_id_or_a_list_in_a_string() {
        let ids = |v: ParamValue| {
            run_with(vec![text("x")], vec![("stop_token_ids".into(), v)], 0, true)
                .map(|p| p.generate.stop().stop_token_ids.clone())
        };
        assert_eq!(ids(ParamValue::String("[5, 6]".into())).unwrap(), [5, 6]);
        assert_eq!(ids(ParamValue::String("5, 6".into())).unwrap(), [5, 6]);
        assert_eq!(ids(ParamValue::Int(7)).unwrap(), [7]);
        let e = ids(ParamValue::String("five".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("stop_token_ids") && e.contains("five"), "{e}");
        let e = ids(ParamValue::String("[5, -1]".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("-1"), "{e}");
    }

    #[test]
    fn edit_distance_counts_insertions_deletions_and_substitutions() {
        assert_eq!(edit_distance("max_token", "max_tokens"), 1);
        assert_eq!(edit_distance("temprature", "temperature"), 1);
        assert_eq!(edit_distance("top_k", "top_p"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn model_rules_name_the_field_as_the_client_sent_it() {
        // Out of the vocabulary (400 ids) and too long for the context: GenerateRequest::new.
        let e = run(vec![i32s("input_ids", vec![2], &[1, 400])]).unwrap_err();
        assert!(e.to_string().contains("400"), "{e}");
        let long = vec![1; 2048];
        let e = run(vec![i32s("input_ids", vec![2048], &long)]).unwrap_err();
        assert!(matches!(e, RequestError::PromptTooLong { .. }), "{e}");
        // The same bound under an alias is reported under the alias.
        for name in ["max_tokens", "request_output_len"] {
            let e = err_text(vec![text("x"), i32s(name, vec![1], &[2048])]);
            assert!(
                e.contains(&format!("'{name}'")) && e.contains("[1, 2047]"),
                "{e}"
            );
        }
        let e = err_text(vec![text("x"), f32s("runtime_top_p", 0.0)]);
        assert!(e.contains("'runtime_top_p'") && e.contains("(0, 1]"), "{e}");
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
                DataType::Fp16 => InputTensor {
                    name: s.name.into(),
                    dtype: DataType::Fp16,
                    shape: vec![1, 1],
                    data: vec![0, 0],
                },
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

    // ---- the table ------------------------------------------------------------------------------

    /// Where a test gives a value; in precedence order, lowest first.
    #[derive(Debug, Clone, Copy)]
    enum Src {
        Param(&'static str),
        Json(&'static str),
        Tensor(&'static str),
    }

    impl Src {
        fn rank(self) -> u8 {
            match self {
                Src::Param(_) => 0,
                Src::Json(_) => 1,
                Src::Tensor(_) => 2,
            }
        }
        fn name(self) -> &'static str {
            match self {
                Src::Param(n) | Src::Json(n) | Src::Tensor(n) => n,
            }
        }
    }

    /// Every place the table says `f` may be given.
    fn sources(f: &Field) -> Vec<Src> {
        let tensors = f.tensors.iter().map(|&n| Src::Tensor(n));
        let json = f.keys.in_sampling_parameters().iter();
        let params = f.keys.in_parameters().iter();
        tensors
            .chain(json.map(|&k| Src::Json(k)))
            .chain(params.map(|&k| Src::Param(k)))
            .collect()
    }

    /// Two distinct values of a kind (ids: one tensor id, or a one-id JSON list).
    #[derive(Clone, Copy)]
    enum Sample {
        Int(i32),
        Float(f32),
        Bool(bool),
        Seed(u64),
        Text(&'static str),
        Id(i32),
    }

    fn sample(kind: Kind, i: usize) -> Option<Sample> {
        Some(match kind {
            Kind::Int(_) | Kind::IntJsonOff(_) | Kind::MustBeOne(_) => Sample::Int([2, 3][i]),
            Kind::Float(_) => Sample::Float([0.25, 0.5][i]),
            Kind::Bool(_) => Sample::Bool([true, false][i]),
            Kind::Seed(_) => Sample::Seed([5, 6][i]),
            Kind::Strings(_) => Sample::Text(["END", "STOP"][i]),
            Kind::TokenIds(_) => Sample::Id([5, 6][i]),
            _ => return None,
        })
    }

    /// Parses `text_input` plus `f`'s `i`-th sample at each source; None when a source cannot
    /// carry the sample (a list as a request parameter). Errors name the field as `'<name>'`,
    /// so that aliases compare equal.
    fn given(f: &Field, at: &[(Src, usize)]) -> Option<String> {
        let mut inputs = vec![text("x")];
        let mut json = serde_json::Map::new();
        let mut params = vec![];
        for &(src, i) in at {
            let v = sample(f.kind, i)?;
            match src {
                Src::Tensor(name) => {
                    let t = match v {
                        Sample::Int(n) | Sample::Id(n) => i32s(name, vec![1], &[n]),
                        Sample::Float(x) => f32s(name, x),
                        Sample::Bool(b) => boolean(name, b),
                        Sample::Seed(s) => u64s(name, s),
                        Sample::Text(s) => bytes_tensor(name, vec![1], &[s.as_bytes()]),
                    };
                    assert_eq!(t.dtype, f.dtype, "{name}: the kind does not read the dtype");
                    inputs.push(t);
                }
                Src::Json(key) => {
                    let jv = match v {
                        Sample::Int(n) => Value::from(n),
                        Sample::Float(x) => Value::from(x),
                        Sample::Bool(b) => Value::from(b),
                        Sample::Seed(s) => Value::from(s),
                        Sample::Text(s) => Value::from(vec![s]),
                        Sample::Id(n) => Value::from(vec![n]),
                    };
                    json.insert(key.to_string(), jv);
                }
                Src::Param(key) => {
                    let pv = match v {
                        Sample::Int(n) => ParamValue::Int(n.into()),
                        Sample::Float(x) => ParamValue::Double(x.into()),
                        Sample::Bool(b) => ParamValue::Bool(b),
                        Sample::Seed(s) => ParamValue::Int(s as i64),
                        Sample::Text(s) => ParamValue::String(s.into()),
                        Sample::Id(_) => return None,
                    };
                    params.push((key.to_string(), pv));
                }
            }
        }
        if !json.is_empty() {
            let sp = Value::Object(json).to_string();
            inputs.push(bytes_tensor(
                "sampling_parameters",
                vec![1],
                &[sp.as_bytes()],
            ));
        }
        Some(match run_with(inputs, params, 0, true) {
            Ok(p) => format!("{p:?}"),
            Err(e) => at.iter().fold(e.to_string(), |e, (src, _)| {
                e.replace(&format!("'{}'", src.name()), "'<name>'")
            }),
        })
    }

    #[test]
    fn every_name_of_a_field_reads_the_same_value_into_its_own_place() {
        let baseline = format!("{:?}", run(vec![text("x")]).unwrap());
        let mut stored: Vec<(String, Src)> = vec![];
        for f in FIELDS {
            // The sample that differs from the default (the output flags default to on).
            let i = usize::from(
                sources(f)
                    .first()
                    .and_then(|&src| given(f, &[(src, 0)]))
                    .is_some_and(|got| got == baseline),
            );
            let mut first: Option<(Src, String)> = None;
            for src in sources(f) {
                let Some(got) = given(f, &[(src, i)]) else {
                    continue;
                };
                match &first {
                    None => first = Some((src, got)),
                    Some((first_src, want)) => assert_eq!(&got, want, "{src:?} vs {first_src:?}"),
                }
            }
            let Some((src, got)) = first else {
                continue;
            };
            // `pad_id` is unused; `input_lengths` only cuts `input_ids`.
            if matches!(f.tensors, ["pad_id"] | ["input_lengths"]) {
                continue;
            }
            assert_ne!(got, baseline, "{src:?} changes nothing");
            // No two fields store into the same place, but for the two kinds of stop ids.
            if let Some((_, other)) = stored.iter().find(|(s, _)| *s == got) {
                let names = [other.name(), src.name()];
                assert_eq!(names, ["end_id", "stop_token_ids"], "same result");
            }
            stored.push((got, src));
        }
        assert!(stored.len() > 20, "{}", stored.len());
    }

    #[test]
    fn a_field_given_twice_takes_the_source_of_higher_precedence() {
        for f in FIELDS {
            // Stop strings and ids accumulate instead (see the next test); a must-be-one check
            // is made wherever the value is given.
            if matches!(
                f.kind,
                Kind::Strings(_) | Kind::TokenIds(_) | Kind::MustBeOne(_)
            ) {
                continue;
            }
            let sources = sources(f);
            for (lo, hi) in sources
                .iter()
                .flat_map(|&lo| sources.iter().map(move |&hi| (lo, hi)))
            {
                if lo.rank() >= hi.rank() {
                    continue;
                }
                let (Some(both), Some(hi_only), Some(lo_only)) = (
                    given(f, &[(lo, 0), (hi, 1)]),
                    given(f, &[(hi, 1)]),
                    given(f, &[(lo, 0)]),
                ) else {
                    continue;
                };
                assert_ne!(lo_only, hi_only, "{lo:?}/{hi:?}: the samples look alike");
                assert_eq!(both, hi_only, "{lo:?} overrides {hi:?}");
            }
        }
        // Both aliases of one source: the later tensor wins, and errors name it.
        let e = err_text(vec![
            text("x"),
            i32s("max_tokens", vec![1], &[5]),
            i32s("request_output_len", vec![1], &[0]),
        ]);
        assert!(e.contains("'request_output_len': 0"), "{e}");
    }

    #[test]
    fn stop_strings_and_ids_accumulate_across_sources() {
        let sp = r#"{"stop": ["B", ""], "stop_token_ids": [6]}"#;
        let p = run_with(
            vec![
                text("x"),
                bytes_tensor("stop_words", vec![1], &[b"C"]),
                i32s("end_id", vec![1], &[5]),
                i32s("end_id", vec![1], &[-1]),
                bytes_tensor("sampling_parameters", vec![1], &[sp.as_bytes()]),
            ],
            vec![("stop".into(), ParamValue::String("A".into()))],
            0,
            true,
        )
        .unwrap();
        assert_eq!(p.generate.stop().stop_strings, ["A", "B", "C"]);
        assert_eq!(p.generate.stop().stop_token_ids, [6, 5]);
    }

    #[test]
    fn sampling_parameters_keys_and_request_parameters() {
        let sp = |json: &str| bytes_tensor("sampling_parameters", vec![1], &[json.as_bytes()]);
        // The accepted keys, in table order.
        assert_eq!(
            err_text(vec![text("x"), sp(r#"{"temprature": 1}"#)]),
            "invalid value for 'sampling_parameters': unknown key 'temprature' (accepted keys: \
             max_tokens, min_tokens, temperature, top_k, top_p, min_p, repetition_penalty, \
             presence_penalty, frequency_penalty, seed, stop, stop_token_ids, bad_words, \
             ignore_eos, logprobs, n, best_of, priority)"
        );
        // Request-parameter keys and tensor aliases are not sampling_parameters keys.
        for key in ["stream", "streaming", "random_seed"] {
            let e = err_text(vec![text("x"), sp(&format!(r#"{{"{key}": 1}}"#))]);
            assert!(e.contains(&format!("unknown key '{key}'")), "{e}");
        }
        // A null value is skipped, whatever its key.
        assert!(
            run(vec![
                text("x"),
                sp(r#"{"temprature": null, "top_k": null}"#)
            ])
            .is_ok()
        );
        // A tensor alias is not a request parameter (unknown parameters are errors, see
        // an_unknown_request_parameter_is_an_error_naming_it_and_the_closest_name).
        let e = run_with(
            vec![text("x")],
            vec![("random_seed".into(), ParamValue::Int(1))],
            0,
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("'random_seed'") && e.contains("did you mean 'seed'"),
            "{e}"
        );
        let p = run_with(
            vec![text("x")],
            vec![("top_k".into(), ParamValue::Int(-1))],
            0,
            false,
        )
        .unwrap();
        assert_eq!(p.generate.sampling().seed, None);
        // vLLM's -1 (off) holds in JSON, not in a tensor.
        assert_eq!(p.generate.sampling().top_k, 0);
        let e = err_text(vec![text("x"), i32s("top_k", vec![1], &[-1])]);
        assert!(e.contains("'top_k': -1"), "{e}");
    }

    mod bad_words;
    mod queue;

    #[test]
    fn the_table_is_consistent() {
        let tensor_names: Vec<&str> = FIELDS.iter().flat_map(|f| f.tensors).copied().collect();
        let input_names: Vec<&str> = INPUTS.iter().map(|s| s.name).collect();
        assert_eq!(input_names, tensor_names);
        for (i, name) in tensor_names.iter().enumerate() {
            assert!(!tensor_names[..i].contains(name), "tensor {name} twice");
        }
        let keys: Vec<&str> = FIELDS
            .iter()
            .flat_map(|f| f.keys.in_parameters())
            .copied()
            .collect();
        for (i, key) in keys.iter().enumerate() {
            assert!(!keys[..i].contains(key), "key {key} twice");
        }
        for f in FIELDS {
            assert!(!sources(f).is_empty());
            assert_eq!(f.tensors.is_empty(), f.dtype == DataType::Invalid);
            if sample(f.kind, 0).is_none() && !matches!(f.kind, Kind::Unsupported(_)) {
                // Kinds only a tensor carries.
                assert!(matches!(f.keys, Keys::TensorOnly), "{:?}", f.tensors);
            }
        }
    }
}
