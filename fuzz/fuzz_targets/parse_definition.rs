//! Workflow definition documents (`mageflow submit FILE.json`, `POST /api/v1/workflows`) and
//! single signatures (a line of `mageflow swarm add`'s items file): a typed error naming the
//! JSON path, never a panic, and what parses validates without one.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut registry = mageflow_engine::Registry::new();
    mageflow_engine::builtin::register(&mut registry);
    if let Ok((sig, _input)) = mageflow_engine::definition::parse(data) {
        let _ = sig.validate(&registry);
    }
    if let Ok(sig) = mageflow_engine::definition::parse_node(data) {
        let _ = sig.validate(&registry);
    }
});
