//! The simulated hot tier: what Redis holds in a deployment (the projected position, the job
//! queue with visibility timeouts, the reports stream, answers to checkpoints, the stop
//! channel), in process and on virtual time, plus the [`Projector`] that is its only writer of
//! jobs, and each worker's view of it ([`WorkerSource`], the engine's `JobSource`).
//!
//! It follows `crates/mageflow-hot` (`hot.rs`, `projector.rs`): a `started` event makes a job;
//! an event that ends or revokes the attempt removes it (revoking ones also publish a stop); a
//! claimed job is hidden for the lease and reappears unless its worker renews it; a report that
//! ends an attempt removes its job in the same step; a wiped tier is rebuilt by the projector
//! from position 1, with a job for every attempt still in flight. It must stay a projection:
//! nothing here decides anything about a workflow.
//!
//! Every claim hands out a lease token (as the claim script does in Redis); heartbeats and
//! reports name it and count only while it holds the job, and the intake checks it again
//! against [`Hot::lease`] before a report counts.
//!
//! Faults injected here (per call, each from its own stream of the seed): a report lost (its job
//! stays, so it runs again after the lease), duplicated or delayed; a heartbeat that errors.
//! A worker's clock may be skewed: its claims and renewals compute the lease on its own clock.

use crate::plan::Rates;
use crate::rng::Rng;
use crate::trace::Trace;
use mageflow_core::{Effect, SignatureId, Workflow, WorkflowId};
use mageflow_engine::control::ControlOp;
use mageflow_engine::worker::{Claim, Job, JobSource, Outcome};
use mageflow_engine::{Error as EngineError, Sig, TaskFailure};
use mageflow_store::{BoxFuture, EventLog};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_util::sync::CancellationToken;

/// How long a claimed job stays hidden without a renewal (virtual).
pub const LEASE: Duration = Duration::from_millis(2_000);
/// Events the projector folds per step.
const PROJECT_BATCH: usize = 256;
/// How often an idle projector checks that its position is still there (a wipe).
const PROJECTOR_IDLE_CHECK: Duration = Duration::from_millis(200);
/// How long a worker's `save_checkpoint` waits for the orchestrator's answer.
const CHECKPOINT_ANSWER_WAIT: Duration = Duration::from_secs(30);

type Key = (SignatureId, u32);

/// What a worker reported.
#[derive(Clone, Debug)]
pub enum ReportKind {
    Succeeded(Value),
    Failed(TaskFailure),
    Stopped,
    Abandoned,
    Checkpoint(Value),
}

#[derive(Clone, Debug)]
pub struct Report {
    pub worker: String,
    pub sig: SignatureId,
    pub attempt: u32,
    /// The lease token of the claim it reports on.
    pub lease: String,
    pub kind: ReportKind,
}

impl Report {
    fn ends_attempt(&self) -> bool {
        !matches!(self.kind, ReportKind::Checkpoint(_))
    }
}

/// The one place the engine's `Outcome` is read: another change adds variants to it (an
/// abandoned attempt); a merge touches only this function.
fn report_kind(outcome: Outcome) -> ReportKind {
    match outcome {
        Outcome::Succeeded(v) => ReportKind::Succeeded(v),
        Outcome::Failed(f) => ReportKind::Failed(f),
        Outcome::Stopped => ReportKind::Stopped,
        Outcome::Abandoned => ReportKind::Abandoned,
    }
}

/// The one place a `Job` is built.
fn job(key: Key, entry: &JobEntry, lease: String) -> Job {
    Job {
        sig: key.0,
        attempt: key.1,
        task: entry.task.clone(),
        input: entry.input.clone(),
        checkpoint: entry.checkpoint.clone(),
        lease,
    }
}

struct JobEntry {
    task: String,
    input: Value,
    checkpoint: Option<Value>,
    /// Hidden until then (hot-tier ms; a claim sets it on the claimer's clock).
    visible_at_ms: i64,
}

#[derive(Default)]
struct State {
    /// Last projected position; `None` after a wipe (and before the first batch).
    pos: Option<u64>,
    jobs: BTreeMap<Key, JobEntry>,
    /// The lease token of each job's latest claim; removed when the attempt's end is projected
    /// (not by the report that ends it: the intake checks it after).
    leases: BTreeMap<Key, String>,
    /// Claims handed out so far (lease tokens are `<worker>.<n>`: unique, deterministic).
    claims: u64,
    reports: BTreeMap<u64, Report>,
    /// Report ids keep growing across wipes, as Redis stream ids (time-based) do.
    next_report: u64,
    answers: BTreeMap<u64, oneshot::Sender<bool>>,
    /// Subscribers of the stop channel (connections, not data: a wipe keeps them).
    stops: Vec<mpsc::UnboundedSender<Key>>,
}

/// What the hot tier's faults and projector did.
#[derive(Debug, Default)]
pub struct HotStats {
    pub wipes: AtomicU64,
    pub rebuilds: AtomicU64,
    pub jobs_added: AtomicU64,
    pub claimed: AtomicU64,
    pub reports: AtomicU64,
    pub reports_lost: AtomicU64,
    pub reports_duplicated: AtomicU64,
    pub reports_delayed: AtomicU64,
    pub heartbeat_errors: AtomicU64,
    /// Events the projector could not apply (a bug somewhere: the log is the engine's).
    pub apply_errors: AtomicU64,
}

pub struct Hot {
    state: Mutex<State>,
    jobs_added: Notify,
    reports_added: Notify,
    start: tokio::time::Instant,
    seed: u64,
    rates: Rates,
    faults_on: AtomicBool,
    frozen: AtomicBool,
    report_calls: AtomicU64,
    heartbeat_calls: AtomicU64,
    pub stats: HotStats,
    pub trace: Arc<Trace>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every update is a few map operations with no await inside: a poisoned lock still holds
    // consistent data.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn hot_err(what: &str) -> EngineError {
    EngineError::Hot(format!("simulated hot tier: {what}"))
}

impl Hot {
    pub fn new(seed: u64, rates: Rates, trace: Arc<Trace>) -> Arc<Self> {
        Arc::new(Self {
            trace,
            state: Mutex::default(),
            jobs_added: Notify::new(),
            reports_added: Notify::new(),
            start: tokio::time::Instant::now(),
            seed,
            rates,
            faults_on: AtomicBool::new(true),
            frozen: AtomicBool::new(false),
            report_calls: AtomicU64::new(0),
            heartbeat_calls: AtomicU64::new(0),
            stats: HotStats::default(),
        })
    }

    /// The hot tier's clock (virtual ms since the run began).
    fn now_ms(&self) -> i64 {
        self.start.elapsed().as_millis() as i64
    }

    pub fn stop_faults(&self) {
        self.faults_on.store(false, Ordering::SeqCst);
    }

    /// FLUSHALL: everything goes (reports and answers too); subscriptions stay.
    pub fn wipe(&self) {
        let mut st = lock(&self.state);
        st.pos = None;
        st.jobs.clear();
        st.leases.clear();
        st.reports.clear();
        st.answers.clear();
        self.stats.wipes.fetch_add(1, Ordering::Relaxed);
        self.trace.note(None, "FAULT hot tier wiped");
    }

    pub fn subscribe_stops(&self) -> mpsc::UnboundedReceiver<Key> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.state).stops.push(tx);
        rx
    }

    /// The last projected position (`None`: wiped, not rebuilt yet).
    pub fn position(&self) -> Option<u64> {
        lock(&self.state).pos
    }

    /// Jobs left in the queue (for the end-of-run checks).
    pub fn jobs(&self) -> Vec<Key> {
        lock(&self.state).jobs.keys().copied().collect()
    }

    /// The lease token that holds job `key` now, if any (what the intake checks a report by).
    pub fn lease(&self, key: Key) -> Option<String> {
        lock(&self.state).leases.get(&key).cloned()
    }

    /// The end of a run: reports still on their way (delayed, duplicated) are dropped.
    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    fn deliver(&self, report: Report, answer: Option<oneshot::Sender<bool>>) {
        if self.frozen.load(Ordering::SeqCst) {
            return;
        }
        self.trace.note(
            Some(report.sig.workflow),
            format!(
                "hot: report of {} attempt {} by {} delivered: {}",
                report.sig.index,
                report.attempt,
                report.worker,
                short(&report.kind)
            ),
        );
        let mut st = lock(&self.state);
        let key = (report.sig, report.attempt);
        // The report script: a report whose lease no longer holds the job is dropped.
        if st.leases.get(&key) != Some(&report.lease) {
            drop(st);
            self.trace.note(
                Some(report.sig.workflow),
                format!(
                    "hot: report of {} attempt {} by {} dropped: lease lost",
                    report.sig.index, report.attempt, report.worker
                ),
            );
            return;
        }
        if report.ends_attempt() {
            st.jobs.remove(&key);
        }
        st.next_report += 1;
        let id = st.next_report;
        st.reports.insert(id, report);
        if let Some(a) = answer {
            st.answers.insert(id, a);
        }
        drop(st);
        self.stats.reports.fetch_add(1, Ordering::Relaxed);
        self.reports_added.notify_waiters();
    }

    /// A worker sends a report, through the faults of the plan.
    fn send_report(self: &Arc<Self>, report: Report, answer: Option<oneshot::Sender<bool>>) {
        let k = self.report_calls.fetch_add(1, Ordering::Relaxed);
        if !self.faults_on.load(Ordering::SeqCst) {
            return self.deliver(report, answer);
        }
        let mut rng = Rng::stream(self.seed, "report", k);
        let r = &self.rates;
        if rng.chance(r.report_lost) {
            // Lost with its effect (a failover dropped the last writes): the job stays claimed
            // and comes back after its lease.
            self.stats.reports_lost.fetch_add(1, Ordering::Relaxed);
            self.trace.note(
                Some(report.sig.workflow),
                format!(
                    "FAULT report of {} attempt {} by {} lost: {}",
                    report.sig.index,
                    report.attempt,
                    report.worker,
                    short(&report.kind)
                ),
            );
            return;
        }
        let delay = rng
            .chance(r.report_delayed)
            .then(|| Duration::from_millis(rng.range(1, r.report_delay_ms_max)));
        let duplicate = rng
            .chance(r.report_duplicated)
            .then(|| Duration::from_millis(rng.range(0, r.report_delay_ms_max)));
        if let Some(after) = duplicate {
            self.stats
                .reports_duplicated
                .fetch_add(1, Ordering::Relaxed);
            let (hot, copy) = (self.clone(), report.clone());
            tokio::spawn(async move {
                tokio::time::sleep(after).await;
                hot.deliver(copy, None);
            });
        }
        match delay {
            Some(after) => {
                self.stats.reports_delayed.fetch_add(1, Ordering::Relaxed);
                let hot = self.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    hot.deliver(report, answer);
                });
            }
            None => self.deliver(report, answer),
        }
    }

    /// Reports after `after` (the intake's cursor), oldest first; waits up to `wait` for one.
    pub async fn reports_after(
        &self,
        after: u64,
        max: usize,
        wait: Duration,
    ) -> Vec<(u64, Report)> {
        let notified = self.reports_added.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let take = |st: &State| -> Vec<(u64, Report)> {
            st.reports
                .range(after + 1..)
                .take(max)
                .map(|(id, r)| (*id, r.clone()))
                .collect()
        };
        let first = take(&lock(&self.state));
        if !first.is_empty() {
            return first;
        }
        let _ = tokio::time::timeout(wait, notified).await;
        take(&lock(&self.state))
    }

    /// Drop reports up to `upto`: everything they caused is durable.
    pub fn trim_reports(&self, upto: u64) {
        let mut st = lock(&self.state);
        let keep = st.reports.split_off(&(upto + 1));
        st.reports = keep;
    }

    /// The orchestrator's answer to a checkpoint report.
    pub fn answer(&self, id: u64, durable: bool) {
        if let Some(tx) = lock(&self.state).answers.remove(&id) {
            let _ = tx.send(durable);
        }
    }
}

/// One worker process's connection to the hot tier.
pub struct WorkerSource {
    pub hot: Arc<Hot>,
    pub worker: String,
    pub skew_ms: i64,
}

impl WorkerSource {
    fn now_ms(&self) -> i64 {
        self.hot.now_ms() + self.skew_ms
    }

    fn claim_now(&self, max: usize) -> Vec<Job> {
        let now = self.now_ms();
        let until = now + LEASE.as_millis() as i64;
        let mut st = lock(&self.hot.state);
        let mut due: Vec<(i64, Key)> = st
            .jobs
            .iter()
            .filter(|(_, j)| j.visible_at_ms <= now)
            .map(|(k, j)| (j.visible_at_ms, *k))
            .collect();
        due.sort_unstable();
        due.truncate(max);
        let mut out = Vec::with_capacity(due.len());
        for (_, key) in due {
            st.claims += 1;
            let lease = format!("{}.{}", self.worker, st.claims);
            st.leases.insert(key, lease.clone());
            if let Some(entry) = st.jobs.get_mut(&key) {
                self.hot.trace.note(
                    Some(key.0.workflow),
                    format!(
                        "hot: {} claims {} attempt {}",
                        self.worker, key.0.index, key.1
                    ),
                );
                entry.visible_at_ms = until;
                out.push(job(key, entry, lease));
            }
        }
        self.hot
            .stats
            .claimed
            .fetch_add(out.len() as u64, Ordering::Relaxed);
        out
    }
}

impl JobSource for WorkerSource {
    fn claim(
        &self,
        _worker: &str,
        max: usize,
        wait: Option<Duration>,
    ) -> BoxFuture<'static, mageflow_engine::Result<Vec<Job>>> {
        let now = self.claim_now(max);
        if !now.is_empty() || wait.is_none() {
            return Box::pin(async move { Ok(now) });
        }
        let again = WorkerSource {
            hot: self.hot.clone(),
            worker: self.worker.clone(),
            skew_ms: self.skew_ms,
        };
        Box::pin(async move {
            {
                let notified = again.hot.jobs_added.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(wait) = wait {
                    let _ = tokio::time::timeout(wait, notified).await;
                }
            }
            Ok(again.claim_now(max))
        })
    }

    fn heartbeat(&self, claim: &Claim) -> BoxFuture<'static, mageflow_engine::Result<bool>> {
        let (sig, attempt) = (claim.sig, claim.attempt);
        let hot = &self.hot;
        let k = hot.heartbeat_calls.fetch_add(1, Ordering::Relaxed);
        let failed = hot.faults_on.load(Ordering::SeqCst)
            && Rng::stream(hot.seed, "heartbeat", k).chance(hot.rates.heartbeat_error);
        if failed {
            hot.stats.heartbeat_errors.fetch_add(1, Ordering::Relaxed);
            return Box::pin(async { Err(hot_err("heartbeat: connection reset")) });
        }
        let until = self.now_ms() + LEASE.as_millis() as i64;
        let mut st = lock(&hot.state);
        let held = st.leases.get(&(sig, attempt)) == Some(&claim.lease);
        let alive = match st.jobs.get_mut(&(sig, attempt)) {
            Some(entry) if held => {
                entry.visible_at_ms = until;
                true
            }
            _ => false,
        };
        drop(st);
        if !alive {
            hot.trace.note(
                Some(sig.workflow),
                format!(
                    "hot: heartbeat of {} attempt {attempt} by {}: job gone",
                    sig.index, self.worker
                ),
            );
        }
        Box::pin(async move { Ok(alive) })
    }

    fn report(
        &self,
        worker: &str,
        claim: &Claim,
        outcome: Outcome,
    ) -> BoxFuture<'static, mageflow_engine::Result<()>> {
        self.hot.send_report(
            Report {
                worker: worker.to_owned(),
                sig: claim.sig,
                attempt: claim.attempt,
                lease: claim.lease.clone(),
                kind: report_kind(outcome),
            },
            None,
        );
        Box::pin(async { Ok(()) })
    }

    fn checkpoint(
        &self,
        claim: &Claim,
        data: Value,
    ) -> BoxFuture<'static, mageflow_engine::Result<()>> {
        let (tx, rx) = oneshot::channel();
        self.hot.send_report(
            Report {
                worker: self.worker.clone(),
                sig: claim.sig,
                attempt: claim.attempt,
                lease: claim.lease.clone(),
                kind: ReportKind::Checkpoint(data),
            },
            Some(tx),
        );
        Box::pin(async move {
            match tokio::time::timeout(CHECKPOINT_ANSWER_WAIT, rx).await {
                Ok(Ok(true)) => Ok(()),
                Ok(Ok(false)) => Err(hot_err("checkpoint refused: the attempt is not current")),
                Ok(Err(_)) => Err(hot_err("checkpoint answer lost")),
                Err(_) => Err(hot_err("no answer to the checkpoint")),
            }
        })
    }

    fn submit(
        &self,
        _claim: &Claim,
        _id: WorkflowId,
        _tree: Sig,
        _input: Value,
    ) -> BoxFuture<'static, mageflow_engine::Result<()>> {
        Box::pin(async { Err(hot_err("submits from handlers are not simulated")) })
    }

    fn control(
        &self,
        _claim: &Claim,
        _principal: &str,
        _op: ControlOp,
        _target: SignatureId,
        _confirmed: bool,
    ) -> BoxFuture<'static, mageflow_engine::Result<String>> {
        Box::pin(async { Err(hot_err("control from handlers is not simulated")) })
    }
}

/// Tails the log into the hot tier (the only writer of jobs). Runs in the orchestrator's
/// process: a crash stops it, and the next one continues from the tier's position.
pub struct Projector {
    hot: Arc<Hot>,
    log: Arc<dyn EventLog>,
    /// Unfinished workflows as projected (finished ones are dropped, reloaded if touched).
    wfs: BTreeMap<WorkflowId, Workflow>,
    pos: u64,
}

impl Projector {
    pub fn new(hot: Arc<Hot>, log: Arc<dyn EventLog>) -> Self {
        Self {
            hot,
            log,
            wfs: BTreeMap::new(),
            pos: 0,
        }
    }

    pub async fn run(mut self, stop: CancellationToken) {
        let mut head = self.log.subscribe();
        loop {
            if stop.is_cancelled() {
                return;
            }
            let progressed = match self.step() {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %e, "sim projector: log read failed");
                    false
                }
            };
            if progressed {
                continue;
            }
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                changed = head.changed() => {
                    if changed.is_err() {
                        tokio::time::sleep(PROJECTOR_IDLE_CHECK).await;
                    }
                }
                _ = tokio::time::sleep(PROJECTOR_IDLE_CHECK) => {}
            }
        }
    }

    /// One batch, atomically with the position check (everything here is synchronous, under the
    /// tier's lock: a MULTI/EXEC with its WATCH). `Ok(false)`: nothing new.
    fn step(&mut self) -> mageflow_store::Result<bool> {
        let hot = self.hot.clone();
        let mut st = lock(&hot.state);
        match st.pos {
            None if self.pos == 0 && self.wfs.is_empty() => {}
            None => {
                // Wiped: rebuild from position 1.
                hot.trace
                    .note(None, "hot: projector rebuilds from position 1");
                self.wfs.clear();
                self.pos = 0;
                hot.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
            }
            Some(p) if p == self.pos => {}
            Some(p) if p > self.log.head() => {
                st.jobs.clear();
                st.pos = None;
                self.wfs.clear();
                self.pos = 0;
                hot.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
            }
            Some(p) => self.refold(p)?,
        }
        let events = self.log.read_all(self.pos + 1, PROJECT_BATCH)?;
        let Some(last) = events.last().map(|r| r.position) else {
            return Ok(false);
        };
        let now = hot.now_ms();
        let mut stops = Vec::new();
        let mut added = 0u64;
        for rec in events {
            self.project(&mut st, rec.event, now, &mut stops, &mut added)?;
        }
        hot.trace.note(
            None,
            format!("hot: projected positions {}..={last}", self.pos + 1),
        );
        st.pos = Some(last);
        self.pos = last;
        let subscribers = st.stops.clone();
        drop(st);
        for key in stops {
            hot.trace.note(
                Some(key.0.workflow),
                format!("hot: stop published for {} attempt {}", key.0.index, key.1),
            );
            for s in &subscribers {
                let _ = s.send(key);
            }
        }
        if added > 0 {
            hot.stats.jobs_added.fetch_add(added, Ordering::Relaxed);
            hot.jobs_added.notify_waiters();
        }
        Ok(true)
    }

    fn project(
        &mut self,
        st: &mut State,
        event: mageflow_core::Event,
        now: i64,
        stops: &mut Vec<Key>,
        added: &mut u64,
    ) -> mageflow_store::Result<()> {
        let id = event.stream;
        if id.is_system() {
            return Ok(());
        }
        let reload = self.wfs.get(&id).is_none_or(|w| w.version + 1 != event.seq);
        if reload {
            let wf = load_until(&*self.log, id, event.seq)?;
            // Attempts in flight that this projector never saw start (a rebuild): queue their
            // jobs unless the queue has them already.
            for (i, n) in wf.nodes.iter().enumerate() {
                if n.in_flight {
                    *added += u64::from(add_job(st, &wf, i as u32, n.attempt, now, true));
                }
            }
            self.wfs.insert(id, wf);
        }
        let Some(wf) = self.wfs.get_mut(&id) else {
            return Ok(());
        };
        let node = event.payload.node();
        let before = node
            .and_then(|i| wf.node(i))
            .map(|n| (n.in_flight, n.attempt));
        let (revoke, started) = Effect::for_workers(&event);
        if let Err(e) = wf.apply_owned(event) {
            tracing::warn!(workflow = %id, error = %e, "sim projector: event does not apply");
            self.hot.stats.apply_errors.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        }
        if let (Some(i), Some((true, old))) = (node, before) {
            if let Some(after) = wf.node(i) {
                if !after.in_flight || after.attempt != old {
                    let key = (wf.sig(i), old);
                    st.jobs.remove(&key);
                    st.leases.remove(&key);
                    if revoke {
                        stops.push(key);
                    }
                }
            }
        }
        if let (Some(i), Some(attempt)) = (node, started) {
            *added += u64::from(add_job(st, wf, i, attempt, now, false));
        }
        if wf.is_finished() {
            self.wfs.remove(&id);
        }
        Ok(())
    }

    /// The in-memory states as of position `to` (a restarted projector), without writing jobs.
    fn refold(&mut self, to: u64) -> mageflow_store::Result<()> {
        self.wfs.clear();
        let mut next = 1;
        while next <= to {
            let chunk = self
                .log
                .read_all(next, PROJECT_BATCH.min((to - next + 1) as usize))?;
            if chunk.is_empty() {
                break;
            }
            for rec in chunk {
                next = rec.position + 1;
                let id = rec.event.stream;
                if id.is_system() {
                    continue;
                }
                let stale = self
                    .wfs
                    .get(&id)
                    .is_none_or(|w| w.version + 1 != rec.event.seq);
                if stale {
                    let wf = load_until(&*self.log, id, rec.event.seq)?;
                    self.wfs.insert(id, wf);
                }
                if let Some(wf) = self.wfs.get_mut(&id) {
                    if wf.apply_owned(rec.event).is_err() {
                        self.hot.stats.apply_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    if wf.is_finished() {
                        self.wfs.remove(&id);
                    }
                }
            }
        }
        self.pos = to;
        Ok(())
    }
}

fn short(kind: &ReportKind) -> String {
    match kind {
        ReportKind::Succeeded(_) => "succeeded".into(),
        ReportKind::Failed(f) => format!("failed \"{}\"", f.message),
        ReportKind::Stopped => "stopped".into(),
        ReportKind::Abandoned => "abandoned".into(),
        ReportKind::Checkpoint(d) => format!("checkpoint {d}"),
    }
}

/// Queue the job of `attempt` of node `i`; `if_absent`: keep one already there (claimed, say).
/// Returns whether a job was added.
fn add_job(st: &mut State, wf: &Workflow, i: u32, attempt: u32, now: i64, if_absent: bool) -> bool {
    let Some(node) = wf.node(i) else {
        return false;
    };
    let key = (wf.sig(i), attempt);
    if if_absent && st.jobs.contains_key(&key) {
        return false;
    }
    st.jobs.insert(
        key,
        JobEntry {
            task: node.spec.task_name().unwrap_or_default().to_owned(),
            input: wf.effective_input(i),
            checkpoint: node.checkpoint.clone(),
            visible_at_ms: now,
        },
    );
    true
}

/// The state of `id` just before its event `seq`.
fn load_until(log: &dyn EventLog, id: WorkflowId, seq: u64) -> mageflow_store::Result<Workflow> {
    let mut wf = Workflow::empty(id);
    if seq <= 1 {
        return Ok(wf);
    }
    for event in log.read_stream(id, 1)? {
        if event.seq >= seq {
            break;
        }
        if let Err(e) = wf.apply_owned(event) {
            tracing::warn!(workflow = %id, error = %e, "sim projector: event does not apply while reloading");
        }
    }
    Ok(wf)
}
