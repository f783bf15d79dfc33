//! What a running handler sees of the engine: its signature and attempt, the last checkpoint, a
//! cancellation token (fired on interrupt or shutdown), and idempotent creation of workflows.

use crate::control::command::ControlOp;
use crate::error::Result;
use crate::sig::{to_input, Sig};
use mageflow_core::{SignatureId, WorkflowId};
use mageflow_store::BoxFuture;
use serde::Serialize;
use serde_json::Value;
use std::any::Any;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What a handler running in a worker process (no engine here) can ask of the orchestrator.
pub trait WorkerLink: Send + Sync + 'static {
    /// Durably record a checkpoint of `attempt` (sent to the orchestrator, which appends it).
    fn checkpoint(
        &self,
        sig: SignatureId,
        attempt: u32,
        data: Value,
    ) -> mageflow_store::BoxFuture<'static, Result<()>>;

    /// Create workflow `id` from `tree` with `input`, idempotently (an existing `id` is found,
    /// not duplicated): sent to the orchestrator, which validates it like any submit. Returns
    /// once the creation is durable; a refusal comes back as the error an in-process submit
    /// gives. `sig` and `attempt` say which handler asks.
    fn submit(
        &self,
        sig: SignatureId,
        attempt: u32,
        id: WorkflowId,
        tree: Sig,
        input: Value,
    ) -> mageflow_store::BoxFuture<'static, Result<()>>;

    /// Have `op` carried out on `target` as `principal`, by the orchestrator; returns what was
    /// done once it is durable, or the refusal.
    fn control(
        &self,
        principal: &str,
        op: ControlOp,
        target: SignatureId,
        confirmed: bool,
    ) -> mageflow_store::BoxFuture<'static, Result<String>>;
}

/// What a handler running in the engine's process asks of that engine. The engine's `Handle`
/// is the one implementation (`engine/link.rs`); through this trait the context — and the
/// registry, whose handlers take one — sit below the handle instead of in a cycle with it.
pub(crate) trait EngineLink: Send + Sync + 'static {
    /// `Handle::checkpoint`.
    fn checkpoint(&self, sig: SignatureId, attempt: u32, data: Value) -> BoxFuture<'_, Result<()>>;

    /// Create workflow `id` from `sig` and run it with `input`, idempotently (an existing `id`
    /// is found, not duplicated).
    fn submit(&self, id: WorkflowId, sig: Sig, input: Value) -> BoxFuture<'_, Result<WorkflowId>>;

    /// `control::apply` of `op` on `target`, acting as `principal`.
    fn control(
        &self,
        principal: String,
        op: ControlOp,
        target: SignatureId,
        confirmed: bool,
    ) -> BoxFuture<'_, Result<String>>;

    /// The `Handle` itself, for `TaskContext::engine` to hand out.
    fn as_any(&self) -> &dyn Any;
}

/// Who carries out a context's requests.
#[derive(Clone)]
pub(crate) enum Backing {
    /// The engine this handler runs in (its `Handle`).
    Engine(Arc<dyn EngineLink>),
    /// A worker process, through the hot tier.
    Worker(Arc<dyn WorkerLink>),
}

/// What a handler is given besides its input: which signature and attempt it runs, the last
/// checkpoint, its cancellation token, and what it may ask of the engine.
#[derive(Clone)]
pub struct TaskContext {
    pub(crate) sig: SignatureId,
    pub(crate) attempt: u32,
    pub(crate) checkpoint: Option<Value>,
    pub(crate) cancel: CancellationToken,
    pub(crate) backing: Backing,
    pub(crate) created: Arc<AtomicU32>,
    /// Renewed by `heartbeat`; the worker abandons the attempt if it is not renewed in time.
    pub(crate) lease: Option<tokio::sync::watch::Sender<()>>,
}

impl TaskContext {
    /// The signature this attempt runs.
    pub fn signature(&self) -> SignatureId {
        self.sig
    }

    /// 1 for the first attempt, 2 for the first retry, and so on.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The last checkpoint saved by an earlier attempt of this signature (resume point).
    pub fn checkpoint(&self) -> Option<&Value> {
        self.checkpoint.as_ref()
    }

    /// Fires when the signature is interrupted or canceled, or the engine shuts down. A handler
    /// that ignores it is dropped after the grace period.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Whether [`TaskContext::cancellation`] has fired (a check for handlers that poll).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    /// Renew this attempt's lease (tasks registered with a `heartbeat_timeout`): proof of
    /// life for long handlers. Cheap; a no-op without a lease.
    pub fn heartbeat(&self) {
        if let Some(lease) = &self.lease {
            lease.send_replace(());
        }
    }

    /// Durably record a checkpoint; a later attempt (retry, resume after a crash or interrupt)
    /// receives it through [`TaskContext::checkpoint`].
    pub async fn save_checkpoint(&self, data: impl Serialize) -> Result<()> {
        let data = serde_json::to_value(data).map_err(|e| crate::error::Error::InvalidInput {
            task: "checkpoint".into(),
            reason: e.to_string(),
        })?;
        match &self.backing {
            Backing::Engine(h) => h.checkpoint(self.sig, self.attempt, data).await,
            Backing::Worker(link) => link.checkpoint(self.sig, self.attempt, data).await,
        }
    }

    /// Create and run a workflow from inside a handler. Idempotent across retries: the n-th
    /// workflow an attempt creates gets the same id on every attempt, so a retried handler
    /// finds the workflow its earlier attempt created instead of duplicating it. Returns once
    /// the creation is durable. In a worker process the request goes to the orchestrator
    /// through the hot tier and is validated there, with the same errors; one nested too deep
    /// for the hot tier to carry fails with `Error::TooDeep` in the worker, and if no answer
    /// comes in time it fails with `Error::Hot` (the workflow may exist: a retry finds it).
    pub async fn submit(&self, sig: impl Into<Sig>, input: impl Serialize) -> Result<WorkflowId> {
        let n = self.created.fetch_add(1, Ordering::Relaxed);
        let id = WorkflowId::derive(self.sig, n);
        match &self.backing {
            Backing::Engine(h) => h.submit(id, sig.into(), to_input(input)?).await,
            Backing::Worker(link) => {
                let input = to_input(input)?;
                link.submit(self.sig, self.attempt, id, sig.into(), input)
                    .await?;
                Ok(id)
            }
        }
    }

    /// Cancel, interrupt, suspend, resume, delete, restore or rerun `target` (another
    /// workflow's signature, or one of this workflow's), as an operator would (`cancel` needs
    /// `confirmed`; delete, restore and rerun act on `target`'s workflow). Recorded with the
    /// principal `task:<this signature>`. In a worker process the command goes to the
    /// orchestrator through the hot tier and returns once it is durable, with the same
    /// refusals as in process. Returns what was done, in words.
    pub async fn control(
        &self,
        op: ControlOp,
        target: SignatureId,
        confirmed: bool,
    ) -> Result<String> {
        let principal = format!("task:{}", self.sig);
        match &self.backing {
            Backing::Engine(h) => h.control(principal, op, target, confirmed).await,
            Backing::Worker(link) => link.control(&principal, op, target, confirmed).await,
        }
    }
}
