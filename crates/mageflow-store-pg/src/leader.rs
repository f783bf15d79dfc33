//! One orchestrator per log: a session-level advisory lock, keyed by the log's schema (advisory
//! locks are per database), held on a connection of its own for as long as the orchestrator
//! runs. A second orchestrator started on the same log waits for it — a standby, polling every
//! second and saying once who holds it — and takes over when the holder's session ends: its
//! process stopped or died (the kernel closes the socket, PostgreSQL ends the session and
//! releases the lock), or the server restarted.
//!
//! The lock is not what keeps the log consistent — positions are assigned under the head row
//! lock and every append checks its streams' versions, whoever writes — but two orchestrators
//! would both start the same queued tasks, read the same reports and project the same batches,
//! each losing half its appends to version conflicts (and reloading the workflows they touch).
//!
//! The holder checks its session every second. When it is gone, the holder leaves standbys two
//! seconds (two of their polls) to take over — its own connection just failed, theirs work —
//! then takes the lock again on a new connection, unless a standby got it: then the lock is
//! lost for good and [`OrchestratorLock::lost`] resolves — the orchestrator must stop. So that
//! it has, a new holder waits four seconds more before it starts when another opened log has
//! sessions on this one (every session carries `mageflow:<pid>.<n>:<schema>` as its
//! `application_name`): the old holder may be alive and not know yet. One that died or stopped
//! has none left, and the new holder starts at once. (A holder cut off from the server without
//! its socket closing keeps the lock until PostgreSQL notices, which the server's
//! `tcp_keepalives_*` and `client_connection_check_interval` settings bound.)

use crate::{Backoff, Shared};
use sqlx::PgConnection;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// The lock's key: one per schema.
const KEY: &str = "hashtextextended('mageflow orchestrator ' || current_schema(), 0)";
/// How often a standby asks for the lock, and how often the holder checks its session.
const POLL: Duration = Duration::from_secs(1);
/// How long a holder whose session ended leaves standbys to take the lock first.
const STANDBY_FIRST: Duration = Duration::from_secs(2);
/// How long a new holder waits before it returns while another opened log still has sessions
/// on this one: a holder whose lock session ended runs on until it learns it lost the lock — it
/// notices within [`POLL`], leaves standbys [`STANDBY_FIRST`], then asks — and must have
/// stopped before the new one starts.
const TAKEOVER_FENCE: Duration = Duration::from_secs(4);

/// `application_name` of every session of one opened log: `mageflow:<pid>.<n>:<schema>`, `n`
/// counting the logs this process opened (cut to PostgreSQL's 63 bytes).
pub(crate) fn application_name(schema: Option<&str>) -> String {
    static OPENED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = OPENED.fetch_add(1, Ordering::Relaxed);
    let mut name = format!(
        "mageflow:{}.{n}:{}",
        std::process::id(),
        schema.unwrap_or("")
    );
    name.truncate(63);
    name
}

/// Sessions of this log (same schema) opened by another `PgLog` (another process, or another
/// instance in this one): an orchestrator that just lost the lock, a standby, a rebuild.
const OTHER_LOGS: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND application_name LIKE 'mageflow:%' \
     AND split_part(application_name, ':', 3) = current_schema() \
     AND split_part(application_name, ':', 2) <> split_part(current_setting('application_name'), ':', 2)";
/// Longest wait between reconnection attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// The deployment's orchestrator lock, held until dropped (see the module doc).
pub struct OrchestratorLock {
    pid: Arc<AtomicI32>,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl OrchestratorLock {
    pub(crate) fn new(
        pid: Arc<AtomicI32>,
        lost: watch::Receiver<bool>,
        task: tokio::task::JoinHandle<()>,
    ) -> Self {
        Self { pid, lost, task }
    }

    /// The PostgreSQL session holding the lock (`pg_stat_activity.pid`); 0 while it is being
    /// taken again after its session ended.
    pub fn backend_pid(&self) -> i32 {
        self.pid.load(Ordering::Acquire)
    }

    /// Whether another session took the lock after this one's ended.
    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves once the lock is lost for good (another orchestrator holds it); never while it
    /// is held. Does not borrow the lock.
    pub fn lost(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.lost.clone();
        async move {
            if rx.wait_for(|lost| *lost).await.is_err() {
                // The holding task ended without losing it (the log closed): nothing to wait for.
                std::future::pending::<()>().await;
            }
        }
    }
}

impl Drop for OrchestratorLock {
    fn drop(&mut self) {
        // Dropping the task drops its connection: PostgreSQL ends the session and releases the
        // lock.
        self.task.abort();
    }
}

/// Take the lock — waiting as a standby while another session holds it, or, unless `wait`,
/// trying once — then hold it. Runs on the log's runtime; `taken` says whether it is held (with
/// `wait`, once it is). Gives up if `taken`'s receiver is dropped before that.
pub(crate) async fn run(
    shared: Arc<Shared>,
    pid: Arc<AtomicI32>,
    lost: watch::Sender<bool>,
    mut taken: oneshot::Sender<Result<bool, sqlx::Error>>,
    wait: bool,
) {
    let conn = if wait {
        tokio::select! {
            conn = take(&shared, &pid) => conn,
            _ = taken.closed() => return,
        }
    } else {
        match try_lock(&shared, &mut None, &pid).await {
            Ok(Some(conn)) => conn,
            Ok(None) => {
                let _ = taken.send(Ok(false));
                return;
            }
            Err(e) => {
                let _ = taken.send(Err(e));
                return;
            }
        }
    };
    if taken.send(Ok(true)).is_err() {
        return;
    }
    hold(&shared, conn, &pid, &lost).await;
}

/// One try, on `conn` (taken from the log's pool if `None`, kept there while another session
/// holds the lock, dropped on an error): the connection, now holding the lock, or `None`.
async fn try_lock(
    shared: &Shared,
    conn: &mut Option<PgConnection>,
    pid: &AtomicI32,
) -> Result<Option<PgConnection>, sqlx::Error> {
    let c = match conn {
        Some(c) => c,
        None => conn.insert(shared.pool.acquire().await?.detach()),
    };
    let tried: Result<(bool, i32), sqlx::Error> = sqlx::query_as(&format!(
        "SELECT pg_try_advisory_lock({KEY}), pg_backend_pid()"
    ))
    .fetch_one(c)
    .await;
    let (got, backend) = tried.inspect_err(|_| *conn = None)?;
    if !got {
        return Ok(None);
    }
    pid.store(backend, Ordering::Release);
    Ok(conn.take())
}

/// Ask until the lock is this session's (a standby asks every [`POLL`]).
async fn take(shared: &Shared, pid: &AtomicI32) -> PgConnection {
    let mut backoff = Backoff::new(BACKOFF_MAX);
    let mut announced = false;
    let mut conn = None;
    loop {
        let wait = match try_lock(shared, &mut conn, pid).await {
            Ok(Some(mut conn)) => {
                // Another process on the log may be an orchestrator whose lock session just
                // ended and that does not know it yet (a standby, a rebuild: waiting costs only
                // time). One that died or stopped has no sessions left.
                let others: Result<i64, sqlx::Error> =
                    sqlx::query_scalar(OTHER_LOGS).fetch_one(&mut conn).await;
                if !matches!(others, Ok(0)) {
                    tracing::info!(url = %shared.url, others = ?others,
                        fence_ms = TAKEOVER_FENCE.as_millis() as u64,
                        "orchestrator lock taken while other processes have sessions on this \
                         log: starting once a previous orchestrator has surely stopped");
                    tokio::time::sleep(TAKEOVER_FENCE).await;
                } else if announced {
                    tracing::info!(url = %shared.url,
                        "the other orchestrator is gone: this one takes over");
                }
                return conn;
            }
            Ok(None) => {
                backoff.reset();
                if !announced {
                    announced = true;
                    let holder = holder(shared).await;
                    tracing::warn!(url = %shared.url, %holder,
                        "another orchestrator runs on this log; standing by until it stops");
                }
                POLL
            }
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::warn!(url = %shared.url, error = %e, retry_in_ms = wait.as_millis() as u64,
                    "cannot ask PostgreSQL for the orchestrator lock; retrying");
                wait
            }
        };
        tokio::time::sleep(wait).await;
    }
}

/// Check the session every [`POLL`]; when it is gone, leave standbys [`STANDBY_FIRST`] to take
/// the lock, then take it again — or, if a standby has it, say so on `lost` and end.
async fn hold(
    shared: &Shared,
    mut conn: PgConnection,
    pid: &AtomicI32,
    lost: &watch::Sender<bool>,
) {
    loop {
        tokio::time::sleep(POLL).await;
        let Err(e) = sqlx::query("SELECT 1").execute(&mut conn).await else {
            continue;
        };
        pid.store(0, Ordering::Release);
        tracing::warn!(url = %shared.url, error = %e,
            standby_first_ms = STANDBY_FIRST.as_millis() as u64,
            "the orchestrator lock's PostgreSQL session ended; taking the lock again unless a \
             standby takes it first");
        tokio::time::sleep(STANDBY_FIRST).await;
        let mut backoff = Backoff::new(BACKOFF_MAX);
        conn = loop {
            match try_lock(shared, &mut None, pid).await {
                Ok(Some(conn)) => {
                    tracing::info!(url = %shared.url, "orchestrator lock taken again");
                    break conn;
                }
                Ok(None) => {
                    let holder = holder(shared).await;
                    tracing::error!(url = %shared.url, %holder,
                        "another orchestrator took this log over while this one's lock session \
                         was down: this one must stop");
                    lost.send_replace(true);
                    return;
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(url = %shared.url, error = %e, retry_in_ms = wait.as_millis() as u64,
                        "cannot take the orchestrator lock again yet; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        };
    }
}

/// Who holds the lock, for the log line: session pid, client address, since when.
async fn holder(shared: &Shared) -> String {
    let found: Result<Option<(i32, String, String)>, sqlx::Error> = sqlx::query_as(&format!(
        "SELECT a.pid, COALESCE(host(a.client_addr), 'local socket'), a.backend_start::text \
         FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid \
         WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1 \
         AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         AND ((l.classid::bigint << 32) | l.objid::bigint) = {KEY}"
    ))
    .fetch_optional(&shared.pool)
    .await;
    match found {
        Ok(Some((pid, client, since))) => {
            format!("PostgreSQL session {pid}, client {client}, connected since {since}")
        }
        Ok(None) => "a session that just ended".to_owned(),
        Err(e) => format!("unknown ({e})"),
    }
}
