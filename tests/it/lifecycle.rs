//! Lifecycle: cleanup callbacks after each of the four terminal outcomes, delayed deletion with a
//! rerun window, purge at expiry (also after a restart), and rerun racing purge.

use crate::support::{config, wait_until, Backend, Env, Store};
use anyhow::Result;
use mageflow::core::Rejection;
use mageflow::{sign, Error, Outcome, Payload, Registry, SignatureId, Status, TaskFailure};
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

all_stores!(
    cleanup_runs_once_after_success_and_failure,
    cleanup_runs_once_after_interrupt_and_cancel,
    a_failing_cleanup_never_changes_the_outcome,
    a_running_task_marked_for_deletion_finishes_and_is_purged_at_expiry,
    rerun_before_expiry_restores_and_runs_again,
    rerun_and_purge_race_and_exactly_one_wins,
    a_purge_due_while_stopped_happens_after_restart,
);
on_cluster!(
    cleanup_runs_once_after_success_and_failure,
    cleanup_runs_once_after_interrupt_and_cancel,
    a_failing_cleanup_never_changes_the_outcome,
    a_running_task_marked_for_deletion_finishes_and_is_purged_at_expiry,
    rerun_before_expiry_restores_and_runs_again,
    rerun_and_purge_race_and_exactly_one_wins,
    a_purge_due_while_stopped_happens_after_restart,
);

/// `cleanup` reports the `mageflow_cleanup` field it receives.
fn with_cleanup(tasks: &mut Registry) -> mpsc::UnboundedReceiver<Value> {
    let (tx, rx) = mpsc::unbounded_channel();
    tasks.task("cleanup", move |i: Value, _ctx| {
        let _ = tx.send(i["mageflow_cleanup"].clone());
        async move { Ok::<_, TaskFailure>(Value::Null) }
    });
    rx
}

async fn cleanup_runs_once_after_success_and_failure(store: Store) -> Result<()> {
    let mut tasks = Registry::new();
    let mut cleanups = with_cleanup(&mut tasks);
    tasks.task(
        "ok",
        |_i: Value, _ctx| async move { Ok::<_, TaskFailure>(7) },
    );
    tasks.task("bad", |_i: Value, _ctx| async move {
        Err::<Value, _>(TaskFailure::fatal("broken"))
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let ok = h
        .submit(
            sign("ok").kwarg("x", 1).on_cleanup(sign("cleanup")),
            json!({}),
        )
        .await?;
    h.wait(ok).await?;
    let seen = cleanups.recv().await.expect("cleanup after success");
    assert_eq!(seen["outcome"], "done");
    assert_eq!(seen["result"], 7);
    let bad = h
        .submit(sign("bad").on_cleanup(sign("cleanup")), json!({}))
        .await?;
    h.wait(bad).await?;
    let seen = cleanups.recv().await.expect("cleanup after failure");
    assert_eq!(seen["outcome"], "failed");
    assert_eq!(seen["error"], "broken");
    assert!(cleanups.try_recv().is_err(), "each cleanup ran once");
    env.shutdown().await;
    Ok(())
}

async fn cleanup_runs_once_after_interrupt_and_cancel(store: Store) -> Result<()> {
    let mut tasks = Registry::new();
    let mut cleanups = with_cleanup(&mut tasks);
    let started = Arc::new(Notify::new());
    let s = started.clone();
    tasks.task("block", move |_i: Value, ctx: mageflow::TaskContext| {
        let s = s.clone();
        async move {
            s.notify_one();
            ctx.cancellation().cancelled().await;
            Err::<Value, _>(TaskFailure::retryable("stopped"))
        }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    for (stop, outcome) in [("interrupt", "interrupted"), ("cancel", "canceled")] {
        let wf = h
            .submit(sign("block").on_cleanup(sign("cleanup")), json!({}))
            .await?;
        started.notified().await;
        let root = SignatureId::root(wf);
        if stop == "interrupt" {
            h.interrupt(root).await?;
        } else {
            h.cancel(root, true).await?;
        }
        let seen = cleanups.recv().await.expect("cleanup after stop");
        assert_eq!(seen["outcome"], outcome);
        let state = h.workflow(wf).await?;
        let expected = if stop == "interrupt" {
            Status::Interrupted
        } else {
            Status::Canceled
        };
        assert_eq!(state.nodes[0].status, expected);
    }
    assert!(cleanups.try_recv().is_err(), "each cleanup ran once");
    env.shutdown().await;
    Ok(())
}

async fn a_failing_cleanup_never_changes_the_outcome(store: Store) -> Result<()> {
    let runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Registry::new();
    tasks.task(
        "ok",
        |_i: Value, _ctx| async move { Ok::<_, TaskFailure>(1) },
    );
    let r = runs.clone();
    tasks
        .task("flaky_cleanup", move |_i: Value, _ctx| {
            r.fetch_add(1, SeqCst);
            async move { Err::<Value, _>(TaskFailure::retryable("cleanup broke")) }
        })
        .retries(2, 1);
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h
        .submit(sign("ok").on_cleanup(sign("flaky_cleanup")), json!({}))
        .await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!(1))));
    assert_eq!(done.nodes[1].status, Status::Failed, "the cleanup failed");
    assert_eq!(runs.load(SeqCst), 3, "retried per its policy");
    let history = h.history(wf)?;
    let failed = history
        .iter()
        .filter(|e| matches!(e.payload, Payload::Failed { node: 1, .. }))
        .count();
    assert_eq!(failed, 1, "the cleanup's failure is recorded");
    env.shutdown().await;
    Ok(())
}

fn short_ttl(ttl: Duration) -> mageflow::Config {
    mageflow::Config {
        deletion_ttl: ttl,
        ..config()
    }
}

async fn a_running_task_marked_for_deletion_finishes_and_is_purged_at_expiry(
    store: Store,
) -> Result<()> {
    let release = Arc::new(Notify::new());
    let started = Arc::new(Notify::new());
    let (cb_tx, mut callbacks) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    let (rel, st) = (release.clone(), started.clone());
    tasks.task("work", move |_i: Value, _ctx| {
        let (rel, st) = (rel.clone(), st.clone());
        async move {
            st.notify_one();
            rel.notified().await;
            Ok::<_, TaskFailure>("finished")
        }
    });
    tasks.task("callback", move |i: Value, _ctx| {
        let _ = cb_tx.send(i["mageflow_results"].clone());
        async move { Ok::<_, TaskFailure>(Value::Null) }
    });
    let env = Env::with_config(store, tasks, short_ttl(Duration::from_millis(300))).await?;
    let h = env.handle();
    let wf = h
        .submit(
            sign("work")
                .kwarg("secret", "s3cr3t")
                .on_success(sign("callback")),
            json!({}),
        )
        .await?;
    started.notified().await;
    let expires_at = h.delete(wf).await?;
    let state = h.workflow(wf).await?;
    assert_eq!(
        state.nodes[0].visible_status(),
        Status::MarkedForDeletion { expires_at }
    );
    assert_eq!(state.nodes[0].status, Status::Running, "it keeps running");
    release.notify_one();
    assert_eq!(
        callbacks.recv().await,
        Some(json!("finished")),
        "callbacks fire"
    );
    let purged = wait_until(&h, wf, |w| w.purged).await?;
    assert!(purged
        .nodes
        .iter()
        .all(|n| n.outcome.is_none() && n.message.is_none()));
    assert_eq!(purged.nodes[0].spec.kwargs, json!({}), "task data is gone");
    let history = h.history(wf)?;
    let purge = history.last().expect("events");
    assert!(matches!(purge.payload, Payload::Purged { node: 0 }));
    assert!(purge.at >= expires_at, "purged at expiry, not before");
    assert_eq!(purge.actor, mageflow::Actor::system("cleanup"));
    match h.rerun(wf).await {
        Err(Error::Rejected(Rejection::Purged)) => {}
        other => panic!("rerun after purge: expected Purged, got {other:?}"),
    }
    env.shutdown().await;
    Ok(())
}

async fn rerun_before_expiry_restores_and_runs_again(store: Store) -> Result<()> {
    let runs = Arc::new(AtomicU32::new(0));
    let mut tasks = Registry::new();
    let r = runs.clone();
    tasks.task("count", move |_i: Value, _ctx| {
        let n = r.fetch_add(1, SeqCst) + 1;
        async move { Ok::<_, TaskFailure>(n) }
    });
    let env = Env::with_config(store, tasks, short_ttl(Duration::from_secs(3600))).await?;
    let h = env.handle();
    let wf = h.submit(sign("count"), json!({})).await?;
    h.wait(wf).await?;
    h.delete(wf).await?;
    h.rerun(wf).await?;
    let again = wait_until(&h, wf, |w| w.nodes[0].status == Status::Done).await?;
    assert_eq!(again.nodes[0].outcome, Some(Outcome::Ok(json!(2))));
    assert_eq!(again.nodes[0].deletion, None, "rerun lifts the mark");
    assert_eq!(runs.load(SeqCst), 2);
    // Restore without rerun.
    h.delete(wf).await?;
    h.restore(wf).await?;
    assert_eq!(h.workflow(wf).await?.nodes[0].deletion, None);
    match h.restore(wf).await {
        Err(Error::Rejected(Rejection::NotMarked)) => {}
        other => panic!("restore of an unmarked workflow: expected NotMarked, got {other:?}"),
    }
    env.shutdown().await;
    Ok(())
}

async fn rerun_and_purge_race_and_exactly_one_wins(store: Store) -> Result<()> {
    const PAIRS: usize = 40;
    let mut tasks = Registry::new();
    tasks.task(
        "ok",
        |_i: Value, _ctx| async move { Ok::<_, TaskFailure>(1) },
    );
    // A window of zero: the cleanup job purges as soon as the mark is durable.
    let env = Env::with_config(store, tasks, short_ttl(Duration::ZERO)).await?;
    let h = env.handle();
    let mut wfs = Vec::new();
    for _ in 0..PAIRS {
        let wf = h.submit(sign("ok"), json!({})).await?;
        h.wait(wf).await?;
        wfs.push(wf);
    }
    let mut races = Vec::new();
    for &wf in &wfs {
        let h = h.clone();
        races.push(tokio::spawn(async move {
            h.delete(wf).await?;
            anyhow::Ok(h.rerun(wf).await)
        }));
    }
    let (mut reruns, mut purges) = (0, 0);
    for (wf, race) in wfs.iter().zip(races) {
        let rerun = race.await??;
        let state = h.wait(*wf).await?;
        match rerun {
            Ok(()) => {
                reruns += 1;
                assert!(!state.purged, "{wf}: rerun won, yet it was purged");
            }
            Err(Error::Rejected(Rejection::Purged)) => {
                purges += 1;
                assert!(
                    state.purged,
                    "{wf}: rerun lost to a purge that did not happen"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    assert_eq!(reruns + purges, PAIRS);
    env.shutdown().await;
    Ok(())
}

async fn a_purge_due_while_stopped_happens_after_restart(store: Store) -> Result<()> {
    let backend = Backend::new(store)?;
    let registry = || {
        let mut tasks = Registry::new();
        tasks.task(
            "ok",
            |_i: Value, _ctx| async move { Ok::<_, TaskFailure>(1) },
        );
        tasks
    };
    let a = backend
        .start(registry(), short_ttl(Duration::from_millis(200)))
        .await?;
    let h = a.handle();
    let wf = h.submit(sign("ok"), json!({})).await?;
    h.wait(wf).await?;
    let expires_at = h.delete(wf).await?;
    // Every handle shares the log; the store is free for the next engine once all are gone.
    drop(h);
    a.shutdown().await;
    let b = backend
        .start(registry(), short_ttl(Duration::from_millis(200)))
        .await?;
    assert_eq!(b.recovery().deletions_pending, 1);
    let h = b.handle();
    let purged = wait_until(&h, wf, |w| w.purged).await?;
    assert!(purged.purged);
    let at = h.history(wf)?.last().map(|e| e.at).expect("events");
    assert!(at >= expires_at);
    b.shutdown().await;
    Ok(())
}

/// Logs that can redact (sled, PostgreSQL; the deployment is covered in the CLI's cluster
/// tests). The in-memory log keeps task data.
mod redaction {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sled() -> anyhow::Result<()> {
        crate::support::guard(super::a_confirmed_cancel_leaves_only_the_audit_record(
            crate::support::Store::Sled,
        ))
        .await
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn postgres() -> anyhow::Result<()> {
        crate::support::guard(super::a_confirmed_cancel_leaves_only_the_audit_record(
            crate::support::Store::Postgres,
        ))
        .await
    }
}

/// A confirmed cancel: once the workflow has finished, the log holds who canceled what and when,
/// and which signatures ran — no kwargs, inputs or results of them.
async fn a_confirmed_cancel_leaves_only_the_audit_record(store: Store) -> Result<()> {
    const SECRET: &str = "SECRET-embedded-c41d";
    let mut tasks = Registry::new();
    mageflow::engine::builtin::register(&mut tasks);
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let items: Vec<_> = (0..20)
        .map(|i| {
            sign("sleep")
                .kwarg("ms", 60_000)
                .kwarg("secret", SECRET)
                .kwarg("i", i)
                .on_cleanup(sign("noop").kwarg("secret", SECRET))
        })
        .collect();
    let wf = h
        .submit(
            mageflow::swarm(items).max_concurrency(4),
            json!({ "in": SECRET }),
        )
        .await?;
    wait_until(&h, wf, |w| {
        w.nodes.iter().filter(|n| n.in_flight).count() == 4
    })
    .await?;
    assert!(format!("{:?}", h.history(wf)?).contains(SECRET));
    h.cancel(SignatureId::root(wf), true).await?;
    h.wait(wf).await?;
    while h.stats().workflows_redacted.load(SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let history = h.history(wf)?;
    assert!(
        !format!("{history:?}").contains(SECRET),
        "task data left in the log"
    );
    let canceled = history.iter().filter(|e| e.payload.kind() == "canceled");
    assert!(canceled.clone().count() > 0);
    assert!(canceled
        .clone()
        .all(|e| e.actor == mageflow::Actor::api("it")));
    // The audit record still says what ran.
    assert_eq!(
        history
            .iter()
            .filter(|e| e.payload.kind() == "started")
            .count(),
        4 + 4,
        "the 4 running items and their cleanups started (items never dispatched had nothing to \
         clean up after)"
    );
    env.shutdown().await;
    Ok(())
}
