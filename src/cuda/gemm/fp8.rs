//! Products with FP8 E4M3 weights: `y[m, n] = x[m, k] · (W[n, k] * w_scale[n])ᵀ (+ bias[n])`,
//! W stored as E4M3 codes with one f32 scale per output feature (a per-tensor scale is the same
//! value on every row).
//!
//! Two ways, chosen per call like the float products (`GemmBackend`):
//! - **gemv** (m <= `FP8_GEMV_AUTO_MAX_M`, decode): `kernels/fp8.cu` reads each weight byte once
//!   (16 codes per load) and multiplies by x in its own dtype (weight-only FP8: the activations
//!   are not quantized), scale and bias fused.
//! - **cuBLASLt** (larger m): the activations are quantized per token first
//!   (`quantize_rows`: E4M3 with one scale per row, max |x| / 448, or the checkpoint's static
//!   `input_scale`), then E4M3 × E4M3 → the output dtype with f32 accumulation. The per-row
//!   scales of W and x go to cuBLASLt's outer-vector scale mode (cuBLASLt 12.9+) with the bias
//!   in the epilogue; where the library has no such mode the product runs with unit scales and
//!   `scale_rows` applies both scales and the bias after (one more pass over y).
//!
//! cuBLASLt's FP8 layout rule ("TN": A transposed, B not) is what `plan` builds for every product,
//! and its 16-byte alignment rules need k and n multiples of 16 (`fp8_supported`).

use cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};

use super::lt::{PointerAttr, set_pointer};
use super::{BiasPath, Gemm, GemmBackend, GemmPath, GemmShape, Operands};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::device::CudaDevice;
use crate::cuda::error::{CudaError, CudaLibrary};
use crate::cuda::kernels::KernelId;
use crate::cuda::ops::{
    NULL_PTR, act_code, elementwise_grid, entry, expect_len, launch_error, to_i32, to_u32,
};

/// Most rows the FP8 gemv kernels take (fp8.cu `FP8_GEMV_MAX_M`).
pub const FP8_GEMV_MAX_M: usize = 8;
/// Most rows for which `GemmBackend::Auto` takes the FP8 gemv kernel: cuBLASLt's FP8 products
/// read weights far below the copy rate for few rows (1.05 TB/s at m = 1 and 0.42 at m = 16 on
/// the H100, measured with `torch._scaled_mm`).
pub const FP8_GEMV_AUTO_MAX_M: usize = 8;
/// Warps (= output features) per CTA of the gemv kernels (fp8.cu `FP8_GEMV_WARPS`).
const FP8_GEMV_WARPS: usize = 4;
/// Threads per row of the quantization kernel (fp8.cu `FP8_QUANT_THREADS`).
const FP8_QUANT_THREADS: u32 = 256;

/// Whether an FP8 product of `[n, k]` weights can run on the GPU: 16-byte rows of codes (k) and
/// of the output (n), as cuBLASLt's FP8 kernels and the gemv's 16-code loads need.
pub fn fp8_supported(n: usize, k: usize) -> bool {
    n > 0 && k > 0 && n.is_multiple_of(16) && k.is_multiple_of(16)
}

/// A linear weight in FP8 on the device.
pub struct Fp8Weights {
    /// [n, k] E4M3 codes, row-major.
    pub codes: DeviceBuffer<u8>,
    /// [n] dequantization scale of each output feature.
    pub scales: DeviceBuffer<f32>,
    /// The static per-tensor activation scale (a checkpoint's `input_scale`); None: per-token.
    pub input_scale: Option<f32>,
    /// Output features.
    pub n: usize,
    /// Input features.
    pub k: usize,
}

impl Fp8Weights {
    /// Uploads `[n, k]` codes with their `[n]` scales; errors if the shape is not `fp8_supported`
    /// or the lengths disagree.
    pub fn upload(
        dev: &CudaDevice,
        codes: &[u8],
        scales: &[f32],
        input_scale: Option<f32>,
        n: usize,
        k: usize,
    ) -> Result<Self, CudaError> {
        const OP: &str = "fp8 weights";
        if !fp8_supported(n, k) {
            return Err(CudaError::invalid(
                OP,
                "[n, k]",
                format!("[{n}, {k}]"),
                "FP8 products need n and k multiples of 16",
            ));
        }
        if codes.len() != n * k {
            return Err(CudaError::length(OP, "codes [n, k]", n * k, codes.len()));
        }
        if scales.len() != n {
            return Err(CudaError::length(OP, "scales [n]", n, scales.len()));
        }
        if let Some(s) = input_scale
            && !(s.is_finite() && s > 0.0)
        {
            return Err(CudaError::invalid(
                OP,
                "input_scale",
                s,
                "must be finite and > 0",
            ));
        }
        Ok(Fp8Weights {
            codes: dev.upload(codes)?,
            scales: dev.upload(scales)?,
            input_scale,
            n,
            k,
        })
    }

    /// Device bytes held.
    pub fn num_bytes(&self) -> usize {
        self.codes.num_bytes() + self.scales.num_bytes()
    }
}

/// Scratch for quantized activations: [rows, k] codes and [rows] scales, allocated once for the
/// largest step (the products use prefixes of it, so graph replays see fixed addresses).
pub struct Fp8Activations {
    /// Capacity [max_rows * max_k] codes.
    pub codes: DeviceBuffer<u8>,
    /// Capacity [max_rows] scales.
    pub scales: DeviceBuffer<f32>,
}

impl Fp8Activations {
    /// Scratch for up to `max_rows` rows of up to `max_k` features.
    pub fn new(dev: &CudaDevice, max_rows: usize, max_k: usize) -> Result<Self, CudaError> {
        Ok(Fp8Activations {
            codes: dev.alloc_zeros(max_rows.max(1).saturating_mul(max_k.max(1)))?,
            scales: dev.alloc_zeros(max_rows.max(1))?,
        })
    }
}

/// Quantizes `x` ([m, k]) per row into `acts` (codes [m, k], scales [m]): the scale of a row is
/// `static_scale` when given, else its max |x| / 448 (1 for an all-zero row). Sets the lengths of
/// `acts`' buffers to m * k and m.
pub fn quantize_rows<T: FloatElem>(
    dev: &CudaDevice,
    acts: &mut Fp8Activations,
    x: &DeviceBuffer<T>,
    m: usize,
    k: usize,
    static_scale: Option<f32>,
) -> Result<(), CudaError> {
    const OP: &str = "fp8_quantize_rows";
    dev.check_buffer(OP, "x", x)?;
    expect_len(OP, "x [m, k]", x, m.saturating_mul(k))?;
    acts.codes.set_len(m * k)?;
    acts.scales.set_len(m)?;
    if m == 0 || k == 0 {
        return Ok(());
    }
    let (mi, ki) = (to_i32(OP, "m", m)?, to_i32(OP, "k", k)?);
    let s = static_scale.unwrap_or(0.0);
    let name = entry::<T>(OP);
    let f = dev.function(KernelId::Fp8, &[], &name)?;
    let cfg = LaunchConfig {
        grid_dim: (to_u32(OP, "m", m)?, 1, 1),
        block_dim: (FP8_QUANT_THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut acts.codes.slice)
        .arg(&mut acts.scales.slice)
        .arg(&x.slice)
        .arg(&mi)
        .arg(&ki)
        .arg(&s);
    // SAFETY: matches fp8.cu's fp8_quantize_rows (codes, scales, x, m, k, static_scale); codes
    // hold m * k and scales m elements (set_len above checked the capacity), x holds m * k; one
    // CTA per row.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &name, e))?;
    Ok(())
}

/// Runs fp8.cu's codec on the device, for tests against the host codec (`ops::fp8`): the E4M3
/// code of each element of `x`, and the f32 value of each of the 256 codes as the device's
/// decoder (the one the gemv kernels use) reads it.
pub fn codec_check(
    dev: &CudaDevice,
    x: &DeviceBuffer<f32>,
) -> Result<(DeviceBuffer<u8>, DeviceBuffer<f32>), CudaError> {
    const OP: &str = "fp8_codec_check";
    dev.check_buffer(OP, "x", x)?;
    let n = x.len();
    let mut codes = dev.alloc_zeros::<u8>(n.max(1))?;
    codes.set_len(n)?;
    let mut back = dev.alloc_zeros::<f32>(256)?;
    let f = dev.function(KernelId::Fp8, &[], OP)?;
    let ni = to_i32(OP, "n", n)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut codes.slice)
        .arg(&x.slice)
        .arg(&mut back.slice)
        .arg(&ni);
    // SAFETY: fp8_codec_check (codes, x, back, n): codes and x hold n elements, back 256; the
    // grid covers max(n, 64) threads and the kernel guards both bounds.
    unsafe { b.launch(elementwise_grid(n.max(64))) }.map_err(|e| launch_error(dev, OP, e))?;
    Ok((codes, back))
}

#[allow(clippy::too_many_arguments)]
fn check_fp8_operands<T: FloatElem>(
    op: &'static str,
    dev: &CudaDevice,
    y: &DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    w: &Fp8Weights,
    bias: Option<&DeviceBuffer<T>>,
    m: usize,
    n: usize,
) -> Result<(), CudaError> {
    dev.check_buffer(op, "y", y)?;
    dev.check_buffer(op, "x", x)?;
    dev.check_buffer(op, "w", &w.codes)?;
    dev.check_buffer(op, "w scales", &w.scales)?;
    expect_len(op, "x [m, k]", x, m.saturating_mul(w.k))?;
    expect_len(op, "w [n, k]", &w.codes, w.n.saturating_mul(w.k))?;
    expect_len(op, "w scales [n]", &w.scales, w.n)?;
    expect_len(op, "y [m, n]", y, m.saturating_mul(n))?;
    if let Some(b) = bias {
        dev.check_buffer(op, "bias", b)?;
        expect_len(op, "bias [n]", b, w.n)?;
    }
    Ok(())
}

/// Launches fp8.cu's `{op}_{dtype}` gemv entry with one warp per output row (`rows` of them)
/// and the arguments (y, x, w codes, w scales, bias or null, ints...).
///
/// # Safety
/// The arguments must match the entry's signature, and every buffer must hold what the kernel
/// reads or writes for them (the callers check lengths, `fp8_supported` shapes and m).
#[allow(clippy::too_many_arguments)]
unsafe fn launch_fp8_gemv<T: FloatElem>(
    dev: &CudaDevice,
    op: &'static str,
    rows: usize,
    y: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    w: &Fp8Weights,
    bias: Option<&DeviceBuffer<T>>,
    ints: &[i32],
) -> Result<(), CudaError> {
    let name = entry::<T>(op);
    let f = dev.function(KernelId::Fp8, &[], &name)?;
    let cfg = LaunchConfig {
        grid_dim: (to_u32(op, "CTAs", rows.div_ceil(FP8_GEMV_WARPS))?, 1, 1),
        block_dim: ((FP8_GEMV_WARPS * 32) as u32, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut y.slice)
        .arg(&x.slice)
        .arg(&w.codes.slice)
        .arg(&w.scales.slice);
    match bias {
        Some(bias) => b.arg(&bias.slice),
        None => b.arg(&NULL_PTR),
    };
    for i in ints {
        b.arg(i);
    }
    // SAFETY: the caller guarantees the arguments match the entry and the buffers' sizes (this
    // function's contract); the block size is the kernels' launch bound.
    unsafe { b.launch(cfg) }.map_err(|e| launch_error(dev, &name, e))?;
    Ok(())
}

/// The FP8 gemv (`GemmBackend::Gemv`): y [m, n] for m in 1..=FP8_GEMV_MAX_M.
fn fp8_gemv<T: FloatElem>(
    dev: &CudaDevice,
    y: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    w: &Fp8Weights,
    bias: Option<&DeviceBuffer<T>>,
    m: usize,
) -> Result<(), CudaError> {
    const OP: &str = "fp8_gemv";
    let ints = [
        to_i32(OP, "m", m)?,
        to_i32(OP, "n", w.n)?,
        to_i32(OP, "k", w.k)?,
    ];
    // SAFETY: fp8_gemv (y, x, w, w_scale, bias, m, n, k); lengths checked by the caller
    // (`linear_fp8`), m <= FP8_GEMV_MAX_M, k % 16 == 0 (`fp8_supported`), so every row of codes
    // and of x starts 16-byte aligned and the kernel's loads stay inside it.
    unsafe { launch_fp8_gemv(dev, OP, w.n, y, x, w, bias, &ints) }
}

/// Whether `fp8_gated_gemv` takes a gated MLP's gate_up product of `m` rows.
pub fn fp8_gated_gemv_applies(m: usize) -> bool {
    (1..=FP8_GEMV_AUTO_MAX_M).contains(&m)
}

/// A gated MLP's FP8 gate_up product with the activation fused (fp8.cu `fp8_gemv_gated`), as
/// `gemv::gated_gemv` for float weights: y[m, inter] = act(gate) * up, gate and up rounded to T.
/// w: [2 * inter, k] codes (gate rows, then up rows) with [2 * inter] scales; bias [2 * inter].
pub fn fp8_gated_gemv<T: FloatElem>(
    dev: &CudaDevice,
    act: crate::tensor::Activation,
    y: &mut DeviceBuffer<T>,
    x: &DeviceBuffer<T>,
    w: &Fp8Weights,
    bias: Option<&DeviceBuffer<T>>,
    m: usize,
) -> Result<(), CudaError> {
    const OP: &str = "fp8_gemv_gated";
    if !fp8_gated_gemv_applies(m) || !w.n.is_multiple_of(2) {
        return Err(CudaError::invalid(
            OP,
            "m, n",
            format!("{m}, {}", w.n),
            format!("needs m in 1..={FP8_GEMV_AUTO_MAX_M} and an even n (gate | up rows)"),
        ));
    }
    let inter = w.n / 2;
    check_fp8_operands(OP, dev, y, x, w, bias, m, inter)?;
    let ints = [
        to_i32(OP, "m", m)?,
        to_i32(OP, "inter", inter)?,
        to_i32(OP, "k", w.k)?,
        act_code(act),
    ];
    // SAFETY: fp8_gemv_gated (y, x, w, w_scale, bias, m, inter, k, act); lengths checked above
    // (y [m, inter], x [m, k], codes [2 inter, k], scales and bias [2 inter]); m <= 8 and
    // k % 16 == 0 (Fp8Weights::upload), so the 16-byte loads stay inside each row.
    unsafe { launch_fp8_gemv(dev, OP, inter, y, x, w, bias, &ints) }
}

/// y[r, j] = y[r, j] * x_scale[r] * w_scale[j] + bias[j], in place (after a unit-scale product).
fn scale_rows<T: FloatElem>(
    dev: &CudaDevice,
    y: &mut DeviceBuffer<T>,
    x_scales: &DeviceBuffer<f32>,
    w: &Fp8Weights,
    bias: Option<&DeviceBuffer<T>>,
    m: usize,
) -> Result<(), CudaError> {
    const OP: &str = "fp8_scale_rows";
    let (mi, ni) = (to_i32(OP, "m", m)?, to_i32(OP, "n", w.n)?);
    let name = entry::<T>(OP);
    let f = dev.function(KernelId::Fp8, &[], &name)?;
    let mut b = dev.stream().launch_builder(&f);
    b.arg(&mut y.slice)
        .arg(&x_scales.slice)
        .arg(&w.scales.slice);
    match bias {
        Some(bias) => b.arg(&bias.slice),
        None => b.arg(&NULL_PTR),
    };
    b.arg(&mi).arg(&ni);
    // SAFETY: fp8_scale_rows (y, x_scale, w_scale, bias, m, n); y holds m * n, x_scales m,
    // w.scales and bias n elements (checked by `linear_fp8`); a grid-stride loop over m * n.
    unsafe { b.launch(elementwise_grid(m * w.n)) }.map_err(|e| launch_error(dev, &name, e))?;
    Ok(())
}

impl Gemm {
    /// `y[m, n] = x[m, k] · Wᵀ (+ bias)` with FP8 weights, the way `backend` says: `Auto` takes
    /// the gemv kernel for m <= FP8_GEMV_AUTO_MAX_M and cuBLASLt above; `Gemv` and `CublasLt`
    /// force one (an error where it cannot run the shape); `Cublas` has no FP8 product (an
    /// error). The cuBLASLt path quantizes x into `acts` first.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_fp8<T: FloatElem>(
        &self,
        dev: &CudaDevice,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        w: &Fp8Weights,
        bias: Option<&DeviceBuffer<T>>,
        m: usize,
        acts: &mut Fp8Activations,
        backend: GemmBackend,
    ) -> Result<GemmPath, CudaError> {
        const OP: &str = "fp8 gemm";
        let shape = GemmShape { m, n: w.n, k: w.k };
        self.check_device(OP, dev)?;
        check_fp8_operands(OP, dev, y, x, w, bias, m, w.n)?;
        if !fp8_supported(w.n, w.k) {
            return Err(CudaError::invalid(
                OP,
                "[n, k]",
                format!("[{}, {}]", w.n, w.k),
                "FP8 products need n and k multiples of 16",
            ));
        }
        let bias_path = |fused: bool| match (bias.is_some(), fused) {
            (false, _) => BiasPath::None,
            (true, true) => BiasPath::Epilogue,
            (true, false) => BiasPath::Kernel,
        };
        if m == 0 {
            return Ok(GemmPath {
                library: CudaLibrary::CublasLt,
                bias: bias_path(false),
            });
        }
        let use_gemv = match backend {
            GemmBackend::Gemv if m <= FP8_GEMV_MAX_M => true,
            GemmBackend::Gemv => {
                return Err(CudaError::invalid(
                    OP,
                    "m",
                    m,
                    format!("the FP8 gemv kernel takes m in 1..={FP8_GEMV_MAX_M}"),
                ));
            }
            GemmBackend::Auto => m <= FP8_GEMV_AUTO_MAX_M,
            GemmBackend::CublasLt => false,
            GemmBackend::Cublas => {
                return Err(CudaError::invalid(
                    OP,
                    "backend",
                    "cublas",
                    "cuBLAS has no FP8 product here; use cuBLASLt or the gemv kernel",
                ));
            }
        };
        if use_gemv {
            fp8_gemv(dev, y, x, w, bias, m)?;
            return Ok(GemmPath::own_kernel(bias.is_some()));
        }
        quantize_rows(dev, acts, x, m, w.k, w.input_scale)?;
        let mut state = self.begin_call()?;
        // Per-row scales in cuBLASLt (bias fused, then bias kernel), else unit scales and
        // scale_rows (which adds the bias after the scales, so never a fused one there).
        let mut tries = vec![];
        if bias.is_some() {
            tries.push((true, true));
        }
        tries.push((true, false));
        tries.push((false, false));
        for (outer_vec, fused) in tries {
            let ops = Operands::Fp8 {
                out: T::DTYPE,
                outer_vec,
            };
            let key = (ops, shape, fused);
            let b = if fused { bias } else { None };
            self.ensure_plan(&mut state.plans, key, &mut |p| {
                self.run_fp8(p, ops, y, &*acts, w, b, shape)
            })?;
            let Some(Some(plan)) = state.plans.get(&key) else {
                continue;
            };
            if let Err(e) = self.run_fp8(plan, ops, y, acts, w, b, shape) {
                // A library whose heuristic offers the outer-vector mode but whose matmul then
                // refuses it: remember that, and take the unit-scale form.
                if outer_vec {
                    state.plans.insert(key, None);
                    continue;
                }
                return Err(e);
            }
            if !outer_vec {
                scale_rows(dev, y, &acts.scales, w, bias, m)?;
                return Ok(GemmPath {
                    library: CudaLibrary::CublasLt,
                    bias: bias_path(false),
                });
            }
            if let (false, Some(bv)) = (fused, bias) {
                super::add_bias(dev, y, bv)?;
            }
            return Ok(GemmPath {
                library: CudaLibrary::CublasLt,
                bias: bias_path(fused),
            });
        }
        Err(CudaError::Blas {
            library: CudaLibrary::CublasLt,
            call: "cublasLtMatmulAlgoGetHeuristic",
            what: Operands::Fp8 {
                out: T::DTYPE,
                outer_vec: false,
            }
            .describe(shape, bias.is_some()),
            status: "no FP8 algorithm for this shape".into(),
        })
    }

    /// Runs an FP8 plan: W codes × quantized x → y, with the scale pointers of an outer-vector
    /// plan and the bias of a fused one.
    #[allow(clippy::too_many_arguments)]
    fn run_fp8<T: FloatElem>(
        &self,
        plan: &super::plan::LtPlan,
        ops: Operands,
        y: &mut DeviceBuffer<T>,
        acts: &Fp8Activations,
        w: &Fp8Weights,
        bias: Option<&DeviceBuffer<T>>,
        shape: GemmShape,
    ) -> Result<(), CudaError> {
        let what = ops.describe(shape, bias.is_some());
        let stream = &self.stream;
        let (ws_ptr, _g1) = w.scales.slice.device_ptr(stream);
        let (xs_ptr, _g2) = acts.scales.slice.device_ptr(stream);
        let (b_ptr, _g3) = match bias {
            Some(b) => {
                let (p, g) = b.slice.device_ptr(stream);
                (p, Some(g))
            }
            None => (NULL_PTR, None),
        };
        if let Operands::Fp8 {
            outer_vec: true, ..
        } = ops
        {
            // SAFETY: w.scales holds n and acts.scales m f32 (checked by `linear_fp8` and set
            // by `quantize_rows`), on this device, alive until the product below is queued.
            unsafe {
                set_pointer(plan, PointerAttr::AScale, ws_ptr, &what)?;
                set_pointer(plan, PointerAttr::BScale, xs_ptr, &what)?;
            }
        }
        if bias.is_some() {
            // SAFETY: the bias holds n elements of T (checked by `linear_fp8`).
            unsafe { set_pointer(plan, PointerAttr::Bias, b_ptr, &what)? };
        }
        let (w_ptr, _g4) = w.codes.slice.device_ptr(stream);
        let (x_ptr, _g5) = acts.codes.slice.device_ptr(stream);
        let (y_ptr, _g6) = y.slice.device_ptr_mut(stream);
        // SAFETY: the plan's layouts describe W codes [n, k], x codes [m, k] and y [m, n] of
        // `shape` (lengths checked by `linear_fp8`, acts set to [m, k] by `quantize_rows`), all
        // on this Gemm's device; the pointer attributes were set just above.
        unsafe { self.matmul(plan, w_ptr, x_ptr, y_ptr, &what) }
    }
}
