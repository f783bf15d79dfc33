//! Deterministic faults in the committer, for this crate's tests only (feature
//! `fault-injection`): the cases that random connection kills reach only by luck.

use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Default)]
pub struct Faults {
    lose_commit_replies: AtomicU32,
    roll_back_silently: AtomicU32,
}

/// What the committer does instead of committing normally.
pub(crate) enum CommitFault {
    /// Commit, then behave as if the connection died before the answer arrived.
    LoseReply,
    /// Write nothing (roll back), then behave as if the connection died while COMMIT was in
    /// flight.
    RollBack,
}

fn take(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
        .is_ok()
}

impl Faults {
    /// The next `n` commits succeed, but the committer behaves as if the connection died before
    /// COMMIT's answer arrived (the outcome is unknown to it).
    pub fn lose_commit_replies(&self, n: u32) {
        self.lose_commit_replies.fetch_add(n, Ordering::AcqRel);
    }

    /// The next `n` commits are rolled back instead, and the committer behaves as if the
    /// connection died while COMMIT was in flight.
    pub fn roll_back_silently(&self, n: u32) {
        self.roll_back_silently.fetch_add(n, Ordering::AcqRel);
    }

    /// The fault armed for the commit about to happen, if any.
    pub(crate) fn take(&self) -> Option<CommitFault> {
        if take(&self.roll_back_silently) {
            return Some(CommitFault::RollBack);
        }
        take(&self.lose_commit_replies).then_some(CommitFault::LoseReply)
    }
}
