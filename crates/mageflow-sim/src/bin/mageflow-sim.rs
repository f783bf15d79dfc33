//! `mageflow-sim --seeds N [--from S] | --seed S [--verbose] [--no-faults]`: run the
//! deterministic simulator over seeds, print each failing seed as
//! `seed=S failed: <invariant>: <detail>` and a summary; exit 1 if any seed failed, 2 on bad
//! arguments. Until `mageflow simulate` exists in the CLI, this is how to run it by hand:
//! `cargo run -p mageflow-sim --bin mageflow-sim -- --seeds 10000` for a long campaign.

use mageflow_sim::{Known, SimConfig};
use std::process::ExitCode;

const USAGE: &str =
    "usage: mageflow-sim (--seeds N [--from S] | --seed S) [--verbose] [--no-faults]";

struct Args {
    seeds: std::ops::Range<u64>,
    verbose: bool,
    faults: bool,
    tolerate_known: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let (mut count, mut from, mut one) = (None, 0u64, None);
    let (mut verbose, mut faults, mut tolerate_known) = (false, true, false);
    let num = |v: Option<String>, flag: &str| -> Result<u64, String> {
        let v = v.ok_or(format!("{flag} needs a number"))?;
        v.parse()
            .map_err(|_| format!("{flag}: not a number: {v:?}"))
    };
    while let Some(a) = args.next() {
        match a.as_str() {
            "--seeds" => count = Some(num(args.next(), "--seeds")?),
            "--from" => from = num(args.next(), "--from")?,
            "--seed" => one = Some(num(args.next(), "--seed")?),
            "--verbose" | "-v" => verbose = true,
            "--no-faults" => faults = false,
            "--tolerate-known" => tolerate_known = true,
            "--help" | "-h" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let seeds = match (one, count) {
        (Some(s), None) => s..s.saturating_add(1),
        (None, Some(n)) => from..from.saturating_add(n),
        (None, None) => 0..100,
        (Some(_), Some(_)) => return Err("--seed and --seeds exclude each other".into()),
    };
    Ok(Args {
        seeds,
        verbose,
        faults,
        tolerate_known,
    })
}

fn main() -> ExitCode {
    // The engine's own log lines (refusals, retries) on stderr, with `MAGEFLOW_LOG=info` say.
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("MAGEFLOW_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .without_time()
            .init();
    }
    let args = match parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("mageflow-sim: {e}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let config = SimConfig {
        faults: args.faults,
        tolerate: if args.tolerate_known {
            Known::OPEN.into_iter().collect()
        } else {
            Default::default()
        },
        ..SimConfig::default()
    };
    let verbose = args.verbose;
    let summary = mageflow_sim::run_many_with(args.seeds, &config, |r| match r {
        Ok(report) if verbose => println!("{report}"),
        Ok(_) => {}
        Err(f) => {
            println!("{f}");
            if verbose {
                println!("{}", mageflow_sim::Plan::new(f.seed, &config));
                for line in &f.history {
                    println!("{line}");
                }
            }
        }
    });
    // The failures were printed as they came.
    println!("{}", summary.line());
    if summary.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        println!(
            "replay one with: cargo run -p mageflow-sim --bin mageflow-sim -- --seed {} --verbose",
            summary.failures[0].seed
        );
        ExitCode::FAILURE
    }
}
