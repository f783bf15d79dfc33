//! Commands on a running system (cancel, interrupt, suspend, resume, delete, restore, rerun):
//! see [`mageflow_engine::control`]; `mageflow::cluster::relay_control` sends one to the
//! orchestrator of a PostgreSQL + Redis deployment.

pub use mageflow_engine::control::*;
