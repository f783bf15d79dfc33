//! Integration tests of the PostgreSQL event log against a real server: the conformance suite
//! every backend runs, migrations from an empty schema, several processes sharing one log,
//! corruption, connection loss (terminated backends, lost COMMIT replies), pipelined commits,
//! compaction into cold storage, and redaction of task data.
//!
//! Each test works in its own freshly created schema (`mageflow_test_<uuid>`), dropped at the
//! end even if the test fails, so tests run in parallel and leave nothing behind. The server is
//! `$MAGEFLOW_TEST_POSTGRES` (default `postgres://postgres@127.0.0.1:5432/test`); if it cannot
//! be reached, every test fails saying so: none is skipped.

mod compaction;
mod conformance;
mod connection_loss;
mod leader;
mod open;
mod pipeline;
mod processes;
mod redaction;

use mageflow_store_pg::{PgLog, PgOptions};
use sqlx::{Connection, Executor, PgConnection};
use std::time::Duration;

pub const URL_ENV: &str = "MAGEFLOW_TEST_POSTGRES";
pub const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// Guard against a hang (a missed wake-up), not a timing assertion: generous on purpose.
pub const WAIT_MAX: Duration = Duration::from_secs(60);

pub fn url() -> String {
    std::env::var(URL_ENV).unwrap_or_else(|_| DEFAULT_URL.to_owned())
}

/// A connection for the test itself (setup, inspection, fault injection). Fails the test with a
/// plain message when PostgreSQL is not reachable.
pub async fn connect(url: &str) -> PgConnection {
    match PgConnection::connect(url).await {
        Ok(conn) => conn,
        Err(e) => panic!(
            "PostgreSQL is not reachable at {url}: {e}\n\
             These tests need a running PostgreSQL. Start the local one with\n    \
             pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start\n\
             or point {URL_ENV} at a server (postgres://user@host:port/database)."
        ),
    }
}

/// A fresh, empty schema for one test; dropped with everything in it when this guard drops.
/// Declare it before the logs that use it, so that they are dropped (closed) first.
pub struct TestSchema {
    pub name: String,
    pub url: String,
}

impl TestSchema {
    pub async fn new() -> Self {
        let url = url();
        let mut conn = connect(&url).await;
        let name = format!("mageflow_test_{}", uuid::Uuid::now_v7().simple());
        conn.execute(format!("CREATE SCHEMA {name}").as_str())
            .await
            .unwrap_or_else(|e| panic!("create schema {name}: {e}"));
        Self { name, url }
    }

    pub fn options(&self) -> PgOptions {
        PgOptions {
            schema: Some(self.name.clone()),
            backoff_max_ms: 200,
            ..PgOptions::default()
        }
    }

    pub async fn open(&self) -> PgLog {
        self.open_with(self.options()).await
    }

    pub async fn open_with(&self, options: PgOptions) -> PgLog {
        PgLog::open(&self.url, options)
            .await
            .unwrap_or_else(|e| panic!("open the log in schema {}: {e}", self.name))
    }

    /// A connection whose search_path is this schema.
    pub async fn admin(&self) -> PgConnection {
        let mut conn = connect(&self.url).await;
        conn.execute(format!("SET search_path TO {}", self.name).as_str())
            .await
            .expect("set search_path");
        conn
    }
}

impl Drop for TestSchema {
    fn drop(&mut self) {
        // Drop may run inside the test's runtime (or while it unwinds).
        if let Err(e) = mageflow_store_pg::drop_schema_blocking(&self.url, &self.name) {
            eprintln!("could not drop test schema {}: {e}", self.name);
        }
    }
}
