//! Property tests of the core invariants:
//! - for random command sequences over random trees, the live state after `execute` equals the
//!   replay of the emitted events, `decide` returns exactly what `execute` does, rejections change
//!   nothing, swarm counters agree with the items' statuses, nothing is triggered twice, and the
//!   workflow can always be driven to completion afterwards;
//! - for arbitrary event sequences, a terminal status never changes, a refused event changes
//!   nothing, and the consuming `apply_owned` agrees exactly with `apply`;
//! - decoding arbitrary or damaged bytes never panics and agrees with the serde reference
//!   decoder, encoding round-trips, and the older named encoding still decodes.

use crate::support::{chain, swarm, swarm_items, task, wf_id, Tree, TreeKind};
use mageflow_core::codec::{check, decode, encode};
use mageflow_core::{
    decide, effects, execute, Actor, Command, Effect, Event, KindSpec, Link, Message, NodeIndex,
    NodeSpec, Op, Payload, Rejection, RetryPolicy, Role, Status, SwarmConfig, TaskError, Timestamp,
    Workflow, WorkflowId, SCHEMA_VERSION,
};
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use serde_json::{json, Value};

/// Cases per property; `PROPTEST_CASES` overrides it for a longer soak.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    ProptestConfig::with_cases(cases)
}

// ---------------------------------------------------------------------------------------------
// Random trees and commands
// ---------------------------------------------------------------------------------------------

fn arb_task() -> impl Strategy<Value = Tree> + Clone {
    (0u32..3, 0u8..4, prop_oneof![3 => Just(0), 1 => -2i32..3]).prop_map(|(retries, k, p)| {
        let t = task("t").retry(retries, 10, 1_000).priority(p);
        if k == 0 {
            t.kwargs(json!({ "k": k }))
        } else {
            t
        }
    })
}

fn with_callbacks(
    node: impl Strategy<Value = Tree>,
    cb: impl Strategy<Value = Tree> + Clone,
) -> impl Strategy<Value = Tree> {
    (
        node,
        prop::collection::vec(cb.clone(), 0..2),
        prop::collection::vec(cb.clone(), 0..2),
        prop::collection::vec(cb, 0..2),
    )
        .prop_map(|(mut t, ok, err, cleanup)| {
            t.on_success = ok;
            t.on_error = err;
            t.on_cleanup = cleanup;
            t
        })
}

/// Random trees of tasks, chains and swarms (open or closed, with per-item callbacks or not),
/// with callbacks anywhere.
fn arb_tree() -> impl Strategy<Value = Tree> {
    let leaf = with_callbacks(arb_task(), arb_task());
    leaf.prop_recursive(3, 16, 4, |inner| {
        let chain_s = prop::collection::vec(inner.clone(), 1..4).prop_map(|c| chain("c", c));
        let swarm_s = (
            prop::collection::vec(inner.clone(), 0..4),
            1u32..4,
            prop::option::of(1u32..3),
            any::<bool>(),
            prop::option::of(arb_task()),
            prop::option::of(arb_task()),
        )
            .prop_map(|(c, max, stop, closed, each_ok, each_err)| {
                swarm("s", max, stop, closed, c).per_item(each_ok, each_err)
            });
        with_callbacks(prop_oneof![chain_s, swarm_s], inner)
    })
}

/// A command in terms of "which node" choices, resolved against the state when it runs so that
/// most commands hit a node where they can do something.
#[derive(Clone, Debug)]
enum Gen {
    Run,
    Start(Index),
    Complete(Index, u8),
    Fail(Index, u8, bool),
    Requeue(Index, u8),
    Checkpoint(Index, u8),
    Suspend(Index),
    Resume(Index),
    Interrupt(Index),
    Cancel(Index, bool),
    AddSwarmItems(Index, Vec<Tree>, bool, bool),
    CloseSwarm(Index),
    UpdateKwargs(Index, bool),
    Delete(u8),
    Restore,
    Rerun,
    RerunNode(Index),
    SetPriority(Index, i32),
    Purge,
}

fn arb_gen() -> impl Strategy<Value = Gen> {
    let i = any::<Index>;
    prop_oneof![
        1 => Just(Gen::Run),
        8 => i().prop_map(Gen::Start),
        8 => (i(), any::<u8>()).prop_map(|(n, a)| Gen::Complete(n, a)),
        3 => (i(), any::<u8>(), any::<bool>()).prop_map(|(n, a, r)| Gen::Fail(n, a, r)),
        1 => (i(), any::<u8>()).prop_map(|(n, a)| Gen::Requeue(n, a)),
        1 => (i(), any::<u8>()).prop_map(|(n, a)| Gen::Checkpoint(n, a)),
        2 => i().prop_map(Gen::Suspend),
        2 => i().prop_map(Gen::Resume),
        1 => i().prop_map(Gen::Interrupt),
        1 => (i(), prop::bool::weighted(0.8)).prop_map(|(n, c)| Gen::Cancel(n, c)),
        1 => any::<u8>().prop_map(Gen::Delete),
        1 => Just(Gen::Restore),
        1 => Just(Gen::Rerun),
        1 => i().prop_map(Gen::RerunNode),
        1 => (i(), -3i32..4).prop_map(|(n, p)| Gen::SetPriority(n, p)),
        1 => Just(Gen::Purge),
        2 => (i(), prop::collection::vec(arb_tree(), 0..3), any::<bool>(), prop::bool::weighted(0.9))
            .prop_map(|(n, items, close, valid)| Gen::AddSwarmItems(n, items, close, valid)),
        1 => i().prop_map(Gen::CloseSwarm),
        1 => (i(), any::<bool>()).prop_map(|(n, o)| Gen::UpdateKwargs(n, o)),
    ]
}

/// One of `candidates`, or (when there are none) any index, one past the end included.
fn pick(wf: &Workflow, index: &Index, candidates: impl Fn(&mageflow_core::Node) -> bool) -> u32 {
    let matching: Vec<u32> = (0..wf.nodes.len() as u32)
        .filter(|&i| candidates(&wf.nodes[i as usize]))
        .collect();
    if matching.is_empty() {
        index.index(wf.nodes.len() + 1) as u32
    } else {
        matching[index.index(matching.len())]
    }
}

fn attempt_for(wf: &Workflow, node: NodeIndex, sel: u8) -> u32 {
    let current = wf.node(node).map_or(0, |n| n.attempt);
    // Mostly the current attempt; sometimes a stale or future one.
    match sel % 6 {
        0 => u32::from(sel % 3),
        _ => current,
    }
}

fn resolve(wf: &Workflow, gen: &Gen) -> Op {
    let any = |_: &mageflow_core::Node| true;
    let in_flight = |n: &mageflow_core::Node| n.in_flight;
    let is_swarm = |n: &mageflow_core::Node| matches!(n.spec.kind, KindSpec::Swarm { .. });
    match gen {
        Gen::Run => Op::Run {
            message: Message::input(json!({"run": true})),
        },
        Gen::Start(i) => Op::Start {
            node: pick(wf, i, |n| n.status == Status::Queued),
        },
        Gen::Complete(i, a) => {
            let node = pick(wf, i, in_flight);
            Op::Complete {
                node,
                attempt: attempt_for(wf, node, *a),
                result: json!({ "r": a }),
            }
        }
        Gen::Fail(i, a, retryable) => {
            let node = pick(wf, i, in_flight);
            Op::Fail {
                node,
                attempt: attempt_for(wf, node, *a),
                error: TaskError {
                    message: format!("e{a}"),
                    retryable: *retryable,
                },
            }
        }
        Gen::Requeue(i, a) => {
            let node = pick(wf, i, in_flight);
            Op::Requeue {
                node,
                attempt: attempt_for(wf, node, *a),
            }
        }
        Gen::Checkpoint(i, a) => {
            let node = pick(wf, i, in_flight);
            Op::Checkpoint {
                node,
                attempt: attempt_for(wf, node, *a),
                data: json!([a]),
            }
        }
        Gen::Suspend(i) => Op::Suspend {
            node: pick(wf, i, any),
        },
        Gen::Resume(i) => Op::Resume {
            node: pick(wf, i, |n| {
                matches!(n.status, Status::Suspended | Status::Interrupted)
            }),
        },
        Gen::Interrupt(i) => Op::Interrupt {
            node: pick(wf, i, any),
        },
        Gen::Cancel(i, confirmed) => Op::Cancel {
            node: pick(wf, i, any),
            confirmed: *confirmed,
        },
        Gen::AddSwarmItems(i, items, close, valid) => {
            let swarm_i = pick(wf, i, is_swarm);
            let base = if *valid {
                wf.nodes.len()
            } else {
                wf.nodes.len() + 1
            };
            Op::AddSwarmItems {
                swarm: swarm_i,
                nodes: swarm_items(swarm_i, base, items),
                close: *close,
            }
        }
        Gen::CloseSwarm(i) => Op::CloseSwarm {
            swarm: pick(wf, i, is_swarm),
        },
        Gen::Delete(dt) => Op::Delete {
            expires_at: Timestamp::from_micros(i64::from(*dt) * 10),
        },
        Gen::Restore => Op::Restore,
        Gen::Rerun => Op::Rerun { node: 0 },
        Gen::SetPriority(i, p) => Op::SetPriority {
            node: pick(wf, i, |n| !n.status.is_terminal() && !n.in_flight),
            priority: *p,
        },
        Gen::RerunNode(i) => Op::Rerun {
            node: pick(wf, i, |n| matches!(n.status, Status::Done | Status::Failed)),
        },
        Gen::Purge => Op::Purge,
        Gen::UpdateKwargs(i, object) => Op::UpdateKwargs {
            node: pick(wf, i, any),
            kwargs: if *object {
                json!({"k": {"deep": 1}})
            } else {
                json!(7)
            },
        },
    }
}

// ---------------------------------------------------------------------------------------------
// Checked execution
// ---------------------------------------------------------------------------------------------

/// A workflow driven by commands, with a replica fed only by the emitted events.
struct Run {
    wf: Workflow,
    replica: Workflow,
    log: Vec<Event>,
    clock: i64,
    waits_for_timers: bool,
}

impl Run {
    fn new() -> Self {
        Self {
            wf: Workflow::empty(wf_id()),
            replica: Workflow::empty(wf_id()),
            log: Vec::new(),
            clock: 0,
            waits_for_timers: false,
        }
    }

    /// Execute `op` and check every per-step invariant.
    fn step(&mut self, op: Op) -> Result<Result<usize, Rejection>, TestCaseError> {
        self.clock += 1;
        // The drain waits out retry backoffs, as the engine's timers do.
        if let (true, Op::Start { node }) = (self.waits_for_timers, &op) {
            if let Some(t) = self.wf.node(*node).and_then(|n| n.not_before) {
                self.clock = self.clock.max(t.as_micros());
            }
        }
        let actor = match self.clock % 2 {
            0 => Actor::worker("w"),
            _ => Actor::system("sim"),
        };
        let cmd = Command {
            actor,
            at: Timestamp::from_micros(self.clock),
            op,
        };
        let before = self.wf.clone();
        let decided = decide(&before, &cmd);
        let executed = execute(&mut self.wf, &cmd);
        prop_assert_eq!(
            &decided,
            &executed,
            "decide and execute disagree on {:?}",
            cmd
        );
        if before.purged && !matches!(cmd.op, Op::Purge) {
            prop_assert_eq!(
                &executed,
                &Err(Rejection::Purged),
                "{:?} on a purged workflow",
                cmd
            );
        }
        match executed {
            Err(r) => {
                prop_assert!(
                    !matches!(r, Rejection::Internal(_)),
                    "{:?} hit an internal error: {}",
                    cmd,
                    r
                );
                prop_assert_eq!(&before, &self.wf, "rejected {:?} changed the state", cmd);
                Ok(Err(r))
            }
            Ok(events) => {
                for (k, e) in events.iter().enumerate() {
                    prop_assert_eq!(e.seq, before.version + 1 + k as u64);
                    prop_assert_eq!(e.stream, self.wf.id);
                    prop_assert_eq!(&e.actor, &cmd.actor);
                    prop_assert_eq!(e.at, cmd.at);
                    prop_assert_eq!(e.schema, SCHEMA_VERSION);
                    let replica_before = self.replica.clone();
                    if let Err(err) = self.replica.apply(e) {
                        return Err(TestCaseError::fail(format!(
                            "emitted event {e:?} does not apply: {err}"
                        )));
                    }
                    check_terminal_kept(&replica_before, &self.replica, std::slice::from_ref(e))?;
                }
                prop_assert_eq!(&self.replica, &self.wf, "live state differs from the fold");
                if events.is_empty() {
                    prop_assert_eq!(&before, &self.wf, "no events but the state changed");
                }
                check_terminal_kept(&before, &self.wf, &events)?;
                check_swarm_counters(&self.wf)?;
                let n = events.len();
                self.log.extend(events);
                Ok(Ok(n))
            }
        }
    }

    /// Resume what is paused, close open swarms, run what is queued and complete what runs,
    /// until nothing moves.
    fn drain(&mut self) -> Result<(), TestCaseError> {
        self.waits_for_timers = true;
        for round in 0.. {
            prop_assert!(round < 1_000, "drain does not converge");
            if self.wf.purged {
                // Nothing in a purged workflow can move; the per-step checks hold that.
                break;
            }
            let mut moved = 0;
            let root = &self.wf.nodes[0];
            if root.status == Status::Pending && root.message.is_none() {
                moved += self
                    .step(Op::Run {
                        message: Message::input(json!({})),
                    })?
                    .unwrap_or(0);
            }
            for i in 0..self.wf.nodes.len() as NodeIndex {
                let n = &self.wf.nodes[i as usize];
                let op = match (&n.spec.kind, n.status) {
                    (_, Status::Suspended | Status::Interrupted) => Op::Resume { node: i },
                    (KindSpec::Swarm { closed: false, .. }, s) if !s.is_terminal() => {
                        Op::CloseSwarm { swarm: i }
                    }
                    (KindSpec::Task { .. }, Status::Queued) => Op::Start { node: i },
                    _ if n.in_flight => Op::Complete {
                        node: i,
                        attempt: n.attempt,
                        result: json!({ "drained": i }),
                    },
                    _ => continue,
                };
                let desc = format!("{op:?}");
                match self.step(op)? {
                    Ok(k) => moved += k,
                    Err(r) => {
                        return Err(TestCaseError::fail(format!(
                            "drain step {desc} was refused: {r}"
                        )))
                    }
                }
            }
            if moved == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// Terminal signatures keep their status and outcome — except through a `rerun` (the documented
/// way out) or a `purged` (which drops outcomes with the rest of the task data).
fn check_terminal_kept(
    before: &Workflow,
    after: &Workflow,
    events: &[Event],
) -> Result<(), TestCaseError> {
    prop_assert!(after.nodes.len() >= before.nodes.len());
    let exempt = |e: &Event| matches!(e.payload, Payload::Rerun { .. } | Payload::Purged { .. });
    if events.iter().any(exempt) {
        return Ok(());
    }
    for (i, (b, a)) in before.nodes.iter().zip(&after.nodes).enumerate() {
        if b.status.is_terminal() {
            prop_assert_eq!(
                b.status,
                a.status,
                "terminal signature {} changed status",
                i
            );
            prop_assert_eq!(
                &b.outcome,
                &a.outcome,
                "terminal signature {} changed outcome",
                i
            );
        }
    }
    Ok(())
}

/// A swarm's counters are what its items' statuses say, and never exceed its limit.
fn check_swarm_counters(wf: &Workflow) -> Result<(), TestCaseError> {
    for (i, n) in wf.nodes.iter().enumerate() {
        let KindSpec::Swarm {
            children, config, ..
        } = &n.spec.kind
        else {
            continue;
        };
        let status = |c: &NodeIndex| wf.nodes[*c as usize].status;
        let p = &n.swarm;
        // Handed out: a prefix in order of addition, or whatever the priority queue let go of.
        let dispatched: Vec<&NodeIndex> = children
            .iter()
            .filter(|&&c| {
                let item = &wf.nodes[c as usize];
                p.was_dispatched(item.position, item.spec.priority)
            })
            .collect();
        // (Out of a priority queue too: items canceled while they waited.)
        if p.by_priority.is_none() {
            prop_assert_eq!(
                dispatched.len() as u32,
                p.dispatched,
                "swarm {} dispatched",
                i
            );
        } else {
            prop_assert!(
                dispatched.len() as u32 >= p.dispatched,
                "swarm {} dispatched",
                i
            );
        }
        if let Some(waiting) = &p.by_priority {
            for &(_, pos) in waiting {
                prop_assert!(
                    !status(&children[pos as usize]).is_terminal(),
                    "swarm {} has ended item {} waiting",
                    i,
                    pos
                );
            }
        }
        // A rerun item waiting for a slot holds none.
        for w in &p.rerun_waiting {
            let n = &wf.nodes[*w as usize];
            prop_assert!(
                children.contains(w)
                    && !n.status.is_terminal()
                    && n.message.is_none()
                    && !n.in_flight,
                "swarm {} waits to rerun {}, which is {}",
                i,
                w,
                n.status
            );
        }
        let live = dispatched
            .iter()
            .filter(|c| !status(c).is_terminal() && !p.rerun_waiting.contains(c))
            .count();
        prop_assert_eq!(p.running as usize, live, "swarm {} running count", i);
        prop_assert!(
            p.running <= config.max_concurrency,
            "swarm {} runs {} items, limit {}",
            i,
            p.running,
            config.max_concurrency
        );
        let done = children
            .iter()
            .filter(|c| status(c) == Status::Done)
            .count();
        let failed = children
            .iter()
            .filter(|c| matches!(status(c), Status::Failed | Status::Canceled))
            .count();
        prop_assert_eq!(p.succeeded as usize, done, "swarm {} succeeded count", i);
        prop_assert_eq!(p.failed as usize, failed, "swarm {} failed count", i);
        // Nothing not handed out was triggered (while the swarm has not finished).
        if !n.status.is_terminal() {
            for c in children.iter().filter(|c| !dispatched.contains(c)) {
                prop_assert!(
                    wf.nodes[*c as usize].message.is_none(),
                    "swarm {} item {} triggered before dispatch",
                    i,
                    c
                );
            }
        }
    }
    Ok(())
}

/// Each signature is triggered at most once and reaches at most one terminal event — per run of
/// the workflow (a `rerun` starts a new one).
fn check_log(log: &[Event]) -> Result<(), TestCaseError> {
    let runs = log.split(|e| matches!(e.payload, Payload::Rerun { .. }));
    for run in runs {
        check_run(run)?;
    }
    Ok(())
}

fn check_run(log: &[Event]) -> Result<(), TestCaseError> {
    use std::collections::BTreeMap;
    let mut triggered: BTreeMap<NodeIndex, usize> = BTreeMap::new();
    let mut ended: BTreeMap<NodeIndex, usize> = BTreeMap::new();
    for e in log {
        match &e.payload {
            Payload::Queued { node, .. } | Payload::ContainerStarted { node, .. } => {
                *triggered.entry(*node).or_default() += 1
            }
            Payload::Succeeded { node, .. }
            | Payload::Failed { node, .. }
            | Payload::Canceled { node } => *ended.entry(*node).or_default() += 1,
            _ => {}
        }
    }
    for (node, n) in triggered {
        prop_assert_eq!(n, 1, "signature {} triggered {} times", node, n);
    }
    for (node, n) in ended {
        prop_assert_eq!(n, 1, "signature {} ended {} times", node, n);
    }
    Ok(())
}

fn run_commands(tree: &Tree, start: bool, gens: &[Gen]) -> Result<Run, TestCaseError> {
    let mut run = Run::new();
    let created = run.step(Op::Create {
        nodes: tree.flatten(),
        start: start.then(|| Message::input(json!({"in": 1}))),
    })?;
    prop_assert!(created.is_ok(), "create refused: {:?}", created);
    for g in gens {
        let op = resolve(&run.wf, g);
        let _ = run.step(op)?;
    }
    Ok(run)
}

proptest! {
    #![proptest_config(config())]

    /// Invariant 1 (state = fold of the events), decide == execute, rejections change nothing.
    #[test]
    fn commands_keep_state_equal_to_replay(
        tree in arb_tree(),
        start in prop::bool::weighted(0.8),
        gens in prop::collection::vec(arb_gen(), 0..60),
    ) {
        let run = run_commands(&tree, start, &gens)?;
        let replayed = Workflow::replay(run.wf.id, &run.log);
        prop_assert_eq!(replayed.as_ref(), Ok(&run.wf));
        // The consuming replay (recovery's path) folds to the same state.
        let replayed_owned = Workflow::replay(run.wf.id, run.log.clone());
        prop_assert_eq!(replayed_owned.as_ref(), Ok(&run.wf));
        check_log(&run.log)?;
    }

    /// Once a workflow has finished, no success or error callback of an ended signature is
    /// left pending: one that was never triggered can no longer fire and is `skipped`, as is
    /// everything inside it — without a run or an end of its own (it is part of the fold of
    /// the event that ended its signature).
    #[test]
    fn callbacks_that_can_no_longer_fire_end_skipped(
        tree in arb_tree(),
        start in prop::bool::weighted(0.8),
        gens in prop::collection::vec(arb_gen(), 0..60),
    ) {
        let mut run = run_commands(&tree, start, &gens)?;
        run.drain()?;
        prop_assert!(run.wf.is_settled(), "finished but not settled");
        if run.wf.purged {
            return Ok(());
        }
        let this_run = match run.log.iter().rposition(|e| matches!(e.payload, Payload::Rerun { .. })) {
            Some(i) => &run.log[i + 1..],
            None => &run.log[..],
        };
        for (i, n) in run.wf.nodes.iter().enumerate() {
            let Some(Link { node: p, role }) = n.spec.parent else { continue };
            let parent = &run.wf.nodes[p as usize];
            let callback = matches!(role, Role::SuccessCallback | Role::ErrorCallback);
            let inside_skipped = parent.status == Status::Skipped;
            // (A cleanup of a callback interrupted before it fired has run: it was triggered.)
            // (A container's callbacks wait while an internal callback of it runs or is paused.)
            let held = callback && run.wf.inner_callbacks_running(p);
            if (callback && parent.status.is_terminal() || inside_skipped)
                && n.message.is_none()
                && !held
            {
                // Skipped — unless a user ended it before it could fire (canceled it, or
                // failed it by canceling a step of it).
                prop_assert!(
                    n.status.is_terminal(),
                    "signature {} ({:?} of {}, which is {}) is {}", i, role, p, parent.status, n.status
                );
            }
            if n.status == Status::Skipped {
                prop_assert!(n.message.is_none() && !n.in_flight, "skipped signature {} was triggered", i);
                // It never ran nor ended by an event of its own (a kwargs update, a suspend
                // or an interrupt before its signature ended may name it).
                let ran = this_run.iter().find(|e| {
                    e.payload.node() == Some(i as NodeIndex)
                        && matches!(
                            e.payload,
                            Payload::Queued { .. }
                                | Payload::ContainerStarted { .. }
                                | Payload::Started { .. }
                                | Payload::Succeeded { .. }
                                | Payload::Failed { .. }
                                | Payload::Canceled { .. }
                        )
                });
                prop_assert!(ran.is_none(), "skipped signature {} has event {:?}", i, ran);
            }
        }
    }

    /// Whatever happened before, resuming, closing and running everything finishes the workflow.
    #[test]
    fn every_workflow_can_be_driven_to_completion(
        tree in arb_tree(),
        start in prop::bool::weighted(0.8),
        gens in prop::collection::vec(arb_gen(), 0..60),
    ) {
        let mut run = run_commands(&tree, start, &gens)?;
        run.drain()?;
        prop_assert!(
            run.wf.purged || run.wf.nodes[0].status.is_terminal(),
            "root stuck in {}: {:#?}",
            run.wf.nodes[0].status,
            run.wf.nodes
        );
        prop_assert!(run.wf.is_finished(), "not finished: {:#?}", run.wf.nodes);
        check_log(&run.log)?;
        let replayed = Workflow::replay(run.wf.id, &run.log);
        prop_assert_eq!(replayed.as_ref(), Ok(&run.wf));
        let replayed_owned = Workflow::replay(run.wf.id, run.log.clone());
        prop_assert_eq!(replayed_owned.as_ref(), Ok(&run.wf));
    }

    /// Events made by valid commands, interleaved with random ones: a refused event changes
    /// nothing and a terminal status never changes.
    #[test]
    fn command_events_mixed_with_noise_keep_terminal_statuses(
        tree in arb_tree(),
        gens in prop::collection::vec(arb_gen(), 0..40),
        noise in prop::collection::vec((any::<Index>(), arb_payload(12)), 0..20),
    ) {
        let run = run_commands(&tree, true, &gens)?;
        let mut payloads: Vec<Payload> = run.log.iter().map(|e| e.payload.clone()).collect();
        for (at, p) in noise {
            let k = at.index(payloads.len() + 1).max(1);
            payloads.insert(k, p);
        }
        let mut wf = Workflow::empty(wf_id());
        for p in payloads {
            apply_checked(&mut wf, p, SeqMode::Next)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Arbitrary events
// ---------------------------------------------------------------------------------------------

fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,8}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn arb_object() -> impl Strategy<Value = Value> {
    prop::collection::btree_map("[a-z]{1,4}", arb_value(), 0..3)
        .prop_map(|m| Value::Object(m.into_iter().collect()))
}

/// Values whose objects share keys often, so merges recurse.
fn arb_mergeable() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<i8>().prop_map(Value::from),
        "[xy]".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            prop::collection::btree_map("[a-c]", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(config())]

    /// The consuming merge (used by `apply_owned`) is the same function as the borrowing one.
    #[test]
    fn deep_merge_owned_equals_deep_merge(base in arb_mergeable(), over in arb_mergeable()) {
        prop_assert_eq!(
            mageflow_core::model::deep_merge_owned(base.clone(), over.clone()),
            mageflow_core::model::deep_merge(base, &over)
        );
    }
}

fn arb_status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Pending),
        Just(Status::Queued),
        Just(Status::Running),
        Just(Status::Suspended),
        Just(Status::Interrupted),
        Just(Status::Canceled),
        Just(Status::Done),
        Just(Status::Failed),
        any::<i64>().prop_map(|t| Status::MarkedForDeletion {
            expires_at: Timestamp::from_micros(t)
        }),
    ]
}

fn arb_message() -> impl Strategy<Value = Message> {
    (arb_value(), any::<bool>()).prop_map(|(value, as_result)| Message { value, as_result })
}

fn arb_error() -> impl Strategy<Value = TaskError> {
    (".{0,12}", any::<bool>()).prop_map(|(message, retryable)| TaskError { message, retryable })
}

/// A node spec with arbitrary (mostly invalid) links.
fn arb_spec(max_node: NodeIndex) -> impl Strategy<Value = NodeSpec> {
    let idx = move || 0..=max_node;
    let kind = prop_oneof![
        (".{0,6}", any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(task, r, b, m)| {
            KindSpec::Task {
                task,
                retry: RetryPolicy {
                    max_retries: r,
                    backoff_ms: b,
                    backoff_max_ms: m,
                },
            }
        }),
        prop::collection::vec(idx(), 0..3).prop_map(|children| KindSpec::Chain { children }),
        (
            prop::collection::vec(idx(), 0..3),
            any::<u32>(),
            prop::option::of(any::<u32>()),
            any::<bool>()
        )
            .prop_map(|(children, m, s, closed)| KindSpec::Swarm {
                children,
                config: SwarmConfig {
                    max_concurrency: m,
                    stop_after_n_failures: s,
                },
                closed,
                item_callbacks: Default::default(),
            }),
        Just(KindSpec::Gate),
    ];
    let role = prop_oneof![
        Just(Role::Child),
        Just(Role::SuccessCallback),
        Just(Role::ErrorCallback),
        Just(Role::Cleanup)
    ];
    (
        ".{0,6}",
        kind,
        prop_oneof![4 => arb_object(), 1 => arb_value()],
        prop::option::of((idx(), role).prop_map(|(node, role)| Link { node, role })),
        prop::collection::vec(idx(), 0..2),
        prop::collection::vec(idx(), 0..2),
        ".{0,6}",
        prop::collection::vec(idx(), 0..2),
        prop_oneof![Just(0), any::<i32>()],
    )
        .prop_map(
            |(
                name,
                kind,
                kwargs,
                parent,
                on_success,
                on_error,
                return_field,
                on_cleanup,
                priority,
            )| {
                NodeSpec {
                    name,
                    kind,
                    kwargs,
                    parent,
                    on_success,
                    on_error,
                    return_field,
                    on_cleanup,
                    priority,
                }
            },
        )
}

/// Any payload, with node indexes up to `max_node`: some fit the state, most do not.
fn arb_payload(max_node: NodeIndex) -> impl Strategy<Value = Payload> {
    let n = move || 0..=max_node;
    let attempt = || 0u32..4;
    let specs = move || {
        prop_oneof![
            // Structurally valid batches (as a fresh tree or as swarm items)...
            (arb_tree(), n()).prop_map(move |(t, swarm_i)| {
                swarm_items(swarm_i, max_node as usize / 2, std::slice::from_ref(&t))
            }),
            arb_tree().prop_map(|t| t.flatten()),
            // ...and arbitrary ones.
            prop::collection::vec(arb_spec(max_node), 0..4),
        ]
    };
    prop_oneof![
        specs().prop_map(|nodes| Payload::WorkflowCreated { nodes }),
        (n(), specs()).prop_map(|(swarm, nodes)| Payload::SwarmItemsAdded { swarm, nodes }),
        n().prop_map(|swarm| Payload::SwarmClosed { swarm }),
        (n(), prop_oneof![3 => arb_object(), 1 => arb_value()])
            .prop_map(|(node, kwargs)| Payload::KwargsUpdated { node, kwargs }),
        (n(), arb_message(), any::<bool>()).prop_map(|(node, message, parked)| {
            Payload::Queued {
                node,
                message,
                parked,
            }
        }),
        (n(), arb_message(), any::<bool>()).prop_map(|(node, message, parked)| {
            Payload::ContainerStarted {
                node,
                message,
                parked,
            }
        }),
        (n(), 0u32..5).prop_map(|(swarm, count)| Payload::SwarmDispatched { swarm, count }),
        (n(), attempt()).prop_map(|(node, attempt)| Payload::Started { node, attempt }),
        (n(), attempt(), arb_value()).prop_map(|(node, attempt, data)| Payload::Checkpointed {
            node,
            attempt,
            data
        }),
        (n(), attempt(), arb_value()).prop_map(|(node, attempt, result)| Payload::Succeeded {
            node,
            attempt,
            result
        }),
        (n(), attempt(), arb_error(), any::<i64>()).prop_map(|(node, attempt, error, t)| {
            Payload::RetryScheduled {
                node,
                attempt,
                error,
                retry_at: Timestamp::from_micros(t),
                lost: t % 2 == 0,
            }
        }),
        (n(), attempt(), arb_error()).prop_map(|(node, attempt, error)| Payload::Failed {
            node,
            attempt,
            error
        }),
        n().prop_map(|node| Payload::Suspended { node }),
        (n(), arb_status()).prop_map(|(node, status)| Payload::Resumed { node, status }),
        n().prop_map(|node| Payload::Interrupted { node }),
        n().prop_map(|node| Payload::Canceled { node }),
        (n(), any::<i64>()).prop_map(|(node, t)| Payload::MarkedForDeletion {
            node,
            expires_at: Timestamp::from_micros(t),
        }),
        n().prop_map(|node| Payload::Restored { node }),
        n().prop_map(|node| Payload::Rerun { node }),
        n().prop_map(|node| Payload::Purged { node }),
        (n(), any::<i32>())
            .prop_map(|(node, priority)| Payload::PriorityChanged { node, priority }),
    ]
}

#[derive(Clone, Copy, Debug)]
enum SeqMode {
    Next,
    Wrong(u64),
    OtherStream,
}

fn arb_seq_mode() -> impl Strategy<Value = SeqMode> {
    prop_oneof![
        10 => Just(SeqMode::Next),
        1 => any::<u64>().prop_map(SeqMode::Wrong),
        1 => Just(SeqMode::OtherStream),
    ]
}

/// Apply one event and check: a refused event changes nothing; an accepted one bumps the version
/// and never moves a terminal signature.
fn apply_checked(wf: &mut Workflow, payload: Payload, mode: SeqMode) -> Result<(), TestCaseError> {
    let (stream, seq) = match mode {
        SeqMode::Next => (wf.id, wf.version + 1),
        SeqMode::Wrong(s) => (wf.id, s),
        SeqMode::OtherStream => (WorkflowId::from_u128(1), wf.version + 1),
    };
    let event = Event {
        stream,
        seq,
        at: Timestamp::from_micros(seq as i64),
        actor: Actor::system("fuzz"),
        schema: SCHEMA_VERSION,
        payload,
    };
    let before = wf.clone();
    // The consuming path must agree exactly with the borrowing one: same result, same state.
    let mut owned = wf.clone();
    let owned_result = owned.apply_owned(event.clone());
    let result = wf.apply(&event);
    prop_assert_eq!(
        &owned_result,
        &result,
        "apply and apply_owned disagree on {:?}",
        event
    );
    prop_assert_eq!(
        &owned,
        &*wf,
        "apply and apply_owned disagree on {:?}",
        event
    );
    match result {
        Err(_) => prop_assert_eq!(&before, &*wf, "refused {:?} changed the state", event),
        Ok(()) => {
            prop_assert_eq!(wf.version, before.version + 1);
            prop_assert_eq!(seq, wf.version);
            check_terminal_kept(&before, wf, std::slice::from_ref(&event))?;
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn arbitrary_events_never_move_a_terminal_signature(
        tree in arb_tree(),
        events in prop::collection::vec((arb_payload(12), arb_seq_mode()), 0..40),
    ) {
        let mut wf = Workflow::empty(wf_id());
        apply_checked(
            &mut wf,
            Payload::WorkflowCreated { nodes: tree.flatten() },
            SeqMode::Next,
        )?;
        prop_assert!(wf.exists());
        let mut accepted = vec![];
        for (payload, mode) in events {
            let version = wf.version;
            apply_checked(&mut wf, payload.clone(), mode)?;
            if wf.version != version {
                accepted.push(payload);
            }
        }
        // The accepted events alone fold to the same state.
        let mut again = Workflow::empty(wf_id());
        again.apply(&Event {
            stream: wf_id(),
            seq: 1,
            at: Timestamp::from_micros(1),
            actor: Actor::system("fuzz"),
            schema: SCHEMA_VERSION,
            payload: Payload::WorkflowCreated { nodes: tree.flatten() },
        }).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for payload in accepted {
            let seq = again.version + 1;
            again.apply(&Event {
                stream: wf_id(),
                seq,
                at: Timestamp::from_micros(seq as i64),
                actor: Actor::system("fuzz"),
                schema: SCHEMA_VERSION,
                payload,
            }).map_err(|e| TestCaseError::fail(e.to_string()))?;
        }
        prop_assert_eq!(again, wf);
    }

    #[test]
    fn arbitrary_events_on_an_empty_workflow_never_panic(
        events in prop::collection::vec((arb_payload(6), arb_seq_mode()), 0..20),
    ) {
        let mut wf = Workflow::empty(wf_id());
        for (payload, mode) in events {
            apply_checked(&mut wf, payload, mode)?;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Codec
// ---------------------------------------------------------------------------------------------

fn arb_actor() -> impl Strategy<Value = Actor> {
    prop_oneof![
        ".{0,8}".prop_map(Actor::api),
        ".{0,8}".prop_map(Actor::worker),
        ".{0,8}".prop_map(Actor::system),
    ]
}

fn arb_event() -> impl Strategy<Value = Event> {
    (
        any::<u128>(),
        any::<u64>(),
        any::<i64>(),
        arb_actor(),
        0..=SCHEMA_VERSION,
        arb_payload(u32::MAX - 1),
    )
        .prop_map(|(stream, seq, at, actor, schema, payload)| Event {
            stream: WorkflowId::from_u128(stream),
            seq,
            at: Timestamp::from_micros(at),
            actor,
            schema,
            payload,
        })
}

#[derive(Clone, Debug)]
enum Damage {
    Truncate(Index),
    Set(Index, u8),
    Insert(Index, u8),
    Remove(Index),
    Append(Vec<u8>),
}

fn arb_damage() -> impl Strategy<Value = Damage> {
    prop_oneof![
        any::<Index>().prop_map(Damage::Truncate),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Set(i, b)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Damage::Insert(i, b)),
        any::<Index>().prop_map(Damage::Remove),
        prop::collection::vec(any::<u8>(), 1..8).prop_map(Damage::Append),
    ]
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn encode_then_decode_round_trips(event in arb_event()) {
        let bytes = encode(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
        // The direct writer writes exactly what rmp-serde's compact form is.
        let reference =
            check::encode_reference(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&bytes, &reference);
        // What the encoder writes is read by the direct reader, not left to the fallback.
        prop_assert_eq!(check::decode_direct(&bytes), Some(event.clone()));
        let decoded = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded, event);
    }

    /// Events written before the compact layout (structs as maps keyed by field name) still
    /// decode, through the serde fallback.
    #[test]
    fn named_encodings_still_decode(event in arb_event()) {
        let bytes =
            rmp_serde::to_vec_named(&event).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(check::decode_direct(&bytes), None);
        let decoded = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded, event);
    }

    #[test]
    fn decode_of_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        check_decoders_agree(&bytes)?;
    }

    #[test]
    fn decode_of_damaged_encodings_never_panics(
        event in arb_event(),
        named in any::<bool>(),
        damage in prop::collection::vec(arb_damage(), 1..4),
    ) {
        let mut bytes = if named {
            rmp_serde::to_vec_named(&event).map_err(|e| TestCaseError::fail(e.to_string()))?
        } else {
            encode(&event).map_err(|e| TestCaseError::fail(e.to_string()))?
        };
        let only_truncated = damage.iter().all(|d| matches!(d, Damage::Truncate(_)));
        let original_len = bytes.len();
        for d in damage {
            match d {
                Damage::Truncate(i) => bytes.truncate(i.index(bytes.len().max(1))),
                Damage::Set(i, b) if !bytes.is_empty() => {
                    let i = i.index(bytes.len());
                    bytes[i] = b;
                }
                Damage::Insert(i, b) => {
                    let i = i.index(bytes.len() + 1);
                    bytes.insert(i, b);
                }
                Damage::Remove(i) if !bytes.is_empty() => {
                    bytes.remove(i.index(bytes.len()));
                }
                Damage::Append(extra) => bytes.extend(extra),
                _ => {}
            }
        }
        let result = decode(&bytes);
        if only_truncated && bytes.len() < original_len {
            prop_assert!(result.is_err(), "a truncated event decoded: {:?}", result);
        }
        check_decoders_agree(&bytes)?;
    }
}

/// The direct reader never accepts what the serde decoder (the reference) refuses, nor reads it
/// differently: `decode` succeeds exactly when the reference does, with the same event.
fn check_decoders_agree(bytes: &[u8]) -> Result<(), TestCaseError> {
    let reference = check::decode_reference(bytes).ok();
    if let Some(direct) = check::decode_direct(bytes) {
        prop_assert_eq!(
            reference.as_ref(),
            Some(&direct),
            "the direct reader accepted {:02x?}",
            bytes
        );
    }
    prop_assert_eq!(
        decode(bytes).ok(),
        reference.filter(|e| e.schema <= SCHEMA_VERSION)
    );
    Ok(())
}

/// Every MessagePack length and integer form (fix, 8, 16, 32 and 64 bits, at their edges) in
/// every place the layout has one: the direct writer matches rmp-serde byte for byte and the
/// direct reader reads it back.
#[test]
fn encoding_of_every_length_and_integer_form_matches_rmp_serde() {
    let lens = [0usize, 1, 15, 16, 31, 32, 255, 256, 65_535, 65_536];
    let ints: Vec<i64> = vec![
        0,
        1,
        127,
        128,
        255,
        256,
        65_535,
        65_536,
        4_294_967_295,
        4_294_967_296,
        i64::MAX,
        -1,
        -32,
        -33,
        -128,
        -129,
        -32_768,
        -32_769,
        -2_147_483_648,
        -2_147_483_649,
        i64::MIN,
    ];
    let uints: Vec<u64> = ints
        .iter()
        .filter_map(|&i| u64::try_from(i).ok())
        .chain([u64::MAX])
        .collect();
    let mut events = Vec::new();
    let event = |seq: u64, at: i64, actor: Actor, payload: Payload| Event {
        stream: wf_id(),
        seq,
        at: Timestamp::from_micros(at),
        actor,
        schema: SCHEMA_VERSION,
        payload,
    };
    for &len in &lens {
        let s = "é".repeat(len / 2) + &"x".repeat(len % 2);
        let items: Vec<Value> = (0..len as u64).map(Value::from).collect();
        let map: serde_json::Map<String, Value> = (0..len)
            .map(|i| (format!("k{i}"), Value::from(i)))
            .collect();
        let mut spec = NodeSpec::task(s.clone());
        spec.return_field = s.clone();
        spec.on_success = (0..len as u32).collect();
        if len <= 256 {
            spec.kwargs = Value::Object(map.clone());
        }
        events.push(event(
            1,
            0,
            Actor::api(s.clone()),
            Payload::WorkflowCreated {
                nodes: vec![spec; len.min(17)],
            },
        ));
        events.push(event(
            2,
            0,
            Actor::worker(s.clone()),
            Payload::Succeeded {
                node: 0,
                attempt: 1,
                result: json!([s, items, Value::Object(map)]),
            },
        ));
    }
    for &i in &ints {
        events.push(event(
            3,
            i,
            Actor::system("t"),
            Payload::RetryScheduled {
                node: 0,
                attempt: 1,
                error: TaskError {
                    message: String::new(),
                    retryable: true,
                },
                retry_at: Timestamp::from_micros(i),
                lost: i < 0,
            },
        ));
        events.push(event(
            4,
            0,
            Actor::system("t"),
            Payload::Resumed {
                node: 0,
                status: Status::MarkedForDeletion {
                    expires_at: Timestamp::from_micros(i),
                },
            },
        ));
        events.push(event(
            5,
            0,
            Actor::system("t"),
            Payload::Checkpointed {
                node: 0,
                attempt: 0,
                data: json!([i, i as f64, -0.0, 1e300]),
            },
        ));
    }
    for &u in &uints {
        let small = u32::try_from(u).unwrap_or(u32::MAX);
        events.push(event(
            u,
            0,
            Actor::system("t"),
            Payload::SwarmDispatched {
                swarm: small,
                count: small,
            },
        ));
        events.push(event(
            6,
            0,
            Actor::system("t"),
            Payload::KwargsUpdated {
                node: small,
                kwargs: json!({ "u": u }),
            },
        ));
    }
    for e in events {
        let bytes = encode(&e).expect("encodes");
        assert_eq!(
            bytes,
            check::encode_reference(&e).expect("encodes"),
            "{} differs from rmp-serde",
            e.payload.kind()
        );
        assert_eq!(check::decode_direct(&bytes).as_ref(), Some(&e));
        assert_eq!(decode(&bytes).expect("decodes"), e);
    }
}

#[test]
fn decode_rejects_trailing_bytes_newer_schemas_and_oversized_input() {
    let event = Event {
        stream: wf_id(),
        seq: 1,
        at: Timestamp::from_micros(5),
        actor: Actor::api("a"),
        schema: SCHEMA_VERSION,
        payload: Payload::Suspended { node: 3 },
    };
    let mut bytes = encode(&event).expect("encodes");
    assert_eq!(decode(&bytes).expect("decodes"), event);
    bytes.push(0xc0);
    assert!(matches!(
        decode(&bytes),
        Err(mageflow_core::CodecError::Malformed(_))
    ));

    let newer = Event {
        schema: SCHEMA_VERSION + 1,
        ..event
    };
    assert!(matches!(
        decode(&encode(&newer).expect("encodes")),
        Err(mageflow_core::CodecError::UnsupportedSchema { .. })
    ));

    let huge = vec![0u8; mageflow_core::codec::EVENT_BYTES_MAX + 1];
    assert!(matches!(
        decode(&huge),
        Err(mageflow_core::CodecError::TooLarge { .. })
    ));
}

/// Deeply nested JSON inside an event must be refused with an error, not overflow the stack
/// (test threads have 2 MiB stacks, like tokio's workers), and JSON as deep as the API accepts
/// must still round-trip.
#[test]
fn decode_of_deeply_nested_values_is_refused_without_overflowing_the_stack() {
    let event = |kwargs| Event {
        stream: wf_id(),
        seq: 1,
        at: Timestamp::from_micros(5),
        actor: Actor::api("a"),
        schema: SCHEMA_VERSION,
        payload: Payload::KwargsUpdated { node: 0, kwargs },
    };
    let prefix = encode(&event(Value::Null)).expect("encodes");
    // The event ends with `kwargs: nil`; replace the nil with deep nesting.
    assert_eq!(prefix.last(), Some(&0xc0));
    let nested = |depth: usize, level: &[u8]| {
        let mut bytes = prefix[..prefix.len() - 1].to_vec();
        for _ in 0..depth {
            bytes.extend_from_slice(level);
        }
        bytes.push(0xc0);
        bytes
    };
    let array: &[u8] = &[0x91]; // [ ... ]
    let map: &[u8] = &[0x81, 0xa1, b'k']; // {"k": ... }
    for level in [array, map] {
        for depth in [mageflow_core::codec::EVENT_DEPTH_MAX, 1_000, 100_000] {
            assert!(
                decode(&nested(depth, level)).is_err(),
                "{depth} levels decoded"
            );
        }
    }

    // 128 levels, the most serde_json parses.
    let mut deep = Value::Null;
    for _ in 0..64 {
        deep = json!({ "k": [deep] });
    }
    let bytes = encode(&event(deep.clone())).expect("encodes");
    assert_eq!(decode(&bytes).expect("decodes"), event(deep));
}

#[test]
fn tree_strategy_produces_valid_trees() {
    // The command properties start from `Op::Create`; make sure the generator's trees are all
    // accepted, including the degenerate shapes (empty swarms, callbacks on callbacks).
    let samples = [
        swarm("s", 1, None, true, []),
        chain("c", [swarm("s", 1, Some(1), false, [task("t")])]).on_error(task("e")),
        Tree {
            kind: TreeKind::Task {
                retry: RetryPolicy::default(),
            },
            ..task("x").on_success(task("y").on_success(task("z")))
        },
    ];
    for t in samples {
        let mut wf = Workflow::empty(wf_id());
        let cmd = Command {
            actor: Actor::api("a"),
            at: Timestamp::EPOCH,
            op: Op::Create {
                nodes: t.flatten(),
                start: Some(Message::input(json!({}))),
            },
        };
        execute(&mut wf, &cmd).expect("valid tree");
    }
}

proptest! {
    #![proptest_config(config())]

    /// Effects are a function of the log (`mageflow_core::effect`): the events as decided and the
    /// same events read back through the codec, as a store returns them to recovery or to a
    /// rebuilding projector, ask the same of the world. And they agree with the fold: a task the
    /// state says waits to start was last asked to start (queued, or a retry timer armed), and
    /// one the state says is running was last dispatched, with its current attempt.
    #[test]
    fn replaying_a_log_yields_the_same_effects(
        tree in arb_tree(),
        start in prop::bool::weighted(0.8),
        gens in prop::collection::vec(arb_gen(), 0..60),
    ) {
        let run = run_commands(&tree, start, &gens)?;
        let live = effects(&run.log);
        let mut stored = Vec::with_capacity(run.log.len());
        for e in &run.log {
            let bytes = encode(e).map_err(|err| TestCaseError::fail(err.to_string()))?;
            stored.push(decode(&bytes).map_err(|err| TestCaseError::fail(err.to_string()))?);
        }
        prop_assert_eq!(&live, &effects(&stored));
        if run.wf.purged {
            return Ok(());
        }
        let mut last = std::collections::BTreeMap::new();
        for e in &live {
            if let Effect::Enqueue(s) | Effect::ArmTimer { sig: s, .. } | Effect::Dispatch { sig: s, .. } = e {
                last.insert(s.index, *e);
            }
        }
        for (i, n) in run.wf.nodes.iter().enumerate() {
            if n.is_container() {
                continue;
            }
            let sig = run.wf.sig(i as NodeIndex);
            let last = last.get(&(i as NodeIndex));
            if n.in_flight {
                prop_assert_eq!(last, Some(&Effect::Dispatch { sig, attempt: n.attempt }), "running {}", i);
            } else if n.status == Status::Queued {
                prop_assert!(
                    matches!(last, Some(Effect::Enqueue(_) | Effect::ArmTimer { .. })),
                    "queued {} was last asked {:?}", i, last
                );
            }
        }
    }
}
