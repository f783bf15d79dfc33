//! Built-in tasks, so the CLI (demo, bench) is useful without writing code:
//! `noop` (returns its `mageflow_results` input or null), `echo` (returns its whole input),
//! `sleep` (waits `ms` milliseconds, honouring cancellation), `fail` (fails with `message`;
//! `retryable` defaults to false), `steps` (`steps` steps of `ms` milliseconds, a checkpoint
//! after each: a resumed attempt continues from the last one).

use crate::registry::{Registry, TaskFailure};
use serde::Deserialize;
use serde_json::Value;
use std::time::Duration;

#[derive(Deserialize)]
struct NoopInput {
    #[serde(default)]
    mageflow_results: Value,
}

#[derive(Deserialize)]
struct SleepInput {
    ms: u64,
}

#[derive(Deserialize)]
struct StepsInput {
    steps: u64,
    ms: u64,
}

#[derive(Deserialize)]
struct FailInput {
    #[serde(default = "default_fail_message")]
    message: String,
    #[serde(default)]
    retryable: bool,
}

fn default_fail_message() -> String {
    "failed on purpose".into()
}

/// Register `noop`, `echo`, `sleep`, `steps` and `fail`.
pub fn register(registry: &mut Registry) {
    registry.task("noop", |i: NoopInput, _ctx| async move {
        Ok::<_, TaskFailure>(i.mageflow_results)
    });
    registry.task(
        "echo",
        |i: Value, _ctx| async move { Ok::<_, TaskFailure>(i) },
    );
    registry.task("sleep", |i: SleepInput, ctx| async move {
        tokio::select! {
            biased;
            _ = ctx.cancellation().cancelled() => Err(TaskFailure::retryable("sleep interrupted")),
            _ = tokio::time::sleep(Duration::from_millis(i.ms)) => Ok(Value::from(i.ms)),
        }
    });
    registry.task("steps", |i: StepsInput, ctx| async move {
        let from = ctx.checkpoint().and_then(Value::as_u64).unwrap_or(0);
        for step in from..i.steps {
            tokio::select! {
                biased;
                _ = ctx.cancellation().cancelled() => {
                    return Err(TaskFailure::retryable(format!("stopped at step {step}")));
                }
                _ = tokio::time::sleep(Duration::from_millis(i.ms)) => {}
            }
            ctx.save_checkpoint(step + 1)
                .await
                .map_err(|e| TaskFailure::retryable(e.to_string()))?;
        }
        Ok(serde_json::json!({ "steps": i.steps, "resumed_from": from }))
    });
    registry.task("fail", |i: FailInput, _ctx| async move {
        Err::<Value, _>(TaskFailure {
            message: i.message,
            retryable: i.retryable,
        })
    });
}
