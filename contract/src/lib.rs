//! What crosses the edge/cloud boundary.
//!
//! The agent (on the Proxmox node) and the aggregator (on EKS) never depend on each other;
//! they agree through this crate only:
//!
//! * [`reading`]: the device payload (the reference JSON schema), how it is validated, and why
//!   a payload is refused ([`RejectReason`]).
//! * [`record`]: the `raw-data` message value — the reading's original fields plus its provenance
//!   `(node_id, epoch, seq)`, which identifies a record end to end.
//! * [`deadletter`]: the `raw-data-dlq` message value — a refused payload, kept with its reason.
//! * [`topics`]: default topic names.
//!
//! The crate does no I/O and reads no clock: callers pass "now" where a rule needs it.

pub mod deadletter;
pub mod reading;
pub mod record;

pub use deadletter::{DeadLetter, MarkerKind};
pub use reading::{Limits, MAX_ABS_NUMBER, Reading, RejectReason, Rejection, TimeBounds};
pub use record::{MAX_EPOCH_BYTES, Provenance, RESEND_HEADER, RawRecord, is_valid_epoch};

/// Default Kafka topic names. Operators may rename them in configuration.
pub mod topics {
    /// Accepted records, stamped with provenance, keyed by `device_id`.
    pub const RAW: &str = "raw-data";
    /// Refused payloads with their reason (see [`crate::DeadLetter`]).
    pub const DEAD_LETTER: &str = "raw-data-dlq";
    /// The aggregator's processed stream (aggregates, filtered and rejected readings).
    pub const PROCESSED: &str = "processed-data";
}
