//! Planning a cuBLASLt product: the descriptors and layouts of one (dtype, shape, bias), the
//! heuristic's candidate algorithms, and for decode-sized m (`tuned_m`) timing them on the
//! call's operands to keep the fastest. `Gemm` caches the plans per key; running one is `lt`'s
//! job.

use std::ffi::c_void;

use cudarc::cublas::sys as blas_sys;
use cudarc::cublaslt::{result as lt, sys as lt_sys};

use super::lt::{lt_data_type, lt_error};
use super::{Gemm, GemmShape, Operands};
use crate::cuda::error::CudaError;

// Owners of the cuBLASLt objects of a plan: each destroys its object exactly once, on drop. A
// failure to destroy leaks it; there is nothing better to do in a destructor.

pub(super) struct LtDesc(pub(super) lt_sys::cublasLtMatmulDesc_t);

impl Drop for LtDesc {
    fn drop(&mut self) {
        // SAFETY: created by `cublasLtMatmulDescCreate`, destroyed only here.
        let _ = unsafe { lt::destroy_matmul_desc(self.0) };
    }
}

pub(super) struct LtLayout(pub(super) lt_sys::cublasLtMatrixLayout_t);

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

/// Everything cuBLASLt needs to run one (operands, shape, bias) product.
pub(super) struct LtPlan {
    pub(super) desc: LtDesc,
    /// W: column-major [k, n], ld k, used transposed.
    pub(super) a: LtLayout,
    /// x: column-major [k, m], ld k.
    pub(super) b: LtLayout,
    /// y: column-major [n, m], ld n (also the layout of C, which beta = 0 ignores).
    pub(super) c: LtLayout,
    pub(super) algo: lt_sys::cublasLtMatmulAlgo_t,
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

impl Gemm {
    /// Descriptors and the heuristic's best algorithm for one product; None when cuBLASLt has
    /// no algorithm for it (or, for FP8 with per-row scales, no such scale mode).
    pub(super) fn lt_plan(
        &self,
        operands: Operands,
        s: GemmShape,
        bias: bool,
    ) -> Result<Option<LtPlan>, CudaError> {
        let what = operands.describe(s, bias);
        let err = |call, e| lt_error(call, &what, e);
        // A and B (W and x) in `in_ty`, C and D (y) and the bias in `ty`.
        let (in_ty, ty) = match operands {
            Operands::Float(d) => (lt_data_type(d), lt_data_type(d)),
            Operands::Fp8 { out, .. } => {
                (lt_sys::cudaDataType_t::CUDA_R_8F_E4M3, lt_data_type(out))
            }
        };
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
                // attribute takes (cublasOperation_t / cublasLtEpilogue_t / cudaDataType /
                // cublasLtMatmulMatrixScale_t: 4 bytes),
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
        if let Operands::Fp8 {
            outer_vec: true, ..
        } = operands
        {
            // One f32 scale per row of op(A) (per output feature) and per column of B (per
            // token): cuBLASLt 12.9+. An older library refuses the attribute: no plan.
            let mode =
                lt_sys::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_OUTER_VEC_32F;
            for attr in [
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_A_SCALE_MODE,
                lt_sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_B_SCALE_MODE,
            ] {
                if set(
                    attr,
                    (&mode as *const lt_sys::cublasLtMatmulMatrixScale_t).cast(),
                    std::mem::size_of_val(&mode),
                )
                .is_err()
                {
                    return Ok(None);
                }
            }
        }
        let (m, n, k) = (s.m as u64, s.n as u64, s.k as u64);
        let layout = |ty: lt_sys::cudaDataType, rows: u64, cols: u64, ld: u64| {
            lt::create_matrix_layout(ty, rows, cols, ld as i64)
                .map(LtLayout)
                .map_err(|e| err("cublasLtMatrixLayoutCreate", e))
        };
        let a = layout(in_ty, k, n, k)?;
        let b = layout(in_ty, k, m, k)?;
        let c = layout(ty, n, m, n)?;
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
            Err(lt::CublasError(
                lt_sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED
                | lt_sys::cublasStatus_t::CUBLAS_STATUS_INVALID_VALUE,
            )) if matches!(operands, Operands::Fp8 { .. }) => {
                return Ok(None);
            }
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

    /// Times each heuristic candidate of `plan` with `run` (the call's own operands;
    /// `TUNE_REPEATS` runs each after one warm-up, CUDA events) and keeps the fastest.
    /// Synchronizes: run only outside graph capture, once per shape.
    pub(super) fn tune(
        &self,
        plan: &mut LtPlan,
        run: &mut dyn FnMut(&LtPlan) -> Result<(), CudaError>,
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
            if run(plan).is_err() {
                continue;
            }
            let start = event("timing a GEMM candidate")?;
            let mut ok = true;
            for _ in 0..TUNE_REPEATS {
                ok &= run(plan).is_ok();
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
