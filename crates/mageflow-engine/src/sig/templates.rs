//! Condition templates: the graphs users build again and again, instantiated in one call. Each
//! returns an ordinary [`GraphSig`] — its nodes named as documented, so a caller can add
//! nodes, edges and callbacks to it, and history and state show those names.

use super::{gate, graph, GraphSig, Sig, TaskSig};
use mageflow_core::condition::{Condition, Predicate};
use serde_json::Value;

/// `work`, then `on_success` with its result when it succeeds, or `on_failure` with its input
/// and error when it fails (a handled failure: the graph succeeds with `on_failure`'s output).
/// Nodes: `work`, `succeeded`, `failed`.
pub fn success_failure(
    work: impl Into<Sig>,
    on_success: impl Into<Sig>,
    on_failure: impl Into<Sig>,
) -> GraphSig {
    graph()
        .node("work", work)
        .node("succeeded", on_success)
        .node("failed", on_failure)
        .edge("work", "succeeded", Condition::OnSuccess)
        .edge("work", "failed", Condition::OnFailure)
}

/// `primary` with `retries` retries `backoff_ms` apart; when they are spent, `alternative`
/// runs instead (with `primary`'s input and error). The graph's result is `{"primary": …}` or
/// `{"alternative": …}`. Nodes: `primary`, `alternative`.
pub fn retry_then_alternative(
    primary: TaskSig,
    retries: u32,
    backoff_ms: u64,
    alternative: impl Into<Sig>,
) -> GraphSig {
    graph()
        .node("primary", primary.retries(retries, backoff_ms))
        .node("alternative", alternative)
        .edge("primary", "alternative", Condition::OnFailure)
}

/// `source`, then the branch whose value equals the field at `path` of `source`'s output (a
/// JSON path such as `$.variant`); `otherwise` (node `otherwise`) takes every other value, a
/// missing field and a failure of `source`. Nodes: `source`, each branch by its given name,
/// `otherwise`. Without `otherwise`, an output that matches no branch ends the graph with
/// `source`'s output alone.
pub fn ab_split(
    source: impl Into<Sig>,
    path: &str,
    branches: impl IntoIterator<Item = (String, Value, Sig)>,
    otherwise: Option<Sig>,
) -> GraphSig {
    let mut g = graph().node("source", source);
    for (name, value, sig) in branches {
        let when = Condition::Output(Predicate::Eq {
            path: path.to_owned(),
            value,
        });
        g = g.node(name.clone(), sig).edge("source", name, when);
    }
    if let Some(sig) = otherwise {
        g = g
            .node("otherwise", sig)
            .edge("source", "otherwise", Condition::Default);
    }
    g
}

/// Multi-stage validation with an approval gate: each stage runs on the previous one's output
/// once it succeeded (a failing stage fails the graph, naming it); then node `approval`, a
/// [`gate`], waits for a person's signal; accepted with `{"approved": true, …}` the document
/// goes on to `publish`, and anything else — rejected, or `approved` not `true` — goes to
/// `on_rejected` (node `rejected`; without it, a rejection ends the graph failed and an
/// unapproved signal ends it with `approval`'s output). Stages are named as given; `approval`,
/// `publish` and `rejected` must not be among those names.
pub fn approval_pipeline(
    stages: impl IntoIterator<Item = (String, Sig)>,
    publish: impl Into<Sig>,
    on_rejected: Option<Sig>,
) -> GraphSig {
    let mut g = graph();
    let mut previous: Option<String> = None;
    for (name, sig) in stages {
        g = g.node(name.clone(), sig);
        if let Some(p) = previous {
            g = g.edge(p, name.clone(), Condition::OnSuccess);
        }
        previous = Some(name);
    }
    g = g.node("approval", gate().name("approval"));
    if let Some(p) = previous {
        g = g.edge(p, "approval", Condition::OnSuccess);
    }
    let approved = Condition::Output(Predicate::Eq {
        path: "$.approved".into(),
        value: Value::Bool(true),
    });
    g = g
        .node("publish", publish)
        .edge("approval", "publish", approved);
    if let Some(sig) = on_rejected {
        g = g
            .node("rejected", sig)
            .edge("approval", "rejected", Condition::Default);
    }
    g
}
