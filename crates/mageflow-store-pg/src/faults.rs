//! Deterministic faults in the committer, for this crate's tests only (feature
//! `fault-injection`): the cases that random connection kills reach only by luck.

use sqlx::{Executor, PgConnection};
use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Default)]
pub struct Faults {
    lose_commit_replies: AtomicU32,
    roll_back_silently: AtomicU32,
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

    /// Called with the final statement (head, notify, COMMIT). `Some(Ok(message))`: the fault
    /// happened, report an unknown outcome; `Some(Err)`: a real error while injecting.
    pub(crate) async fn before_commit(
        &self,
        conn: &mut PgConnection,
        finish: &str,
    ) -> Option<Result<String, sqlx::Error>> {
        if take(&self.roll_back_silently) {
            return Some(conn.execute("ROLLBACK").await.map(|_| {
                "injected: connection lost while COMMIT was in flight (rolled back)".into()
            }));
        }
        if take(&self.lose_commit_replies) {
            return Some(
                conn.execute(finish)
                    .await
                    .map(|_| "injected: connection lost after COMMIT was sent (committed)".into()),
            );
        }
        None
    }
}
