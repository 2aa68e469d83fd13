//! GGUF: llama.cpp's single-file checkpoint format, read lazily as a `TensorSource`.
//!
//! - `file`: the container (header, metadata section, tensor infos, data section): parsing and
//!   validation up front, `GgufFile` and its `TensorSource` impl;
//! - `metadata`: `MetadataValue` and `GgufFile`'s typed metadata reads;
//! - `quants`: `GgmlType` and the dequantization of GGML block types (ggml reference formulas).
//!
//! Only reading lives here: the GGUF writer the tests build files with is test support
//! (`tests/loader_common/gguf_writer.rs`), not part of the library.

mod file;
mod metadata;
mod quants;

pub use file::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, GGUF_MAGIC, GgufFile, GgufTensorInfo, MAX_DIMS};
pub use metadata::MetadataValue;
pub use quants::{DequantError, GgmlType, convert_to_q8, dequantize};
