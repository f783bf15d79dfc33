//! `mageflow::testing::TestEngine`, as a user's test would use it. It is in-memory by design, so
//! these tests run on that store only.

use mageflow::testing::{Dispatch, TestEngine};
use mageflow::{chain, sign, swarm, Registry, TaskFailure};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Deserialize)]
struct Email {
    to: String,
    subject: String,
}

fn tasks() -> Registry {
    let mut tasks = Registry::new();
    tasks.task("email", |i: Email, _ctx| async move {
        Ok::<_, TaskFailure>(format!("{}: {}", i.to, i.subject))
    });
    for name in ["fetch", "store", "index"] {
        tasks.task(name, |_: Value, _ctx| async move {
            Ok::<_, TaskFailure>(Value::Null)
        });
    }
    tasks
}

#[tokio::test]
async fn record_only_records_a_task_with_its_merged_input() -> anyhow::Result<()> {
    let t = TestEngine::record_only(tasks()).await;
    let sig = sign("email").kwarg("to", "a@b");
    t.handle().submit(sig, json!({"subject": "hi"})).await?;

    t.assert_task_dispatched("email", &json!({"to": "a@b"}), false);
    t.assert_task_dispatched("email", &json!({"subject": "hi", "to": "a@b"}), true);
    match t.dispatched().as_slice() {
        [Dispatch::Task { task, input, .. }] => {
            assert_eq!(task, "email");
            assert_eq!(input, &json!({"subject": "hi", "to": "a@b"}));
        }
        other => panic!("expected one task dispatch, got {other:?}"),
    }
    t.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn record_only_records_chains_and_swarms() -> anyhow::Result<()> {
    let t = TestEngine::record_only(tasks()).await;
    let h = t.handle();
    h.submit(chain([sign("fetch"), sign("store")]).name("etl"), json!({}))
        .await?;
    t.assert_chain_dispatched(&["fetch", "store"]);
    // Nothing runs: only the first step of the chain was queued.
    t.assert_task_dispatched("fetch", &json!({}), true);
    assert!(!t
        .dispatched()
        .iter()
        .any(|d| matches!(d, Dispatch::Task { task, .. } if task == "store")));

    t.clear();
    t.assert_nothing_dispatched();
    h.submit(swarm([sign("index"), sign("store")]), json!({"batch": 3}))
        .await?;
    t.assert_swarm_dispatched(&["index", "store"]);
    t.assert_task_dispatched("index", &json!({"batch": 3}), false);
    t.assert_task_dispatched("store", &json!({"batch": 3}), false);
    let chains = t
        .dispatched()
        .iter()
        .filter(|d| matches!(d, Dispatch::Chain { .. }))
        .count();
    assert_eq!(chains, 0, "clear forgot the chain");
    t.shutdown().await;
    Ok(())
}

#[tokio::test]
async fn a_fresh_engine_dispatched_nothing() {
    let t = TestEngine::record_only(tasks()).await;
    t.assert_nothing_dispatched();
    assert!(t.dispatched().is_empty());
    t.shutdown().await;
}

#[tokio::test]
#[should_panic(expected = "was not dispatched with input matching")]
async fn a_partial_mismatch_fails_the_assertion() {
    let t = TestEngine::record_only(tasks()).await;
    let sig = sign("email").kwarg("to", "a@b").kwarg("subject", "hi");
    t.handle()
        .submit(sig, json!({}))
        .await
        .unwrap_or_else(|e| panic!("submit: {e}"));
    t.assert_task_dispatched("email", &json!({"to": "c@d"}), false);
}

#[tokio::test]
#[should_panic(expected = "was not dispatched with input equal to")]
async fn an_exact_assertion_needs_the_whole_input() {
    let t = TestEngine::record_only(tasks()).await;
    let sig = sign("email").kwarg("to", "a@b");
    t.handle()
        .submit(sig, json!({"subject": "hi"}))
        .await
        .unwrap_or_else(|e| panic!("submit: {e}"));
    t.assert_task_dispatched("email", &json!({"to": "a@b"}), true);
}

#[tokio::test]
#[should_panic(expected = "no swarm with tasks")]
async fn a_chain_is_not_a_swarm() {
    let t = TestEngine::record_only(tasks()).await;
    t.handle()
        .submit(chain([sign("fetch"), sign("store")]), json!({}))
        .await
        .unwrap_or_else(|e| panic!("submit: {e}"));
    t.assert_swarm_dispatched(&["fetch", "store"]);
}

#[tokio::test]
#[should_panic(expected = "expected no dispatch")]
async fn nothing_dispatched_fails_after_a_submit() {
    let t = TestEngine::record_only(tasks()).await;
    t.handle()
        .submit(sign("fetch"), json!({}))
        .await
        .unwrap_or_else(|e| panic!("submit: {e}"));
    t.assert_nothing_dispatched();
}

#[tokio::test]
async fn a_running_test_engine_runs_handlers() -> anyhow::Result<()> {
    let t = TestEngine::new(tasks()).await;
    let h = t.handle();
    let wf = h
        .submit(sign("email").kwarg("to", "a@b"), json!({"subject": "hi"}))
        .await?;
    let done = h.wait(wf).await?;
    assert_eq!(
        done.nodes[0].outcome,
        Some(mageflow::Outcome::Ok(json!("a@b: hi")))
    );
    t.assert_task_dispatched("email", &json!({"to": "a@b", "subject": "hi"}), true);
    t.shutdown().await;
    Ok(())
}
