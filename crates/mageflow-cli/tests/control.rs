//! Operators' commands on an embedded store (`mageflow cancel|suspend|… ID --store
//! embedded:PATH`): carried out by the CLI on the store itself, recorded with the operator as
//! the actor; cancel is refused without `--confirm` and then changes nothing.

use anyhow::{Context, Result};
use mageflow::{sign, swarm, Config, Registry, SignatureId, Status, WorkflowId};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

fn operator(dir: &Path, args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_mageflow"))
        .args(args)
        .args(["--store", &format!("embedded:{}", dir.display())])
        .args(["--principal", "bob"])
        .output()?)
}

fn config() -> Config {
    Config {
        grace: Duration::from_millis(50),
        ..Config::default()
    }
}

fn registry() -> Registry {
    let mut r = Registry::new();
    mageflow::engine::builtin::register(&mut r);
    r
}

/// A store holding a swarm of long sleeps, stopped while they ran.
async fn store_with_a_running_swarm(dir: &Path) -> Result<WorkflowId> {
    let engine = mageflow::open_embedded(dir, registry(), config()).await?;
    let h = engine.handle();
    let items: Vec<_> = (0..5).map(|_| sign("sleep").kwarg("ms", 600_000)).collect();
    let wf = h.submit(swarm(items), json!({})).await?;
    while h
        .workflow(wf)
        .await?
        .nodes
        .iter()
        .filter(|n| n.in_flight)
        .count()
        < 5
    {
        tokio::task::yield_now().await;
    }
    drop(h);
    engine.shutdown().await;
    Ok(wf)
}

async fn state(dir: &Path, wf: WorkflowId) -> Result<(mageflow::Workflow, Vec<mageflow::Event>)> {
    let engine = mageflow::open_embedded(
        dir,
        registry(),
        Config {
            workers: 0,
            auto_resume: mageflow::engine::AutoResume {
                enabled: false,
                ..Default::default()
            },
            ..config()
        },
    )
    .await?;
    let h = engine.handle();
    let out = (h.workflow(wf).await?, h.history(wf)?);
    drop(h);
    engine.shutdown().await;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_on_an_embedded_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wf = store_with_a_running_swarm(dir.path()).await?;
    let root = SignatureId::root(wf).to_string();

    let out = operator(dir.path(), &["suspend", &wf.to_string()])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        state(dir.path(), wf).await?.0.nodes[0].status,
        Status::Suspended
    );

    // Without confirmation: refused, and the log is unchanged.
    let before = state(dir.path(), wf).await?.1;
    let out = operator(dir.path(), &["cancel", &root])?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--confirm"), "{err}");
    assert_eq!(state(dir.path(), wf).await?.1, before);

    let out = operator(dir.path(), &["cancel", &root, "--confirm"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (after, history) = state(dir.path(), wf).await?;
    assert_eq!(after.nodes[0].status, Status::Canceled);
    let canceled = history
        .iter()
        .find(|e| e.payload.kind() == "canceled")
        .context("a canceled event")?;
    assert_eq!(canceled.actor, mageflow::Actor::api("bob"));

    // A canceled workflow cannot be rerun, and the CLI says why.
    let out = operator(dir.path(), &["rerun", &wf.to_string()])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancel"));
    // Bad ids are refused before anything is opened.
    let out = operator(dir.path(), &["interrupt", "not-an-id"])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("neither a workflow id nor a signature id")
    );
    Ok(())
}

/// `mageflow rerun SIGNATURE_ID`: one failed step of a finished chain runs again — queued with
/// the input it ran with, the chain running again — not the whole workflow; the rerun is in the
/// history with the operator as its actor. A step that has not run is refused, and the CLI
/// says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerun_of_one_signature() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wf = {
        let engine = mageflow::open_embedded(dir.path(), registry(), config()).await?;
        let h = engine.handle();
        let wf = h
            .submit(
                mageflow::chain([sign("noop"), sign("fail"), sign("noop")]),
                json!({}),
            )
            .await?;
        let failed = h.wait(wf).await?;
        assert_eq!(failed.nodes[0].status, Status::Failed);
        drop(h);
        engine.shutdown().await;
        wf
    };
    let step = |i: u32| {
        SignatureId {
            workflow: wf,
            index: i,
        }
        .to_string()
    };

    let out = operator(dir.path(), &["rerun", &step(3)])?;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot rerun a signature that is pending"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let before = state(dir.path(), wf).await?.0;
    let out = operator(dir.path(), &["rerun", &step(2)])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("runs again"));
    let (after, history) = state(dir.path(), wf).await?;
    assert_eq!(after.nodes[0].status, Status::Running);
    assert_eq!(
        after.nodes[1].status,
        Status::Done,
        "the step before is kept"
    );
    assert_eq!(after.nodes[2].status, Status::Queued);
    assert_eq!(after.nodes[2].message, before.nodes[2].message);
    let rerun = history
        .iter()
        .find(|e| e.payload.kind() == "rerun")
        .context("a rerun event")?;
    assert_eq!(rerun.payload.node(), Some(2));
    assert_eq!(rerun.actor, mageflow::Actor::api("bob"));
    Ok(())
}

/// `mageflow priority ID LEVEL`: a waiting swarm item gets its new priority (an event with the
/// operator as actor); a running one is refused; a level that is neither a name nor a number
/// in range is refused before anything is opened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_of_a_waiting_item() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wf = {
        let engine = mageflow::open_embedded(dir.path(), registry(), config()).await?;
        let h = engine.handle();
        let items: Vec<_> = (0..3).map(|_| sign("sleep").kwarg("ms", 600_000)).collect();
        let wf = h.submit(swarm(items).max_concurrency(1), json!({})).await?;
        while !h.workflow(wf).await?.nodes.iter().any(|n| n.in_flight) {
            tokio::task::yield_now().await;
        }
        drop(h);
        engine.shutdown().await;
        wf
    };
    let sig = |index| {
        SignatureId {
            workflow: wf,
            index,
        }
        .to_string()
    };
    let out = operator(dir.path(), &["priority", &sig(3), "high"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (state, history) = state(dir.path(), wf).await?;
    assert_eq!(state.nodes[3].spec.priority, 100);
    let changed = history
        .iter()
        .find(|e| e.payload.kind() == "priority_changed")
        .context("a priority_changed event")?;
    assert_eq!(changed.actor, mageflow::Actor::api("bob"));
    // Negative numbers are levels too.
    let out = operator(dir.path(), &["priority", &sig(2), "-5"])?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let running = state
        .nodes
        .iter()
        .position(|n| n.in_flight)
        .context("one item runs")?;
    let out = operator(dir.path(), &["priority", &sig(running as u32), "low"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot change the priority of"));
    let out = operator(dir.path(), &["priority", &sig(2), "urgent"])?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("give high, medium, low"));
    Ok(())
}
