//! The whole aggregator (both stages, in-process `run`) against real tansu and moto: window
//! results and Parquet files checked value by value against hand-computed expectations.

mod common;

use std::time::Duration;

use anyhow::Result;
use arrow_array::Array;
use arrow_array::cast::AsArray;
use arrow_array::types::Int64Type;
use common::*;
use edgeflow_aggregator::Stages;
use edgeflow_aggregator::processed::Processed;
use edgeflow_testkit::kafka;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn windows_and_files_match_hand_computed_values() -> Result<()> {
    init_logging();
    let env = Env::start(3).await?;
    let p = producer(&env.bootstrap())?;
    produce(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(0, 5), 20.0, 40.0, "OK", "n0", 1)),
            (0, "d0", raw("d0", at(0, 30), 22.0, 42.0, "OK", "n0", 2)),
            // Out of order, same minute.
            (0, "d0", raw("d0", at(0, 20), 21.0, 41.0, "OK", "n0", 3)),
            // The agent resent seq 2 after a crash.
            (0, "d0", raw("d0", at(0, 30), 22.0, 42.0, "OK", "n0", 2)),
            (0, "d0", raw("d0", at(0, 40), 150.0, 40.0, "OK", "n0", 4)),
            (0, "d0", raw("d0", at(0, 45), 23.0, 40.0, "ERROR", "n0", 5)),
            // 10:01:10 - 5s lateness passes 10:01: minute 10:00 of partition 0 closes.
            (0, "d0", raw("d0", at(1, 10), 24.0, 44.0, "OK", "n0", 6)),
            // Late for the closed minute: a late correction.
            (0, "d0", raw("d0", at(0, 50), 25.0, 45.0, "OK", "n0", 7)),
            (1, "d1", raw("d1", at(0, 10), 30.0, 50.0, "OK", "n1", 1)),
            (1, "d1", raw("d1", at(0, 50), 32.0, 52.0, "OK", "n1", 2)),
            (2, "d2", raw("d2", at(0, 15), 40.0, 60.0, "OK", "n2", 1)),
            // 11:00:30 closes every minute of hour 10 without sealing the hour (grace 1m).
            (0, "d0", raw("d0", at(60, 30), 26.0, 46.0, "OK", "n0", 8)),
            (1, "d1", raw("d1", at(60, 30), 33.0, 53.0, "OK", "n1", 3)),
            (2, "d2", raw("d2", at(60, 30), 41.0, 61.0, "OK", "n2", 2)),
        ],
    )
    .await?;
    let agg = Running::start(env.settings("a", &[])?, Stages::Both);

    // Wait until all three partials of 10:00 are in processed-data partition 0, so that the
    // sink sees them before the hour seals (otherwise they would, correctly, go to a late file).
    let bootstrap = env.bootstrap();
    let processed = tokio::task::spawn_blocking(move || {
        kafka::consume_until(&bootstrap, PROCESSED, Duration::from_secs(60), |msgs| {
            let partials = msgs
                .iter()
                .filter(|m| m.partition == 0)
                .filter_map(|m| match Processed::parse(&m.value) {
                    Ok(Processed::Aggregate(a)) if a.device_id.is_none() && !a.late && a.window_start_ms == H10 => {
                        Some(a.source.partition)
                    }
                    _ => None,
                })
                .count();
            let late = msgs
                .iter()
                .filter(|m| matches!(Processed::parse(&m.value), Ok(Processed::Aggregate(a)) if a.late))
                .count();
            partials == 3 && late == 2
        })
    })
    .await??;
    // The late reading produced exactly one per-device and one all-devices correction.
    let late: Vec<(Option<String>, u64)> = processed
        .iter()
        .filter_map(|m| match Processed::parse(&m.value) {
            Ok(Processed::Aggregate(a)) if a.late => Some((a.device_id.map(|d| d.into_owned()), a.sums.count)),
            _ => None,
        })
        .collect();
    assert_eq!(late, vec![(Some("d0".into()), 1), (None, 1)]);

    // 11:02 on every partition seals hour 10 (11:00 + 1m grace).
    produce(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(62, 0), 27.0, 47.0, "OK", "n0", 9)),
            (1, "d1", raw("d1", at(62, 0), 34.0, 54.0, "OK", "n1", 4)),
            (2, "d2", raw("d2", at(62, 0), 42.0, 62.0, "OK", "n2", 3)),
        ],
    )
    .await?;
    let manifests: Vec<String> = (0..3).map(|p| env.manifest_key(H10, PROCESSED, p)).collect();
    let keys = env
        .wait_for_keys(Duration::from_secs(60), "hour 10 manifests", |k| manifests.iter().all(|m| k.contains(m)))
        .await?;

    // Partition 0: every minute of d0, and the all-devices rows merged from three partitions.
    let a0 = env.parquet(&key_of(&keys, "aggregated", "processed-data-0")).await?;
    assert_eq!(strings(&a0, "DeviceId"), vec![None, Some("d0".into()), None, Some("d0".into())]);
    assert_eq!(times(&a0, "Timestamp"), vec![H10, H10, H10 + MIN, H10 + MIN]);
    assert_eq!(ints(&a0, "Count"), vec![7, 4, 1, 1]);
    assert_eq!(floats(&a0, "TemperatureSum"), vec![190.0, 88.0, 24.0, 24.0]);
    assert_eq!(floats(&a0, "Temperature"), vec![190.0 / 7.0, 22.0, 24.0, 24.0]);
    assert_eq!(floats(&a0, "TemperatureMin"), vec![20.0, 20.0, 24.0, 24.0]);
    assert_eq!(floats(&a0, "TemperatureMax"), vec![40.0, 25.0, 24.0, 24.0]);
    assert_eq!(floats(&a0, "Humidity"), vec![330.0 / 7.0, 42.0, 44.0, 44.0]);
    assert_eq!(bools(&a0, "Late"), vec![true, true, false, false], "late corrections merged into their rows");

    let f0 = env.parquet(&key_of(&keys, "filtered", "processed-data-0")).await?;
    assert_eq!(ints(&f0, "Seq"), vec![1, 2, 3, 6, 7], "the resent seq 2 is stored once");
    assert_eq!(times(&f0, "Timestamp"), vec![at(0, 5), at(0, 30), at(0, 20), at(1, 10), at(0, 50)]);
    assert_eq!(floats(&f0, "Temperature"), vec![20.0, 22.0, 21.0, 24.0, 25.0]);
    assert_eq!(floats(&f0, "Humidity"), vec![40.0, 42.0, 41.0, 44.0, 45.0]);
    assert!(strings(&f0, "DeviceId").iter().all(|d| d.as_deref() == Some("d0")));
    assert!(strings(&f0, "Status").iter().all(|d| d.as_deref() == Some("OK")));
    assert!(strings(&f0, "NodeId").iter().all(|d| d.as_deref() == Some("n0")));

    let r0 = env.parquet(&key_of(&keys, "rejected", "processed-data-0")).await?;
    assert_eq!(ints(&r0, "Seq"), vec![4, 5]);
    assert_eq!(strings(&r0, "Reason"), vec![Some("temperature_above_max".into()), Some("status_not_ok".into())]);
    assert_eq!(strings(&r0, "Status"), vec![Some("OK".into()), Some("ERROR".into())]);

    let a1 = env.parquet(&key_of(&keys, "aggregated", "processed-data-1")).await?;
    assert_eq!(strings(&a1, "DeviceId"), vec![Some("d1".into())]);
    assert_eq!(
        (ints(&a1, "Count"), floats(&a1, "TemperatureSum"), bools(&a1, "Late")),
        (vec![2], vec![62.0], vec![false])
    );
    let a2 = env.parquet(&key_of(&keys, "aggregated", "processed-data-2")).await?;
    assert_eq!((ints(&a2, "Count"), floats(&a2, "TemperatureMax")), (vec![1], vec![40.0]));
    assert!(!keys.iter().any(|k| k.contains("20241226T11Z")), "hour 11 is not sealed yet");

    // The manifest lists the hour's files with their rows and offsets.
    let body = env.s3.get_object().bucket(BUCKET).key(&manifests[0]).send().await?.body.collect().await?.into_bytes();
    let manifest: serde_json::Value = serde_json::from_slice(&body)?;
    assert_eq!(manifest["hour"], "2024-12-26T10:00:00Z");
    assert_eq!(manifest["late"], false);
    let families: Vec<&str> =
        manifest["files"].as_array().expect("files").iter().filter_map(|f| f["family"].as_str()).collect();
    assert_eq!(families, vec!["aggregated", "filtered", "rejected"]);
    assert_eq!(manifest["files"][1]["rows"], 5);

    // The oracle agrees.
    let report = edgeflow_aggregator::verify::verify(
        &edgeflow_aggregator::s3::S3::new(&env.settings("v", &[])?.s3).await,
        PREFIX,
    )
    .await?;
    assert!(report.ok, "{}", report.render());
    assert_eq!(report.totals.records, 7 + 2 + 1);
    assert_eq!(report.aggregates.windows_checked, 6);

    agg.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_records_are_counted_and_kept_and_the_stream_goes_on() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let port = edgeflow_testkit::free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let agg = Running::start(env.settings("a", &[("metrics.listen", &listen)])?, Stages::Both);
    let p = producer(&env.bootstrap())?;
    let received = H10 + 20_000;
    // A broken or forged value that claims n0's seq 2: its claim is not provenance.
    let wrong_schema =
        br#"{"device_id":"d0","timestamp":"2024-12-26T10:00:21Z","humidity":1,"status":"OK","node_id":"n0","seq":2}"#
            .to_vec();
    produce_at(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(0, 10), 20.0, 40.0, "OK", "n0", 1), received),
            (0, "d0", b"}{ not json".to_vec(), received),
            (0, "d0", wrong_schema.clone(), received),
            // Sent again: kept again (what an invalid value claims is never used for dedup).
            (0, "d0", wrong_schema, received),
            (0, "d0", raw("d0", at(0, 30), 21.0, 40.0, "OK", "n0", 2), received),
        ],
    )
    .await?;
    produce_at(
        &p,
        DLQ,
        &[
            (0, "n0", dead_letter("n0", 3, "bad_json", &[0xff, 0x00, b'{'], received), received),
            (0, "n9", dead_letter("n9", 100, "buffer_created", b"", received), received),
            (0, "x", b"not an envelope".to_vec(), received),
        ],
    )
    .await?;
    // The stream goes on: 11:00:30 closes the minutes of hour 10, 11:02 seals it.
    produce_at(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(60, 30), 22.0, 40.0, "OK", "n0", 4), at(60, 30)),
            (0, "d0", raw("d0", at(62, 0), 22.0, 40.0, "OK", "n0", 6), at(62, 0)),
        ],
    )
    .await?;
    produce_at(&p, DLQ, &[(0, "n0", dead_letter("n0", 5, "bad_json", b"x", at(62, 0)), at(62, 0))]).await?;

    let manifests = [env.manifest_key(H10, PROCESSED, 0), env.manifest_key(H10, DLQ, 0)];
    let keys = env
        .wait_for_keys(Duration::from_secs(60), "hour 10 manifests", |k| manifests.iter().all(|m| k.contains(m)))
        .await?;

    let f = env.parquet(&key_of(&keys, "filtered", "processed-data-0")).await?;
    assert_eq!(ints(&f, "Seq"), vec![1, 2]);
    let d = env.parquet(&key_of(&keys, "deadletter", "processed-data-0")).await?;
    assert_eq!(
        strings(&d, "Reason"),
        vec![Some("bad_json".into()), Some("missing_field".into()), Some("missing_field".into())]
    );
    assert_eq!(strings(&d, "NodeId"), vec![None, None, None], "claimed provenance is not provenance");
    let seq = d.column_by_name("Seq").expect("Seq").as_primitive::<Int64Type>().clone();
    assert_eq!(seq.null_count(), 3);
    let detail = strings(&d, "Detail");
    assert!(
        detail[1].as_deref().is_some_and(|t| t.ends_with(r#"(claims node_id Some("n0"), seq Some(2))"#)),
        "{detail:?}"
    );
    assert_eq!(d.column_by_name("Payload").expect("Payload").as_binary::<i32>().value(0), b"}{ not json");
    assert_eq!(times(&d, "ReceivedAt"), vec![received, received, received]);
    assert_eq!(
        strings(&d, "Source"),
        vec![Some("raw-data/0@1".into()), Some("raw-data/0@2".into()), Some("raw-data/0@3".into())]
    );

    let q = env.parquet(&key_of(&keys, "deadletter", "raw-data-dlq-0")).await?;
    assert_eq!(
        strings(&q, "Reason"),
        vec![Some("bad_json".into()), Some("buffer_created".into()), Some("foreign_record".into())]
    );
    assert_eq!(strings(&q, "NodeId"), vec![Some("n0".into()), Some("n9".into()), None]);
    assert_eq!(q.column_by_name("Payload").expect("Payload").as_binary::<i32>().value(0), &[0xff, 0x00, b'{']);
    assert_eq!(strings(&q, "Source")[0].as_deref(), Some("devices/x/telemetry"));

    // Every seq of n0 in hour 10 is accounted for; the values without provenance are listed.
    let report = edgeflow_aggregator::verify::verify(
        &edgeflow_aggregator::s3::S3::new(&env.settings("v", &[])?.s3).await,
        PREFIX,
    )
    .await?;
    assert!(report.ok, "{}", report.render());
    assert_eq!(report.unattributed_deadletters, 4);
    let n0 = report.nodes.iter().find(|n| n.node_id == "n0").expect("n0");
    assert_eq!((n0.min_seq, n0.max_seq, n0.records, n0.deadletter), (1, 3, 3, 1));

    // Counted by reason, visible on /metrics; health and readiness answer.
    let (status, text) = http_get(port, "/metrics").await?;
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "edgeflow_aggregator_deadletters_total{reason=\"bad_json\"}"), Some(1.0), "{text}");
    assert_eq!(metric(&text, "edgeflow_aggregator_deadletters_total{reason=\"missing_field\"}"), Some(2.0));
    assert_eq!(metric(&text, "edgeflow_aggregator_duplicates_dropped_total{stage=\"process\"}"), Some(0.0));
    assert_eq!(metric(&text, "edgeflow_aggregator_foreign_records_total"), Some(1.0));
    assert_eq!(metric(&text, "edgeflow_aggregator_records_filtered_total"), Some(4.0));
    assert!(metric(&text, "edgeflow_aggregator_files_uploaded_total{family=\"deadletter\"}").is_some_and(|n| n >= 2.0));
    assert_eq!(http_get(port, "/healthz").await?.0, 200);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = http_get(port, "/readyz").await?;
        if status == 200 {
            assert!(body.contains("[+] kafka") && body.contains("[+] s3"), "{body}");
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not ready after 30s: {body}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    agg.stop().await
}

/// What `process` emits, hand-written, to drive the sink alone.
mod emit {
    use std::borrow::Cow;

    use edgeflow_aggregator::processed::{AggregateOut, DeadLetterOut, Processed, ReadingOut, Source, Sums};

    pub fn reading(seq: u64, t: i64, source_offset: i64) -> Vec<u8> {
        Processed::Reading(ReadingOut {
            source: Source { partition: 0, offset: source_offset },
            reason: None,
            device_id: "d0".into(),
            timestamp: super::rfc3339(t).into(),
            event_time_ms: t,
            temperature: 20.0 + seq as f64,
            humidity: 50.0,
            status: "OK".into(),
            node_id: "n0".into(),
            epoch: None,
            seq,
        })
        .to_json()
    }

    pub fn aggregate(device: Option<&str>, window: i64, late: bool, source_offset: i64) -> Vec<u8> {
        Processed::Aggregate(AggregateOut {
            source: Source { partition: 0, offset: source_offset },
            device_id: device.map(|d| Cow::Owned(d.to_owned())),
            window_start_ms: window,
            sums: Sums::of(21.0, 50.0),
            late,
        })
        .to_json()
    }

    pub fn dead(source_offset: i64, t: i64) -> Vec<u8> {
        Processed::DeadLetter(DeadLetterOut {
            source: Source { partition: 0, offset: source_offset },
            reason: "bad_json".into(),
            detail: "x".into(),
            node_id: None,
            epoch: None,
            seq: None,
            received_at_ms: t,
            payload: Cow::Borrowed(b"{"),
            payload_size: 1,
        })
        .to_json()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_sink_drops_process_replays_across_sealed_hours() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let port = edgeflow_testkit::free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let agg = Running::start(env.settings("a", &[("metrics.listen", &listen)])?, Stages::Sink);
    let p = producer(&env.bootstrap())?;
    let first_run = vec![
        (0, "d0", emit::reading(1, at(0, 1), 0)),
        (0, "d0", emit::reading(2, at(0, 2), 1)),
        (0, "d0", emit::dead(2, at(0, 3))),
        (0, "d0", emit::reading(3, at(0, 4), 3)),
        (0, "d0", emit::aggregate(Some("d0"), H10, false, 4)),
        (0, "d0", emit::aggregate(None, H10, false, 4)),
        (0, "d0", emit::aggregate(Some("d0"), H10, true, 5)),
        (0, "d0", emit::aggregate(None, H10, true, 5)),
        (0, "d0", emit::reading(4, at(62, 0), 6)),
    ];
    produce(&p, PROCESSED, &first_run).await?;
    env.wait_for_keys(Duration::from_secs(60), "hour 10 manifest", |k| {
        k.contains(&env.manifest_key(H10, PROCESSED, 0))
    })
    .await?;
    let sealed: Vec<String> = env.keys().await?;

    // `process` crashed and replays from an older checkpoint: everything again (new offsets),
    // then new data, then hour 11 seals.
    let mut replay = first_run[1..].to_vec();
    replay.push((0, "d0", emit::reading(5, at(63, 0), 7)));
    replay.push((0, "d0", emit::reading(6, at(122, 0), 8)));
    produce(&p, PROCESSED, &replay).await?;
    let h11 = env.manifest_key(H10 + HOUR, PROCESSED, 0);
    let keys = env.wait_for_keys(Duration::from_secs(60), "hour 11 manifest", |k| k.contains(&h11)).await?;

    let hour10: Vec<&String> = keys.iter().filter(|k| k.contains("20241226T10Z")).collect();
    assert_eq!(hour10, sealed.iter().collect::<Vec<_>>(), "no late file: every replayed value of hour 10 was dropped");
    let f11 = env
        .parquet(&keys.iter().find(|k| k.contains("/filtered_20241226T11Z_")).expect("hour 11 filtered").clone())
        .await?;
    assert_eq!(ints(&f11, "Seq"), vec![4, 5]);
    let (_, text) = http_get(port, "/metrics").await?;
    assert_eq!(metric(&text, "edgeflow_aggregator_duplicates_dropped_total{stage=\"sink\"}"), Some(8.0), "{text}");
    let report = edgeflow_aggregator::verify::verify(
        &edgeflow_aggregator::s3::S3::new(&env.settings("v", &[])?.s3).await,
        PREFIX,
    )
    .await?;
    assert_eq!(
        (report.totals.records, report.totals.duplicates, report.totals.missing),
        (5, 0, 0),
        "{}",
        report.render()
    );
    agg.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_partitions_close_windows_and_seal_hours_through_ticks() -> Result<()> {
    init_logging();
    let env = Env::start(2).await?;
    let idle = [("process.idle_timeout", "\"1s\""), ("sink.idle_timeout", "\"1s\"")];
    let agg = Running::start(env.settings("a", &idle)?, Stages::Both);
    let p = producer(&env.bootstrap())?;
    // A few readings in the middle of hour 10, then silence: no later event time ever arrives.
    produce(
        &p,
        RAW,
        &[
            (0, "d0", raw("d0", at(30, 0), 20.0, 50.0, "OK", "n0", 1)),
            (0, "d0", raw("d0", at(30, 20), 22.0, 50.0, "OK", "n0", 2)),
            (1, "d1", raw("d1", at(31, 0), 30.0, 50.0, "OK", "n1", 1)),
        ],
    )
    .await?;
    let manifests = [env.manifest_key(H10, PROCESSED, 0), env.manifest_key(H10, PROCESSED, 1)];
    env.wait_for_keys(Duration::from_secs(60), "hour 10 sealed by ticks", |k| manifests.iter().all(|m| k.contains(m)))
        .await?;
    let report = wait_verified(&env, 3, Duration::from_secs(60)).await?;
    assert_eq!(
        report.aggregates.windows_checked, 4,
        "d0 and d1 windows, and the all-devices windows of 10:30 and 10:31"
    );

    // The ticks are in the log, marked by the control header, so a replay decides the same.
    let bootstrap = env.bootstrap();
    let raw_log = tokio::task::spawn_blocking(move || {
        kafka::consume_until(&bootstrap, RAW, Duration::from_secs(20), |m| {
            m.iter().any(|m| m.headers.iter().any(|(k, v)| k == "edgeflow-control" && v == b"tick"))
        })
    })
    .await??;
    let tick = raw_log.iter().find(|m| m.headers.iter().any(|(_, v)| v == b"tick")).expect("a tick");
    let value: serde_json::Value = serde_json::from_slice(&tick.value)?;
    assert!(value["time_ms"].as_i64().is_some_and(|t| t > H10 + HOUR), "{value}");
    agg.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn objects_are_encrypted_with_the_configured_kms_key() -> Result<()> {
    init_logging();
    let env = Env::start(1).await?;
    let kms = "\"arn:aws:kms:us-east-1:111122223333:key/edgeflow\"";
    let agg = Running::start(env.settings("a", &[("s3.sse_kms_key_id", kms)])?, Stages::Sink);
    let p = producer(&env.bootstrap())?;
    produce(
        &p,
        DLQ,
        &[
            (0, "n0", dead_letter("n0", 1, "bad_json", b"{", H10 + 1000)),
            (0, "n0", dead_letter("n0", 2, "bad_json", b"{", H10 + HOUR + 2 * MIN)),
        ],
    )
    .await?;
    let manifest = env.manifest_key(H10, DLQ, 0);
    let keys = env.wait_for_keys(Duration::from_secs(60), "hour 10 manifest", |k| k.contains(&manifest)).await?;
    for key in keys {
        let head = env.s3.head_object().bucket(BUCKET).key(&key).send().await?;
        assert_eq!(head.server_side_encryption().map(|s| s.as_str()), Some("aws:kms"), "{key}");
        assert_eq!(head.ssekms_key_id(), Some("arn:aws:kms:us-east-1:111122223333:key/edgeflow"), "{key}");
    }
    agg.stop().await
}
