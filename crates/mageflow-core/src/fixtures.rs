//! A deterministic workflow for the tests of anything that stores or rewrites events (log
//! backends, redaction): its events carry every kind of task data, each marked with a string
//! the test can search for in stored bytes.

use crate::command::{Command, Op, Rejection};
use crate::decide::execute;
use crate::event::{Actor, Event};
use crate::id::{NodeIndex, WorkflowId};
use crate::model::{
    KindSpec, Link, Message, NodeSpec, RetryPolicy, Role, SwarmConfig, TaskError, Workflow,
    RETURN_FIELD_DEFAULT,
};
use crate::time::Timestamp;
use serde_json::json;

fn spec(marker: &str, name: &str, kind: KindSpec, parent: Option<(NodeIndex, Role)>) -> NodeSpec {
    NodeSpec {
        name: name.to_owned(),
        kind,
        kwargs: json!({ "secret": format!("{marker}-kwargs-{name}") }),
        parent: parent.map(|(node, role)| Link { node, role }),
        on_success: Vec::new(),
        on_error: Vec::new(),
        return_field: RETURN_FIELD_DEFAULT.to_owned(),
        on_cleanup: Vec::new(),
        priority: 0,
    }
}

fn task(marker: &str, name: &str, parent: (NodeIndex, Role)) -> NodeSpec {
    let kind = KindSpec::Task {
        task: format!("task_{name}"),
        retry: RetryPolicy {
            max_retries: 1,
            backoff_ms: 10,
            backoff_max_ms: 10,
        },
    };
    spec(marker, name, kind, Some(parent))
}

/// The commands of a workflow whose events carry every kind of task data: an input, updated
/// kwargs, a checkpoint, a retried failure, a result passed down a chain to an open swarm, swarm
/// items added in a later batch, a confirmed cancel of the swarm (its cleanup callback and the
/// chain's error callback fire with data), a final failure and a result. Every piece of data is
/// `"{marker}-…"` (`{marker}-kwargs-{name}`, `{marker}-input`, `{marker}-result-a`, …).
/// Nodes: 0 chain [1 a, 2 fan], 3 error callback of 0, 4 cleanup of 2, items 5 x and 6 y of 2.
pub fn data_rich_ops(marker: &str) -> Vec<Op> {
    let m = marker;
    let mut root = spec(
        m,
        "root",
        KindSpec::Chain {
            children: vec![1, 2],
        },
        None,
    );
    root.on_error = vec![3];
    let mut fan = spec(
        m,
        "fan",
        KindSpec::Swarm {
            children: Vec::new(),
            config: SwarmConfig::default(),
            closed: false,
            item_callbacks: Default::default(),
        },
        Some((0, Role::Child)),
    );
    fan.on_cleanup = vec![4];
    let error = |what: &str, retryable| TaskError {
        message: format!("{m}-{what}"),
        retryable,
    };
    vec![
        Op::Create {
            nodes: vec![
                root,
                task(m, "a", (0, Role::Child)),
                fan,
                task(m, "on_err", (0, Role::ErrorCallback)),
                task(m, "cleanup", (2, Role::Cleanup)),
            ],
            start: Some(Message::input(json!({ "in": format!("{m}-input") }))),
        },
        Op::UpdateKwargs {
            node: 1,
            kwargs: json!({ "more": format!("{m}-update") }),
        },
        Op::Start { node: 1 },
        Op::Checkpoint {
            node: 1,
            attempt: 1,
            data: json!({ "at": format!("{m}-checkpoint") }),
        },
        Op::Fail {
            node: 1,
            attempt: 1,
            error: error("error-a", true),
        },
        Op::Start { node: 1 },
        Op::Complete {
            node: 1,
            attempt: 2,
            result: json!({ "r": format!("{m}-result-a") }),
        },
        Op::AddSwarmItems {
            swarm: 2,
            nodes: vec![
                task(m, "x", (2, Role::Child)),
                task(m, "y", (2, Role::Child)),
            ],
            close: false,
        },
        Op::Start { node: 5 },
        Op::Complete {
            node: 5,
            attempt: 1,
            result: json!(format!("{m}-result-x")),
        },
        Op::Start { node: 6 },
        Op::Cancel {
            node: 2,
            confirmed: true,
        },
        // The swarm's cleanup (an inner callback) ends before the root's error callback fires.
        Op::Start { node: 4 },
        Op::Complete {
            node: 4,
            attempt: 1,
            result: json!(format!("{m}-result-cleanup")),
        },
        Op::Start { node: 3 },
        Op::Fail {
            node: 3,
            attempt: 1,
            error: error("error-on-err", false),
        },
    ]
}

/// The `i`-th command of the fixture: by an API principal, one second after the previous one.
pub fn fixture_command(i: usize, op: Op) -> Command {
    Command {
        actor: Actor::api("auditor"),
        at: Timestamp::from_micros(1_700_000_000_000_000 + i as i64 * 1_000_000),
        op,
    }
}

/// [`data_rich_ops`] carried out on stream `id`: the final state and every event, in order.
pub fn data_rich_workflow(
    id: WorkflowId,
    marker: &str,
) -> Result<(Workflow, Vec<Event>), Rejection> {
    let mut wf = Workflow::empty(id);
    let mut events = Vec::new();
    for (i, op) in data_rich_ops(marker).into_iter().enumerate() {
        events.extend(execute(&mut wf, &fixture_command(i, op))?);
    }
    Ok((wf, events))
}
