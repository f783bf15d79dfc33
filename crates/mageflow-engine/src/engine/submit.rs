//! What a submission is checked against before anything is written: the input's size and depth,
//! the input the first tasks reached will get (`check_entry`, for a [`Sig`] about to be
//! submitted or a stored workflow about to be run), the signatures one event may hold, and the
//! items added to a swarm; and [`Submitted`], what a labelled submit hands back.

use crate::error::{Error, Result};
use crate::registry::Registry;
use crate::sig::Sig;
use mageflow_core::{NodeIndex, Op, Rejection, SignatureId, Workflow, WorkflowId};
use serde_json::Value;
use std::borrow::Cow;
use std::collections::BTreeMap;

/// Largest encoded input of one submitted workflow, in bytes.
pub const INPUT_BYTES_MAX: usize = 4 * 1024 * 1024;

/// What [`Handle::submit_tree`] or [`Handle::create_tree`] created: the workflow, and the id
/// of each signature its builder labelled ([`crate::TaskSig::label`]).
///
/// [`Handle::create_tree`]: crate::Handle::create_tree
/// [`Handle::submit_tree`]: crate::Handle::submit_tree
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    /// The new workflow.
    pub workflow: WorkflowId,
    labels: BTreeMap<String, SignatureId>,
}

impl Submitted {
    /// Refuses a label used twice in one tree: it could name only one of them.
    pub(super) fn new(workflow: WorkflowId, labels: crate::sig::flatten::Labels) -> Result<Self> {
        let mut map = BTreeMap::new();
        for (label, index) in labels {
            let sig = SignatureId { workflow, index };
            if map.insert(label.clone(), sig).is_some() {
                return Err(Error::Rejected(Rejection::InvalidTree(format!(
                    "label {label:?} is given to more than one signature of the tree"
                ))));
            }
        }
        Ok(Self {
            workflow,
            labels: map,
        })
    }

    /// The root signature (what the builder passed to `submit_tree` was).
    pub fn root(&self) -> SignatureId {
        SignatureId::root(self.workflow)
    }

    /// The id of the signature labelled `label`; `None` if no signature of the tree has it.
    pub fn sig(&self, label: &str) -> Option<SignatureId> {
        self.labels.get(label).copied()
    }

    /// Every label of the tree with its signature's id, in label order.
    pub fn labels(&self) -> impl Iterator<Item = (&str, SignatureId)> + '_ {
        self.labels.iter().map(|(l, s)| (l.as_str(), *s))
    }
}

/// Refuse an input nested too deep or too large to store.
pub(super) fn check_input(input: &Value) -> Result<()> {
    crate::sig::check_depth("input", input)?;
    let bytes = serde_json::to_vec(input).map_or(0, |v| v.len());
    if bytes > INPUT_BYTES_MAX {
        return Err(Error::TooLarge {
            what: "input",
            bytes,
            max: INPUT_BYTES_MAX,
        });
    }
    Ok(())
}

/// A signature tree as entry validation sees it: a [`Sig`] about to be submitted, or a node of a
/// stored workflow about to be run.
pub(super) trait EntryNode: Sized {
    /// Task name of a task (`None` for a container).
    fn task(&self) -> Option<&str>;
    /// Bound kwargs (a JSON object).
    fn kwargs(&self) -> Cow<'_, Value>;
    /// What a message starting it reaches first: a chain's first step, a swarm's items, a
    /// graph's entry nodes.
    fn entries(&self) -> Vec<Self>;
}

impl<'a> EntryNode for &'a Sig {
    fn task(&self) -> Option<&str> {
        self.task_name()
    }
    fn kwargs(&self) -> Cow<'_, Value> {
        Cow::Owned(self.kwargs_value())
    }
    fn entries(&self) -> Vec<Self> {
        let sig: &'a Sig = self;
        sig.entries()
    }
}

/// A node of a stored workflow.
pub(super) struct StoredNode<'a> {
    pub(super) wf: &'a Workflow,
    pub(super) node: &'a mageflow_core::Node,
}

impl EntryNode for StoredNode<'_> {
    fn task(&self) -> Option<&str> {
        self.node.spec.task_name()
    }
    fn kwargs(&self) -> Cow<'_, Value> {
        Cow::Borrowed(&self.node.spec.kwargs)
    }
    fn entries(&self) -> Vec<Self> {
        let wf = self.wf;
        let children = self.node.spec.children();
        let entries: Vec<NodeIndex> = match &self.node.spec.kind {
            mageflow_core::KindSpec::Chain { .. } => {
                children.first().copied().into_iter().collect()
            }
            mageflow_core::KindSpec::Graph { edges, .. } => children
                .iter()
                .enumerate()
                .filter(|(p, _)| {
                    !edges
                        .iter()
                        .any(|e| e.to as usize == *p && e.max_iterations.is_none())
                })
                .map(|(_, &c)| c)
                .collect(),
            _ => children.to_vec(),
        };
        entries
            .into_iter()
            .filter_map(|i| wf.node(i))
            .map(|node| StoredNode { wf, node })
            .collect()
    }
}

/// Validate the input the first task(s) reached by `message` will get: the first step of a
/// chain (recursively), every item of a swarm, every entry node of a graph; the message deep-merged with the task's kwargs,
/// then those of each enclosing container (`outer`, innermost first), as at dispatch.
pub(super) fn check_entry<N: EntryNode>(
    registry: &Registry,
    sig: &N,
    message: &Value,
    outer: &[&Value],
) -> Result<()> {
    let own = sig.kwargs();
    if let Some(task) = sig.task() {
        let mut input = if message.is_null() {
            Value::Object(Default::default())
        } else {
            message.clone()
        };
        for kwargs in std::iter::once(own.as_ref()).chain(outer.iter().copied()) {
            input = mageflow_core::model::deep_merge(input, kwargs);
        }
        return registry.get(task)?.validate_input(&input);
    }
    let mut inner: Vec<&Value> = vec![own.as_ref()];
    inner.extend_from_slice(outer);
    sig.entries()
        .iter()
        .try_for_each(|m| check_entry(registry, m, message, &inner))
}

pub(super) fn flatten_items(
    registry: &Registry,
    state: &Workflow,
    swarm: NodeIndex,
    items: &[Sig],
    close: bool,
) -> Result<Op> {
    let base = state.nodes.len();
    let parent = Some(mageflow_core::Link {
        node: swarm,
        role: mageflow_core::Role::Child,
    });
    let mut nodes = Vec::new();
    let mut deferred = Vec::new();
    for item in items {
        // Labels of items added later are not handed back (`Handle::add_to_swarm`).
        item.flatten(
            registry,
            base,
            parent,
            &mut nodes,
            &mut deferred,
            &mut Vec::new(),
        )?;
    }
    if !deferred.is_empty() {
        return Err(Error::TooMany {
            what: "items of a swarm added inside another swarm's items (add them separately)",
            count: deferred.iter().map(|d| d.items.len()).sum(),
            max: 0,
        });
    }
    let template = state
        .node(swarm)
        .and_then(|n| n.spec.item_callbacks())
        .map(|t| (swarm, t));
    check_node_count(
        nodes.len() + mageflow_core::kind::swarm::item_callback_copies(&nodes, base, template),
    )?;
    Ok(Op::AddSwarmItems {
        swarm,
        nodes,
        close,
    })
}

pub(super) fn check_node_count(count: usize) -> Result<()> {
    if count > crate::sig::CREATE_NODES_MAX {
        return Err(Error::TooMany {
            what: "signatures in one event (swarm items are split automatically; chain steps and callbacks are not)",
            count,
            max: crate::sig::CREATE_NODES_MAX,
        });
    }
    Ok(())
}
