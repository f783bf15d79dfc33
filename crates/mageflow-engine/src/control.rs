//! Commands on a running system — cancel, interrupt, suspend, resume, delete, restore, rerun —
//! as operators send them (the CLI: straight to an engine on an embedded store, or, on
//! PostgreSQL + Redis, relayed through the hot tier to the orchestrator, which carries them out
//! as the operator's principal and answers once they are durable or refused) and as handlers
//! send them ([`crate::TaskContext::control`], by the same relay from a worker process).

use crate::{Error, Handle, Result, WireError};
use mageflow_core::{SignatureId, WorkflowId};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// One operator command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ControlOp {
    /// Stop and delete for good; needs confirmation.
    Cancel,
    /// Stop now (running handlers get their token fired); resumable, best effort.
    Interrupt,
    /// Pause softly: nothing new starts, running attempts finish.
    Suspend,
    /// Continue a suspended or interrupted signature.
    Resume,
    /// Mark the workflow for deletion (purged after its window unless restored or rerun).
    Delete,
    /// Lift a deletion mark before it expires.
    Restore,
    /// Run a finished workflow again from its original input.
    Rerun,
}

impl ControlOp {
    /// Every command, in the order the CLI lists them.
    pub const ALL: [ControlOp; 7] = [
        ControlOp::Cancel,
        ControlOp::Interrupt,
        ControlOp::Suspend,
        ControlOp::Resume,
        ControlOp::Delete,
        ControlOp::Restore,
        ControlOp::Rerun,
    ];

    /// The command's name, as the CLI and the relay spell it (`cancel`, `interrupt`, …).
    pub fn name(self) -> &'static str {
        match self {
            ControlOp::Cancel => "cancel",
            ControlOp::Interrupt => "interrupt",
            ControlOp::Suspend => "suspend",
            ControlOp::Resume => "resume",
            ControlOp::Delete => "delete",
            ControlOp::Restore => "restore",
            ControlOp::Rerun => "rerun",
        }
    }
}

impl fmt::Display for ControlOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ControlOp {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        ControlOp::ALL
            .into_iter()
            .find(|op| op.name() == s)
            .ok_or_else(|| Error::InvalidInput {
                task: "(control)".into(),
                reason: format!("unknown command {s:?}"),
            })
    }
}

/// A signature id (`sig_…`), or a workflow id (`wf_…`) meaning its root signature.
pub fn parse_target(id: &str) -> Result<SignatureId> {
    if let Ok(wf) = id.parse::<WorkflowId>() {
        return Ok(SignatureId::root(wf));
    }
    id.parse::<SignatureId>().map_err(|e| Error::InvalidInput {
        task: "(control)".into(),
        reason: format!("{id:?} is neither a workflow id nor a signature id: {e}"),
    })
}

/// Carry out `op` on `target` through `h` (acting as whoever `h` acts for); returns what was
/// done, for the operator. Workflow-level commands (delete, restore, rerun) act on the
/// target's workflow.
pub async fn apply(
    h: &Handle,
    op: ControlOp,
    target: SignatureId,
    confirmed: bool,
) -> Result<String> {
    let wf = target.workflow;
    Ok(match op {
        ControlOp::Cancel => {
            h.cancel(target, confirmed).await?;
            format!("{target} canceled: only its audit record stays")
        }
        ControlOp::Interrupt => {
            h.interrupt(target).await?;
            format!(
                "{target} interrupted (resume runs it again from its last checkpoint, best effort)"
            )
        }
        ControlOp::Suspend => {
            h.suspend(target).await?;
            format!("{target} suspended")
        }
        ControlOp::Resume => {
            h.resume(target).await?;
            format!("{target} resumed")
        }
        ControlOp::Delete => {
            let until = h.delete(wf).await?;
            format!("{wf} marked for deletion; purged at {until} unless restored or rerun")
        }
        ControlOp::Restore => {
            h.restore(wf).await?;
            format!("{wf} restored")
        }
        ControlOp::Rerun => {
            h.rerun(wf).await?;
            format!("{wf} runs again")
        }
    })
}

/// The orchestrator's answer to a relayed command.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ControlAnswer {
    /// Done and durable; what was done.
    Done(String),
    /// Refused: the error, as it crosses processes.
    Refused(WireError),
}

impl ControlAnswer {
    /// The answer to send for what [`apply`] returned.
    pub fn of(result: Result<String>) -> Self {
        match result {
            Ok(done) => ControlAnswer::Done(done),
            Err(e) => ControlAnswer::Refused(WireError::from(&e)),
        }
    }

    /// What the relaying caller gets: what was done, or the refusal as the engine's error.
    pub fn into_result(self) -> Result<String> {
        match self {
            ControlAnswer::Done(done) => Ok(done),
            ControlAnswer::Refused(e) => Err(e.into()),
        }
    }
}
