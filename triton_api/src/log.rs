//! Logging through `TRITONSERVER_LogMessage`, so ferrum's messages appear in Triton's log with
//! Triton's format and verbosity settings. Outside tritonserver (tests, CLI) messages go to
//! stderr. Never fails and never panics.

use crate::error::{c_string, check};
use crate::sys;

/// Severity of a log message, as Triton's log levels (`TRITONSERVER_LOG_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// Normal operation (model loaded, settings chosen).
    Info,
    /// Something degraded but working (e.g. a fallback).
    Warn,
    /// A failure.
    Error,
    /// Detail shown only with `--log-verbose`; dropped outside tritonserver.
    Verbose,
}

impl Level {
    fn to_raw(self) -> sys::TRITONSERVER_LogLevel {
        match self {
            Level::Info => sys::TRITONSERVER_LOG_INFO,
            Level::Warn => sys::TRITONSERVER_LOG_WARN,
            Level::Error => sys::TRITONSERVER_LOG_ERROR,
            Level::Verbose => sys::TRITONSERVER_LOG_VERBOSE,
        }
    }
}

/// Whether Triton would print a message at `level` (false outside tritonserver for Verbose).
pub fn enabled(level: Level) -> bool {
    match crate::API.get() {
        // SAFETY: a plain query of Triton's log settings.
        Some(api) => unsafe { api.TRITONSERVER_LogIsEnabled(level.to_raw()) },
        None => level != Level::Verbose,
    }
}

/// Logs `msg` at `level`, attributed to `file:line`.
pub fn message(level: Level, file: &str, line: u32, msg: &str) {
    let Some(api) = crate::API.get() else {
        if level != Level::Verbose {
            eprintln!("ferrum [{level:?}] {msg}");
        }
        return;
    };
    let cfile = c_string(file);
    let cmsg = c_string(msg);
    // SAFETY: both strings are valid NUL-terminated C strings for the call; the returned error
    // is ours and `check` deletes it.
    let err = unsafe {
        api.TRITONSERVER_LogMessage(level.to_raw(), cfile.as_ptr(), line as i32, cmsg.as_ptr())
    };
    // SAFETY: `err` was just returned by the API.
    let _ = unsafe { check(api, err) };
}

/// Logs `msg` at `Info`, attributed to "ferrum" (use `triton_log!` for the caller's file and line).
pub fn info(msg: &str) {
    message(Level::Info, "ferrum", 0, msg);
}

/// Logs `msg` at `Warn`, attributed to "ferrum".
pub fn warn(msg: &str) {
    message(Level::Warn, "ferrum", 0, msg);
}

/// Logs `msg` at `Error`, attributed to "ferrum".
pub fn error(msg: &str) {
    message(Level::Error, "ferrum", 0, msg);
}

/// `triton_log!(Level::Info, "fmt", args..)`: formats and logs with the caller's file and line;
/// skips formatting when the level is disabled.
#[macro_export]
macro_rules! triton_log {
    ($level:expr, $($arg:tt)+) => {{
        let level = $level;
        if $crate::log::enabled(level) {
            $crate::log::message(level, file!(), line!(), &format!($($arg)+));
        }
    }};
}
