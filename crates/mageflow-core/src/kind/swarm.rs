//! A swarm: items run in parallel, at most `max_concurrency` at once, handed out in order of
//! addition; it succeeds with every item's outcome once it is closed and all are finished, and
//! fails as soon as `stop_after_n_failures` items have failed. An open swarm takes new items.

use crate::apply::validate_nodes;
use crate::command::Rejection;
use crate::decide::{invalid, Decider};
use crate::event::Payload;
use crate::id::NodeIndex;
use crate::model::{
    deep_merge, ItemCallbacks, KindSpec, Link, Message, NodeSpec, Outcome, Role, Status, TaskError,
    Workflow, ITEM_FIELD,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// The swarm's items, config and whether it is closed; a rejection if `swarm` is none.
fn check_swarm(d: &Decider<'_>, swarm: NodeIndex) -> Result<bool, Rejection> {
    match &d.wf.nodes[swarm as usize].spec.kind {
        KindSpec::Swarm { closed, .. } => Ok(*closed),
        _ => Err(Rejection::NotASwarm(swarm)),
    }
}

/// Most items a swarm hands out in one step: a swarm of a million items with no concurrency
/// limit starts them in steps of this many (each item that ends hands out more), so no step
/// queues more events than one append holds.
pub const SWARM_DISPATCH_PER_STEP: u32 = 10_000;

/// Add items to an open swarm that has not finished (and close it, with `close`).
pub(crate) fn add_items(
    d: &mut Decider<'_>,
    swarm: NodeIndex,
    nodes: Vec<NodeSpec>,
    close: bool,
) -> Result<(), Rejection> {
    let status = d.node_status(swarm)?;
    if check_swarm(d, swarm)? {
        return Err(Rejection::SwarmClosed(swarm));
    }
    if status.is_terminal() {
        return Err(invalid("add tasks to", status));
    }
    let base = d.wf.nodes.len();
    validate_nodes(&nodes, base, Some(swarm)).map_err(Rejection::InvalidTree)?;
    let mut nodes = nodes;
    instantiate_item_callbacks(d.wf, &mut nodes, base, Some(swarm));
    d.emit(Payload::SwarmItemsAdded { swarm, nodes })?;
    if close {
        d.emit(Payload::SwarmClosed { swarm })?;
    }
    fill(d, swarm)
}

/// Give every item in `nodes` (to be placed at `base..`) its copies of its swarm's per-item
/// callbacks ([`ItemCallbacks`]), appended to `nodes`: items of a swarm of the batch, and, with
/// `attach`, the items added to that existing swarm of `wf`. Copies can hold swarms with
/// per-item callbacks of their own: they are expanded in turn, as the loop reaches them.
pub(crate) fn instantiate_item_callbacks(
    wf: &Workflow,
    nodes: &mut Vec<NodeSpec>,
    base: usize,
    attach: Option<NodeIndex>,
) {
    let template = |spec: &NodeSpec| spec.item_callbacks().filter(|t| !t.is_empty()).cloned();
    let has_template = |spec: &NodeSpec| spec.item_callbacks().is_some_and(|t| !t.is_empty());
    let attached = attach.and_then(|s| Some((s, wf.node(s)?)));
    if !attached.is_some_and(|(_, n)| has_template(&n.spec)) && !nodes.iter().any(has_template) {
        return;
    }
    // Per swarm: its templates (copied once, not per item; `None`: it has none) and the items
    // seen so far — an item's position in its swarm.
    let mut swarms: BTreeMap<NodeIndex, (Option<ItemCallbacks>, u32)> = BTreeMap::new();
    if let Some((s, n)) = attached {
        swarms.insert(s, (template(&n.spec), n.spec.children().len() as u32));
    }
    let mut i = 0;
    while i < nodes.len() {
        let Some(Link {
            node: swarm,
            role: Role::Child,
        }) = nodes[i].parent
        else {
            i += 1;
            continue;
        };
        // A swarm of the batch (earlier in it), or the one the batch joins.
        let (templates, seen) = match (swarm as usize).checked_sub(base) {
            Some(offset) => swarms
                .entry(swarm)
                .or_insert_with(|| (template(&nodes[offset]), 0)),
            None => match swarms.get_mut(&swarm) {
                Some(s) => s,
                None => {
                    i += 1;
                    continue;
                }
            },
        };
        let Some(callbacks) = templates.as_ref() else {
            i += 1;
            continue;
        };
        let position = *seen;
        *seen += 1;
        let item = (base + i) as NodeIndex;
        let mark = json!({
            ITEM_FIELD: {
                "index": position,
                "signature": wf.sig(item).to_string(),
            }
        });
        for (role, copy) in [
            (Role::SuccessCallback, &callbacks.on_success),
            (Role::ErrorCallback, &callbacks.on_error),
        ] {
            if copy.is_empty() {
                continue;
            }
            let at = (base + nodes.len()) as NodeIndex;
            for (k, spec) in copy.iter().enumerate() {
                let mut spec = spec.shifted(at);
                if k == 0 {
                    spec.parent = Some(Link { node: item, role });
                    spec.kwargs = deep_merge(spec.kwargs, &mark);
                }
                nodes.push(spec);
            }
            match role {
                Role::SuccessCallback => nodes[i].on_success.push(at),
                _ => nodes[i].on_error.push(at),
            }
        }
        i += 1;
    }
}

/// How many signatures [`instantiate_item_callbacks`] appends to `nodes` (placed at `base..`):
/// what a caller numbering later signatures must skip. `attach`: the existing swarm the batch's
/// top items join, with its per-item callbacks.
pub fn item_callback_copies(
    nodes: &[NodeSpec],
    base: usize,
    attach: Option<(NodeIndex, &ItemCallbacks)>,
) -> usize {
    let template = |swarm: NodeIndex| match (swarm as usize).checked_sub(base) {
        Some(offset) => nodes.get(offset).and_then(NodeSpec::item_callbacks),
        None => attach.filter(|(s, _)| *s == swarm).map(|(_, t)| t),
    };
    let mut copies = 0;
    for n in nodes {
        if let Some(Link {
            node: swarm,
            role: Role::Child,
        }) = n.parent
        {
            if let Some(t) = template(swarm) {
                copies += nodes_per_item(t);
            }
        }
    }
    copies
}

/// Signatures one item's copies of `callbacks` add (with the copies of per-item callbacks of
/// swarms inside them).
pub fn nodes_per_item(callbacks: &ItemCallbacks) -> usize {
    [&callbacks.on_success, &callbacks.on_error]
        .into_iter()
        .filter(|t| !t.is_empty())
        .map(|t| t.len() + item_callback_copies(t, 0, None))
        .sum()
}

/// Close a swarm: it takes no more items and finishes once those it has are done. Closing a
/// closed swarm is a no-op.
pub(crate) fn close(d: &mut Decider<'_>, swarm: NodeIndex) -> Result<(), Rejection> {
    let status = d.node_status(swarm)?;
    if check_swarm(d, swarm)? {
        return Ok(());
    }
    if status.is_terminal() {
        return Err(invalid("close", status));
    }
    d.emit(Payload::SwarmClosed { swarm })?;
    fill(d, swarm)
}

/// Hand out swarm items while slots are free, then check whether the swarm is finished.
pub(super) fn fill(d: &mut Decider<'_>, swarm: NodeIndex) -> Result<(), Rejection> {
    let s = &d.wf.nodes[swarm as usize];
    let KindSpec::Swarm {
        children,
        config,
        closed,
        ..
    } = &s.spec.kind
    else {
        return Ok(());
    };
    if s.status != Status::Running {
        return Ok(());
    }
    let p = &s.swarm;
    // Items rerun while the swarm was full take the first free slots. At most
    // SWARM_DISPATCH_PER_STEP at once: the rest as items end (each end hands out again).
    let free = config
        .max_concurrency
        .saturating_sub(p.running)
        .min(SWARM_DISPATCH_PER_STEP);
    let reruns: Vec<NodeIndex> = p
        .rerun_waiting
        .iter()
        .take(free as usize)
        .copied()
        .collect();
    let free = free - reruns.len() as u32;
    // Items that finished before their turn (canceled while waiting) take no slot: they are
    // handed out along with the live ones, so they neither waste a slot nor hold the swarm up.
    let (count, items) = match &p.by_priority {
        // The highest priorities first, by order of addition within one (none of them ended).
        Some(waiting) => {
            let items: Vec<NodeIndex> = waiting
                .iter()
                .take(free as usize)
                .map(|&(_, position)| children[position as usize])
                .collect();
            (items.len() as u32, items)
        }
        None => {
            let mut count = 0u32;
            let mut live = 0u32;
            for &c in &children[p.dispatched as usize..] {
                if !d.wf.nodes[c as usize].status.is_terminal() {
                    if live == free {
                        break;
                    }
                    live += 1;
                }
                count += 1;
            }
            let from = p.dispatched as usize;
            (count, children[from..from + count as usize].to_vec())
        }
    };
    let all_finished = *closed && (p.succeeded + p.failed) as usize == children.len();
    // When every item is already terminal the triggers below are no-ops: the results hold.
    let results: Option<Vec<Value>> = all_finished.then(|| {
        children
            .iter()
            .map(|&c| match &d.wf.nodes[c as usize].outcome {
                Some(Outcome::Ok(v)) => json!({ "ok": v }),
                Some(Outcome::Err(e)) => json!({ "error": e.message }),
                None => Value::Null,
            })
            .collect()
    });
    let message = s.message.clone().unwrap_or(Message::input(Value::Null));
    for item in reruns {
        d.trigger(item, message.clone())?;
    }
    if count > 0 {
        d.emit(Payload::SwarmDispatched { swarm, count })?;
        for item in items {
            d.trigger(item, message.clone())?;
        }
    }
    if let Some(results) = results {
        d.emit(Payload::Succeeded {
            node: swarm,
            attempt: 0,
            result: Value::Array(results),
        })?;
        d.finished(swarm)?;
    }
    Ok(())
}

/// An item finished (whatever its outcome): fail the swarm if that reached its failure limit,
/// else hand out the next items.
///
/// A swarm stopped by its limit fails naming the item whose failure reached it.
pub(super) fn child_finished(
    d: &mut Decider<'_>,
    swarm: NodeIndex,
    item: NodeIndex,
) -> Result<(), Rejection> {
    let s = &d.wf.nodes[swarm as usize];
    let KindSpec::Swarm { config, .. } = &s.spec.kind else {
        return Ok(());
    };
    let failed = s.swarm.failed;
    match config.stop_after_n_failures {
        Some(limit) if failed >= limit => {
            let last = match &d.wf.nodes[item as usize].outcome {
                Some(Outcome::Err(e)) => d.inner_failure("item", item, e).message,
                _ => String::new(),
            };
            let error = TaskError {
                message: format!("swarm stopped after {failed} failed tasks; the last: {last}"),
                retryable: false,
            };
            d.emit(Payload::Failed {
                node: swarm,
                attempt: 0,
                error,
            })?;
            d.finished(swarm)
        }
        _ => fill(d, swarm),
    }
}
