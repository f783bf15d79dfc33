//! A worker's report as the orchestrator's intake reads it from the reports stream: the JSON
//! (before the first newline) and its MAC (after it), through the intake's whole decision —
//! parse, signature with the worker secret, lease check — with and without a secret. Typed
//! error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mageflow::auth::fuzz_report(data);
});
