//! Events: the only thing ever written to the log. The envelope ([`Event`]) is versioned and is
//! the one place core types are serialized (see [`crate::codec`]).

use crate::id::{NodeIndex, WorkflowId};
use crate::model::{Message, NodeSpec, Status, TaskError};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Version of the event schema written by this build. Older versions must keep decoding.
/// History: 1 = the first schema; 2 = adds [`Payload::ResumeReport`]; 3 = adds
/// [`Payload::CommandRefused`]; 4 = adds [`Payload::GraphRouted`] and graph signatures
/// (`KindSpec::Graph`); 5 = adds gates (`KindSpec::Gate`), ended by a signal, and named predicates
/// (`Predicate::Named`) on graph edges; 6 = adds per-item callbacks of swarms
/// (`KindSpec::Swarm::item_callbacks`), priorities (`NodeSpec::priority`) and
/// [`Payload::PriorityChanged`].
pub const SCHEMA_VERSION: u16 = 6;

/// Who caused an event.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Actor {
    /// A caller of the API (library, CLI, HTTP), by principal name.
    Api { principal: String },
    /// A worker process or in-process worker slot.
    Worker { id: String },
    /// The engine itself (timers, cascades, recovery), by component name.
    System { component: String },
}

impl Actor {
    pub fn api(principal: impl Into<String>) -> Self {
        Actor::Api {
            principal: principal.into(),
        }
    }
    pub fn worker(id: impl Into<String>) -> Self {
        Actor::Worker { id: id.into() }
    }
    pub fn system(component: impl Into<String>) -> Self {
        Actor::System {
            component: component.into(),
        }
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Api { principal } => write!(f, "api:{principal}"),
            Actor::Worker { id } => write!(f, "worker:{id}"),
            Actor::System { component } => write!(f, "system:{component}"),
        }
    }
}

/// One durable event of one workflow stream.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Event {
    pub stream: WorkflowId,
    /// 1-based, dense, per stream.
    pub seq: u64,
    pub at: Timestamp,
    pub actor: Actor,
    pub schema: u16,
    pub payload: Payload,
}

/// What happened. Node indexes refer to the workflow of the event's stream.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Payload {
    /// A whole signature tree was created (root is index 0), atomically.
    WorkflowCreated {
        nodes: Vec<NodeSpec>,
    },
    /// Signatures appended to an open swarm (indexes continue after the existing ones).
    SwarmItemsAdded {
        swarm: NodeIndex,
        nodes: Vec<NodeSpec>,
    },
    SwarmClosed {
        swarm: NodeIndex,
    },
    /// Bound kwargs deep-merged with `kwargs`.
    KwargsUpdated {
        node: NodeIndex,
        kwargs: Value,
    },
    /// A task was triggered with its message; `parked` means an enclosing container (or the node
    /// itself) is suspended, so it waits in `suspended` until resumed.
    Queued {
        node: NodeIndex,
        message: Message,
        parked: bool,
    },
    /// A container was triggered and starts dispatching its children.
    ContainerStarted {
        node: NodeIndex,
        message: Message,
        parked: bool,
    },
    /// A swarm handed out its next `count` items (FIFO).
    SwarmDispatched {
        swarm: NodeIndex,
        count: u32,
    },
    /// Attempt `attempt` of a task started on a worker.
    Started {
        node: NodeIndex,
        attempt: u32,
    },
    /// The handler recorded a checkpoint; a resumed attempt receives it.
    Checkpointed {
        node: NodeIndex,
        attempt: u32,
        data: Value,
    },
    /// A task attempt (or a container) finished successfully.
    Succeeded {
        node: NodeIndex,
        attempt: u32,
        result: Value,
    },
    /// A task attempt failed and will be retried at `retry_at`. `lost` means the attempt did
    /// not fail but its worker disappeared; it does not count against the retry budget.
    RetryScheduled {
        node: NodeIndex,
        attempt: u32,
        error: TaskError,
        retry_at: Timestamp,
        #[serde(default)]
        lost: bool,
    },
    /// A task (final attempt) or a container failed.
    Failed {
        node: NodeIndex,
        attempt: u32,
        error: TaskError,
    },
    Suspended {
        node: NodeIndex,
    },
    /// Back from suspended or interrupted to `status`.
    Resumed {
        node: NodeIndex,
        status: Status,
    },
    /// Stopped aggressively; a running attempt is revoked.
    Interrupted {
        node: NodeIndex,
    },
    /// Stopped for good; a running attempt is revoked.
    Canceled {
        node: NodeIndex,
    },
    /// The workflow (root `node` and everything under it) is soft-deleted until `expires_at`.
    MarkedForDeletion {
        node: NodeIndex,
        expires_at: Timestamp,
    },
    /// The deletion mark is lifted (before expiry); nothing else changes.
    Restored {
        node: NodeIndex,
    },
    /// The workflow is reset to run again (from done or failed; a deletion mark is lifted too);
    /// the events that follow trigger it with its original message.
    Rerun {
        node: NodeIndex,
    },
    /// The deletion window ended: task data (kwargs, messages, results, checkpoints) is dropped
    /// from the state for good.
    Purged {
        node: NodeIndex,
    },
    /// What an engine's recovery pass found in the log and did about it (schema 2). Only ever
    /// in the system stream ([`WorkflowId::SYSTEM`]), never folded into a workflow. `report`
    /// is a JSON object whose shape the engine owns (its `RecoveryReport`), so the report can
    /// gain fields without a codec change.
    ResumeReport {
        report: Value,
    },
    /// A command the orchestrator refused without carrying it out — one that came past its
    /// deadline — recorded for the audit trail (schema 3). Only ever in the system stream;
    /// `command` is a JSON object whose shape the deployment owns (who, what, on which
    /// signature, why), like a resume report's.
    CommandRefused {
        command: Value,
    },
    /// A graph routed the outcome of its node `from`: whether each of its outgoing edges was
    /// taken, and what the edge's condition saw (schema 4). With `skipped`, `from` was found
    /// unreachable — no incoming edge of it taken, as its join counts them — and is skipped,
    /// none of its edges taken.
    GraphRouted {
        graph: NodeIndex,
        from: NodeIndex,
        decisions: Vec<EdgeDecision>,
        skipped: bool,
    },
    /// The priority of a waiting signature changed (schema 6): a swarm hands out its waiting
    /// items, and the deployment's queue serves jobs, by the new one from now on.
    PriorityChanged {
        node: NodeIndex,
        priority: i32,
    },
}

/// What a graph decided on one edge (`edge`: its position in the graph's edges).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct EdgeDecision {
    pub edge: u32,
    pub taken: bool,
    /// What the edge's condition saw in the source's output (`null` for a condition on the
    /// outcome alone).
    pub saw: Value,
}

impl Payload {
    /// The node an event is about (the swarm for swarm events).
    pub fn node(&self) -> Option<NodeIndex> {
        use Payload::*;
        match self {
            WorkflowCreated { .. } | ResumeReport { .. } | CommandRefused { .. } => None,
            SwarmItemsAdded { swarm, .. }
            | SwarmClosed { swarm }
            | SwarmDispatched { swarm, .. } => Some(*swarm),
            GraphRouted { graph, .. } => Some(*graph),
            KwargsUpdated { node, .. }
            | Queued { node, .. }
            | ContainerStarted { node, .. }
            | Started { node, .. }
            | Checkpointed { node, .. }
            | Succeeded { node, .. }
            | RetryScheduled { node, .. }
            | Failed { node, .. }
            | Suspended { node }
            | Resumed { node, .. }
            | Interrupted { node }
            | Canceled { node }
            | MarkedForDeletion { node, .. }
            | Restored { node }
            | Rerun { node }
            | PriorityChanged { node, .. }
            | Purged { node } => Some(*node),
        }
    }

    /// Stable snake_case name of the event kind.
    pub fn kind(&self) -> &'static str {
        use Payload::*;
        match self {
            WorkflowCreated { .. } => "workflow_created",
            SwarmItemsAdded { .. } => "swarm_items_added",
            SwarmClosed { .. } => "swarm_closed",
            KwargsUpdated { .. } => "kwargs_updated",
            Queued { .. } => "queued",
            ContainerStarted { .. } => "container_started",
            SwarmDispatched { .. } => "swarm_dispatched",
            Started { .. } => "started",
            Checkpointed { .. } => "checkpointed",
            Succeeded { .. } => "succeeded",
            RetryScheduled { .. } => "retry_scheduled",
            Failed { .. } => "failed",
            Suspended { .. } => "suspended",
            Resumed { .. } => "resumed",
            Interrupted { .. } => "interrupted",
            Canceled { .. } => "canceled",
            MarkedForDeletion { .. } => "marked_for_deletion",
            Restored { .. } => "restored",
            Rerun { .. } => "rerun",
            Purged { .. } => "purged",
            ResumeReport { .. } => "resume_report",
            CommandRefused { .. } => "command_refused",
            GraphRouted { .. } => "graph_routed",
            PriorityChanged { .. } => "priority_changed",
        }
    }
}

/// What a redacted error message reads (see [`Payload::redact`]).
pub const REDACTED_ERROR: &str = "[redacted]";

/// Set `slot` to `value`; whether that changed it.
fn replace_with<T: PartialEq>(slot: &mut T, value: T) -> bool {
    let changed = *slot != value;
    if changed {
        *slot = value;
    }
    changed
}

fn empty_object() -> Value {
    Value::Object(Default::default())
}

impl Payload {
    /// Number of signatures this event creates: the length of the batch of a
    /// [`Payload::WorkflowCreated`] or [`Payload::SwarmItemsAdded`], 0 otherwise.
    pub fn created_nodes(&self) -> usize {
        match self {
            Payload::WorkflowCreated { nodes } | Payload::SwarmItemsAdded { nodes, .. } => {
                nodes.len()
            }
            _ => 0,
        }
    }

    /// Drop the task data this event carries about the signatures `selected` picks, in place,
    /// keeping what an auditor needs: the kind of event, node indexes, attempts, statuses,
    /// retry timing and `lost`, swarm counts, `parked`, the signatures' names, task names, retry
    /// policies, swarm configs, links and return fields, and whether a message is a result
    /// (`as_result`) or an error retryable. Replaced:
    ///
    /// - kwargs of the specs of [`Payload::WorkflowCreated`] / [`Payload::SwarmItemsAdded`]
    ///   and of [`Payload::KwargsUpdated`] → `{}`;
    /// - the message value of [`Payload::Queued`] / [`Payload::ContainerStarted`] → `null`;
    /// - the result of [`Payload::Succeeded`], the data of [`Payload::Checkpointed`] → `null`;
    /// - the error message of [`Payload::RetryScheduled`] / [`Payload::Failed`] →
    ///   [`REDACTED_ERROR`].
    ///
    /// Only the event's own node is looked at: data of a selected signature that was copied
    /// into ANOTHER signature's event (a callback's or the next chain step's message, a
    /// container's result) stays unless that signature is selected too. A spec of a batch gets
    /// index `first_index + offset` (0 for [`Payload::WorkflowCreated`]; for
    /// [`Payload::SwarmItemsAdded`] the number of signatures the workflow had before the event:
    /// [`Redactor`] keeps count). [`Payload::ResumeReport`] is left alone. Idempotent; a
    /// redacted event still encodes, and a redacted stream folds to the same statuses. Returns
    /// whether anything changed.
    pub fn redact(&mut self, first_index: NodeIndex, selected: &dyn Fn(NodeIndex) -> bool) -> bool {
        use Payload::*;
        match self {
            WorkflowCreated { nodes } | SwarmItemsAdded { nodes, .. } => {
                let mut changed = false;
                for (offset, spec) in nodes.iter_mut().enumerate() {
                    let index = u64::from(first_index) + offset as u64;
                    if NodeIndex::try_from(index).is_ok_and(selected) {
                        changed |= replace_with(&mut spec.kwargs, empty_object());
                    }
                }
                changed
            }
            KwargsUpdated { node, kwargs } if selected(*node) => {
                replace_with(kwargs, empty_object())
            }
            Queued { node, message, .. } | ContainerStarted { node, message, .. }
                if selected(*node) =>
            {
                replace_with(&mut message.value, Value::Null)
            }
            Checkpointed { node, data, .. } if selected(*node) => replace_with(data, Value::Null),
            Succeeded { node, result, .. } if selected(*node) => replace_with(result, Value::Null),
            RetryScheduled { node, error, .. } | Failed { node, error, .. } if selected(*node) => {
                replace_with(&mut error.message, REDACTED_ERROR.to_owned())
            }
            GraphRouted {
                from, decisions, ..
            } if selected(*from) => decisions.iter_mut().fold(false, |changed, d| {
                replace_with(&mut d.saw, Value::Null) | changed
            }),
            _ => false,
        }
    }
}

impl Event {
    /// This event with the task data about the `selected` signatures dropped: see
    /// [`Payload::redact`] (`first_index`: index of the first spec of a batch event). Stream,
    /// seq, time, actor and schema are kept. To redact a whole stream, use [`Redactor`], which
    /// tracks `first_index`.
    pub fn redacted(&self, first_index: NodeIndex, selected: &dyn Fn(NodeIndex) -> bool) -> Event {
        let mut event = self.clone();
        event.payload.redact(first_index, selected);
        event
    }
}

/// Redacts one stream's events, fed in seq order from seq 1 (archived then live), counting
/// the signatures each batch creates so that every spec is matched against its own index.
pub struct Redactor<'a> {
    selected: &'a dyn Fn(NodeIndex) -> bool,
    /// Index the next created signature gets (the number of signatures so far).
    next_index: u64,
}

impl<'a> Redactor<'a> {
    pub fn new(selected: &'a dyn Fn(NodeIndex) -> bool) -> Self {
        Self {
            selected,
            next_index: 0,
        }
    }

    /// Redact the stream's next event in place ([`Payload::redact`]); whether it changed.
    pub fn redact(&mut self, event: &mut Event) -> bool {
        let first = match event.payload {
            Payload::WorkflowCreated { .. } => 0,
            _ => self.next_index,
        };
        let changed = event.payload.redact(
            NodeIndex::try_from(first).unwrap_or(NodeIndex::MAX),
            self.selected,
        );
        self.next_index = first + event.payload.created_nodes() as u64;
        changed
    }
}

/// Redact a whole stream (its events in seq order from seq 1) in place; returns how many
/// events changed.
pub fn redact_stream(events: &mut [Event], selected: &dyn Fn(NodeIndex) -> bool) -> usize {
    let mut redactor = Redactor::new(selected);
    let mut changed = 0;
    for event in events {
        if redactor.redact(event) {
            changed += 1;
        }
    }
    changed
}

#[cfg(test)]
mod redaction_tests {
    use super::*;
    use crate::codec;
    use crate::model::Workflow;
    use serde_json::json;

    fn scenario() -> (Workflow, Vec<Event>) {
        let (wf, events) = crate::fixtures::data_rich_workflow(WorkflowId::from_u128(42), "SECRET")
            .unwrap_or_else(|r| panic!("the fixture runs: {r:?}"));
        assert!(wf.is_finished());
        (wf, events)
    }

    fn encoded(events: &[Event]) -> Vec<Vec<u8>> {
        events
            .iter()
            .map(|e| codec::encode(e).expect("encode"))
            .collect()
    }

    fn contains(haystack: &[u8], needle: &str) -> bool {
        haystack
            .windows(needle.len())
            .any(|w| w == needle.as_bytes())
    }

    fn kinds(events: &[Event]) -> Vec<&'static str> {
        events.iter().map(|e| e.payload.kind()).collect()
    }

    #[test]
    fn the_scenario_covers_every_kind_with_data() {
        let (wf, events) = scenario();
        for kind in [
            "workflow_created",
            "swarm_items_added",
            "kwargs_updated",
            "queued",
            "container_started",
            "checkpointed",
            "succeeded",
            "retry_scheduled",
            "failed",
            "canceled",
        ] {
            assert!(kinds(&events).contains(&kind), "no {kind} event");
        }
        assert_eq!(wf.nodes.len(), 7);
        assert!(wf.is_finished());
    }

    #[test]
    fn redacting_every_node_keeps_the_audit_trail_and_drops_the_data() {
        let (wf, events) = scenario();
        assert!(encoded(&events).iter().any(|b| contains(b, "SECRET")));
        let mut redacted = events.clone();
        let changed = redact_stream(&mut redacted, &|_| true);
        assert!(changed > 0);

        // Same envelope, same kinds, same nodes, attempts and retry timing.
        assert_eq!(redacted.len(), events.len());
        for (r, e) in redacted.iter().zip(&events) {
            assert_eq!(
                (r.stream, r.seq, r.at, &r.actor, r.schema),
                (e.stream, e.seq, e.at, &e.actor, e.schema)
            );
            assert_eq!(r.payload.kind(), e.payload.kind());
            assert_eq!(r.payload.node(), e.payload.node());
            match (&r.payload, &e.payload) {
                (
                    Payload::RetryScheduled {
                        attempt: a,
                        retry_at: t,
                        lost: l,
                        error: er,
                        ..
                    },
                    Payload::RetryScheduled {
                        attempt: b,
                        retry_at: u,
                        lost: m,
                        error: ee,
                        ..
                    },
                ) => {
                    assert_eq!((a, t, l, er.retryable), (b, u, m, ee.retryable));
                    assert_eq!(er.message, REDACTED_ERROR);
                }
                (Payload::Started { attempt: a, .. }, Payload::Started { attempt: b, .. }) => {
                    assert_eq!(a, b)
                }
                _ => {}
            }
        }

        // Every redacted event round-trips through the codec; none holds task data, but the
        // names of the signatures and their tasks are still there.
        let bytes = encoded(&redacted);
        for (b, r) in bytes.iter().zip(&redacted) {
            assert_eq!(&codec::decode(b).expect("decode"), r);
            assert!(!contains(b, "SECRET"), "{:?}", r.payload);
        }
        let all: Vec<u8> = bytes.concat();
        for name in ["root", "fan", "task_a", "task_x", "task_y", "task_cleanup"] {
            assert!(contains(&all, name), "{name} was dropped");
        }

        // The redacted stream folds, in order, to the same statuses and attempts.
        let replayed = Workflow::replay(wf.id, &redacted).expect("replay");
        assert_eq!(replayed.version, wf.version);
        assert_eq!(replayed.nodes.len(), wf.nodes.len());
        for (r, n) in replayed.nodes.iter().zip(&wf.nodes) {
            assert_eq!(r.status, n.status, "{}", n.spec.name);
            assert_eq!(
                (r.attempt, r.failures, r.in_flight, &r.swarm, r.not_before),
                (n.attempt, n.failures, n.in_flight, &n.swarm, n.not_before)
            );
            assert_eq!((&r.spec.name, &r.spec.kind), (&n.spec.name, &n.spec.kind));
            assert_eq!(r.spec.kwargs, json!({}));
            assert!(r.checkpoint.as_ref().is_none_or(Value::is_null));
        }

        // Idempotent.
        let mut again = redacted.clone();
        assert_eq!(redact_stream(&mut again, &|_| true), 0);
        assert_eq!(again, redacted);
    }

    #[test]
    fn redacting_some_nodes_leaves_the_others_data() {
        let (_, events) = scenario();
        // The canceled swarm and its items: 2, 5 and 6 (items of a later batch).
        let selected = |n: NodeIndex| matches!(n, 2 | 5 | 6);
        let mut redacted = events.clone();
        redact_stream(&mut redacted, &selected);
        let replayed = Workflow::replay(WorkflowId::from_u128(42), &redacted).expect("replay");
        for (index, n) in replayed.nodes.iter().enumerate() {
            let secret = json!({ "secret": format!("SECRET-kwargs-{}", n.spec.name) });
            if selected(index as NodeIndex) {
                assert_eq!(n.spec.kwargs, json!({}), "{}", n.spec.name);
            } else if n.spec.name == "a" {
                assert_eq!(n.spec.kwargs["secret"], secret["secret"]);
                assert_eq!(n.spec.kwargs["more"], "SECRET-update");
            } else {
                assert_eq!(n.spec.kwargs, secret, "{}", n.spec.name);
            }
        }
        for (r, e) in redacted.iter().zip(&events) {
            let batch = matches!(
                r.payload,
                Payload::WorkflowCreated { .. } | Payload::SwarmItemsAdded { .. }
            );
            if !batch && !r.payload.node().is_some_and(selected) {
                assert_eq!(r, e, "an event of an unselected node changed");
            }
        }
        let bytes = encoded(&redacted).concat();
        assert!(contains(&bytes, "SECRET-result-a"));
        assert!(!contains(&bytes, "SECRET-kwargs-x"));
        assert!(!contains(&bytes, "SECRET-result-x"));
        assert!(contains(&bytes, "SECRET-kwargs-cleanup"));

        // Only y (index 6, second spec of the swarm batch): x keeps its kwargs, so the batch's
        // specs are matched by their own index, not their offset.
        let mut only_y = events.clone();
        redact_stream(&mut only_y, &|n| n == 6);
        let added = only_y
            .iter()
            .find_map(|e| match &e.payload {
                Payload::SwarmItemsAdded { nodes, .. } => Some(nodes.clone()),
                _ => None,
            })
            .expect("a swarm_items_added event");
        assert_eq!(added[0].kwargs, json!({ "secret": "SECRET-kwargs-x" }));
        assert_eq!(added[1].kwargs, json!({}));
        let created = &only_y[0];
        assert_eq!(created, &events[0], "node 6 is not in the created batch");
        assert_eq!(
            events[0].redacted(0, &|n| n == 6),
            events[0],
            "Event::redacted agrees"
        );
    }

    #[test]
    fn resume_reports_are_left_alone() {
        let mut p = Payload::ResumeReport {
            report: json!({ "streams": 3 }),
        };
        assert!(!p.redact(0, &|_| true));
        assert_eq!(
            p,
            Payload::ResumeReport {
                report: json!({ "streams": 3 })
            }
        );
    }
}
