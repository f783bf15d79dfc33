//! The declarative workflow format: a whole workflow — tasks, chains, swarms, graphs, gates,
//! nested to any depth, with callbacks and configs — as a JSON document, the one
//! `mageflow submit FILE.json` takes (and the HTTP API and the UI will). Its JSON Schema is
//! generated from these types ([`schema`]) and checked into `docs/workflow.schema.json`.
//!
//! Every node is an object with one key naming its kind:
//!
//! ```json
//! {"input": {"doc": 7},
//!  "root": {"graph": {"name": "review",
//!    "nodes": [{"name": "check", "run": {"task": {"task": "steps", "kwargs": {"steps": 1}}}},
//!              {"name": "approval", "run": {"gate": {}}}],
//!    "edges": [{"from": "check", "to": "approval", "when": "on_success"}]}}}
//! ```
//!
//! Unknown fields are refused; a refusal names the JSON path of what is wrong
//! (`root.graph.nodes[1].run: unknown variant ...`). [`parse`] only reads the document:
//! task names, kwargs and the graph's shape are checked against the registry at submission,
//! like any signature's.

use crate::error::{Error, Result};
pub use crate::sig::GraphEdge;
use crate::sig::{chain, gate, graph, sign, swarm, Sig};
use mageflow_core::Join;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Largest definition document accepted, in bytes.
pub const DEFINITION_BYTES_MAX: usize = 16 * 1024 * 1024;

/// A workflow to submit: its root signature and the input it starts with.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WorkflowDefinition {
    /// The workflow's root signature.
    pub root: Node,
    /// The input the root starts with (default `{}`).
    #[serde(default = "empty_object")]
    pub input: Value,
}

fn empty_object() -> Value {
    Value::Object(Map::new())
}

/// One signature, by kind.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Node {
    /// A registered task.
    Task(TaskNode),
    /// Steps run one after another, each receiving the previous result.
    Chain(ChainNode),
    /// Items run in parallel under a concurrency limit.
    Swarm(SwarmNode),
    /// Named nodes routed by conditional edges.
    Graph(GraphNode),
    /// Waits for a signal (`mageflow signal` / `reject`).
    Gate(GateNode),
}

/// What every kind of signature may carry: bound kwargs, callbacks, a label.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Common {
    /// Keyword arguments bound to the signature, merged over its input.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub kwargs: Map<String, Value>,
    /// Run with the result when it succeeds.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_success: Vec<Node>,
    /// Run with the input and the error when it fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_error: Vec<Node>,
    /// Run once after the first terminal outcome, whatever it is.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_cleanup: Vec<Node>,
    /// The caller's name for the signature (unique in the document).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Priority from -1000 to 1000 (high 100, medium 0 — the default, inheriting the enclosing
    /// signature's — low -100): a swarm starts its highest-priority waiting item next.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
}

/// A task signature.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskNode {
    /// The registered task's name.
    pub task: String,
    /// Retries after a retryable failure, overriding the task's registered policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<u32>,
    /// Milliseconds before the first retry (doubling after), with `retries`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub with: Common,
}

/// A chain.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChainNode {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// At least one.
    pub steps: Vec<Node>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub with: Common,
}

/// A swarm.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SwarmNode {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub items: Vec<Node>,
    /// Items running at once, at most (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrency: Option<u32>,
    /// Fail the swarm once this many items failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_after_n_failures: Option<u32>,
    /// Leave it open for items added while it runs (default closed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub open: bool,
    /// A success callback per item: each item gets its own copy, with the item's result and
    /// `mageflow_item` = {index, signature}.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_item_success: Option<Box<Node>>,
    /// An error callback per item: each item gets its own copy, with the item's input, its
    /// error (`mageflow_error`) and `mageflow_item`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_item_error: Option<Box<Node>>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub with: Common,
}

/// A conditional graph.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphNode {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub nodes: Vec<GraphMember>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub edges: Vec<GraphEdge>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub with: Common,
}

/// A node of a graph.
#[derive(Clone, Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GraphMember {
    /// Unique in the graph; edges and the graph's result name it.
    pub name: String,
    /// What it runs.
    pub run: Node,
    /// How it waits for several incoming edges (default `all`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub join: Join,
}

/// A gate.
#[derive(Clone, Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GateNode {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "is_default")]
    pub with: Common,
}

fn is_default<T: Default + Serialize>(v: &T) -> bool {
    // Comparing encodings keeps `PartialEq` off the recursive types.
    serde_json::to_value(v).ok() == serde_json::to_value(T::default()).ok()
}

/// Read a definition document: a typed error naming the JSON path of what is wrong, or the
/// workflow as a signature (checked against the registry when submitted) and its input.
pub fn parse(bytes: &[u8]) -> Result<(Sig, Value)> {
    let def: WorkflowDefinition = read(bytes)?;
    let sig = def.root.into_sig()?;
    Ok((sig, def.input))
}

/// A document of the format, under [`DEFINITION_BYTES_MAX`], errors naming the JSON path.
fn read<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    if bytes.len() > DEFINITION_BYTES_MAX {
        return Err(Error::TooLarge {
            what: "workflow definition",
            bytes: bytes.len(),
            max: DEFINITION_BYTES_MAX,
        });
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        invalid(format!("at {path}: {}", e.into_inner()))
    })
}

/// One signature in the format (a `Node`: `{"task": {...}}`, `{"chain": {...}}`, …), as a line
/// of the items file of `mageflow swarm add` holds it; errors name the JSON path.
pub fn parse_node(bytes: &[u8]) -> Result<Sig> {
    read::<Node>(bytes)?.into_sig()
}

/// The JSON Schema of the format, as checked into `docs/workflow.schema.json`.
pub fn schema() -> Value {
    serde_json::to_value(schemars::schema_for!(WorkflowDefinition)).unwrap_or(Value::Null)
}

fn invalid(reason: String) -> Error {
    Error::InvalidDefinition(reason)
}

impl Node {
    /// The signature this node describes.
    pub fn into_sig(self) -> Result<Sig> {
        let (sig, with): (Sig, Common) = match self {
            Node::Task(t) => {
                let mut s = sign(t.task);
                if t.retries.is_some() || t.backoff_ms.is_some() {
                    s = s.retries(t.retries.unwrap_or(0), t.backoff_ms.unwrap_or(0));
                }
                (s.into(), t.with)
            }
            Node::Chain(c) => {
                let steps = c.steps.into_iter().map(Node::into_sig);
                let mut s = chain(steps.collect::<Result<Vec<_>>>()?);
                if let Some(name) = c.name {
                    s = s.name(name);
                }
                (s.into(), c.with)
            }
            Node::Swarm(w) => {
                let items = w.items.into_iter().map(Node::into_sig);
                let mut s = swarm(items.collect::<Result<Vec<_>>>()?);
                if let Some(name) = w.name {
                    s = s.name(name);
                }
                if let Some(n) = w.max_concurrency {
                    s = s.max_concurrency(n);
                }
                if let Some(n) = w.stop_after_n_failures {
                    s = s.stop_after_n_failures(n);
                }
                if w.open {
                    s = s.open();
                }
                if let Some(cb) = w.on_item_success {
                    s = s.on_item_success(cb.into_sig()?);
                }
                if let Some(cb) = w.on_item_error {
                    s = s.on_item_error(cb.into_sig()?);
                }
                (s.into(), w.with)
            }
            Node::Graph(g) => {
                let mut s = graph();
                if let Some(name) = g.name {
                    s = s.name(name);
                }
                for m in g.nodes {
                    let join = m.join;
                    let name = m.name;
                    s = s.node(name.clone(), m.run.into_sig()?);
                    if join == Join::Any {
                        s = s.join_any(&name);
                    }
                }
                for e in g.edges {
                    s = match e.max_iterations {
                        Some(max) => s.loop_edge(e.from, e.to, e.when, max),
                        None => s.edge(e.from, e.to, e.when),
                    };
                }
                (s.into(), g.with)
            }
            Node::Gate(g) => {
                let mut s = gate();
                if let Some(name) = g.name {
                    s = s.name(name);
                }
                (s.into(), g.with)
            }
        };
        with.apply(sig)
    }
}

impl Common {
    fn apply(self, sig: Sig) -> Result<Sig> {
        let mut sig = sig.with_kwargs(self.kwargs);
        for cb in self.on_success {
            sig = sig.with_callback(Callback::Success, cb.into_sig()?);
        }
        for cb in self.on_error {
            sig = sig.with_callback(Callback::Error, cb.into_sig()?);
        }
        for cb in self.on_cleanup {
            sig = sig.with_callback(Callback::Cleanup, cb.into_sig()?);
        }
        if let Some(label) = self.label {
            sig = sig.with_label(label);
        }
        if let Some(priority) = self.priority {
            sig = sig.with_priority(priority);
        }
        Ok(sig)
    }
}

/// Which list a callback goes to ([`Sig::with_callback`]).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Callback {
    Success,
    Error,
    Cleanup,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    const REVIEW: &str = r#"{
      "input": {"doc": 7},
      "root": {"chain": {"name": "publish", "steps": [
        {"graph": {"name": "review",
          "nodes": [
            {"name": "check", "run": {"task": {"task": "steps", "retries": 2, "with": {"kwargs": {"steps": 1}}}}},
            {"name": "approval", "run": {"gate": {}}},
            {"name": "fan", "run": {"swarm": {"items": [{"task": {"task": "steps"}}], "max_concurrency": 2}}, "join": "any"}
          ],
          "edges": [
            {"from": "check", "to": "approval", "when": "on_success"},
            {"from": "approval", "to": "fan", "when": {"output": {"op": "eq", "path": "$.approved", "value": true}}}
          ]}},
        {"task": {"task": "steps", "with": {"label": "last", "on_error": [{"task": {"task": "steps"}}]}}}
      ]}}
    }"#;

    #[test]
    fn a_document_becomes_the_signature_a_builder_would_make() {
        let (sig, input) = parse(REVIEW.as_bytes()).expect("parses");
        assert_eq!(input, serde_json::json!({"doc": 7}));
        let steps = sig.members();
        assert!(matches!(sig, Sig::Chain(_)), "a chain: {sig:?}");
        let Sig::Graph(g) = &steps[0] else {
            panic!("a graph first")
        };
        let names: Vec<&str> = g.nodes().iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["check", "approval", "fan"]);
        assert_eq!(g.nodes()[2].join, Join::Any);
        assert!(matches!(g.nodes()[1].sig, Sig::Gate(_)));
        let last = serde_json::to_value(&steps[1]).expect("encodes");
        assert_eq!(last["task"]["common"]["label"], "last");
        assert_eq!(
            last["task"]["common"]["on_error"][0]["task"]["task"],
            "steps"
        );
        // It validates against a registry holding its tasks.
        let mut registry = Registry::new();
        crate::builtin::register(&mut registry);
        sig.validate(&registry).expect("valid");
    }

    #[test]
    fn a_bad_document_is_refused_naming_the_json_path() {
        let cases = [
            (r#"{"root": {"tsak": {"task": "x"}}}"#, "at root"),
            (
                r#"{"root": {"chain": {"steps": [{"task": {"task": "x", "retires": 1}}]}}}"#,
                "root.chain.steps[0].task",
            ),
            (
                r#"{"root": {"graph": {"nodes": [], "edges": [{"from": "a", "to": "b", "when": "sometimes"}]}}}"#,
                "root.graph.edges[0].when",
            ),
            (r#"{"root": {"gate": {}}, "extra": 1}"#, "extra"),
            (r#"{"root": "#, "at "),
            ("", "at "),
        ];
        for (doc, want) in cases {
            let e = parse(doc.as_bytes()).expect_err(doc);
            assert_eq!(e.code(), "invalid_definition", "{doc}: {e}");
            assert!(e.to_string().contains(want), "{doc}: {e} lacks {want:?}");
        }
        let big = vec![b' '; DEFINITION_BYTES_MAX + 1];
        assert_eq!(parse(&big).expect_err("too large").code(), "too_large");
    }

    /// `docs/workflow.schema.json` is what the types generate; `MAGEFLOW_BLESS=1` rewrites it.
    #[test]
    fn the_checked_in_json_schema_is_the_generated_one() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../docs/workflow.schema.json"
        );
        let generated = serde_json::to_string_pretty(&schema()).expect("encodes") + "\n";
        if std::env::var("MAGEFLOW_BLESS").as_deref() == Ok("1") {
            std::fs::write(path, &generated).expect("write the schema");
        }
        let committed = std::fs::read_to_string(path).expect("docs/workflow.schema.json");
        assert_eq!(
            committed, generated,
            "docs/workflow.schema.json is stale: rewrite it with MAGEFLOW_BLESS=1 cargo test -p mageflow-engine schema"
        );
    }
}
