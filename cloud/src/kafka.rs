//! Kafka plumbing shared by both stages: client configuration, the consumer context (rebalance
//! events, statistics, broker health), control-record production and offset commits.

use std::collections::{BTreeMap, HashMap};
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
    // The prefetch queue is bounded well below librdkafka's 64 MiB default: memory stays flat
    // whatever the backlog.
    for (k, v) in [
        ("session.timeout.ms", "10000"),
        ("heartbeat.interval.ms", "1000"),
        ("fetch.wait.max.ms", "100"),
        ("queued.max.messages.kbytes", "16384"),
    ] {
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
    // The producer queue is bounded (librdkafka's default is 1 GiB): when Kafka is slower than
    // the stage, the stage waits instead of buffering.
    for (k, v) in [
        ("compression.type", "lz4"),
        ("linger.ms", "5"),
        ("statistics.interval.ms", "0"),
        ("queue.buffering.max.kbytes", "32768"),
        ("queue.buffering.max.messages", "100000"),
    ] {
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
    /// Partitions halted on an unreadable checkpoint: `"<stage> <topic>/<partition>"` → why.
    pub halted: Mutex<BTreeMap<String, String>>,
}

impl KafkaHealth {
    /// What is halted, for `/readyz`; `None` when nothing is.
    pub fn halted(&self) -> Option<String> {
        let halted = self.halted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if halted.is_empty() {
            return None;
        }
        Some(halted.iter().map(|(what, why)| format!("{what}: {why}")).collect::<Vec<_>>().join("; "))
    }
}

fn halted_key(stage: Stage, topic: &str, partition: i32) -> String {
    format!("{stage:?} {topic}/{partition}")
}

/// Halts a partition whose committed offset points at a checkpoint that does not parse.
///
/// State that cannot be read is not empty state: carrying on without it would emit wrong
/// windows (and lose the open ones), and the next checkpoint would commit past inputs whose
/// effects were lost. So the stage reads nothing more of the partition (paused; anything
/// already fetched is ignored by the caller), commits nothing for it, says why in the log (an
/// ERROR: an operator must act), in `/readyz` and in `edgeflow_aggregator_halted_partitions`,
/// and keeps its other partitions going. A revocation or a restart reads the checkpoint again.
pub fn halt(
    consumer: &StageConsumer,
    health: &KafkaHealth,
    metrics: &Metrics,
    stage: Stage,
    (topic, partition): (&str, i32),
    offset: i64,
    error: &dyn std::fmt::Display,
) {
    tracing::error!(
        ?stage,
        topic,
        partition,
        offset,
        %error,
        "the committed checkpoint does not parse: partition halted, nothing past it is processed or committed; see the runbook EdgeflowPartitionHalted"
    );
    if let Err(error) = set_paused(consumer, &[(topic.to_owned(), partition)], true) {
        tracing::warn!(topic, partition, %error, "pausing a halted partition failed (its records are ignored)");
    }
    let why = format!("checkpoint at offset {offset} does not parse");
    let mut halted = health.halted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if halted.insert(halted_key(stage, topic, partition), why).is_none() {
        metrics.halted.get_or_create_owned(&StageLabels { stage }).inc();
    }
}

/// Forgets a halted partition (revoked: its next owner reads the checkpoint again).
pub fn unhalt(health: &KafkaHealth, metrics: &Metrics, stage: Stage, topic: &str, partition: i32) {
    let mut halted = health.halted.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if halted.remove(&halted_key(stage, topic, partition)).is_some() {
        metrics.halted.get_or_create_owned(&StageLabels { stage }).dec();
    }
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
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        // librdkafka's own errors are transient connection trouble it retries; WARN at most.
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", stage = ?self.stage, facility = fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", stage = ?self.stage, facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", stage = ?self.stage, facility = fac, "{message}")
            }
        }
    }

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
        // Checkpoints can be large (they grow with devices per partition) and compress well;
        // the broker's limit applies to the compressed batch. Never hold them back for batching.
        config.set("linger.ms", "0");
        if !settings.properties.iter().any(|(k, _)| k == "message.max.bytes") {
            config.set("message.max.bytes", "16777216");
        }
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

/// Whether the message carries header `name` (with any value).
pub fn has_header(message: &BorrowedMessage<'_>, name: &str) -> bool {
    message.headers().is_some_and(|headers| headers.iter().any(|h| h.key == name))
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

/// Where a partition's next record must come from.
///
/// Kafka answers a fetch at offset `o` with the record batch *containing* `o`, and the client
/// drops the records before `o`. tansu 0.6 (in-memory storage) answers with the first batch that
/// *starts* at or after `o`, silently skipping the rest of the batch holding `o` — which after
/// a seek to a checkpoint's resume offset would lose records. A cursor notices the first record
/// arriving beyond the expected offset and asks to seek further back (1, 4, 16, … records
/// before it) until a batch holding the expected offset is delivered; records before it are
/// dropped. If the skipped batch was the partition's last, nothing arrives at all; the stage
/// then calls [`Cursor::stalled`] after a quiet while. The expected offset always exists (it is a
/// committed checkpoint, or a resume offset below it), so stepping back is always right.
/// On a broker that behaves, the first record is the expected one and nothing happens.
///
/// Mid-stream the cursor also checks that offsets follow one another: a jump is treated like a
/// skipped expected offset (seek back for the first missing one; if it does not exist, as with
/// compaction or transaction markers, the records after it are taken after one seek), and a
/// record at or before the last one taken is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cursor {
    expected: Option<i64>,
    back: i64,
    seen_below: bool,
    tried_start: bool,
    /// When the cursor last made progress (set, dropped a record, stepped back).
    since: Option<std::time::Instant>,
    /// The offset of the last record taken since the last [`Cursor::expect`].
    last: Option<i64>,
}

/// What to do with a delivered record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Positioned {
    /// Process it.
    Take,
    /// Before the expected offset: drop it.
    Drop,
    /// The broker skipped the expected offset: seek back to this offset (and drop the record).
    SeekBack(i64),
}

impl Cursor {
    /// Expects the next record at `offset`.
    pub fn expect(&mut self, offset: i64) {
        *self = Self {
            expected: Some(offset),
            back: 1,
            seen_below: false,
            tried_start: false,
            since: Some(std::time::Instant::now()),
            last: None,
        };
    }

    /// Whether a record is awaited and nothing useful arrived for `quiet`.
    pub fn is_stalled(&self, quiet: Duration) -> bool {
        self.expected.is_some() && self.since.is_some_and(|t| t.elapsed() >= quiet)
    }

    /// Judges a delivered record.
    pub fn check(&mut self, offset: i64) -> Positioned {
        let Some(expected) = self.expected else {
            // Mid-stream, offsets follow one another. tansu 0.6 can also skip the rest of a batch
            // when a fetch is retried (seen after a request timed out under load): a jump means
            // the records in between were not delivered, so go back for them. A record at or
            // before the last one taken was delivered twice: drop it.
            return match self.last {
                Some(last) if offset <= last => Positioned::Drop,
                Some(last) if offset > last + 1 => {
                    self.expect(last + 1);
                    self.check(offset)
                }
                _ => {
                    self.last = Some(offset);
                    Positioned::Take
                }
            };
        };
        if offset == expected {
            self.expected = None;
            self.last = Some(offset);
            return Positioned::Take;
        }
        self.since = Some(std::time::Instant::now());
        if offset < expected {
            self.seen_below = true;
            return Positioned::Drop;
        }
        // Beyond the expected offset. If records below it were seen, the offset simply does
        // not exist (compaction, transaction markers): take this one. If the seek already went
        // back to the start, nothing earlier can be fetched either.
        if self.seen_below || expected == 0 || self.tried_start {
            self.expected = None;
            self.last = Some(offset);
            return Positioned::Take;
        }
        Positioned::SeekBack(self.step_back(expected))
    }

    /// Nothing arrived for a while although the partition holds the expected offset (the
    /// skipped batch was the last one): where to seek back to, if anywhere.
    pub fn stalled(&mut self) -> Option<i64> {
        let expected = self.expected?;
        self.since = Some(std::time::Instant::now());
        if self.tried_start || expected == 0 {
            return None;
        }
        Some(self.step_back(expected))
    }

    fn step_back(&mut self, expected: i64) -> i64 {
        let target = expected.saturating_sub(self.back).max(0);
        self.tried_start = target == 0;
        self.back = self.back.saturating_mul(4);
        target
    }

    /// Whether a record is still awaited at a given offset.
    pub fn expected(&self) -> Option<i64> {
        self.expected
    }
}

/// The committed offsets of `partitions` (`None` where the group has none yet).
pub async fn committed(consumer: &Arc<StageConsumer>, partitions: &[(String, i32)]) -> HashMap<(String, i32), i64> {
    let mut tpl = TopicPartitionList::new();
    for (t, p) in partitions {
        tpl.add_partition(t, *p);
    }
    let consumer = consumer.clone();
    let result = tokio::task::spawn_blocking(move || consumer.committed_offsets(tpl, Duration::from_secs(10))).await;
    let mut out = HashMap::new();
    match result {
        Ok(Ok(tpl)) => {
            for e in tpl.elements() {
                if let Offset::Offset(o) = e.offset() {
                    out.insert((e.topic().to_owned(), e.partition()), o);
                }
            }
        }
        Ok(Err(error)) => tracing::warn!(%error, "reading committed offsets failed; trusting the broker's positions"),
        Err(error) => tracing::warn!(%error, "reading committed offsets failed; trusting the broker's positions"),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cursor_takes_the_expected_record_at_once_on_a_kafka_broker() {
        let mut c = Cursor::default();
        assert_eq!(c.check(7), Positioned::Take, "no expectation");
        c.expect(10);
        assert_eq!(c.check(10), Positioned::Take);
        assert_eq!(c.check(11), Positioned::Take);
    }

    #[test]
    fn a_cursor_seeks_back_until_the_batch_holding_the_offset_arrives() {
        let mut c = Cursor::default();
        c.expect(100);
        // Batches start at 90 and 120; the broker skipped to 120.
        assert_eq!(c.check(120), Positioned::SeekBack(99));
        assert_eq!(c.check(120), Positioned::SeekBack(96));
        assert_eq!(c.check(120), Positioned::SeekBack(84));
        for o in 90..100 {
            assert_eq!(c.check(o), Positioned::Drop);
        }
        assert_eq!(c.check(100), Positioned::Take);
        assert_eq!(c.check(101), Positioned::Take);
    }

    #[test]
    fn a_cursor_accepts_a_gap_and_gives_up_at_the_start() {
        let mut c = Cursor::default();
        c.expect(5);
        assert_eq!(c.check(3), Positioned::Drop);
        assert_eq!(c.check(8), Positioned::Take, "offset 5 does not exist");
        c.expect(2);
        assert_eq!(c.check(9), Positioned::SeekBack(1));
        assert_eq!(c.check(9), Positioned::SeekBack(0));
        assert_eq!(c.check(9), Positioned::Take, "nothing earlier exists");
    }

    #[test]
    fn a_cursor_notices_records_skipped_mid_stream_and_goes_back_for_them() {
        let mut c = Cursor::default();
        for o in 40..=50 {
            assert_eq!(c.check(o), Positioned::Take);
        }
        // The broker skipped 51..=59 (the rest of a batch): go back for 51.
        assert_eq!(c.check(60), Positioned::SeekBack(50));
        assert_eq!(c.expected(), Some(51));
        assert_eq!(c.check(50), Positioned::Drop);
        for o in 51..=61 {
            assert_eq!(c.check(o), Positioned::Take, "offset {o}");
        }
        // A record delivered again is dropped, not processed twice.
        assert_eq!(c.check(61), Positioned::Drop);
        assert_eq!(c.check(55), Positioned::Drop);
        assert_eq!(c.check(62), Positioned::Take);
    }

    #[test]
    fn a_cursor_takes_a_real_gap_after_one_look_back() {
        let mut c = Cursor::default();
        assert_eq!(c.check(10), Positioned::Take);
        // Offsets 11..=14 do not exist (compaction, transaction markers).
        assert_eq!(c.check(15), Positioned::SeekBack(10));
        assert_eq!(c.check(10), Positioned::Drop);
        assert_eq!(c.check(15), Positioned::Take);
        assert_eq!(c.check(16), Positioned::Take);
    }

    #[test]
    fn a_stalled_cursor_steps_back_too() {
        let mut c = Cursor::default();
        assert_eq!(c.stalled(), None);
        c.expect(7);
        assert_eq!(c.stalled(), Some(6));
        assert_eq!(c.stalled(), Some(3));
        assert_eq!(c.stalled(), Some(0));
        assert_eq!(c.stalled(), None);
        assert_eq!(c.check(0), Positioned::Drop);
        assert_eq!(c.check(7), Positioned::Take);
    }
}
