//! The commands themselves and who may send them: [`ControlOp`], [`Role`], principals, targets,
//! and the answer relayed back ([`ControlAnswer`]). Below the engine (a handler's context takes a
//! `ControlOp`); carrying one out is `apply.rs`, above the engine's handle.

use crate::error::{Error, Result, WireError};
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
    /// Accept a waiting gate, with a JSON value merged over its input (none: `{}`).
    Signal,
    /// Reject a waiting gate, with a reason (a JSON string).
    Reject,
    /// Create and run the workflow whose root is the target, from a workflow definition
    /// (`crate::definition`); idempotent: a resubmission finds the workflow.
    Submit,
    /// Change the priority of a waiting signature (the value: a JSON number).
    Priority,
}

impl ControlOp {
    /// Every command, in the order the CLI lists them.
    pub const ALL: [ControlOp; 11] = [
        ControlOp::Cancel,
        ControlOp::Interrupt,
        ControlOp::Suspend,
        ControlOp::Resume,
        ControlOp::Delete,
        ControlOp::Restore,
        ControlOp::Rerun,
        ControlOp::Signal,
        ControlOp::Reject,
        ControlOp::Submit,
        ControlOp::Priority,
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
            ControlOp::Signal => "signal",
            ControlOp::Reject => "reject",
            ControlOp::Submit => "submit",
            ControlOp::Priority => "priority",
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

/// Longest principal name, in bytes.
pub const PRINCIPAL_BYTES_MAX: usize = 128;

/// Check a principal name before it is recorded as an event's actor: non-empty, at most
/// [`PRINCIPAL_BYTES_MAX`] bytes, no control characters (a newline or an escape sequence in
/// a name could forge a line of `mageflow history`'s text), no surrounding whitespace.
pub fn validate_principal(principal: &str) -> Result<()> {
    let bad = |why: &str| Err(Error::InvalidPrincipal(format!("{principal:?} {why}")));
    if principal.is_empty() {
        return Err(Error::InvalidPrincipal(
            "a principal must not be empty".into(),
        ));
    }
    if principal.len() > PRINCIPAL_BYTES_MAX {
        return Err(Error::InvalidPrincipal(format!(
            "a principal is at most {PRINCIPAL_BYTES_MAX} bytes (this one is {})",
            principal.len()
        )));
    }
    if principal.chars().any(char::is_control) {
        return bad("holds a control character");
    }
    if principal.trim() != principal {
        return bad("starts or ends with whitespace");
    }
    Ok(())
}

/// What an authenticated principal may do: the one role model of the CLI's relayed commands
/// and the HTTP API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads current state.
    Viewer,
    /// Reads current state and the whole history (the audit trail).
    Auditor,
    /// An auditor who also controls workflows: every [`ControlOp`].
    Operator,
    /// An operator who also runs the deployment (rebuilding the hot tier, managing access).
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Viewer, Role::Auditor, Role::Operator, Role::Admin];

    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether this role may carry out `op`.
    pub fn allows(self, op: ControlOp) -> bool {
        let _ = op; // every command needs the same role today
        self >= Role::Operator
    }

    /// Whether this role may read a workflow's history (not only its current state).
    pub fn reads_history(self) -> bool {
        self >= Role::Auditor
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Role {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Role::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| Error::InvalidInput {
                task: "(role)".into(),
                reason: format!("unknown role {s:?}: viewer, auditor, operator or admin"),
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
    ///
    /// [`apply`]: fn@super::apply
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principals_are_printable_bounded_and_not_empty() {
        assert!(validate_principal("alice").is_ok());
        assert!(validate_principal("task:sig_0123.4").is_ok());
        assert!(validate_principal("Zoë Müller").is_ok());
        for bad in [
            "",
            " alice",
            "alice\n",
            "ali\x1b[2Jce",
            "a\u{7f}",
            "a\u{85}b",
        ] {
            let e = validate_principal(bad).expect_err(bad);
            assert_eq!(e.code(), "invalid_principal", "{bad:?}");
        }
        assert!(validate_principal(&"a".repeat(PRINCIPAL_BYTES_MAX)).is_ok());
        assert!(validate_principal(&"a".repeat(PRINCIPAL_BYTES_MAX + 1)).is_err());
    }

    #[test]
    fn only_operators_and_admins_control_and_roles_parse_by_name() {
        for op in ControlOp::ALL {
            assert!(!Role::Viewer.allows(op) && !Role::Auditor.allows(op));
            assert!(Role::Operator.allows(op) && Role::Admin.allows(op));
        }
        assert!(!Role::Viewer.reads_history() && Role::Auditor.reads_history());
        for r in Role::ALL {
            assert_eq!(r.name().parse::<Role>().ok(), Some(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
