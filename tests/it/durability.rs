//! What the engine answers is durable: the state `Handle::wait` returns is backed by events the
//! log already holds, and a read right after it sees the same state.

use crate::support::{Env, Gate, Store};
use anyhow::Result;
use mageflow::{sign, swarm, Registry, TaskFailure};
use serde_json::{json, Value};

all_stores!(wait_answers_with_durable_state_only);
on_cluster!(wait_answers_with_durable_state_only);

/// Rounds of the scenario; each gives the race below one chance.
const ROUNDS: usize = 50;
/// Items per swarm: their reports spread over several consecutive batches.
const ITEMS: usize = 16;

async fn wait_answers_with_durable_state_only(store: Store) -> Result<()> {
    let gate = Gate::new();
    let mut tasks = Registry::new();
    let g = gate.clone();
    tasks.task("held", move |_: Value, _ctx| {
        let gate = g.clone();
        async move {
            gate.pass().await?;
            Ok::<_, TaskFailure>(Value::Null)
        }
    });
    let env = Env::start(store, tasks).await?;
    let h = env.handle();
    for _ in 0..ROUNDS {
        let wf = h
            .submit(swarm((0..ITEMS).map(|_| sign("held"))), json!({}))
            .await?;
        // The waiter is registered while the items are held, then they all finish at once:
        // one batch records some of them while the next, finishing the swarm, is decided.
        let waiter = tokio::spawn({
            let h = h.clone();
            async move { h.wait(wf).await }
        });
        let _ = h.workflow(wf).await?; // the wait request is queued before this one
        gate.open(ITEMS);
        let done = waiter.await??;
        let logged = h.history(wf)?.len() as u64;
        assert_eq!(
            logged, done.version,
            "wait answered with version {} of {wf} while the log holds {logged} events",
            done.version
        );
        let read = h.workflow(wf).await?;
        assert_eq!(
            read.version, done.version,
            "a read right after wait of {wf}"
        );
    }
    env.shutdown().await;
    Ok(())
}
