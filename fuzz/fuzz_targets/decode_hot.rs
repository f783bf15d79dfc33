//! What workers and the orchestrator read back from Redis: job keys and reports (JSON). Typed
//! error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<mageflow_hot::JobKey>();
        let _ = serde_json::from_str::<mageflow_hot::Report>(s);
    }
});
