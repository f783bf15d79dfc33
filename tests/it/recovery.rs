//! Recovery: an engine stopped while a handler runs leaves that attempt in flight in the log; the
//! next engine on the same log requeues it, runs it again and finishes the workflow.

use crate::support::{config, count, next, task, Backend, Store};
use anyhow::Result;
use mageflow::{chain, sign, Actor, Config, Outcome, Payload, Registry, Status, TaskFailure};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

all_stores!(a_restarted_engine_requeues_the_attempt_that_was_running);

/// `blocker` blocks until cancelled on its first attempt and succeeds on later ones.
fn registry(
    runs: &Arc<AtomicU32>,
    after_runs: &Arc<AtomicU32>,
    tx: &mpsc::UnboundedSender<&'static str>,
) -> Registry {
    let mut tasks = Registry::new();
    let (runs, tx) = (runs.clone(), tx.clone());
    tasks.task("blocker", move |_: Value, ctx| {
        runs.fetch_add(1, SeqCst);
        let tx = tx.clone();
        async move {
            let attempt = ctx.attempt();
            if attempt > 1 {
                return Ok(json!(attempt));
            }
            let _ = tx.send("started");
            ctx.cancellation().cancelled().await;
            // Let go of the engine (and with it the log) before saying so.
            drop(ctx);
            let _ = tx.send("released");
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

    let b = backend
        .start(registry(&runs, &after_runs, &tx), config)
        .await?;
    let report = b.recovery().clone();
    assert_eq!(report.workflows_unfinished, 1, "{report:?}");
    assert_eq!(report.attempts_requeued, 1, "{report:?}");
    let h = b.handle();
    let done = h.wait(wf).await?;

    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(
        done.nodes[0].outcome,
        Some(Outcome::Ok(json!(2))),
        "attempt 2 succeeded"
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
    assert_eq!(started, [1, 2]);
    let requeued: Vec<&Actor> = history
        .iter()
        .filter(|e| matches!(e.payload, Payload::RetryScheduled { .. }))
        .map(|e| &e.actor)
        .collect();
    assert_eq!(requeued, [&Actor::system("recovery")]);
    assert_eq!(count(&history, blocker, "succeeded"), 1);
    assert_eq!(count(&history, blocker, "failed"), 0);
    b.shutdown().await;
    Ok(())
}
