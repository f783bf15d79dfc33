//! Archive records read back from the embedded sled log. The input is used twice: as a whole
//! stored record (header checksum, header fields, segment), and — in the `decode_archive`
//! layout, raw size (u32 LE), event count (u8), then the segment — wrapped in a record with
//! valid checksums, so the fuzzer reaches decompression, framing and event decoding. Typed
//! error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let stream = mageflow_core::WorkflowId::SYSTEM;
    let _ = mageflow_store::decode_archive_record(stream, 1, data);
    if let [a, b, c, d, events, segment @ ..] = data {
        let raw = u64::from(u32::from_le_bytes([*a, *b, *c, *d]));
        let at = mageflow_core::Timestamp::from_micros(0);
        let record = mageflow_store::encode_archive_record(1, u64::from(*events), raw, 0, at, segment);
        let _ = mageflow_store::decode_archive_record(stream, 1, &record);
    }
});
