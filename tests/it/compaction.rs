//! Compaction (cold storage) through the engine: a finished workflow's events move into the
//! log's compressed archive with a snapshot of its final state (`Handle::compact`, and the job
//! `Config::compact_after` runs). Its history and state read the same afterwards, it can be
//! deleted and rerun (its new events are compacted into the same archive later), and it
//! survives a restart. The old history of a running workflow is compacted too
//! (`Handle::compact_history`): it reads the same, survives a restart and a rebuilt hot tier,
//! and finishes. The in-memory log cannot compact and says so (`None`).

use crate::support::{config, wait_until, Backend, Env, Gate, Store};
use anyhow::{Context as _, Result};
use mageflow::engine::{HistoryCompaction, PositionFloor};
use mageflow::{chain, sign, swarm, Config, Payload, Registry, Status, TaskFailure};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

all_stores!(
    a_compacted_workflow_reads_the_same_and_can_be_rerun,
    finished_workflows_are_compacted_after_the_configured_delay,
    a_compacted_workflow_survives_a_restart,
    the_old_history_of_a_running_workflow_is_compacted,
);
on_cluster!(
    a_compacted_workflow_reads_the_same_and_can_be_rerun,
    finished_workflows_are_compacted_after_the_configured_delay,
    a_compacted_workflow_survives_a_restart,
    the_old_history_of_a_running_workflow_is_compacted,
);

#[derive(Deserialize)]
struct Double {
    x: i64,
}

fn tasks() -> Registry {
    let mut tasks = Registry::new();
    tasks.task("double", |i: Double, _ctx| async move {
        Ok::<_, TaskFailure>(i.x * 2)
    });
    tasks
}

/// A chain of a task and a swarm, with a success callback: events of every kind of container.
fn flow() -> mageflow::Sig {
    let steps: [mageflow::Sig; 2] = [
        sign("double").kwarg("x", 1).into(),
        swarm((0..5).map(|x| sign("double").kwarg("x", x))).into(),
    ];
    chain(steps)
        .on_success(sign("double").kwarg("x", 100))
        .into()
}

/// No compaction job; `Handle::compact` moves a finished workflow in calls of 3 events (the
/// snapshot with the last), as it moves a large one in chunks.
fn no_auto_compaction() -> Config {
    Config {
        compact_after: None,
        compact_history: Some(HistoryCompaction {
            live_events_over: u64::MAX,
            chunk_events: 3,
            ..HistoryCompaction::default()
        }),
        ..config()
    }
}

async fn a_compacted_workflow_reads_the_same_and_can_be_rerun(store: Store) -> Result<()> {
    let env = Env::with_config(store, tasks(), no_auto_compaction()).await?;
    let h = env.handle();
    let wf = h.submit(flow(), json!({})).await?;
    let live = h.wait(wf).await?;
    let history = h.history(wf)?;

    let Some(stats) = h.compact(wf).await? else {
        assert_eq!(
            store,
            Store::Memory,
            "only the in-memory log cannot compact"
        );
        env.shutdown().await;
        return Ok(());
    };
    assert_eq!(stats.events, history.len() as u64);
    assert!(
        stats.compressed_bytes > 0 && stats.raw_bytes > 0,
        "{stats:?}"
    );
    assert_eq!(h.stats().compaction.workflows.load(SeqCst), 1);
    // Same events, same state (loaded back from the archive).
    assert_eq!(h.history(wf)?, history);
    assert_eq!(h.workflow(wf).await?, live);
    // Nothing left to move.
    let again = h.compact(wf).await?.context("compacts")?;
    assert_eq!(again.events, 0);

    // Touched again: deleted and rerun; the new events follow the archived ones.
    h.delete(wf).await?;
    h.rerun(wf).await?;
    let rerun = wait_until(&h, wf, |w| {
        w.nodes[0].status == Status::Done && w.is_finished()
    })
    .await?;
    assert_eq!(rerun.nodes[0].outcome, live.nodes[0].outcome);
    let longer = h.history(wf)?;
    assert_eq!(longer[..history.len()], history[..]);
    assert!(longer.len() > history.len());
    let more = h.compact(wf).await?.context("compacts")?;
    assert_eq!(more.events, (longer.len() - history.len()) as u64);
    assert_eq!(h.history(wf)?, longer);
    env.shutdown().await;
    Ok(())
}

async fn finished_workflows_are_compacted_after_the_configured_delay(store: Store) -> Result<()> {
    let config = Config {
        compact_after: Some(Duration::from_millis(20)),
        ..config()
    };
    let env = Env::with_config(store, tasks(), config).await?;
    let h = env.handle();
    let mut done = Vec::new();
    for x in 0..3 {
        let wf = h.submit(sign("double").kwarg("x", x), json!({})).await?;
        done.push((wf, h.wait(wf).await?, h.history(wf)?));
    }
    if store == Store::Memory {
        assert!(h.compact(done[0].0).await?.is_none());
        env.shutdown().await;
        return Ok(());
    }
    // The job runs in the background; wait for it (bounded by the scenario's guard).
    let compaction = &h.stats().compaction;
    while compaction.workflows.load(SeqCst) < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(compaction.failures.load(SeqCst), 0);
    assert!(compaction.events.load(SeqCst) >= done.iter().map(|d| d.2.len() as u64).sum());
    for (wf, state, history) in &done {
        assert_eq!(&h.history(*wf)?, history);
        assert_eq!(&h.workflow(*wf).await?, state);
        assert_eq!(h.compact(*wf).await?.context("compacts")?.events, 0);
    }
    env.shutdown().await;
    Ok(())
}

async fn a_compacted_workflow_survives_a_restart(store: Store) -> Result<()> {
    let backend = Backend::new(store)?;
    let engine = backend.start(tasks(), no_auto_compaction()).await?;
    let h = engine.handle();
    let wf = h.submit(flow(), json!({})).await?;
    let live = h.wait(wf).await?;
    let history = h.history(wf)?;
    let compacted = h.compact(wf).await?;
    assert_eq!(compacted.is_some(), store != Store::Memory);
    // The handle holds the log too (a sled directory stays locked while anything does).
    drop(h);
    engine.shutdown().await;

    let engine = backend.start(tasks(), no_auto_compaction()).await?;
    let h = engine.handle();
    assert_eq!(h.history(wf)?, history);
    assert_eq!(h.workflow(wf).await?, live);
    // And it still takes commands: a rerun after the restart finishes like the first run.
    h.delete(wf).await?;
    h.rerun(wf).await?;
    let rerun = wait_until(&h, wf, |w| {
        w.is_finished() && w.nodes[0].status == Status::Done
    })
    .await?;
    assert_eq!(rerun.nodes[0].outcome, live.nodes[0].outcome);
    engine.shutdown().await;
    Ok(())
}

/// A swarm of 40 tasks, 30 done and 10 still running (held at a gate), has its old history
/// moved into the archive while it runs: its events and state read the same, the tasks held
/// while their `started` events were archived still finish — after a restart, and on the
/// deployment after the hot tier was wiped and rebuilt from the live log alone — and each task
/// succeeds exactly once.
async fn the_old_history_of_a_running_workflow_is_compacted(store: Store) -> Result<()> {
    const ITEMS: usize = 40;
    const HELD: usize = 10;
    let gate = Gate::new();
    let registry = || {
        let mut tasks = Registry::new();
        let gate = gate.clone();
        tasks.task("held", move |i: Double, _ctx| {
            let gate = gate.clone();
            async move {
                gate.pass().await?;
                Ok::<_, TaskFailure>(i.x)
            }
        });
        tasks
    };
    let settings = HistoryCompaction {
        live_events_over: 20,
        keep_live: 5,
        every: Duration::from_secs(1),
        // Several `EventLog::compact` calls for the one pass.
        chunk_events: 7,
    };
    // What the test lets the compaction reach (the deployment sets its projector's position).
    let floor = Arc::new(AtomicU64::new(0));
    let config = || Config {
        compact_after: None,
        compact_history: None,
        compaction_floor: Some(PositionFloor({
            let floor = floor.clone();
            Arc::new(move || floor.load(SeqCst))
        })),
        ..config()
    };
    let done = |w: &mageflow::Workflow| {
        w.nodes
            .iter()
            .filter(|n| n.spec.task_name() == Some("held") && n.status == Status::Done)
            .count()
    };
    let backend = Backend::new(store)?;
    let engine = backend.start(registry(), config()).await?;
    let h = engine.handle();
    let wf = h
        .submit(
            swarm((0..ITEMS as i64).map(|x| sign("held").kwarg("x", x))),
            json!({}),
        )
        .await?;
    gate.open(ITEMS - HELD);
    let running = wait_until(&h, wf, |w| {
        done(w) == ITEMS - HELD && w.nodes.iter().filter(|n| n.in_flight).count() == HELD
    })
    .await?;
    let history = h.history(wf)?;
    let version = running.version;
    assert_eq!(history.len() as u64, version);

    if store != Store::Cluster {
        // Nothing moves before the floor has reached the log's head.
        let pass = h.compact_history(&settings).await?;
        assert_eq!((pass.candidates, pass.deferred), (1, 1), "{pass:?}");
        assert_eq!(h.stats().compaction.events.load(SeqCst), 0);
        floor.store(u64::MAX, SeqCst);
    }
    let pass = h.compact_history(&settings).await?;
    assert_eq!(pass.candidates, 1, "{pass:?}");
    if store == Store::Memory {
        assert_eq!((pass.compacted, pass.deferred), (0, 1), "{pass:?}");
        engine.shutdown().await;
        return Ok(());
    }
    assert_eq!(pass.compacted, 1, "{pass:?}");
    assert_eq!(pass.events, version - settings.keep_live, "{pass:?}");
    let stats = &h.stats().compaction;
    assert_eq!(stats.running_workflows.load(SeqCst), 1);
    assert_eq!(stats.workflows.load(SeqCst), 0);
    assert_eq!(h.history(wf)?, history);
    assert_eq!(h.workflow(wf).await?, running);
    // Fewer live events than the threshold now: nothing to do.
    assert_eq!(h.compact_history(&settings).await?.candidates, 0);

    // The hot tier rebuilt from the live log: the held tasks' jobs come back although their
    // `started` events are in the archive.
    engine.flush_hot().await?;
    drop(h);
    engine.shutdown().await;

    let engine = backend.start(registry(), config()).await?;
    let h = engine.handle();
    assert_eq!(h.history(wf)?[..history.len()], history[..]);
    gate.open(2 * HELD);
    let finished = h.wait(wf).await?;
    assert_eq!(done(&finished), ITEMS);
    let mut succeeded = std::collections::BTreeMap::new();
    for e in h.history(wf)? {
        if let Payload::Succeeded { node, .. } = e.payload {
            if finished.nodes[node as usize].spec.task_name() == Some("held") {
                *succeeded.entry(node).or_insert(0) += 1;
            }
        }
    }
    assert_eq!(succeeded.len(), ITEMS, "{succeeded:?}");
    assert!(succeeded.values().all(|n| *n == 1), "{succeeded:?}");
    engine.shutdown().await;
    Ok(())
}
