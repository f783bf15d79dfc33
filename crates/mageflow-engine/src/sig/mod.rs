//! Building signatures: tasks, chains, swarms, graphs and gates, with callbacks, composed freely (a chain can
//! hold swarms, a swarm chains, a callback can be a chain). A built [`Sig`] is plain data; it is
//! validated against the registry and flattened into the core's `NodeSpec` list when submitted.
//! It also has a JSON form (serde), in which a handler in a worker process sends the tree it
//! submits to the orchestrator; the orchestrator validates it like any other submit.

pub(crate) mod flatten;
pub mod templates;

use crate::error::{Error, Result};
use mageflow_core::condition::Condition;
use mageflow_core::{Join, RetryPolicy, SwarmConfig};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest encoded kwargs of one signature, in bytes.
pub const KWARGS_BYTES_MAX: usize = 1024 * 1024;
/// Deepest nesting of arrays/objects accepted in inputs, kwargs, results and checkpoints —
/// well under the codec's decode limit, so whatever is stored can always be read back.
pub const VALUE_DEPTH_MAX: usize = 128;

/// Most swarm items that go into one event; a larger swarm is created with its first items and
/// the rest are added in the same atomic append, this many per event.
pub const SWARM_ITEMS_PER_EVENT: usize = 10_000;
/// Most signatures in one creation event (chain steps and callbacks cannot be split the way
/// swarm items are), which keeps every event far below the codec's size limit.
pub const CREATE_NODES_MAX: usize = 50_000;
/// Longest label ([`TaskSig::label`] and the like), in bytes.
pub const LABEL_BYTES_MAX: usize = 256;
/// Most signatures a swarm's per-item callbacks hold (both together): every item gets a copy.
pub const ITEM_CALLBACK_NODES_MAX: usize = 64;

/// Nesting depth of a JSON value, computed without recursion.
pub fn value_depth(v: &Value) -> usize {
    let mut max = 0;
    let mut stack = vec![(v, 1usize)];
    while let Some((v, d)) = stack.pop() {
        max = max.max(d);
        match v {
            Value::Array(a) => stack.extend(a.iter().map(|x| (x, d + 1))),
            Value::Object(o) => stack.extend(o.values().map(|x| (x, d + 1))),
            _ => {}
        }
    }
    max
}

/// Refuse a value nested deeper than [`VALUE_DEPTH_MAX`].
pub(crate) fn check_depth(what: &'static str, v: &Value) -> Result<()> {
    let depth = value_depth(v);
    if depth > VALUE_DEPTH_MAX {
        return Err(Error::TooDeep {
            what,
            depth,
            max: VALUE_DEPTH_MAX,
        });
    }
    Ok(())
}

/// Refuse a value from outside (a signal) nested deeper than [`VALUE_DEPTH_MAX`] or larger
/// than [`KWARGS_BYTES_MAX`] encoded.
pub(crate) fn check_value(what: &'static str, v: &Value) -> Result<()> {
    check_depth(what, v)?;
    let bytes = serde_json::to_vec(v).map_or(0, |v| v.len());
    if bytes > KWARGS_BYTES_MAX {
        return Err(Error::TooLarge {
            what,
            bytes,
            max: KWARGS_BYTES_MAX,
        });
    }
    Ok(())
}

pub(crate) fn to_input(input: impl Serialize) -> Result<Value> {
    serde_json::to_value(input).map_err(|e| Error::InvalidInput {
        task: "(submit)".into(),
        reason: e.to_string(),
    })
}

/// Any signature.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sig {
    /// A task ([`sign`]).
    Task(TaskSig),
    /// A chain ([`chain`]).
    Chain(ChainSig),
    /// A swarm ([`swarm`]).
    Swarm(SwarmSig),
    /// A conditional graph ([`graph`]).
    Graph(GraphSig),
    /// A gate that waits for a signal ([`gate`]).
    Gate(GateSig),
}

// The JSON form leaves out what is empty: a swarm of many plain tasks stays small on the wire.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Common {
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    kwargs: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    on_cleanup: Vec<Sig>,
    /// A kwarg that could not be serialized; reported by `validate` (also on the orchestrator,
    /// for a tree a worker sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    unserializable: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    on_success: Vec<Sig>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    on_error: Vec<Sig>,
    /// The caller's name for this signature, resolved to its id by `Handle::submit_tree`;
    /// not stored in the log.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    label: Option<String>,
    /// 0: medium, the default (inherits the enclosing signature's).
    #[serde(default, skip_serializing_if = "is_zero")]
    priority: i32,
}

fn is_zero(p: &i32) -> bool {
    *p == 0
}

impl Common {
    fn is_empty(&self) -> bool {
        self.priority == 0
            && self.kwargs.is_empty()
            && self.on_cleanup.is_empty()
            && self.unserializable.is_none()
            && self.on_success.is_empty()
            && self.on_error.is_empty()
            && self.label.is_none()
    }
}

/// A task signature ([`sign`]): a registered task with bound kwargs, callbacks and an
/// optional retry policy of its own.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TaskSig {
    task: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    retry: Option<RetryPolicy>,
    #[serde(default, skip_serializing_if = "Common::is_empty")]
    common: Common,
}

/// A chain ([`chain`]): steps run one after another, each receiving the previous result.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ChainSig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    steps: Vec<Sig>,
    #[serde(default, skip_serializing_if = "Common::is_empty")]
    common: Common,
}

/// A swarm ([`swarm`]): items run in parallel under a concurrency limit.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SwarmSig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    items: Vec<Sig>,
    config: SwarmConfig,
    closed: bool,
    /// Per-item success callback: every item gets its own copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on_item_success: Option<Box<Sig>>,
    /// Per-item error callback: every item gets its own copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    on_item_error: Option<Box<Sig>>,
    #[serde(default, skip_serializing_if = "Common::is_empty")]
    common: Common,
}

/// A conditional graph ([`graph`]): named nodes (any signature), and edges between them taken
/// on the source's outcome or on a predicate over its output. See `mageflow_core::kind::graph`
/// for how it runs: a node starts once its incoming edges allow it, a node no edge can reach
/// any more is skipped, a loop edge runs its loop again up to its bound, and the graph's
/// result is its terminal nodes' outputs by name.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GraphSig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    nodes: Vec<GraphNode>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    edges: Vec<GraphEdge>,
    #[serde(default, skip_serializing_if = "Common::is_empty")]
    common: Common,
}

/// A gate ([`gate`]): reached, it waits — running, on no worker — until a signal from outside
/// ([`crate::Handle::signal`], `mageflow signal`) accepts it (it succeeds with its input and
/// the signal's fields merged over it) or rejects it (it fails with the reason). An approval
/// step in a graph or a chain, a wait for a webhook.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GateSig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(default, skip_serializing_if = "Common::is_empty")]
    common: Common,
}

/// A gate that waits for a signal; see [`GateSig`].
pub fn gate() -> GateSig {
    GateSig {
        name: None,
        common: Common::default(),
    }
}

/// One node of a [`GraphSig`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GraphNode {
    /// Unique within the graph: edges name it, the graph's result is keyed by it, and the state
    /// and history show it as the signature's name.
    pub name: String,
    pub sig: Sig,
    #[serde(default)]
    pub join: Join,
}

/// One edge of a [`GraphSig`], between nodes by name (also an edge of the declarative format).
#[derive(Clone, Debug, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphEdge {
    pub from: String,
    pub to: String,
    /// When it is taken, judged on `from`'s outcome and output.
    pub when: Condition,
    /// A loop edge back to an earlier node: its loop runs at most this many times.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
}

/// A conditional graph; add nodes with [`GraphSig::node`] and edges with [`GraphSig::edge`].
pub fn graph() -> GraphSig {
    GraphSig {
        name: None,
        nodes: Vec::new(),
        edges: Vec::new(),
        common: Common::default(),
    }
}

/// A task invocation by registered name.
pub fn sign(task: impl Into<String>) -> TaskSig {
    TaskSig {
        task: task.into(),
        retry: None,
        common: Common::default(),
    }
}

/// Run `steps` one after another, each receiving the previous result.
pub fn chain(steps: impl IntoIterator<Item = impl Into<Sig>>) -> ChainSig {
    ChainSig {
        name: None,
        steps: steps.into_iter().map(Into::into).collect(),
        common: Common::default(),
    }
}

/// Run `items` in parallel under a concurrency limit. Closed by default; see [`SwarmSig::open`].
pub fn swarm(items: impl IntoIterator<Item = impl Into<Sig>>) -> SwarmSig {
    SwarmSig {
        name: None,
        items: items.into_iter().map(Into::into).collect(),
        config: SwarmConfig::default(),
        closed: true,
        on_item_success: None,
        on_item_error: None,
        common: Common::default(),
    }
}

macro_rules! common_builders {
    ($t:ty) => {
        impl $t {
            /// Bind one keyword argument (merged over the input at dispatch; kwargs win).
            pub fn kwarg(mut self, key: impl Into<String>, value: impl Serialize) -> Self {
                let key = key.into();
                match serde_json::to_value(value) {
                    Ok(value) => {
                        self.common.kwargs.insert(key, value);
                    }
                    Err(e) => self.common.unserializable = Some(format!("kwarg {key}: {e}")),
                }
                self
            }
            /// Bind every field of a serializable struct or map as kwargs.
            pub fn kwargs(mut self, kwargs: impl Serialize) -> Self {
                match serde_json::to_value(kwargs) {
                    Ok(Value::Object(map)) => self.common.kwargs.extend(map),
                    Ok(other) => {
                        self.common.unserializable =
                            Some(format!("kwargs must serialize to an object, not {other}"))
                    }
                    Err(e) => self.common.unserializable = Some(e.to_string()),
                }
                self
            }
            /// Run `callback` with this signature's result when it succeeds.
            pub fn on_success(mut self, callback: impl Into<Sig>) -> Self {
                self.common.on_success.push(callback.into());
                self
            }
            /// Run `callback` with this signature's input plus the error when it fails.
            pub fn on_error(mut self, callback: impl Into<Sig>) -> Self {
                self.common.on_error.push(callback.into());
                self
            }
            /// Name this signature for the caller: [`crate::Handle::submit_tree`] (and
            /// `create_tree`) hand back its id under this label (`submitted.sig("label")`),
            /// so a step, an item or a callback can be controlled without searching the
            /// tree. Labels are unique within one tree, non-empty and at most
            /// [`LABEL_BYTES_MAX`] bytes; they are not stored in the log.
            pub fn label(mut self, label: impl Into<String>) -> Self {
                self.common.label = Some(label.into());
                self
            }
            /// Run `callback` once after this signature's first terminal outcome — success,
            /// failure, interrupt or cancel — with its input plus `mageflow_cleanup` =
            /// `{signature, task, outcome, result | error}`. Its own failure is recorded and
            /// retried per its task's policy, and never changes this signature's outcome.
            pub fn on_cleanup(mut self, callback: impl Into<Sig>) -> Self {
                self.common.on_cleanup.push(callback.into());
                self
            }
            /// Run at `priority`: [`Priority::High`](mageflow_core::Priority), `Medium` (the
            /// default: the enclosing signature's), `Low`, or a number in
            /// [`PRIORITY_MIN`](mageflow_core::PRIORITY_MIN)..=[`PRIORITY_MAX`](mageflow_core::PRIORITY_MAX).
            /// A swarm hands out its highest-priority waiting item next (by order of addition
            /// within one priority); the deployment's workers claim higher priorities first.
            /// Change it while it waits with `Handle::set_priority`.
            pub fn priority(mut self, priority: impl Into<i32>) -> Self {
                self.common.priority = priority.into();
                self
            }
        }
        impl From<$t> for Sig {
            fn from(s: $t) -> Sig {
                <$t>::into_sig(s)
            }
        }
    };
}

common_builders!(TaskSig);
common_builders!(ChainSig);
common_builders!(SwarmSig);
common_builders!(GraphSig);
common_builders!(GateSig);

impl TaskSig {
    /// Override the task's registered retry policy for this signature.
    pub fn retries(mut self, max_retries: u32, backoff_ms: u64) -> Self {
        let mut p = self.retry.unwrap_or_default();
        p.max_retries = max_retries;
        p.backoff_ms = backoff_ms;
        self.retry = Some(p);
        self
    }
    fn into_sig(self) -> Sig {
        Sig::Task(self)
    }
}

impl ChainSig {
    /// The chain's name, as the state and the history show it (default `chain`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    fn into_sig(self) -> Sig {
        Sig::Chain(self)
    }
}

impl SwarmSig {
    /// The swarm's name, as the state and the history show it (default `swarm`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// Items running at once, at most (default 30; at least 1).
    pub fn max_concurrency(mut self, n: u32) -> Self {
        self.config.max_concurrency = n;
        self
    }
    /// Fail the swarm (and stop dispatching) once `n` items have failed.
    pub fn stop_after_n_failures(mut self, n: u32) -> Self {
        self.config.stop_after_n_failures = Some(n);
        self
    }
    /// Leave the swarm open: items can be added while it runs, until it is closed; it only
    /// finishes once closed.
    pub fn open(mut self) -> Self {
        self.closed = false;
        self
    }
    /// A success callback per item: each item gets its own copy of `sig`, which fires once when
    /// that item succeeds, with its result in its return field and `mageflow_item` = `{index,
    /// signature}` (the item's position and id) in its input. An ordinary signature (retries,
    /// suspend, history); it takes no concurrency slot, and the swarm's own callbacks wait for
    /// it. Items added later get theirs too. At most [`ITEM_CALLBACK_NODES_MAX`] signatures
    /// for both per-item callbacks together.
    pub fn on_item_success(mut self, sig: impl Into<Sig>) -> Self {
        self.on_item_success = Some(Box::new(sig.into()));
        self
    }
    /// An error callback per item: each item gets its own copy of `sig`, which fires once when
    /// that item fails for good, with the item's input, `mageflow_error` and `mageflow_item`.
    /// A failing per-item callback changes no item's outcome, so it does not count toward
    /// [`SwarmSig::stop_after_n_failures`]. See [`SwarmSig::on_item_success`].
    pub fn on_item_error(mut self, sig: impl Into<Sig>) -> Self {
        self.on_item_error = Some(Box::new(sig.into()));
        self
    }
    /// The per-item callbacks, success then error.
    pub(crate) fn item_callbacks(&self) -> impl Iterator<Item = &Sig> {
        self.on_item_success
            .iter()
            .chain(&self.on_item_error)
            .map(|b| &**b)
    }
    fn into_sig(self) -> Sig {
        Sig::Swarm(self)
    }
}

impl GraphSig {
    /// The graph's name, as the state and the history show it (default `graph`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    /// Add node `name` running `sig`; it joins its incoming edges on all (see
    /// [`GraphSig::join_any`]).
    pub fn node(mut self, name: impl Into<String>, sig: impl Into<Sig>) -> Self {
        self.nodes.push(GraphNode {
            name: name.into(),
            sig: sig.into(),
            join: Join::All,
        });
        self
    }
    /// Node `name` starts at the first of its incoming edges taken, instead of waiting for all
    /// of them to be decided.
    pub fn join_any(mut self, name: &str) -> Self {
        if let Some(n) = self.nodes.iter_mut().find(|n| n.name == name) {
            n.join = Join::Any;
        }
        self
    }
    /// An edge from node `from` to node `to`, taken when `when` holds for `from`'s outcome.
    pub fn edge(mut self, from: impl Into<String>, to: impl Into<String>, when: Condition) -> Self {
        self.edges.push(GraphEdge {
            from: from.into(),
            to: to.into(),
            when,
            max_iterations: None,
        });
        self
    }
    /// A loop edge from node `from` back to the earlier node `to`: when `when` holds the nodes
    /// on the loop run again, at most `max_iterations` times; once more fails the graph.
    pub fn loop_edge(
        mut self,
        from: impl Into<String>,
        to: impl Into<String>,
        when: Condition,
        max_iterations: u32,
    ) -> Self {
        self.edges.push(GraphEdge {
            from: from.into(),
            to: to.into(),
            when,
            max_iterations: Some(max_iterations),
        });
        self
    }
    /// The graph's nodes, in the order they were added.
    pub fn nodes(&self) -> &[GraphNode] {
        &self.nodes
    }
    fn into_sig(self) -> Sig {
        Sig::Graph(self)
    }
}

impl GateSig {
    /// The gate's name, as the state and the history show it (default `gate`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }
    fn into_sig(self) -> Sig {
        Sig::Gate(self)
    }
}

impl Sig {
    fn common_mut(&mut self) -> &mut Common {
        match self {
            Sig::Task(t) => &mut t.common,
            Sig::Chain(c) => &mut c.common,
            Sig::Swarm(s) => &mut s.common,
            Sig::Graph(g) => &mut g.common,
            Sig::Gate(g) => &mut g.common,
        }
    }

    /// Bind `kwargs` (over those already bound), whatever the kind.
    pub(crate) fn with_kwargs(mut self, kwargs: Map<String, Value>) -> Sig {
        self.common_mut().kwargs.extend(kwargs);
        self
    }

    /// Add a callback, whatever the kind.
    pub(crate) fn with_callback(mut self, which: crate::definition::Callback, cb: Sig) -> Sig {
        use crate::definition::Callback;
        let common = self.common_mut();
        match which {
            Callback::Success => common.on_success.push(cb),
            Callback::Error => common.on_error.push(cb),
            Callback::Cleanup => common.on_cleanup.push(cb),
        }
        self
    }

    /// Give it a priority, whatever the kind.
    pub(crate) fn with_priority(mut self, priority: i32) -> Sig {
        self.common_mut().priority = priority;
        self
    }

    /// Label it, whatever the kind.
    pub(crate) fn with_label(mut self, label: String) -> Sig {
        self.common_mut().label = Some(label);
        self
    }

    fn common(&self) -> &Common {
        match self {
            Sig::Task(t) => &t.common,
            Sig::Chain(c) => &c.common,
            Sig::Swarm(s) => &s.common,
            Sig::Graph(g) => &g.common,
            Sig::Gate(g) => &g.common,
        }
    }

    /// Bound kwargs as a JSON object.
    pub fn kwargs_value(&self) -> Value {
        Value::Object(self.common().kwargs.clone())
    }

    /// Task name of a task signature.
    pub fn task_name(&self) -> Option<&str> {
        match self {
            Sig::Task(t) => Some(&t.task),
            _ => None,
        }
    }

    /// Steps of a chain or items of a swarm (empty for a task, a gate and a graph: see
    /// [`GraphSig::nodes`]).
    pub fn members(&self) -> &[Sig] {
        match self {
            Sig::Task(_) | Sig::Graph(_) | Sig::Gate(_) => &[],
            Sig::Chain(c) => &c.steps,
            Sig::Swarm(s) => &s.items,
        }
    }

    /// The signatures a message that starts this one reaches first: the first step of a chain,
    /// every item of a swarm, the entry nodes of a graph (no forward edge into them).
    pub fn entries(&self) -> Vec<&Sig> {
        match self {
            Sig::Task(_) | Sig::Gate(_) => Vec::new(),
            Sig::Chain(c) => c.steps.first().into_iter().collect(),
            Sig::Swarm(s) => s.items.iter().collect(),
            Sig::Graph(g) => {
                let targets: std::collections::HashSet<&str> = g
                    .edges
                    .iter()
                    .filter(|e| e.max_iterations.is_none())
                    .map(|e| e.to.as_str())
                    .collect();
                g.nodes
                    .iter()
                    .filter(|n| !targets.contains(n.name.as_str()))
                    .map(|n| &n.sig)
                    .collect()
            }
        }
    }
}
