//! `mageflow cancel|interrupt|suspend|resume|delete|restore|rerun|signal|reject ID`: an
//! operator's command.
//! On an embedded store the command is carried out by an engine opened on the store for the
//! purpose (nothing else runs in it: no handlers, no resumes, no compaction); on PostgreSQL +
//! Redis it is relayed to the orchestrator (`mageflow serve`), which answers once it is durable.

use crate::tiers::{builtins, StoreArgs, Tiers};
use anyhow::{bail, Context, Result};
use mageflow::control::{self, ControlOp};
use mageflow::engine::AutoResume;
use mageflow::{Config, Engine};
use std::path::Path;
use std::time::Duration;

/// How long a relayed command is valid, and waited for (Redis keeps an answer 60 s): an
/// orchestrator that reads it later refuses it.
const ANSWER_WAIT: Duration = Duration::from_secs(50);

/// What every operator's command takes (`cancel` adds `--confirm`: [`CancelArgs`]).
#[derive(clap::Args)]
pub struct ControlArgs {
    /// Signature id (`sig_…`), or workflow id (`wf_…`) for its root signature.
    id: String,
    /// Recorded as the actor of the command (the audit trail's "who"); on a deployment with
    /// an access file, the operator whose token signs the command.
    #[arg(long, env = "USER", default_value = "cli")]
    principal: String,
    /// File holding the operator's token (or the token itself in MAGEFLOW_TOKEN): signs the
    /// command relayed to a PostgreSQL + Redis deployment.
    #[arg(long, env = "MAGEFLOW_TOKEN_FILE")]
    token_file: Option<std::path::PathBuf>,
    #[command(flatten)]
    tiers: StoreArgs,
}

/// `cancel`'s arguments: the others' and `--confirm`, which only a cancel needs (elsewhere the
/// flag would suggest a confirmation that nothing asks for).
#[derive(clap::Args)]
pub struct CancelArgs {
    #[command(flatten)]
    pub common: ControlArgs,
    /// Confirm that the signature, everything under it and their data are to be deleted for
    /// good (only the audit record stays; it cannot be resumed or rerun).
    #[arg(long)]
    pub confirm: bool,
}

/// `signal`'s arguments: the others' and the value it carries.
#[derive(clap::Args)]
pub struct SignalArgs {
    #[command(flatten)]
    pub common: ControlArgs,
    /// A JSON value: an object's fields are merged over the gate's input to make its result
    /// (e.g. '{"approved": true}'); any other value replaces it.
    #[arg(long, default_value = "{}")]
    pub value: String,
}

/// `reject`'s arguments: the others' and why.
#[derive(clap::Args)]
pub struct RejectArgs {
    #[command(flatten)]
    pub common: ControlArgs,
    /// Why the gate is rejected: its error, as history and its error callbacks show it.
    #[arg(long)]
    pub reason: String,
}

/// `priority`'s arguments: the others' and the new priority.
#[derive(clap::Args)]
pub struct PriorityArgs {
    #[command(flatten)]
    pub common: ControlArgs,
    /// `high`, `medium`, `low`, or a number from -1000 to 1000.
    #[arg(allow_hyphen_values = true)]
    pub level: String,
}

/// A priority level, parsed (a refusal names what is wrong before anything is sent).
pub fn parse_priority(text: &str) -> Result<serde_json::Value> {
    match mageflow::Priority::parse(text) {
        Some(p) => Ok(serde_json::Value::from(p)),
        None => bail!(
            "priority {text:?}: give high, medium, low or a number from {} to {}",
            mageflow::PRIORITY_MIN,
            mageflow::PRIORITY_MAX
        ),
    }
}

/// `--value` of `signal`, parsed (a refusal names what is wrong before anything is sent).
pub fn parse_signal(text: &str) -> Result<serde_json::Value> {
    serde_json::from_str(text).with_context(|| format!("--value is not JSON: {text:?}"))
}

/// Carry out `op`; `confirm` is `cancel`'s `--confirm` (false for every other command),
/// `value` what a `signal` carries or a `reject`'s reason.
pub async fn run(
    op: ControlOp,
    args: &ControlArgs,
    confirm: bool,
    value: Option<serde_json::Value>,
) -> Result<()> {
    let target = control::parse_target(&args.id)?;
    mageflow::auth::validate_principal(&args.principal)?;
    if op == ControlOp::Cancel && !confirm {
        bail!(
            "refusing to cancel {target} without --confirm: cancel stops it and everything \
             under it and deletes their task data for good (only the audit record of who \
             canceled what, and when, stays); a canceled signature cannot be resumed or rerun. \
             `mageflow interrupt` stops it and keeps it. Nothing was changed."
        );
    }
    let done = match args.tiers.resolve()? {
        Some(Tiers::Embedded(dir)) => {
            let engine = open_for_command(&dir, &args.principal, false).await?;
            let done = control::apply(&engine.handle(), op, target, confirm, value).await;
            engine.shutdown().await;
            done?
        }
        Some(Tiers::Cluster { .. }) => {
            let hot = connect_hot(&args.tiers, op).await?;
            let token = token(args.token_file.as_deref())?;
            mageflow::cluster::relay_control(
                &hot,
                &format!("operator:{}", args.principal),
                op,
                target,
                confirm,
                value,
                &args.principal,
                token.as_ref(),
                ANSWER_WAIT,
            )
            .await?
        }
        None => bail!("`mageflow {op}` needs --store embedded:PATH, or --postgres and --redis"),
    };
    println!("{done}");
    Ok(())
}

/// An engine on the existing embedded store at `dir` for one command of `principal`: with
/// `run`, it runs what it finds (workers, auto-resume) as `serve` would; without, nothing runs
/// in it (no handlers, no resumes) and no compaction either way.
pub async fn open_for_command(dir: &Path, principal: &str, run: bool) -> Result<Engine> {
    // The engine's open would create a store in any directory.
    crate::tiers::existing_store(dir)?;
    let config = Config {
        workers: if run { Config::default().workers } else { 0 },
        principal: principal.to_owned(),
        auto_resume: AutoResume {
            enabled: run,
            ..AutoResume::default()
        },
        compact_after: None,
        ..Config::default()
    };
    mageflow::open_embedded(dir, builtins(), config)
        .await
        .with_context(|| {
            format!(
                "cannot open the embedded store at {} (if `mageflow serve` runs on it, stop it \
                 first: an embedded store belongs to one process)",
                dir.display()
            )
        })
}

/// The deployment's hot tier, to relay `op` through.
pub async fn connect_hot(tiers: &StoreArgs, op: ControlOp) -> Result<mageflow::hot::Hot> {
    let c = tiers.cluster(op.name())?;
    mageflow::hot::Hot::connect(c.hot.clone())
        .await
        .with_context(|| {
            format!(
                "cannot reach Redis at {}",
                mageflow::store::mask_url(&c.hot.url)
            )
        })
}

/// The operator's token: from `--token-file`, else `MAGEFLOW_TOKEN`.
pub fn token(token_file: Option<&Path>) -> Result<Option<mageflow::auth::Secret>> {
    let text = match token_file {
        Some(path) => std::fs::read(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?,
        None => match std::env::var("MAGEFLOW_TOKEN") {
            Ok(t) => t.into_bytes(),
            Err(_) => return Ok(None),
        },
    };
    // An API token (`mageflow token create`) signs with its hash, which is what `serve
    // --tokens` knows of it; a token of an access file signs with itself.
    let trimmed = String::from_utf8_lossy(&text).trim().to_owned();
    let key = match trimmed.starts_with(mageflow_server::auth::TOKEN_PREFIX) {
        true => mageflow_server::auth::relay_key(&trimmed).into_bytes(),
        false => text,
    };
    mageflow::auth::Secret::new(key)
        .map(Some)
        .context("the operator token is not usable")
}
