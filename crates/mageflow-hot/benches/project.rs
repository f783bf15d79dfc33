//! Projection throughput: many small workflows (create, queue, start, succeed: 4 events each)
//! projected from a `MemoryLog` into Redis. Needs Redis (`MAGEFLOW_TEST_REDIS`, default
//! `redis://127.0.0.1:6379`); works under a unique prefix and deletes it at the end.
//! `cargo bench -p mageflow-hot -- --test` runs a small log once.

use criterion::{Criterion, Throughput};
use mageflow_core::{
    execute, Actor, Command, Message, NodeSpec, Op, Timestamp, Workflow, WorkflowId,
};
use mageflow_hot::{Hot, HotConfig, Projector};
use mageflow_store::{AppendRequest, EventLog, MemoryLog};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

async fn build_log(workflows: u128) -> Arc<MemoryLog> {
    let log = Arc::new(MemoryLog::new());
    let mut at = 1_700_000_000_000_000;
    for n in 0..workflows {
        let id = WorkflowId::from_u128(n + 1);
        let mut wf = Workflow::empty(id);
        let ops = [
            Op::Create {
                nodes: vec![NodeSpec::task("bench")],
                start: Some(Message::input(json!({"n": n as u64}))),
            },
            Op::Start { node: 0 },
            Op::Complete {
                node: 0,
                attempt: 1,
                result: json!(null),
            },
        ];
        let mut events = Vec::new();
        for op in ops {
            at += 1;
            let cmd = Command {
                actor: Actor::api("bench"),
                at: Timestamp::from_micros(at),
                op,
            };
            match execute(&mut wf, &cmd) {
                Ok(mut e) => events.append(&mut e),
                Err(e) => panic!("bench workflow refused: {e}"),
            }
        }
        let req = AppendRequest {
            stream: id,
            expected_version: 0,
            events,
        };
        if let Err(e) = log.append(vec![req]).await {
            panic!("append: {e}");
        }
    }
    log
}

fn main() {
    let quick = std::env::args().any(|a| a == "--test");
    let workflows = if quick { 500 } else { 12_500 };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let url =
        std::env::var("MAGEFLOW_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let prefix = format!("mf:bench:{}:", std::process::id());
    let mut cfg = HotConfig::new(url.clone(), prefix);
    cfg.done_ttl = Duration::from_secs(600);
    let hot = match rt.block_on(Hot::connect(cfg)) {
        Ok(hot) => hot,
        Err(e) => panic!(
            "Redis is not reachable at {url}: {e}\nStart one with `redis-server --daemonize yes`."
        ),
    };
    let log = rt.block_on(build_log(workflows));
    let events = log.head();
    let dyn_log: Arc<dyn EventLog> = log;

    // One projection into an empty prefix, timed by hand.
    let mut projector = Projector::new(hot.clone(), dyn_log.clone());
    let start = Instant::now();
    match rt.block_on(projector.rebuild(|_, _| {})) {
        Ok(pos) => assert_eq!(pos, events),
        Err(e) => panic!("projection failed: {e}"),
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "hot/project: {events} events ({workflows} workflows) in {:.1} ms = {:.0} events/s",
        secs * 1e3,
        events as f64 / secs
    );

    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(10));
    let mut group = c.benchmark_group("hot");
    group.throughput(Throughput::Elements(events));
    group.bench_function("rebuild", |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                if let Err(e) = rt.block_on(projector.rebuild(|_, _| {})) {
                    panic!("rebuild failed: {e}");
                }
            }
            start.elapsed()
        })
    });
    group.finish();
    c.final_summary();
    if let Err(e) = rt.block_on(hot.clear()) {
        eprintln!("could not delete the bench prefix {}: {e}", hot.prefix());
    }
}
