//! The simulator in CI: a few hundred seeds must hold every invariant, and a seed must mean the
//! same plan (workload, faults) every time it runs.

use mageflow_sim::{run, run_many, Plan, SimConfig};

/// Seeds CI runs (a few seconds in debug on a slow machine; see the crate README for longer
/// campaigns).
const CI_SEEDS: u64 = 200;

#[test]
fn seeds_hold_every_invariant() {
    let summary = run_many(0..CI_SEEDS);
    assert!(summary.failures.is_empty(), "{summary}");
}

#[test]
fn a_seed_replays_its_plan_and_verdict() {
    for seed in [3, 17, 99] {
        let (a, b) = (run(seed), run(seed));
        match (a, b) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.plan, b.plan, "seed {seed}");
                assert_eq!(a.plan, Plan::new(seed, &SimConfig::default()));
            }
            (a, b) => panic!("seed {seed}: {:?} / {:?}", a.err(), b.err()),
        }
    }
}
