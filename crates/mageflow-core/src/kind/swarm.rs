//! A swarm: items run in parallel, at most `max_concurrency` at once, handed out in order of
//! addition; it succeeds with every item's outcome once it is closed and all are finished, and
//! fails as soon as `stop_after_n_failures` items have failed. An open swarm takes new items.

use crate::apply::validate_nodes;
use crate::command::Rejection;
use crate::decide::{invalid, Decider};
use crate::event::Payload;
use crate::id::NodeIndex;
use crate::model::{KindSpec, Message, NodeSpec, Outcome, Status, TaskError};
use serde_json::{json, Value};

/// The swarm's items, config and whether it is closed; a rejection if `swarm` is none.
fn check_swarm(d: &Decider<'_>, swarm: NodeIndex) -> Result<bool, Rejection> {
    match &d.wf.nodes[swarm as usize].spec.kind {
        KindSpec::Swarm { closed, .. } => Ok(*closed),
        _ => Err(Rejection::NotASwarm(swarm)),
    }
}

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
    validate_nodes(&nodes, d.wf.nodes.len(), Some(swarm)).map_err(Rejection::InvalidTree)?;
    d.emit(Payload::SwarmItemsAdded { swarm, nodes })?;
    if close {
        d.emit(Payload::SwarmClosed { swarm })?;
    }
    fill(d, swarm)
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
    } = &s.spec.kind
    else {
        return Ok(());
    };
    if s.status != Status::Running {
        return Ok(());
    }
    let p = &s.swarm;
    // Items rerun while the swarm was full take the first free slots.
    let free = config.max_concurrency.saturating_sub(p.running);
    let reruns: Vec<NodeIndex> = p
        .rerun_waiting
        .iter()
        .take(free as usize)
        .copied()
        .collect();
    let free = free - reruns.len() as u32;
    // Items that finished before their turn (canceled while waiting) take no slot: they are
    // handed out along with the live ones, so they neither waste a slot nor hold the swarm up.
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
    let items = children[p.dispatched as usize..(p.dispatched + count) as usize].to_vec();
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
