//! Per-item callbacks of a swarm, through the engine on every store and on the deployment: each
//! item's success or error callback fires once with its outcome, index and id; items added to an
//! open swarm get theirs; the swarm's own callback fires after all of them; a swarm with
//! per-item callbacks too large for one event is created in chunks numbered right.

use crate::support::{Env, Store};
use anyhow::{Context, Result};
use mageflow::{sign, swarm, Registry, Status, TaskFailure};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use tokio::sync::mpsc;

all_stores!(
    per_item_callbacks_fire_once_each_with_the_item_outcome,
    a_swarm_with_per_item_callbacks_too_large_for_one_event_is_chunked,
);
on_cluster!(per_item_callbacks_fire_once_each_with_the_item_outcome);

/// `item` fails for an odd `n`; `each_ok`, `each_err` and `after` report their inputs.
fn tasks(tx: mpsc::UnboundedSender<(&'static str, Value)>) -> Registry {
    let mut tasks = Registry::new();
    tasks.task("item", |i: Value, _ctx| async move {
        match i["n"].as_i64() {
            Some(n) if n % 2 == 1 => Err(TaskFailure::fatal(format!("odd {n}"))),
            n => Ok(json!({ "n": n })),
        }
    });
    for name in ["each_ok", "each_err", "after"] {
        let tx = tx.clone();
        tasks.task(name, move |i: Value, _ctx| {
            let _ = tx.send((name, i));
            async move { Ok::<_, TaskFailure>(Value::Null) }
        });
    }
    tasks
}

async fn per_item_callbacks_fire_once_each_with_the_item_outcome(store: Store) -> Result<()> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let env = Env::start(store, tasks(tx)).await?;
    let h = env.handle();
    let items = (0..4).map(|n| sign("item").kwarg("n", n));
    let submitted = h
        .submit_tree(
            swarm(items)
                .open()
                .max_concurrency(2)
                .on_item_success(sign("each_ok"))
                .on_item_error(sign("each_err"))
                .on_success(sign("after"))
                .label("fan"),
            json!({}),
        )
        .await?;
    let wf = submitted.workflow;
    let fan = submitted.sig("fan").context("fan labelled")?;
    h.add_to_swarm(fan, [sign("item").kwarg("n", 4)], true)
        .await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);

    let mut seen: BTreeMap<i64, (&str, Value)> = BTreeMap::new();
    let mut after = None;
    while let Ok((name, input)) = rx.try_recv() {
        if name == "after" {
            assert!(after.is_none(), "the swarm's callback fired twice");
            after = Some(seen.len());
            continue;
        }
        let index = input["mageflow_item"]["index"]
            .as_i64()
            .context("an item index")?;
        let item = done.sig(done.nodes[0].spec.children()[index as usize]);
        assert_eq!(
            input["mageflow_item"]["signature"],
            json!(item.to_string()),
            "the item's id"
        );
        match name {
            "each_ok" => assert_eq!(input["mageflow_results"], json!({ "n": index })),
            _ => {
                assert_eq!(input["n"], json!(index), "the item's input");
                assert_eq!(
                    input["mageflow_error"]["message"],
                    json!(format!("odd {index}"))
                );
            }
        }
        assert!(
            seen.insert(index, (name, input)).is_none(),
            "item {index}'s callback fired twice"
        );
    }
    let kinds: Vec<(i64, &str)> = seen.iter().map(|(i, (n, _))| (*i, *n)).collect();
    assert_eq!(
        kinds,
        [
            (0, "each_ok"),
            (1, "each_err"),
            (2, "each_ok"),
            (3, "each_err"),
            (4, "each_ok")
        ],
        "one per item, the added one included"
    );
    assert_eq!(
        after,
        Some(5),
        "the swarm's callback fires after every per-item one"
    );
    env.shutdown().await;
    Ok(())
}

async fn a_swarm_with_per_item_callbacks_too_large_for_one_event_is_chunked(
    store: Store,
) -> Result<()> {
    // Each item brings one copy: 5 000 items an event, so 12 000 take three.
    const ITEMS: i64 = 12_000;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let env = Env::start(store, tasks(tx)).await?;
    let h = env.handle();
    // The last item is labelled: its id counts the copies the core adds before it.
    let items = (0..ITEMS).map(|n| {
        let item = sign("item").kwarg("n", n * 2);
        if n == ITEMS - 1 {
            item.label("last")
        } else {
            item
        }
    });
    let submitted = h
        .submit_tree(
            swarm(items)
                .max_concurrency(500)
                .on_item_success(sign("each_ok"))
                .label("fan"),
            json!({}),
        )
        .await?;
    let done = h.wait(submitted.workflow).await?;
    let history = h.history(submitted.workflow)?;
    let adds = history
        .iter()
        .filter(|e| e.payload.kind() == "swarm_items_added")
        .count();
    assert_eq!(adds, 2, "created with 5 000 items, then two chunks");
    assert_eq!(done.nodes.len(), 1 + 2 * ITEMS as usize);
    let last = submitted.sig("last").context("last labelled")?;
    assert_eq!(
        done.nodes[last.index as usize].spec.kwargs["n"],
        json!((ITEMS - 1) * 2)
    );
    let mut fired = 0;
    while let Ok((name, input)) = rx.try_recv() {
        assert_eq!(name, "each_ok");
        let index = input["mageflow_item"]["index"].as_i64().context("index")?;
        assert_eq!(input["mageflow_results"], json!({ "n": index * 2 }));
        fired += 1;
    }
    assert_eq!(fired, ITEMS);
    env.shutdown().await;
    Ok(())
}
