//! The tokenizer.json path: a tiny byte-level BPE saved by the `tokenizers` Python package, with
//! tokenizer_config.json (chat template, BOS/EOS) and generation_config.json (an EOS list),
//! against transformers' AutoTokenizer on the same directory.
#![allow(clippy::unwrap_used)]

mod tokenizer_common;

use tokenizer_common::{fixture_path, hf_tiny, ids, messages, read_json};
use triton_ferrum::tokenizer::{Tokenizer, TokenizerError};

#[test]
fn hf_dir_ids_and_decode_match_transformers() {
    let tok = hf_tiny();
    let reference = read_json("hf_tiny_reference.json");
    for case in reference["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, ids(&case["ids"]), "ids of {text:?}");
        assert_eq!(
            tok.encode(text, true).unwrap(),
            ids(&case["ids_with_special"]),
            "ids+special of {text:?}"
        );
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            case["decoded"].as_str().unwrap()
        );
        assert_eq!(
            tok.decode(&got, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap()
        );
    }
    assert_eq!(
        tok.vocab_size(),
        reference["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(
        tok.bos_token_id(),
        Some(reference["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(tok.eos_token_ids(), &ids(&reference["eos_token_ids"])[..]);
}

#[test]
fn hf_dir_chat_template_matches_transformers() {
    let tok = hf_tiny();
    let reference = read_json("hf_tiny_reference.json");
    for chat in reference["chats"].as_array().unwrap() {
        let msgs = messages(&chat["messages"]);
        let rendered = tok
            .apply_chat_template(&msgs, chat["add_generation_prompt"].as_bool().unwrap())
            .unwrap();
        assert_eq!(rendered, chat["rendered"].as_str().unwrap());
    }
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("ferrum-tokenizer-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn hf_dir_reads_chat_template_jinja_and_scalar_eos() {
    let dir = temp_dir("jinja");
    std::fs::copy(
        fixture_path("hf_tiny/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"eos_token": {"content": "<|eos|>"}}"#,
    )
    .unwrap();
    std::fs::write(dir.join("generation_config.json"), r#"{"eos_token_id": 3}"#).unwrap();
    std::fs::write(
        dir.join("chat_template.jinja"),
        "{{ messages[0].content }}{{ eos_token }}",
    )
    .unwrap();
    let tok = Tokenizer::from_hf_dir(&dir).unwrap().unwrap();
    // tokenizer_config's EOS first, then generation_config's.
    assert_eq!(tok.eos_token_ids(), &[2, 3]);
    let msg = [triton_ferrum::tokenizer::ChatMessage::new("user", "hey")];
    assert_eq!(tok.apply_chat_template(&msg, false).unwrap(), "hey<|eos|>");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn hf_dir_errors_name_the_file_and_field() {
    let dir = temp_dir("bad");
    std::fs::write(dir.join("tokenizer.json"), "{ not json").unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err();
    assert!(
        matches!(&err, TokenizerError::TokenizerJson { path, .. } if path.ends_with("tokenizer.json")),
        "{err}"
    );

    std::fs::copy(
        fixture_path("hf_tiny/tokenizer.json"),
        dir.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": [2, -1]}"#,
    )
    .unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(
        err.contains("generation_config.json")
            && err.contains("eos_token_id")
            && err.contains("-1"),
        "{err}"
    );

    std::fs::write(
        dir.join("generation_config.json"),
        r#"{"eos_token_id": 100000}"#,
    )
    .unwrap();
    let err = Tokenizer::from_hf_dir(&dir).unwrap_err().to_string();
    assert!(
        err.contains("100000") && err.contains("vocab size"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}
