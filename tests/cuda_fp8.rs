//! FP8 E4M3 on the GPU against the host reference (`triton_ferrum::ops::fp8`, the CPU engine):
//! the device codec bit for bit, per-token activation quantization bit for bit, the FP8 products
//! (gemv and cuBLASLt, with and without bias) against the f32 product of the dequantized
//! operands, the fused gated gemv, and whole models quantized at load (`quantization: fp8`) on
//! the GPU against the CPU engine running the same codes dequantized. They need an NVIDIA GPU
//! with FP8 (compute capability 8.9+) and are ignored in CPU CI: `ci/gpu.sh` runs them.
#![allow(clippy::unwrap_used)]

mod common;
mod cuda_common;

use std::sync::OnceLock;

use common::*;
use cuda_common::*;
use half::{bf16, f16};
use triton_ferrum::cuda::gemm::fp8::{
    Fp8Activations, Fp8Weights, codec_check, fp8_gated_gemv, quantize_rows,
};
use triton_ferrum::cuda::{CudaLibrary, FloatElem, Gemm, GemmBackend};
use triton_ferrum::dtype::DType;
use triton_ferrum::engine::Device;
use triton_ferrum::model::quant::QuantizationOption;
use triton_ferrum::model::spec::Activation;
use triton_ferrum::ops::fp8::{Fp8Rows, e4m3_to_f32, f32_to_e4m3};

fn gemm() -> &'static Gemm {
    static GEMM: OnceLock<Gemm> = OnceLock::new();
    GEMM.get_or_init(|| Gemm::new(dev()).unwrap())
}

// ---------------------------------------------------------------------------------------------
// Codec and activation quantization: bit for bit

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn device_codec_equals_the_host_codec_bit_for_bit() {
    let mut x = vec![
        0.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1e30,
        -1e30,
        448.0,
        464.0,
        449.0,
        2f32.powi(-10),
        2f32.powi(-11),
        1e-20,
    ];
    // Every midpoint between neighbouring codes, and values just around it.
    for c in 0u8..0x7E {
        let (lo, hi) = (e4m3_to_f32(c), e4m3_to_f32(c + 1));
        let mid = (lo + hi) / 2.0;
        for v in [mid, mid - (hi - lo) / 8.0, mid + (hi - lo) / 8.0, lo] {
            x.extend([v, -v]);
        }
    }
    // Random magnitudes from 2^-14 to 2^10.
    let mut rng = Rng(7);
    for _ in 0..20_000 {
        let e = rng.below(25) as i32 - 14;
        x.push(rng.f32() * 2f32.powi(e));
    }
    let xd = dev().upload(&x).unwrap();
    let (codes, back) = codec_check(dev(), &xd).unwrap();
    let (codes, back) = (
        dev().download(&codes).unwrap(),
        dev().download(&back).unwrap(),
    );
    let mut mismatches = 0;
    for (i, (&v, &c)) in x.iter().zip(&codes).enumerate() {
        if c != f32_to_e4m3(v) {
            mismatches += 1;
            if mismatches < 10 {
                eprintln!(
                    "x[{i}] = {v:e}: device {c:#04x}, host {:#04x}",
                    f32_to_e4m3(v)
                );
            }
        }
    }
    assert_eq!(mismatches, 0, "{mismatches} of {} codes differ", x.len());
    for (code, &v) in back.iter().enumerate() {
        let want = e4m3_to_f32(code as u8);
        if !want.is_nan() {
            assert_eq!(v, want, "decoding code {code:#04x}");
        }
    }
    println!(
        "CODEC: {} values encoded, 254 codes decoded, all equal to the host",
        x.len()
    );
}

/// Per-row scales and codes of x [m, k] as the host computes them (`Fp8Rows` per row), or with
/// one static scale.
fn host_quantize(x: &[f32], m: usize, k: usize, static_scale: Option<f32>) -> (Vec<u8>, Vec<f32>) {
    match static_scale {
        None => {
            let q = Fp8Rows::quantize(x, m, k);
            (q.codes, q.scales)
        }
        Some(s) => (x.iter().map(|&v| f32_to_e4m3(v / s)).collect(), vec![s; m]),
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU: run ci/gpu.sh"]
fn per_token_quantization_equals_the_host() {
    fn run<T: FloatElem>() {
        let mut rng = Rng(11);
        let (m, k) = (37, 96);
        let mut x = round::<T>(&rng.vec(m * k, 3.0));
        // A row of zeros (scale 1) and a row with one large value.
        x[5 * k..6 * k].iter_mut().for_each(|v| *v = 0.0);
        x[9 * k + 3] = T::from_f32(900.0).to_f32();
        let xd = up::<T>(&x);
        let mut acts = Fp8Activations::new(dev(), 64, 128).unwrap();
        for static_scale in [None, Some(0.02f32)] {
            quantize_rows(dev(), &mut acts, &xd, m, k, static_scale).unwrap();
            let codes = dev().download(&acts.codes).unwrap();
            let scales = dev().download(&acts.scales).unwrap();
            let (want_codes, want_scales) = host_quantize(&x, m, k, static_scale);
            assert_eq!(
                scales,
                want_scales,
                "[{}] scales {static_scale:?}",
                T::DTYPE
            );
            assert_eq!(codes, want_codes, "[{}] codes {static_scale:?}", T::DTYPE);
        }
        println!("QUANTIZE [{}]: {m}x{k} equal to the host", T::DTYPE);
    }
    run::<f32>();
    run::<bf16>();
    run::<f16>();
}

// ---------------------------------------------------------------------------------------------
// Products

/// Random FP8 weights [n, k] (per-channel scales), their f32 dequantization, and a bias.
fn fp8_weights(rng: &mut Rng, n: usize, k: usize) -> (Fp8Rows, Vec<f32>) {
    let w = rng.vec(n * k, 0.5);
    let q = Fp8Rows::quantize(&w, n, k);
    let mut deq = vec![0.0f32; n * k];
    for (r, out) in deq.chunks_mut(k).enumerate() {
        q.row_to_f32(r, out);
    }
    (q, deq)
}

/// y = x · wᵀ + b in f32 (x [m, k], w [n, k]).
fn product(x: &[f32], w: &[f32], b: Option<&[f32]>, m: usize, n: usize, k: usize) -> Vec<f32> {
    let mut y = vec![0.0f32; m * n];
    for r in 0..m {
        for j in 0..n {
            let dot: f64 = (0..k)
                .map(|c| x[r * k + c] as f64 * w[j * k + c] as f64)
                .sum();
            y[r * n + j] = dot as f32 + b.map_or(0.0, |b| b[j]);
        }
    }
    y
}

/// Checks |got - want| <= tol (|want| + 0.25 max|want|) with tol at least the dtype's and 2e-3
/// for cuBLASLt's FP8 accumulation (its internal accumulator precision is undocumented).
fn check_fp8<T: FloatElem>(what: &str, got: &[f32], want: &[f32], tol: f32) {
    let scale = want.iter().fold(0.0f32, |m, w| m.max(w.abs()));
    let mut worst = 0.0f32;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g - w).abs();
        assert!(
            err <= tol * (w.abs() + 0.25 * scale),
            "{what} [{}]: element {i}: got {g}, want {w} (tol {tol}, scale {scale})",
            T::DTYPE
        );
        worst = worst.max(err / scale);
    }
    println!(
        "CHECK {what} [{}]: max err/scale {worst:.3e} (tol {tol})",
        T::DTYPE
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU with FP8: run ci/gpu.sh"]
fn fp8_products_match_the_dequantized_f32_product() {
    fn run<T: FloatElem>() {
        let mut rng = Rng(3);
        let mut acts = Fp8Activations::new(dev(), 512, 1024).unwrap();
        for (m, n, k) in [
            (1, 64, 64),
            (3, 96, 128),
            (8, 256, 64),
            (9, 128, 96),
            (33, 160, 256),
            (200, 512, 1024),
        ] {
            let (q, wdeq) = fp8_weights(&mut rng, n, k);
            let w = Fp8Weights::upload(dev(), &q.codes, &q.scales, None, n, k).unwrap();
            let x = round::<T>(&rng.vec(m * k, 1.0));
            let b = round::<T>(&rng.vec(n, 1.0));
            let xd = up::<T>(&x);
            let bd = up::<T>(&b);
            let mut backends = vec![GemmBackend::Auto, GemmBackend::CublasLt];
            if m <= 8 {
                backends.push(GemmBackend::Gemv);
            }
            for backend in backends {
                for with_bias in [false, true] {
                    let bias = with_bias.then_some(b.as_slice());
                    let mut y = poisoned::<T>(m * n);
                    let path = gemm()
                        .linear_fp8(
                            dev(),
                            &mut y,
                            &xd,
                            &w,
                            with_bias.then_some(&bd),
                            m,
                            &mut acts,
                            backend,
                        )
                        .unwrap();
                    // The gemv multiplies the weights by x as it is; cuBLASLt by x quantized per
                    // token (the host twin of quantize_rows).
                    let (want, tol) = if path.library == CudaLibrary::Nvrtc {
                        (product(&x, &wdeq, bias, m, n, k), tol::<T>())
                    } else {
                        let (codes, scales) = host_quantize(&x, m, k, None);
                        let xq: Vec<f32> = codes
                            .iter()
                            .enumerate()
                            .map(|(i, &c)| e4m3_to_f32(c) * scales[i / k])
                            .collect();
                        (product(&xq, &wdeq, bias, m, n, k), tol::<T>().max(2e-3))
                    };
                    assert_eq!(
                        path.library == CudaLibrary::Nvrtc,
                        backend == GemmBackend::Gemv || (backend == GemmBackend::Auto && m <= 8),
                        "{backend:?} m={m}: ran on {path:?}"
                    );
                    check_fp8::<T>(
                        &format!("fp8 m={m} n={n} k={k} bias={with_bias} {backend:?} via {path:?}"),
                        &down(&y),
                        &want,
                        tol,
                    );
                }
            }
        }
        // A static activation scale (a checkpoint's input_scale) replaces the per-token ones.
        let (m, n, k) = (24, 64, 128);
        let (q, wdeq) = fp8_weights(&mut rng, n, k);
        let w = Fp8Weights::upload(dev(), &q.codes, &q.scales, Some(0.01), n, k).unwrap();
        let x = round::<T>(&rng.vec(m * k, 1.0));
        let mut y = poisoned::<T>(m * n);
        gemm()
            .linear_fp8(
                dev(),
                &mut y,
                &up::<T>(&x),
                &w,
                None,
                m,
                &mut acts,
                GemmBackend::CublasLt,
            )
            .unwrap();
        let xq: Vec<f32> = x
            .iter()
            .map(|&v| e4m3_to_f32(f32_to_e4m3(v / 0.01)) * 0.01)
            .collect();
        check_fp8::<T>(
            "fp8 static input_scale",
            &down(&y),
            &product(&xq, &wdeq, None, m, n, k),
            tol::<T>().max(2e-3),
        );
    }
    run::<bf16>();
    run::<f16>();
    run::<f32>();
    for plan in gemm().plan_descriptions() {
        println!("PLAN {plan}");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU with FP8: run ci/gpu.sh"]
fn fp8_gated_gemv_equals_the_host_gated_mlp() {
    fn run<T: FloatElem>() {
        let mut rng = Rng(5);
        let (inter, k) = (96, 128);
        let (q, wdeq) = fp8_weights(&mut rng, 2 * inter, k);
        let w = Fp8Weights::upload(dev(), &q.codes, &q.scales, None, 2 * inter, k).unwrap();
        for m in [1, 4, 8] {
            let x = round::<T>(&rng.vec(m * k, 1.0));
            let b = round::<T>(&rng.vec(2 * inter, 0.5));
            let gu = round::<T>(&product(&x, &wdeq, Some(&b), m, 2 * inter, k));
            let want: Vec<f32> = (0..m * inter)
                .map(|i| {
                    let (r, j) = (i / inter, i % inter);
                    let (g, u) = (gu[r * 2 * inter + j], gu[r * 2 * inter + inter + j]);
                    g / (1.0 + (-g).exp()) * u
                })
                .collect();
            let mut y = poisoned::<T>(m * inter);
            fp8_gated_gemv(
                dev(),
                Activation::Silu,
                &mut y,
                &up::<T>(&x),
                &w,
                Some(&up::<T>(&b)),
                m,
            )
            .unwrap();
            check::<T>(
                &format!("fp8 gated gemv m={m}"),
                &down(&y),
                &round::<T>(&want),
            );
        }
    }
    run::<bf16>();
    run::<f16>();
    run::<f32>();
}

#[test]
#[ignore = "needs an NVIDIA GPU with FP8: run ci/gpu.sh"]
fn fp8_products_refuse_bad_shapes_without_panicking() {
    let err = Fp8Weights::upload(dev(), &[0u8; 24 * 64], &[1.0; 24], None, 24, 64)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("multiples of 16"), "{err}");
    let w = Fp8Weights::upload(dev(), &[0u8; 32 * 64], &[1.0; 32], None, 32, 64).unwrap();
    let mut acts = Fp8Activations::new(dev(), 16, 64).unwrap();
    let x = up::<bf16>(&vec![0.0; 16 * 64]);
    let mut y = poisoned::<bf16>(16 * 32);
    let err = gemm()
        .linear_fp8(
            dev(),
            &mut y,
            &x,
            &w,
            None,
            16,
            &mut acts,
            GemmBackend::Gemv,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("1..=8"), "{err}");
    let err = gemm()
        .linear_fp8(
            dev(),
            &mut y,
            &x,
            &w,
            None,
            16,
            &mut acts,
            GemmBackend::Cublas,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("cuBLAS has no FP8"), "{err}");
    let err = gemm()
        .linear_fp8(
            dev(),
            &mut y,
            &x,
            &w,
            None,
            15,
            &mut acts,
            GemmBackend::Auto,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("x [m, k]"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Models quantized at load: GPU (FP8 products) against the CPU engine (the same codes,
// dequantized exactly)

/// Tokens of the matched prefix and the largest top-5 logprob difference there, by the greedy
/// rule of the other GPU tests (equal tokens; at a first divergence each side's token in the
/// other's top-5, and the comparison stops).
fn follow(what: &str, ours: &Collected, want: &Collected) -> (usize, f32) {
    let mut diff = 0.0f32;
    for step in 0..want.output_ids.len().min(ours.output_ids.len()) {
        let (a, b) = (ours.output_ids[step], want.output_ids[step]);
        let (ta, tb) = (&ours.logprobs[step].top, &want.logprobs[step].top);
        if a != b {
            assert!(
                tb.iter().any(|&(id, _)| id == a) && ta.iter().any(|&(id, _)| id == b),
                "{what}: step {step}: {a} vs {b}, not in each other's top-5 ({ta:?} / {tb:?})"
            );
            return (step, diff);
        }
        for &(id, lp) in tb {
            if let Some(&(_, l)) = ta.iter().find(|(i, _)| *i == id) {
                diff = diff.max((lp - l).abs());
            }
        }
    }
    (want.output_ids.len(), diff)
}

/// bf16 activations and per-token FP8 activations in the prefill products: the same budget as
/// the bf16 fixtures' rule (1.0 nats, 85 % of tokens before a divergence).
const FP8_LOGPROB_TOL: f32 = 1.0;
const FP8_MIN_MATCHED_PCT: usize = 85;

#[test]
#[ignore = "needs an NVIDIA GPU with FP8: run ci/gpu.sh"]
fn quantized_models_on_the_gpu_follow_the_cpu_engine() {
    // falcon_mq, falcon_rw_alibi and llama_aligned16 have every linear a multiple of 16 (all FP8
    // on the GPU); llama_gqa_llama3 (hidden 72) and falcon_new (hidden 48, ffn 100) keep their
    // linears dequantized. The FP8 checkpoints load as they are: the llama16_* ones (quantized
    // from llama_aligned16 by scripts/make_fp8_fixtures.py) run their own scales through the FP8
    // products: per-channel with dynamic activations, per-tensor with static input scales (and
    // KV scales), per-row fbgemm.
    let models = [
        ("models/falcon_mq", QuantizationOption::Fp8, "falcon_mq"),
        (
            "models/falcon_rw_alibi",
            QuantizationOption::Fp8,
            "falcon_rw_alibi",
        ),
        (
            "models/llama_gqa_llama3",
            QuantizationOption::Fp8,
            "llama_gqa_llama3",
        ),
        (
            "fp8/llama_ct_channel_dynamic",
            QuantizationOption::Auto,
            "llama_gqa_llama3",
        ),
        (
            "fp8/falcon_ct_channel_dynamic",
            QuantizationOption::Auto,
            "falcon_new",
        ),
        (
            "models/llama_aligned16",
            QuantizationOption::Fp8,
            "llama_aligned16",
        ),
        (
            "fp8/llama16_ct_channel_dynamic",
            QuantizationOption::Auto,
            "llama_aligned16",
        ),
        (
            "fp8/llama16_modelopt_kv",
            QuantizationOption::Auto,
            "llama_aligned16",
        ),
        (
            "fp8/llama16_fbgemm",
            QuantizationOption::Auto,
            "llama_aligned16",
        ),
    ];
    let (mut matched_all, mut total_all) = (0, 0);
    let mut failures = vec![];
    for (dir, quant, golden_name) in models {
        let model = fixtures().join(dir);
        if !model.is_dir()
            || !fixtures()
                .join(format!("golden/{golden_name}.json"))
                .is_file()
        {
            println!("SKIPPED {dir}: fixture or prompts missing");
            continue;
        }
        let cpu = TestEngine::start(&model, None, |o| {
            o.device = Device::Cpu;
            o.quantization = quant;
        });
        let gpu = TestEngine::start(&model, None, |o| {
            o.device = Device::Cuda { ordinal: 0 };
            o.dtype = Some(DType::BF16);
            o.quantization = quant;
        });
        let g = golden(golden_name);
        let (mut matched, mut total, mut worst) = (0, 0, 0.0f32);
        for (i, case) in g["cases"].as_array().unwrap().iter().enumerate() {
            let prompt = ids(&case["prompt_ids"]);
            let n = ids(&case["greedy_ids"]).len();
            let want = collect(&cpu.handle(), greedy(prompt.clone(), n, Some(5)));
            let got = collect(&gpu.handle(), greedy(prompt, n, Some(5)));
            assert_eq!(got.num_final_events, 1);
            let (m, d) = follow(&format!("{dir} case {i}"), &got, &want);
            matched += m;
            total += n;
            worst = worst.max(d);
        }
        println!(
            "FP8 {dir} [bf16 vs CPU dequantized]: {matched}/{total} tokens before divergence, max |logprob diff| {worst:.3e}"
        );
        if worst > FP8_LOGPROB_TOL {
            failures.push(format!("{dir}: logprob diff {worst} > {FP8_LOGPROB_TOL}"));
        }
        matched_all += matched;
        total_all += total;
    }
    println!("FP8 MODELS: {matched_all}/{total_all} tokens before divergence");
    if matched_all * 100 < total_all * FP8_MIN_MATCHED_PCT {
        failures.push(format!(
            "only {matched_all}/{total_all} tokens before divergence (need {FP8_MIN_MATCHED_PCT}%)"
        ));
    }
    assert!(total_all > 0, "no model ran");
    assert!(failures.is_empty(), "{failures:#?}");
}
