//! Pipelined commits: a group written by `COPY` in an open transaction while the group before it
//! commits, and committed only after it. Under concurrent appenders every acknowledged event is
//! in the log once, in order, with dense positions; a commit held up by another session's head
//! lock makes the committer roll the pipelined group back and commit it the long way.

use crate::{TestSchema, WAIT_MAX};
use mageflow_store::conformance::{check_consistent, event_with, stream};
use mageflow_store::{AppendRequest, EventLog};
use mageflow_store_pg::PgLog;
use sqlx::Executor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

const APPENDERS: u64 = 64;

fn appender_event(a: u64, seq: u64) -> mageflow_core::Event {
    event_with(stream(900 + u128::from(a)), seq, &format!("a{a}"), 48)
}

/// `APPENDERS` tasks, each appending one event at a time to its own stream and awaiting it,
/// `rounds` times or (with `until`) until it is set and `rounds` are done.
fn spawn_appenders(
    log: &Arc<PgLog>,
    rounds: u64,
    until: Option<Arc<AtomicBool>>,
) -> Vec<tokio::task::JoinHandle<(u64, u64)>> {
    (0..APPENDERS)
        .map(|a| {
            let (log, until) = (log.clone(), until.clone());
            tokio::spawn(async move {
                let s = stream(900 + u128::from(a));
                let mut version = 0;
                while version < rounds || until.as_ref().is_some_and(|u| !u.load(Ordering::Acquire))
                {
                    let req = AppendRequest {
                        stream: s,
                        expected_version: version,
                        events: vec![appender_event(a, version + 1)],
                    };
                    log.append(vec![req])
                        .await
                        .unwrap_or_else(|e| panic!("appender {a}, seq {}: {e}", version + 1));
                    version += 1;
                }
                (a, version)
            })
        })
        .collect()
}

/// Every appender's events, exactly as written, and nothing else; positions dense.
async fn assert_all_there(log: &PgLog, appenders: Vec<tokio::task::JoinHandle<(u64, u64)>>) {
    let mut total = 0;
    let mut versions = Vec::new();
    for a in appenders {
        versions.push(a.await.expect("appender"));
    }
    let streams = check_consistent(log);
    for (a, version) in versions {
        let events = &streams[&stream(900 + u128::from(a))];
        assert_eq!(events.len() as u64, version, "appender {a}");
        for e in events {
            assert_eq!(*e, appender_event(a, e.seq));
        }
        total += version;
    }
    assert_eq!(log.head(), total);
    assert_eq!(log.verify().expect("verify"), total);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_are_pipelined_and_land_in_order() {
    let schema = TestSchema::new().await;
    let log = Arc::new(schema.open().await);
    let appenders = spawn_appenders(&log, 60, None);
    assert_all_there(&log, appenders).await;
    let stats = log.stats();
    // Not a timing assertion: with 64 appenders waiting on each other's commits, groups queue
    // up behind the one in flight, which is what pipelining commits.
    assert!(
        stats.pipelined_commits > 0,
        "nothing was pipelined: {stats:?}"
    );
    assert_eq!(stats.events, log.head(), "{stats:?}");
    println!("{stats:?}");
}

/// Another session holds the head row lock for a second: the commit in flight waits on it, the
/// pipelined group behind it is rolled back after `NEXT_HOLD_MAX` (its open transaction could be
/// what that session waits for), and goes the long way once the lock is free. Nothing is lost
/// or written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_commit_held_up_by_another_session_rolls_the_pipelined_group_back() {
    let schema = TestSchema::new().await;
    let log = Arc::new(schema.open().await);
    let done = Arc::new(AtomicBool::new(false));
    let appenders = spawn_appenders(&log, 20, Some(done.clone()));

    let mut rx = log.subscribe();
    tokio::time::timeout(WAIT_MAX, rx.wait_for(|h| *h >= 200))
        .await
        .expect("appends under way")
        .expect("log alive");
    let mut admin = schema.admin().await;
    admin.execute("BEGIN").await.expect("BEGIN");
    let locked_at: i64 = sqlx::query_scalar("SELECT position FROM mageflow_head FOR UPDATE")
        .fetch_one(&mut admin)
        .await
        .expect("lock the head row");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(log.head(), locked_at as u64, "a commit went past the lock");
    admin.execute("ROLLBACK").await.expect("ROLLBACK");

    tokio::time::timeout(WAIT_MAX, rx.wait_for(|h| *h >= locked_at as u64 + 200))
        .await
        .expect("appends go on after the lock")
        .expect("log alive");
    done.store(true, Ordering::Release);
    assert_all_there(&log, appenders).await;
    let stats = log.stats();
    assert!(stats.pipeline_rollbacks >= 1, "{stats:?}");
    println!("{stats:?}");
}
