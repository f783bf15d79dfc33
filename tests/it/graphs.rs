//! Conditional graphs through the engine, on every store and on the deployment: routing on an
//! output predicate (history names the edge taken and what its condition saw), a bounded loop
//! that runs a real handler again until its output says stop, a graph inside a swarm inside a
//! chain, and a bad graph refused at submission with nothing written.

use crate::support::{Env, Store};
use anyhow::{Context, Result};
use mageflow::{
    chain, graph, sign, swarm, templates, Condition, Outcome, Payload, Predicate, Registry,
    SignatureId, Status, TaskFailure, Until, Workflow, WorkflowId,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

all_stores!(
    a_graph_routes_on_its_output_and_history_says_why,
    a_bounded_loop_runs_its_handler_again_until_it_says_stop,
    a_graph_inside_a_swarm_inside_a_chain_passes_its_result_on,
    a_graph_that_could_not_run_is_refused_at_submission,
    an_approval_gate_waits_for_a_signal_and_routes_on_it,
    retry_then_alternative_runs_the_alternative_once_retries_are_spent,
    a_named_predicate_registered_in_rust_routes_and_history_records_its_answer,
);
on_cluster!(
    a_named_predicate_registered_in_rust_routes_and_history_records_its_answer,
    a_graph_routes_on_its_output_and_history_says_why,
    a_bounded_loop_runs_its_handler_again_until_it_says_stop,
    an_approval_gate_waits_for_a_signal_and_routes_on_it,
);

fn eq(path: &str, value: Value) -> Condition {
    Condition::Output(Predicate::Eq {
        path: path.into(),
        value,
    })
}

/// `classify` returns its kwargs' `variant`; `label` returns its kwargs' `as`; `until_three`
/// returns `{"ok": n >= 3}` on its n-th run.
fn tasks(runs: &Arc<AtomicU32>) -> Registry {
    let mut tasks = Registry::new();
    tasks.task("classify", |i: Value, _ctx| async move {
        Ok::<_, TaskFailure>(json!({ "variant": i["variant"] }))
    });
    tasks.task("label", |i: Value, _ctx| async move {
        Ok::<_, TaskFailure>(i["as"].clone())
    });
    tasks.task("check", |i: Value, _ctx| async move {
        Ok::<_, TaskFailure>(json!({ "doc": i["doc"], "checked": true }))
    });
    tasks.task("flaky", |_: Value, _ctx| async move {
        Err::<Value, _>(TaskFailure::retryable("upstream down"))
    });
    // A named predicate: a customer id of the VIP range.
    tasks.predicate("vip", |v: &Value| {
        v.as_str().is_some_and(|s| s.starts_with("vip-"))
    });
    let runs = runs.clone();
    tasks.task("until_three", move |_: Value, _ctx| {
        let n = runs.fetch_add(1, SeqCst) + 1;
        async move { Ok::<_, TaskFailure>(json!({ "ok": n >= 3, "run": n })) }
    });
    tasks
}

fn ab_split() -> mageflow::GraphSig {
    graph()
        .name("ab")
        .node("classify", sign("classify"))
        .node("a", sign("label").kwarg("as", "went a"))
        .node("b", sign("label").kwarg("as", "went b"))
        .node("other", sign("label").kwarg("as", "went elsewhere"))
        .edge("classify", "a", eq("$.variant", json!("a")))
        .edge("classify", "b", eq("$.variant", json!("b")))
        .edge("classify", "other", Condition::Default)
}

async fn a_graph_routes_on_its_output_and_history_says_why(store: Store) -> Result<()> {
    let env = Env::start(store, tasks(&Arc::default())).await?;
    let h = env.handle();
    let wf = h.submit(ab_split(), json!({"variant": "b"})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(
        done.nodes[0].outcome,
        Some(Outcome::Ok(json!({"b": "went b"})))
    );
    let status = |name: &str| {
        done.nodes
            .iter()
            .find(|n| n.spec.name == name)
            .map(|n| n.status)
    };
    assert_eq!(status("a"), Some(Status::Skipped));
    assert_eq!(status("other"), Some(Status::Skipped));
    let history = h.history(wf)?;
    let routed: Vec<_> = history
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::GraphRouted { decisions, .. } if !decisions.is_empty() => Some(decisions),
            _ => None,
        })
        .collect();
    let first = routed.first().context("the classification was routed")?;
    let taken: Vec<_> = first
        .iter()
        .map(|d| (d.edge, d.taken, d.saw.clone()))
        .collect();
    assert_eq!(
        taken,
        vec![
            (0, false, json!("b")),
            (1, true, json!("b")),
            (2, false, Value::Null)
        ]
    );
    // The log folds to the state the engine holds (replay takes the same path).
    assert_eq!(Workflow::replay(wf, &history)?, h.workflow(wf).await?);
    env.shutdown().await;
    Ok(())
}

async fn a_bounded_loop_runs_its_handler_again_until_it_says_stop(store: Store) -> Result<()> {
    let runs = Arc::new(AtomicU32::new(0));
    let env = Env::start(store, tasks(&runs)).await?;
    let h = env.handle();
    let retrying = graph()
        .node("try", sign("until_three"))
        .node("done", sign("label").kwarg("as", "finally"))
        .loop_edge("try", "try", eq("$.ok", json!(false)), 5)
        .edge("try", "done", eq("$.ok", json!(true)));
    let wf = h.submit(retrying, json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(runs.load(SeqCst), 3, "ran until its output said ok");
    assert_eq!(
        done.nodes[0].outcome,
        Some(Outcome::Ok(json!({"done": "finally"})))
    );

    // A bound too low: the graph fails, saying so.
    runs.store(0, SeqCst);
    let low = graph()
        .node("try", sign("until_three"))
        .node("done", sign("label").kwarg("as", "finally"))
        .loop_edge("try", "try", eq("$.ok", json!(false)), 1)
        .edge("try", "done", eq("$.ok", json!(true)));
    let wf = h.submit(low, json!({})).await?;
    let failed = h.wait(wf).await?;
    assert_eq!(failed.nodes[0].status, Status::Failed);
    match &failed.nodes[0].outcome {
        Some(Outcome::Err(e)) => assert!(
            e.message.starts_with("graph_loop_exceeded"),
            "{}",
            e.message
        ),
        other => anyhow::bail!("expected a loop failure, got {other:?}"),
    }
    assert_eq!(runs.load(SeqCst), 2);
    env.shutdown().await;
    Ok(())
}

async fn a_graph_inside_a_swarm_inside_a_chain_passes_its_result_on(store: Store) -> Result<()> {
    let env = Env::start(store, tasks(&Arc::default())).await?;
    let h = env.handle();
    let a = ab_split().kwarg("variant", "a");
    let b = ab_split().kwarg("variant", "zzz");
    let flow = chain([
        mageflow::Sig::from(swarm([a, b]).max_concurrency(2)),
        sign("label").kwarg("as", "reported").into(),
    ]);
    let wf = h.submit(flow, json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    let swarm_node = &done.nodes[1];
    assert_eq!(
        swarm_node.outcome,
        Some(Outcome::Ok(json!([
            {"ok": {"a": "went a"}},
            {"ok": {"other": "went elsewhere"}}
        ])))
    );
    env.shutdown().await;
    Ok(())
}

async fn a_graph_that_could_not_run_is_refused_at_submission(store: Store) -> Result<()> {
    let env = Env::start(store, tasks(&Arc::default())).await?;
    let h = env.handle();
    let written = h.stats().events_written.load(SeqCst);
    let unknown = graph()
        .node("x", sign("label"))
        .edge("x", "nowhere", Condition::Always);
    let e = h
        .submit(unknown, json!({}))
        .await
        .expect_err("unknown node");
    assert!(e.to_string().contains("nowhere"), "{e}");
    let cycle = graph()
        .node("x", sign("label"))
        .node("y", sign("label"))
        .edge("x", "y", Condition::Always)
        .edge("y", "x", Condition::Always);
    let e = h
        .submit(cycle, json!({}))
        .await
        .expect_err("unbounded cycle");
    assert_eq!(e.code(), "invalid_tree", "{e}");
    assert!(e.to_string().contains("no entry node"), "{e}");
    assert_eq!(
        h.stats().events_written.load(SeqCst),
        written,
        "nothing was written"
    );
    env.shutdown().await;
    Ok(())
}

/// The signature of the node named `name` in `wf`.
fn node_named(wf: &Workflow, name: &str) -> Result<SignatureId> {
    let i = wf
        .nodes
        .iter()
        .position(|n| n.spec.name == name)
        .with_context(|| format!("no node {name}"))?;
    Ok(wf.sig(i as u32))
}

/// Wait until `wf` waits for a user (its gate is reached), then return the gate's id.
async fn reached_gate(h: &mageflow::Handle, wf: WorkflowId) -> Result<SignatureId> {
    let state = h
        .wait_for(wf, Until::Settled, Duration::from_secs(60))
        .await?;
    let gate = node_named(&state, "approval")?;
    assert_eq!(
        state.node(gate.index).map(|n| n.status),
        Some(Status::Running)
    );
    Ok(gate)
}

async fn an_approval_gate_waits_for_a_signal_and_routes_on_it(store: Store) -> Result<()> {
    let env = Env::start(store, tasks(&Arc::default())).await?;
    let h = env.handle().as_principal("reviewer");
    let pipeline = || {
        templates::approval_pipeline(
            [("check".to_owned(), sign("check").into())],
            sign("label").kwarg("as", "published"),
            Some(sign("label").kwarg("as", "sent back").into()),
        )
    };

    // Approved: the gate's result is its input with the signal merged over it.
    let wf = h.submit(pipeline(), json!({"doc": 7})).await?;
    let gate = reached_gate(&h, wf).await?;
    h.signal(gate, json!({"approved": true, "by": "alice"}))
        .await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(
        done.nodes[0].outcome,
        Some(Outcome::Ok(json!({"publish": "published"})))
    );
    assert_eq!(
        done.node(gate.index).and_then(|n| n.outcome.clone()),
        Some(Outcome::Ok(
            json!({"doc": 7, "checked": true, "approved": true, "by": "alice"})
        ))
    );
    let rejected = node_named(&done, "rejected")?;
    assert_eq!(
        done.node(rejected.index).map(|n| n.status),
        Some(Status::Skipped)
    );
    // The signal is in history with its sender as the actor, and replay gives the same state.
    let history = h.history(wf)?;
    let signaled = history
        .iter()
        .find(|e| matches!(e.payload, Payload::Succeeded { node, .. } if node == gate.index))
        .context("the gate's success is recorded")?;
    assert_eq!(signaled.actor, mageflow::Actor::api("reviewer"));
    assert_eq!(Workflow::replay(wf, &history)?, h.workflow(wf).await?);
    // A second signal finds it ended; a signal to a task is refused.
    let e = h.signal(gate, json!({})).await.expect_err("ended");
    assert_eq!(e.code(), "invalid_transition", "{e}");
    let check = node_named(&done, "check")?;
    let e = h.signal(check, json!({})).await.expect_err("a task");
    assert_eq!(e.code(), "not_a_gate", "{e}");

    // Rejected: the gate fails with the reason, and the rejection path runs.
    let wf = h.submit(pipeline(), json!({"doc": 8})).await?;
    let gate = reached_gate(&h, wf).await?;
    h.reject(gate, "typo in the title").await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(
        done.nodes[0].outcome,
        Some(Outcome::Ok(json!({"rejected": "sent back"})))
    );
    match done.node(gate.index).and_then(|n| n.outcome.clone()) {
        Some(Outcome::Err(e)) => assert_eq!(e.message, "typo in the title"),
        other => anyhow::bail!("expected the gate rejected, got {other:?}"),
    }
    env.shutdown().await;
    Ok(())
}

async fn retry_then_alternative_runs_the_alternative_once_retries_are_spent(
    store: Store,
) -> Result<()> {
    let env = Env::start(store, tasks(&Arc::default())).await?;
    let h = env.handle();
    let g = templates::retry_then_alternative(
        sign("flaky"),
        2,
        1,
        sign("label").kwarg("as", "from the cache"),
    );
    let wf = h.submit(g, json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(
        done.nodes[0].outcome,
        Some(Outcome::Ok(json!({"alternative": "from the cache"})))
    );
    let primary = node_named(&done, "primary")?;
    assert_eq!(done.node(primary.index).map(|n| n.attempt), Some(3));
    env.shutdown().await;
    Ok(())
}

async fn a_named_predicate_registered_in_rust_routes_and_history_records_its_answer(
    store: Store,
) -> Result<()> {
    let env = Env::start(store, tasks(&Arc::default())).await?;
    let h = env.handle();
    let vip = || {
        Condition::Output(Predicate::Named {
            name: "vip".into(),
            path: "$.variant".into(),
        })
    };
    let g = || {
        graph()
            .node("classify", sign("classify"))
            .node("gold", sign("label").kwarg("as", "gold desk"))
            .node("standard", sign("label").kwarg("as", "standard desk"))
            .edge("classify", "gold", vip())
            .edge("classify", "standard", Condition::Default)
    };
    for (variant, desk) in [("vip-7", "gold"), ("basic-3", "standard")] {
        let wf = h.submit(g(), json!({ "variant": variant })).await?;
        let done = h.wait(wf).await?;
        assert_eq!(
            done.nodes[0].outcome,
            Some(Outcome::Ok(json!({ desk: format!("{desk} desk") })))
        );
        let history = h.history(wf)?;
        let saw = history.iter().find_map(|e| match &e.payload {
            Payload::GraphRouted { decisions, .. } if !decisions.is_empty() => {
                Some((decisions[0].taken, decisions[0].saw.clone()))
            }
            _ => None,
        });
        assert_eq!(saw, Some((desk == "gold", json!(variant))));
    }
    // A predicate the registry does not hold is refused at submission, nothing written.
    let written = h.stats().events_written.load(SeqCst);
    let unknown = graph()
        .node("classify", sign("classify"))
        .node("gold", sign("label"))
        .edge(
            "classify",
            "gold",
            Condition::Output(Predicate::Named {
                name: "platinum".into(),
                path: "$".into(),
            }),
        );
    let e = h
        .submit(unknown, json!({}))
        .await
        .expect_err("unknown predicate");
    assert_eq!(e.code(), "invalid_tree", "{e}");
    assert!(e.to_string().contains("platinum"), "{e}");
    assert_eq!(h.stats().events_written.load(SeqCst), written);
    env.shutdown().await;
    Ok(())
}
