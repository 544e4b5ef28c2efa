//! What `/healthz` and `/readyz` report for the agent.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgeflow_runtime::status::{Check, Status};

use crate::buffer::Shared;
use crate::forward::KafkaStatus;
use crate::ingest::IngestStatus;
use crate::metrics::Metrics;

/// The agent's pipeline state.
#[derive(Debug)]
pub(crate) struct AgentStatus {
    pub ingest: Arc<IngestStatus>,
    pub kafka: Arc<KafkaStatus>,
    pub buffer: Arc<Shared>,
    pub metrics: Metrics,
    pub quota: u64,
    /// The EKS Hybrid Nodes bootstrap's phase.
    pub bootstrap: tokio::sync::watch::Receiver<edgeflow_nodeadm::Phase>,
}

/// A buffer thread silent this long is wedged (it wakes at least every 250 ms, and an fsync
/// or a reopen after a disk error backs off at most 5 s).
const WEDGED: Duration = Duration::from_secs(30);

impl AgentStatus {
    pub fn alive(&self) -> bool {
        self.buffer.since_heartbeat() < WEDGED
    }
}

impl Status for AgentStatus {
    fn live(&self) -> bool {
        self.alive()
    }

    fn ready(&self) -> Vec<Check> {
        let mqtt = self.ingest.connected.load(Ordering::Relaxed);
        let kafka = self.kafka.connected.load(Ordering::Relaxed);
        let writable = self.buffer.writable.load(Ordering::Relaxed);
        let blocked = self.buffer.blocked.load(Ordering::Relaxed);
        let stats = self.buffer.stats();
        let mqtt_detail = match (mqtt, self.ingest.last_error()) {
            (true, _) => "connected".to_owned(),
            (false, Some(e)) => format!("disconnected: {e}"),
            (false, None) => "connecting".to_owned(),
        };
        let kafka_detail = match (kafka, self.kafka.last_error()) {
            (true, _) => "brokers reachable".to_owned(),
            (false, Some(e)) => format!("unreachable: {e}"),
            (false, None) => "connecting".to_owned(),
        };
        let buffer_detail = match (writable, blocked, self.buffer.last_error()) {
            (false, _, e) => format!("not writable: {}", e.unwrap_or_default()),
            (true, true, _) if self.buffer.disk_full.load(Ordering::Relaxed) => format!(
                "disk full ({} entries, {} bytes buffered): holding MQTT acknowledgements until Kafka drains it",
                stats.count, stats.bytes
            ),
            (true, true, _) => format!("full ({} of {} bytes): holding MQTT acknowledgements", stats.bytes, self.quota),
            (true, false, _) => format!("{} entries, {} of {} bytes", stats.count, stats.bytes, self.quota),
        };
        vec![
            Check::new("mqtt", mqtt, mqtt_detail),
            Check::new("kafka", kafka, kafka_detail),
            Check::new("buffer", writable && !blocked, buffer_detail),
            // Information only: forwarding telemetry does not depend on Kubernetes.
            Check::new("bootstrap", true, format!("{} (informational)", *self.bootstrap.borrow())),
        ]
    }

    fn refresh(&self) {
        let age = self
            .buffer
            .stats()
            .oldest_received_ms
            .map(|t| (crate::buffer::now_ms() - t).max(0) as f64 / 1000.0)
            .unwrap_or(0.0);
        self.metrics.buffer_oldest_age.set(age);
    }
}
