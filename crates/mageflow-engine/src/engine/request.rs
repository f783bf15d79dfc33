//! What a [`Handle`] sends the orchestrator ([`Request`], with the [`Action`]s of an `Exec`): the
//! one channel between the two.
//!
//! [`Handle`]: super::handle::Handle

use super::until::Until;
use crate::error::Result;
use crate::registry::TaskFailure;
use crate::sig::Sig;
use mageflow_core::{Actor, NodeIndex, Op, SignatureId, Workflow, WorkflowId};
use serde_json::Value;
use std::any::Any;
use tokio::sync::oneshot;

pub(super) enum Action {
    Core(Op),
    AddItems {
        swarm: NodeIndex,
        items: Vec<Sig>,
        close: bool,
    },
}

pub(super) enum Request {
    /// Actions on one or more workflows, all-or-nothing.
    Exec {
        actions: Vec<(WorkflowId, Action)>,
        actor: Actor,
        /// Treat "already exists" on create as success (idempotent creation).
        idempotent: bool,
        reply: Option<oneshot::Sender<Result<()>>>,
    },
    /// A handler finished (`None`: it was stopped and reports nothing), or an outside worker
    /// reported through [`Handle::report`].
    ///
    /// [`Handle::report`]: crate::Handle::report
    Done {
        sig: SignatureId,
        attempt: u32,
        result: Option<std::result::Result<Value, TaskFailure>>,
        /// Sent by this process's worker runtime when the handler of that attempt returned or
        /// was dropped: only such a report gives back the worker slot the attempt held.
        local: bool,
    },
    /// A worker process gave up an attempt ([`Handle::report_abandoned`]).
    ///
    /// [`Handle::report_abandoned`]: crate::Handle::report_abandoned
    Abandoned {
        sig: SignatureId,
        attempt: u32,
        reply: oneshot::Sender<Result<()>>,
    },
    Wait {
        wf: WorkflowId,
        until: Until,
        reply: oneshot::Sender<Result<Workflow>>,
    },
    /// Run a read-only function over a workflow's state; the answer is sent once everything
    /// decided before it is durable.
    Inspect {
        wf: WorkflowId,
        f: Inspector,
        reply: oneshot::Sender<Result<Box<dyn Any + Send>>>,
    },
    /// The unfinished workflows whose version is at least `min_version` (the compaction of
    /// running workflows' old history).
    Long {
        min_version: u64,
        reply: oneshot::Sender<Vec<WorkflowId>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

pub(super) type Inspector = Box<dyn FnOnce(&Workflow) -> Box<dyn Any + Send> + Send>;
