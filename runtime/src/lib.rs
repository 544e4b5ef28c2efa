//! Daemon plumbing shared by `edgeflow-agent` and `edgeflow-aggregator`.
//!
//! Each binary is a library plus a thin `main.rs`; this crate holds what both mains and both
//! `run` functions need and what has nothing to do with telemetry:
//!
//! * [`config`]: loading a TOML file into a `deny_unknown_fields` struct with errors that name
//!   the field, value types for durations, byte sizes and secrets.
//! * [`logging`]: `tracing` to journald (through systemd-journal-logger) under systemd, to
//!   stderr otherwise.
//! * [`systemd`]: `READY=1`, `STOPPING=1`, status lines and the watchdog.
//! * [`shutdown`]: SIGTERM/SIGINT into a cancellation token.
//! * [`status`]: the HTTP endpoint serving `/metrics`, `/healthz` and `/readyz`.

pub mod config;
pub mod logging;
pub mod shutdown;
pub mod status;
pub mod systemd;

pub use prometheus_client;
pub use tokio_util::sync::CancellationToken;
