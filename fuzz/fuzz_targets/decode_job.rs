//! A claimed job as a worker reads it from the claim's reply: job key, job data (JSON) and
//! lease token, separated by NUL bytes. Typed error, never a panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let mut parts = s.splitn(3, '\0');
        let (member, job, lease) = (
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
            parts.next().unwrap_or_default(),
        );
        let _ = mageflow_hot::Job::parse(member, job, lease);
    }
});
