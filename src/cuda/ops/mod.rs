//! Safe launchers, one per kernel entry point family. Each checks every shape, length, stride and
//! device it can see on the host, then launches `{op}_{dtype}` on the device's stream (async: a
//! fault shows up at the next `synchronize`). What the host cannot see (token ids, block ids,
//! slots inside device buffers) the kernels bound themselves, so bad device data never makes a
//! kernel touch memory outside its buffers. These launchers never synchronize and never panic.
//!
//! Layouts are row-major; shape comments name the dimensions.
//!
//! Files, one op family each: `embedding` (token and learned-position gather), `norm` (RMS and
//! layer norm, residual add fused), `rotary`, `activation` (gated and plain), `kv_cache` (KV
//! write, and rotary + KV write fused), `paged_attention` (the shared paged-attention arguments
//! and checks, and the plain decode kernel). This file holds the launch helpers every CUDA
//! launcher shares (`elementwise`, `attention` and `gemm` use them too).

mod activation;
mod embedding;
mod kv_cache;
mod norm;
mod paged_attention;
mod rotary;

use cudarc::driver::LaunchConfig;

use super::buffer::{DeviceBuffer, FloatElem};
use super::device::CudaDevice;
use super::error::CudaError;
pub(crate) use activation::act_code;
pub use activation::{activation_in_place, gated_activation};
pub use embedding::{LearnedPositions, embedding};
pub use kv_cache::{KvCacheShape, KvSource, kv_cache_write, rotary_kv_cache_write};
pub use norm::norm;
pub use paged_attention::{
    BlockTables, DecodeAttention, MAX_DECODE_HEAD_DIM, PagedKv, paged_attention_decode,
};
pub(crate) use paged_attention::{check_decode_batch, check_paged_attention, window_arg};
pub use rotary::{RotaryLayout, rotary};

/// Kernel argument for an absent optional pointer (the kernels test for null).
pub(crate) const NULL_PTR: u64 = 0;

pub(crate) fn entry<T: FloatElem>(op: &str) -> String {
    format!("{op}_{}", T::DTYPE)
}

pub(crate) fn to_i32(op: &'static str, what: &'static str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::invalid(op, what, v, "must fit in i32"))
}

pub(crate) fn to_i64(op: &'static str, what: &'static str, v: usize) -> Result<i64, CudaError> {
    i64::try_from(v).map_err(|_| CudaError::invalid(op, what, v, "must fit in i64"))
}

pub(crate) fn to_u32(op: &'static str, what: &'static str, v: usize) -> Result<u32, CudaError> {
    u32::try_from(v).map_err(|_| CudaError::invalid(op, what, v, "must fit in u32"))
}

pub(crate) fn expect_len<T>(
    op: &'static str,
    operand: &'static str,
    buf: &DeviceBuffer<T>,
    expected: usize,
) -> Result<(), CudaError> {
    if buf.len() != expected {
        return Err(CudaError::length(op, operand, expected, buf.len()));
    }
    Ok(())
}

pub(crate) fn launch_error(
    dev: &CudaDevice,
    entry: &str,
    source: cudarc::driver::DriverError,
) -> CudaError {
    CudaError::Launch {
        entry: entry.to_owned(),
        arch: dev.arch().to_string(),
        source,
    }
}

pub(crate) fn grid(blocks: (u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.0, blocks.1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// Elements of T in one 16-byte vector (prelude.cuh's `Vec16<T>::N`).
pub(super) fn vec16_len<T: FloatElem>() -> usize {
    16 / T::DTYPE.size_in_bytes()
}

pub(crate) fn elementwise_grid(n: usize) -> LaunchConfig {
    const THREADS: usize = 256;
    // Grid-stride loops: 2^16 CTAs cover any n.
    let blocks = n.div_ceil(THREADS).clamp(1, 1 << 16) as u32;
    grid((blocks, 1), THREADS as u32)
}
