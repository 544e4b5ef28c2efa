//! End-to-end harness for edgeflow: Kafka backends with fault injection, a counting consumer,
//! and the oracle that compares what devices published with what came out.

pub mod kafka;
pub mod lake;
pub mod oracle;
pub mod scenario;
pub mod stack;
