//! What one rank reads of a tensor: a `Piece` is a tensor name with its full shape and the
//! `Shard` of it this rank takes; a `Cut` says how a linear is split (whole, some of its output
//! rows for a column-parallel rank, a range of its input columns for a row-parallel one).
//! FP8 scales are sliced with their codes here: per tensor replicated, per channel with the
//! output rows, per tile only where the slice falls on tile boundaries.

use std::ops::Range;

use crate::loader::Shard;
use crate::ops::fp8::Fp8Scale;

/// How this rank takes a `[rows, cols]` (out, in) linear or a `[rows]` vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Cut {
    /// All of it (one rank, or a replicated tensor).
    Whole,
    /// These output rows, concatenated in order (column-parallel).
    Rows(Vec<Range<usize>>),
    /// These input columns (row-parallel).
    Cols(Range<usize>),
}

impl Cut {
    /// The rows `r` of `total`: `Whole` when that is all of them.
    pub(super) fn rows(r: Range<usize>, total: usize) -> Cut {
        match r.start == 0 && r.end == total {
            true => Cut::Whole,
            false => Cut::Rows(vec![r]),
        }
    }

    /// The columns `r` of `total`: `Whole` when that is all of them.
    pub(super) fn cols(r: Range<usize>, total: usize) -> Cut {
        match r.start == 0 && r.end == total {
            true => Cut::Whole,
            false => Cut::Cols(r),
        }
    }

    /// The given rows (any order), as runs of consecutive rows.
    pub(super) fn row_list(rows: &[usize], total: usize) -> Cut {
        let mut runs: Vec<Range<usize>> = vec![];
        for &r in rows {
            match runs.last_mut() {
                Some(last) if last.end == r => last.end += 1,
                _ => runs.push(r..r + 1),
            }
        }
        match runs.as_slice() {
            [only] => Cut::rows(only.clone(), total),
            _ => Cut::Rows(runs),
        }
    }
}

/// One read: `name` (full shape `[rows, cols]`, out x in) sliced by `shard`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Piece {
    pub name: String,
    pub rows: usize,
    pub cols: usize,
    pub shard: Shard,
}

impl Piece {
    /// The reads of `name: [rows, cols]` that make this rank's `cut` of it, in order.
    pub(super) fn of(name: &str, rows: usize, cols: usize, cut: &Cut) -> Vec<Piece> {
        let piece = |shard| Piece {
            name: name.to_string(),
            rows,
            cols,
            shard,
        };
        match cut {
            Cut::Whole => vec![piece(Shard::Replicated)],
            Cut::Rows(runs) => runs
                .iter()
                .map(|r| {
                    piece(Shard::OutRange {
                        start: r.start,
                        len: r.len(),
                    })
                })
                .collect(),
            Cut::Cols(r) => vec![piece(Shard::InRange {
                start: r.start,
                len: r.len(),
            })],
        }
    }

    /// Output rows this read yields.
    pub(super) fn local_rows(&self) -> usize {
        match self.shard {
            Shard::OutRange { len, .. } => len,
            Shard::Column { world_size, .. } => self.rows / world_size.max(1),
            _ => self.rows,
        }
    }

    /// Input columns this read yields.
    pub(super) fn local_cols(&self) -> usize {
        match self.shard {
            Shard::InRange { len, .. } => len,
            Shard::Row { world_size, .. } => self.cols / world_size.max(1),
            _ => self.cols,
        }
    }

    /// (first row, rows) and (first column, columns) of the full tensor this read takes.
    fn window(&self) -> (Range<usize>, Range<usize>) {
        let (rs, cs) = (self.rows, self.cols);
        match self.shard {
            Shard::Replicated => (0..rs, 0..cs),
            Shard::OutRange { start, len } => (start..start + len, 0..cs),
            Shard::InRange { start, len } => (0..rs, start..start + len),
            Shard::Column { rank, world_size } => {
                let p = rs / world_size.max(1);
                (rank * p..(rank + 1) * p, 0..cs)
            }
            Shard::Row { rank, world_size } => {
                let p = cs / world_size.max(1);
                (0..rs, rank * p..(rank + 1) * p)
            }
        }
    }

    /// The scales of this read's codes, given the full tensor's: per tensor as they are, per
    /// channel the read's rows, per tile the read's tiles when it starts and ends on tile
    /// boundaries (or at the tensor's end); the error says where it does not.
    pub(super) fn slice_scale(&self, full: &Fp8Scale) -> Result<Fp8Scale, String> {
        let (rows, cols) = self.window();
        Ok(match full {
            Fp8Scale::Tensor(s) => Fp8Scale::Tensor(*s),
            Fp8Scale::Channel(s) => {
                Fp8Scale::Channel(s.get(rows.clone()).map(<[f32]>::to_vec).ok_or_else(|| {
                    format!("{} per-channel scales, rows {rows:?} asked", s.len())
                })?)
            }
            Fp8Scale::Block { block, scales } => {
                let (br, bc) = *block;
                let aligned = |r: &Range<usize>, b: usize, total: usize| {
                    r.start.is_multiple_of(b) && (r.end.is_multiple_of(b) || r.end == total)
                };
                if !aligned(&rows, br, self.rows) || !aligned(&cols, bc, self.cols) {
                    return Err(format!(
                        "FP8 block scales of {br}x{bc} tiles: this rank's slice (rows {rows:?}, \
                         columns {cols:?} of [{}, {}]) does not fall on tile boundaries; choose a \
                         tensor_parallel_size that splits the weight into whole tiles",
                        self.rows, self.cols
                    ));
                }
                let grid_cols = self.cols.div_ceil(bc);
                let (tr, tc) = (
                    rows.start / br..rows.end.div_ceil(br),
                    cols.start / bc..cols.end.div_ceil(bc),
                );
                let mut out = Vec::with_capacity(tr.len() * tc.len());
                for t in tr {
                    let row = scales
                        .get(t * grid_cols + tc.start..t * grid_cols + tc.end)
                        .ok_or_else(|| {
                            format!("{} block scales, tile row {t} asked", scales.len())
                        })?;
                    out.extend_from_slice(row);
                }
                Fp8Scale::Block {
                    block: *block,
                    scales: out,
                }
            }
        })
    }
}

/// `t: [a, b]` row-major, transposed: `[b, a]`.
pub(super) fn transpose(t: &[f32], a: usize, b: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; a * b];
    for (i, src_row) in t.chunks_exact(b).enumerate() {
        for (j, &v) in src_row.iter().enumerate() {
            out[j * a + i] = v;
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn row_lists_become_runs() {
        assert_eq!(Cut::row_list(&[0, 1, 2, 3], 4), Cut::Whole);
        assert_eq!(Cut::row_list(&[2, 3], 4), Cut::rows(2..4, 4));
        assert!(matches!(Cut::rows(2..4, 4), Cut::Rows(r) if r.len() == 1));
        assert_eq!(
            Cut::row_list(&[4, 5, 0, 1, 9], 10),
            Cut::Rows(vec![4..6, 0..2, 9..10])
        );
        assert_eq!(Cut::cols(0..8, 8), Cut::Whole);
        assert_eq!(Cut::cols(4..8, 8), Cut::Cols(4..8));
        let p = Piece::of("w", 10, 6, &Cut::Rows(vec![4..6, 0..2]));
        assert_eq!(p.len(), 2);
        assert_eq!((p[0].local_rows(), p[0].local_cols()), (2, 6));
    }

    #[test]
    fn scales_follow_their_rows_and_tiles() {
        let piece = |shard| Piece {
            name: "w".into(),
            rows: 4,
            cols: 6,
            shard,
        };
        let rows = piece(Shard::OutRange { start: 2, len: 2 });
        let cols = piece(Shard::InRange { start: 4, len: 2 });
        assert_eq!(
            rows.slice_scale(&Fp8Scale::Tensor(0.5)).unwrap(),
            Fp8Scale::Tensor(0.5)
        );
        let ch = Fp8Scale::Channel(vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            rows.slice_scale(&ch).unwrap(),
            Fp8Scale::Channel(vec![3.0, 4.0])
        );
        assert_eq!(cols.slice_scale(&ch).unwrap(), ch);
        // 2x2 tiles: grid [2, 3], value = tile index.
        let block = Fp8Scale::Block {
            block: (2, 2),
            scales: (0..6).map(|v| v as f32).collect(),
        };
        assert_eq!(
            rows.slice_scale(&block).unwrap(),
            Fp8Scale::Block {
                block: (2, 2),
                scales: vec![3.0, 4.0, 5.0]
            }
        );
        assert_eq!(
            cols.slice_scale(&block).unwrap(),
            Fp8Scale::Block {
                block: (2, 2),
                scales: vec![2.0, 5.0]
            }
        );
        let err = piece(Shard::OutRange { start: 1, len: 2 })
            .slice_scale(&block)
            .unwrap_err();
        assert!(err.contains("tile boundaries"), "{err}");
    }

    #[test]
    fn transpose_swaps_the_dims() {
        assert_eq!(
            transpose(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3),
            [1.0, 4.0, 2.0, 5.0, 3.0, 6.0]
        );
    }
}
