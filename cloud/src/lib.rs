//! edgeflow-aggregator (work in progress).
pub mod config;
pub mod control;
pub mod metrics;
pub mod process;
pub mod processed;
pub mod sink;
