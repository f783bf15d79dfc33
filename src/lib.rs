//! Mageflow: event-sourced task orchestration.
pub use mageflow_core as core;
pub use mageflow_engine as engine;
pub use mageflow_store as store;
