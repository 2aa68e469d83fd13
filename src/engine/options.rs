//! From a model path and a few options to a running engine: check the options, open the device
//! and the checkpoint, build the executor (`executor::build`: weights, KV cache sizing, the `auto`
//! fallback), start the engine thread. The engine keeps the options, so that after a step
//! panicked it can open the model again and rebuild its executor the same way
//! (`Recovery::Rebuild`). Environment overrides (`FERRUM_CUDA_*`, `FERRUM_INJECT_PANIC_TOKEN`)
//! are read here, once per start. Nothing here touches a device itself.

use std::path::PathBuf;

use super::{Engine, EngineSetup, FaultInjection, ModelInfo, Recovery};
use crate::dtype::DType;
use crate::executor::build::{self, Target};
pub use crate::executor::build::{
    DEFAULT_CPU_KV_BYTES, Device, default_weight_format, load_weights,
};
use crate::executor::{CudaExecOptions, ParallelOptions};
use crate::kv_cache::KvCacheOptions;
use crate::model::quant::QuantizationOption;
use crate::model::{Checkpoint, CheckpointFormat};
use crate::ops::linear::WeightFormat;
use crate::scheduler::{BatchingOptions, SchedulerConfig};

/// Longest prompt + output when `max_model_len` is not set and the model allows more.
pub const DEFAULT_MAX_MODEL_LEN_CAP: usize = 8192;

/// How to load and run a model: what `BackendConfig` parses from a model's Triton `parameters`
/// (the key is named per field) and what the CLI's engine flags set. Each setting has one home:
/// batching in `batching` (shared with the scheduler), KV cache sizing in `kv`, GPU execution in
/// `cuda`. `new` gives the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    /// The checkpoint: a .gguf file, a folder holding one .gguf, or a Hugging Face folder
    /// (`model_path`). A rebuild after a panicked step opens it again.
    pub model: PathBuf,
    /// A folder with tokenizer.json (or vocab.json + merges.txt) to use instead of the
    /// checkpoint's tokenizer (`tokenizer_path`); None: the checkpoint's.
    pub tokenizer: Option<PathBuf>,
    /// Where to run (`device`; default `Auto`).
    pub device: Device,
    /// CPU engine: weight storage (`weight_format`). None: q8 for quantized GGUF files, f32
    /// otherwise. The GPU engine takes `auto`/`f32` only (it dequantizes at load and stores
    /// weights in `dtype`).
    pub weight_format: Option<WeightFormat>,
    /// GPU engine: dtype of weights, activations and KV cache (`dtype`). None: bf16 on the GPU;
    /// the CPU engine computes in f32 and refuses bf16/f16 with `device: cpu` (ignored when
    /// `auto` falls back to the CPU).
    pub dtype: Option<DType>,
    /// Weight quantization at load (`quantization`): `Auto` keeps the checkpoint's (FP8
    /// checkpoints load as FP8), `Fp8` quantizes a float or GGUF checkpoint's linears to FP8
    /// E4M3 per output channel. The CPU engine computes with the FP8 weights dequantized exactly
    /// (the reference of the FP8 GPU path).
    pub quantization: QuantizationOption,
    /// Longest prompt + output in tokens (`max_model_len`). None: the model's maximum (capped at
    /// `DEFAULT_MAX_MODEL_LEN_CAP`).
    pub max_model_len: Option<usize>,
    /// How requests are batched into steps (`max_num_seqs`, `max_num_batched_tokens`,
    /// `enable_chunked_context`, `batch_scheduler_policy`, `enable_kv_cache_reuse`).
    pub batching: BatchingOptions,
    /// How the paged KV cache is sized (`block_size`, `max_tokens_in_paged_kv_cache`,
    /// `kv_cache_free_gpu_mem_fraction`).
    pub kv: KvCacheOptions,
    /// GPU engine: graphs, warm-up, profiling (`cuda_graph_mode`, `cuda_warmup`).
    pub cuda: CudaExecOptions,
    /// Tensor parallelism: ranks and their GPUs (`tensor_parallel_size`, `gpu_device_ids`).
    pub parallel: ParallelOptions,
    /// CPU threads for the CPU engine (0: one per core), shared out among its tensor-parallel
    /// ranks (at least one each).
    pub num_threads: usize,
    /// Show a progress bar while loading weights (only when stderr is a terminal).
    pub progress: bool,
    /// Write every step's named intermediates (per layer) as .npy files under this folder, for
    /// a layer-by-layer comparison with a reference (`executor::dump`; GPU: graphs off).
    pub dump_intermediates: Option<PathBuf>,
    /// Time every request and report it on `Engine::request_timings` (the Triton backend sets
    /// it when its vLLM metrics are on; default false: nothing is timed).
    pub report_timings: bool,
}

impl EngineOptions {
    /// The defaults for the checkpoint at `model`: `Device::Auto`, dtype and weight format by
    /// device and checkpoint, `max_model_len` sized automatically, `BatchingOptions::default()`
    /// (64 sequences, 2048 tokens per step, chunked prefill, no prefix caching),
    /// `KvCacheOptions::default()` (blocks of 16 tokens, capacity from memory),
    /// `CudaExecOptions::default()` (graphs and warm-up on), one CPU thread per core.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineOptions {
            model: model.into(),
            tokenizer: None,
            device: Device::Auto,
            weight_format: None,
            quantization: QuantizationOption::Auto,
            dtype: None,
            max_model_len: None,
            batching: BatchingOptions::default(),
            kv: KvCacheOptions::default(),
            cuda: CudaExecOptions::default(),
            parallel: ParallelOptions::default(),
            num_threads: 0,
            progress: false,
            dump_intermediates: None,
            report_timings: false,
        }
    }

    /// These options with the `FERRUM_CUDA_GRAPHS`, `FERRUM_CUDA_WARMUP` and
    /// `FERRUM_CUDA_PROFILE` environment overrides applied (`CudaExecOptions::overridden_by_env`).
    fn overridden_by_env(self) -> Self {
        EngineOptions {
            cuda: self.cuda.overridden_by_env(),
            ..self
        }
    }
}

/// A started engine plus what was loaded, for logs and `inspect`.
pub struct LoadedEngine {
    /// The running engine; dropping it shuts the engine down.
    pub engine: Engine,
    /// What was opened: GGUF, Hugging Face folder or random weights.
    pub checkpoint_format: CheckpointFormat,
    /// The model's architecture as the decoder runs it.
    pub spec: crate::model::DecoderSpec,
    /// Host weight format the weights were loaded in (the GPU engine loads f32 and converts).
    pub weight_format: WeightFormat,
    /// Compute / storage dtype of the engine (f32 on the CPU).
    pub dtype: DType,
    /// Bytes of weights on the device (in `dtype` on the GPU).
    pub weight_bytes: usize,
    /// KV cache blocks allocated: capacity `num_kv_blocks * block_size` tokens.
    pub num_kv_blocks: usize,
    /// Token positions per KV cache block (`KvCacheOptions::block_size`).
    pub block_size: usize,
    /// Prompt + output limit in effect: `EngineOptions::max_model_len` or the model's own
    /// (capped at `DEFAULT_MAX_MODEL_LEN_CAP`), never above the model's maximum.
    pub max_model_len: usize,
    /// Where the executor runs, as it describes itself: `cpu (N threads)` or
    /// `cuda:N (name, arch, dtype, graphs ...)`.
    pub device: String,
    /// Load log lines (device fallback, KV cache sizing), also printed to stderr.
    pub log: Vec<String>,
}

/// Starts an engine with the faults the environment asks for (`FaultInjection::from_env`). If a
/// step panics, the engine rebuilds its executor from `opts.model` (`Recovery::Rebuild`).
pub fn start(opts: &EngineOptions) -> crate::Result<LoadedEngine> {
    start_with_faults(opts, FaultInjection::from_env()?)
}

/// `start` with the given faults instead of the environment's (tests).
pub fn start_with_faults(
    opts: &EngineOptions,
    faults: FaultInjection,
) -> crate::Result<LoadedEngine> {
    check_options(opts)?;
    let opts = &opts.clone().overridden_by_env();
    let target = Target::open(opts.device)?;
    let ckpt = Checkpoint::open(&opts.model, opts.tokenizer.as_deref())?;
    start_on(target, ckpt, opts, faults, RebuildFrom::ModelPath)
}

/// Starts an engine on an already opened checkpoint (`opts.model` is not read again). It fails
/// closed if a step panics: it has no checkpoint to rebuild from.
pub fn start_checkpoint(ckpt: Checkpoint, opts: &EngineOptions) -> crate::Result<LoadedEngine> {
    check_options(opts)?;
    let opts = &opts.clone().overridden_by_env();
    let target = Target::open(opts.device)?;
    start_on(
        target,
        ckpt,
        opts,
        FaultInjection::from_env()?,
        RebuildFrom::Nothing,
    )
}

/// Option combinations refused before anything is opened.
fn check_options(opts: &EngineOptions) -> crate::Result<()> {
    crate::executor::parallel::check_options(&opts.parallel, opts.device)?;
    if opts.device == Device::Cpu && matches!(opts.dtype, Some(DType::BF16 | DType::F16)) {
        return Err(crate::Error::Device(format!(
            "dtype {} needs the GPU engine: the CPU engine computes in float32 (use dtype auto or \
             float32; weight_format picks its weight storage)",
            opts.dtype.map(dtype_name).unwrap_or_default()
        )));
    }
    if matches!(opts.device, Device::Cuda { .. }) && opts.weight_format == Some(WeightFormat::Q8) {
        return Err(crate::Error::Device(
            "weight_format q8 is a CPU engine format; the GPU engine dequantizes at load and \
             stores weights in dtype (use weight_format auto or f32)"
                .into(),
        ));
    }
    let f = opts.kv.free_gpu_mem_fraction;
    if !(f > 0.0 && f <= 1.0) {
        return Err(crate::Error::Device(format!(
            "kv_cache_free_gpu_mem_fraction = {f} must be in (0, 1]"
        )));
    }
    Ok(())
}

/// The config spelling of a dtype (`bfloat16`, `float16`, `float32`).
pub fn dtype_name(dtype: DType) -> &'static str {
    match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
    }
}

/// What a rebuild after a panicked step builds its executor from.
enum RebuildFrom {
    /// `opts.model`, opened again (nothing stays mapped between builds); it must still hold the
    /// model the engine was started with.
    ModelPath,
    /// Nothing: the caller opened the checkpoint itself (it may be no file at all, e.g. random
    /// weights for a benchmark), so the engine fails closed instead.
    Nothing,
}

fn start_on(
    target: Target,
    ckpt: Checkpoint,
    opts: &EngineOptions,
    faults: FaultInjection,
    rebuild_from: RebuildFrom,
) -> crate::Result<LoadedEngine> {
    let mut log = vec![];
    let mut ckpt = ckpt;
    log.extend(ckpt.arch.quant.apply(opts.quantization));
    let spec = ckpt.arch.spec.clone();
    let max_model_len = opts
        .max_model_len
        .unwrap_or(spec.max_position_embeddings.min(DEFAULT_MAX_MODEL_LEN_CAP))
        .min(spec.max_position_embeddings);
    // A rebuild opens the device `auto` settled on, not whatever `auto` finds then.
    let device = target.device();
    let built = build::build(target, &ckpt, opts, max_model_len, &mut log)?;
    for line in &log {
        eprintln!("ferrum: {line}");
    }
    let device_name = built.executor.describe();
    let scheduler = SchedulerConfig {
        batching: opts.batching.clone(),
        block_size: opts.kv.block_size,
        num_blocks: built.num_kv_blocks,
        max_model_len,
    };
    let info = ModelInfo {
        vocab_size: spec.vocab_size,
        max_model_len,
        eos_token_ids: ckpt.eos_token_ids(),
        tokenizer: ckpt.tokenizer.clone(),
        bans_words: built.executor.bans_words(),
    };
    let recovery = match rebuild_from {
        RebuildFrom::ModelPath => {
            let opts = EngineOptions {
                device,
                progress: false,
                ..opts.clone()
            };
            let spec = spec.clone();
            Recovery::Rebuild(Box::new(move || {
                let mut ckpt = Checkpoint::open(&opts.model, opts.tokenizer.as_deref())?;
                ckpt.arch.quant.apply(opts.quantization);
                if ckpt.arch.spec != spec {
                    return Err(crate::Error::Engine(format!(
                        "{} no longer holds the model the engine was started with",
                        opts.model.display()
                    )));
                }
                let mut log = vec![];
                let built = build::build(
                    Target::open(opts.device)?,
                    &ckpt,
                    &opts,
                    max_model_len,
                    &mut log,
                )?;
                for line in &log {
                    eprintln!("ferrum: rebuild: {line}");
                }
                Ok(built.executor)
            }))
        }
        RebuildFrom::Nothing => Recovery::FailClosed,
    };
    let engine = Engine::start_with(
        built.executor,
        info,
        EngineSetup {
            scheduler,
            recovery,
            faults,
            report_timings: opts.report_timings,
        },
    )?;
    Ok(LoadedEngine {
        engine,
        checkpoint_format: ckpt.format.clone(),
        spec,
        weight_format: built.weight_format,
        dtype: built.dtype,
        weight_bytes: built.weight_bytes,
        num_kv_blocks: built.num_kv_blocks,
        block_size: opts.kv.block_size,
        max_model_len,
        device: device_name,
        log,
    })
}
