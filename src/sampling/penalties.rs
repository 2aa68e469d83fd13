//! Repetition, presence and frequency penalties: the logit processors that depend on what a
//! request has already seen. Owns the per-request token bookkeeping (which ids appeared in the
//! prompt or output, how often each appeared in the output). It touches only the logits of ids it
//! has seen, so its cost per step is O(number of distinct seen ids), never O(vocab); it must never
//! allocate per-vocab state beyond a bitset.
//!
//! Semantics (as HF transformers / vLLM):
//! - repetition penalty `r` (CTRL, Keskar et al. 2019) applies once to every id seen in the prompt
//!   or the output: a positive logit is divided by `r`, a negative one multiplied by `r`;
//! - presence penalty `p` and frequency penalty `f` (OpenAI) apply to output ids only:
//!   `logit -= p + f * count`, where `count` is how many times the id was generated.

use std::collections::HashMap;

pub use crate::tensor::Penalties;

/// Token bookkeeping of one request plus its penalty strengths.
#[derive(Debug, Clone)]
pub struct PenaltyState {
    penalties: Penalties,
    /// Bit `id` set when `id` appeared in the prompt or the output: [ceil(vocab_size / 64)].
    seen_mask: Vec<u64>,
    /// Distinct ids of prompt ∪ output, in first-seen order (the ids the repetition penalty hits).
    seen_ids: Vec<u32>,
    /// Output id -> number of times it was generated.
    output_counts: HashMap<u32, u32>,
    vocab_size: usize,
}

impl PenaltyState {
    /// Ids >= `vocab_size` in `prompt_ids` have no logit to penalize and are ignored.
    pub fn new(penalties: Penalties, prompt_ids: &[u32], vocab_size: usize) -> Self {
        let mut state = PenaltyState {
            penalties,
            seen_mask: vec![0; vocab_size.div_ceil(64)],
            seen_ids: Vec::new(),
            output_counts: HashMap::new(),
            vocab_size,
        };
        for &token_id in prompt_ids {
            state.mark_seen(token_id);
        }
        state
    }

    fn mark_seen(&mut self, token_id: u32) {
        let idx = token_id as usize;
        if idx >= self.vocab_size {
            return;
        }
        let (word_idx, bit) = (idx / 64, 1u64 << (idx % 64));
        if self.seen_mask[word_idx] & bit == 0 {
            self.seen_mask[word_idx] |= bit;
            self.seen_ids.push(token_id);
        }
    }

    /// Records one generated token.
    pub fn accept(&mut self, token_id: u32) {
        if token_id as usize >= self.vocab_size {
            return;
        }
        self.mark_seen(token_id);
        *self.output_counts.entry(token_id).or_insert(0) += 1;
    }

    /// Applies the penalties in place: repetition first, then presence and frequency.
    /// Ids beyond `logits.len()` are skipped. A `-inf` logit (suppressed) stays `-inf`.
    // logits: [vocab_size]
    pub fn apply(&self, logits: &mut [f32]) {
        let Penalties {
            repetition,
            presence,
            frequency,
        } = self.penalties;
        if repetition != 1.0 {
            for &token_id in &self.seen_ids {
                if let Some(logit) = logits.get_mut(token_id as usize) {
                    *logit = if *logit > 0.0 {
                        *logit / repetition
                    } else {
                        *logit * repetition
                    };
                }
            }
        }
        if presence != 0.0 || frequency != 0.0 {
            // Each id is updated independently, so the map's iteration order cannot matter.
            for (&token_id, &count) in &self.output_counts {
                if let Some(logit) = logits.get_mut(token_id as usize) {
                    *logit -= presence + frequency * count as f32;
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn repetition_divides_positive_and_multiplies_negative() {
        let penalties = Penalties {
            repetition: 2.0,
            ..Penalties::default()
        };
        // Prompt holds 0, 1 (twice) and 4; output adds 3. Token 2 is never seen.
        let mut state = PenaltyState::new(penalties, &[0, 1, 1, 4], 6);
        state.accept(3);
        let mut logits = [2.0, -2.0, 1.0, 0.5, 0.0, 7.0];
        state.apply(&mut logits);
        // Applied once per id however often it appeared; untouched ids keep their value.
        assert_eq!(logits, [1.0, -4.0, 1.0, 0.25, 0.0, 7.0]);
    }

    #[test]
    fn presence_and_frequency_use_output_counts_only() {
        let penalties = Penalties {
            repetition: 1.0,
            presence: 0.5,
            frequency: 0.25,
        };
        // Token 0 is only in the prompt: presence/frequency must not touch it.
        let mut state = PenaltyState::new(penalties, &[0], 5);
        for token_id in [2, 2, 3, 2] {
            state.accept(token_id);
        }
        let mut logits = [1.0, 1.0, 1.0, -1.0, 1.0];
        state.apply(&mut logits);
        assert_eq!(logits, [1.0, 1.0, 1.0 - 0.5 - 0.75, -1.0 - 0.5 - 0.25, 1.0]);
    }

    #[test]
    fn repetition_is_applied_before_presence() {
        let penalties = Penalties {
            repetition: 2.0,
            presence: 1.0,
            frequency: 0.0,
        };
        let mut state = PenaltyState::new(penalties, &[], 2);
        state.accept(0);
        let mut logits = [4.0, 4.0];
        state.apply(&mut logits);
        // (4 / 2) - 1 = 1, not (4 - 1) / 2 = 1.5.
        assert_eq!(logits, [1.0, 4.0]);
    }

    #[test]
    fn out_of_range_ids_are_ignored() {
        let penalties = Penalties {
            repetition: 2.0,
            presence: 1.0,
            frequency: 1.0,
        };
        let mut state = PenaltyState::new(penalties, &[9, 1000], 4);
        state.accept(u32::MAX);
        state.accept(3);
        // Logits shorter than the vocab (the model's head may be narrower): id 3 is skipped.
        let mut logits = [1.0, 1.0, 1.0];
        state.apply(&mut logits);
        assert_eq!(logits, [1.0, 1.0, 1.0]);
        let mut logits = [1.0, 1.0, 1.0, 6.0];
        state.apply(&mut logits);
        assert_eq!(logits, [1.0, 1.0, 1.0, 1.0]);
    }

    #[test]
    fn disabled_penalties_report_disabled() {
        assert!(!Penalties::default().is_enabled());
        assert!(
            Penalties {
                presence: 0.1,
                ..Penalties::default()
            }
            .is_enabled()
        );
    }
}
