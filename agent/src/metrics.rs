//! Every metric the agent exports, in one place.
//!
//! Names follow Prometheus conventions under the `edgeflow_agent_` prefix (node saturation under
//! `edgeflow_node_`); counters gain `_total` on exposition. They cover the agent's four golden
//! signals:
//!
//! * traffic: messages received, records committed and forwarded, `high_water` markers written;
//! * errors: payloads rejected (by reason), redeliveries recognised, records dropped, Kafka and
//!   buffer errors;
//! * latency: buffer commit time, Kafka delivery time, MQTT receipt → Kafka acknowledgement;
//! * saturation: buffer records, bytes, oldest-record age, quota, in-flight window, and the
//!   node's CPU, memory, disk and network.
//!
//! `edgeflow-agent metrics` prints the exposition of a fresh registry; CI checks the dashboards
//! and alert rules against it.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

/// Label for reject reasons.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

/// Label for what kind of entry was forwarded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// Label for per-device (disk, interface, mount) node metrics.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabel {
    pub device: String,
}

/// Label for the bootstrap phase.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The agent's metrics. Cheap to clone (every metric is an `Arc` inside).
#[derive(Clone, Debug)]
pub struct Metrics {
    // Traffic.
    pub mqtt_messages_received: Counter,
    pub records_committed: Counter,
    pub records_forwarded: Family<KindLabel, Counter>,
    pub high_water_markers: Counter,
    // Errors.
    pub records_rejected: Family<ReasonLabel, Counter>,
    pub records_duplicate: Counter,
    pub records_dropped: Counter,
    pub dead_letters_truncated: Counter,
    pub kafka_delivery_errors: Counter,
    pub kafka_errors: Family<ReasonLabel, Counter>,
    pub buffer_commit_errors: Counter,
    pub mqtt_connection_errors: Counter,
    // Latency.
    pub buffer_commit_duration: Histogram,
    pub buffer_commit_records: Histogram,
    pub kafka_delivery_duration: Histogram,
    pub record_latency: Histogram,
    // Saturation and state.
    pub mqtt_connected: Gauge,
    pub kafka_connected: Gauge,
    pub kafka_in_flight: Gauge,
    pub buffer_records: Gauge,
    pub buffer_bytes: Gauge,
    pub buffer_quota_bytes: Gauge,
    pub buffer_file_bytes: Gauge,
    pub buffer_oldest_age: FloatGauge,
    pub buffer_blocked: Gauge,
    pub buffer_next_seq: Gauge,
    // EKS Hybrid Nodes bootstrap.
    pub bootstrap_phase: Family<PhaseLabel, Gauge>,
    pub bootstrap_attempts: Counter,
    pub bootstrap_failures: Counter,
    // Node saturation (sampled).
    pub node_cpu_utilization: FloatGauge,
    pub node_load1: FloatGauge,
    pub node_memory_used: Gauge,
    pub node_memory_total: Gauge,
    pub node_swap_used: Gauge,
    pub node_disk_used: Family<DeviceLabel, Gauge>,
    pub node_disk_total: Family<DeviceLabel, Gauge>,
    pub node_disk_read: Family<DeviceLabel, Counter>,
    pub node_disk_written: Family<DeviceLabel, Counter>,
    pub node_network_received: Family<DeviceLabel, Counter>,
    pub node_network_transmitted: Family<DeviceLabel, Counter>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 100 µs .. ~52 s
    exponential_buckets(0.0001, 2.0, 20)
}

impl Metrics {
    /// Shows `phase` in `bootstrap_phase` (every phase has a series, so alerts see 0 too).
    pub fn set_bootstrap_phase(&self, phase: &edgeflow_nodeadm::Phase) {
        for name in edgeflow_nodeadm::Phase::NAMES {
            let value = i64::from(name == phase.name());
            self.bootstrap_phase.get_or_create(&PhaseLabel { phase: name.to_owned() }).set(value);
        }
    }

    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            mqtt_messages_received: Counter::default(),
            records_committed: Counter::default(),
            records_forwarded: Family::default(),
            high_water_markers: Counter::default(),
            records_rejected: Family::default(),
            records_duplicate: Counter::default(),
            records_dropped: Counter::default(),
            dead_letters_truncated: Counter::default(),
            kafka_delivery_errors: Counter::default(),
            kafka_errors: Family::default(),
            buffer_commit_errors: Counter::default(),
            mqtt_connection_errors: Counter::default(),
            buffer_commit_duration: Histogram::new(latency_buckets()),
            buffer_commit_records: Histogram::new(exponential_buckets(1.0, 2.0, 17)),
            kafka_delivery_duration: Histogram::new(latency_buckets()),
            record_latency: Histogram::new(latency_buckets()),
            mqtt_connected: Gauge::default(),
            kafka_connected: Gauge::default(),
            kafka_in_flight: Gauge::default(),
            buffer_records: Gauge::default(),
            buffer_bytes: Gauge::default(),
            buffer_quota_bytes: Gauge::default(),
            buffer_file_bytes: Gauge::default(),
            buffer_oldest_age: FloatGauge::default(),
            buffer_blocked: Gauge::default(),
            bootstrap_phase: Family::default(),
            bootstrap_attempts: Counter::default(),
            bootstrap_failures: Counter::default(),
            buffer_next_seq: Gauge::default(),
            node_cpu_utilization: FloatGauge::default(),
            node_load1: FloatGauge::default(),
            node_memory_used: Gauge::default(),
            node_memory_total: Gauge::default(),
            node_swap_used: Gauge::default(),
            node_disk_used: Family::default(),
            node_disk_total: Family::default(),
            node_disk_read: Family::default(),
            node_disk_written: Family::default(),
            node_network_received: Family::default(),
            node_network_transmitted: Family::default(),
        };
        // Pre-create every reason so dashboards see zeros, not gaps.
        for reason in edgeflow_contract::RejectReason::ALL {
            drop(m.records_rejected.get_or_create(&ReasonLabel { reason: reason.as_str().into() }));
        }
        for kind in ["record", "dead_letter"] {
            drop(m.records_forwarded.get_or_create(&KindLabel { kind: kind.into() }));
        }

        let agent = registry.sub_registry_with_prefix("edgeflow_agent");
        agent.register(
            "build",
            "Agent build information",
            Info::new(BuildLabels { version: env!("CARGO_PKG_VERSION").into() }),
        );
        agent.register("mqtt_messages_received", "MQTT PUBLISH packets received", m.mqtt_messages_received.clone());
        agent.register("records_committed", "Valid records committed to the buffer", m.records_committed.clone());
        agent.register(
            "records_forwarded",
            "Entries acknowledged by Kafka and removed from the buffer, by kind (record, dead_letter)",
            m.records_forwarded.clone(),
        );
        agent.register(
            "records_rejected",
            "Payloads refused by validation and kept as dead letters, by reason",
            m.records_rejected.clone(),
        );
        agent.register(
            "high_water_markers",
            "high_water markers committed to the buffer (on schedule, buffer.high_water_interval, and at a clean stop), for raw-data-dlq",
            m.high_water_markers.clone(),
        );
        agent.register(
            "records_duplicate",
            "MQTT redeliveries recognised as already committed (not stored again)",
            m.records_duplicate.clone(),
        );
        agent.register(
            "records_dropped",
            "Buffered records deleted unsent to make room (buffer full, when_full = drop_oldest)",
            m.records_dropped.clone(),
        );
        agent.register(
            "dead_letters_truncated",
            "Dead letters whose payload copy was cut (records.max_payload_bytes, or the bound that keeps a dead letter within one Kafka message)",
            m.dead_letters_truncated.clone(),
        );
        agent.register(
            "kafka_delivery_errors",
            "Kafka delivery reports with an error (the entry stays buffered and is sent again)",
            m.kafka_delivery_errors.clone(),
        );
        agent.register("kafka_errors", "Kafka client errors, by librdkafka error code", m.kafka_errors.clone());
        agent.register(
            "buffer_commit_errors",
            "Buffer transactions that failed (I/O error, disk full); nothing of them was acknowledged",
            m.buffer_commit_errors.clone(),
        );
        agent.register(
            "mqtt_connection_errors",
            "MQTT connection attempts or sessions that failed",
            m.mqtt_connection_errors.clone(),
        );
        agent.register_with_unit(
            "buffer_commit_duration",
            "Time to commit one group of records durably",
            Unit::Seconds,
            m.buffer_commit_duration.clone(),
        );
        agent.register(
            "buffer_commit_records",
            "Records (and deletions) per buffer commit",
            m.buffer_commit_records.clone(),
        );
        agent.register_with_unit(
            "kafka_delivery_duration",
            "Time from handing an entry to the Kafka producer to its successful delivery report",
            Unit::Seconds,
            m.kafka_delivery_duration.clone(),
        );
        agent.register_with_unit(
            "record_latency",
            "Time from MQTT receipt to Kafka acknowledgement of a record",
            Unit::Seconds,
            m.record_latency.clone(),
        );
        agent.register("mqtt_connected", "1 while connected to the MQTT broker", m.mqtt_connected.clone());
        agent.register("kafka_connected", "1 while at least one Kafka broker is reachable", m.kafka_connected.clone());
        agent.register(
            "kafka_in_flight",
            "Entries handed to Kafka and not yet acknowledged",
            m.kafka_in_flight.clone(),
        );
        agent.register("buffer_records", "Entries in the buffer", m.buffer_records.clone());
        agent.register_with_unit(
            "buffer",
            "Bytes of entries in the buffer (counted against the quota)",
            Unit::Bytes,
            m.buffer_bytes.clone(),
        );
        agent.register_with_unit("buffer_quota", "The buffer's quota", Unit::Bytes, m.buffer_quota_bytes.clone());
        agent.register_with_unit(
            "buffer_file",
            "Size of the buffer file on disk",
            Unit::Bytes,
            m.buffer_file_bytes.clone(),
        );
        agent.register_with_unit(
            "buffer_oldest_record_age",
            "Age of the oldest entry in the buffer (0 when empty)",
            Unit::Seconds,
            m.buffer_oldest_age.clone(),
        );
        agent.register(
            "buffer_blocked",
            "1 while appends wait for room (when_full = block): MQTT messages stay unacknowledged",
            m.buffer_blocked.clone(),
        );
        agent.register("buffer_next_seq", "The next seq the buffer will assign", m.buffer_next_seq.clone());
        agent.register(
            "bootstrap_phase",
            "1 for the EKS Hybrid Nodes bootstrap's current phase (disabled, pending, preflight, installing, \
             initializing, verifying, joined, failed), 0 for the others",
            m.bootstrap_phase.clone(),
        );
        agent.register(
            "bootstrap_attempts",
            "EKS Hybrid Nodes bootstrap attempts that ended (joined or failed)",
            m.bootstrap_attempts.clone(),
        );
        agent.register(
            "bootstrap_failures",
            "EKS Hybrid Nodes bootstrap attempts that failed",
            m.bootstrap_failures.clone(),
        );

        let node = registry.sub_registry_with_prefix("edgeflow_node");
        node.register("cpu_utilization_ratio", "CPU busy fraction of the node, 0..1", m.node_cpu_utilization.clone());
        node.register("load1", "1-minute load average of the node", m.node_load1.clone());
        node.register_with_unit("memory_used", "Memory in use on the node", Unit::Bytes, m.node_memory_used.clone());
        node.register_with_unit(
            "memory_total",
            "Memory installed on the node",
            Unit::Bytes,
            m.node_memory_total.clone(),
        );
        node.register_with_unit("swap_used", "Swap in use on the node", Unit::Bytes, m.node_swap_used.clone());
        node.register_with_unit(
            "disk_used",
            "Bytes used per mounted filesystem",
            Unit::Bytes,
            m.node_disk_used.clone(),
        );
        node.register_with_unit("disk_total", "Size per mounted filesystem", Unit::Bytes, m.node_disk_total.clone());
        node.register_with_unit("disk_read", "Bytes read per filesystem", Unit::Bytes, m.node_disk_read.clone());
        node.register_with_unit(
            "disk_written",
            "Bytes written per filesystem",
            Unit::Bytes,
            m.node_disk_written.clone(),
        );
        node.register_with_unit(
            "network_receive",
            "Bytes received per network interface",
            Unit::Bytes,
            m.node_network_received.clone(),
        );
        node.register_with_unit(
            "network_transmit",
            "Bytes transmitted per network interface",
            Unit::Bytes,
            m.node_network_transmitted.clone(),
        );
        m
    }

    /// Counts a rejected payload.
    pub fn rejected(&self, reason: &str) {
        self.records_rejected.get_or_create(&ReasonLabel { reason: reason.to_owned() }).inc();
    }

    /// Counts a Kafka client error.
    pub fn kafka_error(&self, code: &str) {
        self.kafka_errors.get_or_create(&ReasonLabel { reason: code.to_owned() }).inc();
    }
}

/// The exposition of a fresh registry: every metric the agent exports, at zero.
pub fn describe() -> String {
    let mut registry = Registry::default();
    Metrics::register(&mut registry);
    let mut out = String::new();
    // Encoding into a String cannot fail.
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("encoding metrics into a String");
    out
}
