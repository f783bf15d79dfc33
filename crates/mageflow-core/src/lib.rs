//! Mageflow's pure core: the domain model (ids, signatures, statuses), commands and events,
//! `decide`/`apply`, what events ask of the world (`effect`), and the event codec. It performs no I/O, reads no clock and depends on no
//! async runtime — time, ids and the actor are arguments — so everything here is deterministic
//! and replayable (`cargo tree -p mageflow-core` shows no tokio, sled or network client).

pub mod apply;
pub mod codec;
pub mod command;
pub mod condition;
pub mod decide;
pub mod effect;
pub mod event;
pub mod fixtures;
pub mod id;
pub mod kind;
pub mod model;
mod rerun;
pub mod time;

pub use apply::{ApplyError, ReplayEvent};
pub use codec::CodecError;
pub use command::{Command, Op, Rejection};
pub use decide::{decide, execute, execute_owned, execute_owned_with};
pub use effect::{effects, Effect};
pub use event::{
    redact_stream, Actor, EdgeDecision, Event, Payload, Redactor, REDACTED_ERROR, SCHEMA_VERSION,
};
pub use id::{NodeIndex, ParseIdError, SignatureId, WorkflowId};
pub use model::{
    Edge, GraphProgress, Join, KindSpec, Link, Message, Node, NodeSpec, Outcome, Priority,
    RetryPolicy, Role, Status, SwarmConfig, TaskError, Workflow, PRIORITY_MAX, PRIORITY_MIN,
};
pub use time::Timestamp;
