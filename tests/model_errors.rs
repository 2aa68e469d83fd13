//! Bad checkpoints give errors that name the file, tensor or field and the offending value, and
//! never panic: unknown architecture, unsupported options, inconsistent head counts, missing
//! tensors, mismatched shapes, and random byte mutations of a whole small GGUF model.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;
use triton_ferrum::engine::{EngineOptions, options};
use triton_ferrum::loader::TensorSource;
use triton_ferrum::loader::gguf::{GgufWriter, MetadataValue};
use triton_ferrum::loader::safetensors::{SafetensorsSource, SafetensorsWriter};
use triton_ferrum::model::{ArchInfo, Checkpoint, TensorNames, presets, weights};

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("model_errors")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the llama fixture with its config edited and its tensors filtered/replaced.
fn variant(
    name: &str,
    edit_config: impl FnOnce(&mut Value),
    edit_tensors: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(Vec<usize>, Vec<f32>)>,
) -> PathBuf {
    let src = fixtures().join("models/llama_gqa_llama3");
    let dir = scratch(name);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    edit_config(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let st = SafetensorsSource::open_dir(&src).unwrap();
    let mut w = SafetensorsWriter::new();
    for n in st.names() {
        let t = st
            .get(&n, triton_ferrum::loader::Shard::Replicated)
            .unwrap();
        if let Some((shape, data)) = edit_tensors(&n, t.shape, t.data) {
            w.f32(&n, &shape, &data);
        }
    }
    w.write(dir.join("model.safetensors")).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    match options::start(&EngineOptions::new(dir)) {
        Ok(_) => panic!("{} loaded, expected an error", dir.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_architecture_is_named() {
    let dir = variant(
        "unknown_arch",
        |c| c["model_type"] = "bert".into(),
        |_, s, d| Some((s, d)),
    );
    let e = load_err(&dir);
    assert!(e.contains("bert") && e.contains("unsupported"), "{e}");
}

#[test]
fn unsupported_rope_scaling_is_named() {
    let dir = variant(
        "yarn",
        |c| {
            c.as_object_mut().unwrap().remove("rope_parameters");
            c["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
        },
        |_, s, d| Some((s, d)),
    );
    let e = load_err(&dir);
    assert!(e.contains("yarn"), "{e}");
}

#[test]
fn inconsistent_head_counts_are_named() {
    let dir = variant(
        "heads",
        |c| c["num_key_value_heads"] = 4.into(),
        |_, s, d| Some((s, d)),
    );
    let e = load_err(&dir);
    assert!(
        e.contains("num_heads (6)") && e.contains("num_kv_heads (4)"),
        "{e}"
    );
}

#[test]
fn missing_tensor_is_named() {
    let dir = variant(
        "missing",
        |_| {},
        |n, s, d| (n != "model.layers.1.mlp.down_proj.weight").then_some((s, d)),
    );
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.1.mlp.down_proj.weight") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn mismatched_shape_is_named() {
    let dir = variant(
        "shape",
        |_| {},
        |n, s, d| {
            if n == "model.layers.0.self_attn.k_proj.weight" {
                // One kv head too few: [24 - 12, 72].
                let cols = s[1];
                Some((vec![s[0] - 12, cols], d[..(s[0] - 12) * cols].to_vec()))
            } else {
                Some((s, d))
            }
        },
    );
    let e = load_err(&dir);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.weight")
            && e.contains("[12, 72]")
            && e.contains("[24, 72]"),
        "{e}"
    );
}

#[test]
fn not_a_model_path_is_an_error() {
    let dir = scratch("empty");
    let e = load_err(&dir);
    assert!(e.contains("no model found"), "{e}");
    let e = load_err(&dir.join("nope.gguf"));
    assert!(e.contains("nope.gguf"), "{e}");
}

/// A whole tiny Llama model written as GGUF (llama.cpp names and metadata).
fn tiny_llama_gguf() -> Vec<u8> {
    let mut arch: ArchInfo = presets::preset("tiny-llama").unwrap();
    arch.names = TensorNames::Gguf;
    let spec = arch.spec.clone();
    let tensors = weights::expected_tensors(&arch);
    let src = triton_ferrum::loader::random::RandomSource::new(tensors.clone(), 3);
    let mut w = GgufWriter::new();
    let u32v = |v: usize| MetadataValue::U32(v as u32);
    w.metadata(
        "general.architecture",
        MetadataValue::String("llama".into()),
    )
    .metadata("llama.context_length", u32v(spec.max_position_embeddings))
    .metadata("llama.embedding_length", u32v(spec.hidden_size))
    .metadata("llama.block_count", u32v(spec.num_layers))
    .metadata("llama.feed_forward_length", u32v(spec.intermediate_size))
    .metadata("llama.attention.head_count", u32v(spec.num_heads))
    .metadata("llama.attention.head_count_kv", u32v(spec.num_kv_heads))
    .metadata(
        "llama.attention.layer_norm_rms_epsilon",
        MetadataValue::F32(1e-5),
    )
    .metadata("llama.vocab_size", u32v(spec.vocab_size));
    for (name, shape) in &tensors {
        let t = src
            .get(name, triton_ferrum::loader::Shard::Replicated)
            .unwrap();
        w.tensor_f32(name, shape, &t.data);
    }
    w.to_bytes().unwrap()
}

#[test]
fn tiny_gguf_model_loads_and_generates() {
    let dir = scratch("gguf_ok");
    let path = dir.join("tiny.gguf");
    std::fs::write(&path, tiny_llama_gguf()).unwrap();
    let e = TestEngine::start(&path, None, |_| {});
    let c = collect(&e.handle(), greedy(vec![3, 4, 5], 5, None));
    assert_eq!(c.output_ids.len(), 5);
}

#[test]
fn random_mutations_of_a_gguf_model_never_panic() {
    let bytes = tiny_llama_gguf();
    let dir = scratch("gguf_mut");
    let mut state = 0x1234_5678u64;
    let mut next = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    let mut num_errors = 0;
    for i in 0..300 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let idx = next() % b.len();
            b[idx] = (next() % 256) as u8;
        }
        if i % 10 == 0 {
            b.truncate(next() % b.len());
        }
        let path = dir.join("m.gguf");
        std::fs::write(&path, &b).unwrap();
        // Any outcome but a panic is fine; errors must name the file.
        let r = std::panic::catch_unwind(|| match Checkpoint::open(&path, None) {
            Ok(ckpt) => {
                options::load_weights(&ckpt, triton_ferrum::ops::linear::WeightFormat::F32, false)
                    .err()
                    .map(|e| e.to_string())
            }
            Err(e) => Some(e.to_string()),
        });
        match r {
            Ok(Some(msg)) => {
                num_errors += 1;
                assert!(!msg.is_empty());
            }
            Ok(None) => {}
            Err(_) => panic!("mutation {i} panicked"),
        }
    }
    assert!(
        num_errors > 30,
        "mutations should mostly be detected: {num_errors}"
    );
}
