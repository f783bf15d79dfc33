//! Recovery: an engine stopped while a handler runs leaves that attempt in flight in the log; the
//! next engine on the same log requeues it, runs it again and finishes the workflow. On the
//! deployment (`on_cluster`) a stop is of the orchestrator and the worker runtime together; the
//! attempt stays in flight with its job in Redis, and the next start's worker takes it over once
//! the stopped worker's lease expires.

use crate::support::{assert_one_success_each, config, count, next, task, Backend, Store};
use anyhow::Result;
use mageflow::{chain, sign, Actor, Config, Outcome, Payload, Registry, Status, TaskFailure};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

all_stores!(a_restarted_engine_requeues_the_attempt_that_was_running);
on_cluster!(a_restarted_engine_requeues_the_attempt_that_was_running);

/// Says "released" when dropped: when a run of `blocker` is over, whether it returned or its
/// future was dropped (a worker runtime abandons the handlers still running at its shutdown
/// without firing their tokens).
struct Released(mpsc::UnboundedSender<&'static str>);

impl Drop for Released {
    fn drop(&mut self) {
        let _ = self.0.send("released");
    }
}

/// `blocker` blocks until cancelled (or dropped) on its first run and succeeds on later ones,
/// returning its attempt number. (The first run, not attempt: on the deployment the run after
/// the restart is attempt 1 again, taken over by another worker.)
fn registry(
    runs: &Arc<AtomicU32>,
    after_runs: &Arc<AtomicU32>,
    tx: &mpsc::UnboundedSender<&'static str>,
) -> Registry {
    let mut tasks = Registry::new();
    let (runs, tx) = (runs.clone(), tx.clone());
    tasks.task("blocker", move |_: Value, ctx| {
        let first = runs.fetch_add(1, SeqCst) == 0;
        let tx = tx.clone();
        async move {
            if !first {
                return Ok(json!(ctx.attempt()));
            }
            // Declared before `ctx`, so dropped after it: the run lets go of the engine (and
            // with it the log) before saying so.
            let _released = Released(tx.clone());
            let ctx = ctx;
            let _ = tx.send("started");
            ctx.cancellation().cancelled().await;
            Err(TaskFailure::retryable("stopped by shutdown"))
        }
    });
    let after_runs = after_runs.clone();
    tasks.task("after", move |i: Value, _ctx| {
        after_runs.fetch_add(1, SeqCst);
        async move { Ok::<_, TaskFailure>(i["mageflow_results"].clone()) }
    });
    tasks
}

async fn a_restarted_engine_requeues_the_attempt_that_was_running(store: Store) -> Result<()> {
    let backend = Backend::new(store)?;
    let (runs, after_runs) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let (tx, mut seen) = mpsc::unbounded_channel();
    let config = Config {
        grace: Duration::from_millis(50),
        ..config()
    };

    let a = backend
        .start(registry(&runs, &after_runs, &tx), config.clone())
        .await?;
    let wf = a
        .handle()
        .submit(chain([sign("blocker"), sign("after")]), json!({}))
        .await?;
    assert_eq!(next(&mut seen).await?, "started");
    a.shutdown().await;
    assert_eq!(next(&mut seen).await?, "released");
    assert_eq!(
        runs.load(SeqCst),
        1,
        "nothing ran it again before the restart"
    );

    let b = backend
        .start(registry(&runs, &after_runs, &tx), config)
        .await?;
    let report = b.recovery().clone();
    assert_eq!(report.workflows_unfinished, 1, "{report:?}");
    // Who runs the attempt again differs on purpose (see `AutoResume`): the engine requeues
    // it as attempt 2; the deployment's orchestrator leaves it to the workers (its job is still
    // in Redis, leased to the worker that stopped) and the same attempt runs again once the
    // lease expires.
    let cluster = store == Store::Cluster;
    let (requeued, resumed, attempt) = if cluster { (0, 1, 1) } else { (1, 0, 2) };
    assert_eq!(report.attempts_requeued, requeued, "{report:?}");
    assert_eq!(report.attempts_resumed, resumed, "{report:?}");
    let h = b.handle();
    let done = h.wait(wf).await?;

    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(
        done.nodes[0].outcome,
        Some(Outcome::Ok(json!(attempt))),
        "the run after the restart (attempt {attempt}) succeeded"
    );
    assert_eq!(runs.load(SeqCst), 2);
    assert_eq!(after_runs.load(SeqCst), 1);
    let history = h.history(wf)?;
    let blocker = task(&done, "blocker")?;
    let started: Vec<u32> = history
        .iter()
        .filter_map(|e| match e.payload {
            Payload::Started { node, attempt } if node == blocker => Some(attempt),
            _ => None,
        })
        .collect();
    let requeued: Vec<&Actor> = history
        .iter()
        .filter(|e| matches!(e.payload, Payload::RetryScheduled { .. }))
        .map(|e| &e.actor)
        .collect();
    if cluster {
        // One attempt, started once: taking over a job is no event of the log.
        assert_eq!(started, [1]);
        assert!(requeued.is_empty(), "{requeued:?}");
    } else {
        assert_eq!(started, [1, 2]);
        assert_eq!(requeued, [&Actor::system("recovery")]);
    }
    assert_eq!(count(&history, blocker, "succeeded"), 1);
    assert_eq!(count(&history, blocker, "failed"), 0);
    assert_one_success_each(&history, &done);
    b.shutdown().await;
    Ok(())
}
