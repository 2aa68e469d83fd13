//! The request fields, as one table: every tensor (name, aliases, dtype, dims) and JSON key a
//! request may carry, and how each field's value is read and where it is stored in the `Draft`.
//! `INPUTS` (what autocomplete declares) is built from the table; `OUTPUTS` lists the answer's
//! tensors. Reading a single value out of a tensor or a JSON key is `tensor`'s job; checking the
//! result is `parse`'s.

use serde_json::Value;
use triton_api::DataType;

use super::tensor::{Given, word_list};
use super::{BadWordForm, Draft, PriorityOrder, invalid};
use crate::request::RequestError;
use crate::tokenizer::Tokenizer;

/// An input the backend declares: name, dtype, dims (without the batch dimension).
#[derive(Debug, Clone, Copy)]
pub struct TensorSpec {
    /// The tensor's name in config.pbtxt and in requests.
    pub name: &'static str,
    /// The declared datatype (what autocomplete writes; reading an input may accept more, e.g.
    /// FP64 or an integer for an FP32 number).
    pub dtype: DataType,
    /// Declared dims without the batch dimension; -1 is any length.
    pub dims: &'static [i64],
}

const fn spec(name: &'static str, dtype: DataType, dims: &'static [i64]) -> TensorSpec {
    TensorSpec { name, dtype, dims }
}

/// Every input ferrum accepts, in `FIELDS` order; all optional (a request needs `text_input` or
/// `input_ids`).
pub const INPUTS: &[TensorSpec] = &{
    let mut inputs = [spec("", DataType::Invalid, &[]); NUM_INPUTS];
    let (mut field_idx, mut input_idx) = (0, 0);
    while field_idx < FIELDS.len() {
        let f = &FIELDS[field_idx];
        let mut name_idx = 0;
        while name_idx < f.tensors.len() {
            inputs[input_idx] = spec(f.tensors[name_idx], f.dtype, f.dims);
            input_idx += 1;
            name_idx += 1;
        }
        field_idx += 1;
    }
    inputs
};

const NUM_INPUTS: usize = {
    let (mut num_inputs, mut field_idx) = (0, 0);
    while field_idx < FIELDS.len() {
        num_inputs += FIELDS[field_idx].tensors.len();
        field_idx += 1;
    }
    num_inputs
};

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
    spec("logprobs", DataType::Bytes, &[1]),
    spec("cumulative_logprob", DataType::Fp32, &[1]),
];

/// One setting a request may carry, under every name it goes by.
pub(super) struct Field {
    /// The input tensors that carry it: the canonical name first, then aliases (tensorrtllm's
    /// older names). Empty: no tensor.
    pub(super) tensors: &'static [&'static str],
    /// The tensors' dtype and dims (without the batch dimension).
    pub(super) dtype: DataType,
    dims: &'static [i64],
    pub(super) keys: Keys,
    pub(super) kind: Kind,
}

/// The JSON-style keys that carry a field.
#[derive(Clone, Copy)]
pub(super) enum Keys {
    TensorOnly,
    /// Keys of `sampling_parameters` (vLLM's names), accepted as request parameters as well.
    Sampling(&'static [&'static str]),
    /// Request parameters only: `sampling_parameters` rejects them, as vLLM has no such key.
    Parameter(&'static [&'static str]),
    /// Keys of `sampling_parameters` only, read by vLLM's convention where it differs from the
    /// request parameter of the same name (`priority`).
    SamplingOnly(&'static [&'static str]),
}

/// How a field's value is read from a tensor or a JSON value, and the setter that stores it in
/// the `Draft` (the only place that knows the field's destination). Integer and float setters get
/// the name the value came under: errors on it name what the client sent.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    /// One integer.
    Int(fn(&mut Draft, &'static str, i64)),
    /// One integer, where JSON's -1 means 0 (vLLM's "off"); a tensor's -1 stays, and fails its
    /// bound.
    IntJsonOff(fn(&mut Draft, &'static str, i64)),
    /// One number (a tensor may be FP32, FP64 or an integer type).
    Float(fn(&mut Draft, &'static str, f64)),
    /// One boolean (JSON: also "true"/"false").
    Bool(fn(&mut Draft, bool)),
    /// A seed: a UINT64 tensor is read exactly, anything else must be an integer >= 0.
    Seed(fn(&mut Draft, u64)),
    /// Strings, empty ones dropped: a BYTES tensor, or JSON's string or list of strings.
    Strings(fn(&mut Draft, Vec<String>)),
    /// Token ids: JSON's list, or one tensor id where a negative one means none (`end_id = -1`).
    TokenIds(fn(&mut Draft, Vec<u32>)),
    /// The prompt text: one non-empty string.
    Text(fn(&mut Draft, String)),
    /// Every element of an integer tensor.
    Ints(fn(&mut Draft, Vec<i64>)),
    /// tensorrtllm's `[2, N]` word list: a one-token word is a stop id, a longer one is decoded
    /// into a stop string.
    StopWordList,
    /// tensorrtllm's `[2, N]` word list, as token id sequences.
    WordList(fn(&mut Draft, Vec<Vec<u32>>)),
    /// Accepted only when 1; the bound says why.
    MustBeOne(&'static str),
    /// A feature ferrum does not have (guided decoding, LoRA): refused whenever given, with the
    /// bound saying why. Declared so that a client sending it gets this error rather than
    /// Triton's "unexpected inference input".
    Unsupported(&'static str),
    /// The `sampling_parameters` JSON, whose keys are read as their fields (before every other
    /// tensor, see `parse`).
    SamplingParameters,
}

/// The dtype and dims of a field's tensors.
type TensorType = (DataType, &'static [i64]);
const INT: TensorType = (DataType::Int32, &[1]);
const INTS: TensorType = (DataType::Int32, &[-1]);
const WORD_LIST: TensorType = (DataType::Int32, &[2, -1]);
const FLOAT: TensorType = (DataType::Fp32, &[1]);
const BOOL: TensorType = (DataType::Bool, &[1]);
const U64: TensorType = (DataType::Uint64, &[1]);
const STRING: TensorType = (DataType::Bytes, &[1]);
const STRINGS: TensorType = (DataType::Bytes, &[-1]);
const FP16_MATRIX: TensorType = (DataType::Fp16, &[-1, -1]);
const LORA_CONFIG: TensorType = (DataType::Int32, &[-1, 3]);
const NO_TENSOR: TensorType = (DataType::Invalid, &[]);

const fn field(
    tensors: &'static [&'static str],
    (dtype, dims): TensorType,
    keys: Keys,
    kind: Kind,
) -> Field {
    Field {
        tensors,
        dtype,
        dims,
        keys,
        kind,
    }
}

const NO_GUIDED_DECODING: &str = "guided decoding (structured output, JSON schema, named tool choice) is not supported by ferrum; leave it out";
const NO_LORA: &str = "LoRA adapters are not supported by ferrum; leave it out";

/// Everything a request may carry. The order is that of `INPUTS` and of the keys listed by the
/// error for an unknown `sampling_parameters` key.
#[rustfmt::skip]
pub(super) const FIELDS: &[Field] = {
    use Keys::{Parameter, Sampling, SamplingOnly, TensorOnly};
    use Kind::*;
    &[
    //    tensors: canonical name, aliases          dtype/dims JSON keys
    //        kind: how the value is read, and its setter
    field(&["text_input"],                          STRING,    TensorOnly,
          Text(|d, s| d.text = Some(s))),
    field(&["input_ids"],                           INTS,      TensorOnly,
          Ints(|d, ids| d.input_ids = Some(ids))),
    // The number of valid ids in `input_ids` (the rest is padding).
    field(&["input_lengths"],                       INT,       TensorOnly,
          Int(|d, _, n| d.input_lengths = Some(n))),
    // `sampling_param_*`: the names of TensorRT-LLM's `llmapi` Triton model.
    field(&["max_tokens", "request_output_len", "sampling_param_max_tokens"],
                                                    INT,       Sampling(&["max_tokens"]),
          Int(|d, name, n| d.max_tokens = Some((name, n)))),
    field(&["min_tokens", "min_length"],            INT,       Sampling(&["min_tokens"]),
          Int(|d, name, n| d.min_tokens = (name, n))),
    field(&["stream", "streaming"],                 BOOL,      Parameter(&["stream"]),
          Bool(|d, b| d.stream = b)),
    field(&["temperature", "sampling_param_temperature"],
                                                    FLOAT,     Sampling(&["temperature"]),
          Float(|d, _, v| d.sampling.temperature = v as f32)),
    field(&["top_k", "runtime_top_k", "sampling_param_top_k"],
                                                    INT,       Sampling(&["top_k"]),
          IntJsonOff(|d, name, k| d.top_k = Some((name, k)))),
    field(&["top_p", "runtime_top_p", "sampling_param_top_p"],
                                                    FLOAT,     Sampling(&["top_p"]),
          Float(|d, name, p| d.top_p = Some((name, p)))),
    field(&["min_p"],                               FLOAT,     Sampling(&["min_p"]),
          Float(|d, _, v| d.sampling.min_p = v as f32)),
    field(&["repetition_penalty"],                  FLOAT,     Sampling(&["repetition_penalty"]),
          Float(|d, _, v| d.sampling.repetition_penalty = v as f32)),
    field(&["presence_penalty", "sampling_param_presence_penalty"],
                                                    FLOAT,     Sampling(&["presence_penalty"]),
          Float(|d, _, v| d.sampling.presence_penalty = v as f32)),
    field(&["frequency_penalty", "sampling_param_frequency_penalty"],
                                                    FLOAT,     Sampling(&["frequency_penalty"]),
          Float(|d, _, v| d.sampling.frequency_penalty = v as f32)),
    field(&["seed", "random_seed", "sampling_param_seed"],
                                                    U64,       Sampling(&["seed"]),
          Seed(|d, s| d.sampling.seed = Some(s))),
    field(&["end_id"],                              INT,       TensorOnly,
          TokenIds(|d, ids| d.stop.stop_token_ids.extend(ids))),
    // Accepted and unused.
    field(&["pad_id"],                              INT,       TensorOnly,
          Int(|_, _, _| {})),
    field(&["stop_words", "sampling_param_stop"],   STRINGS,   Sampling(&["stop"]),
          Strings(|d, s| d.stop.stop_strings.extend(s))),
    field(&[],                                      NO_TENSOR, Sampling(&["stop_token_ids"]),
          TokenIds(|d, ids| d.stop.stop_token_ids.extend(ids))),
    // Words never to generate: tensorrtllm's strings (tokenized as written) and word list, and
    // vLLM's strings (tokenized as written and after a space).
    field(&["bad_words"],                           STRINGS,   TensorOnly,
          Strings(|d, s| d.bad_words.extend(s.into_iter().map(|w| (w, BadWordForm::AsWritten))))),
    field(&[],                                      NO_TENSOR, SamplingOnly(&["bad_words"]),
          Strings(|d, s| d.bad_words.extend(s.into_iter().map(|w| (w, BadWordForm::AlsoAfterSpace))))),
    field(&["stop_words_list"],                     WORD_LIST, TensorOnly,
          StopWordList),
    field(&["bad_words_list"],                      WORD_LIST, TensorOnly,
          WordList(|d, words| d.sampling.bad_words.extend(words))),
    field(&["ignore_eos"],                          BOOL,      Sampling(&["ignore_eos"]),
          Bool(|d, b| d.stop.ignore_eos = b)),
    field(&["apply_chat_template"],                 BOOL,      Parameter(&["apply_chat_template"]),
          Bool(|d, b| d.apply_chat_template = b)),
    field(&["return_log_probs"],                    BOOL,      Parameter(&["return_log_probs"]),
          Bool(|d, b| d.return_log_probs = b)),
    field(&["exclude_input_in_output", "sampling_param_exclude_input_from_output"],
                                                    BOOL,      Parameter(&["exclude_input_in_output"]),
          Bool(|d, b| d.exclude_input_in_output = b)),
    // Optional outputs (vLLM backend / llmapi names). The counts and the finish reason are on
    // unless a request turns them off.
    field(&["return_num_input_tokens"],             BOOL,      Parameter(&["return_num_input_tokens"]),
          Bool(|d, b| d.outputs.num_input_tokens = b)),
    field(&["return_num_output_tokens"],            BOOL,      Parameter(&["return_num_output_tokens"]),
          Bool(|d, b| d.outputs.num_output_tokens = b)),
    field(&["return_finish_reason"],                BOOL,      Parameter(&["return_finish_reason"]),
          Bool(|d, b| d.outputs.finish_reason = b)),
    field(&["return_logprobs"],                     BOOL,      Parameter(&["return_logprobs"]),
          Bool(|d, b| d.outputs.logprobs_json = b)),
    field(&["return_cumulative_logprob"],           BOOL,      Parameter(&["return_cumulative_logprob"]),
          Bool(|d, b| d.outputs.cumulative_logprob = b)),
    field(&[],                                      NO_TENSOR, Sampling(&["logprobs"]),
          Int(|d, name, n| d.logprobs = Some((name, n)))),
    field(&["beam_width", "num_return_sequences"],  INT,       TensorOnly,
          MustBeOne("must be 1: beam search and multiple sequences are not supported")),
    field(&["sampling_param_best_of"],              INT,       Sampling(&["n", "best_of"]),
          MustBeOne("must be 1: multiple sequences per request are not supported")),
    // Refused features: vLLM's `sampling_parameters` keys and tensorrtllm's tensors, as Triton's
    // OpenAI frontend sends them for a named tool choice or a LoRA model.
    field(&["guided_decoding_guide_type"],          STRING,    Sampling(&["structured_outputs", "guided_decoding"]),
          Unsupported(NO_GUIDED_DECODING)),
    field(&["guided_decoding_guide"],               STRING,    TensorOnly,
          Unsupported(NO_GUIDED_DECODING)),
    field(&["lora_task_id"],                        U64,       Sampling(&["lora_name"]),
          Unsupported(NO_LORA)),
    field(&["lora_weights"],                        FP16_MATRIX, TensorOnly,
          Unsupported(NO_LORA)),
    field(&["lora_config"],                         LORA_CONFIG, TensorOnly,
          Unsupported(NO_LORA)),
    // Higher is scheduled first (ferrum's and TensorRT-LLM's order); in `sampling_parameters`,
    // vLLM's order: lower first.
    field(&["priority"],                            INT,       Parameter(&["priority"]),
          Int(|d, name, n| d.priority = Some((name, n, PriorityOrder::HigherFirst)))),
    field(&[],                                      NO_TENSOR, SamplingOnly(&["priority"]),
          Int(|d, name, n| d.priority = Some((name, n, PriorityOrder::LowerFirst)))),
    field(&[],                                      NO_TENSOR, Parameter(&["queue_timeout_microseconds"]),
          Int(|d, name, n| d.queue_timeout = Some((name, n)))),
    field(&["sampling_parameters"],                 STRING,    TensorOnly,
          SamplingParameters),
    ]
};

impl Keys {
    /// The keys accepted inside `sampling_parameters`.
    pub(super) fn in_sampling_parameters(self) -> &'static [&'static str] {
        match self {
            Keys::Sampling(keys) | Keys::SamplingOnly(keys) => keys,
            Keys::Parameter(_) | Keys::TensorOnly => &[],
        }
    }

    /// The keys accepted as request parameters.
    pub(super) fn in_parameters(self) -> &'static [&'static str] {
        match self {
            Keys::Sampling(keys) | Keys::Parameter(keys) => keys,
            Keys::SamplingOnly(_) | Keys::TensorOnly => &[],
        }
    }
}

/// The field that has `name` among its `names`, and the table's copy of the name (errors need a
/// `&'static str`).
pub(super) fn find(
    name: &str,
    names: fn(&Field) -> &'static [&'static str],
) -> Option<(&'static Field, &'static str)> {
    FIELDS
        .iter()
        .find_map(|f| names(f).iter().find(|n| **n == name).map(|n| (f, *n)))
}

impl Field {
    /// Reads this field's value from `given` into `d`.
    pub(super) fn read(
        &'static self,
        given: Given<'_>,
        d: &mut Draft,
        tokenizer: Option<&Tokenizer>,
    ) -> Result<(), RequestError> {
        let name = given.name();
        d.used.push((self, name));
        match self.kind {
            Kind::Int(set) => set(d, name, given.int()?),
            Kind::IntJsonOff(set) => match (given, given.int()?) {
                (Given::Json(..), -1) => set(d, name, 0),
                (_, n) => set(d, name, n),
            },
            Kind::Float(set) => set(d, name, given.float()?),
            Kind::Bool(set) => set(d, given.boolean()?),
            Kind::Seed(set) => set(d, given.seed()?),
            Kind::Strings(set) => set(d, given.strings()?),
            Kind::TokenIds(set) => set(d, given.token_ids()?),
            Kind::Unsupported(bound) => {
                let value = match given {
                    Given::Json(_, v) => {
                        let text = v.to_string();
                        match text.char_indices().nth(80) {
                            Some((cut, _)) => format!("{}...", &text[..cut]),
                            None => text,
                        }
                    }
                    Given::Tensor(_) => "given".to_string(),
                };
                return Err(invalid(name, value, bound));
            }
            Kind::MustBeOne(bound) => {
                let n = given.int()?;
                if n != 1 {
                    return Err(invalid(name, n, bound));
                }
            }
            Kind::Text(set) => {
                let t = given.tensor()?;
                let text = t.one(t.strings()?)?;
                if text.is_empty() {
                    return Err(RequestError::EmptyPrompt);
                }
                set(d, text);
            }
            Kind::Ints(set) => set(d, given.tensor()?.ints()?),
            Kind::StopWordList => {
                for word in word_list(given.tensor()?)? {
                    match word.as_slice() {
                        [id] => d.stop.stop_token_ids.push(*id),
                        ids => {
                            let tok = tokenizer.ok_or(RequestError::NoTokenizer { field: name })?;
                            let s = tok
                                .decode(ids, false)
                                .map_err(|e| RequestError::Tokenizer(e.to_string()))?;
                            if !s.is_empty() {
                                d.stop.stop_strings.push(s);
                            }
                        }
                    }
                }
            }
            Kind::WordList(set) => set(d, word_list(given.tensor()?)?),
            // vLLM's JSON: strict, an unknown key is an error (a null value is skipped, whatever
            // its key).
            Kind::SamplingParameters => {
                let t = given.tensor()?;
                let text = t.one(t.strings()?)?;
                let v: Value = serde_json::from_str(&text).map_err(|e| {
                    invalid(
                        name,
                        format!("{text:?}"),
                        format!("must be a JSON object: {e}"),
                    )
                })?;
                let obj = v
                    .as_object()
                    .ok_or_else(|| invalid(name, format!("{text:?}"), "must be a JSON object"))?;
                for (key, v) in obj.iter().filter(|(_, v)| !v.is_null()) {
                    let Some((field, key)) = find(key, |f| f.keys.in_sampling_parameters()) else {
                        let accepted: Vec<&str> = FIELDS
                            .iter()
                            .filter(|f| !matches!(f.kind, Kind::Unsupported(_)))
                            .flat_map(|f| f.keys.in_sampling_parameters())
                            .copied()
                            .collect();
                        return Err(invalid(
                            name,
                            format!("unknown key '{key}'"),
                            format!("accepted keys: {}", accepted.join(", ")),
                        ));
                    };
                    field.read(Given::Json(key, v), d, tokenizer)?;
                }
            }
        }
        Ok(())
    }
}
