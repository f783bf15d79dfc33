//! Compaction of finished workflows into cold storage (`EventLog::compact`), on the embedded
//! sled log and on the PostgreSQL log: throughput in events/s and the compression ratio (raw
//! segment bytes / stored bytes).
//!
//! Workflows are real: chains created, started and run to completion through
//! `mageflow_core::execute` (the events the engine writes), about 50 events each, appended in
//! one request per workflow. A first pass compacts `MAGEFLOW_BENCH_WORKFLOWS` of them (default
//! 500) one after the other on each log and prints both figures; then criterion times the
//! compaction of one workflow on each (its setup, appending the workflows to compact, is not
//! timed).
//!
//! `cargo bench --bench compact`; `-- --test` is a quick smoke run (CI). The PostgreSQL server
//! is `$MAGEFLOW_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`), in a schema
//! created and dropped by the run; the sled log is in a temporary directory.

use criterion::Criterion;
use mageflow::core::{
    execute, Actor, Command, Event, KindSpec, Link, Message, NodeSpec, Op, Role, Status, Timestamp,
    Workflow, WorkflowId,
};
use mageflow::store::{AppendRequest, EventLog, SledLog, SledOptions};
use mageflow::store_pg::{PgLog, PgOptions};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Steps of each chain: with its root, about 50 events per workflow.
const CHAIN_STEPS: u32 = 16;

static NEXT_STREAM: AtomicU64 = AtomicU64::new(1);

fn chain_nodes(steps: u32) -> Vec<NodeSpec> {
    let mut root = NodeSpec::task("unused");
    root.name = "etl".into();
    root.kind = KindSpec::Chain {
        children: (1..=steps).collect(),
    };
    let mut nodes = vec![root];
    nodes.extend((1..=steps).map(|i| {
        let mut spec = NodeSpec::task("step");
        spec.parent = Some(Link {
            node: 0,
            role: Role::Child,
        });
        spec.kwargs = json!({ "step": i, "bucket": "warehouse", "table": format!("orders_{i}") });
        spec
    }));
    nodes
}

/// A chain run to completion the way the engine would: every event of it, in seq order.
fn workflow_events(id: WorkflowId) -> Vec<Event> {
    let mut wf = Workflow::empty(id);
    let mut clock = 1_700_000_000_000_000i64;
    let mut events = Vec::new();
    let mut exec = |wf: &mut Workflow, op: Op, actor: &Actor| {
        clock += 1_000;
        let cmd = Command {
            actor: actor.clone(),
            at: Timestamp::from_micros(clock),
            op,
        };
        events.extend(execute(wf, &cmd).expect("command accepted"));
    };
    let api = Actor::api("bench");
    let worker = Actor::worker("worker-7f3a9c");
    exec(
        &mut wf,
        Op::Create {
            nodes: chain_nodes(CHAIN_STEPS),
            start: Some(Message::input(
                json!({ "tenant": "acme", "job": id.to_string(), "since": "2024-01-01" }),
            )),
        },
        &api,
    );
    loop {
        let queued: Vec<u32> = (0..wf.nodes.len() as u32)
            .filter(|&i| wf.nodes[i as usize].status == Status::Queued)
            .collect();
        if queued.is_empty() {
            break;
        }
        for &node in &queued {
            exec(&mut wf, Op::Start { node }, &worker);
        }
        for &node in &queued {
            let attempt = wf.nodes[node as usize].attempt;
            let result = json!({ "ok": true, "node": node, "rows": 1000 + node, "path": "s3://warehouse/out.parquet" });
            exec(
                &mut wf,
                Op::Complete {
                    node,
                    attempt,
                    result,
                },
                &worker,
            );
        }
    }
    assert!(wf.is_finished(), "workflow {id} did not finish");
    events
}

/// Append `n` finished workflows (one request each, in calls of 100); return their ids and
/// their total number of events.
fn write_workflows(
    rt: &tokio::runtime::Runtime,
    log: &dyn EventLog,
    n: u64,
) -> (Vec<WorkflowId>, u64) {
    let mut ids = Vec::with_capacity(n as usize);
    let mut events = 0;
    let mut pending = Vec::new();
    for _ in 0..n {
        let id = WorkflowId::from_u128(
            0xc0_0000_0000_0000_0000_0000_0000_0000
                | u128::from(NEXT_STREAM.fetch_add(1, Ordering::Relaxed)),
        );
        let evs = workflow_events(id);
        events += evs.len() as u64;
        ids.push(id);
        pending.push(AppendRequest {
            stream: id,
            expected_version: 0,
            events: evs,
        });
        if pending.len() == 100 {
            rt.block_on(log.append(std::mem::take(&mut pending)))
                .expect("append");
        }
    }
    if !pending.is_empty() {
        rt.block_on(log.append(pending)).expect("append");
    }
    (ids, events)
}

struct Schema {
    url: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = mageflow::store_pg::drop_schema_blocking(&self.url, &self.name);
    }
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let url = std::env::var("MAGEFLOW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let workflows: u64 = if smoke {
        20
    } else {
        std::env::var("MAGEFLOW_BENCH_WORKFLOWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(500)
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let schema = Schema {
        url: url.clone(),
        name: format!("mageflow_bench_{}", uuid::Uuid::now_v7().simple()),
    };
    let log = rt
        .block_on(PgLog::open(
            &url,
            PgOptions {
                schema: Some(schema.name.clone()),
                ..PgOptions::default()
            },
        ))
        .unwrap_or_else(|e| {
            panic!(
                "cannot open the log at {url} (is PostgreSQL running? `pg_ctlcluster \
                 --skip-systemctl-redirect $(ls /etc/postgresql) main start`): {e}"
            )
        });

    let dir = tempfile::tempdir().expect("tempdir");
    let sled = SledLog::open(dir.path(), SledOptions::default()).expect("open the sled log");
    let mut c = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    run(&rt, &mut c, "sled", &sled, workflows);
    run(&rt, &mut c, "postgres", &log, workflows);
    c.final_summary();
    assert_eq!(sled.verify().expect("verify"), sled.head());
    assert_eq!(log.verify().expect("verify"), log.head());
    drop(log);
    drop(schema);
}

/// Print the figures for `workflows` compactions on `log`, then let criterion time one.
fn run(
    rt: &tokio::runtime::Runtime,
    c: &mut Criterion,
    name: &str,
    log: &dyn EventLog,
    workflows: u64,
) {
    let compact = |id| {
        log.compact(id, None, None)
            .expect("compact")
            .expect("this log compacts")
    };
    let (ids, events) = write_workflows(rt, log, workflows);
    let (mut raw, mut stored) = (0u64, 0u64);
    let start = Instant::now();
    for &id in &ids {
        let stats = compact(id);
        raw += stats.raw_bytes;
        stored += stats.compressed_bytes;
    }
    let took = start.elapsed();
    for &id in ids.iter().take(5) {
        assert_eq!(
            log.read_stream(id, 1).expect("read").len() as u64,
            log.stream_version(id).expect("version")
        );
    }
    println!(
        "compact ({name}): {workflows} workflows of {:.1} events ({:.0} raw bytes) each",
        events as f64 / workflows as f64,
        raw as f64 / workflows as f64
    );
    println!(
        "  throughput: {:>9.0} events/s ({:.0} workflows/s, {:.2} ms per workflow)",
        events as f64 / took.as_secs_f64(),
        workflows as f64 / took.as_secs_f64(),
        took.as_secs_f64() * 1e3 / workflows as f64
    );
    println!(
        "  compression ratio (raw / compressed): {:.2} ({raw} -> {stored} bytes)",
        raw as f64 / stored.max(1) as f64
    );
    c.bench_function(&format!("compact one finished workflow ({name})"), |b| {
        b.iter_custom(|iters| {
            let (ids, _) = write_workflows(rt, log, iters);
            let start = Instant::now();
            for id in ids {
                compact(id);
            }
            start.elapsed()
        })
    });
}
