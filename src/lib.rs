//! Mageflow: event-sourced task orchestration.
pub use mageflow_core as core;
