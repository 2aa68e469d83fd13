//! FP8 E4M3 (the `float8_e4m3fn` of PyTorch, safetensors `F8_E4M3` and cuBLASLt `CUDA_R_8F_E4M3`)
//! on the host: the codec, per-output-channel weight quantization, and `Fp8Weight`, the form a
//! pre-quantized checkpoint's linear is loaded in (codes plus per-tensor, per-channel or block
//! scales), with its exact dequantization and the row concatenation / re-ordering of fused
//! layers. This is the reference the FP8 GPU path is checked against ("FP8 against the
//! dequantized model") and what loads FP8 checkpoints on the CPU.
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

/// The E4M3 code nearest to `x` (ties to even), saturated to ±448; NaN maps to 0x7F. The same
/// arithmetic as `kernels/fp8.cu`'s `f32_to_e4m3` (exponent from the f32 bits, the value scaled
/// by a power of two and rounded once), so host and device codes agree bit for bit.
pub fn f32_to_e4m3(x: f32) -> u8 {
    if x.is_nan() {
        return 0x7F;
    }
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < SMALLEST_NORMAL {
        // Subnormals (spacing 2^-9): the code is the count of 2^-9 steps (exact scaling by a
        // power of two); rounding may reach 8, the smallest normal's code.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // floor(log2 a) from the exponent bits (a is a normal f32 here), then 8..=16 steps of the
    // binade's spacing 2^(e-3); 16 carries into the next binade.
    let mut e = ((a.to_bits() >> 23) & 0xFF) as i32 - 127;
    let mut q = (a * 2f32.powi(3 - e)).round_ties_even();
    if q >= 16.0 {
        q = 8.0;
        e += 1;
    }
    let code = (((e + 7) as u8) << 3) | (q as u8 - 8);
    sign | code.min(0x7E)
}

/// The smallest normal E4M3 value, 2^-6.
const SMALLEST_NORMAL: f32 = 0.015625;

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
    /// Quantizes `w` (`[rows, cols]`, row-major) per output channel: scale = amax / 448. Rows
    /// are split over the available cores (a 7B model is 7e9 values); the result does not
    /// depend on the split.
    pub fn quantize(w: &[f32], rows: usize, cols: usize) -> Fp8Rows {
        let cols1 = cols.max(1);
        let mut codes = vec![0u8; rows * cols];
        let mut scales = vec![0f32; rows];
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let rows_per = rows.div_ceil(threads).max((1 << 16) / cols1).max(1);
        std::thread::scope(|s| {
            for ((c, sc), src) in codes
                .chunks_mut(rows_per * cols1)
                .zip(scales.chunks_mut(rows_per))
                .zip(w.chunks(rows_per * cols1))
            {
                s.spawn(move || {
                    for ((out, scale), row) in c
                        .chunks_mut(cols1)
                        .zip(sc.iter_mut())
                        .zip(src.chunks(cols1))
                    {
                        let amax = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                        *scale = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
                        for (o, &v) in out.iter_mut().zip(row) {
                            *o = f32_to_e4m3(v / *scale);
                        }
                    }
                });
            }
        });
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

/// How an FP8 weight's codes are scaled back to real values (every scale multiplies:
/// `w = e4m3_to_f32(code) * scale`, the checkpoint's `weight_scale` / `weight_scale_inv`).
#[derive(Debug, Clone, PartialEq)]
pub enum Fp8Scale {
    /// One scale for the whole matrix (compressed-tensors `tensor`, ModelOpt, AutoFP8).
    Tensor(f32),
    /// One scale per output row: `[rows]` (compressed-tensors `channel`, fbgemm). Also the form
    /// of a fused weight whose shards (q | k | v, gate | up) each had their own per-tensor scale.
    Channel(Vec<f32>),
    /// One scale per `block.0 x block.1` tile: `[ceil(rows / block.0), ceil(cols / block.1)]`
    /// row-major; the last row and column of tiles may be ragged (DeepSeek's `weight_block_size`,
    /// compressed-tensors `block`).
    Block {
        /// Tile size (rows, cols).
        block: (usize, usize),
        /// `[ceil(rows / block.0), ceil(cols / block.1)]`, row-major.
        scales: Vec<f32>,
    },
}

/// A linear weight `[rows, cols]` (out, in) as an FP8 checkpoint stores it: E4M3 codes, their
/// scales and the static activation scale, if any. What the loader hands on for a quantized
/// linear: the CPU engine dequantizes it (`dequantize`), an FP8 GPU GEMM can take it as it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Fp8Weight {
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// [rows, cols] E4M3 codes, row-major.
    pub codes: Vec<u8>,
    /// The dequantization scales of `codes`.
    pub scale: Fp8Scale,
    /// The static per-tensor activation scale (`input_scale`); None for dynamic activations. A
    /// fused weight keeps the largest of its shards' (what vLLM and TensorRT-LLM do).
    pub input_scale: Option<f32>,
}

impl From<Fp8Rows> for Fp8Weight {
    /// Per-channel scales, dynamic activations (no `input_scale`).
    fn from(r: Fp8Rows) -> Fp8Weight {
        Fp8Weight {
            rows: r.rows,
            cols: r.cols,
            codes: r.codes,
            scale: Fp8Scale::Channel(r.scales),
            input_scale: None,
        }
    }
}

impl Fp8Weight {
    /// The scale of element (`r`, `c`).
    fn scale_at(&self, r: usize, c: usize) -> f32 {
        match &self.scale {
            Fp8Scale::Tensor(s) => *s,
            Fp8Scale::Channel(s) => s[r],
            Fp8Scale::Block { block, scales } => {
                scales[(r / block.0) * self.cols.div_ceil(block.1) + c / block.1]
            }
        }
    }

    /// Whether `scale` has the number of entries `rows` and `cols` need; the message says what
    /// it has and what was expected.
    pub fn check(&self) -> Result<(), String> {
        if self.codes.len() != self.rows * self.cols {
            return Err(format!(
                "{} codes for a [{}, {}] weight",
                self.codes.len(),
                self.rows,
                self.cols
            ));
        }
        let (have, want) = match &self.scale {
            Fp8Scale::Tensor(_) => return Ok(()),
            Fp8Scale::Channel(s) => (s.len(), self.rows),
            Fp8Scale::Block { block, scales } => {
                if block.0 == 0 || block.1 == 0 {
                    return Err(format!("block size {block:?} has a zero side"));
                }
                (
                    scales.len(),
                    self.rows.div_ceil(block.0) * self.cols.div_ceil(block.1),
                )
            }
        };
        match have == want {
            true => Ok(()),
            false => Err(format!(
                "{have} scales where a [{}, {}] weight needs {want}",
                self.rows, self.cols
            )),
        }
    }

    /// The weight in f32, exactly: each element is `e4m3_to_f32(code) * scale` rounded once to
    /// f32 (the E4M3 value is exact in f32, so this is the checkpoint's value to f32 precision).
    // Returns [rows, cols], row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.codes.len());
        for (r, row) in self.codes.chunks(self.cols.max(1)).enumerate() {
            out.extend(
                row.iter()
                    .enumerate()
                    .map(|(c, &code)| e4m3_to_f32(code) * self.scale_at(r, c)),
            );
        }
        out
    }

    /// The row-concatenation of `parts` (fused q | k | v, gate | up), each keeping its own
    /// scales: per-tensor scales become per-row (`Channel`) unless all parts share one. None when
    /// the parts cannot share one representation: different widths, or block scales whose tiles
    /// would straddle two parts (a part other than the last whose rows are not a multiple of the
    /// tile height), or block scales mixed with other forms.
    pub fn concat_rows(parts: &[Fp8Weight]) -> Option<Fp8Weight> {
        let first = parts.first()?;
        let cols = first.cols;
        if parts.iter().any(|p| p.cols != cols) {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let codes = parts.iter().flat_map(|p| p.codes.iter().copied()).collect();
        let input_scale = parts.iter().filter_map(|p| p.input_scale).reduce(f32::max);
        let scale = match &first.scale {
            Fp8Scale::Tensor(s0) if parts.iter().all(|p| p.scale == Fp8Scale::Tensor(*s0)) => {
                Fp8Scale::Tensor(*s0)
            }
            Fp8Scale::Block { block, .. } => {
                // Every part but the last must end on a tile boundary.
                let mut all = Vec::new();
                for (j, p) in parts.iter().enumerate() {
                    let whole_tiles = j + 1 == parts.len() || p.rows % block.0 == 0;
                    match &p.scale {
                        Fp8Scale::Block { block: b, scales } if b == block && whole_tiles => {
                            all.extend_from_slice(scales)
                        }
                        _ => return None,
                    }
                }
                Fp8Scale::Block {
                    block: *block,
                    scales: all,
                }
            }
            _ => {
                let mut all = Vec::with_capacity(rows);
                for p in parts {
                    match &p.scale {
                        Fp8Scale::Tensor(s) => all.extend(std::iter::repeat_n(*s, p.rows)),
                        Fp8Scale::Channel(s) => all.extend_from_slice(s),
                        Fp8Scale::Block { .. } => return None,
                    }
                }
                Fp8Scale::Channel(all)
            }
        };
        Some(Fp8Weight {
            rows,
            cols,
            codes,
            scale,
            input_scale,
        })
    }

    /// The weight whose row `i` is row `src_rows[i]` of this one (a fused checkpoint tensor
    /// re-ordered into q | k | v), scales following their rows. None for block scales (a
    /// re-ordering that splits tiles has no block form).
    pub fn gather_rows(&self, src_rows: &[usize]) -> Option<Fp8Weight> {
        let scale = match &self.scale {
            Fp8Scale::Tensor(s) => Fp8Scale::Tensor(*s),
            Fp8Scale::Channel(s) => Fp8Scale::Channel(src_rows.iter().map(|&r| s[r]).collect()),
            Fp8Scale::Block { .. } => return None,
        };
        let cols = self.cols;
        let codes = src_rows
            .iter()
            .flat_map(|&r| self.codes[r * cols..(r + 1) * cols].iter().copied())
            .collect();
        Some(Fp8Weight {
            rows: src_rows.len(),
            cols,
            codes,
            scale,
            input_scale: self.input_scale,
        })
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
    fn every_midpoint_goes_to_the_even_code_and_neighbours_to_the_nearest() {
        // Positive codes 0x00..=0x7E in increasing value, subnormals and binade edges included.
        for c in 0u8..0x7E {
            let (lo, hi) = (e4m3_to_f32(c), e4m3_to_f32(c + 1));
            let mid = (lo + hi) / 2.0;
            let even = if c % 2 == 0 { c } else { c + 1 };
            for sign in [0u8, 0x80] {
                let s = if sign == 0 { 1.0 } else { -1.0 };
                assert_eq!(f32_to_e4m3(s * mid), sign | even, "midpoint of {c:#04x}");
                let below = (mid - (hi - lo) / 8.0) * s;
                let above = (mid + (hi - lo) / 8.0) * s;
                assert_eq!(
                    f32_to_e4m3(below),
                    sign | c,
                    "just below midpoint of {c:#04x}"
                );
                assert_eq!(
                    f32_to_e4m3(above),
                    sign | (c + 1),
                    "above midpoint of {c:#04x}"
                );
            }
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

    fn weight(rows: usize, cols: usize, scale: Fp8Scale) -> Fp8Weight {
        Fp8Weight {
            rows,
            cols,
            codes: (0..rows * cols).map(|i| (i % 0x70) as u8).collect(),
            scale,
            input_scale: None,
        }
    }

    #[test]
    fn dequantize_applies_each_scale_form() {
        let codes_f32 = |w: &Fp8Weight| w.codes.iter().map(|&c| e4m3_to_f32(c)).collect::<Vec<_>>();
        let t = weight(3, 5, Fp8Scale::Tensor(0.5));
        assert_eq!(
            t.dequantize(),
            codes_f32(&t).iter().map(|v| v * 0.5).collect::<Vec<_>>()
        );
        let ch = weight(3, 5, Fp8Scale::Channel(vec![1.0, 2.0, 3.0]));
        let d = ch.dequantize();
        for r in 0..3 {
            for c in 0..5 {
                assert_eq!(
                    d[r * 5 + c],
                    e4m3_to_f32(ch.codes[r * 5 + c]) * (r + 1) as f32
                );
            }
        }
        // 5 x 7 in 2 x 3 tiles: 3 x 3 tiles, the last row and column ragged.
        let scales: Vec<f32> = (0..9).map(|i| 1.0 + i as f32).collect();
        let b = weight(
            5,
            7,
            Fp8Scale::Block {
                block: (2, 3),
                scales: scales.clone(),
            },
        );
        b.check().unwrap();
        let d = b.dequantize();
        for r in 0..5 {
            for c in 0..7 {
                let s = scales[(r / 2) * 3 + c / 3];
                assert_eq!(d[r * 7 + c], e4m3_to_f32(b.codes[r * 7 + c]) * s);
            }
        }
        let bad = weight(
            5,
            7,
            Fp8Scale::Block {
                block: (2, 3),
                scales: vec![1.0; 6],
            },
        );
        assert!(bad.check().unwrap_err().contains("6 scales"));
    }

    #[test]
    fn concat_keeps_each_shards_scale_on_its_rows() {
        let q = Fp8Weight {
            input_scale: Some(0.5),
            ..weight(2, 4, Fp8Scale::Tensor(2.0))
        };
        let k = Fp8Weight {
            input_scale: Some(0.75),
            ..weight(1, 4, Fp8Scale::Tensor(3.0))
        };
        let v = weight(1, 4, Fp8Scale::Channel(vec![5.0]));
        let fused = Fp8Weight::concat_rows(&[q.clone(), k.clone(), v.clone()]).unwrap();
        assert_eq!(fused.scale, Fp8Scale::Channel(vec![2.0, 2.0, 3.0, 5.0]));
        assert_eq!(fused.input_scale, Some(0.75));
        let mut want = q.dequantize();
        want.extend(k.dequantize());
        want.extend(v.dequantize());
        assert_eq!(fused.dequantize(), want);
        // Equal per-tensor scales stay one scale.
        let same = Fp8Weight::concat_rows(&[q.clone(), q.clone()]).unwrap();
        assert_eq!(same.scale, Fp8Scale::Tensor(2.0));
        // Block tiles: aligned parts concatenate, a ragged part does not.
        let blk = |rows| {
            weight(
                rows,
                4,
                Fp8Scale::Block {
                    block: (2, 4),
                    scales: vec![1.5; rows.div_ceil(2)],
                },
            )
        };
        let ok = Fp8Weight::concat_rows(&[blk(2), blk(3)]).unwrap();
        assert_eq!(ok.dequantize().len(), 20);
        assert!(Fp8Weight::concat_rows(&[blk(3), blk(2)]).is_none());
    }

    #[test]
    fn gather_moves_channel_scales_with_their_rows() {
        let w = weight(3, 2, Fp8Scale::Channel(vec![1.0, 2.0, 4.0]));
        let g = w.gather_rows(&[2, 0, 1]).unwrap();
        assert_eq!(g.scale, Fp8Scale::Channel(vec![4.0, 1.0, 2.0]));
        assert_eq!(&g.dequantize()[..2], &w.dequantize()[4..6]);
    }
}
