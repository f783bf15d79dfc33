//! The acting half of the orchestrator: once a step's append is durable (or failed), its effects
//! are carried out in order — handlers launched, revoked attempts stopped, callers answered,
//! finished workflows redacted and told to the compaction job — and the workflows it was the
//! last to touch are settled.

use super::orchestrator::{Hold, InFlight, Launch, Orchestrator, Reply, Step};
use super::request::Request;
use super::until::Until;
use crate::attempt::run_attempt;
use crate::context::{Backing, TaskContext};
use crate::error::Error;
use crate::registry::TaskFailure;
use mageflow_core::{NodeIndex, Workflow, WorkflowId};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

impl Orchestrator {
    /// Wait for a batch to be durable, then carry out its effects.
    pub(super) async fn finish(&mut self, (fut, step): InFlight) {
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
                                self.enqueue(sig);
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
                        self.enqueue(l.sig);
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
            // Only asked when someone waits for it: it walks the whole workflow when nothing
            // moves (a created swarm of a million items), and a read touches the workflow too.
            let asked = self
                .waiters
                .get(&wf)
                .is_some_and(|w| w.iter().any(|(until, _)| *until == Until::Settled));
            if !asked {
                return;
            }
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
            backing: Backing::Engine(Arc::new(self.handle.clone())),
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
