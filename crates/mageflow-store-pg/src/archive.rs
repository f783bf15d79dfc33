//! Cold storage: [`crate::PgLog::compact`] moves a stream's oldest events out of
//! `mageflow_events` into one row of `mageflow_archive` (`migrations/0002_archive.sql`), a
//! zstd-compressed *segment*, and the reads put them back in front of the live rows.
//!
//! **Segment format.** The concatenation, in seq order, of every archived event of the stream as
//! a 4-byte little-endian length followed by the event's codec bytes (exactly the payload its
//! `mageflow_events` row held: events are never re-encoded, except by a redaction), compressed with zstd. The row
//! keeps the uncompressed size (`raw_bytes`), the number of events, their seqs (always
//! `1..=last_seq`), the CRC-32 of the compressed bytes and the highest position archived.
//! Every read checks all of it: CRC, decompression (bounded by `raw_bytes`), framing, event
//! count, decoding and each event's stream and seq; damage is `Error::Corrupt` naming the
//! stream, never a panic.
//!
//! **Locking.** A compaction runs in one READ COMMITTED transaction holding a transaction-level
//! advisory lock keyed by (schema, stream). Why not the committer's head row lock: compaction
//! never changes a stream's version nor assigns positions, so it need not be ordered with
//! appends, and taking the head lock would stall every append of every process for the length
//! of a compression. What it must exclude is a second compaction of the same stream (both would
//! read the same archive row and live rows and the second would overwrite the first's merge):
//! the per-stream advisory lock does that, and is taken before anything is read, so the second
//! one reads what the first committed. A row lock on the archive row cannot serve: the first
//! compaction of a stream has no row to lock yet. Appends are safe without a lock: the
//! committer only inserts seqs above the stream's version, while compaction only reads and
//! deletes committed seqs at or below it; each compaction commits its archive row and its
//! DELETE atomically, so any single statement (the committer's version probe, `read_stream`,
//! `stream_version`) sees the stream's events either all live or moved, never half.
//!
//! **Redaction.** [`crate::PgLog::redact`] drops the task data of some (or all) signatures of
//! a workflow from its stream for good (`mageflow_core::Payload::redact`: kwargs, messages,
//! results, checkpoints, error messages), keeping the audit trail: every event stays, at its
//! position and seq, with its kind, time, actor, node, attempt and status. In one transaction
//! holding the same per-stream advisory lock as compaction (so it never interleaves with a
//! compaction of the stream), it reads the archive row and every live row of the stream,
//! checks them like a read, redacts them in seq order, rewrites the live rows whose event
//! changed (payload and CRC, by position) and, if an archived event changed, the segment
//! (re-encoded frames for the changed events, the stored bytes for the others, recompressed,
//! new CRC and raw size); it sets the archive row's snapshot to NULL (a snapshot is a state,
//! with the task data in it). Positions, seqs, versions, row counts and the head do not
//! change, so appends, version checks, `verify` and readers are unaffected. Its commit is
//! synchronous (unlike compaction's): an acknowledged redaction stays done.

use crate::copy::{decode_row, Row};
use mageflow_core::{codec, Event, NodeIndex, Redactor, Timestamp, WorkflowId};
use mageflow_store::{segment, Error, Result};
use sqlx::postgres::PgPool;
use sqlx::PgConnection;

pub use mageflow_store::segment::{ArchiveInfo, CompactStats, ARCHIVE_RAW_BYTES_MAX, ZSTD_LEVEL};

/// An archive row as read for decoding: (first_seq, last_seq, events, raw_bytes, segment,
/// crc32).
pub(crate) type Segment = (i64, i64, i64, i64, Vec<u8>, i32);

/// An archive row as compaction and `verify` read it: [`Segment`]'s columns, then
/// `last_position`.
pub(crate) type ArchiveRow = (i64, i64, i64, i64, Vec<u8>, i32, i64);

/// Columns of [`Segment`], in order.
pub(crate) const SEGMENT_COLUMNS: &str = "first_seq, last_seq, events, raw_bytes, segment, crc32";

pub(crate) const INFO_QUERY: &str = "SELECT first_seq, last_seq, events, raw_bytes, \
     octet_length(segment)::bigint, last_position, octet_length(snapshot)::bigint, \
     (extract(epoch FROM compacted_at) * 1000000)::bigint \
     FROM mageflow_archive WHERE stream = $1";

pub(crate) type InfoRow = (i64, i64, i64, i64, i64, i64, Option<i64>, i64);

pub(crate) fn info_from_row(row: InfoRow) -> ArchiveInfo {
    let (first_seq, last_seq, events, raw, compressed, last_position, snapshot, at) = row;
    ArchiveInfo {
        first_seq: first_seq as u64,
        last_seq: last_seq as u64,
        events: events as u64,
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

/// Check an archive row's header, then its segment's CRC, and decompress it (bounded by the
/// row's `raw_bytes`).
pub(crate) fn raw_segment(stream: WorkflowId, row: &Segment) -> Result<Vec<u8>> {
    let (first_seq, last_seq, events, raw_bytes, segment, crc) = row;
    if *first_seq != 1 || *last_seq < *first_seq || *events != *last_seq - *first_seq + 1 {
        return Err(corrupt(
            stream,
            format!("row says seqs {first_seq}..={last_seq} and {events} events"),
        ));
    }
    let raw_bytes = u64::try_from(*raw_bytes)
        .map_err(|_| corrupt(stream, format!("row says {raw_bytes} raw bytes")))?;
    segment::raw_segment(stream, raw_bytes, *crc as u32, segment)
}

/// Decode a stored archive segment of `stream` with the row's `events`, `raw_bytes` and
/// `crc32` columns: every check a read makes (checksum, bounded decompression, framing, event
/// decoding, stream and seqs). For the fuzz target and tools; damaged input is an
/// `Error::Corrupt`, never a panic.
pub fn decode_archive_segment(
    stream: WorkflowId,
    events: u64,
    raw_bytes: u64,
    crc32: u32,
    segment: &[u8],
) -> Result<Vec<Event>> {
    segment::decode_segment(stream, events, raw_bytes, crc32, segment, 1)
}

/// The archived events of `stream` with `seq >= from_seq`, checked.
pub(crate) fn decode_segment(
    stream: WorkflowId,
    row: &Segment,
    from_seq: u64,
) -> Result<Vec<Event>> {
    let raw = raw_segment(stream, row)?;
    let frames = segment::frames(stream, &raw, row.2 as u64)?;
    let skip = from_seq.saturating_sub(1).min(frames.len() as u64) as usize;
    frames
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(i, frame)| segment::decode_frame(stream, 1 + i as u64, frame))
        .collect()
}

fn compress(stream: WorkflowId, raw: &[u8]) -> Result<Vec<u8>> {
    Ok(segment::compress(stream, raw)?.0)
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
    let archived: Option<ArchiveRow> = sqlx::query_as(&format!(
        "SELECT {SEGMENT_COLUMNS}, last_position FROM mageflow_archive WHERE stream = $1"
    ))
    .bind(stream.0)
    .fetch_optional(&mut *conn)
    .await?;
    let rows = live_rows(conn, stream, up_to).await?;

    if rows.is_empty() {
        let Some((.., raw_bytes, segment, _, _)) = &archived else {
            // Nothing archived, nothing to archive: no row (a snapshot alone is not kept).
            return Ok(Ok(CompactStats::default()));
        };
        if let Some(snapshot) = snapshot {
            sqlx::query("UPDATE mageflow_archive SET snapshot = $2 WHERE stream = $1")
                .bind(stream.0)
                .bind(snapshot)
                .execute(&mut *conn)
                .await?;
        }
        return Ok(Ok(CompactStats {
            events: 0,
            raw_bytes: *raw_bytes as u64,
            compressed_bytes: segment.len() as u64,
        }));
    }

    let built = blocking(|| build_segment(stream, archived.as_ref(), &rows));
    let (raw_len, segment, last_seq, events, last_position) = match built {
        Ok(b) => b,
        Err(e) => return Ok(Err(e)),
    };
    let crc = crc32fast::hash(&segment) as i32;
    sqlx::query(
        "INSERT INTO mageflow_archive (stream, first_seq, last_seq, events, raw_bytes, segment, \
         crc32, snapshot, last_position, compacted_at) \
         VALUES ($1, 1, $2, $3, $4, $5, $6, $7, $8, now()) \
         ON CONFLICT (stream) DO UPDATE SET last_seq = EXCLUDED.last_seq, \
         events = EXCLUDED.events, raw_bytes = EXCLUDED.raw_bytes, segment = EXCLUDED.segment, \
         crc32 = EXCLUDED.crc32, \
         snapshot = COALESCE(EXCLUDED.snapshot, mageflow_archive.snapshot), \
         last_position = EXCLUDED.last_position, compacted_at = now()",
    )
    .bind(stream.0)
    .bind(last_seq)
    .bind(events)
    .bind(raw_len as i64)
    .bind(&segment)
    .bind(crc)
    .bind(snapshot)
    .bind(last_position)
    .execute(&mut *conn)
    .await?;
    let moved = rows.len() as u64;
    let deleted = sqlx::query("DELETE FROM mageflow_events WHERE stream = $1 AND seq <= $2")
        .bind(stream.0)
        .bind(last_seq)
        .execute(&mut *conn)
        .await?
        .rows_affected();
    if deleted != moved {
        // Cannot happen while appends only add seqs above the version and compactions of the
        // stream are serialised; refuse rather than lose or duplicate anything.
        return Ok(Err(Error::Storage(format!(
            "compaction of stream {stream}: read {moved} live events but would delete {deleted}; \
             rolled back"
        ))));
    }
    Ok(Ok(CompactStats {
        events: moved,
        raw_bytes: raw_len as u64,
        compressed_bytes: segment.len() as u64,
    }))
}

/// The merged segment: the archived events (checked: CRC, size, framing) followed by the live
/// `rows` (checked like every read: CRC, decoding, stream and seq, dense after the archive).
/// Returns (raw length, compressed segment, last seq, events, last position).
fn build_segment(
    stream: WorkflowId,
    archived: Option<&ArchiveRow>,
    rows: &[Row],
) -> Result<(usize, Vec<u8>, i64, i64, i64)> {
    let (mut raw, mut last_seq, mut last_position) = match archived {
        Some((first, last, events, raw_bytes, segment, crc, last_position)) => {
            let row: Segment = (*first, *last, *events, *raw_bytes, segment.clone(), *crc);
            let raw = raw_segment(stream, &row)?;
            segment::frames(stream, &raw, *events as u64)?;
            (raw, *last as u64, *last_position as u64)
        }
        None => (Vec::new(), 0, 0),
    };
    for row in rows {
        let r = decode_row(row)?;
        if r.event.seq != last_seq + 1 {
            return Err(Error::Corrupt(format!(
                "stream {stream}: event at position {} has seq {}, but the stream's previous \
                 event (archived or live) has seq {last_seq}",
                r.position, r.event.seq
            )));
        }
        segment::push_frame(stream, &mut raw, &row.3)?;
        last_seq += 1;
        last_position = last_position.max(r.position);
    }
    let segment = compress(stream, &raw)?;
    Ok((
        raw.len(),
        segment,
        last_seq as i64,
        last_seq as i64,
        last_position as i64,
    ))
}

/// What one [`crate::PgLog::redact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedactStats {
    /// Live rows of `mageflow_events` whose payload (and CRC) were rewritten.
    pub events_rewritten: u64,
    /// Events of the stream's archive segment that were rewritten (the segment is re-encoded
    /// and recompressed if this is not 0).
    pub archived_rewritten: u64,
    /// The archive row's snapshot was dropped (set to NULL: it holds task data).
    pub snapshot_dropped: bool,
}

/// An archive row as a redaction reads it: [`Segment`]'s columns, then whether it has a
/// snapshot.
type RedactArchiveRow = (i64, i64, i64, i64, Vec<u8>, i32, bool);

/// A live row rewritten by a redaction: (position, payload, crc32).
type Rewrite = (i64, Vec<u8>, i32);

/// What a redaction writes: the new segment (raw length, compressed bytes) if any archived
/// event changed, how many did, and the live rows to rewrite.
#[derive(Default)]
struct RedactPlan {
    segment: Option<(usize, Vec<u8>)>,
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
    let archived: Option<RedactArchiveRow> = sqlx::query_as(&format!(
        "SELECT {SEGMENT_COLUMNS}, snapshot IS NOT NULL FROM mageflow_archive WHERE stream = $1"
    ))
    .bind(stream.0)
    .fetch_optional(&mut *conn)
    .await?;
    // Every live row of the stream. Appends only add rows above the stream's version, and
    // events appended after this read are not redacted: call this once the events it must
    // cover are committed.
    let rows = live_rows(conn, stream, i64::MAX).await?;

    let all = nodes.is_empty();
    let wanted: std::collections::HashSet<NodeIndex> = nodes.iter().copied().collect();
    let selected = |n: NodeIndex| all || wanted.contains(&n);
    let segment = archived
        .as_ref()
        .map(|(first, last, events, raw, segment, crc, _)| -> Segment {
            (*first, *last, *events, *raw, segment.clone(), *crc)
        });
    let plan = match blocking(|| plan_redaction(stream, segment.as_ref(), &rows, &selected)) {
        Ok(plan) => plan,
        Err(e) => return Ok(Err(e)),
    };

    let mut stats = RedactStats {
        events_rewritten: 0,
        archived_rewritten: plan.archived_changed,
        snapshot_dropped: archived.as_ref().is_some_and(|a| a.6),
    };
    if let Some((raw_len, segment)) = &plan.segment {
        let crc = crc32fast::hash(segment) as i32;
        sqlx::query(
            "UPDATE mageflow_archive SET segment = $2, raw_bytes = $3, crc32 = $4, \
             snapshot = NULL WHERE stream = $1",
        )
        .bind(stream.0)
        .bind(segment)
        .bind(*raw_len as i64)
        .bind(crc)
        .execute(&mut *conn)
        .await?;
    } else if stats.snapshot_dropped {
        sqlx::query("UPDATE mageflow_archive SET snapshot = NULL WHERE stream = $1")
            .bind(stream.0)
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

fn encode_error(event: &Event, source: codec::CodecError) -> Error {
    Error::Encode {
        stream: event.stream,
        seq: event.seq,
        source,
    }
}

/// Redact the stream's archived events (checked like a read) then its live rows (checked like
/// a read, seqs continuing densely after the archive), in seq order. Unchanged events keep
/// their stored bytes.
fn plan_redaction(
    stream: WorkflowId,
    archived: Option<&Segment>,
    rows: &[Row],
    selected: &dyn Fn(NodeIndex) -> bool,
) -> Result<RedactPlan> {
    let mut redactor = Redactor::new(selected);
    let mut plan = RedactPlan::default();
    let mut last_seq = 0u64;
    if let Some(row) = archived {
        let raw = raw_segment(stream, row)?;
        let frames = segment::frames(stream, &raw, row.2 as u64)?;
        let mut rewritten = Vec::with_capacity(raw.len());
        for (i, frame) in frames.iter().enumerate() {
            let mut event = segment::decode_frame(stream, 1 + i as u64, frame)?;
            let start = rewritten.len();
            rewritten.extend_from_slice(&[0; 4]);
            if redactor.redact(&mut event) {
                codec::encode_into(&event, &mut rewritten).map_err(|e| encode_error(&event, e))?;
                plan.archived_changed += 1;
            } else {
                rewritten.extend_from_slice(frame);
            }
            let len = (rewritten.len() - start - 4) as u32;
            rewritten[start..start + 4].copy_from_slice(&len.to_le_bytes());
            if rewritten.len() as u64 > ARCHIVE_RAW_BYTES_MAX {
                return Err(Error::Storage(format!(
                    "redaction of stream {stream}: its segment would exceed \
                     {ARCHIVE_RAW_BYTES_MAX} bytes; nothing was changed"
                )));
            }
        }
        last_seq = frames.len() as u64;
        if plan.archived_changed > 0 {
            plan.segment = Some((rewritten.len(), compress(stream, &rewritten)?));
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
        let mut event = r.event;
        if redactor.redact(&mut event) {
            let payload = codec::encode(&event).map_err(|e| encode_error(&event, e))?;
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
    use mageflow_core::{Actor, Payload, SCHEMA_VERSION};

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
        let segment = compress(stream, &raw)?;
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
        let segment = compress(s, &raw)?;
        let crc = crc32fast::hash(&segment) as i32;
        let garbage: Segment = (1, 1, 1, raw.len() as i64, segment, crc);
        assert!(matches!(
            decode_segment(s, &garbage, 1),
            Err(Error::Corrupt(_))
        ));
        Ok(())
    }
}
