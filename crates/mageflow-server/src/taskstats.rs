//! What each task does, as the log tells it (kept by the catalog's tail): attempts started,
//! succeeded, failed for good and retried, how many wait in the queue, and the durations of
//! its latest attempts, for percentiles.

use mageflow_core::{Event, NodeIndex, NodeSpec, Payload, Timestamp, WorkflowId};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

/// Durations kept per task for its percentiles (the latest attempts).
pub const DURATIONS_KEPT: usize = 1_024;

/// One task's figures.
#[derive(Clone, Debug, Default, Serialize, utoipa::ToSchema)]
pub struct TaskFigures {
    pub started: u64,
    pub succeeded: u64,
    /// Failed for good (retries spent or not retryable).
    pub failed: u64,
    pub retried: u64,
    /// Queued, not started yet (a retry's backoff counts as waiting).
    pub queued: u64,
    /// `failed / (succeeded + failed)`.
    pub failure_rate: f64,
    /// Of the latest attempts' durations (start to end), ms.
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    #[serde(skip)]
    durations: VecDeque<f64>,
}

#[derive(Default)]
pub struct TaskStats {
    /// Per workflow, the task name of each node (`None`: a container).
    names: HashMap<WorkflowId, Vec<Option<Arc<str>>>>,
    /// Attempts running: when each started.
    running: HashMap<(WorkflowId, NodeIndex), Timestamp>,
    tasks: BTreeMap<Arc<str>, TaskFigures>,
    /// Interned task names.
    interned: HashMap<String, Arc<str>>,
}

impl TaskStats {
    fn add_nodes(&mut self, wf: WorkflowId, nodes: &[NodeSpec]) {
        let interned = &mut self.interned;
        let names = self.names.entry(wf).or_default();
        names.extend(nodes.iter().map(|n| {
            n.task_name().map(|t| {
                interned
                    .entry(t.to_owned())
                    .or_insert_with(|| Arc::from(t))
                    .clone()
            })
        }));
    }

    fn task(&mut self, wf: WorkflowId, node: NodeIndex) -> Option<&mut TaskFigures> {
        let name = self.names.get(&wf)?.get(node as usize)?.clone()?;
        Some(self.tasks.entry(name).or_default())
    }

    /// Fold one event in.
    pub fn apply(&mut self, e: &Event) {
        let wf = e.stream;
        match &e.payload {
            Payload::WorkflowCreated { nodes } | Payload::SwarmItemsAdded { nodes, .. } => {
                self.add_nodes(wf, nodes)
            }
            Payload::Queued { node, .. } => {
                if let Some(t) = self.task(wf, *node) {
                    t.queued += 1;
                }
            }
            Payload::Started { node, .. } => {
                self.running.insert((wf, *node), e.at);
                if let Some(t) = self.task(wf, *node) {
                    t.started += 1;
                    t.queued = t.queued.saturating_sub(1);
                }
            }
            Payload::Succeeded { node, attempt, .. }
            | Payload::Failed { node, attempt, .. }
            | Payload::RetryScheduled { node, attempt, .. }
                if *attempt > 0 =>
            {
                let started = self.running.remove(&(wf, *node));
                let kind = e.payload.kind();
                if let Some(t) = self.task(wf, *node) {
                    match kind {
                        "succeeded" => t.succeeded += 1,
                        "failed" => t.failed += 1,
                        _ => {
                            t.retried += 1;
                            // Waiting for its next attempt.
                            t.queued += 1;
                        }
                    }
                    if let Some(s) = started {
                        if t.durations.len() == DURATIONS_KEPT {
                            t.durations.pop_front();
                        }
                        t.durations
                            .push_back((e.at.as_micros() - s.as_micros()) as f64 / 1000.0);
                    }
                }
            }
            Payload::Canceled { node } | Payload::Interrupted { node } => {
                self.running.remove(&(wf, *node));
            }
            Payload::Purged { .. } => {
                self.names.remove(&wf);
                self.running.retain(|(w, _), _| *w != wf);
            }
            _ => {}
        }
    }

    /// Every task's figures, percentiles worked out.
    pub fn figures(&self) -> BTreeMap<String, TaskFigures> {
        self.tasks
            .iter()
            .map(|(name, t)| {
                let mut t = t.clone();
                let mut sorted: Vec<f64> = t.durations.iter().copied().collect();
                sorted.sort_by(f64::total_cmp);
                let at = |p: f64| {
                    if sorted.is_empty() {
                        return 0.0;
                    }
                    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
                };
                (t.p50_ms, t.p95_ms, t.p99_ms) = (at(0.5), at(0.95), at(0.99));
                let ended = t.succeeded + t.failed;
                t.failure_rate = if ended == 0 {
                    0.0
                } else {
                    t.failed as f64 / ended as f64
                };
                (name.to_string(), t)
            })
            .collect()
    }
}
