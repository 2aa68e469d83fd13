//! The shipped model repository and the configuration docs stay in sync with the backend:
//! the demo `model_repository/smollm2/config.pbtxt` parses into a valid `BackendConfig` (its model
//! path resolves, with the demo GGUF installed by ci/fetch_models.sh); every per-architecture
//! example config loads in the backend with the tiny checkpoint of its architecture in place of
//! the real weights and reproduces the transformers greedy tokens; and docs/configuration.md
//! documents every parameter, input and output the backend accepts.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use serde_json::json;
use triton_ferrum::backend::parse::{INPUTS, OUTPUTS};
use triton_ferrum::config::{BackendConfig, ModelConfigInfo, ModelLocation, PARAMETER_KEYS};
use triton_ferrum::engine::options;

/// `{ key: "k", value: { string_value: "v" } }` pairs of a config.pbtxt (the only form the
/// shipped configs use), as the JSON Triton hands the backend.
fn parameters_json(pbtxt: &str) -> serde_json::Value {
    let mut params = serde_json::Map::new();
    let mut rest = pbtxt;
    while let Some(i) = rest.find("key:") {
        rest = &rest[i + 4..];
        let key = quoted(rest);
        let j = rest.find("string_value:").unwrap();
        rest = &rest[j + 13..];
        let value = quoted(rest);
        params.insert(key, json!({ "string_value": value }));
    }
    json!({ "parameters": params })
}

fn quoted(s: &str) -> String {
    let start = s.find('"').unwrap() + 1;
    let end = start + s[start..].find('"').unwrap();
    s[start..end].to_string()
}

/// Example config → the tiny fixture checkpoint (tests/fixtures/models/) of its architecture.
const EXAMPLE_FIXTURES: &[(&str, &str)] = &[
    ("gpt2", "gpt2"),
    ("gptj-6b", "gptj"),
    ("falcon-7b", "falcon_mq"),
    ("mpt-7b", "mpt"),
    ("bloom-560m", "bloom"),
];

fn shipped_configs() -> Vec<(String, String)> {
    let repo = common::repo().join("model_repository");
    let mut out = vec![];
    for entry in std::fs::read_dir(&repo).unwrap() {
        let dir = entry.unwrap().path();
        let pbtxt = std::fs::read_to_string(dir.join("config.pbtxt")).unwrap();
        assert!(pbtxt.contains("backend: \"ferrum\""), "{}", dir.display());
        assert!(
            dir.join("1").is_dir(),
            "{}: Triton needs a version folder",
            dir.display()
        );
        let name = dir.file_name().unwrap().to_str().unwrap().to_string();
        out.push((name, pbtxt));
    }
    out.sort();
    out
}

fn location(name: &str) -> ModelLocation {
    let dir = common::repo().join("model_repository").join(name);
    ModelLocation {
        model_dir: dir.clone(),
        version_dir: dir.join("1"),
    }
}

#[test]
fn demo_config_parses_and_resolves() {
    // Make sure the demo model is present (fails with a fetch hint otherwise).
    let gguf = common::smollm2_gguf();
    let (_, pbtxt) = shipped_configs()
        .into_iter()
        .find(|(name, _)| name == "smollm2")
        .expect("model_repository/smollm2 is the demo model");
    let config = parameters_json(&pbtxt);
    let c = BackendConfig::from_model_config(&config, &location("smollm2")).unwrap();
    if std::env::var_os("FERRUM_SMOLLM2_GGUF").is_none() {
        assert_eq!(
            c.engine.model.canonicalize().unwrap(),
            gguf.canonicalize().unwrap()
        );
    }
    // Decoupled (streaming) with tensorrtllm-style batched shapes.
    let info = ModelConfigInfo::from_model_config(&json!({
        "max_batch_size": 64,
        "model_transaction_policy": { "decoupled": pbtxt.contains("decoupled: true") }
    }));
    assert!(info.decoupled);
    assert!(pbtxt.contains("max_batch_size: 64"));
}

/// Each architecture example, with the tiny checkpoint of its architecture as `model_path` and
/// f32 weights (the examples' q8 is a CPU speed choice; tiny random models are too sensitive to
/// it for an exact comparison), loads through `BackendConfig` like Triton's model load does and
/// gives the golden greedy tokens of transformers.
#[test]
fn architecture_examples_load_in_the_backend_with_tiny_weights() {
    let configs = shipped_configs();
    for (name, _) in &configs {
        assert!(
            name == "smollm2"
                || name == "smollm2-llmapi"
                || EXAMPLE_FIXTURES.iter().any(|(n, _)| n == name),
            "model_repository/{name} has no tiny fixture in EXAMPLE_FIXTURES"
        );
    }
    for &(name, fixture) in EXAMPLE_FIXTURES {
        let (_, pbtxt) = configs
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("model_repository/{name} is missing"));
        let mut config = parameters_json(pbtxt);
        let model_dir = common::fixtures().join("models").join(fixture);
        let params = config["parameters"].as_object_mut().unwrap();
        assert!(params.contains_key("model_path"), "{name}: no model_path");
        params.insert(
            "model_path".into(),
            json!({ "string_value": model_dir.to_str().unwrap() }),
        );
        params.insert("weight_format".into(), json!({ "string_value": "f32" }));
        let c = BackendConfig::from_model_config(&config, &location(name))
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let loaded = options::start(&c.engine).unwrap_or_else(|e| panic!("{name}: {e}"));
        let golden = common::golden(fixture);
        let case = &golden["cases"][1];
        let want = common::ids(&case["greedy_ids"]);
        let got = common::collect(
            &loaded.engine.handle(),
            common::greedy(common::ids(&case["prompt_ids"]), want.len(), None),
        );
        assert_eq!(got.output_ids, want, "{name} with {fixture}");
    }
}

/// The `(name, data_type)` of each tensor in the `input [...]` or `output [...]` list of a
/// config.pbtxt (the one-line `{ name: .., data_type: .., dims: .. }` form the examples use).
fn declared_tensors(pbtxt: &str, list: &str) -> Vec<(String, String)> {
    let start = pbtxt.find(&format!("\n{list} [")).unwrap() + list.len() + 3;
    let end = start + pbtxt[start..].find("\n]").unwrap();
    pbtxt[start..end]
        .lines()
        .filter(|l| l.contains("name:"))
        .map(|l| {
            let name = quoted(&l[l.find("name:").unwrap()..]);
            let dtype = l[l.find("data_type:").unwrap() + 10..]
                .split(',')
                .next()
                .unwrap()
                .trim()
                .to_string();
            (name, dtype)
        })
        .collect()
}

/// The llmapi example declares TensorRT-LLM's llmapi tensors itself (no auto-complete): each must
/// be one ferrum reads (or writes) with the same dtype, and its parameters must load.
#[test]
fn the_llmapi_example_declares_only_tensors_ferrum_serves() {
    let (_, pbtxt) = shipped_configs()
        .into_iter()
        .find(|(name, _)| name == "smollm2-llmapi")
        .expect("model_repository/smollm2-llmapi is the llmapi example");
    for (list, known) in [("input", INPUTS), ("output", OUTPUTS)] {
        let declared = declared_tensors(&pbtxt, list);
        assert!(declared.len() >= 3, "{list}: {declared:?}");
        for (name, dtype) in declared {
            let spec = known
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{list} {name} is not one of ferrum's"));
            assert_eq!(dtype, spec.dtype.config_name(), "{list} {name}");
        }
    }
    for name in [
        "sampling_param_max_tokens",
        "sampling_param_exclude_input_from_output",
        "return_cumulative_logprob",
        "cumulative_logprob",
    ] {
        assert!(pbtxt.contains(&format!("\"{name}\"")), "{name}");
    }
    let config = parameters_json(&pbtxt);
    BackendConfig::from_model_config(&config, &location("smollm2-llmapi")).unwrap();
    assert!(pbtxt.contains("max_batch_size: 0") && pbtxt.contains("decoupled: true"));
}

#[test]
fn configuration_docs_cover_every_key_and_tensor() {
    let doc = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/configuration.md"),
    )
    .unwrap();
    for key in PARAMETER_KEYS {
        assert!(
            doc.contains(&format!("`{key}`")),
            "docs/configuration.md lacks parameter {key}"
        );
    }
    for t in INPUTS.iter().chain(OUTPUTS) {
        assert!(
            doc.contains(&format!("`{}`", t.name)),
            "docs/configuration.md lacks tensor {}",
            t.name
        );
    }
}
