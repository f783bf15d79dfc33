//! What the engine writes about itself to the log's system stream and reads back: the start-up
//! recovery's [`RecoveryReport`] and the records [`Handle::resume_reports`] and
//! [`Handle::refused_commands`] return. Plain data (serde), nothing here reads the log.
//!
//! [`Handle::resume_reports`]: crate::Handle::resume_reports
//! [`Handle::refused_commands`]: crate::Handle::refused_commands

use mageflow_core::{Actor, Timestamp, WorkflowId};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Most corrupt workflows a recovery report lists by id (all are counted).
pub const RECOVERY_CORRUPT_LISTED_MAX: usize = 100;

/// What the engine found in the log when it started, and what it did about it (see
/// [`AutoResume`]). When it found unfinished work or skipped a corrupt workflow it is also
/// written to the log, as one `resume_report` event of the system stream
/// ([`WorkflowId::SYSTEM`]), in the same atomic append as the requeues it made; read them
/// back with [`Handle::resume_reports`]. Counts are of signatures unless said otherwise.
///
/// [`AutoResume`]: crate::AutoResume
/// [`Handle::resume_reports`]: crate::Handle::resume_reports
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct RecoveryReport {
    /// Events read from the log (every stream's).
    pub events_read: u64,
    /// Position of the last event read (0: empty log): the state recovered is the log up to
    /// here.
    pub log_position: u64,
    /// Workflows not finished (corrupt ones excluded).
    pub workflows_unfinished: u64,
    /// Attempts that were running when the previous process stopped: queued again.
    pub attempts_requeued: u64,
    /// With remote dispatch: attempts still held by worker processes, left to them.
    pub attempts_resumed: u64,
    /// Queued tasks put back on the ready queue.
    pub tasks_queued: u64,
    /// Tasks waiting on a retry backoff timer.
    pub retries_waiting: u64,
    /// Suspended or interrupted signatures, left as they are.
    pub paused: u64,
    /// Failed tasks of unfinished workflows: not resumed (only counted).
    pub failed: u64,
    /// In-flight attempts and queued tasks held because auto-resume is off or its filters leave
    /// them out ([`AutoResume`]).
    ///
    /// [`AutoResume`]: crate::AutoResume
    pub skipped_by_filter: u64,
    /// Workflows held whole (auto-resume off, or their root kind filtered out).
    pub workflows_held: u64,
    /// Workflows whose events do not fold (a corrupt or forged log): left out of the hot
    /// state; requests about them fail as a read of them does.
    pub skipped_corrupt: u64,
    /// The first [`RECOVERY_CORRUPT_LISTED_MAX`] of them, with the reason.
    pub corrupt: Vec<SkippedWorkflow>,
    /// Resume actions refused (a requeue the workflow's state did not accept): logged, the
    /// attempt stays as it was.
    pub failures: u64,
    /// Workflows marked for deletion whose purge is (re)scheduled.
    pub deletions_pending: u64,
    /// [`AutoResume::enabled`] of the engine that recovered.
    ///
    /// [`AutoResume::enabled`]: crate::AutoResume::enabled
    pub auto_resume: bool,
    /// [`AutoResume::stagger`] in milliseconds.
    ///
    /// [`AutoResume::stagger`]: crate::AutoResume::stagger
    pub stagger_ms: u64,
}

/// A workflow recovery left out, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SkippedWorkflow {
    /// The workflow left out.
    pub workflow: WorkflowId,
    /// Why its events do not fold (the event and the refusal).
    pub reason: String,
}

/// One resume report read back from the log ([`Handle::resume_reports`]).
///
/// [`Handle::resume_reports`]: crate::Handle::resume_reports
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredResumeReport {
    /// Its sequence number in the system stream.
    pub seq: u64,
    /// When the recovery pass ran (the reference of [`AutoResume::stagger`]).
    ///
    /// [`AutoResume::stagger`]: crate::AutoResume::stagger
    pub at: Timestamp,
    /// The engine that wrote it (`system:recovery`).
    pub actor: Actor,
    /// What that pass found and did.
    pub report: RecoveryReport,
}

/// One refused command read back from the log ([`Handle::refused_commands`]).
///
/// [`Handle::refused_commands`]: crate::Handle::refused_commands
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredRefusal {
    /// Its sequence number in the system stream.
    pub seq: u64,
    /// When it was refused.
    pub at: Timestamp,
    /// Who refused it (`system:intake`).
    pub actor: Actor,
    /// What was refused, by whom, and why (JSON object: `op`, `target`, `principal`, `code`,
    /// `reason`, and the deployment's particulars).
    pub command: Value,
}
