//! Integration tests against a real Redis (`MAGEFLOW_TEST_REDIS`, default
//! `redis://127.0.0.1:6379`). Each test works under a unique prefix and deletes it at the end
//! (a drop guard deletes it on failure too). An unreachable Redis fails the tests, loudly.

use mageflow_core::{
    execute, Actor, Command, Event, KindSpec, Link, Message, NodeIndex, NodeSpec, Op, Role,
    SignatureId, SwarmConfig, Timestamp, Workflow, WorkflowId,
};
use mageflow_hot::{Hot, HotConfig, JobKey, Projector, Report, ReportOutcome};
use mageflow_store::{AppendRequest, EventLog, MemoryLog};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

fn redis_url() -> String {
    std::env::var("MAGEFLOW_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// Deletes the test's prefix when dropped (also when the test panics), over a plain
/// synchronous connection.
struct PrefixGuard {
    url: String,
    prefix: String,
}

impl Drop for PrefixGuard {
    fn drop(&mut self) {
        if let Err(e) = mageflow_hot::clear_prefix_blocking(&self.url, &self.prefix) {
            eprintln!(
                "could not delete the test's keys under {}: {e}",
                self.prefix
            );
        }
    }
}

struct Env {
    hot: Hot,
    log: Arc<MemoryLog>,
    wfs: HashMap<WorkflowId, Workflow>,
    clock: i64,
    next_id: u128,
    _guard: PrefixGuard,
}

fn test_config(lease: Duration) -> HotConfig {
    let prefix = format!("mf:test:{}:", uuid::Uuid::now_v7().simple());
    let mut cfg = HotConfig::new(redis_url(), prefix);
    cfg.lease = lease;
    cfg
}

async fn connect(cfg: HotConfig) -> Hot {
    let url = cfg.url.clone();
    match Hot::connect(cfg).await {
        Ok(hot) => hot,
        Err(e) => panic!(
            "Redis is not reachable at {url}: {e}\n\
             Start one with `redis-server --daemonize yes`, or point MAGEFLOW_TEST_REDIS at one."
        ),
    }
}

impl Env {
    async fn new(cfg: HotConfig) -> Env {
        let guard = PrefixGuard {
            url: cfg.url.clone(),
            prefix: cfg.prefix.clone(),
        };
        Env {
            hot: connect(cfg).await,
            log: Arc::new(MemoryLog::new()),
            wfs: HashMap::new(),
            clock: 1_700_000_000_000_000,
            next_id: 1,
            _guard: guard,
        }
    }

    fn log(&self) -> Arc<dyn EventLog> {
        self.log.clone()
    }

    /// Decide `op` on workflow `id` and append the events to the log.
    async fn exec(&mut self, id: WorkflowId, op: Op) -> Vec<Event> {
        self.clock += 1_000;
        let wf = self.wfs.entry(id).or_insert_with(|| Workflow::empty(id));
        let expected_version = wf.version;
        let cmd = Command {
            actor: Actor::api("test"),
            at: Timestamp::from_micros(self.clock),
            op,
        };
        let events = match execute(wf, &cmd) {
            Ok(events) => events,
            Err(e) => panic!("{:?} refused: {e}", cmd.op),
        };
        if !events.is_empty() {
            let appended = self
                .log
                .append(vec![AppendRequest {
                    stream: id,
                    expected_version,
                    events: events.clone(),
                }])
                .await;
            if let Err(e) = appended {
                panic!("append failed: {e}");
            }
        }
        events
    }

    async fn create(&mut self, nodes: Vec<NodeSpec>, input: Value) -> WorkflowId {
        let id = WorkflowId::from_u128(self.next_id);
        self.next_id += 1;
        self.exec(
            id,
            Op::Create {
                nodes,
                start: Some(Message::input(input)),
            },
        )
        .await;
        id
    }

    fn spawn_projector(&self) -> (CancellationToken, tokio::task::JoinHandle<Projector>) {
        let projector = Projector::new(self.hot.clone(), self.log());
        self.spawn(projector)
    }

    fn spawn(
        &self,
        projector: Projector,
    ) -> (CancellationToken, tokio::task::JoinHandle<Projector>) {
        let stop = CancellationToken::new();
        let token = stop.clone();
        let hot = self.hot.clone();
        let log = self.log();
        // `run` consumes the projector; hand back a fresh one on the same prefix for restarts.
        let handle = tokio::spawn(async move {
            let stats_holder = projector;
            if let Err(e) = stats_holder.run(token).await {
                panic!("projector failed: {e}");
            }
            Projector::new(hot, log)
        });
        (stop, handle)
    }

    /// Wait until the projected position in Redis equals the log head.
    async fn caught_up(&self) {
        let head = self.log.head();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let pos = self.hot.projected_position().await.ok().flatten();
            if pos == Some(head) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "projector did not catch up: Redis pos {pos:?}, log head {head}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        let client = redis::Client::open(redis_url()).expect("test URL parses");
        client
            .get_multiplexed_async_connection()
            .await
            .expect("Redis reachable (checked by connect)")
    }

    async fn count(&self, cmd: &str, key: &str) -> u64 {
        let mut conn = self.raw().await;
        redis::cmd(cmd)
            .arg(self.hot.key(key))
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{cmd} {key}: {e}"))
    }
}

fn child(task: &str, parent: NodeIndex) -> NodeSpec {
    let mut n = NodeSpec::task(task);
    n.parent = Some(Link {
        node: parent,
        role: Role::Child,
    });
    n
}

fn chain(name: &str, steps: &[&str]) -> Vec<NodeSpec> {
    let mut root = NodeSpec::task(name);
    root.kind = KindSpec::Chain {
        children: (1..=steps.len() as NodeIndex).collect(),
    };
    let mut nodes = vec![root];
    nodes.extend(steps.iter().map(|s| child(s, 0)));
    nodes
}

fn swarm(name: &str, items: &[&str]) -> Vec<NodeSpec> {
    let mut root = NodeSpec::task(name);
    root.kind = KindSpec::Swarm {
        children: (1..=items.len() as NodeIndex).collect(),
        config: SwarmConfig::default(),
        closed: true,
        item_callbacks: Default::default(),
    };
    let mut nodes = vec![root];
    nodes.extend(items.iter().map(|s| child(s, 0)));
    nodes
}

fn sig(wf: WorkflowId, index: NodeIndex) -> SignatureId {
    SignatureId {
        workflow: wf,
        index,
    }
}

#[tokio::test]
async fn projects_a_chain_and_a_restarted_projector_continues_from_pos() {
    let mut cfg = test_config(Duration::from_secs(30));
    cfg.done_ttl_by_kind
        .insert("chain".into(), Duration::from_secs(120));
    let mut env = Env::new(cfg).await;
    let wf = env
        .create(chain("pipe", &["a", "b"]), json!({"x": 1}))
        .await;
    let (stop, handle) = env.spawn_projector();
    env.caught_up().await;

    let a = env.hot.signature(sig(wf, 1)).await.expect("read");
    let a = a.expect("a is projected");
    assert_eq!((a.name.as_str(), a.kind.as_str()), ("a", "task"));
    assert_eq!((a.status.as_str(), a.attempt), ("queued", 0));
    let root = env.hot.signature(sig(wf, 0)).await.expect("read");
    assert_eq!(root.map(|r| r.status), Some("running".to_owned()));
    assert_eq!(env.hot.signature(sig(wf, 9)).await.expect("read"), None);
    assert_eq!(env.hot.read_stats(), (2, 1));

    for (node, result) in [(1, json!({"a": 1})), (2, json!({"b": 2}))] {
        env.exec(wf, Op::Start { node }).await;
        env.exec(
            wf,
            Op::Complete {
                node,
                attempt: 1,
                result,
            },
        )
        .await;
    }
    env.caught_up().await;
    for (i, name, status) in [(0, "pipe", "done"), (1, "a", "done"), (2, "b", "done")] {
        let s = env.hot.signature(sig(wf, i)).await.expect("read");
        let s = s.unwrap_or_else(|| panic!("{name} missing"));
        assert_eq!((s.name.as_str(), s.status.as_str()), (name, status));
    }
    let b = env.hot.signature(sig(wf, 2)).await.expect("read");
    assert_eq!(b.map(|b| b.attempt), Some(1));

    // Tail: one entry per event, in position order.
    let head = env.log.head();
    let tail = env.hot.tail(1000).await.expect("tail");
    assert_eq!(tail.len() as u64, head);
    assert_eq!(
        tail.iter().map(|t| t.position).collect::<Vec<_>>(),
        (1..=head).collect::<Vec<_>>()
    );
    assert_eq!(tail[0].kind, "workflow_created");
    assert_eq!(tail[0].node, None);
    assert_eq!(tail[0].stream, wf.to_string());
    assert_eq!(tail[head as usize - 1].kind, "succeeded");
    assert_eq!(env.hot.tail(2).await.expect("tail").len(), 2);

    // The finished workflow expires after the chain TTL; the jobs are gone.
    let mut conn = env.raw().await;
    let ttl: i64 = redis::cmd("PTTL")
        .arg(env.hot.key(&format!("wf:{}", wf.0.simple())))
        .query_async(&mut conn)
        .await
        .expect("PTTL");
    assert!(ttl > 60_000 && ttl <= 120_000, "ttl {ttl}");
    assert_eq!(env.count("ZCARD", "jobs").await, 0);
    assert_eq!(env.count("HLEN", "jobdata").await, 0);

    // Restart: a new projector continues from pos and writes nothing twice.
    stop.cancel();
    let fresh = handle.await.expect("projector task");
    let wf2 = env.create(chain("again", &["c"]), json!({})).await;
    let (stop, handle) = env.spawn(fresh);
    env.caught_up().await;
    let head2 = env.log.head();
    assert!(head2 > head);
    assert_eq!(env.count("XLEN", "tail").await, head2);
    let c = env.hot.signature(sig(wf2, 1)).await.expect("read");
    assert_eq!(c.map(|c| c.status), Some("queued".to_owned()));
    stop.cancel();
    handle.await.expect("projector task");
    assert!(env.hot.memory_used().await.expect("INFO") > 0);
    assert!(env.hot.clear().await.expect("clear") > 0);
}

/// A worker waiting for work gets the job that appears during its wait, in the same call (the
/// claim rides behind the wait); a second waiter times out empty-handed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_projected_during_the_wait_is_claimed_when_it_ends() {
    let mut env = Env::new(test_config(Duration::from_secs(30))).await;
    let (stop, handle) = env.spawn_projector();
    let waiting = {
        let hot = env.hot.clone();
        tokio::spawn(async move { hot.wait_and_claim("w1", 8, Duration::from_secs(10)).await })
    };
    // The wait is under way (nothing to take yet) before the job exists.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "the wait ended with nothing queued");
    let wf = env
        .create(vec![NodeSpec::task("resize")], json!({"img": 8}))
        .await;
    env.exec(wf, Op::Start { node: 0 }).await;
    let claimed = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the wait ends when the job is projected")
        .expect("task")
        .expect("wait and claim");
    let keys: Vec<JobKey> = claimed.into_iter().map(|j| j.key).collect();
    assert_eq!(
        keys,
        vec![JobKey {
            sig: sig(wf, 0),
            attempt: 1
        }]
    );
    let other = env
        .hot
        .wait_and_claim("w2", 8, Duration::from_millis(100))
        .await
        .expect("second waiter");
    assert!(other.is_empty(), "{other:?}");
    stop.cancel();
    handle.await.expect("projector task");
}

#[tokio::test]
async fn worker_claims_heartbeats_and_reports() {
    let mut env = Env::new(test_config(Duration::from_millis(200))).await;
    let wf = env
        .create(vec![NodeSpec::task("resize")], json!({"img": 7}))
        .await;
    env.exec(wf, Op::Start { node: 0 }).await;
    let (stop, handle) = env.spawn_projector();
    env.caught_up().await;

    let mut claimed = env
        .hot
        .wait_and_claim("w1", 8, Duration::from_secs(5))
        .await
        .expect("wake and claim");
    assert_eq!(claimed.len(), 1, "{claimed:?}");
    let job = claimed.pop().expect("a job is due");
    let key = JobKey {
        sig: sig(wf, 0),
        attempt: 1,
    };
    assert_eq!(job.key, key);
    assert_eq!(job.task, "resize");
    assert_eq!(job.input, json!({"img": 7}));
    assert_eq!(job.checkpoint, None);
    assert_eq!(env.hot.claim("w2").await.expect("claim"), None);
    assert!(env
        .hot
        .heartbeat(&key, &job.lease)
        .await
        .expect("heartbeat"));
    assert!(
        !env.hot.heartbeat(&key, "a-guess").await.expect("heartbeat"),
        "only the lease's token renews it"
    );

    // The lease runs out without heartbeats: another worker gets the same attempt — here
    // through a wait that ends with no wake token, on a server that lost its scripts (the
    // pipelined claim falls back to loading it).
    tokio::time::sleep(Duration::from_millis(350)).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut env.raw().await)
        .await
        .expect("SCRIPT FLUSH");
    let again = env
        .hot
        .wait_and_claim("w2", 8, Duration::from_millis(50))
        .await
        .expect("claim after the wait");
    assert_eq!(again.iter().map(|j| j.key).collect::<Vec<_>>(), vec![key]);
    let lease = again[0].lease.clone();
    assert_ne!(lease, job.lease, "every claim hands out a lease of its own");

    // The first worker's lease is lost: its heartbeat says so, and its report is dropped
    // without ending the job the second one runs.
    assert!(!env
        .hot
        .heartbeat(&key, &job.lease)
        .await
        .expect("heartbeat"));
    let stale = Report {
        key,
        worker: "w1".into(),
        outcome: ReportOutcome::Failed {
            message: "stopped".into(),
            retryable: true,
        },
        lease: Some(job.lease.clone()),
    };
    assert!(matches!(
        env.hot.report(&stale).await,
        Err(mageflow_hot::HotError::LeaseLost(k)) if k == key
    ));
    assert_eq!(env.count("XLEN", "reports").await, 0);
    assert_eq!(env.count("ZCARD", "jobs").await, 1);

    let report = Report {
        key,
        worker: "w2".into(),
        outcome: ReportOutcome::Succeeded(json!({"ok": true})),
        lease: Some(lease.clone()),
    };
    let id = env.hot.report(&report).await.expect("report");
    assert_eq!(env.count("ZCARD", "jobs").await, 0);
    assert_eq!(env.count("HLEN", "jobdata").await, 0);
    assert!(!env.hot.heartbeat(&key, &lease).await.expect("heartbeat"));
    // The lease stays until the attempt's end is projected: the orchestrator checks it.
    assert_eq!(
        env.hot.leases(&[key]).await.expect("leases"),
        vec![Some(lease.clone())]
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(env.hot.claim("w1").await.expect("claim"), None);

    let reports = env
        .hot
        .read_reports("0", 10, Duration::from_millis(100))
        .await
        .expect("read reports");
    assert_eq!(reports.len(), 1);
    assert_eq!((&reports[0].id, &reports[0].report), (&id, &report));
    assert_eq!(reports[0].mac, None, "no secret configured: unsigned");
    let none = env
        .hot
        .read_reports(&id, 10, Duration::from_millis(50))
        .await
        .expect("read reports");
    assert!(none.is_empty());
    env.hot.trim_reports(&id).await.expect("trim");
    assert_eq!(env.count("XLEN", "reports").await, 0);

    // The orchestrator records the outcome; the projection follows.
    env.exec(
        wf,
        Op::Complete {
            node: 0,
            attempt: 1,
            result: json!({"ok": true}),
        },
    )
    .await;
    env.caught_up().await;
    let s = env.hot.signature(sig(wf, 0)).await.expect("read");
    assert_eq!(s.map(|s| s.status), Some("done".to_owned()));
    assert_eq!(env.hot.leases(&[key]).await.expect("leases"), vec![None]);
    stop.cancel();
    handle.await.expect("projector task");
    env.hot.clear().await.expect("clear");
}

#[tokio::test]
async fn interrupt_revokes_the_running_job() {
    let mut env = Env::new(test_config(Duration::from_secs(30))).await;
    let wf = env.create(vec![NodeSpec::task("slow")], json!({})).await;
    env.exec(wf, Op::Start { node: 0 }).await;
    let (stop, handle) = env.spawn_projector();
    env.caught_up().await;
    let mut stops = env.hot.stops().await.expect("subscribe");
    let job = env.hot.claim("w1").await.expect("claim").expect("job");

    env.exec(wf, Op::Interrupt { node: 0 }).await;
    let revoked = tokio::time::timeout(Duration::from_secs(5), stops.recv())
        .await
        .expect("a stop within 5 s");
    assert_eq!(revoked, Some(job.key));
    env.caught_up().await;
    assert_eq!(env.count("ZCARD", "jobs").await, 0);
    assert!(!env
        .hot
        .heartbeat(&job.key, &job.lease)
        .await
        .expect("heartbeat"));
    let s = env.hot.signature(sig(wf, 0)).await.expect("read");
    assert_eq!(s.map(|s| s.status), Some("interrupted".to_owned()));

    // The handler stops and says so: the attempt is over, its lease with it, and the report
    // is dropped.
    let report = Report {
        key: job.key,
        worker: "w1".into(),
        outcome: ReportOutcome::Stopped,
        lease: Some(job.lease.clone()),
    };
    assert!(matches!(
        env.hot.report(&report).await,
        Err(mageflow_hot::HotError::LeaseLost(_))
    ));
    let reports = env
        .hot
        .read_reports("0", 10, Duration::ZERO)
        .await
        .expect("read");
    assert!(reports.is_empty());
    stop.cancel();
    handle.await.expect("projector task");
    env.hot.clear().await.expect("clear");
}

#[tokio::test]
async fn rebuilds_after_the_hot_state_vanishes() {
    let mut env = Env::new(test_config(Duration::from_secs(30))).await;
    let done = env.create(vec![NodeSpec::task("quick")], json!({})).await;
    env.exec(done, Op::Start { node: 0 }).await;
    env.exec(
        done,
        Op::Complete {
            node: 0,
            attempt: 1,
            result: json!(1),
        },
    )
    .await;
    let running = env
        .create(swarm("fan", &["i1", "i2"]), json!({"n": 1}))
        .await;
    env.exec(running, Op::Start { node: 1 }).await;
    let projector = Projector::new(env.hot.clone(), env.log());
    let stats = projector.stats();
    let (stop, handle) = env.spawn(projector);
    env.caught_up().await;
    let swarm_key = format!("swarm:{}", sig(running, 0));
    let mut conn = env.raw().await;
    let counters: HashMap<String, u32> = redis::cmd("HGETALL")
        .arg(env.hot.key(&swarm_key))
        .query_async(&mut conn)
        .await
        .expect("HGETALL");
    assert_eq!(counters.get("dispatched"), Some(&2));
    assert_eq!(counters.get("running"), Some(&2));
    assert_eq!(env.count("ZCARD", "jobs").await, 1);
    assert_eq!(stats.rebuilds.load(Ordering::Relaxed), 0);

    // Everything under the prefix disappears (FLUSHALL, a Redis restart without persistence).
    assert!(env.hot.clear().await.expect("clear") > 0);
    env.caught_up().await;
    assert_eq!(stats.rebuilds.load(Ordering::Relaxed), 1);
    let job = env.hot.claim("w1").await.expect("claim");
    assert_eq!(
        job.map(|j| (j.key, j.input)),
        Some((
            JobKey {
                sig: sig(running, 1),
                attempt: 1
            },
            json!({"n": 1})
        ))
    );
    let s = env.hot.signature(sig(done, 0)).await.expect("read");
    assert_eq!(s.map(|s| s.status), Some("done".to_owned()));
    assert_eq!(env.count("XLEN", "tail").await, env.log.head());

    // New events after the rebuild keep flowing.
    env.exec(running, Op::Start { node: 2 }).await;
    env.caught_up().await;
    assert_eq!(env.count("ZCARD", "jobs").await, 2);

    // Wiped right before a batch, while the projector holds the position check it made with
    // the previous batch: that batch is not applied onto the empty server; it rebuilds.
    assert!(env.hot.clear().await.expect("clear") > 0);
    env.exec(
        running,
        Op::Complete {
            node: 2,
            attempt: 1,
            result: json!(2),
        },
    )
    .await;
    env.caught_up().await;
    assert_eq!(stats.rebuilds.load(Ordering::Relaxed), 2);
    let s = env.hot.signature(sig(done, 0)).await.expect("read");
    assert_eq!(s.map(|s| s.status), Some("done".to_owned()));
    assert_eq!(env.count("ZCARD", "jobs").await, 1);
    assert_eq!(env.count("XLEN", "tail").await, env.log.head());
    stop.cancel();
    handle.await.expect("projector task");

    // On-demand rebuild reports progress up to the head.
    let mut projector = Projector::new(env.hot.clone(), env.log());
    let mut seen = Vec::new();
    let pos = projector
        .rebuild(|done, head| seen.push((done, head)))
        .await
        .expect("rebuild");
    let head = env.log.head();
    assert_eq!(pos, head);
    assert_eq!(seen.last(), Some(&(head, head)));
    assert_eq!(env.count("ZCARD", "jobs").await, 1);
    assert_eq!(projector.stats().rebuilds.load(Ordering::Relaxed), 1);
    env.hot.clear().await.expect("clear");
}

#[tokio::test]
async fn connect_to_a_closed_port_names_the_url() {
    let cfg = HotConfig::new("redis://127.0.0.1:1", "mf:test:unused:");
    let err = Hot::connect(cfg)
        .await
        .expect_err("nothing listens on port 1");
    let msg = err.to_string();
    assert!(msg.contains("redis://127.0.0.1:1"), "{msg}");
    assert!(msg.contains("cannot reach Redis"), "{msg}");
}
