//! The engine's live counters ([`Stats`], with [`CompactionStats`] inside): atomics that the
//! orchestrator and the compaction job bump and anyone reads, without asking the orchestrator.

use std::sync::atomic::AtomicU64;

/// Live counters, readable at any time without asking the orchestrator.
#[derive(Default, Debug)]
pub struct Stats {
    /// Events made durable in the log.
    pub events_written: AtomicU64,
    /// Appends (batches with at least one event) made durable.
    pub appends: AtomicU64,
    /// Batches whose append failed (their effects were dropped and their workflows reloaded).
    pub append_failures: AtomicU64,
    /// Task attempts started (handed to a handler, or to the hot tier's workers).
    pub attempts_started: AtomicU64,
    /// Task attempts that succeeded (containers not counted).
    pub tasks_succeeded: AtomicU64,
    /// Tasks that failed for good (containers not counted).
    pub tasks_failed: AtomicU64,
    /// Retries scheduled, lost attempts requeued after a restart included.
    pub retries_scheduled: AtomicU64,
    /// Workflows finished (each counted once, when its finishing events are durable).
    pub workflows_finished: AtomicU64,
    /// Attempts holding a worker slot now.
    pub running: AtomicU64,
    /// Most attempts that held a worker slot at once.
    pub running_peak: AtomicU64,
    /// Workflows whose canceled or purged task data was redacted from the log.
    pub workflows_redacted: AtomicU64,
    /// What compaction did.
    pub compaction: CompactionStats,
}

/// What compaction did since the engine started.
#[derive(Debug, Default)]
pub struct CompactionStats {
    pub workflows: AtomicU64,
    pub events: AtomicU64,
    /// Uncompressed and stored sizes of the archives written (whole segments).
    pub raw_bytes: AtomicU64,
    pub compressed_bytes: AtomicU64,
    pub failures: AtomicU64,
    /// Compactions of a running workflow's old history (their events and bytes are counted in
    /// the totals above too).
    pub running_workflows: AtomicU64,
}
