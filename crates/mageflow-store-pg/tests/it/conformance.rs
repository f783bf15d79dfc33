//! The conformance suite every `EventLog` backend runs (`mageflow_store::conformance`), and the
//! script every backend must answer exactly like the in-memory reference.

use crate::TestSchema;
use mageflow_store::conformance::{agrees_with_memory, compaction_suite, run_suite};
use mageflow_store::EventLog;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pg_log_conforms() {
    let schema = TestSchema::new().await;
    let log = Arc::new(schema.open().await);
    run_suite(log.clone()).await;
    assert_eq!(log.verify().expect("verify"), log.head());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_log_agrees_with_memory_on_a_script() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    agrees_with_memory(&log).await;
    assert_eq!(log.verify().expect("verify"), log.head());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_log_passes_the_compaction_suite() {
    let schema = TestSchema::new().await;
    let log = schema.open().await;
    assert!(compaction_suite(&log).await);
    assert_eq!(log.verify().expect("verify"), log.head());
}
