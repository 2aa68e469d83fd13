//! The kernel sources (`kernels/*.cu`, one file per op family, embedded with `include_str!`) and
//! their run-time compilation by NVRTC.
//!
//! Every file is compiled as `prelude.cuh` + the file, for one real architecture (`sm_XX`, so
//! the result is a CUBIN the driver loads without a JIT step) and a set of `-D` defines (later
//! kernels specialize on head size or tile shape through them). Entry points are named
//! `{op}_{dtype}` (`rms_norm_bf16`). Most files instantiate every dtype in one module; a file
//! whose dtypes need different shapes (`KernelId::per_dtype`) is compiled once per dtype, the
//! `DTYPE` define (`dtype_define`) selecting its entry points. Compilation needs only libnvrtc,
//! not a GPU: a test compiles every file (`KernelId::dtype_modules`) for every supported arch.
//! Caching per (file, defines) lives in `CudaDevice`, whose arch is fixed. This module never
//! launches anything.

use std::ffi::{CStr, CString, c_char};
use std::fmt;

use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};

use super::error::{CudaError, CudaLibrary};
use super::probe::probe_library;
use crate::dtype::DType;

const PRELUDE: &str = include_str!("../../kernels/prelude.cuh");

/// One kernel source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelId {
    /// `embedding_{dt}`
    Embedding,
    /// `rms_norm_{dt}`, `layer_norm_{dt}` (each with an optional fused residual add)
    Norm,
    /// `rotary_{dt}`
    Rotary,
    /// `gated_act_{dt}`, `act_{dt}`
    Activation,
    /// `kv_cache_write_{dt}`
    KvCache,
    /// `paged_attention_decode_{dt}`
    Attention,
    /// `paged_attention_prefill_{dt}`, `paged_attention_prefill_simt_{dt}` (defines `HEAD_DIM`)
    AttentionPrefill,
    /// `paged_attention_splitk_{dt}`, `paged_attention_splitk_reduce_{dt}` (defines `HEAD_DIM`,
    /// `GQA_HEADS`; compiled per dtype: `DTYPE`)
    AttentionSplitK,
    /// `clamp_{dt}`, `add_{dt}`, `add_bias_{dt}`, `gather_rows_{dt}` (the executor's glue)
    Elementwise,
    /// `sample_{dt}`: the batched GPU sampler (see `cuda::sampling`)
    Sample,
    /// `gemv_{dt}`: skinny products for decode, m <= 8 (see `cuda::gemm`)
    Gemv,
    /// `fp8_quantize_rows_{dt}`, `fp8_gemv_{dt}`, `fp8_gemv_gated_{dt}`, `fp8_scale_rows_{dt}`:
    /// FP8 E4M3 activations and weights (see `cuda::gemm::fp8`)
    Fp8,
}

impl KernelId {
    /// Every kernel file, for tests that compile all of them and for warm-up lists.
    pub const ALL: [KernelId; 12] = [
        KernelId::Embedding,
        KernelId::Norm,
        KernelId::Rotary,
        KernelId::Activation,
        KernelId::KvCache,
        KernelId::Attention,
        KernelId::AttentionPrefill,
        KernelId::AttentionSplitK,
        KernelId::Elementwise,
        KernelId::Sample,
        KernelId::Gemv,
        KernelId::Fp8,
    ];

    /// The file's name under `kernels/` (what error messages and NVRTC's log call it).
    pub fn file_name(self) -> &'static str {
        match self {
            KernelId::Embedding => "embedding.cu",
            KernelId::Norm => "norm.cu",
            KernelId::Rotary => "rotary.cu",
            KernelId::Activation => "activation.cu",
            KernelId::KvCache => "kv_cache.cu",
            KernelId::Attention => "attention.cu",
            KernelId::AttentionPrefill => "attention_prefill.cu",
            KernelId::AttentionSplitK => "attention_splitk.cu",
            KernelId::Elementwise => "elementwise.cu",
            KernelId::Sample => "sample.cu",
            KernelId::Gemv => "gemv.cu",
            KernelId::Fp8 => "fp8.cu",
        }
    }

    /// The file's CUDA source, embedded at build time (without the prelude `compile` prepends).
    pub fn source(self) -> &'static str {
        match self {
            KernelId::Embedding => include_str!("../../kernels/embedding.cu"),
            KernelId::Norm => include_str!("../../kernels/norm.cu"),
            KernelId::Rotary => include_str!("../../kernels/rotary.cu"),
            KernelId::Activation => include_str!("../../kernels/activation.cu"),
            KernelId::KvCache => include_str!("../../kernels/kv_cache.cu"),
            KernelId::Attention => include_str!("../../kernels/attention.cu"),
            KernelId::AttentionPrefill => include_str!("../../kernels/attention_prefill.cu"),
            KernelId::AttentionSplitK => include_str!("../../kernels/attention_splitk.cu"),
            KernelId::Elementwise => include_str!("../../kernels/elementwise.cu"),
            KernelId::Sample => include_str!("../../kernels/sample.cu"),
            KernelId::Gemv => include_str!("../../kernels/gemv.cu"),
            KernelId::Fp8 => include_str!("../../kernels/fp8.cu"),
        }
    }

    /// Whether the file is compiled once per dtype: its entry points for one dtype may compile
    /// where another's do not (attention_splitk.cu needs 16-byte rows, HEAD_DIM * sizeof(T)), so
    /// it needs `dtype_define(dtype)` and instantiates that dtype only. Other files hold every
    /// dtype in one module and take no `DTYPE`.
    pub fn per_dtype(self) -> bool {
        matches!(self, KernelId::AttentionSplitK)
    }

    /// The defines selecting `dtype`'s entry points: `[DTYPE=dtype]` for a `per_dtype` file,
    /// none otherwise. Launchers add them to their shape defines.
    pub fn dtype_defines(self, dtype: DType) -> Vec<Define> {
        if self.per_dtype() {
            vec![dtype_define(dtype)]
        } else {
            vec![]
        }
    }

    /// The compiles that together hold every entry point of the file (`ops` x f32, bf16, f16):
    /// one module, or one per dtype for a `per_dtype` file.
    pub fn dtype_modules(self) -> Vec<DtypeModule> {
        if self.per_dtype() {
            DTYPES
                .iter()
                .map(|&dtype| DtypeModule {
                    defines: vec![dtype_define(dtype)],
                    dtypes: vec![dtype],
                })
                .collect()
        } else {
            vec![DtypeModule {
                defines: vec![],
                dtypes: DTYPES.to_vec(),
            }]
        }
    }

    /// The ops (entry names without the dtype suffix) the file defines, each for f32, bf16, f16.
    pub fn ops(self) -> &'static [&'static str] {
        match self {
            KernelId::Embedding => &["embedding"],
            KernelId::Norm => &["rms_norm", "layer_norm"],
            KernelId::Rotary => &["rotary", "rotary_kv_write"],
            KernelId::Activation => &["gated_act", "act"],
            KernelId::KvCache => &["kv_cache_write"],
            KernelId::Attention => &["paged_attention_decode"],
            KernelId::AttentionPrefill => {
                &["paged_attention_prefill", "paged_attention_prefill_simt"]
            }
            KernelId::AttentionSplitK => {
                &["paged_attention_splitk", "paged_attention_splitk_reduce"]
            }
            KernelId::Elementwise => &["clamp", "add", "add_bias", "gather_rows"],
            KernelId::Sample => &["sample"],
            KernelId::Gemv => &["gemv", "gemv_gated"],
            KernelId::Fp8 => &[
                "fp8_quantize_rows",
                "fp8_gemv",
                "fp8_gemv_gated",
                "fp8_scale_rows",
            ],
        }
    }
}

/// The dtypes every kernel file has entry points for (`FERRUM_FOR_EACH_DTYPE` order).
pub const DTYPES: [DType; 3] = [DType::F32, DType::BF16, DType::F16];

/// `DTYPE={dtype}` (`f32`, `bf16`, `f16`): the one dtype a `KernelId::per_dtype` file
/// instantiates.
pub fn dtype_define(dtype: DType) -> Define {
    Define::new("DTYPE", dtype)
}

/// One compile of a kernel file: the defines selecting its dtypes (none, or `DTYPE`) and the
/// dtypes whose entry points the module holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DtypeModule {
    /// The `-D` defines of this compile: none, or `DTYPE=<dtype>` for a `per_dtype` file.
    pub defines: Vec<Define>,
    /// The dtypes whose `{op}_{dtype}` entry points this module holds.
    pub dtypes: Vec<DType>,
}

/// A CUDA compute capability, compiled for as the real architecture `sm_{major}{minor}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SmArch {
    /// Major compute capability, e.g. 9 for sm_90.
    pub major: u32,
    /// Minor compute capability, e.g. 0 for sm_90.
    pub minor: u32,
}

impl SmArch {
    /// A100 / A10.
    pub const SM80: SmArch = SmArch { major: 8, minor: 0 };
    /// L4 / L40S / RTX 40xx.
    pub const SM89: SmArch = SmArch { major: 8, minor: 9 };
    /// H100 / H200.
    pub const SM90: SmArch = SmArch { major: 9, minor: 0 };
    /// The oldest arch the kernels support (bf16 conversions in PTX need sm_80).
    pub const MIN: SmArch = SmArch::SM80;
    /// The archs CI compiles every kernel for.
    pub const TESTED: [SmArch; 3] = [SmArch::SM80, SmArch::SM89, SmArch::SM90];
}

impl fmt::Display for SmArch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sm_{}{}", self.major, self.minor)
    }
}

/// A `-D{name}={value}` preprocessor define passed to NVRTC.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Define {
    /// The macro's name, e.g. `HEAD_DIM`.
    pub name: String,
    /// The macro's value as written into the source, e.g. `128`.
    pub value: String,
}

impl Define {
    /// `-D{name}={value}`, the value formatted with `Display`.
    pub fn new(name: impl Into<String>, value: impl fmt::Display) -> Self {
        Define {
            name: name.into(),
            value: value.to_string(),
        }
    }
}

/// The output of one NVRTC compilation.
#[derive(Debug, Clone)]
pub struct CompiledKernel {
    /// The source file that was compiled.
    pub kernel: KernelId,
    /// The real architecture the CUBIN is for.
    pub arch: SmArch,
    /// ELF image for `arch`, loadable with `cuModuleLoadData`.
    pub cubin: Vec<u8>,
    /// NVRTC's log (warnings), empty when there were none.
    pub log: String,
}

/// NVRTC options for `arch` and `defines` (no fast math: erf, exp and sincos keep full accuracy).
pub fn compile_options(arch: SmArch, defines: &[Define]) -> Vec<String> {
    let mut options = vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_owned(),
        "--generate-line-info".to_owned(),
    ];
    options.extend(defines.iter().map(|d| format!("-D{}={}", d.name, d.value)));
    options
}

/// Compiles one kernel file for `arch`. Needs libnvrtc (12.x or 13.x), not a GPU.
pub fn compile(
    kernel: KernelId,
    arch: SmArch,
    defines: &[Define],
) -> Result<CompiledKernel, CudaError> {
    probe_library(CudaLibrary::Nvrtc)?;
    let file = kernel.file_name();
    let options = compile_options(arch, defines);
    let compile_error = |log: String| CudaError::Compile {
        file,
        arch: arch.to_string(),
        options: options.clone(),
        log,
    };
    let nvrtc_error = |call: &'static str, e: nvrtc::NvrtcError| CudaError::Nvrtc {
        call,
        file,
        arch: arch.to_string(),
        code: e.0,
    };
    // `#line` makes NVRTC's messages point at the .cu file's own lines, not the prelude's.
    let source = format!("{PRELUDE}\n#line 1 \"{file}\"\n{}", kernel.source());
    let source = CString::new(source).map_err(|e| compile_error(e.to_string()))?;
    let name = CString::new(file).map_err(|e| compile_error(e.to_string()))?;
    let program = Program {
        raw: nvrtc::create_program(&source, Some(&name))
            .map_err(|e| nvrtc_error("nvrtcCreateProgram", e))?,
    };
    // SAFETY: `program.raw` was created above and is destroyed only by `Program::drop`.
    let compiled = unsafe { nvrtc::compile_program(program.raw, &options) };
    // SAFETY: as above; the log exists whether or not compilation succeeded.
    let log = unsafe { nvrtc::get_program_log(program.raw) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    if compiled.is_err() {
        return Err(compile_error(log));
    }
    let mut size = 0usize;
    // SAFETY: the program compiled for a real arch, so it has a CUBIN; `size` is a valid
    // out-pointer.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(program.raw, &mut size) }
        .result()
        .map_err(|e| nvrtc_error("nvrtcGetCUBINSize", e))?;
    let mut cubin = vec![0u8; size];
    // SAFETY: `cubin` has exactly the size NVRTC reported for this program's CUBIN.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(program.raw, cubin.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(|e| nvrtc_error("nvrtcGetCUBIN", e))?;
    Ok(CompiledKernel {
        kernel,
        arch,
        cubin,
        log,
    })
}

/// Owns an `nvrtcProgram` and destroys it on every path out of `compile`.
struct Program {
    raw: nvrtc_sys::nvrtcProgram,
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: `raw` came from `create_program` and is destroyed exactly once, here. A failure
        // to destroy leaks the program; there is nothing better to do in a destructor.
        let _ = unsafe { nvrtc::destroy_program(self.raw) };
    }
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw.iter().map(|&c| c as u8).collect();
    CStr::from_bytes_until_nul(&bytes)
        .map(|s| s.to_string_lossy().trim().to_owned())
        .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kernel_file_defines_its_entry_points_for_every_dtype() {
        for kernel in KernelId::ALL {
            let src = kernel.source();
            for op in kernel.ops() {
                // Entry points come from FERRUM_FOR_EACH_DTYPE(MACRO, op), which pastes
                // op_f32 / op_bf16 / op_f16.
                assert!(
                    src.contains(&format!(", {op})")),
                    "{} does not instantiate {op}",
                    kernel.file_name()
                );
            }
        }
    }

    #[test]
    fn per_dtype_files_get_one_module_per_dtype_with_its_define() {
        for kernel in KernelId::ALL {
            let modules = kernel.dtype_modules();
            // Together the modules cover every dtype exactly once.
            let mut covered: Vec<DType> = modules.iter().flat_map(|m| m.dtypes.clone()).collect();
            covered.sort_by_key(|d| d.to_string());
            let mut all = DTYPES.to_vec();
            all.sort_by_key(|d| d.to_string());
            assert_eq!(covered, all, "{kernel:?}");
            for m in &modules {
                for &dt in &m.dtypes {
                    assert_eq!(kernel.dtype_defines(dt), m.defines, "{kernel:?} {dt}");
                }
            }
            // A per-dtype file requires DTYPE and instantiates through the DTYPE-selected macro;
            // the others never read DTYPE.
            let src = kernel.source();
            assert_eq!(
                src.contains("#ifndef DTYPE"),
                kernel.per_dtype(),
                "{kernel:?}"
            );
            assert_eq!(
                src.contains("FERRUM_FOR_EACH_DTYPE("),
                !kernel.per_dtype(),
                "{kernel:?}"
            );
        }
        assert!(KernelId::AttentionSplitK.per_dtype());
        assert_eq!(
            KernelId::AttentionSplitK.dtype_defines(DType::BF16),
            vec![Define::new("DTYPE", "bf16")]
        );
        assert_eq!(KernelId::AttentionSplitK.dtype_modules().len(), 3);
        assert!(KernelId::Attention.dtype_defines(DType::F32).is_empty());
        assert_eq!(
            compile_options(SmArch::SM80, &[dtype_define(DType::F16)]).last(),
            Some(&"-DDTYPE=f16".to_owned())
        );
    }

    #[test]
    fn options_name_the_real_arch_and_defines() {
        let opts = compile_options(SmArch::SM90, &[Define::new("HEAD_DIM", 128)]);
        assert!(opts.contains(&"--gpu-architecture=sm_90".to_owned()));
        assert!(opts.contains(&"-DHEAD_DIM=128".to_owned()));
        assert_eq!(SmArch::SM89.to_string(), "sm_89");
    }
}
