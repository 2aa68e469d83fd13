//! The CUDA executor's step upload: a plan, checked once by `batch::check_plan`, packed into
//! one u32 array (decode rows first, then prefill chunks, padded to a graph bucket for pure
//! decode steps) that the device scatters into typed buffers.

use super::CudaExecutor;
use crate::cuda::FloatElem;
use crate::executor::batch::{self, StepLimits as PlanLimits};
use crate::scheduler::SchedulePlan;

/// Where each array of one step sits in the packed upload (offsets in u32 words), and the
/// step's sizes. Tokens are ordered decode rows first (one per decode sequence, plan order),
/// then the prefill chunks (plan order), so that split-K decode reads a prefix of the batch and
/// the prefill kernel the rest.
///
/// ```text
///   packed: [token_ids m][positions m][slots 2m (i64)][logits_rows r]
///           [dec_context_lens d][dec_tables d * mb][pre_q_starts p][pre_q_lens p]
///           [pre_context_lens p][pre_tables p * mb]
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct StepLayout {
    /// Batch rows (tokens), padding included.
    pub(super) num_tokens: usize,
    /// Decode rows (= sequences with one query token), padding included.
    pub(super) num_decode: usize,
    /// Prefill sequences (q_len > 1).
    pub(super) num_prefill: usize,
    pub(super) max_q_len: usize,
    /// Longest decode context (sizes the split-K plan).
    pub(super) max_decode_context: usize,
    /// Rows of logits computed.
    pub(super) num_rows: usize,
    /// The graph bucket this decode step replays, if any.
    pub(super) bucket: Option<usize>,
    pub(super) num_words: usize,
}

impl StepLayout {
    pub(super) fn offsets(&self, mb: usize) -> [usize; 11] {
        let (m, d, p, r) = (
            self.num_tokens,
            self.num_decode,
            self.num_prefill,
            self.num_rows,
        );
        let sizes = [m, m, 2 * m, r, d, d * mb, p, p, p, p * mb];
        let mut offs = [0usize; 11];
        for (i, s) in sizes.iter().enumerate() {
            offs[i + 1] = offs[i] + s;
        }
        offs
    }
}

/// What `pack_step` needs to know of the executor.
pub(super) struct StepLimits<'a> {
    pub(super) block_size: usize,
    pub(super) num_blocks: usize,
    /// Block-table entries per sequence.
    pub(super) max_blocks: usize,
    pub(super) max_tokens: usize,
    pub(super) max_seqs: usize,
    /// Decode graph buckets (empty: no graphs).
    pub(super) buckets: &'a [usize],
}

/// Flattens the plan into `host` (the packed upload, see `StepLayout`) and `sample_rows` (the
/// logits row of each sampling sequence, plan order); checks every block table covers its
/// chunk and fits the step buffers.
pub(super) fn pack_step(
    plan: &SchedulePlan,
    lim: &StepLimits<'_>,
    host: &mut Vec<u32>,
    sample_rows: &mut Vec<usize>,
) -> crate::Result<StepLayout> {
    let bs = lim.block_size;
    let mb = lim.max_blocks;
    let batch::PlanShape {
        num_decode,
        num_prefill,
        max_q_len,
        max_decode_context,
        num_sampling,
        ..
    } = batch::check_plan(
        plan,
        &PlanLimits {
            block_size: bs,
            num_blocks: lim.num_blocks,
            max_blocks_per_seq: mb,
            max_tokens: lim.max_tokens,
            max_seqs: lim.max_seqs,
        },
    )?;
    let num_tokens = plan.num_batched_tokens;
    // A pure decode step replays the graph of its bucket.
    let bucket = match num_prefill {
        0 if num_decode > 0 => lim.buckets.iter().copied().find(|&b| b >= num_decode),
        _ => None,
    };
    let (num_tokens, num_decode_rows, num_rows) = match bucket {
        Some(b) => (b, b, b),
        None => (num_tokens, num_decode, num_sampling),
    };
    let mut layout = StepLayout {
        num_tokens,
        num_decode: num_decode_rows,
        num_prefill,
        max_q_len,
        max_decode_context,
        num_rows,
        bucket,
        num_words: 0,
    };
    let o = layout.offsets(mb);
    layout.num_words = o[10];
    host.clear();
    host.resize(layout.num_words, 0);
    // Padding defaults: slot -1 (not written), tables -1, context 0, identity logits rows.
    for w in &mut host[o[2]..o[3]] {
        *w = u32::MAX;
    }
    for w in &mut host[o[5]..o[6]] {
        *w = u32::MAX;
    }
    for w in &mut host[o[9]..o[10]] {
        *w = u32::MAX;
    }
    sample_rows.clear();
    let (mut dec_idx, mut pre_idx) = (0usize, 0usize);
    let mut pre_row = num_decode_rows;
    for s in &plan.seqs {
        let q_len = s.token_ids.len();
        let first_row = if q_len == 1 { dec_idx } else { pre_row };
        let ctx = s.start_pos + q_len;
        let table_off = if q_len == 1 {
            o[5] + dec_idx * mb
        } else {
            o[9] + pre_idx * mb
        };
        // check_plan: the table covers ctx, every id is inside the cache and fits in i32.
        for (i, b) in s.block_table.iter().take(ctx.div_ceil(bs)).enumerate() {
            host[table_off + i] = b.0;
        }
        for (i, &id) in s.token_ids.iter().enumerate() {
            let pos = s.start_pos + i;
            let row = first_row + i;
            host[o[0] + row] = id;
            host[o[1] + row] = pos as u32;
            let block = host[table_off + pos / bs] as u64;
            let slot = block * bs as u64 + (pos % bs) as u64;
            host[o[2] + 2 * row] = slot as u32;
            host[o[2] + 2 * row + 1] = (slot >> 32) as u32;
        }
        let last_row = first_row + q_len - 1;
        if s.sample {
            // Logits row k is the k-th sampling sequence of the plan.
            host[o[3] + sample_rows.len()] = last_row as u32;
            sample_rows.push(sample_rows.len());
        }
        if q_len == 1 {
            host[o[4] + dec_idx] = ctx as u32;
            dec_idx += 1;
        } else {
            host[o[6] + pre_idx] = first_row as u32;
            host[o[7] + pre_idx] = q_len as u32;
            host[o[8] + pre_idx] = ctx as u32;
            pre_idx += 1;
            pre_row += q_len;
        }
    }
    // A graph computes logits for every bucket row: the rows past the sampling ones repeat
    // batch row 0 (discarded).
    Ok(layout)
}

impl<T: FloatElem> CudaExecutor<T> {
    pub(super) fn pack(&mut self, plan: &SchedulePlan) -> crate::Result<StepLayout> {
        let limits = StepLimits {
            block_size: self.kv_shape.block_size,
            num_blocks: self.kv_shape.num_blocks,
            max_blocks: self.max_blocks,
            max_tokens: self.max_tokens,
            max_seqs: self.max_seqs,
            buckets: if self.graphs_enabled {
                &self.buckets
            } else {
                &[]
            },
        };
        pack_step(plan, &limits, &mut self.host, &mut self.sample_rows)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    use crate::kv_cache::BlockId;
    use crate::request::SeqId;
    use crate::scheduler::ScheduledSeq;

    fn seq(
        id: u64,
        tokens: &[u32],
        start_pos: usize,
        blocks: &[u32],
        sample: bool,
    ) -> ScheduledSeq {
        ScheduledSeq {
            seq_id: SeqId(id),
            token_ids: tokens.to_vec(),
            start_pos,
            block_table: blocks.iter().map(|&b| BlockId(b)).collect(),
            sample,
        }
    }

    fn limits(buckets: &[usize]) -> StepLimits<'_> {
        StepLimits {
            block_size: 4,
            num_blocks: 16,
            max_blocks: 8,
            max_tokens: 32,
            max_seqs: 8,
            buckets,
        }
    }

    #[test]
    fn mixed_step_packs_decode_rows_first_then_prefill_chunks() {
        // Plan order: a prefill chunk of 3 (seq 0, positions 4..7, samples), a decode (seq 1 at
        // position 5), a non-sampling prefill chunk of 2 (seq 2 at 0..2).
        let plan = SchedulePlan {
            seqs: vec![
                seq(0, &[10, 11, 12], 4, &[3, 9], true),
                seq(1, &[20], 5, &[5, 6], true),
                seq(2, &[30, 31], 0, &[7], false),
            ],
            preempted: vec![],
            num_batched_tokens: 6,
        };
        let (mut host, mut rows) = (vec![], vec![]);
        let l = pack_step(&plan, &limits(&[1, 2, 4, 8]), &mut host, &mut rows).unwrap();
        assert_eq!(
            (
                l.num_tokens,
                l.num_decode,
                l.num_prefill,
                l.num_rows,
                l.bucket
            ),
            (6, 1, 2, 2, None)
        );
        assert_eq!((l.max_q_len, l.max_decode_context), (3, 6));
        let o = l.offsets(8);
        assert_eq!(o[10], l.num_words);
        // Row 0: the decode token; rows 1..4: seq 0's chunk; rows 4..6: seq 2's chunk.
        assert_eq!(&host[o[0]..o[1]], &[20, 10, 11, 12, 30, 31]);
        assert_eq!(&host[o[1]..o[2]], &[5, 4, 5, 6, 0, 1]);
        // Slots: block_table[pos / 4] * 4 + pos % 4, as little-endian i64 words.
        let slots: Vec<i64> = host[o[2]..o[3]]
            .chunks(2)
            .map(|w| (w[0] as u64 | (w[1] as u64) << 32) as i64)
            .collect();
        assert_eq!(
            slots,
            vec![6 * 4 + 1, 9 * 4, 9 * 4 + 1, 9 * 4 + 2, 7 * 4, 7 * 4 + 1]
        );
        // Logits rows in plan order of the sampling seqs: seq 0's last token (row 3), then the
        // decode row 0.
        assert_eq!(&host[o[3]..o[4]], &[3, 0]);
        assert_eq!(rows, vec![0, 1]);
        // Decode: context 6, table [5, 6, -1 ...].
        assert_eq!(&host[o[4]..o[5]], &[6]);
        assert_eq!(host[o[5]] as i32, 5);
        assert_eq!(host[o[5] + 1] as i32, 6);
        assert!(host[o[5] + 2..o[6]].iter().all(|&w| w as i32 == -1));
        // Prefill: q_starts, q_lens, context lens, tables.
        assert_eq!(&host[o[6]..o[7]], &[1, 4]);
        assert_eq!(&host[o[7]..o[8]], &[3, 2]);
        assert_eq!(&host[o[8]..o[9]], &[7, 2]);
        assert_eq!(&host[o[9]..o[9] + 2], &[3, 9]);
        assert_eq!(host[o[9] + 8], 7);
    }

    #[test]
    fn pure_decode_step_pads_to_its_graph_bucket() {
        let plan = SchedulePlan {
            seqs: vec![
                seq(0, &[7], 2, &[1], true),
                seq(1, &[8], 8, &[2, 3, 4], true),
                seq(2, &[9], 0, &[5], true),
            ],
            preempted: vec![],
            num_batched_tokens: 3,
        };
        let (mut host, mut rows) = (vec![], vec![]);
        let l = pack_step(&plan, &limits(&[1, 2, 4, 8]), &mut host, &mut rows).unwrap();
        assert_eq!(
            (l.num_tokens, l.num_decode, l.num_rows, l.bucket),
            (4, 4, 4, Some(4))
        );
        let o = l.offsets(8);
        assert_eq!(&host[o[0]..o[1]], &[7, 8, 9, 0]);
        // The padding row writes no slot (-1) and has an empty context.
        assert_eq!(host[o[2] + 6] as i32, -1);
        assert_eq!(host[o[2] + 7] as i32, -1);
        assert_eq!(&host[o[4]..o[5]], &[3, 9, 1, 0]);
        // Logits rows: the sampling seqs' rows, then padding (row 0, discarded).
        assert_eq!(&host[o[3]..o[4]], &[0, 1, 2, 0]);
        assert_eq!(rows, vec![0, 1, 2]);
        // Without graphs the same step is exact-sized.
        let l = pack_step(&plan, &limits(&[]), &mut host, &mut rows).unwrap();
        assert_eq!((l.num_tokens, l.num_rows, l.bucket), (3, 3, None));
    }

    #[test]
    fn bad_plans_are_errors_not_panics() {
        let (mut host, mut rows) = (vec![], vec![]);
        let short = SchedulePlan {
            seqs: vec![seq(0, &[1, 2, 3, 4, 5], 0, &[0], true)],
            preempted: vec![],
            num_batched_tokens: 5,
        };
        let e = pack_step(&short, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("does not cover"), "{e}");
        let outside = SchedulePlan {
            seqs: vec![seq(0, &[1], 0, &[99], true)],
            preempted: vec![],
            num_batched_tokens: 1,
        };
        let e = pack_step(&outside, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("outside the cache"), "{e}");
        let too_long = SchedulePlan {
            seqs: vec![seq(0, &[1], 40, &[0; 11], true)],
            preempted: vec![],
            num_batched_tokens: 1,
        };
        let e = pack_step(&too_long, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("max_model_len"), "{e}");
        let too_many = SchedulePlan {
            seqs: vec![seq(0, &[1; 33], 0, &[0; 9], true)],
            preempted: vec![],
            num_batched_tokens: 33,
        };
        let e = pack_step(&too_many, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("max_num_batched_tokens"), "{e}");
        let miscounted = SchedulePlan {
            seqs: vec![seq(0, &[1], 0, &[0], true)],
            preempted: vec![],
            num_batched_tokens: 2,
        };
        let e = pack_step(&miscounted, &limits(&[]), &mut host, &mut rows).unwrap_err();
        assert!(e.to_string().contains("batched tokens"), "{e}");
    }
}
