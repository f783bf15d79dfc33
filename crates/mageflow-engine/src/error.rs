//! The engine's error type: every refusal a caller can get, typed, with a stable code.

use mageflow_core::{Rejection, SignatureId, WorkflowId};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("unknown task {name:?}: no handler is registered under that name")]
    UnknownTask { name: String },
    #[error("kwargs do not fit task {task}: {reason}")]
    InvalidKwargs { task: String, reason: String },
    #[error("input does not fit task {task}: {reason}")]
    InvalidInput { task: String, reason: String },
    #[error("{what} is {bytes} bytes, more than the limit of {max}")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        max: usize,
    },
    #[error("{what} is nested {depth} levels deep, more than the limit of {max}")]
    TooDeep {
        what: &'static str,
        depth: usize,
        max: usize,
    },
    #[error("too many {what}: {count}, the limit is {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    #[error("workflow {0} does not exist")]
    NoSuchWorkflow(WorkflowId),
    #[error("signature {0} does not exist")]
    NoSuchSignature(SignatureId),
    #[error("refused: {0}")]
    Rejected(#[from] Rejection),
    #[error("event log: {0}")]
    Store(#[from] mageflow_store::Error),
    #[error("the engine is shut down")]
    ShutDown,
    #[error("state of workflow {0} could not be rebuilt from its events: {1}")]
    Replay(WorkflowId, mageflow_core::ApplyError),
    #[error(
        "this handler runs in a worker process: creating workflows and reaching the engine from a \
         handler needs the engine's process (run the task there, or call the engine's API)"
    )]
    NeedsEngine,
    #[error("hot tier: {0}")]
    Hot(String),
}

impl Error {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Error::UnknownTask { .. } => "unknown_task",
            Error::InvalidKwargs { .. } => "invalid_kwargs",
            Error::InvalidInput { .. } => "invalid_input",
            Error::TooLarge { .. } => "too_large",
            Error::TooDeep { .. } => "too_deep",
            Error::TooMany { .. } => "too_many",
            Error::NoSuchWorkflow(_) => "no_such_workflow",
            Error::NoSuchSignature(_) => "no_such_signature",
            Error::Rejected(r) => r.code(),
            Error::Store(mageflow_store::Error::Conflict { .. }) => "conflict",
            Error::Store(_) => "store",
            Error::ShutDown => "shut_down",
            Error::Replay(..) => "corrupt_history",
            Error::NeedsEngine => "needs_engine",
            Error::Hot(_) => "hot_tier",
        }
    }
}
