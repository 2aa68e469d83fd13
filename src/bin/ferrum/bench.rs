//! `ferrum bench`: offline speed of the engine on real or random weights. N requests of fixed
//! prompt/output length are submitted at once (batch size N, `ignore_eos`), after a short
//! warm-up batch of the same shapes. Reports time to first token, decode ms/token per sequence,
//! output tokens/s overall and the achieved weight bandwidth of decode steps (weight bytes ×
//! decode steps/s), as text and JSON.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;
use triton_ferrum::engine::{EngineHandle, is_final, options};
use triton_ferrum::model::Checkpoint;
use triton_ferrum::request::{GenerateRequest, Prompt, SamplingParams, StopCriteria, TokenEvent};

use super::{CliResult, EngineArgs};

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// Random weights at the shapes of a named model instead of --model (see `model::presets`).
    #[arg(long, conflicts_with = "model")]
    preset: Option<String>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 128)]
    gen_len: usize,
    /// Requests submitted at once; comma-separated for several runs, e.g. 1,4,16.
    #[arg(long, default_value = "1", value_delimiter = ',')]
    batch_size: Vec<usize>,
    /// Print one JSON object per batch size instead of the table.
    #[arg(long)]
    json: bool,
}

struct RunResult {
    batch_size: usize,
    ttft_ms: f64,
    decode_ms_per_token: f64,
    decode_tokens_per_s: f64,
    output_tokens_per_s: f64,
    total_s: f64,
}

pub fn run(a: BenchArgs) -> CliResult {
    let ckpt = match (&a.preset, &a.engine.model) {
        (Some(p), _) => Checkpoint::random(p, 0)?,
        (None, Some(m)) => Checkpoint::open(m, a.engine.tokenizer.as_deref())?,
        (None, None) => return Err("one of --model or --preset is required".into()),
    };
    let source = match (&a.preset, &a.engine.model) {
        (Some(p), _) => format!("preset {p} (random weights)"),
        (None, Some(m)) => m.display().to_string(),
        (None, None) => String::new(),
    };
    let max_batch = a.batch_size.iter().copied().max().unwrap_or(1);
    let mut engine_args = a.engine.clone();
    engine_args.max_num_seqs = engine_args.max_num_seqs.max(max_batch);
    let mut opts = engine_args.options(
        a.engine
            .model
            .clone()
            .unwrap_or_else(|| PathBuf::from("<random>")),
    );
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
    for &b in &a.batch_size {
        // Warm-up at the measured shapes (first touch of weights and thread pools; on the GPU,
        // kernel compiles and GEMM algorithm choices per shape), a few tokens per request.
        run_batch(&handle, b, a.prompt_len, a.gen_len.min(4), vocab, 1)?;
        results.push(run_batch(&handle, b, a.prompt_len, a.gen_len, vocab, 7)?);
    }
    let format = match loaded.device.starts_with("cuda") {
        true => options::dtype_name(loaded.dtype).to_owned(),
        false => format!("{:?}", loaded.weight_format).to_lowercase(),
    };
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
        println!(
            "{:>6} {:>10} {:>14} {:>14} {:>14} {:>12}",
            "batch", "TTFT ms", "decode ms/tok", "decode tok/s", "output tok/s", "weight GB/s"
        );
    }
    for r in &results {
        // Each decode step reads every weight once: bandwidth = weight bytes × steps/s.
        let steps_per_s = 1000.0 / r.decode_ms_per_token;
        let gbs = weight_bytes * steps_per_s / 1e9;
        if a.json {
            println!(
                "{}",
                json!({
                    "source": source, "arch": loaded.spec.arch, "device": loaded.device, "weight_format": format,
                    "weight_bytes": loaded.weight_bytes, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
                    "batch_size": r.batch_size, "ttft_ms": r.ttft_ms, "decode_ms_per_token": r.decode_ms_per_token,
                    "decode_tokens_per_s": r.decode_tokens_per_s, "output_tokens_per_s": r.output_tokens_per_s,
                    "total_s": r.total_s, "weight_gb_per_s": gbs,
                })
            );
        } else {
            println!(
                "{:>6} {:>10.1} {:>14.2} {:>14.1} {:>14.1} {:>12.2}",
                r.batch_size,
                r.ttft_ms,
                r.decode_ms_per_token,
                r.decode_tokens_per_s,
                r.output_tokens_per_s,
                gbs
            );
        }
    }
    Ok(())
}

fn run_batch(
    handle: &EngineHandle,
    batch_size: usize,
    prompt_len: usize,
    gen_len: usize,
    vocab: usize,
    seed: u64,
) -> Result<RunResult, Box<dyn std::error::Error>> {
    let t0 = Instant::now();
    let mut streams = vec![];
    for r in 0..batch_size {
        // Deterministic pseudo-random prompt ids, different per request.
        let ids: Vec<u32> = (0..prompt_len)
            .map(|i| {
                let x =
                    (seed + r as u64 * 1_000_003 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
                ((x >> 33) % vocab as u64) as u32
            })
            .collect();
        let req = GenerateRequest {
            prompt: Prompt::TokenIds(ids),
            sampling: SamplingParams::default(),
            stop: StopCriteria {
                max_tokens: gen_len,
                ignore_eos: true,
                ..StopCriteria::default()
            },
            detokenize: false,
        };
        streams.push(handle.submit(req)?);
    }
    // Timestamps of every token of every request, read on one thread per request.
    let times: Vec<Vec<Instant>> = std::thread::scope(|s| {
        let joins: Vec<_> = streams
            .into_iter()
            .map(|mut st| {
                s.spawn(move || {
                    let mut ts = vec![];
                    while let Some(ev) = st.recv() {
                        let last = is_final(&ev);
                        if let TokenEvent::Token { .. } = ev {
                            ts.push(Instant::now());
                        }
                        if last {
                            break;
                        }
                    }
                    ts
                })
            })
            .collect();
        joins
            .into_iter()
            .map(|j| j.join().unwrap_or_default())
            .collect()
    });
    let total_s = t0.elapsed().as_secs_f64();
    if times.iter().any(|t| t.len() != gen_len) {
        return Err(format!(
            "a request produced {:?} tokens, expected {gen_len}",
            times.iter().map(Vec::len).collect::<Vec<_>>()
        )
        .into());
    }
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
    let decode_s = (last - first).as_secs_f64().max(1e-9);
    let decode_steps = gen_len.saturating_sub(1).max(1) as f64;
    let per_seq_ms: f64 = times
        .iter()
        .map(|t| (t[t.len() - 1] - t[0]).as_secs_f64() * 1e3 / decode_steps)
        .sum::<f64>()
        / batch_size as f64;
    Ok(RunResult {
        batch_size,
        ttft_ms,
        decode_ms_per_token: per_seq_ms,
        decode_tokens_per_s: batch_size as f64 * decode_steps / decode_s,
        output_tokens_per_s: (batch_size * gen_len) as f64 / total_s,
        total_s,
    })
}
