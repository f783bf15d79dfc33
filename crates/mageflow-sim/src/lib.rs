//! Mageflow's deterministic simulator: the orchestrator ([`mageflow_engine::Engine`] with
//! `Dispatch::Remote`), the durable log, a hot tier and worker processes (the engine's own
//! `worker::run_worker`) run in one process, as tasks of one current-thread tokio runtime on
//! paused (virtual) time, while a seeded plan injects faults:
//!
//! - the orchestrator crashes (its unwritten appends are lost) or is shut down, and a new one
//!   starts on the same log (recovery);
//! - a worker process is killed, and started again later;
//! - the hot tier is wiped (FLUSHALL: jobs, reports, answers), and the projector rebuilds it;
//! - an append fails (storage error, nothing written) or is slow;
//! - a worker's report is lost (its job comes back after the lease), duplicated or delayed;
//!   a lease renewal errors;
//! - a worker's clock is skewed against the hot tier's (leases computed on it).
//!
//! A simulated operator submits a few workflows (tasks, chains, swarms, with success, error and
//! cleanup callbacks and retries; handlers that succeed, fail retryably, checkpoint in steps,
//! ignore their token, or fail for good) and suspends, resumes, interrupts, cancels, deletes,
//! restores and reruns them. When the fault window ends every fault stops, the system gets
//! time to settle, and the invariants of `docs/ARCHITECTURE.md` and `DESIGN.md` are checked
//! against the log ([`Invariant`]).
//!
//! ```no_run
//! // One seed: Ok(report) or the invariant that failed, with the seed in it.
//! match mageflow_sim::run(42) {
//!     Ok(report) => println!("{report}"),
//!     Err(failure) => eprintln!("{failure}"), // seed=42 failed: <invariant>: <detail>
//! }
//! // Many: every failure, and how long it took.
//! let summary = mageflow_sim::run_many(0..200);
//! assert!(summary.failures.is_empty(), "{summary}");
//! ```
//!
//! From a shell: `mageflow simulate --seeds 1000` or `mageflow simulate --seed 42 --verbose`.
//!
//! # What replays
//!
//! Everything. All of the simulator's randomness comes from the seed ([`rng`]): the
//! [`plan::Plan`] — the workload, the operator's script, the timed faults, the fault rates, the
//! workers' skews — is a pure function of the seed, and so is the fault of the k-th append, the
//! k-th report and the k-th lease renewal; every workflow id comes from the seed too. The engine's
//! own interleaving replays as well, because nothing in it draws on a source outside the run:
//! (1) it reads time only through `Config::clock`, which the simulator sets to virtual time from
//! a fixed epoch (event timestamps, retry timers, deletion windows); (2) its hash maps use a
//! fixed-key hasher, so their iteration order depends only on what was inserted; (3) every
//! `tokio::select!` in the engine, the worker runtime and the simulator is `biased` (tokio's
//! own RNG for unbiased selects can be seeded only with `--cfg tokio_unstable`). On one
//! current-thread runtime on paused time, two runs of a seed write the same log, event for
//! event, timestamps included ([`Observed::log_digest`]); the crate's tests check it on 40 seeds
//! (400 checked when this was built). Anything that would run on another thread — compaction,
//! redaction — is off in the simulator.

pub mod check;
pub mod hot;
pub mod log;
pub mod plan;
pub mod rng;
pub mod tasks;
pub mod trace;
mod world;

use std::fmt;
use std::time::{Duration, Instant};

pub use plan::{Plan, SimConfig};

/// The invariant a run broke (`docs/ARCHITECTURE.md`, `DESIGN.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Invariant {
    /// State = fold(apply, events): every stream folds, and to the engine's state.
    StateIsFold,
    /// A task's success is recorded once (per run of its workflow).
    SuccessOnce,
    /// A callback (any signature) is triggered once per run of its workflow.
    CallbacksOnce,
    /// Every acknowledged append and answered call is in the log.
    AckedNotLost,
    /// Of a purge and a rerun of one deletion, exactly one wins.
    PurgeOrRerun,
    /// Every workflow not left paused finishes once faults stop.
    Liveness,
    /// A handler stopped by the system (job gone, lease lost) never fails its task.
    StoppedNeverFails,
    /// What the hot tier holds is a projection of the log.
    HotIsProjection,
    /// The simulator itself could not run (a runtime could not be built).
    Setup,
}

impl Invariant {
    pub fn name(self) -> &'static str {
        match self {
            Invariant::StateIsFold => "state-is-fold",
            Invariant::SuccessOnce => "success-once",
            Invariant::CallbacksOnce => "callbacks-once",
            Invariant::AckedNotLost => "acked-not-lost",
            Invariant::PurgeOrRerun => "purge-or-rerun",
            Invariant::Liveness => "liveness",
            Invariant::StoppedNeverFails => "stopped-never-fails",
            Invariant::HotIsProjection => "hot-is-projection",
            Invariant::Setup => "setup",
        }
    }
}

impl fmt::Display for Invariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Engine bugs the simulator found (see the crate's `BUGS.md`), each matched narrowly by the
/// checks, so a failure that looks like one of them says so (`[known: …]`). A [`SimConfig`] can
/// tolerate them, for a time when one is open; all three are fixed, so [`Known::OPEN`] is
/// empty and CI tolerates nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Known {
    /// BUGS.md #1 (issue 12): a worker whose job vanished (hot-tier wipe) cancelled its handler
    /// and reported the handler's error as the attempt's failure.
    StoppedHandlerFails,
    /// BUGS.md #2: a checkpoint of an attempt that already ended was dropped by `decide` and
    /// answered `Ok`, so the worker was told it was durable.
    StaleCheckpointAcked,
    /// BUGS.md #3: a task whose `started` event was in a failed append was never started again
    /// unless something else touched its workflow.
    StartLostAfterFailedAppend,
}

impl Known {
    /// The known bugs still open (what CI tolerates): none.
    pub const OPEN: [Known; 0] = [];

    pub fn name(self) -> &'static str {
        match self {
            Known::StoppedHandlerFails => "stopped-handler-fails",
            Known::StaleCheckpointAcked => "stale-checkpoint-acked",
            Known::StartLostAfterFailedAppend => "start-lost-after-failed-append",
        }
    }
}

/// A run that broke an invariant. Its `Display` is the line the CLI prints.
#[derive(Clone, Debug, thiserror::Error)]
#[error("seed={seed} failed: {invariant}: {detail}")]
pub struct Failure {
    pub seed: u64,
    pub invariant: Invariant,
    pub detail: String,
    /// The events of the workflow the failure is about, one line each (for `--verbose`).
    pub history: Vec<String>,
}

impl Failure {
    pub(crate) fn new(seed: u64, invariant: Invariant, detail: String) -> Self {
        Self {
            seed,
            invariant,
            detail,
            history: Vec::new(),
        }
    }
}

/// What a run did (counts that depend on scheduling: see the crate docs).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Observed {
    pub virtual_ms: u64,
    pub events: u64,
    pub crashes: u64,
    pub shutdowns: u64,
    pub failed_starts: u64,
    pub worker_kills: u64,
    pub hot_wipes: u64,
    pub hot_rebuilds: u64,
    pub appends: u64,
    pub appends_failed: u64,
    pub appends_slowed: u64,
    pub appends_fenced: u64,
    pub jobs_claimed: u64,
    pub reports: u64,
    pub reports_lost: u64,
    pub reports_duplicated: u64,
    pub reports_delayed: u64,
    pub heartbeat_errors: u64,
    pub reruns: u64,
    pub purges: u64,
    pub paused: u64,
    /// Final root status of each planned workflow, in plan order.
    pub outcome: Vec<String>,
    /// Findings of known open bugs this run tolerated.
    pub known: Vec<(Known, String)>,
    /// A digest (FNV-1a) of the whole durable log, every event in position order with its
    /// timestamp, actor and payload: two runs with the same digest wrote the same history.
    pub log_digest: u64,
}

impl Observed {
    fn fill(&mut self, durable: &log::Durable, hot: &hot::Hot, failed_starts: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let (l, h) = (&durable.stats, &hot.stats);
        self.failed_starts = failed_starts;
        self.hot_wipes = h.wipes.load(Relaxed);
        self.hot_rebuilds = h.rebuilds.load(Relaxed);
        self.appends = l.appends.load(Relaxed);
        self.appends_failed = l.failed.load(Relaxed);
        self.appends_slowed = l.slowed.load(Relaxed);
        self.appends_fenced = l.fenced.load(Relaxed);
        self.jobs_claimed = h.claimed.load(Relaxed);
        self.reports = h.reports.load(Relaxed);
        self.reports_lost = h.reports_lost.load(Relaxed);
        self.reports_duplicated = h.reports_duplicated.load(Relaxed);
        self.reports_delayed = h.reports_delayed.load(Relaxed);
        self.heartbeat_errors = h.heartbeat_errors.load(Relaxed);
        self.log_digest = log_digest(&durable.log);
    }
}

/// Most events read from the log per call while digesting it.
const DIGEST_CHUNK_EVENTS: usize = 4096;

fn log_digest(log: &dyn mageflow_store::EventLog) -> u64 {
    const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = FNV_OFFSET;
    let mut from = 1;
    while let Ok(chunk) = log.read_all(from, DIGEST_CHUNK_EVENTS) {
        let Some(last) = chunk.last() else { break };
        from = last.position + 1;
        for r in &chunk {
            let text = format!("{} {:?}", r.position, r.event);
            for b in text.bytes() {
                hash = (hash ^ u64::from(b)).wrapping_mul(FNV_PRIME);
            }
        }
    }
    hash
}

/// A run that held every invariant.
#[derive(Clone, Debug)]
pub struct Report {
    pub seed: u64,
    /// Exactly what the seed means (replays exactly).
    pub plan: Plan,
    pub observed: Observed,
    /// Real time the run took.
    pub elapsed: Duration,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.observed;
        writeln!(f, "{}", self.plan)?;
        write!(
            f,
            "  ok in {:?} ({} virtual ms): {} events; {} crashes, {} shutdowns, {} failed starts, \
             {} worker kills, {} wipes ({} rebuilds); appends {} ({} failed, {} slow, {} lost in \
             crashes); reports {} ({} lost, {} duplicated, {} delayed); {} heartbeat errors; {} \
             reruns, {} purges, {} left paused; outcome {:?}",
            self.elapsed,
            o.virtual_ms,
            o.events,
            o.crashes,
            o.shutdowns,
            o.failed_starts,
            o.worker_kills,
            o.hot_wipes,
            o.hot_rebuilds,
            o.appends,
            o.appends_failed,
            o.appends_slowed,
            o.appends_fenced,
            o.reports,
            o.reports_lost,
            o.reports_duplicated,
            o.reports_delayed,
            o.heartbeat_errors,
            o.reruns,
            o.purges,
            o.paused,
            o.outcome
        )
    }
}

/// Run one seed with the default settings.
pub fn run(seed: u64) -> Result<Report, Failure> {
    run_with(seed, &SimConfig::default())
}

/// Run one seed: its own current-thread runtime, on paused time, so the run is single-threaded
/// and its clock virtual.
pub fn run_with(seed: u64, config: &SimConfig) -> Result<Report, Failure> {
    let started = Instant::now();
    let plan = Plan::new(seed, config);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| Failure::new(seed, Invariant::Setup, format!("no runtime: {e}")))?;
    let observed = runtime.block_on(world::run(plan.clone()))?;
    Ok(Report {
        seed,
        plan,
        observed,
        elapsed: started.elapsed(),
    })
}

/// What [`run_many`] found.
#[derive(Debug, Default)]
pub struct Summary {
    pub runs: u64,
    pub failures: Vec<Failure>,
    /// Seeds that met each tolerated known bug (with the first such seed).
    pub known: std::collections::BTreeMap<Known, (u64, u64)>,
    pub elapsed: Duration,
}

impl Summary {
    /// The last line: counts, time, and the known bugs met.
    pub fn line(&self) -> String {
        let mut line = format!(
            "{} seeds, {} failed, in {:.1} s",
            self.runs,
            self.failures.len(),
            self.elapsed.as_secs_f64()
        );
        for (bug, (n, first)) in &self.known {
            line += &format!(
                "; known bug {} tolerated in {n} seeds (first: {first})",
                bug.name()
            );
        }
        line
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for fail in &self.failures {
            writeln!(f, "{fail}")?;
        }
        f.write_str(&self.line())
    }
}

/// Run every seed (default settings); collect the failures.
pub fn run_many(seeds: impl IntoIterator<Item = u64>) -> Summary {
    run_many_with(seeds, &SimConfig::default(), |_| {})
}

/// Run `seeds` under `config` as `mageflow simulate` does: print each failing seed as its
/// [`Failure`] line as it comes (with `verbose`, every report, and a failure's plan and
/// events), then the summary and, if any failed, how to replay the first. Returns whether every
/// seed held every invariant.
pub fn run_and_print(seeds: std::ops::Range<u64>, config: &SimConfig, verbose: bool) -> bool {
    let summary = run_many_with(seeds, config, |r| match r {
        Ok(report) if verbose => println!("{report}"),
        Ok(_) => {}
        Err(f) => {
            println!("{f}");
            if verbose {
                println!("{}", Plan::new(f.seed, config));
                for line in &f.history {
                    println!("{line}");
                }
            }
        }
    });
    println!("{}", summary.line());
    match summary.failures.first() {
        None => true,
        Some(f) => {
            println!(
                "replay one with: mageflow simulate --seed {} --verbose",
                f.seed
            );
            false
        }
    }
}

/// Run every seed under `config`, calling `each` after every run.
pub fn run_many_with(
    seeds: impl IntoIterator<Item = u64>,
    config: &SimConfig,
    mut each: impl FnMut(&Result<Report, Failure>),
) -> Summary {
    let started = Instant::now();
    let mut summary = Summary::default();
    for seed in seeds {
        let result = run_with(seed, config);
        each(&result);
        summary.runs += 1;
        match result {
            Err(f) => summary.failures.push(f),
            Ok(r) => {
                let bugs: std::collections::BTreeSet<Known> =
                    r.observed.known.iter().map(|(b, _)| *b).collect();
                for b in bugs {
                    summary.known.entry(b).or_insert((0, seed)).0 += 1;
                }
            }
        }
    }
    summary.elapsed = started.elapsed();
    summary
}
