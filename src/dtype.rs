//! Element types of tensors as stored in checkpoints and as kept in memory by the engines.

use std::fmt;

/// Floating-point element type of a dense tensor (checkpoint storage, activations, KV cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DType {
    /// IEEE single precision, 4 bytes.
    F32,
    /// IEEE half precision, 2 bytes.
    F16,
    /// bfloat16 (f32's exponent, 8-bit mantissa), 2 bytes.
    BF16,
}

impl DType {
    /// Bytes one element takes in memory: 4 for `F32`, 2 for `F16` and `BF16`.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
        }
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
        })
    }
}
