//! What happened around the engine during a run, on virtual time: faults applied, claims,
//! reports and where they went, stops published. Only for reading a failing seed (`--verbose`):
//! the checks never look at it.

use mageflow_core::WorkflowId;
use std::sync::{Mutex, MutexGuard};

/// Most lines kept (a run of the default size writes a few hundred).
const TRACE_LINES_MAX: usize = 20_000;

pub struct Trace {
    start: tokio::time::Instant,
    lines: Mutex<Vec<(u64, Option<WorkflowId>, String)>>,
}

impl Trace {
    pub fn new() -> Self {
        Self {
            start: tokio::time::Instant::now(),
            lines: Mutex::default(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<(u64, Option<WorkflowId>, String)>> {
        self.lines.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Virtual ms since the run began.
    pub fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Virtual µs since the run began.
    pub fn now_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    /// Note `what` (about `wf`, or the whole system).
    pub fn note(&self, wf: Option<WorkflowId>, what: impl Into<String>) {
        let mut lines = self.lock();
        if lines.len() < TRACE_LINES_MAX {
            lines.push((self.now_ms(), wf, what.into()));
        }
    }

    /// The lines about `wf` or about everything, rendered.
    pub fn about(&self, wf: WorkflowId) -> Vec<String> {
        self.lock()
            .iter()
            .filter(|(_, w, _)| w.is_none_or(|w| w == wf))
            .map(|(t, _, s)| format!("  @{t:>6} ms {s}"))
            .collect()
    }
}

impl Default for Trace {
    fn default() -> Self {
        Self::new()
    }
}
