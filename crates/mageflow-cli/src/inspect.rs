//! Read-only commands over a log: `history` (audit trail), `verify` (integrity) and `state`
//! (the current state, folded from the log). They open the log through [`ReadLog`], so they
//! never create a store, work on PostgreSQL as on sled, and read a snapshot of an embedded
//! store that a running `serve` holds. They never append anything.

use crate::reader::ReadLog;
use crate::tiers::StoreArgs;
use anyhow::{bail, Context, Result};
use mageflow::core::{KindSpec, NodeIndex, Payload};
use mageflow::{Event, SignatureId, Workflow, WorkflowId};
use std::io::Write;

/// A `wf_…` (the whole workflow) or a `sig_…` (one signature of it).
fn parse_id(id: &str) -> Result<(WorkflowId, Option<NodeIndex>)> {
    match id.parse::<WorkflowId>() {
        Ok(wf) => Ok((wf, None)),
        Err(_) => id
            .parse::<SignatureId>()
            .map(|s| (s.workflow, Some(s.index)))
            .with_context(|| format!("{id:?} is neither a workflow id nor a signature id")),
    }
}

/// The workflow's events, refusing an unknown workflow or signature.
fn events_of(log: &ReadLog, wf: WorkflowId, sig: Option<NodeIndex>) -> Result<Vec<Event>> {
    let events = log.read_stream(wf)?;
    if events.is_empty() {
        bail!("workflow {wf} has no events in {}", log.shown);
    }
    if let Some(i) = sig {
        let nodes = node_count(&events);
        if u64::from(i) >= nodes {
            bail!(
                "workflow {wf} has no signature {i} (its signatures are 0 to {})",
                nodes - 1
            );
        }
    }
    Ok(events)
}

/// How many signatures the events create (the tree, and items added to open swarms).
fn node_count(events: &[Event]) -> u64 {
    events
        .iter()
        .map(|e| match &e.payload {
            Payload::WorkflowCreated { nodes } | Payload::SwarmItemsAdded { nodes, .. } => {
                nodes.len() as u64
            }
            _ => 0,
        })
        .sum()
}

/// The events that concern signature `i`: the one that created it (`workflow_created`, or the
/// `swarm_items_added` that added it), every event about it (`node` = `i`; a suspend, interrupt
/// or cancel of a container writes one per signature it reaches, so those are here too), and
/// the workflow-wide events of the root that change every signature's lot — a deletion mark,
/// its lifting, a rerun and a purge. Events of its parent or its children are not.
fn concerns(events: Vec<Event>, i: NodeIndex) -> Vec<Event> {
    let mut created = 0u64;
    events
        .into_iter()
        .filter(|e| {
            let before = created;
            if let Payload::WorkflowCreated { nodes } | Payload::SwarmItemsAdded { nodes, .. } =
                &e.payload
            {
                created += nodes.len() as u64;
            }
            let creates_it = (before..created).contains(&u64::from(i));
            let workflow_wide = matches!(
                e.payload,
                Payload::MarkedForDeletion { .. }
                    | Payload::Restored { .. }
                    | Payload::Rerun { .. }
                    | Payload::Purged { .. }
            );
            creates_it || workflow_wide || e.payload.node() == Some(i)
        })
        .collect()
}

/// Write lines, stopping quietly when the reader went away (`mageflow history … | head`).
fn emit(lines: impl IntoIterator<Item = String>) -> Result<()> {
    let mut out = std::io::stdout().lock();
    for line in lines {
        match writeln!(out, "{line}") {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e).context("cannot write to stdout"),
        }
    }
    Ok(())
}

pub async fn history(args: &StoreArgs, id: &str, json: bool) -> Result<()> {
    let (wf, sig) = parse_id(id)?;
    let log = ReadLog::open(args, "history").await?;
    let mut events = events_of(&log, wf, sig)?;
    if let Some(i) = sig {
        events = concerns(events, i);
    }
    let note = log.snapshot_note();
    // JSON lines stay JSON: the note goes to stderr there.
    if let Some(n) = &note {
        if json {
            eprintln!("{n}");
        }
    }
    let header = note.filter(|_| !json);
    let lines = events.into_iter().map(|e| {
        if json {
            serde_json::json!({
                "stream": e.stream.to_string(),
                "seq": e.seq,
                "at": e.at.to_string(),
                "actor": e.actor.to_string(),
                "schema": e.schema,
                "payload": e.payload,
            })
            .to_string()
        } else {
            let node = e
                .payload
                .node()
                .map(|n| format!(" node={n}"))
                .unwrap_or_default();
            format!(
                "{:>6} {} {:<24} {:<18}{node}",
                e.seq,
                e.at,
                escape_controls(&e.actor.to_string()),
                e.payload.kind()
            )
        }
    });
    emit(header.into_iter().chain(lines))
}

pub async fn verify(args: &StoreArgs) -> Result<()> {
    if let crate::tiers::LogTier::Embedded(dir) = args.log("verify")? {
        // Read before opening: open writes the guard again.
        guard_warning(&dir);
    }
    let log = ReadLog::open(args, "verify").await?;
    let events = log.verify()?;
    let what = match &log.snapshot {
        Some(_) => " (of a snapshot of the live store)",
        None => "",
    };
    println!(
        "ok: {events} events{what}; every event decodes and passes its checksum; positions and \
         stream sequences are dense"
    );
    if let Some(n) = log.snapshot_note() {
        println!("{n}");
    }
    Ok(())
}

/// Warn (stderr; the verdict is not changed) when an embedded store's acknowledged-position
/// guard is gone or unreadable: without it, a sled log that lost its end opens as a shorter one.
fn guard_warning(dir: &std::path::Path) {
    use mageflow::store::HeadGuard;
    if !crate::tiers::store_exists(dir) {
        return;
    }
    let why = match mageflow::store::head_guard(dir) {
        HeadGuard::Recorded(_) => return,
        HeadGuard::Missing => format!("{} is missing", dir.join("mageflow.head").display()),
        HeadGuard::Unreadable(why) => format!("it is unreadable: {why}"),
    };
    eprintln!(
        "warning: the acknowledged-position guard of this store cannot be checked ({why}); \
         without it, a store that lost acknowledged events cannot be told from a shorter one. \
         Opening the store writes a new guard from what the log holds now."
    );
}

/// One signature's line of `state`.
#[derive(serde::Serialize)]
struct NodeLine {
    signature: String,
    index: NodeIndex,
    parent: Option<NodeIndex>,
    name: String,
    kind: &'static str,
    task: Option<String>,
    status: String,
    attempt: u32,
    /// A container's inner signatures by status (`Workflow::inner_counts`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    inner: std::collections::BTreeMap<&'static str, u64>,
    /// A graph's edges taken, as `from -> to` by node name, in the order they were taken.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    edges_taken: Vec<String>,
}

/// The edges each graph of `state` took, from the `graph_routed` events of its log.
fn edges_taken(
    state: &Workflow,
    events: &[Event],
) -> std::collections::HashMap<NodeIndex, Vec<String>> {
    let mut taken: std::collections::HashMap<NodeIndex, Vec<String>> = Default::default();
    let name = |i: NodeIndex| state.node(i).map_or("?", |n| n.spec.name.as_str());
    for e in events {
        let Payload::GraphRouted {
            graph, decisions, ..
        } = &e.payload
        else {
            continue;
        };
        let Some(KindSpec::Graph {
            children, edges, ..
        }) = state.node(*graph).map(|n| &n.spec.kind)
        else {
            continue;
        };
        for d in decisions.iter().filter(|d| d.taken) {
            if let Some(edge) = edges.get(d.edge as usize) {
                let end = |p: u32| children.get(p as usize).map_or("?", |&c| name(c));
                taken.entry(*graph).or_default().push(format!(
                    "{} -> {}",
                    end(edge.from),
                    end(edge.to)
                ));
            }
        }
    }
    taken
}

/// The signatures to show: all, or `sig` and everything under it (children and callbacks).
fn subtree(state: &Workflow, sig: Option<NodeIndex>) -> Vec<NodeIndex> {
    let Some(top) = sig else {
        return (0..state.nodes.len() as NodeIndex).collect();
    };
    let mut out = Vec::new();
    let mut stack = vec![top];
    while let Some(i) = stack.pop() {
        out.push(i);
        if let Some(n) = state.node(i) {
            let mut refs: Vec<NodeIndex> = n.spec.all_refs().collect();
            refs.reverse();
            stack.extend(refs);
        }
    }
    out
}

pub async fn state(args: &StoreArgs, id: &str, json: bool) -> Result<()> {
    let (wf, sig) = parse_id(id)?;
    let log = ReadLog::open(args, "state").await?;
    let events = events_of(&log, wf, sig)?;
    let state = Workflow::replay(wf, &events)
        .with_context(|| format!("the events of workflow {wf} do not fold into a state"))?;
    let mut taken = edges_taken(&state, &events);
    let nodes: Vec<NodeLine> = subtree(&state, sig)
        .into_iter()
        .filter_map(|i| state.node(i).map(|n| (i, n)))
        .map(|(i, n)| NodeLine {
            signature: state.sig(i).to_string(),
            index: i,
            parent: n.spec.parent.as_ref().map(|p| p.node),
            name: n.spec.name.clone(),
            kind: n.spec.kind.name(),
            task: n.spec.task_name().map(str::to_owned),
            status: n.visible_status().name().to_owned(),
            attempt: n.attempt,
            inner: state.inner_counts(i),
            edges_taken: taken.remove(&i).unwrap_or_default(),
        })
        .collect();
    if json {
        let line = serde_json::json!({
            "workflow": wf.to_string(),
            "version": state.version,
            "purged": state.purged,
            "snapshot_of_live_store": log.snapshot.is_some(),
            "nodes": nodes,
        });
        if let Some(n) = log.snapshot_note() {
            eprintln!("{n}");
        }
        return emit([line.to_string()]);
    }
    let mut lines: Vec<String> = log.snapshot_note().into_iter().collect();
    lines.push(format!(
        "workflow {wf}: version {}{}",
        state.version,
        if state.purged { ", purged" } else { "" }
    ));
    lines.push(format!(
        "{:<48} {:<6} {:<24} {:<20} {:>7}",
        "signature", "kind", "name", "status", "attempt"
    ));
    lines.extend(nodes.iter().map(|n| {
        let mut line = format!(
            "{:<48} {:<6} {:<24} {:<20} {:>7}",
            n.signature,
            n.kind,
            escape_controls(&n.name),
            n.status,
            n.attempt
        );
        if !n.inner.is_empty() {
            let counts: Vec<String> = n.inner.iter().map(|(s, c)| format!("{s}={c}")).collect();
            line.push_str(&format!("  inner: {}", counts.join(" ")));
        }
        if !n.edges_taken.is_empty() {
            let taken: Vec<_> = n.edges_taken.iter().map(|e| escape_controls(e)).collect();
            line.push_str(&format!("  took: {}", taken.join(", ")));
        }
        line
    }));
    emit(lines)
}

/// `s` with every control character written as an escape (`\n`, `\u{1b}`): one event is one
/// line of text output, whatever its actor or a signature's name holds — a name with a newline
/// or a terminal escape sequence could otherwise forge a line of the audit trail or rewrite
/// the screen. (The API refuses such principals; a log written before it did may hold them.)
pub fn escape_controls(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::escape_controls;

    #[test]
    fn control_characters_cannot_forge_a_line() {
        assert_eq!(escape_controls("api:alice"), "api:alice");
        assert_eq!(
            escape_controls("api:eve\n     7 2026-12-04T00:00:00Z api:root"),
            "api:eve\\n     7 2026-12-04T00:00:00Z api:root"
        );
        assert_eq!(escape_controls("a\u{1b}[2Jb\r\t"), "a\\u{1b}[2Jb\\r\\t");
        assert_eq!(escape_controls("Zoë"), "Zoë");
        assert!(!escape_controls("x\u{85}y\u{7f}")
            .chars()
            .any(char::is_control));
    }
}
