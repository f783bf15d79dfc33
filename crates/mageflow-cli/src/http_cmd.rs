//! `mageflow serve --http ADDR`: the HTTP API (`mageflow-server`) beside the engine, on any
//! store; `mageflow token create|list|revoke`: its tokens file.

use anyhow::{bail, Context, Result};
use mageflow::control::Role;
use mageflow_server::{Access, Api, Tokens};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

#[derive(clap::Args, Clone)]
pub struct HttpArgs {
    /// Serve the HTTP API on this address (e.g. 127.0.0.1:8080).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// The API's tokens file (`mageflow token create` writes it).
    #[arg(long, env = "MAGEFLOW_TOKENS")]
    tokens: Option<PathBuf>,
    /// Serve the API without tokens (every caller an admin): local use only, on a loopback
    /// address.
    #[arg(long)]
    insecure_no_auth: bool,
}

impl HttpArgs {
    /// Who may call the API, checked before anything is opened.
    pub fn access(&self) -> Result<Option<Access>> {
        let Some(addr) = self.http else {
            if self.insecure_no_auth {
                bail!("--insecure-no-auth goes with --http");
            }
            // --tokens alone authorises the relay (see `relay_operators`).
            return Ok(None);
        };
        match (&self.tokens, self.insecure_no_auth) {
            (Some(_), true) => bail!("give --tokens or --insecure-no-auth, not both"),
            (Some(path), false) => {
                let tokens = Tokens::load(path)?;
                if tokens.tokens.is_empty() {
                    bail!(
                        "{} holds no token: create one with `mageflow token create --file {} --name NAME --role operator`",
                        path.display(),
                        path.display()
                    );
                }
                Ok(Some(Access::Tokens(Arc::new(tokens))))
            }
            (None, true) if addr.ip().is_loopback() => {
                tracing::warn!(
                    target: "mageflow::security",
                    %addr,
                    "the HTTP API runs WITHOUT AUTHENTICATION (--insecure-no-auth): every caller is an admin"
                );
                Ok(Some(Access::Insecure))
            }
            (None, true) => {
                bail!("--insecure-no-auth only on a loopback address (127.0.0.1, ::1), not {addr}")
            }
            (None, false) => {
                bail!("--http needs --tokens FILE (or --insecure-no-auth on a loopback address)")
            }
        }
    }
}

/// The operators whose relayed commands a deployment's orchestrator accepts, from the API's
/// tokens file: each token's name, role and hash (the key its holder signs with), so the relay
/// and the API answer to one token model. `None` without `--tokens`.
pub fn relay_operators(args: &HttpArgs) -> Result<Option<mageflow::auth::Operators>> {
    let Some(path) = &args.tokens else {
        return Ok(None);
    };
    let mut operators = mageflow::auth::Operators::default();
    for t in Tokens::load(path)?.tokens {
        let token = mageflow::auth::Secret::new(&t.sha256)
            .with_context(|| format!("token {:?} of {}", t.name, path.display()))?;
        let role = t.role;
        operators
            .0
            .insert(t.name, mageflow::auth::Operator { role, token });
    }
    Ok(Some(operators))
}

/// A running API server.
pub struct Running {
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

/// Start the API if `--http` was given.
pub async fn start(
    args: &HttpArgs,
    access: Option<Access>,
    handle: mageflow::Handle,
) -> Result<Option<Running>> {
    let (Some(addr), Some(access)) = (args.http, access) else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    println!("http api on http://{local}/api/v1");
    let (stop, stopped) = oneshot::channel();
    let api = Api::new(handle, access);
    let task = tokio::spawn(mageflow_server::serve(listener, api, async {
        let _ = stopped.await;
    }));
    Ok(Some(Running { stop, task }))
}

pub async fn stop(running: Option<Running>) {
    if let Some(r) = running {
        let _ = r.stop.send(());
        match r.task.await {
            Ok(Err(e)) => tracing::warn!(error = %e, "http api stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "http api task failed"),
            Ok(Ok(())) => {}
        }
    }
}

#[derive(clap::Subcommand)]
pub enum TokenCmd {
    /// Create a token (printed once; the file keeps its hash).
    Create {
        #[arg(long, env = "MAGEFLOW_TOKENS")]
        file: PathBuf,
        /// Recorded as the actor of what the token does.
        #[arg(long)]
        name: String,
        /// viewer, auditor, operator or admin.
        #[arg(long)]
        role: String,
    },
    /// The tokens' names and roles.
    List {
        #[arg(long, env = "MAGEFLOW_TOKENS")]
        file: PathBuf,
    },
    /// Remove a token: a server refuses it from its next start.
    Revoke {
        #[arg(long, env = "MAGEFLOW_TOKENS")]
        file: PathBuf,
        #[arg(long)]
        name: String,
    },
}

pub fn token(cmd: &TokenCmd) -> Result<()> {
    match cmd {
        TokenCmd::Create { file, name, role } => {
            let role: Role = role.parse()?;
            let token = Tokens::create(file, name, role)?;
            println!("{token}");
            eprintln!("token {name:?} ({role}) created: it is shown this once");
        }
        TokenCmd::List { file } => {
            for t in Tokens::load(file)?.tokens {
                println!("{}\t{}", t.name, t.role);
            }
        }
        TokenCmd::Revoke { file, name } => {
            Tokens::revoke(file, name)?;
            println!("token {name:?} revoked");
        }
    }
    Ok(())
}
