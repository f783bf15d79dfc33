//! Workflow and signature ids typed by users (CLI, API): typed error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<mageflow_core::WorkflowId>();
        let _ = s.parse::<mageflow_core::SignatureId>();
    }
});
