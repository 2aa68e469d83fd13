//! CPU compute kernels: the reference implementation every device kernel is checked against, and
//! the CPU engine's hot path. Shapes are given in comments; all tensors are row-major f32 slices.

pub mod activation;
pub mod attention;
pub mod fp8;
pub mod linear;
pub mod norm;
pub mod q8;
pub mod quant;
pub mod rope;

/// Errors of the CPU ops: shapes that do not fit together, named by op and operand.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// An operand's length does not match the shape the other arguments imply.
    #[error("{op}: {operand} has {actual} elements, expected {expected} for shape {shape:?}")]
    LengthMismatch {
        /// The op, e.g. `linear`.
        op: &'static str,
        /// The operand, e.g. `x` or `y`.
        operand: &'static str,
        /// The shape the operand should have.
        shape: Vec<usize>,
        /// Elements that shape holds.
        expected: usize,
        /// Elements the operand holds.
        actual: usize,
    },
    /// A tensor that must be a 2-D weight `[rows, cols]` has another rank.
    #[error("{op}: {operand} must be 2-D, got shape {shape:?}")]
    NotMatrix {
        /// The op, e.g. `Weight::from_f32`.
        op: &'static str,
        /// The operand.
        operand: &'static str,
        /// Its actual shape.
        shape: Vec<usize>,
    },
    /// A block-quantized weight's block count is not `rows * cols / 32`.
    #[error(
        "{op}: block-quantized weight [{rows}, {cols}] has {num_blocks} blocks, expected {expected} (cols must be a multiple of 32)"
    )]
    BadBlockCount {
        /// The op that checked it.
        op: &'static str,
        /// Output features of the weight.
        rows: usize,
        /// Input features of the weight.
        cols: usize,
        /// Blocks the weight holds.
        num_blocks: usize,
        /// Blocks `[rows, cols]` needs (`usize::MAX` when `cols` is not a multiple of 32).
        expected: usize,
    },
    /// An index (e.g. an embedding row) is past the end of the tensor.
    #[error("{op}: {what} {index} out of range (bound {bound})")]
    IndexOutOfRange {
        /// The op, e.g. `Weight::row_to_f32`.
        op: &'static str,
        /// What is indexed, e.g. `row`.
        what: &'static str,
        /// The index given.
        index: usize,
        /// The exclusive upper bound.
        bound: usize,
    },
}
