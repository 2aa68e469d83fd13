//! The int8 matrix product of `BlockQ8` weights, `y[m, rows] = x[m, cols] · Wᵀ (+ bias)`, for
//! every `m`: the decode path (m = 1), batched decode (m = batch) and prefill chunks.
//!
//! Numbers: every activation row is quantized to 8 bits per 32-block (`BlockQ8Act`, llama.cpp's
//! Q8_1 trick) and every (weight row, activation row, block) product is an exact int32 sum. The
//! f32 part is one fixed formula per output, independent of `m`, the tile an output falls in and
//! the instruction set:
//!
//! ```text
//! acc[b % 2] = acc[b % 2] + ((scale_w * d_x) * isum_b + min_w * sum_x)   for b = 0, 1, ..., nb-1
//! y = (acc[0] + acc[1]) + bias
//! ```
//!
//! (`quant::dot_q8` is that formula for one output). So a sequence's logits are bit-identical
//! whether it runs alone or in a batch of any size, and every `Isa` gives bit-identical outputs.
//!
//! Paths:
//! - `Isa::Scalar`: one `dot_q8` per output (loops LLVM vectorizes, `multiversion`-compiled), output
//!   rows split across rayon tasks. The fastest path for m = 1, which reads each weight once anyway.
//! - `Isa::Avx2 | AvxVnni | Avx512Vnni` (`x86`): weights are consumed in groups of 16 output rows.
//!   A task packs a group (`PackedBlock`: per block, the 16 rows' int8 values transposed to
//!   16 lanes × 4 consecutive bytes, plus their scales, mins and `-128 * Σ q`), then multiplies it
//!   with every activation row, `MAX_TILE_M` rows at a time: each lane accumulates one output, so a
//!   block needs 8 dot-product instructions per activation row (`vpdpbusd` on 16 lanes) and no
//!   horizontal reduction, and each weight block is read from memory once per call whatever `m`.
//!   Threads: rayon tasks over ranges of groups (about 4 per thread).
//!
//! This module owns the kernel choice (`Isa::detect`, run-time feature checks), scheduling and
//! scratch memory of the int8 path; shapes are checked by its caller (`ops::linear`). It never
//! allocates per call in steady state (scratch is thread-local and reused). Like `linear`'s call
//! into `gemm`, the SIMD kernels are a documented exception to "`unsafe` only in `src/cuda` and
//! `triton_api`": each `unsafe` block says why it is sound (features checked at run time, bounds).

use std::cell::RefCell;

use multiversion::multiversion;
use rayon::prelude::*;

use super::quant::{self, BlockQ8, BlockQ8Act, QK};
use crate::tensor::Q8Tensor;

// The AVX-512 intrinsics this module uses are stable since Rust 1.89 (the crate's rust-version).
#[cfg(target_arch = "x86_64")]
mod x86;

/// Output rows packed together: one lane of a 512-bit register each.
pub const GROUP: usize = 16;

/// Activation rows multiplied against a packed group per kernel call (registers hold two f32
/// accumulators per row).
const MAX_TILE_M: usize = 8;

/// Activation rows quantized per rayon task (fewer rows run inline).
const QUANT_ROWS_PER_TASK: usize = 16;

/// The instruction set of the batched int8 product. All give bit-identical outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// Portable loops (`dot_q8` per output), any CPU.
    Scalar,
    /// AVX2: `vpmaddubsw` + `vpmaddwd` on 8 lanes.
    Avx2,
    /// AVX-VNNI: 256-bit `vpdpbusd` on 8 lanes.
    AvxVnni,
    /// AVX-512 VNNI: 512-bit `vpdpbusd` on 16 lanes.
    Avx512Vnni,
}

impl Isa {
    /// Every variant, fastest last.
    pub const ALL: [Isa; 4] = [Isa::Scalar, Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni];

    /// Whether this CPU can run the variant (checked at run time).
    pub fn is_supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Scalar => true,
                Isa::Avx2 => is_x86_feature_detected!("avx2"),
                Isa::AvxVnni => {
                    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("avxvnni")
                }
                Isa::Avx512Vnni => {
                    is_x86_feature_detected!("avx512f")
                        && is_x86_feature_detected!("avx512bw")
                        && is_x86_feature_detected!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            self == Isa::Scalar
        }
    }

    /// This variant as proof that the CPU supports it, for the SIMD kernels.
    fn checked(self) -> Option<SupportedIsa> {
        self.is_supported().then_some(SupportedIsa(self))
    }

    /// The fastest supported variant.
    pub fn detect() -> Isa {
        Isa::ALL
            .into_iter()
            .rev()
            .find(|isa| isa.is_supported())
            .unwrap_or(Isa::Scalar)
    }
}

/// An `Isa` that `Isa::is_supported` accepted: the SIMD entry points take it as their proof that
/// the target features they enable are present. Built only by `Isa::checked`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SupportedIsa(Isa);

/// An activation block as the SIMD kernels read it: `qs` offset by 128 to unsigned bytes
/// (`vpdpbusd` multiplies unsigned by signed bytes), scales as in `BlockQ8Act`.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
struct ActU8 {
    /// `x ≈ d * (qs - 128)`.
    d: f32,
    /// `d * Σ (qs - 128)`.
    sum: f32,
    /// Quantized activations + 128, in [1, 255].
    qs: [u8; QK],
}

impl ActU8 {
    const ZERO: ActU8 = ActU8 {
        d: 0.0,
        sum: 0.0,
        qs: [128; QK],
    };

    fn from_act(a: &BlockQ8Act) -> ActU8 {
        ActU8 {
            d: a.d,
            sum: a.sum,
            qs: a.qs.map(|q| (q as u8) ^ 0x80),
        }
    }

    /// Bytes `4j .. 4j + 4` as one little-endian word (broadcast to every lane by the kernels).
    #[inline(always)]
    fn word(&self, j: usize) -> i32 {
        i32::from_le_bytes([
            self.qs[4 * j],
            self.qs[4 * j + 1],
            self.qs[4 * j + 2],
            self.qs[4 * j + 3],
        ])
    }
}

/// One block (32 columns) of a group of 16 weight rows, transposed for the lane-per-row kernels:
/// `qs[j]` holds, for lane r, the signed bytes `4j .. 4j + 4` of row r.
///
/// ```text
/// qs[j]: | row0 q[4j..4j+4] | row1 q[4j..4j+4] | ... | row15 q[4j..4j+4] |   (64 bytes, j = 0..8)
/// ```
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct PackedBlock {
    qs: [[i8; 4 * GROUP]; QK / 4],
    scale: [f32; GROUP],
    min: [f32; GROUP],
    /// `-128 * Σ q` per row: cancels the +128 offset of the activations.
    neg_corr: [i32; GROUP],
}

impl PackedBlock {
    const ZERO: PackedBlock = PackedBlock {
        qs: [[0; 4 * GROUP]; QK / 4],
        scale: [0.0; GROUP],
        min: [0.0; GROUP],
        neg_corr: [0; GROUP],
    };
}

/// Portable packing of one group: `rows[r]` is row r's blocks (`nb` each), out: [nb].
fn pack_scalar(rows: &[&[BlockQ8]; GROUP], out: &mut [PackedBlock]) {
    for (b, pb) in out.iter_mut().enumerate() {
        for (r, row) in rows.iter().enumerate() {
            let block = &row[b];
            for j in 0..QK / 4 {
                pb.qs[j][4 * r..4 * r + 4].copy_from_slice(&block.qs[4 * j..4 * j + 4]);
            }
            pb.scale[r] = block.scale;
            pb.min[r] = block.min;
            pb.neg_corr[r] = -128 * block.qs.iter().map(|&q| i32::from(q)).sum::<i32>();
        }
    }
}

/// Reusable per-thread buffers.
#[derive(Default)]
struct Scratch {
    /// Quantized activations, [m, nb].
    act: Vec<BlockQ8Act>,
    /// The same, offset to unsigned bytes for the SIMD kernels, [m, nb].
    act_u8: Vec<ActU8>,
    /// Outputs by task: [rows, m] (scalar) or [num_groups, m, 16] (SIMD).
    y_t: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
    static PACKED: RefCell<Vec<PackedBlock>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's scratch, or with fresh buffers when it is already in use (a nested
/// call: rayon may run another product on this thread while it waits for its own tasks).
fn with_scratch<R>(f: impl FnOnce(&mut Scratch) -> R) -> R {
    SCRATCH.with(|cell| match cell.try_borrow_mut() {
        Ok(mut scratch) => f(&mut scratch),
        Err(_) => f(&mut Scratch::default()),
    })
}

fn with_packed<R>(f: impl FnOnce(&mut Vec<PackedBlock>) -> R) -> R {
    PACKED.with(|cell| match cell.try_borrow_mut() {
        Ok(mut packed) => f(&mut packed),
        Err(_) => f(&mut Vec::new()),
    })
}

/// `y[m, rows] = x[m, cols] · Wᵀ (+ bias[rows])` with activations quantized per 32-block.
///
/// x: [m, cols], y: [m, rows], `t.blocks`: [rows, cols / 32]; the caller has checked the shapes
/// (`cols % 32 == 0`, `cols > 0`, `m > 0`). An `isa` this CPU lacks runs as `Isa::Scalar`.
pub fn matmul(x: &[f32], m: usize, t: &Q8Tensor, bias: Option<&[f32]>, y: &mut [f32], isa: Isa) {
    let cols = t.cols;
    let nb = cols / QK;
    let isa = isa.checked().unwrap_or(SupportedIsa(Isa::Scalar));
    with_scratch(|scratch| {
        let Scratch { act, act_u8, y_t } = scratch;
        act.clear();
        act.resize(m * nb, BlockQ8Act::ZERO);
        // In parallel for prefill-sized m (serial, it took 9% of a 256-token prefill); rows of
        // fewer than QUANT_ROWS_PER_TASK run inline on this thread.
        act.par_chunks_mut(nb)
            .zip(x.par_chunks(cols))
            .with_min_len(QUANT_ROWS_PER_TASK)
            .for_each(|(act_row, x_row)| quant::quantize_row_q8_act(x_row, act_row));
        if isa.0 == Isa::Scalar {
            matmul_scalar(act, m, t, bias, y, y_t);
            return;
        }
        act_u8.clear();
        act_u8.resize(m * nb, ActU8::ZERO);
        act_u8
            .par_chunks_mut(nb)
            .zip(act.par_chunks(nb))
            .with_min_len(QUANT_ROWS_PER_TASK)
            .for_each(|(dst, src)| {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = ActU8::from_act(s);
                }
            });
        matmul_packed(act_u8, m, t, bias, y, y_t, isa);
    });
}

/// Output rows per rayon task: about 4 tasks per thread for load balance, at least `min`.
fn rows_per_task(rows: usize, min: usize) -> usize {
    let num_tasks = 4 * rayon::current_num_threads();
    rows.div_ceil(num_tasks).max(min)
}

/// `Isa::Scalar`: one `dot_q8` per output. act: [m, nb], y_t: scratch for [rows, m].
fn matmul_scalar(
    act: &[BlockQ8Act],
    m: usize,
    t: &Q8Tensor,
    bias: Option<&[f32]>,
    y: &mut [f32],
    y_t: &mut Vec<f32>,
) {
    let rows = t.rows;
    let nb = t.cols / QK;
    let chunk_rows = rows_per_task(rows, 16);
    if m == 1 {
        y.par_chunks_mut(chunk_rows)
            .enumerate()
            .for_each(|(chunk_idx, y_chunk)| {
                let row0 = chunk_idx * chunk_rows;
                let w_chunk = &t.blocks[row0 * nb..(row0 + y_chunk.len()) * nb];
                let bias_chunk = bias.map(|b| &b[row0..row0 + y_chunk.len()]);
                rows_m1(w_chunk, nb, act, bias_chunk, y_chunk);
            });
        return;
    }
    // y_t: [rows, m], so that a task's outputs are contiguous.
    y_t.clear();
    y_t.resize(rows * m, 0.0);
    y_t.par_chunks_mut(chunk_rows * m)
        .enumerate()
        .for_each(|(chunk_idx, y_t_chunk)| {
            let row0 = chunk_idx * chunk_rows;
            let num_rows = y_t_chunk.len() / m;
            let w_chunk = &t.blocks[row0 * nb..(row0 + num_rows) * nb];
            rows_multi(w_chunk, nb, act, m, y_t_chunk);
        });
    let y_t: &[f32] = y_t;
    y.par_chunks_mut(rows).enumerate().for_each(|(i, y_row)| {
        for (row_idx, out) in y_row.iter_mut().enumerate() {
            let dot = y_t[row_idx * m + i];
            *out = match bias {
                Some(b) => dot + b[row_idx],
                None => dot,
            };
        }
    });
}

/// y[n] = w[n, :] · act (+ bias[n]); w: [n * nb], act: [nb].
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn rows_m1(w: &[BlockQ8], nb: usize, act: &[BlockQ8Act], bias: Option<&[f32]>, y: &mut [f32]) {
    for (w_row, out) in w.chunks_exact(nb).zip(y.iter_mut()) {
        *out = quant::dot_q8(w_row, act);
    }
    if let Some(b) = bias {
        for (out, b) in y.iter_mut().zip(b) {
            *out += b;
        }
    }
}

/// y_t[n, i] = w[n, :] · act[i, :]; w: [n * nb], act: [m, nb], y_t: [n, m]. A weight row
/// (≤ a few KiB) stays in L1 across the m activation rows.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn rows_multi(w: &[BlockQ8], nb: usize, act: &[BlockQ8Act], m: usize, y_t: &mut [f32]) {
    for (w_row, out_row) in w.chunks_exact(nb).zip(y_t.chunks_exact_mut(m)) {
        for (out, act_row) in out_row.iter_mut().zip(act.chunks_exact(nb)) {
            *out = quant::dot_q8(w_row, act_row);
        }
    }
}

/// The SIMD path: tasks over ranges of 16-row groups; each packs a group, then runs the kernel on
/// tiles of up to `MAX_TILE_M` activation rows. act: [m, nb], y_t: scratch for [groups, m, 16].
fn matmul_packed(
    act: &[ActU8],
    m: usize,
    t: &Q8Tensor,
    bias: Option<&[f32]>,
    y: &mut [f32],
    y_t: &mut Vec<f32>,
    isa: SupportedIsa,
) {
    let rows = t.rows;
    let nb = t.cols / QK;
    let num_groups = rows.div_ceil(GROUP);
    let groups_per_task = rows_per_task(num_groups, 1);
    y_t.clear();
    y_t.resize(num_groups * m * GROUP, 0.0);
    y_t.par_chunks_mut(groups_per_task * m * GROUP)
        .enumerate()
        .for_each(|(task_idx, y_task)| {
            with_packed(|packed| {
                packed.clear();
                packed.resize(nb, PackedBlock::ZERO);
                let first_row = task_idx * groups_per_task * GROUP;
                prefetch_group(t, first_row);
                for (local_idx, y_group) in y_task.chunks_exact_mut(m * GROUP).enumerate() {
                    let row0 = first_row + local_idx * GROUP;
                    // Rows past the end repeat the last row; their lanes are never read back.
                    let group_rows: [&[BlockQ8]; GROUP] = std::array::from_fn(|r| {
                        let row = (row0 + r).min(rows - 1);
                        &t.blocks[row * nb..(row + 1) * nb]
                    });
                    // The packing reads 16 rows block by block, 16 interleaved streams the
                    // hardware prefetchers follow poorly (measured: half the bandwidth of a
                    // sequential read); the packing prefetches the next group as it goes.
                    pack(isa, &group_rows, group_blocks(t, row0 + GROUP), packed);
                    for (act_tile, y_tile) in act
                        .chunks(MAX_TILE_M * nb)
                        .zip(y_group.chunks_mut(MAX_TILE_M * GROUP))
                    {
                        kernel(isa, packed, act_tile, y_tile);
                    }
                }
            });
        });
    let y_t: &[f32] = y_t;
    y.par_chunks_mut(rows).enumerate().for_each(|(i, y_row)| {
        for (g, y_part) in y_row.chunks_mut(GROUP).enumerate() {
            let src = &y_t[(g * m + i) * GROUP..][..y_part.len()];
            match bias {
                Some(b) => {
                    for ((out, &dot), &b) in y_part.iter_mut().zip(src).zip(&b[g * GROUP..]) {
                        *out = dot + b;
                    }
                }
                None => y_part.copy_from_slice(src),
            }
        }
    });
}

/// Asks the CPU to bring the blocks of rows `row0 .. row0 + 16` into cache (no-op past the end).
fn prefetch_group(t: &Q8Tensor, row0: usize) {
    let blocks = group_blocks(t, row0);
    #[cfg(target_arch = "x86_64")]
    x86::prefetch(blocks);
    #[cfg(not(target_arch = "x86_64"))]
    let _ = blocks;
}

/// The blocks of rows `row0 .. row0 + 16` (fewer at the end, none past it).
fn group_blocks(t: &Q8Tensor, row0: usize) -> &[BlockQ8] {
    let nb = t.cols / QK;
    let start = (row0 * nb).min(t.blocks.len());
    let end = ((row0 + GROUP) * nb).min(t.blocks.len());
    &t.blocks[start..end]
}

/// Packs one group with the fastest packing `isa` allows.
/// `ahead`: blocks to prefetch meanwhile (the next group).
fn pack(isa: SupportedIsa, rows: &[&[BlockQ8]; GROUP], ahead: &[BlockQ8], out: &mut [PackedBlock]) {
    #[cfg(target_arch = "x86_64")]
    if x86::pack(isa, rows, ahead, out) {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    x86::prefetch(ahead);
    let _ = isa;
    pack_scalar(rows, out);
}

/// One tile: act: [mt, nb] (mt <= MAX_TILE_M), y: [mt, 16].
fn kernel(isa: SupportedIsa, packed: &[PackedBlock], act: &[ActU8], y: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    x86::kernel(isa, packed, act, y);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, packed, act, y);
        unreachable!("SIMD kernels are x86-64 only; Isa::is_supported says so");
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
