//! The arguments every paged-attention launcher shares (`PagedKv`, `BlockTables`,
//! `DecodeAttention`) and their checks, and the plain decode kernel (`paged_attention_decode`).
//! Prefill and split-K decode attention live in `cuda::attention` and use the same checks.

use cudarc::driver::PushKernelArg;

use super::kv_cache::KvCacheShape;
use super::{NULL_PTR, entry, expect_len, grid, launch_error, to_i32, to_i64, to_u32};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::CudaError;
use crate::cuda::kernels::KernelId;

/// Head configuration of decode attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeAttention {
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; divides `num_heads` (query head h reads kv head h / (num_heads /
    /// num_kv_heads)).
    pub num_kv_heads: usize,
    /// Elements per head, 1..=`MAX_DECODE_HEAD_DIM`.
    pub head_dim: usize,
    /// Multiplies q·k before the softmax (usually 1/sqrt(head_dim)).
    pub scale: f32,
    /// Attend only to the last `w` positions (the query's own included).
    pub sliding_window: Option<usize>,
}

/// Largest head_dim of the paged-attention kernels: attention.cu `PA_MAX_HEAD_DIM`, and the
/// `HEAD_DIM` bound of attention_prefill.cu and attention_splitk.cu (`attention::MAX_HEAD_DIM`).
pub const MAX_DECODE_HEAD_DIM: usize = 256;

/// One layer's paged cache, as attention reads it.
#[derive(Debug, Clone, Copy)]
pub struct PagedKv<'a, T> {
    /// [num_blocks, block_size, num_kv_heads, head_dim]
    pub k: &'a DeviceBuffer<T>,
    /// [num_blocks, block_size, num_kv_heads, head_dim]
    pub v: &'a DeviceBuffer<T>,
    /// Layout of `k` and `v`, each `num_elements()` long.
    pub shape: KvCacheShape,
}

/// The sequences of a decode batch: their block tables and context lengths.
#[derive(Debug, Clone, Copy)]
pub struct BlockTables<'a> {
    /// [num_seqs, max_blocks_per_seq] physical block ids; entries past a sequence's blocks are
    /// ignored.
    pub block_tables: &'a DeviceBuffer<i32>,
    /// Columns of `block_tables`: the row stride of each sequence's block ids.
    pub max_blocks_per_seq: usize,
    /// [num_seqs]: tokens in the cache for each sequence, this step's token included (its query
    /// sits at position context_len - 1).
    pub context_lens: &'a DeviceBuffer<i32>,
}

/// The argument checks the three paged-attention launchers share (`paged_attention_decode`,
/// `attention::paged_attention_decode_splitk`, `attention::paged_attention_prefill`): out, q,
/// the caches and alibi_slopes on this device; num_kv_heads > 0 dividing num_heads; head_dim in
/// 1..=MAX_DECODE_HEAD_DIM; the cache shape matching the heads, with block_size > 0, and each
/// cache holding num_elements() of it; q_stride >= num_heads * head_dim; alibi_slopes of
/// num_heads; a sliding window > 0. Errors name `op`, the field, its bound and its value. The
/// batch lengths (q, out, tables) depend on the launcher's batch layout and stay with it.
///
/// q: [num_rows, q_stride]; cache: [num_blocks, block_size, num_kv_heads, head_dim] each.
#[allow(clippy::too_many_arguments)]
pub(crate) fn check_paged_attention<T>(
    op: &'static str,
    dev: &CudaDevice,
    out: &DeviceBuffer<T>,
    q: &DeviceBuffer<T>,
    q_stride: usize,
    cache: &PagedKv<'_, T>,
    alibi_slopes: Option<&DeviceBuffer<f32>>,
    p: &DecodeAttention,
) -> Result<(), CudaError> {
    for (name, buf) in [
        ("out", out),
        ("q", q),
        ("k cache", cache.k),
        ("v cache", cache.v),
    ] {
        dev.check_buffer(op, name, buf)?;
    }
    if p.num_kv_heads == 0 || !p.num_heads.is_multiple_of(p.num_kv_heads) {
        return Err(CudaError::invalid(
            op,
            "num_kv_heads",
            p.num_kv_heads,
            format!("must be > 0 and divide num_heads {}", p.num_heads),
        ));
    }
    if p.head_dim == 0 || p.head_dim > MAX_DECODE_HEAD_DIM {
        return Err(CudaError::invalid(
            op,
            "head_dim",
            p.head_dim,
            format!("must be in 1..={MAX_DECODE_HEAD_DIM}"),
        ));
    }
    let s = &cache.shape;
    if s.num_kv_heads != p.num_kv_heads || s.head_dim != p.head_dim || s.block_size == 0 {
        return Err(CudaError::invalid(
            op,
            "cache shape",
            format!("{s:?}"),
            format!(
                "must have num_kv_heads {}, head_dim {} and block_size > 0",
                p.num_kv_heads, p.head_dim
            ),
        ));
    }
    expect_len(op, "k cache", cache.k, s.num_elements())?;
    expect_len(op, "v cache", cache.v, s.num_elements())?;
    if q_stride < p.num_heads * p.head_dim {
        return Err(CudaError::invalid(
            op,
            "q_stride",
            q_stride,
            format!(
                "must be >= num_heads * head_dim = {}",
                p.num_heads * p.head_dim
            ),
        ));
    }
    if let Some(a) = alibi_slopes {
        dev.check_buffer(op, "alibi_slopes", a)?;
        expect_len(op, "alibi_slopes", a, p.num_heads)?;
    }
    if let Some(0) = p.sliding_window {
        return Err(CudaError::invalid(op, "sliding_window", 0, "must be > 0"));
    }
    Ok(())
}

/// What the two decode launchers (`paged_attention_decode`,
/// `attention::paged_attention_decode_splitk`) check on top of `check_paged_attention`: the
/// tables on this device and the batch lengths of one query token per sequence, num_seqs =
/// context_lens.len() <= 65535 (a grid dimension). Returns num_seqs.
///
/// q: [num_seqs, q_stride]; out: [num_seqs, num_heads, head_dim]; block_tables: [num_seqs,
/// max_blocks_per_seq].
pub(crate) fn check_decode_batch<T>(
    op: &'static str,
    dev: &CudaDevice,
    out: &DeviceBuffer<T>,
    q: &DeviceBuffer<T>,
    q_stride: usize,
    tables: &BlockTables<'_>,
    p: &DecodeAttention,
) -> Result<usize, CudaError> {
    dev.check_buffer(op, "block_tables", tables.block_tables)?;
    dev.check_buffer(op, "context_lens", tables.context_lens)?;
    let num_seqs = tables.context_lens.len();
    expect_len(op, "q", q, num_seqs * q_stride)?;
    expect_len(op, "out", out, num_seqs * p.num_heads * p.head_dim)?;
    expect_len(
        op,
        "block_tables",
        tables.block_tables,
        num_seqs * tables.max_blocks_per_seq,
    )?;
    if num_seqs > 65_535 {
        return Err(CudaError::invalid(
            op,
            "num_seqs",
            num_seqs,
            "must be <= 65535",
        ));
    }
    Ok(num_seqs)
}

/// The kernels' `sliding_window` argument: 0 for none (`check_paged_attention` rejected
/// Some(0)).
pub(crate) fn window_arg(op: &'static str, p: &DecodeAttention) -> Result<i32, CudaError> {
    match p.sliding_window {
        None => Ok(0),
        Some(w) => to_i32(op, "sliding_window", w),
    }
}

/// Decode attention over the paged cache, one query token per sequence:
/// out[s, h] = softmax(q[s, h] · K[s]ᵀ * scale + alibi) · V[s], keys limited by the window.
///
/// q: [num_seqs, q_stride], head h at h * head_dim; out: [num_seqs, num_heads, head_dim];
/// alibi_slopes: [num_heads]. GQA/MQA: query head h reads kv head h / (num_heads / num_kv_heads).
#[allow(clippy::too_many_arguments)]
pub fn paged_attention_decode<T: FloatElem>(
    dev: &CudaDevice,
    out: &mut DeviceBuffer<T>,
    q: &DeviceBuffer<T>,
    q_stride: usize,
    cache: &PagedKv<'_, T>,
    tables: &BlockTables<'_>,
    alibi_slopes: Option<&DeviceBuffer<f32>>,
    p: &DecodeAttention,
) -> Result<(), CudaError> {
    const OP: &str = "paged_attention_decode";
    check_paged_attention(OP, dev, out, q, q_stride, cache, alibi_slopes, p)?;
    let num_seqs = check_decode_batch(OP, dev, out, q, q_stride, tables, p)?;
    let s = &cache.shape;
    if num_seqs == 0 || p.num_heads == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Attention, &[], &entry)?;
    let q_stride_i = to_i32(OP, "q_stride", q_stride)?;
    let max_blocks_i = to_i32(OP, "max_blocks_per_seq", tables.max_blocks_per_seq)?;
    // The kernel clamps context lengths to max_blocks_per_seq * block_size, an int.
    to_i32(
        OP,
        "max_blocks_per_seq * block_size",
        tables.max_blocks_per_seq * s.block_size,
    )?;
    let num_kv_heads_i = to_i32(OP, "num_kv_heads", p.num_kv_heads)?;
    let head_dim_i = to_i32(OP, "head_dim", p.head_dim)?;
    let block_size_i = to_i32(OP, "block_size", s.block_size)?;
    let num_blocks_i = to_i64(OP, "num_blocks", s.num_blocks)?;
    let window_i = window_arg(OP, p)?;
    let cfg = grid(
        (
            to_u32(OP, "num_heads", p.num_heads)?,
            to_u32(OP, "num_seqs", num_seqs)?,
        ),
        128,
    );
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice)
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
    b.arg(&num_kv_heads_i)
        .arg(&head_dim_i)
        .arg(&block_size_i)
        .arg(&num_blocks_i)
        .arg(&p.scale)
        .arg(&window_i);
    // SAFETY: the arguments match attention.cu's signature (out, q, q_stride, k_cache, v_cache,
    // block_tables, max_blocks_per_seq, context_lens, alibi_slopes, num_kv_heads, head_dim,
    // block_size, num_blocks, scale, sliding_window); every buffer holds the elements its shape
    // needs (checked above, all on this device); head_dim <= PA_MAX_HEAD_DIM and the block has
    // PA_NUM_WARPS * 32 = 128 threads; the kernel skips block ids outside [0, num_blocks) and
    // clamps context lengths to the table.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}
