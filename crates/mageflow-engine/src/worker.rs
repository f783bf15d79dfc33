//! The runtime of a worker process: takes started attempts from a [`JobSource`] (the hot tier),
//! runs their handlers with bounded concurrency, keeps their leases alive, stops the ones that
//! are revoked, and reports every outcome back. The orchestrator (another process) turns reports
//! into events; a report of an attempt that is no longer current is a no-op there, so a job run
//! twice (a lease that expired under a slow worker, a rebuilt hot tier) is recorded once.
//!
//! A handler stopped by the system — its job gone or its lease held by another claim, its
//! checkpoint not taken by the hot tier — never fails its task: whatever the handler returns
//! once its token fired (a cancellation-aware handler returns an error), the attempt is
//! *abandoned* ([`Outcome::Abandoned`]) and runs again from its last checkpoint, spending no
//! retry. Only a user's interrupt or cancel (the attempt is revoked: nothing to report) or the
//! handler's own error ends it.

use crate::attempt::run_attempt;
use crate::context::{Backing, TaskContext, WorkerLink};
use crate::control::command::ControlOp;
use crate::det::Map;
use crate::error::{Error, Result};
use crate::registry::{Registry, TaskFailure};
use crate::sig::Sig;
use mageflow_core::{SignatureId, WorkflowId};
use mageflow_store::BoxFuture;
use serde_json::Value;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio_util::sync::CancellationToken;

/// Longest pause between two attempts to reach the job source after an error.
const SOURCE_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Jobs taken in one claim at most.
const CLAIM_BATCH_MAX: usize = 64;
/// How long an idle worker waits for a wake-up before looking for work again (jobs whose
/// lease expired become visible without one).
const IDLE_WAIT: Duration = Duration::from_millis(500);

/// A started attempt, as a worker receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct Job {
    pub sig: SignatureId,
    pub attempt: u32,
    pub task: String,
    pub input: Value,
    pub checkpoint: Option<Value>,
    /// The token of the lease this worker's claim holds the job under: its heartbeats and
    /// reports name it, and the job source accepts them only while it holds the job.
    pub lease: String,
}

/// A claimed attempt, as the job source's lease-guarded calls name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Claim {
    pub sig: SignatureId,
    pub attempt: u32,
    pub lease: String,
}

/// What a worker reports about an attempt.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Succeeded(Value),
    Failed(TaskFailure),
    /// The handler was stopped after its attempt was revoked; nothing to record.
    Stopped,
    /// The handler was stopped by the system (lease lost, hot tier unreachable for its
    /// checkpoint): the attempt is given up and runs again, spending no retry.
    Abandoned,
}

/// Where a worker process takes work from and reports to (the Redis hot tier in production).
/// Everything about a claimed job names its lease; a call whose lease no longer holds the job
/// fails with [`Error::LeaseLost`] and changes nothing.
pub trait JobSource: Send + Sync + 'static {
    /// Take up to `max` visible jobs and hide them from other workers for the lease period.
    /// With `wait`, first wait until work may be there (or `wait` passed): a worker that found
    /// nothing calls this, and the wait and the claim after it are one round trip.
    fn claim(
        &self,
        worker: &str,
        max: usize,
        wait: Option<Duration>,
    ) -> BoxFuture<'static, Result<Vec<Job>>>;
    /// Extend the lease of a claimed job. `Ok(false)`: the job is gone (revoked, wiped) or
    /// another claim holds it — stop the handler.
    fn heartbeat(&self, claim: &Claim) -> BoxFuture<'static, Result<bool>>;
    /// Report an attempt's outcome (and release its job).
    fn report(
        &self,
        worker: &str,
        claim: &Claim,
        outcome: Outcome,
    ) -> BoxFuture<'static, Result<()>>;
    /// Durably record a checkpoint of the claimed attempt ([`WorkerLink::checkpoint`]).
    fn checkpoint(&self, claim: &Claim, data: Value) -> BoxFuture<'static, Result<()>>;
    /// Create a workflow for the claimed attempt's handler ([`WorkerLink::submit`]).
    fn submit(
        &self,
        claim: &Claim,
        id: WorkflowId,
        tree: Sig,
        input: Value,
    ) -> BoxFuture<'static, Result<()>>;
    /// Carry out a control command for the claimed attempt's handler ([`WorkerLink::control`]).
    fn control(
        &self,
        claim: &Claim,
        principal: &str,
        op: ControlOp,
        target: SignatureId,
        confirmed: bool,
    ) -> BoxFuture<'static, Result<String>>;
}

#[derive(Clone, Debug)]
pub struct WorkerConfig {
    /// Recorded as the reporter of every outcome.
    pub worker_id: String,
    /// Handlers running at once.
    pub concurrency: usize,
    /// How long a revoked handler may run on after its token fired, and how long shutdown waits
    /// for running handlers before abandoning them (their jobs reappear after their lease).
    pub grace: Duration,
    /// How often a running job's lease is extended (well under the hot tier's lease).
    pub renew_every: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: format!("worker-{}", std::process::id()),
            concurrency: 64,
            grace: Duration::from_secs(5),
            renew_every: Duration::from_secs(5),
        }
    }
}

/// Counters of one worker runtime.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub claimed: AtomicU64,
    pub succeeded: AtomicU64,
    pub failed: AtomicU64,
    pub stopped: AtomicU64,
    /// Attempts given up because the system stopped their handler (they run again).
    pub abandoned: AtomicU64,
    pub source_errors: AtomicU64,
}

/// Why a running handler's token fired.
#[derive(Clone, Default)]
struct Stop {
    token: CancellationToken,
    /// `NOT_STOPPED`, `REVOKED` or `BY_SYSTEM`: the first reason to fire the token wins.
    why: Arc<AtomicU8>,
}

const NOT_STOPPED: u8 = 0;
/// The orchestrator revoked the attempt (interrupt, cancel, purge): nothing to report.
const REVOKED: u8 = 1;
/// The system took the attempt away from this worker: it is abandoned and runs again.
const BY_SYSTEM: u8 = 2;

impl Stop {
    fn fire(&self, why: u8) {
        let _ = self
            .why
            .compare_exchange(NOT_STOPPED, why, Ordering::AcqRel, Ordering::Acquire);
        self.token.cancel();
    }

    fn why(&self) -> u8 {
        self.why.load(Ordering::Acquire)
    }
}

type Tokens = Arc<Mutex<Map<(SignatureId, u32), Stop>>>;

fn tokens(t: &Tokens) -> std::sync::MutexGuard<'_, Map<(SignatureId, u32), Stop>> {
    // Inserts and removes only: a panic elsewhere cannot leave the map half-updated.
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Run handlers for jobs from `source` until `shutdown` fires; then take no more jobs, give the
/// running ones `grace` to finish, and abandon the rest. `stops` carries revoked attempts (the
/// hot tier's push channel): their handlers' tokens fire at once.
pub async fn run_worker(
    source: Arc<dyn JobSource>,
    registry: Arc<Registry>,
    config: WorkerConfig,
    mut stops: mpsc::UnboundedReceiver<(SignatureId, u32)>,
    shutdown: CancellationToken,
    stats: Arc<WorkerStats>,
) {
    let running: Tokens = Arc::default();
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let stopper = {
        let running = running.clone();
        tokio::spawn(async move {
            while let Some(key) = stops.recv().await {
                if let Some(t) = tokens(&running).get(&key) {
                    tracing::info!(sig = %key.0, attempt = key.1, "attempt revoked: stopping its handler");
                    t.fire(REVOKED);
                }
            }
        })
    };
    let mut backoff = Duration::from_millis(20);
    let mut idle = false;
    'claiming: loop {
        // One free slot at least, then every other free one (up to a batch): one round trip
        // claims a job for each.
        let mut permit = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let more = slots.available_permits().min(CLAIM_BATCH_MAX - 1) as u32;
        if more > 0 {
            if let Ok(extra) = slots.clone().try_acquire_many_owned(more) {
                permit.merge(extra);
            }
        }
        // After a claim that found nothing, the next one waits for a wake-up first. The slots
        // stay taken meanwhile: a handler that ends during the wait frees its slot for the
        // claim after this one (the wait ends at the next wake-up, `IDLE_WAIT` at most).
        let wait = idle.then_some(IDLE_WAIT);
        let claimed = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            c = source.claim(&config.worker_id, permit.num_permits(), wait) => c,
        };
        let jobs = match claimed {
            Ok(jobs) if !jobs.is_empty() => {
                backoff = Duration::from_millis(20);
                idle = false;
                jobs
            }
            Ok(_) => {
                idle = true;
                continue;
            }
            Err(e) => {
                drop(permit);
                source_error(&stats, "claim a job", &e, &mut backoff, &shutdown).await;
                continue;
            }
        };
        for job in jobs {
            // One slot per job; the unused rest goes back when `permit` drops.
            let Some(permit) = permit.split(1) else {
                break 'claiming;
            };
            spawn_job(
                &mut tasks, job, permit, &source, &registry, &config, &running, &stats,
            );
        }
        // Reap finished tasks so the set does not grow with every job.
        while tasks.try_join_next().is_some() {}
    }
    // Shutdown: no new jobs; running handlers get the grace period, then are abandoned (their
    // jobs reappear to other workers once their lease expires).
    let drained = tokio::time::timeout(config.grace, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            abandoned = tasks.len(),
            "grace period over: abandoning running handlers; their jobs go back after their lease"
        );
        tasks.abort_all();
    }
    stopper.abort();
}

#[allow(clippy::too_many_arguments)]
fn spawn_job(
    tasks: &mut tokio::task::JoinSet<()>,
    job: Job,
    permit: tokio::sync::OwnedSemaphorePermit,
    source: &Arc<dyn JobSource>,
    registry: &Arc<Registry>,
    config: &WorkerConfig,
    running: &Tokens,
    stats: &Arc<WorkerStats>,
) {
    stats.claimed.fetch_add(1, Ordering::Relaxed);
    let stop = Stop::default();
    tokens(running).insert((job.sig, job.attempt), stop.clone());
    let (source, registry, config, running, stats) = (
        source.clone(),
        registry.clone(),
        config.clone(),
        running.clone(),
        stats.clone(),
    );
    tasks.spawn(async move {
        let claim = Claim {
            sig: job.sig,
            attempt: job.attempt,
            lease: job.lease.clone(),
        };
        let outcome = run_job(&source, &registry, &config, job, stop).await;
        tokens(&running).remove(&(claim.sig, claim.attempt));
        match &outcome {
            Outcome::Succeeded(_) => &stats.succeeded,
            Outcome::Failed(_) => &stats.failed,
            Outcome::Stopped => &stats.stopped,
            Outcome::Abandoned => &stats.abandoned,
        }
        .fetch_add(1, Ordering::Relaxed);
        report(&source, &config.worker_id, &claim, outcome, &stats).await;
        drop(permit);
    });
}

async fn source_error(
    stats: &WorkerStats,
    what: &str,
    e: &crate::error::Error,
    backoff: &mut Duration,
    shutdown: &CancellationToken,
) {
    stats.source_errors.fetch_add(1, Ordering::Relaxed);
    tracing::warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "worker could not {what}; retrying");
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(*backoff) => {}
    }
    *backoff = (*backoff * 2).min(SOURCE_BACKOFF_MAX);
}

/// Run one job's handler while keeping its lease alive.
async fn run_job(
    source: &Arc<dyn JobSource>,
    registry: &Registry,
    config: &WorkerConfig,
    job: Job,
    stop: Stop,
) -> Outcome {
    let def = match registry.get(&job.task) {
        Ok(def) => def,
        Err(e) => return Outcome::Failed(TaskFailure::fatal(e.to_string())),
    };
    let claim = Claim {
        sig: job.sig,
        attempt: job.attempt,
        lease: job.lease,
    };
    let link: Arc<dyn WorkerLink> = Arc::new(JobLink {
        source: source.clone(),
        claim: claim.clone(),
        stop: stop.clone(),
    });
    let ctx = TaskContext {
        sig: job.sig,
        attempt: job.attempt,
        checkpoint: job.checkpoint,
        cancel: stop.token.clone(),
        backing: Backing::Worker(link),
        created: Arc::new(AtomicU32::new(0)),
        lease: None,
    };
    let renew = {
        let (source, stop, every) = (source.clone(), stop.clone(), config.renew_every);
        async move {
            loop {
                tokio::time::sleep(every).await;
                match source.heartbeat(&claim).await {
                    Ok(true) => {}
                    Ok(false) | Err(Error::LeaseLost { .. }) => {
                        tracing::info!(sig = %claim.sig, attempt = claim.attempt,
                            "job gone from the hot tier or held by another claim: abandoning its handler");
                        stop.fire(BY_SYSTEM);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(sig = %claim.sig, attempt = claim.attempt, error = %e, "lease renewal failed")
                    }
                }
            }
        }
    };
    let run = run_attempt(
        def.handler.clone(),
        def.heartbeat_timeout,
        job.input,
        ctx,
        config.grace,
    );
    // The renewal ends with the run; a revoke it notices fires the token, and the handler gets
    // its grace period like any stopped handler. It also ends when the run is dropped (a handler
    // abandoned at shutdown): else it would go on renewing the lease of a job nobody runs, and
    // no other worker could ever take it over.
    let renewal = AbortOnDrop(tokio::spawn(renew));
    let result = run.await;
    drop(renewal);
    outcome(result, stop.why())
}

/// What to report of a handler's result, given why its token fired (if it did). A success is
/// reported whatever happened (the orchestrator decides whether it still counts); an error or a
/// dropped future after the system stopped the handler is no failure of the task's.
fn outcome(result: Option<std::result::Result<Value, TaskFailure>>, why: u8) -> Outcome {
    match (result, why) {
        (Some(Ok(v)), _) => Outcome::Succeeded(v),
        (_, BY_SYSTEM) => Outcome::Abandoned,
        (_, REVOKED) | (None, _) => Outcome::Stopped,
        (Some(Err(f)), _) => Outcome::Failed(f),
    }
}

/// What a handler in a worker process reaches the orchestrator through: the job source, for
/// its one claim. A checkpoint the hot tier could not take (unreachable, no answer, lease lost)
/// stops the handler as the system's doing: the attempt is abandoned and resumes from its last
/// durable checkpoint, instead of the handler failing the task over it.
struct JobLink {
    source: Arc<dyn JobSource>,
    claim: Claim,
    stop: Stop,
}

impl WorkerLink for JobLink {
    fn checkpoint(
        &self,
        sig: SignatureId,
        attempt: u32,
        data: Value,
    ) -> BoxFuture<'static, Result<()>> {
        debug_assert_eq!((sig, attempt), (self.claim.sig, self.claim.attempt));
        let (saved, stop) = (self.source.checkpoint(&self.claim, data), self.stop.clone());
        Box::pin(async move {
            // A handler stopped while it waits for the answer (its lease lost, say) need not
            // wait out the answer's timeout: the attempt is given up either way.
            let r = tokio::select! {
                biased;
                r = saved => r,
                _ = stop.token.cancelled() => Err(Error::Hot(
                    "the attempt was stopped while its checkpoint was being saved".into(),
                )),
            };
            match &r {
                // What the handler asked to save is at fault: its own error to handle.
                Ok(())
                | Err(
                    Error::InvalidInput { .. } | Error::TooDeep { .. } | Error::TooLarge { .. },
                ) => {}
                // Anything else is the system's: unreachable, no answer, the lease lost, the
                // attempt no longer current.
                Err(_) => stop.fire(BY_SYSTEM),
            }
            r
        })
    }

    fn submit(
        &self,
        _sig: SignatureId,
        _attempt: u32,
        id: WorkflowId,
        tree: Sig,
        input: Value,
    ) -> BoxFuture<'static, Result<()>> {
        self.source.submit(&self.claim, id, tree, input)
    }

    fn control(
        &self,
        principal: &str,
        op: ControlOp,
        target: SignatureId,
        confirmed: bool,
    ) -> BoxFuture<'static, Result<String>> {
        self.source
            .control(&self.claim, principal, op, target, confirmed)
    }
}

/// Aborts its task when dropped (a spawned task outlives the future that spawned it).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Report an outcome, retrying through connection loss for a while; if it never gets through,
/// the job reappears after its lease and runs again (at-least-once). A lost lease ends it: the
/// job is another claim's now (or the rebuilt hot tier's), and what this one did does not count.
async fn report(
    source: &Arc<dyn JobSource>,
    worker: &str,
    claim: &Claim,
    outcome: Outcome,
    stats: &WorkerStats,
) {
    let (sig, attempt) = (claim.sig, claim.attempt);
    let mut backoff = Duration::from_millis(20);
    for _ in 0..12 {
        match source.report(worker, claim, outcome.clone()).await {
            Ok(()) => return,
            Err(Error::LeaseLost { .. }) => {
                tracing::info!(%sig, attempt, "lease lost: this worker's report of the attempt is dropped");
                return;
            }
            Err(e) => {
                stats.source_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%sig, attempt, error = %e, "report failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(SOURCE_BACKOFF_MAX);
            }
        }
    }
    tracing::error!(%sig, attempt, "report lost: the job will run again after its lease");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_stopped_by_the_system_is_abandoned_never_failed() {
        let err = || Some(Err(TaskFailure::retryable("stopped at step 3")));
        assert_eq!(outcome(err(), BY_SYSTEM), Outcome::Abandoned);
        assert_eq!(outcome(None, BY_SYSTEM), Outcome::Abandoned);
        assert_eq!(outcome(err(), REVOKED), Outcome::Stopped);
        assert_eq!(outcome(None, REVOKED), Outcome::Stopped);
        assert_eq!(
            outcome(err(), NOT_STOPPED),
            Outcome::Failed(TaskFailure::retryable("stopped at step 3"))
        );
        assert_eq!(
            outcome(Some(Ok(Value::from(1))), BY_SYSTEM),
            Outcome::Succeeded(Value::from(1))
        );
    }

    #[test]
    fn the_first_reason_to_stop_wins() {
        let stop = Stop::default();
        stop.fire(BY_SYSTEM);
        stop.fire(REVOKED);
        assert_eq!(stop.why(), BY_SYSTEM);
        assert!(stop.token.is_cancelled());
    }
}
