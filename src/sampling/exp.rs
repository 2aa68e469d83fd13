//! `exp` for the sampling hot loops, written in plain IEEE-754 f32 arithmetic: no libm call, so
//! (1) results are bit-identical on every platform and libm (glibc, musl and macOS `expf` may differ
//! in the last bit, which could flip a seeded draw), and (2) the loops over a 150k-token vocab
//! auto-vectorize. Only non-positive inputs are needed: every caller subtracts the row maximum.
//! Must never be used where inputs can be positive.

/// Below this, e^x is smaller than the smallest normal f32: the result is flushed to 0.
const MIN_X: f32 = -87.336_54; // ≈ ln(f32::MIN_POSITIVE)
const LOG2_E: f32 = std::f32::consts::LOG2_E;
/// ln 2 split in two (Cody & Waite) so that `n * LN2_HI` is exact for |n| <= 126.
const LN2_HI: f32 = 0.693_145_75; // exactly 0.693145751953125 (12 significant bits)
const LN2_LO: f32 = 1.428_606_8e-6;
/// 1.5 * 2^23: adding it rounds an f32 of magnitude < 2^22 to an integer (nearest, ties even)
/// and leaves that integer in the low mantissa bits.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// e^x for x <= 0, within ~2 ulp of the exact value; exactly 0 for x < ~-87.34, for `-inf` and
/// for NaN. Positive inputs are clamped to 0 (result 1).
#[inline]
pub fn exp_nonpositive(x: f32) -> f32 {
    // NaN stays NaN here; the final select maps it to 0.
    let clamped = x.clamp(MIN_X, 0.0);
    // x = n ln2 + r with n integer in [-126, 0] and |r| <= ln2 / 2.
    let shifted = clamped * LOG2_E + ROUND_MAGIC;
    let n = shifted - ROUND_MAGIC;
    let n_int = shifted.to_bits().wrapping_sub(ROUND_MAGIC.to_bits()) as i32;
    let r = (clamped - n * LN2_HI) - n * LN2_LO;
    // e^r by its Taylor series to r^7 / 7! (truncation error < 6e-9 relative on |r| <= 0.347).
    let p = 1.0
        + r * (1.0
            + r * (1.0 / 2.0
                + r * (1.0 / 6.0
                    + r * (1.0 / 24.0
                        + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    // 2^n built from its exponent bits; n + 127 is in [1, 127], a normal exponent.
    let scale = f32::from_bits((n_int.wrapping_add(127) as u32) << 23);
    // `>=` is false for NaN, so NaN maps to 0 as well.
    if x >= MIN_X { p * scale } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_f64_exp_within_two_ulp() {
        let mut worst_rel_err = 0.0f64;
        let num_steps = 200_000;
        for step in 0..=num_steps {
            let x = MIN_X * step as f32 / num_steps as f32;
            let exact = f64::from(x).exp();
            let got = f64::from(exp_nonpositive(x));
            worst_rel_err = worst_rel_err.max((got - exact).abs() / exact);
        }
        // f32 has 24 significant bits: 1 ulp <= 2^-23 ≈ 1.19e-7 relative.
        assert!(
            worst_rel_err < 2.4e-7,
            "worst relative error {worst_rel_err:e}"
        );
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-0.0), 1.0);
    }

    #[test]
    fn flushes_out_of_range_and_nan_to_zero() {
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp_nonpositive(-88.0), 0.0);
        assert_eq!(exp_nonpositive(-1e30), 0.0);
        assert_eq!(exp_nonpositive(f32::NAN), 0.0);
        assert!(exp_nonpositive(MIN_X) > 0.0);
        assert_eq!(exp_nonpositive(3.0), 1.0);
    }
}
