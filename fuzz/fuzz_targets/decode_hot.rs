//! What workers and the orchestrator read back from Redis: job keys, reports (JSON), the
//! signature tree inside a worker's submit report, and the answer to a submit. Typed error,
//! never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<mageflow_hot::JobKey>();
        if let Ok(mageflow_hot::Report {
            outcome: mageflow_hot::ReportOutcome::Submit { sig, .. },
            ..
        }) = serde_json::from_str::<mageflow_hot::Report>(s)
        {
            // What the orchestrator's intake does with it before submitting.
            if let Ok(tree) = serde_json::from_value::<mageflow_engine::Sig>(sig) {
                let _ = tree.validate(&mageflow_engine::Registry::new());
            }
        }
        if let Ok(answer) = serde_json::from_str::<mageflow_engine::SubmitAnswer>(s) {
            if let mageflow_engine::SubmitAnswer::Refused(e) = answer {
                let _ = mageflow_engine::Error::from(e);
            }
        }
    }
});
