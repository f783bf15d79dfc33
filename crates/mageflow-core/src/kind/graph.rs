//! A conditional graph: its nodes (any signature) run when the edges into them are taken. When a
//! node finishes, every edge out of it is decided on its outcome and output ([`Condition`]), in
//! one `graph_routed` event that names each edge, whether it was taken and what its condition
//! saw — so replay takes the same path and history shows why a branch ran. A node runs once its
//! incoming edges allow it ([`Join::All`]: all decided, one taken at least; [`Join::Any`]: one
//! taken); a node that can no longer run is routed as skipped, which decides its own edges as
//! not taken, and so on down. A loop edge (with `max_iterations`) runs its loop again — the nodes
//! on the cycle go back to pending, with the nodes skipped in the pass that ends which their
//! edges reach ([`loop_reset`]) — at most that many times; once more fails the graph.
//!
//! The graph settles when every node is terminal or skipped: it fails if a node failed with no
//! edge out of it taken (a failure nothing handles), else it succeeds with the outputs of its
//! terminal nodes (succeeded, no edge out taken), by node name.
//!
//! Edges are kept ordered by their source (`validate` refuses otherwise), so a node's edges
//! are found by binary search, and the progress counters ([`crate::model::GraphProgress`]) make
//! readiness and settling O(1): a graph of 10 000 nodes routes in time linear in its edges.

use crate::command::Rejection;
use crate::condition::{Condition, NamedPredicates};
use crate::decide::Decider;
use crate::event::{EdgeDecision, Payload};
use crate::id::NodeIndex;
use crate::model::{Edge, Join, KindSpec, Message, Outcome, TaskError};
use serde_json::{Map, Value};

/// Most edges in one graph.
pub const GRAPH_EDGES_MAX: usize = 1_000_000;
/// Highest bound of a loop edge (`max_iterations`).
pub const LOOP_ITERATIONS_MAX: u32 = 10_000;

/// Refuse a graph that could not run as meant, naming the node or edge: no nodes, two nodes of
/// one name, an edge to a node that does not exist, a condition that can never be evaluated,
/// edges not ordered by source, a cycle with no bounded (loop) edge, a loop edge that closes no
/// cycle or has a bound of 0 or above [`LOOP_ITERATIONS_MAX`], joins not one per node.
pub(crate) fn validate(names: &[&str], edges: &[Edge], joins: &[Join]) -> Result<(), String> {
    let n = names.len();
    if n == 0 {
        return Err("has no nodes".into());
    }
    if edges.len() > GRAPH_EDGES_MAX {
        return Err(format!(
            "has {} edges, more than {GRAPH_EDGES_MAX}",
            edges.len()
        ));
    }
    if !joins.is_empty() && joins.len() != n {
        return Err(format!(
            "has {} joins for {n} nodes (give one per node, or none)",
            joins.len()
        ));
    }
    let mut sorted: Vec<&str> = names.to_vec();
    sorted.sort_unstable();
    if let Some(w) = sorted.windows(2).find(|w| w[0] == w[1]) {
        return Err(format!("two nodes are named {:?}", w[0]));
    }
    let name = |p: u32| names.get(p as usize).copied().unwrap_or("?");
    for (i, e) in edges.iter().enumerate() {
        for end in [e.from, e.to] {
            if end as usize >= n {
                return Err(format!(
                    "edge {i} names node {end}, which does not exist (it has {n})"
                ));
            }
        }
        let label = format!("edge {i} ({} -> {})", name(e.from), name(e.to));
        if i > 0 && edges[i - 1].from > e.from {
            return Err(format!(
                "{label}: edges must be ordered by their source node"
            ));
        }
        e.when
            .validate()
            .map_err(|why| format!("{label}: its condition can never be evaluated: {why}"))?;
        match e.max_iterations {
            Some(0) => return Err(format!("{label}: a loop bound of 0")),
            Some(m) if m > LOOP_ITERATIONS_MAX => {
                return Err(format!(
                    "{label}: a loop bound of {m}, above {LOOP_ITERATIONS_MAX}"
                ))
            }
            Some(_) if matches!(e.when, Condition::Default) => {
                return Err(format!("{label}: a default edge cannot loop"))
            }
            Some(_) if !loop_body(edges, i).contains(&e.to) => {
                return Err(format!("{label}: it has a loop bound but closes no cycle"))
            }
            _ => {}
        }
    }
    // The forward edges must form a DAG (Kahn's algorithm): a cycle needs a bounded edge.
    let mut indegree = vec![0u32; n];
    for e in edges.iter().filter(|e| e.max_iterations.is_none()) {
        indegree[e.to as usize] += 1;
    }
    if !indegree.contains(&0) {
        return Err("has no entry node (every node has an edge into it)".into());
    }
    let mut queue: Vec<u32> = (0..n as u32)
        .filter(|&p| indegree[p as usize] == 0)
        .collect();
    let mut visited = 0;
    while let Some(p) = queue.pop() {
        visited += 1;
        for e in &edges[out_edges(edges, p)] {
            if e.max_iterations.is_none() {
                indegree[e.to as usize] -= 1;
                if indegree[e.to as usize] == 0 {
                    queue.push(e.to);
                }
            }
        }
    }
    if visited < n {
        let on_cycle = indegree.iter().position(|&d| d > 0).unwrap_or(0) as u32;
        return Err(format!(
            "a cycle through node {:?} has no bound (give its edge back a max_iterations)",
            name(on_cycle)
        ));
    }
    Ok(())
}

/// What a graph is made of, borrowed from its spec.
fn shape<'w>(d: &'w Decider<'_>, graph: NodeIndex) -> (&'w [NodeIndex], &'w [Edge], &'w [Join]) {
    match &d.wf.nodes[graph as usize].spec.kind {
        KindSpec::Graph {
            children,
            edges,
            joins,
        } => (children, edges, joins),
        _ => (&[], &[], &[]),
    }
}

/// The range of `edges` leaving position `from` (edges are ordered by source).
pub(crate) fn out_edges(edges: &[Edge], from: u32) -> std::ops::Range<usize> {
    edges.partition_point(|e| e.from < from)..edges.partition_point(|e| e.from <= from)
}

/// The graph started: run its entry nodes (no forward edge into them) with its message.
pub(super) fn start(
    d: &mut Decider<'_>,
    graph: NodeIndex,
    message: Message,
) -> Result<(), Rejection> {
    let entries: Vec<NodeIndex> = {
        let (children, _, _) = shape(d, graph);
        let progress = &d.wf.nodes[graph as usize].graph;
        children
            .iter()
            .enumerate()
            .filter(|(pos, _)| progress.undecided_in.get(*pos) == Some(&0))
            .map(|(_, &c)| c)
            .collect()
    };
    for c in entries {
        d.trigger(c, message.clone())?;
    }
    settle(d, graph)
}

/// A node of the graph finished: route its outcome, then settle the graph if nothing is left.
pub(super) fn child_finished(
    d: &mut Decider<'_>,
    graph: NodeIndex,
    child: NodeIndex,
) -> Result<(), Rejection> {
    route(d, graph, child, false)?;
    if !d.wf.nodes[graph as usize].status.is_terminal() {
        settle(d, graph)?;
    }
    Ok(())
}

/// What routing a node's outcome comes to.
enum Routing {
    /// A loop edge was taken: the loop runs again from `head` (the node's other edges are left
    /// for its next run).
    Loop {
        decision: EdgeDecision,
        head: NodeIndex,
        max: u32,
        iterations: u32,
    },
    /// Every edge decided; `targets` are the positions they lead to.
    Forward {
        decisions: Vec<EdgeDecision>,
        targets: Vec<(u32, bool)>,
    },
}

/// Decide the edges out of `from` (position `pos`); skipped: none is taken.
fn plan(d: &Decider<'_>, graph: NodeIndex, from: NodeIndex, skipped: bool) -> Routing {
    let (children, edges, _) = shape(d, graph);
    let pos = d.wf.nodes[from as usize].position;
    let outcome = if skipped {
        None
    } else {
        d.wf.nodes[from as usize].outcome.as_ref()
    };
    let range = out_edges(edges, pos);
    let progress = &d.wf.nodes[graph as usize].graph;
    for e in range.clone() {
        let edge = &edges[e];
        let Some(max) = edge.max_iterations else {
            continue;
        };
        let (taken, saw) = judge(&edge.when, outcome, d.named);
        if taken {
            return Routing::Loop {
                decision: EdgeDecision {
                    edge: e as u32,
                    taken,
                    saw,
                },
                head: children[edge.to as usize],
                max,
                iterations: progress.iterations.get(e).copied().unwrap_or(0),
            };
        }
    }
    let mut decisions: Vec<EdgeDecision> = range
        .clone()
        .map(|e| {
            let (taken, saw) = judge(&edges[e].when, outcome, d.named);
            EdgeDecision {
                edge: e as u32,
                taken,
                saw,
            }
        })
        .collect();
    // `default` is taken when nothing else of this node was (and it has an outcome).
    let any = decisions.iter().any(|x| x.taken);
    for x in &mut decisions {
        if matches!(edges[x.edge as usize].when, Condition::Default) {
            x.taken = !any && outcome.is_some();
        }
    }
    let targets = range
        .filter(|&e| edges[e].max_iterations.is_none())
        .map(|e| {
            (
                edges[e].to,
                decisions[e - out_edges(edges, pos).start].taken,
            )
        })
        .collect();
    Routing::Forward { decisions, targets }
}

/// Decide the edges out of `from` (as skipped: none taken), then start or skip their targets.
fn route(
    d: &mut Decider<'_>,
    graph: NodeIndex,
    from: NodeIndex,
    skipped: bool,
) -> Result<(), Rejection> {
    match plan(d, graph, from, skipped) {
        Routing::Loop {
            decision,
            head,
            max,
            iterations,
        } => {
            let e = decision.edge;
            let name = d.wf.nodes[head as usize].spec.name.clone();
            if iterations >= max {
                return fail(
                    d,
                    graph,
                    format!("graph_loop_exceeded: edge {e} back to {name} ran its loop {max} times, its bound"),
                );
            }
            if let Some(busy) = loop_body_busy(d, graph, e as usize) {
                let busy = d.wf.nodes[busy as usize].spec.name.clone();
                return fail(
                    d,
                    graph,
                    format!("graph_loop_busy: edge {e} back to {name} would run its loop again while {busy} still runs"),
                );
            }
            // Taken before the event: folding it sends the loop's nodes, `from` too, back to
            // pending.
            let message = message_from(d, from);
            d.emit(Payload::GraphRouted {
                graph,
                from,
                decisions: vec![decision],
                skipped,
            })?;
            d.trigger(head, message)
        }
        Routing::Forward { decisions, targets } => {
            d.emit(Payload::GraphRouted {
                graph,
                from,
                decisions,
                skipped,
            })?;
            for (to, taken) in targets {
                if d.wf.nodes[graph as usize].status.is_terminal() {
                    break;
                }
                ready(d, graph, to, Some(from).filter(|_| taken && !skipped))?;
            }
            Ok(())
        }
    }
}

/// Whether `when` holds for an outcome (`None`: the source was skipped), and what it saw.
fn judge(
    when: &Condition,
    outcome: Option<&Outcome>,
    named: &dyn NamedPredicates,
) -> (bool, Value) {
    match (when, outcome) {
        (_, None) => (false, Value::Null),
        (Condition::OnSuccess, Some(o)) => (matches!(o, Outcome::Ok(_)), Value::Null),
        (Condition::OnFailure, Some(o)) => (matches!(o, Outcome::Err(_)), Value::Null),
        (Condition::Always, Some(_)) => (true, Value::Null),
        (Condition::Default, Some(_)) => (false, Value::Null),
        (Condition::Output(p), Some(Outcome::Ok(v))) => p.eval_with(v, named),
        (Condition::Output(_), Some(Outcome::Err(_))) => (false, Value::Null),
    }
}

/// Start position `to` if its incoming edges allow it, or skip it if they never will.
fn ready(
    d: &mut Decider<'_>,
    graph: NodeIndex,
    to: u32,
    via: Option<NodeIndex>,
) -> Result<(), Rejection> {
    let (node, join, undecided, taken, triggered) = {
        let (children, _, joins) = shape(d, graph);
        let node = children[to as usize];
        let p = &d.wf.nodes[graph as usize].graph;
        let n = &d.wf.nodes[node as usize];
        (
            node,
            joins.get(to as usize).copied().unwrap_or_default(),
            p.undecided_in.get(to as usize).copied().unwrap_or(0),
            p.taken_in.get(to as usize).copied().unwrap_or(0),
            n.message.is_some() || n.status.is_terminal(),
        )
    };
    if triggered {
        return Ok(());
    }
    let run = match join {
        Join::All => undecided == 0 && taken > 0,
        Join::Any => taken > 0,
    };
    if run {
        let message = join_message(d, graph, to, join, via);
        return d.trigger(node, message);
    }
    if undecided == 0 {
        // Nothing can take it any more: skipped, and so are its edges.
        route(d, graph, node, true)?;
    }
    Ok(())
}

/// What a node started by its taken incoming edges receives: with one source (or an `any`
/// join), that source's result (or, from a failure, its input and error as an error callback
/// gets them); with several, every taken source's result (or `{"error": …}`) by node name.
fn join_message(
    d: &Decider<'_>,
    graph: NodeIndex,
    to: u32,
    join: Join,
    via: Option<NodeIndex>,
) -> Message {
    let (children, edges, _) = shape(d, graph);
    {
        // The edge from `via` was just taken: when it is the one taken into `to` and `to` has
        // no other incoming edge (or joins on any), `via` is the source, found in O(1).
        let p = &d.wf.nodes[graph as usize].graph;
        let incoming = p.incoming.get(to as usize).copied();
        let taken = p.taken_in.get(to as usize).copied().unwrap_or(0);
        if let Some(via) = via {
            if taken == 1 && (incoming == Some(1) || join == Join::Any) {
                return message_from(d, via);
            }
        }
    }
    let decided = &d.wf.nodes[graph as usize].graph.decided;
    let sources: Vec<NodeIndex> = edges
        .iter()
        .enumerate()
        .filter(|(e, edge)| {
            edge.to == to && edge.max_iterations.is_none() && decided.get(*e) == Some(&Some(true))
        })
        .map(|(_, edge)| children[edge.from as usize])
        .collect();
    let incoming = edges
        .iter()
        .filter(|e| e.to == to && e.max_iterations.is_none())
        .count();
    match (sources.as_slice(), join) {
        ([one], _) if incoming == 1 => message_from(d, *one),
        ([first, ..], Join::Any) => message_from(d, *first),
        _ => {
            let mut by_name = Map::new();
            for s in sources {
                let n = &d.wf.nodes[s as usize];
                let v = match &n.outcome {
                    Some(Outcome::Ok(v)) => v.clone(),
                    Some(Outcome::Err(e)) => serde_json::json!({ "error": e.message }),
                    None => Value::Null,
                };
                by_name.insert(n.spec.name.clone(), v);
            }
            Message::result(Value::Object(by_name))
        }
    }
}

/// What a node passes along an edge: its result, or (failed) its input and error.
fn message_from(d: &Decider<'_>, source: NodeIndex) -> Message {
    match &d.wf.nodes[source as usize].outcome {
        Some(Outcome::Ok(v)) => Message::result(v.clone()),
        Some(Outcome::Err(e)) => Message::input(d.error_input(source, e)),
        None => Message::result(Value::Null),
    }
}

/// A node of the loop of edge `e`, or anything inside one or a callback of one, that has been
/// triggered and not finished (running, queued, paused), if any: the loop cannot run again
/// under it.
fn loop_body_busy(d: &Decider<'_>, graph: NodeIndex, e: usize) -> Option<NodeIndex> {
    let (children, edges, _) = shape(d, graph);
    let mut stack: Vec<NodeIndex> = loop_body(edges, e)
        .into_iter()
        .map(|pos| children[pos as usize])
        .collect();
    while let Some(i) = stack.pop() {
        let n = &d.wf.nodes[i as usize];
        if n.in_flight || (n.message.is_some() && !n.status.is_terminal()) {
            return Some(i);
        }
        stack.extend(n.spec.all_refs());
    }
    None
}

/// The positions on the cycles that loop edge `e` closes: reachable from its target and
/// reaching its source through forward edges (both ends included). O(nodes + edges).
pub(crate) fn loop_body(edges: &[Edge], e: usize) -> Vec<u32> {
    let (from, to) = (edges[e].from, edges[e].to);
    let n = edges
        .iter()
        .map(|e| e.from.max(e.to) as usize + 1)
        .max()
        .unwrap_or(0);
    let (mut out, mut inward) = (vec![Vec::new(); n], vec![Vec::new(); n]);
    for e in edges.iter().filter(|e| e.max_iterations.is_none()) {
        out[e.from as usize].push(e.to);
        inward[e.to as usize].push(e.from);
    }
    let reach = |start: u32, adjacency: &[Vec<u32>]| {
        let mut seen = vec![false; n];
        let mut stack = vec![start];
        seen[start as usize] = true;
        while let Some(x) = stack.pop() {
            for &y in &adjacency[x as usize] {
                if !std::mem::replace(&mut seen[y as usize], true) {
                    stack.push(y);
                }
            }
        }
        seen
    };
    let (down, up) = (reach(to, &out), reach(from, &inward));
    (0..n as u32)
        .filter(|&p| down[p as usize] && up[p as usize])
        .collect()
}

/// What a taken loop edge `e` sends back to pending: its loop body, and every node skipped in
/// the pass that ends that a forward edge from what is reset reaches (to a fixpoint) — a node
/// skipped because a body node took another branch last time must be decided again, or a
/// branch the new pass takes (a failure handler, say) would never run. A node that ran keeps
/// its outcome. `skipped(p)`: whether the node at position `p` is skipped now.
pub(crate) fn loop_reset(edges: &[Edge], e: usize, skipped: impl Fn(u32) -> bool) -> Vec<u32> {
    let mut reset = loop_body(edges, e);
    let mut i = 0;
    while i < reset.len() {
        let p = reset[i];
        for edge in &edges[out_edges(edges, p)] {
            if edge.max_iterations.is_none() && !reset.contains(&edge.to) && skipped(edge.to) {
                reset.push(edge.to);
            }
        }
        i += 1;
    }
    reset
}

/// The positions reached from `from` by forward edges, `from` excluded: what a rerun of the
/// node at `from` sends back to pending with it.
pub(crate) fn downstream(edges: &[Edge], from: u32) -> Vec<u32> {
    let mut seen = std::collections::BTreeSet::new();
    let mut stack = vec![from];
    while let Some(p) = stack.pop() {
        for e in &edges[out_edges(edges, p)] {
            if e.max_iterations.is_none() && e.to != from && seen.insert(e.to) {
                stack.push(e.to);
            }
        }
    }
    seen.into_iter().collect()
}

/// Once every node is terminal or skipped, end the graph: failed if a failure went unhandled,
/// else succeeded with its terminal nodes' outputs by name.
fn settle(d: &mut Decider<'_>, graph: NodeIndex) -> Result<(), Rejection> {
    let outcome = {
        let (children, edges, _) = shape(d, graph);
        let g = &d.wf.nodes[graph as usize];
        if g.status.is_terminal() || (g.graph.settled as usize) < children.len() {
            return Ok(());
        }
        let taken_out =
            |pos: u32| out_edges(edges, pos).any(|e| g.graph.decided.get(e) == Some(&Some(true)));
        let mut result = Map::new();
        let mut unhandled = None;
        for (pos, &c) in children.iter().enumerate() {
            let n = &d.wf.nodes[c as usize];
            match &n.outcome {
                _ if taken_out(pos as u32) => {}
                Some(Outcome::Ok(v)) if n.status == crate::model::Status::Done => {
                    result.insert(n.spec.name.clone(), v.clone());
                }
                Some(Outcome::Err(e)) if unhandled.is_none() => {
                    unhandled = Some(d.inner_failure("graph node", c, e).message);
                }
                _ => {}
            }
        }
        (unhandled, Value::Object(result))
    };
    match outcome {
        (Some(message), _) => fail(d, graph, message),
        (None, result) => {
            d.emit(Payload::Succeeded {
                node: graph,
                attempt: 0,
                result,
            })?;
            d.finished(graph)
        }
    }
}

fn fail(d: &mut Decider<'_>, graph: NodeIndex, message: String) -> Result<(), Rejection> {
    d.emit(Payload::Failed {
        node: graph,
        attempt: 0,
        error: TaskError {
            message,
            retryable: false,
        },
    })?;
    d.finished(graph)
}
