//! Archive segments read back from PostgreSQL. Input: raw size (u32 LE), event count (u8), then
//! the segment; the checksum is computed here so the fuzzer reaches decompression, framing and
//! event decoding. Typed error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let [a, b, c, d, events, segment @ ..] = data {
        let raw = u64::from(u32::from_le_bytes([*a, *b, *c, *d]));
        let crc = crc32fast::hash(segment);
        let stream = mageflow_core::WorkflowId::SYSTEM;
        let _ = mageflow_store_pg::decode_archive_segment(stream, u64::from(*events), raw, crc, segment);
    }
});
