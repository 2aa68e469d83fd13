//! Pre-quantized FP8 checkpoints (tests/fixtures/fp8/, written by scripts/make_fp8_fixtures.py)
//! load on the CPU engine with no flag: every format is detected from its config files, its E4M3
//! weights are dequantized exactly, and its logits and greedy tokens equal those of its
//! dequantized twin (an ordinary F32 checkpoint of the same values), and they match transformers
//! run on that twin by the rule of every Hugging Face fixture. Also: the FP8 form handed on for a
//! GPU GEMM keeps each fused shard's scale on its own rows, KV scales are read, and online FP8
//! quantization of a float checkpoint. (Bad checkpoints: tests/fp8_bad_checkpoints.rs.)
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::*;
use triton_ferrum::executor::Executor;
use triton_ferrum::executor::cpu::CpuExecutor;
use triton_ferrum::kv_cache::BlockId;
use triton_ferrum::loader::{Shard, TensorSource};
use triton_ferrum::model::Checkpoint;
use triton_ferrum::model::weights::{KvScales, LayerLinear, Linear, WeightReader};
use triton_ferrum::ops::fp8::{Fp8Scale, Fp8Weight};
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::SeqId;
use triton_ferrum::scheduler::{SchedulePlan, ScheduledSeq};

/// An FP8 fixture of scripts/make_fp8_fixtures.py.
struct Fp8Fixture {
    /// Its directory under tests/fixtures/fp8/.
    name: &'static str,
    /// Its dequantized twin (tests/fixtures/fp8/), whose transformers golden is
    /// `golden/fp8_<twin>.json`.
    twin: &'static str,
    /// The float model it was quantized from (tests/fixtures/models/, `golden/<base>.json`).
    base: &'static str,
    /// The load note's scheme part.
    scheme: &'static str,
}

const CT_CHANNEL: &str =
    "compressed-tensors, per-channel weight scales, dynamic per-token activations";
const MODELOPT_KV: &str =
    "modelopt, per-tensor weight scales, static per-tensor activations, fp8 kv-cache scales";
const FBGEMM: &str = "fbgemm_fp8, per-channel weight scales, dynamic per-token activations";

const fn fixture(
    name: &'static str,
    twin: &'static str,
    base: &'static str,
    scheme: &'static str,
) -> Fp8Fixture {
    Fp8Fixture {
        name,
        twin,
        base,
        scheme,
    }
}

const FORMATS: &[Fp8Fixture] = &[
    fixture(
        "llama_ct_tensor_static",
        "llama_twin_tensor",
        "llama_gqa_llama3",
        "compressed-tensors, per-tensor weight scales, static per-tensor activations, fp8 kv-cache scales",
    ),
    fixture(
        "llama_ct_channel_dynamic",
        "llama_twin_channel",
        "llama_gqa_llama3",
        CT_CHANNEL,
    ),
    fixture(
        "llama_modelopt_kv",
        "llama_twin_tensor",
        "llama_gqa_llama3",
        MODELOPT_KV,
    ),
    fixture(
        "llama_fp8_dynamic",
        "llama_twin_tensor",
        "llama_gqa_llama3",
        "fp8, per-tensor weight scales, dynamic per-tensor activations",
    ),
    fixture(
        "llama_fp8_block",
        "llama_twin_block",
        "llama_gqa_llama3",
        "fp8, 24x32 block weight scales, dynamic per-token activations in groups of 32",
    ),
    fixture(
        "llama_fbgemm",
        "llama_twin_channel",
        "llama_gqa_llama3",
        FBGEMM,
    ),
    fixture(
        "falcon_ct_channel_dynamic",
        "falcon_twin_channel",
        "falcon_new",
        CT_CHANNEL,
    ),
    // Every linear a multiple of 16: the GPU runs these as real FP8 products (tests/cuda_fp8.rs).
    fixture(
        "llama16_ct_channel_dynamic",
        "llama16_twin_channel",
        "llama_aligned16",
        CT_CHANNEL,
    ),
    fixture(
        "llama16_modelopt_kv",
        "llama16_twin_tensor",
        "llama_aligned16",
        MODELOPT_KV,
    ),
    fixture(
        "llama16_fbgemm",
        "llama16_twin_channel",
        "llama_aligned16",
        FBGEMM,
    ),
];

fn fp8_dir(name: &str) -> PathBuf {
    fixtures().join("fp8").join(name)
}

/// The prompts of the base model's Hugging Face golden.
fn prompts(base: &str) -> Vec<Vec<u32>> {
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
    for f in FORMATS {
        let (name, twin) = (f.name, f.twin);
        let p = prompts(f.base);
        for format in [WeightFormat::F32, WeightFormat::Q8] {
            let ours = last_logits(&fp8_dir(name), format, &p);
            let want = last_logits(&fp8_dir(twin), format, &p);
            // Same f32 weights bit for bit, so the same logits bit for bit.
            assert!(ours == want, "{name} vs {twin} ({format:?}): logits differ");
        }
        // And the FP8 model is not the original one (the quantization is really applied).
        let original = last_logits(
            &fixtures().join("models").join(f.base),
            WeightFormat::F32,
            &p,
        );
        assert!(
            last_logits(&fp8_dir(name), WeightFormat::F32, &p) != original,
            "{name}"
        );
    }
}

#[test]
fn every_format_generates_the_greedy_tokens_of_its_twin() {
    for f in FORMATS {
        let run = |path: PathBuf| {
            let e = TestEngine::start(&path, Some(WeightFormat::F32), |_| {});
            prompts(f.base)
                .into_iter()
                .map(|p| collect(&e.handle(), greedy(p, 8, None)).output_ids)
                .collect::<Vec<_>>()
        };
        let ours = run(fp8_dir(f.name));
        assert_eq!(ours, run(fp8_dir(f.twin)), "{} vs {}", f.name, f.twin);
        assert!(ours.iter().all(|o| o.len() == 8), "{}: {ours:?}", f.name);
    }
}

/// Each FP8 checkpoint on the CPU engine against transformers run on its dequantized twin
/// (`golden/fp8_<twin>.json`, written by `scripts/make_fp8_fixtures.py --goldens` for the
/// prompts of the base model's golden), by the rule of every Hugging Face fixture
/// (tests/hf_fixtures.rs): greedy tokens equal, or at the first divergence each side's token in
/// the other's top-5; top-5 logprobs and the last-position logits within the same tolerances.
#[test]
fn every_format_matches_transformers_on_its_dequantized_weights() {
    for f in FORMATS {
        let name = format!("fp8_{}", f.twin);
        check_golden_greedy(&fp8_dir(f.name), &name, WeightFormat::F32, HF_LOGPROB_TOL);
        let g = golden(&name);
        let cases = g["cases"].as_array().unwrap();
        let p: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["prompt_ids"])).collect();
        assert_eq!(p, prompts(f.base), "{name}: prompts of golden/{}", f.base);
        let logits = last_logits(&fp8_dir(f.name), WeightFormat::F32, &p);
        for (i, (l, case)) in logits.iter().zip(cases).enumerate() {
            let d = check_golden_logits(&format!("{} vs {name} case {i}", f.name), l, case);
            eprintln!("{} vs {name} case {i}: max |logit diff| {d:.2e}", f.name);
        }
    }
}

#[test]
fn each_format_is_detected_and_noted() {
    for f in FORMATS {
        let ckpt = Checkpoint::open(&fp8_dir(f.name), None).unwrap();
        let (num_fp8, ignored) = match f.base {
            // 2 layers x 4 linears + lm_head; lm_head and layer 0's dense_4h_to_h unquantized.
            "falcon_new" => (7, "lm_head, transformer.h.0.mlp.dense_4h_to_h"),
            // 3 layers x 7 linears + lm_head.
            "llama_gqa_llama3" => (20, "lm_head, model.layers.0.mlp.down_proj"),
            // 2 layers x 7 linears + lm_head.
            "llama_aligned16" => (13, "lm_head, model.layers.0.mlp.down_proj"),
            other => panic!("{}: unknown base {other}", f.name),
        };
        let want = format!(
            "fp8 weights: {}; {num_fp8} linears in FP8, 2 unquantized ({ignored})",
            f.scheme
        );
        assert_eq!(ckpt.notes, vec![want], "{}", f.name);
        let twin = Checkpoint::open(&fp8_dir(f.twin), None).unwrap();
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
        (
            "llama16_modelopt_kv",
            "self_attn.k_proj.k_scale",
            "self_attn.v_proj.v_scale",
        ),
    ] {
        let ckpt = Checkpoint::open(&fp8_dir(name), None).unwrap();
        let src = ckpt.source.as_ref();
        let r = WeightReader::new(src, &ckpt.arch, WeightFormat::F32);
        for i in 0..ckpt.arch.spec.num_layers {
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
    let p = prompts("llama_gqa_llama3");
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
