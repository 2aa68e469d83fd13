//! The one generic decoder: a forward pass over a mixed batch of prefill chunks and decode
//! tokens, driven only by the `DecoderSpec`, reading and writing the paged KV cache.

use crate::model::spec::{DecoderSpec, Mlp, PosEmbedding, Residual};
use crate::model::weights::{DecoderWeights, LayerWeights, NormWeights};
use crate::ops::attention::{AttnParams, AttnSeq, KvLayerCache, paged_attention};
use crate::ops::linear::linear;
use crate::ops::rope::RopeTable;
use crate::ops::{activation, norm};

/// One step's input, flattened over the batch.
pub struct BatchInput<'a> {
    /// [num_tokens]
    pub token_ids: &'a [u32],
    /// [num_tokens] position of each token in its sequence
    pub positions: &'a [usize],
    /// [num_tokens] KV cache slot of each token
    pub slots: &'a [usize],
    /// The sequences, in batch order; their `q_len`s add up to num_tokens.
    pub seqs: &'a [AttnSeq<'a>],
    /// Token indices whose logits are wanted (the last token of each sequence that samples).
    pub logits_rows: &'a [usize],
}

pub struct Decoder {
    pub spec: DecoderSpec,
    pub weights: DecoderWeights,
    /// [rotary_dim / 2], scaling applied
    inv_freqs: Vec<f32>,
    /// [num_heads] for ALiBi models
    alibi_slopes: Option<Vec<f32>>,
}

impl Decoder {
    pub fn new(spec: DecoderSpec, weights: DecoderWeights) -> Self {
        let inv_freqs = match &spec.pos {
            PosEmbedding::Rope(rope) => rope.inv_freqs(),
            _ => vec![],
        };
        let alibi_slopes = spec.alibi_slopes();
        Decoder {
            spec,
            weights,
            inv_freqs,
            alibi_slopes,
        }
    }

    /// Runs the batch through every layer, writing each token's k/v into `kv` at its slot.
    /// Returns logits `[logits_rows.len(), vocab_size]`.
    pub fn forward(
        &self,
        kv: &mut [KvLayerCache],
        block_size: usize,
        input: &BatchInput<'_>,
    ) -> Vec<f32> {
        let spec = &self.spec;
        let w = &self.weights;
        let h = spec.hidden_size;
        let num_tokens = input.token_ids.len();

        // x: [num_tokens, hidden]
        let mut x = vec![0.0f32; num_tokens * h];
        for (row, &id) in x.chunks_mut(h).zip(input.token_ids) {
            w.embedding.row_to_f32(id as usize, row);
        }
        if let Some(pos_table) = &w.position_embedding {
            for (row, &pos) in x.chunks_mut(h).zip(input.positions) {
                for (v, p) in row.iter_mut().zip(&pos_table[pos * h..(pos + 1) * h]) {
                    *v += p;
                }
            }
        }
        if let Some(n) = &w.embedding_norm {
            let src = x.clone();
            self.norm(n, &src, &mut x);
        }
        let rope = match &spec.pos {
            PosEmbedding::Rope(_) => Some(RopeTable::new(&self.inv_freqs, input.positions)),
            _ => None,
        };
        let mut scratch = Scratch::new(spec, num_tokens);
        for (layer, cache) in w.layers.iter().zip(kv.iter_mut()) {
            self.layer(
                layer,
                cache,
                block_size,
                rope.as_ref(),
                input,
                &mut x,
                &mut scratch,
            );
        }

        // Final norm and LM head only for the rows that sample.
        let num_rows = input.logits_rows.len();
        let mut last = vec![0.0f32; num_rows * h];
        for (dst, &t) in last.chunks_mut(h).zip(input.logits_rows) {
            dst.copy_from_slice(&x[t * h..(t + 1) * h]);
        }
        let mut normed = vec![0.0f32; num_rows * h];
        self.norm(&w.final_norm, &last, &mut normed);
        let mut logits = vec![0.0f32; num_rows * spec.vocab_size];
        linear(
            &normed,
            num_rows,
            w.lm_head(),
            w.lm_head_bias.as_deref(),
            &mut logits,
        );
        logits
    }

    fn norm(&self, n: &NormWeights, x: &[f32], out: &mut [f32]) {
        norm::norm_rows(self.spec.norm, x, &n.weight, n.bias.as_deref(), out);
    }

    #[allow(clippy::too_many_arguments)]
    fn layer(
        &self,
        lw: &LayerWeights,
        cache: &mut KvLayerCache,
        block_size: usize,
        rope: Option<&RopeTable>,
        input: &BatchInput<'_>,
        x: &mut [f32],
        s: &mut Scratch,
    ) {
        let spec = &self.spec;
        let (h, q_dim, kv_dim) = (spec.hidden_size, spec.q_dim(), spec.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let m = input.token_ids.len();

        // Attention block.
        self.norm(&lw.attn_norm, x, &mut s.normed);
        linear(&s.normed, m, &lw.qkv, lw.qkv_bias.as_deref(), &mut s.qkv);
        if let Some(c) = spec.clip_qkv {
            s.qkv.iter_mut().for_each(|v| *v = v.clamp(-c, c));
        }
        if let (Some(rope), PosEmbedding::Rope(r)) = (rope, &spec.pos) {
            rope.apply(&mut s.qkv, qkv_dim, spec.num_heads, spec.head_dim, r.style);
            rope.apply(
                &mut s.qkv[q_dim..],
                qkv_dim,
                spec.num_kv_heads,
                spec.head_dim,
                r.style,
            );
        }
        for (row, &slot) in s.qkv.chunks(qkv_dim).zip(input.slots) {
            cache.write(slot, &row[q_dim..q_dim + kv_dim], &row[q_dim + kv_dim..]);
        }
        let params = AttnParams {
            num_heads: spec.num_heads,
            num_kv_heads: spec.num_kv_heads,
            head_dim: spec.head_dim,
            block_size,
            scale: spec.attn_scale,
            sliding_window: spec.sliding_window,
            alibi_slopes: self.alibi_slopes.as_deref(),
        };
        paged_attention(&mut s.attn, &s.qkv, qkv_dim, cache, input.seqs, &params);
        linear(
            &s.attn,
            m,
            &lw.attn_out,
            lw.attn_out_bias.as_deref(),
            &mut s.attn_proj,
        );

        // MLP block and residuals.
        match spec.residual {
            Residual::Sequential => {
                add_into(x, &s.attn_proj);
                let mlp_norm = lw.mlp_norm.as_ref().unwrap_or(&lw.attn_norm);
                self.norm(mlp_norm, x, &mut s.normed);
                self.mlp(lw, m, s);
                add_into(x, &s.mlp_out);
            }
            Residual::Parallel { shared_norm } => {
                if !shared_norm {
                    let mlp_norm = lw.mlp_norm.as_ref().unwrap_or(&lw.attn_norm);
                    self.norm(mlp_norm, x, &mut s.normed);
                }
                self.mlp(lw, m, s);
                add_into(x, &s.attn_proj);
                add_into(x, &s.mlp_out);
            }
        }
        debug_assert_eq!(x.len(), m * h);
    }

    /// mlp_out = down(act(gate(normed)) * up(normed)) or down(act(up(normed)))
    fn mlp(&self, lw: &LayerWeights, m: usize, s: &mut Scratch) {
        let inter = self.spec.intermediate_size;
        linear(
            &s.normed,
            m,
            &lw.gate_up,
            lw.gate_up_bias.as_deref(),
            &mut s.gate_up,
        );
        match self.spec.mlp {
            Mlp::Gated => activation::gated(self.spec.act, &s.gate_up, inter, &mut s.act),
            Mlp::Plain => {
                s.act.copy_from_slice(&s.gate_up[..m * inter]);
                activation::in_place(self.spec.act, &mut s.act);
            }
        }
        linear(&s.act, m, &lw.down, lw.down_bias.as_deref(), &mut s.mlp_out);
    }
}

/// Activation buffers of one forward pass, sized for its number of tokens.
struct Scratch {
    /// [m, hidden]
    normed: Vec<f32>,
    /// [m, q_dim + 2 kv_dim]
    qkv: Vec<f32>,
    /// [m, q_dim]
    attn: Vec<f32>,
    /// [m, hidden]
    attn_proj: Vec<f32>,
    /// [m, 2 inter] (gated) or [m, inter]
    gate_up: Vec<f32>,
    /// [m, inter]
    act: Vec<f32>,
    /// [m, hidden]
    mlp_out: Vec<f32>,
}

impl Scratch {
    fn new(spec: &DecoderSpec, m: usize) -> Self {
        let gate_up_cols = match spec.mlp {
            Mlp::Gated => 2 * spec.intermediate_size,
            Mlp::Plain => spec.intermediate_size,
        };
        Scratch {
            normed: vec![0.0; m * spec.hidden_size],
            qkv: vec![0.0; m * (spec.q_dim() + 2 * spec.kv_dim())],
            attn: vec![0.0; m * spec.q_dim()],
            attn_proj: vec![0.0; m * spec.hidden_size],
            gate_up: vec![0.0; m * gate_up_cols],
            act: vec![0.0; m * spec.intermediate_size],
            mlp_out: vec![0.0; m * spec.hidden_size],
        }
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}
