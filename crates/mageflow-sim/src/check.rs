//! The invariants checked after every run, over the durable log (the truth) and what the
//! engine, the operator and the hot tier saw. Each check names its invariant (see
//! [`Invariant`]) and says what it found; the first one that fails fails the run.
//!
//! They are written to hold whatever the interleaving of the run was: they compare the log
//! with itself and with acknowledgments, never with a schedule.

use crate::log::Durable;
use crate::plan::Plan;
use crate::tasks::STOPPED_MARK;
use crate::{Failure, Invariant, Known, Observed};
use mageflow_core::{Event, Link, Payload, Role, SignatureId, Workflow, WorkflowId};
use mageflow_store::EventLog;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// A call that was answered `Ok`: its effect must be in the log.
#[derive(Clone, Debug, PartialEq)]
pub struct Ack {
    pub wf: WorkflowId,
    pub node: u32,
    pub op: AckOp,
}

#[derive(Clone, Debug, PartialEq)]
pub enum AckOp {
    Submitted,
    Suspend,
    Resume,
    Interrupt,
    Cancel,
    Delete,
    Restore,
    Rerun,
    /// The intake answered a worker's checkpoint as durable.
    Checkpoint {
        attempt: u32,
        data: Value,
    },
}

/// A workflow that had not finished when the run stopped waiting, as it was then.
#[derive(Clone, Debug)]
pub struct Unsettled {
    pub wf: WorkflowId,
    pub why: String,
    /// A task of it was queued with nothing in flight (it should have started).
    pub queued_idle: bool,
}

pub(crate) struct Context<'a> {
    pub plan: &'a Plan,
    pub durable: &'a Durable,
    /// `Handle::workflow` of the last orchestrator, per workflow it answered for.
    pub engine_states: &'a BTreeMap<WorkflowId, Workflow>,
    pub acks: &'a [Ack],
    pub paused: &'a BTreeSet<WorkflowId>,
    pub unsettled: &'a [Unsettled],
    pub jobs_left: &'a [(SignatureId, u32)],
    /// Events the hot-tier projector could not fold (its fold of the log must apply too).
    pub projector_apply_errors: u64,
    /// Appends that failed by injection in this run.
    pub appends_failed: u64,
}

/// A finding that matches a known, open engine bug: tolerated (recorded in
/// `Observed::known`) if the run's config says so, else the run's failure.
fn known(
    cx: &Context<'_>,
    observed: &mut Observed,
    bug: Known,
    invariant: Invariant,
    detail: String,
) -> Result<(), Failure> {
    if cx.plan.tolerate.contains(&bug) {
        observed.known.push((bug, detail));
        return Ok(());
    }
    Err(Failure::new(
        cx.plan.seed,
        invariant,
        format!("{detail} [known: {}]", bug.name()),
    ))
}

pub(crate) fn all(cx: &Context<'_>, observed: &mut Observed) -> Result<(), Failure> {
    inner(cx, observed).map_err(|mut f| {
        // The history of the workflow the failure names: what a reader of a failing seed needs.
        if let Some(w) = cx
            .plan
            .workflows
            .iter()
            .find(|w| f.detail.contains(&w.id.0.simple().to_string()))
        {
            f.history = render(cx.durable, w.id);
        }
        f
    })
}

/// One line per event of `wf`: seq, time (relative µs), actor, kind and the fields that matter.
pub fn render(durable: &Durable, wf: WorkflowId) -> Vec<String> {
    let events = durable.log.read_stream(wf, 1).unwrap_or_default();
    let t0 = events.first().map_or(0, |e| e.at.as_micros());
    events
        .iter()
        .map(|e| {
            let detail = match &e.payload {
                Payload::Started { node, attempt } => format!("node {node} attempt {attempt}"),
                Payload::Checkpointed {
                    node,
                    attempt,
                    data,
                } => {
                    format!("node {node} attempt {attempt} data {data}")
                }
                Payload::Succeeded { node, attempt, .. } => {
                    format!("node {node} attempt {attempt}")
                }
                Payload::Failed {
                    node,
                    attempt,
                    error,
                } => {
                    format!("node {node} attempt {attempt} \"{}\"", error.message)
                }
                Payload::RetryScheduled {
                    node,
                    attempt,
                    error,
                    lost,
                    ..
                } => {
                    format!(
                        "node {node} attempt {attempt} lost={lost} \"{}\"",
                        error.message
                    )
                }
                Payload::WorkflowCreated { nodes } => format!("{} nodes", nodes.len()),
                p => p.node().map(|n| format!("node {n}")).unwrap_or_default(),
            };
            format!(
                "  {:>3} +{:>7}us {:<24} {} {}",
                e.seq,
                e.at.as_micros() - t0,
                e.actor.to_string(),
                e.payload.kind(),
                detail
            )
        })
        .collect()
}

fn inner(cx: &Context<'_>, observed: &mut Observed) -> Result<(), Failure> {
    let seed = cx.plan.seed;
    let fail = |inv, detail: String| Err(Failure::new(seed, inv, detail));
    let mut streams: BTreeMap<WorkflowId, Vec<Event>> = BTreeMap::new();
    for w in &cx.plan.workflows {
        match cx.durable.log.read_stream(w.id, 1) {
            Ok(events) => {
                streams.insert(w.id, events);
            }
            Err(e) => return fail(Invariant::StateIsFold, format!("{}: unreadable: {e}", w.id)),
        }
    }

    // 1. State = fold(apply, events).
    let mut folded = BTreeMap::new();
    for (id, events) in &streams {
        let state = match Workflow::replay(*id, events.iter().cloned()) {
            Ok(s) => s,
            Err(e) => {
                return fail(
                    Invariant::StateIsFold,
                    format!("{id}: the log does not fold: {e}"),
                )
            }
        };
        if state.exists() {
            match cx.engine_states.get(id) {
                None => {
                    return fail(
                        Invariant::StateIsFold,
                        format!(
                            "{id}: in the log ({} events) but the engine gave no state",
                            events.len()
                        ),
                    )
                }
                Some(live) => {
                    // The engine answered with its durable state as of the question; the log may
                    // have grown since (the question itself can wake a start). Compare with the
                    // fold of the same prefix.
                    let prefix = events.iter().take_while(|e| e.seq <= live.version).cloned();
                    let at_version = Workflow::replay(*id, prefix).map_err(|e| {
                        Failure::new(seed, Invariant::StateIsFold, format!("{id}: {e}"))
                    })?;
                    if *live != at_version || live.version > state.version {
                        return fail(
                            Invariant::StateIsFold,
                            format!("{id}: {}", diff(live, &at_version)),
                        );
                    }
                }
            }
        }
        folded.insert(*id, state);
    }
    if cx.projector_apply_errors > 0 {
        return fail(
            Invariant::StateIsFold,
            format!(
                "the hot-tier projector met {} events that do not apply",
                cx.projector_apply_errors
            ),
        );
    }

    for (id, events) in &streams {
        let Some(state) = folded.get(id) else {
            continue;
        };
        // Per node, counts within the current run (a rerun starts a new one).
        let mut succeeded: BTreeMap<u32, u32> = BTreeMap::new();
        let mut triggered: BTreeMap<u32, u32> = BTreeMap::new();
        let mut purged_in_window = false;
        let mut rerun_in_window = false;
        let mut purged = false;
        for e in events {
            match &e.payload {
                Payload::Rerun { .. } => {
                    if purged {
                        return fail(
                            Invariant::PurgeOrRerun,
                            format!("{id}: rerun at seq {} after its purge", e.seq),
                        );
                    }
                    succeeded.clear();
                    triggered.clear();
                    rerun_in_window = true;
                    observed.reruns += 1;
                }
                Payload::MarkedForDeletion { .. } => {
                    purged_in_window = false;
                    rerun_in_window = false;
                }
                Payload::Purged { .. } => {
                    purged = true;
                    purged_in_window = true;
                    observed.purges += 1;
                }
                // 2. A task's success is recorded once.
                Payload::Succeeded { node, attempt, .. } => {
                    let n = succeeded.entry(*node).or_default();
                    *n += 1;
                    if *n > 1 {
                        return fail(
                            Invariant::SuccessOnce,
                            format!(
                                "{id}: node {node} succeeded again at seq {} (attempt {attempt})",
                                e.seq
                            ),
                        );
                    }
                }
                // 3. Callbacks (and every signature) are triggered once per run.
                Payload::Queued { node, .. } | Payload::ContainerStarted { node, .. } => {
                    let n = triggered.entry(*node).or_default();
                    *n += 1;
                    if *n > 1 {
                        let what = match state.node(*node).and_then(|n| n.spec.parent) {
                            Some(Link {
                                role: Role::SuccessCallback,
                                ..
                            }) => "success callback",
                            Some(Link {
                                role: Role::ErrorCallback,
                                ..
                            }) => "error callback",
                            Some(Link {
                                role: Role::Cleanup,
                                ..
                            }) => "cleanup callback",
                            _ => "signature",
                        };
                        return fail(
                            Invariant::CallbacksOnce,
                            format!(
                                "{id}: {what} {node} triggered again at seq {} ({})",
                                e.seq,
                                e.payload.kind()
                            ),
                        );
                    }
                }
                // 9. A handler stopped by the system never fails its task.
                Payload::Failed {
                    node,
                    attempt,
                    error,
                }
                | Payload::RetryScheduled {
                    node,
                    attempt,
                    error,
                    lost: false,
                    ..
                } if error.message.starts_with(STOPPED_MARK) => {
                    known(
                        cx,
                        observed,
                        Known::StoppedHandlerFails,
                        Invariant::StoppedNeverFails,
                        format!(
                            "{id}: node {node} attempt {attempt}: {} at seq {} by {} with \"{}\" \
                             (its handler was stopped by the system, not by an operator)",
                            e.payload.kind(),
                            e.seq,
                            e.actor,
                            error.message
                        ),
                    )?;
                }
                _ => {}
            }
            // 5. Of a purge and a rerun racing it, one wins.
            if purged_in_window && rerun_in_window {
                return fail(
                    Invariant::PurgeOrRerun,
                    format!(
                        "{id}: both purged and rerun within one deletion window (seq {})",
                        e.seq
                    ),
                );
            }
        }
    }

    // 4. Nothing acknowledged is lost.
    for a in cx.durable.acked() {
        let Some(first) = a.events.first() else {
            continue;
        };
        let stored = cx
            .durable
            .log
            .read_stream(a.stream, first.seq)
            .unwrap_or_default();
        if stored.len() < a.events.len() || stored[..a.events.len()] != a.events[..] {
            return fail(
                Invariant::AckedNotLost,
                format!(
                    "{}: an acknowledged append from seq {} is not in the log as written",
                    a.stream, first.seq
                ),
            );
        }
    }
    for ack in cx.acks {
        let events = streams.get(&ack.wf).map(Vec::as_slice).unwrap_or_default();
        let on_node = |f: &dyn Fn(&Payload) -> bool| {
            events
                .iter()
                .any(|e| e.payload.node() == Some(ack.node) && f(&e.payload))
        };
        let present = match &ack.op {
            AckOp::Submitted => events
                .iter()
                .any(|e| matches!(e.payload, Payload::WorkflowCreated { .. })),
            AckOp::Suspend => on_node(&|p| matches!(p, Payload::Suspended { .. })),
            AckOp::Interrupt => on_node(&|p| matches!(p, Payload::Interrupted { .. })),
            AckOp::Cancel => on_node(&|p| matches!(p, Payload::Canceled { .. })),
            AckOp::Delete => on_node(&|p| matches!(p, Payload::MarkedForDeletion { .. })),
            AckOp::Restore => on_node(&|p| matches!(p, Payload::Restored { .. })),
            AckOp::Rerun => {
                let oks = cx
                    .acks
                    .iter()
                    .filter(|a| a.wf == ack.wf && a.op == AckOp::Rerun)
                    .count();
                events
                    .iter()
                    .filter(|e| matches!(e.payload, Payload::Rerun { .. }))
                    .count()
                    >= oks
            }
            // A resume of something not paused is a no-op that answers Ok.
            AckOp::Resume => true,
            AckOp::Checkpoint { attempt, data } => on_node(
                &|p| matches!(p, Payload::Checkpointed { attempt: a, data: d, .. } if a == attempt && d == data),
            ),
        };
        if !present {
            let detail = format!(
                "{}: {:?} of node {} was answered Ok but is not in the log",
                ack.wf, ack.op, ack.node
            );
            // A checkpoint of an attempt that had already ended: `decide` drops it silently
            // and the engine answers Ok.
            let stale = match &ack.op {
                AckOp::Checkpoint { attempt, .. } => events.iter().any(|e| {
                    e.payload.node() == Some(ack.node)
                        && match &e.payload {
                            Payload::Succeeded { attempt: a, .. }
                            | Payload::Failed { attempt: a, .. }
                            | Payload::RetryScheduled { attempt: a, .. } => a == attempt,
                            Payload::Started { attempt: a, .. } => a > attempt,
                            Payload::Interrupted { .. } | Payload::Canceled { .. } => true,
                            _ => false,
                        }
                }),
                _ => false,
            };
            if stale {
                known(
                    cx,
                    observed,
                    Known::StaleCheckpointAcked,
                    Invariant::AckedNotLost,
                    detail,
                )?;
            } else {
                return fail(Invariant::AckedNotLost, detail);
            }
        }
    }

    // 6. Liveness: everything not left paused finished once the faults stopped.
    if let Some(Unsettled { wf: id, why, .. }) = cx.unsettled.first() {
        let detail = format!(
            "{id} not finished {} ms after the faults stopped: {why} ({} unsettled)",
            cx.plan.settle_ms,
            cx.unsettled.len()
        );
        // Every stuck workflow has a task queued and not in flight, and an append failed: the
        // task whose `started` event was in the failed batch is not started again.
        let start_lost = cx.appends_failed > 0 && cx.unsettled.iter().all(|u| u.queued_idle);
        if start_lost {
            known(
                cx,
                observed,
                Known::StartLostAfterFailedAppend,
                Invariant::Liveness,
                detail,
            )?;
        } else {
            return fail(Invariant::Liveness, detail);
        }
    }

    // The hot tier is a projection: a job left over must be an attempt still in flight.
    for (sig, attempt) in cx.jobs_left {
        let in_flight = folded
            .get(&sig.workflow)
            .and_then(|w| w.node(sig.index))
            .is_some_and(|n| n.in_flight && n.attempt == *attempt);
        if !in_flight {
            return fail(
                Invariant::HotIsProjection,
                format!(
                    "job {sig} attempt {attempt} left in the hot tier, not in flight in the log"
                ),
            );
        }
    }

    observed.paused = cx.paused.len() as u64;
    for w in &cx.plan.workflows {
        let status = folded
            .get(&w.id)
            .and_then(|s| s.root().map(|r| r.status.name()))
            .unwrap_or("absent");
        observed.outcome.push(status.to_owned());
        observed.events += streams.get(&w.id).map_or(0, |e| e.len() as u64);
    }
    Ok(())
}

/// Where two states of one workflow differ first.
fn diff(live: &Workflow, folded: &Workflow) -> String {
    if live.version != folded.version {
        return format!(
            "the engine's state is at version {}, the log's fold at {}",
            live.version, folded.version
        );
    }
    for (i, (a, b)) in live.nodes.iter().zip(&folded.nodes).enumerate() {
        if a != b {
            return format!("node {i} differs: engine {a:?} vs log {b:?}");
        }
    }
    if live.nodes.len() != folded.nodes.len() {
        return format!(
            "{} nodes in the engine, {} in the log",
            live.nodes.len(),
            folded.nodes.len()
        );
    }
    "the states differ outside their nodes".into()
}
