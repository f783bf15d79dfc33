//! In-memory event log: the reference backend. Appends are immediate and atomic under one lock.

use crate::{check_request, AppendRequest, BoxFuture, Error, EventLog, Recorded, Result};
use mageflow_core::{Event, WorkflowId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::watch;

#[derive(Default)]
struct Inner {
    events: Vec<Arc<Event>>,
    /// Per stream: global positions (0-based indexes into `events`) in seq order.
    streams: HashMap<WorkflowId, Vec<usize>>,
}

pub struct MemoryLog {
    inner: Mutex<Inner>,
    head: watch::Sender<u64>,
}

impl Default for MemoryLog {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryLog {
    pub fn new() -> Self {
        Self {
            inner: Mutex::new(Inner::default()),
            head: watch::channel(0).0,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-written (appends validate
        // first, then push), so a poisoned lock is still consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append_now(&self, requests: Vec<AppendRequest>) -> Result<Vec<u64>> {
        let mut inner = self.lock();
        let mut pending: HashMap<WorkflowId, u64> = HashMap::new();
        for req in &requests {
            check_request(req)?;
            let actual = match pending.get(&req.stream) {
                Some(v) => *v,
                None => inner.streams.get(&req.stream).map_or(0, |p| p.len() as u64),
            };
            if actual != req.expected_version {
                return Err(Error::Conflict {
                    stream: req.stream,
                    expected: req.expected_version,
                    actual,
                });
            }
            pending.insert(req.stream, actual + req.events.len() as u64);
        }
        let mut last = Vec::with_capacity(requests.len());
        for req in requests {
            for event in req.events {
                let pos = inner.events.len();
                inner.events.push(Arc::new(event));
                inner.streams.entry(req.stream).or_default().push(pos);
            }
            last.push(inner.events.len() as u64);
        }
        let head = inner.events.len() as u64;
        drop(inner);
        self.head.send_replace(head);
        Ok(last)
    }
}

impl EventLog for MemoryLog {
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'static, Result<Vec<u64>>> {
        let result = self.append_now(requests);
        Box::pin(async move { result })
    }

    fn read_stream(&self, stream: WorkflowId, from_seq: u64) -> Result<Vec<Event>> {
        let inner = self.lock();
        let Some(positions) = inner.streams.get(&stream) else {
            return Ok(Vec::new());
        };
        let skip = from_seq.saturating_sub(1) as usize;
        Ok(positions
            .iter()
            .skip(skip)
            .map(|&p| (*inner.events[p]).clone())
            .collect())
    }

    fn read_all(&self, from: u64, limit: usize) -> Result<Vec<Recorded>> {
        let inner = self.lock();
        let start = from.saturating_sub(1) as usize;
        Ok(inner
            .events
            .iter()
            .enumerate()
            .skip(start)
            .take(limit)
            .map(|(i, e)| Recorded {
                position: i as u64 + 1,
                event: (**e).clone(),
            })
            .collect())
    }

    fn stream_version(&self, stream: WorkflowId) -> Result<u64> {
        Ok(self
            .lock()
            .streams
            .get(&stream)
            .map_or(0, |p| p.len() as u64))
    }

    fn head(&self) -> u64 {
        *self.head.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }
}
