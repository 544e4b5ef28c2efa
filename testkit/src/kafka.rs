//! Kafka helpers for tests, on the same rdkafka the product uses.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

/// One consumed message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consumed {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// Creates topics (name, partitions) with replication factor 1; existing topics are fine.
pub async fn create_topics(bootstrap: &str, topics: &[(&str, i32)]) -> Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create().context("admin client")?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|(name, parts)| NewTopic::new(name, *parts, TopicReplication::Fixed(1))).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match admin.create_topics(new.iter(), &opts).await {
            Ok(results) => {
                for r in results {
                    if let Err((name, code)) = r
                        && code != rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists
                    {
                        bail!("creating topic {name} failed: {code}");
                    }
                }
                return Ok(());
            }
            Err(e) if Instant::now() < deadline => {
                tracing::debug!(error = %e, "broker not ready for topic creation yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).context("creating topics"),
        }
    }
}

/// Reads every partition of `topic` from the beginning until `done(messages)` says so or
/// `timeout` passes (then it returns what it has). Counting is by consuming, not by watermarks
/// (tansu's high watermark can trail what it stores).
pub fn consume_until(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    mut done: impl FnMut(&[Consumed]) -> bool,
) -> Result<Vec<Consumed>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("testkit-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .context("test consumer")?;
    let metadata = consumer.fetch_metadata(Some(topic), Duration::from_secs(10))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map(|t| t.partitions().len())
        .context("topic missing from metadata")?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p as i32, rdkafka::Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while Instant::now() < deadline && !done(&out) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => out.push(Consumed {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                value: m.payload().unwrap_or_default().to_vec(),
                headers: m
                    .headers()
                    .map(|h| h.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect())
                    .unwrap_or_default(),
            }),
            Some(Err(e)) => tracing::debug!(error = %e, "test consumer error"),
            None => {}
        }
    }
    Ok(out)
}

/// Reads until `count` messages arrived (or `timeout`), then keeps reading for `settle` to catch
/// any extra (duplicate) message.
pub fn consume_count(
    bootstrap: &str,
    topic: &str,
    count: usize,
    timeout: Duration,
    settle: Duration,
) -> Result<Vec<Consumed>> {
    let mut reached: Option<Instant> = None;
    consume_until(bootstrap, topic, timeout + settle, |msgs| {
        if msgs.len() >= count && reached.is_none() {
            reached = Some(Instant::now());
        }
        reached.is_some_and(|t| t.elapsed() >= settle)
    })
}

/// Groups messages by key, keeping per-key order (partition order).
pub fn by_key(messages: &[Consumed]) -> HashMap<Vec<u8>, Vec<&Consumed>> {
    let mut map: HashMap<Vec<u8>, Vec<&Consumed>> = HashMap::new();
    for m in messages {
        map.entry(m.key.clone().unwrap_or_default()).or_default().push(m);
    }
    map
}
