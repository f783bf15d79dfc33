//! Minimal reproductions of the engine bugs in BUGS.md that the simulator found, kept as
//! regression tests of their fixes.

use mageflow_core::{Payload, SignatureId, WorkflowId};
use mageflow_engine::{sign, Config, Dispatch, Engine, TaskFailure};
use mageflow_store::{AppendRequest, BoxFuture, EventLog, MemoryLog, Recorded, Result};
use serde_json::json;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A memory log whose `fail_at`-th append (1-based) fails with a storage error, writing nothing.
struct FailOne {
    log: MemoryLog,
    calls: AtomicU64,
    fail_at: u64,
}

impl EventLog for FailOne {
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'static, Result<Vec<u64>>> {
        if self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.fail_at {
            return Box::pin(async { Err(mageflow_store::Error::Storage("injected".into())) });
        }
        self.log.append(requests)
    }
    fn read_stream(&self, s: WorkflowId, from: u64) -> Result<Vec<mageflow_core::Event>> {
        self.log.read_stream(s, from)
    }
    fn read_all(&self, from: u64, limit: usize) -> Result<Vec<Recorded>> {
        self.log.read_all(from, limit)
    }
    fn stream_version(&self, s: WorkflowId) -> Result<u64> {
        self.log.stream_version(s)
    }
    fn head(&self) -> u64 {
        self.log.head()
    }
    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.log.subscribe()
    }
}

fn config() -> Config {
    Config {
        dispatch: Dispatch::Remote { window: 1 },
        compact_after: None,
        compact_history: None,
        ..Config::default()
    }
}

fn kinds(log: &dyn EventLog, wf: WorkflowId) -> Vec<&'static str> {
    log.read_stream(wf, 1)
        .unwrap_or_default()
        .iter()
        .map(|e| e.payload.kind())
        .collect()
}

/// BUGS.md #3: the `started` event of a failed append was never decided again. Window 1: A
/// runs; B is created and waits for the slot; A's report frees it, and the batch holding A's
/// success and B's start fails. The report is sent again (as the intake does after a failed
/// append): A finishes, and B starts without anything else touching its workflow.
#[tokio::test(start_paused = true)]
async fn bug3_a_start_lost_in_a_failed_append_is_retried() {
    let log = Arc::new(FailOne {
        log: MemoryLog::new(),
        calls: AtomicU64::new(0),
        fail_at: 3,
    });
    let engine = Engine::start(log.clone(), mageflow_sim::tasks::registry(), config())
        .await
        .expect("starts");
    let h = engine.handle();
    let (a, b) = (
        WorkflowId::from_u128(7 | (1 << 63)),
        WorkflowId::from_u128(9 | (1 << 63)),
    );
    for wf in [a, b] {
        h.submit_idempotent(wf, sign("sim_ok").into(), json!({ "ms": 1 }))
            .await
            .expect("submitted");
    }
    let done = || h.report(SignatureId::root(a), 1, Ok(json!(null)));
    done().await.expect("queued"); // its batch (A succeeded + B started) fails
    tokio::time::sleep(Duration::from_millis(10)).await;
    done().await.expect("queued"); // read again by the intake
    tokio::time::sleep(Duration::from_secs(600)).await;
    let (ka, kb) = (kinds(&*log, a), kinds(&*log, b));
    assert!(
        ka.contains(&"succeeded") && kb.contains(&"started"),
        "BUGS.md #3: B's lost start was not retried: A {ka:?}, B {kb:?}"
    );
    engine.shutdown().await;
}

/// BUGS.md #2: a checkpoint of an attempt that already ended answered Ok and wrote nothing; it
/// is refused now (`stale_attempt`), so a worker is never told it is durable.
#[tokio::test(start_paused = true)]
async fn bug2_a_stale_checkpoint_is_refused() {
    let log = Arc::new(MemoryLog::new());
    let engine = Engine::start(log.clone(), mageflow_sim::tasks::registry(), config())
        .await
        .expect("starts");
    let h = engine.handle();
    let wf = WorkflowId::from_u128(8 | (1 << 63));
    h.submit_idempotent(wf, sign("sim_ok").retries(1, 0).into(), json!({ "ms": 1 }))
        .await
        .expect("submitted");
    tokio::time::sleep(Duration::from_millis(10)).await;
    let sig = SignatureId::root(wf);
    h.report(sig, 1, Err(TaskFailure::retryable("boom")))
        .await
        .expect("queued");
    let _ = h.workflow(wf).await; // a barrier: the report is durable
    let answer = h.checkpoint(sig, 1, json!(1)).await;
    let written = log
        .read_stream(wf, 1)
        .expect("reads")
        .iter()
        .any(|e| matches!(e.payload, Payload::Checkpointed { attempt: 1, .. }));
    assert!(!written, "{:?}", kinds(&*log, wf));
    assert_eq!(
        answer.map_err(|e| e.code()),
        Err("stale_attempt"),
        "BUGS.md #2: a stale checkpoint must be refused"
    );
    engine.shutdown().await;
}
