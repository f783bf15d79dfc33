//! Runtime control: suspend and resume in the middle of a chain and a swarm, interrupt a running
//! handler and resume it from its checkpoint, cancel (only when confirmed, and for good).

use crate::support::{
    assert_one_success_each, assert_silent, config, count, kinds, next, task, task_with,
    wait_until, Env, Gate, Store,
};
use anyhow::Result;
use mageflow::control::ControlOp;
use mageflow::core::Rejection;
use mageflow::{
    chain, sign, swarm, Actor, Config, Error, Outcome, Registry, SignatureId, Status, TaskContext,
    TaskFailure,
};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, Barrier};

all_stores!(
    suspend_in_the_middle_of_a_chain,
    suspend_in_the_middle_of_a_swarm,
    interrupt_fires_the_token_and_resume_gets_the_checkpoint,
    interrupted_handler_that_lingers_keeps_its_worker_slot_accounted,
    cancel_needs_confirmation_and_is_final,
    a_handler_controls_another_workflow,
);
on_cluster!(
    suspend_in_the_middle_of_a_chain,
    suspend_in_the_middle_of_a_swarm,
    interrupt_fires_the_token_and_resume_gets_the_checkpoint,
    interrupted_handler_that_lingers_keeps_its_worker_slot_accounted,
    cancel_needs_confirmation_and_is_final,
    a_handler_controls_another_workflow,
);

#[derive(Deserialize)]
struct Step {
    name: String,
}

/// Executions per step name.
type Runs = Arc<Mutex<BTreeMap<String, u32>>>;

/// `step`: counts its run, tells the test it started, then waits at the gate.
fn gated_steps(gate: &Arc<Gate>, runs: &Runs, started: mpsc::UnboundedSender<String>) -> Registry {
    let mut tasks = Registry::new();
    let (gate, runs) = (gate.clone(), runs.clone());
    tasks.task("step", move |i: Step, _ctx| {
        let (gate, runs, started) = (gate.clone(), runs.clone(), started.clone());
        async move {
            *runs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(i.name.clone())
                .or_default() += 1;
            let _ = started.send(i.name.clone());
            gate.pass().await?;
            Ok::<_, TaskFailure>(i.name)
        }
    });
    tasks
}

fn step(name: &str) -> mageflow::TaskSig {
    sign("step").kwarg("name", name)
}

fn assert_each_ran_once(runs: &Runs, names: &[&str]) {
    let runs = runs.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let want: BTreeMap<String, u32> = names.iter().map(|n| ((*n).to_owned(), 1)).collect();
    assert_eq!(runs, want, "every step runs exactly once");
}

async fn suspend_in_the_middle_of_a_chain(store: Store) -> Result<()> {
    let (gate, runs) = (Gate::new(), Runs::default());
    let (tx, mut started) = mpsc::unbounded_channel();
    let env = Env::start(store, gated_steps(&gate, &runs, tx)).await?;
    let h = env.handle();
    let wf = h
        .submit(chain([step("a"), step("b"), step("c")]), json!({}))
        .await?;
    let root = SignatureId::root(wf);
    assert_eq!(next(&mut started).await?, "a");

    // Suspended while `a` runs: `a` may finish, `b` is triggered but parked.
    h.suspend(root).await?;
    gate.open(1);
    let state = h.workflow(wf).await?;
    let [a, b, c] = ["a", "b", "c"].map(|n| task_with(&state, "step", "name", json!(n)));
    let (a, b, c) = (a?, b?, c?);
    let state = wait_until(&h, wf, |w| w.nodes[b as usize].status == Status::Suspended).await?;
    assert_eq!(state.nodes[0].status, Status::Suspended);
    assert_eq!(state.nodes[a as usize].status, Status::Done);
    assert_eq!(state.nodes[b as usize].attempt, 0);
    assert_eq!(state.nodes[c as usize].status, Status::Pending);
    let history = h.history(wf)?;
    assert_eq!(
        count(&history, b, "started") + count(&history, c, "started"),
        0
    );
    assert_silent(&mut started, "nothing starts while suspended");

    h.resume(root).await?;
    assert_eq!(next(&mut started).await?, "b");
    gate.open(1);
    assert_eq!(next(&mut started).await?, "c");
    gate.open(1);
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!("c"))));
    assert_each_ran_once(&runs, &["a", "b", "c"]);
    let history = h.history(wf)?;
    for n in [a, b, c] {
        assert_eq!(count(&history, n, "started"), 1);
    }
    assert_one_success_each(&history, &done);
    env.shutdown().await;
    Ok(())
}

async fn suspend_in_the_middle_of_a_swarm(store: Store) -> Result<()> {
    let (gate, runs) = (Gate::new(), Runs::default());
    let (tx, mut started) = mpsc::unbounded_channel();
    let env = Env::start(store, gated_steps(&gate, &runs, tx)).await?;
    let h = env.handle();
    let names = ["s0", "s1", "s2", "s3"];
    let wf = h
        .submit(swarm(names.map(step)).max_concurrency(2), json!({}))
        .await?;
    let root = SignatureId::root(wf);
    let mut first = vec![next(&mut started).await?, next(&mut started).await?];
    first.sort();
    assert_eq!(first, ["s0", "s1"]);

    // Suspended while two items run: they finish, nothing else is dispatched.
    h.suspend(root).await?;
    gate.open(2);
    let state = wait_until(&h, wf, |w| {
        w.nodes.iter().filter(|n| n.status == Status::Done).count() == 2
    })
    .await?;
    assert_eq!(state.nodes[0].status, Status::Suspended);
    assert_eq!(state.nodes[0].swarm.dispatched, 2);
    let history = h.history(wf)?;
    for n in ["s2", "s3"] {
        let item = task_with(&state, "step", "name", json!(n))?;
        assert_eq!(state.nodes[item as usize].status, Status::Pending);
        assert!(
            kinds(&history, item).is_empty(),
            "{n}: {:?}",
            kinds(&history, item)
        );
    }
    assert_silent(&mut started, "nothing starts while suspended");

    h.resume(root).await?;
    let mut rest = vec![next(&mut started).await?, next(&mut started).await?];
    rest.sort();
    assert_eq!(rest, ["s2", "s3"]);
    gate.open(2);
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_each_ran_once(&runs, &names);
    let history = h.history(wf)?;
    for n in names {
        let item = task_with(&done, "step", "name", json!(n))?;
        assert_eq!(count(&history, item, "started"), 1, "{n}");
    }
    assert_one_success_each(&history, &done);
    env.shutdown().await;
    Ok(())
}

/// What the `long` handler tells the test.
#[derive(Debug, PartialEq)]
enum Seen {
    Checkpointed,
    Cancelled,
    Resumed { attempt: u32, checkpoint: Value },
}

async fn interrupt_fires_the_token_and_resume_gets_the_checkpoint(store: Store) -> Result<()> {
    let (tx, mut seen) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    tasks.task("long", move |_: Value, ctx| {
        let tx = tx.clone();
        async move {
            if let Some(checkpoint) = ctx.checkpoint() {
                let checkpoint = checkpoint.clone();
                let attempt = ctx.attempt();
                let _ = tx.send(Seen::Resumed {
                    attempt,
                    checkpoint,
                });
                return Ok(json!("finished"));
            }
            ctx.save_checkpoint(json!({"step": 1})).await?;
            let _ = tx.send(Seen::Checkpointed);
            ctx.cancellation().cancelled().await;
            let _ = tx.send(Seen::Cancelled);
            Err(TaskFailure::retryable("interrupted"))
        }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h.submit(sign("long"), json!({})).await?;
    let root = SignatureId::root(wf);
    assert_eq!(next(&mut seen).await?, Seen::Checkpointed);

    h.interrupt(root).await?;
    assert_eq!(next(&mut seen).await?, Seen::Cancelled, "the token fires");
    assert_eq!(h.workflow(wf).await?.nodes[0].status, Status::Interrupted);

    h.resume(root).await?;
    let resumed = Seen::Resumed {
        attempt: 2,
        checkpoint: json!({"step": 1}),
    };
    assert_eq!(next(&mut seen).await?, resumed);
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!("finished"))));
    let history = h.history(wf)?;
    let want = [
        "queued",
        "started",
        "checkpointed",
        "interrupted",
        "resumed",
        "started",
        "succeeded",
    ];
    // The interrupted attempt's late failure report is stale: it records nothing.
    assert_eq!(kinds(&history, 0), want);
    env.shutdown().await;
    Ok(())
}

/// An interrupted handler that takes a while to stop still holds its worker slot; when it does
/// stop, the slot must come back even if the task was resumed (and ran again) in the meantime.
async fn interrupted_handler_that_lingers_keeps_its_worker_slot_accounted(
    store: Store,
) -> Result<()> {
    let gate = Gate::new();
    let pair = Arc::new(Barrier::new(2));
    let (tx, mut seen) = mpsc::unbounded_channel();
    let mut tasks = Registry::new();
    let g = gate.clone();
    tasks.task("linger", move |_: Value, ctx| {
        let (tx, gate) = (tx.clone(), g.clone());
        async move {
            if ctx.attempt() > 1 {
                return Ok(json!(ctx.attempt()));
            }
            let _ = tx.send("started");
            ctx.cancellation().cancelled().await;
            let _ = tx.send("cancelled");
            gate.pass().await?; // slow clean-up, well within the grace period
            Err(TaskFailure::retryable("interrupted"))
        }
    });
    tasks.task("pair", move |_: Value, _ctx| {
        let pair = pair.clone();
        async move {
            pair.wait().await;
            Ok::<_, TaskFailure>(Value::Null)
        }
    });
    let config = Config {
        workers: 2,
        grace: std::time::Duration::from_secs(30),
        ..config()
    };
    let env = Env::with_config(store, tasks, config).await?;
    let h = env.handle();
    let wf = h.submit(sign("linger"), json!({})).await?;
    assert_eq!(next(&mut seen).await?, "started");
    h.interrupt(SignatureId::root(wf)).await?;
    assert_eq!(next(&mut seen).await?, "cancelled");
    // Attempt 1 is still running and holds its slot. Whether attempt 2 starts at once in the
    // other slot or waits for attempt 1 to stop, every slot must be free once both are done.
    h.resume(SignatureId::root(wf)).await?;
    gate.open(1); // attempt 1 finally stops
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!(2))));

    // Two handlers that can only finish together: both worker slots must be free again.
    let both = h
        .submit(swarm([sign("pair"), sign("pair")]), json!({}))
        .await?;
    assert_eq!(h.wait(both).await?.nodes[0].status, Status::Done);
    assert_eq!(
        h.stats().running.load(SeqCst),
        0,
        "no handler is counted as running"
    );
    env.shutdown().await;
    Ok(())
}

async fn cancel_needs_confirmation_and_is_final(store: Store) -> Result<()> {
    let (gate, runs) = (Gate::new(), Runs::default());
    let (tx, mut started) = mpsc::unbounded_channel();
    let mut tasks = gated_steps(&gate, &runs, tx);
    let (cancel_tx, mut cancelled) = mpsc::unbounded_channel();
    let (held_tx, mut held_started) = mpsc::unbounded_channel();
    let later_runs = Arc::new(AtomicU32::new(0));
    let r = later_runs.clone();
    tasks.task("held", move |_: Value, ctx| {
        let tx = cancel_tx.clone();
        let _ = held_tx.send(());
        async move {
            ctx.cancellation().cancelled().await;
            let _ = tx.send(ctx.signature());
            Err::<Value, _>(TaskFailure::fatal("canceled"))
        }
    });
    tasks.task("later", move |_: Value, _ctx| {
        r.fetch_add(1, SeqCst);
        async move { Ok::<_, TaskFailure>(Value::Null) }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let wf = h
        .submit(
            chain([step("first"), sign("held"), sign("later")]),
            json!({}),
        )
        .await?;
    let root = SignatureId::root(wf);
    assert_eq!(next(&mut started).await?, "first");
    gate.open(1);
    let held = task(&h.workflow(wf).await?, "held")?;
    // Its handler runs (with remote dispatch, `running` in the log comes before a worker has
    // taken the job; a job canceled before that never runs a handler at all).
    next(&mut held_started).await?;

    let head = h.log().head();
    let refused = h.cancel(root, false).await;
    match &refused {
        Err(e @ Error::Rejected(Rejection::ConfirmationRequired)) => {
            assert_eq!(e.code(), "confirmation_required")
        }
        other => panic!("unconfirmed cancel: expected ConfirmationRequired, got {other:?}"),
    }
    assert_eq!(h.log().head(), head, "a refused cancel appends nothing");
    assert_eq!(h.workflow(wf).await?.nodes[0].status, Status::Running);

    h.cancel(root, true).await?;
    let token_fired_for = next(&mut cancelled).await?;
    assert_eq!(
        token_fired_for,
        SignatureId {
            workflow: wf,
            index: held
        }
    );
    let state = h.workflow(wf).await?;
    for n in &state.nodes[1..] {
        let want = if n.spec.task_name() == Some("step") {
            Status::Done
        } else {
            Status::Canceled
        };
        assert_eq!(n.status, want, "{}", n.spec.name);
    }
    assert_eq!(state.nodes[0].status, Status::Canceled);

    let head = h.log().head();
    match h.resume(root).await {
        Err(e) => assert_eq!(e.code(), "canceled", "{e}"),
        Ok(()) => panic!("resuming a canceled workflow succeeded"),
    }
    assert_eq!(h.log().head(), head, "a refused resume appends nothing");
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Canceled);
    assert_eq!(later_runs.load(SeqCst), 0);
    let history = h.history(wf)?;
    assert_eq!(count(&history, held, "started"), 1);
    assert_eq!(count(&history, 0, "canceled"), 1);
    env.shutdown().await;
    Ok(())
}

/// A handler controls another workflow with `ctx.control` — in a worker process through the
/// orchestrator: an unconfirmed cancel is refused with the error an in-process call gives, and
/// a suspend goes through, recorded as done by the handler's signature.
async fn a_handler_controls_another_workflow(store: Store) -> Result<()> {
    let (gate, runs) = (Gate::new(), Runs::default());
    let (tx, mut started) = mpsc::unbounded_channel();
    let mut tasks = gated_steps(&gate, &runs, tx);
    tasks.task("controller", |i: Value, ctx: TaskContext| async move {
        let fatal = |e: String| TaskFailure::fatal(e);
        let target: SignatureId = i["target"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .map_err(|e| fatal(format!("{e}")))?;
        let refused = match ctx.control(ControlOp::Cancel, target, false).await {
            Err(e) => e.code().to_owned(),
            Ok(done) => return Err(fatal(format!("an unconfirmed cancel went through: {done}"))),
        };
        let suspended = ctx
            .control(ControlOp::Suspend, target, false)
            .await
            .map_err(|e| fatal(e.to_string()))?;
        Ok::<_, TaskFailure>(json!({ "refused": refused, "suspended": suspended }))
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    let target_wf = h.submit(chain([step("a"), step("b")]), json!({})).await?;
    let target = SignatureId::root(target_wf);
    assert_eq!(next(&mut started).await?, "a");

    let wf = h
        .submit(sign("controller"), json!({ "target": target.to_string() }))
        .await?;
    let done = h.wait(wf).await?;
    let Some(Outcome::Ok(result)) = &done.nodes[0].outcome else {
        panic!("the controller failed: {:?}", done.nodes[0].outcome);
    };
    assert_eq!(result["refused"], json!("confirmation_required"));
    assert_eq!(result["suspended"], json!(format!("{target} suspended")));

    // `a` finishes; `b` is parked, as after an operator's suspend.
    gate.open(1);
    let state = h.workflow(target_wf).await?;
    let b = task_with(&state, "step", "name", json!("b"))?;
    let state = wait_until(&h, target_wf, |w| {
        w.nodes[b as usize].status == Status::Suspended
    })
    .await?;
    assert_eq!(state.nodes[0].status, Status::Suspended);
    let controller = SignatureId::root(wf);
    let suspended: Vec<_> = h
        .history(target_wf)?
        .into_iter()
        .filter(|e| e.payload.kind() == "suspended")
        .collect();
    assert!(!suspended.is_empty());
    for e in &suspended {
        assert_eq!(e.actor, Actor::api(format!("task:{controller}")));
    }
    assert_eq!(count(&h.history(target_wf)?, 0, "canceled"), 0);

    h.resume(target).await?;
    assert_eq!(next(&mut started).await?, "b");
    gate.open(1);
    assert_eq!(h.wait(target_wf).await?.nodes[0].status, Status::Done);
    assert_each_ran_once(&runs, &["a", "b"]);
    env.shutdown().await;
    Ok(())
}
