//! Engine counters (`Handle::stats`) count what happened, not how often it was looked at.

use crate::support::{Env, Store};
use anyhow::Result;
use mageflow::{sign, Registry, TaskFailure};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::SeqCst;

all_stores!(a_finished_workflow_is_counted_once);
on_cluster!(a_finished_workflow_is_counted_once);

async fn a_finished_workflow_is_counted_once(store: Store) -> Result<()> {
    let mut tasks = Registry::new();
    tasks.task("noop", |_: Value, _ctx| async move {
        Ok::<_, TaskFailure>(Value::Null)
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(sign("noop"), json!({})).await?;
    h.wait(wf).await?;
    let stats = h.stats();
    assert_eq!(stats.workflows_finished.load(SeqCst), 1);
    assert_eq!(stats.tasks_succeeded.load(SeqCst), 1);

    // Looking at a finished workflow again changes nothing.
    h.wait(wf).await?;
    h.workflow(wf).await?;
    h.workflow(wf).await?;
    assert_eq!(
        stats.workflows_finished.load(SeqCst),
        1,
        "reads counted as finishes"
    );
    assert_eq!(stats.tasks_succeeded.load(SeqCst), 1);
    env.shutdown().await;
    Ok(())
}
