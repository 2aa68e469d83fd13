//! Rotary position embedding of the q and k heads of a fused qkv row, in place (NeoX or GPT-J
//! pairing, partial rotary dims). `check_rotary` is shared with the fused rotary + KV write.

use cudarc::driver::PushKernelArg;

use super::{entry, expect_len, grid, launch_error, to_i32, to_u32};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::CudaError;
use crate::cuda::kernels::KernelId;
use crate::tensor::RopeStyle;

/// Where q and k heads sit in a fused qkv row, and how they rotate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotaryLayout {
    /// Elements per token row of the qkv buffer.
    pub row_stride: usize,
    /// Query heads, contiguous `head_dim` elements each from offset 0 of the row.
    pub num_q_heads: usize,
    /// Key heads, contiguous from `k_offset` (fewer than `num_q_heads` under GQA/MQA).
    pub num_kv_heads: usize,
    /// Element offset of k head 0 in a row (q head 0 is at 0).
    pub k_offset: usize,
    /// Elements per head.
    pub head_dim: usize,
    /// Leading dims of each head that rotate (even, <= head_dim).
    pub rotary_dim: usize,
    /// Which dimensions form a rotation pair (NeoX: i and i + rotary_dim/2; GPT-J: 2i and 2i+1).
    pub style: RopeStyle,
}

/// Rotates the q and k heads of `qkv: [num_tokens, row_stride]` in place, token t by angle
/// positions[t] * inv_freq[i] for pair i. inv_freq: [rotary_dim / 2] (scaling folded in).
pub fn rotary<T: FloatElem>(
    dev: &CudaDevice,
    qkv: &mut DeviceBuffer<T>,
    positions: &DeviceBuffer<u32>,
    inv_freq: &DeviceBuffer<f32>,
    layout: &RotaryLayout,
) -> Result<(), CudaError> {
    const OP: &str = "rotary";
    let num_tokens = check_rotary(OP, dev, qkv, positions, inv_freq, layout)?;
    let l = layout;
    if num_tokens == 0 || l.num_q_heads + l.num_kv_heads == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Rotary, &[], &entry)?;
    let args = [
        to_i32(OP, "row_stride", l.row_stride)?,
        to_i32(OP, "num_q_heads", l.num_q_heads)?,
        to_i32(OP, "num_kv_heads", l.num_kv_heads)?,
        to_i32(OP, "k_offset", l.k_offset)?,
        to_i32(OP, "head_dim", l.head_dim)?,
        to_i32(OP, "rotary_dim", l.rotary_dim)?,
        match l.style {
            RopeStyle::NeoX => 0,
            RopeStyle::GptJ => 1,
        },
    ];
    // One CTA per token looping over its (head, pair)s: up to 1024 threads, so a decode token
    // is a few iterations rather than a latency-bound loop.
    let num_pairs = (l.num_q_heads + l.num_kv_heads) * (l.rotary_dim / 2);
    let threads = num_pairs.next_multiple_of(32).clamp(32, 1024) as u32;
    let cfg = grid((to_u32(OP, "num_tokens", num_tokens)?, 1), threads);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut qkv.slice)
        .arg(&positions.slice)
        .arg(&inv_freq.slice);
    for a in &args {
        b.arg(a);
    }
    // SAFETY: the arguments match rotary.cu's signature (qkv, positions, inv_freq, row_stride,
    // num_q_heads, num_kv_heads, k_offset, head_dim, rotary_dim, style); qkv holds num_tokens
    // rows of row_stride elements and every rotated head lies inside its row; inv_freq holds
    // rotary_dim / 2 and positions num_tokens elements (checked above, all on this device).
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// Checks `rotary`'s arguments; returns num_tokens.
pub(super) fn check_rotary<T: FloatElem>(
    op: &'static str,
    dev: &CudaDevice,
    qkv: &DeviceBuffer<T>,
    positions: &DeviceBuffer<u32>,
    inv_freq: &DeviceBuffer<f32>,
    layout: &RotaryLayout,
) -> Result<usize, CudaError> {
    dev.check_buffer(op, "qkv", qkv)?;
    dev.check_buffer(op, "positions", positions)?;
    dev.check_buffer(op, "inv_freq", inv_freq)?;
    let l = layout;
    if l.rotary_dim == 0 || !l.rotary_dim.is_multiple_of(2) || l.rotary_dim > l.head_dim {
        return Err(CudaError::invalid(
            op,
            "rotary_dim",
            l.rotary_dim,
            format!("must be even, > 0 and <= head_dim {}", l.head_dim),
        ));
    }
    if l.num_q_heads * l.head_dim > l.k_offset {
        return Err(CudaError::invalid(
            op,
            "k_offset",
            l.k_offset,
            format!(
                "must be >= num_q_heads * head_dim = {}",
                l.num_q_heads * l.head_dim
            ),
        ));
    }
    if l.k_offset + l.num_kv_heads * l.head_dim > l.row_stride {
        return Err(CudaError::invalid(
            op,
            "row_stride",
            l.row_stride,
            format!(
                "must be >= k_offset + num_kv_heads * head_dim = {}",
                l.k_offset + l.num_kv_heads * l.head_dim
            ),
        ));
    }
    expect_len(op, "inv_freq", inv_freq, l.rotary_dim / 2)?;
    let num_tokens = positions.len();
    expect_len(op, "qkv", qkv, num_tokens * l.row_stride)?;
    Ok(num_tokens)
}
