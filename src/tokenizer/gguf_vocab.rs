//! Rebuilds a `tokenizers::Tokenizer` from GGUF `tokenizer.ggml.*` metadata. Owns the mapping
//! from llama.cpp's vocabulary description (token list, merges or scores, token types, pre-type)
//! to a normalizer / pre-tokenizer / BPE model / decoder. Never reads files and never panics on
//! bad metadata: a missing or mistyped key is a `TokenizerError::Metadata` naming it.
//!
//! Two vocabulary kinds:
//! - `gpt2`: byte-level BPE. Tokens are spelled in GPT-2's byte alphabet (`Ġ` for a space); the
//!   pre-tokenizer regex depends on `tokenizer.ggml.pre` (the split the merges were learned on).
//! - `llama`: SentencePiece BPE. Merges are recovered from the scores (a pair merges into a piece
//!   with that piece's score, best first, as transformers' `generate_merges` orders them); spaces
//!   become `▁`, and with `add_space_prefix` a `▁` is prepended to every text segment (between
//!   added tokens), as sentencepiece, llama.cpp and Llama's own tokenizer.json do. Characters
//!   outside the vocabulary fall back to `<0xXX>` byte tokens.

use std::collections::{BTreeMap, HashMap};

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::normalizers::{NormalizerWrapper, Prepend, Replace};
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior};

use super::TokenizerError;
use crate::loader::gguf::MetadataValue;

/// llama.cpp token types (`tokenizer.ggml.token_type`).
const TOKEN_TYPE_UNKNOWN: i64 = 2;
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// SentencePiece's space marker.
const SPM_SPACE: char = '\u{2581}';

/// Llama 3 style split (also llama-bpe, falcon3, dbrx, smaug-bpe, ...).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2 style split: like Llama 3 but single digits.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// GPT-4o / Llama 4 style split (case-aware words).
const GPT4O_SPLIT: &str = r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VocabKind {
    /// Byte-level BPE (`tokenizer.ggml.model = "gpt2"`).
    ByteLevelBpe,
    /// SentencePiece BPE with byte fallback (`tokenizer.ggml.model = "llama"`).
    SentencePiece,
}

impl VocabKind {
    fn name(self) -> &'static str {
        match self {
            VocabKind::ByteLevelBpe => "gpt2",
            VocabKind::SentencePiece => "llama",
        }
    }
}

/// The tokenizer part of GGUF metadata, read and type-checked.
#[derive(Debug, Clone)]
pub(super) struct GgufVocab {
    kind: VocabKind,
    /// `tokenizer.ggml.pre` (byte-level only).
    pre: Option<String>,
    pub tokens: Vec<String>,
    scores: Option<Vec<f32>>,
    token_types: Option<Vec<i64>>,
    merges: Option<Vec<String>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    pub eot_token_id: Option<u32>,
    pub eom_token_id: Option<u32>,
    pub unk_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    pub add_bos: bool,
    pub add_eos: bool,
    add_space_prefix: bool,
    pub chat_template: Option<String>,
}

fn bad(key: &str, problem: impl Into<String>) -> TokenizerError {
    TokenizerError::Metadata {
        key: key.to_string(),
        problem: problem.into(),
    }
}

fn get_str<'a>(
    md: &'a BTreeMap<String, MetadataValue>,
    key: &str,
) -> Result<Option<&'a str>, TokenizerError> {
    md.get(key)
        .map(|v| {
            v.as_str()
                .ok_or_else(|| bad(key, format!("expected a string, got {}", describe(v))))
        })
        .transpose()
}

fn get_bool(
    md: &BTreeMap<String, MetadataValue>,
    key: &str,
) -> Result<Option<bool>, TokenizerError> {
    md.get(key)
        .map(|v| {
            v.as_bool()
                .ok_or_else(|| bad(key, format!("expected a bool, got {}", describe(v))))
        })
        .transpose()
}

fn get_array<'a>(
    md: &'a BTreeMap<String, MetadataValue>,
    key: &str,
) -> Result<Option<&'a [MetadataValue]>, TokenizerError> {
    md.get(key)
        .map(|v| {
            v.as_array()
                .ok_or_else(|| bad(key, format!("expected an array, got {}", describe(v))))
        })
        .transpose()
}

fn get_string_array(
    md: &BTreeMap<String, MetadataValue>,
    key: &str,
) -> Result<Option<Vec<String>>, TokenizerError> {
    let Some(items) = get_array(md, key)? else {
        return Ok(None);
    };
    items
        .iter()
        .enumerate()
        .map(|(idx, v)| {
            v.as_str().map(str::to_string).ok_or_else(|| {
                bad(
                    key,
                    format!("element {idx}: expected a string, got {}", describe(v)),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
}

/// A token id that must index `tokens`.
fn get_token_id(
    md: &BTreeMap<String, MetadataValue>,
    key: &str,
    num_tokens: usize,
) -> Result<Option<u32>, TokenizerError> {
    let Some(v) = md.get(key) else {
        return Ok(None);
    };
    let id = v
        .as_u64()
        .and_then(|id| u32::try_from(id).ok())
        .ok_or_else(|| bad(key, format!("expected a token id, got {}", describe(v))))?;
    if id as usize >= num_tokens {
        return Err(bad(
            key,
            format!("token id {id} is not below the number of tokens {num_tokens}"),
        ));
    }
    Ok(Some(id))
}

/// Short description of a value for error messages (arrays by length, not content).
fn describe(v: &MetadataValue) -> String {
    match v {
        MetadataValue::Array(a) => format!("an array of {} values", a.len()),
        MetadataValue::String(s) if s.len() > 64 => format!("a string of {} bytes", s.len()),
        other => format!("{other:?}"),
    }
}

impl GgufVocab {
    /// Ok(None) when there is no `tokenizer.ggml.model`, or it is `"none"` (llama.cpp's marker
    /// for a model without a vocabulary: token ids in, token ids out).
    pub fn from_metadata(
        md: &BTreeMap<String, MetadataValue>,
    ) -> Result<Option<GgufVocab>, TokenizerError> {
        const MODEL: &str = "tokenizer.ggml.model";
        let Some(model) = get_str(md, MODEL)? else {
            return Ok(None);
        };
        if model == "none" {
            return Ok(None);
        }
        let kind = match model {
            "gpt2" => VocabKind::ByteLevelBpe,
            "llama" => VocabKind::SentencePiece,
            other => {
                return Err(TokenizerError::UnsupportedModel {
                    value: other.to_string(),
                });
            }
        };
        const TOKENS: &str = "tokenizer.ggml.tokens";
        let tokens = get_string_array(md, TOKENS)?.ok_or_else(|| bad(TOKENS, "missing"))?;
        if tokens.is_empty() {
            return Err(bad(TOKENS, "empty"));
        }
        let num_tokens = tokens.len();

        const SCORES: &str = "tokenizer.ggml.scores";
        let scores = get_array(md, SCORES)?
            .map(|items| {
                items
                    .iter()
                    .enumerate()
                    .map(|(idx, v)| {
                        v.as_f64().map(|s| s as f32).ok_or_else(|| {
                            bad(
                                SCORES,
                                format!("element {idx}: expected a number, got {v:?}"),
                            )
                        })
                    })
                    .collect::<Result<Vec<f32>, _>>()
            })
            .transpose()?;
        if scores.as_ref().is_some_and(|s| s.len() != num_tokens) {
            return Err(bad(
                SCORES,
                format!(
                    "{} scores for {num_tokens} tokens",
                    scores.as_ref().map_or(0, Vec::len)
                ),
            ));
        }

        const TYPES: &str = "tokenizer.ggml.token_type";
        let token_types = get_array(md, TYPES)?
            .map(|items| {
                items
                    .iter()
                    .enumerate()
                    .map(|(idx, v)| match v {
                        MetadataValue::I8(x) => Ok(i64::from(*x)),
                        MetadataValue::I16(x) => Ok(i64::from(*x)),
                        MetadataValue::I32(x) => Ok(i64::from(*x)),
                        MetadataValue::I64(x) => Ok(*x),
                        other => other
                            .as_u64()
                            .and_then(|x| i64::try_from(x).ok())
                            .ok_or_else(|| {
                                bad(
                                    TYPES,
                                    format!("element {idx}: expected an integer, got {other:?}"),
                                )
                            }),
                    })
                    .collect::<Result<Vec<i64>, _>>()
            })
            .transpose()?;
        if token_types.as_ref().is_some_and(|t| t.len() != num_tokens) {
            return Err(bad(
                TYPES,
                format!(
                    "{} token types for {num_tokens} tokens",
                    token_types.as_ref().map_or(0, Vec::len)
                ),
            ));
        }

        const MERGES: &str = "tokenizer.ggml.merges";
        let merges = get_string_array(md, MERGES)?;
        match kind {
            VocabKind::ByteLevelBpe if merges.is_none() => {
                return Err(bad(MERGES, "missing (a gpt2 vocabulary needs merges)"));
            }
            VocabKind::SentencePiece if merges.is_none() && scores.is_none() => {
                return Err(bad(
                    SCORES,
                    "missing (a llama vocabulary without merges needs scores)",
                ));
            }
            _ => {}
        }

        let pre = get_str(md, "tokenizer.ggml.pre")?.map(str::to_string);
        let chat_template = get_str(md, "tokenizer.chat_template")?.map(str::to_string);
        // llama.cpp adds BOS to a sentencepiece vocabulary that does not say otherwise.
        let add_bos = get_bool(md, "tokenizer.ggml.add_bos_token")?
            .unwrap_or(kind == VocabKind::SentencePiece);
        let add_eos = get_bool(md, "tokenizer.ggml.add_eos_token")?.unwrap_or(false);
        let add_space_prefix = get_bool(md, "tokenizer.ggml.add_space_prefix")?
            .unwrap_or(kind == VocabKind::SentencePiece);
        Ok(Some(GgufVocab {
            kind,
            pre,
            scores,
            token_types,
            merges,
            bos_token_id: get_token_id(md, "tokenizer.ggml.bos_token_id", num_tokens)?,
            eos_token_id: get_token_id(md, "tokenizer.ggml.eos_token_id", num_tokens)?,
            eot_token_id: get_token_id(md, "tokenizer.ggml.eot_token_id", num_tokens)?,
            eom_token_id: get_token_id(md, "tokenizer.ggml.eom_token_id", num_tokens)?,
            unk_token_id: get_token_id(md, "tokenizer.ggml.unknown_token_id", num_tokens)?,
            pad_token_id: get_token_id(md, "tokenizer.ggml.padding_token_id", num_tokens)?,
            add_bos,
            add_eos,
            add_space_prefix,
            chat_template,
            tokens,
        }))
    }

    pub fn build(&self) -> Result<tokenizers::Tokenizer, TokenizerError> {
        let build_err = |message: String| TokenizerError::Build {
            kind: self.kind.name(),
            message,
        };
        let mut tokenizer = match self.kind {
            VocabKind::ByteLevelBpe => self.build_byte_level()?,
            VocabKind::SentencePiece => self.build_sentencepiece()?,
        };
        let types = self.token_types.as_deref().unwrap_or(&[]);
        let byte_alphabet: Option<std::collections::HashSet<char>> = (self.kind
            == VocabKind::ByteLevelBpe)
            .then(|| bytes_to_unicode().into_iter().collect());
        let mut special = Vec::new();
        let mut user_defined = Vec::new();
        for (token, &token_type) in self.tokens.iter().zip(types) {
            let is_special = token_type == TOKEN_TYPE_CONTROL
                || (token_type == TOKEN_TYPE_UNKNOWN && self.kind == VocabKind::SentencePiece);
            if is_special {
                // A byte-level "control" token outside the byte alphabet is a llama.cpp
                // mislabel; adding it would grow the vocabulary past the model's.
                if byte_alphabet
                    .as_ref()
                    .is_some_and(|alphabet| !token.chars().all(|c| alphabet.contains(&c)))
                {
                    continue;
                }
                special.push(AddedToken::from(token.clone(), true).normalized(false));
            } else if token_type == TOKEN_TYPE_USER_DEFINED {
                user_defined.push(AddedToken::from(token.clone(), false).normalized(false));
            }
        }
        tokenizer
            .add_special_tokens(special)
            .map_err(|e| build_err(format!("adding control tokens: {e}")))?;
        tokenizer
            .add_tokens(user_defined)
            .map_err(|e| build_err(format!("adding user-defined tokens: {e}")))?;
        let num_ids = tokenizer.get_vocab_size(true);
        if num_ids != self.tokens.len() {
            return Err(build_err(format!(
                "the rebuilt vocabulary has {num_ids} ids but the metadata lists {} tokens \
                 (duplicate tokens?)",
                self.tokens.len()
            )));
        }
        Ok(tokenizer)
    }

    fn build_byte_level(&self) -> Result<tokenizers::Tokenizer, TokenizerError> {
        let build_err = |message: String| TokenizerError::Build {
            kind: "gpt2",
            message,
        };
        let alphabet = bytes_to_unicode();
        let in_alphabet: std::collections::HashSet<char> = alphabet.iter().copied().collect();
        // Tokens outside the byte alphabet are respelled from their UTF-8 bytes.
        let vocab: Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, token)| {
                let spelled = if token.chars().all(|c| in_alphabet.contains(&c)) {
                    token.clone()
                } else {
                    token.bytes().map(|b| alphabet[b as usize]).collect()
                };
                (spelled, id as u32)
            })
            .collect();
        let merges = self.parsed_merges()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| build_err(format!("BPE model: {e}")))?;
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);
        tokenizer.with_pre_tokenizer(Some(self.byte_level_pre_tokenizer()?));
        tokenizer.with_decoder(Some(ByteLevel::new(false, true, true)));
        Ok(tokenizer)
    }

    /// The split the merges were learned on, by `tokenizer.ggml.pre` (GPT-2's regex otherwise).
    fn byte_level_pre_tokenizer(&self) -> Result<PreTokenizerWrapper, TokenizerError> {
        let split_regex = match self.pre.as_deref() {
            Some(
                "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral"
                | "midm-2.0" | "lfm2" | "dbrx" | "smaug-bpe",
            ) => Some(LLAMA3_SPLIT),
            Some("qwen2" | "deepseek-r1-qwen" | "megrez") => Some(QWEN2_SPLIT),
            Some("gpt-4o" | "llama4" | "minimax-m2") => Some(GPT4O_SPLIT),
            _ => None,
        };
        if let Some(regex) = split_regex {
            let split = Split::new(
                SplitPattern::Regex(regex.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(|e| TokenizerError::Metadata {
                key: "tokenizer.ggml.pre".into(),
                problem: format!("split regex for {:?}: {e}", self.pre),
            })?;
            return Ok(PreTokenizerSequence::new(vec![
                split.into(),
                ByteLevel::new(false, true, false).into(),
            ])
            .into());
        }
        if self.pre.as_deref() == Some("smollm") {
            // SmolLM's tokenizer.json: every digit on its own, then GPT-2's regex.
            return Ok(PreTokenizerSequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into());
        }
        Ok(ByteLevel::new(false, true, true).into())
    }

    fn parsed_merges(&self) -> Result<Merges, TokenizerError> {
        const MERGES: &str = "tokenizer.ggml.merges";
        let Some(merges) = &self.merges else {
            return Ok(Vec::new());
        };
        merges
            .iter()
            .enumerate()
            .map(|(idx, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .ok_or_else(|| {
                        bad(
                            MERGES,
                            format!("merge {idx} ({m:?}) is not two space-separated tokens"),
                        )
                    })
            })
            .collect()
    }

    fn build_sentencepiece(&self) -> Result<tokenizers::Tokenizer, TokenizerError> {
        let build_err = |message: String| TokenizerError::Build {
            kind: "llama",
            message,
        };
        let merges = match (&self.merges, &self.scores) {
            (Some(_), _) => self.parsed_merges()?,
            (None, Some(scores)) => merges_from_scores(&self.tokens, scores),
            (None, None) => Vec::new(),
        };
        let vocab: Vocab = self
            .tokens
            .iter()
            .enumerate()
            .map(|(id, t)| (t.clone(), id as u32))
            .collect();
        let mut builder = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .fuse_unk(true)
            .byte_fallback(true);
        if let Some(unk) = self.unk_token_id {
            builder = builder.unk_token(self.tokens[unk as usize].clone());
        }
        let bpe = builder
            .build()
            .map_err(|e| build_err(format!("BPE model: {e}")))?;
        let mut tokenizer = tokenizers::Tokenizer::new(bpe);

        let replace_spaces = Replace::new(" ", SPM_SPACE.to_string())
            .map_err(|e| build_err(format!("space normalizer: {e}")))?;
        let normalizer: NormalizerWrapper = if self.add_space_prefix {
            tokenizers::normalizers::Sequence::new(vec![
                Prepend::new(SPM_SPACE.to_string()).into(),
                replace_spaces.into(),
            ])
            .into()
        } else {
            replace_spaces.into()
        };
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| build_err(format!("normalizer: {e}")))?;

        let space_back = Replace::new(SPM_SPACE.to_string(), " ")
            .map_err(|e| build_err(format!("space decoder: {e}")))?;
        let mut decoders: Vec<DecoderWrapper> = vec![
            space_back.into(),
            ByteFallback::new().into(),
            Fuse::new().into(),
        ];
        if self.add_space_prefix {
            decoders.push(Strip::new(' ', 1, 0).into());
        }
        tokenizer.with_decoder(Some(DecoderSequence::new(decoders)));
        Ok(tokenizer)
    }
}

/// GPT-2's byte alphabet: byte `b` is spelled `bytes_to_unicode()[b]`. Printable Latin-1 bytes
/// spell themselves; the rest map to U+0100 upwards in byte order.
pub(super) fn bytes_to_unicode() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut next = 0x100u32;
    (0u32..256)
        .map(|b| {
            let code = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(code).unwrap_or(char::REPLACEMENT_CHARACTER)
        })
        .collect()
}

/// BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces of
/// the vocabulary is a merge ranked by the piece's score, best first; ties go to the longer left
/// part, then the longer right part, then vocabulary order (transformers' `generate_merges`).
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Merges {
    let ids: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(id, t)| (t.as_str(), id))
        .collect();
    // (left, right, score, num_left_chars, num_right_chars)
    let mut merges: Vec<(&str, &str, f32, usize, usize)> = Vec::new();
    for (token, &score) in tokens.iter().zip(scores) {
        let num_chars = token.chars().count();
        let mut local: Vec<(&str, &str, f32, usize, usize)> = token
            .char_indices()
            .skip(1)
            .enumerate()
            .filter_map(|(num_left, (byte_idx, _))| {
                let (left, right) = token.split_at(byte_idx);
                (ids.contains_key(left) && ids.contains_key(right)).then_some((
                    left,
                    right,
                    score,
                    num_left + 1,
                    num_chars - num_left - 1,
                ))
            })
            .collect();
        local.sort_by_key(|&(l, r, ..)| (ids.get(l).copied(), ids.get(r).copied()));
        merges.extend(local);
    }
    // Stable sort, descending on (score, left length, right length).
    merges.sort_by(|a, b| b.2.total_cmp(&a.2).then(b.3.cmp(&a.3)).then(b.4.cmp(&a.4)));
    merges
        .into_iter()
        .map(|(l, r, ..)| (l.to_string(), r.to_string()))
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = bytes_to_unicode();
        assert_eq!(a.len(), 256);
        assert_eq!(a[b' ' as usize], 'Ġ');
        assert_eq!(a[b'\n' as usize], 'Ċ');
        assert_eq!(a[b'A' as usize], 'A');
        assert_eq!(a[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn merges_follow_scores_then_lengths() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        // "bc" scores higher than "ab"; "abc" splits as ab+c and a+bc with equal score, and the
        // longer left part comes first.
        let scores = [0.0, 0.0, 0.0, -2.0, -1.0, -3.0];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            pairs,
            vec![("b", "c"), ("a", "b"), ("ab", "c"), ("a", "bc")]
        );
    }

    fn md(entries: Vec<(&str, MetadataValue)>) -> BTreeMap<String, MetadataValue> {
        entries
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    }

    fn strings(items: &[&str]) -> MetadataValue {
        MetadataValue::Array(
            items
                .iter()
                .map(|s| MetadataValue::String(s.to_string()))
                .collect(),
        )
    }

    #[test]
    fn no_model_key_is_none_and_unknown_model_errors() {
        assert!(
            GgufVocab::from_metadata(&BTreeMap::new())
                .unwrap()
                .is_none()
        );
        let m = md(vec![(
            "tokenizer.ggml.model",
            MetadataValue::String("rwkv".into()),
        )]);
        let err = GgufVocab::from_metadata(&m).unwrap_err().to_string();
        assert!(err.contains("rwkv"), "{err}");
    }

    #[test]
    fn errors_name_the_key() {
        let m = md(vec![
            ("tokenizer.ggml.model", MetadataValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strings(&["a", "b"])),
        ]);
        let err = GgufVocab::from_metadata(&m).unwrap_err().to_string();
        assert!(err.contains("tokenizer.ggml.merges"), "{err}");

        let m = md(vec![
            ("tokenizer.ggml.model", MetadataValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strings(&["a", "b"])),
            ("tokenizer.ggml.merges", strings(&["a b"])),
            ("tokenizer.ggml.eos_token_id", MetadataValue::U32(5)),
        ]);
        let err = GgufVocab::from_metadata(&m).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.ggml.eos_token_id") && err.contains('5'),
            "{err}"
        );

        let m = md(vec![
            ("tokenizer.ggml.model", MetadataValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", MetadataValue::U32(3)),
        ]);
        let err = GgufVocab::from_metadata(&m).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer.ggml.tokens") && err.contains("U32(3)"),
            "{err}"
        );

        let m = md(vec![
            ("tokenizer.ggml.model", MetadataValue::String("gpt2".into())),
            ("tokenizer.ggml.tokens", strings(&["a", "b", "ab"])),
            ("tokenizer.ggml.merges", strings(&["ab"])),
        ]);
        let vocab = GgufVocab::from_metadata(&m).unwrap().unwrap();
        let err = vocab.build().unwrap_err().to_string();
        assert!(err.contains("merge 0") && err.contains("\"ab\""), "{err}");
    }

    #[test]
    fn model_none_means_no_vocabulary() {
        let md = BTreeMap::from([(
            "tokenizer.ggml.model".to_string(),
            MetadataValue::String("none".into()),
        )]);
        assert!(GgufVocab::from_metadata(&md).unwrap().is_none());
        let md = BTreeMap::from([(
            "tokenizer.ggml.model".to_string(),
            MetadataValue::String("rwkv".into()),
        )]);
        assert!(GgufVocab::from_metadata(&md).is_err());
    }
}
