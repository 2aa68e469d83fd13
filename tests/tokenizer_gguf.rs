//! GGUF vocabularies against transformers: SmolLM2's byte-level BPE (`gpt2`) and a tiny
//! SentencePiece BPE (`llama`) with byte fallback. References: tests/fixtures/tokenizer/*.json from
//! scripts/make_tokenizer_fixtures.py.
#![allow(clippy::unwrap_used)]

mod tokenizer_common;

use tokenizer_common::{ids, messages, metadata_from_json, read_json, smollm2, spm};
use triton_ferrum::loader::gguf::MetadataValue;
use triton_ferrum::tokenizer::{ChatMessage, Tokenizer, TokenizerError};

fn check_cases(tok: &Tokenizer, reference: &serde_json::Value, with_special_key: Option<&str>) {
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 10, "fixture has only {} cases", cases.len());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected = ids(&case["ids"]);
        let got = tok.encode(text, false).unwrap();
        assert_eq!(got, expected, "ids of {text:?}");
        if let Some(key) = with_special_key {
            assert_eq!(
                tok.encode(text, true).unwrap(),
                ids(&case[key]),
                "ids+special of {text:?}"
            );
        }
        assert_eq!(
            tok.decode(&got, false).unwrap(),
            case["decoded"].as_str().unwrap(),
            "decode of {text:?}"
        );
        assert_eq!(
            tok.decode(&got, true).unwrap(),
            case["decoded_skip_special"].as_str().unwrap(),
            "decode (skip special) of {text:?}"
        );
    }
}

fn check_chats(tok: &Tokenizer, reference: &serde_json::Value) {
    let chats = reference["chats"].as_array().unwrap();
    assert!(!chats.is_empty());
    for chat in chats {
        let msgs = messages(&chat["messages"]);
        let add_generation_prompt = chat["add_generation_prompt"].as_bool().unwrap();
        let rendered = tok
            .apply_chat_template(&msgs, add_generation_prompt)
            .unwrap();
        assert_eq!(
            rendered,
            chat["rendered"].as_str().unwrap(),
            "chat {msgs:?}"
        );
    }
}

#[test]
fn smollm2_ids_match_transformers() {
    let tok = smollm2();
    let reference = read_json("smollm2_reference.json");
    check_cases(&tok, &reference, Some("ids_with_special"));
    assert_eq!(
        tok.vocab_size(),
        reference["vocab_size"].as_u64().unwrap() as usize
    );
    assert_eq!(
        tok.bos_token_id(),
        Some(reference["bos_token_id"].as_u64().unwrap() as u32)
    );
    assert_eq!(
        tok.eos_token_ids(),
        &[reference["eos_token_id"].as_u64().unwrap() as u32]
    );
}

#[test]
fn smollm2_special_tokens_stay_whole_and_skip_on_decode() {
    let tok = smollm2();
    let ids = tok.encode("<|im_start|>user\nhi<|im_end|>", false).unwrap();
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.last(), Some(&2));
    assert_eq!(tok.decode(&ids, true).unwrap(), "user\nhi");
}

#[test]
fn smollm2_chat_template_matches_transformers() {
    let tok = smollm2();
    assert!(tok.chat_template().unwrap().contains("<|im_start|>"));
    check_chats(&tok, &read_json("smollm2_reference.json"));
}

#[test]
fn smollm2_round_trips_arbitrary_text() {
    let tok = smollm2();
    for text in [
        "mixed\u{0}control\u{7f}chars",
        "   ",
        "日本語のテキストと English mixed 🎉🎉",
        "\n\n\n\t\t",
        "<|im_start|><|im_end|><|endoftext|>",
    ] {
        let ids = tok.encode(text, false).unwrap();
        assert_eq!(tok.decode(&ids, false).unwrap(), text);
    }
}

#[test]
fn spm_ids_match_sentencepiece_and_transformers() {
    let tok = spm();
    let reference = read_json("spm_reference.json");
    check_cases(&tok, &reference, None);
    assert_eq!(
        tok.vocab_size(),
        reference["vocab_size"].as_u64().unwrap() as usize
    );
}

#[test]
fn spm_adds_bos_and_falls_back_to_bytes() {
    let tok = spm();
    let bos = tok.bos_token_id().unwrap();
    let with = tok.encode("hello", true).unwrap();
    let without = tok.encode("hello", false).unwrap();
    assert_eq!(with[0], bos);
    assert_eq!(&with[1..], &without[..]);

    // "東" (E6 9D B1) is not in the vocabulary: three <0xXX> byte tokens.
    let md = metadata_from_json("spm_metadata.json");
    let Some(MetadataValue::Array(tokens)) = md.get("tokenizer.ggml.tokens") else {
        panic!("no tokens")
    };
    let token_of = |id: u32| tokens[id as usize].as_str().unwrap().to_string();
    let ids = tok.encode("東", false).unwrap();
    let pieces: Vec<String> = ids.iter().map(|&id| token_of(id)).collect();
    assert_eq!(pieces, vec!["▁", "<0xE6>", "<0x9D>", "<0xB1>"]);
    assert_eq!(tok.decode(&ids, false).unwrap(), "東");
    // A lone continuation byte decodes to U+FFFD, not an error or a panic.
    assert_eq!(tok.decode(&ids[2..3], false).unwrap(), "\u{FFFD}");
}

#[test]
fn spm_chat_template_with_bos_eos_and_raise_exception() {
    let tok = spm();
    check_chats(&tok, &read_json("spm_reference.json"));
    let not_alternating = [ChatMessage::new("user", "a"), ChatMessage::new("user", "b")];
    let err = tok
        .apply_chat_template(&not_alternating, false)
        .unwrap_err();
    assert!(
        matches!(&err, TokenizerError::ChatTemplate { message } if message.contains("must alternate")),
        "{err}"
    );
}

#[test]
fn decode_rejects_out_of_range_ids() {
    let tok = spm();
    let vocab_size = tok.vocab_size();
    let err = tok.decode(&[1, vocab_size as u32], false).unwrap_err();
    assert!(
        matches!(err, TokenizerError::TokenIdOutOfRange { token_id, vocab_size: v } if token_id as usize == vocab_size && v == vocab_size)
    );
}

#[test]
fn gguf_without_tokenizer_or_template() {
    let mut md = metadata_from_json("spm_metadata.json");
    md.remove("tokenizer.chat_template");
    let tok = Tokenizer::from_gguf_metadata(&md).unwrap().unwrap();
    assert!(tok.chat_template().is_none());
    assert!(matches!(
        tok.apply_chat_template(&[ChatMessage::new("user", "x")], true),
        Err(TokenizerError::NoChatTemplate)
    ));
    md.remove("tokenizer.ggml.model");
    assert!(Tokenizer::from_gguf_metadata(&md).unwrap().is_none());
}

#[test]
fn gguf_bad_metadata_names_the_key() {
    let mut md = metadata_from_json("spm_metadata.json");
    md.insert(
        "tokenizer.ggml.scores".into(),
        MetadataValue::Array(vec![MetadataValue::F32(0.0)]),
    );
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err().to_string();
    assert!(
        err.contains("tokenizer.ggml.scores") && err.contains("1 scores"),
        "{err}"
    );

    let mut md = metadata_from_json("spm_metadata.json");
    md.insert(
        "tokenizer.chat_template".into(),
        MetadataValue::String("{% if %}".into()),
    );
    let err = Tokenizer::from_gguf_metadata(&md).unwrap_err();
    assert!(matches!(err, TokenizerError::ChatTemplate { .. }), "{err}");
}
