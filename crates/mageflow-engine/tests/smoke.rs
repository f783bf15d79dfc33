use mageflow_core::Status;
use mageflow_engine::*;
use mageflow_store::MemoryLog;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Deserialize)]
struct Add {
    x: i64,
    #[serde(default)]
    mageflow_results: Option<i64>,
}

#[tokio::test]
async fn chain_smoke() {
    let mut reg = Registry::new();
    reg.task("add", |i: Add, _ctx| async move { Ok::<_, TaskFailure>(i.x + i.mageflow_results.unwrap_or(0)) });
    let engine = Engine::start(Arc::new(MemoryLog::new()), reg, Config::default()).await.unwrap();
    let h = engine.handle();
    let wf = h
        .submit(chain([sign("add").kwarg("x", 1), sign("add").kwarg("x", 2), sign("add").kwarg("x", 3)]), serde_json::json!({}))
        .await
        .unwrap();
    let state = h.wait(wf).await.unwrap();
    assert_eq!(state.nodes[0].status, Status::Done);
    println!("{:?}", state.nodes[0].outcome);
    engine.shutdown().await;
}
