//! The requests of Triton's OpenAI-compatible frontend and of TensorRT-LLM's `llmapi` Triton
//! model, built tensor for tensor as their sources build them, parse into what they mean.
//! Sources (read, not copied): triton-inference-server/server
//! python/openai/openai_frontend/engine/utils/triton.py (`_create_vllm_generate_request`,
//! `_create_trtllm_generate_request`) and schemas/openai.py (the request fields and their
//! defaults, which `model_dump(exclude_none=True)` puts in `sampling_parameters`);
//! NVIDIA/TensorRT-LLM triton_backend/all_models/llmapi/tensorrt_llm/config.pbtxt and
//! 1/helpers.py (the `sampling_param_*` inputs).

#![allow(clippy::unwrap_used)]

use triton_api::{DataType, InputTensor};

use super::tests::{boolean, bytes_tensor, f32s, i32s, model, run_on, run_with, text, u64s};
use super::*;

/// A `[1]` tensor (the vLLM contract: no batch dimension) made `[1, 1]` (the TensorRT-LLM
/// contract's `[[value]]`).
fn batched(mut t: InputTensor) -> InputTensor {
    t.shape.insert(0, 1);
    t
}

/// The vLLM contract's tensors for `prompt` with `sampling_parameters` = `sp` (shapes `[1]`).
fn vllm_request(prompt: &str, sp: &str, exclude_input: bool, logprobs: bool) -> Vec<InputTensor> {
    vec![
        text(prompt),
        boolean("stream", false),
        boolean("exclude_input_in_output", exclude_input),
        bytes_tensor("sampling_parameters", vec![1], &[sp.as_bytes()]),
        boolean("return_logprobs", logprobs),
        boolean("return_num_input_tokens", true),
        boolean("return_num_output_tokens", true),
    ]
}

#[test]
fn the_vllm_contract_completion_request_parses_every_field_it_sends() {
    // /v1/completions with echo=false, stop="\n", seed 7 and logprobs 2: the request model's
    // non-None fields (defaults included) minus the excluded ones, then max_tokens/logprobs.
    let sp = r#"{"frequency_penalty": 0.5, "ignore_eos": false, "n": 1, "presence_penalty": -0.5,
                 "seed": 7, "stop": "\n", "temperature": 1.0, "top_p": 0.9, "min_tokens": 2,
                 "max_tokens": 16, "logprobs": 2}"#;
    let p = run_with(vllm_request("Hi", sp, true, true), vec![], 0, true).unwrap();
    let s = p.generate.sampling();
    assert_eq!((s.temperature, s.top_p, s.seed), (1.0, 0.9, Some(7)));
    assert_eq!((s.frequency_penalty, s.presence_penalty), (0.5, -0.5));
    assert_eq!(s.logprobs, Some(2));
    let st = p.generate.stop();
    assert_eq!((st.max_tokens, st.min_tokens), (16, 2));
    assert_eq!(st.stop_strings, ["\n"]);
    assert!(p.exclude_input_in_output && !p.stream);
    let o = p.outputs;
    assert!(o.logprobs_json && o.num_input_tokens && o.num_output_tokens && o.finish_reason);
    // Echo: exclude_input_in_output=false; no logprobs asked: return_logprobs=false.
    let sp = r#"{"frequency_penalty": 0, "ignore_eos": false, "n": 1, "presence_penalty": 0,
                 "temperature": 1, "top_p": 1, "max_tokens": 16}"#;
    let p = run_with(vllm_request("Hi", sp, false, false), vec![], 0, true).unwrap();
    assert!(!p.exclude_input_in_output && !p.outputs.logprobs_json && !p.outputs.log_probs);
    assert_eq!(p.generate.sampling().logprobs, None);
}

#[test]
fn the_vllm_contract_chat_request_parses_a_stop_list_and_top_logprobs() {
    // /v1/chat/completions: temperature defaults to 0.7, logprobs=true + top_logprobs=3 →
    // "logprobs": 3; max_completion_tokens → max_tokens; a stop list.
    let sp = r#"{"frequency_penalty": 0, "ignore_eos": true, "n": 1, "presence_penalty": 0,
                 "stop": ["END", "\n\n"], "temperature": 0.7, "top_p": 1, "max_tokens": 8,
                 "logprobs": 3}"#;
    let mut inputs = vllm_request("<|im_start|>user\nHi<|im_end|>\n", sp, true, true);
    inputs[1] = boolean("stream", true);
    let p = run_with(inputs, vec![], 0, true).unwrap();
    assert!(p.stream);
    assert_eq!(p.generate.stop().stop_strings, ["END", "\n\n"]);
    assert!(p.generate.stop().ignore_eos);
    assert_eq!(p.generate.sampling().logprobs, Some(3));
    assert_eq!(p.generate.sampling().temperature, 0.7);
}

#[test]
fn guided_decoding_and_lora_are_refused_naming_the_field() {
    // vLLM contract: a named tool choice adds `structured_outputs` (older frontends sent
    // `guided_decoding`), a LoRA model name adds `lora_name`.
    for (key, value) in [
        (
            "structured_outputs",
            r#""{\"json\": {\"type\": \"object\"}}""#,
        ),
        ("guided_decoding", r#"{"json": {}}"#),
        ("lora_name", r#""my-adapter""#),
    ] {
        let sp = format!(r#"{{"max_tokens": 4, "{key}": {value}}}"#);
        let e = run_with(vllm_request("Hi", &sp, true, false), vec![], 0, true)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(&format!("invalid value for '{key}'")), "{e}");
        assert!(e.contains("not supported by ferrum"), "{e}");
    }
    // A null value (exclude_none never sends one, but a client may) is skipped as any key's.
    let sp = r#"{"max_tokens": 4, "structured_outputs": null}"#;
    assert!(run_with(vllm_request("Hi", sp, true, false), vec![], 0, true).is_ok());
    // TensorRT-LLM contract: the guided decoding and LoRA tensors, `[[value]]`.
    let base = || {
        vec![
            batched(text("Hi")),
            batched(i32s("max_tokens", vec![1], &[4])),
        ]
    };
    let guide = |name: &str| batched(bytes_tensor(name, vec![1], &[b"json_schema"]));
    let lora_weights = InputTensor {
        name: "lora_weights".into(),
        dtype: DataType::Fp16,
        shape: vec![1, 2, 2],
        data: vec![0; 8],
    };
    for (t, what) in [
        (guide("guided_decoding_guide_type"), "guided decoding"),
        (guide("guided_decoding_guide"), "guided decoding"),
        (batched(u64s("lora_task_id", 1)), "LoRA"),
        (lora_weights, "LoRA"),
        (i32s("lora_config", vec![1, 1, 3], &[0, 1, 2]), "LoRA"),
    ] {
        let name = t.name.clone();
        let mut inputs = base();
        inputs.push(t);
        let e = run_with(inputs, vec![], 8, true).unwrap_err().to_string();
        assert!(e.starts_with(&format!("invalid value for '{name}'")), "{e}");
        assert!(e.contains(what) && e.contains("not supported"), "{e}");
    }
    // Refused keys are not offered as accepted ones.
    let e = run_with(
        vllm_request("Hi", r#"{"lora": 1}"#, true, false),
        vec![],
        0,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        !e.contains("structured_outputs") && !e.contains("lora_name"),
        "{e}"
    );
}

#[test]
fn the_tensorrt_llm_contract_request_parses_every_tensor_it_sends() {
    // [[value]] shapes against a batched model; chat sends no exclude flag.
    let inputs = vec![
        batched(text("Hi")),
        batched(boolean("stream", true)),
        batched(i32s("max_tokens", vec![1], &[12])),
        bytes_tensor("stop_words", vec![1, 2], &[b"END", b"\n"]),
        batched(f32s("top_p", 0.5)),
        batched(f32s("frequency_penalty", 0.25)),
        batched(f32s("presence_penalty", 0.75)),
        batched(u64s("seed", 42)),
        batched(f32s("temperature", 0.0)),
        batched(boolean("return_num_input_tokens", true)),
        batched(boolean("return_num_output_tokens", true)),
    ];
    let p = run_with(inputs.clone(), vec![], 64, true).unwrap();
    let s = p.generate.sampling();
    assert_eq!(
        (s.top_p, s.frequency_penalty, s.presence_penalty, s.seed),
        (0.5, 0.25, 0.75, Some(42))
    );
    assert!(s.is_greedy());
    assert_eq!(p.generate.stop().max_tokens, 12);
    assert_eq!(p.generate.stop().stop_strings, ["END", "\n"]);
    assert!(p.stream && p.outputs.num_input_tokens && p.outputs.num_output_tokens);
    // The model default decides (the tests' default is false; a served model's is true).
    assert!(!p.exclude_input_in_output);
    // /v1/completions sends echo as the flag.
    let mut with_echo = inputs;
    with_echo.push(batched(boolean("exclude_input_in_output", true)));
    assert!(
        run_with(with_echo, vec![], 64, true)
            .unwrap()
            .exclude_input_in_output
    );
}

#[test]
fn the_llmapi_inputs_map_onto_the_request() {
    // llmapi's config: max_batch_size 0, `[1]` dims (text_input `[-1]` holding one prompt).
    let inputs = vec![
        text("Hi"),
        boolean("streaming", true),
        f32s("sampling_param_temperature", 0.5),
        i32s("sampling_param_top_k", vec![1], &[20]),
        f32s("sampling_param_top_p", 0.8),
        f32s("sampling_param_frequency_penalty", 0.1),
        f32s("sampling_param_presence_penalty", 0.2),
        i32s("sampling_param_max_tokens", vec![1], &[9]),
        bytes_tensor("sampling_param_stop", vec![2], &[b"STOP", b"\n"]),
        u64s("sampling_param_seed", 3),
        boolean("sampling_param_exclude_input_from_output", true),
        i32s("sampling_param_best_of", vec![1], &[1]),
        boolean("return_finish_reason", false),
        boolean("return_cumulative_logprob", true),
    ];
    let p = run_with(inputs, vec![], 0, true).unwrap();
    let s = p.generate.sampling();
    assert_eq!(
        (s.temperature, s.top_k, s.top_p, s.seed),
        (0.5, 20, 0.8, Some(3))
    );
    assert_eq!((s.frequency_penalty, s.presence_penalty), (0.1, 0.2));
    // cumulative_logprob needs the logprobs, with no alternatives.
    assert_eq!(s.logprobs, Some(0));
    let st = p.generate.stop();
    assert_eq!(st.max_tokens, 9);
    assert_eq!(st.stop_strings, ["STOP", "\n"]);
    assert!(p.stream && p.exclude_input_in_output);
    let o = p.outputs;
    assert!(o.cumulative_logprob && !o.finish_reason && !o.log_probs && !o.logprobs_json);
    // Their bounds are checked under their own names.
    let e = run_with(
        vec![text("Hi"), i32s("sampling_param_best_of", vec![1], &[2])],
        vec![],
        0,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("'sampling_param_best_of': 2"), "{e}");
    let e = run_with(
        vec![text("Hi"), f32s("sampling_param_top_p", 1.5)],
        vec![],
        0,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("'sampling_param_top_p'") && e.contains("(0, 1]"),
        "{e}"
    );
}

#[test]
fn the_logprobs_json_needs_a_tokenizer() {
    let inputs = vec![
        i32s("input_ids", vec![2], &[1, 2]),
        boolean("return_logprobs", true),
    ];
    let e = run_on(&model(None), inputs, vec![], 0, true).unwrap_err();
    assert_eq!(
        e,
        RequestError::NoTokenizer {
            field: "return_logprobs"
        }
    );
}
