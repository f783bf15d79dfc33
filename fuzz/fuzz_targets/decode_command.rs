//! An operator's command as the orchestrator's intake reads it from the reports stream: the
//! JSON and its MAC, through parse, the operator's token and role, the principal's validity,
//! the deadline and the nonce. Typed error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    mageflow::auth::fuzz_command(data);
});
