//! `mageflow submit FILE.json`: a workflow in the declarative format (`docs/workflow.schema.json`)
//! created on an embedded store, its id printed. The tasks it names must be ones this binary
//! serves (its built-ins). Without `--wait` it is only made durable: `mageflow serve` on the
//! store runs it (an unfinished workflow is resumed when an engine opens the store); with
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
        Some(Tiers::Cluster { .. }) => bail!(
            "`mageflow submit` creates workflows on an embedded store only for now; on a \
             PostgreSQL + Redis deployment submit from Rust (`Handle::submit`) or a handler. \
             Nothing was submitted"
        ),
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
