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
//! | `jobs` | sorted set | job key (`sig_<hex>.<i>#<attempt>`) scored by the instant (ms, Redis clock) it becomes visible: a new job by the instant it was added, moved back by its priority ([`projector::PRIORITY_SPAN_MS`] per step above the lowest), so workers claim higher priorities first and, within one, the oldest; a claimed one by the end of its lease |
//! | `jobdata` | hash | job key → JSON `{task, input, checkpoint}` |
//! | `claims` | hash | job key → worker id of the latest claim |
//! | `leases` | hash | job key → lease token of the latest claim (only its holder's reports count; removed when the attempt ends) |
//! | `wake` | list | tokens pushed when jobs are added; idle workers `BLPOP` it, the claim pipelined behind |
//! | `stop` | pub/sub channel | job keys of revoked attempts |
//! | `reports` | stream | field `report`: JSON [`Report`], field `mac`: its HMAC ([`auth`]); written by workers and operators, trimmed by the orchestrator |
//! | `answer:<report id>` | list | the orchestrator's answer to a checkpoint (`1`/`0`) or a submit (JSON); expires after a minute |

pub mod auth;
mod hot;
mod projector;

pub use auth::Secret;
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
    /// The deployment's worker secret: workers sign their reports with it and the orchestrator
    /// accepts only reports signed with it ([`auth`]). `None`: reports go unsigned, and anyone
    /// who can write to Redis can write history.
    pub secret: Option<Secret>,
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
            secret: None,
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
    /// A worker's report named a lease that no longer holds its job (it expired and another
    /// worker claimed the job, or the hot tier was wiped): nothing was written.
    #[error("the lease of job {0} is lost: another claim holds it, or the hot tier was rebuilt")]
    LeaseLost(JobKey),
}

/// Largest report accepted from the reports stream, in bytes (a result or a submitted tree
/// with its input, JSON-encoded).
pub const REPORT_BYTES_MAX: usize = 2 * mageflow_core::codec::EVENT_BYTES_MAX;

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
    /// The lease token this claim holds the job under: the worker's reports and heartbeats
    /// name it, and only the holder's count.
    pub lease: String,
}

impl Job {
    /// A claimed job from the claim's reply: its key, its `jobdata` JSON and its lease token
    /// (untrusted bytes: anyone who can reach Redis can write them).
    pub fn parse(member: &str, data: &str, lease: &str) -> Result<Self, HotError> {
        let key: JobKey = member.parse()?;
        let data: JobData = serde_json::from_str(data).map_err(|e| HotError::Malformed {
            what: "job data",
            detail: format!("{member}: {e}"),
        })?;
        Ok(Job {
            key,
            task: data.task,
            input: data.input,
            checkpoint: data.checkpoint,
            lease: lease.to_owned(),
        })
    }
}

/// What a worker tells the orchestrator about an attempt.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Report {
    pub key: JobKey,
    pub worker: String,
    pub outcome: ReportOutcome,
    /// The lease token of the claim the report is about (a worker's reports); `None` for an
    /// operator's command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
}

/// A report as read from the stream: its id, the report, and the bytes and MAC it came with
/// (checked by the orchestrator: [`Received::signed_by`]).
#[derive(Clone, PartialEq, Debug)]
pub struct Received {
    /// Stream id (`<ms>-<seq>`, Redis's clock when it was added).
    pub id: String,
    pub report: Report,
    /// The JSON the report was read from, exactly as it was stored (and signed).
    pub raw: String,
    /// Its MAC, if it came with one.
    pub mac: Option<String>,
}

impl Received {
    /// Read one stream entry's fields (untrusted bytes: anyone who can reach Redis can write
    /// them). Refused when over [`REPORT_BYTES_MAX`] or not a report.
    pub fn parse(id: String, raw: String, mac: Option<String>) -> Result<Self, HotError> {
        if raw.len() > REPORT_BYTES_MAX {
            return Err(HotError::Malformed {
                what: "report",
                detail: format!(
                    "{id}: {} bytes, over the limit of {REPORT_BYTES_MAX}",
                    raw.len()
                ),
            });
        }
        let report = serde_json::from_str(&raw).map_err(|e| HotError::Malformed {
            what: "report",
            detail: format!("{id}: {e}"),
        })?;
        Ok(Self {
            id,
            report,
            raw,
            mac,
        })
    }

    /// Whether the report came signed with `secret`.
    pub fn signed_by(&self, secret: &Secret) -> bool {
        self.mac
            .as_deref()
            .is_some_and(|mac| secret.verify(self.raw.as_bytes(), mac))
    }

    /// Milliseconds since the Unix epoch (Redis's clock) when the report was added.
    pub fn added_ms(&self) -> Option<u64> {
        self.id.split('-').next()?.parse().ok()
    }
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
    /// The worker stopped the handler for a reason of the system's (its lease was lost, the
    /// hot tier could not take its checkpoint): the attempt is given up and runs again (from
    /// its last checkpoint), spending no retry.
    Abandoned,
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
    /// A control command, relayed to the orchestrator, which carries it out as `principal`
    /// and answers once it is durable or refused. An operator's (`mageflow cancel …` and the
    /// like; the report's `worker` is `operator:<principal>`) is about the signature of the
    /// report's key (its attempt is 0), signed with the operator's token; a handler's
    /// (`TaskContext::control`) names the handler's job as its key, with its lease, and the
    /// signature it acts on as `target`, signed with the worker secret.
    Control {
        /// `cancel`, `interrupt`, `suspend`, `resume`, `delete`, `restore`, `rerun`, `signal`,
        /// `reject` or `submit`.
        op: String,
        /// For `cancel`: the operator confirmed it.
        confirmed: bool,
        principal: String,
        /// Past this instant (ms since the Unix epoch, the sender's clock) the command is
        /// refused instead of carried out: its sender has stopped waiting. 0 (a sender that
        /// set none): refused.
        #[serde(default)]
        deadline_ms: u64,
        /// Random, once per command: a command seen twice (replayed) is carried out once.
        #[serde(default)]
        nonce: String,
        /// A handler's command: the signature it acts on.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target: Option<SignatureId>,
        /// What a `signal` carries, a `reject`'s reason, or a `submit`'s workflow definition.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        value: Option<serde_json::Value>,
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
