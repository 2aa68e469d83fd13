//! `DecoderSpec`: every supported architecture, normalized into data.
//!
//! The generic decoder (`model::decoder`) reads only this spec; an architecture module
//! (`model::arch::*`) only maps a checkpoint's config to a spec and names its tensors. New
//! architectures are new combinations of these enums, never a new copy of the forward pass.
//!
//! One decoder layer, in spec terms:
//! ```text
//!   Sequential:            h = x + attn(norm1(x));        y = h + mlp(norm2(h))
//!   Parallel{shared}:      n = norm1(x);                  y = x + attn(n) + mlp(n)
//!   Parallel{not shared}:  y = x + attn(norm1(x)) + mlp(norm2(x))
//! ```

use serde::Serialize;

pub use crate::tensor::{Activation, Norm, RopeStyle};

/// Frequency scaling for long contexts, applied to the inverse frequencies at load.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i / rotary_dim)`.
    None,
    /// Positions divided by `factor` (equivalently, every inverse frequency).
    Linear {
        /// Divisor of every inverse frequency (> 1 stretches the context).
        factor: f32,
    },
    /// Llama 3.1 wavelength-dependent scaling.
    Llama3 {
        /// Divisor of the low-frequency (long-wavelength) inverse frequencies, e.g. 8.
        factor: f32,
        /// Wavelengths above `original_max_position_embeddings / low_freq_factor` are divided by
        /// `factor`.
        low_freq_factor: f32,
        /// Wavelengths below `original_max_position_embeddings / high_freq_factor` are kept;
        /// between the two bounds the result is interpolated.
        high_freq_factor: f32,
        /// Context length the model was pre-trained with (e.g. 8192 for Llama 3.1).
        original_max_position_embeddings: usize,
    },
    /// Per-dimension divisors stored in the checkpoint (GGUF `rope_freqs.weight`), one per pair.
    FreqFactors {
        /// One divisor per rotated pair (`rotary_dim / 2`; missing entries count as 1).
        factors: Vec<f32>,
    },
}

/// Rotary position embedding: which dimensions rotate, how they pair, and at what frequencies.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rope {
    /// Frequency base (`rope_theta`, e.g. 10000 or 500000); finite and > 0.
    pub theta: f32,
    /// Number of leading head dimensions rotated (== head_dim for full rotary).
    pub rotary_dim: usize,
    /// How dimensions pair up (NeoX halves or GPT-J interleaved).
    pub style: RopeStyle,
    /// Long-context scaling of the inverse frequencies.
    pub scaling: RopeScaling,
}

impl Rope {
    /// Inverse frequency of each rotated pair: `[rotary_dim / 2]`, with scaling applied.
    pub fn inv_freqs(&self) -> Vec<f32> {
        let num_pairs = self.rotary_dim / 2;
        let base: Vec<f64> = (0..num_pairs)
            .map(|i| 1.0 / (self.theta as f64).powf((2 * i) as f64 / self.rotary_dim as f64))
            .collect();
        let scaled: Vec<f64> = match &self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / *factor as f64).collect(),
            RopeScaling::FreqFactors { factors } => base
                .iter()
                .zip(factors.iter().chain(std::iter::repeat(&1.0)))
                .map(|(f, d)| f / *d as f64)
                .collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    *factor as f64,
                    *low_freq_factor as f64,
                    *high_freq_factor as f64,
                );
                let old_len = *original_max_position_embeddings as f64;
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_len / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }
}

/// How token positions enter the model.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PosEmbedding {
    /// Rotary embedding of q and k (Llama, Mistral, Qwen, GPT-J, Falcon, ...).
    Rope(Rope),
    /// Attention bias `bias_scale * slope_h * (key_pos - query_pos)`, added to the scaled scores;
    /// slopes from `max_bias` (`alibi_bias_max`, 8 for BLOOM and MPT-7B): see
    /// `ops::attention::alibi_slopes` (BLOOM's, MPT's and llama.cpp's constructions agree).
    Alibi {
        /// `alibi_bias_max`: for n heads (a power of two) head h (1-based) gets slope `2^(-max_bias
        /// * h / n)`.
        max_bias: f32,
        /// 1 for BLOOM and MPT; Falcon-RW scales the bias with the scores (1 / sqrt(head_dim)).
        bias_scale: f32,
    },
    /// A learned `[num_positions, hidden]` table added to the token embeddings (GPT-2).
    Learned {
        /// Rows of the position table: the most positions the model can embed.
        num_positions: usize,
    },
}

/// How a checkpoint stores the q/k/v projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum QkvLayout {
    /// Three tensors q, k, v.
    Separate,
    /// One tensor `[q_dim + 2 * kv_dim, hidden]` whose rows are in `FusedQkv` order; it is
    /// re-ordered at load into the decoder's q | k | v rows.
    Fused {
        /// Row order of the fused tensor in the checkpoint.
        layout: FusedQkv,
    },
}

/// Row order of a fused qkv tensor (and its bias).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FusedQkv {
    /// q rows, then k rows, then v rows (GPT-2, MPT, and every GGUF `attn_qkv`).
    Concat,
    /// `[num_heads, 3, head_dim]`: q, k, v of head 0, then of head 1, ... (BLOOM, Falcon-RW
    /// without multi-query). Needs num_kv_heads == num_heads.
    PerHead,
    /// `[num_kv_heads, heads_per_group + 2, head_dim]`: each KV group's query heads, then its
    /// key head and value head (Falcon multi-query and `new_decoder_architecture`).
    KvGroups,
}

/// How attention and MLP are combined with the residual stream (see the module diagram).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Residual {
    /// `h = x + attn(norm1(x)); y = h + mlp(norm2(h))`: Llama, GPT-2, BLOOM, MPT, Falcon-RW.
    Sequential,
    /// `y = x + attn(..) + mlp(..)`, both reading the layer input x: GPT-J, Falcon.
    Parallel {
        /// One norm feeds both attention and MLP (GPT-J, Falcon-7B) instead of one each (Falcon
        /// `new_decoder_architecture`).
        shared_norm: bool,
    },
}

/// The MLP's shape: gated (three projections) or plain (two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Mlp {
    /// down(act(gate(x)) * up(x))
    Gated,
    /// down(act(up(x)))
    Plain,
}

/// Which linear layers carry a bias.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Biases {
    /// The q, k and v projections have biases (Qwen2, GPT-2, BLOOM, ...).
    pub qkv: bool,
    /// The attention output projection has a bias.
    pub attn_out: bool,
    /// The MLP projections (gate/up and down) have biases.
    pub mlp: bool,
    /// The LM head has a bias.
    pub lm_head: bool,
}

/// One architecture as data: every number and choice the generic decoder needs, read from the
/// checkpoint's config by `model::arch`. Validated with `validate`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecoderSpec {
    /// Architecture family name, e.g. "llama", "mistral", "qwen2".
    pub arch: String,
    /// Rows of the embedding table and outputs of the LM head (the tokenizer's ids are below it).
    pub vocab_size: usize,
    /// Width of the residual stream (`d_model`).
    pub hidden_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads; divides `num_heads` (equal: MHA, 1: MQA, otherwise GQA).
    pub num_kv_heads: usize,
    /// Elements per attention head (`hidden_size / num_heads` unless the config sets `head_dim`).
    pub head_dim: usize,
    /// Width of the MLP's hidden layer (per projection; a gated MLP's gate_up has twice as many
    /// rows).
    pub intermediate_size: usize,
    /// Longest context the checkpoint was trained for (the default cap of `max_model_len`).
    pub max_position_embeddings: usize,
    /// The normalization of every layer, the final norm and the optional embedding norm.
    pub norm: Norm,
    /// How positions are encoded.
    pub pos: PosEmbedding,
    /// How attention and MLP outputs join the residual stream.
    pub residual: Residual,
    /// The MLP's activation (applied to the gate in a gated MLP, to the up projection in a plain
    /// one).
    pub act: Activation,
    /// Gated (`down(act(gate) * up)`) or plain (`down(act(up))`) MLP.
    pub mlp: Mlp,
    /// How the checkpoint stores q/k/v (a load-time concern: the decoder always sees q | k | v).
    pub qkv: QkvLayout,
    /// Which linear layers carry a bias.
    pub biases: Biases,
    /// The LM head reuses the token embedding table (no separate `lm_head` weight).
    pub tie_embeddings: bool,
    /// A norm applied to the token embeddings before the first layer (BLOOM).
    pub embedding_norm: bool,
    /// Attention only sees the last `window` positions (Mistral).
    pub sliding_window: Option<usize>,
    /// Scores are `q·k * attn_scale` (normally 1/sqrt(head_dim)).
    pub attn_scale: f32,
    /// Clamp q, k and v to [-c, c] after projection (MPT `clip_qkv`).
    pub clip_qkv: Option<f32>,
}

impl DecoderSpec {
    /// Width of all query heads together: `num_heads * head_dim`.
    pub fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    /// Width of all key (or value) heads together: `num_kv_heads * head_dim`.
    pub fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The rotary embedding, for rope models.
    pub fn rope(&self) -> Option<&Rope> {
        match &self.pos {
            PosEmbedding::Rope(r) => Some(r),
            _ => None,
        }
    }

    /// Rows of the fused gate|up weight: `2 * intermediate` (gated) or `intermediate` (plain).
    pub fn gate_up_dim(&self) -> usize {
        match self.mlp {
            Mlp::Gated => 2 * self.intermediate_size,
            Mlp::Plain => self.intermediate_size,
        }
    }

    /// Per-head ALiBi slopes with the bias scale applied (`[num_heads]`), for ALiBi models.
    pub fn alibi_slopes(&self) -> Option<Vec<f32>> {
        match self.pos {
            PosEmbedding::Alibi {
                max_bias,
                bias_scale,
            } => Some(
                crate::ops::attention::alibi_slopes(self.num_heads, max_bias)
                    .into_iter()
                    .map(|s| s * bias_scale)
                    .collect(),
            ),
            _ => None,
        }
    }

    /// Checks the numbers agree with each other; the message names the fields and values.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
            ("num_kv_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be > 0, got 0"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(format!(
                "num_heads ({}) must be a multiple of num_kv_heads ({})",
                self.num_heads, self.num_kv_heads
            ));
        }
        if let PosEmbedding::Rope(rope) = &self.pos {
            if rope.rotary_dim == 0 || rope.rotary_dim > self.head_dim || rope.rotary_dim % 2 != 0 {
                return Err(format!(
                    "rotary_dim must be even and in [2, head_dim={}], got {}",
                    self.head_dim, rope.rotary_dim
                ));
            }
            if !(rope.theta.is_finite() && rope.theta > 0.0) {
                return Err(format!("rope theta must be > 0, got {}", rope.theta));
            }
        }
        if let QkvLayout::Fused {
            layout: FusedQkv::PerHead,
        } = self.qkv
            && self.num_kv_heads != self.num_heads
        {
            return Err(format!(
                "a per-head fused qkv needs num_kv_heads == num_heads, got {} and {}",
                self.num_kv_heads, self.num_heads
            ));
        }
        if self.sliding_window == Some(0) {
            return Err("sliding_window must be > 0, got 0".into());
        }
        Ok(())
    }

    /// Number of parameters (embeddings counted once when tied).
    pub fn num_params(&self) -> u64 {
        let h = self.hidden_size as u64;
        let (q, kv, inter) = (
            self.q_dim() as u64,
            self.kv_dim() as u64,
            self.intermediate_size as u64,
        );
        let norm_params = match self.norm {
            Norm::Rms { .. } | Norm::Layer { bias: false, .. } => h,
            Norm::Layer { bias: true, .. } => 2 * h,
        };
        let num_layer_norms = match self.residual {
            Residual::Parallel { shared_norm: true } => 1,
            _ => 2,
        };
        let b = self.biases;
        let attn = h * (q + 2 * kv)
            + q * h
            + if b.qkv { q + 2 * kv } else { 0 }
            + if b.attn_out { h } else { 0 };
        let mlp = match self.mlp {
            Mlp::Gated => 3 * h * inter + if b.mlp { 2 * inter + h } else { 0 },
            Mlp::Plain => 2 * h * inter + if b.mlp { inter + h } else { 0 },
        };
        let per_layer = attn + mlp + num_layer_norms * norm_params;
        let vocab = self.vocab_size as u64;
        let embed = vocab * h;
        let head =
            if self.tie_embeddings { 0 } else { vocab * h } + if b.lm_head { vocab } else { 0 };
        let pos = match self.pos {
            PosEmbedding::Learned { num_positions } => num_positions as u64 * h,
            _ => 0,
        };
        let extra_norms = norm_params * (1 + u64::from(self.embedding_norm));
        self.num_layers as u64 * per_layer + embed + head + pos + extra_norms
    }

    /// Floating-point operations (multiply and add counted apart) of one prompt of `n` tokens
    /// computed from position 0: the layers' products for every token, causal attention (query
    /// i against its min(i + 1, window) keys, q·k and p·v), and the LM head for the last token
    /// only (the one that samples). Biases, norms and activations are left out.
    pub fn prefill_flops(&self, n: usize) -> f64 {
        let (h, q, kv, inter) = (
            self.hidden_size as f64,
            self.q_dim() as f64,
            self.kv_dim() as f64,
            self.intermediate_size as f64,
        );
        let mlp = match self.mlp {
            Mlp::Gated => 3.0 * h * inter,
            Mlp::Plain => 2.0 * h * inter,
        };
        let products = h * (q + 2.0 * kv) + q * h + mlp;
        let window = self.sliding_window.unwrap_or(usize::MAX);
        let keys: f64 = (0..n).map(|i| (i + 1).min(window) as f64).sum();
        let layer = 2.0 * n as f64 * products + 4.0 * q * keys;
        self.num_layers as f64 * layer + 2.0 * h * self.vocab_size as f64
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn prefill_flops_of_llama2_7b_by_hand() {
        let spec = crate::model::presets::preset("llama2-7b").unwrap().spec;
        // Per layer: qkv 4096 x 12288, o 4096 x 4096, gate/up/down 3 x 4096 x 11008.
        let products = 4096.0 * 12288.0 + 4096.0 * 4096.0 + 3.0 * 4096.0 * 11008.0;
        let n = 2048.0;
        // Causal: sum over i of (i + 1) keys = n (n + 1) / 2; q.k and p.v, 2 flops each.
        let attention = 4.0 * 4096.0 * n * (n + 1.0) / 2.0;
        let expected = 32.0 * (2.0 * n * products + attention) + 2.0 * 4096.0 * 32000.0;
        assert_eq!(spec.prefill_flops(2048), expected);
        // A sliding window caps the keys per query.
        let windowed = DecoderSpec {
            sliding_window: Some(16),
            ..spec.clone()
        };
        let keys = (1..=16).sum::<usize>() as f64 + 16.0 * (2048.0 - 16.0);
        assert_eq!(
            spec.prefill_flops(2048) - windowed.prefill_flops(2048),
            32.0 * 4.0 * 4096.0 * (n * (n + 1.0) / 2.0 - keys)
        );
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let rope = Rope {
            theta: 500000.0,
            rotary_dim: 128,
            style: RopeStyle::NeoX,
            scaling: RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192,
            },
        };
        let plain = Rope {
            scaling: RopeScaling::None,
            ..rope.clone()
        };
        let (scaled, base) = (rope.inv_freqs(), plain.inv_freqs());
        assert_eq!(scaled[0], base[0], "highest frequency is unchanged");
        let last = base.len() - 1;
        assert!(
            (scaled[last] - base[last] / 8.0).abs() < 1e-12,
            "lowest frequency is divided by factor"
        );
        assert!(
            scaled
                .iter()
                .zip(&base)
                .all(|(s, b)| s <= b && *s >= b / 8.0 - 1e-12)
        );
    }
}
