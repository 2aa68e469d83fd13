//! From a device name and an opened checkpoint to a running executor: open the device (`auto`
//! tries CUDA device 0 and falls back to the CPU with a one-line reason), load the weights (CPU:
//! in the chosen format; GPU: dequantized, uploaded in `dtype`), size the paged KV cache and
//! build the CPU or CUDA executor. This is the one place outside `executor::cuda` that opens a
//! CUDA device, so the engine never imports `crate::cuda`. It never starts an engine thread.

use std::str::FromStr;

use super::Executor;
use super::cpu::CpuExecutor;
use super::cuda::{self as cuda_executor, KvCacheConfig};
use super::dump::Dumper;
use crate::cuda::{CudaDevice, CudaError, SmArch};
use crate::dtype::DType;
use crate::engine::options::{EngineOptions, dtype_name};
use crate::kv_cache::KvCacheDtype;
use crate::model::quant::Quantization;
use crate::model::tp::{RankLayout, TpRank};
use crate::model::weights::{DecoderWeights, KvScales, WeightReader};
use crate::model::{Checkpoint, CheckpointFormat};
use crate::ops::linear::WeightFormat;

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

/// A device opened for an executor, decided before any weight is read.
pub struct Target(TargetKind);

enum TargetKind {
    /// `fallback`: why `auto` did not pick a GPU.
    Cpu {
        fallback: Option<String>,
    },
    Cuda(Box<CudaDevice>),
}

impl Target {
    /// Opens the device `device` names. `Cuda` fails with the CUDA error (naming the missing
    /// library on a machine without one); `Auto` takes GPU 0 when the libraries and a device
    /// open, else the CPU with the reason (logged by `build`).
    pub fn open(device: Device) -> crate::Result<Self> {
        Ok(Target(match device {
            Device::Cpu => TargetKind::Cpu { fallback: None },
            Device::Cuda { ordinal } => CudaDevice::open(ordinal)
                .map(|d| TargetKind::Cuda(Box::new(d)))
                .map_err(|e| crate::Error::Device(format!("device cuda:{ordinal}: {e}")))?,
            Device::Auto => match CudaDevice::open(0) {
                Ok(dev) => TargetKind::Cuda(Box::new(dev)),
                Err(e) => TargetKind::Cpu {
                    fallback: Some(auto_fallback_reason(&e)),
                },
            },
        }))
    }

    /// The device this target settled on (`Cpu` or `Cuda { ordinal }`, never `Auto`): what a
    /// rebuild opens, so that it does not redo `auto`'s choice.
    pub fn device(&self) -> Device {
        match &self.0 {
            TargetKind::Cpu { .. } => Device::Cpu,
            TargetKind::Cuda(dev) => Device::Cuda {
                ordinal: dev.ordinal(),
            },
        }
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

/// An executor and what was loaded into it.
pub struct BuiltExecutor {
    /// The executor, ready for the engine.
    pub executor: Box<dyn Executor>,
    /// Host weight format the weights were loaded in (f32 on the GPU, which converts).
    pub weight_format: WeightFormat,
    /// Compute / storage dtype (f32 on the CPU).
    pub dtype: DType,
    /// Bytes of weights on the device.
    pub weight_bytes: usize,
    /// KV cache blocks allocated.
    pub num_kv_blocks: usize,
}

/// The weight format used when none is asked for.
pub fn default_weight_format(ckpt: &Checkpoint) -> WeightFormat {
    // FP8 weights are computed with exactly: no second quantization to 8-bit blocks.
    if !matches!(ckpt.arch.quant, Quantization::None) {
        return WeightFormat::F32;
    }
    match ckpt.format {
        CheckpointFormat::Gguf { .. } => WeightFormat::Q8,
        CheckpointFormat::HuggingFace { .. } | CheckpointFormat::Random { .. } => WeightFormat::F32,
    }
}

/// Loads `ckpt`'s weights and builds the executor on `target` for sequences of at most
/// `max_model_len` tokens; appends what is worth logging (device fallback, KV cache sizing,
/// warm-up) to `log`.
pub fn build(
    target: Target,
    ckpt: &Checkpoint,
    opts: &EngineOptions,
    max_model_len: usize,
    log: &mut Vec<String>,
) -> crate::Result<BuiltExecutor> {
    let spec = &ckpt.arch.spec;
    super::parallel::check_model(&opts.parallel, spec)?;
    let tp = opts.parallel.tensor_parallel_size;
    Ok(match target.0 {
        TargetKind::Cpu { fallback } => {
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
            let bytes_per_token = CpuExecutor::kv_bytes_per_token(spec, tp, opts.kv.dtype);
            let kv_tokens = opts.kv.max_tokens.unwrap_or_else(|| {
                (DEFAULT_CPU_KV_BYTES / bytes_per_token)
                    .min(opts.batching.max_num_seqs * max_model_len)
                    .max(max_model_len)
            });
            let num_kv_blocks = kv_tokens.div_ceil(opts.kv.block_size);
            let (mut executor, weight_bytes) = if tp == 1 {
                let weights = load_weights(ckpt, format, opts.progress)?;
                let bytes = weights.size_in_bytes();
                let executor = CpuExecutor::new(
                    spec.clone(),
                    weights,
                    num_kv_blocks,
                    opts.kv.block_size,
                    opts.num_threads,
                )?;
                (executor, bytes)
            } else {
                // Each rank reads only its slices of the checkpoint.
                let mut shares = Vec::with_capacity(tp);
                for rank in 0..tp {
                    let layout = RankLayout::new(
                        spec,
                        TpRank {
                            rank,
                            world_size: tp,
                        },
                    )
                    .map_err(crate::model::ModelError::TensorParallel)?;
                    shares.push(DecoderWeights::load_rank(
                        ckpt.source.as_ref(),
                        &ckpt.arch,
                        format,
                        layout,
                        |_| {},
                    )?);
                }
                let bytes = shares.iter().map(DecoderWeights::size_in_bytes).sum();
                log.push(format!(
                    "tensor_parallel_size {tp}: {tp} CPU ranks in threads, each with its share of \
                     the weights and the KV cache of its own heads"
                ));
                let executor = CpuExecutor::tensor_parallel(
                    spec.clone(),
                    shares,
                    num_kv_blocks,
                    opts.kv.block_size,
                    opts.num_threads,
                )?;
                (executor, bytes)
            };
            if opts.kv.dtype == KvCacheDtype::Fp8 {
                log.push(use_fp8_kv(&mut executor, ckpt)?);
            }
            if let Some(dir) = &opts.dump_intermediates {
                executor = executor.with_dumper(Dumper::new(dir)?)?;
            }
            BuiltExecutor {
                executor: Box::new(executor),
                weight_format: format,
                dtype: DType::F32,
                weight_bytes,
                num_kv_blocks,
            }
        }
        TargetKind::Cuda(dev) => {
            // The NCCL path is the other engineer's half of this work: refuse several ranks
            // clearly (placement first), never run them as one.
            if tp > 1 {
                let visible = crate::cuda::device::device_count().unwrap_or(0);
                super::parallel::check_cuda(&opts.parallel, visible)?;
            }
            let dtype = opts.dtype.unwrap_or(DType::BF16);
            if opts.kv.dtype == KvCacheDtype::Fp8 {
                return Err(crate::Error::Device(
                    "kv_cache_dtype fp8: the GPU engine of this build keeps its KV cache in dtype \
                     (the FP8 cache runs on the CPU engine only so far); use kv_cache_dtype auto"
                        .into(),
                ));
            }
            if opts.weight_format == Some(WeightFormat::Q8) {
                // Only reachable with `auto` (`cuda` + q8 is refused up front).
                log.push(format!(
                    "weight_format q8 applies to the CPU engine only; the GPU engine holds weights in {}",
                    dtype_name(dtype)
                ));
            }
            if !matches!(ckpt.arch.quant, Quantization::None) && dev.arch() < SmArch::SM89 {
                let info = dev.info();
                return Err(crate::Error::Device(format!(
                    "FP8 weights (an FP8 checkpoint or quantization: fp8) need a GPU with FP8 tensor cores (compute capability 8.9 \
                     or newer: Ada, Hopper, Blackwell); device {} ({}) has {}.{}. Serve the \
                     model unquantized, or on the CPU engine (device: cpu), which runs FP8 \
                     checkpoints dequantized",
                    info.ordinal, info.name, info.arch.major, info.arch.minor
                )));
            }
            // Read one tensor at a time, converted to `dtype` (FP8 linears kept in E4M3) and
            // uploaded.
            let bar = layer_progress(ckpt, opts.progress);
            let kv = KvCacheConfig {
                kv: opts.kv.clone(),
                batching: opts.batching.clone(),
                max_model_len,
            };
            let cuda_executor::OpenedExecutor {
                executor,
                plan,
                warm_up,
                weight_bytes,
                weight_formats,
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
                &opts.cuda,
                opts.dump_intermediates.as_deref(),
            )?;
            if let Some(b) = bar {
                b.finish_and_clear();
            }
            log.push(weight_formats);
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

/// Switches a CPU executor's KV cache to FP8 E4M3: the checkpoint's per-layer K/V scales when
/// every layer has them, else scales measured on a calibration prefill. Returns the load-log line.
fn use_fp8_kv(executor: &mut CpuExecutor, ckpt: &Checkpoint) -> crate::Result<String> {
    let reader = WeightReader::new(ckpt.source.as_ref(), &ckpt.arch, WeightFormat::F32);
    let stored = (0..ckpt.arch.spec.num_layers)
        .map(|i| reader.kv_scales(i))
        .collect::<Result<Option<Vec<_>>, _>>()?;
    let (scales, source) = match stored {
        Some(s) => (s, "from the checkpoint".to_string()),
        None => (
            executor.measure_kv_scales(ckpt.tokenizer.as_ref().and_then(|t| t.bos_token_id()))?,
            format!(
                "measured at load ({} x max |k|, |v| / 448 over a {}-token calibration prefill)",
                crate::executor::cpu::KV_SCALE_HEADROOM,
                crate::executor::cpu::KV_CALIBRATION_TOKENS
            ),
        ),
    };
    executor.use_fp8_kv(&scales)?;
    let range = |f: fn(&KvScales) -> f32| {
        let (lo, hi) = scales
            .iter()
            .map(f)
            .fold((f32::INFINITY, 0.0f32), |(a, b), x| (a.min(x), b.max(x)));
        format!("{lo:.3e}..{hi:.3e}")
    };
    Ok(format!(
        "kv cache: fp8 e4m3 (1 byte per element), per-layer scales {source}: k {}, v {}",
        range(|s| s.k),
        range(|s| s.v)
    ))
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
