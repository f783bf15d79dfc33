//! The event log as an engine's handles see it: a slot that [`crate::Engine::shutdown`] empties.
//!
//! A `Handle` is cheap to clone and users keep clones in places the engine does not know of
//! (a web server's state, a handler's context that outlived its attempt). If each clone held the
//! log itself, the log — a sled directory's file lock, say — would live as long as the last
//! clone, and reopening the same store after `shutdown` would fail with the store's lock error.
//! So handles hold this slot instead; the orchestrator holds the log directly (no lock on its
//! hot path). Once emptied, every call through the slot fails with
//! [`mageflow_store::Error::Closed`], which the engine reports as [`crate::Error::ShutDown`].
//! It must not do anything but forward: it decides nothing.

use mageflow_core::{NodeIndex, WorkflowId};
use mageflow_store::{AppendRequest, BoxFuture, CompactStats, Error, EventLog, Recorded, Result};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

pub(crate) struct LogSlot {
    log: RwLock<Option<Arc<dyn EventLog>>>,
    /// The head when the slot was emptied: what `head` answers afterwards.
    head_at_close: AtomicU64,
}

impl LogSlot {
    pub(crate) fn new(log: Arc<dyn EventLog>) -> Self {
        Self {
            log: RwLock::new(Some(log)),
            head_at_close: AtomicU64::new(0),
        }
    }

    fn get(&self) -> Result<Arc<dyn EventLog>> {
        // A poisoned lock only means a panic elsewhere while it was held; the slot is still a
        // plain `Option`, valid either way.
        let guard = self.log.read().unwrap_or_else(|p| p.into_inner());
        guard.clone().ok_or(Error::Closed)
    }

    /// Empty the slot; the log is dropped once nothing else holds it (a read through the slot
    /// that is under way finishes first).
    pub(crate) fn close(&self) {
        let taken = self.log.write().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(log) = taken {
            self.head_at_close.store(log.head(), Ordering::Relaxed);
        }
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.log.read().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}

impl EventLog for LogSlot {
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'static, Result<Vec<u64>>> {
        match self.get() {
            Ok(log) => log.append(requests),
            Err(e) => Box::pin(async move { Err(e) }),
        }
    }

    fn read_stream(&self, stream: WorkflowId, from_seq: u64) -> Result<Vec<mageflow_core::Event>> {
        self.get()?.read_stream(stream, from_seq)
    }

    fn read_all(&self, from: u64, limit: usize) -> Result<Vec<Recorded>> {
        self.get()?.read_all(from, limit)
    }

    fn stream_version(&self, stream: WorkflowId) -> Result<u64> {
        self.get()?.stream_version(stream)
    }

    fn head(&self) -> u64 {
        match self.get() {
            Ok(log) => log.head(),
            Err(_) => self.head_at_close.load(Ordering::Relaxed),
        }
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        match self.get() {
            Ok(log) => log.subscribe(),
            // Its sender is gone at once: a waiter sees the log closed instead of hanging.
            Err(_) => tokio::sync::watch::channel(self.head()).1,
        }
    }

    fn redact(&self, stream: WorkflowId, nodes: Vec<NodeIndex>) -> Result<Option<u64>> {
        self.get()?.redact(stream, nodes)
    }

    fn compact(
        &self,
        stream: WorkflowId,
        up_to_seq: Option<u64>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<Option<CompactStats>> {
        self.get()?.compact(stream, up_to_seq, snapshot)
    }
}
