//! GPT-2 slow-tokenizer files (vocab.json + merges.txt, no tokenizer.json) loaded by
//! `Tokenizer::from_hf_dir`, against transformers' AutoTokenizer on the same files
//! (tests/fixtures/tokenizer/gpt2_slow_reference.json, written by
//! scripts/make_tokenizer_fixtures.py --only gpt2_slow): the directory as saved and config
//! variants, ids with and without special tokens, decodes with and without skipping them,
//! streaming, and errors that name the bad file.
#![allow(clippy::unwrap_used)]

mod tokenizer_common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokenizer_common::{fixture_path, ids, read_json};
use triton_ferrum::tokenizer::{IncrementalDecoder, Tokenizer, TokenizerError};

const FILES: [&str; 2] = ["vocab.json", "merges.txt"];

/// A fresh temp dir per test (tests run in parallel in one process).
fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrum-gpt2tok-{tag}-{}", std::process::id()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).unwrap();
    }
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A temp dir holding a copy of the fixture's vocab.json + merges.txt.
fn dir_with_gpt2_files(tag: &str) -> PathBuf {
    let dir = temp_dir(tag);
    for name in FILES {
        std::fs::copy(fixture_path(&format!("gpt2_slow/{name}")), dir.join(name)).unwrap();
    }
    dir
}

fn write_json_unless_null(path: &Path, value: &serde_json::Value) {
    if !value.is_null() {
        std::fs::write(path, serde_json::to_string_pretty(value).unwrap()).unwrap();
    }
}

fn load(dir: &Path) -> Arc<Tokenizer> {
    Arc::new(Tokenizer::from_hf_dir(dir).unwrap().unwrap())
}

/// Checks ids, ids with special tokens, the four decodes, vocab size, BOS and EOS of `tok`
/// against one reference block (`{vocab_size, bos_token_id, eos_token_id, cases}`).
fn check_against_reference(tok: &Tokenizer, reference: &serde_json::Value, what: &str) {
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 15, "{what}: only {} cases", cases.len());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let plain = tok.encode(text, false).unwrap();
        assert_eq!(plain, ids(&case["ids"]), "{what}: ids of {text:?}");
        let with_special = tok.encode(text, true).unwrap();
        assert_eq!(
            with_special,
            ids(&case["ids_with_special"]),
            "{what}: ids+special of {text:?}"
        );
        for (ids, skip, key) in [
            (&plain, false, "decoded"),
            (&plain, true, "decoded_skip_special"),
            (&with_special, false, "decoded_with_special"),
            (&with_special, true, "decoded_with_special_skip_special"),
        ] {
            assert_eq!(
                tok.decode(ids, skip).unwrap(),
                case[key].as_str().unwrap(),
                "{what}: {key} of {text:?}"
            );
        }
    }
    assert_eq!(
        tok.vocab_size(),
        reference["vocab_size"].as_u64().unwrap() as usize,
        "{what}: vocab size"
    );
    let bos = reference["bos_token_id"].as_u64().map(|id| id as u32);
    assert_eq!(tok.bos_token_id(), bos, "{what}: bos");
    let eos = reference["eos_token_id"].as_u64().map(|id| id as u32);
    assert_eq!(tok.eos_token_ids().first().copied(), eos, "{what}: eos");
}

/// Feeds every case's ids (with special tokens) one at a time to the streaming decoder; the
/// deltas plus the flushed tail must be the full decode, for both skip settings.
fn check_streaming(tok: &Arc<Tokenizer>, reference: &serde_json::Value, what: &str) {
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let with_special = ids(&case["ids_with_special"]);
        for skip in [false, true] {
            let mut decoder = IncrementalDecoder::new(tok.clone(), &[], skip);
            let mut streamed = String::new();
            for &id in &with_special {
                let delta = decoder.step(id).unwrap();
                assert!(
                    !delta.contains('\u{FFFD}'),
                    "{what}: replacement char mid-stream in {delta:?} of {text:?}"
                );
                streamed.push_str(&delta);
            }
            streamed.push_str(&decoder.flush());
            let key = if skip {
                "decoded_with_special_skip_special"
            } else {
                "decoded_with_special"
            };
            assert_eq!(
                streamed,
                case[key].as_str().unwrap(),
                "{what}: streamed {text:?} (skip_special_tokens = {skip})"
            );
        }
    }
}

#[test]
fn gpt2_slow_dir_matches_transformers() {
    let dir = fixture_path("gpt2_slow");
    assert!(
        !dir.join("tokenizer.json").exists(),
        "the fixture must exercise the vocab.json + merges.txt path"
    );
    let tok = load(&dir);
    let reference = read_json("gpt2_slow_reference.json");
    check_against_reference(&tok, &reference, "gpt2_slow");
    check_streaming(&tok, &reference, "gpt2_slow");
}

#[test]
fn gpt2_slow_config_variants_match_transformers() {
    let reference = read_json("gpt2_slow_reference.json");
    let variants = reference["variants"].as_object().unwrap();
    assert!(variants.len() >= 3);
    for (name, variant) in variants {
        let dir = dir_with_gpt2_files(&format!("variant-{name}"));
        write_json_unless_null(
            &dir.join("tokenizer_config.json"),
            &variant["tokenizer_config"],
        );
        write_json_unless_null(
            &dir.join("special_tokens_map.json"),
            &variant["special_tokens_map"],
        );
        let tok = load(&dir);
        check_against_reference(&tok, variant, name);
        check_streaming(&tok, variant, name);
        // Every added token encodes, alone, to its own id.
        for (content, id) in variant["added_vocab"].as_object().unwrap() {
            assert_eq!(
                tok.encode(content, false).unwrap(),
                vec![id.as_u64().unwrap() as u32],
                "{name}: added token {content:?}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[test]
fn gpt2_slow_reads_crlf_merges_and_legacy_added_tokens_json() {
    let reference = read_json("gpt2_slow_reference.json");
    let dir = dir_with_gpt2_files("crlf");
    let merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    std::fs::write(dir.join("merges.txt"), merges.replace('\n', "\r\n")).unwrap();
    let tok = load(&dir);
    check_against_reference(&tok, &reference["variants"]["no_files_defaults"], "crlf");

    // added_tokens.json (pre-4.34 saves): `<|pad|>` named in special_tokens_map.json is special
    // (skipped by decode), `<tool>` is a plain added token (kept).
    let vocab_size = reference["vocab_size"].as_u64().unwrap() as u32;
    std::fs::write(
        dir.join("added_tokens.json"),
        format!(
            r#"{{"<|pad|>": {vocab_size}, "<tool>": {}}}"#,
            vocab_size + 1
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("special_tokens_map.json"),
        r#"{"eos_token": "<|endoftext|>", "pad_token": {"content": "<|pad|>", "lstrip": false}}"#,
    )
    .unwrap();
    let tok = load(&dir);
    assert_eq!(tok.vocab_size(), vocab_size as usize + 2);
    let ids = tok.encode("a<|pad|>b<tool>", false).unwrap();
    assert_eq!(ids.len(), 4, "{ids:?}");
    assert_eq!(&ids[1], &vocab_size);
    assert_eq!(&ids[3], &(vocab_size + 1));
    assert_eq!(tok.decode(&ids, true).unwrap(), "ab<tool>");
    assert_eq!(tok.decode(&ids, false).unwrap(), "a<|pad|>b<tool>");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn tokenizer_json_takes_precedence_over_gpt2_files() {
    let dir = dir_with_gpt2_files("precedence");
    std::fs::copy(
        fixture_path("hf_tiny/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    let tok = load(&dir);
    let hf_reference = read_json("hf_tiny_reference.json");
    let case = &hf_reference["cases"][0];
    assert_eq!(
        tok.encode(case["text"].as_str().unwrap(), false).unwrap(),
        ids(&case["ids"])
    );
    assert_eq!(
        tok.vocab_size(),
        hf_reference["vocab_size"].as_u64().unwrap() as usize
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Loads `dir` and returns the error, which must mention `file_name` and every `needles`.
fn load_error(dir: &Path, file_name: &str, needles: &[&str]) -> TokenizerError {
    let err = Tokenizer::from_hf_dir(dir).unwrap_err();
    let message = err.to_string();
    assert!(message.contains(file_name), "{message}");
    for needle in needles {
        assert!(message.contains(needle), "{needle:?} not in {message}");
    }
    err
}

#[test]
fn gpt2_slow_missing_companion_file_is_an_error() {
    let dir = dir_with_gpt2_files("missing");
    std::fs::remove_file(dir.join("merges.txt")).unwrap();
    let err = load_error(&dir, "merges.txt", &["vocab.json"]);
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(
        matches!(&err, TokenizerError::MissingFile { path, .. } if path.ends_with("merges.txt")),
        "{err:?}"
    );

    let dir = dir_with_gpt2_files("missing-vocab");
    std::fs::remove_file(dir.join("vocab.json")).unwrap();
    let err = load_error(&dir, "vocab.json", &["merges.txt"]);
    assert!(
        matches!(&err, TokenizerError::MissingFile { path, .. } if path.ends_with("vocab.json")),
        "{err:?}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpt2_slow_bad_merges_lines_name_file_and_line() {
    let dir = dir_with_gpt2_files("bad-merges");
    let merges = std::fs::read_to_string(dir.join("merges.txt")).unwrap();
    let mut lines: Vec<&str> = merges.lines().collect();
    assert!(lines[0].starts_with("#version"));

    // Line 3 (1-based, the #version header is line 1) has three parts.
    lines[2] = "a b c";
    std::fs::write(dir.join("merges.txt"), lines.join("\n")).unwrap();
    let err = load_error(&dir, "merges.txt", &["line 3", "\"a b c\"", "two tokens"]);
    assert!(
        matches!(err, TokenizerError::BadMergesLine { line_number: 3, .. }),
        "{err:?}"
    );

    // A merge whose parts are not in the vocabulary.
    lines[2] = "Ω® ¿¿";
    std::fs::write(dir.join("merges.txt"), lines.join("\n")).unwrap();
    load_error(&dir, "merges.txt", &["line 3", "not in vocab.json"]);

    // An empty line in the middle.
    lines[2] = "";
    std::fs::write(dir.join("merges.txt"), lines.join("\n")).unwrap();
    load_error(&dir, "merges.txt", &["line 3"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpt2_slow_bad_vocab_json_names_the_file() {
    let dir = dir_with_gpt2_files("bad-vocab");
    let vocab = dir.join("vocab.json");
    std::fs::write(&vocab, r#"["a", "b"]"#).unwrap();
    load_error(&dir, "vocab.json", &["an array", "tokens to ids"]);

    std::fs::write(&vocab, r#"{"a": 0, "b": "1"}"#).unwrap();
    load_error(&dir, "vocab.json", &["\"b\"", "not a u32"]);

    std::fs::write(&vocab, r#"{"a": 0, "b": -1}"#).unwrap();
    load_error(&dir, "vocab.json", &["\"b\"", "-1"]);

    std::fs::write(&vocab, r#"{"a": 0, "b": 0}"#).unwrap();
    load_error(&dir, "vocab.json", &["both have id 0"]);

    std::fs::write(&vocab, "{ not json").unwrap();
    let err = load_error(&dir, "vocab.json", &[]);
    assert!(matches!(err, TokenizerError::Json { .. }), "{err:?}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn gpt2_slow_bad_configs_name_file_and_field() {
    let dir = dir_with_gpt2_files("bad-config");
    let config = dir.join("tokenizer_config.json");

    std::fs::write(&config, r#"{"tokenizer_class": "RobertaTokenizer"}"#).unwrap();
    load_error(
        &dir,
        "tokenizer_config.json",
        &["tokenizer_class", "RobertaTokenizer", "GPT2Tokenizer"],
    );

    std::fs::write(&config, r#"{"add_prefix_space": "yes"}"#).unwrap();
    load_error(&dir, "tokenizer_config.json", &["add_prefix_space", "bool"]);

    std::fs::write(&config, r#"{"bos_token": 5}"#).unwrap();
    load_error(&dir, "tokenizer_config.json", &["bos_token"]);

    // An added token declared with an id that does not follow the vocabulary.
    std::fs::write(
        &config,
        r#"{"added_tokens_decoder": {"9999": {"content": "<|pad|>", "special": true}}}"#,
    )
    .unwrap();
    load_error(&dir, "tokenizer_config.json", &["<|pad|>", "9999"]);

    std::fs::write(&config, r#"{}"#).unwrap();
    std::fs::write(dir.join("special_tokens_map.json"), r#"{"eos_token": [1]}"#).unwrap();
    load_error(&dir, "special_tokens_map.json", &["eos_token"]);
    std::fs::remove_dir_all(&dir).unwrap();
}
