//! `Scheduler`: in-flight batching over the paged KV cache. Owns every sequence's token list
//! and `num_computed_tokens`, the waiting queue, the running list and the `KvCacheManager`.
//! It never samples, detokenizes or decides when a sequence stops (the engine does, keyed by
//! `SeqId`), and never touches a device.
//!
//! Order: both lists are kept sorted by `QueueKey` — higher `priority` first, then earlier
//! arrival (FIFO within a level). The waiting queue's head is admitted first; the running list's
//! last sequence (lowest level, latest arrival) is the preemption victim, and a preempted
//! sequence goes back to the waiting queue at its own key, so it keeps its place among the
//! requests of its level. With every priority equal this is plain FIFO with the newest running
//! sequence preempted first.

use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};

use super::{ScheduleError, SchedulePlan, ScheduledSeq, SchedulerConfig, SchedulerPolicy};
use crate::kv_cache::KvCacheManager;
use crate::request::SeqId;

mod invariants;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SeqStatus {
    /// In the waiting queue; holds no KV blocks and `num_computed_tokens == 0`.
    Waiting,
    /// In the running list; holds the KV blocks of its computed (and scheduled) positions.
    Running,
    /// Reached its token cap: in neither list, holds no blocks (they are freed at once, since
    /// nothing of it will be computed again); waits for the engine's `remove`.
    Capped,
}

/// One request's scheduling state: `tokens` (prompt + generated) plus `num_computed_tokens`.
/// Prefill, chunked prefill, decode and recompute are all "compute
/// `tokens[num_computed_tokens..]`, then sample if that reached the end".
#[derive(Debug, Clone)]
struct Sequence {
    tokens: Vec<u32>,
    num_prompt_tokens: usize,
    /// `min(num_prompt_tokens + max_tokens, max_model_len)`: `tokens.len()` never exceeds it.
    max_num_tokens: usize,
    /// Positions `0 .. num_computed_tokens` have their K/V in the cache. Always < `tokens.len()`.
    num_computed_tokens: usize,
    status: SeqStatus,
    /// Where it is served: `priority` level and arrival order.
    key: QueueKey,
    /// It has been admitted at least once (so it is no longer a new request; a preempted
    /// sequence waits again but is not new).
    was_admitted: bool,
}

/// The order of service: higher `priority` first, then earlier arrival. Unique per sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct QueueKey {
    level: Reverse<i64>,
    arrival: u64,
}

impl Sequence {
    /// The sequence holds all the tokens it may hold; nothing left to compute or sample.
    fn reached_cap(&self) -> bool {
        self.tokens.len() >= self.max_num_tokens
    }
}

/// In-flight batching scheduler (vLLM v1 style), see the module docs of `scheduler`.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    kv: KvCacheManager,
    seqs: HashMap<SeqId, Sequence>,
    /// Sequences to admit, sorted by `QueueKey` (the head is admitted first); preempted
    /// sequences go back at their own key.
    waiting: VecDeque<SeqId>,
    /// Admitted sequences, sorted by `QueueKey` (the last one is the preemption victim).
    running: Vec<SeqId>,
    /// Arrival number of the next `add`.
    num_arrivals: u64,
    num_preemptions: u64,
    /// Tokens of admitted sequences (prompts, and prompt + generated on a recompute), and how
    /// many of them came from the prefix cache instead of being computed.
    num_admitted_tokens: u64,
    num_reused_tokens: u64,
}

impl Scheduler {
    /// A scheduler with no sequences over a fresh `KvCacheManager` of `cfg.num_blocks` blocks
    /// (prefix caching per `cfg`). Fails when `cfg.validate()` does.
    pub fn new(cfg: SchedulerConfig) -> Result<Self, ScheduleError> {
        cfg.validate()?;
        let kv = KvCacheManager::new(cfg.num_blocks, cfg.block_size)?
            .with_prefix_caching(cfg.batching.enable_prefix_caching);
        Ok(Scheduler {
            cfg,
            kv,
            seqs: HashMap::new(),
            waiting: VecDeque::new(),
            running: Vec::new(),
            num_arrivals: 0,
            num_preemptions: 0,
            num_admitted_tokens: 0,
            num_reused_tokens: 0,
        })
    }

    /// The validated limits this scheduler enforces.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a new request at priority 0 (`add_with_priority`).
    pub fn add(
        &mut self,
        seq_id: SeqId,
        prompt_ids: Vec<u32>,
        max_tokens: usize,
    ) -> Result<(), ScheduleError> {
        self.add_with_priority(seq_id, prompt_ids, max_tokens, 0)
    }

    /// Queues a new request behind every waiting request of its `priority` level or a higher
    /// one (higher levels are admitted first, FIFO within a level). Errors (never panics) when
    /// the id is already in use, the prompt is empty, `max_tokens` is 0, or the prompt leaves no
    /// room for a generated token
    /// (`prompt_len >= max_model_len`). The validated config makes that last check also cover
    /// "needs more blocks than num_blocks" and, without chunked prefill, "longer than
    /// max_num_batched_tokens", since both limits are >= max_model_len.
    /// The sequence never grows beyond `min(prompt_len + max_tokens, max_model_len)` tokens.
    pub fn add_with_priority(
        &mut self,
        seq_id: SeqId,
        prompt_ids: Vec<u32>,
        max_tokens: usize,
        priority: i64,
    ) -> Result<(), ScheduleError> {
        if self.seqs.contains_key(&seq_id) {
            return Err(ScheduleError::DuplicateSeqId { seq_id });
        }
        if prompt_ids.is_empty() {
            return Err(ScheduleError::EmptyPrompt { seq_id });
        }
        if max_tokens == 0 {
            return Err(ScheduleError::InvalidRequest {
                seq_id,
                field: "max_tokens",
                value: 0,
                bound: "must be >= 1".into(),
            });
        }
        let num_prompt_tokens = prompt_ids.len();
        if num_prompt_tokens >= self.cfg.max_model_len {
            return Err(ScheduleError::InvalidRequest {
                seq_id,
                field: "prompt length",
                value: num_prompt_tokens,
                bound: format!(
                    "must be < max_model_len ({}) to leave room for a generated token",
                    self.cfg.max_model_len
                ),
            });
        }
        let max_num_tokens = num_prompt_tokens
            .saturating_add(max_tokens)
            .min(self.cfg.max_model_len);
        self.seqs.insert(
            seq_id,
            Sequence {
                tokens: prompt_ids,
                num_prompt_tokens,
                max_num_tokens,
                num_computed_tokens: 0,
                status: SeqStatus::Waiting,
                key: QueueKey {
                    level: Reverse(priority),
                    arrival: self.num_arrivals,
                },
                was_admitted: false,
            },
        );
        self.num_arrivals += 1;
        self.insert_waiting(seq_id);
        Ok(())
    }

    /// Removes a sequence in any state and frees its KV blocks at once. Returns false if unknown.
    /// Used for aborts and for normal completion (the engine decides when a sequence stops).
    pub fn remove(&mut self, seq_id: SeqId) -> bool {
        let Some(seq) = self.seqs.remove(&seq_id) else {
            return false;
        };
        match seq.status {
            SeqStatus::Waiting => self.waiting.retain(|&id| id != seq_id),
            SeqStatus::Running => self.running.retain(|&id| id != seq_id),
            SeqStatus::Capped => {}
        }
        self.kv.free(seq_id);
        true
    }

    /// Plans one step.
    ///
    /// 1. Running sequences, in `QueueKey` order (highest priority, then earliest arrival), each
    ///    get their uncomputed tokens (normally 1), chunked to the remaining budget when chunked
    ///    prefill is on. If KV blocks run out, the last running sequence (lowest priority, latest
    ///    arrival) is preempted (blocks freed, `num_computed_tokens = 0`, generated tokens kept,
    ///    back in the waiting queue at its own key) until the allocation succeeds or the sequence
    ///    itself was the last and got preempted.
    /// 2. Only if nobody was preempted: waiting sequences in `QueueKey` order while the budget,
    ///    `max_num_seqs` and free blocks allow (under `GuaranteedNoEvict`, the blocks of the
    ///    sequence's whole length beyond what running sequences may still claim, so step 1
    ///    never has to preempt). A prompt longer than the remaining budget is
    ///    chunked (or, without chunked prefill, waits and blocks the queue behind it).
    ///
    /// Sequences that reached their token cap left the running list in `update` and are never
    /// scheduled again.
    pub fn schedule(&mut self) -> SchedulePlan {
        let mut budget = self.cfg.batching.max_num_batched_tokens;
        let mut scheduled = Vec::new();
        let mut preempted = Vec::new();

        let mut run_idx = 0;
        while run_idx < self.running.len() && budget > 0 {
            let seq_id = self.running[run_idx];
            let Some((start_pos, chunk_len)) = self.next_chunk(seq_id, budget) else {
                run_idx += 1;
                continue;
            };
            let mut allocated = false;
            loop {
                if self.kv.allocate_slots(seq_id, start_pos + chunk_len) {
                    allocated = true;
                    break;
                }
                // The victim is the last running sequence; it is at index >= run_idx, so it has
                // not been scheduled in this step.
                let Some(victim_id) = self.running.pop() else {
                    break;
                };
                self.preempt(victim_id);
                preempted.push(victim_id);
                if victim_id == seq_id {
                    break;
                }
            }
            if !allocated {
                // `seq_id` itself was preempted, so it was the last running sequence.
                break;
            }
            if let Some(s) = self.scheduled_seq(seq_id, start_pos, chunk_len) {
                budget -= s.token_ids.len();
                scheduled.push(s);
            }
            run_idx += 1;
        }

        if preempted.is_empty() {
            while let Some(&seq_id) = self.waiting.front() {
                if budget == 0 || self.running.len() >= self.cfg.batching.max_num_seqs {
                    break;
                }
                // Prefix caching: start from the longest cached prefix (undone below if the
                // sequence cannot be admitted this step).
                let reused = self.reuse_prefix(seq_id);
                let Some((start_pos, chunk_len)) = self.next_chunk(seq_id, budget) else {
                    self.undo_reuse(seq_id, reused);
                    break; // without chunked prefill the head waits for a step with more budget
                };
                // GuaranteedNoEvict: the blocks this sequence may still claim (beyond the cached
                // ones it now shares) must fit in what no running sequence's worst case needs
                // (recomputed after the match, which may have taken evictable blocks).
                if self.cfg.batching.policy == SchedulerPolicy::GuaranteedNoEvict
                    && self.unclaimed_blocks(seq_id) > self.unpromised_blocks()
                {
                    self.undo_reuse(seq_id, reused);
                    break; // in order: the head waits until running sequences end
                }
                if !self.kv.allocate_slots(seq_id, start_pos + chunk_len) {
                    self.undo_reuse(seq_id, reused);
                    break;
                }
                if let Some(seq) = self.seqs.get(&seq_id) {
                    self.num_admitted_tokens += seq.tokens.len() as u64;
                    self.num_reused_tokens += reused as u64;
                }
                self.waiting.pop_front();
                if let Some(seq) = self.seqs.get_mut(&seq_id) {
                    seq.status = SeqStatus::Running;
                    seq.was_admitted = true;
                }
                self.insert_running(seq_id);
                if let Some(s) = self.scheduled_seq(seq_id, start_pos, chunk_len) {
                    budget -= s.token_ids.len();
                    scheduled.push(s);
                }
            }
        }

        // Running sequences first, in key order (decodes, and sequences still prefilling), then
        // this step's admissions, all prefill chunks.
        let seqs = scheduled;
        let num_batched_tokens = seqs.iter().map(|s| s.token_ids.len()).sum();
        SchedulePlan {
            seqs,
            preempted,
            num_batched_tokens,
        }
    }

    /// Applies one step's results: advances each planned sequence's `num_computed_tokens` by its
    /// chunk and appends its sampled token when the chunk reached the end of its tokens.
    /// Entries for sequences removed (or re-added) since `schedule()` are ignored, as are
    /// tokens for sequences that were not to be sampled. If a sampled token is missing, the last
    /// position is left uncomputed so the next step computes and samples it again.
    pub fn update(&mut self, plan: &SchedulePlan, sampled: &[(SeqId, u32)]) {
        let mut sampled_by_seq: HashMap<SeqId, u32> = HashMap::with_capacity(sampled.len());
        for &(seq_id, token_id) in sampled {
            sampled_by_seq.entry(seq_id).or_insert(token_id);
        }
        let mut newly_capped = Vec::new();
        for s in &plan.seqs {
            let Some(seq) = self.seqs.get_mut(&s.seq_id) else {
                continue;
            };
            let is_current = seq.status == SeqStatus::Running
                && seq.num_computed_tokens == s.start_pos
                && s.end_pos() <= seq.tokens.len();
            if !is_current {
                continue;
            }
            seq.num_computed_tokens = s.end_pos();
            if seq.num_computed_tokens == seq.tokens.len() {
                match sampled_by_seq.get(&s.seq_id) {
                    Some(&token_id) if !seq.reached_cap() => seq.tokens.push(token_id),
                    _ => seq.num_computed_tokens -= 1,
                }
                if seq.reached_cap() {
                    seq.status = SeqStatus::Capped;
                    newly_capped.push(s.seq_id);
                }
            }
            // Full blocks now computed become reusable (before a capped sequence frees them).
            self.kv
                .register_computed(s.seq_id, &seq.tokens, seq.num_computed_tokens);
        }
        if !newly_capped.is_empty() {
            self.running.retain(|id| !newly_capped.contains(id));
            for seq_id in newly_capped {
                self.kv.free(seq_id);
            }
        }
    }

    /// Sequences queued for admission (new, or preempted and waiting to be recomputed).
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Running sequences (those holding KV blocks and a seat of `max_num_seqs`).
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Sequences at their token cap that the engine has not removed yet.
    pub fn num_capped(&self) -> usize {
        self.seqs.len() - self.waiting.len() - self.running.len()
    }

    /// True while some sequence is waiting or running (sequences at their token cap only wait
    /// for the engine's `remove`).
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty()
    }

    /// The KV cache manager (block tables, free and cached block counts), read-only: for
    /// statistics and checks.
    pub fn kv(&self) -> &KvCacheManager {
        &self.kv
    }

    /// Total preemptions since creation (for metrics).
    pub fn num_preemptions(&self) -> u64 {
        self.num_preemptions
    }

    /// Tokens of admitted sequences since creation (a recompute after preemption counts again).
    pub fn num_admitted_tokens(&self) -> u64 {
        self.num_admitted_tokens
    }

    /// Of `num_admitted_tokens`, those whose K/V came from the prefix cache.
    pub fn num_reused_tokens(&self) -> u64 {
        self.num_reused_tokens
    }

    /// True while the sequence waits and has never been admitted (a new request that no step has
    /// computed anything of yet); false once admitted (also when preempted later) or unknown.
    pub fn is_new(&self, seq_id: SeqId) -> bool {
        self.seqs
            .get(&seq_id)
            .is_some_and(|s| s.status == SeqStatus::Waiting && !s.was_admitted)
    }

    /// Prompt + generated tokens of a sequence, or None if unknown.
    pub fn tokens(&self, seq_id: SeqId) -> Option<&[u32]> {
        self.seqs.get(&seq_id).map(|s| s.tokens.as_slice())
    }

    /// Tokens whose K/V are in the cache, or None if unknown.
    pub fn num_computed_tokens(&self, seq_id: SeqId) -> Option<usize> {
        self.seqs.get(&seq_id).map(|s| s.num_computed_tokens)
    }

    /// The sequence holds `min(prompt_len + max_tokens, max_model_len)` tokens, so it will never
    /// be scheduled again and its KV blocks are already free; the engine should finish it
    /// (reason "length") and `remove` it.
    pub fn reached_cap(&self, seq_id: SeqId) -> bool {
        self.seqs.get(&seq_id).is_some_and(Sequence::reached_cap)
    }

    /// The chunk `seq_id` would compute next under `budget`: (start_pos, chunk_len), or None if
    /// it is unknown, at its cap, or (without chunked prefill) does not fit the budget.
    fn next_chunk(&self, seq_id: SeqId, budget: usize) -> Option<(usize, usize)> {
        let seq = self.seqs.get(&seq_id)?;
        if seq.reached_cap() {
            return None;
        }
        let num_remaining = seq.tokens.len() - seq.num_computed_tokens;
        let chunk_len = if num_remaining <= budget {
            num_remaining
        } else if self.cfg.batching.enable_chunked_prefill {
            budget
        } else {
            return None;
        };
        (chunk_len > 0).then_some((seq.num_computed_tokens, chunk_len))
    }

    fn scheduled_seq(
        &self,
        seq_id: SeqId,
        start_pos: usize,
        chunk_len: usize,
    ) -> Option<ScheduledSeq> {
        let seq = self.seqs.get(&seq_id)?;
        let end_pos = start_pos + chunk_len;
        Some(ScheduledSeq {
            seq_id,
            token_ids: seq.tokens.get(start_pos..end_pos)?.to_vec(),
            start_pos,
            block_table: self.kv.block_table(seq_id).to_vec(),
            sample: end_pos == seq.tokens.len(),
        })
    }

    /// A sequence's `QueueKey` (an unknown one sorts first; lists hold only known ones).
    fn key(&self, seq_id: SeqId) -> QueueKey {
        self.seqs.get(&seq_id).map_or(
            QueueKey {
                level: Reverse(i64::MAX),
                arrival: 0,
            },
            |s| s.key,
        )
    }

    /// Puts `seq_id` into the waiting queue at its key.
    fn insert_waiting(&mut self, seq_id: SeqId) {
        let key = self.key(seq_id);
        let idx = self.waiting.partition_point(|&id| self.key(id) < key);
        self.waiting.insert(idx, seq_id);
    }

    /// Puts `seq_id` into the running list at its key.
    fn insert_running(&mut self, seq_id: SeqId) {
        let key = self.key(seq_id);
        let idx = self.running.partition_point(|&id| self.key(id) < key);
        self.running.insert(idx, seq_id);
    }

    /// Blocks sequence `seq_id` may ever hold: those of its `max_num_tokens`.
    fn worst_case_blocks(&self, seq_id: SeqId) -> usize {
        self.seqs
            .get(&seq_id)
            .map_or(0, |s| self.kv.num_blocks_for(s.max_num_tokens))
    }

    /// Blocks `seq_id` may still take to reach its `max_num_tokens`: its worst case minus the
    /// blocks it holds (cached ones it shares included).
    fn unclaimed_blocks(&self, seq_id: SeqId) -> usize {
        self.worst_case_blocks(seq_id)
            .saturating_sub(self.kv.block_table(seq_id).len())
    }

    /// Free blocks minus what the running sequences may still claim to reach their
    /// `max_num_tokens` (GuaranteedNoEvict's admission budget).
    fn unpromised_blocks(&self) -> usize {
        let promised: usize = self
            .running
            .iter()
            .map(|&id| self.unclaimed_blocks(id))
            .sum();
        self.kv.num_free_blocks().saturating_sub(promised)
    }

    /// Prefix caching: gives a waiting sequence with nothing computed the cached blocks its
    /// tokens start with and marks those tokens computed; returns how many.
    fn reuse_prefix(&mut self, seq_id: SeqId) -> usize {
        let Some(seq) = self.seqs.get_mut(&seq_id) else {
            return 0;
        };
        if seq.num_computed_tokens != 0 {
            return 0;
        }
        let reused = self.kv.match_prefix(seq_id, &seq.tokens);
        seq.num_computed_tokens = reused;
        reused
    }

    /// Takes back what `reuse_prefix` gave when the sequence stays waiting.
    fn undo_reuse(&mut self, seq_id: SeqId, reused: usize) {
        if reused == 0 {
            return;
        }
        self.kv.free(seq_id);
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            seq.num_computed_tokens = 0;
        }
    }

    /// Preemption by recompute: free all blocks, forget computed positions, keep the tokens, and
    /// put the sequence back in the waiting queue at its key (its place among its level). The
    /// caller removed it from `running`.
    fn preempt(&mut self, seq_id: SeqId) {
        self.kv.free(seq_id);
        if let Some(seq) = self.seqs.get_mut(&seq_id) {
            seq.num_computed_tokens = 0;
            seq.status = SeqStatus::Waiting;
        }
        self.insert_waiting(seq_id);
        self.num_preemptions += 1;
    }
}
