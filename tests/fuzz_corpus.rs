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
