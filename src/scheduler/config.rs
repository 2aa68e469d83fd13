//! `BatchingOptions` (the batching settings a user gives) and `SchedulerConfig` (those plus the
//! numbers resolved at load): the limits of in-flight batching, validated once by `validate()`.

use super::ScheduleError;

/// How requests are batched into steps: the user-facing batching settings, shared as one value by
/// `EngineOptions::batching` and `SchedulerConfig::batching` (the config keys are named per
/// field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchingOptions {
    /// Most sequences running (holding KV blocks and a batch seat) at once, hence most sequences
    /// per step (`max_num_seqs`; default 64).
    pub max_num_seqs: usize,
    /// Token budget of one step: prefill chunks plus one token per decoding sequence
    /// (`max_num_batched_tokens`; default 2048; >= `max_num_seqs`, and >= `max_model_len`
    /// without chunked prefill).
    pub max_num_batched_tokens: usize,
    /// Split prompts longer than the step's remaining budget across steps
    /// (`enable_chunked_context`; default true). When off, a prompt is prefilled in one step or
    /// waits.
    pub enable_chunked_prefill: bool,
    /// Which waiting sequences may be admitted (`batch_scheduler_policy`).
    pub policy: SchedulerPolicy,
    /// Keep full computed KV blocks for reuse and start new sequences from the longest cached
    /// prefix of their tokens (`enable_kv_cache_reuse`; default false, as in
    /// tensorrtllm_backend).
    pub enable_prefix_caching: bool,
    /// Most requests waiting beyond the `max_num_seqs` that run (`max_queue_size`): a request
    /// that would exceed `max_num_seqs + max_queue_size` in flight is refused at once as busy
    /// (`RequestError::Unavailable`, Triton's UNAVAILABLE), never left to wait without bound.
    /// None: unbounded (the library and CLI default; a Triton model defaults to
    /// `4 * max_num_seqs`).
    pub max_queue_size: Option<usize>,
    /// Longest a new request may wait for its first step (`queue_timeout_microseconds`; None,
    /// the default: no limit). A request still waiting past it, never scheduled, ends with one
    /// `Unavailable` event naming the bound and how long it waited (a request's own
    /// `QueueParams::queue_timeout` replaces it). Enforced by the engine before every step.
    pub queue_timeout: Option<std::time::Duration>,
}

impl Default for BatchingOptions {
    /// 64 sequences, 2048 tokens per step, chunked prefill, `max_utilization`, no prefix caching.
    fn default() -> Self {
        BatchingOptions {
            max_num_seqs: 64,
            max_num_batched_tokens: 2048,
            enable_chunked_prefill: true,
            policy: SchedulerPolicy::default(),
            enable_prefix_caching: false,
            max_queue_size: None,
            queue_timeout: None,
        }
    }
}

/// Limits the scheduler enforces on every step: the batching settings plus the numbers the engine
/// resolved at load (cache geometry and the sequence length limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// The batching settings as given.
    pub batching: BatchingOptions,
    /// Token positions per KV-cache block.
    pub block_size: usize,
    /// Physical KV-cache blocks (the engine sizes this from device memory).
    pub num_blocks: usize,
    /// Most tokens (prompt + generated) one sequence may ever hold.
    pub max_model_len: usize,
}

/// Admission policy, as tensorrtllm_backend's `batch_scheduler_policy` names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SchedulerPolicy {
    /// Admit while the prompt's blocks are free (vLLM's policy): the most sequences at once;
    /// when the cache runs out, the last running sequence (lowest priority, then newest) is
    /// preempted and recomputed later.
    #[default]
    MaxUtilization,
    /// Admit a sequence only if the blocks for its whole length (prompt + max_tokens, capped
    /// by max_model_len) are free after every running sequence's own worst case is set aside:
    /// a started sequence is never preempted (TensorRT-LLM's default).
    GuaranteedNoEvict,
}

impl SchedulerPolicy {
    /// The `batch_scheduler_policy` values (case-insensitive).
    pub const NAMES: [&'static str; 2] = ["max_utilization", "guaranteed_no_evict"];

    /// Parses a `batch_scheduler_policy` value (case-insensitive, surrounding space ignored); None
    /// for anything not in `NAMES`.
    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "max_utilization" => Some(SchedulerPolicy::MaxUtilization),
            "guaranteed_no_evict" => Some(SchedulerPolicy::GuaranteedNoEvict),
            _ => None,
        }
    }

    /// The policy's `batch_scheduler_policy` spelling (lowercase), as in `NAMES`.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerPolicy::MaxUtilization => Self::NAMES[0],
            SchedulerPolicy::GuaranteedNoEvict => Self::NAMES[1],
        }
    }
}

/// Default number of full-length sequences the default KV cache holds.
const DEFAULT_NUM_FULL_SEQS: usize = 8;

impl Default for SchedulerConfig {
    fn default() -> Self {
        let block_size: usize = 16;
        let max_model_len: usize = 4096;
        SchedulerConfig {
            batching: BatchingOptions {
                max_num_seqs: 256,
                ..BatchingOptions::default()
            },
            block_size,
            // Room for DEFAULT_NUM_FULL_SEQS sequences of max_model_len tokens (2048 blocks);
            // the engine replaces this with what device memory allows.
            num_blocks: DEFAULT_NUM_FULL_SEQS * max_model_len.div_ceil(block_size),
            max_model_len,
        }
    }
}

impl SchedulerConfig {
    /// Checks every bound; the error names the field, its value and the bound. Beyond plain
    /// ranges it guarantees progress: one sequence of `max_model_len` tokens fits the cache (so
    /// the oldest running sequence can always grow once the others are preempted), every running
    /// sequence can get a token each step (`max_num_batched_tokens >= max_num_seqs`), and without
    /// chunked prefill any sequence (including a recompute after preemption) fits one step.
    pub fn validate(&self) -> Result<(), ScheduleError> {
        let invalid = |field: &'static str, value: usize, bound: String| {
            Err(ScheduleError::InvalidConfig {
                field,
                value,
                bound,
            })
        };
        let b = &self.batching;
        if b.max_num_seqs == 0 {
            return invalid("max_num_seqs", b.max_num_seqs, "must be >= 1".into());
        }
        if b.max_num_batched_tokens < b.max_num_seqs {
            return invalid(
                "max_num_batched_tokens",
                b.max_num_batched_tokens,
                format!("must be >= max_num_seqs ({})", b.max_num_seqs),
            );
        }
        if self.block_size == 0 {
            return invalid("block_size", self.block_size, "must be >= 1".into());
        }
        if self.max_model_len < 2 {
            return invalid(
                "max_model_len",
                self.max_model_len,
                "must be >= 2 (one prompt token and one generated token)".into(),
            );
        }
        let max_blocks = u32::MAX as usize;
        if self.num_blocks > max_blocks {
            return invalid(
                "num_blocks",
                self.num_blocks,
                format!("must be <= {max_blocks}"),
            );
        }
        let num_blocks_per_seq = self.max_model_len.div_ceil(self.block_size);
        if self.num_blocks < num_blocks_per_seq {
            return invalid(
                "num_blocks",
                self.num_blocks,
                format!(
                    "must be >= {num_blocks_per_seq} so one sequence of max_model_len ({}) tokens \
                     fits in blocks of {} tokens",
                    self.max_model_len, self.block_size
                ),
            );
        }
        if !b.enable_chunked_prefill && b.max_num_batched_tokens < self.max_model_len {
            return invalid(
                "max_num_batched_tokens",
                b.max_num_batched_tokens,
                format!(
                    "must be >= max_model_len ({}) when enable_chunked_prefill is false",
                    self.max_model_len
                ),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid() {
        let cfg = SchedulerConfig::default();
        cfg.validate().unwrap();
        assert_eq!(cfg.num_blocks, 2048);
    }

    #[test]
    fn errors_name_field_value_and_bound() {
        let base = SchedulerConfig::default();
        let cases = [
            (
                SchedulerConfig {
                    batching: BatchingOptions {
                        max_num_seqs: 0,
                        ..base.batching.clone()
                    },
                    ..base.clone()
                },
                "max_num_seqs",
                "0",
                ">= 1",
            ),
            (
                SchedulerConfig {
                    batching: BatchingOptions {
                        max_num_batched_tokens: 100,
                        ..base.batching.clone()
                    },
                    ..base.clone()
                },
                "max_num_batched_tokens",
                "100",
                ">= max_num_seqs (256)",
            ),
            (
                SchedulerConfig {
                    block_size: 0,
                    ..base.clone()
                },
                "block_size",
                "0",
                ">= 1",
            ),
            (
                SchedulerConfig {
                    max_model_len: 1,
                    ..base.clone()
                },
                "max_model_len",
                "1",
                ">= 2",
            ),
            (
                SchedulerConfig {
                    num_blocks: 255,
                    ..base.clone()
                },
                "num_blocks",
                "255",
                ">= 256",
            ),
            (
                SchedulerConfig {
                    batching: BatchingOptions {
                        enable_chunked_prefill: false,
                        ..base.batching.clone()
                    },
                    ..base.clone()
                },
                "max_num_batched_tokens",
                "2048",
                ">= max_model_len (4096)",
            ),
        ];
        for (cfg, field, value, bound) in cases {
            let msg = cfg.validate().unwrap_err().to_string();
            assert!(
                msg.contains(field) && msg.contains(value) && msg.contains(bound),
                "{msg}"
            );
        }
        let ok = SchedulerConfig {
            num_blocks: 256,
            ..base
        };
        ok.validate().unwrap();
    }
}
