//! A rerun of one signature inside a workflow (`Op::Rerun` naming a node that is not the root):
//! what it sends back to pending and which containers above it it reopens. Worked out here, once,
//! from the state alone: `decide` asks it whether the rerun may happen, and `apply` carries out
//! the same plan when it folds the `rerun` event, so replay resets exactly what the decision did.
//!
//! The signature runs again from the message it last ran with, and so does everything that
//! consumed its outcome: its own callbacks and, in each container above it that had ended with
//! it, what followed it there — the later steps of a chain, the nodes a graph reaches from it
//! by forward edges (their edges undecided again) — and that container's own callbacks. A
//! container above it that had ended runs again (`running`, no outcome) and ends anew when the
//! signature does; a swarm counts the item as running again — an item rerun while every slot
//! is taken waits for the next one (`SwarmProgress::rerun_waiting`), a signature inside such
//! an item is refused (`swarm_full`). A callback is rerun on its own: the
//! signature it hangs off keeps its outcome. Attempt numbers only grow; a graph's loop counts
//! are kept.

use crate::command::Rejection;
use crate::decide::invalid;
use crate::id::NodeIndex;
use crate::kind::graph;
use crate::model::{KindSpec, Link, Message, Outcome, Role, Status, Workflow};

/// One container above the rerun signature, with the child of it on the way down.
struct Level {
    container: NodeIndex,
    child: NodeIndex,
    /// `child` had ended (done, failed, skipped): the container counted it, and what followed it
    /// there may have run.
    child_ended: bool,
    /// Positions (in a graph's nodes) reset with it: reached from `child` by forward edges.
    downstream: Vec<u32>,
}

/// What a rerun of one signature changes.
pub(crate) struct Plan {
    node: NodeIndex,
    /// The message the signature runs again with.
    pub(crate) message: Message,
    /// It is an item of a swarm with no free slot: it waits for one (`rerun_waiting`) instead of
    /// being triggered now.
    pub(crate) waits: bool,
    /// Signatures sent back to pending with everything inside them and their callbacks.
    reset: Vec<NodeIndex>,
    levels: Vec<Level>,
}

/// Whether `node` was triggered and has not ended, or has an attempt in flight.
fn busy(wf: &Workflow, node: NodeIndex) -> bool {
    let n = &wf.nodes[node as usize];
    n.in_flight || (n.message.is_some() && !n.status.is_terminal())
}

/// The plan of a rerun of `node` (not the root: a rerun of the whole workflow resets everything),
/// or why it is refused: it is not done or failed (a canceled one never runs again), or
/// something it would reset still runs — inside it, a later step, a node downstream of it, the
/// callback of a container it reopens — or a container above it was canceled.
pub(crate) fn plan(wf: &Workflow, node: NodeIndex) -> Result<Plan, Rejection> {
    let n = wf.node(node).ok_or(Rejection::NoSuchNode(node))?;
    match n.status {
        Status::Canceled => return Err(Rejection::Canceled(node)),
        Status::Done | Status::Failed => {}
        s => return Err(invalid("rerun", s)),
    }
    let message = n.message.clone().ok_or(invalid("rerun", n.status))?;
    let mut reset = vec![node];
    let mut levels = Vec::new();
    let mut waits = false;
    let (mut child, mut child_ended, mut link) = (node, true, n.spec.parent);
    // Up through child links only: a callback's outcome changes nothing above it.
    while let Some(Link {
        node: container,
        role: Role::Child,
    }) = link
    {
        let c = &wf.nodes[container as usize];
        if c.status == Status::Canceled {
            return Err(Rejection::Canceled(container));
        }
        let position = wf.nodes[child as usize].position;
        let child_priority = wf.nodes[child as usize].spec.priority;
        let mut downstream = Vec::new();
        if child_ended {
            match &c.spec.kind {
                KindSpec::Swarm { config, .. }
                    if c.swarm.was_dispatched(position, child_priority)
                        && c.swarm.running >= config.max_concurrency =>
                {
                    // The item waits for a slot; a container under it cannot.
                    if child != node {
                        return Err(Rejection::SwarmFull(container));
                    }
                    waits = true;
                }
                KindSpec::Chain { children } => {
                    reset.extend(children.iter().skip(position as usize + 1));
                }
                KindSpec::Graph {
                    children, edges, ..
                } => {
                    downstream = graph::downstream(edges, position);
                    reset.extend(downstream.iter().map(|&p| children[p as usize]));
                }
                KindSpec::Swarm { .. } | KindSpec::Task { .. } | KindSpec::Gate => {}
            }
        }
        let ended = c.status.is_terminal();
        if ended {
            reset.extend(
                c.spec
                    .on_success
                    .iter()
                    .chain(&c.spec.on_error)
                    .chain(&c.spec.on_cleanup),
            );
        }
        levels.push(Level {
            container,
            child,
            child_ended,
            downstream,
        });
        (child, child_ended, link) = (container, ended, c.spec.parent);
    }
    let mut stack = reset.clone();
    while let Some(i) = stack.pop() {
        if busy(wf, i) {
            return Err(invalid("rerun", Status::Running));
        }
        stack.extend(wf.nodes[i as usize].spec.all_refs());
    }
    Ok(Plan {
        node,
        message,
        waits,
        reset,
        levels,
    })
}

/// Carry out `plan` (made on this state): the containers' bookkeeping first (it reads the
/// outcomes the reset clears), then the reset, then the containers reopen.
pub(crate) fn carry_out(wf: &mut Workflow, plan: &Plan) {
    for level in &plan.levels {
        if !level.child_ended {
            continue;
        }
        let child = &wf.nodes[level.child as usize];
        let (position, ok) = (
            child.position,
            matches!(child.outcome, Some(Outcome::Ok(_))),
        );
        let priority = child.spec.priority;
        let mut sources = level.downstream.clone();
        sources.push(position);
        // Graph nodes of these positions that had ended (skipped included) were settled.
        let ended = match &wf.nodes[level.container as usize].spec.kind {
            KindSpec::Graph { children, .. } => sources
                .iter()
                .filter(|&&p| wf.nodes[children[p as usize] as usize].status.is_terminal())
                .count() as u32,
            _ => 0,
        };
        let c = &mut wf.nodes[level.container as usize];
        match &c.spec.kind {
            KindSpec::Swarm { .. } => {
                let p = &mut c.swarm;
                if ok {
                    p.succeeded = p.succeeded.saturating_sub(1);
                } else {
                    p.failed = p.failed.saturating_sub(1);
                }
                if plan.waits && level.child == plan.node {
                    p.rerun_waiting.push(level.child);
                } else if p.was_dispatched(position, priority) {
                    p.running += 1;
                }
            }
            KindSpec::Graph { edges, .. } => {
                let progress = &mut c.graph;
                progress.settled = progress.settled.saturating_sub(ended);
                for &p in &sources {
                    for e in graph::out_edges(edges, p) {
                        let Some(taken) = progress.decided[e].take() else {
                            continue;
                        };
                        if edges[e].max_iterations.is_none() {
                            let to = edges[e].to as usize;
                            progress.undecided_in[to] += 1;
                            progress.taken_in[to] -= u32::from(taken);
                        }
                    }
                }
            }
            KindSpec::Chain { .. } | KindSpec::Task { .. } | KindSpec::Gate => {}
        }
    }
    let mut stack = plan.reset.clone();
    while let Some(i) = stack.pop() {
        let n = &mut wf.nodes[i as usize];
        n.reset_run();
        stack.extend(n.spec.all_refs());
    }
    for level in &plan.levels {
        let c = &mut wf.nodes[level.container as usize];
        if c.status.is_terminal() {
            c.status = Status::Running;
            c.outcome = None;
        }
    }
    for n in &mut wf.nodes {
        n.deletion = None;
    }
}
