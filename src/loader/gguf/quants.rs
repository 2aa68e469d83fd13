//! GGML tensor types and their dequantization: `GgmlType` (the id table: name, block size,
//! bytes per block), `dequantize` to f32 and `convert_to_q8` (exact re-blocking into ferrum's
//! `BlockQ8`). Pure functions over byte slices: no file, no I/O; callers (`file.rs`) add the file
//! and tensor to errors. Block formats follow the ggml reference dequantization (`ggml-quants.c`)
//! exactly, operation for operation, so results are bit-identical to llama.cpp's CPU reference.
//! Must never panic on a byte slice whose length `check_len` accepted.

use std::fmt;

use half::{bf16, f16};

use crate::tensor::{BlockQ8, QK};

/// Elements per K-quant super-block.
const QK_K: usize = 256;

/// GGML tensor type ids, as written in GGUF tensor infos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GgmlType(pub u32);

/// (id, name, elements per block, bytes per block) of every type id ggml has assigned.
const TYPE_TABLE: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

impl GgmlType {
    /// ggml type 0, 32-bit float; 4 bytes per element.
    pub const F32: Self = Self(0);
    /// ggml type 1, IEEE half; 2 bytes per element.
    pub const F16: Self = Self(1);
    /// ggml type 2, 4-bit, one f16 scale per block: `y = (q - 8) * d`; 32 elements in 18 bytes.
    pub const Q4_0: Self = Self(2);
    /// ggml type 3, 4-bit with an f16 scale and minimum per block: `y = q * d + m`; 32 elements in
    /// 20 bytes.
    pub const Q4_1: Self = Self(3);
    /// ggml type 6, 5-bit, one f16 scale per block: `y = (q - 16) * d`; 32 elements in 22 bytes.
    pub const Q5_0: Self = Self(6);
    /// ggml type 7, 5-bit with an f16 scale and minimum per block: `y = q * d + m`; 32 elements in
    /// 24 bytes.
    pub const Q5_1: Self = Self(7);
    /// ggml type 8, 8-bit, one f16 scale per block: `y = q * d`; 32 elements in 34 bytes.
    pub const Q8_0: Self = Self(8);
    /// ggml type 9, 8-bit with scale and block sum (ggml's activation format; not read here); 32
    /// elements in 36 bytes.
    pub const Q8_1: Self = Self(9);
    /// ggml type 10, 2-bit K-quant: 16 sub-blocks of 16 with 4-bit scales and minimums; 256
    /// elements in 84 bytes.
    pub const Q2_K: Self = Self(10);
    /// ggml type 11, 3-bit K-quant: 16 sub-blocks of 16 with 6-bit scales; 256 elements in 110
    /// bytes.
    pub const Q3_K: Self = Self(11);
    /// ggml type 12, 4-bit K-quant: 8 sub-blocks of 32 with 6-bit scales and minimums; 256 elements
    /// in 144 bytes.
    pub const Q4_K: Self = Self(12);
    /// ggml type 13, 5-bit K-quant: 8 sub-blocks of 32 with 6-bit scales and minimums; 256 elements
    /// in 176 bytes.
    pub const Q5_K: Self = Self(13);
    /// ggml type 14, 6-bit K-quant: 16 sub-blocks of 16 with 8-bit scales; 256 elements in 210
    /// bytes.
    pub const Q6_K: Self = Self(14);
    /// ggml type 15, 8-bit K-quant with an f32 scale and block sums; 256 elements in 292 bytes.
    pub const Q8_K: Self = Self(15);
    /// ggml type 16, 2-bit importance quant (not read here); 256 elements in 66 bytes.
    pub const IQ2_XXS: Self = Self(16);
    /// ggml type 17, 2-bit importance quant (not read here); 256 elements in 74 bytes.
    pub const IQ2_XS: Self = Self(17);
    /// ggml type 18, 3-bit importance quant (not read here); 256 elements in 98 bytes.
    pub const IQ3_XXS: Self = Self(18);
    /// ggml type 19, 1.5-bit importance quant (not read here); 256 elements in 50 bytes.
    pub const IQ1_S: Self = Self(19);
    /// ggml type 20, 4-bit non-linear quant (not read here); 32 elements in 18 bytes.
    pub const IQ4_NL: Self = Self(20);
    /// ggml type 21, 3-bit importance quant (not read here); 256 elements in 110 bytes.
    pub const IQ3_S: Self = Self(21);
    /// ggml type 22, 2-bit importance quant (not read here); 256 elements in 82 bytes.
    pub const IQ2_S: Self = Self(22);
    /// ggml type 23, 4-bit non-linear importance quant (not read here); 256 elements in 136 bytes.
    pub const IQ4_XS: Self = Self(23);
    /// ggml type 24, 8-bit integer (not read here); 1 byte per element.
    pub const I8: Self = Self(24);
    /// ggml type 25, 16-bit integer (not read here); 2 bytes per element.
    pub const I16: Self = Self(25);
    /// ggml type 26, 32-bit integer (not read here); 4 bytes per element.
    pub const I32: Self = Self(26);
    /// ggml type 27, 64-bit integer (not read here); 8 bytes per element.
    pub const I64: Self = Self(27);
    /// ggml type 28, 64-bit float (not read here); 8 bytes per element.
    pub const F64: Self = Self(28);
    /// ggml type 29, 1.75-bit importance quant (not read here); 256 elements in 56 bytes.
    pub const IQ1_M: Self = Self(29);
    /// ggml type 30, bfloat16; 2 bytes per element.
    pub const BF16: Self = Self(30);
    /// ggml type 34, ternary quant, BitNet-style (not read here); 256 elements in 54 bytes.
    pub const TQ1_0: Self = Self(34);
    /// ggml type 35, ternary quant, BitNet-style (not read here); 256 elements in 66 bytes.
    pub const TQ2_0: Self = Self(35);
    /// ggml type 39, microscaling fp4 (not read here); 32 elements in 17 bytes.
    pub const MXFP4: Self = Self(39);

    /// Types `dequantize` handles.
    pub const DEQUANTIZABLE: &[GgmlType] = &[
        Self::F32,
        Self::F16,
        Self::BF16,
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q2_K,
        Self::Q3_K,
        Self::Q4_K,
        Self::Q5_K,
        Self::Q6_K,
        Self::Q8_K,
    ];

    /// Types `convert_to_q8` converts exactly.
    pub const Q8_CONVERTIBLE: &[GgmlType] = &[
        Self::Q4_0,
        Self::Q4_1,
        Self::Q5_0,
        Self::Q5_1,
        Self::Q8_0,
        Self::Q4_K,
        Self::Q5_K,
    ];

    fn entry(self) -> Option<&'static (u32, &'static str, usize, usize)> {
        TYPE_TABLE.iter().find(|e| e.0 == self.0)
    }

    /// ggml's name for the type (`"Q4_K"`), `None` for an unassigned id.
    pub fn name(self) -> Option<&'static str> {
        self.entry().map(|e| e.1)
    }

    /// Elements per block (1 for plain types).
    pub fn block_size(self) -> Option<usize> {
        self.entry().map(|e| e.2)
    }

    /// Bytes per block.
    pub fn type_size(self) -> Option<usize> {
        self.entry().map(|e| e.3)
    }

    /// Whether `dequantize` reads this type (listed in `DEQUANTIZABLE`).
    pub fn is_dequantizable(self) -> bool {
        Self::DEQUANTIZABLE.contains(&self)
    }

    /// Whether `convert_to_q8` re-blocks this type into `BlockQ8` without loss (`Q8_CONVERTIBLE`).
    pub fn converts_to_q8(self) -> bool {
        Self::Q8_CONVERTIBLE.contains(&self)
    }

    /// Bytes taken by `num_elems` elements; `None` for an unknown type, a count that is not a
    /// whole number of blocks, or overflow.
    pub fn bytes_for(self, num_elems: usize) -> Option<usize> {
        let (_, _, block_size, type_size) = *self.entry()?;
        if !num_elems.is_multiple_of(block_size) {
            return None;
        }
        (num_elems / block_size).checked_mul(type_size)
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => f.write_str(name),
            None => write!(f, "unknown ggml type {}", self.0),
        }
    }
}

/// Errors of `dequantize` / `convert_to_q8` (callers add the file and tensor).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    /// The type has no dequantization (or no exact `BlockQ8` conversion, for `convert_to_q8`).
    #[error("type {0} is not supported")]
    Unsupported(GgmlType),
    /// The byte or element count does not fit the type's block layout.
    #[error(
        "{num_bytes} bytes of {ty} do not hold {num_elems} values (blocks of {block_size} values, {type_size} bytes)"
    )]
    Length {
        /// The tensor's type.
        ty: GgmlType,
        /// Bytes given.
        num_bytes: usize,
        /// Elements asked for.
        num_elems: usize,
        /// Elements per block of `ty`.
        block_size: usize,
        /// Bytes per block of `ty`.
        type_size: usize,
    },
}

fn f16_at(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn check_len(
    ty: GgmlType,
    num_bytes: usize,
    num_elems: usize,
) -> Result<(usize, usize), DequantError> {
    let (Some(block_size), Some(type_size)) = (ty.block_size(), ty.type_size()) else {
        return Err(DequantError::Unsupported(ty));
    };
    if !num_elems.is_multiple_of(block_size) || num_elems / block_size * type_size != num_bytes {
        return Err(DequantError::Length {
            ty,
            num_bytes,
            num_elems,
            block_size,
            type_size,
        });
    }
    Ok((block_size, type_size))
}

/// Dequantizes `bytes` (a whole number of `ty` blocks) into `out` (`block_size` values per block).
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantError> {
    if !ty.is_dequantizable() {
        return Err(DequantError::Unsupported(ty));
    }
    let (block_size, type_size) = check_len(ty, bytes.len(), out.len())?;
    let blocks = bytes
        .chunks_exact(type_size)
        .zip(out.chunks_exact_mut(block_size));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, y)| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, y)| y[0] = f16_at(b, 0)),
        GgmlType::BF16 => {
            blocks.for_each(|(b, y)| y[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q4_0 => blocks.for_each(|(b, y)| dequant_q4_0(b, y)),
        GgmlType::Q4_1 => blocks.for_each(|(b, y)| dequant_q4_1(b, y)),
        GgmlType::Q5_0 => blocks.for_each(|(b, y)| dequant_q5_0(b, y)),
        GgmlType::Q5_1 => blocks.for_each(|(b, y)| dequant_q5_1(b, y)),
        GgmlType::Q8_0 => blocks.for_each(|(b, y)| dequant_q8_0(b, y)),
        GgmlType::Q2_K => blocks.for_each(|(b, y)| dequant_q2_k(b, y)),
        GgmlType::Q3_K => blocks.for_each(|(b, y)| dequant_q3_k(b, y)),
        GgmlType::Q4_K => blocks.for_each(|(b, y)| dequant_q4_k(b, y)),
        GgmlType::Q5_K => blocks.for_each(|(b, y)| dequant_q5_k(b, y)),
        GgmlType::Q6_K => blocks.for_each(|(b, y)| dequant_q6_k(b, y)),
        GgmlType::Q8_K => blocks.for_each(|(b, y)| dequant_q8_k(b, y)),
        other => return Err(DequantError::Unsupported(other)),
    }
    Ok(())
}

/// Converts `bytes` (whole `ty` blocks) exactly into `BlockQ8`s of 32 values: for every element,
/// `scale * qs + min` equals what `dequantize` produces. `ty` must be in `Q8_CONVERTIBLE`.
pub fn convert_to_q8(ty: GgmlType, bytes: &[u8], out: &mut [BlockQ8]) -> Result<(), DequantError> {
    if !ty.converts_to_q8() {
        return Err(DequantError::Unsupported(ty));
    }
    let num_elems = out.len().saturating_mul(QK);
    let (block_size, type_size) = check_len(ty, bytes.len(), num_elems)?;
    let blocks = bytes
        .chunks_exact(type_size)
        .zip(out.chunks_exact_mut(block_size / QK));
    match ty {
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| q8_from_q4_0(b, &mut o[0])),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| q8_from_q4_1(b, &mut o[0])),
        GgmlType::Q5_0 => blocks.for_each(|(b, o)| q8_from_q5_0(b, &mut o[0])),
        GgmlType::Q5_1 => blocks.for_each(|(b, o)| q8_from_q5_1(b, &mut o[0])),
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| q8_from_q8_0(b, &mut o[0])),
        GgmlType::Q4_K => blocks.for_each(|(b, o)| q8_from_q4_k(b, o)),
        GgmlType::Q5_K => blocks.for_each(|(b, o)| q8_from_q5_k(b, o)),
        other => return Err(DequantError::Unsupported(other)),
    }
    Ok(())
}

// block_q4_0 { f16 d; u8 qs[16] }: y[j] = (lo(qs[j]) - 8) * d, y[j + 16] = (hi(qs[j]) - 8) * d.
fn q4_0_quants(b: &[u8]) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        q[j] = (b[2 + j] & 0x0f) as i8 - 8;
        q[j + 16] = (b[2 + j] >> 4) as i8 - 8;
    }
    q
}

fn dequant_q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, q) in y.iter_mut().zip(q4_0_quants(b)) {
        *y = f32::from(q) * d;
    }
}

fn q8_from_q4_0(b: &[u8], o: &mut BlockQ8) {
    *o = BlockQ8 {
        scale: f16_at(b, 0),
        min: 0.0,
        qs: q4_0_quants(b),
    };
}

// block_q4_1 { f16 d; f16 m; u8 qs[16] }: y = q * d + m.
fn q4_1_quants(b: &[u8]) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        q[j] = (b[4 + j] & 0x0f) as i8;
        q[j + 16] = (b[4 + j] >> 4) as i8;
    }
    q
}

fn dequant_q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (y, q) in y.iter_mut().zip(q4_1_quants(b)) {
        *y = f32::from(q) * d + m;
    }
}

fn q8_from_q4_1(b: &[u8], o: &mut BlockQ8) {
    *o = BlockQ8 {
        scale: f16_at(b, 0),
        min: f16_at(b, 2),
        qs: q4_1_quants(b),
    };
}

// 5-bit quants: low 4 bits in qs (nibbles as Q4), bit 4 of element j in bit j of the u32 qh.
fn q5_quants(qh: u32, qs: &[u8], offset: i8) -> [i8; 32] {
    let mut q = [0i8; 32];
    for j in 0..16 {
        let h0 = (((qh >> j) << 4) & 0x10) as u8;
        let h1 = ((qh >> (j + 12)) & 0x10) as u8;
        q[j] = ((qs[j] & 0x0f) | h0) as i8 - offset;
        q[j + 16] = ((qs[j] >> 4) | h1) as i8 - offset;
    }
    q
}

// block_q5_0 { f16 d; u8 qh[4]; u8 qs[16] }: y = (q - 16) * d.
fn q5_0_quants(b: &[u8]) -> [i8; 32] {
    q5_quants(u32::from_le_bytes([b[2], b[3], b[4], b[5]]), &b[6..22], 16)
}

fn dequant_q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, q) in y.iter_mut().zip(q5_0_quants(b)) {
        *y = f32::from(q) * d;
    }
}

fn q8_from_q5_0(b: &[u8], o: &mut BlockQ8) {
    *o = BlockQ8 {
        scale: f16_at(b, 0),
        min: 0.0,
        qs: q5_0_quants(b),
    };
}

// block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16] }: y = q * d + m.
fn q5_1_quants(b: &[u8]) -> [i8; 32] {
    q5_quants(u32::from_le_bytes([b[4], b[5], b[6], b[7]]), &b[8..24], 0)
}

fn dequant_q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    for (y, q) in y.iter_mut().zip(q5_1_quants(b)) {
        *y = f32::from(q) * d + m;
    }
}

fn q8_from_q5_1(b: &[u8], o: &mut BlockQ8) {
    *o = BlockQ8 {
        scale: f16_at(b, 0),
        min: f16_at(b, 2),
        qs: q5_1_quants(b),
    };
}

// block_q8_0 { f16 d; i8 qs[32] }: y = q * d.
fn q8_0_quants(b: &[u8]) -> [i8; 32] {
    let mut q = [0i8; 32];
    for (q, &x) in q.iter_mut().zip(&b[2..34]) {
        *q = x as i8;
    }
    q
}

fn dequant_q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    for (y, q) in y.iter_mut().zip(q8_0_quants(b)) {
        *y = f32::from(q) * d;
    }
}

fn q8_from_q8_0(b: &[u8], o: &mut BlockQ8) {
    *o = BlockQ8 {
        scale: f16_at(b, 0),
        min: 0.0,
        qs: q8_0_quants(b),
    };
}

// block_q2_K { u8 scales[16]; u8 qs[64]; f16 d; f16 dmin } (256 values): value e uses
// scales[e / 16] (low nibble: scale, high nibble: min) and 2 bits of qs.
fn dequant_q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, min) = (f16_at(b, 80), f16_at(b, 82));
    let mut out_idx = 0;
    let mut scale_idx = 0;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for group in 0..2 {
                let sc = scales[scale_idx];
                scale_idx += 1;
                let dl = d * f32::from(sc & 0x0f);
                let ml = min * f32::from(sc >> 4);
                for l in 0..16 {
                    y[out_idx] = dl * f32::from((q[l + 16 * group] >> shift) & 3) - ml;
                    out_idx += 1;
                }
            }
        }
    }
}

/// The 16 signed 6-bit scales of a Q3_K block (stored minus 32) from their 12 packed bytes:
/// scale i has its low 4 bits in nibble i / 8 of byte i % 8 and its high 2 bits at bit
/// 2 * (i / 4) of byte 8 + i % 4.
fn q3_k_scales(packed: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, s) in out.iter_mut().enumerate() {
        let low = (packed[i % 8] >> (4 * (i / 8))) & 0x0f;
        let high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
        *s = (low | (high << 4)) as i8 - 32;
    }
    out
}

// block_q3_K { u8 hmask[32]; u8 qs[64]; u8 scales[12]; f16 d } (256 values).
fn dequant_q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d_all = f16_at(b, 108);
    let mut out_idx = 0;
    let mut scale_idx = 0;
    let mut m = 1u8;
    for half in 0..2 {
        let q = &qs[32 * half..32 * half + 32];
        for j in 0..4 {
            let shift = 2 * j;
            for group in 0..2 {
                let dl = d_all * f32::from(scales[scale_idx]);
                scale_idx += 1;
                for l in 0..16 {
                    let k = l + 16 * group;
                    let low = ((q[k] >> shift) & 3) as i8;
                    let q3 = low - if hmask[k] & m != 0 { 0 } else { 4 };
                    y[out_idx] = dl * f32::from(q3);
                    out_idx += 1;
                }
            }
            m <<= 1;
        }
    }
}

/// Scale and min (6 bits each) of sub-block `j` (0..8) of a Q4_K/Q5_K block (`get_scale_min_k4`).
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// The 8 (scale, min) pairs of a Q4_K/Q5_K super-block as f32, computed as the reference does.
fn k4_sub_scales(b: &[u8]) -> [(f32, f32); 8] {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let mut out = [(0.0, 0.0); 8];
    for (j, o) in out.iter_mut().enumerate() {
        let (sc, m) = scale_min_k4(j, &b[4..16]);
        *o = (d * f32::from(sc), dmin * f32::from(m));
    }
    out
}

/// Quants of a Q4_K (no `qh`) or Q5_K super-block, in value order: chunk c of 64 values uses
/// qs[32c..32c + 32], low nibbles first; Q5_K adds bit (2c or 2c + 1) of qh[l] as the fifth bit.
fn k_quants(qs: &[u8], qh: Option<&[u8]>) -> [u8; QK_K] {
    let mut q = [0u8; QK_K];
    for chunk in 0..4 {
        for l in 0..32 {
            let byte = qs[32 * chunk + l];
            let (mut lo, mut hi) = (byte & 0x0f, byte >> 4);
            if let Some(qh) = qh {
                lo += ((qh[l] >> (2 * chunk)) & 1) << 4;
                hi += ((qh[l] >> (2 * chunk + 1)) & 1) << 4;
            }
            q[64 * chunk + l] = lo;
            q[64 * chunk + 32 + l] = hi;
        }
    }
    q
}

// block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128] }: y = (d * sc) * q - (dmin * m).
fn dequant_q4_k(b: &[u8], y: &mut [f32]) {
    dequant_k4_like(&k4_sub_scales(b), &k_quants(&b[16..144], None), y);
}

// block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128] }.
fn dequant_q5_k(b: &[u8], y: &mut [f32]) {
    dequant_k4_like(
        &k4_sub_scales(b),
        &k_quants(&b[48..176], Some(&b[16..48])),
        y,
    );
}

fn dequant_k4_like(sub: &[(f32, f32); 8], q: &[u8; QK_K], y: &mut [f32]) {
    for (sub_idx, (y, q)) in y.chunks_exact_mut(QK).zip(q.chunks_exact(QK)).enumerate() {
        let (dl, ml) = sub[sub_idx];
        for (y, &q) in y.iter_mut().zip(q) {
            *y = dl * f32::from(q) - ml;
        }
    }
}

fn q8_from_k4_like(sub: &[(f32, f32); 8], q: &[u8; QK_K], o: &mut [BlockQ8]) {
    for (sub_idx, (o, q)) in o.iter_mut().zip(q.chunks_exact(QK)).enumerate() {
        let (dl, ml) = sub[sub_idx];
        let mut qs = [0i8; QK];
        for (dst, &src) in qs.iter_mut().zip(q) {
            *dst = src as i8;
        }
        // dl * q + (-ml) is bit-identical to the reference's dl * q - ml.
        *o = BlockQ8 {
            scale: dl,
            min: -ml,
            qs,
        };
    }
}

fn q8_from_q4_k(b: &[u8], o: &mut [BlockQ8]) {
    q8_from_k4_like(&k4_sub_scales(b), &k_quants(&b[16..144], None), o);
}

fn q8_from_q5_k(b: &[u8], o: &mut [BlockQ8]) {
    q8_from_k4_like(
        &k4_sub_scales(b),
        &k_quants(&b[48..176], Some(&b[16..48])),
        o,
    );
}

// block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d } (256 values).
fn dequant_q6_k(b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut y[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = ((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) as i8 - 32;
            let q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
            let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
            let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
            let s = |k: usize| f32::from(sc[k] as i8);
            y[l] = d * s(is) * f32::from(q1);
            y[l + 32] = d * s(is + 2) * f32::from(q2);
            y[l + 64] = d * s(is + 4) * f32::from(q3);
            y[l + 96] = d * s(is + 6) * f32::from(q4);
        }
    }
}

// block_q8_K { f32 d; i8 qs[256]; i16 bsums[16] }: y = d * q.
fn dequant_q8_k(b: &[u8], y: &mut [f32]) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    for (y, &q) in y.iter_mut().zip(&b[4..4 + QK_K]) {
        *y = d * f32::from(q as i8);
    }
}
