//! The events this process's committer wrote last, kept in memory for `read_all`: the hot-tier
//! projector reads every group back right after its commit, and serving that from here saves a
//! query per group (a round trip on the path of every task, and PostgreSQL's work).
//!
//! Invariant: the cache holds a run of consecutive positions, each as it was committed, or
//! `None` once this `PgLog` moved it into the archive; a group whose first position does not
//! follow the last cached one (another process committed in between) replaces the cache.
//! Invariant: a group enters the cache only after its transaction committed, and before the
//! head watch moves past it.
//! Invariant: while this `PgLog` redacts a stream, `read` answers nothing (reads go to
//! PostgreSQL), and the cache is emptied when the redaction ends: redacted bytes are never
//! served from here. (Compactions and redactions by another process are not seen here; in a
//! deployment the log's one writer, the orchestrator, also does its compactions and
//! redactions.)

use mageflow_core::WorkflowId;
use std::collections::VecDeque;
use std::sync::Arc;

/// Events cached at most.
pub const RECENT_EVENTS_MAX: usize = 64 * 1024;
/// Encoded bytes cached at most.
pub const RECENT_BYTES_MAX: usize = 32 * 1024 * 1024;

struct Entry {
    stream: WorkflowId,
    seq: u64,
    payload: Arc<[u8]>,
}

#[derive(Default)]
pub(crate) struct Recent {
    /// Position of `entries[0]`.
    first: u64,
    entries: VecDeque<Option<Entry>>,
    bytes: usize,
    /// Redactions running in this `PgLog`.
    redacting: usize,
}

impl Recent {
    /// The position after the last one cached.
    fn next(&self) -> u64 {
        self.first + self.entries.len() as u64
    }

    /// Record a committed group: its events, in position order from `first_position`.
    pub fn committed<'a>(
        &mut self,
        first_position: u64,
        events: impl IntoIterator<Item = (WorkflowId, u64, &'a [u8])>,
    ) {
        if self.entries.is_empty() || self.next() != first_position {
            self.clear();
            self.first = first_position;
        }
        for (stream, seq, payload) in events {
            self.bytes += payload.len();
            self.entries.push_back(Some(Entry {
                stream,
                seq,
                payload: payload.into(),
            }));
        }
        while self.entries.len() > RECENT_EVENTS_MAX || self.bytes > RECENT_BYTES_MAX {
            let Some(oldest) = self.entries.pop_front() else {
                break;
            };
            if let Some(e) = oldest {
                self.bytes -= e.payload.len();
            }
            self.first += 1;
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// `stream`'s events up to `up_to_seq` were moved into the archive.
    pub fn archived(&mut self, stream: WorkflowId, up_to_seq: u64) {
        for slot in &mut self.entries {
            if let Some(e) = slot {
                if e.stream == stream && e.seq <= up_to_seq {
                    self.bytes -= e.payload.len();
                    *slot = None;
                }
            }
        }
    }

    /// A redaction starts (`true`) or ends (`false`).
    pub fn redacting(&mut self, starts: bool) {
        if starts {
            self.redacting += 1;
        } else {
            self.redacting = self.redacting.saturating_sub(1);
            self.clear();
        }
    }

    /// Up to `limit` live events from position `from`, as (position, encoded event), if the
    /// cache can answer as PostgreSQL would: it holds `from` and either `limit` events from
    /// there or everything up to `head` (what this process knows was committed); or `from` is
    /// just past the cache and past `head` (nothing to read). `None`: ask PostgreSQL.
    pub fn read(&self, from: u64, limit: usize, head: u64) -> Option<Vec<(u64, Arc<[u8]>)>> {
        if self.redacting > 0 || self.entries.is_empty() || from < self.first {
            return None;
        }
        if from >= self.next() {
            return (from == self.next() && head < from).then(Vec::new);
        }
        let skip = (from - self.first) as usize;
        let events: Vec<_> = self
            .entries
            .iter()
            .enumerate()
            .skip(skip)
            .filter_map(|(i, e)| {
                e.as_ref()
                    .map(|e| (self.first + i as u64, e.payload.clone()))
            })
            .take(limit)
            .collect();
        // Short of `limit` while later commits (another process's) are not here: ask for all.
        (events.len() == limit || self.next() > head).then_some(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(n: u128) -> WorkflowId {
        WorkflowId::from_u128(n)
    }

    fn positions(r: Option<Vec<(u64, Arc<[u8]>)>>) -> Option<Vec<u64>> {
        r.map(|v| v.into_iter().map(|(p, _)| p).collect())
    }

    #[test]
    fn serves_consecutive_groups_and_defers_the_rest() {
        let mut r = Recent::default();
        assert!(r.read(1, 10, 0).is_none(), "empty: ask PostgreSQL");
        r.committed(1, [(wf(1), 1, &b"a"[..]), (wf(2), 1, b"b")]);
        r.committed(3, [(wf(1), 2, &b"c"[..])]);
        assert_eq!(positions(r.read(1, 10, 3)), Some(vec![1, 2, 3]));
        assert_eq!(positions(r.read(2, 1, 3)), Some(vec![2]));
        assert_eq!(
            positions(r.read(4, 10, 3)),
            Some(vec![]),
            "nothing after the head"
        );
        assert!(r.read(4, 10, 4).is_none(), "another process committed 4");
        assert!(r.read(5, 10, 3).is_none());
        assert!(r.read(2, 10, 4).is_none(), "4 is committed but not here");
        assert_eq!(
            positions(r.read(2, 2, 4)),
            Some(vec![2, 3]),
            "the limit is reached"
        );
        // Another process committed 4: the next group replaces the cache.
        r.committed(5, [(wf(3), 1, &b"d"[..])]);
        assert!(r.read(3, 10, 5).is_none());
        assert_eq!(positions(r.read(5, 10, 5)), Some(vec![5]));
    }

    #[test]
    fn archived_events_are_skipped_and_redactions_empty_it() {
        let mut r = Recent::default();
        r.committed(
            10,
            [(wf(1), 1, &b"a"[..]), (wf(2), 1, b"b"), (wf(1), 2, b"c")],
        );
        r.archived(wf(1), 1);
        assert_eq!(positions(r.read(10, 10, 12)), Some(vec![11, 12]));
        assert_eq!(r.bytes, 2);
        r.redacting(true);
        assert!(
            r.read(11, 10, 12).is_none(),
            "reads go to PostgreSQL meanwhile"
        );
        r.redacting(false);
        assert!(r.read(11, 10, 12).is_none());
        assert_eq!(r.bytes, 0);
    }

    #[test]
    fn keeps_within_its_bounds() {
        let mut r = Recent::default();
        let big = vec![0u8; RECENT_BYTES_MAX / 2 + 1];
        r.committed(1, [(wf(1), 1, &big[..])]);
        r.committed(2, [(wf(1), 2, &big[..])]);
        assert_eq!(r.entries.len(), 1);
        assert_eq!(positions(r.read(2, 10, 2)), Some(vec![2]));
        assert!(r.read(1, 10, 2).is_none());
    }
}
