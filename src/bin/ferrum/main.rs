//! The `ferrum` command line: generate, tokenize, inspect, bench. Its flags and the `--json`
//! output of `generate` are a stable contract that scripts and tests rely on.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use triton_ferrum::config::DEFAULT_MAX_TOKENS;
use triton_ferrum::dtype::DType;
use triton_ferrum::engine::{Device, EngineOptions, is_final};
use triton_ferrum::executor::{CudaExecOptions, ParallelOptions};
use triton_ferrum::kv_cache::{KvCacheDtype, KvCacheOptions};
use triton_ferrum::model::Checkpoint;
use triton_ferrum::model::quant::{self as quant, Quantization, QuantizationOption};
use triton_ferrum::ops::linear::WeightFormat;
use triton_ferrum::request::{
    GenerateRequest, Prompt, RequestError, RequestSpec, SamplingParams, StopCriteria, TokenEvent,
};
use triton_ferrum::scheduler::{BatchingOptions, SchedulerPolicy};
use triton_ferrum::tokenizer::ChatMessage;

mod bench;

#[derive(Parser)]
#[command(name = "ferrum", version, about = "ferrum LLM inference engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a completion for one prompt.
    Generate(GenerateArgs),
    /// Print the token ids of a text as a JSON array.
    Tokenize(TokenizeArgs),
    /// Print the architecture, DecoderSpec, parameter count and memory needs of a model.
    Inspect(InspectArgs),
    /// Measure prefill/decode speed (tokens/s, ms/token) on real or random weights.
    Bench(bench::BenchArgs),
}

/// Options shared by every command that runs the engine.
#[derive(Args, Clone)]
pub struct EngineArgs {
    /// A .gguf file or a Hugging Face checkpoint folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// A folder with tokenizer.json (or vocab.json + merges.txt) to use instead of the model's tokenizer.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// auto | cpu | cuda | cuda:N
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: Device,
    /// Weight format in memory: f32 | q8 (default: q8 for GGUF, f32 for Hugging Face folders).
    #[arg(long, value_parser = parse_format)]
    weight_format: Option<WeightFormat>,
    /// GPU dtype of weights, activations and KV cache: auto | bfloat16 | float16 | float32
    /// (auto: bfloat16 on the GPU; the CPU engine computes in float32).
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    dtype: DtypeChoice,
    /// Weight quantization at load: auto (the checkpoint's own; FP8 checkpoints load as FP8) |
    /// fp8 (float and GGUF checkpoints quantized to FP8 E4M3 per output channel).
    #[arg(long, default_value = "auto")]
    quantization: QuantizationOption,
    /// KV cache element type: auto (the engine's dtype) | fp8 (E4M3 with per-layer K/V scales:
    /// the checkpoint's, else measured at load).
    #[arg(long, default_value = "auto")]
    kv_cache_dtype: KvCacheDtype,
    /// GPU: fraction of free memory for the KV cache (default 0.9).
    #[arg(long)]
    kv_cache_free_gpu_mem_fraction: Option<f32>,
    /// Longest prompt + output in tokens (default: the model's, capped at 8192).
    #[arg(long)]
    max_model_len: Option<usize>,
    #[arg(long, default_value_t = 64)]
    max_num_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
    #[arg(long, default_value_t = 16)]
    block_size: usize,
    /// KV cache capacity in tokens (default: 1 GiB worth on the CPU).
    #[arg(long)]
    max_tokens_in_paged_kv_cache: Option<usize>,
    /// CPU threads (0: one per core), shared out among the tensor-parallel ranks.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// Ranks the model is split over (the `tensor_parallel_size` parameter; on the CPU, threads
    /// of this process each holding a share of the weights).
    #[arg(long, default_value_t = 1)]
    tensor_parallel_size: usize,
    /// GPUs of the ranks, comma-separated ordinals (the `gpu_device_ids` parameter; default the
    /// first tensor-parallel-size visible GPUs).
    #[arg(long, value_delimiter = ',')]
    gpu_device_ids: Vec<usize>,
    /// Admission policy: max_utilization (admit while prompts fit; preempt and recompute the
    /// newest when the cache runs out) | guaranteed_no_evict (admit only what can run to its
    /// max_tokens; never preempt).
    #[arg(long, default_value = "max_utilization", value_parser = parse_policy)]
    batch_scheduler_policy: SchedulerPolicy,
    /// Reuse the KV cache of prompt prefixes computed before (true | false; the
    /// `enable_kv_cache_reuse` parameter).
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    enable_kv_cache_reuse: bool,
    /// GPU: replay decode steps from CUDA graphs (true | false; the `cuda_graph_mode` parameter).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cuda_graph_mode: bool,
    /// GPU: compile kernels, time GEMM shapes and capture graphs at load (true | false; the
    /// `cuda_warmup` parameter).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    cuda_warmup: bool,
    /// Write every step's named intermediates (each layer's norm, qkv, attention, MLP outputs,
    /// the logits) as .npy files under DIR/stepNNN/, for a layer-by-layer comparison with a
    /// reference. GPU: turns CUDA graphs off.
    #[arg(long, value_name = "DIR")]
    dump_intermediates: Option<PathBuf>,
}

impl EngineArgs {
    fn options(&self, model: PathBuf) -> EngineOptions {
        let defaults = EngineOptions::new(model);
        EngineOptions {
            tokenizer: self.tokenizer.clone(),
            device: self.device,
            weight_format: self.weight_format,
            dtype: self.dtype.0,
            quantization: self.quantization,
            max_model_len: self.max_model_len,
            batching: BatchingOptions {
                max_num_seqs: self.max_num_seqs,
                max_num_batched_tokens: self.max_num_batched_tokens,
                policy: self.batch_scheduler_policy,
                enable_prefix_caching: self.enable_kv_cache_reuse,
                ..defaults.batching
            },
            kv: KvCacheOptions {
                block_size: self.block_size,
                max_tokens: self.max_tokens_in_paged_kv_cache,
                free_gpu_mem_fraction: self
                    .kv_cache_free_gpu_mem_fraction
                    .unwrap_or(defaults.kv.free_gpu_mem_fraction),
                dtype: self.kv_cache_dtype,
            },
            cuda: CudaExecOptions {
                cuda_graphs: self.cuda_graph_mode,
                warm_up: self.cuda_warmup,
                ..defaults.cuda
            },
            parallel: ParallelOptions {
                tensor_parallel_size: self.tensor_parallel_size,
                gpu_device_ids: self.gpu_device_ids.clone(),
            },
            num_threads: self.threads,
            progress: true,
            dump_intermediates: self.dump_intermediates.clone(),
            ..defaults
        }
    }
}

fn parse_policy(s: &str) -> Result<SchedulerPolicy, String> {
    SchedulerPolicy::parse(s)
        .ok_or_else(|| format!("expected one of {}", SchedulerPolicy::NAMES.join(", ")))
}

fn parse_device(s: &str) -> Result<Device, String> {
    s.parse()
}

/// `--dtype`: None is `auto`.
#[derive(Debug, Clone, Copy)]
pub struct DtypeChoice(Option<DType>);

fn parse_dtype(s: &str) -> Result<DtypeChoice, String> {
    match s {
        "auto" => Ok(DtypeChoice(None)),
        "bfloat16" => Ok(DtypeChoice(Some(DType::BF16))),
        "float16" => Ok(DtypeChoice(Some(DType::F16))),
        "float32" => Ok(DtypeChoice(Some(DType::F32))),
        _ => Err(format!(
            "invalid dtype '{s}': expected auto, bfloat16, float16 or float32"
        )),
    }
}

fn parse_format(s: &str) -> Result<WeightFormat, String> {
    match s {
        "f32" => Ok(WeightFormat::F32),
        "q8" => Ok(WeightFormat::Q8),
        _ => Err(format!("invalid weight format '{s}': expected f32 or q8")),
    }
}

fn parse_ids(s: &str) -> Result<Vec<u32>, String> {
    s.split(',')
        .map(|t| {
            t.trim()
                .parse::<u32>()
                .map_err(|e| format!("invalid token id '{t}' in --prompt-ids: {e}"))
        })
        .collect()
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    #[arg(
        long,
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    prompt: Option<String>,
    /// Comma-separated token ids (works without a tokenizer).
    #[arg(long)]
    prompt_ids: Option<String>,
    /// Tokens to generate (default 128, capped to fit the model's context).
    #[arg(long)]
    max_tokens: Option<usize>,
    #[arg(long, default_value_t = 0)]
    min_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0)]
    top_p: f32,
    #[arg(long, default_value_t = 0.0)]
    min_p: f32,
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    presence_penalty: f32,
    #[arg(long, default_value_t = 0.0)]
    frequency_penalty: f32,
    #[arg(long)]
    seed: Option<u64>,
    /// Return the top-K log-probabilities of every generated token.
    #[arg(long)]
    logprobs: Option<usize>,
    /// Stop string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    #[arg(long)]
    ignore_eos: bool,
    /// Format the prompt with the model's chat template as one user message.
    #[arg(long)]
    chat: bool,
    /// Print exactly one JSON object instead of streaming text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    text: String,
    /// Do not add special tokens (BOS).
    #[arg(long)]
    no_special: bool,
}

#[derive(Args)]
struct InspectArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    json: bool,
    /// Also load the model on this device (auto | cpu | cuda | cuda:N) and report the device,
    /// dtype, weight bytes and how many KV cache blocks fit there.
    #[arg(long, value_parser = parse_device)]
    device: Option<Device>,
    /// With --device: GPU dtype (auto | bfloat16 | float16 | float32).
    #[arg(long, default_value = "auto", value_parser = parse_dtype)]
    dtype: DtypeChoice,
    /// With --device: weight quantization at load (auto | fp8), as for the other commands.
    #[arg(long, default_value = "auto")]
    quantization: QuantizationOption,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => generate(a),
        Command::Tokenize(a) => tokenize(a),
        Command::Inspect(a) => inspect(a),
        Command::Bench(a) => bench::run(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

type CliResult = Result<(), Box<dyn std::error::Error>>;

fn generate(a: GenerateArgs) -> CliResult {
    let model = a.engine.model.clone().ok_or("--model is required")?;
    let loaded = triton_ferrum::engine::options::start(&a.engine.options(model))?;
    let handle = loaded.engine.handle();
    let has_tokenizer = handle.info().tokenizer.is_some();
    let prompt = match (a.prompt_ids, a.prompt) {
        (Some(ids), _) => Prompt::TokenIds(parse_ids(&ids)?),
        (None, Some(text)) if a.chat => Prompt::Chat(vec![ChatMessage::new("user", text)]),
        (None, Some(text)) => Prompt::Text(text),
        (None, None) => return Err("one of --prompt or --prompt-ids is required".into()),
    };
    let spec = RequestSpec {
        prompt,
        sampling: SamplingParams {
            temperature: a.temperature,
            top_k: a.top_k,
            top_p: a.top_p,
            min_p: a.min_p,
            repetition_penalty: a.repetition_penalty,
            presence_penalty: a.presence_penalty,
            frequency_penalty: a.frequency_penalty,
            seed: a.seed,
            logprobs: a.logprobs,
            bad_words: Vec::new(),
        },
        stop: StopCriteria {
            max_tokens: a
                .max_tokens
                .unwrap_or(DEFAULT_MAX_TOKENS.min(handle.info().max_model_len - 1)),
            min_tokens: a.min_tokens,
            stop_token_ids: vec![],
            stop_strings: a.stop,
            ignore_eos: a.ignore_eos,
        },
        detokenize: has_tokenizer,
        queue: Default::default(),
    };
    let request = GenerateRequest::new(spec, handle.info()).map_err(|e| match e {
        RequestError::NoTokenizer {
            field: "apply_chat_template",
        } => "--chat needs a model with a tokenizer".into(),
        e => e.to_string(),
    })?;
    let mut stream = handle.submit(request)?;
    let prompt_ids = stream.prompt_ids.clone();
    let mut output_ids = vec![];
    let mut text = String::new();
    let mut logprobs = vec![];
    let mut finish_reason = None;
    let stdout = std::io::stdout();
    while let Some(ev) = stream.recv() {
        let last = is_final(&ev);
        match ev {
            TokenEvent::Started { .. } => {}
            TokenEvent::Token {
                token_id,
                text: delta,
                logprobs: lp,
                finish,
            } => {
                output_ids.push(token_id);
                if let Some(lp) = lp {
                    logprobs.push(
                        lp.top
                            .iter()
                            .map(|&(id, p)| json!([id, p]))
                            .collect::<Vec<_>>(),
                    );
                }
                if !a.json {
                    let mut out = stdout.lock();
                    let _ = out.write_all(delta.as_bytes());
                    let _ = out.flush();
                }
                text.push_str(&delta);
                finish_reason = finish;
            }
            TokenEvent::Finished {
                text: delta,
                reason,
            } => {
                text.push_str(&delta);
                finish_reason = Some(reason);
            }
            TokenEvent::Error(e) | TokenEvent::Unavailable(e) => return Err(e.into()),
        }
        if last {
            break;
        }
    }
    let finish_reason = finish_reason.ok_or("the engine stopped before the request finished")?;
    if a.json {
        let mut obj = json!({
            "prompt_ids": prompt_ids,
            "output_ids": output_ids,
            "finish_reason": finish_reason.as_str(),
        });
        if has_tokenizer {
            obj["text"] = json!(text);
        }
        if a.logprobs.is_some() {
            obj["logprobs"] = json!(logprobs);
        }
        println!("{obj}");
    } else {
        println!();
    }
    Ok(())
}

fn tokenize(a: TokenizeArgs) -> CliResult {
    let ckpt = Checkpoint::open(&a.model, None)?;
    let tok = ckpt
        .tokenizer
        .ok_or_else(|| format!("{}: the model has no tokenizer", a.model.display()))?;
    let ids = tok.encode(&a.text, !a.no_special)?;
    println!("{}", serde_json::to_string(&ids)?);
    Ok(())
}

fn inspect(a: InspectArgs) -> CliResult {
    let t0 = Instant::now();
    let ckpt = Checkpoint::open(&a.model, None)?;
    let spec = &ckpt.arch.spec;
    let num_params = spec.num_params();
    let tensors = ckpt.source.names().len();
    let kv_per_token_f32 =
        triton_ferrum::executor::cpu::CpuExecutor::kv_bytes_per_token(spec, 1, KvCacheDtype::Auto);
    let kv_per_token_fp8 =
        triton_ferrum::executor::cpu::CpuExecutor::kv_bytes_per_token(spec, 1, KvCacheDtype::Fp8);
    let memory = json!({
        "f32": num_params * 4,
        "f16": num_params * 2,
        "bf16": num_params * 2,
        "q8": num_params * 5 / 4,
    });
    let tokenizer = ckpt.tokenizer.as_ref().map(|t| {
        json!({
            "vocab_size": t.vocab_size(),
            "bos_token_id": t.bos_token_id(),
            "eos_token_ids": t.eos_token_ids(),
            "chat_template": t.chat_template().is_some(),
        })
    });
    let default_format = triton_ferrum::engine::options::default_weight_format(&ckpt);
    // How the checkpoint's linears are stored (a pre-quantized FP8 checkpoint's scheme and
    // counts); with --device, the load log's `weights:` line says what each group runs in.
    let quantization = match &ckpt.arch.quant {
        Quantization::None => "none".to_string(),
        Quantization::Fp8(scheme) => {
            quant::describe_linears(scheme, &ckpt.arch, ckpt.source.as_ref())
        }
        Quantization::Fp8Online => "fp8 (at load)".to_string(),
    };
    let loaded = match a.device {
        None => None,
        Some(device) => {
            let opts = EngineOptions {
                device,
                dtype: a.dtype.0,
                quantization: a.quantization,
                ..EngineOptions::new(a.model.clone())
            };
            let l = triton_ferrum::engine::options::start_checkpoint(
                Checkpoint::open(&a.model, None)?,
                &opts,
            )?;
            Some(json!({
                "device": l.device,
                "dtype": triton_ferrum::engine::options::dtype_name(l.dtype),
                "weight_bytes": l.weight_bytes,
                "num_kv_blocks": l.num_kv_blocks,
                "block_size": l.block_size,
                "max_model_len": l.max_model_len,
                "log": l.log,
            }))
        }
    };
    let obj = json!({
        "model": a.model.display().to_string(),
        "format": format!("{:?}", ckpt.format),
        "architecture": spec.arch,
        "spec": spec,
        "num_params": num_params,
        "num_tensors": tensors,
        "weight_bytes": memory,
        "default_weight_format": format!("{default_format:?}").to_lowercase(),
        "quantization": quantization,
        "kv_cache_bytes_per_token_f32": kv_per_token_f32,
        "kv_cache_bytes_per_token_fp8": kv_per_token_fp8,
        "tokenizer": tokenizer,
        "loaded": loaded,
    });
    if a.json {
        println!("{obj}");
        return Ok(());
    }
    println!("model:         {}", a.model.display());
    println!("format:        {:?}", ckpt.format);
    println!("architecture:  {}", spec.arch);
    println!(
        "parameters:    {num_params} ({:.1} M)",
        num_params as f64 / 1e6
    );
    println!("tensors:       {tensors}");
    println!(
        "memory:        f32 {:.1} MiB, f16/bf16 {:.1} MiB, q8 {:.1} MiB (default here: {})",
        (num_params * 4) as f64 / 1048576.0,
        (num_params * 2) as f64 / 1048576.0,
        (num_params * 5 / 4) as f64 / 1048576.0,
        format!("{default_format:?}").to_lowercase()
    );
    println!("quantization:  {quantization}");
    println!(
        "kv cache:      {kv_per_token_f32} bytes/token (f32), {kv_per_token_fp8} (kv_cache_dtype fp8)"
    );
    match &tokenizer {
        Some(t) => println!("tokenizer:     {t}"),
        None => println!("tokenizer:     none (use --prompt-ids)"),
    }
    if let Some(l) = &loaded {
        println!("loaded:        {l}");
    }
    println!("spec:\n{}", serde_json::to_string_pretty(spec)?);
    eprintln!("({:.0} ms)", t0.elapsed().as_secs_f64() * 1e3);
    Ok(())
}
