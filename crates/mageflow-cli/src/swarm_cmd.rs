//! `mageflow swarm add SWARM_ID --file ITEMS.jsonl`: a bulk add to an open swarm on an embedded
//! store — one signature per line in the declarative format (`{"task": {"task": "noop"}}`,
//! see `docs/workflow.schema.json`), every line read and validated before anything is written,
//! all of them added in one atomic append (`Handle::add_many`), with a progress bar and a
//! report. `--partial` adds the good lines and lists the bad ones; `--run` starts the items at
//! once (a swarm not started yet, the root of a created workflow, is run with `--input`).

use crate::tiers::{StoreArgs, Tiers};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use mageflow::{BulkOptions, BulkPhase, BulkRejection, SignatureId};
use std::io::BufRead;
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum SwarmCmd {
    /// Add the signatures of a JSON Lines file to an open swarm, all or none (or, with
    /// --partial, the valid ones).
    Add(AddArgs),
}

#[derive(clap::Args)]
pub struct AddArgs {
    /// The swarm's signature id (`sig_…`; a workflow id names its root).
    id: String,
    /// One signature per line, in the declarative format (`-` reads standard input).
    #[arg(long)]
    file: PathBuf,
    /// Add the valid lines and report the bad ones, instead of refusing the whole file.
    #[arg(long)]
    partial: bool,
    /// Start the items at once: a swarm not started yet (a created workflow's root) runs with
    /// --input.
    #[arg(long)]
    run: bool,
    /// With --run on a swarm not started: its input (JSON).
    #[arg(long, default_value = "{}")]
    input: String,
    /// Close the swarm with the last item.
    #[arg(long)]
    close: bool,
    /// Validate every line and report, add nothing.
    #[arg(long)]
    dry_run: bool,
    /// Items per event (all events of the file are still one atomic append).
    #[arg(long, default_value_t = mageflow::engine::SWARM_ITEMS_PER_EVENT)]
    batch_size: usize,
    /// Plain output instead of a progress bar.
    #[arg(long)]
    no_progress: bool,
    /// Recorded as the actor of the additions.
    #[arg(long, env = "USER", default_value = "cli")]
    principal: String,
    #[command(flatten)]
    tiers: StoreArgs,
}

pub async fn run(cmd: &SwarmCmd) -> Result<()> {
    match cmd {
        SwarmCmd::Add(args) => add(args).await,
    }
}

/// The file's lines as signatures, and the lines that are not one (by line index, from 0).
fn read_items(args: &AddArgs) -> Result<(Vec<mageflow::Sig>, Vec<usize>, Vec<BulkRejection>)> {
    let reader: Box<dyn BufRead> = if args.file.as_os_str() == "-" {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let f = std::fs::File::open(&args.file)
            .with_context(|| format!("cannot read {}", args.file.display()))?;
        Box::new(std::io::BufReader::new(f))
    };
    let (mut items, mut lines, mut bad) = (Vec::new(), Vec::new(), Vec::new());
    for (index, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("cannot read line {}", index + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        match mageflow::definition::parse_node(line.as_bytes()) {
            Ok(sig) => {
                items.push(sig);
                lines.push(index);
            }
            Err(e) => bad.push(BulkRejection {
                index,
                code: e.code(),
                message: e.to_string(),
            }),
        }
    }
    Ok((items, lines, bad))
}

fn print_rejections(rejected: &[BulkRejection]) {
    for r in rejected {
        eprintln!("  line {}: {}: {}", r.index + 1, r.code, r.message);
    }
}

async fn add(args: &AddArgs) -> Result<()> {
    mageflow::auth::validate_principal(&args.principal)?;
    let target = mageflow::control::parse_target(&args.id)?;
    let input: serde_json::Value = serde_json::from_str(&args.input)
        .with_context(|| format!("--input is not JSON: {:?}", args.input))?;
    // Read the whole file first; with lines that are not signatures (and no --partial),
    // the rest is only validated, so the refusal lists every bad line.
    let (items, lines, mut bad) = read_items(args)?;
    let dry_run = args.dry_run || (!bad.is_empty() && !args.partial);
    let dir = match args.tiers.resolve()? {
        Some(Tiers::Embedded(dir)) => dir,
        Some(Tiers::Cluster { .. }) => bail!(
            "`mageflow swarm add` writes to an embedded store; on PostgreSQL + Redis add items \
             with the library (`Handle::add_many`)"
        ),
        None => bail!("`mageflow swarm add` needs --store embedded:PATH"),
    };
    let engine = crate::control_cmd::open_for_command(&dir, &args.principal, false).await?;
    let h = engine.handle();
    let total = items.len() as u64;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:40}] {pos}/{len}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    if args.no_progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let options = BulkOptions {
        partial: args.partial,
        batch_size: args.batch_size,
        close: args.close,
        dry_run,
    };
    let progress = |p: mageflow::BulkProgress| {
        bar.set_prefix(match p.phase {
            BulkPhase::Validating => "validating",
            BulkPhase::Written => "written",
        });
        bar.set_position(p.done as u64);
    };
    let swarm: SignatureId = target;
    let report = if args.run {
        h.add_and_run(swarm, items, input, &options, progress).await
    } else {
        h.add_many(swarm, items, &options, progress).await
    };
    bar.finish_and_clear();
    engine.shutdown().await;
    let report = match report {
        Ok(r) => r,
        Err(mageflow::Error::BulkRejected(rejected)) => {
            let rejected: Vec<BulkRejection> = rejected
                .into_iter()
                .map(|r| BulkRejection {
                    index: lines[r.index],
                    ..r
                })
                .collect();
            print_rejections(&rejected);
            bail!("{} lines were refused; nothing was added", rejected.len());
        }
        Err(e) => return Err(e).context("nothing was added"),
    };
    bad.extend(report.rejected.iter().map(|r| BulkRejection {
        index: lines[r.index],
        ..r.clone()
    }));
    bad.sort_by_key(|r| r.index);
    if dry_run {
        print_rejections(&bad);
        if args.dry_run {
            println!(
                "dry run: {} lines would be added, {} are refused; nothing was added",
                lines.len() - report.rejected.len(),
                bad.len()
            );
            return Ok(());
        }
        bail!(
            "{} lines were refused; nothing was added (--partial adds the others)",
            bad.len()
        );
    }
    println!(
        "added {} items to {swarm} in {} events ({} bytes) in {:.3} s{}",
        report.added,
        report.batches,
        report.bytes,
        report.seconds,
        if report.started {
            "; the swarm runs"
        } else {
            ""
        }
    );
    if !bad.is_empty() {
        println!("refused {} lines:", bad.len());
        for r in &bad {
            println!("  line {}: {}: {}", r.index + 1, r.code, r.message);
        }
    }
    Ok(())
}
