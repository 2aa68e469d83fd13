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

use serde_json::{Map, Value};
use triton_api::{DataType, InputTensor, ParamValue};

use crate::config::RequestDefaults;
use crate::request::{
    GenerateRequest, ModelInfo, Prompt, RequestError, RequestSpec, SamplingParams, StopCriteria,
};
use crate::tokenizer::{ChatMessage, Tokenizer};

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
];

/// One setting a request may carry, under every name it goes by.
struct Field {
    /// The input tensors that carry it: the canonical name first, then aliases (tensorrtllm's
    /// older names). Empty: no tensor.
    tensors: &'static [&'static str],
    /// The tensors' dtype and dims (without the batch dimension).
    dtype: DataType,
    dims: &'static [i64],
    keys: Keys,
    kind: Kind,
}

/// The JSON-style keys that carry a field.
#[derive(Clone, Copy)]
enum Keys {
    TensorOnly,
    /// Keys of `sampling_parameters` (vLLM's names), accepted as request parameters as well.
    Sampling(&'static [&'static str]),
    /// Request parameters only: `sampling_parameters` rejects them, as vLLM has no such key.
    Parameter(&'static [&'static str]),
}

/// How a field's value is read from a tensor or a JSON value, and the setter that stores it in
/// the `Draft` (the only place that knows the field's destination). Integer and float setters get
/// the name the value came under: errors on it name what the client sent.
#[derive(Clone, Copy)]
enum Kind {
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
    /// Accepted only when it holds no word (a BYTES list or a `[2, N]` word list); the bound says
    /// why.
    MustBeEmpty(&'static str),
    /// Accepted only when 1; the bound says why.
    MustBeOne(&'static str),
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

const NO_BAD_WORDS: &str = "bad words are not supported by ferrum; send an empty list";

/// Everything a request may carry. The order is that of `INPUTS` and of the keys listed by the
/// error for an unknown `sampling_parameters` key.
#[rustfmt::skip]
const FIELDS: &[Field] = {
    use Keys::{Parameter, Sampling, TensorOnly};
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
    field(&["max_tokens", "request_output_len"],    INT,       Sampling(&["max_tokens"]),
          Int(|d, name, n| d.max_tokens = Some((name, n)))),
    field(&["min_tokens", "min_length"],            INT,       Sampling(&["min_tokens"]),
          Int(|d, name, n| d.min_tokens = (name, n))),
    field(&["stream", "streaming"],                 BOOL,      Parameter(&["stream"]),
          Bool(|d, b| d.stream = b)),
    field(&["temperature"],                         FLOAT,     Sampling(&["temperature"]),
          Float(|d, _, v| d.sampling.temperature = v as f32)),
    field(&["top_k", "runtime_top_k"],              INT,       Sampling(&["top_k"]),
          IntJsonOff(|d, name, k| d.top_k = Some((name, k)))),
    field(&["top_p", "runtime_top_p"],              FLOAT,     Sampling(&["top_p"]),
          Float(|d, name, p| d.top_p = Some((name, p)))),
    field(&["min_p"],                               FLOAT,     Sampling(&["min_p"]),
          Float(|d, _, v| d.sampling.min_p = v as f32)),
    field(&["repetition_penalty"],                  FLOAT,     Sampling(&["repetition_penalty"]),
          Float(|d, _, v| d.sampling.repetition_penalty = v as f32)),
    field(&["presence_penalty"],                    FLOAT,     Sampling(&["presence_penalty"]),
          Float(|d, _, v| d.sampling.presence_penalty = v as f32)),
    field(&["frequency_penalty"],                   FLOAT,     Sampling(&["frequency_penalty"]),
          Float(|d, _, v| d.sampling.frequency_penalty = v as f32)),
    field(&["seed", "random_seed"],                 U64,       Sampling(&["seed"]),
          Seed(|d, s| d.sampling.seed = Some(s))),
    field(&["end_id"],                              INT,       TensorOnly,
          TokenIds(|d, ids| d.stop.stop_token_ids.extend(ids))),
    // Accepted and unused.
    field(&["pad_id"],                              INT,       TensorOnly,
          Int(|_, _, _| {})),
    field(&["stop_words"],                          STRINGS,   Sampling(&["stop"]),
          Strings(|d, s| d.stop.stop_strings.extend(s))),
    field(&[],                                      NO_TENSOR, Sampling(&["stop_token_ids"]),
          TokenIds(|d, ids| d.stop.stop_token_ids.extend(ids))),
    field(&["bad_words"],                           STRINGS,   TensorOnly,
          MustBeEmpty(NO_BAD_WORDS)),
    field(&["stop_words_list"],                     WORD_LIST, TensorOnly,
          StopWordList),
    field(&["bad_words_list"],                      WORD_LIST, TensorOnly,
          MustBeEmpty(NO_BAD_WORDS)),
    field(&["ignore_eos"],                          BOOL,      Sampling(&["ignore_eos"]),
          Bool(|d, b| d.stop.ignore_eos = b)),
    field(&["apply_chat_template"],                 BOOL,      Parameter(&["apply_chat_template"]),
          Bool(|d, b| d.apply_chat_template = b)),
    field(&["return_log_probs"],                    BOOL,      Parameter(&["return_log_probs"]),
          Bool(|d, b| d.return_log_probs = b)),
    field(&["exclude_input_in_output"],             BOOL,      Parameter(&["exclude_input_in_output"]),
          Bool(|d, b| d.exclude_input_in_output = b)),
    field(&[],                                      NO_TENSOR, Sampling(&["logprobs"]),
          Int(|d, name, n| d.logprobs = Some((name, n)))),
    field(&["beam_width", "num_return_sequences"],  INT,       TensorOnly,
          MustBeOne("must be 1: beam search and multiple sequences are not supported")),
    field(&[],                                      NO_TENSOR, Sampling(&["n", "best_of"]),
          MustBeOne("must be 1: multiple sequences per request are not supported")),
    field(&["sampling_parameters"],                 STRING,    TensorOnly,
          SamplingParameters),
    ]
};

impl Keys {
    /// The keys accepted inside `sampling_parameters`.
    fn in_sampling_parameters(self) -> &'static [&'static str] {
        match self {
            Keys::Sampling(keys) => keys,
            Keys::Parameter(_) | Keys::TensorOnly => &[],
        }
    }

    /// The keys accepted as request parameters.
    fn in_parameters(self) -> &'static [&'static str] {
        match self {
            Keys::Sampling(keys) | Keys::Parameter(keys) => keys,
            Keys::TensorOnly => &[],
        }
    }
}

/// The field that has `name` among its `names`, and the table's copy of the name (errors need a
/// `&'static str`).
fn find(
    name: &str,
    names: fn(&Field) -> &'static [&'static str],
) -> Option<(&'static Field, &'static str)> {
    FIELDS
        .iter()
        .find_map(|f| names(f).iter().find(|n| **n == name).map(|n| (f, *n)))
}

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
    /// Send `cum_log_probs` and `output_log_probs`: set by `return_log_probs` or by a
    /// `logprobs` count (then `generate.sampling.logprobs` is Some).
    pub return_log_probs: bool,
    /// The prompt text as sent (prepended to `text_output` when the input is not excluded).
    pub prompt_text: Option<String>,
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
    /// Each field read and the name it came under, in the order applied (the last one of a
    /// field is the value that counts): errors of `GenerateRequest::new` name the field as the
    /// client did.
    used: Vec<(&'static Field, &'static str)>,
}

fn invalid(
    field: &'static str,
    value: impl std::fmt::Display,
    bound: impl Into<String>,
) -> RequestError {
    RequestError::invalid(field, value, bound)
}

/// A tensor with its batch dimension (if any) checked and removed.
struct Tensor<'a> {
    field: &'static str,
    dtype: DataType,
    shape: Vec<i64>,
    data: &'a [u8],
}

impl<'a> Tensor<'a> {
    /// `field`: the table's name of the tensor (errors name it).
    fn new(
        t: &'a InputTensor,
        field: &'static str,
        max_batch_size: usize,
    ) -> Result<Self, RequestError> {
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

    fn wrong_dtype(&self, bound: &str) -> RequestError {
        invalid(
            self.field,
            format!("{} data", self.dtype.config_name()),
            bound,
        )
    }

    /// The data as little-endian words of `elem` bytes, zero-extended.
    fn words(&self, elem: usize) -> impl Iterator<Item = u64> + '_ {
        self.data.chunks_exact(elem).map(move |c| {
            let mut b = [0u8; 8];
            b[..elem].copy_from_slice(c);
            u64::from_le_bytes(b)
        })
    }

    /// Every element of an integer (or BOOL) tensor. UINT64 values above i64::MAX wrap;
    /// `seed_u64` reads them exactly.
    fn ints(&self) -> Result<Vec<i64>, RequestError> {
        let elem = match self.dtype {
            DataType::Fp16 | DataType::Fp32 | DataType::Fp64 | DataType::Bf16 => None,
            dtype => dtype.byte_size(),
        };
        let Some(elem) = elem else {
            return Err(self.wrong_dtype("expected an integer tensor"));
        };
        if self.data.len() != self.num_elements() * elem {
            return Err(invalid(
                self.field,
                format!("{} bytes for shape {:?}", self.data.len(), self.shape),
                "size mismatch",
            ));
        }
        let sign_extend = |w: u64| match self.dtype {
            DataType::Int8 => w as i8 as i64,
            DataType::Int16 => w as i16 as i64,
            DataType::Int32 => w as i32 as i64,
            _ => w as i64,
        };
        Ok(self.words(elem).map(sign_extend).collect())
    }

    /// Every element of a float (or integer) tensor.
    fn floats(&self) -> Result<Vec<f64>, RequestError> {
        let elem = match self.dtype {
            DataType::Fp32 => 4,
            DataType::Fp64 => 8,
            DataType::Bytes | DataType::Fp16 | DataType::Bf16 | DataType::Invalid => {
                return Err(self.wrong_dtype("expected TYPE_FP32 (or another numeric type)"));
            }
            _ => return Ok(self.ints()?.into_iter().map(|i| i as f64).collect()),
        };
        if self.data.len() != self.num_elements() * elem {
            return Err(invalid(
                self.field,
                format!("{} bytes", self.data.len()),
                "size mismatch",
            ));
        }
        let float = |w: u64| match elem {
            4 => f32::from_bits(w as u32) as f64,
            _ => f64::from_bits(w),
        };
        Ok(self.words(elem).map(float).collect())
    }

    /// Every element of a BYTES tensor (each a 4-byte length, then the bytes), as UTF-8 text.
    fn strings(&self) -> Result<Vec<String>, RequestError> {
        if self.dtype != DataType::Bytes {
            return Err(self.wrong_dtype("expected TYPE_STRING (BYTES)"));
        }
        let mut out = Vec::new();
        let mut rest = self.data;
        while !rest.is_empty() {
            let Some((len, tail)) = rest.split_first_chunk::<4>() else {
                return Err(invalid(
                    self.field,
                    "truncated BYTES element",
                    "each element needs a 4-byte length",
                ));
            };
            let len = u32::from_le_bytes(*len) as usize;
            let Some(bytes) = tail.get(..len) else {
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
            rest = &tail[len..];
        }
        Ok(out)
    }

    fn one<T>(&self, v: Vec<T>) -> Result<T, RequestError> {
        let n = v.len();
        match <[T; 1]>::try_from(v) {
            Ok([x]) => Ok(x),
            Err(_) => Err(invalid(
                self.field,
                format!("{n} elements (shape {:?})", self.shape),
                "must have exactly one element",
            )),
        }
    }

    fn int(&self) -> Result<i64, RequestError> {
        self.one(self.ints()?)
    }
    fn float(&self) -> Result<f64, RequestError> {
        self.one(self.floats()?)
    }
    fn boolean(&self) -> Result<bool, RequestError> {
        Ok(self.int()? != 0)
    }
    fn seed_u64(&self) -> Result<u64, RequestError> {
        if let (DataType::Uint64, Some(w), 8) = (self.dtype, self.words(8).next(), self.data.len())
        {
            return Ok(w);
        }
        let v = self.int()?;
        u64::try_from(v).map_err(|_| invalid(self.field, v, "must be >= 0"))
    }
}

/// One value as a source carries it: a tensor, or a JSON value (in `sampling_parameters` or a
/// request parameter) under its key. Every kind reads both through these methods, so a value
/// means the same whichever source carries it.
#[derive(Clone, Copy)]
enum Given<'a> {
    Tensor(&'a Tensor<'a>),
    Json(&'static str, &'a Value),
}

impl<'a> Given<'a> {
    /// The name the value came under.
    fn name(self) -> &'static str {
        match self {
            Given::Tensor(t) => t.field,
            Given::Json(key, _) => key,
        }
    }

    fn int(self) -> Result<i64, RequestError> {
        match self {
            Given::Tensor(t) => t.int(),
            Given::Json(key, v) => match (v.as_i64(), v.as_f64()) {
                (Some(i), _) => Ok(i),
                (None, Some(x)) if x.fract() == 0.0 && x.abs() < 9.0e15 => Ok(x as i64),
                _ => Err(invalid(key, v, "must be an integer")),
            },
        }
    }

    fn float(self) -> Result<f64, RequestError> {
        match self {
            Given::Tensor(t) => t.float(),
            Given::Json(key, v) => v
                .as_f64()
                .ok_or_else(|| invalid(key, v, "must be a number")),
        }
    }

    fn boolean(self) -> Result<bool, RequestError> {
        match self {
            Given::Tensor(t) => t.boolean(),
            Given::Json(_, Value::Bool(b)) => Ok(*b),
            Given::Json(_, Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(true),
            Given::Json(_, Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(false),
            Given::Json(key, v) => Err(invalid(key, v, "must be true or false")),
        }
    }

    /// A UINT64 tensor is read exactly; anything else must be an integer >= 0.
    fn seed(self) -> Result<u64, RequestError> {
        match self {
            Given::Tensor(t) => t.seed_u64(),
            Given::Json(key, _) => {
                let s = self.int()?;
                u64::try_from(s).map_err(|_| invalid(key, s, "must be >= 0"))
            }
        }
    }

    /// Strings, empty ones dropped: a BYTES tensor, or JSON's string or list of strings.
    fn strings(self) -> Result<Vec<String>, RequestError> {
        let strings = match self {
            Given::Tensor(t) => t.strings()?,
            Given::Json(key, v) => {
                // A single string is a list of one.
                let items = v.as_array().map_or(std::slice::from_ref(v), Vec::as_slice);
                let string = |item: &Value| {
                    let bound = format!("{key} must be a string or a list of strings");
                    item.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| invalid(key, item, bound))
                };
                items.iter().map(string).collect::<Result<_, _>>()?
            }
        };
        Ok(strings.into_iter().filter(|s| !s.is_empty()).collect())
    }

    /// Token ids: JSON's list, or one tensor id where a negative one means none (`end_id = -1`).
    fn token_ids(self) -> Result<Vec<u32>, RequestError> {
        match self {
            Given::Tensor(t) => match t.int()? {
                id if id < 0 => Ok(vec![]),
                id => Ok(vec![token_id(t.field, id)?]),
            },
            Given::Json(key, v) => v
                .as_array()
                .ok_or_else(|| invalid(key, v, "must be a list of token ids"))?
                .iter()
                .map(|item| token_id(key, Given::Json(key, item).int()?))
                .collect(),
        }
    }

    /// The tensor, for the kinds that only a tensor carries.
    fn tensor(self) -> Result<&'a Tensor<'a>, RequestError> {
        match self {
            Given::Tensor(t) => Ok(t),
            Given::Json(key, v) => Err(invalid(key, v, "only accepted as a tensor")),
        }
    }
}

impl Field {
    /// Reads this field's value from `given` into `d`.
    fn read(
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
            Kind::MustBeEmpty(bound) => {
                // Read as declared: an INT32 `bad_words` fails as "expected TYPE_STRING".
                let first_word = match self.dtype {
                    DataType::Bytes => given.strings()?.first().map(|w| format!("{w:?}")),
                    _ => word_list(given.tensor()?)?
                        .first()
                        .map(|w| format!("{w:?}")),
                };
                if let Some(w) = first_word {
                    return Err(invalid(name, w, bound));
                }
            }
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

/// Parses and validates one request.
pub fn parse(raw: &RawRequest, ctx: &ParseContext<'_>) -> Result<ParsedRequest, RequestError> {
    let mut d = Draft::new(ctx.defaults);
    let tokenizer = ctx.model.tokenizer.as_deref();

    // 1. Request parameters (generate-endpoint keys that are not inputs): known keys only;
    //    others (Triton's own, e.g. `triton_enable_empty_final_response`) are ignored.
    let params: Map<String, Value> = raw
        .params
        .iter()
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
    for (key, v) in &params {
        if let Some((field, key)) = find(key, |f| f.keys.in_parameters()) {
            field.read(Given::Json(key, v), &mut d, tokenizer)?;
        }
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
        self.sampling.logprobs = match (self.logprobs, self.return_log_probs) {
            (Some((name, n)), _) => {
                Some(usize::try_from(n).map_err(|_| invalid(name, n, "must be >= 0"))?)
            }
            (None, true) => Some(0),
            (None, false) => None,
        };
        if let Some((_, p)) = self.top_p {
            self.sampling.top_p = p as f32;
        }
        self.stop.max_tokens = max_tokens;
        self.stop.min_tokens = min_tokens;
        let detokenize = interface == Interface::Text || !self.stop.stop_strings.is_empty();
        let return_log_probs = self.sampling.logprobs.is_some();
        let spec = RequestSpec {
            prompt,
            sampling: self.sampling,
            stop: self.stop,
            detokenize,
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
            return_log_probs,
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

    /// The tiny BPE tokenizer of tests/fixtures (400 ids, with a chat template).
    fn tokenizer() -> std::sync::Arc<Tokenizer> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/tokenizer/hf_tiny");
        std::sync::Arc::new(Tokenizer::from_hf_dir(&dir).unwrap().unwrap())
    }

    /// A model of 2048 tokens of context with the fixture tokenizer (None: no tokenizer).
    fn model(tokenizer: Option<std::sync::Arc<Tokenizer>>) -> ModelInfo {
        ModelInfo {
            vocab_size: 400,
            max_model_len: 2048,
            eos_token_ids: vec![],
            tokenizer,
        }
    }

    fn run_with(
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

    fn run_on(
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
        // Tokenized here, with the tokenizer's special tokens.
        assert_eq!(
            p.generate.prompt_ids(),
            tokenizer().encode("Hello", true).unwrap()
        );
        assert_eq!(p.prompt_text.as_deref(), Some("Hello"));
        assert_eq!(p.generate.stop().max_tokens, 16);
        assert!(p.generate.detokenize());
        assert!(!p.stream && !p.exclude_input_in_output && !p.return_log_probs);
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
        assert!(p.stream && p.exclude_input_in_output && p.return_log_probs);
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
            let mut first: Option<(Src, String)> = None;
            for src in sources(f) {
                let Some(got) = given(f, &[(src, 0)]) else {
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
             presence_penalty, frequency_penalty, seed, stop, stop_token_ids, ignore_eos, \
             logprobs, n, best_of)"
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
        // Unknown request parameters (and tensor aliases) are ignored.
        let p = run_with(
            vec![text("x")],
            vec![
                ("temprature".into(), ParamValue::Double(-1.0)),
                ("random_seed".into(), ParamValue::Int(-1)),
                ("top_k".into(), ParamValue::Int(-1)),
            ],
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
            if sample(f.kind, 0).is_none() {
                // Kinds only a tensor carries.
                assert!(matches!(f.keys, Keys::TensorOnly), "{:?}", f.tensors);
            }
        }
    }
}
