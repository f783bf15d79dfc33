//! The compaction job: each finished workflow is compacted `Config::compact_after` after it
//! finished — its events move into the log's compressed archive with a snapshot of its final
//! state (`EventLog::compact`). Reads of its events are unchanged; a compacted workflow touched
//! again (read, rerun, resumed) is loaded back from the archive by `read_stream`. A log that
//! cannot compact (in-memory) is left as it is.

use crate::engine::Handle;
use crate::error::{Error, Result};
use mageflow_core::WorkflowId;
use mageflow_store::CompactStats;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Default delay between a workflow finishing and its compaction.
pub const COMPACT_AFTER_DEFAULT: Duration = Duration::from_secs(300);

/// What compaction did since the engine started.
#[derive(Debug, Default)]
pub struct CompactionStats {
    pub workflows: AtomicU64,
    pub events: AtomicU64,
    /// Uncompressed and stored sizes of the archives written (whole segments).
    pub raw_bytes: AtomicU64,
    pub compressed_bytes: AtomicU64,
    pub failures: AtomicU64,
}

/// Run until `stop`: compact each workflow told on `finished`, `after` it was told.
pub(crate) async fn run(
    mut finished: mpsc::UnboundedReceiver<WorkflowId>,
    h: Handle,
    after: Duration,
    stop: CancellationToken,
) {
    let mut due: VecDeque<(tokio::time::Instant, WorkflowId)> = VecDeque::new();
    loop {
        let next = due.front().map(|(at, _)| *at);
        tokio::select! {
            _ = stop.cancelled() => return,
            wf = finished.recv() => match wf {
                Some(wf) => due.push_back((tokio::time::Instant::now() + after, wf)),
                None => return,
            },
            _ = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => {
                while let Some((at, wf)) = due.front().copied() {
                    if at > tokio::time::Instant::now() || stop.is_cancelled() {
                        break;
                    }
                    due.pop_front();
                    if let Err(e) = compact(&h, wf).await {
                        h.stats().compaction.failures.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(%wf, error = %e, "compaction failed; the workflow stays in the live log");
                    }
                }
            }
        }
    }
}

/// Snapshot the durable state of `wf` and move its events up to that state's version into the
/// archive. Events appended meanwhile (a rerun) stay live. `None` if it is not finished or the
/// log cannot compact.
pub(crate) async fn compact(h: &Handle, wf: WorkflowId) -> Result<Option<CompactStats>> {
    let state = h.workflow(wf).await?;
    if !state.is_finished() {
        return Ok(None);
    }
    let snapshot = state.to_snapshot().map_err(|e| {
        Error::Store(mageflow_store::Error::Storage(format!(
            "cannot snapshot {wf}: {e}"
        )))
    })?;
    let (log, version) = (h.log().clone(), state.version);
    let compacted =
        tokio::task::spawn_blocking(move || log.compact(wf, Some(version), Some(snapshot)))
            .await
            .map_err(|e| {
                Error::Store(mageflow_store::Error::Storage(format!(
                    "the compaction of {wf} stopped: {e}"
                )))
            })??;
    let Some(c) = compacted else {
        return Ok(None);
    };
    let stats = &h.stats().compaction;
    stats.workflows.fetch_add(1, Ordering::Relaxed);
    stats.events.fetch_add(c.events, Ordering::Relaxed);
    stats.raw_bytes.fetch_add(c.raw_bytes, Ordering::Relaxed);
    stats
        .compressed_bytes
        .fetch_add(c.compressed_bytes, Ordering::Relaxed);
    tracing::debug!(%wf, events = c.events, raw_bytes = c.raw_bytes, compressed_bytes = c.compressed_bytes, "workflow compacted");
    Ok(Some(c))
}
