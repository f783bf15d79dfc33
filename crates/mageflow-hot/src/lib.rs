//! Mageflow's *hot tier*: a disposable projection of the event log into Redis, and the
//! worker/orchestrator protocol over it.
//!
//! The orchestrator decides everything and appends events to the durable log; the
//! [`Projector`] is the only writer of hot state and derives all of it from the log (job queue,
//! live per-workflow views, swarm counters, recent-event tail). Workers take jobs from Redis
//! ([`Hot::claim`], a visibility timeout like SQS) and send [`Report`]s back on a stream the
//! orchestrator reads ([`Hot::read_reports`]). Everything can be deleted at any time: the
//! projector notices a missing `<prefix>pos` and re-projects from the log.
//!
//! # Key layout (every key starts with [`HotConfig::prefix`])
//!
//! | key | type | content |
//! |-----|------|---------|
//! | `pos` | string | log position of the last projected event (written in the same `MULTI` as the batch) |
//! | `wf:<uuid>` | hash | node index → JSON `{name, kind, task?, status, attempt}`; expires `done_ttl` after the workflow finished |
//! | `swarm:<sig>` | hash | `dispatched`, `running`, `succeeded`, `failed` |
//! | `tail` | stream | recent events, id `<position>-0`, fields `position stream seq kind node`, `MAXLEN ~ tail_len` |
//! | `jobs` | sorted set | job key (`sig_<hex>.<i>#<attempt>`) scored by the instant (ms, Redis clock) it becomes visible |
//! | `jobdata` | hash | job key → JSON `{task, input, checkpoint}` |
//! | `claims` | hash | job key → worker id of the latest claim |
//! | `wake` | list | tokens pushed when jobs are added; idle workers `BLPOP` it, the claim pipelined behind |
//! | `stop` | pub/sub channel | job keys of revoked attempts |
//! | `reports` | stream | field `report`: JSON [`Report`]; written by workers, trimmed by the orchestrator |
//! | `answer:<report id>` | list | the orchestrator's answer to a checkpoint (`1`/`0`) or a submit (JSON); expires after a minute |

mod hot;
mod projector;

pub use hot::{clear_prefix_blocking, Hot};
pub use projector::{Projector, ProjectorStats};

use mageflow_core::{SignatureId, WorkflowId};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// Where the hot tier lives and how long things stay in it.
#[derive(Clone, Debug)]
pub struct HotConfig {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Every key starts with this (e.g. `mf:prod:`).
    pub prefix: String,
    /// How long a claimed job stays invisible to other workers without a heartbeat.
    pub lease: Duration,
    /// Approximate length of the recent-event tail.
    pub tail_len: usize,
    /// How long the hot state of a finished workflow is kept.
    pub done_ttl: Duration,
    /// `done_ttl` per kind of the workflow's root: `"task"`, `"chain"` or `"swarm"`.
    pub done_ttl_by_kind: BTreeMap<String, Duration>,
}

impl HotConfig {
    pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);
    pub const DEFAULT_TAIL_LEN: usize = 10_000;
    pub const DEFAULT_DONE_TTL: Duration = Duration::from_secs(60);

    /// Defaults for everything but the URL and the prefix.
    pub fn new(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: prefix.into(),
            lease: Self::DEFAULT_LEASE,
            tail_len: Self::DEFAULT_TAIL_LEN,
            done_ttl: Self::DEFAULT_DONE_TTL,
            done_ttl_by_kind: BTreeMap::new(),
        }
    }

    /// How long to keep a finished workflow whose root is of `kind`.
    pub fn done_ttl_for(&self, kind: &str) -> Duration {
        self.done_ttl_by_kind
            .get(kind)
            .copied()
            .unwrap_or(self.done_ttl)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HotError {
    // The URL is shown with its password masked: this message reaches logs and terminals.
    #[error("cannot reach Redis at {}: {source} (is redis-server running? start one with `redis-server --daemonize yes`)", mageflow_store::mask_url(.url))]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    #[error("Redis {op} failed: {source}")]
    Redis {
        op: &'static str,
        source: redis::RedisError,
    },
    #[error("unexpected data in Redis ({what}): {detail}")]
    Malformed { what: &'static str, detail: String },
    #[error("cannot encode {what} as JSON: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("event log: {0}")]
    Log(#[from] mageflow_store::Error),
}

/// One attempt of one task: the unit of work in the queue.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct JobKey {
    pub sig: SignatureId,
    pub attempt: u32,
}

impl fmt::Display for JobKey {
    /// `sig_<hex>.<index>#<attempt>`: the member string in `jobs`, `jobdata` and on `stop`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.sig, self.attempt)
    }
}

impl FromStr for JobKey {
    type Err = HotError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HotError::Malformed {
            what: "job key",
            detail: format!("{s:?} is not sig_<hex>.<index>#<attempt>"),
        };
        let (sig, attempt) = s.rsplit_once('#').ok_or_else(bad)?;
        Ok(Self {
            sig: sig.parse().map_err(|_| bad())?,
            attempt: attempt.parse().map_err(|_| bad())?,
        })
    }
}

impl Serialize for JobKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for JobKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A claimed job: what the handler needs to run the attempt.
#[derive(Clone, PartialEq, Debug)]
pub struct Job {
    pub key: JobKey,
    pub task: String,
    pub input: Value,
    /// The checkpoint the previous attempt saved, if any.
    pub checkpoint: Option<Value>,
}

/// What a worker tells the orchestrator about an attempt.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Report {
    pub key: JobKey,
    pub worker: String,
    pub outcome: ReportOutcome,
}

#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReportOutcome {
    Succeeded(Value),
    Failed {
        message: String,
        retryable: bool,
    },
    /// The handler stopped after a revoke; frees nothing in the log.
    Stopped,
    /// A checkpoint the handler saved; the job stays claimed.
    Checkpoint(Value),
    /// The handler creates workflow `workflow` from signature tree `sig` (the engine's JSON
    /// form of a signature) with `input`, idempotently; the job stays claimed. The orchestrator
    /// answers once the creation is durable or refused.
    Submit {
        workflow: WorkflowId,
        sig: Value,
        input: Value,
    },
    /// A control command on the signature of the report's key (its attempt is 0): an
    /// operator's (`mageflow cancel …` and the like; the report's `worker` is
    /// `operator:<principal>`) or a handler's (`TaskContext::control`; its worker's id),
    /// relayed to the orchestrator, which carries it out as `principal` and answers once it is
    /// durable or refused.
    Control {
        /// `cancel`, `interrupt`, `suspend`, `resume`, `delete`, `restore` or `rerun`.
        op: String,
        /// For `cancel`: the operator confirmed it.
        confirmed: bool,
        principal: String,
    },
}

impl ReportOutcome {
    /// Whether this report ends the attempt on the worker side (the job leaves the queue).
    pub fn ends_attempt(&self) -> bool {
        !matches!(
            self,
            ReportOutcome::Checkpoint(_)
                | ReportOutcome::Submit { .. }
                | ReportOutcome::Control { .. }
        )
    }
}

/// The live view of one signature, as the projector last wrote it.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct HotSignature {
    pub sig: SignatureId,
    pub name: String,
    /// `task`, `chain` or `swarm`.
    pub kind: String,
    pub task: Option<String>,
    /// [`mageflow_core::Status::name`] of the visible status.
    pub status: String,
    pub attempt: u32,
}

/// One entry of the recent-event tail.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct TailEntry {
    pub position: u64,
    /// `wf_<hex>`.
    pub stream: String,
    pub seq: u64,
    /// [`mageflow_core::Payload::kind`].
    pub kind: String,
    pub node: Option<u32>,
}

/// The JSON stored per node in `wf:<uuid>`.
#[derive(Serialize, Deserialize)]
struct NodeView {
    name: String,
    kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    task: Option<String>,
    status: String,
    attempt: u32,
}

/// The JSON stored per job in `jobdata`.
#[derive(Serialize, Deserialize)]
struct JobData {
    task: String,
    input: Value,
    #[serde(default)]
    checkpoint: Option<Value>,
}
