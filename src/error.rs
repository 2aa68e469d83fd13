//! The top-level error type. Each layer has its own `thiserror` enum with the context that layer
//! knows (file, tensor, field, value); `Error` wraps them so callers can use `?` across layers.

use crate::cuda::CudaError;
use crate::executor::batch::ExecutorError;
use crate::loader::LoadError;
use crate::model::ModelError;
use crate::request::RequestError;
use crate::scheduler::ScheduleError;
use crate::tokenizer::TokenizerError;

/// Any ferrum failure: one variant per layer, each wrapping that layer's error (which carries the
/// file, tensor, field or kernel concerned) so `?` works across layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a checkpoint failed (file, tensor, format).
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The checkpoint does not describe a model ferrum can build (architecture, config, tensor
    /// shapes).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Loading the tokenizer, or encoding/decoding text, failed.
    #[error(transparent)]
    Tokenizer(#[from] TokenizerError),
    /// A request's inputs were invalid (field, bound and value named).
    #[error(transparent)]
    Request(#[from] RequestError),
    /// The scheduler refused a sequence (e.g. an empty prompt or a duplicate sequence id).
    #[error(transparent)]
    Schedule(#[from] ScheduleError),
    /// A CUDA library, kernel or device call failed.
    #[error(transparent)]
    Cuda(#[from] CudaError),
    /// An executor refused a step plan or failed to run it (plan checks, aliased buffers, missing
    /// weights, device failures).
    #[error(transparent)]
    Executor(#[from] ExecutorError),
    /// A device failure or a device/option combination refused, as a message only (a device that
    /// does not open, `dtype`/`weight_format` the chosen engine cannot run, an executor without
    /// device-side sampling).
    #[error("device error: {0}")]
    Device(String),
    /// The engine itself failed (e.g. its thread could not be started); holds the message.
    #[error("engine error: {0}")]
    Engine(String),
}

/// `Result` with ferrum's `Error` as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
