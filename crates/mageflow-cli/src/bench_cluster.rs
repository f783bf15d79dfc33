//! `mageflow bench --postgres URL --redis URL`: the scenarios on a PostgreSQL + Redis deployment
//! — this process orchestrates, `--worker-processes` `mageflow worker` processes run the handlers.
//! Each run uses a fresh schema and key prefix (under the given ones) and removes both after.

use crate::bench::{chain_step_ms, percentile, run_bulk_add, run_flat, run_priority, FANOUT_LIMIT};
use crate::tiers::builtins;
use anyhow::{bail, Context, Result};
use mageflow::cluster::{open_cluster, Cluster, ClusterConfig};
use mageflow::{sign, swarm, Config};
use serde_json::json;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub const SCENARIOS: [&str; 8] = [
    "flat",
    "chain",
    "fanout",
    "fanout-limited",
    "cancel",
    "interrupt",
    "bulk-add",
    "priority",
];
/// Items of `fanout` dispatched at once, at most.
const FANOUT_AT_ONCE_MAX: u32 = 10_000;
/// Hot state of a finished workflow is trimmed from Redis this long after it finishes.
const HOT_DONE_TTL: Duration = Duration::from_secs(1);

struct Run {
    cluster: Option<Cluster>,
    workers: Vec<Child>,
    url: String,
    schema: String,
    redis_url: String,
    prefix: String,
}

impl Drop for Run {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        if let Err(e) = mageflow::store_pg::drop_schema_blocking(&self.url, &self.schema) {
            eprintln!("could not drop the bench schema {}: {e}", self.schema);
        }
        // A scenario that failed midway did not get to `stop`: its keys are still there.
        if self.cluster.take().is_some() {
            if let Err(e) = mageflow::hot::clear_prefix_blocking(&self.redis_url, &self.prefix) {
                eprintln!("could not delete the bench keys under {}: {e}", self.prefix);
            }
        }
    }
}

async fn start(base: &ClusterConfig, worker_processes: usize, concurrency: usize) -> Result<Run> {
    let tag = format!("bench_{}", std::process::id());
    let schema = match &base.pg.schema {
        Some(s) => format!("{s}_{tag}"),
        None => format!("mf_{tag}"),
    };
    let mut c = base.clone();
    c.pg.schema = Some(schema.clone());
    c.hot.prefix = format!("{}{tag}:", base.hot.prefix);
    c.window = worker_processes * concurrency * 2;
    // Finished workflows leave the hot tier quickly, so the memory figure shows what stays.
    c.hot.done_ttl = HOT_DONE_TTL;
    let config = Config {
        principal: "bench".into(),
        ..Config::default()
    };
    let mut run = Run {
        cluster: None,
        workers: Vec::new(),
        url: c.postgres.clone(),
        schema: schema.clone(),
        redis_url: c.hot.url.clone(),
        prefix: c.hot.prefix.clone(),
    };
    run.cluster = Some(open_cluster(c.clone(), builtins(), config).await?);
    let exe = std::env::current_exe().context("cannot find the mageflow binary")?;
    for i in 0..worker_processes {
        let child = Command::new(&exe)
            .args(["worker", "--postgres", &c.postgres, "--redis", &c.hot.url])
            .args(["--schema", &schema, "--prefix", &c.hot.prefix])
            .args(["--concurrency", &concurrency.to_string()])
            .args(["--id", &format!("bench-worker-{i}")])
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start a worker process")?;
        run.workers.push(child);
    }
    Ok(run)
}

impl Run {
    fn cluster(&self) -> Result<&Cluster> {
        self.cluster.as_ref().context("the deployment is stopped")
    }

    async fn stop(mut self) -> Result<()> {
        if let Some(c) = self.cluster.take() {
            let hot = c.hot().clone();
            c.shutdown().await;
            hot.clear().await?;
        }
        Ok(())
    }
}

pub async fn run(
    scenario: &str,
    base: &ClusterConfig,
    n: Option<u32>,
    worker_processes: usize,
) -> Result<String> {
    let r = start(base, worker_processes, 1024).await?;
    let h = r.cluster()?.handle();
    let workers: Vec<u32> = r.workers.iter().map(Child::id).collect();
    let cpu0 = cpu_seconds(&workers);
    let t0 = Instant::now();
    let line = match scenario {
        "flat" => {
            let n = n.unwrap_or(50_000);
            run_flat(&h, n).await?;
            let secs = t0.elapsed().as_secs_f64();
            format!(
                "n={n} seconds={secs:.3} tasks_per_s={:.0}",
                f64::from(n) / secs
            )
        }
        "chain" => {
            let n = n.unwrap_or(500);
            let steps: Vec<_> = (0..n).map(|_| sign("noop")).collect();
            let wf = h.submit(mageflow::chain(steps), json!({})).await?;
            h.wait(wf).await?;
            let ms = chain_step_ms(&h, wf)?;
            format!(
                "n={n} seconds={:.3} step_p50_ms={:.3} step_p99_ms={:.3}",
                t0.elapsed().as_secs_f64(),
                percentile(&ms, 0.5),
                percentile(&ms, 0.99)
            )
        }
        "fanout" | "fanout-limited" => {
            let n = n.unwrap_or(5_000);
            // As the embedded `fanout`: every item dispatched at once (the default
            // max_concurrency, 30, would make it a different scenario), and a success callback
            // that receives all the results; timed to the workflow's end (the callback done),
            // as the embedded one is. Past FANOUT_AT_ONCE_MAX items, that many at a time:
            // queuing a million items in the creation step would be one append of over
            // `APPEND_EVENTS_MAX` events. `fanout-limited`: FANOUT_LIMIT at a time.
            let limit = match scenario {
                "fanout" => n.clamp(1, FANOUT_AT_ONCE_MAX),
                _ => FANOUT_LIMIT,
            };
            let items: Vec<_> = (0..n).map(|_| sign("noop")).collect();
            let s = swarm(items).max_concurrency(limit).on_success(sign("noop"));
            let wf = h.submit(s, json!({})).await?;
            h.wait(wf).await?;
            let done = t0.elapsed().as_secs_f64();
            // Old history compacted while it ran (`Config::compact_history`).
            let while_running = h.stats().compaction.events.load(Ordering::Relaxed);
            // Then into cold storage at once (what the compaction job does later).
            let t1 = Instant::now();
            let c = h
                .compact(wf)
                .await?
                .context("the finished swarm is compacted")?;
            let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
            format!(
                "n={n} max_concurrency={limit} seconds_to_done={done:.3} compacted_events_while_running={while_running} \
                 compact_seconds={:.2} compacted_events={} \
                 segments={} archive_raw_mib={:.1} archive_stored_mib={:.1}",
                t1.elapsed().as_secs_f64(),
                c.events,
                c.segments,
                mib(c.raw_bytes),
                mib(c.compressed_bytes)
            )
        }
        "bulk-add" => run_bulk_add(&h, n.unwrap_or(10_000)).await?,
        "priority" => run_priority(&h, n.unwrap_or(5_000)).await?,
        "cancel" => {
            // As the embedded `cancel`: a swarm of short sleeps, 50 at a time, canceled while
            // it runs; how long the call takes and whether anything started after it (the
            // log's order is the truth).
            let n = n.unwrap_or(2_000);
            let items: Vec<_> = (0..n).map(|_| sign("sleep").kwarg("ms", 50)).collect();
            let wf = h
                .submit(swarm(items).max_concurrency(50), json!({}))
                .await?;
            tokio::time::sleep(Duration::from_millis(500)).await;
            let t0 = Instant::now();
            h.cancel(mageflow::SignatureId::root(wf), true).await?;
            let call_ms = t0.elapsed().as_secs_f64() * 1000.0;
            let state = h.wait(wf).await?;
            let history = h.history(wf)?;
            let cancel_seq = history
                .iter()
                .find(|e| matches!(e.payload, mageflow::Payload::Canceled { node: 0 }))
                .map_or(u64::MAX, |e| e.seq);
            let started_after = history
                .iter()
                .filter(|e| {
                    e.seq > cancel_seq && matches!(e.payload, mageflow::Payload::Started { .. })
                })
                .count();
            let done_before = state
                .nodes
                .iter()
                .filter(|n| n.status == mageflow::Status::Done)
                .count();
            format!(
                "n={n} cancel_call_ms={call_ms:.2} started_after_cancel_log={started_after} done_before_cancel={done_before}"
            )
        }
        "interrupt" => {
            // Long handlers, RUNNING of them at once in the worker processes; interrupt the swarm
            // and time, per handler, from the command to its stop report reaching the
            // orchestrator (an upper bound of the stop itself).
            const RUNNING: u32 = 50;
            let n = n.unwrap_or(10_000);
            let items: Vec<_> = (0..n).map(|_| sign("sleep").kwarg("ms", 600_000)).collect();
            let s = swarm(items).max_concurrency(RUNNING);
            let wf = h.submit(s, json!({})).await?;
            let running =
                |w: &mageflow::Workflow| w.nodes.iter().filter(|n| n.in_flight).count() as u32;
            while h.inspect(wf, running).await? < RUNNING {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            // Let the workers claim and start all of them.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let intake = r.cluster()?.intake_stats().clone();
            let before = intake.reports.load(Ordering::Relaxed);
            let t0 = Instant::now();
            h.interrupt(mageflow::SignatureId::root(wf)).await?;
            let call_ms = t0.elapsed().as_secs_f64() * 1000.0;
            let mut stopped_ms = Vec::new();
            let deadline = t0 + Duration::from_secs(30);
            while stopped_ms.len() < RUNNING as usize && Instant::now() < deadline {
                let got = intake
                    .reports
                    .load(Ordering::Relaxed)
                    .saturating_sub(before);
                while (stopped_ms.len() as u64) < got.min(u64::from(RUNNING)) {
                    stopped_ms.push(t0.elapsed().as_secs_f64() * 1000.0);
                }
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            format!(
                "n={n} running={RUNNING} call_ms={call_ms:.1} stopped={} stop_p50_ms={:.1} stop_p99_ms={:.1}",
                stopped_ms.len(),
                percentile(&stopped_ms, 0.5),
                percentile(&stopped_ms, 0.99)
            )
        }
        other => bail!(
            "scenario {other:?} does not run on PostgreSQL + Redis; known there: {}",
            SCENARIOS.join(", ")
        ),
    };
    let wall = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(&workers).since(&cpu0);
    let hot = r.cluster()?.hot().clone();
    let at_end = hot.memory_used().await.unwrap_or(0);
    // Once finished workflows are trimmed (their hot state expires after HOT_DONE_TTL).
    tokio::time::sleep(HOT_DONE_TTL + Duration::from_millis(500)).await;
    let trimmed = hot.memory_used().await.unwrap_or(0);
    let projector = r.cluster()?.projector_stats().clone();
    let projected = projector.events.load(Ordering::Relaxed);
    let batches = projector.batches.load(Ordering::Relaxed);
    let commits = r.cluster()?.pg().stats().commits;
    r.stop().await?;
    let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
    Ok(format!(
        "{line} store=postgres+redis worker_processes={worker_processes} commits={commits} \
         events_projected={projected} projector_batches={batches} \
         redis_used_mib_at_end={:.1} redis_used_mib_trimmed={:.1} peak_rss_mib={:.0} {}",
        mib(at_end),
        mib(trimmed),
        crate::bench::peak_rss_mib(),
        cpu.describe(wall)
    ))
}

/// CPU time (user + system) used so far by the processes of a deployment on this machine, in
/// seconds: this process (the orchestrator), the worker processes, every `postgres` process and
/// every `redis-server` process (other users of the same servers count too). Read from `/proc`;
/// all zero where there is none.
#[derive(Clone, Copy, Default)]
struct Cpu {
    orchestrator: f64,
    workers: f64,
    postgres: f64,
    redis: f64,
}

impl Cpu {
    fn since(&self, before: &Cpu) -> Cpu {
        Cpu {
            orchestrator: self.orchestrator - before.orchestrator,
            workers: self.workers - before.workers,
            postgres: self.postgres - before.postgres,
            redis: self.redis - before.redis,
        }
    }

    /// `cpu_s_...=` per process group, and the share of the machine's cores they kept busy
    /// over `wall` seconds.
    fn describe(&self, wall: f64) -> String {
        let total = self.orchestrator + self.workers + self.postgres + self.redis;
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        format!(
            "cpu_s_orchestrator={:.2} cpu_s_workers={:.2} cpu_s_postgres={:.2} cpu_s_redis={:.2} \
             cpu_busy_share={:.2}",
            self.orchestrator,
            self.workers,
            self.postgres,
            self.redis,
            total / (wall * cores).max(f64::MIN_POSITIVE)
        )
    }
}

fn cpu_seconds(workers: &[u32]) -> Cpu {
    // USER_HZ: the unit of /proc/*/stat times, 100 on Linux's user-space ABI.
    const TICKS_PER_S: f64 = 100.0;
    let mut cpu = Cpu::default();
    let me = std::process::id();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return cpu;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // `pid (comm) state ...`: comm may hold spaces; fields resume after the last ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after `state`.
        let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok());
        let (Some(user), Some(system)) = (ticks(11), ticks(12)) else {
            continue;
        };
        let secs = (user + system) / TICKS_PER_S;
        if pid == me {
            cpu.orchestrator += secs;
        } else if workers.contains(&pid) {
            cpu.workers += secs;
        } else if comm == "postgres" {
            cpu.postgres += secs;
        } else if comm == "redis-server" {
            cpu.redis += secs;
        }
    }
    cpu
}
