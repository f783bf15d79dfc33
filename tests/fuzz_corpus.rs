//! Replays every fuzz corpus entry and every committed crash input (`fuzz/corpus/<target>/`,
//! `fuzz/artifacts/<target>/`) through the same library functions the fuzz targets call, on
//! stable Rust, in the ordinary test run. A decoder that panics on any of them fails here.

use std::path::Path;

fn inputs(target: &str) -> Vec<(String, Vec<u8>)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    let mut out = Vec::new();
    for dir in ["corpus", "artifacts"] {
        let Ok(entries) = std::fs::read_dir(root.join(dir).join(target)) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_file() {
                let bytes = std::fs::read(&path).unwrap_or_else(|err| panic!("{path:?}: {err}"));
                out.push((path.display().to_string(), bytes));
            }
        }
    }
    out
}

#[test]
fn decode_event_corpus() {
    let all = inputs("decode_event");
    assert!(!all.is_empty(), "fuzz/corpus/decode_event is empty");
    let mut decoded = 0;
    for (name, bytes) in &all {
        let result = std::panic::catch_unwind(|| mageflow::core::codec::decode(bytes));
        match result {
            Ok(Ok(_)) => decoded += 1,
            Ok(Err(_)) => {}
            Err(_) => panic!("decode panicked on {name}"),
        }
    }
    // The seed corpus is the golden events: they must all decode.
    assert!(decoded > 0, "no corpus entry decoded");
}

#[test]
fn decode_block_corpus() {
    let all = inputs("decode_block");
    assert!(!all.is_empty(), "fuzz/corpus/decode_block is empty");
    let mut decoded = 0;
    for (name, bytes) in &all {
        match std::panic::catch_unwind(|| mageflow::store::decode_block(1, bytes)) {
            Ok(Ok(_)) => decoded += 1,
            Ok(Err(_)) => {}
            Err(_) => panic!("decode_block panicked on {name}"),
        }
    }
    assert!(decoded > 0, "no corpus entry decoded");
}

#[test]
fn decode_sled_archive_corpus() {
    let stream = mageflow::WorkflowId::SYSTEM;
    let ok = replay("decode_sled_archive", |data| {
        let whole = mageflow::store::decode_archive_record(stream, 1, data).is_ok();
        let wrapped = match data {
            [a, b, c, d, events, segment @ ..] => {
                let raw = u64::from(u32::from_le_bytes([*a, *b, *c, *d]));
                let at = mageflow::Timestamp::from_micros(0);
                let record = mageflow::store::encode_archive_record(
                    1,
                    u64::from(*events),
                    raw,
                    0,
                    at,
                    segment,
                );
                mageflow::store::decode_archive_record(stream, 1, &record).is_ok()
            }
            _ => false,
        };
        whole || wrapped
    });
    assert!(ok >= 2, "the record seed and the wrapped seed decode");
}

/// `MAGEFLOW_BLESS=1 cargo test --test fuzz_corpus` writes the block seeds: one block per golden
/// event, exactly as the sled log stores it.
#[test]
fn bless_block_seeds() {
    if std::env::var_os("MAGEFLOW_BLESS").is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("fuzz/corpus/decode_block");
    std::fs::create_dir_all(&out).expect("create corpus dir");
    for (name, bytes) in inputs("decode_event") {
        let event = mageflow::core::codec::decode(&bytes).expect("golden event decodes");
        let block = mageflow::store::encode_block(&[&event]).expect("encode block");
        let file = Path::new(&name).file_name().expect("file name");
        std::fs::write(out.join(file), block).expect("write seed");
    }
}

#[test]
fn parse_id_corpus() {
    let all = inputs("parse_id");
    assert!(!all.is_empty(), "fuzz/corpus/parse_id is empty");
    for (name, bytes) in &all {
        let result = std::panic::catch_unwind(|| {
            if let Ok(s) = std::str::from_utf8(bytes) {
                let _ = s.parse::<mageflow::WorkflowId>();
                let _ = s.parse::<mageflow::SignatureId>();
            }
        });
        assert!(result.is_ok(), "id parsing panicked on {name}");
    }
}

/// Replays `target`'s inputs through `f`, failing on a panic; returns how many `f` accepted.
fn replay(target: &str, f: impl Fn(&[u8]) -> bool) -> usize {
    let all = inputs(target);
    assert!(!all.is_empty(), "fuzz/corpus/{target} is empty");
    let mut accepted = 0;
    for (name, bytes) in &all {
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(bytes))) {
            Ok(ok) => accepted += usize::from(ok),
            Err(_) => panic!("{target} panicked on {name}"),
        }
    }
    accepted
}

#[test]
fn decode_snapshot_corpus() {
    let ok = replay("decode_snapshot", |b| {
        mageflow::Workflow::from_snapshot(b).is_ok()
    });
    assert!(ok > 0, "no snapshot seed decoded");
}

#[test]
fn decode_hot_corpus() {
    use mageflow::engine::SubmitAnswer;
    use mageflow::hot::{Report, ReportOutcome};
    use mageflow::{Registry, Sig};
    let ok = replay("decode_hot", |b| match std::str::from_utf8(b) {
        Ok(s) => {
            let key = s.parse::<mageflow::hot::JobKey>().is_ok();
            let report = serde_json::from_str::<Report>(s);
            let mut tree = false;
            if let Ok(Report {
                outcome: ReportOutcome::Submit { sig, .. },
                ..
            }) = &report
            {
                // What the orchestrator's intake does with a worker's submit.
                if let Ok(sig) = serde_json::from_value::<Sig>(sig.clone()) {
                    let _ = sig.validate(&Registry::new());
                    tree = true;
                }
            }
            let answer = match serde_json::from_str::<SubmitAnswer>(s) {
                Ok(SubmitAnswer::Refused(e)) => {
                    let _ = mageflow::Error::from(e);
                    true
                }
                Ok(SubmitAnswer::Created) => true,
                Err(_) => false,
            };
            key || report.is_ok() || tree || answer
        }
        Err(_) => false,
    });
    assert!(ok > 0, "no hot-tier seed parsed");
}

/// The submit seeds stay meaningful: the tree in the report decodes and encodes back to the
/// same JSON (the wire form of a signature is stable), and the answers decode.
#[test]
fn hot_submit_seeds_decode() {
    use mageflow::engine::SubmitAnswer;
    use mageflow::hot::{Report, ReportOutcome};
    use mageflow::Sig;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/decode_hot");
    let read = |name: &str| {
        std::fs::read_to_string(root.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
    };
    let report: Report = serde_json::from_str(&read("submit_report")).expect("submit seed");
    let ReportOutcome::Submit { sig, .. } = report.outcome else {
        panic!("not a submit: {:?}", report.outcome);
    };
    let tree: Sig = serde_json::from_value(sig.clone()).expect("tree decodes");
    assert_eq!(serde_json::to_value(&tree).expect("encodes"), sig);
    let created: SubmitAnswer =
        serde_json::from_str(&read("submit_answer_created")).expect("answer");
    assert_eq!(created, SubmitAnswer::Created);
    let refused: SubmitAnswer =
        serde_json::from_str(&read("submit_answer_refused")).expect("answer");
    let SubmitAnswer::Refused(e) = refused else {
        panic!("not a refusal");
    };
    assert!(matches!(
        mageflow::Error::from(e),
        mageflow::Error::UnknownTask { name } if name == "nowhere"
    ));
}

#[test]
fn decode_archive_corpus() {
    let ok = replay("decode_archive", |data| match data {
        [a, b, c, d, events, segment @ ..] => {
            let raw = u64::from(u32::from_le_bytes([*a, *b, *c, *d]));
            let crc = crc32fast::hash(segment);
            let stream = mageflow::WorkflowId::SYSTEM;
            mageflow::store_pg::decode_archive_segment(
                stream,
                u64::from(*events),
                raw,
                crc,
                segment,
            )
            .is_ok()
        }
        _ => false,
    });
    assert!(ok > 0, "no archive seed decoded");
}

/// `MAGEFLOW_BLESS=1 cargo test --test fuzz_corpus` writes the seeds of the snapshot, hot-tier
/// and archive targets from the golden events.
#[test]
fn bless_tier_seeds() {
    use mageflow::core::codec;
    use mageflow::{Event, Workflow, WorkflowId};
    if std::env::var_os("MAGEFLOW_BLESS").is_none() {
        return;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let created = inputs("decode_event")
        .into_iter()
        .find(|(name, _)| name.ends_with("workflow_created.msgpack"))
        .expect("a golden workflow_created event");
    let event: Event = codec::decode(&created.1).expect("golden event decodes");
    // Snapshots: an empty workflow and a created one.
    let mut wf = Workflow::empty(event.stream);
    let empty = wf.to_snapshot().expect("snapshot");
    wf.apply(&event).expect("a created event applies");
    let seeds = [
        ("empty", empty),
        ("created", wf.to_snapshot().expect("snapshot")),
    ];
    for (name, bytes) in seeds {
        std::fs::write(root.join("decode_snapshot").join(name), bytes).expect("write seed");
    }
    // Hot tier: a job key and a report.
    let key = format!("{}#2", wf.sig(0));
    let report = format!(
        r#"{{"key":"{key}","worker":"w1","outcome":{{"failed":{{"message":"boom","retryable":true}}}}}}"#
    );
    std::fs::write(root.join("decode_hot").join("job_key"), &key).expect("write seed");
    std::fs::write(root.join("decode_hot").join("report"), report).expect("write seed");
    // Archive: the created event re-homed to the system stream as seq 1, framed and compressed.
    let mut event = event;
    event.stream = WorkflowId::SYSTEM;
    event.seq = 1;
    let bytes = codec::encode(&event).expect("encode");
    let mut raw = (bytes.len() as u32).to_le_bytes().to_vec();
    raw.extend_from_slice(&bytes);
    let segment = zstd::encode_all(raw.as_slice(), 3).expect("compress");
    let mut seed = (raw.len() as u32).to_le_bytes().to_vec();
    seed.push(1);
    seed.extend_from_slice(&segment);
    std::fs::write(root.join("decode_archive").join("one_event"), &seed).expect("write seed");
    let sled = root.join("decode_sled_archive");
    std::fs::write(sled.join("one_event_wrapped"), &seed).expect("write seed");
    let record = mageflow::store::encode_archive_record(
        1,
        1,
        raw.len() as u64,
        1,
        mageflow::Timestamp::from_micros(0),
        &segment,
    );
    std::fs::write(sled.join("one_event_record"), record).expect("write seed");
}

#[test]
fn decode_report_corpus() {
    let ok = replay("decode_report", mageflow::auth::fuzz_report);
    assert!(ok > 0, "no report seed parsed");
}

#[test]
fn decode_command_corpus() {
    let ok = replay("decode_command", mageflow::auth::fuzz_command);
    assert!(ok > 0, "no command seed parsed");
}

#[test]
fn decode_job_corpus() {
    let ok = replay("decode_job", |b| {
        let Ok(s) = std::str::from_utf8(b) else {
            return false;
        };
        let mut parts = s.splitn(3, '\0');
        let mut next = || parts.next().unwrap_or_default();
        let (member, job, lease) = (next(), next(), next());
        mageflow::hot::Job::parse(member, job, lease).is_ok()
    });
    assert!(ok > 0, "no job seed parsed");
}

#[test]
fn parse_definition_corpus() {
    let mut registry = mageflow::Registry::new();
    mageflow::engine::builtin::register(&mut registry);
    let accepted = replay("parse_definition", |bytes| {
        // A line of an items file is read by the same format (never a panic either).
        let _ = mageflow::definition::parse_node(bytes).map(|sig| sig.validate(&registry));
        mageflow::definition::parse(bytes).is_ok_and(|(sig, _)| sig.validate(&registry).is_ok())
    });
    // The seed corpus holds valid documents (a graph with a gate and a swarm, a chain with
    // every callback): they must parse and validate.
    assert!(
        accepted >= 2,
        "only {accepted} corpus documents were accepted"
    );
}
