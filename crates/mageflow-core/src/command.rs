//! Commands: requests to change a workflow. [`crate::decide`] turns them into events or refuses
//! them with a [`Rejection`].

use crate::event::Actor;
use crate::id::NodeIndex;
use crate::model::{Message, NodeSpec, Status, TaskError};
use crate::time::Timestamp;
use serde_json::Value;

/// A command with who sent it and when (the core never reads a clock).
#[derive(Clone, PartialEq, Debug)]
pub struct Command {
    pub actor: Actor,
    pub at: Timestamp,
    pub op: Op,
}

#[derive(Clone, PartialEq, Debug)]
pub enum Op {
    /// Create the workflow (root = `nodes[0]`); trigger the root with `start` if given.
    Create {
        nodes: Vec<NodeSpec>,
        start: Option<Message>,
    },
    /// Trigger a created, never-triggered root.
    Run {
        message: Message,
    },
    /// Add items to an open swarm (`nodes[0..]` get the next free indexes; their internal links
    /// use those final indexes); optionally close it in the same step.
    AddSwarmItems {
        swarm: NodeIndex,
        nodes: Vec<NodeSpec>,
        close: bool,
    },
    CloseSwarm {
        swarm: NodeIndex,
    },
    UpdateKwargs {
        node: NodeIndex,
        kwargs: Value,
    },
    /// A worker slot takes a queued task.
    Start {
        node: NodeIndex,
    },
    Checkpoint {
        node: NodeIndex,
        attempt: u32,
        data: Value,
    },
    Complete {
        node: NodeIndex,
        attempt: u32,
        result: Value,
    },
    Fail {
        node: NodeIndex,
        attempt: u32,
        error: TaskError,
    },
    /// The worker running `attempt` is gone (crash, lost lease): queue a new attempt now,
    /// without spending the retry budget. A no-op if the attempt already reported.
    Requeue {
        node: NodeIndex,
        attempt: u32,
    },
    Suspend {
        node: NodeIndex,
    },
    Resume {
        node: NodeIndex,
    },
    Interrupt {
        node: NodeIndex,
    },
    /// Signal a waiting gate (`KindSpec::Gate`): `Ok(value)` accepts it — it succeeds with its
    /// input and `value`'s fields merged over it (a value that is not an object replaces the
    /// input) — `Err(error)` rejects it, failing it with `error`. Refused for a node that is not
    /// a gate, or is not waiting (not reached yet, paused, or already ended).
    Signal {
        node: NodeIndex,
        signal: Result<Value, TaskError>,
    },
    /// Destructive: refused unless `confirmed`.
    Cancel {
        node: NodeIndex,
        confirmed: bool,
    },
    /// Soft-delete the workflow (root only) until `expires_at`; a running part keeps running.
    Delete {
        expires_at: Timestamp,
    },
    /// Lift the deletion mark before expiry.
    Restore,
    /// Run a finished (done or failed) signature again, from the message it last ran with; also
    /// lifts a deletion mark. Refused once purged or canceled. The root (`node` 0): the whole
    /// workflow, once nothing in it is in flight. Another signature: it, its callbacks and what
    /// consumed its outcome run again (the later steps of its chain, the graph nodes downstream
    /// of it), and the containers above it that had ended reopen and end anew — refused while
    /// any of that still runs (see `docs/ARCHITECTURE.md`).
    Rerun {
        node: NodeIndex,
    },
    /// Change the priority of a signature that waits (not running, not ended): a swarm hands
    /// out its waiting items, the deployment's queue serves jobs, by the new one from now on.
    SetPriority {
        node: NodeIndex,
        priority: i32,
    },
    /// End of the deletion window (the cleanup job): refused before `expires_at`, while an
    /// attempt is in flight, or if the mark was lifted.
    Purge,
}

/// A domain refusal. Nothing was changed. Each has a stable `code()`.
#[derive(Clone, PartialEq, Debug, thiserror::Error)]
pub enum Rejection {
    #[error("workflow already exists")]
    AlreadyExists,
    #[error("workflow does not exist")]
    NoSuchWorkflow,
    #[error("signature index {0} does not exist in this workflow")]
    NoSuchNode(NodeIndex),
    #[error("invalid signature tree: {0}")]
    InvalidTree(String),
    #[error("cannot {op} a signature that is {status}")]
    InvalidTransition { op: &'static str, status: Status },
    #[error("signature {0} is not a swarm")]
    NotASwarm(NodeIndex),
    #[error("swarm {0} is closed: no tasks can be added")]
    SwarmClosed(NodeIndex),
    #[error("only a root signature can be run directly; {0} is triggered by its parent")]
    NotARoot(NodeIndex),
    #[error("kwargs must be a JSON object")]
    KwargsNotObject,
    #[error("cancel deletes the signature and cannot be undone: confirm it explicitly")]
    ConfirmationRequired,
    #[error("signature {0} was canceled: it cannot be resumed or rerun")]
    Canceled(NodeIndex),
    #[error("signature {0} is waiting for its retry backoff")]
    NotYet(NodeIndex),
    #[error("the workflow is not marked for deletion")]
    NotMarked,
    #[error("the deletion window ends at {0}; the workflow cannot be purged before")]
    NotExpired(Timestamp),
    #[error("the workflow was purged: only its audit trail remains, nothing in it can run, be rerun or be restored")]
    Purged,
    /// A checkpoint of an attempt that is not the node's current one (it ended, was revoked,
    /// or was requeued): nothing is recorded, and its handler must not take it as saved.
    #[error("attempt {attempt} of signature {node} is not the current one: nothing was recorded")]
    StaleAttempt { node: NodeIndex, attempt: u32 },
    #[error("signature {0} is not a gate: only a gate takes a signal")]
    NotAGate(NodeIndex),
    /// A rerun inside an item of a swarm that runs as many items as its `max_concurrency`
    /// allows: the item cannot run again now (an item rerun on its own waits for a slot).
    #[error("swarm {0} runs as many items as its max_concurrency allows: rerun this when one ends, or rerun the whole item")]
    SwarmFull(NodeIndex),
    #[error("priority {0} is outside {min}..={max}", min = crate::model::PRIORITY_MIN, max = crate::model::PRIORITY_MAX)]
    InvalidPriority(i32),
    #[error("internal error (a bug): {0}")]
    Internal(String),
}

impl Rejection {
    pub fn code(&self) -> &'static str {
        match self {
            Rejection::AlreadyExists => "already_exists",
            Rejection::NoSuchWorkflow => "no_such_workflow",
            Rejection::NoSuchNode(_) => "no_such_signature",
            Rejection::InvalidTree(_) => "invalid_tree",
            Rejection::InvalidTransition { .. } => "invalid_transition",
            Rejection::NotASwarm(_) => "not_a_swarm",
            Rejection::SwarmClosed(_) => "swarm_closed",
            Rejection::NotARoot(_) => "not_a_root",
            Rejection::KwargsNotObject => "kwargs_not_object",
            Rejection::ConfirmationRequired => "confirmation_required",
            Rejection::Canceled(_) => "canceled",
            Rejection::NotYet(_) => "not_yet",
            Rejection::NotMarked => "not_marked",
            Rejection::NotExpired(_) => "not_expired",
            Rejection::Purged => "purged",
            Rejection::StaleAttempt { .. } => "stale_attempt",
            Rejection::NotAGate(_) => "not_a_gate",
            Rejection::SwarmFull(_) => "swarm_full",
            Rejection::InvalidPriority(_) => "invalid_priority",
            Rejection::Internal(_) => "internal",
        }
    }
}
