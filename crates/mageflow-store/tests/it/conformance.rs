//! The conformance suite (`mageflow_store::conformance`, shared with every backend crate) run
//! against [`MemoryLog`] (the reference) and [`SledLog`], the script both must answer like the
//! reference, and what only sled has: a reopened [`SledLog`] returns what it stored, a closed one
//! refuses appends.

use crate::{event, open_sled, request, runtime, stream};
use mageflow_store::conformance::{
    agrees_with_memory, all, assert_conflict, check_consistent, compaction_suite, run_suite,
};
use mageflow_store::{Error, EventLog, MemoryLog};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory_log_conforms() {
    run_suite(Arc::new(MemoryLog::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sled_log_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = Arc::new(open_sled(dir.path()));
    run_suite(log.clone()).await;
    assert_eq!(log.verify().expect("verify"), log.head());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_log_says_it_cannot_compact() {
    assert!(!compaction_suite(&MemoryLog::new()).await);
}

#[test]
fn sled_log_compacts_and_reopens_with_the_same_reads() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let (streams, live, head) = {
        let log = open_sled(dir.path());
        assert!(rt.block_on(compaction_suite(&log)));
        assert_eq!(log.verify().expect("verify"), log.head());
        let streams: Vec<_> = (101..=104)
            .map(|n| log.read_stream(stream(n), 1).expect("read"))
            .collect();
        (streams, all(&log), log.head())
    };
    let log = open_sled(dir.path());
    assert_eq!(log.head(), head);
    assert_eq!(log.verify().expect("verify"), head);
    assert_eq!(all(&log), live);
    for (i, events) in streams.iter().enumerate() {
        assert_eq!(
            &log.read_stream(stream(101 + i as u128), 1).expect("read"),
            events
        );
    }
}

#[test]
fn memory_and_sled_agree_on_a_script() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sled = open_sled(dir.path());
    runtime().block_on(agrees_with_memory(&sled));
    assert_eq!(sled.verify().expect("verify"), sled.head());
}

#[test]
fn sled_log_reopens_with_the_same_events() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let (before, versions) = {
        let log = open_sled(dir.path());
        for i in 0..20u128 {
            let s = stream(i % 5);
            let v = log.stream_version(s).expect("version");
            rt.block_on(log.append(vec![request(s, v, 1 + (i as u64 % 3))]))
                .expect("append");
        }
        let versions: Vec<u64> = (0..5)
            .map(|i| log.stream_version(stream(i)).expect("version"))
            .collect();
        (all(&log), versions)
    };
    let log = open_sled(dir.path());
    assert_eq!(log.head(), before.len() as u64);
    assert_eq!(*log.subscribe().borrow(), log.head());
    assert_eq!(all(&log), before);
    assert_eq!(log.verify().expect("verify"), log.head());
    for (i, v) in versions.iter().enumerate() {
        assert_eq!(log.stream_version(stream(i as u128)).expect("version"), *v);
    }
    // Versions survive the reopen: a stale append is refused, the right one lands after the rest.
    let s = stream(0);
    let v = versions[0];
    let err = rt
        .block_on(log.append(vec![request(s, v - 1, 1)]))
        .expect_err("stale");
    assert_conflict(&err, s, v - 1, v);
    let head = log.head();
    let got = rt
        .block_on(log.append(vec![request(s, v, 2)]))
        .expect("append");
    assert_eq!(got, vec![head + 2]);
    check_consistent(&log);
    drop(log);
    let log = open_sled(dir.path());
    assert_eq!(log.head(), head + 2);
    check_consistent(&log);
}

#[test]
fn closed_sled_log_refuses_appends() {
    let rt = runtime();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_sled(dir.path());
    rt.block_on(log.append(vec![request(stream(1), 0, 1)]))
        .expect("append");
    log.close();
    let err = rt
        .block_on(log.append(vec![request(stream(1), 1, 1)]))
        .expect_err("closed");
    assert!(matches!(err, Error::Closed), "{err:?}");
    // Reads still work after close.
    assert_eq!(
        log.read_stream(stream(1), 1).expect("read"),
        vec![event(stream(1), 1)]
    );
}
