//! `mageflow`: the one binary. `demo` runs the showcase on the embedded store, `bench` runs the
//! named performance scenarios, `history` prints a workflow's audit trail, `verify` checks a
//! store's integrity.

mod bench;
mod demo;
mod inspect;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(name = "mageflow", version, about = "Event-sourced task orchestration")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the showcase: a chain whose middle step is a swarm of ~1000 tasks, with callbacks,
    /// a retried failure and a suspend + resume, on the embedded store.
    Demo {
        /// Store, as `embedded:PATH`. Default: a fresh temporary directory.
        #[arg(long, env = "MAGEFLOW_STORE")]
        store: Option<String>,
        /// Number of tasks in the swarm.
        #[arg(long, default_value_t = 1000)]
        items: u32,
        /// Plain log lines instead of progress bars.
        #[arg(long)]
        no_progress: bool,
    },
    /// Run performance scenarios; prints one `key=value` line per scenario.
    Bench {
        /// flat, chain, fanout, fanout-limited, cancel, or all (each in its own process).
        #[arg(long, default_value = "all")]
        scenario: String,
        /// Store, as `embedded:PATH`. Default: a fresh temporary directory per scenario.
        #[arg(long, env = "MAGEFLOW_STORE")]
        store: Option<String>,
        /// Override the scenario's task count.
        #[arg(long)]
        n: Option<u32>,
    },
    /// Print every event of a workflow: who did what, when.
    History {
        #[arg(long, env = "MAGEFLOW_STORE")]
        store: String,
        /// Workflow id (`wf_…`) or signature id (`sig_…`).
        id: String,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check the store: every event decodes, positions and stream sequences are dense.
    Verify {
        #[arg(long, env = "MAGEFLOW_STORE")]
        store: String,
    },
}

/// Parse `embedded:PATH`. (Tiered stores come with PostgreSQL and Redis support.)
pub fn embedded_path(store: &str) -> Result<PathBuf> {
    match store.split_once(':') {
        Some(("embedded", path)) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => bail!("unsupported store {store:?}: expected embedded:PATH"),
    }
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
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("MAGEFLOW_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
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
            Cmd::Bench { scenario, store, n } => bench::run(&scenario, store.as_deref(), n).await,
            Cmd::History { store, id, json } => inspect::history(&store, &id, json),
            Cmd::Verify { store } => inspect::verify(&store),
        }
    })
}
