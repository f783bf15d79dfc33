//! A chain: its steps run one after another, each triggered with the previous one's result; the
//! first failure fails the chain, naming the step (its error callbacks get the failing step's input and error).

use crate::command::Rejection;
use crate::decide::Decider;
use crate::event::Payload;
use crate::id::NodeIndex;
use crate::model::{KindSpec, Message, Outcome};

fn steps<'d>(d: &'d Decider<'_>, chain: NodeIndex) -> &'d [NodeIndex] {
    match &d.wf.nodes[chain as usize].spec.kind {
        KindSpec::Chain { children } => children,
        _ => &[],
    }
}

/// The chain started: trigger its first step with the chain's message.
pub(super) fn start(
    d: &mut Decider<'_>,
    chain: NodeIndex,
    message: Message,
) -> Result<(), Rejection> {
    match steps(d, chain).first().copied() {
        Some(first) => d.trigger(first, message),
        None => Ok(()),
    }
}

/// A step finished: a success triggers the next step with its result (or, after the last,
/// succeeds the chain with it); a failure fails the chain. A step canceled on its own (no
/// outcome) leaves the chain waiting.
pub(super) fn child_finished(
    d: &mut Decider<'_>,
    chain: NodeIndex,
    step: NodeIndex,
) -> Result<(), Rejection> {
    let n = &d.wf.nodes[step as usize];
    let (position, outcome) = (n.position, n.outcome.clone());
    match outcome {
        Some(Outcome::Ok(result)) => match steps(d, chain).get(position as usize + 1).copied() {
            Some(next) => d.trigger(next, Message::result(result)),
            None => {
                d.emit(Payload::Succeeded {
                    node: chain,
                    attempt: 0,
                    result,
                })?;
                d.finished(chain)
            }
        },
        Some(Outcome::Err(error)) => {
            // The chain fails naming its step; its error callbacks get the failing step's input
            // plus the step's own error (the decider's `finished` finds the failing step).
            let error = d.inner_failure("step", step, &error);
            d.emit(Payload::Failed {
                node: chain,
                attempt: 0,
                error,
            })?;
            d.finished(chain)
        }
        None => Ok(()),
    }
}
