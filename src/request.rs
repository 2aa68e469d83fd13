//! What a client asks for (`RequestSpec { Prompt, SamplingParams, StopCriteria }`), validated and
//! tokenized once against a model (`GenerateRequest::new`, the only way to build a
//! `GenerateRequest`), and what the engine streams back (`TokenEvent`). Nothing downstream
//! re-checks these values.
//! This module must never import device, backend or Triton code.

use std::fmt;
use std::sync::Arc;

use crate::tokenizer::{ChatMessage, Tokenizer};

/// Engine-wide unique id of one generation request (one sequence; beam search is not supported).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct SeqId(pub u64);

impl fmt::Display for SeqId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seq{}", self.0)
    }
}

/// Why a request was refused before generation started: by `backend::parse` or by
/// `EngineHandle::submit`. The `Display` text is what the client reads (Triton `INVALID_ARG`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RequestError {
    /// A field is out of its allowed range. `bound` says what is allowed, e.g. "must be >= 0".
    #[error("invalid value for '{field}': {value} ({bound})")]
    InvalidValue {
        /// The name the client used (tensor, `sampling_parameters` key or request parameter,
        /// e.g. `runtime_top_k` rather than `top_k`).
        field: &'static str,
        /// The rejected value as displayed in the message.
        value: String,
        /// What is allowed, e.g. "must be in (0, 1]".
        bound: String,
    },
    /// No prompt token: an empty `text_input`, `input_ids` empty (after `input_lengths`), or
    /// text that tokenized to nothing.
    #[error("prompt is empty: at least one token is required")]
    EmptyPrompt,
    /// The prompt leaves no room for one generated token: `num_prompt_tokens >= max_model_len`.
    #[error(
        "prompt has {num_prompt_tokens} tokens, which exceeds the model's context of {max_model_len} tokens"
    )]
    PromptTooLong {
        /// Prompt length after tokenization (and any chat template).
        num_prompt_tokens: usize,
        /// The engine's limit on prompt + output tokens (`ModelInfo::max_model_len`).
        max_model_len: usize,
    },
    /// A prompt token id is not in the model's vocabulary (`token_id >= vocab_size`; negative
    /// ids are refused earlier as `InvalidValue`).
    #[error("token id {token_id} in '{field}' is out of range: vocabulary size is {vocab_size}")]
    TokenOutOfRange {
        /// The tensor that carried it (`input_ids`).
        field: &'static str,
        /// The offending id, signed as clients send it (INT32/INT64 tensors).
        token_id: i64,
        /// Valid ids are `0..vocab_size`.
        vocab_size: usize,
    },
    /// The request needs text handling (a text prompt, stop strings, a chat template) but the
    /// model was loaded without a tokenizer.
    #[error("the model has no tokenizer, so '{field}' cannot be used; send token ids instead")]
    NoTokenizer {
        /// The field that needs the tokenizer (`text_input`, `stop`, `apply_chat_template`, ...).
        field: &'static str,
    },
    /// The tokenizer failed on the prompt text (or the rendered chat template); holds its
    /// message.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The request is fine but nothing can take it now: the engine has stopped (the model is
    /// unloading or failed for good) or is busy (`max_queue_size`). Triton answers UNAVAILABLE,
    /// not INVALID_ARG. Holds the whole message.
    #[error("{0}")]
    Unavailable(String),
}

impl RequestError {
    /// An `InvalidValue`: `value` is rendered with `Display`, `bound` says what is allowed.
    pub fn invalid(
        field: &'static str,
        value: impl fmt::Display,
        bound: impl Into<String>,
    ) -> Self {
        RequestError::InvalidValue {
            field,
            value: value.to_string(),
            bound: bound.into(),
        }
    }
}

/// Sampling parameters of one request. Defaults mean greedy decoding with no penalties.
/// `temperature == 0` means greedy (argmax) regardless of the other filters.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// Divides the logits before top-k/top-p/min-p and the draw; finite and >= 0 (default 0,
    /// greedy). Below 1 sharpens, above 1 flattens.
    pub temperature: f32,
    /// 0 disables top-k.
    pub top_k: usize,
    /// 1.0 disables top-p.
    pub top_p: f32,
    /// 0.0 disables min-p.
    pub min_p: f32,
    /// 1.0 disables; > 1 discourages tokens seen in prompt or output (CTRL-style, as HF/vLLM).
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token present in the output so far (OpenAI-style).
    pub presence_penalty: f32,
    /// Subtracted `count` times from the logit of every token present in the output so far.
    pub frequency_penalty: f32,
    /// Per-request RNG seed: same seed and inputs give the same output. None: drawn by the engine.
    pub seed: Option<u64>,
    /// Number of top log-probabilities to return per generated token (None: no logprobs).
    pub logprobs: Option<usize>,
    /// Token sequences never to generate (`bad_words`, `bad_words_list`): a word's last id is
    /// banned at a step where the generated tokens end with the word's other ids (a one-id
    /// word is banned always). Each word holds at least one id of the vocabulary
    /// (`GenerateRequest::new` checks). The CUDA executor refuses a request with any.
    pub bad_words: Vec<Vec<u32>>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            logprobs: None,
            bad_words: Vec::new(),
        }
    }
}

/// Largest top-N logprobs a request may ask for.
pub const MAX_LOGPROBS: usize = 20;

impl SamplingParams {
    /// Checks every bound; the error names the field, its value and the allowed range.
    pub fn validate(&self) -> Result<(), RequestError> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(RequestError::invalid(
                "temperature",
                self.temperature,
                "must be a finite number >= 0",
            ));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(RequestError::invalid(
                "top_p",
                self.top_p,
                "must be in (0, 1]",
            ));
        }
        if !(self.min_p >= 0.0 && self.min_p <= 1.0) {
            return Err(RequestError::invalid(
                "min_p",
                self.min_p,
                "must be in [0, 1]",
            ));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(RequestError::invalid(
                "repetition_penalty",
                self.repetition_penalty,
                "must be a finite number > 0",
            ));
        }
        if !(self.presence_penalty.is_finite() && (-2.0..=2.0).contains(&self.presence_penalty)) {
            return Err(RequestError::invalid(
                "presence_penalty",
                self.presence_penalty,
                "must be in [-2, 2]",
            ));
        }
        if !(self.frequency_penalty.is_finite() && (-2.0..=2.0).contains(&self.frequency_penalty)) {
            return Err(RequestError::invalid(
                "frequency_penalty",
                self.frequency_penalty,
                "must be in [-2, 2]",
            ));
        }
        if let Some(n) = self.logprobs
            && n > MAX_LOGPROBS
        {
            return Err(RequestError::invalid(
                "logprobs",
                n,
                format!("must be <= {MAX_LOGPROBS}"),
            ));
        }
        Ok(())
    }

    /// True when `temperature` is 0: the token is the argmax of the (penalized) logits, so the
    /// top-k/top-p/min-p filters and the seed play no part.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// When generation stops. The first condition met wins.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StopCriteria {
    /// Maximum number of generated tokens: in [1, max_model_len - 1] (`GenerateRequest::new`).
    pub max_tokens: usize,
    /// No EOS/stop token or stop string ends generation before this many tokens were generated.
    pub min_tokens: usize,
    /// Token ids that end generation (in addition to the model's EOS ids unless `ignore_eos`).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; the matched string is not part of the returned text.
    pub stop_strings: Vec<String>,
    /// Do not stop at the model's EOS token(s).
    pub ignore_eos: bool,
}

impl StopCriteria {
    /// Checks `min_tokens <= max_tokens` and that no stop string is empty; the error names the
    /// field, its value and the bound. (`max_tokens` is checked against the model's context by
    /// `GenerateRequest::new`.)
    pub fn validate(&self) -> Result<(), RequestError> {
        if self.min_tokens > self.max_tokens {
            return Err(RequestError::invalid(
                "min_tokens",
                self.min_tokens,
                format!("must be <= max_tokens ({})", self.max_tokens),
            ));
        }
        if let Some(s) = self.stop_strings.iter().find(|s| s.is_empty()) {
            return Err(RequestError::invalid(
                "stop",
                format!("{s:?}"),
                "stop strings must not be empty",
            ));
        }
        Ok(())
    }
}

/// The prompt of a request as the caller gives it; `GenerateRequest::new` turns it into token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    /// Ids in the model's vocabulary, run exactly as given (no BOS or other special token is
    /// added).
    TokenIds(Vec<u32>),
    /// Text, encoded by the model's tokenizer with the special tokens it adds (e.g. BOS); a
    /// model without a tokenizer refuses it (`RequestError::NoTokenizer`).
    Text(String),
    /// Messages rendered by the model's chat template (with the generation prompt), then encoded
    /// without adding special tokens (the template holds any BOS). A model without a tokenizer
    /// refuses it (`NoTokenizer { field: "apply_chat_template" }`).
    Chat(Vec<ChatMessage>),
}

/// What the engine knows about its model that request validation needs.
#[derive(Clone)]
pub struct ModelInfo {
    /// Rows of the model's embedding: prompt ids must be below it
    /// (`RequestError::TokenOutOfRange`).
    pub vocab_size: usize,
    /// Prompt + generated tokens may not exceed this.
    pub max_model_len: usize,
    /// Ids that end generation unless `StopCriteria::ignore_eos`: the tokenizer's EOS ids, else
    /// the checkpoint config's (`Checkpoint::eos_token_ids`).
    pub eos_token_ids: Vec<u32>,
    /// Encodes text prompts and decodes output text (the checkpoint's, or `tokenizer_path`'s).
    /// None: text prompts, and stop strings of a detokenizing request, are refused
    /// (`RequestError::NoTokenizer`).
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// The engine's sampler bans `bad_words` (the CPU engine's does; the GPU sampler does not
    /// yet): false refuses a request with bad words, naming the field.
    pub bans_words: bool,
}

/// Where a request waits for the engine. Defaults: priority 0, the engine's queue timeout.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueParams {
    /// Scheduling level: higher levels are admitted first, FIFO within a level, and the lowest
    /// running level is preempted first (0 is the default level; any value).
    pub priority: i64,
    /// Longest wait from submission to the request's first step, replacing the engine's
    /// (`BatchingOptions::queue_timeout`); past it, a request never scheduled ends with
    /// `TokenEvent::Unavailable`. None: the engine's.
    pub queue_timeout: Option<std::time::Duration>,
}

/// What a caller asks for, not yet checked: `GenerateRequest::new` validates it against a model.
#[derive(Debug, Clone)]
pub struct RequestSpec {
    /// What to continue.
    pub prompt: Prompt,
    /// How each token is picked.
    pub sampling: SamplingParams,
    /// When generation ends.
    pub stop: StopCriteria,
    /// Produce incremental text deltas (UTF-8 safe) with each token event.
    pub detokenize: bool,
    /// Priority and how long it may wait for its first step.
    pub queue: QueueParams,
}

/// The allowed range of `max_tokens` for a model whose context is `max_model_len` tokens (at
/// least one prompt token must fit), as error messages state it.
pub fn max_tokens_bound(max_model_len: usize) -> String {
    format!(
        "must be in [1, {}] (the model's context is {max_model_len} tokens)",
        max_model_len.saturating_sub(1)
    )
}

/// One generation request, tokenized and validated against one model by `GenerateRequest::new`,
/// the only way to build one: the engine takes it as it is.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    prompt_ids: Vec<u32>,
    sampling: SamplingParams,
    stop: StopCriteria,
    detokenize: bool,
    queue: QueueParams,
    /// `(vocab_size, max_model_len)` of the model it was validated for: the engine refuses a
    /// request built for another model instead of checking it again.
    validated_for: (usize, usize),
}

impl GenerateRequest {
    /// Tokenizes the prompt (applying the chat template for `Prompt::Chat`) and checks every
    /// rule, in this order: a non-empty prompt whose ids are in the vocabulary and that leaves
    /// room for one generated token; `max_tokens` in [1, max_model_len - 1]; the sampling and stop
    /// bounds (`SamplingParams::validate`, `StopCriteria::validate`); a tokenizer for stop
    /// strings of a detokenizing request. Prompt + `max_tokens` may exceed `max_model_len`: the
    /// engine then ends the request at the context's end with `FinishReason::Length`.
    pub fn new(spec: RequestSpec, model: &ModelInfo) -> Result<Self, RequestError> {
        let RequestSpec {
            prompt,
            sampling,
            stop,
            detokenize,
            queue,
        } = spec;
        let tokenizer = |field| {
            model
                .tokenizer
                .as_deref()
                .ok_or(RequestError::NoTokenizer { field })
        };
        let tokenizer_error =
            |e: crate::tokenizer::TokenizerError| RequestError::Tokenizer(e.to_string());
        let prompt_ids = match prompt {
            Prompt::TokenIds(ids) => ids,
            Prompt::Text(text) => tokenizer("text_input")?
                .encode(&text, true)
                .map_err(tokenizer_error)?,
            Prompt::Chat(messages) => {
                let tok = tokenizer("apply_chat_template")?;
                let rendered = tok.apply_chat_template(&messages, true).map_err(|e| {
                    RequestError::invalid(
                        "apply_chat_template",
                        "true",
                        format!("the chat template cannot be applied: {e}"),
                    )
                })?;
                tok.encode(&rendered, false).map_err(tokenizer_error)?
            }
        };
        if prompt_ids.is_empty() {
            return Err(RequestError::EmptyPrompt);
        }
        if let Some(&bad) = prompt_ids
            .iter()
            .find(|&&id| id as usize >= model.vocab_size)
        {
            return Err(RequestError::TokenOutOfRange {
                field: "input_ids",
                token_id: bad.into(),
                vocab_size: model.vocab_size,
            });
        }
        // At least one token must fit after the prompt.
        if prompt_ids.len() >= model.max_model_len {
            return Err(RequestError::PromptTooLong {
                num_prompt_tokens: prompt_ids.len(),
                max_model_len: model.max_model_len,
            });
        }
        if stop.max_tokens == 0 || stop.max_tokens >= model.max_model_len {
            return Err(RequestError::invalid(
                "max_tokens",
                stop.max_tokens,
                max_tokens_bound(model.max_model_len),
            ));
        }
        sampling.validate()?;
        if !model.bans_words && !sampling.bad_words.is_empty() {
            return Err(RequestError::invalid(
                "bad_words",
                format!("{} word(s)", sampling.bad_words.len()),
                "this model's engine cannot ban words (the GPU sampler has no bad-word rows yet); \
                 serve it on the CPU engine for bad_words, or send none",
            ));
        }
        if sampling.bad_words.iter().any(Vec::is_empty) {
            return Err(RequestError::invalid(
                "bad_words",
                "an empty word",
                "every word must hold at least one token id",
            ));
        }
        if let Some(&bad) = sampling
            .bad_words
            .iter()
            .flatten()
            .find(|&&id| id as usize >= model.vocab_size)
        {
            return Err(RequestError::TokenOutOfRange {
                field: "bad_words",
                token_id: bad.into(),
                vocab_size: model.vocab_size,
            });
        }
        stop.validate()?;
        if detokenize && model.tokenizer.is_none() && !stop.stop_strings.is_empty() {
            return Err(RequestError::NoTokenizer { field: "stop" });
        }
        Ok(GenerateRequest {
            prompt_ids,
            sampling,
            stop,
            detokenize,
            queue,
            validated_for: (model.vocab_size, model.max_model_len),
        })
    }

    /// The prompt's token ids as the engine runs them (after tokenization and chat template).
    pub fn prompt_ids(&self) -> &[u32] {
        &self.prompt_ids
    }

    /// How each token is picked.
    pub fn sampling(&self) -> &SamplingParams {
        &self.sampling
    }

    /// When generation ends.
    pub fn stop(&self) -> &StopCriteria {
        &self.stop
    }

    /// Whether token events carry text deltas.
    pub fn detokenize(&self) -> bool {
        self.detokenize
    }

    /// Its priority and queue timeout.
    pub fn queue(&self) -> &QueueParams {
        &self.queue
    }

    /// Whether this request was validated for a model with `model`'s vocabulary and context.
    pub fn is_for(&self, model: &ModelInfo) -> bool {
        self.validated_for == (model.vocab_size, model.max_model_len)
    }
}

/// Why a request's generation ended; sent to clients as the `finish_reason` output and
/// serialized in lowercase (`length`, `stop`, `abort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// `max_tokens` reached (or the model's context is full).
    Length,
    /// An EOS/stop token or a stop string was produced.
    Stop,
    /// The request was aborted (cancelled by the client or the server is shutting down).
    Abort,
}

impl FinishReason {
    /// The lowercase name clients see in `finish_reason` (as vLLM and OpenAI spell it).
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Stop => "stop",
            FinishReason::Abort => "abort",
        }
    }
}

pub use crate::tensor::TokenLogprobs;

/// What the engine emits for a request. A request's stream ends with exactly one event whose
/// `finish` is set (or an `Error` or `Unavailable` event).
#[derive(Debug, Clone, PartialEq)]
pub enum TokenEvent {
    /// Prompt accepted: the tokenized prompt (useful when the request carried text).
    Started {
        /// The prompt's token ids as the engine runs them (after tokenization).
        prompt_ids: Vec<u32>,
    },
    /// One generated token. `text` is the UTF-8 safe delta it completes (may be empty while a
    /// multi-byte character or a possible stop string is still pending).
    Token {
        /// The sampled id (a stop id included: it ends the request but adds no text).
        token_id: u32,
        /// The text delta; always empty when the request did not ask to detokenize. On the last
        /// event it also carries what the detokenizer still held back.
        text: String,
        /// The token's log-probability and the top-N alternatives; None unless the request set
        /// `SamplingParams::logprobs`.
        logprobs: Option<TokenLogprobs>,
        /// Set on the last event of the request.
        finish: Option<FinishReason>,
    },
    /// The request ended without a token (aborted before producing one, or the final text flush).
    Finished {
        /// Text not yet sent with a token (empty on abort).
        text: String,
        /// Why it ended; the engine emits `Finished` only for `Abort` (a request that ends on
        /// a token says so in that `Token`'s `finish`).
        reason: FinishReason,
    },
    /// The request failed; no more events follow.
    Error(String),
    /// The engine did not serve the request: it is not serving (restarting after a failure, or
    /// failed for good), or the request waited past its queue timeout before its first step.
    /// Holds the whole message, which says why and what to do (retry, or reload the model). No
    /// more events follow.
    Unavailable(String),
}
