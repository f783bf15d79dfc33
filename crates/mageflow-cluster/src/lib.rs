//! Multi-process mode: one orchestrating process and any number of worker processes (on any
//! machines) sharing one PostgreSQL (the durable log) and one Redis (the hot tier), with no other
//! coordination.
//!
//! - The orchestrator ([`open_cluster`]) decides everything and appends to the log; its
//!   projector applies the log to Redis (live state, the job queue, the event tail), and its
//!   report intake turns workers' reports into commands.
//! - A worker ([`run_worker_process`]) claims jobs from Redis (visibility timeout: a job whose
//!   worker died reappears after its lease), runs the handlers, and reports back through Redis.
//!
//! Redis is disposable: the projector rebuilds it from the log when its position key vanishes,
//! and completion is idempotent per attempt, so a job run twice is recorded once.
//!
//! This crate only runs a deployment: it wires the engine to the PostgreSQL log
//! (`mageflow-store-pg`) and the Redis hot tier (`mageflow-hot`) and decides nothing the engine
//! does not. Its errors are the engine's [`Error`] (the one the API maps to codes), so a caller
//! of [`open_cluster`] handles the same values as a caller of the engine. Users reach it as
//! `mageflow::cluster` (and [`auth`] as `mageflow::auth`), behind the root package's `cluster`
//! feature.

pub mod auth;

use auth::{Operators, Policy, Replays, Secret};
use mageflow_core::{SignatureId, WorkflowId};
use mageflow_engine::control::{self, ControlAnswer, ControlOp};
use mageflow_engine::worker::{self, Claim, Job, JobSource, Outcome, WorkerConfig, WorkerStats};
use mageflow_engine::{
    Config, Dispatch, Engine, Error, Handle, PositionFloor, Registry, Result, Sig, SubmitAnswer,
    TaskFailure, WireError,
};
use mageflow_hot::{
    Hot, HotConfig, HotError, JobKey, Projector, ProjectorStats, Received, Report, ReportOutcome,
};
use mageflow_store::BoxFuture;
use mageflow_store_pg::{OrchestratorLock, PgLog, PgOptions};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Reports taken from Redis per read.
const REPORTS_PER_READ: usize = 4_096;
/// Longest a report read blocks (the intake also checks for shutdown this often).
const REPORT_BLOCK: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a worker's `save_checkpoint` waits for the orchestrator to make it durable.
const CHECKPOINT_ANSWER_WAIT: Duration = Duration::from_secs(30);
/// How long a worker's `TaskContext::submit` waits for the orchestrator to make the creation
/// durable (a large swarm takes a while; answers in Redis expire after a minute).
const SUBMIT_ANSWER_WAIT: Duration = Duration::from_secs(50);
/// Deepest JSON a report may be: the orchestrator reads reports with serde_json, which refuses
/// more than 127 nested arrays/objects (its guard against unbounded recursion on outside bytes).
const REPORT_DEPTH_MAX: usize = 127;
/// Levels a submit report adds above its signature tree and input (report, outcome, submit).
const SUBMIT_REPORT_NESTING: usize = 3;

/// Workers' reports the intake has taken from Redis (each once per read; a report read again
/// after a restart counts again).
#[derive(Debug, Default)]
pub struct IntakeStats {
    /// Reports taken.
    pub reports: AtomicU64,
    /// Reports refused as not authentic: unsigned or wrongly signed, naming no lease or a
    /// principal that is not allowed (each logged on the `mageflow::security` target).
    pub refused: AtomicU64,
    /// Workers' reports dropped because their lease no longer held the job (a stale worker,
    /// a report from before a hot-tier rebuild, one read again after its attempt ended).
    pub stale: AtomicU64,
    /// Operator commands refused because they came past their deadline.
    pub expired: AtomicU64,
}

/// Where the tiers are.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// `postgres://user@host:port/database`.
    pub postgres: String,
    /// Options of the PostgreSQL log (schema, pool).
    pub pg: PgOptions,
    /// Where the Redis hot tier is, and its settings (key prefix, lease).
    pub hot: HotConfig,
    /// Attempts started and not yet reported, at most (see [`Dispatch::Remote`]).
    pub window: usize,
    /// The operators whose signed commands the intake carries out. With none, and no worker
    /// secret (`hot.secret`), the deployment is open (see [`crate::auth`]).
    pub operators: Operators,
}

impl ClusterConfig {
    /// A deployment on PostgreSQL at `postgres` and Redis at `redis`, its keys under `prefix`;
    /// the other settings at their defaults.
    pub fn new(postgres: impl Into<String>, redis: impl Into<String>, prefix: &str) -> Self {
        Self {
            postgres: postgres.into(),
            pg: PgOptions::default(),
            hot: HotConfig::new(redis, prefix),
            window: 1_024,
            operators: Operators::default(),
        }
    }
}

fn hot_error(e: mageflow_hot::HotError) -> Error {
    Error::Hot(e.to_string())
}

/// The orchestrating process: engine on the PostgreSQL log, projector, report intake.
pub struct Cluster {
    engine: Engine,
    hot: Hot,
    log: Arc<PgLog>,
    projector: Arc<ProjectorStats>,
    intake: Arc<IntakeStats>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Held until the engine has shut down (declared last: dropped last).
    lock: OrchestratorLock,
}

/// Start the orchestrator of a cluster. Fails naming the URL and the cause when PostgreSQL or
/// Redis cannot be reached. One orchestrator runs per log: while another holds the log's
/// orchestrator lock this waits for it as a standby (saying so once, as a warning), and starts
/// when that one stops or dies (see [`PgLog::orchestrator_lock`]). Unfinished work in the log
/// is then resumed: attempts that were running stay with their workers (or reappear as jobs
/// once the hot tier is rebuilt).
pub async fn open_cluster(
    cluster: ClusterConfig,
    registry: Registry,
    mut config: Config,
) -> Result<Cluster> {
    let log = Arc::new(PgLog::open(&cluster.postgres, cluster.pg.clone()).await?);
    let hot = Hot::connect(cluster.hot.clone()).await.map_err(hot_error)?;
    // Before anything of the log is read: a standby starts from what the last one left.
    let lock = log.orchestrator_lock().await?;
    tracing::info!(
        lock_backend_pid = lock.backend_pid(),
        "this process is the deployment's orchestrator"
    );
    config.dispatch = Dispatch::Remote {
        window: cluster.window.max(1),
    };
    let projector = Projector::new(hot.clone(), log.clone());
    let projector_stats = projector.stats();
    // The projector tails the live log: the old history of running workflows is compacted only
    // once it has projected it.
    let projected = projector_stats.clone();
    config.compaction_floor = Some(PositionFloor(Arc::new(move || {
        projected
            .position
            .load(std::sync::atomic::Ordering::Relaxed)
    })));
    let engine = Engine::start(log.clone(), registry, config).await?;
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();
    {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            if let Err(e) = projector.run(stop).await {
                tracing::error!(error = %e, "the hot-tier projector stopped");
            }
        }));
    }
    {
        let (lost, stop, h) = (lock.lost(), stop.clone(), engine.handle());
        tasks.push(tokio::spawn(async move {
            tokio::select! {
                _ = lost => {
                    tracing::error!("another orchestrator took this deployment over: this one \
                                     stops deciding, projecting and reading reports");
                    stop.cancel();
                    h.request_shutdown().await;
                }
                _ = stop.cancelled() => {}
            }
        }));
    }
    let intake_stats = Arc::new(IntakeStats::default());
    let policy = Policy {
        workers: cluster.hot.secret.clone(),
        operators: cluster.operators.clone(),
    };
    if policy.is_open() {
        tracing::warn!(target: "mageflow::security",
            "this deployment is open: no worker secret and no operator tokens, so anyone who \
             can write to its Redis keys can write history (see `mageflow serve --help`)");
    }
    tasks.push(tokio::spawn(intake(
        hot.clone(),
        engine.handle(),
        policy,
        intake_stats.clone(),
        stop.clone(),
    )));
    Ok(Cluster {
        engine,
        hot,
        log,
        projector: projector_stats,
        intake: intake_stats,
        stop,
        tasks,
        lock,
    })
}

impl Cluster {
    /// A handle to the orchestrator's engine.
    pub fn handle(&self) -> Handle {
        self.engine.handle()
    }

    /// The orchestrator's engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The hot tier this orchestrator projects into.
    pub fn hot(&self) -> &Hot {
        &self.hot
    }

    /// The PostgreSQL log (backend pids for operators, stats).
    pub fn pg(&self) -> &Arc<PgLog> {
        &self.log
    }

    /// What the projector did (its position, rebuilds).
    pub fn projector_stats(&self) -> &Arc<ProjectorStats> {
        &self.projector
    }

    /// What the report intake took.
    pub fn intake_stats(&self) -> &Arc<IntakeStats> {
        &self.intake
    }

    /// The log's orchestrator lock this process holds.
    pub fn lock(&self) -> &OrchestratorLock {
        &self.lock
    }

    /// Resolves if another orchestrator took the log over (this one's lock session ended and a
    /// standby got the lock first). Its projector and report intake stop at that moment and its
    /// engine is asked to stop (calls through its handle then fail with `ShutDown`); finish
    /// with [`Cluster::shutdown`]. Never resolves while the lock is held.
    pub async fn superseded(&self) {
        self.lock.lost().await
    }

    /// Stop the report intake and the projector, then the engine; then let go of the lock.
    pub async fn shutdown(self) {
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        self.engine.shutdown().await;
        // Only now may a standby start.
        drop(self.lock);
    }
}

/// Turn workers' reports into commands. Reports are trimmed from Redis only once everything
/// they caused is durable in the log; after a restart the untrimmed ones are read again, which
/// is harmless (completion is idempotent per attempt). Nothing is taken on trust: see
/// [`crate::auth`] for what a report must carry to count.
async fn intake(
    hot: Hot,
    h: Handle,
    policy: Policy,
    stats: Arc<IntakeStats>,
    stop: CancellationToken,
) {
    let mut after = String::from("0");
    let mut backoff = Duration::from_millis(20);
    let mut replays = Replays::default();
    while !stop.is_cancelled() {
        let read = tokio::select! {
            r = hot.read_reports(&after, REPORTS_PER_READ, REPORT_BLOCK) => r,
            _ = stop.cancelled() => return,
        };
        // With the leases that hold the workers' jobs now, in the same round trip's worth.
        let read = match read {
            Ok(reports) => {
                let keys: Vec<JobKey> = reports
                    .iter()
                    .filter(|r| auth::from_worker(&r.report))
                    .map(|r| r.report.key)
                    .collect();
                hot.leases(&keys).await.map(|held| {
                    (
                        reports,
                        keys.into_iter().zip(held).collect::<HashMap<_, _>>(),
                    )
                })
            }
            Err(e) => Err(e),
        };
        let (reports, leases) = match read {
            Ok(r) => {
                backoff = Duration::from_millis(20);
                r
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "reading workers' reports from Redis failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.cancelled() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let Some((last_id, last)) = reports.last().map(|r| (r.id.clone(), r.report.key.sig)) else {
            continue;
        };
        let failures = h.stats().append_failures.load(Ordering::Acquire);
        for r in reports {
            stats.reports.fetch_add(1, Ordering::Relaxed);
            let held = leases.get(&r.report.key).and_then(Option::as_deref);
            if let Err(e) = auth::admit(&policy, &mut replays, &r, held, now_ms()) {
                refuse(&hot, &h, &r, e, &stats).await;
                continue;
            }
            let id = r.id;
            let r = r.report;
            let (sig, attempt) = (r.key.sig, r.key.attempt);
            let sent = match r.outcome {
                ReportOutcome::Succeeded(v) => h.report(sig, attempt, Ok(v)).await,
                ReportOutcome::Failed { message, retryable } => {
                    let f = TaskFailure { message, retryable };
                    h.report(sig, attempt, Err(f)).await
                }
                ReportOutcome::Stopped => h.report_stopped(sig, attempt).await,
                ReportOutcome::Abandoned => match h.report_abandoned(sig, attempt).await {
                    Err(Error::ShutDown) => return,
                    Err(e) => {
                        tracing::info!(%sig, attempt, error = %e, "an abandoned attempt's requeue refused");
                        Ok(())
                    }
                    Ok(()) => Ok(()),
                },
                ReportOutcome::Checkpoint(data) => {
                    // Durable once this returns; the worker's save_checkpoint waits for the answer.
                    let durable = match h.checkpoint(sig, attempt, data).await {
                        Err(Error::ShutDown) => return,
                        Err(e) => {
                            tracing::info!(%sig, attempt, error = %e, "checkpoint refused");
                            false
                        }
                        Ok(()) => true,
                    };
                    if let Err(e) = hot.answer_report(&id, durable).await {
                        tracing::warn!(%sig, attempt, error = %e, "could not answer a checkpoint");
                    }
                    Ok(())
                }
                ReportOutcome::Control {
                    op,
                    confirmed,
                    principal,
                    target,
                    value,
                    ..
                } => {
                    // Carried out as the operator (or as `task:<sig>` for a handler's), answered
                    // once durable (or refused). A command read again after a restart is
                    // carried out again and refused or a no-op where that matters (a second
                    // cancel is a no-op).
                    let (target, principal) = match target {
                        Some(target) => (target, format!("task:{sig}")),
                        None => (sig, principal),
                    };
                    let done = match op.parse::<ControlOp>() {
                        Ok(op) => {
                            let h = h.as_principal(&principal);
                            control::apply(&h, op, target, confirmed, value).await
                        }
                        Err(e) => Err(e),
                    };
                    if let Err(Error::ShutDown) = done {
                        return;
                    }
                    tracing::info!(%target, %op, %principal, outcome = ?done, "operator command");
                    answer_control(&hot, &id, done).await;
                    Ok(())
                }
                ReportOutcome::Submit {
                    workflow,
                    sig: tree,
                    input,
                } => {
                    // Validated and made durable like any submit; idempotent, so a retried
                    // handler (or this report read again after a restart) finds the workflow.
                    let created = match serde_json::from_value::<Sig>(tree) {
                        Ok(tree) => h.submit_idempotent(workflow, tree, input).await,
                        Err(e) => Err(Error::Rejected(mageflow_core::Rejection::InvalidTree(
                            format!("unreadable signature tree from a worker: {e}"),
                        ))),
                    };
                    if let Err(Error::ShutDown) = created {
                        return;
                    }
                    if let Err(e) = &created {
                        tracing::info!(%sig, attempt, %workflow, error = %e, "a worker's submit refused");
                    }
                    answer_submit(&hot, &id, created).await;
                    Ok(())
                }
            };
            if sent.is_err() {
                return; // the engine is shutting down
            }
        }
        // A read answers once everything decided before it is durable: the reports above too —
        // unless an append failed meanwhile (its effects were dropped: another orchestrator's
        // appends conflicted, PostgreSQL stayed away) or the read failed. Then the reports stay
        // and are read again (a report whose effect is durable is a no-op the second time).
        let barrier = h.inspect(last.workflow, |_| ()).await;
        if let Err(Error::ShutDown) = barrier {
            return;
        }
        let failed = h.stats().append_failures.load(Ordering::Acquire) != failures;
        if barrier.is_err() || failed {
            tracing::warn!(error = ?barrier.err(), append_failed = failed,
                "the effects of some workers' reports may not be durable; reading them again");
            tokio::select! {
                _ = tokio::time::sleep(BACKOFF_MAX) => {}
                _ = stop.cancelled() => return,
            }
            continue;
        }
        if let Err(e) = hot.trim_reports(&last_id).await {
            tracing::warn!(error = %e, "trimming handled reports failed (they will be read again)");
        }
        after = last_id;
    }
}

/// A report that does not count: logged (as a security event unless it is merely stale or
/// late), and answered if its sender waits for an answer. An operator's command that came too
/// late is recorded in the log's system stream (`command_refused`): it passed every check but
/// its deadline, and the audit trail says it was asked for and not done. Nothing else of a
/// refused report reaches the log (an unauthenticated writer must not be able to fill it).
async fn refuse(hot: &Hot, h: &Handle, r: &Received, e: Error, stats: &IntakeStats) {
    let (key, worker) = (r.report.key, r.report.worker.as_str());
    match &e {
        Error::LeaseLost { .. } => {
            stats.stale.fetch_add(1, Ordering::Relaxed);
            tracing::info!(id = %r.id, %key, worker, "a report whose lease no longer holds its job: dropped");
        }
        Error::Expired(why) => {
            stats.expired.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(id = %r.id, %key, sender = worker, "operator command refused: {why}");
            if let ReportOutcome::Control {
                op,
                principal,
                deadline_ms,
                ..
            } = &r.report.outcome
            {
                let record = serde_json::json!({
                    "op": op,
                    "target": key.sig.to_string(),
                    "principal": principal,
                    "sender": worker,
                    "code": e.code(),
                    "reason": why,
                    "deadline_ms": deadline_ms,
                    "report": r.id,
                });
                if let Err(err) = h.record_refused_command(record).await {
                    tracing::warn!(id = %r.id, error = %err, "could not record a refused command");
                }
            }
        }
        _ => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "mageflow::security", id = %r.id, %key, claimed_sender = worker,
                code = e.code(), "report refused: {e}");
        }
    }
    match &r.report.outcome {
        ReportOutcome::Checkpoint(_) => {
            if let Err(err) = hot.answer_report(&r.id, false).await {
                tracing::warn!(%key, error = %err, "could not answer a refused checkpoint");
            }
        }
        ReportOutcome::Submit { .. } => answer_submit(hot, &r.id, Err(e)).await,
        ReportOutcome::Control { .. } => answer_control(hot, &r.id, Err(e)).await,
        _ => {}
    }
}

async fn answer_control(hot: &Hot, id: &str, done: Result<String>) {
    match serde_json::to_string(&ControlAnswer::of(done)) {
        Ok(answer) => {
            if let Err(e) = hot.answer_report_with(id, &answer).await {
                tracing::warn!(%id, error = %e, "could not answer a command");
            }
        }
        Err(e) => tracing::warn!(%id, error = %e, "could not encode the answer to a command"),
    }
}

async fn answer_submit(hot: &Hot, id: &str, created: Result<()>) {
    let answer = match created {
        Ok(()) => SubmitAnswer::Created,
        Err(e) => SubmitAnswer::Refused(WireError::from(&e)),
    };
    match serde_json::to_string(&answer) {
        Ok(answer) => {
            if let Err(e) = hot.answer_report_with(id, &answer).await {
                tracing::warn!(%id, error = %e, "could not answer a submit");
            }
        }
        Err(e) => tracing::warn!(%id, error = %e, "could not encode the answer to a submit"),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The worker side of the hot tier.
struct HotJobs {
    hot: Hot,
    worker: String,
}

fn lease_error(e: HotError) -> Error {
    match e {
        HotError::LeaseLost(key) => Error::LeaseLost {
            sig: key.sig,
            attempt: key.attempt,
        },
        e => hot_error(e),
    }
}

impl HotJobs {
    /// A report about `claim`'s job, under its lease.
    fn report_of(&self, claim: &Claim, outcome: ReportOutcome) -> Report {
        Report {
            key: JobKey {
                sig: claim.sig,
                attempt: claim.attempt,
            },
            worker: self.worker.clone(),
            outcome,
            lease: Some(claim.lease.clone()),
        }
    }
}

impl JobSource for HotJobs {
    fn claim(
        &self,
        worker: &str,
        max: usize,
        wait: Option<Duration>,
    ) -> BoxFuture<'static, Result<Vec<Job>>> {
        let (hot, worker) = (self.hot.clone(), worker.to_owned());
        Box::pin(async move {
            let jobs = match wait {
                None => hot.claim_many(&worker, max).await,
                Some(timeout) => hot.wait_and_claim(&worker, max, timeout).await,
            };
            Ok(jobs
                .map_err(hot_error)?
                .into_iter()
                .map(|j| Job {
                    sig: j.key.sig,
                    attempt: j.key.attempt,
                    task: j.task,
                    input: j.input,
                    checkpoint: j.checkpoint,
                    lease: j.lease,
                })
                .collect())
        })
    }

    fn heartbeat(&self, claim: &Claim) -> BoxFuture<'static, Result<bool>> {
        let (hot, claim) = (self.hot.clone(), claim.clone());
        Box::pin(async move {
            let key = JobKey {
                sig: claim.sig,
                attempt: claim.attempt,
            };
            hot.heartbeat(&key, &claim.lease).await.map_err(hot_error)
        })
    }

    fn report(
        &self,
        _worker: &str,
        claim: &Claim,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<()>> {
        let hot = self.hot.clone();
        let report = self.report_of(
            claim,
            match outcome {
                Outcome::Succeeded(v) => ReportOutcome::Succeeded(v),
                Outcome::Failed(f) => ReportOutcome::Failed {
                    message: f.message,
                    retryable: f.retryable,
                },
                Outcome::Stopped => ReportOutcome::Stopped,
                Outcome::Abandoned => ReportOutcome::Abandoned,
            },
        );
        Box::pin(async move { hot.report(&report).await.map(drop).map_err(lease_error) })
    }

    fn checkpoint(&self, claim: &Claim, data: Value) -> BoxFuture<'static, Result<()>> {
        let hot = self.hot.clone();
        let (sig, attempt) = (claim.sig, claim.attempt);
        let report = self.report_of(claim, ReportOutcome::Checkpoint(data));
        Box::pin(async move {
            // Durable only once the orchestrator has appended it and answered.
            let id = hot.report(&report).await.map_err(lease_error)?;
            match hot.wait_answer(&id, CHECKPOINT_ANSWER_WAIT).await {
                Ok(Some(true)) => Ok(()),
                Ok(Some(false)) => Err(Error::Hot(format!(
                    "the checkpoint of {sig} attempt {attempt} was refused: the attempt is no \
                     longer current, or no longer this worker's"
                ))),
                Ok(None) => Err(Error::Hot(format!(
                    "no answer to the checkpoint of {sig} attempt {attempt} within {} s",
                    CHECKPOINT_ANSWER_WAIT.as_secs()
                ))),
                Err(e) => Err(hot_error(e)),
            }
        })
    }

    fn submit(
        &self,
        claim: &Claim,
        id: WorkflowId,
        tree: Sig,
        input: Value,
    ) -> BoxFuture<'static, Result<()>> {
        let hot = self.hot.clone();
        let (sig, attempt) = (claim.sig, claim.attempt);
        let report = serde_json::to_value(&tree)
            .map_err(|e| Error::InvalidInput {
                task: "(submit)".into(),
                reason: format!("the signature tree cannot be encoded: {e}"),
            })
            .and_then(|tree| {
                // Refused here rather than sent: the orchestrator could not read it back, and
                // would never answer.
                let depth = mageflow_engine::value_depth(&tree)
                    .max(mageflow_engine::value_depth(&input))
                    + SUBMIT_REPORT_NESTING;
                if depth > REPORT_DEPTH_MAX {
                    return Err(Error::TooDeep {
                        what: "submit request",
                        depth,
                        max: REPORT_DEPTH_MAX,
                    });
                }
                let submit = ReportOutcome::Submit {
                    workflow: id,
                    sig: tree,
                    input,
                };
                Ok(self.report_of(claim, submit))
            });
        Box::pin(async move {
            let report_id = hot.report(&report?).await.map_err(lease_error)?;
            match hot.wait_answer_raw(&report_id, SUBMIT_ANSWER_WAIT).await {
                Ok(Some(raw)) => match serde_json::from_str::<SubmitAnswer>(&raw) {
                    Ok(SubmitAnswer::Created) => Ok(()),
                    Ok(SubmitAnswer::Refused(e)) => Err(e.into()),
                    Err(e) => Err(Error::Hot(format!(
                        "unreadable answer to the submit of workflow {id}: {e}"
                    ))),
                },
                Ok(None) => Err(Error::Hot(format!(
                    "no answer to the submit of workflow {id} by {sig} attempt {attempt} within \
                     {} s (it may still be created; a retry of the handler finds it)",
                    SUBMIT_ANSWER_WAIT.as_secs()
                ))),
                Err(e) => Err(hot_error(e)),
            }
        })
    }

    fn control(
        &self,
        claim: &Claim,
        principal: &str,
        op: ControlOp,
        target: SignatureId,
        confirmed: bool,
    ) -> BoxFuture<'static, Result<String>> {
        let hot = self.hot.clone();
        let command = control_outcome(
            op,
            confirmed,
            principal,
            Some(target),
            None,
            SUBMIT_ANSWER_WAIT,
        );
        let report = self.report_of(claim, command);
        Box::pin(async move {
            let id = hot.report(&report).await.map_err(lease_error)?;
            await_control(&hot, &id, op, target, SUBMIT_ANSWER_WAIT).await
        })
    }
}

/// A command valid for `wait` from now, with a fresh nonce.
fn control_outcome(
    op: ControlOp,
    confirmed: bool,
    principal: &str,
    target: Option<SignatureId>,
    value: Option<serde_json::Value>,
    wait: Duration,
) -> ReportOutcome {
    ReportOutcome::Control {
        op: op.name().into(),
        confirmed,
        principal: principal.into(),
        deadline_ms: now_ms() + wait.as_millis() as u64,
        nonce: auth::random_token(),
        target,
        value,
    }
}

/// How much longer than a command's deadline its sender waits for the answer: an orchestrator
/// that reads it just in time still answers.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

async fn await_control(
    hot: &Hot,
    id: &str,
    op: ControlOp,
    target: SignatureId,
    wait: Duration,
) -> Result<String> {
    match hot
        .wait_answer_raw(id, wait + ANSWER_GRACE)
        .await
        .map_err(hot_error)?
    {
        Some(raw) => serde_json::from_str::<ControlAnswer>(&raw)
            .map_err(|e| Error::Hot(format!("unreadable answer to {op} {target}: {e}")))?
            .into_result(),
        None => Err(Error::Expired(format!(
            "no orchestrator answered {op} {target} within {} s, so it was not carried out: \
             its deadline has passed, and an orchestrator that reads it later refuses it. Is \
             `mageflow serve` running on this deployment?",
            wait.as_secs()
        ))),
    }
}

/// Send an operator's control command to the orchestrator of the deployment `hot` belongs to,
/// signed with `token` (the operator's; required unless the deployment is open), valid for
/// `wait`: an orchestrator that reads it later refuses it. Waits for the answer: what was
/// done, or the refusal (the same error the API gives, or its code and message).
/// `sender` names the process the command comes from (`operator:<principal>` for the CLI);
/// `principal` is recorded as the command's actor; `value` is what a `signal` carries, a
/// `reject`'s reason or a `submit`'s workflow definition.
#[allow(clippy::too_many_arguments)]
pub async fn relay_control(
    hot: &Hot,
    sender: &str,
    op: ControlOp,
    target: SignatureId,
    confirmed: bool,
    value: Option<serde_json::Value>,
    principal: &str,
    token: Option<&Secret>,
    wait: Duration,
) -> Result<String> {
    auth::validate_principal(principal)?;
    let report = Report {
        key: JobKey {
            sig: target,
            attempt: 0,
        },
        worker: sender.to_owned(),
        outcome: control_outcome(op, confirmed, principal, None, value, wait),
        lease: None,
    };
    let id = hot.report_signed(&report, token).await.map_err(hot_error)?;
    await_control(hot, &id, op, target, wait).await
}

/// Run a worker process's runtime against the hot tier until `shutdown` fires (then finish or
/// abandon running handlers within `config.grace`). Fails at start naming the URL and the
/// cause when Redis cannot be reached; later connection losses are retried.
pub async fn run_worker_process(
    hot: HotConfig,
    registry: Registry,
    config: WorkerConfig,
    shutdown: CancellationToken,
) -> Result<Arc<WorkerStats>> {
    // Renew well within the lease, whatever the worker config says.
    let renew_every = config
        .renew_every
        .min(hot.lease / 3)
        .max(Duration::from_millis(10));
    let hot = Hot::connect(hot).await.map_err(hot_error)?;
    let mut revoked = hot.stops().await.map_err(hot_error)?;
    let (stops, stops_rx) = mpsc::unbounded_channel();
    let forward = tokio::spawn(async move {
        while let Some(k) = revoked.recv().await {
            if stops.send((k.sig, k.attempt)).is_err() {
                return;
            }
        }
    });
    let source = Arc::new(HotJobs {
        hot,
        worker: config.worker_id.clone(),
    });
    let stats = Arc::new(WorkerStats::default());
    let config = WorkerConfig {
        renew_every,
        ..config
    };
    worker::run_worker(
        source,
        Arc::new(registry),
        config,
        stops_rx,
        shutdown,
        stats.clone(),
    )
    .await;
    forward.abort();
    Ok(stats)
}
