//! The projector: tails the event log and writes the hot state, one `MULTI`/`EXEC` per batch
//! with the batch's last position, so it applies every event exactly once across restarts.

use crate::hot::rerr;
use crate::{Hot, HotError, JobData, JobKey, NodeView};
use mageflow_core::{
    Effect, Event, KindSpec, Link, Node, Payload, Role, Workflow, WorkflowId, PRIORITY_MAX,
    PRIORITY_MIN,
};
use mageflow_store::{EventLog, Recorded};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Events per batch (one `read_all` chunk, one transaction).
const BATCH: usize = 4096;
/// How often an idle projector checks that its position is still in Redis.
const IDLE_CHECK: Duration = Duration::from_millis(200);
/// How long a position check sent right after a batch stands in for the next step's own.
const PREWATCH_FOR: Duration = Duration::from_millis(100);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Wake tokens kept at most (one per job added, up to this).
const WAKE_MAX: usize = 64;
/// Keys a rebuild keeps: worker reports are not derived from the log.
const KEEP_ON_REBUILD: &[&str] = &["reports"];

/// Counters of a projector (shared, lock-free).
#[derive(Debug, Default)]
pub struct ProjectorStats {
    /// Events written to Redis (re-projections after a rebuild count again).
    pub events: AtomicU64,
    /// Transactions committed.
    pub batches: AtomicU64,
    /// Rebuilds from position 1 (on demand or because the hot state vanished).
    pub rebuilds: AtomicU64,
    /// Last projected log position.
    pub position: AtomicU64,
}

/// Projects the event log into the hot tier. The only writer of hot state.
pub struct Projector {
    hot: Hot,
    log: Arc<dyn EventLog>,
    /// Unfinished workflows (finished ones are dropped once their final state is written and
    /// reloaded from the log if an event for them comes later).
    wfs: HashMap<WorkflowId, Workflow>,
    /// Last position written to Redis, valid when `synced`.
    pos: u64,
    /// `wfs` and `pos` match what Redis holds. False at start and after a failed batch.
    synced: bool,
    stats: Arc<ProjectorStats>,
    /// The projector's own connection, never reconnected behind its back: the position check
    /// (WATCH + GET) and the batch (MULTI/EXEC) of a step go over one TCP connection, so a
    /// Redis restarted or flushed in between aborts the batch instead of landing it, with a
    /// plausible `pos`, on an empty server. Dropped on any error; the next step opens another.
    conn: Option<redis::aio::MultiplexedConnection>,
    /// The position check of the next step, already made on `conn` (WATCH still armed): sent
    /// with the last batch, or left by a step that found nothing to project. (stored `pos`,
    /// Redis time in ms, when.)
    prewatched: Option<(Option<u64>, u64, std::time::Instant)>,
}

/// What a batch touched in one workflow.
#[derive(Default)]
struct Touched {
    nodes: BTreeSet<u32>,
    all: bool,
    /// Reloaded from the log (it had finished earlier): write it whole, lift its expiry.
    reloaded: bool,
}

impl Projector {
    pub fn new(hot: Hot, log: Arc<dyn EventLog>) -> Self {
        Self {
            hot,
            log,
            wfs: HashMap::new(),
            pos: 0,
            synced: false,
            stats: Arc::new(ProjectorStats::default()),
            conn: None,
            prewatched: None,
        }
    }

    pub fn stats(&self) -> Arc<ProjectorStats> {
        self.stats.clone()
    }

    /// Last position this projector wrote (0 before its first batch).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Tail the log until `stop` is cancelled. Redis errors and log read errors are logged and
    /// retried with exponential backoff (capped at 2 s); a vanished `<prefix>pos` triggers a
    /// rebuild from position 1.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), HotError> {
        let mut head = self.log.subscribe();
        let mut backoff = BACKOFF_MIN;
        loop {
            if stop.is_cancelled() {
                return Ok(());
            }
            let step = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = self.step() => r,
            };
            match step {
                Ok(true) => backoff = BACKOFF_MIN,
                Ok(false) => {
                    backoff = BACKOFF_MIN;
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        changed = head.changed() => {
                            if changed.is_err() {
                                tokio::time::sleep(IDLE_CHECK).await;
                            }
                        }
                        // The idle check: a position check of its own.
                        _ = tokio::time::sleep(IDLE_CHECK) => self.prewatched = None,
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        prefix = %self.hot.prefix(),
                        position = self.pos,
                        retry_in_ms = backoff.as_millis() as u64,
                        "hot projector: {e}; retrying"
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    /// Rebuild from scratch: clear the prefix (worker reports are kept) and project from
    /// position 1 up to the head as of the call, calling `progress(done, head)` after each batch.
    /// Returns the last projected position.
    pub async fn rebuild(&mut self, mut progress: impl FnMut(u64, u64)) -> Result<u64, HotError> {
        self.reset_hot(true).await?;
        let head = self.log.head();
        progress(self.pos, head);
        while self.pos < head {
            if !self.step().await? {
                break;
            }
            progress(self.pos, head.max(self.pos));
        }
        Ok(self.pos)
    }

    /// Clear the projection and the in-memory state; the next batch starts at position 1.
    async fn reset_hot(&mut self, count: bool) -> Result<(), HotError> {
        self.synced = false;
        self.hot.clear_except(KEEP_ON_REBUILD).await?;
        self.wfs.clear();
        self.pos = 0;
        self.synced = true;
        if count {
            self.stats.rebuilds.fetch_add(1, Ordering::Relaxed);
        }
        self.stats.position.store(0, Ordering::Relaxed);
        Ok(())
    }

    /// Check the position in Redis, then project the next batch. `Ok(false)`: nothing new.
    async fn step(&mut self) -> Result<bool, HotError> {
        let result = self.step_on_own_connection().await;
        if result.is_err() {
            self.conn = None;
            self.prewatched = None;
        }
        result
    }

    async fn step_on_own_connection(&mut self) -> Result<bool, HotError> {
        let mut conn = match self.conn.take() {
            Some(c) => c,
            None => self
                .hot
                .client()
                .get_multiplexed_async_connection()
                .await
                .map_err(rerr("connect (projector)"))?,
        };
        self.conn = Some(conn.clone());
        // Any change to `pos` from the WATCH to EXEC (FLUSHALL, another projector) aborts the
        // batch. The check sent with the previous batch serves if it is recent (one round trip
        // less on the path of every task).
        let (stored, now_ms) = match self.prewatched.take() {
            Some((stored, now_ms, at)) if at.elapsed() < PREWATCH_FOR => (stored, now_ms),
            _ => check_position(&self.hot, &mut conn).await?,
        };
        match stored {
            None if self.synced && self.pos == 0 => {}
            None => {
                // Something was projected before (synced or not): Redis lost it.
                let lost = self.pos > 0;
                if lost {
                    tracing::warn!(
                        prefix = %self.hot.prefix(),
                        position = self.pos,
                        "hot projector: {}pos vanished (Redis flushed or restarted?); rebuilding the hot state from position 1",
                        self.hot.prefix()
                    );
                } else {
                    tracing::info!(prefix = %self.hot.prefix(), "hot projector: no projected position; projecting from position 1");
                }
                self.reset_hot(lost).await?;
            }
            Some(p) if self.synced && p == self.pos => {}
            Some(p) => {
                if self.synced {
                    tracing::warn!(
                        prefix = %self.hot.prefix(),
                        ours = self.pos,
                        stored = p,
                        "hot projector: {}pos changed under us (another projector?); resynchronizing",
                        self.hot.prefix()
                    );
                }
                if p > self.log.head() {
                    tracing::warn!(
                        prefix = %self.hot.prefix(),
                        stored = p,
                        head = self.log.head(),
                        "hot projector: Redis is ahead of the log; rebuilding from position 1"
                    );
                    self.reset_hot(true).await?;
                } else {
                    self.refold(p)?;
                }
            }
        }

        let events = self.log.read_all(self.pos + 1, BATCH)?;
        let Some(last) = events.last().map(|r| r.position) else {
            // The WATCH stays armed: the check stands for the next step (if soon enough).
            self.prewatched = Some((stored, now_ms, std::time::Instant::now()));
            return Ok(false);
        };
        let n = events.len() as u64;
        // The in-memory states move ahead of Redis now; they are only right again once the
        // transaction committed (else the next step refolds up to what Redis holds).
        self.synced = false;
        // The batch, then the next step's position check, in one pipeline: EXEC ends this
        // WATCH, the next WATCH starts right after it.
        let mut pipe = self.plan(events, now_ms)?;
        pipe.cmd("WATCH").arg(self.hot.key("pos")).ignore();
        pipe.cmd("GET").arg(self.hot.key("pos"));
        pipe.cmd("TIME");
        type Replies = (redis::Value, Option<u64>, (u64, u64));
        let (reply, stored_next, (secs, micros)): Replies = pipe
            .query_async(&mut conn)
            .await
            .map_err(rerr("MULTI/EXEC batch"))?;
        let next = (stored_next, secs * 1000 + micros / 1000);
        if matches!(reply, redis::Value::Nil) {
            // `pos` changed after the check: nothing of the batch was applied; the next step
            // looks again (and rebuilds if the hot state is gone).
            tracing::warn!(prefix = %self.hot.prefix(), "hot projector: the position changed under a batch; it was not applied");
            return Ok(true);
        }
        self.pos = last;
        self.synced = true;
        self.prewatched = Some((next.0, next.1, std::time::Instant::now()));
        self.stats.events.fetch_add(n, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.stats.position.store(last, Ordering::Relaxed);
        Ok(true)
    }

    /// Rebuild the in-memory workflow states by folding positions 1..=`to` (no Redis writes).
    fn refold(&mut self, to: u64) -> Result<(), HotError> {
        self.wfs.clear();
        let mut next = 1;
        while next <= to {
            let chunk = self
                .log
                .read_all(next, BATCH.min((to - next + 1) as usize))?;
            if chunk.is_empty() {
                break;
            }
            for rec in chunk {
                next = rec.position + 1;
                let event = rec.event;
                let id = event.stream;
                // The system stream (engine records such as resume reports) is no workflow.
                if id.is_system() {
                    continue;
                }
                let wf = self
                    .wfs
                    .entry(id)
                    .or_insert_with(|| Workflow::empty(event.stream));
                // Finished workflows were dropped: one that comes back (rerun, deletion) is
                // reloaded from its stream.
                if wf.version + 1 != event.seq {
                    *wf = load_until(&*self.log, id, event.seq)?;
                }
                if let Err(e) = apply(wf, event) {
                    tracing::warn!(workflow = %id, position = next - 1, error = %e, "hot projector: event does not apply; skipped");
                }
                if wf.is_finished() {
                    self.wfs.remove(&id);
                }
            }
        }
        self.pos = to;
        self.synced = true;
        self.stats.position.store(to, Ordering::Relaxed);
        Ok(())
    }

    /// Fold a batch into the in-memory states and build its transaction.
    fn plan(&mut self, events: Vec<Recorded>, now_ms: u64) -> Result<redis::Pipeline, HotError> {
        let hot = &self.hot;
        let cfg = hot.config();
        let (tail, jobs, jobdata, claims, leases, stop) = (
            hot.key("tail"),
            hot.key("jobs"),
            hot.key("jobdata"),
            hot.key("claims"),
            hot.key("leases"),
            hot.key("stop"),
        );
        // MULTI/EXEC written out rather than `atomic()`: the next step's position check follows
        // EXEC in the same pipeline (see `step_on_own_connection`).
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI").ignore();
        let mut touched: BTreeMap<WorkflowId, Touched> = BTreeMap::new();
        let mut jobs_added = 0usize;
        let mut last = 0;
        for rec in events {
            let Recorded { position, event } = rec;
            last = position;
            let id = event.stream;
            // The system stream (engine records such as resume reports) is no workflow: nothing
            // of it is projected, not even into the tail.
            if id.is_system() {
                continue;
            }
            let node = event.payload.node();
            pipe.cmd("XADD")
                .arg(&tail)
                .arg("MAXLEN")
                .arg("~")
                .arg(cfg.tail_len)
                .arg(format!("{position}-0"))
                .arg("position")
                .arg(position)
                .arg("stream")
                .arg(id.to_string())
                .arg("seq")
                .arg(event.seq)
                .arg("kind")
                .arg(event.payload.kind())
                .arg("node")
                .arg(node.map(|n| n.to_string()).unwrap_or_default())
                .ignore();

            let mut reloaded = false;
            let wf = match self.wfs.get_mut(&id) {
                Some(wf) if wf.version + 1 == event.seq => wf,
                _ => {
                    reloaded = event.seq > 1;
                    let wf = load_until(&*self.log, id, event.seq)?;
                    // Attempts in flight there may have been started by events this projector
                    // never saw: the old history of a running workflow is compacted into the
                    // archive, and a rebuild reads only the live log (`read_all`). Their jobs go
                    // on the queue as their `started` events would have put them — unless the
                    // queue has them already (claimed by a worker, say).
                    for (i, n) in wf.nodes.iter().enumerate() {
                        if n.in_flight {
                            let (i, attempt) = (i as u32, n.attempt);
                            add_job(&mut pipe, &jobs, &jobdata, &wf, i, attempt, now_ms, true)?;
                            jobs_added += 1;
                        }
                    }
                    self.wfs.entry(id).insert_entry(wf).into_mut()
                }
            };
            let before = node
                .and_then(|i| wf.node(i))
                .map(|n| (n.in_flight, n.attempt));
            let len_before = wf.nodes.len();
            // What the event asks of the workers (the core works it out, as for the engine).
            let (revoke, started) = Effect::for_workers(&event);
            let whole = matches!(
                event.payload,
                Payload::WorkflowCreated { .. }
                    | Payload::MarkedForDeletion { .. }
                    | Payload::Restored { .. }
                    | Payload::Rerun { .. }
                    | Payload::Purged { .. }
            ) || changes_many(wf, &event.payload);
            if let Err(e) = apply(wf, event) {
                tracing::warn!(workflow = %id, position, error = %e, "hot projector: event does not apply; skipped");
                continue;
            }
            let t = touched.entry(id).or_default();
            t.reloaded |= reloaded;
            t.all |= whole;
            t.nodes.extend(node);
            t.nodes.extend(len_before as u32..wf.nodes.len() as u32);

            let Some(i) = node else { continue };
            let Some(after) = wf.node(i) else { continue };
            let sig = wf.sig(i);
            if let Some((true, old)) = before {
                if !after.in_flight || after.attempt != old {
                    let member = JobKey { sig, attempt: old }.to_string();
                    pipe.cmd("ZREM").arg(&jobs).arg(&member).ignore();
                    pipe.cmd("HDEL").arg(&jobdata).arg(&member).ignore();
                    pipe.cmd("HDEL").arg(&claims).arg(&member).ignore();
                    // The attempt is over: no report of it counts any more.
                    pipe.cmd("HDEL").arg(&leases).arg(&member).ignore();
                    if revoke {
                        pipe.cmd("PUBLISH").arg(&stop).arg(&member).ignore();
                    }
                }
            }
            if let Some(attempt) = started {
                add_job(&mut pipe, &jobs, &jobdata, wf, i, attempt, now_ms, false)?;
                jobs_added += 1;
            }
        }

        for (id, t) in touched {
            let Some(wf) = self.wfs.get(&id) else {
                continue;
            };
            let wf_key = hot.wf_key(id);
            let write_all = t.all || t.reloaded;
            let indexes: Vec<u32> = if write_all {
                (0..wf.nodes.len() as u32).collect()
            } else {
                t.nodes.iter().copied().collect()
            };
            let mut swarms = BTreeSet::new();
            let mut hset = redis::cmd("HSET");
            hset.arg(&wf_key);
            let mut fields = 0;
            for &i in &indexes {
                let Some(n) = wf.node(i) else { continue };
                let view = node_view(n);
                let view = serde_json::to_string(&view).map_err(|source| HotError::Encode {
                    what: "signature view",
                    source,
                })?;
                hset.arg(i).arg(view);
                fields += 1;
                if matches!(n.spec.kind, KindSpec::Swarm { .. }) {
                    swarms.insert(i);
                }
                if let Some(Link {
                    node: p,
                    role: Role::Child,
                }) = n.spec.parent
                {
                    if wf
                        .node(p)
                        .is_some_and(|p| matches!(p.spec.kind, KindSpec::Swarm { .. }))
                    {
                        swarms.insert(p);
                    }
                }
            }
            if fields > 0 {
                pipe.add_command(hset).ignore();
            }
            for &s in &swarms {
                let Some(n) = wf.node(s) else { continue };
                pipe.cmd("HSET")
                    .arg(hot.key(&format!("swarm:{}", wf.sig(s))))
                    .arg("dispatched")
                    .arg(n.swarm.dispatched)
                    .arg("running")
                    .arg(n.swarm.running)
                    .arg("succeeded")
                    .arg(n.swarm.succeeded)
                    .arg("failed")
                    .arg(n.swarm.failed)
                    .ignore();
            }
            let all_swarm_keys = || {
                wf.nodes
                    .iter()
                    .enumerate()
                    .filter(|(_, n)| matches!(n.spec.kind, KindSpec::Swarm { .. }))
                    .map(|(i, _)| hot.key(&format!("swarm:{}", wf.sig(i as u32))))
            };
            if wf.is_finished() {
                let kind = wf.root().map_or("task", |r| r.spec.kind.name());
                let ttl_ms = cfg.done_ttl_for(kind).as_millis().max(1) as u64;
                pipe.cmd("PEXPIRE").arg(&wf_key).arg(ttl_ms).ignore();
                for k in all_swarm_keys() {
                    pipe.cmd("PEXPIRE").arg(k).arg(ttl_ms).ignore();
                }
                self.wfs.remove(&id);
            } else if t.reloaded {
                pipe.cmd("PERSIST").arg(&wf_key).ignore();
                for k in all_swarm_keys() {
                    pipe.cmd("PERSIST").arg(k).ignore();
                }
            }
        }

        if jobs_added > 0 {
            let wake = hot.key("wake");
            let mut push = redis::cmd("LPUSH");
            push.arg(&wake);
            for _ in 0..jobs_added.min(WAKE_MAX) {
                push.arg(1);
            }
            pipe.add_command(push).ignore();
            pipe.cmd("LTRIM")
                .arg(&wake)
                .arg(0)
                .arg(WAKE_MAX - 1)
                .ignore();
        }
        pipe.cmd("SET").arg(hot.key("pos")).arg(last).ignore();
        pipe.cmd("EXEC");
        Ok(pipe)
    }
}

/// Apply `event` to the projector's copy of a workflow, without the result of a `succeeded`
/// event: the projector never reads one (views show statuses; jobs carry inputs and
/// checkpoints), and a swarm's result holds every item's, a gigabyte for a million items.
fn apply(wf: &mut Workflow, mut event: Event) -> Result<(), mageflow_core::ApplyError> {
    if let Payload::Succeeded { result, .. } = &mut event.payload {
        *result = serde_json::Value::Null;
    }
    wf.apply_owned(event)
}

/// WATCH `pos`, then read it and Redis's clock (ms): the check that starts every step.
async fn check_position(
    hot: &Hot,
    conn: &mut redis::aio::MultiplexedConnection,
) -> Result<(Option<u64>, u64), HotError> {
    let (stored, (secs, micros)): (Option<u64>, (u64, u64)) = redis::pipe()
        .cmd("WATCH")
        .arg(hot.key("pos"))
        .ignore()
        .cmd("GET")
        .arg(hot.key("pos"))
        .cmd("TIME")
        .query_async(conn)
        .await
        .map_err(rerr("WATCH/GET pos"))?;
    Ok((stored, secs * 1000 + micros / 1000))
}

/// How far back (ms) one step of priority moves a new job in `jobs`: more than the age of any
/// job waiting there, so priority comes first and the order of addition second (2^32 ms is 49
/// days; the full range of priorities spans 2^43 ms, within an `f64` score's exact integers).
pub const PRIORITY_SPAN_MS: i64 = 1 << 32;

/// The score of a new job of `priority` added at `now_ms`: due now, ahead of every job of a
/// lower priority.
fn job_score(now_ms: u64, priority: i32) -> i64 {
    let steps = i64::from(priority.clamp(PRIORITY_MIN, PRIORITY_MAX) - PRIORITY_MIN);
    now_ms as i64 - steps * PRIORITY_SPAN_MS
}

/// Queue the job of attempt `attempt` of node `i` (it is in flight in `wf`); `if_absent`: leave
/// a job already queued or claimed as it is.
#[allow(clippy::too_many_arguments)]
fn add_job(
    pipe: &mut redis::Pipeline,
    jobs: &str,
    jobdata: &str,
    wf: &Workflow,
    i: u32,
    attempt: u32,
    now_ms: u64,
    if_absent: bool,
) -> Result<(), HotError> {
    let Some(node) = wf.node(i) else {
        return Ok(());
    };
    let member = JobKey {
        sig: wf.sig(i),
        attempt,
    }
    .to_string();
    let data = JobData {
        task: node.spec.task_name().unwrap_or_default().to_owned(),
        input: wf.effective_input(i),
        checkpoint: node.checkpoint.clone(),
    };
    let data = serde_json::to_string(&data).map_err(|source| HotError::Encode {
        what: "job data",
        source,
    })?;
    let (zadd, hset) = if if_absent {
        (&["NX"][..], "HSETNX")
    } else {
        (&[][..], "HSET")
    };
    pipe.cmd("ZADD")
        .arg(jobs)
        .arg(zadd)
        .arg(job_score(now_ms, wf.priority(i)))
        .arg(&member)
        .ignore();
    pipe.cmd(hset).arg(jobdata).arg(&member).arg(data).ignore();
    Ok(())
}

/// The state of workflow `id` just before its event `seq` (read from the log).
fn load_until(log: &dyn EventLog, id: WorkflowId, seq: u64) -> Result<Workflow, HotError> {
    let mut wf = Workflow::empty(id);
    if seq <= 1 {
        return Ok(wf);
    }
    for event in log.read_stream(id, 1)? {
        if event.seq >= seq {
            break;
        }
        if let Err(e) = apply(&mut wf, event) {
            tracing::warn!(workflow = %id, error = %e, "hot projector: event does not apply while reloading; skipped");
        }
    }
    Ok(wf)
}

/// Whether a graph's routing changes more than the graph's own view: a node skipped (with
/// everything inside it) or a loop run again (its nodes back to pending). Rare; every view of
/// the workflow is written then.
fn changes_many(wf: &Workflow, payload: &Payload) -> bool {
    let Payload::GraphRouted {
        graph,
        decisions,
        skipped,
        ..
    } = payload
    else {
        return false;
    };
    let loops = |e: u32| match wf.node(*graph).map(|g| &g.spec.kind) {
        Some(KindSpec::Graph { edges, .. }) => edges
            .get(e as usize)
            .is_some_and(|e| e.max_iterations.is_some()),
        _ => false,
    };
    *skipped || decisions.iter().any(|d| d.taken && loops(d.edge))
}

fn node_view(n: &Node) -> NodeView {
    NodeView {
        name: n.spec.name.clone(),
        kind: n.spec.kind.name().to_owned(),
        task: n.spec.task_name().map(str::to_owned),
        status: n.visible_status().name().to_owned(),
        attempt: n.attempt,
    }
}

#[cfg(test)]
mod tests {
    use super::apply;
    use mageflow_core::{
        execute, Actor, Command, Message, NodeSpec, Op, Outcome, Status, Timestamp, Workflow,
        WorkflowId,
    };
    use serde_json::{json, Value};

    #[test]
    fn the_projected_state_keeps_statuses_but_no_results() {
        let id = WorkflowId::from_u128(7);
        let (mut truth, mut projected) = (Workflow::empty(id), Workflow::empty(id));
        let result = json!({ "items": [1, 2, 3] });
        let ops = [
            Op::Create {
                nodes: vec![NodeSpec::task("t")],
                start: Some(Message::input(json!({}))),
            },
            Op::Start { node: 0 },
            Op::Complete {
                node: 0,
                attempt: 1,
                result: result.clone(),
            },
        ];
        for (i, op) in ops.into_iter().enumerate() {
            let cmd = Command {
                actor: Actor::api("test"),
                at: Timestamp::from_micros(i as i64 + 1),
                op,
            };
            let events = execute(&mut truth, &cmd).expect("decided");
            for event in events {
                apply(&mut projected, event).expect("applies");
            }
        }
        assert_eq!(truth.nodes[0].outcome, Some(Outcome::Ok(result)));
        assert_eq!(projected.version, truth.version);
        assert_eq!(projected.nodes[0].status, Status::Done);
        assert_eq!(projected.nodes[0].outcome, Some(Outcome::Ok(Value::Null)));
    }
}
