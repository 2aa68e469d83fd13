//! The compact weight format of the CPU engine and its 8-bit block arithmetic.
//!
//! `BlockQ8` holds 32 consecutive weights of one row as `w[i] = scale * qs[i] + min`. With
//! `min = 0` it is a symmetric 8-bit quantization (what f32/f16 weights are compressed to); with a
//! per-block minimum it represents GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the 32-wide sub-blocks
//! of Q4_K/Q5_K exactly, so a quantized GGUF model keeps its exact weights at 1.25 bytes/weight.
//!
//! This module owns the block formats, (de)quantization of rows and the block dot product of the
//! decode path (`dot_q8`: a weight row against an activation row quantized to `BlockQ8Act`,
//! llama.cpp's Q8_1 trick). It never allocates and never spawns threads: callers (`ops::linear`)
//! own scheduling and scratch memory. Length mismatches between slices are programming errors and
//! panic (like slice indexing); nothing here reads data from outside the process.

use multiversion::multiversion;

pub use crate::tensor::{BlockQ8, QK};

/// 32 activations quantized symmetrically: `x[i] ≈ d * qs[i]`, with `sum = d * Σ qs[i]`
/// precomputed so that a dot product with an asymmetric weight block needs no second pass:
/// `Σ (s*q_i + mn) * d*xq_i = s*d * Σ q_i*xq_i + mn * sum`.
#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8Act {
    /// Scale: `max|x| / 127` of the block (0 for an all-zero block).
    pub d: f32,
    /// `d * Σ qs[i]`, precomputed for the asymmetric weight term.
    pub sum: f32,
    /// The 32 quantized activations, in [-127, 127].
    pub qs: [i8; QK],
}

impl BlockQ8Act {
    /// An all-zero block (scale 0), for initializing scratch.
    pub const ZERO: BlockQ8Act = BlockQ8Act {
        d: 0.0,
        sum: 0.0,
        qs: [0; QK],
    };
}

/// Symmetric scale and quantized values of one 32-block: `scale = max|x| / 127`,
/// `q = round(x / scale)` in [-127, 127]; an all-zero block gets scale 0.
#[inline(always)]
fn quantize_block(src: &[f32; QK], qs: &mut [i8; QK]) -> f32 {
    // Eight running maxima: a single chain of `max` does not vectorize (LLVM may not reorder
    // float max without fast-math flags) and cost ~10% of a batch-16 decode step. The maximum
    // of non-NaN values is the same in any order.
    let mut lanes = [0.0f32; 8];
    for chunk in src.chunks_exact(8) {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v.abs());
        }
    }
    let amax = lanes.iter().fold(0.0f32, |acc, &m| acc.max(m));
    let scale = amax / 127.0;
    let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
    for (q, &v) in qs.iter_mut().zip(src) {
        // |v * inv| <= 127 (up to rounding of inv), the clamp keeps the cast exact anyway.
        *q = (v * inv).round_ties_even().clamp(-127.0, 127.0) as i8;
    }
    scale
}

#[inline(always)]
fn as_block(chunk: &[f32]) -> &[f32; QK] {
    // chunks_exact(QK) always yields QK elements.
    chunk.try_into().unwrap_or(&[0.0; QK])
}

/// Quantizes a row symmetrically (`min = 0`, `scale = max|x| / 127` per block).
///
/// src: [num_blocks * 32], dst: [num_blocks]. Panics if the lengths disagree.
pub fn quantize_row_q8(src: &[f32], dst: &mut [BlockQ8]) {
    assert_eq!(
        src.len(),
        dst.len() * QK,
        "quantize_row_q8: src has {} values for {} blocks",
        src.len(),
        dst.len()
    );
    quantize_row_q8_impl(src, dst);
}

// Multiversioned so that rounding compiles to `roundps` (SSE4.1+) instead of a libm call per value.
#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn quantize_row_q8_impl(src: &[f32], dst: &mut [BlockQ8]) {
    for (chunk, block) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        block.scale = quantize_block(as_block(chunk), &mut block.qs);
        block.min = 0.0;
    }
}

/// Dequantizes a row: `dst[i] = scale * qs[i] + min`.
///
/// src: [num_blocks], dst: [num_blocks * 32]. Panics if the lengths disagree.
pub fn dequantize_row_q8(src: &[BlockQ8], dst: &mut [f32]) {
    assert_eq!(
        dst.len(),
        src.len() * QK,
        "dequantize_row_q8: dst has {} values for {} blocks",
        dst.len(),
        src.len()
    );
    for (block, chunk) in src.iter().zip(dst.chunks_exact_mut(QK)) {
        for (d, &q) in chunk.iter_mut().zip(&block.qs) {
            *d = block.scale * f32::from(q) + block.min;
        }
    }
}

/// Quantizes a row of activations for the int8 dot product (`dot_q8`).
///
/// src: [num_blocks * 32], dst: [num_blocks]. Panics if the lengths disagree.
pub fn quantize_row_q8_act(src: &[f32], dst: &mut [BlockQ8Act]) {
    assert_eq!(
        src.len(),
        dst.len() * QK,
        "quantize_row_q8_act: src has {} values for {} blocks",
        src.len(),
        dst.len()
    );
    quantize_row_q8_act_impl(src, dst);
}

#[multiversion(targets("x86_64+avx2+fma", "x86_64+sse4.1"))]
fn quantize_row_q8_act_impl(src: &[f32], dst: &mut [BlockQ8Act]) {
    for (chunk, block) in src.chunks_exact(QK).zip(dst.iter_mut()) {
        block.d = quantize_block(as_block(chunk), &mut block.qs);
        let isum: i32 = block.qs.iter().map(|&q| i32::from(q)).sum();
        block.sum = block.d * isum as f32;
    }
}

/// Σ a[i] * b[i] over one block, exact in i32.
#[inline(always)]
fn block_idot(a: &[i8; QK], b: &[i8; QK]) -> i32 {
    let mut sum = 0i32;
    for i in 0..QK {
        sum += i32::from(a[i]) * i32::from(b[i]);
    }
    sum
}

/// Dot product of a weight row with a quantized activation row:
/// `Σ_blocks scale*d * Σ q*xq + min * sum`. w: [num_blocks], x: [num_blocks].
///
/// Inlined into the callers' multiversioned loops so it is compiled for their target features.
#[inline(always)]
pub fn dot_q8(w: &[BlockQ8], x: &[BlockQ8Act]) -> f32 {
    // Two independent accumulators break the floating-point dependency chain between blocks.
    let mut acc = [0.0f32; 2];
    let mut w_pairs = w.chunks_exact(2);
    let mut x_pairs = x.chunks_exact(2);
    for (wp, xp) in (&mut w_pairs).zip(&mut x_pairs) {
        for j in 0..2 {
            let isum = block_idot(&wp[j].qs, &xp[j].qs);
            acc[j] += wp[j].scale * xp[j].d * isum as f32 + wp[j].min * xp[j].sum;
        }
    }
    for (wb, xb) in w_pairs.remainder().iter().zip(x_pairs.remainder()) {
        let isum = block_idot(&wb.qs, &xb.qs);
        acc[0] += wb.scale * xb.d * isum as f32 + wb.min * xb.sum;
    }
    acc[0] + acc[1]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic uniform values in [-1, 1) (SplitMix64).
    pub(crate) fn random_values(seed: u64, len: usize) -> Vec<f32> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
                let mut z = state;
                z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
                z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
                z ^= z >> 31;
                ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_at_most_half_a_step() {
        let mut src = random_values(1, 32 * 7);
        // Blocks with very different magnitudes, an all-zero block and one with a single spike.
        for v in &mut src[32..64] {
            *v *= 1000.0;
        }
        for v in &mut src[64..96] {
            *v = 0.0;
        }
        for v in &mut src[96..128] {
            *v *= 1e-3;
        }
        src[100] = 5.0;
        let mut blocks = vec![
            BlockQ8 {
                scale: 0.0,
                min: 1.0,
                qs: [0; QK]
            };
            7
        ];
        quantize_row_q8(&src, &mut blocks);
        let mut back = vec![0.0f32; src.len()];
        dequantize_row_q8(&blocks, &mut back);
        for (b, (block, chunk)) in blocks.iter().zip(src.chunks_exact(QK)).enumerate() {
            assert_eq!(block.min, 0.0);
            let amax = chunk.iter().fold(0.0f32, |a, v| a.max(v.abs()));
            assert!(
                (block.scale - amax / 127.0).abs() <= 1e-6 * amax,
                "block {b} scale"
            );
            // The largest magnitude maps to ±127 exactly.
            if amax > 0.0 {
                assert_eq!(block.qs.iter().map(|q| q.unsigned_abs()).max(), Some(127));
            }
            for i in 0..QK {
                let err = (back[b * QK + i] - chunk[i]).abs();
                assert!(
                    err <= 0.5 * block.scale * 1.0001 + 1e-12,
                    "block {b} elem {i}: err {err} scale {}",
                    block.scale
                );
            }
        }
        assert!(back[64..96].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn activation_quantization_keeps_sum() {
        let src = random_values(2, 64);
        let mut blocks = vec![BlockQ8Act::ZERO; 2];
        quantize_row_q8_act(&src, &mut blocks);
        for (block, chunk) in blocks.iter().zip(src.chunks_exact(QK)) {
            let isum: i32 = block.qs.iter().map(|&q| i32::from(q)).sum();
            assert_eq!(block.sum, block.d * isum as f32);
            for (q, v) in block.qs.iter().zip(chunk) {
                assert!((block.d * f32::from(*q) - v).abs() <= 0.5 * block.d * 1.0001);
            }
        }
    }

    /// Asymmetric weight blocks (min != 0, unsigned 4-bit values as in Q4_1, and full-range i8
    /// including -128 as in Q8_0) against the f64 dot product of the dequantized weights with the
    /// dequantized activations: the int8 arithmetic must be exact up to f32 rounding.
    #[test]
    fn dot_matches_dequantized_reference_for_asymmetric_blocks() {
        let num_blocks = 9; // odd: exercises the remainder of the pair loop
        let vals = random_values(3, num_blocks * (QK + 2));
        let mut w = Vec::new();
        for b in 0..num_blocks {
            let mut qs = [0i8; QK];
            for (i, q) in qs.iter_mut().enumerate() {
                let r = vals[b * QK + i];
                *q = if b % 2 == 0 {
                    ((r + 1.0) * 7.99) as i8
                } else if i == 3 {
                    -128
                } else {
                    (r * 127.0) as i8
                };
            }
            let scale = 0.01 + vals[num_blocks * QK + b].abs() * 0.1;
            let min = if b % 3 == 2 {
                0.0
            } else {
                vals[num_blocks * QK + num_blocks + b]
            };
            w.push(BlockQ8 { scale, min, qs });
        }
        let x = random_values(4, num_blocks * QK);
        let mut xq = vec![BlockQ8Act::ZERO; num_blocks];
        quantize_row_q8_act(&x, &mut xq);

        let mut wf = vec![0.0f32; num_blocks * QK];
        dequantize_row_q8(&w, &mut wf);
        let reference: f64 = (0..num_blocks * QK)
            .map(|i| f64::from(wf[i]) * f64::from(xq[i / QK].d) * f64::from(xq[i / QK].qs[i % QK]))
            .sum();
        let got = f64::from(dot_q8(&w, &xq));
        let magnitude: f64 = (0..num_blocks * QK)
            .map(|i| f64::from(wf[i]).abs() * f64::from(x[i]).abs())
            .sum();
        assert!(
            (got - reference).abs() <= 1e-5 * magnitude,
            "got {got}, reference {reference}"
        );

        // And against the unquantized activations, within the activation quantization error:
        // each |x - d*xq| <= d/2.
        let exact: f64 = (0..num_blocks * QK)
            .map(|i| f64::from(wf[i]) * f64::from(x[i]))
            .sum();
        let bound: f64 = (0..num_blocks * QK)
            .map(|i| f64::from(wf[i]).abs() * 0.5 * f64::from(xq[i / QK].d))
            .sum();
        assert!(
            (got - exact).abs() <= bound * 1.001 + 1e-6,
            "got {got}, exact {exact}, bound {bound}"
        );
    }
}
