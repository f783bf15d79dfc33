//! A rerun of one signature inside a workflow: a failed chain step retried (what follows it runs,
//! the chain and its callbacks end anew), a swarm item (counted as running again, the swarm's
//! result rebuilt), a graph node (its downstream decided again), a callback on its own, a step
//! of a chain inside a swarm (both containers reopen) — and the refusals. A container's error
//! names the inner signature that failed. Every step goes through the harness: decide agrees
//! with execute, a refusal changes nothing, the live state is the fold of the log.

use crate::support::{chain, graph, swarm, task, Harness};
use mageflow_core::condition::Condition;
use mageflow_core::{Edge, Message, Op, Outcome, Rejection, Status};
use serde_json::{json, Value};

fn rerun(h: &mut Harness, name: &str) -> Vec<mageflow_core::Event> {
    let node = h.idx(name);
    h.ok(Op::Rerun { node })
}

fn refused(h: &mut Harness, name: &str) -> Rejection {
    let node = h.idx(name);
    h.rejected(Op::Rerun { node })
}

fn error_of(h: &Harness, name: &str) -> String {
    match &h.node(name).outcome {
        Some(Outcome::Err(e)) => e.message.clone(),
        other => panic!("{name} has no error: {other:?}"),
    }
}

#[test]
fn a_failed_chain_step_reruns_with_its_input_and_the_chain_goes_on_from_it() {
    let tree = chain("order", [task("reserve"), task("charge"), task("ship")])
        .on_success(task("notify"))
        .on_error(task("alert"));
    let mut h = Harness::new(&tree, Some(json!({"id": 1})));
    h.run("reserve", json!({"held": true}));
    h.start("charge");
    h.fail("charge", "card declined", false);
    assert_eq!(h.status("order"), Status::Failed);
    let charge = h.wf.sig(h.idx("charge"));
    assert_eq!(
        error_of(&h, "order"),
        format!("step 1 \"charge\" ({charge}) failed: card declined"),
        "the chain's error names its failing step"
    );
    assert_eq!(h.status("notify"), Status::Skipped);
    // Its error callback is queued: a rerun would reset it while it may run.
    assert!(matches!(
        refused(&mut h, "charge"),
        Rejection::InvalidTransition { op: "rerun", .. }
    ));
    h.run("alert", json!(null));

    let first_input = h.node("charge").message.clone();
    let attempts = h.node("charge").attempt;
    rerun(&mut h, "charge");
    assert_eq!(h.status("charge"), Status::Queued);
    assert_eq!(
        h.node("charge").message,
        first_input,
        "the input it ran with"
    );
    assert_eq!(h.status("order"), Status::Running);
    assert_eq!(h.node("order").outcome, None);
    assert_eq!(
        h.status("reserve"),
        Status::Done,
        "what came before is kept"
    );
    assert_eq!(h.status("alert"), Status::Pending, "callbacks fire anew");
    assert_eq!(h.status("notify"), Status::Pending);
    assert!(!h.wf.is_finished());

    assert_eq!(h.start("charge"), attempts + 1, "attempt numbers only grow");
    h.complete("charge", json!({"paid": 5}));
    assert_eq!(
        h.node("ship").message,
        Some(Message::result(json!({"paid": 5})))
    );
    h.run("ship", json!("shipped"));
    assert_eq!(h.status("order"), Status::Done);
    assert_eq!(h.status("notify"), Status::Queued);
    assert_eq!(h.status("alert"), Status::Skipped);
    assert_eq!(
        h.count("alert", "queued"),
        1,
        "the alert fired once, in the failed run"
    );
}

#[test]
fn a_done_step_reruns_what_consumed_its_result() {
    let tree = chain("c", [task("a"), task("b")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    h.run("a", json!(1));
    h.run("b", json!(2));
    assert!(h.wf.is_finished());
    rerun(&mut h, "a");
    assert_eq!(h.status("a"), Status::Queued);
    assert_eq!(
        h.status("b"),
        Status::Pending,
        "b ran on a's old result: it runs again"
    );
    h.run("a", json!(10));
    assert_eq!(h.node("b").message, Some(Message::result(json!(10))));
    h.run("b", json!(20));
    assert_eq!(h.node("c").outcome, Some(Outcome::Ok(json!(20))));
}

#[test]
fn a_swarm_item_reruns_and_the_swarm_result_is_rebuilt() {
    let tree = swarm("fan", 1, None, true, [task("i0"), task("i1"), task("i2")])
        .on_success(task("collect"));
    let mut h = Harness::new(&tree, Some(json!({})));
    h.run("i0", json!("a"));
    h.start("i1");
    h.fail("i1", "flaky", true);
    // The swarm still runs, its one slot taken by i2: the rerun item waits for it, ahead of
    // any item never handed out.
    assert_eq!(h.status("fan"), Status::Running);
    assert_eq!(h.status("i2"), Status::Queued);
    rerun(&mut h, "i1");
    assert_eq!(h.status("i1"), Status::Pending);
    assert_eq!(h.node("fan").swarm.failed, 0);
    assert_eq!(h.node("fan").swarm.running, 1);
    assert_eq!(h.node("fan").swarm.rerun_waiting, [h.idx("i1")]);
    h.run("i2", json!("c"));
    assert_eq!(h.status("i1"), Status::Queued, "the freed slot");
    assert!(h.node("fan").swarm.rerun_waiting.is_empty());
    h.run("i1", json!("b"));
    assert_eq!(
        h.node("fan").outcome,
        Some(Outcome::Ok(json!([{"ok": "a"}, {"ok": "b"}, {"ok": "c"}])))
    );
    h.run("collect", json!(null));
    assert!(h.wf.is_finished());

    // Rerun an item of the finished swarm: it reopens, and its callback fires again.
    rerun(&mut h, "i0");
    assert_eq!(h.status("fan"), Status::Running);
    assert_eq!(h.status("collect"), Status::Pending);
    h.run("i0", json!("a2"));
    assert_eq!(h.status("fan"), Status::Done);
    assert_eq!(h.count("collect", "queued"), 2);
    let Some(Message { value, .. }) = &h.node("collect").message else {
        panic!("collect not triggered");
    };
    assert_eq!(value[0], json!({"ok": "a2"}));
}

#[test]
fn a_swarm_stopped_at_its_limit_names_the_item_and_reruns_from_it() {
    let tree = swarm("fan", 1, Some(1), true, [task("i0"), task("i1")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    h.start("i0");
    h.fail("i0", "bad row", false);
    assert_eq!(h.status("fan"), Status::Failed);
    let i0 = h.wf.sig(h.idx("i0"));
    assert_eq!(
        error_of(&h, "fan"),
        format!(
            "swarm stopped after 1 failed tasks; the last: item 0 \"i0\" ({i0}) failed: bad row"
        )
    );
    assert_eq!(h.status("i1"), Status::Pending, "never handed out");
    rerun(&mut h, "i0");
    assert_eq!(h.status("fan"), Status::Running);
    h.run("i0", json!(0));
    // The slot freed, the item held back by the limit is handed out.
    h.run("i1", json!(1));
    assert_eq!(h.status("fan"), Status::Done);
}

#[test]
fn a_graph_node_reruns_and_its_downstream_is_decided_again() {
    let edge = |from, to, when| Edge {
        from,
        to,
        when,
        max_iterations: None,
    };
    let g = graph(
        "g",
        [task("a"), task("b"), task("c"), task("side")],
        vec![
            edge(0, 1, Condition::OnSuccess),
            edge(0, 3, Condition::Always),
            edge(1, 2, Condition::OnSuccess),
        ],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({})));
    h.run("a", json!(1));
    h.run("side", json!("s"));
    h.start("b");
    h.fail("b", "boom", false);
    assert_eq!(h.status("c"), Status::Skipped);
    assert_eq!(h.status("g"), Status::Failed);
    let b = h.wf.sig(h.idx("b"));
    assert_eq!(
        error_of(&h, "g"),
        format!("graph node 1 \"b\" ({b}) failed: boom")
    );

    rerun(&mut h, "b");
    assert_eq!(h.status("g"), Status::Running);
    assert_eq!(h.status("b"), Status::Queued);
    assert_eq!(
        h.status("c"),
        Status::Pending,
        "skipped because b failed: decided again"
    );
    assert_eq!(h.status("side"), Status::Done, "not downstream of b: kept");
    h.run("b", json!(2));
    h.run("c", json!(3));
    assert_eq!(
        h.node("g").outcome,
        Some(Outcome::Ok(json!({"c": 3, "side": "s"})))
    );
}

#[test]
fn a_step_inside_a_swarm_item_reopens_every_container_above_it() {
    let tree = swarm(
        "fan",
        2,
        None,
        true,
        [
            chain("c1", [task("x"), task("y")]),
            chain("c2", [task("z")]),
        ],
    )
    .on_success(task("done"));
    let mut h = Harness::new(&tree, Some(json!({})));
    h.run("x", json!(1));
    h.run("z", json!(3));
    h.start("y");
    h.fail("y", "nope", false);
    assert_eq!(
        h.status("fan"),
        Status::Done,
        "a swarm with no limit lists failures"
    );
    let y = h.wf.sig(h.idx("y"));
    assert_eq!(
        error_of(&h, "c1"),
        format!("step 1 \"y\" ({y}) failed: nope")
    );
    h.run("done", json!(null));

    rerun(&mut h, "y");
    for running in ["fan", "c1"] {
        assert_eq!(h.status(running), Status::Running, "{running}");
    }
    assert_eq!(h.status("c2"), Status::Done);
    assert_eq!(h.node("fan").swarm.running, 1);
    h.run("y", json!(2));
    let Some(Outcome::Ok(Value::Array(results))) = &h.node("fan").outcome else {
        panic!("fan did not succeed");
    };
    assert_eq!(results[0], json!({"ok": 2}));
    assert_eq!(h.status("done"), Status::Queued);
}

#[test]
fn a_callback_reruns_on_its_own() {
    let tree = task("t").on_success(task("mail"));
    let mut h = Harness::new(&tree, Some(json!({"to": "x"})));
    h.run("t", json!("r"));
    h.start("mail");
    h.fail("mail", "smtp down", false);
    rerun(&mut h, "mail");
    assert_eq!(
        h.status("t"),
        Status::Done,
        "what it hangs off keeps its outcome"
    );
    assert_eq!(h.status("mail"), Status::Queued);
    h.run("mail", json!(null));
    assert!(h.wf.is_finished());
}

#[test]
fn a_step_inside_an_item_of_a_full_swarm_is_refused_and_a_canceled_waiting_item_frees_nothing() {
    let tree = swarm(
        "fan",
        1,
        None,
        true,
        [chain("c1", [task("x")]), task("i1"), task("i2")],
    );
    let mut h = Harness::new(&tree, Some(json!({})));
    h.start("x");
    h.fail("x", "no", false);
    assert_eq!(
        h.status("i1"),
        Status::Queued,
        "c1 failed: its slot went to i1"
    );
    let fan = h.idx("fan");
    assert_eq!(refused(&mut h, "x"), Rejection::SwarmFull(fan));
    assert_eq!(Rejection::SwarmFull(fan).code(), "swarm_full");
    // The whole item waits for the slot instead; canceled while it waits, it took none.
    rerun(&mut h, "c1");
    assert_eq!(h.node("fan").swarm.rerun_waiting, [h.idx("c1")]);
    let c1 = h.idx("c1");
    h.ok(Op::Cancel {
        node: c1,
        confirmed: true,
    });
    assert!(h.node("fan").swarm.rerun_waiting.is_empty());
    assert_eq!(h.node("fan").swarm.running, 1);
    h.run("i1", json!(1));
    h.run("i2", json!(2));
    assert_eq!(h.status("fan"), Status::Done);
}

#[test]
fn refusals_name_why_and_change_nothing() {
    let tree = chain("c", [task("a"), task("b"), task("x")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    // Not ended yet: queued, pending.
    assert!(matches!(
        refused(&mut h, "a"),
        Rejection::InvalidTransition {
            op: "rerun",
            status: Status::Queued
        }
    ));
    assert!(matches!(
        refused(&mut h, "b"),
        Rejection::InvalidTransition {
            op: "rerun",
            status: Status::Pending
        }
    ));
    h.run("a", json!(1));
    h.start("b");
    // What a rerun of a would reset (b) is running.
    assert!(matches!(
        refused(&mut h, "a"),
        Rejection::InvalidTransition {
            op: "rerun",
            status: Status::Running
        }
    ));
    let b = h.idx("b");
    h.ok(Op::Cancel {
        node: b,
        confirmed: true,
    });
    assert_eq!(refused(&mut h, "b"), Rejection::Canceled(b));
    assert_eq!(
        h.rejected(Op::Rerun { node: 99 }),
        Rejection::NoSuchNode(99)
    );
}
