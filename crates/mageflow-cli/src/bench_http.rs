//! `mageflow bench --scenario http-submit|http-tree|http-events`: the HTTP API on the embedded
//! store, measured from this process over loopback TCP with a minimal HTTP/1.1 keep-alive
//! client (a load generator, not the API's own code): submits per second over 64 connections,
//! the latency of a million-item swarm's collapsed tree, events per second to one SSE client.

use crate::bench::{best, percentile};
use anyhow::{bail, Context, Result};
use mageflow::{sign, swarm, Config, Handle, Sig};
use mageflow_server::{Access, Api};
use std::path::Path;
use std::time::Instant;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Connections of `http-submit`.
const CONNECTIONS: usize = 64;
/// Requests of `http-tree`.
const TREE_GETS: usize = 200;

async fn start(h: Handle) -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(mageflow_server::serve(
        listener,
        Api::new(h, Access::Insecure),
        async {
            let _ = stopped.await;
        },
    ));
    Ok((addr, stop))
}

/// One keep-alive connection.
struct Conn {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Conn {
    async fn open(addr: &str) -> Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        // A request is one write; no Nagle delay on the small ones.
        stream.set_nodelay(true)?;
        Ok(Self {
            stream: BufReader::new(stream),
            host: addr.to_owned(),
        })
    }

    /// Send a request, read the response: (status, body).
    async fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Result<(u16, Vec<u8>)> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            self.host,
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(body);
        self.stream.get_mut().write_all(&req).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("not an HTTP status line: {line:?}"))?;
        let mut length = 0usize;
        loop {
            line.clear();
            self.stream.read_line(&mut line).await?;
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse()?;
            }
        }
        let mut body = vec![0; length];
        self.stream.read_exact(&mut body).await?;
        Ok((status, body))
    }
}

async fn open(dir: &Path, workers: usize) -> Result<mageflow::Engine> {
    let mut r = mageflow::Registry::new();
    mageflow::engine::builtin::register(&mut r);
    let config = Config {
        workers,
        principal: "bench".into(),
        ..Config::default()
    };
    Ok(mageflow::open_embedded(dir, r, config).await?)
}

/// `n` single-task workflows submitted over 64 connections, each waiting for its answer
/// (answered once durable).
pub async fn submit(dir: &Path, n: u32) -> Result<String> {
    let engine = open(dir, 1024).await?;
    let (addr, stop) = start(engine.handle()).await?;
    let body = br#"{"root": {"task": {"task": "noop"}}, "input": {}}"#;
    let per = (n as usize).div_ceil(CONNECTIONS);
    let t0 = Instant::now();
    let mut jobs = Vec::new();
    for _ in 0..CONNECTIONS {
        let addr = addr.clone();
        jobs.push(tokio::spawn(async move {
            let mut c = Conn::open(&addr).await?;
            for _ in 0..per {
                let (status, body) = c.request("POST", "/api/v1/workflows", body).await?;
                if status != 201 {
                    bail!(
                        "submit answered {status}: {}",
                        String::from_utf8_lossy(&body)
                    );
                }
            }
            anyhow::Ok(())
        }));
    }
    for j in jobs {
        j.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let total = per * CONNECTIONS;
    let _ = stop.send(());
    engine.shutdown().await;
    Ok(format!(
        "n={total} connections={CONNECTIONS} store=embedded seconds={secs:.3} submits_per_s={:.0}",
        total as f64 / secs
    ))
}

/// A swarm of `n` items created (not run), its tree fetched `TREE_GETS` times.
pub async fn tree(dir: &Path, n: u32) -> Result<String> {
    let engine = open(dir, 0).await?;
    let h = engine.handle();
    let items: Vec<Sig> = (0..n).map(|_| sign("noop").into()).collect();
    let wf = h.create(swarm(items)).await?;
    let (addr, stop) = start(h).await?;
    let mut c = Conn::open(&addr).await?;
    let path = format!("/api/v1/workflows/{wf}");
    let mut ms = Vec::with_capacity(TREE_GETS);
    let mut bytes = 0;
    for _ in 0..TREE_GETS {
        let t0 = Instant::now();
        let (status, body) = c.request("GET", &path, b"").await?;
        ms.push(t0.elapsed().as_secs_f64() * 1000.0);
        if status != 200 {
            bail!("tree answered {status}");
        }
        bytes = body.len();
    }
    let _ = stop.send(());
    engine.shutdown().await;
    ms.sort_by(f64::total_cmp);
    Ok(format!(
        "n={n} store=embedded gets={TREE_GETS} bytes={bytes} p50_ms={:.2} p99_ms={:.2}",
        percentile(&ms, 0.5),
        percentile(&ms, 0.99)
    ))
}

/// `n` workflows submitted in bulks (the engine's `flat`), while one SSE client reads the
/// whole log from the start: events per second it received, to the last.
pub async fn events(dir: &Path, n: u32) -> Result<String> {
    let engine = open(dir, 1024).await?;
    let h = engine.handle();
    crate::bench::run_flat(&h, n).await?;
    let head = h.log().head();
    let (addr, stop) = start(h).await?;
    let mut s = TcpStream::connect(&addr).await?;
    let req = format!("GET /api/v1/events?after=0 HTTP/1.1\r\nhost: {addr}\r\n\r\n");
    s.write_all(req.as_bytes()).await?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    let t0 = Instant::now();
    let mut got = 0u64;
    loop {
        line.clear();
        if reader.read_line(&mut line).await? == 0 {
            bail!("the stream ended after {got} events");
        }
        if let Some(id) = line.strip_prefix("id:") {
            got += 1;
            if id.trim().parse::<u64>().ok() == Some(head) {
                break;
            }
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let _ = stop.send(());
    engine.shutdown().await;
    Ok(format!(
        "workflows={n} events={got} store=embedded seconds={secs:.3} events_per_s={:.0}",
        got as f64 / secs
    ))
}

/// SSE clients of `http-sse-load`.
const SSE_CLIENTS: usize = 100;

/// The engine's `flat` throughput (`n` workflows) alone and with 100 SSE clients following
/// the log, alternated twice in one process: the clients' cost, as a throughput ratio of the
/// best runs. `firehose`: every client gets every event; else each follows one workflow (as a
/// page watching a workflow does), so the cost is the stream's, not the sockets'.
pub async fn sse_load(dir: &Path, n: u32, firehose: bool) -> Result<String> {
    let engine = open(dir, 1024).await?;
    let h = engine.handle();
    let (addr, stop) = start(h.clone()).await?;
    let (mut alone, mut followed) = (Vec::new(), Vec::new());
    for _ in 0..2 {
        for with_clients in [false, true] {
            let mut clients = Vec::new();
            if with_clients {
                for _ in 0..SSE_CLIENTS {
                    let addr = addr.clone();
                    let query = match firehose {
                        true => String::new(),
                        false => {
                            format!("?workflow={}", mageflow::WorkflowId(uuid::Uuid::now_v7()))
                        }
                    };
                    clients.push(tokio::spawn(async move {
                        let mut s = TcpStream::connect(&addr).await?;
                        let req =
                            format!("GET /api/v1/events{query} HTTP/1.1\r\nhost: {addr}\r\n\r\n");
                        s.write_all(req.as_bytes()).await?;
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            if s.read(&mut buf).await? == 0 {
                                return anyhow::Ok(());
                            }
                        }
                    }));
                }
            }
            let t0 = Instant::now();
            crate::bench::run_flat(&h, n).await?;
            let secs = t0.elapsed().as_secs_f64();
            for c in clients {
                c.abort();
            }
            if with_clients {
                followed.push(secs);
            } else {
                alone.push(secs);
            }
        }
    }
    let _ = stop.send(());
    engine.shutdown().await;
    let (a, f) = (best(&alone), best(&followed));
    Ok(format!(
        "n={n} sse_clients={SSE_CLIENTS} firehose={firehose} store=embedded alone_tasks_per_s={:.0} followed_tasks_per_s={:.0} cost={:.3}",
        f64::from(n) / a,
        f64::from(n) / f,
        1.0 - a / f
    ))
}
