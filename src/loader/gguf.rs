//! GGUF reader: header, metadata, tensor infos and dequantization of the GGML block types, plus a
//! small `GgufWriter` for building GGUF files in tests.
//!
//! `GgufFile::open` memory-maps the file and validates its whole layout up front (version,
//! counts against the file size, string lengths, tensor byte ranges, alignment, block
//! divisibility, duplicate names); tensor data is read lazily by `get` (dequantized to f32) or
//! `get_q8` (exact conversion to `BlockQ8`). This module must never panic or allocate from an
//! untrusted count before checking the bytes it claims are present: a bad file is a `LoadError`
//! naming the file, the key or tensor, and the offending value. Block formats follow the ggml
//! reference dequantization (`ggml-quants.c`) exactly, operation for operation, so results are
//! bit-identical to llama.cpp's CPU reference.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use rayon::prelude::*;

use super::mmap::{FileBytes, memory_label};
use super::shard::{Run, plan_shard};
use super::{HostTensor, LoadError, Q8Tensor, Shard, SourceDType, TensorInfo, TensorSource};
use crate::tensor::{BlockQ8, QK};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Data alignment when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// Key of the data alignment in the metadata.
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// ggml's `GGML_MAX_DIMS`.
pub const MAX_DIMS: usize = 4;
/// Deepest nesting of metadata arrays accepted (real files use 1; protects the stack).
const MAX_ARRAY_DEPTH: usize = 8;
/// Elements per K-quant super-block.
const QK_K: usize = 256;
/// Elements dequantized per parallel task.
const PAR_CHUNK_ELEMS: usize = 1 << 16;

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
    pub const F32: Self = Self(0);
    pub const F16: Self = Self(1);
    pub const Q4_0: Self = Self(2);
    pub const Q4_1: Self = Self(3);
    pub const Q5_0: Self = Self(6);
    pub const Q5_1: Self = Self(7);
    pub const Q8_0: Self = Self(8);
    pub const Q8_1: Self = Self(9);
    pub const Q2_K: Self = Self(10);
    pub const Q3_K: Self = Self(11);
    pub const Q4_K: Self = Self(12);
    pub const Q5_K: Self = Self(13);
    pub const Q6_K: Self = Self(14);
    pub const Q8_K: Self = Self(15);
    pub const IQ2_XXS: Self = Self(16);
    pub const IQ2_XS: Self = Self(17);
    pub const IQ3_XXS: Self = Self(18);
    pub const IQ1_S: Self = Self(19);
    pub const IQ4_NL: Self = Self(20);
    pub const IQ3_S: Self = Self(21);
    pub const IQ2_S: Self = Self(22);
    pub const IQ4_XS: Self = Self(23);
    pub const I8: Self = Self(24);
    pub const I16: Self = Self(25);
    pub const I32: Self = Self(26);
    pub const I64: Self = Self(27);
    pub const F64: Self = Self(28);
    pub const IQ1_M: Self = Self(29);
    pub const BF16: Self = Self(30);
    pub const TQ1_0: Self = Self(34);
    pub const TQ2_0: Self = Self(35);
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

    pub fn is_dequantizable(self) -> bool {
        Self::DEQUANTIZABLE.contains(&self)
    }

    pub fn converts_to_q8(self) -> bool {
        Self::Q8_CONVERTIBLE.contains(&self)
    }

    /// Bytes taken by `num_elems` elements; `None` for an unknown type, a count that is not a
    /// whole number of blocks, or overflow.
    pub fn bytes_for(self, num_elems: usize) -> Option<usize> {
        let (_, _, block_size, type_size) = *self.entry()?;
        if num_elems % block_size != 0 {
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

/// One GGUF metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<MetadataValue>),
}

/// GGUF value type ids (`gguf_type`).
mod value_type {
    pub const U8: u32 = 0;
    pub const I8: u32 = 1;
    pub const U16: u32 = 2;
    pub const I16: u32 = 3;
    pub const U32: u32 = 4;
    pub const I32: u32 = 5;
    pub const F32: u32 = 6;
    pub const BOOL: u32 = 7;
    pub const STRING: u32 = 8;
    pub const ARRAY: u32 = 9;
    pub const U64: u32 = 10;
    pub const I64: u32 = 11;
    pub const F64: u32 = 12;
}

impl MetadataValue {
    /// Any integer type that fits u64 (negative values give None).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetadataValue::U8(v) => Some(v.into()),
            MetadataValue::U16(v) => Some(v.into()),
            MetadataValue::U32(v) => Some(v.into()),
            MetadataValue::U64(v) => Some(v),
            MetadataValue::I8(v) => u64::try_from(v).ok(),
            MetadataValue::I16(v) => u64::try_from(v).ok(),
            MetadataValue::I32(v) => u64::try_from(v).ok(),
            MetadataValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer type that fits i64.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// Any integer or float type as f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetadataValue::F32(v) => Some(v.into()),
            MetadataValue::F64(v) => Some(v),
            MetadataValue::I8(v) => Some(v.into()),
            MetadataValue::I16(v) => Some(v.into()),
            MetadataValue::I32(v) => Some(v.into()),
            MetadataValue::I64(v) => Some(v as f64),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetadataValue::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetadataValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[MetadataValue]> {
        match self {
            MetadataValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// The GGUF name of the value's type, for error messages.
    pub fn type_name(&self) -> &'static str {
        match self {
            MetadataValue::U8(_) => "u8",
            MetadataValue::I8(_) => "i8",
            MetadataValue::U16(_) => "u16",
            MetadataValue::I16(_) => "i16",
            MetadataValue::U32(_) => "u32",
            MetadataValue::I32(_) => "i32",
            MetadataValue::U64(_) => "u64",
            MetadataValue::I64(_) => "i64",
            MetadataValue::F32(_) => "f32",
            MetadataValue::F64(_) => "f64",
            MetadataValue::Bool(_) => "bool",
            MetadataValue::String(_) => "string",
            MetadataValue::Array(_) => "array",
        }
    }

    fn type_id(&self) -> u32 {
        match self {
            MetadataValue::U8(_) => value_type::U8,
            MetadataValue::I8(_) => value_type::I8,
            MetadataValue::U16(_) => value_type::U16,
            MetadataValue::I16(_) => value_type::I16,
            MetadataValue::U32(_) => value_type::U32,
            MetadataValue::I32(_) => value_type::I32,
            MetadataValue::U64(_) => value_type::U64,
            MetadataValue::I64(_) => value_type::I64,
            MetadataValue::F32(_) => value_type::F32,
            MetadataValue::F64(_) => value_type::F64,
            MetadataValue::Bool(_) => value_type::BOOL,
            MetadataValue::String(_) => value_type::STRING,
            MetadataValue::Array(_) => value_type::ARRAY,
        }
    }
}

/// Smallest number of bytes one value of a GGUF value type occupies (for count sanity checks).
fn min_value_size(vtype: u32) -> Option<usize> {
    Some(match vtype {
        value_type::U8 | value_type::I8 | value_type::BOOL => 1,
        value_type::U16 | value_type::I16 => 2,
        value_type::U32 | value_type::I32 | value_type::F32 => 4,
        value_type::U64 | value_type::I64 | value_type::F64 | value_type::STRING => 8,
        value_type::ARRAY => 12,
        _ => return None,
    })
}

/// Layout of one tensor in a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    pub name: String,
    pub ggml_type: GgmlType,
    /// GGUF order: `ne[0]` is the innermost (contiguous) dimension.
    pub ne: Vec<u64>,
    /// PyTorch order (reversed `ne`), outermost first.
    pub shape: Vec<usize>,
    /// Offset of the data from the start of the data section.
    pub offset: u64,
    pub num_elems: usize,
    pub num_bytes: usize,
}

/// Errors of `dequantize` / `convert_to_q8` (callers add the file and tensor).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantError {
    #[error("type {0} is not supported")]
    Unsupported(GgmlType),
    #[error(
        "{num_bytes} bytes of {ty} do not hold {num_elems} values (blocks of {block_size} values, {type_size} bytes)"
    )]
    Length {
        ty: GgmlType,
        num_bytes: usize,
        num_elems: usize,
        block_size: usize,
        type_size: usize,
    },
}

/// A parsed, validated GGUF file whose tensor data stays in the (mapped) file until read.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    bytes: FileBytes,
    version: u32,
    alignment: u64,
    /// Absolute offset of the (aligned) data section.
    data_start: usize,
    metadata: BTreeMap<String, MetadataValue>,
    /// File order.
    tensors: Vec<GgufTensorInfo>,
    by_name: BTreeMap<String, usize>,
}

impl GgufFile {
    /// Memory-maps and validates the GGUF file at `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LoadError> {
        let path = path.as_ref();
        let bytes = FileBytes::map(path)?;
        Self::parse(path.to_path_buf(), bytes)
    }

    /// Parses a GGUF file held in memory; `name` labels it in error messages.
    pub fn from_bytes(name: &str, bytes: Vec<u8>) -> Result<Self, LoadError> {
        Self::parse(memory_label(name), FileBytes::Owned(bytes))
    }

    fn parse(path: PathBuf, bytes: FileBytes) -> Result<Self, LoadError> {
        let header = parse_layout(&path, &bytes)?;
        let by_name = header
            .tensors
            .iter()
            .enumerate()
            .map(|(i, t)| (t.name.clone(), i))
            .collect();
        Ok(GgufFile {
            path,
            bytes,
            version: header.version,
            alignment: header.alignment,
            data_start: header.data_start,
            metadata: header.metadata,
            tensors: header.tensors,
            by_name,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// GGUF format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// Absolute file offset of the tensor data section.
    pub fn data_offset(&self) -> usize {
        self.data_start
    }

    pub fn metadata(&self) -> &BTreeMap<String, MetadataValue> {
        &self.metadata
    }

    /// Tensor layouts in file order.
    pub fn tensor_infos(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.by_name.get(name).and_then(|&i| self.tensors.get(i))
    }

    fn meta_err(&self, key: &str, reason: String) -> LoadError {
        LoadError::BadMetadata {
            path: self.path.clone(),
            key: key.to_string(),
            reason,
        }
    }

    fn typed<'a, T>(
        &'a self,
        key: &str,
        expected: &str,
        conv: impl FnOnce(&'a MetadataValue) -> Option<T>,
    ) -> Result<Option<T>, LoadError> {
        let Some(value) = self.metadata.get(key) else {
            return Ok(None);
        };
        match conv(value) {
            Some(v) => Ok(Some(v)),
            None => Err(self.meta_err(
                key,
                format!(
                    "expected {expected}, found {} {}",
                    value.type_name(),
                    short_value(value)
                ),
            )),
        }
    }

    /// A non-negative integer of any integer type; `Ok(None)` when absent.
    pub fn get_u64(&self, key: &str) -> Result<Option<u64>, LoadError> {
        self.typed(key, "a non-negative integer", MetadataValue::as_u64)
    }

    /// Like `get_u64`, checked to fit `usize`.
    pub fn get_usize(&self, key: &str) -> Result<Option<usize>, LoadError> {
        self.typed(key, "a non-negative integer", |v| {
            v.as_u64().and_then(|v| usize::try_from(v).ok())
        })
    }

    /// A signed integer of any integer type.
    pub fn get_i64(&self, key: &str) -> Result<Option<i64>, LoadError> {
        self.typed(key, "an integer", MetadataValue::as_i64)
    }

    /// A number (f32, f64 or integer) as f32.
    pub fn get_f32(&self, key: &str) -> Result<Option<f32>, LoadError> {
        self.typed(key, "a number", |v| v.as_f64().map(|v| v as f32))
    }

    pub fn get_str(&self, key: &str) -> Result<Option<&str>, LoadError> {
        self.typed(key, "a string", MetadataValue::as_str)
    }

    pub fn get_bool(&self, key: &str) -> Result<Option<bool>, LoadError> {
        self.typed(key, "a bool", MetadataValue::as_bool)
    }

    pub fn get_array(&self, key: &str) -> Result<Option<&[MetadataValue]>, LoadError> {
        self.typed(key, "an array", MetadataValue::as_array)
    }

    /// An array of strings (e.g. `tokenizer.ggml.tokens`).
    pub fn get_str_array(&self, key: &str) -> Result<Option<Vec<&str>>, LoadError> {
        self.typed(key, "an array of strings", |v| {
            v.as_array()?
                .iter()
                .map(MetadataValue::as_str)
                .collect::<Option<Vec<_>>>()
        })
    }

    /// An array of numbers as f32 (e.g. `tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<Option<Vec<f32>>, LoadError> {
        self.typed(key, "an array of numbers", |v| {
            v.as_array()?
                .iter()
                .map(|x| x.as_f64().map(|x| x as f32))
                .collect::<Option<Vec<_>>>()
        })
    }

    /// An array of integers (e.g. `tokenizer.ggml.token_type`).
    pub fn get_i64_array(&self, key: &str) -> Result<Option<Vec<i64>>, LoadError> {
        self.typed(key, "an array of integers", |v| {
            v.as_array()?
                .iter()
                .map(MetadataValue::as_i64)
                .collect::<Option<Vec<_>>>()
        })
    }

    /// `general.architecture` (e.g. `"llama"`); an error when absent or not a string.
    pub fn architecture(&self) -> Result<&str, LoadError> {
        self.get_str("general.architecture")?
            .ok_or_else(|| self.meta_err("general.architecture", "missing".to_string()))
    }

    fn entry(&self, name: &str) -> Result<&GgufTensorInfo, LoadError> {
        self.tensor_info(name)
            .ok_or_else(|| LoadError::MissingTensor {
                path: self.path.clone(),
                tensor: name.to_string(),
            })
    }

    /// The raw (still quantized) bytes of a tensor.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], LoadError> {
        let info = self.entry(name)?;
        self.raw(info)
    }

    fn raw(&self, info: &GgufTensorInfo) -> Result<&[u8], LoadError> {
        // Validated at open; checked again so a logic error cannot become a panic.
        usize::try_from(info.offset)
            .ok()
            .and_then(|off| self.data_start.checked_add(off))
            .and_then(|start| self.bytes.get(start..start.checked_add(info.num_bytes)?))
            .ok_or_else(|| self.tensor_err(info, "data range outside the file".to_string()))
    }

    fn tensor_err(&self, info: &GgufTensorInfo, reason: String) -> LoadError {
        LoadError::BadTensor {
            path: self.path.clone(),
            tensor: info.name.clone(),
            reason,
        }
    }

    fn unsupported(&self, info: &GgufTensorInfo) -> LoadError {
        LoadError::UnsupportedType {
            path: self.path.clone(),
            tensor: info.name.clone(),
            dtype: format!("{} (ggml type {})", info.ggml_type, info.ggml_type.0),
        }
    }

    /// Dequantizes elements `[run.start, run.start + run.len)` of the tensor into `out`.
    fn read_run(
        &self,
        info: &GgufTensorInfo,
        raw: &[u8],
        run: Run,
        out: &mut [f32],
    ) -> Result<(), LoadError> {
        let ty = info.ggml_type;
        let (Some(block_size), Some(type_size)) = (ty.block_size(), ty.type_size()) else {
            return Err(self.unsupported(info));
        };
        let first_block = run.start / block_size;
        let end_block = (run.start + run.len).div_ceil(block_size);
        let src = raw
            .get(first_block * type_size..end_block * type_size)
            .ok_or_else(|| self.tensor_err(info, format!("elements {run:?} outside the tensor")))?;
        let map = |e: DequantError| match e {
            DequantError::Unsupported(_) => self.unsupported(info),
            other => self.tensor_err(info, other.to_string()),
        };
        if run.start % block_size == 0 && run.len % block_size == 0 {
            // Large runs (embeddings, whole projections) are dequantized in parallel chunks.
            let num_chunk_blocks = PAR_CHUNK_ELEMS.div_ceil(block_size);
            out.par_chunks_mut(num_chunk_blocks * block_size)
                .zip(src.par_chunks(num_chunk_blocks * type_size))
                .try_for_each(|(out, src)| dequantize(ty, src, out))
                .map_err(map)
        } else {
            let mut tmp = vec![0.0f32; (end_block - first_block) * block_size];
            dequantize(ty, src, &mut tmp).map_err(map)?;
            let skip = run.start - first_block * block_size;
            out.copy_from_slice(&tmp[skip..skip + run.len]);
            Ok(())
        }
    }
}

/// A short rendering of a metadata value for error messages.
fn short_value(value: &MetadataValue) -> String {
    match value {
        MetadataValue::Array(a) => format!("of {} elements", a.len()),
        MetadataValue::String(s) if s.len() > 40 => {
            format!("{:?}...", s.chars().take(40).collect::<String>())
        }
        other => format!("{other:?}"),
    }
}

impl TensorSource for GgufFile {
    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn names(&self) -> Vec<String> {
        self.by_name.keys().cloned().collect()
    }

    fn info(&self, name: &str) -> Option<TensorInfo> {
        let info = self.tensor_info(name)?;
        let dtype = match info.ggml_type {
            GgmlType::F32 => SourceDType::F32,
            GgmlType::F16 => SourceDType::F16,
            GgmlType::BF16 => SourceDType::BF16,
            other => SourceDType::Ggml(other),
        };
        Some(TensorInfo {
            shape: info.shape.clone(),
            dtype,
        })
    }

    fn get(&self, name: &str, shard: Shard) -> Result<HostTensor, LoadError> {
        let info = self.entry(name)?;
        if !info.ggml_type.is_dequantizable() {
            return Err(self.unsupported(info));
        }
        let raw = self.raw(info)?;
        let plan = plan_shard(&self.path, name, &info.shape, shard)?;
        let mut data = vec![0.0f32; plan.numel()];
        let mut pos = 0;
        for run in &plan.runs {
            self.read_run(info, raw, *run, &mut data[pos..pos + run.len])?;
            pos += run.len;
        }
        Ok(HostTensor {
            shape: plan.shape,
            data,
        })
    }

    fn get_q8(&self, name: &str, shard: Shard) -> Result<Option<Q8Tensor>, LoadError> {
        let info = self.entry(name)?;
        let ty = info.ggml_type;
        if !ty.converts_to_q8() {
            return Ok(None);
        }
        let [rows, cols] = info.shape[..] else {
            return Err(self.tensor_err(
                info,
                format!("get_q8 needs a 2-D tensor, shape is {:?}", info.shape),
            ));
        };
        let raw = self.raw(info)?;
        let plan = plan_shard(&self.path, name, &info.shape, shard)?;
        let out_cols = plan.shape[1];
        if out_cols % QK != 0 {
            return Err(LoadError::BadShard {
                path: self.path.clone(),
                tensor: name.to_string(),
                shape: vec![rows, cols],
                shard,
            });
        }
        let (Some(block_size), Some(type_size)) = (ty.block_size(), ty.type_size()) else {
            return Err(self.unsupported(info));
        };
        let mut blocks = Vec::with_capacity(plan.numel() / QK);
        let mut tmp = Vec::new();
        for run in &plan.runs {
            // Runs start and end on 32-element boundaries (cols and the shard width are multiples
            // of 32); K-quant runs may start inside a 256-element super-block.
            let first_block = run.start / block_size;
            let end_block = (run.start + run.len).div_ceil(block_size);
            let src = raw
                .get(first_block * type_size..end_block * type_size)
                .ok_or_else(|| {
                    self.tensor_err(info, format!("elements {run:?} outside the tensor"))
                })?;
            tmp.clear();
            tmp.resize((end_block - first_block) * block_size / QK, EMPTY_BLOCK);
            convert_to_q8(ty, src, &mut tmp).map_err(|e| self.tensor_err(info, e.to_string()))?;
            let skip = (run.start - first_block * block_size) / QK;
            blocks.extend_from_slice(&tmp[skip..skip + run.len / QK]);
        }
        Ok(Some(Q8Tensor {
            rows: plan.shape[0],
            cols: out_cols,
            blocks,
        }))
    }
}

const EMPTY_BLOCK: BlockQ8 = BlockQ8 {
    scale: 0.0,
    min: 0.0,
    qs: [0; QK],
};

// ---------------------------------------------------------------------------------------------
// Layout parsing
// ---------------------------------------------------------------------------------------------

struct Layout {
    version: u32,
    alignment: u64,
    data_start: usize,
    metadata: BTreeMap<String, MetadataValue>,
    tensors: Vec<GgufTensorInfo>,
}

/// Bounds-checked little-endian cursor; errors are reasons (the caller adds file/key/tensor).
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                format!(
                    "{what} at byte {} needs {n} bytes but the file has {} left (truncated?)",
                    self.pos,
                    self.remaining()
                )
            })?;
        let out = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], String> {
        let b = self.take(N, what)?;
        let mut out = [0u8; N];
        out.copy_from_slice(b);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        self.array(what).map(u64::from_le_bytes)
    }

    /// A count of items that each take at least `min_item_size` bytes: must fit what is left.
    fn count(&mut self, min_item_size: usize, what: &str) -> Result<usize, String> {
        let at = self.pos;
        let n = self.u64(what)?;
        usize::try_from(n)
            .ok()
            .filter(|&n| n.checked_mul(min_item_size).is_some_and(|b| b <= self.remaining()))
            .ok_or_else(|| {
                format!(
                    "{what} {n} at byte {at} is impossible: {} bytes remain and each item needs at least {min_item_size}",
                    self.remaining()
                )
            })
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= self.remaining())
            .ok_or_else(|| {
                format!(
                    "{what} at byte {at} has length {len} but only {} bytes remain",
                    self.remaining()
                )
            })?;
        let b = self.take(len, what)?;
        String::from_utf8(b.to_vec())
            .map_err(|e| format!("{what} at byte {at} is not valid UTF-8: {e}"))
    }

    fn value(&mut self, vtype: u32, depth: usize) -> Result<MetadataValue, String> {
        Ok(match vtype {
            value_type::U8 => MetadataValue::U8(self.array::<1>("u8 value").map(|b| b[0])?),
            value_type::I8 => MetadataValue::I8(self.array("i8 value").map(i8::from_le_bytes)?),
            value_type::U16 => MetadataValue::U16(self.array("u16 value").map(u16::from_le_bytes)?),
            value_type::I16 => MetadataValue::I16(self.array("i16 value").map(i16::from_le_bytes)?),
            value_type::U32 => MetadataValue::U32(self.u32("u32 value")?),
            value_type::I32 => MetadataValue::I32(self.array("i32 value").map(i32::from_le_bytes)?),
            value_type::U64 => MetadataValue::U64(self.u64("u64 value")?),
            value_type::I64 => MetadataValue::I64(self.array("i64 value").map(i64::from_le_bytes)?),
            value_type::F32 => MetadataValue::F32(self.array("f32 value").map(f32::from_le_bytes)?),
            value_type::F64 => MetadataValue::F64(self.array("f64 value").map(f64::from_le_bytes)?),
            value_type::BOOL => {
                let at = self.pos;
                match self.array::<1>("bool value")?[0] {
                    0 => MetadataValue::Bool(false),
                    1 => MetadataValue::Bool(true),
                    other => return Err(format!("bool value at byte {at} is {other}, not 0 or 1")),
                }
            }
            value_type::STRING => MetadataValue::String(self.string("string value")?),
            value_type::ARRAY => {
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(format!("arrays nested deeper than {MAX_ARRAY_DEPTH}"));
                }
                let at = self.pos;
                let elem_type = self.u32("array element type")?;
                let min_size = min_value_size(elem_type).ok_or_else(|| {
                    format!("array at byte {at} has unknown element type {elem_type}")
                })?;
                let n = self.count(min_size, "array length")?;
                // Bounded by the bytes left; capped so tiny elements cannot amplify memory early.
                let mut items = Vec::with_capacity(n.min(1 << 16));
                for _ in 0..n {
                    items.push(self.value(elem_type, depth + 1)?);
                }
                MetadataValue::Array(items)
            }
            other => return Err(format!("unknown value type {other}")),
        })
    }
}

fn parse_layout(path: &Path, bytes: &[u8]) -> Result<Layout, LoadError> {
    let bad = |reason: String| LoadError::BadFormat {
        path: path.to_path_buf(),
        format: "GGUF",
        reason,
    };
    let mut cur = Cursor { bytes, pos: 0 };
    let magic = cur.array::<4>("magic").map_err(bad)?;
    if magic != GGUF_MAGIC {
        return Err(bad(format!(
            "bad magic {magic:02x?} (expected \"GGUF\" = {GGUF_MAGIC:02x?})"
        )));
    }
    let version = cur.u32("version").map_err(bad)?;
    match version {
        2 | 3 => {}
        v if v & 0xffff == 0 && (1..=3).contains(&v.swap_bytes()) => {
            return Err(bad(format!(
                "big-endian GGUF (version {} byte-swapped) is not supported",
                v.swap_bytes()
            )));
        }
        v => {
            return Err(bad(format!(
                "unsupported GGUF version {v} (supported: 2, 3)"
            )));
        }
    }
    // Each tensor info takes at least 8 (name length) + 4 (n_dims) + 4 (type) + 8 (offset) bytes.
    let num_tensors = cur.count(24, "tensor count").map_err(bad)?;
    // Each key/value takes at least 8 (key length) + 4 (type) + 1 (smallest value) bytes.
    let num_kv = cur.count(13, "metadata count").map_err(bad)?;

    let mut metadata = BTreeMap::new();
    for kv_idx in 0..num_kv {
        let key = cur
            .string("metadata key")
            .map_err(|r| bad(format!("metadata entry {kv_idx}: {r}")))?;
        let meta_err = |reason: String| LoadError::BadMetadata {
            path: path.to_path_buf(),
            key: key.clone(),
            reason,
        };
        let vtype = cur.u32("value type").map_err(meta_err)?;
        let value = cur.value(vtype, 0).map_err(meta_err)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(meta_err("duplicate key".to_string()));
        }
    }

    let alignment = match metadata.get(ALIGNMENT_KEY) {
        None => DEFAULT_ALIGNMENT,
        Some(v) => v
            .as_u64()
            .filter(|a| a.is_power_of_two() && *a <= 1 << 30)
            .ok_or_else(|| LoadError::BadMetadata {
                path: path.to_path_buf(),
                key: ALIGNMENT_KEY.to_string(),
                reason: format!(
                    "must be a power of two up to 2^30, found {} {}",
                    v.type_name(),
                    short_value(v)
                ),
            })?,
    };

    let mut tensors: Vec<GgufTensorInfo> = Vec::with_capacity(num_tensors);
    let mut seen = BTreeMap::new();
    for tensor_idx in 0..num_tensors {
        let name = cur
            .string("tensor name")
            .map_err(|r| bad(format!("tensor info {tensor_idx}: {r}")))?;
        let tensor_err = |reason: String| LoadError::BadTensor {
            path: path.to_path_buf(),
            tensor: name.clone(),
            reason,
        };
        let n_dims = cur.u32("n_dims").map_err(tensor_err)?;
        let n_dims = usize::try_from(n_dims)
            .ok()
            .filter(|&n| n <= MAX_DIMS)
            .ok_or_else(|| tensor_err(format!("n_dims {n_dims} exceeds {MAX_DIMS}")))?;
        let mut ne = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            let dim = cur.u64("dimension").map_err(tensor_err)?;
            if dim > i64::MAX as u64 {
                return Err(tensor_err(format!(
                    "dimension {dim} is negative or too large"
                )));
            }
            ne.push(dim);
        }
        let ggml_type = GgmlType(cur.u32("type").map_err(tensor_err)?);
        let offset = cur.u64("offset").map_err(tensor_err)?;
        let (Some(block_size), Some(_)) = (ggml_type.block_size(), ggml_type.type_size()) else {
            return Err(LoadError::UnsupportedType {
                path: path.to_path_buf(),
                tensor: name.clone(),
                dtype: format!("unknown ggml type {}", ggml_type.0),
            });
        };
        let shape = ne
            .iter()
            .rev()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| tensor_err(format!("shape {ne:?} does not fit in memory")))?;
        let num_elems = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| tensor_err(format!("element count of shape {ne:?} overflows")))?;
        let row_len = ne.first().copied().unwrap_or(1);
        if row_len % block_size as u64 != 0 {
            return Err(tensor_err(format!(
                "row length ne[0] = {row_len} is not a multiple of the {ggml_type} block size {block_size}"
            )));
        }
        let num_bytes = ggml_type.bytes_for(num_elems).ok_or_else(|| {
            tensor_err(format!(
                "byte size of {num_elems} {ggml_type} elements overflows"
            ))
        })?;
        if offset % alignment != 0 {
            return Err(tensor_err(format!(
                "data offset {offset} is not a multiple of the alignment {alignment}"
            )));
        }
        if seen.insert(name.clone(), tensor_idx).is_some() {
            return Err(tensor_err("duplicate tensor name".to_string()));
        }
        tensors.push(GgufTensorInfo {
            name,
            ggml_type,
            ne,
            shape,
            offset,
            num_elems,
            num_bytes,
        });
    }

    let data_start = u64::try_from(cur.pos)
        .ok()
        .and_then(|p| p.checked_next_multiple_of(alignment))
        .and_then(|p| usize::try_from(p).ok())
        .ok_or_else(|| bad("data section offset overflows".to_string()))?;
    let data_len = bytes.len().saturating_sub(data_start) as u64;
    for t in &tensors {
        let end = t.offset.checked_add(t.num_bytes as u64);
        if data_start > bytes.len() || end.is_none_or(|end| end > data_len) {
            return Err(LoadError::BadTensor {
                path: path.to_path_buf(),
                tensor: t.name.clone(),
                reason: format!(
                    "data [{}, +{}) relative to the data section at byte {data_start} runs past the end of the file ({} bytes)",
                    t.offset,
                    t.num_bytes,
                    bytes.len()
                ),
            });
        }
    }
    let mut by_offset: Vec<&GgufTensorInfo> = tensors.iter().filter(|t| t.num_bytes > 0).collect();
    by_offset.sort_by_key(|t| t.offset);
    for pair in by_offset.windows(2) {
        let (a, b) = (pair[0], pair[1]);
        if a.offset + a.num_bytes as u64 > b.offset {
            return Err(LoadError::BadTensor {
                path: path.to_path_buf(),
                tensor: b.name.clone(),
                reason: format!(
                    "data at offset {} overlaps tensor '{}' at [{}, +{})",
                    b.offset, a.name, a.offset, a.num_bytes
                ),
            });
        }
    }
    Ok(Layout {
        version,
        alignment,
        data_start,
        metadata,
        tensors,
    })
}

// ---------------------------------------------------------------------------------------------
// Dequantization (ggml reference formulas)
// ---------------------------------------------------------------------------------------------

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
    if num_elems % block_size != 0 || num_elems / block_size * type_size != num_bytes {
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

// ---------------------------------------------------------------------------------------------
// Writer
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
struct WriterTensor {
    name: String,
    /// GGUF order.
    ne: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Builds small GGUF files (v3 by default), mainly for tests: metadata in insertion order,
/// tensors laid out in order at the alignment. It writes what it is given without validating
/// tensor byte sizes, so tests can also produce deliberately broken files.
#[derive(Debug, Clone)]
pub struct GgufWriter {
    version: u32,
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<WriterTensor>,
}

impl Default for GgufWriter {
    fn default() -> Self {
        Self::new()
    }
}

impl GgufWriter {
    pub fn new() -> Self {
        GgufWriter {
            version: 3,
            alignment: DEFAULT_ALIGNMENT,
            metadata: Vec::new(),
            tensors: Vec::new(),
        }
    }

    /// The version field written in the header (the layout is always v2/v3).
    pub fn version(&mut self, version: u32) -> &mut Self {
        self.version = version;
        self
    }

    /// Sets the data alignment and records it as `general.alignment` (u32).
    pub fn alignment(&mut self, alignment: u32) -> &mut Self {
        self.alignment = alignment.into();
        self.metadata.retain(|(k, _)| k != ALIGNMENT_KEY);
        self.metadata
            .push((ALIGNMENT_KEY.to_string(), MetadataValue::U32(alignment)));
        self
    }

    pub fn metadata(&mut self, key: &str, value: MetadataValue) -> &mut Self {
        self.metadata.push((key.to_string(), value));
        self
    }

    /// Adds an F32 tensor; `shape` is in PyTorch order.
    pub fn tensor_f32(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        let bytes = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor_raw(name, shape, GgmlType::F32, bytes)
    }

    /// Adds a tensor from its raw encoded bytes; `shape` is in PyTorch order.
    pub fn tensor_raw(
        &mut self,
        name: &str,
        shape: &[usize],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> &mut Self {
        let ne = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push(WriterTensor {
            name: name.to_string(),
            ne,
            ggml_type,
            data,
        });
        self
    }

    /// The encoded file. Fails on arrays mixing element types.
    pub fn to_bytes(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        out.extend_from_slice(&GGUF_MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            write_string(&mut out, key);
            out.extend_from_slice(&value.type_id().to_le_bytes());
            write_value(&mut out, key, value)?;
        }
        let align = |n: u64| n.next_multiple_of(self.alignment.max(1));
        let mut offset = 0u64;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            write_string(&mut out, &t.name);
            out.extend_from_slice(&(t.ne.len() as u32).to_le_bytes());
            for d in &t.ne {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.0.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset = align(offset + t.data.len() as u64);
        }
        // The data section starts aligned, so aligning absolute positions aligns the offsets too.
        if self.tensors.is_empty() {
            return Ok(out);
        }
        out.resize(align(out.len() as u64) as usize, 0);
        let data_start = out.len();
        for (t, offset) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + offset as usize, 0);
            out.extend_from_slice(&t.data);
        }
        Ok(out)
    }

    pub fn write(&self, path: impl AsRef<Path>) -> std::io::Result<()> {
        std::fs::write(path, self.to_bytes()?)
    }
}

fn write_string(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn write_value(out: &mut Vec<u8>, key: &str, value: &MetadataValue) -> std::io::Result<()> {
    match value {
        MetadataValue::U8(v) => out.push(*v),
        MetadataValue::I8(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I16(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::U64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::I64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F32(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::F64(v) => out.extend_from_slice(&v.to_le_bytes()),
        MetadataValue::Bool(v) => out.push(u8::from(*v)),
        MetadataValue::String(s) => write_string(out, s),
        MetadataValue::Array(items) => {
            let elem_type = items.first().map_or(value_type::U8, MetadataValue::type_id);
            if items.iter().any(|v| v.type_id() != elem_type) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("metadata '{key}': array mixes element types"),
                ));
            }
            out.extend_from_slice(&elem_type.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for item in items {
                write_value(out, key, item)?;
            }
        }
    }
    Ok(())
}
