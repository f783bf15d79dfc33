//! Replay throughput: what recovery costs. Writes about 1 000 000 events of realistic workflows
//! (swarms of 1000 tasks and ten-step chains, every task queued, started and completed, generated
//! by `mageflow::core::execute` so they are the events the engine really writes) into a
//! `SledLog`, reopens it, then times `read_all` in chunks + decode + `Workflow::apply_owned` into
//! one state per stream (what recovery does). Also times the parts apart (read + decode only;
//! apply only, with the borrowing `apply` and with the consuming `apply_owned`).
//!
//! A plain `main` (harness = false) printing `name=... events_per_s=...` lines. With `--test`
//! (what `cargo bench -- --test` passes) the workload shrinks to a smoke run.

use mageflow::core::{
    execute, Actor, Command, Event, KindSpec, Link, Message, NodeSpec, Op, Role, Status,
    SwarmConfig, Timestamp, Workflow, WorkflowId,
};
use mageflow::store::{AppendRequest, Durability, EventLog, SledLog, SledOptions};
use serde_json::json;
use std::collections::HashMap;
use std::time::Instant;

const READ_CHUNK_EVENTS: usize = 10_000;

struct Shape {
    /// Units of work; each unit is one swarm plus `chains_per_unit` chains.
    units: u64,
    swarm_tasks: u32,
    chains_per_unit: u64,
    chain_steps: u32,
}

fn task(name: &str, parent: u32, i: u32) -> NodeSpec {
    let mut spec = NodeSpec::task(name);
    spec.parent = Some(Link {
        node: parent,
        role: Role::Child,
    });
    spec.kwargs = json!({ "item": i, "bucket": "uploads", "size": "256x256" });
    spec
}

fn swarm_nodes(tasks: u32) -> Vec<NodeSpec> {
    let mut root = NodeSpec::task("unused");
    root.name = "thumbnails".into();
    root.kind = KindSpec::Swarm {
        children: (1..=tasks).collect(),
        config: SwarmConfig {
            max_concurrency: 50,
            stop_after_n_failures: None,
        },
        closed: true,
        item_callbacks: Default::default(),
    };
    let mut nodes = vec![root];
    nodes.extend((1..=tasks).map(|i| task("resize", 0, i)));
    nodes
}

fn chain_nodes(steps: u32) -> Vec<NodeSpec> {
    let mut root = NodeSpec::task("unused");
    root.name = "etl".into();
    root.kind = KindSpec::Chain {
        children: (1..=steps).collect(),
    };
    let mut nodes = vec![root];
    nodes.extend((1..=steps).map(|i| task("step", 0, i)));
    nodes
}

/// Run a workflow to completion the way the engine would: create and start it, then repeatedly
/// start every queued task and complete every running one. One request per command.
fn run_workflow(
    id: WorkflowId,
    nodes: Vec<NodeSpec>,
    clock: &mut i64,
) -> (Workflow, Vec<AppendRequest>) {
    let mut wf = Workflow::empty(id);
    let mut requests = Vec::new();
    let mut exec = |wf: &mut Workflow, op: Op, actor: &Actor, clock: &mut i64| {
        *clock += 1_000;
        let version = wf.version;
        let cmd = Command {
            actor: actor.clone(),
            at: Timestamp::from_micros(*clock),
            op,
        };
        let events = execute(wf, &cmd).expect("command accepted");
        if !events.is_empty() {
            requests.push(AppendRequest {
                stream: id,
                expected_version: version,
                events,
            });
        }
    };
    let api = Actor::api("bench");
    let worker = Actor::worker("worker-1");
    exec(
        &mut wf,
        Op::Create {
            nodes,
            start: Some(Message::input(
                json!({ "tenant": "acme", "job": id.to_string() }),
            )),
        },
        &api,
        clock,
    );
    loop {
        let queued: Vec<u32> = (0..wf.nodes.len() as u32)
            .filter(|&i| wf.nodes[i as usize].status == Status::Queued)
            .collect();
        if queued.is_empty() {
            break;
        }
        for &node in &queued {
            exec(&mut wf, Op::Start { node }, &worker, clock);
        }
        for &node in &queued {
            let attempt = wf.nodes[node as usize].attempt;
            let result = json!({ "ok": true, "node": node, "url": "s3://uploads/thumb.png" });
            exec(
                &mut wf,
                Op::Complete {
                    node,
                    attempt,
                    result,
                },
                &worker,
                clock,
            );
        }
    }
    assert!(wf.is_finished(), "workflow {id} did not finish");
    (wf, requests)
}

/// Write the workload; return the number of events and a summary of each final state.
fn write_log(log: &SledLog, shape: &Shape) -> (u64, HashMap<WorkflowId, (u64, usize)>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut clock = 1_795_679_904_000_000;
    let mut summary = HashMap::new();
    let mut n = 0u128;
    let mut events = 0u64;
    let mut pending = Vec::new();
    for _ in 0..shape.units {
        let mut workflows = vec![swarm_nodes(shape.swarm_tasks)];
        workflows.extend((0..shape.chains_per_unit).map(|_| chain_nodes(shape.chain_steps)));
        for nodes in workflows {
            n += 1;
            let id = WorkflowId::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0000 + n);
            let (wf, requests) = run_workflow(id, nodes, &mut clock);
            events += wf.version;
            summary.insert(id, (wf.version, wf.nodes.len()));
            // Submitted at once, awaited later: the log pipelines them.
            pending.push(log.append(requests));
            if pending.len() >= 64 {
                for p in pending.drain(..) {
                    rt.block_on(p).expect("append");
                }
            }
        }
    }
    for p in pending {
        rt.block_on(p).expect("append");
    }
    (events, summary)
}

fn open(dir: &std::path::Path, durability: Durability) -> SledLog {
    SledLog::open(
        dir,
        SledOptions {
            durability,
            cache_bytes: 512 * 1024 * 1024,
        },
    )
    .expect("open log")
}

/// Fold the whole log into one state per stream, reading it in chunks.
fn replay(log: &SledLog) -> HashMap<WorkflowId, Workflow> {
    let mut states: HashMap<WorkflowId, Workflow> = HashMap::new();
    let mut from = 1;
    loop {
        let chunk = log.read_all(from, READ_CHUNK_EVENTS).expect("read_all");
        let Some(last) = chunk.last() else { break };
        from = last.position + 1;
        // Recovery no longer needs the events once folded: move them into the state.
        for r in chunk {
            let stream = r.event.stream;
            states
                .entry(stream)
                .or_insert_with(|| Workflow::empty(stream))
                .apply_owned(r.event)
                .expect("apply");
        }
    }
    states
}

fn rate_line(name: &str, events: u64, secs: f64) {
    println!(
        "name={name} events={events} secs={secs:.3} events_per_s={:.0}",
        events as f64 / secs
    );
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let shape = if smoke {
        Shape {
            units: 2,
            swarm_tasks: 100,
            chains_per_unit: 5,
            chain_steps: 10,
        }
    } else {
        // One swarm of 1000 tasks is about 4000 events and a ten-step chain 33: a unit is about
        // 5000 events, 200 units about 1 000 000.
        Shape {
            units: 200,
            swarm_tasks: 1000,
            chains_per_unit: 30,
            chain_steps: 10,
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let t = Instant::now();
    let (events, summary) = {
        let log = open(
            dir.path(),
            Durability::Buffered {
                flush_every_ms: 500,
            },
        );
        let written = write_log(&log, &shape);
        log.close();
        written
    };
    println!(
        "replay: wrote {events} events of {} workflows in {:.1}s (setup, not measured)",
        summary.len(),
        t.elapsed().as_secs_f64()
    );

    let log = open(dir.path(), Durability::Flush);
    assert_eq!(log.head(), events);

    // Read + decode + apply: what recovery does. The first pass runs right after open (sled's
    // cache cold, as at a real recovery), the second with the cache warm.
    for name in [
        "replay_read_all_decode_apply_cold",
        "replay_read_all_decode_apply_warm",
    ] {
        let start = Instant::now();
        let states = replay(&log);
        rate_line(name, events, start.elapsed().as_secs_f64());
        assert_eq!(states.len(), summary.len());
        for (id, wf) in &states {
            assert_eq!(
                (wf.version, wf.nodes.len()),
                summary[id],
                "replayed state of {id}"
            );
            assert!(wf.is_finished());
        }
    }

    // The parts: read + decode alone, then apply alone on events already in memory.
    let start = Instant::now();
    let mut all: Vec<Event> = Vec::with_capacity(events as usize);
    let mut from = 1;
    loop {
        let chunk = log.read_all(from, READ_CHUNK_EVENTS).expect("read_all");
        let Some(last) = chunk.last() else { break };
        from = last.position + 1;
        all.extend(chunk.into_iter().map(|r| r.event));
    }
    rate_line(
        "replay_read_all_decode_only",
        events,
        start.elapsed().as_secs_f64(),
    );
    // Borrowing `apply` (what the command path uses: the event is kept to be appended).
    let start = Instant::now();
    let mut states: HashMap<WorkflowId, Workflow> = HashMap::new();
    for e in &all {
        states
            .entry(e.stream)
            .or_insert_with(|| Workflow::empty(e.stream))
            .apply(e)
            .expect("apply");
    }
    rate_line(
        "replay_apply_borrowed_only",
        events,
        start.elapsed().as_secs_f64(),
    );
    drop(states);
    // Consuming `apply_owned` (what replay uses).
    let start = Instant::now();
    let mut states: HashMap<WorkflowId, Workflow> = HashMap::new();
    for e in all {
        let stream = e.stream;
        states
            .entry(stream)
            .or_insert_with(|| Workflow::empty(stream))
            .apply_owned(e)
            .expect("apply");
    }
    rate_line("replay_apply_only", events, start.elapsed().as_secs_f64());
    assert_eq!(states.len(), summary.len());
    if smoke {
        println!("replay: smoke run (--test), numbers are not meaningful");
    }
}
