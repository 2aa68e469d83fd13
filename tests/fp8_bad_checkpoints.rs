//! Bad FP8 checkpoints give errors naming the key, value or tensor: copies of the fixtures of
//! tests/fixtures/fp8/ (scripts/make_fp8_fixtures.py) with their config edited and tensors
//! dropped or retyped, loaded on the CPU engine. (The good ones: tests/fp8_checkpoints.rs.)
#![allow(clippy::unwrap_used)]

mod common;
mod loader_common;

use std::path::{Path, PathBuf};

use common::fixtures;
use loader_common::safetensors_writer::SafetensorsWriter;
use serde_json::Value;
use triton_ferrum::loader::safetensors::{SafetensorsDType, SafetensorsSource};
use triton_ferrum::loader::{Shard, TensorSource};
use triton_ferrum::model::Checkpoint;
use triton_ferrum::ops::linear::WeightFormat;

fn fp8_dir(name: &str) -> PathBuf {
    fixtures().join("fp8").join(name)
}

enum Edit {
    Keep,
    Drop,
    /// Store this tensor as F8_E5M2 (same bytes).
    E5m2,
}

/// A copy of FP8 fixture `fixture` with its config edited and tensors dropped or retyped.
fn variant(
    fixture: &str,
    name: &str,
    edit_config: impl FnOnce(&mut Value),
    edit: impl Fn(&str) -> Edit,
) -> PathBuf {
    let src_dir = fp8_dir(fixture);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("fp8_bad_checkpoints")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(src_dir.join("config.json")).unwrap())
            .unwrap();
    edit_config(&mut config);
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let modelopt = src_dir.join("hf_quant_config.json");
    if modelopt.is_file() {
        std::fs::copy(&modelopt, dir.join("hf_quant_config.json")).unwrap();
    }
    let src = SafetensorsSource::open_dir(&src_dir).unwrap();
    let mut w = SafetensorsWriter::new();
    for n in src.names() {
        let shape = src.info(&n).unwrap().shape;
        let edit = edit(&n);
        if matches!(edit, Edit::Drop) {
            continue;
        }
        if src.dtype(&n) == Some(SafetensorsDType::F8E4M3) {
            let codes = src.get_e4m3(&n, Shard::Replicated).unwrap().codes;
            let dtype = match edit {
                Edit::E5m2 => "F8_E5M2",
                _ => "F8_E4M3",
            };
            w.raw(&n, dtype, &shape, codes);
        } else {
            w.f32(&n, &shape, &src.get(&n, Shard::Replicated).unwrap().data);
        }
    }
    w.write(dir.join("model.safetensors")).unwrap();
    dir
}

/// The error of opening and loading `path` on the CPU engine.
fn load_err(path: &Path) -> String {
    let result = Checkpoint::open(path, None).and_then(|ckpt| {
        triton_ferrum::engine::options::load_weights(&ckpt, WeightFormat::F32, false).map(|_| ())
    });
    match result {
        Ok(()) => panic!("{} loaded", path.display()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unsupported_compressed_tensors_format_is_refused_by_name() {
    let p = variant(
        "llama_ct_channel_dynamic",
        "pack_quantized",
        |c| c["quantization_config"]["format"] = "pack-quantized".into(),
        |_| Edit::Keep,
    );
    assert_eq!(
        load_err(&p),
        "config.json: quantization_config.format = \"pack-quantized\": ferrum loads \
         float-quantized (FP8) compressed-tensors checkpoints"
    );
    let p = variant(
        "llama_ct_channel_dynamic",
        "int8",
        |c| c["quantization_config"]["config_groups"]["group_0"]["weights"]["type"] = "int".into(),
        |_| Edit::Keep,
    );
    let e = load_err(&p);
    assert!(
        e.contains("quantization_config.config_groups.group_0.weights.type = \"int\""),
        "{e}"
    );
    let p = variant(
        "llama_fp8_dynamic",
        "awq",
        |c| c["quantization_config"] = serde_json::json!({"quant_method": "awq", "bits": 4}),
        |_| Edit::Keep,
    );
    let e = load_err(&p);
    assert!(
        e.starts_with("config.json: quantization_config.quant_method = \"awq\""),
        "{e}"
    );
}

#[test]
fn a_missing_scale_names_the_tensor() {
    for (fixture, missing) in [
        (
            "llama_ct_tensor_static",
            "model.layers.1.self_attn.k_proj.weight_scale",
        ),
        (
            "llama_ct_tensor_static",
            "model.layers.2.mlp.up_proj.input_scale",
        ),
        (
            "llama_fp8_block",
            "model.layers.0.self_attn.o_proj.weight_scale_inv",
        ),
        (
            "llama_modelopt_kv",
            "model.layers.1.self_attn.v_proj.v_scale",
        ),
    ] {
        let tag = missing.replace('.', "_");
        let p = variant(
            fixture,
            &tag,
            |_| {},
            |n| match n == missing {
                true => Edit::Drop,
                false => Edit::Keep,
            },
        );
        let e = load_err(&p);
        assert!(
            e.contains(&format!("tensor '{missing}' not found")),
            "{fixture} without {missing}: {e}"
        );
    }
}

#[test]
fn e5m2_and_unexplained_fp8_weights_are_refused() {
    let q = "model.layers.1.self_attn.q_proj.weight";
    let p = variant(
        "llama_fp8_dynamic",
        "e5m2",
        |_| {},
        |n| match n == q {
            true => Edit::E5m2,
            false => Edit::Keep,
        },
    );
    let e = load_err(&p);
    assert!(e.contains(q) && e.contains("F8_E5M2"), "{e}");
    // FP8 tensors but no quantization_config: the scales are unknown.
    let p = variant(
        "llama_fp8_dynamic",
        "no_quant_config",
        |c| {
            c.as_object_mut().unwrap().remove("quantization_config");
        },
        |_| Edit::Keep,
    );
    let e = load_err(&p);
    assert!(
        e.contains("stored F8_E4M3, but the checkpoint has no FP8 quantization_config"),
        "{e}"
    );
    // An FP8 tensor the ignore list says is unquantized.
    let p = variant(
        "llama_ct_channel_dynamic",
        "ignored_but_fp8",
        |c| c["quantization_config"]["ignore"] = serde_json::json!(["lm_head", "re:.*q_proj"]),
        |_| Edit::Keep,
    );
    let e = load_err(&p);
    assert!(
        e.contains("quantization_config.ignore lists module 'model.layers.0.self_attn.q_proj'"),
        "{e}"
    );
}

#[test]
fn a_scale_of_the_wrong_shape_is_refused() {
    // fbgemm's scales are per row: a per-tensor config reading them must say what it expected.
    let p = variant(
        "llama_fbgemm",
        "channel_as_tensor",
        |c| {
            c["quantization_config"] = serde_json::json!({"quant_method": "fp8", "activation_scheme": "dynamic",
                                   "ignored_layers": ["lm_head", "model.layers.0.mlp.down_proj"]})
        },
        |_| Edit::Keep,
    );
    let e = load_err(&p);
    assert!(
        e.contains("weight_scale' has shape [72, 1], expected [1]"),
        "{e}"
    );
}
