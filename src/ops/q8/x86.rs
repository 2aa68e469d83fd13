//! x86-64 kernels of the batched int8 product (layout and formula: see `super`): group packing
//! with AVX-512 shuffles, and the lane-per-output kernels for AVX-512 VNNI, AVX-VNNI and AVX2.
//!
//! Every kernel computes, per lane (one output row of the group) and activation row, the exact
//! int32 block sum, then the f32 formula of `quant::dot_q8` with plain multiplies and adds in the
//! same order (no FMA: it would round differently), so lanes equal the scalar path bit for bit.
//!
//! The entry points take a `SupportedIsa` (a run-time feature check already passed) and check
//! their slice lengths; the `#[target_feature]` functions below them only index with bounds
//! checks or load fixed-size arrays through references.

use std::arch::x86_64::*;

use super::{ActU8, GROUP, Isa, MAX_TILE_M, PackedBlock, SupportedIsa};
use crate::ops::quant::{BlockQ8, QK};

/// Packs one group with AVX-512 shuffles when `isa` has them; returns false otherwise (the caller
/// packs with portable code). rows: 16 × [>= out.len()] blocks, out: [nb].
pub(super) fn pack(
    isa: SupportedIsa,
    rows: &[&[BlockQ8]; GROUP],
    ahead: &[BlockQ8],
    out: &mut [PackedBlock],
) -> bool {
    if isa.0 != Isa::Avx512Vnni {
        return false;
    }
    // SAFETY: `SupportedIsa(Avx512Vnni)` is only built after `is_x86_feature_detected!` found
    // avx512f, avx512bw and avx512vnni; `pack_avx512` reads blocks through bounds-checked indexing.
    unsafe { pack_avx512(rows, ahead, out) };
    true
}

/// One tile: packed: [nb], act: [mt, nb], y: [mt, 16] with 1 <= mt <= MAX_TILE_M.
pub(super) fn kernel(isa: SupportedIsa, packed: &[PackedBlock], act: &[ActU8], y: &mut [f32]) {
    let nb = packed.len();
    let mt = y.len() / GROUP;
    assert!(
        (1..=MAX_TILE_M).contains(&mt) && y.len() == mt * GROUP && act.len() == mt * nb,
        "q8 kernel: act {} blocks, y {} values for {nb} blocks",
        act.len(),
        y.len()
    );
    macro_rules! by_tile_rows {
        ($f:ident) => {
            match mt {
                1 => $f::<1>(packed, act, y),
                2 => $f::<2>(packed, act, y),
                3 => $f::<3>(packed, act, y),
                4 => $f::<4>(packed, act, y),
                5 => $f::<5>(packed, act, y),
                6 => $f::<6>(packed, act, y),
                7 => $f::<7>(packed, act, y),
                _ => $f::<8>(packed, act, y),
            }
        };
    }
    // SAFETY (the three arms below): `SupportedIsa` is only built after the run-time check of
    // exactly the features each kernel enables (`Isa::is_supported`); the kernels index `act` and
    // `y` with bounds checks, within the lengths asserted above.
    match isa.0 {
        // SAFETY: see above (avx512f, avx512bw, avx512vnni checked).
        Isa::Avx512Vnni => unsafe { by_tile_rows!(kernel_avx512) },
        // SAFETY: see above (avx2, avxvnni checked).
        Isa::AvxVnni => unsafe { by_tile_rows!(kernel_avxvnni) },
        // SAFETY: see above (avx2 checked).
        Isa::Avx2 => unsafe { by_tile_rows!(kernel_avx2) },
        Isa::Scalar => unreachable!("the scalar path does not pack"),
    }
}

/// Prefetches every cache line of `blocks` into L1.
pub(super) fn prefetch(blocks: &[BlockQ8]) {
    let range = blocks.as_ptr_range();
    let (start, end) = (range.start.cast::<i8>(), range.end.cast::<i8>());
    let mut p = start;
    while p < end {
        // SAFETY: a prefetch is a hint that never faults or changes memory; `p` stays within
        // `blocks` (or one past its end), so the pointer arithmetic stays in one allocation.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(p);
            p = p.add(64.min(end.offset_from(p) as usize));
        }
    }
}

#[target_feature(enable = "avx2")]
#[inline]
fn load_row_block(rows: &[&[BlockQ8]; GROUP], r: usize, b: usize) -> __m256i {
    let qs: &[i8; QK] = &rows[r][b].qs;
    // SAFETY: an unaligned load of exactly the 32 bytes of `qs`.
    unsafe { _mm256_loadu_si256(qs.as_ptr().cast()) }
}

/// 4×4 transposes of 32-bit words within each 128-bit lane: out[c] lane L holds word c of the
/// four inputs' lane L (inputs' 128-bit lanes hold words 0-3 / 4-7 of a row).
#[target_feature(enable = "avx512f")]
#[inline]
fn transpose4(z: [__m512i; 4]) -> [__m512i; 4] {
    let t0 = _mm512_unpacklo_epi32(z[0], z[1]);
    let t1 = _mm512_unpackhi_epi32(z[0], z[1]);
    let t2 = _mm512_unpacklo_epi32(z[2], z[3]);
    let t3 = _mm512_unpackhi_epi32(z[2], z[3]);
    [
        _mm512_unpacklo_epi64(t0, t2),
        _mm512_unpackhi_epi64(t0, t2),
        _mm512_unpacklo_epi64(t1, t3),
        _mm512_unpackhi_epi64(t1, t3),
    ]
}

/// Packs 16 rows' blocks: a 16 × 8 transpose of 32-bit words per block.
///
/// ```text
/// za[p] = [row p | row p+4]  (p < 4),  zb[p] = [row 8+p | row 12+p]
/// after transpose4, sa[c] 128-bit lanes = [rows 0-3 word c, rows 0-3 word c+4, rows 4-7 word c, rows 4-7 word c+4]
/// qs[c]   = [sa.L0, sa.L2, sb.L0, sb.L2] = rows 0..16 word c      (shuffle_i32x4 0x88)
/// qs[c+4] = [sa.L1, sa.L3, sb.L1, sb.L3] = rows 0..16 word c + 4  (shuffle_i32x4 0xDD)
/// ```
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn pack_avx512(rows: &[&[BlockQ8]; GROUP], ahead: &[BlockQ8], out: &mut [PackedBlock]) {
    let ones = _mm512_set1_epi8(1);
    // Spread the prefetch of `ahead` over the blocks (a burst stalls on full miss buffers).
    let ahead_per_block = ahead.len().div_ceil(out.len().max(1));
    let mut ahead_chunks = ahead.chunks(ahead_per_block.max(1));
    for (b, pb) in out.iter_mut().enumerate() {
        if let Some(chunk) = ahead_chunks.next() {
            prefetch(chunk);
        }
        let pair = |lo: usize, hi: usize| {
            _mm512_inserti64x4::<1>(
                _mm512_castsi256_si512(load_row_block(rows, lo, b)),
                load_row_block(rows, hi, b),
            )
        };
        let sa = transpose4([pair(0, 4), pair(1, 5), pair(2, 6), pair(3, 7)]);
        let sb = transpose4([pair(8, 12), pair(9, 13), pair(10, 14), pair(11, 15)]);
        let mut sum = _mm512_setzero_si512();
        for c in 0..4 {
            let lo = _mm512_shuffle_i32x4::<0x88>(sa[c], sb[c]);
            let hi = _mm512_shuffle_i32x4::<0xDD>(sa[c], sb[c]);
            sum = _mm512_dpbusd_epi32(sum, ones, lo);
            sum = _mm512_dpbusd_epi32(sum, ones, hi);
            store_i512(&mut pb.qs[c], lo);
            store_i512(&mut pb.qs[c + 4], hi);
        }
        let neg_corr = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_slli_epi32::<7>(sum));
        // SAFETY: an unaligned store of exactly the 64 bytes of `neg_corr`.
        unsafe { _mm512_storeu_si512(pb.neg_corr.as_mut_ptr().cast(), neg_corr) };
        for (r, row) in rows.iter().enumerate() {
            pb.scale[r] = row[b].scale;
            pb.min[r] = row[b].min;
        }
    }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn store_i512(dst: &mut [i8; 64], v: __m512i) {
    // SAFETY: an unaligned store of exactly the 64 bytes of `dst`.
    unsafe { _mm512_storeu_si512(dst.as_mut_ptr().cast(), v) }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn load_i512(src: &[i8; 64]) -> __m512i {
    // SAFETY: an unaligned load of exactly the 64 bytes of `src`.
    unsafe { _mm512_loadu_si512(src.as_ptr().cast()) }
}

#[target_feature(enable = "avx512f")]
#[inline]
fn load_ps512(src: &[f32; 16]) -> __m512 {
    // SAFETY: an unaligned load of exactly the 64 bytes of `src`.
    unsafe { _mm512_loadu_ps(src.as_ptr()) }
}

/// AVX-512 VNNI: one block of the group against MT activation rows, into `acc` (the accumulators
/// of this block's parity). Lane r: `acc += (scale_r * d) * isum + min_r * sum`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
#[inline]
fn block_avx512<const MT: usize>(
    pb: &PackedBlock,
    act: &[ActU8],
    b: usize,
    acc: &mut [__m512; MT],
) {
    let nb = act.len() / MT;
    let w: [__m512i; 8] = std::array::from_fn(|j| load_i512(&pb.qs[j]));
    let ws = load_ps512(&pb.scale);
    let wm = load_ps512(&pb.min);
    // SAFETY: an unaligned load of exactly the 64 bytes of `pb.neg_corr`.
    let neg_corr = unsafe { _mm512_loadu_si512(pb.neg_corr.as_ptr().cast()) };
    for (i, acc) in acc.iter_mut().enumerate() {
        let a = &act[i * nb + b];
        // Σ (x + 128) * q - 128 * Σ q = Σ x * q, exact in int32.
        let mut isum = neg_corr;
        for (j, &wj) in w.iter().enumerate() {
            isum = _mm512_dpbusd_epi32(isum, _mm512_set1_epi32(a.word(j)), wj);
        }
        let t = _mm512_add_ps(
            _mm512_mul_ps(
                _mm512_mul_ps(ws, _mm512_set1_ps(a.d)),
                _mm512_cvtepi32_ps(isum),
            ),
            _mm512_mul_ps(wm, _mm512_set1_ps(a.sum)),
        );
        *acc = _mm512_add_ps(*acc, t);
    }
}

#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
fn kernel_avx512<const MT: usize>(packed: &[PackedBlock], act: &[ActU8], y: &mut [f32]) {
    let mut acc = [[_mm512_setzero_ps(); MT]; 2];
    for (pair_idx, pair) in packed.chunks(2).enumerate() {
        for (parity, pb) in pair.iter().enumerate() {
            block_avx512::<MT>(pb, act, 2 * pair_idx + parity, &mut acc[parity]);
        }
    }
    let (out, _) = y.as_chunks_mut::<16>();
    for (i, out) in out.iter_mut().enumerate() {
        let v = _mm512_add_ps(acc[0][i], acc[1][i]);
        // SAFETY: an unaligned store of exactly the 64 bytes of `out`.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), v) };
    }
}

#[target_feature(enable = "avx2")]
#[inline]
fn load_i256(src: &[i8]) -> __m256i {
    let src: &[i8; 32] = src.first_chunk().unwrap_or(&[0; 32]);
    // SAFETY: an unaligned load of exactly the 32 bytes of `src`.
    unsafe { _mm256_loadu_si256(src.as_ptr().cast()) }
}

#[target_feature(enable = "avx2")]
#[inline]
fn load_ps256(src: &[f32]) -> __m256 {
    let src: &[f32; 8] = src.first_chunk().unwrap_or(&[0.0; 8]);
    // SAFETY: an unaligned load of exactly the 32 bytes of `src`.
    unsafe { _mm256_loadu_ps(src.as_ptr()) }
}

/// Lane halves h = 0, 1 (rows 0-7, 8-15) of a packed block: weights, scales, mins, corrections.
struct Half {
    w: [__m256i; 8],
    ws: __m256,
    wm: __m256,
    neg_corr: __m256i,
}

#[target_feature(enable = "avx2")]
#[inline]
fn half(pb: &PackedBlock, h: usize) -> Half {
    let neg_corr: &[i32] = &pb.neg_corr[8 * h..];
    let neg_corr: &[i32; 8] = neg_corr.first_chunk().unwrap_or(&[0; 8]);
    Half {
        w: std::array::from_fn(|j| load_i256(&pb.qs[j][32 * h..])),
        ws: load_ps256(&pb.scale[8 * h..]),
        wm: load_ps256(&pb.min[8 * h..]),
        // SAFETY: an unaligned load of exactly the 32 bytes of `neg_corr`.
        neg_corr: unsafe { _mm256_loadu_si256(neg_corr.as_ptr().cast()) },
    }
}

/// `acc + (ws * d) * isum + wm * sum` on 8 lanes, in `dot_q8`'s order.
#[target_feature(enable = "avx2")]
#[inline]
fn accumulate256(acc: __m256, half: &Half, a: &ActU8, isum: __m256i) -> __m256 {
    let t = _mm256_add_ps(
        _mm256_mul_ps(
            _mm256_mul_ps(half.ws, _mm256_set1_ps(a.d)),
            _mm256_cvtepi32_ps(isum),
        ),
        _mm256_mul_ps(half.wm, _mm256_set1_ps(a.sum)),
    );
    _mm256_add_ps(acc, t)
}

#[target_feature(enable = "avx2,avxvnni")]
fn kernel_avxvnni<const MT: usize>(packed: &[PackedBlock], act: &[ActU8], y: &mut [f32]) {
    let nb = packed.len();
    let mut acc = [[[_mm256_setzero_ps(); 2]; MT]; 2];
    for (b, pb) in packed.iter().enumerate() {
        let halves = [half(pb, 0), half(pb, 1)];
        for (i, acc) in acc[b % 2].iter_mut().enumerate() {
            let a = &act[i * nb + b];
            for (acc, half) in acc.iter_mut().zip(&halves) {
                let mut isum = half.neg_corr;
                for (j, &wj) in half.w.iter().enumerate() {
                    isum = _mm256_dpbusd_avx_epi32(isum, _mm256_set1_epi32(a.word(j)), wj);
                }
                *acc = accumulate256(*acc, half, a, isum);
            }
        }
    }
    store_halves::<MT>(&acc, y);
}

#[target_feature(enable = "avx2")]
fn kernel_avx2<const MT: usize>(packed: &[PackedBlock], act: &[ActU8], y: &mut [f32]) {
    let nb = packed.len();
    let ones = _mm256_set1_epi16(1);
    let offset = _mm256_set1_epi8(-128);
    let mut acc = [[[_mm256_setzero_ps(); 2]; MT]; 2];
    for (b, pb) in packed.iter().enumerate() {
        let halves = [half(pb, 0), half(pb, 1)];
        for (i, acc) in acc[b % 2].iter_mut().enumerate() {
            let a = &act[i * nb + b];
            for (acc, half) in acc.iter_mut().zip(&halves) {
                // |q| * (x * sign q): unsigned ≤ 128 times signed ≤ 127, so the pair sums of
                // vpmaddubsw (≤ 32512) never saturate; x = stored byte - 128.
                let mut isum = _mm256_setzero_si256();
                for (j, &wj) in half.w.iter().enumerate() {
                    let x = _mm256_xor_si256(_mm256_set1_epi32(a.word(j)), offset);
                    let pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(wj), _mm256_sign_epi8(x, wj));
                    isum = _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, ones));
                }
                *acc = accumulate256(*acc, half, a, isum);
            }
        }
    }
    store_halves::<MT>(&acc, y);
}

/// y[i, 8h .. 8h + 8] = acc[0][i][h] + acc[1][i][h].
#[target_feature(enable = "avx2")]
#[inline]
fn store_halves<const MT: usize>(acc: &[[[__m256; 2]; MT]; 2], y: &mut [f32]) {
    let (out, _) = y.as_chunks_mut::<8>();
    for (k, out) in out.iter_mut().enumerate() {
        let (i, h) = (k / 2, k % 2);
        let v = _mm256_add_ps(acc[0][i][h], acc[1][i][h]);
        // SAFETY: an unaligned store of exactly the 32 bytes of `out`.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
    }
}
