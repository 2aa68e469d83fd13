//! Pre-quantized FP8 checkpoints (tests/fixtures/fp8/, written by scripts/make_fp8_fixtures.py)
//! load on the CPU engine with no flag: every format is detected from its config files, its E4M3
//! weights are dequantized exactly, and its logits and greedy tokens equal those of its
//! dequantized twin (an ordinary F32 checkpoint of the same values). Also: the FP8 form handed on
//! for a GPU GEMM keeps each fused shard's scale on its own rows, KV scales are read, and bad
//! checkpoints give errors naming the key, value or tensor.
#![allow(clippy::unwrap_used)]

mod common;
mod loader_common;

use std::path::{Path, PathBuf};

use common::*;
use loader_common::safetensors_writer::SafetensorsWriter;
use serde_json::Value;
use triton_ferrum::executor::Executor;
use triton_ferrum::executor::cpu::CpuExecutor;
use triton_ferrum::kv_cache::BlockId;
use triton_ferrum::loader::safetensors::{SafetensorsDType, SafetensorsSource};
use triton_ferrum::loader::{Shard, TensorSource};
use triton_ferrum::model::Checkpoint;
use triton_ferrum::model::weights::{KvScales, LayerLinear, Linear, WeightReader};
use triton_ferrum::ops::fp8::{Fp8Scale, Fp8Weight};
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::SeqId;
use triton_ferrum::scheduler::{SchedulePlan, ScheduledSeq};

/// (fixture, its dequantized twin, the load note's scheme part).
const FORMATS: &[(&str, &str, &str)] = &[
    (
        "llama_ct_tensor_static",
        "llama_twin_tensor",
        "compressed-tensors, per-tensor weight scales, static per-tensor activations, fp8 kv-cache scales",
    ),
    (
        "llama_ct_channel_dynamic",
        "llama_twin_channel",
        "compressed-tensors, per-channel weight scales, dynamic per-token activations",
    ),
    (
        "llama_modelopt_kv",
        "llama_twin_tensor",
        "modelopt, per-tensor weight scales, static per-tensor activations, fp8 kv-cache scales",
    ),
    (
        "llama_fp8_dynamic",
        "llama_twin_tensor",
        "fp8, per-tensor weight scales, dynamic per-tensor activations",
    ),
    (
        "llama_fp8_block",
        "llama_twin_block",
        "fp8, 24x32 block weight scales, dynamic per-token activations in groups of 32",
    ),
    (
        "llama_fbgemm",
        "llama_twin_channel",
        "fbgemm_fp8, per-channel weight scales, dynamic per-token activations",
    ),
    (
        "falcon_ct_channel_dynamic",
        "falcon_twin_channel",
        "compressed-tensors, per-channel weight scales, dynamic per-token activations",
    ),
];

fn fp8_dir(name: &str) -> PathBuf {
    fixtures().join("fp8").join(name)
}

/// The prompts of the base model's Hugging Face golden.
fn prompts(fixture: &str) -> Vec<Vec<u32>> {
    let base = match fixture.starts_with("falcon") {
        true => "falcon_new",
        false => "llama_gqa_llama3",
    };
    golden(base)["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| ids(&c["prompt_ids"]))
        .collect()
}

/// Last-position logits of each prompt through the CPU executor (one prefill step each).
fn last_logits(path: &Path, format: WeightFormat, prompts: &[Vec<u32>]) -> Vec<Vec<f32>> {
    checkpoint_logits(&Checkpoint::open(path, None).unwrap(), format, prompts)
}

/// `last_logits` of an opened checkpoint.
fn checkpoint_logits(
    ckpt: &Checkpoint,
    format: WeightFormat,
    prompts: &[Vec<u32>],
) -> Vec<Vec<f32>> {
    let weights = triton_ferrum::engine::options::load_weights(ckpt, format, false).unwrap();
    let block_size = 4;
    let max_len = prompts.iter().map(Vec::len).max().unwrap();
    let mut exec = CpuExecutor::new(
        ckpt.arch.spec.clone(),
        weights,
        max_len.div_ceil(block_size),
        block_size,
        0,
    )
    .unwrap();
    prompts
        .iter()
        .enumerate()
        .map(|(i, prompt)| {
            let n = prompt.len();
            let plan = SchedulePlan {
                seqs: vec![ScheduledSeq {
                    seq_id: SeqId(i as u64),
                    token_ids: prompt.clone(),
                    start_pos: 0,
                    block_table: (0..n.div_ceil(block_size) as u32).map(BlockId).collect(),
                    sample: true,
                }],
                preempted: vec![],
                num_batched_tokens: n,
            };
            exec.logits(&plan).unwrap().data
        })
        .collect()
}

#[test]
fn every_format_has_the_logits_of_its_dequantized_twin() {
    for &(name, twin, _) in FORMATS {
        let p = prompts(name);
        for format in [WeightFormat::F32, WeightFormat::Q8] {
            let ours = last_logits(&fp8_dir(name), format, &p);
            let want = last_logits(&fp8_dir(twin), format, &p);
            // Same f32 weights bit for bit, so the same logits bit for bit.
            assert!(ours == want, "{name} vs {twin} ({format:?}): logits differ");
        }
        // And the FP8 model is not the original one (the quantization is really applied).
        let base = match name.starts_with("falcon") {
            true => "falcon_new",
            false => "llama_gqa_llama3",
        };
        let original = last_logits(&fixtures().join("models").join(base), WeightFormat::F32, &p);
        assert!(
            last_logits(&fp8_dir(name), WeightFormat::F32, &p) != original,
            "{name}"
        );
    }
}

#[test]
fn every_format_generates_the_greedy_tokens_of_its_twin() {
    for &(name, twin, _) in FORMATS {
        let run = |path: PathBuf| {
            let e = TestEngine::start(&path, Some(WeightFormat::F32), |_| {});
            prompts(name)
                .into_iter()
                .map(|p| collect(&e.handle(), greedy(p, 8, None)).output_ids)
                .collect::<Vec<_>>()
        };
        let ours = run(fp8_dir(name));
        assert_eq!(ours, run(fp8_dir(twin)), "{name} vs {twin}");
        assert!(ours.iter().all(|o| o.len() == 8), "{name}: {ours:?}");
    }
}

#[test]
fn each_format_is_detected_and_noted() {
    for &(name, twin, scheme) in FORMATS {
        let ckpt = Checkpoint::open(&fp8_dir(name), None).unwrap();
        let (num_fp8, ignored) = match name.starts_with("falcon") {
            // 2 layers x 4 linears + lm_head; lm_head and layer 0's dense_4h_to_h unquantized.
            true => (7, "lm_head, transformer.h.0.mlp.dense_4h_to_h"),
            // 3 layers x 7 linears + lm_head.
            false => (20, "lm_head, model.layers.0.mlp.down_proj"),
        };
        let want =
            format!("fp8 weights: {scheme}; {num_fp8} linears in FP8, 2 unquantized ({ignored})");
        assert_eq!(ckpt.notes, vec![want], "{name}");
        let twin = Checkpoint::open(&fp8_dir(twin), None).unwrap();
        assert!(twin.notes.is_empty(), "{:?}", twin.notes);
    }
}

fn scalar(src: &dyn TensorSource, name: &str) -> f32 {
    let t = src.get(name, Shard::Replicated).unwrap();
    assert_eq!(t.data.len(), 1, "{name}");
    t.data[0]
}

fn fp8(linear: Linear) -> Fp8Weight {
    match linear {
        Linear::Fp8(w) => w,
        Linear::Dense(_) => panic!("an FP8 linear was expected"),
    }
}

#[test]
fn fused_shards_keep_their_own_scales_on_their_rows() {
    // Per-tensor q, k, v and gate, up scales become the per-row scales of the fused weights.
    for name in [
        "llama_ct_tensor_static",
        "llama_modelopt_kv",
        "llama_fp8_dynamic",
    ] {
        let ckpt = Checkpoint::open(&fp8_dir(name), None).unwrap();
        let src = ckpt.source.as_ref();
        let r = WeightReader::new(src, &ckpt.arch, WeightFormat::F32);
        let layer = 1;
        let pre = format!("model.layers.{layer}.");
        let qkv = fp8(r.layer_linear(layer, LayerLinear::Qkv).unwrap());
        let s = |m: &str| scalar(src, &format!("{pre}{m}.weight_scale"));
        let (sq, sk, sv) = (
            s("self_attn.q_proj"),
            s("self_attn.k_proj"),
            s("self_attn.v_proj"),
        );
        assert!(
            sq != sk && sk != sv && sq != sv,
            "{name}: distinct scales expected"
        );
        let mut want = vec![sq; 72];
        want.extend([sk; 24]);
        want.extend([sv; 24]);
        assert_eq!(qkv.scale, Fp8Scale::Channel(want), "{name}");
        assert_eq!((qkv.rows, qkv.cols), (120, 72));
        // The codes are the checkpoint's, rows in q | k | v order.
        let codes = |m: &str| {
            src.get_e4m3(&format!("{pre}{m}.weight"), Shard::Replicated)
                .unwrap()
                .codes
        };
        assert_eq!(qkv.codes[72 * 72..96 * 72], codes("self_attn.k_proj")[..]);
        let input = |m: &str| scalar(src, &format!("{pre}{m}.input_scale"));
        match name {
            "llama_fp8_dynamic" => assert_eq!(qkv.input_scale, None),
            _ => assert_eq!(
                qkv.input_scale,
                Some(
                    input("self_attn.q_proj")
                        .max(input("self_attn.k_proj"))
                        .max(input("self_attn.v_proj"))
                )
            ),
        }
        let gate_up = fp8(r.layer_linear(layer, LayerLinear::GateUp).unwrap());
        let mut want = vec![s("mlp.gate_proj"); 100];
        want.extend([s("mlp.up_proj"); 100]);
        assert_eq!(gate_up.scale, Fp8Scale::Channel(want), "{name}");
        // A single linear keeps its per-tensor scale; the ignored one is dense.
        let out = fp8(r.layer_linear(layer, LayerLinear::AttnOut).unwrap());
        assert_eq!(out.scale, Fp8Scale::Tensor(s("self_attn.o_proj")));
        assert!(matches!(
            r.layer_linear(0, LayerLinear::Down).unwrap(),
            Linear::Dense(_)
        ));
        assert!(matches!(
            r.layer_linear(1, LayerLinear::Down).unwrap(),
            Linear::Fp8(_)
        ));
    }
}

#[test]
fn channel_and_block_scales_are_handed_on() {
    let ckpt = Checkpoint::open(&fp8_dir("llama_fbgemm"), None).unwrap();
    let src = ckpt.source.as_ref();
    let r = WeightReader::new(src, &ckpt.arch, WeightFormat::F32);
    let qkv = fp8(r.layer_linear(2, LayerLinear::Qkv).unwrap());
    let Fp8Scale::Channel(scales) = &qkv.scale else {
        panic!("{:?}", qkv.scale)
    };
    let v = src
        .get(
            "model.layers.2.self_attn.v_proj.weight_scale",
            Shard::Replicated,
        )
        .unwrap()
        .data;
    assert_eq!(scales[96..], v[..]);

    let ckpt = Checkpoint::open(&fp8_dir("llama_fp8_block"), None).unwrap();
    let src = ckpt.source.as_ref();
    let r = WeightReader::new(src, &ckpt.arch, WeightFormat::F32);
    // q, k, v rows (72, 24, 24) are whole 24-row tiles: the fused weight keeps its blocks.
    let qkv = fp8(r.layer_linear(1, LayerLinear::Qkv).unwrap());
    let Fp8Scale::Block { block, scales } = &qkv.scale else {
        panic!("{:?}", qkv.scale)
    };
    assert_eq!(*block, (24, 32));
    assert_eq!(scales.len(), 5 * 3); // ceil(120 / 24) x ceil(72 / 32)
    let k = src
        .get(
            "model.layers.1.self_attn.k_proj.weight_scale_inv",
            Shard::Replicated,
        )
        .unwrap()
        .data;
    assert_eq!(scales[3 * 3..4 * 3], k[..]);
    // gate | up (100 rows each) would split a tile: dequantized.
    assert!(matches!(
        r.layer_linear(1, LayerLinear::GateUp).unwrap(),
        Linear::Dense(_)
    ));
    // Ragged edge tiles on the input side: o_proj [72, 72] has ceil(72 / 32) = 3 tile columns.
    let out = fp8(r.layer_linear(1, LayerLinear::AttnOut).unwrap());
    assert!(matches!(&out.scale, Fp8Scale::Block { scales, .. } if scales.len() == 3 * 3));
}

#[test]
fn kv_cache_scales_are_kept_with_the_layer() {
    for (name, k_name, v_name) in [
        (
            "llama_modelopt_kv",
            "self_attn.k_proj.k_scale",
            "self_attn.v_proj.v_scale",
        ),
        (
            "llama_ct_tensor_static",
            "self_attn.k_proj.output_scale",
            "self_attn.v_proj.output_scale",
        ),
    ] {
        let ckpt = Checkpoint::open(&fp8_dir(name), None).unwrap();
        let src = ckpt.source.as_ref();
        let r = WeightReader::new(src, &ckpt.arch, WeightFormat::F32);
        for i in 0..3 {
            let want = KvScales {
                k: scalar(src, &format!("model.layers.{i}.{k_name}")),
                v: scalar(src, &format!("model.layers.{i}.{v_name}")),
            };
            assert_eq!(r.kv_scales(i).unwrap(), Some(want), "{name} layer {i}");
            assert_eq!(r.layer(i).unwrap().kv_scales, Some(want));
        }
    }
    let ckpt = Checkpoint::open(&fp8_dir("llama_fbgemm"), None).unwrap();
    let r = WeightReader::new(ckpt.source.as_ref(), &ckpt.arch, WeightFormat::F32);
    assert_eq!(r.kv_scales(0).unwrap(), None);
}

// ---------------------------------------------------------------- bad checkpoints

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
        .join("fp8_checkpoints")
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

/// `quantization: fp8` on a float checkpoint: every layer linear becomes FP8 E4M3 with one scale
/// per output channel (amax / 448) of the checkpoint's own weights; embeddings and the LM head
/// stay as stored. Fused q|k|v and gate|up are quantized row by row, so each shard's rows get
/// their own scales.
#[test]
fn online_fp8_quantizes_each_layer_linear_per_output_channel() {
    use triton_ferrum::model::quant::{Quantization, QuantizationOption};
    use triton_ferrum::ops::fp8::Fp8Rows;
    for base in ["llama_gqa_llama3", "falcon_new", "gpt2"] {
        let plain = Checkpoint::open(&fixtures().join("models").join(base), None).unwrap();
        let mut ckpt = Checkpoint::open(&fixtures().join("models").join(base), None).unwrap();
        let note = ckpt.arch.quant.apply(QuantizationOption::Fp8).unwrap();
        assert!(note.contains("quantized at load"), "{note}");
        assert!(matches!(ckpt.arch.quant, Quantization::Fp8Online));
        // An FP8 request on an FP8 checkpoint, or auto, changes nothing.
        assert!(ckpt.arch.quant.apply(QuantizationOption::Fp8).is_none());
        let src = ckpt.source.as_ref();
        let online = WeightReader::new(src, &ckpt.arch, WeightFormat::F32);
        let dense = WeightReader::new(plain.source.as_ref(), &plain.arch, WeightFormat::F32);
        for i in 0..ckpt.arch.spec.num_layers {
            for which in [
                LayerLinear::Qkv,
                LayerLinear::AttnOut,
                LayerLinear::GateUp,
                LayerLinear::Down,
            ] {
                let w = fp8(online.layer_linear(i, which).unwrap());
                let Linear::Dense(d) = dense.layer_linear(i, which).unwrap() else {
                    panic!("{base}: the plain checkpoint has no FP8 linear");
                };
                let mut rows = vec![0f32; d.rows() * d.cols()];
                for (r, out) in rows.chunks_mut(d.cols()).enumerate() {
                    d.row_to_f32(r, out);
                }
                let want = Fp8Weight::from(Fp8Rows::quantize(&rows, d.rows(), d.cols()));
                assert_eq!(w, want, "{base} layer {i} {which:?}");
                assert!(matches!(w.scale, Fp8Scale::Channel(ref s) if s.len() == d.rows()));
                assert!(
                    w.dequantize() != rows,
                    "{base} layer {i} {which:?}: not quantized"
                );
            }
        }
        // Embeddings and the LM head are the checkpoint's.
        let emb = |r: &WeightReader<'_>| {
            let e = r.embedding().unwrap();
            let mut row = vec![0f32; e.cols()];
            e.row_to_f32(3, &mut row);
            row
        };
        assert_eq!(emb(&online), emb(&dense), "{base}");
    }
}

/// The CPU engine with `quantization: fp8` runs the FP8-rounded weights: its logits differ from
/// the float model's by the quantization error only (small next to the logits' spread), and its
/// load log says what was done.
#[test]
fn online_fp8_engine_runs_the_rounded_weights() {
    use triton_ferrum::model::quant::QuantizationOption;
    let path = fixtures().join("models").join("llama_gqa_llama3");
    let p = prompts("llama_ct_channel_dynamic");
    let float = last_logits(&path, WeightFormat::F32, &p);
    let mut ckpt = Checkpoint::open(&path, None).unwrap();
    ckpt.arch.quant.apply(QuantizationOption::Fp8);
    let fp8 = checkpoint_logits(&ckpt, WeightFormat::F32, &p);
    for (i, (got, want)) in fp8.iter().zip(&float).enumerate() {
        // Relative L2 error of the logits: E4M3 keeps 3 mantissa bits; this tiny random model
        // amplifies weight noise (the per-channel FP8 checkpoint of it that
        // scripts/make_fp8_fixtures.py writes, llama_twin_channel, is 10-19 % off as well).
        let l2 = |v: Vec<f32>| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let diff: Vec<f32> = got.iter().zip(want).map(|(a, b)| a - b).collect();
        let err = l2(diff) / l2(want.clone());
        eprintln!("prompt {i}: relative L2 error of the logits {err}");
        assert!(err > 0.0, "prompt {i}: the FP8 weights changed nothing");
        assert!(
            err < 0.3,
            "prompt {i}: relative L2 error {err} of the logits"
        );
    }
    let mut opts = triton_ferrum::engine::EngineOptions::new(&path);
    opts.device = triton_ferrum::engine::Device::Cpu;
    opts.quantization = QuantizationOption::Fp8;
    let loaded = triton_ferrum::engine::options::start(&opts).unwrap();
    assert!(
        loaded.log.iter().any(|l| l.contains("quantized at load")),
        "{:?}",
        loaded.log
    );
    let out = collect(&loaded.engine.handle(), greedy(p[0].clone(), 4, None));
    assert_eq!(out.output_ids.len(), 4);
}
