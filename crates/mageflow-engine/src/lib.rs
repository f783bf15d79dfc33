//! Mageflow's engine: the orchestrator that carries out `decide`/`apply` against the event log
//! (hot state in process, effects only after durability), the in-process worker runtime that
//! runs registered handlers, and the user-facing builders for signatures, chains and swarms.

pub mod builtin;
mod clock;
mod compaction;
mod context;
pub mod control;
mod det;
mod engine;
mod error;
mod log_slot;
mod registry;
mod sig;
pub mod worker;

pub use clock::{now, Clock};
pub use compaction::{CompactionStats, HistoryPass, COMPACT_AFTER_DEFAULT};
pub use context::{TaskContext, WorkerLink};
pub use engine::{
    AutoResume, Config, Dispatch, Engine, Handle, HistoryCompaction, PositionFloor, RecoveryReport,
    SkippedWorkflow, Stats, StoredRefusal, StoredResumeReport, Submitted, Until, INPUT_BYTES_MAX,
    RECOVERY_CORRUPT_LISTED_MAX,
};
pub use error::{Error, Result, SubmitAnswer, WireError, WireRejection};
pub use registry::{Registry, TaskDef, TaskFailure};
pub use sig::{
    chain, sign, swarm, value_depth, ChainSig, Sig, SwarmSig, TaskSig, CREATE_NODES_MAX,
    KWARGS_BYTES_MAX, LABEL_BYTES_MAX, SWARM_ITEMS_PER_EVENT, VALUE_DEPTH_MAX,
};
