//! Priority swarms through the engine, on every store and on the deployment: with
//! `max_concurrency = 1` the items run in priority order, then in order of addition; a waiting
//! item given a higher priority runs next; a running one's priority cannot change.

use crate::support::{Env, Store};
use anyhow::{Context, Result};
use mageflow::{sign, swarm, Priority, Registry, Status, TaskFailure};
use serde_json::{json, Value};
use std::sync::Arc;
use tokio::sync::{mpsc, Notify};

all_stores!(
    items_run_by_priority_then_by_addition,
    a_reprioritised_item_runs_next,
);
on_cluster!(
    items_run_by_priority_then_by_addition,
    a_reprioritised_item_runs_next,
);

/// `item` reports its `n`; the one with `hold` waits until `release` is notified.
fn tasks(tx: mpsc::UnboundedSender<i64>, release: Arc<Notify>) -> Registry {
    let mut tasks = Registry::new();
    tasks.task("item", move |i: Value, _ctx| {
        let (tx, release) = (tx.clone(), release.clone());
        async move {
            let n = i["n"].as_i64().unwrap_or(-1);
            let _ = tx.send(n);
            if i["hold"] == json!(true) {
                release.notified().await;
            }
            Ok::<_, TaskFailure>(json!(n))
        }
    });
    tasks
}

fn received(rx: &mut mpsc::UnboundedReceiver<i64>) -> Vec<i64> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

async fn items_run_by_priority_then_by_addition(store: Store) -> Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let env = Env::start(store, tasks(tx, Arc::new(Notify::new()))).await?;
    let h = env.handle();
    let levels = [Priority::Low, Priority::Medium, Priority::High];
    let items = (0..30).map(|n| sign("item").kwarg("n", n).priority(levels[n as usize % 3]));
    let wf = h.submit(swarm(items).max_concurrency(1), json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    let mut expected: Vec<i64> = (0..30).collect();
    expected.sort_by_key(|&n| -levels[n as usize % 3].value());
    assert_eq!(received(&mut rx), expected);
    env.shutdown().await;
    Ok(())
}

async fn a_reprioritised_item_runs_next(store: Store) -> Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let release = Arc::new(Notify::new());
    let env = Env::start(store, tasks(tx, release.clone())).await?;
    let h = env.handle();
    let first = sign("item")
        .kwarg("n", 0)
        .kwarg("hold", true)
        .label("first");
    let rest = (1..6).map(|n| sign("item").kwarg("n", n).label(format!("i{n}")));
    let submitted = h
        .submit_tree(
            swarm(std::iter::once(first).chain(rest)).max_concurrency(1),
            json!({}),
        )
        .await?;
    // The first item runs (and holds its slot) while the others wait.
    let started = rx.recv().await.context("the first item runs")?;
    assert_eq!(started, 0);
    let first = submitted.sig("first").context("labelled")?;
    let refused = h
        .set_priority(first, Priority::High)
        .await
        .expect_err("it runs");
    assert_eq!(refused.code(), "invalid_transition", "{refused}");
    let last = submitted.sig("i5").context("labelled")?;
    h.set_priority(last, Priority::High).await?;
    let out_of_range = h.set_priority(last, 5_000).await.expect_err("out of range");
    assert_eq!(out_of_range.code(), "invalid_priority");
    release.notify_one();
    let done = h.wait(submitted.workflow).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(received(&mut rx), [5, 1, 2, 3, 4]);
    let changed = h
        .history(submitted.workflow)?
        .into_iter()
        .find(|e| e.payload.kind() == "priority_changed")
        .context("the change is in the history")?;
    assert_eq!(changed.payload.node(), Some(last.index));
    env.shutdown().await;
    Ok(())
}
