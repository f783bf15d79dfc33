//! The engine's settings: [`Config`] and what it is made of ([`Dispatch`], [`AutoResume`],
//! [`HistoryCompaction`], [`PositionFloor`]), with their defaults. Plain data: nothing here runs.

use crate::clock::Clock;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Default delay between a workflow finishing and its compaction.
pub const COMPACT_AFTER_DEFAULT: Duration = Duration::from_secs(300);

/// Where handlers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// In this process, `Config::workers` at a time.
    Local,
    /// In worker processes that take started attempts from the hot tier (Redis) and send their
    /// reports back through it ([`Handle::report`], [`Handle::report_stopped`]). At most
    /// `window` attempts are started and not yet reported at once: the flow control between the
    /// orchestrator and the workers (set it a little above the workers' total concurrency).
    ///
    /// [`Handle::report`]: crate::Handle::report
    /// [`Handle::report_stopped`]: crate::Handle::report_stopped
    Remote {
        /// Attempts started and not yet reported, at most.
        window: usize,
    },
}

/// Engine settings.
#[derive(Clone, Debug)]
pub struct Config {
    /// Handlers running at once in this process (0: record-only, nothing runs). Unused with
    /// [`Dispatch::Remote`].
    pub workers: usize,
    /// Where handlers run (default: in this process).
    pub dispatch: Dispatch,
    /// How long an interrupted or shut-down handler may keep running after its cancellation
    /// token fired before its future is dropped.
    pub grace: Duration,
    /// Principal recorded as the actor of API calls.
    pub principal: String,
    /// Worker identity recorded on `started`/`succeeded`/`failed` events.
    pub worker_id: String,
    /// How long a deleted workflow stays restorable (and rerunnable) before it is purged.
    pub deletion_ttl: Duration,
    /// Per root kind (`"task"`, `"chain"`, `"swarm"`): overrides `deletion_ttl`.
    pub deletion_ttl_by_kind: BTreeMap<String, Duration>,
    /// What the start-up recovery resumes of the unfinished work it finds in the log.
    pub auto_resume: AutoResume,
    /// When a workflow with canceled signatures finishes, or one is purged, redact their task
    /// data from the log ([`Workflow::redaction_targets`], `EventLog::redact`), leaving the
    /// audit record. Logs that cannot redact (in-memory) keep it. Default: on.
    ///
    /// [`Workflow::redaction_targets`]: mageflow_core::Workflow::redaction_targets
    pub redact_canceled: bool,
    /// Compact a finished workflow this long after it finished: its events move into the log's
    /// compressed archive with a snapshot of its final state (`EventLog::compact`; a log that
    /// cannot compact keeps them). Reads of its events are unchanged; a compacted workflow
    /// touched again (read, rerun, resumed) is loaded back from the archive. `None`: never
    /// (callers can still use [`Handle::compact`]). Default: 5 minutes.
    ///
    /// [`Handle::compact`]: crate::Handle::compact
    pub compact_after: Option<Duration>,
    /// Compact the old history of workflows that are still running (`None`: only finished
    /// workflows are compacted). Default: on (see [`HistoryCompaction`]).
    pub compact_history: Option<HistoryCompaction>,
    /// The highest log position the compaction of running workflows may move events from. Set
    /// it when something tails the live log with `EventLog::read_all` (which serves no archived
    /// event) and must see every event first — the hot-tier projector of a deployment. `None`:
    /// no such reader (the log's head).
    pub compaction_floor: Option<PositionFloor>,
    /// Most events creating one workflow may take in one step (its first append). A creation
    /// over it — a swarm of a million items all allowed to run at once queues every item in
    /// that step — is refused on its own (`InvalidTree`, nothing written) instead of failing
    /// the whole batch it would share with other calls at the log's limit. Default and upper
    /// bound: `mageflow_store::APPEND_EVENTS_MAX`.
    pub creation_events_max: usize,
    /// Where the engine reads the time it records (event timestamps, retry timers, deletion
    /// windows). Default: the system clock.
    pub clock: Clock,
}

/// When the compaction job moves the old history of a running workflow into the archive (no
/// snapshot: the workflow is not done). Reads, recovery and the hot tier see the same events
/// and state afterwards; what it saves is the live log's size (and PostgreSQL's index) for
/// workflows that run long or grow large, such as a swarm of a million tasks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistoryCompaction {
    /// A running workflow is compacted once this many of its events are live (not archived).
    pub live_events_over: u64,
    /// Its newest events that stay live (at least 1: recovery finds a running workflow by its
    /// live events).
    pub keep_live: u64,
    /// How often the job looks for such workflows.
    pub every: Duration,
    /// Events moved by one `EventLog::compact` call at most: a workflow far over the threshold
    /// (the first pass over a swarm of a million tasks) is compacted in several calls, so no
    /// call holds more than this many events in memory.
    pub chunk_events: u64,
}

impl Default for HistoryCompaction {
    fn default() -> Self {
        Self {
            live_events_over: 50_000,
            keep_live: 1_000,
            every: Duration::from_secs(30),
            chunk_events: 256 * 1024,
        }
    }
}

/// A log position read when it is needed ([`Config::compaction_floor`]).
#[derive(Clone)]
pub struct PositionFloor(pub Arc<dyn Fn() -> u64 + Send + Sync>);

impl std::fmt::Debug for PositionFloor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PositionFloor({})", (self.0)())
    }
}

/// What [`Engine::start`] does with the unfinished work it finds in the log (see
/// [`RecoveryReport`] for what it counts). Per signature:
///
/// - an attempt that was **running** when the previous process stopped (in flight in the log,
///   nobody left to report it) runs again: a new attempt is queued (a `retry_scheduled` event
///   with `lost: true`, not counted against the retry budget) and receives the last checkpoint;
///   with [`Dispatch::Remote`] it is left to the worker processes instead, as always;
/// - a **queued** task (triggered, waiting for a slot) is started; one waiting for its retry
///   backoff starts when the backoff ends (not staggered);
/// - a **suspended** or **interrupted** signature stays as it is;
/// - a **failed** one is left alone (only counted).
///
/// Work the settings below leave out is *held*: nothing of it starts — an in-flight attempt
/// stays recorded as running (in the log and in `Handle::workflow`), a queued task stays
/// queued — until a user calls [`Handle::resume`] (on any signature of the workflow that is not
/// finished; a no-op resume is fine) or [`Handle::run`] on it, which releases everything held in
/// that workflow. Everything else about a held workflow works as usual (suspend, interrupt,
/// cancel, delete, inspect, wait — which waits until it is released and finishes).
/// Deletion windows are rescheduled whatever these settings say.
///
/// [`Engine::start`]: crate::Engine::start
/// [`Handle::resume`]: crate::Handle::resume
/// [`Handle::run`]: crate::Handle::run
/// [`RecoveryReport`]: crate::RecoveryReport
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AutoResume {
    /// Global switch. Off: every recovered unfinished workflow is held whole: no attempt is
    /// requeued, no queued task is put on the ready queue, and nothing new starts in it (not
    /// even tasks triggered later by adding swarm items) until it is released. (With
    /// [`Dispatch::Remote`], attempts in flight belong to worker processes and go on.)
    pub enabled: bool,
    /// Only the in-flight and queued tasks whose task name is in this set are resumed; the
    /// others are held (alone: the rest of their workflow goes on). `None`: every task.
    pub tasks: Option<BTreeSet<String>>,
    /// Only workflows whose root is of one of these kinds (`"task"`, `"chain"`, `"swarm"`)
    /// are resumed; the others are held whole. `None`: every kind.
    pub kinds: Option<BTreeSet<String>>,
    /// Spread the resumed starts (requeued attempts and queued tasks, in workflow id then
    /// signature order): the k-th (from 0) does not start before `k × stagger` after the
    /// recovery (the `at` of its resume report event). Start-up does not wait for it: the
    /// starts are timers of the orchestrator. Zero: all at once (as worker slots allow).
    pub stagger: Duration,
}

impl Default for AutoResume {
    fn default() -> Self {
        Self {
            enabled: true,
            tasks: None,
            kinds: None,
            stagger: Duration::ZERO,
        }
    }
}

impl AutoResume {
    /// Whether a workflow whose root is of `kind` is resumed (else it is held whole).
    pub fn resumes_kind(&self, kind: &str) -> bool {
        self.enabled && self.kinds.as_ref().is_none_or(|k| k.contains(kind))
    }

    /// Whether an in-flight or queued task running `task` is resumed (its workflow's kind
    /// aside).
    pub fn resumes_task(&self, task: &str) -> bool {
        self.enabled && self.tasks.as_ref().is_none_or(|t| t.contains(task))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            workers: 64,
            dispatch: Dispatch::Local,
            grace: Duration::from_secs(5),
            principal: "local".into(),
            worker_id: format!("embedded-{}", std::process::id()),
            deletion_ttl: Duration::from_secs(24 * 3600),
            deletion_ttl_by_kind: BTreeMap::new(),
            auto_resume: AutoResume::default(),
            redact_canceled: true,
            compact_after: Some(COMPACT_AFTER_DEFAULT),
            compact_history: Some(HistoryCompaction::default()),
            compaction_floor: None,
            creation_events_max: mageflow_store::APPEND_EVENTS_MAX,
            clock: Clock::system(),
        }
    }
}

impl Config {
    /// The deletion window for a workflow whose root is of `kind`.
    pub fn deletion_ttl_for(&self, kind: &str) -> Duration {
        self.deletion_ttl_by_kind
            .get(kind)
            .copied()
            .unwrap_or(self.deletion_ttl)
    }
}
