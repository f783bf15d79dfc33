//! The state of one workflow (one log stream): a tree of signatures stored densely by index.
//! State is only ever changed by [`Workflow::apply`]; it is a pure fold of the stream's events.

use crate::condition::Condition;
use crate::id::{NodeIndex, SignatureId, WorkflowId};
use crate::time::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::fmt;

/// Field a success callback's result is injected into unless its task names another one
/// (the Python original's `ReturnValue` default).
pub const RETURN_FIELD_DEFAULT: &str = "mageflow_results";
/// Field an error callback finds the error in, next to the failed task's original input.
pub const ERROR_FIELD: &str = "mageflow_error";
/// Field a cleanup callback finds the outcome in, next to the signature's input.
pub const CLEANUP_FIELD: &str = "mageflow_cleanup";
/// Default number of swarm items running at once (as in the original).
pub const SWARM_MAX_CONCURRENCY_DEFAULT: u32 = 30;

/// Lifecycle status of a signature. See `docs/ARCHITECTURE.md` for the transition table.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Created, not triggered yet (a future chain step, an unfired callback, an undispatched item).
    Pending,
    /// Triggered with its input, waiting for a worker slot (or for its retry backoff).
    Queued,
    /// A task attempt is running on a worker; a container is dispatching its children.
    Running,
    /// Paused softly: nothing new starts; a running attempt is allowed to finish.
    Suspended,
    /// Stopped aggressively; resumable on a best-effort basis.
    Interrupted,
    /// Stopped and deleted; terminal, cannot be resumed.
    Canceled,
    /// Finished successfully; terminal.
    Done,
    /// Finished with an error (retries exhausted, or a failed child); terminal.
    Failed,
    /// A callback that can no longer fire (terminal): an error callback of a signature that
    /// succeeded, a success callback of one that failed, either kind of one that was canceled —
    /// and everything inside such a callback. No event names it: `apply` sets it with the
    /// outcome of the signature it hangs off, so it is part of the fold of that event (and a
    /// rerun makes it pending again).
    Skipped,
    /// Soft-deleted: kept until `expires_at` so it can be rerun, then purged.
    MarkedForDeletion { expires_at: Timestamp },
}

impl Status {
    /// Terminal statuses never change again (no event leaves them but a rerun).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Status::Done | Status::Failed | Status::Canceled | Status::Skipped
        )
    }

    /// Stable lowercase name, for display and filters.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Suspended => "suspended",
            Status::Interrupted => "interrupted",
            Status::Canceled => "canceled",
            Status::Done => "done",
            Status::Failed => "failed",
            Status::Skipped => "skipped",
            Status::MarkedForDeletion { .. } => "marked_for_deletion",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// [`Status::name`] of every status, in the order [`Workflow::inner_counts`] tables them.
const STATUS_NAMES: [&str; 10] = [
    Status::Pending.name(),
    Status::Queued.name(),
    Status::Running.name(),
    Status::Suspended.name(),
    Status::Interrupted.name(),
    Status::Canceled.name(),
    Status::Done.name(),
    Status::Failed.name(),
    Status::Skipped.name(),
    Status::MarkedForDeletion {
        expires_at: Timestamp(0),
    }
    .name(),
];

/// Retry policy of a task: `max_retries` extra attempts after the first, with exponential
/// backoff starting at `backoff_ms` and capped at `backoff_max_ms`.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct RetryPolicy {
    pub max_retries: u32,
    pub backoff_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_retries: 0,
            backoff_ms: 100,
            backoff_max_ms: 60_000,
        }
    }
}

impl RetryPolicy {
    /// Delay before attempt `next_attempt` (2 = first retry).
    pub fn backoff_for(&self, next_attempt: u32) -> u64 {
        let exp = next_attempt.saturating_sub(2).min(30);
        self.backoff_ms
            .saturating_mul(1u64 << exp)
            .min(self.backoff_max_ms)
    }
}

/// Swarm settings.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SwarmConfig {
    pub max_concurrency: u32,
    /// `None`: never stop because of failures (the swarm still succeeds, with failures listed).
    pub stop_after_n_failures: Option<u32>,
}

impl Default for SwarmConfig {
    fn default() -> Self {
        Self {
            max_concurrency: SWARM_MAX_CONCURRENCY_DEFAULT,
            stop_after_n_failures: None,
        }
    }
}

/// How a node hangs off its parent.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Child,
    SuccessCallback,
    ErrorCallback,
    /// Runs after every terminal outcome of its parent (success, failure, interrupt, cancel).
    Cleanup,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct Link {
    pub node: NodeIndex,
    pub role: Role,
}

/// What kind of signature a node is, as submitted.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KindSpec {
    Task {
        task: String,
        #[serde(default)]
        retry: RetryPolicy,
    },
    Chain {
        children: Vec<NodeIndex>,
    },
    Swarm {
        children: Vec<NodeIndex>,
        config: SwarmConfig,
        closed: bool,
        /// Per-item callbacks (schema 6): every item gets its own copy. Last, with a default:
        /// swarms written before them decode.
        #[serde(default, skip_serializing_if = "ItemCallbacks::is_empty")]
        item_callbacks: ItemCallbacks,
    },
    /// A conditional graph: its `children` are its nodes (any signature; names unique within
    /// the graph), `edges` route between them by position in `children`, `joins` say how a
    /// node with several incoming edges waits (empty: every node joins on all).
    Graph {
        children: Vec<NodeIndex>,
        edges: Vec<Edge>,
        #[serde(default)]
        joins: Vec<Join>,
    },
    /// A gate (schema 5): started like a container, it runs no handler and takes no worker; it
    /// waits, running, until a signal ([`crate::command::Op::Signal`]) from outside — an
    /// approval, a webhook, an operator — ends it: accepted, it succeeds with its input and the
    /// signal's fields merged over it; rejected, it fails with the reason.
    Gate,
}

/// A swarm's per-item callbacks (schema 6): templates, each a signature tree flattened with its
/// root at index 0 (no parent) and its links relative to that root. `decide` gives every item
/// the swarm gets — created with it or added later — its own copy of each, as that item's
/// success or error callback ([`crate::kind::swarm::instantiate_item_callbacks`]), with
/// `mageflow_item` = `{index, signature}` (the item's position and id) in its kwargs: so it
/// fires once per item, with the item's result (success) or its input and error (error), and is
/// an ordinary signature — retries, suspend, history. As internal callbacks of the swarm, they
/// hold its own callbacks until they end; they take no concurrency slot (the item's is freed
/// when the item ends) and do not count toward the failure limit (they change no item's
/// outcome).
#[derive(Clone, PartialEq, Debug, Default, Serialize, Deserialize)]
pub struct ItemCallbacks {
    #[serde(default)]
    pub on_success: Vec<NodeSpec>,
    #[serde(default)]
    pub on_error: Vec<NodeSpec>,
}

impl ItemCallbacks {
    pub fn is_empty(&self) -> bool {
        self.on_success.is_empty() && self.on_error.is_empty()
    }
}

/// Field of a per-item callback's input (from its kwargs) naming the item it fired for:
/// `{index, signature}`.
pub const ITEM_FIELD: &str = "mageflow_item";

/// An edge of a graph, between two of its nodes (positions in the graph's `children`).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Edge {
    pub from: u32,
    pub to: u32,
    /// When it is taken, judged on the outcome and output of `from`.
    pub when: Condition,
    /// A loop edge (back to an earlier node) runs its loop at most this many times; taken once
    /// more, the graph fails (`graph_loop_exceeded`). `None`: a forward edge.
    #[serde(default)]
    pub max_iterations: Option<u32>,
}

/// How a graph node with several incoming edges waits for them.
#[derive(
    Clone, Copy, PartialEq, Eq, Debug, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Join {
    /// Once every incoming edge is decided: runs if any was taken (with the outputs of all the
    /// taken ones, by node name), is skipped if none was.
    #[default]
    All,
    /// At the first incoming edge taken (with that one's output); skipped if none ever is.
    Any,
}

/// One signature as submitted: everything but its runtime state.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct NodeSpec {
    pub name: String,
    pub kind: KindSpec,
    /// Bound keyword arguments (a JSON object), merged over the message at dispatch.
    pub kwargs: Value,
    pub parent: Option<Link>,
    pub on_success: Vec<NodeIndex>,
    pub on_error: Vec<NodeIndex>,
    /// Input field a success callback's result goes into.
    pub return_field: String,
    /// Cleanup callbacks: run once after the first terminal outcome, whatever it is.
    #[serde(default)]
    pub on_cleanup: Vec<NodeIndex>,
    /// Priority (schema 6), within [`PRIORITY_MIN`]..=[`PRIORITY_MAX`]; 0 (medium, the default)
    /// inherits the nearest enclosing signature's ([`Workflow::priority`]). A swarm hands out its
    /// highest-priority waiting item next (by order of addition within one priority), and the
    /// deployment's ready queue serves higher priorities first. Last, skipped when 0: specs
    /// without one keep the bytes of schema 5.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub priority: i32,
}

fn is_zero(p: &i32) -> bool {
    *p == 0
}

/// Lowest priority a signature can have.
pub const PRIORITY_MIN: i32 = -1000;
/// Highest priority a signature can have.
pub const PRIORITY_MAX: i32 = 1000;

/// The named priority levels; any number in [`PRIORITY_MIN`]..=[`PRIORITY_MAX`] is finer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Priority {
    /// 100.
    High,
    /// 0, the default.
    Medium,
    /// -100.
    Low,
}

impl Priority {
    pub fn value(self) -> i32 {
        match self {
            Priority::High => 100,
            Priority::Medium => 0,
            Priority::Low => -100,
        }
    }

    /// `high`, `medium`, `low`, or a number in range.
    pub fn parse(s: &str) -> Option<i32> {
        match s {
            "high" => Some(Priority::High.value()),
            "medium" => Some(Priority::Medium.value()),
            "low" => Some(Priority::Low.value()),
            n => n
                .parse::<i32>()
                .ok()
                .filter(|p| (PRIORITY_MIN..=PRIORITY_MAX).contains(p)),
        }
    }
}

impl From<Priority> for i32 {
    fn from(p: Priority) -> i32 {
        p.value()
    }
}

impl KindSpec {
    /// The kind's name, as views and history print it: `"task"`, `"chain"`, `"swarm"`,
    /// `"graph"` or `"gate"`.
    pub fn name(&self) -> &'static str {
        match self {
            KindSpec::Task { .. } => "task",
            KindSpec::Chain { .. } => "chain",
            KindSpec::Swarm { .. } => "swarm",
            KindSpec::Graph { .. } => "graph",
            KindSpec::Gate => "gate",
        }
    }
}

impl NodeSpec {
    pub fn task(task: impl Into<String>) -> Self {
        let task = task.into();
        Self {
            name: task.clone(),
            kind: KindSpec::Task {
                task,
                retry: RetryPolicy::default(),
            },
            kwargs: Value::Object(Default::default()),
            parent: None,
            on_success: Vec::new(),
            on_error: Vec::new(),
            return_field: RETURN_FIELD_DEFAULT.to_owned(),
            on_cleanup: Vec::new(),
            priority: 0,
        }
    }

    pub fn children(&self) -> &[NodeIndex] {
        match &self.kind {
            KindSpec::Task { .. } | KindSpec::Gate => &[],
            KindSpec::Chain { children }
            | KindSpec::Swarm { children, .. }
            | KindSpec::Graph { children, .. } => children,
        }
    }

    /// The list of `role` (children for `Role::Child`).
    pub fn list(&self, role: Role) -> &[NodeIndex] {
        match role {
            Role::Child => self.children(),
            Role::SuccessCallback => &self.on_success,
            Role::ErrorCallback => &self.on_error,
            Role::Cleanup => &self.on_cleanup,
        }
    }

    /// Children and every kind of callback, in that order.
    pub fn all_refs(&self) -> impl Iterator<Item = NodeIndex> + '_ {
        self.children()
            .iter()
            .chain(&self.on_success)
            .chain(&self.on_error)
            .chain(&self.on_cleanup)
            .copied()
    }

    /// This spec with every index it holds (parent, children, callbacks) moved up by `by`: a
    /// template flattened at 0 placed at `by`.
    pub fn shifted(&self, by: NodeIndex) -> NodeSpec {
        let mut spec = self.clone();
        let up = |list: &mut Vec<NodeIndex>| list.iter_mut().for_each(|i| *i += by);
        if let Some(link) = &mut spec.parent {
            link.node += by;
        }
        match &mut spec.kind {
            KindSpec::Chain { children }
            | KindSpec::Swarm { children, .. }
            | KindSpec::Graph { children, .. } => up(children),
            KindSpec::Task { .. } | KindSpec::Gate => {}
        }
        up(&mut spec.on_success);
        up(&mut spec.on_error);
        up(&mut spec.on_cleanup);
        spec
    }

    /// A swarm's per-item callbacks (empty ones included); `None` for any other kind.
    pub fn item_callbacks(&self) -> Option<&ItemCallbacks> {
        match &self.kind {
            KindSpec::Swarm { item_callbacks, .. } => Some(item_callbacks),
            _ => None,
        }
    }

    pub fn task_name(&self) -> Option<&str> {
        match &self.kind {
            KindSpec::Task { task, .. } => Some(task),
            _ => None,
        }
    }
}

/// A message a node is triggered with. `as_result` means "put `value` into the receiving task's
/// return field" (callbacks, later chain steps); otherwise `value` is the input itself.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Message {
    pub value: Value,
    pub as_result: bool,
}

impl Message {
    pub fn input(value: Value) -> Self {
        Self {
            value,
            as_result: false,
        }
    }
    pub fn result(value: Value) -> Self {
        Self {
            value,
            as_result: true,
        }
    }
}

/// The error a task attempt ended with.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct TaskError {
    pub message: String,
    /// False when retrying cannot help (bad input, explicit non-retryable error).
    pub retryable: bool,
}

/// The final outcome of a node.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok(Value),
    Err(TaskError),
}

/// Runtime counters of a swarm.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct SwarmProgress {
    /// Items handed out so far (FIFO over `children`).
    pub dispatched: u32,
    /// Dispatched items not finished yet (they hold a concurrency slot).
    pub running: u32,
    pub succeeded: u32,
    pub failed: u32,
    /// Items rerun (`Op::Rerun`) while every slot was taken, in order: pending, they take the
    /// next free slots before the items never handed out, so a rerun keeps the swarm within
    /// `max_concurrency`. Last, with a default: older snapshots still decode.
    #[serde(default)]
    pub rerun_waiting: Vec<NodeIndex>,
    /// The waiting items by priority, once one has a priority (`None`: every item has the
    /// default, and the items from `dispatched` on wait in order of addition): keyed by
    /// (negated priority, position), so the first is handed out next. With it, `dispatched`
    /// counts the items handed out, not a prefix.
    #[serde(default)]
    pub by_priority: Option<std::collections::BTreeSet<(i64, u32)>>,
}

impl SwarmProgress {
    /// The place in `by_priority` of the item at `position` of priority `priority`: the highest
    /// priority first, by order of addition within one.
    pub fn queue_key(priority: i32, position: u32) -> (i64, u32) {
        (-i64::from(priority), position)
    }

    /// Whether the item at `position`, of priority `priority`, was handed out (it may have ended
    /// since).
    pub fn was_dispatched(&self, position: u32, priority: i32) -> bool {
        match &self.by_priority {
            None => position < self.dispatched,
            Some(waiting) => !waiting.contains(&Self::queue_key(priority, position)),
        }
    }
}

/// Runtime state of a graph: what was decided on each of its edges.
#[derive(Clone, PartialEq, Eq, Debug, Default, Serialize, Deserialize)]
pub struct GraphProgress {
    /// Per edge (in the graph's order): not decided yet (`None`), taken or not taken.
    pub decided: Vec<Option<bool>>,
    /// Per edge: how many times a loop edge was taken.
    pub iterations: Vec<u32>,
    /// Per node (position): forward edges into it not decided yet.
    pub undecided_in: Vec<u32>,
    /// Per node (position): forward edges into it taken.
    pub taken_in: Vec<u32>,
    /// Nodes in a terminal status (skipped included): the graph settles when all are.
    pub settled: u32,
    /// Per node (position): forward edges into it.
    #[serde(default)]
    pub incoming: Vec<u32>,
}

impl GraphProgress {
    /// The progress of a graph that has decided nothing yet.
    pub fn start(children: usize, edges: &[Edge]) -> Self {
        let mut undecided_in = vec![0; children];
        for e in edges.iter().filter(|e| e.max_iterations.is_none()) {
            if let Some(n) = undecided_in.get_mut(e.to as usize) {
                *n += 1;
            }
        }
        let incoming = undecided_in.clone();
        Self {
            decided: vec![None; edges.len()],
            iterations: vec![0; edges.len()],
            undecided_in,
            taken_in: vec![0; children],
            settled: 0,
            incoming,
        }
    }
}

/// One signature with its runtime state.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Node {
    pub spec: NodeSpec,
    pub status: Status,
    /// Message it was triggered with (kept while suspended so resume replays it).
    pub message: Option<Message>,
    /// Number of the latest attempt (0 = never started).
    pub attempt: u32,
    /// Attempts that failed and were retried (lost attempts are not counted).
    pub failures: u32,
    /// True while attempt `attempt` is running and may still report.
    pub in_flight: bool,
    /// Earliest start of the next attempt (retry backoff).
    pub not_before: Option<Timestamp>,
    pub outcome: Option<Outcome>,
    pub checkpoint: Option<Value>,
    pub swarm: SwarmProgress,
    /// Position in the parent's list (children, success or error callbacks).
    pub position: u32,
    /// Marked for deletion: purged at this instant unless rerun or restored before.
    pub deletion: Option<Timestamp>,
    /// What a graph decided on its edges (empty for every other kind). Last, with a default:
    /// snapshots written before graphs existed still decode.
    #[serde(default)]
    pub graph: GraphProgress,
}

impl Node {
    pub(crate) fn new(spec: NodeSpec) -> Self {
        Self {
            spec,
            status: Status::Pending,
            message: None,
            attempt: 0,
            failures: 0,
            in_flight: false,
            not_before: None,
            outcome: None,
            checkpoint: None,
            swarm: SwarmProgress::default(),
            position: 0,
            deletion: None,
            graph: GraphProgress::default(),
        }
    }

    /// The status to show: `marked_for_deletion` overlays the lifecycle status (a running node
    /// that is marked keeps running; see `docs/ARCHITECTURE.md`).
    pub fn visible_status(&self) -> Status {
        match self.deletion {
            Some(expires_at) => Status::MarkedForDeletion { expires_at },
            None => self.status,
        }
    }

    pub fn is_container(&self) -> bool {
        !matches!(self.spec.kind, KindSpec::Task { .. })
    }
}

/// Merge `over` into `base`: objects merge key by key, recursively; anything else replaces.
pub fn deep_merge(base: Value, over: &Value) -> Value {
    match (base, over) {
        (Value::Object(mut b), Value::Object(o)) => {
            for (k, v) in o {
                let merged = match b.remove(k) {
                    Some(old) => deep_merge(old, v),
                    None => v.clone(),
                };
                b.insert(k.clone(), merged);
            }
            Value::Object(b)
        }
        (base, Value::Null) => base,
        (_, o) => o.clone(),
    }
}

/// [`deep_merge`] taking `over` by value: the same result, with `over`'s parts moved instead of
/// copied.
pub fn deep_merge_owned(base: Value, over: Value) -> Value {
    match (base, over) {
        (Value::Object(mut b), Value::Object(o)) => {
            for (k, v) in o {
                let merged = match b.remove(&k) {
                    Some(old) => deep_merge_owned(old, v),
                    None => v,
                };
                b.insert(k, merged);
            }
            Value::Object(b)
        }
        (base, Value::Null) => base,
        (_, o) => o,
    }
}

/// The state of one workflow: the fold of its stream. Serializable for snapshots (see
/// [`Workflow::to_snapshot`]); the log of events stays the source of truth.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Workflow {
    pub id: WorkflowId,
    /// Sequence number of the last applied event (0 = empty stream).
    pub version: u64,
    pub created_at: Option<Timestamp>,
    pub nodes: Vec<Node>,
    /// Purged at the end of its deletion window: task data is gone, only the audit trail of
    /// what happened remains.
    pub purged: bool,
}

impl Workflow {
    /// The state as MessagePack (named fields), stored beside archived events so an auditor can
    /// read the final state without replaying; replaying the events gives the same state.
    pub fn to_snapshot(&self) -> Result<Vec<u8>, crate::CodecError> {
        rmp_serde::to_vec_named(self).map_err(|e| crate::CodecError::Encode(e.to_string()))
    }

    /// Decode a snapshot made by [`Workflow::to_snapshot`]; bad bytes are an error, not a panic.
    pub fn from_snapshot(bytes: &[u8]) -> Result<Self, crate::CodecError> {
        rmp_serde::from_slice(bytes).map_err(|e| crate::CodecError::Malformed(e.to_string()))
    }

    pub fn empty(id: WorkflowId) -> Self {
        Self {
            id,
            version: 0,
            created_at: None,
            nodes: Vec::new(),
            purged: false,
        }
    }

    pub fn exists(&self) -> bool {
        !self.nodes.is_empty()
    }

    pub fn root(&self) -> Option<&Node> {
        self.nodes.first()
    }

    pub fn node(&self, index: NodeIndex) -> Option<&Node> {
        self.nodes.get(index as usize)
    }

    /// The hierarchical status of a container: how many of the signatures inside it — its
    /// children, theirs, and the callbacks of those, to any depth, but not its own callbacks —
    /// are in each status (by [`Status::name`], as [`Node::visible_status`] shows it). Empty for
    /// a task or a gate, and for an index that does not exist.
    pub fn inner_counts(&self, node: NodeIndex) -> std::collections::BTreeMap<&'static str, u64> {
        let Some(n) = self.node(node) else {
            return std::collections::BTreeMap::new();
        };
        // Counted by position in a fixed table (a swarm holds a million), named at the end.
        let mut table = [0u64; STATUS_NAMES.len()];
        let slot = |s: Status| match s {
            Status::Pending => 0,
            Status::Queued => 1,
            Status::Running => 2,
            Status::Suspended => 3,
            Status::Interrupted => 4,
            Status::Canceled => 5,
            Status::Done => 6,
            Status::Failed => 7,
            Status::Skipped => 8,
            Status::MarkedForDeletion { .. } => 9,
        };
        // Lists still to count, walked in place (no copy of a million-item list).
        let mut lists: Vec<&[NodeIndex]> = vec![n.spec.children()];
        while let Some(list) = lists.pop() {
            for &i in list {
                let Some(inner) = self.node(i) else {
                    continue;
                };
                table[slot(inner.visible_status())] += 1;
                let s = &inner.spec;
                for l in [s.children(), &s.on_success, &s.on_error, &s.on_cleanup] {
                    if !l.is_empty() {
                        lists.push(l);
                    }
                }
            }
        }
        STATUS_NAMES
            .iter()
            .zip(table)
            .filter(|(_, n)| *n > 0)
            .map(|(name, n)| (*name, n))
            .collect()
    }

    /// Whether an internal callback of container `node` — a callback (success, error,
    /// cleanup) of a signature under its children, to any depth, with what is inside it; not
    /// its own callbacks — was triggered and has not ended. (Children still running, such as
    /// the items of a swarm that failed at its limit, do not hold it.) While one does, the
    /// container's own callbacks are held: they fire once the last internal one ends.
    pub fn inner_callbacks_running(&self, node: NodeIndex) -> bool {
        let Some(n) = self.node(node) else {
            return false;
        };
        if !n.is_container() {
            return false;
        }
        // (signature, whether it is a callback or inside one)
        let mut stack: Vec<(NodeIndex, bool)> =
            n.spec.children().iter().map(|&c| (c, false)).collect();
        while let Some((i, in_callback)) = stack.pop() {
            let Some(inner) = self.node(i) else {
                continue;
            };
            let busy = inner.in_flight || (inner.message.is_some() && !inner.status.is_terminal());
            if in_callback && busy {
                return true;
            }
            stack.extend(inner.spec.children().iter().map(|&c| (c, in_callback)));
            let s = &inner.spec;
            let callbacks = s.on_success.iter().chain(&s.on_error).chain(&s.on_cleanup);
            stack.extend(callbacks.map(|&c| (c, true)));
        }
        false
    }

    pub fn sig(&self, index: NodeIndex) -> SignatureId {
        SignatureId {
            workflow: self.id,
            index,
        }
    }

    /// Signatures whose task data is due for redaction once the workflow has finished: every
    /// canceled one and everything under it (children, callbacks, cleanups). `Some(empty)`: the
    /// whole workflow (its root was canceled, or it was purged); `None`: nothing.
    pub fn redaction_targets(&self) -> Option<Vec<NodeIndex>> {
        let canceled = |i: usize| self.nodes[i].status == Status::Canceled;
        if self.purged || (!self.nodes.is_empty() && canceled(0)) {
            return Some(Vec::new());
        }
        let under_canceled = |mut i: usize| loop {
            if canceled(i) {
                return true;
            }
            match self.nodes[i].spec.parent {
                Some(link) => i = link.node as usize,
                None => return false,
            }
        };
        let nodes: Vec<NodeIndex> = (0..self.nodes.len())
            .filter(|&i| under_canceled(i))
            .map(|i| i as NodeIndex)
            .collect();
        (!nodes.is_empty()).then_some(nodes)
    }

    /// The workflow is finished when its root and every callback triggered from it are
    /// terminal, and no attempt is still in flight — or when it was purged (nothing in it can
    /// move again, whatever status its signatures were left in).
    pub fn is_finished(&self) -> bool {
        if self.purged {
            return true;
        }
        // The root check first: it is O(1) and false for as long as the workflow runs.
        self.root().is_some_and(|r| r.status.is_terminal())
            && self.nodes.iter().all(|n| {
                !n.in_flight
                    && (n.status.is_terminal()
                        || (n.status == Status::Pending && n.message.is_none()))
            })
    }

    /// Nothing in the workflow can move without a user: it is finished, or no attempt is in
    /// flight and no task is queued to start (or waiting for its retry backoff) outside a
    /// paused container — what is left is suspended, interrupted, waiting under a paused
    /// signature, or waiting for what only a user gives (items or the close of an open swarm, a
    /// run of a created workflow, a signal to a gate). A resume, a run, an added item or a
    /// signal can set it moving again.
    pub fn is_settled(&self) -> bool {
        if self.is_finished() {
            return true;
        }
        self.nodes.iter().enumerate().all(|(i, n)| {
            !n.in_flight && (n.status != Status::Queued || self.is_paused(i as NodeIndex))
        })
    }

    /// The priority `index` runs at: its own, or (0, the default) the nearest enclosing
    /// signature's through child links (a chain item's steps run at the item's).
    pub fn priority(&self, index: NodeIndex) -> i32 {
        let mut i = index;
        loop {
            let Some(n) = self.node(i) else {
                return 0;
            };
            if n.spec.priority != 0 {
                return n.spec.priority;
            }
            match n.spec.parent {
                Some(Link {
                    node,
                    role: Role::Child,
                }) => i = node,
                _ => return 0,
            }
        }
    }

    /// The input a task receives: its message (wrapped into its return field when the message is
    /// a result), with its own kwargs deep-merged over it, then the kwargs of each enclosing
    /// container, innermost first, so a container's kwargs apply to every task inside it (as
    /// call kwargs do in the original).
    pub fn effective_input(&self, index: NodeIndex) -> Value {
        let Some(node) = self.node(index) else {
            return Value::Null;
        };
        let base = match &node.message {
            None => Value::Object(Default::default()),
            Some(m) if m.as_result => {
                let mut map = serde_json::Map::new();
                map.insert(node.spec.return_field.clone(), m.value.clone());
                Value::Object(map)
            }
            Some(m) if m.value.is_null() => Value::Object(Default::default()),
            Some(m) => m.value.clone(),
        };
        let mut input = deep_merge(base, &node.spec.kwargs);
        let mut link = node.spec.parent;
        while let Some(Link {
            node: p,
            role: Role::Child,
        }) = link
        {
            let parent = &self.nodes[p as usize];
            input = deep_merge(input, &parent.spec.kwargs);
            link = parent.spec.parent;
        }
        input
    }
}
