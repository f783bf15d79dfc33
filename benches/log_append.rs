//! Durable append throughput of the sled event log, against raw sled doing the same work.
//!
//! Measures, in one run on one machine:
//! - raw sled 0.34: insert 200-byte values, `flush()` every 1000 inserts (the best a log could do
//!   on sled with one fsync per 1000 events);
//! - `SledLog` with `Durability::Flush`, 1000 concurrent appenders (each its own stream, one
//!   event per append): group commit shares one flush among everyone waiting;
//! - `SledLog` with one appender: one flush per event, with append latency p50/p99.
//!
//! A plain `main` (harness = false): criterion's sampling does not fit a fixed concurrent
//! workload. Prints `name=... events_per_s=...` lines. `cargo bench --bench log_append -- --test`
//! (what CI runs) shrinks every workload to a smoke run.

use mageflow::core::{codec, Actor, Event, Payload, Timestamp, WorkflowId, SCHEMA_VERSION};
use mageflow::store::{AppendRequest, Durability, EventLog, SledLog, SledOptions};
use serde_json::json;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Encoded size of every benchmark event, in bytes.
const EVENT_BYTES: usize = 200;
const CACHE_BYTES: u64 = 256 * 1024 * 1024;

struct Workload {
    raw_inserts: u64,
    raw_flush_every: u64,
    concurrent_events: u64,
    appenders: u64,
    single_events: u64,
}

fn event(stream: WorkflowId, seq: u64, pad: usize) -> Event {
    Event {
        stream,
        seq,
        at: Timestamp::from_micros(1_795_679_904_000_000 + seq as i64),
        actor: Actor::worker("bench"),
        schema: SCHEMA_VERSION,
        payload: Payload::KwargsUpdated {
            node: 1,
            kwargs: json!({ "pad": "x".repeat(pad) }),
        },
    }
}

/// Padding that makes an encoded event `EVENT_BYTES` long.
fn pad_for_event_bytes() -> usize {
    let base = codec::encode(&event(WorkflowId::from_u128(u128::MAX), u64::MAX / 2, 0))
        .expect("encode")
        .len();
    let mut pad = EVENT_BYTES.saturating_sub(base);
    while codec::encode(&event(WorkflowId::from_u128(u128::MAX), u64::MAX / 2, pad))
        .expect("encode")
        .len()
        > EVENT_BYTES
    {
        pad -= 1;
    }
    pad
}

fn rate(events: u64, elapsed: Duration) -> f64 {
    events as f64 / elapsed.as_secs_f64()
}

fn raw_sled(w: &Workload) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = sled::Config::new()
        .path(dir.path())
        .cache_capacity(CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .expect("open sled");
    let tree = db.open_tree("raw").expect("tree");
    let value = vec![0xabu8; EVENT_BYTES];
    let start = Instant::now();
    for i in 1..=w.raw_inserts {
        tree.insert(i.to_be_bytes(), value.as_slice())
            .expect("insert");
        if i % w.raw_flush_every == 0 {
            db.flush().expect("flush");
        }
    }
    db.flush().expect("flush");
    let elapsed = start.elapsed();
    let r = rate(w.raw_inserts, elapsed);
    println!(
        "name=raw_sled_insert_flush_every_{} events={} secs={:.3} events_per_s={r:.0}",
        w.raw_flush_every,
        w.raw_inserts,
        elapsed.as_secs_f64()
    );
    r
}

fn open_log(dir: &std::path::Path) -> Arc<SledLog> {
    let log = SledLog::open(
        dir,
        SledOptions {
            durability: Durability::Flush,
            cache_bytes: CACHE_BYTES,
        },
    )
    .expect("open log");
    Arc::new(log)
}

fn concurrent_appenders(rt: &tokio::runtime::Runtime, w: &Workload, pad: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path());
    let per_appender = w.concurrent_events / w.appenders;
    let start = Instant::now();
    rt.block_on(async {
        let tasks: Vec<_> = (0..w.appenders)
            .map(|a| {
                let log = log.clone();
                tokio::spawn(async move {
                    let stream = WorkflowId::from_u128(0xbe4c_0000 + u128::from(a));
                    for seq in 1..=per_appender {
                        let req = AppendRequest {
                            stream,
                            expected_version: seq - 1,
                            events: vec![event(stream, seq, pad)],
                        };
                        log.append(vec![req]).await.expect("append");
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("appender");
        }
    });
    let elapsed = start.elapsed();
    let events = per_appender * w.appenders;
    assert_eq!(log.head(), events);
    let r = rate(events, elapsed);
    println!(
        "name=sled_log_append_durable_{}_appenders events={events} secs={:.3} events_per_s={r:.0}",
        w.appenders,
        elapsed.as_secs_f64()
    );
    r
}

fn single_appender(rt: &tokio::runtime::Runtime, w: &Workload, pad: usize) -> f64 {
    let dir = tempfile::tempdir().expect("tempdir");
    let log = open_log(dir.path());
    let stream = WorkflowId::from_u128(0xbe4c_5111);
    let mut latencies = Vec::with_capacity(w.single_events as usize);
    let start = Instant::now();
    rt.block_on(async {
        for seq in 1..=w.single_events {
            let req = AppendRequest {
                stream,
                expected_version: seq - 1,
                events: vec![event(stream, seq, pad)],
            };
            let t = Instant::now();
            log.append(vec![req]).await.expect("append");
            latencies.push(t.elapsed());
        }
    });
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    let r = rate(w.single_events, elapsed);
    println!(
        "name=sled_log_append_durable_1_appender events={} secs={:.3} events_per_s={r:.0} \
         latency_p50_us={} latency_p99_us={}",
        w.single_events,
        elapsed.as_secs_f64(),
        pct(50).as_micros(),
        pct(99).as_micros()
    );
    r
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let w = if smoke {
        Workload {
            raw_inserts: 2_000,
            raw_flush_every: 1000,
            concurrent_events: 2_000,
            appenders: 100,
            single_events: 50,
        }
    } else {
        Workload {
            raw_inserts: 200_000,
            raw_flush_every: 1000,
            concurrent_events: 200_000,
            appenders: 1000,
            single_events: 2_000,
        }
    };
    let pad = pad_for_event_bytes();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let raw = raw_sled(&w);
    let group = concurrent_appenders(&rt, &w, pad);
    let single = single_appender(&rt, &w, pad);
    println!(
        "name=group_commit_vs_raw_sled ratio={:.3} (group commit {group:.0} events/s / raw sled \
         insert+flush {raw:.0} inserts/s); group_commit_vs_single_appender ratio={:.1}",
        group / raw,
        group / single
    );
    if smoke {
        println!("log_append: smoke run (--test), numbers are not meaningful");
    }
}
