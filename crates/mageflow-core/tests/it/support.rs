//! Test helpers: a tree builder that encodes nested signatures into the flat `NodeSpec` form
//! (root at index 0, parents before children, `parent` links matching the parents' lists), and a
//! harness that runs commands through `execute` while checking, on every step, what must hold
//! for any command: `decide` agrees with `execute`, a rejection changes nothing, and the live
//! state equals the replay of the log.

use mageflow_core::{
    decide, execute, Actor, Command, Event, KindSpec, Link, Message, NodeIndex, NodeSpec, Op,
    Payload, Rejection, RetryPolicy, Role, Status, SwarmConfig, TaskError, Timestamp, Workflow,
    WorkflowId,
};
use serde_json::{json, Value};

/// A signature tree as a test writes it; [`Tree::flatten`] turns it into `NodeSpec`s.
#[derive(Clone, Debug)]
pub struct Tree {
    pub name: String,
    pub kind: TreeKind,
    pub kwargs: Value,
    pub on_success: Vec<Tree>,
    pub on_error: Vec<Tree>,
    pub on_cleanup: Vec<Tree>,
    pub priority: i32,
}

#[derive(Clone, Debug)]
pub enum TreeKind {
    Task {
        retry: RetryPolicy,
    },
    Chain(Vec<Tree>),
    Swarm {
        children: Vec<Tree>,
        config: SwarmConfig,
        closed: bool,
        /// Per-item success and error callbacks.
        per_item: Box<(Option<Tree>, Option<Tree>)>,
    },
    Graph {
        children: Vec<Tree>,
        edges: Vec<mageflow_core::Edge>,
        joins: Vec<mageflow_core::Join>,
    },
    Gate,
}

/// A gate: waits for a signal.
pub fn gate(name: &str) -> Tree {
    Tree {
        kind: TreeKind::Gate,
        ..task(name)
    }
}

/// A conditional graph of `children` (edges by position in `children`).
pub fn graph(
    name: &str,
    children: impl IntoIterator<Item = Tree>,
    edges: Vec<mageflow_core::Edge>,
    joins: Vec<mageflow_core::Join>,
) -> Tree {
    Tree {
        kind: TreeKind::Graph {
            children: children.into_iter().collect(),
            edges,
            joins,
        },
        ..task(name)
    }
}

pub fn task(name: &str) -> Tree {
    Tree {
        name: name.to_owned(),
        kind: TreeKind::Task {
            retry: RetryPolicy::default(),
        },
        kwargs: json!({}),
        on_success: Vec::new(),
        on_error: Vec::new(),
        on_cleanup: Vec::new(),
        priority: 0,
    }
}

pub fn chain(name: &str, children: impl IntoIterator<Item = Tree>) -> Tree {
    Tree {
        kind: TreeKind::Chain(children.into_iter().collect()),
        ..task(name)
    }
}

pub fn swarm(
    name: &str,
    max_concurrency: u32,
    stop_after_n_failures: Option<u32>,
    closed: bool,
    children: impl IntoIterator<Item = Tree>,
) -> Tree {
    Tree {
        kind: TreeKind::Swarm {
            children: children.into_iter().collect(),
            config: SwarmConfig {
                max_concurrency,
                stop_after_n_failures,
            },
            closed,
            per_item: Box::new((None, None)),
        },
        ..task(name)
    }
}

impl Tree {
    pub fn on_success(mut self, cb: Tree) -> Self {
        self.on_success.push(cb);
        self
    }

    pub fn on_error(mut self, cb: Tree) -> Self {
        self.on_error.push(cb);
        self
    }

    pub fn on_cleanup(mut self, cb: Tree) -> Self {
        self.on_cleanup.push(cb);
        self
    }

    /// A swarm's per-item success and error callbacks.
    pub fn per_item(mut self, on_success: Option<Tree>, on_error: Option<Tree>) -> Self {
        if let TreeKind::Swarm { per_item, .. } = &mut self.kind {
            **per_item = (on_success, on_error);
        }
        self
    }

    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }

    pub fn kwargs(mut self, kwargs: Value) -> Self {
        self.kwargs = kwargs;
        self
    }

    pub fn retry(mut self, max_retries: u32, backoff_ms: u64, backoff_max_ms: u64) -> Self {
        if let TreeKind::Task { retry } = &mut self.kind {
            *retry = RetryPolicy {
                max_retries,
                backoff_ms,
                backoff_max_ms,
            };
        }
        self
    }

    /// The specs of a new workflow rooted at this tree.
    pub fn flatten(&self) -> Vec<NodeSpec> {
        let mut out = Vec::new();
        self.flatten_into(0, None, &mut out);
        out
    }

    /// Append this tree's specs to `out`, whose first element will get index `base`; the root
    /// hangs off `parent`. Returns the root's index.
    pub fn flatten_into(
        &self,
        base: usize,
        parent: Option<Link>,
        out: &mut Vec<NodeSpec>,
    ) -> NodeIndex {
        let me = (base + out.len()) as NodeIndex;
        let slot = out.len();
        let kind = match &self.kind {
            TreeKind::Task { retry } => KindSpec::Task {
                task: self.name.clone(),
                retry: *retry,
            },
            TreeKind::Chain(_) => KindSpec::Chain {
                children: Vec::new(),
            },
            TreeKind::Swarm {
                config,
                closed,
                per_item,
                ..
            } => KindSpec::Swarm {
                children: Vec::new(),
                config: *config,
                closed: *closed,
                item_callbacks: mageflow_core::model::ItemCallbacks {
                    on_success: per_item.0.as_ref().map(Tree::flatten).unwrap_or_default(),
                    on_error: per_item.1.as_ref().map(Tree::flatten).unwrap_or_default(),
                },
            },
            TreeKind::Graph { edges, joins, .. } => KindSpec::Graph {
                children: Vec::new(),
                edges: edges.clone(),
                joins: joins.clone(),
            },
            TreeKind::Gate => KindSpec::Gate,
        };
        out.push(NodeSpec {
            name: self.name.clone(),
            kind,
            kwargs: self.kwargs.clone(),
            parent,
            on_success: Vec::new(),
            on_error: Vec::new(),
            return_field: mageflow_core::model::RETURN_FIELD_DEFAULT.to_owned(),
            on_cleanup: Vec::new(),
            priority: self.priority,
        });
        let kids: &[Tree] = match &self.kind {
            TreeKind::Task { .. } | TreeKind::Gate => &[],
            TreeKind::Chain(c) => c,
            TreeKind::Swarm { children, .. } | TreeKind::Graph { children, .. } => children,
        };
        let link = |role| Some(Link { node: me, role });
        let children: Vec<NodeIndex> = kids
            .iter()
            .map(|k| k.flatten_into(base, link(Role::Child), out))
            .collect();
        let on_success: Vec<NodeIndex> = self
            .on_success
            .iter()
            .map(|k| k.flatten_into(base, link(Role::SuccessCallback), out))
            .collect();
        let on_error: Vec<NodeIndex> = self
            .on_error
            .iter()
            .map(|k| k.flatten_into(base, link(Role::ErrorCallback), out))
            .collect();
        let on_cleanup: Vec<NodeIndex> = self
            .on_cleanup
            .iter()
            .map(|k| k.flatten_into(base, link(Role::Cleanup), out))
            .collect();
        let spec = &mut out[slot];
        match &mut spec.kind {
            KindSpec::Task { .. } | KindSpec::Gate => {}
            KindSpec::Chain { children: c }
            | KindSpec::Swarm { children: c, .. }
            | KindSpec::Graph { children: c, .. } => *c = children,
        }
        spec.on_success = on_success;
        spec.on_error = on_error;
        spec.on_cleanup = on_cleanup;
        me
    }
}

/// Specs for `Op::AddSwarmItems`: each item hangs off `swarm`, indexes continue at `base`.
pub fn swarm_items(swarm: NodeIndex, base: usize, items: &[Tree]) -> Vec<NodeSpec> {
    let mut out = Vec::new();
    for item in items {
        item.flatten_into(
            base,
            Some(Link {
                node: swarm,
                role: Role::Child,
            }),
            &mut out,
        );
    }
    out
}

pub const WF: u128 = 0x0190_0000_0000_7000_8000_0000_0000_0001;

pub fn wf_id() -> WorkflowId {
    WorkflowId::from_u128(WF)
}

/// Runs commands against one workflow and keeps its log.
pub struct Harness {
    pub wf: Workflow,
    pub log: Vec<Event>,
    clock: i64,
}

impl Default for Harness {
    fn default() -> Self {
        Self::empty()
    }
}

impl Harness {
    pub fn empty() -> Self {
        Self {
            wf: Workflow::empty(wf_id()),
            log: Vec::new(),
            clock: 1_700_000_000_000_000,
        }
    }

    /// Create the workflow of `tree`, triggered with `start` when given.
    pub fn new(tree: &Tree, start: Option<Value>) -> Self {
        let mut h = Self::empty();
        h.ok(Op::Create {
            nodes: tree.flatten(),
            start: start.map(Message::input),
        });
        h
    }

    pub fn now(&self) -> Timestamp {
        Timestamp::from_micros(self.clock)
    }

    /// Run one command (the clock advances 1 ms per command) and check the step invariants.
    pub fn exec(&mut self, op: Op) -> Result<Vec<Event>, Rejection> {
        self.clock += 1_000;
        // A start waits out the retry backoff, as the engine's timers do.
        if let Op::Start { node } = &op {
            if let Some(t) = self.wf.node(*node).and_then(|n| n.not_before) {
                self.clock = self.clock.max(t.as_micros());
            }
        }
        let actor = match op {
            Op::Start { .. } | Op::Complete { .. } | Op::Fail { .. } | Op::Checkpoint { .. } => {
                Actor::worker("w1")
            }
            _ => Actor::api("tester"),
        };
        let cmd = Command {
            actor,
            at: self.now(),
            op,
        };
        let before = self.wf.clone();
        let decided = decide(&before, &cmd);
        let result = execute(&mut self.wf, &cmd);
        assert_eq!(decided, result, "decide and execute disagree on {cmd:?}");
        match &result {
            Ok(events) => {
                for e in events {
                    assert_eq!(e.at, cmd.at);
                    assert_eq!(e.actor, cmd.actor);
                    assert_eq!(e.stream, self.wf.id);
                }
                self.log.extend(events.iter().cloned());
                let replayed = Workflow::replay(self.wf.id, &self.log).expect("log replays");
                assert_eq!(replayed, self.wf, "live state differs from replay");
            }
            Err(r) => {
                assert!(!matches!(r, Rejection::Internal(_)), "internal error: {r}");
                assert_eq!(before, self.wf, "rejected {cmd:?} changed the state");
            }
        }
        result
    }

    /// Run a command that must be accepted.
    pub fn ok(&mut self, op: Op) -> Vec<Event> {
        let desc = format!("{op:?}");
        match self.exec(op) {
            Ok(events) => events,
            Err(r) => panic!("{desc} was rejected: {r}"),
        }
    }

    /// Run a command that must be refused, returning the refusal.
    pub fn rejected(&mut self, op: Op) -> Rejection {
        let desc = format!("{op:?}");
        match self.exec(op) {
            Ok(events) => panic!("{desc} was accepted: {events:?}"),
            Err(r) => r,
        }
    }

    pub fn idx(&self, name: &str) -> NodeIndex {
        let found: Vec<usize> = (0..self.wf.nodes.len())
            .filter(|&i| self.wf.nodes[i].spec.name == name)
            .collect();
        assert_eq!(found.len(), 1, "expected one signature named {name}");
        found[0] as NodeIndex
    }

    pub fn status(&self, name: &str) -> Status {
        self.wf.nodes[self.idx(name) as usize].status
    }

    pub fn node(&self, name: &str) -> &mageflow_core::Node {
        &self.wf.nodes[self.idx(name) as usize]
    }

    /// A worker takes `name`; returns the attempt number.
    pub fn start(&mut self, name: &str) -> u32 {
        let node = self.idx(name);
        let events = self.ok(Op::Start { node });
        match events.as_slice() {
            [Event {
                payload: Payload::Started { attempt, .. },
                ..
            }] => *attempt,
            other => panic!("start of {name} emitted {other:?}"),
        }
    }

    pub fn complete(&mut self, name: &str, result: Value) -> Vec<Event> {
        let node = self.idx(name);
        let attempt = self.node(name).attempt;
        self.ok(Op::Complete {
            node,
            attempt,
            result,
        })
    }

    pub fn fail(&mut self, name: &str, message: &str, retryable: bool) -> Vec<Event> {
        let node = self.idx(name);
        let attempt = self.node(name).attempt;
        self.ok(Op::Fail {
            node,
            attempt,
            error: TaskError {
                message: message.to_owned(),
                retryable,
            },
        })
    }

    /// Start and complete a task.
    pub fn run(&mut self, name: &str, result: Value) -> Vec<Event> {
        self.start(name);
        self.complete(name, result)
    }

    /// Names of the tasks in `status`, in index order.
    pub fn named_in(&self, status: Status) -> Vec<String> {
        self.wf
            .nodes
            .iter()
            .filter(|n| n.status == status)
            .map(|n| n.spec.name.clone())
            .collect()
    }

    /// Events of the whole log about `name` whose kind is `kind`.
    pub fn count(&self, name: &str, kind: &str) -> usize {
        let node = self.idx(name);
        self.log
            .iter()
            .filter(|e| e.payload.node() == Some(node) && e.payload.kind() == kind)
            .count()
    }
}

/// The kinds of `events`, for readable assertions on what a step emitted.
pub fn kinds(events: &[Event]) -> Vec<(&'static str, Option<NodeIndex>)> {
    events
        .iter()
        .map(|e| (e.payload.kind(), e.payload.node()))
        .collect()
}
