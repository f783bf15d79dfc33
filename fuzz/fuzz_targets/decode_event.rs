//! Event codec on arbitrary bytes: must return a value or a typed error, never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mageflow_core::codec::decode(data);
});
