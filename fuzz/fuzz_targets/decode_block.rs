//! Stored event blocks (checksum, count, entries) on arbitrary bytes: typed error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mageflow_store::decode_block(1, data);
});
