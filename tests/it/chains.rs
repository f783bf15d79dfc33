//! Chains: results flow from step to step into the success callback; a failing step stops the
//! chain, and its own error callback fires before the chain's.

use crate::support::{assert_one_success_each, count, kinds, next, only, task, Env, Store};
use anyhow::Result;
use mageflow::{chain, sign, Outcome, Registry, Status, TaskFailure};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use tokio::sync::mpsc;

all_stores!(
    chain_passes_results_to_its_success_callback,
    chain_stops_at_a_fatal_failure,
    chain_stops_when_retries_run_out,
);
on_cluster!(
    chain_passes_results_to_its_success_callback,
    chain_stops_at_a_fatal_failure,
    chain_stops_when_retries_run_out,
);

#[derive(Deserialize)]
struct Add {
    x: i64,
    #[serde(default)]
    mageflow_results: i64,
}

/// `add` (x + previous result) and `collect` (sends its whole input to the test).
fn adder(runs: &Arc<AtomicU32>, collected: mpsc::UnboundedSender<Value>) -> Registry {
    let mut tasks = Registry::new();
    let runs = runs.clone();
    tasks.task("add", move |i: Add, _ctx| {
        runs.fetch_add(1, SeqCst);
        async move { Ok::<_, TaskFailure>(i.x + i.mageflow_results) }
    });
    tasks.task("collect", move |i: Value, _ctx| {
        let _ = collected.send(i);
        async move { Ok::<_, TaskFailure>(Value::Null) }
    });
    tasks
}

async fn chain_passes_results_to_its_success_callback(store: Store) -> Result<()> {
    let runs = Arc::new(AtomicU32::new(0));
    let (tx, mut collected) = mpsc::unbounded_channel();
    let env = Env::start(store, adder(&runs, tx)).await?;
    let h = env.handle();

    let steps = [1, 2, 3].map(|x| sign("add").kwarg("x", x));
    let wf = h
        .submit(chain(steps).on_success(sign("collect")), json!({}))
        .await?;
    let done = h.wait(wf).await?;

    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!(6))));
    let outcomes: Vec<_> = done.nodes[0]
        .spec
        .children()
        .iter()
        .map(|&c| done.nodes[c as usize].outcome.clone())
        .collect();
    let want = [1, 3, 6].map(|v| Some(Outcome::Ok(json!(v))));
    assert_eq!(
        outcomes, want,
        "each step adds its x to the previous result"
    );
    assert_eq!(runs.load(SeqCst), 3);

    let input = next(&mut collected).await?;
    assert_eq!(input, json!({"mageflow_results": 6}));
    crate::support::assert_silent(&mut collected, "collect runs once");

    let history = h.history(wf)?;
    assert_one_success_each(&history, &done);
    let cb = task(&done, "collect")?;
    assert_eq!(kinds(&history, cb), ["queued", "started", "succeeded"]);
    env.shutdown().await;
    Ok(())
}

/// Whether the middle step fails outright or exhausts its retries.
#[derive(Clone, Copy, PartialEq)]
enum Failure {
    Fatal,
    RetriesExhausted,
}

async fn chain_stops_at_a_fatal_failure(store: Store) -> Result<()> {
    chain_stops_at_failed_step(store, Failure::Fatal).await
}

async fn chain_stops_when_retries_run_out(store: Store) -> Result<()> {
    chain_stops_at_failed_step(store, Failure::RetriesExhausted).await
}

async fn chain_stops_at_failed_step(store: Store, failure: Failure) -> Result<()> {
    let boom_runs = Arc::new(AtomicU32::new(0));
    let third_runs = Arc::new(AtomicU32::new(0));
    let (err_tx, mut errors) = mpsc::unbounded_channel::<(&'static str, Value)>();
    let mut tasks = Registry::new();
    tasks.task("add", |i: Add, _ctx| async move {
        Ok::<_, TaskFailure>(i.x + i.mageflow_results)
    });
    let runs = boom_runs.clone();
    tasks.task("boom", move |_: Value, _ctx| {
        runs.fetch_add(1, SeqCst);
        async move {
            Err::<Value, _>(match failure {
                Failure::Fatal => TaskFailure::fatal("boom"),
                Failure::RetriesExhausted => TaskFailure::retryable("boom"),
            })
        }
    });
    let runs = third_runs.clone();
    tasks.task("third", move |_: Value, _ctx| {
        runs.fetch_add(1, SeqCst);
        async move { Ok::<_, TaskFailure>(Value::Null) }
    });
    for name in ["step_error", "chain_error"] {
        let tx = err_tx.clone();
        tasks.task(name, move |i: Value, _ctx| {
            let _ = tx.send((name, i));
            async move { Ok::<_, TaskFailure>(Value::Null) }
        });
    }
    drop(err_tx);
    let env = Env::start(store, tasks).await?;
    let h = env.handle();

    let failing = sign("boom")
        .kwarg("why", "bad")
        .retries(2, 1)
        .on_error(sign("step_error"));
    let sig =
        chain([sign("add").kwarg("x", 1), failing, sign("third")]).on_error(sign("chain_error"));
    let wf = h.submit(sig, json!({})).await?;
    let done = h.wait(wf).await?;

    let attempts = match failure {
        Failure::Fatal => 1,
        Failure::RetriesExhausted => 3,
    };
    assert_eq!(done.nodes[0].status, Status::Failed);
    assert_eq!(boom_runs.load(SeqCst), attempts);
    assert_eq!(
        third_runs.load(SeqCst),
        0,
        "the step after the failure never runs"
    );
    let (boom, third) = (task(&done, "boom")?, task(&done, "third")?);
    assert_eq!(done.nodes[boom as usize].status, Status::Failed);
    assert_eq!(done.nodes[third as usize].status, Status::Pending);

    // Each error callback fired once, with the failed step's input plus the error.
    let mut seen = Vec::new();
    while let Ok((name, input)) = errors.try_recv() {
        assert_eq!(input["why"], "bad", "{name} gets the failed step's input");
        assert_eq!(
            input["mageflow_results"], 1,
            "{name} gets the failed step's input"
        );
        assert_eq!(input["mageflow_error"]["message"], "boom");
        assert_eq!(input["mageflow_error"]["attempts"], attempts);
        seen.push(name);
    }
    seen.sort_unstable();
    assert_eq!(seen, ["chain_error", "step_error"]);

    let history = h.history(wf)?;
    assert!(
        kinds(&history, third).is_empty(),
        "third: {:?}",
        kinds(&history, third)
    );
    assert_eq!(count(&history, boom, "started"), attempts as usize);
    assert_eq!(
        count(&history, boom, "retry_scheduled"),
        attempts as usize - 1
    );
    let step_error = only(&history, task(&done, "step_error")?, "queued")?;
    let chain_error = only(&history, task(&done, "chain_error")?, "queued")?;
    let step_failed = only(&history, boom, "failed")?;
    let chain_failed = only(&history, 0, "failed")?;
    assert!(
        step_failed < step_error && step_error < chain_failed && chain_failed < chain_error,
        "expected step failed < step error callback < chain failed < chain error callback, \
         got {step_failed} {step_error} {chain_failed} {chain_error}"
    );
    assert_one_success_each(&history, &done);
    env.shutdown().await;
    Ok(())
}
