//! The compaction job: each finished workflow is compacted `Config::compact_after` after it
//! finished — its events move into the log's compressed archive with a snapshot of its final
//! state (`EventLog::compact`) — and every `Config::compact_history.every` the old history of
//! running workflows with many live events moves there too (no snapshot). Reads of their events
//! are unchanged; a compacted workflow touched again (read, rerun, resumed) is loaded back from
//! the archive by `read_stream`. A log that cannot compact (in-memory) is left as it is.

use crate::engine::config::HistoryCompaction;
use crate::engine::handle::Handle;
use crate::error::{Error, Result};
use mageflow_core::WorkflowId;
use mageflow_store::CompactStats;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What one pass over the running workflows did ([`Handle::compact_history`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HistoryPass {
    /// Running workflows with more live events than the threshold.
    pub candidates: u64,
    /// Those whose old history moved into the archive.
    pub compacted: u64,
    /// Events moved.
    pub events: u64,
    /// Candidates left for a later pass: the compaction floor did not reach their events
    /// within the pass (the hot-tier projector is behind), or the log cannot compact.
    pub deferred: u64,
}

/// How long a pass waits for the compaction floor to reach the log's head, at most.
const FLOOR_WAIT_MAX: Duration = Duration::from_secs(5);
const FLOOR_POLL: Duration = Duration::from_millis(10);

// The handle's compaction calls live here, with the job they share code with: the job uses the
// handle (this module sits above `engine::handle`), so the handle cannot call into it.
impl Handle {
    /// Compact a finished workflow now (what the compaction job does `Config::compact_after`
    /// after it finished): its events move into the log's archive with a snapshot of its final
    /// state. `None` if it is not finished (running again after a rerun, say) or the log cannot
    /// compact.
    pub async fn compact(&self, wf: WorkflowId) -> Result<Option<mageflow_store::CompactStats>> {
        crate::compaction::compact(self, wf).await
    }

    /// Compact the old history of running workflows now, as `settings` say (what the job does
    /// every `Config::compact_history.every`): each running workflow with more than
    /// `live_events_over` live events has all but its newest `keep_live` moved into the archive,
    /// once `Config::compaction_floor` has passed them.
    pub async fn compact_history(
        &self,
        settings: &HistoryCompaction,
    ) -> Result<crate::compaction::HistoryPass> {
        crate::compaction::compact_history(self, settings).await
    }
}

/// Run until `stop`: compact each workflow told on `finished` `Config::compact_after` after it
/// was told, and pass over the running workflows every `Config::compact_history.every`.
pub(crate) async fn run(
    mut finished: mpsc::UnboundedReceiver<WorkflowId>,
    h: Handle,
    stop: CancellationToken,
) {
    let after = h.config().compact_after;
    let history = h.config().compact_history.clone();
    let mut due: VecDeque<(tokio::time::Instant, WorkflowId)> = VecDeque::new();
    let mut pass = history.as_ref().map(|s| {
        let mut every = tokio::time::interval(s.every.max(Duration::from_millis(1)));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        every
    });
    loop {
        let next = due.front().map(|(at, _)| *at);
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            wf = finished.recv(), if after.is_some() => match (wf, after) {
                (Some(wf), Some(after)) => due.push_back((tokio::time::Instant::now() + after, wf)),
                _ => return,
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
            _ = async {
                match pass.as_mut() {
                    Some(every) => every.tick().await,
                    None => std::future::pending().await,
                }
            } => {
                if let Some(settings) = &history {
                    if let Err(e) = compact_history(&h, settings).await {
                        tracing::warn!(error = %e, "compaction of running workflows failed; their history stays in the live log");
                    }
                }
            }
        }
    }
}

/// One pass over the running workflows (see [`Handle::compact_history`]). A workflow's events
/// are moved only up to a version that was durable before the log's head was read, and only
/// once the compaction floor has reached that head: every moved event was seen by whatever
/// tails the live log.
pub(crate) async fn compact_history(
    h: &Handle,
    settings: &HistoryCompaction,
) -> Result<HistoryPass> {
    let keep = settings.keep_live.max(1);
    let over = settings.live_events_over;
    let mut pass = HistoryPass::default();
    let long = h.long_running(over.saturating_add(1)).await?;
    let log = h.log().clone();
    let archived = {
        let mut archived = h.archived_to().lock().unwrap_or_else(|p| p.into_inner());
        archived.retain(|wf, _| long.contains(wf));
        archived.clone()
    };
    let (targets, head) = blocking(move || {
        let mut targets = Vec::new();
        for wf in long {
            // Durable versions first, then the head: every event up to them is at or below it.
            let version = log.stream_version(wf)?;
            let done = archived.get(&wf).copied().unwrap_or(0);
            let target = version.saturating_sub(keep);
            if version.saturating_sub(done) > over && target > done {
                targets.push((wf, done, target));
            }
        }
        Ok::<_, mageflow_store::Error>((targets, log.head()))
    })
    .await??;
    pass.candidates = targets.len() as u64;
    if targets.is_empty() {
        return Ok(pass);
    }
    if let Some(floor) = &h.config().compaction_floor {
        let waited = tokio::time::Instant::now();
        while (floor.0)() < head {
            if waited.elapsed() >= FLOOR_WAIT_MAX.min(settings.every) {
                tracing::debug!(
                    head,
                    floor = (floor.0)(),
                    "compaction of running workflows deferred: the floor is behind"
                );
                pass.deferred = pass.candidates;
                return Ok(pass);
            }
            tokio::time::sleep(FLOOR_POLL).await;
        }
    }
    for (wf, done, target) in targets {
        let chunked = compact_chunked(h, wf, done, target, settings.chunk_events, None).await?;
        let Some(moved) = chunked else {
            pass.deferred += 1; // the log cannot compact
            continue;
        };
        h.archived_to()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(wf, target);
        count(h, &moved, &h.stats().compaction.running_workflows);
        pass.compacted += 1;
        pass.events += moved.events;
        tracing::debug!(%wf, up_to = target, events = moved.events, "old history of a running workflow compacted");
    }
    Ok(pass)
}

/// Snapshot the durable state of `wf` and move its events up to that state's version into the
/// archive. Events appended meanwhile (a rerun) stay live. `None` if it is not finished or the
/// log cannot compact.
pub(crate) async fn compact(h: &Handle, wf: WorkflowId) -> Result<Option<CompactStats>> {
    // Snapshotted where the state is, without copying it (a finished swarm of a million tasks
    // is large).
    let snapshot = h
        .inspect(wf, |state| {
            state
                .is_finished()
                .then(|| state.to_snapshot().map(|s| (state.version, s)))
        })
        .await?;
    let Some(snapshot) = snapshot else {
        return Ok(None);
    };
    let (version, snapshot) = snapshot.map_err(|e| {
        Error::Store(mageflow_store::Error::Storage(format!(
            "cannot snapshot {wf}: {e}"
        )))
    })?;
    let chunk = h
        .config()
        .compact_history
        .as_ref()
        .map_or(HistoryCompaction::default().chunk_events, |s| {
            s.chunk_events
        });
    let Some(c) = compact_chunked(h, wf, 0, version, chunk, Some(snapshot)).await? else {
        return Ok(None);
    };
    count(h, &c, &h.stats().compaction.workflows);
    tracing::debug!(%wf, events = c.events, raw_bytes = c.raw_bytes, compressed_bytes = c.compressed_bytes, "workflow compacted");
    Ok(Some(c))
}

/// Move `wf`'s live events from after seq `done` up to `target` into the archive, at most
/// `chunk` per `EventLog::compact` call (a call holds what it moves in memory), `snapshot` with
/// the last call. Summed stats; `None` if the log cannot compact.
async fn compact_chunked(
    h: &Handle,
    wf: WorkflowId,
    mut done: u64,
    target: u64,
    chunk: u64,
    mut snapshot: Option<Vec<u8>>,
) -> Result<Option<CompactStats>> {
    let mut moved = CompactStats::default();
    loop {
        let up_to = target.min(done.saturating_add(chunk.max(1)));
        let last = up_to >= target;
        let snap = if last { snapshot.take() } else { None };
        let log = h.log().clone();
        let Some(c) = blocking(move || log.compact(wf, Some(up_to), snap)).await?? else {
            return Ok(None);
        };
        moved.events += c.events;
        moved.segments += c.segments;
        moved.raw_bytes += c.raw_bytes;
        moved.compressed_bytes += c.compressed_bytes;
        done = up_to;
        if last {
            return Ok(Some(moved));
        }
    }
}

/// Add one compaction to the engine's counters (`which`: the kind of workflow it was).
fn count(h: &Handle, c: &CompactStats, which: &AtomicU64) {
    let stats = &h.stats().compaction;
    which.fetch_add(1, Ordering::Relaxed);
    stats.events.fetch_add(c.events, Ordering::Relaxed);
    stats.raw_bytes.fetch_add(c.raw_bytes, Ordering::Relaxed);
    stats
        .compressed_bytes
        .fetch_add(c.compressed_bytes, Ordering::Relaxed);
}

/// Run a blocking log call on a blocking thread.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        Error::Store(mageflow_store::Error::Storage(format!(
            "a compaction stopped: {e}"
        )))
    })
}
