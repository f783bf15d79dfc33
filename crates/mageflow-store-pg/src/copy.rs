//! The rows of `mageflow_events` as PostgreSQL's binary `COPY` format, which is how the committer
//! writes them (one `COPY ... FROM STDIN (FORMAT binary)` per group commit), and the check of a
//! row read back. Appenders encode their events into tuples on their own threads, leaving the
//! position blank; the committer only copies the tuples into one buffer and fills positions in.
//! Public so that benchmarks and tools produce exactly the bytes the log writes.

use mageflow_core::{codec, Event, WorkflowId};
use mageflow_store::{Error, Recorded, Result};

/// The columns a tuple carries, in order (`recorded_at` takes its default).
pub const COPY_COLUMNS: &str = "position, stream, seq, payload, crc32";

/// Binary COPY signature, flags (no OIDs) and header extension length (none).
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// Field count −1 ends the data.
const TRAILER: [u8; 2] = (-1i16).to_be_bytes();
const FIELDS: i16 = 5;
/// Where the position's 8 bytes sit in a tuple: after the field count (2) and its length (4).
const POSITION_AT: usize = 2 + 4;
/// Where the payload's length sits: after position, stream and seq with their lengths.
const PAYLOAD_LEN_AT: usize = POSITION_AT + 8 + 4 + 16 + 4 + 8;

/// `COPY <table> (columns) FROM STDIN (FORMAT binary)`.
pub fn copy_statement(table: &str) -> String {
    format!("COPY {table} ({COPY_COLUMNS}) FROM STDIN (FORMAT binary)")
}

/// Encoded tuples of consecutive events, positions still blank.
#[derive(Debug, Default)]
pub struct Tuples {
    bytes: Vec<u8>,
    /// Start of each tuple in `bytes`.
    starts: Vec<usize>,
}

impl Tuples {
    /// Room for `events` small events (at most 4096 reserved up front).
    pub fn with_capacity(events: usize) -> Self {
        let events = events.min(4096);
        Self {
            bytes: Vec::with_capacity(events * 256),
            starts: Vec::with_capacity(events),
        }
    }

    /// Encode `event` (with `mageflow_core::codec`) as the next tuple.
    pub fn push(&mut self, event: &Event) -> Result<()> {
        let start = self.begin(event.stream, event.seq);
        let encoded = codec::encode_into(event, &mut self.bytes);
        if let Err(source) = encoded {
            self.bytes.truncate(start);
            return Err(Error::Encode {
                stream: event.stream,
                seq: event.seq,
                source,
            });
        }
        self.end(start);
        Ok(())
    }

    /// Add a tuple of an event already encoded (`payload`).
    pub fn push_encoded(&mut self, stream: WorkflowId, seq: u64, payload: &[u8]) {
        let start = self.begin(stream, seq);
        self.bytes.extend_from_slice(payload);
        self.end(start);
    }

    /// Field count, blank position, stream, seq, and a blank length for the payload to follow.
    fn begin(&mut self, stream: WorkflowId, seq: u64) -> usize {
        let start = self.bytes.len();
        let b = &mut self.bytes;
        b.extend_from_slice(&FIELDS.to_be_bytes());
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&[0; 8]);
        b.extend_from_slice(&16i32.to_be_bytes());
        b.extend_from_slice(stream.as_bytes());
        b.extend_from_slice(&8i32.to_be_bytes());
        b.extend_from_slice(&(seq as i64).to_be_bytes());
        b.extend_from_slice(&[0; 4]);
        start
    }

    /// Fill in the payload's length, append its checksum, and record the tuple.
    fn end(&mut self, start: usize) {
        let len_at = start + PAYLOAD_LEN_AT;
        let b = &mut self.bytes;
        let payload = &b[len_at + 4..];
        let crc = crc32fast::hash(payload);
        let len = payload.len() as i32;
        b[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&4i32.to_be_bytes());
        b.extend_from_slice(&(crc as i32).to_be_bytes());
        self.starts.push(start);
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    /// Encoded size in bytes.
    pub fn bytes_len(&self) -> usize {
        self.bytes.len()
    }

    /// Each tuple's encoded event, in order.
    pub(crate) fn payloads(&self) -> impl Iterator<Item = &[u8]> {
        self.rows().map(|(payload, _)| payload)
    }

    /// Each tuple's encoded event and its CRC-32 column, in order.
    pub(crate) fn rows(&self) -> impl Iterator<Item = (&[u8], i32)> {
        let int = |at: usize| {
            let mut b = [0; 4];
            b.copy_from_slice(&self.bytes[at..at + 4]);
            i32::from_be_bytes(b)
        };
        self.starts.iter().map(move |&start| {
            let len_at = start + PAYLOAD_LEN_AT;
            let end = len_at + 4 + int(len_at) as usize;
            // After the payload: the CRC's length (4), then the CRC.
            (&self.bytes[len_at + 4..end], int(end + 4))
        })
    }
}

/// One `COPY` data stream: header, tuples with their positions filled in, trailer.
#[derive(Debug)]
pub struct CopyData {
    buf: Vec<u8>,
    rows: u64,
}

impl CopyData {
    pub fn with_capacity(bytes: usize) -> Self {
        let mut buf = Vec::with_capacity(bytes + HEADER.len() + TRAILER.len());
        buf.extend_from_slice(HEADER);
        Self { buf, rows: 0 }
    }

    /// Append `tuples`, numbering them from `first_position`.
    pub fn extend(&mut self, tuples: &Tuples, first_position: u64) {
        let base = self.buf.len();
        self.buf.extend_from_slice(&tuples.bytes);
        for (i, start) in tuples.starts.iter().enumerate() {
            let at = base + start + POSITION_AT;
            let position = (first_position + i as u64) as i64;
            self.buf[at..at + 8].copy_from_slice(&position.to_be_bytes());
        }
        self.rows += tuples.len() as u64;
    }

    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// The bytes to send, trailer included.
    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&TRAILER);
        self.buf
    }
}

/// A row of `mageflow_events` as read back: (position, stream, seq, payload, crc32).
pub(crate) type Row = (i64, uuid::Uuid, i64, Vec<u8>, i32);

/// Check and decode a row read back from untrusted storage, naming its position in every error.
pub(crate) fn decode_row(row: &Row) -> Result<Recorded> {
    let (position, stream, seq, payload, stored) = row;
    let computed = crc32fast::hash(payload) as i32;
    if computed != *stored {
        return Err(Error::Corrupt(format!(
            "event at position {position} fails its checksum (stored {:08x}, computed {:08x}): altered bytes",
            *stored as u32, computed as u32
        )));
    }
    let event = codec::decode(payload).map_err(|e| {
        Error::Corrupt(format!("event at position {position} does not decode: {e}"))
    })?;
    if event.stream.0 != *stream || event.seq != *seq as u64 {
        return Err(Error::Corrupt(format!(
            "event at position {position} is {} seq {}, but its row says {stream} seq {seq}",
            event.stream, event.seq
        )));
    }
    Ok(Recorded {
        position: *position as u64,
        event,
    })
}
