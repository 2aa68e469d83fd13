//! `CpuRank`: one rank of the CPU engine — its share of the weights, the KV cache of its own
//! heads (one cache per layer, `[num_blocks, block_size, its kv heads, head_dim]`, addressed by
//! the one block table every rank shares), its rayon pool and, with tensor parallelism, its
//! communicator. `forward` runs the one forward pass over a packed step and returns the logits
//! of the sampling rows (the whole vocabulary: gathered over the ranks).

use super::step::CpuStep;
use crate::executor::batch::{ExecutorError, StepBatch};
use crate::executor::dump::Dumper;
use crate::executor::tp::comm::HostComm;
use crate::model::DecoderSpec;
use crate::model::decoder::{Act, Decoder};
use crate::model::spec::RopeStyle;
use crate::model::tp::RankLayout;
use crate::model::weights::{DecoderWeights, KvScales};
use crate::ops::attention::{AttnParams, AttnSeq, KvLayerCache};
use crate::ops::rope::RopeTable;

/// One rank's weights, KV cache and threads.
pub struct CpuRank {
    /// The forward pass over this rank's spec (its heads and MLP columns).
    decoder: Decoder,
    layout: RankLayout,
    weights: DecoderWeights,
    /// [rotary_dim / 2] with scaling applied, and the pairing style (rope models)
    rope: Option<(Vec<f32>, RopeStyle)>,
    /// [this rank's heads] for ALiBi models: the full model's slopes, sliced
    alibi_slopes: Option<Vec<f32>>,
    /// Every step runs inside this pool: kernels called from a thread outside a rayon pool pay a
    /// cross-thread injection (~20 µs) per parallel call, hundreds of times per step.
    pool: rayon::ThreadPool,
    /// One cache per layer.
    kv: Vec<KvLayerCache>,
    block_size: usize,
    /// Writes each step's named intermediates (`--dump-intermediates`; rank 0 only).
    dumper: Option<Dumper>,
    /// None for a single rank.
    comm: Option<Box<HostComm>>,
}

impl CpuRank {
    /// Rank `layout` of the model `spec` (the full one) over `weights` (its share), with
    /// `num_threads` threads (0: one per core) and `comm` when there are several ranks.
    pub fn new(
        spec: &DecoderSpec,
        layout: RankLayout,
        weights: DecoderWeights,
        num_blocks: usize,
        block_size: usize,
        num_threads: usize,
        comm: Option<Box<HostComm>>,
    ) -> crate::Result<Self> {
        let local = layout.local_spec(spec);
        let kv = (0..local.num_layers)
            .map(|_| KvLayerCache::new(num_blocks, block_size, local.kv_dim()))
            .collect();
        let rank = layout.tp.rank;
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(num_threads)
            .thread_name(move |i| match rank {
                0 => format!("ferrum-cpu-{i}"),
                r => format!("ferrum-cpu-r{r}-{i}"),
            })
            .build()
            .map_err(|e| ExecutorError::Device(format!("cannot start the CPU thread pool: {e}")))?;
        Ok(CpuRank {
            rope: local.rope().map(|r| (r.inv_freqs(), r.style)),
            alibi_slopes: layout.alibi_slopes(spec),
            decoder: Decoder::new(local),
            layout,
            weights,
            pool,
            kv,
            block_size,
            dumper: None,
            comm,
        })
    }

    /// Writes every step's named intermediates under `dumper`'s folder.
    pub fn set_dumper(&mut self, dumper: Dumper) {
        self.dumper = Some(dumper);
    }

    /// Each layer's largest |k| and |v| over the first `slots` cache slots (an f32 cache).
    pub fn kv_amax(&self, slots: usize) -> Vec<(f32, f32)> {
        let kv_dim = self.decoder.spec.kv_dim();
        self.kv.iter().map(|c| c.amax(slots, kv_dim)).collect()
    }

    /// Replaces this rank's KV cache by an FP8 E4M3 one of the same capacity with one (k, v)
    /// scale per layer.
    pub fn use_fp8_kv(&mut self, scales: &[KvScales], num_blocks: usize) {
        let kv_dim = self.decoder.spec.kv_dim();
        self.kv = scales
            .iter()
            .map(|s| KvLayerCache::new_fp8(num_blocks, self.block_size, kv_dim, s.k, s.v))
            .collect();
    }

    /// Threads of this rank's pool.
    pub fn num_threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Makes the group's current and later collectives fail (this rank failed).
    pub fn abort(&self, reason: &str) {
        if let Some(c) = &self.comm {
            c.abort(reason);
        }
    }

    /// Runs the step `batch` (checked and packed by the executor) through the model: writes
    /// this rank's k, v into its cache and returns the logits `[sampling rows, vocab]`.
    pub fn forward(&mut self, batch: &StepBatch) -> crate::Result<Vec<f32>> {
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
            layout: &self.layout,
            comm: self.comm.as_deref_mut(),
            w: &self.weights,
            kv: &mut self.kv,
            batch,
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
        Ok(std::mem::take(&mut step.acts[Act::Logits.idx()]))
    }
}
