//! Checkpoint formats behind one `TensorSource` trait: Hugging Face safetensors (memory-mapped,
//! single file or sharded with an index) and GGUF (lazy reads, dequantized on read).
//!
//! Conventions every source follows:
//! - shapes are in PyTorch order, outermost dimension first (a linear weight is `[out, in]`);
//!   GGUF's `ne` order is reversed on read;
//! - `get` returns f32 data; `get_q8` returns the compact block format of `ops::quant` where the
//!   source is a block-quantized type that converts exactly;
//! - tensor parallelism is applied here, at load: `Shard` slices the tensor so the decoder only
//!   adds an all-reduce after row-parallel layers.
//!
//! Loaders never panic on bad files: truncated data, bad magic, offsets past the end of the file,
//! unknown types all become a `LoadError` naming the file and tensor.

use std::path::PathBuf;

pub use crate::tensor::{HostTensor, Q8Tensor};

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
    Column { rank: usize, world_size: usize },
    /// Split along the last dim (the input dimension of a `[out, in]` weight). A 1-D tensor (bias)
    /// is not split: only rank 0 should add it.
    Row { rank: usize, world_size: usize },
}

/// Storage type of a tensor in its source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceDType {
    F32,
    F16,
    BF16,
    /// A GGML type id from a GGUF file (see `gguf::GgmlType`).
    Ggml(gguf::GgmlType),
}

#[derive(Debug, Clone, PartialEq)]
pub struct TensorInfo {
    /// PyTorch order, outermost first.
    pub shape: Vec<usize>,
    pub dtype: SourceDType,
}

/// A source of named tensors.
pub trait TensorSource: Send + Sync {
    /// Human-readable description of the source (file path), used in error messages.
    fn describe(&self) -> String;
    /// All tensor names, sorted.
    fn names(&self) -> Vec<String>;
    fn info(&self, name: &str) -> Option<TensorInfo>;
    fn contains(&self, name: &str) -> bool {
        self.info(name).is_some()
    }
    /// Reads (and dequantizes) a tensor to f32, sliced by `shard`.
    fn get(&self, name: &str, shard: Shard) -> Result<HostTensor, LoadError>;
    /// Reads a 2-D tensor in the compact `BlockQ8` format when the source stores it in a
    /// block-quantized type that converts without loss (`Ok(None)` otherwise: use `get`).
    fn get_q8(&self, name: &str, shard: Shard) -> Result<Option<Q8Tensor>, LoadError>;
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a {format} file: {reason}")]
    BadFormat {
        path: PathBuf,
        format: &'static str,
        reason: String,
    },
    #[error("{path}: tensor '{tensor}': {reason}")]
    BadTensor {
        path: PathBuf,
        tensor: String,
        reason: String,
    },
    #[error("{path}: tensor '{tensor}' not found")]
    MissingTensor { path: PathBuf, tensor: String },
    #[error("{path}: tensor '{tensor}' has unsupported type {dtype}")]
    UnsupportedType {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("{path}: tensor '{tensor}' has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        tensor: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("{path}: tensor '{tensor}' of shape {shape:?} cannot be split {shard:?}")]
    BadShard {
        path: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        shard: Shard,
    },
    #[error("{path}: metadata '{key}': {reason}")]
    BadMetadata {
        path: PathBuf,
        key: String,
        reason: String,
    },
}
