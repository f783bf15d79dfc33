//! Auto-resume after a restart (`Config::auto_resume`): the global switch, the task-name and
//! root-kind filters, the stagger, corrupt workflows skipped at start-up, the resume report
//! written to the log's system stream, and a kill -9 test of a real process.

use crate::support::{config, next, task, wait_until, Backend, Store};
use anyhow::{bail, ensure, Context as _, Result};
use mageflow::core::codec;
use mageflow::engine::{AutoResume, RecoveryReport, StoredResumeReport};
use mageflow::store::AppendRequest;
use mageflow::{
    chain, sign, swarm, Actor, Config, Event, Handle, Payload, Registry, SignatureId, Status,
    TaskFailure, Timestamp, Workflow, WorkflowId,
};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashMap};
use std::time::Duration;
use tokio::sync::mpsc;

all_stores!(
    switched_off_nothing_resumes_until_resume_or_run,
    task_name_and_kind_filters_hold_the_rest,
    stagger_spreads_the_resumed_starts,
    a_corrupt_workflow_is_skipped_reported_and_the_engine_starts,
);
// On the deployment, only the corrupt-workflow scenario: with remote dispatch the orchestrator
// hands every queued task to Redis at once (up to its window, whatever `Config::workers` says),
// so no start leaves work queued, and the attempts in flight it leaves are the workers' whatever
// auto-resume says (see `AutoResume`). The switch, the filters and the stagger, which act on
// queued and locally running work, have nothing to act on there, so those scenarios would not
// test them. The kill -9 test is of the embedded engine (sled, one process).
on_cluster!(a_corrupt_workflow_is_skipped_reported_and_the_engine_starts);

/// `blocker`: on its first attempt saves a checkpoint, says "started" and blocks until
/// cancelled; later attempts return the checkpoint they were given. `quick` and the named tasks
/// of `names` say their name and succeed.
fn registry(tx: &mpsc::UnboundedSender<String>, names: &[&'static str]) -> Registry {
    let mut tasks = Registry::new();
    let t = tx.clone();
    tasks.task("blocker", move |_: Value, ctx| {
        let tx = t.clone();
        async move {
            if ctx.attempt() > 1 {
                let _ = tx.send(format!("blocker attempt {}", ctx.attempt()));
                return Ok(ctx.checkpoint().cloned().unwrap_or(Value::Null));
            }
            ctx.save_checkpoint(json!({"offset": 7}))
                .await
                .map_err(|e| TaskFailure::fatal(e.to_string()))?;
            let _ = tx.send("started".into());
            ctx.cancellation().cancelled().await;
            // Let go of the engine (and with it the log) before saying so.
            drop(ctx);
            let _ = tx.send("released".into());
            Err(TaskFailure::retryable("stopped by shutdown"))
        }
    });
    for name in std::iter::once("quick").chain(names.iter().copied()) {
        let t = tx.clone();
        tasks.task(name, move |_: Value, _ctx| {
            let _ = t.send(name.to_owned());
            async move { Ok::<_, TaskFailure>(json!(name)) }
        });
    }
    tasks
}

fn with_auto_resume(workers: usize, auto_resume: AutoResume) -> Config {
    Config {
        workers,
        grace: Duration::from_millis(50),
        auto_resume,
        ..config()
    }
}

fn set(items: &[&str]) -> Option<BTreeSet<String>> {
    Some(items.iter().map(|s| s.to_string()).collect())
}

/// The last resume report of the log, which must be `report`.
fn last_report(h: &Handle, report: &RecoveryReport) -> Result<StoredResumeReport> {
    let reports = h.resume_reports()?;
    let last = reports.last().context("no resume report in the log")?;
    assert_eq!(
        &last.report, report,
        "the durable report is the returned one"
    );
    assert_eq!(last.actor, Actor::system("recovery"));
    Ok(last.clone())
}

fn started(history: &[Event], node: u32) -> Vec<u32> {
    history
        .iter()
        .filter_map(|e| match e.payload {
            Payload::Started { node: n, attempt } if n == node => Some(attempt),
            _ => None,
        })
        .collect()
}

async fn switched_off_nothing_resumes_until_resume_or_run(store: Store) -> Result<()> {
    let backend = Backend::new(store)?;
    let (tx, mut seen) = mpsc::unbounded_channel();

    // A: the blocker holds the only slot; `quick` waits queued behind it; `later` is created,
    // never run.
    let a = backend
        .start(
            registry(&tx, &[]),
            with_auto_resume(1, AutoResume::default()),
        )
        .await?;
    let h = a.handle();
    let blocked = h.submit(sign("blocker"), json!({})).await?;
    assert_eq!(next(&mut seen).await?, "started");
    let queued = h.submit(sign("quick"), json!({})).await?;
    let later = h.create(sign("quick")).await?;
    let open = h.submit(swarm([sign("quick")]).open(), json!({})).await?;
    assert!(
        h.resume_reports()?.is_empty(),
        "a start on an empty log reports nothing"
    );
    a.shutdown().await;
    assert_eq!(next(&mut seen).await?, "released");
    // The old handle holds nothing of the log after the shutdown (sled allows one opener).
    assert!(matches!(h.resume_reports(), Err(mageflow::Error::ShutDown)));

    let off = AutoResume {
        enabled: false,
        ..AutoResume::default()
    };
    let b = backend
        .start(registry(&tx, &[]), with_auto_resume(1, off))
        .await?;
    let report = b.recovery().clone();
    assert_eq!(report.workflows_unfinished, 4, "{report:?}");
    assert_eq!(report.workflows_held, 4, "{report:?}");
    assert_eq!(report.skipped_by_filter, 3, "{report:?}");
    assert_eq!(report.attempts_requeued, 0, "{report:?}");
    assert_eq!(report.tasks_queued, 0, "{report:?}");
    assert!(!report.auto_resume);
    let h = b.handle();
    let stored = last_report(&h, &report)?;
    assert_eq!(h.resume_reports()?.len(), 1);
    assert!(h.history(WorkflowId::SYSTEM)?.is_empty());
    assert!(h.workflow(WorkflowId::SYSTEM).await.is_err());

    // Items added to a held swarm are queued but held too.
    h.add_to_swarm(SignatureId::root(open), [sign("quick")], true)
        .await?;
    // A new workflow runs on the only slot, ahead of nothing: the held `quick`s were queued
    // first and would have started before it, the blocker would have been requeued.
    let fresh = h.submit(sign("quick"), json!({})).await?;
    h.wait(fresh).await?;
    assert_eq!(next(&mut seen).await?, "quick", "only the new workflow ran");
    let b_state = h.workflow(blocked).await?;
    assert!(b_state.nodes[0].in_flight, "still recorded as running");
    assert_eq!(b_state.nodes[0].status, Status::Running);
    assert_eq!(b_state.nodes[0].attempt, 1);
    assert_eq!(started(&h.history(blocked)?, 0), [1]);
    let q_state = h.workflow(queued).await?;
    assert_eq!(q_state.nodes[0].status, Status::Queued);
    assert!(started(&h.history(queued)?, 0).is_empty());
    let o_state = h.workflow(open).await?;
    assert_eq!(o_state.nodes.len(), 3);
    for item in [1, 2] {
        assert_eq!(o_state.nodes[item].status, Status::Queued);
        assert!(started(&h.history(open)?, item as u32).is_empty());
    }

    // A manual resume releases the blocker: attempt 2 gets attempt 1's checkpoint.
    h.resume(SignatureId::root(blocked)).await?;
    let done = h.wait(blocked).await?;
    assert_eq!(next(&mut seen).await?, "blocker attempt 2");
    assert_eq!(
        done.nodes[0].outcome,
        Some(mageflow::Outcome::Ok(json!({"offset": 7})))
    );
    let history = h.history(blocked)?;
    assert_eq!(started(&history, 0), [1, 2]);
    let requeues: Vec<&Actor> = history
        .iter()
        .filter(|e| matches!(e.payload, Payload::RetryScheduled { lost: true, .. }))
        .map(|e| &e.actor)
        .collect();
    assert_eq!(requeues, [&Actor::system("resume")]);
    // Releasing one workflow releases nothing else.
    assert_eq!(h.workflow(queued).await?.nodes[0].status, Status::Queued);
    h.resume(SignatureId::root(queued)).await?;
    h.wait(queued).await?;
    assert_eq!(next(&mut seen).await?, "quick");
    // `run` of a created workflow releases it too.
    h.run(later, json!({})).await?;
    h.wait(later).await?;
    assert_eq!(next(&mut seen).await?, "quick");
    h.resume(SignatureId::root(open)).await?;
    assert_eq!(h.wait(open).await?.nodes[0].status, Status::Done);
    assert_eq!(next(&mut seen).await?, "quick");
    assert_eq!(next(&mut seen).await?, "quick");
    b.shutdown().await;
    drop(h);

    // Nothing left unfinished: the next start writes no report.
    let c = backend
        .start(
            registry(&tx, &[]),
            with_auto_resume(1, AutoResume::default()),
        )
        .await?;
    assert_eq!(c.recovery().workflows_unfinished, 0);
    let reports = c.handle().resume_reports()?;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0], stored);
    c.shutdown().await;
    Ok(())
}

async fn task_name_and_kind_filters_hold_the_rest(store: Store) -> Result<()> {
    let backend = Backend::new(store)?;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let reg = || registry(&tx, &["alpha", "beta"]);

    // Record only: everything stays queued.
    let a = backend
        .start(reg(), with_auto_resume(0, AutoResume::default()))
        .await?;
    let h = a.handle();
    let sw = h
        .submit(swarm([sign("alpha"), sign("beta")]), json!({}))
        .await?;
    let ch = h
        .submit(chain([sign("alpha"), sign("beta")]), json!({}))
        .await?;
    let single = h.submit(sign("alpha"), json!({})).await?;
    a.shutdown().await;
    drop(h);

    let filters = AutoResume {
        tasks: set(&["alpha"]),
        kinds: set(&["swarm", "task"]),
        ..AutoResume::default()
    };
    // One slot: the resumed starts run in workflow order (swarm, chain, task), so anything the
    // filters failed to hold would start before the single task.
    let b = backend.start(reg(), with_auto_resume(1, filters)).await?;
    let report = b.recovery().clone();
    assert_eq!(report.workflows_unfinished, 3, "{report:?}");
    assert_eq!(
        report.tasks_queued, 2,
        "swarm's alpha, single alpha: {report:?}"
    );
    assert_eq!(
        report.skipped_by_filter, 2,
        "swarm's beta, chain's alpha: {report:?}"
    );
    assert_eq!(report.workflows_held, 1, "the chain: {report:?}");
    let h = b.handle();
    last_report(&h, &report)?;

    h.wait(single).await?;
    let sw_state = h.workflow(sw).await?;
    let (alpha, beta) = (task(&sw_state, "alpha")?, task(&sw_state, "beta")?);
    assert_eq!(next(&mut seen).await?, "alpha");
    assert_eq!(next(&mut seen).await?, "alpha");
    assert_eq!(sw_state.nodes[alpha as usize].status, Status::Done);
    assert_eq!(sw_state.nodes[beta as usize].status, Status::Queued);
    assert!(started(&h.history(sw)?, beta).is_empty());
    let ch_state = h.workflow(ch).await?;
    let ch_alpha = task(&ch_state, "alpha")?;
    assert_eq!(ch_state.nodes[ch_alpha as usize].status, Status::Queued);
    assert!(started(&h.history(ch)?, ch_alpha).is_empty());

    // Resuming the swarm releases its beta; resuming the chain releases it whole.
    h.resume(SignatureId::root(sw)).await?;
    assert_eq!(h.wait(sw).await?.nodes[0].status, Status::Done);
    assert_eq!(next(&mut seen).await?, "beta");
    h.resume(SignatureId::root(ch)).await?;
    assert_eq!(h.wait(ch).await?.nodes[0].status, Status::Done);
    assert_eq!(next(&mut seen).await?, "alpha");
    assert_eq!(next(&mut seen).await?, "beta");
    b.shutdown().await;
    Ok(())
}

async fn stagger_spreads_the_resumed_starts(store: Store) -> Result<()> {
    const ITEMS: usize = 4;
    const STAGGER_MS: u64 = 60;
    let backend = Backend::new(store)?;
    let (tx, _seen) = mpsc::unbounded_channel();
    let a = backend
        .start(
            registry(&tx, &[]),
            with_auto_resume(0, AutoResume::default()),
        )
        .await?;
    let items: Vec<_> = (0..ITEMS).map(|i| sign("quick").kwarg("i", i)).collect();
    let wf = a
        .handle()
        .submit(swarm(items).max_concurrency(ITEMS as u32), json!({}))
        .await?;
    a.shutdown().await;

    let staggered = AutoResume {
        stagger: Duration::from_millis(STAGGER_MS),
        ..AutoResume::default()
    };
    let b = backend
        .start(registry(&tx, &[]), with_auto_resume(ITEMS, staggered))
        .await?;
    let report = b.recovery().clone();
    assert_eq!(report.tasks_queued, ITEMS as u64, "{report:?}");
    assert_eq!(report.stagger_ms, STAGGER_MS);
    let h = b.handle();
    let t0 = last_report(&h, &report)?.at;
    h.wait(wf).await?;
    let mut starts: Vec<Timestamp> = h
        .history(wf)?
        .iter()
        .filter(|e| matches!(e.payload, Payload::Started { .. }))
        .map(|e| e.at)
        .collect();
    assert_eq!(starts.len(), ITEMS);
    starts.sort();
    // The k-th start (from 0) is at least k staggers after the recovery.
    for (k, at) in starts.iter().enumerate() {
        let earliest = t0.as_micros() + (k as i64) * (STAGGER_MS as i64) * 1000;
        assert!(
            at.as_micros() >= earliest,
            "start {k} at {at} is earlier than {} µs after the recovery at {t0}",
            k as u64 * STAGGER_MS * 1000
        );
    }
    b.shutdown().await;
    Ok(())
}

async fn a_corrupt_workflow_is_skipped_reported_and_the_engine_starts(store: Store) -> Result<()> {
    let backend = Backend::new(store)?;
    let (tx, mut seen) = mpsc::unbounded_channel();
    let a = backend
        .start(
            registry(&tx, &[]),
            with_auto_resume(0, AutoResume::default()),
        )
        .await?;
    let h = a.handle();
    let good = h.submit(sign("quick"), json!({})).await?;
    let cluster = store == Store::Cluster;
    if cluster {
        // Record-only there means no worker runtime: the orchestrator hands the task to Redis
        // (it is in flight) and it waits there for the next start's worker.
        wait_until(&h, good, |w| w.nodes[0].in_flight).await?;
    }
    // A forged stream: a valid creation, then a success of a signature that does not exist.
    let bad = WorkflowId(uuid::Uuid::now_v7());
    let template = h.history(good)?;
    let created = template
        .first()
        .context("the good workflow has a creation event")?;
    let forged = |seq: u64, payload: Payload| Event {
        stream: bad,
        seq,
        payload,
        ..created.clone()
    };
    h.log()
        .append(vec![AppendRequest {
            stream: bad,
            expected_version: 0,
            events: vec![
                forged(1, created.payload.clone()),
                forged(
                    2,
                    Payload::Succeeded {
                        node: 99,
                        attempt: 1,
                        result: json!(1),
                    },
                ),
            ],
        }])
        .await?;
    a.shutdown().await;
    drop(h);

    let b = backend
        .start(
            registry(&tx, &[]),
            with_auto_resume(1, AutoResume::default()),
        )
        .await?;
    let report = b.recovery().clone();
    assert_eq!(report.skipped_corrupt, 1, "{report:?}");
    assert_eq!(report.corrupt.len(), 1);
    assert_eq!(report.corrupt[0].workflow, bad);
    assert!(
        report.corrupt[0].reason.contains("99"),
        "the reason names the missing signature: {}",
        report.corrupt[0].reason
    );
    assert_eq!(report.workflows_unfinished, 1, "{report:?}");
    // The good workflow's task: queued on the log backends (nothing ran it), in flight on the
    // deployment (handed to Redis; left to the workers).
    let (queued, resumed) = if cluster { (0, 1) } else { (1, 0) };
    assert_eq!(report.tasks_queued, queued, "{report:?}");
    assert_eq!(report.attempts_resumed, resumed, "{report:?}");
    let h = b.handle();
    last_report(&h, &report)?;
    h.wait(good).await?;
    assert_eq!(next(&mut seen).await?, "quick");
    match h.workflow(bad).await {
        Err(mageflow::Error::Replay(id, _)) => assert_eq!(id, bad),
        other => bail!("a corrupt workflow reads as corrupt, got {other:?}"),
    }
    b.shutdown().await;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// kill -9: the only engine process is killed at random moments of a 2 000-task swarm.

const KILL_DIR_ENV: &str = "MAGEFLOW_RESUME_CHILD_DIR";
const KILL_WF_ENV: &str = "MAGEFLOW_RESUME_CHILD_WF";
const KILL_ROUNDS: usize = 20;
const KILL_ITEMS: usize = 2_000;
const KILL_CONCURRENCY: u32 = 4;
const KILL_NAP_MS: u64 = 10;
/// Longest wait for a child to make progress before the test fails (a hang guard only).
const KILL_PROGRESS_SECS_MAX: u64 = 60;

fn kill_registry() -> Registry {
    let mut tasks = Registry::new();
    tasks.task("nap", |_: Value, _ctx| async move {
        tokio::time::sleep(Duration::from_millis(KILL_NAP_MS)).await;
        Ok::<_, TaskFailure>(Value::Null)
    });
    tasks
}

fn kill_config(workers: usize) -> Config {
    Config {
        workers,
        grace: Duration::from_millis(50),
        ..config()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    // libtest may have left "test ... " unterminated on stdout.
    let _ = writeln!(out, "\n{line}");
    let _ = out.flush();
}

async fn succeeded_items(h: &Handle, wf: WorkflowId) -> Result<u32> {
    Ok(h.inspect(wf, |w| w.nodes[0].swarm.succeeded).await?)
}

/// The child half: opens the engine on the directory (recovery), says "progress" once a task
/// succeeded durably in this process, then runs until killed (or says "done").
#[test]
fn kill_child() {
    let (Some(dir), Some(wf)) = (
        std::env::var_os(KILL_DIR_ENV),
        std::env::var_os(KILL_WF_ENV),
    ) else {
        return;
    };
    let wf: WorkflowId = wf
        .to_str()
        .and_then(|s| s.parse().ok())
        .expect("workflow id");
    runtime().block_on(async move {
        let engine = mageflow::open_embedded(&dir, kill_registry(), kill_config(16))
            .await
            .expect("open the engine");
        let h = engine.handle();
        let first = succeeded_items(&h, wf).await.expect("inspect");
        say("ready");
        loop {
            if succeeded_items(&h, wf).await.expect("inspect") > first {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        say("progress");
        h.wait(wf).await.expect("wait");
        say("done");
        engine.shutdown().await;
    });
}

struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// Run the child until it made progress, then SIGKILL it `delay` later.
fn kill_round(dir: &std::path::Path, wf: WorkflowId, delay: Duration, round: usize) -> Result<()> {
    use std::io::{BufRead, BufReader, Read};
    use std::process::{Command, Stdio};
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args([
            "auto_resume::kill_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(KILL_DIR_ENV, dir)
        .env(KILL_WF_ENV, wf.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawn the child")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let (lines_tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            let _ = lines_tx.send(line.trim().to_owned());
        }
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let progressed = loop {
        match lines.recv_timeout(Duration::from_secs(KILL_PROGRESS_SECS_MAX)) {
            Ok(line) if line == "progress" => break Ok(()),
            Ok(line) if line == "done" => break Err("the workflow finished before the kill"),
            Ok(_) => continue,
            Err(_) => break Err("no progress (the child hung or died)"),
        }
    };
    if progressed.is_ok() {
        // The point of the test: kill at a random moment of the run.
        std::thread::sleep(delay);
    }
    let early_exit = child.try_wait()?;
    child.kill().context("SIGKILL the child")?;
    child.wait().context("reap the child")?;
    let stderr = err_reader.join().unwrap_or_default();
    if let Err(why) = progressed {
        bail!("round {round}: {why}; stderr:\n{stderr}");
    }
    ensure!(
        early_exit.is_none(),
        "round {round}: the child exited on its own ({early_exit:?}); stderr:\n{stderr}"
    );
    Ok(())
}

#[test]
fn kill_minus_nine_at_random_moments_then_every_task_succeeds_once() -> Result<()> {
    let began = std::time::Instant::now();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64;
    eprintln!("kill test seed {seed}");
    let mut rng = Lcg(seed);
    let dir = tempfile::tempdir()?;

    // Create the workflow without running anything (0 workers), then let go of the store.
    let wf = runtime().block_on(async {
        let engine = mageflow::open_embedded(dir.path(), kill_registry(), kill_config(0)).await?;
        let items: Vec<_> = (0..KILL_ITEMS).map(|i| sign("nap").kwarg("i", i)).collect();
        let wf = engine
            .handle()
            .submit(swarm(items).max_concurrency(KILL_CONCURRENCY), json!({}))
            .await?;
        engine.shutdown().await;
        anyhow::Ok(wf)
    })?;

    for round in 0..KILL_ROUNDS {
        let delay = Duration::from_millis(rng.below(120));
        kill_round(dir.path(), wf, delay, round).with_context(|| format!("seed {seed}"))?;
    }

    // The last start runs it to the end, in this process.
    let (state, history, reports, log) = runtime().block_on(async {
        let engine = mageflow::open_embedded(dir.path(), kill_registry(), kill_config(16)).await?;
        let h = engine.handle();
        let state = h.wait(wf).await?;
        let history = h.history(wf)?;
        let reports = h.resume_reports()?;
        let mut log = Vec::new();
        let mut from = 1;
        loop {
            let chunk = h.log().read_all(from, 16_384)?;
            let Some(last) = chunk.last() else { break };
            from = last.position + 1;
            log.extend(chunk);
        }
        engine.shutdown().await;
        anyhow::Ok((state, history, reports, log))
    })?;

    assert_eq!(state.nodes[0].status, Status::Done, "seed {seed}");
    assert_eq!(state.nodes.len(), KILL_ITEMS + 1);
    let mut successes = vec![0u32; state.nodes.len()];
    for e in &history {
        if let Payload::Succeeded { node, attempt, .. } = e.payload {
            if attempt > 0 {
                successes[node as usize] += 1;
            }
        }
    }
    for (i, n) in state.nodes.iter().enumerate().skip(1) {
        assert_eq!(n.status, Status::Done, "item {i}, seed {seed}");
        assert_eq!(
            successes[i], 1,
            "item {i} succeeded {} times, seed {seed}",
            successes[i]
        );
    }

    // One report per start after the first: each kill round's child and the last start.
    assert_eq!(reports.len(), KILL_ROUNDS + 1, "seed {seed}");
    // Replay the log: attempts in flight and items succeeded at each report's position.
    let positions: BTreeSet<u64> = reports.iter().map(|r| r.report.log_position).collect();
    let mut states: HashMap<WorkflowId, Workflow> = HashMap::new();
    let (mut in_flight, mut done) = (0i64, 0u64);
    let mut at: HashMap<u64, (i64, u64)> = HashMap::new();
    for rec in &log {
        let e = &rec.event;
        // Every event, the reports included, still decodes as written.
        assert_eq!(&codec::decode(&codec::encode(e)?)?, e);
        if !e.stream.is_system() {
            let w = states
                .entry(e.stream)
                .or_insert_with(|| Workflow::empty(e.stream));
            let node = e.payload.node().map(|n| n as usize);
            let before = node.and_then(|n| w.nodes.get(n)).map(|n| n.in_flight);
            w.apply(e)?;
            let after = node.and_then(|n| w.nodes.get(n)).map(|n| n.in_flight);
            in_flight += i64::from(after == Some(true)) - i64::from(before == Some(true));
            if matches!(e.payload, Payload::Succeeded { attempt, .. } if attempt > 0) {
                done += 1;
            }
        }
        if positions.contains(&rec.position) {
            at.insert(rec.position, (in_flight, done));
        }
    }
    let mut requeued_total = 0;
    let mut last_done = None;
    for (i, r) in reports.iter().enumerate() {
        let p = r.report.log_position;
        let Some(&(flying, done)) = at.get(&p) else {
            bail!("report {i} names position {p}, which is not in the log");
        };
        assert_eq!(
            r.report.attempts_requeued as i64, flying,
            "report {i}: requeued vs attempts in flight at position {p} (the kill), seed {seed}"
        );
        assert_eq!(r.report.workflows_unfinished, 1, "report {i}");
        requeued_total += r.report.attempts_requeued;
        if let Some(prev) = last_done {
            assert!(
                done > prev,
                "report {i}: no task succeeded since the previous start (seed {seed})"
            );
        }
        last_done = Some(done);
    }
    assert!(
        requeued_total > 0,
        "no kill caught an attempt in flight: the check above proved nothing (seed {seed})"
    );
    eprintln!(
        "kill test: {KILL_ROUNDS} kills, {requeued_total} attempts requeued, {} events, {:.1} s",
        log.len(),
        began.elapsed().as_secs_f64()
    );
    Ok(())
}
