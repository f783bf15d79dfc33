//! Task registry: named async handlers with serde-typed input and output. The registry is also
//! where inputs and kwargs are validated, so a bad signature is refused when it is created or
//! run — never later inside a worker.

use crate::context::TaskContext;
use crate::error::{Error, Result};
use mageflow_core::model::RETURN_FIELD_DEFAULT;
use mageflow_core::RetryPolicy;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

/// What a registered handler returns, with its input and output types erased.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Value, TaskFailure>> + Send>>;
type HandlerFn = Arc<dyn Fn(Value, TaskContext) -> HandlerFuture + Send + Sync>;

/// A task's handler together with how long one attempt of it may run, so that whoever runs an
/// attempt (the engine's workers, a worker process) enforces the same limit.
#[derive(Clone)]
pub(crate) struct Handler {
    run: HandlerFn,
    /// [`TaskDef::timeout`]: `None` runs an attempt for as long as it takes.
    pub(crate) timeout: Option<std::time::Duration>,
}

impl Handler {
    pub(crate) fn call(&self, input: Value, ctx: TaskContext) -> HandlerFuture {
        (self.run)(input, ctx)
    }
}
type Validator = Arc<dyn Fn(&Value) -> std::result::Result<(), String> + Send + Sync>;

/// How a handler reports failure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TaskFailure {
    /// What went wrong, as the log records it (error callbacks receive it).
    pub message: String,
    /// False: retrying cannot help; the task fails at once whatever its retry budget.
    pub retryable: bool,
}

impl TaskFailure {
    /// A failure retrying may cure: the task is retried while its retry policy allows.
    pub fn retryable(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: true,
        }
    }
    /// A failure retrying cannot cure: the task fails at once, whatever its retry budget.
    pub fn fatal(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            retryable: false,
        }
    }

    /// The failure of an attempt that outran its task's [`TaskDef::timeout`]: retryable, with
    /// the message `timed out after <limit> ms` (what the log records, so a reader of the
    /// history tells a timeout from the handler's own errors; see [`TaskFailure::is_timeout`]).
    pub fn timed_out(limit: std::time::Duration) -> Self {
        Self::retryable(format!("{TIMED_OUT_PREFIX}{} ms", limit.as_millis()))
    }

    /// Whether this is the failure [`TaskFailure::timed_out`] makes.
    pub fn is_timeout(&self) -> bool {
        self.retryable && self.message.starts_with(TIMED_OUT_PREFIX)
    }
}

/// How the message of a timed-out attempt begins (see [`TaskFailure::timed_out`]).
const TIMED_OUT_PREFIX: &str = "timed out after ";

impl<E: std::error::Error> From<E> for TaskFailure {
    fn from(e: E) -> Self {
        TaskFailure::retryable(e.to_string())
    }
}

/// One registered task.
#[derive(Clone)]
pub struct TaskDef {
    /// The name signatures call it by ([`crate::sign`]).
    pub name: String,
    pub(crate) handler: Handler,
    validator: Validator,
    /// Input field a success callback's result is injected into.
    pub return_field: String,
    /// The retry policy of its signatures (each can override it, [`crate::TaskSig::retries`]).
    pub retry: RetryPolicy,
    /// Lease of a running attempt: if the handler goes this long without
    /// `TaskContext::heartbeat`, the attempt is abandoned (its cancellation token fires) and
    /// fails retryably — it is retried per the task's policy. `None`: no lease.
    pub heartbeat_timeout: Option<std::time::Duration>,
}

impl TaskDef {
    /// Builder: the longest one attempt may run, heartbeats or not (a lease only proves the
    /// handler is alive; this bounds how long it may take). When it passes, the attempt's
    /// cancellation token fires, the handler gets the engine's grace period to wind down (its
    /// result is then ignored), its future is dropped, and the attempt fails with
    /// [`TaskFailure::timed_out`] — retryable, so it is retried per the task's policy. Enforced
    /// wherever the attempt runs (this process's workers or a worker process).
    pub fn timeout(&mut self, limit: std::time::Duration) -> &mut Self {
        self.handler.timeout = Some(limit);
        self
    }

    /// The limit [`TaskDef::timeout`] set (`None`: none).
    pub fn execution_timeout(&self) -> Option<std::time::Duration> {
        self.handler.timeout
    }

    /// Builder: hold running attempts to a lease renewed by `TaskContext::heartbeat`.
    pub fn heartbeat_timeout(&mut self, timeout: std::time::Duration) -> &mut Self {
        self.heartbeat_timeout = Some(timeout);
        self
    }

    /// Builder: retry policy (extra attempts after the first, initial backoff).
    pub fn retries(&mut self, max_retries: u32, backoff_ms: u64) -> &mut Self {
        self.retry.max_retries = max_retries;
        self.retry.backoff_ms = backoff_ms;
        self
    }

    /// Builder: the input field success-callback results go into (default `mageflow_results`).
    pub fn return_field(&mut self, field: impl Into<String>) -> &mut Self {
        self.return_field = field.into();
        self
    }

    /// Full check: `input` must deserialize into the task's input type.
    pub fn validate_input(&self, input: &Value) -> Result<()> {
        (self.validator)(input).map_err(|reason| Error::InvalidInput {
            task: self.name.clone(),
            reason,
        })
    }

    /// Partial check of bound kwargs, before the rest of the input is known: every field given
    /// must have the right type. Only a "missing field" complaint is tolerated.
    pub fn validate_kwargs(&self, kwargs: &Value) -> Result<()> {
        if !kwargs.is_object() {
            return Err(Error::InvalidKwargs {
                task: self.name.clone(),
                reason: "kwargs must be a JSON object".into(),
            });
        }
        match (self.validator)(kwargs) {
            Ok(()) => Ok(()),
            Err(reason) if reason.starts_with("missing field") => Ok(()),
            Err(reason) => Err(Error::InvalidKwargs {
                task: self.name.clone(),
                reason,
            }),
        }
    }
}

/// All tasks a process can run, by name.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<String, TaskDef>,
    predicates: BTreeMap<String, PredicateFn>,
}

/// A predicate registered by name ([`Registry::predicate`]).
type PredicateFn = Arc<dyn Fn(&Value) -> bool + Send + Sync>;

impl Registry {
    /// An empty registry (add the built-in tasks with [`crate::builtin::register`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Register an async handler taking a deserializable input and returning a serializable
    /// output. Returns the definition for further options (`retries`, `return_field`,
    /// `timeout`, `heartbeat_timeout`).
    pub fn task<I, O, F, Fut>(&mut self, name: impl Into<String>, handler: F) -> &mut TaskDef
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, TaskFailure>> + Send + 'static,
    {
        let name = name.into();
        let task_name = name.clone();
        let handler = Arc::new(handler);
        let erased: HandlerFn = Arc::new(move |input: Value, ctx: TaskContext| {
            let handler = handler.clone();
            let task_name = task_name.clone();
            Box::pin(async move {
                let input: I = serde_json::from_value(input).map_err(|e| {
                    TaskFailure::fatal(format!("input of task {task_name} does not fit: {e}"))
                })?;
                let output = handler(input, ctx).await?;
                serde_json::to_value(output).map_err(|e| {
                    TaskFailure::fatal(format!(
                        "output of task {task_name} does not serialize: {e}"
                    ))
                })
            }) as HandlerFuture
        });
        let validator: Validator =
            Arc::new(|v: &Value| I::deserialize(v).map(|_| ()).map_err(|e| e.to_string()));
        let def = TaskDef {
            name: name.clone(),
            handler: Handler {
                run: erased,
                timeout: None,
            },
            validator,
            return_field: RETURN_FIELD_DEFAULT.to_owned(),
            retry: RetryPolicy::default(),
            heartbeat_timeout: None,
        };
        match self.tasks.entry(name) {
            Entry::Occupied(mut o) => {
                o.insert(def);
                o.into_mut()
            }
            Entry::Vacant(v) => v.insert(def),
        }
    }

    /// Register a synchronous (blocking) handler. It runs on tokio's blocking pool, so it may
    /// do blocking I/O; it cannot be stopped mid-way by interrupt (its result is then ignored).
    pub fn task_sync<I, O, F>(&mut self, name: impl Into<String>, handler: F) -> &mut TaskDef
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(I, TaskContext) -> Result<O, TaskFailure> + Send + Sync + 'static,
    {
        let handler = Arc::new(handler);
        self.task(name, move |input: I, ctx: TaskContext| {
            let handler = handler.clone();
            async move {
                tokio::task::spawn_blocking(move || handler(input, ctx))
                    .await
                    .unwrap_or_else(|e| {
                        Err(TaskFailure::retryable(format!("handler panicked: {e}")))
                    })
            }
        })
    }

    /// Register a predicate that graph edges can name (`Predicate::Named { name, path }`): it
    /// gets the value at the edge's path of the source's output (`null` when missing) and says
    /// whether the edge is taken. It runs on the orchestrator as the graph routes — keep it
    /// quick, pure and deterministic; what it answered is recorded in the `graph_routed`
    /// event, so replay and history never call it again. A graph naming a predicate that is not
    /// registered is refused at submission. Registering `name` again replaces it.
    pub fn predicate(
        &mut self,
        name: impl Into<String>,
        test: impl Fn(&Value) -> bool + Send + Sync + 'static,
    ) -> &mut Self {
        self.predicates.insert(name.into(), Arc::new(test));
        self
    }

    /// Whether a predicate is registered as `name`.
    pub fn has_predicate(&self, name: &str) -> bool {
        self.predicates.contains_key(name)
    }

    /// The task registered as `name`, or [`Error::UnknownTask`].
    pub fn get(&self, name: &str) -> Result<&TaskDef> {
        self.tasks.get(name).ok_or_else(|| Error::UnknownTask {
            name: name.to_owned(),
        })
    }

    /// Every registered task name, in order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }
}

impl mageflow_core::condition::NamedPredicates for Registry {
    fn test(&self, name: &str, value: &Value) -> Option<bool> {
        self.predicates.get(name).map(|test| test(value))
    }
}
