//! Bulk add to a swarm, on every store: every item validated before any is added (a bad bulk is
//! refused whole, listing every bad index, and nothing changes); partial mode adds the good ones;
//! a bulk larger than one event is written in batches within one append; add-and-run starts
//! the items of a running swarm and runs a swarm not started yet; progress and metrics.

use crate::support::{Env, Store};
use anyhow::{Context, Result};
use mageflow::{sign, swarm, BulkOptions, BulkPhase, Error, Registry, Sig, Status, TaskFailure};
use serde_json::{json, Value};

all_stores!(
    a_bad_bulk_is_refused_whole_listing_every_bad_item,
    partial_mode_adds_the_good_items_and_reports_the_rest,
    a_bulk_in_batches_is_one_append,
    add_and_run_starts_a_swarm_not_started_and_feeds_a_running_one,
);

fn tasks() -> Registry {
    let mut tasks = Registry::new();
    tasks.task("square", |i: Value, _ctx| async move {
        let n = i["n"].as_i64().ok_or_else(|| TaskFailure::fatal("no n"))?;
        Ok::<_, TaskFailure>(json!(n * n))
    });
    tasks
}

/// Items 0..n, with bad ones at `bad`: an unknown task, kwargs of the wrong type, an oversized
/// payload, in turn.
fn items(n: usize, bad: &[usize]) -> Vec<Sig> {
    (0..n)
        .map(|i| match bad.iter().position(|&b| b == i) {
            None => sign("square").kwarg("n", i).into(),
            Some(k) if k % 3 == 0 => sign("nope").into(),
            Some(k) if k % 3 == 1 => sign("square").kwargs(json!("not an object")).into(),
            Some(_) => sign("square")
                .kwarg("blob", "x".repeat(mageflow::engine::KWARGS_BYTES_MAX + 1))
                .into(),
        })
        .collect()
}

async fn a_bad_bulk_is_refused_whole_listing_every_bad_item(store: Store) -> Result<()> {
    let env = Env::start(store, tasks()).await?;
    let h = env.handle();
    let submitted = h
        .submit_tree(
            swarm([sign("square").kwarg("n", 1)]).open().label("fan"),
            json!({}),
        )
        .await?;
    let fan = submitted.sig("fan").context("labelled")?;
    let items_of = |w: &mageflow::Workflow| w.nodes[fan.index as usize].spec.children().len();
    let before = items_of(&h.workflow(submitted.workflow).await?);
    let refused = h
        .add_many(
            fan,
            items(50, &[3, 17, 42]),
            &BulkOptions::default(),
            |_| {},
        )
        .await
        .expect_err("three bad items");
    assert_eq!(refused.code(), "bulk_rejected");
    let Error::BulkRejected(rejected) = &refused else {
        panic!("{refused}");
    };
    let listed: Vec<(usize, &str)> = rejected.iter().map(|r| (r.index, r.code)).collect();
    assert_eq!(
        listed,
        [
            (3, "unknown_task"),
            (17, "invalid_kwargs"),
            (42, "too_large")
        ]
    );
    assert!(
        refused.to_string().contains("[17] invalid_kwargs"),
        "{refused}"
    );
    assert_eq!(
        items_of(&h.workflow(submitted.workflow).await?),
        before,
        "nothing was added"
    );
    // A closed swarm refuses the bulk, whatever its items.
    h.close_swarm(fan).await?;
    let closed = h
        .add_many(fan, items(2, &[]), &BulkOptions::default(), |_| {})
        .await
        .expect_err("closed");
    assert_eq!(closed.code(), "swarm_closed");
    h.wait(submitted.workflow).await?;
    env.shutdown().await;
    Ok(())
}

async fn partial_mode_adds_the_good_items_and_reports_the_rest(store: Store) -> Result<()> {
    let env = Env::start(store, tasks()).await?;
    let h = env.handle();
    let submitted = h
        .submit_tree(swarm(Vec::<Sig>::new()).open().label("fan"), json!({}))
        .await?;
    let fan = submitted.sig("fan").context("labelled")?;
    let options = BulkOptions {
        partial: true,
        close: true,
        ..BulkOptions::default()
    };
    let report = h
        .add_many(fan, items(10, &[0, 5]), &options, |_| {})
        .await?;
    assert_eq!(report.added, 8);
    let refused: Vec<usize> = report.rejected.iter().map(|r| r.index).collect();
    assert_eq!(refused, [0, 5]);
    assert_eq!(report.batches, 1);
    assert!(report.bytes > 0);
    let done = h.wait(submitted.workflow).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    let Some(mageflow::Outcome::Ok(Value::Array(results))) = &done.nodes[0].outcome else {
        panic!("no results");
    };
    let squares: Vec<Value> = [1, 2, 3, 4, 6, 7, 8, 9]
        .iter()
        .map(|n| json!({ "ok": n * n }))
        .collect();
    assert_eq!(results, &squares);
    env.shutdown().await;
    Ok(())
}

async fn a_bulk_in_batches_is_one_append(store: Store) -> Result<()> {
    const ITEMS: usize = 12_000;
    let env = Env::start(store, tasks()).await?;
    let h = env.handle();
    let submitted = h
        .submit_tree(
            swarm([sign("square").kwarg("n", 0)])
                .open()
                .max_concurrency(200)
                .label("fan"),
            json!({}),
        )
        .await?;
    let fan = submitted.sig("fan").context("labelled")?;
    let head = h.log().head();
    let mut seen = Vec::new();
    let options = BulkOptions {
        batch_size: 5_000,
        close: true,
        ..BulkOptions::default()
    };
    let report = h
        .add_many(fan, items(ITEMS, &[]), &options, |p| seen.push(p))
        .await?;
    assert_eq!((report.added, report.batches), (ITEMS, 3));
    assert_eq!(
        seen.last().map(|p| (p.phase, p.done, p.total)),
        Some((BulkPhase::Written, ITEMS, ITEMS))
    );
    assert!(seen
        .iter()
        .any(|p| p.phase == BulkPhase::Validating && p.done < ITEMS));
    // The three batches are one step: everything from the first to the last (the items the
    // running swarm handed out between them included) was decided at one instant by one
    // actor, and appended at once.
    let history = h.history(submitted.workflow)?;
    let adds: Vec<&mageflow::Event> = history
        .iter()
        .filter(|e| e.payload.kind() == "swarm_items_added")
        .collect();
    assert_eq!(adds.len(), 3);
    let (first, last) = (adds[0], adds[2]);
    for e in history
        .iter()
        .filter(|e| (first.seq..=last.seq).contains(&e.seq))
    {
        assert_eq!((e.at, &e.actor), (first.at, &first.actor), "{}", e.seq);
    }
    assert!(h.log().head() > head);
    let done = h.wait(submitted.workflow).await?;
    assert_eq!(done.nodes[0].spec.children().len(), ITEMS + 1);
    env.shutdown().await;
    Ok(())
}

async fn add_and_run_starts_a_swarm_not_started_and_feeds_a_running_one(
    store: Store,
) -> Result<()> {
    let env = Env::start(store, tasks()).await?;
    let h = env.handle();
    // Created, not run: add-and-run runs it with the input.
    let created = h
        .create_tree(swarm(Vec::<Sig>::new()).open().label("fan"))
        .await?;
    let fan = created.sig("fan").context("labelled")?;
    let options = BulkOptions {
        close: true,
        ..BulkOptions::default()
    };
    let report = h
        .add_and_run(fan, items(3, &[]), json!({"batch": 1}), &options, |_| {})
        .await?;
    assert!(report.started);
    let done = h.wait(created.workflow).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(
        done.nodes[0].outcome,
        Some(mageflow::Outcome::Ok(
            json!([{"ok": 0}, {"ok": 1}, {"ok": 4}])
        ))
    );
    // Running: the items start as they are added.
    let running = h
        .submit_tree(swarm(Vec::<Sig>::new()).open().label("fan"), json!({}))
        .await?;
    let fan = running.sig("fan").context("labelled")?;
    let report = h
        .add_and_run(fan, items(2, &[]), json!({}), &options, |_| {})
        .await?;
    assert!(!report.started, "it ran already");
    let done = h.wait(running.workflow).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    env.shutdown().await;
    Ok(())
}
