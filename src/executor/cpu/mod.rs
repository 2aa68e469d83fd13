//! The CPU executor: packs a `SchedulePlan` into one batch (`batch::StepBatch`, checked once),
//! runs the one forward pass (`model::decoder`) over it on its rank(s) and samples the logits on
//! the engine thread. A `CpuRank` (`rank.rs`) owns host weights and a host paged KV cache and
//! runs the pass with the CPU ops of `crate::ops` (attention reads the cache blocks in place);
//! `CpuStep` (`step.rs`) is its `DecoderBackend`: one step's view of the weights, the cache and
//! the step buffers. One rank runs on the engine thread; `tensor_parallel_size` ranks run on
//! threads of their own (`executor::tp`), each with its share of the weights and the KV cache of
//! its own heads, under the scheduler's one block table.

mod rank;
mod step;

pub use rank::CpuRank;

use super::batch::{ExecutorError, StepBatch, StepLimits};
use super::dump::Dumper;
use super::tp::RankGroup;
use super::{BadWords, Executor, Logits, MinTokens, SamplingSetup, SeqStates, seq_state};
use crate::kv_cache::{BlockId, KvCacheDtype};
use crate::model::DecoderSpec;
use crate::model::tp::RankLayout;
use crate::model::weights::{DecoderWeights, KvScales};
use crate::ops::fp8::E4M3_MAX;
use crate::request::SeqId;
use crate::sampling::{Sampled, Sampler};
use crate::scheduler::{SchedulePlan, ScheduledSeq};

/// Tokens of the calibration prefill that measures an FP8 KV cache's scales.
pub const KV_CALIBRATION_TOKENS: usize = 256;
/// How far past the calibration's largest |k| (|v|) an FP8 KV cache's range reaches (vLLM's
/// measured scales leave a similar margin: amax / 200 for K, amax / 100 for V, against 448). On
/// SmolLM2, 4 followed the f32 cache further than 2 (saturated prompts' first-position keys)
/// and than 8 or 16 (coarser small values).
pub const KV_SCALE_HEADROOM: f32 = 4.0;

fn fp8_kv_with_ranks() -> crate::Error {
    ExecutorError::Device(
        "kv_cache_dtype fp8 with tensor_parallel_size > 1 is not supported yet (use one rank, \
         or kv_cache_dtype auto)"
            .into(),
    )
    .into()
}

/// The CPU engine: runs the generic decoder over host weights (f32 or 8-bit blocks) and an f32
/// paged KV cache per layer, on one rank or on `tensor_parallel_size` ranks in threads; samples
/// the logits on the host (the engine thread).
pub struct CpuExecutor {
    spec: DecoderSpec,
    ranks: Ranks,
    num_blocks: usize,
    block_size: usize,
    /// Each request's sampler (RNG, filters, penalty history), `min_tokens` and `bad_words`
    /// rules.
    seqs: SeqStates<(Sampler, MinTokens, BadWords)>,
}

/// Where the forward pass runs.
enum Ranks {
    /// One rank, on the engine thread.
    One(Box<CpuRank>),
    /// Tensor-parallel ranks, each on its own thread, rank 0's logits sampled.
    Group(RankGroup),
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
        let rank = CpuRank::new(
            &spec,
            RankLayout::single(&spec),
            weights,
            num_blocks,
            block_size,
            num_threads,
            None,
        )?;
        Ok(CpuExecutor {
            spec,
            ranks: Ranks::One(Box::new(rank)),
            num_blocks,
            block_size,
            seqs: SeqStates::new(),
        })
    }

    /// A tensor-parallel executor: `weights[r]` is rank r's share (`DecoderWeights::load_rank`
    /// with `RankLayout::new(spec, r of weights.len())`); each rank runs on its own thread with
    /// `num_threads / ranks` threads of its own (at least one; 0: the cores shared out) and the
    /// KV cache of its own heads, all addressed by the scheduler's one block table.
    pub fn tensor_parallel(
        spec: DecoderSpec,
        weights: Vec<DecoderWeights>,
        num_blocks: usize,
        block_size: usize,
        num_threads: usize,
    ) -> crate::Result<Self> {
        let world_size = weights.len();
        let cores = match num_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let threads = (cores / world_size.max(1)).max(1);
        let group = RankGroup::start_local(&spec, weights, num_blocks, block_size, threads)?;
        Ok(CpuExecutor {
            spec,
            ranks: Ranks::Group(group),
            num_blocks,
            block_size,
            seqs: SeqStates::new(),
        })
    }

    /// Writes every step's named intermediates under `dumper`'s folder (rank 0's with tensor
    /// parallelism: its own heads' q, k, v and attention; the residual stream is every rank's).
    pub fn with_dumper(mut self, dumper: Dumper) -> crate::Result<Self> {
        match &mut self.ranks {
            Ranks::One(r) => r.set_dumper(dumper),
            Ranks::Group(g) => g.set_dumper(dumper)?,
        }
        Ok(self)
    }

    /// Bytes of KV cache per token position (all layers, K and V; 4 per element in f32, 1 in
    /// FP8) over `world_size` ranks: each holds its own KV heads (one each when they are
    /// replicated).
    pub fn kv_bytes_per_token(spec: &DecoderSpec, world_size: usize, dtype: KvCacheDtype) -> usize {
        let per_rank_heads = match world_size <= spec.num_kv_heads {
            true => spec.num_kv_heads / world_size.max(1),
            false => 1,
        };
        let elem = match dtype {
            KvCacheDtype::Auto => 4,
            KvCacheDtype::Fp8 => 1,
        };
        spec.num_layers * 2 * per_rank_heads * world_size.max(1) * spec.head_dim * elem
    }

    /// Each layer's K and V scales for an FP8 cache, measured on this model: a prefill of
    /// `KV_CALIBRATION_TOKENS` fixed token ids (`first`, the model's BOS when it has one — the
    /// first position's keys and values are often the largest, the attention sink — then ids
    /// spread over the vocabulary, the same every load) through the f32 cache, then scale =
    /// `KV_SCALE_HEADROOM` x max |k| (or |v|) / 448, so values up to that many times the
    /// calibration's largest stay unsaturated. The cache's contents are overwritten later like
    /// any freed block's. One rank only (tensor parallelism with an FP8 cache is refused at load).
    pub fn measure_kv_scales(&mut self, first: Option<u32>) -> crate::Result<Vec<KvScales>> {
        if matches!(self.ranks, Ranks::Group(_)) {
            return Err(fp8_kv_with_ranks());
        }
        let n = KV_CALIBRATION_TOKENS
            .min(self.num_blocks * self.block_size)
            .max(1);
        let vocab = self.spec.vocab_size.max(1) as u64;
        let token_ids = (0..n as u64)
            .map(|i| match (i, first) {
                (0, Some(bos)) if (bos as u64) < vocab => bos,
                _ => ((i * 7919 + 13) % vocab) as u32,
            })
            .collect();
        let plan = SchedulePlan {
            seqs: vec![ScheduledSeq {
                seq_id: SeqId(u64::MAX),
                token_ids,
                start_pos: 0,
                block_table: (0..n.div_ceil(self.block_size) as u32)
                    .map(BlockId)
                    .collect(),
                sample: true,
            }],
            preempted: vec![],
            num_batched_tokens: n,
        };
        self.logits(&plan)?;
        let Ranks::One(rank) = &self.ranks else {
            return Err(fp8_kv_with_ranks());
        };
        let scale = |amax: f32| match amax > 0.0 && amax.is_finite() {
            true => KV_SCALE_HEADROOM * amax / E4M3_MAX,
            false => 1.0,
        };
        Ok(rank
            .kv_amax(n)
            .into_iter()
            .map(|(k, v)| KvScales {
                k: scale(k),
                v: scale(v),
            })
            .collect())
    }

    /// Replaces the KV cache by an FP8 E4M3 one of the same capacity with these per-layer
    /// scales (one per layer, as `measure_kv_scales` or the checkpoint gives them).
    pub fn use_fp8_kv(&mut self, scales: &[KvScales]) -> crate::Result<()> {
        if scales.len() != self.spec.num_layers {
            return Err(ExecutorError::Device(format!(
                "fp8 kv cache: {} layer scales for {} layers",
                scales.len(),
                self.spec.num_layers
            ))
            .into());
        }
        match &mut self.ranks {
            Ranks::One(rank) => {
                rank.use_fp8_kv(scales, self.num_blocks);
                Ok(())
            }
            Ranks::Group(_) => Err(fp8_kv_with_ranks()),
        }
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
        match &self.ranks {
            Ranks::One(r) => format!("cpu ({} threads)", r.num_threads()),
            Ranks::Group(g) => format!(
                "cpu, tensor_parallel_size {} ({} threads per rank)",
                g.world_size(),
                g.threads_per_rank()
            ),
        }
    }

    fn num_kv_blocks(&self) -> usize {
        self.num_blocks
    }

    fn block_size(&self) -> usize {
        self.block_size
    }

    fn vocab_size(&self) -> usize {
        self.spec.vocab_size
    }

    fn add_request(&mut self, seq_id: SeqId, setup: &SamplingSetup<'_>) -> crate::Result<()> {
        let sampler = Sampler::new(
            setup.params,
            setup.seed,
            setup.prompt_ids,
            self.spec.vocab_size,
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
        // Checked and packed once, here: every rank runs the same batch (a bad plan never
        // reaches a rank, so no rank fails a step the others run).
        let batch = StepBatch::pack(plan, &self.limits())?;
        let data = match &mut self.ranks {
            Ranks::One(r) => r.forward(&batch)?,
            Ranks::Group(g) => g.step(batch)?,
        };
        Ok(Logits {
            vocab_size: self.spec.vocab_size,
            data,
        })
    }
}
