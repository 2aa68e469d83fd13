//! Activations on the GPU: the gated MLP's act(gate) * up and a plain activation in place
//! (`kernels/activation.cu`), and the activation codes the kernels take.

use cudarc::driver::PushKernelArg;

use super::{elementwise_grid, entry, expect_len, launch_error, to_i32, to_i64, vec16_len};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::CudaError;
use crate::cuda::kernels::KernelId;
use crate::tensor::Activation;

/// The kernels' activation code (activation.cu).
pub(crate) fn act_code(act: Activation) -> i32 {
    match act {
        Activation::Silu => 0,
        Activation::GeluTanh => 1,
        Activation::Gelu => 2,
        Activation::Relu => 3,
    }
}

/// out = act(gate) * up. gate_up: [num_tokens, 2 * inter] (gate first, then up);
/// out: [num_tokens, inter].
pub fn gated_activation<T: FloatElem>(
    dev: &CudaDevice,
    act: Activation,
    out: &mut DeviceBuffer<T>,
    gate_up: &DeviceBuffer<T>,
    inter: usize,
) -> Result<(), CudaError> {
    const OP: &str = "gated_act";
    dev.check_buffer(OP, "out", out)?;
    dev.check_buffer(OP, "gate_up", gate_up)?;
    if inter == 0 || !gate_up.len().is_multiple_of(2 * inter) {
        return Err(CudaError::invalid(
            OP,
            "inter",
            inter,
            format!(
                "must be > 0 and 2 * inter must divide gate_up's {} elements",
                gate_up.len()
            ),
        ));
    }
    let num_tokens = gate_up.len() / (2 * inter);
    expect_len(OP, "out", out, num_tokens * inter)?;
    if num_tokens == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Activation, &[], &entry)?;
    let (num_tokens_i, inter_i, code) = (
        to_i64(OP, "num_tokens", num_tokens)?,
        to_i32(OP, "inter", inter)?,
        act_code(act),
    );
    // activation.cu takes 16-byte vectors when they tile the rows: one thread per vector.
    let vec = vec16_len::<T>();
    let units = match inter % vec {
        0 => num_tokens * inter / vec,
        _ => num_tokens * inter,
    };
    let cfg = elementwise_grid(units);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut out.slice)
        .arg(&gate_up.slice)
        .arg(&num_tokens_i)
        .arg(&inter_i)
        .arg(&code);
    // SAFETY: the arguments match activation.cu's gated_act (out, gate_up, num_tokens, inter,
    // act); out holds num_tokens * inter and gate_up num_tokens * 2 * inter elements (checked
    // above, both on this device); the grid-stride loop stays below num_tokens * inter.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}

/// x = act(x), elementwise, in place. x: [n].
pub fn activation_in_place<T: FloatElem>(
    dev: &CudaDevice,
    act: Activation,
    x: &mut DeviceBuffer<T>,
) -> Result<(), CudaError> {
    const OP: &str = "act";
    dev.check_buffer(OP, "x", x)?;
    let n = x.len();
    if n == 0 {
        return Ok(());
    }
    let entry = entry::<T>(OP);
    let f = dev.function(KernelId::Activation, &[], &entry)?;
    let (n_i, code) = (to_i64(OP, "n", n)?, act_code(act));
    let cfg = elementwise_grid(n);
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut x.slice).arg(&n_i).arg(&code);
    // SAFETY: the arguments match activation.cu's act (x, n, act); x holds n elements on this
    // device; the grid-stride loop stays below n.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &entry, e))?;
    Ok(())
}
