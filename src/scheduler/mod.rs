//! In-flight batching scheduler, pure CPU code over `kv_cache`: decides, step by step, which
//! tokens of which sequences are computed, and owns their KV block tables through the
//! `KvCacheManager`. It must never import device, backend, executor or Triton code, never
//! sample or detokenize, and never drop a request on its own (only `remove` ends a sequence).
//!
//! A sequence is `tokens` (prompt + generated) plus `num_computed_tokens` (vLLM v1's model), so
//! prefill, chunked prefill, decode and recompute after preemption are the same arithmetic:
//!
//! ```text
//! tokens:   p0 p1 p2 p3 p4 p5 g0 g1        (prompt p*, generated g*)
//! computed: [=========== 6 ==========]      num_computed_tokens = 6
//! next chunk:                   g0 g1      start_pos = 6, sample = true (reaches the end)
//! after preemption: computed = 0, next chunk p0 .. g1 from start_pos 0 (within the budget)
//! ```
//!
//! One engine step: `schedule()` → executor runs the `SchedulePlan` → engine samples one token
//! per `sample == true` entry → `update(&plan, &sampled)` → engine `remove`s finished sequences.
//!
//! With prefix caching (`BatchingOptions::enable_prefix_caching`), `update` registers every
//! block it completes and admission starts a sequence at `num_computed_tokens` = the tokens its
//! cached prefix covers, so the first chunk's `start_pos` may be > 0 (whole blocks).

mod batcher;
mod config;
mod plan;

pub use batcher::Scheduler;
pub use config::{BatchingOptions, SchedulerConfig, SchedulerPolicy};
pub use plan::{SchedulePlan, ScheduledSeq};

use crate::kv_cache::KvCacheError;
use crate::request::SeqId;

/// Why the scheduler refused a config or a request; each variant names the sequence, field,
/// value and bound concerned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    /// A `SchedulerConfig` limit is out of range or inconsistent (see `SchedulerConfig::validate`).
    #[error("scheduler config: invalid value for '{field}': {value} ({bound})")]
    InvalidConfig {
        /// The config field, e.g. `max_num_batched_tokens`.
        field: &'static str,
        /// The value given.
        value: usize,
        /// What is required, e.g. "must be >= max_num_seqs (64)".
        bound: String,
    },
    /// A request the scheduler cannot run (`max_tokens` of 0, or a prompt that leaves no room for a
    /// generated token).
    #[error("{seq_id}: invalid {field}: {value} ({bound})")]
    InvalidRequest {
        /// The refused sequence.
        seq_id: SeqId,
        /// What is wrong: `max_tokens` or `prompt length`.
        field: &'static str,
        /// The value given (tokens).
        value: usize,
        /// What is required, e.g. "must be < max_model_len (4096) ...".
        bound: String,
    },
    /// `Scheduler::add` got no prompt tokens.
    #[error("{seq_id}: prompt is empty: at least one token is required")]
    EmptyPrompt {
        /// The refused sequence.
        seq_id: SeqId,
    },
    /// `Scheduler::add` with an id that is still in use (waiting, running or capped).
    #[error("{seq_id} is already scheduled; sequence ids must be unique")]
    DuplicateSeqId {
        /// The id already in use.
        seq_id: SeqId,
    },
    /// The KV cache manager refused its configuration.
    #[error(transparent)]
    Kv(#[from] KvCacheError),
}

#[cfg(test)]
mod tests;
