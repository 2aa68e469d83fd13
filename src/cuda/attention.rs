//! Launchers of the fast attention kernels over the paged KV cache: flash-attention style
//! prefill for mixed batches (`kernels/attention_prefill.cu`) and split-K / flash-decoding decode
//! for long contexts (`kernels/attention_splitk.cu`). The plain one-CTA-per-(sequence, head)
//! decode kernel stays in `ops::paged_attention_decode`; these take the same cache, table and
//! head types (`PagedKv`, `BlockTables`, `DecodeAttention`).
//!
//! Like `ops`, each launcher checks every shape, length and device it can see, compiles the
//! kernel for this head size on first use (NVRTC defines `HEAD_DIM`, `GQA_HEADS`), and launches
//! on the device's stream without synchronizing. Device data the host cannot see (lengths, block
//! ids) is bounded inside the kernels. This module never allocates per call: split-K partials
//! live in a `SplitKWorkspace` the caller keeps, so a decode step can be captured in a graph.
//! It never panics and knows nothing about requests or models.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::buffer::{DeviceBuffer, FloatElem};
use super::device::CudaDevice;
use super::error::CudaError;
use super::kernels::{Define, KernelId};
use super::ops::{
    BlockTables, DecodeAttention, MAX_DECODE_HEAD_DIM, NULL_PTR, PagedKv, check_decode_batch,
    check_paged_attention, expect_len, launch_error, to_i32, to_i64, to_u32, window_arg,
};
use crate::dtype::DType;

/// Threads per CTA of every kernel here.
const THREADS: u32 = 128;
/// The smallest per-block opt-in shared memory of the supported archs (sm_86/sm_89: 99 KB; sm_80
/// 163 KB, sm_90 227 KB): every launch stays within it, so one choice serves every card.
const PORTABLE_SMEM_LIMIT: usize = 99 * 1024;
/// Static shared memory of the tensor-core split-K kernel beside its dynamic stages (red_m and
/// red_l: SK_WARPS x GQA_HEADS floats each, at most 8 heads).
const SPLITK_MMA_STATIC_SMEM: usize = 2 * 4 * 8 * 4;

/// Largest head_dim the prefill and split-K kernels handle (the same bound as the decode
/// kernel's, which `ops::check_paged_attention` enforces for all three).
pub const MAX_HEAD_DIM: usize = MAX_DECODE_HEAD_DIM;
/// Most context splits of one split-K decode (attention_splitk.cu `SK_MAX_SPLITS`).
pub const MAX_SPLITS: usize = 256;
/// Fewest keys worth a split of their own: below this the merge costs more than it saves.
const MIN_KEYS_PER_SPLIT: usize = 256;
/// CTAs per SM the split choice aims for (enough loads in flight to saturate HBM).
const TARGET_CTAS_PER_SM: usize = 8;

// ---------------------------------------------------------------------------------------------
// prefill

/// Which prefill implementation to launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrefillKernel {
    /// The fastest for the dtype: tensor cores (mma.sync) for bf16/f16 when head_dim % 8 == 0,
    /// else the SIMT kernel.
    Fast,
    /// The tiled SIMT kernel (f32 arithmetic in shared memory), any dtype and head_dim.
    Simt,
}

/// How one prefill launch is shaped (mirrors attention_prefill.cu's tile defines).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PrefillLaunch {
    /// Entry name without the dtype suffix.
    pub op: &'static str,
    /// Whether the mma.sync tensor-core kernel runs (bf16/f16, head_dim % 8 == 0, `Fast` asked
    /// for).
    pub tensor_cores: bool,
    /// (query token, head) rows per CTA.
    pub rows_per_cta: usize,
    /// Dynamic shared memory per CTA in bytes (Q, K and V tiles).
    pub smem_bytes: usize,
}

/// The launch shape of `kernel` for `dtype` and `head_dim`.
pub fn prefill_launch(kernel: PrefillKernel, dtype: DType, head_dim: usize) -> PrefillLaunch {
    let tensor_cores =
        kernel == PrefillKernel::Fast && dtype != DType::F32 && head_dim.is_multiple_of(8);
    let op = match kernel {
        PrefillKernel::Fast => "paged_attention_prefill",
        PrefillKernel::Simt => "paged_attention_prefill_simt",
    };
    if tensor_cores {
        // TC_BM = 128 rows x TC_BN = 64 keys up to a padded head_dim of 128, 64 x 32 above; a
        // Q tile, a K tile and a V tile of 16-bit rows padded to TC_HD_PAD + 8.
        let hd_pad = head_dim.next_multiple_of(16);
        let (rows, block_n) = if hd_pad > 128 { (64, 32) } else { (128, 64) };
        PrefillLaunch {
            op,
            tensor_cores,
            rows_per_cta: rows,
            smem_bytes: (rows + 2 * block_n) * (hd_pad + 8) * 2,
        }
    } else {
        // SI_BM = 16 rows of q and one 32-key K-or-V tile with rows of head_dim + 1, all f32.
        PrefillLaunch {
            op,
            tensor_cores,
            rows_per_cta: 16,
            smem_bytes: (16 * head_dim + 32 * (head_dim + 1)) * 4,
        }
    }
}

/// The sequences of a mixed prefill/decode batch, as device buffers (`ops::attention::AttnSeq`
/// on the host).
#[derive(Debug, Clone, Copy)]
pub struct PrefillSeqs<'a> {
    /// [num_seqs]: batch row of each sequence's first query token.
    pub q_starts: &'a DeviceBuffer<i32>,
    /// [num_seqs]: query tokens of each sequence (its last q_len positions).
    pub q_lens: &'a DeviceBuffer<i32>,
    /// [num_seqs]: tokens in the cache after this step's writes.
    pub context_lens: &'a DeviceBuffer<i32>,
    /// [num_seqs, max_blocks_per_seq] physical block ids.
    pub block_tables: &'a DeviceBuffer<i32>,
    /// Columns of `block_tables`: the row stride of each sequence's block ids.
    pub max_blocks_per_seq: usize,
    /// The largest q_len of the batch, known to the host; it sizes the grid. Query tokens past
    /// it are not computed.
    pub max_q_len: usize,
}

/// Causal attention of a mixed batch over the paged cache, flash-attention style:
/// out[t, h] = softmax(q[t, h] · K[seq(t)]ᵀ * scale + alibi) · V[seq(t)], query token i of a
/// sequence at position context_len - q_len + i seeing keys up to its own position (inside the
/// window, if any).
///
/// q: [num_tokens, q_stride], head h at h * head_dim; out: [num_tokens, num_heads * head_dim];
/// alibi_slopes: [num_heads]. GQA/MQA: query head h reads kv head h / (num_heads /
/// num_kv_heads). num_tokens = out.len() / (num_heads * head_dim).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_prefill<T: FloatElem>(
    dev: &CudaDevice,
    out: &mut DeviceBuffer<T>,
    q: &DeviceBuffer<T>,
    q_stride: usize,
    cache: &PagedKv<'_, T>,
    seqs: &PrefillSeqs<'_>,
    alibi_slopes: Option<&DeviceBuffer<f32>>,
    p: &DecodeAttention,
    kernel: PrefillKernel,
) -> Result<(), CudaError> {
    const OP: &str = "paged_attention_prefill";
    check_paged_attention(OP, dev, out, q, q_stride, cache, alibi_slopes, p)?;
    for (name, buf) in [
        ("q_starts", seqs.q_starts),
        ("q_lens", seqs.q_lens),
        ("context_lens", seqs.context_lens),
        ("block_tables", seqs.block_tables),
    ] {
        dev.check_buffer(OP, name, buf)?;
    }
    let q_dim = p.num_heads * p.head_dim;
    if q_dim == 0 {
        return Ok(());
    }
    if !out.len().is_multiple_of(q_dim) {
        return Err(CudaError::length(
            OP,
            "out",
            out.len().next_multiple_of(q_dim),
            out.len(),
        ));
    }
    let num_tokens = out.len() / q_dim;
    expect_len(OP, "q", q, num_tokens * q_stride)?;
    let num_seqs = seqs.context_lens.len();
    expect_len(OP, "q_starts", seqs.q_starts, num_seqs)?;
    expect_len(OP, "q_lens", seqs.q_lens, num_seqs)?;
    expect_len(
        OP,
        "block_tables",
        seqs.block_tables,
        num_seqs * seqs.max_blocks_per_seq,
    )?;
    if num_seqs > 65_535 {
        return Err(CudaError::invalid(
            OP,
            "num_seqs",
            num_seqs,
            "must be <= 65535",
        ));
    }
    if num_tokens == 0 || num_seqs == 0 || seqs.max_q_len == 0 {
        return Ok(());
    }
    let s = &cache.shape;
    // The kernel clamps context lengths to the table, an int.
    to_i32(
        OP,
        "max_blocks_per_seq * block_size",
        seqs.max_blocks_per_seq * s.block_size,
    )?;
    let group = p.num_heads / p.num_kv_heads;
    let launch = prefill_launch(kernel, T::DTYPE, p.head_dim);
    let num_row_tiles = (seqs.max_q_len * group).div_ceil(launch.rows_per_cta);
    let cfg = LaunchConfig {
        grid_dim: (
            to_u32(OP, "row tiles", num_row_tiles)?,
            to_u32(OP, "num_kv_heads", p.num_kv_heads)?,
            to_u32(OP, "num_seqs", num_seqs)?,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: to_u32(OP, "shared memory", launch.smem_bytes)?,
    };
    let entry = format!("{}_{}", launch.op, T::DTYPE);
    let defines = [Define::new("HEAD_DIM", p.head_dim)];
    let f = dev.function_with_smem(
        KernelId::AttentionPrefill,
        &defines,
        &entry,
        launch.smem_bytes,
    )?;
    let ints = [
        to_i32(OP, "q_stride", q_stride)?,
        to_i32(OP, "num_tokens", num_tokens)?,
    ];
    let max_blocks_i = to_i32(OP, "max_blocks_per_seq", seqs.max_blocks_per_seq)?;
    let heads = [
        to_i32(OP, "num_heads", p.num_heads)?,
        to_i32(OP, "num_kv_heads", p.num_kv_heads)?,
        to_i32(OP, "block_size", s.block_size)?,
    ];
    let num_blocks_i = to_i64(OP, "num_blocks", s.num_blocks)?;
    let window_i = window_arg(OP, p)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice).arg(&q.slice);
    for i in &ints {
        b.arg(i);
    }
    b.arg(&cache.k.slice)
        .arg(&cache.v.slice)
        .arg(&seqs.q_starts.slice)
        .arg(&seqs.q_lens.slice)
        .arg(&seqs.context_lens.slice)
        .arg(&seqs.block_tables.slice)
        .arg(&max_blocks_i);
    match alibi_slopes {
        Some(a) => b.arg(&a.slice),
        None => b.arg(&NULL_PTR),
    };
    for i in &heads {
        b.arg(i);
    }
    b.arg(&num_blocks_i).arg(&p.scale).arg(&window_i);
    // SAFETY: the arguments match attention_prefill.cu's PREFILL_PARAMS (out, q, q_stride,
    // num_tokens, k_cache, v_cache, q_starts, q_lens, context_lens, block_tables,
    // max_blocks_per_seq, alibi_slopes, num_heads, num_kv_heads, block_size, num_blocks, scale,
    // sliding_window), compiled with HEAD_DIM = p.head_dim <= 256. out holds num_tokens rows of
    // num_heads * head_dim, q num_tokens rows of q_stride >= num_heads * head_dim, the caches
    // num_blocks * block_size rows of num_kv_heads * head_dim, the per-sequence buffers num_seqs
    // entries and the tables num_seqs * max_blocks_per_seq (all checked above, all on this
    // device). The kernel clamps q_starts/q_lens to num_tokens and context lengths to the table
    // and skips bad block ids. 128 threads and the dynamic shared memory the kernel's tiles need
    // (prefill_launch, limit raised above).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// split-K decode

/// Partial softmax states of split-K decode, reused across steps (allocated once, so launches
/// can be graph-captured). Holds `capacity` partials: num_seqs * num_heads * num_splits.
#[derive(Debug)]
pub struct SplitKWorkspace {
    /// [capacity] running max (log2 units)
    m: DeviceBuffer<f32>,
    /// [capacity] running sum
    l: DeviceBuffer<f32>,
    /// [capacity, head_dim] unnormalized accumulators
    acc: DeviceBuffer<f32>,
    head_dim: usize,
}

impl SplitKWorkspace {
    /// Room for batches of up to `max_num_seqs` sequences split `max_splits` ways.
    pub fn new(
        dev: &CudaDevice,
        max_num_seqs: usize,
        num_heads: usize,
        head_dim: usize,
        max_splits: usize,
    ) -> Result<Self, CudaError> {
        let capacity = max_num_seqs * num_heads * max_splits.min(MAX_SPLITS);
        Ok(SplitKWorkspace {
            m: dev.alloc_zeros(capacity)?,
            l: dev.alloc_zeros(capacity)?,
            acc: dev.alloc_zeros(capacity * head_dim)?,
            head_dim,
        })
    }

    /// Partials it holds (num_seqs * num_heads * num_splits).
    pub fn capacity(&self) -> usize {
        self.m.len()
    }
}

/// Whether split-K handles `head_dim` for `dtype` (16-byte rows: head_dim * size % 16 == 0).
/// attention_splitk.cu is compiled per dtype, so this is the whole condition: f32 takes head
/// sizes (e.g. 12) that bf16 and f16 do not.
pub fn splitk_supported(dtype: DType, head_dim: usize) -> bool {
    head_dim > 0
        && head_dim <= MAX_HEAD_DIM
        && (head_dim * dtype.size_in_bytes()).is_multiple_of(16)
}

/// Query heads one split-K CTA serves (attention_splitk.cu `GQA_HEADS`): the largest divisor of
/// the GQA group whose q and accumulator slices fit in 32 floats per thread each.
pub fn splitk_heads_per_cta(dtype: DType, head_dim: usize, group: usize) -> usize {
    // Mirrors SplitK<T>: VEC elements per 16-byte load, TPK lanes per key, VPT loads per lane.
    let vec = 16 / dtype.size_in_bytes();
    let num_vecs = (head_dim / vec).max(1);
    let tpk = (1usize << num_vecs.ilog2()).min(16);
    let floats_per_head = num_vecs.div_ceil(tpk) * vec;
    let max_heads = (32 / floats_per_head).max(1);
    (1..=max_heads.min(group))
        .rev()
        .find(|h| group.is_multiple_of(*h))
        .unwrap_or(1)
}

/// How many ways to split each context: enough CTAs to fill `num_sms` SMs
/// (TARGET_CTAS_PER_SM each), no split under MIN_KEYS_PER_SPLIT keys of the longest context,
/// at most MAX_SPLITS. 1 means no split (the kernel then writes out directly).
pub fn splitk_num_splits(
    num_sms: usize,
    num_seqs: usize,
    num_heads: usize,
    heads_per_cta: usize,
    max_context_len: usize,
) -> usize {
    let base_ctas = (num_seqs * num_heads / heads_per_cta.max(1)).max(1);
    let wanted = (num_sms * TARGET_CTAS_PER_SM).div_ceil(base_ctas);
    let most = max_context_len
        .div_ceil(MIN_KEYS_PER_SPLIT)
        .clamp(1, MAX_SPLITS);
    wanted.clamp(1, most)
}

/// How a split-K decode is cut: context splits per sequence and query heads per CTA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitKPlan {
    /// 1..=MAX_SPLITS; 1 writes out directly (one launch).
    pub num_splits: usize,
    /// Query heads of one GQA group a CTA serves (divides the group; at most 8).
    pub heads_per_cta: usize,
    /// Which kernel runs the plan: tensor cores where `splitk_mma_supported`, else SIMT.
    pub kernel: SplitKKernel,
}

/// Which split-K decode kernel runs a plan (both write the same partials and output).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitKKernel {
    /// Lanes split each key row (any dtype and supported head size).
    Simt,
    /// The CTA's query heads are the rows of mma.m16n8k16 tiles (`splitk_mma_supported`).
    TensorCore,
}

/// Whether the tensor-core split-K kernel serves this shape: bf16/f16, head_dim a multiple of
/// 16 whose K/V stages fit `PORTABLE_SMEM_LIMIT` (head_dim <= 176), and at least two query heads
/// per CTA (one head per CTA keeps the SIMT kernel, which is bound by memory there, not by its
/// per-key arithmetic).
pub fn splitk_mma_supported(dtype: DType, head_dim: usize, heads_per_cta: usize) -> bool {
    dtype != DType::F32
        && head_dim.is_multiple_of(16)
        && splitk_mma_smem_bytes(head_dim) + SPLITK_MMA_STATIC_SMEM <= PORTABLE_SMEM_LIMIT
        && (2..=8).contains(&heads_per_cta)
}

/// Dynamic shared memory of the tensor-core kernel (attention_splitk.cu's SK_MMA_SMEM_BYTES):
/// per warp, two stages of K and V tiles of 16 rows of head_dim + 8 16-bit elements.
fn splitk_mma_smem_bytes(head_dim: usize) -> usize {
    THREADS as usize / 32 * 2 * 2 * 16 * (head_dim + 8) * 2
}

impl SplitKPlan {
    /// The default plan for a decode batch: `splitk_heads_per_cta`, then `splitk_num_splits` for
    /// the longest context. Deterministic in its inputs, so a graph captured for a batch-size
    /// bucket can fix it by passing the bucket's largest context.
    pub fn choose(
        num_sms: usize,
        dtype: DType,
        num_seqs: usize,
        p: &DecodeAttention,
        max_context_len: usize,
    ) -> Self {
        let group = p.num_heads / p.num_kv_heads.max(1);
        let heads_per_cta = splitk_heads_per_cta(dtype, p.head_dim, group.max(1));
        SplitKPlan {
            num_splits: splitk_num_splits(
                num_sms,
                num_seqs,
                p.num_heads,
                heads_per_cta,
                max_context_len,
            ),
            heads_per_cta,
            kernel: match splitk_mma_supported(dtype, p.head_dim, heads_per_cta) {
                true => SplitKKernel::TensorCore,
                false => SplitKKernel::Simt,
            },
        }
    }
}

/// Decode attention over the paged cache with the context split across CTAs (flash-decoding):
/// the same function as `ops::paged_attention_decode`, in two launches when num_splits > 1
/// (partials into `workspace`, then their merge).
///
/// q: [num_seqs, q_stride], head h at h * head_dim; out: [num_seqs, num_heads, head_dim];
/// alibi_slopes: [num_heads]. `plan` usually from `SplitKPlan::choose`; needs
/// `splitk_supported(T::DTYPE, head_dim)` and q_stride * size_of::<T>() % 16 == 0.
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_decode_splitk<T: FloatElem>(
    dev: &CudaDevice,
    out: &mut DeviceBuffer<T>,
    q: &DeviceBuffer<T>,
    q_stride: usize,
    cache: &PagedKv<'_, T>,
    tables: &BlockTables<'_>,
    alibi_slopes: Option<&DeviceBuffer<f32>>,
    p: &DecodeAttention,
    plan: SplitKPlan,
    workspace: &mut SplitKWorkspace,
) -> Result<(), CudaError> {
    const OP: &str = "paged_attention_decode_splitk";
    let SplitKPlan {
        num_splits,
        heads_per_cta,
        kernel,
    } = plan;
    check_paged_attention(OP, dev, out, q, q_stride, cache, alibi_slopes, p)?;
    let num_seqs = check_decode_batch(OP, dev, out, q, q_stride, tables, p)?;
    for (name, buf) in [
        ("workspace m", &workspace.m),
        ("workspace l", &workspace.l),
        ("workspace acc", &workspace.acc),
    ] {
        dev.check_buffer(OP, name, buf)?;
    }
    let elem = T::DTYPE.size_in_bytes();
    if !splitk_supported(T::DTYPE, p.head_dim) {
        return Err(CudaError::invalid(
            OP,
            "head_dim",
            p.head_dim,
            format!("head_dim * {elem} bytes must be a multiple of 16"),
        ));
    }
    if !(q_stride * elem).is_multiple_of(16) {
        return Err(CudaError::invalid(
            OP,
            "q_stride",
            q_stride,
            format!("q_stride * {elem} bytes must be a multiple of 16"),
        ));
    }
    if num_splits == 0 || num_splits > MAX_SPLITS {
        return Err(CudaError::invalid(
            OP,
            "num_splits",
            num_splits,
            format!("must be in 1..={MAX_SPLITS}"),
        ));
    }
    let num_partials = num_seqs * p.num_heads * num_splits;
    if num_splits > 1 && (workspace.head_dim != p.head_dim || workspace.capacity() < num_partials) {
        return Err(CudaError::invalid(
            OP,
            "workspace",
            format!(
                "{} partials of head_dim {}",
                workspace.capacity(),
                workspace.head_dim
            ),
            format!(
                "needs {num_partials} partials (num_seqs {num_seqs} * num_heads {} * num_splits \
                 {num_splits}) of head_dim {}",
                p.num_heads, p.head_dim
            ),
        ));
    }
    if num_seqs == 0 || p.num_heads == 0 {
        return Ok(());
    }
    let s = &cache.shape;
    to_i32(
        OP,
        "max_blocks_per_seq * block_size",
        tables.max_blocks_per_seq * s.block_size,
    )?;
    let group = p.num_heads / p.num_kv_heads;
    if heads_per_cta == 0 || heads_per_cta > 8 || !group.is_multiple_of(heads_per_cta) {
        return Err(CudaError::invalid(
            OP,
            "heads_per_cta",
            heads_per_cta,
            format!("must be in 1..=8 and divide the GQA group {group}"),
        ));
    }
    // One module per (dtype, head size, heads per CTA): attention_splitk.cu is compiled per
    // dtype, so a head size only f32 supports still compiles for f32.
    let mut defines = vec![
        Define::new("HEAD_DIM", p.head_dim),
        Define::new("GQA_HEADS", heads_per_cta),
    ];
    defines.extend(KernelId::AttentionSplitK.dtype_defines(T::DTYPE));
    if kernel == SplitKKernel::TensorCore
        && !splitk_mma_supported(T::DTYPE, p.head_dim, heads_per_cta)
    {
        return Err(CudaError::invalid(
            OP,
            "kernel",
            "TensorCore",
            format!(
                "the tensor-core kernel needs bf16/f16, head_dim % 16 == 0 and 2..=8 heads per \
                 CTA (got {}, {}, {heads_per_cta})",
                T::DTYPE,
                p.head_dim
            ),
        ));
    }
    let (entry, smem) = match kernel {
        SplitKKernel::TensorCore => (
            format!("paged_attention_splitk_mma_{}", T::DTYPE),
            splitk_mma_smem_bytes(p.head_dim),
        ),
        SplitKKernel::Simt => (format!("paged_attention_splitk_{}", T::DTYPE), 0),
    };
    let f = dev.function_with_smem(KernelId::AttentionSplitK, &defines, &entry, smem)?;
    let cfg = LaunchConfig {
        grid_dim: (
            to_u32(OP, "num_heads / heads_per_cta", p.num_heads / heads_per_cta)?,
            to_u32(OP, "num_seqs", num_seqs)?,
            to_u32(OP, "num_splits", num_splits)?,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: smem as u32,
    };
    let q_stride_i = to_i32(OP, "q_stride", q_stride)?;
    let max_blocks_i = to_i32(OP, "max_blocks_per_seq", tables.max_blocks_per_seq)?;
    let heads = [
        to_i32(OP, "num_heads", p.num_heads)?,
        to_i32(OP, "num_kv_heads", p.num_kv_heads)?,
        to_i32(OP, "block_size", s.block_size)?,
    ];
    let num_blocks_i = to_i64(OP, "num_blocks", s.num_blocks)?;
    let window_i = window_arg(OP, p)?;
    let num_splits_i = to_i32(OP, "num_splits", num_splits)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice)
        .arg(&mut workspace.m.slice)
        .arg(&mut workspace.l.slice)
        .arg(&mut workspace.acc.slice)
        .arg(&q.slice)
        .arg(&q_stride_i)
        .arg(&cache.k.slice)
        .arg(&cache.v.slice)
        .arg(&tables.block_tables.slice)
        .arg(&max_blocks_i)
        .arg(&tables.context_lens.slice);
    match alibi_slopes {
        Some(a) => b.arg(&a.slice),
        None => b.arg(&NULL_PTR),
    };
    for i in &heads {
        b.arg(i);
    }
    b.arg(&num_blocks_i)
        .arg(&p.scale)
        .arg(&window_i)
        .arg(&num_splits_i);
    // SAFETY: the arguments match attention_splitk.cu's paged_attention_splitk and
    // paged_attention_splitk_mma (same signature; the latter only where splitk_mma_supported,
    // checked, with its SK_MMA_SMEM_BYTES of dynamic shared memory allowed when loaded) (out, part_m,
    // part_l, part_acc, q, q_stride, k_cache, v_cache, block_tables, max_blocks_per_seq,
    // context_lens, alibi_slopes, num_heads, num_kv_heads, block_size, num_blocks, scale,
    // sliding_window, num_splits), compiled with HEAD_DIM = p.head_dim (16-byte rows, checked)
    // and GQA_HEADS dividing the group. out holds num_seqs * num_heads * head_dim elements, q
    // num_seqs rows of q_stride (16-byte aligned rows), the caches and tables their shapes, and
    // with num_splits > 1 the workspace num_seqs * num_heads * num_splits partials (all checked
    // above, all on this device). The kernel clamps context lengths to the table and skips bad
    // block ids; 128 threads.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    if num_splits == 1 {
        return Ok(());
    }
    let entry = format!("paged_attention_splitk_reduce_{}", T::DTYPE);
    let f = dev.function(KernelId::AttentionSplitK, &defines, &entry)?;
    let cfg = LaunchConfig {
        grid_dim: (
            to_u32(OP, "num_heads", p.num_heads)?,
            to_u32(OP, "num_seqs", num_seqs)?,
            1,
        ),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice)
        .arg(&workspace.m.slice)
        .arg(&workspace.l.slice)
        .arg(&workspace.acc.slice)
        .arg(&num_splits_i);
    // SAFETY: the arguments match paged_attention_splitk_reduce (out, part_m, part_l, part_acc,
    // num_splits), same HEAD_DIM; grid (num_heads, num_seqs) reads the num_seqs * num_heads *
    // num_splits partials the launch above wrote (the workspace holds at least that many,
    // checked) and writes out's num_seqs * num_heads * head_dim elements; num_splits <=
    // MAX_SPLITS = SK_MAX_SPLITS, the size of the kernel's weight array.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefill_launch_picks_tensor_cores_for_16_bit_types_only() {
        let tc = prefill_launch(PrefillKernel::Fast, DType::BF16, 128);
        assert!(tc.tensor_cores);
        assert_eq!(tc.rows_per_cta, 128);
        // Q tile 128 rows + a K and a V tile of 64 keys, rows of 128 + 8 bf16.
        assert_eq!(tc.smem_bytes, (128 + 128) * 136 * 2);
        // head_dim 256: 64 rows, 32-key tiles.
        let hd256 = prefill_launch(PrefillKernel::Fast, DType::F16, 256);
        assert_eq!(hd256.rows_per_cta, 64);
        assert_eq!(hd256.smem_bytes, (64 + 64) * 264 * 2);
        // head_dim 80 pads to 80 (a multiple of 16); 72 pads to 80.
        assert_eq!(
            prefill_launch(PrefillKernel::Fast, DType::F16, 72).smem_bytes,
            prefill_launch(PrefillKernel::Fast, DType::F16, 80).smem_bytes
        );
        let f32_fast = prefill_launch(PrefillKernel::Fast, DType::F32, 128);
        assert!(!f32_fast.tensor_cores);
        assert_eq!(f32_fast.op, "paged_attention_prefill");
        assert_eq!(f32_fast.smem_bytes, (16 * 128 + 32 * 129) * 4);
        let simt = prefill_launch(PrefillKernel::Simt, DType::BF16, 128);
        assert!(!simt.tensor_cores);
        assert_eq!(simt.op, "paged_attention_prefill_simt");
        // A head_dim the tensor-core path cannot take falls back to SIMT.
        assert!(!prefill_launch(PrefillKernel::Fast, DType::BF16, 36).tensor_cores);
        // Every shape fits the smallest opt-in shared memory of the tested archs (sm_89: 99 KB).
        for hd in [64, 80, 96, 128, 256] {
            for dt in [DType::F32, DType::BF16, DType::F16] {
                for k in [PrefillKernel::Fast, PrefillKernel::Simt] {
                    assert!(
                        prefill_launch(k, dt, hd).smem_bytes <= PORTABLE_SMEM_LIMIT,
                        "{k:?} {dt} {hd}"
                    );
                }
            }
        }
    }

    #[test]
    fn splitk_heads_per_cta_divides_the_group_and_bounds_registers() {
        // bf16 head_dim 128: 8 floats of q per head per thread -> up to 4 heads.
        assert_eq!(splitk_heads_per_cta(DType::BF16, 128, 4), 4);
        assert_eq!(splitk_heads_per_cta(DType::BF16, 128, 8), 4);
        assert_eq!(splitk_heads_per_cta(DType::BF16, 128, 1), 1);
        // group 12 (MQA, 12 heads): largest divisor <= 4 is 4; group 6 -> 3.
        assert_eq!(splitk_heads_per_cta(DType::BF16, 128, 12), 4);
        assert_eq!(splitk_heads_per_cta(DType::BF16, 128, 6), 3);
        // bf16 head_dim 80: 10 vectors over 8 lanes, 2 each -> 16 floats -> 2 heads.
        assert_eq!(splitk_heads_per_cta(DType::BF16, 80, 4), 2);
        // f32 head_dim 256: 64 vectors over 16 lanes, 4 each -> 16 floats -> 2 heads.
        assert_eq!(splitk_heads_per_cta(DType::F32, 256, 8), 2);
        for dt in [DType::F32, DType::BF16, DType::F16] {
            for hd in [64, 80, 96, 128, 256] {
                for group in 1..=16 {
                    let h = splitk_heads_per_cta(dt, hd, group);
                    assert!(h >= 1 && group % h == 0 && h <= 8, "{dt} {hd} {group}: {h}");
                }
            }
        }
    }

    #[test]
    fn splitk_mma_serves_16_bit_gqa_ctas_of_16_multiple_head_sizes() {
        assert!(splitk_mma_supported(DType::BF16, 128, 4));
        assert!(splitk_mma_supported(DType::F16, 80, 2));
        assert!(!splitk_mma_supported(DType::F32, 128, 4));
        assert!(!splitk_mma_supported(DType::BF16, 128, 1));
        assert!(!splitk_mma_supported(DType::BF16, 72, 4));
        assert!(!splitk_mma_supported(DType::BF16, 128, 16));
        // Its stages fit the 99 KB of sm_86/sm_89 up to head_dim 176; 256 stays on SIMT.
        assert!(splitk_mma_supported(DType::BF16, 176, 2));
        assert!(!splitk_mma_supported(DType::BF16, 192, 2));
        assert!(!splitk_mma_supported(DType::F16, 256, 2));
        for hd in (16..=256).step_by(16) {
            if splitk_mma_supported(DType::BF16, hd, 4) {
                assert!(splitk_mma_smem_bytes(hd) + SPLITK_MMA_STATIC_SMEM <= 99 * 1024);
            }
        }
        let p = DecodeAttention {
            num_heads: 32,
            num_kv_heads: 8,
            head_dim: 128,
            scale: 1.0,
            sliding_window: None,
        };
        let kernel = |dt, p: &DecodeAttention| SplitKPlan::choose(132, dt, 8, p, 4096).kernel;
        assert_eq!(kernel(DType::BF16, &p), SplitKKernel::TensorCore);
        assert_eq!(kernel(DType::F32, &p), SplitKKernel::Simt);
        let mha = DecodeAttention {
            num_kv_heads: 32,
            ..p
        };
        assert_eq!(kernel(DType::BF16, &mha), SplitKKernel::Simt);
        // Two stages of K and V, 16 rows of 136 elements, 4 warps.
        assert_eq!(splitk_mma_smem_bytes(128), 4 * 2 * 2 * 16 * 136 * 2);
    }

    #[test]
    fn splitk_num_splits_fills_the_gpu_only_for_long_contexts_at_small_batch() {
        // H100: 132 SMs. Batch 1, 32 heads, 16k context: 33 splits of ~500 keys.
        assert_eq!(splitk_num_splits(132, 1, 32, 1, 16384), 33);
        // Short context: capped by MIN_KEYS_PER_SPLIT.
        assert_eq!(splitk_num_splits(132, 1, 32, 1, 512), 2);
        assert_eq!(splitk_num_splits(132, 1, 32, 1, 1), 1);
        // Large batch already fills the GPU.
        assert_eq!(splitk_num_splits(132, 64, 32, 1, 16384), 1);
        // Never above MAX_SPLITS, never 0.
        assert_eq!(splitk_num_splits(10_000, 1, 1, 1, 1 << 20), MAX_SPLITS);
        assert_eq!(splitk_num_splits(132, 0, 0, 0, 0), 1);
    }

    #[test]
    fn splitk_supports_16_byte_rows_only() {
        assert!(splitk_supported(DType::BF16, 128));
        assert!(splitk_supported(DType::BF16, 80));
        assert!(!splitk_supported(DType::BF16, 36));
        assert!(splitk_supported(DType::F32, 36));
        // Per dtype: 48-byte f32 rows, 24-byte bf16/f16 rows.
        assert!(splitk_supported(DType::F32, 12));
        assert!(!splitk_supported(DType::BF16, 12));
        assert!(!splitk_supported(DType::F16, 12));
        assert!(!splitk_supported(DType::F32, 6));
        assert!(!splitk_supported(DType::F16, 264));
        assert!(!splitk_supported(DType::F16, 0));
    }
}
