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

use super::batch::{StepBatch, StepLimits};
use super::dump::Dumper;
use super::tp::RankGroup;
use super::{Executor, Logits, MinTokens, SamplingSetup, SeqStates, seq_state};
use crate::model::DecoderSpec;
use crate::model::tp::RankLayout;
use crate::model::weights::DecoderWeights;
use crate::request::SeqId;
use crate::sampling::{Sampled, Sampler};
use crate::scheduler::SchedulePlan;

/// The CPU engine: runs the generic decoder over host weights (f32 or 8-bit blocks) and an f32
/// paged KV cache per layer, on one rank or on `tensor_parallel_size` ranks in threads; samples
/// the logits on the host (the engine thread).
pub struct CpuExecutor {
    spec: DecoderSpec,
    ranks: Ranks,
    num_blocks: usize,
    block_size: usize,
    /// Each request's sampler (RNG, filters, penalty history) and `min_tokens` rule.
    seqs: SeqStates<(Sampler, MinTokens)>,
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

    /// Bytes of KV cache per token position (all layers, K and V, f32) over `world_size` ranks:
    /// each holds its own KV heads (one each when they are replicated).
    pub fn kv_bytes_per_token(spec: &DecoderSpec, world_size: usize) -> usize {
        let per_rank_heads = match world_size <= spec.num_kv_heads {
            true => spec.num_kv_heads / world_size.max(1),
            false => 1,
        };
        spec.num_layers * 2 * per_rank_heads * world_size.max(1) * spec.head_dim * 4
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
        self.seqs.insert(seq_id, (sampler, MinTokens::new(setup)));
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
        for (row_idx, s) in plan.seqs.iter().filter(|s| s.sample).enumerate() {
            let (sampler, min) = seq_state(&mut self.seqs, s.seq_id)?;
            let sampled = sampler.sample(logits.row_mut(row_idx), min.suppressed());
            sampler.accept(sampled.token_id);
            min.accept();
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
