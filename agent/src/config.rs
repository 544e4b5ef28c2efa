//! The agent's configuration: the TOML file ([`Config`]) and its validated form ([`Settings`]).
//!
//! `Config` mirrors the file one to one (`deny_unknown_fields`, named defaults, see
//! `default.toml` for every key with its documentation). [`Config::validate`] turns it into
//! `Settings` with real types, reading secret and certificate files, and fails with an
//! [`Invalid`] naming the key and the problem. Secrets never appear in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration as StdDuration;

use edgeflow_contract::Limits;
use edgeflow_runtime::config::{ByteSize, Duration, Invalid, Secret, read_secret_file, resolve_credential_path};
use serde::Deserialize;

use crate::buffer::WhenFull;
use crate::ingest::Rules;

/// The commented default configuration (what `edgeflow-agent default-config` prints): the
/// agent's own keys, then the `[bootstrap]` section from `edgeflow-nodeadm`.
pub static DEFAULT_CONFIG: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| format!("{}\n{}", include_str!("default.toml"), edgeflow_nodeadm::DEFAULT_CONFIG));

/// The configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Identity of this node in `(node_id, seq)`. Default: the host name.
    #[serde(default)]
    pub node_id: Option<String>,
    /// Directory of the buffer and state.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Longest graceful stop.
    #[serde(default = "default_shutdown_timeout")]
    pub shutdown_timeout: Duration,
    /// MQTT source.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Kafka destination.
    pub kafka: KafkaConfig,
    /// The durable buffer.
    #[serde(default)]
    pub buffer: BufferConfig,
    /// Validation of payloads.
    #[serde(default)]
    pub records: RecordsConfig,
    /// Status endpoint and node sampling.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// EKS Hybrid Nodes registration through nodeadm (off by default).
    #[serde(default)]
    pub bootstrap: edgeflow_nodeadm::BootstrapConfig,
}

/// `[mqtt]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// MQTT protocol version: "5" (default) or "3.1.1".
    #[serde(default = "default_protocol")]
    pub protocol: crate::ingest::Protocol,
    /// `mqtt://host:port` or `mqtts://host:port`.
    #[serde(default = "default_mqtt_url")]
    pub url: String,
    /// Topic filters, subscribed with QoS 1.
    #[serde(default = "default_topics")]
    pub topics: Vec<String>,
    /// Client id of the persistent session. Default `edgeflow-agent-<node_id>`.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Username for the broker.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// CA bundle (PEM) for `mqtts://`.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[serde(default)]
    pub client_cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mutual TLS.
    #[serde(default)]
    pub client_key_file: Option<PathBuf>,
    /// MQTT keep-alive interval.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Duration,
    /// How long the broker keeps the session while we are away.
    #[serde(default = "default_session_expiry")]
    pub session_expiry: Duration,
    /// MQTT 5 Receive Maximum.
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u32,
    /// Largest packet accepted from the broker (sent as MQTT 5's Maximum Packet Size, and the
    /// MQTT 3.1.1 client's incoming limit). Default: MQTT's maximum, 268,435,455 bytes, so
    /// that the agent takes whatever the broker takes and refuses an oversized payload itself,
    /// as a dead letter. A smaller value must be at least the broker's own limit (mosquitto:
    /// `message_size_limit`): under MQTT 5 the broker silently drops what is larger than we
    /// advertise, and under 3.1.1 a larger packet drops the connection, and the broker sends it
    /// again on every reconnect. A payload up to this size is held in memory while it is
    /// classified: bound it at the broker (`message_size_limit`) to bound the agent's memory.
    #[serde(default = "default_max_packet_size")]
    pub max_packet_size: ByteSize,
    /// Connection attempt timeout.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: Duration,
    /// Longest wait between reconnection attempts.
    #[serde(default = "default_reconnect_backoff_max")]
    pub reconnect_backoff_max: Duration,
}

impl Default for MqttConfig {
    fn default() -> Self {
        parse_section()
    }
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap servers, comma-separated.
    pub brokers: String,
    /// Topic for accepted records.
    #[serde(default = "default_topic")]
    pub topic: String,
    /// Topic for dead letters.
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
    /// Most entries awaiting Kafka's acknowledgement.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: u32,
    /// librdkafka settings passed through.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// librdkafka settings read from files (secrets).
    #[serde(default)]
    pub property_files: BTreeMap<String, PathBuf>,
}

/// `[buffer]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferConfig {
    /// Quota on buffered bytes.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Policy when the quota is reached.
    #[serde(default = "default_when_full")]
    pub when_full: WhenFull,
    /// Records remembered for redelivery detection. It must cover the broker's in-flight
    /// window: under MQTT 5 that is `mqtt.receive_maximum`; under MQTT 3.1.1 it is the broker's
    /// setting (mosquitto: `max_inflight_messages`, 0 = unlimited), which the agent cannot see,
    /// so the floor is what the protocol allows on one connection, 65,535 packet ids. Unset
    /// (the default): `max(32768, that floor, max_batch)`. A value below the floor is refused.
    #[serde(default)]
    pub dedup_horizon: Option<u64>,
    /// Most messages per commit.
    #[serde(default = "default_max_batch")]
    pub max_batch: u32,
    /// redb page cache.
    #[serde(default = "default_cache_size")]
    pub cache_size: ByteSize,
    /// How often to write a durable `high_water` marker into the buffer (forwarded to
    /// raw-data-dlq like every dead letter): "complete through seq N at T" for `verify`. Written
    /// even when idle, since a marker's age is how `verify --max-marker-age` notices a node that
    /// stopped; one small entry per interval. A marker is also written at every clean stop.
    /// `0` writes them only at a clean stop; otherwise 1s to 1d.
    #[serde(default = "default_high_water_interval")]
    pub high_water_interval: Duration,
}

impl Default for BufferConfig {
    fn default() -> Self {
        parse_section()
    }
}

/// `[records]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordsConfig {
    /// Largest accepted payload.
    #[serde(default = "default_max_payload_bytes")]
    pub max_payload_bytes: ByteSize,
    /// Oldest accepted event time, relative to now (0 disables).
    #[serde(default = "default_max_past")]
    pub max_past: Duration,
    /// Furthest accepted event time into the future (0 disables).
    #[serde(default = "default_max_future")]
    pub max_future: Duration,
    /// When set, the topic level (0-based) that names the device: a reading whose `device_id`
    /// differs from it is refused (`device_topic_mismatch`). With broker ACLs that pin each
    /// device's credentials to its own topic, a device cannot report as another.
    #[serde(default)]
    pub device_topic_level: Option<u8>,
}

impl Default for RecordsConfig {
    fn default() -> Self {
        parse_section()
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the status endpoint.
    #[serde(default = "default_listen")]
    pub listen: String,
    /// Node sampling period.
    #[serde(default = "default_saturation_interval")]
    pub saturation_interval: Duration,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        parse_section()
    }
}

/// Every field at its default: an empty TOML document.
fn parse_section<T: for<'de> Deserialize<'de>>() -> T {
    // Every field of these sections has a serde default, so an empty table cannot fail.
    edgeflow_runtime::config::parse::<T>("").expect("an empty section deserialises to its defaults")
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("/var/lib/edgeflow")
}
fn default_shutdown_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_protocol() -> crate::ingest::Protocol {
    crate::ingest::Protocol::V5
}
fn default_mqtt_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_topics() -> Vec<String> {
    vec!["devices/+/telemetry".into()]
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_session_expiry() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_receive_maximum() -> u32 {
    8192
}
fn default_max_packet_size() -> ByteSize {
    ByteSize(MQTT_MAX_PACKET_BYTES)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_reconnect_backoff_max() -> Duration {
    Duration::from_secs(30)
}
fn default_topic() -> String {
    edgeflow_contract::topics::RAW.into()
}
fn default_dlq_topic() -> String {
    edgeflow_contract::topics::DEAD_LETTER.into()
}
fn default_max_in_flight() -> u32 {
    20_000
}
fn default_max_bytes() -> ByteSize {
    ByteSize::gib(1)
}
fn default_when_full() -> WhenFull {
    WhenFull::Block
}
fn default_max_batch() -> u32 {
    8192
}
fn default_cache_size() -> ByteSize {
    ByteSize::mib(4)
}
fn default_max_payload_bytes() -> ByteSize {
    ByteSize::kib(16)
}
fn default_high_water_interval() -> Duration {
    Duration::from_secs(60)
}
fn default_max_past() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_max_future() -> Duration {
    Duration::from_secs(600)
}
fn default_listen() -> String {
    "0.0.0.0:9464".into()
}
fn default_saturation_interval() -> Duration {
    Duration::from_secs(15)
}

/// TLS material for `mqtts://`.
#[derive(Clone)]
pub struct TlsSettings {
    pub ca_pem: Vec<u8>,
    pub client_cert_pem: Option<Vec<u8>>,
    pub client_key_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSettings")
            .field("ca_pem_bytes", &self.ca_pem.len())
            .field("client_cert", &self.client_cert_pem.is_some())
            .field("client_key", &self.client_key_pem.as_ref().map(|_| "***"))
            .finish()
    }
}

impl TlsSettings {
    /// rumqttc's TLS configuration.
    pub fn to_rumqttc(&self) -> rumqttc::TlsConfiguration {
        let client_auth = match (&self.client_cert_pem, &self.client_key_pem) {
            (Some(c), Some(k)) => Some((c.clone(), k.clone())),
            _ => None,
        };
        rumqttc::TlsConfiguration::Simple { ca: self.ca_pem.clone(), alpn: None, client_auth }
    }
}

/// Validated MQTT settings.
#[derive(Debug, Clone)]
pub struct MqttSettings {
    pub protocol: crate::ingest::Protocol,
    pub host: String,
    pub port: u16,
    pub tls: Option<rumqttc::TlsConfiguration>,
    pub tls_files: Option<TlsSettings>,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub topics: Vec<String>,
    pub keep_alive: StdDuration,
    pub session_expiry_secs: u32,
    pub receive_maximum: u16,
    pub max_packet_size: u32,
    pub connect_timeout_secs: u64,
    pub reconnect_max: StdDuration,
}

/// librdkafka properties; values of secret-looking keys are masked in `Debug`.
#[derive(Clone, Default)]
pub struct KafkaProperties(pub BTreeMap<String, Secret>);

impl fmt::Debug for KafkaProperties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.0 {
            if is_secret_property(k) {
                m.entry(k, &"***");
            } else {
                m.entry(k, &v.expose());
            }
        }
        m.finish()
    }
}

/// Whether a librdkafka property holds a secret.
pub fn is_secret_property(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "secret", "key.pem", "keystore", "jaas", "oauthbearer.config", "token"].iter().any(|s| k.contains(s))
}

/// Validated Kafka settings.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub topic: String,
    pub dlq_topic: String,
    pub max_in_flight: usize,
    pub properties: KafkaProperties,
}

/// Validated buffer settings.
#[derive(Debug, Clone)]
pub struct BufferSettings {
    pub max_bytes: u64,
    pub when_full: WhenFull,
    pub dedup_horizon: u64,
    pub max_batch: usize,
    pub cache_bytes: usize,
    /// `None`: markers only at a clean stop.
    pub high_water_interval: Option<StdDuration>,
}

/// Validated status endpoint settings.
#[derive(Debug, Clone)]
pub struct MetricsSettings {
    pub listen: SocketAddr,
    pub saturation_interval: StdDuration,
}

/// The agent's validated settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub node_id: String,
    pub data_dir: PathBuf,
    pub shutdown_timeout: StdDuration,
    pub mqtt: MqttSettings,
    pub kafka: KafkaSettings,
    pub buffer: BufferSettings,
    pub rules: Rules,
    pub metrics: MetricsSettings,
    /// The EKS Hybrid Nodes bootstrap; `None` when disabled.
    pub bootstrap: Option<edgeflow_nodeadm::BootstrapSettings>,
}

/// A librdkafka property the agent's delivery guarantee rests on: which values keep it, and
/// why. Keys are compared case-insensitively (librdkafka itself would refuse another case, but
/// only when the producer is built, and `validate` should say so first).
struct Pinned {
    key: &'static str,
    /// Whether a value keeps the guarantee.
    allowed: fn(&str) -> bool,
    /// What to write instead, and why.
    why: &'static str,
}

/// librdkafka properties the agent sets itself because the gapless, ordered, idempotent
/// producer (see `forward`) depends on them. Overriding one with another value is refused.
const PINNED_PROPERTIES: &[Pinned] = &[
    Pinned { key: "bootstrap.servers", allowed: |_| false, why: "is set from kafka.brokers" },
    Pinned {
        key: "enable.idempotence",
        allowed: |v| v == "true",
        why: "must be true: the idempotent producer is what keeps retries from duplicating or reordering records",
    },
    Pinned { key: "acks", allowed: |v| matches!(v, "all" | "-1"), why: ACKS_WHY },
    Pinned { key: "request.required.acks", allowed: |v| matches!(v, "all" | "-1"), why: ACKS_WHY },
    Pinned {
        key: "enable.gapless.guarantee",
        allowed: |v| v == "true",
        why: "must be true: without it a failed message could leave a gap in a partition's seq order",
    },
    Pinned { key: "message.timeout.ms", allowed: |v| v == "0", why: TIMEOUT_WHY },
    Pinned { key: "delivery.timeout.ms", allowed: |v| v == "0", why: TIMEOUT_WHY },
    Pinned { key: "max.in.flight.requests.per.connection", allowed: in_flight_ok, why: IN_FLIGHT_WHY },
    Pinned { key: "max.in.flight", allowed: in_flight_ok, why: IN_FLIGHT_WHY },
    Pinned { key: "retries", allowed: |v| v == "2147483647", why: RETRIES_WHY },
    Pinned { key: "message.send.max.retries", allowed: |v| v == "2147483647", why: RETRIES_WHY },
    Pinned { key: "queuing.strategy", allowed: |v| v == "fifo", why: "must be fifo: records must leave in seq order" },
    Pinned {
        key: "transactional.id",
        allowed: |_| false,
        why: "must not be set: the agent does not use Kafka transactions (delivery rests on the idempotent producer), and a transactional producer refuses every record sent outside one",
    },
    Pinned {
        key: "message.max.bytes",
        allowed: |v| v.parse::<usize>().is_ok_and(|n| n >= MESSAGE_MIN_BYTES),
        why: "must be at least 263168 (256 KiB + 1 KiB): every dead letter must fit one Kafka message, or the forwarder stops behind it",
    },
    Pinned {
        key: "partitioner",
        allowed: |v| v != "random",
        why: "must be deterministic for a key (murmur2_random, consistent_random, ...): the aggregator relies on a device's records staying in one partition",
    },
];

const ACKS_WHY: &str = "must be all (or -1): a record is deleted from the buffer on Kafka's acknowledgement, which must mean every in-sync replica has it";
const TIMEOUT_WHY: &str = "must be 0 (no local timeout): a record expiring in librdkafka's queue would fail the partition's seq order; the buffer is what bounds a Kafka outage";
const IN_FLIGHT_WHY: &str =
    "must be 1..=5: the idempotent producer keeps a partition in order only with at most 5 requests in flight";
const RETRIES_WHY: &str =
    "must not be lowered (default 2147483647): a record that runs out of retries fails the partition's seq order";

/// The smallest `message.max.bytes` that takes the largest dead letter and its key.
const MESSAGE_MIN_BYTES: usize = crate::ingest::dead_letter::DEAD_LETTER_MAX_BYTES + 1024;

fn in_flight_ok(v: &str) -> bool {
    v.parse::<u32>().is_ok_and(|n| (1..=5).contains(&n))
}

/// The in-flight window of QoS 1 messages an MQTT 3.1.1 broker may hold for one connection:
/// one per packet id. The broker's own cap (mosquitto: `max_inflight_messages`, 0 = none) may
/// be lower, but the agent cannot see it.
pub const MQTT_PACKET_IDS: u64 = 65_535;

/// The largest packet MQTT can carry (its remaining length is at most 268,435,455 bytes): the
/// default `mqtt.max_packet_size`, so the agent takes whatever its broker takes.
pub const MQTT_MAX_PACKET_BYTES: u64 = 268_435_455;

/// The dedup horizon when `buffer.dedup_horizon` is not set.
const DEFAULT_DEDUP_HORIZON: u64 = 32_768;

impl Config {
    /// Parses a configuration file.
    pub fn load(path: &Path) -> Result<Self, edgeflow_runtime::config::LoadError> {
        edgeflow_runtime::config::load(path)
    }

    /// Checks every value and builds the settings. Reads secret and certificate files.
    pub fn validate(&self) -> Result<Settings, Invalid> {
        let node_id = match &self.node_id {
            Some(id) => id.clone(),
            None => sysinfo::System::host_name().map_err(|e| {
                Invalid::new("node_id", format!("not set and the host name is unavailable ({e}); set it"))
            })?,
        };
        if node_id.is_empty()
            || node_id.len() > 128
            || !node_id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        {
            return Err(Invalid::new(
                "node_id",
                format!("`{node_id}` must be 1..=128 of letters, digits, '.', '_', '-'"),
            ));
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(Invalid::new("data_dir", "must not be empty"));
        }
        let records = self.validate_records()?;
        Ok(Settings {
            mqtt: self.validate_mqtt(&node_id, records.limits.max_payload_bytes)?,
            kafka: self.validate_kafka()?,
            buffer: self.validate_buffer(&records)?,
            metrics: MetricsSettings {
                listen: self.metrics.listen.parse().map_err(|e| {
                    Invalid::new(
                        "metrics.listen",
                        format!("`{}` is not an address like 0.0.0.0:9464: {e}", self.metrics.listen),
                    )
                })?,
                saturation_interval: at_least("metrics.saturation_interval", self.metrics.saturation_interval, 1)?,
            },
            rules: records,
            bootstrap: self.bootstrap.validate()?,
            shutdown_timeout: at_least("shutdown_timeout", self.shutdown_timeout, 1)?,
            data_dir: self.data_dir.clone(),
            node_id,
        })
    }

    fn validate_records(&self) -> Result<Rules, Invalid> {
        let r = &self.records;
        let max_payload = r.max_payload_bytes.bytes();
        if !(64..=16 * 1024 * 1024).contains(&max_payload) {
            return Err(Invalid::new("records.max_payload_bytes", "must be between 64B and 16MiB"));
        }
        let ms = |d: Duration| (!d.get().is_zero()).then(|| d.get().as_millis().min(i64::MAX as u128) as i64);
        Ok(Rules {
            limits: Limits { max_payload_bytes: max_payload as usize, ..Limits::default() },
            max_past_ms: ms(r.max_past),
            max_future_ms: ms(r.max_future),
            device_topic_level: r.device_topic_level.map(usize::from),
        })
    }

    fn validate_mqtt(&self, node_id: &str, max_payload: usize) -> Result<MqttSettings, Invalid> {
        let m = &self.mqtt;
        let url = url::Url::parse(&m.url)
            .map_err(|e| Invalid::new("mqtt.url", format!("`{}` is not a URL like mqtt://host:1883: {e}", m.url)))?;
        let (tls, default_port) = match url.scheme() {
            "mqtt" | "tcp" => (false, 1883),
            "mqtts" | "ssl" => (true, 8883),
            other => return Err(Invalid::new("mqtt.url", format!("scheme `{other}` is not mqtt:// or mqtts://"))),
        };
        let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(|| Invalid::new("mqtt.url", "has no host"))?;
        if !matches!(url.path(), "" | "/") || url.query().is_some() {
            return Err(Invalid::new("mqtt.url", "must not have a path or query"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Invalid::new(
                "mqtt.url",
                "must not carry credentials; use mqtt.username and mqtt.password_file",
            ));
        }
        if m.topics.is_empty() {
            return Err(Invalid::new("mqtt.topics", "must list at least one topic filter"));
        }
        for t in &m.topics {
            validate_topic_filter(t).map_err(|p| Invalid::new("mqtt.topics", format!("`{t}`: {p}")))?;
        }
        let client_id = m.client_id.clone().unwrap_or_else(|| format!("edgeflow-agent-{node_id}"));
        if client_id.is_empty() || client_id.len() > 256 {
            return Err(Invalid::new("mqtt.client_id", "must be 1..=256 bytes"));
        }
        let password = m.password_file.as_deref().map(|p| read_secret_file("mqtt.password_file", p)).transpose()?;
        if password.is_some() && m.username.is_none() {
            return Err(Invalid::new("mqtt.password_file", "is set but mqtt.username is not"));
        }
        let tls_files = if tls {
            let ca_path = m.ca_file.clone().unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
            let ca_pem = read_pem("mqtt.ca_file", &ca_path)?;
            let (client_cert_pem, client_key_pem) = match (&m.client_cert_file, &m.client_key_file) {
                (Some(c), Some(k)) => {
                    (Some(read_pem("mqtt.client_cert_file", c)?), Some(read_pem("mqtt.client_key_file", k)?))
                }
                (None, None) => (None, None),
                (Some(_), None) => {
                    return Err(Invalid::new("mqtt.client_key_file", "is required with mqtt.client_cert_file"));
                }
                (None, Some(_)) => {
                    return Err(Invalid::new("mqtt.client_cert_file", "is required with mqtt.client_key_file"));
                }
            };
            Some(TlsSettings { ca_pem, client_cert_pem, client_key_pem })
        } else {
            for (field, set) in [
                ("mqtt.ca_file", m.ca_file.is_some()),
                ("mqtt.client_cert_file", m.client_cert_file.is_some()),
                ("mqtt.client_key_file", m.client_key_file.is_some()),
            ] {
                if set {
                    return Err(Invalid::new(field, "only applies to mqtts:// URLs"));
                }
            }
            None
        };
        let receive_maximum = u16::try_from(m.receive_maximum)
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Invalid::new("mqtt.receive_maximum", "must be 1..=65535"))?;
        let max_packet = m.max_packet_size.bytes();
        if max_packet < max_payload as u64 + 1024 || max_packet > MQTT_MAX_PACKET_BYTES {
            return Err(Invalid::new(
                "mqtt.max_packet_size",
                format!(
                    "must be at least records.max_payload_bytes + 1KiB (room for the topic) and at most {MQTT_MAX_PACKET_BYTES} (MQTT's maximum, the default); below the broker's own limit (mosquitto: message_size_limit) larger payloads are lost at the broker (MQTT 5) or drop the connection (3.1.1)"
                ),
            ));
        }
        let keep_alive = at_least("mqtt.keep_alive", m.keep_alive, 5)?;
        if keep_alive.as_secs() > u64::from(u16::MAX) {
            return Err(Invalid::new("mqtt.keep_alive", "must be at most 65535s"));
        }
        let session_expiry_secs = u32::try_from(m.session_expiry.get().as_secs())
            .map_err(|_| Invalid::new("mqtt.session_expiry", "must be below 136 years"))?;
        Ok(MqttSettings {
            protocol: m.protocol,
            host: host.trim_start_matches('[').trim_end_matches(']').to_owned(),
            port: url.port().unwrap_or(default_port),
            tls: tls_files.as_ref().map(TlsSettings::to_rumqttc),
            tls_files,
            client_id,
            username: m.username.clone(),
            password,
            topics: m.topics.clone(),
            keep_alive,
            session_expiry_secs,
            receive_maximum,
            max_packet_size: max_packet as u32,
            connect_timeout_secs: at_least("mqtt.connect_timeout", m.connect_timeout, 1)?.as_secs(),
            reconnect_max: at_least("mqtt.reconnect_backoff_max", m.reconnect_backoff_max, 1)?,
        })
    }

    fn validate_kafka(&self) -> Result<KafkaSettings, Invalid> {
        let k = &self.kafka;
        if k.brokers.split(',').all(|b| b.trim().is_empty()) {
            return Err(Invalid::new("kafka.brokers", "must list at least one host:port"));
        }
        for b in k.brokers.split(',').map(str::trim).filter(|b| !b.is_empty()) {
            let port_ok = b.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !port_ok {
                return Err(Invalid::new("kafka.brokers", format!("`{b}` is not host:port")));
            }
        }
        validate_kafka_topic("kafka.topic", &k.topic)?;
        validate_kafka_topic("kafka.dlq_topic", &k.dlq_topic)?;
        if k.topic == k.dlq_topic {
            return Err(Invalid::new("kafka.dlq_topic", "must differ from kafka.topic"));
        }
        if !(1..=1_000_000).contains(&k.max_in_flight) {
            return Err(Invalid::new("kafka.max_in_flight", "must be 1..=1000000"));
        }
        let mut properties = BTreeMap::new();
        for (key, value) in &k.properties {
            check_pinned("kafka.properties", key, value)?;
            properties.insert(key.clone(), Secret::new(value.clone()));
        }
        for (key, path) in &k.property_files {
            if properties.contains_key(key) {
                return Err(Invalid::new(format!("kafka.property_files.{key}"), "is also set in kafka.properties"));
            }
            let value = read_secret_file(&format!("kafka.property_files.{key}"), path)?;
            check_pinned("kafka.property_files", key, value.expose())?;
            properties.insert(key.clone(), value);
        }
        Ok(KafkaSettings {
            brokers: k.brokers.clone(),
            topic: k.topic.clone(),
            dlq_topic: k.dlq_topic.clone(),
            max_in_flight: k.max_in_flight as usize,
            properties: KafkaProperties(properties),
        })
    }

    fn validate_buffer(&self, rules: &Rules) -> Result<BufferSettings, Invalid> {
        let b = &self.buffer;
        let min = (1024 * 1024).max(64 * rules.limits.max_payload_bytes as u64);
        if b.max_bytes.bytes() < min {
            return Err(Invalid::new(
                "buffer.max_bytes",
                format!("must be at least {} (1MiB and 64 times records.max_payload_bytes)", ByteSize(min)),
            ));
        }
        if !(1..=65_535).contains(&b.max_batch) {
            return Err(Invalid::new("buffer.max_batch", "must be 1..=65535"));
        }
        // A crash between commit and PUBACK makes the broker redeliver at most its in-flight
        // window, and a commit retried after an I/O error re-checks at most one batch.
        let (window, source) = match self.mqtt.protocol {
            crate::ingest::Protocol::V5 => (u64::from(self.mqtt.receive_maximum), "mqtt.receive_maximum"),
            crate::ingest::Protocol::V311 => {
                (MQTT_PACKET_IDS, "the 65535 packet ids an MQTT 3.1.1 broker may have in flight")
            }
        };
        let floor = window.max(u64::from(b.max_batch));
        let dedup_horizon = b.dedup_horizon.unwrap_or(DEFAULT_DEDUP_HORIZON.max(floor));
        if dedup_horizon < floor {
            let protocol = match self.mqtt.protocol {
                crate::ingest::Protocol::V5 => "MQTT 5",
                crate::ingest::Protocol::V311 => "MQTT 3.1.1",
            };
            return Err(Invalid::new(
                "buffer.dedup_horizon",
                format!(
                    "must be at least {floor} under {protocol} ({source}, and buffer.max_batch), or redeliveries could go unrecognised; leave it unset to size it so"
                ),
            ));
        }
        if b.cache_size.bytes() < 1024 * 1024 {
            return Err(Invalid::new("buffer.cache_size", "must be at least 1MiB"));
        }
        let every = b.high_water_interval.get();
        if !every.is_zero() && !(StdDuration::from_secs(1)..=StdDuration::from_secs(86_400)).contains(&every) {
            return Err(Invalid::new(
                "buffer.high_water_interval",
                "must be 0 (markers only at a clean stop) or 1s to 1d: more often floods raw-data-dlq, less often leaves verify's tail proof a day behind",
            ));
        }
        Ok(BufferSettings {
            max_bytes: b.max_bytes.bytes(),
            when_full: b.when_full,
            dedup_horizon,
            max_batch: b.max_batch as usize,
            cache_bytes: b.cache_size.bytes() as usize,
            high_water_interval: (!every.is_zero()).then_some(every),
        })
    }
}

/// Refuses a librdkafka property (`section.key = value`) that would void the delivery
/// guarantee (see [`PINNED_PROPERTIES`]).
fn check_pinned(section: &str, key: &str, value: &str) -> Result<(), Invalid> {
    let normalized = key.trim().to_ascii_lowercase();
    match PINNED_PROPERTIES.iter().find(|p| p.key == normalized) {
        Some(p) if !(p.allowed)(value.trim().to_ascii_lowercase().as_str()) => {
            Err(Invalid::new(format!("{section}.{key}"), p.why))
        }
        _ => Ok(()),
    }
}

fn at_least(field: &str, d: Duration, secs: u64) -> Result<StdDuration, Invalid> {
    if d.get() < StdDuration::from_secs(secs) {
        return Err(Invalid::new(field, format!("must be at least {secs}s")));
    }
    Ok(d.get())
}

fn read_pem(field: &str, path: &Path) -> Result<Vec<u8>, Invalid> {
    let resolved = resolve_credential_path(path);
    let bytes = std::fs::read(&resolved)
        .map_err(|e| Invalid::new(field, format!("cannot read {}: {e}", resolved.display())))?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(Invalid::new(field, format!("{} is not a PEM file", resolved.display())));
    }
    Ok(bytes)
}

/// MQTT topic filter rules: non-empty, `#` only as the whole last level, `+` only as a whole level.
fn validate_topic_filter(filter: &str) -> Result<(), &'static str> {
    if filter.is_empty() || filter.len() > 65_535 {
        return Err("must be 1..=65535 bytes");
    }
    if filter.contains('\0') {
        return Err("must not contain NUL");
    }
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i + 1 != levels.len()) {
            return Err("`#` must be the whole last level");
        }
        if level.contains('+') && *level != "+" {
            return Err("`+` must be a whole level");
        }
    }
    Ok(())
}

fn validate_kafka_topic(field: &str, topic: &str) -> Result<(), Invalid> {
    let ok = !topic.is_empty()
        && topic.len() <= 249
        && topic != "."
        && topic != ".."
        && topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok { Ok(()) } else { Err(Invalid::new(field, format!("`{topic}` is not a valid Kafka topic name"))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, String> {
        edgeflow_runtime::config::parse(text)
    }

    fn invalid(text: &str) -> Invalid {
        parse(text).expect("parses").validate().expect_err("invalid")
    }

    #[test]
    fn default_config_is_valid_and_matches_serde_defaults() {
        let text = DEFAULT_CONFIG.replace("# node_id = \"pve-node-1\"", "node_id = \"pve-node-1\"");
        let c = parse(&text).expect("default config parses");
        let s = c.validate().expect("default config validates");
        assert_eq!(s.node_id, "pve-node-1");
        assert_eq!(s.mqtt.client_id, "edgeflow-agent-pve-node-1");
        assert_eq!((s.mqtt.host.as_str(), s.mqtt.port), ("127.0.0.1", 1883));
        assert_eq!(s.kafka.topic, "raw-data");
        assert_eq!(s.buffer.when_full, WhenFull::Block);
        assert_eq!(s.buffer.max_bytes, 1 << 30);
        assert_eq!(s.buffer.high_water_interval, Some(StdDuration::from_secs(60)));
        // The file documents the defaults: a config with only the required keys is the same.
        let minimal = parse("node_id = \"pve-node-1\"\n[kafka]\nbrokers = \"127.0.0.1:9092\"").expect("parses");
        assert_eq!(format!("{:?}", minimal.validate().expect("valid")), format!("{s:?}"));
    }

    #[test]
    fn a_zero_high_water_interval_writes_markers_only_at_a_clean_stop() {
        let text = "node_id = \"n\"\n[kafka]\nbrokers = \"k:9092\"\n[buffer]\nhigh_water_interval = \"0\"\n";
        let s = parse(text).expect("parses").validate().expect("valid");
        assert_eq!(s.buffer.high_water_interval, None);
    }

    #[test]
    fn errors_name_the_field() {
        let base = "node_id = \"n\"\n[kafka]\nbrokers = \"k:9092\"\n";
        let cases = [
            (format!("{base}[mqtt]\nurl = \"http://x\""), "mqtt.url"),
            (format!("{base}[mqtt]\nurl = \"mqtt://\""), "mqtt.url"),
            (format!("{base}[mqtt]\ntopics = [\"a/#/b\"]"), "mqtt.topics"),
            (format!("{base}[mqtt]\nreceive_maximum = 70000"), "mqtt.receive_maximum"),
            (format!("{base}[buffer]\nmax_bytes = \"10KiB\""), "buffer.max_bytes"),
            (format!("{base}[buffer]\ndedup_horizon = 10"), "buffer.dedup_horizon"),
            (format!("{base}[buffer]\nhigh_water_interval = \"500ms\""), "buffer.high_water_interval"),
            (format!("{base}[buffer]\nhigh_water_interval = \"2d\""), "buffer.high_water_interval"),
            (format!("{base}[metrics]\nlisten = \"nowhere\""), "metrics.listen"),
            (
                format!("{base}[kafka.properties]\n\"enable.idempotence\" = \"false\""),
                "kafka.properties.enable.idempotence",
            ),
            (format!("{base}[kafka.properties]\nacks = \"1\""), "kafka.properties.acks"),
            (format!("{base}[kafka.properties]\npartitioner = \"random\""), "kafka.properties.partitioner"),
            ("node_id = \"bad id\"\n[kafka]\nbrokers = \"k:9092\"".to_owned(), "node_id"),
            ("node_id = \"n\"\n[kafka]\nbrokers = \"nope\"".to_owned(), "kafka.brokers"),
            (format!("{base}[mqtt]\npassword_file = \"/nonexistent/pw\"\nusername = \"u\""), "mqtt.password_file"),
            (format!("{base}[mqtt]\nurl = \"mqtts://h\"\nca_file = \"/nonexistent/ca.pem\""), "mqtt.ca_file"),
            (format!("{base}[mqtt]\nca_file = \"/etc/hosts\""), "mqtt.ca_file"),
        ];
        for (text, field) in cases {
            assert_eq!(invalid(&text).field, field, "{text}");
        }
    }

    /// Every librdkafka property the gapless, ordered, idempotent producer rests on is refused
    /// with a value that would void it, naming the key and why.
    #[test]
    fn properties_that_void_the_delivery_guarantee_are_refused() {
        let base = "node_id = \"n\"\n[kafka]\nbrokers = \"k:9092\"\n[kafka.properties]\n";
        let cases = [
            ("message.timeout.ms", "30000"),
            ("delivery.timeout.ms", "300000"),
            ("Message.Timeout.MS", "1"),
            ("max.in.flight.requests.per.connection", "6"),
            ("max.in.flight", "100"),
            ("retries", "3"),
            ("message.send.max.retries", "0"),
            ("queuing.strategy", "lifo"),
            ("transactional.id", "agent-1"),
            ("enable.idempotence", "false"),
            ("enable.gapless.guarantee", "false"),
            ("acks", "1"),
            ("request.required.acks", "0"),
            ("partitioner", "random"),
            ("message.max.bytes", "100000"),
        ];
        for (key, value) in cases {
            let err = invalid(&format!("{base}\"{key}\" = \"{value}\""));
            assert_eq!(err.field, format!("kafka.properties.{key}"), "{key} = {value}");
            assert!(!err.problem.is_empty(), "{key}: a reason");
        }
        // Values that keep the guarantee are accepted.
        for (key, value) in [
            ("message.timeout.ms", "0"),
            ("delivery.timeout.ms", "0"),
            ("max.in.flight.requests.per.connection", "1"),
            ("max.in.flight", "5"),
            ("acks", "-1"),
            ("partitioner", "consistent_random"),
            ("linger.ms", "20"),
            ("message.max.bytes", "263168"),
        ] {
            let text = format!("{base}\"{key}\" = \"{value}\"");
            parse(&text).expect("parses").validate().unwrap_or_else(|e| panic!("{key} = {value}: {e}"));
        }
        // A secret file cannot smuggle one in either.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("t"), "5000").expect("write");
        let text = format!(
            "node_id = \"n\"\n[kafka]\nbrokers = \"k:9092\"\n[kafka.property_files]\n\"message.timeout.ms\" = \"{}\"",
            dir.path().join("t").display()
        );
        assert_eq!(invalid(&text).field, "kafka.property_files.message.timeout.ms");
    }

    /// Under MQTT 3.1.1 the broker, not `receive_maximum`, sets the in-flight window; the only
    /// bound the agent can rely on is the 65,535 packet ids of one connection.
    #[test]
    fn the_dedup_horizon_covers_the_in_flight_window_of_the_protocol() {
        let v311 = "node_id = \"n\"\n[mqtt]\nprotocol = \"3.1.1\"\n[kafka]\nbrokers = \"k:9092\"\n";
        let err = invalid(&format!("{v311}[buffer]\ndedup_horizon = 32768"));
        assert_eq!(err.field, "buffer.dedup_horizon");
        assert!(err.problem.contains("65535") && err.problem.contains("3.1.1"), "{}", err.problem);
        // receive_maximum does not apply to 3.1.1: a small one does not shrink the floor.
        let small_window = v311.replace("[mqtt]\n", "[mqtt]\nreceive_maximum = 16\n");
        let err = invalid(&format!("{small_window}[buffer]\ndedup_horizon = 8192"));
        assert_eq!(err.field, "buffer.dedup_horizon");
        // Unset, the horizon is sized for the protocol.
        let s = parse(v311).expect("parses").validate().expect("valid");
        assert_eq!(s.buffer.dedup_horizon, 65_535);
        let s = parse(&format!("{v311}[buffer]\ndedup_horizon = 100000")).expect("parses").validate().expect("valid");
        assert_eq!(s.buffer.dedup_horizon, 100_000);
        // MQTT 5: the window is our Receive Maximum.
        let v5 = "node_id = \"n\"\n[kafka]\nbrokers = \"k:9092\"\n";
        let s = parse(v5).expect("parses").validate().expect("valid");
        assert_eq!(s.buffer.dedup_horizon, 32_768);
        let s = parse(&format!("{v5}[mqtt]\nreceive_maximum = 65535")).expect("parses").validate().expect("valid");
        assert_eq!(s.buffer.dedup_horizon, 65_535);
        let err = invalid(&format!("{v5}[mqtt]\nreceive_maximum = 20000\n[buffer]\ndedup_horizon = 16384"));
        assert_eq!(err.field, "buffer.dedup_horizon");
    }

    /// The agent takes whatever packet its broker can send, so an oversized payload reaches it
    /// and becomes a dead letter instead of being dropped at the broker or dropping the session.
    #[test]
    fn max_packet_size_defaults_to_what_mqtt_can_carry() {
        let base = "node_id = \"n\"\n[kafka]\nbrokers = \"k:9092\"\n";
        let s = parse(base).expect("parses").validate().expect("valid");
        assert_eq!(u64::from(s.mqtt.max_packet_size), MQTT_MAX_PACKET_BYTES);
        let s = parse(&format!("{base}[mqtt]\nmax_packet_size = \"4MiB\"")).expect("parses").validate().expect("valid");
        assert_eq!(s.mqtt.max_packet_size, 4 << 20);
        for bad in ["\"8KiB\"", "268435456"] {
            let err = invalid(&format!("{base}[mqtt]\nmax_packet_size = {bad}"));
            assert_eq!(err.field, "mqtt.max_packet_size", "{bad}");
            assert!(err.problem.contains("message_size_limit"), "{}", err.problem);
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_parse_errors() {
        let err = parse("node_id = \"n\"\n[kafka]\nbrokers = \"k:9092\"\nbrokerz = 1").expect_err("unknown key");
        assert!(err.contains("brokerz"), "{err}");
        let err = parse("[kafka]\nbrokers = \"k:9092\"\n[buffer]\nwhen_full = \"explode\"").expect_err("bad enum");
        assert!(err.contains("explode"), "{err}");
        let err = parse("[kafka]\nbrokers = \"k:9092\"\n[buffer]\nmax_bytes = \"many\"").expect_err("bad size");
        assert!(err.contains("many"), "{err}");
        let err = parse("node_id = \"n\"").expect_err("kafka is required");
        assert!(err.contains("kafka"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("pw"), "mqtt-hunter2\n").expect("write");
        std::fs::write(dir.path().join("kpw"), "kafka-hunter2").expect("write");
        let text = format!(
            "node_id = \"n\"\n[mqtt]\nusername = \"u\"\npassword_file = \"{}\"\n[kafka]\nbrokers = \"k:9092\"\n\
             [kafka.properties]\n\"sasl.password\" = \"inline-hunter2\"\n\"sasl.username\" = \"alice\"\n\
             [kafka.property_files]\n\"ssl.key.password\" = \"{}\"\n",
            dir.path().join("pw").display(),
            dir.path().join("kpw").display()
        );
        let s = parse(&text).expect("parses").validate().expect("valid");
        assert_eq!(s.mqtt.password.as_ref().map(Secret::expose), Some("mqtt-hunter2"));
        let shown = format!("{s:?} {:?}", parse(&text).expect("parses"));
        for secret in ["mqtt-hunter2", "kafka-hunter2", "inline-hunter2"] {
            // The raw Config shows file paths, never file contents; Settings masks values.
            assert!(!format!("{s:?}").contains(secret), "{secret} leaked");
        }
        assert!(shown.contains("alice"));
    }
}
