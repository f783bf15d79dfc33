//! # Mageflow
//!
//! Event-sourced task orchestration. Register async handlers, compose them into signatures,
//! chains and swarms (nested freely, with success and error callbacks), run them, and control
//! them at runtime — suspend, resume, interrupt, cancel. Every transition is an event in a
//! durable log; state is a fold of that log.
//!
//! ```no_run
//! use mageflow::{chain, sign, Config, Registry, TaskFailure};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Add { x: i64, #[serde(default)] mageflow_results: i64 }
//!
//! # async fn demo() -> Result<(), mageflow::Error> {
//! let mut tasks = Registry::new();
//! tasks.task("add", |i: Add, _ctx| async move { Ok::<_, TaskFailure>(i.x + i.mageflow_results) });
//! let engine = mageflow::open_embedded("/tmp/mageflow-data", tasks, Config::default()).await?;
//! let h = engine.handle();
//! let wf = h.submit(chain([sign("add").kwarg("x", 1), sign("add").kwarg("x", 2)]), serde_json::json!({})).await?;
//! let done = h.wait(wf).await?;
//! assert_eq!(done.nodes[0].status, mageflow::Status::Done);
//! engine.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## Features
//!
//! The heavy backends are Cargo features, all on by default: `sled` (the embedded log,
//! `open_embedded`), `postgres` (the PostgreSQL log: `open_postgres`, `store_pg`), `redis` (the
//! Redis hot tier, `hot`) and `cluster` (the PostgreSQL + Redis deployment, `cluster` and
//! `auth`; it turns on `postgres` and `redis`). An embedded-only user writes
//! `mageflow = { version = "…", default-features = false, features = ["sled"] }` and compiles
//! neither sqlx nor redis; with no features only the in-memory log ([`open_in_memory`],
//! [`testing`]) is there.

// Each module's own `//!` paragraph is its documentation.
pub mod control;
pub mod testing;

// The PostgreSQL + Redis deployment and its report intake's authentication, at the paths they
// had when they were modules of this package.
#[cfg(feature = "cluster")]
pub use mageflow_cluster as cluster;
#[cfg(feature = "cluster")]
pub use mageflow_cluster::auth;
pub use mageflow_core as core;
pub use mageflow_engine as engine;
#[cfg(feature = "redis")]
pub use mageflow_hot as hot;
pub use mageflow_store as store;
#[cfg(feature = "postgres")]
pub use mageflow_store_pg as store_pg;

// The state a user reads back (`Handle::workflow`, `wait`, `history`): a workflow, its nodes
// with their spec, status and outcome, and the events of its log.
pub use mageflow_core::condition::{Condition, Predicate};
pub use mageflow_core::model::{GraphProgress, SwarmProgress};
pub use mageflow_core::{
    Actor, Edge, EdgeDecision, Event, Join, KindSpec, Link, Message, Node, NodeIndex, NodeSpec,
    Outcome, Payload, Priority, Rejection, RetryPolicy, Role, SignatureId, Status, SwarmConfig,
    TaskError, Timestamp, Workflow, WorkflowId, PRIORITY_MAX, PRIORITY_MIN,
};
pub use mageflow_engine::{
    chain, gate, graph, sign, swarm, AutoResume, BulkOptions, BulkPhase, BulkProgress,
    BulkRejection, BulkReport, ChainSig, Config, Dispatch, Engine, Error, GateSig, GraphSig,
    Handle, RecoveryReport, Registry, Result, Sig, Stats, StoredResumeReport, Submitted, SwarmSig,
    TaskContext, TaskDef, TaskFailure, TaskSig, Until,
};
pub use mageflow_engine::{definition, templates};

#[cfg(feature = "sled")]
use std::path::Path;
use std::sync::Arc;

/// Start an engine on the embedded sled store in `path` (created if missing), with durable
/// (flush-per-group) appends. Unfinished work found there is resumed.
#[cfg(feature = "sled")]
pub async fn open_embedded(
    path: impl AsRef<Path>,
    registry: Registry,
    config: Config,
) -> Result<Engine> {
    let log = mageflow_store::SledLog::open(path, mageflow_store::SledOptions::default())?;
    Engine::start(Arc::new(log), registry, config).await
}

/// Start an engine on the PostgreSQL log at `url` (tables created or migrated on open, in
/// `options.schema` if given). Several processes can share the log; unfinished work found there
/// is resumed. Fails naming the URL (password hidden) and the cause when PostgreSQL cannot be
/// reached.
#[cfg(feature = "postgres")]
pub async fn open_postgres(
    url: &str,
    options: mageflow_store_pg::PgOptions,
    registry: Registry,
    config: Config,
) -> Result<Engine> {
    let log = mageflow_store_pg::PgLog::open(url, options).await?;
    Engine::start(Arc::new(log), registry, config).await
}

/// Start an engine on an in-memory log (nothing survives the process).
pub async fn open_in_memory(registry: Registry, config: Config) -> Result<Engine> {
    Engine::start(Arc::new(mageflow_store::MemoryLog::new()), registry, config).await
}
