//! Dense matrix products on the GPU: `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n])` with W row-major
//! `[out_features, in_features]`, as ferrum stores linear weights, for f32, bf16 and f16 with f32
//! accumulation.
//!
//! Why cuBLASLt first: its matmul takes the bias as a fused epilogue (one pass over y instead of
//! two), it exposes the algorithm heuristic so the choice per shape can be cached, and it is the
//! API later epilogues (activation, fp8 scales) hang off. Plain cuBLAS (`cublasGemmEx`) is the
//! fallback for any shape cuBLASLt has no algorithm for (it accepts every m, n, k and leading
//! dimension), with the bias added by `elementwise::add_bias`. Decode products of a few rows
//! (m <= `GEMV_AUTO_MAX_M`) go to ferrum's own memory-bound kernel (`kernels/gemv.cu`, 16-byte
//! weight loads, bias fused) instead, which streams the weights closer to the copy bandwidth.
//! f32 uses `CUBLAS_COMPUTE_32F` (no TF32), so f32 products are exact f32 arithmetic up to
//! summation order and can be compared tightly with the CPU engine.
//!
//! Row-major to column-major: cuBLAS sees row-major y `[m, n]` as column-major yᵀ `[n, m]`
//! (ld n), and yᵀ = W · xᵀ where W row-major `[n, k]` is column-major `[k, n]` (ld k) used
//! transposed, and x row-major `[m, k]` is column-major xᵀ `[k, m]` (ld k). So the call is
//! `op(A) = Aᵀ, A = W; B = x; M = n, N = m, K = k`, and the epilogue bias (one value per row of
//! the column-major result) is exactly bias[n].
//!
//! One `Gemm` per device: the cuBLASLt handle and its workspace (32 MiB on Hopper, 4 MiB before,
//! NVIDIA's recommendation) are created once; the descriptors, layouts and chosen algorithm of
//! each (dtype, m, n, k, bias) are created on first use and cached. The heuristic is asked for
//! several candidates; for decode-sized m (`tuned_m`: few rows, or a graph bucket) the first call of a
//! shape times each on the call's operands and keeps the fastest (never while the stream is
//! being captured into a graph). All calls are serialized by
//! one lock (the handles are used from one thread at a time). This module never synchronizes
//! and never panics; it knows nothing of models.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{CudaSlice, CudaStream, DevicePtr, DevicePtrMut};

use super::buffer::{DeviceBuffer, FloatElem};
use super::device::CudaDevice;
use super::elementwise::add_bias;
use super::error::{CudaError, CudaLibrary};
use super::kernels::KernelId;
use super::kernels::SmArch;
use super::ops::{NULL_PTR, expect_len, launch_error, to_i32, to_u32};
use crate::dtype::DType;
use cudarc::driver::{LaunchConfig, PushKernelArg};

/// Launches gemv.cu on shapes `linear_with` checked (lengths, device, gemv_supported).
fn gemv<T: FloatElem>(
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
        super::ops::act_code(act),
    ];
    // SAFETY: the arguments match gemv.cu's gemv_gated signature (y, x, w, bias, m, inter, k,
    // act); y holds m * inter, x m * k, w 2 * inter * k and bias 2 * inter elements (checked
    // above, all on this device); m <= GEMV_MAX_M and k * size_of::<T>() % 16 == 0, so every
    // row starts 16-byte aligned and the 16-byte loads stay inside it; warps past inter return.
    unsafe { launch_gemv_kernel(dev, OP, inter, y, x, w, bias, &ints) }
}

/// The sizes of one product: y `[m, n]` = x `[m, k]` · W `[n, k]`ᵀ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmShape {
    /// Rows of x and y (tokens in the step).
    pub m: usize,
    /// Output features: rows of W, columns of y.
    pub n: usize,
    /// Input features: columns of x and W (must be > 0).
    pub k: usize,
}

/// Which library runs a product.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GemmBackend {
    /// cuBLASLt, else cuBLAS where cuBLASLt has no algorithm for the shape.
    Auto,
    /// cuBLASLt only (an error where it has no algorithm): for tests.
    CublasLt,
    /// cuBLAS `gemmEx` + bias kernel: the fallback, selectable for tests.
    Cublas,
    /// ferrum's skinny-product kernel (`kernels/gemv.cu`, bias fused), for m <= GEMV_MAX_M and
    /// 16-byte rows (an error otherwise); Auto takes it for m <= GEMV_AUTO_MAX_M.
    Gemv,
}

/// Most rows of x the gemv kernel takes (gemv.cu `GEMV_MAX_M`).
pub const GEMV_MAX_M: usize = 8;
/// Most rows for which `GemmBackend::Auto` prefers the gemv kernel to cuBLASLt: each weight
/// vector meets m x vectors from L1, so the kernel stays memory-bound only for a few rows.
pub const GEMV_AUTO_MAX_M: usize = 4;
/// Warps (= output features) per CTA of the gemv kernel (gemv.cu `GEMV_WARPS`).
const GEMV_WARPS: usize = 4;

/// Whether the gemv kernel takes a product of `m` rows with `k` inputs in `dtype`.
pub fn gemv_supported(dtype: DType, m: usize, k: usize) -> bool {
    (1..=GEMV_MAX_M).contains(&m) && k > 0 && (k * dtype.size_in_bytes()) % 16 == 0
}

/// How the bias was applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BiasPath {
    /// The product had no bias.
    None,
    /// cuBLASLt's `EPILOGUE_BIAS`, fused into the product.
    Epilogue,
    /// A separate `add_bias` kernel after the product.
    Kernel,
}

/// What ran a product (returned so tests and benchmarks can see the fallbacks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmPath {
    /// `CublasLt` or `Cublas` for the library that ran the product; `Nvrtc` stands for ferrum's own
    /// gemv kernel (compiled by NVRTC).
    pub library: CudaLibrary,
    /// Whether and how the bias was added.
    pub bias: BiasPath,
}

fn lt_data_type(dtype: DType) -> lt_sys::cudaDataType {
    match dtype {
        DType::F32 => lt_sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => lt_sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => lt_sys::cudaDataType_t::CUDA_R_16BF,
    }
}

fn blas_data_type(dtype: DType) -> blas_sys::cudaDataType {
    match dtype {
        DType::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
    }
}

fn describe(dtype: DType, s: GemmShape, bias: bool) -> String {
    format!(
        "{dtype} gemm m={} n={} k={}{}",
        s.m,
        s.n,
        s.k,
        if bias { " (bias)" } else { "" }
    )
}

fn lt_error(call: &'static str, what: &str, e: lt::CublasError) -> CudaError {
    CudaError::Blas {
        library: CudaLibrary::CublasLt,
        call,
        what: what.to_owned(),
        status: format!("{:?}", e.0),
    }
}

fn blas_error(call: &'static str, what: &str, e: blas::CublasError) -> CudaError {
    CudaError::Blas {
        library: CudaLibrary::Cublas,
        call,
        what: what.to_owned(),
        status: format!("{:?}", e.0),
    }
}

// ---------------------------------------------------------------------------------------------
// Owners of the cuBLAS(Lt) objects: each destroys its object exactly once, on drop. A failure to
// destroy leaks it; there is nothing better to do in a destructor.

struct LtHandle(lt_sys::cublasLtHandle_t);

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `cublasLtCreate` and is destroyed only here.
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}

struct BlasHandle(blas_sys::cublasHandle_t);

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `cublasCreate` and is destroyed only here.
        let _ = unsafe { blas::destroy_handle(self.0) };
    }
}

struct LtDesc(lt_sys::cublasLtMatmulDesc_t);

impl Drop for LtDesc {
    fn drop(&mut self) {
        // SAFETY: created by `cublasLtMatmulDescCreate`, destroyed only here.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

struct LtLayout(lt_sys::cublasLtMatrixLayout_t);

impl Drop for LtLayout {
    fn drop(&mut self) {
        // SAFETY: created by `cublasLtMatrixLayoutCreate`, destroyed only here.
        let _ = unsafe { lt::destroy_matrix_layout(self.0) };
    }
}

struct LtPref(lt_sys::cublasLtMatmulPreference_t);

impl Drop for LtPref {
    fn drop(&mut self) {
        // SAFETY: created by `cublasLtMatmulPreferenceCreate`, destroyed only here.
        let _ = unsafe { lt::destroy_matmul_pref(self.0) };
    }
}

/// Everything cuBLASLt needs to run one (dtype, shape, bias) product.
struct LtPlan {
    desc: LtDesc,
    /// W: column-major [k, n], ld k, used transposed.
    a: LtLayout,
    /// x: column-major [k, m], ld k.
    b: LtLayout,
    /// y: column-major [n, m], ld n (also the layout of C, which beta = 0 ignores).
    c: LtLayout,
    algo: lt_sys::cublasLtMatmulAlgo_t,
    /// The heuristic's candidates, best guess first (`algo` is one of them).
    candidates: Vec<lt_sys::cublasLtMatmulAlgo_t>,
}

/// Algorithms asked of cuBLASLt's heuristic per shape.
const NUM_HEURISTIC_CANDIDATES: usize = 8;
/// Products with m up to this are tuned by timing (decode shapes, memory-bound, where the
/// heuristic's first guess is often not the fastest); larger ones take the heuristic's first,
/// except powers of two up to `MAX_TUNED_BUCKET_M` (`tuned_m`).
pub const MAX_TUNED_M: usize = 64;
/// Decode steps of large batches run at the executor's graph bucket sizes (powers of two), so
/// those m are few and each is worth timing; prefill chunks of other sizes are not (a chunk of
/// exactly a power of two tokens is timed too, once per shape).
pub const MAX_TUNED_BUCKET_M: usize = 1024;

/// Whether a product of m rows is tuned by timing its candidates.
pub fn tuned_m(m: usize) -> bool {
    m <= MAX_TUNED_M || (m <= MAX_TUNED_BUCKET_M && m.is_power_of_two())
}
/// Timed runs per candidate.
const TUNE_REPEATS: usize = 5;

type PlanKey = (DType, GemmShape, bool);

/// State behind the lock: cached plans (None: cuBLASLt has no algorithm for that key) and the
/// lazily created cuBLAS handle of the fallback.
#[derive(Default)]
struct GemmState {
    plans: HashMap<PlanKey, Option<LtPlan>>,
    blas: Option<BlasHandle>,
}

/// The GEMM engine of one device.
pub struct Gemm {
    stream: Arc<CudaStream>,
    ordinal: usize,
    lt: LtHandle,
    workspace: CudaSlice<u8>,
    state: Mutex<GemmState>,
    /// Whether new small-m shapes are tuned by timing their candidates (`MAX_TUNED_M`).
    tuning: bool,
}

// SAFETY: the raw cuBLAS(Lt) handles and descriptors are only used while holding `state`'s lock
// (`linear` takes it for the whole call), so no two threads use them at once; cuBLAS allows a
// handle to move between threads as long as calls on it do not overlap.
unsafe impl Send for Gemm {}
// SAFETY: as above: every use of the raw objects is behind the lock.
unsafe impl Sync for Gemm {}

impl std::fmt::Debug for Gemm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gemm")
            .field("ordinal", &self.ordinal)
            .field("workspace_bytes", &self.workspace.len())
            .finish_non_exhaustive()
    }
}

impl Gemm {
    /// Creates the cuBLASLt handle and allocates its workspace on `dev`.
    pub fn new(dev: &CudaDevice) -> Result<Self, CudaError> {
        let stream = dev.stream().clone();
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| CudaError::driver("binding the context for cuBLASLt", e))?;
        let handle =
            LtHandle(lt::create_handle().map_err(|e| lt_error("cublasLtCreate", "handle", e))?);
        let workspace = stream
            .alloc_zeros::<u8>(Self::workspace_bytes(dev.arch()))
            .map_err(|e| CudaError::driver("allocating the cuBLASLt workspace", e))?;
        Ok(Gemm {
            stream,
            ordinal: dev.ordinal(),
            lt: handle,
            workspace,
            state: Mutex::new(GemmState::default()),
            tuning: true,
        })
    }

    /// Turns timing-based algorithm choice for small m on or off (on by default); off, every
    /// shape takes the heuristic's first algorithm.
    pub fn set_tuning(&mut self, on: bool) {
        self.tuning = on;
    }

    fn capturing(&self) -> Result<bool, CudaError> {
        let status = self
            .stream
            .capture_status()
            .map_err(|e| CudaError::driver("reading the stream's capture status", e))?;
        Ok(status != cudarc::driver::sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE)
    }

    /// cuBLASLt workspace size for `arch`: 32 MiB on Hopper and newer, 4 MiB before.
    pub fn workspace_bytes(arch: SmArch) -> usize {
        if arch >= SmArch::SM90 {
            32 << 20
        } else {
            4 << 20
        }
    }

    /// cuBLASLt plans created so far (grows when a product meets a new shape: heuristic query
    /// and, for `tuned_m`, candidate timing).
    pub fn num_plans(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .plans
            .len()
    }

    /// `y[m, n] = x[m, k] · W[n, k]ᵀ (+ bias[n])`, choosing the library per `GemmBackend::Auto`.
    pub fn linear<T: FloatElem>(
        &self,
        dev: &CudaDevice,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        w: &DeviceBuffer<T>,
        bias: Option<&DeviceBuffer<T>>,
        shape: GemmShape,
    ) -> Result<GemmPath, CudaError> {
        self.linear_with(dev, y, x, w, bias, shape, GemmBackend::Auto)
    }

    /// `linear` with an explicit backend.
    ///
    /// y: [m, n]; x: [m, k]; w: [n, k]; bias: [n]. All on this Gemm's device; k > 0.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_with<T: FloatElem>(
        &self,
        dev: &CudaDevice,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        w: &DeviceBuffer<T>,
        bias: Option<&DeviceBuffer<T>>,
        shape: GemmShape,
        backend: GemmBackend,
    ) -> Result<GemmPath, CudaError> {
        const OP: &str = "gemm";
        let GemmShape { m, n, k } = shape;
        if dev.ordinal() != self.ordinal {
            return Err(CudaError::invalid(
                OP,
                "device",
                dev.ordinal(),
                format!("this Gemm belongs to device {}", self.ordinal),
            ));
        }
        dev.check_buffer(OP, "y", y)?;
        dev.check_buffer(OP, "x", x)?;
        dev.check_buffer(OP, "w", w)?;
        for (what, v) in [("m", m), ("n", n), ("k", k)] {
            if i32::try_from(v).is_err() {
                return Err(CudaError::invalid(OP, what, v, "must fit in i32"));
            }
        }
        if k == 0 {
            return Err(CudaError::invalid(OP, "k", 0, "must be > 0"));
        }
        let len = |a: usize, b: usize| a.saturating_mul(b);
        expect_len(OP, "x [m, k]", x, len(m, k))?;
        expect_len(OP, "w [n, k]", w, len(n, k))?;
        expect_len(OP, "y [m, n]", y, len(m, n))?;
        if let Some(b) = bias {
            dev.check_buffer(OP, "bias", b)?;
            expect_len(OP, "bias [n]", b, n)?;
        }
        let bias_path = if bias.is_some() {
            BiasPath::Kernel
        } else {
            BiasPath::None
        };
        if m == 0 || n == 0 {
            return Ok(GemmPath {
                library: CudaLibrary::CublasLt,
                bias: bias_path,
            });
        }
        let use_gemv = match backend {
            GemmBackend::Gemv => {
                if !gemv_supported(T::DTYPE, m, k) {
                    return Err(CudaError::invalid(
                        OP,
                        "shape",
                        describe(T::DTYPE, shape, bias.is_some()),
                        format!(
                            "the gemv kernel needs m in 1..={GEMV_MAX_M} and 16-byte rows of x and W"
                        ),
                    ));
                }
                true
            }
            GemmBackend::Auto => m <= GEMV_AUTO_MAX_M && gemv_supported(T::DTYPE, m, k),
            GemmBackend::CublasLt | GemmBackend::Cublas => false,
        };
        if use_gemv {
            gemv(dev, y, x, w, bias, shape)?;
            return Ok(GemmPath {
                library: CudaLibrary::Nvrtc,
                bias: if bias.is_some() {
                    BiasPath::Epilogue
                } else {
                    BiasPath::None
                },
            });
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| CudaError::driver("binding the context for a GEMM", e))?;
        // A poisoned lock only means a panic elsewhere while holding it; the maps stay valid.
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if backend != GemmBackend::Cublas {
            // Fused bias first, then the plain product (+ bias kernel).
            let mut tries = vec![];
            if bias.is_some() {
                tries.push(true);
            }
            tries.push(false);
            for fused in tries {
                let key = (T::DTYPE, shape, fused);
                if let std::collections::hash_map::Entry::Vacant(e) = state.plans.entry(key) {
                    let mut plan = self.lt_plan(T::DTYPE, shape, fused)?;
                    if let Some(p) = &mut plan
                        && tuned_m(m)
                        && self.tuning
                        && !self.capturing()?
                    {
                        self.tune(p, y, x, w, if fused { bias } else { None }, shape)?;
                    }
                    e.insert(plan);
                }
                if let Some(Some(plan)) = state.plans.get(&key) {
                    self.run_lt(
                        plan,
                        y,
                        x,
                        w,
                        if fused { bias } else { None },
                        T::DTYPE,
                        shape,
                    )?;
                    let bias_path = match (fused, bias) {
                        (true, _) => BiasPath::Epilogue,
                        (false, Some(b)) => {
                            add_bias(dev, y, b)?;
                            BiasPath::Kernel
                        }
                        (false, None) => BiasPath::None,
                    };
                    return Ok(GemmPath {
                        library: CudaLibrary::CublasLt,
                        bias: bias_path,
                    });
                }
            }
            if backend == GemmBackend::CublasLt {
                return Err(CudaError::Blas {
                    library: CudaLibrary::CublasLt,
                    call: "cublasLtMatmulAlgoGetHeuristic",
                    what: describe(T::DTYPE, shape, bias.is_some()),
                    status: "no algorithm for this shape".into(),
                });
            }
        }
        self.run_blas(&mut state, y, x, w, T::DTYPE, shape)?;
        if let Some(b) = bias {
            add_bias(dev, y, b)?;
        }
        Ok(GemmPath {
            library: CudaLibrary::Cublas,
            bias: bias_path,
        })
    }

    /// Descriptors and the heuristic's best algorithm for one product; None when cuBLASLt has
    /// no algorithm for it.
    fn lt_plan(&self, dtype: DType, s: GemmShape, bias: bool) -> Result<Option<LtPlan>, CudaError> {
        let what = describe(dtype, s, bias);
        let err = |call, e| lt_error(call, &what, e);
        let ty = lt_data_type(dtype);
        let desc = LtDesc(
            lt::create_matmul_desc(
                lt_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                lt_sys::cudaDataType_t::CUDA_R_32F,
            )
            .map_err(|e| err("cublasLtMatmulDescCreate", e))?,
        );
        let trans_a = blas_sys::cublasOperation_t::CUBLAS_OP_T;
        let trans_b = blas_sys::cublasOperation_t::CUBLAS_OP_N;
        let set =
            |attr: lt_sys::cublasLtMatmulDescAttributes_t, ptr: *const c_void, size: usize| {
                // SAFETY: `desc` is live; `ptr` points at a value of `size` bytes of the type the
                // attribute takes (cublasOperation_t / cublasLtEpilogue_t / cudaDataType: 4 bytes),
                // which cuBLASLt copies before returning.
                unsafe { lt::set_matmul_desc_attribute(desc.0, attr, ptr, size) }
                    .map_err(|e| err("cublasLtMatmulDescSetAttribute", e))
            };
        set(
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            (&trans_a as *const blas_sys::cublasOperation_t).cast(),
            std::mem::size_of_val(&trans_a),
        )?;
        set(
            lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
            (&trans_b as *const blas_sys::cublasOperation_t).cast(),
            std::mem::size_of_val(&trans_b),
        )?;
        if bias {
            let epilogue = lt_sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS;
            set(
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                (&epilogue as *const lt_sys::cublasLtEpilogue_t).cast(),
                std::mem::size_of_val(&epilogue),
            )?;
            set(
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                (&ty as *const lt_sys::cudaDataType).cast(),
                std::mem::size_of_val(&ty),
            )?;
        }
        let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
        let layout = |rows: u64, cols: u64, ld: u64| {
            lt::create_matrix_layout(ty, rows, cols, ld as i64)
                .map(LtLayout)
                .map_err(|e| err("cublasLtMatrixLayoutCreate", e))
        };
        let a = layout(k, n, k)?;
        let b = layout(k, m, k)?;
        let c = layout(n, m, n)?;
        let pref =
            LtPref(lt::create_matmul_pref().map_err(|e| err("cublasLtMatmulPreferenceCreate", e))?);
        let ws = self.workspace.len();
        // SAFETY: `pref` is live; the attribute takes a u64 (size_t) byte count, copied by cuBLASLt.
        unsafe {
            lt::set_matmul_pref_attribute(
                pref.0,
                lt_sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                (&ws as *const usize).cast(),
                std::mem::size_of::<usize>(),
            )
        }
        .map_err(|e| err("cublasLtMatmulPreferenceSetAttribute", e))?;
        let mut results = [lt_sys::cublasLtMatmulHeuristicResult_t {
            algo: lt_sys::cublasLtMatmulAlgo_t { data: [0; 8] },
            workspaceSize: 0,
            state: lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS,
            wavesCount: 0.0,
            reserved: [0; 4],
        }; NUM_HEURISTIC_CANDIDATES];
        let mut count = 0i32;
        // SAFETY: every descriptor and layout above is live; the heuristic only reads them and
        // writes at most NUM_HEURISTIC_CANDIDATES results into `results` and their count.
        let status = unsafe {
            lt_sys::cublasLtMatmulAlgoGetHeuristic(
                self.lt.0,
                desc.0,
                a.0,
                b.0,
                c.0,
                c.0,
                pref.0,
                NUM_HEURISTIC_CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut count,
            )
        };
        match status.result() {
            Ok(()) => {}
            Err(lt::CublasError(lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED)) => {
                return Ok(None);
            }
            Err(e) => return Err(err("cublasLtMatmulAlgoGetHeuristic", e)),
        }
        let candidates: Vec<lt_sys::cublasLtMatmulAlgo_t> = results
            .iter()
            .take(count.clamp(0, NUM_HEURISTIC_CANDIDATES as i32) as usize)
            .filter(|r| r.state == lt_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        // No algorithm: fall back.
        let Some(&algo) = candidates.first() else {
            return Ok(None);
        };
        Ok(Some(LtPlan {
            desc,
            a,
            b,
            c,
            algo,
            candidates,
        }))
    }

    /// Times each heuristic candidate of `plan` on the call's own operands (`TUNE_REPEATS`
    /// runs each after one warm-up, CUDA events) and keeps the fastest. Synchronizes: run only
    /// outside graph capture, once per shape.
    #[allow(clippy::too_many_arguments)]
    fn tune<T: FloatElem>(
        &self,
        plan: &mut LtPlan,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        w: &DeviceBuffer<T>,
        bias: Option<&DeviceBuffer<T>>,
        shape: GemmShape,
    ) -> Result<(), CudaError> {
        if plan.candidates.len() < 2 {
            return Ok(());
        }
        let event = |what: &'static str| {
            self.stream
                .record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| CudaError::driver(what, e))
        };
        let mut best: Option<(f32, lt_sys::cublasLtMatmulAlgo_t)> = None;
        for algo in plan.candidates.clone() {
            plan.algo = algo;
            // An algorithm the heuristic offered may still refuse this problem: skip it.
            if self.run_lt(plan, y, x, w, bias, T::DTYPE, shape).is_err() {
                continue;
            }
            let start = event("timing a GEMM candidate")?;
            let mut ok = true;
            for _ in 0..TUNE_REPEATS {
                ok &= self.run_lt(plan, y, x, w, bias, T::DTYPE, shape).is_ok();
            }
            let end = event("timing a GEMM candidate")?;
            let ms = start
                .elapsed_ms(&end)
                .map_err(|e| CudaError::driver("timing a GEMM candidate", e))?;
            if ok && best.is_none_or(|(b, _)| ms < b) {
                best = Some((ms, algo));
            }
        }
        plan.algo = match best {
            Some((_, algo)) => algo,
            None => plan.candidates[0],
        };
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn run_lt<T: FloatElem>(
        &self,
        plan: &LtPlan,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        w: &DeviceBuffer<T>,
        bias: Option<&DeviceBuffer<T>>,
        dtype: DType,
        shape: GemmShape,
    ) -> Result<(), CudaError> {
        let what = describe(dtype, shape, bias.is_some());
        let stream = &self.stream;
        if let Some(b) = bias {
            let (bias_ptr, _guard) = b.slice.device_ptr(stream);
            // SAFETY: the plan's descriptor is live and used under the lock; the attribute takes
            // a device pointer (8 bytes), copied by cuBLASLt; the bias holds n elements of the
            // plan's dtype (checked by `linear_with`).
            unsafe {
                lt::set_matmul_desc_attribute(
                    plan.desc.0,
                    lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&bias_ptr as *const u64).cast(),
                    std::mem::size_of::<u64>(),
                )
            }
            .map_err(|e| lt_error("cublasLtMatmulDescSetAttribute", &what, e))?;
        }
        let (alpha, beta) = (1.0f32, 0.0f32);
        let (w_ptr, _gw) = w.slice.device_ptr(stream);
        let (x_ptr, _gx) = x.slice.device_ptr(stream);
        let (y_ptr, _gy) = y.slice.device_ptr_mut(stream);
        let (ws_ptr, _gws) = self.workspace.device_ptr(stream);
        // SAFETY: the plan's layouts describe w ([n, k]), x ([m, k]) and y ([m, n]) of `shape`,
        // whose lengths `linear_with` checked; alpha/beta are f32 as the descriptor's scale type;
        // the workspace holds `workspace.len()` bytes, the size the heuristic was given; all
        // buffers live on this Gemm's device and the call is ordered on its stream.
        unsafe {
            lt::matmul(
                self.lt.0,
                plan.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w_ptr as *const c_void,
                plan.a.0,
                x_ptr as *const c_void,
                plan.b.0,
                y_ptr as *const c_void,
                plan.c.0,
                y_ptr as *mut c_void,
                plan.c.0,
                &plan.algo,
                ws_ptr as *mut c_void,
                self.workspace.len(),
                stream.cu_stream() as lt_sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_error("cublasLtMatmul", &what, e))
    }

    fn run_blas<T: FloatElem>(
        &self,
        state: &mut GemmState,
        y: &mut DeviceBuffer<T>,
        x: &DeviceBuffer<T>,
        w: &DeviceBuffer<T>,
        dtype: DType,
        shape: GemmShape,
    ) -> Result<(), CudaError> {
        let what = describe(dtype, shape, false);
        if state.blas.is_none() {
            let handle = BlasHandle(
                blas::create_handle().map_err(|e| blas_error("cublasCreate", &what, e))?,
            );
            // SAFETY: the handle was just created; the stream is this device's, alive as long
            // as `self`.
            unsafe {
                blas::set_stream(handle.0, self.stream.cu_stream() as blas_sys::cudaStream_t)
            }
            .map_err(|e| blas_error("cublasSetStream", &what, e))?;
            state.blas = Some(handle);
        }
        let Some(handle) = &state.blas else {
            return Err(blas_error(
                "cublasCreate",
                &what,
                blas::CublasError(blas_sys::cublasStatus_t::CUBLAS_STATUS_NOT_INITIALIZED),
            ));
        };
        let ty = blas_data_type(dtype);
        let (m, n, k) = (shape.m as i32, shape.n as i32, shape.k as i32);
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = &self.stream;
        let (w_ptr, _gw) = w.slice.device_ptr(stream);
        let (x_ptr, _gx) = x.slice.device_ptr(stream);
        let (y_ptr, _gy) = y.slice.device_ptr_mut(stream);
        // SAFETY: column-major M = n, N = m, K = k with A = W (ld k, transposed), B = x (ld k)
        // and C = y (ld n): exactly the lengths `linear_with` checked; m, n, k fit in i32;
        // alpha/beta are f32 as CUBLAS_COMPUTE_32F requires; ordered on this device's stream.
        unsafe {
            blas::gemm_ex(
                handle.0,
                blas_sys::cublasOperation_t::CUBLAS_OP_T,
                blas_sys::cublasOperation_t::CUBLAS_OP_N,
                n,
                m,
                k,
                (&alpha as *const f32).cast(),
                w_ptr as *const c_void,
                ty,
                k,
                x_ptr as *const c_void,
                ty,
                k,
                (&beta as *const f32).cast(),
                y_ptr as *mut c_void,
                ty,
                n,
                blas_sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                blas_sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| blas_error("cublasGemmEx", &what, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_sizes_and_graph_buckets_are_tuned_prefill_chunks_are_not() {
        for m in [1, 4, 63, 64, 128, 256, 512, 1024] {
            assert!(tuned_m(m), "{m}");
        }
        for m in [65, 100, 300, 2048, 8192, 1000] {
            assert!(!tuned_m(m), "{m}");
        }
    }
}
