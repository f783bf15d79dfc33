//! Embedded durable log on sled, with group commit.
//!
//! Layout (one sled tree, so one `Batch` commits a whole group atomically):
//! - `b'e' ++ position(u64 BE)` → `crc32(LE u32) ++ encoded event` — one key per event;
//! - `b's' ++ stream(16 bytes) ++ last_seq(u64 BE)` → `first_position(u64 BE) ++ first_seq(u64 BE)`
//!   — one key per append of a stream, whose events got consecutive positions.
//!
//! Appenders hand their requests to one committer thread. It takes everything waiting (up to
//! [`GROUP_EVENTS_MAX`] events), checks versions, writes one batch, flushes once, then answers
//! them all: concurrent appenders share one fsync. Nothing is acknowledged, and nothing is
//! visible to readers or subscribers, before the flush that makes it durable.

use crate::{check_request, AppendRequest, BoxFuture, Error, EventLog, Recorded, Result};
use mageflow_core::{codec, Event, WorkflowId};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use tokio::sync::{oneshot, watch};

/// Most events one group commit writes; the rest wait for the next group.
pub const GROUP_EVENTS_MAX: usize = 64 * 1024;

const EVENT_PREFIX: u8 = b'e';
const STREAM_PREFIX: u8 = b's';

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
            cache_bytes: 256 * 1024 * 1024,
        }
    }
}

struct Job {
    requests: Vec<AppendRequest>,
    reply: oneshot::Sender<Result<Vec<u64>>>,
}

struct Shared {
    tree: sled::Tree,
    /// Highest durable position; readers never see beyond it.
    committed: AtomicU64,
    head: watch::Sender<u64>,
    path: PathBuf,
}

pub struct SledLog {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    committer: Mutex<Option<JoinHandle<()>>>,
    _db: sled::Db,
}

fn event_key(pos: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = EVENT_PREFIX;
    k[1..].copy_from_slice(&pos.to_be_bytes());
    k
}

fn stream_key(stream: WorkflowId, seq: u64) -> [u8; 25] {
    let mut k = [0u8; 25];
    k[0] = STREAM_PREFIX;
    k[1..17].copy_from_slice(stream.as_bytes());
    k[17..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn be_u64(bytes: &[u8], what: impl Fn() -> String) -> Result<u64> {
    let arr: [u8; 8] = bytes.try_into().map_err(|_| {
        Error::Corrupt(format!(
            "{}: expected 8 bytes, found {}",
            what(),
            bytes.len()
        ))
    })?;
    Ok(u64::from_be_bytes(arr))
}

fn frame(event: &Event) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(256);
    buf.extend_from_slice(&[0; 4]);
    codec::encode_into(event, &mut buf).map_err(|source| Error::Encode {
        stream: event.stream,
        seq: event.seq,
        source,
    })?;
    let crc = crc32fast::hash(&buf[4..]);
    buf[..4].copy_from_slice(&crc.to_le_bytes());
    Ok(buf)
}

/// Decode one stored event frame, naming the position in every error.
pub fn decode_frame(position: u64, bytes: &[u8]) -> Result<Event> {
    if bytes.len() < 4 {
        return Err(Error::Corrupt(format!(
            "event at position {position} is truncated: {} bytes, shorter than its checksum",
            bytes.len()
        )));
    }
    let (crc, body) = bytes.split_at(4);
    let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(Error::Corrupt(format!(
            "event at position {position} fails its checksum (stored {stored:08x}, computed {computed:08x}): torn or altered bytes"
        )));
    }
    codec::decode(body)
        .map_err(|e| Error::Corrupt(format!("event at position {position} does not decode: {e}")))
}

fn storage(e: sled::Error) -> Error {
    match e {
        sled::Error::Corruption { at, .. } => {
            Error::Corrupt(format!("sled reports corrupt data at {at:?}"))
        }
        other => Error::Storage(other.to_string()),
    }
}

impl SledLog {
    /// Open (or create) a log in directory `path`.
    pub fn open(path: impl AsRef<Path>, options: SledOptions) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let flush_every_ms = match options.durability {
            Durability::Flush => None,
            Durability::Buffered { flush_every_ms } => Some(flush_every_ms.max(1)),
        };
        let db = sled::Config::new()
            .path(&path)
            .cache_capacity(options.cache_bytes)
            .flush_every_ms(flush_every_ms)
            .open()
            .map_err(|e| match e {
                sled::Error::Corruption { at, .. } => Error::Corrupt(format!(
                    "sled data in {} is corrupt at {at:?}",
                    path.display()
                )),
                other => Error::Open {
                    path: path.display().to_string(),
                    reason: other.to_string(),
                },
            })?;
        let tree = db.open_tree("log").map_err(storage)?;
        let head = match tree.scan_prefix([EVENT_PREFIX]).next_back() {
            None => 0,
            Some(entry) => {
                let (k, v) = entry.map_err(storage)?;
                let pos = be_u64(&k[1..], || "key of the last event".into())?;
                // The newest event must be whole: a torn tail is reported, not skipped.
                decode_frame(pos, &v)?;
                pos
            }
        };
        let shared = Arc::new(Shared {
            tree,
            committed: AtomicU64::new(head),
            head: watch::channel(head).0,
            path,
        });
        let (tx, rx) = mpsc::channel();
        let committer = Committer {
            shared: shared.clone(),
            versions: HashMap::new(),
            durability: options.durability,
            db: db.clone(),
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

    /// Stop accepting appends, finish the ones queued, and wait for the committer.
    pub fn close(&self) {
        self.jobs.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = self
            .committer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
        {
            let _ = h.join();
        }
    }

    /// Check every event and index entry: frames decode, positions are dense, every stream's
    /// sequence numbers are dense (in position order and in the index), every index entry points
    /// at events of its stream, and each stream's index ends at its last event. Returns the event
    /// count.
    pub fn verify(&self) -> Result<u64> {
        let mut expected = 1u64;
        // Last seq of every stream, in position order.
        let mut versions: HashMap<WorkflowId, u64> = HashMap::new();
        for entry in self.shared.tree.scan_prefix([EVENT_PREFIX]) {
            let (k, v) = entry.map_err(storage)?;
            let pos = be_u64(&k[1..], || "an event key".into())?;
            if pos != expected {
                return Err(Error::Corrupt(format!(
                    "event at position {expected} is missing"
                )));
            }
            let event = decode_frame(pos, &v)?;
            let version = versions.entry(event.stream).or_default();
            if event.seq != *version + 1 {
                return Err(Error::Corrupt(format!(
                    "event at position {pos} is {} seq {}, but that stream's previous event has seq {version}",
                    event.stream, event.seq
                )));
            }
            *version = event.seq;
            expected += 1;
        }
        let head = expected - 1;
        let ends_at_last_event = |stream: WorkflowId, last_seq: u64| {
            let events = versions.get(&stream).copied().unwrap_or(0);
            if last_seq == events {
                Ok(())
            } else {
                Err(Error::Corrupt(format!(
                    "stream index of {stream} ends at seq {last_seq}, but the log holds {events} events of it"
                )))
            }
        };
        let mut indexed: HashSet<WorkflowId> = HashSet::new();
        let mut last: Option<(WorkflowId, u64)> = None;
        for entry in self.shared.tree.scan_prefix([STREAM_PREFIX]) {
            let (k, v) = entry.map_err(storage)?;
            if k.len() != 25 {
                return Err(Error::Corrupt(format!(
                    "a stream index key has {} bytes, expected 25",
                    k.len()
                )));
            }
            let mut id = [0u8; 16];
            id.copy_from_slice(&k[1..17]);
            let stream = WorkflowId::from_u128(u128::from_be_bytes(id));
            let last_seq = be_u64(&k[17..], || "a stream index key".into())?;
            if v.len() != 16 {
                return Err(Error::Corrupt(format!(
                    "stream index entry of {stream} at seq {last_seq} has {} bytes, expected 16",
                    v.len()
                )));
            }
            let first_pos = be_u64(&v[..8], || "a stream index value".into())?;
            let first_seq = be_u64(&v[8..], || "a stream index value".into())?;
            let want = match last {
                Some((s, seq)) if s == stream => seq + 1,
                Some((s, seq)) => {
                    ends_at_last_event(s, seq)?;
                    1
                }
                None => 1,
            };
            if first_seq != want || last_seq < first_seq {
                return Err(Error::Corrupt(format!(
                    "stream index of {stream} has a gap: expected seq {want}, found {first_seq}..={last_seq}"
                )));
            }
            let last_pos = match first_pos.checked_add(last_seq - first_seq) {
                Some(p) if first_pos >= 1 && p <= head => p,
                Some(p) => {
                    let (bad, why) = if first_pos == 0 {
                        (0, "there is no such position".to_owned())
                    } else {
                        (p, format!("past the end of the log at position {head}"))
                    };
                    return Err(Error::Corrupt(format!(
                        "stream index of {stream} at seq {last_seq} points at position {bad}, {why}"
                    )));
                }
                None => {
                    return Err(Error::Corrupt(format!(
                        "stream index of {stream} at seq {last_seq} points past the end of the log"
                    )))
                }
            };
            // Seqs are dense per stream in position order (checked above), so an entry whose two
            // ends hold the right events covers exactly the events between them.
            for (pos, seq) in [(first_pos, first_seq), (last_pos, last_seq)] {
                let event = self.get_event(pos)?;
                if event.stream != stream || event.seq != seq {
                    return Err(Error::Corrupt(format!(
                        "position {pos} holds {} seq {}, but the index says {stream} seq {seq}",
                        event.stream, event.seq
                    )));
                }
            }
            indexed.insert(stream);
            last = Some((stream, last_seq));
        }
        if let Some((s, seq)) = last {
            ends_at_last_event(s, seq)?;
        }
        if let Some(s) = versions.keys().find(|s| !indexed.contains(s)) {
            return Err(Error::Corrupt(format!(
                "stream {s} has events but no stream index entry"
            )));
        }
        Ok(head)
    }

    fn get_event(&self, pos: u64) -> Result<Event> {
        match self.shared.tree.get(event_key(pos)).map_err(storage)? {
            Some(v) => decode_frame(pos, &v),
            None => Err(Error::Corrupt(format!(
                "event at position {pos} is missing"
            ))),
        }
    }
}

impl Drop for SledLog {
    fn drop(&mut self) {
        self.close();
    }
}

fn load_version(tree: &sled::Tree, stream: WorkflowId) -> Result<u64> {
    let mut prefix = [0u8; 17];
    prefix[0] = STREAM_PREFIX;
    prefix[1..].copy_from_slice(stream.as_bytes());
    match tree.scan_prefix(prefix).next_back() {
        None => Ok(0),
        Some(entry) => {
            let (k, _) = entry.map_err(storage)?;
            be_u64(&k[17..], || format!("stream index key of {stream}"))
        }
    }
}

struct Committer {
    shared: Arc<Shared>,
    /// Current version of every stream touched since open.
    versions: HashMap<WorkflowId, u64>,
    durability: Durability,
    db: sled::Db,
}

impl Committer {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        while let Ok(first) = rx.recv() {
            let mut jobs = vec![first];
            let mut events: usize = jobs[0].requests.iter().map(|r| r.events.len()).sum();
            while events < GROUP_EVENTS_MAX {
                match rx.try_recv() {
                    Ok(job) => {
                        events += job.requests.iter().map(|r| r.events.len()).sum::<usize>();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
            self.commit(jobs);
        }
    }

    fn version(&mut self, staged: &HashMap<WorkflowId, u64>, stream: WorkflowId) -> Result<u64> {
        if let Some(v) = staged.get(&stream).or_else(|| self.versions.get(&stream)) {
            return Ok(*v);
        }
        let v = load_version(&self.shared.tree, stream)?;
        self.versions.insert(stream, v);
        Ok(v)
    }

    /// Stage one job into `batch`, or refuse it whole.
    fn stage(
        &mut self,
        job: &Job,
        staged: &mut HashMap<WorkflowId, u64>,
        next_pos: &mut u64,
        batch: &mut sled::Batch,
    ) -> Result<Vec<u64>> {
        let mut local: HashMap<WorkflowId, u64> = HashMap::new();
        for req in &job.requests {
            check_request(req)?;
            let actual = match local.get(&req.stream) {
                Some(v) => *v,
                None => self.version(staged, req.stream)?,
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
        let mut writes = Vec::new();
        let mut last_positions = Vec::with_capacity(job.requests.len());
        let mut pos = *next_pos;
        for req in &job.requests {
            let first_pos = pos;
            for event in &req.events {
                writes.push((event_key(pos).to_vec(), frame(event)?));
                pos += 1;
            }
            let last_seq = req.expected_version + req.events.len() as u64;
            let mut v = Vec::with_capacity(16);
            v.extend_from_slice(&first_pos.to_be_bytes());
            v.extend_from_slice(&(req.expected_version + 1).to_be_bytes());
            writes.push((stream_key(req.stream, last_seq).to_vec(), v));
            last_positions.push(pos - 1);
        }
        for (k, v) in writes {
            batch.insert(k, v);
        }
        staged.extend(local);
        *next_pos = pos;
        Ok(last_positions)
    }

    fn commit(&mut self, jobs: Vec<Job>) {
        let start = self.shared.committed.load(Ordering::Acquire);
        let mut next_pos = start + 1;
        let mut batch = sled::Batch::default();
        let mut staged = HashMap::new();
        let outcomes: Vec<Result<Vec<u64>>> = jobs
            .iter()
            .map(|job| self.stage(job, &mut staged, &mut next_pos, &mut batch))
            .collect();
        let end = next_pos - 1;
        let written = if end > start {
            let res = self.shared.tree.apply_batch(batch).map_err(storage);
            let res = match (res, self.durability) {
                (Ok(()), Durability::Flush) => self.db.flush().map(|_| ()).map_err(storage),
                (r, _) => r,
            };
            if let Err(e) = &res {
                tracing::error!(error = %e, "event log commit failed");
            }
            res
        } else {
            Ok(())
        };
        match written {
            Ok(()) => {
                self.versions.extend(staged);
                // A group that wrote nothing (all refused) is not a commit: no wake-up.
                if end > start {
                    self.shared.committed.store(end, Ordering::Release);
                    self.shared.head.send_replace(end);
                }
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            Err(e) => {
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
        let sent = match &*self.jobs.lock().unwrap_or_else(|p| p.into_inner()) {
            Some(tx) => tx.send(Job { requests, reply }).is_ok(),
            None => false,
        };
        Box::pin(async move {
            if !sent {
                return Err(Error::Closed);
            }
            rx.await.unwrap_or(Err(Error::Closed))
        })
    }

    fn read_stream(&self, stream: WorkflowId, from_seq: u64) -> Result<Vec<Event>> {
        let committed = self.shared.committed.load(Ordering::Acquire);
        let from_seq = from_seq.max(1);
        let mut out = Vec::new();
        let mut want = from_seq;
        // Set once an entry reaches past the committed position: the rest of the stream's
        // entries belong to a group not yet durable, and must all lie past it too.
        let mut past_committed = false;
        let range = stream_key(stream, from_seq)..=stream_key(stream, u64::MAX);
        for entry in self.shared.tree.range(range) {
            let (k, v) = entry.map_err(storage)?;
            let last_seq = be_u64(&k[17..], || format!("stream index key of {stream}"))?;
            if v.len() != 16 {
                return Err(Error::Corrupt(format!(
                    "stream index entry of {stream} at seq {last_seq} has {} bytes, expected 16",
                    v.len()
                )));
            }
            let first_pos = be_u64(&v[..8], || "stream index value".into())?;
            let first_seq = be_u64(&v[8..], || "stream index value".into())?;
            if past_committed {
                if first_pos <= committed {
                    return Err(Error::Corrupt(format!(
                        "stream index of {stream} at seq {last_seq} points at position {first_pos}, but an earlier entry points past the last committed position {committed}"
                    )));
                }
                continue;
            }
            if first_seq > want || last_seq < first_seq {
                return Err(Error::Corrupt(format!(
                    "stream {stream} has a gap: expected seq {want}, index covers {first_seq}..={last_seq}"
                )));
            }
            for seq in want..=last_seq {
                let Some(pos) = first_pos.checked_add(seq - first_seq) else {
                    return Err(Error::Corrupt(format!(
                        "stream index of {stream} at seq {last_seq} points past the end of the log"
                    )));
                };
                if pos > committed {
                    past_committed = true;
                    break;
                }
                let event = self.get_event(pos)?;
                if event.stream != stream || event.seq != seq {
                    return Err(Error::Corrupt(format!(
                        "position {pos} holds {} seq {}, but the index says {stream} seq {seq}",
                        event.stream, event.seq
                    )));
                }
                out.push(event);
            }
            want = last_seq.saturating_add(1);
        }
        Ok(out)
    }

    fn read_all(&self, from: u64, limit: usize) -> Result<Vec<Recorded>> {
        let committed = self.shared.committed.load(Ordering::Acquire);
        let from = from.max(1);
        if from > committed || limit == 0 {
            return Ok(Vec::new());
        }
        let mut out = Vec::with_capacity(limit.min((committed - from + 1) as usize));
        let mut want = from;
        for entry in self
            .shared
            .tree
            .range(event_key(from)..=event_key(committed))
        {
            let (k, v) = entry.map_err(storage)?;
            let pos = be_u64(&k[1..], || "an event key".into())?;
            if pos != want {
                return Err(Error::Corrupt(format!(
                    "event at position {want} is missing"
                )));
            }
            out.push(Recorded {
                position: pos,
                event: decode_frame(pos, &v)?,
            });
            want += 1;
            if out.len() == limit {
                break;
            }
        }
        if out.is_empty() || (want <= committed && out.len() < limit) {
            return Err(Error::Corrupt(format!(
                "event at position {want} is missing"
            )));
        }
        Ok(out)
    }

    fn stream_version(&self, stream: WorkflowId) -> Result<u64> {
        // The committer applies a group's batch before the flush that makes it durable, so the
        // index may hold entries past the committed position — several of one stream when a
        // group appends to it more than once. The version is the newest entry that is committed.
        let committed = self.shared.committed.load(Ordering::Acquire);
        let mut prefix = [0u8; 17];
        prefix[0] = STREAM_PREFIX;
        prefix[1..].copy_from_slice(stream.as_bytes());
        for entry in self.shared.tree.scan_prefix(prefix).rev() {
            let (k, v) = entry.map_err(storage)?;
            let last_seq = be_u64(&k[17..], || format!("stream index key of {stream}"))?;
            if v.len() != 16 {
                return Err(Error::Corrupt(format!(
                    "stream index entry of {stream} at seq {last_seq} is unreadable"
                )));
            }
            let first_pos = be_u64(&v[..8], || "stream index value".into())?;
            let first_seq = be_u64(&v[8..], || "stream index value".into())?;
            let last_pos = last_seq
                .checked_sub(first_seq)
                .and_then(|n| first_pos.checked_add(n))
                .ok_or_else(|| {
                    Error::Corrupt(format!(
                        "stream index entry of {stream} at seq {last_seq} is inconsistent"
                    ))
                })?;
            if last_pos <= committed {
                return Ok(last_seq);
            }
        }
        Ok(0)
    }

    fn head(&self) -> u64 {
        self.shared.committed.load(Ordering::Acquire)
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }
}
