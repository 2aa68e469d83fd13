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
//! With prefix caching (`SchedulerConfig::enable_prefix_caching`), `update` registers every
//! block it completes and admission starts a sequence at `num_computed_tokens` = the tokens its
//! cached prefix covers, so the first chunk's `start_pos` may be > 0 (whole blocks).

mod batcher;
mod config;
mod plan;

pub use batcher::Scheduler;
pub use config::{SchedulerConfig, SchedulerPolicy};
pub use plan::{SchedulePlan, ScheduledSeq};

use crate::kv_cache::KvCacheError;
use crate::request::SeqId;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error("scheduler config: invalid value for '{field}': {value} ({bound})")]
    InvalidConfig {
        field: &'static str,
        value: usize,
        bound: String,
    },
    #[error("{seq_id}: invalid {field}: {value} ({bound})")]
    InvalidRequest {
        seq_id: SeqId,
        field: &'static str,
        value: usize,
        bound: String,
    },
    #[error("{seq_id}: prompt is empty: at least one token is required")]
    EmptyPrompt { seq_id: SeqId },
    #[error("{seq_id} is already scheduled; sequence ids must be unique")]
    DuplicateSeqId { seq_id: SeqId },
    #[error(transparent)]
    Kv(#[from] KvCacheError),
}

#[cfg(test)]
mod tests;
