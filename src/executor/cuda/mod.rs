//! The CUDA executor: the one forward pass (`model::decoder`) on one GPU, over a paged KV cache
//! in device memory, behind the same `Executor` trait as the CPU executor.
//!
//! It owns the device, the GEMM engine, the weights (uploaded once from the host
//! `DecoderWeights`, converted to the executor's dtype: bf16, f16 or f32) and one K and one V
//! cache per layer, `[num_blocks, block_size, num_kv_heads, head_dim]` in the same dtype.
//!
//! ```text
//!   mod.rs        the executor: construction, the Executor contract, device sampling rows
//!   kv.rs         KV cache sizing from free memory and the model's limits
//!   options.rs    graphs / profile / warm-up switches
//!   weights.rs    device weights and their upload; per-layer KV cache
//!   pack.rs       the step upload: a checked plan packed into one u32 array
//!   workspace.rs  step buffers allocated once, and the device-side scatter of the upload
//!   forward.rs    CudaStep: the DecoderBackend ops (kernels and GEMMs; fusions chosen there)
//!   step.rs       one step: eager forward pass or a decode graph's capture and replay
//!   warmup.rs     load-time warm-up (kernels, GEMM plans, graphs)
//!   profile.rs    per-op CUDA-event timings (FERRUM_CUDA_PROFILE=1)
//! ```
//!
//! A step is packed on the host into one u32 array (`StepLayout`), uploaded in one copy and
//! scattered on the device into typed buffers. Tokens are ordered decode rows first, then
//! prefill chunks. Every step buffer, the split-K workspace included, is allocated once at
//! construction for `max_num_batched_tokens` / `max_num_seqs` (`Workspace`) and reused at fixed
//! addresses, so pure decode steps are captured as CUDA graphs per batch-size bucket
//! (`graph_buckets`; padded rows are inert) and replayed: one upload, one graph launch, one
//! logits download per step. Prefill and mixed steps run eagerly. The only host sync of a step
//! is the final copy back: the sampled ids and logprobs (`execute_and_sample`, the GPU sampler),
//! or the f32 logits of the sampling rows (`execute`).
//!
//! Environment: `FERRUM_CUDA_GRAPHS=0` runs decode eagerly; `FERRUM_CUDA_WARMUP=0` skips the
//! load-time warm-up; `FERRUM_CUDA_PROFILE=1` (graphs off) times every op of every step with
//! CUDA events and prints per-op tables, decode steps apart from steps with prefill, with the
//! host wall time per step, when the executor is dropped. Steps that compiled a kernel or
//! planned a GEMM shape (one-time costs) are left out.
//!
//! The KV cache is sized once, at construction (`plan_kv_blocks`). This module never panics on
//! plan data (a bad plan is an error) and holds no `unsafe`: every device call goes through the
//! checked launchers of `crate::cuda`.

mod forward;
mod kv;
mod pack;
mod profile;
mod step;
mod warmup;
mod weights;
mod workspace;

use std::collections::HashMap;

use half::{bf16, f16};

pub use super::options::CudaExecOptions;
pub use kv::{
    KvCacheConfig, KvCachePlan, RESERVED_GPU_BYTES, activation_workspace_bytes, kv_bytes_per_block,
    plan_kv_blocks,
};
pub use step::graph_buckets;
pub use warmup::WarmUpReport;

use super::dump::Dumper;
use super::{Executor, Logits, MinTokens, SamplingSetup, SeqStates, seq_state};
use crate::cuda::gemm::fp8::Fp8Activations;
use crate::cuda::ops::{self, KvCacheShape, RotaryLayout};
use crate::cuda::sampling::{GpuSampler, RowSampling, SampleBatch, TokenHistory};
use crate::cuda::{CudaDevice, DeviceBuffer, DeviceGraph, FloatElem, Gemm, KernelId};
use crate::dtype::DType;
use crate::model::Checkpoint;
use crate::model::DecoderSpec;
use crate::model::decoder::Act;
use crate::model::decoder::{Decoder, Tap};
use crate::model::weights::WeightReader;
use crate::ops::linear::WeightFormat;
use crate::request::{SamplingParams, SeqId};
use crate::sampling::{Penalties, Rng, Sampled};
use crate::scheduler::SchedulePlan;
use kv::{max_blocks_per_seq, step_capacity};
use pack::StepLayout;
use profile::{Profile, SAMPLE_WALL_OP};
use weights::{DeviceLayer, DeviceWeights, LayerKv};
use workspace::Workspace;

/// A CUDA executor as `open_with` returns it, with what its construction decided (for the load
/// log).
pub struct OpenedExecutor {
    /// The opened executor, ready for the engine (a `CudaExecutor` of the chosen dtype).
    pub executor: Box<dyn Executor>,
    /// How the KV cache was sized (blocks, bytes per block, the bound that decided).
    pub plan: KvCachePlan,
    /// None when the warm-up was turned off (`CudaExecOptions::warm_up`).
    pub warm_up: Option<WarmUpReport>,
    /// Device bytes of the uploaded weights.
    pub weight_bytes: usize,
    /// Which format the weight groups run in (one line for the load log).
    pub weight_formats: String,
}

/// Opens a CUDA executor on `dev` for `dtype`: reads the checkpoint's weights one tensor at a
/// time, each converted to `dtype` and uploaded before the next is read (`on_layer(i)` after
/// each layer, for progress), sizes and allocates the KV cache, then warms it up
/// (`CudaExecutor::warm_up`). With `dump_intermediates`, every step's named intermediates are
/// written under that folder (graphs off).
pub fn open_with(
    dev: CudaDevice,
    ckpt: &Checkpoint,
    on_layer: &mut dyn FnMut(usize),
    dtype: DType,
    kv: &KvCacheConfig,
    opts: &CudaExecOptions,
    dump_intermediates: Option<&std::path::Path>,
) -> crate::Result<OpenedExecutor> {
    fn finish<T: FloatElem>(
        (mut e, plan): (CudaExecutor<T>, KvCachePlan),
        opts: &CudaExecOptions,
        dump_intermediates: Option<&std::path::Path>,
    ) -> crate::Result<OpenedExecutor> {
        let warm_up = opts.warm_up.then(|| e.warm_up()).transpose()?;
        if let Some(dir) = dump_intermediates {
            e.set_dumper(Dumper::new(dir)?);
        }
        let weight_bytes = e.w.size_in_bytes();
        let weight_formats = e.w.formats.describe(&T::DTYPE.to_string());
        Ok(OpenedExecutor {
            executor: Box::new(e),
            plan,
            warm_up,
            weight_bytes,
            weight_formats,
        })
    }
    // Reads f32 (GGUF blocks dequantized); the upload converts to `dtype`.
    let reader = WeightReader::new(ckpt.source.as_ref(), &ckpt.arch, WeightFormat::F32);
    let spec = ckpt.arch.spec.clone();
    match dtype {
        DType::F32 => finish(
            CudaExecutor::<f32>::new(dev, spec, &reader, on_layer, kv, opts)?,
            opts,
            dump_intermediates,
        ),
        DType::BF16 => finish(
            CudaExecutor::<bf16>::new(dev, spec, &reader, on_layer, kv, opts)?,
            opts,
            dump_intermediates,
        ),
        DType::F16 => finish(
            CudaExecutor::<f16>::new(dev, spec, &reader, on_layer, kv, opts)?,
            opts,
            dump_intermediates,
        ),
    }
}

/// One step's device sampling row for a request with `params`: its filters, penalties and
/// logprobs as plain numbers, and the uniform its draw uses, taken from the request's `rng`
/// exactly as the CPU `Sampler` would take it this step (one `next_f64` for a random row,
/// nothing when greedy), so seeded requests get the CPU's tokens. The request-to-device
/// conversion lives here so that `cuda::sampling` never sees request types.
pub fn row_sampling(params: &SamplingParams, rng: &mut Rng) -> RowSampling {
    // Every logprob count a valid request may ask for fits the device sampler, so
    // `SampleBatch::push` never refuses a row for it.
    const {
        assert!(
            crate::request::MAX_LOGPROBS <= crate::cuda::sampling::MAX_TOP_LOGPROBS,
            "the GPU sampler's top-logprob limit is below the request limit"
        );
    }
    let uniform = if params.is_greedy() {
        0.0
    } else {
        rng.next_f64()
    };
    RowSampling {
        temperature: params.temperature,
        top_k: params.top_k,
        top_p: params.top_p,
        min_p: params.min_p,
        penalties: Penalties {
            repetition: params.repetition_penalty,
            presence: params.presence_penalty,
            frequency: params.frequency_penalty,
        },
        num_logprobs: params.logprobs,
        uniform,
    }
}

/// The CUDA executor for activations, weights and KV cache in `T` (f32, bf16 or f16).
pub struct CudaExecutor<T: FloatElem> {
    dev: CudaDevice,
    gemm: Gemm,
    /// The forward pass (and the spec it runs).
    decoder: Decoder,
    w: DeviceWeights<T>,
    /// [rotary_dim / 2], scaling folded in (rope models)
    inv_freq: Option<DeviceBuffer<f32>>,
    /// Where q and k sit in a qkv row and how they rotate (rope models).
    rotary: Option<RotaryLayout>,
    /// [num_heads] (ALiBi models)
    alibi_slopes: Option<DeviceBuffer<f32>>,
    kv: Vec<LayerKv<T>>,
    kv_shape: KvCacheShape,
    /// Step buffers (None only while a step holds them).
    ws: Option<Workspace<T>>,
    /// The packed inputs of the current step (StepLayout), reused.
    host: Vec<u32>,
    /// Logits row of each sampling sequence of the current step, plan order (0, 1, 2, ...:
    /// the first rows of `ws.logits`).
    sample_rows: Vec<usize>,
    /// Samples on the device for `execute_and_sample`.
    sampler: GpuSampler,
    /// Capacity of the step buffers: tokens, sequences, block-table entries per sequence.
    max_tokens: usize,
    max_seqs: usize,
    max_blocks: usize,
    /// Decode batch sizes with a graph (`graph_buckets`).
    buckets: Vec<usize>,
    /// Captured decode graphs per bucket; None: capture failed, that bucket runs eagerly.
    graphs: HashMap<usize, Option<DeviceGraph>>,
    graphs_enabled: bool,
    /// Per-op timings of eager decode steps (`FERRUM_CUDA_PROFILE=1`; graphs off).
    profile: Option<Profile>,
    /// Writes each step's named intermediates (`--dump-intermediates`; graphs off).
    dumper: Option<Dumper>,
    /// Each request's sampling state (`Executor::add_request`).
    seqs: SeqStates<DeviceSeq>,
    /// The sampling rows of the current step, reused.
    sample_batch: SampleBatch,
}

/// A request's sampling state on the GPU executor: its parameters, its RNG (seeded as the CPU
/// sampler's, drawn as the CPU draws), its penalty history (None when every penalty is off) and
/// its `min_tokens` rule.
struct DeviceSeq {
    params: SamplingParams,
    rng: Rng,
    history: Option<TokenHistory>,
    min_tokens: MinTokens,
}

impl<T: FloatElem> CudaExecutor<T> {
    /// Uploads the weights, compiles the kernels, sizes and allocates the KV cache.
    pub fn new(
        dev: CudaDevice,
        spec: DecoderSpec,
        reader: &WeightReader<'_>,
        on_layer: &mut dyn FnMut(usize),
        kv_cfg: &KvCacheConfig,
        opts: &CudaExecOptions,
    ) -> crate::Result<(Self, KvCachePlan)> {
        if spec.head_dim > ops::MAX_DECODE_HEAD_DIM {
            return Err(device_err(format!(
                "{}: head_dim {} is above the CUDA attention kernel's maximum {}",
                spec.arch,
                spec.head_dim,
                ops::MAX_DECODE_HEAD_DIM
            )));
        }
        dev.stream().context().bind_to_thread().map_err(|e| {
            crate::cuda::CudaError::driver("binding the device to the loading thread", e)
        })?;
        dev.warm_up(&[
            KernelId::Embedding,
            KernelId::Norm,
            KernelId::Rotary,
            KernelId::Activation,
            KernelId::KvCache,
            KernelId::Attention,
            KernelId::Elementwise,
        ])?;
        let gemm = Gemm::new(&dev)?;
        let w = DeviceWeights::upload(&dev, reader, on_layer)?;
        let inv_freq = match spec.rope() {
            Some(rope) => Some(dev.upload(&rope.inv_freqs())?),
            None => None,
        };
        let (q_dim, kv_dim) = (spec.q_dim(), spec.kv_dim());
        let rotary = spec.rope().map(|r| RotaryLayout {
            row_stride: q_dim + 2 * kv_dim,
            num_q_heads: spec.num_heads,
            num_kv_heads: spec.num_kv_heads,
            k_offset: q_dim,
            head_dim: spec.head_dim,
            rotary_dim: r.rotary_dim,
            style: r.style,
        });
        let alibi_slopes = match spec.alibi_slopes() {
            Some(slopes) => Some(dev.upload(&slopes)?),
            None => None,
        };
        let (max_tokens, max_seqs) = step_capacity(kv_cfg);
        // Quantized activations of the FP8 products (before the KV cache takes the free memory).
        let fp8_acts = if w.formats.fp8 > 0 {
            let max_k = spec
                .hidden_size
                .max(spec.q_dim())
                .max(spec.intermediate_size);
            Some(Fp8Activations::new(&dev, max_tokens, max_k)?)
        } else {
            None
        };
        dev.synchronize()?;
        let (free_bytes, _) = dev.memory_info()?;
        let plan = plan_kv_blocks(&spec, kv_cfg, T::DTYPE, free_bytes).map_err(device_err)?;
        let kv_shape = KvCacheShape {
            num_blocks: plan.num_blocks,
            block_size: kv_cfg.kv.block_size,
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
        };
        let kv = (0..spec.num_layers)
            .map(|_| {
                Ok(LayerKv {
                    k: dev.alloc_zeros(kv_shape.num_elements())?,
                    v: dev.alloc_zeros(kv_shape.num_elements())?,
                })
            })
            .collect::<Result<Vec<_>, crate::cuda::CudaError>>()?;
        let ws = Workspace::new(&dev, &spec, kv_cfg, max_tokens, max_seqs, fp8_acts)?;
        dev.synchronize()?;
        let profile = opts.profile;
        let graphs_enabled = opts.cuda_graphs && !profile;
        Ok((
            CudaExecutor {
                dev,
                gemm,
                decoder: Decoder::new(spec),
                w,
                inv_freq,
                rotary,
                alibi_slopes,
                kv,
                kv_shape,
                ws: Some(ws),
                host: Vec::new(),
                sample_rows: Vec::new(),
                sampler: GpuSampler::new(),
                max_tokens,
                max_seqs,
                max_blocks: max_blocks_per_seq(kv_cfg),
                buckets: graph_buckets(max_seqs),
                graphs: HashMap::new(),
                graphs_enabled,
                profile: profile.then(Profile::default),
                dumper: None,
                seqs: SeqStates::new(),
                sample_batch: SampleBatch::new(),
            },
            plan,
        ))
    }

    /// Writes every step's named intermediates under `dumper`'s folder; turns graphs off (a
    /// replayed graph has no steps between its ops to copy from).
    pub fn set_dumper(&mut self, dumper: Dumper) {
        self.dumper = Some(dumper);
        self.graphs_enabled = false;
    }

    /// Layer `l`'s weights.
    fn layer(&self, l: usize) -> crate::Result<&DeviceLayer<T>> {
        self.w.layers.get(l).ok_or_else(|| {
            super::batch::ExecutorError::MissingWeight {
                what: format!("layer {l}"),
            }
            .into()
        })
    }

    /// Kernel modules compiled and GEMM shapes planned so far (one-time setup costs).
    pub fn setup_counts(&self) -> (usize, usize) {
        (self.dev.num_modules(), self.gemm.num_plans())
    }
}
impl<T: FloatElem> Drop for CudaExecutor<T> {
    fn drop(&mut self) {
        if let Some(p) = &self.profile {
            eprint!("{}", p.report());
        }
    }
}

impl<T: FloatElem> Executor for CudaExecutor<T> {
    fn describe(&self) -> String {
        let info = self.dev.info();
        format!(
            "cuda:{} ({}, {}, {}, graphs {})",
            info.ordinal,
            info.name,
            info.arch,
            T::DTYPE,
            match self.graphs_enabled {
                true => format!(
                    "on, {} captured",
                    self.graphs.values().filter(|g| g.is_some()).count()
                ),
                false => "off".to_owned(),
            }
        )
    }

    fn num_kv_blocks(&self) -> usize {
        self.kv_shape.num_blocks
    }

    fn block_size(&self) -> usize {
        self.kv_shape.block_size
    }

    fn vocab_size(&self) -> usize {
        self.decoder.spec.vocab_size
    }

    /// The device sampler's per-sequence table has no bad-word rows yet.
    fn bans_words(&self) -> bool {
        false
    }

    fn add_request(&mut self, seq_id: SeqId, setup: &SamplingSetup<'_>) -> crate::Result<()> {
        let p = setup.params;
        // The device sampler's per-sequence table has no bad-word rows yet: refuse rather than
        // generate a word the client banned.
        if !p.bad_words.is_empty() {
            return Err(crate::Error::Engine(format!(
                "bad_words ({} word(s)) is not supported on the GPU yet: the CUDA sampler cannot \
                 ban them; serve the model with device cpu for bad_words, or send none",
                p.bad_words.len()
            )));
        }
        let penalties = Penalties {
            repetition: p.repetition_penalty,
            presence: p.presence_penalty,
            frequency: p.frequency_penalty,
        };
        let vocab_size = self.decoder.spec.vocab_size;
        self.seqs.insert(
            seq_id,
            DeviceSeq {
                params: p.clone(),
                rng: Rng::new(setup.seed),
                history: penalties
                    .is_enabled()
                    .then(|| TokenHistory::new(setup.prompt_ids, vocab_size)),
                min_tokens: MinTokens::new(setup),
            },
        );
        Ok(())
    }

    fn remove_request(&mut self, seq_id: SeqId) {
        self.seqs.remove(&seq_id);
    }

    fn execute(
        &mut self,
        plan: &SchedulePlan,
        overlap: &mut dyn FnMut(),
    ) -> crate::Result<Vec<Sampled>> {
        // This step's sampling rows, from each request's state: its draw consumes the request's
        // RNG exactly as the CPU sampler would (`row_sampling`).
        let mut rows = std::mem::replace(&mut self.sample_batch, SampleBatch::new());
        rows.clear();
        let built = (|| -> crate::Result<()> {
            for s in plan.seqs.iter().filter(|s| s.sample) {
                let seq = seq_state(&mut self.seqs, s.seq_id)?;
                let row = row_sampling(&seq.params, &mut seq.rng);
                rows.push(&row, seq.history.as_ref(), seq.min_tokens.suppressed())?;
            }
            Ok(())
        })();
        let out = built.and_then(|()| self.execute_rows(plan, &rows, overlap));
        self.sample_batch = rows;
        let out = out?;
        for (s, sampled) in plan.seqs.iter().filter(|s| s.sample).zip(&out) {
            let seq = seq_state(&mut self.seqs, s.seq_id)?;
            if let Some(h) = &mut seq.history {
                h.accept(sampled.token_id);
            }
            seq.min_tokens.accept();
        }
        Ok(out)
    }

    fn overlaps(&self) -> bool {
        true
    }

    fn logits(&mut self, plan: &SchedulePlan) -> crate::Result<Logits> {
        // The engine thread is not the loading thread: make the context current here.
        self.dev.stream().context().bind_to_thread().map_err(|e| {
            crate::cuda::CudaError::driver("binding the device to the engine thread", e)
        })?;
        let vocab_size = self.decoder.spec.vocab_size;
        if plan.seqs.is_empty() || plan.num_batched_tokens == 0 {
            return Ok(Logits {
                vocab_size,
                data: vec![],
            });
        }
        let layout = self.pack(plan)?;
        let num_rows = self.sample_rows.len();
        let data = self.with_step(&layout, |exec, ws| {
            if num_rows == 0 {
                return Ok(vec![]);
            }
            ws.acts[Act::Logits.idx()].set_len(num_rows * vocab_size)?;
            Ok(exec
                .dev
                .download(&ws.acts[Act::Logits.idx()])?
                .into_iter()
                .map(T::to_f32)
                .collect())
        })?;
        Ok(Logits { vocab_size, data })
    }
}

impl<T: FloatElem> CudaExecutor<T> {
    /// Runs one step and samples `rows` (one per sampling sequence, plan order) on the device;
    /// `overlap` runs once, after the step and its sampling are queued and before the host waits
    /// for the ids. The warm-up and the tests drive this with rows of their own; `execute` with
    /// the registered requests' rows.
    pub fn execute_rows(
        &mut self,
        plan: &SchedulePlan,
        rows: &SampleBatch,
        overlap: &mut dyn FnMut(),
    ) -> crate::Result<Vec<Sampled>> {
        self.dev.stream().context().bind_to_thread().map_err(|e| {
            crate::cuda::CudaError::driver("binding the device to the engine thread", e)
        })?;
        let vocab_size = self.decoder.spec.vocab_size;
        let num_sampling = plan.seqs.iter().filter(|s| s.sample).count();
        if rows.num_rows() != num_sampling {
            return Err(device_err(format!(
                "{} sampling rows given for a plan with {num_sampling} sampling sequences",
                rows.num_rows()
            )));
        }
        if plan.seqs.is_empty() || plan.num_batched_tokens == 0 {
            return Ok(vec![]);
        }
        let layout = self.pack(plan)?;
        let num_rows = self.sample_rows.len();
        self.with_step(&layout, |exec, ws| {
            if num_rows == 0 {
                // A step of prompt chunks only: nothing to wait for here.
                overlap();
                return Ok(vec![]);
            }
            // Only the ids (and the logprobs asked for) come back.
            ws.acts[Act::Logits.idx()].set_len(num_rows * vocab_size)?;
            exec.sampler
                .sample(&exec.dev, &ws.acts[Act::Logits.idx()], vocab_size, rows)?;
            // The whole step is queued on the stream: the host's other work runs now.
            overlap();
            Ok(exec.sampler.fetch(&exec.dev)?)
        })
    }

    /// `execute_rows` with nothing to overlap.
    pub fn execute_and_sample(
        &mut self,
        plan: &SchedulePlan,
        rows: &SampleBatch,
    ) -> crate::Result<Vec<Sampled>> {
        self.execute_rows(plan, rows, &mut || {})
    }
}

impl<T: FloatElem> CudaExecutor<T> {
    /// Runs the packed step (`launch`), then `finish` on its logits, with the workspace lent
    /// out of `self` for the duration.
    fn with_step<R>(
        &mut self,
        layout: &StepLayout,
        finish: impl FnOnce(&mut Self, &mut Workspace<T>) -> crate::Result<R>,
    ) -> crate::Result<R> {
        let Some(mut ws) = self.ws.take() else {
            return Err(device_err(
                "the step workspace is gone after a failed step".into(),
            ));
        };
        if self.profile.is_some() {
            let setup = self.setup_counts();
            if let Some(p) = &mut self.profile {
                p.wall_start = Some(std::time::Instant::now());
                p.setup_at_start = setup;
            }
        }
        let result = self.launch(&mut ws, layout).and_then(|()| {
            let r = finish(self, &mut ws)?;
            // Eager steps only (graph replays record no events). `finish` has synchronized, so
            // every event is complete; the last mark comes after the host got the results, so
            // its interval is wall time (OpTimes keeps it out of the device total).
            let mut profile = self.profile.take();
            let collected = match &profile {
                Some(p) if p.start.is_some() => self
                    .mark(&mut profile, SAMPLE_WALL_OP)
                    .and_then(|()| Ok(self.dev.synchronize()?))
                    .and_then(|()| match &mut profile {
                        Some(p) => p.collect(layout.num_prefill > 0, self.setup_counts()),
                        None => Ok(()),
                    }),
                _ => Ok(()),
            };
            // The profile survives a failed collection (its totals are kept).
            self.profile = profile;
            collected.map(|()| r)
        });
        self.ws = Some(ws);
        result
    }
}

pub(super) fn device_err(what: String) -> crate::Error {
    super::batch::ExecutorError::Device(what).into()
}

/// Downloads one tapped buffer and writes it (`--dump-intermediates`; eager steps only).
fn dump_tap<T: FloatElem>(
    dev: &CudaDevice,
    dumper: &mut Dumper,
    tap: Tap,
    buf: &DeviceBuffer<T>,
    row_len: usize,
) -> crate::Result<()> {
    let host: Vec<f32> = dev.download(buf)?.into_iter().map(T::to_f32).collect();
    dumper.write(tap, &host, row_len)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn row_sampling_converts_params_and_draws_like_the_cpu() {
        let params = SamplingParams {
            temperature: 0.7,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            repetition_penalty: 1.2,
            presence_penalty: 0.5,
            frequency_penalty: 0.25,
            logprobs: Some(3),
            ..SamplingParams::default()
        };
        let mut rng = Rng::new(9);
        let row = row_sampling(&params, &mut rng);
        // Exactly one next_f64 per random step.
        let mut expected = Rng::new(9);
        assert_eq!(row.uniform, expected.next_f64());
        assert_eq!(rng, expected);
        assert_eq!(
            (row.temperature, row.top_k, row.top_p, row.min_p),
            (0.7, 40, 0.9, 0.05)
        );
        assert_eq!(
            row.penalties,
            Penalties {
                repetition: 1.2,
                presence: 0.5,
                frequency: 0.25,
            }
        );
        assert_eq!(row.num_logprobs, Some(3));
        // Greedy rows draw nothing, and the default request is the plain greedy row.
        let greedy = row_sampling(&SamplingParams::default(), &mut rng);
        assert_eq!(rng, expected);
        assert_eq!(greedy, RowSampling::greedy());
        // The same seed gives the CPU sampler's uniform stream, step after step.
        let mut a = Rng::new(77);
        let mut b = Rng::new(77);
        for _ in 0..5 {
            assert_eq!(row_sampling(&params, &mut a).uniform, b.next_f64());
        }
    }
}
