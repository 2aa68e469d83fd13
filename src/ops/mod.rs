//! CPU compute kernels: the reference implementation every device kernel is checked against, and
//! the CPU engine's hot path. Shapes are given in comments; all tensors are row-major f32 slices.

pub mod activation;
pub mod attention;
pub mod linear;
pub mod norm;
pub mod quant;
pub mod rope;

/// Errors of the CPU ops: shapes that do not fit together, named by op and operand.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("{op}: {operand} has {actual} elements, expected {expected} for shape {shape:?}")]
    LengthMismatch {
        op: &'static str,
        operand: &'static str,
        shape: Vec<usize>,
        expected: usize,
        actual: usize,
    },
    #[error("{op}: {operand} must be 2-D, got shape {shape:?}")]
    NotMatrix {
        op: &'static str,
        operand: &'static str,
        shape: Vec<usize>,
    },
    #[error(
        "{op}: block-quantized weight [{rows}, {cols}] has {num_blocks} blocks, expected {expected} (cols must be a multiple of 32)"
    )]
    BadBlockCount {
        op: &'static str,
        rows: usize,
        cols: usize,
        num_blocks: usize,
        expected: usize,
    },
    #[error("{op}: {what} {index} out of range (bound {bound})")]
    IndexOutOfRange {
        op: &'static str,
        what: &'static str,
        index: usize,
        bound: usize,
    },
}
