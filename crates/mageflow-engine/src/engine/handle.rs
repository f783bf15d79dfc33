//! [`Handle`], the cheap, cloneable access to a running engine: what users, handlers (through
//! their context), the CLI and a deployment's intake call. Every call that changes something is
//! a [`Request`] to the orchestrator, validated here first (unknown tasks, kwargs and inputs that
//! do not fit are refused before anything is appended) and answered once durable. Reads of the
//! log itself are in `history.rs`; `compact` and `compact_history` are with the compaction job.

use super::config::Config;
use super::request::{Action, Inspector, Request};
use super::stats::Stats;
use super::submit::{check_entry, check_input, check_node_count, StoredNode, Submitted};
use super::until::Until;
use crate::det::Map;
use crate::error::{Error, Result};
use crate::log_slot::LogSlot;
use crate::registry::{Registry, TaskFailure};
use crate::sig::{to_input, Sig};
use mageflow_core::{Actor, Message, Op, Rejection, SignatureId, Workflow, WorkflowId};
use mageflow_store::EventLog;
use serde::Serialize;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Cheap, cloneable access to a running engine.
#[derive(Clone)]
pub struct Handle {
    pub(super) tx: mpsc::Sender<Request>,
    pub(super) registry: Arc<Registry>,
    /// The log through [`LogSlot`] (the same allocation as `slot`): emptied by
    /// [`Engine::shutdown`], so a clone that outlives the engine does not keep the store open.
    ///
    /// [`Engine::shutdown`]: crate::Engine::shutdown
    pub(super) log: Arc<dyn EventLog>,
    pub(super) slot: Arc<LogSlot>,
    pub(super) stats: Arc<Stats>,
    pub(super) actor: Actor,
    pub(super) config: Arc<Config>,
    /// Per running workflow, the seq up to which this process moved its history into the
    /// archive (the compaction of running workflows).
    pub(super) archived_to: Arc<std::sync::Mutex<Map<WorkflowId, u64>>>,
}

impl Handle {
    /// Ask the orchestrator to stop as [`Engine::shutdown`] does — nothing new starts, running
    /// handlers get the grace period, later calls fail with [`Error::ShutDown`] — without
    /// waiting for it: for a task that must stop an engine it does not own (a deployment's
    /// orchestrator that another one superseded). `Engine::shutdown` still waits for the end.
    ///
    /// [`Engine::shutdown`]: crate::Engine::shutdown
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
    ///
    /// [`Engine::shutdown`]: crate::Engine::shutdown
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

    /// Carry out `actions` in one atomic step (one append).
    pub(super) async fn exec_actions(&self, actions: Vec<(WorkflowId, Action)>) -> Result<()> {
        self.exec(actions, false).await
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
        let copies = |specs: &[mageflow_core::NodeSpec], base: usize, attach: Option<u32>| {
            let template = attach.and_then(|s| Some((s, nodes.get(s as usize)?.item_callbacks()?)));
            mageflow_core::kind::swarm::item_callback_copies(specs, base, template)
        };
        check_node_count(nodes.len())?;
        // Deferred items are numbered as the orchestrator will number them: each chunk after
        // the nodes before it (with the per-item callbacks the core copies for each item), in
        // order, within the same atomic step (nothing can interleave).
        let mut next = nodes.len() + copies(&nodes, 0, None);
        for d in &deferred {
            for chunk in d.items.chunks(d.per_event) {
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
                next += specs.len() + copies(&specs, next, Some(d.swarm));
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
            let chunks = d.items.len().div_ceil(d.per_event);
            for (i, chunk) in d.items.chunks(d.per_event).enumerate() {
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
        let input = to_input(input)?;
        self.submit_with_id(id, sig.into(), input, false).await
    }

    pub(crate) async fn submit_with_id(
        &self,
        id: WorkflowId,
        sig: Sig,
        input: Value,
        idempotent: bool,
    ) -> Result<WorkflowId> {
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
    ///
    /// [`AutoResume`]: crate::AutoResume
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
    ///
    /// Given a signature inside a workflow (`SignatureId`), that signature runs again from the
    /// input it last ran with — a failed step retried, say — with what consumed its outcome:
    /// its callbacks, the later steps of its chain, the graph nodes downstream of it. The
    /// containers above it that had ended run again and end anew; a swarm counts the item as
    /// running again. Refused (`invalid_transition`) while any of that still runs, or unless
    /// the signature is done or failed (`canceled` for a canceled one).
    pub async fn rerun(&self, target: impl Into<SignatureId>) -> Result<()> {
        let sig = target.into();
        self.op(sig, Op::Rerun { node: sig.index }).await
    }

    /// Change the priority of `sig` while it waits (queued, or not reached yet): a swarm hands
    /// out its waiting items by the new one from now on, and the deployment's workers claim by
    /// it. Refused for a running or ended signature (`invalid_transition`) and outside
    /// [`PRIORITY_MIN`](mageflow_core::PRIORITY_MIN)..=[`PRIORITY_MAX`](mageflow_core::PRIORITY_MAX)
    /// (`invalid_priority`). The change is an event with its actor, like every transition.
    pub async fn set_priority(&self, sig: SignatureId, priority: impl Into<i32>) -> Result<()> {
        let priority = priority.into();
        self.op(
            sig,
            Op::SetPriority {
                node: sig.index,
                priority,
            },
        )
        .await
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

    /// Accept the gate `sig` ([`crate::gate`]) that is waiting: it succeeds with its input and
    /// `value`'s fields merged over it (a value that is not an object replaces the input), and
    /// what follows it runs — a graph routes on that result. Refused (`not_a_gate`,
    /// `invalid_transition`) when `sig` is not a gate or is not waiting (not reached yet,
    /// suspended, already ended); `value` is held to the limits of kwargs. The signal is an
    /// event like any other, with this handle's principal as its actor.
    pub async fn signal(&self, sig: SignatureId, value: Value) -> Result<()> {
        crate::sig::check_value("signal", &value)?;
        let op = Op::Signal {
            node: sig.index,
            signal: Ok(value),
        };
        self.op(sig, op).await
    }

    /// Reject the gate `sig` that is waiting: it fails with `reason` (not retried), so its
    /// error callbacks fire and a graph takes its `on_failure` or `default` edges. Refused as
    /// [`Handle::signal`] is.
    pub async fn reject(&self, sig: SignatureId, reason: impl Into<String>) -> Result<()> {
        let reason = reason.into();
        crate::sig::check_value("rejection reason", &Value::String(reason.clone()))?;
        let op = Op::Signal {
            node: sig.index,
            signal: Err(mageflow_core::TaskError {
                message: reason,
                retryable: false,
            }),
        };
        self.op(sig, op).await
    }

    /// Record a checkpoint of `attempt` (what [`TaskContext::save_checkpoint`] does; for worker
    /// processes reporting through the hot tier). Stale attempts are refused.
    ///
    /// [`TaskContext::save_checkpoint`]: crate::TaskContext::save_checkpoint
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
    ///
    /// [`Dispatch::Remote`]: crate::Dispatch::Remote
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
    ///
    /// [`Dispatch::Remote`]: crate::Dispatch::Remote
    pub async fn report_abandoned(&self, sig: SignatureId, attempt: u32) -> Result<()> {
        let (reply, rx) = oneshot::channel();
        let req = Request::Abandoned {
            sig,
            attempt,
            reply,
        };
        self.call(req, rx).await
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
}
