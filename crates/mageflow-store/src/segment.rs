//! Archive segments: how every backend stores a compacted stream's events (cold storage).
//!
//! **Format.** The concatenation, in seq order, of the archived events of one stream (always
//! seqs `1..=n`) as a 4-byte little-endian length followed by the event's codec bytes (exactly
//! the bytes the live log held: events are never re-encoded by a compaction, only by a
//! redaction), compressed with zstd. Beside it the backend keeps the number of events, the
//! uncompressed size and a CRC-32 of the compressed bytes. Every read checks all of it —
//! checksum, bounded decompression, framing, event count, decoding, each event's stream and
//! seq — and damage is `Error::Corrupt` naming the stream, never a panic.

use crate::{Error, Result};
use mageflow_core::{codec, Event, Timestamp, WorkflowId};
use std::io::Read;

/// Largest uncompressed segment a compaction writes (a read holds the whole segment in
/// memory). A compaction that would exceed it fails with `Error::Storage` and changes nothing.
pub const ARCHIVE_RAW_BYTES_MAX: u64 = 256 * 1024 * 1024;

/// zstd level of the segments: the library's default, a good ratio at several hundred MB/s.
pub const ZSTD_LEVEL: i32 = 3;

/// What one compaction of a stream did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Events this call moved out of the live log (0: nothing to move).
    pub events: u64,
    /// Uncompressed size of the stream's whole segment after this call (all its archived
    /// events, not only the ones this call moved); 0 if the stream has no archive.
    pub raw_bytes: u64,
    /// Stored (compressed) size of that segment.
    pub compressed_bytes: u64,
}

/// A stream's archive, as a backend describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// Archived seqs are `first_seq..=last_seq` (`first_seq` is always 1).
    pub first_seq: u64,
    pub last_seq: u64,
    pub events: u64,
    /// Segment size before compression.
    pub raw_bytes: u64,
    /// Segment size as stored.
    pub compressed_bytes: u64,
    /// Highest global position among the archived events.
    pub last_position: u64,
    pub has_snapshot: bool,
    /// Size of the snapshot, if any.
    pub snapshot_bytes: Option<u64>,
    /// When the last compaction of the stream committed.
    pub compacted_at: Timestamp,
}

fn corrupt(stream: WorkflowId, what: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("archive of stream {stream}: {what}"))
}

/// Check a stored segment's CRC and decompress it, never to more than its stated `raw_bytes`
/// (so a damaged segment cannot make a read allocate without bound).
pub fn raw_segment(
    stream: WorkflowId,
    raw_bytes: u64,
    crc32: u32,
    segment: &[u8],
) -> Result<Vec<u8>> {
    if raw_bytes > ARCHIVE_RAW_BYTES_MAX {
        return Err(corrupt(stream, format!("says {raw_bytes} raw bytes")));
    }
    let computed = crc32fast::hash(segment);
    if computed != crc32 {
        return Err(corrupt(
            stream,
            format!(
                "segment fails its checksum (stored {crc32:08x}, computed {computed:08x}): \
                 altered bytes"
            ),
        ));
    }
    let mut raw = Vec::with_capacity(raw_bytes.min(64 * 1024 * 1024) as usize);
    zstd::stream::read::Decoder::new(segment)
        .and_then(|d| d.take(raw_bytes + 1).read_to_end(&mut raw))
        .map_err(|e| corrupt(stream, format!("segment does not decompress: {e}")))?;
    if raw.len() as u64 != raw_bytes {
        return Err(corrupt(
            stream,
            format!(
                "segment decompresses to {} bytes, its header says {raw_bytes}",
                raw.len()
            ),
        ));
    }
    Ok(raw)
}

/// Split a decompressed segment into its events' bytes; exactly `events` frames.
pub fn frames(stream: WorkflowId, raw: &[u8], events: u64) -> Result<Vec<&[u8]>> {
    let mut out = Vec::with_capacity(events.min(1 << 20) as usize);
    let mut rest = raw;
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<4>() else {
            return Err(corrupt(stream, "segment ends inside a length prefix"));
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(corrupt(
                stream,
                format!(
                    "event {} of the segment claims {len} bytes, {} remain",
                    out.len() + 1,
                    tail.len()
                ),
            ));
        }
        let (frame, tail) = tail.split_at(len);
        out.push(frame);
        rest = tail;
    }
    if out.len() as u64 != events {
        return Err(corrupt(
            stream,
            format!(
                "segment holds {} events, its header says {events}",
                out.len()
            ),
        ));
    }
    Ok(out)
}

/// Decode one archived event, checking it is `stream`'s event `seq`.
pub fn decode_frame(stream: WorkflowId, seq: u64, frame: &[u8]) -> Result<Event> {
    let event = codec::decode(frame)
        .map_err(|e| corrupt(stream, format!("event with seq {seq} does not decode: {e}")))?;
    if event.stream != stream || event.seq != seq {
        return Err(corrupt(
            stream,
            format!(
                "event with seq {seq} decodes as {} seq {}",
                event.stream, event.seq
            ),
        ));
    }
    Ok(event)
}

/// The archived events of `stream` with `seq >= from_seq` from a stored segment of `events`
/// events: every check a read makes.
pub fn decode_segment(
    stream: WorkflowId,
    events: u64,
    raw_bytes: u64,
    crc32: u32,
    segment: &[u8],
    from_seq: u64,
) -> Result<Vec<Event>> {
    let raw = raw_segment(stream, raw_bytes, crc32, segment)?;
    let frames = frames(stream, &raw, events)?;
    let skip = from_seq.saturating_sub(1).min(frames.len() as u64) as usize;
    frames
        .iter()
        .enumerate()
        .skip(skip)
        .map(|(i, frame)| decode_frame(stream, 1 + i as u64, frame))
        .collect()
}

/// Append one event's stored bytes to a raw segment, refusing to grow past
/// [`ARCHIVE_RAW_BYTES_MAX`].
pub fn push_frame(stream: WorkflowId, raw: &mut Vec<u8>, event: &[u8]) -> Result<()> {
    let too_big = || {
        Error::Storage(format!(
            "compaction of stream {stream}: its segment would exceed \
             {ARCHIVE_RAW_BYTES_MAX} bytes; nothing was moved"
        ))
    };
    let len = u32::try_from(event.len()).map_err(|_| too_big())?;
    if (raw.len() + 4 + event.len()) as u64 > ARCHIVE_RAW_BYTES_MAX {
        return Err(too_big());
    }
    raw.extend_from_slice(&len.to_le_bytes());
    raw.extend_from_slice(event);
    Ok(())
}

/// Compress a raw segment; returns the stored bytes and their CRC-32.
pub fn compress(stream: WorkflowId, raw: &[u8]) -> Result<(Vec<u8>, u32)> {
    let segment = zstd::bulk::compress(raw, ZSTD_LEVEL)
        .map_err(|e| Error::Storage(format!("cannot compress the archive of {stream}: {e}")))?;
    let crc = crc32fast::hash(&segment);
    Ok((segment, crc))
}
