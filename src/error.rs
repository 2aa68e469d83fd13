//! The top-level error type. Each layer has its own `thiserror` enum with the context that layer
//! knows (file, tensor, field, value); `Error` wraps them so callers can use `?` across layers.

use crate::cuda::CudaError;
use crate::executor::batch::ExecutorError;
use crate::loader::LoadError;
use crate::model::ModelError;
use crate::request::RequestError;
use crate::scheduler::ScheduleError;
use crate::tokenizer::TokenizerError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    #[error(transparent)]
    Cuda(#[from] CudaError),
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    #[error("device error: {0}")]
    Device(String),
    #[error("engine error: {0}")]
    Engine(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
