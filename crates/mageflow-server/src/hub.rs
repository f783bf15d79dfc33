//! The live end of the event streams: one task reads the log as it grows and serializes each
//! event once, for every client (`broadcast`, a batch per read: a client wakes once per batch,
//! not per event); a client catches up from the log itself (from
//! its `Last-Event-ID`) and switches to the hub once it has reached it — or back, if it fell
//! so far behind that the hub's buffer moved past it. So a hundred clients cost one reader and
//! one serialization per event, and each still gets every event once, in order.

use mageflow_core::{Event, WorkflowId};
use mageflow_store::{EventLog, Recorded};
use std::sync::Arc;
use tokio::sync::broadcast;

/// Batches the hub keeps for clients that are a little behind; one further behind reads the
/// log.
pub const HUB_BUFFER: usize = 1_024;
/// Events read from the log per round (by the hub, and by a client catching up).
pub const READ_BATCH: usize = 1_000;

/// One event as the streams send it.
#[derive(Debug)]
pub struct Frame {
    pub position: u64,
    pub stream: WorkflowId,
    pub kind: &'static str,
    /// The event as JSON.
    pub data: String,
}

impl Frame {
    pub fn of(r: &Recorded) -> Self {
        Self::from_event(r.position, &r.event)
    }

    fn from_event(position: u64, e: &Event) -> Self {
        Self {
            position,
            stream: e.stream,
            kind: e.payload.kind(),
            data: serde_json::to_string(e).unwrap_or_default(),
        }
    }
}

/// Consecutive frames, as one read of the log gave them.
pub type Batch = Arc<[Frame]>;

/// The hub: subscribe for the batches it reads from now on.
#[derive(Clone)]
pub struct Hub {
    tx: broadcast::Sender<Batch>,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            tx: broadcast::channel(HUB_BUFFER).0,
        }
    }
}

impl Hub {
    pub fn subscribe(&self) -> broadcast::Receiver<Batch> {
        self.tx.subscribe()
    }

    /// Read the log from its head on, until it stops, sending every event once.
    pub async fn run(self, log: Arc<dyn EventLog>) {
        let mut heads = log.subscribe();
        let mut next = log.head() + 1;
        loop {
            match log.read_all(next, READ_BATCH) {
                Ok(batch) if !batch.is_empty() => {
                    next = batch.last().map_or(next, |r| r.position + 1);
                    let frames: Batch = batch.iter().map(Frame::of).collect();
                    // No subscriber: nobody to send to (not an error).
                    let _ = self.tx.send(frames);
                }
                Ok(_) => {
                    if heads.changed().await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "http: the event hub could not read the log");
                    if heads.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
    }
}
