//! Workflow definition documents (`mageflow submit FILE.json`, later the HTTP API and the UI):
//! a typed error naming the JSON path, never a panic, and what parses validates without one.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok((sig, _input)) = mageflow_engine::definition::parse(data) {
        let mut registry = mageflow_engine::Registry::new();
        mageflow_engine::builtin::register(&mut registry);
        let _ = sig.validate(&registry);
    }
});
