//! Bad checkpoints give errors that name the file, tensor or field and the offending value, and
//! never panic: unknown architecture, unsupported options, inconsistent head counts, missing
//! tensors, mismatched shapes, and random byte mutations of a whole small GGUF model.
#![allow(clippy::unwrap_used)]

mod common;
mod loader_common;

use std::path::{Path, PathBuf};

use common::*;
use loader_common::gguf_writer::GgufWriter;
use loader_common::safetensors_writer::SafetensorsWriter;
use serde_json::Value;
use triton_ferrum::engine::{EngineOptions, options};
use triton_ferrum::loader::TensorSource;
use triton_ferrum::loader::gguf::MetadataValue;
use triton_ferrum::loader::safetensors::SafetensorsSource;
use triton_ferrum::model::spec::{FusedQkv, PosEmbedding, QkvLayout};
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
    variant_of("llama_gqa_llama3", name, edit_config, edit_tensors)
}

/// A copy of fixture `fixture` with its config edited and its tensors filtered/replaced.
fn variant_of(
    fixture: &str,
    name: &str,
    edit_config: impl FnOnce(&mut Value),
    edit_tensors: impl Fn(&str, Vec<usize>, Vec<f32>) -> Option<(Vec<usize>, Vec<f32>)>,
) -> PathBuf {
    let src = fixtures().join("models").join(fixture);
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

// ---- Architectures of issue 5: fused tensors, layouts and options, per loader ----

fn keep(_: &str, s: Vec<usize>, d: Vec<f32>) -> Option<(Vec<usize>, Vec<f32>)> {
    Some((s, d))
}

#[test]
fn missing_fused_qkv_is_named() {
    let qkv = "transformer.h.1.self_attention.query_key_value.weight";
    let dir = variant_of(
        "falcon_new",
        "falcon_no_qkv",
        |_| {},
        |n, s, d| (n != qkv).then_some((s, d)),
    );
    let e = load_err(&dir);
    assert!(e.contains(qkv) && e.contains("not found"), "{e}");
}

#[test]
fn wrong_fused_qkv_size_is_named() {
    // BLOOM: [3 * hidden, hidden] expected; one head's q/k/v rows short.
    let qkv = "transformer.h.0.self_attention.query_key_value.weight";
    let dir = variant_of(
        "bloom",
        "bloom_short_qkv",
        |_| {},
        |n, s, d| {
            if n == qkv {
                let (rows, cols) = (s[0] - 3, s[1]);
                Some((vec![rows, cols], d[..rows * cols].to_vec()))
            } else {
                Some((s, d))
            }
        },
    );
    let e = load_err(&dir);
    let spec = Checkpoint::open(&fixtures().join("models/bloom"), None)
        .unwrap()
        .arch
        .spec;
    let (h, total) = (spec.hidden_size, 3 * spec.hidden_size);
    assert!(
        e.contains(qkv)
            && e.contains(&format!("[{total}, {h}]"))
            && e.contains(&format!("[{}, {h}]", total - 3)),
        "{e}"
    );
}

#[test]
fn conv1d_weight_in_the_wrong_orientation_is_named() {
    // GPT-2 stores c_fc as [in, out]; an [out, in] tensor (a wrongly converted checkpoint) fails.
    let fc = "transformer.h.0.mlp.c_fc.weight";
    let dir = variant_of(
        "gpt2",
        "gpt2_transposed",
        |_| {},
        |n, s, d| {
            if n == fc {
                Some((vec![s[1], s[0]], d))
            } else {
                Some((s, d))
            }
        },
    );
    let e = load_err(&dir);
    assert!(e.contains(fc) && e.contains("shape"), "{e}");
}

#[test]
fn inconsistent_falcon_head_counts_are_named() {
    let dir = variant_of(
        "falcon_new",
        "falcon_heads",
        |c| c["num_kv_heads"] = 4.into(),
        keep,
    );
    let e = load_err(&dir);
    assert!(
        e.contains("num_heads (6)") && e.contains("num_kv_heads (4)"),
        "{e}"
    );
    let dir = variant_of("gpt2", "gpt2_heads", |c| c["n_head"] = 5.into(), keep);
    let e = load_err(&dir);
    assert!(e.contains("n_head (5)") && e.contains("n_embd"), "{e}");
}

#[test]
fn unsupported_architecture_options_are_named() {
    type Case = (&'static str, &'static str, fn(&mut Value), &'static str);
    let cases: [Case; 6] = [
        (
            "mpt",
            "mpt_qk_ln",
            |c| c["attn_config"]["qk_ln"] = true.into(),
            "attn_config.qk_ln",
        ),
        (
            "mpt",
            "mpt_no_alibi",
            |c| c["attn_config"]["alibi"] = false.into(),
            "attn_config.alibi",
        ),
        (
            "gpt2",
            "gpt2_layer_scale",
            |c| c["scale_attn_by_inverse_layer_idx"] = true.into(),
            "scale_attn_by_inverse_layer_idx",
        ),
        (
            "bloom",
            "bloom_post_ln_residual",
            |c| c["apply_residual_connection_post_layernorm"] = true.into(),
            "apply_residual_connection_post_layernorm",
        ),
        (
            "falcon_new",
            "falcon_three_norms",
            |c| c["num_ln_in_parallel_attn"] = 3.into(),
            "num_ln_in_parallel_attn",
        ),
        (
            "gptj",
            "gptj_act",
            |c| c["activation_function"] = "swiglu_x".into(),
            "swiglu_x",
        ),
    ];
    for (fixture, name, edit, needle) in cases {
        let dir = variant_of(fixture, name, edit, keep);
        let e = load_err(&dir);
        assert!(e.contains(needle), "{name}: {e}");
    }
}

#[test]
fn checkpoint_without_the_transformer_prefix_loads() {
    // The original GPT-2 / BLOOM uploads name `wte.weight`, `h.0.…`.
    let bare = variant_of("gpt2", "gpt2_bare", |_| {}, keep);
    let st = SafetensorsSource::open_dir(&bare).unwrap();
    let mut w = SafetensorsWriter::new();
    for n in st.names() {
        let t = st
            .get(&n, triton_ferrum::loader::Shard::Replicated)
            .unwrap();
        w.f32(
            n.strip_prefix("transformer.").unwrap_or(&n),
            &t.shape,
            &t.data,
        );
    }
    w.write(bare.join("model.safetensors")).unwrap();
    let ours = TestEngine::start(&bare, None, |_| {});
    let reference = TestEngine::start(&fixtures().join("models/gpt2"), None, |_| {});
    let prompt = vec![5, 9, 30, 7];
    assert_eq!(
        collect(&ours.handle(), greedy(prompt.clone(), 6, None)).output_ids,
        collect(&reference.handle(), greedy(prompt, 6, None)).output_ids
    );
}

// ---- MPT's MLP width (issue 17 item 8) ----

/// The mpt fixture's d_model; transformers' MptMLP is always 4 * d_model wide.
const MPT_D_MODEL: usize = 54;
const MPT_UP: &str = "transformer.blocks.0.ffn.up_proj.weight";

#[test]
fn mpt_mlp_width_follows_the_tensors_over_expansion_ratio() {
    // What transformers saves for a config with expansion_ratio 2: a 4 x d_model MLP.
    let dir = variant_of(
        "mpt",
        "mpt_ratio_2",
        |c| c["expansion_ratio"] = 2.into(),
        keep,
    );
    let fixture = fixtures().join("models/mpt");
    let ckpt = Checkpoint::open(&dir, None).unwrap();
    assert_eq!(ckpt.arch.spec.intermediate_size, 4 * MPT_D_MODEL);
    assert!(
        ckpt.notes
            .iter()
            .any(|n| n.contains("expansion_ratio") && n.contains(MPT_UP)),
        "{:?}",
        ckpt.notes
    );
    assert_eq!(
        Checkpoint::open(&fixture, None).unwrap().notes,
        Vec::<String>::new()
    );
    let ours = TestEngine::start(&dir, None, |_| {});
    let reference = TestEngine::start(&fixture, None, |_| {});
    for prompt in [vec![5, 9, 30, 7], vec![1, 2, 3, 4, 5, 6, 7, 8]] {
        let a = collect(&ours.handle(), greedy(prompt.clone(), 6, Some(5)));
        let b = collect(&reference.handle(), greedy(prompt, 6, Some(5)));
        assert_eq!(a.output_ids, b.output_ids);
        assert_eq!(a.logprobs, b.logprobs);
    }
}

#[test]
fn mpt_mlp_tensors_that_disagree_with_each_other_are_named() {
    // up_proj 3 x d_model, down_proj 4 x d_model: no width fits both, so whatever the config
    // says, loading fails on up_proj.
    for ratio in [2, 4] {
        let dir = variant_of(
            "mpt",
            &format!("mpt_up_3x_ratio_{ratio}"),
            |c| c["expansion_ratio"] = ratio.into(),
            |n, s, d| {
                if n == MPT_UP {
                    let (rows, cols) = (3 * MPT_D_MODEL, s[1]);
                    Some((vec![rows, cols], d[..rows * cols].to_vec()))
                } else {
                    Some((s, d))
                }
            },
        );
        let e = load_err(&dir);
        let expected = format!("[{}, {MPT_D_MODEL}]", ratio * MPT_D_MODEL);
        let actual = format!("[{}, {MPT_D_MODEL}]", 3 * MPT_D_MODEL);
        assert!(
            e.contains(MPT_UP) && e.contains(&expected) && e.contains(&actual),
            "ratio {ratio}: {e}"
        );
    }
}

/// A whole tiny model of `preset` written as GGUF `arch` (llama.cpp names and metadata), with
/// its metadata and tensors edited.
fn tiny_arch_gguf(
    preset: &str,
    arch_name: &str,
    names: TensorNames,
    edit_metadata: impl FnOnce(&mut Vec<(String, MetadataValue)>),
    edit_tensors: impl Fn(&str, Vec<usize>) -> Option<Vec<usize>>,
) -> Vec<u8> {
    let mut arch: ArchInfo = presets::preset(preset).unwrap();
    arch.names = names;
    // llama.cpp's converters write fused qkv as q | k | v (GPT-J keeps q, k, v apart).
    if arch.spec.qkv != QkvLayout::Separate {
        arch.spec.qkv = QkvLayout::Fused {
            layout: FusedQkv::Concat,
        };
    }
    let spec = arch.spec.clone();
    let u32v = |v: usize| MetadataValue::U32(v as u32);
    let key = |k: &str| format!("{arch_name}.{k}");
    let mut md = vec![
        (
            "general.architecture".to_string(),
            MetadataValue::String(arch_name.into()),
        ),
        (key("context_length"), u32v(spec.max_position_embeddings)),
        (key("embedding_length"), u32v(spec.hidden_size)),
        (key("block_count"), u32v(spec.num_layers)),
        (key("feed_forward_length"), u32v(spec.intermediate_size)),
        (key("attention.head_count"), u32v(spec.num_heads)),
        (key("attention.head_count_kv"), u32v(spec.num_kv_heads)),
        (
            key("attention.layer_norm_epsilon"),
            MetadataValue::F32(1e-5),
        ),
        (key("vocab_size"), u32v(spec.vocab_size)),
    ];
    if let PosEmbedding::Rope(rope) = &spec.pos {
        md.push((key("rope.dimension_count"), u32v(rope.rotary_dim)));
    }
    edit_metadata(&mut md);
    let tensors = weights::expected_tensors(&arch);
    let src = triton_ferrum::loader::random::RandomSource::new(tensors.clone(), 5);
    let mut w = GgufWriter::new();
    for (k, v) in md {
        w.metadata(&k, v);
    }
    for (name, shape) in &tensors {
        let Some(shape) = edit_tensors(name, shape.clone()) else {
            continue;
        };
        let numel: usize = shape.iter().product();
        let t = src
            .get(name, triton_ferrum::loader::Shard::Replicated)
            .unwrap();
        let data: Vec<f32> = t.data.iter().copied().cycle().take(numel).collect();
        w.tensor_f32(name, &shape, &data);
    }
    w.to_bytes().unwrap()
}

fn gguf_err(name: &str, bytes: Vec<u8>) -> String {
    let path = scratch(name).join("m.gguf");
    std::fs::write(&path, bytes).unwrap();
    load_err(&path)
}

#[test]
fn tiny_gguf_of_each_architecture_loads_and_generates() {
    for (preset, arch, names) in [
        ("tiny-gpt2", "gpt2", TensorNames::Gguf),
        ("tiny-gptj", "gptj", TensorNames::Gguf),
        ("tiny-falcon-new", "falcon", TensorNames::GgufFalcon),
        ("tiny-mpt", "mpt", TensorNames::Gguf),
        ("tiny-bloom", "bloom", TensorNames::Gguf),
    ] {
        let bytes = tiny_arch_gguf(preset, arch, names, |_| {}, |_, s| Some(s));
        let path = scratch(&format!("gguf_{arch}")).join("m.gguf");
        std::fs::write(&path, bytes).unwrap();
        let ckpt = Checkpoint::open(&path, None).unwrap();
        assert_eq!(ckpt.arch.spec.arch, arch);
        let e = TestEngine::start(&path, None, |_| {});
        let c = collect(&e.handle(), greedy(vec![3, 4, 5], 4, None));
        assert_eq!(c.output_ids.len(), 4, "{arch}");
    }
}

#[test]
fn gguf_missing_fused_qkv_is_named() {
    let bytes = tiny_arch_gguf(
        "tiny-gpt2",
        "gpt2",
        TensorNames::Gguf,
        |_| {},
        |n, s| (n != "blk.1.attn_qkv.weight").then_some(s),
    );
    let e = gguf_err("gguf_no_qkv", bytes);
    assert!(
        e.contains("blk.1.attn_qkv.weight") && e.contains("not found"),
        "{e}"
    );
}

#[test]
fn gguf_wrong_fused_qkv_size_is_named() {
    let bytes = tiny_arch_gguf(
        "tiny-bloom",
        "bloom",
        TensorNames::Gguf,
        |_| {},
        |n, s| {
            Some(if n == "blk.0.attn_qkv.weight" {
                vec![s[0] - 10, s[1]]
            } else {
                s
            })
        },
    );
    let e = gguf_err("gguf_short_qkv", bytes);
    // tiny-bloom: hidden 60, 3 * 60 rows expected.
    assert!(
        e.contains("blk.0.attn_qkv.weight") && e.contains("[180, 60]") && e.contains("[170, 60]"),
        "{e}"
    );
}

#[test]
fn gguf_inconsistent_head_counts_are_named() {
    let bytes = tiny_arch_gguf(
        "tiny-falcon-new",
        "falcon",
        TensorNames::GgufFalcon,
        |md| {
            for (k, v) in md.iter_mut() {
                if k == "falcon.attention.head_count_kv" {
                    *v = MetadataValue::U32(4);
                }
            }
        },
        |_, s| Some(s),
    );
    let e = gguf_err("gguf_heads", bytes);
    assert!(
        e.contains("num_heads (6)") && e.contains("num_kv_heads (4)"),
        "{e}"
    );
}

#[test]
fn gguf_unsupported_architecture_lists_the_supported_ones() {
    let bytes = tiny_arch_gguf(
        "tiny-gpt2",
        "gpt2",
        TensorNames::Gguf,
        |md| {
            md[0].1 = MetadataValue::String("rwkv6".into());
        },
        |_, s| Some(s),
    );
    let e = gguf_err("gguf_rwkv", bytes);
    assert!(
        e.contains("rwkv6") && e.contains("bloom") && e.contains("falcon"),
        "{e}"
    );
}
