//! Tensor-parallel slicing shared by every `TensorSource`: turns a full shape and a `Shard` into
//! the output shape and the runs of contiguous elements (of the full, row-major tensor) to read.
//!
//! It only does index arithmetic; it never reads tensor data and never panics on a bad shard
//! (rank out of range, dimension not divisible): those become `LoadError::BadShard`.

use std::path::Path;

use super::{LoadError, Shard};

/// A run of `len` contiguous elements starting at element `start` of the full tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Run {
    pub start: usize,
    pub len: usize,
}

/// What a shard reads: its shape, and the runs whose concatenation is its row-major data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShardPlan {
    pub shape: Vec<usize>,
    pub runs: Vec<Run>,
}

impl ShardPlan {
    pub fn numel(&self) -> usize {
        self.runs.iter().map(|r| r.len).sum()
    }
}

/// Plans the read of `shard` from a tensor of `shape` (PyTorch order; a shape whose element count
/// does not fit `usize` is a `BadShard`, though the loaders refuse one at open).
///
/// `Column` splits dim 0 (one contiguous run); `Row` splits the last dim (one run per row) and
/// leaves 0-D and 1-D tensors whole. The partial products (elements per index of dim 0, rows)
/// are quotients of the element count, never products of their own: with a zero dimension the
/// count is 0 while the other dimensions' product may overflow (`[0, 2^40, 2^40]`).
pub(crate) fn plan_shard(
    path: &Path,
    tensor: &str,
    shape: &[usize],
    shard: Shard,
) -> Result<ShardPlan, LoadError> {
    let bad = || LoadError::BadShard {
        path: path.to_path_buf(),
        tensor: tensor.to_string(),
        shape: shape.to_vec(),
        shard,
    };
    let numel = shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .ok_or_else(bad)?;
    let whole = || ShardPlan {
        shape: shape.to_vec(),
        runs: vec![Run {
            start: 0,
            len: numel,
        }],
    };
    let split = |dim: usize, rank: usize, world_size: usize| -> Result<(usize, usize), LoadError> {
        if world_size == 0 || rank >= world_size || !dim.is_multiple_of(world_size) {
            return Err(bad());
        }
        let part = dim / world_size;
        Ok((rank * part, part))
    };
    let range = |dim: usize, start: usize, len: usize| -> Result<(usize, usize), LoadError> {
        match start.checked_add(len) {
            Some(end) if end <= dim => Ok((start, len)),
            _ => Err(bad()),
        }
    };
    let columns = |first: usize, part: usize| -> Result<ShardPlan, LoadError> {
        let last = shape.len().checked_sub(1).ok_or_else(bad)?;
        let cols = shape[last];
        // cols > 0 when part < cols (a split of a 0-wide dim is the whole, empty tensor).
        let num_rows = numel.checked_div(cols).unwrap_or(0);
        let mut out_shape = shape.to_vec();
        out_shape[last] = part;
        let runs = if part == cols {
            vec![Run {
                start: 0,
                len: numel,
            }]
        } else {
            (0..num_rows)
                .map(|row_idx| Run {
                    start: row_idx * cols + first,
                    len: part,
                })
                .collect()
        };
        Ok(ShardPlan {
            shape: out_shape,
            runs,
        })
    };
    let rows = |first: usize, part: usize| -> ShardPlan {
        // Elements per index of dim 0 (none to read when dim 0 is 0).
        let inner = numel.checked_div(shape[0]).unwrap_or(0);
        let mut out_shape = shape.to_vec();
        out_shape[0] = part;
        ShardPlan {
            shape: out_shape,
            runs: vec![Run {
                start: first * inner,
                len: part * inner,
            }],
        }
    };
    match shard {
        Shard::Replicated => Ok(whole()),
        Shard::OutRange { start, len } => {
            let &dim0 = shape.first().ok_or_else(bad)?;
            let (first, part) = range(dim0, start, len)?;
            Ok(rows(first, part))
        }
        Shard::InRange { start, len } => {
            let &cols = shape.last().ok_or_else(bad)?;
            let (first, part) = range(cols, start, len)?;
            columns(first, part)
        }
        Shard::Column { rank, world_size } => {
            let Some(&dim0) = shape.first() else {
                return Err(bad());
            };
            let (first, part) = split(dim0, rank, world_size)?;
            Ok(rows(first, part))
        }
        Shard::Row { rank, world_size } => {
            if shape.len() < 2 {
                // A bias is not split along the input dimension; validate the shard anyway.
                split(0, rank, world_size)?;
                return Ok(whole());
            }
            let cols = shape[shape.len() - 1];
            let (first, part) = split(cols, rank, world_size)?;
            columns(first, part)
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn gather(shape: &[usize], shard: Shard) -> Result<(Vec<usize>, Vec<usize>), LoadError> {
        let plan = plan_shard(Path::new("t"), "w", shape, shard)?;
        let data: Vec<usize> = plan
            .runs
            .iter()
            .flat_map(|r| r.start..r.start + r.len)
            .collect();
        assert_eq!(data.len(), plan.numel());
        assert_eq!(plan.shape.iter().product::<usize>(), plan.numel());
        Ok((plan.shape, data))
    }

    #[test]
    fn column_splits_dim0_row_splits_last_dim() {
        // w: [4, 6], element value = its flat index.
        let (s, d) = gather(
            &[4, 6],
            Shard::Column {
                rank: 1,
                world_size: 2,
            },
        )
        .unwrap();
        assert_eq!(s, vec![2, 6]);
        assert_eq!(d, (12..24).collect::<Vec<_>>());
        let (s, d) = gather(
            &[4, 6],
            Shard::Row {
                rank: 2,
                world_size: 3,
            },
        )
        .unwrap();
        assert_eq!(s, vec![4, 2]);
        assert_eq!(d, vec![4, 5, 10, 11, 16, 17, 22, 23]);
        let (s, d) = gather(
            &[6],
            Shard::Column {
                rank: 2,
                world_size: 3,
            },
        )
        .unwrap();
        assert_eq!((s, d), (vec![2], vec![4, 5]));
        // A 1-D tensor is not split by Row.
        let (s, d) = gather(
            &[6],
            Shard::Row {
                rank: 1,
                world_size: 4,
            },
        )
        .unwrap();
        assert_eq!((s, d), (vec![6], (0..6).collect()));
        let (s, d) = gather(&[2, 3], Shard::Replicated).unwrap();
        assert_eq!((s, d), (vec![2, 3], (0..6).collect()));
        // 3-D: Row splits the last dim of every row.
        let (s, d) = gather(
            &[2, 2, 4],
            Shard::Row {
                rank: 1,
                world_size: 2,
            },
        )
        .unwrap();
        assert_eq!(s, vec![2, 2, 2]);
        assert_eq!(d, vec![2, 3, 6, 7, 10, 11, 14, 15]);
    }

    #[test]
    fn ranges_take_any_slice_of_the_first_or_last_dim() {
        // w: [4, 6]: rows 1..3, then columns 2..5.
        let (s, d) = gather(&[4, 6], Shard::OutRange { start: 1, len: 2 }).unwrap();
        assert_eq!((s, d), (vec![2, 6], (6..18).collect()));
        let (s, d) = gather(&[4, 6], Shard::InRange { start: 2, len: 3 }).unwrap();
        assert_eq!(s, vec![4, 3]);
        assert_eq!(d, vec![2, 3, 4, 8, 9, 10, 14, 15, 16, 20, 21, 22]);
        // A 1-D tensor (a bias) is sliced by either.
        let (s, d) = gather(&[6], Shard::InRange { start: 4, len: 2 }).unwrap();
        assert_eq!((s, d), (vec![2], vec![4, 5]));
        let (s, d) = gather(&[6], Shard::OutRange { start: 0, len: 0 }).unwrap();
        assert_eq!((s, d), (vec![0], vec![]));
        for shard in [
            Shard::OutRange { start: 3, len: 2 },
            Shard::InRange { start: 5, len: 2 },
            Shard::OutRange {
                start: usize::MAX,
                len: 2,
            },
        ] {
            assert!(
                matches!(gather(&[4, 6], shard), Err(LoadError::BadShard { .. })),
                "{shard:?}"
            );
        }
        assert!(gather(&[], Shard::InRange { start: 0, len: 0 }).is_err());
    }

    #[test]
    fn zero_sized_tensors_with_huge_dims_plan_without_overflow() {
        // Found by the GGUF fuzz target (fuzz/corpus/gguf/crash-zero-dim-shard): [0, 2^40, 2^40]
        // has 0 elements, so the loaders accept it, but the product of its last two dimensions
        // (a Column split's elements per row) overflowed.
        let huge = 1usize << 40;
        for shape in [
            vec![0, huge, huge],
            vec![huge, huge, 0],
            vec![huge, 0, huge, 4],
        ] {
            for shard in [
                Shard::Replicated,
                Shard::Column {
                    rank: 0,
                    world_size: 2,
                },
                Shard::Row {
                    rank: 1,
                    world_size: 2,
                },
            ] {
                match gather(&shape, shard) {
                    Ok((_, data)) => assert!(data.is_empty(), "{shape:?} {shard:?}"),
                    // A dimension the world size does not divide.
                    Err(e) => assert!(matches!(e, LoadError::BadShard { .. }), "{e}"),
                }
            }
        }
        // A shape whose element count overflows is refused, whatever the split.
        let err = gather(&[huge, huge], Shard::Replicated).unwrap_err();
        assert!(matches!(err, LoadError::BadShard { .. }), "{err}");
    }

    #[test]
    fn bad_shards_are_errors() {
        for shard in [
            Shard::Column {
                rank: 0,
                world_size: 3,
            },
            Shard::Column {
                rank: 2,
                world_size: 2,
            },
            Shard::Column {
                rank: 0,
                world_size: 0,
            },
            Shard::Row {
                rank: 0,
                world_size: 4,
            },
            Shard::Row {
                rank: 5,
                world_size: 2,
            },
        ] {
            let err = gather(&[4, 6], shard).unwrap_err();
            assert!(
                matches!(err, LoadError::BadShard { .. }),
                "{shard:?}: {err}"
            );
            assert!(err.to_string().contains("'w'"), "{err}");
        }
        assert!(
            gather(
                &[],
                Shard::Column {
                    rank: 0,
                    world_size: 1
                }
            )
            .is_err()
        );
        assert!(
            gather(
                &[6],
                Shard::Row {
                    rank: 4,
                    world_size: 4
                }
            )
            .is_err()
        );
    }
}
