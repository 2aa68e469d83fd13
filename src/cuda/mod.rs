//! The CUDA layer: a safe API over cudarc for one GPU. It owns library discovery (`probe`),
//! the device, its stream and memory (`device`, `buffer`), the NVRTC-compiled kernels
//! (`kernels`, sources in `kernels/*.cu`), their checked launchers (`ops`, `elementwise`) and
//! the cuBLASLt/cuBLAS matrix products (`gemm`).
//!
//! Everything here returns `CudaError`; nothing panics on a missing library (checked with
//! `libloading` before any cudarc call), a bad shape or a failed call. Nothing CUDA is linked at
//! build time: one build runs on CPU-only machines, where `probe()` says which library is
//! missing. This is, with `triton_api`, the only home of `unsafe` (each block has a `// SAFETY:`
//! note). It must never know about requests, schedulers or models: callers pass buffers and
//! shapes.

pub mod attention;
pub mod buffer;
pub mod device;
pub mod elementwise;
pub mod error;
pub mod gemm;
pub mod kernels;
pub mod ops;
pub mod probe;
pub mod sampling;

pub use buffer::{DeviceBuffer, DeviceElem, FloatElem};
pub use device::{CudaDevice, DeviceGraph, DeviceInfo, device_count};
pub use error::{CudaError, CudaLibrary};
pub use gemm::{BiasPath, Gemm, GemmBackend, GemmPath, GemmShape};
pub use kernels::{CompiledKernel, Define, KernelId, SmArch, compile};
pub use probe::{CudaLibraries, LibraryVersion, LoadedLibrary, probe, probe_library};
