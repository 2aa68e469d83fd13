//! ferrum's own skinny-product kernel (`kernels/gemv.cu`): the products of a few rows that
//! `GemmBackend::Auto` sends here instead of cuBLASLt (memory-bound, 16-byte weight loads, bias
//! fused), and the gated MLP's gate_up product with its activation fused (`gated_gemv`).

use cudarc::driver::{LaunchConfig, PushKernelArg};

use super::GemmShape;
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::CudaError;
use crate::cuda::kernels::KernelId;
use crate::cuda::ops::{NULL_PTR, expect_len, launch_error, to_i32, to_u32};
use crate::dtype::DType;

/// Most rows of x the gemv kernel takes (gemv.cu `GEMV_MAX_M`).
pub const GEMV_MAX_M: usize = 8;
/// Most rows for which `GemmBackend::Auto` prefers the gemv kernel to cuBLASLt: each weight
/// vector meets m x vectors from L1, so the kernel stays memory-bound only for a few rows.
pub const GEMV_AUTO_MAX_M: usize = 4;
/// Warps (= output features) per CTA of the gemv kernel (gemv.cu `GEMV_WARPS`).
const GEMV_WARPS: usize = 4;

/// Whether the gemv kernel takes a product of `m` rows with `k` inputs in `dtype`.
pub fn gemv_supported(dtype: DType, m: usize, k: usize) -> bool {
    (1..=GEMV_MAX_M).contains(&m) && k > 0 && (k * dtype.size_in_bytes()).is_multiple_of(16)
}

/// Launches gemv.cu on shapes `linear_with` checked (lengths, device, gemv_supported).
pub(super) fn gemv<T: FloatElem>(
    dev: &CudaDevice,
    y: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    w: &DeviceBuffer<T>,
    bias: Option<&DeviceBuffer<T>>,
    shape: GemmShape,
) -> Result<(), CudaError> {
    const OP: &str = "gemv";
    let GemmShape { m, n, k } = shape;
    let ints = [
        to_i32(OP, "m", m)?,
        to_i32(OP, "n", n)?,
        to_i32(OP, "k", k)?,
    ];
    // SAFETY: the arguments match gemv.cu's signature (y, x, w, bias, m, n, k); y holds m * n,
    // x m * k, w n * k and bias n elements (checked by linear_with, all on this device);
    // m <= GEMV_MAX_M and k * size_of::<T>() % 16 == 0, so every row of x and W starts 16-byte
    // aligned (allocations are 256-byte aligned) and the kernel's 16-byte loads stay inside
    // them; warps past n return.
    unsafe { launch_gemv_kernel(dev, OP, n, y, x, w, bias, &ints) }
}

/// Launches gemv.cu's `{op}_{dtype}` entry with one warp per output row (`rows` of them,
/// GEMV_WARPS * 32 threads per CTA, the kernels' launch bounds) and the arguments
/// (y, x, w, bias or null, ints...).
///
/// # Safety
/// The arguments must match the entry's signature, and every buffer must hold what the kernel
/// reads or writes for them (the callers check lengths, alignment and m).
#[allow(clippy::too_many_arguments)]
unsafe fn launch_gemv_kernel<T: FloatElem>(
    dev: &CudaDevice,
    op: &'static str,
    rows: usize,
    y: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    w: &DeviceBuffer<T>,
    bias: Option<&DeviceBuffer<T>>,
    ints: &[i32],
) -> Result<(), CudaError> {
    let entry = format!("{op}_{}", T::DTYPE);
    let f = dev.function(KernelId::Gemv, &[], &entry)?;
    let cfg = LaunchConfig {
        grid_dim: (to_u32(op, "CTAs", rows.div_ceil(GEMV_WARPS))?, 1, 1),
        block_dim: ((GEMV_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut y.slice).arg(&x.slice).arg(&w.slice);
    match bias {
        Some(bias) => b.arg(&bias.slice),
        None => b.arg(&NULL_PTR),
    };
    for i in ints {
        b.arg(i);
    }
    // SAFETY: the caller guarantees the arguments match the entry and the buffers' sizes (this
    // function's contract); the block size is the kernels' launch bound.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// Whether `gated_gemv` takes a gated MLP's gate_up product of `m` rows with `k` inputs: the
/// rows for which `GemmBackend::Auto` would run the gemv kernel anyway.
pub fn gated_gemv_applies(dtype: DType, m: usize, k: usize) -> bool {
    m <= GEMV_AUTO_MAX_M && gemv_supported(dtype, m, k)
}

/// A gated MLP's gate_up product with its activation fused (gemv.cu `gemv_gated`):
/// y[m, inter] = act(x·W[j] + b[j]) * (x·W[inter + j] + b[inter + j]), the gate and up values
/// rounded to T first, as `linear` into a gate_up buffer followed by `ops::gated_activation`
/// computes them. x: [m, k]; w: [2 * inter, k] (gate rows, then up rows); bias: [2 * inter].
/// Needs `gated_gemv_applies(T::DTYPE, m, k)`.
#[allow(clippy::too_many_arguments)]
pub fn gated_gemv<T: FloatElem>(
    dev: &CudaDevice,
    act: crate::tensor::Activation,
    y: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    w: &DeviceBuffer<T>,
    bias: Option<&DeviceBuffer<T>>,
    m: usize,
    inter: usize,
    k: usize,
) -> Result<(), CudaError> {
    const OP: &str = "gemv_gated";
    dev.check_buffer(OP, "y", y)?;
    dev.check_buffer(OP, "x", x)?;
    dev.check_buffer(OP, "w", w)?;
    if !gated_gemv_applies(T::DTYPE, m, k) {
        return Err(CudaError::invalid(
            OP,
            "m, k",
            format!("{m}, {k}"),
            format!(
                "needs m in 1..={GEMV_AUTO_MAX_M} and k * {} bytes a multiple of 16",
                T::DTYPE.size_in_bytes()
            ),
        ));
    }
    let len = |a: usize, b: usize| a.saturating_mul(b);
    expect_len(OP, "x [m, k]", x, len(m, k))?;
    expect_len(OP, "w [2 * inter, k]", w, len(2 * inter, k))?;
    expect_len(OP, "y [m, inter]", y, len(m, inter))?;
    if let Some(b) = bias {
        dev.check_buffer(OP, "bias", b)?;
        expect_len(OP, "bias [2 * inter]", b, 2 * inter)?;
    }
    if inter == 0 {
        return Ok(());
    }
    let ints = [
        to_i32(OP, "m", m)?,
        to_i32(OP, "inter", inter)?,
        to_i32(OP, "k", k)?,
        crate::cuda::ops::act_code(act),
    ];
    // SAFETY: the arguments match gemv.cu's gemv_gated signature (y, x, w, bias, m, inter, k,
    // act); y holds m * inter, x m * k, w 2 * inter * k and bias 2 * inter elements (checked
    // above, all on this device); m <= GEMV_MAX_M and k * size_of::<T>() % 16 == 0, so every
    // row starts 16-byte aligned and the 16-byte loads stay inside it; warps past inter return.
    unsafe { launch_gemv_kernel(dev, OP, inter, y, x, w, bias, &ints) }
}
