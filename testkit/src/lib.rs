//! Test fixtures for edgeflow: real servers on `127.0.0.1`, started per test on free ports.
//!
//! * [`Mosquitto`]: Debian's `mosquitto` broker with persistence.
//! * [`Tansu`]: a real Kafka-protocol broker (`tansu` from crates.io), in memory or on sqlite,
//!   optionally behind a [`FaultProxy`] so a test can cut Kafka off.
//! * [`Moto`]: an S3 API server (`moto_server` from PyPI).
//! * [`FaultProxy`]: a TCP proxy the test controls: pass, cut, blackhole, delay.
//! * [`kafka`]: topic creation and consume-everything helpers built on the same rdkafka the
//!   product uses (Debian's kcat links a librdkafka too old for tansu).
//!
//! Every server is killed (SIGKILL) when its handle drops, so a failing test leaves nothing behind.
//! Binaries are found on `PATH`, in `~/.cargo/bin`, or through `EDGEFLOW_TANSU`,
//! `EDGEFLOW_MOSQUITTO`, `EDGEFLOW_MOTO` (`.ci/run` installs them).

pub mod kafka;
mod process;
mod proxy;
mod servers;
pub mod service;

pub use process::{Child, find_binary, free_port, on_small_disk, wait_for_port};
pub use proxy::{FaultProxy, ProxyMode};
pub use servers::{Mosquitto, Moto, Tansu, TansuStorage};
pub use service::{Service, http_get, parse_metrics};
