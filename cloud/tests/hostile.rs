//! What a forged or broken producer of `raw-data` can do to the aggregator, against real tansu
//! and moto (issue 10): nothing it writes may lose, double or hide another record, stop the
//! stream behind it, or leave a stage running on state it could not read.

mod common;

use std::time::Duration;

use anyhow::{Context, Result, bail};
use arrow_array::cast::AsArray;
use common::*;
use edgeflow_aggregator::Stages;
use edgeflow_contract::RESEND_HEADER;
use edgeflow_testkit::kafka;
use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

/// Produces the readings that close hour 10's minutes (11:00:30) and seal it (11:02) on
/// partition 0 of `n0`, with `seq` and `seq + 1`.
async fn seal_hour_10(p: &rdkafka::producer::FutureProducer, seq: u64) -> Result<()> {
    produce_at(
        p,
        RAW,
        &[
            (0, "d0", raw("d0", at(60, 30), 22.0, 40.0, "OK", "n0", seq), at(60, 30)),
            (0, "d0", raw("d0", at(62, 0), 22.0, 40.0, "OK", "n0", seq + 1), at(62, 0)),
        ],
    )
    .await
}

/// Waits for hour 10's manifest of processed-data partition 0; every key then.
async fn hour_10_sealed(env: &Env) -> Result<Vec<String>> {
    let manifest = env.manifest_key(H10, PROCESSED, 0);
    env.wait_for_keys(Duration::from_secs(60), "hour 10 manifest", |k| k.contains(&manifest)).await
}

async fn verify(env: &Env) -> Result<edgeflow_aggregator::verify::Report> {
    let s3 = edgeflow_aggregator::s3::S3::new(&env.settings("v", &[])?.s3).await;
    Ok(edgeflow_aggregator::verify::verify(&s3, PREFIX).await?)
}

/// Class 1: a record with a `seq` beyond i64, or an invalid value claiming a huge `seq`, raised
/// n0's high-water in `process`, and every later record of n0 was dropped as a duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_forged_record_does_not_hide_the_nodes_later_records() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let agg = Running::start(env.settings("a", &[])?, Stages::Both);
    let p = producer(&env.bootstrap())?;
    let forged_loose = format!(
        r#"{{"device_id":"d0","timestamp":"{}","temperature":1,"status":"OK","node_id":"n0","seq":{}}}"#,
        rfc3339(at(0, 15)),
        1u64 << 62
    );
    produce_at(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(0, 10), 20.0, 40.0, "OK", "n0", 1), at(0, 10)),
            (0, "d0", raw("d0", at(0, 12), 20.0, 40.0, "OK", "n0", u64::MAX), at(0, 12)),
            (0, "d0", forged_loose.into_bytes(), at(0, 15)),
            (0, "d0", raw("d0", at(0, 20), 21.0, 40.0, "OK", "n0", 2), at(0, 20)),
            (0, "d0", raw("d0", at(0, 30), 22.0, 40.0, "OK", "n0", 3), at(0, 30)),
        ],
    )
    .await?;
    seal_hour_10(&p, 4).await?;
    let keys = hour_10_sealed(&env).await?;

    let f = env.parquet(&key_of(&keys, "filtered", "processed-data-0")).await?;
    assert_eq!(ints(&f, "Seq"), vec![1, 2, 3], "n0's records after the forged ones are all there");
    let d = env.parquet(&key_of(&keys, "deadletter", "processed-data-0")).await?;
    assert_eq!(strings(&d, "Reason"), vec![Some("seq_out_of_range".into()), Some("missing_field".into())]);
    let a = env.parquet(&key_of(&keys, "aggregated", "processed-data-0")).await?;
    assert_eq!(ints(&a, "Count"), vec![3, 3], "minute 10:00 of d0 and of all devices");
    let report = verify(&env).await?;
    assert!(report.ok, "{}", report.render());
    assert_eq!(report.totals.records, 3, "seq 1..=3 in hour 10 (the rest is in hour 11)");
    assert_eq!(report.unattributed_deadletters, 2, "forged provenance is not counted for n0");
    agg.stop().await
}

/// Classes 3 and 6: two humidities near f64::MAX overflowed a window's sum to infinity, the
/// checkpoint held `null` and did not parse back, and after a restart `process` carried on with
/// empty state: the open minute of d0 (three good readings) was lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_numbers_are_dead_letters_and_state_survives_a_restart() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let p = producer(&env.bootstrap())?;
    let huge = |seq: u64| {
        format!(
            r#"{{"device_id":"d0","timestamp":"{}","temperature":20,"humidity":1.7e308,"status":"OK","node_id":"n0","seq":{seq}}}"#,
            rfc3339(at(0, 20))
        )
        .into_bytes()
    };
    produce_at(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(0, 10), 20.0, 40.0, "OK", "n0", 1), at(0, 10)),
            (0, "d0", huge(2), at(0, 20)),
            (0, "d0", huge(3), at(0, 21)),
            (0, "d0", raw("d0", at(0, 30), 21.0, 41.0, "OK", "n0", 4), at(0, 30)),
            (0, "d0", raw("d0", at(0, 40), 22.0, 42.0, "OK", "n0", 5), at(0, 40)),
        ],
    )
    .await?;
    // The first run takes them in and checkpoints its open minute on the way out.
    let first = Running::start(env.settings("a", &[])?, Stages::Process);
    let bootstrap = env.bootstrap();
    tokio::task::spawn_blocking(move || {
        kafka::consume_until(&bootstrap, PROCESSED, Duration::from_secs(60), |m| m.len() >= 5)
    })
    .await??;
    first.stop().await?;

    // The second run resumes from that checkpoint; the minute closes with what it held.
    let agg = Running::start(env.settings("a", &[])?, Stages::Both);
    seal_hour_10(&p, 6).await?;
    let keys = hour_10_sealed(&env).await?;
    let a = env.parquet(&key_of(&keys, "aggregated", "processed-data-0")).await?;
    assert_eq!(strings(&a, "DeviceId"), vec![None, Some("d0".into())]);
    assert_eq!(ints(&a, "Count"), vec![3, 3], "the open minute survived the restart");
    assert_eq!(floats(&a, "HumiditySum"), vec![123.0, 123.0]);
    let d = env.parquet(&key_of(&keys, "deadletter", "processed-data-0")).await?;
    assert_eq!(strings(&d, "Reason"), vec![Some("number_out_of_range".into()); 2]);
    assert_eq!(ints(&d, "Seq"), vec![2, 3], "a well-formed record refused by a rule keeps its provenance");
    let report = verify(&env).await?;
    assert!(report.ok, "{}", report.render());
    assert_eq!(report.totals.records, 5);
    agg.stop().await
}

/// Class 4: a raw value near Kafka's message limit became a dead letter larger than the limit
/// (the value copied whole, base64), Kafka refused it and `process` stopped on it, again at
/// every restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_value_near_the_message_limit_is_dead_lettered_and_the_stream_flows() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let agg = Running::start(env.settings("a", &[])?, Stages::Both);
    let p = producer(&env.bootstrap())?;
    let big = vec![b'x'; 900_000];
    produce_at(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(0, 10), 20.0, 40.0, "OK", "n0", 1), at(0, 10)),
            (0, "d0", big, at(0, 11)),
            (0, "d0", raw("d0", at(0, 20), 21.0, 40.0, "OK", "n0", 2), at(0, 20)),
        ],
    )
    .await?;
    seal_hour_10(&p, 3).await?;
    let keys = hour_10_sealed(&env).await?;
    let f = env.parquet(&key_of(&keys, "filtered", "processed-data-0")).await?;
    assert_eq!(ints(&f, "Seq"), vec![1, 2]);
    let d = env.parquet(&key_of(&keys, "deadletter", "processed-data-0")).await?;
    assert_eq!(strings(&d, "Reason"), vec![Some("oversized".into())]);
    assert_eq!(ints(&d, "PayloadSize"), vec![900_000]);
    assert_eq!(bools(&d, "Truncated"), vec![true]);
    let payload = d.column_by_name("Payload").context("Payload")?;
    assert_eq!(payload.as_binary::<i32>().value(0).len(), 16 * 1024, "a prefix of the value is kept");
    agg.stop().await
}

/// Class 5: a reading (or a forged tick) a year ahead moved the partition's clock for good: every
/// open minute closed at once, and the readings after it became late corrections; the sink's
/// clock sealed hour 10 at once, so the rest of it went to late files.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn far_future_times_do_not_move_the_clocks() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let agg = Running::start(env.settings("a", &[])?, Stages::Both);
    let p = producer(&env.bootstrap())?;
    let year = 365 * 24 * HOUR;
    produce_at(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(0, 10), 20.0, 40.0, "OK", "n0", 1), at(0, 10)),
            (0, "d0", raw("d0", at(0, 12) + year, 20.0, 40.0, "OK", "n0", 2), at(0, 12)),
        ],
    )
    .await?;
    // A forged tick, as `process` writes them (control header), a year ahead.
    let tick = format!(r#"{{"time_ms":{}}}"#, at(0, 15) + year);
    p.send(
        FutureRecord::to(RAW)
            .partition(0)
            .payload(tick.as_bytes())
            .key("x")
            .timestamp(at(0, 15))
            .headers(OwnedHeaders::new().insert(Header { key: "edgeflow-control", value: Some("tick") })),
        Duration::from_secs(30),
    )
    .await
    .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    produce_at(&p, RAW, &[(0, "d0", raw("d0", at(0, 30), 21.0, 40.0, "OK", "n0", 3), at(0, 30))]).await?;
    seal_hour_10(&p, 4).await?;
    let keys = hour_10_sealed(&env).await?;
    let a = env.parquet(&key_of(&keys, "aggregated", "processed-data-0")).await?;
    assert_eq!(ints(&a, "Count"), vec![2, 2], "minute 10:00 holds seq 1 and 3");
    assert_eq!(bools(&a, "Late"), vec![false, false], "no reading became a late correction");
    let d = env.parquet(&key_of(&keys, "deadletter", "processed-data-0")).await?;
    assert_eq!(strings(&d, "Reason"), vec![Some("timestamp_out_of_range".into())]);
    assert_eq!(strings(&d, "NodeId"), vec![Some("n0".into())], "a refused valid record keeps its provenance");
    assert!(!keys.iter().any(|k| k.contains("/_manifest_20241226T10Z_processed-data-0_")), "no late bucket: {keys:#?}");
    let report = verify(&env).await?;
    assert!(report.ok, "{}", report.render());
    assert_eq!(report.totals.records, 3, "seq 2 is accounted for as a dead letter");
    agg.stop().await
}

/// Class 6: a committed offset pointing at a checkpoint that does not parse made the stage carry
/// on with empty state and commit past it. It must halt that partition instead: nothing
/// processed or committed, and the reason in `/readyz`, the metrics and the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_checkpoint_halts_its_partition_and_commits_nothing() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let p = producer(&env.bootstrap())?;
    produce_at(&p, RAW, &[(0, "d0", raw("d0", at(0, 10), 20.0, 40.0, "OK", "n0", 1), at(0, 10))]).await?;
    // A checkpoint whose state does not parse (the `null` an overflowed sum became).
    let bad = br#"{"resume_offset":0,"state":{"high":{},"max_event_ms":null,"windows":{"0":{"devices":{},"all":{"count":1,"temperature_sum":null}}}}}"#;
    let checkpoint_offset = p
        .send(
            FutureRecord::to(RAW)
                .partition(0)
                .payload(&bad[..])
                .key("x")
                .headers(OwnedHeaders::new().insert(Header { key: "edgeflow-control", value: Some("checkpoint") })),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?
        .offset;
    produce_at(&p, RAW, &[(0, "d0", raw("d0", at(0, 20), 21.0, 40.0, "OK", "n0", 2), at(0, 20))]).await?;
    let group = "agg-process";
    commit(&env.bootstrap(), group, RAW, 0, checkpoint_offset)?;

    let port = edgeflow_testkit::free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let agg = Running::start(env.settings("a", &[("metrics.listen", &listen)])?, Stages::Process);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = http_get(port, "/readyz").await.unwrap_or_default();
        if status == 503 && body.contains("halted") {
            break body;
        }
        if std::time::Instant::now() > deadline {
            bail!("the partition was not reported halted within 60s: {status} {body}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        body.contains(&format!("process raw-data/0: checkpoint at offset {checkpoint_offset} does not parse")),
        "{body}"
    );
    let (_, text) = http_get(port, "/metrics").await?;
    assert_eq!(metric(&text, "edgeflow_aggregator_halted_partitions{stage=\"process\"}"), Some(1.0), "{text}");
    // A checkpoint interval and more later, nothing was processed or committed.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, text) = http_get(port, "/metrics").await?;
    assert_eq!(metric(&text, "edgeflow_aggregator_records_filtered_total"), Some(0.0), "{text}");
    agg.stop().await?;
    let bootstrap = env.bootstrap();
    let processed = tokio::task::spawn_blocking(move || {
        kafka::consume_count(&bootstrap, PROCESSED, 0, Duration::from_secs(1), Duration::from_secs(2))
    })
    .await??;
    assert!(processed.is_empty(), "nothing was emitted: {} values", processed.len());
    assert_eq!(
        committed(&env.bootstrap(), group, RAW, 0)?,
        Some(checkpoint_offset),
        "the committed offset did not move"
    );
    Ok(())
}

/// Class 7: a node's records whose `seq`s fall below what an earlier buffer of the node took
/// (a restored copy of buffer.redb here; a clock behind or a second agent with the same
/// `node_id` alike) were dropped as duplicates of that buffer's, silently. With epochs, they
/// flow; a marked re-send is a duplicate, an unmarked reuse of a `seq` a loud regression, and
/// two agents writing as one node are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seqs_below_an_earlier_epoch_flow_and_a_regression_is_loud() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let port = edgeflow_testkit::free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let agg = Running::start(env.settings("a", &[("metrics.listen", &listen)])?, Stages::Both);
    let p = producer(&env.bootstrap())?;
    let mut records = Vec::new();
    // Run "a1" of n0 took 5..=12; the restored copy (run "b2") assigns 8..=10 again.
    for seq in 5..=12u64 {
        let t = at(0, seq as i64);
        records.push((0, "d0", raw_in("d0", t, 20.0, 40.0, "n0", "a1", seq), t));
    }
    for seq in 8..=10u64 {
        let t = at(1, seq as i64);
        records.push((0, "d0", raw_in("d0", t, 30.0, 40.0, "n0", "b2", seq), t));
    }
    // Two agents configured as n1 (runs "c3" and "d4"), interleaved.
    for (i, (epoch, seq)) in [("c3", 100u64), ("d4", 100), ("c3", 101), ("d4", 101)].into_iter().enumerate() {
        let t = at(2, i as i64);
        records.push((0, "d1", raw_in("d1", t, 25.0, 40.0, "n1", epoch, seq), t));
    }
    produce_at(&p, RAW, &records).await?;
    // A marked re-send of a1's 7, and an unmarked reuse of a1's 11 with other content.
    let resend = OwnedHeaders::new().insert(Header { key: RESEND_HEADER, value: Some("1") });
    for (value, headers) in [
        (raw_in("d0", at(0, 7), 20.0, 40.0, "n0", "a1", 7), Some(resend)),
        (raw_in("d0", at(2, 30), 99.0, 40.0, "n0", "a1", 11), None),
    ] {
        let mut r = FutureRecord::to(RAW).partition(0).key("d0").payload(&value).timestamp(at(2, 30));
        if let Some(h) = headers {
            r = r.headers(h);
        }
        p.send(r, Duration::from_secs(30)).await.map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    // Seal hour 10 with a node of its own, so n0's lineages stay as above.
    let seal =
        [(at(60, 30), 1), (at(62, 0), 2)].map(|(t, seq)| (0, "d9", raw_in("d9", t, 22.0, 40.0, "s", "e5", seq), t));
    produce_at(&p, RAW, &seal).await?;
    let keys = hour_10_sealed(&env).await?;

    let f = env.parquet(&key_of(&keys, "filtered", "processed-data-0")).await?;
    let mut n0: Vec<i64> = strings(&f, "NodeId")
        .into_iter()
        .zip(ints(&f, "Seq"))
        .filter(|(n, _)| n.as_deref() == Some("n0"))
        .map(|(_, s)| s)
        .collect();
    n0.sort_unstable();
    assert_eq!(n0, vec![5, 6, 7, 8, 8, 9, 9, 10, 10, 11, 12], "both runs of n0, each once");
    let rows: Vec<(Option<String>, Option<String>, i64)> = strings(&f, "NodeId")
        .into_iter()
        .zip(strings(&f, "Epoch"))
        .zip(ints(&f, "Seq"))
        .map(|((n, e), s)| (n, e, s))
        .filter(|(n, _, _)| n.as_deref() != Some("s"))
        .collect();
    let of = |node: &str, epoch: &str| -> Vec<i64> {
        rows.iter().filter(|(n, e, _)| n.as_deref() == Some(node) && e.as_deref() == Some(epoch)).map(|r| r.2).collect()
    };
    assert_eq!(of("n0", "a1"), (5..=12).collect::<Vec<_>>());
    assert_eq!(of("n0", "b2"), vec![8, 9, 10], "the restored buffer's records are all there");
    assert_eq!((of("n1", "c3"), of("n1", "d4")), (vec![100, 101], vec![100, 101]), "both writers of n1 kept");
    let d = env.parquet(&key_of(&keys, "deadletter", "processed-data-0")).await?;
    assert_eq!(strings(&d, "Reason"), vec![Some("seq_regression".into())]);
    assert_eq!((strings(&d, "NodeId"), strings(&d, "Epoch")), (vec![Some("n0".into())], vec![Some("a1".into())]));
    let (_, text) = http_get(port, "/metrics").await?;
    let get = |series: &str| metric(&text, series).unwrap_or(-1.0);
    assert_eq!(get("edgeflow_aggregator_deadletters_total{reason=\"seq_regression\"}"), 1.0, "{text}");
    assert_eq!(get("edgeflow_aggregator_duplicates_dropped_total{stage=\"process\"}"), 1.0, "{text}");
    assert_eq!(get("edgeflow_aggregator_node_writer_conflicts_total"), 2.0, "{text}");

    let report = verify(&env).await?;
    assert!(report.ok, "{}", report.render());
    let n0 = report.nodes.iter().find(|n| n.node_id == "n0").context("n0")?;
    assert_eq!((n0.records, n0.epochs, n0.lineages, n0.regressions), (11, 2, 2, 1));
    let n1 = report.nodes.iter().find(|n| n.node_id == "n1").context("n1")?;
    assert_eq!((n1.records, n1.lineages, n1.duplicate_count), (4, 2, 0));
    agg.stop().await
}

/// Every tenth value on raw-data is hostile, in every way above, across two partitions: every
/// valid record is in S3 exactly once, every hostile value is a dead letter with its reason,
/// the aggregates match the readings, and `verify` agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_traffic_at_ten_percent_changes_nothing_else() -> Result<()> {
    init_logging();
    let env = Env::start(2).await?;
    let agg = Running::start(env.settings("a", &[])?, Stages::Both);
    let p = producer(&env.bootstrap())?;
    let per_node = 270u64;
    let mut records: Vec<(i32, &str, Vec<u8>, i64)> = Vec::new();
    let mut expected_reasons: std::collections::BTreeMap<&str, usize> = Default::default();
    let mut forger_seq = 0u64;
    let mut rng = fastrand::Rng::with_seed(10);
    for i in 0..per_node {
        // 20 minutes of readings, two devices per partition, from nodes n0 and n1.
        let t = H10 + (i as i64 * 20 * MIN) / per_node as i64;
        for (part, node) in [(0, "n0"), (1, "n1")] {
            let device = if rng.bool() { format!("{node}-a") } else { format!("{node}-b") };
            let dev: &'static str = Box::leak(device.into_boxed_str());
            let temperature = 15.0 + rng.f64() * 10.0;
            records.push((part, dev, raw(dev, t, temperature, 50.0, "OK", node, i + 1), t));
            if i % 10 != 9 {
                continue;
            }
            let (value, reason): (Vec<u8>, &str) = match (i / 10 + part as u64) % 7 {
                0 => (raw(dev, t, 20.0, 50.0, "OK", node, u64::MAX - i), "seq_out_of_range"),
                1 => (
                    format!(
                        r#"{{"device_id":"{dev}","timestamp":"{}","node_id":"{node}","seq":{}}}"#,
                        rfc3339(t),
                        1u64 << 62
                    )
                    .into_bytes(),
                    "missing_field",
                ),
                2 => {
                    forger_seq += 1;
                    (raw(dev, t + 365 * 24 * HOUR, 20.0, 50.0, "OK", "forger", forger_seq), "timestamp_out_of_range")
                }
                3 => {
                    forger_seq += 1;
                    let v = format!(
                        r#"{{"device_id":"{dev}","timestamp":"{}","temperature":1,"humidity":-1.6e308,"status":"OK","node_id":"forger","seq":{forger_seq}}}"#,
                        rfc3339(t)
                    );
                    (v.into_bytes(), "number_out_of_range")
                }
                4 => (vec![b'{'; 20_000 + i as usize], "oversized"),
                5 => (b"\xff\xfe".to_vec(), "not_utf8"),
                _ => (b"{\"device_id\":".to_vec(), "bad_json"),
            };
            *expected_reasons.entry(reason).or_default() += 1;
            records.push((part, dev, value, t));
        }
    }
    produce_at(&p, RAW, &records).await?;
    // 11:00:30 closes every minute of hour 10 on both partitions; wait until both all-devices
    // partials of the last minute are in processed-data partition 0, so that they reach the hour's
    // main file rather than (correctly, but after this test looks) a late one.
    for (part, node) in [(0, "n0"), (1, "n1")] {
        let closer = raw(node, at(60, 30), 22.0, 40.0, "OK", node, per_node + 1);
        produce_at(&p, RAW, &[(part, node, closer, at(60, 30))]).await?;
    }
    let bootstrap = env.bootstrap();
    tokio::task::spawn_blocking(move || {
        kafka::consume_until(&bootstrap, PROCESSED, Duration::from_secs(60), |msgs| {
            let sources: std::collections::BTreeSet<i32> = msgs
                .iter()
                .filter(|m| m.partition == 0)
                .filter_map(|m| match edgeflow_aggregator::processed::Processed::parse(&m.value) {
                    Ok(edgeflow_aggregator::processed::Processed::Aggregate(a))
                        if a.device_id.is_none() && a.window_start_ms == H10 + 19 * MIN =>
                    {
                        Some(a.source.partition)
                    }
                    _ => None,
                })
                .collect();
            sources.len() == 2
        })
    })
    .await??;
    for (part, node) in [(0, "n0"), (1, "n1")] {
        let sealer = raw(node, at(62, 0), 22.0, 40.0, "OK", node, per_node + 2);
        produce_at(&p, RAW, &[(part, node, sealer, at(62, 0))]).await?;
    }
    let manifests = [env.manifest_key(H10, PROCESSED, 0), env.manifest_key(H10, PROCESSED, 1)];
    let keys = env
        .wait_for_keys(Duration::from_secs(90), "hour 10 manifests", |k| manifests.iter().all(|m| k.contains(m)))
        .await?;
    let mut reasons: std::collections::BTreeMap<String, usize> = Default::default();
    for part in ["processed-data-0", "processed-data-1"] {
        let f = env.parquet(&key_of(&keys, "filtered", part)).await?;
        let mut seqs = ints(&f, "Seq");
        seqs.sort_unstable();
        assert_eq!(seqs, (1..=per_node as i64).collect::<Vec<_>>(), "{part}: every valid record once");
        let d = env.parquet(&key_of(&keys, "deadletter", part)).await?;
        for r in strings(&d, "Reason").into_iter().flatten() {
            *reasons.entry(r).or_default() += 1;
        }
    }
    let want: std::collections::BTreeMap<String, usize> =
        expected_reasons.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect();
    assert_eq!(reasons, want, "every hostile value is a dead letter with its reason");
    let report = verify(&env).await?;
    assert!(report.ok, "{}", report.render());
    assert_eq!(report.totals.records, 2 * per_node + forger_seq);
    assert!(report.aggregates.windows_checked >= 40, "{}", report.render());
    agg.stop().await
}

fn group_consumer(bootstrap: &str, group: &str) -> Result<BaseConsumer> {
    Ok(rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?)
}

/// Commits `offset` for `group` on a partition, as a previous run of the stage would have.
fn commit(bootstrap: &str, group: &str, topic: &str, partition: i32, offset: i64) -> Result<()> {
    let c = group_consumer(bootstrap, group)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))?;
    c.commit(&tpl, CommitMode::Sync)?;
    Ok(())
}

/// The committed offset of `group` on a partition.
fn committed(bootstrap: &str, group: &str, topic: &str, partition: i32) -> Result<Option<i64>> {
    let c = group_consumer(bootstrap, group)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let got = c.committed_offsets(tpl, Duration::from_secs(10))?;
    Ok(got.find_partition(topic, partition).and_then(|e| e.offset().to_raw()).filter(|o| *o >= 0))
}
