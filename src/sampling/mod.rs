//! Host-side token sampling: turns one row of raw logits into the next token of one request.
//! A `Sampler` owns a request's sampling state (strategy, penalty bookkeeping, seeded RNG, and
//! O(vocab) scratch reused every step); it is deterministic for a given seed and input. It must
//! never import device, backend or Triton code, and never panic on any logits or parameters.
//!
//! Per step, in this order:
//! 1. suppression: ids the engine forbids now (EOS/stop ids while fewer than `min_tokens` were
//!    generated) get `-inf`; NaN logits become `-inf` and `+inf` becomes `f32::MAX` (sanitizing);
//! 2. logprobs, if asked for: log-softmax of these logits (see `logprobs`: penalties, temperature
//!    and filters are deliberately not reflected);
//! 3. repetition penalty (prompt and output ids), then presence/frequency penalties (output ids);
//! 4. `Strategy::Greedy` (temperature 0): argmax, lowest id on ties; filters are ignored;
//! 5. `Strategy::Random`: temperature, then the filters top-k → top-p → min-p (each computed on
//!    the distribution left by the previous one), then one draw with the request's RNG from the
//!    renormalized survivors.
//!
//! If no token is possible (every logit `-inf` after step 1), the lowest id that is not
//! suppressed is returned: a degenerate row must not crash the engine.

mod exp;
mod filters;
mod logprobs;
mod penalties;
mod rng;

pub use crate::tensor::Sampled;
pub use filters::Filter;
pub use penalties::Penalties;
pub use rng::Rng;

use crate::request::{SamplingParams, TokenLogprobs};
use filters::Candidates;
use penalties::PenaltyState;

/// How the next token is chosen from the (penalized) logits.
#[derive(Debug, Clone, PartialEq)]
pub enum Strategy {
    /// Argmax; ties go to the lowest token id. Uses no randomness.
    Greedy,
    /// Sample from `softmax(logits / temperature)` truncated by `filters`, applied in order.
    Random {
        /// Divides the logits before the softmax; > 0 (0 is `Greedy`). Below 1 sharpens, above 1
        /// flattens.
        temperature: f32,
        /// Truncations of the distribution (top-k, top-p, min-p), applied in this order; empty:
        /// none.
        filters: Vec<Filter>,
    },
}

impl Strategy {
    /// Greedy when `temperature == 0`; otherwise the enabled filters in the order
    /// top-k → top-p → min-p.
    pub fn from_params(params: &SamplingParams) -> Self {
        if params.is_greedy() {
            return Strategy::Greedy;
        }
        let mut filters = Vec::new();
        if params.top_k > 0 {
            filters.push(Filter::TopK(params.top_k));
        }
        if params.top_p < 1.0 {
            filters.push(Filter::TopP(params.top_p));
        }
        if params.min_p > 0.0 {
            filters.push(Filter::MinP(params.min_p));
        }
        Strategy::Random {
            temperature: params.temperature,
            filters,
        }
    }
}

/// Per-request sampler state: strategy, penalty bookkeeping, RNG and reusable scratch.
#[derive(Debug, Clone)]
pub struct Sampler {
    strategy: Strategy,
    /// None when every penalty is disabled (then no token bookkeeping is kept at all).
    penalties: Option<PenaltyState>,
    /// Number of top logprobs to report; None: no logprobs.
    num_logprobs: Option<usize>,
    rng: Rng,
    /// Scratch for random sampling: [<= vocab_size].
    candidates: Candidates,
    /// Scratch copy of the suppressed raw logits, kept only when both logprobs and penalties are
    /// on (penalties rewrite the row in place): [vocab_size].
    raw_logits: Vec<f32>,
}

impl Sampler {
    /// `prompt_ids` count for the repetition penalty (HF/vLLM: it applies to prompt and output
    /// tokens); presence/frequency penalties apply to output tokens only (OpenAI/vLLM). `seed`:
    /// `params.seed` or one the engine picked. `vocab_size` bounds the penalty bookkeeping;
    /// ids at or above it are never penalized. `params` are assumed validated.
    pub fn new(params: &SamplingParams, seed: u64, prompt_ids: &[u32], vocab_size: usize) -> Self {
        let penalties = Penalties {
            repetition: params.repetition_penalty,
            presence: params.presence_penalty,
            frequency: params.frequency_penalty,
        };
        Sampler {
            strategy: Strategy::from_params(params),
            penalties: penalties
                .is_enabled()
                .then(|| PenaltyState::new(penalties, prompt_ids, vocab_size)),
            num_logprobs: params.logprobs,
            rng: Rng::new(seed),
            candidates: Candidates::default(),
            raw_logits: Vec::new(),
        }
    }

    /// How this request's tokens are chosen (fixed at construction from its `SamplingParams`).
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// Samples the next token from `logits` (raw model output; used as scratch and left
    /// suppressed, sanitized and penalized). `suppressed_ids`: ids that must not be sampled now;
    /// ids outside the row are ignored. See the module docs for the processing order.
    ///
    /// The logprobs, when asked for, are those of the raw logits after suppression (vLLM's
    /// default): the sampled token's, and the top-n most likely first (ties: lower id).
    // logits: [vocab_size]
    pub fn sample(&mut self, logits: &mut [f32], suppressed_ids: &[u32]) -> Sampled {
        for logit in logits.iter_mut() {
            // Branch-free (vectorizes): NaN -> -inf, +inf -> f32::MAX.
            *logit = if logit.is_nan() {
                f32::NEG_INFINITY
            } else {
                logit.min(f32::MAX)
            };
        }
        for &token_id in suppressed_ids {
            if let Some(logit) = logits.get_mut(token_id as usize) {
                *logit = f32::NEG_INFINITY;
            }
        }

        let logprob_parts = self.num_logprobs.map(|num_top| {
            let lse = logprobs::log_sum_exp(logits);
            (lse, logprobs::top_logprobs(logits, num_top, lse))
        });

        if let Some(penalties) = &self.penalties {
            if logprob_parts.is_some() {
                self.raw_logits.clear();
                self.raw_logits.extend_from_slice(logits);
            }
            penalties.apply(logits);
        }

        let chosen = match &self.strategy {
            Strategy::Greedy => argmax(logits),
            Strategy::Random {
                temperature,
                filters,
            } => {
                self.candidates.fill(logits, *temperature);
                for &filter in filters {
                    self.candidates.apply(filter);
                }
                self.candidates.draw(&mut self.rng)
            }
        };
        let token_id = chosen.unwrap_or_else(|| fallback_token(logits.len(), suppressed_ids));

        let logprobs = logprob_parts.map(|(lse, top)| {
            let raw_row: &[f32] = if self.penalties.is_some() {
                &self.raw_logits
            } else {
                logits
            };
            let raw_logit = raw_row
                .get(token_id as usize)
                .copied()
                .unwrap_or(f32::NEG_INFINITY);
            TokenLogprobs {
                logprob: logprobs::logprob(raw_logit, lse),
                top,
            }
        });
        Sampled { token_id, logprobs }
    }

    /// Records a generated token (updates the counts the penalties use).
    pub fn accept(&mut self, token_id: u32) {
        if let Some(penalties) = &mut self.penalties {
            penalties.accept(token_id);
        }
    }
}

/// The candidate list a random step draws from, in the order the draw walks it: every token
/// after `temperature` and `filters` (applied in order), as `Sampler::sample` builds it. A
/// reference for other implementations of the same sampling (the GPU sampler's tests).
// logits: [vocab_size], sanitized and penalized (no NaN)
pub fn candidate_ids(logits: &[f32], temperature: f32, filters: &[Filter]) -> Vec<u32> {
    let mut candidates = Candidates::default();
    candidates.fill(logits, temperature);
    for &filter in filters {
        candidates.apply(filter);
    }
    candidates.token_ids().collect()
}

/// Index of the largest logit, lowest id on ties; None if every logit is `-inf` (or the row is
/// empty).
// logits: [vocab_size], no NaN
fn argmax(logits: &[f32]) -> Option<u32> {
    let mut best: Option<(u32, f32)> = None;
    for (token_idx, &logit) in logits.iter().enumerate() {
        if logit > best.map_or(f32::NEG_INFINITY, |(_, l)| l) {
            best = Some((token_idx as u32, logit));
        }
    }
    best.map(|(token_id, _)| token_id)
}

/// The token of a row where nothing is possible: the lowest id that is not suppressed
/// (0 if the caller suppressed the whole vocabulary).
fn fallback_token(vocab_size: usize, suppressed_ids: &[u32]) -> u32 {
    (0..vocab_size as u32)
        .find(|id| !suppressed_ids.contains(id))
        .unwrap_or(0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
