//! The CLI as a first-day user and an operator meet it: the built `mageflow` binary run on
//! stores made for the test, checking what it prints, what it exits with, and that a command
//! that only reads never creates or changes a store.

use anyhow::{Context, Result};
use mageflow::{sign, swarm, Config, Registry, WorkflowId};
use serde_json::json;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};

fn mageflow(args: &[&str]) -> Result<Output> {
    Ok(Command::new(env!("CARGO_BIN_EXE_mageflow"))
        .args(args)
        .env_remove("MAGEFLOW_STORE")
        .env_remove("MAGEFLOW_POSTGRES")
        .env_remove("MAGEFLOW_REDIS")
        .env_remove("MAGEFLOW_LOG")
        .env_remove("RUST_LOG")
        .output()?)
}

fn text(out: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}\n--- stderr\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn store_arg(dir: &Path) -> String {
    format!("embedded:{}", dir.display())
}

fn registry() -> Registry {
    let mut r = Registry::new();
    mageflow::engine::builtin::register(&mut r);
    r
}

/// A store holding one finished two-item swarm of `echo`s.
async fn store_with_a_workflow(dir: &Path) -> Result<WorkflowId> {
    let engine = mageflow::open_embedded(dir, registry(), Config::default()).await?;
    let h = engine.handle();
    let items = vec![sign("echo").kwarg("x", 1), sign("echo").kwarg("x", 2)];
    let wf = h.submit(swarm(items).name("pair"), json!({})).await?;
    h.wait(wf).await?;
    drop(h);
    engine.shutdown().await;
    Ok(wf)
}

fn entries(dir: &Path) -> Result<Vec<String>> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_>>()?;
    names.sort();
    Ok(names)
}

const WF: &str = "wf_0192b5f0c0de7a1e8e6b1f2a3b4c5d6e";

#[test]
fn reading_commands_refuse_a_directory_without_a_store_and_create_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = store_arg(dir.path());
    let commands: Vec<Vec<&str>> = vec![
        vec!["verify", "--store", &store],
        vec!["history", "--store", &store, WF],
        vec!["suspend", WF, "--store", &store],
        vec!["resume", WF, "--store", &store],
        vec!["interrupt", WF, "--store", &store],
        vec!["cancel", WF, "--confirm", "--store", &store],
        vec!["delete", WF, "--store", &store],
        vec!["restore", WF, "--store", &store],
        vec!["rerun", WF, "--store", &store],
    ];
    for args in &commands {
        let out = mageflow(args)?;
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("no store at"), "{args:?}: {}", text(&out));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("ok:"));
        assert_eq!(
            entries(dir.path())?,
            Vec::<String>::new(),
            "{args:?} wrote files"
        );
    }
    // A directory that does not exist is not created either.
    let gone = dir.path().join("nope");
    let out = mageflow(&["verify", "--store", &store_arg(&gone)])?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    assert!(!gone.exists());
    Ok(())
}

/// `serve` on an empty directory creates the store and says so before serving.
#[test]
fn serve_says_it_created_a_store() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut serve = Command::new(env!("CARGO_BIN_EXE_mageflow"))
        .args(["serve", "--store", &store_arg(dir.path())])
        .env_remove("MAGEFLOW_LOG")
        .stdout(Stdio::piped())
        .spawn()?;
    let lines = lines_until(&mut serve, "serving")?;
    stop(&mut serve)?;
    assert!(
        lines.iter().any(|l| l.contains("created a new store at")),
        "{lines:?}"
    );
    Ok(())
}

/// Read `child`'s stdout lines until one contains `marker` (which is the synchronization: no
/// sleeps); all lines so far.
fn lines_until(child: &mut Child, marker: &str) -> Result<Vec<String>> {
    let stdout = child.stdout.take().context("piped stdout")?;
    let mut lines = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line?;
        let done = line.contains(marker);
        lines.push(line);
        if done {
            return Ok(lines);
        }
    }
    anyhow::bail!("the process ended before printing {marker:?}: {lines:?}")
}

fn stop(child: &mut Child) -> Result<()> {
    let pid = child.id().to_string();
    Command::new("kill").args(["-TERM", &pid]).status()?;
    child.wait()?;
    Ok(())
}

/// A store whose sled log file was deleted is reported as missing that file, not as corrupt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_sled_file_is_missing_not_corrupt() -> Result<()> {
    let dir = tempfile::tempdir()?;
    store_with_a_workflow(dir.path()).await?;
    std::fs::remove_file(dir.path().join("db"))?;
    let out = mageflow(&["verify", "--store", &store_arg(dir.path())])?;
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing"), "{}", text(&out));
    assert!(!err.contains("corrupt"), "{}", text(&out));
    assert!(
        !dir.path().join("db").exists(),
        "verify recreated sled's file"
    );
    Ok(())
}

/// `state` folds the log: every signature with its name, kind, status and attempt; `--json`
/// the same as one object; a `sig_…` shows that signature and what is under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_prints_the_folded_state() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wf = store_with_a_workflow(dir.path()).await?;
    let store = store_arg(dir.path());
    let out = mageflow(&["state", "--store", &store, &wf.to_string()])?;
    assert!(out.status.success(), "{}", text(&out));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains(&format!("sig_{}.0", wf.0.simple())), "{s}");
    assert!(
        s.contains("swarm") && s.contains("pair") && s.contains("echo"),
        "{s}"
    );
    assert_eq!(s.matches(" done ").count(), 3, "{s}");

    let out = mageflow(&["state", "--store", &store, &wf.to_string(), "--json"])?;
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let nodes = v["nodes"].as_array().context("nodes")?;
    assert_eq!(nodes.len(), 3, "{v}");
    assert_eq!(nodes[0]["kind"], "swarm");
    assert_eq!(nodes[1]["kind"], "task");
    assert_eq!(nodes[1]["task"], "echo");
    assert_eq!(nodes[1]["status"], "done");
    assert_eq!(nodes[1]["attempt"], 1);
    assert_eq!(v["snapshot_of_live_store"], false);

    let sig = format!("sig_{}.2", wf.0.simple());
    let out = mageflow(&["state", "--store", &store, &sig, "--json"])?;
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["nodes"].as_array().map(Vec::len), Some(1), "{v}");
    assert_eq!(v["nodes"][0]["signature"], sig.as_str());

    let out = mageflow(&[
        "state",
        "--store",
        &store,
        &format!("sig_{}.9", wf.0.simple()),
    ])?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no signature 9"));
    Ok(())
}

/// `history sig_…` shows that signature's events (and the one that created it), not its
/// siblings'.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_of_a_signature_shows_only_its_events() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wf = store_with_a_workflow(dir.path()).await?;
    let store = store_arg(dir.path());
    let lines = |id: &str| -> Result<Vec<serde_json::Value>> {
        let out = mageflow(&["history", "--store", &store, id, "--json"])?;
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| Ok(serde_json::from_str(l)?))
            .collect()
    };
    let all = lines(&wf.to_string())?;
    let one = lines(&format!("sig_{}.1", wf.0.simple()))?;
    assert!(one.len() < all.len(), "{one:?}");
    let kinds: Vec<&str> = one
        .iter()
        .filter_map(|e| e["payload"].as_object()?.keys().next().map(String::as_str))
        .collect();
    assert_eq!(kinds.first(), Some(&"workflow_created"), "{one:?}");
    assert!(
        kinds.contains(&"started") && kinds.contains(&"succeeded"),
        "{kinds:?}"
    );
    for e in &one[1..] {
        let payload = e["payload"].as_object().context("payload")?;
        let body = payload.values().next().context("body")?;
        let node = body.get("node").or_else(|| body.get("swarm"));
        assert_eq!(node.and_then(|n| n.as_u64()), Some(1), "{e}");
    }
    Ok(())
}

/// A store that a running `serve` holds is read through a snapshot, and the output says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_store_that_serve_holds() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wf = {
        let engine = mageflow::open_embedded(dir.path(), registry(), Config::default()).await?;
        let h = engine.handle();
        let wf = h
            .submit(sign("sleep").kwarg("ms", 600_000), json!({}))
            .await?;
        while !h.workflow(wf).await?.nodes[0].in_flight {
            tokio::task::yield_now().await;
        }
        drop(h);
        engine.shutdown().await;
        wf
    };
    let store = store_arg(dir.path());
    let mut serve = Command::new(env!("CARGO_BIN_EXE_mageflow"))
        .args(["serve", "--store", &store])
        .env_remove("MAGEFLOW_LOG")
        .stdout(Stdio::piped())
        .spawn()?;
    let result = (|| -> Result<()> {
        lines_until(&mut serve, "serving")?;
        for args in [
            vec!["state", "--store", &store, &wf.to_string()],
            vec!["history", "--store", &store, &wf.to_string()],
            vec!["verify", "--store", &store],
        ] {
            let out = mageflow(&args)?;
            assert!(out.status.success(), "{args:?}: {}", text(&out));
            let s = String::from_utf8_lossy(&out.stdout);
            assert!(s.contains("snapshot of the live store"), "{args:?}: {s}");
        }
        let out = mageflow(&["state", "--store", &store, &wf.to_string()])?;
        assert!(String::from_utf8_lossy(&out.stdout).contains("running"));
        // A command that writes is refused while serve holds the store, in plain words.
        let out = mageflow(&["suspend", &wf.to_string(), "--store", &store])?;
        assert!(!out.status.success(), "{}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("in use by another process"), "{err}");
        assert!(
            !err.contains("Os {") && !err.contains("WouldBlock"),
            "{err}"
        );
        Ok(())
    })();
    stop(&mut serve)?;
    result
}

fn postgres_url() -> String {
    std::env::var("MAGEFLOW_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// A fresh schema name, dropped with the guard.
struct Schema(String);

impl Schema {
    fn new(what: &str) -> Self {
        Self(format!("mf_cli_{what}_{}", uuid::Uuid::now_v7().simple()))
    }
}

impl Drop for Schema {
    fn drop(&mut self) {
        let _ = mageflow::store_pg::drop_schema_blocking(&postgres_url(), &self.0);
    }
}

async fn schema_exists(name: &str) -> Result<bool> {
    use sqlx::Connection;
    let mut c = sqlx::postgres::PgConnection::connect(&postgres_url()).await?;
    let n: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.schemata WHERE schema_name = $1",
    )
    .bind(name)
    .fetch_one(&mut c)
    .await?;
    Ok(n > 0)
}

/// `history`, `state` and `verify` on PostgreSQL (no Redis needed), and a schema without a log
/// is refused and not created.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_commands_on_postgres() -> Result<()> {
    let schema = Schema::new("read");
    let options = mageflow::store_pg::PgOptions {
        schema: Some(schema.0.clone()),
        ..Default::default()
    };
    let engine = mageflow::open_postgres(&postgres_url(), options, registry(), Config::default())
        .await
        .context("this test needs PostgreSQL at MAGEFLOW_TEST_POSTGRES (or 127.0.0.1:5432/test)")?;
    let h = engine.handle();
    let wf = h
        .submit(swarm(vec![sign("echo").kwarg("x", 1)]), json!({}))
        .await?;
    h.wait(wf).await?;
    drop(h);
    engine.shutdown().await;

    let url = postgres_url();
    let pg = ["--postgres", url.as_str(), "--schema", schema.0.as_str()];
    let run = |cmd: &[&str]| mageflow(&[cmd, &pg[..]].concat());
    let out = run(&["state", &wf.to_string(), "--json"])?;
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["nodes"][1]["status"], "done", "{v}");
    let out = run(&["history", &wf.to_string()])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("succeeded"));
    let out = run(&["verify"])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("ok: "));

    let empty = Schema::new("none");
    for cmd in [vec!["verify"], vec!["state", WF], vec!["history", WF]] {
        let out = mageflow(
            &[
                &cmd[..],
                &["--postgres", url.as_str(), "--schema", empty.0.as_str()],
            ]
            .concat(),
        )?;
        assert!(!out.status.success(), "{}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no mageflow log"),
            "{}",
            text(&out)
        );
    }
    assert!(
        !schema_exists(&empty.0).await?,
        "a read-only command created a schema"
    );
    Ok(())
}

/// `migrate` needs PostgreSQL only: no Redis given, and it creates the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_needs_postgres_only() -> Result<()> {
    let schema = Schema::new("migrate");
    let out = mageflow(&[
        "migrate",
        "--postgres",
        &postgres_url(),
        "--schema",
        &schema.0,
    ])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(schema_exists(&schema.0).await?);
    Ok(())
}

/// A local port nothing listens on (bound, then let go).
fn closed_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// `serve` with Redis down changes nothing on PostgreSQL (no schema, no migration, no lock),
/// and its message shows the Redis URL with the password masked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_checks_every_service_first_and_masks_passwords() -> Result<()> {
    let schema = Schema::new("serve");
    let redis = format!("redis://:hunter2@127.0.0.1:{}", closed_port()?);
    let out = mageflow(&[
        "serve",
        "--postgres",
        &postgres_url(),
        "--schema",
        &schema.0,
        "--redis",
        &redis,
    ])?;
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    assert!(all.contains("Redis"), "{all}");
    assert!(all.contains("redis://:***@127.0.0.1"), "{all}");
    assert!(!all.contains("hunter2"), "{all}");
    assert!(
        !schema_exists(&schema.0).await?,
        "serve migrated before checking Redis"
    );

    // PostgreSQL down: its URL's password is masked too, in serve and in the read commands.
    let pg = format!(
        "postgres://postgres:hunter2@127.0.0.1:{}/test",
        closed_port()?
    );
    for args in [
        vec![
            "serve",
            "--postgres",
            &pg,
            "--redis",
            "redis://127.0.0.1:6379",
        ],
        vec!["verify", "--postgres", &pg],
        vec!["migrate", "--postgres", &pg],
    ] {
        let out = mageflow(&args)?;
        assert!(!out.status.success(), "{}", text(&out));
        let all = text(&out);
        assert!(all.contains("postgres://postgres:***@127.0.0.1"), "{all}");
        assert!(!all.contains("hunter2"), "{all}");
    }
    Ok(())
}

/// `verify` warns (and still succeeds) when the acknowledged-position guard is gone or garbled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_warns_about_a_missing_or_unreadable_head_guard() -> Result<()> {
    let dir = tempfile::tempdir()?;
    store_with_a_workflow(dir.path()).await?;
    let store = store_arg(dir.path());
    let out = mageflow(&["verify", "--store", &store])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("warning"),
        "{}",
        text(&out)
    );

    let guard = dir.path().join("mageflow.head");
    std::fs::remove_file(&guard)?;
    let out = mageflow(&["verify", "--store", &store])?;
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("mageflow.head is missing"),
        "{err}"
    );

    std::fs::write(&guard, b"garbage")?;
    let out = mageflow(&["verify", "--store", &store])?;
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning") && err.contains("unreadable"),
        "{err}"
    );
    assert!(err.contains("7 bytes, expected 12"), "{err}");
    Ok(())
}

/// `demo --items N` runs for small swarms too (the suspend used to miss a swarm that finished
/// between two looks and fail), and `--items 0` is refused with a message.
#[test]
fn demo_runs_for_every_swarm_size() -> Result<()> {
    for items in ["1", "2", "7", "140"] {
        let dir = tempfile::tempdir()?;
        let store = store_arg(dir.path());
        let out = mageflow(&["demo", "--store", &store, "--items", items, "--no-progress"])?;
        assert!(out.status.success(), "--items {items}: {}", text(&out));
        let s = String::from_utf8_lossy(&out.stdout);
        assert!(s.contains("demo finished as expected"), "{s}");
        assert!(s.contains("created a new store at"), "{s}");
        assert!(s.contains("0 started while suspended"), "{s}");
    }
    let dir = tempfile::tempdir()?;
    let out = mageflow(&["demo", "--store", &store_arg(dir.path()), "--items", "0"])?;
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--items 0") && err.contains("at least 1"),
        "{err}"
    );
    assert_eq!(entries(dir.path())?, Vec::<String>::new());
    Ok(())
}

fn mageflow_env(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mageflow"));
    c.args(args);
    for var in ["MAGEFLOW_STORE", "MAGEFLOW_LOG", "RUST_LOG", "NO_COLOR"] {
        c.env_remove(var);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    Ok(c.output()?)
}

/// The log filter comes from MAGEFLOW_LOG, else RUST_LOG; an invalid one is refused naming its
/// variable; `--log-format json` gives JSON lines; piped logs carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_filter_and_format() -> Result<()> {
    let dir = tempfile::tempdir()?;
    store_with_a_workflow(dir.path()).await?;
    let store = store_arg(dir.path());
    let verify = ["verify", "--store", store.as_str()];

    for var in ["MAGEFLOW_LOG", "RUST_LOG"] {
        let out = mageflow_env(&verify, &[(var, "warn,=x")])?;
        assert!(!out.status.success(), "{var}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains(var) && err.contains("not a valid log filter"),
            "{err}"
        );
    }
    // MAGEFLOW_LOG wins over RUST_LOG.
    let out = mageflow_env(
        &verify,
        &[("MAGEFLOW_LOG", "warn"), ("RUST_LOG", "warn,=x")],
    )?;
    assert!(out.status.success(), "{}", text(&out));

    // sled logs at debug while it opens the store: there are lines to look at.
    let out = mageflow_env(&verify, &[("RUST_LOG", "debug")])?;
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("DEBUG"), "RUST_LOG was not used: {err}");
    assert!(
        !err.contains('\u{1b}'),
        "colour codes in piped logs: {err:?}"
    );

    let json = ["--log-format", "json", "verify", "--store", store.as_str()];
    let out = mageflow_env(&json, &[("MAGEFLOW_LOG", "debug")])?;
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    let mut lines = 0;
    for line in err.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).with_context(|| format!("not JSON: {line}"))?;
        assert!(v.get("level").is_some(), "{line}");
        lines += 1;
    }
    assert!(lines > 0, "no log lines: {}", text(&out));
    // A global flag: after the subcommand too.
    let out = mageflow_env(&["verify", "--store", &store, "--log-format", "json"], &[])?;
    assert!(out.status.success(), "{}", text(&out));
    Ok(())
}

/// `--confirm` belongs to `cancel` alone: anywhere else it is a usage error (exit 2), caught
/// before anything is opened.
#[test]
fn only_cancel_offers_confirm() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = store_arg(dir.path());
    for cmd in [
        "suspend",
        "resume",
        "interrupt",
        "delete",
        "restore",
        "rerun",
    ] {
        let out = mageflow(&[cmd, "--confirm", WF, "--store", &store])?;
        assert_eq!(out.status.code(), Some(2), "{cmd}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("--confirm"),
            "{cmd}"
        );
        let help = mageflow(&[cmd, "--help"])?;
        assert!(
            !String::from_utf8_lossy(&help.stdout).contains("--confirm"),
            "{cmd} --help"
        );
    }
    let help = mageflow(&["cancel", "--help"])?;
    assert!(String::from_utf8_lossy(&help.stdout).contains("--confirm"));
    Ok(())
}

/// While a `serve` is writing (it resumes a long chain of `noop` steps, one commit each), every
/// read of its store takes a snapshot that checks: a copy that caught a write half done is
/// taken again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_store_while_serve_writes_to_it() -> Result<()> {
    const STEPS: usize = 3_000;
    const READS: usize = 6;
    let dir = tempfile::tempdir()?;
    let wf = {
        let engine = mageflow::open_embedded(dir.path(), registry(), Config::default()).await?;
        let h = engine.handle();
        let steps: Vec<mageflow::Sig> = (0..STEPS).map(|_| sign("noop").into()).collect();
        let wf = h.submit(mageflow::chain(steps), json!({})).await?;
        // Stopped early on: serve finds almost all of the chain to run.
        while h
            .inspect(wf, |w| {
                w.nodes
                    .iter()
                    .filter(|n| n.status == mageflow::Status::Done)
                    .count()
            })
            .await?
            < 3
        {
            tokio::task::yield_now().await;
        }
        drop(h);
        engine.shutdown().await;
        wf
    };
    let store = store_arg(dir.path());
    let mut serve = Command::new(env!("CARGO_BIN_EXE_mageflow"))
        .args(["serve", "--store", &store])
        .env_remove("MAGEFLOW_LOG")
        .stdout(Stdio::piped())
        .spawn()?;
    let result = (|| -> Result<()> {
        lines_until(&mut serve, "serving")?;
        let mut versions = Vec::new();
        for _ in 0..READS {
            let out = mageflow(&["verify", "--store", &store])?;
            assert!(out.status.success(), "{}", text(&out));
            let out = mageflow(&["state", "--store", &store, &wf.to_string(), "--json"])?;
            assert!(out.status.success(), "{}", text(&out));
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            assert_eq!(v["snapshot_of_live_store"], true, "{v}");
            versions.push(v["version"].as_u64().context("version")?);
        }
        // Each snapshot is at least as new as the one before (it never goes back in time).
        assert!(versions.windows(2).all(|w| w[0] <= w[1]), "{versions:?}");
        Ok(())
    })();
    stop(&mut serve)?;
    result
}

#[test]
fn simulate_runs_seeds_and_replays_one() -> Result<()> {
    let out = mageflow(&["simulate", "--seeds", "20", "--from", "100"])?;
    assert!(out.status.success(), "{}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("20 seeds, 0 failed"), "{stdout}");
    // The engine's own lines about the injected faults stay out of the way unless asked for.
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let one = mageflow(&["simulate", "--seed", "105", "--verbose"])?;
    assert!(one.status.success(), "{}", text(&one));
    let stdout = String::from_utf8_lossy(&one.stdout);
    assert!(
        stdout.starts_with("seed 105 "),
        "the plan comes first: {stdout}"
    );
    assert!(stdout.contains("1 seeds, 0 failed"), "{stdout}");
    let both = mageflow(&["simulate", "--seed", "1", "--seeds", "2"])?;
    assert_eq!(both.status.code(), Some(2), "{}", text(&both));
    Ok(())
}

/// A graph with an approval gate, from a definition file: a bad file is refused naming the
/// JSON path, `submit --wait` runs it up to its gate, `signal` accepts the gate, `serve` runs
/// what follows, and `state` shows the branch taken and the one skipped.
#[test]
fn submit_a_definition_signal_its_gate_and_see_the_branch_taken() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = store_arg(dir.path());
    // A store to submit to (submit, like the operator commands, never creates one).
    let file = dir.path().join("review.json");
    std::fs::write(&file, r#"{"root": {"task": {"task": "echo"}}}"#)?;
    let out = mageflow(&["submit", file.to_str().context("utf-8")?, "--store", &store])?;
    assert!(!out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no store at"), "{}", text(&out));
    let mut serve = Command::new(env!("CARGO_BIN_EXE_mageflow"))
        .args(["serve", "--store", &store])
        .env_remove("MAGEFLOW_LOG")
        .stdout(Stdio::piped())
        .spawn()?;
    lines_until(&mut serve, "serving")?;
    stop(&mut serve)?;

    std::fs::write(
        &file,
        r#"{"root": {"graph": {"nodes": [{"name": "check", "run": {"task": {"task": "echo", "retires": 1}}}]}}}"#,
    )?;
    let path = file.to_str().context("utf-8")?;
    let out = mageflow(&["submit", path, "--store", &store])?;
    assert!(!out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("root.graph.nodes[0].run.task"), "{err}");
    assert!(err.contains("was not submitted"), "{err}");

    std::fs::write(
        &file,
        r#"{"input": {"doc": 7},
            "root": {"graph": {"name": "review",
              "nodes": [
                {"name": "check", "run": {"task": {"task": "echo"}}},
                {"name": "approval", "run": {"gate": {}}},
                {"name": "publish", "run": {"task": {"task": "echo", "with": {"kwargs": {"published": true}}}}},
                {"name": "sent_back", "run": {"task": {"task": "echo"}}}
              ],
              "edges": [
                {"from": "check", "to": "approval", "when": "on_success"},
                {"from": "approval", "to": "publish", "when": {"output": {"op": "eq", "path": "$.approved", "value": true}}},
                {"from": "approval", "to": "sent_back", "when": "default"}
              ]}}}"#,
    )?;
    let out = mageflow(&["submit", path, "--store", &store, "--wait"])?;
    assert!(out.status.success(), "{}", text(&out));
    let printed = String::from_utf8_lossy(&out.stdout);
    let wf = printed.lines().next().context("the id")?.trim().to_owned();
    assert!(wf.starts_with("wf_"), "{printed}");
    let gate = printed
        .lines()
        .find_map(|l| l.strip_prefix("waiting: gate "))
        .and_then(|l| l.split_whitespace().next())
        .with_context(|| format!("no gate waits: {printed}"))?
        .to_owned();

    let out = mageflow(&["signal", &gate, "--value", "not json", "--store", &store])?;
    assert!(!out.status.success(), "{}", text(&out));
    let out = mageflow(&[
        "signal",
        &gate,
        "--value",
        r#"{"approved": true}"#,
        "--principal",
        "alice",
        "--store",
        &store,
    ])?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("signaled"), "{}", text(&out));
    let out = mageflow(&["reject", &gate, "--reason", "late", "--store", &store])?;
    assert!(!out.status.success(), "a gate signals once: {}", text(&out));

    // `serve` resumes what follows the gate.
    let mut serve = Command::new(env!("CARGO_BIN_EXE_mageflow"))
        .args(["serve", "--store", &store])
        .env_remove("MAGEFLOW_LOG")
        .stdout(Stdio::piped())
        .spawn()?;
    let state = (|| -> Result<serde_json::Value> {
        lines_until(&mut serve, "serving")?;
        for _ in 0..600 {
            let out = mageflow(&["state", "--store", &store, &wf, "--json"])?;
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            if v["nodes"][0]["status"] == "done" {
                return Ok(v);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        anyhow::bail!("the graph did not finish after its gate was signaled")
    })();
    stop(&mut serve)?;
    let state = state?;
    let status = |name: &str| {
        state["nodes"]
            .as_array()
            .and_then(|ns| ns.iter().find(|n| n["name"] == name))
            .map(|n| n["status"].clone())
    };
    assert_eq!(status("publish"), Some(json!("done")), "{state}");
    assert_eq!(status("sent_back"), Some(json!("skipped")), "{state}");
    // The graph's hierarchical status and the edges it took, in JSON and in text.
    assert_eq!(state["nodes"][0]["inner"], json!({"done": 3, "skipped": 1}));
    assert_eq!(
        state["nodes"][0]["edges_taken"],
        json!(["check -> approval", "approval -> publish"])
    );
    let out = mageflow(&["state", "--store", &store, &wf])?;
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains("inner: done=3 skipped=1")
            && shown.contains("took: check -> approval, approval -> publish"),
        "{shown}"
    );
    let out = mageflow(&["history", "--store", &store, &gate])?;
    assert!(text(&out).contains("alice"), "{}", text(&out));
    Ok(())
}

/// `serve --http` checks who may call the API before anything is opened: no token file and no
/// `--insecure-no-auth`, or `--insecure-no-auth` on an address that is not loopback, are
/// refused, and no store is created.
#[test]
fn serve_http_refuses_an_open_api_off_loopback() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let store = dir.path().join("store");
    let arg = format!("embedded:{}", store.display());
    for extra in [
        vec!["--http", "127.0.0.1:0"],
        vec!["--http", "0.0.0.0:0", "--insecure-no-auth"],
    ] {
        let mut args = vec!["serve", "--store", arg.as_str()];
        args.extend(extra.iter().copied());
        let out = mageflow(&args)?;
        assert!(!out.status.success(), "{args:?}: {}", text(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--tokens") || err.contains("loopback"),
            "{args:?}: {err}"
        );
        assert!(!store.exists(), "{args:?} created a store");
    }
    Ok(())
}
