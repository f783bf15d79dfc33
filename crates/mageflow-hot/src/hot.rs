//! The Redis client side of the hot tier: worker, orchestrator and reader operations.

use crate::auth::{random_token, Secret};
use crate::{
    HotConfig, HotError, HotSignature, Job, JobKey, NodeView, Received, Report, TailEntry,
};
use futures_util::StreamExt;
use mageflow_core::SignatureId;
use redis::aio::{ConnectionManager, ConnectionManagerConfig, MultiplexedConnection};
use redis::streams::{StreamId, StreamRangeReply, StreamReadReply};
use redis::{AsyncConnectionConfig, RedisError, Script};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

/// Idle blocking connections kept for reuse (`BLPOP`, `XREAD BLOCK`).
const BLOCKING_POOL_MAX: usize = 16;
/// Longest wait between reconnection attempts of the stop subscription.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a non-blocking command may take before it fails.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Take up to ARGV[3] due jobs (lowest score first: highest priority, then oldest), make them invisible for the lease, record the
/// claimant and a fresh lease token per job (ARGV[4] `.` its index in the reply). Returns
/// member, data, token, member, data, token, ... KEYS: jobs, jobdata, claims, leases.
/// ARGV: lease ms, worker, max jobs, lease token base.
const CLAIM_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max = tonumber(ARGV[3])
local until_ms = string.format('%.0f', now + tonumber(ARGV[1]))
local out = {}
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', string.format('%.0f', now), 'LIMIT', 0, max)
for _, m in ipairs(due) do
  local data = redis.call('HGET', KEYS[2], m)
  if data then
    local token = ARGV[4] .. '.' .. tostring(#out / 3)
    redis.call('ZADD', KEYS[1], until_ms, m)
    redis.call('HSET', KEYS[3], m, ARGV[2])
    redis.call('HSET', KEYS[4], m, token)
    out[#out + 1] = m
    out[#out + 1] = data
    out[#out + 1] = token
  else
    redis.call('ZREM', KEYS[1], m)
  end
end
return out
"#;

/// Extend the invisibility of a job that still exists and is still held under this lease
/// token. KEYS: jobs, leases. ARGV: member, lease ms, token.
const HEARTBEAT_LUA: &str = r#"
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then return 0 end
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[3] then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], 'XX', string.format('%.0f', now + tonumber(ARGV[2])), ARGV[1])
return 1
"#;

/// Append a worker's report (with its MAC, if signed); remove the job of that attempt if the
/// report ends it. The report is dropped, and nil returned, unless its lease token still holds
/// the job: a worker whose lease was lost (expired and claimed by another, wiped with the hot
/// tier) cannot end the job the next holder runs. The lease itself stays until the projector
/// sees the attempt end: the orchestrator checks it too.
/// KEYS: jobs, jobdata, claims, reports, leases. ARGV: member, report JSON, "1" to remove,
/// lease token, MAC or "".
const REPORT_LUA: &str = r#"
if redis.call('HGET', KEYS[5], ARGV[1]) ~= ARGV[4] then return false end
local id
if ARGV[5] ~= '' then
  id = redis.call('XADD', KEYS[4], '*', 'report', ARGV[2], 'mac', ARGV[5])
else
  id = redis.call('XADD', KEYS[4], '*', 'report', ARGV[2])
end
if ARGV[3] == '1' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
end
return id
"#;

/// What a blocking connection sends: one command, or a pipeline that starts with one.
enum Query<'a> {
    Cmd(&'a redis::Cmd),
    Pipe(&'a redis::Pipeline),
}

/// How long an answer to a report waits to be read.
const ANSWER_TTL_SECS: u64 = 60;

pub(crate) fn rerr(op: &'static str) -> impl FnOnce(RedisError) -> HotError {
    move |source| HotError::Redis { op, source }
}

struct Inner {
    cfg: HotConfig,
    client: redis::Client,
    conn: ConnectionManager,
    blocking: Mutex<Vec<MultiplexedConnection>>,
    hits: AtomicU64,
    misses: AtomicU64,
    claim: Script,
    heartbeat: Script,
    report: Script,
}

/// A connection to the hot tier under one prefix. Cheap to clone (shared connection).
#[derive(Clone)]
pub struct Hot {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Hot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hot")
            .field("url", &mageflow_store::mask_url(&self.inner.cfg.url))
            .field("prefix", &self.inner.cfg.prefix)
            .finish()
    }
}

impl Hot {
    /// Connect (and check the server answers). The error names the URL and the cause.
    pub async fn connect(cfg: HotConfig) -> Result<Hot, HotError> {
        let connect_err = |source| HotError::Connect {
            url: cfg.url.clone(),
            source,
        };
        let client = redis::Client::open(cfg.url.as_str()).map_err(connect_err)?;
        let manager_cfg = ConnectionManagerConfig::new()
            .set_number_of_retries(1)
            .set_max_delay(BACKOFF_MAX.as_millis() as u64)
            .set_connection_timeout(CONNECT_TIMEOUT)
            .set_response_timeout(RESPONSE_TIMEOUT);
        let mut conn = ConnectionManager::new_with_config(client.clone(), manager_cfg)
            .await
            .map_err(connect_err)?;
        redis::cmd("PING")
            .query_async::<String>(&mut conn)
            .await
            .map_err(connect_err)?;
        Ok(Hot {
            inner: Arc::new(Inner {
                cfg,
                client,
                conn,
                blocking: Mutex::new(Vec::new()),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                claim: Script::new(CLAIM_LUA),
                heartbeat: Script::new(HEARTBEAT_LUA),
                report: Script::new(REPORT_LUA),
            }),
        })
    }

    pub fn config(&self) -> &HotConfig {
        &self.inner.cfg
    }

    pub fn prefix(&self) -> &str {
        &self.inner.cfg.prefix
    }

    /// The full name of key `suffix` under the prefix.
    pub fn key(&self, suffix: &str) -> String {
        format!("{}{suffix}", self.inner.cfg.prefix)
    }

    pub(crate) fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    pub(crate) fn conn(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    fn lease_ms(&self) -> u64 {
        self.inner.cfg.lease.as_millis().max(1) as u64
    }

    // ---------------------------------------------------------------- worker side

    /// Atomically take the first job whose visibility time has passed and make it invisible
    /// until now + lease (Redis clock). `None` when no job is due.
    pub async fn claim(&self, worker: &str) -> Result<Option<Job>, HotError> {
        Ok(self.claim_many(worker, 1).await?.pop())
    }

    /// Like [`Hot::claim`], up to `max` jobs in one round trip (oldest first).
    pub async fn claim_many(&self, worker: &str, max: usize) -> Result<Vec<Job>, HotError> {
        let reply: Vec<String> = self
            .inner
            .claim
            .key(self.key("jobs"))
            .key(self.key("jobdata"))
            .key(self.key("claims"))
            .key(self.key("leases"))
            .arg(self.lease_ms())
            .arg(worker)
            .arg(max.max(1))
            .arg(random_token())
            .invoke_async(&mut self.conn())
            .await
            .map_err(rerr("claim"))?;
        parse_claimed(&reply)
    }

    /// Wait until work may be there (a token on the wake list) or `timeout` passed, then claim
    /// up to `max` jobs as [`Hot::claim_many`] does — in the same round trip: the claim is
    /// pipelined behind the `BLPOP` on one connection, so Redis runs it the moment the wait
    /// ends. Empty when nothing was due by then.
    pub async fn wait_and_claim(
        &self,
        worker: &str,
        max: usize,
        timeout: Duration,
    ) -> Result<Vec<Job>, HotError> {
        let mut pipe = redis::pipe();
        pipe.cmd("BLPOP")
            .arg(self.key("wake"))
            .arg(format!("{:.3}", timeout.as_secs_f64().max(0.001)))
            .ignore()
            .cmd("EVALSHA")
            .arg(self.inner.claim.get_hash())
            .arg(4)
            .arg(self.key("jobs"))
            .arg(self.key("jobdata"))
            .arg(self.key("claims"))
            .arg(self.key("leases"))
            .arg(self.lease_ms())
            .arg(worker)
            .arg(max.max(1))
            .arg(random_token());
        match self
            .blocking_query::<(Vec<String>,)>("BLPOP wake and claim", Query::Pipe(&pipe), timeout)
            .await
        {
            Ok((reply,)) => parse_claimed(&reply),
            // The server does not have the script (restarted, or `SCRIPT FLUSH`): the wait is
            // over either way; the plain claim loads it.
            Err(HotError::Redis { source, .. })
                if source.kind() == redis::ErrorKind::NoScriptError =>
            {
                self.claim_many(worker, max).await
            }
            Err(e) => Err(e),
        }
    }

    /// Tell the worker waiting on report `report_id` (a checkpoint) whether what it reported
    /// is durable in the log (`true`) or was refused (`false`). Unread answers expire.
    pub async fn answer_report(&self, report_id: &str, durable: bool) -> Result<(), HotError> {
        self.answer_report_with(report_id, if durable { "1" } else { "0" })
            .await
    }

    /// Answer report `report_id` with `answer` (what it means is up to the request: a
    /// submit's answer is JSON). Unread answers expire.
    pub async fn answer_report_with(&self, report_id: &str, answer: &str) -> Result<(), HotError> {
        let key = self.key(&format!("answer:{report_id}"));
        let _: () = redis::pipe()
            .cmd("LPUSH")
            .arg(&key)
            .arg(answer)
            .ignore()
            .cmd("EXPIRE")
            .arg(&key)
            .arg(ANSWER_TTL_SECS)
            .ignore()
            .query_async(&mut self.conn())
            .await
            .map_err(rerr("LPUSH answer"))?;
        Ok(())
    }

    /// Wait up to `timeout` for the answer to report `report_id` ([`Hot::answer_report`]);
    /// `None` if none came.
    pub async fn wait_answer(
        &self,
        report_id: &str,
        timeout: Duration,
    ) -> Result<Option<bool>, HotError> {
        Ok(self
            .wait_answer_raw(report_id, timeout)
            .await?
            .map(|v| v == "1"))
    }

    /// Wait up to `timeout` for the answer to report `report_id`, as it was written
    /// ([`Hot::answer_report_with`]); `None` if none came.
    pub async fn wait_answer_raw(
        &self,
        report_id: &str,
        timeout: Duration,
    ) -> Result<Option<String>, HotError> {
        let mut cmd = redis::cmd("BLPOP");
        cmd.arg(self.key(&format!("answer:{report_id}")))
            .arg(format!("{:.3}", timeout.as_secs_f64().max(0.001)));
        let reply: Option<(String, String)> = self
            .blocking_query("BLPOP answer", Query::Cmd(&cmd), timeout)
            .await?;
        Ok(reply.map(|(_, v)| v))
    }

    /// Extend the job's invisibility by the lease, if `lease` (the token its claim handed out)
    /// still holds it. `Ok(false)`: the job is gone (revoked, finished, wiped) or another
    /// claim holds it now: stop the handler.
    pub async fn heartbeat(&self, job: &JobKey, lease: &str) -> Result<bool, HotError> {
        let alive: i64 = self
            .inner
            .heartbeat
            .key(self.key("jobs"))
            .key(self.key("leases"))
            .arg(job.to_string())
            .arg(self.lease_ms())
            .arg(lease)
            .invoke_async(&mut self.conn())
            .await
            .map_err(rerr("heartbeat"))?;
        Ok(alive == 1)
    }

    /// Atomically append the report to the reports stream, signed with the deployment's worker
    /// secret ([`HotConfig::secret`]) if it has one, and, if it ends the attempt
    /// ([`crate::ReportOutcome::ends_attempt`]), remove the job of that attempt. Returns the
    /// stream id of the report. [`HotError::LeaseLost`] if the report names a lease
    /// ([`Report::lease`]) that no longer holds the job: nothing was written.
    pub async fn report(&self, report: &Report) -> Result<String, HotError> {
        let secret = self.inner.cfg.secret.clone();
        self.report_signed(report, secret.as_ref()).await
    }

    /// [`Hot::report`], signed with `secret` (an operator's token) instead.
    pub async fn report_signed(
        &self,
        report: &Report,
        secret: Option<&Secret>,
    ) -> Result<String, HotError> {
        let json = serde_json::to_string(report).map_err(|source| HotError::Encode {
            what: "report",
            source,
        })?;
        let mac = secret.map(|s| s.sign(json.as_bytes())).unwrap_or_default();
        let Some(lease) = report.lease.as_deref() else {
            // An operator's command: about no job, so a plain XADD (an operator's Redis user
            // needs no access to the job keys the worker's script names).
            let mut cmd = redis::cmd("XADD");
            cmd.arg(self.key("reports"))
                .arg("*")
                .arg("report")
                .arg(json);
            if !mac.is_empty() {
                cmd.arg("mac").arg(mac);
            }
            return cmd
                .query_async(&mut self.conn())
                .await
                .map_err(rerr("XADD reports"));
        };
        let id: Option<String> = self
            .inner
            .report
            .key(self.key("jobs"))
            .key(self.key("jobdata"))
            .key(self.key("claims"))
            .key(self.key("reports"))
            .key(self.key("leases"))
            .arg(report.key.to_string())
            .arg(json)
            .arg(if report.outcome.ends_attempt() {
                "1"
            } else {
                "0"
            })
            .arg(lease)
            .arg(mac)
            .invoke_async(&mut self.conn())
            .await
            .map_err(rerr("report"))?;
        id.ok_or(HotError::LeaseLost(report.key))
    }

    /// The lease token that holds each job now (`None`: no claim holds it), in one round trip:
    /// the orchestrator accepts a worker's report only from the holder of its attempt's lease.
    pub async fn leases(&self, jobs: &[JobKey]) -> Result<Vec<Option<String>>, HotError> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(self.key("leases"));
        for j in jobs {
            cmd.arg(j.to_string());
        }
        cmd.query_async(&mut self.conn())
            .await
            .map_err(rerr("HMGET leases"))
    }

    /// Revoked jobs, from the `<prefix>stop` channel: cancel the handler of each key received.
    /// The subscription is live when this returns; it resubscribes (with backoff) if the
    /// connection drops, and ends when the receiver is dropped.
    pub async fn stops(&self) -> Result<mpsc::Receiver<JobKey>, HotError> {
        let channel = self.key("stop");
        let mut pubsub = self
            .inner
            .client
            .get_async_pubsub()
            .await
            .map_err(rerr("connect for SUBSCRIBE"))?;
        pubsub
            .subscribe(&channel)
            .await
            .map_err(rerr("SUBSCRIBE stop"))?;
        let (tx, rx) = mpsc::channel(1024);
        let client = self.inner.client.clone();
        tokio::spawn(async move {
            let mut pubsub = Some(pubsub);
            let mut backoff = Duration::from_millis(50);
            loop {
                if let Some(ps) = pubsub.take() {
                    let mut messages = ps.into_on_message();
                    loop {
                        let msg = tokio::select! {
                            _ = tx.closed() => return,
                            msg = messages.next() => msg,
                        };
                        let Some(msg) = msg else { break };
                        backoff = Duration::from_millis(50);
                        let payload: String = match msg.get_payload() {
                            Ok(p) => p,
                            Err(e) => {
                                tracing::warn!(channel = %channel, error = %e, "hot tier: unreadable stop message ignored");
                                continue;
                            }
                        };
                        match payload.parse::<JobKey>() {
                            Ok(key) => {
                                if tx.send(key).await.is_err() {
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(channel = %channel, error = %e, "hot tier: bad stop message ignored")
                            }
                        }
                    }
                    tracing::warn!(channel = %channel, "hot tier: stop subscription lost; resubscribing");
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                match client.get_async_pubsub().await {
                    Ok(mut ps) => match ps.subscribe(&channel).await {
                        Ok(()) => pubsub = Some(ps),
                        Err(e) => {
                            tracing::warn!(channel = %channel, error = %e, "hot tier: SUBSCRIBE failed; retrying")
                        }
                    },
                    Err(e) => {
                        tracing::warn!(channel = %channel, error = %e, "hot tier: cannot reconnect for the stop subscription; retrying")
                    }
                }
            }
        });
        Ok(rx)
    }

    // ---------------------------------------------------------------- orchestrator side

    /// Reports with stream id after `after` (`"0"` initially), at most `count`, waiting up to
    /// `block` for the first one (zero: do not wait).
    pub async fn read_reports(
        &self,
        after: &str,
        count: usize,
        block: Duration,
    ) -> Result<Vec<Received>, HotError> {
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT").arg(count.max(1));
        if !block.is_zero() {
            cmd.arg("BLOCK").arg(block.as_millis().max(1) as u64);
        }
        cmd.arg("STREAMS").arg(self.key("reports")).arg(after);
        let reply: Option<StreamReadReply> = if block.is_zero() {
            cmd.query_async(&mut self.conn())
                .await
                .map_err(rerr("XREAD reports"))?
        } else {
            self.blocking_query("XREAD reports", Query::Cmd(&cmd), block)
                .await?
        };
        let mut out = Vec::new();
        for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
            match parse_report(&entry) {
                Ok(received) => out.push(received),
                Err(e) => {
                    tracing::warn!(id = %entry.id, error = %e, "hot tier: unreadable report skipped")
                }
            }
        }
        Ok(out)
    }

    /// Drop reports up to and including stream id `up_to` (once they are durable in the log).
    pub async fn trim_reports(&self, up_to: &str) -> Result<(), HotError> {
        let min_id = next_stream_id(up_to)?;
        redis::cmd("XTRIM")
            .arg(self.key("reports"))
            .arg("MINID")
            .arg(min_id)
            .exec_async(&mut self.conn())
            .await
            .map_err(rerr("XTRIM reports"))
    }

    // ---------------------------------------------------------------- readers

    /// The live view of a signature (counted as a hit or a miss in [`Hot::read_stats`]).
    pub async fn signature(&self, sig: SignatureId) -> Result<Option<HotSignature>, HotError> {
        let raw: Option<String> = redis::cmd("HGET")
            .arg(self.wf_key(sig.workflow))
            .arg(sig.index)
            .query_async(&mut self.conn())
            .await
            .map_err(rerr("HGET signature"))?;
        let Some(raw) = raw else {
            self.inner.misses.fetch_add(1, Ordering::Relaxed);
            return Ok(None);
        };
        self.inner.hits.fetch_add(1, Ordering::Relaxed);
        let view: NodeView = serde_json::from_str(&raw).map_err(|e| HotError::Malformed {
            what: "signature view",
            detail: format!("{sig}: {e}"),
        })?;
        Ok(Some(HotSignature {
            sig,
            name: view.name,
            kind: view.kind,
            task: view.task,
            status: view.status,
            attempt: view.attempt,
        }))
    }

    /// The last `n` events of the tail, oldest first.
    pub async fn tail(&self, n: usize) -> Result<Vec<TailEntry>, HotError> {
        let reply: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(self.key("tail"))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(n)
            .query_async(&mut self.conn())
            .await
            .map_err(rerr("XREVRANGE tail"))?;
        let mut out = Vec::with_capacity(reply.ids.len());
        for e in reply.ids.iter().rev() {
            let bad = |field: &str| HotError::Malformed {
                what: "tail entry",
                detail: format!("{}: field {field} missing or invalid", e.id),
            };
            let node: String = e.get("node").unwrap_or_default();
            out.push(TailEntry {
                position: e.get("position").ok_or_else(|| bad("position"))?,
                stream: e.get("stream").ok_or_else(|| bad("stream"))?,
                seq: e.get("seq").ok_or_else(|| bad("seq"))?,
                kind: e.get("kind").ok_or_else(|| bad("kind"))?,
                node: node.parse().ok(),
            });
        }
        Ok(out)
    }

    /// `used_memory` of the Redis server (bytes).
    pub async fn memory_used(&self) -> Result<u64, HotError> {
        let info: String = redis::cmd("INFO")
            .arg("memory")
            .query_async(&mut self.conn())
            .await
            .map_err(rerr("INFO memory"))?;
        info.lines()
            .find_map(|l| l.strip_prefix("used_memory:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| HotError::Malformed {
                what: "INFO memory",
                detail: "no used_memory line".into(),
            })
    }

    /// Signature reads answered from Redis (hits) and not found there (misses) by this handle
    /// and its clones.
    pub fn read_stats(&self) -> (u64, u64) {
        (
            self.inner.hits.load(Ordering::Relaxed),
            self.inner.misses.load(Ordering::Relaxed),
        )
    }

    /// Log position of the last projected batch (`<prefix>pos`), `None` if absent.
    pub async fn projected_position(&self) -> Result<Option<u64>, HotError> {
        redis::cmd("GET")
            .arg(self.key("pos"))
            .query_async(&mut self.conn())
            .await
            .map_err(rerr("GET pos"))
    }

    /// Delete every key under the prefix (SCAN + UNLINK). Returns how many were deleted.
    pub async fn clear(&self) -> Result<u64, HotError> {
        self.clear_except(&[]).await
    }

    /// Delete every key under the prefix except the named suffixes.
    pub(crate) async fn clear_except(&self, keep: &[&str]) -> Result<u64, HotError> {
        let keep: Vec<String> = keep.iter().map(|k| self.key(k)).collect();
        let pattern = format!("{}*", glob_escape(self.prefix()));
        let mut conn = self.conn();
        let mut cursor: u64 = 0;
        let mut deleted = 0;
        loop {
            let (next, keys): (u64, Vec<String>) = scan(cursor, &pattern)
                .query_async(&mut conn)
                .await
                .map_err(rerr("SCAN"))?;
            let doomed: Vec<&String> = keys.iter().filter(|k| !keep.contains(k)).collect();
            if !doomed.is_empty() {
                let n: u64 = redis::cmd("UNLINK")
                    .arg(&doomed)
                    .query_async(&mut conn)
                    .await
                    .map_err(rerr("UNLINK"))?;
                deleted += n;
            }
            if next == 0 {
                return Ok(deleted);
            }
            cursor = next;
        }
    }

    pub(crate) fn wf_key(&self, wf: mageflow_core::WorkflowId) -> String {
        format!("{}wf:{}", self.inner.cfg.prefix, wf.0.simple())
    }

    /// Run a blocking command on a connection of its own (a blocked command would stall every
    /// other command on the shared multiplexed connection). Connections are pooled; one that
    /// failed is dropped.
    async fn blocking_query<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        query: Query<'_>,
        block: Duration,
    ) -> Result<T, HotError> {
        let pooled = self
            .inner
            .blocking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop();
        let mut conn = match pooled {
            Some(c) => c,
            None => self
                .inner
                .client
                .get_multiplexed_async_connection_with_config(
                    &AsyncConnectionConfig::new().set_connection_timeout(CONNECT_TIMEOUT),
                )
                .await
                .map_err(rerr(op))?,
        };
        let limit = block + RESPONSE_TIMEOUT;
        let sent = async {
            match query {
                Query::Cmd(cmd) => cmd.query_async::<T>(&mut conn).await,
                Query::Pipe(pipe) => pipe.query_async::<T>(&mut conn).await,
            }
        };
        let result = match tokio::time::timeout(limit, sent).await {
            Ok(r) => r.map_err(rerr(op)),
            Err(_) => Err(HotError::Redis {
                op,
                source: RedisError::from((
                    redis::ErrorKind::IoError,
                    "no reply in time",
                    format!("{limit:?}"),
                )),
            }),
        };
        if result.is_ok() {
            let mut pool = self
                .inner
                .blocking
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if pool.len() < BLOCKING_POOL_MAX {
                pool.push(conn);
            }
        }
        result
    }
}

/// The claim script's reply: member, data, member, data, ...
fn parse_claimed(reply: &[String]) -> Result<Vec<Job>, HotError> {
    let mut jobs = Vec::with_capacity(reply.len() / 3);
    for triple in reply.chunks(3) {
        let [member, data, lease] = triple else {
            return Err(HotError::Malformed {
                what: "claim reply",
                detail: "not a whole number of (job, data, lease) triples".into(),
            });
        };
        jobs.push(Job::parse(member, data, lease)?);
    }
    Ok(jobs)
}

fn parse_report(entry: &StreamId) -> Result<Received, HotError> {
    let raw: String = entry.get("report").ok_or_else(|| HotError::Malformed {
        what: "report",
        detail: format!("{}: no report field", entry.id),
    })?;
    let mac: Option<String> = entry.get("mac");
    Received::parse(entry.id.clone(), raw, mac)
}

/// The smallest stream id after `id` (`ms-seq` or `ms`).
fn next_stream_id(id: &str) -> Result<String, HotError> {
    let bad = || HotError::Malformed {
        what: "stream id",
        detail: format!("{id:?} is not <ms>-<seq>"),
    };
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    let ms: u64 = ms.parse().map_err(|_| bad())?;
    let seq: u64 = seq.parse().map_err(|_| bad())?;
    Ok(match seq.checked_add(1) {
        Some(s) => format!("{ms}-{s}"),
        None => format!("{}-0", ms.saturating_add(1)),
    })
}

/// Delete every key under `prefix` on the Redis at `url`, over a plain blocking connection: for
/// cleanups where no async runtime can run (a `Drop`). Returns how many keys were deleted.
pub fn clear_prefix_blocking(url: &str, prefix: &str) -> Result<u64, HotError> {
    let connect_err = |source| HotError::Connect {
        url: url.to_owned(),
        source,
    };
    let client = redis::Client::open(url).map_err(connect_err)?;
    let mut conn = client
        .get_connection_with_timeout(CONNECT_TIMEOUT)
        .map_err(connect_err)?;
    let pattern = format!("{}*", glob_escape(prefix));
    let (mut cursor, mut deleted) = (0u64, 0u64);
    loop {
        let (next, keys): (u64, Vec<String>) = scan(cursor, &pattern)
            .query(&mut conn)
            .map_err(rerr("SCAN"))?;
        if !keys.is_empty() {
            let n: u64 = redis::cmd("UNLINK")
                .arg(&keys)
                .query(&mut conn)
                .map_err(rerr("UNLINK"))?;
            deleted += n;
        }
        if next == 0 {
            return Ok(deleted);
        }
        cursor = next;
    }
}

/// One step of a `SCAN` over the keys matching `pattern`.
fn scan(cursor: u64, pattern: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("SCAN");
    cmd.arg(cursor)
        .arg("MATCH")
        .arg(pattern)
        .arg("COUNT")
        .arg(1000);
    cmd
}

/// Escape glob metacharacters so the prefix matches literally in `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_ids_and_globs() {
        assert_eq!(next_stream_id("5-3").ok(), Some("5-4".to_owned()));
        assert_eq!(next_stream_id("7").ok(), Some("7-1".to_owned()));
        assert!(next_stream_id("x-1").is_err());
        assert_eq!(glob_escape("mf:a*[b]"), "mf:a\\*\\[b\\]");
    }

    #[test]
    fn job_keys_round_trip() {
        let sig = SignatureId {
            workflow: mageflow_core::WorkflowId::from_u128(0xabc),
            index: 3,
        };
        let key = JobKey { sig, attempt: 2 };
        assert_eq!(key.to_string().parse::<JobKey>().ok(), Some(key));
        assert!("sig_zz.1#1".parse::<JobKey>().is_err());
        assert!(format!("{sig}").parse::<JobKey>().is_err());
    }
}
