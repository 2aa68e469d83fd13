//! In-flight batching scheduler. Pure CPU code over `kv_cache`; never imports device code.

#[derive(Debug, thiserror::Error)]
pub enum ScheduleError {
    #[error("scheduler: {0}")]
    Other(String),
}
