//! Integration tests of the event log backends: one conformance suite every backend runs,
//! corruption of sled's stored bytes, and a real `kill -9` crash test. One binary (this one) keeps
//! link times down; the crash test re-executes it as its child process. Redaction of a stream in
//! the sled log has its own module.

mod conformance;
mod corruption;
mod crash;
mod redaction;

use mageflow_store::{Durability, SledLog, SledOptions};
use std::path::Path;

pub use mageflow_store::conformance::{event, event_with, request, stream};

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
