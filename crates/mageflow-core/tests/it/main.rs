//! Integration tests of the pure core, in one binary (one link step): example tests of the
//! semantics, property tests of the invariants, and golden files of the event encoding.

mod conditions;
mod golden;
mod graph_props;
mod graphs;
mod priority;
mod props;
mod rerun;
mod semantics;
mod support;
mod swarm_items;
