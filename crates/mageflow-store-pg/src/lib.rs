//! The PostgreSQL event log: [`PgLog`], a backend of [`mageflow_store::EventLog`] that several
//! processes (on several machines) can share. It keeps its own crate so that only builds that
//! want PostgreSQL compile sqlx. It stores and serves encoded events; it never decides anything.
//!
//! **Tables** (`migrations/` at the workspace root, applied by [`PgLog::open`], append-only):
//! `mageflow_events` has one row per event: `position` (bigint, primary key), `stream` (uuid),
//! `seq` (bigint), `payload` (bytea, `mageflow_core::codec::encode`), `crc32`, `recorded_at`,
//! with `UNIQUE (stream, seq)`. `mageflow_head` is a single row holding the last committed
//! position. `mageflow_archive` has one row per compacted stream (see **Compaction**). The log
//! lives in one schema (`PgOptions::schema`, or the connection's
//! `search_path`): several logs can share a database.
//!
//! **Group commit.** `append` checks each request's shape and encodes its events into binary
//! `COPY` tuples on the caller's thread, then queues them for this process's one committer task.
//! The committer takes everything waiting (up to [`GROUP_EVENTS_MAX`] events or
//! [`GROUP_BYTES_MAX`] bytes) and writes it in ONE transaction:
//! `BEGIN; SELECT position, txid_current() FROM mageflow_head FOR UPDATE` (waits for any other
//! process's committer), learns the current version of every stream involved, refuses the calls
//! whose expected versions are stale (each call is atomic across its requests; a refused call
//! does not affect the others), writes the rest with one binary `COPY`, then `UPDATE
//! mageflow_head; SELECT pg_notify(..); COMMIT`. Each call resolves only after that COMMIT.
//!
//! **One-statement commits.** That is four round trips. A small group (up to
//! `PgOptions::fast_commit_events_max`, default 1 024 events) whose streams' versions the
//! committer has cached as of the head it last wrote, and whose calls all pass against them,
//! is committed with ONE statement in autocommit instead: `UPDATE mageflow_head SET position =
//! end WHERE position = <that head>`, the rows inserted from arrays (`unnest`) only if that
//! update found the row, and the notification, in one `WITH` (the update takes the same row
//! lock, so commit order and density are as above). If another process committed since, the
//! update matches nothing, nothing is written, and the group goes the long way (which catches
//! the cache up). The chain step on PostgreSQL + Redis went from 1.46–1.49 to 1.12–1.14 ms with
//! it. Its outcome, if the connection dies with the statement in flight, has no transaction id
//! to ask about: the committer waits until the old session is gone from `pg_stat_activity`
//! (by pid and start time: its statement has then committed or rolled back for good) and looks
//! for the group's first row.
//!
//! **Pipelined commits.** While one fast group's commit is in flight, PostgreSQL's backend was
//! idle a third of the time (round trips, the WAL flush, the appenders' turnaround). So the
//! committer takes the calls waiting behind it as the next group, stages it against the cached
//! versions as they will be once the first commits, and writes its rows on a second connection:
//! `BEGIN` and a binary `COPY` at the positions after the first group's, with the head row
//! untouched. Only when the first group's commit has succeeded does that transaction move the
//! head (`UPDATE mageflow_head … WHERE position = <the first group's end>`; no row matched —
//! another process committed meanwhile — is a division by zero, rolling it back) and commit;
//! the group after it starts once its `COPY` is over. A group too large for one statement is
//! written the same way when nothing is ahead of it (`COPY`, then the head update guarded by
//! the head the committer last wrote, and COMMIT), so large groups pipeline too; the long way
//! remains for groups with streams whose versions are not cached or calls to refuse. So
//! positions still commit in order, each
//! under the head row lock. If the first group did not commit, or its outcome is unknown, the
//! second is rolled back (its connection dropped) and goes the long way after it. A pipelined
//! transaction holds row locks at positions another process's committer may want: if the commit
//! before it waits over 250 ms (on that other committer, which may be waiting on those rows — a
//! cycle PostgreSQL cannot see, since the last edge is in this process), it is rolled back; a
//! cycle PostgreSQL does see ends with one side chosen as the deadlock victim, and that side's
//! group is retried. `PgStats::pipelined_commits` / `pipeline_rollbacks` count both. Measured:
//! +8–20 % appended events/s, alternating with the build before it in the same hour.
//!
//! **Versions** come from a cache the committer keeps of the streams it has seen, valid as of
//! the head it last committed: when the head row (read under the lock) still says that, no one
//! else has written since and the cache is exact; when another process has committed, the
//! committer reads back the last seq of each stream in those positions (catch up by position,
//! up to [`CATCH_UP_EVENTS_MAX`] events, else it forgets the cache). Streams it does not know
//! cost one index probe each. An index probe per stream per group was the largest cost of a
//! commit before the cache (3–4 ms for 600 streams).
//!
//! **Why a head row lock.** Positions are taken from the head row while holding its row lock
//! until COMMIT, so the next committer (of any process) gets the lock only once this
//! transaction is visible, reads the new head, and continues the numbering: positions are dense,
//! commit in order, and a reader's snapshot is always a prefix of the log. Versions are read
//! after the lock is held, so no other writer can move a stream between the check and the
//! write: a stale writer gets `Error::Conflict` and nothing of its call is written.
//! `UNIQUE (stream, seq)` and the position primary key are a second line of defence. The price
//! is that commits of all processes are serialised; group commit makes each one carry many
//! appends. (An advisory lock would give the same ordering; the row also stores the head, so
//! reading it costs one row, and `FOR UPDATE` re-reads its latest version after the wait.)
//!
//! **Connection loss.** A commit that fails before COMMIT was sent wrote nothing (PostgreSQL
//! aborts a transaction whose connection is gone): the committer reconnects with exponential
//! backoff (`warn` lines name the URL, the step and the cause) and redoes the whole group,
//! re-reading versions, for up to `PgOptions::retry_for_ms`; then the group's calls fail with
//! `Error::Storage`. If the connection dies while COMMIT is in flight the outcome is unknown:
//! the committer reconnects and asks `txid_status(xid)` for the transaction id it took under
//! the lock (one-statement and pipelined commits: above). `committed` → the calls are acknowledged (and not
//! written twice); `aborted` → the group is redone; `in progress` → asked again. Reading back
//! stream versions instead would be ambiguous when another process may have appended the same
//! seqs since; the transaction id is exact, and so is the group's first row (position, stream
//! and seq) once the session is gone. A call is never acknowledged unless its transaction
//! committed.
//!
//! **Head and subscribers.** [`EventLog::head`] and [`EventLog::subscribe`] read a watch that
//! the committer moves after each COMMIT (before answering the calls) and a listener task moves
//! on every `NOTIFY` (payload: the new head) sent by any process's committing transaction. When
//! the listener's connection drops it reconnects, LISTENs again, then reads the head row (catch
//! up by position), so no commit is missed; it never scans the table.
//!
//! **Reads** go to PostgreSQL (a small pool), retrying a lost connection a few times, and check
//! every row: positions dense, seqs dense, CRC-32, decodable, and the decoded event's stream and
//! seq equal to its row's; damage is `Error::Corrupt` naming the position. One exception:
//! `read_all` of the events this process committed last is answered from memory (the `recent`
//! module; up to 64 Ki events or 32 MiB) — the hot-tier projector reads every group back right
//! after its commit, and that saved a query per group (chain step p50 −10–20 %, PostgreSQL's
//! CPU −25 % in `mageflow bench`). Such a read returns what was committed, so damage done to
//! those rows behind the process's back is found by the other reads, `verify`, or any other
//! process. `EventLog`'s reads
//! are synchronous, so [`PgLog`] runs its connections on a small tokio runtime of its own and
//! blocks the calling thread for the answer, as a file read would; this works from any caller,
//! inside a runtime or not.
//!
//! **Why a CRC column.** PostgreSQL checks its WAL, but data-page checksums are off unless the
//! cluster was created with `--data-checksums` (they are off on the servers we test against),
//! so a payload altered on disk or by hand would reach the decoder unnoticed. The appender
//! computes CRC-32 of the encoded event (4 bytes a row, no measurable cost) and every read
//! checks it, as the sled backend does for its blocks.
//!
//! **Compaction (cold storage).** [`PgLog::compact`] moves a stream's oldest live events (all,
//! or up to a seq) into new rows of `mageflow_archive`: zstd-compressed segments of the
//! events' codec bytes, a stream's segments covering its seqs densely from 1, each with a
//! CRC-32 and the highest position it holds, and an optional opaque snapshot in
//! `mageflow_snapshot`; the rows leave `mageflow_events` in the same transaction (format,
//! checks and locking: the `archive` module). Afterwards `read_stream` decodes the archived
//! part from the segments then reads the live rows, with the same density checks, and a stream's
//! version (`stream_version`, and the committer's check of `expected_version`) is the greater
//! of its last live seq and its last archived seq, so appends after a compaction continue at
//! the next seq and stale ones still conflict. `read_all` serves live events only: compaction
//! leaves gaps in its positions (it still checks that positions increase, that one stream's
//! seqs are consecutive within a batch, and that every gap lies at or below the highest
//! archived position). `verify` checks archive rows too. The head row is unaffected: positions
//! go on from where they were.
//!
//! **One orchestrator per log.** [`PgLog::orchestrator_lock`] takes a session-level advisory
//! lock keyed by the schema on a connection of its own; a second taker waits as a standby and
//! gets it when the holder's session ends; a holder whose session ended leaves standbys two
//! seconds, then takes it again unless one took it (module `leader`). The log does not need it
//! to stay consistent.
//!
//! **Limits and trade-offs.** The queue from `append` to the committer is unbounded (like
//! sled's); callers bound it by awaiting their appends. A process's `head()` learns of other
//! processes' commits one notification later. One committer per process and one lock for all
//! processes: commits are serialised, and throughput comes from the size of each group. A
//! committing transaction that loses its client is ended by the server within
//! `idle_in_transaction_session_timeout` (60 s, set on the committer's connection), so a
//! vanished process cannot hold the head lock for long.
//!
//! Invariant: positions are dense from 1 and in commit order, counting archived events; seqs
//! are dense per stream, archived seqs (from 1) followed by live ones.
//! Invariant: a call's requests are all written in one transaction, or none.
//! Invariant: `append` resolves `Ok` only after its transaction committed (for an unknown
//! outcome, only after `txid_status` says `committed`); appends complete in call order.
//! Invariant: the watch never runs ahead of committed data and never moves backwards.

mod archive;
mod committer;
pub mod copy;
#[cfg(feature = "fault-injection")]
mod faults;
mod leader;
mod listener;
mod recent;

#[cfg(feature = "fault-injection")]
pub use faults::Faults;
pub use leader::OrchestratorLock;

pub use archive::{
    decode_archive_segment, ArchiveInfo, CompactStats, RedactStats, SEGMENT_TARGET_BYTES,
    ZSTD_LEVEL,
};
use archive::{Segment, SEGMENT_COLUMNS};
use committer::{Committer, Job, Prepared};
pub use committer::{CATCH_UP_EVENTS_MAX, VERSION_CACHE_STREAMS_MAX};
use copy::{decode_row, Row, Tuples};
use mageflow_core::{Event, NodeIndex, WorkflowId};
use mageflow_store::{check_request, AppendRequest, BoxFuture, Error, EventLog, Recorded, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, Executor, PgConnection};
use std::collections::HashMap;
use std::future::Future;
use std::str::FromStr;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};

/// The migrations of `migrations/` at the workspace root, embedded at build time.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// Most events one group commit writes; the rest wait for the next group.
pub const GROUP_EVENTS_MAX: usize = 64 * 1024;
/// A group stops taking appends once it holds this many encoded bytes.
pub const GROUP_BYTES_MAX: usize = 64 * 1024 * 1024;
/// Longest schema name: the notification channel (`mageflow_head_<schema>`) must fit
/// PostgreSQL's 63-byte identifiers.
pub const SCHEMA_NAME_BYTES_MAX: usize = 63 - CHANNEL_PREFIX.len();
/// Attempts of a read whose connection was lost, before it fails.
pub const READ_ATTEMPTS_MAX: u32 = 4;

const CHANNEL_PREFIX: &str = "mageflow_head_";

#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Schema holding the log's tables, created if missing and put first on the `search_path`
    /// of every connection. `None`: whatever the URL's `search_path` gives (usually `public`).
    /// Lowercase letters, digits and `_`, at most [`SCHEMA_NAME_BYTES_MAX`] bytes.
    pub schema: Option<String>,
    /// Connections in the read pool.
    pub read_connections_max: u32,
    /// Limit on establishing one connection (at open, and at each reconnection).
    pub connect_timeout_ms: u64,
    /// How long the committer keeps retrying a group through connection loss before failing its
    /// calls with `Error::Storage`.
    pub retry_for_ms: u64,
    /// Longest wait between two reconnection attempts (backoff doubles from 20 ms up to this).
    pub backoff_max_ms: u64,
    /// Worker threads of the log's own I/O runtime.
    pub worker_threads: usize,
    /// Groups of at most this many events are committed with one statement when the committer
    /// knows the head and the streams' versions (see the crate doc); 0: always the long way.
    pub fast_commit_events_max: usize,
    /// Deterministic faults for tests.
    #[cfg(feature = "fault-injection")]
    pub faults: Option<Arc<Faults>>,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            schema: None,
            read_connections_max: 4,
            connect_timeout_ms: 5_000,
            retry_for_ms: 120_000,
            backoff_max_ms: 2_000,
            worker_threads: 2,
            fast_commit_events_max: committer::FAST_COMMIT_EVENTS_MAX,
            #[cfg(feature = "fault-injection")]
            faults: None,
        }
    }
}

/// Counters of the committer since open (for operators, benchmarks and tests).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PgStats {
    /// Transactions committed (groups that wrote something).
    pub commits: u64,
    /// Of those, the ones committed without taking the head lock first: in one statement, or
    /// pipelined behind another (see `PgOptions::fast_commit_events_max` and the crate doc).
    pub fast_commits: u64,
    /// Of those, the pipelined ones: rows written by `COPY` while the group before was still
    /// committing.
    pub pipelined_commits: u64,
    /// Pipelined groups rolled back before their commit, because the group before them did not
    /// commit (or was not known to) or waited too long on another process; they were then
    /// committed the long way.
    pub pipeline_rollbacks: u64,
    /// Events written by those commits.
    pub events: u64,
    /// Group attempts abandoned because the connection was lost before COMMIT was sent.
    pub retries: u64,
    /// Commits whose outcome was unknown (connection lost during COMMIT) and was resolved by
    /// asking for the transaction's status.
    pub in_doubt: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub commits: AtomicU64,
    pub fast_commits: AtomicU64,
    pub pipelined_commits: AtomicU64,
    pub pipeline_rollbacks: AtomicU64,
    pub events: AtomicU64,
    pub retries: AtomicU64,
    pub in_doubt: AtomicU64,
}

/// State shared by the handle, the committer and the listener.
pub(crate) struct Shared {
    pub counters: Counters,
    /// The URL with its password hidden, for messages.
    pub url: String,
    pub pool: PgPool,
    pub head: watch::Sender<u64>,
    pub committer_pid: AtomicI32,
    pub listener_pid: AtomicI32,
    pub channel: String,
    /// The events this process committed last, for `read_all` (the `recent` module).
    pub recent: Mutex<recent::Recent>,
}

impl Shared {
    /// Move the head forward to `position` (never back). True if it moved.
    pub fn advance_head(&self, position: u64) -> bool {
        self.head.send_if_modified(|head| {
            let moved = position > *head;
            if moved {
                *head = position;
            }
            moved
        })
    }

    pub fn storage(&self, what: &str, e: &sqlx::Error) -> Error {
        Error::Storage(format!("PostgreSQL at {}: {what}: {e}", self.url))
    }
}

/// True for errors after which the connection is gone or should be replaced, and the work can be
/// tried again on a new one: I/O, protocol, timeouts, and the server's connection-exception,
/// shutdown and too-many-connections codes.
pub(crate) fn is_connection_error(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|c| {
            c.starts_with("08") || matches!(&*c, "57P01" | "57P02" | "57P03" | "53300")
        }),
        _ => false,
    }
}

/// Exponential backoff: 20 ms doubling up to a cap.
pub(crate) struct Backoff {
    next: Duration,
    max: Duration,
    pub attempts: u32,
}

impl Backoff {
    pub fn new(max: Duration) -> Self {
        Self {
            next: Duration::from_millis(20),
            max,
            attempts: 0,
        }
    }

    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next.min(self.max);
        self.next = (self.next * 2).min(self.max);
        self.attempts += 1;
        wait
    }

    pub fn reset(&mut self) {
        self.next = Duration::from_millis(20);
        self.attempts = 0;
    }
}

/// The URL as messages show it: the password masked (`mageflow_store::mask_url`, the one
/// masking every crate uses).
fn redact(url: &str) -> String {
    mageflow_store::mask_url(url)
}

fn check_schema_name(schema: &str) -> Result<(), String> {
    let ok = !schema.is_empty()
        && schema.len() <= SCHEMA_NAME_BYTES_MAX
        && schema
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && !schema.as_bytes()[0].is_ascii_digit();
    if ok {
        Ok(())
    } else {
        Err(format!(
            "schema name {schema:?} must be 1 to {SCHEMA_NAME_BYTES_MAX} lowercase letters, digits \
             or '_', not starting with a digit"
        ))
    }
}

/// Drop a log's schema and everything in it, on a thread and runtime of its own, so it can be
/// called from `Drop` inside or outside a runtime (tests and benches make a schema per run).
pub fn drop_schema_blocking(url: &str, schema: &str) -> std::result::Result<(), String> {
    check_schema_name(schema)?;
    let (url, statement) = (
        url.to_owned(),
        format!("DROP SCHEMA IF EXISTS {schema} CASCADE"),
    );
    let dropped = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(async {
            use sqlx::{Connection, Executor};
            let mut conn = sqlx::PgConnection::connect(&url).await?;
            conn.execute(statement.as_str()).await?;
            conn.close().await
        })
        .map_err(|e| e.to_string())
    })
    .join();
    dropped.unwrap_or_else(|_| Err("the thread dropping the schema panicked".into()))
}

pub struct PgLog {
    shared: Arc<Shared>,
    jobs: Mutex<Option<mpsc::UnboundedSender<Job>>>,
    /// Closed (sender dropped) when the committer task ends.
    committer_done: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
    stop_listener: watch::Sender<bool>,
    listener: Mutex<Option<tokio::task::JoinHandle<()>>>,
    handle: tokio::runtime::Handle,
    runtime: Mutex<Option<tokio::runtime::Runtime>>,
}

/// What `start` sets up on the log's runtime.
struct Started {
    shared: Arc<Shared>,
    jobs: mpsc::UnboundedSender<Job>,
    committer_done: std::sync::mpsc::Receiver<()>,
    stop_listener: watch::Sender<bool>,
    listener: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values (an Option taken once) cannot be left half-updated.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PgLog {
    /// Connect to PostgreSQL at `url`, apply the migrations (creating the tables in an empty
    /// schema), and start the committer and the listener. Fails with `Error::Open` naming the
    /// URL (password hidden) and the cause if the server cannot be reached or the schema cannot
    /// be set up; open does not retry.
    pub async fn open(url: &str, options: PgOptions) -> Result<Self> {
        let shown = redact(url);
        let open_error = |reason: String| Error::Open {
            path: shown.clone(),
            reason,
        };
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(open_error(
                "not a PostgreSQL URL (postgres://user@host:port/database)".into(),
            ));
        }
        let mut connect = PgConnectOptions::from_str(url)
            .map_err(|e| open_error(format!("not a PostgreSQL URL: {e}")))?;
        if let Some(schema) = &options.schema {
            check_schema_name(schema).map_err(open_error)?;
            connect = connect.options([("search_path", schema)]);
        }
        // Every session of this log says which process and schema it belongs to (see the
        // `leader` module: a new orchestrator looks for other processes' sessions).
        connect = connect.application_name(&leader::application_name(options.schema.as_deref()));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(options.worker_threads.max(1))
            .thread_name("mageflow-pg")
            .enable_all()
            .build()
            .map_err(|e| open_error(format!("cannot start the log's I/O runtime: {e}")))?;
        let handle = runtime.handle().clone();
        let (tx, rx) = oneshot::channel();
        let url_shown = shown.clone();
        handle.spawn(async move {
            let _ = tx.send(start(url_shown, connect, options).await);
        });
        match rx.await {
            Ok(Ok(started)) => Ok(Self {
                shared: started.shared,
                jobs: Mutex::new(Some(started.jobs)),
                committer_done: Mutex::new(Some(started.committer_done)),
                stop_listener: started.stop_listener,
                listener: Mutex::new(Some(started.listener)),
                handle,
                runtime: Mutex::new(Some(runtime)),
            }),
            Ok(Err(e)) => {
                runtime.shutdown_background();
                Err(e)
            }
            Err(_) => {
                runtime.shutdown_background();
                Err(open_error(
                    "the log's I/O runtime stopped during open".into(),
                ))
            }
        }
    }

    /// Stop taking appends, let the committer finish every call already made (each resolves as
    /// usual), and stop the listener. Reads keep working until the log is dropped.
    pub fn close(&self) {
        drop(lock(&self.jobs).take());
        if let Some(done) = lock(&self.committer_done).take() {
            // Blocks until the committer has answered everything queued and ended.
            let _ = done.recv();
        }
        self.stop_listener.send_replace(true);
    }

    /// Backend process id of the committer's current connection (0 while disconnected): for
    /// operators (`pg_stat_activity`) and fault-injection tests (`pg_terminate_backend`).
    pub fn committer_backend_pid(&self) -> i32 {
        self.shared.committer_pid.load(Ordering::Acquire)
    }

    pub fn stats(&self) -> PgStats {
        let c = &self.shared.counters;
        PgStats {
            commits: c.commits.load(Ordering::Relaxed),
            fast_commits: c.fast_commits.load(Ordering::Relaxed),
            pipelined_commits: c.pipelined_commits.load(Ordering::Relaxed),
            pipeline_rollbacks: c.pipeline_rollbacks.load(Ordering::Relaxed),
            events: c.events.load(Ordering::Relaxed),
            retries: c.retries.load(Ordering::Relaxed),
            in_doubt: c.in_doubt.load(Ordering::Relaxed),
        }
    }

    /// Backend process id of the listener's current connection (0 before it connected).
    /// Take this log's orchestrator lock: one orchestrator per log (the `leader` module doc
    /// says how). Waits as a standby — saying once, as a warning, who holds it — while another
    /// session holds it. Held until the returned lock is dropped or the log closes.
    pub async fn orchestrator_lock(&self) -> Result<OrchestratorLock> {
        self.take_orchestrator_lock(true)
            .await?
            .ok_or_else(|| Error::Storage("the orchestrator lock was not taken".into()))
    }

    /// [`PgLog::orchestrator_lock`] without waiting: `None` if another session holds it (for
    /// work that must not run beside an orchestrator, such as rebuilding its hot tier).
    pub async fn try_orchestrator_lock(&self) -> Result<Option<OrchestratorLock>> {
        self.take_orchestrator_lock(false).await
    }

    async fn take_orchestrator_lock(&self, wait: bool) -> Result<Option<OrchestratorLock>> {
        let (taken_tx, taken) = oneshot::channel();
        let (lost_tx, lost) = watch::channel(false);
        let pid = Arc::new(AtomicI32::new(0));
        let task = self.handle.spawn(leader::run(
            self.shared.clone(),
            pid.clone(),
            lost_tx,
            taken_tx,
            wait,
        ));
        match taken.await {
            Ok(Ok(true)) => Ok(Some(OrchestratorLock::new(pid, lost, task))),
            Ok(Ok(false)) => Ok(None),
            Ok(Err(e)) => Err(self.shared.storage("take the orchestrator lock", &e)),
            Err(_) => Err(Error::Closed),
        }
    }

    pub fn listener_backend_pid(&self) -> i32 {
        self.shared.listener_pid.load(Ordering::Acquire)
    }

    /// Check the whole log, in one consistent snapshot (REPEATABLE READ): every archive row
    /// (checksum, decompression, framing, every event decoding as its stream's next seq from 1,
    /// last position at most the head), then every live row in position order (checksum,
    /// decoding, stream/seq, positions increasing up to the head row, each stream's live seqs
    /// continuing densely after its archived ones), and finally that live plus archived events
    /// account for every position up to the head (positions are dense from 1 when nothing was
    /// compacted). Returns the number of events, live and archived.
    pub fn verify(&self) -> Result<u64> {
        self.read("verify the log", |pool| async move {
            let mut tx = pool.begin().await?;
            sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                .execute(&mut *tx)
                .await?;
            let checked = verify_in(&mut tx).await?;
            tx.rollback().await?;
            Ok(checked)
        })?
    }

    /// Move `stream`'s live events with `seq <= up_to_seq` (all of them if `None`) into its
    /// archive, in one transaction: new segment rows after the ones archived before (seqs stay
    /// dense from 1; earlier rows are not rewritten), and their rows are deleted from
    /// `mageflow_events`. `snapshot`, if given, replaces the stream's snapshot (opaque bytes,
    /// e.g. the final state of a finished workflow); `None` keeps the one stored before. A
    /// stream with nothing archived and nothing to archive gets no row (its snapshot is not
    /// kept).
    ///
    /// Reads are unchanged by compaction (`read_stream`, `stream_version`, appends' version
    /// checks), except `read_all`, which serves live events only. Safe against concurrent
    /// appends and compactions of the same stream, from any process (see the `archive`
    /// module: a per-stream advisory lock, not the head lock). Damage found in the rows being
    /// moved is `Error::Corrupt` and nothing changes. A lost connection is
    /// retried like a read: the transaction either did not commit, or did and the retry finds
    /// nothing left to move (then `events` is 0). Blocks the calling thread, like the reads.
    pub fn compact(
        &self,
        stream: WorkflowId,
        up_to_seq: Option<u64>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<CompactStats> {
        let snapshot = Arc::new(snapshot);
        let stats = self.read("compact a stream", move |pool| {
            let snapshot = snapshot.clone();
            async move { archive::compact_on(&pool, stream, up_to_seq, snapshot.as_deref()).await }
        })??;
        if stats.events > 0 {
            lock(&self.shared.recent).archived(stream, up_to_seq.unwrap_or(u64::MAX));
        }
        Ok(stats)
    }

    /// Drop the task data of the signatures `nodes` of workflow `stream` (all of them if
    /// `nodes` is empty) from the log for good, leaving the audit trail: every event of the
    /// stream, archived or live, is replaced by its `mageflow_core::Payload::redact`ed form
    /// (kwargs → `{}`, message values, results and checkpoints → `null`, error messages →
    /// `"[redacted]"`, for those signatures only; kinds, nodes, attempts, statuses, times,
    /// actors, names and task names are kept), and the stream's snapshot is dropped.
    /// Positions, seqs, versions and event counts do not change; the redacted stream replays
    /// to the same statuses.
    ///
    /// One transaction under the stream's compaction lock (see the `archive` module); only
    /// events committed before it runs are redacted, so call it after the events it must
    /// cover (e.g. a cancel's) are committed. Damage found in the stream is `Error::Corrupt`
    /// and nothing changes. Idempotent: a lost connection is retried like a read (a retry after
    /// an unseen commit rewrites nothing and reports 0). The system stream holds no task data
    /// and is left alone. Blocks the calling thread, like the reads.
    pub fn redact(&self, stream: WorkflowId, nodes: Vec<NodeIndex>) -> Result<RedactStats> {
        if stream.is_system() {
            return Ok(RedactStats::default());
        }
        let nodes = Arc::new(nodes);
        // No read is served from memory meanwhile, and what was cached is dropped after.
        lock(&self.shared.recent).redacting(true);
        let redacted = self.read("redact a stream", move |pool| {
            let nodes = nodes.clone();
            async move { archive::redact_on(&pool, stream, &nodes).await }
        });
        lock(&self.shared.recent).redacting(false);
        redacted?
    }

    /// `stream`'s archive (summed over its segments), if it was ever compacted.
    pub fn archived(&self, stream: WorkflowId) -> Result<Option<ArchiveInfo>> {
        let row = self.read("read an archive row", move |pool| async move {
            sqlx::query_as::<_, archive::InfoRow>(archive::INFO_QUERY)
                .bind(stream.0)
                .fetch_optional(&pool)
                .await
        })?;
        Ok(row.map(archive::info_from_row))
    }

    /// The snapshot stored by the last compaction of `stream` that gave one.
    pub fn snapshot(&self, stream: WorkflowId) -> Result<Option<Vec<u8>>> {
        let snapshot: Option<Option<Vec<u8>>> =
            self.read("read a snapshot", move |pool| async move {
                sqlx::query_scalar("SELECT snapshot FROM mageflow_snapshot WHERE stream = $1")
                    .bind(stream.0)
                    .fetch_optional(&pool)
                    .await
            })?;
        Ok(snapshot.flatten())
    }

    /// Run `fut` on the log's runtime and wait for it on this thread.
    fn call<T: Send + 'static>(
        &self,
        fut: impl Future<Output = Result<T>> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.handle.spawn(async move {
            let _ = tx.send(fut.await);
        });
        // A runtime that is shut down drops the task, and with it the sender.
        rx.recv().unwrap_or(Err(Error::Closed))
    }

    /// A read query on the pool, retried on a lost connection.
    fn read<T, F, Fut>(&self, what: &'static str, query: F) -> Result<T>
    where
        T: Send + 'static,
        F: Fn(PgPool) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, sqlx::Error>> + Send,
    {
        let shared = self.shared.clone();
        self.call(async move {
            let mut backoff = Backoff::new(Duration::from_millis(500));
            loop {
                match query(shared.pool.clone()).await {
                    Ok(v) => return Ok(v),
                    Err(e)
                        if is_connection_error(&e) && backoff.attempts + 1 < READ_ATTEMPTS_MAX =>
                    {
                        let wait = backoff.next_wait();
                        tracing::warn!(
                            url = %shared.url,
                            error = %e,
                            retry_in_ms = wait.as_millis() as u64,
                            "event log read ({what}) lost its PostgreSQL connection; retrying"
                        );
                        tokio::time::sleep(wait).await;
                    }
                    Err(e) => return Err(shared.storage(what, &e)),
                }
            }
        })
    }

    fn fetch_rows_from(&self, from: u64, limit: i64) -> Result<Vec<Row>> {
        self.read("read events by position", move |pool| async move {
            sqlx::query_as::<_, Row>(
                "SELECT position, stream, seq, payload, crc32 FROM mageflow_events \
                 WHERE position >= $1 ORDER BY position LIMIT $2",
            )
            .bind(from as i64)
            .bind(limit)
            .fetch_all(&pool)
            .await
        })
    }
}

impl Drop for PgLog {
    fn drop(&mut self) {
        self.close();
        // Say goodbye to the server on every connection rather than just closing sockets.
        let listener = lock(&self.listener).take();
        let pool = self.shared.pool.clone();
        let _ = self.call(async move {
            if let Some(listener) = listener {
                let _ = listener.await;
            }
            pool.close().await;
            Ok(())
        });
        if let Some(runtime) = lock(&self.runtime).take() {
            // Allowed inside another runtime, unlike a plain drop; every connection task ends.
            runtime.shutdown_background();
        }
    }
}

/// Open's work, on the log's runtime: connect, migrate, LISTEN, read the head, spawn the tasks.
async fn start(url: String, connect: PgConnectOptions, options: PgOptions) -> Result<Started> {
    let open_error = |reason: String| Error::Open {
        path: url.clone(),
        reason,
    };
    let connect_timeout = Duration::from_millis(options.connect_timeout_ms.max(1));
    let committer_options = connect
        .clone()
        .application_name("mageflow-committer")
        // A committer that vanishes mid-transaction must not hold the head lock for long.
        .options([("idle_in_transaction_session_timeout", "60s")]);
    let mut conn = match tokio::time::timeout(
        connect_timeout,
        PgConnection::connect_with(&committer_options),
    )
    .await
    {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return Err(open_error(format!("PostgreSQL is not reachable: {e}"))),
        Err(_) => {
            return Err(open_error(format!(
                "PostgreSQL is not reachable: no connection within {} ms",
                connect_timeout.as_millis()
            )))
        }
    };
    if let Some(schema) = &options.schema {
        // The name was checked: lowercase letters, digits and '_' need no quoting.
        conn.execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
            .await
            .map_err(|e| open_error(format!("cannot create schema {schema}: {e}")))?;
    }
    let current: Option<String> = sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| open_error(format!("cannot read the current schema: {e}")))?;
    let schema = match (current, &options.schema) {
        (Some(current), Some(wanted)) if current != *wanted => {
            return Err(open_error(format!(
                "the connection's schema is {current}, not {wanted}: check the URL's search_path"
            )))
        }
        (Some(current), _) => current,
        (None, _) => {
            return Err(open_error(
                "no schema: the search_path names no existing schema".into(),
            ))
        }
    };
    let channel = format!("{CHANNEL_PREFIX}{schema}");
    if channel.len() > 63 {
        return Err(open_error(format!(
            "schema name {schema} is longer than {SCHEMA_NAME_BYTES_MAX} bytes"
        )));
    }
    // `run_direct` is `run` on a connection without the `Acquire` bound that makes the future
    // impossible to spawn (sqlx's documented workaround).
    MIGRATOR.run_direct(&mut conn).await.map_err(|e| {
        open_error(format!(
            "cannot apply the migrations to schema {schema}: {e}"
        ))
    })?;
    let committer_pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut conn)
        .await
        .map_err(|e| open_error(format!("cannot read the backend pid: {e}")))?;

    let pool = PgPoolOptions::new()
        .max_connections(options.read_connections_max.max(1))
        .min_connections(0)
        .acquire_timeout(connect_timeout)
        // A dead connection fails its query, which is retried on a fresh one: no ping per read.
        .test_before_acquire(false)
        .connect_lazy_with(connect.clone().application_name("mageflow-reader"));
    let listener_pool = PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(connect_timeout)
        .connect_lazy_with(connect.clone().application_name("mageflow-listener"));
    let mut listener = listener::connect(&listener_pool, &channel)
        .await
        .map_err(|e| open_error(format!("cannot LISTEN on {channel}: {e}")))?;
    // Read the head only once LISTEN is in place: every later commit is notified.
    let (listener_pid, head) = listener::pid_and_head(&mut listener)
        .await
        .map_err(|e| open_error(format!("cannot read the head row: {e}")))?;

    let shared = Arc::new(Shared {
        counters: Counters::default(),
        url: url.clone(),
        pool,
        head: watch::channel(head).0,
        committer_pid: AtomicI32::new(committer_pid),
        listener_pid: AtomicI32::new(listener_pid),
        channel,
        recent: Mutex::default(),
    });
    let (stop_listener, stop_rx) = watch::channel(false);
    let listener = tokio::spawn(listener::run(
        listener,
        listener_pool,
        shared.clone(),
        stop_rx,
        options.backoff_max_ms,
    ));
    let (jobs, job_rx) = mpsc::unbounded_channel();
    let (done_tx, committer_done) = std::sync::mpsc::channel::<()>();
    let committer = Committer::new(shared.clone(), committer_options, conn, &options);
    tokio::spawn(async move {
        committer.run(job_rx).await;
        drop(done_tx);
    });
    tracing::info!(url = %url, schema = %shared.channel, head, "PostgreSQL event log open");
    Ok(Started {
        shared,
        jobs,
        committer_done,
        stop_listener,
        listener,
    })
}

/// Validate and encode one call's requests on the caller's thread. The first malformed request
/// cuts the call: the requests before it are still version-checked (a conflict there is
/// reported first, as every backend does), then the call is refused with its error.
fn prepare(requests: &[AppendRequest]) -> (Vec<Prepared>, Option<Error>, usize, usize) {
    let mut prepared = Vec::with_capacity(requests.len());
    let (mut events, mut bytes) = (0, 0);
    for req in requests {
        if let Err(e) = check_request(req) {
            return (prepared, Some(e), events, bytes);
        }
        let mut tuples = Tuples::with_capacity(req.events.len());
        for event in &req.events {
            if let Err(e) = tuples.push(event) {
                return (prepared, Some(e), events, bytes);
            }
        }
        events += tuples.len();
        bytes += tuples.bytes_len();
        prepared.push(Prepared {
            stream: req.stream,
            expected: req.expected_version,
            tuples,
        });
    }
    (prepared, None, events, bytes)
}

/// A stream's version, in one statement (one snapshot): the greater of its last live seq and
/// its last archived seq (archived seqs all lie below live ones; either may be absent).
const STREAM_VERSION: &str = "SELECT GREATEST(\
     COALESCE((SELECT max(seq) FROM mageflow_events WHERE stream = $1), 0), \
     COALESCE((SELECT max(last_seq) FROM mageflow_archive WHERE stream = $1), 0))";

/// A row of `read_stream`'s query: (kind, position, payload, row crc32, then the archive's
/// segment columns; a live row's seq is in the `last_seq` column).
type StreamRow = (
    i16,
    Option<i64>,
    Option<Vec<u8>>,
    Option<i32>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<Vec<u8>>,
    Option<i32>,
);

/// Split `read_stream`'s rows into the archive's segment rows (in seq order) and the live rows.
fn split_stream_rows(
    stream: WorkflowId,
    mixed: Vec<StreamRow>,
) -> Result<(Vec<Segment>, Vec<Row>)> {
    let mut archive = Vec::new();
    let mut rows = Vec::with_capacity(mixed.len());
    for row in mixed {
        match row {
            (
                0,
                _,
                _,
                _,
                Some(first),
                Some(last),
                Some(events),
                Some(raw),
                Some(segment),
                Some(crc),
            ) => {
                archive.push((first, last, events, raw, segment, crc));
            }
            (1, Some(position), Some(payload), Some(crc), _, Some(seq), ..) => {
                rows.push((position, stream.0, seq, payload, crc));
            }
            _ => {
                return Err(Error::Corrupt(format!(
                    "stream {stream}: a row of its archive or events has NULL columns"
                )))
            }
        }
    }
    Ok((archive, rows))
}

/// An archive row with its stream, as `verify` reads them.
type StreamArchiveRow = (uuid::Uuid, i64, i64, i64, i64, Vec<u8>, i32, i64);

/// `verify`'s work inside its snapshot. The outer error is PostgreSQL's, the inner one damage.
async fn verify_in(conn: &mut PgConnection) -> Result<Result<u64>, sqlx::Error> {
    const ARCHIVE_CHUNK_ROWS: i64 = 64;
    const CHUNK_ROWS: i64 = 4096;
    let head: i64 = sqlx::query_scalar("SELECT position FROM mageflow_head")
        .fetch_one(&mut *conn)
        .await?;
    let head = head.max(0) as u64;

    let mut versions: HashMap<WorkflowId, u64> = HashMap::new();
    let (mut archived, mut archived_position_max) = (0u64, 0u64);
    let mut after: (Option<uuid::Uuid>, i64) = (None, 0);
    loop {
        let rows: Vec<StreamArchiveRow> = sqlx::query_as(&format!(
            "SELECT stream, {SEGMENT_COLUMNS}, last_position FROM mageflow_archive \
                 WHERE $1::uuid IS NULL OR (stream, first_seq) > ($1, $2) \
                 ORDER BY stream, first_seq LIMIT $3"
        ))
        .bind(after.0)
        .bind(after.1)
        .bind(ARCHIVE_CHUNK_ROWS)
        .fetch_all(&mut *conn)
        .await?;
        let n = rows.len();
        for (id, first, last, events, raw, segment, crc, last_position) in rows {
            let stream = WorkflowId(id);
            let segment: Segment = (first, last, events, raw, segment, crc);
            let count =
                match tokio::task::block_in_place(|| archive::check_segment(stream, &segment)) {
                    Ok(count) => count,
                    Err(e) => return Ok(Err(e)),
                };
            // Segments run densely from seq 1 (rows come in (stream, first_seq) order).
            let version = versions.entry(stream).or_default();
            if first != *version as i64 + 1 {
                return Ok(Err(Error::Corrupt(format!(
                    "archive of stream {stream}: a segment starts at seq {first} where seq {} \
                     was expected",
                    *version + 1
                ))));
            }
            *version += count;
            let last_position = last_position.max(0) as u64;
            if last_position > head || last_position < *version {
                return Ok(Err(Error::Corrupt(format!(
                    "archive of stream {stream}: its events up to seq {version} end at \
                     position {last_position}, but the head row says {head}"
                ))));
            }
            archived += count;
            archived_position_max = archived_position_max.max(last_position);
            after = (Some(id), first);
        }
        if (n as i64) < ARCHIVE_CHUNK_ROWS {
            break;
        }
    }

    let (mut live, mut previous) = (0u64, 0u64);
    loop {
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT position, stream, seq, payload, crc32 FROM mageflow_events \
             WHERE position > $1 ORDER BY position LIMIT $2",
        )
        .bind(previous as i64)
        .bind(CHUNK_ROWS)
        .fetch_all(&mut *conn)
        .await?;
        let n = rows.len();
        for row in &rows {
            let r = match decode_row(row) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            if r.position <= previous || r.position > head {
                return Ok(Err(Error::Corrupt(format!(
                    "event at position {} is out of order (after {previous}) or past the head \
                     row ({head})",
                    r.position
                ))));
            }
            // A gap no compaction explains (with no archive: any gap).
            if r.position > previous + 1 && previous + 1 > archived_position_max {
                return Ok(Err(Error::Corrupt(format!(
                    "event at position {} is missing",
                    previous + 1
                ))));
            }
            let v = versions.entry(r.event.stream).or_default();
            if r.event.seq != *v + 1 {
                return Ok(Err(Error::Corrupt(format!(
                    "event at position {} is {} seq {}, but that stream's previous event \
                     (archived or live) has seq {v}",
                    r.position, r.event.stream, r.event.seq
                ))));
            }
            *v += 1;
            live += 1;
            previous = r.position;
        }
        if (n as i64) < CHUNK_ROWS {
            break;
        }
    }
    if live + archived != head {
        return Ok(Err(Error::Corrupt(if archived == 0 {
            format!(
                "the log ends at position {previous}, but its head row says {head}: event at \
                 position {} is missing",
                previous + 1
            )
        } else {
            format!(
                "the log holds {} events ({live} live, {archived} archived), but its head row \
                 says {head}",
                live + archived
            )
        })));
    }
    Ok(Ok(live + archived))
}

fn decode_all(rows: &[Row]) -> Result<Vec<Recorded>> {
    rows.iter().map(decode_row).collect()
}

impl EventLog for PgLog {
    fn append(&self, requests: Vec<AppendRequest>) -> BoxFuture<'static, Result<Vec<u64>>> {
        let (prepared, invalid, events, bytes) = prepare(&requests);
        drop(requests);
        if prepared.is_empty() {
            if let Some(e) = invalid {
                return Box::pin(async move { Err(e) });
            }
        }
        let (reply, rx) = oneshot::channel();
        let job = Job {
            requests: prepared,
            invalid,
            events,
            bytes,
            reply,
        };
        let sent = match &*lock(&self.jobs) {
            Some(tx) => tx.send(job).is_ok(),
            None => false,
        };
        mageflow_store::committed_reply(sent, rx)
    }

    /// The stream's archived events (if it was compacted: decoded from its segment, every
    /// check of a live row applied to them too) followed by its live rows, read in one
    /// statement (one snapshot: a concurrent compaction is seen whole or not at all). The seqs
    /// must run densely from `from_seq` across both.
    fn read_stream(&self, stream: WorkflowId, from_seq: u64) -> Result<Vec<Event>> {
        let first_seq = from_seq.max(1);
        let Ok(from) = i64::try_from(first_seq) else {
            return Ok(Vec::new());
        };
        let (archive, rows) = self.read("read a stream", move |pool| async move {
            // Kind 0: the archive's segment rows holding seqs >= from, as their columns; kind
            // 1: live rows. Unused columns are NULL.
            let mixed: Vec<StreamRow> = sqlx::query_as(&format!(
                "SELECT 0::smallint AS kind, NULL::bigint AS position, NULL::bytea AS payload, \
                 NULL::integer AS row_crc, {SEGMENT_COLUMNS} FROM mageflow_archive \
                 WHERE stream = $1 AND last_seq >= $2 \
                 UNION ALL \
                 SELECT 1::smallint, position, payload, crc32, NULL, seq, NULL, NULL, NULL, NULL \
                 FROM mageflow_events WHERE stream = $1 AND seq >= $2 \
                 ORDER BY kind, last_seq"
            ))
            .bind(stream.0)
            .bind(from)
            .fetch_all(&pool)
            .await?;
            Ok(split_stream_rows(stream, mixed))
        })??;
        let mut events = archive::decode_segments(stream, &archive, first_seq)?;
        for row in &rows {
            let r = decode_row(row)?;
            let seq = first_seq + events.len() as u64;
            if r.event.seq != seq {
                return Err(Error::Corrupt(format!(
                    "stream {stream} has no event with seq {seq} (the next one, at position {}, \
                     has seq {})",
                    r.position, r.event.seq
                )));
            }
            events.push(r.event);
        }
        Ok(events)
    }

    /// Up to `limit` **live** events with `position >= from`, in position order. Events moved to
    /// the archive by [`PgLog::compact`] are no longer in the table: they leave gaps in the
    /// positions returned here, and are read (in full) through `read_stream`.
    fn read_all(&self, from: u64, limit: usize) -> Result<Vec<Recorded>> {
        let from = from.max(1);
        let Ok(from_i) = i64::try_from(from) else {
            return Ok(Vec::new());
        };
        if limit == 0 {
            return Ok(Vec::new());
        }
        let cached = lock(&self.shared.recent).read(from, limit, self.head());
        if let Some(cached) = cached {
            return cached
                .into_iter()
                .map(|(position, payload)| {
                    let event = mageflow_core::codec::decode(&payload).map_err(|e| {
                        Error::Corrupt(format!("cached event at position {position}: {e}"))
                    })?;
                    Ok(Recorded { position, event })
                })
                .collect();
        }
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self.fetch_rows_from(from_i as u64, limit)?;
        let records = decode_all(&rows)?;
        // Compaction leaves gaps (archived events are read with `read_stream`), so positions
        // need not be consecutive. They must still increase strictly from `from`; a stream's
        // live events are always a suffix of it, so the events of one stream in this batch must
        // have consecutive seqs; and a missing position must be at or below the highest
        // position ever archived (with no archive at all, positions must be dense).
        let mut previous = from - 1;
        let mut gaps: Vec<(u64, u64)> = Vec::new();
        let mut last_of: HashMap<WorkflowId, (u64, u64)> = HashMap::new();
        let mut broken_stream = None;
        for r in &records {
            if r.position <= previous {
                return Err(Error::Corrupt(format!(
                    "event at position {} follows position {previous} in a read by position",
                    r.position
                )));
            }
            if r.position > previous + 1 {
                gaps.push((previous + 1, r.position - 1));
            }
            previous = r.position;
            let (stream, seq) = (r.event.stream, r.event.seq);
            if let Some((last_seq, last_position)) = last_of.insert(stream, (seq, r.position)) {
                if seq != last_seq + 1 && broken_stream.is_none() {
                    broken_stream = Some(Error::Corrupt(format!(
                        "stream {stream} has no event with seq {} (seq {last_seq} is at position \
                         {last_position}, the next one, at position {}, has seq {seq})",
                        last_seq + 1,
                        r.position
                    )));
                }
            }
        }
        // A missing position is reported first (it explains a stream's missing seq).
        if let Some(&(_, last_missing)) = gaps.last() {
            let archived_max: i64 =
                self.read("read the archive's last position", |pool| async move {
                    sqlx::query_scalar(
                        "SELECT COALESCE(max(last_position), 0) FROM mageflow_archive",
                    )
                    .fetch_one(&pool)
                    .await
                })?;
            if last_missing > archived_max as u64 {
                // Report the first missing position that no compaction can explain.
                let above = archived_max as u64 + 1;
                let shown = gaps
                    .iter()
                    .find(|&&(_, last)| last >= above)
                    .map_or(above, |&(first, _)| first.max(above));
                return Err(Error::Corrupt(format!(
                    "event at position {shown} is missing (not in the table, and no archived \
                     event lies at or above it)"
                )));
            }
        }
        match broken_stream {
            Some(e) => Err(e),
            None => Ok(records),
        }
    }

    fn stream_version(&self, stream: WorkflowId) -> Result<u64> {
        let v: i64 = self.read("read a stream version", move |pool| async move {
            sqlx::query_scalar(STREAM_VERSION)
                .bind(stream.0)
                .fetch_one(&pool)
                .await
        })?;
        Ok(v as u64)
    }

    fn head(&self) -> u64 {
        *self.shared.head.borrow()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.head.subscribe()
    }

    fn redact(&self, stream: WorkflowId, nodes: Vec<NodeIndex>) -> Result<Option<u64>> {
        PgLog::redact(self, stream, nodes).map(|r| Some(r.events_rewritten + r.archived_rewritten))
    }

    fn compact(
        &self,
        stream: WorkflowId,
        up_to_seq: Option<u64>,
        snapshot: Option<Vec<u8>>,
    ) -> Result<Option<CompactStats>> {
        PgLog::compact(self, stream, up_to_seq, snapshot).map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db?x=1"),
            "postgres://u:***@h:5432/db?x=1"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
        assert_eq!(redact("not a url"), "not a url");
    }

    #[test]
    fn schema_names() {
        assert!(check_schema_name("mageflow_test_0a1b").is_ok());
        assert!(check_schema_name("").is_err());
        assert!(check_schema_name("1abc").is_err());
        assert!(check_schema_name("Abc").is_err());
        assert!(check_schema_name("a;drop").is_err());
        assert!(check_schema_name(&"a".repeat(SCHEMA_NAME_BYTES_MAX)).is_ok());
        assert!(check_schema_name(&"a".repeat(SCHEMA_NAME_BYTES_MAX + 1)).is_err());
    }
}
