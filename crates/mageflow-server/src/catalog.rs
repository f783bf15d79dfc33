//! The list of workflows the API filters and pages: a summary per workflow (root name and kind,
//! status, creation and last change), kept by tailing the log from the server's start — a fold
//! of the root's events only, so it costs nothing per inner signature.

use mageflow_core::{Event, Payload, Status, Timestamp, WorkflowId};
use mageflow_engine::Handle;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// Events read from the log per round of the tail.
const TAIL_BATCH: usize = 10_000;

/// What the list shows of one workflow.
#[derive(Clone, Debug, Serialize, PartialEq, utoipa::ToSchema)]
pub struct Summary {
    /// `wf_…`
    #[serde(serialize_with = "display")]
    #[schema(value_type = String)]
    pub id: WorkflowId,
    /// The root signature's name (its task's, for a task).
    pub name: String,
    /// The root's kind: task, chain, swarm, graph or gate.
    pub kind: &'static str,
    /// The root's lifecycle status (`marked_for_deletion` shows as `marked`).
    pub status: &'static str,
    pub marked: bool,
    pub purged: bool,
    /// µs since the epoch.
    #[schema(value_type = i64)]
    pub created_at: Timestamp,
    /// µs since the epoch.
    #[schema(value_type = i64)]
    pub updated_at: Timestamp,
}

fn display<S: serde::Serializer>(id: &WorkflowId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

#[derive(Default)]
struct State {
    /// Next log position to read.
    next: u64,
    workflows: BTreeMap<WorkflowId, Summary>,
    /// The list's order: by creation, then id.
    order: std::collections::BTreeSet<(Timestamp, WorkflowId)>,
    tasks: crate::taskstats::TaskStats,
}

/// The catalog, shared by the request handlers and its tail task.
#[derive(Clone, Default)]
pub struct Catalog(Arc<RwLock<State>>);

/// A filter of the list (every given field must match).
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub status: Option<String>,
    pub kind: Option<String>,
    pub name: Option<String>,
    /// Free text, matched in the id and the name.
    pub text: Option<String>,
    pub created_after: Option<Timestamp>,
    pub created_before: Option<Timestamp>,
}

impl Filter {
    fn matches(&self, s: &Summary) -> bool {
        self.status.as_deref().is_none_or(|v| v == s.status)
            && self.kind.as_deref().is_none_or(|v| v == s.kind)
            && self.name.as_deref().is_none_or(|v| v == s.name)
            && self
                .text
                .as_deref()
                .is_none_or(|t| s.name.contains(t) || s.id.to_string().contains(t))
            && self.created_after.is_none_or(|t| s.created_at >= t)
            && self.created_before.is_none_or(|t| s.created_at < t)
    }
}

/// One page of the list, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Page {
    pub items: Vec<Summary>,
    /// Pass as `cursor` for the next page; absent on the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
    /// How many workflows match the filter, by status.
    #[schema(value_type = BTreeMap<String, u64>)]
    pub counts: BTreeMap<&'static str, u64>,
}

/// Where a page of the list starts: after this (creation, id).
pub type Cursor = (Timestamp, WorkflowId);

/// A `next_cursor` read back; `None` if it is not one.
pub fn parse_cursor(c: &str) -> Option<Cursor> {
    let (at, id) = c.split_once('.')?;
    Some((Timestamp::from_micros(at.parse().ok()?), id.parse().ok()?))
}

impl Catalog {
    /// Fold one event into the summaries.
    fn apply(state: &mut State, e: &Event) {
        if e.stream.is_system() {
            return;
        }
        state.tasks.apply(e);
        if let Payload::WorkflowCreated { nodes } = &e.payload {
            if let Some(root) = nodes.first() {
                state.order.insert((e.at, e.stream));
                state.workflows.insert(
                    e.stream,
                    Summary {
                        id: e.stream,
                        name: root.name.clone(),
                        kind: root.kind.name(),
                        status: Status::Pending.name(),
                        marked: false,
                        purged: false,
                        created_at: e.at,
                        updated_at: e.at,
                    },
                );
            }
            return;
        }
        let Some(s) = state.workflows.get_mut(&e.stream) else {
            return;
        };
        s.updated_at = e.at;
        if e.payload.node() != Some(0) {
            return;
        }
        let status = match &e.payload {
            Payload::Queued { parked: true, .. }
            | Payload::ContainerStarted { parked: true, .. } => Some(Status::Suspended),
            Payload::Queued { .. } => Some(Status::Queued),
            Payload::ContainerStarted { .. } | Payload::Started { .. } => Some(Status::Running),
            Payload::RetryScheduled { .. } => Some(Status::Queued),
            Payload::Succeeded { .. } => Some(Status::Done),
            Payload::Failed { .. } => Some(Status::Failed),
            Payload::Suspended { .. } => Some(Status::Suspended),
            Payload::Interrupted { .. } => Some(Status::Interrupted),
            Payload::Canceled { .. } => Some(Status::Canceled),
            Payload::Resumed { status, .. } => Some(*status),
            Payload::Rerun { .. } => Some(Status::Pending),
            Payload::MarkedForDeletion { .. } => {
                s.marked = true;
                None
            }
            Payload::Restored { .. } => {
                s.marked = false;
                None
            }
            Payload::Purged { .. } => {
                s.purged = true;
                None
            }
            _ => None,
        };
        if let Some(status) = status {
            s.status = status.name();
            if matches!(e.payload, Payload::Rerun { .. }) {
                s.marked = false;
            }
        }
    }

    /// What each task did, as far as the log was read.
    pub fn task_figures(&self) -> BTreeMap<String, crate::taskstats::TaskFigures> {
        self.0.read().map(|s| s.tasks.figures()).unwrap_or_default()
    }

    /// Read what the log holds past the last round; returns how many events were read.
    pub fn catch_up(&self, h: &Handle) -> Result<usize, mageflow_engine::Error> {
        let mut total = 0;
        loop {
            let from = self.0.read().map(|s| s.next).unwrap_or_default();
            let batch = h
                .log()
                .read_all(from, TAIL_BATCH)
                .map_err(mageflow_engine::Error::Store)?;
            let Some(last) = batch.last().map(|r| r.position) else {
                return Ok(total);
            };
            let Ok(mut state) = self.0.write() else {
                return Ok(total);
            };
            for r in &batch {
                Self::apply(&mut state, &r.event);
            }
            state.next = last + 1;
            total += batch.len();
            if batch.len() < TAIL_BATCH {
                return Ok(total);
            }
        }
    }

    /// Tail the log until the engine stops: catch up at every new head.
    pub async fn tail(self, h: Handle) {
        let mut heads = h.log().subscribe();
        loop {
            if let Err(e) = self.catch_up(&h) {
                tracing::warn!(error = %e, "http: the workflow list could not read the log");
            }
            if heads.changed().await.is_err() {
                return;
            }
        }
    }

    /// A page of the workflows that match `filter`, newest first, after `cursor` (the
    /// `next_cursor` of the page before: `<created µs>.<workflow id>`).
    pub fn page(&self, filter: &Filter, cursor: Option<Cursor>, limit: usize) -> Page {
        let Ok(state) = self.0.read() else {
            return Page {
                items: Vec::new(),
                next_cursor: None,
                counts: BTreeMap::new(),
            };
        };
        let mut counts = BTreeMap::new();
        let mut items = Vec::new();
        let mut next_cursor = None;
        for key in state.order.iter().rev() {
            let Some(s) = state.workflows.get(&key.1) else {
                continue;
            };
            if !filter.matches(s) {
                continue;
            }
            *counts.entry(s.status).or_insert(0) += 1;
            if cursor.is_some_and(|c| *key >= c) {
                continue;
            }
            if items.len() < limit {
                items.push(s.clone());
            } else if next_cursor.is_none() {
                next_cursor = items
                    .last()
                    .map(|l: &Summary| format!("{}.{}", l.created_at.as_micros(), l.id));
            }
        }
        Page {
            items,
            next_cursor,
            counts,
        }
    }
}
