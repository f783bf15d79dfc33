//! The conformance suite every [`EventLog`] backend runs (enabled by the `conformance` feature;
//! test-only code, never part of a production build). [`run_suite`] takes an empty log through
//! appends, refusals, subscriptions, concurrent and pipelined appenders, checking every answer;
//! [`agrees_with_memory`] plays a deterministic script of good and bad appends against the
//! backend and the [`MemoryLog`] reference and requires identical answers. The event helpers
//! ([`stream`], [`event_with`], [`event`], [`request`]) build fully determined events, so a
//! reader can check exactly what it gets back. Every check panics with a message naming what
//! differed.

use crate::{AppendRequest, Error, EventLog, MemoryLog, Recorded};
use mageflow_core::{Actor, Event, Payload, Timestamp, WorkflowId, SCHEMA_VERSION};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

/// Stream number `n` of a test (distinct, stable ids).
pub fn stream(n: u128) -> WorkflowId {
    WorkflowId::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 | n)
}

/// The event a test writes as `seq` of `stream`, fully determined by its arguments so a reader can
/// check what it gets back. `tag` distinguishes writers; `pad_bytes` sizes the kwargs.
pub fn event_with(stream: WorkflowId, seq: u64, tag: &str, pad_bytes: usize) -> Event {
    let pad: String = (0..pad_bytes)
        .map(|i| char::from(b'a' + ((seq as usize + i) % 26) as u8))
        .collect();
    Event {
        stream,
        seq,
        at: Timestamp::from_micros(1_700_000_000_000_000 + seq as i64),
        actor: Actor::worker(format!("test-{tag}")),
        schema: SCHEMA_VERSION,
        payload: Payload::KwargsUpdated {
            node: 0,
            kwargs: json!({ "stream": stream.to_string(), "seq": seq, "tag": tag, "pad": pad }),
        },
    }
}

/// A small event.
pub fn event(stream: WorkflowId, seq: u64) -> Event {
    event_with(stream, seq, "t", 8)
}

/// Request appending `count` events to `stream`, which is at `version`.
pub fn request(stream: WorkflowId, version: u64, count: u64) -> AppendRequest {
    AppendRequest {
        stream,
        expected_version: version,
        events: (version + 1..=version + count)
            .map(|seq| event(stream, seq))
            .collect(),
    }
}

/// Guard against a hang (a missed wake-up), not a timing assertion: generous on purpose.
pub const WAIT_MAX: Duration = Duration::from_secs(30);

/// Every event of the log, in position order.
pub fn all(log: &dyn EventLog) -> Vec<Recorded> {
    log.read_all(1, usize::MAX).expect("read_all")
}

/// Append, expecting the per-request last positions `want`.
pub async fn append_ok(log: &dyn EventLog, requests: Vec<AppendRequest>, want: &[u64]) {
    let got = log.append(requests).await.expect("append");
    assert_eq!(got, want, "last positions of the append");
}

/// Append a request that must be refused, and check the log did not change at all.
pub async fn append_refused(log: &dyn EventLog, requests: Vec<AppendRequest>) -> Error {
    let head = log.head();
    let before = all(log);
    let versions: Vec<(WorkflowId, u64)> = requests
        .iter()
        .map(|r| (r.stream, log.stream_version(r.stream).expect("version")))
        .collect();
    let err = log
        .append(requests)
        .await
        .expect_err("the append must be refused");
    assert_eq!(
        log.head(),
        head,
        "head moved after a refused append ({err})"
    );
    assert_eq!(
        all(log),
        before,
        "log changed after a refused append ({err})"
    );
    for (s, v) in versions {
        assert_eq!(
            log.stream_version(s).expect("version"),
            v,
            "{s} after {err}"
        );
    }
    err
}

pub fn assert_conflict(err: &Error, s: WorkflowId, expected: u64, actual: u64) {
    match err {
        Error::Conflict {
            stream,
            expected: e,
            actual: a,
        } => assert_eq!((*stream, *e, *a), (s, expected, actual), "{err}"),
        other => panic!("expected a conflict on {s}, got {other:?}"),
    }
}

pub fn assert_invalid(err: &Error, s: WorkflowId) {
    match err {
        Error::InvalidAppend { stream, .. } => assert_eq!(*stream, s, "{err}"),
        other => panic!("expected an invalid append on {s}, got {other:?}"),
    }
}

/// Check the whole log: positions dense from 1 to head, every stream's seqs dense from 1, each
/// stream readable through `read_stream` with the same events, and `stream_version` agreeing.
pub fn check_consistent(log: &dyn EventLog) -> BTreeMap<WorkflowId, Vec<Event>> {
    let records = all(log);
    assert_eq!(records.len() as u64, log.head(), "read_all length vs head");
    let mut streams: BTreeMap<WorkflowId, Vec<Event>> = BTreeMap::new();
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.position, i as u64 + 1, "positions are dense");
        let events = streams.entry(r.event.stream).or_default();
        assert_eq!(
            r.event.seq,
            events.len() as u64 + 1,
            "seqs of {} dense",
            r.event.stream
        );
        events.push(r.event.clone());
    }
    for (s, events) in &streams {
        assert_eq!(
            &log.read_stream(*s, 1).expect("read_stream"),
            events,
            "stream {s}"
        );
        assert_eq!(
            log.stream_version(*s).expect("version"),
            events.len() as u64
        );
    }
    streams
}

/// The suite. `log` must be empty.
pub async fn run_suite(log: Arc<dyn EventLog>) {
    basics(&*log).await;
    refusals(&*log).await;
    subscribe_wakes(log.clone()).await;
    concurrent_appenders(log.clone()).await;
    versions_never_run_ahead(log.clone()).await;
    pipelined_appends(&*log).await;
    check_consistent(&*log);
}

async fn basics(log: &dyn EventLog) {
    let (a, b, c) = (stream(1), stream(2), stream(3));
    assert_eq!(log.head(), 0);
    assert!(all(log).is_empty());
    assert!(log.read_all(0, 10).expect("read_all").is_empty());
    assert!(log.read_stream(a, 1).expect("read_stream").is_empty());
    assert_eq!(log.stream_version(a).expect("version"), 0);
    assert_eq!(*log.subscribe().borrow(), 0);

    append_ok(log, vec![request(a, 0, 3)], &[3]).await;
    assert_eq!(log.head(), 3);
    assert_eq!(log.stream_version(a).expect("version"), 3);
    let a_events: Vec<Event> = (1..=3).map(|s| event(a, s)).collect();
    assert_eq!(log.read_stream(a, 1).expect("read_stream"), a_events);
    assert_eq!(
        log.read_stream(a, 0).expect("read_stream"),
        a_events,
        "from_seq 0 = 1"
    );
    assert_eq!(log.read_stream(a, 2).expect("read_stream"), a_events[1..]);
    assert!(log.read_stream(a, 4).expect("read_stream").is_empty());

    // Several streams in one call: positions follow request order.
    append_ok(log, vec![request(b, 0, 2), request(a, 3, 1)], &[5, 6]).await;
    // The same stream twice in one call: the second request sees the first.
    append_ok(log, vec![request(c, 0, 2), request(c, 2, 1)], &[8, 9]).await;
    assert_eq!(log.stream_version(c).expect("version"), 3);
    // An empty call writes nothing and succeeds.
    append_ok(log, vec![], &[]).await;
    assert_eq!(log.head(), 9);

    let records = all(log);
    let order = [
        (a, 1),
        (a, 2),
        (a, 3),
        (b, 1),
        (b, 2),
        (a, 4),
        (c, 1),
        (c, 2),
        (c, 3),
    ];
    assert_eq!(records.len(), order.len());
    for (i, (r, (s, seq))) in records.iter().zip(order).enumerate() {
        assert_eq!(r.position, i as u64 + 1);
        assert_eq!(r.event, event(s, seq), "position {}", r.position);
    }
    // Windows of read_all.
    assert_eq!(log.read_all(0, 2).expect("read_all"), records[..2]);
    assert_eq!(log.read_all(4, 3).expect("read_all"), records[3..6]);
    assert_eq!(log.read_all(8, 100).expect("read_all"), records[7..]);
    assert!(log.read_all(10, 100).expect("read_all").is_empty());
    assert!(log.read_all(1, 0).expect("read_all").is_empty());
    assert!(log.read_all(u64::MAX, 1).expect("read_all").is_empty());
    // read_stream across two appends, starting inside the first one.
    assert_eq!(
        log.read_stream(a, 3).expect("read_stream"),
        vec![event(a, 3), event(a, 4)]
    );
    check_consistent(log);
}

async fn refusals(log: &dyn EventLog) {
    let (a, b, d, e) = (stream(1), stream(2), stream(4), stream(5));
    // Stale and future expected versions.
    let err = append_refused(log, vec![request(a, 2, 1)]).await;
    assert_conflict(&err, a, 2, 4);
    assert!(err.is_conflict());
    let err = append_refused(log, vec![request(a, 5, 1)]).await;
    assert_conflict(&err, a, 5, 4);
    let err = append_refused(log, vec![request(d, 1, 1)]).await;
    assert_conflict(&err, d, 1, 0);

    // One conflicting request refuses the whole call, whichever its place.
    let err = append_refused(log, vec![request(d, 0, 2), request(a, 1, 1)]).await;
    assert_conflict(&err, a, 1, 4);
    let err = append_refused(log, vec![request(a, 1, 1), request(d, 0, 2)]).await;
    assert_conflict(&err, a, 1, 4);
    let err = append_refused(
        log,
        vec![
            request(d, 0, 1),
            request(b, 2, 1),
            request(e, 0, 1),
            request(b, 0, 1),
        ],
    )
    .await;
    assert_conflict(&err, b, 0, 3);
    // Two requests for one stream that both expect its current version.
    let err = append_refused(log, vec![request(d, 0, 1), request(d, 0, 1)]).await;
    assert_conflict(&err, d, 0, 1);

    // Malformed requests.
    let empty = AppendRequest {
        stream: d,
        expected_version: 0,
        events: vec![],
    };
    assert_invalid(&append_refused(log, vec![empty.clone()]).await, d);
    let mut wrong_seq = request(d, 0, 3);
    wrong_seq.events[1].seq = 7;
    assert_invalid(&append_refused(log, vec![wrong_seq]).await, d);
    let mut wrong_start = request(d, 0, 1);
    wrong_start.events[0].seq = 0;
    assert_invalid(&append_refused(log, vec![wrong_start]).await, d);
    let mut wrong_stream = request(d, 0, 2);
    wrong_stream.events[1].stream = e;
    assert_invalid(&append_refused(log, vec![wrong_stream]).await, d);
    // An invalid request anywhere refuses the valid ones with it.
    let err = append_refused(log, vec![request(d, 0, 1), empty.clone()]).await;
    assert_invalid(&err, d);
    let err = append_refused(log, vec![request(e, 0, 1), request(a, 4, 1), empty]).await;
    assert_invalid(&err, d);

    // After all of that, the streams still take appends at their real versions.
    append_ok(log, vec![request(d, 0, 1), request(a, 4, 1)], &[10, 11]).await;
    check_consistent(log);
}

async fn subscribe_wakes(log: Arc<dyn EventLog>) {
    let s = stream(6);
    let mut rx = log.subscribe();
    let start = *rx.borrow_and_update();
    assert_eq!(start, log.head());

    // A waiter parked before the append is woken by it, sees the new head, and catches up with
    // read_all from where it was.
    let waiter = {
        let log = log.clone();
        tokio::spawn(async move {
            let mut rx = log.subscribe();
            let mut seen = *rx.borrow_and_update();
            while seen < start + 3 {
                rx.changed().await.expect("log alive");
                seen = *rx.borrow_and_update();
            }
            (seen, log.read_all(start + 1, 100).expect("read_all"))
        })
    };
    tokio::task::yield_now().await;
    append_ok(&*log, vec![request(s, 0, 3)], &[start + 3]).await;
    let (seen, tail) = tokio::time::timeout(WAIT_MAX, waiter)
        .await
        .expect("subscriber was not woken by an append")
        .expect("waiter task");
    assert_eq!(seen, start + 3);
    assert_eq!(
        tail.iter().map(|r| r.event.clone()).collect::<Vec<_>>(),
        (1..=3).map(|q| event(s, q)).collect::<Vec<_>>()
    );

    // The receiver taken before the append also saw the change.
    tokio::time::timeout(WAIT_MAX, rx.changed())
        .await
        .expect("not woken")
        .expect("log alive");
    assert_eq!(*rx.borrow_and_update(), start + 3);
    // A refused append does not move the head; the next good one does.
    let _ = log
        .append(vec![request(s, 0, 1)])
        .await
        .expect_err("conflict");
    assert!(!rx.has_changed().expect("log alive"));
    append_ok(&*log, vec![request(s, 3, 1)], &[start + 4]).await;
    assert!(rx.has_changed().expect("log alive"));
    assert_eq!(*rx.borrow_and_update(), start + 4);
}

const OWN_WRITERS: u64 = 8;
const OWN_APPENDS: u64 = 40;
const SHARED_WRITERS: u64 = 6;
const SHARED_EVENTS: u64 = 25;

async fn concurrent_appenders(log: Arc<dyn EventLog>) {
    let head = log.head();
    let shared = stream(100);
    let mut tasks = Vec::new();
    // Writers with a stream each, appending batches of 1..=3 events.
    for w in 0..OWN_WRITERS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let s = stream(200 + u128::from(w));
            let mut version = 0;
            for n in 0..OWN_APPENDS {
                let count = 1 + (n + w) % 3;
                let events = (version + 1..=version + count)
                    .map(|seq| event_with(s, seq, &format!("own{w}"), 16))
                    .collect();
                let req = AppendRequest {
                    stream: s,
                    expected_version: version,
                    events,
                };
                log.append(vec![req])
                    .await
                    .expect("append to an own stream");
                version += count;
            }
            0u64
        }));
    }
    // Writers racing on one stream: read the version, append, retry on conflict. Each event is
    // tagged with its writer and number so every one can be found exactly once afterwards.
    for w in 0..SHARED_WRITERS {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut conflicts = 0;
            for n in 0..SHARED_EVENTS {
                loop {
                    let version = log.stream_version(shared).expect("version");
                    let req = AppendRequest {
                        stream: shared,
                        expected_version: version,
                        events: vec![event_with(shared, version + 1, &format!("w{w}n{n}"), 4)],
                    };
                    match log.append(vec![req]).await {
                        Ok(_) => break,
                        Err(e) if e.is_conflict() => {
                            conflicts += 1;
                            tokio::task::yield_now().await;
                        }
                        Err(e) => panic!("append to the shared stream: {e}"),
                    }
                }
            }
            conflicts
        }));
    }
    for t in tasks {
        t.await.expect("appender task");
    }

    let streams = check_consistent(&*log);
    let own_events: u64 = (0..OWN_WRITERS)
        .map(|w| (0..OWN_APPENDS).map(|n| 1 + (n + w) % 3).sum::<u64>())
        .sum();
    assert_eq!(
        log.head(),
        head + own_events + SHARED_WRITERS * SHARED_EVENTS
    );
    for w in 0..OWN_WRITERS {
        let s = stream(200 + u128::from(w));
        let events = &streams[&s];
        for e in events {
            assert_eq!(*e, event_with(s, e.seq, &format!("own{w}"), 16));
        }
    }
    let mut tags = BTreeSet::new();
    for e in &streams[&shared] {
        let Payload::KwargsUpdated { kwargs, .. } = &e.payload else {
            panic!("unexpected payload {e:?}");
        };
        let tag = kwargs["tag"].as_str().expect("tag").to_owned();
        assert_eq!(*e, event_with(shared, e.seq, &tag, 4));
        assert!(tags.insert(tag), "an event landed twice: {e:?}");
    }
    assert_eq!(tags.len() as u64, SHARED_WRITERS * SHARED_EVENTS);
}

/// Readers never see a version that is not readable (not yet durable): while a writer appends
/// calls that carry two requests for the same stream, `stream_version` read first never exceeds
/// the length of `read_stream` read after it, and `head` never exceeds what `read_all` returns.
async fn versions_never_run_ahead(log: Arc<dyn EventLog>) {
    const CALLS: u64 = 60;
    let s = stream(300);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (log, done) = (log.clone(), done.clone());
        tokio::task::spawn_blocking(move || {
            let mut checks = 0u64;
            loop {
                let finished = done.load(std::sync::atomic::Ordering::Acquire);
                let v = log.stream_version(s).expect("version");
                let events = log.read_stream(s, 1).expect("read_stream");
                assert!(
                    events.len() as u64 >= v,
                    "stream_version said {v}, then read_stream found {} events",
                    events.len()
                );
                let head = log.head();
                let tail = log.read_all(head, 1).expect("read_all");
                assert!(head == 0 || tail.len() == 1, "head {head} is not readable");
                checks += 1;
                if finished {
                    break checks;
                }
            }
        })
    };
    for n in 0..CALLS {
        let v = 3 * n;
        append_ok_any(&*log, vec![request(s, v, 1), request(s, v + 1, 2)]).await;
    }
    done.store(true, std::sync::atomic::Ordering::Release);
    let checks = reader.await.expect("reader");
    assert!(checks >= 1);
    assert_eq!(log.stream_version(s).expect("version"), 3 * CALLS);
}

/// An append is submitted when `append` is called, not when its future is polled, and appends
/// complete in call order: a caller may issue the next append of a stream, expecting the version
/// the previous one will leave, before awaiting the previous one.
async fn pipelined_appends(log: &dyn EventLog) {
    const CALLS: u64 = 40;
    let s = stream(400);
    let head = log.head();
    let futures: Vec<_> = (0..CALLS)
        .map(|n| log.append(vec![request(s, 2 * n, 2)]))
        .collect();
    let mut last = head;
    for (n, f) in futures.into_iter().enumerate() {
        let got = f
            .await
            .unwrap_or_else(|e| panic!("pipelined append {n}: {e}"));
        assert_eq!(got, vec![last + 2], "pipelined append {n}");
        last += 2;
    }
    // Dropping a future unpolled does not withdraw its append.
    drop(log.append(vec![request(s, 2 * CALLS, 1)]));
    let got = log
        .append(vec![request(s, 2 * CALLS + 1, 1)])
        .await
        .expect("append after an unpolled one");
    assert_eq!(got, vec![last + 2]);
    assert_eq!(
        log.read_stream(s, 1).expect("read_stream"),
        (1..=2 * CALLS + 2).map(|q| event(s, q)).collect::<Vec<_>>()
    );
}

async fn append_ok_any(log: &dyn EventLog, requests: Vec<AppendRequest>) {
    log.append(requests).await.expect("append");
}

/// One call of a deterministic script of appends, mostly good, some conflicting or invalid, as
/// (stream number, expected version, event count, corrupt the seq of the last event?). Versions
/// come from the reference log, so most calls are valid.
fn script_call(
    next: &mut impl FnMut() -> u64,
    reference: &MemoryLog,
) -> Vec<(u128, u64, u64, bool)> {
    let mut call = Vec::new();
    let mut staged = BTreeMap::new();
    for _ in 0..1 + next() % 3 {
        let s = u128::from(next() % 7);
        let version = match staged.get(&s) {
            Some(v) => *v,
            None => reference.stream_version(stream(s)).expect("version"),
        };
        let count = 1 + next() % 4;
        let (expected, bad_seq) = match next() % 30 {
            0 => (version + 1, false),
            1 => (version.saturating_sub(1), false),
            2 => (version, true),
            _ => (version, false),
        };
        call.push((s, expected, count, bad_seq));
        staged.insert(s, expected + count);
    }
    call
}

fn build(call: &[(u128, u64, u64, bool)]) -> Vec<AppendRequest> {
    call.iter()
        .map(|&(s, expected, count, bad_seq)| {
            let mut req = request(stream(s), expected, count);
            if bad_seq {
                let last = req.events.last_mut().expect("count >= 1");
                last.seq += 1;
            }
            req
        })
        .collect()
}

/// Outcome of one call, comparable across backends.
fn outcome(r: Result<Vec<u64>, Error>) -> String {
    match r {
        Ok(positions) => format!("ok {positions:?}"),
        Err(Error::Conflict {
            stream,
            expected,
            actual,
        }) => format!("conflict {stream} {expected} {actual}"),
        Err(Error::InvalidAppend { stream, .. }) => format!("invalid {stream}"),
        Err(e) => panic!("unexpected error {e}"),
    }
}

/// Play a deterministic script of 300 append calls (mostly good, some stale, some from the
/// future, some malformed) against `log` and a fresh [`MemoryLog`], requiring the same outcome
/// for every call and, at the end, the same log read every way. `log` must be empty.
pub async fn agrees_with_memory(log: &dyn EventLog) {
    let memory = MemoryLog::new();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let (mut oks, mut refusals) = (0, 0);
    for i in 0..300 {
        let call = script_call(&mut next, &memory);
        let m = outcome(memory.append(build(&call)).await);
        let s = outcome(log.append(build(&call)).await);
        assert_eq!(m, s, "call {i}: {call:?}");
        if m.starts_with("ok") {
            oks += 1;
        } else {
            refusals += 1;
        }
    }
    assert!(
        oks > 150 && refusals > 10,
        "{oks} calls succeeded, {refusals} were refused"
    );
    assert_eq!(memory.head(), log.head());
    assert_eq!(all(&memory), all(log));
    for n in 0..7 {
        let s = stream(n);
        assert_eq!(
            memory.stream_version(s).expect("v"),
            log.stream_version(s).expect("v")
        );
        for from in [0, 1, 2, 5, 40] {
            assert_eq!(
                memory.read_stream(s, from).expect("read"),
                log.read_stream(s, from).expect("read")
            );
        }
    }
    for (from, limit) in [(1, 7), (13, 50), (100, 1), (200, 1000)] {
        assert_eq!(
            memory.read_all(from, limit).expect("read_all"),
            log.read_all(from, limit).expect("read_all")
        );
    }
    check_consistent(log);
}

/// Every event of `log` minus the archived ones: what `read_all` serves after compactions
/// (`archived` = per stream, how many of its first events were compacted).
fn live_of(all: &[Recorded], archived: &BTreeMap<WorkflowId, u64>) -> Vec<Recorded> {
    all.iter()
        .filter(|r| r.event.seq > archived.get(&r.event.stream).copied().unwrap_or(0))
        .cloned()
        .collect()
}

/// `read_stream` from every seq (and past the end) equals the suffix of `events`, and the
/// version is their count.
fn assert_reads(log: &dyn EventLog, s: WorkflowId, events: &[Event]) {
    for from in 0..=events.len() as u64 + 2 {
        let skip = from.saturating_sub(1).min(events.len() as u64) as usize;
        assert_eq!(
            log.read_stream(s, from).expect("read_stream"),
            events[skip..],
            "{s} from seq {from}"
        );
    }
    assert_eq!(log.stream_version(s).expect("version"), events.len() as u64);
}

/// Compaction, for a backend that has it (`EventLog::compact` returns `Some`; a log that
/// cannot compact must say `None` and is left alone). `log` must be empty. Partial and whole
/// compactions of interleaved streams spanning many blocks: `read_stream` from every seq,
/// versions and appends' version checks are unchanged; `read_all` serves exactly the live
/// events; a second compaction moves nothing; events appended after a compaction are
/// compacted into the same archive later; redaction reaches archived events; compacting an
/// unknown stream does nothing. Returns whether the backend compacts.
pub async fn compaction_suite(log: &dyn EventLog) -> bool {
    let ids: Vec<WorkflowId> = (1..=4).map(|n| stream(100 + n)).collect();
    let mut versions = vec![0u64; ids.len()];
    for round in 0..12u64 {
        let mut requests = Vec::new();
        for (i, &s) in ids.iter().enumerate() {
            let n = 1 + (round + i as u64) % 4;
            requests.push(AppendRequest {
                stream: s,
                expected_version: versions[i],
                events: (versions[i] + 1..=versions[i] + n)
                    // Some large events, so the streams span many storage blocks.
                    .map(|seq| event_with(s, seq, "k", (seq as usize * 611) % 3000))
                    .collect(),
            });
            versions[i] += n;
        }
        log.append(requests).await.expect("append");
    }
    let mut before: BTreeMap<WorkflowId, Vec<Event>> = ids
        .iter()
        .map(|&s| (s, log.read_stream(s, 1).expect("read_stream")))
        .collect();
    let everything = all(log);
    let (a, b, c) = (ids[0], ids[1], ids[2]);

    let Some(first) = log
        .compact(a, Some(5), Some(b"state-a".to_vec()))
        .expect("compact")
    else {
        return false;
    };
    assert_eq!(first.events, 5);
    assert_eq!(first.segments, 1);
    assert!(
        first.raw_bytes > 0 && first.compressed_bytes > 0,
        "{first:?}"
    );
    let mut archived = BTreeMap::from([(a, 5u64)]);
    for s in &ids {
        assert_reads(log, *s, &before[s]);
    }
    assert_eq!(all(log), live_of(&everything, &archived));

    // The rest of `a`, then again: nothing left to move.
    let rest = log.compact(a, None, None).expect("compact").expect("some");
    assert_eq!(rest.events, versions[0] - 5);
    assert_eq!(rest.segments, 1, "a new segment after the first");
    let again = log.compact(a, None, None).expect("compact").expect("some");
    assert_eq!(again, crate::CompactStats::default());
    archived.insert(a, versions[0]);
    // `b` whole, `c` up to past its end (clamped), the fourth stream not at all.
    log.compact(b, None, None).expect("compact");
    let past = log
        .compact(c, Some(10_000), None)
        .expect("compact")
        .expect("some");
    assert_eq!(past.events, versions[2]);
    archived.insert(b, versions[1]);
    archived.insert(c, versions[2]);
    for s in &ids {
        assert_reads(log, *s, &before[s]);
    }
    assert_eq!(all(log), live_of(&everything, &archived));
    for (from, limit) in [(1, 3), (7, 11), (40, 1000)] {
        let want: Vec<Recorded> = live_of(&everything, &archived)
            .into_iter()
            .filter(|r| r.position >= from)
            .take(limit)
            .collect();
        assert_eq!(log.read_all(from, limit).expect("read_all"), want);
    }

    // Appends after a compaction: same version checks, then compacted into the same archive.
    let err = log
        .append(vec![request(a, versions[0] - 1, 1)])
        .await
        .expect_err("stale");
    assert_conflict(&err, a, versions[0] - 1, versions[0]);
    let more = request(a, versions[0], 3);
    before.entry(a).or_default().extend(more.events.clone());
    log.append(vec![more]).await.expect("append");
    assert_reads(log, a, &before[&a]);
    let merged = log.compact(a, None, None).expect("compact").expect("some");
    assert_eq!(merged.events, 3);
    assert_reads(log, a, &before[&a]);

    // Redaction reaches archived events (b is fully archived, c's kwargs are its data).
    let redacted = log.redact(b, Vec::new()).expect("redact");
    if let Some(n) = redacted {
        assert_eq!(n, versions[1], "every event of b carries kwargs");
        let mut want = before[&b].clone();
        mageflow_core::redact_stream(&mut want, &|_| true);
        assert_reads(log, b, &want);
        assert_eq!(log.redact(b, Vec::new()).expect("redact"), Some(0));
    }

    // A stream larger than a segment's target size is cut into several segments.
    let big = stream(200);
    let (mut version, mut big_events) = (0u64, Vec::new());
    while (big_events.len() as u64) < 3_200 {
        let events: Vec<Event> = (version + 1..=version + 400)
            .map(|seq| event_with(big, seq, "big", 2_900))
            .collect();
        big_events.extend(events.clone());
        log.append(vec![AppendRequest {
            stream: big,
            expected_version: version,
            events,
        }])
        .await
        .expect("append");
        version += 400;
    }
    let split = log
        .compact(big, None, None)
        .expect("compact")
        .expect("some");
    assert_eq!(split.events, big_events.len() as u64);
    assert!(
        split.segments >= 2 && split.raw_bytes > crate::segment::SEGMENT_TARGET_BYTES,
        "{split:?}"
    );
    assert_eq!(log.read_stream(big, 1).expect("read"), big_events);
    assert_eq!(
        log.read_stream(big, 2_500).expect("read"),
        big_events[2_499..],
        "a read from the middle of a later segment"
    );
    if log.redact(big, Vec::new()).expect("redact").is_some() {
        let mut want = big_events.clone();
        mageflow_core::redact_stream(&mut want, &|_| true);
        assert_eq!(log.read_stream(big, 1).expect("read"), want);
    }

    // Unknown streams: nothing happens.
    let none = log
        .compact(stream(999), None, Some(b"x".to_vec()))
        .expect("compact")
        .expect("some");
    assert_eq!(none, crate::CompactStats::default());
    assert!(log.read_stream(stream(999), 1).expect("read").is_empty());
    true
}
