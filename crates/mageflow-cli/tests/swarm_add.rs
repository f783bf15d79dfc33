//! `mageflow swarm add SWARM_ID --file ITEMS.jsonl` on an embedded store: a file with bad lines
//! is refused whole, listing every bad line; `--dry-run` and `--partial`; and a bulk killed
//! (`kill -9`) while it is written leaves all of its items or none.

use anyhow::{Context, Result};
use mageflow::{sign, swarm, Config, Registry, WorkflowId};
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

fn mageflow(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mageflow"));
    c.args(args)
        .args(["--store", &format!("embedded:{}", dir.display())])
        .args(["--principal", "bob", "--no-progress"])
        .env("RUST_BACKTRACE", "0");
    c
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn registry() -> Registry {
    let mut r = Registry::new();
    mageflow::engine::builtin::register(&mut r);
    r
}

fn config() -> Config {
    Config {
        workers: 0,
        ..Config::default()
    }
}

/// A store holding an open swarm (root) that has not run: nothing runs while items are added.
async fn store_with_an_open_swarm(dir: &Path) -> Result<WorkflowId> {
    let engine = mageflow::open_embedded(dir, registry(), config()).await?;
    let h = engine.handle();
    let wf = h.create(swarm([sign("noop")]).open()).await?;
    drop(h);
    engine.shutdown().await;
    Ok(wf)
}

/// How many items the swarm (root) of `wf` has.
async fn items(dir: &Path, wf: WorkflowId) -> Result<usize> {
    let engine = mageflow::open_embedded(dir, registry(), config()).await?;
    let h = engine.handle();
    let n = h.inspect(wf, |w| w.nodes[0].spec.children().len()).await?;
    drop(h);
    engine.shutdown().await;
    Ok(n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_lines_are_listed_and_refuse_the_file_unless_partial() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let wf = store_with_an_open_swarm(dir.path()).await?;
    let file = dir.path().join("items.jsonl");
    let lines = [
        r#"{"task": {"task": "noop"}}"#,
        r#"{"task": {"task": "nope"}}"#,
        r#"{"task": {"task": "noop"}}"#,
        "not json",
        r#"{"task": {"task": "sleep", "with": {"kwargs": {"ms": "x"}}}}"#,
        r#"{"chain": {"steps": [{"task": {"task": "noop"}}]}}"#,
    ];
    std::fs::write(&file, lines.join("\n"))?;
    let f = file.to_string_lossy().to_string();
    let id = wf.to_string();

    let out = mageflow(dir.path(), &["swarm", "add", &id, "--file", &f]).output()?;
    assert!(!out.status.success(), "{}", text(&out));
    let all = text(&out);
    for line in [
        "line 2: unknown_task",
        "line 4: invalid_definition",
        "line 5: invalid_kwargs",
    ] {
        assert!(all.contains(line), "{line} not listed in {all}");
    }
    assert_eq!(items(dir.path(), wf).await?, 1, "nothing was added");

    let out = mageflow(
        dir.path(),
        &["swarm", "add", &id, "--file", &f, "--dry-run"],
    )
    .output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("dry run: 3 lines would be added, 3 are refused"));
    assert_eq!(items(dir.path(), wf).await?, 1, "a dry run adds nothing");

    let out = mageflow(
        dir.path(),
        &["swarm", "add", &id, "--file", &f, "--partial", "--close"],
    )
    .output()?;
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("added 3 items"), "{}", text(&out));
    assert!(text(&out).contains("refused 3 lines"), "{}", text(&out));
    assert_eq!(items(dir.path(), wf).await?, 4);
    Ok(())
}

/// A large file is added in one append: killed at any point, the store holds all of its items
/// or none. The kills land at several fractions of an undisturbed run's duration (no timing is
/// asserted: a kill before or after the write is as valid a case as one during it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bulk_killed_midway_leaves_all_or_none() -> Result<()> {
    const LINES: usize = 100_000;
    let base = tempfile::tempdir()?;
    let template = base.path().join("template");
    std::fs::create_dir(&template)?;
    let wf = store_with_an_open_swarm(&template).await?;
    let file = base.path().join("items.jsonl");
    let line = json!({"task": {"task": "noop"}}).to_string();
    std::fs::write(&file, vec![line; LINES].join("\n"))?;
    let f = file.to_string_lossy().to_string();
    let id = wf.to_string();
    let copy = |name: &str| -> Result<std::path::PathBuf> {
        let to = base.path().join(name);
        std::fs::create_dir(&to)?;
        for entry in walk(&template)? {
            let rel = entry.strip_prefix(&template)?;
            let dest = to.join(rel);
            if entry.is_dir() {
                std::fs::create_dir_all(&dest)?;
            } else {
                std::fs::copy(&entry, &dest)?;
            }
        }
        Ok(to)
    };

    // An undisturbed run: how long a bulk takes here.
    let whole = copy("whole")?;
    let started = Instant::now();
    let out = mageflow(&whole, &["swarm", "add", &id, "--file", &f]).output()?;
    assert!(out.status.success(), "{}", text(&out));
    let took = started.elapsed();
    assert_eq!(items(&whole, wf).await?, LINES + 1);

    for (k, fraction) in [0.3, 0.5, 0.7, 0.85, 0.95].into_iter().enumerate() {
        let dir = copy(&format!("kill{k}"))?;
        let mut child = mageflow(&dir, &["swarm", "add", &id, "--file", &f])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        tokio::time::sleep(took.mul_f64(fraction)).await;
        // SIGKILL: no destructor, no flush.
        let _ = child.kill();
        child.wait()?;
        let n = items(&dir, wf)
            .await
            .with_context(|| format!("the store killed at {fraction} opens"))?;
        assert!(
            n == 1 || n == LINES + 1,
            "killed at {fraction} of the run: {n} items, neither none nor all of the bulk"
        );
    }
    Ok(())
}

fn walk(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.push(path.clone());
            out.extend(walk(&path)?);
        } else {
            out.push(path);
        }
    }
    Ok(out)
}
