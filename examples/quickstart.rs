//! The README's example (run: `cargo run --example quickstart`).

use mageflow::{chain, sign, swarm, Config, Registry, TaskFailure};
use serde::Deserialize;

#[derive(Deserialize)]
struct Add {
    x: i64,
    #[serde(default)]
    mageflow_results: i64,
}

#[tokio::main]
async fn main() -> Result<(), mageflow::Error> {
    let mut tasks = Registry::new();
    // A success callback or a later chain step gets the previous result in `mageflow_results`.
    tasks
        .task("add", |i: Add, _ctx| async move {
            Ok::<_, TaskFailure>(i.x + i.mageflow_results)
        })
        .retries(3, 100);

    let engine = mageflow::open_embedded(
        std::env::temp_dir().join("mageflow-quickstart"),
        tasks,
        Config::default(),
    )
    .await?;
    let h = engine.handle();
    let flow = chain([
        mageflow::Sig::from(sign("add").kwarg("x", 1)),
        swarm((0..10).map(|i| sign("add").kwarg("x", i)))
            .max_concurrency(4)
            .into(),
    ])
    .on_error(sign("add").kwarg("x", -1));
    let wf = h.submit(flow, serde_json::json!({})).await?;
    let done = h.wait(wf).await?;
    println!("{:?}", done.nodes[0].outcome);
    engine.shutdown().await;
    Ok(())
}
