//! The CPU executor: owns the host weights and a host paged KV cache, packs a `SchedulePlan`
//! into one batch (`batch::StepBatch`, checked once) and runs the one forward pass
//! (`model::decoder`) over it with the CPU ops of `crate::ops` (attention reads the cache blocks
//! in place). `CpuStep` is its `DecoderBackend`: one step's view of the weights, the cache and
//! the step buffers.

use super::batch::{ExecutorError, StepBatch, StepLimits};
use super::dump::Dumper;
use super::{BadWords, Executor, Logits, MinTokens, SamplingSetup, SeqStates, seq_state};
use crate::model::DecoderSpec;
use crate::model::decoder::{Act, Decoder, DecoderBackend, FfnAct, LinearSel, NormSel, Tap};
use crate::model::spec::RopeStyle;
use crate::model::weights::{DecoderWeights, NormWeights};
use crate::ops::attention::{AttnParams, AttnSeq, KvLayerCache, paged_attention};
use crate::ops::linear::{Weight, linear};
use crate::ops::rope::RopeTable;
use crate::ops::{activation, norm};
use crate::request::SeqId;
use crate::sampling::{Sampled, Sampler};
use crate::scheduler::SchedulePlan;

/// The CPU engine: runs the generic decoder over host weights (f32 or 8-bit blocks) and an f32
/// paged KV cache per layer, inside its own rayon pool; the engine samples its logits on the host.
pub struct CpuExecutor {
    decoder: Decoder,
    weights: DecoderWeights,
    /// [rotary_dim / 2] with scaling applied, and the pairing style (rope models)
    rope: Option<(Vec<f32>, RopeStyle)>,
    /// [num_heads] for ALiBi models
    alibi_slopes: Option<Vec<f32>>,
    /// Every step runs inside this pool: kernels called from a thread outside a rayon pool pay a
    /// cross-thread injection (~20 µs) per parallel call, hundreds of times per step.
    pool: rayon::ThreadPool,
    /// One cache per layer.
    kv: Vec<KvLayerCache>,
    num_blocks: usize,
    block_size: usize,
    /// Writes each step's named intermediates (`--dump-intermediates`).
    dumper: Option<Dumper>,
    /// Each request's sampler (RNG, filters, penalty history), `min_tokens` and `bad_words`
    /// rules.
    seqs: SeqStates<(Sampler, MinTokens, BadWords)>,
}

impl CpuExecutor {
    /// `num_threads`: 0 means one per available core.
    pub fn new(
        spec: DecoderSpec,
        weights: DecoderWeights,
        num_blocks: usize,
        block_size: usize,
        num_threads: usize,
    ) -> crate::Result<Self> {
        let kv_dim = spec.kv_dim();
        let kv = (0..spec.num_layers)
            .map(|_| KvLayerCache::new(num_blocks, block_size, kv_dim))
            .collect();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads)
            .thread_name(|i| format!("ferrum-cpu-{i}"))
            .build()
            .map_err(|e| ExecutorError::Device(format!("cannot start the CPU thread pool: {e}")))?;
        Ok(CpuExecutor {
            rope: spec.rope().map(|r| (r.inv_freqs(), r.style)),
            alibi_slopes: spec.alibi_slopes(),
            decoder: Decoder::new(spec),
            weights,
            pool,
            kv,
            num_blocks,
            block_size,
            dumper: None,
            seqs: SeqStates::new(),
        })
    }

    /// Writes every step's named intermediates under `dumper`'s folder.
    pub fn with_dumper(mut self, dumper: Dumper) -> Self {
        self.dumper = Some(dumper);
        self
    }

    /// Bytes of KV cache per token position (all layers, K and V, f32).
    pub fn kv_bytes_per_token(spec: &DecoderSpec) -> usize {
        spec.num_layers * 2 * spec.kv_dim() * 4
    }

    fn limits(&self) -> StepLimits {
        StepLimits {
            block_size: self.block_size,
            num_blocks: self.num_blocks,
            max_blocks_per_seq: self.num_blocks,
            max_tokens: usize::MAX,
            max_seqs: usize::MAX,
        }
    }
}

impl Executor for CpuExecutor {
    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.pool.current_num_threads())
    }

    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn vocab_size(&self) -> usize {
        self.decoder.spec.vocab_size
    }

    fn add_request(&mut self, seq_id: SeqId, setup: &SamplingSetup<'_>) -> crate::Result<()> {
        let sampler = Sampler::new(
            setup.params,
            setup.seed,
            setup.prompt_ids,
            self.decoder.spec.vocab_size,
        );
        self.seqs.insert(
            seq_id,
            (sampler, MinTokens::new(setup), BadWords::new(setup)),
        );
        Ok(())
    }

    fn remove_request(&mut self, seq_id: SeqId) {
        self.seqs.remove(&seq_id);
    }

    /// Runs `overlap` first (nothing runs in its shadow on the CPU), then the step, then samples
    /// each sampling row on the host.
    fn execute(
        &mut self,
        plan: &SchedulePlan,
        overlap: &mut dyn FnMut(),
    ) -> crate::Result<Vec<Sampled>> {
        overlap();
        let mut logits = self.logits(plan)?;
        let mut out = Vec::with_capacity(logits.data.len() / logits.vocab_size.max(1));
        let mut banned = Vec::new();
        for (row_idx, s) in plan.seqs.iter().filter(|s| s.sample).enumerate() {
            let (sampler, min, bad_words) = seq_state(&mut self.seqs, s.seq_id)?;
            banned.clear();
            banned.extend_from_slice(min.suppressed());
            bad_words.extend_banned(&mut banned);
            let sampled = sampler.sample(logits.row_mut(row_idx), &banned);
            sampler.accept(sampled.token_id);
            min.accept();
            bad_words.accept(sampled.token_id);
            out.push(sampled);
        }
        Ok(out)
    }

    fn logits(&mut self, plan: &SchedulePlan) -> crate::Result<Logits> {
        let batch = StepBatch::pack(plan, &self.limits())?;
        let spec = &self.decoder.spec;
        let seqs: Vec<AttnSeq<'_>> = batch
            .seqs
            .iter()
            .map(|s| AttnSeq {
                q_start: s.q_start,
                q_len: s.q_len,
                context_len: s.context_len,
                block_table: batch.table(s),
            })
            .collect();
        let num_tokens = batch.num_tokens();
        let num_rows = batch.logits_rows.len();
        let mut step = CpuStep {
            spec,
            w: &self.weights,
            kv: &mut self.kv,
            batch: &batch,
            seqs: &seqs,
            rope: self
                .rope
                .as_ref()
                .map(|(inv_freqs, style)| (RopeTable::new(inv_freqs, &batch.positions), *style)),
            attn: AttnParams {
                num_heads: spec.num_heads,
                num_kv_heads: spec.num_kv_heads,
                head_dim: spec.head_dim,
                block_size: self.block_size,
                scale: spec.attn_scale,
                sliding_window: spec.sliding_window,
                alibi_slopes: self.alibi_slopes.as_deref(),
            },
            acts: Act::ALL.map(|a| {
                let rows = if a.per_token() { num_tokens } else { num_rows };
                vec![0.0f32; rows * a.row_len(spec)]
            }),
            gate_up: vec![0.0; num_tokens * spec.gate_up_dim()],
            ffn_act: vec![0.0; num_tokens * spec.intermediate_size],
            dumper: self.dumper.as_mut(),
        };
        let decoder = &self.decoder;
        self.pool.install(|| decoder.forward(&mut step, num_rows))?;
        if let Some(d) = step.dumper {
            d.next_step();
        }
        let logits = std::mem::take(&mut step.acts[Act::Logits.idx()]);
        Ok(Logits {
            vocab_size: spec.vocab_size,
            data: logits,
        })
    }
}

/// One CPU step: the forward pass's ops over the host weights, cache and buffers.
struct CpuStep<'a> {
    spec: &'a DecoderSpec,
    w: &'a DecoderWeights,
    kv: &'a mut [KvLayerCache],
    batch: &'a StepBatch,
    seqs: &'a [AttnSeq<'a>],
    rope: Option<(RopeTable, RopeStyle)>,
    attn: AttnParams<'a>,
    acts: [Vec<f32>; Act::COUNT],
    /// [tokens, gate_up_dim] MLP scratch
    gate_up: Vec<f32>,
    /// [tokens, intermediate] MLP scratch
    ffn_act: Vec<f32>,
    dumper: Option<&'a mut Dumper>,
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
        let x = &mut self.acts[out.idx()];
        for (row, &id) in x.chunks_mut(h).zip(&self.batch.token_ids) {
            w.embedding
                .try_row_to_f32(id as usize, row)
                .map_err(|e| ExecutorError::Device(format!("embedding of token {id}: {e}")))?;
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
        let (o, i) = self.out_in("lm_head", out, x)?;
        linear(i, i.len() / w.cols(), w, bias, o);
        Ok(())
    }

    fn all_reduce(&mut self, _buf: Act) -> crate::Result<()> {
        Ok(())
    }

    fn tap(&mut self, tap: Tap) -> crate::Result<()> {
        if let Some(d) = self.dumper.as_deref_mut() {
            d.write(tap, &self.acts[tap.buf.idx()], tap.buf.row_len(self.spec))?;
        }
        Ok(())
    }
}
