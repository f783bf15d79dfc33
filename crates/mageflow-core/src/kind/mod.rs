//! What each kind of container means, one module per kind, called by the decider
//! ([`crate::decide`]) at the three moments a container has a say:
//!
//! - **start** — the container was triggered (`container_started` is emitted): what runs first;
//! - **child finished** — a child reached a terminal outcome: what runs next, or whether the
//!   container itself is done;
//! - **resumed** — the container was resumed: what it hands out again.
//!
//! Lifecycle rules shared by every kind (triggering, callbacks, cleanup, suspend, interrupt,
//! cancel) stay in the decider; a new kind is one new module here and one arm in each function
//! below.

mod chain;
pub(crate) mod graph;
pub mod swarm;

use crate::command::Rejection;
use crate::decide::Decider;
use crate::id::NodeIndex;
use crate::model::{KindSpec, Message};

/// Container `node` was just started with `message`: start what it runs first.
pub(crate) fn start(
    d: &mut Decider<'_>,
    node: NodeIndex,
    message: Message,
) -> Result<(), Rejection> {
    match &d.wf.nodes[node as usize].spec.kind {
        KindSpec::Chain { .. } => chain::start(d, node, message),
        KindSpec::Swarm { .. } => swarm::fill(d, node),
        KindSpec::Graph { .. } => graph::start(d, node, message),
        // A gate waits for its signal: nothing runs inside it.
        KindSpec::Task { .. } | KindSpec::Gate => Ok(()),
    }
}

/// `child` of the running container `container` reached a terminal outcome.
pub(crate) fn child_finished(
    d: &mut Decider<'_>,
    container: NodeIndex,
    child: NodeIndex,
) -> Result<(), Rejection> {
    match &d.wf.nodes[container as usize].spec.kind {
        KindSpec::Chain { .. } => chain::child_finished(d, container, child),
        KindSpec::Swarm { .. } => swarm::child_finished(d, container, child),
        KindSpec::Graph { .. } => graph::child_finished(d, container, child),
        KindSpec::Task { .. } | KindSpec::Gate => Ok(()),
    }
}

/// Container `node` was resumed and is running again.
pub(crate) fn resumed(d: &mut Decider<'_>, node: NodeIndex) -> Result<(), Rejection> {
    match &d.wf.nodes[node as usize].spec.kind {
        // A chain's next step, a graph's next nodes, are triggered when the ones before finish,
        // which a suspended container's children still do (parked): nothing is owed on resume.
        // A resumed gate waits for its signal again.
        KindSpec::Chain { .. }
        | KindSpec::Graph { .. }
        | KindSpec::Task { .. }
        | KindSpec::Gate => Ok(()),
        KindSpec::Swarm { .. } => swarm::fill(d, node),
    }
}
