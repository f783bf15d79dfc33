//! Compaction (cold storage): `PgLog::compact` moves a stream's oldest events into its
//! `mageflow_archive` row. Reads of the stream, its version and the version checks of appends
//! must not change; `read_all` serves the live events; damage is a typed error.

use crate::{TestSchema, WAIT_MAX};
use mageflow_core::{codec, Event, WorkflowId};
use mageflow_store::conformance::{assert_conflict, event_with, request, stream};
use mageflow_store::{AppendRequest, Error, EventLog, Recorded};
use mageflow_store_pg::PgLog;
use sqlx::Executor;
use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Every stream's events, read with `read_stream` from seq 1.
fn streams(log: &PgLog, ids: &[WorkflowId]) -> BTreeMap<WorkflowId, Vec<Event>> {
    ids.iter()
        .map(|&s| (s, log.read_stream(s, 1).expect("read_stream")))
        .collect()
}

/// `read_stream` from every seq (and past the end) equals the suffix of `events`.
fn assert_reads(log: &PgLog, s: WorkflowId, events: &[Event]) {
    for from in 0..=events.len() as u64 + 2 {
        let skip = from.saturating_sub(1).min(events.len() as u64) as usize;
        assert_eq!(
            log.read_stream(s, from).expect("read_stream"),
            events[skip..],
            "{s} from seq {from}"
        );
    }
    assert_eq!(
        log.stream_version(s).expect("version"),
        events.len() as u64,
        "version of {s}"
    );
}

/// Every event of the log by position, in batches of `limit`.
fn read_all_batches(log: &PgLog, limit: usize) -> Vec<Recorded> {
    let mut out: Vec<Recorded> = Vec::new();
    let mut from = 1;
    loop {
        let batch = log.read_all(from, limit).expect("read_all");
        let Some(last) = batch.last() else {
            return out;
        };
        from = last.position + 1;
        out.extend(batch);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compacted_streams_read_exactly_as_before() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let ids: Vec<WorkflowId> = (1..=5).map(stream).collect();
    // Interleaved: each call appends to several streams, with events of varied sizes.
    let mut versions = vec![0u64; ids.len()];
    for round in 0..8u64 {
        let mut requests = Vec::new();
        for (i, &s) in ids.iter().enumerate() {
            if (round + i as u64) % 3 == 2 {
                continue;
            }
            let n = 1 + (round + i as u64) % 3;
            requests.push(AppendRequest {
                stream: s,
                expected_version: versions[i],
                events: (versions[i] + 1..=versions[i] + n)
                    .map(|seq| event_with(s, seq, "c", (seq as usize * 37) % 300))
                    .collect(),
            });
            versions[i] += n;
        }
        log.append(requests).await.expect("append");
    }
    let before = streams(&log, &ids);
    let all_before = log.read_all(1, usize::MAX).expect("read_all");
    assert_eq!(all_before.len() as u64, log.head());
    let head = log.head();

    // Partial compactions, then full ones (each adds segments after the existing ones).
    let steps: [(usize, Option<u64>); 9] = [
        (0, Some(3)),
        (1, Some(1)),
        (2, None),
        (0, Some(3)), // nothing new to move
        (0, Some(7)),
        (1, None),
        (0, None),
        (3, Some(1_000)), // beyond the version: all of it
        (2, None),        // already all archived
    ];
    let mut sizes: BTreeMap<WorkflowId, (u64, u64, u64)> = BTreeMap::new();
    for (i, up_to) in steps {
        let s = ids[i];
        let archived_before = log.archived(s).expect("archived").map_or(0, |a| a.last_seq);
        let version = versions[i];
        let stats = log.compact(s, up_to, None).expect("compact");
        let want_last = up_to
            .map_or(version, |u| u.min(version))
            .max(archived_before);
        assert_eq!(stats.events, want_last - archived_before, "{s} {up_to:?}");
        let info = log.archived(s).expect("archived").expect("an archive row");
        assert_eq!(
            (info.first_seq, info.last_seq, info.events),
            (1, want_last, want_last)
        );
        let size = sizes.entry(s).or_default();
        size.0 += stats.raw_bytes;
        size.1 += stats.compressed_bytes;
        size.2 += stats.segments;
        assert_eq!(
            (info.raw_bytes, info.compressed_bytes, info.segments),
            *size,
            "the archive is the sum of what each compaction wrote"
        );
        assert!(!info.has_snapshot);
        assert!(info.last_position <= head);
        // Every stream reads exactly as before, from every seq, after every step.
        for (&s, events) in &before {
            assert_reads(&log, s, events);
        }
        assert_eq!(log.verify().expect("verify"), head);
        assert_eq!(log.head(), head, "compaction does not move the head");

        // read_all serves exactly the live events, in order, whatever the batch size.
        let archived: HashSet<(WorkflowId, u64)> = ids
            .iter()
            .flat_map(|&s| {
                let last = log.archived(s).expect("archived").map_or(0, |a| a.last_seq);
                (1..=last).map(move |seq| (s, seq))
            })
            .collect();
        let live: Vec<Recorded> = all_before
            .iter()
            .filter(|r| !archived.contains(&(r.event.stream, r.event.seq)))
            .cloned()
            .collect();
        assert_eq!(log.read_all(1, usize::MAX).expect("read_all"), live);
        for limit in [1, 2, 7] {
            assert_eq!(read_all_batches(&log, limit), live, "batches of {limit}");
        }
    }
    // A stream that was never written: nothing archived, no row.
    let stats = log
        .compact(stream(99), None, Some(vec![1]))
        .expect("compact");
    assert_eq!(stats.events, 0);
    assert_eq!(log.archived(stream(99)).expect("archived"), None);
    assert_eq!(log.stream_version(stream(99)).expect("version"), 0);
    assert!(log.archived(ids[4]).expect("archived").is_none());

    // A log opened afterwards (fresh caches) reads the same.
    let other = schema.open().await;
    for (&s, events) in &before {
        assert_reads(&other, s, events);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_after_compaction_continue_the_stream() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let (s, t) = (stream(1), stream(2));
    log.append(vec![request(s, 0, 5), request(t, 0, 2)])
        .await
        .expect("append");
    assert_eq!(log.compact(s, None, None).expect("compact").events, 5);
    // The stream has no live row left; its version stays.
    assert_eq!(log.stream_version(s).expect("version"), 5);
    let mut admin = schema.admin().await;
    let live: i64 = sqlx::query_scalar("SELECT count(*) FROM mageflow_events WHERE stream = $1")
        .bind(s.0)
        .fetch_one(&mut admin)
        .await
        .expect("count");
    assert_eq!(live, 0);

    // Stale versions conflict, from this log (its committer's cache) and from a fresh one (an
    // index probe of both tables), and write nothing.
    let fresh = schema.open().await;
    for l in [&log, &fresh] {
        for stale in [0, 4] {
            let head = l.head();
            let err = l
                .append(vec![request(t, 2, 1), request(s, stale, 1)])
                .await
                .expect_err("stale");
            assert_conflict(&err, s, stale, 5);
            assert_eq!(l.head(), head);
            assert_eq!(l.stream_version(t).expect("version"), 2);
            assert_eq!(l.stream_version(s).expect("version"), 5);
        }
    }
    assert_eq!(log.verify().expect("verify"), 7);
    // The right version succeeds and gets the next seq.
    assert_eq!(
        fresh.append(vec![request(s, 5, 2)]).await.expect("append"),
        vec![9]
    );
    let want: Vec<Event> = (1..=7)
        .map(|seq| request(s, 0, 7).events[seq - 1].clone())
        .collect();
    assert_eq!(fresh.read_stream(s, 1).expect("read"), want);
    tokio::time::timeout(WAIT_MAX, log.subscribe().wait_for(|h| *h >= 9))
        .await
        .expect("head")
        .expect("alive");

    // Another process appends and compacts the events `log`'s committer has not seen: `log` must
    // learn their version from the archive row (its catch-up by position finds no live row).
    let err = log.append(vec![request(s, 5, 1)]).await.expect_err("stale");
    assert_conflict(&err, s, 5, 7);
    assert_eq!(
        log.append(vec![request(s, 7, 1)]).await.expect("append"),
        vec![10]
    );
    tokio::time::timeout(WAIT_MAX, fresh.subscribe().wait_for(|h| *h >= 10))
        .await
        .expect("head")
        .expect("alive");
    fresh
        .append(vec![request(s, 8, 1)])
        .await
        .expect("fresh appends seq 9");
    assert_eq!(fresh.compact(s, None, None).expect("compact").events, 4);
    let err = log
        .append(vec![request(s, 8, 1)])
        .await
        .expect_err("stale after a compacted foreign append");
    assert_conflict(&err, s, 8, 9);
    assert_eq!(
        log.append(vec![request(s, 9, 1)]).await.expect("append"),
        vec![12]
    );
    let want: Vec<Event> = request(s, 0, 10).events;
    for l in [&log, &fresh] {
        assert_eq!(l.read_stream(s, 1).expect("read"), want);
        assert_eq!(l.stream_version(s).expect("version"), 10);
    }
    assert_eq!(log.verify().expect("verify"), 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_and_compactions_lose_nothing() {
    const STREAMS: u128 = 3;
    const PER_WRITER: u64 = 25;
    let schema = TestSchema::new().await;
    // Two processes, each with its own committer, writing and compacting the same streams.
    let logs = [Arc::new(schema.open().await), Arc::new(schema.open().await)];
    let done = Arc::new(AtomicBool::new(false));

    let mut compactors = Vec::new();
    for c in 0..4usize {
        let log = logs[c % 2].clone();
        let done = done.clone();
        compactors.push(tokio::task::spawn_blocking(move || {
            let mut runs = 0u64;
            let mut n = c as u64;
            while !done.load(Ordering::Acquire) {
                n += 1;
                let s = stream(1 + (n as u128 % STREAMS));
                let version = log.stream_version(s).expect("version");
                let up_to = match n % 2 {
                    0 => None,
                    _ => Some(version / 2),
                };
                let snapshot = match n % 3 {
                    0 => Some(n.to_le_bytes().to_vec()),
                    _ => None,
                };
                log.compact(s, up_to, snapshot).expect("compact");
                runs += 1;
            }
            runs
        }));
    }

    // Two writers per stream, one per process, each appending PER_WRITER events tagged with its
    // name, one at a time, retrying on conflicts.
    let mut writers = Vec::new();
    for s in 1..=STREAMS {
        for (w, log) in logs.iter().enumerate() {
            let log = log.clone();
            writers.push(tokio::spawn(async move {
                let s = stream(s);
                let tag = format!("w{w}");
                let mut acked = Vec::new();
                while (acked.len() as u64) < PER_WRITER {
                    let version = log.stream_version(s).expect("version");
                    let event = event_with(s, version + 1, &tag, 40);
                    let req = AppendRequest {
                        stream: s,
                        expected_version: version,
                        events: vec![event.clone()],
                    };
                    match log.append(vec![req]).await {
                        Ok(_) => acked.push(event),
                        Err(e) if e.is_conflict() => tokio::task::yield_now().await,
                        Err(e) => panic!("append: {e}"),
                    }
                }
                acked
            }));
        }
    }
    let mut acked: Vec<Event> = Vec::new();
    for w in writers {
        acked.extend(
            tokio::time::timeout(WAIT_MAX, w)
                .await
                .expect("writer hangs")
                .expect("writer"),
        );
    }
    done.store(true, Ordering::Release);
    let mut runs = 0;
    for c in compactors {
        runs += c.await.expect("compactor");
    }
    assert!(runs > 0);

    let total = STREAMS as u64 * 2 * PER_WRITER;
    for log in &logs {
        tokio::time::timeout(WAIT_MAX, log.subscribe().wait_for(|h| *h >= total))
            .await
            .expect("head")
            .expect("alive");
        for s in (1..=STREAMS).map(stream) {
            let events = log.read_stream(s, 1).expect("read_stream");
            assert_eq!(events.len() as u64, 2 * PER_WRITER, "{s}");
            for (i, e) in events.iter().enumerate() {
                assert_eq!(e.seq, i as u64 + 1, "dense");
            }
            assert_eq!(log.stream_version(s).expect("version"), 2 * PER_WRITER);
        }
        assert_eq!(log.verify().expect("verify"), total);
    }
    // Every acknowledged event is in its stream, at its seq, exactly as written.
    let read: BTreeMap<WorkflowId, Vec<Event>> =
        streams(&logs[0], &(1..=STREAMS).map(stream).collect::<Vec<_>>());
    for e in &acked {
        assert_eq!(&read[&e.stream][e.seq as usize - 1], e);
    }
    assert_eq!(acked.len() as u64, total);
    // Fully compacted, the streams read the same.
    for s in (1..=STREAMS).map(stream) {
        logs[1].compact(s, None, None).expect("compact");
    }
    assert_eq!(
        streams(&logs[0], &(1..=STREAMS).map(stream).collect::<Vec<_>>()),
        read
    );
    assert!(logs[0]
        .read_all(1, usize::MAX)
        .expect("read_all")
        .is_empty());
    assert_eq!(logs[0].verify().expect("verify"), total);
}

fn assert_corrupt_naming(err: Error, s: WorkflowId, needle: &str) {
    match &err {
        Error::Corrupt(m) => {
            assert!(m.contains(&s.to_string()), "names the stream: {m}");
            assert!(m.contains(needle), "says {needle:?}: {m}");
        }
        other => panic!("expected Corrupt({needle}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_segments_are_typed_errors() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let (s, t) = (stream(1), stream(2));
    log.append(vec![request(s, 0, 4), request(t, 0, 2)])
        .await
        .expect("append");
    log.compact(s, Some(3), None).expect("compact");
    log.compact(t, None, None).expect("compact");
    let mut admin = schema.admin().await;
    let (good, good_crc): (Vec<u8>, i32) =
        sqlx::query_as("SELECT segment, crc32 FROM mageflow_archive WHERE stream = $1")
            .bind(s.0)
            .fetch_one(&mut admin)
            .await
            .expect("read the segment");
    let set = |segment: Vec<u8>, crc: i32| {
        sqlx::query("UPDATE mageflow_archive SET segment = $2, crc32 = $3 WHERE stream = $1")
            .bind(s.0)
            .bind(segment)
            .bind(crc)
    };
    let crc = |b: &[u8]| crc32fast::hash(b) as i32;
    let frame = |bytes: &[u8]| {
        let mut raw = (bytes.len() as u32).to_le_bytes().to_vec();
        raw.extend_from_slice(bytes);
        raw
    };

    // A flipped bit: the checksum.
    let mut flipped = good.clone();
    flipped[good.len() / 2] ^= 0x10;
    set(flipped, good_crc)
        .execute(&mut admin)
        .await
        .expect("damage");
    assert_corrupt_naming(log.read_stream(s, 1).expect_err("read"), s, "checksum");
    // Seqs past the archive do not need it.
    assert_eq!(log.read_stream(s, 4).expect("live part").len(), 1);
    assert_corrupt_naming(log.verify().expect_err("verify"), s, "checksum");
    // (A compaction would not notice: it writes new segments and never reads the old ones.)
    assert_eq!(log.stream_version(s).expect("version"), 4);
    assert_eq!(log.read_stream(t, 1).expect("other stream").len(), 2);

    // Not zstd at all, with a matching checksum.
    let junk = b"definitely not zstd".to_vec();
    set(junk.clone(), crc(&junk))
        .execute(&mut admin)
        .await
        .expect("damage");
    assert_corrupt_naming(log.read_stream(s, 1).expect_err("read"), s, "decompress");
    assert_corrupt_naming(log.verify().expect_err("verify"), s, "decompress");

    // Valid zstd of the right size, but the frames are not events.
    let mut raw = Vec::new();
    for _ in 0..3 {
        raw.extend(frame(&[0xc1; 5]));
    }
    let raw_len = raw.len() as i64;
    let bad = zstd::bulk::compress(&raw, 3).expect("compress");
    set(bad.clone(), crc(&bad))
        .execute(&mut admin)
        .await
        .expect("damage");
    sqlx::query("UPDATE mageflow_archive SET raw_bytes = $2 WHERE stream = $1")
        .bind(s.0)
        .bind(raw_len)
        .execute(&mut admin)
        .await
        .expect("damage");
    assert_corrupt_naming(
        log.read_stream(s, 1).expect_err("read"),
        s,
        "does not decode",
    );

    // Real events, but another stream's.
    let mut raw = Vec::new();
    for seq in 1..=3 {
        raw.extend(frame(
            &codec::encode(&request(t, 0, 3).events[seq - 1]).expect("encode"),
        ));
    }
    let raw_len = raw.len() as i64;
    let bad = zstd::bulk::compress(&raw, 3).expect("compress");
    set(bad.clone(), crc(&bad))
        .execute(&mut admin)
        .await
        .expect("damage");
    sqlx::query("UPDATE mageflow_archive SET raw_bytes = $2 WHERE stream = $1")
        .bind(s.0)
        .bind(raw_len)
        .execute(&mut admin)
        .await
        .expect("damage");
    assert_corrupt_naming(log.read_stream(s, 1).expect_err("read"), s, "decodes as");

    // A truncated frame (the size matches what the row says).
    let mut raw = frame(&codec::encode(&request(s, 0, 1).events[0]).expect("encode"));
    raw.extend_from_slice(&[200, 0, 0, 0, 1, 2]);
    let raw_len = raw.len() as i64;
    let bad = zstd::bulk::compress(&raw, 3).expect("compress");
    set(bad.clone(), crc(&bad))
        .execute(&mut admin)
        .await
        .expect("damage");
    sqlx::query("UPDATE mageflow_archive SET raw_bytes = $2 WHERE stream = $1")
        .bind(s.0)
        .bind(raw_len)
        .execute(&mut admin)
        .await
        .expect("damage");
    assert_corrupt_naming(log.read_stream(s, 1).expect_err("read"), s, "claims");

    // The good segment, but the row's size is still the last damage's.
    set(good.clone(), good_crc)
        .execute(&mut admin)
        .await
        .expect("restore");
    assert_corrupt_naming(
        log.read_stream(s, 1).expect_err("raw size"),
        s,
        "decompresses to",
    );
    // Restored, everything reads again.
    sqlx::query("UPDATE mageflow_archive SET raw_bytes = $2 WHERE stream = $1")
        .bind(s.0)
        .bind(good_raw_bytes(&good))
        .execute(&mut admin)
        .await
        .expect("restore the size");
    assert_eq!(
        log.read_stream(s, 1).expect("read"),
        request(s, 0, 4).events
    );
    assert_eq!(log.verify().expect("verify"), 6);

    // A live row missing where the archive cannot explain it: read_all and verify say so.
    assert_eq!(
        log.append(vec![request(s, 4, 3)]).await.expect("append"),
        vec![9]
    );
    admin
        .execute("DELETE FROM mageflow_events WHERE position = 8")
        .await
        .expect("delete");
    // (Read by another process: this one serves what it just committed from memory.)
    let reader = schema.open().await;
    let err = reader.read_all(1, 10).expect_err("gap above the archive");
    assert!(err.to_string().contains("position 8 is missing"), "{err}");
    let err = log.verify().expect_err("verify");
    assert!(matches!(err, Error::Corrupt(_)), "{err:?}");
}

fn good_raw_bytes(segment: &[u8]) -> i64 {
    zstd::bulk::decompress(segment, 1 << 20)
        .map(|raw| raw.len() as i64)
        .expect("the good segment decompresses")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_round_trip() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    let s = stream(1);
    log.append(vec![request(s, 0, 3)]).await.expect("append");
    assert_eq!(log.snapshot(s).expect("snapshot"), None);
    assert_eq!(log.archived(s).expect("archived"), None);

    let first: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    log.compact(s, Some(2), Some(first.clone()))
        .expect("compact");
    assert_eq!(log.snapshot(s).expect("snapshot"), Some(first.clone()));
    let info = log.archived(s).expect("archived").expect("row");
    assert!(info.has_snapshot);
    assert_eq!(info.snapshot_bytes, Some(first.len() as u64));

    // Without a snapshot, the stored one stays; with one, it is replaced.
    log.compact(s, None, None).expect("compact");
    assert_eq!(log.snapshot(s).expect("snapshot"), Some(first));
    log.compact(s, None, Some(Vec::new()))
        .expect("compact, nothing to move");
    assert_eq!(log.snapshot(s).expect("snapshot"), Some(Vec::new()));
    log.append(vec![request(s, 3, 1)]).await.expect("append");
    log.compact(s, None, Some(b"final".to_vec()))
        .expect("compact");
    assert_eq!(log.snapshot(s).expect("snapshot"), Some(b"final".to_vec()));
    let info = log.archived(s).expect("archived").expect("row");
    assert_eq!((info.last_seq, info.snapshot_bytes), (4, Some(5)));
    assert_eq!(
        log.read_stream(s, 1).expect("read"),
        request(s, 0, 4).events
    );
    assert_eq!(log.snapshot(stream(2)).expect("snapshot"), None);
}
