//! ferrum: an LLM inference engine and NVIDIA Triton Inference Server backend.
//!
//! Layers, from the bottom up (see `docs/architecture.md`):
//! - `loader`: checkpoint formats (safetensors, GGUF) behind one `TensorSource` trait;
//! - `model`: architectures normalized into a `DecoderSpec`, plus the weights of one generic decoder;
//! - `ops`: CPU compute kernels (matmul over compact weights, norms, rotary, paged attention);
//! - `tokenizer`, `sampling`, `request`: pure host-side logic;
//! - `kv_cache`, `scheduler`: pure CPU bookkeeping for in-flight batching over a paged KV cache;
//! - `cuda`: the GPU layer (library probe, device, NVRTC kernels, checked launchers);
//! - `executor`: runs a `SchedulePlan` on a device; `engine`: the thread that owns all of the above.

pub mod backend;
pub mod config;
pub mod cuda;
pub mod dtype;
pub mod engine;
pub mod error;
pub mod executor;
pub mod kv_cache;
pub mod loader;
pub mod model;
pub mod ops;
pub mod request;
pub mod sampling;
pub mod scheduler;
pub mod tensor;
pub mod tokenizer;

pub use error::{Error, Result};
