//! CPU compute kernels: the reference implementation every device kernel is checked against, and
//! the CPU engine's hot path. Shapes are given in comments; all tensors are row-major f32 slices.

pub mod activation;
pub mod attention;
pub mod norm;
pub mod quant;
pub mod rope;
