//! GPT-2 "slow tokenizer" files: a checkpoint directory with `vocab.json` + `merges.txt` (+
//! `tokenizer_config.json`, `special_tokens_map.json`, `added_tokens.json`) and no
//! `tokenizer.json`, as GPT-2, GPT-J, OPT and many GPT-2-derived checkpoints ship. Owns reading
//! and validating those files and assembling the same `tokenizers::Tokenizer` that transformers'
//! `GPT2Tokenizer` builds from them; never implements BPE itself (the `tokenizers` crate's BPE
//! model, ByteLevel pre-tokenizer/decoder and TemplateProcessing do the work) and never panics on
//! a bad file: every problem is a `TokenizerError` naming the file (and line or token).
//!
//! What transformers 5 does with these files, and therefore what this module does:
//!
//! ```text
//!   model          BPE(vocab.json, merges.txt), no unk token, no subword prefix/suffix
//!   pre-tokenizer  ByteLevel(add_prefix_space = config.add_prefix_space (default false),
//!                            GPT-2's split regex)
//!   decoder        ByteLevel (bytes back to UTF-8; invalid bytes become U+FFFD)
//!   post-proc.     [bos] $A [eos] as config.add_bos_token / add_eos_token say (default off)
//!   added tokens   tokenizer_config.added_tokens_decoder (id -> AddedToken) if present, else the
//!                  legacy special_tokens_map.json (overrides the config's named tokens) and
//!                  added_tokens.json; then every named special token (bos/eos/unk default
//!                  `<|endoftext|>`, a null disables one; pad/sep/cls/mask) and every
//!                  extra_special_tokens / additional_special_tokens entry, as a special token
//! ```
//!
//! `clean_up_tokenization_spaces` and `errors` are read by nobody: transformers 5 ignores the
//! former for BPE tokenizers and always decodes with replacement characters.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tokenizers::AddedToken;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{BPE, Merges, Vocab};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::processors::template::{SpecialToken, TemplateProcessing};

use super::{SpecialTokenStrings, TokenizerError, read_json_if_exists};

pub(super) const VOCAB_FILE: &str = "vocab.json";
pub(super) const MERGES_FILE: &str = "merges.txt";
const SPECIAL_TOKENS_MAP_FILE: &str = "special_tokens_map.json";
const ADDED_TOKENS_FILE: &str = "added_tokens.json";

/// GPT-2's default for its bos, eos and unk tokens.
const GPT2_DEFAULT_SPECIAL: &str = "<|endoftext|>";

/// `tokenizer_class` values this loader builds faithfully (absent is GPT-2 as well).
const SUPPORTED_CLASSES: &[&str] = &["GPT2Tokenizer", "GPT2TokenizerFast"];

/// The named special tokens of transformers' `SPECIAL_TOKENS_ATTRIBUTES`, in its order.
const NAMED_SPECIAL_FIELDS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// What `Tokenizer::from_hf_dir` needs from a slow-files directory.
pub(super) struct Gpt2SlowTokenizer {
    pub inner: tokenizers::Tokenizer,
    /// The effective bos/eos/unk/pad strings (config, special_tokens_map.json, GPT-2 defaults).
    pub special_strings: SpecialTokenStrings,
}

/// Builds the tokenizer of `dir` from vocab.json + merges.txt. Ok(None) when neither file is
/// there; an error when only one of them is. `config` is the parsed tokenizer_config.json.
pub(super) fn load(
    dir: &Path,
    config: Option<&serde_json::Value>,
    config_path: &Path,
) -> Result<Option<Gpt2SlowTokenizer>, TokenizerError> {
    let vocab_path = dir.join(VOCAB_FILE);
    let merges_path = dir.join(MERGES_FILE);
    match (vocab_path.is_file(), merges_path.is_file()) {
        (false, false) => return Ok(None),
        (true, false) => {
            return Err(TokenizerError::MissingFile {
                path: merges_path,
                needed_by: vocab_path,
            });
        }
        (false, true) => {
            return Err(TokenizerError::MissingFile {
                path: vocab_path,
                needed_by: merges_path,
            });
        }
        (true, true) => {}
    }
    if let Some(class) = config.and_then(|c| c.get("tokenizer_class")) {
        let supported = class
            .as_str()
            .is_some_and(|c| SUPPORTED_CLASSES.contains(&c));
        if !supported && !class.is_null() {
            return Err(TokenizerError::Config {
                path: config_path.to_path_buf(),
                field: "tokenizer_class",
                problem: format!(
                    "{class} is not supported for a directory with {VOCAB_FILE} + {MERGES_FILE} \
                     and no tokenizer.json (supported: {})",
                    SUPPORTED_CLASSES.join(", ")
                ),
            });
        }
    }

    let vocab = read_vocab(&vocab_path)?;
    let merges = read_merges(&merges_path, &vocab)?;
    let num_vocab_ids = vocab.len();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| TokenizerError::BadFile {
            path: merges_path.clone(),
            problem: format!("building the BPE model: {e}"),
        })?;

    let settings = SpecialSettings::read(dir, config, config_path)?;
    let mut inner = tokenizers::Tokenizer::new(bpe);
    // ByteLevel(add_prefix_space, trim_offsets = true, use_regex = true): GPT-2's split.
    inner.with_pre_tokenizer(Some(ByteLevel::new(settings.add_prefix_space, true, true)));
    inner.with_decoder(Some(ByteLevelDecoder::default()));

    // Declared ids first (sorted, so that new tokens get the ids they were saved with), then the
    // named and extra special tokens that are not added yet.
    inner
        .add_tokens(settings.declared.values().cloned().collect::<Vec<_>>())
        .map_err(|e| TokenizerError::BadFile {
            path: settings.declared_source.clone(),
            problem: format!("adding tokens: {e}"),
        })?;
    for (&declared_id, token) in &settings.declared {
        let got = inner.token_to_id(&token.content);
        if got != Some(declared_id) {
            return Err(TokenizerError::BadFile {
                path: settings.declared_source.clone(),
                problem: format!(
                    "added token {:?} is declared with id {declared_id} but gets id {got:?} \
                     ({VOCAB_FILE} has {num_vocab_ids} tokens; added ids must follow them in \
                     order)",
                    token.content
                ),
            });
        }
    }
    let named: Vec<AddedToken> = settings
        .named
        .values()
        .chain(&settings.extra)
        .filter(|t| !settings.declared.values().any(|d| d.content == t.content))
        .cloned()
        .collect();
    inner
        .add_tokens(named)
        .map_err(|e| TokenizerError::BadFile {
            path: config_path.to_path_buf(),
            problem: format!("adding special tokens: {e}"),
        })?;

    let named_string = |field: &str| settings.named.get(field).map(|t| t.content.clone());
    let special_strings = SpecialTokenStrings {
        bos: named_string("bos_token"),
        eos: named_string("eos_token"),
        unk: named_string("unk_token"),
        pad: named_string("pad_token"),
    };
    // transformers turns add_bos_token / add_eos_token off when the token is null.
    let template_token = |add: bool, key: &str, token: &Option<String>| {
        let token = token.as_ref().filter(|_| add)?;
        let id = inner.token_to_id(token)?;
        SpecialToken::new(key.to_string(), vec![id], vec![token.clone()]).ok()
    };
    let bos = template_token(settings.add_bos_token, "bos", &special_strings.bos);
    let eos = template_token(settings.add_eos_token, "eos", &special_strings.eos);
    // Set even without bos/eos: it tells `from_hf_dir` that the inner tokenizer already decided.
    let processor = bos_eos_template(bos, eos).map_err(|e| TokenizerError::BadFile {
        path: config_path.to_path_buf(),
        problem: format!("building the bos/eos template: {e}"),
    })?;
    inner.with_post_processor(Some(processor));
    Ok(Some(Gpt2SlowTokenizer {
        inner,
        special_strings,
    }))
}

/// transformers' post-processor: `[bos:0] $A:0 [eos:0]`, the pair adds `[bos:1] $B:1 [eos:1]`
/// (a plain `$A:0` without either). The keys "bos"/"eos" name the special tokens in the template,
/// so any token content works (a `:` or a leading `$` in the token would break a template that
/// spelled the token itself).
fn bos_eos_template(
    bos: Option<SpecialToken>,
    eos: Option<SpecialToken>,
) -> Result<TemplateProcessing, String> {
    let template = |sequence: &str, type_id: u32| {
        let mut pieces = Vec::with_capacity(3);
        if bos.is_some() {
            pieces.push(format!("bos:{type_id}"));
        }
        pieces.push(format!("{sequence}:{type_id}"));
        if eos.is_some() {
            pieces.push(format!("eos:{type_id}"));
        }
        pieces
    };
    let single = template("$A", 0);
    let pair: Vec<String> = single.iter().cloned().chain(template("$B", 1)).collect();
    TemplateProcessing::builder()
        .try_single(single)?
        .try_pair(pair)?
        .special_tokens(bos.into_iter().chain(eos).collect::<Vec<_>>())
        .build()
        .map_err(|e| e.to_string())
}

/// vocab.json: a JSON object mapping every token to a distinct u32 id.
fn read_vocab(path: &Path) -> Result<Vocab, TokenizerError> {
    let bad = |problem: String| TokenizerError::BadFile {
        path: path.to_path_buf(),
        problem,
    };
    let json = read_json_if_exists(path)?.ok_or_else(|| bad("not a file".into()))?;
    let serde_json::Value::Object(entries) = json else {
        return Err(bad(format!(
            "expected a JSON object mapping tokens to ids, got {}",
            json_kind(&json)
        )));
    };
    if entries.is_empty() {
        return Err(bad("the vocabulary is empty".into()));
    }
    let mut vocab = Vocab::with_capacity(entries.len());
    let mut token_of_id: HashMap<u32, String> = HashMap::with_capacity(entries.len());
    for (token, id) in entries {
        let token_id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| bad(format!("token {token:?} has id {id}, not a u32")))?;
        if let Some(other) = token_of_id.insert(token_id, token.clone()) {
            return Err(bad(format!(
                "tokens {other:?} and {token:?} both have id {token_id}"
            )));
        }
        vocab.insert(token, token_id);
    }
    Ok(vocab)
}

/// merges.txt: an optional `#version` line, then one merge per line, `left right` (single space),
/// both parts and their concatenation in the vocabulary, highest priority first.
fn read_merges(path: &Path, vocab: &Vocab) -> Result<Merges, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut merges = Merges::new();
    for (line_idx, line) in text.trim_end_matches(['\n', '\r']).lines().enumerate() {
        if line.starts_with("#version") {
            continue;
        }
        let bad = |problem: String| TokenizerError::BadMergesLine {
            path: path.to_path_buf(),
            line_number: line_idx + 1,
            line: line.to_string(),
            problem,
        };
        let parts: Vec<&str> = line.split(' ').collect();
        let [left, right] = parts[..] else {
            return Err(bad(format!(
                "expected two tokens separated by one space, got {} part(s)",
                parts.len()
            )));
        };
        if left.is_empty() || right.is_empty() {
            return Err(bad("a token of the merge is empty".into()));
        }
        let merged = format!("{left}{right}");
        for token in [left, right, merged.as_str()] {
            if !vocab.contains_key(token) {
                return Err(bad(format!("{token:?} is not in {VOCAB_FILE}")));
            }
        }
        merges.push((left.to_string(), right.to_string()));
    }
    Ok(merges)
}

/// The special-token settings of the directory, merged the way transformers 5's
/// `from_pretrained` merges them.
struct SpecialSettings {
    add_prefix_space: bool,
    add_bos_token: bool,
    add_eos_token: bool,
    /// Tokens saved with their ids (added_tokens_decoder or added_tokens.json), by id.
    declared: BTreeMap<u32, AddedToken>,
    /// The file `declared` came from (for errors).
    declared_source: PathBuf,
    /// Named special tokens by field (`bos_token` ...), nulls and absent non-defaults left out.
    named: BTreeMap<&'static str, AddedToken>,
    /// extra_special_tokens / additional_special_tokens.
    extra: Vec<AddedToken>,
}

impl SpecialSettings {
    fn read(
        dir: &Path,
        config: Option<&serde_json::Value>,
        config_path: &Path,
    ) -> Result<SpecialSettings, TokenizerError> {
        let empty = serde_json::Map::new();
        let config_map = match config {
            None => &empty,
            Some(serde_json::Value::Object(map)) => map,
            Some(other) => {
                return Err(TokenizerError::BadFile {
                    path: config_path.to_path_buf(),
                    problem: format!("expected a JSON object, got {}", json_kind(other)),
                });
            }
        };
        let flag = |field: &'static str| -> Result<bool, TokenizerError> {
            match config_map.get(field) {
                None | Some(serde_json::Value::Null) => Ok(false),
                Some(serde_json::Value::Bool(b)) => Ok(*b),
                Some(other) => Err(TokenizerError::Config {
                    path: config_path.to_path_buf(),
                    field,
                    problem: format!("expected a bool, got {other}"),
                }),
            }
        };
        let add_prefix_space = flag("add_prefix_space")?;
        let add_bos_token = flag("add_bos_token")?;
        let add_eos_token = flag("add_eos_token")?;

        // (field, value, file it came from): the config, overridden by special_tokens_map.json
        // when the config has no added_tokens_decoder (transformers' legacy path).
        let mut fields: BTreeMap<String, (serde_json::Value, PathBuf)> = config_map
            .iter()
            .map(|(k, v)| (k.clone(), (v.clone(), config_path.to_path_buf())))
            .collect();
        let mut declared = BTreeMap::new();
        let mut declared_source = config_path.to_path_buf();
        let legacy_added_tokens: Option<(serde_json::Value, PathBuf)>;
        if let Some(decoder) = config_map.get("added_tokens_decoder") {
            let serde_json::Value::Object(entries) = decoder else {
                return Err(TokenizerError::Config {
                    path: config_path.to_path_buf(),
                    field: "added_tokens_decoder",
                    problem: format!("expected an object of id -> token, got {decoder}"),
                });
            };
            for (id, token) in entries {
                let token_id: u32 = id.parse().map_err(|_| TokenizerError::Config {
                    path: config_path.to_path_buf(),
                    field: "added_tokens_decoder",
                    problem: format!("key {id:?} is not a token id"),
                })?;
                let token = added_token(token, false, config_path, "added_tokens_decoder")?
                    .ok_or_else(|| TokenizerError::Config {
                        path: config_path.to_path_buf(),
                        field: "added_tokens_decoder",
                        problem: format!("entry {id} is null"),
                    })?;
                declared.insert(token_id, token);
            }
            legacy_added_tokens = None;
        } else {
            let map_path = dir.join(SPECIAL_TOKENS_MAP_FILE);
            if let Some(map) = read_json_if_exists(&map_path)? {
                let serde_json::Value::Object(entries) = map else {
                    return Err(TokenizerError::BadFile {
                        path: map_path,
                        problem: format!("expected a JSON object, got {}", json_kind(&map)),
                    });
                };
                for (k, v) in entries {
                    fields.insert(k, (v, map_path.clone()));
                }
            }
            let added_path = dir.join(ADDED_TOKENS_FILE);
            legacy_added_tokens = read_json_if_exists(&added_path)?.map(|v| (v, added_path));
        }

        let mut named = BTreeMap::new();
        for field in NAMED_SPECIAL_FIELDS {
            let token = match fields.get(field) {
                Some((value, path)) => added_token(value, true, path, field)?,
                None if matches!(field, "bos_token" | "eos_token" | "unk_token") => {
                    Some(AddedToken::from(GPT2_DEFAULT_SPECIAL, true).normalized(false))
                }
                None => None,
            };
            if let Some(token) = token {
                named.insert(field, token);
            }
        }
        let mut extra = Vec::new();
        for field in ["extra_special_tokens", "additional_special_tokens"] {
            let Some((value, path)) = fields.get(field) else {
                continue;
            };
            let items: Vec<&serde_json::Value> = match value {
                serde_json::Value::Null => Vec::new(),
                serde_json::Value::Array(items) => items.iter().collect(),
                // transformers 5: a dict of model-specific named tokens.
                serde_json::Value::Object(map) => map.values().collect(),
                other => {
                    return Err(TokenizerError::BadFile {
                        path: path.clone(),
                        problem: format!("`{field}`: expected a list, got {other}"),
                    });
                }
            };
            for item in items {
                if let Some(token) = added_token(item, true, path, field)?
                    && !extra
                        .iter()
                        .any(|t: &AddedToken| t.content == token.content)
                {
                    extra.push(token);
                }
            }
        }

        if let Some((added, added_path)) = legacy_added_tokens {
            let serde_json::Value::Object(entries) = added else {
                return Err(TokenizerError::BadFile {
                    path: added_path,
                    problem: format!(
                        "expected an object of token -> id, got {}",
                        json_kind(&added)
                    ),
                });
            };
            for (content, id) in entries {
                let token_id = id
                    .as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| TokenizerError::BadFile {
                        path: added_path.clone(),
                        problem: format!("token {content:?} has id {id}, not a u32"),
                    })?;
                let special = named.values().chain(&extra).any(|t| t.content == content);
                declared.insert(
                    token_id,
                    AddedToken::from(content, special).normalized(!special),
                );
            }
            declared_source = added_path;
        }
        Ok(SpecialSettings {
            add_prefix_space,
            add_bos_token,
            add_eos_token,
            declared,
            declared_source,
            named,
            extra,
        })
    }
}

/// A token in tokenizer_config.json / special_tokens_map.json: null, a string, or a serialized
/// AddedToken `{"content", "lstrip", "rstrip", "normalized", "single_word", "special"}`. Named
/// special tokens (`force_special`) are always special; otherwise `special` defaults to false and
/// `normalized` to `!special`, as in transformers' `AddedToken`.
fn added_token(
    value: &serde_json::Value,
    force_special: bool,
    path: &Path,
    field: &str,
) -> Result<Option<AddedToken>, TokenizerError> {
    let bad = |problem: String| TokenizerError::BadFile {
        path: path.to_path_buf(),
        problem: format!("`{field}`: {problem}"),
    };
    let object = match value {
        serde_json::Value::Null => return Ok(None),
        serde_json::Value::String(s) => {
            return Ok(Some(
                AddedToken::from(s.clone(), force_special).normalized(!force_special),
            ));
        }
        serde_json::Value::Object(object) => object,
        other => {
            return Err(bad(format!(
                "expected a string or an AddedToken object, got {other}"
            )));
        }
    };
    let Some(serde_json::Value::String(content)) = object.get("content") else {
        return Err(bad(format!(
            "an AddedToken object without a string `content`: {value}"
        )));
    };
    let flag = |name: &str| -> Result<Option<bool>, TokenizerError> {
        match object.get(name) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(serde_json::Value::Bool(b)) => Ok(Some(*b)),
            Some(other) => Err(bad(format!(
                "`{name}` of {content:?} is {other}, not a bool"
            ))),
        }
    };
    let special = force_special || flag("special")?.unwrap_or(false);
    Ok(Some(
        AddedToken::from(content.clone(), special)
            .single_word(flag("single_word")?.unwrap_or(false))
            .lstrip(flag("lstrip")?.unwrap_or(false))
            .rstrip(flag("rstrip")?.unwrap_or(false))
            .normalized(flag("normalized")?.unwrap_or(!special)),
    ))
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a bool",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
