//! The library API without traps: what a program embedding the engine meets — a handle that
//! outlives its engine, task timeouts, waiting with a deadline, callbacks that can no longer
//! fire, the ids of what a builder made, and the documented error codes.

use crate::support::{config, Backend, Store};
use anyhow::{bail, Result};
use mageflow::{sign, Error, Registry, Status, TaskFailure};
use serde_json::{json, Value};

all_stores!(a_handle_outliving_its_engine_neither_holds_the_store_nor_works);

fn noop() -> Registry {
    let mut tasks = Registry::new();
    tasks.task(
        "noop",
        |v: Value, _ctx| async move { Ok::<_, TaskFailure>(v) },
    );
    tasks
}

/// A clone of the handle kept past `Engine::shutdown` lets go of the store — the same store
/// opens again at once (on sled: its directory lock is free) — and its calls fail with the
/// typed `ShutDown`, not a store error.
async fn a_handle_outliving_its_engine_neither_holds_the_store_nor_works(
    store: Store,
) -> Result<()> {
    let backend = Backend::new(store)?;
    let first = backend.start(noop(), config()).await?;
    let kept = first.handle();
    let wf = kept.submit(sign("noop"), json!({"n": 1})).await?;
    let done = kept.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    first.shutdown().await;

    let second = backend.start(noop(), config()).await?;
    assert_eq!(
        second.handle().workflow(wf).await?.nodes[0].status,
        Status::Done
    );
    for (call, res) in [
        ("workflow", kept.workflow(wf).await.map(drop)),
        ("history", kept.history(wf).map(drop)),
        (
            "submit",
            kept.submit(sign("noop"), json!({})).await.map(drop),
        ),
    ] {
        match res {
            Err(Error::ShutDown) => {}
            other => bail!("{call} through a handle of a stopped engine gave {other:?}"),
        }
    }
    assert_eq!(Error::ShutDown.code(), "shut_down");
    second.shutdown().await;
    Ok(())
}
