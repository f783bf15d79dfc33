//! Archive segments: how every backend stores a compacted stream's events (cold storage).
//!
//! A stream's archive is a run of segments covering its seqs `1..=n` densely, each segment a
//! range `first_seq..=last_seq`. A compaction appends segments for the events it moves (it never
//! rewrites the ones before: compacting a long-running workflow again and again costs what it
//! moves, not what was moved before), closing a segment once it holds
//! [`SEGMENT_TARGET_BYTES`]; so memory per segment stays bounded however large the workflow.
//!
//! **Format of a segment.** The concatenation, in seq order, of its events as a 4-byte
//! little-endian length followed by the event's codec bytes (exactly the bytes the live log
//! held: events are never re-encoded by a compaction, only by a redaction), compressed with
//! zstd. Beside it the backend keeps its first seq, number of events, uncompressed size and a
//! CRC-32 of the compressed bytes. Every read checks all of it — checksum, bounded
//! decompression, framing, event count, decoding, each event's stream and seq — and damage is
//! `Error::Corrupt` naming the stream, never a panic.

use crate::{Error, Result};
use mageflow_core::{codec, Event, Timestamp, WorkflowId};
use std::io::Read;

/// A compaction closes a segment once its uncompressed size reaches this.
pub const SEGMENT_TARGET_BYTES: u64 = 8 * 1024 * 1024;

/// Largest uncompressed segment a read accepts (what a closed segment can reach: the target,
/// plus one event of up to `mageflow_core::EVENT_BYTES_MAX` and its length prefix, with room
/// to spare). A read holds one segment in memory at a time.
pub const SEGMENT_RAW_BYTES_MAX: u64 = 64 * 1024 * 1024;

/// zstd level of the segments: the library's default, a good ratio at several hundred MB/s.
pub const ZSTD_LEVEL: i32 = 3;

/// What one compaction of a stream did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Events this call moved out of the live log (0: nothing to move).
    pub events: u64,
    /// Segments this call wrote.
    pub segments: u64,
    /// Uncompressed size of the segments this call wrote.
    pub raw_bytes: u64,
    /// Stored (compressed) size of those segments.
    pub compressed_bytes: u64,
}

/// A stream's archive, as a backend describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveInfo {
    /// Archived seqs are `first_seq..=last_seq` (`first_seq` is always 1).
    pub first_seq: u64,
    pub last_seq: u64,
    pub events: u64,
    /// Number of segments.
    pub segments: u64,
    /// Size of the segments before compression.
    pub raw_bytes: u64,
    /// Size of the segments as stored.
    pub compressed_bytes: u64,
    /// Highest global position among the archived events.
    pub last_position: u64,
    pub has_snapshot: bool,
    /// Size of the snapshot, if any.
    pub snapshot_bytes: Option<u64>,
    /// When the last segment was written.
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
    if raw_bytes > SEGMENT_RAW_BYTES_MAX {
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

/// How a stored segment describes itself (its backend keeps these beside its bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentHeader {
    pub first_seq: u64,
    pub events: u64,
    pub raw_bytes: u64,
    pub crc32: u32,
}

impl SegmentHeader {
    /// Seq of its last event.
    pub fn last_seq(&self) -> u64 {
        self.first_seq + self.events.saturating_sub(1)
    }

    /// Check the header's own shape (seqs from 1, at least one event, size within bounds).
    pub fn check(&self, stream: WorkflowId) -> Result<()> {
        if self.first_seq == 0
            || self.events == 0
            || self.first_seq.checked_add(self.events).is_none()
            || self.raw_bytes > SEGMENT_RAW_BYTES_MAX
        {
            return Err(corrupt(
                stream,
                format!(
                    "a segment says seqs from {}, {} events, {} raw bytes",
                    self.first_seq, self.events, self.raw_bytes
                ),
            ));
        }
        Ok(())
    }

    /// The segment's events with `seq >= from_seq`, decoded from its stored `bytes`: every check
    /// a read makes.
    pub fn decode(&self, stream: WorkflowId, bytes: &[u8], from_seq: u64) -> Result<Vec<Event>> {
        self.check(stream)?;
        let raw = raw_segment(stream, self.raw_bytes, self.crc32, bytes)?;
        let frames = frames(stream, &raw, self.events)?;
        let skip = from_seq
            .saturating_sub(self.first_seq)
            .min(frames.len() as u64) as usize;
        frames
            .iter()
            .enumerate()
            .skip(skip)
            .map(|(i, frame)| decode_frame(stream, self.first_seq + i as u64, frame))
            .collect()
    }
}

/// A segment ready to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Built {
    pub header: SegmentHeader,
    /// Highest global position among its events (0 if the caller gave none).
    pub last_position: u64,
    /// The compressed bytes.
    pub bytes: Vec<u8>,
}

/// Cuts a run of consecutive events of one stream into segments of about
/// [`SEGMENT_TARGET_BYTES`].
pub struct Segmenter {
    stream: WorkflowId,
    first_seq: u64,
    events: u64,
    last_position: u64,
    raw: Vec<u8>,
    done: Vec<Built>,
}

impl Segmenter {
    /// The first event pushed is seq `first_seq` of `stream`.
    pub fn new(stream: WorkflowId, first_seq: u64) -> Self {
        Self {
            stream,
            first_seq,
            events: 0,
            last_position: 0,
            raw: Vec::new(),
            done: Vec::new(),
        }
    }

    /// Add the next event's stored bytes (and its global position, or 0).
    pub fn push(&mut self, event: &[u8], position: u64) -> Result<()> {
        let len = u32::try_from(event.len()).map_err(|_| {
            Error::Storage(format!(
                "compaction of stream {}: an event of {} bytes cannot be archived",
                self.stream,
                event.len()
            ))
        })?;
        self.raw.extend_from_slice(&len.to_le_bytes());
        self.raw.extend_from_slice(event);
        self.events += 1;
        self.last_position = self.last_position.max(position);
        if self.raw.len() as u64 >= SEGMENT_TARGET_BYTES {
            self.close()?;
        }
        Ok(())
    }

    fn close(&mut self) -> Result<()> {
        if self.events == 0 {
            return Ok(());
        }
        let (bytes, crc32) = compress(self.stream, &self.raw)?;
        self.done.push(Built {
            header: SegmentHeader {
                first_seq: self.first_seq,
                events: self.events,
                raw_bytes: self.raw.len() as u64,
                crc32,
            },
            last_position: self.last_position,
            bytes,
        });
        self.first_seq += self.events;
        self.events = 0;
        self.last_position = 0;
        self.raw.clear();
        Ok(())
    }

    /// The segments, in seq order.
    pub fn finish(mut self) -> Result<Vec<Built>> {
        self.close()?;
        Ok(self.done)
    }
}

/// Redact a stored segment: its events go through `redactor` in seq order (the stream's
/// earlier events must have gone through it first); changed ones are re-encoded, the others
/// keep their stored bytes. Returns the new segment and how many events changed (`None` if
/// none did).
pub fn redact(
    stream: WorkflowId,
    header: &SegmentHeader,
    bytes: &[u8],
    redactor: &mut mageflow_core::Redactor<'_>,
) -> Result<Option<(SegmentHeader, Vec<u8>, u64)>> {
    header.check(stream)?;
    let raw = raw_segment(stream, header.raw_bytes, header.crc32, bytes)?;
    let frames = frames(stream, &raw, header.events)?;
    let mut out = Vec::with_capacity(raw.len());
    let mut changed = 0;
    for (i, frame) in frames.iter().enumerate() {
        let event = decode_frame(stream, header.first_seq + i as u64, frame)?;
        let new = crate::redact_encoded(redactor, event)?;
        let bytes = new.as_deref().unwrap_or(frame);
        changed += u64::from(new.is_some());
        out.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        out.extend_from_slice(bytes);
    }
    if changed == 0 {
        return Ok(None);
    }
    let (compressed, crc32) = compress(stream, &out)?;
    let header = SegmentHeader {
        raw_bytes: out.len() as u64,
        crc32,
        ..*header
    };
    Ok(Some((header, compressed, changed)))
}

/// Compress a raw segment; returns the stored bytes and their CRC-32.
pub fn compress(stream: WorkflowId, raw: &[u8]) -> Result<(Vec<u8>, u32)> {
    let segment = zstd::bulk::compress(raw, ZSTD_LEVEL)
        .map_err(|e| Error::Storage(format!("cannot compress the archive of {stream}: {e}")))?;
    let crc = crc32fast::hash(&segment);
    Ok((segment, crc))
}
