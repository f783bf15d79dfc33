//! Priority swarms: with `max_concurrency = 1` and waiting items of mixed priority, the start
//! order follows priority, then the order of addition; a reprioritised waiting item jumps the
//! queue; items added later join it; a running or ended signature's priority cannot change; a
//! priority out of range is refused. Every step goes through the harness (decide = execute,
//! refusals change nothing, the live state is the fold of the log).

use crate::support::{chain, swarm, swarm_items, task, Harness, Tree};
use mageflow_core::{NodeIndex, Op, Payload, Priority, Rejection, Status, Workflow};
use serde_json::json;

/// The items in the order they were handed out (their `queued` events).
fn start_order(h: &Harness, items: &[NodeIndex]) -> Vec<NodeIndex> {
    h.log
        .iter()
        .filter_map(|e| match e.payload {
            Payload::Queued { node, .. } if items.contains(&node) => Some(node),
            _ => None,
        })
        .collect()
}

fn items_of(wf: &Workflow, swarm: NodeIndex) -> Vec<NodeIndex> {
    wf.nodes[swarm as usize].spec.children().to_vec()
}

/// Run whatever is queued, one at a time, until the swarm ends.
fn drain(h: &mut Harness, items: &[NodeIndex]) {
    while let Some(&i) = items
        .iter()
        .find(|&&i| h.wf.nodes[i as usize].status == Status::Queued)
    {
        h.ok(Op::Start { node: i });
        let attempt = h.wf.nodes[i as usize].attempt;
        h.ok(Op::Complete {
            node: i,
            attempt,
            result: json!(i),
        });
    }
}

fn levelled(n: usize) -> Vec<Tree> {
    let levels = [Priority::Low, Priority::Medium, Priority::High];
    (0..n)
        .map(|i| task(&format!("i{i}")).priority(levels[i % 3].value()))
        .collect()
}

#[test]
fn a_hundred_waiting_items_start_by_priority_then_by_addition() {
    let tree = swarm("fan", 1, None, true, levelled(100));
    let mut h = Harness::new(&tree, Some(json!({})));
    let items = items_of(&h.wf, 0);
    drain(&mut h, &items);
    assert_eq!(h.wf.nodes[0].status, Status::Done);
    let mut expected = items.clone();
    // Stable: by addition within one priority.
    expected.sort_by_key(|&i| -h.wf.nodes[i as usize].spec.priority);
    assert_eq!(start_order(&h, &items), expected);
}

#[test]
fn a_reprioritised_item_jumps_the_queue_and_added_items_join_it() {
    let tree = swarm("fan", 1, None, false, [task("a"), task("b"), task("c")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    assert_eq!(
        h.status("a"),
        Status::Queued,
        "all medium: in order of addition"
    );
    let c = h.idx("c");
    h.ok(Op::SetPriority {
        node: c,
        priority: Priority::High.value(),
    });
    // Late items: one urgent, one low.
    let fan = h.idx("fan");
    let base = h.wf.nodes.len();
    h.ok(Op::AddSwarmItems {
        swarm: fan,
        nodes: swarm_items(
            fan,
            base,
            &[task("urgent").priority(500), task("later").priority(-5)],
        ),
        close: true,
    });
    let items = items_of(&h.wf, fan);
    drain(&mut h, &items);
    let names: Vec<&str> = start_order(&h, &items)
        .into_iter()
        .map(|i| h.wf.nodes[i as usize].spec.name.as_str())
        .collect();
    assert_eq!(names, ["a", "urgent", "c", "b", "later"]);
    assert_eq!(h.count("c", "priority_changed"), 1);
}

#[test]
fn only_a_waiting_signature_changes_priority_and_within_range() {
    let tree = chain("c", [task("a"), task("b")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    let (a, b) = (h.idx("a"), h.idx("b"));
    // Queued and pending both wait.
    h.ok(Op::SetPriority {
        node: a,
        priority: 7,
    });
    h.ok(Op::SetPriority {
        node: b,
        priority: -7,
    });
    assert_eq!(h.wf.priority(b), -7);
    // Setting the same priority again is a no-op, not an event.
    assert!(h
        .ok(Op::SetPriority {
            node: b,
            priority: -7
        })
        .is_empty());
    h.start("a");
    assert!(matches!(
        h.rejected(Op::SetPriority {
            node: a,
            priority: 1
        }),
        Rejection::InvalidTransition {
            op: "change the priority of",
            status: Status::Running
        }
    ));
    h.complete("a", json!(1));
    assert!(matches!(
        h.rejected(Op::SetPriority {
            node: a,
            priority: 1
        }),
        Rejection::InvalidTransition {
            status: Status::Done,
            ..
        }
    ));
    let refused = h.rejected(Op::SetPriority {
        node: b,
        priority: 5_000,
    });
    assert_eq!(refused, Rejection::InvalidPriority(5_000));
    assert_eq!(refused.code(), "invalid_priority");
}

#[test]
fn a_step_runs_at_its_items_priority() {
    let tree = swarm(
        "fan",
        1,
        None,
        true,
        [
            chain("slow", [task("x")]),
            chain("fast", [task("y")]).priority(9),
        ],
    );
    let h = Harness::new(&tree, Some(json!({})));
    assert_eq!(h.wf.priority(h.idx("y")), 9, "inherited from its chain");
    assert_eq!(h.status("y"), Status::Queued, "the urgent item went first");
    assert_eq!(h.status("x"), Status::Pending);
}
