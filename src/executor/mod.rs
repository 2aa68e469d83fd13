//! Executors run a `SchedulePlan` on a device and sample one token per sampling sequence. One
//! contract for every device: `add_request` registers a request's sampling setup, `execute`
//! runs a step and returns the sampled ids (+ the logprobs asked for), `remove_request` drops
//! the request. The executor owns each request's sampling state (one seeded RNG, one penalty
//! history, its count of generated tokens for `min_tokens`): the CPU executor samples with
//! `sampling::Sampler`, the CUDA executor on the GPU from its per-sequence table, so only ids and
//! requested logprobs cross back to the host.

use std::collections::HashMap;

use crate::request::{SamplingParams, SeqId};
use crate::sampling::Sampled;
use crate::scheduler::SchedulePlan;

pub mod batch;
pub mod build;
pub mod cpu;
pub mod cuda;
pub mod dump;
pub mod options;
pub mod parallel;
pub mod tp;

pub use options::CudaExecOptions;
pub use parallel::ParallelOptions;

/// Logits of the sampling sequences of one step, in plan order: `[num_rows, vocab_size]`.
pub struct Logits {
    /// Columns of each row (the model's vocabulary size).
    pub vocab_size: usize,
    /// `[num_rows, vocab_size]`, row-major, raw (unprocessed) logits.
    pub data: Vec<f32>,
}

impl Logits {
    /// Row `idx` (the plan's idx-th sampling sequence), for in-place sampling. Panics past the last
    /// row.
    pub fn row_mut(&mut self, idx: usize) -> &mut [f32] {
        &mut self.data[idx * self.vocab_size..(idx + 1) * self.vocab_size]
    }
}

/// A request's sampling setup, given to the executor when the engine admits the request.
#[derive(Debug, Clone, Copy)]
pub struct SamplingSetup<'a> {
    /// Strategy, filters, penalties, logprobs.
    pub params: &'a SamplingParams,
    /// Seeds the request's RNG (the same seed gives the same tokens on every device).
    pub seed: u64,
    /// The prompt (the repetition penalty counts its ids).
    pub prompt_ids: &'a [u32],
    /// Ids that cannot be sampled before `min_tokens` tokens were generated (the stop ids).
    pub suppressed_ids: &'a [u32],
    /// Tokens to generate before `suppressed_ids` may be sampled.
    pub min_tokens: usize,
}

/// The `min_tokens` rule of one request, kept by every executor beside its sampler.
#[derive(Debug, Clone)]
pub struct MinTokens {
    suppressed_ids: Vec<u32>,
    min_tokens: usize,
    num_generated: usize,
}

impl MinTokens {
    /// The rule of `setup`, with nothing generated yet.
    pub fn new(setup: &SamplingSetup<'_>) -> Self {
        MinTokens {
            suppressed_ids: setup.suppressed_ids.to_vec(),
            min_tokens: setup.min_tokens,
            num_generated: 0,
        }
    }

    /// The ids this step may not sample.
    pub fn suppressed(&self) -> &[u32] {
        match self.num_generated < self.min_tokens {
            true => &self.suppressed_ids,
            false => &[],
        }
    }

    /// One more token generated.
    pub fn accept(&mut self) {
        self.num_generated += 1;
    }
}

/// The `bad_words` rule of one request (`SamplingParams::bad_words`), kept by the CPU executor
/// beside its sampler: a word's last id is banned at a step where the generated tokens end with
/// the word's other ids, so a word that tokenizes to several ids is never completed, while its
/// first ids alone stay allowed.
#[derive(Debug, Clone, Default)]
pub struct BadWords {
    words: Vec<Vec<u32>>,
    /// The last generated ids: as many as the longest word's prefix (all but its last id).
    tail: Vec<u32>,
    max_prefix_len: usize,
}

impl BadWords {
    /// The rule of `setup`, with nothing generated yet.
    pub fn new(setup: &SamplingSetup<'_>) -> Self {
        let words = setup.params.bad_words.clone();
        let max_prefix_len = words.iter().map(|w| w.len().saturating_sub(1)).max();
        BadWords {
            words,
            tail: Vec::new(),
            max_prefix_len: max_prefix_len.unwrap_or(0),
        }
    }

    /// Appends the ids this step may not sample to `banned`.
    pub fn extend_banned(&self, banned: &mut Vec<u32>) {
        for word in &self.words {
            if let Some((&last, prefix)) = word.split_last()
                && self.tail.ends_with(prefix)
            {
                banned.push(last);
            }
        }
    }

    /// One more token generated.
    pub fn accept(&mut self, token_id: u32) {
        if self.max_prefix_len == 0 {
            return;
        }
        if self.tail.len() == self.max_prefix_len {
            self.tail.remove(0);
        }
        self.tail.push(token_id);
    }
}

/// The per-request states of an executor, by sequence.
pub type SeqStates<S> = HashMap<SeqId, S>;

/// The state of `seq_id` in `states`, or the error naming it (the engine registers every request
/// before its first step, so a miss is a bug, reported, not a panic).
pub fn seq_state<S>(states: &mut SeqStates<S>, seq_id: SeqId) -> crate::Result<&mut S> {
    states.get_mut(&seq_id).ok_or_else(|| {
        batch::ExecutorError::Device(format!(
            "sequence {} has no sampling state (not added to the executor)",
            seq_id.0
        ))
        .into()
    })
}

/// Runs scheduled steps on one device: owns the weights, the KV cache arrays and each request's
/// sampling state, and turns a `SchedulePlan` into sampled tokens. The engine thread owns it.
pub trait Executor: Send {
    /// Device description for logs, e.g. "cpu (2 threads)".
    fn describe(&self) -> String;
    /// KV cache blocks the scheduler may hand out.
    fn num_kv_blocks(&self) -> usize;
    /// Tokens per KV cache block.
    fn block_size(&self) -> usize;
    /// The model's vocabulary size.
    fn vocab_size(&self) -> usize;
    /// Registers a request's sampling state before its first step.
    fn add_request(&mut self, seq_id: SeqId, setup: &SamplingSetup<'_>) -> crate::Result<()>;
    /// Drops a request's sampling state (finished, aborted or failed); unknown ids are ignored.
    fn remove_request(&mut self, seq_id: SeqId);
    /// Runs one step: every scheduled chunk's k/v is written to the cache at its block table's
    /// slots, and one token is sampled (and accepted into its request's state) per sampling
    /// sequence, returned in plan order. `overlap` runs exactly once, on the calling thread:
    /// while the device works on the step where the executor `overlaps`, else first.
    ///
    /// `overlap` may free KV blocks of sequences in this step (a request stopped by a string or
    /// whose client left), and the next plan may give them to another sequence: an
    /// implementation must order this step's cache writes before any later step's (the CUDA
    /// executor runs every step on one stream).
    fn execute(
        &mut self,
        plan: &SchedulePlan,
        overlap: &mut dyn FnMut(),
    ) -> crate::Result<Vec<Sampled>>;
    /// Whether `overlap` runs while the device computes the step. When it does not, the engine
    /// delivers the previous step's tokens before planning, so that a request they end holds no
    /// seat in the next plan.
    fn overlaps(&self) -> bool {
        false
    }
    /// Whether the executor's sampler bans `bad_words`; a model whose executor cannot has its
    /// requests with bad words refused when they are built (`ModelInfo::bans_words`).
    fn bans_words(&self) -> bool {
        true
    }
    /// The raw logits of the plan's sampling rows (tests and tools; no sampling state is read
    /// or changed).
    fn logits(&mut self, plan: &SchedulePlan) -> crate::Result<Logits>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_tokens_suppresses_the_stop_ids_until_enough_tokens_were_generated() {
        let params = SamplingParams::default();
        let setup = SamplingSetup {
            params: &params,
            seed: 1,
            prompt_ids: &[1, 2],
            suppressed_ids: &[7, 9],
            min_tokens: 2,
        };
        let mut m = MinTokens::new(&setup);
        assert_eq!(m.suppressed(), &[7, 9]);
        m.accept();
        assert_eq!(m.suppressed(), &[7, 9]);
        m.accept();
        assert!(m.suppressed().is_empty());
        let none = MinTokens::new(&SamplingSetup {
            min_tokens: 0,
            ..setup
        });
        assert!(none.suppressed().is_empty());
    }

    #[test]
    fn bad_words_ban_a_last_id_only_after_the_rest_of_the_word() {
        let params = SamplingParams {
            bad_words: vec![vec![5], vec![1, 2, 3], vec![2, 4]],
            ..SamplingParams::default()
        };
        let setup = SamplingSetup {
            params: &params,
            seed: 1,
            prompt_ids: &[1, 2],
            suppressed_ids: &[],
            min_tokens: 0,
        };
        let mut b = BadWords::new(&setup);
        let banned = |b: &BadWords| {
            let mut v = Vec::new();
            b.extend_banned(&mut v);
            v.sort_unstable();
            v
        };
        // The prompt's [1, 2] does not count: only generated tokens complete a word.
        assert_eq!(banned(&b), vec![5]);
        b.accept(1);
        assert_eq!(banned(&b), vec![5]);
        b.accept(2);
        assert_eq!(banned(&b), vec![3, 4, 5]);
        b.accept(4);
        assert_eq!(banned(&b), vec![5]);
        b.accept(1);
        b.accept(2);
        assert_eq!(banned(&b), vec![3, 4, 5], "the tail is the last two ids");
    }
}
