//! The engine's error type: every refusal a caller can get, typed, with a stable code.

use mageflow_core::{NodeIndex, Rejection, SignatureId, Status, Timestamp, WorkflowId};
use serde::{Deserialize, Serialize};

/// The engine's result: [`Error`] unless said otherwise.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the engine can refuse or fail with. Each variant has a stable
/// [`code`](Error::code); `docs/errors.md` says what causes each code and what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A signature names a task no handler is registered for.
    #[error("unknown task {name:?}: no handler is registered under that name")]
    UnknownTask { name: String },
    /// Bound kwargs have a field of the wrong type for the task's input.
    #[error("kwargs do not fit task {task}: {reason}")]
    InvalidKwargs { task: String, reason: String },
    /// An input (merged with the kwargs) does not deserialize into the task's input type.
    #[error("input does not fit task {task}: {reason}")]
    InvalidInput { task: String, reason: String },
    /// An input, kwargs, checkpoint or result over its size limit.
    #[error("{what} is {bytes} bytes, more than the limit of {max}")]
    TooLarge {
        what: &'static str,
        bytes: usize,
        max: usize,
    },
    /// A value nested deeper than [`crate::VALUE_DEPTH_MAX`].
    #[error("{what} is nested {depth} levels deep, more than the limit of {max}")]
    TooDeep {
        what: &'static str,
        depth: usize,
        max: usize,
    },
    /// More signatures in one event than [`crate::CREATE_NODES_MAX`], or swarm items nested
    /// where they cannot be split.
    #[error("too many {what}: {count}, the limit is {max}")]
    TooMany {
        what: &'static str,
        count: usize,
        max: usize,
    },
    /// No workflow has this id (or it is the reserved system stream).
    #[error("workflow {0} does not exist")]
    NoSuchWorkflow(WorkflowId),
    /// The workflow exists but has no signature of this index.
    #[error("signature {0} does not exist")]
    NoSuchSignature(SignatureId),
    /// The core refused the command (its code is the rejection's, [`Rejection::code`]).
    #[error("refused: {0}")]
    Rejected(#[from] Rejection),
    /// The event log failed (`conflict` for a version conflict, else `store`).
    #[error("event log: {0}")]
    Store(#[from] mageflow_store::Error),
    /// The engine stopped ([`crate::Engine::shutdown`], or superseded): a handle outliving it.
    #[error("the engine is shut down")]
    ShutDown,
    /// A workflow's events do not fold (a corrupt or forged log).
    #[error("state of workflow {0} could not be rebuilt from its events: {1}")]
    Replay(WorkflowId, mageflow_core::ApplyError),
    /// `TaskContext::engine` in a handler that runs in a worker process.
    #[error(
        "this handler runs in a worker process: reaching the engine from a handler needs the \
         engine's process (run the task there, or call the engine's API)"
    )]
    NeedsEngine,
    /// The Redis hot tier failed, or an answer through it did not come in time.
    #[error("hot tier: {0}")]
    Hot(String),
    /// A worker's report or heartbeat named a lease that no longer holds its job (another
    /// claim holds it, or the hot tier was rebuilt): the attempt is not this worker's anymore.
    #[error("the lease of {sig} attempt {attempt} is lost: this worker no longer holds the job")]
    LeaseLost { sig: SignatureId, attempt: u32 },
    /// A request that is not signed, or not by a key the deployment knows.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// An authenticated principal whose role does not allow the request.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// A command that reached the orchestrator after its deadline: refused, not carried out.
    #[error("expired: {0}")]
    Expired(String),
    /// A principal name that is empty, too long or not printable.
    #[error("invalid principal: {0}")]
    InvalidPrincipal(String),
    /// A workflow definition document (`crate::definition`) that cannot be read: the message
    /// names the JSON path of what is wrong. Nothing was submitted.
    #[error("invalid workflow definition {0}")]
    InvalidDefinition(String),
    /// A bulk add ([`crate::Handle::add_many`]) refused whole: every bad item, by index, with
    /// why. Nothing was added.
    #[error("bulk add refused, nothing added: {}", crate::engine::bulk::describe(.0))]
    BulkRejected(Vec<crate::engine::bulk::BulkRejection>),
    /// [`crate::Handle::wait_for`] or `wait_timeout` gave up: the workflow did not reach
    /// `until` within the timeout (it is not touched; wait again to go on).
    #[error("workflow {workflow} was not {until} after {waited_ms} ms of waiting")]
    WaitTimeout {
        workflow: WorkflowId,
        until: crate::engine::until::Until,
        waited_ms: u64,
    },
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
            Error::LeaseLost { .. } => "lease_lost",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::Forbidden(_) => "forbidden",
            Error::Expired(_) => "expired",
            Error::InvalidPrincipal(_) => "invalid_principal",
            Error::InvalidDefinition(_) => "invalid_definition",
            Error::BulkRejected(_) => "bulk_rejected",
            Error::WaitTimeout { .. } => "wait_timeout",
        }
    }
}

/// An error answered across processes: the orchestrator's refusal of a request a worker sent
/// through the hot tier (a handler's submit or control command). Validation errors and domain
/// refusals keep their variant, so a handler in a worker process gets the same typed error as
/// one inside the engine's process; anything else keeps its code and message.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireError {
    UnknownTask {
        name: String,
    },
    InvalidKwargs {
        task: String,
        reason: String,
    },
    InvalidInput {
        task: String,
        reason: String,
    },
    TooLarge {
        what: String,
        bytes: usize,
        max: usize,
    },
    TooDeep {
        what: String,
        depth: usize,
        max: usize,
    },
    TooMany {
        what: String,
        count: usize,
        max: usize,
    },
    InvalidTree(String),
    /// Any other domain refusal (a control command's, say).
    Rejected(WireRejection),
    Other {
        code: String,
        message: String,
    },
}

/// A [`Rejection`] as it crosses processes (owned, so it can be read back).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WireRejection {
    AlreadyExists,
    NoSuchWorkflow,
    NoSuchNode(NodeIndex),
    InvalidTree(String),
    InvalidTransition { op: String, status: Status },
    NotASwarm(NodeIndex),
    SwarmClosed(NodeIndex),
    NotARoot(NodeIndex),
    KwargsNotObject,
    ConfirmationRequired,
    Canceled(NodeIndex),
    NotYet(NodeIndex),
    NotMarked,
    NotExpired(Timestamp),
    Purged,
    StaleAttempt { node: NodeIndex, attempt: u32 },
    NotAGate(NodeIndex),
    SwarmFull(NodeIndex),
    InvalidPriority(i32),
    Internal(String),
}

/// Every `op` of [`Rejection::InvalidTransition`], so one that crossed processes gets its
/// `&'static str` back (one missing here arrives as [`WireError::Other`], code and message
/// intact).
const TRANSITION_OPS: &[&str] = &[
    "run",
    "add tasks to",
    "close",
    "update kwargs of",
    "start",
    "fail",
    "suspend",
    "resume",
    "interrupt",
    "rerun",
    "cancel",
    "signal",
    "change the priority of",
];

impl From<&Rejection> for WireRejection {
    fn from(r: &Rejection) -> Self {
        match r {
            Rejection::AlreadyExists => WireRejection::AlreadyExists,
            Rejection::NoSuchWorkflow => WireRejection::NoSuchWorkflow,
            Rejection::NoSuchNode(n) => WireRejection::NoSuchNode(*n),
            Rejection::InvalidTree(reason) => WireRejection::InvalidTree(reason.clone()),
            Rejection::InvalidTransition { op, status } => WireRejection::InvalidTransition {
                op: (*op).to_owned(),
                status: *status,
            },
            Rejection::NotASwarm(n) => WireRejection::NotASwarm(*n),
            Rejection::SwarmClosed(n) => WireRejection::SwarmClosed(*n),
            Rejection::NotARoot(n) => WireRejection::NotARoot(*n),
            Rejection::KwargsNotObject => WireRejection::KwargsNotObject,
            Rejection::ConfirmationRequired => WireRejection::ConfirmationRequired,
            Rejection::Canceled(n) => WireRejection::Canceled(*n),
            Rejection::NotYet(n) => WireRejection::NotYet(*n),
            Rejection::NotMarked => WireRejection::NotMarked,
            Rejection::NotExpired(t) => WireRejection::NotExpired(*t),
            Rejection::Purged => WireRejection::Purged,
            Rejection::StaleAttempt { node, attempt } => WireRejection::StaleAttempt {
                node: *node,
                attempt: *attempt,
            },
            Rejection::NotAGate(n) => WireRejection::NotAGate(*n),
            Rejection::SwarmFull(n) => WireRejection::SwarmFull(*n),
            Rejection::InvalidPriority(p) => WireRejection::InvalidPriority(*p),
            Rejection::Internal(m) => WireRejection::Internal(m.clone()),
        }
    }
}

impl WireRejection {
    /// The rejection it stands for; `None` for a transition whose `op` this build does not know.
    fn into_rejection(self) -> Option<Rejection> {
        Some(match self {
            WireRejection::AlreadyExists => Rejection::AlreadyExists,
            WireRejection::NoSuchWorkflow => Rejection::NoSuchWorkflow,
            WireRejection::NoSuchNode(n) => Rejection::NoSuchNode(n),
            WireRejection::InvalidTree(reason) => Rejection::InvalidTree(reason),
            WireRejection::InvalidTransition { op, status } => Rejection::InvalidTransition {
                op: TRANSITION_OPS.iter().copied().find(|o| *o == op)?,
                status,
            },
            WireRejection::NotASwarm(n) => Rejection::NotASwarm(n),
            WireRejection::SwarmClosed(n) => Rejection::SwarmClosed(n),
            WireRejection::NotARoot(n) => Rejection::NotARoot(n),
            WireRejection::KwargsNotObject => Rejection::KwargsNotObject,
            WireRejection::ConfirmationRequired => Rejection::ConfirmationRequired,
            WireRejection::Canceled(n) => Rejection::Canceled(n),
            WireRejection::NotYet(n) => Rejection::NotYet(n),
            WireRejection::NotMarked => Rejection::NotMarked,
            WireRejection::NotExpired(t) => Rejection::NotExpired(t),
            WireRejection::Purged => Rejection::Purged,
            WireRejection::StaleAttempt { node, attempt } => {
                Rejection::StaleAttempt { node, attempt }
            }
            WireRejection::NotAGate(n) => Rejection::NotAGate(n),
            WireRejection::SwarmFull(n) => Rejection::SwarmFull(n),
            WireRejection::InvalidPriority(p) => Rejection::InvalidPriority(p),
            WireRejection::Internal(m) => Rejection::Internal(m),
        })
    }
}

/// Every `what` of the size errors, so one that crossed processes gets its `&'static str` back.
/// One missing here is not lost: it arrives as [`WireError::Other`], code and message intact.
const WHATS: &[&str] = &[
    "input",
    "kwargs",
    "checkpoint",
    "result",
    "submit request",
    "signal",
    "rejection reason",
    "workflow definition",
    "items of a swarm added inside another swarm's items (add them separately)",
    "signatures in one event (swarm items are split automatically; chain steps and callbacks are not)",
    "signatures in a swarm's per-item callbacks",
];

fn known_what(what: &str) -> Option<&'static str> {
    WHATS.iter().copied().find(|w| *w == what)
}

impl From<&Error> for WireError {
    fn from(e: &Error) -> Self {
        match e {
            Error::UnknownTask { name } => WireError::UnknownTask { name: name.clone() },
            Error::InvalidKwargs { task, reason } => WireError::InvalidKwargs {
                task: task.clone(),
                reason: reason.clone(),
            },
            Error::InvalidInput { task, reason } => WireError::InvalidInput {
                task: task.clone(),
                reason: reason.clone(),
            },
            Error::TooLarge { what, bytes, max } => WireError::TooLarge {
                what: (*what).to_owned(),
                bytes: *bytes,
                max: *max,
            },
            Error::TooDeep { what, depth, max } => WireError::TooDeep {
                what: (*what).to_owned(),
                depth: *depth,
                max: *max,
            },
            Error::TooMany { what, count, max } => WireError::TooMany {
                what: (*what).to_owned(),
                count: *count,
                max: *max,
            },
            Error::Rejected(Rejection::InvalidTree(reason)) => {
                WireError::InvalidTree(reason.clone())
            }
            Error::Rejected(r) => WireError::Rejected(r.into()),
            // Their message alone: the receiving side rebuilds the variant around it.
            Error::Unauthenticated(m)
            | Error::Forbidden(m)
            | Error::Expired(m)
            | Error::InvalidPrincipal(m)
            | Error::InvalidDefinition(m) => WireError::Other {
                code: e.code().to_owned(),
                message: m.clone(),
            },
            other => WireError::Other {
                code: other.code().to_owned(),
                message: other.to_string(),
            },
        }
    }
}

impl From<WireError> for Error {
    fn from(e: WireError) -> Self {
        let other = |code: &str, message: String| match code {
            "shut_down" => Error::ShutDown,
            "unauthenticated" => Error::Unauthenticated(message),
            "forbidden" => Error::Forbidden(message),
            "expired" => Error::Expired(message),
            "invalid_principal" => Error::InvalidPrincipal(message),
            "invalid_definition" => Error::InvalidDefinition(message),
            _ => Error::Hot(format!("the orchestrator refused ({code}): {message}")),
        };
        match e {
            WireError::UnknownTask { name } => Error::UnknownTask { name },
            WireError::InvalidKwargs { task, reason } => Error::InvalidKwargs { task, reason },
            WireError::InvalidInput { task, reason } => Error::InvalidInput { task, reason },
            WireError::TooLarge { what, bytes, max } => match known_what(&what) {
                Some(what) => Error::TooLarge { what, bytes, max },
                None => other(
                    "too_large",
                    format!("{what} is {bytes} bytes, more than the limit of {max}"),
                ),
            },
            WireError::TooDeep { what, depth, max } => match known_what(&what) {
                Some(what) => Error::TooDeep { what, depth, max },
                None => other(
                    "too_deep",
                    format!("{what} is nested {depth} levels deep, more than the limit of {max}"),
                ),
            },
            WireError::TooMany { what, count, max } => match known_what(&what) {
                Some(what) => Error::TooMany { what, count, max },
                None => other(
                    "too_many",
                    format!("too many {what}: {count}, the limit is {max}"),
                ),
            },
            WireError::InvalidTree(reason) => Error::Rejected(Rejection::InvalidTree(reason)),
            WireError::Rejected(r) => {
                let message = format!("{r:?}");
                match r.into_rejection() {
                    Some(r) => Error::Rejected(r),
                    None => other("invalid_transition", message),
                }
            }
            WireError::Other { code, message } => other(&code, message),
        }
    }
}

/// The orchestrator's answer to a worker's submit, as JSON in the hot tier.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubmitAnswer {
    /// The workflow exists and its creation is durable (created now, or by an earlier attempt).
    Created,
    Refused(WireError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn across(e: Error) -> Error {
        let json = serde_json::to_string(&WireError::from(&e)).expect("encode");
        Error::from(serde_json::from_str::<WireError>(&json).expect("decode"))
    }

    /// One of every rejection (the match below stops compiling when one is added, until it is
    /// listed here too).
    fn every_rejection() -> Vec<Rejection> {
        let mut all = vec![
            Rejection::AlreadyExists,
            Rejection::NoSuchWorkflow,
            Rejection::NoSuchNode(3),
            Rejection::InvalidTree("a cycle".into()),
            Rejection::NotASwarm(1),
            Rejection::SwarmClosed(2),
            Rejection::NotARoot(4),
            Rejection::KwargsNotObject,
            Rejection::ConfirmationRequired,
            Rejection::Canceled(5),
            Rejection::NotYet(6),
            Rejection::NotMarked,
            Rejection::NotExpired(Timestamp::from_micros(1_700_000_000_000_000)),
            Rejection::Purged,
            Rejection::StaleAttempt {
                node: 1,
                attempt: 2,
            },
            Rejection::NotAGate(3),
            Rejection::SwarmFull(4),
            Rejection::InvalidPriority(5_000),
            Rejection::Internal("a bug".into()),
        ];
        for op in TRANSITION_OPS {
            all.push(Rejection::InvalidTransition {
                op,
                status: Status::Done,
            });
        }
        for r in &all {
            match r {
                Rejection::AlreadyExists
                | Rejection::NoSuchWorkflow
                | Rejection::NoSuchNode(_)
                | Rejection::InvalidTree(_)
                | Rejection::InvalidTransition { .. }
                | Rejection::NotASwarm(_)
                | Rejection::SwarmClosed(_)
                | Rejection::NotARoot(_)
                | Rejection::KwargsNotObject
                | Rejection::ConfirmationRequired
                | Rejection::Canceled(_)
                | Rejection::NotYet(_)
                | Rejection::NotMarked
                | Rejection::NotExpired(_)
                | Rejection::Purged
                | Rejection::StaleAttempt { .. }
                | Rejection::NotAGate(_)
                | Rejection::SwarmFull(_)
                | Rejection::InvalidPriority(_)
                | Rejection::Internal(_) => {}
            }
        }
        all
    }

    /// One of every error, every rejection among them, and both codes of `Store`.
    fn every_error() -> Vec<Error> {
        let sig = SignatureId::root(WorkflowId(uuid::Uuid::nil()));
        let mut all = vec![
            Error::UnknownTask { name: "t".into() },
            Error::InvalidKwargs {
                task: "t".into(),
                reason: "r".into(),
            },
            Error::InvalidInput {
                task: "t".into(),
                reason: "r".into(),
            },
            Error::TooLarge {
                what: "input",
                bytes: 2,
                max: 1,
            },
            Error::TooDeep {
                what: "input",
                depth: 2,
                max: 1,
            },
            Error::TooMany {
                what: "signatures",
                count: 2,
                max: 1,
            },
            Error::NoSuchWorkflow(sig.workflow),
            Error::NoSuchSignature(sig),
            Error::Store(mageflow_store::Error::Conflict {
                stream: sig.workflow,
                expected: 1,
                actual: 2,
            }),
            Error::Store(mageflow_store::Error::Storage("disk".into())),
            Error::ShutDown,
            Error::Replay(
                sig.workflow,
                mageflow_core::ApplyError::InvalidTree("x".into()),
            ),
            Error::NeedsEngine,
            Error::Hot("down".into()),
            Error::WaitTimeout {
                workflow: sig.workflow,
                until: crate::Until::Settled,
                waited_ms: 1,
            },
            Error::LeaseLost { sig, attempt: 1 },
            Error::Unauthenticated("unsigned".into()),
            Error::Forbidden("a viewer".into()),
            Error::Expired("late".into()),
            Error::InvalidPrincipal("empty".into()),
            Error::InvalidDefinition("at root: missing field".into()),
            Error::BulkRejected(vec![crate::engine::bulk::BulkRejection {
                index: 3,
                code: "unknown_task",
                message: "unknown task".into(),
            }]),
        ];
        all.extend(every_rejection().into_iter().map(Error::Rejected));
        for e in &all {
            match e {
                Error::UnknownTask { .. }
                | Error::InvalidKwargs { .. }
                | Error::InvalidInput { .. }
                | Error::TooLarge { .. }
                | Error::TooDeep { .. }
                | Error::TooMany { .. }
                | Error::NoSuchWorkflow(_)
                | Error::NoSuchSignature(_)
                | Error::Rejected(_)
                | Error::Store(_)
                | Error::ShutDown
                | Error::Replay(..)
                | Error::NeedsEngine
                | Error::Hot(_)
                | Error::WaitTimeout { .. }
                | Error::LeaseLost { .. }
                | Error::Unauthenticated(_)
                | Error::Forbidden(_)
                | Error::Expired(_)
                | Error::InvalidPrincipal(_)
                | Error::InvalidDefinition(_)
                | Error::BulkRejected(_) => {}
            }
        }
        all
    }

    #[test]
    fn every_code_is_documented() {
        let doc = include_str!("../../../docs/errors.md");
        let mut missing: Vec<&str> = every_error()
            .iter()
            .map(Error::code)
            .filter(|code| !doc.contains(&format!("| `{code}` |")))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        assert!(
            missing.is_empty(),
            "codes missing from docs/errors.md: {missing:?}"
        );
    }

    #[test]
    fn rejections_cross_processes_whole() {
        for r in every_rejection() {
            match across(Error::Rejected(r.clone())) {
                Error::Rejected(back) => assert_eq!(back, r),
                other => panic!("{r:?} came back as {other:?}"),
            }
        }
    }

    #[test]
    fn a_transition_this_build_does_not_know_keeps_its_code() {
        let wire = WireError::Rejected(WireRejection::InvalidTransition {
            op: "teleport".into(),
            status: Status::Running,
        });
        let e = Error::from(wire);
        assert!(matches!(e, Error::Hot(_)), "{e:?}");
        assert!(e.to_string().contains("invalid_transition"), "{e}");
    }
}
