//! Test harness: every scenario is an `async fn(Store) -> Result<()>`, instantiated once per
//! backend by [`all_stores!`]; helpers read the event log the way a user would (through
//! `Handle::history`) and synchronise with handlers through channels and semaphores, never sleeps.

use anyhow::{anyhow, bail, Context as _, Result};
use mageflow::core::Node;
use mageflow::core::NodeIndex;
use mageflow::engine::RecoveryReport;
use mageflow::{Config, Engine, Event, Handle, Registry, TaskFailure, Workflow, WorkflowId};
use serde_json::Value;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};

/// Longest a scenario may run before it is reported as hung. A guard against deadlocks only:
/// no scenario waits on time; a passing run takes a small fraction of this.
const SCENARIO_SECS_MAX: u64 = 60;

/// Instantiate each scenario `async fn name(Store) -> anyhow::Result<()>` as a module `name` with
/// one test per backend: `name::memory`, `name::sled` and `name::postgres`.
macro_rules! all_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() -> anyhow::Result<()> {
                crate::support::guard(super::$name(crate::support::Store::Memory)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() -> anyhow::Result<()> {
                crate::support::guard(super::$name(crate::support::Store::Sled)).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() -> anyhow::Result<()> {
                crate::support::guard(super::$name(crate::support::Store::Postgres)).await
            }
        }
    )*};
}

/// Run scenarios once more on the PostgreSQL + Redis deployment, as `on_cluster::name`: the
/// orchestrator on the PostgreSQL log with remote dispatch, the Redis hot tier (projector, job
/// queue, report intake), and the handlers in a worker runtime taking jobs from Redis — in this
/// process, so the scenario's handlers and channels still work.
macro_rules! on_cluster {
    ($($name:ident),* $(,)?) => {
        mod on_cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() -> anyhow::Result<()> {
                    crate::support::guard(super::$name(crate::support::Store::Cluster)).await
                }
            )*
        }
    };
}

/// Which event log backs the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    Memory,
    Sled,
    /// The PostgreSQL log, in a schema of its own per test (dropped afterwards).
    Postgres,
    /// PostgreSQL + Redis with remote dispatch (see [`on_cluster!`]).
    Cluster,
}

const REDIS_URL_ENV: &str = "MAGEFLOW_TEST_REDIS";
const REDIS_URL_DEFAULT: &str = "redis://127.0.0.1:6379";

/// Where one scenario's deployment lives: a PostgreSQL schema and a Redis key prefix of its own.
/// Orchestrators and worker runtimes can be started on it more than once ([`Deployment::start`]:
/// a restart); its Redis keys and its schema are removed when it is dropped.
pub struct Deployment {
    cluster: mageflow::cluster::ClusterConfig,
    /// Starts so far: each worker runtime gets an id of its own, like a new process would.
    starts: std::sync::atomic::AtomicU32,
    /// Declared last: the schema is dropped after the Redis keys are cleared.
    schema: PgSchema,
}

impl Deployment {
    pub fn new() -> Self {
        let schema = PgSchema::new();
        let redis = std::env::var(REDIS_URL_ENV).unwrap_or_else(|_| REDIS_URL_DEFAULT.into());
        let prefix = format!("mf:it:{}:", schema.name);
        let mut cluster = mageflow::cluster::ClusterConfig::new(schema.url.clone(), redis, &prefix);
        cluster.pg.schema = Some(schema.name.clone());
        // Short leases: a job whose handler was abandoned (its worker stopped) runs again soon.
        cluster.hot.lease = Duration::from_secs(2);
        Self {
            cluster,
            starts: Default::default(),
            schema,
        }
    }

    /// Start an orchestrator (projector, report intake) and a worker runtime in this process on
    /// this deployment. `config.workers` is the worker runtime's concurrency; 0 starts no worker
    /// runtime (record-only, as on the log backends: the orchestrator still hands jobs to Redis,
    /// and they wait there for the next start's workers).
    pub async fn start(&self, registry: Registry, config: Config) -> Result<ClusterEnv> {
        let n = self
            .starts
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let worker_config = mageflow::engine::worker::WorkerConfig {
            worker_id: format!("it-worker-{n}"),
            concurrency: config.workers,
            grace: config.grace,
            ..Default::default()
        };
        let records_only = config.workers == 0;
        let cluster =
            mageflow::cluster::open_cluster(self.cluster.clone(), registry.clone(), config)
                .await
                .with_context(|| {
                    format!(
                        "this test needs PostgreSQL at {} and Redis at {} ({REDIS_URL_ENV}); \
                     start Redis with: redis-server --daemonize yes",
                        self.schema.url, self.cluster.hot.url
                    )
                })?;
        let worker = (!records_only).then(|| {
            let stop = tokio_util::sync::CancellationToken::new();
            let hot = self.cluster.hot.clone();
            let token = stop.clone();
            let job = tokio::spawn(async move {
                if let Err(e) =
                    mageflow::cluster::run_worker_process(hot, registry, worker_config, token).await
                {
                    eprintln!("the scenario's worker runtime failed: {e}");
                }
            });
            (stop, job)
        });
        Ok(ClusterEnv { cluster, worker })
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // On a thread of its own with its own runtime: drops run inside the test's runtime.
        let hot = self.cluster.hot.clone();
        let cleared = std::thread::spawn(move || -> Result<u64> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async {
                let hot = mageflow::hot::Hot::connect(hot).await?;
                Ok(hot.clear().await?)
            })
        })
        .join();
        match cleared {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("could not clear the test's Redis keys: {e}"),
            Err(_) => eprintln!("the thread clearing the test's Redis keys panicked"),
        }
    }
}

/// One start on a [`Deployment`]: the orchestrator (engine, projector, report intake) and the
/// worker runtime taking its jobs from Redis, in this process so the scenario's handlers and
/// channels still work.
pub struct ClusterEnv {
    cluster: mageflow::cluster::Cluster,
    worker: Option<(
        tokio_util::sync::CancellationToken,
        tokio::task::JoinHandle<()>,
    )>,
}

impl ClusterEnv {
    fn handle(&self) -> Handle {
        self.cluster.handle()
    }

    fn recovery(&self) -> &RecoveryReport {
        self.cluster.engine().recovery()
    }

    /// Stop the worker runtime, then the orchestrator: the whole deployment goes down, as in a
    /// reboot. The worker gives running handlers `grace`, then abandons them without a report:
    /// their jobs stay in Redis, leased to a worker that is gone, and reappear to the next
    /// start's workers once the lease expires. Redis keeps everything else.
    async fn shutdown(self) {
        if let Some((stop, worker)) = self.worker {
            stop.cancel();
            let _ = worker.await;
        }
        self.cluster.shutdown().await;
    }
}

const POSTGRES_URL_ENV: &str = "MAGEFLOW_TEST_POSTGRES";
const POSTGRES_URL_DEFAULT: &str = "postgres://postgres@127.0.0.1:5432/test";

/// A fresh schema for one scenario's PostgreSQL log, dropped with everything in it on drop.
/// Declared after the engine in every struct holding both, so the engine is dropped first.
pub struct PgSchema {
    pub url: String,
    pub name: String,
}

impl PgSchema {
    pub fn new() -> Self {
        Self {
            url: std::env::var(POSTGRES_URL_ENV).unwrap_or_else(|_| POSTGRES_URL_DEFAULT.into()),
            name: format!("mf_it_{}", uuid::Uuid::now_v7().simple()),
        }
    }

    /// Open the engine on this schema's log; a missing server fails the test saying how to
    /// start one (never a skip).
    pub async fn open(&self, registry: Registry, config: Config) -> Result<Engine> {
        let options = mageflow::store_pg::PgOptions {
            schema: Some(self.name.clone()),
            ..Default::default()
        };
        mageflow::open_postgres(&self.url, options, registry, config)
            .await
            .with_context(|| {
                format!(
                    "this test needs PostgreSQL at {} (set {POSTGRES_URL_ENV} to use another); \
                     start the local one with: pg_ctlcluster --skip-systemctl-redirect \
                     $(ls /etc/postgresql) main start",
                    self.url
                )
            })
    }
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        if let Err(e) = mageflow::store_pg::drop_schema_blocking(&self.url, &self.name) {
            eprintln!("could not drop test schema {}: {e}", self.name);
        }
    }
}

/// Run a scenario, turning a hang into a failure instead of a stuck test binary.
pub async fn guard(scenario: impl Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(SCENARIO_SECS_MAX), scenario)
        .await
        .map_err(|_| anyhow!("scenario did not finish within {SCENARIO_SECS_MAX} s: it hung"))?
}

/// Engine settings for tests: a short grace so shutdowns with a stuck handler stay quick.
pub fn config() -> Config {
    Config {
        grace: Duration::from_millis(200),
        principal: "it".into(),
        ..Config::default()
    }
}

/// Where one scenario's log lives; engines can be started on it more than once (recovery). On
/// [`Store::Cluster`] a start is a new orchestrator and a new worker runtime on the same
/// deployment (same schema, same Redis keys), and a shutdown stops both.
pub struct Backend {
    store: Store,
    dir: tempfile::TempDir,
    memory: Arc<mageflow::store::MemoryLog>,
    /// Only for [`Store::Postgres`].
    schema: Option<PgSchema>,
    /// Only for [`Store::Cluster`].
    deployment: Option<Deployment>,
}

impl Backend {
    pub fn new(store: Store) -> Result<Self> {
        Ok(Self {
            store,
            dir: tempfile::tempdir()?,
            memory: Arc::new(mageflow::store::MemoryLog::new()),
            schema: (store == Store::Postgres).then(PgSchema::new),
            deployment: (store == Store::Cluster).then(Deployment::new),
        })
    }

    /// Start an engine on this backend's log (the same log every time).
    pub async fn start(&self, registry: Registry, config: Config) -> Result<Started> {
        let running = match (self.store, &self.schema, &self.deployment) {
            (Store::Memory, _, _) => {
                Running::Engine(Engine::start(self.memory.clone(), registry, config).await?)
            }
            (Store::Sled, _, _) => {
                Running::Engine(mageflow::open_embedded(self.dir.path(), registry, config).await?)
            }
            (Store::Postgres, Some(schema), _) => {
                Running::Engine(schema.open(registry, config).await?)
            }
            (Store::Cluster, _, Some(deployment)) => {
                Running::Cluster(deployment.start(registry, config).await?)
            }
            (store, _, _) => bail!("no log for {store:?}"),
        };
        Ok(Started(running))
    }
}

/// What [`Backend::start`] started: an engine, or an orchestrator and its worker runtime.
pub struct Started(Running);

impl Started {
    pub fn handle(&self) -> Handle {
        self.0.handle()
    }

    /// What the engine (the orchestrator, on the deployment) recovered from the log.
    pub fn recovery(&self) -> &RecoveryReport {
        match &self.0 {
            Running::Engine(e) => e.recovery(),
            Running::Cluster(c) => c.recovery(),
        }
    }

    pub async fn shutdown(self) {
        self.0.shutdown().await
    }

    /// On the deployment: delete the hot tier's keys (what `FLUSHALL` does to it) and wait
    /// until the projector has started rebuilding it from the log. `false` elsewhere (no hot
    /// tier).
    pub async fn flush_hot(&self) -> Result<bool> {
        let Running::Cluster(c) = &self.0 else {
            return Ok(false);
        };
        let stats = c.cluster.projector_stats().clone();
        let rebuilds = || stats.rebuilds.load(std::sync::atomic::Ordering::SeqCst);
        let before = rebuilds();
        c.cluster.hot().clear().await?;
        while rebuilds() == before {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(true)
    }
}

/// One engine on a fresh log of the given kind, through the public constructors.
pub struct Env {
    engine: Running,
    _dir: Option<tempfile::TempDir>,
    _schema: Option<PgSchema>,
    _deployment: Option<Deployment>,
}

enum Running {
    Engine(Engine),
    Cluster(ClusterEnv),
}

impl Running {
    fn handle(&self) -> Handle {
        match self {
            Running::Engine(e) => e.handle(),
            Running::Cluster(c) => c.handle(),
        }
    }

    async fn shutdown(self) {
        match self {
            Running::Engine(e) => e.shutdown().await,
            Running::Cluster(c) => c.shutdown().await,
        }
    }
}

impl Env {
    pub async fn start(store: Store, registry: Registry) -> Result<Self> {
        Self::with_config(store, registry, config()).await
    }

    pub async fn with_config(store: Store, registry: Registry, config: Config) -> Result<Self> {
        Ok(match store {
            Store::Memory => Self {
                engine: Running::Engine(mageflow::open_in_memory(registry, config).await?),
                _dir: None,
                _schema: None,
                _deployment: None,
            },
            Store::Sled => {
                let dir = tempfile::tempdir()?;
                Self {
                    engine: Running::Engine(
                        mageflow::open_embedded(dir.path(), registry, config).await?,
                    ),
                    _dir: Some(dir),
                    _schema: None,
                    _deployment: None,
                }
            }
            Store::Postgres => {
                let schema = PgSchema::new();
                Self {
                    engine: Running::Engine(schema.open(registry, config).await?),
                    _dir: None,
                    _schema: Some(schema),
                    _deployment: None,
                }
            }
            Store::Cluster => {
                let deployment = Deployment::new();
                Self {
                    engine: Running::Cluster(deployment.start(registry, config).await?),
                    _dir: None,
                    _schema: None,
                    _deployment: Some(deployment),
                }
            }
        })
    }

    pub fn handle(&self) -> Handle {
        self.engine.handle()
    }

    pub async fn shutdown(self) {
        self.engine.shutdown().await
    }
}

/// A gate handlers pass through one at a time as the test hands out permits.
pub struct Gate(Semaphore);

impl Gate {
    pub fn new() -> Arc<Self> {
        Arc::new(Self(Semaphore::new(0)))
    }

    /// Wait for a permit (consumed).
    pub async fn pass(&self) -> Result<(), TaskFailure> {
        self.0
            .acquire()
            .await
            .map_err(|e| TaskFailure::fatal(e.to_string()))?
            .forget();
        Ok(())
    }

    /// Let `n` more handlers through.
    pub fn open(&self, n: usize) {
        self.0.add_permits(n);
    }
}

/// Receive the next message a handler sent, failing if every sender is gone.
pub async fn next<T>(rx: &mut mpsc::UnboundedReceiver<T>) -> Result<T> {
    rx.recv().await.context("every handler-side sender is gone")
}

/// Assert that no handler sent anything (yet).
pub fn assert_silent<T: std::fmt::Debug>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) {
    if let Ok(m) = rx.try_recv() {
        panic!("{what}: expected nothing, got {m:?}");
    }
}

/// Wait, without polling on a timer, until the durable state of `wf` satisfies `pred`: re-check
/// after every append to the log.
pub async fn wait_until(
    h: &Handle,
    wf: WorkflowId,
    pred: impl Fn(&Workflow) -> bool,
) -> Result<Workflow> {
    let mut head = h.log().subscribe();
    loop {
        let state = h.workflow(wf).await?;
        if pred(&state) {
            return Ok(state);
        }
        head.changed().await.context("the log was closed")?;
    }
}

/// Index of the single node matching `pred`.
pub fn find(wf: &Workflow, what: &str, pred: impl Fn(&Node) -> bool) -> Result<NodeIndex> {
    let hits: Vec<usize> = wf
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| pred(n))
        .map(|(i, _)| i)
        .collect();
    match hits.as_slice() {
        [one] => Ok(*one as NodeIndex),
        _ => bail!("expected exactly one node for {what}, found {hits:?}"),
    }
}

/// Index of the single task node running `task`.
pub fn task(wf: &Workflow, task: &str) -> Result<NodeIndex> {
    find(wf, task, |n| n.spec.task_name() == Some(task))
}

/// Index of the single task node running `task` with kwarg `key` bound to `value`.
pub fn task_with(wf: &Workflow, task: &str, key: &str, value: Value) -> Result<NodeIndex> {
    find(wf, &format!("{task} with {key}={value}"), |n| {
        n.spec.task_name() == Some(task) && n.spec.kwargs.get(key) == Some(&value)
    })
}

/// Kinds of the events about `node`, in log order.
pub fn kinds(history: &[Event], node: NodeIndex) -> Vec<&'static str> {
    history
        .iter()
        .filter(|e| e.payload.node() == Some(node))
        .map(|e| e.payload.kind())
        .collect()
}

/// How many events of `kind` are about `node`.
pub fn count(history: &[Event], node: NodeIndex, kind: &str) -> usize {
    kinds(history, node).iter().filter(|k| **k == kind).count()
}

/// Position in `history` of the only event of `kind` about `node`.
pub fn only(history: &[Event], node: NodeIndex, kind: &str) -> Result<usize> {
    let hits: Vec<usize> = history
        .iter()
        .enumerate()
        .filter(|(_, e)| e.payload.node() == Some(node) && e.payload.kind() == kind)
        .map(|(i, _)| i)
        .collect();
    match hits.as_slice() {
        [one] => Ok(*one),
        _ => bail!("expected one {kind} event for node {node}, found them at {hits:?}"),
    }
}

/// Every task node that finished `done` has exactly one `succeeded` event; no node has two.
pub fn assert_one_success_each(history: &[Event], wf: &Workflow) {
    for (i, n) in wf.nodes.iter().enumerate() {
        let succeeded = count(history, i as NodeIndex, "succeeded");
        let want = usize::from(n.status == mageflow::Status::Done);
        assert_eq!(
            succeeded, want,
            "node {i} ({}) is {} and has {succeeded} succeeded events",
            n.spec.name, n.status
        );
    }
}
