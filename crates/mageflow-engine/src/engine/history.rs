//! What a [`Handle`] reads from the log itself rather than from the orchestrator: a workflow's
//! history, and the records of the system stream (refused commands, which it also writes, and
//! resume reports).

use super::handle::Handle;
use super::report::{StoredRefusal, StoredResumeReport};
use crate::error::{Error, Result};
use mageflow_core::{Actor, Event, Payload, Rejection, WorkflowId};
use mageflow_store::AppendRequest;
use serde_json::Value;

/// Attempts at appending a record to the system stream when it moved under us (another writer,
/// a recovery pass, appended there at the same time).
const SYSTEM_APPEND_TRIES: usize = 5;

impl Handle {
    /// Every event of a workflow, in order, from the log. The system stream
    /// ([`WorkflowId::SYSTEM`]) is no workflow: its history is empty (see
    /// [`Handle::resume_reports`]).
    pub fn history(&self, wf: WorkflowId) -> Result<Vec<Event>> {
        if self.slot.is_closed() {
            return Err(Error::ShutDown);
        }
        if wf.is_system() {
            return Ok(Vec::new());
        }
        self.read(self.log.read_stream(wf, 1))
    }

    /// A read through the log slot: `Closed` because the engine shut down is
    /// [`Error::ShutDown`] (a log closed under a running engine stays a store error).
    fn read<T>(&self, r: mageflow_store::Result<T>) -> Result<T> {
        r.map_err(|e| match e {
            mageflow_store::Error::Closed if self.slot.is_closed() => Error::ShutDown,
            e => Error::Store(e),
        })
    }

    /// Record `command`, refused without being carried out (an operator's command that came
    /// past its deadline, say), as a `command_refused` event of the log's system stream: the
    /// audit trail keeps what was asked and why it was not done. Durable when this returns.
    pub async fn record_refused_command(&self, command: Value) -> Result<()> {
        crate::sig::check_depth("refused command", &command)?;
        let mut tries = 0;
        loop {
            tries += 1;
            let version = self.read(self.log.stream_version(WorkflowId::SYSTEM))?;
            let event = Event {
                stream: WorkflowId::SYSTEM,
                seq: version + 1,
                at: self.config.clock.now(),
                actor: Actor::system("intake"),
                schema: mageflow_core::SCHEMA_VERSION,
                payload: Payload::CommandRefused {
                    command: command.clone(),
                },
            };
            let request = AppendRequest {
                stream: WorkflowId::SYSTEM,
                expected_version: version,
                events: vec![event],
            };
            match self.log.append(vec![request]).await {
                Ok(_) => return Ok(()),
                Err(e) if e.is_conflict() && tries < SYSTEM_APPEND_TRIES => {}
                Err(e) => return self.read(Err(e)),
            }
        }
    }

    /// Every refused command recorded in the log ([`Handle::record_refused_command`]), oldest
    /// first.
    pub fn refused_commands(&self) -> Result<Vec<StoredRefusal>> {
        let events = self.read(self.log.read_stream(WorkflowId::SYSTEM, 1))?;
        Ok(events
            .into_iter()
            .filter_map(|e| match e.payload {
                Payload::CommandRefused { command } => Some(StoredRefusal {
                    seq: e.seq,
                    at: e.at,
                    actor: e.actor,
                    command,
                }),
                _ => None,
            })
            .collect())
    }

    /// The reports of every recovery pass that found unfinished work or skipped a corrupt
    /// workflow, oldest first, as written to the log's system stream.
    pub fn resume_reports(&self) -> Result<Vec<StoredResumeReport>> {
        let events = self.read(self.log.read_stream(WorkflowId::SYSTEM, 1))?;
        let mut out = Vec::new();
        for e in events {
            let Payload::ResumeReport { report } = e.payload else {
                continue;
            };
            let report = serde_json::from_value(report).map_err(|err| {
                Error::Rejected(Rejection::Internal(format!(
                    "resume report {} of the system stream does not read: {err}",
                    e.seq
                )))
            })?;
            out.push(StoredResumeReport {
                seq: e.seq,
                at: e.at,
                actor: e.actor,
                report,
            });
        }
        Ok(out)
    }
}
