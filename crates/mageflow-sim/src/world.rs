//! One run: the orchestrator process (engine + projector + report intake, over its view of the
//! log), the worker processes, the simulated operator and the fault driver, all tasks of one
//! current-thread runtime on paused (virtual) time. The driver walks the plan's timed faults,
//! turns faults off at the end of the window, lets the system settle, and hands what it saw to
//! the checks.

use crate::check::{self, Ack, AckOp};
use crate::hot::{Hot, Projector, ReportKind, WorkerSource};
use crate::log::{Durable, LogView};
use crate::plan::{Control, Fault, Plan, WorkflowPlan};
use crate::{tasks, Failure, Invariant, Observed};
use mageflow_core::{SignatureId, Timestamp, Workflow, WorkflowId};
use mageflow_engine::worker::{run_worker, WorkerConfig, WorkerStats};
use mageflow_engine::{Clock, Config, Dispatch, Engine, Error, Handle, Registry};
use mageflow_store::EventLog;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Pause between two tries of an operator call that met a transient error (no orchestrator,
/// a failed append).
const OPERATOR_RETRY: Duration = Duration::from_millis(100);
/// Tries of a control command before the operator gives up on it (its outcome unknown).
const CONTROL_TRIES_MAX: u32 = 30;
/// How often the operator looks whether a workflow finished (for delete and rerun).
const OPERATOR_POLL: Duration = Duration::from_millis(250);
/// How often the driver looks whether everything settled after the fault window.
const SETTLE_POLL: Duration = Duration::from_millis(1_000);
/// Pause before a new orchestrator retries a start whose recovery failed (an append fault).
const START_RETRY: Duration = Duration::from_millis(50);
/// Starts of one orchestrator tried before the run is given up.
const START_TRIES_MAX: u32 = 200;
/// Reports the intake takes per read, and how long a read waits for one.
const INTAKE_BATCH: usize = 64;
const INTAKE_WAIT: Duration = Duration::from_millis(200);
/// Pause of the intake after a barrier that could not prove its reports' effects durable.
const INTAKE_BACKOFF: Duration = Duration::from_millis(500);
/// Bound on a graceful shutdown of the orchestrator at the end or by a fault.
const SHUTDOWN_MAX: Duration = Duration::from_secs(30);
/// Grace of revoked handlers, on the engine and on the workers.
const GRACE: Duration = Duration::from_millis(500);
const RENEW_EVERY: Duration = Duration::from_millis(500);
/// How long the end of a run waits for the projector to reach the log's head.
const PROJECTOR_CATCH_UP: Duration = Duration::from_secs(5);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What the parts of a run share.
struct Shared {
    plan: Plan,
    trace: Arc<crate::trace::Trace>,
    durable: Arc<Durable>,
    hot: Arc<Hot>,
    registry: Registry,
    /// The live orchestrator's handle; `None` while it is down.
    current: Mutex<Option<Handle>>,
    acks: Mutex<Vec<Ack>>,
    /// Workflows the operator may have left paused (suspended or interrupted, no resume that
    /// succeeded): out of the liveness check.
    paused: Mutex<BTreeSet<WorkflowId>>,
    /// Starts of orchestrators that failed (recovery's append met a fault).
    failed_starts: Mutex<u64>,
}

impl Shared {
    fn handle(&self) -> Option<Handle> {
        lock(&self.current).clone()
    }

    fn ack(&self, wf: WorkflowId, node: u32, op: AckOp) {
        lock(&self.acks).push(Ack { wf, node, op });
    }

    /// The workflow's state folded from the durable log.
    fn folded(&self, wf: WorkflowId) -> Option<Workflow> {
        let events = self.durable.log.read_stream(wf, 1).ok()?;
        Workflow::replay(wf, events).ok()
    }
}

struct Orch {
    engine: Engine,
    view: Arc<LogView>,
    stop: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

struct WorkerProc {
    task: JoinHandle<()>,
    shutdown: CancellationToken,
}

/// The orchestrator's wall clock: virtual time since the run began, from a fixed epoch, so the
/// events' timestamps (and the retry timers and deletion windows computed on them) replay.
const EPOCH_US: i64 = 1_767_225_600_000_000; // 2026-01-01T00:00:00Z

fn engine_config(plan: &Plan, trace: &Arc<crate::trace::Trace>) -> Config {
    let trace = trace.clone();
    Config {
        clock: Clock::from_fn(move || Timestamp::from_micros(EPOCH_US + trace.now_us() as i64)),
        dispatch: Dispatch::Remote {
            window: plan.window,
        },
        grace: GRACE,
        principal: "sim-operator".into(),
        worker_id: "sim-orchestrator".into(),
        deletion_ttl: Duration::from_millis(plan.deletion_ttl_ms),
        // The in-memory log neither compacts nor redacts; the jobs would only add threads.
        compact_after: None,
        compact_history: None,
        redact_canceled: false,
        ..Config::default()
    }
}

async fn start_orch(sh: &Arc<Shared>) -> Result<Orch, Failure> {
    for _ in 0..START_TRIES_MAX {
        let view = LogView::new(sh.durable.clone());
        let log: Arc<dyn EventLog> = view.clone();
        match Engine::start(
            log.clone(),
            sh.registry.clone(),
            engine_config(&sh.plan, &sh.trace),
        )
        .await
        {
            Ok(engine) => {
                let stop = CancellationToken::new();
                let projector = Projector::new(sh.hot.clone(), log);
                let tasks = vec![
                    tokio::spawn(projector.run(stop.clone())),
                    tokio::spawn(intake(sh.clone(), engine.handle(), stop.clone())),
                ];
                *lock(&sh.current) = Some(engine.handle());
                return Ok(Orch {
                    engine,
                    view,
                    stop,
                    tasks,
                });
            }
            Err(e) => {
                tracing::info!(error = %e, "sim: orchestrator start failed; retrying");
                *lock(&sh.failed_starts) += 1;
                view.fence();
                tokio::time::sleep(START_RETRY).await;
            }
        }
    }
    Err(Failure::new(
        sh.plan.seed,
        Invariant::Liveness,
        format!("no orchestrator could start in {START_TRIES_MAX} tries"),
    ))
}

/// kill -9: nothing more of it reaches the log; its engine is told to stop and forgotten.
fn crash(sh: &Shared, orch: Orch) {
    *lock(&sh.current) = None;
    orch.view.fence();
    orch.stop.cancel();
    for t in &orch.tasks {
        t.abort();
    }
    let h = orch.engine.handle();
    tokio::spawn(async move { h.request_shutdown().await });
    drop(orch.engine);
}

async fn shutdown(sh: &Shared, orch: Orch) {
    *lock(&sh.current) = None;
    orch.stop.cancel();
    for t in orch.tasks {
        let _ = t.await;
    }
    if tokio::time::timeout(SHUTDOWN_MAX, orch.engine.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("sim: the engine did not shut down in time");
    }
}

fn start_worker(sh: &Arc<Shared>, i: usize, incarnation: u32) -> WorkerProc {
    let w = &sh.plan.workers[i];
    let id = format!("w{i}.{incarnation}");
    let source = Arc::new(WorkerSource {
        hot: sh.hot.clone(),
        worker: id.clone(),
        skew_ms: w.skew_ms,
    });
    let stops = sh.hot.subscribe_stops();
    let shutdown = CancellationToken::new();
    let config = WorkerConfig {
        worker_id: id,
        concurrency: w.concurrency,
        grace: GRACE,
        renew_every: RENEW_EVERY,
    };
    let task = tokio::spawn(run_worker(
        source,
        Arc::new(sh.registry.clone()),
        config,
        stops,
        shutdown.clone(),
        Arc::new(WorkerStats::default()),
    ));
    WorkerProc { task, shutdown }
}

/// The orchestrator's report intake, as `crates/mageflow-cluster` runs it: reports become engine
/// commands; they are trimmed only once a barrier proved their effects durable.
async fn intake(sh: Arc<Shared>, h: Handle, stop: CancellationToken) {
    let mut after = 0;
    while !stop.is_cancelled() {
        let reports = sh.hot.reports_after(after, INTAKE_BATCH, INTAKE_WAIT).await;
        if stop.is_cancelled() {
            return;
        }
        let Some((last_id, last_wf)) = reports.last().map(|(id, r)| (*id, r.sig.workflow)) else {
            continue;
        };
        let failures = h.stats().append_failures.load(Ordering::Acquire);
        for (id, r) in reports {
            // As the real intake does (`mageflow::auth::check_lease`): only the holder of the
            // attempt's lease is heard.
            if sh.hot.lease((r.sig, r.attempt)).as_deref() != Some(r.lease.as_str()) {
                if matches!(r.kind, ReportKind::Checkpoint(_)) {
                    sh.hot.answer(id, false);
                }
                continue;
            }
            let sent = match r.kind {
                ReportKind::Succeeded(v) => h.report(r.sig, r.attempt, Ok(v)).await,
                ReportKind::Failed(f) => h.report(r.sig, r.attempt, Err(f)).await,
                ReportKind::Stopped => h.report_stopped(r.sig, r.attempt).await,
                ReportKind::Abandoned => match h.report_abandoned(r.sig, r.attempt).await {
                    Err(Error::ShutDown) => return,
                    _ => Ok(()),
                },
                ReportKind::Checkpoint(data) => {
                    match h.checkpoint(r.sig, r.attempt, data.clone()).await {
                        Err(Error::ShutDown) => return,
                        Ok(()) => {
                            sh.ack(
                                r.sig.workflow,
                                r.sig.index,
                                AckOp::Checkpoint {
                                    attempt: r.attempt,
                                    data,
                                },
                            );
                            sh.hot.answer(id, true);
                        }
                        Err(_) => sh.hot.answer(id, false),
                    }
                    Ok(())
                }
            };
            if sent.is_err() {
                return;
            }
        }
        let barrier = h.inspect(last_wf, |_| ()).await;
        if let Err(Error::ShutDown) = barrier {
            return;
        }
        let failed = h.stats().append_failures.load(Ordering::Acquire) != failures;
        if barrier.is_err() || failed {
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(INTAKE_BACKOFF) => {}
            }
            continue;
        }
        sh.hot.trim_reports(last_id);
        after = last_id;
    }
}

fn transient(e: &Error) -> bool {
    matches!(e, Error::ShutDown | Error::Store(_) | Error::Hot(_))
}

enum CallOutcome {
    Ok,
    Refused,
    /// Transient errors until the tries ran out: it may or may not have been done.
    Unknown,
}

/// A control command, retried through transient errors; `Ok` answers are recorded as acks.
async fn control(
    sh: &Shared,
    wf: WorkflowId,
    node: u32,
    op: AckOp,
    end: &CancellationToken,
) -> CallOutcome {
    let sig = SignatureId {
        workflow: wf,
        index: node,
    };
    for _ in 0..CONTROL_TRIES_MAX {
        if end.is_cancelled() {
            break;
        }
        let Some(h) = sh.handle() else {
            tokio::time::sleep(OPERATOR_RETRY).await;
            continue;
        };
        let res = match &op {
            AckOp::Suspend => h.suspend(sig).await,
            AckOp::Resume => h.resume(sig).await,
            AckOp::Interrupt => h.interrupt(sig).await,
            AckOp::Cancel => h.cancel(sig, true).await,
            AckOp::Delete => h.delete(wf).await.map(drop),
            AckOp::Restore => h.restore(wf).await,
            AckOp::Rerun => h.rerun(wf).await,
            AckOp::Submitted | AckOp::Checkpoint { .. } => return CallOutcome::Refused,
        };
        match res {
            Ok(()) => {
                sh.trace
                    .note(Some(wf), format!("operator: {op:?} of node {node}: ok"));
                sh.ack(wf, node, op);
                return CallOutcome::Ok;
            }
            Err(e) if transient(&e) => tokio::time::sleep(OPERATOR_RETRY).await,
            Err(e) => {
                sh.trace
                    .note(Some(wf), format!("operator: {op:?} of node {node}: {e}"));
                return CallOutcome::Refused;
            }
        }
    }
    CallOutcome::Unknown
}

/// Wait until the workflow is finished in the log (or the run ends).
async fn finished(sh: &Shared, wf: WorkflowId, end: &CancellationToken) -> bool {
    while !end.is_cancelled() {
        if sh.folded(wf).is_some_and(|w| w.exists() && w.is_finished()) {
            return true;
        }
        tokio::time::sleep(OPERATOR_POLL).await;
    }
    false
}

/// The operator's script for one workflow.
async fn operate(sh: Arc<Shared>, w: WorkflowPlan, t0: Instant, end: CancellationToken) {
    tokio::time::sleep_until(t0 + Duration::from_millis(w.submit_at_ms)).await;
    let sig = w.shape.sig();
    loop {
        if end.is_cancelled() {
            return;
        }
        let Some(h) = sh.handle() else {
            tokio::time::sleep(OPERATOR_RETRY).await;
            continue;
        };
        // Idempotent with the plan's id: a retry after a lost answer finds the workflow.
        match h.submit_idempotent(w.id, sig.clone(), json!({})).await {
            Ok(()) => {
                sh.ack(w.id, 0, AckOp::Submitted);
                break;
            }
            Err(e) if transient(&e) => tokio::time::sleep(OPERATOR_RETRY).await,
            Err(e) => {
                tracing::error!(wf = %w.id, error = %e, "sim operator: submit refused");
                return;
            }
        }
    }
    let submitted = Instant::now();
    match w.control {
        Control::None => {}
        Control::Suspend {
            node,
            at_ms,
            resume_after_ms,
        }
        | Control::Interrupt {
            node,
            at_ms,
            resume_after_ms,
        } => {
            let op = if matches!(w.control, Control::Suspend { .. }) {
                AckOp::Suspend
            } else {
                AckOp::Interrupt
            };
            tokio::time::sleep_until(submitted + Duration::from_millis(at_ms)).await;
            if matches!(
                control(&sh, w.id, node, op, &end).await,
                CallOutcome::Refused
            ) {
                return;
            }
            lock(&sh.paused).insert(w.id);
            if let Some(after) = resume_after_ms {
                tokio::time::sleep(Duration::from_millis(after)).await;
                if matches!(
                    control(&sh, w.id, node, AckOp::Resume, &end).await,
                    CallOutcome::Ok
                ) {
                    lock(&sh.paused).remove(&w.id);
                }
            }
        }
        Control::Cancel { node, at_ms } => {
            tokio::time::sleep_until(submitted + Duration::from_millis(at_ms)).await;
            control(&sh, w.id, node, AckOp::Cancel, &end).await;
        }
        Control::DeleteThen {
            rerun_after_ms,
            restore,
        } => {
            if !finished(&sh, w.id, &end).await {
                return;
            }
            if !matches!(
                control(&sh, w.id, 0, AckOp::Delete, &end).await,
                CallOutcome::Ok
            ) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(rerun_after_ms)).await;
            let op = if restore {
                AckOp::Restore
            } else {
                AckOp::Rerun
            };
            control(&sh, w.id, 0, op, &end).await;
        }
        Control::Rerun => {
            if finished(&sh, w.id, &end).await {
                control(&sh, w.id, 0, AckOp::Rerun, &end).await;
            }
        }
    }
}

enum Action {
    Fault(Fault),
    RestartOrch,
    RestartWorker(usize),
}

/// Run the plan; `Ok` with what was observed if every invariant held.
pub(crate) async fn run(plan: Plan) -> Result<Observed, Failure> {
    let seed = plan.seed;
    let trace = Arc::new(crate::trace::Trace::new());
    let sh = Arc::new(Shared {
        durable: Durable::new(seed, plan.rates.clone(), trace.clone()),
        hot: Hot::new(seed, plan.rates.clone(), trace.clone()),
        trace,
        registry: tasks::registry(),
        current: Mutex::new(None),
        acks: Mutex::default(),
        paused: Mutex::default(),
        failed_starts: Mutex::new(0),
        plan,
    });
    let t0 = Instant::now();
    let end = CancellationToken::new();
    let mut orch = Some(start_orch(&sh).await?);
    let mut workers: Vec<Option<WorkerProc>> = (0..sh.plan.workers.len())
        .map(|i| Some(start_worker(&sh, i, 0)))
        .collect();
    let mut incarnations = vec![0u32; workers.len()];
    let operators: Vec<JoinHandle<()>> = sh
        .plan
        .workflows
        .iter()
        .map(|w| tokio::spawn(operate(sh.clone(), w.clone(), t0, end.clone())))
        .collect();
    let mut observed = Observed::default();

    // The timed faults, and the restarts they cause, in time order (ties: in plan order).
    let mut agenda: BTreeMap<(u64, u64), Action> = BTreeMap::new();
    let mut n = 0u64;
    for f in &sh.plan.faults {
        agenda.insert((f.at_ms, n), Action::Fault(f.fault.clone()));
        n += 1;
    }
    let window_end = sh.plan.fault_window_ms;
    while let Some(((at, _), action)) = agenda.pop_first() {
        // After the window only restarts remain: they happen at once.
        let at = at.min(window_end);
        tokio::time::sleep_until(t0 + Duration::from_millis(at)).await;
        let what = match &action {
            Action::Fault(f) => format!("FAULT {f:?}"),
            Action::RestartOrch => "orchestrator restarts".into(),
            Action::RestartWorker(i) => format!("worker {i} restarts"),
        };
        sh.trace.note(None, what);
        match action {
            Action::Fault(Fault::Crash { down_ms, graceful }) => {
                let Some(o) = orch.take() else { continue };
                if graceful {
                    observed.shutdowns += 1;
                    shutdown(&sh, o).await;
                } else {
                    observed.crashes += 1;
                    crash(&sh, o);
                }
                agenda.insert((at + down_ms, n), Action::RestartOrch);
                n += 1;
            }
            Action::Fault(Fault::KillWorker { worker, down_ms }) => {
                let Some(w) = workers.get_mut(worker).and_then(Option::take) else {
                    continue;
                };
                observed.worker_kills += 1;
                w.task.abort();
                agenda.insert((at + down_ms, n), Action::RestartWorker(worker));
                n += 1;
            }
            Action::Fault(Fault::WipeHot) => sh.hot.wipe(),
            Action::RestartOrch => {
                if orch.is_none() {
                    orch = Some(start_orch(&sh).await?);
                }
            }
            Action::RestartWorker(i) => {
                if workers[i].is_none() {
                    incarnations[i] += 1;
                    workers[i] = Some(start_worker(&sh, i, incarnations[i]));
                }
            }
        }
    }
    tokio::time::sleep_until(t0 + Duration::from_millis(window_end)).await;
    sh.durable.stop_faults();
    sh.hot.stop_faults();
    if orch.is_none() {
        orch = Some(start_orch(&sh).await?);
    }

    // Settle: every workflow the operator did not leave paused must finish.
    let deadline = Instant::now() + Duration::from_millis(sh.plan.settle_ms);
    let mut unsettled;
    loop {
        unsettled = unsettled_workflows(&sh, &operators);
        if unsettled.is_empty() || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(SETTLE_POLL).await;
    }
    end.cancel();
    for op in &operators {
        op.abort();
    }
    observed.virtual_ms = t0.elapsed().as_millis() as u64;

    // Quiesce: the workers die and reports still on their way are dropped; then the projector
    // catches up with the log, and the engine answers for the final states.
    for w in workers.iter().flatten() {
        w.shutdown.cancel();
        w.task.abort();
    }
    sh.hot.freeze();
    let caught_up = Instant::now() + PROJECTOR_CATCH_UP;
    while sh.hot.position() != Some(sh.durable.log.head()) && Instant::now() < caught_up {
        tokio::time::sleep(OPERATOR_RETRY).await;
    }
    let jobs_left = sh.hot.jobs();
    let mut states = BTreeMap::new();
    if let Some(h) = sh.handle() {
        for w in &sh.plan.workflows {
            if let Ok(Ok(s)) = tokio::time::timeout(SHUTDOWN_MAX, h.workflow(w.id)).await {
                states.insert(w.id, s);
            }
        }
    }
    if let Some(o) = orch.take() {
        shutdown(&sh, o).await;
    }

    observed.fill(&sh.durable, &sh.hot, *lock(&sh.failed_starts));
    let paused = lock(&sh.paused).clone();
    let acks = lock(&sh.acks).clone();
    let ctx = check::Context {
        plan: &sh.plan,
        durable: &sh.durable,
        engine_states: &states,
        acks: &acks,
        paused: &paused,
        unsettled: &unsettled,
        jobs_left: &jobs_left,
        projector_apply_errors: sh.hot.stats.apply_errors.load(Ordering::Relaxed),
        appends_failed: sh.durable.stats.failed.load(Ordering::Relaxed),
    };
    check::all(&ctx, &mut observed).map_err(|mut f| {
        if let Some(w) = sh
            .plan
            .workflows
            .iter()
            .find(|w| f.detail.contains(&w.id.0.simple().to_string()))
        {
            f.history.push("trace (virtual time):".into());
            f.history.extend(sh.trace.about(w.id));
        }
        f
    })?;
    Ok(observed)
}

/// Workflows that should be finished and are not (or whose operator still has work to do).
fn unsettled_workflows(sh: &Shared, operators: &[JoinHandle<()>]) -> Vec<check::Unsettled> {
    let paused = lock(&sh.paused).clone();
    let mut out = Vec::new();
    for (w, op) in sh.plan.workflows.iter().zip(operators) {
        if paused.contains(&w.id) {
            continue;
        }
        match sh.folded(w.id) {
            Some(s) if s.exists() && s.is_finished() && op.is_finished() => {}
            Some(s) if s.exists() => {
                let open: Vec<String> = s
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| !n.status.is_terminal() || n.in_flight)
                    .map(|(i, n)| {
                        format!(
                            "{i}:{}{}",
                            n.status,
                            if n.in_flight { "(in flight)" } else { "" }
                        )
                    })
                    .collect();
                let why = if s.is_finished() {
                    "finished, operator still busy".to_owned()
                } else {
                    format!("open nodes {}", open.join(" "))
                };
                let queued_idle = s
                    .nodes
                    .iter()
                    .any(|n| n.status == mageflow_core::Status::Queued && !n.in_flight);
                out.push(check::Unsettled {
                    wf: w.id,
                    why,
                    queued_idle,
                });
            }
            _ => out.push(check::Unsettled {
                wf: w.id,
                why: "never created".into(),
                queued_idle: false,
            }),
        }
    }
    out
}
