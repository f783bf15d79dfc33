//! A built tree checked against the registry ([`Sig::validate`]) and flattened into the core's
//! node specs ([`Sig::flatten`]). A child of `sig` (it reads the builders' private fields) that
//! the parent does not use: the builders stay plain data below the registry, which names the
//! handler's context, which takes a `Sig`.

use super::{
    check_depth, Sig, SwarmSig, ITEM_CALLBACK_NODES_MAX, KWARGS_BYTES_MAX, LABEL_BYTES_MAX,
    SWARM_ITEMS_PER_EVENT,
};
use crate::error::{Error, Result};
use crate::registry::Registry;
use mageflow_core::model::ItemCallbacks;
use mageflow_core::{Edge, Join, KindSpec, Link, NodeIndex, NodeSpec, Role};
use serde_json::Value;

/// Labels of a tree being flattened, with the index each labelled signature got.
pub(crate) type Labels = Vec<(String, NodeIndex)>;

/// Items of a swarm that did not go into its creation event: added right after it.
pub(crate) struct Deferred {
    pub swarm: NodeIndex,
    pub items: Vec<Sig>,
    /// Close the swarm with the last chunk (it was built closed).
    pub close: bool,
    /// Items per event: fewer than [`SWARM_ITEMS_PER_EVENT`] when each brings copies of
    /// per-item callbacks ([`items_per_event`]).
    pub per_event: usize,
}

/// A swarm's per-item callbacks flattened into the core's templates (each rooted at 0), and
/// how many signatures one item's copies add. Refused over [`ITEM_CALLBACK_NODES_MAX`], or
/// holding a swarm too large for one event.
pub(crate) fn item_templates(s: &SwarmSig, registry: &Registry) -> Result<(ItemCallbacks, usize)> {
    let template = |sig: &Option<Box<Sig>>| -> Result<Vec<NodeSpec>> {
        let Some(sig) = sig else {
            return Ok(Vec::new());
        };
        let (mut out, mut deferred) = (Vec::new(), Vec::new());
        // Labels inside a template would name every copy: they are not handed back.
        sig.flatten(registry, 0, None, &mut out, &mut deferred, &mut Vec::new())?;
        if !deferred.is_empty() {
            return Err(Error::TooMany {
                what: "signatures in a swarm's per-item callbacks",
                count: out.len() + deferred.iter().map(|d| d.items.len()).sum::<usize>(),
                max: ITEM_CALLBACK_NODES_MAX,
            });
        }
        Ok(out)
    };
    let callbacks = ItemCallbacks {
        on_success: template(&s.on_item_success)?,
        on_error: template(&s.on_item_error)?,
    };
    let per_item = mageflow_core::kind::swarm::nodes_per_item(&callbacks);
    if per_item > ITEM_CALLBACK_NODES_MAX {
        return Err(Error::TooMany {
            what: "signatures in a swarm's per-item callbacks",
            count: per_item,
            max: ITEM_CALLBACK_NODES_MAX,
        });
    }
    Ok((callbacks, per_item))
}

/// Items of a swarm in one event when each brings `per_item` signatures of per-item callbacks:
/// an event holds about as many signatures as [`SWARM_ITEMS_PER_EVENT`] plain items.
pub(crate) fn items_per_event(per_item: usize) -> usize {
    (SWARM_ITEMS_PER_EVENT / (1 + per_item)).max(1)
}

impl Sig {
    /// Check every task name and every bound kwargs against the registry.
    pub fn validate(&self, registry: &Registry) -> Result<()> {
        let common = self.common();
        if let Some(reason) = &common.unserializable {
            return Err(Error::InvalidKwargs {
                task: self.task_name().unwrap_or("(container)").to_owned(),
                reason: reason.clone(),
            });
        }
        if let Some(label) = &common.label {
            if label.is_empty() || label.len() > LABEL_BYTES_MAX {
                return Err(Error::Rejected(mageflow_core::Rejection::InvalidTree(
                    format!("label {label:?} must be 1 to {LABEL_BYTES_MAX} bytes long"),
                )));
            }
        }
        if !(mageflow_core::PRIORITY_MIN..=mageflow_core::PRIORITY_MAX).contains(&common.priority) {
            return Err(Error::Rejected(mageflow_core::Rejection::InvalidPriority(
                common.priority,
            )));
        }
        let kwargs = Value::Object(common.kwargs.clone());
        check_depth("kwargs", &kwargs)?;
        let bytes = serde_json::to_vec(&kwargs).map_or(0, |v| v.len());
        if bytes > KWARGS_BYTES_MAX {
            return Err(Error::TooLarge {
                what: "kwargs",
                bytes,
                max: KWARGS_BYTES_MAX,
            });
        }
        match self {
            Sig::Task(t) => registry.get(&t.task)?.validate_kwargs(&kwargs)?,
            Sig::Chain(c) => {
                if c.steps.is_empty() {
                    return Err(Error::Rejected(mageflow_core::Rejection::InvalidTree(
                        "a chain needs at least one step".into(),
                    )));
                }
                c.steps.iter().try_for_each(|s| s.validate(registry))?
            }
            Sig::Swarm(s) => {
                if s.config.max_concurrency == 0 {
                    return Err(Error::Rejected(mageflow_core::Rejection::InvalidTree(
                        "max_concurrency must be at least 1".into(),
                    )));
                }
                s.items
                    .iter()
                    .chain(s.item_callbacks())
                    .try_for_each(|i| i.validate(registry))?
            }
            Sig::Graph(g) => {
                if g.nodes.is_empty() {
                    return Err(Error::Rejected(mageflow_core::Rejection::InvalidTree(
                        "a graph needs at least one node".into(),
                    )));
                }
                for name in g.edges.iter().flat_map(|e| e.when.predicate_names()) {
                    if !registry.has_predicate(name) {
                        return Err(Error::Rejected(mageflow_core::Rejection::InvalidTree(
                            format!(
                                "graph {}: an edge names predicate {name:?}, which is not \
                                 registered (Registry::predicate)",
                                g.name.as_deref().unwrap_or("graph")
                            ),
                        )));
                    }
                }
                g.nodes.iter().try_for_each(|n| n.sig.validate(registry))?
            }
            Sig::Gate(_) => {}
        }
        common
            .on_success
            .iter()
            .chain(&common.on_error)
            .chain(&common.on_cleanup)
            .try_for_each(|c| c.validate(registry))
    }

    /// Flatten into core node specs starting at index `base`, hanging off `parent`.
    /// Parents come before their children (preorder), as the core requires. Swarm items past
    /// [`items_per_event`] go to `deferred` (the swarm is left open for them). Each
    /// labelled signature's label and index go to `labels`.
    pub(crate) fn flatten(
        &self,
        registry: &Registry,
        base: usize,
        parent: Option<Link>,
        out: &mut Vec<NodeSpec>,
        deferred: &mut Vec<Deferred>,
        labels: &mut Labels,
    ) -> Result<NodeIndex> {
        let me = (base + out.len()) as NodeIndex;
        let common = self.common();
        if let Some(label) = &common.label {
            labels.push((label.clone(), me));
        }
        let swarm_templates = match self {
            Sig::Swarm(s) => Some(item_templates(s, registry)?),
            _ => None,
        };
        let per_event = swarm_templates
            .as_ref()
            .map_or(SWARM_ITEMS_PER_EVENT, |(_, per_item)| {
                items_per_event(*per_item)
            });
        let (name, kind, return_field) = match self {
            Sig::Task(t) => {
                let def = registry.get(&t.task)?;
                (
                    t.task.clone(),
                    KindSpec::Task {
                        task: t.task.clone(),
                        retry: t.retry.unwrap_or(def.retry),
                    },
                    def.return_field.clone(),
                )
            }
            Sig::Chain(c) => (
                c.name.clone().unwrap_or_else(|| "chain".into()),
                KindSpec::Chain {
                    children: Vec::new(),
                },
                mageflow_core::model::RETURN_FIELD_DEFAULT.to_owned(),
            ),
            Sig::Graph(g) => (
                g.name.clone().unwrap_or_else(|| "graph".into()),
                KindSpec::Graph {
                    children: Vec::new(),
                    edges: graph_edges(g)?,
                    joins: if g.nodes.iter().all(|n| n.join == Join::All) {
                        Vec::new()
                    } else {
                        g.nodes.iter().map(|n| n.join).collect()
                    },
                },
                mageflow_core::model::RETURN_FIELD_DEFAULT.to_owned(),
            ),
            Sig::Gate(g) => (
                g.name.clone().unwrap_or_else(|| "gate".into()),
                KindSpec::Gate,
                mageflow_core::model::RETURN_FIELD_DEFAULT.to_owned(),
            ),
            Sig::Swarm(s) => (
                s.name.clone().unwrap_or_else(|| "swarm".into()),
                KindSpec::Swarm {
                    children: Vec::new(),
                    config: s.config,
                    closed: s.closed && s.items.len() <= per_event,
                    item_callbacks: swarm_templates.map(|(t, _)| t).unwrap_or_default(),
                },
                mageflow_core::model::RETURN_FIELD_DEFAULT.to_owned(),
            ),
        };
        out.push(NodeSpec {
            name,
            kind,
            kwargs: Value::Object(common.kwargs.clone()),
            parent,
            on_success: Vec::new(),
            on_error: Vec::new(),
            return_field,
            on_cleanup: Vec::new(),
            priority: common.priority,
        });
        let link = |role| Some(Link { node: me, role });
        let mut members = self.members();
        if let Sig::Swarm(s) = self {
            if members.len() > per_event {
                deferred.push(Deferred {
                    swarm: me,
                    items: members[per_event..].to_vec(),
                    close: s.closed,
                    per_event,
                });
                members = &members[..per_event];
            }
        }
        let mut children = Vec::with_capacity(members.len());
        for m in members {
            children.push(m.flatten(registry, base, link(Role::Child), out, deferred, labels)?);
        }
        if let Sig::Graph(g) = self {
            for n in &g.nodes {
                let child =
                    n.sig
                        .flatten(registry, base, link(Role::Child), out, deferred, labels)?;
                // A graph's node is known by its name in the graph: edges, the result, views.
                out[child as usize - base].name = n.name.clone();
                children.push(child);
            }
        }
        let mut on_success = Vec::new();
        for c in &common.on_success {
            let cb = c.flatten(
                registry,
                base,
                link(Role::SuccessCallback),
                out,
                deferred,
                labels,
            )?;
            on_success.push(cb);
        }
        let mut on_error = Vec::new();
        for c in &common.on_error {
            let cb = c.flatten(
                registry,
                base,
                link(Role::ErrorCallback),
                out,
                deferred,
                labels,
            )?;
            on_error.push(cb);
        }
        let mut on_cleanup = Vec::new();
        for c in &common.on_cleanup {
            let cb = c.flatten(registry, base, link(Role::Cleanup), out, deferred, labels)?;
            on_cleanup.push(cb);
        }
        let spec = &mut out[me as usize - base];
        spec.on_success = on_success;
        spec.on_error = on_error;
        spec.on_cleanup = on_cleanup;
        match &mut spec.kind {
            KindSpec::Chain { children: c }
            | KindSpec::Swarm { children: c, .. }
            | KindSpec::Graph { children: c, .. } => *c = children,
            KindSpec::Task { .. } | KindSpec::Gate => {}
        }
        Ok(me)
    }
}

/// A graph's edges by node position, ordered by source (stable: the order the edges of one
/// node were given is the order they are decided in), as the core requires.
fn graph_edges(g: &super::GraphSig) -> Result<Vec<Edge>> {
    let positions: std::collections::HashMap<&str, u32> = g
        .nodes
        .iter()
        .enumerate()
        .rev()
        .map(|(p, n)| (n.name.as_str(), p as u32))
        .collect();
    let position = |name: &str| {
        positions.get(name).copied().ok_or_else(|| {
            Error::Rejected(mageflow_core::Rejection::InvalidTree(format!(
                "graph {}: an edge names node {name:?}, which it does not have",
                g.name.as_deref().unwrap_or("graph")
            )))
        })
    };
    let mut edges = g
        .edges
        .iter()
        .map(|e| {
            Ok(Edge {
                from: position(&e.from)?,
                to: position(&e.to)?,
                when: e.when.clone(),
                max_iterations: e.max_iterations,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    edges.sort_by_key(|e| e.from);
    Ok(edges)
}
