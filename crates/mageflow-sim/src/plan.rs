//! What one seed means: the workload (workflows, their shapes and the operator's commands), the
//! timed faults (crashes, kills, hot-tier wipes) and the rates of the per-call faults (appends,
//! reports, heartbeats). A [`Plan`] is made from the seed alone, before anything runs, so it is
//! the part of a run that replays exactly (see the crate docs for the rest). It must not read
//! any clock or any state of the run.

use crate::rng::Rng;
use crate::Known;
use mageflow_core::WorkflowId;
use mageflow_engine::{chain, sign, swarm, Sig, TaskSig};
use serde_json::json;
use std::collections::BTreeSet;
use std::fmt;

/// Longest a handler works in one go (virtual ms): well under the lease, so a live worker
/// always renews in time.
const HANDLER_MS_MAX: u64 = 600;
/// Most workflows in one run.
pub const WORKFLOWS_MAX: u64 = 6;
/// Most workers in one run.
pub const WORKERS_MAX: u64 = 4;
/// Most items of a planned swarm, steps of a planned chain.
const MEMBERS_MAX: u64 = 5;
/// Submissions happen in the first part of the fault window (virtual ms).
const SUBMIT_WINDOW_MS: u64 = 6_000;
/// Largest clock skew of a worker against the hot tier (virtual ms, either way). Above the
/// lease: a worker this far behind lets its jobs reappear while it still runs them.
const SKEW_MS_MAX: u64 = 3_000;

/// Knobs of the simulator (the seed decides everything else).
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Inject faults at all (off: a plain run, for comparison).
    pub faults: bool,
    /// Virtual time during which timed faults happen and per-call faults are on (ms).
    pub fault_window_ms: u64,
    /// After the fault window, how long (virtual ms) every unpaused workflow has to finish.
    pub settle_ms: u64,
    /// Known open engine bugs whose findings do not fail a run (they are counted in
    /// `Observed::known`). Empty by default: the binary shows everything.
    pub tolerate: BTreeSet<Known>,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            faults: true,
            fault_window_ms: 12_000,
            settle_ms: 240_000,
            tolerate: BTreeSet::new(),
        }
    }
}

/// One seed's run, as planned.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub seed: u64,
    /// `Dispatch::Remote { window }`.
    pub window: usize,
    /// The engine's deletion window (its *wall* clock, see the crate docs): 0 or a few ms.
    pub deletion_ttl_ms: u64,
    pub workers: Vec<WorkerPlan>,
    pub workflows: Vec<WorkflowPlan>,
    /// Timed faults, by virtual time.
    pub faults: Vec<TimedFault>,
    pub rates: Rates,
    pub fault_window_ms: u64,
    pub settle_ms: u64,
    pub tolerate: BTreeSet<Known>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerPlan {
    pub concurrency: usize,
    /// This worker's clock against the hot tier's (ms; negative: behind). Its leases are
    /// computed on its clock, as a worker-side lease would be.
    pub skew_ms: i64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkflowPlan {
    pub id: WorkflowId,
    pub submit_at_ms: u64,
    pub shape: Shape,
    pub control: Control,
}

/// A signature tree, in a form that prints and compares (the engine's `Sig` does neither).
#[derive(Clone, Debug, PartialEq)]
pub enum Shape {
    Task(TaskPlan),
    Chain {
        steps: Vec<Shape>,
        callbacks: Callbacks,
    },
    Swarm {
        items: Vec<Shape>,
        max_concurrency: u32,
        stop_after_n_failures: Option<u32>,
        callbacks: Callbacks,
    },
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct Callbacks {
    pub on_success: Option<TaskPlan>,
    pub on_error: Option<TaskPlan>,
    pub on_cleanup: Option<TaskPlan>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TaskPlan {
    pub kind: TaskKind,
    /// Virtual ms of work (per step for `Steps`).
    pub ms: u64,
    /// Extra attempts after the first (backoff 0: see the crate docs on the engine's clock).
    pub retries: u32,
}

/// The simulator's test handlers (see `tasks.rs`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum TaskKind {
    /// Works `ms`, succeeds; returns an error if its token fires first.
    Ok,
    /// Fails retryably on its first `n` attempts, then succeeds.
    Flaky(u32),
    /// `n` steps of `ms`, a checkpoint after each; resumes from the last one.
    Steps(u32),
    /// Works `ms` ignoring its token (dropped after the grace period when revoked).
    Stubborn,
    /// Fails for good at once.
    Fatal,
}

/// What the simulated operator does with a workflow.
#[derive(Clone, Debug, PartialEq)]
pub enum Control {
    None,
    /// Suspend `node` at `at_ms` after the submit; resume it `resume_after_ms` later (`None`:
    /// never — the workflow is left paused and out of the liveness check).
    Suspend {
        node: u32,
        at_ms: u64,
        resume_after_ms: Option<u64>,
    },
    /// Interrupt, then resume (or not), as above.
    Interrupt {
        node: u32,
        at_ms: u64,
        resume_after_ms: Option<u64>,
    },
    /// Cancel `node` (confirmed) at `at_ms` after the submit.
    Cancel {
        node: u32,
        at_ms: u64,
    },
    /// Once the workflow finished: delete it, then rerun it `rerun_after_ms` later (racing the
    /// purge), or restore it instead.
    DeleteThen {
        rerun_after_ms: u64,
        restore: bool,
    },
    /// Once the workflow finished: rerun it.
    Rerun,
}

#[derive(Clone, Debug, PartialEq)]
pub struct TimedFault {
    pub at_ms: u64,
    pub fault: Fault,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Fault {
    /// The orchestrator process dies (`graceful`: it is shut down instead); a new one starts
    /// `down_ms` later on the same log.
    Crash { down_ms: u64, graceful: bool },
    /// Worker `worker`'s process dies; a new one starts `down_ms` later.
    KillWorker { worker: usize, down_ms: u64 },
    /// The hot tier loses everything (FLUSHALL): state, jobs, reports, answers.
    WipeHot,
}

/// Per-call fault rates (per mille), and the bounds of injected delays (virtual ms).
#[derive(Clone, Debug, PartialEq, Default)]
pub struct Rates {
    pub append_fail: u32,
    pub append_slow: u32,
    pub append_slow_ms_max: u64,
    pub report_lost: u32,
    pub report_duplicated: u32,
    pub report_delayed: u32,
    pub report_delay_ms_max: u64,
    pub heartbeat_error: u32,
}

impl Plan {
    /// The plan of `seed` under `config`: a pure function of both.
    pub fn new(seed: u64, config: &SimConfig) -> Plan {
        let mut rng = Rng::stream(seed, "plan", 0);
        let workers = (0..rng.range(1, WORKERS_MAX))
            .map(|_| WorkerPlan {
                concurrency: rng.range(1, 3) as usize,
                skew_ms: if config.faults && rng.chance(250) {
                    rng.range(0, 2 * SKEW_MS_MAX) as i64 - SKEW_MS_MAX as i64
                } else {
                    0
                },
            })
            .collect::<Vec<_>>();
        let workflows = (0..rng.range(1, WORKFLOWS_MAX))
            .map(|i| {
                let shape = shape(&mut rng, 0);
                WorkflowPlan {
                    // Ids from the seed (the engine's own are UUIDv7: clock and randomness).
                    id: WorkflowId::from_u128(
                        (u128::from(seed) << 64) | (u128::from(i) + 1) | (1 << 63),
                    ),
                    submit_at_ms: rng.below(SUBMIT_WINDOW_MS),
                    control: control(&mut rng, &shape),
                    shape,
                }
            })
            .collect();
        let window_ms = config.fault_window_ms.max(1);
        let mut faults = Vec::new();
        let mut rates = Rates::default();
        if config.faults {
            for _ in 0..rng.below(3) {
                faults.push(TimedFault {
                    at_ms: rng.below(window_ms),
                    fault: Fault::Crash {
                        down_ms: rng.range(0, 3_000),
                        graceful: rng.chance(300),
                    },
                });
            }
            for _ in 0..rng.below(4) {
                faults.push(TimedFault {
                    at_ms: rng.below(window_ms),
                    fault: Fault::KillWorker {
                        worker: rng.below(workers.len() as u64) as usize,
                        down_ms: rng.range(0, 4_000),
                    },
                });
            }
            for _ in 0..rng.below(3) {
                faults.push(TimedFault {
                    at_ms: rng.below(window_ms),
                    fault: Fault::WipeHot,
                });
            }
            faults.sort_by_key(|f| f.at_ms);
            let some = |rng: &mut Rng, max: u64| {
                if rng.chance(500) {
                    rng.range(0, max) as u32
                } else {
                    0
                }
            };
            rates = Rates {
                append_fail: some(&mut rng, 80),
                append_slow: some(&mut rng, 300),
                append_slow_ms_max: rng.range(1, 400),
                report_lost: some(&mut rng, 80),
                report_duplicated: some(&mut rng, 150),
                report_delayed: some(&mut rng, 200),
                report_delay_ms_max: rng.range(1, 3_000),
                heartbeat_error: some(&mut rng, 100),
            };
        }
        Plan {
            seed,
            window: rng.range(1, 12) as usize,
            deletion_ttl_ms: *rng.pick(&[0, 2]),
            workers,
            workflows,
            faults,
            rates,
            fault_window_ms: config.fault_window_ms,
            settle_ms: config.settle_ms,
            tolerate: config.tolerate.clone(),
        }
    }
}

fn task(rng: &mut Rng) -> TaskPlan {
    let kind = match rng.below(10) {
        0..=3 => TaskKind::Ok,
        4 | 5 => TaskKind::Flaky(rng.range(1, 3) as u32),
        6 | 7 => TaskKind::Steps(rng.range(2, 5) as u32),
        8 => TaskKind::Stubborn,
        _ => TaskKind::Fatal,
    };
    TaskPlan {
        kind,
        ms: rng.range(1, HANDLER_MS_MAX),
        retries: rng.range(0, 3) as u32,
    }
}

fn callbacks(rng: &mut Rng) -> Callbacks {
    let mut cb = |p| rng.chance(p).then(|| task(rng));
    Callbacks {
        on_success: cb(500),
        on_error: cb(500),
        on_cleanup: cb(200),
    }
}

fn shape(rng: &mut Rng, depth: u32) -> Shape {
    let leaf = depth >= 2 || rng.chance(if depth == 0 { 250 } else { 600 });
    if leaf {
        return Shape::Task(task(rng));
    }
    let members: Vec<Shape> = (0..rng.range(1, MEMBERS_MAX))
        .map(|_| shape(rng, depth + 1))
        .collect();
    if rng.chance(500) {
        Shape::Chain {
            steps: members,
            callbacks: callbacks(rng),
        }
    } else {
        Shape::Swarm {
            max_concurrency: rng.range(1, 4) as u32,
            stop_after_n_failures: rng.chance(300).then(|| rng.range(1, 2) as u32),
            items: members,
            callbacks: callbacks(rng),
        }
    }
}

fn control(rng: &mut Rng, shape: &Shape) -> Control {
    // Node 1 is the first member of a container (flattening puts the root first).
    let node = if matches!(shape, Shape::Task(_)) {
        0
    } else {
        rng.below(2) as u32
    };
    let at_ms = rng.range(0, 1_500);
    let resume_after_ms = (!rng.chance(150)).then(|| rng.range(0, 2_000));
    match rng.below(12) {
        0 | 1 => Control::Suspend {
            node,
            at_ms,
            resume_after_ms,
        },
        2 | 3 => Control::Interrupt {
            node,
            at_ms,
            resume_after_ms,
        },
        4 => Control::Cancel { node, at_ms },
        5 | 6 => Control::DeleteThen {
            rerun_after_ms: rng.range(0, 20),
            restore: rng.chance(250),
        },
        7 => Control::Rerun,
        _ => Control::None,
    }
}

impl TaskPlan {
    fn sig(&self) -> TaskSig {
        let (name, extra) = match self.kind {
            TaskKind::Ok => ("sim_ok", json!({})),
            TaskKind::Flaky(n) => ("sim_flaky", json!({ "fail_attempts": n })),
            TaskKind::Steps(n) => ("sim_steps", json!({ "steps": n })),
            TaskKind::Stubborn => ("sim_stubborn", json!({})),
            TaskKind::Fatal => ("sim_fatal", json!({})),
        };
        let mut kwargs = extra;
        kwargs["ms"] = json!(self.ms);
        sign(name).kwargs(kwargs).retries(self.retries, 0)
    }
}

impl Callbacks {
    fn apply<T>(&self, mut sig: T, on: impl Fn(T, Role, Sig) -> T) -> T {
        if let Some(t) = &self.on_success {
            sig = on(sig, Role::Success, t.sig().into());
        }
        if let Some(t) = &self.on_error {
            sig = on(sig, Role::Error, t.sig().into());
        }
        if let Some(t) = &self.on_cleanup {
            sig = on(sig, Role::Cleanup, t.sig().into());
        }
        sig
    }
}

#[derive(Clone, Copy)]
enum Role {
    Success,
    Error,
    Cleanup,
}

impl Shape {
    /// The signature tree to submit, built with the public builders.
    pub fn sig(&self) -> Sig {
        match self {
            Shape::Task(t) => t.sig().into(),
            Shape::Chain { steps, callbacks } => {
                let c = chain(steps.iter().map(Shape::sig));
                callbacks
                    .apply(c, |c, role, cb| match role {
                        Role::Success => c.on_success(cb),
                        Role::Error => c.on_error(cb),
                        Role::Cleanup => c.on_cleanup(cb),
                    })
                    .into()
            }
            Shape::Swarm {
                items,
                max_concurrency,
                stop_after_n_failures,
                callbacks,
            } => {
                let mut s = swarm(items.iter().map(Shape::sig)).max_concurrency(*max_concurrency);
                if let Some(n) = stop_after_n_failures {
                    s = s.stop_after_n_failures(*n);
                }
                callbacks
                    .apply(s, |s, role, cb| match role {
                        Role::Success => s.on_success(cb),
                        Role::Error => s.on_error(cb),
                        Role::Cleanup => s.on_cleanup(cb),
                    })
                    .into()
            }
        }
    }
}

impl fmt::Display for Shape {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Shape::Task(t) => write!(f, "{:?}", t.kind),
            Shape::Chain { steps, .. } => {
                write!(f, "chain[")?;
                for (i, s) in steps.iter().enumerate() {
                    write!(f, "{}{s}", if i > 0 { ", " } else { "" })?;
                }
                write!(f, "]")
            }
            Shape::Swarm { items, .. } => {
                write!(f, "swarm[")?;
                for (i, s) in items.iter().enumerate() {
                    write!(f, "{}{s}", if i > 0 { ", " } else { "" })?;
                }
                write!(f, "]")
            }
        }
    }
}

impl fmt::Display for Plan {
    /// The schedule in a few lines: what a failing seed's reader needs to know.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "seed {} window {} deletion_ttl {} ms, {} workers (skew ms {:?})",
            self.seed,
            self.window,
            self.deletion_ttl_ms,
            self.workers.len(),
            self.workers.iter().map(|w| w.skew_ms).collect::<Vec<_>>()
        )?;
        for w in &self.workflows {
            writeln!(
                f,
                "  {} at {} ms: {} control {:?}",
                w.id, w.submit_at_ms, w.shape, w.control
            )?;
        }
        for t in &self.faults {
            writeln!(f, "  fault at {} ms: {:?}", t.at_ms, t.fault)?;
        }
        write!(f, "  rates {:?}", self.rates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_makes_the_same_plan() {
        let c = SimConfig::default();
        for seed in 0..50 {
            assert_eq!(Plan::new(seed, &c), Plan::new(seed, &c));
        }
        assert_ne!(Plan::new(1, &c), Plan::new(2, &c));
    }
}
