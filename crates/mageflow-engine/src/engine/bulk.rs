//! Bulk add to a swarm ([`Handle::add_many`], [`Handle::add_and_run`]): every item validated
//! before any is added, all of them written in one atomic append (in events of at most
//! `batch_size` items), a report with what was added, what was refused and what it cost.

use super::handle::Handle;
use super::request::Action;
use super::submit::check_entry;
use crate::error::{Error, Result};
use crate::sig::flatten::items_per_event;
use crate::sig::{Sig, SWARM_ITEMS_PER_EVENT};
use mageflow_core::{KindSpec, Message, Op, Rejection, SignatureId};
use serde::Serialize;
use serde_json::Value;
use std::time::Instant;

/// How a bulk add goes.
#[derive(Clone, Debug)]
pub struct BulkOptions {
    /// Add the valid items and report the refused ones, instead of refusing the whole bulk
    /// when one is bad.
    pub partial: bool,
    /// Items per event (default and upper bound [`SWARM_ITEMS_PER_EVENT`], lower when each item
    /// brings copies of per-item callbacks). Every event of one bulk is in the same atomic
    /// append: a crash leaves all of them or none.
    pub batch_size: usize,
    /// Close the swarm with the last item.
    pub close: bool,
    /// Validate only: the report says what would be added and refused; nothing is written.
    pub dry_run: bool,
}

impl Default for BulkOptions {
    fn default() -> Self {
        Self {
            partial: false,
            batch_size: SWARM_ITEMS_PER_EVENT,
            close: false,
            dry_run: false,
        }
    }
}

/// An item a bulk add refused: its position in the bulk, and why (the error's stable code and
/// message).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BulkRejection {
    pub index: usize,
    pub code: &'static str,
    pub message: String,
}

/// Where a bulk add is, for a progress bar: `done` of `total` items validated, then written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct BulkProgress {
    pub phase: BulkPhase,
    pub done: usize,
    pub total: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BulkPhase {
    Validating,
    Written,
}

/// What a bulk add did.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BulkReport {
    /// Items added (all of them, unless `partial` refused some; none on a dry run).
    pub added: usize,
    /// Items refused (with `partial` or `dry_run`; otherwise a bad item refuses the whole
    /// bulk).
    pub rejected: Vec<BulkRejection>,
    /// Events the items were written in (one atomic append).
    pub batches: usize,
    /// Size of the added items as JSON.
    pub bytes: u64,
    /// From the call to the durable append.
    pub seconds: f64,
    /// Whether the swarm was started by this call (`add_and_run` on a swarm not started).
    pub started: bool,
}

/// Most refused items a refusal of a whole bulk lists in its message (all are in
/// [`Error::BulkRejected`]).
const REJECTIONS_IN_MESSAGE_MAX: usize = 20;

/// The message of a refused bulk: how many items were bad, and the first of them.
pub(crate) fn describe(rejected: &[BulkRejection]) -> String {
    let mut s = format!("{} items refused:", rejected.len());
    for r in rejected.iter().take(REJECTIONS_IN_MESSAGE_MAX) {
        s.push_str(&format!(" [{}] {}: {};", r.index, r.code, r.message));
    }
    if rejected.len() > REJECTIONS_IN_MESSAGE_MAX {
        s.push_str(" …");
    }
    s
}

impl Handle {
    /// Add `items` to the swarm `swarm` (open, and not ended) in one atomic step: every item is
    /// validated first (unknown task, kwargs or input that do not fit it, a payload over its
    /// limit); without `partial`, one bad item refuses the bulk with
    /// [`Error::BulkRejected`] listing every bad one by index, and nothing is added. All the
    /// events are written in one append, so a crash leaves all of them or none. `progress`
    /// hears how far it got.
    pub async fn add_many(
        &self,
        swarm: SignatureId,
        items: Vec<Sig>,
        options: &BulkOptions,
        progress: impl FnMut(BulkProgress),
    ) -> Result<BulkReport> {
        self.bulk(swarm, items, options, None, progress).await
    }

    /// [`Handle::add_many`], and the items start at once: on a running swarm they are handed
    /// out as slots free (as any added item is); a swarm not started yet — the root of a
    /// workflow created without running — is run with `input` in the same atomic step.
    /// Refused (`not_a_root`) for a swarm not started that only its parent can start.
    pub async fn add_and_run(
        &self,
        swarm: SignatureId,
        items: Vec<Sig>,
        input: Value,
        options: &BulkOptions,
        progress: impl FnMut(BulkProgress),
    ) -> Result<BulkReport> {
        self.bulk(swarm, items, options, Some(input), progress)
            .await
    }

    async fn bulk(
        &self,
        swarm: SignatureId,
        items: Vec<Sig>,
        options: &BulkOptions,
        run: Option<Value>,
        mut progress: impl FnMut(BulkProgress),
    ) -> Result<BulkReport> {
        let clock = Instant::now();
        let state = self.workflow(swarm.workflow).await?;
        let node = state
            .node(swarm.index)
            .ok_or(Error::NoSuchSignature(swarm))?;
        let KindSpec::Swarm {
            closed,
            item_callbacks,
            ..
        } = &node.spec.kind
        else {
            return Err(Error::Rejected(Rejection::NotASwarm(swarm.index)));
        };
        if *closed {
            return Err(Error::Rejected(Rejection::SwarmClosed(swarm.index)));
        }
        if node.status.is_terminal() {
            return Err(Error::Rejected(Rejection::InvalidTransition {
                op: "add tasks to",
                status: node.status,
            }));
        }
        let not_started = node.message.is_none();
        let start = match run {
            Some(input) if not_started => {
                if swarm.index != 0 {
                    return Err(Error::Rejected(Rejection::NotARoot(swarm.index)));
                }
                Some(input)
            }
            _ => None,
        };
        // Items reach the swarm's message: validate each against it (or the input it will
        // run with).
        let entry = match (&start, &node.message) {
            (Some(input), _) => Some(input.clone()),
            (None, Some(m)) if !m.as_result => Some(m.value.clone()),
            _ => None,
        };
        let total = items.len();
        let mut rejected = Vec::new();
        let mut valid = Vec::with_capacity(total);
        let mut bytes = 0u64;
        for (index, item) in items.into_iter().enumerate() {
            let checked = item.validate(&self.registry).and_then(|()| match &entry {
                Some(input) => check_entry(&self.registry, &&item, input, &[]),
                None => Ok(()),
            });
            match checked {
                Ok(()) => {
                    bytes += serde_json::to_vec(&item).map_or(0, |b| b.len() as u64);
                    valid.push(item);
                }
                Err(e) => rejected.push(BulkRejection {
                    index,
                    code: e.code(),
                    message: e.to_string(),
                }),
            }
            if index % 1_000 == 999 {
                progress(BulkProgress {
                    phase: BulkPhase::Validating,
                    done: index + 1,
                    total,
                });
            }
        }
        progress(BulkProgress {
            phase: BulkPhase::Validating,
            done: total,
            total,
        });
        if options.dry_run {
            return Ok(BulkReport {
                added: 0,
                rejected,
                batches: 0,
                bytes: 0,
                seconds: clock.elapsed().as_secs_f64(),
                started: false,
            });
        }
        if !rejected.is_empty() && !options.partial {
            return Err(Error::BulkRejected(rejected));
        }
        // Events of at most `batch_size` items, fewer when each brings per-item callbacks.
        let per_item = mageflow_core::kind::swarm::nodes_per_item(item_callbacks);
        let batch = options.batch_size.clamp(1, items_per_event(per_item));
        let added = valid.len();
        let batches = added.div_ceil(batch);
        let mut actions = Vec::with_capacity(batches + 1);
        // The items move into their batches: no copy of the bulk is held.
        let mut rest = valid.into_iter();
        for b in 0..batches {
            let action = Action::AddItems {
                swarm: swarm.index,
                items: rest.by_ref().take(batch).collect(),
                close: options.close && b + 1 == batches,
            };
            actions.push((swarm.workflow, action));
        }
        if options.close && added == 0 {
            actions.push((
                swarm.workflow,
                Action::Core(Op::CloseSwarm { swarm: swarm.index }),
            ));
        }
        let started = start.is_some();
        if let Some(input) = start {
            actions.push((
                swarm.workflow,
                Action::Core(Op::Run {
                    message: Message::input(input),
                }),
            ));
        }
        if !actions.is_empty() {
            self.exec_actions(actions).await?;
        }
        progress(BulkProgress {
            phase: BulkPhase::Written,
            done: added,
            total,
        });
        Ok(BulkReport {
            added,
            rejected,
            batches,
            bytes,
            seconds: clock.elapsed().as_secs_f64(),
            started,
        })
    }
}
