//! Integration tests of the engine through the public API of `mageflow`, in one binary (one link
//! step). Each scenario runs three times: on the in-memory log, on the embedded sled log and on the
//! PostgreSQL log (a schema of its own per test; PostgreSQL must be running, see the README). Tests
//! synchronise with handlers through channels, semaphores and barriers — never sleeps — and
//! assert on the event log (`Handle::history`) as well as on handler executions.

#[macro_use]
mod support;

mod auto_resume;
mod bulk;
mod chains;
mod compaction;
mod composites;
mod control;
mod durability;
mod graphs;
mod library;
mod lifecycle;
mod priority;
mod recovery;
mod reports;
mod stats;
mod swarm_items;
mod swarms;
mod testing_engine;
mod validation;
