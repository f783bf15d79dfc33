//! Several processes sharing one log. Each `PgLog` has its own committer, listener and read
//! connections, so two of them are, to PostgreSQL, two processes.

use crate::{TestSchema, WAIT_MAX};
use mageflow_core::Payload;
use mageflow_store::conformance::{
    all, assert_conflict, check_consistent, event_with, request, stream,
};
use mageflow_store::{AppendRequest, EventLog};
use mageflow_store_pg::PgLog;
use std::collections::BTreeSet;
use std::sync::Arc;

/// Wait until `log`'s head watch reaches `position`.
async fn wait_for_head(log: &PgLog, position: u64) {
    let mut rx = log.subscribe();
    tokio::time::timeout(WAIT_MAX, rx.wait_for(|h| *h >= position))
        .await
        .unwrap_or_else(|_| panic!("the head never reached {position} (at {})", log.head()))
        .expect("log alive");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stale_writer_of_another_process_gets_a_conflict() {
    let schema = TestSchema::new().await;
    let a = schema.open().await;
    let b = schema.open().await;
    let (s, t) = (stream(1), stream(2));
    a.append(vec![request(s, 0, 2)]).await.expect("a appends");
    // b has not seen a's events and appends at version 0: refused whole, nothing written.
    let err = b
        .append(vec![request(t, 0, 1), request(s, 0, 1)])
        .await
        .expect_err("stale");
    assert_conflict(&err, s, 0, 2);
    for log in [&a, &b] {
        assert_eq!(log.stream_version(t).expect("version"), 0);
        assert_eq!(log.stream_version(s).expect("version"), 2);
    }
    // At the right version it lands after a's events, and both see the same log.
    assert_eq!(
        b.append(vec![request(s, 2, 1), request(t, 0, 1)])
            .await
            .expect("append"),
        vec![3, 4]
    );
    // a's committer remembers s at version 2; it must learn of b's commit before checking.
    let err = a
        .append(vec![request(s, 2, 1)])
        .await
        .expect_err("stale after the other process wrote");
    assert_conflict(&err, s, 2, 3);
    assert_eq!(
        a.append(vec![request(s, 3, 1)]).await.expect("append"),
        vec![5]
    );
    wait_for_head(&b, 5).await;
    assert_eq!(all(&a), all(&b));
    check_consistent(&a);
    check_consistent(&b);
}

const WRITERS_PER_LOG: u64 = 4;
const OWN_APPENDS: u64 = 30;
const SHARED_EVENTS: u64 = 15;

/// Writers in two processes append to their own streams and race on one shared stream with
/// read-version-then-append retries. Positions stay dense, every event lands exactly once, and
/// each process's head watch follows the other's commits (NOTIFY).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_share_one_log() {
    let schema = TestSchema::new().await;
    let logs = [Arc::new(schema.open().await), Arc::new(schema.open().await)];
    let shared = stream(100);
    let mut tasks = Vec::new();
    for (p, log) in logs.iter().enumerate() {
        for w in 0..WRITERS_PER_LOG {
            let log = log.clone();
            let id = p as u64 * WRITERS_PER_LOG + w;
            tasks.push(tokio::spawn(async move {
                let own = stream(200 + u128::from(id));
                let mut conflicts = 0u64;
                for n in 0..OWN_APPENDS {
                    let count = 1 + (n + id) % 3;
                    let version = log.stream_version(own).expect("version");
                    let events = (version + 1..=version + count)
                        .map(|seq| event_with(own, seq, &format!("own{id}"), 16))
                        .collect();
                    log.append(vec![AppendRequest {
                        stream: own,
                        expected_version: version,
                        events,
                    }])
                    .await
                    .expect("append to an own stream");
                    if n % 2 == 0 {
                        let tag = format!("p{p}w{w}n{n}");
                        loop {
                            let version = log.stream_version(shared).expect("version");
                            let req = AppendRequest {
                                stream: shared,
                                expected_version: version,
                                events: vec![event_with(shared, version + 1, &tag, 4)],
                            };
                            match log.append(vec![req]).await {
                                Ok(_) => break,
                                Err(e) if e.is_conflict() => conflicts += 1,
                                Err(e) => panic!("append to the shared stream: {e}"),
                            }
                        }
                    }
                }
                conflicts
            }));
        }
    }
    let mut conflicts = 0;
    for t in tasks {
        conflicts += t.await.expect("writer");
    }
    let writers = 2 * WRITERS_PER_LOG;
    let own_events: u64 = (0..writers)
        .map(|id| (0..OWN_APPENDS).map(|n| 1 + (n + id) % 3).sum::<u64>())
        .sum();
    let shared_events = writers * OWN_APPENDS.div_ceil(2);
    assert_eq!(shared_events, writers * SHARED_EVENTS);
    let total = own_events + shared_events;
    for log in &logs {
        wait_for_head(log, total).await;
        assert_eq!(log.head(), total);
    }
    let streams = check_consistent(&*logs[0]);
    assert_eq!(all(&*logs[0]), all(&*logs[1]));
    let mut tags = BTreeSet::new();
    for e in &streams[&shared] {
        let Payload::KwargsUpdated { kwargs, .. } = &e.payload else {
            panic!("unexpected payload {e:?}");
        };
        let tag = kwargs["tag"].as_str().expect("tag").to_owned();
        assert_eq!(*e, event_with(shared, e.seq, &tag, 4));
        assert!(tags.insert(tag), "an event landed twice: {e:?}");
    }
    assert_eq!(tags.len() as u64, shared_events);
    println!("two processes: {total} events, {conflicts} conflicts retried");
    for log in &logs {
        assert_eq!(log.verify().expect("verify"), total);
    }
}
