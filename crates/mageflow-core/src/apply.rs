//! `apply`: the fold step. It trusts nothing: an event that does not fit the state (wrong stream,
//! gap in sequence numbers, unknown node, a transition out of a terminal status) is refused with
//! an [`ApplyError`] and the state is left unchanged, so a corrupt or forged log is reported
//! instead of being folded into nonsense.

use crate::event::{Event, Payload};
use crate::id::{NodeIndex, WorkflowId};
use crate::kind::graph;
use crate::model::{
    deep_merge_owned, GraphProgress, KindSpec, Link, Node, NodeSpec, Outcome, Role, Status,
    SwarmProgress, TaskError, Workflow, PRIORITY_MAX, PRIORITY_MIN,
};
use crate::time::Timestamp;

/// An event that cannot be applied to the current state.
#[derive(Clone, PartialEq, Eq, Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("event of stream {found} applied to workflow {expected}")]
    WrongStream {
        expected: WorkflowId,
        found: WorkflowId,
    },
    #[error("event seq {found} does not follow version {version}")]
    OutOfSequence { version: u64, found: u64 },
    #[error("event {kind} refers to signature {node}, which does not exist")]
    NoSuchNode { kind: &'static str, node: NodeIndex },
    #[error("event {kind} would move signature {node} out of terminal status {status}")]
    FromTerminal {
        kind: &'static str,
        node: NodeIndex,
        status: Status,
    },
    #[error("event {kind} does not fit signature {node}: {reason}")]
    Invalid {
        kind: &'static str,
        node: NodeIndex,
        reason: String,
    },
    #[error("invalid signature tree: {0}")]
    InvalidTree(String),
}

/// Check that `nodes`, to be placed at indexes `base..`, form valid subtrees: every node but a
/// root of the batch has exactly one parent that lists it, parents come before children, and all
/// references stay inside the batch. `attach` is the swarm new batches hang off (None = a new
/// workflow whose root is `nodes[0]`).
pub(crate) fn validate_nodes(
    nodes: &[NodeSpec],
    base: usize,
    attach: Option<NodeIndex>,
) -> Result<(), String> {
    if nodes.is_empty() {
        return Err("no signatures".into());
    }
    let end = base
        .checked_add(nodes.len())
        .filter(|e| *e <= u32::MAX as usize)
        .ok_or("too many signatures")?;
    let mut referenced = vec![false; nodes.len()];
    for (offset, spec) in nodes.iter().enumerate() {
        let index = base + offset;
        if spec.name.is_empty() {
            return Err(format!("signature {index} has an empty name"));
        }
        if !spec.kwargs.is_object() {
            return Err(format!("kwargs of signature {index} are not an object"));
        }
        if !(PRIORITY_MIN..=PRIORITY_MAX).contains(&spec.priority) {
            return Err(format!(
                "signature {index} has priority {}, outside {PRIORITY_MIN}..={PRIORITY_MAX}",
                spec.priority
            ));
        }
        match &spec.kind {
            KindSpec::Task { task, .. } if task.is_empty() => {
                return Err(format!("signature {index} has an empty task name"))
            }
            KindSpec::Chain { children } if children.is_empty() => {
                return Err(format!("chain {index} has no tasks"))
            }
            KindSpec::Swarm { config, .. } if config.max_concurrency == 0 => {
                return Err(format!("swarm {index} has max_concurrency 0"))
            }
            KindSpec::Swarm { config, .. } if config.stop_after_n_failures == Some(0) => {
                return Err(format!("swarm {index} has stop_after_n_failures 0"))
            }
            KindSpec::Swarm { item_callbacks, .. } => {
                for template in [&item_callbacks.on_success, &item_callbacks.on_error] {
                    if !template.is_empty() {
                        validate_nodes(template, 0, None).map_err(|why| {
                            format!("a per-item callback of swarm {index}: {why}")
                        })?;
                    }
                }
            }
            _ => {}
        }
        match (spec.parent, attach) {
            (None, None) if offset == 0 => {}
            (None, _) => return Err(format!("signature {index} has no parent")),
            (Some(link), Some(swarm)) if (link.node as usize) < base => {
                if link.node != swarm || link.role != Role::Child {
                    return Err(format!(
                        "signature {index} must be a child of swarm {swarm} or of a new signature"
                    ));
                }
            }
            (Some(link), _) => {
                let p = link.node as usize;
                if p < base || p >= index {
                    return Err(format!(
                        "signature {index} names parent {p}, which is not an earlier signature of the batch"
                    ));
                }
                let list = nodes[p - base].list(link.role);
                if !list.contains(&(index as NodeIndex)) {
                    return Err(format!(
                        "signature {index} names parent {p}, which does not list it"
                    ));
                }
            }
        }
        for r in spec.all_refs() {
            let r = r as usize;
            if r <= index || r >= end {
                return Err(format!(
                    "signature {index} references {r}, outside the batch or not after it"
                ));
            }
            if std::mem::replace(&mut referenced[r - base], true) {
                return Err(format!("signature {r} is referenced twice"));
            }
        }
    }
    for (offset, spec) in nodes.iter().enumerate() {
        if let KindSpec::Graph {
            children,
            edges,
            joins,
        } = &spec.kind
        {
            // Children were checked above to be later signatures of this batch.
            let names: Vec<&str> = children
                .iter()
                .map(|&c| nodes[c as usize - base].name.as_str())
                .collect();
            graph::validate(&names, edges, joins)
                .map_err(|why| format!("graph {}: {why}", base + offset))?;
        }
    }
    for (offset, spec) in nodes.iter().enumerate() {
        let index = base + offset;
        let attached_to_swarm =
            matches!((spec.parent, attach), (Some(l), Some(_)) if (l.node as usize) < base);
        if offset > 0 || attach.is_some() {
            if !referenced[offset] && !attached_to_swarm {
                return Err(format!("signature {index} is not referenced by its parent"));
            }
            if referenced[offset] && attached_to_swarm {
                return Err(format!("signature {index} has two parents"));
            }
        }
    }
    Ok(())
}

/// An event [`Workflow::replay`] can fold: a borrowed `&Event` (the values it carries are
/// copied into the state, as [`Workflow::apply`] does) or an owned `Event` (moved into the state,
/// as [`Workflow::apply_owned`] does: no copies). Both give the same state and the same errors.
pub trait ReplayEvent {
    fn fold_into(self, wf: &mut Workflow) -> Result<(), ApplyError>;
}

impl ReplayEvent for &Event {
    fn fold_into(self, wf: &mut Workflow) -> Result<(), ApplyError> {
        wf.apply(self)
    }
}

impl ReplayEvent for Event {
    fn fold_into(self, wf: &mut Workflow) -> Result<(), ApplyError> {
        wf.apply_owned(self)
    }
}

impl Workflow {
    /// Fold one event into the state, or refuse it (the state is unchanged on error).
    pub fn apply(&mut self, event: &Event) -> Result<(), ApplyError> {
        self.check_next(event)?;
        // The state keeps the values the event carries (nodes, messages, results): one copy of
        // the payload, made only once the envelope fits.
        self.apply_payload(event.payload.clone(), event.at)?;
        self.version = event.seq;
        Ok(())
    }

    /// [`Workflow::apply`] for an event the caller no longer needs (replay, recovery): the
    /// values it carries move into the state instead of being copied. Same checks, same errors,
    /// same resulting state; the state is unchanged on error.
    pub fn apply_owned(&mut self, event: Event) -> Result<(), ApplyError> {
        self.check_next(&event)?;
        self.apply_payload(event.payload, event.at)?;
        self.version = event.seq;
        Ok(())
    }

    /// Replay a whole stream from empty. Pass the events by value (`Vec<Event>`, an iterator of
    /// owned events) to move their values into the state, or by reference to keep them.
    pub fn replay<I>(id: WorkflowId, events: I) -> Result<Self, ApplyError>
    where
        I: IntoIterator,
        I::Item: ReplayEvent,
    {
        let mut wf = Workflow::empty(id);
        for e in events {
            e.fold_into(&mut wf)?;
        }
        Ok(wf)
    }

    /// The envelope checks: the event belongs to this stream and is the next one.
    fn check_next(&self, event: &Event) -> Result<(), ApplyError> {
        // The system stream holds engine records, not a workflow: nothing of it folds.
        if event.stream.is_system() || self.id.is_system() {
            return Err(ApplyError::Invalid {
                kind: event.payload.kind(),
                node: 0,
                reason: "the system stream holds no workflow".into(),
            });
        }
        if event.stream != self.id {
            return Err(ApplyError::WrongStream {
                expected: self.id,
                found: event.stream,
            });
        }
        if event.seq != self.version + 1 {
            return Err(ApplyError::OutOfSequence {
                version: self.version,
                found: event.seq,
            });
        }
        Ok(())
    }

    /// Workflow-level events name the root.
    fn check_root(&self, kind: &'static str, node: NodeIndex) -> Result<(), ApplyError> {
        if node != 0 || !self.exists() {
            return Err(ApplyError::NoSuchNode { kind, node });
        }
        Ok(())
    }

    fn check(&self, kind: &'static str, node: NodeIndex) -> Result<usize, ApplyError> {
        let i = node as usize;
        let n = self
            .nodes
            .get(i)
            .ok_or(ApplyError::NoSuchNode { kind, node })?;
        if n.status.is_terminal() {
            return Err(ApplyError::FromTerminal {
                kind,
                node,
                status: n.status,
            });
        }
        Ok(i)
    }

    fn swarm_slot(&self, node: usize) -> Option<(usize, u32)> {
        let n = &self.nodes[node];
        let link = n.spec.parent?;
        let p = link.node as usize;
        match (&self.nodes[p].spec.kind, link.role) {
            (KindSpec::Swarm { .. }, Role::Child) => Some((p, n.position)),
            _ => None,
        }
    }

    /// Bookkeeping in the enclosing graph when one of its nodes reaches a terminal status.
    fn count_in_graph(&mut self, node: usize) {
        if let Some(Link {
            node: p,
            role: Role::Child,
        }) = self.nodes[node].spec.parent
        {
            let parent = &mut self.nodes[p as usize];
            if matches!(parent.spec.kind, KindSpec::Graph { .. }) {
                parent.graph.settled += 1;
            }
        }
    }

    /// A graph routed `from`'s outcome (see [`Payload::GraphRouted`]): record each decision in
    /// its progress; a taken loop edge sends the loop's nodes back to pending; a skipped `from`
    /// is skipped with everything inside it.
    fn apply_routing(
        &mut self,
        kind: &'static str,
        g: usize,
        from: NodeIndex,
        decisions: &[crate::event::EdgeDecision],
        skipped: bool,
    ) -> Result<(), ApplyError> {
        let invalid = |reason: String| ApplyError::Invalid {
            kind,
            node: g as NodeIndex,
            reason,
        };
        let KindSpec::Graph { edges, .. } = &self.nodes[g].spec.kind else {
            return Err(invalid("not a graph".into()));
        };
        let f = self
            .nodes
            .get(from as usize)
            .filter(|n| {
                n.spec.parent
                    == Some(Link {
                        node: g as NodeIndex,
                        role: Role::Child,
                    })
            })
            .ok_or_else(|| invalid(format!("signature {from} is not a node of the graph")))?;
        let pos = f.position;
        let progress = &self.nodes[g].graph;
        for d in decisions {
            match edges.get(d.edge as usize) {
                Some(e)
                    if e.from == pos && progress.decided.get(d.edge as usize) == Some(&None) => {}
                _ => {
                    return Err(invalid(format!(
                        "edge {} is not an undecided edge out of {from}",
                        d.edge
                    )))
                }
            }
        }
        if skipped {
            let f = &self.nodes[from as usize];
            if f.status.is_terminal() || f.message.is_some() || f.in_flight {
                return Err(invalid(format!(
                    "signature {from} ran: it cannot be skipped"
                )));
            }
        }
        // The spec is borrowed, not copied, beside the progress it updates: a graph of 10 000
        // nodes routes 10 000 times.
        let mut looped = None;
        let node = &mut self.nodes[g];
        let (KindSpec::Graph { edges, .. }, progress) = (&node.spec.kind, &mut node.graph) else {
            return Err(invalid("not a graph".into()));
        };
        for d in decisions {
            let e = &edges[d.edge as usize];
            progress.decided[d.edge as usize] = Some(d.taken);
            match e.max_iterations {
                None => {
                    let to = e.to as usize;
                    progress.undecided_in[to] = progress.undecided_in[to].saturating_sub(1);
                    progress.taken_in[to] += u32::from(d.taken);
                }
                Some(_) if d.taken => {
                    progress.iterations[d.edge as usize] += 1;
                    looped = Some(d.edge as usize);
                }
                Some(_) => {}
            }
        }
        // A loop runs again (rare): its nodes are reset, with the spec copied out.
        if let Some(looped) = looped {
            let KindSpec::Graph {
                children, edges, ..
            } = &self.nodes[g].spec.kind
            else {
                return Err(invalid("not a graph".into()));
            };
            let (children, edges) = (children.clone(), edges.clone());
            let reset = graph::loop_reset(&edges, looped, |p| {
                children
                    .get(p as usize)
                    .and_then(|&c| self.nodes.get(c as usize))
                    .is_some_and(|n| n.status == Status::Skipped)
            });
            if !reset.is_empty() {
                // The loop runs again: its nodes back to pending, their edges undecided.
                for (i, e) in edges.iter().enumerate() {
                    if !reset.contains(&e.from) {
                        continue;
                    }
                    let progress = &mut self.nodes[g].graph;
                    if let Some(taken) = progress.decided[i].take() {
                        if e.max_iterations.is_none() {
                            let to = e.to as usize;
                            progress.undecided_in[to] += 1;
                            progress.taken_in[to] -= u32::from(taken);
                        }
                    }
                }
                for &p in &reset {
                    let c = children[p as usize] as usize;
                    if self.nodes[c].status.is_terminal() {
                        self.nodes[g].graph.settled -= 1;
                    }
                    let mut stack = vec![c as NodeIndex];
                    while let Some(i) = stack.pop() {
                        let n = &mut self.nodes[i as usize];
                        n.reset_run();
                        stack.extend(n.spec.all_refs());
                    }
                }
            }
        }
        if skipped {
            let mut stack = vec![from];
            while let Some(i) = stack.pop() {
                let n = &mut self.nodes[i as usize];
                if !n.status.is_terminal() && n.message.is_none() && !n.in_flight {
                    n.status = Status::Skipped;
                    stack.extend(n.spec.all_refs());
                }
            }
            self.nodes[g].graph.settled += 1;
        }
        Ok(())
    }

    /// Swarm `s` hands out its waiting items by priority from now on, if it does not yet and
    /// one of them asks for it: the items from `dispatched` on that have not ended go into its
    /// priority queue.
    fn prioritize_swarm(&mut self, s: usize) {
        let n = &self.nodes[s];
        let KindSpec::Swarm { children, .. } = &n.spec.kind else {
            return;
        };
        if n.swarm.by_priority.is_some() {
            return;
        }
        let waiting = children
            .get(n.swarm.dispatched as usize..)
            .unwrap_or_default()
            .iter()
            .map(|&c| &self.nodes[c as usize])
            .filter(|c| !c.status.is_terminal());
        if !waiting.clone().any(|c| c.spec.priority != 0) {
            return;
        }
        let queue = waiting
            .map(|c| SwarmProgress::queue_key(c.spec.priority, c.position))
            .collect();
        self.nodes[s].swarm.by_priority = Some(queue);
    }

    /// Bookkeeping in the enclosing swarm when one of its items reaches a terminal status.
    fn count_in_swarm(&mut self, node: usize, ok: bool) {
        if let Some((p, pos)) = self.swarm_slot(node) {
            let priority = self.nodes[node].spec.priority;
            let progress = &mut self.nodes[p].swarm;
            let key = SwarmProgress::queue_key(priority, pos);
            // A rerun item that ends waiting for a slot (canceled), or an item canceled before
            // its turn, never took one.
            if let Some(w) = progress
                .rerun_waiting
                .iter()
                .position(|&w| w == node as NodeIndex)
            {
                progress.rerun_waiting.remove(w);
            } else if let Some(waiting) = &mut progress.by_priority {
                if !waiting.remove(&key) {
                    progress.running = progress.running.saturating_sub(1);
                }
            } else if pos < progress.dispatched {
                progress.running = progress.running.saturating_sub(1);
            }
            if ok {
                progress.succeeded += 1;
            } else {
                progress.failed += 1;
            }
        }
    }

    /// The callbacks of `node` in its `role` list can no longer fire (it reached the other
    /// outcome, or was canceled): each one never triggered (pending, or paused before it
    /// fired) that has not ended otherwise (canceled), with everything inside it, is
    /// [`Status::Skipped`]. Part of the fold of the event that ended `node`, so the state stays
    /// the fold of the log without an event per callback, and a workflow's leftover callbacks
    /// end terminal instead of `pending` for good. Nothing inside a callback can have been
    /// triggered before the callback itself, so nothing running is touched.
    fn skip_callbacks(&mut self, node: usize, role: Role) {
        let mut stack: Vec<NodeIndex> = self.nodes[node].spec.list(role).to_vec();
        while let Some(i) = stack.pop() {
            let Some(n) = self.nodes.get_mut(i as usize) else {
                continue;
            };
            // Untriggered: pending, or paused (suspended, interrupted) before it ever fired.
            if n.status.is_terminal() || n.message.is_some() || n.in_flight {
                continue;
            }
            n.status = Status::Skipped;
            stack.extend(n.spec.all_refs());
        }
    }

    /// Append a validated batch (see [`validate_nodes`]) and record each new node's position in
    /// the list of its parent that names it.
    fn push_batch(&mut self, nodes: Vec<NodeSpec>) {
        let base = self.nodes.len();
        self.nodes.reserve(nodes.len());
        self.nodes.extend(nodes.into_iter().map(Node::new));
        for i in base..self.nodes.len() {
            // A validated batch only lists later nodes of the same batch.
            let (head, tail) = self.nodes.split_at_mut(i + 1);
            let spec = &head[i].spec;
            let lists: [&[NodeIndex]; 4] = [
                spec.children(),
                &spec.on_success,
                &spec.on_error,
                &spec.on_cleanup,
            ];
            for list in lists {
                for (pos, &c) in list.iter().enumerate() {
                    let later = (c as usize).checked_sub(i + 1);
                    if let Some(n) = later.and_then(|k| tail.get_mut(k)) {
                        n.position = pos as u32;
                    }
                }
            }
        }
    }

    fn apply_payload(&mut self, payload: Payload, at: Timestamp) -> Result<(), ApplyError> {
        let kind = payload.kind();
        let container_event = matches!(payload, Payload::ContainerStarted { .. });
        // A purged workflow is an audit trail: nothing follows its purge.
        if self.purged {
            return Err(ApplyError::Invalid {
                kind,
                node: payload.node().unwrap_or(0),
                reason: "the workflow was purged".into(),
            });
        }
        match payload {
            Payload::WorkflowCreated { nodes } => {
                if self.exists() {
                    return Err(ApplyError::Invalid {
                        kind,
                        node: 0,
                        reason: "workflow already exists".into(),
                    });
                }
                validate_nodes(&nodes, 0, None).map_err(ApplyError::InvalidTree)?;
                self.push_batch(nodes);
                self.created_at = Some(at);
            }
            Payload::SwarmItemsAdded { swarm, nodes } => {
                let s = self.check(kind, swarm)?;
                match &self.nodes[s].spec.kind {
                    KindSpec::Swarm { closed: false, .. } => {}
                    _ => {
                        return Err(ApplyError::Invalid {
                            kind,
                            node: swarm,
                            reason: "not an open swarm".into(),
                        })
                    }
                }
                let base = self.nodes.len();
                validate_nodes(&nodes, base, Some(swarm)).map_err(ApplyError::InvalidTree)?;
                let mut added = Vec::new();
                for (offset, spec) in nodes.iter().enumerate() {
                    if spec.parent.is_some_and(|l| (l.node as usize) < base) {
                        added.push((base + offset) as NodeIndex);
                    }
                }
                let first_pos = match &self.nodes[s].spec.kind {
                    KindSpec::Swarm { children, .. } => children.len() as u32,
                    _ => 0,
                };
                self.push_batch(nodes);
                for (k, &a) in added.iter().enumerate() {
                    self.nodes[a as usize].position = first_pos + k as u32;
                }
                if let KindSpec::Swarm { children, .. } = &mut self.nodes[s].spec.kind {
                    children.extend(added.iter().copied());
                }
                // Items with a priority make a started swarm hand out by priority.
                if self.nodes[s].swarm.by_priority.is_some() {
                    let keys: Vec<(i64, u32)> = added
                        .iter()
                        .map(|&a| &self.nodes[a as usize])
                        .map(|a| SwarmProgress::queue_key(a.spec.priority, a.position))
                        .collect();
                    if let Some(waiting) = &mut self.nodes[s].swarm.by_priority {
                        waiting.extend(keys);
                    }
                } else if self.nodes[s].message.is_some() {
                    self.prioritize_swarm(s);
                }
            }
            Payload::SwarmClosed { swarm } => {
                let s = self.check(kind, swarm)?;
                match &mut self.nodes[s].spec.kind {
                    KindSpec::Swarm { closed, .. } => *closed = true,
                    _ => {
                        return Err(ApplyError::Invalid {
                            kind,
                            node: swarm,
                            reason: "not a swarm".into(),
                        })
                    }
                }
            }
            Payload::KwargsUpdated { node, kwargs } => {
                let i = self.check(kind, node)?;
                if !kwargs.is_object() {
                    return Err(ApplyError::Invalid {
                        kind,
                        node,
                        reason: "kwargs are not an object".into(),
                    });
                }
                let n = &mut self.nodes[i];
                n.spec.kwargs = deep_merge_owned(std::mem::take(&mut n.spec.kwargs), kwargs);
            }
            Payload::Queued {
                node,
                message,
                parked,
            }
            | Payload::ContainerStarted {
                node,
                message,
                parked,
            } => {
                let i = self.check(kind, node)?;
                let n = &mut self.nodes[i];
                let is_container = n.is_container();
                if is_container != container_event {
                    return Err(ApplyError::Invalid {
                        kind,
                        node,
                        reason: "event kind does not match the signature kind".into(),
                    });
                }
                n.message = Some(message);
                n.not_before = None;
                // A rerun item that waited for a slot of its swarm takes one.
                if let Some((p, _)) = self.swarm_slot(i) {
                    let progress = &mut self.nodes[p].swarm;
                    if let Some(w) = progress.rerun_waiting.iter().position(|&w| w == node) {
                        progress.rerun_waiting.remove(w);
                        progress.running += 1;
                    }
                }
                let n = &mut self.nodes[i];
                if let KindSpec::Graph {
                    children, edges, ..
                } = &n.spec.kind
                {
                    n.graph = GraphProgress::start(children.len(), edges);
                }
                n.status = match (parked, is_container) {
                    (true, _) => Status::Suspended,
                    (false, true) => Status::Running,
                    (false, false) => Status::Queued,
                };
                if matches!(n.spec.kind, KindSpec::Swarm { .. }) {
                    self.prioritize_swarm(i);
                }
            }
            Payload::SwarmDispatched { swarm, count } => {
                let s = self.check(kind, swarm)?;
                // Only a swarm has a priority queue.
                let progress = &mut self.nodes[s].swarm;
                if let Some(waiting) = &mut progress.by_priority {
                    // The `count` first waiting items, by priority (none of them ended).
                    if waiting.len() < count as usize {
                        return Err(ApplyError::Invalid {
                            kind,
                            node: swarm,
                            reason: format!("dispatches {count} items; {} wait", waiting.len()),
                        });
                    }
                    for _ in 0..count {
                        waiting.pop_first();
                    }
                    progress.dispatched += count;
                    progress.running += count;
                    return Ok(());
                }
                let KindSpec::Swarm { children, .. } = &self.nodes[s].spec.kind else {
                    return Err(ApplyError::Invalid {
                        kind,
                        node: swarm,
                        reason: "not a swarm".into(),
                    });
                };
                let from = self.nodes[s].swarm.dispatched as usize;
                let to = from.saturating_add(count as usize);
                let Some(range) = children.get(from..to) else {
                    return Err(ApplyError::Invalid {
                        kind,
                        node: swarm,
                        reason: format!("dispatches items {from}..{to} of {}", children.len()),
                    });
                };
                let live = range
                    .iter()
                    .filter(|&&c| !self.nodes[c as usize].status.is_terminal())
                    .count() as u32;
                let progress = &mut self.nodes[s].swarm;
                progress.dispatched = to as u32;
                progress.running += live;
            }
            Payload::Started { node, attempt } => {
                let i = self.check(kind, node)?;
                let n = &mut self.nodes[i];
                if n.is_container() || attempt != n.attempt + 1 {
                    return Err(ApplyError::Invalid {
                        kind,
                        node,
                        reason: format!("attempt {attempt} after attempt {}", n.attempt),
                    });
                }
                n.attempt = attempt;
                n.in_flight = true;
                n.status = Status::Running;
            }
            Payload::Checkpointed { node, data, .. } => {
                let i = self.check(kind, node)?;
                self.nodes[i].checkpoint = Some(data);
            }
            Payload::Succeeded { node, result, .. } => {
                let i = self.check(kind, node)?;
                let n = &mut self.nodes[i];
                n.status = Status::Done;
                n.in_flight = false;
                n.outcome = Some(Outcome::Ok(result));
                self.count_in_swarm(i, true);
                self.count_in_graph(i);
                self.skip_callbacks(i, Role::ErrorCallback);
            }
            Payload::RetryScheduled {
                node,
                retry_at,
                lost,
                ..
            } => {
                let i = self.check(kind, node)?;
                let n = &mut self.nodes[i];
                n.in_flight = false;
                if !lost {
                    n.failures += 1;
                }
                n.not_before = Some(retry_at);
                if n.status == Status::Running {
                    n.status = Status::Queued;
                }
            }
            Payload::Failed { node, error, .. } => {
                let i = self.check(kind, node)?;
                let n = &mut self.nodes[i];
                n.status = Status::Failed;
                n.in_flight = false;
                n.outcome = Some(Outcome::Err(error));
                self.count_in_swarm(i, false);
                self.count_in_graph(i);
                self.skip_callbacks(i, Role::SuccessCallback);
            }
            Payload::Suspended { node } => {
                let i = self.check(kind, node)?;
                self.nodes[i].status = Status::Suspended;
            }
            Payload::Resumed { node, status } => {
                let i = self.check(kind, node)?;
                let n = &mut self.nodes[i];
                if !matches!(n.status, Status::Suspended | Status::Interrupted)
                    || status.is_terminal()
                {
                    return Err(ApplyError::Invalid {
                        kind,
                        node,
                        reason: format!("resume from {} to {status}", n.status),
                    });
                }
                n.status = status;
            }
            Payload::Interrupted { node } => {
                let i = self.check(kind, node)?;
                let n = &mut self.nodes[i];
                n.status = Status::Interrupted;
                n.in_flight = false;
            }
            Payload::Canceled { node } => {
                let i = self.check(kind, node)?;
                let n = &mut self.nodes[i];
                n.status = Status::Canceled;
                n.in_flight = false;
                n.outcome = Some(Outcome::Err(TaskError {
                    message: "canceled".into(),
                    retryable: false,
                }));
                self.count_in_swarm(i, false);
                self.count_in_graph(i);
                self.skip_callbacks(i, Role::SuccessCallback);
                self.skip_callbacks(i, Role::ErrorCallback);
            }
            Payload::MarkedForDeletion { node, expires_at } => {
                self.check_root(kind, node)?;
                for n in &mut self.nodes {
                    n.deletion = Some(expires_at);
                }
            }
            Payload::Restored { node } => {
                self.check_root(kind, node)?;
                for n in &mut self.nodes {
                    n.deletion = None;
                }
            }
            Payload::Rerun { node } if node != 0 => {
                // One signature inside: the same plan `decide` checked.
                let plan = crate::rerun::plan(self, node).map_err(|r| ApplyError::Invalid {
                    kind,
                    node,
                    reason: r.to_string(),
                })?;
                crate::rerun::carry_out(self, &plan);
            }
            Payload::Rerun { node } => {
                self.check_root(kind, node)?;
                if !matches!(self.nodes[0].status, Status::Done | Status::Failed)
                    || self.nodes.iter().any(|n| n.in_flight)
                {
                    return Err(ApplyError::Invalid {
                        kind,
                        node,
                        reason: "only a finished workflow with nothing in flight can rerun".into(),
                    });
                }
                // Back to created: every node untriggered, attempt numbers kept (they only grow).
                for n in &mut self.nodes {
                    n.reset_run();
                    n.deletion = None;
                }
            }
            Payload::PriorityChanged { node, priority } => {
                let i = self.check(kind, node)?;
                let n = &self.nodes[i];
                if n.in_flight
                    || n.status == Status::Running
                    || !(PRIORITY_MIN..=PRIORITY_MAX).contains(&priority)
                {
                    return Err(ApplyError::Invalid {
                        kind,
                        node,
                        reason: "only a waiting signature takes a priority in range".into(),
                    });
                }
                let old = std::mem::replace(&mut self.nodes[i].spec.priority, priority);
                if let Some((s, pos)) = self.swarm_slot(i) {
                    let started = self.nodes[s].message.is_some();
                    let (before, after) = (
                        SwarmProgress::queue_key(old, pos),
                        SwarmProgress::queue_key(priority, pos),
                    );
                    let queue = &mut self.nodes[s].swarm.by_priority;
                    if let Some(waiting) = queue {
                        // Waiting (not handed out yet): its place in the queue moves.
                        if waiting.remove(&before) {
                            waiting.insert(after);
                        }
                    } else if started {
                        self.prioritize_swarm(s);
                    }
                }
            }
            Payload::GraphRouted {
                graph,
                from,
                decisions,
                skipped,
            } => {
                let g = self.check(kind, graph)?;
                self.apply_routing(kind, g, from, &decisions, skipped)?;
            }
            Payload::ResumeReport { .. } | Payload::CommandRefused { .. } => {
                return Err(ApplyError::Invalid {
                    kind,
                    node: 0,
                    reason: format!("a {kind} event belongs to the system stream"),
                });
            }
            Payload::Purged { node } => {
                self.check_root(kind, node)?;
                if self.nodes.iter().any(|n| n.in_flight) {
                    return Err(ApplyError::Invalid {
                        kind,
                        node,
                        reason: "an attempt is still in flight".into(),
                    });
                }
                self.purged = true;
                for n in &mut self.nodes {
                    n.spec.kwargs = serde_json::Value::Object(Default::default());
                    n.message = None;
                    n.outcome = None;
                    n.checkpoint = None;
                }
            }
        }
        Ok(())
    }

    /// Whether `index` or a container above it (through child links) is paused.
    pub fn is_paused(&self, index: NodeIndex) -> bool {
        let mut i = index as usize;
        loop {
            let Some(n) = self.nodes.get(i) else {
                return false;
            };
            if matches!(n.status, Status::Suspended | Status::Interrupted) {
                return true;
            }
            match n.spec.parent {
                Some(Link {
                    node,
                    role: Role::Child,
                }) => i = node as usize,
                _ => return false,
            }
        }
    }
}

impl Node {
    /// Back to created, to run again (a rerun, a loop's next pass): untriggered, no outcome, no
    /// progress; the attempt number is kept (it only grows).
    pub(crate) fn reset_run(&mut self) {
        self.status = Status::Pending;
        self.message = None;
        self.outcome = None;
        self.not_before = None;
        self.failures = 0;
        self.checkpoint = None;
        self.swarm = Default::default();
        self.graph = GraphProgress::default();
    }
}
