//! `CudaError`: every failure of the CUDA layer, with the library, kernel, arch or operand it
//! concerns. Nothing in `src/cuda` panics on a missing library, a bad shape or a failed call; it
//! returns one of these.

use std::fmt;

/// A CUDA library that ferrum loads at run time (`dlopen`, never linked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CudaLibrary {
    /// `libcuda.so.1`, installed with the NVIDIA driver.
    Driver,
    /// `libnvrtc.so.{12,13}`: run-time compiler for `kernels/*.cu`.
    Nvrtc,
    /// `libcublas.so.{12,13}`.
    Cublas,
    /// `libcublasLt.so.{12,13}`.
    CublasLt,
}

impl CudaLibrary {
    pub const ALL: [CudaLibrary; 4] = [
        CudaLibrary::Driver,
        CudaLibrary::Nvrtc,
        CudaLibrary::Cublas,
        CudaLibrary::CublasLt,
    ];

    /// The name stem cudarc searches for (`lib{stem}.so`, `lib{stem}.so.13`, ...).
    pub fn stem(self) -> &'static str {
        match self {
            CudaLibrary::Driver => "cuda",
            CudaLibrary::Nvrtc => "nvrtc",
            CudaLibrary::Cublas => "cublas",
            CudaLibrary::CublasLt => "cublasLt",
        }
    }
}

impl fmt::Display for CudaLibrary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lib{}", self.stem())
    }
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error(
        "CUDA library {library} could not be loaded (tried {searched:?}; last error: {reason}); \
         install the NVIDIA driver and CUDA 12 or 13 libraries, or put their folder on LD_LIBRARY_PATH"
    )]
    LibraryNotFound {
        library: CudaLibrary,
        searched: Vec<String>,
        reason: String,
    },
    #[error("CUDA library {library} ({file}) has no symbol {symbol}: {reason}")]
    MissingSymbol {
        library: CudaLibrary,
        file: String,
        symbol: &'static str,
        reason: String,
    },
    #[error("CUDA library {library} ({file}) version {version} is not supported: {reason}")]
    UnsupportedVersion {
        library: CudaLibrary,
        file: String,
        version: String,
        reason: String,
    },
    #[error("CUDA driver: {context}: {source}")]
    Driver {
        context: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("CUDA device {ordinal} does not exist ({count} CUDA devices)")]
    NoSuchDevice { ordinal: usize, count: usize },
    #[error("CUDA device {ordinal} ({name}) is {arch}; ferrum's kernels need sm_80 or newer")]
    UnsupportedArch {
        ordinal: usize,
        name: String,
        arch: String,
    },
    #[error("NVRTC {call} failed for kernels/{file} ({arch}): {code:?}")]
    Nvrtc {
        call: &'static str,
        file: &'static str,
        arch: String,
        code: cudarc::nvrtc::sys::nvrtcResult,
    },
    #[error("NVRTC could not compile kernels/{file} for {arch} with {options:?}:\n{log}")]
    Compile {
        file: &'static str,
        arch: String,
        options: Vec<String>,
        log: String,
    },
    #[error("loading kernel {entry} of kernels/{file} on {arch}: {source}")]
    LoadKernel {
        file: &'static str,
        entry: String,
        arch: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("launching kernel {entry} on {arch}: {source}")]
    Launch {
        entry: String,
        arch: String,
        #[source]
        source: cudarc::driver::DriverError,
    },
    #[error("{library} {call} failed for {what}: {status}")]
    Blas {
        library: CudaLibrary,
        call: &'static str,
        /// The product, e.g. "bf16 gemm m=7 n=37 k=13 (bias)".
        what: String,
        status: String,
    },
    #[error("{op}: {operand} has {actual} elements, expected {expected}")]
    LengthMismatch {
        op: &'static str,
        operand: &'static str,
        expected: usize,
        actual: usize,
    },
    #[error("{op}: {what} = {value} is invalid: {bound}")]
    InvalidArgument {
        op: &'static str,
        what: &'static str,
        value: String,
        bound: String,
    },
}

impl CudaError {
    /// For a machine that simply has no NVIDIA GPU: a one-line reason (no driver library, or a
    /// driver that sees no device). `None` for a GPU machine whose CUDA setup is broken, whose
    /// error must be shown in full.
    pub fn no_gpu_reason(&self) -> Option<&'static str> {
        match self {
            CudaError::LibraryNotFound {
                library: CudaLibrary::Driver,
                ..
            } => Some("no NVIDIA driver found"),
            CudaError::NoSuchDevice { count: 0, .. } => Some("no NVIDIA GPU found"),
            _ => None,
        }
    }

    pub(crate) fn driver(context: impl Into<String>, source: cudarc::driver::DriverError) -> Self {
        CudaError::Driver {
            context: context.into(),
            source,
        }
    }

    pub(crate) fn length(
        op: &'static str,
        operand: &'static str,
        expected: usize,
        actual: usize,
    ) -> Self {
        CudaError::LengthMismatch {
            op,
            operand,
            expected,
            actual,
        }
    }

    pub(crate) fn invalid(
        op: &'static str,
        what: &'static str,
        value: impl fmt::Display,
        bound: impl Into<String>,
    ) -> Self {
        CudaError::InvalidArgument {
            op,
            what,
            value: value.to_string(),
            bound: bound.into(),
        }
    }
}
