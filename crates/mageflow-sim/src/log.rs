//! The log under fault: [`Durable`] is the durable truth (a `MemoryLog`) that outlives every
//! orchestrator, and [`LogView`] is one orchestrator process's connection to it, which injects
//! the per-call faults of the plan: slow appends (a virtual-time delay before the write) and
//! failing ones (a storage error; nothing written). Crashing the process fences its view: an
//! append not yet written when the process died is lost, as it would be with kill -9, and was
//! never acknowledged.
//!
//! The fault of the k-th append of a run is drawn from its own stream of the seed (`append`,
//! k), so it does not depend on anything else the run did.

use crate::plan::Rates;
use crate::rng::Rng;
use crate::trace::Trace;
use mageflow_core::{Event, WorkflowId};
use mageflow_store::{AppendRequest, BoxFuture, Error, EventLog, MemoryLog, Recorded, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;

/// An append the log acknowledged: these events must be in the log at the end.
#[derive(Clone, Debug)]
pub struct Acked {
    pub stream: WorkflowId,
    pub events: Vec<Event>,
}

/// Counters of what the log's faults did.
#[derive(Debug, Default)]
pub struct LogStats {
    pub appends: AtomicU64,
    pub failed: AtomicU64,
    pub slowed: AtomicU64,
    pub fenced: AtomicU64,
}

/// The durable log shared by every orchestrator incarnation.
pub struct Durable {
    pub log: MemoryLog,
    seed: u64,
    rates: Rates,
    calls: AtomicU64,
    faults_on: AtomicBool,
    acked: Mutex<Vec<Acked>>,
    pub stats: LogStats,
    pub trace: Arc<Trace>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain pushes and reads: a panic elsewhere cannot leave the data half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Durable {
    pub fn new(seed: u64, rates: Rates, trace: Arc<Trace>) -> Arc<Self> {
        Arc::new(Self {
            trace,
            log: MemoryLog::new(),
            seed,
            rates,
            calls: AtomicU64::new(0),
            faults_on: AtomicBool::new(true),
            acked: Mutex::default(),
            stats: LogStats::default(),
        })
    }

    /// End of the fault window: appends go through untouched from now on.
    pub fn stop_faults(&self) {
        self.faults_on.store(false, Ordering::SeqCst);
    }

    pub fn acked(&self) -> Vec<Acked> {
        lock(&self.acked).clone()
    }
}

enum Fault {
    None,
    Slow(Duration),
    Fail,
}

/// One orchestrator process's handle on the durable log.
pub struct LogView {
    durable: Arc<Durable>,
    fenced: Arc<AtomicBool>,
    /// Completion of the previous append: appends complete in call order (the `EventLog`
    /// contract), also when one of them is slowed down.
    previous: Mutex<Option<oneshot::Receiver<()>>>,
}

impl LogView {
    pub fn new(durable: Arc<Durable>) -> Arc<Self> {
        Arc::new(Self {
            durable,
            fenced: Arc::new(AtomicBool::new(false)),
            previous: Mutex::new(None),
        })
    }

    /// The process died: nothing of it reaches the log any more.
    pub fn fence(&self) {
        self.fenced.store(true, Ordering::SeqCst);
    }

    fn fault(&self) -> Fault {
        let d = &self.durable;
        let k = d.calls.fetch_add(1, Ordering::Relaxed);
        if !d.faults_on.load(Ordering::SeqCst) {
            return Fault::None;
        }
        let mut rng = Rng::stream(d.seed, "append", k);
        if rng.chance(d.rates.append_fail) {
            Fault::Fail
        } else if rng.chance(d.rates.append_slow) {
            Fault::Slow(Duration::from_millis(
                rng.range(1, d.rates.append_slow_ms_max),
            ))
        } else {
            Fault::None
        }
    }
}

impl EventLog for LogView {
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'static, Result<Vec<u64>>> {
        let fault = self.fault();
        let (done, next) = oneshot::channel();
        let previous = lock(&self.previous).replace(next);
        let durable = self.durable.clone();
        // Checked at the write, not at the call: an append slowed past a crash is lost.
        let fence = self.fenced.clone();
        Box::pin(async move {
            if let Some(previous) = previous {
                // An error means the previous append's future was dropped: it wrote nothing.
                let _ = previous.await;
            }
            durable.stats.appends.fetch_add(1, Ordering::Relaxed);
            match fault {
                Fault::Slow(d) => {
                    durable.stats.slowed.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(d).await;
                }
                Fault::Fail => {
                    durable.stats.failed.fetch_add(1, Ordering::Relaxed);
                    for r in &requests {
                        durable.trace.note(
                            Some(r.stream),
                            format!("log: append of {} events FAILED (injected)", r.events.len()),
                        );
                    }
                    let _ = done.send(());
                    return Err(Error::Storage("injected append failure".into()));
                }
                Fault::None => {}
            }
            if fence.load(Ordering::SeqCst) {
                durable.stats.fenced.fetch_add(1, Ordering::Relaxed);
                for r in &requests {
                    durable.trace.note(
                        Some(r.stream),
                        format!("log: append of {} events lost in the crash", r.events.len()),
                    );
                }
                let _ = done.send(());
                return Err(Error::Storage("the orchestrator process died".into()));
            }
            let acked: Vec<Acked> = requests
                .iter()
                .map(|r| Acked {
                    stream: r.stream,
                    events: r.events.clone(),
                })
                .collect();
            let result = durable.log.append(requests).await;
            if result.is_ok() {
                for a in &acked {
                    if let (Some(f), Some(l)) = (a.events.first(), a.events.last()) {
                        durable.trace.note(
                            Some(a.stream),
                            format!("log: seq {}..={} written", f.seq, l.seq),
                        );
                    }
                }
                lock(&durable.acked).extend(acked);
            }
            let _ = done.send(());
            result
        })
    }

    fn read_stream(&self, stream: WorkflowId, from_seq: u64) -> Result<Vec<Event>> {
        self.durable.log.read_stream(stream, from_seq)
    }

    fn read_all(&self, from: u64, limit: usize) -> Result<Vec<Recorded>> {
        self.durable.log.read_all(from, limit)
    }

    fn stream_version(&self, stream: WorkflowId) -> Result<u64> {
        self.durable.log.stream_version(stream)
    }

    fn head(&self) -> u64 {
        self.durable.log.head()
    }

    fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.durable.log.subscribe()
    }
}
