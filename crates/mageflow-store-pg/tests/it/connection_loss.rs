//! Connection loss: the committer's backend terminated under load (every acknowledged append is
//! in the log exactly once, and the log goes on), a COMMIT whose answer is lost (resolved by the
//! transaction's status, never written twice), and a listener that reconnects and catches up.

use crate::{TestSchema, WAIT_MAX};
use mageflow_store::conformance::{check_consistent, event, event_with, request, stream};
use mageflow_store::{AppendRequest, EventLog};
use mageflow_store_pg::{Faults, PgLog, PgOptions};
use sqlx::PgConnection;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Terminate a backend and wait (up to 5 s) until it is gone (PostgreSQL 14+).
pub(crate) async fn terminate(admin: &mut PgConnection, pid: i32) {
    assert_ne!(pid, 0, "no connection to terminate");
    let done: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1, 5000)")
        .bind(pid)
        .fetch_one(admin)
        .await
        .expect("pg_terminate_backend");
    assert!(done, "backend {pid} was not terminated");
}

async fn wait_for_head(log: &PgLog, position: u64) {
    let mut rx = log.subscribe();
    tokio::time::timeout(WAIT_MAX, rx.wait_for(|h| *h >= position))
        .await
        .unwrap_or_else(|_| panic!("the head never reached {position} (at {})", log.head()))
        .expect("log alive");
}

const WRITERS: u64 = 16;
/// Each writer appends at least this many times, and goes on until the kills are done.
const APPENDS_MIN: u64 = 20;
const KILLS: usize = 12;
/// The log must move on by this many events between two kills.
const EVENTS_BETWEEN_KILLS: u64 = 50;

fn writer_event(w: u64, s: mageflow_core::WorkflowId, seq: u64) -> mageflow_core::Event {
    event_with(s, seq, &format!("w{w}"), 32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_committer_loses_no_acknowledged_append() {
    let schema = TestSchema::new().await;
    let log = Arc::new(schema.open().await);
    let mut admin = schema.admin().await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (log, stop) = (log.clone(), stop.clone());
            tokio::spawn(async move {
                let s = stream(500 + u128::from(w));
                let mut version = 0;
                for n in 0.. {
                    if n >= APPENDS_MIN && stop.load(Ordering::Acquire) {
                        break;
                    }
                    let count = 1 + (n + w) % 3;
                    let req = AppendRequest {
                        stream: s,
                        expected_version: version,
                        events: (version + 1..=version + count)
                            .map(|seq| writer_event(w, s, seq))
                            .collect(),
                    };
                    // Retries are the log's business: every append must be acknowledged.
                    log.append(vec![req])
                        .await
                        .unwrap_or_else(|e| panic!("writer {w}, append {n}: {e}"));
                    version += count;
                }
                (w, s, version)
            })
        })
        .collect();

    // Kill the committer's connection whenever the log has moved on since the last kill (so
    // each kill hits a fresh connection with appends in flight); the listener's every 4th time.
    let mut killed = Vec::new();
    let mut rx = log.subscribe();
    let mut next_at = EVENTS_BETWEEN_KILLS;
    while killed.len() < KILLS {
        tokio::time::timeout(WAIT_MAX, rx.wait_for(|h| *h >= next_at))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the log stopped at {} after {} kills",
                    log.head(),
                    killed.len()
                )
            })
            .expect("log alive");
        let pid = log.committer_backend_pid();
        if pid == 0 {
            // Between connections right now; the next commit brings a new one.
            next_at = log.head() + 1;
            continue;
        }
        assert!(!killed.contains(&pid), "a terminated connection committed");
        terminate(&mut admin, pid).await;
        killed.push(pid);
        if killed.len() % 4 == 0 {
            terminate(&mut admin, log.listener_backend_pid()).await;
        }
        next_at = log.head() + EVENTS_BETWEEN_KILLS;
    }
    stop.store(true, Ordering::Release);

    let mut finished = Vec::new();
    for w in writers {
        finished.push(w.await.expect("writer"));
    }
    // Every acknowledged event is there exactly once, in order, as written; nothing else is.
    let streams = check_consistent(&*log);
    let mut total = 0;
    for (w, s, version) in &finished {
        let events = &streams[s];
        assert_eq!(events.len() as u64, *version, "writer {w}");
        for e in events {
            assert_eq!(*e, writer_event(*w, *s, e.seq));
        }
        total += version;
    }
    assert_eq!(streams.len() as u64, WRITERS);
    assert_eq!(log.head(), total);
    assert_eq!(log.verify().expect("verify"), total);
    // The log goes on.
    let got = log
        .append(vec![request(stream(1), 0, 1)])
        .await
        .expect("append after the kills");
    assert_eq!(got, vec![total + 1]);
    assert!(!killed.contains(&log.committer_backend_pid()));
    let stats = log.stats();
    assert_eq!(stats.events, total + 1, "{stats:?}");
    assert!(
        stats.retries + stats.in_doubt >= 1,
        "no kill was noticed: {stats:?}"
    );
    println!(
        "{} committer connections terminated under load; {total} events, all acknowledged, each \
         once; {stats:?}",
        killed.len()
    );
}

/// `fast`: small groups may be committed in one statement (the default).
async fn open_with_faults(schema: &TestSchema, fast: bool) -> (PgLog, Arc<Faults>) {
    let faults = Arc::new(Faults::default());
    let defaults = schema.options();
    let log = schema
        .open_with(PgOptions {
            faults: Some(faults.clone()),
            fast_commit_events_max: if fast {
                defaults.fast_commit_events_max
            } else {
                0
            },
            ..defaults
        })
        .await;
    (log, faults)
}

/// Pipelined appends of one stream, the first group's COMMIT answer lost (or the commit rolled
/// back with its answer lost): every append resolves Ok, in order, each event written once.
/// `fast`: that group is committed in one statement (resolved by its first row once the old
/// session is gone) or the long way (resolved by its transaction id).
async fn in_doubt_group(arm: impl FnOnce(&Faults), fast: bool) {
    let schema = TestSchema::new().await;
    let (log, faults) = open_with_faults(&schema, fast).await;
    let s = stream(1);
    log.append(vec![request(s, 0, 1)]).await.expect("append");
    let pid = log.committer_backend_pid();
    arm(&faults);
    let futures: Vec<_> = (0..5u64)
        .map(|n| log.append(vec![request(s, 1 + 2 * n, 2)]))
        .collect();
    for (n, f) in futures.into_iter().enumerate() {
        let got = f.await.unwrap_or_else(|e| panic!("append {n}: {e}"));
        assert_eq!(got, vec![3 + 2 * n as u64], "append {n}");
    }
    assert_ne!(
        log.committer_backend_pid(),
        pid,
        "the committer replaced its connection"
    );
    assert_eq!(log.stats().in_doubt, 1, "{:?}", log.stats());
    assert_eq!(
        log.read_stream(s, 1).expect("read"),
        (1..=11).map(|q| event(s, q)).collect::<Vec<_>>()
    );
    assert_eq!(log.head(), 11);
    check_consistent(&log);
    assert_eq!(log.verify().expect("verify"), 11);
    // The stream goes on at its real version.
    assert_eq!(
        log.append(vec![request(s, 11, 1)]).await.expect("append"),
        vec![12]
    );
    assert_eq!(log.stats().fast_commits > 0, fast, "{:?}", log.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_with_a_lost_answer_is_acknowledged_once() {
    in_doubt_group(|f| f.lose_commit_replies(1), false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_statement_commit_with_a_lost_answer_is_acknowledged_once() {
    in_doubt_group(|f| f.lose_commit_replies(1), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_one_statement_commit_with_a_lost_answer_is_redone() {
    in_doubt_group(|f| f.roll_back_silently(1), true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_commit_with_a_lost_answer_is_redone() {
    in_doubt_group(|f| f.roll_back_silently(1), false).await;
}

/// Another process commits while this one's listener is disconnected: the listener reconnects,
/// and the head watch reaches the other's commit (by notification or by reading the head row).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listener_catches_up_after_losing_its_connection() {
    let schema = TestSchema::new().await;
    let a = schema.open().await;
    let b = schema.open().await;
    let mut admin = schema.admin().await;
    let mut seen = Vec::new();
    for round in 0..3u128 {
        let old = a.listener_backend_pid();
        seen.push(old);
        terminate(&mut admin, old).await;
        let head = b
            .append(vec![request(stream(round), 0, 2)])
            .await
            .expect("append")[0];
        // Only a's listener moves a's head (a appends nothing); its old connection is gone.
        wait_for_head(&a, head).await;
        let new = a.listener_backend_pid();
        assert!(
            new != 0 && !seen.contains(&new),
            "round {round}: listener pid {new}"
        );
    }
    assert_eq!(a.head(), 6);
    check_consistent(&a);
}
