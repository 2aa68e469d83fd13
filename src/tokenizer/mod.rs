//! Tokenizers (HF tokenizer.json or GGUF vocabularies), chat templates, incremental UTF-8 safe
//! detokenization and stop strings. Pure host code: never imports device or backend code, never
//! panics on a bad file or bad metadata (every failure is a `TokenizerError` naming the file, key
//! or value), and never emits text that is not valid UTF-8 while a stream is running.
//!
//! - `Tokenizer` wraps a `tokenizers::Tokenizer` plus what the model files say around it: BOS/EOS
//!   ids, whether to add them, and the chat template. Two constructors: a Hugging Face directory
//!   (`tokenizer.json`, or GPT-2's slow-tokenizer files `vocab.json` + `merges.txt` rebuilt by
//!   `gpt2_files`, + `tokenizer_config.json` + `generation_config.json`) and GGUF metadata
//!   (`gguf_vocab` rebuilds the tokenizer from `tokenizer.ggml.*`);
//! - `chat` renders chat templates with Hugging Face semantics (minijinja + pycompat);
//! - `stream` turns generated ids into text deltas (`IncrementalDecoder`) and finds stop strings
//!   across deltas (`StopStringMatcher`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::loader::gguf::MetadataValue;

mod chat;
mod gguf_vocab;
mod gpt2_files;
mod stream;

pub use chat::ChatMessage;
pub use stream::{IncrementalDecoder, StopMatch, StopStringMatcher};

/// A tokenizer that could not be loaded, or a text that could not be encoded, decoded or
/// templated. Each variant names the file, metadata key or value concerned.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file exists but could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A tokenizer JSON file (tokenizer_config.json, generation_config.json, vocab.json, ...) is
    /// not valid JSON.
    #[error("parsing JSON {path}: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// serde_json's error (with line and column).
        source: serde_json::Error,
    },
    /// A field of a tokenizer config file has the wrong type or an impossible value (e.g. an
    /// `eos_token_id` not below the vocab size).
    #[error("{path}: field `{field}`: {problem}")]
    Config {
        /// The file the field was read from.
        path: PathBuf,
        /// The field, e.g. `add_bos_token`.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The `tokenizers` crate rejected tokenizer.json.
    #[error("loading tokenizer {path}: {message}")]
    TokenizerJson {
        /// The tokenizer.json file.
        path: PathBuf,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// A GPT-2 slow-tokenizer file (vocab.json, added_tokens.json, ...) is malformed.
    #[error("{path}: {problem}")]
    BadFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
    },
    /// A line of merges.txt is not two space-separated tokens of the vocabulary.
    #[error("{path}: line {line_number} ({line:?}): {problem}")]
    BadMergesLine {
        /// The merges.txt file.
        path: PathBuf,
        /// 1-based, counting the `#version` header.
        line_number: usize,
        /// The line as written.
        line: String,
        /// What is wrong with it.
        problem: String,
    },
    /// Only one of vocab.json and merges.txt exists: GPT-2's slow tokenizer needs both.
    #[error(
        "{path} is missing (a GPT-2 tokenizer without tokenizer.json needs it next to {needed_by})"
    )]
    MissingFile {
        /// The missing file.
        path: PathBuf,
        /// The file that was found and needs it.
        needed_by: PathBuf,
    },
    /// A `tokenizer.ggml.*` GGUF key is missing, mistyped or inconsistent.
    #[error("GGUF metadata `{key}`: {problem}")]
    Metadata {
        /// The metadata key, e.g. `tokenizer.ggml.merges`.
        key: String,
        /// What is wrong with it.
        problem: String,
    },
    /// `tokenizer.ggml.model` names a vocabulary kind ferrum cannot build.
    #[error(
        "GGUF metadata `tokenizer.ggml.model` = {value:?} is not supported (supported: gpt2, llama)"
    )]
    UnsupportedModel {
        /// The value of `tokenizer.ggml.model`.
        value: String,
    },
    /// The `tokenizers` crate refused the tokenizer built from GGUF metadata.
    #[error("building the {kind} tokenizer from GGUF metadata: {message}")]
    Build {
        /// The vocabulary kind being built: `gpt2` (byte-level BPE) or `llama`
        /// (SentencePiece-style).
        kind: &'static str,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// The `tokenizers` crate failed to encode a text.
    #[error("encoding a text of {num_bytes} bytes: {message}")]
    Encode {
        /// Length of the text in bytes (the text itself is not kept: it may be large or private).
        num_bytes: usize,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// `decode` got an id at or past the vocabulary size.
    #[error("decoding: token id {token_id} is out of range (vocab size {vocab_size})")]
    TokenIdOutOfRange {
        /// The offending id.
        token_id: u32,
        /// Ids in the vocabulary (added tokens included).
        vocab_size: usize,
    },
    /// The `tokenizers` crate failed to decode ids.
    #[error("decoding {num_ids} ids: {message}")]
    Decode {
        /// How many ids were being decoded.
        num_ids: usize,
        /// The `tokenizers` crate's message.
        message: String,
    },
    /// `apply_chat_template` on a model that has no chat template.
    #[error("the tokenizer has no chat template")]
    NoChatTemplate,
    /// The chat template failed to compile or to render (minijinja's error, or the template's own
    /// `raise_exception`).
    #[error("chat template: {message}")]
    ChatTemplate {
        /// minijinja's message.
        message: String,
    },
}

/// The token strings a chat template may refer to (`bos_token`, `eos_token`, ...).
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct SpecialTokenStrings {
    pub bos: Option<String>,
    pub eos: Option<String>,
    pub unk: Option<String>,
    pub pad: Option<String>,
}

/// A text tokenizer plus the model's BOS/EOS conventions and chat template. `Send + Sync`; share
/// it through an `Arc`.
#[derive(Debug)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    /// Number of ids, added tokens included (ids are `0..vocab_size`).
    vocab_size: usize,
    bos_token_id: Option<u32>,
    /// Every id that ends generation, the primary EOS first.
    eos_token_ids: Vec<u32>,
    /// Added by `encode(.., add_special_tokens = true)` on top of what the inner post-processor
    /// adds (GGUF vocabularies have no post-processor; a tokenizer.json usually has one).
    add_bos: bool,
    add_eos: bool,
    special_strings: SpecialTokenStrings,
    chat_template: Option<chat::ChatTemplate>,
}

impl Tokenizer {
    /// A Hugging Face checkpoint directory: tokenizer.json, or else GPT-2's slow-tokenizer files
    /// vocab.json + merges.txt (byte-level BPE built as transformers' `GPT2Tokenizer` builds it,
    /// see `gpt2_files`), + tokenizer_config.json for chat_template, bos/eos/add_bos_token,
    /// add_eos_token (and, for the GPT-2 files, add_prefix_space, added_tokens_decoder,
    /// extra/additional_special_tokens, with special_tokens_map.json and added_tokens.json as
    /// legacy fallbacks), + generation_config.json eos_token_id which may be an int or a list.
    /// Ok(None) if the dir has neither tokenizer.json nor vocab.json/merges.txt. A
    /// `chat_template.jinja` (or `chat_template.json`) next to them takes precedence over the
    /// config's `chat_template`, as in transformers.
    pub fn from_hf_dir(dir: &Path) -> Result<Option<Tokenizer>, TokenizerError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_json_if_exists(&config_path)?;
        let config_str = |field: &'static str| -> Result<Option<String>, TokenizerError> {
            config
                .as_ref()
                .map_or(Ok(None), |c| token_string(c, &config_path, field))
        };
        let config_bool = |field: &'static str| -> Result<Option<bool>, TokenizerError> {
            match config.as_ref().and_then(|c| c.get(field)) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
                Some(other) => Err(TokenizerError::Config {
                    path: config_path.clone(),
                    field,
                    problem: format!("expected a bool, got {other}"),
                }),
            }
        };

        // tokenizer.json takes precedence over vocab.json + merges.txt, as in transformers.
        let tokenizer_path = dir.join("tokenizer.json");
        let (inner, special_strings) = if tokenizer_path.is_file() {
            let inner = tokenizers::Tokenizer::from_file(&tokenizer_path).map_err(|e| {
                TokenizerError::TokenizerJson {
                    path: tokenizer_path.clone(),
                    message: e.to_string(),
                }
            })?;
            let special_strings = SpecialTokenStrings {
                bos: config_str("bos_token")?,
                eos: config_str("eos_token")?,
                unk: config_str("unk_token")?,
                pad: config_str("pad_token")?,
            };
            (inner, special_strings)
        } else if let Some(gpt2) = gpt2_files::load(dir, config.as_ref(), &config_path)? {
            (gpt2.inner, gpt2.special_strings)
        } else {
            return Ok(None);
        };

        let template_source = read_hf_chat_template(dir, config.as_ref(), &config_path)?;
        let chat_template = template_source.map(chat::ChatTemplate::new).transpose()?;

        // A tokenizer.json without a post-processor leaves BOS/EOS to the config flags.
        let has_post_processor = inner.get_post_processor().is_some();
        let add_bos = !has_post_processor && config_bool("add_bos_token")?.unwrap_or(false);
        let add_eos = !has_post_processor && config_bool("add_eos_token")?.unwrap_or(false);

        let token_id = |s: &Option<String>| s.as_deref().and_then(|t| inner.token_to_id(t));
        let mut bos_token_id = token_id(&special_strings.bos);
        let mut eos_token_ids: Vec<u32> = token_id(&special_strings.eos).into_iter().collect();

        let generation_path = dir.join("generation_config.json");
        if let Some(generation) = read_json_if_exists(&generation_path)? {
            for id in id_list(&generation, &generation_path, "eos_token_id")? {
                if !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
            if bos_token_id.is_none() {
                bos_token_id = id_list(&generation, &generation_path, "bos_token_id")?
                    .first()
                    .copied();
            }
        }

        let vocab_size = inner.get_vocab_size(true);
        if bos_token_id.is_some_and(|id| id as usize >= vocab_size) {
            return Err(TokenizerError::Config {
                path: generation_path,
                field: "bos_token_id",
                problem: format!("{bos_token_id:?} is not below the vocab size {vocab_size}"),
            });
        }
        if let Some(&bad) = eos_token_ids.iter().find(|&&id| id as usize >= vocab_size) {
            return Err(TokenizerError::Config {
                path: generation_path,
                field: "eos_token_id",
                problem: format!("{bad} is not below the vocab size {vocab_size}"),
            });
        }
        Ok(Some(Tokenizer {
            inner,
            vocab_size,
            bos_token_id,
            eos_token_ids,
            add_bos,
            add_eos,
            special_strings,
            chat_template,
        }))
    }

    /// From GGUF metadata: `tokenizer.ggml.model` = "gpt2" (byte-level BPE: tokens + merges,
    /// pre-tokenizer chosen by `tokenizer.ggml.pre`) or "llama" (SentencePiece-style: tokens +
    /// scores + token_type, byte fallback `<0xXX>` tokens, `▁` spaces, add_space_prefix).
    /// Ok(None) if there is no `tokenizer.ggml.model`. Control tokens become special added tokens,
    /// user-defined ones plain added tokens; `tokenizer.chat_template` is the chat template.
    pub fn from_gguf_metadata(
        md: &BTreeMap<String, MetadataValue>,
    ) -> Result<Option<Tokenizer>, TokenizerError> {
        let Some(vocab) = gguf_vocab::GgufVocab::from_metadata(md)? else {
            return Ok(None);
        };
        let inner = vocab.build()?;
        let token_string =
            |id: Option<u32>| id.and_then(|id| vocab.tokens.get(id as usize).cloned());
        let special_strings = SpecialTokenStrings {
            bos: token_string(vocab.bos_token_id),
            eos: token_string(vocab.eos_token_id),
            unk: token_string(vocab.unk_token_id),
            pad: token_string(vocab.pad_token_id),
        };
        let mut eos_token_ids: Vec<u32> = Vec::new();
        for id in [vocab.eos_token_id, vocab.eot_token_id, vocab.eom_token_id]
            .into_iter()
            .flatten()
        {
            if !eos_token_ids.contains(&id) {
                eos_token_ids.push(id);
            }
        }
        let chat_template = vocab
            .chat_template
            .clone()
            .map(chat::ChatTemplate::new)
            .transpose()?;
        Ok(Some(Tokenizer {
            vocab_size: vocab.tokens.len(),
            inner,
            bos_token_id: vocab.bos_token_id,
            eos_token_ids,
            add_bos: vocab.add_bos && vocab.bos_token_id.is_some(),
            add_eos: vocab.add_eos && vocab.eos_token_id.is_some(),
            special_strings,
            chat_template,
        }))
    }

    /// Token ids of `text`. Special tokens written in the text (`<|im_start|>`) are recognized;
    /// `add_special_tokens` adds the model's BOS/EOS where it wants them.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TokenizerError> {
        let encoding =
            self.inner
                .encode(text, add_special_tokens)
                .map_err(|e| TokenizerError::Encode {
                    num_bytes: text.len(),
                    message: e.to_string(),
                })?;
        let ids = encoding.get_ids();
        let mut out = Vec::with_capacity(ids.len() + 2);
        if add_special_tokens && self.add_bos {
            out.extend(self.bos_token_id);
        }
        out.extend_from_slice(ids);
        if add_special_tokens && self.add_eos {
            out.extend(self.eos_token_ids.first());
        }
        Ok(out)
    }

    /// Text of `ids`; every id must be below `vocab_size()`. Byte tokens that do not form valid
    /// UTF-8 decode to U+FFFD.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TokenizerError> {
        if let Some(&token_id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(TokenizerError::TokenIdOutOfRange {
                token_id,
                vocab_size: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| TokenizerError::Decode {
                num_ids: ids.len(),
                message: e.to_string(),
            })
    }

    /// Number of ids, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The id `encode` puts first when the model adds BOS (None: the model has no BOS token).
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// Every id that ends generation (EOS, and EOT/EOM or generation_config's extra ids).
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The chat template's Jinja source, if the model has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_ref().map(|t| t.source())
    }

    /// Renders the chat template (HF semantics: messages, add_generation_prompt, bos_token,
    /// eos_token, raise_exception, strftime_now …). Error if no template.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, TokenizerError> {
        let template = self
            .chat_template
            .as_ref()
            .ok_or(TokenizerError::NoChatTemplate)?;
        template.render(messages, add_generation_prompt, &self.special_strings)
    }
}

fn read_json_if_exists(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|source| TokenizerError::Json {
            path: path.to_path_buf(),
            source,
        })
}

/// A special token in tokenizer_config.json: a string, `{"content": ..}` (a serialized
/// AddedToken) or null.
fn token_string(
    config: &serde_json::Value,
    path: &Path,
    field: &'static str,
) -> Result<Option<String>, TokenizerError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Object(o)) => match o.get("content") {
            Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
            _ => Err(TokenizerError::Config {
                path: path.to_path_buf(),
                field,
                problem: "an object without a string `content`".into(),
            }),
        },
        Some(other) => Err(TokenizerError::Config {
            path: path.to_path_buf(),
            field,
            problem: format!("expected a string or an AddedToken object, got {other}"),
        }),
    }
}

/// `eos_token_id` style fields: an int, a list of ints or null.
fn id_list(
    config: &serde_json::Value,
    path: &Path,
    field: &'static str,
) -> Result<Vec<u32>, TokenizerError> {
    let one = |v: &serde_json::Value| {
        v.as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| TokenizerError::Config {
                path: path.to_path_buf(),
                field,
                problem: format!("expected a token id (u32), got {v}"),
            })
    };
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(Vec::new()),
        Some(serde_json::Value::Array(items)) => items.iter().map(one).collect(),
        Some(v) => Ok(vec![one(v)?]),
    }
}

/// The chat template of a HF directory: `chat_template.jinja`, else `chat_template.json`, else
/// tokenizer_config's `chat_template` (a string, or a list of `{name, template}` of which the one
/// named "default" is used).
fn read_hf_chat_template(
    dir: &Path,
    config: Option<&serde_json::Value>,
    config_path: &Path,
) -> Result<Option<String>, TokenizerError> {
    let jinja_path = dir.join("chat_template.jinja");
    if jinja_path.is_file() {
        return std::fs::read_to_string(&jinja_path)
            .map(Some)
            .map_err(|source| TokenizerError::Io {
                path: jinja_path,
                source,
            });
    }
    let json_path = dir.join("chat_template.json");
    if let Some(json) = read_json_if_exists(&json_path)? {
        return template_field(&json, &json_path);
    }
    match config {
        Some(config) => template_field(config, config_path),
        None => Ok(None),
    }
}

fn template_field(json: &serde_json::Value, path: &Path) -> Result<Option<String>, TokenizerError> {
    let bad = |problem: String| TokenizerError::Config {
        path: path.to_path_buf(),
        field: "chat_template",
        problem,
    };
    match json.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(named)) => {
            let default = named
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .ok_or_else(|| {
                    bad("a list of named templates without one named \"default\"".into())
                })?;
            match default.get("template") {
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                _ => Err(bad("the \"default\" entry has no string `template`".into())),
            }
        }
        Some(other) => Err(bad(format!("expected a string or a list, got {other}"))),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn tokenizer_is_send_sync() {
        assert_send_sync::<Tokenizer>();
        assert_send_sync::<IncrementalDecoder>();
    }

    #[test]
    fn missing_tokenizer_files_is_none() {
        let dir = std::env::temp_dir().join(format!("ferrum-tok-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        assert!(Tokenizer::from_hf_dir(&dir).unwrap().is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn id_list_accepts_int_list_and_null() {
        let p = Path::new("generation_config.json");
        let v: serde_json::Value = serde_json::json!({"a": 7, "b": [1, 2], "c": null});
        assert_eq!(id_list(&v, p, "a").unwrap(), vec![7]);
        assert_eq!(id_list(&v, p, "b").unwrap(), vec![1, 2]);
        assert!(id_list(&v, p, "c").unwrap().is_empty());
        let bad = serde_json::json!({"eos_token_id": "x"});
        let err = id_list(&bad, p, "eos_token_id").unwrap_err().to_string();
        assert!(
            err.contains("eos_token_id") && err.contains("\"x\""),
            "{err}"
        );
    }

    #[test]
    fn template_field_picks_default_of_named_list() {
        let p = Path::new("tokenizer_config.json");
        let v = serde_json::json!({"chat_template": [
            {"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]});
        assert_eq!(template_field(&v, p).unwrap().as_deref(), Some("D"));
        let no_default = serde_json::json!({"chat_template": [{"name": "x", "template": "T"}]});
        assert!(template_field(&no_default, p).is_err());
    }

    #[test]
    fn token_string_reads_added_token_objects() {
        let p = Path::new("tokenizer_config.json");
        let v = serde_json::json!({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>"});
        assert_eq!(
            token_string(&v, p, "bos_token").unwrap().as_deref(),
            Some("<s>")
        );
        assert_eq!(
            token_string(&v, p, "eos_token").unwrap().as_deref(),
            Some("</s>")
        );
        assert_eq!(token_string(&v, p, "pad_token").unwrap(), None);
    }
}
