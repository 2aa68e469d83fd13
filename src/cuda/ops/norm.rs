//! Row normalization (RMSNorm, LayerNorm with or without bias), optionally fused with the
//! residual add before it.

use cudarc::driver::PushKernelArg;

use super::{NULL_PTR, entry, expect_len, grid, launch_error, to_i32, to_u32, vec16_len};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::CudaError;
use crate::cuda::kernels::KernelId;
use crate::tensor::Norm;

/// Row normalization, optionally fused with the residual add before it:
/// without `residual`: out = norm(x); with it: residual += x, then out = norm(residual).
///
/// x, out, residual: [num_rows, dim]; weight, bias: [dim] (dim = weight.len()).
/// `Norm::Layer { bias: true }` needs `bias`; RMSNorm takes none.
pub fn norm<T: FloatElem>(
    dev: &CudaDevice,
    norm: Norm,
    out: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    residual: Option<&mut DeviceBuffer<T>>,
    weight: &DeviceBuffer<T>,
    bias: Option<&DeviceBuffer<T>>,
) -> Result<(), CudaError> {
    const OP: &str = "norm";
    dev.check_buffer(OP, "out", out)?;
    dev.check_buffer(OP, "x", x)?;
    dev.check_buffer(OP, "weight", weight)?;
    let dim = weight.len();
    if dim == 0 || !x.len().is_multiple_of(dim) {
        return Err(CudaError::invalid(
            OP,
            "dim (weight length)",
            dim,
            format!("must be > 0 and divide x's {} elements", x.len()),
        ));
    }
    let num_rows = x.len() / dim;
    expect_len(OP, "out", out, x.len())?;
    if let Some(r) = &residual {
        dev.check_buffer(OP, "residual", r)?;
        expect_len(OP, "residual", r, x.len())?;
    }
    let (op, eps) = match norm {
        Norm::Rms { eps } => {
            if bias.is_some() {
                return Err(CudaError::invalid(
                    OP,
                    "bias",
                    "Some",
                    "RMSNorm has no bias",
                ));
            }
            ("rms_norm", eps)
        }
        Norm::Layer {
            eps,
            bias: has_bias,
        } => {
            if has_bias != bias.is_some() {
                return Err(CudaError::invalid(
                    OP,
                    "bias",
                    if bias.is_some() { "Some" } else { "None" },
                    format!("Norm::Layer {{ bias: {has_bias} }}"),
                ));
            }
            ("layer_norm", eps)
        }
    };
    if let Some(b) = bias {
        dev.check_buffer(OP, "bias", b)?;
        expect_len(OP, "bias", b, dim)?;
    }
    if num_rows == 0 {
        return Ok(());
    }
    let entry = entry::<T>(op);
    let f = dev.function(KernelId::Norm, &[], &entry)?;
    let dim_i = to_i32(OP, "dim", dim)?;
    // One CTA per row: at batch 1 the whole op is one CTA, so give it every thread it can use:
    // one per element, or per 16-byte vector where norm.cu's RMSNorm takes them.
    let vec = vec16_len::<T>();
    let units = match (norm, dim % vec) {
        (Norm::Rms { .. }, 0) => dim / vec,
        _ => dim,
    };
    let threads = units.next_multiple_of(32).clamp(32, 1024) as u32;
    let cfg = grid((to_u32(OP, "num_rows", num_rows)?, 1), threads);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice).arg(&x.slice);
    match residual {
        Some(r) => b.arg(&mut r.slice),
        None => b.arg(&NULL_PTR),
    };
    b.arg(&weight.slice);
    if matches!(norm, Norm::Layer { .. }) {
        match bias {
            Some(bias) => b.arg(&bias.slice),
            None => b.arg(&NULL_PTR),
        };
    }
    b.arg(&dim_i).arg(&eps);
    // SAFETY: the arguments match norm.cu's rms_norm (out, x, residual, weight, dim, eps) /
    // layer_norm (out, x, residual, weight, bias, dim, eps); out, x and residual hold
    // num_rows * dim elements, weight and bias dim (checked above, all on this device); one CTA
    // per row touches only its row; block size is a multiple of 32 and at most 1024.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}
