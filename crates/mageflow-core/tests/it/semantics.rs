//! Example tests of the state machine, one behaviour each, driven through `execute` the way the
//! engine and its workers would. Every step also checks (in the harness) that `decide` agrees,
//! that rejections change nothing and that the live state equals the replayed log.

use crate::support::{chain, kinds, swarm, swarm_items, task, Harness};
use mageflow_core::model::{ERROR_FIELD, RETURN_FIELD_DEFAULT};
use mageflow_core::{
    Event, Message, NodeSpec, Op, Outcome, Payload, Rejection, Status, TaskError, Timestamp,
};
use serde_json::{json, Value};

fn queued_message(h: &Harness, name: &str) -> Message {
    h.node(name)
        .message
        .clone()
        .unwrap_or_else(|| panic!("{name} was never triggered"))
}

#[test]
fn chain_passes_each_result_to_the_next_step_and_then_to_its_success_callback() {
    let tree = chain("pipeline", [task("a"), task("b"), task("c")]).on_success(task("report"));
    let mut h = Harness::new(&tree, Some(json!({"x": 1})));

    assert_eq!(h.status("pipeline"), Status::Running);
    assert_eq!(h.named_in(Status::Queued), ["a"]);
    assert_eq!(h.wf.effective_input(h.idx("a")), json!({"x": 1}));

    h.run("a", json!({"a": 1}));
    assert_eq!(h.status("a"), Status::Done);
    assert_eq!(h.named_in(Status::Queued), ["b"]);
    assert_eq!(queued_message(&h, "b"), Message::result(json!({"a": 1})));
    assert_eq!(
        h.wf.effective_input(h.idx("b")),
        json!({ RETURN_FIELD_DEFAULT: {"a": 1} })
    );

    h.run("b", json!({"b": 2}));
    assert_eq!(queued_message(&h, "c"), Message::result(json!({"b": 2})));
    assert_eq!(h.status("report"), Status::Pending);

    let events = h.run("c", json!({"c": 3}));
    assert_eq!(
        kinds(&events),
        [
            ("succeeded", Some(h.idx("c"))),
            ("succeeded", Some(h.idx("pipeline"))),
            ("queued", Some(h.idx("report"))),
        ]
    );
    assert_eq!(h.status("pipeline"), Status::Done);
    assert_eq!(
        h.node("pipeline").outcome,
        Some(Outcome::Ok(json!({"c": 3})))
    );
    assert_eq!(h.status("report"), Status::Queued);
    assert_eq!(
        queued_message(&h, "report"),
        Message::result(json!({"c": 3}))
    );

    h.run("report", json!(null));
    assert!(h.wf.is_finished());
    for name in ["a", "b", "c", "report"] {
        assert_eq!(h.count(name, "started"), 1, "{name} started once");
        assert_eq!(h.count(name, "queued"), 1, "{name} queued once");
    }
}

#[test]
fn chain_stops_at_a_failed_step_and_fires_the_step_then_the_chain_error_callbacks_once() {
    let tree = chain(
        "pipeline",
        [
            task("a"),
            task("b")
                .kwargs(json!({"mode": "strict"}))
                .on_error(task("b_err")),
            task("c"),
        ],
    )
    .on_success(task("report"))
    .on_error(task("chain_err"));
    let mut h = Harness::new(&tree, Some(json!({"x": 1})));

    h.run("a", json!({"a": 1}));
    h.start("b");
    let events = h.fail("b", "boom", false);
    assert_eq!(
        kinds(&events),
        [
            ("failed", Some(h.idx("b"))),
            ("queued", Some(h.idx("b_err"))),
            ("failed", Some(h.idx("pipeline"))),
        ]
    );
    assert_eq!(h.status("b"), Status::Failed);
    assert_eq!(h.status("pipeline"), Status::Failed);
    assert_eq!(h.status("c"), Status::Pending);
    assert_eq!(h.node("c").message, None);
    assert_eq!(h.status("report"), Status::Skipped);
    // The chain's (external) error callback waits for b's (internal) one to end.
    assert_eq!(h.status("chain_err"), Status::Pending);
    h.start("b_err");
    let events = h.complete("b_err", json!(null));
    assert_eq!(
        kinds(&events),
        [
            ("succeeded", Some(h.idx("b_err"))),
            ("queued", Some(h.idx("chain_err"))),
        ]
    );

    // Both error callbacks get b's input (its message and kwargs) plus the error.
    let b_input = json!({ RETURN_FIELD_DEFAULT: {"a": 1}, "mode": "strict" });
    for cb in ["b_err", "chain_err"] {
        let input = queued_message(&h, cb);
        assert!(!input.as_result, "{cb} gets an input, not a result");
        let mut without_error = input.value.clone();
        let error = without_error
            .as_object_mut()
            .and_then(|o| o.remove(ERROR_FIELD))
            .unwrap_or_else(|| panic!("{cb} input has no {ERROR_FIELD}: {input:?}"));
        assert_eq!(without_error, b_input, "{cb} input");
        assert_eq!(error["message"], json!("boom"));
        assert_eq!(error["task"], json!("b"));
        assert_eq!(error["attempts"], json!(1));
        assert_eq!(error["signature"], json!(h.wf.sig(h.idx("b")).to_string()));
    }

    // Nothing more happens: a late duplicate failure and the callbacks finishing fire nothing.
    let b = h.idx("b");
    let dup = h.ok(Op::Fail {
        node: b,
        attempt: 1,
        error: TaskError {
            message: "boom".into(),
            retryable: false,
        },
    });
    assert!(dup.is_empty());
    h.run("chain_err", json!(null));
    assert_eq!(
        h.rejected(Op::Start { node: h.idx("c") }),
        Rejection::InvalidTransition {
            op: "start",
            status: Status::Pending
        }
    );
    assert!(h.wf.is_finished());
    assert_eq!(h.count("c", "queued"), 0);
    assert_eq!(h.count("b_err", "queued"), 1);
    assert_eq!(h.count("chain_err", "queued"), 1);
    assert_eq!(h.count("report", "queued"), 0);
}

/// Items of `swarm_name` (its children, in order) that hold a slot as seen by a worker.
fn active_items(h: &Harness, swarm_name: &str) -> usize {
    h.node(swarm_name)
        .spec
        .children()
        .iter()
        .filter(|&&c| {
            matches!(
                h.wf.nodes[c as usize].status,
                Status::Queued | Status::Running
            )
        })
        .count()
}

#[test]
fn swarm_never_runs_more_items_than_its_concurrency_limit() {
    let items: Vec<_> = (0..7).map(|i| task(&format!("item{i}"))).collect();
    let tree = swarm("fan", 2, None, true, items).on_success(task("after"));
    let mut h = Harness::new(&tree, Some(json!({"batch": 9})));

    assert_eq!(h.named_in(Status::Queued), ["item0", "item1"]);
    let mut step = 0;
    while h.status("fan") == Status::Running {
        assert!(active_items(&h, "fan") <= 2);
        assert!(h.node("fan").swarm.running <= 2);
        // Alternate: start everything queued, then finish the most recently started item.
        for name in h.named_in(Status::Queued) {
            if name.starts_with("item") {
                h.start(&name);
                assert!(active_items(&h, "fan") <= 2);
            }
        }
        let running = h.named_in(Status::Running);
        let last = running
            .iter()
            .rfind(|n| n.starts_with("item"))
            .expect("an item is running")
            .clone();
        if step % 3 == 2 {
            h.fail(&last, "flaky", false);
        } else {
            h.complete(&last, json!({ "n": step }));
        }
        step += 1;
        assert!(active_items(&h, "fan") <= 2);
        assert!(step < 50, "swarm does not finish");
    }
    assert_eq!(h.status("fan"), Status::Done);
    let Some(Outcome::Ok(Value::Array(results))) = &h.node("fan").outcome else {
        panic!("swarm outcome: {:?}", h.node("fan").outcome);
    };
    assert_eq!(results.len(), 7);
    assert_eq!(
        results.iter().filter(|r| r.get("error").is_some()).count(),
        2
    );
    assert_eq!(h.status("after"), Status::Queued);
    assert_eq!(h.count("after", "queued"), 1);
    for i in 0..7 {
        assert_eq!(h.count(&format!("item{i}"), "started"), 1);
    }
    // Items got the swarm's message.
    assert_eq!(
        queued_message(&h, "item6"),
        Message::input(json!({"batch": 9}))
    );
}

#[test]
fn swarm_fails_at_its_failure_limit_stops_dispatching_and_fires_error_callbacks_once() {
    let items: Vec<_> = (0..8).map(|i| task(&format!("item{i}"))).collect();
    let tree = swarm("fan", 2, Some(3), true, items)
        .on_success(task("after"))
        .on_error(task("fan_err"));
    let mut h = Harness::new(&tree, Some(json!({})));

    for name in ["item0", "item1"] {
        h.start(name);
        let events = h.fail(name, "bad", false);
        assert_eq!(h.status(name), Status::Failed);
        assert!(events
            .iter()
            .any(|e| matches!(e.payload, Payload::SwarmDispatched { count: 1, .. })));
    }
    assert_eq!(h.status("fan"), Status::Running);
    assert_eq!(h.named_in(Status::Queued), ["item2", "item3"]);
    h.start("item2");
    h.start("item3");

    let events = h.fail("item2", "bad", false);
    assert_eq!(
        kinds(&events),
        [
            ("failed", Some(h.idx("item2"))),
            ("failed", Some(h.idx("fan"))),
            ("queued", Some(h.idx("fan_err"))),
        ]
    );
    assert_eq!(h.status("fan"), Status::Failed);
    let fan_err = queued_message(&h, "fan_err");
    assert_eq!(
        fan_err.value[ERROR_FIELD]["message"],
        json!(format!(
            "swarm stopped after 3 failed tasks; the last: item 2 \"item2\" ({}) failed: bad",
            h.wf.sig(h.idx("item2"))
        ))
    );

    // The item still running finishes; nothing new is dispatched, no callback fires again.
    let events = h.complete("item3", json!("late"));
    assert_eq!(kinds(&events), [("succeeded", Some(h.idx("item3")))]);
    assert_eq!(h.node("fan").swarm.dispatched, 4);
    for i in 4..8 {
        assert_eq!(h.status(&format!("item{i}")), Status::Pending);
        assert_eq!(h.count(&format!("item{i}"), "queued"), 0);
    }
    assert_eq!(h.count("fan_err", "queued"), 1);
    assert_eq!(h.count("after", "queued"), 0);
    assert_eq!(h.count("fan", "failed"), 1);
    h.run("fan_err", json!(null));
    assert!(h.wf.is_finished());
}

#[test]
fn open_swarm_takes_new_items_until_closed() {
    let tree = swarm("open", 2, None, false, [task("t0")]).on_success(task("after"));
    let mut h = Harness::new(&tree, Some(json!({})));
    let open = h.idx("open");

    h.run("t0", json!(0));
    assert_eq!(
        h.status("open"),
        Status::Running,
        "an open swarm is not done"
    );

    let base = h.wf.nodes.len();
    let events = h.ok(Op::AddSwarmItems {
        swarm: open,
        nodes: swarm_items(open, base, &[task("t1"), task("t2"), task("t3")]),
        close: false,
    });
    assert_eq!(events[0].payload.kind(), "swarm_items_added");
    assert_eq!(h.node("open").spec.children().len(), 4);
    assert_eq!(h.named_in(Status::Queued), ["t1", "t2"]);
    while let Some(name) = h.named_in(Status::Queued).first().cloned() {
        h.run(&name, json!(name));
    }
    assert_eq!(
        h.status("open"),
        Status::Running,
        "still open: still running"
    );
    assert_eq!(h.status("after"), Status::Pending);

    let events = h.ok(Op::CloseSwarm { swarm: open });
    assert_eq!(
        kinds(&events),
        [
            ("swarm_closed", Some(open)),
            ("succeeded", Some(open)),
            ("queued", Some(h.idx("after"))),
        ]
    );
    assert_eq!(
        h.node("open").outcome,
        Some(Outcome::Ok(json!([
            {"ok": 0}, {"ok": "t1"}, {"ok": "t2"}, {"ok": "t3"}
        ])))
    );

    // Closing again is a no-op; adding is refused and changes nothing.
    assert!(h.ok(Op::CloseSwarm { swarm: open }).is_empty());
    let base = h.wf.nodes.len();
    assert_eq!(
        h.rejected(Op::AddSwarmItems {
            swarm: open,
            nodes: swarm_items(open, base, &[task("t4")]),
            close: false,
        }),
        Rejection::SwarmClosed(open)
    );
}

#[test]
fn add_swarm_items_can_close_in_the_same_step_and_is_refused_afterwards() {
    let tree = chain("outer", [swarm("open", 1, None, false, []), task("next")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    let open = h.idx("open");
    assert_eq!(h.status("open"), Status::Running);

    // Items can be whole sub-trees with their own callbacks.
    let base = h.wf.nodes.len();
    let items = [
        chain("c", [task("c1"), task("c2")]).on_success(task("c_ok")),
        task("t"),
    ];
    h.ok(Op::AddSwarmItems {
        swarm: open,
        nodes: swarm_items(open, base, &items),
        close: true,
    });
    assert_eq!(h.named_in(Status::Queued), ["c1"]);
    h.run("c1", json!(1));
    h.run("c2", json!(2));
    assert_eq!(h.status("c_ok"), Status::Queued);
    assert_eq!(h.named_in(Status::Queued), ["c_ok", "t"]);
    h.run("t", json!(3));
    assert_eq!(h.status("open"), Status::Done);
    assert_eq!(
        queued_message(&h, "next"),
        Message::result(json!([{"ok": 2}, {"ok": 3}]))
    );

    let base = h.wf.nodes.len();
    let before = h.wf.clone();
    assert_eq!(
        h.rejected(Op::AddSwarmItems {
            swarm: open,
            nodes: swarm_items(open, base, &[task("late")]),
            close: false,
        }),
        Rejection::SwarmClosed(open)
    );
    assert_eq!(before, h.wf);
}

#[test]
fn suspended_chain_lets_the_running_step_finish_and_parks_the_next_until_resumed() {
    let tree = chain("pipeline", [task("a"), task("b"), task("c")]).on_success(task("report"));
    let mut h = Harness::new(&tree, Some(json!({})));
    let pipeline = h.idx("pipeline");

    h.start("a");
    let events = h.ok(Op::Suspend { node: pipeline });
    assert_eq!(kinds(&events), [("suspended", Some(pipeline))]);
    assert_eq!(
        h.status("a"),
        Status::Running,
        "a running attempt is not stopped"
    );
    // Suspending twice is a no-op.
    assert!(h.ok(Op::Suspend { node: pipeline }).is_empty());

    h.complete("a", json!("a"));
    assert_eq!(h.status("b"), Status::Suspended, "b is parked");
    assert_eq!(
        h.rejected(Op::Start { node: h.idx("b") }),
        Rejection::InvalidTransition {
            op: "start",
            status: Status::Suspended
        }
    );

    h.ok(Op::Resume { node: pipeline });
    assert_eq!(h.status("pipeline"), Status::Running);
    assert_eq!(h.status("b"), Status::Queued);
    // Resuming a running chain is a no-op.
    assert!(h.ok(Op::Resume { node: pipeline }).is_empty());

    h.run("b", json!("b"));
    assert_eq!(h.status("c"), Status::Queued);
    let events = h.ok(Op::Suspend { node: pipeline });
    assert_eq!(
        kinds(&events),
        [
            ("suspended", Some(pipeline)),
            ("suspended", Some(h.idx("c")))
        ]
    );
    h.ok(Op::Resume { node: pipeline });
    assert_eq!(h.status("c"), Status::Queued);
    h.run("c", json!("c"));

    assert_eq!(h.status("pipeline"), Status::Done);
    for name in ["a", "b", "c"] {
        assert_eq!(h.count(name, "started"), 1, "{name} started exactly once");
    }
    assert_eq!(h.count("report", "queued"), 1);
}

#[test]
fn suspended_swarm_dispatches_nothing_until_resumed() {
    let items: Vec<_> = (0..4).map(|i| task(&format!("item{i}"))).collect();
    let tree = swarm("fan", 2, None, true, items).on_success(task("after"));
    let mut h = Harness::new(&tree, Some(json!({})));
    let fan = h.idx("fan");

    h.start("item0");
    assert_eq!(h.status("item1"), Status::Queued);
    let events = h.ok(Op::Suspend { node: fan });
    assert_eq!(
        kinds(&events),
        [
            ("suspended", Some(fan)),
            ("suspended", Some(h.idx("item1")))
        ]
    );
    assert_eq!(h.status("item0"), Status::Running);

    let events = h.complete("item0", json!(0));
    assert_eq!(kinds(&events), [("succeeded", Some(h.idx("item0")))]);
    assert_eq!(h.node("fan").swarm.dispatched, 2);
    assert_eq!(h.named_in(Status::Queued), Vec::<String>::new());

    h.ok(Op::Resume { node: fan });
    assert_eq!(h.named_in(Status::Queued), ["item1", "item2"]);
    h.run("item1", json!(1));
    assert_eq!(h.named_in(Status::Queued), ["item2", "item3"]);
    h.start("item2");
    h.ok(Op::Suspend { node: fan });
    h.complete("item2", json!(2));
    assert_eq!(h.status("item3"), Status::Suspended);
    h.ok(Op::Resume { node: fan });
    assert_eq!(h.status("item3"), Status::Queued);
    h.run("item3", json!(3));

    assert_eq!(h.status("fan"), Status::Done);
    for i in 0..4 {
        assert_eq!(h.count(&format!("item{i}"), "started"), 1);
    }
    assert_eq!(h.count("after", "queued"), 1);
}

#[test]
fn suspended_swarm_that_finishes_its_items_completes_on_resume() {
    let tree = swarm("fan", 2, None, true, [task("x"), task("y")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    let fan = h.idx("fan");
    h.start("x");
    h.start("y");
    h.ok(Op::Suspend { node: fan });
    h.complete("x", json!(1));
    h.complete("y", json!(2));
    assert_eq!(h.status("fan"), Status::Suspended);
    let events = h.ok(Op::Resume { node: fan });
    assert_eq!(
        kinds(&events),
        [("resumed", Some(fan)), ("succeeded", Some(fan))]
    );
}

#[test]
fn duplicate_or_stale_completion_is_a_no_op() {
    let tree = task("t").on_success(task("cb"));
    let mut h = Harness::new(&tree, Some(json!({})));
    let t = h.idx("t");
    let attempt = h.start("t");
    assert_eq!(attempt, 1);

    let first = h.ok(Op::Complete {
        node: t,
        attempt,
        result: json!("r"),
    });
    assert_eq!(
        kinds(&first),
        [("succeeded", Some(t)), ("queued", Some(h.idx("cb")))]
    );

    let before = h.wf.clone();
    let dup = h.ok(Op::Complete {
        node: t,
        attempt,
        result: json!("other"),
    });
    assert!(dup.is_empty());
    assert_eq!(before, h.wf);
    let stale = h.ok(Op::Complete {
        node: t,
        attempt: 7,
        result: json!("r"),
    });
    assert!(stale.is_empty());
    assert_eq!(h.node("t").outcome, Some(Outcome::Ok(json!("r"))));
    assert_eq!(h.count("t", "succeeded"), 1);
    assert_eq!(h.count("cb", "queued"), 1);
}

#[test]
fn retryable_failures_are_retried_with_backoff_until_the_policy_is_spent() {
    let tree = task("t").retry(2, 100, 150).on_error(task("t_err"));
    let mut h = Harness::new(&tree, Some(json!({"k": 1})));
    let t = h.idx("t");

    assert_eq!(h.start("t"), 1);
    let events = h.fail("t", "flaky", true);
    let expected_retry_at = h.now().saturating_add_millis(100);
    assert_eq!(
        events.iter().map(|e| &e.payload).collect::<Vec<_>>(),
        [&Payload::RetryScheduled {
            node: t,
            attempt: 1,
            error: TaskError {
                message: "flaky".into(),
                retryable: true
            },
            retry_at: expected_retry_at,
            lost: false,
        }]
    );
    assert_eq!(h.status("t"), Status::Queued);
    assert_eq!(h.node("t").not_before, Some(expected_retry_at));

    // A late report from the first attempt is ignored.
    assert!(h
        .ok(Op::Complete {
            node: t,
            attempt: 1,
            result: json!("late")
        })
        .is_empty());

    assert_eq!(h.start("t"), 2);
    let events = h.fail("t", "flaky", true);
    let Payload::RetryScheduled { retry_at, .. } = &events[0].payload else {
        panic!("expected a retry: {events:?}");
    };
    // 100 ms doubled is 200 ms, capped at 150 ms.
    assert_eq!(*retry_at, h.now().saturating_add_millis(150));

    assert_eq!(h.start("t"), 3);
    let events = h.fail("t", "flaky", true);
    assert_eq!(
        kinds(&events),
        [("failed", Some(t)), ("queued", Some(h.idx("t_err")))]
    );
    assert_eq!(h.count("t", "started"), 3);
    assert_eq!(h.count("t", "retry_scheduled"), 2);
    assert_eq!(
        h.wf.effective_input(h.idx("t_err"))[ERROR_FIELD]["attempts"],
        json!(3)
    );
}

#[test]
fn non_retryable_failure_is_final_even_with_retries_left() {
    let tree = task("t").retry(5, 10, 10);
    let mut h = Harness::new(&tree, Some(json!({})));
    h.start("t");
    let events = h.fail("t", "bad input", false);
    assert_eq!(kinds(&events), [("failed", Some(h.idx("t")))]);
    assert_eq!(h.status("t"), Status::Failed);
}

#[test]
fn retry_succeeds_on_a_later_attempt() {
    let tree = chain("c", [task("t").retry(1, 10, 10), task("u")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    h.start("t");
    h.fail("t", "flaky", true);
    assert_eq!(h.status("u"), Status::Pending);
    assert_eq!(h.start("t"), 2);
    h.complete("t", json!("ok"));
    assert_eq!(queued_message(&h, "u"), Message::result(json!("ok")));
}

#[test]
fn cancel_needs_confirmation_and_otherwise_changes_nothing() {
    let tree = chain("pipeline", [task("a"), task("b")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    let pipeline = h.idx("pipeline");
    let log_len = h.log.len();
    let before = h.wf.clone();

    assert_eq!(
        h.rejected(Op::Cancel {
            node: pipeline,
            confirmed: false
        }),
        Rejection::ConfirmationRequired
    );
    assert_eq!(h.log.len(), log_len);
    assert_eq!(before, h.wf);

    let events = h.ok(Op::Cancel {
        node: pipeline,
        confirmed: true,
    });
    assert_eq!(
        kinds(&events),
        [
            ("canceled", Some(pipeline)),
            ("canceled", Some(h.idx("a"))),
            ("canceled", Some(h.idx("b"))),
        ]
    );
    assert!(h
        .ok(Op::Cancel {
            node: pipeline,
            confirmed: true
        })
        .is_empty());
    assert_eq!(
        h.rejected(Op::Resume { node: pipeline }),
        Rejection::Canceled(pipeline)
    );
    assert!(h.wf.is_finished());
}

#[test]
fn interrupt_revokes_the_running_attempt_and_resume_requeues_it() {
    let tree = chain("pipeline", [task("a"), task("b")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    let pipeline = h.idx("pipeline");
    h.start("a");
    let events = h.ok(Op::Interrupt { node: pipeline });
    assert_eq!(
        kinds(&events),
        [
            ("interrupted", Some(pipeline)),
            ("interrupted", Some(h.idx("a")))
        ]
    );
    assert_eq!(
        h.status("b"),
        Status::Pending,
        "untriggered steps stay pending"
    );
    // The revoked attempt's report is ignored.
    assert!(h
        .ok(Op::Complete {
            node: h.idx("a"),
            attempt: 1,
            result: json!("late")
        })
        .is_empty());
    h.ok(Op::Resume { node: pipeline });
    assert_eq!(h.status("a"), Status::Queued);
    assert_eq!(h.start("a"), 2);
    h.complete("a", json!(1));
    h.run("b", json!(2));
    assert_eq!(h.status("pipeline"), Status::Done);
}

#[test]
fn canceling_an_item_of_a_swarm_does_not_stall_the_swarm() {
    // item1 is canceled before the swarm reaches it: its slot must not be lost and the swarm must
    // still finish.
    let tree = swarm(
        "fan",
        1,
        None,
        true,
        [task("item0"), task("item1"), task("item2")],
    )
    .on_success(task("after"));
    let mut h = Harness::new(&tree, Some(json!({})));
    h.ok(Op::Cancel {
        node: h.idx("item1"),
        confirmed: true,
    });
    h.run("item0", json!(0));
    assert_eq!(
        h.status("item2"),
        Status::Queued,
        "item2 gets the free slot"
    );
    h.run("item2", json!(2));
    assert_eq!(h.status("fan"), Status::Done);
    assert_eq!(h.status("after"), Status::Queued);
}

#[test]
fn swarm_whose_last_item_was_canceled_before_dispatch_still_finishes() {
    let tree = swarm("fan", 1, None, true, [task("item0"), task("item1")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    h.ok(Op::Cancel {
        node: h.idx("item1"),
        confirmed: true,
    });
    h.run("item0", json!(0));
    assert_eq!(h.status("fan"), Status::Done);
    assert_eq!(
        h.node("fan").outcome,
        Some(Outcome::Ok(json!([{"ok": 0}, {"error": "canceled"}])))
    );
}

#[test]
fn interrupted_step_that_was_never_triggered_runs_after_resume() {
    let tree = chain("pipeline", [task("a"), task("b")]);
    let mut h = Harness::new(&tree, Some(json!({})));
    h.ok(Op::Interrupt { node: h.idx("b") });
    h.run("a", json!("from a"));
    // b was triggered while interrupted: it must keep its message so that resume runs it.
    h.ok(Op::Resume { node: h.idx("b") });
    assert_eq!(h.status("b"), Status::Queued);
    assert_eq!(queued_message(&h, "b"), Message::result(json!("from a")));
    h.run("b", json!("from b"));
    assert_eq!(h.status("pipeline"), Status::Done);
}

#[test]
fn update_kwargs_merges_before_start_and_is_refused_after() {
    let tree = chain("c", [task("a").kwargs(json!({"x": {"y": 1}})), task("b")]);
    let mut h = Harness::new(&tree, None);
    let a = h.idx("a");
    h.ok(Op::UpdateKwargs {
        node: a,
        kwargs: json!({"x": {"z": 2}}),
    });
    assert_eq!(h.node("a").spec.kwargs, json!({"x": {"y": 1, "z": 2}}));
    assert_eq!(
        h.rejected(Op::UpdateKwargs {
            node: a,
            kwargs: json!([1])
        }),
        Rejection::KwargsNotObject
    );
    h.ok(Op::Run {
        message: Message::input(json!({"in": true})),
    });
    assert_eq!(
        h.wf.effective_input(a),
        json!({"in": true, "x": {"y": 1, "z": 2}})
    );
    h.start("a");
    assert_eq!(
        h.rejected(Op::UpdateKwargs {
            node: a,
            kwargs: json!({})
        }),
        Rejection::InvalidTransition {
            op: "update kwargs of",
            status: Status::Running
        }
    );
}

#[test]
fn rejections_leave_the_state_unchanged() {
    // The harness checks `state == clone before` for every rejection; this walks many of them.
    let mut empty = Harness::empty();
    assert_eq!(
        empty.rejected(Op::Start { node: 0 }),
        Rejection::NoSuchWorkflow
    );
    assert!(matches!(
        empty.rejected(Op::Create {
            nodes: vec![],
            start: None
        }),
        Rejection::InvalidTree(_)
    ));
    let mut orphan = task("orphan").flatten();
    orphan.extend(task("dangling").flatten());
    assert!(matches!(
        empty.rejected(Op::Create {
            nodes: orphan,
            start: None
        }),
        Rejection::InvalidTree(_)
    ));
    assert!(!empty.wf.exists());

    let tree = chain("c", [task("a"), swarm("s", 1, None, true, [task("i")])]);
    let mut h = Harness::new(&tree, Some(json!({})));
    let (c, a, s) = (h.idx("c"), h.idx("a"), h.idx("s"));
    let cases: Vec<(Op, Rejection)> = vec![
        (
            Op::Create {
                nodes: tree.flatten(),
                start: None,
            },
            Rejection::AlreadyExists,
        ),
        (Op::Start { node: 99 }, Rejection::NoSuchNode(99)),
        (
            Op::Start { node: c },
            Rejection::InvalidTransition {
                op: "start",
                status: Status::Running,
            },
        ),
        (
            Op::Run {
                message: Message::input(json!({})),
            },
            Rejection::InvalidTransition {
                op: "run",
                status: Status::Running,
            },
        ),
        (Op::CloseSwarm { swarm: a }, Rejection::NotASwarm(a)),
        (
            Op::AddSwarmItems {
                swarm: a,
                nodes: task("x").flatten(),
                close: false,
            },
            Rejection::NotASwarm(a),
        ),
        (
            Op::AddSwarmItems {
                swarm: s,
                nodes: swarm_items(s, 99, &[task("x")]),
                close: false,
            },
            Rejection::SwarmClosed(s),
        ),
        (
            Op::UpdateKwargs {
                node: c,
                kwargs: json!({"late": 1}),
            },
            Rejection::InvalidTransition {
                op: "update kwargs of",
                status: Status::Running,
            },
        ),
        (
            Op::Cancel {
                node: a,
                confirmed: false,
            },
            Rejection::ConfirmationRequired,
        ),
        (Op::Suspend { node: 1000 }, Rejection::NoSuchNode(1000)),
        (
            Op::Complete {
                node: 1000,
                attempt: 1,
                result: json!(null),
            },
            Rejection::NoSuchNode(1000),
        ),
    ];
    for (op, expected) in cases {
        let log_len = h.log.len();
        assert_eq!(h.rejected(op), expected);
        assert_eq!(h.log.len(), log_len);
    }

    h.run("a", json!(1));
    h.run("i", json!(2));
    assert_eq!(h.status("c"), Status::Done);
    for op in [
        Op::Suspend { node: c },
        Op::Interrupt { node: c },
        Op::Resume { node: c },
        Op::Cancel {
            node: c,
            confirmed: true,
        },
    ] {
        assert!(matches!(
            h.rejected(op),
            Rejection::InvalidTransition {
                status: Status::Done,
                ..
            }
        ));
    }
}

#[test]
fn every_event_records_its_actor_and_time() {
    let tree = task("t");
    let mut h = Harness::new(&tree, Some(json!({})));
    let at = h.now();
    h.start("t");
    let events: Vec<&Event> = h.log.iter().collect();
    assert_eq!(events[0].at, at);
    assert_eq!(
        events[0].actor,
        mageflow_core::Actor::api("tester"),
        "create comes from the API"
    );
    assert_eq!(events[2].actor, mageflow_core::Actor::worker("w1"));
    assert!(events[2].at > Timestamp::EPOCH);
    assert_eq!(
        events.iter().map(|e| e.seq).collect::<Vec<_>>(),
        (1..=events.len() as u64).collect::<Vec<_>>()
    );
}

#[test]
fn tree_builder_encodes_parents_before_children() {
    let specs: Vec<NodeSpec> = chain(
        "root",
        [
            task("a").on_success(task("a_ok")),
            swarm("s", 2, None, true, [task("s1")]).on_error(task("s_err")),
        ],
    )
    .on_success(task("done"))
    .flatten();
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["root", "a", "a_ok", "s", "s1", "s_err", "done"]);
    assert_eq!(specs[0].children(), [1, 3]);
    assert_eq!(specs[0].on_success, [6]);
    assert_eq!(specs[1].on_success, [2]);
    assert_eq!(specs[3].on_error, [5]);
    for (i, spec) in specs.iter().enumerate().skip(1) {
        let parent = spec.parent.expect("non-root has a parent");
        assert!((parent.node as usize) < i);
    }
}

#[test]
fn lost_attempt_is_requeued_at_once_and_its_late_report_is_ignored() {
    let tree = task("t").retry(3, 10, 10).on_success(task("cb"));
    let mut h = Harness::new(&tree, Some(json!({})));
    let t = h.idx("t");
    h.start("t");
    let events = h.ok(Op::Requeue {
        node: t,
        attempt: 1,
    });
    assert_eq!(kinds(&events), [("retry_scheduled", Some(t))]);
    assert_eq!(h.status("t"), Status::Queued);
    assert_eq!(h.node("t").not_before, Some(h.now()), "no backoff");
    assert!(!h.node("t").in_flight);

    // The lost worker reports after all: ignored, as is a second requeue of the same attempt.
    assert!(h
        .ok(Op::Complete {
            node: t,
            attempt: 1,
            result: json!("late")
        })
        .is_empty());
    assert!(h
        .ok(Op::Requeue {
            node: t,
            attempt: 1
        })
        .is_empty());

    assert_eq!(h.start("t"), 2);
    h.complete("t", json!("ok"));
    assert!(h
        .ok(Op::Requeue {
            node: t,
            attempt: 2
        })
        .is_empty());
    assert_eq!(h.count("cb", "queued"), 1);
}

#[test]
fn lost_attempts_do_not_spend_the_retry_budget() {
    let tree = task("t").retry(1, 10, 10);
    let mut h = Harness::new(&tree, Some(json!({})));
    let t = h.idx("t");
    assert_eq!(h.start("t"), 1);
    h.ok(Op::Requeue {
        node: t,
        attempt: 1,
    });
    assert_eq!(h.start("t"), 2);
    // One real failure with max_retries = 1: retried, not failed.
    let events = h.fail("t", "flaky", true);
    assert_eq!(kinds(&events), [("retry_scheduled", Some(t))]);
    assert_eq!(h.start("t"), 3);
    let events = h.fail("t", "flaky again", true);
    assert_eq!(kinds(&events), [("failed", Some(t))]);
}

#[test]
fn checkpoints_of_the_current_attempt_are_kept_for_the_next_one() {
    let tree = task("t").retry(1, 10, 10);
    let mut h = Harness::new(&tree, Some(json!({})));
    let t = h.idx("t");
    h.start("t");
    let events = h.ok(Op::Checkpoint {
        node: t,
        attempt: 1,
        data: json!({"offset": 10}),
    });
    assert_eq!(kinds(&events), [("checkpointed", Some(t))]);
    // Not the current attempt: refused (so its handler does not take it as saved), unchanged.
    assert_eq!(
        h.rejected(Op::Checkpoint {
            node: t,
            attempt: 5,
            data: json!({"offset": 99}),
        }),
        Rejection::StaleAttempt {
            node: t,
            attempt: 5
        }
    );
    h.fail("t", "flaky", true);
    assert_eq!(
        h.rejected(Op::Checkpoint {
            node: t,
            attempt: 1,
            data: json!({"offset": 11}),
        })
        .code(),
        "stale_attempt",
        "an attempt that ended takes no checkpoint (mageflow-sim BUGS.md #2)"
    );
    assert_eq!(h.start("t"), 2);
    assert_eq!(h.node("t").checkpoint, Some(json!({"offset": 10})));
}

#[test]
fn a_created_root_runs_once() {
    let tree = chain("c", [task("a")]);
    let mut h = Harness::new(&tree, None);
    assert_eq!(h.status("c"), Status::Pending);
    assert!(h.named_in(Status::Queued).is_empty());
    let events = h.ok(Op::Run {
        message: Message::input(json!({"go": 1})),
    });
    assert_eq!(
        kinds(&events),
        [("container_started", Some(0)), ("queued", Some(h.idx("a")))]
    );
    assert_eq!(
        h.rejected(Op::Run {
            message: Message::input(json!({}))
        }),
        Rejection::InvalidTransition {
            op: "run",
            status: Status::Running
        }
    );
}

#[test]
fn cleanup_callbacks_fire_once_after_success_and_children_first_after_cancel() {
    let tree = chain(
        "pipeline",
        [
            task("a").on_cleanup(task("clean_a")),
            task("b").on_cleanup(task("clean_b")),
        ],
    )
    .on_cleanup(task("clean_pipeline"));
    let mut h = Harness::new(&tree, Some(json!({"x": 1})));
    h.start("a");
    h.complete("a", json!(1));
    assert_eq!(h.count("clean_a", "queued"), 1, "cleanup after success");
    let cleanup = &h.node("clean_a").message;
    let info = &cleanup.as_ref().expect("triggered").value["mageflow_cleanup"];
    assert_eq!(info["outcome"], "done");
    assert_eq!(info["result"], 1);
    h.start("b");
    let root = h.idx("pipeline");
    let events = h.ok(Op::Cancel {
        node: root,
        confirmed: true,
    });
    // The running step's cleanup is queued before the chain's own.
    let b_clean = h.idx("clean_b");
    let p_clean = h.idx("clean_pipeline");
    let order: Vec<u32> = events
        .iter()
        .filter_map(|e| match e.payload {
            Payload::Queued { node, .. } if node == b_clean || node == p_clean => Some(node),
            _ => None,
        })
        .collect();
    assert_eq!(order, [b_clean, p_clean]);
    assert_eq!(h.count("clean_a", "queued"), 1, "a's cleanup ran once only");
}
