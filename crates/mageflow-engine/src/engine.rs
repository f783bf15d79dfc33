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

use crate::clock::Clock;
use crate::compaction::CompactionStats;
use crate::context::{Backing, TaskContext};
use crate::det::{Map, Set};
use crate::error::{Error, Result};
use crate::log_slot::LogSlot;
use crate::registry::{Registry, TaskFailure};
use crate::sig::Sig;
use mageflow_core::{
    execute_owned, Actor, Command, Effect, Event, Message, NodeIndex, Op, Payload, Rejection,
    SignatureId, Status, TaskError, Timestamp, Workflow, WorkflowId,
};
use mageflow_store::{AppendRequest, BoxFuture, EventLog};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::any::Any;
use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Largest encoded input of one submitted workflow, in bytes.
pub const INPUT_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Most requests one orchestrator batch takes.
pub const BATCH_REQUESTS_MAX: usize = 8192;
/// Depth of the orchestrator's request queue.
pub const QUEUE_DEPTH_MAX: usize = 65_536;
/// How soon the cleanup job retries a purge that had to wait (an attempt still in flight).
const PURGE_RETRY_MS: u64 = 1_000;
/// Events read per chunk when recovering from the log.
const RECOVERY_CHUNK_EVENTS: usize = 16_384;
/// Most corrupt workflows a recovery report lists by id (all are counted).
pub const RECOVERY_CORRUPT_LISTED_MAX: usize = 100;
/// Attempts at appending the recovery's events when the system stream moved under us (another
/// engine on the same log wrote a report at the same time).
const RECOVERY_APPEND_TRIES: usize = 5;

/// Where handlers run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatch {
    /// In this process, `Config::workers` at a time.
    Local,
    /// In worker processes that take started attempts from the hot tier (Redis) and send their
    /// reports back through it ([`Handle::report`], [`Handle::report_stopped`]). At most
    /// `window` attempts are started and not yet reported at once: the flow control between the
    /// orchestrator and the workers (set it a little above the workers' total concurrency).
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
    pub redact_canceled: bool,
    /// Compact a finished workflow this long after it finished: its events move into the log's
    /// compressed archive with a snapshot of its final state (`EventLog::compact`; a log that
    /// cannot compact keeps them). Reads of its events are unchanged; a compacted workflow
    /// touched again (read, rerun, resumed) is loaded back from the archive. `None`: never
    /// (callers can still use [`Handle::compact`]). Default: 5 minutes.
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
            compact_after: Some(crate::compaction::COMPACT_AFTER_DEFAULT),
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

/// Live counters, readable at any time without asking the orchestrator.
#[derive(Default, Debug)]
pub struct Stats {
    /// Events made durable in the log.
    pub events_written: AtomicU64,
    /// Appends (batches with at least one event) made durable.
    pub appends: AtomicU64,
    /// Batches whose append failed (their effects were dropped and their workflows reloaded).
    pub append_failures: AtomicU64,
    /// Task attempts started (handed to a handler, or to the hot tier's workers).
    pub attempts_started: AtomicU64,
    /// Task attempts that succeeded (containers not counted).
    pub tasks_succeeded: AtomicU64,
    /// Tasks that failed for good (containers not counted).
    pub tasks_failed: AtomicU64,
    /// Retries scheduled, lost attempts requeued after a restart included.
    pub retries_scheduled: AtomicU64,
    /// Workflows finished (each counted once, when its finishing events are durable).
    pub workflows_finished: AtomicU64,
    /// Attempts holding a worker slot now.
    pub running: AtomicU64,
    /// Most attempts that held a worker slot at once.
    pub running_peak: AtomicU64,
    /// Workflows whose canceled or purged task data was redacted from the log.
    pub workflows_redacted: AtomicU64,
    /// What compaction did.
    pub compaction: CompactionStats,
}

/// What the engine found in the log when it started, and what it did about it (see
/// [`AutoResume`]). When it found unfinished work or skipped a corrupt workflow it is also
/// written to the log, as one `resume_report` event of the system stream
/// ([`WorkflowId::SYSTEM`]), in the same atomic append as the requeues it made; read them
/// back with [`Handle::resume_reports`]. Counts are of signatures unless said otherwise.
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
    pub auto_resume: bool,
    /// [`AutoResume::stagger`] in milliseconds.
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
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StoredResumeReport {
    /// Its sequence number in the system stream.
    pub seq: u64,
    /// When the recovery pass ran (the reference of [`AutoResume::stagger`]).
    pub at: Timestamp,
    /// The engine that wrote it (`system:recovery`).
    pub actor: Actor,
    /// What that pass found and did.
    pub report: RecoveryReport,
}

/// One refused command read back from the log ([`Handle::refused_commands`]).
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

/// Attempts at appending a record to the system stream when it moved under us (another writer,
/// a recovery pass, appended there at the same time).
const SYSTEM_APPEND_TRIES: usize = 5;

/// What [`Handle::submit_tree`] or [`Handle::create_tree`] created: the workflow, and the id
/// of each signature its builder labelled ([`crate::TaskSig::label`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The new workflow.
    pub workflow: WorkflowId,
    labels: BTreeMap<String, SignatureId>,
}

impl Submitted {
    /// Refuses a label used twice in one tree: it could name only one of them.
    fn new(workflow: WorkflowId, labels: crate::sig::Labels) -> Result<Self> {
        let mut map = BTreeMap::new();
        for (label, index) in labels {
            let sig = SignatureId { workflow, index };
            if map.insert(label.clone(), sig).is_some() {
                return Err(Error::Rejected(Rejection::InvalidTree(format!(
                    "label {label:?} is given to more than one signature of the tree"
                ))));
            }
        }
        Ok(Self {
            workflow,
            labels: map,
        })
    }

    /// The root signature (what the builder passed to `submit_tree` was).
    pub fn root(&self) -> SignatureId {
        SignatureId::root(self.workflow)
    }

    /// The id of the signature labelled `label`; `None` if no signature of the tree has it.
    pub fn sig(&self, label: &str) -> Option<SignatureId> {
        self.labels.get(label).copied()
    }

    /// Every label of the tree with its signature's id, in label order.
    pub fn labels(&self) -> impl Iterator<Item = (&str, SignatureId)> + '_ {
        self.labels.iter().map(|(l, s)| (l.as_str(), *s))
    }
}

/// What [`Handle::wait_for`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Until {
    /// The workflow is finished ([`Workflow::is_finished`]): what [`Handle::wait`] waits for.
    Finished,
    /// Finished, or nothing in it can move without a user ([`Workflow::is_settled`]): every
    /// signature left is suspended, interrupted, waiting under a paused one, or waiting for
    /// items or the close of an open swarm. Work the start-up recovery held whole
    /// ([`AutoResume`]) counts as settled too.
    Settled,
}

impl std::fmt::Display for Until {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Until::Finished => "finished",
            Until::Settled => "settled",
        })
    }
}

/// How much of a recovered workflow auto-resume holds back (see [`AutoResume`]).
enum Hold {
    Whole,
    Nodes(Set<NodeIndex>),
}

enum Action {
    Core(Op),
    AddItems {
        swarm: NodeIndex,
        items: Vec<Sig>,
        close: bool,
    },
}

enum Request {
    /// Actions on one or more workflows, all-or-nothing.
    Exec {
        actions: Vec<(WorkflowId, Action)>,
        actor: Actor,
        /// Treat "already exists" on create as success (idempotent creation).
        idempotent: bool,
        reply: Option<oneshot::Sender<Result<()>>>,
    },
    /// A handler finished (`None`: it was stopped and reports nothing), or an outside worker
    /// reported through [`Handle::report`].
    Done {
        sig: SignatureId,
        attempt: u32,
        result: Option<std::result::Result<Value, TaskFailure>>,
        /// Sent by this process's worker runtime when the handler of that attempt returned or
        /// was dropped: only such a report gives back the worker slot the attempt held.
        local: bool,
    },
    /// A worker process gave up an attempt ([`Handle::report_abandoned`]).
    Abandoned {
        sig: SignatureId,
        attempt: u32,
        reply: oneshot::Sender<Result<()>>,
    },
    Wait {
        wf: WorkflowId,
        until: Until,
        reply: oneshot::Sender<Result<Workflow>>,
    },
    /// Run a read-only function over a workflow's state; the answer is sent once everything
    /// decided before it is durable.
    Inspect {
        wf: WorkflowId,
        f: Inspector,
        reply: oneshot::Sender<Result<Box<dyn Any + Send>>>,
    },
    /// The unfinished workflows whose version is at least `min_version` (the compaction of
    /// running workflows' old history).
    Long {
        min_version: u64,
        reply: oneshot::Sender<Vec<WorkflowId>>,
    },
    Shutdown {
        reply: oneshot::Sender<()>,
    },
}

type Inspector = Box<dyn FnOnce(&Workflow) -> Box<dyn Any + Send> + Send>;

/// A caller of `wait`/`wait_for`: what it waits for, and where its answer goes.
type Waiter = (Until, oneshot::Sender<Result<Workflow>>);

/// Cheap, cloneable access to a running engine.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Request>,
    registry: Arc<Registry>,
    /// The log through [`LogSlot`] (the same allocation as `slot`): emptied by
    /// [`Engine::shutdown`], so a clone that outlives the engine does not keep the store open.
    log: Arc<dyn EventLog>,
    slot: Arc<LogSlot>,
    stats: Arc<Stats>,
    actor: Actor,
    config: Arc<Config>,
    /// Per running workflow, the seq up to which this process moved its history into the
    /// archive (the compaction of running workflows).
    archived_to: Arc<std::sync::Mutex<Map<WorkflowId, u64>>>,
}

/// A running engine: orchestrator plus in-process workers.
pub struct Engine {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
    recovery: RecoveryReport,
    /// The compaction job, if `Config::compact_after` or `Config::compact_history` is set.
    compactor: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Engine {
    /// Start on `log`: rebuild the unfinished workflows from it, requeue attempts that were
    /// running when the last process stopped, and begin running handlers.
    pub async fn start(
        log: Arc<dyn EventLog>,
        registry: Registry,
        config: Config,
    ) -> Result<Engine> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH_MAX);
        let stats = Arc::new(Stats::default());
        let (compact_tx, compact_rx) = mpsc::unbounded_channel();
        let slot = Arc::new(LogSlot::new(log.clone()));
        let handle = Handle {
            tx: tx.clone(),
            registry: Arc::new(registry),
            log: slot.clone(),
            slot,
            stats: stats.clone(),
            actor: Actor::api(config.principal.clone()),
            config: Arc::new(config.clone()),
            archived_to: Arc::default(),
        };
        let mut orch = Orchestrator {
            log,
            registry: handle.registry.clone(),
            handle: handle.clone(),
            stats,
            worker_actor: Actor::worker(config.worker_id.clone()),
            free_slots: match config.dispatch {
                Dispatch::Local => config.workers,
                Dispatch::Remote { window } => window,
            },
            config,
            hot: Map::default(),
            ready: VecDeque::new(),
            timers: BTreeSet::new(),
            purges: BTreeSet::new(),
            running: Map::default(),
            deferred: Set::default(),
            held: Map::default(),
            waiters: Map::default(),
            seq: 0,
            last_touch: Map::default(),
            shutdown_at: None,
            handlers: tokio_util::task::TaskTracker::new(),
            shutdown_replies: Vec::new(),
            tx,
            compact_tx: handle.config.compact_after.map(|_| compact_tx),
            background: Vec::new(),
        };
        let recovery = orch.recover().await?;
        let task = tokio::spawn(orch.run(rx));
        let compactor = (handle.config.compact_after.is_some()
            || handle.config.compact_history.is_some())
        .then(|| {
            let stop = CancellationToken::new();
            let job = crate::compaction::run(compact_rx, handle.clone(), stop.clone());
            (stop, tokio::spawn(job))
        });
        Ok(Engine {
            handle,
            task,
            recovery,
            compactor,
        })
    }

    /// A handle to this engine (cheap; clone it freely).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// What the start-up recovery found in the log and did about it.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Stop taking work, give running handlers the grace period to finish, stop the rest
    /// (their attempts are requeued by the next start), and stop the orchestrator. Returns once
    /// the stopped handlers' futures are dropped too (they get another grace period after their
    /// token fires), and the engine's hold on the log is let go, so the log — a sled
    /// directory's lock, say — is free for the next opener even while clones of its
    /// [`Handle`] live on: their calls fail with [`Error::ShutDown`] from then on.
    pub async fn shutdown(self) {
        if let Some((stop, job)) = self.compactor {
            // A compaction in progress finishes first (it is one atomic step).
            stop.cancel();
            let _ = job.await;
        }
        let (reply, rx) = oneshot::channel();
        if self
            .handle
            .tx
            .send(Request::Shutdown { reply })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let _ = self.task.await;
        // The orchestrator (the log's other holder) is gone with its task.
        self.handle.slot.close();
    }
}

impl Handle {
    /// Ask the orchestrator to stop as [`Engine::shutdown`] does — nothing new starts, running
    /// handlers get the grace period, later calls fail with [`Error::ShutDown`] — without
    /// waiting for it: for a task that must stop an engine it does not own (a deployment's
    /// orchestrator that another one superseded). `Engine::shutdown` still waits for the end.
    pub async fn request_shutdown(&self) {
        let (reply, _ignored) = oneshot::channel();
        let _ = self.tx.send(Request::Shutdown { reply }).await;
    }

    /// This handle acting for `principal`: the commands it sends are recorded with that actor
    /// (the audit trail says who did what, e.g. the user of a CLI command relayed by the
    /// orchestrator).
    pub fn as_principal(&self, principal: impl Into<String>) -> Handle {
        Handle {
            actor: Actor::api(principal),
            ..self.clone()
        }
    }

    /// The tasks this engine runs (and validates submits against).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The engine's live counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The event log, for reads (`read_stream`, `subscribe`, …): through the handle's slot, so
    /// after [`Engine::shutdown`] its calls fail with `mageflow_store::Error::Closed`. Appending
    /// to it directly bypasses the orchestrator (its next batch would conflict): don't.
    pub fn log(&self) -> &Arc<dyn EventLog> {
        &self.log
    }

    /// The settings the engine was started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    async fn call<T>(&self, req: Request, rx: oneshot::Receiver<Result<T>>) -> Result<T> {
        self.tx.send(req).await.map_err(|_| Error::ShutDown)?;
        rx.await.map_err(|_| Error::ShutDown)?
    }

    async fn exec(&self, actions: Vec<(WorkflowId, Action)>, idempotent: bool) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let req = Request::Exec {
            actions,
            actor: self.actor.clone(),
            idempotent,
            reply: Some(reply),
        };
        self.call(req, rx).await
    }

    async fn op(&self, sig: SignatureId, op: Op) -> Result<()> {
        self.exec(vec![(sig.workflow, Action::Core(op))], false)
            .await
    }

    /// Validate `sig` (and `input`, when it runs now) and turn it into the actions that create
    /// workflow `id`: one creation event, then, for swarms too large for one event, their
    /// remaining items in chunks — all in one atomic append.
    fn creation(
        &self,
        id: WorkflowId,
        sig: &Sig,
        input: Option<Value>,
    ) -> Result<Vec<(WorkflowId, Action)>> {
        self.creation_labelled(id, sig, input)
            .map(|(actions, _)| actions)
    }

    /// [`Handle::creation`], also giving the id of every labelled signature of the tree.
    fn creation_labelled(
        &self,
        id: WorkflowId,
        sig: &Sig,
        input: Option<Value>,
    ) -> Result<(Vec<(WorkflowId, Action)>, Submitted)> {
        sig.validate(&self.registry)?;
        if let Some(input) = &input {
            check_input(input)?;
            check_entry(&self.registry, &sig, input, &[])?;
        }
        let mut nodes = Vec::new();
        let mut deferred = Vec::new();
        let mut labels = Vec::new();
        sig.flatten(
            &self.registry,
            0,
            None,
            &mut nodes,
            &mut deferred,
            &mut labels,
        )?;
        check_node_count(nodes.len())?;
        // Deferred items are numbered as the orchestrator will number them: each chunk after
        // the nodes before it, in order, within the same atomic step (nothing can interleave).
        let mut next = nodes.len();
        for d in &deferred {
            for chunk in d.items.chunks(crate::sig::SWARM_ITEMS_PER_EVENT) {
                let parent = Some(mageflow_core::Link {
                    node: d.swarm,
                    role: mageflow_core::Role::Child,
                });
                let (mut specs, mut nested) = (Vec::new(), Vec::new());
                for item in chunk {
                    item.flatten(
                        &self.registry,
                        next,
                        parent,
                        &mut specs,
                        &mut nested,
                        &mut labels,
                    )?;
                }
                next += specs.len();
            }
        }
        let submitted = Submitted::new(id, labels)?;
        let mut start = input.map(Message::input);
        // With items still to add, the workflow runs once it is whole.
        let run_after = if deferred.is_empty() {
            None
        } else {
            start.take()
        };
        let mut actions = vec![(id, Action::Core(Op::Create { nodes, start }))];
        for d in deferred {
            let chunks = d.items.len().div_ceil(crate::sig::SWARM_ITEMS_PER_EVENT);
            for (i, chunk) in d
                .items
                .chunks(crate::sig::SWARM_ITEMS_PER_EVENT)
                .enumerate()
            {
                let action = Action::AddItems {
                    swarm: d.swarm,
                    items: chunk.to_vec(),
                    close: d.close && i + 1 == chunks,
                };
                actions.push((id, action));
            }
        }
        if let Some(message) = run_after {
            actions.push((id, Action::Core(Op::Run { message })));
        }
        Ok((actions, submitted))
    }

    /// Create a workflow from `sig` and run it with `input`. Returns its id once the creation
    /// is durable. Unknown tasks and input or kwargs that do not fit are refused here, and
    /// nothing is written.
    pub async fn submit(&self, sig: impl Into<Sig>, input: impl Serialize) -> Result<WorkflowId> {
        let id = WorkflowId(uuid::Uuid::now_v7());
        self.submit_with_id(id, sig.into(), input, false).await
    }

    pub(crate) async fn submit_with_id(
        &self,
        id: WorkflowId,
        sig: Sig,
        input: impl Serialize,
        idempotent: bool,
    ) -> Result<WorkflowId> {
        let input = to_input(input)?;
        let actions = self.creation(id, &sig, Some(input))?;
        self.exec(actions, idempotent).await?;
        Ok(id)
    }

    /// Create workflow `id` and run it, idempotently: if `id` exists, nothing is written and
    /// this succeeds. What [`crate::TaskContext::submit`] does; for the submits handlers in
    /// worker processes send through the hot tier. Validated and durable like [`Handle::submit`].
    pub async fn submit_idempotent(&self, id: WorkflowId, sig: Sig, input: Value) -> Result<()> {
        self.submit_with_id(id, sig, input, true).await.map(drop)
    }

    /// Submit many workflows in one atomic append (all are created, or none).
    pub async fn submit_many(
        &self,
        items: impl IntoIterator<Item = (Sig, Value)>,
    ) -> Result<Vec<WorkflowId>> {
        let mut actions = Vec::new();
        let mut ids = Vec::new();
        for (sig, input) in items {
            let id = WorkflowId(uuid::Uuid::now_v7());
            ids.push(id);
            actions.extend(self.creation(id, &sig, Some(input))?);
        }
        self.exec(actions, false).await?;
        Ok(ids)
    }

    /// [`Handle::submit`] that also hands back the id of every signature of the tree given a
    /// label ([`crate::TaskSig::label`], on chains and swarms too): steps, items and callbacks
    /// can then be suspended, resumed, canceled or updated without searching the tree.
    ///
    /// ```no_run
    /// # async fn t(h: mageflow_engine::Handle) -> mageflow_engine::Result<()> {
    /// use mageflow_engine::{chain, sign};
    /// let flow = chain([sign("fetch").label("fetch"), sign("store").label("store")])
    ///     .on_error(sign("alert").label("alert"));
    /// let submitted = h.submit_tree(flow, serde_json::json!({})).await?;
    /// if let Some(store) = submitted.sig("store") {
    ///     h.suspend(store).await?;
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn submit_tree(
        &self,
        sig: impl Into<Sig>,
        input: impl Serialize,
    ) -> Result<Submitted> {
        let id = WorkflowId(uuid::Uuid::now_v7());
        let input = to_input(input)?;
        let (actions, submitted) = self.creation_labelled(id, &sig.into(), Some(input))?;
        self.exec(actions, false).await?;
        Ok(submitted)
    }

    /// [`Handle::create`] that also hands back the ids of the tree's labelled signatures (see
    /// [`Handle::submit_tree`]), e.g. to update their kwargs before the run.
    pub async fn create_tree(&self, sig: impl Into<Sig>) -> Result<Submitted> {
        let id = WorkflowId(uuid::Uuid::now_v7());
        let (actions, submitted) = self.creation_labelled(id, &sig.into(), None)?;
        self.exec(actions, false).await?;
        Ok(submitted)
    }

    /// Create a workflow without running it (see [`Handle::run`]); kwargs stay updatable.
    pub async fn create(&self, sig: impl Into<Sig>) -> Result<WorkflowId> {
        let id = WorkflowId(uuid::Uuid::now_v7());
        let actions = self.creation(id, &sig.into(), None)?;
        self.exec(actions, false).await?;
        Ok(id)
    }

    /// Run a workflow created with [`Handle::create`]. The input is checked against the tasks
    /// it reaches first (the root task, a chain's first step, a swarm's items), with the kwargs
    /// they have now; nothing is written if it does not fit.
    pub async fn run(&self, wf: WorkflowId, input: impl Serialize) -> Result<()> {
        let input = to_input(input)?;
        check_input(&input)?;
        let state = self.workflow(wf).await?;
        if let Some(node) = state.root() {
            let root = StoredNode { wf: &state, node };
            check_entry(&self.registry, &root, &input, &[])?;
        }
        let op = Op::Run {
            message: Message::input(input),
        };
        self.op(SignatureId::root(wf), op).await
    }

    /// Update the kwargs of several signatures atomically (all or none), before they run.
    pub async fn update_kwargs(&self, updates: Vec<(SignatureId, Value)>) -> Result<()> {
        let mut actions = Vec::with_capacity(updates.len());
        for (sig, kwargs) in updates {
            let state = self.workflow(sig.workflow).await?;
            let node = state.node(sig.index).ok_or(Error::NoSuchSignature(sig))?;
            if let Some(task) = node.spec.task_name() {
                self.registry.get(task)?.validate_kwargs(&kwargs)?;
            }
            let op = Op::UpdateKwargs {
                node: sig.index,
                kwargs,
            };
            actions.push((sig.workflow, Action::Core(op)));
        }
        self.exec(actions, false).await
    }

    /// Add items to an open swarm (atomically), optionally closing it in the same step.
    pub async fn add_to_swarm(
        &self,
        swarm: SignatureId,
        items: impl IntoIterator<Item = impl Into<Sig>>,
        close: bool,
    ) -> Result<()> {
        let items: Vec<Sig> = items.into_iter().map(Into::into).collect();
        let state = self.workflow(swarm.workflow).await?;
        let message = state
            .node(swarm.index)
            .ok_or(Error::NoSuchSignature(swarm))?
            .message
            .clone();
        for item in &items {
            item.validate(&self.registry)?;
            if let Some(m) = message.as_ref().filter(|m| !m.as_result) {
                check_entry(&self.registry, &item, &m.value, &[])?;
            }
        }
        let action = Action::AddItems {
            swarm: swarm.index,
            items,
            close,
        };
        self.exec(vec![(swarm.workflow, action)], false).await
    }

    /// Close an open swarm: no items can be added any more, and it finishes once every item
    /// has. Closing a closed swarm is a no-op.
    pub async fn close_swarm(&self, swarm: SignatureId) -> Result<()> {
        self.op(swarm, Op::CloseSwarm { swarm: swarm.index }).await
    }

    /// Soft pause: nothing new starts under `sig`; running attempts finish.
    pub async fn suspend(&self, sig: SignatureId) -> Result<()> {
        self.op(sig, Op::Suspend { node: sig.index }).await
    }

    /// Continue a suspended or interrupted signature from where it stopped. On a workflow
    /// whose work the start-up recovery held ([`AutoResume`]), it also releases all of that
    /// work (even when `sig` itself was not paused).
    pub async fn resume(&self, sig: SignatureId) -> Result<()> {
        self.op(sig, Op::Resume { node: sig.index }).await
    }

    /// Aggressive stop: running handlers under `sig` get their cancellation token fired and are
    /// dropped after the grace period. Resume is best-effort: interrupted tasks run again from
    /// their last checkpoint.
    pub async fn interrupt(&self, sig: SignatureId) -> Result<()> {
        self.op(sig, Op::Interrupt { node: sig.index }).await
    }

    /// Soft-delete a workflow: it is marked for deletion until the configured TTL for its root's
    /// kind runs out, then purged by the cleanup job. A running part keeps running to completion
    /// (and its callbacks fire). Until then it can be restored or rerun.
    pub async fn delete(&self, wf: WorkflowId) -> Result<mageflow_core::Timestamp> {
        let kind = self.inspect(wf, |w| w.nodes[0].spec.kind.name()).await?;
        let ttl = self.config.deletion_ttl_for(kind);
        let expires_at = self
            .config
            .clock
            .now()
            .saturating_add_millis(ttl.as_millis() as u64);
        self.op(SignatureId::root(wf), Op::Delete { expires_at })
            .await?;
        Ok(expires_at)
    }

    /// Lift a deletion mark before it expires.
    pub async fn restore(&self, wf: WorkflowId) -> Result<()> {
        self.op(SignatureId::root(wf), Op::Restore).await
    }

    /// Run a finished (done or failed) workflow again from its original input — also within its
    /// deletion window, which it lifts. Exactly one of a rerun and the purge racing it wins.
    pub async fn rerun(&self, wf: WorkflowId) -> Result<()> {
        self.op(SignatureId::root(wf), Op::Rerun).await
    }

    /// Stop `sig` and everything under it for good (running handlers get their token fired;
    /// their task data is redacted once the workflow finishes, [`Config::redact_canceled`]).
    /// Refused with `confirmation_required` unless `confirmed`; a canceled signature can be
    /// neither resumed nor rerun.
    pub async fn cancel(&self, sig: SignatureId, confirmed: bool) -> Result<()> {
        let op = Op::Cancel {
            node: sig.index,
            confirmed,
        };
        self.op(sig, op).await
    }

    /// Record a checkpoint of `attempt` (what [`TaskContext::save_checkpoint`] does; for worker
    /// processes reporting through the hot tier). Stale attempts are refused.
    pub async fn checkpoint(&self, sig: SignatureId, attempt: u32, data: Value) -> Result<()> {
        crate::sig::check_depth("checkpoint", &data)?;
        let op = Op::Checkpoint {
            node: sig.index,
            attempt,
            data,
        };
        self.op(sig, op).await
    }

    /// Report the outcome of attempt `attempt` of a task, as a worker does. Reports are
    /// idempotent: a duplicate or stale one (redelivery, an attempt already revoked) is a no-op,
    /// so a task's success is recorded once and its callbacks fire once.
    pub async fn report(
        &self,
        sig: SignatureId,
        attempt: u32,
        result: std::result::Result<Value, TaskFailure>,
    ) -> Result<()> {
        let req = Request::Done {
            sig,
            attempt,
            result: Some(result),
            local: false,
        };
        self.tx.send(req).await.map_err(|_| Error::ShutDown)
    }

    /// A worker process stopped the handler of `attempt` after it was revoked (interrupt,
    /// cancel): nothing is recorded; with [`Dispatch::Remote`] its dispatch slot is given back.
    pub async fn report_stopped(&self, sig: SignatureId, attempt: u32) -> Result<()> {
        let req = Request::Done {
            sig,
            attempt,
            result: None,
            local: false,
        };
        self.tx.send(req).await.map_err(|_| Error::ShutDown)
    }

    /// A worker process gave up attempt `attempt` for a reason of the system's (its lease was
    /// lost, the hot tier could not take its checkpoint): the attempt is requeued as a new one
    /// that receives the last checkpoint, spending no retry — as recovery does for attempts
    /// in flight at a restart. A no-op if the attempt already ended; with
    /// [`Dispatch::Remote`] its dispatch slot is given back.
    pub async fn report_abandoned(&self, sig: SignatureId, attempt: u32) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let req = Request::Abandoned {
            sig,
            attempt,
            reply,
        };
        self.call(req, rx).await
    }

    /// Compact a finished workflow now (what the compaction job does `Config::compact_after`
    /// after it finished): its events move into the log's archive with a snapshot of its final
    /// state. `None` if it is not finished (running again after a rerun, say) or the log cannot
    /// compact.
    pub async fn compact(&self, wf: WorkflowId) -> Result<Option<mageflow_store::CompactStats>> {
        crate::compaction::compact(self, wf).await
    }

    /// Compact the old history of running workflows now, as `settings` say (what the job does
    /// every `Config::compact_history.every`): each running workflow with more than
    /// `live_events_over` live events has all but its newest `keep_live` moved into the archive,
    /// once `Config::compaction_floor` has passed them.
    pub async fn compact_history(
        &self,
        settings: &HistoryCompaction,
    ) -> Result<crate::compaction::HistoryPass> {
        crate::compaction::compact_history(self, settings).await
    }

    /// The unfinished workflows whose version is at least `min_version`.
    pub(crate) async fn long_running(&self, min_version: u64) -> Result<Vec<WorkflowId>> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Long { min_version, reply })
            .await
            .map_err(|_| Error::ShutDown)?;
        rx.await.map_err(|_| Error::ShutDown)
    }

    pub(crate) fn archived_to(&self) -> &std::sync::Mutex<Map<WorkflowId, u64>> {
        &self.archived_to
    }

    /// Current state of a workflow (durable state: nothing not yet committed).
    pub async fn workflow(&self, wf: WorkflowId) -> Result<Workflow> {
        self.inspect(wf, Workflow::clone).await
    }

    /// Compute something from a workflow's current (durable) state without copying it — e.g.
    /// counts for a progress bar over a swarm of a million tasks. `f` runs on the
    /// orchestrator: keep it short.
    pub async fn inspect<T: Send + 'static>(
        &self,
        wf: WorkflowId,
        f: impl FnOnce(&Workflow) -> T + Send + 'static,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        let f: Inspector = Box::new(move |w| Box::new(f(w)));
        let any = self.call(Request::Inspect { wf, f, reply }, rx).await?;
        any.downcast::<T>().map(|b| *b).map_err(|_| {
            Error::Rejected(Rejection::Internal(
                "inspect answer of the wrong type".into(),
            ))
        })
    }

    /// Wait until a workflow is finished (its root and every fired callback are terminal, and
    /// nothing is in flight) and return its final state. It waits for as long as that takes —
    /// also on a workflow that is suspended or interrupted and so waits for a user; give a
    /// deadline with [`Handle::wait_timeout`], or return on those too with [`Handle::wait_for`].
    pub async fn wait(&self, wf: WorkflowId) -> Result<Workflow> {
        let (reply, rx) = oneshot::channel();
        let until = Until::Finished;
        self.call(Request::Wait { wf, until, reply }, rx).await
    }

    /// [`Handle::wait`] with a deadline: the finished state, or [`Error::WaitTimeout`] once
    /// `timeout` has passed (the workflow is not touched by the timeout; wait again to go on).
    pub async fn wait_timeout(&self, wf: WorkflowId, timeout: Duration) -> Result<Workflow> {
        self.wait_for(wf, Until::Finished, timeout).await
    }

    /// Wait until a workflow reaches `until` — [`Until::Finished`], or [`Until::Settled`]
    /// (finished, or nothing can move without a user: suspended, interrupted, waiting under a
    /// paused signature or for items of an open swarm) — and return its durable state then;
    /// [`Error::WaitTimeout`] once `timeout` has passed first.
    pub async fn wait_for(
        &self,
        wf: WorkflowId,
        until: Until,
        timeout: Duration,
    ) -> Result<Workflow> {
        let (reply, rx) = oneshot::channel();
        let waited = self.call(Request::Wait { wf, until, reply }, rx);
        match tokio::time::timeout(timeout, waited).await {
            Ok(res) => res,
            Err(_) => Err(Error::WaitTimeout {
                workflow: wf,
                until,
                waited_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
            }),
        }
    }

    /// Every event of a workflow, in order, from the log. The system stream
    /// ([`WorkflowId::SYSTEM`]) is no workflow: its history is empty (see
    /// [`Handle::resume_reports`]).
    pub fn history(&self, wf: WorkflowId) -> Result<Vec<Event>> {
        if self.slot.is_closed() {
            return Err(Error::ShutDown);
        }
        if wf.is_system() {
            return Ok(Vec::new());
        }
        self.read(self.log.read_stream(wf, 1))
    }

    /// A read through the log slot: `Closed` because the engine shut down is
    /// [`Error::ShutDown`] (a log closed under a running engine stays a store error).
    fn read<T>(&self, r: mageflow_store::Result<T>) -> Result<T> {
        r.map_err(|e| match e {
            mageflow_store::Error::Closed if self.slot.is_closed() => Error::ShutDown,
            e => Error::Store(e),
        })
    }

    /// Record `command`, refused without being carried out (an operator's command that came
    /// past its deadline, say), as a `command_refused` event of the log's system stream: the
    /// audit trail keeps what was asked and why it was not done. Durable when this returns.
    pub async fn record_refused_command(&self, command: Value) -> Result<()> {
        crate::sig::check_depth("refused command", &command)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let version = self.read(self.log.stream_version(WorkflowId::SYSTEM))?;
            let event = Event {
                stream: WorkflowId::SYSTEM,
                seq: version + 1,
                at: self.config.clock.now(),
                actor: Actor::system("intake"),
                schema: mageflow_core::SCHEMA_VERSION,
                payload: Payload::CommandRefused {
                    command: command.clone(),
                },
            };
            let request = AppendRequest {
                stream: WorkflowId::SYSTEM,
                expected_version: version,
                events: vec![event],
            };
            match self.log.append(vec![request]).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_conflict() && tries < SYSTEM_APPEND_TRIES => {}
                Err(e) => return self.read(Err(e)),
            }
        }
    }

    /// Every refused command recorded in the log ([`Handle::record_refused_command`]), oldest
    /// first.
    pub fn refused_commands(&self) -> Result<Vec<StoredRefusal>> {
        let events = self.read(self.log.read_stream(WorkflowId::SYSTEM, 1))?;
        Ok(events
            .into_iter()
            .filter_map(|e| match e.payload {
                Payload::CommandRefused { command } => Some(StoredRefusal {
                    seq: e.seq,
                    at: e.at,
                    actor: e.actor,
                    command,
                }),
                _ => None,
            })
            .collect())
    }

    /// The reports of every recovery pass that found unfinished work or skipped a corrupt
    /// workflow, oldest first, as written to the log's system stream.
    pub fn resume_reports(&self) -> Result<Vec<StoredResumeReport>> {
        let events = self.read(self.log.read_stream(WorkflowId::SYSTEM, 1))?;
        let mut out = Vec::new();
        for e in events {
            let Payload::ResumeReport { report } = e.payload else {
                continue;
            };
            let report = serde_json::from_value(report).map_err(|err| {
                Error::Rejected(Rejection::Internal(format!(
                    "resume report {} of the system stream does not read: {err}",
                    e.seq
                )))
            })?;
            out.push(StoredResumeReport {
                seq: e.seq,
                at: e.at,
                actor: e.actor,
                report,
            });
        }
        Ok(out)
    }
}

/// Refuse an input nested too deep or too large to store.
fn check_input(input: &Value) -> Result<()> {
    crate::sig::check_depth("input", input)?;
    let bytes = serde_json::to_vec(input).map_or(0, |v| v.len());
    if bytes > INPUT_BYTES_MAX {
        return Err(Error::TooLarge {
            what: "input",
            bytes,
            max: INPUT_BYTES_MAX,
        });
    }
    Ok(())
}

pub(crate) fn to_input(input: impl Serialize) -> Result<Value> {
    serde_json::to_value(input).map_err(|e| Error::InvalidInput {
        task: "(submit)".into(),
        reason: e.to_string(),
    })
}

/// A signature tree as entry validation sees it: a [`Sig`] about to be submitted, or a node of a
/// stored workflow about to be run.
trait EntryNode: Sized {
    /// Task name of a task (`None` for a container).
    fn task(&self) -> Option<&str>;
    /// Bound kwargs (a JSON object).
    fn kwargs(&self) -> Cow<'_, Value>;
    fn is_chain(&self) -> bool;
    /// Steps of a chain, items of a swarm.
    fn members(&self) -> Vec<Self>;
}

impl<'a> EntryNode for &'a Sig {
    fn task(&self) -> Option<&str> {
        self.task_name()
    }
    fn kwargs(&self) -> Cow<'_, Value> {
        Cow::Owned(self.kwargs_value())
    }
    fn is_chain(&self) -> bool {
        matches!(self, Sig::Chain(_))
    }
    fn members(&self) -> Vec<Self> {
        let sig: &'a Sig = self;
        sig.members().iter().collect()
    }
}

/// A node of a stored workflow.
struct StoredNode<'a> {
    wf: &'a Workflow,
    node: &'a mageflow_core::Node,
}

impl EntryNode for StoredNode<'_> {
    fn task(&self) -> Option<&str> {
        self.node.spec.task_name()
    }
    fn kwargs(&self) -> Cow<'_, Value> {
        Cow::Borrowed(&self.node.spec.kwargs)
    }
    fn is_chain(&self) -> bool {
        matches!(self.node.spec.kind, mageflow_core::KindSpec::Chain { .. })
    }
    fn members(&self) -> Vec<Self> {
        let wf = self.wf;
        let children = self.node.spec.children().iter();
        children
            .filter_map(|&i| wf.node(i))
            .map(|node| StoredNode { wf, node })
            .collect()
    }
}

/// Validate the input the first task(s) reached by `message` will get: the first step of a
/// chain (recursively), every item of a swarm; the message deep-merged with the task's kwargs,
/// then those of each enclosing container (`outer`, innermost first), as at dispatch.
fn check_entry<N: EntryNode>(
    registry: &Registry,
    sig: &N,
    message: &Value,
    outer: &[&Value],
) -> Result<()> {
    let own = sig.kwargs();
    if let Some(task) = sig.task() {
        let mut input = if message.is_null() {
            Value::Object(Default::default())
        } else {
            message.clone()
        };
        for kwargs in std::iter::once(own.as_ref()).chain(outer.iter().copied()) {
            input = mageflow_core::model::deep_merge(input, kwargs);
        }
        return registry.get(task)?.validate_input(&input);
    }
    let mut inner: Vec<&Value> = vec![own.as_ref()];
    inner.extend_from_slice(outer);
    let members = sig.members();
    if sig.is_chain() {
        match members.first() {
            Some(first) => check_entry(registry, first, message, &inner),
            None => Ok(()),
        }
    } else {
        members
            .iter()
            .try_for_each(|m| check_entry(registry, m, message, &inner))
    }
}

struct Running {
    attempt: u32,
    token: CancellationToken,
}

struct Launch {
    sig: SignatureId,
    attempt: u32,
    task: String,
    input: Value,
    checkpoint: Option<Value>,
}

enum Reply {
    Unit(oneshot::Sender<Result<()>>, Result<()>),
    State(oneshot::Sender<Result<Workflow>>, Result<Workflow>),
    Any(
        oneshot::Sender<Result<Box<dyn Any + Send>>>,
        Result<Box<dyn Any + Send>>,
    ),
}

/// Everything one batch produced: events to append, and effects to carry out once durable.
#[derive(Default)]
struct Step {
    /// Sequence number of the step (see [`Orchestrator::last_touch`]).
    seq: u64,
    appends: Vec<AppendRequest>,
    index: Map<WorkflowId, usize>,
    replies: Vec<Reply>,
    launches: Vec<Launch>,
    stops: Vec<SignatureId>,
    /// Workflows this step read, changed or registered a waiter on (may repeat).
    touched: Vec<WorkflowId>,
    /// Workflows this step's events finish (counted once those events are durable).
    finished: Vec<WorkflowId>,
    /// Workflows this step purges (told to the compaction job too, once durable).
    purged: Vec<WorkflowId>,
    /// Events in `appends` (counted before they are handed to the log).
    events: usize,
}

impl Step {
    fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.replies.is_empty()
            && self.launches.is_empty()
            && self.stops.is_empty()
            && self.touched.is_empty()
            && self.events == 0
    }

    fn add_events(&mut self, wf: WorkflowId, expected: u64, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        match self.index.get(&wf) {
            Some(&i) => self.appends[i].events.extend(events),
            None => {
                self.index.insert(wf, self.appends.len());
                self.appends.push(AppendRequest {
                    stream: wf,
                    expected_version: expected,
                    events,
                });
                self.touched.push(wf);
            }
        }
    }
}

type InFlight = (
    Option<BoxFuture<'static, mageflow_store::Result<Vec<u64>>>>,
    Step,
);

struct Orchestrator {
    log: Arc<dyn EventLog>,
    registry: Arc<Registry>,
    handle: Handle,
    stats: Arc<Stats>,
    config: Config,
    worker_actor: Actor,
    /// Unfinished workflows (and finished ones until their waiters are answered).
    hot: Map<WorkflowId, Workflow>,
    ready: VecDeque<SignatureId>,
    timers: BTreeSet<(Timestamp, SignatureId)>,
    /// Deletion windows: when each marked workflow is due for purging (the cleanup job).
    purges: BTreeSet<(Timestamp, WorkflowId)>,
    /// Attempts holding a worker slot: started, and their handler has not reported yet (it may
    /// linger after its attempt was revoked, until the end of the grace period).
    running: Map<SignatureId, Running>,
    /// Queued signatures whose previous attempt still holds a slot: put back on the ready queue
    /// when that attempt's handler reports, so one signature never holds two slots.
    deferred: Set<SignatureId>,
    /// Recovered work auto-resume leaves alone until a resume or run of its workflow
    /// ([`AutoResume`]): `start_ready` drops held signatures instead of starting them.
    held: Map<WorkflowId, Hold>,
    /// Callers of `wait`/`wait_for`, per workflow, with what they wait for. A caller that gave
    /// up (its timeout passed) leaves a closed sender, dropped at the next wait or answer.
    waiters: Map<WorkflowId, Vec<Waiter>>,
    /// Sequence number of the last step decided.
    seq: u64,
    /// For each workflow in the hot state, the last step that touched it (events, a read, a
    /// wait, a report). Only that step's `finish` may settle it: by then every event decided
    /// for it is durable, and no later step has changed its hot state.
    last_touch: Map<WorkflowId, u64>,
    free_slots: usize,
    /// Set by shutdown: no new starts; stop once nothing runs or at this instant.
    shutdown_at: Option<tokio::time::Instant>,
    shutdown_replies: Vec<oneshot::Sender<()>>,
    /// The tasks running handlers in this process.
    handlers: tokio_util::task::TaskTracker,
    tx: mpsc::Sender<Request>,
    /// Told of every finished or purged workflow, for the compaction job.
    compact_tx: Option<mpsc::UnboundedSender<WorkflowId>>,
    /// Redactions running on blocking threads; shutdown waits for them (they hold the log).
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl Orchestrator {
    /// Rebuild unfinished workflows from the whole log and resume them as
    /// [`Config::auto_resume`] says; skip (and report) workflows whose events do not fold; write
    /// the report to the system stream when there was anything to report.
    async fn recover(&mut self) -> Result<RecoveryReport> {
        let settings = self.config.auto_resume.clone();
        let mut report = RecoveryReport {
            auto_resume: settings.enabled,
            stagger_ms: settings.stagger.as_millis() as u64,
            ..RecoveryReport::default()
        };
        let mut states: Map<WorkflowId, Workflow> = Map::default();
        let mut corrupt: BTreeMap<WorkflowId, String> = BTreeMap::new();
        let mut from = 1;
        loop {
            let chunk = self.log.read_all(from, RECOVERY_CHUNK_EVENTS)?;
            let Some(last) = chunk.last() else { break };
            from = last.position + 1;
            report.log_position = last.position;
            report.events_read += chunk.len() as u64;
            for rec in chunk {
                let stream = rec.event.stream;
                if stream.is_system() || corrupt.contains_key(&stream) {
                    continue;
                }
                let (seq, kind) = (rec.event.seq, rec.event.payload.kind());
                let wf = match states.entry(stream) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    // The first live event of a stream whose earlier events were compacted into
                    // the archive (a compacted workflow touched again): read its history through
                    // `read_stream`, which merges the archive, up to just before this event.
                    std::collections::hash_map::Entry::Vacant(v) if seq > 1 => {
                        let mut wf = Workflow::empty(stream);
                        let earlier = self.log.read_stream(stream, 1)?;
                        let mut earlier = earlier.into_iter().take_while(|e| e.seq < seq);
                        let folded = earlier.try_for_each(|e| wf.apply_owned(e));
                        if let Err(e) = folded {
                            let reason = format!("its archived history does not fold: {e}");
                            tracing::error!(workflow = %stream, %reason, "recovery: skipping a workflow whose history is corrupt");
                            corrupt.insert(stream, reason);
                            continue;
                        }
                        v.insert(wf)
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(Workflow::empty(stream))
                    }
                };
                if let Err(e) = wf.apply_owned(rec.event) {
                    let reason = format!(
                        "event {kind} at position {} (seq {seq}) does not fold: {e}",
                        rec.position
                    );
                    tracing::error!(workflow = %stream, %reason, "recovery: skipping a workflow whose history is corrupt");
                    states.remove(&stream);
                    corrupt.insert(stream, reason);
                }
            }
        }
        report.skipped_corrupt = corrupt.len() as u64;
        report.corrupt = corrupt
            .into_iter()
            .take(RECOVERY_CORRUPT_LISTED_MAX)
            .map(|(workflow, reason)| SkippedWorkflow { workflow, reason })
            .collect();

        // The reference time of the stagger, and of the report event.
        let t0 = self.config.clock.now();
        let mut appends: Vec<AppendRequest> = Vec::new();
        let actor = Actor::system("recovery");
        // Resumed starts, in order (the stagger spreads them).
        let mut resumed: Vec<SignatureId> = Vec::new();
        let mut ids: Vec<WorkflowId> = states.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(mut wf) = states.remove(&id) else {
                continue;
            };
            if let Some(expires_at) = wf.root().and_then(|r| r.deletion).filter(|_| !wf.purged) {
                self.purges.insert((expires_at, id));
                report.deletions_pending += 1;
            }
            if wf.is_finished() {
                continue;
            }
            report.workflows_unfinished += 1;
            let whole = !wf
                .root()
                .is_some_and(|r| settings.resumes_kind(r.spec.kind.name()));
            let mut held_nodes = Set::default();
            let mut ops = Vec::new();
            for (i, n) in wf.nodes.iter().enumerate() {
                let index = i as NodeIndex;
                let sig = wf.sig(index);
                let resumable = n.in_flight || n.status == Status::Queued;
                if n.in_flight && self.remote() {
                    // Its job is still in the hot tier (or comes back with a rebuild of it): a
                    // worker finishes it, or takes it over once its lease expires.
                    self.running.insert(
                        sig,
                        Running {
                            attempt: n.attempt,
                            token: CancellationToken::new(),
                        },
                    );
                    self.free_slots = self.free_slots.saturating_sub(1);
                    self.count_running();
                    report.attempts_resumed += 1;
                } else if resumable
                    && (whole || !settings.resumes_task(n.spec.task_name().unwrap_or_default()))
                {
                    held_nodes.insert(index);
                    report.skipped_by_filter += 1;
                } else if n.in_flight {
                    ops.push((index, n.attempt));
                } else if n.status == Status::Queued {
                    match n.not_before {
                        Some(t) => {
                            self.timers.insert((t, sig));
                            report.retries_waiting += 1;
                        }
                        None => {
                            resumed.push(sig);
                            report.tasks_queued += 1;
                        }
                    }
                } else if matches!(n.status, Status::Suspended | Status::Interrupted) {
                    report.paused += 1;
                } else if n.status == Status::Failed && !n.is_container() {
                    report.failed += 1;
                }
            }
            let expected = wf.version;
            let mut events = Vec::new();
            for (node, attempt) in ops {
                let cmd = Command {
                    actor: actor.clone(),
                    at: t0,
                    op: Op::Requeue { node, attempt },
                };
                match execute_owned(&mut wf, cmd) {
                    Ok(new) => {
                        // A requeue is one `retry_scheduled` (lost) event: its timer is the
                        // stagger's, set below.
                        self.stats
                            .retries_scheduled
                            .fetch_add(new.len() as u64, Ordering::Relaxed);
                        events.extend(new);
                        resumed.push(wf.sig(node));
                        report.attempts_requeued += 1;
                    }
                    Err(e) => {
                        tracing::error!(workflow = %id, node, attempt, error = %e, "recovery: requeue refused; the attempt stays in flight");
                        report.failures += 1;
                    }
                }
            }
            if !events.is_empty() {
                appends.push(AppendRequest {
                    stream: id,
                    expected_version: expected,
                    events,
                });
            }
            if whole {
                self.held.insert(id, Hold::Whole);
                report.workflows_held += 1;
            } else if !held_nodes.is_empty() {
                self.held.insert(id, Hold::Nodes(held_nodes));
            }
            self.hot.insert(id, wf);
        }
        for (k, sig) in resumed.into_iter().enumerate() {
            if settings.stagger.is_zero() {
                self.ready.push_back(sig);
            } else {
                let delay = settings.stagger.saturating_mul(k as u32).as_micros();
                let at = Timestamp::from_micros(
                    t0.as_micros()
                        .saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
                );
                self.timers.insert((at, sig));
            }
        }
        if report.workflows_unfinished > 0 || report.skipped_corrupt > 0 {
            self.append_with_report(appends, &report, t0, &actor)
                .await?;
            tracing::info!(?report, "recovered unfinished work from the log");
        } else if !appends.is_empty() {
            self.log.append(appends).await?;
        }
        Ok(report)
    }

    /// Append the recovery's events together with its report (one event of the system
    /// stream), atomically; retried if another engine wrote to the system stream meanwhile.
    async fn append_with_report(
        &self,
        appends: Vec<AppendRequest>,
        report: &RecoveryReport,
        at: Timestamp,
        actor: &Actor,
    ) -> Result<()> {
        let payload = Payload::ResumeReport {
            report: serde_json::to_value(report).map_err(|e| {
                Error::Rejected(Rejection::Internal(format!(
                    "recovery report does not serialize: {e}"
                )))
            })?,
        };
        let mut tries = 0;
        loop {
            tries += 1;
            let version = self.log.stream_version(WorkflowId::SYSTEM)?;
            let report_event = Event {
                stream: WorkflowId::SYSTEM,
                seq: version + 1,
                at,
                actor: actor.clone(),
                schema: mageflow_core::SCHEMA_VERSION,
                payload: payload.clone(),
            };
            let mut requests = appends.clone();
            requests.push(AppendRequest {
                stream: WorkflowId::SYSTEM,
                expected_version: version,
                events: vec![report_event],
            });
            match self.log.append(requests).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_conflict() && tries < RECOVERY_APPEND_TRIES => {
                    // Only the system stream can have moved: workflows are this engine's.
                    tracing::warn!(error = %e, "recovery: the system stream moved; retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A resume or run of `wf`: start what auto-resume held of it (see [`AutoResume`]).
    fn release(&mut self, wf: WorkflowId, step: &mut Step) {
        let Some(hold) = self.held.remove(&wf) else {
            return;
        };
        let mut requeue = Vec::new();
        if let Ok(state) = self.load(wf) {
            let held = |i: NodeIndex| match &hold {
                Hold::Whole => true,
                Hold::Nodes(nodes) => nodes.contains(&i),
            };
            let mut ready = Vec::new();
            let mut timers = Vec::new();
            for (i, n) in state.nodes.iter().enumerate() {
                let index = i as NodeIndex;
                if !held(index) {
                    continue;
                }
                if n.in_flight {
                    requeue.push((index, n.attempt));
                } else if n.status == Status::Queued {
                    match n.not_before {
                        Some(t) => timers.push((t, state.sig(index))),
                        None => ready.push(state.sig(index)),
                    }
                }
            }
            self.ready.extend(ready);
            self.timers.extend(timers);
        }
        let actor = Actor::system("resume");
        for (node, attempt) in requeue {
            if self.running.contains_key(&SignatureId {
                workflow: wf,
                index: node,
            }) {
                continue;
            }
            let actions = vec![(wf, Action::Core(Op::Requeue { node, attempt }))];
            if let Err(e) = self.exec(actions, &actor, false, step) {
                tracing::warn!(%wf, node, attempt, error = %e, "requeue of a held attempt refused");
            }
        }
        step.touched.push(wf);
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let mut inflight: Option<InFlight> = None;
        loop {
            if let Some(deadline) = self.shutdown_at {
                // Remote attempts belong to worker processes: nothing here to wait for.
                let idle = self.remote()
                    || self.running.is_empty()
                    || tokio::time::Instant::now() >= deadline;
                if idle {
                    if let Some(prev) = inflight.take() {
                        self.finish(prev).await;
                    }
                    // A redaction under way finishes: it is one durable step, and the log
                    // (a sled directory, say) is free for the next engine once shutdown returns.
                    for job in self.background.drain(..) {
                        let _ = job.await;
                    }
                    // Handlers still running past the grace period are stopped; their
                    // attempts stay in flight in the log and the next start requeues them.
                    for r in self.running.values() {
                        r.token.cancel();
                    }
                    // Their futures end within the grace period of the token (`run_attempt`);
                    // shutdown returns after that, so nothing of this engine (a handler's
                    // context holds a handle, and the handle the log) outlives it.
                    self.handlers.close();
                    let bound = self.config.grace + Duration::from_millis(500);
                    if tokio::time::timeout(bound, self.handlers.wait())
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            handlers = self.handlers.len(),
                            "shutdown: handler tasks still running after their grace period"
                        );
                    }
                    for reply in self.shutdown_replies.drain(..) {
                        let _ = reply.send(());
                    }
                    break;
                }
            }
            let mut batch = Vec::new();
            if inflight.is_none() {
                let deadline = self.next_wakeup();
                tokio::select! {
                    biased;
                    req = rx.recv() => match req {
                        Some(r) => batch.push(r),
                        None => break,
                    },
                    _ = sleep_until(deadline) => {}
                }
            }
            while batch.len() < BATCH_REQUESTS_MAX {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            let mut step = self.process(batch);
            if step.is_empty() {
                if let Some(prev) = inflight.take() {
                    self.finish(prev).await;
                }
                continue;
            }
            let fut = if step.appends.is_empty() {
                None
            } else {
                step.events = step.appends.iter().map(|a| a.events.len()).sum();
                Some(self.log.append(std::mem::take(&mut step.appends)))
            };
            if let Some(prev) = inflight.take() {
                self.finish(prev).await;
            }
            inflight = Some((fut, step));
        }
    }

    /// The next retry timer or the shutdown deadline, whichever comes first.
    fn next_wakeup(&self) -> Option<tokio::time::Instant> {
        // Signatures put back on the ready queue outside a step (the launches of a failed
        // append) start in the next step, without waiting for a request to bring one about.
        if !self.ready.is_empty() && self.free_slots > 0 && self.shutdown_at.is_none() {
            return Some(tokio::time::Instant::now());
        }
        let first = match (self.timers.first(), self.purges.first()) {
            (Some((a, _)), Some((b, _))) => Some(*a.min(b)),
            (Some((a, _)), None) => Some(*a),
            (None, Some((b, _))) => Some(*b),
            (None, None) => None,
        };
        let timer = first.map(|at| {
            let wait_us = at
                .as_micros()
                .saturating_sub(self.config.clock.now().as_micros())
                .max(0) as u64;
            tokio::time::Instant::now() + Duration::from_micros(wait_us)
        });
        match (timer, self.shutdown_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Load a workflow into the hot state (from the log if needed). A missing stream gives an
    /// empty workflow (for create).
    fn load(&mut self, wf: WorkflowId) -> Result<&mut Workflow> {
        if wf.is_system() {
            return Err(Error::NoSuchWorkflow(wf));
        }
        if !self.hot.contains_key(&wf) {
            let events = self.log.read_stream(wf, 1)?;
            let state = Workflow::replay(wf, events).map_err(|e| Error::Replay(wf, e))?;
            for (i, n) in state.nodes.iter().enumerate() {
                if n.status == Status::Queued && !n.in_flight {
                    self.ready.push_back(state.sig(i as NodeIndex));
                }
            }
            self.hot.insert(wf, state);
        }
        self.hot.get_mut(&wf).ok_or(Error::NoSuchWorkflow(wf))
    }

    /// Carry out what freshly decided events ask of the orchestrator. The core works that out
    /// from the events alone ([`Effect::of`]), as it does for the hot tier's projector.
    fn scan(&mut self, events: &[Event], step: &mut Step) {
        for effect in events.iter().flat_map(Effect::of) {
            match effect {
                Effect::Enqueue(sig) => self.ready.push_back(sig),
                Effect::ArmTimer { sig, at } => {
                    self.stats.retries_scheduled.fetch_add(1, Ordering::Relaxed);
                    self.timers.insert((at, sig));
                }
                // An interrupt or cancel stops a running attempt; so does an attempt given up
                // (abandoned by its worker), which still holds its slot here, so that the new
                // attempt can start.
                Effect::Revoke(sig) => {
                    if self.running.contains_key(&sig) {
                        step.stops.push(sig);
                    }
                }
                Effect::TaskSucceeded(_) => {
                    self.stats.tasks_succeeded.fetch_add(1, Ordering::Relaxed);
                }
                Effect::TaskFailed(_) => {
                    self.stats.tasks_failed.fetch_add(1, Ordering::Relaxed);
                }
                Effect::SchedulePurge { workflow, at } => {
                    self.purges.insert((at, workflow));
                }
                Effect::Forget(workflow) => step.purged.push(workflow),
                // Starts are the orchestrator's own decisions (`start_ready`), launched there.
                Effect::Dispatch { .. } => {}
            }
        }
    }

    /// Run actions against hot state; all-or-nothing across the workflows involved.
    fn exec(
        &mut self,
        actions: Vec<(WorkflowId, Action)>,
        actor: &Actor,
        idempotent: bool,
        step: &mut Step,
    ) -> Result<()> {
        let at = self.config.clock.now();
        let single = actions.len() == 1;
        let creation_max = self
            .config
            .creation_events_max
            .min(mageflow_store::APPEND_EVENTS_MAX);
        let mut backups: Map<WorkflowId, Workflow> = Map::default();
        // Whether each workflow was finished before this call.
        let mut was_finished: Map<WorkflowId, bool> = Map::default();
        let mut produced: Vec<(WorkflowId, u64, Vec<Event>)> = Vec::new();
        let mut failure = None;
        // Workflows an idempotent creation found already there: the rest of their creation
        // (chunks of a large swarm, the run) was done by the first attempt.
        let mut existing: Vec<WorkflowId> = Vec::new();
        for (wf, action) in actions {
            if existing.contains(&wf) {
                continue;
            }
            let registry = self.registry.clone();
            if !idempotent && matches!(action, Action::Core(Op::Create { .. })) {
                // A non-idempotent creation has a fresh id (UUIDv7, made by the caller's
                // handle): it has no stream yet, so the log is not asked (on PostgreSQL that
                // was a round trip per workflow, on the orchestrator's one thread). Were the
                // stream there after all, the append's expected version 0 would conflict.
                self.hot.entry(wf).or_insert_with(|| Workflow::empty(wf));
            }
            let state = match self.load(wf) {
                Ok(s) => s,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            was_finished
                .entry(wf)
                .or_insert_with(|| state.is_finished());
            if !single && !backups.contains_key(&wf) {
                backups.insert(wf, state.clone());
            }
            let expected = state.version;
            let op = match action {
                Action::Core(op) => Ok(op),
                Action::AddItems {
                    swarm,
                    items,
                    close,
                } => flatten_items(&registry, state, swarm, &items, close),
            };
            let cmd = match op {
                Ok(op) => Command {
                    actor: actor.clone(),
                    at,
                    op,
                },
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            match execute_owned(state, cmd) {
                Ok(events) if expected == 0 && events.len() > creation_max => {
                    // A new workflow: nothing of it is durable or pending, so dropping the
                    // state `execute` built is all the undoing there is.
                    self.hot.remove(&wf);
                    failure = Some(Error::Rejected(Rejection::InvalidTree(format!(
                        "creating this workflow takes {} events in one step, more than the \
                         limit of {creation_max}: give its swarm a lower max_concurrency, or \
                         add the items in batches",
                        events.len()
                    ))));
                    break;
                }
                Ok(events) => produced.push((wf, expected, events)),
                Err(Rejection::AlreadyExists) if idempotent => existing.push(wf),
                Err(Rejection::Internal(msg)) => {
                    tracing::error!(%wf, %msg, "decide produced an event that does not apply");
                    self.hot.remove(&wf);
                    failure = Some(Error::Rejected(Rejection::Internal(msg)));
                    break;
                }
                Err(r) => {
                    failure = Some(Error::Rejected(r));
                    break;
                }
            }
        }
        if let Some(e) = failure {
            for (wf, backup) in backups {
                self.hot.insert(wf, backup);
            }
            // execute leaves state unchanged on rejection; drop never-created stubs.
            self.hot.retain(|_, w| w.exists() || w.version > 0);
            return Err(e);
        }
        for (wf, expected, events) in produced {
            if self.hot.contains_key(&wf) {
                self.scan(&events, step);
            }
            step.add_events(wf, expected, events);
        }
        for (wf, was) in was_finished {
            if !was && self.hot.get(&wf).is_some_and(Workflow::is_finished) {
                step.finished.push(wf);
            }
        }
        Ok(())
    }

    fn process(&mut self, batch: Vec<Request>) -> Step {
        self.seq += 1;
        let mut step = Step {
            seq: self.seq,
            ..Step::default()
        };
        let worker = self.worker_actor.clone();
        for req in batch {
            match req {
                Request::Exec {
                    actions,
                    actor,
                    idempotent,
                    reply,
                } => {
                    let touched: Vec<WorkflowId> = actions.iter().map(|(w, _)| *w).collect();
                    // A resume or run releases what auto-resume held of the workflow.
                    let releases: Vec<WorkflowId> = actions
                        .iter()
                        .filter(|(w, a)| {
                            matches!(a, Action::Core(Op::Resume { .. } | Op::Run { .. }))
                                && self.held.contains_key(w)
                        })
                        .map(|(w, _)| *w)
                        .collect();
                    let res = self.exec(actions, &actor, idempotent, &mut step);
                    if res.is_ok() {
                        for wf in releases {
                            self.release(wf, &mut step);
                        }
                    }
                    step.touched.extend(touched);
                    if let Some(reply) = reply {
                        step.replies.push(Reply::Unit(reply, res));
                    }
                }
                Request::Done {
                    sig,
                    attempt,
                    result,
                    local,
                } => {
                    // Only our own handler's report frees the slot of its attempt; an outside
                    // report of the same attempt (redelivery) leaves the handler running. With
                    // remote dispatch every report comes from outside and frees the slot.
                    if local || self.remote() {
                        self.release_slot(sig, attempt);
                    }
                    // Even a no-op report may have reloaded a finished workflow: settle it.
                    step.touched.push(sig.workflow);
                    let result = result.map(|r| {
                        r.and_then(|v| match crate::sig::check_depth("result", &v) {
                            Ok(()) => Ok(v),
                            Err(e) => Err(TaskFailure::fatal(e.to_string())),
                        })
                    });
                    let op = match result {
                        Some(Ok(result)) => Op::Complete {
                            node: sig.index,
                            attempt,
                            result,
                        },
                        Some(Err(f)) => Op::Fail {
                            node: sig.index,
                            attempt,
                            error: TaskError {
                                message: f.message,
                                retryable: f.retryable,
                            },
                        },
                        None => continue,
                    };
                    let actions = vec![(sig.workflow, Action::Core(op))];
                    if let Err(e) = self.exec(actions, &worker, false, &mut step) {
                        tracing::warn!(%sig, attempt, error = %e, "task report refused");
                    }
                }
                Request::Abandoned {
                    sig,
                    attempt,
                    reply,
                } => {
                    // Its slot is free whether or not the requeue still applies (the attempt
                    // may have ended, or been requeued by a recovery, meanwhile).
                    if self.remote() {
                        self.release_slot(sig, attempt);
                    }
                    step.touched.push(sig.workflow);
                    let op = Op::Requeue {
                        node: sig.index,
                        attempt,
                    };
                    let actions = vec![(sig.workflow, Action::Core(op))];
                    let res = self.exec(actions, &Actor::system("abandoned"), false, &mut step);
                    step.replies.push(Reply::Unit(reply, res));
                }
                Request::Wait { wf, until, reply } => match self.load(wf) {
                    Ok(state) if !state.exists() => {
                        self.hot.remove(&wf);
                        step.replies
                            .push(Reply::State(reply, Err(Error::NoSuchWorkflow(wf))));
                    }
                    Ok(_) => {
                        let waiters = self.waiters.entry(wf).or_default();
                        waiters.retain(|(_, w)| !w.is_closed());
                        waiters.push((until, reply));
                        step.touched.push(wf);
                    }
                    Err(e) => step.replies.push(Reply::State(reply, Err(e))),
                },
                Request::Inspect { wf, f, reply } => {
                    let res = match self.load(wf) {
                        Ok(state) if state.exists() => Ok(f(state)),
                        Ok(_) => {
                            self.hot.remove(&wf);
                            Err(Error::NoSuchWorkflow(wf))
                        }
                        Err(e) => Err(e),
                    };
                    step.touched.push(wf);
                    step.replies.push(Reply::Any(reply, res));
                }
                Request::Long { min_version, reply } => {
                    let long = self
                        .hot
                        .iter()
                        .filter(|(_, w)| w.version >= min_version && !w.is_finished())
                        .map(|(id, _)| *id)
                        .collect();
                    let _ = reply.send(long);
                }
                Request::Shutdown { reply } => {
                    if self.shutdown_at.is_none() {
                        self.shutdown_at = Some(tokio::time::Instant::now() + self.config.grace);
                    }
                    self.shutdown_replies.push(reply);
                }
            }
        }
        self.fire_timers();
        self.fire_purges(&mut step);
        if self.shutdown_at.is_none() {
            self.start_ready(&mut step);
        }
        for wf in &step.touched {
            self.last_touch.insert(*wf, step.seq);
        }
        step
    }

    /// The cleanup job: purge workflows whose deletion window ended. A purge is one event, so a
    /// crash before it is durable leaves the mark, and the next start schedules it again.
    fn fire_purges(&mut self, step: &mut Step) {
        let t = self.config.clock.now();
        let actor = Actor::system("cleanup");
        while let Some(&(at, wf)) = self.purges.first() {
            if at > t {
                break;
            }
            self.purges.pop_first();
            let actions = vec![(wf, Action::Core(Op::Purge))];
            match self.exec(actions, &actor, false, step) {
                Ok(()) => step.touched.push(wf),
                // Still running: try again shortly. Expired later (re-marked): at that time.
                Err(Error::Rejected(Rejection::NotYet(_))) => {
                    self.purges
                        .insert((t.saturating_add_millis(PURGE_RETRY_MS), wf));
                }
                Err(Error::Rejected(Rejection::NotExpired(at))) => {
                    self.purges.insert((at, wf));
                }
                // Restored, rerun or already purged: nothing to do.
                Err(Error::Rejected(_)) => {}
                Err(e) => {
                    tracing::warn!(%wf, error = %e, "purge failed; retrying");
                    self.purges
                        .insert((t.saturating_add_millis(PURGE_RETRY_MS), wf));
                }
            }
        }
    }

    fn fire_timers(&mut self) {
        let t = self.config.clock.now();
        while let Some(&(at, sig)) = self.timers.first() {
            if at > t {
                break;
            }
            self.timers.pop_first();
            self.ready.push_back(sig);
        }
    }

    /// Fill free worker slots from the ready queue (each start is a `started` event).
    fn start_ready(&mut self, step: &mut Step) {
        let at = self.config.clock.now();
        let actor = self.worker_actor.clone();
        let remote = self.remote();
        while self.free_slots > 0 {
            let Some(sig) = self.ready.pop_front() else {
                break;
            };
            if self.is_held(sig) {
                // Auto-resume left it for a resume or run of its workflow, which puts it back.
                continue;
            }
            if self.running.contains_key(&sig) {
                // An older attempt's handler still holds a slot (revoked, within its grace).
                self.deferred.insert(sig);
                continue;
            }
            step.touched.push(sig.workflow);
            let Ok(state) = self.load(sig.workflow) else {
                continue;
            };
            let Some(node) = state.node(sig.index) else {
                continue;
            };
            if node.status != Status::Queued {
                continue;
            }
            if let Some(nb) = node.not_before.filter(|nb| *nb > at) {
                self.timers.insert((nb, sig));
                continue;
            }
            let expected = state.version;
            let cmd = Command {
                actor: actor.clone(),
                at,
                op: Op::Start { node: sig.index },
            };
            let Ok(events) = execute_owned(state, cmd) else {
                continue;
            };
            let node = &state.nodes[sig.index as usize];
            // With remote dispatch the projector builds the job from the log: no input here.
            let launch = Launch {
                sig,
                attempt: node.attempt,
                task: node.spec.task_name().unwrap_or_default().to_owned(),
                input: if remote {
                    Value::Null
                } else {
                    state.effective_input(sig.index)
                },
                checkpoint: if remote {
                    None
                } else {
                    node.checkpoint.clone()
                },
            };
            step.add_events(sig.workflow, expected, events);
            self.free_slots -= 1;
            let token = CancellationToken::new();
            self.running.insert(
                sig,
                Running {
                    attempt: launch.attempt,
                    token,
                },
            );
            step.launches.push(launch);
        }
    }

    /// Wait for a batch to be durable, then carry out its effects.
    async fn finish(&mut self, (fut, step): InFlight) {
        let outcome = match fut {
            Some(f) => f.await.map(|_| ()),
            None => Ok(()),
        };
        let Step {
            seq,
            events,
            replies,
            launches,
            stops,
            touched,
            finished,
            purged,
            ..
        } = step;
        match outcome {
            Ok(()) => {
                self.stats
                    .events_written
                    .fetch_add(events as u64, Ordering::Relaxed);
                if events > 0 {
                    self.stats.appends.fetch_add(1, Ordering::Relaxed);
                }
                self.stats
                    .workflows_finished
                    .fetch_add(finished.len() as u64, Ordering::Relaxed);
                for wf in finished.iter().chain(&purged) {
                    if self.config.redact_canceled {
                        // Still in the hot state: settling comes after the effects.
                        if let Some(nodes) = self.hot.get(wf).and_then(Workflow::redaction_targets)
                        {
                            self.redact(*wf, nodes);
                        }
                    }
                    if let Some(tx) = &self.compact_tx {
                        let _ = tx.send(*wf);
                    }
                }
                for l in launches {
                    self.launch(l);
                }
                for sig in stops {
                    if self.remote() {
                        // The worker hears of it from the hot tier; its slot is free now.
                        if self.running.remove(&sig).is_some() {
                            self.free_slots += 1;
                            self.stats.running.fetch_sub(1, Ordering::Relaxed);
                            // An abandoned attempt's requeue may have come up meanwhile.
                            if self.deferred.remove(&sig) {
                                self.ready.push_back(sig);
                            }
                        }
                    } else if let Some(r) = self.running.get(&sig) {
                        r.token.cancel();
                    }
                }
                for r in replies {
                    match r {
                        Reply::Unit(tx, res) => {
                            let _ = tx.send(res);
                        }
                        Reply::State(tx, res) => {
                            let _ = tx.send(res);
                        }
                        Reply::Any(tx, res) => {
                            let _ = tx.send(res);
                        }
                    }
                }
            }
            Err(e) => {
                self.stats.append_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "appending a batch failed; reloading its workflows");
                for l in launches {
                    if self
                        .running
                        .get(&l.sig)
                        .is_some_and(|r| r.attempt == l.attempt)
                    {
                        self.running.remove(&l.sig);
                        self.free_slots += 1;
                        // Its `started` event is lost: the signature is queued again once its
                        // workflow is reloaded, and nothing else may touch that workflow to
                        // make it start (found by the simulator: mageflow-sim BUGS.md #3).
                        self.deferred.remove(&l.sig);
                        self.ready.push_back(l.sig);
                    }
                }
                let msg = e.to_string();
                for r in replies {
                    match r {
                        Reply::Unit(tx, res) => {
                            let _ = tx.send(res.and(Err(Error::Store(
                                mageflow_store::Error::Storage(msg.clone()),
                            ))));
                        }
                        Reply::Any(tx, _) => {
                            let _ = tx.send(Err(Error::Store(mageflow_store::Error::Storage(
                                msg.clone(),
                            ))));
                        }
                        Reply::State(tx, _) => {
                            let _ = tx.send(Err(Error::Store(mageflow_store::Error::Storage(
                                msg.clone(),
                            ))));
                        }
                    }
                }
                for wf in &touched {
                    self.hot.remove(wf);
                }
            }
        }
        // A workflow a later step touched too is settled by that step's `finish`: its hot
        // state already holds events that are not durable yet.
        for wf in touched {
            if self.last_touch.get(&wf) == Some(&seq) {
                self.last_touch.remove(&wf);
                self.settle(wf);
            }
        }
    }

    /// Answer waiters of a finished workflow and drop it from the hot state; answer the
    /// [`Until::Settled`] waiters of one that is settled but not finished. Called only once
    /// every event decided for `wf` is durable (see [`Orchestrator::last_touch`]).
    fn settle(&mut self, wf: WorkflowId) {
        let Some(state) = self.hot.get(&wf) else {
            return;
        };
        if !state.exists() {
            self.hot.remove(&wf);
            return;
        }
        if !state.is_finished() {
            // Work auto-resume holds whole waits for a user as much as a suspended one does.
            let settled = state.is_settled() || matches!(self.held.get(&wf), Some(Hold::Whole));
            if let (true, Some(waiters)) = (settled, self.waiters.get_mut(&wf)) {
                let (answered, waiting): (Vec<_>, Vec<_>) = std::mem::take(waiters)
                    .into_iter()
                    .partition(|(until, _)| *until == Until::Settled);
                *waiters = waiting;
                for (_, w) in answered {
                    let _ = w.send(Ok(state.clone()));
                }
                if waiters.is_empty() {
                    self.waiters.remove(&wf);
                }
            }
            return;
        }
        // The state leaves the hot set here: the last waiter gets it, the others a copy (a
        // million-item swarm's state is over a gigabyte).
        let state = self.hot.remove(&wf);
        if let (Some(waiters), Some(state)) = (self.waiters.remove(&wf), state) {
            let mut waiters: Vec<_> = waiters
                .into_iter()
                .map(|(_, w)| w)
                .filter(|w| !w.is_closed())
                .collect();
            let last = waiters.pop();
            for w in waiters {
                let _ = w.send(Ok(state.clone()));
            }
            if let Some(w) = last {
                let _ = w.send(Ok(state));
            }
        }
        self.held.remove(&wf);
    }

    /// Redact `wf`'s canceled or purged task data on a blocking thread (the log's `redact`
    /// blocks); its events are durable and nothing more will be decided about those signatures.
    fn redact(&mut self, wf: WorkflowId, nodes: Vec<NodeIndex>) {
        let (log, stats) = (self.log.clone(), self.stats.clone());
        self.background.retain(|job| !job.is_finished());
        let job = tokio::task::spawn_blocking(move || match log.redact(wf, nodes) {
            Ok(Some(_)) => {
                stats.workflows_redacted.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%wf, "task data of canceled or purged signatures redacted from the log");
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(%wf, error = %e, "redacting canceled or purged task data failed; it stays in the log")
            }
        });
        self.background.push(job);
    }

    fn remote(&self) -> bool {
        matches!(self.config.dispatch, Dispatch::Remote { .. })
    }

    fn is_held(&self, sig: SignatureId) -> bool {
        match self.held.get(&sig.workflow) {
            None => false,
            Some(Hold::Whole) => true,
            Some(Hold::Nodes(nodes)) => nodes.contains(&sig.index),
        }
    }

    /// Give back the slot attempt `attempt` of `sig` holds, if it holds one; a signature waiting
    /// for that slot (queued again meanwhile) is ready again.
    fn release_slot(&mut self, sig: SignatureId, attempt: u32) {
        if self.running.get(&sig).is_some_and(|r| r.attempt == attempt) {
            self.running.remove(&sig);
            self.free_slots += 1;
            self.stats.running.fetch_sub(1, Ordering::Relaxed);
            if self.deferred.remove(&sig) {
                self.ready.push_back(sig);
            }
        }
    }

    /// Count an attempt as running, from its start until its slot is given back.
    fn count_running(&self) {
        let running = self.stats.running.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats
            .running_peak
            .fetch_max(running, Ordering::Relaxed);
    }

    fn launch(&mut self, l: Launch) {
        let Some(token) = self.running.get(&l.sig).map(|r| r.token.clone()) else {
            return;
        };
        // Counted from here until its `Done` gives the slot back, whatever happens below.
        self.count_running();
        if self.remote() {
            // The projector turns the durable `started` event into a job for the workers.
            self.stats.attempts_started.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let (handler, heartbeat_timeout) = match self.registry.get(&l.task) {
            Ok(def) => (def.handler.clone(), def.heartbeat_timeout),
            Err(e) => {
                let tx = self.tx.clone();
                let msg = e.to_string();
                tokio::spawn(async move {
                    let result = Some(Err(TaskFailure::fatal(msg)));
                    let _ = tx
                        .send(Request::Done {
                            sig: l.sig,
                            attempt: l.attempt,
                            result,
                            local: true,
                        })
                        .await;
                });
                return;
            }
        };
        self.stats.attempts_started.fetch_add(1, Ordering::Relaxed);
        let ctx = TaskContext {
            sig: l.sig,
            attempt: l.attempt,
            checkpoint: l.checkpoint,
            cancel: token.clone(),
            backing: Backing::Engine(self.handle.clone()),
            created: Arc::new(AtomicU32::new(0)),
            lease: None,
        };
        let tx = self.tx.clone();
        let grace = self.config.grace;
        let (sig, attempt) = (l.sig, l.attempt);
        self.handlers.spawn(async move {
            let result = run_attempt(handler, heartbeat_timeout, l.input, ctx, grace).await;
            let _ = tx
                .send(Request::Done {
                    sig,
                    attempt,
                    result,
                    local: true,
                })
                .await;
        });
    }
}

/// Run one attempt's handler to its end. `None`: it was stopped (its token fired) and outlived
/// the grace period, so its future was dropped. A panic is a retryable failure; a handler with a
/// heartbeat timeout that stops renewing its lease is dropped and failed (retryable); one that
/// outruns its task's timeout ([`crate::TaskDef::timeout`]) has its token fired, gets `grace` to
/// wind down, is dropped and fails with [`TaskFailure::timed_out`] (retryable).
pub(crate) async fn run_attempt(
    handler: crate::registry::Handler,
    heartbeat_timeout: Option<Duration>,
    input: Value,
    mut ctx: TaskContext,
    grace: Duration,
) -> Option<std::result::Result<Value, TaskFailure>> {
    let token = ctx.cancel.clone();
    let mut renewals = heartbeat_timeout.map(|_| {
        let (lease, renewals) = tokio::sync::watch::channel(());
        ctx.lease = Some(lease);
        renewals
    });
    let limit = handler.timeout;
    let mut fut = std::pin::pin!(CatchUnwind(handler.call(input, ctx)));
    let caught = |r: std::result::Result<_, Box<dyn Any + Send>>| {
        r.unwrap_or_else(|panic| {
            Err(TaskFailure::retryable(format!(
                "handler panicked: {}",
                panic_message(&panic)
            )))
        })
    };
    tokio::select! {
        biased;
        r = &mut fut => Some(caught(r)),
        _ = async { token.cancelled().await; tokio::time::sleep(grace).await } => None,
        missed = lease_expired(heartbeat_timeout, renewals.as_mut()) => {
            // The handler future is dropped here; its token tells anything it spawned.
            token.cancel();
            Some(Err(TaskFailure::retryable(format!(
                "lease expired: no heartbeat for {} ms", missed.as_millis()
            ))))
        }
        limit = timed_out(limit) => {
            // The attempt is over whatever the handler does now: it only gets the grace period
            // to wind down (save a checkpoint, release what it holds), as on an interrupt.
            token.cancel();
            let _ = tokio::time::timeout(grace, &mut fut).await;
            Some(Err(TaskFailure::timed_out(limit)))
        }
    }
}

/// Resolves (with the limit) once `limit` has passed; never without one.
async fn timed_out(limit: Option<Duration>) -> Duration {
    match limit {
        Some(limit) => {
            tokio::time::sleep(limit).await;
            limit
        }
        None => std::future::pending().await,
    }
}

/// Polls a handler future, turning a panic into an `Err` instead of unwinding into the runtime.
struct CatchUnwind(crate::registry::HandlerFuture);

impl std::future::Future for CatchUnwind {
    type Output = std::result::Result<std::result::Result<Value, TaskFailure>, Box<dyn Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Resolves (with the timeout) once `timeout` passes without a renewal; never without a lease.
async fn lease_expired(
    timeout: Option<Duration>,
    renewals: Option<&mut tokio::sync::watch::Receiver<()>>,
) -> Duration {
    let (Some(timeout), Some(renewals)) = (timeout, renewals) else {
        return std::future::pending().await;
    };
    loop {
        match tokio::time::timeout(timeout, renewals.changed()).await {
            Ok(Ok(())) => continue,
            // The handler dropped its context: nothing can renew the lease anymore.
            Ok(Err(_)) => {
                tokio::time::sleep(timeout).await;
                return timeout;
            }
            Err(_) => return timeout,
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn flatten_items(
    registry: &Registry,
    state: &Workflow,
    swarm: NodeIndex,
    items: &[Sig],
    close: bool,
) -> Result<Op> {
    let base = state.nodes.len();
    let parent = Some(mageflow_core::Link {
        node: swarm,
        role: mageflow_core::Role::Child,
    });
    let mut nodes = Vec::new();
    let mut deferred = Vec::new();
    for item in items {
        // Labels of items added later are not handed back (`Handle::add_to_swarm`).
        item.flatten(
            registry,
            base,
            parent,
            &mut nodes,
            &mut deferred,
            &mut Vec::new(),
        )?;
    }
    if !deferred.is_empty() {
        return Err(Error::TooMany {
            what: "items of a swarm added inside another swarm's items (add them separately)",
            count: deferred.iter().map(|d| d.items.len()).sum(),
            max: 0,
        });
    }
    check_node_count(nodes.len())?;
    Ok(Op::AddSwarmItems {
        swarm,
        nodes,
        close,
    })
}

fn check_node_count(count: usize) -> Result<()> {
    if count > crate::sig::CREATE_NODES_MAX {
        return Err(Error::TooMany {
            what: "signatures in one event (swarm items are split automatically; chain steps and callbacks are not)",
            count,
            max: crate::sig::CREATE_NODES_MAX,
        });
    }
    Ok(())
}
