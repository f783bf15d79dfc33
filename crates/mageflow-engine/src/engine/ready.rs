//! The orchestrator's ready queue: signatures queued to start, taken highest priority first
//! ([`mageflow_core::Workflow::priority`]) and in order of queueing within one priority. With
//! remote dispatch it decides which jobs enter the hot tier's queue when the dispatch window is
//! full, so the deployment's workers see higher priorities first too.

use mageflow_core::SignatureId;
use std::collections::{BTreeMap, VecDeque};

#[derive(Default)]
pub(super) struct ReadyQueue {
    /// By negated priority: the first level is the highest.
    levels: BTreeMap<i32, VecDeque<SignatureId>>,
}

impl ReadyQueue {
    pub(super) fn push_back(&mut self, sig: SignatureId, priority: i32) {
        self.levels
            .entry(priority.saturating_neg())
            .or_default()
            .push_back(sig);
    }

    pub(super) fn pop_front(&mut self) -> Option<SignatureId> {
        let mut level = self.levels.first_entry()?;
        let sig = level.get_mut().pop_front();
        if level.get().is_empty() {
            level.remove();
        }
        sig
    }

    pub(super) fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mageflow_core::WorkflowId;

    #[test]
    fn highest_priority_first_then_in_order_of_queueing() {
        let sig = |index| SignatureId {
            workflow: WorkflowId::from_u128(1),
            index,
        };
        let mut q = ReadyQueue::default();
        for (i, p) in [(0, 0), (1, -5), (2, 7), (3, 0), (4, 7)] {
            q.push_back(sig(i), p);
        }
        let order: Vec<u32> = std::iter::from_fn(|| q.pop_front())
            .map(|s| s.index)
            .collect();
        assert_eq!(order, [2, 4, 0, 3, 1]);
        assert!(q.is_empty());
    }
}
