//! Redaction of a workflow's stream in the sled log (`SledLog::redact`): the task data of the
//! selected signatures leaves the log, the audit trail stays, every other stream's bytes stay,
//! and the log still verifies, reopens, replays and takes appends at the same versions.

use crate::{event_with, open_sled, runtime, stream};
use mageflow_core::{codec, Event, NodeIndex, Payload, Workflow, WorkflowId, REDACTED_ERROR};
use mageflow_store::{
    block_entries, decode_block, encode_block, AppendRequest, Error, EventLog, Recorded,
    RedactStats, SledLog, SledOptions,
};
use serde_json::{json, Value};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The string every piece of task data of the workflow carries.
const MARKER: &str = "ZQX-MARKER-7731";
const WF: u128 = 0x77;
const OTHER: u128 = 0x78;

/// The core fixture: every kind of event with task data, ending in a confirmed cancel of its
/// swarm (nodes: 0 chain [1 a, 2 swarm], 3 error callback of 0, 4 cleanup of 2, items 5 x and
/// 6 y of 2).
fn scenario(id: WorkflowId) -> (Workflow, Vec<Event>) {
    let (wf, events) = mageflow_core::fixtures::data_rich_workflow(id, MARKER)
        .unwrap_or_else(|r| panic!("the fixture runs: {r:?}"));
    assert!(wf.is_finished());
    (wf, events)
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

fn encoded(events: &[Event]) -> Vec<u8> {
    events
        .iter()
        .flat_map(|e| codec::encode(e).expect("encode"))
        .collect()
}

/// Occurrences of `needle` in every file under `dir`.
fn on_disk(dir: &Path, needle: &str) -> usize {
    let mut n = 0;
    for entry in std::fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            n += on_disk(&path, needle);
        } else {
            let bytes = std::fs::read(&path).expect("read file");
            n += bytes
                .windows(needle.len())
                .filter(|w| *w == needle.as_bytes())
                .count();
        }
    }
    n
}

/// The workflow's events interleaved with a second stream's: each append carries one event of
/// the workflow and two of `other`, so every block holds both streams.
fn write_interleaved(log: &SledLog, events: &[Event], other: WorkflowId) {
    let rt = runtime();
    for (i, e) in events.iter().enumerate() {
        let i = i as u64;
        let requests = vec![
            AppendRequest {
                stream: other,
                expected_version: 2 * i,
                events: vec![other_event(other, 2 * i + 1)],
            },
            AppendRequest {
                stream: e.stream,
                expected_version: i,
                events: vec![e.clone()],
            },
            AppendRequest {
                stream: other,
                expected_version: 2 * i + 1,
                events: vec![other_event(other, 2 * i + 2)],
            },
        ];
        rt.block_on(log.append(requests)).expect("append");
    }
}

fn other_event(other: WorkflowId, seq: u64) -> Event {
    event_with(other, seq, "other-KEEP-ME", 64)
}

/// Run `open` until sled's directory lock is free: a sled handle just dropped (the log's, or a
/// raw one) can hold it for a moment from sled's background threads.
fn when_unlocked<T, E: std::fmt::Display>(mut open: impl FnMut() -> Result<T, E>) -> Result<T, E> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        match open() {
            Err(e)
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Open the log in `dir` again, once the previous handle let go of sled's lock.
fn reopen(dir: &Path) -> SledLog {
    when_unlocked(|| SledLog::open(dir, SledOptions::default())).expect("reopen")
}

/// Every stored block of the closed log in `dir` (first position, bytes), through raw sled.
fn raw_blocks(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    let db = when_unlocked(|| sled::open(dir)).expect("raw open");
    let tree = db.open_tree("log").expect("tree");
    tree.scan_prefix(b"b")
        .map(|kv| {
            let (k, v) = kv.expect("scan");
            let first = u64::from_be_bytes(k[1..].try_into().expect("9-byte key"));
            (first, v.to_vec())
        })
        .collect()
}

/// The stored bytes (position, encoded event) of `s`'s events in the closed log in `dir`.
fn stored_entries(dir: &Path, s: WorkflowId) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for (first, bytes) in raw_blocks(dir) {
        for e in block_entries(first, &bytes).expect("entries") {
            if e.stream == s {
                out.push((e.position, bytes[e.start..e.end].to_vec()));
            }
        }
    }
    out
}

/// Every stored block of the closed log in `dir`, decoded.
fn blocks(dir: &Path) -> Vec<(u64, Vec<Recorded>)> {
    raw_blocks(dir)
        .into_iter()
        .map(|(first, bytes)| (first, decode_block(first, &bytes).expect("decode")))
        .collect()
}

fn positions(log: &SledLog) -> Vec<(u64, WorkflowId, u64)> {
    log.read_all(1, usize::MAX)
        .expect("read_all")
        .iter()
        .map(|r| (r.position, r.event.stream, r.event.seq))
        .collect()
}

/// Same envelope, kinds and nodes; no marker in any event; replays to the same statuses.
fn check_redacted(before: &[Event], after: &[Event], wf: &Workflow) {
    assert_eq!(after.len(), before.len());
    for (r, e) in after.iter().zip(before) {
        assert_eq!(
            (r.stream, r.seq, r.at, &r.actor, r.schema),
            (e.stream, e.seq, e.at, &e.actor, e.schema)
        );
        assert_eq!(r.payload.kind(), e.payload.kind());
        assert_eq!(r.payload.node(), e.payload.node());
        let bytes = codec::encode(r).expect("encode");
        assert!(!contains(&bytes, MARKER), "{:?}", r.payload);
        assert_eq!(&codec::decode(&bytes).expect("decode"), r);
    }
    let all = encoded(after);
    for name in ["root", "fan", "task_a", "task_x", "task_y", "task_cleanup"] {
        assert!(contains(&all, name), "{name} was dropped");
    }
    assert!(after.iter().any(|e| matches!(
        &e.payload,
        Payload::Failed { error, .. } if error.message == REDACTED_ERROR
    )));
    let replayed = Workflow::replay(wf.id, after).expect("replay");
    assert_eq!(replayed.version, wf.version);
    assert_eq!(replayed.nodes.len(), wf.nodes.len());
    for (r, n) in replayed.nodes.iter().zip(&wf.nodes) {
        assert_eq!(r.status, n.status, "{}", n.spec.name);
        assert_eq!(
            (r.attempt, r.failures, r.in_flight, &r.swarm),
            (n.attempt, n.failures, n.in_flight, &n.swarm)
        );
        assert_eq!(r.spec.kwargs, json!({}));
    }
}

#[test]
fn redacting_a_whole_workflow_keeps_the_audit_trail_and_every_other_byte() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wf_id, other) = (stream(WF), stream(OTHER));
    let (wf, events) = scenario(wf_id);
    assert!(contains(&encoded(&events), MARKER));

    let log = open_sled(dir.path());
    write_interleaved(&log, &events, other);
    drop(log);
    let other_before = stored_entries(dir.path(), other);
    let log = reopen(dir.path());
    let before_positions = positions(&log);
    let other_events = log.read_stream(other, 1).expect("read other");
    let head = log.head();
    assert!(
        on_disk(dir.path(), MARKER) > 0,
        "the scan must see the data before redaction"
    );

    let stats = log.redact(wf_id, Vec::new()).expect("redact");
    let changed = mageflow_core::redact_stream(&mut events.clone(), &|_| true) as u64;
    assert!(changed > 0);
    assert_eq!(stats.events_rewritten, changed);
    assert!(stats.blocks_rewritten >= 1);

    let check = |log: &SledLog| {
        let after = log.read_stream(wf_id, 1).expect("read");
        check_redacted(&events, &after, &wf);
        assert_eq!(log.read_stream(other, 1).expect("read other"), other_events);
        assert_eq!(positions(log), before_positions);
        assert_eq!(log.head(), head);
        assert_eq!(
            log.stream_version(wf_id).expect("version"),
            events.len() as u64
        );
        assert_eq!(log.verify().expect("verify"), head);
        for r in log.read_all(1, usize::MAX).expect("read_all") {
            if r.event.stream == wf_id {
                assert!(!contains(&codec::encode(&r.event).expect("encode"), MARKER));
            }
        }
    };
    check(&log);

    // Idempotent.
    assert_eq!(
        log.redact(wf_id, Vec::new()).expect("again"),
        RedactStats::default()
    );
    check(&log);
    let redacted = log.read_stream(wf_id, 1).expect("read");

    // What the files on disk still hold. Sled is log-structured: the old versions of the
    // rewritten blocks may stay in its segments until it reuses them.
    let live = on_disk(dir.path(), MARKER);
    drop(log);
    let closed = on_disk(dir.path(), MARKER);
    eprintln!("marker occurrences on disk after redaction: open {live}, closed {closed}");
    // The other stream's stored bytes are untouched; the workflow's hold no marker.
    assert_eq!(
        stored_entries(dir.path(), other),
        other_before,
        "the other stream changed"
    );
    for (position, bytes) in stored_entries(dir.path(), wf_id) {
        assert!(!contains(&bytes, MARKER), "position {position}");
    }
    let written = blocks(dir.path());
    assert!(
        written
            .iter()
            .all(|(_, recs)| recs.iter().any(|r| r.event.stream == other)
                && recs.iter().any(|r| r.event.stream == wf_id)),
        "every block holds both streams"
    );

    // Reopening reads the same.
    let log = reopen(dir.path());
    check(&log);
    assert_eq!(log.read_stream(wf_id, 1).expect("read"), redacted);
    assert_eq!(
        log.redact(wf_id, Vec::new()).expect("after reopen"),
        RedactStats::default()
    );

    // Appends go on at the same versions.
    let rt = runtime();
    let next = Event {
        seq: events.len() as u64 + 1,
        ..other_event(wf_id, 0)
    };
    let last = rt
        .block_on(log.append(vec![AppendRequest {
            stream: wf_id,
            expected_version: events.len() as u64,
            events: vec![next.clone()],
        }]))
        .expect("append after redaction");
    assert_eq!(last, vec![head + 1]);
    assert_eq!(
        log.read_stream(wf_id, events.len() as u64 + 1)
            .expect("read"),
        vec![next]
    );
    let stale = rt.block_on(log.append(vec![AppendRequest {
        stream: wf_id,
        expected_version: events.len() as u64 - 1,
        events: vec![Event {
            seq: events.len() as u64,
            ..other_event(wf_id, 0)
        }],
    }]));
    assert!(matches!(stale, Err(Error::Conflict { .. })), "{stale:?}");
    assert_eq!(log.verify().expect("verify"), head + 1);
}

#[test]
fn redacting_selected_nodes_leaves_the_others_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wf_id, other) = (stream(WF), stream(OTHER));
    let (wf, events) = scenario(wf_id);
    let log = open_sled(dir.path());
    write_interleaved(&log, &events, other);
    let other_before = log.read_stream(other, 1).expect("read other");

    // The canceled swarm and its items: 2, and 5 and 6 (items of a later batch).
    let picked = [2, 5, 6];
    let selected = |n: NodeIndex| picked.contains(&n);
    let mut expected = events.clone();
    let changed = mageflow_core::redact_stream(&mut expected, &selected) as u64;
    let stats = log.redact(wf_id, picked.to_vec()).expect("redact");
    assert_eq!(stats.events_rewritten, changed);
    let after = log.read_stream(wf_id, 1).expect("read");
    assert_eq!(after, expected);
    let replayed = Workflow::replay(wf_id, &after).expect("replay");
    for (index, n) in replayed.nodes.iter().enumerate() {
        if selected(index as NodeIndex) {
            assert_eq!(n.spec.kwargs, json!({}), "{}", n.spec.name);
        } else {
            assert_eq!(
                n.spec.kwargs["secret"],
                Value::String(format!("{MARKER}-kwargs-{}", n.spec.name)),
                "{}",
                n.spec.name
            );
        }
        assert_eq!(n.status, wf.nodes[index].status);
    }
    let bytes = encoded(&after);
    assert!(contains(&bytes, &format!("{MARKER}-result-a")));
    assert!(contains(&bytes, &format!("{MARKER}-kwargs-cleanup")));
    assert!(!contains(&bytes, &format!("{MARKER}-kwargs-x")));
    assert!(!contains(&bytes, &format!("{MARKER}-result-x")));
    assert_eq!(log.read_stream(other, 1).expect("read other"), other_before);
    log.verify().expect("verify");
    assert_eq!(
        log.redact(wf_id, picked.to_vec()).expect("again"),
        RedactStats::default()
    );

    // Then the whole workflow: the rest goes.
    let stats = log.redact(wf_id, Vec::new()).expect("redact all");
    assert!(stats.events_rewritten > 0);
    check_redacted(&events, &log.read_stream(wf_id, 1).expect("read"), &wf);
    assert_eq!(log.read_stream(other, 1).expect("read other"), other_before);
    log.verify().expect("verify");
}

#[test]
fn the_system_stream_and_unknown_streams_are_left_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_sled(dir.path());
    let rt = runtime();
    rt.block_on(log.append(vec![AppendRequest {
        stream: WorkflowId::SYSTEM,
        expected_version: 0,
        events: vec![event_with(WorkflowId::SYSTEM, 1, "sys", 16)],
    }]))
    .expect("append");
    let before = log.read_all(1, usize::MAX).expect("read_all");
    assert_eq!(
        log.redact(WorkflowId::SYSTEM, Vec::new()).expect("system"),
        RedactStats::default()
    );
    assert_eq!(
        log.redact(stream(12345), vec![0]).expect("unknown"),
        RedactStats::default()
    );
    assert_eq!(log.read_all(1, usize::MAX).expect("read_all"), before);
    log.close();
    assert!(matches!(
        log.redact(stream(WF), Vec::new()),
        Err(Error::Closed)
    ));
}

#[test]
fn redaction_runs_safely_beside_concurrent_appends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wf_id, other) = (stream(WF), stream(OTHER));
    let (wf, events) = scenario(wf_id);
    let log = Arc::new(open_sled(dir.path()));
    write_interleaved(&log, &events, other);
    let stop = Arc::new(AtomicBool::new(false));
    let appenders: Vec<_> = (0..3u128)
        .map(|a| {
            let (log, stop) = (log.clone(), stop.clone());
            std::thread::spawn(move || {
                let rt = runtime();
                let s = stream(0x1000 + a);
                let mut version = 0;
                while !stop.load(Ordering::Relaxed) || version < 50 {
                    let batch: Vec<Event> = (version + 1..=version + 3)
                        .map(|seq| event_with(s, seq, "busy", 200))
                        .collect();
                    rt.block_on(log.append(vec![AppendRequest {
                        stream: s,
                        expected_version: version,
                        events: batch,
                    }]))
                    .expect("concurrent append");
                    version += 3;
                }
                (s, version)
            })
        })
        .collect();
    // Readers see every block either old or new: each read of the stream decodes.
    let reader = {
        let (log, stop) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0;
            while !stop.load(Ordering::Relaxed) || reads < 10 {
                let got = log.read_stream(wf_id, 1).expect("concurrent read");
                assert_eq!(got.len(), events_len(&log, wf_id));
                reads += 1;
            }
        })
    };
    for _ in 0..5 {
        log.redact(wf_id, vec![1]).expect("redact");
        log.redact(wf_id, Vec::new()).expect("redact");
    }
    stop.store(true, Ordering::Relaxed);
    reader.join().expect("reader");
    for h in appenders {
        let (s, version) = h.join().expect("appender");
        let got = log.read_stream(s, 1).expect("read");
        assert_eq!(got.len() as u64, version);
        for (i, e) in got.iter().enumerate() {
            assert_eq!(e, &event_with(s, i as u64 + 1, "busy", 200));
        }
    }
    check_redacted(&events, &log.read_stream(wf_id, 1).expect("read"), &wf);
    log.verify().expect("verify");
}

fn events_len(log: &SledLog, s: WorkflowId) -> usize {
    log.stream_version(s).expect("version") as usize
}

/// Replace the stored block at `first` of the closed log in `dir` through raw sled.
fn put_block(dir: &Path, first: u64, bytes: Vec<u8>) {
    let db = when_unlocked(|| sled::open(dir)).expect("raw open");
    let tree = db.open_tree("log").expect("tree");
    let mut key = vec![b'b'];
    key.extend_from_slice(&first.to_be_bytes());
    tree.insert(key, bytes).expect("insert");
    db.flush().expect("flush");
}

#[test]
fn a_redaction_interrupted_between_blocks_is_finished_by_the_next_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wf_id, other) = (stream(WF), stream(OTHER));
    let (wf, events) = scenario(wf_id);
    // Every append of write_interleaved is one group and one block of 3 events.
    let log = open_sled(dir.path());
    write_interleaved(&log, &events, other);
    drop(log);
    let all_blocks = blocks(dir.path());
    assert_eq!(all_blocks.len(), events.len());
    let other_before = stored_entries(dir.path(), other);

    // A crash after some blocks were rewritten: the first half new, the rest old.
    let mut expected = events.clone();
    mageflow_core::redact_stream(&mut expected, &|_| true);
    let half = all_blocks.len() / 2;
    let mut done = 0;
    for (first, recs) in &all_blocks[..half] {
        let evs: Vec<Event> = recs
            .iter()
            .map(|r| {
                if r.event.stream == wf_id {
                    expected[r.event.seq as usize - 1].clone()
                } else {
                    r.event.clone()
                }
            })
            .collect();
        done += recs
            .iter()
            .filter(|r| r.event.stream == wf_id && expected[r.event.seq as usize - 1] != r.event)
            .count() as u64;
        let refs: Vec<&Event> = evs.iter().collect();
        let bytes = encode_block(&refs).expect("encode");
        assert_eq!(block_entries(*first, &bytes).expect("entries").len(), 3);
        put_block(dir.path(), *first, bytes);
    }
    assert!(done > 0);

    let log = reopen(dir.path());
    log.verify().expect("a half-redacted log is valid");
    let total = mageflow_core::redact_stream(&mut events.clone(), &|_| true) as u64;
    let stats = log.redact(wf_id, Vec::new()).expect("finish");
    assert_eq!(stats.events_rewritten, total - done);
    assert_eq!(log.read_stream(wf_id, 1).expect("read"), expected);
    check_redacted(&events, &expected, &wf);
    log.verify().expect("verify");
    drop(log);
    assert_eq!(stored_entries(dir.path(), other), other_before);
}

#[test]
fn damage_found_while_redacting_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (wf_id, other) = (stream(WF), stream(OTHER));
    let (_, events) = scenario(wf_id);
    let log = open_sled(dir.path());
    write_interleaved(&log, &events, other);
    drop(log);
    let (first, recs) = blocks(dir.path()).swap_remove(2);

    // A block whose checksum and headers are right but whose workflow event does not decode.
    let refs: Vec<&Event> = recs.iter().map(|r| &r.event).collect();
    let mut bytes = encode_block(&refs).expect("encode");
    let entries = block_entries(first, &bytes).expect("entries");
    let e = entries
        .iter()
        .find(|e| e.stream == wf_id)
        .expect("a workflow event");
    for b in &mut bytes[e.start..e.end] {
        *b = 0xc1; // never valid MessagePack
    }
    let crc = crc32fast_hash(&bytes[4..]);
    bytes[..4].copy_from_slice(&crc.to_le_bytes());
    put_block(dir.path(), first, bytes);

    let log = reopen(dir.path());
    let got = log.redact(wf_id, Vec::new());
    assert!(matches!(got, Err(Error::Corrupt(_))), "{got:?}");
    // The committer is still serving.
    runtime()
        .block_on(log.append(vec![AppendRequest {
            stream: other,
            expected_version: 2 * events.len() as u64,
            events: vec![other_event(other, 2 * events.len() as u64 + 1)],
        }]))
        .expect("append after a refused redaction");
}

/// CRC-32 (IEEE), as the blocks use: computed here so the test needs no extra dependency.
fn crc32fast_hash(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
