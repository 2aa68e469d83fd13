//! The fallback for shapes cuBLASLt has no algorithm for: plain cuBLAS `gemmEx` (accepts every
//! m, n, k and leading dimension; the caller adds the bias with a kernel). Its handle is created
//! on first use and kept in the `Gemm`'s locked state.

use std::ffi::c_void;

use cudarc::cublas::{result as blas, sys as blas_sys};
use cudarc::driver::{DevicePtr, DevicePtrMut};

use super::{Gemm, GemmShape, GemmState, describe};
use crate::cuda::buffer::{DeviceBuffer, FloatElem};
use crate::cuda::error::{CudaError, CudaLibrary};
use crate::dtype::DType;

fn blas_data_type(dtype: DType) -> blas_sys::cudaDataType {
    match dtype {
        DType::F32 => blas_sys::cudaDataType_t::CUDA_R_32F,
        DType::F16 => blas_sys::cudaDataType_t::CUDA_R_16F,
        DType::BF16 => blas_sys::cudaDataType_t::CUDA_R_16BF,
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

pub(super) struct BlasHandle(blas_sys::cublasHandle_t);

impl Drop for BlasHandle {
    fn drop(&mut self) {
        // SAFETY: the handle came from `cublasCreate` and is destroyed only here.
        let _ = unsafe { blas::destroy_handle(self.0) };
    }
}

impl Gemm {
    pub(super) fn run_blas<T: FloatElem>(
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
