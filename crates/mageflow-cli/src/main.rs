//! `mageflow`: the one binary. `demo` runs the showcase on the embedded store, `bench` runs the
//! named performance scenarios, `history` prints a workflow's audit trail, `verify` checks a
//! store's integrity, `state` prints a workflow's current state; `serve`, `worker`, `migrate` and `replay --rebuild-hot` run a PostgreSQL +
//! Redis deployment.

mod bench;
mod bench_cluster;
mod bench_http;
mod control_cmd;
mod demo;
mod http_cmd;
mod inspect;
mod reader;
mod submit_cmd;
mod swarm_cmd;
mod tiers;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

/// mimalloc rather than glibc's malloc: the orchestrator allocates and frees many small buffers
/// per task (events, Redis commands, reports) across tokio's threads, and glibc's malloc spent
/// ~40 % of its CPU time in `bench --scenario flat` on PostgreSQL + Redis.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use mageflow::control::ControlOp;
pub use tiers::embedded_path;

#[derive(Parser)]
#[command(name = "mageflow", version, about = "Event-sourced task orchestration")]
struct Cli {
    /// Format of the log lines on stderr (their filter: MAGEFLOW_LOG, else RUST_LOG, in
    /// tracing's EnvFilter syntax, e.g. `info` or `warn,mageflow_store=debug`; default `warn`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    /// One human-readable line per event (coloured only on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Where the log filter comes from, first set one wins.
const LOG_FILTER_VARS: [&str; 2] = ["MAGEFLOW_LOG", "RUST_LOG"];
/// The filter when neither variable is set.
const LOG_FILTER_DEFAULT: &str = "warn";

/// The filter from the first of [`LOG_FILTER_VARS`] that is set (and not empty). An invalid one
/// is refused, naming the variable, rather than silently replaced by the default.
fn log_filter(default: &str) -> Result<tracing_subscriber::EnvFilter> {
    use tracing_subscriber::EnvFilter;
    for var in LOG_FILTER_VARS {
        let value = match std::env::var(var) {
            Ok(v) if v.trim().is_empty() => continue,
            Ok(v) => v,
            Err(std::env::VarError::NotPresent) => continue,
            Err(std::env::VarError::NotUnicode(_)) => {
                anyhow::bail!("{var} is not valid UTF-8, so it is no log filter")
            }
        };
        return EnvFilter::builder().parse(&value).map_err(|e| {
            anyhow::anyhow!(
                "{var}={value:?} is not a valid log filter ({e}); the syntax is tracing's \
                 EnvFilter: a level (`info`), or comma-separated `target=level` directives \
                 (`warn,mageflow_store=debug`)"
            )
        });
    }
    Ok(EnvFilter::new(default))
}

/// Log to stderr, in `format`; colour only when stderr is a terminal (and NO_COLOR is unset),
/// so redirected logs carry no escape codes.
/// `default`: the filter without `MAGEFLOW_LOG` / `RUST_LOG`.
fn init_logs(format: LogFormat, default: &str) -> Result<()> {
    use std::io::IsTerminal;
    let filter = log_filter(default)?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let installed = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none())
            .try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|e| anyhow::anyhow!("cannot set up logging: {e}"))
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the showcase: a chain whose middle step is a swarm of ~1000 tasks, with callbacks,
    /// a retried failure and a suspend + resume, on the embedded store.
    Demo {
        /// Store, as `embedded:PATH`. Default: a fresh temporary directory.
        #[arg(long, env = "MAGEFLOW_STORE")]
        store: Option<String>,
        /// Number of tasks in the swarm (at least 1).
        #[arg(long, default_value_t = 1000)]
        items: u32,
        /// Plain log lines instead of progress bars.
        #[arg(long)]
        no_progress: bool,
    },
    /// Run performance scenarios; prints one `key=value` line per scenario.
    Bench {
        /// flat, chain, fanout, fanout-limited, cancel, interrupt, graph-line, graph-fanout,
        /// or all (each in its own process). On PostgreSQL + Redis: flat, chain or fanout.
        #[arg(long, default_value = "all")]
        scenario: String,
        /// `--store embedded:PATH` (default: a fresh temporary directory per scenario), or
        /// `--postgres URL --redis URL` (a fresh schema and key prefix per run).
        #[command(flatten)]
        tiers: tiers::StoreArgs,
        /// Override the scenario's task count.
        #[arg(long)]
        n: Option<u32>,
        /// Worker processes to start (PostgreSQL + Redis only).
        #[arg(long, default_value_t = 2)]
        worker_processes: usize,
    },
    /// Print every event of a workflow (`wf_…`), or the events that concern one signature
    /// (`sig_…`): who did what, when. Reads a snapshot of an embedded store a `serve` holds.
    History {
        /// `--store embedded:PATH`, or `--postgres URL [--schema S]`.
        #[command(flatten)]
        tiers: tiers::StoreArgs,
        /// Workflow id (`wf_…`) or signature id (`sig_…`).
        id: String,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the store: every event decodes, positions and stream sequences are dense.
    Verify {
        /// `--store embedded:PATH`, or `--postgres URL [--schema S]`.
        #[command(flatten)]
        tiers: tiers::StoreArgs,
    },
    /// Print the current state of a workflow (`wf_…`), or of a signature and everything under
    /// it (`sig_…`), folded from the log: each signature's name, kind, status and attempt.
    State {
        /// `--store embedded:PATH`, or `--postgres URL [--schema S]`.
        #[command(flatten)]
        tiers: tiers::StoreArgs,
        /// Workflow id (`wf_…`) or signature id (`sig_…`).
        id: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Run the orchestrator: resume unfinished work, then serve until SIGINT/SIGTERM. On
    /// PostgreSQL + Redis, handlers run in `mageflow worker` processes.
    Serve {
        #[command(flatten)]
        tiers: tiers::StoreArgs,
        /// Handlers running at once (embedded store only).
        #[arg(long, default_value_t = 64)]
        workers: usize,
        #[command(flatten)]
        resume: tiers::ResumeArgs,
        #[command(flatten)]
        http: http_cmd::HttpArgs,
    },
    /// API tokens for `serve --http`: create (shown once, stored hashed), list, revoke.
    #[command(subcommand)]
    Token(http_cmd::TokenCmd),
    /// Run handlers of the built-in tasks for jobs from Redis (PostgreSQL + Redis deployments).
    Worker {
        #[command(flatten)]
        tiers: tiers::StoreArgs,
        /// Handlers running at once.
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
        /// Name recorded with this worker's reports (default: worker-<pid>).
        #[arg(long, env = "MAGEFLOW_WORKER_ID")]
        id: Option<String>,
        /// How long a claimed job stays hidden from other workers without a renewal: a job of
        /// a worker that died runs again elsewhere after this.
        #[arg(long, env = "MAGEFLOW_LEASE_MS", default_value_t = 30_000)]
        lease_ms: u64,
    },
    /// Create or upgrade the PostgreSQL log's tables.
    Migrate {
        #[command(flatten)]
        tiers: tiers::StoreArgs,
    },
    /// Stop a signature and everything under it and delete it for good (only the audit record
    /// stays). Refused without --confirm.
    Cancel(control_cmd::CancelArgs),
    /// Stop a signature whatever its status, keeping it (resume runs it again from its last
    /// checkpoint, best effort).
    Interrupt(control_cmd::ControlArgs),
    /// Hold a signature: nothing new of it starts until it is resumed.
    Suspend(control_cmd::ControlArgs),
    /// Resume a suspended or interrupted signature.
    Resume(control_cmd::ControlArgs),
    /// Mark a workflow for deletion: purged when its window ends unless restored or rerun.
    Delete(control_cmd::ControlArgs),
    /// Lift a workflow's deletion mark.
    Restore(control_cmd::ControlArgs),
    /// Run a finished workflow again (lifts a deletion mark); given a signature inside one, run
    /// that signature again with what consumed its outcome (a failed step retried).
    Rerun(control_cmd::ControlArgs),
    /// Create a workflow from a definition file (JSON, see docs/workflow.schema.json) on an
    /// embedded store and print its id; --wait runs it here to its end.
    Submit(submit_cmd::SubmitArgs),
    /// Work on a swarm: `swarm add SWARM_ID --file ITEMS.jsonl` adds many items at once.
    #[command(subcommand)]
    Swarm(swarm_cmd::SwarmCmd),
    /// Accept a gate that waits for a signal: it succeeds with its input and --value merged
    /// over it, and what follows it runs (a graph routes on that result).
    Signal(control_cmd::SignalArgs),
    /// Reject a gate that waits for a signal: it fails with --reason, and its failure path runs.
    Reject(control_cmd::RejectArgs),
    /// Change the priority of a waiting signature: high, medium, low or a number from -1000
    /// to 1000 (a swarm starts its highest-priority waiting item next).
    Priority(control_cmd::PriorityArgs),
    /// Re-project the log: `--rebuild-hot` clears the deployment's Redis keys and rebuilds them
    /// (refused while an orchestrator runs on the log: its projector rebuilds them by itself).
    Replay {
        #[command(flatten)]
        tiers: tiers::StoreArgs,
        #[arg(long, required = true)]
        rebuild_hot: bool,
        /// Plain output instead of a progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Run the deterministic simulator: orchestrator, log, hot tier and workers in this process
    /// under virtual time, with the faults a seed chooses (crashes, killed workers, lost and
    /// duplicated reports, a wiped hot tier, failing appends, clock skew), checking the
    /// invariants of docs/ARCHITECTURE.md after each run. Needs no services. Prints each failing
    /// seed (`seed=S failed: <invariant>: <detail>`) and exits 1 if any failed.
    Simulate {
        /// How many seeds to run, from `--from`.
        #[arg(long, default_value_t = 100, conflicts_with = "seed")]
        seeds: u64,
        /// The first seed of `--seeds`.
        #[arg(long, default_value_t = 0, conflicts_with = "seed")]
        from: u64,
        /// Run this one seed (replay a failure).
        #[arg(long)]
        seed: Option<u64>,
        /// Print every run's report, and a failure's plan and events.
        #[arg(long)]
        verbose: bool,
        /// The same workloads without injected faults.
        #[arg(long)]
        no_faults: bool,
    },
}

/// Resolves on the first SIGINT or SIGTERM.
pub async fn stop_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // The simulator's injected faults make the engine log errors by design: its verdict is the
    // output, the engine's lines are there on request (MAGEFLOW_LOG=warn).
    let quiet = matches!(cli.command, Cmd::Simulate { .. });
    init_logs(
        cli.log_format,
        if quiet { "off" } else { LOG_FILTER_DEFAULT },
    )?;
    // The simulator runs every seed on a virtual-time runtime of its own: not inside ours.
    if let Cmd::Simulate {
        seeds,
        from,
        seed,
        verbose,
        no_faults,
    } = cli.command
    {
        let range = match seed {
            Some(s) => s..s.saturating_add(1),
            None => from..from.saturating_add(seeds),
        };
        let config = mageflow_sim::SimConfig {
            faults: !no_faults,
            ..mageflow_sim::SimConfig::default()
        };
        if mageflow_sim::run_and_print(range, &config, verbose) {
            return Ok(());
        }
        std::process::exit(1);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        match cli.command {
            Cmd::Demo {
                store,
                items,
                no_progress,
            } => demo::run(store.as_deref(), items, !no_progress).await,
            Cmd::Bench {
                scenario,
                tiers,
                n,
                worker_processes,
            } => match tiers.resolve()? {
                Some(tiers::Tiers::Cluster { .. }) => {
                    let base = tiers.cluster("bench")?;
                    let line = bench_cluster::run(&scenario, &base, n, worker_processes).await?;
                    println!("scenario={scenario} {line}");
                    Ok(())
                }
                _ => bench::run(&scenario, tiers.store.as_deref(), n).await,
            },
            Cmd::History { tiers, id, json } => inspect::history(&tiers, &id, json).await,
            Cmd::Verify { tiers } => inspect::verify(&tiers).await,
            Cmd::State { tiers, id, json } => inspect::state(&tiers, &id, json).await,
            Cmd::Serve {
                tiers,
                workers,
                resume,
                http,
            } => tiers::serve(&tiers, workers, &resume, &http).await,
            Cmd::Token(c) => http_cmd::token(&c),
            Cmd::Worker {
                tiers,
                concurrency,
                id,
                lease_ms,
            } => tiers::worker(&tiers, concurrency, id, lease_ms).await,
            Cmd::Migrate { tiers } => tiers::migrate(&tiers).await,
            Cmd::Replay {
                tiers,
                rebuild_hot: _,
                no_progress,
            } => tiers::rebuild_hot(&tiers, !no_progress).await,
            Cmd::Simulate { .. } => unreachable!("run before the runtime starts"),
            Cmd::Cancel(a) => control_cmd::run(ControlOp::Cancel, &a.common, a.confirm, None).await,
            Cmd::Interrupt(a) => control_cmd::run(ControlOp::Interrupt, &a, false, None).await,
            Cmd::Suspend(a) => control_cmd::run(ControlOp::Suspend, &a, false, None).await,
            Cmd::Resume(a) => control_cmd::run(ControlOp::Resume, &a, false, None).await,
            Cmd::Delete(a) => control_cmd::run(ControlOp::Delete, &a, false, None).await,
            Cmd::Restore(a) => control_cmd::run(ControlOp::Restore, &a, false, None).await,
            Cmd::Rerun(a) => control_cmd::run(ControlOp::Rerun, &a, false, None).await,
            Cmd::Submit(a) => submit_cmd::run(&a).await,
            Cmd::Swarm(c) => swarm_cmd::run(&c).await,
            Cmd::Signal(a) => {
                let value = control_cmd::parse_signal(&a.value)?;
                control_cmd::run(ControlOp::Signal, &a.common, false, Some(value)).await
            }
            Cmd::Priority(a) => {
                let level = control_cmd::parse_priority(&a.level)?;
                control_cmd::run(ControlOp::Priority, &a.common, false, Some(level)).await
            }
            Cmd::Reject(a) => {
                let reason = serde_json::Value::String(a.reason);
                control_cmd::run(ControlOp::Reject, &a.common, false, Some(reason)).await
            }
        }
    })
}
