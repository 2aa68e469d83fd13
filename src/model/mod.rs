//! Architectures as data: every checkpoint is normalized into a `DecoderSpec`, and one generic
//! decoder runs all of them.

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported architecture '{0}'")]
    UnsupportedArchitecture(String),
    #[error("config: {0}")]
    Config(String),
}
