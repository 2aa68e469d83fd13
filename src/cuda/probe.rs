//! Finds the CUDA libraries before anything touches cudarc.
//!
//! cudarc (`dynamic-loading`) `dlopen`s each library on first use and panics when none of its
//! candidate names loads, and again on the first call of a symbol the library lacks. A panic in
//! a Triton backend would take the server down, so ferrum opens each library here first with
//! `libloading`, by the same candidate names in the same order (`cudarc::get_lib_name_candidates`:
//! `lib{x}.so`, ..., `lib{x}.so.13`, `lib{x}.so.12`, ...), reads its version through its own
//! version function, and turns "absent" or "too old" into a `CudaError` naming the library.
//!
//! Why cudarc's `cuda-13000` feature: its candidate list puts `.so.{CUDA major}` first and then
//! `.so.12`, so a 13.0 build finds the CUDA 13 libraries of the GPU machines and, where only
//! those exist, the CUDA 12 libraries of Triton 24.x containers; a 12.x build never tries `.so.13`.
//! 13.0 is the oldest 13 binding, so it asks the least of a driver. Versions are checked here:
//! NVRTC, cuBLAS and cuBLASLt must be 12.x or 13.x, and no newer a major than the driver supports
//! (the driver must run code and libraries of that toolkit).
//!
//! Loaded libraries stay loaded for the life of the process (as cudarc's own handles do), and the
//! outcome per library is computed once. This module never calls into cudarc's library handles.

use std::ffi::c_int;
use std::fmt;
use std::sync::OnceLock;

use super::error::{CudaError, CudaLibrary};

/// Oldest driver ferrum runs on: CUDA 12.0 (R525).
pub const MIN_DRIVER_VERSION: LibraryVersion = LibraryVersion {
    major: 12,
    minor: 0,
    patch: 0,
};
/// Toolkit majors of NVRTC/cuBLAS/cuBLASLt that ferrum's bindings (cudarc `cuda-13000`) accept.
pub const SUPPORTED_TOOLKIT_MAJORS: [u32; 2] = [12, 13];

/// A library's version as `major.minor.patch`; ordered, so it compares against bounds directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LibraryVersion {
    /// Major version; for the driver, the newest CUDA major it supports.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Patch level (0 where the library reports none: driver and NVRTC).
    pub patch: u32,
}

impl fmt::Display for LibraryVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// One library found on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedLibrary {
    /// Which of the four libraries this is.
    pub library: CudaLibrary,
    /// The candidate name that loaded (what cudarc will load too), e.g. `libnvrtc.so.13`.
    pub file: String,
    /// For the driver: the newest CUDA version it supports (`cuDriverGetVersion`).
    pub version: LibraryVersion,
}

/// Every library the CUDA engine needs, found and version-checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaLibraries {
    /// `libcuda`; its version is the newest CUDA it supports.
    pub driver: LoadedLibrary,
    /// NVRTC, which compiles `kernels/*.cu` at run time.
    pub nvrtc: LoadedLibrary,
    /// cuBLAS (bf16/f16/f32 GEMMs).
    pub cublas: LoadedLibrary,
    /// cuBLASLt (GEMMs with fused bias and tuned algorithms).
    pub cublas_lt: LoadedLibrary,
}

impl fmt::Display for CudaLibraries {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let one = |l: &LoadedLibrary| format!("{} {}", l.file, l.version);
        write!(
            f,
            "driver {} (CUDA {}.{}), {}, {}, {}",
            self.driver.file,
            self.driver.version.major,
            self.driver.version.minor,
            one(&self.nvrtc),
            one(&self.cublas),
            one(&self.cublas_lt)
        )
    }
}

/// Finds the driver, NVRTC, cuBLAS and cuBLASLt (in that order, so a machine without a driver
/// is told about `libcuda` first) and checks their versions against each other. Never panics.
pub fn probe() -> Result<CudaLibraries, CudaError> {
    let driver = probe_library(CudaLibrary::Driver)?;
    if driver.version < MIN_DRIVER_VERSION {
        return Err(CudaError::UnsupportedVersion {
            library: CudaLibrary::Driver,
            file: driver.file,
            version: driver.version.to_string(),
            reason: format!("ferrum needs a driver for CUDA {MIN_DRIVER_VERSION} or newer"),
        });
    }
    let nvrtc = probe_library(CudaLibrary::Nvrtc)?;
    let cublas = probe_library(CudaLibrary::Cublas)?;
    let cublas_lt = probe_library(CudaLibrary::CublasLt)?;
    for lib in [&nvrtc, &cublas, &cublas_lt] {
        if lib.version.major > driver.version.major {
            return Err(CudaError::UnsupportedVersion {
                library: lib.library,
                file: lib.file.clone(),
                version: lib.version.to_string(),
                reason: format!(
                    "the driver ({}) supports CUDA {}.{} only; use CUDA {} libraries or a newer driver",
                    driver.file, driver.version.major, driver.version.minor, driver.version.major
                ),
            });
        }
    }
    Ok(CudaLibraries {
        driver,
        nvrtc,
        cublas,
        cublas_lt,
    })
}

/// Finds one library and reads its version (cached per process). Toolkit libraries must be of a
/// supported major version.
pub fn probe_library(library: CudaLibrary) -> Result<LoadedLibrary, CudaError> {
    static CACHE: [OnceLock<Result<LoadedLibrary, CudaError>>; 4] = [
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
        OnceLock::new(),
    ];
    let slot = &CACHE[match library {
        CudaLibrary::Driver => 0,
        CudaLibrary::Nvrtc => 1,
        CudaLibrary::Cublas => 2,
        CudaLibrary::CublasLt => 3,
    }];
    slot.get_or_init(|| load_and_check(library)).clone()
}

fn load_and_check(library: CudaLibrary) -> Result<LoadedLibrary, CudaError> {
    let searched = cudarc::get_lib_name_candidates(library.stem());
    let mut reason = String::from("no candidate names");
    for file in &searched {
        // SAFETY: loading runs the library's initializers. These are NVIDIA's own libraries,
        // opened by the same names cudarc opens them by; their initializers have no
        // preconditions on the caller.
        match unsafe { libloading::Library::new(file) } {
            Ok(lib) => {
                let version = read_version(library, &lib, file)?;
                if library != CudaLibrary::Driver
                    && !SUPPORTED_TOOLKIT_MAJORS.contains(&version.major)
                {
                    return Err(CudaError::UnsupportedVersion {
                        library,
                        file: file.clone(),
                        version: version.to_string(),
                        reason: format!(
                            "ferrum supports CUDA {SUPPORTED_TOOLKIT_MAJORS:?} libraries"
                        ),
                    });
                }
                // Keep the library mapped for the life of the process: cudarc opens the same
                // file and holds it as long, so unloading it here would gain nothing.
                std::mem::forget(lib);
                return Ok(LoadedLibrary {
                    library,
                    file: file.clone(),
                    version,
                });
            }
            Err(e) => reason = e.to_string(),
        }
    }
    Err(CudaError::LibraryNotFound {
        library,
        searched,
        reason,
    })
}

fn symbol<'l, F: Copy>(
    library: CudaLibrary,
    lib: &'l libloading::Library,
    file: &str,
    name: &'static str,
) -> Result<libloading::Symbol<'l, F>, CudaError> {
    // SAFETY: every `F` used below is the C signature NVIDIA documents for `name`.
    unsafe { lib.get::<F>(name.as_bytes()) }.map_err(|e| CudaError::MissingSymbol {
        library,
        file: file.to_owned(),
        symbol: name,
        reason: e.to_string(),
    })
}

fn read_version(
    library: CudaLibrary,
    lib: &libloading::Library,
    file: &str,
) -> Result<LibraryVersion, CudaError> {
    let failed = |call: &'static str, code: i64| CudaError::MissingSymbol {
        library,
        file: file.to_owned(),
        symbol: call,
        reason: format!("the call returned status {code}"),
    };
    match library {
        CudaLibrary::Driver => {
            // CUresult cuDriverGetVersion(int* driverVersion): 13000 for CUDA 13.0; needs no cuInit.
            let f = symbol::<unsafe extern "C" fn(*mut c_int) -> c_int>(
                library,
                lib,
                file,
                "cuDriverGetVersion",
            )?;
            let mut v: c_int = 0;
            // SAFETY: `v` is a valid out-pointer for the duration of the call.
            let status = unsafe { f(&mut v) };
            if status != 0 {
                return Err(failed("cuDriverGetVersion", status.into()));
            }
            let v = v.max(0) as u32;
            Ok(LibraryVersion {
                major: v / 1000,
                minor: (v % 1000) / 10,
                patch: 0,
            })
        }
        CudaLibrary::Nvrtc => {
            // nvrtcResult nvrtcVersion(int* major, int* minor)
            let f = symbol::<unsafe extern "C" fn(*mut c_int, *mut c_int) -> c_int>(
                library,
                lib,
                file,
                "nvrtcVersion",
            )?;
            let (mut major, mut minor): (c_int, c_int) = (0, 0);
            // SAFETY: both out-pointers are valid for the duration of the call.
            let status = unsafe { f(&mut major, &mut minor) };
            if status != 0 {
                return Err(failed("nvrtcVersion", status.into()));
            }
            Ok(LibraryVersion {
                major: major.max(0) as u32,
                minor: minor.max(0) as u32,
                patch: 0,
            })
        }
        CudaLibrary::Cublas => {
            // cublasStatus_t cublasGetProperty(libraryPropertyType type, int* value);
            // MAJOR_VERSION = 0, MINOR_VERSION = 1, PATCH_LEVEL = 2. Needs no handle.
            let f = symbol::<unsafe extern "C" fn(c_int, *mut c_int) -> c_int>(
                library,
                lib,
                file,
                "cublasGetProperty",
            )?;
            let mut parts = [0u32; 3];
            for (property, part) in parts.iter_mut().enumerate() {
                let mut v: c_int = 0;
                // SAFETY: `v` is a valid out-pointer; `property` is a valid libraryPropertyType.
                let status = unsafe { f(property as c_int, &mut v) };
                if status != 0 {
                    return Err(failed("cublasGetProperty", status.into()));
                }
                *part = v.max(0) as u32;
            }
            Ok(LibraryVersion {
                major: parts[0],
                minor: parts[1],
                patch: parts[2],
            })
        }
        CudaLibrary::CublasLt => {
            // size_t cublasLtGetVersion(void): major * 10000 + minor * 100 + patch.
            let f = symbol::<unsafe extern "C" fn() -> usize>(
                library,
                lib,
                file,
                "cublasLtGetVersion",
            )?;
            // SAFETY: the function takes no arguments and only reads a constant.
            let v = unsafe { f() };
            Ok(LibraryVersion {
                major: (v / 10_000) as u32,
                minor: ((v / 100) % 100) as u32,
                patch: (v % 100) as u32,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_order_by_major_then_minor() {
        let v = |major, minor| LibraryVersion {
            major,
            minor,
            patch: 0,
        };
        assert!(v(12, 9) < v(13, 0));
        assert!(v(13, 0) >= MIN_DRIVER_VERSION);
        assert!(v(11, 8) < MIN_DRIVER_VERSION);
        assert_eq!(v(13, 0).to_string(), "13.0.0");
    }

    #[test]
    fn candidates_try_cuda_13_before_cuda_12() {
        let names = cudarc::get_lib_name_candidates("nvrtc");
        let pos = |n: &str| names.iter().position(|c| c == n);
        let (v13, v12) = (pos("libnvrtc.so.13"), pos("libnvrtc.so.12"));
        assert!(v13.is_some() && v12.is_some(), "{names:?}");
        assert!(v13 < v12, "{names:?}");
    }
}
