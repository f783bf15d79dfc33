//! One attempt of a handler, run to its end: the same code for the engine's in-process workers
//! and a worker process's runtime, so both enforce the same rules — a panic is a retryable
//! failure, a lease not renewed in time abandons the attempt, a task's timeout ends it, and a
//! stopped handler gets the grace period before its future is dropped. Knows nothing of who
//! reports the outcome.

use crate::context::TaskContext;
use crate::registry::TaskFailure;
use serde_json::Value;
use std::any::Any;
use std::time::Duration;

/// Run one attempt's handler to its end. `None`: it was stopped (its token fired) and outlived
/// the grace period, so its future was dropped. A panic is a retryable failure; a handler with a
/// heartbeat timeout that stops renewing its lease is dropped and failed (retryable); one that
/// outruns its task's timeout ([`crate::TaskDef::timeout`]) has its token fired, gets `grace` to
/// wind down, is dropped and fails with [`TaskFailure::timed_out`] (retryable).
pub(crate) async fn run_attempt(
    handler: crate::registry::Handler,
    heartbeat_timeout: Option<Duration>,
    input: Value,
    mut ctx: TaskContext,
    grace: Duration,
) -> Option<std::result::Result<Value, TaskFailure>> {
    let token = ctx.cancel.clone();
    let mut renewals = heartbeat_timeout.map(|_| {
        let (lease, renewals) = tokio::sync::watch::channel(());
        ctx.lease = Some(lease);
        renewals
    });
    let limit = handler.timeout;
    let mut fut = std::pin::pin!(CatchUnwind(handler.call(input, ctx)));
    let caught = |r: std::result::Result<_, Box<dyn Any + Send>>| {
        r.unwrap_or_else(|panic| {
            Err(TaskFailure::retryable(format!(
                "handler panicked: {}",
                panic_message(&panic)
            )))
        })
    };
    tokio::select! {
        biased;
        r = &mut fut => Some(caught(r)),
        _ = async { token.cancelled().await; tokio::time::sleep(grace).await } => None,
        missed = lease_expired(heartbeat_timeout, renewals.as_mut()) => {
            // The handler future is dropped here; its token tells anything it spawned.
            token.cancel();
            Some(Err(TaskFailure::retryable(format!(
                "lease expired: no heartbeat for {} ms", missed.as_millis()
            ))))
        }
        limit = timed_out(limit) => {
            // The attempt is over whatever the handler does now: it only gets the grace period
            // to wind down (save a checkpoint, release what it holds), as on an interrupt.
            token.cancel();
            let _ = tokio::time::timeout(grace, &mut fut).await;
            Some(Err(TaskFailure::timed_out(limit)))
        }
    }
}

/// Resolves (with the limit) once `limit` has passed; never without one.
async fn timed_out(limit: Option<Duration>) -> Duration {
    match limit {
        Some(limit) => {
            tokio::time::sleep(limit).await;
            limit
        }
        None => std::future::pending().await,
    }
}

/// Polls a handler future, turning a panic into an `Err` instead of unwinding into the runtime.
struct CatchUnwind(crate::registry::HandlerFuture);

impl std::future::Future for CatchUnwind {
    type Output = std::result::Result<std::result::Result<Value, TaskFailure>, Box<dyn Any + Send>>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let fut = self.0.as_mut();
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| fut.poll(cx))) {
            Ok(std::task::Poll::Ready(v)) => std::task::Poll::Ready(Ok(v)),
            Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
            Err(panic) => std::task::Poll::Ready(Err(panic)),
        }
    }
}

fn panic_message(panic: &Box<dyn Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

/// Resolves (with the timeout) once `timeout` passes without a renewal; never without a lease.
async fn lease_expired(
    timeout: Option<Duration>,
    renewals: Option<&mut tokio::sync::watch::Receiver<()>>,
) -> Duration {
    let (Some(timeout), Some(renewals)) = (timeout, renewals) else {
        return std::future::pending().await;
    };
    loop {
        match tokio::time::timeout(timeout, renewals.changed()).await {
            Ok(Ok(())) => continue,
            // The handler dropped its context: nothing can renew the lease anymore.
            Ok(Err(_)) => {
                tokio::time::sleep(timeout).await;
                return timeout;
            }
            Err(_) => return timeout,
        }
    }
}
