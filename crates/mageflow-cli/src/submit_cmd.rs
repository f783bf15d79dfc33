//! `mageflow submit FILE.json`: a workflow in the declarative format (`docs/workflow.schema.json`)
//! created, its id printed. On PostgreSQL + Redis it is relayed to the orchestrator as a signed
//! operator command (`submit`), validated against the orchestrator's registry and made durable
//! there. On an embedded store the tasks it names must be ones this binary serves (its
//! built-ins); without `--wait` it is only made durable: `mageflow serve` on the store runs it (an unfinished workflow is resumed when an engine opens the store); with
//! `--wait` this process runs it until it ends or waits for a user (a gate's signal, a
//! resume), and prints where it stands.

use crate::tiers::{StoreArgs, Tiers};
use anyhow::{bail, Context, Result};
use mageflow::Status;
use std::path::PathBuf;
use std::time::Duration;

/// Longest `--wait`.
const WAIT_MAX: Duration = Duration::from_secs(24 * 3600);

#[derive(clap::Args)]
pub struct SubmitArgs {
    /// The workflow definition (JSON; `-` reads standard input).
    file: PathBuf,
    /// Run it here until it ends or waits for a user (a gate's signal), and print its status,
    /// its result and the gates that wait (exit 1 if it failed or was stopped).
    #[arg(long)]
    wait: bool,
    /// Recorded as the actor of the submission.
    #[arg(long, env = "USER", default_value = "cli")]
    principal: String,
    /// On PostgreSQL + Redis: the file holding the operator's token (or MAGEFLOW_TOKEN).
    #[arg(long, env = "MAGEFLOW_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    #[command(flatten)]
    tiers: StoreArgs,
}

pub async fn run(args: &SubmitArgs) -> Result<()> {
    mageflow::auth::validate_principal(&args.principal)?;
    let bytes = if args.file.as_os_str() == "-" {
        let mut buf = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut buf)
            .context("cannot read the definition from standard input")?;
        buf
    } else {
        std::fs::read(&args.file).with_context(|| format!("cannot read {}", args.file.display()))?
    };
    // Read before anything is opened: a bad document changes nothing anywhere.
    let (sig, input) = mageflow::definition::parse(&bytes)
        .with_context(|| format!("{} was not submitted", args.file.display()))?;
    let dir = match args.tiers.resolve()? {
        Some(Tiers::Embedded(dir)) => dir,
        Some(Tiers::Cluster { .. }) => {
            if args.wait {
                bail!("--wait runs the workflow here, on an embedded store; nothing was submitted");
            }
            return relay(args, &bytes).await;
        }
        None => bail!("`mageflow submit` needs --store embedded:PATH"),
    };
    let engine = crate::control_cmd::open_for_command(&dir, &args.principal, args.wait).await?;
    let h = engine.handle();
    let submitted = h.submit(sig, input).await;
    let wf = match submitted {
        Ok(wf) => wf,
        Err(e) => {
            engine.shutdown().await;
            return Err(e).context("the workflow was refused; nothing was submitted");
        }
    };
    println!("{wf}");
    if !args.wait {
        engine.shutdown().await;
        return Ok(());
    }
    let state = h.wait_for(wf, mageflow::Until::Settled, WAIT_MAX).await;
    engine.shutdown().await;
    let state = state?;
    let root = &state.nodes[0];
    match &root.outcome {
        Some(mageflow::Outcome::Ok(v)) => println!("{wf} {} result {v}", root.status),
        Some(mageflow::Outcome::Err(e)) => println!("{wf} {} error {}", root.status, e.message),
        None => println!("{wf} {}", root.status),
    }
    for (i, n) in state.nodes.iter().enumerate() {
        if n.spec.kind == mageflow::KindSpec::Gate && n.status == Status::Running {
            println!(
                "waiting: gate {} ({}): `mageflow signal {} --value '{{...}}'` or `mageflow reject`",
                state.sig(i as u32),
                n.spec.name,
                state.sig(i as u32)
            );
        }
    }
    if matches!(
        root.status,
        Status::Failed | Status::Canceled | Status::Interrupted
    ) {
        bail!("{wf} ended {}", root.status);
    }
    Ok(())
}

/// How long a relayed submit is valid, and waited for.
const RELAY_WAIT: Duration = Duration::from_secs(50);

/// Relay the definition to the deployment's orchestrator under a fresh workflow id.
async fn relay(args: &SubmitArgs, bytes: &[u8]) -> Result<()> {
    let document: serde_json::Value = serde_json::from_slice(bytes)?;
    let op = mageflow::control::ControlOp::Submit;
    let hot = crate::control_cmd::connect_hot(&args.tiers, op).await?;
    let wf = mageflow::WorkflowId(uuid::Uuid::now_v7());
    let token = crate::control_cmd::token(args.token_file.as_deref())?;
    mageflow::cluster::relay_control(
        &hot,
        &format!("operator:{}", args.principal),
        op,
        mageflow::SignatureId::root(wf),
        false,
        Some(document),
        &args.principal,
        token.as_ref(),
        RELAY_WAIT,
    )
    .await
    .context("the workflow was not submitted")?;
    println!("{wf}");
    Ok(())
}
