//! From a model path and a few options to a running engine: pick the device (`auto` tries CUDA
//! device 0 and falls back to the CPU with a log line saying why), open the checkpoint, load
//! weights (CPU: in the chosen format; GPU: dequantized, uploaded in `dtype`), size the paged KV
//! cache, start the engine thread. The engine keeps the options, so that after a step panicked
//! it can open the model again and rebuild its executor the same way (`Recovery::Rebuild`).

use std::path::PathBuf;
use std::str::FromStr;

use super::{Engine, EngineSetup, FaultInjection, ModelInfo, Recovery};
use crate::cuda::{CudaDevice, CudaError};
use crate::dtype::DType;
use crate::executor::Executor;
use crate::executor::cpu::CpuExecutor;
use crate::executor::cuda::{
    self as cuda_executor, DEFAULT_KV_CACHE_FREE_GPU_MEM_FRACTION, KvCacheConfig,
};
use crate::executor::dump::Dumper;
use crate::model::weights::DecoderWeights;
use crate::model::{Checkpoint, CheckpointFormat};
use crate::ops::linear::WeightFormat;
use crate::scheduler::{SchedulerConfig, SchedulerPolicy};

/// Where the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    /// The CPU executor, which computes in f32 (a bf16/f16 `dtype` is refused).
    Cpu,
    /// One CUDA GPU; loading fails if the CUDA libraries or the device cannot be opened (no
    /// fallback to the CPU).
    Cuda {
        /// The device index as CUDA numbers devices (`cuda:N`; plain `cuda` is 0).
        ordinal: usize,
    },
}

impl FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Device::Auto),
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda { ordinal: 0 }),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(ordinal)) => Ok(Device::Cuda { ordinal }),
                _ => Err(format!(
                    "invalid device '{s}': expected auto, cpu, cuda or cuda:N"
                )),
            },
        }
    }
}

/// Default host memory for the CPU engine's KV cache when no size is given.
pub const DEFAULT_CPU_KV_BYTES: usize = 1 << 30;

/// Longest prompt + output when `max_model_len` is not set and the model allows more.
pub const DEFAULT_MAX_MODEL_LEN_CAP: usize = 8192;

/// How to load and run a model: what `BackendConfig::engine_options` makes of a model's Triton
/// `parameters` (the key is named per field), and what the CLI's engine flags set. `new` gives
/// the defaults.
#[derive(Debug, Clone)]
pub struct EngineOptions {
    /// The checkpoint: a .gguf file, a folder holding one .gguf, or a Hugging Face folder
    /// (`model_path`). A rebuild after a panicked step opens it again.
    pub model: PathBuf,
    /// A folder with tokenizer.json (or vocab.json + merges.txt) to use instead of the
    /// checkpoint's tokenizer (`tokenizer_path`); None: the checkpoint's.
    pub tokenizer: Option<PathBuf>,
    /// Where to run (`device`; default `Auto`).
    pub device: Device,
    /// CPU engine: weight storage. None: q8 for quantized GGUF files, f32 otherwise. The GPU
    /// engine takes `auto`/`f32` only (it dequantizes at load and stores weights in `dtype`).
    pub weight_format: Option<WeightFormat>,
    /// GPU engine: dtype of weights, activations and KV cache. None: bf16 on the GPU; the CPU
    /// engine computes in f32 and refuses bf16/f16 with `device: cpu` (ignored when `auto` falls
    /// back to the CPU).
    pub dtype: Option<DType>,
    /// Most sequences running (holding KV blocks and a batch seat) at once (`max_num_seqs`;
    /// default 64).
    pub max_num_seqs: usize,
    /// Token budget of one step: prefill chunks plus one token per decoding sequence
    /// (`max_num_batched_tokens`; default 2048; >= `max_num_seqs`, and >= `max_model_len`
    /// without chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Token positions per KV cache block (`block_size`; default 16; the config key takes a
    /// power of two in [1, 256]).
    pub block_size: usize,
    /// KV cache capacity in tokens (rounded up to whole blocks). None: from `DEFAULT_CPU_KV_BYTES`
    /// on the CPU, from `kv_cache_free_gpu_mem_fraction` on the GPU; on the GPU with both set,
    /// the smaller wins.
    pub max_tokens_in_paged_kv_cache: Option<usize>,
    /// GPU engine: fraction of the free memory (after weights and activation workspace) for the
    /// KV cache. None: `DEFAULT_KV_CACHE_FREE_GPU_MEM_FRACTION` (0.9).
    pub kv_cache_free_gpu_mem_fraction: Option<f32>,
    /// Longest prompt + output. None: the model's maximum (capped at 8192).
    pub max_model_len: Option<usize>,
    /// Split prompts longer than a step's remaining token budget across steps
    /// (`enable_chunked_context`; default true). Off, a prompt is prefilled in one step or waits.
    pub enable_chunked_prefill: bool,
    /// Admission policy (`batch_scheduler_policy`).
    pub batch_scheduler_policy: SchedulerPolicy,
    /// Reuse the KV blocks of prompt prefixes computed before (`enable_kv_cache_reuse`).
    pub enable_kv_cache_reuse: bool,
    /// GPU engine: replay decode steps from CUDA graphs (`cuda_graph_mode`).
    pub cuda_graphs: bool,
    /// GPU engine: compile, plan and capture at load (`cuda_warmup`).
    pub cuda_warm_up: bool,
    /// CPU threads for the CPU engine (0: one per core).
    pub num_threads: usize,
    /// Show a progress bar while loading weights (only when stderr is a terminal).
    pub progress: bool,
    /// Write every step's named intermediates (per layer) as .npy files under this folder, for
    /// a layer-by-layer comparison with a reference (`executor::dump`).
    pub dump_intermediates: Option<PathBuf>,
}

impl EngineOptions {
    /// The defaults for the checkpoint at `model`: `Device::Auto`, dtype and weight format by
    /// device and checkpoint, 64 sequences, 2048 tokens per step, blocks of 16 tokens, KV cache
    /// and `max_model_len` sized automatically, chunked prefill, CUDA graphs and warm-up on, no
    /// prefix caching, one CPU thread per core.
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineOptions {
            model: model.into(),
            tokenizer: None,
            device: Device::Auto,
            weight_format: None,
            dtype: None,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            block_size: 16,
            max_tokens_in_paged_kv_cache: None,
            kv_cache_free_gpu_mem_fraction: None,
            max_model_len: None,
            enable_chunked_prefill: true,
            batch_scheduler_policy: SchedulerPolicy::default(),
            enable_kv_cache_reuse: false,
            cuda_graphs: true,
            cuda_warm_up: true,
            num_threads: 0,
            progress: false,
            dump_intermediates: None,
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
    /// Token positions per KV cache block (`EngineOptions::block_size`).
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

/// The weight format used when none is asked for.
pub fn default_weight_format(ckpt: &Checkpoint) -> WeightFormat {
    match ckpt.format {
        CheckpointFormat::Gguf { .. } => WeightFormat::Q8,
        CheckpointFormat::HuggingFace { .. } | CheckpointFormat::Random { .. } => WeightFormat::F32,
    }
}

/// Where an engine will run, decided before any weight is read.
enum Target {
    /// `fallback`: why `auto` did not pick a GPU.
    Cpu {
        fallback: Option<String>,
    },
    Cuda(Box<CudaDevice>),
}

/// Opens the device `device` names. `Cuda` fails with the CUDA error (naming the missing
/// library on a machine without one); `Auto` takes GPU 0 when the libraries and a device open,
/// else the CPU with the reason.
fn open_target(device: Device) -> crate::Result<Target> {
    match device {
        Device::Cpu => Ok(Target::Cpu { fallback: None }),
        Device::Cuda { ordinal } => CudaDevice::open(ordinal)
            .map(|d| Target::Cuda(Box::new(d)))
            .map_err(|e| crate::Error::Device(format!("device cuda:{ordinal}: {e}"))),
        Device::Auto => Ok(match CudaDevice::open(0) {
            Ok(dev) => Target::Cuda(Box::new(dev)),
            Err(e) => Target::Cpu {
                fallback: Some(auto_fallback_reason(&e)),
            },
        }),
    }
}

/// Why `device: auto` serves on the CPU: one line on a machine without an NVIDIA GPU; the full
/// CUDA error (libraries tried, versions) where a GPU seems present but CUDA is not usable.
fn auto_fallback_reason(e: &CudaError) -> String {
    match e.no_gpu_reason() {
        Some(reason) => format!("{reason}: serving on the CPU"),
        None => format!("device auto: serving on the CPU, CUDA is not usable: {e}"),
    }
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
    let target = open_target(opts.device)?;
    let ckpt = Checkpoint::open(&opts.model, opts.tokenizer.as_deref())?;
    start_on(target, ckpt, opts, faults, RebuildFrom::ModelPath)
}

/// Starts an engine on an already opened checkpoint (`opts.model` is not read again). It fails
/// closed if a step panics: it has no checkpoint to rebuild from.
pub fn start_checkpoint(ckpt: Checkpoint, opts: &EngineOptions) -> crate::Result<LoadedEngine> {
    check_options(opts)?;
    let target = open_target(opts.device)?;
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
    if let Some(f) = opts.kv_cache_free_gpu_mem_fraction {
        if !(f > 0.0 && f <= 1.0) {
            return Err(crate::Error::Device(format!(
                "kv_cache_free_gpu_mem_fraction = {f} must be in (0, 1]"
            )));
        }
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

/// An executor and what was loaded into it.
struct BuiltExecutor {
    executor: Box<dyn Executor>,
    /// Host weight format the weights were loaded in.
    weight_format: WeightFormat,
    dtype: DType,
    weight_bytes: usize,
    num_kv_blocks: usize,
}

fn start_on(
    target: Target,
    ckpt: Checkpoint,
    opts: &EngineOptions,
    faults: FaultInjection,
    rebuild_from: RebuildFrom,
) -> crate::Result<LoadedEngine> {
    let mut log = vec![];
    let spec = ckpt.arch.spec.clone();
    let max_model_len = opts
        .max_model_len
        .unwrap_or(spec.max_position_embeddings.min(DEFAULT_MAX_MODEL_LEN_CAP))
        .min(spec.max_position_embeddings);
    // A rebuild opens the device `auto` settled on, not whatever `auto` finds then.
    let device = match &target {
        Target::Cpu { .. } => Device::Cpu,
        Target::Cuda(dev) => Device::Cuda {
            ordinal: dev.ordinal(),
        },
    };
    let built = build_executor(target, &ckpt, opts, max_model_len, &mut log)?;
    for line in &log {
        eprintln!("ferrum: {line}");
    }
    let device_name = built.executor.describe();
    let scheduler = SchedulerConfig {
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        block_size: opts.block_size,
        num_blocks: built.num_kv_blocks,
        max_model_len,
        enable_chunked_prefill: opts.enable_chunked_prefill,
        policy: opts.batch_scheduler_policy,
        enable_prefix_caching: opts.enable_kv_cache_reuse,
    };
    let info = ModelInfo {
        vocab_size: spec.vocab_size,
        max_model_len,
        eos_token_ids: ckpt.eos_token_ids(),
        tokenizer: ckpt.tokenizer.clone(),
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
                let ckpt = Checkpoint::open(&opts.model, opts.tokenizer.as_deref())?;
                if ckpt.arch.spec != spec {
                    return Err(crate::Error::Engine(format!(
                        "{} no longer holds the model the engine was started with",
                        opts.model.display()
                    )));
                }
                let mut log = vec![];
                let built = build_executor(
                    open_target(opts.device)?,
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
        block_size: opts.block_size,
        max_model_len,
        device: device_name,
        log,
    })
}

/// Loads `ckpt`'s weights and builds the executor on `target`; appends what is worth logging
/// (device fallback, KV cache sizing, warm-up) to `log`.
fn build_executor(
    target: Target,
    ckpt: &Checkpoint,
    opts: &EngineOptions,
    max_model_len: usize,
    log: &mut Vec<String>,
) -> crate::Result<BuiltExecutor> {
    let spec = &ckpt.arch.spec;
    Ok(match target {
        Target::Cpu { fallback } => {
            if let Some(reason) = fallback {
                log.push(match opts.dtype {
                    Some(d @ (DType::BF16 | DType::F16)) => format!(
                        "{reason} (dtype {} ignored: the CPU engine computes in float32)",
                        dtype_name(d)
                    ),
                    _ => reason,
                });
            }
            let format = opts
                .weight_format
                .unwrap_or_else(|| default_weight_format(ckpt));
            let weights = load_weights(ckpt, format, opts.progress)?;
            let bytes_per_token = CpuExecutor::kv_bytes_per_token(spec);
            let kv_tokens = opts.max_tokens_in_paged_kv_cache.unwrap_or_else(|| {
                (DEFAULT_CPU_KV_BYTES / bytes_per_token)
                    .min(opts.max_num_seqs * max_model_len)
                    .max(max_model_len)
            });
            let num_kv_blocks = kv_tokens.div_ceil(opts.block_size);
            let weight_bytes = weights.size_in_bytes();
            let mut executor = CpuExecutor::new(
                spec.clone(),
                weights,
                num_kv_blocks,
                opts.block_size,
                opts.num_threads,
            )?;
            if let Some(dir) = &opts.dump_intermediates {
                executor = executor.with_dumper(Dumper::new(dir)?);
            }
            BuiltExecutor {
                executor: Box::new(executor),
                weight_format: format,
                dtype: DType::F32,
                weight_bytes,
                num_kv_blocks,
            }
        }
        Target::Cuda(dev) => {
            let dtype = opts.dtype.unwrap_or(DType::BF16);
            if opts.weight_format == Some(WeightFormat::Q8) {
                // Only reachable with `auto` (`cuda` + q8 is refused up front).
                log.push(format!(
                    "weight_format q8 applies to the CPU engine only; the GPU engine holds weights in {}",
                    dtype_name(dtype)
                ));
            }
            // Read one tensor at a time, dequantized, converted to `dtype` and uploaded.
            let bar = layer_progress(ckpt, opts.progress);
            let kv = KvCacheConfig {
                block_size: opts.block_size,
                max_tokens: opts.max_tokens_in_paged_kv_cache,
                free_gpu_mem_fraction: opts
                    .kv_cache_free_gpu_mem_fraction
                    .unwrap_or(DEFAULT_KV_CACHE_FREE_GPU_MEM_FRACTION),
                max_num_batched_tokens: opts.max_num_batched_tokens,
                max_num_seqs: opts.max_num_seqs,
                max_model_len,
            };
            let cuda_executor::OpenedExecutor {
                executor,
                plan,
                warm_up,
                weight_bytes,
            } = cuda_executor::open_with(
                *dev,
                ckpt,
                &mut |_| {
                    if let Some(b) = &bar {
                        b.inc(1);
                    }
                },
                dtype,
                &kv,
                &cuda_executor::CudaExecOptions {
                    cuda_graphs: opts.cuda_graphs,
                    warm_up: opts.cuda_warm_up,
                    profile: false,
                    dump_intermediates: opts.dump_intermediates.clone(),
                }
                .overridden_by_env(),
            )?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            log.push(plan.describe(&kv));
            log.extend(warm_up.map(|w| w.describe()));
            BuiltExecutor {
                executor,
                weight_format: WeightFormat::F32,
                dtype,
                weight_bytes,
                num_kv_blocks: plan.num_blocks,
            }
        }
    })
}

/// A progress bar over the layers of `ckpt`, when asked and stderr is a terminal.
fn layer_progress(ckpt: &Checkpoint, progress: bool) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    (progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(ckpt.arch.spec.num_layers as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "loading {msg} [{bar:30}] {pos}/{len} layers ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(ckpt.source.describe());
        bar
    })
}

/// Loads the decoder weights into host memory (the CPU engine), with a progress bar over
/// layers when asked and on a terminal.
pub fn load_weights(
    ckpt: &Checkpoint,
    format: WeightFormat,
    progress: bool,
) -> crate::Result<DecoderWeights> {
    let bar = layer_progress(ckpt, progress);
    let weights = DecoderWeights::load(ckpt.source.as_ref(), &ckpt.arch, format, |_| {
        if let Some(b) = &bar {
            b.inc(1);
        }
    })?;
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    Ok(weights)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cuda::CudaLibrary;

    #[test]
    fn auto_fallback_is_one_line_without_a_gpu_and_in_full_with_a_broken_one() {
        let no_driver = CudaError::LibraryNotFound {
            library: CudaLibrary::Driver,
            searched: vec!["libcuda.so".into(), "libcuda.so.1".into()],
            reason: "not found".into(),
        };
        assert_eq!(
            auto_fallback_reason(&no_driver),
            "no NVIDIA driver found: serving on the CPU"
        );
        let no_device = CudaError::NoSuchDevice {
            ordinal: 0,
            count: 0,
        };
        assert_eq!(
            auto_fallback_reason(&no_device),
            "no NVIDIA GPU found: serving on the CPU"
        );
        // A driver is there but a toolkit library is missing: the whole story is needed.
        let no_nvrtc = CudaError::LibraryNotFound {
            library: CudaLibrary::Nvrtc,
            searched: vec!["libnvrtc.so.13".into()],
            reason: "not found".into(),
        };
        let msg = auto_fallback_reason(&no_nvrtc);
        assert!(
            msg.starts_with("device auto: serving on the CPU, CUDA is not usable:")
                && msg.contains("libnvrtc.so.13"),
            "{msg}"
        );
    }
}
