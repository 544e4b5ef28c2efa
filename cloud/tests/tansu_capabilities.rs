//! What the aggregator's exactly-once design needs from the Kafka-protocol broker, checked
//! against the real test broker (tansu): explicit-partition produce with headers, lz4 batches,
//! committed offsets read back by a new consumer, seek on an assigned partition, and a consumer
//! group that rebalances between two members.

use std::time::{Duration, Instant};

use edgeflow_testkit::{Tansu, TansuStorage, kafka};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};

fn producer(bootstrap: &str) -> anyhow::Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("compression.type", "lz4")
        .create()?)
}

fn consumer<C: ConsumerContext>(bootstrap: &str, group: &str, ctx: C) -> anyhow::Result<BaseConsumer<C>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "500")
        .create_with_context(ctx)?)
}

/// Polls until `n` messages arrived (or the deadline), returning (partition, offset, payload).
fn poll_n<C: ConsumerContext>(c: &BaseConsumer<C>, n: usize, timeout: Duration) -> Vec<(i32, i64, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    while out.len() < n && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
            out.push((m.partition(), m.offset(), m.payload().unwrap_or_default().to_vec()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn explicit_partitions_headers_lz4_commit_and_seek() -> anyhow::Result<()> {
    let tansu = Tansu::start(TansuStorage::Memory)?;
    let bootstrap = tansu.bootstrap();
    kafka::create_topics(&bootstrap, &[("t", 3)]).await?;
    let p = producer(&bootstrap)?;
    for i in 0..10 {
        let headers = OwnedHeaders::new().insert(Header { key: "edgeflow-control", value: Some("tick") });
        let payload = format!("v{i}");
        let delivery = p
            .send(
                FutureRecord::<(), _>::to("t").partition(2).payload(&payload).headers(headers),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        assert_eq!(delivery.partition, 2);
    }
    let got = kafka::consume_count(&bootstrap, "t", 10, Duration::from_secs(20), Duration::from_millis(300))?;
    assert_eq!(got.len(), 10);
    assert!(got.iter().all(|m| m.partition == 2 && m.headers == vec![("edgeflow-control".into(), b"tick".to_vec())]));
    let offsets: Vec<i64> = got.iter().map(|m| m.offset).collect();
    assert_eq!(offsets, (0..10).collect::<Vec<_>>(), "contiguous offsets from 0");

    // Commit offset 7 for partition 2; a new consumer of the group starts there.
    let c = consumer(&bootstrap, "g", rdkafka::consumer::DefaultConsumerContext)?;
    c.subscribe(&["t"])?;
    let first = poll_n(&c, 10, Duration::from_secs(20));
    assert_eq!(first.len(), 10);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("t", 2, Offset::Offset(7))?;
    c.commit(&tpl, CommitMode::Sync)?;
    let committed = c.committed(Duration::from_secs(10))?;
    assert_eq!(committed.find_partition("t", 2).map(|e| e.offset()), Some(Offset::Offset(7)));
    // With tansu 0.6, destroying a consumer after this sequence can hang in librdkafka's
    // broker-thread join (the group is left, then `rd_kafka_destroy` never returns). The
    // aggregator closes its consumers as `kafka::close` does: leave the group first, then
    // destroy off-thread. Without the explicit leave, the next member waits for this one's
    // session to expire and the rebalance, which on a loaded machine can outlast the wait.
    c.unsubscribe();
    std::thread::spawn(move || drop(c));

    let c = consumer(&bootstrap, "g", rdkafka::consumer::DefaultConsumerContext)?;
    c.subscribe(&["t"])?;
    let resumed = poll_n(&c, 1, Duration::from_secs(60));
    assert_eq!(resumed.first().map(|m| (m.0, m.1)), Some((2, 7)), "resumes at the committed offset");
    // Seek back to 3 on the assigned partition: the next message is offset 3, then 4.
    c.seek("t", 2, Offset::Offset(3), Duration::from_secs(10))?;
    let after_seek = poll_n(&c, 2, Duration::from_secs(20));
    assert_eq!(after_seek.iter().map(|m| m.1).collect::<Vec<_>>(), vec![3, 4]);
    Ok(())
}

/// Records rebalance events.
#[derive(Clone, Default)]
struct Events(std::sync::Arc<std::sync::Mutex<Vec<String>>>);

impl ClientContext for Events {}

impl ConsumerContext for Events {
    fn post_rebalance(&self, _c: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let text = match rebalance {
            Rebalance::Assign(tpl) => format!("assign {}", tpl.count()),
            Rebalance::Revoke(tpl) => format!("revoke {}", tpl.count()),
            Rebalance::Error(e) => format!("error {e}"),
        };
        self.0.lock().expect("events lock").push(text);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_member_triggers_a_rebalance() -> anyhow::Result<()> {
    let tansu = Tansu::start(TansuStorage::Memory)?;
    let bootstrap = tansu.bootstrap();
    kafka::create_topics(&bootstrap, &[("r", 4)]).await?;
    let p = producer(&bootstrap)?;
    for part in 0..4 {
        p.send(FutureRecord::<(), _>::to("r").partition(part).payload("x"), Duration::from_secs(10))
            .await
            .map_err(|(e, _)| e)?;
    }
    let a_events = Events::default();
    let a = consumer(&bootstrap, "rg", a_events.clone())?;
    a.subscribe(&["r"])?;
    let got = poll_n(&a, 4, Duration::from_secs(30));
    assert_eq!(got.len(), 4, "the only member gets all four partitions");
    assert_eq!(a.assignment()?.count(), 4);

    let b_events = Events::default();
    let b = consumer(&bootstrap, "rg", b_events.clone())?;
    b.subscribe(&["r"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let _ = a.poll(Duration::from_millis(50));
        let _ = b.poll(Duration::from_millis(50));
        let (na, nb) = (a.assignment()?.count(), b.assignment()?.count());
        if na > 0 && nb > 0 && na + nb == 4 {
            break;
        }
    }
    let (na, nb) = (a.assignment()?.count(), b.assignment()?.count());
    assert_eq!((na + nb, na > 0, nb > 0), (4, true, true), "partitions split: a={na} b={nb}");
    let a_log = a_events.0.lock().expect("events").clone();
    assert!(a_log.iter().any(|e| e.starts_with("revoke")), "{a_log:?}");
    Ok(())
}

/// tansu 0.6 in memory answers a fetch inside a record batch with the *next* batch; the
/// aggregator's [`Cursor`] seeks back until the expected record arrives.
#[tokio::test(flavor = "multi_thread")]
async fn a_fetch_inside_a_batch_is_realigned_by_the_cursor() -> anyhow::Result<()> {
    use edgeflow_aggregator::kafka::{Cursor, Positioned};
    let tansu = Tansu::start(TansuStorage::Memory)?;
    let bootstrap = tansu.bootstrap();
    kafka::create_topics(&bootstrap, &[("b", 1)]).await?;
    let p = producer(&bootstrap)?;
    // Twenty records enqueued before any is delivered: one or a few batches.
    let futures: Vec<_> = (0..20)
        .map(|i| {
            p.send_result(FutureRecord::<(), _>::to("b").partition(0).payload(&format!("v{i}"))).map_err(|(e, _)| e)
        })
        .collect::<Result<_, _>>()?;
    for f in futures {
        f.await?.map_err(|(e, _)| e)?;
    }
    let c = consumer(&bootstrap, "cursor", rdkafka::consumer::DefaultConsumerContext)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("b", 0, Offset::Offset(7))?;
    c.assign(&tpl)?;
    let mut cursor = Cursor::default();
    cursor.expect(7);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut taken = Vec::new();
    let mut seeks = 0;
    while taken.len() < 3 && Instant::now() < deadline {
        let Some(Ok(m)) = c.poll(Duration::from_millis(100)) else {
            // The batch holding offset 7 is the partition's last: tansu delivers nothing.
            if cursor.is_stalled(Duration::from_secs(1))
                && let Some(to) = cursor.stalled()
            {
                seeks += 1;
                c.seek("b", 0, Offset::Offset(to), Duration::from_secs(10))?;
            }
            continue;
        };
        match cursor.check(m.offset()) {
            Positioned::Take => taken.push(m.offset()),
            Positioned::Drop => {}
            Positioned::SeekBack(to) => {
                seeks += 1;
                c.seek("b", 0, Offset::Offset(to), Duration::from_secs(10))?;
            }
        }
    }
    assert_eq!(taken, vec![7, 8, 9], "after {seeks} seeks back");
    Ok(())
}

/// Mid-stream, the consumer's fetch position can land inside a batch without any seek of ours
/// (librdkafka retrying a fetch that timed out): tansu then skips the rest of that batch. The
/// cursor notices the jump in offsets and goes back for what was skipped.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_skipped_mid_stream_is_fetched_again() -> anyhow::Result<()> {
    use edgeflow_aggregator::kafka::{Cursor, Positioned};
    let tansu = Tansu::start(TansuStorage::Memory)?;
    let bootstrap = tansu.bootstrap();
    kafka::create_topics(&bootstrap, &[("m", 1)]).await?;
    let p = producer(&bootstrap)?;
    let send_batch = |from: usize| -> anyhow::Result<Vec<_>> {
        (from..from + 20)
            .map(|i| {
                p.send_result(FutureRecord::<(), _>::to("m").partition(0).payload(&format!("v{i}")))
                    .map_err(|(e, _)| anyhow::anyhow!("{e}"))
            })
            .collect()
    };
    for f in send_batch(0)? {
        f.await?.map_err(|(e, _)| e)?;
    }
    let c = consumer(&bootstrap, "mid-stream", rdkafka::consumer::DefaultConsumerContext)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("m", 0, Offset::Offset(0))?;
    c.assign(&tpl)?;
    let mut cursor = Cursor::default();
    let mut taken = Vec::new();
    let mut seeks = 0;
    let mut skipped = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while taken.len() < 40 && Instant::now() < deadline {
        let Some(Ok(m)) = c.poll(Duration::from_millis(100)) else { continue };
        match cursor.check(m.offset()) {
            Positioned::Take => taken.push(m.offset()),
            Positioned::Drop => {}
            Positioned::SeekBack(to) => {
                seeks += 1;
                c.seek("m", 0, Offset::Offset(to), Duration::from_secs(10))?;
            }
        }
        if taken.len() == 5 && !skipped {
            // What a retried fetch does: the position moves inside the batch behind the
            // cursor's back, and more records arrive after it.
            skipped = true;
            c.seek("m", 0, Offset::Offset(7), Duration::from_secs(10))?;
            for f in send_batch(20)? {
                f.await?.map_err(|(e, _)| e)?;
            }
        }
    }
    assert_eq!(taken, (0..40).collect::<Vec<i64>>(), "after {seeks} seeks back");
    assert!(seeks >= 1, "the skip was noticed");
    Ok(())
}
