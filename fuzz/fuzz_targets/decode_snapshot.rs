//! Workflow snapshots read back from PostgreSQL's archive: typed error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = mageflow_core::Workflow::from_snapshot(data);
});
