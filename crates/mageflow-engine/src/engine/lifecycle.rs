//! [`Engine`]: starting one (recovery, then the orchestrator's task and the compaction job) and
//! shutting it down. The top of the engine: it wires the handle, the orchestrator and the
//! compaction job together.

use super::config::{Config, Dispatch};
use super::handle::Handle;
use super::orchestrator::Orchestrator;
use super::report::RecoveryReport;
use super::request::Request;
use super::stats::Stats;
use crate::det::{Map, Set};
use crate::error::Result;
use crate::log_slot::LogSlot;
use crate::registry::Registry;
use mageflow_core::Actor;
use mageflow_store::EventLog;
use std::collections::BTreeSet;
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// Depth of the orchestrator's request queue.
pub const QUEUE_DEPTH_MAX: usize = 65_536;

/// A running engine: orchestrator plus in-process workers.
pub struct Engine {
    handle: Handle,
    task: tokio::task::JoinHandle<()>,
    recovery: RecoveryReport,
    /// The compaction job, if `Config::compact_after` or `Config::compact_history` is set.
    compactor: Option<(CancellationToken, tokio::task::JoinHandle<()>)>,
}

impl Engine {
    /// Start on `log`: rebuild the unfinished workflows from it, requeue attempts that were
    /// running when the last process stopped, and begin running handlers.
    pub async fn start(
        log: Arc<dyn EventLog>,
        registry: Registry,
        config: Config,
    ) -> Result<Engine> {
        let (tx, rx) = mpsc::channel(QUEUE_DEPTH_MAX);
        let stats = Arc::new(Stats::default());
        let (compact_tx, compact_rx) = mpsc::unbounded_channel();
        let slot = Arc::new(LogSlot::new(log.clone()));
        let handle = Handle {
            tx: tx.clone(),
            registry: Arc::new(registry),
            log: slot.clone(),
            slot,
            stats: stats.clone(),
            actor: Actor::api(config.principal.clone()),
            config: Arc::new(config.clone()),
            archived_to: Arc::default(),
        };
        let mut orch = Orchestrator {
            log,
            registry: handle.registry.clone(),
            handle: handle.clone(),
            stats,
            worker_actor: Actor::worker(config.worker_id.clone()),
            free_slots: match config.dispatch {
                Dispatch::Local => config.workers,
                Dispatch::Remote { window } => window,
            },
            config,
            hot: Map::default(),
            ready: Default::default(),
            timers: BTreeSet::new(),
            purges: BTreeSet::new(),
            running: Map::default(),
            deferred: Set::default(),
            held: Map::default(),
            waiters: Map::default(),
            seq: 0,
            last_touch: Map::default(),
            shutdown_at: None,
            handlers: tokio_util::task::TaskTracker::new(),
            shutdown_replies: Vec::new(),
            tx,
            compact_tx: handle.config.compact_after.map(|_| compact_tx),
            background: Vec::new(),
        };
        let recovery = orch.recover().await?;
        let task = tokio::spawn(orch.run(rx));
        let compactor = (handle.config.compact_after.is_some()
            || handle.config.compact_history.is_some())
        .then(|| {
            let stop = CancellationToken::new();
            let job = crate::compaction::run(compact_rx, handle.clone(), stop.clone());
            (stop, tokio::spawn(job))
        });
        Ok(Engine {
            handle,
            task,
            recovery,
            compactor,
        })
    }

    /// A handle to this engine (cheap; clone it freely).
    pub fn handle(&self) -> Handle {
        self.handle.clone()
    }

    /// What the start-up recovery found in the log and did about it.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    /// Stop taking work, give running handlers the grace period to finish, stop the rest
    /// (their attempts are requeued by the next start), and stop the orchestrator. Returns once
    /// the stopped handlers' futures are dropped too (they get another grace period after their
    /// token fires), and the engine's hold on the log is let go, so the log — a sled
    /// directory's lock, say — is free for the next opener even while clones of its
    /// [`Handle`] live on: their calls fail with [`Error::ShutDown`] from then on.
    ///
    /// [`Error::ShutDown`]: crate::Error::ShutDown
    pub async fn shutdown(self) {
        if let Some((stop, job)) = self.compactor {
            // A compaction in progress finishes first (it is one atomic step).
            stop.cancel();
            let _ = job.await;
        }
        let (reply, rx) = oneshot::channel();
        if self
            .handle
            .tx
            .send(Request::Shutdown { reply })
            .await
            .is_ok()
        {
            let _ = rx.await;
        }
        let _ = self.task.await;
        // The orchestrator (the log's other holder) is gone with its task.
        self.handle.slot.close();
    }
}
