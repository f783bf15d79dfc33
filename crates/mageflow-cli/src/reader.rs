//! How the read-only commands (`history`, `verify`, `state`) open a log: an embedded store or a
//! PostgreSQL schema that already holds one — never creating one, and never taking an embedded
//! store away from the `mageflow serve` that holds it.
//!
//! sled 0.34 has no read-only mode, and a store belongs to the one process holding its lock.
//! So when that lock is held, the files are copied to a temporary directory (the head guard
//! first, sled's log last, so the copy can only be behind the guard, never ahead of it) and the
//! copy is opened instead; open checks every block of it, and a copy taken in the middle of a
//! write that does not check is taken again. The caller says in its output that it read a
//! snapshot. Nothing here writes to the store it reads (opening a store that nobody holds does
//! what any open does: it drops the blocks of an interrupted commit, never acknowledged).

use crate::tiers::{existing_store, LogTier, StoreArgs};
use anyhow::{bail, Context, Result};
use mageflow::store::{self, EventLog, SledLog, SledOptions};
use mageflow::store_pg::{PgLog, PgOptions};
use mageflow::{Event, WorkflowId};
use std::path::{Path, PathBuf};

/// Copies of a live store taken before giving up: a copy can catch a write half done.
const SNAPSHOT_ATTEMPTS_MAX: u32 = 3;

/// An opened log, and what was opened.
pub struct ReadLog {
    log: Backend,
    /// Where the log is, for messages (a PostgreSQL URL with its password masked).
    pub shown: String,
    /// Set when this is a copy of a store that a running process holds.
    pub snapshot: Option<Snapshot>,
}

enum Backend {
    // Declared before the copy it may read from, so it is closed before that is removed.
    Sled(SledLog),
    Pg(PgLog),
}

/// A copy of a live embedded store, removed when dropped (after the log opened on it).
pub struct Snapshot {
    _dir: tempfile::TempDir,
    pub taken_at: mageflow::core::Timestamp,
}

impl ReadLog {
    /// Open the log `args` name (`--store embedded:PATH`, or `--postgres URL [--schema S]`),
    /// refusing one that does not exist.
    pub async fn open(args: &StoreArgs, command: &str) -> Result<Self> {
        match args.log(command)? {
            LogTier::Embedded(dir) => open_embedded(&dir),
            LogTier::Postgres { url, schema } => open_postgres(&url, schema).await,
        }
    }

    pub fn read_stream(&self, wf: WorkflowId) -> Result<Vec<Event>> {
        Ok(match &self.log {
            Backend::Sled(l) => l.read_stream(wf, 1)?,
            Backend::Pg(l) => l.read_stream(wf, 1)?,
        })
    }

    /// Check the whole log; the number of events.
    pub fn verify(&self) -> Result<u64> {
        Ok(match &self.log {
            Backend::Sled(l) => l.verify()?,
            Backend::Pg(l) => l.verify()?,
        })
    }

    /// One line for the output when this is a snapshot of a live store.
    pub fn snapshot_note(&self) -> Option<String> {
        self.snapshot.as_ref().map(|s| {
            format!(
                "note: {} is held by a running process (`mageflow serve`?); this read a \
                 snapshot of the live store, copied at {}: events after that are not shown",
                self.shown, s.taken_at
            )
        })
    }
}

fn open_embedded(dir: &Path) -> Result<ReadLog> {
    existing_store(dir)?;
    let shown = format!("embedded:{}", dir.display());
    if !is_locked(dir)? {
        match SledLog::open(dir, SledOptions::default()) {
            Ok(log) => {
                return Ok(ReadLog {
                    log: Backend::Sled(log),
                    shown,
                    snapshot: None,
                })
            }
            // Taken between the probe and the open: read a copy, as below.
            Err(store::Error::Locked { .. }) => {}
            Err(e) => {
                return Err(e).with_context(|| format!("cannot open the store at {shown}"));
            }
        }
    }
    let mut last = None;
    for _ in 0..SNAPSHOT_ATTEMPTS_MAX {
        let copy = tempfile::Builder::new()
            .prefix("mageflow-snapshot-")
            .tempdir()
            .context("cannot create a temporary directory for a snapshot of the live store")?;
        let taken_at = mageflow::engine::now();
        copy_store(dir, copy.path())
            .with_context(|| format!("cannot copy the live store at {shown}"))?;
        match SledLog::open(copy.path(), SledOptions::default()) {
            Ok(log) => {
                return Ok(ReadLog {
                    log: Backend::Sled(log),
                    shown,
                    snapshot: Some(Snapshot {
                        _dir: copy,
                        taken_at,
                    }),
                })
            }
            // A copy that caught a write half done: take another.
            Err(e @ (store::Error::Corrupt(_) | store::Error::Missing { .. })) => last = Some(e),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("cannot open a snapshot of the live store at {shown}")
                })
            }
        }
    }
    match last {
        Some(e) => Err(e).with_context(|| {
            format!(
                "{SNAPSHOT_ATTEMPTS_MAX} snapshots of the live store at {shown} did not check \
                 (the store may be damaged: stop its process and run `mageflow verify` on it)"
            )
        }),
        None => bail!("no snapshot of the live store at {shown} was taken"),
    }
}

/// Whether another process (or another log in this one) holds the store's lock: sled locks its
/// `db` file with `flock`, so a lock of our own on it tells, without sled's two-second wait.
fn is_locked(dir: &Path) -> Result<bool> {
    use fs2::FileExt;
    let db = dir.join("db");
    let file = match std::fs::File::open(&db) {
        Ok(f) => f,
        // No `db`: opening says what is missing.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", db.display())),
    };
    match file.try_lock_exclusive() {
        Ok(()) => {
            file.unlock()
                .with_context(|| format!("cannot unlock {}", db.display()))?;
            Ok(false)
        }
        Err(e) if e.kind() == fs2::lock_contended_error().kind() => Ok(true),
        Err(e) => Err(e).with_context(|| format!("cannot test the lock of {}", db.display())),
    }
}

/// Copy a store's files into `to`: the head guard first and sled's log (`db`) after its
/// snapshots and configuration, so that what the copy holds is never behind what its guard says
/// was acknowledged; blobs last, so every blob the copied log points to was written already.
fn copy_store(from: &Path, to: &Path) -> Result<()> {
    let rank = |name: &str| match name {
        "mageflow.head" => 0,
        n if n.starts_with("snap.") => 1,
        "conf" => 2,
        "db" => 3,
        _ => 4,
    };
    let mut entries: Vec<(u8, PathBuf, String)> = Vec::new();
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        entries.push((rank(&name), entry.path(), name));
    }
    entries.sort();
    for (_, path, name) in entries {
        copy_tree(&path, &to.join(name))?;
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = match std::fs::metadata(from) {
        Ok(m) => m,
        // Removed by the live process meanwhile (an old sled snapshot, a replaced blob).
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", from.display())),
    };
    if meta.is_dir() {
        std::fs::create_dir_all(to).with_context(|| format!("cannot create {}", to.display()))?;
        for entry in std::fs::read_dir(from)? {
            let entry = entry?;
            copy_tree(&entry.path(), &to.join(entry.file_name()))?;
        }
        return Ok(());
    }
    match std::fs::copy(from, to) {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("cannot copy {} to {}", from.display(), to.display()))
        }
    }
}

async fn open_postgres(url: &str, schema: Option<String>) -> Result<ReadLog> {
    let shown = store::mask_url(url);
    let where_ = match &schema {
        Some(s) => format!("schema {s} of {shown}"),
        None => format!("the search_path schema of {shown}"),
    };
    if !pg_log_exists(url, schema.as_deref())
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {shown}"))?
    {
        bail!(
            "no mageflow log in {where_}: it has no mageflow_head table (check --schema / \
             MAGEFLOW_SCHEMA; `mageflow migrate` or `mageflow serve` creates one). Nothing was \
             created."
        );
    }
    let log = PgLog::open(
        url,
        PgOptions {
            schema,
            ..PgOptions::default()
        },
    )
    .await?;
    Ok(ReadLog {
        log: Backend::Pg(log),
        shown: format!("PostgreSQL log in {where_}"),
        snapshot: None,
    })
}

/// Whether the log's tables are there, asked on a connection of its own before `PgLog::open`
/// (which would create them).
async fn pg_log_exists(url: &str, schema: Option<&str>) -> Result<bool> {
    use sqlx::Connection;
    let mut conn = sqlx::postgres::PgConnection::connect(url).await?;
    let exists: bool = match schema {
        Some(s) => {
            sqlx::query_scalar(
                "SELECT to_regclass(quote_ident($1) || '.mageflow_head') IS NOT NULL",
            )
            .bind(s)
            .fetch_one(&mut conn)
            .await?
        }
        None => {
            sqlx::query_scalar("SELECT to_regclass('mageflow_head') IS NOT NULL")
                .fetch_one(&mut conn)
                .await?
        }
    };
    let _ = conn.close().await;
    Ok(exists)
}
