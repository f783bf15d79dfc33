//! Swarms: the concurrency limit holds, a failure limit stops dispatching, and an open swarm takes
//! items until it is closed, then reports every outcome in the order the items were added.

use crate::support::{
    assert_one_success_each, count, kinds, next, only, task, task_with, wait_until, Env, Gate,
    Store,
};
use anyhow::Result;
use mageflow::core::Rejection;
use mageflow::{sign, swarm, Error, Outcome, Registry, SignatureId, Status, TaskFailure};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Barrier};

all_stores!(
    swarm_never_exceeds_max_concurrency,
    swarm_stops_dispatching_after_n_failures,
    open_swarm_takes_items_until_closed,
    a_swarm_too_large_for_one_event_is_created_in_chunks_atomically,
    a_tree_too_large_for_one_event_is_refused_before_anything_is_written,
    every_waiter_gets_the_finished_state,
);
on_cluster!(
    swarm_never_exceeds_max_concurrency,
    swarm_stops_dispatching_after_n_failures,
    open_swarm_takes_items_until_closed,
    a_swarm_too_large_for_one_event_is_created_in_chunks_atomically,
    a_tree_too_large_for_one_event_is_refused_before_anything_is_written,
    every_waiter_gets_the_finished_state,
);

#[derive(Deserialize)]
struct Item {
    n: i64,
    #[serde(default)]
    hold: bool,
}

/// `collect` sends its input's `mageflow_results` to the test.
fn collector(tasks: &mut Registry, tx: mpsc::UnboundedSender<Value>) {
    tasks.task("collect", move |i: Value, _ctx| {
        let _ = tx.send(i["mageflow_results"].clone());
        async move { Ok::<_, TaskFailure>(Value::Null) }
    });
}

async fn swarm_never_exceeds_max_concurrency(store: Store) -> Result<()> {
    const ITEMS: i64 = 6;
    let active = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    // Handlers meet in pairs: the run can only finish if two items really run at once.
    let pair = Arc::new(Barrier::new(2));
    let (tx, mut collected) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    collector(&mut tasks, tx);
    let (a, p) = (active.clone(), peak.clone());
    tasks.task("work", move |i: Item, _ctx| {
        let (active, peak, pair) = (a.clone(), p.clone(), pair.clone());
        async move {
            let now = active.fetch_add(1, SeqCst) + 1;
            peak.fetch_max(now, SeqCst);
            pair.wait().await;
            tokio::time::sleep(Duration::from_millis(2)).await; // some work
            active.fetch_sub(1, SeqCst);
            Ok::<_, TaskFailure>(i.n)
        }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();

    let items = (0..ITEMS).map(|n| sign("work").kwarg("n", n));
    let sig = swarm(items).max_concurrency(2).on_success(sign("collect"));
    let wf = h.submit(sig, json!({})).await?;
    let done = h.wait(wf).await?;

    assert_eq!(done.nodes[0].status, Status::Done);
    let peak = peak.load(SeqCst);
    assert!(
        peak <= 2,
        "{peak} items ran at once under max_concurrency 2"
    );
    assert_eq!(peak, 2, "the swarm never ran two items at once");
    let want: Vec<Value> = (0..ITEMS).map(|n| json!({ "ok": n })).collect();
    assert_eq!(next(&mut collected).await?, Value::Array(want));
    assert_one_success_each(&h.history(wf)?, &done);
    env.shutdown().await;
    Ok(())
}

/// Several callers wait on one workflow: each gets the whole finished state (the orchestrator
/// hands the last one the state it drops instead of a copy).
async fn every_waiter_gets_the_finished_state(store: Store) -> Result<()> {
    let gate = Gate::new();
    let mut tasks = Registry::new();
    let g = gate.clone();
    tasks.task("hold_item", move |i: Item, _ctx| {
        let gate = g.clone();
        async move {
            gate.pass().await?;
            Ok::<_, TaskFailure>(i.n)
        }
    });
    // The callback passes the swarm's results on as its own.
    tasks.task("pass_on", |i: Value, _ctx| async move {
        Ok::<_, TaskFailure>(i["mageflow_results"].clone())
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let items = (1..=3).map(|n| sign("hold_item").kwarg("n", n));
    let wf = h
        .submit(swarm(items).on_success(sign("pass_on")), json!({}))
        .await?;

    // The three waits are sent (in order, on the handle's channel) before the inspection that
    // opens the gate, so all three wait on the running workflow.
    let (a, b, c, ()) = tokio::join!(h.wait(wf), h.wait(wf), h.wait(wf), async {
        let _ = h.workflow(wf).await;
        gate.open(3);
    });
    let (a, b, c) = (a?, b?, c?);
    let results = json!([{ "ok": 1 }, { "ok": 2 }, { "ok": 3 }]);
    assert_eq!(a.nodes[0].status, Status::Done);
    assert_eq!(a.nodes[0].outcome, Some(Outcome::Ok(results.clone())));
    let callback = task(&a, "pass_on")?;
    assert_eq!(
        a.nodes[callback as usize].outcome,
        Some(Outcome::Ok(results))
    );
    assert_eq!(a, b);
    assert_eq!(a, c);
    env.shutdown().await;
    Ok(())
}

async fn swarm_stops_dispatching_after_n_failures(store: Store) -> Result<()> {
    let fail_runs = Arc::new(AtomicU32::new(0));
    let hold_runs = Arc::new(AtomicU32::new(0));
    let gate = Gate::new();
    let (err_tx, mut errors) = mpsc::unbounded_channel();
    let (ok_tx, mut successes) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    collector(&mut tasks, ok_tx);
    let runs = fail_runs.clone();
    tasks.task("fail_item", move |i: Item, _ctx| {
        runs.fetch_add(1, SeqCst);
        async move { Err::<i64, _>(TaskFailure::fatal(format!("item {} failed", i.n))) }
    });
    let (runs, g) = (hold_runs.clone(), gate.clone());
    tasks.task("hold_item", move |i: Item, _ctx| {
        runs.fetch_add(1, SeqCst);
        let gate = g.clone();
        async move {
            gate.pass().await?;
            Ok::<_, TaskFailure>(i.n)
        }
    });
    for name in ["swarm_error_a", "swarm_error_b"] {
        let tx = err_tx.clone();
        tasks.task(name, move |i: Value, _ctx| {
            let _ = tx.send((name, i));
            async move { Ok::<_, TaskFailure>(Value::Null) }
        });
    }
    let env = Env::start(store, tasks).await?;
    let h = env.handle();

    // Three failing items and one holding item start at once. Each of the first two failures
    // frees a slot, handed to the next holding item; the third failure stops the swarm, so the
    // last two holding items are never dispatched.
    let fails = (0..3).map(|n| sign("fail_item").kwarg("n", n));
    let holds = (3..8).map(|n| sign("hold_item").kwarg("n", n));
    let sig = swarm(fails.chain(holds))
        .max_concurrency(4)
        .stop_after_n_failures(3)
        .on_success(sign("collect"))
        .on_error(sign("swarm_error_a"))
        .on_error(sign("swarm_error_b"));
    let wf = h.submit(sig, json!({})).await?;

    // Both error callbacks ran while three holding items are still running.
    let mut fired = vec![next(&mut errors).await?.0, next(&mut errors).await?.0];
    fired.sort_unstable();
    assert_eq!(fired, ["swarm_error_a", "swarm_error_b"]);
    let state = h.workflow(wf).await?;
    assert_eq!(state.nodes[0].status, Status::Failed);
    gate.open(5);
    let done = h.wait(wf).await?;

    assert_eq!(fail_runs.load(SeqCst), 3);
    assert_eq!(
        hold_runs.load(SeqCst),
        3,
        "no item is dispatched after the third failure"
    );
    match &done.nodes[0].outcome {
        Some(Outcome::Err(e)) => assert!(e.message.contains("3 failed"), "{}", e.message),
        other => panic!("the swarm should have failed, got {other:?}"),
    }
    let history = h.history(wf)?;
    let swarm_failed = only(&history, 0, "failed")?;
    for n in 3..6 {
        // Already running when the swarm stopped: they finish and their success is recorded.
        let item = task_with(&done, "hold_item", "n", json!(n))?;
        assert_eq!(done.nodes[item as usize].status, Status::Done);
        assert!(only(&history, item, "succeeded")? > swarm_failed);
    }
    for n in 6..8 {
        let item = task_with(&done, "hold_item", "n", json!(n))?;
        assert_eq!(done.nodes[item as usize].status, Status::Pending);
        assert!(
            kinds(&history, item).is_empty(),
            "item {n}: {:?}",
            kinds(&history, item)
        );
    }
    let items = done.nodes[0].spec.children();
    let dispatched_late = history[swarm_failed..]
        .iter()
        .filter(|e| match e.payload.kind() {
            "swarm_dispatched" => true,
            "queued" => e.payload.node().is_some_and(|n| items.contains(&n)),
            _ => false,
        })
        .count();
    assert_eq!(
        dispatched_late, 0,
        "nothing is dispatched once the swarm failed"
    );
    for name in ["swarm_error_a", "swarm_error_b"] {
        assert_eq!(count(&history, task(&done, name)?, "queued"), 1, "{name}");
    }
    assert!(kinds(&history, task(&done, "collect")?).is_empty());
    crate::support::assert_silent(&mut errors, "error callbacks fire once");
    crate::support::assert_silent(&mut successes, "the success callback never fires");
    assert_one_success_each(&history, &done);
    env.shutdown().await;
    Ok(())
}

async fn open_swarm_takes_items_until_closed(store: Store) -> Result<()> {
    let gate = Gate::new();
    let runs = Arc::new(AtomicU32::new(0));
    let (tx, mut collected) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    collector(&mut tasks, tx);
    let (r, g) = (runs.clone(), gate.clone());
    tasks.task("item", move |i: Item, _ctx| {
        r.fetch_add(1, SeqCst);
        let gate = g.clone();
        async move {
            if i.hold {
                gate.pass().await?;
            }
            Ok::<_, TaskFailure>(i.n)
        }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();

    // Item 0 is held until after the swarm is closed, so it finishes last.
    let first = sign("item").kwarg("n", 0).kwarg("hold", true);
    let sig = swarm([first]).open().on_success(sign("collect"));
    let wf = h.submit(sig, json!({})).await?;
    let root = SignatureId::root(wf);

    h.add_to_swarm(root, [sign("item").kwarg("n", 1)], false)
        .await?;
    let more = [2, 3].map(|n| sign("item").kwarg("n", n));
    h.add_to_swarm(root, more, false).await?;
    // All added items finish; the open swarm keeps running and reports nothing yet.
    let state = wait_until(&h, wf, |w| {
        w.nodes.iter().filter(|n| n.status == Status::Done).count() == 3
    })
    .await?;
    assert_eq!(state.nodes[0].status, Status::Running);
    h.add_to_swarm(root, [sign("item").kwarg("n", 4)], false)
        .await?;
    wait_until(&h, wf, |w| {
        w.nodes.iter().filter(|n| n.status == Status::Done).count() == 4
    })
    .await?;
    crate::support::assert_silent(&mut collected, "an open swarm does not finish");

    h.close_swarm(root).await?;
    let head = h.log().head();
    let refused = h
        .add_to_swarm(root, [sign("item").kwarg("n", 5)], false)
        .await;
    match &refused {
        Err(e @ Error::Rejected(Rejection::SwarmClosed(0))) => assert_eq!(e.code(), "swarm_closed"),
        other => panic!("adding to a closed swarm: expected SwarmClosed, got {other:?}"),
    }
    assert_eq!(h.log().head(), head, "a refused add appends nothing");
    h.close_swarm(root).await?; // closing twice is harmless

    gate.open(1);
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    let want: Vec<Value> = (0..5).map(|n| json!({ "ok": n })).collect();
    assert_eq!(
        next(&mut collected).await?,
        Value::Array(want),
        "outcomes in added order"
    );
    crate::support::assert_silent(&mut collected, "the success callback fires once");
    assert_eq!(runs.load(SeqCst), 5);
    let history = h.history(wf)?;
    assert_eq!(count(&history, 0, "succeeded"), 1);
    let collect = task(&done, "collect")?;
    assert_eq!(kinds(&history, collect), ["queued", "started", "succeeded"]);
    assert!(only(&history, 0, "swarm_closed")? < only(&history, 0, "succeeded")?);
    assert_one_success_each(&history, &done);
    env.shutdown().await;
    Ok(())
}

/// 25 000 items do not fit one creation event: the swarm is created with the first 10 000 and the
/// rest are added (then the swarm closed) in the same atomic append; the callback still gets every
/// outcome in order.
async fn a_swarm_too_large_for_one_event_is_created_in_chunks_atomically(
    store: Store,
) -> Result<()> {
    const ITEMS: i64 = 25_000;
    let (tx, mut collected) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    collector(&mut tasks, tx);
    tasks.task(
        "item",
        |i: Item, _ctx| async move { Ok::<_, TaskFailure>(i.n) },
    );
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let head = h.log().head();
    let items = (0..ITEMS).map(|n| sign("item").kwarg("n", n));
    let wf = h
        .submit(
            swarm(items)
                .max_concurrency(500)
                .on_success(sign("collect")),
            json!({}),
        )
        .await?;
    // The creation is whole before the swarm starts: created, two item chunks, closed, started.
    let history = h.history(wf)?;
    let created: Vec<&str> = history.iter().map(|e| e.payload.kind()).take(5).collect();
    assert_eq!(
        created,
        [
            "workflow_created",
            "swarm_items_added",
            "swarm_items_added",
            "swarm_closed",
            "container_started"
        ]
    );
    assert!(h.log().head() > head);
    let results = collected.recv().await.expect("the callback runs");
    let results = results.as_array().expect("a list of outcomes");
    assert_eq!(results.len(), ITEMS as usize);
    for (n, r) in results.iter().enumerate() {
        assert_eq!(r, &json!({ "ok": n }), "outcome {n} out of order");
    }
    h.wait(wf).await?;
    env.shutdown().await;
    Ok(())
}

/// Chain steps cannot be split across events: a chain over the per-event limit is refused with a
/// typed error and nothing is written.
async fn a_tree_too_large_for_one_event_is_refused_before_anything_is_written(
    store: Store,
) -> Result<()> {
    let mut tasks = Registry::new();
    tasks.task(
        "item",
        |i: Item, _ctx| async move { Ok::<_, TaskFailure>(i.n) },
    );
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let head = h.log().head();
    let steps = (0..=mageflow::engine::CREATE_NODES_MAX as i64).map(|n| sign("item").kwarg("n", n));
    let err = h
        .submit(mageflow::chain(steps), json!({}))
        .await
        .expect_err("too many signatures for one event");
    assert_eq!(err.code(), "too_many", "{err}");
    assert!(matches!(err, Error::TooMany { .. }));
    assert_eq!(h.log().head(), head, "nothing was written");
    env.shutdown().await;
    Ok(())
}
