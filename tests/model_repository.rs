//! The shipped model repository and the configuration docs stay in sync with the backend:
//! every `model_repository/*/config.pbtxt` parses into a valid `BackendConfig` (its model path
//! resolves, with the demo GGUF installed by ci/fetch_models.sh), and docs/configuration.md
//! documents every parameter, input and output the backend accepts.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use serde_json::json;
use triton_ferrum::backend::parse::{INPUTS, OUTPUTS};
use triton_ferrum::config::{BackendConfig, ModelConfigInfo, ModelLocation, PARAMETER_KEYS};

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

#[test]
fn shipped_configs_parse_and_resolve() {
    // Make sure the demo model is present (fails with a fetch hint otherwise).
    let gguf = common::smollm2_gguf();
    let repo = common::repo().join("model_repository");
    let mut num_models = 0;
    for entry in std::fs::read_dir(&repo).unwrap() {
        let dir = entry.unwrap().path();
        let pbtxt = std::fs::read_to_string(dir.join("config.pbtxt")).unwrap();
        assert!(pbtxt.contains("backend: \"ferrum\""), "{}", dir.display());
        assert!(
            dir.join("1").is_dir(),
            "{}: Triton needs a version folder",
            dir.display()
        );
        let config = parameters_json(&pbtxt);
        let loc = ModelLocation {
            model_dir: dir.clone(),
            version_dir: dir.join("1"),
        };
        let c = BackendConfig::from_model_config(&config, &loc)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        if dir.ends_with("smollm2") && std::env::var_os("FERRUM_SMOLLM2_GGUF").is_none() {
            assert_eq!(
                c.model_path.canonicalize().unwrap(),
                gguf.canonicalize().unwrap()
            );
            // Decoupled (streaming) with tensorrtllm-style batched shapes.
            let info = ModelConfigInfo::from_model_config(&json!({
                "max_batch_size": 64,
                "model_transaction_policy": { "decoupled": pbtxt.contains("decoupled: true") }
            }));
            assert!(info.decoupled);
            assert!(pbtxt.contains("max_batch_size: 64"));
        }
        num_models += 1;
    }
    assert!(num_models >= 1);
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
