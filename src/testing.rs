//! Test support for users' own code: an in-memory engine that records what was dispatched, with
//! assertions in the spirit of the Python original's testing plugin. What was dispatched is read
//! from the event log itself (`queued` and `container_started` events), so the record is exactly
//! what the engine did.
//!
//! ```no_run
//! # async fn t(tasks: mageflow::Registry) {
//! use mageflow::testing::TestEngine;
//! let t = TestEngine::record_only(tasks).await;   // nothing runs; dispatches are recorded
//! t.handle().submit(mageflow::sign("email").kwarg("to", "a@b"), serde_json::json!({})).await.unwrap();
//! t.assert_task_dispatched("email", &serde_json::json!({"to": "a@b"}), false);
//! # }
//! ```

use mageflow_core::{KindSpec, Payload, SignatureId, Workflow, WorkflowId};
use mageflow_engine::{Config, Engine, Handle, Registry};
use mageflow_store::{EventLog, MemoryLog};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One recorded dispatch.
#[derive(Clone, Debug, PartialEq)]
pub enum Dispatch {
    /// A task was queued to run with this input (message and kwargs merged).
    Task {
        sig: SignatureId,
        task: String,
        input: Value,
    },
    /// A chain started; `tasks` are the task names of its direct steps (containers by name).
    Chain {
        sig: SignatureId,
        name: String,
        tasks: Vec<String>,
    },
    /// A swarm started; `tasks` are its items' task names at that time.
    Swarm {
        sig: SignatureId,
        name: String,
        tasks: Vec<String>,
    },
}

/// An in-memory engine for tests.
pub struct TestEngine {
    engine: Engine,
    log: Arc<MemoryLog>,
    since: AtomicU64,
}

impl TestEngine {
    /// Handlers run locally, as in production (64 worker slots).
    pub async fn new(registry: Registry) -> Self {
        Self::with_workers(registry, 64).await
    }

    /// Nothing runs: tasks stay queued, dispatches are only recorded.
    pub async fn record_only(registry: Registry) -> Self {
        Self::with_workers(registry, 0).await
    }

    async fn with_workers(registry: Registry, workers: usize) -> Self {
        let log = Arc::new(MemoryLog::new());
        let config = Config {
            workers,
            principal: "test".into(),
            ..Config::default()
        };
        // Starting on an empty in-memory log cannot fail: there is nothing to recover.
        let engine = match Engine::start(log.clone(), registry, config).await {
            Ok(e) => e,
            Err(e) => panic!("starting a test engine on an empty log failed: {e}"),
        };
        Self {
            engine,
            log,
            since: AtomicU64::new(0),
        }
    }

    /// A handle to the engine, to submit and control workflows.
    pub fn handle(&self) -> Handle {
        self.engine.handle()
    }

    /// The in-memory log the engine writes (what the assertions read).
    pub fn log(&self) -> &Arc<MemoryLog> {
        &self.log
    }

    /// Forget what was recorded so far.
    pub fn clear(&self) {
        self.since.store(self.log.head(), Ordering::Relaxed);
    }

    /// Everything dispatched since the start (or the last `clear`), in log order.
    pub fn dispatched(&self) -> Vec<Dispatch> {
        let since = self.since.load(Ordering::Relaxed);
        let mut states: HashMap<WorkflowId, Workflow> = HashMap::new();
        let mut out = Vec::new();
        let events = self.log.read_all(1, usize::MAX).unwrap_or_default();
        for rec in events {
            let wf = states
                .entry(rec.event.stream)
                .or_insert_with(|| Workflow::empty(rec.event.stream));
            if wf.apply(&rec.event).is_err() || rec.position <= since {
                continue;
            }
            let name_of = |wf: &Workflow, i: u32| {
                let n = &wf.nodes[i as usize];
                n.spec.task_name().unwrap_or(&n.spec.name).to_owned()
            };
            match &rec.event.payload {
                Payload::Queued { node, .. } => out.push(Dispatch::Task {
                    sig: wf.sig(*node),
                    task: name_of(wf, *node),
                    input: wf.effective_input(*node),
                }),
                Payload::ContainerStarted { node, .. } => {
                    let n = &wf.nodes[*node as usize];
                    let tasks = n.spec.children().iter().map(|&c| name_of(wf, c)).collect();
                    let (sig, name) = (wf.sig(*node), n.spec.name.clone());
                    out.push(match n.spec.kind {
                        KindSpec::Chain { .. } => Dispatch::Chain { sig, name, tasks },
                        _ => Dispatch::Swarm { sig, name, tasks },
                    });
                }
                _ => {}
            }
        }
        out
    }

    /// Assert a task was dispatched whose input matches `expected`: every key of `expected`
    /// present with an equal value (`exact == false`), or the whole input equal (`exact`).
    pub fn assert_task_dispatched(&self, task: &str, expected: &Value, exact: bool) {
        let inputs: Vec<Value> = self
            .dispatched()
            .into_iter()
            .filter_map(|d| match d {
                Dispatch::Task { task: t, input, .. } if t == task => Some(input),
                _ => None,
            })
            .collect();
        let hit = inputs.iter().any(|i| {
            if exact {
                i == expected
            } else {
                partial_match(i, expected)
            }
        });
        assert!(
            hit,
            "task {task:?} was not dispatched with input {} {expected}; dispatched inputs: {inputs:?}",
            if exact { "equal to" } else { "matching" }
        );
    }

    /// Assert a chain was dispatched whose steps include `tasks` (by task name).
    pub fn assert_chain_dispatched(&self, tasks: &[&str]) {
        self.assert_container(tasks, true)
    }

    /// Assert a swarm was dispatched whose items include `tasks` (by task name).
    pub fn assert_swarm_dispatched(&self, tasks: &[&str]) {
        self.assert_container(tasks, false)
    }

    fn assert_container(&self, want: &[&str], chain: bool) {
        let all = self.dispatched();
        let hit = all.iter().any(|d| match d {
            Dispatch::Chain { tasks, .. } if chain => {
                want.iter().all(|w| tasks.iter().any(|t| t == w))
            }
            Dispatch::Swarm { tasks, .. } if !chain => {
                want.iter().all(|w| tasks.iter().any(|t| t == w))
            }
            _ => false,
        });
        let kind = if chain { "chain" } else { "swarm" };
        assert!(
            hit,
            "no {kind} with tasks {want:?} was dispatched; dispatched: {all:?}"
        );
    }

    /// Assert nothing was dispatched since the start (or the last `clear`).
    pub fn assert_nothing_dispatched(&self) {
        let all = self.dispatched();
        assert!(all.is_empty(), "expected no dispatch, got {all:?}");
    }

    /// Stop the engine ([`Engine::shutdown`]).
    pub async fn shutdown(self) {
        self.engine.shutdown().await
    }
}

/// Every key of `expected` is in `actual` with a matching value (recursively for objects).
fn partial_match(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, v)| a.get(k).is_some_and(|av| partial_match(av, v))),
        (a, e) => a == e,
    }
}
