//! `ferrum bench`: offline speed of the engine on real or random weights. N requests of fixed
//! prompt/output length are submitted at once (batch size N, `ignore_eos`), after a short
//! warm-up batch of the same shapes. Reports time to first token, decode ms/token per sequence,
//! output tokens/s overall and the achieved weight bandwidth of decode steps (weight bytes ×
//! decode steps/s), as text and JSON. `--workload mixed` hands over to `bench_mixed` (in-flight
//! vs static batching).
//!
//! Owns the flags, the model loading both workloads share and `submit_and_time`, the one place
//! that submits bench requests and timestamps their tokens. It must never report a rate that
//! is not computed from those token arrival times.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use clap::{Args, ValueEnum};
use serde_json::json;
use triton_ferrum::engine::options::LoadedEngine;
use triton_ferrum::engine::{EngineHandle, is_final, options};
use triton_ferrum::model::Checkpoint;
use triton_ferrum::request::{GenerateRequest, Prompt, SamplingParams, StopCriteria, TokenEvent};

use super::bench_mixed::{self, MixedArgs};
use super::{CliResult, EngineArgs};

/// Which requests a bench submits, and how.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// N requests of --prompt-len/--gen-len at once, for each --batch-size N.
    Fixed,
    /// A seeded mixed-length workload run with in-flight and with static batching at equal KV
    /// cache capacity (see the "Mixed workload" flags).
    Mixed,
}

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Random weights at the shapes of a named model instead of --model (see `model::presets`).
    #[arg(long, conflicts_with = "model")]
    preset: Option<String>,
    /// Prompt tokens of every request (--workload fixed).
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Output tokens of every request (--workload fixed).
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// The first N prompt tokens are the same in every request and every run, like a system
    /// prompt (--workload fixed; at most --prompt-len). With --enable-kv-cache-reuse true the
    /// warm-up pass leaves them cached, so measured runs start from the cached prefix.
    #[arg(long, default_value_t = 0)]
    shared_prefix_len: usize,
    /// Requests submitted at once; comma-separated for several runs, e.g. 1,4,16 (default 1).
    /// With --workload mixed: one value B, the most sequences running at once in both modes
    /// (it sets max_num_seqs; default 64).
    #[arg(long, value_delimiter = ',')]
    batch_size: Option<Vec<usize>>,
    /// fixed: prompt/gen lengths of --prompt-len/--gen-len; mixed: in-flight vs static batching
    /// on a seeded mixed-length workload.
    #[arg(long, value_enum, default_value_t = Workload::Fixed)]
    workload: Workload,
    #[command(flatten)]
    mixed: MixedArgs,
    /// Print one JSON object per batch size (mixed: per mode and round, plus a summary)
    /// instead of the table.
    #[arg(long)]
    json: bool,
}

/// One bench request: prompt token ids and the exact number of tokens to generate
/// (`ignore_eos`, greedy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BenchRequest {
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
}

/// A checkpoint opened for a bench, and how to name it in the output.
pub struct BenchModel {
    pub ckpt: Checkpoint,
    pub source: String,
}

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

pub fn run(a: BenchArgs) -> CliResult {
    let (ckpt, source) = match (&a.preset, &a.engine.model) {
        (Some(p), _) => (
            Checkpoint::random(p, 0)?,
            format!("preset {p} (random weights)"),
        ),
        (None, Some(m)) => (
            Checkpoint::open(m, a.engine.tokenizer.as_deref())?,
            m.display().to_string(),
        ),
        (None, None) => return Err("one of --model or --preset is required".into()),
    };
    let model = BenchModel { ckpt, source };
    match a.workload {
        Workload::Fixed => run_fixed(&a, model),
        Workload::Mixed => {
            let batch_size = match a.batch_size.as_deref() {
                None => bench_mixed::DEFAULT_BATCH_SIZE,
                Some(&[b]) => b,
                Some(bs) => {
                    return Err(
                        format!("--workload mixed takes one --batch-size, got {bs:?}").into(),
                    );
                }
            };
            bench_mixed::run(model, &a.engine, batch_size, &a.mixed, a.json)
        }
    }
}

/// Engine options of a bench: the user's engine flags on the bench's model path.
pub fn engine_options(engine: &EngineArgs) -> options::EngineOptions {
    engine.options(
        engine
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from("<random>")),
    )
}

/// How the loaded weights are stored: the dtype on the GPU, the host format on the CPU.
pub fn weights_label(loaded: &LoadedEngine) -> String {
    match loaded.device.starts_with("cuda") {
        true => options::dtype_name(loaded.dtype).to_owned(),
        false => format!("{:?}", loaded.weight_format).to_lowercase(),
    }
}

fn run_fixed(a: &BenchArgs, model: BenchModel) -> CliResult {
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
    opts.max_tokens_in_paged_kv_cache = Some(
        opts.max_tokens_in_paged_kv_cache
            .unwrap_or(max_batch * (need + opts.block_size)),
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
                if opts.enable_kv_cache_reuse {
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
                    "shared_prefix_len": a.shared_prefix_len, "kv_cache_reuse": opts.enable_kv_cache_reuse,
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

/// Deterministic pseudo-random prompt ids in `0..vocab`, different per `request_idx`.
pub fn pseudo_random_ids(seed: u64, request_idx: usize, len: usize, vocab: usize) -> Vec<u32> {
    (0..len)
        .map(|i| {
            let x = (seed + request_idx as u64 * 1_000_003 + i as u64)
                .wrapping_mul(0x9E37_79B9_7F4A_7C15);
            ((x >> 33) % vocab.max(1) as u64) as u32
        })
        .collect()
}

/// Submits every request at once (greedy, `ignore_eos`) and returns the arrival time of each of
/// its output tokens, in request order. All events come back on one shared channel read by this
/// thread. Fails, aborting what is still running, when a request is refused, errors, or ends
/// with other than `max_tokens` tokens.
pub fn submit_and_time(
    handle: &EngineHandle,
    requests: &[BenchRequest],
) -> Result<Vec<Vec<Instant>>, Box<dyn std::error::Error>> {
    let (tx, rx) = crossbeam_channel::unbounded();
    let mut idx_of = HashMap::with_capacity(requests.len());
    let abort_all = |idx_of: &HashMap<_, usize>| {
        for &seq_id in idx_of.keys() {
            handle.abort(seq_id);
        }
    };
    for (idx, r) in requests.iter().enumerate() {
        let req = GenerateRequest {
            prompt: Prompt::TokenIds(r.prompt_ids.clone()),
            sampling: SamplingParams::default(),
            stop: StopCriteria {
                max_tokens: r.max_tokens,
                ignore_eos: true,
                ..StopCriteria::default()
            },
            detokenize: false,
        };
        match handle.submit_to(req, tx.clone()) {
            Ok((seq_id, _)) => {
                idx_of.insert(seq_id, idx);
            }
            Err(e) => {
                abort_all(&idx_of);
                return Err(format!("bench request {idx}: {e}").into());
            }
        }
    }
    // Only the engine holds senders now: `recv` fails if it stops before every request ended.
    drop(tx);
    let mut times: Vec<Vec<Instant>> = requests
        .iter()
        .map(|r| Vec::with_capacity(r.max_tokens))
        .collect();
    let mut num_open = requests.len();
    while num_open > 0 {
        let (seq_id, ev) = rx
            .recv()
            .map_err(|_| "the engine stopped before every bench request finished")?;
        let Some(&idx) = idx_of.get(&seq_id) else {
            continue;
        };
        let last = is_final(&ev);
        match ev {
            TokenEvent::Token { .. } => times[idx].push(Instant::now()),
            TokenEvent::Error(e) | TokenEvent::Unavailable(e) => {
                abort_all(&idx_of);
                return Err(format!("bench request {idx}: {e}").into());
            }
            TokenEvent::Started { .. } | TokenEvent::Finished { .. } => {}
        }
        if last {
            num_open -= 1;
        }
    }
    for (idx, (t, r)) in times.iter().zip(requests).enumerate() {
        if t.len() != r.max_tokens {
            return Err(format!(
                "bench request {idx} produced {} tokens, expected {}",
                t.len(),
                r.max_tokens
            )
            .into());
        }
    }
    Ok(times)
}
