//! Conditional graphs in the pure core: routing on outcomes and output predicates, fan-out and
//! joins, bounded loops, skipped nodes, the graph's result, nesting, and refusals of graphs that
//! could not run. Every step goes through the harness, which checks that the live state is the
//! fold of the log (so replay takes the same path).

use crate::support::{chain, graph, task, Harness};
use mageflow_core::condition::{Condition, Predicate};
use mageflow_core::{Edge, Join, Op, Payload, Rejection, Status};
use serde_json::{json, Value};

fn edge(from: u32, to: u32, when: Condition) -> Edge {
    Edge {
        from,
        to,
        when,
        max_iterations: None,
    }
}

fn eq(path: &str, value: Value) -> Condition {
    Condition::Output(Predicate::Eq {
        path: path.into(),
        value,
    })
}

/// The decisions of the `graph_routed` events naming `from`: (edge, taken, saw).
fn routed(h: &Harness, from: &str) -> Vec<(u32, bool, Value)> {
    let node = h.idx(from);
    h.log
        .iter()
        .filter_map(|e| match &e.payload {
            Payload::GraphRouted {
                from, decisions, ..
            } if *from == node => Some(decisions),
            _ => None,
        })
        .flatten()
        .map(|d| (d.edge, d.taken, d.saw.clone()))
        .collect()
}

#[test]
fn routes_on_success_and_failure_skips_the_branch_not_taken_and_a_handled_failure_succeeds() {
    let g = graph(
        "g",
        [task("check"), task("ship"), task("repair")],
        vec![
            edge(0, 1, Condition::OnSuccess),
            edge(0, 2, Condition::OnFailure),
        ],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({"order": 7})));
    assert_eq!(h.status("check"), Status::Queued);
    assert_eq!(h.status("ship"), Status::Pending);
    h.start("check");
    h.fail("check", "out of stock", false);
    assert_eq!(h.status("ship"), Status::Skipped);
    assert_eq!(h.status("repair"), Status::Queued);
    assert_eq!(
        routed(&h, "check"),
        vec![(0, false, Value::Null), (1, true, Value::Null)]
    );
    // The failure path gets the failed node's input and error, as an error callback would.
    let input = h.wf.effective_input(h.idx("repair"));
    assert_eq!(input["order"], json!(7));
    assert_eq!(input["mageflow_error"]["message"], json!("out of stock"));
    h.run("repair", json!("fixed"));
    assert_eq!(h.status("g"), Status::Done);
    // The result: terminal nodes' outputs by name (check routed on, ship skipped).
    assert_eq!(
        h.node("g").outcome,
        Some(mageflow_core::Outcome::Ok(json!({"repair": "fixed"})))
    );
}

#[test]
fn predicates_split_on_a_field_record_what_they_saw_and_default_takes_the_rest() {
    let g = graph(
        "ab",
        [task("classify"), task("a"), task("b"), task("other")],
        vec![
            edge(0, 1, eq("$.variant", json!("a"))),
            edge(0, 2, eq("$.variant", json!("b"))),
            edge(0, 3, Condition::Default),
        ],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({})));
    h.run("classify", json!({"variant": "b"}));
    assert_eq!(h.named_in(Status::Skipped), vec!["a", "other"]);
    assert_eq!(h.status("b"), Status::Queued);
    assert_eq!(
        routed(&h, "classify"),
        vec![
            (0, false, json!("b")),
            (1, true, json!("b")),
            (2, false, Value::Null)
        ]
    );
    // The next node receives the output it was routed on.
    assert_eq!(
        h.wf.effective_input(h.idx("b"))["mageflow_results"],
        json!({"variant": "b"})
    );

    let mut h = Harness::new(&g, Some(json!({})));
    h.run("classify", json!({"variant": "z"}));
    assert_eq!(h.named_in(Status::Skipped), vec!["a", "b"]);
    assert_eq!(h.status("other"), Status::Queued);
}

#[test]
fn fan_out_joins_on_all_with_every_output_by_name_and_on_any_at_the_first() {
    let nodes = || [task("start"), task("x"), task("y"), task("join")];
    let edges = || {
        vec![
            edge(0, 1, Condition::Always),
            edge(0, 2, Condition::Always),
            edge(1, 3, Condition::OnSuccess),
            edge(2, 3, Condition::OnSuccess),
        ]
    };
    let mut h = Harness::new(&graph("all", nodes(), edges(), vec![]), Some(json!({})));
    h.run("start", json!(0));
    assert_eq!(h.named_in(Status::Queued), vec!["x", "y"]);
    h.run("x", json!(1));
    assert_eq!(h.status("join"), Status::Pending, "all: waits for y");
    h.run("y", json!(2));
    assert_eq!(h.status("join"), Status::Queued);
    assert_eq!(
        h.wf.effective_input(h.idx("join"))["mageflow_results"],
        json!({"x": 1, "y": 2})
    );
    h.run("join", json!("joined"));
    assert_eq!(h.status("all"), Status::Done);

    let joins = vec![Join::All, Join::All, Join::All, Join::Any];
    let mut h = Harness::new(&graph("any", nodes(), edges(), joins), Some(json!({})));
    h.run("start", json!(0));
    h.run("y", json!(2));
    assert_eq!(h.status("join"), Status::Queued, "any: the first is enough");
    assert_eq!(
        h.wf.effective_input(h.idx("join"))["mageflow_results"],
        json!(2)
    );
    h.run("join", json!("early"));
    // x still runs; the graph settles after it.
    assert_eq!(h.status("any"), Status::Running);
    h.run("x", json!(1));
    assert_eq!(h.status("any"), Status::Done);
}

#[test]
fn a_join_whose_every_input_was_not_taken_is_skipped_and_so_is_what_follows() {
    let g = graph(
        "g",
        [task("a"), task("b"), task("c"), task("d")],
        vec![
            edge(0, 1, Condition::OnFailure),
            edge(0, 2, Condition::OnSuccess),
            edge(1, 3, Condition::OnSuccess),
        ],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({})));
    h.run("a", json!("ok"));
    assert_eq!(h.named_in(Status::Skipped), vec!["b", "d"]);
    h.run("c", json!("done"));
    assert_eq!(h.status("g"), Status::Done);
    assert_eq!(
        h.node("g").outcome,
        Some(mageflow_core::Outcome::Ok(json!({"c": "done"})))
    );
}

#[test]
fn a_bounded_loop_runs_again_until_its_bound_then_fails_the_graph() {
    let g = graph(
        "retry",
        [task("attempt"), task("done")],
        vec![
            Edge {
                from: 0,
                to: 0,
                when: eq("$.ok", json!(false)),
                max_iterations: Some(2),
            },
            edge(0, 1, eq("$.ok", json!(true))),
        ],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({})));
    for round in 1..=2 {
        h.run("attempt", json!({"ok": false}));
        assert_eq!(
            h.status("attempt"),
            Status::Queued,
            "round {round}: runs again"
        );
        assert_eq!(h.status("done"), Status::Pending);
    }
    h.run("attempt", json!({"ok": false}));
    assert_eq!(h.status("retry"), Status::Failed);
    let Some(mageflow_core::Outcome::Err(e)) = &h.node("retry").outcome else {
        panic!("the graph failed with an error");
    };
    assert!(
        e.message.starts_with("graph_loop_exceeded"),
        "{}",
        e.message
    );

    // Within the bound the loop exits on its forward edge.
    let mut h = Harness::new(&g, Some(json!({})));
    h.run("attempt", json!({"ok": false}));
    h.run("attempt", json!({"ok": true}));
    assert_eq!(h.status("done"), Status::Queued);
    h.run("done", json!("shipped"));
    assert_eq!(h.status("retry"), Status::Done);
    assert_eq!(h.node("attempt").attempt, 2, "attempt numbers only grow");
}

#[test]
fn a_loop_over_several_nodes_runs_them_all_again() {
    let g = graph(
        "loop",
        [task("draft"), task("review"), task("publish")],
        vec![
            edge(0, 1, Condition::OnSuccess),
            Edge {
                from: 1,
                to: 0,
                when: eq("$.approved", json!(false)),
                max_iterations: Some(3),
            },
            edge(1, 2, eq("$.approved", json!(true))),
        ],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({})));
    h.run("draft", json!("v1"));
    h.run("review", json!({"approved": false, "note": "shorter"}));
    assert_eq!(h.status("draft"), Status::Queued);
    assert_eq!(h.status("review"), Status::Pending);
    // The loop head gets the output of the node that looped back.
    assert_eq!(
        h.wf.effective_input(h.idx("draft"))["mageflow_results"]["note"],
        json!("shorter")
    );
    h.run("draft", json!("v2"));
    h.run("review", json!({"approved": true}));
    h.run("publish", json!("live"));
    assert_eq!(h.status("loop"), Status::Done);
}

#[test]
fn an_unhandled_failure_fails_the_graph_once_it_settles() {
    let g = graph(
        "g",
        [task("a"), task("b"), task("c")],
        vec![edge(0, 1, Condition::OnSuccess)],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({})));
    assert_eq!(
        h.named_in(Status::Queued),
        vec!["a", "c"],
        "two entry nodes"
    );
    h.run("a", json!(1));
    h.start("b");
    h.fail("b", "boom", false);
    assert_eq!(h.status("g"), Status::Running, "c still runs");
    h.run("c", json!(3));
    assert_eq!(h.status("g"), Status::Failed);
    let Some(mageflow_core::Outcome::Err(e)) = &h.node("g").outcome else {
        panic!("failed");
    };
    let b = h.wf.sig(h.idx("b"));
    assert_eq!(e.message, format!("graph node 1 \"b\" ({b}) failed: boom"));
}

#[test]
fn a_graph_is_a_step_of_a_chain_and_passes_its_result_on() {
    let g = graph(
        "route",
        [task("score"), task("high"), task("low")],
        vec![
            edge(
                0,
                1,
                Condition::Output(Predicate::Gt {
                    path: "$".into(),
                    value: 0.5,
                }),
            ),
            edge(0, 2, Condition::Default),
        ],
        vec![],
    );
    let mut h = Harness::new(&chain("flow", [g, task("report")]), Some(json!({})));
    h.run("score", json!(0.9));
    h.run("high", json!("premium"));
    assert_eq!(h.status("route"), Status::Done);
    assert_eq!(h.status("report"), Status::Queued);
    assert_eq!(
        h.wf.effective_input(h.idx("report"))["mageflow_results"],
        json!({"high": "premium"})
    );
}

#[test]
fn graphs_that_could_not_run_are_refused_naming_what_is_wrong_and_nothing_is_written() {
    let bad = [
        (
            vec![edge(0, 5, Condition::Always)],
            "edge 0 names node 5, which does not exist",
        ),
        (
            vec![edge(
                0,
                1,
                Condition::Output(Predicate::Regex {
                    path: "$.a".into(),
                    pattern: "(".into(),
                }),
            )],
            "edge 0 (a -> b): its condition can never be evaluated",
        ),
        (
            vec![
                edge(0, 1, Condition::Always),
                edge(1, 2, Condition::Always),
                edge(2, 0, Condition::Always),
            ],
            "has no entry node",
        ),
        (
            vec![
                edge(0, 1, Condition::Always),
                edge(1, 2, Condition::Always),
                edge(2, 1, Condition::Always),
            ],
            "a cycle through node \"b\" has no bound",
        ),
        (
            vec![edge(1, 2, Condition::Always), edge(0, 1, Condition::Always)],
            "edges must be ordered by their source node",
        ),
        (
            vec![Edge {
                from: 0,
                to: 1,
                when: Condition::Always,
                max_iterations: Some(3),
            }],
            "closes no cycle",
        ),
    ];
    for (edges, why) in bad {
        let g = graph("g", [task("a"), task("b"), task("c")], edges, vec![]);
        let mut h = Harness::empty();
        let r = h.rejected(Op::Create {
            nodes: g.flatten(),
            start: None,
        });
        match r {
            Rejection::InvalidTree(msg) => assert!(msg.contains(why), "{msg:?} lacks {why:?}"),
            other => panic!("{why}: refused as {other:?}"),
        }
        assert!(h.log.is_empty());
    }
    let twins = graph("g", [task("a"), task("a")], vec![], vec![]);
    let r = Harness::empty().rejected(Op::Create {
        nodes: twins.flatten(),
        start: None,
    });
    assert!(matches!(r, Rejection::InvalidTree(m) if m.contains("two nodes are named \"a\"")));
}

#[test]
fn canceling_a_graph_reaches_every_running_node_and_rerun_routes_afresh() {
    let g = graph(
        "g",
        [task("a"), task("b")],
        vec![edge(0, 1, Condition::OnSuccess)],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({})));
    h.run("a", json!(1));
    h.start("b");
    h.ok(Op::Cancel {
        node: 0,
        confirmed: true,
    });
    assert_eq!(h.status("b"), Status::Canceled);
    assert_eq!(h.status("g"), Status::Canceled);

    let mut h = Harness::new(&g, Some(json!({})));
    h.run("a", json!(1));
    h.run("b", json!(2));
    assert_eq!(h.status("g"), Status::Done);
    h.ok(Op::Rerun { node: 0 });
    assert_eq!(h.status("a"), Status::Queued);
    assert_eq!(h.status("b"), Status::Pending);
    h.run("a", json!(1));
    h.run("b", json!(2));
    assert_eq!(h.status("g"), Status::Done);
}

#[test]
fn an_approval_gate_waits_for_its_signal_then_routes_on_it() {
    use crate::support::gate;
    use mageflow_core::{Outcome, TaskError};
    // check -> approve (gate) -> publish on $.approved == true, else -> archive (default).
    let g = graph(
        "g",
        [
            task("check"),
            gate("approve"),
            task("publish"),
            task("archive"),
        ],
        vec![
            edge(0, 1, Condition::OnSuccess),
            edge(1, 2, eq("$.approved", json!(true))),
            edge(1, 3, Condition::Default),
        ],
        vec![],
    );
    let mut h = Harness::new(&g, Some(json!({"doc": 1})));
    let gate = h.idx("approve");
    // Not reached yet: a signal is refused and changes nothing.
    let refused = h.rejected(Op::Signal {
        node: gate,
        signal: Ok(json!({"approved": true})),
    });
    assert_eq!(refused.code(), "invalid_transition");
    // A signal to a node that is not a gate is refused.
    let check = h.idx("check");
    let refused = h.rejected(Op::Signal {
        node: check,
        signal: Ok(json!({})),
    });
    assert_eq!(refused, Rejection::NotAGate(check));
    assert_eq!(refused.code(), "not_a_gate");

    h.run("check", json!({"doc": 1, "valid": true}));
    // Reached: it waits, running, with no attempt and nothing queued for a worker.
    assert_eq!(h.status("approve"), Status::Running);
    assert_eq!(h.node("approve").attempt, 0);
    assert_eq!(h.count("approve", "queued"), 0);
    // Suspended, it takes no signal until resumed.
    h.ok(Op::Suspend { node: gate });
    assert_eq!(
        h.rejected(Op::Signal {
            node: gate,
            signal: Ok(json!({"approved": true}))
        })
        .code(),
        "invalid_transition"
    );
    h.ok(Op::Resume { node: gate });
    assert_eq!(h.status("approve"), Status::Running);

    h.ok(Op::Signal {
        node: gate,
        signal: Ok(json!({"approved": true, "by": "alice"})),
    });
    // Its result is its input with the signal merged over it; the edge saw `true`.
    assert_eq!(
        h.node("approve").outcome,
        Some(Outcome::Ok(
            json!({"doc": 1, "valid": true, "approved": true, "by": "alice"})
        ))
    );
    assert_eq!(
        routed(&h, "approve"),
        vec![(1, true, json!(true)), (2, false, Value::Null)]
    );
    assert_eq!(h.status("publish"), Status::Queued);
    // A second signal finds it ended.
    assert_eq!(
        h.rejected(Op::Signal {
            node: gate,
            signal: Ok(json!({"approved": false}))
        })
        .code(),
        "invalid_transition"
    );
    h.run("publish", json!("published"));
    assert_eq!(h.status("archive"), Status::Skipped);
    assert_eq!(h.status("g"), Status::Done);

    // Rejected: the gate fails with the reason, and its default edge (no other matched) takes
    // the document to the archive, which handles the failure: the graph succeeds.
    let mut h = Harness::new(&g, Some(json!({"doc": 2})));
    h.run("check", json!({"doc": 2}));
    h.ok(Op::Signal {
        node: h.idx("approve"),
        signal: Err(TaskError {
            message: "rejected by bob: typo in title".into(),
            retryable: false,
        }),
    });
    assert_eq!(h.status("approve"), Status::Failed);
    let Some(Outcome::Err(e)) = &h.node("approve").outcome else {
        panic!("the rejected gate has no error");
    };
    assert_eq!(e.message, "rejected by bob: typo in title");
    assert_eq!(h.status("publish"), Status::Skipped);
    assert_eq!(h.status("archive"), Status::Queued);
    h.run("archive", json!("archived"));
    assert_eq!(h.status("g"), Status::Done);
}
