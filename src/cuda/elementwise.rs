//! Launchers of `kernels/elementwise.cu`: the small glue kernels of the CUDA executor's forward
//! pass (clamp, residual add, bias add, row gather). Same rules as `ops`: every shape and device
//! is checked on the host, launches are async on the device's stream, nothing panics.

use cudarc::driver::PushKernelArg;

use super::buffer::{DeviceBuffer, FloatElem};
use super::device::CudaDevice;
use super::error::CudaError;
use super::kernels::KernelId;
use super::ops::{NULL_PTR, elementwise_grid, entry, expect_len, launch_error, to_i32, to_i64};

/// x = clamp(x, -c, c) elementwise, in place. x: [n]; c must be finite and >= 0.
pub fn clamp<T: FloatElem>(
    dev: &CudaDevice,
    x: &mut DeviceBuffer<T>,
    c: f32,
) -> Result<(), CudaError> {
    const OP: &str = "clamp";
    dev.check_buffer(OP, "x", x)?;
    if !(c.is_finite() && c >= 0.0) {
        return Err(CudaError::invalid(OP, "c", c, "must be finite and >= 0"));
    }
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Elementwise, &[], &entry)?;
    let n_i = to_i64(OP, "n", n)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut x.slice).arg(&n_i).arg(&c);
    // SAFETY: the arguments match elementwise.cu's clamp (x, n, c); x holds n elements on this
    // device and the grid-stride loop stays below n.
    unsafe { b.launch(elementwise_grid(n)) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// x += a (+ b) elementwise. x, a, b: [n].
pub fn add<T: FloatElem>(
    dev: &CudaDevice,
    x: &mut DeviceBuffer<T>,
    a: &DeviceBuffer<T>,
    b: Option<&DeviceBuffer<T>>,
) -> Result<(), CudaError> {
    const OP: &str = "add";
    dev.check_buffer(OP, "x", x)?;
    dev.check_buffer(OP, "a", a)?;
    let n = x.len();
    expect_len(OP, "a", a, n)?;
    if let Some(b) = b {
        dev.check_buffer(OP, "b", b)?;
        expect_len(OP, "b", b, n)?;
    }
    if n == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Elementwise, &[], &entry)?;
    let n_i = to_i64(OP, "n", n)?;
    let mut l = dev.stream().launch_builder(&f);
    l.arg(&mut x.slice).arg(&a.slice);
    match b {
        Some(b) => l.arg(&b.slice),
        None => l.arg(&NULL_PTR),
    };
    l.arg(&n_i);
    // SAFETY: the arguments match elementwise.cu's add (x, a, b, n); x, a and b (or null) hold n
    // elements each on this device (checked above); the grid-stride loop stays below n.
    unsafe { l.launch(elementwise_grid(n)) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// y[r, i] += bias[i]. y: [num_rows, n]; bias: [n] (n = bias.len()).
pub fn add_bias<T: FloatElem>(
    dev: &CudaDevice,
    y: &mut DeviceBuffer<T>,
    bias: &DeviceBuffer<T>,
) -> Result<(), CudaError> {
    const OP: &str = "add_bias";
    dev.check_buffer(OP, "y", y)?;
    dev.check_buffer(OP, "bias", bias)?;
    let n = bias.len();
    if n == 0 || !y.len().is_multiple_of(n) {
        return Err(CudaError::invalid(
            OP,
            "bias length",
            n,
            format!("must be > 0 and divide y's {} elements", y.len()),
        ));
    }
    let num_rows = y.len() / n;
    if num_rows == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Elementwise, &[], &entry)?;
    let (rows_i, n_i) = (to_i64(OP, "num_rows", num_rows)?, to_i32(OP, "n", n)?);
    let cfg = elementwise_grid(y.len());
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut y.slice).arg(&bias.slice).arg(&rows_i).arg(&n_i);
    // SAFETY: the arguments match elementwise.cu's add_bias (y, bias, num_rows, n); y holds
    // num_rows * n and bias n elements on this device (checked above); the grid-stride loop
    // stays below num_rows * n.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// out[r] = x[rows[r]]. out: [num_rows, dim]; x: [num_src_rows, dim]; rows: [num_rows]. A row
/// index past x (device data the host cannot see) gives a zero row.
pub fn gather_rows<T: FloatElem>(
    dev: &CudaDevice,
    out: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    rows: &DeviceBuffer<u32>,
    dim: usize,
) -> Result<(), CudaError> {
    const OP: &str = "gather_rows";
    dev.check_buffer(OP, "out", out)?;
    dev.check_buffer(OP, "x", x)?;
    dev.check_buffer(OP, "rows", rows)?;
    if dim == 0 || !x.len().is_multiple_of(dim) {
        return Err(CudaError::invalid(
            OP,
            "dim",
            dim,
            format!("must be > 0 and divide x's {} elements", x.len()),
        ));
    }
    let num_rows = rows.len();
    expect_len(OP, "out", out, num_rows * dim)?;
    if num_rows == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Elementwise, &[], &entry)?;
    let (rows_i, dim_i, src_i) = (
        to_i64(OP, "num_rows", num_rows)?,
        to_i32(OP, "dim", dim)?,
        to_i64(OP, "num_src_rows", x.len() / dim)?,
    );
    let cfg = elementwise_grid(out.len());
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice)
        .arg(&x.slice)
        .arg(&rows.slice)
        .arg(&rows_i)
        .arg(&dim_i)
        .arg(&src_i);
    // SAFETY: the arguments match elementwise.cu's gather_rows (out, x, rows, num_rows, dim,
    // num_src_rows); out holds num_rows * dim, x num_src_rows * dim and rows num_rows elements on
    // this device (checked above); the kernel reads x only for row indices < num_src_rows.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}
