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
//!
//! Files: this one (the public types, `Gemm` and the dispatch in `linear_with`), `plan`
//! (cuBLASLt descriptors, the algorithm heuristic, timing-based tuning and which m are tuned),
//! `lt` (the cuBLASLt matmul call), `blas` (the cuBLAS `gemmEx` fallback) and `gemv` (ferrum's
//! own kernel for a few rows, and the gated-MLP variant), `fp8` (E4M3 weights: activation
//! quantization, the cuBLASLt FP8 product with its scales, and the FP8 gemv kernels), planning
//! through `plan` and running through `lt` like the float products.

mod blas;
pub mod fp8;
mod gemv;
mod lt;
mod plan;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream};

use super::buffer::{DeviceBuffer, FloatElem};
use super::device::CudaDevice;
use super::elementwise::add_bias;
use super::error::{CudaError, CudaLibrary};
use super::kernels::SmArch;
use super::ops::expect_len;
use crate::dtype::DType;
use blas::BlasHandle;
use gemv::gemv;
pub use gemv::{GEMV_AUTO_MAX_M, GEMV_MAX_M, gated_gemv, gated_gemv_applies, gemv_supported};
use lt::{LtHandle, lt_error};
use plan::LtPlan;
pub use plan::{MAX_TUNED_BUCKET_M, MAX_TUNED_M, tuned_m};

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

impl GemmPath {
    /// A product run by one of ferrum's own kernels (NVRTC), the bias (if any) fused.
    fn own_kernel(bias: bool) -> Self {
        GemmPath {
            library: CudaLibrary::Nvrtc,
            bias: if bias {
                BiasPath::Epilogue
            } else {
                BiasPath::None
            },
        }
    }
}

fn describe(dtype: DType, s: GemmShape, bias: bool) -> String {
    Operands::Float(dtype).describe(s, bias)
}

/// The operand types of a cuBLASLt product (the part of a plan's key that is not the shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Operands {
    /// W, x and y all in one float dtype.
    Float(DType),
    /// W and x in FP8 E4M3, y (and the bias) in `out`; `outer_vec`: per-row scales of W and x
    /// applied by cuBLASLt (else unit scales and `fp8::scale_rows` after).
    Fp8 { out: DType, outer_vec: bool },
}

impl Operands {
    fn describe(self, s: GemmShape, bias: bool) -> String {
        let ty = match self {
            Operands::Float(d) => d.to_string(),
            Operands::Fp8 { out, outer_vec } => format!(
                "fp8 e4m3 -> {out}{}",
                if outer_vec { " (per-row scales)" } else { "" }
            ),
        };
        format!(
            "{ty} gemm m={} n={} k={}{}",
            s.m,
            s.n,
            s.k,
            if bias { " (bias)" } else { "" }
        )
    }
}

type PlanKey = (Operands, GemmShape, bool);

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
        let handle = LtHandle(
            cudarc::cublaslt::result::create_handle()
                .map_err(|e| lt_error("cublasLtCreate", "handle", e))?,
        );
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

    /// Refuses a device other than this Gemm's.
    fn check_device(&self, op: &'static str, dev: &CudaDevice) -> Result<(), CudaError> {
        if dev.ordinal() != self.ordinal {
            return Err(CudaError::invalid(
                op,
                "device",
                dev.ordinal(),
                format!("this Gemm belongs to device {}", self.ordinal),
            ));
        }
        Ok(())
    }

    /// Binds the device's context to this thread and takes the lock every cuBLAS(Lt) call runs
    /// under. A poisoned lock only means a panic elsewhere while holding it; the maps stay valid.
    fn begin_call(&self) -> Result<std::sync::MutexGuard<'_, GemmState>, CudaError> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| CudaError::driver("binding the context for a GEMM", e))?;
        Ok(self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Makes sure `plans` holds the plan of `key` (None where cuBLASLt has no algorithm): created
    /// on first use and, for a `tuned_m` shape outside graph capture with tuning on, its
    /// candidates timed with `run` (the call's own operands).
    fn ensure_plan(
        &self,
        plans: &mut HashMap<PlanKey, Option<LtPlan>>,
        key: PlanKey,
        run: &mut dyn FnMut(&LtPlan) -> Result<(), CudaError>,
    ) -> Result<(), CudaError> {
        let (operands, shape, fused) = key;
        if let std::collections::hash_map::Entry::Vacant(e) = plans.entry(key) {
            let mut plan = self.lt_plan(operands, shape, fused)?;
            if let Some(p) = &mut plan
                && tuned_m(shape.m)
                && self.tuning
                && !self.capturing()?
            {
                self.tune(p, run)?;
            }
            e.insert(plan);
        }
        Ok(())
    }

    /// The cuBLASLt plans created so far, described (operand types, per-row scales, shape,
    /// bias; `none` where cuBLASLt had no algorithm), sorted: what tests and logs print to show
    /// which variant ran.
    pub fn plan_descriptions(&self) -> Vec<String> {
        let state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut v: Vec<String> = state
            .plans
            .iter()
            .map(|((ops, shape, bias), plan)| {
                format!(
                    "{}: {}",
                    ops.describe(*shape, *bias),
                    if plan.is_some() { "planned" } else { "none" }
                )
            })
            .collect();
        v.sort();
        v
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
        self.check_device(OP, dev)?;
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
            return Ok(GemmPath::own_kernel(bias.is_some()));
        }
        let mut state = self.begin_call()?;
        if backend != GemmBackend::Cublas {
            // Fused bias first, then the plain product (+ bias kernel).
            let mut tries = vec![];
            if bias.is_some() {
                tries.push(true);
            }
            tries.push(false);
            for fused in tries {
                let key = (Operands::Float(T::DTYPE), shape, fused);
                let b = if fused { bias } else { None };
                self.ensure_plan(&mut state.plans, key, &mut |p| {
                    self.run_lt(p, y, x, w, b, T::DTYPE, shape)
                })?;
                if let Some(Some(plan)) = state.plans.get(&key) {
                    self.run_lt(plan, y, x, w, b, T::DTYPE, shape)?;
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
}
