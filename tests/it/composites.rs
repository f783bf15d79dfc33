//! Composite signatures: any container used as one signature, nested (a swarm of chains, a
//! graph inside a chain), with internal callbacks (on inner signatures) and external ones (on
//! the composite). External callbacks fire once, after everything inside ended, internal
//! callbacks included; a swarm of chains
//! reports each chain's result in item order; control of the composite reaches every inner
//! signature. A gate inside holds the composite at a known point, so nothing here is timed.

use crate::support::{Env, Store};
use anyhow::{Context, Result};
use mageflow::{
    chain, gate, graph, sign, swarm, Condition, Outcome, Payload, Registry, SignatureId, Status,
    TaskFailure, Until, Workflow,
};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

all_stores!(
    external_callbacks_fire_once_after_every_internal_one,
    control_of_a_composite_reaches_every_inner_signature,
    an_inner_failure_names_its_signature_and_a_rerun_of_it_finishes_the_composite,
);

fn tasks() -> Registry {
    tasks_with(Arc::new(AtomicBool::new(true)))
}

/// The tasks, with `fragile`, which fails (for good) until `healed` is set.
fn tasks_with(healed: Arc<AtomicBool>) -> Registry {
    let mut tasks = Registry::new();
    tasks.task("fragile", move |_: Value, _ctx| {
        let healed = healed.load(Ordering::SeqCst);
        async move {
            match healed {
                true => Ok(json!("mended")),
                false => Err(TaskFailure::fatal("disk full")),
            }
        }
    });
    tasks.task("say", |i: Value, _ctx| async move {
        Ok::<_, TaskFailure>(i["say"].clone())
    });
    tasks.task("note", |_: Value, _ctx| async move {
        Ok::<_, TaskFailure>(json!("noted"))
    });
    tasks
}

/// The index of the node named `name`.
fn named(wf: &Workflow, name: &str) -> Result<u32> {
    wf.nodes
        .iter()
        .position(|n| n.spec.name == name)
        .map(|i| i as u32)
        .with_context(|| format!("no node {name}"))
}

/// A chain of a swarm of two chains (each step with an internal callback) and a graph, with
/// an external success callback `outer` on the whole.
fn composite(with_gate: bool) -> mageflow::ChainSig {
    let item = |n: u32| {
        chain([
            sign("say")
                .kwarg("say", format!("first {n}"))
                .on_success(sign("note").label(format!("inner-{n}-a"))),
            sign("say")
                .kwarg("say", format!("last {n}"))
                .on_success(sign("note").label(format!("inner-{n}-b"))),
        ])
        .name(format!("item {n}"))
    };
    let mut g = graph()
        .name("g")
        .node("decide", sign("say").kwarg("say", "go"));
    if with_gate {
        g = g
            .node("hold", gate().name("hold"))
            .edge("decide", "hold", Condition::OnSuccess);
    }
    chain([
        mageflow::Sig::from(swarm([item(1), item(2)]).name("items")),
        g.into(),
    ])
    .name("composite")
    .on_success(sign("note").label("outer"))
}

async fn external_callbacks_fire_once_after_every_internal_one(store: Store) -> Result<()> {
    let env = Env::start(store, tasks()).await?;
    let h = env.handle();
    let submitted = h.submit_tree(composite(false), json!({})).await?;
    let wf = submitted.workflow;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    // A swarm of chains reports each chain's final result, in item order.
    let items = named(&done, "items")?;
    assert_eq!(
        done.nodes[items as usize].outcome,
        Some(Outcome::Ok(json!([{"ok": "last 1"}, {"ok": "last 2"}])))
    );
    let history = h.history(wf)?;
    let finished_at = |sig: SignatureId| {
        history
            .iter()
            .filter(|e| matches!(e.payload, Payload::Succeeded { node, .. } if node == sig.index))
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    };
    let queued_at = |sig: SignatureId| {
        history
            .iter()
            .filter(|e| matches!(e.payload, Payload::Queued { node, .. } if node == sig.index))
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    };
    let outer = submitted.sig("outer").context("outer labelled")?;
    let outer_queued = queued_at(outer);
    assert_eq!(outer_queued.len(), 1, "the external callback fires once");
    // It fires once everything inside has ended: every signature under the composite by
    // child links (steps, items, graph nodes, to any depth) ended before it was queued.
    let mut inside = done.nodes[0].spec.children().to_vec();
    while let Some(i) = inside.pop() {
        inside.extend_from_slice(done.nodes[i as usize].spec.children());
        let ended = finished_at(done.sig(i));
        assert_eq!(
            ended.len(),
            1,
            "{} ended once",
            done.nodes[i as usize].spec.name
        );
        assert!(
            ended[0] < outer_queued[0],
            "{} ended after the external callback fired",
            done.nodes[i as usize].spec.name
        );
    }
    // Internal callbacks fire as the inner workflow runs, each once, and all of them have
    // ended before the external one fires.
    for label in ["inner-1-a", "inner-1-b", "inner-2-a", "inner-2-b"] {
        let inner = submitted.sig(label).context("inner labelled")?;
        assert_eq!(queued_at(inner).len(), 1, "{label} fired once");
        let ended = finished_at(inner);
        assert_eq!(ended.len(), 1, "{label} ran once");
        assert!(
            ended[0] < outer_queued[0],
            "{label} ended at {} after the external callback fired at {}",
            ended[0],
            outer_queued[0]
        );
    }
    // Hierarchical status: everything inside the composite is done.
    let counts = done.inner_counts(0);
    // 1 swarm + 2 chains + 4 steps + 4 internal callbacks + 1 graph + 1 graph node.
    assert_eq!(counts.get("done").copied(), Some(13), "{counts:?}");
    assert_eq!(counts.len(), 1, "{counts:?}");
    env.shutdown().await;
    Ok(())
}

async fn control_of_a_composite_reaches_every_inner_signature(store: Store) -> Result<()> {
    let env = Env::start(store, tasks()).await?;
    let h = env.handle();
    let wf = h.submit(composite(true), json!({})).await?;
    let long = Duration::from_secs(60);
    let held = h.wait_for(wf, Until::Settled, long).await?;
    let hold = held.sig(named(&held, "hold")?);
    assert_eq!(
        held.node(hold.index).map(|n| n.status),
        Some(Status::Running)
    );

    // Suspending the composite suspends what runs inside it, down to the gate.
    let root = SignatureId::root(wf);
    h.suspend(root).await?;
    let suspended = h.workflow(wf).await?;
    for name in ["composite", "g", "hold"] {
        let i = named(&suspended, name)?;
        assert_eq!(
            suspended.nodes[i as usize].status,
            Status::Suspended,
            "{name}"
        );
    }
    let e = h.signal(hold, json!({})).await.expect_err("suspended");
    assert_eq!(e.code(), "invalid_transition");
    h.resume(root).await?;
    let resumed = h.workflow(wf).await?;
    assert_eq!(
        resumed.node(hold.index).map(|n| n.status),
        Some(Status::Running)
    );

    // Interrupt, then resume: the gate waits again.
    h.interrupt(root).await?;
    assert_eq!(
        h.workflow(wf).await?.node(hold.index).map(|n| n.status),
        Some(Status::Interrupted)
    );
    h.resume(root).await?;
    assert_eq!(
        h.workflow(wf).await?.node(hold.index).map(|n| n.status),
        Some(Status::Running)
    );

    // Signal it through, and rerun the whole composite: it runs again from the start.
    h.signal(hold, json!({"ok": true})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    h.rerun(wf).await?;
    let again = h.wait_for(wf, Until::Settled, long).await?;
    assert_eq!(
        again.node(hold.index).map(|n| n.status),
        Some(Status::Running)
    );

    // Canceling the composite ends every signature inside it: nothing is left to run.
    h.cancel(root, true).await?;
    let canceled = h.workflow(wf).await?;
    assert_eq!(canceled.nodes[0].status, Status::Canceled);
    for (i, n) in canceled.nodes.iter().enumerate() {
        assert!(
            n.status.is_terminal(),
            "{} ({i}) is {} after the cancel",
            n.spec.name,
            n.status
        );
    }
    env.shutdown().await;
    Ok(())
}

/// A step failing deep inside a composite (a chain, in a graph node, in a chain) fails every
/// container above it with an error naming it; rerunning that one step — not the workflow —
/// runs it and what follows it again, and the composite ends done, its external success
/// callback fired once (its error callback had fired once, in the failed run).
async fn an_inner_failure_names_its_signature_and_a_rerun_of_it_finishes_the_composite(
    store: Store,
) -> Result<()> {
    let healed = Arc::new(AtomicBool::new(false));
    let env = Env::start(store, tasks_with(healed.clone())).await?;
    let h = env.handle();
    let work = chain([
        sign("say").kwarg("say", "prepared"),
        sign("fragile").label("fragile"),
    ])
    .name("work");
    let g = graph()
        .name("g")
        .node("decide", sign("say").kwarg("say", "go"))
        .node("work", work)
        .edge("decide", "work", Condition::OnSuccess);
    let tree = chain([
        mageflow::Sig::from(g),
        sign("say").kwarg("say", "end").label("end").into(),
    ])
    .name("composite")
    .on_success(sign("note").label("outer"))
    .on_error(sign("note").label("alarm"));
    let submitted = h.submit_tree(tree, json!({})).await?;
    let wf = submitted.workflow;
    let failed = h.wait(wf).await?;
    assert_eq!(failed.nodes[0].status, Status::Failed);
    let fragile = submitted.sig("fragile").context("fragile labelled")?;
    let Some(Outcome::Err(e)) = &failed.nodes[0].outcome else {
        panic!("the composite failed without an error");
    };
    // Each level names the one below it, down to the step that failed.
    for inner in ["\"g\"", "\"work\"", &fragile.to_string(), "disk full"] {
        assert!(e.message.contains(inner), "{inner} not in {:?}", e.message);
    }

    // A pending signature cannot be rerun; the failed step can.
    let end = submitted.sig("end").context("end labelled")?;
    let refused = h.rerun(end).await.expect_err("not ended");
    assert_eq!(refused.code(), "invalid_transition", "{refused}");
    healed.store(true, Ordering::SeqCst);
    h.rerun(fragile).await?;
    let done = h.wait(wf).await?;
    assert_eq!(
        done.nodes[0].status,
        Status::Done,
        "{:?}",
        done.nodes[0].outcome
    );
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!("end"))));
    let history = h.history(wf)?;
    let queued = |label: &str| -> Result<usize> {
        let sig = submitted.sig(label).context("labelled")?;
        Ok(history
            .iter()
            .filter(|e| matches!(e.payload, Payload::Queued { node, .. } if node == sig.index))
            .count())
    };
    assert_eq!(queued("outer")?, 1, "the success callback fired once");
    assert_eq!(
        queued("alarm")?,
        1,
        "the error callback fired once, in the failed run"
    );
    assert!(history
        .iter()
        .any(|e| matches!(e.payload, Payload::Rerun { node } if node == fragile.index)));
    env.shutdown().await;
    Ok(())
}
