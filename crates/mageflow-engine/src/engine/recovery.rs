//! Start-up recovery ([`Orchestrator::recover`]): the whole log folded, unfinished workflows put
//! back in the hot state and resumed as [`AutoResume`] says, the report written to the system
//! stream; and the release of what it held back, on a resume or run of the workflow.
//!
//! [`AutoResume`]: super::config::AutoResume

use super::orchestrator::{Hold, Orchestrator, Running, Step};
use super::report::{RecoveryReport, SkippedWorkflow, RECOVERY_CORRUPT_LISTED_MAX};
use super::request::Action;
use crate::det::{Map, Set};
use crate::error::{Error, Result};
use mageflow_core::{
    execute_owned, Actor, Command, Event, NodeIndex, Op, Payload, Rejection, SignatureId, Status,
    Timestamp, Workflow, WorkflowId,
};
use mageflow_store::AppendRequest;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use tokio_util::sync::CancellationToken;

/// Events read per chunk when recovering from the log.
const RECOVERY_CHUNK_EVENTS: usize = 16_384;
/// Attempts at appending the recovery's events when the system stream moved under us (another
/// engine on the same log wrote a report at the same time).
const RECOVERY_APPEND_TRIES: usize = 5;

impl Orchestrator {
    /// Rebuild unfinished workflows from the whole log and resume them as
    /// [`Config::auto_resume`] says; skip (and report) workflows whose events do not fold; write
    /// the report to the system stream when there was anything to report.
    ///
    /// [`Config::auto_resume`]: crate::Config::auto_resume
    pub(super) async fn recover(&mut self) -> Result<RecoveryReport> {
        let settings = self.config.auto_resume.clone();
        let mut report = RecoveryReport {
            auto_resume: settings.enabled,
            stagger_ms: settings.stagger.as_millis() as u64,
            ..RecoveryReport::default()
        };
        let mut states: Map<WorkflowId, Workflow> = Map::default();
        let mut corrupt: BTreeMap<WorkflowId, String> = BTreeMap::new();
        let mut from = 1;
        loop {
            let chunk = self.log.read_all(from, RECOVERY_CHUNK_EVENTS)?;
            let Some(last) = chunk.last() else { break };
            from = last.position + 1;
            report.log_position = last.position;
            report.events_read += chunk.len() as u64;
            for rec in chunk {
                let stream = rec.event.stream;
                if stream.is_system() || corrupt.contains_key(&stream) {
                    continue;
                }
                let (seq, kind) = (rec.event.seq, rec.event.payload.kind());
                let wf = match states.entry(stream) {
                    std::collections::hash_map::Entry::Occupied(o) => o.into_mut(),
                    // The first live event of a stream whose earlier events were compacted into
                    // the archive (a compacted workflow touched again): read its history through
                    // `read_stream`, which merges the archive, up to just before this event.
                    std::collections::hash_map::Entry::Vacant(v) if seq > 1 => {
                        let mut wf = Workflow::empty(stream);
                        let earlier = self.log.read_stream(stream, 1)?;
                        let mut earlier = earlier.into_iter().take_while(|e| e.seq < seq);
                        let folded = earlier.try_for_each(|e| wf.apply_owned(e));
                        if let Err(e) = folded {
                            let reason = format!("its archived history does not fold: {e}");
                            tracing::error!(workflow = %stream, %reason, "recovery: skipping a workflow whose history is corrupt");
                            corrupt.insert(stream, reason);
                            continue;
                        }
                        v.insert(wf)
                    }
                    std::collections::hash_map::Entry::Vacant(v) => {
                        v.insert(Workflow::empty(stream))
                    }
                };
                if let Err(e) = wf.apply_owned(rec.event) {
                    let reason = format!(
                        "event {kind} at position {} (seq {seq}) does not fold: {e}",
                        rec.position
                    );
                    tracing::error!(workflow = %stream, %reason, "recovery: skipping a workflow whose history is corrupt");
                    states.remove(&stream);
                    corrupt.insert(stream, reason);
                }
            }
        }
        report.skipped_corrupt = corrupt.len() as u64;
        report.corrupt = corrupt
            .into_iter()
            .take(RECOVERY_CORRUPT_LISTED_MAX)
            .map(|(workflow, reason)| SkippedWorkflow { workflow, reason })
            .collect();

        // The reference time of the stagger, and of the report event.
        let t0 = self.config.clock.now();
        let mut appends: Vec<AppendRequest> = Vec::new();
        let actor = Actor::system("recovery");
        // Resumed starts, in order (the stagger spreads them).
        let mut resumed: Vec<SignatureId> = Vec::new();
        let mut ids: Vec<WorkflowId> = states.keys().copied().collect();
        ids.sort_unstable();
        for id in ids {
            let Some(mut wf) = states.remove(&id) else {
                continue;
            };
            if let Some(expires_at) = wf.root().and_then(|r| r.deletion).filter(|_| !wf.purged) {
                self.purges.insert((expires_at, id));
                report.deletions_pending += 1;
            }
            if wf.is_finished() {
                continue;
            }
            report.workflows_unfinished += 1;
            let whole = !wf
                .root()
                .is_some_and(|r| settings.resumes_kind(r.spec.kind.name()));
            let mut held_nodes = Set::default();
            let mut ops = Vec::new();
            for (i, n) in wf.nodes.iter().enumerate() {
                let index = i as NodeIndex;
                let sig = wf.sig(index);
                let resumable = n.in_flight || n.status == Status::Queued;
                if n.in_flight && self.remote() {
                    // Its job is still in the hot tier (or comes back with a rebuild of it): a
                    // worker finishes it, or takes it over once its lease expires.
                    self.running.insert(
                        sig,
                        Running {
                            attempt: n.attempt,
                            token: CancellationToken::new(),
                        },
                    );
                    self.free_slots = self.free_slots.saturating_sub(1);
                    self.count_running();
                    report.attempts_resumed += 1;
                } else if resumable
                    && (whole || !settings.resumes_task(n.spec.task_name().unwrap_or_default()))
                {
                    held_nodes.insert(index);
                    report.skipped_by_filter += 1;
                } else if n.in_flight {
                    ops.push((index, n.attempt));
                } else if n.status == Status::Queued {
                    match n.not_before {
                        Some(t) => {
                            self.timers.insert((t, sig));
                            report.retries_waiting += 1;
                        }
                        None => {
                            resumed.push(sig);
                            report.tasks_queued += 1;
                        }
                    }
                } else if matches!(n.status, Status::Suspended | Status::Interrupted) {
                    report.paused += 1;
                } else if n.status == Status::Failed && !n.is_container() {
                    report.failed += 1;
                }
            }
            let expected = wf.version;
            let mut events = Vec::new();
            for (node, attempt) in ops {
                let cmd = Command {
                    actor: actor.clone(),
                    at: t0,
                    op: Op::Requeue { node, attempt },
                };
                match execute_owned(&mut wf, cmd) {
                    Ok(new) => {
                        // A requeue is one `retry_scheduled` (lost) event: its timer is the
                        // stagger's, set below.
                        self.stats
                            .retries_scheduled
                            .fetch_add(new.len() as u64, Ordering::Relaxed);
                        events.extend(new);
                        resumed.push(wf.sig(node));
                        report.attempts_requeued += 1;
                    }
                    Err(e) => {
                        tracing::error!(workflow = %id, node, attempt, error = %e, "recovery: requeue refused; the attempt stays in flight");
                        report.failures += 1;
                    }
                }
            }
            if !events.is_empty() {
                appends.push(AppendRequest {
                    stream: id,
                    expected_version: expected,
                    events,
                });
            }
            if whole {
                self.held.insert(id, Hold::Whole);
                report.workflows_held += 1;
            } else if !held_nodes.is_empty() {
                self.held.insert(id, Hold::Nodes(held_nodes));
            }
            self.hot.insert(id, wf);
        }
        for (k, sig) in resumed.into_iter().enumerate() {
            if settings.stagger.is_zero() {
                self.enqueue(sig);
            } else {
                let delay = settings.stagger.saturating_mul(k as u32).as_micros();
                let at = Timestamp::from_micros(
                    t0.as_micros()
                        .saturating_add(i64::try_from(delay).unwrap_or(i64::MAX)),
                );
                self.timers.insert((at, sig));
            }
        }
        if report.workflows_unfinished > 0 || report.skipped_corrupt > 0 {
            self.append_with_report(appends, &report, t0, &actor)
                .await?;
            tracing::info!(?report, "recovered unfinished work from the log");
        } else if !appends.is_empty() {
            self.log.append(appends).await?;
        }
        Ok(report)
    }

    /// Append the recovery's events together with its report (one event of the system
    /// stream), atomically; retried if another engine wrote to the system stream meanwhile.
    async fn append_with_report(
        &self,
        appends: Vec<AppendRequest>,
        report: &RecoveryReport,
        at: Timestamp,
        actor: &Actor,
    ) -> Result<()> {
        let payload = Payload::ResumeReport {
            report: serde_json::to_value(report).map_err(|e| {
                Error::Rejected(Rejection::Internal(format!(
                    "recovery report does not serialize: {e}"
                )))
            })?,
        };
        let mut tries = 0;
        loop {
            tries += 1;
            let version = self.log.stream_version(WorkflowId::SYSTEM)?;
            let report_event = Event {
                stream: WorkflowId::SYSTEM,
                seq: version + 1,
                at,
                actor: actor.clone(),
                schema: mageflow_core::SCHEMA_VERSION,
                payload: payload.clone(),
            };
            let mut requests = appends.clone();
            requests.push(AppendRequest {
                stream: WorkflowId::SYSTEM,
                expected_version: version,
                events: vec![report_event],
            });
            match self.log.append(requests).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_conflict() && tries < RECOVERY_APPEND_TRIES => {
                    // Only the system stream can have moved: workflows are this engine's.
                    tracing::warn!(error = %e, "recovery: the system stream moved; retrying");
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// A resume or run of `wf`: start what auto-resume held of it (see [`AutoResume`]).
    ///
    /// [`AutoResume`]: crate::AutoResume
    pub(super) fn release(&mut self, wf: WorkflowId, step: &mut Step) {
        let Some(hold) = self.held.remove(&wf) else {
            return;
        };
        let mut requeue = Vec::new();
        if let Ok(state) = self.load(wf) {
            let held = |i: NodeIndex| match &hold {
                Hold::Whole => true,
                Hold::Nodes(nodes) => nodes.contains(&i),
            };
            let mut ready = Vec::new();
            let mut timers = Vec::new();
            for (i, n) in state.nodes.iter().enumerate() {
                let index = i as NodeIndex;
                if !held(index) {
                    continue;
                }
                if n.in_flight {
                    requeue.push((index, n.attempt));
                } else if n.status == Status::Queued {
                    match n.not_before {
                        Some(t) => timers.push((t, state.sig(index))),
                        None => ready.push((state.sig(index), state.priority(index))),
                    }
                }
            }
            for (sig, priority) in ready {
                self.ready.push_back(sig, priority);
            }
            self.timers.extend(timers);
        }
        let actor = Actor::system("resume");
        for (node, attempt) in requeue {
            if self.running.contains_key(&SignatureId {
                workflow: wf,
                index: node,
            }) {
                continue;
            }
            let actions = vec![(wf, Action::Core(Op::Requeue { node, attempt }))];
            if let Err(e) = self.exec(actions, &actor, false, step) {
                tracing::warn!(%wf, node, attempt, error = %e, "requeue of a held attempt refused");
            }
        }
        step.touched.push(wf);
    }

    pub(super) fn is_held(&self, sig: SignatureId) -> bool {
        match self.held.get(&sig.workflow) {
            None => false,
            Some(Hold::Whole) => true,
            Some(Hold::Nodes(nodes)) => nodes.contains(&sig.index),
        }
    }
}
