//! Writing k and v rows into the paged KV cache, alone or fused with rotary (one launch per
//! decode step instead of two), and the cache's shape.

use cudarc::driver::PushKernelArg;

use super::rotary::{RotaryLayout, check_rotary};
use super::{entry, expect_len, grid, launch_error, to_i32, to_i64, to_u32};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::CudaError;
use crate::cuda::kernels::KernelId;
use crate::tensor::RopeStyle;

/// Shape of one layer's paged K (or V) cache: `[num_blocks, block_size, num_kv_heads, head_dim]`.
///
/// ```text
///   position p of a sequence -> block block_table[p / block_size], row p % block_size
///   slot = block_id * block_size + p % block_size; a slot's row is kv_dim = num_kv_heads *
///   head_dim contiguous elements
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheShape {
    /// Physical KV blocks in the layer's cache.
    pub num_blocks: usize,
    /// Tokens (slots) per block.
    pub block_size: usize,
    /// Key/value heads stored per token.
    pub num_kv_heads: usize,
    /// Elements per head.
    pub head_dim: usize,
}

impl KvCacheShape {
    /// Elements of one token's K (or V) row: `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Token slots in the cache: `num_blocks * block_size`.
    pub fn num_slots(&self) -> usize {
        self.num_blocks * self.block_size
    }

    /// Elements of one of K or V.
    pub fn num_elements(&self) -> usize {
        self.num_slots() * self.kv_dim()
    }
}

/// Where a token's k and v rows sit in the source buffer (e.g. inside a fused qkv row).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvSource {
    /// Elements per token row.
    pub row_stride: usize,
    /// Element offset of k head 0 within a source row.
    pub k_offset: usize,
    /// Element offset of v head 0 within a source row.
    pub v_offset: usize,
}

/// Writes token t's k and v (`kv_dim` each, read from `src` at `layout`) to slot
/// `slot_mapping[t]` of the caches. A negative slot (padding) is skipped; so is a slot past the
/// cache (bad device data cannot write outside it).
///
/// k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim];
/// src: [num_tokens, row_stride]; slot_mapping: [num_tokens].
pub fn kv_cache_write<T: FloatElem>(
    dev: &CudaDevice,
    k_cache: &mut DeviceBuffer<T>,
    v_cache: &mut DeviceBuffer<T>,
    shape: &KvCacheShape,
    src: &DeviceBuffer<T>,
    layout: &KvSource,
    slot_mapping: &DeviceBuffer<i64>,
) -> Result<(), CudaError> {
    const OP: &str = "kv_cache_write";
    let num_tokens = check_kv_write(OP, dev, k_cache, v_cache, shape, src, layout, slot_mapping)?;
    let kv_dim = shape.kv_dim();
    if num_tokens == 0 || kv_dim == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::KvCache, &[], &entry)?;
    let ints = [
        to_i32(OP, "row_stride", layout.row_stride)?,
        to_i32(OP, "k_offset", layout.k_offset)?,
        to_i32(OP, "v_offset", layout.v_offset)?,
        to_i32(OP, "kv_dim", kv_dim)?,
    ];
    let num_slots = to_i64(OP, "num_slots", shape.num_slots())?;
    // One CTA per token looping over kv_dim: up to 1024 threads (few iterations per token).
    let threads = kv_dim.next_multiple_of(32).clamp(32, 1024) as u32;
    let cfg = grid((to_u32(OP, "num_tokens", num_tokens)?, 1), threads);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut k_cache.slice)
        .arg(&mut v_cache.slice)
        .arg(&src.slice)
        .arg(&slot_mapping.slice);
    for i in &ints {
        b.arg(i);
    }
    b.arg(&num_slots);
    // SAFETY: the arguments match kv_cache.cu's signature (k_cache, v_cache, src, slot_mapping,
    // row_stride, k_offset, v_offset, kv_dim, num_slots); the caches hold num_slots * kv_dim
    // elements, src num_tokens rows of row_stride with both k and v inside the row, slot_mapping
    // num_tokens (checked above, all on this device); the kernel skips slots outside
    // [0, num_slots).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// `rotary` and `kv_cache_write` in one launch (a decode step pays for every launch): q and k
/// heads rotate in place as `rotary` does, and each token's rotated k and its v go to slot
/// `slot_mapping[t]` of the caches as `kv_cache_write` does (padding slots write nothing).
/// `kv.k_offset` must equal `rotary.k_offset` and both describe the same qkv rows.
#[allow(clippy::too_many_arguments)]
pub fn rotary_kv_cache_write<T: FloatElem>(
    dev: &CudaDevice,
    qkv: &mut DeviceBuffer<T>,
    positions: &DeviceBuffer<u32>,
    inv_freq: &DeviceBuffer<f32>,
    rotary: &RotaryLayout,
    k_cache: &mut DeviceBuffer<T>,
    v_cache: &mut DeviceBuffer<T>,
    shape: &KvCacheShape,
    kv: &KvSource,
    slot_mapping: &DeviceBuffer<i64>,
) -> Result<(), CudaError> {
    const OP: &str = "rotary_kv_write";
    let num_tokens = check_rotary(OP, dev, qkv, positions, inv_freq, rotary)?;
    if slot_mapping.len() != num_tokens {
        return Err(CudaError::invalid(
            OP,
            "slot_mapping",
            slot_mapping.len(),
            format!("must hold one slot per position ({num_tokens})"),
        ));
    }
    check_kv_write(OP, dev, k_cache, v_cache, shape, qkv, kv, slot_mapping)?;
    if kv.row_stride != rotary.row_stride || kv.k_offset != rotary.k_offset {
        return Err(CudaError::invalid(
            OP,
            "kv source",
            format!("row_stride {} k_offset {}", kv.row_stride, kv.k_offset),
            format!(
                "must equal the rotary layout's row_stride {} and k_offset {}",
                rotary.row_stride, rotary.k_offset
            ),
        ));
    }
    if shape.num_kv_heads != rotary.num_kv_heads || shape.head_dim != rotary.head_dim {
        return Err(CudaError::invalid(
            OP,
            "cache shape",
            format!("{} kv heads of {}", shape.num_kv_heads, shape.head_dim),
            format!(
                "must match the rotary layout's {} kv heads of {}",
                rotary.num_kv_heads, rotary.head_dim
            ),
        ));
    }
    // v is copied while q and k rotate in place (one kernel, no barrier between them): it must
    // not overlap the rotated heads.
    let kv_dim = shape.kv_dim();
    let q_end = rotary.num_q_heads * rotary.head_dim;
    let (k_start, k_end) = (kv.k_offset, kv.k_offset + kv_dim);
    let (v_start, v_end) = (kv.v_offset, kv.v_offset + kv_dim);
    let overlaps = |start: usize, end: usize| v_start < end && start < v_end;
    if kv_dim > 0 && (overlaps(0, q_end) || overlaps(k_start, k_end)) {
        return Err(CudaError::invalid(
            OP,
            "v_offset",
            kv.v_offset,
            format!(
                "v [{v_start}, {v_end}) must not overlap the q heads [0, {q_end}) or the k heads \
                 [{k_start}, {k_end})"
            ),
        ));
    }
    let l = rotary;
    if num_tokens == 0 || l.num_q_heads + l.num_kv_heads == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Rotary, &[], &entry)?;
    let ints = [
        to_i32(OP, "row_stride", l.row_stride)?,
        to_i32(OP, "num_q_heads", l.num_q_heads)?,
        to_i32(OP, "num_kv_heads", l.num_kv_heads)?,
        to_i32(OP, "k_offset", l.k_offset)?,
        to_i32(OP, "v_offset", kv.v_offset)?,
        to_i32(OP, "head_dim", l.head_dim)?,
        to_i32(OP, "rotary_dim", l.rotary_dim)?,
        match l.style {
            RopeStyle::NeoX => 0,
            RopeStyle::GptJ => 1,
        },
    ];
    let num_slots = to_i64(OP, "num_slots", shape.num_slots())?;
    let num_pairs = (l.num_q_heads + l.num_kv_heads) * (l.rotary_dim / 2);
    let threads = num_pairs
        .max(shape.kv_dim())
        .next_multiple_of(32)
        .clamp(32, 1024) as u32;
    let cfg = grid((to_u32(OP, "num_tokens", num_tokens)?, 1), threads);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut qkv.slice)
        .arg(&mut k_cache.slice)
        .arg(&mut v_cache.slice)
        .arg(&positions.slice)
        .arg(&slot_mapping.slice)
        .arg(&inv_freq.slice);
    for a in &ints {
        b.arg(a);
    }
    b.arg(&num_slots);
    // SAFETY: the arguments match rotary.cu's rotary_kv_write signature (qkv, k_cache, v_cache,
    // positions, slot_mapping, inv_freq, row_stride, num_q_heads, num_kv_heads, k_offset,
    // v_offset, head_dim, rotary_dim, style, num_slots); qkv holds num_tokens rows of
    // row_stride with every q/k head and the v part inside its row, positions and slot_mapping
    // num_tokens, inv_freq rotary_dim / 2, the caches num_slots * kv_dim elements (checked
    // above, all on this device); the kernel skips slots outside [0, num_slots).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// Checks `kv_cache_write`'s arguments; returns num_tokens.
#[allow(clippy::too_many_arguments)]
fn check_kv_write<T: FloatElem>(
    op: &'static str,
    dev: &CudaDevice,
    k_cache: &DeviceBuffer<T>,
    v_cache: &DeviceBuffer<T>,
    shape: &KvCacheShape,
    src: &DeviceBuffer<T>,
    layout: &KvSource,
    slot_mapping: &DeviceBuffer<i64>,
) -> Result<usize, CudaError> {
    dev.check_buffer(op, "k_cache", k_cache)?;
    dev.check_buffer(op, "v_cache", v_cache)?;
    dev.check_buffer(op, "src", src)?;
    dev.check_buffer(op, "slot_mapping", slot_mapping)?;
    expect_len(op, "k_cache", k_cache, shape.num_elements())?;
    expect_len(op, "v_cache", v_cache, shape.num_elements())?;
    let kv_dim = shape.kv_dim();
    for (what, offset) in [("k_offset", layout.k_offset), ("v_offset", layout.v_offset)] {
        if offset + kv_dim > layout.row_stride {
            return Err(CudaError::invalid(
                op,
                what,
                offset,
                format!(
                    "offset + kv_dim {kv_dim} must be <= row_stride {}",
                    layout.row_stride
                ),
            ));
        }
    }
    let num_tokens = slot_mapping.len();
    expect_len(op, "src", src, num_tokens * layout.row_stride)?;
    Ok(num_tokens)
}
