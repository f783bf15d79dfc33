//! The deciding half of the orchestrator: a batch of requests becomes core commands run through
//! `execute` against the hot state (all-or-nothing per request), the effects of the events
//! decided are noted in the [`Step`], due timers and purges fire, and free worker slots are
//! filled from the ready queue. Nothing here waits for the log.

use super::orchestrator::{Launch, Orchestrator, Reply, Running, Step};
use super::request::{Action, Request};
use super::submit::flatten_items;
use crate::det::Map;
use crate::error::{Error, Result};
use crate::registry::TaskFailure;
use mageflow_core::{
    execute_owned, execute_owned_with, Actor, Command, Effect, Event, Op, Rejection, Status,
    TaskError, Workflow, WorkflowId,
};
use serde_json::Value;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

/// How soon the cleanup job retries a purge that had to wait (an attempt still in flight).
const PURGE_RETRY_MS: u64 = 1_000;

impl Orchestrator {
    /// Carry out what freshly decided events ask of the orchestrator. The core works that out
    /// from the events alone ([`Effect::of`]), as it does for the hot tier's projector.
    fn scan(&mut self, events: &[Event], step: &mut Step) {
        for effect in events.iter().flat_map(Effect::of) {
            match effect {
                Effect::Enqueue(sig) => self.enqueue(sig),
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
    pub(super) fn exec(
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
            match execute_owned_with(state, cmd, &*registry) {
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

    pub(super) fn process(&mut self, batch: Vec<Request>) -> Step {
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
            self.enqueue(sig);
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
}
