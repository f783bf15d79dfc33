//! `mageflow bench`: named scenarios on the embedded store with durable (group-commit) appends.
//! Each prints one machine-readable line. `all` runs each scenario in its own process so that
//! every peak-memory figure belongs to one scenario.

use crate::embedded_path;
use anyhow::{bail, Context, Result};
use mageflow::core::Payload;
use mageflow::{
    chain, graph, sign, swarm, Condition, Config, Engine, Handle, Predicate, Registry, Sig,
    SignatureId, Status, TaskFailure, WorkflowId,
};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::Notify;

/// Workflows per `submit_many` call in the `flat` scenario.
const FLAT_BULK: u32 = 10_000;

pub const SCENARIOS: [&str; 15] = [
    "flat",
    "chain",
    "fanout",
    "fanout-limited",
    "cancel",
    "interrupt",
    "graph-line",
    "graph-fanout",
    "bulk-add",
    "priority",
    "http-submit",
    "http-tree",
    "http-events",
    "http-sse-load",
    "http-sse-firehose",
];

/// `max_concurrency` of the `fanout-limited` and `priority` scenarios.
pub const FANOUT_LIMIT: u32 = 8;
/// Up to this many items, `bulk-add` also times the same items added one call each.
const BULK_COMPARE_MAX: u32 = 20_000;

pub async fn run(scenario: &str, store: Option<&str>, n: Option<u32>) -> Result<()> {
    if scenario == "all" {
        return run_all(store, n);
    }
    if !SCENARIOS.contains(&scenario) {
        bail!(
            "unknown scenario {scenario:?}; known: {} or all",
            SCENARIOS.join(", ")
        );
    }
    let (dir, temporary) = match store {
        Some(s) => (embedded_path(s)?, false),
        None => (
            std::env::temp_dir().join(format!("mageflow-bench-{scenario}-{}", std::process::id())),
            true,
        ),
    };
    let result = match scenario {
        "flat" => flat(&dir, n.unwrap_or(100_000)).await,
        "chain" => chain_steps(&dir, n.unwrap_or(1_000)).await,
        "fanout" => fanout(&dir, n.unwrap_or(5_000), None).await,
        "fanout-limited" => fanout(&dir, n.unwrap_or(5_000), Some(FANOUT_LIMIT)).await,
        "cancel" => cancel(&dir, n.unwrap_or(2_000)).await,
        "interrupt" => interrupt(&dir, n.unwrap_or(10_000)).await,
        "graph-line" => graph_line(&dir, n.unwrap_or(1_000)).await,
        "bulk-add" => bulk_add(&dir, n.unwrap_or(10_000)).await,
        "priority" => priority(&dir, n.unwrap_or(5_000)).await,
        "http-submit" => crate::bench_http::submit(&dir, n.unwrap_or(50_000)).await,
        "http-tree" => crate::bench_http::tree(&dir, n.unwrap_or(1_000_000)).await,
        "http-events" => crate::bench_http::events(&dir, n.unwrap_or(100_000)).await,
        "http-sse-load" => crate::bench_http::sse_load(&dir, n.unwrap_or(100_000), false).await,
        "http-sse-firehose" => crate::bench_http::sse_load(&dir, n.unwrap_or(100_000), true).await,
        _ => graph_fanout(&dir, n.unwrap_or(10_000)).await,
    };
    if temporary {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let line = result?;
    println!(
        "scenario={scenario} {line} peak_rss_mib={:.0}",
        peak_rss_mib()
    );
    Ok(())
}

fn run_all(store: Option<&str>, n: Option<u32>) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the mageflow binary")?;
    for s in SCENARIOS {
        let mut cmd = std::process::Command::new(&exe);
        cmd.args(["bench", "--scenario", s]);
        if let Some(store) = store {
            cmd.args(["--store", &format!("{store}-{s}")]);
        }
        if let Some(n) = n {
            cmd.args(["--n", &n.to_string()]);
        }
        let status = cmd
            .status()
            .with_context(|| format!("cannot run scenario {s}"))?;
        if !status.success() {
            bail!("scenario {s} failed ({status})");
        }
    }
    Ok(())
}

/// The shortest of some runs' times: the one least disturbed by the rest of the machine.
pub fn best(runs: &[f64]) -> f64 {
    runs.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Peak resident set size of this process (VmHWM), in MiB.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

async fn open(dir: &PathBuf, registry: Registry, workers: usize) -> Result<Engine> {
    let config = Config {
        workers,
        principal: "bench".into(),
        ..Config::default()
    };
    if std::env::var_os("MAGEFLOW_BENCH_MEMORY").is_some() {
        return Ok(mageflow::open_in_memory(registry, config).await?);
    }
    mageflow::open_embedded(dir, registry, config)
        .await
        .with_context(|| format!("cannot open the embedded store at {}", dir.display()))
}

fn builtins() -> Registry {
    let mut r = Registry::new();
    mageflow::engine::builtin::register(&mut r);
    r
}

async fn flat(dir: &PathBuf, n: u32) -> Result<String> {
    let engine = open(dir, builtins(), 1024).await?;
    let h = engine.handle();
    let t0 = Instant::now();
    run_flat(&h, n).await?;
    let secs = t0.elapsed().as_secs_f64();
    let events = h.stats().events_written.load(Ordering::Relaxed);
    let appends = h.stats().appends.load(Ordering::Relaxed);
    engine.shutdown().await;
    Ok(format!(
        "n={n} store=embedded seconds={secs:.3} tasks_per_s={:.0} events={events} group_commits={appends}",
        f64::from(n) / secs
    ))
}

/// Submit `n` no-op workflows in bulks (atomic submissions of FLAT_BULK each) and wait until
/// all have finished.
pub async fn run_flat(h: &Handle, n: u32) -> Result<()> {
    let mut left = n;
    while left > 0 {
        let k = left.min(FLAT_BULK);
        h.submit_many((0..k).map(|_| (sign("noop").into(), json!({}))))
            .await?;
        left -= k;
    }
    while h.stats().workflows_finished.load(Ordering::Relaxed) < u64::from(n) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

/// Step latencies of a finished chain, from the log: time between consecutive task successes,
/// in ms, sorted.
pub fn chain_step_ms(h: &Handle, wf: WorkflowId) -> Result<Vec<f64>> {
    let done: Vec<i64> = h
        .history(wf)?
        .iter()
        .filter(|e| matches!(e.payload, Payload::Succeeded { attempt, .. } if attempt > 0))
        .map(|e| e.at.as_micros())
        .collect();
    let mut steps_ms: Vec<f64> = done
        .windows(2)
        .map(|w| (w[1] - w[0]) as f64 / 1000.0)
        .collect();
    steps_ms.sort_by(f64::total_cmp);
    Ok(steps_ms)
}

pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

async fn chain_steps(dir: &PathBuf, n: u32) -> Result<String> {
    let engine = open(dir, builtins(), 64).await?;
    let h = engine.handle();
    let steps: Vec<_> = (0..n).map(|_| sign("noop")).collect();
    let t0 = Instant::now();
    let wf = h.submit(mageflow::chain(steps), json!({})).await?;
    h.wait(wf).await?;
    let secs = t0.elapsed().as_secs_f64();
    let steps_ms = chain_step_ms(&h, wf)?;
    engine.shutdown().await;
    Ok(format!(
        "n={n} store=embedded seconds={secs:.3} step_p50_ms={:.3} step_p99_ms={:.3}",
        percentile(&steps_ms, 0.5),
        percentile(&steps_ms, 0.99)
    ))
}

/// Counts concurrently running probe tasks and keeps the peak.
#[derive(Default)]
struct Probe {
    running: AtomicU64,
    peak: AtomicU64,
    started: AtomicU64,
}

fn probe_registry(probe: &Arc<Probe>, done: &Arc<Notify>) -> Registry {
    let mut r = builtins();
    let p = probe.clone();
    r.task("probe", move |_i: Value, _ctx| {
        let p = p.clone();
        async move {
            p.started.fetch_add(1, Ordering::Relaxed);
            let now = p.running.fetch_add(1, Ordering::Relaxed) + 1;
            p.peak.fetch_max(now, Ordering::Relaxed);
            tokio::task::yield_now().await;
            p.running.fetch_sub(1, Ordering::Relaxed);
            Ok::<_, TaskFailure>(Value::Null)
        }
    });
    let d = done.clone();
    r.task("collect", move |i: Value, _ctx| {
        let d = d.clone();
        async move {
            let n = i["mageflow_results"].as_array().map_or(0, Vec::len);
            d.notify_one();
            Ok::<_, TaskFailure>(n)
        }
    });
    r
}

async fn fanout(dir: &PathBuf, n: u32, limit: Option<u32>) -> Result<String> {
    let probe = Arc::new(Probe::default());
    let done = Arc::new(Notify::new());
    let engine = open(dir, probe_registry(&probe, &done), 1024).await?;
    let h = engine.handle();
    let items: Vec<_> = (0..n).map(|_| sign("probe")).collect();
    let s = swarm(items)
        .max_concurrency(limit.unwrap_or(n.max(1)))
        .on_success(sign("collect"));
    let t0 = Instant::now();
    let wf = h.submit(s, json!({})).await?;
    done.notified().await;
    // To the workflow's end (its callback's result recorded), as on PostgreSQL + Redis.
    h.wait(wf).await?;
    let secs = t0.elapsed().as_secs_f64();
    engine.shutdown().await;
    let limit_part = limit.map_or(String::new(), |l| format!(" max_concurrency={l}"));
    Ok(format!(
        "n={n}{limit_part} store=embedded seconds_to_done={secs:.3} peak_running={}",
        probe.peak.load(Ordering::Relaxed)
    ))
}

async fn bulk_add(dir: &PathBuf, n: u32) -> Result<String> {
    let engine = open(dir, builtins(), 0).await?;
    let line = run_bulk_add(&engine.handle(), n).await;
    engine.shutdown().await;
    Ok(format!("{} store=embedded", line?))
}

/// `n` items added to an open swarm (created, not run: nothing executes) in one bulk
/// (`add_many`), and — up to [`BULK_COMPARE_MAX`] — the same items added one call each to
/// another swarm of the same store.
pub async fn run_bulk_add(h: &Handle, n: u32) -> Result<String> {
    let items = || {
        (0..n)
            .map(|i| Sig::from(sign("noop").kwarg("i", i)))
            .collect::<Vec<_>>()
    };
    let bulk_swarm = SignatureId::root(h.create(swarm(Vec::<Sig>::new()).open()).await?);
    let t0 = Instant::now();
    let report = h
        .add_many(
            bulk_swarm,
            items(),
            &mageflow::BulkOptions::default(),
            |_| {},
        )
        .await?;
    let bulk = t0.elapsed().as_secs_f64();
    let single = if n <= BULK_COMPARE_MAX {
        let one_by_one = SignatureId::root(h.create(swarm(Vec::<Sig>::new()).open()).await?);
        let t0 = Instant::now();
        for item in items() {
            h.add_to_swarm(one_by_one, [item], false).await?;
        }
        let secs = t0.elapsed().as_secs_f64();
        format!(" single_adds_seconds={secs:.3} speedup={:.1}", secs / bulk)
    } else {
        String::new()
    };
    Ok(format!(
        "n={n} bulk_seconds={bulk:.3} items_per_s={:.0} batches={} bytes={}{single}",
        f64::from(n) / bulk,
        report.batches,
        report.bytes
    ))
}

async fn priority(dir: &PathBuf, n: u32) -> Result<String> {
    let engine = open(dir, builtins(), 1024).await?;
    let line = run_priority(&engine.handle(), n).await;
    engine.shutdown().await;
    Ok(format!("{} store=embedded", line?))
}

/// `fanout-limited` of `noop` items (max_concurrency 8, a success callback) without and with
/// priorities (items of three levels), alternated three times in one process, each timed to
/// the workflow's end: the cost of priority order, as a throughput ratio of the best runs.
pub async fn run_priority(h: &Handle, n: u32) -> Result<String> {
    let levels = [
        mageflow::Priority::Low,
        mageflow::Priority::Medium,
        mageflow::Priority::High,
    ];
    let (mut plain, mut prioritized) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        for with_priority in [false, true] {
            let items: Vec<_> = (0..n)
                .map(|i| match with_priority {
                    true => sign("noop").priority(levels[i as usize % 3]),
                    false => sign("noop"),
                })
                .collect();
            let s = swarm(items)
                .max_concurrency(FANOUT_LIMIT)
                .on_success(sign("noop"));
            let t0 = Instant::now();
            let wf = h.submit(s, json!({})).await?;
            h.wait(wf).await?;
            let secs = t0.elapsed().as_secs_f64();
            if with_priority {
                prioritized.push(secs);
            } else {
                plain.push(secs);
            }
        }
    }
    let (p, q) = (best(&plain), best(&prioritized));
    Ok(format!(
        "n={n} max_concurrency={FANOUT_LIMIT} plain_items_per_s={:.0} priority_items_per_s={:.0} priority_cost={:.3}",
        f64::from(n) / p,
        f64::from(n) / q,
        1.0 - p / q
    ))
}

async fn cancel(dir: &PathBuf, n: u32) -> Result<String> {
    let probe = Arc::new(Probe::default());
    let mut r = builtins();
    let p = probe.clone();
    r.task("nap", move |_i: Value, ctx: mageflow::TaskContext| {
        let p = p.clone();
        async move {
            p.started.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => Ok(Value::Null),
                _ = ctx.cancellation().cancelled() => Err(TaskFailure::retryable("stopped")),
            }
        }
    });
    let engine = open(dir, r, 64).await?;
    let h: Handle = engine.handle();
    let items: Vec<_> = (0..n).map(|_| sign("nap")).collect();
    let wf: WorkflowId = h
        .submit(swarm(items).max_concurrency(50), json!({}))
        .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    h.cancel(SignatureId::root(wf), true).await?;
    let call_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let started_at_return = probe.started.load(Ordering::Relaxed);
    let state = h.wait(wf).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started_after_wall = probe.started.load(Ordering::Relaxed) - started_at_return;
    // The log's order is the truth: count `started` events after the `canceled` of the root.
    let history = h.history(wf)?;
    let cancel_seq = history
        .iter()
        .find(|e| matches!(e.payload, Payload::Canceled { node: 0 }))
        .map_or(u64::MAX, |e| e.seq);
    let started_after_log = history
        .iter()
        .filter(|e| e.seq > cancel_seq && matches!(e.payload, Payload::Started { .. }))
        .count();
    let finished_before = state
        .nodes
        .iter()
        .filter(|n| n.status == mageflow::Status::Done)
        .count();
    engine.shutdown().await;
    Ok(format!(
        "n={n} store=embedded cancel_call_ms={call_ms:.2} started_after_cancel_log={started_after_log} started_after_cancel_wall={started_after_wall} done_before_cancel={finished_before}"
    ))
}

/// A swarm of `n` long tasks, 50 running, interrupted: how long from the call to each running
/// handler having stopped (its future returned or was dropped).
async fn interrupt(dir: &PathBuf, n: u32) -> Result<String> {
    let running = Arc::new(AtomicU64::new(0));
    let stops = Arc::new(std::sync::Mutex::new(Vec::<Instant>::new()));
    let mut r = builtins();
    let (run, st) = (running.clone(), stops.clone());
    r.task("long", move |_i: Value, ctx: mageflow::TaskContext| {
        let (run, st) = (run.clone(), st.clone());
        async move {
            run.fetch_add(1, Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(600)) => {}
                _ = ctx.cancellation().cancelled() => {}
            }
            st.lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Instant::now());
            Err::<Value, _>(TaskFailure::retryable("interrupted"))
        }
    });
    let engine = open(dir, r, 64).await?;
    let h = engine.handle();
    let items: Vec<_> = (0..n).map(|_| sign("long")).collect();
    let wf = h
        .submit(swarm(items).max_concurrency(50), json!({}))
        .await?;
    while running.load(Ordering::Relaxed) < 50.min(u64::from(n)) {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let t0 = Instant::now();
    h.interrupt(SignatureId::root(wf)).await?;
    let call_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let want = running.load(Ordering::Relaxed) as usize;
    while stops.lock().unwrap_or_else(|p| p.into_inner()).len() < want {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mut ms: Vec<f64> = stops
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .map(|t| t.duration_since(t0).as_secs_f64() * 1000.0)
        .collect();
    ms.sort_by(f64::total_cmp);
    let history = h.history(wf)?;
    let cut = history
        .iter()
        .find(|e| matches!(e.payload, Payload::Interrupted { node: 0 }))
        .map_or(u64::MAX, |e| e.seq);
    let started_after = history
        .iter()
        .filter(|e| e.seq > cut && matches!(e.payload, Payload::Started { .. }))
        .count();
    engine.shutdown().await;
    Ok(format!(
        "n={n} running={want} store=embedded interrupt_call_ms={call_ms:.2} stop_p99_ms={:.2} last_stop_ms={:.2} started_after_interrupt_log={started_after}",
        percentile(&ms, 0.99),
        ms.last().copied().unwrap_or(0.0)
    ))
}

/// The builtins plus `count`: returns `{"n": k + 1}` where `k` is the `n` of the result it
/// received (or of its input; 0 if none), so its output stays one small object however long the
/// chain or graph, and `$.n >= 0` always holds on it.
fn count_registry() -> Registry {
    let mut r = builtins();
    r.task("count", |i: Value, _ctx| async move {
        let k = i["mageflow_results"]["n"]
            .as_u64()
            .or_else(|| i["n"].as_u64())
            .unwrap_or(0);
        Ok::<_, TaskFailure>(json!({ "n": k + 1 }))
    });
    r
}

/// Submit `sig`, wait until its workflow has finished, and check that it succeeded: wall
/// seconds from the submit call to the finish, and the events its log holds.
async fn timed(h: &Handle, sig: Sig) -> Result<(f64, usize)> {
    let t0 = Instant::now();
    let wf = h.submit(sig, json!({"n": 0})).await?;
    let state = h.wait(wf).await?;
    let secs = t0.elapsed().as_secs_f64();
    if state.nodes[0].status != Status::Done {
        bail!(
            "workflow {wf} ended {:?}: {:?}",
            state.nodes[0].status,
            state.nodes[0].outcome
        );
    }
    Ok((secs, h.history(wf)?.len()))
}

/// Runs a graph and its equivalent in the same engine in the order A B B A, so that whatever
/// drifts through the run (the store growing, the allocator warming up) weighs on both alike;
/// each time is the mean of its two runs. Returns the line's common part.
async fn graph_against(
    h: &Handle,
    n: u32,
    baseline: &str,
    make_graph: impl Fn() -> Sig,
    make_baseline: impl Fn() -> Sig,
) -> Result<String> {
    let (b1, baseline_events) = timed(h, make_baseline()).await?;
    let (g1, graph_events) = timed(h, make_graph()).await?;
    let (g2, _) = timed(h, make_graph()).await?;
    let (b2, _) = timed(h, make_baseline()).await?;
    let (g, b) = ((g1 + g2) / 2.0, (b1 + b2) / 2.0);
    Ok(format!(
        "n={n} store=embedded graph_seconds={g:.3} {baseline}_seconds={b:.3} ratio={:.3} graph_runs={g1:.3},{g2:.3} {baseline}_runs={b1:.3},{b2:.3} graph_events={graph_events} {baseline}_events={baseline_events}",
        g / b
    ))
}

/// `graph-line`: a graph of `n` `count` nodes in a line, every edge taken on an output
/// predicate (`$.n >= 0`, which always holds), against a chain of `n` `count` steps.
async fn graph_line(dir: &PathBuf, n: u32) -> Result<String> {
    let engine = open(dir, count_registry(), 64).await?;
    let h = engine.handle();
    let line = || {
        let mut g = graph().name("line");
        for i in 0..n {
            g = g.node(format!("s{i}"), sign("count"));
        }
        for i in 1..n {
            g = g.edge(
                format!("s{}", i - 1),
                format!("s{i}"),
                Condition::Output(Predicate::Ge {
                    path: "$.n".into(),
                    value: 0.0,
                }),
            );
        }
        Sig::from(g)
    };
    let steps = || Sig::from(chain((0..n).map(|_| sign("count"))));
    let line = graph_against(&h, n, "chain", line, steps).await;
    engine.shutdown().await;
    line
}

/// `graph-fanout`: a graph of one `count` entry node with an edge to each of `n` `count` nodes,
/// and an edge from each of them to one final `count` node (join all), every edge on success;
/// against a chain of a `count` step, a swarm of `n` `count` items, and a final `count` step
/// (the same tasks, the same results reaching the last task). A graph starts every node its
/// edges allow at once, with no concurrency limit of its own, so the swarm's `max_concurrency`
/// is `n`: both dispatch all `n` at once, to the same 1 024 workers.
async fn graph_fanout(dir: &PathBuf, n: u32) -> Result<String> {
    let engine = open(dir, count_registry(), 1024).await?;
    let h = engine.handle();
    let fan = || {
        let mut g = graph().name("fan").node("entry", sign("count"));
        for i in 0..n {
            g = g.node(format!("f{i}"), sign("count"));
        }
        g = g.node("join", sign("count"));
        for i in 0..n {
            g = g.edge("entry", format!("f{i}"), Condition::OnSuccess);
        }
        for i in 0..n {
            g = g.edge(format!("f{i}"), "join", Condition::OnSuccess);
        }
        Sig::from(g)
    };
    let swarmed = || {
        Sig::from(chain([
            Sig::from(sign("count")),
            swarm((0..n).map(|_| sign("count")))
                .max_concurrency(n.max(1))
                .into(),
            sign("count").into(),
        ]))
    };
    let line = graph_against(&h, n, "swarm", fan, swarmed).await;
    engine.shutdown().await;
    line
}
