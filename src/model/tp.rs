//! Tensor parallelism as arithmetic on the spec: which heads, KV heads, MLP columns and
//! vocabulary rows one rank of `world_size` holds, checked once at model load, and the spec that
//! rank's forward pass runs on. The loader (`model::weights`) reads each rank's slices from
//! these numbers; the executor (`executor::tp`) adds the collectives. Nothing here reads data.
//!
//! ```text
//!   query heads   rank r: [r * H/tp, (r+1) * H/tp)                      (tp must divide H)
//!   KV heads      tp <= KV: rank r: [r * KV/tp, ..)                     (tp must divide KV)
//!                 tp >  KV: one head each, head r / (tp/KV), replicated  (KV must divide tp)
//!   MLP columns   rank r: [r * I/tp, (r+1) * I/tp)                      (tp must divide I)
//!   vocabulary    padded to V' = ceil(V / tp) * tp; rank r: rows [r V'/tp, (r+1) V'/tp) ∩ [0, V)
//! ```
//! The KV rule is vLLM's (`QKVParallelLinear`): each query head of a rank belongs to that rank's
//! one replicated KV head because every rank's heads lie in one KV group when tp >= KV.

use crate::model::spec::DecoderSpec;

/// One rank of a tensor-parallel group: `rank` in `0..world_size`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TpRank {
    /// This rank's index.
    pub rank: usize,
    /// Ranks in the group (`tensor_parallel_size`).
    pub world_size: usize,
}

impl TpRank {
    /// The single rank of an engine without tensor parallelism.
    pub const SINGLE: TpRank = TpRank {
        rank: 0,
        world_size: 1,
    };
}

/// What one rank holds, in units of the full model (heads, columns, vocabulary rows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankLayout {
    /// Which rank of how many.
    pub tp: TpRank,
    /// First query head of this rank.
    pub head_start: usize,
    /// Query heads of this rank (`num_heads / world_size`).
    pub num_heads: usize,
    /// First KV head of this rank.
    pub kv_head_start: usize,
    /// KV heads of this rank (1 when they are replicated).
    pub num_kv_heads: usize,
    /// First MLP column (row of gate, up; column of down) of this rank.
    pub inter_start: usize,
    /// MLP columns of this rank.
    pub intermediate_size: usize,
    /// First vocabulary row of this rank.
    pub vocab_start: usize,
    /// Real vocabulary rows of this rank (fewer than `vocab_part` on the last ranks when the
    /// vocabulary is padded; possibly 0).
    pub vocab_len: usize,
    /// Rows per rank of the padded vocabulary (`ceil(vocab / world_size)`): the width every
    /// rank's share of the logits has in the gather.
    pub vocab_part: usize,
}

/// Checks that `spec` can be split over `world_size` ranks; the message names the setting, the
/// model field, the bound and the values.
pub fn check(spec: &DecoderSpec, world_size: usize) -> Result<(), String> {
    let tp = world_size;
    if tp == 0 {
        return Err("tensor_parallel_size must be at least 1, got 0".into());
    }
    if tp == 1 {
        return Ok(());
    }
    let must_divide = |field: &str, value: usize| {
        format!(
            "tensor_parallel_size = {tp} must divide the model's {field} ({value}): each rank \
             holds an equal share"
        )
    };
    if !spec.num_heads.is_multiple_of(tp) {
        return Err(must_divide("num_heads (query heads)", spec.num_heads));
    }
    let kv = spec.num_kv_heads;
    if tp <= kv && !kv.is_multiple_of(tp) {
        return Err(format!(
            "tensor_parallel_size = {tp} must divide the model's num_kv_heads ({kv}) when it is \
             not larger, or be a multiple of it to replicate the KV heads"
        ));
    }
    if tp > kv && !tp.is_multiple_of(kv) {
        return Err(format!(
            "tensor_parallel_size = {tp} is larger than the model's num_kv_heads ({kv}) and must \
             then be a multiple of it, so each KV head is replicated on tensor_parallel_size / \
             num_kv_heads ranks"
        ));
    }
    if !spec.intermediate_size.is_multiple_of(tp) {
        return Err(must_divide(
            "intermediate_size (MLP width)",
            spec.intermediate_size,
        ));
    }
    if spec.vocab_size < tp {
        return Err(format!(
            "tensor_parallel_size = {tp} must not exceed the model's vocab_size ({})",
            spec.vocab_size
        ));
    }
    Ok(())
}

impl RankLayout {
    /// The layout of `tp.rank` for `spec` (checked with `check`).
    pub fn new(spec: &DecoderSpec, tp: TpRank) -> Result<Self, String> {
        check(spec, tp.world_size)?;
        if tp.rank >= tp.world_size {
            return Err(format!(
                "rank {} must be below tensor_parallel_size ({})",
                tp.rank, tp.world_size
            ));
        }
        let (r, n) = (tp.rank, tp.world_size);
        let num_heads = spec.num_heads / n;
        let (kv_head_start, num_kv_heads) = match n <= spec.num_kv_heads {
            true => {
                let part = spec.num_kv_heads / n;
                (r * part, part)
            }
            false => (r / (n / spec.num_kv_heads), 1),
        };
        let intermediate_size = spec.intermediate_size / n;
        let vocab_part = spec.vocab_size.div_ceil(n);
        let vocab_start = (r * vocab_part).min(spec.vocab_size);
        Ok(RankLayout {
            tp,
            head_start: r * num_heads,
            num_heads,
            kv_head_start,
            num_kv_heads,
            inter_start: r * intermediate_size,
            intermediate_size,
            vocab_start,
            vocab_len: vocab_part.min(spec.vocab_size - vocab_start),
            vocab_part,
        })
    }

    /// The layout of the only rank: everything.
    pub fn single(spec: &DecoderSpec) -> Self {
        RankLayout {
            tp: TpRank::SINGLE,
            head_start: 0,
            num_heads: spec.num_heads,
            kv_head_start: 0,
            num_kv_heads: spec.num_kv_heads,
            inter_start: 0,
            intermediate_size: spec.intermediate_size,
            vocab_start: 0,
            vocab_len: spec.vocab_size,
            vocab_part: spec.vocab_size,
        }
    }

    /// Whether this is the only rank (nothing is split).
    pub fn is_single(&self) -> bool {
        self.tp.world_size == 1
    }

    /// The spec this rank's forward pass runs on: its heads, KV heads and MLP width; the hidden
    /// size and the (full) vocabulary unchanged, since the residual stream is replicated and the
    /// logits are gathered. ALiBi slopes must come from the full spec (`alibi_slopes`).
    pub fn local_spec(&self, spec: &DecoderSpec) -> DecoderSpec {
        DecoderSpec {
            num_heads: self.num_heads,
            num_kv_heads: self.num_kv_heads,
            intermediate_size: self.intermediate_size,
            ..spec.clone()
        }
    }

    /// This rank's ALiBi slopes: the full model's, sliced to its heads.
    pub fn alibi_slopes(&self, spec: &DecoderSpec) -> Option<Vec<f32>> {
        spec.alibi_slopes()
            .map(|s| s[self.head_start..self.head_start + self.num_heads].to_vec())
    }

    /// The rows, in the full q | k | v layout (`[q_dim + 2 kv_dim]`), that this rank's q | k | v
    /// rows are, in order: its query heads, then its KV heads' keys, then their values.
    pub fn qkv_rows(&self, spec: &DecoderSpec) -> Vec<usize> {
        let d = spec.head_dim;
        let (q_dim, kv_dim) = (spec.q_dim(), spec.kv_dim());
        let q = self.head_start * d..(self.head_start + self.num_heads) * d;
        let kv = self.kv_head_start * d..(self.kv_head_start + self.num_kv_heads) * d;
        q.chain(kv.clone().map(|r| q_dim + r))
            .chain(kv.map(|r| q_dim + kv_dim + r))
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::presets;

    fn spec(heads: usize, kv: usize, inter: usize, vocab: usize) -> DecoderSpec {
        let mut s = presets::preset("tiny-llama").unwrap().spec;
        s.num_heads = heads;
        s.num_kv_heads = kv;
        s.intermediate_size = inter;
        s.vocab_size = vocab;
        s
    }

    #[test]
    fn heads_kv_heads_and_vocabulary_split_per_rank() {
        // 8 query heads, 2 KV heads, tp 4: KV heads replicated twice.
        let s = spec(8, 2, 64, 10);
        let layouts: Vec<_> = (0..4)
            .map(|rank| {
                RankLayout::new(
                    &s,
                    TpRank {
                        rank,
                        world_size: 4,
                    },
                )
                .unwrap()
            })
            .collect();
        let heads: Vec<_> = layouts
            .iter()
            .map(|l| (l.head_start, l.num_heads))
            .collect();
        assert_eq!(heads, [(0, 2), (2, 2), (4, 2), (6, 2)]);
        let kv: Vec<_> = layouts
            .iter()
            .map(|l| (l.kv_head_start, l.num_kv_heads))
            .collect();
        assert_eq!(kv, [(0, 1), (0, 1), (1, 1), (1, 1)]);
        // Vocabulary 10 padded to 12: 3 rows each, the last rank holds one real row.
        let vocab: Vec<_> = layouts
            .iter()
            .map(|l| (l.vocab_start, l.vocab_len))
            .collect();
        assert_eq!(vocab, [(0, 3), (3, 3), (6, 3), (9, 1)]);
        assert!(layouts.iter().all(|l| l.vocab_part == 3));
        // Each query head's KV head (h / group) is its rank's KV head.
        let group = s.num_heads / s.num_kv_heads;
        for l in &layouts {
            for h in l.head_start..l.head_start + l.num_heads {
                assert_eq!(h / group, l.kv_head_start);
            }
        }
        // tp 2 splits the 2 KV heads.
        let l = RankLayout::new(
            &s,
            TpRank {
                rank: 1,
                world_size: 2,
            },
        )
        .unwrap();
        assert_eq!((l.kv_head_start, l.num_kv_heads), (1, 1));
        assert_eq!((l.inter_start, l.intermediate_size), (32, 32));
    }

    #[test]
    fn qkv_rows_pick_the_ranks_heads() {
        // 4 heads of 2, 2 KV heads; rank 1 of 2: q heads 2, 3; KV head 1.
        let mut s = spec(4, 2, 8, 10);
        s.head_dim = 2;
        let l = RankLayout::new(
            &s,
            TpRank {
                rank: 1,
                world_size: 2,
            },
        )
        .unwrap();
        // q rows 4..8, k rows 8 + 2..4, v rows 12 + 2..4.
        assert_eq!(l.qkv_rows(&s), [4, 5, 6, 7, 10, 11, 14, 15]);
        assert_eq!(
            RankLayout::single(&s).qkv_rows(&s),
            (0..16).collect::<Vec<_>>()
        );
    }

    #[test]
    fn bad_splits_name_the_setting_the_field_and_the_values() {
        let cases = [
            (
                spec(6, 2, 64, 10),
                4,
                "must divide the model's num_heads (query heads) (6)",
            ),
            (spec(12, 6, 64, 10), 4, "num_kv_heads (6)"),
            (spec(12, 3, 64, 10), 2, "num_kv_heads (3)"),
            (spec(12, 4, 64, 10), 6, "multiple of it"),
            (spec(8, 8, 90, 10), 4, "intermediate_size (MLP width) (90)"),
            (spec(8, 8, 64, 3), 4, "vocab_size (3)"),
        ];
        for (s, tp, want) in cases {
            let err = check(&s, tp).unwrap_err();
            assert!(
                err.starts_with(&format!("tensor_parallel_size = {tp} ")) && err.contains(want),
                "tp {tp}: {err}"
            );
        }
        // 8 heads, 4 KV heads, tp 8: 8 % 4 == 0, replicated twice: fine.
        assert!(check(&spec(8, 4, 64, 10), 8).is_ok());
        assert!(check(&spec(6, 2, 64, 10), 1).is_ok());
        assert_eq!(
            check(&spec(6, 2, 64, 10), 0).unwrap_err(),
            "tensor_parallel_size must be at least 1, got 0"
        );
    }
}
