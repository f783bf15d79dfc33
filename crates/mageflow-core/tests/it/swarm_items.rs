//! Per-item callbacks of a swarm: every item gets its own copy of each (created with the swarm or
//! added later), which fires once with that item's result (success) or its input and error
//! (error), plus the item's index and id; they take no concurrency slot, do not count toward
//! the failure limit, and hold the swarm's own callbacks until they end.

use crate::support::{chain, swarm, swarm_items, task, Harness};
use mageflow_core::model::{ERROR_FIELD, ITEM_FIELD, RETURN_FIELD_DEFAULT};
use mageflow_core::{NodeIndex, Op, Status, TaskError};
use serde_json::{json, Value};

/// The per-item success and error callbacks of item `name`.
fn callbacks_of(h: &Harness, name: &str) -> (NodeIndex, NodeIndex) {
    let n = h.node(name);
    assert_eq!(n.spec.on_success.len(), 1, "{name}: one success copy");
    assert_eq!(n.spec.on_error.len(), 1, "{name}: one error copy");
    (n.spec.on_success[0], n.spec.on_error[0])
}

fn status(h: &Harness, i: NodeIndex) -> Status {
    h.wf.nodes[i as usize].status
}

fn input_of(h: &Harness, i: NodeIndex) -> Value {
    h.wf.effective_input(i)
}

fn run_index(h: &mut Harness, i: NodeIndex, ok: bool) {
    h.ok(Op::Start { node: i });
    let attempt = h.wf.nodes[i as usize].attempt;
    if ok {
        h.ok(Op::Complete {
            node: i,
            attempt,
            result: json!("cb"),
        });
    } else {
        h.ok(Op::Fail {
            node: i,
            attempt,
            error: TaskError {
                message: "cb broke".into(),
                retryable: false,
            },
        });
    }
}

#[test]
fn each_item_fires_its_own_callback_once_with_its_outcome_index_and_id() {
    let tree = swarm(
        "fan",
        1,
        Some(2),
        true,
        [task("i0"), task("i1"), task("i2")],
    )
    .per_item(Some(task("each_ok")), Some(task("each_err")))
    .on_success(task("after"));
    let mut h = Harness::new(&tree, Some(json!({"batch": 1})));

    h.run("i0", json!({"n": 0}));
    let (ok0, err0) = callbacks_of(&h, "i0");
    assert_eq!(status(&h, ok0), Status::Queued);
    assert_eq!(status(&h, err0), Status::Skipped);
    let input = input_of(&h, ok0);
    assert_eq!(input[RETURN_FIELD_DEFAULT], json!({"n": 0}));
    let i0 = h.wf.sig(h.idx("i0")).to_string();
    assert_eq!(input[ITEM_FIELD], json!({"index": 0, "signature": i0}));
    // The item's slot is free: the next item runs beside its callback.
    assert_eq!(h.status("i1"), Status::Queued);

    h.start("i1");
    h.fail("i1", "bad row", false);
    let (ok1, err1) = callbacks_of(&h, "i1");
    assert_eq!(status(&h, ok1), Status::Skipped);
    let input = input_of(&h, err1);
    assert_eq!(input["batch"], json!(1), "the item's input");
    assert_eq!(input[ERROR_FIELD]["message"], json!("bad row"));
    assert_eq!(input[ITEM_FIELD]["index"], json!(1));

    // A failing per-item callback is not an item failure: the limit of 2 is not reached.
    run_index(&mut h, err1, false);
    assert_eq!(h.node("fan").swarm.failed, 1);
    h.run("i2", json!({"n": 2}));
    assert_eq!(h.status("fan"), Status::Done);
    // The swarm's own callback waits for the per-item ones still queued.
    assert_eq!(h.status("after"), Status::Pending);
    run_index(&mut h, ok0, true);
    let (ok2, _) = callbacks_of(&h, "i2");
    assert_eq!(status(&h, ok2), Status::Queued);
    run_index(&mut h, ok2, true);
    assert_eq!(
        h.status("after"),
        Status::Queued,
        "fires once the last per-item one ended"
    );
    for i in [ok0, ok2, err1] {
        assert_eq!(
            h.log
                .iter()
                .filter(|e| e.payload.kind() == "queued" && e.payload.node() == Some(i))
                .count(),
            1,
            "callback {i} fired once"
        );
    }
}

#[test]
fn items_added_later_get_their_copies_and_templates_can_be_trees() {
    let tree = swarm("fan", 4, None, false, [task("first")])
        .per_item(Some(chain("notify", [task("log"), task("mail")])), None);
    let mut h = Harness::new(&tree, Some(json!({})));
    let fan = h.idx("fan");
    let base = h.wf.nodes.len();
    h.ok(Op::AddSwarmItems {
        swarm: fan,
        nodes: swarm_items(fan, base, &[task("late")]),
        close: true,
    });
    for item in ["first", "late"] {
        let n = h.node(item);
        assert_eq!(n.spec.on_success.len(), 1, "{item}");
        assert!(n.spec.on_error.is_empty(), "{item}: no error template");
        let copy = &h.wf.nodes[n.spec.on_success[0] as usize];
        assert_eq!(copy.spec.name, "notify");
        assert_eq!(copy.spec.children().len(), 2);
    }
    let late = h.node("late").spec.on_success[0];
    assert_eq!(
        h.wf.nodes[late as usize].spec.kwargs[ITEM_FIELD]["index"],
        json!(1)
    );
    h.run("first", json!(1));
    h.run("late", json!(2));
    assert_eq!(h.status("fan"), Status::Done);
    let first = h.node("first").spec.on_success[0];
    assert_eq!(status(&h, first), Status::Running, "the chain copy runs");
}

#[test]
fn a_template_that_is_not_a_tree_is_refused() {
    let mut nodes = swarm("fan", 1, None, true, [task("a")])
        .per_item(Some(task("cb")), None)
        .flatten();
    if let mageflow_core::KindSpec::Swarm { item_callbacks, .. } = &mut nodes[0].kind {
        item_callbacks.on_success[0].on_success = vec![7];
    }
    let mut h = Harness::empty();
    let refused = h.rejected(Op::Create { nodes, start: None });
    assert!(
        refused.to_string().contains("per-item callback of swarm 0"),
        "{refused}"
    );
}

#[test]
fn a_swarm_without_a_limit_hands_out_at_most_a_step_of_items_at_once() {
    use mageflow_core::kind::swarm::SWARM_DISPATCH_PER_STEP;
    let step = SWARM_DISPATCH_PER_STEP as usize;
    let items: Vec<_> = (0..step * 2 + 5).map(|i| task(&format!("i{i}"))).collect();
    let tree = swarm("fan", u32::MAX, None, true, items);
    let mut h = Harness::new(&tree, Some(json!({})));
    assert_eq!(h.node("fan").swarm.running as usize, step);
    assert_eq!(h.status(&format!("i{step}")), Status::Pending);
    // An item that ends hands out another step.
    h.run("i0", json!(0));
    assert_eq!(h.node("fan").swarm.running as usize, 2 * step - 1);
    h.run("i1", json!(1));
    assert_eq!(
        h.node("fan").swarm.dispatched as usize,
        step * 2 + 5,
        "all handed out"
    );
}
