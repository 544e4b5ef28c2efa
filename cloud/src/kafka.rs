//! Kafka plumbing shared by both stages: client configuration, the consumer context (rebalance
//! events, statistics, broker health), control-record production and offset commits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::KafkaSettings;
use crate::control::{self, ControlKind};
use crate::metrics::{Metrics, Stage, StageLabels};

/// Errors of the Kafka plumbing.
#[derive(Debug, thiserror::Error)]
pub enum KafkaSetupError {
    /// A client could not be created (bad property, unknown key).
    #[error("cannot create the Kafka {what}: {source}")]
    Client { what: &'static str, source: KafkaError },
    /// Topic metadata could not be read (broker unreachable at start-up).
    #[error("cannot read metadata of topic `{topic}`: {source}")]
    Metadata { topic: String, source: KafkaError },
    /// A topic does not exist.
    #[error("topic `{0}` does not exist; create it first (see docs/aggregator.md)")]
    MissingTopic(String),
    /// processed-data has fewer partitions than raw-data.
    #[error(
        "topic `{processed}` has {processed_partitions} partitions but `{raw}` has {raw_partitions}: \
         process writes raw partition p to processed partition p, so it needs at least as many"
    )]
    TooFewPartitions { raw: String, raw_partitions: usize, processed: String, processed_partitions: usize },
    /// Subscribing failed.
    #[error("cannot subscribe to {topics:?}: {source}")]
    Subscribe { topics: Vec<String>, source: KafkaError },
}

/// The base client configuration: brokers plus the operator's pass-through properties.
pub fn base_config(settings: &KafkaSettings) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers);
    c.set_log_level(RDKafkaLogLevel::Warning);
    for (key, value) in &settings.properties {
        c.set(key, value.expose());
    }
    c
}

/// Consumer configuration for `group`: manual commits only, never an offset stored behind our
/// back, start from the beginning when the group has no offset yet.
pub fn consumer_config(settings: &KafkaSettings, group: &str) -> ClientConfig {
    let mut c = base_config(settings);
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("statistics.interval.ms", "5000");
    for (k, v) in [("session.timeout.ms", "10000"), ("heartbeat.interval.ms", "1000"), ("fetch.wait.max.ms", "100")] {
        if !settings.properties.iter().any(|(key, _)| key == k) {
            c.set(k, v);
        }
    }
    c
}

/// Producer configuration: idempotent, `acks=all`, retries without a deadline (a delivery
/// fails only on a fatal error, never because Kafka was away for a while), lz4 batches.
pub fn producer_config(settings: &KafkaSettings) -> ClientConfig {
    let mut c = base_config(settings);
    c.set("enable.idempotence", "true").set("acks", "all").set("message.timeout.ms", "0");
    for (k, v) in [("compression.type", "lz4"), ("linger.ms", "5"), ("statistics.interval.ms", "0")] {
        if !settings.properties.iter().any(|(key, _)| key == k) {
            c.set(k, v);
        }
    }
    c
}

/// A rebalance event, handed from the consumer's callback to the stage loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Assignment {
    Assigned(Vec<(String, i32)>),
    Revoked(Vec<(String, i32)>),
}

/// Shared view of the Kafka connection, for readiness.
#[derive(Debug, Default)]
pub struct KafkaHealth {
    /// Set from statistics: some broker is up.
    pub up: AtomicBool,
    /// Unix milliseconds of the last statistics report.
    pub last_stats_ms: AtomicI64,
}

/// The consumer context of a stage.
pub struct StageContext {
    stage: Stage,
    events: Mutex<Vec<Assignment>>,
    metrics: Metrics,
    health: Arc<KafkaHealth>,
}

impl std::fmt::Debug for StageContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StageContext").field("stage", &self.stage).finish_non_exhaustive()
    }
}

impl StageContext {
    pub fn new(stage: Stage, metrics: Metrics, health: Arc<KafkaHealth>) -> Self {
        Self { stage, events: Mutex::new(Vec::new()), metrics, health }
    }

    /// Takes the rebalance events since the last call.
    pub fn take_events(&self) -> Vec<Assignment> {
        std::mem::take(&mut *self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
    }
}

fn list(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements().iter().map(|e| (e.topic().to_owned(), e.partition())).collect()
}

impl ClientContext for StageContext {
    fn stats(&self, statistics: Statistics) {
        let up = statistics.brokers.values().any(|b| b.state == "UP");
        self.health.up.store(up, Ordering::Relaxed);
        self.health.last_stats_ms.store(now_ms(), Ordering::Relaxed);
        let lag: i64 = statistics
            .topics
            .values()
            .flat_map(|t| t.partitions.values())
            .filter(|p| p.partition >= 0 && p.fetch_state == "active" && p.consumer_lag >= 0)
            .map(|p| p.consumer_lag)
            .sum();
        self.metrics.lag.get_or_create_owned(&StageLabels { stage: self.stage }).set(lag);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(stage = ?self.stage, %error, reason, "Kafka client error");
    }
}

impl ConsumerContext for StageContext {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        // A revocation must reach the stage before the next assignment; both are queued in order.
        if let Rebalance::Revoke(tpl) = rebalance {
            self.events.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(Assignment::Revoked(list(tpl)));
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.events
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .push(Assignment::Assigned(list(tpl)));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(error) => tracing::warn!(stage = ?self.stage, %error, "rebalance failed"),
        }
    }

    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(error) = result {
            tracing::debug!(stage = ?self.stage, %error, offsets = ?list(offsets), "offset commit failed");
        }
    }
}

/// A stage's consumer.
pub type StageConsumer = StreamConsumer<StageContext>;

/// Creates a consumer in `group`, subscribed to `topics`.
pub fn subscribe(
    settings: &KafkaSettings,
    group: &str,
    topics: &[&str],
    context: StageContext,
) -> Result<Arc<StageConsumer>, KafkaSetupError> {
    let consumer: StageConsumer = consumer_config(settings, group)
        .create_with_context(context)
        .map_err(|source| KafkaSetupError::Client { what: "consumer", source })?;
    consumer.subscribe(topics).map_err(|source| KafkaSetupError::Subscribe {
        topics: topics.iter().map(|t| (*t).to_owned()).collect(),
        source,
    })?;
    Ok(Arc::new(consumer))
}

/// The number of partitions of `topic`.
pub fn partition_count(
    consumer: &impl Consumer<StageContext>,
    topic: &str,
    timeout: Duration,
) -> Result<usize, KafkaSetupError> {
    let md = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| KafkaSetupError::Metadata { topic: topic.to_owned(), source })?;
    let t = md
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .ok_or_else(|| KafkaSetupError::MissingTopic(topic.to_owned()))?;
    if t.error().is_some() || t.partitions().is_empty() {
        return Err(KafkaSetupError::MissingTopic(topic.to_owned()));
    }
    Ok(t.partitions().len())
}

/// A message's control kind, from its header, before any parsing. `Some(None)` is a control
/// record of a kind this version does not know (skipped).
pub fn control_kind(message: &BorrowedMessage<'_>) -> Option<Option<ControlKind>> {
    let headers = message.headers()?;
    headers.iter().find(|h| h.key == control::HEADER).map(|h| h.value.and_then(ControlKind::from_header))
}

/// The producer of control records (ticks and checkpoints).
#[derive(Clone)]
pub struct ControlProducer {
    producer: FutureProducer,
}

impl std::fmt::Debug for ControlProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlProducer")
    }
}

impl ControlProducer {
    pub fn new(settings: &KafkaSettings) -> Result<Self, KafkaSetupError> {
        let mut config = producer_config(settings);
        // Checkpoints can be large; never hold them back for batching.
        config.set("linger.ms", "0");
        let producer =
            config.create().map_err(|source| KafkaSetupError::Client { what: "control producer", source })?;
        Ok(Self { producer })
    }

    /// Appends a control record to `topic`/`partition` and returns its offset once Kafka
    /// acknowledged it.
    pub async fn append(
        &self,
        topic: &str,
        partition: i32,
        kind: ControlKind,
        value: &[u8],
    ) -> Result<i64, KafkaError> {
        let headers = OwnedHeaders::new().insert(Header { key: control::HEADER, value: Some(kind.as_str()) });
        let record = FutureRecord::<(), [u8]>::to(topic).partition(partition).payload(value).headers(headers);
        match self.producer.send(record, Duration::from_secs(30)).await {
            Ok(delivery) => Ok(delivery.offset),
            Err((error, _)) => Err(error),
        }
    }
}

/// Commits `offset` for `topic`/`partition` (synchronously, off the async threads).
pub async fn commit(consumer: &Arc<StageConsumer>, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    let consumer = consumer.clone();
    tokio::task::spawn_blocking(move || consumer.commit(&tpl, CommitMode::Sync))
        .await
        .map_err(|_| KafkaError::Canceled)?
}

/// Seeks an assigned partition, waiting until no message from the old position can be
/// delivered any more (librdkafka purges what it prefetched).
pub fn seek(consumer: &StageConsumer, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
    consumer.seek(topic, partition, Offset::Offset(offset), Duration::from_secs(10))
}

/// Pauses or resumes consumption of `partitions`.
pub fn set_paused(consumer: &StageConsumer, partitions: &[(String, i32)], paused: bool) -> Result<(), KafkaError> {
    if partitions.is_empty() {
        return Ok(());
    }
    let mut tpl = TopicPartitionList::new();
    for (topic, p) in partitions {
        tpl.add_partition(topic, *p);
    }
    if paused { consumer.pause(&tpl) } else { consumer.resume(&tpl) }
}

/// The message's broker timestamp in milliseconds, if any.
pub fn timestamp_ms(message: &BorrowedMessage<'_>) -> Option<i64> {
    message.timestamp().to_millis()
}

/// Wall clock, milliseconds since the epoch. Used only for ticks and metrics, never for a
/// windowing or sealing decision.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// Per-partition bookkeeping key.
pub type PartitionKey = (String, i32);

/// Groups partitions by topic, for logging.
pub fn describe(partitions: &[(String, i32)]) -> String {
    let mut by_topic: HashMap<&str, Vec<i32>> = HashMap::new();
    for (t, p) in partitions {
        by_topic.entry(t).or_default().push(*p);
    }
    let mut parts: Vec<String> = by_topic
        .into_iter()
        .map(|(t, mut ps)| {
            ps.sort_unstable();
            format!("{t}{ps:?}")
        })
        .collect();
    parts.sort();
    parts.join(" ")
}

/// Leaves the group and destroys the consumer, waiting at most 10 seconds.
///
/// With tansu 0.6, librdkafka's destroy can hang after the group was left (a broker thread
/// never joins; see `tests/tansu_capabilities.rs`). The group is left first, which is what
/// matters to the other members; the rest runs on its own thread and is abandoned if it hangs
/// (the process is about to exit, or the test moves on).
pub async fn close(consumer: Arc<StageConsumer>) {
    consumer.unsubscribe();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new().name("consumer-close".into()).spawn(move || {
        drop(consumer);
        let _ = tx.send(());
    });
    if spawned.is_ok() && tokio::time::timeout(Duration::from_secs(10), rx).await.is_err() {
        tracing::warn!("the Kafka consumer did not close within 10s; abandoning it");
    }
}
