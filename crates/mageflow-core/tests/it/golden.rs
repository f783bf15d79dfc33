//! Golden files of the event encoding: one encoded event per `Payload` variant, committed under
//! `tests/golden/` at the repository root. The test decodes every file and compares it with the
//! event built here, so a schema change that stops old bytes from decoding (a renamed field, a
//! removed variant, a changed type, a reordered field) fails loudly.
//!
//! - `events-v1/<kind>.msgpack`: schema 1 in the first layout (structs as maps keyed by field
//!   name, `rmp_serde::encode::write_named`). Frozen: logs written then contain these bytes.
//! - `events-v1-compact/<kind>.msgpack`: schema 1 in the current compact layout (structs as
//!   arrays, see `mageflow_core::codec`). These must also be exactly what `encode` writes today,
//!   and the codec's direct reader (not only its serde fallback) must read them.
//!
//! - `events-v2-compact/<kind>.msgpack`: schema 2 (adds `resume_report`) in the compact layout.
//!   Frozen.
//! - `events-v3-compact/<kind>.msgpack`: schema 3 (adds `command_refused`). Frozen.
//! - `events-v4-compact/<kind>.msgpack`: schema 4 (adds `graph_routed`). Frozen.
//! - `events-v5-compact/<kind>.msgpack`: schema 5 (adds gates, `KindSpec::Gate`, a new kind
//!   and no new event: `swarm_items_added` adds a gate). Frozen.
//! - `events-v6-compact/<kind>.msgpack`: schema 6 (adds `priority_changed`, per-item callbacks
//!   of a swarm and priorities of signatures, in `workflow_created`): the current one.
//!   The older directories hold the variants that existed then, with their schema in the
//!   envelope.
//!
//! The current layout's files are written once, by
//! `MAGEFLOW_BLESS=1 cargo test -p mageflow-core golden`. Never re-bless a directory to make a
//! failing test pass: old logs contain these bytes. A new schema version or layout gets a new
//! directory next to these, and all of them keep decoding.

use crate::support::{chain, gate, swarm, swarm_items, task};
use mageflow_core::codec::{check, decode, encode};
use mageflow_core::{
    Actor, EdgeDecision, Event, Message, Payload, Status, TaskError, Timestamp, WorkflowId,
    SCHEMA_VERSION,
};
use serde_json::json;
use std::path::PathBuf;
use std::sync::Once;

const STREAM: u128 = 0x0192_3f4a_5b6c_7d8e_9fa0_b1c2_d3e4_f506;
/// 2026-11-26T07:58:24Z
const AT_MICROS: i64 = 1_795_679_904_000_000;

/// The frozen directory of the first (named) layout.
const NAMED_DIR: &str = "events-v1";
/// The frozen directory of schema 1 in the compact layout.
const V1_COMPACT_DIR: &str = "events-v1-compact";
/// Variants schema 1 had (the first ones in the list below).
const V1_VARIANTS: usize = 20;
/// The frozen directory of schema 2.
const V2_COMPACT_DIR: &str = "events-v2-compact";
/// Variants schema 2 had.
const V2_VARIANTS: usize = 21;
/// The frozen directory of schema 3.
const V3_COMPACT_DIR: &str = "events-v3-compact";
/// Variants schema 3 had.
const V3_VARIANTS: usize = 22;
/// The frozen directory of schema 4.
const V4_COMPACT_DIR: &str = "events-v4-compact";
/// Variants schema 4 had.
const V4_VARIANTS: usize = 23;
/// The frozen directory of schema 5.
const V5_COMPACT_DIR: &str = "events-v5-compact";
/// Variants schema 5 had.
const V5_VARIANTS: usize = 23;
/// The directory of the current schema and layout, the one `MAGEFLOW_BLESS=1` writes.
const CURRENT_DIR: &str = "events-v6-compact";

fn dir(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/golden")).join(name)
}

/// Position of a variant in the list below. Exhaustive on purpose: a new `Payload` variant
/// does not compile until it gets a golden event.
fn variant(payload: &Payload) -> usize {
    match payload {
        Payload::WorkflowCreated { .. } => 0,
        Payload::SwarmItemsAdded { .. } => 1,
        Payload::SwarmClosed { .. } => 2,
        Payload::KwargsUpdated { .. } => 3,
        Payload::Queued { .. } => 4,
        Payload::ContainerStarted { .. } => 5,
        Payload::SwarmDispatched { .. } => 6,
        Payload::Started { .. } => 7,
        Payload::Checkpointed { .. } => 8,
        Payload::Succeeded { .. } => 9,
        Payload::RetryScheduled { .. } => 10,
        Payload::Failed { .. } => 11,
        Payload::Suspended { .. } => 12,
        Payload::Resumed { .. } => 13,
        Payload::Interrupted { .. } => 14,
        Payload::Canceled { .. } => 15,
        Payload::MarkedForDeletion { .. } => 16,
        Payload::Restored { .. } => 17,
        Payload::Rerun { .. } => 18,
        Payload::Purged { .. } => 19,
        Payload::ResumeReport { .. } => 20,
        Payload::CommandRefused { .. } => 21,
        Payload::GraphRouted { .. } => 22,
        Payload::PriorityChanged { .. } => 23,
    }
}
const VARIANTS: usize = 24;

/// The golden events of the current schema, in variant order.
fn expected() -> Vec<Event> {
    expected_of(SCHEMA_VERSION, VARIANTS)
}

/// The golden events of schema `schema`: its first `variants` variants, in variant order, with
/// fixed ids, times and actors.
fn expected_of(schema: u16, variants: usize) -> Vec<Event> {
    let tree = chain(
        "ingest",
        [
            task("fetch")
                .retry(3, 250, 10_000)
                .kwargs(json!({"url": "https://example.com/a", "timeout_s": 2.5})),
            {
                let fan = swarm("fan", 4, Some(2), false, [task("resize"), task("tag")])
                    .on_error(task("alert"));
                // Schema 6 adds per-item callbacks and priorities.
                if schema >= 6 {
                    fan.per_item(Some(task("stored")), Some(chain("undo", [task("log")])))
                        .priority(-100)
                } else {
                    fan
                }
            },
        ],
    )
    .kwargs(json!({"tenant": "acme", "tags": ["a", "ü"], "n": -7}))
    .on_success(task("notify"));
    let payloads = vec![
        Payload::WorkflowCreated {
            nodes: tree.flatten(),
        },
        Payload::SwarmItemsAdded {
            swarm: 2,
            nodes: swarm_items(2, 7, &{
                let mut items = vec![
                    task("thumbnail").kwargs(json!({"size": 128})),
                    chain("ocr", [task("detect"), task("read")]),
                ];
                // Schema 5 adds gates.
                if schema >= 5 {
                    items.push(gate("approve"));
                }
                items
            }),
        },
        Payload::SwarmClosed { swarm: 2 },
        Payload::KwargsUpdated {
            node: 1,
            kwargs: json!({"timeout_s": 5, "headers": {"x-trace": null}}),
        },
        Payload::Queued {
            node: 1,
            message: Message::input(json!({"id": 42, "big": u64::MAX})),
            parked: false,
        },
        Payload::ContainerStarted {
            node: 0,
            message: Message::input(json!({"id": 42})),
            parked: true,
        },
        Payload::SwarmDispatched { swarm: 2, count: 3 },
        Payload::Started {
            node: 1,
            attempt: 2,
        },
        Payload::Checkpointed {
            node: 1,
            attempt: 2,
            data: json!({"offset": 1024, "done": [1, 2, 3]}),
        },
        Payload::Succeeded {
            node: 1,
            attempt: 2,
            result: json!({"bytes": 5_000_000_000u64, "ratio": 0.25, "ok": true}),
        },
        Payload::RetryScheduled {
            node: 1,
            attempt: 1,
            error: TaskError {
                message: "connection reset".into(),
                retryable: true,
            },
            retry_at: Timestamp::from_micros(AT_MICROS + 250_000),
            lost: false,
        },
        Payload::Failed {
            node: 3,
            attempt: 1,
            error: TaskError {
                message: "bad image".into(),
                retryable: false,
            },
        },
        Payload::Suspended { node: 0 },
        Payload::Resumed {
            node: 0,
            status: Status::Running,
        },
        Payload::Interrupted { node: 4 },
        Payload::Canceled { node: 0 },
        Payload::MarkedForDeletion {
            node: 0,
            expires_at: Timestamp::from_micros(AT_MICROS + 86_400_000_000),
        },
        Payload::Restored { node: 0 },
        Payload::Rerun { node: 0 },
        Payload::Purged { node: 0 },
        Payload::ResumeReport {
            report: json!({
                "events_read": 81_920,
                "workflows_unfinished": 3,
                "attempts_requeued": 2,
                "skipped_by_filter": 1,
                "corrupt": [{"workflow": "0192f3a4-0000-7000-8000-000000000001", "reason": "event at position 7 does not fold"}],
            }),
        },
        Payload::CommandRefused {
            command: json!({
                "op": "cancel",
                "target": "sig_01923f4a5b6c7d8e9fa0b1c2d3e4f506.3",
                "principal": "alice",
                "code": "expired",
                "reason": "the command's deadline passed 2000 ms before it was read",
                "deadline_ms": 1_795_679_904_000u64,
            }),
        },
        Payload::GraphRouted {
            graph: 2,
            from: 3,
            decisions: vec![
                EdgeDecision {
                    edge: 4,
                    taken: true,
                    saw: json!({"variant": "b", "score": 0.75}),
                },
                EdgeDecision {
                    edge: 5,
                    taken: false,
                    saw: serde_json::Value::Null,
                },
            ],
            skipped: false,
        },
        Payload::PriorityChanged {
            node: 3,
            priority: 100,
        },
    ];
    payloads
        .into_iter()
        .take(variants)
        .enumerate()
        .map(|(i, payload)| Event {
            stream: WorkflowId::from_u128(STREAM),
            seq: i as u64 + 1,
            at: Timestamp::from_micros(AT_MICROS + i as i64 * 1_000),
            actor: match i % 3 {
                0 => Actor::api("alice@example.com"),
                1 => Actor::worker("host-1/slot-3"),
                _ => Actor::system("timers"),
            },
            schema,
            payload,
        })
        .collect()
}

#[test]
fn golden_list_covers_every_payload_variant_once() {
    let events = expected();
    assert_eq!(events.len(), VARIANTS);
    for (i, e) in events.iter().enumerate() {
        assert_eq!(variant(&e.payload), i, "{} out of place", e.payload.kind());
    }
}

/// Writes the current layout's golden files, once per process, only when `MAGEFLOW_BLESS=1`.
fn bless_if_asked() {
    static BLESS: Once = Once::new();
    if std::env::var("MAGEFLOW_BLESS").as_deref() != Ok("1") {
        return;
    }
    BLESS.call_once(|| {
        let dir = dir(CURRENT_DIR);
        std::fs::create_dir_all(&dir).expect("create golden dir");
        for event in expected() {
            let bytes = encode(&event).expect("encodes");
            let path = dir.join(format!("{}.msgpack", event.payload.kind()));
            std::fs::write(&path, bytes).expect("write golden file");
        }
    });
}

#[test]
fn bless_golden_files() {
    bless_if_asked();
}

/// Every file of `dir` decodes to its expected event, and every variant has a file. Returns the
/// files' bytes in variant order.
fn check_dir(name: &str, expected: Vec<Event>) -> Vec<Vec<u8>> {
    let dir = dir(name);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("golden dir {} is missing: {e}", dir.display()));
    let mut seen = vec![None; expected.len()];
    for entry in entries {
        let path = entry.expect("read golden dir").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let Some(kind) = name.strip_suffix(".msgpack") else {
            panic!("unexpected file in the golden dir: {name}");
        };
        let Some(i) = expected.iter().position(|e| e.payload.kind() == kind) else {
            panic!("golden file {name} has no expected event");
        };
        let bytes = std::fs::read(&path).expect("read golden file");
        let decoded = decode(&bytes).unwrap_or_else(|e| panic!("{name} no longer decodes: {e}"));
        assert_eq!(decoded, expected[i], "{name} decodes to a different event");
        seen[i] = Some(bytes);
    }
    let missing: Vec<&str> = expected
        .iter()
        .zip(&seen)
        .filter(|(_, seen)| seen.is_none())
        .map(|(e, _)| e.payload.kind())
        .collect();
    assert!(
        missing.is_empty(),
        "no golden file for {missing:?} in {} (bless with MAGEFLOW_BLESS=1)",
        dir.display()
    );
    seen.into_iter().flatten().collect()
}

#[test]
fn golden_files_still_decode_to_the_same_events() {
    bless_if_asked();
    check_dir(NAMED_DIR, expected_of(1, V1_VARIANTS));
    check_dir(V1_COMPACT_DIR, expected_of(1, V1_VARIANTS));
    check_dir(V2_COMPACT_DIR, expected_of(2, V2_VARIANTS));
    check_dir(V3_COMPACT_DIR, expected_of(3, V3_VARIANTS));
    check_dir(V4_COMPACT_DIR, expected_of(4, V4_VARIANTS));
    check_dir(V5_COMPACT_DIR, expected_of(5, V5_VARIANTS));
    check_dir(CURRENT_DIR, expected());
}

/// The current layout is stable (encoding the expected events gives the committed bytes) and is
/// read by the codec's direct reader, not left to its serde fallback.
#[test]
fn golden_files_of_the_current_layout_are_what_encode_writes() {
    bless_if_asked();
    let files = check_dir(CURRENT_DIR, expected());
    for (event, bytes) in expected().iter().zip(&files) {
        let kind = event.payload.kind();
        assert_eq!(
            &encode(event).expect("encodes"),
            bytes,
            "{kind}: the encoding changed"
        );
        assert_eq!(
            check::decode_direct(bytes).as_ref(),
            Some(event),
            "{kind}: the direct reader does not read it"
        );
    }
}

/// Schema-1 events in the compact layout (logs written before schema 2) are still what `encode`
/// writes for them and still read by the direct reader.
#[test]
fn golden_files_of_schema_1_compact_are_still_read_directly() {
    let files = check_dir(V1_COMPACT_DIR, expected_of(1, V1_VARIANTS));
    for (event, bytes) in expected_of(1, V1_VARIANTS).iter().zip(&files) {
        let kind = event.payload.kind();
        assert_eq!(&encode(event).expect("encodes"), bytes, "{kind}");
        assert_eq!(check::decode_direct(bytes).as_ref(), Some(event), "{kind}");
    }
}
