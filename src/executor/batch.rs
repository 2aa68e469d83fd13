//! Step packing shared by the executors: a `SchedulePlan` is checked once against the
//! executor's cache and step capacity (`check_plan`), so that a bad plan is an error on every
//! device and never an out-of-bounds index, then flattened (`StepBatch`) into per-token arrays
//! (ids, positions, KV slots) and per-sequence spans, decode rows first, then prefill chunks:
//!
//! ```text
//!   tokens:  [ d decode rows (q_len 1) | prefill chunk 0 | prefill chunk 1 | ... ]
//!   slot of the token at position p = block_table[p / block_size] * block_size + p % block_size
//!   logits_rows[k] = the batch row of the last token of the plan's k-th sampling sequence
//! ```
//! The CPU executor runs a `StepBatch` as it is; the CUDA executor packs the same order into its
//! one upload (with graph padding).

use crate::scheduler::{SchedulePlan, ScheduledSeq};

/// Errors of the executors: a plan that does not fit the executor, or a device failure.
#[derive(Debug, thiserror::Error)]
pub enum ExecutorError {
    /// The plan batches more tokens than the executor's buffers hold.
    #[error(
        "plan of {num_tokens} batched tokens exceeds the executor's max_num_batched_tokens {max}"
    )]
    TooManyTokens {
        /// `plan.num_batched_tokens`.
        num_tokens: usize,
        /// The executor's `max_num_batched_tokens`.
        max: usize,
    },
    /// The plan has more sequences than the executor serves per step.
    #[error("plan of {num_seqs} sequences exceeds the executor's max_num_seqs {max}")]
    TooManySeqs {
        /// Sequences in the plan.
        num_seqs: usize,
        /// The executor's `max_num_seqs`.
        max: usize,
    },
    /// `plan.num_batched_tokens` disagrees with the sum of its chunks' lengths.
    #[error("plan counts {declared} batched tokens but its sequences hold {actual}")]
    TokenCount {
        /// What the plan says (`num_batched_tokens`).
        declared: usize,
        /// The sum of `token_ids.len()` over its sequences.
        actual: usize,
    },
    /// A sequence's block table does not cover the positions its chunk writes.
    #[error(
        "sequence {seq}: block table of {num_blocks} blocks of {block_size} does not cover positions up to {end}"
    )]
    ShortBlockTable {
        /// The sequence's id (`SeqId.0`).
        seq: u64,
        /// Blocks in its table.
        num_blocks: usize,
        /// Tokens per block.
        block_size: usize,
        /// One past the last position of the chunk.
        end: usize,
    },
    /// A sequence reaches past `max_model_len` (more blocks than a table row holds).
    #[error(
        "sequence {seq}: {end} tokens exceed max_model_len ({max_blocks} blocks of {block_size})"
    )]
    TooLong {
        /// The sequence's id (`SeqId.0`).
        seq: u64,
        /// One past the last position of the chunk.
        end: usize,
        /// Block-table entries one sequence may have.
        max_blocks: usize,
        /// Tokens per block.
        block_size: usize,
    },
    /// A position past what the device kernels index (i32).
    #[error("sequence {seq}: position {end} does not fit in i32")]
    PositionOverflow {
        /// The sequence's id (`SeqId.0`).
        seq: u64,
        /// One past the last position of the chunk.
        end: usize,
    },
    /// A block id in a sequence's table is not a block of the cache.
    #[error("sequence {seq}: block id {block} outside the cache's {num_blocks} blocks")]
    BadBlock {
        /// The sequence's id (`SeqId.0`).
        seq: u64,
        /// The offending block id.
        block: u32,
        /// Blocks in the cache.
        num_blocks: usize,
    },
    /// A plan entry has no tokens to compute.
    #[error("sequence {seq}: a chunk of no tokens")]
    EmptyChunk {
        /// The sequence's id (`SeqId.0`).
        seq: u64,
    },
    /// An op was called with the same activation buffer for two operands that must differ (a bug
    /// in the forward pass or a backend, caught before any launch).
    #[error("{op}: buffers {a} and {b} are the same buffer")]
    Aliased {
        /// The op, e.g. `mlp`.
        op: &'static str,
        /// Name of the first buffer (`Act::name`).
        a: &'static str,
        /// Name of the second buffer.
        b: &'static str,
    },
    /// A weight the forward pass asks for was not loaded (a layer index past the model, or a norm
    /// the spec does not have).
    #[error("{what} is missing from the loaded weights")]
    MissingWeight {
        /// Which weight, e.g. "layer 40" or "the embedding norm".
        what: String,
    },
    /// A device-side failure (CUDA, thread pool, dump file), as a message.
    #[error("{0}")]
    Device(String),
}

impl ExecutorError {
    /// Two buffers of one op that must be distinct are the same.
    pub fn aliased(
        op: &'static str,
        a: crate::model::decoder::Act,
        b: crate::model::decoder::Act,
    ) -> Self {
        ExecutorError::Aliased {
            op,
            a: a.name(),
            b: b.name(),
        }
    }
}

/// What a plan is checked against.
#[derive(Debug, Clone, Copy)]
pub struct StepLimits {
    /// Tokens per KV cache block.
    pub block_size: usize,
    /// Blocks in the cache; every block id must be below it.
    pub num_blocks: usize,
    /// Block-table entries one sequence may have (max_model_len / block_size, rounded up).
    pub max_blocks_per_seq: usize,
    /// Most batched tokens per step (`max_num_batched_tokens`).
    pub max_tokens: usize,
    /// Most sequences per step (`max_num_seqs`).
    pub max_seqs: usize,
}

/// The shape of a checked plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PlanShape {
    /// Query tokens in the step (`plan.num_batched_tokens`).
    pub num_tokens: usize,
    /// Sequences with one query token.
    pub num_decode: usize,
    /// Sequences with more than one.
    pub num_prefill: usize,
    /// The longest prefill chunk (0 without prefill).
    pub max_q_len: usize,
    /// Longest context of a decode sequence.
    pub max_decode_context: usize,
    /// Sequences whose chunk reaches their end, so a token is sampled for them.
    pub num_sampling: usize,
}

/// Checks `plan` against `lim`: capacity, token count, and that every sequence's block table
/// covers its chunk with block ids inside the cache. Nothing after this check indexes by plan
/// data without its bound established here.
pub fn check_plan(plan: &SchedulePlan, lim: &StepLimits) -> Result<PlanShape, ExecutorError> {
    let bs = lim.block_size.max(1);
    if plan.num_batched_tokens > lim.max_tokens {
        return Err(ExecutorError::TooManyTokens {
            num_tokens: plan.num_batched_tokens,
            max: lim.max_tokens,
        });
    }
    if plan.seqs.len() > lim.max_seqs {
        return Err(ExecutorError::TooManySeqs {
            num_seqs: plan.seqs.len(),
            max: lim.max_seqs,
        });
    }
    let mut shape = PlanShape {
        num_tokens: plan.num_batched_tokens,
        ..PlanShape::default()
    };
    let mut actual = 0;
    for s in &plan.seqs {
        let seq = s.seq_id.0;
        let end = s.start_pos + s.token_ids.len();
        let needed = end.div_ceil(bs);
        if s.token_ids.is_empty() {
            return Err(ExecutorError::EmptyChunk { seq });
        }
        if s.block_table.len() < needed {
            return Err(ExecutorError::ShortBlockTable {
                seq,
                num_blocks: s.block_table.len(),
                block_size: bs,
                end,
            });
        }
        if i32::try_from(end).is_err() {
            return Err(ExecutorError::PositionOverflow { seq, end });
        }
        if needed > lim.max_blocks_per_seq {
            return Err(ExecutorError::TooLong {
                seq,
                end,
                max_blocks: lim.max_blocks_per_seq,
                block_size: bs,
            });
        }
        if let Some(b) = s.block_table[..needed]
            .iter()
            .find(|b| b.0 as usize >= lim.num_blocks || i32::try_from(b.0).is_err())
        {
            return Err(ExecutorError::BadBlock {
                seq,
                block: b.0,
                num_blocks: lim.num_blocks,
            });
        }
        actual += s.token_ids.len();
        match s.token_ids.len() {
            1 => {
                shape.num_decode += 1;
                shape.max_decode_context = shape.max_decode_context.max(end);
            }
            q => {
                shape.num_prefill += 1;
                shape.max_q_len = shape.max_q_len.max(q);
            }
        }
        shape.num_sampling += usize::from(s.sample);
    }
    if actual != plan.num_batched_tokens {
        return Err(ExecutorError::TokenCount {
            declared: plan.num_batched_tokens,
            actual,
        });
    }
    Ok(shape)
}

/// The sequences of a checked plan in batch order: decode rows first (plan order among them),
/// then prefill chunks (plan order).
pub fn batch_order(plan: &SchedulePlan) -> impl Iterator<Item = &ScheduledSeq> {
    let decode = plan.seqs.iter().filter(|s| s.token_ids.len() == 1);
    let prefill = plan.seqs.iter().filter(|s| s.token_ids.len() > 1);
    decode.chain(prefill)
}

/// One sequence's span of a `StepBatch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchSeq {
    /// Batch row of the sequence's first query token.
    pub q_start: usize,
    /// Query tokens of the sequence in this step (1 for a decode row).
    pub q_len: usize,
    /// Tokens in the cache after this step's writes (start_pos + q_len).
    pub context_len: usize,
    /// The blocks covering positions 0..context_len: `StepBatch::tables[table]`.
    pub table: std::ops::Range<usize>,
}

/// A checked plan, flattened (see the module comment for the order).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepBatch {
    /// The plan's counts, from `check_plan`.
    pub shape: PlanShape,
    /// [tokens]
    pub token_ids: Vec<u32>,
    /// [tokens]
    pub positions: Vec<usize>,
    /// [tokens] KV cache slot of each token
    pub slots: Vec<usize>,
    /// [seqs] in batch order
    pub seqs: Vec<BatchSeq>,
    /// Every sequence's block ids, concatenated.
    pub tables: Vec<u32>,
    /// [sampling seqs] batch row of each sampling sequence's last token, in plan order.
    pub logits_rows: Vec<usize>,
}

impl StepBatch {
    /// Checks and flattens `plan`.
    pub fn pack(plan: &SchedulePlan, lim: &StepLimits) -> Result<StepBatch, ExecutorError> {
        let shape = check_plan(plan, lim)?;
        let bs = lim.block_size.max(1);
        let mut b = StepBatch {
            shape,
            token_ids: Vec::with_capacity(shape.num_tokens),
            positions: Vec::with_capacity(shape.num_tokens),
            slots: Vec::with_capacity(shape.num_tokens),
            seqs: Vec::with_capacity(plan.seqs.len()),
            tables: Vec::new(),
            logits_rows: Vec::with_capacity(shape.num_sampling),
        };
        for s in batch_order(plan) {
            let q_start = b.token_ids.len();
            let context_len = s.start_pos + s.token_ids.len();
            let t0 = b.tables.len();
            b.tables.extend(
                s.block_table[..context_len.div_ceil(bs)]
                    .iter()
                    .map(|id| id.0),
            );
            let table = &b.tables[t0..];
            for (i, &id) in s.token_ids.iter().enumerate() {
                let pos = s.start_pos + i;
                b.token_ids.push(id);
                b.positions.push(pos);
                b.slots.push(table[pos / bs] as usize * bs + pos % bs);
            }
            b.seqs.push(BatchSeq {
                q_start,
                q_len: s.token_ids.len(),
                context_len,
                table: t0..b.tables.len(),
            });
        }
        // Logits rows in plan order (what the engine expects back): a decode sequence's row is
        // its rank among the decode rows; a chunk's last row follows the chunks before it.
        let (mut decode_row, mut prefill_end) = (0, shape.num_decode);
        for s in &plan.seqs {
            let last = match s.token_ids.len() {
                1 => {
                    decode_row += 1;
                    decode_row - 1
                }
                q => {
                    prefill_end += q;
                    prefill_end - 1
                }
            };
            if s.sample {
                b.logits_rows.push(last);
            }
        }
        Ok(b)
    }

    /// Query tokens in the batch (rows of the step's activations).
    pub fn num_tokens(&self) -> usize {
        self.token_ids.len()
    }

    /// Block ids of sequence `seq` (batch order).
    pub fn table(&self, seq: &BatchSeq) -> &[u32] {
        &self.tables[seq.table.clone()]
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::kv_cache::BlockId;
    use crate::request::SeqId;

    fn seq(id: u64, tokens: &[u32], start: usize, table: &[u32], sample: bool) -> ScheduledSeq {
        ScheduledSeq {
            seq_id: SeqId(id),
            token_ids: tokens.to_vec(),
            start_pos: start,
            block_table: table.iter().map(|&b| BlockId(b)).collect(),
            sample,
        }
    }

    fn plan(seqs: Vec<ScheduledSeq>) -> SchedulePlan {
        let num_batched_tokens = seqs.iter().map(|s| s.token_ids.len()).sum();
        SchedulePlan {
            seqs,
            preempted: vec![],
            num_batched_tokens,
        }
    }

    const LIM: StepLimits = StepLimits {
        block_size: 4,
        num_blocks: 16,
        max_blocks_per_seq: 8,
        max_tokens: 64,
        max_seqs: 8,
    };

    #[test]
    fn decode_rows_first_then_prefill_chunks_with_logits_rows_in_plan_order() {
        let p = plan(vec![
            seq(1, &[10, 11, 12, 13, 14], 0, &[3, 2], true), // prefill, 5 tokens
            seq(2, &[20], 6, &[5, 7], true),                 // decode at position 6
            seq(3, &[30, 31], 4, &[0, 1], false),            // chunk, not sampling
            seq(4, &[40], 0, &[9], true),                    // decode at position 0
        ]);
        let b = StepBatch::pack(&p, &LIM).unwrap();
        assert_eq!(b.token_ids, vec![20, 40, 10, 11, 12, 13, 14, 30, 31]);
        assert_eq!(b.positions, vec![6, 0, 0, 1, 2, 3, 4, 4, 5]);
        // position 6 of seq 2 is block 7, row 2; seq 1's position 4 is block 2, row 0.
        assert_eq!(b.slots, vec![30, 36, 12, 13, 14, 15, 8, 4, 5]);
        assert_eq!(b.logits_rows, vec![6, 0, 1]);
        assert_eq!(
            b.shape,
            PlanShape {
                num_tokens: 9,
                num_decode: 2,
                num_prefill: 2,
                max_q_len: 5,
                max_decode_context: 7,
                num_sampling: 3,
            }
        );
        assert_eq!(b.table(&b.seqs[2]), &[3, 2]);
        assert_eq!((b.seqs[3].q_start, b.seqs[3].context_len), (7, 6));
    }

    #[test]
    fn bad_plans_are_errors_naming_the_numbers() {
        let cases: Vec<(SchedulePlan, &str)> = vec![
            (
                plan(vec![seq(1, &[1; 5], 0, &[0], true)]),
                "sequence 1: block table of 1 blocks of 4 does not cover positions up to 5",
            ),
            (
                plan(vec![seq(2, &[1], 3, &[16], true)]),
                "sequence 2: block id 16 outside the cache's 16 blocks",
            ),
            (
                plan(vec![seq(3, &[1], 40, &[0; 11], true)]),
                "sequence 3: 41 tokens exceed max_model_len (8 blocks of 4)",
            ),
            (
                plan(vec![seq(4, &[], 0, &[0], true)]),
                "sequence 4: a chunk of no tokens",
            ),
            (
                SchedulePlan {
                    num_batched_tokens: 3,
                    ..plan(vec![seq(5, &[1, 2], 0, &[0], true)])
                },
                "plan counts 3 batched tokens but its sequences hold 2",
            ),
            (
                plan((0..9).map(|i| seq(i, &[1], 0, &[0], true)).collect()),
                "plan of 9 sequences exceeds the executor's max_num_seqs 8",
            ),
            (
                plan(vec![seq(6, &[1; 65], 0, &[0; 17], true)]),
                "plan of 65 batched tokens exceeds the executor's max_num_batched_tokens 64",
            ),
        ];
        for (p, want) in cases {
            let err = StepBatch::pack(&p, &LIM).unwrap_err().to_string();
            assert_eq!(err, want);
        }
    }
}
