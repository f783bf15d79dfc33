//! Task reports: duplicates are no-ops, retries run the handler again until it succeeds, and a
//! retried handler that creates a workflow finds the one its first attempt created.

use crate::support::{
    assert_one_success_each, assert_silent, count, kinds, next, task, wait_until, Env, Gate, Store,
};
use anyhow::Result;
use mageflow::{chain, sign, Outcome, Payload, Registry, SignatureId, Status, TaskFailure};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

all_stores!(
    duplicate_report_after_completion_is_a_no_op,
    duplicate_report_while_running_records_one_success,
    retryable_failures_are_retried_until_success,
    workflows_created_by_a_retried_handler_are_not_duplicated,
    a_panicking_handler_is_a_retryable_failure,
    a_handler_that_stops_heartbeating_loses_its_lease_and_is_retried,
    a_large_swarm_created_by_a_retried_handler_is_not_duplicated,
    a_handler_submitting_an_invalid_workflow_gets_the_validation_error,
);
// A handler in a worker process has no engine (`ctx.engine()`; a scenario checks that it says
// so); `ctx.submit()` works there: it goes to the orchestrator through the hot tier.
on_cluster!(
    duplicate_report_after_completion_is_a_no_op,
    duplicate_report_while_running_records_one_success,
    retryable_failures_are_retried_until_success,
    workflows_created_by_a_retried_handler_are_not_duplicated,
    a_panicking_handler_is_a_retryable_failure,
    a_handler_that_stops_heartbeating_loses_its_lease_and_is_retried,
    a_large_swarm_created_by_a_retried_handler_is_not_duplicated,
    a_handler_submitting_an_invalid_workflow_gets_the_validation_error,
    a_handler_in_a_worker_process_cannot_reach_the_engine,
    a_submit_too_deep_to_send_is_refused_in_the_worker,
);

/// `callback` tells the test each time it runs.
fn with_callback(tasks: &mut Registry, tx: mpsc::UnboundedSender<Value>) {
    tasks.task("callback", move |i: Value, _ctx| {
        let _ = tx.send(i["mageflow_results"].clone());
        async move { Ok::<_, TaskFailure>(Value::Null) }
    });
}

async fn duplicate_report_after_completion_is_a_no_op(store: Store) -> Result<()> {
    let runs = Arc::new(AtomicU32::new(0));
    let (tx, mut callbacks) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    with_callback(&mut tasks, tx);
    let r = runs.clone();
    tasks.task("once", move |_: Value, _ctx| {
        r.fetch_add(1, SeqCst);
        async move { Ok::<_, TaskFailure>(7) }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h
        .submit(sign("once").on_success(sign("callback")), json!({}))
        .await?;
    h.wait(wf).await?;
    let before = h.history(wf)?;

    // The same attempt completes again (redelivered message), then fails again.
    let root = SignatureId::root(wf);
    h.report(root, 1, Ok(json!(99))).await?;
    h.report(root, 1, Err(TaskFailure::fatal("late"))).await?;
    // Requests are handled in order: once this answers, both reports were processed.
    let state = h.workflow(wf).await?;

    assert_eq!(h.history(wf)?, before, "duplicate reports append nothing");
    assert_eq!(state.nodes[0].outcome, Some(Outcome::Ok(json!(7))));
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(next(&mut callbacks).await?, json!(7));
    assert_silent(&mut callbacks, "the success callback fires once");
    assert_eq!(count(&before, 0, "succeeded"), 1);
    assert_one_success_each(&before, &state);
    env.shutdown().await;
    Ok(())
}

async fn duplicate_report_while_running_records_one_success(store: Store) -> Result<()> {
    let runs = Arc::new(AtomicU32::new(0));
    let (tx, mut callbacks) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    with_callback(&mut tasks, tx);
    let r = runs.clone();
    // A redelivered copy of the same attempt completes first (the test reports it, as the
    // report intake does for a worker); then this one returns.
    let (running_tx, mut running) = mpsc::unbounded_channel();
    let release = Gate::new();
    let gate = release.clone();
    tasks.task("twice", move |_: Value, ctx| {
        r.fetch_add(1, SeqCst);
        let (running_tx, gate) = (running_tx.clone(), gate.clone());
        async move {
            let _ = running_tx.send((ctx.signature(), ctx.attempt()));
            gate.pass().await?;
            Ok::<_, TaskFailure>(5)
        }
    });
    tasks.task("after", |i: Value, _ctx| async move {
        Ok::<_, TaskFailure>(i["mageflow_results"].as_i64().unwrap_or_default() + 1)
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let sig = chain([sign("twice"), sign("after")]).on_success(sign("callback"));
    let wf = h.submit(sig, json!({})).await?;
    let (twice, attempt) = next(&mut running).await?;
    h.report(twice, attempt, Ok(json!(5))).await?;
    wait_until(&h, wf, |w| {
        w.nodes[twice.index as usize].status == Status::Done
    })
    .await?;
    // The copy completed the task; the runtime's report of the same attempt, sent when the
    // handler returns, is a no-op whenever it is processed.
    release.open(1);
    let state = h.wait(wf).await?;

    assert_eq!(state.nodes[0].outcome, Some(Outcome::Ok(json!(6))));
    assert_eq!(runs.load(SeqCst), 1);
    assert_eq!(next(&mut callbacks).await?, json!(6));
    assert_silent(&mut callbacks, "the success callback fires once");
    let history = h.history(wf)?;
    let (twice, after) = (task(&state, "twice")?, task(&state, "after")?);
    assert_eq!(kinds(&history, twice), ["queued", "started", "succeeded"]);
    assert_eq!(kinds(&history, after), ["queued", "started", "succeeded"]);
    assert_one_success_each(&history, &state);
    env.shutdown().await;
    Ok(())
}

async fn retryable_failures_are_retried_until_success(store: Store) -> Result<()> {
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Registry::new();
    let a = attempts.clone();
    tasks.task("flaky", move |_: Value, ctx| {
        a.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(ctx.attempt());
        async move {
            match ctx.attempt() {
                1 | 2 => Err(TaskFailure::retryable(format!("try {}", ctx.attempt()))),
                n => Ok(json!(n)),
            }
        }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(sign("flaky").retries(3, 1), json!({})).await?;
    let done = h.wait(wf).await?;

    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!(3))));
    assert_eq!(
        *attempts.lock().unwrap_or_else(|p| p.into_inner()),
        [1, 2, 3]
    );
    let history = h.history(wf)?;
    assert_eq!(count(&history, 0, "started"), 3);
    assert_eq!(count(&history, 0, "retry_scheduled"), 2);
    assert_eq!(count(&history, 0, "succeeded"), 1);
    assert_eq!(count(&history, 0, "failed"), 0);
    let retried: Vec<(u32, String)> = history
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::RetryScheduled { attempt, error, .. } => {
                Some((*attempt, error.message.clone()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(retried, [(1, "try 1".to_owned()), (2, "try 2".to_owned())]);
    env.shutdown().await;
    Ok(())
}

async fn workflows_created_by_a_retried_handler_are_not_duplicated(store: Store) -> Result<()> {
    let created = Arc::new(Mutex::new(Vec::new()));
    let child_runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Registry::new();
    let c = created.clone();
    tasks.task("parent", move |_: Value, ctx| {
        let created = c.clone();
        async move {
            let child = ctx.submit(sign("child"), json!({"from": "parent"})).await?;
            created
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(child);
            if ctx.attempt() == 1 {
                return Err(TaskFailure::retryable("fails after creating its child"));
            }
            Ok(child.to_string())
        }
    });
    let r = child_runs.clone();
    tasks.task("child", move |_: Value, _ctx| {
        r.fetch_add(1, SeqCst);
        async move { Ok::<_, TaskFailure>(Value::Null) }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(sign("parent").retries(2, 1), json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);

    let ids = created.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert_eq!(ids.len(), 2, "the handler ran twice");
    assert_eq!(ids[0], ids[1], "both attempts got the same child workflow");
    let child = h.wait(ids[0]).await?;
    assert_eq!(child.nodes[0].status, Status::Done);
    assert_eq!(child_runs.load(SeqCst), 1);
    let created_events = h
        .log()
        .read_all(1, usize::MAX)?
        .into_iter()
        .filter(|r| matches!(r.event.payload, Payload::WorkflowCreated { .. }))
        .map(|r| r.event.stream)
        .collect::<Vec<_>>();
    assert_eq!(created_events.len(), 2, "{created_events:?}");
    assert!(created_events.contains(&wf) && created_events.contains(&ids[0]));
    env.shutdown().await;
    Ok(())
}

/// A handler that panics does not take the worker down: the attempt fails (retryably, with the
/// panic's message in the log) and the retry succeeds.
async fn a_panicking_handler_is_a_retryable_failure(store: Store) -> Result<()> {
    let mut tasks = Registry::new();
    tasks
        .task(
            "shaky",
            |_i: Value, ctx: mageflow::TaskContext| async move {
                if ctx.attempt() == 1 {
                    panic!("shaky broke");
                }
                Ok::<_, TaskFailure>(ctx.attempt())
            },
        )
        .retries(1, 1);
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(mageflow::sign("shaky"), json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, mageflow::Status::Done);
    assert_eq!(done.nodes[0].outcome, Some(mageflow::Outcome::Ok(json!(2))));
    let history = h.history(wf)?;
    let retry = history
        .iter()
        .find_map(|e| match &e.payload {
            Payload::RetryScheduled { error, .. } => Some(error.message.clone()),
            _ => None,
        })
        .expect("a retry was scheduled");
    assert!(retry.contains("shaky broke"), "{retry}");
    env.shutdown().await;
    Ok(())
}

/// A task with a heartbeat timeout: an attempt that keeps heartbeating runs as long as it needs;
/// one that goes silent loses its lease (token fired, future dropped), fails retryably and is
/// retried.
async fn a_handler_that_stops_heartbeating_loses_its_lease_and_is_retried(
    store: Store,
) -> Result<()> {
    let mut tasks = Registry::new();
    tasks
        .task("lease", |i: Value, ctx: mageflow::TaskContext| async move {
            if i["beat"] == true {
                // Alive for longer than a lease period, heartbeating well within it.
                for _ in 0..40 {
                    ctx.heartbeat();
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                }
                return Ok::<_, TaskFailure>(ctx.attempt());
            }
            if ctx.attempt() == 1 {
                // Hangs without a heartbeat until the lease is lost.
                ctx.cancellation().cancelled().await;
                return Ok(0);
            }
            Ok(ctx.attempt())
        })
        .retries(1, 1)
        .heartbeat_timeout(std::time::Duration::from_millis(250));
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let alive = h
        .submit(sign("lease").kwarg("beat", true), json!({}))
        .await?;
    let silent = h
        .submit(sign("lease").kwarg("beat", false), json!({}))
        .await?;
    let alive = h.wait(alive).await?;
    assert_eq!(
        alive.nodes[0].outcome,
        Some(Outcome::Ok(json!(1))),
        "one attempt"
    );
    let done = h.wait(silent).await?;
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!(2))));
    let history = h.history(silent)?;
    let retry = history
        .iter()
        .find_map(|e| match &e.payload {
            Payload::RetryScheduled { error, .. } => Some(error.message.clone()),
            _ => None,
        })
        .expect("the silent attempt was retried");
    assert!(retry.contains("lease expired"), "{retry}");
    env.shutdown().await;
    Ok(())
}

/// A swarm too large for one event is created in chunks; a retried handler that creates it again
/// must not add its chunks a second time.
async fn a_large_swarm_created_by_a_retried_handler_is_not_duplicated(store: Store) -> Result<()> {
    const ITEMS: usize = mageflow::engine::SWARM_ITEMS_PER_EVENT + 5;
    let mut tasks = Registry::new();
    tasks.task(
        "parent",
        |_: Value, ctx: mageflow::TaskContext| async move {
            let items = (0..ITEMS).map(|_| sign("child"));
            let child = ctx
                .submit(mageflow::swarm(items).max_concurrency(1000), json!({}))
                .await?;
            if ctx.attempt() == 1 {
                return Err(TaskFailure::retryable("fails after creating its swarm"));
            }
            Ok(child.to_string())
        },
    );
    tasks.task("child", |_: Value, _ctx| async move {
        Ok::<_, TaskFailure>(Value::Null)
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(sign("parent").retries(1, 1), json!({})).await?;
    let done = h.wait(wf).await?;
    let Some(Outcome::Ok(Value::String(child))) = &done.nodes[0].outcome else {
        panic!("parent: {:?}", done.nodes[0].outcome);
    };
    let child: mageflow::WorkflowId = child.parse()?;
    let swarm = h.wait(child).await?;
    assert_eq!(
        swarm.nodes[0].spec.children().len(),
        ITEMS,
        "items added once"
    );
    assert_eq!(swarm.nodes[0].status, Status::Done);
    env.shutdown().await;
    Ok(())
}

/// A handler's submit is validated like any other: an unknown task, kwargs that do not fit, an
/// empty chain come back to the handler as the typed errors a submit from outside gets, and
/// nothing is created (wherever the handler runs).
async fn a_handler_submitting_an_invalid_workflow_gets_the_validation_error(
    store: Store,
) -> Result<()> {
    let mut tasks = Registry::new();
    tasks.task(
        "creator",
        |_: Value, ctx: mageflow::TaskContext| async move {
            let mut seen = Vec::new();
            let unknown = ctx.submit(sign("nowhere"), json!({})).await;
            seen.push(match unknown {
                Err(mageflow::Error::UnknownTask { name }) => format!("unknown_task {name}"),
                other => format!("unexpected {other:?}"),
            });
            let bad_kwargs = ctx
                .submit(sign("typed").kwarg("n", "not a number"), json!({}))
                .await;
            seen.push(match bad_kwargs {
                Err(e @ mageflow::Error::InvalidKwargs { .. }) => e.code().to_owned(),
                other => format!("unexpected {other:?}"),
            });
            let empty = ctx
                .submit(chain(Vec::<mageflow::Sig>::new()), json!({}))
                .await;
            seen.push(match empty {
                Err(e @ mageflow::Error::Rejected(_)) => e.code().to_owned(),
                other => format!("unexpected {other:?}"),
            });
            // Still usable after the refusals: a valid one is created.
            let ok = ctx.submit(sign("typed").kwarg("n", 3), json!({})).await?;
            seen.push(ok.to_string());
            Ok::<_, TaskFailure>(json!(seen))
        },
    );
    #[derive(serde::Deserialize)]
    struct Typed {
        n: u32,
    }
    tasks.task("typed", |i: Typed, _ctx| async move {
        Ok::<_, TaskFailure>(i.n)
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(sign("creator"), json!({})).await?;
    let done = h.wait(wf).await?;
    let Some(Outcome::Ok(Value::Array(seen))) = &done.nodes[0].outcome else {
        panic!("creator: {:?}", done.nodes[0].outcome);
    };
    assert_eq!(
        seen[..3],
        [
            json!("unknown_task nowhere"),
            json!("invalid_kwargs"),
            json!("invalid_tree")
        ]
    );
    let child: mageflow::WorkflowId = seen[3].as_str().unwrap_or_default().parse()?;
    let child = h.wait(child).await?;
    assert_eq!(child.nodes[0].outcome, Some(Outcome::Ok(json!(3))));
    let created = h
        .log()
        .read_all(1, usize::MAX)?
        .into_iter()
        .filter(|r| matches!(r.event.payload, Payload::WorkflowCreated { .. }))
        .count();
    assert_eq!(created, 2, "the creator's workflow and its one valid child");
    env.shutdown().await;
    Ok(())
}

/// The orchestrator reads a worker's report with a bounded nesting depth; a submit whose input
/// would not fit is refused in the worker with `TooDeep` instead of waiting for an answer that
/// would never come. One just within the bound goes through.
async fn a_submit_too_deep_to_send_is_refused_in_the_worker(store: Store) -> Result<()> {
    fn nested(depth: usize) -> Value {
        (1..depth).fold(json!({}), |v, _| json!({ "v": v }))
    }
    let mut tasks = Registry::new();
    tasks.task(
        "creator",
        |_: Value, ctx: mageflow::TaskContext| async move {
            // Within the bound (the report adds 3 levels above the input).
            let fits = ctx.submit(sign("sink"), nested(124)).await?;
            let refused = match ctx.submit(sign("sink"), nested(125)).await {
                Err(e @ mageflow::Error::TooDeep { .. }) => e.to_string(),
                other => format!("unexpected {other:?}"),
            };
            Ok::<_, TaskFailure>(json!([fits.to_string(), refused]))
        },
    );
    tasks.task("sink", |_: Value, _ctx| async move {
        Ok::<_, TaskFailure>(Value::Null)
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(sign("creator"), json!({})).await?;
    let done = h.wait(wf).await?;
    let Some(Outcome::Ok(Value::Array(out))) = &done.nodes[0].outcome else {
        panic!("creator: {:?}", done.nodes[0].outcome);
    };
    let fits: mageflow::WorkflowId = out[0].as_str().unwrap_or_default().parse()?;
    h.wait(fits).await?;
    let refused = out[1].as_str().unwrap_or_default();
    assert!(
        refused.contains("submit request is nested 128 levels"),
        "{refused}"
    );
    env.shutdown().await;
    Ok(())
}

/// In a worker process a handler has no engine: `ctx.engine()` says so (a typed error that
/// fails the task with a message saying why, not a hang, not a silent no-op).
async fn a_handler_in_a_worker_process_cannot_reach_the_engine(store: Store) -> Result<()> {
    let mut tasks = Registry::new();
    tasks.task(
        "creator",
        |_: Value, ctx: mageflow::TaskContext| async move {
            match ctx.engine() {
                Err(e @ mageflow::Error::NeedsEngine) => Err(TaskFailure::fatal(e.to_string())),
                Err(other) => Err(TaskFailure::fatal(format!("unexpected {other:?}"))),
                Ok(_) => Ok::<_, TaskFailure>(0),
            }
        },
    );
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(sign("creator"), json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Failed);
    let message = match &done.nodes[0].outcome {
        Some(Outcome::Err(e)) => e.message.clone(),
        other => panic!("expected a failure, got {other:?}"),
    };
    assert!(message.contains("worker process"), "{message}");
    env.shutdown().await;
    Ok(())
}
