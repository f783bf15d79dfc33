//! Durable appends to the PostgreSQL log with group commit, against the ceiling: a plain binary
//! `COPY` of the same rows into a table of the same shape with the same indexes.
//!
//! `cargo bench -p mageflow-store-pg --bench pg_append` runs 1000 concurrent appenders, each
//! appending 200-byte events to its own stream, one call at a time, awaiting each (an append
//! resolves after its transaction's COMMIT), then COPYs the same rows in one statement, and
//! prints both rates and their ratio. `-- --test` is a tiny smoke run (CI).
//! `MAGEFLOW_BENCH_EVENTS` sets the events per appender (default 300), and
//! `MAGEFLOW_BENCH_PER_CALL` how many of them each call carries (default 1, the worst case; the
//! engine appends each batch of its work in one call). The server is `$MAGEFLOW_TEST_POSTGRES`
//! (default `postgres://postgres@127.0.0.1:5432/test`), in a schema created and dropped by the
//! run.

use mageflow_core::{codec, Actor, Event, Payload, Timestamp, WorkflowId, SCHEMA_VERSION};
use mageflow_store::{AppendRequest, EventLog};
use mageflow_store_pg::copy::{copy_statement, CopyData, Tuples};
use mageflow_store_pg::{PgLog, PgOptions};
use sqlx::{Connection, Executor, PgConnection};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EVENT_BYTES: usize = 200;

fn event(stream: WorkflowId, seq: u64, pad: usize) -> Event {
    Event {
        stream,
        seq,
        at: Timestamp::from_micros(1_700_000_000_000_000 + seq as i64),
        actor: Actor::worker("bench"),
        schema: SCHEMA_VERSION,
        payload: Payload::KwargsUpdated {
            node: 0,
            kwargs: serde_json::json!({ "pad": "x".repeat(pad) }),
        },
    }
}

/// The padding that makes an encoded event exactly `EVENT_BYTES` long.
fn pad_for_event_bytes() -> usize {
    let probe = |pad| codec::encode(&event(WorkflowId::from_u128(1), 1, pad)).map(|b| b.len());
    let base = probe(0).expect("encode");
    let pad = EVENT_BYTES - base;
    // MessagePack string headers grow at 32 bytes; adjust by the difference.
    let len = probe(pad).expect("encode");
    let pad = pad + EVENT_BYTES - len;
    assert_eq!(probe(pad).expect("encode"), EVENT_BYTES);
    pad
}

fn stream_of(appender: u64) -> WorkflowId {
    WorkflowId::from_u128(0xbe4c_0000_0000_0000_0000_0000_0000_0000 | u128::from(appender))
}

struct Schema {
    url: String,
    name: String,
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = mageflow_store_pg::drop_schema_blocking(&self.url, &self.name);
    }
}

async fn run(url: String, appenders: u64, per_appender: u64, per_call: u64) {
    let mut admin = PgConnection::connect(&url).await.unwrap_or_else(|e| {
        panic!(
            "PostgreSQL is not reachable at {url}: {e}\nStart it with \
             `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`."
        )
    });
    let schema = Schema {
        url: url.clone(),
        name: format!("mageflow_bench_{}", uuid::Uuid::now_v7().simple()),
    };
    admin
        .execute(format!("CREATE SCHEMA {}", schema.name).as_str())
        .await
        .expect("create schema");
    admin
        .execute(format!("SET search_path TO {}", schema.name).as_str())
        .await
        .expect("search_path");
    let pad = pad_for_event_bytes();
    let total = appenders * per_appender;

    // 1. Durable appends with group commit.
    let log = Arc::new(
        PgLog::open(
            &url,
            PgOptions {
                schema: Some(schema.name.clone()),
                ..PgOptions::default()
            },
        )
        .await
        .expect("open"),
    );
    let start = Instant::now();
    let tasks: Vec<_> = (0..appenders)
        .map(|a| {
            let log = log.clone();
            tokio::spawn(async move {
                let s = stream_of(a);
                let mut version = 0;
                while version < per_appender {
                    let count = per_call.min(per_appender - version);
                    let req = AppendRequest {
                        stream: s,
                        expected_version: version,
                        events: (version + 1..=version + count)
                            .map(|seq| event(s, seq, pad))
                            .collect(),
                    };
                    log.append(vec![req]).await.expect("append");
                    version += count;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("appender");
    }
    let appended = start.elapsed();
    assert_eq!(log.head(), total);
    let stats = log.stats();
    drop(log);

    // 2. The same rows (read back in position order: same positions, streams, seqs, payloads),
    //    in one binary COPY into a table with the same columns, constraints and indexes.
    admin
        .execute("CREATE TABLE copy_baseline (LIKE mageflow_events INCLUDING ALL)")
        .await
        .expect("create the COPY table");
    let rows: Vec<(i64, uuid::Uuid, i64, Vec<u8>)> = sqlx::query_as(
        "SELECT position, stream, seq, payload FROM mageflow_events ORDER BY position",
    )
    .fetch_all(&mut admin)
    .await
    .expect("read the rows back");
    assert_eq!(rows.len() as u64, total);
    let mut data = CopyData::with_capacity(total as usize * (EVENT_BYTES + 64));
    for chunk in rows.chunks(4096) {
        let mut tuples = Tuples::with_capacity(chunk.len());
        for (_, stream, seq, payload) in chunk {
            tuples.push_encoded(WorkflowId(*stream), *seq as u64, payload);
        }
        data.extend(&tuples, chunk[0].0 as u64);
    }
    drop(rows);
    let bytes = data.finish();
    let start = Instant::now();
    let mut copy = admin
        .copy_in_raw(&copy_statement("copy_baseline"))
        .await
        .expect("COPY");
    copy.send(bytes).await.expect("COPY data");
    let rows = copy.finish().await.expect("COPY done");
    let copied = start.elapsed();
    assert_eq!(rows, total);

    let rate = |d: Duration| total as f64 / d.as_secs_f64();
    println!(
        "pg_append: {appenders} appenders x {per_appender} events of {EVENT_BYTES} bytes, {per_call} \
         per call = {total} events"
    );
    println!(
        "  group commit, durable appends: {:>9.0} events/s ({:.2} s; {} commits, {} of them \
         without the head lock, {:.0} events per commit)",
        rate(appended),
        appended.as_secs_f64(),
        stats.commits,
        stats.fast_commits,
        stats.events as f64 / stats.commits.max(1) as f64
    );
    println!(
        "  one binary COPY of the same rows: {:>9.0} events/s ({:.2} s)",
        rate(copied),
        copied.as_secs_f64()
    );
    println!(
        "  ratio: {:.2} of COPY",
        copied.as_secs_f64() / appended.as_secs_f64()
    );
    drop(admin);
    drop(schema);
}

fn main() {
    let smoke = std::env::args().any(|a| a == "--test");
    let url = std::env::var("MAGEFLOW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let per_appender = std::env::var("MAGEFLOW_BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let per_call = std::env::var("MAGEFLOW_BENCH_PER_CALL")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1u64)
        .max(1);
    let (appenders, per_appender) = if smoke { (20, 5) } else { (1000, per_appender) };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(url, appenders, per_appender, per_call));
}
