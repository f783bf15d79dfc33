//! What events mean outside the state: the work they ask of the world — a task to start, a job
//! to hand to a worker, a running attempt to stop, a timer to arm, a purge to schedule. Worked
//! out here, once, from the events alone; the engine's orchestrator and the hot tier's projector
//! both consume this list instead of each matching on payloads.
//!
//! Effects are a pure function of the events (not of the state they fold into), so replaying a
//! log yields exactly the effects its events had when they were decided — what lets recovery and
//! a rebuilt hot tier reach the same conclusions as the process that wrote them.

use crate::event::{Event, Payload};
use crate::id::{NodeIndex, SignatureId, WorkflowId};
use crate::model::Status;
use crate::time::Timestamp;

/// One thing an event asks of the world.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Effect {
    /// The task is queued to start (triggered unparked, or resumed into the queue): it takes a
    /// worker slot when one is free.
    Enqueue(SignatureId),
    /// Attempt `attempt` of the task started: a job for a worker.
    Dispatch { sig: SignatureId, attempt: u32 },
    /// The task's running attempt, if one runs, must stop: its lease is revoked and its handler's
    /// token fires (an interrupt, a cancel, or an attempt given up as lost).
    Revoke(SignatureId),
    /// Start the task again at `at` (a retry's backoff).
    ArmTimer { sig: SignatureId, at: Timestamp },
    /// Purge the workflow at `at`, when its deletion window ends.
    SchedulePurge { workflow: WorkflowId, at: Timestamp },
    /// The workflow was purged: nothing of it is kept in hot state.
    Forget(WorkflowId),
    /// A task attempt (not a container) succeeded.
    TaskSucceeded(SignatureId),
    /// A task attempt (not a container) failed for good.
    TaskFailed(SignatureId),
}

impl Effect {
    /// The effects of one event, in the order they are to be carried out.
    pub fn of(event: &Event) -> impl Iterator<Item = Effect> {
        let sig = |index: NodeIndex| SignatureId {
            workflow: event.stream,
            index,
        };
        let (first, second) = match event.payload {
            Payload::Queued {
                node,
                parked: false,
                ..
            }
            | Payload::Resumed {
                node,
                status: Status::Queued,
            } => (Some(Effect::Enqueue(sig(node))), None),
            Payload::Started { node, attempt } => (
                Some(Effect::Dispatch {
                    sig: sig(node),
                    attempt,
                }),
                None,
            ),
            Payload::RetryScheduled {
                node,
                retry_at,
                lost,
                ..
            } => (
                Some(Effect::ArmTimer {
                    sig: sig(node),
                    at: retry_at,
                }),
                // An attempt given up (its worker stopped reporting) may still run somewhere.
                lost.then(|| Effect::Revoke(sig(node))),
            ),
            Payload::Interrupted { node } | Payload::Canceled { node } => {
                (Some(Effect::Revoke(sig(node))), None)
            }
            Payload::Succeeded { node, attempt, .. } if attempt > 0 => {
                (Some(Effect::TaskSucceeded(sig(node))), None)
            }
            Payload::Failed { node, attempt, .. } if attempt > 0 => {
                (Some(Effect::TaskFailed(sig(node))), None)
            }
            Payload::MarkedForDeletion { expires_at, .. } => (
                Some(Effect::SchedulePurge {
                    workflow: event.stream,
                    at: expires_at,
                }),
                None,
            ),
            Payload::Purged { .. } => (Some(Effect::Forget(event.stream)), None),
            _ => (None, None),
        };
        first.into_iter().chain(second)
    }

    /// What one event asks of the workers, as a hot tier's projector needs it: whether its
    /// node's running attempt is revoked (the projector publishes a stop), and the attempt
    /// that started, if one did (a job to queue).
    pub fn for_workers(event: &Event) -> (bool, Option<u32>) {
        let (mut revoke, mut dispatch) = (false, None);
        for effect in Effect::of(event) {
            match effect {
                Effect::Revoke(_) => revoke = true,
                Effect::Dispatch { attempt, .. } => dispatch = Some(attempt),
                _ => {}
            }
        }
        (revoke, dispatch)
    }
}

/// The effects of `events`, in order: what the engine carries out after appending them, and what
/// the projector derives when it projects them.
pub fn effects(events: &[Event]) -> Vec<Effect> {
    events.iter().flat_map(Effect::of).collect()
}
