//! Checkpoint formats behind one `TensorSource` trait: Hugging Face safetensors (memory-mapped,
//! single file or sharded with an index) and GGUF (lazy reads, dequantized on read).
//!
//! Conventions every source follows:
//! - shapes are in PyTorch order, outermost dimension first (a linear weight is `[out, in]`);
//!   GGUF's `ne` order is reversed on read;
//! - `get` returns f32 data; `get_q8` returns the compact block format of `ops::quant` where the
//!   source is a block-quantized type that converts exactly; `get_e4m3` returns the raw codes of
//!   an FP8 (E4M3) tensor, which `get` refuses: an FP8 code means nothing without the scale the
//!   checkpoint's quantization scheme pairs it with (`model::quant`, one layer up);
//! - tensor parallelism is applied here, at load: `Shard` slices the tensor so the decoder only
//!   adds an all-reduce after row-parallel layers.
//!
//! Loaders never panic on bad files: truncated data, bad magic, offsets past the end of the file,
//! unknown types all become a `LoadError` naming the file and tensor.

use std::path::PathBuf;

pub use crate::tensor::{E4m3Tensor, HostTensor, Q8Tensor};

pub mod gguf;
pub mod mmap;
pub mod random;
pub mod safetensors;
mod shard;

/// How a tensor is split across tensor-parallel ranks at load time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shard {
    /// Every rank gets the whole tensor.
    Replicated,
    /// Split along dim 0 (the output dimension of a `[out, in]` weight; a bias splits too).
    Column {
        /// This rank's index, in `0..world_size`.
        rank: usize,
        /// Ranks the tensor is split across; must divide dim 0.
        world_size: usize,
    },
    /// Split along the last dim (the input dimension of a `[out, in]` weight). A 1-D tensor (bias)
    /// is not split: only rank 0 should add it.
    Row {
        /// This rank's index, in `0..world_size`.
        rank: usize,
        /// Ranks the tensor is split across; must divide the last dim.
        world_size: usize,
    },
    /// Indices `start..start + len` of dim 0: a column-parallel rank's rows where they are not
    /// one equal part of the tensor (a head group of a fused q/k/v tensor, a vocabulary slice).
    OutRange {
        /// First index of dim 0.
        start: usize,
        /// Indices taken.
        len: usize,
    },
    /// Indices `start..start + len` of the last dim (an `[in, out]` linear's output columns). A
    /// 1-D tensor is sliced too.
    InRange {
        /// First index of the last dim.
        start: usize,
        /// Indices taken.
        len: usize,
    },
}

/// Storage type of a tensor in its source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDType {
    /// IEEE single precision, stored as is.
    F32,
    /// IEEE half precision, widened to f32 on read.
    F16,
    /// bfloat16, widened to f32 on read.
    BF16,
    /// A GGML type id from a GGUF file (see `gguf::GgmlType`).
    Ggml(gguf::GgmlType),
    /// FP8 E4M3 (safetensors `F8_E4M3`): read raw by `get_e4m3`, refused by `get`.
    F8E4M3,
    /// FP8 E5M2 (safetensors `F8_E5M2`): listed so that loading can name it, never read.
    F8E5M2,
}

impl SourceDType {
    /// Whether this is an FP8 storage type (E4M3 or E5M2).
    pub fn is_fp8(self) -> bool {
        matches!(self, SourceDType::F8E4M3 | SourceDType::F8E5M2)
    }
}

/// What a source knows about a tensor without reading its data.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// PyTorch order, outermost first.
    pub shape: Vec<usize>,
    /// How the tensor is stored in the file (`get` converts every supported type to f32).
    pub dtype: SourceDType,
}

/// A source of named tensors.
pub trait TensorSource: Send + Sync {
    /// Human-readable description of the source (file path), used in error messages.
    fn describe(&self) -> String;
    /// All tensor names, sorted.
    fn names(&self) -> Vec<String>;
    /// Shape and storage type of `name`, or None when the source has no such tensor.
    fn info(&self, name: &str) -> Option<TensorInfo>;
    /// Whether the source has a tensor called `name`.
    fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }
    /// Reads (and dequantizes) a tensor to f32, sliced by `shard`.
    fn get(&self, name: &str, shard: Shard) -> Result<HostTensor, LoadError>;
    /// Reads a 2-D tensor in the compact `BlockQ8` format when the source stores it in a
    /// block-quantized type that converts without loss (`Ok(None)` otherwise: use `get`).
    fn get_q8(&self, name: &str, shard: Shard) -> Result<Option<Q8Tensor>, LoadError>;
    /// Reads the raw codes of an FP8 E4M3 tensor, sliced by `shard`; `UnsupportedType` for a
    /// tensor stored in any other type (and for sources that have no FP8 type).
    fn get_e4m3(&self, name: &str, shard: Shard) -> Result<E4m3Tensor, LoadError>;
}

/// A checkpoint that could not be read. Each variant names the file and, where it applies, the
/// tensor or metadata key, so the message says what to fix.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be opened, mapped or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A file is not in the expected format (bad magic, truncated header, invalid JSON header,
    /// ...).
    #[error("{path}: not a {format} file: {reason}")]
    BadFormat {
        /// The file.
        path: PathBuf,
        /// The format it should have been: `GGUF`, `safetensors`, `safetensors index` or `JSON`.
        format: &'static str,
        /// What does not parse.
        reason: String,
    },
    /// A tensor's entry is inconsistent (offsets past the end of the data, a byte size that does
    /// not match its shape and type, ...).
    #[error("{path}: tensor '{tensor}': {reason}")]
    BadTensor {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// What is inconsistent.
        reason: String,
    },
    /// A tensor the model needs is not in the checkpoint.
    #[error("{path}: tensor '{tensor}' not found")]
    MissingTensor {
        /// The checkpoint file (or folder) searched.
        path: PathBuf,
        /// The tensor's name as the source spells it.
        tensor: String,
    },
    /// A tensor is stored in a type this reader cannot convert (e.g. an unsupported GGML type, or
    /// an integer safetensors dtype).
    #[error("{path}: tensor '{tensor}' has unsupported type {dtype}")]
    UnsupportedType {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// The storage type, as the file names it.
        dtype: String,
    },
    /// A tensor's shape is not the one the model's config implies.
    #[error("{path}: tensor '{tensor}' has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// The shape the config implies (PyTorch order).
        expected: Vec<usize>,
        /// The shape in the file (PyTorch order).
        actual: Vec<usize>,
    },
    /// A tensor cannot be split as asked (rank not below world size, or a dimension the world size
    /// does not divide).
    #[error("{path}: tensor '{tensor}' of shape {shape:?} cannot be split {shard:?}")]
    BadShard {
        /// The file holding the tensor.
        path: PathBuf,
        /// The tensor's name in the file.
        tensor: String,
        /// Its full shape (PyTorch order).
        shape: Vec<usize>,
        /// The split that was asked for.
        shard: Shard,
    },
    /// A metadata key (GGUF key-value, or a header field) is missing, mistyped or out of range.
    #[error("{path}: metadata '{key}': {reason}")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// The key, e.g. `general.alignment`.
        key: String,
        /// What is wrong with its value.
        reason: String,
    },
}
