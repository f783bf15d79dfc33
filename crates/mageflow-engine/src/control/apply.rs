//! Carrying out a command through an engine's [`Handle`] ([`apply`]): above the handle, which it
//! calls, and apart from the command types, which sit below the engine.

use super::command::ControlOp;
use crate::engine::handle::Handle;
use crate::error::Result;
use mageflow_core::SignatureId;
use serde_json::Value;

/// Carry out `op` on `target` through `h` (acting as whoever `h` acts for); returns what was
/// done, for the operator. Workflow-level commands (delete, restore) act on the target's
/// workflow; a rerun of a root reruns the workflow, of a signature inside it that signature. `value` is what a signal carries (`{}` when `None`), a rejection's
/// reason (a JSON string), or a submit's workflow definition; other commands ignore it.
pub async fn apply(
    h: &Handle,
    op: ControlOp,
    target: SignatureId,
    confirmed: bool,
    value: Option<Value>,
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
            h.rerun(target).await?;
            format!("{target} runs again")
        }
        ControlOp::Signal => {
            h.signal(
                target,
                value.unwrap_or_else(|| Value::Object(Default::default())),
            )
            .await?;
            format!("{target} signaled: it succeeded and what follows it runs")
        }
        ControlOp::Reject => {
            let reason = match value {
                Some(Value::String(reason)) => reason,
                Some(other) => other.to_string(),
                None => "rejected".to_owned(),
            };
            h.reject(target, reason).await?;
            format!("{target} rejected: it failed and its failure path runs")
        }
        ControlOp::Priority => {
            let priority = match value.as_ref().and_then(Value::as_i64) {
                Some(p) => i32::try_from(p).unwrap_or(if p < 0 { i32::MIN } else { i32::MAX }),
                None => {
                    return Err(crate::Error::InvalidInput {
                        task: "(priority)".into(),
                        reason: format!("the priority must be an integer, not {value:?}"),
                    })
                }
            };
            h.set_priority(target, priority).await?;
            format!("{target} now has priority {priority}")
        }
        ControlOp::Submit => {
            let document = value.unwrap_or(Value::Null);
            let bytes = serde_json::to_vec(&document).unwrap_or_default();
            let (sig, input) = crate::definition::parse(&bytes)?;
            h.submit_idempotent(wf, sig, input).await?;
            format!("{wf} submitted")
        }
    })
}
