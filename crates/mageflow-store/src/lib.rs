//! The durable event log. [`EventLog`] is the narrow trait every backend implements: append a
//! batch with optimistic concurrency per stream, read a stream, read the whole log by global
//! position, and watch the head for new events. Backends: [`MemoryLog`] (tests, and the
//! reference the conformance suite compares against) and `SledLog` (embedded, durable, group
//! commit; behind the `sled` feature, on by default). This crate knows events only as encoded
//! bytes plus their envelope; it never decides anything.

#[cfg(feature = "conformance")]
pub mod conformance;
mod memory;
pub mod segment;
#[cfg(feature = "sled")]
mod sled_log;

pub use memory::MemoryLog;
pub use segment::{ArchiveInfo, CompactStats};
#[cfg(feature = "sled")]
pub use sled_log::{
    block_entries, decode_archive_record, decode_block, encode_archive_record, encode_block,
    head_guard, Durability, Entry, HeadGuard, RedactStats, SledLog, SledOptions, ARCHIVED_LEN,
    BLOCK_BYTES_MAX, BLOCK_EVENTS_MAX,
};

use mageflow_core::{CodecError, Event, WorkflowId};
use std::future::Future;
use std::pin::Pin;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Most events one append call may carry (a named limit, hit as a typed error).
pub const APPEND_EVENTS_MAX: usize = 1_000_000;

/// Append `events` to `stream`, which must currently be at `expected_version` (0 = new).
/// Events must carry `stream` and consecutive `seq` numbers starting at `expected_version + 1`.
#[derive(Clone, Debug)]
pub struct AppendRequest {
    pub stream: WorkflowId,
    pub expected_version: u64,
    pub events: Vec<Event>,
}

/// An event with its global log position (1-based, dense, in commit order).
#[derive(Clone, Debug, PartialEq)]
pub struct Recorded {
    pub position: u64,
    pub event: Event,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "version conflict on stream {stream}: expected version {expected}, stream is at {actual}"
    )]
    Conflict {
        stream: WorkflowId,
        expected: u64,
        actual: u64,
    },
    #[error("invalid append to stream {stream}: {reason}")]
    InvalidAppend { stream: WorkflowId, reason: String },
    #[error("cannot open the event log at {path}: {reason}")]
    Open { path: String, reason: String },
    /// Part of a store is gone (a file deleted or never copied): not damage to what is there.
    #[error("the event log at {path} is incomplete: {what} is missing")]
    Missing { path: String, what: String },
    /// Another process (or another open log in this one) holds the store.
    #[error(
        "the event log at {path} is in use by another process (could not acquire lock on its \
         file {path}/db); an embedded store belongs to one process at a time"
    )]
    Locked { path: String },
    #[error("event log storage error: {0}")]
    Storage(String),
    #[error("event log is corrupt: {0}")]
    Corrupt(String),
    #[error("cannot encode event of stream {stream} seq {seq}: {source}")]
    Encode {
        stream: WorkflowId,
        seq: u64,
        source: CodecError,
    },
    #[error("the event log is closed")]
    Closed,
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`, `redis://:secret@host` →
/// `redis://:***@host`, and a `password=` query parameter → `password=***`: the one masking
/// of credentials in a URL, for every message, error and log line that shows one. Anything
/// that is not a URL with credentials comes back unchanged.
pub fn mask_url(url: &str) -> String {
    let masked = match url.find("://") {
        None => url.to_owned(),
        Some(scheme_end) => {
            let rest = &url[scheme_end + 3..];
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            // The last `@` of the authority ends the credentials (a password may hold an `@`).
            match rest[..authority_end].rfind('@') {
                Some(at) => match rest[..at].find(':') {
                    Some(colon) => format!(
                        "{}{}:***{}",
                        &url[..scheme_end + 3],
                        &rest[..colon],
                        &rest[at..]
                    ),
                    None => url.to_owned(),
                },
                None => url.to_owned(),
            }
        }
    };
    mask_password_parameter(&masked)
}

/// `…?sslmode=require&password=secret` → `…?sslmode=require&password=***` (libpq accepts the
/// password as a query parameter too).
fn mask_password_parameter(url: &str) -> String {
    let Some(query_start) = url.find('?') else {
        return url.to_owned();
    };
    let (base, query) = url.split_at(query_start + 1);
    let params: Vec<String> = query
        .split('&')
        .map(|p| match p.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => p.to_owned(),
        })
        .collect();
    format!("{base}{}", params.join("&"))
}

impl Error {
    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}

/// The durable, ordered log of all events.
pub trait EventLog: Send + Sync + 'static {
    /// Append several streams' events atomically: all requests are written, or none (a stale
    /// `expected_version` anywhere gives [`Error::Conflict`] and writes nothing). Returns, per
    /// request, the global position of its last event. Resolves only once the events are as
    /// durable as the log's durability mode promises. The requests are submitted when `append`
    /// is called, not when the future is first polled, so a caller can decide its next batch
    /// while this one is being made durable (appends complete in call order).
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'static, Result<Vec<u64>>>;

    /// Events of `stream` with `seq >= from_seq`, in order.
    fn read_stream(&self, stream: WorkflowId, from_seq: u64) -> Result<Vec<Event>>;

    /// Up to `limit` events with `position >= from`, in position order.
    fn read_all(&self, from: u64, limit: usize) -> Result<Vec<Recorded>>;

    /// Current version (last seq) of a stream; 0 if it does not exist.
    fn stream_version(&self, stream: WorkflowId) -> Result<u64>;

    /// Position of the last committed event (0 = empty log).
    fn head(&self) -> u64;

    /// Watch the head: changes after every commit. Catch up with [`EventLog::read_all`].
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64>;

    /// Rewrite `stream`'s stored events with the task data of `nodes` (empty: every signature)
    /// dropped (`mageflow_core::Payload::redact`), keeping the audit record; positions, seqs and
    /// versions do not change. Blocking. Returns how many events were rewritten, or `None` if
    /// this log cannot redact (the default).
    fn redact(
        &self,
        stream: WorkflowId,
        nodes: Vec<mageflow_core::NodeIndex>,
    ) -> Result<Option<u64>> {
        let _ = (stream, nodes);
        Ok(None)
    }

    /// Move `stream`'s events with `seq <= up_to_seq` (all of them if `None`) out of the live
    /// log into its compressed archive segment ([`segment`]), with `snapshot` (encoded final
    /// state; `None` keeps the one stored before) beside it, in one atomic step. `read_stream`,
    /// `stream_version` and appends' version checks are unchanged by it; `read_all` serves
    /// live events only. Blocking. Returns what it did, or `None` if this log cannot compact
    /// (the default).
    fn compact(
        &self,
        stream: WorkflowId,
        up_to_seq: Option<u64>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<Option<CompactStats>> {
        let _ = (stream, up_to_seq, snapshot);
        Ok(None)
    }
}

/// Feed the stream's next event to `redactor` ([`mageflow_core::Redactor`], events in seq
/// order); if it changed, its new stored bytes. Every backend's redaction goes through here.
pub fn redact_encoded(
    redactor: &mut mageflow_core::Redactor<'_>,
    mut event: Event,
) -> Result<Option<Vec<u8>>> {
    if !redactor.redact(&mut event) {
        return Ok(None);
    }
    mageflow_core::codec::encode(&event)
        .map(Some)
        .map_err(|source| Error::Encode {
            stream: event.stream,
            seq: event.seq,
            source,
        })
}

/// The future an `append` returns once its job was (`sent`) or could not be handed to a
/// committer: the committer's answer, or `Error::Closed`.
pub fn committed_reply(
    sent: bool,
    reply: tokio::sync::oneshot::Receiver<Result<Vec<u64>>>,
) -> BoxFuture<'static, Result<Vec<u64>>> {
    Box::pin(async move {
        if !sent {
            return Err(Error::Closed);
        }
        reply.await.unwrap_or(Err(Error::Closed))
    })
}

/// Check a request's shape before anything is written: events present, within
/// [`APPEND_EVENTS_MAX`], all of `req.stream`, with consecutive seqs from `expected_version + 1`.
/// Every backend refuses a malformed request with this [`Error::InvalidAppend`].
pub fn check_request(req: &AppendRequest) -> Result<()> {
    let bad = |reason: String| Error::InvalidAppend {
        stream: req.stream,
        reason,
    };
    if req.events.is_empty() {
        return Err(bad("no events".into()));
    }
    if req.events.len() > APPEND_EVENTS_MAX {
        return Err(bad(format!(
            "{} events, more than the limit of {APPEND_EVENTS_MAX}",
            req.events.len()
        )));
    }
    for (i, e) in req.events.iter().enumerate() {
        if e.stream != req.stream {
            return Err(bad(format!("event {i} belongs to stream {}", e.stream)));
        }
        if e.seq != req.expected_version + 1 + i as u64 {
            return Err(bad(format!(
                "event {i} has seq {}, expected {}",
                e.seq,
                req.expected_version + 1 + i as u64
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::mask_url;

    #[test]
    fn mask_url_hides_every_password() {
        let cases = [
            (
                "postgres://bob:secret@db:5432/app",
                "postgres://bob:***@db:5432/app",
            ),
            ("redis://:secret@cache:6379/0", "redis://:***@cache:6379/0"),
            ("rediss://user:p@ss@cache", "rediss://user:***@cache"),
            (
                "postgres://db/app?sslmode=require&password=secret",
                "postgres://db/app?sslmode=require&password=***",
            ),
            ("postgres://bob@db/app", "postgres://bob@db/app"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("not a url", "not a url"),
            ("", ""),
        ];
        for (url, shown) in cases {
            assert_eq!(mask_url(url), shown, "{url}");
            assert!(!mask_url(url).contains("secret"), "{url}");
        }
    }
}
