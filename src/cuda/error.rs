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
    /// Every library, in the order `probe` checks them (driver first).
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

/// Every failure of the CUDA layer. Each variant names what it concerns (library, file, kernel,
/// arch, operand) so the message alone tells what to fix.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    /// None of cudarc's candidate names of a library could be `dlopen`ed.
    #[error(
        "CUDA library {library} could not be loaded (tried {searched:?}; last error: {reason}); \
         install the NVIDIA driver and CUDA 12 or 13 libraries, or put their folder on LD_LIBRARY_PATH"
    )]
    LibraryNotFound {
        /// The library that is missing.
        library: CudaLibrary,
        /// The candidate file names tried, in cudarc's order.
        searched: Vec<String>,
        /// The loader's error for the last candidate.
        reason: String,
    },
    /// A library loaded but lacks a symbol ferrum needs, or its version query failed (then `symbol`
    /// is the version function and `reason` its status).
    #[error("CUDA library {library} ({file}) has no symbol {symbol}: {reason}")]
    MissingSymbol {
        /// The library the symbol was looked up in.
        library: CudaLibrary,
        /// The candidate name that loaded, e.g. `libnvrtc.so.13`.
        file: String,
        /// The C function looked up.
        symbol: &'static str,
        /// The loader's error, or the status the call returned.
        reason: String,
    },
    /// A library's version is outside what ferrum supports (driver older than CUDA 12.0, toolkit
    /// major not 12 or 13, or a toolkit newer than the driver).
    #[error("CUDA library {library} ({file}) version {version} is not supported: {reason}")]
    UnsupportedVersion {
        /// The library whose version is refused.
        library: CudaLibrary,
        /// The candidate name that loaded.
        file: String,
        /// The version read from the library, `major.minor.patch`.
        version: String,
        /// Which bound the version breaks and what to install instead.
        reason: String,
    },
    /// A CUDA driver call failed (context creation, allocation, copy, stream, graph, ...).
    #[error("CUDA driver: {context}: {source}")]
    Driver {
        /// What was being done, e.g. "allocating 4096 bytes".
        context: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// The requested device ordinal is not below the device count.
    #[error("CUDA device {ordinal} does not exist ({count} CUDA devices)")]
    NoSuchDevice {
        /// The CUDA ordinal that was asked for.
        ordinal: usize,
        /// How many CUDA devices the driver sees (0 on a machine without an NVIDIA GPU).
        count: usize,
    },
    /// The device's compute capability is older than `SmArch::MIN` (sm_80).
    #[error("CUDA device {ordinal} ({name}) is {arch}; ferrum's kernels need sm_80 or newer")]
    UnsupportedArch {
        /// CUDA ordinal of the device.
        ordinal: usize,
        /// The device's name as the driver reports it.
        name: String,
        /// Its compute capability, e.g. `sm_75`.
        arch: String,
    },
    /// An NVRTC API call itself failed (not a compile error of the source: see `Compile`).
    #[error("NVRTC {call} failed for kernels/{file} ({arch}): {code:?}")]
    Nvrtc {
        /// The NVRTC function that failed, e.g. `nvrtcCreateProgram`.
        call: &'static str,
        /// The kernel source file under `kernels/`.
        file: &'static str,
        /// The target arch, e.g. `sm_90`.
        arch: String,
        /// NVRTC's status code.
        code: cudarc::nvrtc::sys::nvrtcResult,
    },
    /// NVRTC rejected a kernel source: the compile log says where.
    #[error("NVRTC could not compile kernels/{file} for {arch} with {options:?}:\n{log}")]
    Compile {
        /// The kernel source file under `kernels/`.
        file: &'static str,
        /// The target arch, e.g. `sm_90`.
        arch: String,
        /// The NVRTC options passed (arch, defines, ...).
        options: Vec<String>,
        /// NVRTC's compile log.
        log: String,
    },
    /// A compiled module could not be loaded, or an entry point was not found in it.
    #[error("loading kernel {entry} of kernels/{file} on {arch}: {source}")]
    LoadKernel {
        /// The kernel source file under `kernels/`.
        file: &'static str,
        /// The entry point's name, e.g. `rms_norm_bf16`.
        entry: String,
        /// The device's arch, e.g. `sm_90`.
        arch: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// Launching a kernel failed (bad launch configuration, or an earlier asynchronous fault
    /// surfacing).
    #[error("launching kernel {entry} on {arch}: {source}")]
    Launch {
        /// The entry point's name.
        entry: String,
        /// The device's arch, e.g. `sm_90`.
        arch: String,
        /// The driver's error.
        #[source]
        source: cudarc::driver::DriverError,
    },
    /// A cuBLAS or cuBLASLt call failed, or no cuBLASLt algorithm fits the product.
    #[error("{library} {call} failed for {what}: {status}")]
    Blas {
        /// `Cublas` or `CublasLt`.
        library: CudaLibrary,
        /// The library function that failed, e.g. `cublasLtMatmul`.
        call: &'static str,
        /// The product, e.g. "bf16 gemm m=7 n=37 k=13 (bias)".
        what: String,
        /// cuBLAS's status, as text.
        status: String,
    },
    /// An operand's length disagrees with the shape arguments of an op (checked before any launch).
    #[error("{op}: {operand} has {actual} elements, expected {expected}")]
    LengthMismatch {
        /// The op, e.g. `rms_norm`.
        op: &'static str,
        /// The operand, e.g. `weight`.
        operand: &'static str,
        /// Elements the shape arguments imply.
        expected: usize,
        /// Elements the buffer holds.
        actual: usize,
    },
    /// A shape, size or scalar argument of an op is out of range (checked before any launch).
    #[error("{op}: {what} = {value} is invalid: {bound}")]
    InvalidArgument {
        /// The op that refused it.
        op: &'static str,
        /// The argument's name.
        what: &'static str,
        /// The value given, formatted.
        value: String,
        /// What is allowed, e.g. "must be finite and >= 0".
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
