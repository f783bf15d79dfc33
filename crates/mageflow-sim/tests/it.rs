//! The simulator in CI: a few hundred seeds must hold every invariant, and a seed must mean the
//! same plan (workload, faults) every time it runs.

use mageflow_sim::{run_many_with, run_with, Known, Plan, SimConfig};

/// Seeds CI runs (a few seconds in debug on a slow machine; see the crate README for longer
/// campaigns).
const CI_SEEDS: u64 = 200;
/// Seeds run twice to measure how exactly the observed run replays.
const FIDELITY_SEEDS: u64 = 20;

/// Every invariant, tolerating the known open engine bugs (BUGS.md; none is open now).
fn ci() -> SimConfig {
    SimConfig {
        tolerate: Known::OPEN.into_iter().collect(),
        ..SimConfig::default()
    }
}

#[test]
fn seeds_hold_every_invariant() {
    let summary = run_many_with(0..CI_SEEDS, &ci(), |_| {});
    // Shown with `--nocapture`: how often the known bugs still show up.
    println!("{summary}");
    assert!(summary.failures.is_empty(), "{summary}");
}

#[test]
fn a_seed_replays_its_plan_and_verdict() {
    for seed in [3, 17, 99] {
        let (a, b) = (run_with(seed, &ci()), run_with(seed, &ci()));
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.plan, b.plan, "seed {seed}");
                assert_eq!(a.plan, Plan::new(seed, &ci()));
            }
            (a, b) => panic!("seed {seed}: {:?} / {:?}", a.err(), b.err()),
        }
    }
}

/// How often a seed's observed run (not only its plan) comes out the same twice: printed, not
/// asserted (see the crate docs for why the engine's scheduling does not replay exactly).
#[test]
fn replay_fidelity_is_measured() {
    let (mut same, mut runs) = (0, 0);
    for seed in 0..FIDELITY_SEEDS {
        let (Ok(a), Ok(b)) = (run_with(seed, &ci()), run_with(seed, &ci())) else {
            continue;
        };
        runs += 1;
        if a.observed == b.observed {
            same += 1;
        } else if std::env::var_os("SIM_SHOW_DIFF").is_some() {
            println!("seed {seed}:\n  {:?}\n  {:?}", a.observed, b.observed);
        }
    }
    println!("{same} of {runs} seeds observed the same run twice");
    assert!(runs > 0);
}
