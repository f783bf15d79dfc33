//! Cold storage: [`crate::PgLog::compact`] moves a stream's oldest events out of
//! `mageflow_events` into rows of `mageflow_archive` (`migrations/0002_archive.sql`,
//! `0003_archive_segments.sql`), zstd-compressed *segments* in the shared format of
//! `mageflow_store::segment`, and the reads put them back in front of the live rows.
//!
//! **Segments.** Each row holds one segment: the events `first_seq..=last_seq` of the stream, as
//! 4-byte little-endian lengths followed by the events' codec bytes (exactly the payloads their
//! `mageflow_events` rows held: events are never re-encoded, except by a redaction), compressed
//! with zstd; the row keeps the uncompressed size (`raw_bytes`), the number of events, the
//! CRC-32 of the compressed bytes and the highest position archived. A stream's rows cover its
//! seqs densely from 1. A compaction adds rows of about `SEGMENT_TARGET_BYTES` each for the
//! events it moves and never rewrites earlier ones. Every read checks all of it: CRC,
//! decompression (bounded), framing, event count, decoding, each event's stream and seq, and
//! the density of the segments; damage is `Error::Corrupt` naming the stream, never a panic.
//! The stream's snapshot (opaque bytes given to `compact`) is a row of `mageflow_snapshot`.
//!
//! **Locking.** A compaction runs in one READ COMMITTED transaction holding a transaction-level
//! advisory lock keyed by (schema, stream). Why not the committer's head row lock: compaction
//! never changes a stream's version nor assigns positions, so it need not be ordered with
//! appends, and taking the head lock would stall every append of every process for the length
//! of a compression. What it must exclude is a second compaction of the same stream (both would
//! read the same last archived seq and live rows and write the same segments twice): the
//! per-stream advisory lock does that, and is taken before anything is read, so the second
//! one reads what the first committed. A row lock cannot serve: the first compaction of a
//! stream has no row to lock yet. Appends are safe without a lock: the
//! committer only inserts seqs above the stream's version, while compaction only reads and
//! deletes committed seqs at or below it; each compaction commits its archive rows and its
//! DELETE atomically, so any single statement (the committer's version probe, `read_stream`,
//! `stream_version`) sees the stream's events either all live or moved, never half.
//!
//! **Redaction.** [`crate::PgLog::redact`] drops the task data of some (or all) signatures of
//! a workflow from its stream for good (`mageflow_core::Payload::redact`: kwargs, messages,
//! results, checkpoints, error messages), keeping the audit trail: every event stays, at its
//! position and seq, with its kind, time, actor, node, attempt and status. In one transaction
//! holding the same per-stream advisory lock as compaction (so it never interleaves with a
//! compaction of the stream), it reads the archive rows and every live row of the stream,
//! checks them like a read, redacts them in seq order, rewrites the live rows whose event
//! changed (payload and CRC, by position) and each segment holding an archived event that
//! changed (re-encoded frames for the changed events, the stored bytes for the others,
//! recompressed, new CRC and raw size); it deletes the stream's snapshot (a snapshot is a
//! state, with the task data in it). Positions, seqs, versions, row counts and the head do not
//! change, so appends, version checks, `verify` and readers are unaffected. Its commit is
//! synchronous (unlike compaction's): an acknowledged redaction stays done.

use crate::copy::{decode_row, Row};
use mageflow_core::{Event, NodeIndex, Redactor, Timestamp, WorkflowId};
use mageflow_store::{segment, Error, Result};
use sqlx::postgres::PgPool;
use sqlx::PgConnection;

pub use mageflow_store::segment::{ArchiveInfo, CompactStats, SEGMENT_TARGET_BYTES, ZSTD_LEVEL};
use mageflow_store::segment::{SegmentHeader, Segmenter};

/// An archive row as read for decoding: (first_seq, last_seq, events, raw_bytes, segment,
/// crc32).
pub(crate) type Segment = (i64, i64, i64, i64, Vec<u8>, i32);

/// Columns of [`Segment`], in order.
pub(crate) const SEGMENT_COLUMNS: &str = "first_seq, last_seq, events, raw_bytes, segment, crc32";

/// A stream's archive summed over its segments (no row if it has none).
pub(crate) const INFO_QUERY: &str = "SELECT min(first_seq), max(last_seq), \
     sum(events)::bigint, count(*)::bigint, sum(raw_bytes)::bigint, \
     sum(octet_length(segment))::bigint, max(last_position), \
     (SELECT octet_length(snapshot)::bigint FROM mageflow_snapshot WHERE stream = $1), \
     (extract(epoch FROM max(compacted_at)) * 1000000)::bigint \
     FROM mageflow_archive WHERE stream = $1 HAVING count(*) > 0";

pub(crate) type InfoRow = (i64, i64, i64, i64, i64, i64, i64, Option<i64>, i64);

pub(crate) fn info_from_row(row: InfoRow) -> ArchiveInfo {
    let (first_seq, last_seq, events, segments, raw, compressed, last_position, snapshot, at) = row;
    ArchiveInfo {
        first_seq: first_seq as u64,
        last_seq: last_seq as u64,
        events: events as u64,
        segments: segments as u64,
        raw_bytes: raw as u64,
        compressed_bytes: compressed as u64,
        last_position: last_position as u64,
        has_snapshot: snapshot.is_some(),
        snapshot_bytes: snapshot.map(|n| n as u64),
        compacted_at: Timestamp::from_micros(at),
    }
}

fn corrupt(stream: WorkflowId, what: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("archive of stream {stream}: {what}"))
}

/// An archive row's header, checked: its seqs agree with its event count.
pub(crate) fn header(stream: WorkflowId, row: &Segment) -> Result<SegmentHeader> {
    let (first_seq, last_seq, events, raw_bytes, _, crc) = row;
    let bad = || {
        corrupt(
            stream,
            format!(
                "a row says seqs {first_seq}..={last_seq}, {events} events, {raw_bytes} raw bytes"
            ),
        )
    };
    let (Ok(first), Ok(events), Ok(raw_bytes)) = (
        u64::try_from(*first_seq),
        u64::try_from(*events),
        u64::try_from(*raw_bytes),
    ) else {
        return Err(bad());
    };
    let header = SegmentHeader {
        first_seq: first,
        events,
        raw_bytes,
        crc32: *crc as u32,
    };
    header.check(stream)?;
    if header.last_seq() as i64 != *last_seq {
        return Err(bad());
    }
    Ok(header)
}

/// Decode a stored archive segment of `stream` holding seqs from 1, with the row's `events`,
/// `raw_bytes` and `crc32` columns: every check a read makes (checksum, bounded decompression,
/// framing, event decoding, stream and seqs). For the fuzz target and tools; damaged input is
/// an `Error::Corrupt`, never a panic.
pub fn decode_archive_segment(
    stream: WorkflowId,
    events: u64,
    raw_bytes: u64,
    crc32: u32,
    segment: &[u8],
) -> Result<Vec<Event>> {
    let header = SegmentHeader {
        first_seq: 1,
        events,
        raw_bytes,
        crc32,
    };
    header.decode(stream, segment, 1)
}

/// The archived events of one segment row of `stream` with `seq >= from_seq`, checked.
pub(crate) fn decode_segment(
    stream: WorkflowId,
    row: &Segment,
    from_seq: u64,
) -> Result<Vec<Event>> {
    header(stream, row)?.decode(stream, &row.4, from_seq)
}

/// Decode a stream's segment rows in seq order, checking they run densely from 1 (as far as
/// `from_seq` needs: rows wholly below it may have been left out by the query).
pub(crate) fn decode_segments(
    stream: WorkflowId,
    rows: &[Segment],
    from_seq: u64,
) -> Result<Vec<Event>> {
    let mut events = Vec::new();
    let mut next: Option<u64> = None;
    for row in rows {
        let h = header(stream, row)?;
        if let Some(next) = next.filter(|&n| n != h.first_seq) {
            return Err(corrupt(
                stream,
                format!(
                    "a segment starts at seq {} where seq {next} was expected",
                    h.first_seq
                ),
            ));
        }
        if next.is_none() && h.first_seq > from_seq.max(1) {
            return Err(corrupt(
                stream,
                format!(
                    "its first segment read starts at seq {}, after seq {}",
                    h.first_seq,
                    from_seq.max(1)
                ),
            ));
        }
        next = Some(h.last_seq() + 1);
        events.extend(h.decode(stream, &row.4, from_seq)?);
    }
    Ok(events)
}

/// CPU-heavy work inside the log's (multi-thread) runtime without stalling its other tasks.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// One compaction, in one transaction on a connection of `pool`. The outer error is PostgreSQL's (the caller
/// retries a lost connection: the transaction then did not commit, or committed and the retry
/// finds nothing left to move); the inner one is the compaction's own refusal (corrupt data,
/// size limit), after which the transaction was rolled back.
pub(crate) async fn compact_on(
    pool: &PgPool,
    stream: WorkflowId,
    up_to_seq: Option<u64>,
    snapshot: Option<&[u8]>,
) -> Result<Result<CompactStats>, sqlx::Error> {
    let up_to = up_to_seq.map_or(i64::MAX, |s| i64::try_from(s).unwrap_or(i64::MAX));
    // Dropped without commit (an error, a lost connection): rolled back.
    let mut tx = pool.begin().await?;
    let outcome = compact_in_transaction(&mut tx, stream, up_to, snapshot).await?;
    settle(tx, outcome).await
}

/// Commit the transaction if its work succeeded, roll it back if it was refused.
async fn settle<T>(
    tx: sqlx::Transaction<'_, sqlx::Postgres>,
    outcome: Result<T>,
) -> Result<Result<T>, sqlx::Error> {
    match outcome {
        Ok(_) => tx.commit().await?,
        Err(_) => tx.rollback().await?,
    }
    Ok(outcome)
}

/// The live rows of `stream` with `seq <= up_to`, in seq order (read under the stream's lock).
async fn live_rows(
    conn: &mut PgConnection,
    stream: WorkflowId,
    up_to: i64,
) -> Result<Vec<Row>, sqlx::Error> {
    sqlx::query_as(
        "SELECT position, stream, seq, payload, crc32 FROM mageflow_events \
         WHERE stream = $1 AND seq <= $2 ORDER BY seq",
    )
    .bind(stream.0)
    .bind(up_to)
    .fetch_all(&mut *conn)
    .await
}

/// The per-stream, transaction-level advisory lock that compactions and redactions of a stream
/// hold (keyed by schema and stream: another schema's log on the same database does not share
/// the key). Released at COMMIT or ROLLBACK.
async fn lock_stream(conn: &mut PgConnection, stream: WorkflowId) -> Result<(), sqlx::Error> {
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended(\
         'mageflow_compact ' || current_schema() || ' ' || $1::text, 0))",
    )
    .bind(stream.0)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

async fn compact_in_transaction(
    conn: &mut PgConnection,
    stream: WorkflowId,
    up_to: i64,
    snapshot: Option<&[u8]>,
) -> Result<Result<CompactStats>, sqlx::Error> {
    // Without waiting for the WAL flush: a compaction is one transaction that changes no
    // stream's content or version, so if the server crashes before its commit record is on
    // disk it is undone whole (the events are simply still live), never half-applied; any
    // later synchronous commit (an append) flushes it with everything before it. It saves a
    // WAL flush per compaction, the largest fixed cost of a small one.
    sqlx::query("SET LOCAL synchronous_commit = off")
        .execute(&mut *conn)
        .await?;
    lock_stream(conn, stream).await?;
    // Read after the lock: a compaction of the same stream that held it has committed.
    let archived: i64 = sqlx::query_scalar(
        "SELECT COALESCE(max(last_seq), 0) FROM mageflow_archive WHERE stream = $1",
    )
    .bind(stream.0)
    .fetch_one(&mut *conn)
    .await?;
    let rows = live_rows(conn, stream, up_to).await?;
    if let (Some(snapshot), true) = (snapshot, archived > 0 || !rows.is_empty()) {
        // A stream with nothing archived and nothing to archive gets no snapshot.
        sqlx::query(
            "INSERT INTO mageflow_snapshot (stream, snapshot) VALUES ($1, $2) \
             ON CONFLICT (stream) DO UPDATE SET snapshot = EXCLUDED.snapshot, taken_at = now()",
        )
        .bind(stream.0)
        .bind(snapshot)
        .execute(&mut *conn)
        .await?;
    }
    if rows.is_empty() {
        return Ok(Ok(CompactStats::default()));
    }

    let built = match blocking(|| build_segments(stream, archived as u64, &rows)) {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let mut stats = CompactStats {
        events: rows.len() as u64,
        ..CompactStats::default()
    };
    for segment in &built {
        let h = &segment.header;
        sqlx::query(
            "INSERT INTO mageflow_archive (stream, first_seq, last_seq, events, raw_bytes, \
             segment, crc32, last_position, compacted_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, now())",
        )
        .bind(stream.0)
        .bind(h.first_seq as i64)
        .bind(h.last_seq() as i64)
        .bind(h.events as i64)
        .bind(h.raw_bytes as i64)
        .bind(&segment.bytes)
        .bind(h.crc32 as i32)
        .bind(segment.last_position as i64)
        .execute(&mut *conn)
        .await?;
        stats.segments += 1;
        stats.raw_bytes += h.raw_bytes;
        stats.compressed_bytes += segment.bytes.len() as u64;
    }
    let last_seq = archived + rows.len() as i64;
    let deleted = sqlx::query("DELETE FROM mageflow_events WHERE stream = $1 AND seq <= $2")
        .bind(stream.0)
        .bind(last_seq)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if deleted != stats.events {
        // Cannot happen while appends only add seqs above the version and compactions of the
        // stream are serialised; refuse rather than lose or duplicate anything.
        return Ok(Err(Error::Storage(format!(
            "compaction of stream {stream}: read {} live events but would delete {deleted}; \
             rolled back",
            stats.events
        ))));
    }
    Ok(Ok(stats))
}

/// New segments for the live `rows` (checked like every read: CRC, decoding, stream and seq,
/// dense after the `archived` seqs), their stored bytes unchanged.
fn build_segments(stream: WorkflowId, archived: u64, rows: &[Row]) -> Result<Vec<segment::Built>> {
    let mut segments = Segmenter::new(stream, archived + 1);
    for (seq, row) in (archived + 1..).zip(rows) {
        let r = decode_row(row)?;
        if r.event.seq != seq {
            return Err(Error::Corrupt(format!(
                "stream {stream}: event at position {} has seq {}, but the stream's previous \
                 event (archived or live) has seq {}",
                r.position,
                r.event.seq,
                seq - 1
            )));
        }
        segments.push(&row.3, r.position)?;
    }
    segments.finish()
}

/// What one [`crate::PgLog::redact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedactStats {
    /// Live rows of `mageflow_events` whose payload (and CRC) were rewritten.
    pub events_rewritten: u64,
    /// Events of the stream's archive segments that were rewritten (each segment holding one
    /// is re-encoded and recompressed).
    pub archived_rewritten: u64,
    /// The stream's snapshot was deleted (it holds task data).
    pub snapshot_dropped: bool,
}

/// A live row rewritten by a redaction: (position, payload, crc32).
type Rewrite = (i64, Vec<u8>, i32);

/// What a redaction writes: the rewritten segments (header and compressed bytes), how many
/// archived events changed, and the live rows to rewrite.
#[derive(Default)]
struct RedactPlan {
    segments: Vec<(SegmentHeader, Vec<u8>)>,
    archived_changed: u64,
    rows: Vec<Rewrite>,
}

/// One redaction of `stream`, in one transaction on a connection of `pool` (errors as in
/// [`compact_on`]). `nodes` empty: every signature of the workflow.
pub(crate) async fn redact_on(
    pool: &PgPool,
    stream: WorkflowId,
    nodes: &[NodeIndex],
) -> Result<Result<RedactStats>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let outcome = redact_in_transaction(&mut tx, stream, nodes).await?;
    settle(tx, outcome).await
}

async fn redact_in_transaction(
    conn: &mut PgConnection,
    stream: WorkflowId,
    nodes: &[NodeIndex],
) -> Result<Result<RedactStats>, sqlx::Error> {
    // Unlike compaction, synchronous commit stays on: a redaction undone by a crash after it
    // was acknowledged would bring the data back.
    lock_stream(conn, stream).await?;
    // Read after the lock: no compaction or redaction of the stream is half done.
    let archived: Vec<Segment> = sqlx::query_as(&format!(
        "SELECT {SEGMENT_COLUMNS} FROM mageflow_archive WHERE stream = $1 ORDER BY first_seq"
    ))
    .bind(stream.0)
    .fetch_all(&mut *conn)
    .await?;
    // Every live row of the stream. Appends only add rows above the stream's version, and
    // events appended after this read are not redacted: call this once the events it must
    // cover are committed.
    let rows = live_rows(conn, stream, i64::MAX).await?;

    let all = nodes.is_empty();
    let wanted: std::collections::HashSet<NodeIndex> = nodes.iter().copied().collect();
    let selected = |n: NodeIndex| all || wanted.contains(&n);
    let plan = match blocking(|| plan_redaction(stream, &archived, &rows, &selected)) {
        Ok(plan) => plan,
        Err(e) => return Ok(Err(e)),
    };

    let dropped = sqlx::query("DELETE FROM mageflow_snapshot WHERE stream = $1")
        .bind(stream.0)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    let mut stats = RedactStats {
        events_rewritten: 0,
        archived_rewritten: plan.archived_changed,
        snapshot_dropped: dropped > 0,
    };
    for (h, segment) in &plan.segments {
        sqlx::query(
            "UPDATE mageflow_archive SET segment = $3, raw_bytes = $4, crc32 = $5 \
             WHERE stream = $1 AND first_seq = $2",
        )
        .bind(stream.0)
        .bind(h.first_seq as i64)
        .bind(segment)
        .bind(h.raw_bytes as i64)
        .bind(h.crc32 as i32)
        .execute(&mut *conn)
        .await?;
    }
    if !plan.rows.is_empty() {
        let mut positions = Vec::with_capacity(plan.rows.len());
        let mut payloads = Vec::with_capacity(plan.rows.len());
        let mut crcs = Vec::with_capacity(plan.rows.len());
        for (position, payload, crc) in plan.rows {
            positions.push(position);
            payloads.push(payload);
            crcs.push(crc);
        }
        let updated = sqlx::query(
            "UPDATE mageflow_events AS e SET payload = u.payload, crc32 = u.crc32 \
             FROM UNNEST($2::bigint[], $3::bytea[], $4::integer[]) AS u(position, payload, crc32) \
             WHERE e.position = u.position AND e.stream = $1",
        )
        .bind(stream.0)
        .bind(&positions)
        .bind(&payloads)
        .bind(&crcs)
        .execute(&mut *conn)
        .await?
        .rows_affected();
        if updated != positions.len() as u64 {
            // Cannot happen while rows are only ever removed under the same lock.
            return Ok(Err(Error::Storage(format!(
                "redaction of stream {stream}: {} live events to rewrite but {updated} rows \
                 matched; rolled back",
                positions.len()
            ))));
        }
        stats.events_rewritten = updated;
    }
    Ok(Ok(stats))
}

/// Redact the stream's archived events (checked like a read, segments dense from seq 1) then
/// its live rows (checked like a read, seqs continuing densely after the archive), in seq
/// order. Unchanged events keep their stored bytes; unchanged segments are not rewritten.
fn plan_redaction(
    stream: WorkflowId,
    archived: &[Segment],
    rows: &[Row],
    selected: &dyn Fn(NodeIndex) -> bool,
) -> Result<RedactPlan> {
    let mut redactor = Redactor::new(selected);
    let mut plan = RedactPlan::default();
    let mut last_seq = 0u64;
    for row in archived {
        let h = header(stream, row)?;
        if h.first_seq != last_seq + 1 {
            return Err(corrupt(
                stream,
                format!(
                    "a segment starts at seq {} where seq {} was expected",
                    h.first_seq,
                    last_seq + 1
                ),
            ));
        }
        last_seq = h.last_seq();
        let rewritten = segment::redact(stream, &h, &row.4, &mut redactor)?;
        if let Some((h, bytes, changed)) = rewritten {
            plan.archived_changed += changed;
            plan.segments.push((h, bytes));
        }
    }
    for row in rows {
        let r = decode_row(row)?;
        if r.event.seq != last_seq + 1 {
            return Err(Error::Corrupt(format!(
                "stream {stream}: event at position {} has seq {}, but the stream's previous \
                 event (archived or live) has seq {last_seq}",
                r.position, r.event.seq
            )));
        }
        last_seq += 1;
        if let Some(payload) = mageflow_store::redact_encoded(&mut redactor, r.event)? {
            let crc = crc32fast::hash(&payload) as i32;
            plan.rows.push((row.0, payload, crc));
        }
    }
    Ok(plan)
}

/// Check a whole archive row for `verify`: everything a read checks, for every event. Returns
/// the number of events.
pub(crate) fn check_segment(stream: WorkflowId, row: &Segment) -> Result<u64> {
    Ok(decode_segment(stream, row, 1)?.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mageflow_core::{codec, Actor, Payload, SCHEMA_VERSION};

    fn event(stream: WorkflowId, seq: u64) -> Event {
        Event {
            stream,
            seq,
            at: Timestamp::from_micros(1_700_000_000_000_000 + seq as i64),
            actor: Actor::worker("t"),
            schema: SCHEMA_VERSION,
            payload: Payload::KwargsUpdated {
                node: 0,
                kwargs: serde_json::json!({ "seq": seq }),
            },
        }
    }

    fn segment_of(stream: WorkflowId, n: u64) -> Result<Segment> {
        let mut raw = Vec::new();
        for seq in 1..=n {
            let bytes =
                codec::encode(&event(stream, seq)).map_err(|e| Error::Storage(e.to_string()))?;
            raw.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
            raw.extend_from_slice(&bytes);
        }
        let segment = segment::compress(stream, &raw)?.0;
        let crc = crc32fast::hash(&segment) as i32;
        Ok((1, n as i64, n as i64, raw.len() as i64, segment, crc))
    }

    #[test]
    fn segments_round_trip_and_damage_is_typed() -> Result<()> {
        let s = WorkflowId::from_u128(7);
        let row = segment_of(s, 5)?;
        let events = decode_segment(s, &row, 1)?;
        assert_eq!(events, (1..=5).map(|q| event(s, q)).collect::<Vec<_>>());
        assert_eq!(decode_segment(s, &row, 4)?.len(), 2);
        assert_eq!(decode_segment(s, &row, 9)?.len(), 0);

        let mut bad_crc = row.clone();
        bad_crc.5 ^= 1;
        let mut bad_zstd = row.clone();
        bad_zstd.4 = vec![1, 2, 3];
        bad_zstd.5 = crc32fast::hash(&bad_zstd.4) as i32;
        let mut bad_count = row.clone();
        bad_count.1 = 6;
        bad_count.2 = 6;
        let mut bad_size = row.clone();
        bad_size.3 += 1;
        let mut bad_seqs = row.clone();
        bad_seqs.0 = 2;
        let other = WorkflowId::from_u128(8);
        let wrong_stream = segment_of(other, 5)?;
        for (name, stream, row) in [
            ("crc", s, &bad_crc),
            ("zstd", s, &bad_zstd),
            ("count", s, &bad_count),
            ("size", s, &bad_size),
            ("seqs", s, &bad_seqs),
            ("stream", s, &wrong_stream),
        ] {
            match decode_segment(stream, row, 1) {
                Err(Error::Corrupt(m)) => assert!(m.contains(&s.to_string()), "{name}: {m}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        // Bytes that are not events, with a valid frame and checksum.
        let raw = [3u8, 0, 0, 0, 0xc1, 0xc1, 0xc1];
        let segment = segment::compress(s, &raw)?.0;
        let crc = crc32fast::hash(&segment) as i32;
        let garbage: Segment = (1, 1, 1, raw.len() as i64, segment, crc);
        assert!(matches!(
            decode_segment(s, &garbage, 1),
            Err(Error::Corrupt(_))
        ));
        Ok(())
    }
}
