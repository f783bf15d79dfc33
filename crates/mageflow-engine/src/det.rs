//! Hash maps and sets with a fixed hasher. Their iteration order is a function of what was
//! inserted and in which order, not of a per-process random key (std's `RandomState`), so an
//! orchestrator that walks one (the ready scan, recovery, waiters) makes the same decisions in
//! the same order on every run of the same inputs: what lets a simulation replay exactly.

use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasherDefault;

/// The engine's hash map: std's, with a fixed-key hasher.
pub(crate) type Map<K, V> = HashMap<K, V, BuildHasherDefault<DefaultHasher>>;
/// The engine's hash set: std's, with a fixed-key hasher.
pub(crate) type Set<K> = HashSet<K, BuildHasherDefault<DefaultHasher>>;
