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
mod tests;
