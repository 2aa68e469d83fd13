//! From a model path and a few options to a running engine: open the checkpoint, load weights in
//! the chosen format, size the paged KV cache, start the engine thread.

use std::path::PathBuf;
use std::str::FromStr;

use super::{Engine, ModelInfo};
use crate::executor::cpu::CpuExecutor;
use crate::model::decoder::Decoder;
use crate::model::weights::DecoderWeights;
use crate::model::{Checkpoint, CheckpointFormat};
use crate::ops::linear::WeightFormat;
use crate::scheduler::SchedulerConfig;

/// Where the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    /// The GPU when one is usable, else the CPU.
    Auto,
    Cpu,
    Cuda {
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

#[derive(Debug, Clone)]
pub struct EngineOptions {
    pub model: PathBuf,
    pub tokenizer: Option<PathBuf>,
    pub device: Device,
    /// None: q8 for quantized GGUF files, f32 otherwise.
    pub weight_format: Option<WeightFormat>,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub block_size: usize,
    /// KV cache capacity in tokens (rounded up to whole blocks). None: from `DEFAULT_CPU_KV_BYTES`.
    pub max_tokens_in_paged_kv_cache: Option<usize>,
    /// Longest prompt + output. None: the model's maximum (capped at 8192 on the CPU).
    pub max_model_len: Option<usize>,
    pub enable_chunked_prefill: bool,
    /// CPU threads for the CPU engine (0: one per core).
    pub num_threads: usize,
    /// Show a progress bar while loading weights (only when stderr is a terminal).
    pub progress: bool,
}

impl EngineOptions {
    pub fn new(model: impl Into<PathBuf>) -> Self {
        EngineOptions {
            model: model.into(),
            tokenizer: None,
            device: Device::Auto,
            weight_format: None,
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            block_size: 16,
            max_tokens_in_paged_kv_cache: None,
            max_model_len: None,
            enable_chunked_prefill: true,
            num_threads: 0,
            progress: false,
        }
    }
}

/// A started engine plus what was loaded, for logs and `inspect`.
pub struct LoadedEngine {
    pub engine: Engine,
    pub checkpoint_format: CheckpointFormat,
    pub spec: crate::model::DecoderSpec,
    pub weight_format: WeightFormat,
    pub weight_bytes: usize,
    pub num_kv_blocks: usize,
    pub block_size: usize,
    pub max_model_len: usize,
    pub device: String,
}

/// The weight format used when none is asked for.
pub fn default_weight_format(ckpt: &Checkpoint) -> WeightFormat {
    match ckpt.format {
        CheckpointFormat::Gguf { .. } => WeightFormat::Q8,
        CheckpointFormat::HuggingFace { .. } | CheckpointFormat::Random { .. } => WeightFormat::F32,
    }
}

pub fn resolve_device(device: Device) -> crate::Result<Device> {
    match device {
        Device::Auto | Device::Cpu => Ok(Device::Cpu),
        Device::Cuda { ordinal } => Err(crate::Error::Device(format!(
            "device cuda:{ordinal} requested, but this build of ferrum has no CUDA engine yet; use device cpu or auto"
        ))),
    }
}

pub fn start(opts: &EngineOptions) -> crate::Result<LoadedEngine> {
    resolve_device(opts.device)?;
    let ckpt = Checkpoint::open(&opts.model, opts.tokenizer.as_deref())?;
    start_checkpoint(ckpt, opts)
}

/// Starts an engine on an already opened checkpoint (`opts.model` is not read again).
pub fn start_checkpoint(ckpt: Checkpoint, opts: &EngineOptions) -> crate::Result<LoadedEngine> {
    let device = resolve_device(opts.device)?;
    let format = opts
        .weight_format
        .unwrap_or_else(|| default_weight_format(&ckpt));
    let weights = load_weights(&ckpt, format, opts.progress)?;
    let spec = ckpt.arch.spec.clone();
    let max_model_len = opts
        .max_model_len
        .unwrap_or(spec.max_position_embeddings.min(8192))
        .min(spec.max_position_embeddings);
    let bytes_per_token = CpuExecutor::kv_bytes_per_token(&spec);
    let kv_tokens = opts.max_tokens_in_paged_kv_cache.unwrap_or_else(|| {
        (DEFAULT_CPU_KV_BYTES / bytes_per_token)
            .min(opts.max_num_seqs * max_model_len)
            .max(max_model_len)
    });
    let num_kv_blocks = kv_tokens.div_ceil(opts.block_size);
    let weight_bytes = weights.size_in_bytes();
    let executor = CpuExecutor::new(
        Decoder::new(spec.clone(), weights),
        num_kv_blocks,
        opts.block_size,
        opts.num_threads,
    )?;
    debug_assert_eq!(device, Device::Cpu);
    let device_name = crate::executor::Executor::describe(&executor);
    let scheduler = SchedulerConfig {
        max_num_seqs: opts.max_num_seqs,
        max_num_batched_tokens: opts.max_num_batched_tokens,
        block_size: opts.block_size,
        num_blocks: num_kv_blocks,
        max_model_len,
        enable_chunked_prefill: opts.enable_chunked_prefill,
    };
    let info = ModelInfo {
        vocab_size: spec.vocab_size,
        max_model_len,
        eos_token_ids: ckpt.eos_token_ids(),
        tokenizer: ckpt.tokenizer.clone(),
    };
    let engine = Engine::start(Box::new(executor), scheduler, info)?;
    Ok(LoadedEngine {
        engine,
        checkpoint_format: ckpt.format.clone(),
        spec,
        weight_format: format,
        weight_bytes,
        num_kv_blocks,
        block_size: opts.block_size,
        max_model_len,
        device: device_name,
    })
}

/// Loads the decoder weights, with a progress bar over layers when asked and on a terminal.
pub fn load_weights(
    ckpt: &Checkpoint,
    format: WeightFormat,
    progress: bool,
) -> crate::Result<DecoderWeights> {
    use std::io::IsTerminal;
    let bar = (progress && std::io::stderr().is_terminal()).then(|| {
        let bar = indicatif::ProgressBar::new(ckpt.arch.spec.num_layers as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "loading {msg} [{bar:30}] {pos}/{len} layers ({elapsed})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_message(ckpt.source.describe());
        bar
    });
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
