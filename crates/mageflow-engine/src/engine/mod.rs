//! The orchestrator and the in-process worker runtime.
//!
//! One orchestrator task owns the hot state (the workflows that are not finished) and is the only
//! writer of the log. It takes requests in batches: each request becomes core commands, run
//! through `execute` against the hot state; the events of the whole batch go to the log in one
//! atomic append (which the sled backend group-commits). Effects — starting handlers, stopping
//! interrupted ones, answering callers, waking waiters — happen only once that append is
//! durable. While one batch is being made durable the next one is already being decided
//! (pipelining); effects still happen strictly in batch order.
//!
//! Each batch is a numbered step, and the orchestrator remembers for every hot workflow the last
//! step that touched it (decided events for it, read it, registered a waiter on it, or took a
//! report for it). A workflow is *settled* — its waiters answered with its final state, and it
//! is dropped from the hot state if finished — only when that last step is durable: by then no
//! later step has applied events to it that are still on their way to the log, so waiters only
//! ever see durable state. A workflow counts as finished (`Stats::workflows_finished`) once, in
//! the step whose events finish it, when they are durable; reading it later counts nothing.
//!
//! Worker slots are decided here too: a queued task is started (a `Started` event) in the same
//! batch that frees a slot, so the started-event and the previous step's completion share one
//! fsync. Handlers run on tokio tasks and report back as commands; a duplicate or stale report
//! is a no-op in `decide`. A slot is held from the start of an attempt until its handler
//! reports — even when the attempt was revoked (interrupt, cancel) and its handler lingers
//! within the grace period — and only that in-process report gives it back (an outside
//! [`Handle::report`] of the same attempt does not). A signature queued again while an older
//! attempt of it still holds a slot waits until that attempt's handler reports.
//!
//! # Files
//!
//! This file holds no code, only these docs and the re-exports. Bottom to top (a file imports
//! only from files listed before it):
//!
//! - `until.rs`, `report.rs`, `stats.rs`, `config.rs` — plain data: what a waiter waits for,
//!   the recovery report and the system stream's records, the live counters, the settings;
//! - `submit.rs` — the checks a submission passes before anything is written, and `Submitted`;
//! - `request.rs` — what the handle sends the orchestrator;
//! - `handle.rs`, `history.rs` — [`Handle`]: its commands and waits, and its reads of the log;
//! - `link.rs` — the handle as a handler's way to its engine (`TaskContext::engine`);
//! - `orchestrator.rs` — the orchestrator's state and run loop; `decide.rs`, `effects.rs` and
//!   `recovery.rs` add `impl Orchestrator` blocks and import their types from it;
//! - `lifecycle.rs` — [`Engine`]: start (recovery, orchestrator, compaction job) and shutdown.
//!
//! `until`, `config` and `handle` are visible to the crate: `error` names [`Until`], the
//! compaction job and `control::apply` (which sit above the handle) use the other two. The
//! crate's whole layering is in `lib.rs`.

pub(crate) mod bulk;
pub(crate) mod config;
mod decide;
mod effects;
pub(crate) mod handle;
mod history;
mod lifecycle;
mod link;
mod orchestrator;
mod ready;
mod recovery;
mod report;
mod request;
mod stats;
mod submit;
pub(crate) mod until;

pub use config::{
    AutoResume, Config, Dispatch, HistoryCompaction, PositionFloor, COMPACT_AFTER_DEFAULT,
};
pub use handle::Handle;
pub use lifecycle::Engine;
pub use report::{
    RecoveryReport, SkippedWorkflow, StoredRefusal, StoredResumeReport, RECOVERY_CORRUPT_LISTED_MAX,
};
pub use stats::{CompactionStats, Stats};
pub use submit::{Submitted, INPUT_BYTES_MAX};
pub use until::Until;
