//! The HTTP API through a real HTTP client (`ureq`) against a server on a loopback port, on the
//! in-memory and the embedded (sled) store and on the PostgreSQL + Redis deployment (an
//! orchestrator and a worker runtime in this process, a schema and key prefix of their own): every role against every endpoint, submit with an
//! idempotency key, the list with filters and pages, a tree, a signature's detail, history in
//! pages, control recorded with the token's name, the error shape and limits, and an event
//! stream resumed with `Last-Event-ID`, nothing missed or doubled.

use anyhow::{Context, Result};
use mageflow::control::Role;
use mageflow::{Config, Registry};
use mageflow_server::{Access, Api, Tokens};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::sync::Arc;

#[allow(clippy::large_enum_variant)] // one per test
enum Running {
    Engine(mageflow::Engine),
    Cluster {
        cluster: mageflow::cluster::Cluster,
        worker: tokio::task::JoinHandle<()>,
        stop: tokio_util::sync::CancellationToken,
        url: String,
        schema: String,
        redis: String,
        prefix: String,
    },
}

struct Server {
    base: String,
    tokens: BTreeMap<&'static str, String>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    running: Option<Running>,
    _dir: tempfile::TempDir,
}

#[derive(Clone, Copy)]
enum Store {
    Memory,
    Sled,
    Cluster,
}

/// A deployment of its own: a fresh schema and key prefix.
async fn deployment(registry: Registry) -> Result<Running> {
    let url = std::env::var("MAGEFLOW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let redis =
        std::env::var("MAGEFLOW_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let schema = format!("mf_http_{}", uuid::Uuid::new_v4().simple());
    let prefix = format!("mf:http:{schema}:");
    let mut config = mageflow::cluster::ClusterConfig::new(url.clone(), redis.clone(), &prefix);
    config.pg.schema = Some(schema.clone());
    let cluster =
        mageflow::cluster::open_cluster(config.clone(), registry.clone(), Config::default())
            .await
            .with_context(|| {
                format!(
                "this test needs PostgreSQL at {url} (MAGEFLOW_TEST_POSTGRES) and Redis at {redis} \
                 (MAGEFLOW_TEST_REDIS); start Redis with: redis-server --daemonize yes"
            )
            })?;
    let stop = tokio_util::sync::CancellationToken::new();
    let (hot, token) = (config.hot.clone(), stop.clone());
    let worker = tokio::spawn(async move {
        let worker = mageflow::engine::worker::WorkerConfig {
            worker_id: "http-test-worker".into(),
            ..Default::default()
        };
        if let Err(e) = mageflow::cluster::run_worker_process(hot, registry, worker, token).await {
            eprintln!("the test's worker runtime failed: {e}");
        }
    });
    Ok(Running::Cluster {
        cluster,
        worker,
        stop,
        url,
        schema,
        redis,
        prefix,
    })
}

impl Server {
    async fn start(store: Store) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut registry = Registry::new();
        mageflow::engine::builtin::register(&mut registry);
        let config = Config::default();
        let running = match store {
            Store::Memory => Running::Engine(mageflow::open_in_memory(registry, config).await?),
            Store::Sled => Running::Engine(
                mageflow::open_embedded(dir.path().join("store"), registry, config).await?,
            ),
            Store::Cluster => deployment(registry).await?,
        };
        let handle = match &running {
            Running::Engine(e) => e.handle(),
            Running::Cluster { cluster, .. } => cluster.handle(),
        };
        let file = dir.path().join("tokens.toml");
        let mut tokens = BTreeMap::new();
        for (name, role) in [
            ("viewer", Role::Viewer),
            ("auditor", Role::Auditor),
            ("operator", Role::Operator),
            ("admin", Role::Admin),
        ] {
            tokens.insert(name, Tokens::create(&file, name, role)?);
        }
        let access = Access::Tokens(Arc::new(Tokens::load(&file)?));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(mageflow_server::serve(
            listener,
            Api::new(handle, access),
            async {
                let _ = stopped.await;
            },
        ));
        Ok(Self {
            base,
            tokens,
            stop: Some(stop),
            running: Some(running),
            _dir: dir,
        })
    }

    async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        match self.running.take() {
            Some(Running::Engine(e)) => e.shutdown().await,
            Some(Running::Cluster {
                cluster,
                worker,
                stop,
                url,
                schema,
                redis,
                prefix,
            }) => {
                stop.cancel();
                let _ = worker.await;
                cluster.shutdown().await;
                let _ = tokio::task::spawn_blocking(move || {
                    let _ = mageflow::hot::clear_prefix_blocking(&redis, &prefix);
                    let _ = mageflow::store_pg::drop_schema_blocking(&url, &schema);
                })
                .await;
            }
            None => {}
        }
    }

    /// A request as `who` (a role's token, or none): (status, JSON body).
    async fn call(
        &self,
        who: Option<&str>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        let url = format!("{}{path}", self.base);
        let token = who.and_then(|w| self.tokens.get(w)).cloned();
        let method = method.to_owned();
        tokio::task::spawn_blocking(move || {
            let mut req = ureq::request(&method, &url);
            if let Some(t) = token {
                req = req.set("Authorization", &format!("Bearer {t}"));
            }
            let res = match body {
                Some(b) => req.send_string(&b.to_string()),
                None => req.call(),
            };
            let res = match res {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => return Err(anyhow::anyhow!("{e}")),
            };
            let status = res.status();
            let text = res.into_string()?;
            let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
            Ok((status, value))
        })
        .await?
    }
}

fn definition(task: &str) -> Value {
    json!({"root": {"chain": {"name": "pipeline", "steps": [
        {"task": {"task": "noop"}},
        {"task": {"task": task, "with": {"kwargs": {"ms": 600000}}}}
    ]}}, "input": {}})
}

async fn every_role_gets_what_its_role_allows(store: Store) -> Result<()> {
    let s = Server::start(store).await?;
    let (status, created) = s
        .call(
            Some("operator"),
            "POST",
            "/api/v1/workflows",
            Some(definition("sleep")),
        )
        .await?;
    assert_eq!(status, 201, "{created}");
    let wf = created["id"].as_str().context("an id")?.to_owned();
    let reads = [
        "/api/v1/workflows".to_string(),
        format!("/api/v1/workflows/{wf}"),
        format!("/api/v1/workflows/{wf}/nodes/0"),
        format!("/api/v1/workflows/{wf}/nodes/0/children"),
    ];
    for who in [
        None,
        Some("viewer"),
        Some("auditor"),
        Some("operator"),
        Some("admin"),
    ] {
        for path in &reads {
            let (status, body) = s.call(who, "GET", path, None).await?;
            let want = if who.is_none() { 401 } else { 200 };
            assert_eq!(status, want, "{who:?} GET {path}: {body}");
        }
        let (status, _) = s
            .call(who, "GET", &format!("/api/v1/workflows/{wf}/history"), None)
            .await?;
        let want = match who {
            None => 401,
            Some("viewer") => 403,
            _ => 200,
        };
        assert_eq!(status, want, "{who:?} history");
        let (status, body) = s
            .call(who, "POST", "/api/v1/workflows", Some(definition("noop")))
            .await?;
        let want = match who {
            None => 401,
            Some("viewer" | "auditor") => 403,
            _ => 201,
        };
        assert_eq!(status, want, "{who:?} submit: {body}");
        let (status, body) = s
            .call(
                who,
                "POST",
                &format!("/api/v1/signatures/{wf}/suspend"),
                None,
            )
            .await?;
        let want = match who {
            None => 401,
            Some("viewer" | "auditor") => 403,
            _ => 200,
        };
        assert_eq!(status, want, "{who:?} suspend: {body}");
        if status == 403 || status == 401 {
            assert!(
                body["code"].is_string() && body["message"].is_string(),
                "{body}"
            );
        }
    }
    s.shutdown().await;
    Ok(())
}

async fn submit_list_tree_detail_history_and_control(store: Store) -> Result<()> {
    let s = Server::start(store).await?;
    let op = Some("operator");
    // Idempotency: the same key answers the same id, and creates nothing more.
    let url = format!("{}/api/v1/workflows", s.base);
    let token = s.tokens["operator"].clone();
    let send = move |key: &'static str| {
        let (url, token) = (url.clone(), token.clone());
        tokio::task::spawn_blocking(move || -> Result<Value> {
            let r = ureq::post(&url)
                .set("Authorization", &format!("Bearer {token}"))
                .set("Idempotency-Key", key)
                .send_string(&definition("sleep").to_string())?;
            Ok(serde_json::from_str(&r.into_string()?)?)
        })
    };
    let first = send("k-1").await??;
    let again = send("k-1").await??;
    assert_eq!(first["id"], again["id"]);
    let wf = first["id"].as_str().context("id")?.to_owned();
    let (_, other) = s
        .call(op, "POST", "/api/v1/workflows", Some(definition("noop")))
        .await?;
    let other = other["id"].as_str().context("id")?.to_owned();

    // The list: newest first, counts by status, filters, pages.
    let (status, page) = s.call(op, "GET", "/api/v1/workflows?limit=1", None).await?;
    assert_eq!(status, 200, "{page}");
    assert_eq!(page["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(page["items"][0]["id"], json!(other), "newest first");
    let cursor = page["next_cursor"].as_str().context("a next page")?;
    let (_, next) = s
        .call(
            op,
            "GET",
            &format!("/api/v1/workflows?limit=1&cursor={cursor}"),
            None,
        )
        .await?;
    assert_eq!(next["items"][0]["id"], json!(wf));
    assert!(next.get("next_cursor").is_none(), "{next}");
    let (_, filtered) = s
        .call(
            op,
            "GET",
            &format!("/api/v1/workflows?q={}", &wf[3..12]),
            None,
        )
        .await?;
    assert_eq!(
        filtered["items"].as_array().map(Vec::len),
        Some(1),
        "{filtered}"
    );
    let (status, bad) = s
        .call(op, "GET", "/api/v1/workflows?limit=100000", None)
        .await?;
    assert_eq!((status, bad["code"].as_str()), (400, Some("invalid_page")));
    let (status, bad) = s
        .call(op, "GET", "/api/v1/workflows?stauts=done", None)
        .await?;
    assert_eq!(
        (status, bad["code"].as_str()),
        (400, Some("invalid_query")),
        "{bad}"
    );
    let (status, since) = s
        .call(op, "GET", "/api/v1/workflows?created_after=0&limit=5", None)
        .await?;
    assert_eq!(status, 200, "{since}");
    assert_eq!(since["items"].as_array().map(Vec::len), Some(2), "{since}");
    let (_, none) = s
        .call(op, "GET", "/api/v1/workflows?created_before=1", None)
        .await?;
    assert_eq!(none["items"].as_array().map(Vec::len), Some(0), "{none}");

    // The tree, a signature's detail, a page of children; the tree once its first step ended
    // (on the deployment a worker process runs it).
    let mut tree = Value::Null;
    for _ in 0..200 {
        tree = s
            .call(op, "GET", &format!("/api/v1/workflows/{wf}"), None)
            .await?
            .1;
        if tree["root"]["inner"]["done"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(tree["root"]["name"], "pipeline");
    assert_eq!(tree["root"]["children_total"], 2);
    // Its first step ended, its second runs: half done, and an estimate of the rest.
    assert_eq!(tree["progress"], 0.5, "{tree}");
    assert!(tree["eta_ms"].is_u64(), "{tree}");
    let (_, detail) = s
        .call(op, "GET", &format!("/api/v1/workflows/{wf}/nodes/1"), None)
        .await?;
    assert_eq!(detail["kind"], "task");
    assert!(detail["attempts"].is_array(), "{detail}");

    // Control: recorded with the token's name; cancel needs confirm.
    let (status, body) = s
        .call(
            op,
            "POST",
            &format!("/api/v1/signatures/{wf}/cancel"),
            Some(json!({})),
        )
        .await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (428, Some("confirmation_required"))
    );
    let (status, body) = s
        .call(
            op,
            "POST",
            &format!("/api/v1/signatures/{wf}/cancel"),
            Some(json!({"confirm": true})),
        )
        .await?;
    assert_eq!(status, 200, "{body}");
    let (_, history) = s
        .call(
            Some("auditor"),
            "GET",
            &format!("/api/v1/workflows/{wf}/history?limit=2"),
            None,
        )
        .await?;
    assert_eq!(history["events"].as_array().map(Vec::len), Some(2));
    let mut after = history["next_after"].as_u64().context("more history")?;
    let mut canceled_by = None;
    loop {
        let (_, page) = s
            .call(
                Some("auditor"),
                "GET",
                &format!("/api/v1/workflows/{wf}/history?after={after}"),
                None,
            )
            .await?;
        for e in page["events"].as_array().context("events")? {
            if e["payload"].get("canceled").is_some() {
                canceled_by = Some(e["actor"].clone());
            }
        }
        match page["next_after"].as_u64() {
            Some(n) => after = n,
            None => break,
        }
    }
    assert_eq!(canceled_by, Some(json!({"api": {"principal": "operator"}})));

    // Errors: the stable shape, nothing changed.
    let (status, body) = s
        .call(
            op,
            "POST",
            "/api/v1/workflows",
            Some(json!({"root": {"task": {"task": "noop", "bogus": 1}}})),
        )
        .await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_definition")),
        "{body}"
    );
    let (status, body) = s
        .call(op, "GET", "/api/v1/workflows/not-an-id", None)
        .await?;
    assert_eq!((status, body["code"].as_str()), (400, Some("invalid_id")));
    let (status, body) = s
        .call(
            op,
            "GET",
            "/api/v1/workflows/wf_0190a0b0c0d07000800000000000dead",
            None,
        )
        .await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("no_such_workflow")),
        "{body}"
    );
    let big = json!({"root": {"task": {"task": "noop"}}, "input": {"x": "y".repeat(mageflow_server::BODY_BYTES_MAX)}});
    let (status, body) = s.call(op, "POST", "/api/v1/workflows", Some(big)).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("too_large")),
        "{body}"
    );
    s.shutdown().await;
    Ok(())
}

/// The ids of the first `n` events of a stream (from after `last`, if given), read on a thread
/// of its own; the connection is dropped after.
fn read_events(
    url: &str,
    token: &str,
    last: Option<u64>,
    n: usize,
) -> tokio::task::JoinHandle<Result<Vec<u64>>> {
    let (url, token) = (url.to_owned(), token.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut req = ureq::get(&url).set("Authorization", &format!("Bearer {token}"));
        if let Some(l) = last {
            req = req.set("Last-Event-ID", &l.to_string());
        }
        let reader = BufReader::new(req.call()?.into_reader());
        let mut ids = Vec::new();
        for line in reader.lines() {
            if let Some(id) = line?.strip_prefix("id:") {
                ids.push(id.trim().parse()?);
                if ids.len() == n {
                    break;
                }
            }
        }
        Ok(ids)
    })
}

/// The event stream: read some, drop the connection, reconnect with the last id seen: the
/// events that follow, none missed, none twice — from the log (events written before), and
/// live (a client that joins now gets what is written after, through the shared reader).
async fn the_event_stream_resumes_with_last_event_id(store: Store) -> Result<()> {
    let s = Server::start(store).await?;
    for _ in 0..3 {
        s.call(
            Some("operator"),
            "POST",
            "/api/v1/workflows",
            Some(definition("noop")),
        )
        .await?;
    }
    let url = format!("{}/api/v1/events?after=0", s.base);
    let token = s.tokens["auditor"].clone();
    let first = read_events(&url, &token, None, 5).await??;
    let rest = read_events(&url, &token, first.last().copied(), 5).await??;
    let all: Vec<u64> = first.iter().chain(&rest).copied().collect();
    assert_eq!(
        all,
        (1..=10).collect::<Vec<u64>>(),
        "positions 1.. in order, once each"
    );

    // Live: a client from the head on (events of the first workflows may still come, from
    // their workers), then workflows written meanwhile.
    let (_, ready) = s.call(None, "GET", "/readyz", None).await?;
    let head = ready["log_head"].as_u64().context("head")?;
    let url = format!("{}/api/v1/events?after={head}", s.base);
    let token = s.tokens["auditor"].clone();
    let live = read_events(&url, &token, None, 12);
    // Give the client time to connect (an early write is read from the log all the same).
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    for _ in 0..4 {
        s.call(
            Some("operator"),
            "POST",
            "/api/v1/workflows",
            Some(definition("noop")),
        )
        .await?;
    }
    let ids = live.await??;
    assert_eq!(
        ids,
        (head + 1..=head + 12).collect::<Vec<u64>>(),
        "live events in order, once each"
    );
    s.shutdown().await;
    Ok(())
}

/// Bulk control by filter: the dry run counts what the real call then touches, and changes
/// nothing; a viewer may do neither. The registry, stats and metrics read back.
async fn bulk_control_dry_run_counts_what_the_call_touches(store: Store) -> Result<()> {
    let s = Server::start(store).await?;
    let op = Some("operator");
    for _ in 0..3 {
        s.call(op, "POST", "/api/v1/workflows", Some(definition("sleep")))
            .await?;
    }
    // One that ends at once, under another name: the filter leaves it out.
    let quick = json!({"root": {"task": {"task": "noop"}}, "input": {}});
    s.call(op, "POST", "/api/v1/workflows", Some(quick)).await?;
    let filter = json!({"filter": {"status": "running", "name": "pipeline"}, "dry_run": true});
    let (status, body) = s
        .call(
            Some("viewer"),
            "POST",
            "/api/v1/workflows/bulk/suspend",
            Some(filter.clone()),
        )
        .await?;
    assert_eq!(status, 403, "{body}");
    let (status, dry) = s
        .call(op, "POST", "/api/v1/workflows/bulk/suspend", Some(filter))
        .await?;
    assert_eq!(status, 200, "{dry}");
    let matched = dry["matched"].as_u64().context("matched")?;
    assert_eq!(matched, 3, "{dry}");
    let (_, list) = s
        .call(op, "GET", "/api/v1/workflows?status=suspended", None)
        .await?;
    assert_eq!(
        list["items"].as_array().map(Vec::len),
        Some(0),
        "a dry run changes nothing"
    );
    let ids: Vec<Value> = dry["workflows"].as_array().context("ids")?.clone();
    let real = json!({"filter": {"status": "running", "name": "pipeline"}});
    let (_, done) = s
        .call(op, "POST", "/api/v1/workflows/bulk/suspend", Some(real))
        .await?;
    assert_eq!(done["matched"], dry["matched"], "{done}");
    assert_eq!(done["done"].as_u64(), Some(matched), "{done}");
    let (_, suspended) = s
        .call(op, "GET", "/api/v1/workflows?status=suspended", None)
        .await?;
    let mut got: Vec<Value> = suspended["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(|i| i["id"].clone())
        .collect();
    let mut want = ids;
    got.sort_by_key(|v| v.to_string());
    want.sort_by_key(|v| v.to_string());
    assert_eq!(got, want, "the call touched what the dry run counted");

    let (_, tasks) = s.call(Some("viewer"), "GET", "/api/v1/tasks", None).await?;
    let names: Vec<&str> = tasks["tasks"]
        .as_array()
        .context("tasks")?
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert!(
        names.contains(&"sleep") && names.contains(&"noop"),
        "{tasks}"
    );
    let (_, stats) = s.call(Some("viewer"), "GET", "/api/v1/stats", None).await?;
    assert!(
        stats["engine"]["events_written_total"].as_u64() > Some(0),
        "{stats}"
    );
    assert_eq!(
        stats["workflows_by_status"]["suspended"].as_u64(),
        Some(matched)
    );
    // Per task, from the log: three sleeps started (and still run), the noops succeeded.
    let sleep = &stats["tasks"]["sleep"];
    assert_eq!(sleep["started"].as_u64(), Some(3), "{stats}");
    assert_eq!(sleep["succeeded"].as_u64(), Some(0), "{stats}");
    let noop = &stats["tasks"]["noop"];
    assert!(noop["succeeded"].as_u64() >= Some(4), "{stats}");
    assert_eq!(noop["failure_rate"].as_f64(), Some(0.0), "{stats}");
    assert!(
        noop["p99_ms"].as_f64() >= noop["p50_ms"].as_f64(),
        "{stats}"
    );
    let (status, metrics) = s.call(Some("viewer"), "GET", "/metrics", None).await?;
    assert_eq!(status, 200);
    let text = metrics.as_str().context("text")?;
    assert!(text.contains("mageflow_events_written_total "), "{text}");
    assert!(
        text.contains("mageflow_task_attempts_started_total{task=\"sleep\"} 3"),
        "{text}"
    );
    assert!(text.contains(&format!(
        "mageflow_workflows{{status=\"suspended\"}} {matched}"
    )));
    let (status, _) = s.call(None, "GET", "/metrics", None).await?;
    assert_eq!(status, 401);
    s.shutdown().await;
    Ok(())
}

/// The served OpenAPI document is the one checked into `docs/` (no token needed for it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_openapi_document_is_the_checked_in_one() -> Result<()> {
    let s = Server::start(Store::Memory).await?;
    let (status, served) = s.call(None, "GET", "/api/v1/openapi.json", None).await?;
    assert_eq!(status, 200);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi.json");
    let checked_in: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    assert_eq!(served, checked_in);
    assert!(served["paths"]["/api/v1/workflows"]["post"].is_object());
    s.shutdown().await;
    Ok(())
}

macro_rules! on_stores {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn memory() -> anyhow::Result<()> {
                super::$name(super::Store::Memory).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sled() -> anyhow::Result<()> {
                super::$name(super::Store::Sled).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres_redis() -> anyhow::Result<()> {
                super::$name(super::Store::Cluster).await
            }
        }
    )*};
}

on_stores!(
    every_role_gets_what_its_role_allows,
    submit_list_tree_detail_history_and_control,
    the_event_stream_resumes_with_last_event_id,
    bulk_control_dry_run_counts_what_the_call_touches,
);
