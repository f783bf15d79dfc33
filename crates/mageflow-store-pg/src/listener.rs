//! The listener: keeps the head watch up to date with commits of every process. It LISTENs on
//! the log's channel (each committing transaction notifies its new head) and, whenever its
//! connection was lost and re-established, reads the head row once to catch up with commits it
//! could not hear. It only ever moves the watch forward and never scans the events table.

use crate::{Backoff, Shared};
use sqlx::postgres::{PgListener, PgPool};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// A listener connection with LISTEN in place.
pub(crate) async fn connect(pool: &PgPool, channel: &str) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(channel).await?;
    Ok(listener)
}

/// The listener connection's backend pid and the head row, read through the listener (which
/// reconnects and LISTENs again first if its connection was lost).
pub(crate) async fn pid_and_head(listener: &mut PgListener) -> Result<(i32, u64), sqlx::Error> {
    let (pid, head): (i32, i64) =
        sqlx::query_as("SELECT pg_backend_pid(), position FROM mageflow_head")
            .fetch_one(&mut *listener)
            .await?;
    Ok((pid, head as u64))
}

/// Wait `wait`, or less if the log is closing. False: stop.
async fn pause(stop: &mut watch::Receiver<bool>, wait: Duration) -> bool {
    tokio::select! {
        _ = stop.changed() => false,
        _ = tokio::time::sleep(wait) => true,
    }
}

pub(crate) async fn run(
    first: PgListener,
    pool: PgPool,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    backoff_max_ms: u64,
) {
    let mut backoff = Backoff::new(Duration::from_millis(backoff_max_ms.max(20)));
    let mut current = Some(first);
    let mut catch_up = false;
    loop {
        let listener = match &mut current {
            Some(listener) => listener,
            None => match connect(&pool, &shared.channel).await {
                Ok(listener) => {
                    catch_up = true;
                    current.insert(listener)
                }
                Err(e) => {
                    let wait = backoff.next_wait();
                    tracing::warn!(url = %shared.url, error = %e, retry_in_ms = wait.as_millis() as u64,
                        "event log listener cannot reach PostgreSQL; retrying");
                    if pause(&mut stop, wait).await {
                        continue;
                    }
                    break;
                }
            },
        };
        if catch_up {
            match pid_and_head(listener).await {
                Ok((pid, head)) => {
                    shared.listener_pid.store(pid, Ordering::Release);
                    let moved = shared.advance_head(head);
                    tracing::info!(url = %shared.url, pid, head, moved,
                        "event log listener reconnected and caught up with the head row");
                    catch_up = false;
                    backoff.reset();
                }
                Err(e) => {
                    // Start over on a new listener: this one may hold a dead connection.
                    current = None;
                    let wait = backoff.next_wait();
                    tracing::warn!(url = %shared.url, error = %e, retry_in_ms = wait.as_millis() as u64,
                        "event log listener cannot read the head row; reconnecting");
                    if pause(&mut stop, wait).await {
                        continue;
                    }
                    break;
                }
            }
        }
        tokio::select! {
            _ = stop.changed() => break,
            received = listener.try_recv() => match received {
                Ok(Some(note)) => match note.payload().parse::<u64>() {
                    Ok(head) => {
                        shared.advance_head(head);
                    }
                    Err(_) => tracing::warn!(payload = note.payload(),
                        "ignoring a notification that is not a log position"),
                },
                // The connection was lost and (eagerly) re-established with LISTEN in place:
                // whatever was committed meanwhile is read from the head row.
                Ok(None) => {
                    shared.listener_pid.store(0, Ordering::Release);
                    tracing::warn!(url = %shared.url,
                        "event log listener lost its PostgreSQL connection; catching up by position");
                    catch_up = true;
                }
                Err(sqlx::Error::PoolClosed) => break,
                Err(e) => {
                    // E.g. the server's FATAL message before it closes the connection, or no
                    // new connection: start over on a new listener.
                    shared.listener_pid.store(0, Ordering::Release);
                    current = None;
                    let wait = backoff.next_wait();
                    tracing::warn!(url = %shared.url, error = %e, retry_in_ms = wait.as_millis() as u64,
                        "event log listener lost its PostgreSQL connection; reconnecting");
                    if !pause(&mut stop, wait).await {
                        break;
                    }
                }
            }
        }
    }
    drop(current);
    pool.close().await;
}
