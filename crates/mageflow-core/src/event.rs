//! Events: the only thing ever written to the log. The envelope ([`Event`]) is versioned and is
//! the one place core types are serialized (see [`crate::codec`]).

use crate::id::{NodeIndex, WorkflowId};
use crate::model::{Message, NodeSpec, Status, TaskError};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Version of the event schema written by this build. Older versions must keep decoding.
/// History: 1 = the first schema; 2 = adds [`Payload::ResumeReport`].
pub const SCHEMA_VERSION: u16 = 2;

/// Who caused an event.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    /// A caller of the API (library, CLI, HTTP), by principal name.
    Api { principal: String },
    /// A worker process or in-process worker slot.
    Worker { id: String },
    /// The engine itself (timers, cascades, recovery), by component name.
    System { component: String },
}

impl Actor {
    pub fn api(principal: impl Into<String>) -> Self {
        Actor::Api {
            principal: principal.into(),
        }
    }
    pub fn worker(id: impl Into<String>) -> Self {
        Actor::Worker { id: id.into() }
    }
    pub fn system(component: impl Into<String>) -> Self {
        Actor::System {
            component: component.into(),
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Api { principal } => write!(f, "api:{principal}"),
            Actor::Worker { id } => write!(f, "worker:{id}"),
            Actor::System { component } => write!(f, "system:{component}"),
        }
    }
}

/// One durable event of one workflow stream.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Event {
    pub stream: WorkflowId,
    /// 1-based, dense, per stream.
    pub seq: u64,
    pub at: Timestamp,
    pub actor: Actor,
    pub schema: u16,
    pub payload: Payload,
}

/// What happened. Node indexes refer to the workflow of the event's stream.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// A whole signature tree was created (root is index 0), atomically.
    WorkflowCreated {
        nodes: Vec<NodeSpec>,
    },
    /// Signatures appended to an open swarm (indexes continue after the existing ones).
    SwarmItemsAdded {
        swarm: NodeIndex,
        nodes: Vec<NodeSpec>,
    },
    SwarmClosed {
        swarm: NodeIndex,
    },
    /// Bound kwargs deep-merged with `kwargs`.
    KwargsUpdated {
        node: NodeIndex,
        kwargs: Value,
    },
    /// A task was triggered with its message; `parked` means an enclosing container (or the node
    /// itself) is suspended, so it waits in `suspended` until resumed.
    Queued {
        node: NodeIndex,
        message: Message,
        parked: bool,
    },
    /// A container was triggered and starts dispatching its children.
    ContainerStarted {
        node: NodeIndex,
        message: Message,
        parked: bool,
    },
    /// A swarm handed out its next `count` items (FIFO).
    SwarmDispatched {
        swarm: NodeIndex,
        count: u32,
    },
    /// Attempt `attempt` of a task started on a worker.
    Started {
        node: NodeIndex,
        attempt: u32,
    },
    /// The handler recorded a checkpoint; a resumed attempt receives it.
    Checkpointed {
        node: NodeIndex,
        attempt: u32,
        data: Value,
    },
    /// A task attempt (or a container) finished successfully.
    Succeeded {
        node: NodeIndex,
        attempt: u32,
        result: Value,
    },
    /// A task attempt failed and will be retried at `retry_at`. `lost` means the attempt did
    /// not fail but its worker disappeared; it does not count against the retry budget.
    RetryScheduled {
        node: NodeIndex,
        attempt: u32,
        error: TaskError,
        retry_at: Timestamp,
        #[serde(default)]
        lost: bool,
    },
    /// A task (final attempt) or a container failed.
    Failed {
        node: NodeIndex,
        attempt: u32,
        error: TaskError,
    },
    Suspended {
        node: NodeIndex,
    },
    /// Back from suspended or interrupted to `status`.
    Resumed {
        node: NodeIndex,
        status: Status,
    },
    /// Stopped aggressively; a running attempt is revoked.
    Interrupted {
        node: NodeIndex,
    },
    /// Stopped for good; a running attempt is revoked.
    Canceled {
        node: NodeIndex,
    },
    /// The workflow (root `node` and everything under it) is soft-deleted until `expires_at`.
    MarkedForDeletion {
        node: NodeIndex,
        expires_at: Timestamp,
    },
    /// The deletion mark is lifted (before expiry); nothing else changes.
    Restored {
        node: NodeIndex,
    },
    /// The workflow is reset to run again (from done or failed; a deletion mark is lifted too);
    /// the events that follow trigger it with its original message.
    Rerun {
        node: NodeIndex,
    },
    /// The deletion window ended: task data (kwargs, messages, results, checkpoints) is dropped
    /// from the state for good.
    Purged {
        node: NodeIndex,
    },
    /// What an engine's recovery pass found in the log and did about it (schema 2). Only ever
    /// in the system stream ([`WorkflowId::SYSTEM`]), never folded into a workflow. `report`
    /// is a JSON object whose shape the engine owns (its `RecoveryReport`), so the report can
    /// gain fields without a codec change.
    ResumeReport {
        report: Value,
    },
}

impl Payload {
    /// The node an event is about (the swarm for swarm events).
    pub fn node(&self) -> Option<NodeIndex> {
        use Payload::*;
        match self {
            WorkflowCreated { .. } | ResumeReport { .. } => None,
            SwarmItemsAdded { swarm, .. }
            | SwarmClosed { swarm }
            | SwarmDispatched { swarm, .. } => Some(*swarm),
            KwargsUpdated { node, .. }
            | Queued { node, .. }
            | ContainerStarted { node, .. }
            | Started { node, .. }
            | Checkpointed { node, .. }
            | Succeeded { node, .. }
            | RetryScheduled { node, .. }
            | Failed { node, .. }
            | Suspended { node }
            | Resumed { node, .. }
            | Interrupted { node }
            | Canceled { node }
            | MarkedForDeletion { node, .. }
            | Restored { node }
            | Rerun { node }
            | Purged { node } => Some(*node),
        }
    }

    /// Stable snake_case name of the event kind.
    pub fn kind(&self) -> &'static str {
        use Payload::*;
        match self {
            WorkflowCreated { .. } => "workflow_created",
            SwarmItemsAdded { .. } => "swarm_items_added",
            SwarmClosed { .. } => "swarm_closed",
            KwargsUpdated { .. } => "kwargs_updated",
            Queued { .. } => "queued",
            ContainerStarted { .. } => "container_started",
            SwarmDispatched { .. } => "swarm_dispatched",
            Started { .. } => "started",
            Checkpointed { .. } => "checkpointed",
            Succeeded { .. } => "succeeded",
            RetryScheduled { .. } => "retry_scheduled",
            Failed { .. } => "failed",
            Suspended { .. } => "suspended",
            Resumed { .. } => "resumed",
            Interrupted { .. } => "interrupted",
            Canceled { .. } => "canceled",
            MarkedForDeletion { .. } => "marked_for_deletion",
            Restored { .. } => "restored",
            Rerun { .. } => "rerun",
            Purged { .. } => "purged",
            ResumeReport { .. } => "resume_report",
        }
    }
}
