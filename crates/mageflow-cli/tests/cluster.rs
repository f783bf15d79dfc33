//! The PostgreSQL + Redis deployment, for real: this test process is the orchestrator
//! (`mageflow::cluster::open_cluster`), the workers are `mageflow worker` processes of the built
//! binary, and the faults are real — `kill -9` of a worker, every Redis key of the deployment
//! deleted (what `FLUSHALL` does to it), PostgreSQL connections terminated with
//! `pg_terminate_backend`, a Redis server and a PostgreSQL server of the test's own killed and
//! restarted. Each test has its own schema and key prefix and removes both.
//!
//! Needs PostgreSQL (`MAGEFLOW_TEST_POSTGRES`, default postgres://postgres@127.0.0.1:5432/test)
//! and Redis (`MAGEFLOW_TEST_REDIS`, default redis://127.0.0.1:6379); fails saying so if either
//! is missing.

use anyhow::{bail, Context, Result};
use mageflow::cluster::{open_cluster, Cluster, ClusterConfig};
use mageflow::store_pg::PgOptions;
use mageflow::{sign, swarm, Config, Event, Priority, Registry, Status, Workflow, WorkflowId};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A guard against a hang, not a timing assertion.
const RUN_SECS_MAX: u64 = 300;
/// Lease of a claimed job: how soon a killed worker's jobs run elsewhere.
const LEASE_MS: u64 = 1_000;

fn postgres_url() -> String {
    std::env::var("MAGEFLOW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn redis_url() -> String {
    std::env::var("MAGEFLOW_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// One deployment: a schema, a key prefix, an orchestrator, worker processes.
struct Deployment {
    cluster: Option<Cluster>,
    config: ClusterConfig,
    workers: Vec<Child>,
    schema: String,
    prefix: String,
    postgres: String,
    redis: String,
    /// The deployment's worker secret, if it has one (the worker processes get it too).
    worker_secret: Option<String>,
}

impl Deployment {
    async fn start() -> Result<Self> {
        Self::start_on(postgres_url(), redis_url()).await
    }

    async fn start_on(postgres: String, redis: String) -> Result<Self> {
        let mut d = Self::unopened(postgres, redis);
        d.cluster = Some(Self::open(&d.config).await?);
        Ok(d)
    }

    /// A deployment's schema, prefix and configuration, no orchestrator yet.
    fn unopened(postgres: String, redis: String) -> Self {
        // The orchestrator's own log lines (retries, rebuilds) show up in a failing test's output.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_env("MAGEFLOW_LOG")
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
            )
            .with_test_writer()
            .try_init();
        let id = uuid::Uuid::now_v7().simple().to_string();
        let schema = format!("mf_cluster_{id}");
        let prefix = format!("mf:test:cluster:{id}:");
        let mut config = ClusterConfig::new(postgres.clone(), redis.clone(), &prefix);
        config.pg = PgOptions {
            schema: Some(schema.clone()),
            ..PgOptions::default()
        };
        config.window = 256;
        Self {
            cluster: None,
            config,
            workers: Vec::new(),
            schema,
            prefix,
            postgres,
            redis,
            worker_secret: None,
        }
    }

    async fn open(config: &ClusterConfig) -> Result<Cluster> {
        let mut registry = Registry::new();
        mageflow::engine::builtin::register(&mut registry);
        let engine_config = Config {
            principal: "cluster-test".into(),
            // Deleted workflows are purged soon after (the purge test waits for it).
            deletion_ttl: Duration::from_millis(300),
            // Compaction is driven by the test that checks it (Handle::compact).
            compact_after: None,
            ..Config::default()
        };
        open_cluster(config.clone(), registry, engine_config)
            .await
            .context(
                "this test needs PostgreSQL and Redis running (see the README: \
                 pg_ctlcluster ... start, redis-server --daemonize yes)",
            )
    }

    /// Stop the orchestrator and start a new one on the same PostgreSQL schema and Redis prefix.
    async fn restart_orchestrator(&mut self) -> Result<()> {
        if let Some(c) = self.cluster.take() {
            c.shutdown().await;
        }
        self.cluster = Some(Self::open(&self.config).await?);
        Ok(())
    }

    fn cluster(&self) -> &Cluster {
        self.cluster.as_ref().expect("the cluster runs until drop")
    }

    fn spawn_worker(&mut self, name: &str) -> Result<()> {
        let child = Command::new(env!("CARGO_BIN_EXE_mageflow"))
            .args([
                "worker",
                "--postgres",
                &self.postgres,
                "--redis",
                &self.redis,
            ])
            .args(["--schema", &self.schema, "--prefix", &self.prefix])
            .args(["--concurrency", "32", "--id", name])
            .args(["--lease-ms", &LEASE_MS.to_string()])
            .env("MAGEFLOW_LOG", "warn")
            .env_remove("MAGEFLOW_WORKER_SECRET")
            .envs(
                self.worker_secret
                    .as_deref()
                    .map(|s| ("MAGEFLOW_WORKER_SECRET", s)),
            )
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start a mageflow worker process")?;
        self.workers.push(child);
        Ok(())
    }

    /// Stop worker `i` with SIGTERM (graceful) and return its closing line of counters.
    fn stop_worker(&mut self, i: usize) -> Result<String> {
        let pid = self.workers[i].id().to_string();
        let status = Command::new("kill").args(["-TERM", &pid]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        let mut out = String::new();
        if let Some(mut stdout) = self.workers[i].stdout.take() {
            use std::io::Read;
            stdout.read_to_string(&mut out)?;
        }
        self.workers[i].wait()?;
        Ok(out)
    }

    /// Wait (re-checking every 50 ms) until `pred` holds for the workflow's durable state.
    async fn wait_for(&self, wf: WorkflowId, pred: impl Fn(&Workflow) -> bool) -> Result<()> {
        let h = self.cluster().handle();
        loop {
            if pred(&h.workflow(wf).await?) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn finish(mut self) -> Result<()> {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Some(c) = self.cluster.take() {
            let hot = c.hot().clone();
            c.shutdown().await;
            hot.clear().await?;
        }
        Ok(())
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Err(e) = mageflow::store_pg::drop_schema_blocking(&self.postgres, &self.schema) {
            eprintln!("could not drop schema {}: {e}", self.schema);
        }
    }
}

fn succeeded(wf: &Workflow) -> usize {
    wf.nodes
        .iter()
        .filter(|n| n.spec.task_name().is_some() && n.status == Status::Done)
        .count()
}

/// Every task of the swarm is done, and has exactly one `succeeded` event in the log.
fn check_once_each(history: &[Event], wf: &Workflow, tasks: usize) -> Result<()> {
    if wf.nodes[0].status != Status::Done {
        bail!("the swarm ended {}", wf.nodes[0].status);
    }
    let mut successes: HashMap<u32, usize> = HashMap::new();
    for e in history {
        if e.payload.kind() == "succeeded" {
            if let Some(n) = e.payload.node() {
                *successes.entry(n).or_default() += 1;
            }
        }
    }
    let items: Vec<u32> = wf.nodes[0].spec.children().to_vec();
    if items.len() != tasks {
        bail!("{} items in the swarm, expected {tasks}", items.len());
    }
    for i in items {
        let n = successes.get(&i).copied().unwrap_or(0);
        if n != 1 || wf.nodes[i as usize].status != Status::Done {
            bail!(
                "task {i} is {} with {n} succeeded events",
                wf.nodes[i as usize].status
            );
        }
    }
    Ok(())
}

async fn submit_swarm(d: &Deployment, tasks: usize, ms: u64) -> Result<WorkflowId> {
    let items: Vec<_> = (0..tasks)
        .map(|i| sign("sleep").kwarg("ms", ms).kwarg("i", i))
        .collect();
    Ok(d.cluster().handle().submit(swarm(items), json!({})).await?)
}

/// A deployment with two worker processes, a swarm of `tasks` one-millisecond sleeps, a quarter
/// of them done: the moment the fault tests strike.
async fn swarm_a_quarter_done(tasks: usize) -> Result<(Deployment, WorkflowId)> {
    let mut d = Deployment::start().await?;
    d.spawn_worker("w1")?;
    d.spawn_worker("w2")?;
    let wf = submit_swarm(&d, tasks, 1).await?;
    d.wait_for(wf, |w| succeeded(w) >= tasks / 4).await?;
    Ok((d, wf))
}

/// A swarm of `tasks` checkpointing handlers (`steps`: five steps of 100 ms, a checkpoint after
/// each, an error as soon as their token fires, no retries): a fault that stops them midway
/// must cost no task, so none may end failed.
async fn submit_steps_swarm(d: &Deployment, tasks: usize) -> Result<WorkflowId> {
    let items: Vec<_> = (0..tasks)
        .map(|i| {
            sign("steps")
                .kwarg("steps", 5)
                .kwarg("ms", 100)
                .kwarg("i", i)
        })
        .collect();
    Ok(d.cluster().handle().submit(swarm(items), json!({})).await?)
}

/// Stop every worker (SIGTERM) and sum what their counters say they abandoned.
fn abandoned_by_workers(d: &mut Deployment) -> Result<u64> {
    let mut abandoned = 0;
    for i in 0..d.workers.len() {
        let counters = d.stop_worker(i)?;
        let n = counters
            .split_whitespace()
            .find_map(|kv| kv.strip_prefix("abandoned="))
            .with_context(|| format!("no abandoned= in the worker's counters: {counters:?}"))?;
        abandoned += n.trim().parse::<u64>()?;
    }
    Ok(abandoned)
}

/// The swarm finishes with every task succeeded exactly once; then the deployment is removed.
async fn finishes_once_each(d: Deployment, wf: WorkflowId, tasks: usize) -> Result<()> {
    let h = d.cluster().handle();
    let done = h.wait(wf).await?;
    check_once_each(&h.history(wf)?, &done, tasks)?;
    d.finish().await
}

async fn guard(f: impl std::future::Future<Output = Result<()>>) -> Result<()> {
    tokio::time::timeout(Duration::from_secs(RUN_SECS_MAX), f)
        .await
        .map_err(|_| anyhow::anyhow!("the run did not finish within {RUN_SECS_MAX} s: it hung"))?
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_midway_loses_no_task_and_none_succeeds_twice() -> Result<()> {
    guard(async {
        const TASKS: usize = 20_000;
        let (mut d, wf) = swarm_a_quarter_done(TASKS).await?;
        // kill -9: its claimed jobs reappear to the other worker once their lease expires.
        d.workers[0].kill()?;
        d.workers[0].wait()?;
        finishes_once_each(d, wf, TASKS).await
    })
    .await
}

/// Per-item callbacks fire once per item even when a worker is killed (`kill -9`) midway and
/// the jobs it held run again on the other: a handler that ran twice reports one outcome that
/// counts, and the item's callback copy is triggered by that outcome alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_item_callbacks_fire_once_each_when_a_worker_is_killed() -> Result<()> {
    guard(async {
        const TASKS: usize = 4_000;
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        d.spawn_worker("w2")?;
        let items: Vec<_> = (0..TASKS)
            .map(|i| sign("sleep").kwarg("ms", 1).kwarg("i", i))
            .collect();
        let h = d.cluster().handle();
        let wf = h
            .submit(swarm(items).on_item_success(sign("noop")), json!({}))
            .await?;
        d.wait_for(wf, |w| succeeded(w) >= TASKS / 4).await?;
        d.workers[0].kill()?;
        d.workers[0].wait()?;
        let done = h.wait(wf).await?;
        assert_eq!(done.nodes[0].status, Status::Done);
        let history = h.history(wf)?;
        let mut queued: HashMap<u32, usize> = HashMap::new();
        for e in &history {
            if let mageflow::Payload::Queued { node, .. } = e.payload {
                *queued.entry(node).or_default() += 1;
            }
        }
        for &item in done.nodes[0].spec.children() {
            let copy = done.nodes[item as usize].spec.on_success[0];
            let fired = queued.get(&copy).copied().unwrap_or(0);
            if fired != 1 || done.nodes[copy as usize].status != Status::Done {
                bail!(
                    "item {item}'s callback fired {fired} times and is {}",
                    done.nodes[copy as usize].status
                );
            }
        }
        d.finish().await
    })
    .await
}

/// On the deployment, with two worker processes: a swarm with `max_concurrency = 1` starts its
/// items by priority, then by order of addition; an item given a higher priority while it
/// waits jumps the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priorities_order_the_swarm_on_the_deployment() -> Result<()> {
    guard(async {
        const ITEMS: usize = 30;
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        d.spawn_worker("w2")?;
        let levels = [Priority::Low, Priority::Medium, Priority::High];
        let items: Vec<_> = (0..ITEMS)
            .map(|i| {
                sign("sleep")
                    .kwarg("ms", if i == 2 { 1_000 } else { 1 })
                    .kwarg("i", i)
                    .priority(levels[i % 3])
            })
            .collect();
        let h = d.cluster().handle();
        let wf = h.submit(swarm(items).max_concurrency(1), json!({})).await?;
        // The first handed out (item 2, high) runs; item 1 (medium) waits: make it urgent.
        let state = h.workflow(wf).await?;
        let children = state.nodes[0].spec.children().to_vec();
        h.set_priority(state.sig(children[1]), 500).await?;
        let done = h.wait(wf).await?;
        assert_eq!(done.nodes[0].status, Status::Done);
        let started: Vec<u32> = h
            .history(wf)?
            .iter()
            .filter_map(|e| match e.payload {
                mageflow::Payload::Started { node, .. } => Some(node),
                _ => None,
            })
            .collect();
        let position = |node: u32| {
            children
                .iter()
                .position(|&c| c == node)
                .unwrap_or(usize::MAX)
        };
        let order: Vec<usize> = started.into_iter().map(position).collect();
        let mut expected: Vec<usize> = (0..ITEMS).filter(|&i| i != 1).collect();
        expected.sort_by_key(|&i| -levels[i % 3].value());
        // Item 2 was running already when item 1 became urgent: 1 comes right after it.
        expected.insert(1, 1);
        assert_eq!(order, expected);
        d.finish().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_orchestrator_takes_over_when_the_first_stops() -> Result<()> {
    guard(async {
        const TASKS: usize = 2_000;
        let (mut d, wf) = swarm_a_quarter_done(TASKS).await?;
        // A second orchestrator on the same deployment waits for the log's orchestrator lock.
        let config = d.config.clone();
        let standby = tokio::spawn(async move { Deployment::open(&config).await });
        d.wait_for(wf, |w| succeeded(w) >= TASKS / 2).await?;
        assert!(
            !standby.is_finished(),
            "the second orchestrator started while the first one ran"
        );
        // A rolling restart: the first one stops, the standby takes over and finishes the run.
        if let Some(c) = d.cluster.take() {
            c.shutdown().await;
        }
        d.cluster = Some(standby.await??);
        finishes_once_each(d, wf, TASKS).await
    })
    .await
}

/// A `mageflow serve` process of the deployment, its output read line by line.
struct Serve {
    child: Child,
    stdout: std::sync::mpsc::Receiver<String>,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Serve {
    fn start(d: &Deployment) -> Result<Self> {
        Self::start_with(d, &[])
    }

    fn start_with(d: &Deployment, extra: &[&str]) -> Result<Self> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mageflow"))
            .args(["serve", "--postgres", &postgres_url(), "--redis", &d.redis])
            .args(["--schema", &d.schema, "--prefix", &d.prefix])
            .args(extra)
            .env("MAGEFLOW_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start mageflow serve")?;
        let stdout = Self::lines(child.stdout.take().context("serve's stdout")?);
        let stderr = Self::lines(child.stderr.take().context("serve's stderr")?);
        Ok(Self {
            child,
            stdout,
            stderr,
        })
    }

    fn lines(from: impl std::io::Read + Send + 'static) -> std::sync::mpsc::Receiver<String> {
        use std::io::BufRead;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(from).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        rx
    }

    /// Wait for a line of `out` (this process's stdout or stderr) containing `text`.
    async fn says(out: &std::sync::mpsc::Receiver<String>, text: &str) -> Result<String> {
        tokio::task::block_in_place(|| out.iter().find(|l| l.contains(text)))
            .with_context(|| format!("mageflow serve ended without saying {text:?}"))
    }

    /// SIGTERM, then its exit; the rest of its stdout.
    fn stop(mut self) -> Result<String> {
        let pid = self.child.id().to_string();
        if !Command::new("kill")
            .args(["-TERM", &pid])
            .status()?
            .success()
        {
            bail!("kill -TERM {pid} failed");
        }
        let status = self.child.wait()?;
        let rest = self.stdout.iter().collect::<Vec<_>>().join("\n");
        if !status.success() {
            bail!("mageflow serve exited {status}: {rest}");
        }
        Ok(rest)
    }
}

/// One HTTP/1.1 request with `Connection: close`: (status, body).
fn http(addr: &str, method: &str, path: &str, token: &str, body: &str) -> Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut answer = String::new();
    s.read_to_string(&mut answer)?;
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("not an HTTP answer: {answer:?}"))?;
    let body = answer
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    Ok((status, body))
}

/// One token and role model for the HTTP API and the CLI's relayed commands: `serve --tokens`
/// authorises both, so a viewer token may cancel neither over HTTP (403) nor through the relay
/// (refused), and an operator token does both, its name recorded as the actor either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_token_model_for_the_api_and_the_relay() -> Result<()> {
    guard(async {
        let mut d = Deployment::unopened(postgres_url(), redis_url());
        let dir = tempfile::tempdir()?;
        let tokens = dir.path().join("tokens.toml");
        let f = tokens.to_string_lossy().to_string();
        let mut token_files = BTreeMap::new();
        for (name, role) in [("val", "viewer"), ("opal", "operator")] {
            let out = Command::new(env!("CARGO_BIN_EXE_mageflow"))
                .args([
                    "token", "create", "--file", &f, "--name", name, "--role", role,
                ])
                .output()?;
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
            let token = String::from_utf8(out.stdout)?.trim().to_owned();
            let file = dir.path().join(format!("{name}.token"));
            std::fs::write(&file, &token)?;
            token_files.insert(name, (token, file.to_string_lossy().to_string()));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let serve = Serve::start_with(&d, &["--http", &addr, "--tokens", &f])?;
        Serve::says(&serve.stdout, "http api on").await?;
        d.spawn_worker("w1")?;
        let (opal, opal_file) = token_files["opal"].clone();
        let (val, val_file) = token_files["val"].clone();
        let definition = json!({"root": {"swarm": {"items": [
            {"task": {"task": "sleep", "with": {"kwargs": {"ms": 600000}}}}
        ]}}, "input": {}})
        .to_string();
        let (status, body) = http(&addr, "POST", "/api/v1/workflows", &opal, &definition)?;
        assert_eq!(status, 201, "{body}");
        let created: serde_json::Value = serde_json::from_str(&body)?;
        let wf = created["id"].as_str().context("an id")?.to_owned();
        let relay = |args: &[&str], principal: &str, token_file: &str| {
            Command::new(env!("CARGO_BIN_EXE_mageflow"))
                .args(args)
                .args(["--postgres", &postgres_url(), "--schema", &d.schema])
                .args(["--redis", &d.redis, "--prefix", &d.prefix])
                .args(["--principal", principal, "--token-file", token_file])
                .env("RUST_BACKTRACE", "0")
                .output()
        };

        // A viewer: refused on both paths.
        let (status, body) = http(
            &addr,
            "POST",
            &format!("/api/v1/signatures/{wf}/cancel"),
            &val,
            r#"{"confirm": true}"#,
        )?;
        assert_eq!(status, 403, "{body}");
        let out = relay(&["cancel", &wf, "--confirm"], "val", &val_file)?;
        assert!(!out.status.success(), "a viewer canceled through the relay");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("forbidden") || err.contains("viewer"), "{err}");

        // An operator: both paths, recorded under its token's name.
        let (status, body) = http(
            &addr,
            "POST",
            &format!("/api/v1/signatures/{wf}/suspend"),
            &opal,
            "",
        )?;
        assert_eq!(status, 200, "{body}");
        let out = relay(&["resume", &wf], "opal", &opal_file)?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (status, body) = http(
            &addr,
            "GET",
            &format!("/api/v1/workflows/{wf}/history?limit=1000"),
            &opal,
            "",
        )?;
        assert_eq!(status, 200, "{body}");
        let history: serde_json::Value = serde_json::from_str(&body)?;
        let actors: Vec<(String, serde_json::Value)> = history["events"]
            .as_array()
            .context("events")?
            .iter()
            .filter_map(|e| {
                let kind = e["payload"].as_object()?.keys().next()?.clone();
                matches!(kind.as_str(), "suspended" | "resumed" | "canceled")
                    .then(|| (kind, e["actor"].clone()))
            })
            .collect();
        let opal_actor = json!({"api": {"principal": "opal"}});
        assert!(!actors.is_empty());
        for (kind, actor) in &actors {
            assert_ne!(kind, "canceled", "the viewer's cancel went through");
            assert_eq!(actor, &opal_actor, "{kind}");
        }
        let out = serve.stop()?;
        assert!(out.contains("stopped;"), "{out}");
        for w in &mut d.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        tokio::task::block_in_place(|| mageflow::hot::clear_prefix_blocking(&d.redis, &d.prefix))
            .map_err(|e| anyhow::anyhow!("cannot delete the test's Redis keys: {e}"))?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mageflow_serve_stands_by_and_takes_over_when_the_running_one_is_killed() -> Result<()> {
    guard(async {
        let d = Deployment::unopened(postgres_url(), redis_url());
        let mut first = Serve::start(&d)?;
        Serve::says(&first.stdout, "serving").await?;
        // Two more: both stand by, naming the session that holds the lock.
        let second = Serve::start(&d)?;
        let third = Serve::start(&d)?;
        for s in [&second, &third] {
            let line = Serve::says(&s.stderr, "standing by").await?;
            assert!(
                line.contains("another orchestrator runs on this log"),
                "{line}"
            );
            assert!(line.contains("PostgreSQL session"), "{line}");
        }
        // A standby told to stop just stops.
        let out = third.stop()?;
        assert!(out.contains("stopped while standing by"), "{out}");
        // kill -9: the kernel closes its sockets, PostgreSQL ends its session, the lock is free.
        first.child.kill()?;
        first.child.wait()?;
        Serve::says(&second.stdout, "serving").await?;
        let out = second.stop()?;
        assert!(out.contains("stopped;"), "{out}");
        // The orchestrators' keys (the schema goes with `d`).
        tokio::task::block_in_place(|| mageflow::hot::clear_prefix_blocking(&d.redis, &d.prefix))
            .map_err(|e| anyhow::anyhow!("cannot delete the test's Redis keys: {e}"))?;
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_wiped_and_postgres_connections_killed_midway_the_run_completes() -> Result<()> {
    guard(async {
        const TASKS: usize = 400;
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        d.spawn_worker("w2")?;
        let wf = submit_steps_swarm(&d, TASKS).await?;
        d.wait_for(wf, |w| succeeded(w) >= TASKS / 4).await?;
        // What FLUSHALL does to this deployment (a real FLUSHALL would wipe the keys of tests
        // running in parallel on the same Redis), while some 64 handlers are midway: each
        // worker finds its jobs' leases gone and stops them — abandoned, never failed.
        let deleted = d.cluster().hot().clear().await?;
        assert!(deleted > 0, "the deployment had keys in Redis");
        d.wait_for(wf, |w| succeeded(w) >= TASKS / 2).await?;
        // Terminate the log's PostgreSQL connections (committer, listener, and the session
        // holding the orchestrator lock, which takes it again), as a restart of PostgreSQL
        // does, while handlers wait for their checkpoints to be durable.
        let pg = d.cluster().pg().clone();
        let pids = [
            pg.committer_backend_pid(),
            pg.listener_backend_pid(),
            d.cluster().lock().backend_pid(),
        ];
        let mut conn = {
            use sqlx::Connection;
            sqlx::PgConnection::connect(&postgres_url()).await?
        };
        for pid in pids.into_iter().filter(|p| *p != 0) {
            sqlx::query("SELECT pg_terminate_backend($1)")
                .bind(pid)
                .execute(&mut conn)
                .await?;
        }
        let h = d.cluster().handle();
        let done = h.wait(wf).await?;
        check_once_each(&h.history(wf)?, &done, TASKS)?;
        let stats = d.cluster().projector_stats();
        assert!(
            stats.rebuilds.load(std::sync::atomic::Ordering::Relaxed) >= 1,
            "the projector rebuilt the wiped hot tier"
        );
        assert!(
            abandoned_by_workers(&mut d)? >= 1,
            "the wipe stopped handlers midway (else this test tests nothing)"
        );
        d.finish().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interrupt_stops_a_handler_in_a_worker_process_and_resume_continues_from_its_checkpoint(
) -> Result<()> {
    guard(async {
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        let h = d.cluster().handle();
        let task = sign("steps").kwarg("steps", 40).kwarg("ms", 25);
        let wf = h.submit(task, json!({})).await?;
        let sig = mageflow::SignatureId::root(wf);
        let at_step = |w: &Workflow| w.nodes[0].checkpoint.as_ref().and_then(|c| c.as_u64());
        d.wait_for(wf, |w| at_step(w).is_some_and(|s| s >= 3))
            .await?;
        h.interrupt(sig).await?;
        let interrupted = h.workflow(wf).await?;
        assert_eq!(interrupted.nodes[0].status, Status::Interrupted);
        let stopped_at = at_step(&interrupted).context("a checkpoint was saved")?;
        h.resume(sig).await?;
        let done = h.wait(wf).await?;
        assert_eq!(done.nodes[0].status, Status::Done);
        let result = done.nodes[0].outcome.as_ref().map(|o| format!("{o:?}"));
        let from = stopped_at.to_string();
        assert!(
            result
                .as_deref()
                .is_some_and(|r| r.contains("resumed_from") && r.contains(&from)),
            "the resumed attempt continued from step {stopped_at}: {result:?}"
        );
        // The worker heard of the interrupt by push and stopped the first handler (it
        // returned "stopped at step N", which is no failure of a revoked attempt's); had it
        // not, that handler would have run all its steps and succeeded too.
        let counters = d.stop_worker(0)?;
        assert!(
            counters.contains("claimed=2 succeeded=1 failed=0 stopped=1 abandoned=0"),
            "the interrupted handler was stopped: {counters}"
        );
        d.finish().await
    })
    .await
}

/// A Redis server of this test's own (so it can be killed without touching other tests' data):
/// no persistence, like the shared one.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start(port: u16) -> Result<Self> {
        let mut r = Self { port, child: None };
        r.restart()?;
        Ok(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn restart(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .spawn()
            .context("this test starts a redis-server of its own: install Redis (redis-server)")?;
        self.child = Some(child);
        // Ready once it answers.
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        bail!("redis-server on port {} did not start", self.port)
    }

    /// SIGKILL: everything in it is gone.
    fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_empty_midway_the_run_completes() -> Result<()> {
    guard(async {
        const TASKS: usize = 400;
        // A port derived from the process id, away from the usual ones.
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let mut redis = PrivateRedis::start(port)?;
        let mut d = Deployment::start_on(postgres_url(), redis.url()).await?;
        d.spawn_worker("w1")?;
        d.spawn_worker("w2")?;
        let wf = submit_steps_swarm(&d, TASKS).await?;
        d.wait_for(wf, |w| succeeded(w) >= TASKS / 4).await?;
        // Redis dies with everything in it: jobs, claims, leases, reports not yet taken, hot
        // state. Every process loses its connection and retries; the restarted server is
        // empty. Checkpointing handlers midway are abandoned and resumed, never failed.
        redis.kill()?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        redis.restart()?;
        let h = d.cluster().handle();
        let done = h.wait(wf).await?;
        check_once_each(&h.history(wf)?, &done, TASKS)?;
        let rebuilds = d
            .cluster()
            .projector_stats()
            .rebuilds
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(rebuilds >= 1, "the projector rebuilt the emptied hot tier");
        d.finish().await
    })
    .await
}

/// A PostgreSQL server of this test's own — `initdb` into a temporary directory, its own port and
/// socket directory — so it can be restarted for real (`pg_ctl stop -m immediate`: what a crash
/// of the server does, crash recovery at the next start) without breaking the connections of
/// the tests that share the usual server. Run as the `postgres` user when the test runs as root
/// (PostgreSQL refuses to run as root).
struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
    port: u16,
}

impl PrivatePostgres {
    fn start(port: u16) -> Result<Self> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .context(
                "this test starts a PostgreSQL server of its own: install PostgreSQL's server \
                 binaries (/usr/lib/postgresql/<version>/bin/initdb)",
            )?;
        let dir = tempfile::Builder::new().prefix("mf-pg-").tempdir()?;
        let pg = Self { dir, bin, port };
        if Self::as_root() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(pg.dir.path())
                .status()?;
            if !status.success() {
                bail!("chown of {} to postgres failed", pg.dir.path().display());
            }
        }
        let data = pg.data();
        pg.run(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        )?;
        pg.start_server()?;
        Ok(pg)
    }

    fn as_root() -> bool {
        Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"))
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Run one of PostgreSQL's programs, as `postgres` when this is root.
    fn run(&self, program: &str, args: &[&str]) -> Result<()> {
        let exe = self.bin.join(program);
        let mut cmd = if Self::as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd.args(args).stdin(Stdio::null()).output()?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    fn start_server(&self) -> Result<()> {
        let (data, dir) = (self.data(), self.dir.path().display().to_string());
        let log = format!("{dir}/server.log");
        let options = format!("-p {} -k {dir} -c listen_addresses=127.0.0.1", self.port);
        self.run(
            "pg_ctl",
            &["-D", &data, "-l", &log, "-o", &options, "-w", "start"],
        )
    }

    fn stop_server(&self) -> Result<()> {
        self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        )
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = self.stop_server();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_midway_the_run_completes() -> Result<()> {
    guard(async {
        const TASKS: usize = 400;
        // A port derived from the process id, away from the usual ones and PrivateRedis's.
        let port = 40_000 + (std::process::id() % 20_000) as u16;
        let pg = PrivatePostgres::start(port)?;
        let mut d = Deployment::start_on(pg.url(), redis_url()).await?;
        d.spawn_worker("w1")?;
        d.spawn_worker("w2")?;
        let wf = submit_steps_swarm(&d, TASKS).await?;
        d.wait_for(wf, |w| succeeded(w) >= TASKS / 4).await?;
        // The server goes down hard (every session ends, nothing flushed beyond the WAL) and
        // comes back after crash recovery, while some 64 handlers are midway and save their
        // checkpoints: the committer and the reads retry, the orchestrator takes its lock
        // again, and a checkpoint that could not be made durable abandons its handler, which
        // runs again from its last durable checkpoint — no task fails, none succeeds twice.
        pg.stop_server()?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        pg.start_server()?;
        let h = d.cluster().handle();
        let done = h.wait(wf).await?;
        check_once_each(&h.history(wf)?, &done, TASKS)?;
        d.finish().await?;
        drop(pg);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_workflow_reads_the_same_and_is_loaded_back_when_touched() -> Result<()> {
    guard(async {
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        let h = d.cluster().handle();
        let flow = mageflow::chain([
            mageflow::Sig::from(sign("echo").kwarg("step", 1)),
            swarm((0..20).map(|i| sign("noop").kwarg("i", i))).into(),
        ])
        .on_success(sign("noop"));
        let wf = h.submit(flow, json!({"x": 1})).await?;
        let live = h.wait(wf).await?;
        let before = h.history(wf)?;

        let stats = d
            .cluster()
            .handle()
            .compact(wf)
            .await?
            .context("a finished workflow is compacted")?;
        assert_eq!(stats.events, before.len() as u64);
        assert!(stats.compressed_bytes < stats.raw_bytes, "{stats:?}");
        let pg = d.cluster().pg().clone();
        let (archived, snapshot, live_events) = tokio::task::spawn_blocking(move || {
            use mageflow::store::EventLog;
            let live_events = pg
                .read_all(1, usize::MAX)?
                .into_iter()
                .filter(|r| r.event.stream == wf)
                .count();
            anyhow::Ok((pg.archived(wf)?, pg.snapshot(wf)?, live_events))
        })
        .await??;
        assert_eq!(live_events, 0, "nothing of it is left in the live log");
        assert_eq!(archived.map(|a| a.events), Some(before.len() as u64));
        // Same events whether they come from the log or the archive; same state replayed; the
        // snapshot is that state too.
        let after = h.history(wf)?;
        assert_eq!(after, before);
        assert_eq!(Workflow::replay(wf, &after)?, live);
        let snapshot = snapshot.context("a snapshot is stored")?;
        assert_eq!(Workflow::from_snapshot(&snapshot)?, live);

        // Touched again: rerun loads it back from the archive and runs it.
        h.rerun(wf).await?;
        let again = h.wait(wf).await?;
        assert_eq!(again.nodes[0].status, Status::Done);
        let history = h.history(wf)?;
        assert_eq!(&history[..before.len()], &before[..]);
        assert!(history.len() > before.len());

        // A restarted orchestrator finds the rerun's events live and the rest archived: it folds
        // the whole history (not a corrupt one) and reads the same state.
        d.restart_orchestrator().await?;
        let recovery = d.cluster().engine().recovery().clone();
        assert_eq!(recovery.skipped_corrupt, 0, "{recovery:?}");
        let h = d.cluster().handle();
        assert_eq!(h.workflow(wf).await?, again);
        assert_eq!(h.history(wf)?, history);
        d.finish().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleanups_run_once_even_when_the_worker_running_their_task_was_killed() -> Result<()> {
    guard(async {
        const ITEMS: usize = 300;
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        d.spawn_worker("w2")?;
        let items: Vec<_> = (0..ITEMS)
            .map(|i| {
                sign("sleep")
                    .kwarg("ms", 20)
                    .kwarg("i", i)
                    .on_cleanup(sign("noop"))
            })
            .collect();
        let h = d.cluster().handle();
        let wf = h.submit(swarm(items), json!({})).await?;
        d.wait_for(wf, |w| succeeded(w) >= ITEMS / 4).await?;
        d.workers[0].kill()?;
        d.workers[0].wait()?;
        let done = h.wait(wf).await?;
        let history = h.history(wf)?;
        // Every item ran to success once, and its cleanup ran once after it.
        let mut cleanups = 0;
        for &item in done.nodes[0].spec.children() {
            let node = &done.nodes[item as usize];
            assert_eq!(node.status, Status::Done);
            for &c in &node.spec.on_cleanup {
                cleanups += 1;
                let ran = history
                    .iter()
                    .filter(|e| e.payload.kind() == "succeeded" && e.payload.node() == Some(c))
                    .count();
                assert_eq!(ran, 1, "cleanup {c} of item {item} succeeded {ran} times");
            }
        }
        assert_eq!(cleanups, ITEMS);
        d.finish().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rebuild_hot_restores_the_hot_tier_from_the_log() -> Result<()> {
    guard(async {
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        let h = d.cluster().handle();
        let wf = h.submit(sign("echo").kwarg("x", 1), json!({})).await?;
        h.wait(wf).await?;
        let head = {
            use mageflow::store::EventLog;
            d.cluster().pg().head()
        };
        let hot = d.cluster().hot().clone();
        let replay = || {
            Command::new(env!("CARGO_BIN_EXE_mageflow"))
                .args(["replay", "--rebuild-hot", "--no-progress"])
                .args(["--postgres", &postgres_url(), "--schema", &d.schema])
                .args(["--redis", &d.redis, "--prefix", &d.prefix])
                .output()
        };
        // Not beside a running orchestrator: refused.
        let refused = replay()?;
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success(), "{stderr}");
        assert!(stderr.contains("an orchestrator"), "{stderr}");
        if let Some(c) = d.cluster.take() {
            c.shutdown().await;
        }
        hot.clear().await?;
        assert_eq!(hot.projected_position().await?, None);
        let out = replay()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(hot.projected_position().await?, Some(head));
        let root = hot
            .signature(mageflow::SignatureId::root(wf))
            .await?
            .context("the workflow is back in the hot tier")?;
        assert_eq!(root.status, "done");
        hot.clear().await?;
        d.finish().await
    })
    .await
}

/// Every value stored under `prefix` in Redis, as text (test-only: KEYS is fine here).
async fn redis_contents(url: &str, prefix: &str) -> Result<String> {
    let client = redis::Client::open(url)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query_async(&mut conn)
        .await?;
    let mut out = String::new();
    for key in keys {
        let kind: String = redis::cmd("TYPE").arg(&key).query_async(&mut conn).await?;
        let value: redis::Value = match kind.as_str() {
            "hash" => {
                redis::cmd("HGETALL")
                    .arg(&key)
                    .query_async(&mut conn)
                    .await?
            }
            "stream" => {
                redis::cmd("XRANGE")
                    .arg(&key)
                    .arg("-")
                    .arg("+")
                    .query_async(&mut conn)
                    .await?
            }
            "zset" => {
                redis::cmd("ZRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await?
            }
            "list" => {
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn)
                    .await?
            }
            _ => redis::cmd("GET").arg(&key).query_async(&mut conn).await?,
        };
        out.push_str(&format!("{key}: {value:?}\n"));
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_confirmed_cancel_leaves_only_the_audit_record() -> Result<()> {
    guard(async {
        const SECRET: &str = "SECRET-kwarg-7f3a91";
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        let h = d.cluster().handle();
        let items: Vec<_> = (0..200)
            .map(|i| {
                sign("sleep")
                    .kwarg("ms", 50)
                    .kwarg("secret", SECRET)
                    .kwarg("i", i)
                    .on_cleanup(sign("noop").kwarg("secret", SECRET))
            })
            .collect();
        let flow = swarm(items)
            .max_concurrency(8)
            .on_success(sign("noop").kwarg("secret", SECRET));
        let wf = h.submit(flow, json!({ "input": SECRET })).await?;
        d.wait_for(wf, |w| succeeded(w) >= 10).await?;
        let root = mageflow::SignatureId::root(wf);
        // Without confirmation: refused, nothing changes.
        let before = h.history(wf)?.len();
        let refused = h.cancel(root, false).await;
        assert!(refused.is_err(), "a cancel without confirmation is refused");
        assert!(h.history(wf)?[before..]
            .iter()
            .all(|e| e.payload.kind() != "canceled"));
        let data = |history: &[Event]| format!("{history:?}");
        assert!(
            data(&h.history(wf)?).contains(SECRET),
            "the data was there before"
        );

        h.cancel(root, true).await?;
        h.wait(wf).await?;
        let stats = h.stats();
        while stats
            .workflows_redacted
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The log: who canceled what and when stays; the task data does not.
        let history = h.history(wf)?;
        assert!(
            !data(&history).contains(SECRET),
            "task data left in the log"
        );
        let canceled: Vec<&Event> = history
            .iter()
            .filter(|e| e.payload.kind() == "canceled")
            .collect();
        assert!(!canceled.is_empty());
        assert!(canceled
            .iter()
            .all(|e| e.actor == mageflow::Actor::api("cluster-test")));
        // The archive, once compacted: same.
        d.cluster().handle().compact(wf).await?;
        assert!(
            !data(&h.history(wf)?).contains(SECRET),
            "task data left in the archive"
        );
        let pg = d.cluster().pg().clone();
        let snapshot = tokio::task::spawn_blocking(move || pg.snapshot(wf)).await??;
        if let Some(bytes) = snapshot {
            let text = String::from_utf8_lossy(&bytes);
            assert!(!text.contains(SECRET), "task data left in the snapshot");
        }
        // The hot tier.
        let hot = redis_contents(&d.redis, &d.prefix).await?;
        assert!(!hot.contains(SECRET), "task data left in Redis: {hot}");
        // And it cannot be resumed or rerun.
        assert!(h.resume(root).await.is_err());
        assert!(h.rerun(wf).await.is_err());
        d.finish().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purged_workflow_keeps_no_task_data() -> Result<()> {
    guard(async {
        const SECRET: &str = "SECRET-purged-52be";
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        let h = d.cluster().handle();
        let wf = h
            .submit(sign("echo").kwarg("secret", SECRET), json!({}))
            .await?;
        h.wait(wf).await?;
        assert!(format!("{:?}", h.history(wf)?).contains(SECRET));
        h.delete(wf).await?;
        d.wait_for(wf, |w| w.purged).await?;
        let stats = h.stats();
        while stats
            .workflows_redacted
            .load(std::sync::atomic::Ordering::Relaxed)
            == 0
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let history = h.history(wf)?;
        assert!(
            !format!("{history:?}").contains(SECRET),
            "task data left after the purge"
        );
        assert_eq!(history.last().map(|e| e.payload.kind()), Some("purged"));
        d.finish().await
    })
    .await
}

/// `mageflow <command> ID --postgres … --redis …` for an operator: relayed to the orchestrator.
fn operator(d: &Deployment, args: &[&str]) -> Result<std::process::Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_mageflow"))
        .args(args)
        .args(["--postgres", &postgres_url(), "--schema", &d.schema])
        .args(["--redis", &d.redis, "--prefix", &d.prefix])
        .args(["--principal", "alice"])
        .output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands_are_relayed_to_the_orchestrator() -> Result<()> {
    guard(async {
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        let h = d.cluster().handle();
        let wf = submit_swarm(&d, 20, 600_000).await?;
        let root = mageflow::SignatureId::root(wf).to_string();

        let out = operator(&d, &["suspend", &root])?;
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(said.contains("suspended"), "{said}");
        assert_eq!(h.workflow(wf).await?.nodes[0].status, Status::Suspended);
        let out = operator(&d, &["resume", &wf.to_string()])?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );

        // Cancel without confirmation: refused by the CLI, nothing sent, nothing changed.
        let before = h.history(wf)?.len();
        let out = operator(&d, &["cancel", &root])?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--confirm") && err.contains("Nothing was changed"),
            "{err}"
        );
        assert_eq!(h.history(wf)?.len(), before);

        // Confirmed: done by the orchestrator as the operator.
        let out = operator(&d, &["cancel", &root, "--confirm"])?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let done = h.wait(wf).await?;
        assert_eq!(done.nodes[0].status, Status::Canceled);
        let canceled = h
            .history(wf)?
            .into_iter()
            .find(|e| e.payload.kind() == "canceled")
            .context("a canceled event")?;
        assert_eq!(canceled.actor, mageflow::Actor::api("alice"));

        // The orchestrator's refusal comes back, with its reason.
        let out = operator(&d, &["rerun", &wf.to_string()])?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cancel"), "{err}");
        d.finish().await
    })
    .await
}

/// `mageflow submit FILE.json` and `mageflow signal` relayed to the orchestrator: the
/// definition is validated there (an unknown task comes back refused), the workflow runs on the
/// deployment's workers up to its gate, and the operator's signal lets it finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_and_signal_are_relayed_to_the_orchestrator() -> Result<()> {
    guard(async {
        let mut d = Deployment::start().await?;
        d.spawn_worker("w1")?;
        let h = d.cluster().handle();
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("flow.json");
        let path = file.to_str().context("utf-8")?;
        std::fs::write(&file, r#"{"root": {"task": {"task": "no_such_task"}}}"#)?;
        let out = operator(&d, &["submit", path])?;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no_such_task") && err.contains("not submitted"), "{err}");

        std::fs::write(
            &file,
            r#"{"input": {"doc": 1}, "root": {"graph": {"nodes": [
                {"name": "check", "run": {"task": {"task": "echo"}}},
                {"name": "approval", "run": {"gate": {}}},
                {"name": "publish", "run": {"task": {"task": "echo"}}}],
              "edges": [
                {"from": "check", "to": "approval", "when": "on_success"},
                {"from": "approval", "to": "publish", "when": {"output": {"op": "eq", "path": "$.approved", "value": true}}}]}}}"#,
        )?;
        let out = operator(&d, &["submit", path])?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let wf: WorkflowId = String::from_utf8_lossy(&out.stdout).trim().parse()?;
        let held = h
            .wait_for(wf, mageflow::Until::Settled, Duration::from_secs(60))
            .await?;
        let gate = held
            .nodes
            .iter()
            .position(|n| n.spec.name == "approval")
            .map(|i| held.sig(i as u32))
            .context("the gate")?;
        let out = operator(&d, &["signal", &gate.to_string(), "--value", r#"{"approved": true}"#])?;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let done = h.wait(wf).await?;
        assert_eq!(done.nodes[0].status, Status::Done);
        let created = h.history(wf)?;
        assert_eq!(created[0].actor, mageflow::Actor::api("alice"));
        d.finish().await
    })
    .await
}

/// The hot tier of `d`, as another process (an operator's CLI, an attacker) reaches it.
async fn outsider(d: &Deployment) -> Result<mageflow::hot::Hot> {
    let mut cfg = d.config.hot.clone();
    cfg.secret = None;
    Ok(mageflow::hot::Hot::connect(cfg).await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_command_past_its_deadline_is_refused_and_recorded_not_carried_out() -> Result<()>
{
    use mageflow::control::ControlOp;
    guard(async {
        let mut d = Deployment::start().await?;
        // No worker: the task stays started, waiting for one.
        let wf = d
            .cluster()
            .handle()
            .submit(sign("sleep").kwarg("ms", 10), json!({}))
            .await?;
        let root = mageflow::SignatureId::root(wf);
        if let Some(c) = d.cluster.take() {
            c.shutdown().await;
        }
        // No orchestrator runs: the command waits out its validity, and says it was not done.
        let hot = outsider(&d).await?;
        let sent = mageflow::cluster::relay_control(
            &hot,
            "operator:tester",
            ControlOp::Suspend,
            root,
            false,
            None,
            "tester",
            None,
            Duration::from_millis(200),
        )
        .await;
        let e = sent
            .err()
            .context("no orchestrator answered, yet the command succeeded")?;
        assert_eq!(e.code(), "expired", "{e}");
        assert!(e.to_string().contains("not carried out"), "{e}");
        // An orchestrator that starts later reads it, refuses it and records the refusal.
        d.cluster = Some(Deployment::open(&d.config).await?);
        let h = d.cluster().handle();
        let refused = loop {
            let r = h.refused_commands()?;
            if !r.is_empty() {
                break r;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(refused.len(), 1, "{refused:?}");
        let c = &refused[0].command;
        assert_eq!(c["op"], "suspend");
        assert_eq!(c["principal"], "tester");
        assert_eq!(c["code"], "expired");
        assert_eq!(c["target"], root.to_string());
        let state = h.workflow(wf).await?;
        assert_ne!(
            state.nodes[0].status,
            Status::Suspended,
            "the expired command was carried out"
        );
        d.finish().await
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_reports_and_unsigned_commands_are_refused_on_a_secured_deployment() -> Result<()> {
    use mageflow::auth::{AccessFile, OperatorEntry, Operators, Role, Secret};
    use mageflow::control::ControlOp;
    guard(async {
        const WORKERS: &str = "the-deployment-worker-secret";
        const ALICE: &str = "alice-operator-token-0123";
        let mut d = Deployment::unopened(postgres_url(), redis_url());
        d.worker_secret = Some(WORKERS.into());
        d.config.hot.secret = Some(Secret::new(WORKERS)?);
        d.config.operators = Operators::from_file(AccessFile {
            operator: vec![OperatorEntry {
                principal: "alice".into(),
                role: Role::Operator,
                token: ALICE.into(),
            }],
        })?;
        d.cluster = Some(Deployment::open(&d.config).await?);
        d.spawn_worker("w1")?;
        let h = d.cluster().handle();
        let wf = h
            .submit(sign("steps").kwarg("steps", 40).kwarg("ms", 25), json!({}))
            .await?;
        let root = mageflow::SignatureId::root(wf);
        d.wait_for(wf, |w| w.nodes[0].checkpoint.is_some()).await?;
        let attempt = h.workflow(wf).await?.nodes[0].attempt;

        // Someone who can write to Redis, even read it (the lease token is in `leases`), but has
        // no secret: a made-up worker reports the running attempt done with a forged result.
        let hot = outsider(&d).await?;
        let key = mageflow::hot::JobKey { sig: root, attempt };
        let lease = hot.leases(&[key]).await?.pop().flatten();
        assert!(lease.is_some(), "the running attempt holds a lease");
        let forged = mageflow::hot::Report {
            key,
            worker: "mallory".into(),
            outcome: mageflow::hot::ReportOutcome::Succeeded(json!("forged")),
            lease,
        };
        let raw = serde_json::to_string(&forged)?;
        let mut conn = redis::Client::open(d.redis.as_str())?
            .get_multiplexed_async_connection()
            .await?;
        let reports = format!("{}reports", d.prefix);
        let _: String = redis::cmd("XADD")
            .arg(&reports)
            .arg("*")
            .arg("report")
            .arg(&raw)
            .query_async(&mut conn)
            .await?;
        let wrong = Secret::new("a-guess-at-the-secret")?.sign(raw.as_bytes());
        let _: String = redis::cmd("XADD")
            .arg(&reports)
            .arg("*")
            .arg("report")
            .arg(&raw)
            .arg("mac")
            .arg(wrong)
            .query_async(&mut conn)
            .await?;

        // An operator command with no token, and one signed by the wrong operator's token.
        let relay = |token: Option<Secret>, op: ControlOp, principal: &'static str| {
            let hot = hot.clone();
            async move {
                mageflow::cluster::relay_control(
                    &hot,
                    &format!("operator:{principal}"),
                    op,
                    root,
                    true,
                    None,
                    principal,
                    token.as_ref(),
                    Duration::from_secs(10),
                )
                .await
            }
        };
        let unsigned = relay(None, ControlOp::Cancel, "alice").await;
        assert_eq!(unsigned.map_err(|e| e.code()), Err("unauthenticated"));
        let not_hers = relay(
            Some(Secret::new("bob-token-000000000")?),
            ControlOp::Cancel,
            "alice",
        )
        .await;
        assert_eq!(not_hers.map_err(|e| e.code()), Err("unauthenticated"));
        // Signed by alice: carried out, and recorded as hers.
        let suspended = relay(Some(Secret::new(ALICE)?), ControlOp::Suspend, "alice").await?;
        assert!(suspended.contains("suspended"), "{suspended}");
        h.resume(root).await?;

        let done = h.wait(wf).await?;
        assert_eq!(done.nodes[0].status, Status::Done);
        let result = format!("{:?}", done.nodes[0].outcome);
        assert!(
            !result.contains("forged") && result.contains("steps"),
            "{result}"
        );
        let history = h.history(wf)?;
        assert!(history
            .iter()
            .any(|e| e.payload.kind() == "suspended" && e.actor.to_string() == "api:alice"));
        assert_eq!(
            history
                .iter()
                .filter(|e| e.payload.kind() == "canceled")
                .count(),
            0,
            "no unauthenticated cancel was carried out"
        );
        let refused = d
            .cluster()
            .intake_stats()
            .refused
            .load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            refused >= 4,
            "two forged reports and two commands refused: {refused}"
        );
        d.finish().await
    })
    .await
}
