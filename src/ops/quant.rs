//! The compact weight format of the CPU engine.
//!
//! `BlockQ8` holds 32 consecutive weights of one row as `w[i] = scale * qs[i] + min`. With
//! `min = 0` it is a symmetric 8-bit quantization (what f32/f16 weights are compressed to); with a
//! per-block minimum it represents GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and the 32-wide sub-blocks
//! of Q4_K/Q5_K exactly, so a quantized GGUF model keeps its exact weights at 1.25 bytes/weight.

/// Number of weights per block.
pub const QK: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq)]
#[repr(C)]
pub struct BlockQ8 {
    pub scale: f32,
    pub min: f32,
    pub qs: [i8; QK],
}
