//! Redaction: `PgLog::redact` drops the task data of a workflow's signatures from its stream,
//! live rows and archive segment alike, and drops its snapshot, leaving the audit trail: the
//! same events at the same positions and seqs, which still replay to the same statuses.

use crate::TestSchema;
use mageflow_core::fixtures::{data_rich_ops, fixture_command};
use mageflow_core::{
    codec, execute, redact_stream, Event, NodeIndex, Op, Payload, Timestamp, Workflow, WorkflowId,
};
use mageflow_store::conformance::{request, stream};
use mageflow_store::{AppendRequest, Error, EventLog, Recorded};
use mageflow_store_pg::{decode_archive_segment, PgLog, RedactStats};
use sqlx::PgConnection;

/// Every piece of task data of the scenario contains this.
/// What every piece of task data of the fixture starts with.
const MARK: &str = "SECRET";

/// Run the scenario on stream `s` of `log`, one append per command, interleaved with
/// appends to `other` (so the stream's positions have gaps). Returns the final state and the
/// stream's events.
async fn write_scenario(log: &PgLog, s: WorkflowId, other: WorkflowId) -> (Workflow, Vec<Event>) {
    let mut wf = Workflow::empty(s);
    let mut events = Vec::new();
    for (i, op) in data_rich_ops(MARK).into_iter().enumerate() {
        let version = wf.version;
        let out =
            execute(&mut wf, &fixture_command(i, op)).unwrap_or_else(|r| panic!("step {i}: {r:?}"));
        assert!(!out.is_empty(), "step {i} emitted nothing");
        let other_version = log.stream_version(other).expect("version");
        log.append(vec![
            AppendRequest {
                stream: s,
                expected_version: version,
                events: out.clone(),
            },
            request(other, other_version, 1),
        ])
        .await
        .expect("append");
        events.extend(out);
    }
    (wf, events)
}

/// `events` redacted locally, as the log must store them.
fn redacted(events: &[Event], nodes: &[NodeIndex]) -> Vec<Event> {
    let mut out = events.to_vec();
    redact_stream(&mut out, &|n| nodes.is_empty() || nodes.contains(&n));
    out
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

/// Live rows of `s` whose stored payload bytes contain `needle` (searched by the server).
async fn live_rows_containing(admin: &mut PgConnection, s: WorkflowId, needle: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM mageflow_events \
         WHERE stream = $1 AND position(convert_to($2, 'UTF8') IN payload) > 0",
    )
    .bind(s.0)
    .bind(needle)
    .fetch_one(admin)
    .await
    .expect("search payloads")
}

/// The archived events of `s`, decoded from the stored row (not through `read_stream`).
async fn archived_events(admin: &mut PgConnection, s: WorkflowId) -> Vec<Event> {
    let row: Option<(i64, i64, Vec<u8>, i32)> = sqlx::query_as(
        "SELECT events, raw_bytes, segment, crc32 FROM mageflow_archive WHERE stream = $1",
    )
    .bind(s.0)
    .fetch_optional(admin)
    .await
    .expect("archive row");
    match row {
        Some((events, raw, segment, crc)) => {
            decode_archive_segment(s, events as u64, raw as u64, crc as u32, &segment)
                .expect("decode the stored segment")
        }
        None => Vec::new(),
    }
}

/// Nothing stored for `s` (live payloads, archived events, snapshot) holds `needle`.
async fn assert_stored_without(admin: &mut PgConnection, log: &PgLog, s: WorkflowId, needle: &str) {
    assert_eq!(live_rows_containing(admin, s, needle).await, 0, "live rows");
    let archived = archived_events(admin, s).await;
    assert!(!contains(&encoded(&archived), needle), "archived events");
    if let Some(snapshot) = log.snapshot(s).expect("snapshot") {
        assert!(!contains(&snapshot, needle), "snapshot");
    }
}

/// (position, stream, seq) of every live event.
fn layout(log: &PgLog) -> Vec<(u64, WorkflowId, u64)> {
    log.read_all(1, usize::MAX)
        .expect("read_all")
        .into_iter()
        .map(|r: Recorded| (r.position, r.event.stream, r.event.seq))
        .collect()
}

/// The redacted stream replays to the statuses, attempts and shape of the original.
fn assert_same_statuses(wf: &Workflow, events: Vec<Event>) {
    let replayed = Workflow::replay(wf.id, events).expect("the redacted stream replays");
    assert_eq!(replayed.version, wf.version);
    assert_eq!(replayed.nodes.len(), wf.nodes.len());
    for (r, n) in replayed.nodes.iter().zip(&wf.nodes) {
        assert_eq!(
            (r.status, r.attempt, r.failures, &r.swarm),
            (n.status, n.attempt, n.failures, &n.swarm),
            "{}",
            n.spec.name
        );
        assert_eq!((&r.spec.name, &r.spec.kind), (&n.spec.name, &n.spec.kind));
    }
    assert_eq!(replayed.is_finished(), wf.is_finished());
}

/// The workflow goes on after a redaction: the next command's events append at the next seq.
async fn assert_appends_continue(log: &PgLog, s: WorkflowId, version: u64) {
    assert_eq!(log.stream_version(s).expect("version"), version);
    let mut wf = Workflow::replay(s, log.read_stream(s, 1).expect("read")).expect("replay");
    let expires_at = Timestamp::from_micros(1_800_000_000_000_000);
    let more = execute(&mut wf, &fixture_command(99, Op::Delete { expires_at })).expect("delete");
    assert_eq!(more.first().map(|e| e.seq), Some(version + 1));
    log.append(vec![AppendRequest {
        stream: s,
        expected_version: version,
        events: more.clone(),
    }])
    .await
    .expect("append after the redaction");
    let tail = log.read_stream(s, version + 1).expect("read");
    assert_eq!(tail, more);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacting_a_workflow_keeps_the_audit_trail_only() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let mut admin = schema.admin().await;
    let (s, other) = (stream(1), stream(2));
    let (wf, events) = write_scenario(&log, s, other).await;
    assert!(live_rows_containing(&mut admin, s, MARK).await > 0);
    let layout_before = layout(&log);
    let other_before = log.read_stream(other, 1).expect("read");
    let head = log.head();

    let want = redacted(&events, &[]);
    let changed = events.iter().zip(&want).filter(|(a, b)| a != b).count() as u64;
    let stats = log.redact(s, Vec::new()).expect("redact");
    assert_eq!(
        stats,
        RedactStats {
            events_rewritten: changed,
            archived_rewritten: 0,
            snapshot_dropped: false,
        }
    );
    assert!(changed >= 10, "{changed}");

    // Same events, same kinds, seqs, times and actors, no task data; names are kept.
    let read = log.read_stream(s, 1).expect("read");
    assert_eq!(read, want);
    for (r, e) in read.iter().zip(&events) {
        assert_eq!(
            (r.seq, r.at, &r.actor, r.payload.kind(), r.payload.node()),
            (e.seq, e.at, &e.actor, e.payload.kind(), e.payload.node())
        );
    }
    assert_stored_without(&mut admin, &log, s, MARK).await;
    let bytes = encoded(&read);
    for kept in ["root", "fan", "task_a", "task_x", "task_y", "[redacted]"] {
        assert!(contains(&bytes, kept), "{kept}");
    }
    // Positions, head and the other stream are untouched; the log verifies.
    assert_eq!(layout(&log), layout_before);
    assert_eq!(log.head(), head);
    assert_eq!(log.read_stream(other, 1).expect("read"), other_before);
    assert_eq!(log.verify().expect("verify"), head);
    assert_same_statuses(&wf, read);

    // Idempotent; a log opened afterwards reads the same.
    assert_eq!(
        log.redact(s, Vec::new()).expect("redact"),
        RedactStats::default()
    );
    let fresh = schema.open().await;
    assert_eq!(fresh.read_stream(s, 1).expect("read"), want);
    assert_appends_continue(&fresh, s, events.len() as u64).await;
    assert_eq!(log.verify().expect("verify"), log.head().max(fresh.head()));

    // Streams with nothing to redact: never written, and the system stream.
    assert_eq!(
        log.redact(stream(77), Vec::new()).expect("redact"),
        RedactStats::default()
    );
    assert_eq!(
        log.redact(WorkflowId::SYSTEM, Vec::new()).expect("redact"),
        RedactStats::default()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redaction_after_compaction_rewrites_the_segment_and_drops_the_snapshot() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let mut admin = schema.admin().await;
    let (s, other) = (stream(1), stream(2));
    let (wf, events) = write_scenario(&log, s, other).await;
    let head = log.head();
    let want = redacted(&events, &[]);

    // Part archived (with a snapshot of the final state: it holds task data), part live.
    let snapshot = wf.to_snapshot().expect("snapshot");
    assert!(contains(&snapshot, MARK));
    let split = events.len() as u64 / 2;
    log.compact(s, Some(split), Some(snapshot))
        .expect("compact");
    let before = log.archived(s).expect("archived").expect("an archive row");
    let layout_before = layout(&log);

    let stats = log.redact(s, Vec::new()).expect("redact");
    let changed =
        |range: std::ops::Range<usize>| range.filter(|&i| events[i] != want[i]).count() as u64;
    assert_eq!(
        stats,
        RedactStats {
            events_rewritten: changed(split as usize..events.len()),
            archived_rewritten: changed(0..split as usize),
            snapshot_dropped: true,
        }
    );
    assert!(stats.archived_rewritten > 0 && stats.events_rewritten > 0);
    let after = log.archived(s).expect("archived").expect("an archive row");
    assert_eq!(
        (
            after.first_seq,
            after.last_seq,
            after.events,
            after.last_position
        ),
        (
            before.first_seq,
            before.last_seq,
            before.events,
            before.last_position
        )
    );
    assert!(!after.has_snapshot);
    assert_eq!(log.snapshot(s).expect("snapshot"), None);
    assert_eq!(log.read_stream(s, 1).expect("read"), want);
    for from in [2, split, split + 1, split + 2] {
        assert_eq!(
            log.read_stream(s, from).expect("read"),
            want[from as usize - 1..]
        );
    }
    assert_stored_without(&mut admin, &log, s, MARK).await;
    assert_eq!(archived_events(&mut admin, s).await, want[..split as usize]);
    assert_eq!(layout(&log), layout_before);
    assert_eq!(log.verify().expect("verify"), head);
    assert_same_statuses(&wf, log.read_stream(s, 1).expect("read"));

    // Compacting the rest afterwards keeps it redacted; appends continue.
    assert_eq!(
        log.compact(s, None, None).expect("compact").events,
        events.len() as u64 - split
    );
    assert_eq!(log.read_stream(s, 1).expect("read"), want);
    assert_stored_without(&mut admin, &log, s, MARK).await;
    assert_eq!(log.verify().expect("verify"), head);
    assert_eq!(
        log.redact(s, Vec::new()).expect("redact"),
        RedactStats::default()
    );
    assert_appends_continue(&log, s, events.len() as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_after_redaction_archives_the_redacted_events() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let mut admin = schema.admin().await;
    let (s, other) = (stream(1), stream(2));
    let (wf, events) = write_scenario(&log, s, other).await;
    let head = log.head();
    let want = redacted(&events, &[]);

    log.redact(s, Vec::new()).expect("redact");
    let stats = log
        .compact(s, None, Some(b"a state without data".to_vec()))
        .expect("compact");
    assert_eq!(stats.events, events.len() as u64);
    assert_eq!(log.read_stream(s, 1).expect("read"), want);
    assert_eq!(archived_events(&mut admin, s).await, want);
    assert_stored_without(&mut admin, &log, s, MARK).await;
    assert_eq!(log.verify().expect("verify"), head);
    assert_same_statuses(&wf, log.read_stream(s, 1).expect("read"));

    // A snapshot given after the redaction is dropped by the next one, nothing else changes.
    assert_eq!(
        log.redact(s, Vec::new()).expect("redact"),
        RedactStats {
            snapshot_dropped: true,
            ..RedactStats::default()
        }
    );
    assert_eq!(log.snapshot(s).expect("snapshot"), None);
    assert_appends_continue(&log, s, events.len() as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redacting_some_nodes_leaves_the_others_data() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let mut admin = schema.admin().await;
    let (s, other) = (stream(1), stream(2));
    let (wf, events) = write_scenario(&log, s, other).await;
    let head = log.head();
    // Archive everything before the swarm items were added: the items' batch is live, and
    // their indexes continue after the archived batch's.
    let added = events
        .iter()
        .position(|e| matches!(e.payload, Payload::SwarmItemsAdded { .. }))
        .expect("a swarm_items_added event") as u64;
    log.compact(s, Some(added), None).expect("compact");

    // Only item y (index 6, second spec of the live batch).
    log.redact(s, vec![6]).expect("redact");
    assert_eq!(
        log.read_stream(s, 1).expect("read"),
        redacted(&events, &[6])
    );
    assert_stored_without(&mut admin, &log, s, "kwargs-y").await;
    assert!(live_rows_containing(&mut admin, s, "kwargs-x").await > 0);

    // The canceled swarm and its items.
    let canceled: Vec<NodeIndex> = vec![2, 5, 6];
    let stats = log.redact(s, canceled.clone()).expect("redact");
    assert!(stats.archived_rewritten > 0 && stats.events_rewritten > 0);
    let want = redacted(&events, &canceled);
    let read = log.read_stream(s, 1).expect("read");
    assert_eq!(read, want);
    for gone in ["kwargs-fan", "kwargs-x", "kwargs-y", "result-x"] {
        assert_stored_without(&mut admin, &log, s, gone).await;
    }
    // The other signatures' data stays, archived and live.
    let archived = encoded(&archived_events(&mut admin, s).await);
    for kept in ["kwargs-root", "kwargs-a", "input", "checkpoint", "error-a"] {
        assert!(contains(&archived, kept), "{kept}");
    }
    for kept in ["result-cleanup", "error-on-err"] {
        assert!(
            live_rows_containing(&mut admin, s, kept).await > 0,
            "{kept}"
        );
    }
    assert_eq!(log.verify().expect("verify"), head);
    assert_same_statuses(&wf, read);
    assert_appends_continue(&log, s, events.len() as u64).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_redactions_and_compactions_of_a_stream_serialise() {
    let schema = TestSchema::new().await;
    let logs = [schema.open().await, schema.open().await];
    let mut admin = schema.admin().await;
    let (s, other) = (stream(1), stream(2));
    let (wf, events) = write_scenario(&logs[0], s, other).await;
    let head = logs[0].head();
    let n = events.len() as u64;
    std::thread::scope(|scope| {
        for (i, log) in logs.iter().enumerate() {
            scope.spawn(move || {
                for round in 0..6u64 {
                    if (round + i as u64).is_multiple_of(2) {
                        log.redact(s, Vec::new()).expect("redact");
                    } else {
                        let up_to = Some(1 + (round * 5 + i as u64) % n);
                        log.compact(s, up_to, Some(vec![round as u8]))
                            .expect("compact");
                    }
                }
            });
        }
    });
    logs[0].redact(s, Vec::new()).expect("redact");
    assert_eq!(
        logs[0].read_stream(s, 1).expect("read"),
        redacted(&events, &[])
    );
    assert_stored_without(&mut admin, &logs[0], s, MARK).await;
    assert_eq!(logs[1].verify().expect("verify"), head);
    assert_same_statuses(&wf, logs[1].read_stream(s, 1).expect("read"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_stream_is_refused_and_left_unchanged() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let mut admin = schema.admin().await;
    let (s, other) = (stream(1), stream(2));
    let (_, events) = write_scenario(&log, s, other).await;
    let with_data = live_rows_containing(&mut admin, s, MARK).await;
    // The last event's checksum no longer matches its payload.
    let position: i64 = sqlx::query_scalar(
        "UPDATE mageflow_events SET crc32 = crc32 # 1 \
         WHERE stream = $1 AND seq = $2 RETURNING position",
    )
    .bind(s.0)
    .bind(events.len() as i64)
    .fetch_one(&mut admin)
    .await
    .expect("damage a row");
    match log.redact(s, Vec::new()) {
        Err(Error::Corrupt(m)) => assert!(m.contains(&format!("position {position}")), "{m}"),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    assert_eq!(live_rows_containing(&mut admin, s, MARK).await, with_data);
}
