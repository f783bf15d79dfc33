//! `mageflow demo`: the showcase, on the embedded store.
//!
//! prepare → swarm of N `work` tasks (max 50 at a time; one fails once and is retried; one
//! fails for good and fires its error callback) → `report`, which gets every item's outcome.
//! The chain's success callback `notify` must fire once, its error callback `alert` never.
//! Midway the chain is suspended (nothing may start while it is) and resumed.
//!
//! "Midway" is made certain rather than left to timing: the items from the 40 % mark on wait
//! at a gate, opened once the suspend has been made, so the suspend always meets a running
//! swarm — with a small swarm that finished between two looks at it, the suspend used to be
//! refused (the chain was done) and the demo failed.

use crate::embedded_path;
use anyhow::{bail, Context, Result};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use mageflow::{chain, sign, swarm, Config, Registry, Status, TaskFailure, Workflow};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

const FLAKY_ITEM: u64 = 137;
const BROKEN_ITEM: u64 = 613;
/// The smallest swarm the showcase runs (a suspend needs an item to hold).
pub const ITEMS_MIN: u32 = 1;
/// The suspend comes once this share of the items (numerator / denominator) has finished.
const SUSPEND_AT: (u64, u64) = (2, 5);

#[derive(Default)]
struct Counters {
    work_runs: AtomicU64,
    flaky_attempts: AtomicU64,
    cleanup_runs: AtomicU64,
    notify_runs: AtomicU64,
    alert_runs: AtomicU64,
    report_ok: AtomicU64,
    report_err: AtomicU64,
}

#[derive(Deserialize)]
struct WorkInput {
    item: u64,
    ms: u64,
}

#[derive(Deserialize)]
struct ReportInput {
    mageflow_results: Vec<Value>,
}

/// Items at or past `gate_from` finish only once `gate` says open (after the suspend).
fn registry(c: &Arc<Counters>, gate_from: u64, gate: watch::Receiver<bool>) -> Registry {
    let mut r = Registry::new();
    r.task("prepare", |i: Value, _ctx| async move {
        Ok::<_, TaskFailure>(json!({ "batch": i.get("batch").cloned().unwrap_or(Value::Null) }))
    });
    let k = c.clone();
    r.task("work", move |i: WorkInput, ctx| {
        let k = k.clone();
        let mut gate = gate.clone();
        async move {
            k.work_runs.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(i.ms)).await;
            if i.item >= gate_from {
                // Closed only while the demo runs; a dropped sender means it stopped.
                let _ = gate.wait_for(|open| *open).await;
            }
            if i.item == FLAKY_ITEM {
                k.flaky_attempts.fetch_add(1, Ordering::Relaxed);
                if ctx.attempt() == 1 {
                    return Err(TaskFailure::retryable("flaky: first attempt fails"));
                }
            }
            if i.item == BROKEN_ITEM {
                return Err(TaskFailure::fatal("broken: this item always fails"));
            }
            Ok(i.item * 2)
        }
    })
    .retries(2, 20);
    let k = c.clone();
    r.task("cleanup", move |_i: Value, _ctx| {
        let k = k.clone();
        async move {
            k.cleanup_runs.fetch_add(1, Ordering::Relaxed);
            Ok::<_, TaskFailure>(())
        }
    });
    let k = c.clone();
    r.task("report", move |i: ReportInput, _ctx| {
        let k = k.clone();
        async move {
            let ok = i
                .mageflow_results
                .iter()
                .filter(|o| o.get("ok").is_some())
                .count();
            let err = i.mageflow_results.len() - ok;
            k.report_ok.store(ok as u64, Ordering::Relaxed);
            k.report_err.store(err as u64, Ordering::Relaxed);
            Ok::<_, TaskFailure>(json!({ "ok": ok, "failed": err }))
        }
    });
    let k = c.clone();
    r.task("notify", move |_i: Value, _ctx| {
        let k = k.clone();
        async move {
            k.notify_runs.fetch_add(1, Ordering::Relaxed);
            Ok::<_, TaskFailure>(())
        }
    });
    let k = c.clone();
    r.task("alert", move |_i: Value, _ctx| {
        let k = k.clone();
        async move {
            k.alert_runs.fetch_add(1, Ordering::Relaxed);
            Ok::<_, TaskFailure>(())
        }
    });
    r
}

/// The swarm's items by status, and under `"item callbacks"` its per-item callbacks that ran.
fn count_items(wf: &Workflow, swarm: u32) -> BTreeMap<&'static str, u64> {
    let mut m = BTreeMap::new();
    for &c in wf.nodes[swarm as usize].spec.children() {
        let item = &wf.nodes[c as usize];
        *m.entry(item.status.name()).or_insert(0) += 1;
        let ran = item
            .spec
            .on_success
            .iter()
            .chain(&item.spec.on_error)
            .filter(|&&cb| wf.nodes[cb as usize].status == Status::Done)
            .count();
        *m.entry("item callbacks").or_insert(0) += ran as u64;
    }
    m
}

pub async fn run(store: Option<&str>, items: u32, progress: bool) -> Result<()> {
    if items < ITEMS_MIN {
        bail!(
            "--items {items}: the showcase needs a swarm of at least {ITEMS_MIN} task (it \
             suspends the chain while an item runs)"
        );
    }
    // Always below `items`, so at least one item is held at the gate until the suspend.
    let suspend_at = u64::from(items) * SUSPEND_AT.0 / SUSPEND_AT.1;
    let (gate, gate_rx) = watch::channel(false);
    let _tmp;
    let dir = match store {
        Some(s) => embedded_path(s)?,
        None => {
            _tmp = tempdir()?;
            _tmp.clone()
        }
    };
    let created = !crate::tiers::store_exists(&dir);
    let counters = Arc::new(Counters::default());
    let config = Config {
        workers: 64,
        principal: "demo".into(),
        ..Config::default()
    };
    let engine = mageflow::open_embedded(&dir, registry(&counters, suspend_at, gate_rx), config)
        .await
        .with_context(|| format!("cannot open the embedded store at {}", dir.display()))?;
    let h = engine.handle();
    if created {
        println!("created a new store at embedded:{}", dir.display());
    }
    println!("mageflow demo: store embedded:{}", dir.display());

    let work = (0..u64::from(items)).map(|i| sign("work").kwarg("item", i).kwarg("ms", 2 + i % 7));
    let flow = chain([
        sign("prepare").into(),
        swarm(work)
            .name("work-swarm")
            .max_concurrency(50)
            .on_item_error(sign("cleanup"))
            .into(),
        mageflow::Sig::from(sign("report")),
    ])
    .name("demo")
    .on_success(sign("notify"))
    .on_error(sign("alert"));

    let started = Instant::now();
    let wf = h.submit(flow, json!({ "batch": "demo" })).await?;
    let root = mageflow::SignatureId::root(wf);
    let swarm_index = h.inspect(wf, |w| w.nodes[0].spec.children()[1]).await?;

    let bars = MultiProgress::new();
    let bar = bars.add(ProgressBar::new(u64::from(items)));
    bar.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:40}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_prefix("swarm");
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }

    let say = |line: String| {
        if bar.is_hidden() {
            println!("{line}");
        } else {
            bar.println(line);
        }
    };
    let mut suspended_once = false;
    let mut started_during_suspend = 0;
    let stop = crate::stop_signal();
    tokio::pin!(stop);
    loop {
        let (counts, finished_all) = h
            .inspect(wf, move |w| (count_items(w, swarm_index), w.is_finished()))
            .await?;
        let finished =
            counts.get("done").copied().unwrap_or(0) + counts.get("failed").copied().unwrap_or(0);
        bar.set_position(finished);
        bar.set_message(format!(
            "running {} · queued {} · done {} · failed {} · item callbacks {}",
            counts.get("running").copied().unwrap_or(0),
            counts.get("queued").copied().unwrap_or(0),
            counts.get("done").copied().unwrap_or(0),
            counts.get("failed").copied().unwrap_or(0),
            counts.get("item callbacks").copied().unwrap_or(0)
        ));
        if !suspended_once && finished >= suspend_at {
            suspended_once = true;
            h.suspend(root).await?;
            // Held items may finish now: they ran before the suspend; nothing new starts.
            gate.send_replace(true);
            say(
                "  suspend: chain suspended at 40% — running tasks finish, nothing new starts"
                    .into(),
            );
            let starts_before = h.stats().attempts_started.load(Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(400)).await;
            let c = h.inspect(wf, move |w| count_items(w, swarm_index)).await?;
            let runs_after = h.stats().attempts_started.load(Ordering::Relaxed);
            started_during_suspend = runs_after - starts_before;
            say(format!(
                "  suspend: {} started while suspended; {} items wait suspended",
                started_during_suspend,
                c.get("suspended").copied().unwrap_or(0) + c.get("pending").copied().unwrap_or(0)
            ));
            h.resume(root).await?;
            say("  resume: continuing where it stopped".into());
        }
        if finished_all {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = &mut stop => {
                bar.abandon_with_message("stopping: no new tasks start; running ones get the grace period");
                engine.shutdown().await;
                bail!(
                    "demo stopped by a signal; its state is in embedded:{} (unfinished work resumes when an engine opens it)",
                    dir.display()
                );
            }
        }
    }
    bar.finish();
    let final_state = h.workflow(wf).await?;
    let elapsed = started.elapsed();
    let events = h.stats().events_written.load(Ordering::Relaxed);
    let history = h.history(wf)?;
    engine.shutdown().await;

    let mut by_status: BTreeMap<&str, u64> = BTreeMap::new();
    for n in &final_state.nodes {
        *by_status.entry(n.status.name()).or_insert(0) += 1;
    }
    let tasks = final_state
        .nodes
        .iter()
        .filter(|n| !n.is_container())
        .count();
    println!();
    println!("  {:<28} {:>10}", "signatures by status", "count");
    for (s, n) in &by_status {
        println!("  {s:<28} {n:>10}");
    }
    println!("  {:<28} {:>10.2}", "elapsed s", elapsed.as_secs_f64());
    println!(
        "  {:<28} {:>10.0}",
        "tasks/s",
        tasks as f64 / elapsed.as_secs_f64()
    );
    println!("  {:<28} {:>10}", "events written", events);
    println!("  {:<28} {:>10}", "events in this workflow", history.len());
    println!(
        "  {:<28} {:>10}",
        "flaky task attempts",
        counters.flaky_attempts.load(Ordering::Relaxed)
    );
    println!(
        "  {:<28} {:>10}",
        "report: items ok / failed",
        format!(
            "{} / {}",
            counters.report_ok.load(Ordering::Relaxed),
            counters.report_err.load(Ordering::Relaxed)
        )
    );

    let mut problems = Vec::new();
    let root_status = final_state.nodes[0].status;
    if root_status != Status::Done {
        problems.push(format!("the chain ended {root_status}, expected done"));
    }
    let check = |name: &str, got: u64, want: u64, problems: &mut Vec<String>| {
        if got != want {
            problems.push(format!("{name}: got {got}, expected {want}"));
        }
    };
    check(
        "notify (chain success callback) runs",
        counters.notify_runs.load(Ordering::Relaxed),
        1,
        &mut problems,
    );
    check(
        "alert (chain error callback) runs",
        counters.alert_runs.load(Ordering::Relaxed),
        0,
        &mut problems,
    );
    if u64::from(items) > BROKEN_ITEM {
        check(
            "cleanup (the per-item error callback, for the broken item) runs",
            counters.cleanup_runs.load(Ordering::Relaxed),
            1,
            &mut problems,
        );
        check(
            "items reported failed",
            counters.report_err.load(Ordering::Relaxed),
            1,
            &mut problems,
        );
    }
    if u64::from(items) > FLAKY_ITEM {
        check(
            "flaky item attempts",
            counters.flaky_attempts.load(Ordering::Relaxed),
            2,
            &mut problems,
        );
    }
    check(
        "tasks started while suspended",
        started_during_suspend,
        0,
        &mut problems,
    );
    check(
        "items reported in total",
        counters.report_ok.load(Ordering::Relaxed) + counters.report_err.load(Ordering::Relaxed),
        u64::from(items),
        &mut problems,
    );
    if problems.is_empty() {
        println!("\ndemo finished as expected: workflow {wf}");
        println!(
            "audit trail: mageflow history --store embedded:{} {wf}",
            dir.display()
        );
        Ok(())
    } else {
        for p in &problems {
            eprintln!("unexpected: {p}");
        }
        bail!(
            "the showcase did not finish as expected ({} problems)",
            problems.len()
        )
    }
}

/// A fresh directory under the system temp dir (kept after the run, so `history` can read it).
fn tempdir() -> Result<std::path::PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "mageflow-demo-{}-{}",
        std::process::id(),
        mageflow::engine::now().as_micros()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}
