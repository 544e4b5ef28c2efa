//! Kafka for end-to-end runs: librdkafka's in-process mock cluster (starts instantly, for the
//! demo) or a real tansu broker behind a fault proxy (for the suite), both able to cut the
//! network and heal it; and a consumer that tails topics from the beginning.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use edgeflow_testkit::{FaultProxy, Tansu, TansuStorage, free_port};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Topics and partition counts every run creates.
pub const TOPICS: &[(&str, i32)] = &[("raw-data", 3), ("raw-data-dlq", 1), ("processed-data", 3)];

/// A Kafka cluster the run can cut off and heal.
#[allow(missing_debug_implementations)] // MockCluster is not Debug
pub enum Backend {
    /// librdkafka's mock cluster, in this process.
    Mock(MockCluster<'static, DefaultProducerContext>, i32),
    /// tansu, reached through a fault proxy.
    Tansu(Tansu, FaultProxy),
}

impl Backend {
    /// An in-process mock cluster of `brokers` brokers with the topics created.
    pub fn mock(brokers: i32) -> Result<Self> {
        let cluster = MockCluster::new(brokers).context("starting librdkafka's mock cluster")?;
        for (topic, partitions) in TOPICS {
            cluster.create_topic(topic, *partitions, 1).with_context(|| format!("creating {topic}"))?;
        }
        Ok(Backend::Mock(cluster, brokers))
    }

    /// A real tansu broker behind a fault proxy, with the topics created.
    pub async fn tansu(storage: TansuStorage) -> Result<Self> {
        let listen = free_port();
        let proxy = FaultProxy::start(0, listen)?;
        let tansu = Tansu::start_advertising(storage, listen, proxy.port)?;
        edgeflow_testkit::kafka::create_topics(&tansu.bootstrap(), TOPICS).await?;
        Ok(Backend::Tansu(tansu, proxy))
    }

    pub fn bootstrap(&self) -> String {
        match self {
            Backend::Mock(c, _) => c.bootstrap_servers(),
            Backend::Tansu(t, _) => t.bootstrap(),
        }
    }

    /// Cuts every client off the cluster.
    pub fn cut(&self) -> Result<()> {
        match self {
            Backend::Mock(c, n) => {
                for id in 1..=*n {
                    c.broker_down(id)?;
                }
            }
            Backend::Tansu(_, p) => p.cut(),
        }
        Ok(())
    }

    /// Lets clients reach the cluster again.
    pub fn heal(&self) -> Result<()> {
        match self {
            Backend::Mock(c, n) => {
                for id in 1..=*n {
                    c.broker_up(id)?;
                }
            }
            Backend::Tansu(_, p) => p.heal(),
        }
        Ok(())
    }
}

/// Everything read from one topic so far: values by partition and offset.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub messages: Vec<(i32, i64, Vec<u8>)>,
}

/// Tails topics from the beginning on its own thread (counting is by consuming, not by
/// watermarks: tansu's high watermark can trail what it stores), skipping the aggregator's
/// control records.
#[derive(Debug, Clone)]
pub struct Tail {
    seen: Arc<Mutex<HashMap<String, Seen>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl Tail {
    pub fn start(bootstrap: &str, topics: &[&str]) -> Result<Self> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "edgeflow-e2e-tail")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "1000")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for topic in topics {
            let parts = TOPICS.iter().find(|(t, _)| t == topic).map(|(_, p)| *p).unwrap_or(1);
            for p in 0..parts {
                tpl.add_partition_offset(topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let tail = Tail { seen: Arc::default(), stop: Arc::default() };
        let (seen, stop) = (tail.seen.clone(), tail.stop.clone());
        std::thread::Builder::new().name("e2e-tail".into()).spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    // The aggregator's control records (ticks, markers) are not data.
                    let control =
                        m.headers().is_some_and(|h| h.iter().any(|h| h.key == edgeflow_aggregator::control::HEADER));
                    if control {
                        continue;
                    }
                    let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    seen.entry(m.topic().to_owned()).or_default().messages.push((
                        m.partition(),
                        m.offset(),
                        m.payload().unwrap_or_default().to_vec(),
                    ));
                }
            }
        })?;
        Ok(tail)
    }

    /// How many messages of `topic` were read.
    pub fn count(&self, topic: &str) -> usize {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(topic).map_or(0, |s| s.messages.len())
    }

    /// A copy of what was read from `topic`.
    pub fn snapshot(&self, topic: &str) -> Seen {
        self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner).get(topic).cloned().unwrap_or_default()
    }
}

impl Drop for Tail {
    fn drop(&mut self) {
        // Only the last clone stops the thread.
        if Arc::strong_count(&self.stop) == 1 {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Lets two hours pass for the dead letters: appends a tick two hours ahead to every partition
/// of `raw-data-dlq`, as the aggregator's own idle ticks would once the hour had passed.
///
/// Dead letters are filed under the hour the agent received them — the current hour, which
/// a test or a demo cannot wait out (readings are placed in past hours with the simulator's
/// clock offset instead). Call once every agent has forwarded everything, so no dead letter of
/// the current hour arrives after the tick (it would be filed as late, correctly, but its late
/// file would wait for the next hour boundary).
///
/// The tick carries a broker timestamp two hours ahead as well: a tick never moves a clock past
/// its own timestamp (a forged tick cannot fast-forward a partition), so the passage of time is
/// faked on both. With `LogAppendTime` on the topic, as in production, this would not work.
pub async fn let_dead_letter_hours_pass(bootstrap: &str) -> Result<()> {
    use edgeflow_aggregator::control::{ControlKind, HEADER, Tick};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    let later = chrono::Utc::now().timestamp_millis() + 2 * 3_600_000;
    let tick = Tick { time_ms: later }.to_json();
    let partitions = TOPICS.iter().find(|(t, _)| *t == "raw-data-dlq").map_or(1, |(_, p)| *p);
    for partition in 0..partitions {
        let headers = OwnedHeaders::new().insert(Header { key: HEADER, value: Some(ControlKind::Tick.as_str()) });
        producer
            .send(
                FutureRecord::<(), _>::to("raw-data-dlq")
                    .partition(partition)
                    .payload(&tick)
                    .timestamp(later)
                    .headers(headers),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)?;
    }
    Ok(())
}
