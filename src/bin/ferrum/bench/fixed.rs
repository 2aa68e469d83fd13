//! `ferrum bench --workload fixed` (the default): N requests of fixed prompt/output length are
//! submitted at once (batch size N, `ignore_eos`), after a short warm-up batch of the same
//! shapes. Reports time to first token, decode ms/token per sequence, output tokens/s overall
//! and the achieved weight bandwidth of decode steps (weight bytes × decode steps/s).

use std::time::Instant;

use serde_json::json;
use triton_ferrum::engine::{EngineHandle, options};

use super::BenchArgs;
use super::common::{
    BenchModel, BenchRequest, engine_options, pseudo_random_ids, submit_and_time, weights_label,
};
use crate::CliResult;

struct DecodeRate {
    /// Mean over requests of (last token - first token) / (gen_len - 1).
    ms_per_token: f64,
    /// Decode tokens of the batch over (last token of any request - last first token).
    tokens_per_s: f64,
}

struct RunResult {
    batch_size: usize,
    ttft_ms: f64,
    /// From the submission to the last request's first token: every prompt has been computed
    /// (decode steps of requests that started earlier may have run in between).
    prefill_s: f64,
    /// None when gen_len <= 1: no decode step ran.
    decode: Option<DecodeRate>,
    output_tokens_per_s: f64,
    total_s: f64,
    /// Prompt tokens the engine took from its prefix cache during the run.
    reused_prompt_tokens: u64,
}

pub fn run(a: &BenchArgs, model: BenchModel) -> CliResult {
    if a.shared_prefix_len > a.prompt_len {
        return Err(format!(
            "--shared-prefix-len {} must be <= --prompt-len {}",
            a.shared_prefix_len, a.prompt_len
        )
        .into());
    }
    let BenchModel { ckpt, source } = model;
    let batch_sizes = a.batch_size.clone().unwrap_or_else(|| vec![1]);
    let max_batch = batch_sizes.iter().copied().max().unwrap_or(1);
    let mut engine_args = a.engine.clone();
    engine_args.max_num_seqs = engine_args.max_num_seqs.max(max_batch);
    let mut opts = engine_options(&engine_args);
    let need = a.prompt_len + a.gen_len;
    opts.max_model_len = Some(opts.max_model_len.unwrap_or(need).max(need));
    opts.kv.max_tokens = Some(
        opts.kv
            .max_tokens
            .unwrap_or(max_batch * (need + opts.kv.block_size)),
    );
    let t_load = Instant::now();
    let loaded = options::start_checkpoint(ckpt, &opts)?;
    let load_s = t_load.elapsed().as_secs_f64();
    let handle = loaded.engine.handle();
    let vocab = loaded.spec.vocab_size;
    let weight_bytes = loaded.weight_bytes as f64;

    let mut results = vec![];
    for &b in &batch_sizes {
        // Warm-up at the measured shapes (first touch of weights and thread pools; on the GPU,
        // kernel compiles and GEMM algorithm choices per shape), a few tokens per request.
        let shape = |gen_len| Shape {
            prompt_len: a.prompt_len,
            shared_prefix_len: a.shared_prefix_len,
            gen_len,
        };
        run_batch(&handle, b, shape(a.gen_len.min(4)), vocab, 1)?;
        results.push(run_batch(&handle, b, shape(a.gen_len), vocab, 7)?);
    }
    let format = weights_label(&loaded);
    // Prompt FLOPs per second over the prefill phase (at batch 1: the TTFT).
    let prompt_flops = loaded.spec.prefill_flops(a.prompt_len);
    let prefill_tflops = |r: &RunResult| r.batch_size as f64 * prompt_flops / r.prefill_s / 1e12;
    if !a.json {
        println!(
            "ferrum bench: {source}, {} ({:.1} M params, weights {format} {:.1} MiB), {}, prompt {} + gen {} tokens, load {:.2} s",
            loaded.spec.arch,
            loaded.spec.num_params() as f64 / 1e6,
            weight_bytes / 1048576.0,
            loaded.device,
            a.prompt_len,
            a.gen_len,
            load_s
        );
        if a.shared_prefix_len > 0 {
            println!(
                "shared prompt prefix {} tokens, kv cache reuse {}; prefill TFLOP/s counts every \
                 prompt token, computed or reused",
                a.shared_prefix_len,
                if opts.batching.enable_prefix_caching {
                    "on"
                } else {
                    "off"
                }
            );
        }
        println!(
            "{:>6} {:>10} {:>14} {:>14} {:>14} {:>14} {:>12}",
            "batch",
            "TTFT ms",
            "prefill TFLOP/s",
            "decode ms/tok",
            "decode tok/s",
            "output tok/s",
            "weight GB/s"
        );
    }
    for r in &results {
        // Each decode step reads every weight once: bandwidth = weight bytes × steps/s.
        let decode_ms = r.decode.as_ref().map(|d| d.ms_per_token);
        let decode_tps = r.decode.as_ref().map(|d| d.tokens_per_s);
        let gbs = decode_ms.map(|ms| weight_bytes * 1000.0 / ms / 1e9);
        if a.json {
            println!(
                "{}",
                json!({
                    "source": source, "arch": loaded.spec.arch, "device": loaded.device, "weight_format": format,
                    "weight_bytes": loaded.weight_bytes, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
                    "shared_prefix_len": a.shared_prefix_len, "kv_cache_reuse": opts.batching.enable_prefix_caching,
                    "reused_prompt_tokens": r.reused_prompt_tokens, "batch_size": r.batch_size, "ttft_ms": r.ttft_ms, "prefill_s": r.prefill_s,
                    "prefill_tflops": prefill_tflops(r), "decode_ms_per_token": decode_ms,
                    "decode_tokens_per_s": decode_tps, "output_tokens_per_s": r.output_tokens_per_s,
                    "total_s": r.total_s, "weight_gb_per_s": gbs,
                })
            );
        } else {
            let or_dash = |v: Option<f64>, width: usize, prec: usize| match v {
                Some(v) => format!("{v:>width$.prec$}"),
                None => format!("{:>width$}", "–"),
            };
            println!(
                "{:>6} {:>10.1} {:>14.1} {} {} {:>14.1} {}",
                r.batch_size,
                r.ttft_ms,
                prefill_tflops(r),
                or_dash(decode_ms, 14, 2),
                or_dash(decode_tps, 14, 1),
                r.output_tokens_per_s,
                or_dash(gbs, 12, 2)
            );
        }
    }
    Ok(())
}

/// Prompt and output lengths of a fixed-workload run.
#[derive(Debug, Clone, Copy)]
struct Shape {
    prompt_len: usize,
    shared_prefix_len: usize,
    gen_len: usize,
}

/// Seed of the shared prompt prefix: the same in every run (warm-up included).
const SHARED_PREFIX_SEED: u64 = 0x5eed_0f5b_a3ed;

fn run_batch(
    handle: &EngineHandle,
    batch_size: usize,
    shape: Shape,
    vocab: usize,
    seed: u64,
) -> Result<RunResult, Box<dyn std::error::Error>> {
    let Shape {
        prompt_len,
        shared_prefix_len,
        gen_len,
    } = shape;
    let shared = pseudo_random_ids(SHARED_PREFIX_SEED, 0, shared_prefix_len, vocab);
    let requests: Vec<BenchRequest> = (0..batch_size)
        .map(|r| {
            let mut prompt_ids = shared.clone();
            prompt_ids.extend(&pseudo_random_ids(seed, r, prompt_len, vocab)[shared_prefix_len..]);
            BenchRequest {
                prompt_ids,
                max_tokens: gen_len,
            }
        })
        .collect();
    let reused_before = handle.stats().map_or(0, |s| s.num_reused_prompt_tokens);
    let t0 = Instant::now();
    let times = submit_and_time(handle, &requests)?;
    let total_s = t0.elapsed().as_secs_f64();
    let ttft_ms = times
        .iter()
        .map(|t| (t[0] - t0).as_secs_f64() * 1e3)
        .sum::<f64>()
        / batch_size as f64;
    // Decode: from the last first-token to the last token, (gen_len - 1) steps per sequence.
    let first = times.iter().map(|t| t[0]).max().unwrap_or(t0);
    let last = times
        .iter()
        .filter_map(|t| t.last().copied())
        .max()
        .unwrap_or(t0);
    let decode = (gen_len > 1).then(|| {
        let decode_steps = (gen_len - 1) as f64;
        let ms_per_token = times
            .iter()
            .map(|t| (t[t.len() - 1] - t[0]).as_secs_f64() * 1e3 / decode_steps)
            .sum::<f64>()
            / batch_size as f64;
        DecodeRate {
            ms_per_token,
            tokens_per_s: batch_size as f64 * decode_steps / (last - first).as_secs_f64().max(1e-9),
        }
    });
    Ok(RunResult {
        batch_size,
        ttft_ms,
        prefill_s: (first - t0).as_secs_f64().max(1e-9),
        decode,
        output_tokens_per_s: (batch_size * gen_len) as f64 / total_s,
        total_s,
        reused_prompt_tokens: handle
            .stats()
            .map_or(0, |s| s.num_reused_prompt_tokens)
            .saturating_sub(reused_before),
    })
}
