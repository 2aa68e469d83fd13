//! `Scheduler::check_invariants`: every rule the scheduler's state must satisfy between calls,
//! for the tests (the randomized invariant test runs it after every step).

use std::collections::HashMap;

use super::{Scheduler, SeqStatus, Sequence};
use crate::request::SeqId;

impl Scheduler {
    /// Checks every invariant: each sequence is in at most one of waiting/running, with the
    /// matching status, and in neither exactly when it reached its cap (then it holds no
    /// blocks); `running.len() <= max_num_seqs`; `num_prompt_tokens <= tokens.len() <= cap <=
    /// max_model_len`; `num_computed_tokens < tokens.len()`; waiting sequences hold no blocks
    /// and have nothing computed; running ones hold between `ceil(num_computed / block_size)`
    /// and `ceil(tokens.len() / block_size)` blocks; only running sequences hold blocks; and
    /// the KV manager's own checks (ref counts match block-table membership, no block owned
    /// twice, free + used == total); both lists are sorted by `QueueKey` (priority, then arrival).
    pub fn check_invariants(&self) -> Result<(), String> {
        self.kv.check_invariants()?;
        for (name, ids) in [
            ("waiting", self.waiting.iter().copied().collect::<Vec<_>>()),
            ("running", self.running.clone()),
        ] {
            let keys: Vec<_> = ids.iter().map(|&id| self.key(id)).collect();
            if let Some(w) = keys.windows(2).find(|w| w[0] >= w[1]) {
                return Err(format!(
                    "{name} is not in (priority, arrival) order: {:?} before {:?}",
                    w[0], w[1]
                ));
            }
        }
        if self.running.len() > self.cfg.batching.max_num_seqs {
            return Err(format!(
                "{} running > max_num_seqs {}",
                self.running.len(),
                self.cfg.batching.max_num_seqs
            ));
        }
        let mut seen: HashMap<SeqId, SeqStatus> = HashMap::with_capacity(self.seqs.len());
        let queued = self.waiting.iter().map(|&id| (id, SeqStatus::Waiting));
        for (seq_id, status) in
            queued.chain(self.running.iter().map(|&id| (id, SeqStatus::Running)))
        {
            if seen.insert(seq_id, status).is_some() {
                return Err(format!("{seq_id} is queued twice"));
            }
            if !self.seqs.contains_key(&seq_id) {
                return Err(format!("{seq_id} is queued but unknown"));
            }
        }
        for (&seq_id, seq) in &self.seqs {
            let listed = seen.get(&seq_id).copied().unwrap_or(SeqStatus::Capped);
            if seq.status != listed {
                return Err(format!(
                    "{seq_id} has status {:?} but is listed as {listed:?}",
                    seq.status
                ));
            }
            if (seq.status == SeqStatus::Capped) != seq.reached_cap() {
                return Err(format!(
                    "{seq_id} has status {:?} with {} of at most {} tokens",
                    seq.status,
                    seq.tokens.len(),
                    seq.max_num_tokens
                ));
            }
            self.check_sequence(seq_id, seq)?;
        }
        for (seq_id, _) in self.kv.tables() {
            if seen.get(&seq_id) != Some(&SeqStatus::Running) {
                return Err(format!("{seq_id} holds KV blocks but is not running"));
            }
        }
        Ok(())
    }

    fn check_sequence(&self, seq_id: SeqId, seq: &Sequence) -> Result<(), String> {
        let num_tokens = seq.tokens.len();
        if !(seq.num_prompt_tokens <= num_tokens
            && num_tokens <= seq.max_num_tokens
            && seq.max_num_tokens <= self.cfg.max_model_len)
        {
            return Err(format!(
                "{seq_id}: prompt {} <= tokens {num_tokens} <= cap {} <= max_model_len {} violated",
                seq.num_prompt_tokens, seq.max_num_tokens, self.cfg.max_model_len
            ));
        }
        if seq.num_computed_tokens >= num_tokens {
            return Err(format!(
                "{seq_id}: {} computed of {num_tokens} tokens",
                seq.num_computed_tokens
            ));
        }
        let num_held = self.kv.block_table(seq_id).len();
        match seq.status {
            SeqStatus::Capped if num_held != 0 => {
                Err(format!("{seq_id} is capped but holds {num_held} blocks"))
            }
            SeqStatus::Waiting if seq.num_computed_tokens != 0 || num_held != 0 => Err(format!(
                "{seq_id} is waiting with {} computed tokens and {num_held} blocks",
                seq.num_computed_tokens
            )),
            SeqStatus::Running => {
                let min_blocks = self.kv.num_blocks_for(seq.num_computed_tokens);
                let max_blocks = self.kv.num_blocks_for(num_tokens);
                if (min_blocks..=max_blocks).contains(&num_held) {
                    Ok(())
                } else {
                    Err(format!(
                        "{seq_id}: holds {num_held} blocks, expected {min_blocks}..={max_blocks} for \
                         {} computed of {num_tokens} tokens",
                        seq.num_computed_tokens
                    ))
                }
            }
            SeqStatus::Waiting | SeqStatus::Capped => Ok(()),
        }
    }
}
