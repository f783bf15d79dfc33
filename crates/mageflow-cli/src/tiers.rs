//! Where the data lives: `--store embedded:PATH`, or `--postgres URL --redis URL` (with
//! `--schema` and `--prefix`), from flags, then environment variables, then a TOML config file
//! (`--config PATH` / `MAGEFLOW_CONFIG`), in that order of precedence. And the processes of a
//! PostgreSQL + Redis deployment: `serve`, `worker`, `migrate`, `replay --rebuild-hot`.

use anyhow::{bail, Context, Result};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use mageflow::auth::{AccessFile, Operators, Secret};
use mageflow::cluster::{self, ClusterConfig};
use mageflow::engine::worker::WorkerConfig;
use mageflow::hot::{Hot, Projector};
use mageflow::store_pg::{PgLog, PgOptions};
use mageflow::{Config, Registry};
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

pub const DEFAULT_PREFIX: &str = "mf:";

#[derive(Args, Clone, Debug, Default)]
pub struct StoreArgs {
    /// TOML file with any of: store, postgres, schema, redis, prefix (flags and environment
    /// variables take precedence).
    #[arg(long, env = "MAGEFLOW_CONFIG")]
    pub config: Option<PathBuf>,
    /// Embedded store, as `embedded:PATH`.
    #[arg(long, env = "MAGEFLOW_STORE")]
    pub store: Option<String>,
    /// PostgreSQL URL of the durable log (with --redis).
    #[arg(long, env = "MAGEFLOW_POSTGRES")]
    pub postgres: Option<String>,
    /// PostgreSQL schema of the log's tables (default: the URL's search_path).
    #[arg(long, env = "MAGEFLOW_SCHEMA")]
    pub schema: Option<String>,
    /// Redis URL of the hot tier (with --postgres).
    #[arg(long, env = "MAGEFLOW_REDIS")]
    pub redis: Option<String>,
    /// Prefix of every Redis key (one deployment per prefix).
    #[arg(long, env = "MAGEFLOW_PREFIX")]
    pub prefix: Option<String>,
    /// File holding the deployment's worker secret (16+ bytes; or the secret itself in
    /// MAGEFLOW_WORKER_SECRET): workers sign their reports with it, and the orchestrator
    /// accepts no report that is not signed with it. The same for `serve` and every `worker`.
    #[arg(long, env = "MAGEFLOW_WORKER_SECRET_FILE")]
    pub worker_secret_file: Option<PathBuf>,
    /// `serve`: the access file (TOML), listing the operators whose signed commands are
    /// carried out, with their role and token (see `docs/security.md`).
    #[arg(long, env = "MAGEFLOW_ACCESS")]
    pub access: Option<PathBuf>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    store: Option<String>,
    postgres: Option<String>,
    schema: Option<String>,
    redis: Option<String>,
    prefix: Option<String>,
}

/// The resolved storage tiers.
#[derive(Clone, Debug, PartialEq)]
pub enum Tiers {
    Embedded(PathBuf),
    Cluster {
        postgres: String,
        schema: Option<String>,
        redis: String,
        prefix: String,
    },
}

/// Parse `embedded:PATH`.
pub fn embedded_path(store: &str) -> Result<PathBuf> {
    match store.split_once(':') {
        Some(("embedded", path)) if !path.is_empty() => Ok(PathBuf::from(path)),
        _ => bail!(
            "unsupported store {store:?}: expected embedded:PATH (or --postgres URL --redis URL)"
        ),
    }
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    toml::from_str(&text).with_context(|| format!("bad config file {}", path.display()))
}

/// Where the durable log lives, for commands that need nothing else (no Redis): `migrate` and
/// the read-only commands.
#[derive(Clone, Debug, PartialEq)]
pub enum LogTier {
    Embedded(PathBuf),
    Postgres { url: String, schema: Option<String> },
}

/// Sled's files and the head guard: a directory holding none of them holds no store.
const STORE_FILES: [&str; 3] = ["conf", "db", "mageflow.head"];

/// Whether `dir` holds a store (any of its files), without creating anything.
pub fn store_exists(dir: &Path) -> bool {
    STORE_FILES.iter().any(|f| dir.join(f).exists())
}

/// Refuse a path that holds no store, for the commands that must not create one (a store with
/// only some of its files is refused by the store's open, naming what is missing).
pub fn existing_store(dir: &Path) -> Result<()> {
    let shown = dir.display();
    let hint = format!(
        "`mageflow demo --store embedded:{shown}` or `mageflow serve --store embedded:{shown}` \
         creates one. Nothing was created"
    );
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("no store at {shown}: the directory does not exist ({hint})")
        }
        Err(e) => bail!("cannot read {shown}: {e}"),
        Ok(m) if !m.is_dir() => bail!("no store at {shown}: it is a file, not a store directory"),
        Ok(_) if !store_exists(dir) => bail!(
            "no store at {shown}: the directory holds no mageflow store (none of sled's files \
             `conf` and `db`, no `mageflow.head`) ({hint})"
        ),
        Ok(_) => Ok(()),
    }
}

/// The options after merging flags and environment with the config file.
struct Merged {
    store: Option<String>,
    postgres: Option<String>,
    schema: Option<String>,
    redis: Option<String>,
    prefix: String,
}

impl StoreArgs {
    fn merged(&self) -> Result<Merged> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let pick = |a: &Option<String>, b: Option<String>| a.clone().or(b);
        Ok(Merged {
            store: pick(&self.store, file.store),
            postgres: pick(&self.postgres, file.postgres),
            schema: pick(&self.schema, file.schema),
            redis: pick(&self.redis, file.redis),
            prefix: pick(&self.prefix, file.prefix).unwrap_or_else(|| DEFAULT_PREFIX.into()),
        })
    }

    /// The durable log alone: `--store embedded:PATH` or `--postgres URL [--schema S]` (a
    /// `--redis` given too is not needed, and not an error).
    pub fn log(&self, command: &str) -> Result<LogTier> {
        let m = self.merged()?;
        match (m.store, m.postgres) {
            (Some(_), Some(_)) => bail!(
                "give either an embedded store (--store) or PostgreSQL (--postgres), not both"
            ),
            (Some(s), None) => Ok(LogTier::Embedded(embedded_path(&s)?)),
            (None, Some(url)) => Ok(LogTier::Postgres {
                url,
                schema: m.schema,
            }),
            (None, None) => bail!(
                "`mageflow {command}` needs --store embedded:PATH or --postgres URL (or \
                 MAGEFLOW_STORE / MAGEFLOW_POSTGRES, or a config file)"
            ),
        }
    }

    /// Flags and environment first, then the config file. `None`: nothing given at all.
    pub fn resolve(&self) -> Result<Option<Tiers>> {
        let Merged {
            store,
            postgres,
            schema,
            redis,
            prefix,
        } = self.merged()?;
        match (store, postgres, redis) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => bail!(
                "give either an embedded store (--store) or PostgreSQL and Redis (--postgres and \
                 --redis), not both"
            ),
            (Some(s), None, None) => Ok(Some(Tiers::Embedded(embedded_path(&s)?))),
            (None, Some(postgres), Some(redis)) => Ok(Some(Tiers::Cluster {
                postgres,
                schema,
                redis,
                prefix,
            })),
            (None, Some(_), None) => bail!("--postgres needs --redis too (the hot tier)"),
            (None, None, Some(_)) => bail!("--redis needs --postgres too (the durable log)"),
            (None, None, None) => Ok(None),
        }
    }

    /// Like [`StoreArgs::resolve`], for commands that only make sense on PostgreSQL + Redis.
    pub fn cluster(&self, command: &str) -> Result<ClusterConfig> {
        match self.resolve()? {
            Some(Tiers::Cluster {
                postgres,
                schema,
                redis,
                prefix,
            }) => {
                let mut c = ClusterConfig::new(postgres, redis, &prefix);
                c.pg = PgOptions {
                    schema,
                    ..PgOptions::default()
                };
                c.hot.secret = self.worker_secret()?;
                if let Some(path) = &self.access {
                    c.operators = read_access(path)?;
                }
                Ok(c)
            }
            _ => bail!(
                "`mageflow {command}` needs --postgres URL and --redis URL (or MAGEFLOW_POSTGRES \
                 and MAGEFLOW_REDIS, or a config file)"
            ),
        }
    }
}

impl StoreArgs {
    /// The worker secret: from `--worker-secret-file`, else `MAGEFLOW_WORKER_SECRET`.
    fn worker_secret(&self) -> Result<Option<Secret>> {
        let text = match &self.worker_secret_file {
            Some(path) => std::fs::read(path).with_context(|| {
                format!("cannot read the worker secret file {}", path.display())
            })?,
            None => match std::env::var("MAGEFLOW_WORKER_SECRET") {
                Ok(s) => s.into_bytes(),
                Err(_) => return Ok(None),
            },
        };
        Secret::new(text)
            .map(Some)
            .context("the worker secret is not usable")
    }
}

/// The operators of an access file.
fn read_access(path: &Path) -> Result<Operators> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the access file {}", path.display()))?;
    let file: AccessFile =
        toml::from_str(&text).with_context(|| format!("bad access file {}", path.display()))?;
    Operators::from_file(file).with_context(|| format!("bad access file {}", path.display()))
}

/// What `serve` resumes of the unfinished work it finds (see `mageflow::engine::AutoResume`).
#[derive(Args, Clone, Debug, Default)]
pub struct ResumeArgs {
    /// Resume nothing on start: unfinished work stays held until resumed or run.
    #[arg(long, env = "MAGEFLOW_NO_AUTO_RESUME")]
    pub no_auto_resume: bool,
    /// Only resume tasks with these names (comma-separated).
    #[arg(long, env = "MAGEFLOW_RESUME_TASKS", value_delimiter = ',')]
    pub resume_tasks: Vec<String>,
    /// Only resume workflows whose root is of these kinds: task, chain, swarm (comma-separated).
    #[arg(long, env = "MAGEFLOW_RESUME_KINDS", value_delimiter = ',')]
    pub resume_kinds: Vec<String>,
    /// Spread resumed starts this far apart, so a restart does not stampede.
    #[arg(long, env = "MAGEFLOW_RESUME_STAGGER_MS", default_value_t = 0)]
    pub resume_stagger_ms: u64,
}

impl ResumeArgs {
    fn auto_resume(&self) -> Result<mageflow::engine::AutoResume> {
        for k in &self.resume_kinds {
            if !["task", "chain", "swarm"].contains(&k.as_str()) {
                bail!("--resume-kinds: unknown kind {k:?} (task, chain or swarm)");
            }
        }
        let set = |v: &Vec<String>| (!v.is_empty()).then(|| v.iter().cloned().collect());
        Ok(mageflow::engine::AutoResume {
            enabled: !self.no_auto_resume,
            tasks: set(&self.resume_tasks),
            kinds: set(&self.resume_kinds),
            stagger: std::time::Duration::from_millis(self.resume_stagger_ms),
        })
    }
}

/// How often `serve` logs the state of the hot tier and compaction.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// The tasks the binary's own processes know: the built-in ones.
pub fn builtins() -> Registry {
    let mut r = Registry::new();
    mageflow::engine::builtin::register(&mut r);
    r
}

/// `mageflow serve`: the orchestrator. On PostgreSQL + Redis it decides, projects and takes
/// workers' reports; on an embedded store it also runs the handlers. Either way unfinished work
/// in the log is resumed first, and what was found is printed.
pub async fn serve(
    args: &StoreArgs,
    workers: usize,
    resume: &ResumeArgs,
    http: &crate::http_cmd::HttpArgs,
) -> Result<()> {
    // The HTTP API's access is checked before anything is opened.
    let access = http.access()?;
    let config = Config {
        workers,
        principal: "serve".into(),
        auto_resume: resume.auto_resume()?,
        ..Config::default()
    };
    match args.resolve()? {
        Some(Tiers::Embedded(dir)) => {
            let created = !store_exists(&dir);
            let engine = mageflow::open_embedded(&dir, builtins(), config)
                .await
                .with_context(|| format!("cannot open the embedded store at {}", dir.display()))?;
            if created {
                println!("created a new store at embedded:{}", dir.display());
            }
            println!("recovery: {}", serde_json::to_string(engine.recovery())?);
            println!("serving embedded:{} (Ctrl-C to stop)", dir.display());
            let api = crate::http_cmd::start(http, access, engine.handle()).await?;
            crate::stop_signal().await;
            crate::http_cmd::stop(api).await;
            engine.shutdown().await;
        }
        Some(Tiers::Cluster { .. }) => {
            let stop = crate::stop_signal();
            tokio::pin!(stop);
            // Another orchestrator on the log: this one stands by (open_cluster waits) until it
            // stops, or until this one is told to stop.
            let mut cluster_config = args.cluster("serve")?;
            if let Some(tokens) = crate::http_cmd::relay_operators(http)? {
                for (name, operator) in tokens.0 {
                    if cluster_config.operators.0.contains_key(&name) {
                        bail!(
                            "{name:?} is in the access file and the tokens file: keep one (the \
                             tokens file serves the API and the relay alike)"
                        );
                    }
                    cluster_config.operators.0.insert(name, operator);
                }
            }
            check_services(&cluster_config).await?;
            let c = tokio::select! {
                c = cluster::open_cluster(cluster_config, builtins(), config) => c?,
                _ = &mut stop => {
                    println!("stopped while standing by");
                    return Ok(());
                }
            };
            println!(
                "recovery: {}",
                serde_json::to_string(c.engine().recovery())?
            );
            println!("serving: orchestrator + projector + report intake (Ctrl-C to stop)");
            let api = crate::http_cmd::start(http, access, c.handle()).await?;
            let mut superseded = false;
            loop {
                tokio::select! {
                    _ = &mut stop => break,
                    _ = c.superseded() => {
                        superseded = true;
                        break;
                    }
                    _ = tokio::time::sleep(STATUS_EVERY) => log_status(&c).await,
                }
            }
            crate::http_cmd::stop(api).await;
            let projected = c.projector_stats().events.load(Ordering::Relaxed);
            c.shutdown().await;
            if superseded {
                bail!(
                    "another orchestrator took this deployment over while this one's PostgreSQL \
                     session was down; stopped ({projected} events projected to Redis)"
                );
            }
            println!("stopped; {projected} events projected to Redis");
        }
        None => bail!("`mageflow serve` needs --store embedded:PATH, or --postgres and --redis"),
    }
    Ok(())
}

/// One line on the tiers: projection, hot-tier memory and read hit rate, compaction.
async fn log_status(c: &cluster::Cluster) {
    let p = c.projector_stats();
    let h = c.handle();
    let k = &h.stats().compaction;
    let (hits, misses) = c.hot().read_stats();
    let memory = c.hot().memory_used().await.unwrap_or(0);
    tracing::info!(
        projected_position = p.position.load(Ordering::Relaxed),
        events_projected = p.events.load(Ordering::Relaxed),
        rebuilds = p.rebuilds.load(Ordering::Relaxed),
        redis_used_bytes = memory,
        hot_reads_hit = hits,
        hot_reads_missed = misses,
        workflows_compacted = k.workflows.load(Ordering::Relaxed),
        running_workflows_compacted = k.running_workflows.load(Ordering::Relaxed),
        compacted_raw_bytes = k.raw_bytes.load(Ordering::Relaxed),
        compacted_stored_bytes = k.compressed_bytes.load(Ordering::Relaxed),
        "status"
    );
}

/// `mageflow worker`: run built-in task handlers for jobs from the hot tier until SIGINT or
/// SIGTERM (then finish or abandon running handlers within the grace period).
pub async fn worker(
    args: &StoreArgs,
    concurrency: usize,
    id: Option<String>,
    lease_ms: u64,
) -> Result<()> {
    let mut c = args.cluster("worker")?;
    c.hot.lease = std::time::Duration::from_millis(lease_ms.max(1));
    let mut config = WorkerConfig {
        concurrency,
        ..WorkerConfig::default()
    };
    if let Some(id) = id {
        config.worker_id = id;
    }
    let shutdown = CancellationToken::new();
    let stopper = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            crate::stop_signal().await;
            shutdown.cancel();
        })
    };
    eprintln!("worker {} starting (Ctrl-C to stop)", config.worker_id);
    let stats = cluster::run_worker_process(c.hot, builtins(), config, shutdown).await?;
    stopper.abort();
    // Not println!: a closed stdout (the parent went away) must not turn a clean stop into a panic.
    use std::io::Write as _;
    let _ = writeln!(
        std::io::stdout(),
        "worker stopped: claimed={} succeeded={} failed={} stopped={} abandoned={}",
        stats.claimed.load(Ordering::Relaxed),
        stats.succeeded.load(Ordering::Relaxed),
        stats.failed.load(Ordering::Relaxed),
        stats.stopped.load(Ordering::Relaxed),
        stats.abandoned.load(Ordering::Relaxed),
    );
    Ok(())
}

/// `mageflow migrate`: create or upgrade the log's tables, then exit. Needs PostgreSQL only.
pub async fn migrate(args: &StoreArgs) -> Result<()> {
    let (url, schema) = match args.log("migrate")? {
        LogTier::Postgres { url, schema } => (url, schema),
        LogTier::Embedded(_) => bail!(
            "`mageflow migrate` is for a PostgreSQL log (--postgres URL); an embedded store \
             needs no migration"
        ),
    };
    let log = PgLog::open(
        &url,
        PgOptions {
            schema,
            ..PgOptions::default()
        },
    )
    .await?;
    println!("migrations applied; log head at position {}", {
        use mageflow::store::EventLog;
        log.head()
    });
    Ok(())
}

/// Before `serve` changes anything (a migration, the orchestrator lock, Redis keys): every
/// service answers. Otherwise a Redis that is down would be found only after the migrations ran
/// and the lock was taken.
async fn check_services(c: &ClusterConfig) -> Result<()> {
    use sqlx::Connection;
    let shown = mageflow::store::mask_url(&c.postgres);
    let mut pg = sqlx::postgres::PgConnection::connect(&c.postgres)
        .await
        .with_context(|| format!("cannot reach PostgreSQL at {shown}; nothing was changed"))?;
    sqlx::query("SELECT 1")
        .execute(&mut pg)
        .await
        .with_context(|| format!("PostgreSQL at {shown} does not answer; nothing was changed"))?;
    let _ = pg.close().await;
    Hot::connect(c.hot.clone()).await.context(
        "serve did not start: Redis does not answer, so nothing was changed (no migration \
             run, no lock taken)",
    )?;
    Ok(())
}

/// `mageflow replay --rebuild-hot`: clear the deployment's Redis keys and project the whole log
/// again, with a progress bar. Refused while an orchestrator runs on the log; holds the log's
/// orchestrator lock meanwhile, so a `serve` started then waits for the rebuild.
pub async fn rebuild_hot(args: &StoreArgs, progress: bool) -> Result<()> {
    let c = args.cluster("replay --rebuild-hot")?;
    let log = Arc::new(PgLog::open(&c.postgres, c.pg.clone()).await?);
    let Some(_lock) = log.try_orchestrator_lock().await? else {
        bail!(
            "an orchestrator (`mageflow serve`) runs on this log, and its projector writes the \
             hot tier: stop it to rebuild from here — or delete the deployment's Redis keys \
             (prefix {}), and its projector rebuilds them by itself",
            c.hot.prefix
        );
    };
    let hot = Hot::connect(c.hot).await?;
    let mut projector = Projector::new(hot, log);
    let bar = if progress {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} events ({per_sec})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("rebuilding the hot tier");
    let head = projector
        .rebuild(|done, head| {
            bar.set_length(head);
            bar.set_position(done);
        })
        .await?;
    bar.finish();
    println!("hot tier rebuilt from the log: {head} events projected");
    Ok(())
}
