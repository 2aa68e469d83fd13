//! `SchedulePlan`: what one engine step computes, as plain data handed to the executor.

use crate::kv_cache::BlockId;
use crate::request::SeqId;

/// The work of one step. Running sequences come first, in the scheduler's order (priority, then
/// arrival: decodes, and sequences continuing a chunked prompt), then sequences admitted in this
/// step (new prompts and recomputes after preemption, possibly chunked). A sequence appears at
/// most once. The executor should treat every entry as a generic chunk: `token_ids` at positions
/// `start_pos ..`, attending to positions `0 .. end_pos()`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SchedulePlan {
    /// The chunks to compute, in the order above; at most `max_num_seqs` entries.
    pub seqs: Vec<ScheduledSeq>,
    /// Sequences preempted by this `schedule()` call (their KV blocks are already freed; they
    /// will be recomputed from position 0). The engine only logs and counts them.
    pub preempted: Vec<SeqId>,
    /// Sum of `token_ids.len()` over `seqs`; never above `max_num_batched_tokens`.
    pub num_batched_tokens: usize,
}

impl SchedulePlan {
    /// True when nothing is computed this step.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty()
    }
}

/// One sequence's chunk in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScheduledSeq {
    /// The sequence this chunk belongs to (the engine's key for its request).
    pub seq_id: SeqId,
    /// The tokens to compute this step: a prefill chunk, or the last sampled token of a decode.
    // token_ids: [chunk_len], chunk_len >= 1
    pub token_ids: Vec<u32>,
    /// Position of `token_ids[0]`, which is the sequence's number of computed tokens before this
    /// step (0 for a new prompt or a recompute after preemption).
    pub start_pos: usize,
    /// The sequence's blocks; covers positions `0 .. start_pos + token_ids.len()` (see
    /// `kv_cache::manager` for the slot arithmetic).
    pub block_table: Vec<BlockId>,
    /// The chunk reaches the end of the sequence's known tokens: the engine samples one token
    /// from the logits of the chunk's last position and passes it to `Scheduler::update`.
    pub sample: bool,
}

impl ScheduledSeq {
    /// One past the last position computed by this chunk.
    pub fn end_pos(&self) -> usize {
        self.start_pos + self.token_ids.len()
    }
}
