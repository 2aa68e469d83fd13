//! The cuBLASLt side of a product: the library handle, its error and dtype mappings, and the
//! matmul call that runs a planned product (`Gemm::run_lt`). Planning is `plan`'s job.

use std::ffi::c_void;

use cudarc::cublaslt::{result as lt, sys as lt_sys};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::plan::LtPlan;
use super::{Gemm, GemmShape, describe};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::error::{CudaError, CudaLibrary};
use crate::dtype::DType;

pub(super) fn lt_data_type(dtype: DType) -> lt_sys::cudaDataType {
    match dtype {
        DType::F32 => lt_sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => lt_sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => lt_sys::cudaDataType_t::CUDA_R_16BF,
    }
}

pub(super) fn lt_error(call: &'static str, what: &str, e: lt::CublasError) -> CudaError {
    CudaError::Blas {
        library: CudaLibrary::CublasLt,
        call,
        what: what.to_owned(),
        status: format!("{:?}", e.0),
    }
}

// ---------------------------------------------------------------------------------------------
// Owner of the cuBLASLt handle (`plan` owns the other cuBLASLt objects, `blas` the cuBLAS
// handle): destroys it exactly once, on drop. A failure to destroy leaks it; there is nothing
// better to do in a destructor.

pub(super) struct LtHandle(pub(super) lt_sys::cublasLtHandle_t);

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `cublasLtCreate` and is destroyed only here.
        let _ = unsafe { lt::destroy_handle(self.0) };
    }
}

/// The device-pointer attributes of a plan's descriptor set per call.
#[derive(Debug, Clone, Copy)]
pub(super) enum PointerAttr {
    /// The epilogue bias: [n] in the output dtype.
    Bias,
    /// A's (W's) scales: one f32, or [n] f32 in the outer-vector mode.
    AScale,
    /// B's (x's) scales: one f32, or [m] f32 in the outer-vector mode.
    BScale,
}

/// Points `attr` of `plan`'s descriptor at device memory `ptr`.
///
/// # Safety
/// `ptr` must be live device memory holding what the attribute needs for the products the plan
/// runs next (see `PointerAttr`), until they have run.
pub(super) unsafe fn set_pointer(
    plan: &LtPlan,
    attr: PointerAttr,
    ptr: u64,
    what: &str,
) -> Result<(), CudaError> {
    use lt_sys::cublasLtMatmulDescAttributes_t as A;
    let attr = match attr {
        PointerAttr::Bias => A::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
        PointerAttr::AScale => A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
        PointerAttr::BScale => A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
    };
    // SAFETY: the plan's descriptor is live and used under the Gemm's lock; the attribute takes
    // a device pointer (8 bytes), copied by cuBLASLt before returning.
    unsafe {
        lt::set_matmul_desc_attribute(
            plan.desc.0,
            attr,
            (&ptr as *const u64).cast(),
            std::mem::size_of::<u64>(),
        )
    }
    .map_err(|e| lt_error("cublasLtMatmulDescSetAttribute", what, e))
}

impl Gemm {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run_lt<T: FloatElem>(
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
            // SAFETY: the bias holds n elements of the plan's dtype (checked by `linear_with`).
            unsafe { set_pointer(plan, PointerAttr::Bias, bias_ptr, &what) }?;
        }
        let (w_ptr, _gw) = w.slice.device_ptr(stream);
        let (x_ptr, _gx) = x.slice.device_ptr(stream);
        let (y_ptr, _gy) = y.slice.device_ptr_mut(stream);
        // SAFETY: the plan's layouts describe w ([n, k]), x ([m, k]) and y ([m, n]) of `shape`
        // in `dtype`, whose lengths `linear_with` checked; all live on this Gemm's device.
        unsafe { self.matmul(plan, w_ptr, x_ptr, y_ptr, &what) }
    }

    /// Runs `plan` on raw device pointers: D = y = op(A = w) · (B = x), C = D with beta 0.
    ///
    /// # Safety
    /// `w`, `x` and `y` must be device allocations on this Gemm's device holding at least what
    /// the plan's layouts A, B and C describe, and every pointer attribute set on the plan's
    /// descriptor (bias, scales) must point at live device memory of the sizes the plan needs.
    pub(super) unsafe fn matmul(
        &self,
        plan: &LtPlan,
        w: u64,
        x: u64,
        y: u64,
        what: &str,
    ) -> Result<(), CudaError> {
        let (alpha, beta) = (1.0f32, 0.0f32);
        let stream = &self.stream;
        let (ws_ptr, _gws) = self.workspace.device_ptr(stream);
        // SAFETY: the caller guarantees the operands match the plan's layouts; alpha/beta are
        // f32 as the descriptor's scale type; the workspace holds `workspace.len()` bytes, the
        // size the heuristic was given; the call is ordered on this Gemm's stream.
        unsafe {
            lt::matmul(
                self.lt.0,
                plan.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                w as *const c_void,
                plan.a.0,
                x as *const c_void,
                plan.b.0,
                y as *const c_void,
                plan.c.0,
                y as *mut c_void,
                plan.c.0,
                &plan.algo,
                ws_ptr as *mut c_void,
                self.workspace.len(),
                stream.cu_stream() as lt_sys::cudaStream_t,
            )
        }
        .map_err(|e| lt_error("cublasLtMatmul", what, e))
    }
}
