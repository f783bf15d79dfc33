//! Event codec hot path: encode then decode one typical event (a task queued with its input).
//! Run: `cargo bench --bench codec`; CI smoke run: `cargo bench --bench codec -- --test`.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use mageflow::core::model::Message;
use mageflow::core::{codec, Actor, Event, Payload, Timestamp, WorkflowId, SCHEMA_VERSION};
use serde_json::json;

/// A task queued with a small kwargs-style input of about 100 bytes.
fn typical_event() -> Event {
    Event {
        stream: WorkflowId::from_u128(0x0190_e4a1_7c2b_7d3e_8f10_2233_4455_6677),
        seq: 42,
        at: Timestamp::from_micros(1_795_679_904_000_123),
        actor: Actor::worker("worker-7"),
        schema: SCHEMA_VERSION,
        payload: Payload::Queued {
            node: 17,
            message: Message::input(json!({
                "user_id": 1_234_567,
                "email": "someone@example.com",
                "plan": "pro",
                "retries": 3,
                "note": "resize the uploaded avatar to 256px",
            })),
            parked: false,
        },
    }
}

fn codec_bench(c: &mut Criterion) {
    let event = typical_event();
    let encoded = codec::encode(&event).expect("encode");
    let mut group = c.benchmark_group("codec");
    group.throughput(Throughput::Elements(1));
    group.bench_function(format!("encode_decode_{}B", encoded.len()), |b| {
        let mut buf = Vec::with_capacity(512);
        b.iter(|| {
            buf.clear();
            codec::encode_into(black_box(&event), &mut buf).expect("encode");
            codec::decode(black_box(&buf)).expect("decode")
        })
    });
    group.bench_function("encode", |b| {
        let mut buf = Vec::with_capacity(512);
        b.iter(|| {
            buf.clear();
            codec::encode_into(black_box(&event), &mut buf).expect("encode");
        })
    });
    group.bench_function("decode", |b| {
        b.iter(|| codec::decode(black_box(&encoded)).expect("decode"))
    });
    group.finish();
}

criterion_group!(benches, codec_bench);
criterion_main!(benches);
