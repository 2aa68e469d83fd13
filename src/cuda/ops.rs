//! Safe launchers, one per kernel entry point family. Each checks every shape, length, stride and
//! device it can see on the host, then launches `{op}_{dtype}` on the device's stream (async: a
//! fault shows up at the next `synchronize`). What the host cannot see (token ids, block ids,
//! slots inside device buffers) the kernels bound themselves, so bad device data never makes a
//! kernel touch memory outside its buffers. These launchers never synchronize and never panic.
//!
//! Layouts are row-major; shape comments name the dimensions.

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::buffer::{DeviceBuffer, FloatElem};
use super::device::CudaDevice;
use super::error::CudaError;
use super::kernels::KernelId;
use crate::tensor::{Activation, Norm, RopeStyle};

/// Kernel argument for an absent optional pointer (the kernels test for null).
pub(crate) const NULL_PTR: u64 = 0;

pub(crate) fn entry<T: FloatElem>(op: &str) -> String {
    format!("{op}_{}", T::DTYPE)
}

pub(crate) fn to_i32(op: &'static str, what: &'static str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::invalid(op, what, v, "must fit in i32"))
}

pub(crate) fn to_i64(op: &'static str, what: &'static str, v: usize) -> Result<i64, CudaError> {
    i64::try_from(v).map_err(|_| CudaError::invalid(op, what, v, "must fit in i64"))
}

pub(crate) fn to_u32(op: &'static str, what: &'static str, v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::invalid(op, what, v, "must fit in u32"))
}

pub(crate) fn expect_len<T>(
    op: &'static str,
    operand: &'static str,
    buf: &DeviceBuffer<T>,
    expected: usize,
) -> Result<(), CudaError> {
    if buf.len() != expected {
        return Err(CudaError::length(op, operand, expected, buf.len()));
    }
    Ok(())
}

pub(crate) fn launch_error(
    dev: &CudaDevice,
    entry: &str,
    source: cudarc::driver::DriverError,
) -> CudaError {
    CudaError::Launch {
        entry: entry.to_owned(),
        arch: dev.arch().to_string(),
        source,
    }
}

pub(crate) fn grid(blocks: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.0, blocks.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Learned absolute position embeddings added during the gather (GPT-2, OPT, BLOOM-less archs).
#[derive(Debug, Clone, Copy)]
pub struct LearnedPositions<'a, T> {
    /// [max_positions, hidden]
    pub table: &'a DeviceBuffer<T>,
    /// [num_tokens]
    pub positions: &'a DeviceBuffer<u32>,
}

/// out[t] = table[token_ids[t]] (+ pos.table[pos.positions[t]]).
///
/// out: [num_tokens, hidden]; table: [vocab_size, hidden]; token_ids: [num_tokens].
/// A token id (or position) past its table gives a zero row (contribution), not a fault.
pub fn embedding<T: FloatElem>(
    dev: &CudaDevice,
    out: &mut DeviceBuffer<T>,
    table: &DeviceBuffer<T>,
    token_ids: &DeviceBuffer<u32>,
    learned_positions: Option<LearnedPositions<'_, T>>,
    hidden: usize,
) -> Result<(), CudaError> {
    const OP: &str = "embedding";
    dev.check_buffer(OP, "out", out)?;
    dev.check_buffer(OP, "table", table)?;
    dev.check_buffer(OP, "token_ids", token_ids)?;
    if hidden == 0 || table.len() % hidden != 0 {
        return Err(CudaError::invalid(
            OP,
            "hidden",
            hidden,
            format!(
                "must be > 0 and divide the table's {} elements",
                table.len()
            ),
        ));
    }
    let num_tokens = token_ids.len();
    expect_len(OP, "out", out, num_tokens * hidden)?;
    let vocab_size = table.len() / hidden;
    let mut max_positions = 0;
    if let Some(pos) = &learned_positions {
        dev.check_buffer(OP, "position table", pos.table)?;
        dev.check_buffer(OP, "positions", pos.positions)?;
        if pos.table.len() % hidden != 0 {
            return Err(CudaError::length(
                OP,
                "position table",
                pos.table.len().next_multiple_of(hidden),
                pos.table.len(),
            ));
        }
        expect_len(OP, "positions", pos.positions, num_tokens)?;
        max_positions = pos.table.len() / hidden;
    }
    if num_tokens == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Embedding, &[], &entry)?;
    let (hidden_i, vocab_i, max_pos_i) = (
        to_i32(OP, "hidden", hidden)?,
        to_i32(OP, "vocab_size", vocab_size)?,
        to_i32(OP, "max_positions", max_positions)?,
    );
    let cfg = grid((to_u32(OP, "num_tokens", num_tokens)?, 1), 256);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice)
        .arg(&table.slice)
        .arg(&token_ids.slice);
    match &learned_positions {
        Some(pos) => b.arg(&pos.table.slice).arg(&pos.positions.slice),
        None => b.arg(&NULL_PTR).arg(&NULL_PTR),
    };
    b.arg(&hidden_i).arg(&vocab_i).arg(&max_pos_i);
    // SAFETY: the arguments match embedding.cu's signature (out, table, token_ids, pos_table,
    // positions, hidden, vocab_size, max_positions); out holds num_tokens * hidden elements,
    // table vocab_size * hidden, pos_table max_positions * hidden, positions num_tokens (all
    // checked above, all on this device); ids and positions are bounds-checked in the kernel.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// Row normalization, optionally fused with the residual add before it:
/// without `residual`: out = norm(x); with it: residual += x, then out = norm(residual).
///
/// x, out, residual: [num_rows, dim]; weight, bias: [dim] (dim = weight.len()).
/// `Norm::Layer { bias: true }` needs `bias`; RMSNorm takes none.
pub fn norm<T: FloatElem>(
    dev: &CudaDevice,
    norm: Norm,
    out: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    residual: Option<&mut DeviceBuffer<T>>,
    weight: &DeviceBuffer<T>,
    bias: Option<&DeviceBuffer<T>>,
) -> Result<(), CudaError> {
    const OP: &str = "norm";
    dev.check_buffer(OP, "out", out)?;
    dev.check_buffer(OP, "x", x)?;
    dev.check_buffer(OP, "weight", weight)?;
    let dim = weight.len();
    if dim == 0 || x.len() % dim != 0 {
        return Err(CudaError::invalid(
            OP,
            "dim (weight length)",
            dim,
            format!("must be > 0 and divide x's {} elements", x.len()),
        ));
    }
    let num_rows = x.len() / dim;
    expect_len(OP, "out", out, x.len())?;
    if let Some(r) = &residual {
        dev.check_buffer(OP, "residual", r)?;
        expect_len(OP, "residual", r, x.len())?;
    }
    let (op, eps) = match norm {
        Norm::Rms { eps } => {
            if bias.is_some() {
                return Err(CudaError::invalid(
                    OP,
                    "bias",
                    "Some",
                    "RMSNorm has no bias",
                ));
            }
            ("rms_norm", eps)
        }
        Norm::Layer {
            eps,
            bias: has_bias,
        } => {
            if has_bias != bias.is_some() {
                return Err(CudaError::invalid(
                    OP,
                    "bias",
                    if bias.is_some() { "Some" } else { "None" },
                    format!("Norm::Layer {{ bias: {has_bias} }}"),
                ));
            }
            ("layer_norm", eps)
        }
    };
    if let Some(b) = bias {
        dev.check_buffer(OP, "bias", b)?;
        expect_len(OP, "bias", b, dim)?;
    }
    if num_rows == 0 {
        return Ok(());
    }
    let entry = entry::<T>(op);
    let f = dev.function(KernelId::Norm, &[], &entry)?;
    let dim_i = to_i32(OP, "dim", dim)?;
    // One CTA per row: at batch 1 the whole op is one CTA, so give it every thread it can use:
    // one per element, or per 16-byte vector where norm.cu's RMSNorm takes them.
    let vec = vec16_len::<T>();
    let units = match (norm, dim % vec) {
        (Norm::Rms { .. }, 0) => dim / vec,
        _ => dim,
    };
    let threads = units.next_multiple_of(32).clamp(32, 1024) as u32;
    let cfg = grid((to_u32(OP, "num_rows", num_rows)?, 1), threads);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice).arg(&x.slice);
    match residual {
        Some(r) => b.arg(&mut r.slice),
        None => b.arg(&NULL_PTR),
    };
    b.arg(&weight.slice);
    if matches!(norm, Norm::Layer { .. }) {
        match bias {
            Some(bias) => b.arg(&bias.slice),
            None => b.arg(&NULL_PTR),
        };
    }
    b.arg(&dim_i).arg(&eps);
    // SAFETY: the arguments match norm.cu's rms_norm (out, x, residual, weight, dim, eps) /
    // layer_norm (out, x, residual, weight, bias, dim, eps); out, x and residual hold
    // num_rows * dim elements, weight and bias dim (checked above, all on this device); one CTA
    // per row touches only its row; block size is a multiple of 32 and at most 1024.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

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
fn check_rotary<T: FloatElem>(
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
    if l.rotary_dim == 0 || l.rotary_dim % 2 != 0 || l.rotary_dim > l.head_dim {
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

/// The kernels' activation code (activation.cu).
pub(crate) fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
        Activation::Gelu => 2,
        Activation::Relu => 3,
    }
}

/// Elements of T in one 16-byte vector (prelude.cuh's `Vec16<T>::N`).
fn vec16_len<T: FloatElem>() -> usize {
    16 / T::DTYPE.size_in_bytes()
}

pub(crate) fn elementwise_grid(n: usize) -> LaunchConfig {
    const THREADS: usize = 256;
    // Grid-stride loops: 2^16 CTAs cover any n.
    let blocks = n.div_ceil(THREADS).clamp(1, 1 << 16) as u32;
    grid((blocks, 1), THREADS as u32)
}

/// out = act(gate) * up. gate_up: [num_tokens, 2 * inter] (gate first, then up);
/// out: [num_tokens, inter].
pub fn gated_activation<T: FloatElem>(
    dev: &CudaDevice,
    act: Activation,
    out: &mut DeviceBuffer<T>,
    gate_up: &DeviceBuffer<T>,
    inter: usize,
) -> Result<(), CudaError> {
    const OP: &str = "gated_act";
    dev.check_buffer(OP, "out", out)?;
    dev.check_buffer(OP, "gate_up", gate_up)?;
    if inter == 0 || gate_up.len() % (2 * inter) != 0 {
        return Err(CudaError::invalid(
            OP,
            "inter",
            inter,
            format!(
                "must be > 0 and 2 * inter must divide gate_up's {} elements",
                gate_up.len()
            ),
        ));
    }
    let num_tokens = gate_up.len() / (2 * inter);
    expect_len(OP, "out", out, num_tokens * inter)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Activation, &[], &entry)?;
    let (num_tokens_i, inter_i, code) = (
        to_i64(OP, "num_tokens", num_tokens)?,
        to_i32(OP, "inter", inter)?,
        act_code(act),
    );
    // activation.cu takes 16-byte vectors when they tile the rows: one thread per vector.
    let vec = vec16_len::<T>();
    let units = match inter % vec {
        0 => num_tokens * inter / vec,
        _ => num_tokens * inter,
    };
    let cfg = elementwise_grid(units);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice)
        .arg(&gate_up.slice)
        .arg(&num_tokens_i)
        .arg(&inter_i)
        .arg(&code);
    // SAFETY: the arguments match activation.cu's gated_act (out, gate_up, num_tokens, inter,
    // act); out holds num_tokens * inter and gate_up num_tokens * 2 * inter elements (checked
    // above, both on this device); the grid-stride loop stays below num_tokens * inter.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// x = act(x), elementwise, in place. x: [n].
pub fn activation_in_place<T: FloatElem>(
    dev: &CudaDevice,
    act: Activation,
    x: &mut DeviceBuffer<T>,
) -> Result<(), CudaError> {
    const OP: &str = "act";
    dev.check_buffer(OP, "x", x)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Activation, &[], &entry)?;
    let (n_i, code) = (to_i64(OP, "n", n)?, act_code(act));
    let cfg = elementwise_grid(n);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut x.slice).arg(&n_i).arg(&code);
    // SAFETY: the arguments match activation.cu's act (x, n, act); x holds n elements on this
    // device; the grid-stride loop stays below n.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

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
    if p.num_kv_heads == 0 || p.num_heads % p.num_kv_heads != 0 {
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
