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
