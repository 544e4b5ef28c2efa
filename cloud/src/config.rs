//! Configuration: the TOML file ([`Config`]), validated into [`Settings`].
//!
//! `default.toml` (printed by `edgeflow-aggregator default-config`) documents every key and its
//! default; a test checks that it parses and validates to [`Config::default`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::PathBuf;

use edgeflow_runtime::config::{ByteSize, Duration, Invalid, Secret};
use serde::Deserialize;
use url::Url;

/// The commented default configuration.
pub const DEFAULT_TOML: &str = include_str!("../default.toml");

/// The configuration file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The edge Kafka cluster.
    #[serde(default)]
    pub kafka: KafkaConfig,
    /// Stage `process`: raw-data → processed-data.
    #[serde(default)]
    pub process: ProcessConfig,
    /// Stage `sink`: processed-data → Parquet → S3.
    #[serde(default)]
    pub sink: SinkConfig,
    /// Where the Parquet files go.
    #[serde(default)]
    pub s3: S3Config,
    /// The status endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[kafka]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated `host:port`.
    pub brokers: String,
    /// Base name of the consumer groups (`<group_id>-process`, `<group_id>-sink`).
    pub group_id: String,
    /// Input of `process`.
    pub raw_topic: String,
    /// Output of `process`, input of `sink`.
    pub processed_topic: String,
    /// The agents' dead-letter topic, archived by `sink`.
    pub dlq_topic: String,
    /// librdkafka properties for every client; keys containing `password` or `secret` are
    /// secrets.
    pub properties: BTreeMap<String, Secret>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "localhost:9092".into(),
            group_id: "edgeflow-aggregator".into(),
            raw_topic: edgeflow_contract::topics::RAW.into(),
            processed_topic: edgeflow_contract::topics::PROCESSED.into(),
            dlq_topic: edgeflow_contract::topics::DEAD_LETTER.into(),
            properties: BTreeMap::new(),
        }
    }
}

/// `[process]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProcessConfig {
    /// Readings above this temperature are rejected.
    pub temperature_max: f64,
    /// How far the watermark trails the largest event time.
    pub allowed_lateness: Duration,
    /// How often a partition that made progress is checkpointed.
    pub checkpoint_interval: Duration,
    /// Idle time after which a partition with open windows gets a tick.
    pub idle_timeout: Duration,
    /// How far an event time may lie ahead of its Kafka timestamp. A reading further ahead is a
    /// dead letter (`timestamp_out_of_range`); an agent's dead letter further ahead counts as
    /// this far ahead (ticks: never past their timestamp). Bounds every partition's clock (both
    /// stages) against the broker's, so one far-future time cannot close every window and seal
    /// every hour early.
    pub max_future_skew: Duration,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            temperature_max: 100.0,
            allowed_lateness: Duration::from_secs(30),
            checkpoint_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_future_skew: Duration::from_secs(15 * 60),
        }
    }
}

/// `[sink]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Local directory for files being written.
    pub spool_dir: PathBuf,
    /// Spool size at which consumption pauses.
    pub spool_max_bytes: ByteSize,
    /// An hour seals once the clock passes its end plus this.
    pub seal_grace: Duration,
    /// Idle time after which a partition with open buckets gets a tick.
    pub idle_timeout: Duration,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// Files above this size are uploaded in parts.
    pub multipart_threshold: ByteSize,
    /// How often a partition whose state changed is checkpointed.
    pub checkpoint_interval: Duration,
    /// Seal groups uploaded at the same time.
    pub upload_concurrency: usize,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            spool_dir: PathBuf::from("/var/lib/edgeflow-aggregator/spool"),
            spool_max_bytes: ByteSize::gib(4),
            seal_grace: Duration::from_secs(300),
            idle_timeout: Duration::from_secs(300),
            row_group_rows: 65_536,
            multipart_threshold: ByteSize::mib(64),
            checkpoint_interval: Duration::from_secs(10),
            upload_concurrency: 4,
        }
    }
}

/// `[s3]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Bucket name.
    pub bucket: String,
    /// Key prefix, no leading or trailing slash.
    pub prefix: String,
    /// Names this deployment (a site or cluster) in every object key and in the
    /// `edgeflow-writer` metadata of every object. Required: two deployments sharing a bucket
    /// prefix must never write the same key.
    pub deployment_id: Option<String>,
    /// Signing region.
    pub region: String,
    /// The interface endpoint (or a local S3 server); unset for the regional endpoint.
    pub endpoint_url: Option<String>,
    /// Path-style addressing.
    pub force_path_style: bool,
    /// SSE-KMS key for every object.
    pub sse_kms_key_id: Option<String>,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            bucket: "edgeflow-telemetry".into(),
            prefix: "telemetry".into(),
            deployment_id: None,
            region: "eu-west-1".into(),
            endpoint_url: None,
            force_path_style: false,
            sse_kms_key_id: None,
        }
    }
}

/// `[metrics]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Address of the status endpoint.
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { listen: "0.0.0.0:9464".into() }
    }
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub kafka: KafkaSettings,
    pub process: ProcessSettings,
    pub sink: SinkSettings,
    pub s3: S3Settings,
    pub metrics_listen: SocketAddr,
}

/// Validated `[kafka]`.
#[derive(Debug, Clone)]
pub struct KafkaSettings {
    pub brokers: String,
    pub group_id: String,
    pub raw_topic: String,
    pub processed_topic: String,
    pub dlq_topic: String,
    /// Pass-through properties; [`Secret`] hides every value from `Debug`.
    pub properties: Vec<(String, Secret)>,
}

impl KafkaSettings {
    /// The consumer group of `process`.
    pub fn process_group(&self) -> String {
        format!("{}-process", self.group_id)
    }

    /// The consumer group of `sink`.
    pub fn sink_group(&self) -> String {
        format!("{}-sink", self.group_id)
    }

    /// Whether a property key names a secret.
    pub fn is_secret_key(key: &str) -> bool {
        let k = key.to_ascii_lowercase();
        k.contains("password") || k.contains("secret")
    }
}

/// Validated `[process]`.
#[derive(Debug, Clone, Copy)]
pub struct ProcessSettings {
    pub temperature_max: f64,
    pub allowed_lateness: std::time::Duration,
    pub checkpoint_interval: std::time::Duration,
    pub idle_timeout: std::time::Duration,
    pub max_future_skew: std::time::Duration,
}

/// Validated `[sink]`.
#[derive(Debug, Clone)]
pub struct SinkSettings {
    pub spool_dir: PathBuf,
    pub spool_max_bytes: u64,
    pub seal_grace: std::time::Duration,
    pub idle_timeout: std::time::Duration,
    pub row_group_rows: NonZeroUsize,
    pub multipart_threshold: u64,
    pub checkpoint_interval: std::time::Duration,
    pub upload_concurrency: NonZeroUsize,
}

/// Validated `[s3]`.
#[derive(Debug, Clone)]
pub struct S3Settings {
    pub bucket: String,
    /// Empty, or ends without a slash.
    pub prefix: String,
    /// 1..=63 of `a-z 0-9 -`: a directory right under the prefix, and the writer recorded in
    /// every object's metadata.
    pub deployment_id: String,
    pub region: String,
    pub endpoint_url: Option<Url>,
    pub force_path_style: bool,
    pub sse_kms_key_id: Option<String>,
    /// Explicit credentials instead of the default AWS chain. Never read from the configuration
    /// file (production uses the chain: IRSA on EKS); set by embedders and in-process tests,
    /// which cannot change the process environment safely.
    pub credentials: Option<StaticCredentials>,
}

/// An access key pair.
#[derive(Debug, Clone)]
pub struct StaticCredentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
}

/// S3's smallest part size (every part but the last).
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;

impl Config {
    /// Parses TOML text (unknown keys are errors).
    pub fn parse(text: &str) -> Result<Self, String> {
        edgeflow_runtime::config::parse(text)
    }

    /// Checks every value and builds the [`Settings`].
    pub fn validate(&self) -> Result<Settings, Invalid> {
        let k = &self.kafka;
        non_empty("kafka.brokers", &k.brokers)?;
        non_empty("kafka.group_id", &k.group_id)?;
        for (field, topic) in [
            ("kafka.raw_topic", &k.raw_topic),
            ("kafka.processed_topic", &k.processed_topic),
            ("kafka.dlq_topic", &k.dlq_topic),
        ] {
            non_empty(field, topic)?;
            if topic.len() > 249 || !topic.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')) {
                return Err(Invalid::new(field, "a Kafka topic name is 1..=249 characters of [a-zA-Z0-9._-]"));
            }
        }
        if k.raw_topic == k.processed_topic || k.raw_topic == k.dlq_topic || k.processed_topic == k.dlq_topic {
            return Err(Invalid::new(
                "kafka.processed_topic",
                "raw, processed and dead-letter topics must be three different topics",
            ));
        }
        let reserved =
            ["bootstrap.servers", "group.id", "enable.auto.commit", "enable.auto.offset.store", "enable.idempotence"];
        for key in k.properties.keys() {
            if reserved.contains(&key.as_str()) {
                return Err(Invalid::new(format!("kafka.properties.{key}"), "is set by the aggregator itself"));
            }
        }

        let p = &self.process;
        if !p.temperature_max.is_finite() {
            return Err(Invalid::new("process.temperature_max", "must be a finite number"));
        }
        if p.allowed_lateness.get() > std::time::Duration::from_secs(24 * 3600) {
            return Err(Invalid::new("process.allowed_lateness", "must be at most 24h (windows stay open that long)"));
        }
        positive("process.checkpoint_interval", p.checkpoint_interval)?;
        positive("process.idle_timeout", p.idle_timeout)?;
        positive("process.max_future_skew", p.max_future_skew)?;

        let s = &self.sink;
        if s.spool_dir.as_os_str().is_empty() {
            return Err(Invalid::new("sink.spool_dir", "must not be empty"));
        }
        positive("sink.idle_timeout", s.idle_timeout)?;
        if s.seal_grace.get() <= p.allowed_lateness.get() {
            return Err(Invalid::new(
                "sink.seal_grace",
                format!(
                    "must be longer than process.allowed_lateness ({}): a minute closes {} after its end, and its aggregate should reach its hour's file before the hour seals",
                    p.allowed_lateness, p.allowed_lateness
                ),
            ));
        }
        positive("sink.checkpoint_interval", s.checkpoint_interval)?;
        let row_group_rows = NonZeroUsize::new(s.row_group_rows)
            .filter(|n| n.get() <= 10_000_000)
            .ok_or_else(|| Invalid::new("sink.row_group_rows", "must be between 1 and 10000000"))?;
        if s.multipart_threshold.bytes() < MIN_PART_BYTES {
            return Err(Invalid::new("sink.multipart_threshold", "must be at least 5MiB (the smallest S3 part)"));
        }
        if s.spool_max_bytes.bytes() < 16 * 1024 * 1024 {
            return Err(Invalid::new("sink.spool_max_bytes", "must be at least 16MiB"));
        }
        let upload_concurrency = NonZeroUsize::new(s.upload_concurrency)
            .filter(|n| n.get() <= 64)
            .ok_or_else(|| Invalid::new("sink.upload_concurrency", "must be between 1 and 64"))?;

        let s3 = &self.s3;
        validate_bucket(&s3.bucket)?;
        if s3.prefix.starts_with('/') || s3.prefix.ends_with('/') {
            return Err(Invalid::new("s3.prefix", "must not start or end with '/'"));
        }
        let deployment_id = validate_deployment_id(s3.deployment_id.as_deref())?;
        non_empty("s3.region", &s3.region)?;
        let endpoint_url = match &s3.endpoint_url {
            None => None,
            Some(text) => {
                let url = Url::parse(text)
                    .map_err(|e| Invalid::new("s3.endpoint_url", format!("`{text}` is not a URL: {e}")))?;
                if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                    return Err(Invalid::new("s3.endpoint_url", "must be an http:// or https:// URL with a host"));
                }
                Some(url)
            }
        };
        if s3.sse_kms_key_id.as_deref().is_some_and(str::is_empty) {
            return Err(Invalid::new(
                "s3.sse_kms_key_id",
                "must not be empty (leave it unset for the bucket's default)",
            ));
        }

        let metrics_listen = self.metrics.listen.parse::<SocketAddr>().map_err(|e| {
            Invalid::new(
                "metrics.listen",
                format!("`{}` is not an address like 0.0.0.0:9464: {e}", self.metrics.listen),
            )
        })?;

        Ok(Settings {
            kafka: KafkaSettings {
                brokers: k.brokers.clone(),
                group_id: k.group_id.clone(),
                raw_topic: k.raw_topic.clone(),
                processed_topic: k.processed_topic.clone(),
                dlq_topic: k.dlq_topic.clone(),
                properties: k.properties.iter().map(|(key, v)| (key.clone(), v.clone())).collect(),
            },
            process: ProcessSettings {
                temperature_max: p.temperature_max,
                allowed_lateness: p.allowed_lateness.get(),
                checkpoint_interval: p.checkpoint_interval.get(),
                idle_timeout: p.idle_timeout.get(),
                max_future_skew: p.max_future_skew.get(),
            },
            sink: SinkSettings {
                spool_dir: s.spool_dir.clone(),
                spool_max_bytes: s.spool_max_bytes.bytes(),
                seal_grace: s.seal_grace.get(),
                idle_timeout: s.idle_timeout.get(),
                row_group_rows,
                multipart_threshold: s.multipart_threshold.bytes(),
                checkpoint_interval: s.checkpoint_interval.get(),
                upload_concurrency,
            },
            s3: S3Settings {
                bucket: s3.bucket.clone(),
                prefix: s3.prefix.clone(),
                deployment_id,
                region: s3.region.clone(),
                endpoint_url,
                force_path_style: s3.force_path_style,
                sse_kms_key_id: s3.sse_kms_key_id.clone(),
                credentials: None,
            },
            metrics_listen,
        })
    }
}

fn non_empty(field: &str, value: &str) -> Result<(), Invalid> {
    if value.trim().is_empty() { Err(Invalid::new(field, "must not be empty")) } else { Ok(()) }
}

fn positive(field: &str, value: Duration) -> Result<(), Invalid> {
    if value.get().is_zero() { Err(Invalid::new(field, "must be greater than zero")) } else { Ok(()) }
}

/// `[s3] deployment_id`: required, 1..=63 of `a-z 0-9 -` (a key directory and an S3 metadata
/// value, the same in every replica and across restarts).
fn validate_deployment_id(id: Option<&str>) -> Result<String, Invalid> {
    const FIELD: &str = "s3.deployment_id";
    const WHY: &str = "two sites or clusters sharing a bucket prefix must never write the same key";
    let Some(id) = id else {
        return Err(Invalid::new(
            FIELD,
            format!(
                "is required: it names this deployment in every object key ({WHY}); set one per site or cluster, the same in all its replicas"
            ),
        ));
    };
    let ok =
        (1..=63).contains(&id.len()) && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(id.to_owned())
    } else {
        Err(Invalid::new(
            FIELD,
            format!(
                "`{id}` is not a deployment id: 1-63 characters of a-z 0-9 - (it is a key directory under the prefix; {WHY})"
            ),
        ))
    }
}

/// S3 bucket naming rules (the general-purpose bucket subset that works everywhere).
fn validate_bucket(name: &str) -> Result<(), Invalid> {
    let ok = (3..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !name.contains("..");
    if ok {
        Ok(())
    } else {
        Err(Invalid::new("s3.bucket", format!("`{name}` is not a valid S3 bucket name (3-63 of a-z 0-9 . -)")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_toml_parses_and_equals_the_built_in_defaults() {
        let parsed = Config::parse(DEFAULT_TOML).expect("default.toml parses");
        let from_file = parsed.validate().expect("default.toml validates");
        // The deployment id has no built-in default; default.toml sets a placeholder.
        let mut built_in = Config::default();
        assert_eq!(built_in.validate().expect_err("no deployment id").field, "s3.deployment_id");
        built_in.s3.deployment_id = Some(from_file.s3.deployment_id.clone());
        let built_in = built_in.validate().expect("defaults validate");
        assert_eq!(format!("{from_file:?}"), format!("{built_in:?}"));
        assert_eq!(from_file.kafka.process_group(), "edgeflow-aggregator-process");
        assert_eq!(from_file.kafka.sink_group(), "edgeflow-aggregator-sink");
    }

    /// Parses `toml` and sets a deployment id when it has none.
    fn with_id(toml: &str) -> Config {
        let mut c = Config::parse(toml).expect("parses");
        c.s3.deployment_id.get_or_insert_with(|| "site-1".into());
        c
    }

    #[test]
    fn the_deployment_id_is_required_and_a_plain_name() {
        let err = Config::parse("").expect("parses").validate().expect_err("missing");
        assert_eq!(err.field, "s3.deployment_id");
        assert!(err.to_string().contains("must never write the same key"), "{err}");
        for bad in ["", "Site-1", "site_1", "a/b", "é", &"x".repeat(64)] {
            let err =
                Config::parse(&format!("[s3]\ndeployment_id = {bad:?}")).expect("parses").validate().expect_err(bad);
            assert_eq!(err.field, "s3.deployment_id", "{bad}");
        }
        for good in ["a", "eu-west-1-plant-7", &"x".repeat(63)] {
            let s = Config::parse(&format!("[s3]\ndeployment_id = {good:?}")).expect("parses").validate().expect(good);
            assert_eq!(s.s3.deployment_id, good);
        }
    }

    #[test]
    fn errors_name_the_field() {
        let check = |toml: &str, field: &str| {
            let err = with_id(toml).validate().expect_err(toml);
            assert_eq!(err.field, field, "{toml}: {err}");
        };
        check("[kafka]\nbrokers = \"\"", "kafka.brokers");
        check("[kafka]\nraw_topic = \"a b\"", "kafka.raw_topic");
        check("[kafka]\nprocessed_topic = \"raw-data\"", "kafka.processed_topic");
        check("[kafka.properties]\n\"group.id\" = \"x\"", "kafka.properties.group.id");
        check("[process]\ncheckpoint_interval = \"0s\"", "process.checkpoint_interval");
        check("[sink]\nrow_group_rows = 0", "sink.row_group_rows");
        check("[sink]\nseal_grace = \"30s\"", "sink.seal_grace");
        check("[sink]\nmultipart_threshold = \"1MiB\"", "sink.multipart_threshold");
        check("[s3]\nbucket = \"Bad_Bucket\"", "s3.bucket");
        check("[s3]\nprefix = \"/x\"", "s3.prefix");
        check("[s3]\nendpoint_url = \"ftp://x\"", "s3.endpoint_url");
        check("[metrics]\nlisten = \"nowhere\"", "metrics.listen");
        let err = Config::parse("[sink]\ncolour = 1").expect_err("unknown key");
        assert!(err.contains("colour"), "{err}");
    }

    #[test]
    fn secrets_never_show_in_debug() {
        let c = with_id("[kafka.properties]\n\"sasl.password\" = \"hunter2\"\n\"client.id\" = \"x\"");
        let s = c.validate().expect("valid");
        let shown = format!("{s:?} {c:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(KafkaSettings::is_secret_key("sasl.password") && !KafkaSettings::is_secret_key("client.id"));
    }

    #[test]
    fn endpoint_and_kms_are_kept() {
        let c = with_id(
            "[s3]\nendpoint_url = \"https://bucket.vpce-0abc-xyz.s3.eu-west-1.vpce.amazonaws.com\"\nforce_path_style = true\nsse_kms_key_id = \"alias/x\"",
        );
        let s = c.validate().expect("valid");
        assert_eq!(
            s.s3.endpoint_url.as_ref().map(Url::as_str),
            Some("https://bucket.vpce-0abc-xyz.s3.eu-west-1.vpce.amazonaws.com/")
        );
        assert!(s.s3.force_path_style);
        assert_eq!(s.s3.sse_kms_key_id.as_deref(), Some("alias/x"));
    }
}
