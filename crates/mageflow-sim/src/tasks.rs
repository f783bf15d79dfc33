//! The simulator's test handlers. Each works for a number of virtual milliseconds taken from
//! its kwargs; what they do when their cancellation token fires is the point: `sim_ok`,
//! `sim_flaky` and `sim_steps` stop and return an error carrying [`STOPPED_MARK`] (as the
//! built-in `sleep` and `steps` do), `sim_stubborn` ignores the token and is dropped after the
//! grace period. The invariant checks look for that mark: a handler stopped by the system must
//! never fail its task (DESIGN invariant 9).

use mageflow_engine::{Registry, TaskContext, TaskFailure};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

/// Start of the error message of a handler that stopped because its token fired.
pub const STOPPED_MARK: &str = "sim: stopped by its token";

#[derive(Deserialize)]
struct Input {
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    fail_attempts: u32,
    #[serde(default)]
    steps: u32,
}

/// Work `ms` virtual milliseconds unless the token fires first (then the stop error).
async fn work(ctx: &TaskContext, ms: u64, what: &str) -> Result<(), TaskFailure> {
    tokio::select! {
        // Biased: the simulator's own selects must not draw on tokio's unseeded RNG.
        biased;
        _ = ctx.cancellation().cancelled() => {
            Err(TaskFailure::retryable(format!("{STOPPED_MARK} ({what})")))
        }
        _ = tokio::time::sleep(Duration::from_millis(ms)) => Ok(()),
    }
}

/// The registry every simulated worker and orchestrator uses.
pub fn registry() -> Registry {
    let mut r = Registry::new();
    r.task("sim_ok", |i: Input, ctx: TaskContext| async move {
        work(&ctx, i.ms, "ok").await?;
        Ok::<_, TaskFailure>(json!({ "ms": i.ms }))
    });
    r.task("sim_flaky", |i: Input, ctx: TaskContext| async move {
        work(&ctx, i.ms, "flaky").await?;
        if ctx.attempt() <= i.fail_attempts {
            return Err(TaskFailure::retryable(format!(
                "sim: flaky attempt {}",
                ctx.attempt()
            )));
        }
        Ok(json!({ "attempt": ctx.attempt() }))
    });
    r.task("sim_steps", |i: Input, ctx: TaskContext| async move {
        let from = ctx.checkpoint().and_then(Value::as_u64).unwrap_or(0);
        for step in from..u64::from(i.steps) {
            work(&ctx, i.ms, "steps").await?;
            ctx.save_checkpoint(step + 1)
                .await
                .map_err(|e| TaskFailure::retryable(format!("sim: checkpoint: {e}")))?;
        }
        Ok(json!({ "steps": i.steps, "resumed_from": from }))
    });
    r.task("sim_stubborn", |i: Input, _ctx: TaskContext| async move {
        tokio::time::sleep(Duration::from_millis(i.ms)).await;
        Ok::<_, TaskFailure>(json!({ "stubborn": i.ms }))
    });
    r.task("sim_fatal", |_i: Input, _ctx: TaskContext| async move {
        Err::<Value, _>(TaskFailure::fatal("sim: fatal on purpose"))
    });
    r
}
