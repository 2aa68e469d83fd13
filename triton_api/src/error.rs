//! `TritonError`: an owned Rust copy of a `TRITONSERVER_Error` (code + message). Errors returned
//! by Triton calls are copied and deleted at once (`check`); errors we hand to Triton are created
//! on demand (`into_raw`), so no raw error pointer outlives the call that produced it.

use std::ffi::{CStr, CString};

use crate::sys;

/// `TRITONSERVER_Error_Code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// `TRITONSERVER_ERROR_UNKNOWN`, and any code this crate does not know.
    Unknown,
    /// `TRITONSERVER_ERROR_INTERNAL`: a bug or an unexpected failure on our side.
    Internal,
    /// `TRITONSERVER_ERROR_NOT_FOUND`: e.g. a missing input, parameter or file.
    NotFound,
    /// `TRITONSERVER_ERROR_INVALID_ARG`: the request or configuration is wrong.
    InvalidArg,
    /// `TRITONSERVER_ERROR_UNAVAILABLE`: the service cannot serve now (e.g. shutting down).
    Unavailable,
    /// `TRITONSERVER_ERROR_UNSUPPORTED`: a feature or version we do not handle.
    Unsupported,
    /// `TRITONSERVER_ERROR_ALREADY_EXISTS`.
    AlreadyExists,
    /// `TRITONSERVER_ERROR_CANCELLED`: the request was cancelled.
    Cancelled,
}

impl ErrorCode {
    fn to_raw(self) -> sys::TRITONSERVER_Error_Code {
        match self {
            ErrorCode::Unknown => sys::TRITONSERVER_ERROR_UNKNOWN,
            ErrorCode::Internal => sys::TRITONSERVER_ERROR_INTERNAL,
            ErrorCode::NotFound => sys::TRITONSERVER_ERROR_NOT_FOUND,
            ErrorCode::InvalidArg => sys::TRITONSERVER_ERROR_INVALID_ARG,
            ErrorCode::Unavailable => sys::TRITONSERVER_ERROR_UNAVAILABLE,
            ErrorCode::Unsupported => sys::TRITONSERVER_ERROR_UNSUPPORTED,
            ErrorCode::AlreadyExists => sys::TRITONSERVER_ERROR_ALREADY_EXISTS,
            ErrorCode::Cancelled => sys::TRITONSERVER_ERROR_CANCELLED,
        }
    }

    fn from_raw(code: sys::TRITONSERVER_Error_Code) -> Self {
        match code {
            sys::TRITONSERVER_ERROR_INTERNAL => ErrorCode::Internal,
            sys::TRITONSERVER_ERROR_NOT_FOUND => ErrorCode::NotFound,
            sys::TRITONSERVER_ERROR_INVALID_ARG => ErrorCode::InvalidArg,
            sys::TRITONSERVER_ERROR_UNAVAILABLE => ErrorCode::Unavailable,
            sys::TRITONSERVER_ERROR_UNSUPPORTED => ErrorCode::Unsupported,
            sys::TRITONSERVER_ERROR_ALREADY_EXISTS => ErrorCode::AlreadyExists,
            sys::TRITONSERVER_ERROR_CANCELLED => ErrorCode::Cancelled,
            _ => ErrorCode::Unknown,
        }
    }
}

/// An error to report to Triton or one Triton reported to us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TritonError {
    code: ErrorCode,
    message: String,
}

impl std::fmt::Display for TritonError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for TritonError {}

impl TritonError {
    /// An error with `code` and `message` (interior NULs become spaces when handed to Triton).
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        TritonError {
            code,
            message: message.into(),
        }
    }

    /// An `InvalidArg` error: what clients get for a bad request.
    pub fn invalid_arg(message: impl Into<String>) -> Self {
        TritonError::new(ErrorCode::InvalidArg, message)
    }

    /// An `Internal` error.
    pub fn internal(message: impl Into<String>) -> Self {
        TritonError::new(ErrorCode::Internal, message)
    }

    /// The Triton error code.
    pub fn code(&self) -> ErrorCode {
        self.code
    }

    /// The message, without the code.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Adds context in front of the message ("while doing X: <message>").
    pub fn context(self, what: impl std::fmt::Display) -> Self {
        TritonError {
            code: self.code,
            message: format!("{what}: {}", self.message),
        }
    }

    /// A new `TRITONSERVER_Error*` carrying this error; ownership passes to the caller (Triton
    /// takes it when an entry point returns it; `ResponseSend` does not, see `Response::send`).
    /// Null only when the Triton API cannot be resolved at all (then nothing can be reported).
    pub fn into_raw(self) -> *mut sys::TRITONSERVER_Error {
        let msg = c_string(&self.message);
        if let Some(api) = crate::API.get() {
            // SAFETY: `msg` is a valid NUL-terminated string; Triton copies it.
            return unsafe { api.TRITONSERVER_ErrorNew(self.code.to_raw(), msg.as_ptr()) };
        }
        // The full table failed to load (e.g. a symbol is missing): resolve ErrorNew alone so
        // the reason still reaches Triton's log instead of being lost.
        type ErrorNew = unsafe extern "C" fn(
            sys::TRITONSERVER_Error_Code,
            *const std::ffi::c_char,
        ) -> *mut sys::TRITONSERVER_Error;
        let this = libloading::os::unix::Library::this();
        // SAFETY: the symbol, if present, is Triton's `TRITONSERVER_ErrorNew` with this signature.
        match unsafe { this.get::<ErrorNew>(b"TRITONSERVER_ErrorNew\0") } {
            // SAFETY: as above; `msg` is valid for the call.
            Ok(f) => unsafe { f(self.code.to_raw(), msg.as_ptr()) },
            Err(_) => {
                eprintln!("ferrum: cannot report error to Triton: {}", self.message);
                std::ptr::null_mut()
            }
        }
    }
}

/// A C string from arbitrary text: interior NULs become spaces (never fails).
pub(crate) fn c_string(s: &str) -> CString {
    CString::new(s.replace('\0', " ")).unwrap_or_default()
}

/// Turns a `TRITONSERVER_Error*` returned by a Triton call into a `Result`, deleting it.
///
/// # Safety
/// `err` must be null or an error returned by `api` that the caller owns and has not deleted.
pub(crate) unsafe fn check(
    api: &sys::TritonApi,
    err: *mut sys::TRITONSERVER_Error,
) -> Result<(), TritonError> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: `err` is a live error (caller contract); the message pointer is valid until the
    // error is deleted, and we copy it before deleting.
    unsafe {
        let code = ErrorCode::from_raw(api.TRITONSERVER_ErrorCode(err));
        let msg_ptr = api.TRITONSERVER_ErrorMessage(err);
        let message = if msg_ptr.is_null() {
            String::new()
        } else {
            CStr::from_ptr(msg_ptr).to_string_lossy().into_owned()
        };
        api.TRITONSERVER_ErrorDelete(err);
        Err(TritonError { code, message })
    }
}

/// Copies a C string owned by Triton into a `String` (lossy UTF-8; null → empty).
///
/// # Safety
/// `p` must be null or point to a NUL-terminated string valid for the duration of the call.
pub(crate) unsafe fn owned_str(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: caller contract.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_raw_values() {
        for code in [
            ErrorCode::Unknown,
            ErrorCode::Internal,
            ErrorCode::NotFound,
            ErrorCode::InvalidArg,
            ErrorCode::Unavailable,
            ErrorCode::Unsupported,
            ErrorCode::AlreadyExists,
            ErrorCode::Cancelled,
        ] {
            assert_eq!(ErrorCode::from_raw(code.to_raw()), code);
        }
    }

    #[test]
    fn c_string_never_fails_on_interior_nul() {
        assert_eq!(c_string("a\0b").to_str().unwrap(), "a b");
    }

    #[test]
    fn context_prefixes_the_message_and_keeps_the_code() {
        let e = TritonError::invalid_arg("bad").context("parsing 'x'");
        assert_eq!(e.message(), "parsing 'x': bad");
        assert_eq!(e.code(), ErrorCode::InvalidArg);
    }
}
