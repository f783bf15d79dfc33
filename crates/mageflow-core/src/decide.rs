//! `decide`: commands in, events out. All orchestration semantics live here — chain stepping,
//! swarm filling and failure limits, callbacks to fire, suspend/resume/interrupt/cancel — so they
//! are deterministic and replayable. Validation happens before anything is emitted: a rejected
//! command emits nothing.

use crate::apply::validate_nodes;
use crate::command::{Command, Op, Rejection};
use crate::condition::{NamedPredicates, NoNamedPredicates};
use crate::event::{Actor, Event, Payload, SCHEMA_VERSION};
use crate::id::NodeIndex;
use crate::kind;
use crate::model::{
    deep_merge, deep_merge_owned, KindSpec, Link, Message, Outcome, Role, Status, TaskError,
    Workflow, CLEANUP_FIELD, ERROR_FIELD, PRIORITY_MAX, PRIORITY_MIN,
};
use crate::time::Timestamp;
use serde_json::{json, Value};

/// Pure decision: the events `cmd` produces against `state`, or why it is refused.
/// Folding the returned events onto `state` gives the state [`execute`] would leave.
pub fn decide(state: &Workflow, cmd: &Command) -> Result<Vec<Event>, Rejection> {
    let mut scratch = state.clone();
    execute(&mut scratch, cmd)
}

/// [`decide`] that also applies the events to `state` as it goes (no copy of the state; the
/// engine's hot path uses [`execute_owned`]). On a rejection `state` is unchanged. `Rejection::Internal` would mean a bug in decide
/// (an emitted event that does not apply); the caller must then reload the state from the log.
pub fn execute(state: &mut Workflow, cmd: &Command) -> Result<Vec<Event>, Rejection> {
    execute_owned(state, cmd.clone())
}

/// [`execute`], taking the command: what it carries (a creation's nodes, a completion's result,
/// a run's input) moves into its event instead of being copied — a success callback passing
/// a million-item swarm's results along returns them all.
pub fn execute_owned(state: &mut Workflow, cmd: Command) -> Result<Vec<Event>, Rejection> {
    execute_owned_with(state, cmd, &NoNamedPredicates)
}

/// [`execute_owned`] consulting `named` when a graph routes on a named predicate (what it
/// answers is recorded in the `graph_routed` event, so replay never asks again).
pub fn execute_owned_with(
    state: &mut Workflow,
    cmd: Command,
    named: &dyn NamedPredicates,
) -> Result<Vec<Event>, Rejection> {
    let Command { actor, at, op } = cmd;
    let mut d = Decider {
        wf: state,
        actor: &actor,
        at,
        events: Vec::new(),
        named,
    };
    d.run(op)?;
    Ok(d.events)
}

/// The decider of one command: the state it changes as it emits, and the events so far. The
/// per-kind modules (`crate::kind`) drive it through its `pub(crate)` methods.
pub(crate) struct Decider<'a> {
    pub(crate) wf: &'a mut Workflow,
    actor: &'a Actor,
    at: Timestamp,
    events: Vec<Event>,
    pub(crate) named: &'a dyn NamedPredicates,
}

pub(crate) fn invalid(op: &'static str, status: Status) -> Rejection {
    Rejection::InvalidTransition { op, status }
}

impl Decider<'_> {
    pub(crate) fn emit(&mut self, payload: Payload) -> Result<(), Rejection> {
        let event = Event {
            stream: self.wf.id,
            seq: self.wf.version + 1,
            at: self.at,
            actor: self.actor.clone(),
            schema: SCHEMA_VERSION,
            payload,
        };
        self.wf
            .apply(&event)
            .map_err(|e| Rejection::Internal(e.to_string()))?;
        self.events.push(event);
        Ok(())
    }

    pub(crate) fn node_status(&self, node: NodeIndex) -> Result<Status, Rejection> {
        self.wf
            .node(node)
            .map(|n| n.status)
            .ok_or(Rejection::NoSuchNode(node))
    }

    fn run(&mut self, op: Op) -> Result<(), Rejection> {
        if self.wf.id.is_system() {
            return Err(match op {
                Op::Create { .. } => {
                    Rejection::InvalidTree("the nil id is reserved for the system stream".into())
                }
                _ => Rejection::NoSuchWorkflow,
            });
        }
        if !matches!(op, Op::Create { .. }) && !self.wf.exists() {
            return Err(Rejection::NoSuchWorkflow);
        }
        // Purging again is a no-op; everything else on a purged workflow is refused.
        if self.wf.purged {
            return match op {
                Op::Purge => Ok(()),
                _ => Err(Rejection::Purged),
            };
        }
        match op {
            Op::Create { nodes, start } => {
                if self.wf.exists() {
                    return Err(Rejection::AlreadyExists);
                }
                validate_nodes(&nodes, 0, None).map_err(Rejection::InvalidTree)?;
                let mut nodes = nodes;
                kind::swarm::instantiate_item_callbacks(self.wf, &mut nodes, 0, None);
                self.emit(Payload::WorkflowCreated { nodes })?;
                if let Some(message) = start {
                    self.trigger(0, message)?;
                }
            }
            Op::Run { message } => {
                let root = &self.wf.nodes[0];
                if root.status != Status::Pending || root.message.is_some() {
                    return Err(invalid("run", root.status));
                }
                self.trigger(0, message)?;
            }
            Op::AddSwarmItems {
                swarm,
                nodes,
                close,
            } => kind::swarm::add_items(self, swarm, nodes, close)?,
            Op::CloseSwarm { swarm } => kind::swarm::close(self, swarm)?,
            Op::UpdateKwargs { node, kwargs } => {
                let status = self.node_status(node)?;
                if !kwargs.is_object() {
                    return Err(Rejection::KwargsNotObject);
                }
                let n = &self.wf.nodes[node as usize];
                let started = n.attempt > 0 || (n.is_container() && n.message.is_some());
                if status.is_terminal() || started {
                    return Err(invalid("update kwargs of", status));
                }
                self.emit(Payload::KwargsUpdated { node, kwargs })?;
            }
            Op::Start { node } => {
                let status = self.node_status(node)?;
                let n = &self.wf.nodes[node as usize];
                if status != Status::Queued || n.is_container() {
                    return Err(invalid("start", status));
                }
                if n.not_before.is_some_and(|t| t > self.at) {
                    return Err(Rejection::NotYet(node));
                }
                let attempt = n.attempt + 1;
                self.emit(Payload::Started { node, attempt })?;
            }
            Op::Checkpoint {
                node,
                attempt,
                data,
            } => {
                // Refused, not ignored: the handler that saved it must not believe it durable.
                if !self.is_current_attempt(node, attempt)? {
                    return Err(Rejection::StaleAttempt { node, attempt });
                }
                self.emit(Payload::Checkpointed {
                    node,
                    attempt,
                    data,
                })?;
            }
            Op::Complete {
                node,
                attempt,
                result,
            } => {
                // A duplicate or stale completion (redelivery, revoked attempt) is a no-op.
                if self.is_current_attempt(node, attempt)? {
                    self.emit(Payload::Succeeded {
                        node,
                        attempt,
                        result,
                    })?;
                    self.finished(node)?;
                }
            }
            Op::Fail {
                node,
                attempt,
                error,
            } => {
                if self.is_current_attempt(node, attempt)? {
                    let KindSpec::Task { retry, .. } = &self.wf.nodes[node as usize].spec.kind
                    else {
                        return Err(invalid("fail", Status::Running));
                    };
                    let failures = self.wf.nodes[node as usize].failures;
                    if error.retryable && failures < retry.max_retries {
                        let retry_at = self
                            .at
                            .saturating_add_millis(retry.backoff_for(attempt + 1));
                        self.emit(Payload::RetryScheduled {
                            node,
                            attempt,
                            error,
                            retry_at,
                            lost: false,
                        })?;
                    } else {
                        self.emit(Payload::Failed {
                            node,
                            attempt,
                            error,
                        })?;
                        self.finished(node)?;
                    }
                }
            }
            Op::Requeue { node, attempt } => {
                if self.is_current_attempt(node, attempt)? {
                    self.emit(Payload::RetryScheduled {
                        node,
                        attempt,
                        error: TaskError {
                            message: "attempt lost: its worker stopped before reporting".into(),
                            retryable: true,
                        },
                        retry_at: self.at,
                        lost: true,
                    })?;
                }
            }
            Op::Suspend { node } => {
                let status = self.node_status(node)?;
                match status {
                    Status::Suspended => {}
                    s if s.is_terminal() || s == Status::Interrupted => {
                        return Err(invalid("suspend", s))
                    }
                    _ => {
                        self.emit(Payload::Suspended { node })?;
                        self.suspend_children(node)?;
                    }
                }
            }
            Op::Resume { node } => {
                let status = self.node_status(node)?;
                match status {
                    Status::Canceled => return Err(Rejection::Canceled(node)),
                    Status::Suspended | Status::Interrupted => self.resume(node)?,
                    s if s.is_terminal() => return Err(invalid("resume", s)),
                    _ => {}
                }
            }
            Op::Interrupt { node } => {
                let status = self.node_status(node)?;
                match status {
                    Status::Interrupted => {}
                    s if s.is_terminal() => return Err(invalid("interrupt", s)),
                    _ => self.stop_tree(node, false)?,
                }
            }
            Op::Delete { expires_at } => {
                if self.wf.nodes[0].deletion.is_none() {
                    self.emit(Payload::MarkedForDeletion {
                        node: 0,
                        expires_at,
                    })?;
                }
            }
            Op::Restore => {
                if self.wf.nodes[0].deletion.is_none() {
                    return Err(Rejection::NotMarked);
                }
                self.emit(Payload::Restored { node: 0 })?;
            }
            Op::Rerun { node } if node != 0 => {
                let plan = crate::rerun::plan(self.wf, node)?;
                self.emit(Payload::Rerun { node })?;
                if !plan.waits {
                    self.trigger(node, plan.message)?;
                }
                // A swarm reopened above it hands out what its failure limit had held back.
                let mut link = self.wf.nodes[node as usize].spec.parent;
                while let Some(Link {
                    node: up,
                    role: Role::Child,
                }) = link
                {
                    kind::resumed(self, up)?;
                    link = self.wf.nodes[up as usize].spec.parent;
                }
            }
            Op::Rerun { .. } => {
                let root = &self.wf.nodes[0];
                match root.status {
                    Status::Canceled => return Err(Rejection::Canceled(0)),
                    Status::Done | Status::Failed => {}
                    s => return Err(invalid("rerun", s)),
                }
                if self.wf.nodes.iter().any(|n| n.in_flight) {
                    return Err(invalid("rerun", Status::Running));
                }
                let Some(message) = root.message.clone() else {
                    return Err(invalid("rerun", root.status));
                };
                self.emit(Payload::Rerun { node: 0 })?;
                self.trigger(0, message)?;
            }
            Op::SetPriority { node, priority } => {
                let status = self.node_status(node)?;
                if !(PRIORITY_MIN..=PRIORITY_MAX).contains(&priority) {
                    return Err(Rejection::InvalidPriority(priority));
                }
                let n = &self.wf.nodes[node as usize];
                if status.is_terminal() || status == Status::Running || n.in_flight {
                    return Err(invalid("change the priority of", status));
                }
                if n.spec.priority != priority {
                    self.emit(Payload::PriorityChanged { node, priority })?;
                }
            }
            Op::Purge => {
                let Some(expires_at) = self.wf.nodes[0].deletion else {
                    return Err(Rejection::NotMarked);
                };
                if self.at < expires_at {
                    return Err(Rejection::NotExpired(expires_at));
                }
                if let Some(i) = self.wf.nodes.iter().position(|n| n.in_flight) {
                    return Err(Rejection::NotYet(i as NodeIndex));
                }
                self.emit(Payload::Purged { node: 0 })?;
            }
            Op::Signal { node, signal } => {
                let status = self.node_status(node)?;
                let n = &self.wf.nodes[node as usize];
                if n.spec.kind != KindSpec::Gate {
                    return Err(Rejection::NotAGate(node));
                }
                // Running is waiting: a gate runs from the moment it is reached until signaled.
                if status != Status::Running {
                    return Err(invalid("signal", status));
                }
                match signal {
                    Ok(value) => {
                        let input = n.message.as_ref().map(|m| m.value.clone());
                        let result = match (input, value) {
                            (Some(input @ Value::Object(_)), value @ Value::Object(_)) => {
                                deep_merge_owned(input, value)
                            }
                            (_, value) => value,
                        };
                        self.emit(Payload::Succeeded {
                            node,
                            attempt: 0,
                            result,
                        })?;
                    }
                    Err(error) => self.emit(Payload::Failed {
                        node,
                        attempt: 0,
                        error,
                    })?,
                }
                self.finished(node)?;
            }
            Op::Cancel { node, confirmed } => {
                if !confirmed {
                    return Err(Rejection::ConfirmationRequired);
                }
                let status = self.node_status(node)?;
                match status {
                    Status::Canceled => {}
                    s if s.is_terminal() => return Err(invalid("cancel", s)),
                    _ => {
                        self.stop_tree(node, true)?;
                        self.notify_parent(node)?;
                        // A canceled internal callback holds its containers' callbacks no more.
                        self.release_held(node)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn is_current_attempt(&self, node: NodeIndex, attempt: u32) -> Result<bool, Rejection> {
        let n = self.wf.node(node).ok_or(Rejection::NoSuchNode(node))?;
        Ok(n.in_flight && n.attempt == attempt)
    }

    fn children(&self, node: NodeIndex) -> Vec<NodeIndex> {
        self.wf.nodes[node as usize].spec.children().to_vec()
    }

    /// Trigger a node with its message: a task is queued, a container starts. A node that was
    /// already triggered (or is terminal) is left alone, which makes triggering idempotent.
    pub(crate) fn trigger(&mut self, node: NodeIndex, message: Message) -> Result<(), Rejection> {
        let n = &self.wf.nodes[node as usize];
        let untriggered = matches!(
            n.status,
            Status::Pending | Status::Suspended | Status::Interrupted
        ) && n.message.is_none()
            && !n.in_flight;
        if !untriggered {
            return Ok(());
        }
        let parked = self.wf.is_paused(node);
        if !n.is_container() {
            return self.emit(Payload::Queued {
                node,
                message,
                parked,
            });
        }
        self.emit(Payload::ContainerStarted {
            node,
            message: message.clone(),
            parked,
        })?;
        kind::start(self, node, message)
    }

    /// A node reached done or failed: fire its callbacks (its own first), then its cleanup
    /// callbacks, then tell its container.
    ///
    /// A container whose inner callbacks still run (a step's callback fired by its last step,
    /// say) holds its own — outcome and cleanup callbacks — until they have ended: a
    /// composite's external callbacks fire after every internal one. What follows the container
    /// (the next step, the swarm's count) does not wait.
    pub(crate) fn finished(&mut self, node: NodeIndex) -> Result<(), Rejection> {
        if !self.wf.inner_callbacks_running(node) {
            self.fire_own_callbacks(node)?;
        }
        self.notify_parent(node)?;
        self.release_held(node)
    }

    /// Fire the outcome and cleanup callbacks of `node`, which ended done or failed (once:
    /// triggering is idempotent). A chain's error callbacks get its failing step's input and
    /// error.
    fn fire_own_callbacks(&mut self, node: NodeIndex) -> Result<(), Rejection> {
        let n = &self.wf.nodes[node as usize];
        let failed_step = match (&n.spec.kind, &n.outcome) {
            (KindSpec::Chain { children }, Some(Outcome::Err(_))) => children
                .iter()
                .copied()
                .find(|&c| matches!(self.wf.nodes[c as usize].outcome, Some(Outcome::Err(_)))),
            _ => None,
        };
        let outcome = match n.status {
            Status::Done => "done",
            _ => "failed",
        };
        match failed_step {
            Some(step) => {
                let Some(Outcome::Err(error)) = self.wf.nodes[step as usize].outcome.clone() else {
                    return Ok(());
                };
                let input = self.error_input(step, &error);
                for cb in self.wf.nodes[node as usize].spec.on_error.clone() {
                    self.trigger(cb, Message::input(input.clone()))?;
                }
            }
            None => self.fire_outcome_callbacks(node)?,
        }
        self.cleanup(node, outcome)
    }

    /// `node` ended: every container above it that ended done or failed while something inside
    /// still ran, and now has nothing running inside, fires the callbacks it held.
    fn release_held(&mut self, node: NodeIndex) -> Result<(), Rejection> {
        let mut link = self.wf.nodes[node as usize].spec.parent;
        while let Some(Link { node: up, .. }) = link {
            let n = &self.wf.nodes[up as usize];
            link = n.spec.parent;
            let held = matches!(n.status, Status::Done | Status::Failed)
                && n.is_container()
                && n.spec
                    .on_success
                    .iter()
                    .chain(&n.spec.on_error)
                    .chain(&n.spec.on_cleanup)
                    .any(|&cb| {
                        // Not triggered yet (a paused one is triggered parked).
                        let c = &self.wf.nodes[cb as usize];
                        matches!(
                            c.status,
                            Status::Pending | Status::Suspended | Status::Interrupted
                        ) && c.message.is_none()
                            && !c.in_flight
                    });
            if held && !self.wf.inner_callbacks_running(up) {
                self.fire_own_callbacks(up)?;
            }
        }
        Ok(())
    }

    /// Trigger the cleanup callbacks of `node` (once: triggering is idempotent) with its input
    /// plus `mageflow_cleanup` = {signature, task, outcome, result | error}.
    pub(crate) fn cleanup(&mut self, node: NodeIndex, outcome: &str) -> Result<(), Rejection> {
        let n = &self.wf.nodes[node as usize];
        if n.spec.on_cleanup.is_empty() {
            return Ok(());
        }
        let mut info = json!({
            "signature": self.wf.sig(node).to_string(),
            "task": n.spec.name,
            "outcome": outcome,
        });
        match &n.outcome {
            Some(Outcome::Ok(v)) => info["result"] = v.clone(),
            Some(Outcome::Err(e)) => info["error"] = Value::String(e.message.clone()),
            None => {}
        }
        let mut extra = serde_json::Map::new();
        extra.insert(CLEANUP_FIELD.into(), info);
        let input = deep_merge(self.base_input(node), &Value::Object(extra));
        for cb in n.spec.on_cleanup.clone() {
            self.trigger(cb, Message::input(input.clone()))?;
        }
        Ok(())
    }

    /// The input of a task; a container's message.
    fn base_input(&self, node: NodeIndex) -> Value {
        let n = &self.wf.nodes[node as usize];
        if n.is_container() {
            n.message
                .as_ref()
                .map(|m| m.value.clone())
                .filter(Value::is_object)
                .unwrap_or_else(|| json!({}))
        } else {
            self.wf.effective_input(node)
        }
    }

    fn fire_outcome_callbacks(&mut self, node: NodeIndex) -> Result<(), Rejection> {
        let n = &self.wf.nodes[node as usize];
        // The result is cloned once per callback, straight from the state: a swarm's can hold a
        // million items, and every extra copy of it is held at once.
        match &n.outcome {
            Some(Outcome::Ok(_)) => {
                for cb in n.spec.on_success.clone() {
                    let Some(Outcome::Ok(result)) = &self.wf.nodes[node as usize].outcome else {
                        break;
                    };
                    self.trigger(cb, Message::result(result.clone()))?;
                }
            }
            Some(Outcome::Err(error)) => {
                let input = self.error_input(node, error);
                for cb in n.spec.on_error.clone() {
                    self.trigger(cb, Message::input(input.clone()))?;
                }
            }
            None => {}
        }
        Ok(())
    }

    /// What an error callback receives: the failed signature's input plus the error.
    pub(crate) fn error_input(&self, node: NodeIndex, error: &TaskError) -> Value {
        let n = &self.wf.nodes[node as usize];
        let input = self.base_input(node);
        let mut err = serde_json::Map::new();
        err.insert(
            ERROR_FIELD.into(),
            json!({
                "signature": self.wf.sig(node).to_string(),
                "task": n.spec.name,
                "message": error.message,
                "attempts": n.attempt,
            }),
        );
        deep_merge(input, &Value::Object(err))
    }

    /// The error a container ends with when its `inner` signature (a chain's `step`, a swarm's
    /// `item`, a graph's `node`) failed: the inner one's error, naming it by position, name and
    /// id — nested containers name each level, outermost first.
    pub(crate) fn inner_failure(
        &self,
        what: &str,
        inner: NodeIndex,
        error: &TaskError,
    ) -> TaskError {
        let n = &self.wf.nodes[inner as usize];
        TaskError {
            message: format!(
                "{what} {} {:?} ({}) failed: {}",
                n.position,
                n.spec.name,
                self.wf.sig(inner),
                error.message
            ),
            retryable: error.retryable,
        }
    }

    /// Tell `node`'s container (if it is a child of one that is still running) that it
    /// finished: the container's kind decides what follows.
    pub(crate) fn notify_parent(&mut self, node: NodeIndex) -> Result<(), Rejection> {
        let n = &self.wf.nodes[node as usize];
        let Some(link) = n.spec.parent.filter(|l| l.role == Role::Child) else {
            return Ok(());
        };
        if self.wf.nodes[link.node as usize].status.is_terminal() {
            return Ok(());
        }
        kind::child_finished(self, link.node, node)
    }

    /// Suspend the queued or dispatching descendants of a suspended container. Running attempts
    /// finish; pending ones are gated by their suspended ancestor.
    fn suspend_children(&mut self, node: NodeIndex) -> Result<(), Rejection> {
        for c in self.children(node) {
            let n = &self.wf.nodes[c as usize];
            let container = n.is_container();
            match n.status {
                Status::Queued => self.emit(Payload::Suspended { node: c })?,
                Status::Running if container => {
                    self.emit(Payload::Suspended { node: c })?;
                    self.suspend_children(c)?;
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Interrupt (`cancel == false`) or cancel a node and its descendants. Descendants that were
    /// never triggered are left pending when interrupting (their paused ancestor gates them) and
    /// are canceled with the rest when canceling.
    fn stop_tree(&mut self, node: NodeIndex, cancel: bool) -> Result<(), Rejection> {
        self.stop_subtree(node, cancel, true)
    }

    /// Cleanup callbacks fire children first (post-order): for the node the command named, and
    /// for descendants that had been triggered (a never-started one acquired nothing).
    fn stop_subtree(
        &mut self,
        node: NodeIndex,
        cancel: bool,
        named: bool,
    ) -> Result<(), Rejection> {
        let started = self.wf.nodes[node as usize].message.is_some();
        self.emit(if cancel {
            Payload::Canceled { node }
        } else {
            Payload::Interrupted { node }
        })?;
        for c in self.children(node) {
            let n = &self.wf.nodes[c as usize];
            let untriggered = n.status == Status::Pending && n.message.is_none();
            if !n.status.is_terminal() && (cancel || !untriggered) {
                self.stop_subtree(c, cancel, false)?;
            }
        }
        if named || started {
            self.cleanup(node, if cancel { "canceled" } else { "interrupted" })?;
        }
        Ok(())
    }

    /// Resume a suspended or interrupted node and its paused descendants, then let containers
    /// continue where they stopped.
    fn resume(&mut self, node: NodeIndex) -> Result<(), Rejection> {
        let n = &self.wf.nodes[node as usize];
        if !matches!(n.status, Status::Suspended | Status::Interrupted) {
            return Ok(());
        }
        let status = if n.is_container() {
            if n.message.is_some() {
                Status::Running
            } else {
                Status::Pending
            }
        } else if n.in_flight {
            Status::Running
        } else if n.message.is_some() {
            Status::Queued
        } else {
            Status::Pending
        };
        self.emit(Payload::Resumed { node, status })?;
        for c in self.children(node) {
            self.resume(c)?;
        }
        if status == Status::Running {
            kind::resumed(self, node)?;
        }
        Ok(())
    }
}
