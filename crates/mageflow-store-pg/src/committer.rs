//! The committer: the one task of a process that writes the log. It takes every waiting call,
//! checks versions (cached, or read under the head row lock), writes the accepted calls (one
//! statement from arrays, or one binary `COPY`), moves the head only if it is where the group
//! expects, notifies, commits, and only then answers; while one group commits, the next may be
//! written on a second connection and committed right after it (see the crate doc). It owns two
//! connections at most, each replaced after a connection error; it never answers `Ok` for a
//! transaction that did not commit.

use crate::copy::{copy_statement, CopyData, Tuples};
use crate::{is_connection_error, Backoff, PgOptions, Shared, GROUP_BYTES_MAX, GROUP_EVENTS_MAX};
use mageflow_core::WorkflowId;
use mageflow_store::{Error, Result};
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, Executor, PgConnection, Row};
use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
use uuid::Uuid;

/// One request of a call, validated and encoded.
pub(crate) struct Prepared {
    pub stream: WorkflowId,
    pub expected: u64,
    pub tuples: Tuples,
}

/// One `append` call.
pub(crate) struct Job {
    pub requests: Vec<Prepared>,
    /// The error of the first malformed request (the call is refused after the requests before
    /// it are version-checked).
    pub invalid: Option<Error>,
    pub events: usize,
    pub bytes: usize,
    pub reply: oneshot::Sender<Result<Vec<u64>>>,
}

/// BEGIN and take the head row lock; the transaction id is what an unknown outcome is resolved
/// by. One round trip (simple query protocol).
const LOCK_HEAD: &str =
    "BEGIN; SELECT position, txid_current() AS xid FROM mageflow_head FOR UPDATE";
/// Current version of each stream, read after the lock is held (a fresh snapshot): the greater
/// of its last live seq and its last archived seq (`PgLog::compact` moves a stream's oldest
/// events to `mageflow_archive`; a stream whose events are all archived keeps its version).
/// One statement, so one snapshot: a concurrent compaction is seen whole or not at all, and
/// either way the version is the same.
const VERSIONS: &str = "SELECT s.stream, GREATEST(\
                        COALESCE((SELECT max(e.seq) FROM mageflow_events e \
                        WHERE e.stream = s.stream), 0), \
                        COALESCE((SELECT max(a.last_seq) FROM mageflow_archive a \
                        WHERE a.stream = s.stream), 0)) \
                        FROM unnest($1::uuid[]) AS s(stream)";

/// The last version of every stream written at positions `(from, to]`: what other processes
/// committed since this committer last held the lock. Those rows may have been compacted away
/// since (by any process): an archive row whose highest archived position lies in the range
/// holds the version its events reached, so both are read (in one statement, one snapshot).
/// Compaction never moves an event above the head read under the lock, so an archive row's
/// last position in `(from, to]` is exactly "some event of that range was archived".
const FOREIGN_VERSIONS: &str = "SELECT stream, max(seq) FROM (\
                                SELECT stream, seq FROM mageflow_events \
                                WHERE position > $1 AND position <= $2 \
                                UNION ALL \
                                SELECT stream, last_seq FROM mageflow_archive \
                                WHERE last_position > $1 AND last_position <= $2\
                                ) AS written GROUP BY stream";
/// Streams whose versions the committer remembers between groups; past this it forgets them all.
pub const VERSION_CACHE_STREAMS_MAX: usize = 256 * 1024;
/// Most events of other processes' commits the committer reads to keep its version cache; past
/// this it forgets the cache instead.
pub const CATCH_UP_EVENTS_MAX: u64 = 64 * 1024;

/// Stream versions as of log position `at`, kept by the committer between groups so that
/// checking a group's versions does not cost an index probe per stream. Valid only while the
/// head row still says `at` when the lock is taken again: any other process's commit moves it,
/// and its effect on versions is then read back by position (or the cache is dropped).
#[derive(Default)]
pub(crate) struct VersionCache {
    at: Option<u64>,
    versions: HashMap<Uuid, u64>,
}

impl VersionCache {
    /// The versions after a group that committed up to position `end`, while the cache was
    /// valid as of the group's start (every entry is then exact as of `end`; a cache that was
    /// not, forgets the rest).
    fn learn(&mut self, start: u64, versions: HashMap<Uuid, u64>, end: u64) {
        if self.at != Some(start)
            || self.versions.len() + versions.len() > VERSION_CACHE_STREAMS_MAX
        {
            self.versions.clear();
        }
        self.versions.extend(versions);
        self.at = Some(end);
    }
}

/// One try at committing a group.
enum Attempt {
    /// Committed (or nothing to write: `end` is `None`). Outcomes per job; the requests
    /// written, as (job, request, first position).
    Done {
        outcomes: Vec<Result<Vec<u64>>>,
        end: Option<u64>,
        written: Vec<(usize, usize, u64)>,
    },
    /// The connection failed before COMMIT was sent: nothing was written; try again.
    Retry {
        step: &'static str,
        error: sqlx::Error,
    },
    /// PostgreSQL refused the transaction (not a connection problem): nothing was written and
    /// trying again would fail the same way.
    Failed(Error),
    /// The connection failed while COMMIT was in flight: the group may have committed.
    InDoubt {
        by: Resolve,
        outcomes: Vec<Result<Vec<u64>>>,
        end: u64,
        error: String,
    },
}

/// How an in-doubt commit's outcome is found.
#[derive(Debug)]
enum Resolve {
    /// `txid_status` of the transaction id taken under the head lock.
    Xid(i64),
    /// A one-statement commit has no transaction id the committer knows: once the session that
    /// ran it is gone (its statement either committed or was rolled back), whether the group's
    /// first row is there. (Compaction only moves a running workflow's older events, never the
    /// newest ones, so a row just committed is still live.)
    Row {
        backend: Backend,
        position: u64,
        stream: Uuid,
        seq: u64,
    },
}

/// A server session: process id and start time (a pid alone can be reused).
#[derive(Clone, Debug)]
struct Backend {
    pid: i32,
    started: String,
}

/// One statement, in autocommit, for a group whose stream versions the committer knows as of
/// head `$1`: moves the head to `$2` only if it is still `$1` (the row lock serialises it with
/// every other committer), writes the rows only if it moved, and notifies. One row back if it
/// committed (with the rows written); none if another process had committed since: nothing was
/// written, and the group goes the long way.
const FAST_COMMIT: &str = "WITH moved AS (\
                           UPDATE mageflow_head SET position = $2 WHERE position = $1 \
                           RETURNING position), \
                           written AS (\
                           INSERT INTO mageflow_events (position, stream, seq, payload, crc32) \
                           SELECT * FROM unnest($3::bigint[], $4::uuid[], $5::bigint[], \
                           $6::bytea[], $7::int[]) WHERE EXISTS (SELECT 1 FROM moved) \
                           RETURNING 1), \
                           notified AS (SELECT pg_notify($8, $2::text) FROM moved) \
                           SELECT (SELECT count(*) FROM written), \
                           (SELECT count(*) FROM notified) FROM moved";
/// Groups of at most this many events take [`FAST_COMMIT`] when they can (one round trip
/// instead of four); larger ones are written faster by `COPY`.
pub const FAST_COMMIT_EVENTS_MAX: usize = 1024;

/// How long a pipelined group's open transaction may wait for the commit in flight before it
/// is rolled back (see [`Committer::run`]); a commit takes a few milliseconds.
const NEXT_HOLD_MAX: Duration = Duration::from_millis(250);

/// A group being committed on a task of its own, with the connection it took.
struct Flight<T> {
    jobs: Vec<Job>,
    group: FastGroup,
    backend: Backend,
    task: tokio::task::JoinHandle<(Option<PgConnection>, std::result::Result<T, sqlx::Error>)>,
    /// Fires when the group's `COPY` is over (pipelined groups; `None` once it has, or when
    /// the commit has none).
    copied: Option<oneshot::Receiver<()>>,
    /// Written by `COPY` behind another group (else: one statement).
    pipelined: bool,
}

/// `first` and every call waiting behind it, up to a group's limits.
fn gather(first: Job, rx: &mut mpsc::UnboundedReceiver<Job>) -> Vec<Job> {
    let (mut events, mut bytes) = (first.events, first.bytes);
    let mut jobs = vec![first];
    while events < GROUP_EVENTS_MAX && bytes < GROUP_BYTES_MAX {
        match rx.try_recv() {
            Ok(job) => {
                events += job.events;
                bytes += job.bytes;
                jobs.push(job);
            }
            Err(_) => break,
        }
    }
    jobs
}

/// Roll back a pipelined group's transaction (by dropping its connection) and give back its
/// calls, unanswered.
async fn abandon(shared: &Shared, mut n: Flight<()>) -> Vec<Job> {
    shared
        .counters
        .pipeline_rollbacks
        .fetch_add(1, Ordering::Relaxed);
    n.task.abort();
    // Either the task ended (its connection is in the result, dropped here) or it was aborted
    // (and dropped it).
    let _ = (&mut n.task).await;
    n.jobs
}

/// A group staged against versions the committer knows without asking the server.
struct FastGroup {
    outcomes: Vec<Result<Vec<u64>>>,
    /// Versions after the group, for every stream of the group.
    versions: HashMap<Uuid, u64>,
    /// (job, request, first position) of every request, in position order.
    writes: Vec<(usize, usize, u64)>,
    /// The head the group follows, and its last position.
    start: u64,
    end: u64,
}

impl FastGroup {
    /// How the outcome is found if the answer is lost: the group's first row, once the session
    /// `backend` is gone.
    fn resolve_by(&self, backend: Backend, jobs: &[Job]) -> Resolve {
        let (j, r, position) = self.writes[0];
        let req = &jobs[j].requests[r];
        Resolve::Row {
            backend,
            position,
            stream: req.stream.0,
            seq: req.expected + 1,
        }
    }
}

/// How a fast or pipelined commit ended, when the server answered.
enum Landed {
    Committed,
    /// The head was not where the group expected: nothing was written.
    NotWritten,
    /// Committed a different number of rows than the group has (never expected).
    Miswritten(i64),
}

/// [`FAST_COMMIT`] with its arguments, owned (it can run on a spawned task).
struct FastStatement {
    start: i64,
    end: i64,
    positions: Vec<i64>,
    streams: Vec<Uuid>,
    seqs: Vec<i64>,
    payloads: Vec<Vec<u8>>,
    crcs: Vec<i32>,
    channel: String,
}

impl FastStatement {
    fn new(jobs: &[Job], group: &FastGroup, channel: &str) -> Self {
        let rows = (group.end - group.start) as usize;
        let mut st = FastStatement {
            start: group.start as i64,
            end: group.end as i64,
            positions: Vec::with_capacity(rows),
            streams: Vec::with_capacity(rows),
            seqs: Vec::with_capacity(rows),
            payloads: Vec::with_capacity(rows),
            crcs: Vec::with_capacity(rows),
            channel: channel.to_owned(),
        };
        for &(j, r, first) in &group.writes {
            let req = &jobs[j].requests[r];
            for (i, (payload, crc)) in req.tuples.rows().enumerate() {
                st.positions.push((first + i as u64) as i64);
                st.streams.push(req.stream.0);
                st.seqs.push((req.expected + 1 + i as u64) as i64);
                st.payloads.push(payload.to_vec());
                st.crcs.push(crc);
            }
        }
        st
    }

    async fn run(&self, conn: &mut PgConnection) -> Result<Landed, sqlx::Error> {
        let answer = sqlx::query_as::<_, (i64, i64)>(FAST_COMMIT)
            .bind(self.start)
            .bind(self.end)
            .bind(&self.positions)
            .bind(&self.streams)
            .bind(&self.seqs)
            .bind(&self.payloads)
            .bind(&self.crcs)
            .bind(&self.channel)
            .fetch_optional(conn)
            .await?;
        Ok(match answer {
            None => Landed::NotWritten,
            Some((written, _)) if written == self.end - self.start => Landed::Committed,
            Some((written, _)) => Landed::Miswritten(written),
        })
    }
}

/// A group's accepted requests and the answers to its calls.
struct Staged {
    outcomes: Vec<Result<Vec<u64>>>,
    /// Versions after the accepted calls, for every stream of the group.
    versions: HashMap<Uuid, u64>,
    /// (job, request, first position) of every accepted request, in position order.
    writes: Vec<(usize, usize, u64)>,
    end: u64,
}

/// Check every call against the stream versions read under the lock, in call order, as if
/// applied one after the other; a refused call changes nothing.
fn stage(jobs: &[Job], mut versions: HashMap<Uuid, u64>, start: u64) -> Staged {
    let mut outcomes = Vec::with_capacity(jobs.len());
    let mut writes = Vec::new();
    let mut next = start + 1;
    for (j, job) in jobs.iter().enumerate() {
        let mut local: HashMap<Uuid, u64> = HashMap::new();
        let mut refusal = None;
        for req in &job.requests {
            let key = req.stream.0;
            let actual = local
                .get(&key)
                .or_else(|| versions.get(&key))
                .copied()
                .unwrap_or(0);
            if actual != req.expected {
                refusal = Some(Error::Conflict {
                    stream: req.stream,
                    expected: req.expected,
                    actual,
                });
                break;
            }
            local.insert(key, actual + req.tuples.len() as u64);
        }
        let refusal = refusal.or_else(|| job.invalid.as_ref().map(clone_refusal));
        if let Some(e) = refusal {
            outcomes.push(Err(e));
            continue;
        }
        versions.extend(local);
        let mut last = Vec::with_capacity(job.requests.len());
        for (r, req) in job.requests.iter().enumerate() {
            writes.push((j, r, next));
            next += req.tuples.len() as u64;
            last.push(next - 1);
        }
        outcomes.push(Ok(last));
    }
    Staged {
        outcomes,
        versions,
        writes,
        end: next - 1,
    }
}

/// A call's refusal, for each attempt at its group (errors are not `Clone`).
fn clone_refusal(e: &Error) -> Error {
    match e {
        Error::InvalidAppend { stream, reason } => Error::InvalidAppend {
            stream: *stream,
            reason: reason.clone(),
        },
        Error::Encode {
            stream,
            seq,
            source,
        } => Error::InvalidAppend {
            stream: *stream,
            reason: format!("cannot encode the event with seq {seq}: {source}"),
        },
        other => Error::Storage(other.to_string()),
    }
}

pub(crate) struct Committer {
    shared: Arc<Shared>,
    connect: PgConnectOptions,
    conn: Option<PgConnection>,
    /// The session of `conn`, once known.
    backend: Option<Backend>,
    /// A second connection, for the group committed while another is in flight.
    spare: Option<(PgConnection, Backend)>,
    fast_commit_events_max: usize,
    cache: VersionCache,
    copy_sql: String,
    connect_timeout: Duration,
    retry_for: Duration,
    backoff_max: Duration,
    #[cfg(feature = "fault-injection")]
    faults: Option<Arc<crate::Faults>>,
}

impl Committer {
    pub fn new(
        shared: Arc<Shared>,
        connect: PgConnectOptions,
        conn: PgConnection,
        options: &PgOptions,
    ) -> Self {
        Self {
            shared,
            connect,
            conn: Some(conn),
            backend: None,
            spare: None,
            fast_commit_events_max: options.fast_commit_events_max,
            cache: VersionCache::default(),
            copy_sql: copy_statement("mageflow_events"),
            connect_timeout: Duration::from_millis(options.connect_timeout_ms.max(1)),
            retry_for: Duration::from_millis(options.retry_for_ms),
            backoff_max: Duration::from_millis(options.backoff_max_ms.max(20)),
            #[cfg(feature = "fault-injection")]
            faults: options.faults.clone(),
        }
    }

    /// Commit groups until every sender is gone and the queue is empty.
    ///
    /// Fast groups are pipelined, two at most: while one group's commit is in flight, the next
    /// one's rows are written by `COPY` in an open transaction on a second connection, and
    /// that transaction moves the head and commits once the first has committed (see the crate
    /// doc). Anything else — a group that needs the long way, a commit that failed or whose
    /// outcome is unknown — waits until nothing is in flight and goes through [`Self::commit`].
    pub async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Job>) {
        let mut current: Option<Flight<Landed>> = None;
        let mut next: Option<Flight<()>> = None;
        loop {
            let Some(cur) = current.as_mut() else {
                let Some(first) = rx.recv().await else { break };
                let jobs = gather(first, &mut rx);
                match self.launch(jobs).await {
                    Ok(flight) => current = Some(flight),
                    Err(jobs) => self.commit(jobs, None).await,
                }
                continue;
            };
            if next.is_none() {
                // The next group starts once the one in flight has written its rows (one
                // `COPY` at a time: two would only share the cores), and takes every call that
                // arrived meanwhile.
                let copying = cur.copied.is_some();
                tokio::select! {
                    biased;
                    joined = &mut cur.task => {
                        if let Some(f) = current.take() {
                            current = self.land(f, joined, &mut next).await;
                        }
                    }
                    _ = async { if let Some(c) = cur.copied.as_mut() { let _ = c.await; } }, if copying => {
                        cur.copied = None;
                    }
                    job = rx.recv(), if !copying => {
                        let Some(first) = job else { break };
                        let jobs = gather(first, &mut rx);
                        match self.launch_next(jobs, Some(&cur.group)).await {
                            Ok(flight) => next = Some(flight),
                            Err(jobs) => {
                                current = self.drain(current.take(), None).await;
                                self.commit(jobs, None).await;
                            }
                        }
                    }
                }
                continue;
            }
            // Both slots taken: wait for the commit in flight. The next group's transaction
            // holds row locks meanwhile; if the commit waits too long (on another process's
            // committer, which may itself wait on those rows: a cycle PostgreSQL cannot see),
            // that transaction is rolled back and its group goes the long way after.
            let Some(mut f) = current.take() else {
                continue;
            };
            match tokio::time::timeout(NEXT_HOLD_MAX, &mut f.task).await {
                Ok(joined) => current = self.land(f, joined, &mut next).await,
                Err(_) => {
                    let held = match next.take() {
                        Some(n) => Some(abandon(&self.shared, n).await),
                        None => None,
                    };
                    tracing::warn!(
                        url = %self.shared.url,
                        wait_ms = NEXT_HOLD_MAX.as_millis() as u64,
                        "event log commit waits on another writer; rolling back the pipelined \
                         group behind it, which goes the long way"
                    );
                    let joined = (&mut f.task).await;
                    current = self.land(f, joined, &mut None).await;
                    current = self.drain(current, None).await;
                    if let Some(jobs) = held {
                        self.commit(jobs, None).await;
                    }
                }
            }
        }
        self.drain(current, next).await;
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
        if let Some((conn, _)) = self.spare.take() {
            let _ = conn.close().await;
        }
    }

    /// Whether fast groups may be committed on spawned tasks (and pipelined).
    fn pipelining(&self) -> bool {
        #[cfg(feature = "fault-injection")]
        if self.faults.is_some() {
            // Injected faults apply to the commit on the committer's own task.
            return false;
        }
        self.fast_commit_events_max > 0
    }

    /// Start committing `jobs` in one statement on a task of its own, if they qualify.
    async fn launch(&mut self, jobs: Vec<Job>) -> std::result::Result<Flight<Landed>, Vec<Job>> {
        if !self.pipelining() {
            return Err(jobs);
        }
        let events: usize = jobs.iter().map(|j| j.events).sum();
        if events > self.fast_commit_events_max {
            // Too large for one statement: written by `COPY`, then committed, as a pipelined
            // group with nothing ahead of it.
            let next = self.launch_next(jobs, None).await?;
            return Ok(self.finish_next(next));
        }
        let Some(group) = self.stage_fast(&jobs, &self.cache, None) else {
            return Err(jobs);
        };
        let Ok((mut conn, backend)) = self.take_connection().await else {
            // The long way reconnects, with backoff and messages.
            return Err(jobs);
        };
        let statement = FastStatement::new(&jobs, &group, &self.shared.channel);
        let task = tokio::spawn(async move {
            let landed = statement.run(&mut conn).await;
            let keep = match &landed {
                Ok(_) => true,
                Err(e) => !is_connection_error(e),
            };
            (keep.then_some(conn), landed)
        });
        Ok(Flight {
            jobs,
            group,
            backend,
            task,
            copied: None,
            pipelined: false,
        })
    }

    /// Start writing `jobs`, the group after `ahead`, in an open transaction: `BEGIN` and a
    /// binary `COPY` of its rows at the positions after `ahead`'s, on a task of its own. The
    /// head moves (and the transaction commits) in [`Self::land`], once `ahead` has committed.
    async fn launch_next(
        &mut self,
        jobs: Vec<Job>,
        ahead: Option<&FastGroup>,
    ) -> std::result::Result<Flight<()>, Vec<Job>> {
        let Some(group) = self.stage_fast(&jobs, &self.cache, ahead) else {
            return Err(jobs);
        };
        let Ok((mut conn, backend)) = self.take_connection().await else {
            return Err(jobs);
        };
        let bytes: usize = group
            .writes
            .iter()
            .map(|&(j, r, _)| jobs[j].requests[r].tuples.bytes_len())
            .sum();
        let mut data = CopyData::with_capacity(bytes);
        for &(j, r, first) in &group.writes {
            data.extend(&jobs[j].requests[r].tuples, first);
        }
        let rows = data.rows();
        let data = data.finish();
        let copy_sql = self.copy_sql.clone();
        let task = tokio::spawn(async move {
            let copied = async {
                conn.execute("BEGIN").await?;
                let mut copy = conn.copy_in_raw(&copy_sql).await?;
                copy.send(data).await?;
                copy.finish().await
            }
            .await;
            match copied {
                Ok(n) if n == rows => (Some(conn), Ok(())),
                Ok(n) => (
                    None,
                    Err(sqlx::Error::Protocol(format!(
                        "COPY wrote {n} rows, expected {rows}"
                    ))),
                ),
                // The connection is dropped: PostgreSQL rolls the transaction back.
                Err(e) => (None, Err(e)),
            }
        });
        Ok(Flight {
            jobs,
            group,
            backend,
            task,
            copied: None,
            pipelined: true,
        })
    }

    /// Settle the commit in flight `f`: answer its calls (through [`Self::commit`], which
    /// also takes over if it did not commit). If it committed, `next`'s transaction moves the
    /// head and commits on its task: the new commit in flight. If not, `next` is rolled back
    /// and committed the long way after it.
    async fn land(
        &mut self,
        f: Flight<Landed>,
        joined: std::result::Result<
            (
                Option<PgConnection>,
                std::result::Result<Landed, sqlx::Error>,
            ),
            tokio::task::JoinError,
        >,
        next: &mut Option<Flight<()>>,
    ) -> Option<Flight<Landed>> {
        let Flight {
            jobs,
            group,
            backend,
            pipelined,
            ..
        } = f;
        let landed = match joined {
            Ok((conn, landed)) => {
                if let Some(conn) = conn {
                    self.put_connection(conn, backend.clone());
                }
                landed
            }
            // The task died, and its connection with it.
            Err(e) => Err(sqlx::Error::Io(std::io::Error::other(e.to_string()))),
        };
        let (start, end, versions) = (group.start, group.end, group.versions.clone());
        let by = group.resolve_by(backend, &jobs);
        match self.landed(group, by, landed) {
            Some(done @ Attempt::Done { .. }) => {
                if pipelined {
                    let counters = &self.shared.counters;
                    counters.pipelined_commits.fetch_add(1, Ordering::Relaxed);
                }
                self.cache.learn(start, versions, end);
                self.commit(jobs, Some(done)).await;
                next.take().map(|n| self.finish_next(n))
            }
            other => {
                // Not committed, or not known to be: the group behind it cannot follow it.
                let held = match next.take() {
                    Some(n) => Some(abandon(&self.shared, n).await),
                    None => None,
                };
                self.cache = VersionCache::default();
                self.commit(jobs, other).await;
                if let Some(held) = held {
                    self.commit(held, None).await;
                }
                None
            }
        }
    }

    /// Move the head past `n`'s rows and commit its transaction, now that the group before it
    /// has committed: on a task that first waits for `n`'s `COPY` to end (the committer goes on
    /// meanwhile).
    fn finish_next(&mut self, n: Flight<()>) -> Flight<Landed> {
        let Flight {
            jobs,
            group,
            backend,
            task: copying,
            ..
        } = n;
        // `start` and `end` are numbers and the channel a checked name: nothing needs quoting.
        // No row moved (another process committed meanwhile): division by zero, and the
        // transaction is rolled back.
        let finish = format!(
            "WITH moved AS (UPDATE mageflow_head SET position = {end} WHERE position = {start} \
             RETURNING 1) SELECT 1 / (SELECT count(*)::int FROM moved), pg_notify('{channel}', \
             '{end}'); COMMIT",
            start = group.start,
            end = group.end,
            channel = self.shared.channel
        );
        let (copied_tx, copied) = oneshot::channel();
        let task = tokio::spawn(async move {
            let copy = copying.await;
            let _ = copied_tx.send(());
            let mut conn = match copy {
                Ok((Some(conn), Ok(()))) => conn,
                Ok((_, Err(e))) => return (None, Err(e)),
                Ok((None, Ok(()))) => return (None, Ok(Landed::NotWritten)),
                Err(e) => {
                    return (
                        None,
                        Err(sqlx::Error::Io(std::io::Error::other(e.to_string()))),
                    )
                }
            };
            match conn.execute(finish.as_str()).await {
                Ok(_) => (Some(conn), Ok(Landed::Committed)),
                Err(e) if !is_connection_error(&e) => {
                    tracing::debug!(error = %e, "pipelined commit refused");
                    let kept = conn.execute("ROLLBACK").await.is_ok().then_some(conn);
                    (kept, Ok(Landed::NotWritten))
                }
                Err(e) => (None, Err(e)),
            }
        });
        Flight {
            jobs,
            group,
            backend,
            task,
            copied: Some(copied),
            pipelined: true,
        }
    }

    /// Wait for the flights there are, in order, and settle them.
    async fn drain(
        &mut self,
        mut current: Option<Flight<Landed>>,
        mut next: Option<Flight<()>>,
    ) -> Option<Flight<Landed>> {
        while let Some(mut f) = current.take() {
            let joined = (&mut f.task).await;
            current = self.land(f, joined, &mut next).await;
        }
        None
    }

    /// A connection for a flight, and its session: the committer's own, else the spare, else
    /// a new one. It becomes the one [`crate::PgLog::committer_backend_pid`] reports.
    async fn take_connection(
        &mut self,
    ) -> std::result::Result<(PgConnection, Backend), sqlx::Error> {
        let taken = self.take_connection_inner().await?;
        self.shared
            .committer_pid
            .store(taken.1.pid, Ordering::Release);
        Ok(taken)
    }

    async fn take_connection_inner(
        &mut self,
    ) -> std::result::Result<(PgConnection, Backend), sqlx::Error> {
        if let Some(mut conn) = self.conn.take() {
            let backend = match self.backend.take() {
                Some(b) => b,
                None => match Self::backend_of(&mut conn).await {
                    Ok(b) => b,
                    Err(e) => {
                        self.drop_connection();
                        return Err(e);
                    }
                },
            };
            return Ok((conn, backend));
        }
        if let Some(spare) = self.spare.take() {
            return Ok(spare);
        }
        let mut conn = self.connect().await?;
        let backend = Self::backend_of(&mut conn).await?;
        Ok((conn, backend))
    }

    /// Keep a connection a flight gave back (beyond two, it is closed).
    fn put_connection(&mut self, conn: PgConnection, backend: Backend) {
        if self.conn.is_none() {
            self.conn = Some(conn);
            self.backend = Some(backend);
        } else if self.spare.is_none() {
            self.spare = Some((conn, backend));
        }
    }

    async fn connection(&mut self) -> Result<&mut PgConnection, sqlx::Error> {
        if self.conn.is_none() {
            let conn = self.connect().await?;
            self.conn = Some(conn);
        }
        self.conn.as_mut().ok_or(sqlx::Error::PoolClosed)
    }

    async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        let connecting = PgConnection::connect_with(&self.connect);
        let mut conn = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Ok(conn) => conn?,
            Err(_) => {
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "no connection within {} ms",
                        self.connect_timeout.as_millis()
                    ),
                )))
            }
        };
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&mut conn)
            .await?;
        self.shared.committer_pid.store(pid, Ordering::Release);
        tracing::info!(url = %self.shared.url, pid, "event log committer connected to PostgreSQL");
        Ok(conn)
    }

    /// The session `conn` is: what an in-doubt one-statement commit is resolved by.
    async fn backend_of(conn: &mut PgConnection) -> Result<Backend, sqlx::Error> {
        let (pid, started): (i32, String) = sqlx::query_as(
            "SELECT pid, backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        )
        .fetch_one(conn)
        .await?;
        Ok(Backend { pid, started })
    }

    /// Forget the connection (closing its socket): PostgreSQL rolls back whatever transaction
    /// it had open.
    fn drop_connection(&mut self) {
        self.conn = None;
        self.backend = None;
        self.shared.committer_pid.store(0, Ordering::Release);
    }

    /// Commit one group, retrying through connection loss, then answer its calls in order.
    /// `first`: the outcome of a try already made (by a flight).
    async fn commit(&mut self, jobs: Vec<Job>, mut first: Option<Attempt>) {
        let deadline = Instant::now() + self.retry_for;
        let mut backoff = Backoff::new(self.backoff_max);
        let result = loop {
            let attempt = match first.take() {
                Some(attempt) => attempt,
                None => self.attempt(&jobs).await,
            };
            match attempt {
                Attempt::Done {
                    outcomes,
                    end,
                    written,
                } => {
                    // Recorded for `read_all` before the head moves past it.
                    if let Some(&(_, _, first)) = written.first() {
                        let events = written.iter().flat_map(|&(j, r, _)| {
                            let req = &jobs[j].requests[r];
                            let seqs = req.expected + 1..;
                            seqs.zip(req.tuples.payloads())
                                .map(|(seq, payload)| (req.stream, seq, payload))
                        });
                        crate::lock(&self.shared.recent).committed(first, events);
                    }
                    break Ok((outcomes, end));
                }
                Attempt::Failed(e) => {
                    self.drop_connection();
                    break Err(match e {
                        Error::Storage(message) => message,
                        other => other.to_string(),
                    });
                }
                Attempt::Retry { step, error } => {
                    self.drop_connection();
                    self.shared.counters.retries.fetch_add(1, Ordering::Relaxed);
                    if Instant::now() >= deadline {
                        break Err(format!(
                            "PostgreSQL at {}: gave up after {} ms of connection failures (last, \
                             at {step}: {error}); nothing of these appends was written",
                            self.shared.url,
                            self.retry_for.as_millis()
                        ));
                    }
                    let wait = backoff.next_wait();
                    tracing::warn!(
                        url = %self.shared.url,
                        step,
                        error = %error,
                        attempt = backoff.attempts,
                        retry_in_ms = wait.as_millis() as u64,
                        "event log commit lost its PostgreSQL connection (or was rolled back \
                         to break a deadlock); nothing of the group was committed, retrying it \
                         on a new connection"
                    );
                    tokio::time::sleep(wait).await;
                }
                Attempt::InDoubt {
                    by,
                    outcomes,
                    end,
                    error,
                } => {
                    self.drop_connection();
                    self.shared
                        .counters
                        .in_doubt
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        url = %self.shared.url,
                        ?by,
                        error = %error,
                        "event log lost its PostgreSQL connection while COMMIT was in flight; \
                         asking the server whether the transaction committed"
                    );
                    let resolved = self.resolve(&by, deadline, &mut backoff).await;
                    match resolved {
                        Ok(true) => {
                            tracing::info!(?by, end, "the in-doubt commit had committed");
                            if let Resolve::Row { .. } = by {
                                let fast = &self.shared.counters.fast_commits;
                                fast.fetch_add(1, Ordering::Relaxed);
                            }
                            break Ok((outcomes, Some(end)));
                        }
                        Ok(false) => {
                            tracing::info!(?by, "the in-doubt commit was rolled back; retrying");
                        }
                        Err(e) => break Err(e),
                    }
                }
            }
        };
        match result {
            Ok((outcomes, end)) => {
                if let Some(end) = end {
                    let counters = &self.shared.counters;
                    counters.commits.fetch_add(1, Ordering::Relaxed);
                    let events = outcomes
                        .iter()
                        .zip(&jobs)
                        .filter(|(o, _)| o.is_ok())
                        .map(|(_, j)| j.events as u64)
                        .sum::<u64>();
                    counters.events.fetch_add(events, Ordering::Relaxed);
                    self.shared.advance_head(end);
                }
                for (job, outcome) in jobs.into_iter().zip(outcomes) {
                    let _ = job.reply.send(outcome);
                }
            }
            Err(message) => {
                tracing::error!(url = %self.shared.url, error = %message, "event log commit failed");
                for job in jobs {
                    let _ = job.reply.send(Err(Error::Storage(message.clone())));
                }
            }
        }
    }

    /// One try, on the current connection (a new one if there is none). The connection is kept
    /// only if the try ends cleanly.
    async fn attempt(&mut self, jobs: &[Job]) -> Attempt {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => match self.connect().await {
                Ok(conn) => conn,
                Err(error) => return self.classify("connect", error),
            },
        };
        if self.backend.is_none() && self.fast_commit_events_max > 0 {
            match Self::backend_of(&mut conn).await {
                Ok(b) => self.backend = Some(b),
                Err(error) => return self.classify("identify the session", error),
            }
        }
        let mut cache = std::mem::take(&mut self.cache);
        let attempt = self.attempt_on(&mut conn, &mut cache, jobs).await;
        if matches!(attempt, Attempt::Done { .. }) {
            self.conn = Some(conn);
            self.cache = cache;
        }
        // Otherwise the cache is dropped: what was committed is not known for sure.
        attempt
    }

    /// A failure before COMMIT: retried if it was the connection, or a deadlock the server
    /// broke by rolling this transaction back (another process's commit waiting on rows a
    /// pipelined group of this one had written, say); anything else fails the group.
    fn classify(&self, step: &'static str, error: sqlx::Error) -> Attempt {
        let deadlock = matches!(&error, sqlx::Error::Database(db)
            if db.code().is_some_and(|c| matches!(&*c, "40P01" | "40001")));
        if is_connection_error(&error) || deadlock {
            Attempt::Retry { step, error }
        } else {
            Attempt::Failed(self.shared.storage(step, &error))
        }
    }

    async fn attempt_on(
        &self,
        conn: &mut PgConnection,
        cache: &mut VersionCache,
        jobs: &[Job],
    ) -> Attempt {
        if let Some(done) = self.attempt_fast(conn, cache, jobs).await {
            return done;
        }
        let row = match conn.fetch_one(LOCK_HEAD).await {
            Ok(row) => row,
            Err(e) => return self.classify("lock the head row", e),
        };
        let (start, xid) = match (row.try_get::<i64, _>(0), row.try_get::<i64, _>(1)) {
            (Ok(start), Ok(xid)) => (start as u64, xid),
            (Err(e), _) | (_, Err(e)) => return self.classify("lock the head row", e),
        };

        if cache.at != Some(start) {
            match cache.at {
                Some(at) if at < start && start - at <= CATCH_UP_EVENTS_MAX => {
                    // Other processes committed (at, start]: learn their streams' versions.
                    match sqlx::query_as::<_, (Uuid, i64)>(FOREIGN_VERSIONS)
                        .bind(at as i64)
                        .bind(start as i64)
                        .fetch_all(&mut *conn)
                        .await
                    {
                        Ok(rows) => cache
                            .versions
                            .extend(rows.into_iter().map(|(s, v)| (s, v as u64))),
                        Err(e) => return self.classify("read other processes' versions", e),
                    }
                }
                _ => cache.versions.clear(),
            }
            cache.at = Some(start);
        }
        let missing: Vec<Uuid> = jobs
            .iter()
            .flat_map(|j| j.requests.iter().map(|r| r.stream.0))
            .filter(|s| !cache.versions.contains_key(s))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            match sqlx::query_as::<_, (Uuid, i64)>(VERSIONS)
                .bind(&missing)
                .fetch_all(&mut *conn)
                .await
            {
                Ok(rows) => cache
                    .versions
                    .extend(rows.into_iter().map(|(s, v)| (s, v as u64))),
                Err(e) => return self.classify("read stream versions", e),
            }
        }
        let versions: HashMap<Uuid, u64> = jobs
            .iter()
            .flat_map(|j| j.requests.iter().map(|r| r.stream.0))
            .map(|s| (s, cache.versions.get(&s).copied().unwrap_or(0)))
            .collect();

        let Staged {
            outcomes,
            versions,
            writes,
            end,
        } = stage(jobs, versions, start);
        if writes.is_empty() {
            // Every call was refused: nothing to write, no commit, no notification.
            if let Err(e) = conn.execute("ROLLBACK").await {
                return self.classify("roll back an empty group", e);
            }
            return Attempt::Done {
                outcomes,
                end: None,
                written: Vec::new(),
            };
        }

        let bytes: usize = writes
            .iter()
            .map(|&(j, r, _)| jobs[j].requests[r].tuples.bytes_len())
            .sum();
        let mut data = CopyData::with_capacity(bytes);
        for &(j, r, first) in &writes {
            data.extend(&jobs[j].requests[r].tuples, first);
        }
        let rows = data.rows();
        let mut copy = match conn.copy_in_raw(&self.copy_sql).await {
            Ok(copy) => copy,
            Err(e) => return self.classify("start COPY", e),
        };
        if let Err(e) = copy.send(data.finish()).await {
            return self.classify("send COPY data", e);
        }
        match copy.finish().await {
            Ok(n) if n == rows => {}
            Ok(n) => {
                return Attempt::Failed(Error::Storage(format!(
                    "PostgreSQL at {}: COPY wrote {n} rows, expected {rows}",
                    self.shared.url
                )))
            }
            Err(e) => return self.classify("finish COPY", e),
        }

        // Head, notification and COMMIT in one round trip. The channel is `mageflow_head_` and
        // a checked schema name; `end` is a number: nothing here needs quoting.
        let finish = format!(
            "UPDATE mageflow_head SET position = {end}; \
             SELECT pg_notify('{}', '{end}'); COMMIT",
            self.shared.channel
        );
        #[cfg(feature = "fault-injection")]
        if let Some(fault) = self.faults.as_ref().and_then(|f| f.take()) {
            let injected = match fault {
                crate::faults::CommitFault::RollBack => conn.execute("ROLLBACK").await,
                crate::faults::CommitFault::LoseReply => conn.execute(finish.as_str()).await,
            };
            return match injected {
                Ok(_) => Attempt::InDoubt {
                    by: Resolve::Xid(xid),
                    outcomes,
                    end,
                    error: "injected: connection lost while COMMIT was in flight".into(),
                },
                Err(e) => self.classify("injected fault", e),
            };
        }
        match conn.execute(finish.as_str()).await {
            Ok(_) => {
                cache.learn(start, versions, end);
                Attempt::Done {
                    outcomes,
                    end: Some(end),
                    written: writes,
                }
            }
            // The server answered with an error: with the statements before COMMIT failing, the
            // transaction was rolled back for sure; this would fail again.
            Err(e) if !is_connection_error(&e) => {
                Attempt::Failed(self.shared.storage("update the head and commit", &e))
            }
            Err(e) => Attempt::InDoubt {
                by: Resolve::Xid(xid),
                outcomes,
                end,
                error: e.to_string(),
            },
        }
    }

    /// The group in one statement ([`FAST_COMMIT`]), if it is small, every stream's version is
    /// cached as of the head the committer last wrote, and every call passes against those
    /// versions. `None`: take the long way (the head had moved — nothing was written — or the
    /// group does not qualify).
    async fn attempt_fast(
        &self,
        conn: &mut PgConnection,
        cache: &mut VersionCache,
        jobs: &[Job],
    ) -> Option<Attempt> {
        let backend = self.backend.clone()?;
        let events: usize = jobs.iter().map(|j| j.events).sum();
        if events > self.fast_commit_events_max {
            return None;
        }
        let group = self.stage_fast(jobs, cache, None)?;
        let statement = FastStatement::new(jobs, &group, &self.shared.channel);
        let by = group.resolve_by(backend, jobs);
        #[cfg(feature = "fault-injection")]
        if let Some(fault) = self.faults.as_ref().and_then(|f| f.take()) {
            if let crate::faults::CommitFault::LoseReply = fault {
                if let Err(e) = statement.run(conn).await {
                    return Some(self.classify("injected fault", e));
                }
            }
            return Some(Attempt::InDoubt {
                by,
                outcomes: group.outcomes,
                end: group.end,
                error: "injected: connection lost while the commit was in flight".into(),
            });
        }
        let landed = statement.run(conn).await;
        let (start, end) = (group.start, group.end);
        let versions = group.versions.clone();
        let attempt = self.landed(group, by, landed)?;
        if matches!(attempt, Attempt::Done { .. }) {
            cache.learn(start, versions, end);
        }
        Some(attempt)
    }

    /// Stage a group against versions known without asking the server: the cache (valid as of
    /// its head), with `ahead` — the group in flight before this one, if any — applied on top.
    /// `None` if the group does not qualify for [`FAST_COMMIT`] or a pipelined commit.
    fn stage_fast(
        &self,
        jobs: &[Job],
        cache: &VersionCache,
        ahead: Option<&FastGroup>,
    ) -> Option<FastGroup> {
        let start = match ahead {
            Some(g) => g.end,
            None => cache.at?,
        };
        let events: usize = jobs.iter().map(|j| j.events).sum();
        if events == 0 || self.fast_commit_events_max == 0 {
            return None;
        }
        let mut versions = HashMap::new();
        for req in jobs.iter().flat_map(|j| &j.requests) {
            let key = req.stream.0;
            let known = ahead.and_then(|g| g.versions.get(&key));
            versions.insert(key, *known.or_else(|| cache.versions.get(&key))?);
        }
        let Staged {
            outcomes,
            versions,
            writes,
            end,
        } = stage(jobs, versions, start);
        // A refusal must be decided under the lock, against versions known to be current.
        if writes.is_empty() || outcomes.iter().any(|o| o.is_err()) {
            return None;
        }
        Some(FastGroup {
            outcomes,
            versions,
            writes,
            start,
            end,
        })
    }

    /// What a fast or pipelined commit's answer means. `None`: nothing was written, take the
    /// long way.
    fn landed(
        &self,
        group: FastGroup,
        by: Resolve,
        landed: Result<Landed, sqlx::Error>,
    ) -> Option<Attempt> {
        match landed {
            Ok(Landed::Committed) => {
                self.shared
                    .counters
                    .fast_commits
                    .fetch_add(1, Ordering::Relaxed);
                Some(Attempt::Done {
                    outcomes: group.outcomes,
                    end: Some(group.end),
                    written: group.writes,
                })
            }
            Ok(Landed::Miswritten(written)) => Some(Attempt::Failed(Error::Storage(format!(
                "PostgreSQL at {}: a commit wrote {written} rows, expected {}",
                self.shared.url,
                group.end - group.start
            )))),
            // Another process moved the head: nothing was written.
            Ok(Landed::NotWritten) => None,
            // Refused by the server, so rolled back as a whole: the long way decides, under
            // the lock. (Any other failure may come after the commit: resolved by the caller.)
            Err(e @ sqlx::Error::Database(_)) if !is_connection_error(&e) => {
                tracing::debug!(error = %e, "fast commit refused; taking the long way");
                None
            }
            Err(e) => Some(Attempt::InDoubt {
                by,
                outcomes: group.outcomes,
                end: group.end,
                error: e.to_string(),
            }),
        }
    }

    /// Whether the in-doubt commit `by` describes committed, asked on a new connection until
    /// the server knows.
    async fn resolve(
        &mut self,
        by: &Resolve,
        deadline: Instant,
        backoff: &mut Backoff,
    ) -> Result<bool, String> {
        loop {
            let asked = match self.connection().await {
                Ok(conn) => by.ask(conn).await,
                Err(e) => Err(e),
            };
            match asked {
                Ok(Asked::Known(committed)) => return Ok(committed),
                // The old session has not finished yet.
                Ok(Asked::Pending) => tracing::info!(?by, "waiting for the in-doubt commit"),
                Ok(Asked::Unknowable) => {
                    return Err(format!(
                        "PostgreSQL at {}: cannot tell whether {by} committed (too old for \
                         txid_status); these appends are not acknowledged",
                        self.shared.url
                    ))
                }
                Err(e) if is_connection_error(&e) => {
                    self.drop_connection();
                    tracing::warn!(url = %self.shared.url, ?by, error = %e,
                        "cannot reach PostgreSQL to resolve an in-doubt commit; retrying");
                }
                Err(e) => {
                    return Err(format!(
                        "PostgreSQL at {}: cannot ask whether {by} committed: {e}; these \
                         appends are not acknowledged",
                        self.shared.url
                    ))
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "PostgreSQL at {}: the outcome of {by} is still unknown after {} ms; these \
                     appends are not acknowledged (they may be in the log)",
                    self.shared.url,
                    self.retry_for.as_millis()
                ));
            }
            tokio::time::sleep(backoff.next_wait()).await;
        }
    }
}

/// What the server says of an in-doubt commit.
enum Asked {
    Known(bool),
    /// Its session is still running it.
    Pending,
    /// It can no longer tell (a transaction id too old for `txid_status`).
    Unknowable,
}

impl Resolve {
    async fn ask(&self, conn: &mut PgConnection) -> Result<Asked, sqlx::Error> {
        match self {
            Resolve::Xid(xid) => {
                let status: Option<String> = sqlx::query_scalar("SELECT txid_status($1)")
                    .bind(xid)
                    .fetch_one(conn)
                    .await?;
                Ok(match status.as_deref() {
                    Some("committed") => Asked::Known(true),
                    Some("aborted") => Asked::Known(false),
                    Some(_) => Asked::Pending,
                    None => Asked::Unknowable,
                })
            }
            Resolve::Row {
                backend,
                position,
                stream,
                seq,
            } => Ok(
                match ask_by_row(conn, backend, *position, *stream, *seq).await? {
                    Some(committed) => Asked::Known(committed),
                    None => Asked::Pending,
                },
            ),
        }
    }
}

impl std::fmt::Display for Resolve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resolve::Xid(xid) => write!(f, "transaction {xid}"),
            Resolve::Row { backend, .. } => {
                write!(f, "the one-statement commit of session {}", backend.pid)
            }
        }
    }
}

/// `None` while `backend` still runs; then whether the row `(position, stream, seq)` is there.
async fn ask_by_row(
    conn: &mut PgConnection,
    backend: &Backend,
    position: u64,
    stream: Uuid,
    seq: u64,
) -> Result<Option<bool>, sqlx::Error> {
    let alive: bool = sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND backend_start::text = $2)",
    )
    .bind(backend.pid)
    .bind(&backend.started)
    .fetch_one(&mut *conn)
    .await?;
    if alive {
        return Ok(None);
    }
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM mageflow_events WHERE position = $1 AND stream = $2 AND seq = $3)",
    )
    .bind(position as i64)
    .bind(stream)
    .bind(seq as i64)
    .fetch_one(&mut *conn)
    .await
    .map(Some)
}
