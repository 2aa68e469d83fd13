//! FP8 E4M3 (the `float8_e4m3fn` of PyTorch, safetensors `F8_E4M3` and cuBLASLt `CUDA_R_8F_E4M3`)
//! on the host: the codec and per-output-channel weight quantization. This is the reference the
//! FP8 GPU path is checked against ("FP8 against the dequantized model") and what loads FP8
//! checkpoints on the CPU.
//!
//! ```text
//!   bit 7: sign | bits 6..3: exponent, bias 7 | bits 2..0: mantissa
//!   normal:    (-1)^s * 2^(e-7) * (1 + m/8)     e in 1..=15 (e = 15, m = 7 is NaN)
//!   subnormal: (-1)^s * 2^-6 * (m/8)            e = 0
//!   no infinities; largest finite 448 (0x7E), smallest subnormal 2^-9, NaN 0x7F / 0xFF
//! ```
//! Encoding rounds to nearest, ties to even. Out of range values saturate to ±448 (what a
//! quantizer wants; PyTorch's cast gives NaN there, but every quantizer clamps first).

/// Largest finite E4M3 value.
pub const E4M3_MAX: f32 = 448.0;

/// The value of E4M3 code `b` (NaN for 0x7F and 0xFF).
pub fn e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = (b >> 3) & 0x0F;
    let man = (b & 0x07) as f32;
    if exp == 0x0F && b & 0x07 == 0x07 {
        return f32::NAN;
    }
    let mag = match exp {
        0 => man / 8.0 * 2f32.powi(-6),
        e => (1.0 + man / 8.0) * 2f32.powi(e as i32 - 7),
    };
    sign * mag
}

/// The E4M3 code nearest to `x` (ties to even), saturated to ±448; NaN maps to 0x7F.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // The spacing of representable values around `a`: 2^-9 below 2^-6 (subnormals), else
    // 2^(floor(log2 a) - 3). Scale by it, round half to even, and rebuild the code.
    let e = if a < 2f32.powi(-6) {
        -6
    } else {
        a.log2().floor() as i32
    };
    let ulp = 2f32.powi(e - 3);
    let q = round_half_even(a / ulp); // 8..=16 for normals (16: carries into the next binade)
    let value = q * ulp;
    if value >= E4M3_MAX {
        return sign | 0x7E;
    }
    if value == 0.0 {
        return sign;
    }
    // Encode `value` exactly (it is representable by construction).
    let (exp_field, man) = if value < 2f32.powi(-6) {
        (0u8, (value / 2f32.powi(-9)) as u8)
    } else {
        let e = value.log2().floor() as i32;
        let man = ((value / 2f32.powi(e) - 1.0) * 8.0).round() as u8;
        ((e + 7) as u8, man)
    };
    sign | (exp_field << 3) | (man & 0x07)
}

fn round_half_even(x: f32) -> f32 {
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

/// A `[rows, cols]` weight in E4M3 with one f32 scale per row (output channel):
/// `w[r][c] ≈ scale[r] * e4m3_to_f32(codes[r * cols + c])`.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Rows {
    /// Output channels.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// [rows, cols] E4M3 codes, row-major.
    pub codes: Vec<u8>,
    /// [rows] dequantization scale of each row: the row's max |w| / 448 (1 for an all-zero row).
    pub scales: Vec<f32>,
}

impl Fp8Rows {
    /// Quantizes `w` (`[rows, cols]`, row-major) per output channel: scale = amax / 448.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Fp8Rows {
        let mut codes = Vec::with_capacity(rows * cols);
        let mut scales = Vec::with_capacity(rows);
        for row in w.chunks(cols.max(1)).take(rows) {
            let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
            codes.extend(row.iter().map(|&v| f32_to_e4m3(v / scale)));
            scales.push(scale);
        }
        Fp8Rows {
            rows,
            cols,
            codes,
            scales,
        }
    }

    /// Row `r` in f32 (`out`: [cols]).
    pub fn row_to_f32(&self, r: usize, out: &mut [f32]) {
        let codes = &self.codes[r * self.cols..(r + 1) * self.cols];
        let s = self.scales[r];
        for (o, &c) in out.iter_mut().zip(codes) {
            *o = s * e4m3_to_f32(c);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn known_codes_decode_to_their_values() {
        assert_eq!(e4m3_to_f32(0x00), 0.0);
        assert_eq!(e4m3_to_f32(0x38), 1.0);
        assert_eq!(e4m3_to_f32(0xB8), -1.0);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert_eq!(e4m3_to_f32(0x08), 2f32.powi(-6)); // smallest normal
        assert_eq!(e4m3_to_f32(0x01), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(e4m3_to_f32(0x07), 7.0 * 2f32.powi(-9)); // largest subnormal
        assert_eq!(e4m3_to_f32(0x3C), 1.5);
        assert!(e4m3_to_f32(0x7F).is_nan() && e4m3_to_f32(0xFF).is_nan());
    }

    #[test]
    fn every_finite_code_round_trips() {
        for b in 0..=255u8 {
            let v = e4m3_to_f32(b);
            if v.is_nan() {
                continue;
            }
            let back = f32_to_e4m3(v);
            // +0 and -0 are distinct codes of the same value.
            assert_eq!(e4m3_to_f32(back), v, "code {b:#04x} = {v}");
            if v != 0.0 {
                assert_eq!(back, b, "code {b:#04x} = {v}");
            }
        }
    }

    #[test]
    fn encoding_rounds_to_nearest_even_and_saturates() {
        // Between 1.0 (0x38) and 1.125 (0x39): the midpoint 1.0625 goes to the even mantissa.
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.07), 0x39);
        // Between 1.125 (0x39, odd) and 1.25 (0x3A): the midpoint goes up to the even one.
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        // 15.5 lies between 15 (0x57) and 16 (0x58, next binade): ties to even = 16.
        assert_eq!(e4m3_to_f32(f32_to_e4m3(15.5)), 16.0);
        assert_eq!(f32_to_e4m3(1e6), 0x7E);
        assert_eq!(f32_to_e4m3(-1e6), 0xFE);
        assert_eq!(f32_to_e4m3(450.0), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        // Below half the smallest subnormal: zero, keeping the sign.
        assert_eq!(f32_to_e4m3(2f32.powi(-11)), 0x00);
        assert_eq!(f32_to_e4m3(-2f32.powi(-11)), 0x80);
        // Every value is encoded to its nearest code (brute force over a dense grid).
        let finite: Vec<f32> = (0..=255u8)
            .map(e4m3_to_f32)
            .filter(|v| v.is_finite())
            .collect();
        for i in -4000..=4000 {
            let x = i as f32 * 0.1173;
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = finite
                .iter()
                .map(|&v| (v - x.clamp(-E4M3_MAX, E4M3_MAX)).abs())
                .fold(f32::INFINITY, f32::min);
            assert_eq!((got - x.clamp(-E4M3_MAX, E4M3_MAX)).abs(), best, "x = {x}");
        }
    }

    #[test]
    fn per_channel_quantization_keeps_each_row_within_its_half_ulp() {
        let (rows, cols) = (4, 64);
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * (1 + i / cols) as f32)
            .collect();
        let q = Fp8Rows::quantize(&w, rows, cols);
        let mut row = vec![0.0; cols];
        for r in 0..rows {
            let src = &w[r * cols..(r + 1) * cols];
            let amax = src.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert_eq!(q.scales[r], amax / E4M3_MAX);
            q.row_to_f32(r, &mut row);
            for (a, b) in src.iter().zip(&row) {
                // Relative error of E4M3 is at most 2^-4 (half of a 3-bit mantissa ulp) above
                // the subnormal range.
                assert!(
                    (a - b).abs() <= a.abs() / 16.0 + q.scales[r] * 2f32.powi(-10),
                    "{a} vs {b}"
                );
            }
            // The row's largest value is exactly representable: it maps to ±448.
            let max_idx = (0..cols)
                .max_by(|&i, &j| src[i].abs().total_cmp(&src[j].abs()))
                .unwrap();
            assert_eq!(q.codes[r * cols + max_idx] & 0x7F, 0x7E);
        }
        // An all-zero row gets scale 1 and zero codes.
        let z = Fp8Rows::quantize(&[0.0; 8], 1, 8);
        assert_eq!((z.scales[0], z.codes.iter().all(|&c| c == 0)), (1.0, true));
    }
}
