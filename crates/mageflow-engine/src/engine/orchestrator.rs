//! The orchestrator: its state ([`Orchestrator`], with the attempts holding slots, the step a
//! batch makes and what recovery holds back) and its run loop — take a batch of requests,
//! decide it (`decide.rs`), hand its events to the log, and carry out the previous batch's
//! effects once durable (`effects.rs`). Recovery at start-up is in `recovery.rs`. Those files
//! add `impl Orchestrator` blocks and import their types from here, never the other way.

use super::config::{Config, Dispatch};
use super::handle::Handle;
use super::request::Request;
use super::stats::Stats;
use super::until::Until;
use crate::det::{Map, Set};
use crate::error::{Error, Result};
use crate::registry::Registry;
use mageflow_core::{
    Actor, Event, NodeIndex, SignatureId, Status, Timestamp, Workflow, WorkflowId,
};
use mageflow_store::{AppendRequest, BoxFuture, EventLog};
use serde_json::Value;
use std::any::Any;
use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Most requests one orchestrator batch takes.
pub const BATCH_REQUESTS_MAX: usize = 8192;

/// How much of a recovered workflow auto-resume holds back (see [`AutoResume`]).
///
/// [`AutoResume`]: crate::AutoResume
pub(super) enum Hold {
    Whole,
    Nodes(Set<NodeIndex>),
}

/// A caller of `wait`/`wait_for`: what it waits for, and where its answer goes.
pub(super) type Waiter = (Until, oneshot::Sender<Result<Workflow>>);

pub(super) struct Running {
    pub(super) attempt: u32,
    pub(super) token: CancellationToken,
}

pub(super) struct Launch {
    pub(super) sig: SignatureId,
    pub(super) attempt: u32,
    pub(super) task: String,
    pub(super) input: Value,
    pub(super) checkpoint: Option<Value>,
}

pub(super) enum Reply {
    Unit(oneshot::Sender<Result<()>>, Result<()>),
    State(oneshot::Sender<Result<Workflow>>, Result<Workflow>),
    Any(
        oneshot::Sender<Result<Box<dyn Any + Send>>>,
        Result<Box<dyn Any + Send>>,
    ),
}

/// Everything one batch produced: events to append, and effects to carry out once durable.
#[derive(Default)]
pub(super) struct Step {
    /// Sequence number of the step (see [`Orchestrator::last_touch`]).
    pub(super) seq: u64,
    pub(super) appends: Vec<AppendRequest>,
    pub(super) index: Map<WorkflowId, usize>,
    pub(super) replies: Vec<Reply>,
    pub(super) launches: Vec<Launch>,
    pub(super) stops: Vec<SignatureId>,
    /// Workflows this step read, changed or registered a waiter on (may repeat).
    pub(super) touched: Vec<WorkflowId>,
    /// Workflows this step's events finish (counted once those events are durable).
    pub(super) finished: Vec<WorkflowId>,
    /// Workflows this step purges (told to the compaction job too, once durable).
    pub(super) purged: Vec<WorkflowId>,
    /// Events in `appends` (counted before they are handed to the log).
    pub(super) events: usize,
}

impl Step {
    pub(super) fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.replies.is_empty()
            && self.launches.is_empty()
            && self.stops.is_empty()
            && self.touched.is_empty()
            && self.events == 0
    }

    pub(super) fn add_events(&mut self, wf: WorkflowId, expected: u64, events: Vec<Event>) {
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

pub(super) type InFlight = (
    Option<BoxFuture<'static, mageflow_store::Result<Vec<u64>>>>,
    Step,
);

pub(super) struct Orchestrator {
    pub(super) log: Arc<dyn EventLog>,
    pub(super) registry: Arc<Registry>,
    pub(super) handle: Handle,
    pub(super) stats: Arc<Stats>,
    pub(super) config: Config,
    pub(super) worker_actor: Actor,
    /// Unfinished workflows (and finished ones until their waiters are answered).
    pub(super) hot: Map<WorkflowId, Workflow>,
    pub(super) ready: super::ready::ReadyQueue,
    pub(super) timers: BTreeSet<(Timestamp, SignatureId)>,
    /// Deletion windows: when each marked workflow is due for purging (the cleanup job).
    pub(super) purges: BTreeSet<(Timestamp, WorkflowId)>,
    /// Attempts holding a worker slot: started, and their handler has not reported yet (it may
    /// linger after its attempt was revoked, until the end of the grace period).
    pub(super) running: Map<SignatureId, Running>,
    /// Queued signatures whose previous attempt still holds a slot: put back on the ready queue
    /// when that attempt's handler reports, so one signature never holds two slots.
    pub(super) deferred: Set<SignatureId>,
    /// Recovered work auto-resume leaves alone until a resume or run of its workflow
    /// ([`AutoResume`]): `start_ready` drops held signatures instead of starting them.
    ///
    /// [`AutoResume`]: crate::AutoResume
    pub(super) held: Map<WorkflowId, Hold>,
    /// Callers of `wait`/`wait_for`, per workflow, with what they wait for. A caller that gave
    /// up (its timeout passed) leaves a closed sender, dropped at the next wait or answer.
    pub(super) waiters: Map<WorkflowId, Vec<Waiter>>,
    /// Sequence number of the last step decided.
    pub(super) seq: u64,
    /// For each workflow in the hot state, the last step that touched it (events, a read, a
    /// wait, a report). Only that step's `finish` may settle it: by then every event decided
    /// for it is durable, and no later step has changed its hot state.
    pub(super) last_touch: Map<WorkflowId, u64>,
    pub(super) free_slots: usize,
    /// Set by shutdown: no new starts; stop once nothing runs or at this instant.
    pub(super) shutdown_at: Option<tokio::time::Instant>,
    pub(super) shutdown_replies: Vec<oneshot::Sender<()>>,
    /// The tasks running handlers in this process.
    pub(super) handlers: tokio_util::task::TaskTracker,
    pub(super) tx: mpsc::Sender<Request>,
    /// Told of every finished or purged workflow, for the compaction job.
    pub(super) compact_tx: Option<mpsc::UnboundedSender<WorkflowId>>,
    /// Redactions running on blocking threads; shutdown waits for them (they hold the log).
    pub(super) background: Vec<tokio::task::JoinHandle<()>>,
}

impl Orchestrator {
    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
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
    pub(super) fn load(&mut self, wf: WorkflowId) -> Result<&mut Workflow> {
        if wf.is_system() {
            return Err(Error::NoSuchWorkflow(wf));
        }
        if !self.hot.contains_key(&wf) {
            let events = self.log.read_stream(wf, 1)?;
            let state = Workflow::replay(wf, events).map_err(|e| Error::Replay(wf, e))?;
            for (i, n) in state.nodes.iter().enumerate() {
                if n.status == Status::Queued && !n.in_flight {
                    let i = i as NodeIndex;
                    self.ready.push_back(state.sig(i), state.priority(i));
                }
            }
            self.hot.insert(wf, state);
        }
        self.hot.get_mut(&wf).ok_or(Error::NoSuchWorkflow(wf))
    }

    pub(super) fn remote(&self) -> bool {
        matches!(self.config.dispatch, Dispatch::Remote { .. })
    }

    /// Give back the slot attempt `attempt` of `sig` holds, if it holds one; a signature waiting
    /// for that slot (queued again meanwhile) is ready again.
    pub(super) fn release_slot(&mut self, sig: SignatureId, attempt: u32) {
        if self.running.get(&sig).is_some_and(|r| r.attempt == attempt) {
            self.running.remove(&sig);
            self.free_slots += 1;
            self.stats.running.fetch_sub(1, Ordering::Relaxed);
            if self.deferred.remove(&sig) {
                self.enqueue(sig);
            }
        }
    }

    /// Queue `sig` to start, at its priority (as its workflow's state has it, if loaded).
    pub(super) fn enqueue(&mut self, sig: SignatureId) {
        let priority = self
            .hot
            .get(&sig.workflow)
            .map_or(0, |w| w.priority(sig.index));
        self.ready.push_back(sig, priority);
    }

    /// Count an attempt as running, from its start until its slot is given back.
    pub(super) fn count_running(&self) {
        let running = self.stats.running.fetch_add(1, Ordering::Relaxed) + 1;
        self.stats
            .running_peak
            .fetch_max(running, Ordering::Relaxed);
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
