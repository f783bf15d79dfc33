//! Integration tests of the event log backends: one conformance suite every backend runs,
//! corruption of sled's stored bytes, and a real `kill -9` crash test. One binary (this one) keeps
//! link times down; the crash test re-executes it as its child process.

mod conformance;
mod corruption;
mod crash;

use mageflow_core::{Actor, Event, Payload, Timestamp, WorkflowId, SCHEMA_VERSION};
use mageflow_store::{AppendRequest, Durability, SledLog, SledOptions};
use serde_json::json;
use std::path::Path;

/// Stream number `n` of a test (distinct, stable ids).
pub fn stream(n: u128) -> WorkflowId {
    WorkflowId::from_u128(0x5eed_0000_0000_0000_0000_0000_0000_0000 | n)
}

/// The event a test writes as `seq` of `stream`, fully determined by its arguments so a reader can
/// check what it gets back. `tag` distinguishes writers; `pad_bytes` sizes the kwargs.
pub fn event_with(stream: WorkflowId, seq: u64, tag: &str, pad_bytes: usize) -> Event {
    let pad: String = (0..pad_bytes)
        .map(|i| char::from(b'a' + ((seq as usize + i) % 26) as u8))
        .collect();
    Event {
        stream,
        seq,
        at: Timestamp::from_micros(1_700_000_000_000_000 + seq as i64),
        actor: Actor::worker(format!("test-{tag}")),
        schema: SCHEMA_VERSION,
        payload: Payload::KwargsUpdated {
            node: 0,
            kwargs: json!({ "stream": stream.to_string(), "seq": seq, "tag": tag, "pad": pad }),
        },
    }
}

/// A small event.
pub fn event(stream: WorkflowId, seq: u64) -> Event {
    event_with(stream, seq, "t", 8)
}

/// Request appending `count` events to `stream`, which is at `version`.
pub fn request(stream: WorkflowId, version: u64, count: u64) -> AppendRequest {
    AppendRequest {
        stream,
        expected_version: version,
        events: (version + 1..=version + count)
            .map(|seq| event(stream, seq))
            .collect(),
    }
}

pub fn open_sled(dir: &Path) -> SledLog {
    SledLog::open(
        dir,
        SledOptions {
            durability: Durability::Flush,
            cache_bytes: 8 * 1024 * 1024,
        },
    )
    .unwrap_or_else(|e| panic!("open sled log at {}: {e}", dir.display()))
}

/// A runtime for tests that drive async appends from a plain `#[test]`.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}
