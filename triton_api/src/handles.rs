//! Safe wrappers over Triton's opaque handles. Ownership rules (tritonbackend.h):
//! - `Request`: owned by the backend after a successful Execute; must be released exactly once
//!   (`release`, or on drop). Everything read from it is copied first.
//! - `ResponseFactory`: created from a request, outlives its release, deleted on drop.
//! - `Response`: sent at most once (`send` takes it); an unsent one is deleted on drop.
//! - `Model`: borrowed for the duration of an entry point call.
//! - `InstanceHandle`: valid from ModelInstanceInitialize until ModelInstanceFinalize; the backend
//!   must not use it after finalize returns.

use std::marker::PhantomData;

use crate::error::{c_string, check, owned_str};
use crate::{TritonError, api, sys};

/// `TRITONSERVER_DataType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataType {
    /// `TYPE_INVALID`, and any type id this crate does not know.
    Invalid,
    /// `TYPE_BOOL`, 1 byte.
    Bool,
    /// `TYPE_UINT8`, 1 byte.
    Uint8,
    /// `TYPE_UINT16`, 2 bytes.
    Uint16,
    /// `TYPE_UINT32`, 4 bytes.
    Uint32,
    /// `TYPE_UINT64`, 8 bytes.
    Uint64,
    /// `TYPE_INT8`, 1 byte.
    Int8,
    /// `TYPE_INT16`, 2 bytes.
    Int16,
    /// `TYPE_INT32`, 4 bytes.
    Int32,
    /// `TYPE_INT64`, 8 bytes.
    Int64,
    /// `TYPE_FP16`, 2 bytes.
    Fp16,
    /// `TYPE_FP32`, 4 bytes.
    Fp32,
    /// `TYPE_FP64`, 8 bytes.
    Fp64,
    /// `TYPE_BYTES` (`TYPE_STRING` in model configs): elements of 4-byte little-endian length +
    /// bytes.
    Bytes,
    /// `TYPE_BF16`, 2 bytes.
    Bf16,
}

impl DataType {
    /// The variant of a raw `TRITONSERVER_DataType`; unknown ids become `Invalid`.
    pub fn from_raw(v: sys::TRITONSERVER_DataType) -> Self {
        match v {
            sys::TRITONSERVER_TYPE_BOOL => DataType::Bool,
            sys::TRITONSERVER_TYPE_UINT8 => DataType::Uint8,
            sys::TRITONSERVER_TYPE_UINT16 => DataType::Uint16,
            sys::TRITONSERVER_TYPE_UINT32 => DataType::Uint32,
            sys::TRITONSERVER_TYPE_UINT64 => DataType::Uint64,
            sys::TRITONSERVER_TYPE_INT8 => DataType::Int8,
            sys::TRITONSERVER_TYPE_INT16 => DataType::Int16,
            sys::TRITONSERVER_TYPE_INT32 => DataType::Int32,
            sys::TRITONSERVER_TYPE_INT64 => DataType::Int64,
            sys::TRITONSERVER_TYPE_FP16 => DataType::Fp16,
            sys::TRITONSERVER_TYPE_FP32 => DataType::Fp32,
            sys::TRITONSERVER_TYPE_FP64 => DataType::Fp64,
            sys::TRITONSERVER_TYPE_BYTES => DataType::Bytes,
            sys::TRITONSERVER_TYPE_BF16 => DataType::Bf16,
            _ => DataType::Invalid,
        }
    }

    /// The raw `TRITONSERVER_DataType` of this variant.
    pub fn to_raw(self) -> sys::TRITONSERVER_DataType {
        match self {
            DataType::Invalid => sys::TRITONSERVER_TYPE_INVALID,
            DataType::Bool => sys::TRITONSERVER_TYPE_BOOL,
            DataType::Uint8 => sys::TRITONSERVER_TYPE_UINT8,
            DataType::Uint16 => sys::TRITONSERVER_TYPE_UINT16,
            DataType::Uint32 => sys::TRITONSERVER_TYPE_UINT32,
            DataType::Uint64 => sys::TRITONSERVER_TYPE_UINT64,
            DataType::Int8 => sys::TRITONSERVER_TYPE_INT8,
            DataType::Int16 => sys::TRITONSERVER_TYPE_INT16,
            DataType::Int32 => sys::TRITONSERVER_TYPE_INT32,
            DataType::Int64 => sys::TRITONSERVER_TYPE_INT64,
            DataType::Fp16 => sys::TRITONSERVER_TYPE_FP16,
            DataType::Fp32 => sys::TRITONSERVER_TYPE_FP32,
            DataType::Fp64 => sys::TRITONSERVER_TYPE_FP64,
            DataType::Bytes => sys::TRITONSERVER_TYPE_BYTES,
            DataType::Bf16 => sys::TRITONSERVER_TYPE_BF16,
        }
    }

    /// The model-config spelling (`TYPE_INT32`, `TYPE_STRING` for BYTES, ...).
    pub fn config_name(self) -> &'static str {
        match self {
            DataType::Invalid => "TYPE_INVALID",
            DataType::Bool => "TYPE_BOOL",
            DataType::Uint8 => "TYPE_UINT8",
            DataType::Uint16 => "TYPE_UINT16",
            DataType::Uint32 => "TYPE_UINT32",
            DataType::Uint64 => "TYPE_UINT64",
            DataType::Int8 => "TYPE_INT8",
            DataType::Int16 => "TYPE_INT16",
            DataType::Int32 => "TYPE_INT32",
            DataType::Int64 => "TYPE_INT64",
            DataType::Fp16 => "TYPE_FP16",
            DataType::Fp32 => "TYPE_FP32",
            DataType::Fp64 => "TYPE_FP64",
            DataType::Bytes => "TYPE_STRING",
            DataType::Bf16 => "TYPE_BF16",
        }
    }

    /// Bytes per element; None for BYTES (variable size) and INVALID.
    pub fn byte_size(self) -> Option<usize> {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => Some(1),
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 | DataType::Bf16 => Some(2),
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => Some(4),
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => Some(8),
            DataType::Bytes | DataType::Invalid => None,
        }
    }
}

/// `TRITONSERVER_InstanceGroupKind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceGroupKind {
    /// `KIND_AUTO`: Triton picks (also any kind this crate does not know).
    Auto,
    /// `KIND_CPU`: instances run on the CPU.
    Cpu,
    /// `KIND_GPU`: one instance per listed GPU.
    Gpu,
    /// `KIND_MODEL`: the backend places the model itself.
    Model,
}

impl InstanceGroupKind {
    fn to_raw(self) -> sys::TRITONSERVER_InstanceGroupKind {
        match self {
            InstanceGroupKind::Auto => sys::TRITONSERVER_INSTANCEGROUPKIND_AUTO,
            InstanceGroupKind::Cpu => sys::TRITONSERVER_INSTANCEGROUPKIND_CPU,
            InstanceGroupKind::Gpu => sys::TRITONSERVER_INSTANCEGROUPKIND_GPU,
            InstanceGroupKind::Model => sys::TRITONSERVER_INSTANCEGROUPKIND_MODEL,
        }
    }

    fn from_raw(v: sys::TRITONSERVER_InstanceGroupKind) -> Self {
        match v {
            sys::TRITONSERVER_INSTANCEGROUPKIND_CPU => InstanceGroupKind::Cpu,
            sys::TRITONSERVER_INSTANCEGROUPKIND_GPU => InstanceGroupKind::Gpu,
            sys::TRITONSERVER_INSTANCEGROUPKIND_MODEL => InstanceGroupKind::Model,
            _ => InstanceGroupKind::Auto,
        }
    }
}

/// A request parameter (`TRITONBACKEND_RequestParameter`): how generate-endpoint JSON keys that
/// are not model inputs arrive.
#[derive(Debug, Clone, PartialEq)]
pub enum ParamValue {
    /// `TRITONSERVER_PARAMETER_STRING`, copied.
    String(String),
    /// `TRITONSERVER_PARAMETER_INT` (64-bit).
    Int(i64),
    /// `TRITONSERVER_PARAMETER_BOOL`.
    Bool(bool),
    /// `TRITONSERVER_PARAMETER_DOUBLE`.
    Double(f64),
    /// A BYTES parameter; its content is not read.
    Bytes,
}

/// An input tensor copied out of a request: dtype, shape and the concatenated CPU bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct InputTensor {
    /// The input's name as the request (and the model config) spells it.
    pub name: String,
    /// Element type as sent.
    pub dtype: DataType,
    /// Shape as sent, batch dimension included when the model batches (`max_batch_size > 0`).
    pub shape: Vec<i64>,
    /// The input's buffers concatenated in order; BYTES elements keep their 4-byte length prefixes.
    pub data: Vec<u8>,
}

/// A request owned by the backend (after a successful Execute). Released exactly once: by
/// `release` or, as a fallback, on drop.
pub struct Request {
    raw: *mut sys::TRITONBACKEND_Request,
    released: bool,
}

// SAFETY: Triton allows a request to be used and released from any thread (its backends hand
// requests to worker threads); this handle is owned, not shared, so moving it is sound.
unsafe impl Send for Request {}

impl Request {
    /// # Safety
    /// `raw` must be a request Triton passed to Execute that the backend now owns.
    pub unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_Request) -> Self {
        Request {
            raw,
            released: false,
        }
    }

    /// The request's client-given id (empty when the client set none), copied.
    pub fn id(&self) -> Result<String, TritonError> {
        let api = api()?;
        let mut p = std::ptr::null();
        // SAFETY: `self.raw` is a live, unreleased request; `p` is a valid out-pointer.
        unsafe { check(api, api.TRITONBACKEND_RequestId(self.raw, &mut p))? };
        // SAFETY: the id string lives as long as the request, and we copy it now.
        Ok(unsafe { owned_str(p) })
    }

    /// Names of every input the request carries, in Triton's order, copied.
    pub fn input_names(&self) -> Result<Vec<String>, TritonError> {
        let api = api()?;
        let mut count = 0u32;
        // SAFETY: live request, valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_RequestInputCount(self.raw, &mut count),
            )?
        };
        let mut names = Vec::with_capacity(count as usize);
        for idx in 0..count {
            let mut p = std::ptr::null();
            // SAFETY: `idx < count`; valid out-pointer; the name is copied before any release.
            unsafe {
                check(
                    api,
                    api.TRITONBACKEND_RequestInputName(self.raw, idx, &mut p),
                )?;
                names.push(owned_str(p));
            }
        }
        Ok(names)
    }

    /// Copies one input (all of its buffers, which must be in CPU memory). None if absent.
    pub fn input(&self, name: &str) -> Result<Option<InputTensor>, TritonError> {
        let api = api()?;
        let cname = c_string(name);
        let mut input = std::ptr::null_mut();
        // SAFETY: live request, valid C string and out-pointer.
        let err = unsafe { api.TRITONBACKEND_RequestInput(self.raw, cname.as_ptr(), &mut input) };
        // SAFETY: `err` was returned by this API call and is ours.
        if unsafe { check(api, err) }.is_err() || input.is_null() {
            return Ok(None);
        }
        let mut dtype = 0;
        let mut shape_ptr = std::ptr::null();
        let mut dims_count = 0u32;
        let mut byte_size = 0u64;
        let mut buffer_count = 0u32;
        // SAFETY: `input` belongs to the live request; all out-pointers are valid.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_InputProperties(
                    input,
                    std::ptr::null_mut(),
                    &mut dtype,
                    &mut shape_ptr,
                    &mut dims_count,
                    &mut byte_size,
                    &mut buffer_count,
                ),
            )?
        };
        let shape = if shape_ptr.is_null() || dims_count == 0 {
            Vec::new()
        } else {
            // SAFETY: Triton returns `dims_count` dims at `shape_ptr`, valid until release.
            unsafe { std::slice::from_raw_parts(shape_ptr, dims_count as usize) }.to_vec()
        };
        let mut data = Vec::with_capacity(byte_size as usize);
        for idx in 0..buffer_count {
            let mut buf = std::ptr::null();
            let mut buf_size = 0u64;
            let mut mem_type = sys::TRITONSERVER_MEMORY_CPU;
            let mut mem_id = 0i64;
            // SAFETY: `idx < buffer_count`; out-pointers valid; we ask for CPU memory.
            unsafe {
                check(
                    api,
                    api.TRITONBACKEND_InputBuffer(
                        input,
                        idx,
                        &mut buf,
                        &mut buf_size,
                        &mut mem_type,
                        &mut mem_id,
                    ),
                )?
            };
            if mem_type == sys::TRITONSERVER_MEMORY_GPU {
                return Err(TritonError::invalid_arg(format!(
                    "input '{name}' is in GPU memory; ferrum reads request inputs from CPU memory only"
                )));
            }
            if buf_size > 0 && !buf.is_null() {
                // SAFETY: Triton guarantees `buf_size` readable bytes at `buf` (CPU or pinned
                // memory, checked above) until the request is released; we copy them now.
                data.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(buf.cast::<u8>(), buf_size as usize)
                });
            }
        }
        Ok(Some(InputTensor {
            name: name.to_string(),
            dtype: DataType::from_raw(dtype),
            shape,
            data,
        }))
    }

    /// All request parameters, copied.
    pub fn parameters(&self) -> Result<Vec<(String, ParamValue)>, TritonError> {
        let api = api()?;
        let mut count = 0u32;
        // SAFETY: live request, valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_RequestParameterCount(self.raw, &mut count),
            )?
        };
        let mut params = Vec::with_capacity(count as usize);
        for idx in 0..count {
            let mut key = std::ptr::null();
            let mut ptype = 0;
            let mut vvalue: *const std::ffi::c_void = std::ptr::null();
            // SAFETY: `idx < count`; valid out-pointers.
            unsafe {
                check(
                    api,
                    api.TRITONBACKEND_RequestParameter(
                        self.raw,
                        idx,
                        &mut key,
                        &mut ptype,
                        &mut vvalue,
                    ),
                )?
            };
            if vvalue.is_null() {
                continue;
            }
            // SAFETY: per tritonbackend.h, `vvalue` points to a `const char*` string for STRING,
            // an int64_t for INT, a bool for BOOL and a double for DOUBLE; all valid until release
            // and copied here.
            let value = unsafe {
                match ptype {
                    sys::TRITONSERVER_PARAMETER_STRING => {
                        ParamValue::String(owned_str(vvalue.cast()))
                    }
                    sys::TRITONSERVER_PARAMETER_INT => ParamValue::Int(*vvalue.cast::<i64>()),
                    sys::TRITONSERVER_PARAMETER_BOOL => ParamValue::Bool(*vvalue.cast::<bool>()),
                    sys::TRITONSERVER_PARAMETER_DOUBLE => ParamValue::Double(*vvalue.cast::<f64>()),
                    _ => ParamValue::Bytes,
                }
            };
            // SAFETY: the key string is valid until release; copied now.
            params.push((unsafe { owned_str(key) }, value));
        }
        Ok(params)
    }

    /// Whether the client cancelled the request (e.g. closed the stream).
    pub fn is_cancelled(&self) -> Result<bool, TritonError> {
        let api = api()?;
        let mut cancelled = false;
        // SAFETY: live request, valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_RequestIsCancelled(self.raw, &mut cancelled),
            )?
        };
        Ok(cancelled)
    }

    /// Releases the request back to Triton (`TRITONSERVER_REQUEST_RELEASE_ALL`).
    pub fn release(mut self) -> Result<(), TritonError> {
        self.release_inner()
    }

    fn release_inner(&mut self) -> Result<(), TritonError> {
        if self.released {
            return Ok(());
        }
        self.released = true;
        let api = api()?;
        // SAFETY: the request is live and released only here (guarded by `released`).
        unsafe {
            check(
                api,
                api.TRITONBACKEND_RequestRelease(self.raw, sys::TRITONSERVER_REQUEST_RELEASE_ALL),
            )?
        };
        Ok(())
    }

    /// Sends one final error response and releases the request (best effort; failures are
    /// logged).
    pub fn respond_error(self, error: &TritonError) {
        let sent = ResponseFactory::new(&self).and_then(|f| f.response()?.send(true, Some(error)));
        if let Err(e) = sent {
            crate::log::error(&format!("cannot send an error response ({error}): {e}"));
        }
        if let Err(e) = self.release() {
            crate::log::error(&format!("cannot release a request: {e}"));
        }
    }

    pub(crate) fn raw(&self) -> *mut sys::TRITONBACKEND_Request {
        self.raw
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        if let Err(e) = self.release_inner() {
            crate::log::error(&format!("cannot release a request: {e}"));
        }
    }
}

/// Sends responses for one request, possibly after the request was released.
pub struct ResponseFactory {
    raw: *mut sys::TRITONBACKEND_ResponseFactory,
}

// SAFETY: Triton's factories are used from response threads by its own backends (python,
// tensorrtllm); this handle is owned and not shared.
unsafe impl Send for ResponseFactory {}

impl ResponseFactory {
    /// A factory for `request`'s responses; it may be used after the request is released and is
    /// deleted on drop.
    pub fn new(request: &Request) -> Result<Self, TritonError> {
        let api = api()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: the request is live; valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ResponseFactoryNew(&mut raw, request.raw()),
            )?
        };
        Ok(ResponseFactory { raw })
    }

    /// Whether the request behind this factory was cancelled; works after the request is released.
    pub fn is_cancelled(&self) -> Result<bool, TritonError> {
        let api = api()?;
        let mut cancelled = false;
        // SAFETY: live factory, valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ResponseFactoryIsCancelled(self.raw, &mut cancelled),
            )?
        };
        Ok(cancelled)
    }

    /// A new, empty response of this request; add outputs, then `send` it once (dropped unsent, it
    /// is deleted).
    pub fn response(&self) -> Result<Response, TritonError> {
        let api = api()?;
        let mut raw = std::ptr::null_mut();
        // SAFETY: live factory, valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ResponseNewFromFactory(&mut raw, self.raw),
            )?
        };
        Ok(Response {
            raw,
            _not_sync: PhantomData,
        })
    }

    /// Sends a flags-only response: with `final_flag`, marks the end of the request's responses.
    pub fn send_flags(&self, final_flag: bool) -> Result<(), TritonError> {
        let api = api()?;
        let flags = if final_flag {
            sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL
        } else {
            0
        };
        // SAFETY: live factory.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ResponseFactorySendFlags(self.raw, flags),
            )
        }
    }
}

impl Drop for ResponseFactory {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: the factory is live and deleted only here.
        if let Err(e) = unsafe { check(api, api.TRITONBACKEND_ResponseFactoryDelete(self.raw)) } {
            crate::log::error(&format!("cannot delete a response factory: {e}"));
        }
    }
}

/// One response under construction. `send` consumes it; dropping an unsent one deletes it.
pub struct Response {
    raw: *mut sys::TRITONBACKEND_Response,
    _not_sync: PhantomData<*mut ()>,
}

// SAFETY: an unsent response is owned by whoever holds it; Triton does not touch it until sent.
unsafe impl Send for Response {}

impl Response {
    /// Adds an output tensor and copies `data` into it. `data` must hold exactly the tensor's
    /// bytes (for BYTES: the `[u32 length][bytes]` serialization, see `serialize_bytes`).
    pub fn add_output(
        &mut self,
        name: &str,
        dtype: DataType,
        shape: &[i64],
        data: &[u8],
    ) -> Result<(), TritonError> {
        if let Some(elem) = dtype.byte_size() {
            let num_elems: i64 = shape.iter().product();
            if num_elems < 0 || num_elems as usize * elem != data.len() {
                return Err(TritonError::internal(format!(
                    "output '{name}': {} bytes do not match shape {shape:?} of {dtype:?}",
                    data.len()
                )));
            }
        }
        let api = api()?;
        let cname = c_string(name);
        let mut out = std::ptr::null_mut();
        // SAFETY: live response; `shape` has `shape.len()` dims; valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ResponseOutput(
                    self.raw,
                    &mut out,
                    cname.as_ptr(),
                    dtype.to_raw(),
                    shape.as_ptr(),
                    shape.len() as u32,
                ),
            )?
        };
        if data.is_empty() {
            return Ok(());
        }
        let mut buf = std::ptr::null_mut();
        let mut mem_type = sys::TRITONSERVER_MEMORY_CPU;
        let mut mem_id = 0i64;
        // SAFETY: `out` is the output just created; valid out-pointers; we ask for CPU memory.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_OutputBuffer(
                    out,
                    &mut buf,
                    data.len() as u64,
                    &mut mem_type,
                    &mut mem_id,
                ),
            )?
        };
        if mem_type == sys::TRITONSERVER_MEMORY_GPU || buf.is_null() {
            return Err(TritonError::internal(format!(
                "output '{name}': Triton did not provide a CPU buffer"
            )));
        }
        // SAFETY: `buf` has `data.len()` writable bytes in CPU memory (checked above) and does
        // not overlap `data`, which is ours.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf.cast::<u8>(), data.len()) };
        Ok(())
    }

    /// Sends the response, optionally flagged final and/or carrying an error.
    pub fn send(self, final_flag: bool, error: Option<&TritonError>) -> Result<(), TritonError> {
        let api = api()?;
        let raw = self.raw;
        std::mem::forget(self); // ownership passes to Triton below, even on failure
        let flags = if final_flag {
            sys::TRITONSERVER_RESPONSE_COMPLETE_FINAL
        } else {
            0
        };
        let err = error.map_or(std::ptr::null_mut(), |e| e.clone().into_raw());
        // SAFETY: `raw` is a live, unsent response; ResponseSend takes it. The error stays ours
        // (tritonbackend.h) and is deleted right after.
        let result = unsafe { check(api, api.TRITONBACKEND_ResponseSend(raw, flags, err)) };
        if !err.is_null() {
            // SAFETY: `err` was created above and is still owned by us.
            unsafe { api.TRITONSERVER_ErrorDelete(err) };
        }
        result
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        let Ok(api) = api() else { return };
        // SAFETY: an unsent response (send forgets self) is ours to delete.
        if let Err(e) = unsafe { check(api, api.TRITONBACKEND_ResponseDelete(self.raw)) } {
            crate::log::error(&format!("cannot delete an unsent response: {e}"));
        }
    }
}

/// Serializes strings as a Triton BYTES tensor: per element a little-endian u32 length, then
/// the bytes.
pub fn serialize_bytes<'a>(elems: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elems {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// A model, borrowed for the duration of an entry point.
pub struct Model<'a> {
    raw: *mut sys::TRITONBACKEND_Model,
    _life: PhantomData<&'a ()>,
}

impl Model<'_> {
    /// # Safety
    /// `raw` must be a model handle valid for the lifetime of the returned value.
    pub unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_Model) -> Self {
        Model {
            raw,
            _life: PhantomData,
        }
    }

    /// The model's name as in the repository.
    pub fn name(&self) -> Result<String, TritonError> {
        let api = api()?;
        let mut p = std::ptr::null();
        // SAFETY: live model; the name is copied at once.
        unsafe {
            check(api, api.TRITONBACKEND_ModelName(self.raw, &mut p))?;
            Ok(owned_str(p))
        }
    }

    /// The model version being loaded (the numbered folder).
    pub fn version(&self) -> Result<u64, TritonError> {
        let api = api()?;
        let mut v = 0u64;
        // SAFETY: live model, valid out-pointer.
        unsafe { check(api, api.TRITONBACKEND_ModelVersion(self.raw, &mut v))? };
        Ok(v)
    }

    /// The model directory (holding config.pbtxt and the version folders).
    pub fn repository_path(&self) -> Result<std::path::PathBuf, TritonError> {
        let api = api()?;
        let mut kind = sys::TRITONBACKEND_ARTIFACT_FILESYSTEM;
        let mut p = std::ptr::null();
        // SAFETY: live model, valid out-pointers; the path is copied at once.
        let path = unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelRepository(self.raw, &mut kind, &mut p),
            )?;
            owned_str(p)
        };
        Ok(path.into())
    }

    /// The model configuration as JSON (config version 1).
    pub fn config_json(&self) -> Result<String, TritonError> {
        let api = api()?;
        let mut msg = std::ptr::null_mut();
        // SAFETY: live model, valid out-pointer; we own the returned message.
        unsafe { check(api, api.TRITONBACKEND_ModelConfig(self.raw, 1, &mut msg))? };
        let mut base = std::ptr::null();
        let mut len = 0usize;
        // SAFETY: `msg` is live; the buffer belongs to it and is copied before it is deleted.
        unsafe {
            let r = check(
                api,
                api.TRITONSERVER_MessageSerializeToJson(msg, &mut base, &mut len),
            );
            let json = match r {
                Ok(()) if !base.is_null() => Ok(String::from_utf8_lossy(
                    std::slice::from_raw_parts(base.cast::<u8>(), len),
                )
                .into_owned()),
                Ok(()) => Ok(String::new()),
                Err(e) => Err(e),
            };
            let _ = check(api, api.TRITONSERVER_MessageDelete(msg));
            json
        }
    }

    /// Whether Triton asks the backend to complete the configuration.
    pub fn auto_complete_config(&self) -> Result<bool, TritonError> {
        let api = api()?;
        let mut b = false;
        // SAFETY: live model, valid out-pointer.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelAutoCompleteConfig(self.raw, &mut b),
            )?
        };
        Ok(b)
    }

    /// Replaces the model configuration (only in ModelInitialize with auto-complete on).
    pub fn set_config_json(&self, json: &str) -> Result<(), TritonError> {
        let api = api()?;
        let mut msg = std::ptr::null_mut();
        // SAFETY: `json` is valid for `json.len()` bytes; Triton copies it into the message.
        unsafe {
            check(
                api,
                api.TRITONSERVER_MessageNewFromSerializedJson(
                    &mut msg,
                    json.as_ptr().cast(),
                    json.len(),
                ),
            )?
        };
        // SAFETY: live model and message; the message stays ours and is deleted after the call.
        unsafe {
            let r = check(api, api.TRITONBACKEND_ModelSetConfig(self.raw, 1, msg));
            let _ = check(api, api.TRITONSERVER_MessageDelete(msg));
            r
        }
    }
}

/// A model instance. Copyable so the response thread can report statistics; valid until
/// ModelInstanceFinalize (the backend drains all of an instance's requests before that).
#[derive(Debug, Clone, Copy)]
pub struct InstanceHandle {
    raw: *mut sys::TRITONBACKEND_ModelInstance,
}

// SAFETY: Triton's statistics calls are thread-safe and accept the instance from any thread;
// validity across finalize is the documented contract of this type.
unsafe impl Send for InstanceHandle {}
// SAFETY: as above; the handle is an immutable pointer value.
unsafe impl Sync for InstanceHandle {}

impl InstanceHandle {
    /// # Safety
    /// `raw` must be a live instance; the handle must not be used after its finalize.
    pub unsafe fn from_raw(raw: *mut sys::TRITONBACKEND_ModelInstance) -> Self {
        InstanceHandle { raw }
    }

    /// An identity for comparing handles (the pointer value).
    pub fn id(&self) -> usize {
        self.raw as usize
    }

    /// The instance's name (e.g. `model_0_0`), copied.
    pub fn name(&self) -> Result<String, TritonError> {
        let api = api()?;
        let mut p = std::ptr::null();
        // SAFETY: live instance; the name is copied at once.
        unsafe {
            check(api, api.TRITONBACKEND_ModelInstanceName(self.raw, &mut p))?;
            Ok(owned_str(p))
        }
    }

    /// Where Triton placed the instance (its instance-group kind).
    pub fn kind(&self) -> Result<InstanceGroupKind, TritonError> {
        let api = api()?;
        let mut k = sys::TRITONSERVER_INSTANCEGROUPKIND_AUTO;
        // SAFETY: live instance, valid out-pointer.
        unsafe { check(api, api.TRITONBACKEND_ModelInstanceKind(self.raw, &mut k))? };
        Ok(InstanceGroupKind::from_raw(k))
    }

    /// Per-request statistics; must be called before the request is released.
    pub fn report_statistics(
        &self,
        request: &Request,
        success: bool,
        exec_start_ns: u64,
        compute_start_ns: u64,
        compute_end_ns: u64,
        exec_end_ns: u64,
    ) -> Result<(), TritonError> {
        let api = api()?;
        // SAFETY: live instance and unreleased request.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelInstanceReportStatistics(
                    self.raw,
                    request.raw(),
                    success,
                    exec_start_ns,
                    compute_start_ns,
                    compute_end_ns,
                    exec_end_ns,
                ),
            )
        }
    }

    /// Batch statistics of one execution of `batch_size` requests; timestamps in `now_ns()`
    /// nanoseconds (execution start, compute start, compute end, execution end).
    pub fn report_batch_statistics(
        &self,
        batch_size: u64,
        exec_start_ns: u64,
        compute_start_ns: u64,
        compute_end_ns: u64,
        exec_end_ns: u64,
    ) -> Result<(), TritonError> {
        let api = api()?;
        // SAFETY: live instance.
        unsafe {
            check(
                api,
                api.TRITONBACKEND_ModelInstanceReportBatchStatistics(
                    self.raw,
                    batch_size,
                    exec_start_ns,
                    compute_start_ns,
                    compute_end_ns,
                    exec_end_ns,
                ),
            )
        }
    }
}

pub(crate) fn add_preferred_instance_group(
    attr: *mut sys::TRITONBACKEND_BackendAttribute,
    kind: InstanceGroupKind,
    count: u64,
) -> Result<(), TritonError> {
    let api = api()?;
    // SAFETY: `attr` comes from Triton for the duration of GetBackendAttribute; no device ids.
    unsafe {
        check(
            api,
            api.TRITONBACKEND_BackendAttributeAddPreferredInstanceGroup(
                attr,
                kind.to_raw(),
                count,
                std::ptr::null(),
                0,
            ),
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn data_types_round_trip() {
        for v in 0..=14u32 {
            let dt = DataType::from_raw(v);
            assert_eq!(dt.to_raw(), v, "{dt:?}");
        }
        assert_eq!(DataType::from_raw(99), DataType::Invalid);
        assert_eq!(DataType::Bytes.config_name(), "TYPE_STRING");
        assert_eq!(DataType::Int32.byte_size(), Some(4));
        assert_eq!(DataType::Bytes.byte_size(), None);
    }

    #[test]
    fn bytes_serialization_is_length_prefixed_little_endian() {
        let out = serialize_bytes([b"hi".as_slice(), b"".as_slice(), "é".as_bytes()]);
        assert_eq!(
            out,
            vec![2, 0, 0, 0, b'h', b'i', 0, 0, 0, 0, 2, 0, 0, 0, 0xc3, 0xa9]
        );
    }
}
