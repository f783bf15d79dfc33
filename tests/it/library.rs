//! The library API without traps: what a program embedding the engine meets — a handle that
//! outlives its engine, task timeouts, waiting with a deadline, callbacks that can no longer
//! fire, the ids of what a builder made, and the documented error codes.

use crate::support::{config, kinds, next, Backend, Env, Gate, Store};
use anyhow::{bail, Result};
use mageflow::engine::SWARM_ITEMS_PER_EVENT;
// The state types and the new API come from the crate root (re-exported there).
use mageflow::{
    chain, sign, swarm, Config, Error, Node, Outcome, Payload, Registry, Rejection, Sig,
    SignatureId, Status, Submitted, TaskContext, TaskError, TaskFailure, Until, Workflow,
};
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

all_stores!(a_handle_outliving_its_engine_neither_holds_the_store_nor_works);
on_cluster!(
    a_task_that_outruns_its_timeout_is_retried,
    wait_for_settled_returns_for_interrupted_and_suspended_workflows,
    callbacks_that_can_no_longer_fire_end_skipped,
);

fn noop() -> Registry {
    let mut tasks = Registry::new();
    tasks.task(
        "noop",
        |v: Value, _ctx| async move { Ok::<_, TaskFailure>(v) },
    );
    tasks
}

/// A clone of the handle kept past `Engine::shutdown` lets go of the store — the same store
/// opens again at once (on sled: its directory lock is free) — and its calls fail with the
/// typed `ShutDown`, not a store error.
async fn a_handle_outliving_its_engine_neither_holds_the_store_nor_works(
    store: Store,
) -> Result<()> {
    let backend = Backend::new(store)?;
    let first = backend.start(noop(), config()).await?;
    let kept = first.handle();
    let wf = kept.submit(sign("noop"), json!({"n": 1})).await?;
    let done = kept.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    first.shutdown().await;

    let second = backend.start(noop(), config()).await?;
    assert_eq!(
        second.handle().workflow(wf).await?.nodes[0].status,
        Status::Done
    );
    for (call, res) in [
        ("workflow", kept.workflow(wf).await.map(drop)),
        ("history", kept.history(wf).map(drop)),
        (
            "submit",
            kept.submit(sign("noop"), json!({})).await.map(drop),
        ),
    ] {
        match res {
            Err(Error::ShutDown) => {}
            other => bail!("{call} through a handle of a stopped engine gave {other:?}"),
        }
    }
    assert_eq!(Error::ShutDown.code(), "shut_down");
    second.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// A per-task execution timeout
// ---------------------------------------------------------------------------------------------

all_stores!(a_task_that_outruns_its_timeout_is_retried);

/// Says whether its attempt's token had fired when the handler's future was dropped.
struct DroppedAfterToken(
    mpsc::UnboundedSender<bool>,
    tokio_util::sync::CancellationToken,
);

impl Drop for DroppedAfterToken {
    fn drop(&mut self) {
        let _ = self.0.send(self.1.is_cancelled());
    }
}

/// `hang`: its first attempt waits for its token and then keeps going (it never returns: only
/// being dropped ends it); later attempts return their attempt number.
fn hanging(limit: Duration, dropped: mpsc::UnboundedSender<bool>) -> Registry {
    let mut tasks = Registry::new();
    tasks
        .task("hang", move |_: Value, ctx: TaskContext| {
            let dropped = dropped.clone();
            async move {
                if ctx.attempt() == 1 {
                    let _guard = DroppedAfterToken(dropped, ctx.cancellation().clone());
                    ctx.cancellation().cancelled().await;
                    std::future::pending::<()>().await;
                }
                Ok::<_, TaskFailure>(json!(ctx.attempt()))
            }
        })
        .timeout(limit)
        .retries(1, 0);
    tasks
}

/// An attempt that outruns its task's timeout has its token fired, is dropped after the grace
/// period (it ignores the token), fails retryably with "timed out after N ms" — and the retry
/// policy runs it again. Everywhere an attempt runs: this process's workers and, on the
/// deployment, a worker runtime.
async fn a_task_that_outruns_its_timeout_is_retried(store: Store) -> Result<()> {
    let (tx, mut dropped) = mpsc::unbounded_channel();
    let limit = Duration::from_millis(50);
    let config = Config {
        grace: Duration::from_millis(20),
        ..config()
    };
    let env = Env::with_config(store, hanging(limit, tx), config).await?;
    let h = env.handle();
    let wf = h.submit(sign("hang"), json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!(2))));
    assert!(next(&mut dropped).await?, "dropped before its token fired");
    let history = h.history(wf)?;
    let errors: Vec<&TaskError> = history
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::RetryScheduled { error, .. } => Some(error),
            _ => None,
        })
        .collect();
    assert_eq!(errors.len(), 1, "{history:#?}");
    assert_eq!(errors[0].message, "timed out after 50 ms");
    assert!(errors[0].retryable);
    env.shutdown().await;
    Ok(())
}

/// Engine settings for tests on paused time: no compaction job (its timers would only add
/// wake-ups), the grace given.
fn paused_config(grace: Duration) -> Config {
    Config {
        grace,
        compact_after: None,
        compact_history: None,
        ..config()
    }
}

/// On paused time (no real waiting): the limit is measured on tokio's clock from the start of
/// the attempt — a handler still going at 30 s is stopped, however long it would take — and
/// once the retries run out the task fails with the same typed failure.
#[tokio::test(start_paused = true)]
async fn a_timed_out_task_fails_once_its_retries_run_out() -> Result<()> {
    let (tx, mut dropped) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    tasks
        .task("hang", move |_: Value, ctx: TaskContext| {
            let tx = tx.clone();
            async move {
                let _guard = DroppedAfterToken(tx, ctx.cancellation().clone());
                // A day of work, ignoring the token.
                tokio::time::sleep(Duration::from_secs(86_400)).await;
                Ok::<_, TaskFailure>(json!("finished"))
            }
        })
        .timeout(Duration::from_secs(30))
        .retries(1, 0);
    assert_eq!(
        tasks.get("hang")?.execution_timeout(),
        Some(Duration::from_secs(30))
    );
    let engine = mageflow::open_in_memory(tasks, paused_config(Duration::from_secs(1))).await?;
    let h = engine.handle();
    let wf = h.submit(sign("hang"), json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Failed);
    let Some(Outcome::Err(error)) = &done.nodes[0].outcome else {
        bail!("no error outcome: {:?}", done.nodes[0].outcome);
    };
    assert_eq!(error.message, "timed out after 30000 ms");
    let failure = TaskFailure {
        message: error.message.clone(),
        retryable: error.retryable,
    };
    assert!(failure.is_timeout(), "{failure:?}");
    for attempt in 1..=2 {
        assert!(
            next(&mut dropped).await?,
            "attempt {attempt} dropped before its token"
        );
    }
    let kinds: Vec<&str> = h.history(wf)?.iter().map(|e| e.payload.kind()).collect();
    assert_eq!(
        kinds,
        [
            "workflow_created",
            "queued",
            "started",
            "retry_scheduled",
            "started",
            "failed"
        ]
    );
    engine.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Waiting with a deadline, and for workflows that wait for a user
// ---------------------------------------------------------------------------------------------

all_stores!(wait_for_settled_returns_for_interrupted_and_suspended_workflows);

/// `block` tells the test it started and returns once its token fires (or, with `gated`, once
/// the test opens the gate); `noop` echoes its input.
fn blocking(gate: &Arc<Gate>, started: mpsc::UnboundedSender<String>) -> Registry {
    let mut tasks = noop();
    let gate = gate.clone();
    tasks.task("block", move |i: Value, ctx: TaskContext| {
        let (gate, started) = (gate.clone(), started.clone());
        async move {
            let _ = started.send(i["name"].as_str().unwrap_or_default().to_owned());
            if i["gated"] == json!(true) {
                gate.pass().await?;
                return Ok(json!("passed"));
            }
            ctx.cancellation().cancelled().await;
            Err(TaskFailure::retryable("interrupted"))
        }
    });
    tasks
}

/// `wait_for(…, Until::Settled, …)` returns once nothing can move without a user: an
/// interrupted workflow at once, a suspended chain once its running step has finished (the
/// next step stays suspended). `Until::Finished` then still waits, and gets its answer after
/// the resume.
async fn wait_for_settled_returns_for_interrupted_and_suspended_workflows(
    store: Store,
) -> Result<()> {
    let gate = Gate::new();
    let (tx, mut started) = mpsc::unbounded_channel();
    let env = Env::start(store, blocking(&gate, tx)).await?;
    let h = env.handle();
    let long = Duration::from_secs(SETTLE_SECS_MAX);

    let interrupted = h
        .submit(sign("block").kwarg("name", "i"), json!({}))
        .await?;
    assert_eq!(next(&mut started).await?, "i");
    h.interrupt(SignatureId::root(interrupted)).await?;
    let state = h.wait_for(interrupted, Until::Settled, long).await?;
    assert_eq!(state.nodes[0].status, Status::Interrupted);
    assert!(state.is_settled() && !state.is_finished());

    let flow = chain([
        sign("block").kwarg("name", "first").kwarg("gated", true),
        sign("noop"),
    ]);
    let suspended = h.submit(flow, json!({})).await?;
    assert_eq!(next(&mut started).await?, "first");
    h.suspend(SignatureId::root(suspended)).await?;
    let settled = tokio::spawn({
        let h = h.clone();
        async move { h.wait_for(suspended, Until::Settled, long).await }
    });
    gate.open(1);
    let state = settled.await??;
    assert_eq!(state.nodes[0].status, Status::Suspended);
    assert_eq!(state.nodes[1].status, Status::Done);
    assert_eq!(state.nodes[2].status, Status::Suspended);

    let finished = tokio::spawn({
        let h = h.clone();
        async move { h.wait_for(suspended, Until::Finished, long).await }
    });
    h.resume(SignatureId::root(suspended)).await?;
    let state = finished.await??;
    assert_eq!(state.nodes[0].status, Status::Done);
    env.shutdown().await;
    Ok(())
}

/// Longest any settled-wait of these scenarios may take: a guard only, never reached.
const SETTLE_SECS_MAX: u64 = 30;

/// `wait_timeout` on a workflow that waits for a user gives the typed `WaitTimeout` (with its
/// code) once the deadline passes — on paused time, so nothing really waits — and leaves the
/// workflow as it was: after a resume, `wait` gets the finished state.
#[tokio::test(start_paused = true)]
async fn wait_timeout_gives_a_typed_error_and_changes_nothing() -> Result<()> {
    let gate = Gate::new();
    let (tx, mut started) = mpsc::unbounded_channel();
    let engine =
        mageflow::open_in_memory(blocking(&gate, tx), paused_config(Duration::from_secs(1)))
            .await?;
    let h = engine.handle();
    let wf = h
        .submit(
            sign("block").kwarg("name", "b").kwarg("gated", true),
            json!({}),
        )
        .await?;
    assert_eq!(next(&mut started).await?, "b");
    h.suspend(SignatureId::root(wf)).await?;
    // Still running (a suspend lets the attempt finish): neither finished nor settled.
    for until in [Until::Finished, Until::Settled] {
        match h.wait_for(wf, until, Duration::from_secs(5)).await {
            Err(e @ Error::WaitTimeout { .. }) => {
                assert_eq!(e.code(), "wait_timeout");
                assert!(e.to_string().contains("5000 ms"), "{e}");
            }
            other => bail!("waiting until {until} gave {other:?}"),
        }
    }
    gate.open(1);
    let state = h
        .wait_for(wf, Until::Settled, Duration::from_secs(5))
        .await?;
    assert_eq!(
        state.nodes[0].status,
        Status::Done,
        "a task suspended while running finishes"
    );
    assert!(matches!(
        h.wait_timeout(wf, Duration::from_secs(5)).await,
        Ok(s) if s.is_finished()
    ));
    engine.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Callbacks that can no longer fire
// ---------------------------------------------------------------------------------------------

all_stores!(callbacks_that_can_no_longer_fire_end_skipped);

/// A task that succeeds leaves its error callbacks `skipped`, one that fails its success
/// callbacks (a chain: every step of it too) — terminal, so the workflow finishes with no
/// signature left `pending` for good, and none of them ever ran.
async fn callbacks_that_can_no_longer_fire_end_skipped(store: Store) -> Result<()> {
    let mut tasks = noop();
    tasks.task("fail", |_: Value, _ctx| async move {
        Err::<Value, _>(TaskFailure::fatal("no"))
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();

    let ok = sign("noop")
        .on_success(sign("noop").kwarg("cb", "ok"))
        .on_error(sign("noop").kwarg("cb", "err"));
    let wf = h.submit(ok, json!({})).await?;
    let done = h.wait(wf).await?;
    let statuses: Vec<Status> = done.nodes.iter().map(|n| n.status).collect();
    assert_eq!(statuses, [Status::Done, Status::Done, Status::Skipped]);
    assert!(
        kinds(&h.history(wf)?, 2).is_empty(),
        "the skipped callback has events"
    );

    let failing = sign("fail")
        .on_success(chain([sign("noop"), sign("noop")]))
        .on_error(sign("noop"));
    let wf = h.submit(failing, json!({})).await?;
    let done = h.wait(wf).await?;
    let statuses: Vec<Status> = done.nodes.iter().map(|n| n.status).collect();
    assert_eq!(
        statuses,
        [
            Status::Failed,
            Status::Skipped,
            Status::Skipped,
            Status::Skipped,
            Status::Done
        ]
    );
    assert_eq!(Status::Skipped.name(), "skipped");
    assert!(Status::Skipped.is_terminal());
    env.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Builders hand back the ids of what they create
// ---------------------------------------------------------------------------------------------

all_stores!(submit_tree_hands_back_the_ids_of_labelled_signatures);

/// `submit_tree` maps every label of the tree — a chain step, a swarm, its items (also those
/// past the first event's share of a large swarm, added in the same step), a callback — to its
/// signature id, which controls that signature directly; a label used twice is refused before
/// anything is written.
async fn submit_tree_hands_back_the_ids_of_labelled_signatures(store: Store) -> Result<()> {
    let env = Env::start(store, noop()).await?;
    let h = env.handle();

    let items = SWARM_ITEMS_PER_EVENT + 2;
    let flow = chain([
        Sig::from(sign("noop").kwarg("at", "first").label("first")),
        swarm((0..items).map(|i| {
            let item = sign("noop").kwarg("at", i);
            if i % 5_000 == 0 || i + 1 == items {
                item.label(format!("item-{i}"))
            } else {
                item
            }
        }))
        .label("fan-out")
        .into(),
    ])
    .label("pipeline")
    .on_error(sign("noop").kwarg("at", "alert").label("alert"));
    let created: Submitted = h.create_tree(flow).await?;
    let state: Workflow = h.workflow(created.workflow).await?;
    assert_eq!(created.root(), SignatureId::root(created.workflow));
    assert_eq!(created.sig("pipeline"), Some(created.root()));
    assert_eq!(created.sig("nothing"), None);
    let kwarg = |label: &str| -> Result<Value> {
        let Some(sig) = created.sig(label) else {
            bail!("no id for {label}");
        };
        assert_eq!(sig.workflow, created.workflow);
        Ok(state.nodes[sig.index as usize].spec.kwargs["at"].clone())
    };
    assert_eq!(kwarg("first")?, json!("first"));
    assert_eq!(kwarg("alert")?, json!("alert"));
    for i in [0, 5_000, 10_000, items - 1] {
        assert_eq!(kwarg(&format!("item-{i}"))?, json!(i), "item {i}");
    }
    let Some(fan_out) = created.sig("fan-out") else {
        bail!("no id for the swarm");
    };
    assert_eq!(state.nodes[fan_out.index as usize].spec.name, "swarm");
    assert_eq!(created.labels().count(), 8);

    // The ids control their signatures: the alert callback's kwargs, before the run.
    if let Some(alert) = created.sig("alert") {
        h.update_kwargs(vec![(alert, json!({"to": "ops"}))]).await?;
    }
    let state = h.workflow(created.workflow).await?;
    let alert: Option<&Node> = state
        .nodes
        .iter()
        .find(|n| n.spec.kwargs["at"] == json!("alert"));
    assert_eq!(
        alert.map(|n| n.spec.kwargs["to"].clone()),
        Some(json!("ops"))
    );

    // Labels of a submitted tree work the same; a duplicate is refused, nothing written.
    let submitted = h
        .submit_tree(
            chain([sign("noop").label("a"), sign("noop").label("b")]),
            json!({}),
        )
        .await?;
    let done = h.wait(submitted.workflow).await?;
    let b = submitted.sig("b").map(|s| s.index as usize);
    assert_eq!(b.map(|b| done.nodes[b].status), Some(Status::Done));
    let twice = chain([sign("noop").label("x"), sign("noop").label("x")]);
    match h.submit_tree(twice, json!({})).await {
        Err(Error::Rejected(Rejection::InvalidTree(reason))) => {
            assert!(reason.contains("\"x\""), "{reason}")
        }
        other => bail!("a label used twice gave {other:?}"),
    }
    match h.submit_tree(sign("noop").label(""), json!({})).await {
        Err(e) => assert_eq!(e.code(), "invalid_tree"),
        Ok(s) => bail!("an empty label was accepted: {s:?}"),
    }
    env.shutdown().await;
    Ok(())
}
