//! Mageflow's engine: the orchestrator that carries out `decide`/`apply` against the event log
//! (hot state in process, effects only after durability), the in-process worker runtime that
//! runs registered handlers, and the user-facing builders for signatures, chains and swarms.
//!
//! # Layering
//!
//! The modules form no cycle: each imports only from the ones listed before it (the facades —
//! this file, `engine/mod.rs`, `control/mod.rs` — only declare and re-export).
//!
//! 1. `clock`, `det`, `log_slot`, and the engine's plain data: `engine::{until, report, stats,
//!    config}` (the settings use `clock`).
//! 2. `error` (its `WaitTimeout` names `engine::until::Until`).
//! 3. `sig` (the builders, plain data) and `control::command` (the command types).
//! 4. `context`: what a handler sees. It reaches an engine in this process only through the
//!    `EngineLink` trait, never the `Handle` itself.
//! 5. `registry` (a handler takes a `TaskContext`), then `sig::flatten` (a tree checked against
//!    the registry and flattened), `builtin`, and `attempt` (one attempt of a handler, run to
//!    its end, for the engine's workers and `worker` alike).
//! 6. `worker`: the runtime of a worker process.
//! 7. The handle: `engine::{submit, request, handle, history}`.
//! 8. What is built on the handle: `compaction` (the job, and `Handle::compact`),
//!    `control::apply`, and `engine::link` (the handle as the context's `EngineLink`).
//! 9. The orchestrator: `engine::orchestrator`, with `engine::{decide, effects, recovery}`
//!    adding to it.
//! 10. `engine::lifecycle`: `Engine::start` and `shutdown`, which wire the handle, the
//!     orchestrator and the compaction job together.

mod attempt;
pub mod builtin;
mod clock;
mod compaction;
mod context;
pub mod control;
pub mod definition;
mod det;
mod engine;
mod error;
mod log_slot;
mod registry;
mod sig;
pub mod worker;

pub use clock::{now, Clock};
pub use compaction::HistoryPass;
pub use context::{TaskContext, WorkerLink};
pub use engine::bulk::{BulkOptions, BulkPhase, BulkProgress, BulkRejection, BulkReport};
pub use engine::{
    AutoResume, CompactionStats, Config, Dispatch, Engine, Handle, HistoryCompaction,
    PositionFloor, RecoveryReport, SkippedWorkflow, Stats, StoredRefusal, StoredResumeReport,
    Submitted, Until, COMPACT_AFTER_DEFAULT, INPUT_BYTES_MAX, RECOVERY_CORRUPT_LISTED_MAX,
};
pub use error::{Error, Result, SubmitAnswer, WireError, WireRejection};
pub use registry::{Registry, TaskDef, TaskFailure};
pub use sig::templates;
pub use sig::{
    chain, gate, graph, sign, swarm, value_depth, ChainSig, GateSig, GraphEdge, GraphNode,
    GraphSig, Sig, SwarmSig, TaskSig, CREATE_NODES_MAX, ITEM_CALLBACK_NODES_MAX, KWARGS_BYTES_MAX,
    LABEL_BYTES_MAX, SWARM_ITEMS_PER_EVENT, VALUE_DEPTH_MAX,
};
