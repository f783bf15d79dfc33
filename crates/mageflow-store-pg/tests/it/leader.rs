//! One orchestrator per log (`PgLog::orchestrator_lock`, `try_orchestrator_lock`): a second
//! one stands by until the first lets go (or, only trying, does not get it), a holder whose
//! session ends takes the lock again, and a standby that gets it meanwhile makes the old holder
//! learn it lost.

use crate::connection_loss::terminate;
use crate::{TestSchema, WAIT_MAX};
use mageflow_store_pg::{OrchestratorLock, PgLog};
use std::time::Duration;

/// Longer than a standby's poll (1 s) several times over: a lock that could be taken would
/// have been. (Never an upper bound on anything the tests measure.)
const STANDBY_WATCH: Duration = Duration::from_secs(3);

async fn lock(log: &PgLog) -> OrchestratorLock {
    tokio::time::timeout(WAIT_MAX, log.orchestrator_lock())
        .await
        .expect("the lock is free: taken at once")
        .expect("orchestrator lock")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_orchestrator_stands_by_until_the_first_lets_go() {
    let schema = TestSchema::new().await;
    let (first_log, second_log) = (schema.open().await, schema.open().await);
    let first = lock(&first_log).await;
    assert_ne!(first.backend_pid(), 0);

    let tried = second_log.try_orchestrator_lock().await.expect("try");
    assert!(tried.is_none(), "taken while the first holds it");
    let waiting = second_log.orchestrator_lock();
    tokio::pin!(waiting);
    assert!(
        tokio::time::timeout(STANDBY_WATCH, &mut waiting)
            .await
            .is_err(),
        "the second orchestrator got the lock while the first held it"
    );
    // Another log's lock is another lock.
    let other = TestSchema::new().await;
    let other_log = other.open().await;
    let other_lock = other_log.try_orchestrator_lock().await.expect("try");
    assert!(other_lock.is_some(), "a free lock is taken at once");

    drop(first);
    let second = tokio::time::timeout(WAIT_MAX, waiting)
        .await
        .expect("the standby takes over once the first lets go")
        .expect("orchestrator lock");
    assert_ne!(second.backend_pid(), 0);
    assert!(!second.is_lost());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_holder_whose_session_ends_takes_the_lock_again() {
    let schema = TestSchema::new().await;
    let (log, other_log) = (schema.open().await, schema.open().await);
    let held = lock(&log).await;
    let old = held.backend_pid();
    let mut admin = schema.admin().await;
    terminate(&mut admin, old).await;
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    while held.backend_pid() == 0 || held.backend_pid() == old {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the lock was not taken again"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!held.is_lost());
    assert!(
        tokio::time::timeout(STANDBY_WATCH, other_log.orchestrator_lock())
            .await
            .is_err(),
        "the lock taken again is held: nobody else gets it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_takes_over_when_the_holders_session_ends_and_the_old_holder_stops() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let held = lock(&log).await;
    let standby = {
        let second_log = schema.open().await;
        // The log goes along with its lock: dropping it would end the lock's session.
        tokio::spawn(async move {
            let lock = second_log.orchestrator_lock().await;
            (second_log, lock)
        })
    };
    // A holder whose session ended leaves the standby two seconds to take the lock; should it
    // take it back anyway (a standby slower than that), its new session is ended too.
    let mut admin = schema.admin().await;
    let deadline = tokio::time::Instant::now() + WAIT_MAX;
    let mut ended = 0;
    while !standby.is_finished() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the standby never took over"
        );
        // The holder reports its old session until it notices that it ended.
        let pid = held.backend_pid();
        if pid != 0 && pid != ended {
            terminate(&mut admin, pid).await;
            ended = pid;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_second_log, second) = standby.await.expect("standby task");
    let second = second.expect("orchestrator lock");
    assert_ne!(second.backend_pid(), 0);
    tokio::time::timeout(WAIT_MAX, held.lost())
        .await
        .expect("the old holder learns it lost the lock");
    assert!(held.is_lost());
    assert!(!second.is_lost());
}
