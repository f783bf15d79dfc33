//! Commands on a running system — cancel, interrupt, suspend, resume, delete, restore, rerun —
//! as operators send them (the CLI: straight to an engine on an embedded store, or, on
//! PostgreSQL + Redis, relayed through the hot tier to the orchestrator, which carries them out
//! as the operator's principal and answers once they are durable or refused) and as handlers
//! send them ([`crate::TaskContext::control`], by the same relay from a worker process).
//!
//! This file only re-exports: the command types (`command.rs`) sit below the engine, since a
//! handler's context takes a [`ControlOp`]; [`apply`] (`apply.rs`) sits above the engine's
//! handle, which it calls.
//!
//! [`apply`]: fn@apply

mod apply;
pub(crate) mod command;

pub use apply::apply;
pub use command::{
    parse_target, validate_principal, ControlAnswer, ControlOp, Role, PRINCIPAL_BYTES_MAX,
};
