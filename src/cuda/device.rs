//! `CudaDevice`: one GPU, its primary context, the one stream all of ferrum's work on it goes
//! to, and the cache of kernels compiled for its arch.
//!
//! Opening a device probes the libraries first (`probe::probe`), so no cudarc call is made on a
//! machine where one is missing. Work is ordered by the single stream, so cudarc's per-buffer
//! event tracking (meant for several streams) is switched off. Kernels compile lazily on first
//! launch, once per (file, defines), and stay loaded for the life of the device. This module
//! never interprets tensors: that is the launchers' job (`ops`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::sys::{
    CUevent_flags, CUfunction_attribute_enum, CUgraphInstantiate_flags, CUstreamCaptureMode,
};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaGraph, CudaModule, CudaStream, DevicePtr,
    DevicePtrMut,
};
use cudarc::nvrtc::Ptx;

use super::buffer::{DeviceBuffer, DeviceElem};
use super::error::CudaError;
use super::kernels::{CompiledKernel, Define, KernelId, SmArch, compile};
use super::probe::{CudaLibraries, probe};

/// What a device is, as read when it was opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// CUDA ordinal of the device (its index among the devices the driver sees).
    pub ordinal: usize,
    /// The device's name as the driver reports it, e.g. "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// Compute capability; at least `SmArch::MIN` (sm_80) for an opened device.
    pub arch: SmArch,
    /// Device memory in bytes.
    pub total_memory_bytes: usize,
    /// Free device memory in bytes when the device was opened (see `CudaDevice::memory_info` for
    /// now).
    pub free_memory_bytes: usize,
    /// Streaming multiprocessors (SMs), for sizing grids.
    pub num_multiprocessors: usize,
}

type ModuleKey = (KernelId, Vec<Define>);

/// Dynamic shared memory a kernel may use without opting in.
const DEFAULT_DYNAMIC_SMEM: usize = 48 * 1024;

/// Compiled modules and the functions looked up in them.
#[derive(Default)]
struct KernelCache {
    modules: HashMap<ModuleKey, Arc<CudaModule>>,
    functions: HashMap<(ModuleKey, String), CudaFunction>,
}

/// A captured and instantiated graph of device work, replayed on the device's stream with the
/// buffers (addresses) and launch parameters it was captured with.
pub struct DeviceGraph {
    graph: CudaGraph,
}

// SAFETY: a graph is only used through `&self` of its owner (the executor), which one thread at
// a time holds; CUDA graph execs may be launched from any thread as long as calls do not overlap.
unsafe impl Send for DeviceGraph {}

impl DeviceGraph {
    /// Replays the graph on the stream it was captured on (async).
    pub fn launch(&self) -> Result<(), CudaError> {
        self.graph
            .launch()
            .map_err(|e| CudaError::driver("launching a graph", e))
    }
}

impl std::fmt::Debug for DeviceGraph {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceGraph").finish_non_exhaustive()
    }
}

/// One opened GPU: its primary context, the single stream every op and copy on it is ordered on,
/// the libraries probed for it and its cache of compiled kernels. Opened with `CudaDevice::open`.
pub struct CudaDevice {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    libraries: CudaLibraries,
    kernels: Mutex<KernelCache>,
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("info", &self.info)
            .field("libraries", &self.libraries)
            .finish_non_exhaustive()
    }
}

/// Number of CUDA devices, after probing the libraries (0 devices is not an error).
pub fn device_count() -> Result<usize, CudaError> {
    probe()?;
    let count =
        CudaContext::device_count().map_err(|e| CudaError::driver("cuDeviceGetCount", e))?;
    Ok(count.max(0) as usize)
}

impl CudaDevice {
    /// Opens device `ordinal`: probes the libraries, retains the primary context, creates the
    /// stream and reads the device's properties. Fails (never panics) without a driver, without
    /// a device, or on a device older than sm_80.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        let libraries = probe()?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoSuchDevice { ordinal, count });
        }
        let ctx = CudaContext::new(ordinal)
            .map_err(|e| CudaError::driver(format!("opening device {ordinal}"), e))?;
        // SAFETY: all of ferrum's work on this device goes to `stream`, which orders it; no
        // buffer is shared with another stream, so per-buffer events are not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx
            .new_stream()
            .map_err(|e| CudaError::driver(format!("creating a stream on device {ordinal}"), e))?;
        let name = ctx
            .name()
            .map_err(|e| CudaError::driver(format!("name of device {ordinal}"), e))?;
        let (major, minor) = ctx
            .compute_capability()
            .map_err(|e| CudaError::driver(format!("compute capability of device {ordinal}"), e))?;
        let arch = SmArch {
            major: major.max(0) as u32,
            minor: minor.max(0) as u32,
        };
        if arch < SmArch::MIN {
            return Err(CudaError::UnsupportedArch {
                ordinal,
                name,
                arch: arch.to_string(),
            });
        }
        let (free_memory_bytes, total_memory_bytes) = ctx
            .mem_get_info()
            .map_err(|e| CudaError::driver(format!("memory of device {ordinal}"), e))?;
        let num_multiprocessors = ctx
            .attribute(
                cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            )
            .map_err(|e| CudaError::driver(format!("SM count of device {ordinal}"), e))?;
        Ok(CudaDevice {
            ctx,
            stream,
            info: DeviceInfo {
                ordinal,
                name,
                arch,
                total_memory_bytes,
                free_memory_bytes,
                num_multiprocessors: num_multiprocessors.max(0) as usize,
            },
            libraries,
            kernels: Mutex::new(KernelCache::default()),
        })
    }

    /// What the device is, as read when it was opened.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// The CUDA libraries found and version-checked when the device was opened.
    pub fn libraries(&self) -> &CudaLibraries {
        &self.libraries
    }

    /// The device's compute capability (kernels are compiled for it).
    pub fn arch(&self) -> SmArch {
        self.info.arch
    }

    /// CUDA ordinal of the device.
    pub fn ordinal(&self) -> usize {
        self.info.ordinal
    }

    /// The stream all work on this device is ordered on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// (free, total) device memory in bytes, now.
    pub fn memory_info(&self) -> Result<(usize, usize), CudaError> {
        self.ctx
            .mem_get_info()
            .map_err(|e| CudaError::driver("cuMemGetInfo", e))
    }

    /// Waits until all work queued on the device's stream is done; reports a kernel fault that
    /// happened since the last sync.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.stream
            .synchronize()
            .map_err(|e| CudaError::driver(format!("synchronizing device {}", self.ordinal()), e))
    }

    /// A zero-filled buffer of `len` elements.
    pub fn alloc_zeros<T: DeviceElem>(&self, len: usize) -> Result<DeviceBuffer<T>, CudaError> {
        let slice = if len == 0 {
            self.stream.null()
        } else {
            self.stream.alloc_zeros(len)
        }
        .map_err(|e| {
            CudaError::driver(
                format!("allocating {len} x {}", std::any::type_name::<T>()),
                e,
            )
        })?;
        Ok(DeviceBuffer::from_slice(slice))
    }

    /// A new buffer holding a copy of `host`.
    pub fn upload<T: DeviceElem>(&self, host: &[T]) -> Result<DeviceBuffer<T>, CudaError> {
        let mut buf = self.alloc_zeros(host.len())?;
        self.copy_to_device(host, &mut buf)?;
        Ok(buf)
    }

    /// Copies `host` into `dst`; their lengths must be equal.
    pub fn copy_to_device<T: DeviceElem>(
        &self,
        host: &[T],
        dst: &mut DeviceBuffer<T>,
    ) -> Result<(), CudaError> {
        self.check_buffer("copy_to_device", "dst", dst)?;
        if host.len() != dst.len() {
            return Err(CudaError::length(
                "copy_to_device",
                "host",
                dst.len(),
                host.len(),
            ));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_htod(host, &mut dst.slice)
            .map_err(|e| CudaError::driver("copying host to device", e))
    }

    /// Copies `src` into `host` (waits for the copy); their lengths must be equal.
    pub fn copy_to_host<T: DeviceElem>(
        &self,
        src: &DeviceBuffer<T>,
        host: &mut [T],
    ) -> Result<(), CudaError> {
        self.check_buffer("copy_to_host", "src", src)?;
        if host.len() != src.len() {
            return Err(CudaError::length(
                "copy_to_host",
                "host",
                src.len(),
                host.len(),
            ));
        }
        if host.is_empty() {
            return Ok(());
        }
        self.stream
            .memcpy_dtoh(&src.slice.slice(0..src.len()), host)
            .map_err(|e| CudaError::driver("copying device to host", e))?;
        self.synchronize()
    }

    /// A host copy of `src` (waits for the copy).
    pub fn download<T: DeviceElem>(&self, src: &DeviceBuffer<T>) -> Result<Vec<T>, CudaError> {
        let mut host = vec![T::default(); src.len()];
        self.copy_to_host(src, &mut host)?;
        Ok(host)
    }

    /// Copies `dst.num_bytes()` bytes from the packed `src`, starting at word `word_offset`, into
    /// `dst` (device to device, async): one upload of a packed host array, then one copy per
    /// typed buffer. The source range must lie inside `src`'s capacity.
    pub fn copy_packed<S: DeviceElem>(
        &self,
        src: &DeviceBuffer<u32>,
        word_offset: usize,
        dst: &mut DeviceBuffer<S>,
    ) -> Result<(), CudaError> {
        self.check_buffer("copy_packed", "src", src)?;
        self.check_buffer("copy_packed", "dst", dst)?;
        let num_bytes = dst.num_bytes();
        let src_bytes = src.capacity() * 4;
        if !num_bytes.is_multiple_of(4) || word_offset * 4 + num_bytes > src_bytes {
            return Err(CudaError::invalid(
                "copy_packed",
                "range",
                format!("{num_bytes} bytes at word {word_offset}"),
                format!("must be whole words inside the source's {src_bytes} bytes"),
            ));
        }
        if num_bytes == 0 {
            return Ok(());
        }
        let (src_ptr, _gs) = src.slice.device_ptr(&self.stream);
        let (dst_ptr, _gd) = dst.slice.device_ptr_mut(&self.stream);
        // SAFETY: both pointers are live allocations on this device; the source range
        // [word_offset * 4, + num_bytes) lies inside src's allocation and dst holds num_bytes
        // (checked above); the copy is ordered on this device's one stream.
        unsafe {
            cudarc::driver::result::memcpy_dtod_async(
                dst_ptr,
                src_ptr + (word_offset * 4) as u64,
                num_bytes,
                self.stream.cu_stream(),
            )
        }
        .map_err(|e| CudaError::driver("copying packed step inputs", e))
    }

    /// Starts capturing this device's stream into a graph (thread-local mode: other threads'
    /// CUDA calls are not affected). Every launch until `end_capture` is recorded, not run.
    pub fn begin_capture(&self) -> Result<(), CudaError> {
        self.stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
            .map_err(|e| CudaError::driver("beginning a graph capture", e))
    }

    /// Ends the capture begun by `begin_capture` and instantiates the graph. Called after a
    /// failed capture too, to give the stream back.
    pub fn end_capture(&self) -> Result<DeviceGraph, CudaError> {
        let graph = self
            .stream
            .end_capture(CUgraphInstantiate_flags(0))
            .map_err(|e| CudaError::driver("ending a graph capture", e))?;
        match graph {
            Some(graph) => {
                graph
                    .upload()
                    .map_err(|e| CudaError::driver("uploading a graph", e))?;
                Ok(DeviceGraph { graph })
            }
            None => Err(CudaError::invalid(
                "end_capture",
                "graph",
                "empty",
                "the capture recorded no work",
            )),
        }
    }

    /// An event recorded on the stream now, with timing (for per-op profiles).
    pub fn timing_event(&self) -> Result<CudaEvent, CudaError> {
        self.stream
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
            .map_err(|e| CudaError::driver("recording an event", e))
    }

    /// Checks that `buf` lives on this device.
    pub(crate) fn check_buffer<T>(
        &self,
        op: &'static str,
        operand: &'static str,
        buf: &DeviceBuffer<T>,
    ) -> Result<(), CudaError> {
        if buf.ordinal() != self.ordinal() {
            return Err(CudaError::invalid(
                op,
                operand,
                format!("a buffer on device {}", buf.ordinal()),
                format!("must be on device {}", self.ordinal()),
            ));
        }
        Ok(())
    }

    /// Compiles `kernel` for this device's arch now (it would compile on first launch anyway):
    /// lets model load fail early and keeps compile time out of the first step. Compiles the
    /// file without shape defines: every module of `KernelId::dtype_modules`.
    pub fn warm_up(&self, kernels: &[KernelId]) -> Result<(), CudaError> {
        for &kernel in kernels {
            // Every module of the file: one, or one per dtype (`KernelId::per_dtype`).
            for module in kernel.dtype_modules() {
                self.module(kernel, &module.defines)?;
            }
        }
        Ok(())
    }

    fn module(&self, kernel: KernelId, defines: &[Define]) -> Result<Arc<CudaModule>, CudaError> {
        let mut cache = self.lock_kernels();
        let key = (kernel, defines.to_vec());
        if let Some(module) = cache.modules.get(&key) {
            return Ok(module.clone());
        }
        let CompiledKernel { cubin, .. } = compile(kernel, self.arch(), defines)?;
        let module = self
            .ctx
            .load_module(Ptx::from_binary(cubin))
            .map_err(|source| CudaError::LoadKernel {
                file: kernel.file_name(),
                entry: String::from("(module)"),
                arch: self.arch().to_string(),
                source,
            })?;
        cache.modules.insert(key, module.clone());
        Ok(module)
    }

    /// The entry point `entry` of `kernel` compiled with `defines`, compiling and loading the
    /// file on first use.
    pub(crate) fn function(
        &self,
        kernel: KernelId,
        defines: &[Define],
        entry: &str,
    ) -> Result<CudaFunction, CudaError> {
        self.function_with_smem(kernel, defines, entry, 0)
    }

    /// `function` for an entry launched with `dynamic_smem` bytes of dynamic shared memory (a
    /// constant of the entry and its defines): above the default 48 KiB the function's limit is
    /// raised once, when it is loaded, so launches (and graph captures) make no extra call.
    pub(crate) fn function_with_smem(
        &self,
        kernel: KernelId,
        defines: &[Define],
        entry: &str,
        dynamic_smem: usize,
    ) -> Result<CudaFunction, CudaError> {
        let key = ((kernel, defines.to_vec()), entry.to_owned());
        if let Some(f) = self.lock_kernels().functions.get(&key) {
            return Ok(f.clone());
        }
        let module = self.module(kernel, defines)?;
        let load_error = |source| CudaError::LoadKernel {
            file: kernel.file_name(),
            entry: entry.to_owned(),
            arch: self.arch().to_string(),
            source,
        };
        let function = module.load_function(entry).map_err(load_error)?;
        if dynamic_smem > DEFAULT_DYNAMIC_SMEM {
            let bytes = i32::try_from(dynamic_smem).map_err(|_| {
                CudaError::invalid(
                    "function",
                    "dynamic shared memory",
                    dynamic_smem,
                    "must fit in i32",
                )
            })?;
            function
                .set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes,
                )
                .map_err(load_error)?;
        }
        self.lock_kernels().functions.insert(key, function.clone());
        Ok(function)
    }

    /// Kernel modules compiled and loaded so far (grows when a launch compiles one).
    pub fn num_modules(&self) -> usize {
        self.lock_kernels().modules.len()
    }

    fn lock_kernels(&self) -> std::sync::MutexGuard<'_, KernelCache> {
        // A panic while holding the lock cannot leave the maps half-updated (each insert is one
        // call), so a poisoned lock is still usable.
        self.kernels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
