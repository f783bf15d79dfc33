//! What the API answers about a workflow: its tree (containers with their first children
//! inline and the rest counted), a page of a container's children, a signature's detail.

use crate::CHILDREN_INLINE;
use mageflow_core::{Event, NodeIndex, Outcome, Payload, Timestamp, Workflow};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;

/// One signature in a tree.
#[derive(Serialize, utoipa::ToSchema)]
pub struct NodeView {
    pub index: NodeIndex,
    pub id: String,
    pub name: String,
    #[schema(value_type = String)]
    pub kind: &'static str,
    #[schema(value_type = String)]
    pub status: &'static str,
    pub attempt: u32,
    #[serde(skip_serializing_if = "is_zero")]
    pub priority: i32,
    /// A container's children, to [`CHILDREN_INLINE`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    pub children: Vec<NodeView>,
    /// A container's children in all.
    #[serde(skip_serializing_if = "is_zero_usize")]
    pub children_total: usize,
    /// Everything inside a container, to any depth, by status.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    #[schema(value_type = BTreeMap<String, u64>)]
    pub inner: BTreeMap<&'static str, u64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    pub on_success: Vec<NodeView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    pub on_error: Vec<NodeView>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    #[schema(no_recursion)]
    pub on_cleanup: Vec<NodeView>,
}

fn is_zero(p: &i32) -> bool {
    *p == 0
}

fn is_zero_usize(n: &usize) -> bool {
    *n == 0
}

/// The view of `index` and what hangs off it, `depth` levels of children down (callbacks are
/// shown whole with their owner).
pub fn node(wf: &Workflow, index: NodeIndex, depth: usize) -> Option<NodeView> {
    let n = wf.node(index)?;
    let children = n.spec.children();
    let list = |ids: &[NodeIndex], d: usize| -> Vec<NodeView> {
        ids.iter().filter_map(|&c| node(wf, c, d)).collect()
    };
    Some(NodeView {
        index,
        id: wf.sig(index).to_string(),
        name: n.spec.name.clone(),
        kind: n.spec.kind.name(),
        status: n.visible_status().name(),
        attempt: n.attempt,
        priority: n.spec.priority,
        children: match depth {
            0 => Vec::new(),
            d => list(&children[..children.len().min(CHILDREN_INLINE)], d - 1),
        },
        children_total: children.len(),
        inner: if n.is_container() {
            wf.inner_counts(index)
        } else {
            BTreeMap::new()
        },
        on_success: list(&n.spec.on_success, depth.saturating_sub(1)),
        on_error: list(&n.spec.on_error, depth.saturating_sub(1)),
        on_cleanup: list(&n.spec.on_cleanup, depth.saturating_sub(1)),
    })
}

/// A workflow's tree.
#[derive(Serialize, utoipa::ToSchema)]
pub struct TreeView {
    pub id: String,
    pub version: u64,
    pub purged: bool,
    pub root: Option<NodeView>,
    /// Of the signatures inside the root, the share that ended (done, failed, canceled,
    /// skipped), 0 to 1.
    pub progress: f64,
    /// Time left at the rate observed since the workflow was created, while it runs and once
    /// something inside ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_ms: Option<u64>,
}

/// Levels of children a tree shows.
pub const TREE_DEPTH: usize = 8;

/// The tree of `wf` at `now` (for its ETA).
pub fn tree(wf: &Workflow, now: Timestamp) -> TreeView {
    let root = node(wf, 0, TREE_DEPTH);
    let (ended, total) = root.as_ref().map_or((0, 0), |r| {
        let ended = ["done", "failed", "canceled", "skipped"]
            .iter()
            .filter_map(|s| r.inner.get(s))
            .sum::<u64>();
        (ended, r.inner.values().sum::<u64>())
    });
    let progress = if total == 0 {
        0.0
    } else {
        ended as f64 / total as f64
    };
    let running = wf.root().is_some_and(|r| !r.status.is_terminal());
    let eta_ms = match (wf.created_at, running, ended) {
        (Some(created), true, ended) if ended > 0 && ended < total => {
            let elapsed = (now.as_micros() - created.as_micros()).max(0) as f64 / 1000.0;
            Some((elapsed * (total - ended) as f64 / ended as f64) as u64)
        }
        _ => None,
    };
    TreeView {
        id: wf.id.to_string(),
        version: wf.version,
        purged: wf.purged,
        root,
        progress,
        eta_ms,
    }
}

/// One attempt of a task, from its events.
#[derive(Serialize, utoipa::ToSchema)]
pub struct AttemptView {
    pub attempt: u32,
    /// µs since the epoch.
    #[schema(value_type = i64)]
    pub started_at: Timestamp,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<i64>)]
    pub ended_at: Option<Timestamp>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<f64>,
    /// `succeeded`, `failed`, `retry_scheduled`, or absent while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub ended: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A signature's detail.
#[derive(Serialize, utoipa::ToSchema)]
pub struct DetailView {
    #[serde(flatten)]
    pub node: NodeView,
    /// The spec as submitted: kind settings, kwargs, callbacks (by index).
    #[schema(value_type = Object)]
    pub spec: Value,
    /// The input it runs with (its message and kwargs merged), once triggered.
    #[serde(skip_serializing_if = "Value::is_null")]
    #[schema(value_type = Object)]
    pub input: Value,
    #[serde(skip_serializing_if = "Value::is_null")]
    #[schema(value_type = Object)]
    pub result: Value,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub checkpoint: Option<Value>,
    pub attempts: Vec<AttemptView>,
}

pub fn detail(wf: &Workflow, index: NodeIndex, history: &[Event]) -> Option<DetailView> {
    let n = wf.node(index)?;
    let mut attempts: Vec<AttemptView> = Vec::new();
    for e in history.iter().filter(|e| e.payload.node() == Some(index)) {
        let end = |a: &mut AttemptView, kind: &'static str, error: Option<String>| {
            a.ended_at = Some(e.at);
            a.duration_ms = Some((e.at.as_micros() - a.started_at.as_micros()) as f64 / 1000.0);
            a.ended = Some(kind);
            a.error = error;
        };
        match &e.payload {
            Payload::Started { attempt, .. } => attempts.push(AttemptView {
                attempt: *attempt,
                started_at: e.at,
                ended_at: None,
                duration_ms: None,
                ended: None,
                error: None,
            }),
            Payload::Succeeded { attempt, .. } => {
                if let Some(a) = attempts.iter_mut().find(|a| a.attempt == *attempt) {
                    end(a, "succeeded", None);
                }
            }
            Payload::Failed { attempt, error, .. } => {
                if let Some(a) = attempts.iter_mut().find(|a| a.attempt == *attempt) {
                    end(a, "failed", Some(error.message.clone()));
                }
            }
            Payload::RetryScheduled { attempt, error, .. } => {
                if let Some(a) = attempts.iter_mut().find(|a| a.attempt == *attempt) {
                    end(a, "retry_scheduled", Some(error.message.clone()));
                }
            }
            _ => {}
        }
    }
    let (result, error) = match &n.outcome {
        Some(Outcome::Ok(v)) => (v.clone(), None),
        Some(Outcome::Err(e)) => (Value::Null, Some(e.message.clone())),
        None => (Value::Null, None),
    };
    Some(DetailView {
        node: node(wf, index, 1)?,
        spec: serde_json::to_value(&n.spec).unwrap_or_default(),
        input: if n.message.is_some() {
            wf.effective_input(index)
        } else {
            Value::Null
        },
        result,
        error,
        checkpoint: n.checkpoint.clone(),
        attempts,
    })
}

/// A page of a container's children (each with one level below it).
#[derive(Serialize, utoipa::ToSchema)]
pub struct ChildrenView {
    pub total: usize,
    pub offset: usize,
    pub children: Vec<NodeView>,
}

pub fn children(
    wf: &Workflow,
    index: NodeIndex,
    offset: usize,
    limit: usize,
) -> Option<ChildrenView> {
    let n = wf.node(index)?;
    let all = n.spec.children();
    let page = all.iter().skip(offset).take(limit);
    Some(ChildrenView {
        total: all.len(),
        offset,
        children: page.filter_map(|&c| node(wf, c, 1)).collect(),
    })
}
