//! The request parser's tests: every field's tensor and JSON forms, bounds and errors named
//! after what the client sent (`bad_words` and `queue` beside this file).
#![allow(clippy::unwrap_used)]

use super::fields::{FIELDS, Keys};
use super::*;
use crate::tokenizer::Tokenizer;
use triton_api::DataType;

pub(super) fn defaults() -> RequestDefaults {
    RequestDefaults {
        max_tokens: 16,
        sampling: SamplingParams::default(),
        exclude_input_in_output: false,
        apply_chat_template: false,
    }
}

pub(super) fn bytes_tensor(name: &str, shape: Vec<i64>, elems: &[&[u8]]) -> InputTensor {
    InputTensor {
        name: name.into(),
        dtype: DataType::Bytes,
        shape,
        data: triton_api::serialize_bytes(elems.iter().copied()),
    }
}

pub(super) fn text(s: &str) -> InputTensor {
    bytes_tensor("text_input", vec![1], &[s.as_bytes()])
}

pub(super) fn i32s(name: &str, shape: Vec<i64>, v: &[i32]) -> InputTensor {
    InputTensor {
        name: name.into(),
        dtype: DataType::Int32,
        shape,
        data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

pub(super) fn f32s(name: &str, v: f32) -> InputTensor {
    InputTensor {
        name: name.into(),
        dtype: DataType::Fp32,
        shape: vec![1],
        data: v.to_le_bytes().to_vec(),
    }
}

pub(super) fn boolean(name: &str, v: bool) -> InputTensor {
    InputTensor {
        name: name.into(),
        dtype: DataType::Bool,
        shape: vec![1],
        data: vec![v as u8],
    }
}

pub(super) fn u64s(name: &str, v: u64) -> InputTensor {
    InputTensor {
        name: name.into(),
        dtype: DataType::Uint64,
        shape: vec![1],
        data: v.to_le_bytes().to_vec(),
    }
}

pub(super) fn run(inputs: Vec<InputTensor>) -> Result<ParsedRequest, RequestError> {
    run_with(inputs, vec![], 0, true)
}

/// The tiny BPE tokenizer of tests/fixtures (400 ids, with a chat template).
pub(super) fn tokenizer() -> std::sync::Arc<Tokenizer> {
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/hf_tiny");
    std::sync::Arc::new(Tokenizer::from_hf_dir(&dir).unwrap().unwrap())
}

/// A model of 2048 tokens of context with the fixture tokenizer (None: no tokenizer).
pub(super) fn model(tokenizer: Option<std::sync::Arc<Tokenizer>>) -> ModelInfo {
    ModelInfo {
        vocab_size: 400,
        max_model_len: 2048,
        eos_token_ids: vec![],
        tokenizer,
        bans_words: true,
    }
}

pub(super) fn run_with(
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

pub(super) fn run_on(
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
        ignored_parameters: &["x-request-id".to_string()],
    };
    parse(&RawRequest { inputs, params }, &ctx)
}

pub(super) fn err_text(inputs: Vec<InputTensor>) -> String {
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
    assert!(!p.stream && !p.exclude_input_in_output && !p.outputs.log_probs);
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
    assert!(p.stream && p.exclude_input_in_output && p.outputs.log_probs);
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
fn shapes_whose_byte_count_overflows_are_refused() {
    // Found by the request fuzz target (fuzz/corpus/request/crash-shape-overflow): the
    // shape's element count times the element size wrapped, so a short buffer could pass the
    // size check, and `stop_words_list` then split its ids past their end.
    let fp32 = |name: &str, shape: Vec<i64>| InputTensor {
        name: name.into(),
        dtype: DataType::Fp32,
        shape,
        data: 1.0f32.to_le_bytes().to_vec(),
    };
    let prompt = || i32s("input_ids", vec![1, 2], &[1, 2]);
    for (bad, field) in [
        (i32s("input_ids", vec![1, i64::MAX], &[5, 6]), "input_ids"),
        // [2, 2^61 + 1] INT32 elements are 2^64 + 8 bytes: unchecked, the 8 bytes given.
        (
            i32s("stop_words_list", vec![1, 2, (1 << 61) + 1], &[5, 1]),
            "stop_words_list",
        ),
        (fp32("temperature", vec![1, 1 << 62, 4]), "temperature"),
    ] {
        let inputs = if field == "input_ids" {
            vec![bad]
        } else {
            vec![prompt(), bad]
        };
        let e = run_with(inputs, vec![], 8, true).unwrap_err().to_string();
        assert!(
            e.contains(field) && e.contains("byte count overflows"),
            "{field}: {e}"
        );
    }
    // A shape that fits but does not match the data says how many bytes it needs.
    let e = run_with(
        vec![i32s("input_ids", vec![1, 3], &[1, 2])],
        vec![],
        8,
        true,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("input_ids")
            && e.contains("8 bytes for shape [3]")
            && e.contains("needs 12 bytes"),
        "{e}"
    );
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
            vec![text("x"), i32s("bad_words_list", vec![2, 2], &[1, 2, 3, 5])],
            &["bad_words_list", "offset 3", "<= 2"],
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
fn an_unknown_request_parameter_is_an_error_naming_it_and_the_closest_name() {
    let with = |key: &str, v: ParamValue| run_with(vec![text("x")], vec![(key.into(), v)], 0, true);
    let e = with("max_token", ParamValue::Int(3))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'max_token'") && e.contains("did you mean 'max_tokens'"),
        "{e}"
    );
    let e = with("temprature", ParamValue::Double(0.5))
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean 'temperature'"), "{e}");
    let e = with("frobnicate", ParamValue::Bool(true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("'frobnicate'") && !e.contains("did you mean"),
        "{e}"
    );
    assert!(
        e.contains("max_tokens") && e.contains("ignored_request_parameters"),
        "{e}"
    );
    // Triton's own keys and the model's ignored ones pass; a known key still works.
    with("triton_enable_empty_final_response", ParamValue::Bool(true)).unwrap();
    with("x-request-id", ParamValue::String("abc".into())).unwrap();
    let p = with("max_tokens", ParamValue::Int(3)).unwrap();
    assert_eq!(p.generate.stop().max_tokens, 3);
    // A known key with a bytes value is refused, not skipped.
    let e = with("max_tokens", ParamValue::Bytes)
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_tokens") && e.contains("bytes"), "{e}");
}

#[test]
fn stop_token_ids_as_a_request_parameter_take_one_id_or_a_list_in_a_string() {
    let ids = |v: ParamValue| {
        run_with(vec![text("x")], vec![("stop_token_ids".into(), v)], 0, true)
            .map(|p| p.generate.stop().stop_token_ids.clone())
    };
    assert_eq!(ids(ParamValue::String("[5, 6]".into())).unwrap(), [5, 6]);
    assert_eq!(ids(ParamValue::String("5, 6".into())).unwrap(), [5, 6]);
    assert_eq!(ids(ParamValue::Int(7)).unwrap(), [7]);
    let e = ids(ParamValue::String("five".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("stop_token_ids") && e.contains("five"), "{e}");
    let e = ids(ParamValue::String("[5, -1]".into()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("-1"), "{e}");
}

#[test]
fn edit_distance_counts_insertions_deletions_and_substitutions() {
    assert_eq!(edit_distance("max_token", "max_tokens"), 1);
    assert_eq!(edit_distance("temprature", "temperature"), 1);
    assert_eq!(edit_distance("top_k", "top_p"), 1);
    assert_eq!(edit_distance("", "abc"), 3);
    assert_eq!(edit_distance("kitten", "sitting"), 3);
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
            DataType::Fp16 => InputTensor {
                name: s.name.into(),
                dtype: DataType::Fp16,
                shape: vec![1, 1],
                data: vec![0, 0],
            },
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
        // The sample that differs from the default (the output flags default to on).
        let i = usize::from(
            sources(f)
                .first()
                .and_then(|&src| given(f, &[(src, 0)]))
                .is_some_and(|got| got == baseline),
        );
        let mut first: Option<(Src, String)> = None;
        for src in sources(f) {
            let Some(got) = given(f, &[(src, i)]) else {
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
         presence_penalty, frequency_penalty, seed, stop, stop_token_ids, bad_words, \
         ignore_eos, logprobs, n, best_of, priority)"
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
    // A tensor alias is not a request parameter (unknown parameters are errors, see
    // an_unknown_request_parameter_is_an_error_naming_it_and_the_closest_name).
    let e = run_with(
        vec![text("x")],
        vec![("random_seed".into(), ParamValue::Int(1))],
        0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("'random_seed'") && e.contains("did you mean 'seed'"),
        "{e}"
    );
    let p = run_with(
        vec![text("x")],
        vec![("top_k".into(), ParamValue::Int(-1))],
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

mod bad_words;
mod queue;

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
        if sample(f.kind, 0).is_none() && !matches!(f.kind, Kind::Unsupported(_)) {
            // Kinds only a tensor carries.
            assert!(matches!(f.keys, Keys::TensorOnly), "{:?}", f.tensors);
        }
    }
}
