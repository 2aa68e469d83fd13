//! Rotary position embedding applied in place to q/k rows.
//!
//! `RopeTable` holds cos/sin for the positions of one step (computed once, used by every layer).
//! Two pairings (see `RopeStyle`): NeoX pairs (i, i + rotary_dim/2); GPT-J pairs (2i, 2i+1).
//! Only the first `rotary_dim` dims of each head rotate (partial rotary); the rest pass through.

use crate::tensor::RopeStyle;

/// cos/sin of every (token, rotation pair) angle of one step: `[num_tokens, rotary_dim / 2]`, built
/// once per step and applied to q and k of every layer.
pub struct RopeTable {
    num_pairs: usize,
    /// [num_tokens, num_pairs]
    cos: Vec<f32>,
    /// [num_tokens, num_pairs]
    sin: Vec<f32>,
}

impl RopeTable {
    /// Angles as Hugging Face computes them: `position * inv_freq` in f32.
    pub fn new(inv_freqs: &[f32], positions: &[usize]) -> Self {
        let num_pairs = inv_freqs.len();
        let mut cos = Vec::with_capacity(positions.len() * num_pairs);
        let mut sin = Vec::with_capacity(positions.len() * num_pairs);
        for &pos in positions {
            for &f in inv_freqs {
                let angle = pos as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        RopeTable {
            num_pairs,
            cos,
            sin,
        }
    }

    /// Rotates `x: [num_tokens, num_heads, head_dim]` in place (row stride `row_stride` floats,
    /// so q and k can be rotated inside a fused qkv buffer).
    pub fn apply(
        &self,
        x: &mut [f32],
        row_stride: usize,
        num_heads: usize,
        head_dim: usize,
        style: RopeStyle,
    ) {
        let half = self.num_pairs;
        for (token_idx, row) in x.chunks_mut(row_stride).enumerate() {
            let cos = &self.cos[token_idx * half..(token_idx + 1) * half];
            let sin = &self.sin[token_idx * half..(token_idx + 1) * half];
            for head in row[..num_heads * head_dim].chunks_mut(head_dim) {
                match style {
                    RopeStyle::NeoX => {
                        for i in 0..half {
                            let (a, b) = (head[i], head[i + half]);
                            head[i] = a * cos[i] - b * sin[i];
                            head[i + half] = b * cos[i] + a * sin[i];
                        }
                    }
                    RopeStyle::GptJ => {
                        for i in 0..half {
                            let (a, b) = (head[2 * i], head[2 * i + 1]);
                            head[2 * i] = a * cos[i] - b * sin[i];
                            head[2 * i + 1] = b * cos[i] + a * sin[i];
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_position_zero_is_identity() {
        let inv = [1.0f32, 0.1];
        let table = RopeTable::new(&inv, &[0, 7]);
        let orig: Vec<f32> = vec![1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 2.0, 3.0, 4.0, 5.0];
        for style in [RopeStyle::NeoX, RopeStyle::GptJ] {
            let mut x = orig.clone();
            table.apply(&mut x, 5, 1, 5, style);
            assert_eq!(&x[..5], &orig[..5], "position 0 must not rotate");
            assert_eq!(x[9], 5.0, "dims past rotary_dim pass through");
            let n0: f32 = orig[5..9].iter().map(|v| v * v).sum();
            let n1: f32 = x[5..9].iter().map(|v| v * v).sum();
            assert!((n0 - n1).abs() < 1e-4);
            assert_ne!(&x[5..9], &orig[5..9]);
        }
    }

    #[test]
    fn neox_pairs_half_split_and_gptj_pairs_neighbours() {
        let table = RopeTable::new(&[1.0, 0.0], &[1]);
        let (c, s) = (1.0f32.cos(), 1.0f32.sin());
        let mut neox = vec![1.0, 0.0, 0.0, 0.0];
        table.apply(&mut neox, 4, 1, 4, RopeStyle::NeoX);
        // pair (0, 2) rotates by angle 1; pair (1, 3) by angle 0
        assert!((neox[0] - c).abs() < 1e-6 && (neox[2] - s).abs() < 1e-6);
        let mut gptj = vec![1.0, 0.0, 0.0, 0.0];
        table.apply(&mut gptj, 4, 1, 4, RopeStyle::GptJ);
        assert!((gptj[0] - c).abs() < 1e-6 && (gptj[1] - s).abs() < 1e-6);
    }
}
