//! The CUDA executor: the generic decoder's forward pass on one GPU, over a paged KV cache in
//! device memory, behind the same `Executor` trait as the CPU executor.
//!
//! It owns the device, the GEMM engine, the weights (uploaded once from the host
//! `DecoderWeights`, converted to the executor's dtype: bf16, f16 or f32) and one K and one V
//! cache per layer, `[num_blocks, block_size, num_kv_heads, head_dim]` in the same dtype. The
//! forward pass mirrors `model::decoder::Decoder::forward` one step at a time:
//!
//! ```text
//!   x = embedding(ids) (+ learned positions);  x = embedding_norm(x)?
//!   per layer:  n = norm1(x);  qkv = n·Wqkvᵀ (+b);  clip?;  rotary(q, k);  cache[slot] = k, v
//!               (rotary and the cache write are one kernel; a sequential layer's final
//!               x += mlp is fused into the next layer's norm1)
//!               a = attention(q, cache);  p = a·Woᵀ (+b)
//!     Sequential:          x += p;  n = norm2(x)  (one fused kernel);  x += mlp(n)
//!     Parallel{shared}:    x += p + mlp(n)
//!     Parallel{!shared}:   n = norm2(x);  x += p + mlp(n)
//!   logits = lm_head(final_norm(x[sampling rows])) -> host f32
//! ```
//!
//! A step is packed on the host into one u32 array (`StepLayout`: token ids, positions, slots,
//! logits rows, then block tables and lengths of the decode rows and of the prefill chunks),
//! uploaded in one copy and scattered on the device into typed buffers. Tokens are ordered
//! decode rows first, then prefill chunks: decode rows go through split-K (flash-decoding)
//! attention, prefill chunks (q_len > 1, chunked prefill against cached blocks included)
//! through the flash prefill kernel. Every step buffer, the split-K workspace included, is
//! allocated once at construction for `max_num_batched_tokens` / `max_num_seqs` (`Workspace`)
//! and reused at fixed addresses, so pure decode steps are captured as CUDA graphs per
//! batch-size bucket (`graph_buckets`; padded rows are inert) and replayed: one upload, one
//! graph launch, one logits download per step. Prefill and mixed steps run eagerly. The only
//! host sync of a step is the final copy back: the sampled ids and logprobs
//! (`execute_and_sample`, the GPU sampler), or the f32 logits of the sampling rows (`execute`).
//!
//! Before the first request, `warm_up` runs one prefill and one decode step per graph bucket on
//! scratch tokens, so that kernel compilation, GEMM planning and graph capture happen at load
//! instead of in the first requests' latency.
//!
//! Environment: `FERRUM_CUDA_GRAPHS=0` runs decode eagerly; `FERRUM_CUDA_WARMUP=0` skips the
//! load-time warm-up; `FERRUM_CUDA_PROFILE=1` (graphs
//! off) times every op of every step with CUDA events and prints per-op tables, decode steps
//! apart from steps with prefill, with the host wall time per step, when the executor is dropped.
//! Steps that compiled a kernel or planned a GEMM shape (one-time costs) are left out.
//!
//! The KV cache is sized once, at construction (`plan_kv_blocks`). This module never panics on
//! plan data (a short block table or a plan over the step capacity is an error) and holds no
//! `unsafe`: every device call goes
//! through the checked launchers of `crate::cuda`.

use std::collections::HashMap;

use half::{bf16, f16};

use super::{Executor, Logits};
use crate::cuda::attention::{
    PrefillKernel, PrefillSeqs, SplitKPlan, SplitKWorkspace, paged_attention_decode_splitk,
    paged_attention_prefill, splitk_supported,
};
use crate::cuda::elementwise;
use crate::cuda::gemm::{gated_gemv, gated_gemv_applies, tuned_m};
use crate::cuda::ops::{
    self, BlockTables, DecodeAttention, KvCacheShape, KvSource, LearnedPositions, PagedKv,
    RotaryLayout,
};
use crate::cuda::sampling::{GpuSampler, RowSampling, SampleBatch};
use crate::cuda::{CudaDevice, DeviceBuffer, DeviceGraph, FloatElem, Gemm, GemmShape, KernelId};
use crate::dtype::DType;
use crate::model::spec::{DecoderSpec, Mlp, PosEmbedding, Residual};
use crate::model::weights::{DecoderWeights, LayerWeights, NormWeights};
use crate::ops::linear::Weight;
use crate::request::SamplingParams;
use crate::sampling::{Penalties, Rng, Sampled};
use crate::scheduler::SchedulePlan;

/// Default fraction of free GPU memory given to the KV cache (tensorrtllm_backend's default).
pub const DEFAULT_KV_CACHE_FREE_GPU_MEM_FRACTION: f32 = 0.9;

/// Device memory kept free beside the activation estimate: CUDA context growth, cuBLAS(Lt)
/// internals, the stream-ordered allocator's rounding.
pub const RESERVED_GPU_BYTES: usize = 256 << 20;

/// How to size the paged KV cache.
#[derive(Debug, Clone, PartialEq)]
pub struct KvCacheConfig {
    pub block_size: usize,
    /// Capacity in tokens (rounded up to whole blocks); None: from the memory fraction alone.
    pub max_tokens: Option<usize>,
    /// Fraction of the free memory (after weights and the activation workspace) for the cache.
    pub free_gpu_mem_fraction: f32,
    /// Step token budget: the activation workspace is estimated for this many tokens.
    pub max_num_batched_tokens: usize,
    pub max_num_seqs: usize,
    pub max_model_len: usize,
}

/// What the KV cache sizing decided, and from which numbers (for the load log).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KvCachePlan {
    pub num_blocks: usize,
    /// K and V of every layer for one block.
    pub bytes_per_block: usize,
    pub free_bytes: usize,
    pub workspace_bytes: usize,
    /// Which bound decided `num_blocks`: "memory fraction", "max_tokens_in_paged_kv_cache" or
    /// "max_num_seqs x max_model_len".
    pub limited_by: &'static str,
}

impl KvCachePlan {
    pub fn describe(&self, cfg: &KvCacheConfig) -> String {
        format!(
            "KV cache: {} blocks of {} tokens ({:.1} MiB, {} bytes/block; limited by {}; free after weights {:.1} MiB, activation workspace {:.1} MiB, fraction {})",
            self.num_blocks,
            cfg.block_size,
            (self.num_blocks * self.bytes_per_block) as f64 / 1048576.0,
            self.bytes_per_block,
            self.limited_by,
            self.free_bytes as f64 / 1048576.0,
            self.workspace_bytes as f64 / 1048576.0,
            cfg.free_gpu_mem_fraction
        )
    }
}

/// Bytes of K and V, all layers, for one block of `block_size` tokens in `dtype`.
pub fn kv_bytes_per_block(spec: &DecoderSpec, block_size: usize, dtype: DType) -> usize {
    spec.num_layers * 2 * block_size * spec.kv_dim() * dtype.size_in_bytes()
}

/// Device memory one step of `cfg.max_num_batched_tokens` tokens needs beside weights and cache:
/// activations of one layer (reused across layers), step inputs, the sampling rows' logits,
/// plus `RESERVED_GPU_BYTES`.
pub fn activation_workspace_bytes(spec: &DecoderSpec, cfg: &KvCacheConfig, dtype: DType) -> usize {
    let (h, q, kv, inter) = (
        spec.hidden_size,
        spec.q_dim(),
        spec.kv_dim(),
        spec.intermediate_size,
    );
    let gate_up = match spec.mlp {
        Mlp::Gated => 2 * inter,
        Mlp::Plain => inter,
    };
    // x, normed, qkv, attn, attn_proj, gate_up, act, mlp_out (Workspace, per token)
    let per_token_elems = h + h + (q + 2 * kv) + q + h + gate_up + inter + h;
    let mb = max_blocks_per_seq(cfg);
    let m = cfg.max_num_batched_tokens.max(cfg.max_num_seqs);
    let seqs = cfg.max_num_seqs.max(1);
    // token ids, positions, slots (i64) and their packed words
    let per_token_inputs = 4 + 4 + 8 + 16;
    // per sequence: last, last_normed, logits rows; decode and prefill tables, typed and packed;
    // the per-sequence lengths
    let per_seq = (2 * h + spec.vocab_size) * dtype.size_in_bytes() + 4 * (4 * mb + 16);
    // split-K partials: at most (SMs * 8 CTAs * 8 heads per CTA) + one per (sequence, head),
    // bounded here for 256 SMs, each (head_dim + 2) f32.
    let splitk = (256 * 8 * 8 + seqs * spec.num_heads) * (spec.head_dim + 2) * 4;
    m * (per_token_elems * dtype.size_in_bytes() + per_token_inputs)
        + seqs * per_seq
        + splitk
        + RESERVED_GPU_BYTES
}

/// The number of KV blocks: the smallest of what `free_gpu_mem_fraction` of the memory left
/// after the activation workspace holds, what `max_tokens` asks for, and what `max_num_seqs`
/// sequences of `max_model_len` tokens can ever use. Fails, naming the numbers, when not one
/// block fits.
pub fn plan_kv_blocks(
    spec: &DecoderSpec,
    cfg: &KvCacheConfig,
    dtype: DType,
    free_bytes: usize,
) -> Result<KvCachePlan, String> {
    let f = cfg.free_gpu_mem_fraction;
    if !(f > 0.0 && f <= 1.0) {
        return Err(format!(
            "kv_cache_free_gpu_mem_fraction = {f} must be in (0, 1]"
        ));
    }
    if cfg.block_size == 0 {
        return Err("block_size must be > 0".into());
    }
    let bytes_per_block = kv_bytes_per_block(spec, cfg.block_size, dtype);
    let workspace_bytes = activation_workspace_bytes(spec, cfg, dtype);
    let budget = (free_bytes.saturating_sub(workspace_bytes) as f64 * f as f64) as usize;
    let by_memory = budget / bytes_per_block.max(1);
    let mut limits = vec![(by_memory, "memory fraction")];
    if let Some(t) = cfg.max_tokens {
        limits.push((t.div_ceil(cfg.block_size), "max_tokens_in_paged_kv_cache"));
    }
    limits.push((
        cfg.max_num_seqs * cfg.max_model_len.div_ceil(cfg.block_size),
        "max_num_seqs x max_model_len",
    ));
    let (num_blocks, limited_by) = limits
        .into_iter()
        .min_by_key(|&(n, _)| n)
        .unwrap_or((by_memory, "memory fraction"));
    if num_blocks == 0 {
        return Err(format!(
            "no KV cache block fits: {free_bytes} bytes free after the weights, {workspace_bytes} \
             bytes of activation workspace for max_num_batched_tokens {}, fraction {f}, \
             {bytes_per_block} bytes per block of {} tokens; lower max_num_batched_tokens or \
             use a smaller dtype",
            cfg.max_num_batched_tokens, cfg.block_size
        ));
    }
    Ok(KvCachePlan {
        num_blocks,
        bytes_per_block,
        free_bytes,
        workspace_bytes,
        limited_by,
    })
}

/// How the executor runs steps (beside the KV cache sizing).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CudaExecOptions {
    /// Capture pure decode steps as CUDA graphs per batch-size bucket and replay them.
    pub cuda_graphs: bool,
    /// Time every op of eager decode steps with CUDA events; the table is printed to stderr
    /// when the executor is dropped. Turns graphs off.
    pub profile: bool,
    /// Run `CudaExecutor::warm_up` at load (compile, plan and capture before the first request).
    pub warm_up: bool,
}

impl Default for CudaExecOptions {
    fn default() -> Self {
        CudaExecOptions {
            cuda_graphs: true,
            profile: false,
            warm_up: true,
        }
    }
}

impl CudaExecOptions {
    /// The defaults, overridden by the environment (`overridden_by_env`).
    pub fn from_env() -> Self {
        CudaExecOptions::default().overridden_by_env()
    }

    /// These options, each overridden by its environment variable when set:
    /// `FERRUM_CUDA_GRAPHS`, `FERRUM_CUDA_WARMUP`, `FERRUM_CUDA_PROFILE` (`0`, `false`, `off` or
    /// empty: off; anything else: on). For measurements and debugging; models set the first two
    /// with `cuda_graph_mode` and `cuda_warmup`.
    pub fn overridden_by_env(self) -> Self {
        self.overridden_by(|name| std::env::var(name).ok())
    }

    /// `overridden_by_env` with the variables read from `var`.
    pub fn overridden_by(self, var: impl Fn(&str) -> Option<String>) -> Self {
        let flag =
            |name: &str| var(name).map(|v| !matches!(v.as_str(), "" | "0" | "false" | "off"));
        CudaExecOptions {
            cuda_graphs: flag("FERRUM_CUDA_GRAPHS").unwrap_or(self.cuda_graphs),
            profile: flag("FERRUM_CUDA_PROFILE").unwrap_or(self.profile),
            warm_up: flag("FERRUM_CUDA_WARMUP").unwrap_or(self.warm_up),
        }
    }
}

/// A CUDA executor as `open` returns it, with what its construction decided (for the load log).
pub struct OpenedExecutor {
    pub executor: Box<dyn Executor>,
    pub plan: KvCachePlan,
    /// None when the warm-up was turned off (`CudaExecOptions::warm_up`).
    pub warm_up: Option<WarmUpReport>,
}

/// Opens a CUDA executor on `dev` for `dtype`: uploads `weights`, sizes and allocates the KV
/// cache, then warms it up (`CudaExecutor::warm_up`). Options from the environment
/// (`CudaExecOptions::from_env`).
pub fn open(
    dev: CudaDevice,
    spec: DecoderSpec,
    weights: DecoderWeights,
    dtype: DType,
    kv: &KvCacheConfig,
) -> crate::Result<OpenedExecutor> {
    open_with(dev, spec, weights, dtype, kv, &CudaExecOptions::from_env())
}

/// `open` with explicit options.
pub fn open_with(
    dev: CudaDevice,
    spec: DecoderSpec,
    weights: DecoderWeights,
    dtype: DType,
    kv: &KvCacheConfig,
    opts: &CudaExecOptions,
) -> crate::Result<OpenedExecutor> {
    fn finish<T: FloatElem>(
        (mut e, plan): (CudaExecutor<T>, KvCachePlan),
        opts: &CudaExecOptions,
    ) -> crate::Result<OpenedExecutor> {
        let warm_up = opts.warm_up.then(|| e.warm_up()).transpose()?;
        Ok(OpenedExecutor {
            executor: Box::new(e),
            plan,
            warm_up,
        })
    }
    match dtype {
        DType::F32 => finish(
            CudaExecutor::<f32>::new(dev, spec, weights, kv, opts)?,
            opts,
        ),
        DType::BF16 => finish(
            CudaExecutor::<bf16>::new(dev, spec, weights, kv, opts)?,
            opts,
        ),
        DType::F16 => finish(
            CudaExecutor::<f16>::new(dev, spec, weights, kv, opts)?,
            opts,
        ),
    }
}

/// The scratch steps of `CudaExecutor::warm_up`: one prefill of as many tokens as a step and a
/// sequence's blocks allow (none under 2 tokens: a 1-token chunk is a decode), and one decode
/// step per graph bucket, largest first (batch 1 without graphs), every sequence a single token
/// at position 0 of block 0. All of them write only the first blocks of the cache.
#[derive(Debug, Clone, PartialEq)]
struct WarmUpPlans {
    prefill: Option<SchedulePlan>,
    decode: Vec<SchedulePlan>,
}

impl WarmUpPlans {
    /// `max_tokens`: the step's token capacity; `num_blocks`: blocks one sequence may use (the
    /// cache's, capped by max_model_len); `buckets`: the decode graph buckets (empty: no graphs).
    fn new(max_tokens: usize, num_blocks: usize, block_size: usize, buckets: &[usize]) -> Self {
        let scratch = |i: usize, tokens: usize| crate::scheduler::ScheduledSeq {
            seq_id: crate::request::SeqId(i as u64),
            token_ids: vec![0; tokens],
            start_pos: 0,
            block_table: (0..tokens.div_ceil(block_size.max(1)))
                .map(|b| crate::kv_cache::BlockId(b as u32))
                .collect(),
            sample: true,
        };
        let plan = |seqs: Vec<crate::scheduler::ScheduledSeq>| SchedulePlan {
            num_batched_tokens: seqs.iter().map(|s| s.token_ids.len()).sum(),
            seqs,
            preempted: vec![],
        };
        let prefill_tokens = max_tokens.min(num_blocks * block_size);
        WarmUpPlans {
            prefill: (prefill_tokens >= 2).then(|| plan(vec![scratch(0, prefill_tokens)])),
            decode: match buckets {
                [] => vec![1],
                _ => buckets.iter().rev().copied().collect(),
            }
            .into_iter()
            .map(|b| plan((0..b).map(|i| scratch(i, 1)).collect()))
            .collect(),
        }
    }
}

/// What `CudaExecutor::warm_up` did, for the load log.
#[derive(Debug, Clone, PartialEq)]
pub struct WarmUpReport {
    /// Tokens of the scratch prefill (0: none fit, e.g. max_num_batched_tokens 1).
    pub prefill_tokens: usize,
    /// Decode batch sizes stepped (the graph buckets, or batch 1 without graphs).
    pub decode_batches: Vec<usize>,
    /// Kernel modules compiled, GEMM shapes planned and graphs captured by the warm-up.
    pub modules_compiled: usize,
    pub gemm_plans: usize,
    pub graphs_captured: usize,
    pub seconds: f64,
}

impl WarmUpReport {
    pub fn describe(&self) -> String {
        format!(
            "CUDA warm-up: prefill of {} tokens, decode batches {:?}: compiled {} kernel modules, planned {} GEMM shapes, captured {} graphs in {:.2} s",
            self.prefill_tokens,
            self.decode_batches,
            self.modules_compiled,
            self.gemm_plans,
            self.graphs_captured,
            self.seconds
        )
    }
}

struct DeviceNorm<T> {
    /// [dim]
    weight: DeviceBuffer<T>,
    /// [dim]
    bias: Option<DeviceBuffer<T>>,
}

struct DeviceLinear<T> {
    /// [n = out_features, k = in_features]
    w: DeviceBuffer<T>,
    /// [n]
    bias: Option<DeviceBuffer<T>>,
    n: usize,
    k: usize,
}

struct DeviceLayer<T> {
    attn_norm: DeviceNorm<T>,
    mlp_norm: Option<DeviceNorm<T>>,
    /// [q_dim + 2 kv_dim, hidden]
    qkv: DeviceLinear<T>,
    /// [hidden, q_dim]
    attn_out: DeviceLinear<T>,
    /// [2 inter, hidden] (gated) or [inter, hidden]
    gate_up: DeviceLinear<T>,
    /// [hidden, inter]
    down: DeviceLinear<T>,
}

struct DeviceWeights<T> {
    /// [vocab, hidden]; also the LM head when tied.
    embedding: DeviceBuffer<T>,
    /// [num_positions, hidden]
    position_embedding: Option<DeviceBuffer<T>>,
    embedding_norm: Option<DeviceNorm<T>>,
    final_norm: DeviceNorm<T>,
    /// [vocab, hidden]; None when tied to `embedding`.
    lm_head: Option<DeviceBuffer<T>>,
    /// [vocab]
    lm_head_bias: Option<DeviceBuffer<T>>,
    layers: Vec<DeviceLayer<T>>,
}

/// One layer's paged cache.
struct LayerKv<T> {
    /// [num_blocks, block_size, num_kv_heads, head_dim]
    k: DeviceBuffer<T>,
    /// [num_blocks, block_size, num_kv_heads, head_dim]
    v: DeviceBuffer<T>,
}

/// Decode batch sizes that get a CUDA graph of their own: powers of two up to `max_num_seqs`,
/// then `max_num_seqs` itself. A decode step of n sequences replays the smallest bucket >= n,
/// its padding rows inert (no cache write, empty context, logits discarded).
pub fn graph_buckets(max_num_seqs: usize) -> Vec<usize> {
    let mut buckets: Vec<usize> = std::iter::successors(Some(1usize), |&b| b.checked_mul(2))
        .take_while(|&b| b < max_num_seqs)
        .collect();
    if max_num_seqs > 0 {
        buckets.push(max_num_seqs);
    }
    buckets
}

/// Tokens and sequences the step buffers hold: a step of max_num_seqs decodes fits even when
/// max_num_batched_tokens is smaller.
fn step_capacity(cfg: &KvCacheConfig) -> (usize, usize) {
    let max_seqs = cfg.max_num_seqs.max(1);
    (cfg.max_num_batched_tokens.max(max_seqs), max_seqs)
}

/// Block-table entries per sequence in the step inputs: enough for `max_model_len` tokens.
fn max_blocks_per_seq(cfg: &KvCacheConfig) -> usize {
    cfg.max_model_len.div_ceil(cfg.block_size.max(1)).max(1)
}

/// Query heads as the attention kernels see them.
fn attention_params(spec: &DecoderSpec) -> DecodeAttention {
    DecodeAttention {
        num_heads: spec.num_heads,
        num_kv_heads: spec.num_kv_heads,
        head_dim: spec.head_dim,
        scale: spec.attn_scale,
        sliding_window: spec.sliding_window,
    }
}

/// Partials the split-K workspace must hold so that every batch of 1..=max_num_seqs decode rows
/// can split as `SplitKPlan::choose` says for contexts up to max_model_len.
fn splitk_capacity(spec: &DecoderSpec, cfg: &KvCacheConfig, num_sms: usize, dtype: DType) -> usize {
    let p = attention_params(spec);
    (1..=cfg.max_num_seqs.max(1))
        .map(|n| {
            let plan = SplitKPlan::choose(num_sms, dtype, n, &p, cfg.max_model_len);
            if plan.num_splits > 1 {
                n * spec.num_heads * plan.num_splits
            } else {
                0
            }
        })
        .max()
        .unwrap_or(0)
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

/// Whether decode attention goes through split-K for this head size and qkv row: 16-byte rows
/// of q and of the cache in T (attention_splitk.cu is compiled per dtype, so only T's rows
/// matter: f32 takes head_dim 12, bf16/f16 do not). Other head sizes take the
/// one-CTA-per-(sequence, head) decode kernel.
fn use_splitk<T: FloatElem>(head_dim: usize, qkv_dim: usize) -> bool {
    splitk_supported(T::DTYPE, head_dim) && (qkv_dim * T::DTYPE.size_in_bytes()) % 16 == 0
}

/// Where each array of one step sits in the packed upload (offsets in u32 words), and the
/// step's sizes. Tokens are ordered decode rows first (one per decode sequence, plan order),
/// then the prefill chunks (plan order), so that split-K decode reads a prefix of the batch and
/// the prefill kernel the rest.
///
/// ```text
///   packed: [token_ids m][positions m][slots 2m (i64)][logits_rows r]
///           [dec_context_lens d][dec_tables d * mb][pre_q_starts p][pre_q_lens p]
///           [pre_context_lens p][pre_tables p * mb]
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct StepLayout {
    /// Batch rows (tokens), padding included.
    num_tokens: usize,
    /// Decode rows (= sequences with one query token), padding included.
    num_decode: usize,
    /// Prefill sequences (q_len > 1).
    num_prefill: usize,
    max_q_len: usize,
    /// Longest decode context (sizes the split-K plan).
    max_decode_context: usize,
    /// Rows of logits computed.
    num_rows: usize,
    /// The graph bucket this decode step replays, if any.
    bucket: Option<usize>,
    num_words: usize,
}

impl StepLayout {
    fn offsets(&self, mb: usize) -> [usize; 11] {
        let (m, d, p, r) = (
            self.num_tokens,
            self.num_decode,
            self.num_prefill,
            self.num_rows,
        );
        let sizes = [m, m, 2 * m, r, d, d * mb, p, p, p, p * mb];
        let mut offs = [0usize; 11];
        for (i, s) in sizes.iter().enumerate() {
            offs[i + 1] = offs[i] + s;
        }
        offs
    }
}

/// What `pack_step` needs to know of the executor.
struct StepLimits<'a> {
    block_size: usize,
    num_blocks: usize,
    /// Block-table entries per sequence.
    max_blocks: usize,
    max_tokens: usize,
    max_seqs: usize,
    /// Decode graph buckets (empty: no graphs).
    buckets: &'a [usize],
}

/// Flattens the plan into `host` (the packed upload, see `StepLayout`) and `sample_rows` (the
/// logits row of each sampling sequence, plan order); checks every block table covers its
/// chunk and fits the step buffers.
fn pack_step(
    plan: &SchedulePlan,
    lim: &StepLimits<'_>,
    host: &mut Vec<u32>,
    sample_rows: &mut Vec<usize>,
) -> crate::Result<StepLayout> {
    let bs = lim.block_size;
    let mb = lim.max_blocks;
    let num_tokens = plan.num_batched_tokens;
    if num_tokens > lim.max_tokens {
        return Err(device_err(format!(
            "plan of {num_tokens} batched tokens exceeds the executor's max_num_batched_tokens {}",
            lim.max_tokens
        )));
    }
    if plan.seqs.len() > lim.max_seqs {
        return Err(device_err(format!(
            "plan of {} sequences exceeds the executor's max_num_seqs {}",
            plan.seqs.len(),
            lim.max_seqs
        )));
    }
    let mut num_decode = 0;
    let mut num_prefill = 0;
    let mut max_q_len = 0;
    let mut max_decode_context = 0;
    let mut counted = 0;
    for s in &plan.seqs {
        let end = s.start_pos + s.token_ids.len();
        let needed = end.div_ceil(bs);
        if s.block_table.len() < needed {
            return Err(device_err(format!(
                "sequence {:?}: block table of {} blocks of {bs} does not cover positions up to {end}",
                s.seq_id,
                s.block_table.len()
            )));
        }
        if needed > mb {
            return Err(device_err(format!(
                "sequence {:?}: {end} tokens exceed max_model_len ({mb} blocks of {bs})",
                s.seq_id
            )));
        }
        if i32::try_from(end).is_err() {
            return Err(device_err(format!("position {end} does not fit in i32")));
        }
        counted += s.token_ids.len();
        match s.token_ids.len() {
            0 => {}
            1 => {
                num_decode += 1;
                max_decode_context = max_decode_context.max(end);
            }
            q => {
                num_prefill += 1;
                max_q_len = max_q_len.max(q);
            }
        }
    }
    if counted != num_tokens {
        return Err(device_err(format!(
            "plan counts {num_tokens} batched tokens but its sequences hold {counted}"
        )));
    }
    let num_sampling = plan.seqs.iter().filter(|s| s.sample).count();
    // A pure decode step replays the graph of its bucket.
    let bucket = match num_prefill {
        0 if num_decode > 0 => lim.buckets.iter().copied().find(|&b| b >= num_decode),
        _ => None,
    };
    let (num_tokens, num_decode_rows, num_rows) = match bucket {
        Some(b) => (b, b, b),
        None => (num_tokens, num_decode, num_sampling),
    };
    let mut layout = StepLayout {
        num_tokens,
        num_decode: num_decode_rows,
        num_prefill,
        max_q_len,
        max_decode_context,
        num_rows,
        bucket,
        num_words: 0,
    };
    let o = layout.offsets(mb);
    layout.num_words = o[10];
    host.clear();
    host.resize(layout.num_words, 0);
    // Padding defaults: slot -1 (not written), tables -1, context 0, identity logits rows.
    for w in &mut host[o[2]..o[3]] {
        *w = u32::MAX;
    }
    for w in &mut host[o[5]..o[6]] {
        *w = u32::MAX;
    }
    for w in &mut host[o[9]..o[10]] {
        *w = u32::MAX;
    }
    sample_rows.clear();
    let (mut dec_idx, mut pre_idx) = (0usize, 0usize);
    let mut pre_row = num_decode_rows;
    for s in &plan.seqs {
        let q_len = s.token_ids.len();
        if q_len == 0 {
            continue;
        }
        let first_row = if q_len == 1 { dec_idx } else { pre_row };
        let ctx = s.start_pos + q_len;
        let table_off = if q_len == 1 {
            o[5] + dec_idx * mb
        } else {
            o[9] + pre_idx * mb
        };
        for (i, b) in s.block_table.iter().take(ctx.div_ceil(bs)).enumerate() {
            let id = i32::try_from(b.0)
                .ok()
                .filter(|&id| (id as usize) < lim.num_blocks)
                .ok_or_else(|| {
                    device_err(format!(
                        "sequence {:?}: block id {} outside the cache's {} blocks",
                        s.seq_id, b.0, lim.num_blocks
                    ))
                })?;
            host[table_off + i] = id as u32;
        }
        for (i, &id) in s.token_ids.iter().enumerate() {
            let pos = s.start_pos + i;
            let row = first_row + i;
            host[o[0] + row] = id;
            host[o[1] + row] = pos as u32;
            let block = host[table_off + pos / bs] as u64;
            let slot = block * bs as u64 + (pos % bs) as u64;
            host[o[2] + 2 * row] = slot as u32;
            host[o[2] + 2 * row + 1] = (slot >> 32) as u32;
        }
        let last_row = first_row + q_len - 1;
        if s.sample {
            // Logits row k is the k-th sampling sequence of the plan.
            host[o[3] + sample_rows.len()] = last_row as u32;
            sample_rows.push(sample_rows.len());
        }
        if q_len == 1 {
            host[o[4] + dec_idx] = ctx as u32;
            dec_idx += 1;
        } else {
            host[o[6] + pre_idx] = first_row as u32;
            host[o[7] + pre_idx] = q_len as u32;
            host[o[8] + pre_idx] = ctx as u32;
            pre_idx += 1;
            pre_row += q_len;
        }
    }
    // A graph computes logits for every bucket row: the rows past the sampling ones repeat
    // batch row 0 (discarded).
    Ok(layout)
}

/// Device buffers of one step, allocated once at executor creation for the largest step and
/// reused (`DeviceBuffer::set_len` picks the prefix in use): no allocation per step, and fixed
/// addresses for graph replays.
struct Workspace<T> {
    /// [tokens, hidden] the residual stream
    x: DeviceBuffer<T>,
    /// [tokens, hidden]
    normed: DeviceBuffer<T>,
    /// [tokens, q_dim + 2 kv_dim]
    qkv: DeviceBuffer<T>,
    /// [tokens, q_dim]
    attn: DeviceBuffer<T>,
    /// [tokens, hidden]
    attn_proj: DeviceBuffer<T>,
    /// [tokens, 2 inter] (gated) or [tokens, inter]
    gate_up: DeviceBuffer<T>,
    /// [tokens, inter] (gated only)
    act: DeviceBuffer<T>,
    /// [tokens, hidden]
    mlp_out: DeviceBuffer<T>,
    /// [rows, hidden]
    last: DeviceBuffer<T>,
    /// [rows, hidden]
    last_normed: DeviceBuffer<T>,
    /// [rows, vocab]
    logits: DeviceBuffer<T>,
    /// the packed step inputs (StepLayout), one upload per step
    packed: DeviceBuffer<u32>,
    /// [tokens]
    token_ids: DeviceBuffer<u32>,
    /// [tokens]
    positions: DeviceBuffer<u32>,
    /// [tokens] cache slot of each token (-1: padding, not written)
    slots: DeviceBuffer<i64>,
    /// [rows] batch row of each logits row
    logits_rows: DeviceBuffer<u32>,
    /// [decode seqs]
    dec_context_lens: DeviceBuffer<i32>,
    /// [decode seqs, mb]
    dec_tables: DeviceBuffer<i32>,
    /// [prefill seqs]
    pre_q_starts: DeviceBuffer<i32>,
    /// [prefill seqs]
    pre_q_lens: DeviceBuffer<i32>,
    /// [prefill seqs]
    pre_context_lens: DeviceBuffer<i32>,
    /// [prefill seqs, mb]
    pre_tables: DeviceBuffer<i32>,
    splitk: Option<SplitKWorkspace>,
}

impl<T: FloatElem> Workspace<T> {
    fn new(
        dev: &CudaDevice,
        spec: &DecoderSpec,
        cfg: &KvCacheConfig,
        tokens: usize,
        seqs: usize,
    ) -> crate::Result<Self> {
        let (h, q, kv, inter) = (
            spec.hidden_size,
            spec.q_dim(),
            spec.kv_dim(),
            spec.intermediate_size,
        );
        let mb = max_blocks_per_seq(cfg);
        let gate_up = match spec.mlp {
            Mlp::Gated => 2 * inter,
            Mlp::Plain => inter,
        };
        let act = match spec.mlp {
            Mlp::Gated => inter,
            Mlp::Plain => 0,
        };
        let splitk_partials = splitk_capacity(spec, cfg, dev.info().num_multiprocessors, T::DTYPE);
        // Split-K serves every decode (one split writes out directly, with no partials), so
        // the workspace exists whenever the head size allows it, empty for short contexts.
        let splitk = if use_splitk::<T>(spec.head_dim, spec.q_dim() + 2 * spec.kv_dim()) {
            Some(SplitKWorkspace::new(
                dev,
                splitk_partials,
                1,
                spec.head_dim,
                1,
            )?)
        } else {
            None
        };
        Ok(Workspace {
            x: dev.alloc_zeros(tokens * h)?,
            normed: dev.alloc_zeros(tokens * h)?,
            qkv: dev.alloc_zeros(tokens * (q + 2 * kv))?,
            attn: dev.alloc_zeros(tokens * q)?,
            attn_proj: dev.alloc_zeros(tokens * h)?,
            gate_up: dev.alloc_zeros(tokens * gate_up)?,
            act: dev.alloc_zeros(tokens * act)?,
            mlp_out: dev.alloc_zeros(tokens * h)?,
            last: dev.alloc_zeros(seqs * h)?,
            last_normed: dev.alloc_zeros(seqs * h)?,
            logits: dev.alloc_zeros(seqs * spec.vocab_size)?,
            packed: dev.alloc_zeros(packed_words(tokens, seqs, mb))?,
            token_ids: dev.alloc_zeros(tokens)?,
            positions: dev.alloc_zeros(tokens)?,
            slots: dev.alloc_zeros(tokens)?,
            logits_rows: dev.alloc_zeros(seqs)?,
            dec_context_lens: dev.alloc_zeros(seqs)?,
            dec_tables: dev.alloc_zeros(seqs * mb)?,
            pre_q_starts: dev.alloc_zeros(seqs)?,
            pre_q_lens: dev.alloc_zeros(seqs)?,
            pre_context_lens: dev.alloc_zeros(seqs)?,
            pre_tables: dev.alloc_zeros(seqs * mb)?,
            splitk,
        })
    }
}

/// Words of the largest packed upload (StepLayout).
fn packed_words(tokens: usize, seqs: usize, mb: usize) -> usize {
    4 * tokens + seqs + 2 * seqs * (mb + 1) + 2 * seqs
}

/// Per-op device time of eager steps, from CUDA events (`FERRUM_CUDA_PROFILE=1`), kept apart
/// for pure decode steps and steps with prefill, with each step's host wall time beside it.
#[derive(Default)]
struct Profile {
    /// Events of the current step: (op, event recorded after it).
    marks: Vec<(&'static str, cudarc::driver::CudaEvent)>,
    start: Option<cudarc::driver::CudaEvent>,
    /// Host clock at the start of the current step's `execute*` call.
    wall_start: Option<std::time::Instant>,
    /// Host clock when the previous step's `execute*` call returned.
    last_return: Option<std::time::Instant>,
    /// Kernel modules and GEMM plans when the current step started: a step that compiled a
    /// kernel or planned a GEMM shape pays a one-time cost and is left out of the totals.
    setup_at_start: (usize, usize),
    /// Steps left out for that reason.
    num_setup_steps: usize,
    decode: OpTimes,
    prefill: OpTimes,
}

/// The profile's last op of a step: sampling and the copy of its results to the host, timed
/// until the host has them (so wall time, not device time: left out of the device total).
const SAMPLE_WALL_OP: &str = "sample + copy back (wall)";

/// Totals of one kind of step.
#[derive(Default)]
struct OpTimes {
    /// op -> (total ms, launches)
    totals: Vec<(&'static str, f64, usize)>,
    num_steps: usize,
    /// Wall time inside `execute*` (host packing + device + sampling + copies).
    call_ms: f64,
    /// Wall time between the previous call's return and this call (the engine's host work).
    gap_ms: f64,
}

impl OpTimes {
    fn add(&mut self, op: &'static str, ms: f64) {
        match self.totals.iter_mut().find(|(o, _, _)| *o == op) {
            Some(t) => {
                t.1 += ms;
                t.2 += 1;
            }
            None => self.totals.push((op, ms, 1)),
        }
    }

    /// A table of per-op time per step, largest first.
    fn report(&self, kind: &str) -> String {
        let steps = self.num_steps.max(1) as f64;
        let total: f64 = self
            .totals
            .iter()
            .filter(|t| t.0 != SAMPLE_WALL_OP)
            .map(|t| t.1)
            .sum();
        let mut rows = self.totals.clone();
        rows.sort_by(|a, b| b.1.total_cmp(&a.1));
        let mut s = format!(
            "ferrum cuda profile, {kind} steps: {} steps, {:.3} ms/step of device time, \
             {:.3} ms/step wall in the executor, {:.3} ms/step of engine host work between steps\n",
            self.num_steps,
            total / steps,
            self.call_ms / steps,
            self.gap_ms / steps,
        );
        for (op, ms, n) in rows {
            s.push_str(&format!(
                "  {op:<24} {:>9.3} ms/step {:>6.1}% {:>7.1} launches/step\n",
                ms / steps,
                100.0 * ms / total.max(1e-12),
                n as f64 / steps
            ));
        }
        s
    }
}

impl Profile {
    /// Reads the events of the step just finished (its work must be complete) into the totals;
    /// `setup_now` is (kernel modules, GEMM plans) now, compared with the step's start.
    fn collect(&mut self, with_prefill: bool, setup_now: (usize, usize)) -> crate::Result<()> {
        if setup_now != self.setup_at_start {
            // One-time compiles or GEMM planning ran inside this step: not representative.
            self.marks.clear();
            self.start = None;
            self.wall_start = None;
            self.last_return = Some(std::time::Instant::now());
            self.num_setup_steps += 1;
            return Ok(());
        }
        let times = match with_prefill {
            true => &mut self.prefill,
            false => &mut self.decode,
        };
        let mut prev = self.start.take();
        for (op, e) in std::mem::take(&mut self.marks) {
            if let Some(s) = &prev {
                let ms = s.elapsed_ms(&e).map_err(|err| {
                    crate::cuda::CudaError::driver("reading a profile event", err)
                })?;
                times.add(op, ms as f64);
            }
            prev = Some(e);
        }
        let now = std::time::Instant::now();
        if let Some(t) = self.wall_start.take() {
            times.call_ms += (now - t).as_secs_f64() * 1e3;
            if let Some(r) = self.last_return {
                times.gap_ms += (t - r).as_secs_f64() * 1e3;
            }
        }
        self.last_return = Some(now);
        times.num_steps += 1;
        Ok(())
    }

    fn report(&self) -> String {
        let mut s = format!(
            "ferrum cuda profile: {} steps left out (they compiled kernels or planned GEMM shapes)\n",
            self.num_setup_steps
        );
        for (kind, t) in [("decode", &self.decode), ("prefill/mixed", &self.prefill)] {
            if t.num_steps > 0 {
                s.push_str(&t.report(kind));
            }
        }
        s
    }
}

fn device_err(what: String) -> crate::Error {
    crate::Error::Device(what)
}

fn upload_f32<T: FloatElem>(dev: &CudaDevice, v: &[f32]) -> crate::Result<DeviceBuffer<T>> {
    let mut host = vec![T::from_f32(0.0); v.len()];
    // Converted in parallel chunks: a 7B model is 7e9 values.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = v.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|s| {
        for (out, src) in host.chunks_mut(chunk).zip(v.chunks(chunk)) {
            s.spawn(move || {
                for (o, &x) in out.iter_mut().zip(src) {
                    *o = T::from_f32(x);
                }
            });
        }
    });
    Ok(dev.upload(&host)?)
}

fn upload_weight<T: FloatElem>(
    dev: &CudaDevice,
    w: &Weight,
    name: &str,
) -> crate::Result<DeviceBuffer<T>> {
    match w {
        Weight::F32 { data, .. } => upload_f32(dev, data),
        Weight::Q8(_) => {
            // Compact CPU weights: dequantize row by row (exact for the block formats).
            let (rows, cols) = (w.rows(), w.cols());
            let mut row = vec![0.0f32; cols];
            let mut host = Vec::with_capacity(rows * cols);
            for r in 0..rows {
                w.try_row_to_f32(r, &mut row)
                    .map_err(|e| device_err(format!("dequantizing {name} for the GPU: {e}")))?;
                host.extend(row.iter().map(|&x| T::from_f32(x)));
            }
            Ok(dev.upload(&host)?)
        }
    }
}

fn upload_linear<T: FloatElem>(
    dev: &CudaDevice,
    w: &Weight,
    bias: Option<&Vec<f32>>,
    name: &str,
) -> crate::Result<DeviceLinear<T>> {
    Ok(DeviceLinear {
        w: upload_weight(dev, w, name)?,
        bias: bias.map(|b| upload_f32(dev, b)).transpose()?,
        n: w.rows(),
        k: w.cols(),
    })
}

fn upload_norm<T: FloatElem>(dev: &CudaDevice, n: &NormWeights) -> crate::Result<DeviceNorm<T>> {
    Ok(DeviceNorm {
        weight: upload_f32(dev, &n.weight)?,
        bias: n.bias.as_deref().map(|b| upload_f32(dev, b)).transpose()?,
    })
}

fn upload_layer<T: FloatElem>(
    dev: &CudaDevice,
    l: &LayerWeights,
    idx: usize,
) -> crate::Result<DeviceLayer<T>> {
    Ok(DeviceLayer {
        attn_norm: upload_norm(dev, &l.attn_norm)?,
        mlp_norm: l
            .mlp_norm
            .as_ref()
            .map(|n| upload_norm(dev, n))
            .transpose()?,
        qkv: upload_linear(
            dev,
            &l.qkv,
            l.qkv_bias.as_ref(),
            &format!("layer {idx} qkv"),
        )?,
        attn_out: upload_linear(
            dev,
            &l.attn_out,
            l.attn_out_bias.as_ref(),
            &format!("layer {idx} attn_out"),
        )?,
        gate_up: upload_linear(
            dev,
            &l.gate_up,
            l.gate_up_bias.as_ref(),
            &format!("layer {idx} gate_up"),
        )?,
        down: upload_linear(
            dev,
            &l.down,
            l.down_bias.as_ref(),
            &format!("layer {idx} down"),
        )?,
    })
}

/// The CUDA executor for activations, weights and KV cache in `T` (f32, bf16 or f16).
pub struct CudaExecutor<T: FloatElem> {
    dev: CudaDevice,
    gemm: Gemm,
    spec: DecoderSpec,
    w: DeviceWeights<T>,
    /// [rotary_dim / 2], scaling folded in (rope models)
    inv_freq: Option<DeviceBuffer<f32>>,
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
}

impl<T: FloatElem> CudaExecutor<T> {
    /// Uploads the weights, compiles the kernels, sizes and allocates the KV cache.
    pub fn new(
        dev: CudaDevice,
        spec: DecoderSpec,
        weights: DecoderWeights,
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
        let w = DeviceWeights {
            embedding: upload_weight(&dev, &weights.embedding, "embedding")?,
            position_embedding: weights
                .position_embedding
                .as_deref()
                .map(|p| upload_f32(&dev, p))
                .transpose()?,
            embedding_norm: weights
                .embedding_norm
                .as_ref()
                .map(|n| upload_norm(&dev, n))
                .transpose()?,
            final_norm: upload_norm(&dev, &weights.final_norm)?,
            lm_head: weights
                .lm_head
                .as_ref()
                .map(|l| upload_weight(&dev, l, "lm_head"))
                .transpose()?,
            lm_head_bias: weights
                .lm_head_bias
                .as_deref()
                .map(|b| upload_f32(&dev, b))
                .transpose()?,
            layers: weights
                .layers
                .iter()
                .enumerate()
                .map(|(i, l)| upload_layer(&dev, l, i))
                .collect::<crate::Result<_>>()?,
        };
        drop(weights);
        let inv_freq = match &spec.pos {
            PosEmbedding::Rope(rope) => Some(dev.upload(&rope.inv_freqs())?),
            _ => None,
        };
        let alibi_slopes = match spec.alibi_slopes() {
            Some(slopes) => Some(dev.upload(&slopes)?),
            None => None,
        };
        dev.synchronize()?;
        let (free_bytes, _) = dev.memory_info()?;
        let plan = plan_kv_blocks(&spec, kv_cfg, T::DTYPE, free_bytes).map_err(device_err)?;
        let kv_shape = KvCacheShape {
            num_blocks: plan.num_blocks,
            block_size: kv_cfg.block_size,
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
        let (max_tokens, max_seqs) = step_capacity(kv_cfg);
        let ws = Workspace::new(&dev, &spec, kv_cfg, max_tokens, max_seqs)?;
        dev.synchronize()?;
        let profile = opts.profile;
        let graphs_enabled = opts.cuda_graphs && !profile;
        Ok((
            CudaExecutor {
                dev,
                gemm,
                spec,
                w,
                inv_freq,
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
            },
            plan,
        ))
    }

    /// Runs, once before any request, what would otherwise land in the first requests' latency:
    /// the timed GEMM plans (`warm_up_gemms`), then the scratch steps of `WarmUpPlans`: a
    /// prefill (prefill kernels) and every decode graph bucket twice (decode and split-K
    /// kernels, the capture and a first replay), each step sampled on the device with a greedy
    /// row and a row with every filter, penalty and logprobs on (the sampler's kernels).
    ///
    /// The scratch tokens write the KV slots of the first blocks only; the cache holds no
    /// sequence yet, a sequence reads only slots it wrote or cached blocks some sequence
    /// computed (prefix caching registers blocks from real steps only, and the warm-up runs
    /// before the engine starts), so nothing of the warm-up is ever attended to. Errors here
    /// are load errors (the same steps would fail on the first request).
    pub fn warm_up(&mut self) -> crate::Result<WarmUpReport> {
        let start = std::time::Instant::now();
        let (modules, gemm_plans) = self.setup_counts();
        let vocab = self.spec.vocab_size;
        let mut history = crate::cuda::sampling::TokenHistory::new(&[1, 2, 3], vocab);
        history.accept(1);
        // One suppressed id (as min_tokens suppresses eos), unless that would leave nothing.
        let suppressed: &[u32] = if vocab > 1 { &[0] } else { &[] };
        let filtered = RowSampling {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.9,
            min_p: 0.05,
            penalties: Penalties {
                repetition: 1.1,
                presence: 0.1,
                frequency: 0.1,
            },
            num_logprobs: Some(crate::request::MAX_LOGPROBS),
            uniform: 0.5,
        };
        let step = |exec: &mut Self, plan: &SchedulePlan| {
            let mut rows = SampleBatch::new();
            for i in 0..plan.seqs.len() {
                match i {
                    1 => rows.push(&RowSampling::greedy(), None, &[]),
                    _ => rows.push(&filtered, Some(&history), suppressed),
                }?;
            }
            exec.execute_and_sample(plan, &rows).map(|_| ())
        };
        let Some(mut ws) = self.ws.take() else {
            return Err(device_err("the step workspace is gone".into()));
        };
        let gemms = self.warm_up_gemms(&mut ws);
        self.ws = Some(ws);
        gemms?;
        let plans = WarmUpPlans::new(
            self.max_tokens,
            self.kv_shape.num_blocks.min(self.max_blocks),
            self.kv_shape.block_size,
            if self.graphs_enabled {
                &self.buckets
            } else {
                &[]
            },
        );
        // The profile (FERRUM_CUDA_PROFILE) times requests' steps, not these.
        let profile = self.profile.take();
        let ran = (|| -> crate::Result<()> {
            if let Some(prefill) = &plans.prefill {
                step(self, prefill)?;
            }
            for decode in &plans.decode {
                // The first run captures the bucket's graph, the second replays it.
                step(self, decode)?;
                step(self, decode)?;
            }
            Ok(())
        })();
        self.profile = profile;
        ran?;
        self.dev.synchronize()?;
        let prefill_tokens = plans.prefill.map_or(0, |p| p.num_batched_tokens);
        let decode_batches = plans.decode.iter().map(|p| p.seqs.len()).collect();
        let (modules_now, plans_now) = self.setup_counts();
        Ok(WarmUpReport {
            prefill_tokens,
            decode_batches,
            modules_compiled: modules_now - modules,
            gemm_plans: plans_now - gemm_plans,
            graphs_captured: self.graphs.values().filter(|g| g.is_some()).count(),
            seconds: start.elapsed().as_secs_f64(),
        })
    }

    /// Kernel modules compiled and GEMM shapes planned so far (one-time setup costs).
    pub fn setup_counts(&self) -> (usize, usize) {
        (self.dev.num_modules(), self.gemm.num_plans())
    }

    fn pack(&mut self, plan: &SchedulePlan) -> crate::Result<StepLayout> {
        let limits = StepLimits {
            block_size: self.kv_shape.block_size,
            num_blocks: self.kv_shape.num_blocks,
            max_blocks: self.max_blocks,
            max_tokens: self.max_tokens,
            max_seqs: self.max_seqs,
            buckets: if self.graphs_enabled {
                &self.buckets
            } else {
                &[]
            },
        };
        pack_step(plan, &limits, &mut self.host, &mut self.sample_rows)
    }

    /// Sets every step buffer's length for `layout` and copies the packed inputs (already on
    /// the device) into the typed buffers. No host data is read: this runs inside graph
    /// captures too.
    fn scatter_inputs(&self, ws: &mut Workspace<T>, layout: &StepLayout) -> crate::Result<()> {
        let spec = &self.spec;
        let dev = &self.dev;
        let (m, d, p, r) = (
            layout.num_tokens,
            layout.num_decode,
            layout.num_prefill,
            layout.num_rows,
        );
        let mb = self.max_blocks;
        let h = spec.hidden_size;
        let gate_up = match spec.mlp {
            Mlp::Gated => 2 * spec.intermediate_size,
            Mlp::Plain => spec.intermediate_size,
        };
        ws.x.set_len(m * h)?;
        ws.normed.set_len(m * h)?;
        ws.qkv.set_len(m * (spec.q_dim() + 2 * spec.kv_dim()))?;
        ws.attn.set_len(m * spec.q_dim())?;
        ws.attn_proj.set_len(m * h)?;
        ws.gate_up.set_len(m * gate_up)?;
        if matches!(spec.mlp, Mlp::Gated) {
            ws.act.set_len(m * spec.intermediate_size)?;
        }
        ws.mlp_out.set_len(m * h)?;
        ws.last.set_len(r * h)?;
        ws.last_normed.set_len(r * h)?;
        ws.logits.set_len(r * spec.vocab_size)?;
        ws.token_ids.set_len(m)?;
        ws.positions.set_len(m)?;
        ws.slots.set_len(m)?;
        ws.logits_rows.set_len(r)?;
        ws.dec_context_lens.set_len(d)?;
        ws.dec_tables.set_len(d * mb)?;
        ws.pre_q_starts.set_len(p)?;
        ws.pre_q_lens.set_len(p)?;
        ws.pre_context_lens.set_len(p)?;
        ws.pre_tables.set_len(p * mb)?;
        let o = layout.offsets(mb);
        dev.copy_packed(&ws.packed, o[0], &mut ws.token_ids)?;
        dev.copy_packed(&ws.packed, o[1], &mut ws.positions)?;
        dev.copy_packed(&ws.packed, o[2], &mut ws.slots)?;
        dev.copy_packed(&ws.packed, o[3], &mut ws.logits_rows)?;
        dev.copy_packed(&ws.packed, o[4], &mut ws.dec_context_lens)?;
        dev.copy_packed(&ws.packed, o[5], &mut ws.dec_tables)?;
        dev.copy_packed(&ws.packed, o[6], &mut ws.pre_q_starts)?;
        dev.copy_packed(&ws.packed, o[7], &mut ws.pre_q_lens)?;
        dev.copy_packed(&ws.packed, o[8], &mut ws.pre_context_lens)?;
        dev.copy_packed(&ws.packed, o[9], &mut ws.pre_tables)?;
        Ok(())
    }

    fn norm(
        &self,
        out: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        residual: Option<&mut DeviceBuffer<T>>,
        n: &DeviceNorm<T>,
    ) -> crate::Result<()> {
        ops::norm(
            &self.dev,
            self.spec.norm,
            out,
            x,
            residual,
            &n.weight,
            n.bias.as_ref(),
        )?;
        Ok(())
    }

    fn linear(
        &self,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        l: &DeviceLinear<T>,
        m: usize,
    ) -> crate::Result<()> {
        self.gemm.linear(
            &self.dev,
            y,
            x,
            &l.w,
            l.bias.as_ref(),
            GemmShape { m, n: l.n, k: l.k },
        )?;
        Ok(())
    }

    /// Records a profile event after `op` (profiling only).
    fn mark(&self, profile: &mut Option<Profile>, op: &'static str) -> crate::Result<()> {
        if let Some(p) = profile {
            let e = self.dev.timing_event()?;
            p.marks.push((op, e));
        }
        Ok(())
    }

    /// Attention of every batch row over its sequence's cache (this step's k/v already
    /// written): decode rows [0, num_decode) through split-K (flash-decoding), prefill chunks
    /// through the flash prefill kernel. attn: [tokens, q_dim]; qkv: [tokens, q_dim + 2 kv_dim].
    fn attention(
        &self,
        ws: &mut Workspace<T>,
        cache: &LayerKv<T>,
        layout: &StepLayout,
    ) -> crate::Result<()> {
        let spec = &self.spec;
        let dev = &self.dev;
        let p = attention_params(spec);
        let qkv_dim = spec.q_dim() + 2 * spec.kv_dim();
        let paged = PagedKv {
            k: &cache.k,
            v: &cache.v,
            shape: self.kv_shape,
        };
        let (m, d) = (layout.num_tokens, layout.num_decode);
        if d > 0 {
            ws.qkv.set_len(d * qkv_dim)?;
            ws.attn.set_len(d * spec.q_dim())?;
            let tables = BlockTables {
                block_tables: &ws.dec_tables,
                max_blocks_per_seq: self.max_blocks,
                context_lens: &ws.dec_context_lens,
            };
            let result = match &mut ws.splitk {
                Some(work) if use_splitk::<T>(spec.head_dim, qkv_dim) => {
                    // A graph fixes the plan for the longest context it may see.
                    let max_ctx = match layout.bucket {
                        Some(_) => self.max_blocks * self.kv_shape.block_size,
                        None => layout.max_decode_context,
                    };
                    let plan = SplitKPlan::choose(
                        dev.info().num_multiprocessors,
                        T::DTYPE,
                        d,
                        &p,
                        max_ctx,
                    );
                    paged_attention_decode_splitk(
                        dev,
                        &mut ws.attn,
                        &ws.qkv,
                        qkv_dim,
                        &paged,
                        &tables,
                        self.alibi_slopes.as_ref(),
                        &p,
                        plan,
                        work,
                    )
                }
                _ => ops::paged_attention_decode(
                    dev,
                    &mut ws.attn,
                    &ws.qkv,
                    qkv_dim,
                    &paged,
                    &tables,
                    self.alibi_slopes.as_ref(),
                    &p,
                ),
            };
            ws.qkv.set_len(m * qkv_dim)?;
            ws.attn.set_len(m * spec.q_dim())?;
            result?;
        }
        if layout.num_prefill > 0 {
            paged_attention_prefill(
                dev,
                &mut ws.attn,
                &ws.qkv,
                qkv_dim,
                &paged,
                &PrefillSeqs {
                    q_starts: &ws.pre_q_starts,
                    q_lens: &ws.pre_q_lens,
                    context_lens: &ws.pre_context_lens,
                    block_tables: &ws.pre_tables,
                    max_blocks_per_seq: self.max_blocks,
                    max_q_len: layout.max_q_len,
                },
                self.alibi_slopes.as_ref(),
                &p,
                PrefillKernel::Fast,
            )?;
        }
        Ok(())
    }

    /// Scatters the uploaded inputs and runs the batch through every layer and the LM head:
    /// logits [num_rows, vocab] stay in `ws.logits`. Device work only (no host copy, no sync,
    /// no allocation), so a decode step can be captured as a graph.
    fn run_step(
        &self,
        ws: &mut Workspace<T>,
        kv: &mut [LayerKv<T>],
        layout: &StepLayout,
        profile: &mut Option<Profile>,
    ) -> crate::Result<()> {
        let spec = &self.spec;
        let dev = &self.dev;
        let m = layout.num_tokens;
        let h = spec.hidden_size;
        let (q_dim, kv_dim) = (spec.q_dim(), spec.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        self.scatter_inputs(ws, layout)?;
        self.mark(profile, "inputs")?;

        let learned = self
            .w
            .position_embedding
            .as_ref()
            .map(|table| LearnedPositions {
                table,
                positions: &ws.positions,
            });
        match &self.w.embedding_norm {
            Some(n) => {
                ops::embedding(
                    dev,
                    &mut ws.normed,
                    &self.w.embedding,
                    &ws.token_ids,
                    learned,
                    h,
                )?;
                self.norm(&mut ws.x, &ws.normed, None, n)?;
            }
            None => ops::embedding(dev, &mut ws.x, &self.w.embedding, &ws.token_ids, learned, h)?,
        }
        self.mark(profile, "embedding")?;
        let rotary = match &spec.pos {
            PosEmbedding::Rope(r) => Some(RotaryLayout {
                row_stride: qkv_dim,
                num_q_heads: spec.num_heads,
                num_kv_heads: spec.num_kv_heads,
                k_offset: q_dim,
                head_dim: spec.head_dim,
                rotary_dim: r.rotary_dim,
                style: r.style,
            }),
            _ => None,
        };
        let kv_src = KvSource {
            row_stride: qkv_dim,
            k_offset: q_dim,
            v_offset: q_dim + kv_dim,
        };
        // Sequential layers leave their MLP output to be added to x by the next layer's first
        // norm (one fused kernel instead of an add and a norm); after the last layer, by an add.
        let mut mlp_out_pending = false;
        for (lw, cache) in self.w.layers.iter().zip(kv.iter_mut()) {
            match mlp_out_pending {
                // x += mlp_out; normed = attn_norm(x)
                true => self.norm(&mut ws.normed, &ws.mlp_out, Some(&mut ws.x), &lw.attn_norm)?,
                false => self.norm(&mut ws.normed, &ws.x, None, &lw.attn_norm)?,
            }
            mlp_out_pending = false;
            self.mark(profile, "norm")?;
            self.linear(&mut ws.qkv, &ws.normed, &lw.qkv, m)?;
            self.mark(profile, "gemm qkv")?;
            if let Some(c) = spec.clip_qkv {
                elementwise::clamp(dev, &mut ws.qkv, c)?;
            }
            match (&rotary, &self.inv_freq) {
                (Some(layout), Some(inv_freq)) => {
                    ops::rotary_kv_cache_write(
                        dev,
                        &mut ws.qkv,
                        &ws.positions,
                        inv_freq,
                        layout,
                        &mut cache.k,
                        &mut cache.v,
                        &self.kv_shape,
                        &kv_src,
                        &ws.slots,
                    )?;
                    self.mark(profile, "rotary + kv_cache_write")?;
                }
                _ => {
                    ops::kv_cache_write(
                        dev,
                        &mut cache.k,
                        &mut cache.v,
                        &self.kv_shape,
                        &ws.qkv,
                        &kv_src,
                        &ws.slots,
                    )?;
                    self.mark(profile, "kv_cache_write")?;
                }
            }
            self.attention(ws, cache, layout)?;
            self.mark(profile, "attention")?;
            self.linear(&mut ws.attn_proj, &ws.attn, &lw.attn_out, m)?;
            self.mark(profile, "gemm attn_out")?;
            let mlp_norm = lw.mlp_norm.as_ref().unwrap_or(&lw.attn_norm);
            match spec.residual {
                Residual::Sequential => {
                    // x += attn_proj; normed = mlp_norm(x), one kernel.
                    self.norm(&mut ws.normed, &ws.attn_proj, Some(&mut ws.x), mlp_norm)?;
                    self.mark(profile, "norm")?;
                    self.mlp(lw, ws, m, profile)?;
                    mlp_out_pending = true;
                }
                Residual::Parallel { shared_norm } => {
                    if !shared_norm {
                        self.norm(&mut ws.normed, &ws.x, None, mlp_norm)?;
                        self.mark(profile, "norm")?;
                    }
                    self.mlp(lw, ws, m, profile)?;
                    elementwise::add(dev, &mut ws.x, &ws.attn_proj, Some(&ws.mlp_out))?;
                    self.mark(profile, "residual add")?;
                }
            }
        }
        if mlp_out_pending {
            elementwise::add(dev, &mut ws.x, &ws.mlp_out, None)?;
            self.mark(profile, "residual add")?;
        }
        if layout.num_rows == 0 {
            return Ok(());
        }
        // Final norm and LM head only for the rows that sample.
        elementwise::gather_rows(dev, &mut ws.last, &ws.x, &ws.logits_rows, h)?;
        self.norm(&mut ws.last_normed, &ws.last, None, &self.w.final_norm)?;
        self.mark(profile, "final norm")?;
        self.lm_head(ws, layout.num_rows)?;
        self.mark(profile, "gemm lm_head")?;
        Ok(())
    }

    /// logits[..rows] = last_normed[..rows] · lm_headᵀ (+ bias).
    fn lm_head(&self, ws: &mut Workspace<T>, rows: usize) -> crate::Result<()> {
        let lm_head = self.w.lm_head.as_ref().unwrap_or(&self.w.embedding);
        self.gemm.linear(
            &self.dev,
            &mut ws.logits,
            &ws.last_normed,
            lm_head,
            self.w.lm_head_bias.as_ref(),
            GemmShape {
                m: rows,
                n: self.spec.vocab_size,
                k: self.spec.hidden_size,
            },
        )?;
        Ok(())
    }

    /// Plans every GEMM a step may run at a timed size (`tuned_m`: candidates are timed on a
    /// shape's first use, tens of ms for a large one): the four layer products for every such
    /// m up to max_num_batched_tokens, the LM head for every such row count up to
    /// max_num_seqs. They run on layer 0's weights and whatever the step buffers hold: only
    /// their timings matter. Other m take the heuristic's plan on first use (no timing).
    fn warm_up_gemms(&self, ws: &mut Workspace<T>) -> crate::Result<()> {
        let Some(lw) = self.w.layers.first() else {
            return Ok(());
        };
        let h = self.spec.hidden_size;
        for m in (1..=self.max_tokens).filter(|&m| tuned_m(m)) {
            ws.normed.set_len(m * h)?;
            ws.qkv.set_len(m * lw.qkv.n)?;
            self.linear(&mut ws.qkv, &ws.normed, &lw.qkv, m)?;
            ws.attn.set_len(m * lw.attn_out.k)?;
            ws.attn_proj.set_len(m * lw.attn_out.n)?;
            self.linear(&mut ws.attn_proj, &ws.attn, &lw.attn_out, m)?;
            ws.gate_up.set_len(m * lw.gate_up.n)?;
            self.linear(&mut ws.gate_up, &ws.normed, &lw.gate_up, m)?;
            let down_in = match self.spec.mlp {
                Mlp::Gated => &mut ws.act,
                Mlp::Plain => &mut ws.gate_up,
            };
            down_in.set_len(m * lw.down.k)?;
            ws.mlp_out.set_len(m * lw.down.n)?;
            self.linear(&mut ws.mlp_out, down_in, &lw.down, m)?;
        }
        for rows in (1..=self.max_seqs).filter(|&r| tuned_m(r)) {
            ws.last_normed.set_len(rows * h)?;
            ws.logits.set_len(rows * self.spec.vocab_size)?;
            self.lm_head(ws, rows)?;
        }
        Ok(())
    }

    /// mlp_out = down(act(gate(n)) * up(n)) or down(act(up(n))).
    fn mlp(
        &self,
        lw: &DeviceLayer<T>,
        ws: &mut Workspace<T>,
        m: usize,
        profile: &mut Option<Profile>,
    ) -> crate::Result<()> {
        let dev = &self.dev;
        let (k, inter) = (self.spec.hidden_size, self.spec.intermediate_size);
        if matches!(self.spec.mlp, Mlp::Gated) && gated_gemv_applies(T::DTYPE, m, k) {
            // Decode-sized batches: gate_up and the activation in one kernel.
            gated_gemv(
                dev,
                self.spec.act,
                &mut ws.act,
                &ws.normed,
                &lw.gate_up.w,
                lw.gate_up.bias.as_ref(),
                m,
                inter,
                k,
            )?;
            self.mark(profile, "gemv gate_up + activation")?;
            self.linear(&mut ws.mlp_out, &ws.act, &lw.down, m)?;
            self.mark(profile, "gemm down")?;
            return Ok(());
        }
        self.linear(&mut ws.gate_up, &ws.normed, &lw.gate_up, m)?;
        self.mark(profile, "gemm gate_up")?;
        match self.spec.mlp {
            Mlp::Gated => {
                ops::gated_activation(
                    dev,
                    self.spec.act,
                    &mut ws.act,
                    &ws.gate_up,
                    self.spec.intermediate_size,
                )?;
                self.mark(profile, "activation")?;
                self.linear(&mut ws.mlp_out, &ws.act, &lw.down, m)?;
            }
            Mlp::Plain => {
                ops::activation_in_place(dev, self.spec.act, &mut ws.gate_up)?;
                self.mark(profile, "activation")?;
                self.linear(&mut ws.mlp_out, &ws.gate_up, &lw.down, m)?;
            }
        }
        self.mark(profile, "gemm down")?;
        Ok(())
    }

    /// Runs one packed step on the device: replays the bucket's graph (capturing it after an
    /// eager run the first time), or runs eagerly. Logits are left in `ws.logits`.
    fn launch(&mut self, ws: &mut Workspace<T>, layout: &StepLayout) -> crate::Result<()> {
        ws.packed.set_len(layout.num_words)?;
        self.dev.copy_to_device(&self.host, &mut ws.packed)?;
        let mut kv = std::mem::take(&mut self.kv);
        let result = (|| -> crate::Result<()> {
            if let Some(b) = layout.bucket {
                if let Some(Some(graph)) = self.graphs.get(&b) {
                    graph.launch()?;
                    // Buffer lengths as the graph left them (host-side state).
                    return self.set_lens_only(ws, layout);
                }
                self.run_step(ws, &mut kv, layout, &mut None)?;
                if !self.graphs.contains_key(&b) {
                    let graph = self.capture(ws, &mut kv, layout);
                    if let Err(e) = &graph {
                        eprintln!(
                            "ferrum: CUDA graph capture for decode batch {b} failed, running it eagerly: {e}"
                        );
                    }
                    self.graphs.insert(b, graph.ok());
                }
                return Ok(());
            }
            let mut profile = self.profile.take();
            if let Some(p) = &mut profile {
                p.marks.clear();
                p.start = Some(self.dev.timing_event()?);
            }
            let r = self.run_step(ws, &mut kv, layout, &mut profile);
            if let Some(p) = &mut profile
                && r.is_err()
            {
                p.marks.clear();
                p.start = None;
            }
            self.profile = profile;
            r
        })();
        self.kv = kv;
        result
    }

    fn set_lens_only(&self, ws: &mut Workspace<T>, layout: &StepLayout) -> crate::Result<()> {
        ws.logits.set_len(layout.num_rows * self.spec.vocab_size)?;
        Ok(())
    }

    /// Captures `run_step` for a decode bucket into a graph (recorded, not run).
    fn capture(
        &self,
        ws: &mut Workspace<T>,
        kv: &mut [LayerKv<T>],
        layout: &StepLayout,
    ) -> crate::Result<DeviceGraph> {
        self.dev.begin_capture()?;
        let recorded = self.run_step(ws, kv, layout, &mut None);
        let graph = self.dev.end_capture();
        recorded?;
        Ok(graph?)
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
        self.spec.vocab_size
    }

    fn execute(&mut self, plan: &SchedulePlan) -> crate::Result<Logits> {
        // The engine thread is not the loading thread: make the context current here.
        self.dev.stream().context().bind_to_thread().map_err(|e| {
            crate::cuda::CudaError::driver("binding the device to the engine thread", e)
        })?;
        let vocab_size = self.spec.vocab_size;
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
            ws.logits.set_len(num_rows * vocab_size)?;
            Ok(exec
                .dev
                .download(&ws.logits)?
                .into_iter()
                .map(T::to_f32)
                .collect())
        })?;
        Ok(Logits { vocab_size, data })
    }

    fn samples_on_device(&self) -> bool {
        true
    }

    fn execute_and_sample(
        &mut self,
        plan: &SchedulePlan,
        rows: &SampleBatch,
    ) -> crate::Result<Vec<Sampled>> {
        self.execute_and_sample_overlapped(plan, rows, &mut || {})
    }

    fn execute_and_sample_overlapped(
        &mut self,
        plan: &SchedulePlan,
        rows: &SampleBatch,
        overlap: &mut dyn FnMut(),
    ) -> crate::Result<Vec<Sampled>> {
        self.dev.stream().context().bind_to_thread().map_err(|e| {
            crate::cuda::CudaError::driver("binding the device to the engine thread", e)
        })?;
        let vocab_size = self.spec.vocab_size;
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
            ws.logits.set_len(num_rows * vocab_size)?;
            exec.sampler
                .sample(&exec.dev, &ws.logits, vocab_size, rows)?;
            // The whole step is queued on the stream: the host's other work runs now.
            overlap();
            Ok(exec.sampler.fetch(&exec.dev)?)
        })
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn spec() -> DecoderSpec {
        crate::model::presets::preset("llama2-7b").unwrap().spec
    }

    fn cfg() -> KvCacheConfig {
        KvCacheConfig {
            block_size: 16,
            max_tokens: None,
            free_gpu_mem_fraction: 0.9,
            max_num_batched_tokens: 2048,
            max_num_seqs: 64,
            max_model_len: 4096,
        }
    }

    use crate::kv_cache::BlockId;
    use crate::request::SeqId;
    use crate::scheduler::ScheduledSeq;

    fn seq(
        id: u64,
        tokens: &[u32],
        start_pos: usize,
        blocks: &[u32],
        sample: bool,
    ) -> ScheduledSeq {
        ScheduledSeq {
            seq_id: SeqId(id),
            token_ids: tokens.to_vec(),
            start_pos,
            block_table: blocks.iter().map(|&b| BlockId(b)).collect(),
            sample,
        }
    }

    fn limits(buckets: &[usize]) -> StepLimits<'_> {
        StepLimits {
            block_size: 4,
            num_blocks: 16,
            max_blocks: 8,
            max_tokens: 32,
            max_seqs: 8,
            buckets,
        }
    }

    #[test]
    fn splitk_only_where_the_dtype_has_16_byte_rows() {
        // Llama shapes: head_dim 128, qkv row 12288.
        assert!(use_splitk::<bf16>(128, 12288));
        assert!(use_splitk::<f32>(128, 12288));
        // head_dim 12 (tests/fixtures llama_gqa_llama3: 6 heads, 2 kv heads, qkv row 120): 48-byte
        // f32 rows take split-K (its own module); 24-byte bf16/f16 rows do not.
        assert!(use_splitk::<f32>(12, 120));
        assert!(!use_splitk::<bf16>(12, 120));
        assert!(!use_splitk::<f16>(12, 120));
        // A qkv row that is not 16-byte aligned (bf16 row of 100 elements, f32 row of 42).
        assert!(!use_splitk::<bf16>(16, 100));
        assert!(!use_splitk::<f32>(12, 42));
    }

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

    #[test]
    fn graph_buckets_are_powers_of_two_then_max_num_seqs() {
        assert_eq!(graph_buckets(1), vec![1]);
        assert_eq!(graph_buckets(8), vec![1, 2, 4, 8]);
        assert_eq!(graph_buckets(48), vec![1, 2, 4, 8, 16, 32, 48]);
        assert_eq!(graph_buckets(0), Vec::<usize>::new());
    }

    #[test]
    fn mixed_step_packs_decode_rows_first_then_prefill_chunks() {
        // Plan order: a prefill chunk of 3 (seq 0, positions 4..7, samples), a decode (seq 1 at
        // position 5), a non-sampling prefill chunk of 2 (seq 2 at 0..2).
        let plan = SchedulePlan {
            seqs: vec![
                seq(0, &[10, 11, 12], 4, &[3, 9], true),
                seq(1, &[20], 5, &[5, 6], true),
                seq(2, &[30, 31], 0, &[7], false),
            ],
            preempted: vec![],
            num_batched_tokens: 6,
        };
        let (mut host, mut rows) = (vec![], vec![]);
        let l = pack_step(&plan, &limits(&[1, 2, 4, 8]), &mut host, &mut rows).unwrap();
        assert_eq!(
            (
                l.num_tokens,
                l.num_decode,
                l.num_prefill,
                l.num_rows,
                l.bucket
            ),
            (6, 1, 2, 2, None)
        );
        assert_eq!((l.max_q_len, l.max_decode_context), (3, 6));
        let o = l.offsets(8);
        assert_eq!(o[10], l.num_words);
        // Row 0: the decode token; rows 1..4: seq 0's chunk; rows 4..6: seq 2's chunk.
        assert_eq!(&host[o[0]..o[1]], &[20, 10, 11, 12, 30, 31]);
        assert_eq!(&host[o[1]..o[2]], &[5, 4, 5, 6, 0, 1]);
        // Slots: block_table[pos / 4] * 4 + pos % 4, as little-endian i64 words.
        let slots: Vec<i64> = host[o[2]..o[3]]
            .chunks(2)
            .map(|w| (w[0] as u64 | (w[1] as u64) << 32) as i64)
            .collect();
        assert_eq!(
            slots,
            vec![6 * 4 + 1, 9 * 4, 9 * 4 + 1, 9 * 4 + 2, 7 * 4, 7 * 4 + 1]
        );
        // Logits rows in plan order of the sampling seqs: seq 0's last token (row 3), then the
        // decode row 0.
        assert_eq!(&host[o[3]..o[4]], &[3, 0]);
        assert_eq!(rows, vec![0, 1]);
        // Decode: context 6, table [5, 6, -1 ...].
        assert_eq!(&host[o[4]..o[5]], &[6]);
        assert_eq!(host[o[5]] as i32, 5);
        assert_eq!(host[o[5] + 1] as i32, 6);
        assert!(host[o[5] + 2..o[6]].iter().all(|&w| w as i32 == -1));
        // Prefill: q_starts, q_lens, context lens, tables.
        assert_eq!(&host[o[6]..o[7]], &[1, 4]);
        assert_eq!(&host[o[7]..o[8]], &[3, 2]);
        assert_eq!(&host[o[8]..o[9]], &[7, 2]);
        assert_eq!(&host[o[9]..o[9] + 2], &[3, 9]);
        assert_eq!(host[o[9] + 8], 7);
    }

    #[test]
    fn pure_decode_step_pads_to_its_graph_bucket() {
        let plan = SchedulePlan {
            seqs: vec![
                seq(0, &[7], 2, &[1], true),
                seq(1, &[8], 8, &[2, 3, 4], true),
                seq(2, &[9], 0, &[5], true),
            ],
            preempted: vec![],
            num_batched_tokens: 3,
        };
        let (mut host, mut rows) = (vec![], vec![]);
        let l = pack_step(&plan, &limits(&[1, 2, 4, 8]), &mut host, &mut rows).unwrap();
        assert_eq!(
            (l.num_tokens, l.num_decode, l.num_rows, l.bucket),
            (4, 4, 4, Some(4))
        );
        let o = l.offsets(8);
        assert_eq!(&host[o[0]..o[1]], &[7, 8, 9, 0]);
        // The padding row writes no slot (-1) and has an empty context.
        assert_eq!(host[o[2] + 6] as i32, -1);
        assert_eq!(host[o[2] + 7] as i32, -1);
        assert_eq!(&host[o[4]..o[5]], &[3, 9, 1, 0]);
        // Logits rows: the sampling seqs' rows, then padding (row 0, discarded).
        assert_eq!(&host[o[3]..o[4]], &[0, 1, 2, 0]);
        assert_eq!(rows, vec![0, 1, 2]);
        // Without graphs the same step is exact-sized.
        let l = pack_step(&plan, &limits(&[]), &mut host, &mut rows).unwrap();
        assert_eq!((l.num_tokens, l.num_rows, l.bucket), (3, 3, None));
    }

    #[test]
    fn environment_overrides_only_the_options_it_sets() {
        let base = CudaExecOptions {
            cuda_graphs: false,
            profile: false,
            warm_up: true,
        };
        assert_eq!(base.overridden_by(|_| None), base);
        let env = |name: &str| match name {
            "FERRUM_CUDA_GRAPHS" => Some("1".to_owned()),
            "FERRUM_CUDA_WARMUP" => Some("off".to_owned()),
            _ => None,
        };
        assert_eq!(
            base.overridden_by(env),
            CudaExecOptions {
                cuda_graphs: true,
                profile: false,
                warm_up: false,
            }
        );
        let empty = |name: &str| (name == "FERRUM_CUDA_WARMUP").then(String::new);
        assert!(!base.overridden_by(empty).warm_up);
    }

    #[test]
    fn warm_up_plans_fit_every_step_capacity() {
        // (max_num_batched_tokens, max_num_seqs, block_size, max_model_len, cache blocks)
        let configs = [
            (2048, 64, 16, 4096, 100_000),
            (64, 4, 4, 128, 512),
            (1, 1, 16, 16, 1),
            (8, 256, 16, 2048, 40),
            (8192, 1, 32, 100, 2),
            (3, 2, 64, 64, 1),
        ];
        for (batched, seqs, block_size, max_model_len, cache_blocks) in configs {
            let cfg = KvCacheConfig {
                block_size,
                max_num_batched_tokens: batched,
                max_num_seqs: seqs,
                max_model_len,
                ..cfg()
            };
            let (max_tokens, max_seqs) = step_capacity(&cfg);
            let max_blocks = max_blocks_per_seq(&cfg);
            for graphs in [true, false] {
                let buckets = if graphs {
                    graph_buckets(max_seqs)
                } else {
                    vec![]
                };
                // Largest bucket first; batch 1 without graphs.
                let batches: Vec<usize> = match graphs {
                    true => buckets.iter().rev().copied().collect(),
                    false => vec![1],
                };
                let plans = WarmUpPlans::new(
                    max_tokens,
                    cache_blocks.min(max_blocks),
                    block_size,
                    &buckets,
                );
                let lim = StepLimits {
                    block_size,
                    num_blocks: cache_blocks,
                    max_blocks,
                    max_tokens,
                    max_seqs,
                    buckets: &buckets,
                };
                let (mut host, mut rows) = (vec![], vec![]);
                let what = format!("{batched}/{seqs}/{block_size}/{max_model_len}/{cache_blocks}");
                if let Some(p) = &plans.prefill {
                    let l = pack_step(p, &lim, &mut host, &mut rows).unwrap();
                    assert_eq!((l.num_prefill, l.num_decode), (1, 0), "{what}");
                    assert!(l.num_tokens >= 2 && l.num_tokens <= max_tokens, "{what}");
                }
                assert_eq!(plans.decode.len(), batches.len());
                for (p, &b) in plans.decode.iter().zip(&batches) {
                    let l = pack_step(p, &lim, &mut host, &mut rows).unwrap();
                    assert_eq!(l.num_decode, b, "{what}");
                    // With graphs each batch is its own bucket: the capture the warm-up wants.
                    assert_eq!(l.bucket, graphs.then_some(b), "{what}");
                }
            }
        }
        // A prefill takes as many tokens as the step and one sequence's blocks allow.
        let p = WarmUpPlans::new(2048, 8, 16, &[]);
        assert_eq!(p.prefill.unwrap().num_batched_tokens, 128);
        assert!(WarmUpPlans::new(1, 8, 16, &[]).prefill.is_none());
    }

    #[test]
    fn bad_plans_are_errors_not_panics() {
        let (mut host, mut rows) = (vec![], vec![]);
        let short = SchedulePlan {
            seqs: vec![seq(0, &[1, 2, 3, 4, 5], 0, &[0], true)],
            preempted: vec![],
            num_batched_tokens: 5,
        };
        let e = pack_step(&short, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("does not cover"), "{e}");
        let outside = SchedulePlan {
            seqs: vec![seq(0, &[1], 0, &[99], true)],
            preempted: vec![],
            num_batched_tokens: 1,
        };
        let e = pack_step(&outside, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("outside the cache"), "{e}");
        let too_long = SchedulePlan {
            seqs: vec![seq(0, &[1], 40, &[0; 11], true)],
            preempted: vec![],
            num_batched_tokens: 1,
        };
        let e = pack_step(&too_long, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("max_model_len"), "{e}");
        let too_many = SchedulePlan {
            seqs: vec![seq(0, &[1; 33], 0, &[0; 9], true)],
            preempted: vec![],
            num_batched_tokens: 33,
        };
        let e = pack_step(&too_many, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("max_num_batched_tokens"), "{e}");
        let miscounted = SchedulePlan {
            seqs: vec![seq(0, &[1], 0, &[0], true)],
            preempted: vec![],
            num_batched_tokens: 2,
        };
        let e = pack_step(&miscounted, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("batched tokens"), "{e}");
    }

    #[test]
    fn kv_blocks_from_the_memory_fraction() {
        let s = spec();
        // Llama-2-7B: 32 layers x 2 x 16 tokens x 4096 x 2 bytes = 8 MiB per bf16 block.
        assert_eq!(kv_bytes_per_block(&s, 16, DType::BF16), 8 << 20);
        let free = 60usize << 30;
        let p = plan_kv_blocks(&s, &cfg(), DType::BF16, free).unwrap();
        let ws = activation_workspace_bytes(&s, &cfg(), DType::BF16);
        assert!(ws > RESERVED_GPU_BYTES && ws < (2 << 30), "{ws}");
        assert_eq!(
            p.num_blocks,
            ((free - ws) as f64 * 0.9) as usize / (8 << 20)
        );
        assert_eq!(p.limited_by, "memory fraction");
        // f32 halves the blocks.
        let p32 = plan_kv_blocks(&s, &cfg(), DType::F32, free).unwrap();
        assert!(p32.num_blocks * 2 <= p.num_blocks + 1);
    }

    #[test]
    fn smallest_bound_wins_and_is_named() {
        let s = spec();
        let free = 60usize << 30;
        let c = KvCacheConfig {
            max_tokens: Some(1000),
            ..cfg()
        };
        let p = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        assert_eq!(
            (p.num_blocks, p.limited_by),
            (63, "max_tokens_in_paged_kv_cache")
        );
        let c = KvCacheConfig {
            max_num_seqs: 2,
            max_model_len: 100,
            ..cfg()
        };
        let p = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        assert_eq!(
            (p.num_blocks, p.limited_by),
            (14, "max_num_seqs x max_model_len")
        );
        let c = KvCacheConfig {
            free_gpu_mem_fraction: 0.5,
            ..cfg()
        };
        let half = plan_kv_blocks(&s, &c, DType::BF16, free).unwrap();
        let full = plan_kv_blocks(&s, &cfg(), DType::BF16, free).unwrap();
        assert!((half.num_blocks as f64 / full.num_blocks as f64 - 0.5 / 0.9).abs() < 0.01);
    }

    #[test]
    fn no_block_fits_is_an_error_naming_the_numbers() {
        let s = spec();
        let err = plan_kv_blocks(&s, &cfg(), DType::BF16, 300 << 20).unwrap_err();
        assert!(
            err.contains("no KV cache block fits") && err.contains("max_num_batched_tokens 2048"),
            "{err}"
        );
        let err = plan_kv_blocks(
            &s,
            &KvCacheConfig {
                free_gpu_mem_fraction: 1.5,
                ..cfg()
            },
            DType::BF16,
            1 << 40,
        )
        .unwrap_err();
        assert!(err.contains("1.5"), "{err}");
    }
}
