//! The `ferrum` command-line contract: `generate --json` output shape, `--prompt-ids` without a
//! tokenizer, `tokenize`, `inspect`, `bench --json`, and clear errors (e.g. `--device cuda`).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::*;
use serde_json::Value;

fn ferrum(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrum"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn tiny() -> String {
    fixtures()
        .join("models/llama_gqa_llama3")
        .display()
        .to_string()
}

#[test]
fn generate_json_with_prompt_ids_and_logprobs() {
    let (ok, out, err) = ferrum(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt-ids",
        "5,6,7",
        "--max-tokens",
        "4",
        "--logprobs",
        "3",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["prompt_ids"], serde_json::json!([5, 6, 7]));
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 4);
    assert_eq!(v["finish_reason"], "length");
    assert!(v.get("text").is_none(), "no tokenizer, no text");
    let lp = v["logprobs"].as_array().unwrap();
    assert_eq!(lp.len(), 4);
    assert_eq!(lp[0].as_array().unwrap().len(), 3);
    // Greedy: the first top-1 token is the generated token.
    assert_eq!(lp[0][0][0], v["output_ids"][0]);
}

/// Reads a `[rows, cols]` f32 .npy file as written by `--dump-intermediates`.
fn read_npy(path: &std::path::Path) -> (usize, usize, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    let shape = header.split("'shape': (").nth(1).unwrap();
    let dims: Vec<usize> = shape
        .split(')')
        .next()
        .unwrap()
        .split(',')
        .filter_map(|d| d.trim().parse().ok())
        .collect();
    let data: Vec<f32> = bytes[10 + hlen..]
        .chunks(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(data.len(), dims[0] * dims[1]);
    (dims[0], dims[1], data)
}

#[test]
fn generate_dumps_named_intermediates_per_layer_and_step() {
    let dir = std::env::temp_dir().join(format!("ferrum-dump-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, out, err) = ferrum(&[
        "generate",
        "--model",
        &tiny(),
        "--device",
        "cpu",
        "--prompt-ids",
        "5,6,7",
        "--max-tokens",
        "2",
        "--json",
        "--dump-intermediates",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let spec_cfg: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("models/llama_gqa_llama3/config.json")).unwrap(),
    )
    .unwrap();
    let hidden = spec_cfg["hidden_size"].as_u64().unwrap() as usize;
    let layers = spec_cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    // Step 0 is the 3-token prefill, step 1 the first decode token.
    for (step, rows) in [(0, 3), (1, 1)] {
        let d = dir.join(format!("step{step:03}"));
        for l in 0..layers {
            for name in [
                "attn_norm",
                "qkv",
                "attention",
                "attn_out",
                "mlp_norm",
                "mlp",
            ] {
                let (r, _, _) = read_npy(&d.join(format!("layer{l:02}.{name}.npy")));
                assert_eq!(r, rows, "step {step} layer {l} {name}");
            }
        }
        let (r, c, _) = read_npy(&d.join("embedding.npy"));
        assert_eq!((r, c), (rows, hidden));
        // The dumped logits are the ones the greedy token came from.
        let (r, vocab, logits) = read_npy(&d.join("lm_head.npy"));
        assert_eq!(r, 1);
        let argmax = (0..vocab)
            .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
            .unwrap();
        assert_eq!(
            serde_json::json!(argmax),
            v["output_ids"][step],
            "step {step}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn generate_text_with_the_real_model_and_tokenize() {
    let model = smollm2_gguf().display().to_string();
    let (ok, out, err) = ferrum(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    let (ok, out, _) = ferrum(&[
        "tokenize",
        "--model",
        &model,
        "--text",
        "The capital of France is",
    ]);
    assert!(ok);
    let ids: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(ids, v["prompt_ids"]);
    // Streaming mode prints the text itself.
    let (ok, out, _) = ferrum(&[
        "generate",
        "--model",
        &model,
        "--prompt",
        "The capital of France is",
        "--max-tokens",
        "6",
    ]);
    assert!(ok && out.contains("Paris"), "{out}");
}

#[test]
fn inspect_names_architecture_and_parameters() {
    let (ok, out, err) = ferrum(&[
        "inspect",
        "--model",
        &smollm2_gguf().display().to_string(),
        "--json",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["architecture"], "llama");
    assert_eq!(v["spec"]["num_layers"], 30);
    assert_eq!(v["spec"]["num_kv_heads"], 3);
    assert_eq!(
        v["spec"]["pos"]["style"], "gpt_j",
        "GGUF llama Q/K are permuted for interleaved rope"
    );
    // 134.5 M parameters (tied embeddings counted once).
    let n = v["num_params"].as_u64().unwrap();
    assert!((134_000_000..135_000_000).contains(&n), "{n}");
    assert!(v["tokenizer"]["chat_template"].as_bool().unwrap());
}

/// `inspect` names each architecture of the tiny fixtures and the spec features that make it
/// that architecture; its parameter count equals the checkpoint's tensor elements.
#[test]
fn inspect_names_every_architecture() {
    use triton_ferrum::loader::TensorSource;
    use triton_ferrum::loader::safetensors::SafetensorsSource;
    let cases: &[(&str, &str, &str, Value)] = &[
        ("gpt2", "gpt2", "/pos/type", "learned".into()),
        ("gptj", "gptj", "/pos/rotary_dim", 8.into()),
        ("falcon_mq", "falcon", "/num_kv_heads", 1.into()),
        (
            "falcon_new",
            "falcon",
            "/residual/shared_norm",
            false.into(),
        ),
        (
            "falcon_rw_alibi",
            "falcon",
            "/qkv/layout",
            "per_head".into(),
        ),
        ("mpt", "mpt", "/clip_qkv", 1.75.into()),
        ("bloom", "bloom", "/embedding_norm", true.into()),
    ];
    for (fixture, arch, pointer, want) in cases {
        let dir = fixtures().join("models").join(fixture);
        let (ok, out, err) = ferrum(&["inspect", "--model", &dir.display().to_string(), "--json"]);
        assert!(ok, "{fixture}: {err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["architecture"], *arch, "{fixture}");
        assert_eq!(
            v["spec"].pointer(pointer),
            Some(want),
            "{fixture} {pointer}"
        );
        let src = SafetensorsSource::open_dir(&dir).unwrap();
        let numel: usize = src
            .names()
            .iter()
            .map(|n| src.info(n).unwrap().shape.iter().product::<usize>())
            .sum();
        assert_eq!(v["num_params"], numel as u64, "{fixture}");
    }
}

/// `inspect` says how an FP8 checkpoint's linears are stored, and with `--device` and
/// `--quantization fp8` its load log says the weights were quantized at load.
#[test]
fn inspect_reports_fp8_storage_and_quantization_at_load() {
    let dir = fixtures().join("fp8/llama_ct_channel_dynamic");
    let (ok, out, err) = ferrum(&["inspect", "--model", &dir.display().to_string(), "--json"]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let q = v["quantization"].as_str().unwrap();
    assert!(q.contains("compressed-tensors"), "{q}");
    assert_eq!(
        v["kv_cache_bytes_per_token_f32"].as_u64().unwrap(),
        4 * v["kv_cache_bytes_per_token_fp8"].as_u64().unwrap()
    );
    let plain = fixtures().join("models/llama_gqa_llama3");
    let (ok, out, err) = ferrum(&[
        "inspect",
        "--model",
        &plain.display().to_string(),
        "--json",
        "--device",
        "cpu",
        "--quantization",
        "fp8",
    ]);
    assert!(ok, "{err}");
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["quantization"], "none");
    let log = v["loaded"]["log"].to_string();
    assert!(log.contains("quantized at load"), "{log}");
}

#[test]
fn bench_json_on_a_random_preset() {
    let (ok, out, err) = ferrum(&[
        "bench",
        "--preset",
        "tiny-llama",
        "--prompt-len",
        "8",
        "--gen-len",
        "4",
        "--batch-size",
        "1,2",
        "--json",
    ]);
    assert!(ok, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for (l, b) in lines.iter().zip([1, 2]) {
        assert_eq!(l["batch_size"], b);
        assert!(l["decode_tokens_per_s"].as_f64().unwrap() > 0.0);
        assert!(
            l["ms_per_token"].is_null(),
            "field is named decode_ms_per_token"
        );
        assert!(l["decode_ms_per_token"].as_f64().unwrap() > 0.0);
        // Prompt FLOPs over the prefill phase: positive and within what a CPU can do.
        let tflops = l["prefill_tflops"].as_f64().unwrap();
        assert!(tflops > 0.0 && tflops < 100.0, "{tflops}");
        assert!(l["prefill_s"].as_f64().unwrap() > 0.0);
    }
}

#[test]
fn bench_with_a_shared_prefix_reuses_it_only_with_kv_cache_reuse() {
    let reused = |reuse: &str| -> Vec<u64> {
        let (ok, out, err) = ferrum(&[
            "bench",
            "--preset",
            "tiny-llama",
            "--prompt-len",
            "40",
            "--gen-len",
            "2",
            "--shared-prefix-len",
            "32",
            "--block-size",
            "8",
            "--batch-size",
            "1,3",
            "--enable-kv-cache-reuse",
            reuse,
            "--json",
        ]);
        assert!(ok, "{err}");
        out.lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                assert_eq!(v["shared_prefix_len"], 32);
                v["reused_prompt_tokens"].as_u64().unwrap()
            })
            .collect()
    };
    // The warm-up pass cached the 32 shared tokens (4 blocks): every measured request reuses them.
    assert_eq!(reused("true"), vec![32, 3 * 32]);
    assert_eq!(reused("false"), vec![0, 0]);
    let (ok, _, err) = ferrum(&[
        "bench",
        "--preset",
        "tiny-llama",
        "--prompt-len",
        "8",
        "--shared-prefix-len",
        "9",
    ]);
    assert!(
        !ok && err.contains("--shared-prefix-len 9") && err.contains("--prompt-len 8"),
        "{err}"
    );
}

#[test]
fn bench_with_one_output_token_reports_no_decode_rate() {
    // gen_len 1: the only token comes from the prefill; decode rates would divide by zero.
    for json in [true, false] {
        let mut args = vec![
            "bench",
            "--preset",
            "tiny-llama",
            "--prompt-len",
            "8",
            "--gen-len",
            "1",
        ];
        if json {
            args.push("--json");
        }
        let (ok, out, err) = ferrum(&args);
        assert!(ok, "{err}");
        if json {
            let l: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
            for field in [
                "decode_ms_per_token",
                "decode_tokens_per_s",
                "weight_gb_per_s",
            ] {
                assert!(l[field].is_null(), "{field}: {l}");
            }
            assert!(l["output_tokens_per_s"].as_f64().unwrap() > 0.0);
            assert!(l["prefill_tflops"].as_f64().unwrap() > 0.0);
        } else {
            let row = out.lines().last().unwrap();
            assert_eq!(row.matches('–').count(), 3, "{row}");
        }
    }
}

/// `ferrum bench --workload mixed` on tiny-llama: 12 requests, B = 4, prompts 3..=40, outputs
/// 2..=24, seed 3, JSON, plus `extra` flags.
fn mixed_bench(extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "bench",
        "--preset",
        "tiny-llama",
        "--device",
        "cpu",
        "--workload",
        "mixed",
        "--num-requests",
        "12",
        "--batch-size",
        "4",
        "--min-prompt-len",
        "3",
        "--max-prompt-len",
        "40",
        "--min-gen-len",
        "2",
        "--max-gen-len",
        "24",
        "--seed",
        "3",
        "--json",
    ];
    args.extend_from_slice(extra);
    ferrum(&args)
}

/// `bench --workload mixed --inflight-max-num-seqs M`: the same KV memory as static batching,
/// more sequences in flight at once (measured from the token timestamps); M < B is refused.
#[test]
fn bench_mixed_inflight_may_run_more_sequences_in_the_same_kv_memory() {
    let (ok, out, err) = mixed_bench(&["--inflight-max-num-seqs", "12"]);
    assert!(ok, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let mode = |m: &str| lines.iter().find(|l| l["mode"] == m).unwrap();
    // Same KV memory as with M = B: 4 sequences of 64 tokens; static keeps at most 4 in flight.
    for m in ["static", "inflight", "summary"] {
        assert_eq!(mode(m)["kv_cache_tokens"], 256, "{m}");
        assert_eq!(mode(m)["inflight_max_num_seqs"], 12, "{m}");
    }
    let most = |m: &str| mode(m)["max_concurrent"].as_u64().unwrap();
    assert!(most("static") <= 4, "{out}");
    // Prompts of at most 3 blocks in a 16-block cache: at least 5 start together.
    assert!((5..=12).contains(&most("inflight")), "{out}");
    // guaranteed_no_evict: the in-flight mode admits only what can run to its end in that
    // memory, so nothing is preempted (max_utilization may preempt and recompute).
    let (ok, out, err) = mixed_bench(&[
        "--inflight-max-num-seqs",
        "12",
        "--batch-scheduler-policy",
        "guaranteed_no_evict",
    ]);
    assert!(ok, "{err}");
    for l in out
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
    {
        assert_eq!(l["batch_scheduler_policy"], "guaranteed_no_evict", "{l}");
        if l["mode"] != "summary" {
            assert_eq!(l["num_preemptions"], 0, "{l}");
            assert!(l["max_concurrent"].as_u64().unwrap() >= 1, "{l}");
        }
    }
    // M below B is refused, naming both flags and the values.
    let (ok, _, err) = mixed_bench(&["--inflight-max-num-seqs", "3"]);
    assert!(!ok);
    assert!(
        err.contains("--inflight-max-num-seqs")
            && err.contains("--batch-size 4")
            && err.contains("3"),
        "{err}"
    );
}

/// `bench --workload mixed`: both modes generate exactly the workload's tokens, static batching
/// really runs in disjoint groups of B, the summary ratio is the ratio of the per-mode rates
/// (summed over rounds), and both modes report the same KV capacity.
#[test]
fn bench_mixed_workload_compares_inflight_and_static() {
    let (ok, out, err) = mixed_bench(&["--rounds", "2"]);
    assert!(ok, "{err}");
    let lines: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "2 rounds x 2 modes + summary: {out}");
    let summary = &lines[4];
    assert_eq!(summary["mode"], "summary");
    let gen_lens: Vec<u64> = summary["gen_lens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    let prompt_lens = summary["prompt_lens"].as_array().unwrap();
    assert_eq!((gen_lens.len(), prompt_lens.len()), (12, 12));
    assert!(
        gen_lens.iter().all(|g| (2..=24).contains(g)),
        "{gen_lens:?}"
    );
    assert!(
        gen_lens.iter().any(|&g| g != gen_lens[0]),
        "mixed lengths: {gen_lens:?}"
    );
    let num_tokens: u64 = gen_lens.iter().sum();
    // Room for 4 sequences of 40 + 24 = 64 tokens (4 blocks of 16 each).
    assert_eq!(summary["kv_cache_tokens"], 256);
    let mut rate = std::collections::HashMap::new();
    for (idx, l) in lines[..4].iter().enumerate() {
        let mode = l["mode"].as_str().unwrap();
        assert_eq!(l["round"], idx as u64 / 2, "{l}");
        assert_eq!(l["num_output_tokens"], num_tokens, "{mode}: {l}");
        assert_eq!(l["kv_cache_tokens"], 256, "{mode}: same KV capacity");
        assert_eq!(
            l["num_preemptions"], 0,
            "{mode}: the KV cache fits the batch"
        );
        let want_groups = match mode {
            "static" => 3, // ceil(12 / 4)
            "inflight" => 1,
            _ => panic!("unknown mode {mode}"),
        };
        assert_eq!(l["num_groups"], want_groups, "{mode}");
        assert_eq!(l["groups_disjoint"], true, "{mode}");
        let most = l["max_concurrent"].as_u64().unwrap();
        assert!(
            (1..=4).contains(&most),
            "{mode}: at most B = 4 in flight: {l}"
        );
        let total_s = l["total_s"].as_f64().unwrap();
        let tps = l["output_tokens_per_s"].as_f64().unwrap();
        assert!(
            (tps * total_s / num_tokens as f64 - 1.0).abs() < 1e-9,
            "{l}"
        );
        let ttft = l["ttft_ms_p50"].as_f64().unwrap();
        assert!(
            ttft > 0.0 && ttft <= l["latency_ms_p99"].as_f64().unwrap(),
            "{l}"
        );
        let e = rate.entry(mode.to_owned()).or_insert((0.0, 0.0));
        e.0 += num_tokens as f64;
        e.1 += total_s;
    }
    // Rounds alternate which mode goes first.
    assert_eq!(
        (lines[0]["mode"].as_str(), lines[2]["mode"].as_str()),
        (Some("static"), Some("inflight"))
    );
    let tps = |m: &str| rate[m].0 / rate[m].1;
    let close = |a: f64, b: f64| (a / b - 1.0).abs() < 1e-9;
    assert!(close(
        summary["static_output_tokens_per_s"].as_f64().unwrap(),
        tps("static")
    ));
    assert!(close(
        summary["inflight_output_tokens_per_s"].as_f64().unwrap(),
        tps("inflight")
    ));
    let ratio = summary["inflight_over_static"].as_f64().unwrap();
    assert!(close(ratio, tps("inflight") / tps("static")), "{summary}");
    // Lengths the model cannot hold are refused before anything runs.
    let (ok, _, err) = ferrum(&[
        "bench",
        "--preset",
        "tiny-llama",
        "--device",
        "cpu",
        "--workload",
        "mixed",
        "--num-requests",
        "2",
    ]);
    assert!(!ok && err.contains("max_model_len"), "{err}");
}

/// Random-weight benches run for every architecture (the GPT-3 presets share the GPT-2 path).
#[test]
fn bench_runs_every_architecture_preset() {
    for preset in [
        "tiny-gpt2",
        "tiny-gptj",
        "tiny-falcon",
        "tiny-falcon-new",
        "tiny-mpt",
        "tiny-bloom",
    ] {
        let (ok, out, err) = ferrum(&[
            "bench",
            "--preset",
            preset,
            "--prompt-len",
            "6",
            "--gen-len",
            "3",
            "--batch-size",
            "2",
            "--json",
        ]);
        assert!(ok, "{preset}: {err}");
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        assert!(v["decode_tokens_per_s"].as_f64().unwrap() > 0.0, "{preset}");
    }
}

#[test]
fn errors_are_clear_and_exit_nonzero() {
    let (ok, _, err) = ferrum(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt-ids",
        "1",
        "--device",
        "cuda",
    ]);
    assert!(!ok && err.contains("cuda"), "{err}");
    let (ok, _, err) = ferrum(&["generate", "--model", &tiny(), "--prompt", "hi"]);
    assert!(!ok && err.contains("tokenizer"), "{err}");
    let (ok, _, err) = ferrum(&["generate", "--model", &tiny(), "--prompt-ids", "1,x"]);
    assert!(!ok && err.contains("'x'"), "{err}");
    let (ok, _, err) = ferrum(&[
        "generate",
        "--model",
        &tiny(),
        "--prompt-ids",
        "1",
        "--top-p",
        "2",
    ]);
    assert!(!ok && err.contains("top_p"), "{err}");
}

#[test]
fn quantization_fp8_quantizes_at_load_and_a_bad_value_is_named() {
    let args = |q: &'static str| {
        vec![
            "generate",
            "--model",
            "",
            "--device",
            "cpu",
            "--prompt-ids",
            "1,2,3",
            "--max-tokens",
            "3",
            "--json",
            "--quantization",
            q,
        ]
    };
    let model = tiny();
    let run = |q| {
        let mut a = args(q);
        a[2] = &model;
        ferrum(&a)
    };
    let (ok, out, err) = run("fp8");
    assert!(ok, "{err}");
    assert!(err.contains("quantized at load"), "{err}");
    let v: serde_json::Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 3, "{out}");
    let (ok, _, err) = run("int4");
    assert!(!ok && err.contains("int4") && err.contains("fp8"), "{err}");
}

/// `--tensor-parallel-size 2` on the CPU runs two ranks and generates what one rank does; a
/// rank count the model's heads do not allow fails with the reason, naming the values.
#[test]
fn generate_with_tensor_parallel_ranks() {
    let run = |tp: &str| {
        ferrum(&[
            "generate",
            "--model",
            &tiny(),
            "--device",
            "cpu",
            "--tensor-parallel-size",
            tp,
            "--prompt-ids",
            "5,6,7,40",
            "--max-tokens",
            "6",
            "--logprobs",
            "1",
            "--json",
        ])
    };
    let (ok, one, err) = run("1");
    assert!(ok, "{err}");
    let (ok, two, err) = run("2");
    assert!(ok, "{err}");
    assert!(
        err.contains("tensor_parallel_size 2: 2 CPU ranks in threads"),
        "{err}"
    );
    let (one, two): (Value, Value) = (
        serde_json::from_str(one.trim()).unwrap(),
        serde_json::from_str(two.trim()).unwrap(),
    );
    assert_eq!(one["output_ids"], two["output_ids"]);
    assert_eq!(two["output_ids"].as_array().unwrap().len(), 6);
    for (a, b) in one["logprobs"]
        .as_array()
        .unwrap()
        .iter()
        .zip(two["logprobs"].as_array().unwrap())
    {
        let (a, b) = (a[0][1].as_f64().unwrap(), b[0][1].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-4, "{a} vs {b}");
    }
    let (ok, _, err) = run("4");
    assert!(!ok);
    assert!(
        err.contains(
            "tensor_parallel_size = 4 must divide the model's num_heads (query heads) (6)"
        ),
        "{err}"
    );
}
