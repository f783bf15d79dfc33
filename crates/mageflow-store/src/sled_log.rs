//! Embedded durable log on sled, with group commit.
//!
//! Layout (one sled tree):
//! - `b'b' ++ first_position(u64 BE)` → a block of consecutive events: `crc32(LE u32, over the
//!   rest) ++ count(u32 LE) ++ count × [stream(16 bytes) ++ seq(u64 BE) ++ len(u32 LE) ++
//!   encoded event]`. A group commit is cut into blocks of at most [`BLOCK_EVENTS_MAX`] events
//!   or [`BLOCK_BYTES_MAX`] bytes: one sled insert per block instead of per event (sled's cost is
//!   per key), and positions only grow, so inserts land at the right edge of the tree;
//! - `b'h'` → the last committed position (u64 BE), written with the last chunk of every group;
//! - `b'a' ++ stream(16 bytes) ++ first_seq(u64 BE)` → one segment of the stream's archive
//!   (see *Compaction*);
//! - `b's' ++ stream(16 bytes)` → the snapshot stored by its last compaction: `crc32(LE u32,
//!   over the rest) ++ snapshot bytes`.
//!
//! **Compaction** ([`SledLog::compact`]) moves a stream's oldest events into archive segments
//! (the shared format of [`crate::segment`]: zstd over the events' stored bytes, seqs dense
//! from 1 across a stream's segments), one record per segment: `crc32(LE u32, over the next 36
//! bytes) ++ events(u64 BE) ++ raw_bytes(u64 BE) ++ last_position(u64 BE) ++ compacted_at(i64
//! BE, µs) ++ segment_crc32(LE u32) ++ segment`. In its blocks each moved event's entry keeps its stream and seq but loses its bytes:
//! its length field becomes [`ARCHIVED_LEN`]. Positions stay dense and every check of the
//! headers below still holds; `read_all` skips archived entries, `read_stream` reads the
//! archive first. What an archived event still costs in the live log is its 28-byte entry
//! header (the block is rewritten without its bytes).
//!
//! The block directory (first positions) and the per-stream index (stream → positions) live in
//! memory. They are rebuilt at open from the block headers, which doubles as an integrity check
//! of the whole log: every block's checksum, dense positions, dense sequence numbers per stream,
//! and every archived entry covered by its stream's archive segments (whose headers are checked,
//! seqs dense from 1; `verify` decodes the segments too). Open time is therefore proportional to the number of
//! events, archived or not; compaction shrinks what is read, not the count.
//!
//! Appenders hand their requests to one committer thread. It takes everything waiting (up to
//! [`GROUP_EVENTS_MAX`] events), checks versions, writes the group's blocks in sled batches of at
//! most [`CHUNK_INSERTS_MAX`] keys (sled keeps every intermediate node of a batch alive until the
//! batch ends), writes the head marker last, flushes once, then answers everyone: concurrent
//! appenders share one fsync. A crash between chunks leaves blocks past the head marker; they
//! were never acknowledged and open removes them. Nothing is visible to readers
//! or subscribers before the flush that makes it durable.
//!
//! Beside sled, `mageflow.head` records the last durable position after each flush (written, not
//! fsynced: it survives a process kill, and after a power loss it can only lag). At open, a sled
//! log that ends before that position has lost acknowledged events, and open says so instead of
//! serving a shortened log.

use crate::segment::{self, ArchiveInfo, CompactStats, SegmentHeader, Segmenter};
use crate::{check_request, AppendRequest, BoxFuture, Error, EventLog, Recorded, Result};
use mageflow_core::{codec, Event, NodeIndex, Redactor, Timestamp, WorkflowId};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

/// Most events one group commit writes; the rest wait for the next group.
pub const GROUP_EVENTS_MAX: usize = 64 * 1024;
/// Most events in one stored block.
pub const BLOCK_EVENTS_MAX: usize = 256;
/// A block is closed once it holds this many bytes (one event may make it larger).
pub const BLOCK_BYTES_MAX: usize = 32 * 1024;
/// Most keys in one sled batch (a group is written as several).
pub const CHUNK_INSERTS_MAX: usize = 64;

const BLOCK_PREFIX: u8 = b'b';
const ARCHIVE_PREFIX: u8 = b'a';
const SNAPSHOT_PREFIX: u8 = b's';
/// The length field of an entry whose event moved into its stream's archive (no bytes follow).
pub const ARCHIVED_LEN: u32 = u32::MAX;
/// Archive segment record header: crc32 + events + raw_bytes + last_position + compacted_at
/// + segment crc32.
const ARCHIVE_HEADER_BYTES: usize = 4 + 8 + 8 + 8 + 8 + 4;
const HEAD_KEY: &[u8] = b"h";
const HEAD_FILE: &str = "mageflow.head";
/// The head file: position (u64 BE) ++ crc32 of it (LE).
const HEAD_FILE_BYTES: usize = 8 + 4;
/// crc32 + count.
const BLOCK_HEADER_BYTES: usize = 4 + 4;
/// stream id + seq + length.
const ENTRY_HEADER_BYTES: usize = 16 + 8 + 4;

/// When an append is acknowledged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// After the group's fsync (the default): an acknowledged event survives `kill -9` and power
    /// loss.
    #[default]
    Flush,
    /// After the write reaches sled's buffers; sled flushes every `flush_every_ms`. Faster,
    /// but a crash may lose the last moments of acknowledged events.
    Buffered { flush_every_ms: u64 },
}

#[derive(Clone, Debug)]
pub struct SledOptions {
    pub durability: Durability,
    /// sled page cache size in bytes.
    pub cache_bytes: u64,
}

impl Default for SledOptions {
    fn default() -> Self {
        Self {
            durability: Durability::Flush,
            cache_bytes: 64 * 1024 * 1024,
        }
    }
}

struct Job {
    requests: Vec<AppendRequest>,
    reply: oneshot::Sender<Result<Vec<u64>>>,
}

/// What the committer is asked to do: commit appends (grouped with others), or redact a stream
/// between two groups.
enum Work {
    Append(Job),
    Redact {
        stream: WorkflowId,
        nodes: Vec<NodeIndex>,
        reply: mpsc::SyncSender<Result<RedactStats>>,
    },
    Compact {
        stream: WorkflowId,
        up_to_seq: Option<u64>,
        snapshot: Option<Vec<u8>>,
        reply: mpsc::SyncSender<Result<CompactStats>>,
    },
}

/// What one [`SledLog::redact`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RedactStats {
    /// Events of the stream whose stored bytes were rewritten (0: nothing to redact, e.g. a
    /// second call).
    pub events_rewritten: u64,
    /// Blocks rewritten in place to do so.
    pub blocks_rewritten: u64,
    /// Events of the stream's archive that were rewritten (the segment is re-encoded and
    /// recompressed if this is not 0).
    pub archived_rewritten: u64,
    /// The stream's snapshot was deleted (it holds task data).
    pub snapshot_dropped: bool,
}

/// What open learns from the block headers, kept up to date by the committer. Committed only.
#[derive(Default)]
struct Index {
    /// First position of every block, ascending.
    blocks: Vec<u64>,
    /// Positions of each stream's events, in seq order (`positions[seq - 1]`), archived or not.
    streams: HashMap<WorkflowId, Vec<u64>>,
    /// Per compacted stream, how many of its first events are in its archive segments.
    archived: HashMap<WorkflowId, u64>,
}

impl Index {
    /// First position of the block holding `pos`.
    fn block_of(&self, pos: u64) -> Option<u64> {
        let i = self.blocks.partition_point(|&first| first <= pos);
        i.checked_sub(1).map(|i| self.blocks[i])
    }
}

struct Shared {
    tree: sled::Tree,
    /// Highest durable position; readers never see beyond it.
    committed: AtomicU64,
    index: RwLock<Index>,
    head: watch::Sender<u64>,
    path: PathBuf,
}

impl Shared {
    fn index(&self) -> RwLockReadGuard<'_, Index> {
        // Only the committer writes the index, between complete updates.
        self.index.read().unwrap_or_else(|p| p.into_inner())
    }

    /// `stream`'s archive segments in seq order, headers checked, seqs dense from 1.
    fn segments(&self, stream: WorkflowId) -> Result<Vec<(StoredSegment, sled::IVec)>> {
        let mut out: Vec<(StoredSegment, sled::IVec)> = Vec::new();
        for entry in self.tree.scan_prefix(stream_key(ARCHIVE_PREFIX, stream)) {
            let (k, v) = entry.map_err(storage)?;
            let (_, first_seq) = parse_segment_key(&k)?;
            let next = out.last().map_or(1, |(s, _)| s.header.last_seq() + 1);
            if first_seq != next {
                return Err(Error::Corrupt(format!(
                    "the archive of stream {stream} has a segment from seq {first_seq} where \
                     seq {next} was expected"
                )));
            }
            let (segment, _) = StoredSegment::decode(stream, first_seq, &v)?;
            out.push((segment, v));
        }
        Ok(out)
    }

    fn block(&self, first: u64) -> Result<sled::IVec> {
        self.tree
            .get(block_key(first))
            .map_err(storage)?
            .ok_or_else(|| Error::Corrupt(format!("the block at position {first} is missing")))
    }
}

pub struct SledLog {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Work>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
    _db: sled::Db,
}

fn block_key(first: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = BLOCK_PREFIX;
    k[1..].copy_from_slice(&first.to_be_bytes());
    k
}

fn key_position(key: &[u8]) -> Result<u64> {
    let arr: [u8; 8] = key
        .get(1..)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            Error::Corrupt(format!("a block key has {} bytes, expected 9", key.len()))
        })?;
    Ok(u64::from_be_bytes(arr))
}

/// Key `prefix ++ stream`: a stream's snapshot (`s`), the prefix of its archive segments (`a`).
fn stream_key(prefix: u8, stream: WorkflowId) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = prefix;
    k[1..].copy_from_slice(stream.as_bytes());
    k
}

/// Key of one archive segment of a stream: `a ++ stream ++ first_seq(u64 BE)` (a stream's
/// segments sort by their first seq).
fn segment_key(stream: WorkflowId, first_seq: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[..17].copy_from_slice(&stream_key(ARCHIVE_PREFIX, stream));
    k[17..].copy_from_slice(&first_seq.to_be_bytes());
    k
}

fn parse_segment_key(key: &[u8]) -> Result<(WorkflowId, u64)> {
    let bad = || {
        Error::Corrupt(format!(
            "an archive key has {} bytes, expected 25",
            key.len()
        ))
    };
    let id: [u8; 16] = key
        .get(1..17)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    let seq: [u8; 8] = key
        .get(17..25)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(bad)?;
    if key.len() != 25 {
        return Err(bad());
    }
    Ok((
        WorkflowId::from_u128(u128::from_be_bytes(id)),
        u64::from_be_bytes(seq),
    ))
}

/// One stored archive segment's header (see the module doc; its first seq is in its key).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct StoredSegment {
    header: SegmentHeader,
    last_position: u64,
    compacted_at: Timestamp,
}

impl StoredSegment {
    fn encode(&self, segment: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(ARCHIVE_HEADER_BYTES + segment.len());
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.header.events.to_be_bytes());
        out.extend_from_slice(&self.header.raw_bytes.to_be_bytes());
        out.extend_from_slice(&self.last_position.to_be_bytes());
        out.extend_from_slice(&self.compacted_at.as_micros().to_be_bytes());
        out.extend_from_slice(&self.header.crc32.to_le_bytes());
        let crc = crc32fast::hash(&out[4..ARCHIVE_HEADER_BYTES]);
        out[..4].copy_from_slice(&crc.to_le_bytes());
        out.extend_from_slice(segment);
        out
    }

    /// Check and read a stored record's header; returns it and the segment's bytes.
    fn decode(stream: WorkflowId, first_seq: u64, bytes: &[u8]) -> Result<(Self, &[u8])> {
        let corrupt = |what: String| {
            Error::Corrupt(format!(
                "archive of stream {stream}, segment from seq {first_seq}: {what}"
            ))
        };
        let (header, segment) = bytes
            .split_at_checked(ARCHIVE_HEADER_BYTES)
            .ok_or_else(|| corrupt(format!("record of {} bytes is truncated", bytes.len())))?;
        let field = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&header[at..at + 8]);
            b
        };
        let stored = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let computed = crc32fast::hash(&header[4..]);
        if stored != computed {
            return Err(corrupt(format!(
                "record header fails its checksum (stored {stored:08x}, computed {computed:08x})"
            )));
        }
        let s = Self {
            header: SegmentHeader {
                first_seq,
                events: u64::from_be_bytes(field(4)),
                raw_bytes: u64::from_be_bytes(field(12)),
                crc32: u32::from_le_bytes([header[36], header[37], header[38], header[39]]),
            },
            last_position: u64::from_be_bytes(field(20)),
            compacted_at: Timestamp::from_micros(i64::from_be_bytes(field(28))),
        };
        s.header.check(stream)?;
        Ok((s, segment))
    }
}

/// An archive segment record as compaction stores it under its key (whose last part is
/// `first_seq`): `events` events whose frames are `raw_bytes` long, compressed into `segment`
/// (for tools and the fuzz target).
pub fn encode_archive_record(
    first_seq: u64,
    events: u64,
    raw_bytes: u64,
    last_position: u64,
    compacted_at: Timestamp,
    segment: &[u8],
) -> Vec<u8> {
    StoredSegment {
        header: SegmentHeader {
            first_seq,
            events,
            raw_bytes,
            crc32: crc32fast::hash(segment),
        },
        last_position,
        compacted_at,
    }
    .encode(segment)
}

/// Decode a stored archive segment record of `stream` starting at `first_seq` from untrusted
/// bytes: header checksum and shape, then every check a read makes of the segment.
pub fn decode_archive_record(
    stream: WorkflowId,
    first_seq: u64,
    bytes: &[u8],
) -> Result<Vec<Event>> {
    let (s, seg) = StoredSegment::decode(stream, first_seq, bytes)?;
    s.header.decode(stream, seg, first_seq)
}

fn now() -> Timestamp {
    let micros = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64);
    Timestamp::from_micros(micros)
}

/// One event's place in a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub position: u64,
    pub stream: WorkflowId,
    pub seq: u64,
    /// Byte range of the encoded event inside the block (empty if archived).
    pub start: usize,
    pub end: usize,
    /// The event moved into its stream's archive; the block keeps only this header.
    pub archived: bool,
}

/// Check a stored block's checksum and read its entry headers, naming positions in every error.
/// `first` is the position of its first event (from its key).
pub fn block_entries(first: u64, bytes: &[u8]) -> Result<Vec<Entry>> {
    let corrupt = |what: String| Error::Corrupt(format!("block at position {first}: {what}"));
    if bytes.len() < BLOCK_HEADER_BYTES {
        return Err(corrupt(format!(
            "truncated to {} bytes, shorter than its header",
            bytes.len()
        )));
    }
    let stored = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    let computed = crc32fast::hash(&bytes[4..]);
    if stored != computed {
        return Err(corrupt(format!(
            "fails its checksum (stored {stored:08x}, computed {computed:08x}): torn or altered bytes"
        )));
    }
    let count = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]) as usize;
    if count == 0 || count > BLOCK_EVENTS_MAX {
        return Err(corrupt(format!("claims {count} events")));
    }
    let mut entries = Vec::with_capacity(count.min(BLOCK_EVENTS_MAX));
    let mut at = BLOCK_HEADER_BYTES;
    for i in 0..count as u64 {
        let position = first
            .checked_add(i)
            .ok_or_else(|| corrupt("position overflows".into()))?;
        let header = bytes
            .get(at..at + ENTRY_HEADER_BYTES)
            .ok_or_else(|| corrupt(format!("event at position {position} is truncated")))?;
        let mut id = [0u8; 16];
        id.copy_from_slice(&header[..16]);
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&header[16..24]);
        let len = u32::from_le_bytes([header[24], header[25], header[26], header[27]]);
        let archived = len == ARCHIVED_LEN;
        let start = at + ENTRY_HEADER_BYTES;
        let end = start
            .checked_add(if archived { 0 } else { len as usize })
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| corrupt(format!("event at position {position} is truncated")))?;
        entries.push(Entry {
            position,
            stream: WorkflowId::from_u128(u128::from_be_bytes(id)),
            seq: u64::from_be_bytes(seq),
            start,
            end,
            archived,
        });
        at = end;
    }
    if at != bytes.len() {
        return Err(corrupt(format!(
            "{} bytes after its last event",
            bytes.len() - at
        )));
    }
    Ok(entries)
}

/// Decode one entry of a block whose headers were read by [`block_entries`].
fn decode_entry(bytes: &[u8], e: &Entry) -> Result<Event> {
    if e.archived {
        return Err(Error::Corrupt(format!(
            "event at position {} ({} seq {}) is archived, but was read as live",
            e.position, e.stream, e.seq
        )));
    }
    let event = codec::decode(&bytes[e.start..e.end]).map_err(|err| {
        Error::Corrupt(format!(
            "event at position {} does not decode: {err}",
            e.position
        ))
    })?;
    if event.stream != e.stream || event.seq != e.seq {
        return Err(Error::Corrupt(format!(
            "event at position {} is {} seq {}, but its header says {} seq {}",
            e.position, event.stream, event.seq, e.stream, e.seq
        )));
    }
    Ok(event)
}

/// Decode a whole stored block from untrusted bytes (checksum, headers, every live event;
/// archived entries have no event here and are left out).
pub fn decode_block(first: u64, bytes: &[u8]) -> Result<Vec<Recorded>> {
    block_entries(first, bytes)?
        .iter()
        .filter(|e| !e.archived)
        .map(|e| {
            Ok(Recorded {
                position: e.position,
                event: decode_entry(bytes, e)?,
            })
        })
        .collect()
}

/// Builds one block of consecutive events.
struct BlockBuilder {
    buf: Vec<u8>,
    count: u32,
}

impl BlockBuilder {
    fn new() -> Self {
        let mut buf = Vec::with_capacity(BLOCK_BYTES_MAX + 1024);
        buf.extend_from_slice(&[0; BLOCK_HEADER_BYTES]);
        Self { buf, count: 0 }
    }

    fn push(&mut self, event: &Event) -> Result<()> {
        self.buf.extend_from_slice(event.stream.as_bytes());
        self.buf.extend_from_slice(&event.seq.to_be_bytes());
        let len_at = self.buf.len();
        self.buf.extend_from_slice(&[0; 4]);
        codec::encode_into(event, &mut self.buf).map_err(|source| Error::Encode {
            stream: event.stream,
            seq: event.seq,
            source,
        })?;
        let len = (self.buf.len() - len_at - 4) as u32;
        self.buf[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
        self.count += 1;
        Ok(())
    }

    fn is_full(&self) -> bool {
        self.count as usize >= BLOCK_EVENTS_MAX || self.buf.len() >= BLOCK_BYTES_MAX
    }

    fn finish(mut self) -> Vec<u8> {
        debug_assert!(self.count > 0, "a block holds at least one event");
        self.buf[4..8].copy_from_slice(&self.count.to_le_bytes());
        let crc = crc32fast::hash(&self.buf[4..]);
        self.buf[..4].copy_from_slice(&crc.to_le_bytes());
        self.buf
    }
}

/// Encode events (at consecutive positions) into one block, as the log stores them.
pub fn encode_block(events: &[&Event]) -> Result<Vec<u8>> {
    let mut builder = BlockBuilder::new();
    for e in events {
        builder.push(e)?;
    }
    Ok(builder.finish())
}

fn storage(e: sled::Error) -> Error {
    sled_error(None, e)
}

/// sled's error in plain words, naming the file (under `dir` when known) and the offset instead
/// of sled's `Debug` text (`Some(Inline(…))`); a file that is gone is `Error::Missing`.
fn sled_error(dir: Option<&Path>, e: sled::Error) -> Error {
    let file = |name: &str| match dir {
        Some(d) => d.join(name).display().to_string(),
        None => format!("sled's file {name}"),
    };
    let shown =
        |d: Option<&Path>| d.map_or_else(|| "this store".to_owned(), |d| d.display().to_string());
    match e {
        sled::Error::Corruption { at, .. } => Error::Corrupt(match at {
            Some(sled::DiskPtr::Inline(offset)) => format!(
                "{} holds damaged data at byte offset {offset} (a record there fails sled's \
                 checksum)",
                file("db")
            ),
            Some(sled::DiskPtr::Blob(_, blob)) => format!(
                "{} fails sled's checksum (expected the stored CRC over its bytes)",
                file(&format!("blobs/{blob}"))
            ),
            // sled gives no place for a record it cannot parse.
            None => format!(
                "sled found data it cannot parse in {} or {} (expected its configuration \
                 lines, or a well-formed log record; sled does not say which, or where)",
                file("conf"),
                file("db")
            ),
        }),
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::NotFound => Error::Missing {
            path: shown(dir),
            what: format!("a file sled needs ({io})"),
        },
        sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
            Error::Locked { path: shown(dir) }
        }
        sled::Error::Io(io) => Error::Storage(format!("I/O error in sled's files: {io}")),
        other => Error::Storage(other.to_string()),
    }
}

/// What `mageflow.head` (the acknowledged-position guard) of a store says, read without opening
/// the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeadGuard {
    /// The file holds a position with a good checksum.
    Recorded(u64),
    /// No such file: a log opened without it cannot tell that sled lost acknowledged events.
    Missing,
    /// The file is there but says nothing usable (why, in words).
    Unreadable(String),
}

/// Read the acknowledged-position guard of the store in `dir` (nothing is created or changed).
pub fn head_guard(dir: impl AsRef<Path>) -> HeadGuard {
    let path = dir.as_ref().join(HEAD_FILE);
    match std::fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => HeadGuard::Missing,
        Err(e) => HeadGuard::Unreadable(format!("cannot read {}: {e}", path.display())),
        Ok(buf) => match parse_head(&buf) {
            Ok(Some(position)) => HeadGuard::Recorded(position),
            Ok(None) => HeadGuard::Unreadable(format!("{} is empty", path.display())),
            Err(why) => HeadGuard::Unreadable(format!("{}: {why}", path.display())),
        },
    }
}

/// The head file's bytes: `Ok(None)` when empty, `Err` (in words) when it says nothing usable.
fn parse_head(buf: &[u8]) -> std::result::Result<Option<u64>, String> {
    match buf.len() {
        0 => Ok(None),
        HEAD_FILE_BYTES => {
            let crc = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
            if crc32fast::hash(&buf[..8]) != crc {
                return Err("its position fails its checksum (a torn write?)".into());
            }
            let mut p = [0u8; 8];
            p.copy_from_slice(&buf[..8]);
            Ok(Some(u64::from_be_bytes(p)))
        }
        n => Err(format!("{n} bytes, expected {HEAD_FILE_BYTES}")),
    }
}

/// Before sled opens `dir` (and creates what is not there): a store with some of its files gone
/// is refused as `Error::Missing` instead of being opened as a new, shorter one. A directory
/// with none of them is a new store.
fn check_files(dir: &Path) -> Result<()> {
    let present = |name: &str| dir.join(name).exists();
    let missing = |what: &str| Error::Missing {
        path: dir.display().to_string(),
        what: what.into(),
    };
    let (head, conf, db) = (present(HEAD_FILE), present("conf"), present("db"));
    // `conf` alone is what a crash during the first open can leave: still a new store.
    if head && !db {
        return Err(missing(
            "sled's log file `db` (mageflow.head is there, so events were written)",
        ));
    }
    if db && !conf {
        return Err(missing(
            "sled's configuration file `conf` (its `db` file is there)",
        ));
    }
    Ok(())
}

/// The side file holding the last durable position.
struct HeadFile {
    file: std::fs::File,
}

impl HeadFile {
    fn open(dir: &Path) -> Result<(Self, Option<u64>)> {
        let path = dir.join(HEAD_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::Open {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        let mut buf = Vec::new();
        file.read_to_end(&mut buf).map_err(|e| Error::Open {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        // A torn write of this file is possible after a power loss; it then says nothing.
        let recorded = parse_head(&buf).ok().flatten();
        Ok((Self { file }, recorded))
    }

    fn record(&mut self, position: u64) -> std::io::Result<()> {
        let mut buf = [0u8; HEAD_FILE_BYTES];
        buf[..8].copy_from_slice(&position.to_be_bytes());
        let crc = crc32fast::hash(&buf[..8]);
        buf[8..].copy_from_slice(&crc.to_le_bytes());
        self.file.seek(SeekFrom::Start(0))?;
        self.file.write_all(&buf)
    }
}

/// How long [`SledLog::open`] waits for a store whose lock another engine still holds.
const OPEN_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl SledLog {
    /// Open (or create) a log in directory `path`. Checks the whole log (see the module doc).
    /// A store locked by another engine is waited for up to two seconds, then refused.
    pub fn open(path: impl AsRef<Path>, options: SledOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let flush_every_ms = match options.durability {
            Durability::Flush => None,
            Durability::Buffered { flush_every_ms } => Some(flush_every_ms.max(1)),
        };
        // A store another engine is letting go of (its last handles being dropped, in this
        // process or another) is waited for a moment, as SQLite's busy timeout does.
        check_files(&path)?;
        let busy_until = std::time::Instant::now() + OPEN_LOCK_WAIT;
        let db = loop {
            let opened = sled::Config::new()
                .path(&path)
                .cache_capacity(options.cache_bytes)
                .flush_every_ms(flush_every_ms)
                .open();
            match opened {
                Err(sled::Error::Io(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < busy_until =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                other => break other,
            }
        }
        .map_err(|e| match sled_error(Some(&path), e) {
            Error::Storage(reason) => Error::Open {
                path: path.display().to_string(),
                reason,
            },
            other => other,
        })?;
        let tree = db.open_tree("log").map_err(storage)?;
        let marker = match tree.get(HEAD_KEY).map_err(storage)? {
            None => None,
            Some(v) => {
                let arr: [u8; 8] = v.as_ref().try_into().map_err(|_| {
                    Error::Corrupt(format!("the head marker has {} bytes, expected 8", v.len()))
                })?;
                Some(u64::from_be_bytes(arr))
            }
        };
        let (mut head_file, recorded) = HeadFile::open(&path)?;
        let head = match marker {
            Some(h) => h,
            None if tree.scan_prefix([BLOCK_PREFIX]).next().is_some() => {
                return Err(Error::Corrupt(format!(
                    "the log in {} holds events but its head marker is missing",
                    path.display()
                )))
            }
            None => 0,
        };
        if let Some(recorded) = recorded.filter(|r| *r > head) {
            return Err(Error::Corrupt(format!(
                "the log in {} ends at position {head}, but position {recorded} was acknowledged: sled lost committed events",
                path.display()
            )));
        }
        // Check the log up to the marker before deleting anything past it: a marker that does
        // not end a block is damage, and the blocks past it must survive the refusal.
        let index = build_index(&tree, head)?;
        discard_torn_tail(&tree, head)?;
        // Cut any garbage past the record too: a longer file would be ignored at every open.
        head_file
            .record(head)
            .and_then(|()| head_file.file.set_len(HEAD_FILE_BYTES as u64))
            .map_err(|e| Error::Storage(format!("cannot write {HEAD_FILE}: {e}")))?;
        let shared = Arc::new(Shared {
            tree,
            committed: AtomicU64::new(head),
            index: RwLock::new(index),
            head: watch::channel(head).0,
            path,
        });
        let (tx, rx) = mpsc::channel();
        let committer = Committer {
            shared: shared.clone(),
            durability: options.durability,
            db: db.clone(),
            head_file,
        };
        let handle = std::thread::Builder::new()
            .name("mageflow-log-commit".into())
            .spawn(move || committer.run(rx))
            .map_err(|e| Error::Storage(format!("cannot start the commit thread: {e}")))?;
        Ok(Self {
            shared,
            jobs: Mutex::new(Some(tx)),
            committer: Mutex::new(Some(handle)),
            _db: db,
        })
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    fn lock_jobs(&self) -> MutexGuard<'_, Option<mpsc::Sender<Work>>> {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stop accepting appends, finish the ones queued, and wait for the committer.
    pub fn close(&self) {
        self.lock_jobs().take();
        let handle = self
            .committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }

    /// Drop the task data of the signatures `nodes` of workflow `stream` (all of them if `nodes`
    /// is empty) from the log for good, leaving the audit trail, like `PgLog::redact`: every
    /// event of the stream is replaced by its `mageflow_core::Payload::redact`ed form (kwargs →
    /// `{}`, message values, results and checkpoints → `null`, error messages → `"[redacted]"`,
    /// for those signatures only; kinds, nodes, attempts, statuses, times, actors, names and
    /// task names are kept). Positions, seqs, versions and event counts do not change; the
    /// redacted stream replays to the same statuses.
    ///
    /// Every block holding an event of the stream whose bytes change is rewritten in place
    /// (same key, same entries in the same order; the other streams' entries byte for byte; a
    /// new checksum), then sled is flushed, whatever the durability mode: an acknowledged
    /// redaction stays done. The committer thread does it between two groups, so no block is
    /// written by anyone else meanwhile; each block is replaced by one atomic sled write, so
    /// readers see every block either old or new, and so does a reopen after a crash in the
    /// middle (both are valid blocks); calling this again then finishes the job. Only events
    /// committed before it runs are redacted (appends made after it are not): call it once
    /// the events it must cover (e.g. a cancel's) are committed.
    ///
    /// Sled is log-structured: the old block versions stay in its segment files until sled
    /// reuses those segments, so the dropped data may remain in the files on disk for a while
    /// (it is no longer reachable through the log).
    ///
    /// Idempotent: a second call rewrites nothing and reports 0. Damage found in a block it
    /// reads is `Error::Corrupt`: blocks before it may already be redacted (each valid), none
    /// from it on is touched. The
    /// system stream holds no task data and is left alone. Blocks the calling thread until the
    /// redaction is durable.
    pub fn redact(&self, stream: WorkflowId, nodes: Vec<NodeIndex>) -> Result<RedactStats> {
        if stream.is_system() {
            return Ok(RedactStats::default());
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Work::Redact {
            stream,
            nodes,
            reply,
        })?;
        rx.recv().unwrap_or(Err(Error::Closed))
    }

    /// Move `stream`'s events with `seq <= up_to_seq` (all if `None`) into its archive, like
    /// `PgLog::compact`: new zstd segments of their stored bytes after the ones an earlier
    /// compaction wrote (never rewritten), with `snapshot` (the encoded final state; `None`
    /// keeps the one stored before) beside them. Their entries stay in their blocks without
    /// their bytes (see the module doc), so positions, seqs, versions, appends and
    /// `read_stream` are unchanged; `read_all` serves live events only. A stream with nothing
    /// archived and nothing to archive gets no segment (its snapshot is not kept).
    ///
    /// The committer thread does it between two groups, in one atomic sled batch followed by
    /// a flush whatever the durability mode: after a crash the stream is either compacted or
    /// not, never half. Damage found in what it moves is `Error::Corrupt` and nothing changes.
    /// Idempotent: a second call moves nothing and reports `events: 0`. Blocks the calling
    /// thread until it is durable.
    pub fn compact(
        &self,
        stream: WorkflowId,
        up_to_seq: Option<u64>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<CompactStats> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send(Work::Compact {
            stream,
            up_to_seq,
            snapshot,
            reply,
        })?;
        rx.recv().unwrap_or(Err(Error::Closed))
    }

    /// `stream`'s archive, if it was ever compacted.
    pub fn archived(&self, stream: WorkflowId) -> Result<Option<ArchiveInfo>> {
        let segments = self.shared.segments(stream)?;
        let Some((last, _)) = segments.last() else {
            return Ok(None);
        };
        let snapshot = self
            .shared
            .tree
            .get(stream_key(SNAPSHOT_PREFIX, stream))
            .map_err(storage)?;
        Ok(Some(ArchiveInfo {
            first_seq: 1,
            last_seq: last.header.last_seq(),
            events: segments.iter().map(|(s, _)| s.header.events).sum(),
            segments: segments.len() as u64,
            raw_bytes: segments.iter().map(|(s, _)| s.header.raw_bytes).sum(),
            compressed_bytes: segments
                .iter()
                .map(|(_, v)| (v.len() - ARCHIVE_HEADER_BYTES) as u64)
                .sum(),
            last_position: last.last_position,
            has_snapshot: snapshot.is_some(),
            snapshot_bytes: snapshot.map(|s| s.len().saturating_sub(4) as u64),
            compacted_at: last.compacted_at,
        }))
    }

    /// The snapshot stored by the last compaction of `stream` that gave one (checksum checked).
    pub fn snapshot(&self, stream: WorkflowId) -> Result<Option<Vec<u8>>> {
        let Some(value) = self
            .shared
            .tree
            .get(stream_key(SNAPSHOT_PREFIX, stream))
            .map_err(storage)?
        else {
            return Ok(None);
        };
        let (crc, bytes) = value.split_first_chunk::<4>().ok_or_else(|| {
            Error::Corrupt(format!("the snapshot of stream {stream} is truncated"))
        })?;
        if u32::from_le_bytes(*crc) != crc32fast::hash(bytes) {
            return Err(Error::Corrupt(format!(
                "the snapshot of stream {stream} fails its checksum"
            )));
        }
        Ok(Some(bytes.to_vec()))
    }

    /// Hand work to the committer.
    fn send(&self, work: Work) -> Result<()> {
        match &*self.lock_jobs() {
            Some(tx) if tx.send(work).is_ok() => Ok(()),
            _ => Err(Error::Closed),
        }
    }

    /// The archived events of `stream` from `from_seq` to `upto` (its archive holds at least
    /// `upto`).
    fn archived_events(&self, stream: WorkflowId, from_seq: u64, upto: u64) -> Result<Vec<Event>> {
        let mut out = Vec::new();
        let mut covered = 0;
        for (s, v) in self.shared.segments(stream)? {
            covered = s.header.last_seq();
            if covered < from_seq {
                continue;
            }
            if s.header.first_seq > upto {
                break;
            }
            out.extend(
                s.header
                    .decode(stream, &v[ARCHIVE_HEADER_BYTES..], from_seq)?,
            );
        }
        if covered < upto {
            return Err(Error::Corrupt(format!(
                "the archive of stream {stream} holds {covered} events, the index {upto}"
            )));
        }
        out.truncate(upto.saturating_sub(from_seq - 1) as usize);
        Ok(out)
    }

    /// Check every event: block checksums, full decode (of the archives too), headers matching
    /// the events, dense positions, dense sequence numbers per stream, archived entries exactly
    /// the ones their stream's archive holds, and agreement with the in-memory index.
    /// Returns the number of events.
    pub fn verify(&self) -> Result<u64> {
        let committed = self.shared.committed.load(Ordering::Acquire);
        // Every archive decodes whole, seqs dense from 1, to the count the index says.
        let mut archived = HashMap::new();
        for entry in self.shared.tree.scan_prefix([ARCHIVE_PREFIX]) {
            let (k, v) = entry.map_err(storage)?;
            let (stream, first_seq) = parse_segment_key(&k)?;
            let next = archived.get(&stream).copied().unwrap_or(0) + 1;
            if first_seq != next {
                return Err(Error::Corrupt(format!(
                    "the archive of stream {stream} has a segment from seq {first_seq} where \
                     seq {next} was expected"
                )));
            }
            let events = decode_archive_record(stream, first_seq, &v)?.len() as u64;
            archived.insert(stream, first_seq + events - 1);
        }
        if archived != self.shared.index().archived {
            return Err(Error::Corrupt(
                "the archives in the log do not match the index".into(),
            ));
        }
        let mut versions: HashMap<WorkflowId, u64> = HashMap::new();
        let mut expected = 1u64;
        for entry in self.shared.tree.scan_prefix([BLOCK_PREFIX]) {
            let (k, v) = entry.map_err(storage)?;
            let first = key_position(&k)?;
            if first != expected {
                return Err(Error::Corrupt(format!(
                    "event at position {expected} is missing"
                )));
            }
            for e in block_entries(first, &v)? {
                let version = versions.entry(e.stream).or_default();
                if e.seq != *version + 1 {
                    return Err(Error::Corrupt(format!(
                        "event at position {} is {} seq {}, but that stream's previous event has seq {version}",
                        e.position, e.stream, e.seq
                    )));
                }
                check_archived(&archived, &e)?;
                if !e.archived {
                    decode_entry(&v, &e)?;
                }
                *version = e.seq;
                expected = e.position + 1;
            }
        }
        if expected != committed + 1 {
            return Err(Error::Corrupt(format!(
                "the log ends at position {}, but its head is {committed}",
                expected - 1
            )));
        }
        let index = self.shared.index();
        for (stream, positions) in index.streams.iter() {
            let logged = versions.get(stream).copied().unwrap_or(0);
            if logged != positions.len() as u64 {
                return Err(Error::Corrupt(format!(
                    "stream {stream} has {logged} events in the log but {} in the index",
                    positions.len()
                )));
            }
        }
        if versions.len() != index.streams.len() {
            return Err(Error::Corrupt(
                "the log holds streams the index does not know".into(),
            ));
        }
        Ok(committed)
    }

    /// Decode the live events at `positions` (ascending), reading each block once. `None` if
    /// one of them has been archived meanwhile (a compaction ran since the positions were read).
    fn events_at(&self, positions: &[u64]) -> Result<Option<Vec<Event>>> {
        let mut out = Vec::with_capacity(positions.len());
        let mut i = 0;
        while i < positions.len() {
            let first = self.shared.index().block_of(positions[i]).ok_or_else(|| {
                Error::Corrupt(format!("no block holds position {}", positions[i]))
            })?;
            let bytes = self.shared.block(first)?;
            let entries = block_entries(first, &bytes)?;
            let last = first + entries.len() as u64 - 1;
            while i < positions.len() && positions[i] <= last {
                let e = &entries[(positions[i] - first) as usize];
                if e.archived {
                    return Ok(None);
                }
                out.push(decode_entry(&bytes, e)?);
                i += 1;
            }
        }
        Ok(Some(out))
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        self.close();
    }
}

/// Remove blocks past the head marker: a group that crashed between its chunks. None of their
/// events was acknowledged. More than one group's worth past the marker is not a torn commit
/// but damage, and is reported instead of deleted.
fn discard_torn_tail(tree: &sled::Tree, head: u64) -> Result<()> {
    let mut torn = Vec::new();
    for entry in tree.range(block_key(head.saturating_add(1))..=block_key(u64::MAX)) {
        let (k, _) = entry.map_err(storage)?;
        let first = key_position(&k)?;
        if first - head > GROUP_EVENTS_MAX as u64 {
            return Err(Error::Corrupt(format!(
                "a block at position {first} lies far past the head marker ({head})"
            )));
        }
        torn.push(k);
    }
    if !torn.is_empty() {
        tracing::warn!(
            blocks = torn.len(),
            head,
            "discarding blocks of a commit interrupted by a crash (never acknowledged)"
        );
        for k in torn {
            tree.remove(k).map_err(storage)?;
        }
        tree.flush().map_err(storage)?;
    }
    Ok(())
}

/// Read every block header up to `head`: checksums, dense positions, dense seqs per stream.
fn build_index(tree: &sled::Tree, head: u64) -> Result<Index> {
    let mut index = Index::default();
    for entry in tree.scan_prefix([ARCHIVE_PREFIX]) {
        let (k, v) = entry.map_err(storage)?;
        let (stream, first_seq) = parse_segment_key(&k)?;
        let (segment, _) = StoredSegment::decode(stream, first_seq, &v)?;
        let archived = index.archived.entry(stream).or_default();
        if first_seq != *archived + 1 {
            return Err(Error::Corrupt(format!(
                "the archive of stream {stream} has a segment from seq {first_seq} where seq {} \
                 was expected",
                *archived + 1
            )));
        }
        *archived = segment.header.last_seq();
    }
    let mut expected = 1u64;
    for entry in tree.range(block_key(1)..=block_key(head)) {
        let (k, v) = entry.map_err(storage)?;
        let first = key_position(&k)?;
        if first != expected {
            return Err(Error::Corrupt(format!(
                "event at position {expected} is missing"
            )));
        }
        index.blocks.push(first);
        for e in block_entries(first, &v)? {
            let positions = index.streams.entry(e.stream).or_default();
            if e.seq != positions.len() as u64 + 1 {
                return Err(Error::Corrupt(format!(
                    "event at position {} is {} seq {}, but that stream's previous event has seq {}",
                    e.position,
                    e.stream,
                    e.seq,
                    positions.len()
                )));
            }
            check_archived(&index.archived, &e)?;
            positions.push(e.position);
            expected = e.position + 1;
        }
    }
    for (stream, archived) in &index.archived {
        let version = index.streams.get(stream).map_or(0, |p| p.len() as u64);
        if *archived > version {
            return Err(Error::Corrupt(format!(
                "the archive of stream {stream} holds {archived} events, the log only {version}"
            )));
        }
    }
    // `expected - 1`, not `head + 1`: a damaged marker may say u64::MAX.
    if expected - 1 != head {
        return Err(Error::Corrupt(format!(
            "the log ends at position {}, but its head marker says {head}: events are missing",
            expected - 1
        )));
    }
    Ok(index)
}

/// What [`rewrite_block`] does to one entry.
enum Change {
    Keep,
    /// Drop its bytes: the event moved into its stream's archive.
    Archive,
    /// New bytes for the same event (a redaction).
    Replace(Vec<u8>),
}

/// Rebuild a stored block entry by entry, asking `change` about each live one in order (it may
/// fail, and then nothing is written). Returns the new block and how many entries changed, or
/// `None` if none did. The new block must read back with the same positions, streams and seqs.
fn rewrite_block(
    first: u64,
    bytes: &[u8],
    entries: &[Entry],
    mut change: impl FnMut(&Entry) -> Result<Change>,
) -> Result<Option<(Vec<u8>, u64)>> {
    let mut out = Vec::with_capacity(bytes.len());
    out.extend_from_slice(&bytes[..BLOCK_HEADER_BYTES]);
    let mut changed = 0u64;
    for e in entries {
        // Stream id and seq of the entry, as stored.
        out.extend_from_slice(&bytes[e.start - ENTRY_HEADER_BYTES..e.start - 4]);
        let what = if e.archived {
            Change::Archive
        } else {
            change(e)?
        };
        let new: Option<&[u8]> = match &what {
            Change::Keep => Some(&bytes[e.start..e.end]),
            Change::Archive => None,
            Change::Replace(b) => Some(b),
        };
        if !e.archived && !matches!(what, Change::Keep) {
            changed += 1;
        }
        match new {
            None => out.extend_from_slice(&ARCHIVED_LEN.to_le_bytes()),
            Some(b) => {
                let len = u32::try_from(b.len())
                    .ok()
                    .filter(|&n| n != ARCHIVED_LEN)
                    .ok_or_else(|| {
                        Error::Storage(format!(
                            "the event at position {} would exceed 4 GiB",
                            e.position
                        ))
                    })?;
                out.extend_from_slice(&len.to_le_bytes());
                out.extend_from_slice(b);
            }
        }
    }
    if changed == 0 {
        return Ok(None);
    }
    let crc = crc32fast::hash(&out[4..]);
    out[..4].copy_from_slice(&crc.to_le_bytes());
    let check = block_entries(first, &out)?;
    if check.len() != entries.len()
        || check
            .iter()
            .zip(entries)
            .any(|(a, b)| (a.position, a.stream, a.seq) != (b.position, b.stream, b.seq))
    {
        return Err(Error::Storage(format!(
            "the rewritten block at position {first} does not match the old one"
        )));
    }
    Ok(Some((out, changed)))
}

/// Check that entry `e` of `stream` is where the index puts its `i`-th event (seq `i + 1`).
fn check_position(positions: &[u64], i: usize, e: &Entry) -> Result<()> {
    let seq = i as u64 + 1;
    if positions.get(i) != Some(&e.position) || e.seq != seq {
        return Err(Error::Corrupt(format!(
            "event at position {} is {} seq {}, but the index has seq {seq} of that stream at \
             position {}",
            e.position,
            e.stream,
            e.seq,
            positions.get(i).copied().unwrap_or(0)
        )));
    }
    Ok(())
}

/// An entry is archived exactly when its seq is within its stream's archive record.
fn check_archived(archived: &HashMap<WorkflowId, u64>, e: &Entry) -> Result<()> {
    let n = archived.get(&e.stream).copied().unwrap_or(0);
    if e.archived != (e.seq <= n) {
        return Err(Error::Corrupt(format!(
            "event at position {} ({} seq {}) is {} in its block, but the stream's archive \
             holds its first {n} events",
            e.position,
            e.stream,
            e.seq,
            if e.archived { "archived" } else { "live" }
        )));
    }
    Ok(())
}

struct Committer {
    shared: Arc<Shared>,
    durability: Durability,
    db: sled::Db,
    head_file: HeadFile,
}

/// One group's accepted events, in position order.
#[derive(Default)]
struct Staged<'a> {
    events: Vec<&'a Event>,
    /// New positions per stream, in seq order.
    streams: HashMap<WorkflowId, Vec<u64>>,
}

impl Committer {
    fn run(mut self, rx: mpsc::Receiver<Work>) {
        // Work taken from the queue while a group was being gathered, not part of that group.
        let mut next: Option<Work> = None;
        loop {
            let work = match next.take() {
                Some(w) => w,
                None => match rx.recv() {
                    Ok(w) => w,
                    Err(_) => break,
                },
            };
            let first = match work {
                Work::Append(job) => job,
                Work::Redact {
                    stream,
                    nodes,
                    reply,
                } => {
                    // Between groups: no block is being written, and appends queued after the
                    // redaction wait for it (they are not covered by it).
                    let _ = reply.send(self.redact(stream, &nodes));
                    continue;
                }
                Work::Compact {
                    stream,
                    up_to_seq,
                    snapshot,
                    reply,
                } => {
                    // Between groups too: the blocks it rewrites are not being written.
                    let _ = reply.send(self.compact(stream, up_to_seq, snapshot));
                    continue;
                }
            };
            let mut jobs = vec![first];
            let mut events: usize = jobs[0].requests.iter().map(|r| r.events.len()).sum();
            while events < GROUP_EVENTS_MAX {
                match rx.try_recv() {
                    Ok(Work::Append(job)) => {
                        events += job.requests.iter().map(|r| r.events.len()).sum::<usize>();
                        jobs.push(job);
                    }
                    Ok(other) => {
                        next = Some(other);
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit(jobs);
        }
        if let Err(e) = self.db.flush() {
            tracing::error!(error = %e, "final flush of the event log failed");
        }
        let _ = self.head_file.file.sync_all();
    }

    /// Stage one job, or refuse it whole.
    fn stage<'a>(
        &self,
        job: &'a Job,
        staged: &mut Staged<'a>,
        next_pos: &mut u64,
    ) -> Result<Vec<u64>> {
        {
            let index = self.shared.index();
            let mut local: HashMap<WorkflowId, u64> = HashMap::new();
            for req in &job.requests {
                check_request(req)?;
                let actual = match local.get(&req.stream) {
                    Some(v) => *v,
                    None => {
                        index.streams.get(&req.stream).map_or(0, |p| p.len() as u64)
                            + staged
                                .streams
                                .get(&req.stream)
                                .map_or(0, |p| p.len() as u64)
                    }
                };
                if actual != req.expected_version {
                    return Err(Error::Conflict {
                        stream: req.stream,
                        expected: req.expected_version,
                        actual,
                    });
                }
                local.insert(req.stream, actual + req.events.len() as u64);
            }
        }
        let mut last_positions = Vec::with_capacity(job.requests.len());
        for req in &job.requests {
            let positions = staged.streams.entry(req.stream).or_default();
            for event in &req.events {
                staged.events.push(event);
                positions.push(*next_pos);
                *next_pos += 1;
            }
            last_positions.push(*next_pos - 1);
        }
        Ok(last_positions)
    }

    /// Cut the group into blocks and write them, head marker last; then flush. Returns the
    /// first position of every block written.
    fn write(&self, events: &[&Event], start: u64, end: u64) -> Result<Vec<u64>> {
        let mut blocks = Vec::new();
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let mut first = start + 1;
        let mut builder = BlockBuilder::new();
        for (i, event) in events.iter().enumerate() {
            builder.push(event)?;
            let last = i + 1 == events.len();
            if builder.is_full() || last {
                let count = u64::from(builder.count);
                let full = std::mem::replace(&mut builder, BlockBuilder::new());
                batch.insert(&block_key(first), full.finish());
                blocks.push(first);
                first += count;
                in_batch += 1;
                if in_batch == CHUNK_INSERTS_MAX && !last {
                    self.shared
                        .tree
                        .apply_batch(std::mem::take(&mut batch))
                        .map_err(storage)?;
                    in_batch = 0;
                }
            }
        }
        batch.insert(HEAD_KEY, &end.to_be_bytes());
        self.shared.tree.apply_batch(batch).map_err(storage)?;
        if self.durability == Durability::Flush {
            self.db.flush().map_err(storage)?;
        }
        Ok(blocks)
    }

    /// Redact `stream` (see [`SledLog::redact`]), between two groups: its archive first, then
    /// its live events, in seq order (the redactor follows the stream).
    fn redact(&self, stream: WorkflowId, nodes: &[NodeIndex]) -> Result<RedactStats> {
        let (positions, archived) = {
            let index = self.shared.index();
            match index.streams.get(&stream) {
                Some(p) => (p.clone(), index.archived.get(&stream).copied().unwrap_or(0)),
                None => return Ok(RedactStats::default()),
            }
        };
        let all = nodes.is_empty();
        let wanted: HashSet<NodeIndex> = nodes.iter().copied().collect();
        let selected = |n: NodeIndex| all || wanted.contains(&n);
        let mut redactor = Redactor::new(&selected);
        let mut stats = RedactStats::default();
        let tree = &self.shared.tree;
        if archived > 0 {
            for (seg, value) in self.shared.segments(stream)? {
                let first_seq = seg.header.first_seq;
                let rewritten = segment::redact(
                    stream,
                    &seg.header,
                    &value[ARCHIVE_HEADER_BYTES..],
                    &mut redactor,
                )?;
                if let Some((header, bytes, changed)) = rewritten {
                    let record = StoredSegment { header, ..seg }.encode(&bytes);
                    tree.insert(segment_key(stream, first_seq), record)
                        .map_err(storage)?;
                    stats.archived_rewritten += changed;
                }
            }
        }
        let snapshot_key = stream_key(SNAPSHOT_PREFIX, stream);
        stats.snapshot_dropped = tree.remove(snapshot_key).map_err(storage)?.is_some();
        let mut batch = sled::Batch::default();
        let mut in_batch = 0;
        let mut i = archived as usize;
        while i < positions.len() {
            let first = self.shared.index().block_of(positions[i]).ok_or_else(|| {
                Error::Corrupt(format!("no block holds position {}", positions[i]))
            })?;
            let bytes = self.shared.block(first)?;
            let entries = block_entries(first, &bytes)?;
            let rewritten = rewrite_block(first, &bytes, &entries, |e| {
                if e.stream != stream {
                    return Ok(Change::Keep);
                }
                check_position(&positions, i, e)?;
                i += 1;
                let event = decode_entry(&bytes, e)?;
                Ok(crate::redact_encoded(&mut redactor, event)?
                    .map_or(Change::Keep, Change::Replace))
            })?;
            let Some((rewritten, changed)) = rewritten else {
                continue;
            };
            batch.insert(&block_key(first), rewritten);
            in_batch += 1;
            stats.events_rewritten += changed;
            stats.blocks_rewritten += 1;
            if in_batch == CHUNK_INSERTS_MAX {
                tree.apply_batch(std::mem::take(&mut batch))
                    .map_err(storage)?;
                in_batch = 0;
            }
        }
        if in_batch > 0 {
            tree.apply_batch(batch).map_err(storage)?;
        }
        if stats.blocks_rewritten > 0 || stats.archived_rewritten > 0 || stats.snapshot_dropped {
            self.db.flush().map_err(storage)?;
        }
        Ok(stats)
    }

    /// Compact `stream` (see [`SledLog::compact`]), between two groups: the new segments, the
    /// snapshot and every block that loses an event's bytes go in one atomic sled batch,
    /// then a flush; the index learns of it last.
    fn compact(
        &self,
        stream: WorkflowId,
        up_to_seq: Option<u64>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<CompactStats> {
        let (positions, archived) = {
            let index = self.shared.index();
            match index.streams.get(&stream) {
                Some(p) => (p.clone(), index.archived.get(&stream).copied().unwrap_or(0)),
                None => return Ok(CompactStats::default()),
            }
        };
        let version = positions.len() as u64;
        let up_to = up_to_seq.unwrap_or(version).min(version);
        let tree = &self.shared.tree;
        let mut batch = sled::Batch::default();
        if let (Some(snapshot), true) = (&snapshot, archived > 0 || up_to > archived) {
            let mut value = crc32fast::hash(snapshot).to_le_bytes().to_vec();
            value.extend_from_slice(snapshot);
            batch.insert(&stream_key(SNAPSHOT_PREFIX, stream), value);
        }
        if up_to <= archived {
            // Nothing to move; a new snapshot of an archived stream is still kept (a stream
            // with nothing archived gets none, like PostgreSQL's).
            if archived > 0 && snapshot.is_some() {
                tree.apply_batch(batch).map_err(storage)?;
                self.db.flush().map_err(storage)?;
            }
            return Ok(CompactStats::default());
        }
        let moving = &positions[archived as usize..up_to as usize];
        let mut segments = Segmenter::new(stream, archived + 1);
        let mut i = 0;
        while i < moving.len() {
            let first =
                self.shared.index().block_of(moving[i]).ok_or_else(|| {
                    Error::Corrupt(format!("no block holds position {}", moving[i]))
                })?;
            let bytes = self.shared.block(first)?;
            let entries = block_entries(first, &bytes)?;
            let rewritten = rewrite_block(first, &bytes, &entries, |e| {
                if e.stream != stream || i == moving.len() {
                    return Ok(Change::Keep);
                }
                check_position(&positions, archived as usize + i, e)?;
                // Checked like a read before it moves; moved as stored, not re-encoded.
                decode_entry(&bytes, e)?;
                segments.push(&bytes[e.start..e.end], e.position)?;
                i += 1;
                Ok(Change::Archive)
            })?;
            if let Some((rewritten, _)) = rewritten {
                batch.insert(&block_key(first), rewritten);
            }
        }
        let compacted_at = now();
        let mut stats = CompactStats {
            events: up_to - archived,
            ..CompactStats::default()
        };
        for built in segments.finish()? {
            let record = StoredSegment {
                header: built.header,
                last_position: built.last_position,
                compacted_at,
            };
            batch.insert(
                &segment_key(stream, built.header.first_seq),
                record.encode(&built.bytes),
            );
            stats.segments += 1;
            stats.raw_bytes += built.header.raw_bytes;
            stats.compressed_bytes += built.bytes.len() as u64;
        }
        tree.apply_batch(batch).map_err(storage)?;
        self.db.flush().map_err(storage)?;
        self.shared
            .index
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .archived
            .insert(stream, up_to);
        Ok(stats)
    }

    /// Remove every block past position `head`.
    fn remove_past(&self, head: u64) -> Result<()> {
        let tree = &self.shared.tree;
        for entry in tree.range(block_key(head.saturating_add(1))..=block_key(u64::MAX)) {
            let (k, _) = entry.map_err(storage)?;
            tree.remove(k).map_err(storage)?;
        }
        tree.insert(HEAD_KEY, &head.to_be_bytes())
            .map_err(storage)?;
        Ok(())
    }

    fn commit(&mut self, jobs: Vec<Job>) {
        let start = self.shared.committed.load(Ordering::Acquire);
        let mut next_pos = start + 1;
        let mut staged = Staged::default();
        let outcomes: Vec<Result<Vec<u64>>> = jobs
            .iter()
            .map(|job| self.stage(job, &mut staged, &mut next_pos))
            .collect();
        let end = next_pos - 1;
        let written = if end > start {
            self.write(&staged.events, start, end).map(Some)
        } else {
            Ok(None)
        };
        let streams = std::mem::take(&mut staged.streams);
        drop(staged);
        match written {
            Ok(Some(blocks)) => {
                {
                    let mut index = self.shared.index.write().unwrap_or_else(|p| p.into_inner());
                    index.blocks.extend(blocks);
                    for (stream, positions) in streams {
                        index.streams.entry(stream).or_default().extend(positions);
                    }
                }
                self.shared.committed.store(end, Ordering::Release);
                if self.durability == Durability::Flush {
                    if let Err(e) = self.head_file.record(end) {
                        tracing::warn!(error = %e, "cannot record the durable head beside the log");
                    }
                }
                self.shared.head.send_replace(end);
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            // Nothing to write (every job refused): no commit, no wake-up.
            Ok(None) => {
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "event log commit failed");
                // Positions are not advanced: the next group rewrites them and the head marker.
                // Blocks this group managed to write must go first, or a next group cut into
                // blocks differently would leave stale keys inside its range.
                if let Err(e) = self.remove_past(start) {
                    tracing::error!(error = %e, "cannot remove the blocks of a failed commit");
                }
                let msg = e.to_string();
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job
                        .reply
                        .send(outcome.and(Err(Error::Storage(msg.clone()))));
                }
            }
        }
    }
}

impl EventLog for SledLog {
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'static, Result<Vec<u64>>> {
        let (reply, rx) = oneshot::channel();
        let sent = match &*self.lock_jobs() {
            Some(tx) => tx.send(Work::Append(Job { requests, reply })).is_ok(),
            None => false,
        };
        crate::committed_reply(sent, rx)
    }

    fn read_stream(&self, stream: WorkflowId, from_seq: u64) -> Result<Vec<Event>> {
        let from_seq = from_seq.max(1);
        // A compaction between reading the index and the blocks archives events this read
        // expected live; it then reads again (the index is updated after the blocks, so the
        // second read sees the new archive).
        let mut attempts = 0;
        let (mut events, live_from, positions, live) = loop {
            let (archived, positions) = {
                let index = self.shared.index();
                let Some(all) = index.streams.get(&stream) else {
                    return Ok(Vec::new());
                };
                let archived = index.archived.get(&stream).copied().unwrap_or(0);
                let skip = (from_seq.max(archived + 1) - 1).min(all.len() as u64) as usize;
                (archived, all[skip..].to_vec())
            };
            let events = if from_seq <= archived {
                self.archived_events(stream, from_seq, archived)?
            } else {
                Vec::new()
            };
            attempts += 1;
            match self.events_at(&positions)? {
                Some(live) => break (events, from_seq.max(archived + 1), positions, live),
                None if attempts < 3 => continue,
                None => {
                    return Err(Error::Corrupt(format!(
                        "stream {stream}: events the index has live are archived in their blocks"
                    )))
                }
            }
        };
        for (i, (event, pos)) in live.iter().zip(&positions).enumerate() {
            let seq = live_from + i as u64;
            if event.stream != stream || event.seq != seq {
                return Err(Error::Corrupt(format!(
                    "position {pos} holds {} seq {}, but the index says {stream} seq {seq}",
                    event.stream, event.seq
                )));
            }
        }
        events.extend(live);
        Ok(events)
    }

    fn read_all(&self, from: u64, limit: usize) -> Result<Vec<Recorded>> {
        let committed = self.shared.committed.load(Ordering::Acquire);
        let from = from.max(1);
        if from > committed || limit == 0 {
            return Ok(Vec::new());
        }
        let start = self
            .shared
            .index()
            .block_of(from)
            .ok_or_else(|| Error::Corrupt(format!("no block holds position {from}")))?;
        let mut out = Vec::with_capacity(limit.min((committed - from + 1) as usize));
        let mut want = start;
        'blocks: for entry in self
            .shared
            .tree
            .range(block_key(start)..=block_key(committed))
        {
            let (k, v) = entry.map_err(storage)?;
            let first = key_position(&k)?;
            if first != want {
                return Err(Error::Corrupt(format!(
                    "event at position {want} is missing"
                )));
            }
            for e in block_entries(first, &v)? {
                want = e.position + 1;
                // Archived events are served by `read_stream` only (like PostgreSQL's).
                if e.archived || e.position < from || e.position > committed {
                    continue;
                }
                out.push(Recorded {
                    position: e.position,
                    event: decode_entry(&v, &e)?,
                });
                if out.len() == limit {
                    break 'blocks;
                }
            }
        }
        if out.len() < limit && want <= committed {
            return Err(Error::Corrupt(format!(
                "event at position {want} is missing"
            )));
        }
        Ok(out)
    }

    fn stream_version(&self, stream: WorkflowId) -> Result<u64> {
        Ok(self
            .shared
            .index()
            .streams
            .get(&stream)
            .map_or(0, |p| p.len() as u64))
    }

    fn head(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    fn redact(&self, stream: WorkflowId, nodes: Vec<NodeIndex>) -> Result<Option<u64>> {
        SledLog::redact(self, stream, nodes)
            .map(|r| Some(r.events_rewritten + r.archived_rewritten))
    }

    fn compact(
        &self,
        stream: WorkflowId,
        up_to_seq: Option<u64>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<Option<CompactStats>> {
        SledLog::compact(self, stream, up_to_seq, snapshot).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled's errors read as words naming the file and offset, never as sled's `Debug` text.
    #[test]
    fn sled_errors_in_plain_words() {
        let dir = Path::new("/var/lib/mf");
        let cases = [
            (
                sled::Error::Corruption {
                    at: Some(sled::DiskPtr::Inline(4096)),
                    bt: (),
                },
                "/var/lib/mf/db holds damaged data at byte offset 4096",
            ),
            (
                sled::Error::Corruption {
                    at: Some(sled::DiskPtr::Blob(7, 42)),
                    bt: (),
                },
                "/var/lib/mf/blobs/42 fails sled's checksum",
            ),
            (
                sled::Error::Corruption { at: None, bt: () },
                "cannot parse in /var/lib/mf/conf or /var/lib/mf/db",
            ),
            (
                sled::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "No such file or directory",
                )),
                "is missing",
            ),
        ];
        for (e, needle) in cases {
            let shown = sled_error(Some(dir), e).to_string();
            assert!(shown.contains(needle), "{shown}");
            for debug in ["Some(", "Inline(", "Blob(", "Os {", "kind:"] {
                assert!(!shown.contains(debug), "{shown}");
            }
        }
        let locked = sled::Error::Io(std::io::Error::other(
            "could not acquire lock on \"/var/lib/mf/db\": Os { code: 11, kind: WouldBlock }",
        ));
        let shown = sled_error(Some(dir), locked).to_string();
        assert!(shown.contains("in use by another process"), "{shown}");
        assert!(!shown.contains("Os {"), "{shown}");
    }

    #[test]
    fn the_head_guard_says_why_it_cannot_be_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(head_guard(dir.path()), HeadGuard::Missing);
        std::fs::write(dir.path().join(HEAD_FILE), [1, 2, 3]).expect("write");
        match head_guard(dir.path()) {
            HeadGuard::Unreadable(why) => assert!(why.contains("3 bytes, expected 12"), "{why}"),
            other => panic!("{other:?}"),
        }
        let mut good = [0u8; HEAD_FILE_BYTES];
        good[..8].copy_from_slice(&9u64.to_be_bytes());
        let crc = crc32fast::hash(&good[..8]);
        good[8..].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.path().join(HEAD_FILE), good).expect("write");
        assert_eq!(head_guard(dir.path()), HeadGuard::Recorded(9));
        good[0] ^= 1;
        std::fs::write(dir.path().join(HEAD_FILE), good).expect("write");
        assert!(matches!(head_guard(dir.path()), HeadGuard::Unreadable(_)));
    }
}
