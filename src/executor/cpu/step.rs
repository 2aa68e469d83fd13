//! `CpuStep`: one CPU step of one rank, the `DecoderBackend` the forward pass runs on: the host
//! ops of `crate::ops` over the rank's weights, KV cache and step buffers. With tensor
//! parallelism the step also holds the rank's communicator: `all_reduce` sums the row-parallel
//! partial products over the ranks, `embed` looks up only the rank's vocabulary rows (others
//! zero) and sums, and `lm_head` gathers every rank's logits so sampling sees the whole
//! vocabulary (the padding of the last rank dropped).

use crate::executor::batch::{ExecutorError, StepBatch};
use crate::executor::dump::Dumper;
use crate::executor::tp::comm::HostComm;
use crate::model::DecoderSpec;
use crate::model::decoder::{Act, DecoderBackend, FfnAct, LinearSel, NormSel, Tap};
use crate::model::spec::RopeStyle;
use crate::model::tp::RankLayout;
use crate::model::weights::{DecoderWeights, NormWeights};
use crate::ops::attention::{AttnParams, AttnSeq, KvLayerCache, paged_attention};
use crate::ops::linear::{Weight, linear};
use crate::ops::rope::RopeTable;
use crate::ops::{activation, norm};

/// One CPU step: the forward pass's ops over the host weights, cache and buffers. `spec` is the
/// rank's (its heads and MLP columns; the full vocabulary).
pub(super) struct CpuStep<'a> {
    pub spec: &'a DecoderSpec,
    /// What this rank holds of the model.
    pub layout: &'a RankLayout,
    /// The rank's communicator; None for a single rank.
    pub comm: Option<&'a mut HostComm>,
    pub w: &'a DecoderWeights,
    pub kv: &'a mut [KvLayerCache],
    pub batch: &'a StepBatch,
    pub seqs: &'a [AttnSeq<'a>],
    pub rope: Option<(RopeTable, RopeStyle)>,
    pub attn: AttnParams<'a>,
    pub acts: [Vec<f32>; Act::COUNT],
    /// [tokens, gate_up_dim] MLP scratch
    pub gate_up: Vec<f32>,
    /// [tokens, intermediate] MLP scratch
    pub ffn_act: Vec<f32>,
    pub dumper: Option<&'a mut Dumper>,
}

impl<'a> CpuStep<'a> {
    /// (out, x): two distinct step buffers.
    fn out_in(
        &mut self,
        op: &'static str,
        out: Act,
        x: Act,
    ) -> crate::Result<(&mut [f32], &[f32])> {
        match self.acts.get_disjoint_mut([out.idx(), x.idx()]) {
            Ok([o, i]) => Ok((o, i)),
            Err(_) => Err(ExecutorError::aliased(op, out, x).into()),
        }
    }

    fn norm_weights(&self, sel: NormSel) -> crate::Result<&'a NormWeights> {
        let w = self.w;
        let missing = |what: String| ExecutorError::MissingWeight { what };
        Ok(match sel {
            NormSel::Embedding => w
                .embedding_norm
                .as_ref()
                .ok_or_else(|| missing("the embedding norm".into()))?,
            NormSel::Attn(l) => &self.layer(l)?.attn_norm,
            NormSel::Mlp(l) => self
                .layer(l)?
                .mlp_norm
                .as_ref()
                .ok_or_else(|| missing(format!("layer {l}'s MLP norm")))?,
            NormSel::Final => &w.final_norm,
        })
    }

    fn layer(&self, l: usize) -> crate::Result<&'a crate::model::weights::LayerWeights> {
        let w = self.w;
        w.layers.get(l).ok_or_else(|| {
            ExecutorError::MissingWeight {
                what: format!("layer {l}"),
            }
            .into()
        })
    }
}

fn add_into(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

impl DecoderBackend for CpuStep<'_> {
    fn embed(&mut self, out: Act) -> crate::Result<()> {
        let h = self.spec.hidden_size;
        let w = self.w;
        let (start, len) = (self.layout.vocab_start, self.layout.vocab_len);
        let x = &mut self.acts[out.idx()];
        for (row, &id) in x.chunks_mut(h).zip(&self.batch.token_ids) {
            // Vocabulary-parallel: a rank holds rows start..start + len; other ids are the
            // other ranks' (zero here), and the all-reduce below adds exactly one row.
            if id as usize >= self.spec.vocab_size {
                // Every rank fails here alike, before any collective.
                return Err(ExecutorError::Device(format!(
                    "token {id} is not below the vocabulary size {}",
                    self.spec.vocab_size
                ))
                .into());
            }
            let local = (id as usize).wrapping_sub(start);
            if self.comm.is_some() && local >= len {
                row.fill(0.0);
                continue;
            }
            w.embedding
                .try_row_to_f32(local, row)
                .map_err(|e| ExecutorError::Device(format!("embedding of token {id}: {e}")))?;
        }
        if let Some(comm) = self.comm.as_deref_mut() {
            comm.all_reduce_sum(x).map_err(comm_err)?;
        }
        if let Some(table) = &w.position_embedding {
            for (row, &pos) in x.chunks_mut(h).zip(&self.batch.positions) {
                let p = table.get(pos * h..(pos + 1) * h).ok_or_else(|| {
                    ExecutorError::Device(format!(
                        "position {pos} is past the learned position table"
                    ))
                })?;
                add_into(row, p);
            }
        }
        Ok(())
    }

    fn norm(&mut self, sel: NormSel, out: Act, x: Act, residual: Option<Act>) -> crate::Result<()> {
        let n = self.norm_weights(sel)?;
        let kind = self.spec.norm;
        match residual {
            Some(res) => {
                let [o, i, r] = self
                    .acts
                    .get_disjoint_mut([out.idx(), x.idx(), res.idx()])
                    .map_err(|_| crate::Error::from(ExecutorError::aliased("norm", out, res)))?;
                add_into(r, i);
                norm::norm_rows(kind, r, &n.weight, n.bias.as_deref(), o);
            }
            None => {
                let (o, i) = self.out_in("norm", out, x)?;
                norm::norm_rows(kind, i, &n.weight, n.bias.as_deref(), o);
            }
        }
        Ok(())
    }

    fn linear(&mut self, layer: usize, sel: LinearSel, out: Act, x: Act) -> crate::Result<()> {
        let lw = self.layer(layer)?;
        let (w, bias) = match sel {
            LinearSel::Qkv => (&lw.qkv, lw.qkv_bias.as_deref()),
            LinearSel::AttnOut => (&lw.attn_out, lw.attn_out_bias.as_deref()),
        };
        let (o, i) = self.out_in("linear", out, x)?;
        linear(i, i.len() / w.cols(), w, bias, o);
        Ok(())
    }

    fn clamp(&mut self, buf: Act, limit: f32) -> crate::Result<()> {
        self.acts[buf.idx()]
            .iter_mut()
            .for_each(|v| *v = v.clamp(-limit, limit));
        Ok(())
    }

    fn rotary_kv_write(&mut self, layer: usize, qkv: Act) -> crate::Result<()> {
        let spec = self.spec;
        let (q_dim, kv_dim) = (spec.q_dim(), spec.kv_dim());
        let qkv_dim = q_dim + 2 * kv_dim;
        let buf = &mut self.acts[qkv.idx()];
        if let Some((rope, style)) = &self.rope {
            rope.apply(buf, qkv_dim, spec.num_heads, spec.head_dim, *style);
            rope.apply(
                &mut buf[q_dim..],
                qkv_dim,
                spec.num_kv_heads,
                spec.head_dim,
                *style,
            );
        }
        let cache = self
            .kv
            .get_mut(layer)
            .ok_or_else(|| ExecutorError::MissingWeight {
                what: format!("layer {layer}'s KV cache"),
            })?;
        for (row, &slot) in buf.chunks(qkv_dim).zip(&self.batch.slots) {
            cache.write(slot, &row[q_dim..q_dim + kv_dim], &row[q_dim + kv_dim..]);
        }
        Ok(())
    }

    fn attention(&mut self, layer: usize, out: Act, qkv: Act) -> crate::Result<()> {
        let qkv_dim = Act::Qkv.row_len(self.spec);
        let cache = self
            .kv
            .get(layer)
            .ok_or_else(|| ExecutorError::MissingWeight {
                what: format!("layer {layer}'s KV cache"),
            })?;
        let [o, i] = self
            .acts
            .get_disjoint_mut([out.idx(), qkv.idx()])
            .map_err(|_| crate::Error::from(ExecutorError::aliased("attention", out, qkv)))?;
        paged_attention(o, i, qkv_dim, cache, self.seqs, &self.attn);
        Ok(())
    }

    fn mlp(&mut self, layer: usize, ffn: FfnAct, out: Act, x: Act) -> crate::Result<()> {
        let lw = self.layer(layer)?;
        let inter = self.spec.intermediate_size;
        let (gate_up, act) = (&mut self.gate_up, &mut self.ffn_act);
        let [o, i] = self
            .acts
            .get_disjoint_mut([out.idx(), x.idx()])
            .map_err(|_| crate::Error::from(ExecutorError::aliased("mlp", out, x)))?;
        let m = i.len() / lw.gate_up.cols();
        linear(i, m, &lw.gate_up, lw.gate_up_bias.as_deref(), gate_up);
        match ffn {
            FfnAct::Gated(a) => activation::gated(a, gate_up, inter, act),
            FfnAct::Plain(a) => {
                act.copy_from_slice(&gate_up[..m * inter]);
                activation::in_place(a, act);
            }
        }
        linear(act, m, &lw.down, lw.down_bias.as_deref(), o);
        Ok(())
    }

    fn add(&mut self, x: Act, a: Act, b: Option<Act>) -> crate::Result<()> {
        let (dst, src) = self.out_in("add", x, a)?;
        add_into(dst, src);
        if let Some(b) = b {
            let (dst, src) = self.out_in("add", x, b)?;
            add_into(dst, src);
        }
        Ok(())
    }

    fn gather_rows(&mut self, out: Act, x: Act) -> crate::Result<()> {
        let h = x.row_len(self.spec);
        let rows = &self.batch.logits_rows;
        let (o, i) = self.out_in("gather_rows", out, x)?;
        for (dst, &t) in o.chunks_mut(h).zip(rows) {
            dst.copy_from_slice(&i[t * h..(t + 1) * h]);
        }
        Ok(())
    }

    fn lm_head(&mut self, out: Act, x: Act) -> crate::Result<()> {
        let w: &Weight = self.w.lm_head();
        let bias = self.w.lm_head_bias.as_deref();
        let layout = self.layout;
        let vocab = self.spec.vocab_size;
        if self.comm.is_none() {
            let (o, i) = self.out_in("lm_head", out, x)?;
            linear(i, i.len() / w.cols(), w, bias, o);
            return Ok(());
        }
        // Vocabulary-parallel: each rank computes its `vocab_len` columns of the logits, padded
        // to `vocab_part`; the gather lays them out rank after rank; the real columns of each
        // rank are copied into place and the padding dropped, so it is never sampled.
        let [o, i] = self
            .acts
            .get_disjoint_mut([out.idx(), x.idx()])
            .map_err(|_| crate::Error::from(ExecutorError::aliased("lm_head", out, x)))?;
        let m = i.len() / w.cols().max(1);
        let (len, part) = (layout.vocab_len, layout.vocab_part);
        // local: [m, vocab_len]
        let mut local = vec![0.0f32; m * len];
        if len > 0 {
            linear(i, m, w, bias, &mut local);
        }
        // padded: [m, vocab_part]
        let mut padded = vec![0.0f32; m * part];
        if len > 0 {
            for (dst, src) in padded.chunks_mut(part).zip(local.chunks(len)) {
                dst[..len].copy_from_slice(src);
            }
        }
        let world = layout.tp.world_size;
        // all: [world, m, vocab_part]
        let mut all = vec![0.0f32; world * m * part];
        let Some(comm) = self.comm.as_deref_mut() else {
            return Ok(());
        };
        comm.all_gather(&padded, &mut all).map_err(comm_err)?;
        for (r, rank_rows) in all.chunks(m * part.max(1)).enumerate() {
            let start = (r * part).min(vocab);
            let cols = part.min(vocab - start);
            for (row, src) in o.chunks_mut(vocab).zip(rank_rows.chunks(part.max(1))) {
                row[start..start + cols].copy_from_slice(&src[..cols]);
            }
        }
        Ok(())
    }

    fn all_reduce(&mut self, buf: Act) -> crate::Result<()> {
        if let Some(comm) = self.comm.as_deref_mut() {
            comm.all_reduce_sum(&mut self.acts[buf.idx()])
                .map_err(comm_err)?;
        }
        Ok(())
    }

    fn tap(&mut self, tap: Tap) -> crate::Result<()> {
        if let Some(d) = self.dumper.as_deref_mut() {
            d.write(tap, &self.acts[tap.buf.idx()], tap.buf.row_len(self.spec))?;
        }
        Ok(())
    }
}

/// A failed collective as an executor error.
fn comm_err(e: crate::executor::tp::comm::CommError) -> crate::Error {
    ExecutorError::Device(e.to_string()).into()
}
