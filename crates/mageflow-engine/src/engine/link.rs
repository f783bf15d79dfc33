//! How a handler running in this process reaches its engine: the [`Handle`] is the context's
//! [`EngineLink`], and [`TaskContext::engine`] hands it back out. Above both the handle and the
//! context (and `control::apply`, which a handler's command goes through), so that neither of
//! them depends on the other.

use super::handle::Handle;
use crate::context::{Backing, EngineLink, TaskContext};
use crate::control::command::ControlOp;
use crate::error::{Error, Result};
use crate::sig::Sig;
use mageflow_core::{SignatureId, WorkflowId};
use mageflow_store::BoxFuture;
use serde_json::Value;
use std::any::Any;

impl EngineLink for Handle {
    fn checkpoint(&self, sig: SignatureId, attempt: u32, data: Value) -> BoxFuture<'_, Result<()>> {
        Box::pin(Handle::checkpoint(self, sig, attempt, data))
    }

    fn submit(&self, id: WorkflowId, sig: Sig, input: Value) -> BoxFuture<'_, Result<WorkflowId>> {
        Box::pin(self.submit_with_id(id, sig, input, true))
    }

    fn control(
        &self,
        principal: String,
        op: ControlOp,
        target: SignatureId,
        confirmed: bool,
    ) -> BoxFuture<'_, Result<String>> {
        Box::pin(async move {
            crate::control::apply(&self.as_principal(principal), op, target, confirmed, None).await
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

impl TaskContext {
    /// The engine, for anything else (status queries, the whole `Handle`); only for handlers
    /// running inside the engine's process (`Error::NeedsEngine` in a worker process, where
    /// [`TaskContext::submit`], [`TaskContext::control`] and [`TaskContext::save_checkpoint`]
    /// still work).
    pub fn engine(&self) -> Result<&Handle> {
        match &self.backing {
            // The one implementation of the link is the handle: the downcast always succeeds.
            Backing::Engine(h) => h.as_any().downcast_ref().ok_or(Error::NeedsEngine),
            Backing::Worker(_) => Err(Error::NeedsEngine),
        }
    }
}
