//! Refusals before anything is written: unknown tasks, kwargs or input that do not fit the
//! task's input type; and `update_kwargs` on several signatures is all-or-nothing.

use crate::support::{config, Env, Store};
use anyhow::Result;
use mageflow::core::Rejection;
use mageflow::{chain, sign, swarm, Error, Outcome, Registry, SignatureId, Status, TaskFailure};
use serde::Deserialize;
use serde_json::{json, Value};

all_stores!(
    bad_signatures_and_inputs_are_refused_with_typed_errors,
    update_kwargs_applies_all_updates_or_none,
    run_checks_the_input_of_a_containers_first_tasks,
    a_creation_over_the_step_limit_is_refused_alone,
);
on_cluster!(
    bad_signatures_and_inputs_are_refused_with_typed_errors,
    update_kwargs_applies_all_updates_or_none,
    run_checks_the_input_of_a_containers_first_tasks,
    a_creation_over_the_step_limit_is_refused_alone,
);

#[derive(Deserialize)]
struct Add {
    x: i64,
    #[serde(default)]
    mageflow_results: i64,
}

fn adder() -> Registry {
    let mut tasks = Registry::new();
    tasks.task("add", |i: Add, _ctx| async move {
        Ok::<_, TaskFailure>(i.x + i.mageflow_results)
    });
    tasks
}

/// Expect `result` to be refused with `code`, having appended nothing to the log.
fn refused<T: std::fmt::Debug>(
    what: &str,
    result: mageflow::Result<T>,
    code: &str,
    head_before: u64,
    head_after: u64,
) -> Error {
    let err = match result {
        Ok(v) => panic!("{what}: expected a {code} refusal, got Ok({v:?})"),
        Err(e) => e,
    };
    assert_eq!(err.code(), code, "{what}: {err}");
    assert_eq!(head_after, head_before, "{what}: a refusal appends nothing");
    err
}

async fn bad_signatures_and_inputs_are_refused_with_typed_errors(store: Store) -> Result<()> {
    let env = Env::start(store, adder()).await?;
    let h = env.handle();
    let log = h.log().clone();
    let add = |x: i64| sign("add").kwarg("x", x);

    // Unknown task: alone, inside a chain or a swarm, as a callback, and on create.
    let cases: Vec<(&str, mageflow::Sig)> = vec![
        ("task", sign("nope").into()),
        ("chain step", chain([add(1), sign("nope")]).into()),
        ("swarm item", swarm([add(1), sign("nope")]).into()),
        ("error callback", add(1).on_error(sign("nope")).into()),
    ];
    for (what, sig) in cases {
        let head = log.head();
        let r = h.submit(sig.clone(), json!({})).await;
        let e = refused(what, r, "unknown_task", head, log.head());
        assert!(
            matches!(&e, Error::UnknownTask { name } if name == "nope"),
            "{e:?}"
        );
        let r = h.create(sig).await;
        refused(what, r, "unknown_task", head, log.head());
    }

    // Kwargs of the wrong type: a string where an i64 is expected.
    let head = log.head();
    let r = h.submit(sign("add").kwarg("x", "one"), json!({})).await;
    let e = refused("string kwarg", r, "invalid_kwargs", head, log.head());
    assert!(
        matches!(&e, Error::InvalidKwargs { task, .. } if task == "add"),
        "{e:?}"
    );
    let r = h
        .create(chain([add(1), sign("add").kwarg("x", "two")]))
        .await;
    refused(
        "string kwarg in a chain",
        r,
        "invalid_kwargs",
        head,
        log.head(),
    );

    // Input missing a required field, or with a field of the wrong type.
    let r = h.submit(sign("add"), json!({})).await;
    let e = refused("missing x", r, "invalid_input", head, log.head());
    assert!(
        matches!(&e, Error::InvalidInput { task, .. } if task == "add"),
        "{e:?}"
    );
    let r = h.submit(sign("add"), json!({"x": "three"})).await;
    refused("string x", r, "invalid_input", head, log.head());
    let r = h
        .submit(chain([sign("add"), add(1)]), json!({"y": 1}))
        .await;
    refused(
        "missing x for the first step",
        r,
        "invalid_input",
        head,
        log.head(),
    );

    // Created fine (x may come with the input), then run without x.
    let wf = h.create(sign("add")).await?;
    let head = log.head();
    let r = h.run(wf, json!({"y": 1})).await;
    refused("run without x", r, "invalid_input", head, log.head());
    let state = h.workflow(wf).await?;
    assert_eq!(state.nodes[0].status, Status::Pending);
    assert_eq!(state.nodes[0].message, None);
    h.run(wf, json!({"x": 4})).await?;
    assert_eq!(
        h.wait(wf).await?.nodes[0].outcome,
        Some(Outcome::Ok(json!(4)))
    );
    env.shutdown().await;
    Ok(())
}

async fn update_kwargs_applies_all_updates_or_none(store: Store) -> Result<()> {
    let env = Env::start(store, adder()).await?;
    let h = env.handle();
    let sig = chain([sign("add").kwarg("x", 1), sign("add").kwarg("x", 2)]);
    let wf = h.create(sig).await?;
    let at = |index| SignatureId {
        workflow: wf,
        index,
    };
    let before = h.workflow(wf).await?;
    let kwargs = |w: &mageflow::Workflow| -> Vec<Value> {
        w.nodes.iter().map(|n| n.spec.kwargs.clone()).collect()
    };

    // The second update does not fit the task: refused by the registry.
    let head = h.log().head();
    let r = h
        .update_kwargs(vec![
            (at(1), json!({"x": 10})),
            (at(2), json!({"x": "twenty"})),
        ])
        .await;
    refused("string kwarg", r, "invalid_kwargs", head, h.log().head());
    assert_eq!(kwargs(&h.workflow(wf).await?), kwargs(&before));

    // The last update is refused by the core after the first ones were decided: all undone.
    let r = h
        .update_kwargs(vec![
            (at(1), json!({"x": 10})),
            (at(2), json!({"x": 20})),
            (at(0), json!("not an object")),
        ])
        .await;
    let e = refused(
        "non-object kwargs",
        r,
        "kwargs_not_object",
        head,
        h.log().head(),
    );
    assert!(
        matches!(e, Error::Rejected(Rejection::KwargsNotObject)),
        "{e:?}"
    );
    assert_eq!(kwargs(&h.workflow(wf).await?), kwargs(&before));

    // An update of a signature that does not exist spoils the whole set too.
    let r = h
        .update_kwargs(vec![(at(1), json!({"x": 10})), (at(9), json!({"x": 1}))])
        .await;
    refused(
        "unknown signature",
        r,
        "no_such_signature",
        head,
        h.log().head(),
    );
    assert_eq!(kwargs(&h.workflow(wf).await?), kwargs(&before));

    // All valid: both apply, atomically, and the run uses them.
    h.update_kwargs(vec![(at(1), json!({"x": 10})), (at(2), json!({"x": 20}))])
        .await?;
    let after = h.workflow(wf).await?;
    assert_eq!(after.nodes[1].spec.kwargs, json!({"x": 10}));
    assert_eq!(after.nodes[2].spec.kwargs, json!({"x": 20}));
    h.run(wf, json!({})).await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].outcome, Some(Outcome::Ok(json!(30))));

    // Once run, kwargs are frozen.
    let head = h.log().head();
    let r = h.update_kwargs(vec![(at(1), json!({"x": 0}))]).await;
    refused(
        "after the run",
        r,
        "invalid_transition",
        head,
        h.log().head(),
    );
    env.shutdown().await;
    Ok(())
}

/// `Handle::run` must refuse an input the first task(s) cannot take whatever the root's kind, as
/// `Handle::submit` does — not only when the root is a task.
async fn run_checks_the_input_of_a_containers_first_tasks(store: Store) -> Result<()> {
    let env = Env::start(store, adder()).await?;
    let h = env.handle();
    let roots: Vec<(&str, mageflow::Sig)> = vec![
        (
            "chain",
            chain([sign("add"), sign("add").kwarg("x", 1)]).into(),
        ),
        (
            "swarm",
            swarm([sign("add"), sign("add").kwarg("x", 1)]).into(),
        ),
    ];
    for (what, sig) in roots {
        let wf = h.create(sig).await?;
        let head = h.log().head();
        let r = h.run(wf, json!({"y": 1})).await;
        let e = refused(what, r, "invalid_input", head, h.log().head());
        assert!(
            matches!(&e, Error::InvalidInput { task, .. } if task == "add"),
            "{e:?}"
        );
        assert_eq!(
            h.workflow(wf).await?.nodes[0].message,
            None,
            "{what} was not run"
        );
    }
    env.shutdown().await;
    Ok(())
}

/// A creation that would take more events in its first step than `Config::creation_events_max`
/// (a swarm allowed to queue every item at once) is refused on its own, writing nothing, while
/// calls decided in the same step go through; with a lower max_concurrency it runs.
async fn a_creation_over_the_step_limit_is_refused_alone(store: Store) -> Result<()> {
    let config = mageflow::Config {
        creation_events_max: 60,
        ..config()
    };
    let env = Env::with_config(store, adder(), config).await?;
    let h = env.handle();
    let log = h.log().clone();
    let items = || (0..100).map(|x| sign("add").kwarg("x", x));
    let (big, small) = tokio::join!(
        h.submit(swarm(items()).max_concurrency(100), json!({})),
        h.submit(sign("add").kwarg("x", 1), json!({})),
    );
    let small = small?;
    let err = match big {
        Ok(wf) => panic!("expected a refusal, got {wf}"),
        Err(e) => e,
    };
    assert_eq!(err.code(), "invalid_tree", "{err}");
    assert!(err.to_string().contains("limit of 60"), "{err}");
    assert_eq!(h.wait(small).await?.nodes[0].status, Status::Done);
    // Nothing of the refused swarm was written: the log holds only the small workflow.
    let streams: std::collections::BTreeSet<_> = log
        .read_all(1, usize::MAX)?
        .into_iter()
        .map(|r| r.event.stream)
        .filter(|s| !s.is_system())
        .collect();
    assert_eq!(streams.into_iter().collect::<Vec<_>>(), vec![small]);

    let wf = h
        .submit(swarm(items()).max_concurrency(10), json!({}))
        .await?;
    let done = h.wait(wf).await?;
    assert_eq!(done.nodes[0].status, Status::Done);
    env.shutdown().await;
    Ok(())
}
