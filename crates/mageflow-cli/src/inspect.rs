//! Read-only commands over a store: `history` (audit trail) and `verify` (integrity).

use crate::embedded_path;
use anyhow::{Context, Result};
use mageflow::store::{EventLog, SledLog, SledOptions};
use mageflow::{SignatureId, WorkflowId};
use std::io::Write;

fn open(store: &str) -> Result<SledLog> {
    let path = embedded_path(store)?;
    crate::tiers::existing_store(&path)?;
    SledLog::open(&path, SledOptions::default())
        .with_context(|| format!("cannot open the store at {}", path.display()))
}

pub fn history(store: &str, id: &str, json: bool) -> Result<()> {
    let wf = match id.parse::<WorkflowId>() {
        Ok(wf) => wf,
        Err(_) => id
            .parse::<SignatureId>()
            .map(|s| s.workflow)
            .with_context(|| format!("{id:?} is neither a workflow id nor a signature id"))?,
    };
    let log = open(store)?;
    let events = log.read_stream(wf, 1)?;
    if events.is_empty() {
        anyhow::bail!("workflow {wf} has no events in {store}");
    }
    let mut out = std::io::stdout().lock();
    for e in events {
        let written = if json {
            let line = serde_json::json!({
                "stream": e.stream.to_string(),
                "seq": e.seq,
                "at": e.at.to_string(),
                "actor": e.actor.to_string(),
                "schema": e.schema,
                "payload": e.payload,
            });
            writeln!(out, "{line}")
        } else {
            let node = e
                .payload
                .node()
                .map(|n| format!(" node={n}"))
                .unwrap_or_default();
            writeln!(
                out,
                "{:>6} {} {:<24} {:<18}{node}",
                e.seq,
                e.at,
                e.actor.to_string(),
                e.payload.kind()
            )
        };
        match written {
            Ok(()) => {}
            // The reader went away (`mageflow history ... | head`): stop quietly.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
    }
    Ok(())
}

pub fn verify(store: &str) -> Result<()> {
    let log = open(store)?;
    let events = log.verify()?;
    println!("ok: {events} events; every event decodes and passes its checksum; positions and stream sequences are dense");
    Ok(())
}
