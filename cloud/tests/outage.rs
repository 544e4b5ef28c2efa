//! S3 unreachable (a fault proxy in front of moto cuts every connection) across an hour
//! boundary, then back: consumption goes on while the spool has room, pauses when it is full,
//! and everything reaches S3 exactly once after recovery.

mod common;

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use common::*;
use edgeflow_aggregator::Stages;

/// Polls `/metrics` until `series` satisfies `ok`.
async fn wait_metric(port: u16, series: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> Result<f64> {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, text) = http_get(port, "/metrics").await?;
        if let Some(v) = metric(&text, series).filter(|v| ok(*v)) {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("{series} not as expected after {timeout:?}: {:?}", metric(&text, series));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn scrape(port: u16, series: &str) -> Result<f64> {
    let (_, text) = http_get(port, "/metrics").await?;
    metric(&text, series).ok_or_else(|| anyhow::anyhow!("no {series}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn s3_down_across_an_hour_boundary_then_back() -> Result<()> {
    init_logging();
    let env = Env::start_with(2, true).await?;
    let proxy = env.s3_proxy.as_ref().expect("proxied S3");
    let port = edgeflow_testkit::free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let agg = Running::start(
        env.settings(
            "a",
            &[("metrics.listen", &listen), ("process.idle_timeout", "\"2s\""), ("sink.idle_timeout", "\"2s\"")],
        )?,
        Stages::Both,
    );
    let p = producer(&env.bootstrap())?;
    // Hour 10 of two devices, one per partition: a reading every 10 s.
    let readings = |from: i64, to: i64, seq0: u64| -> Vec<(i32, &'static str, Vec<u8>)> {
        (from..to)
            .flat_map(|i| {
                let t = H10 + i * 10_000;
                let seq = seq0 + (i - from) as u64;
                [
                    (0, "d0", raw("d0", t, 20.0 + (i % 7) as f64, 50.0, "OK", "n0", seq)),
                    (1, "d1", raw("d1", t, 30.0, 40.0, "OK", "n1", seq)),
                ]
            })
            .collect()
    };
    produce(&p, RAW, &readings(0, 300, 1)).await?;
    wait_metric(port, "edgeflow_aggregator_rows_written_total{family=\"filtered\"}", Duration::from_secs(60), |v| {
        v >= 600.0
    })
    .await?;

    // S3 goes away; the stream crosses into hour 11 and past its grace, sealing hour 10.
    proxy.cut();
    produce(&p, RAW, &readings(300, 400, 301)).await?;
    wait_metric(port, "edgeflow_aggregator_upload_errors_total", Duration::from_secs(60), |v| v >= 2.0).await?;
    wait_metric(port, "edgeflow_aggregator_rows_written_total{family=\"filtered\"}", Duration::from_secs(60), |v| {
        v >= 800.0
    })
    .await?;
    assert!(env.keys().await?.is_empty(), "nothing reached S3 while it was cut off");
    // Sealed files wait in the spool (the gauge is refreshed a few times a second).
    wait_metric(port, "edgeflow_aggregator_spool_bytes", Duration::from_secs(10), |v| v > 0.0).await?;
    assert_eq!(
        scrape(port, "edgeflow_aggregator_consumption_paused").await?,
        0.0,
        "the spool has room: consumption goes on"
    );
    assert!(scrape(port, "edgeflow_aggregator_oldest_pending_record_age_seconds").await? >= 0.0);

    // S3 is back: the retries deliver hour 10; idle ticks then seal and deliver hour 11.
    proxy.heal();
    let report = wait_verified(&env, 800, Duration::from_secs(120)).await?;
    assert_eq!(report.totals.duplicates, 0);
    check_manifests(&env).await?;
    agg.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_full_spool_pauses_consumption_until_s3_returns() -> Result<()> {
    init_logging();
    let env = Env::start_with(1, true).await?;
    let proxy = env.s3_proxy.as_ref().expect("proxied S3");
    let port = edgeflow_testkit::free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let agg = Running::start(
        env.settings(
            "a",
            &[
                ("metrics.listen", &listen),
                ("sink.spool_max_bytes", "\"16MiB\""),
                ("sink.row_group_rows", "256"),
                ("sink.idle_timeout", "\"2s\""),
            ],
        )?,
        Stages::Sink,
    );
    let p = producer(&env.bootstrap())?;
    // Dead letters with 4 KiB of incompressible bytes: ~10 MiB per 2,500.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut entry = |seq: u64, t: i64| {
        let payload: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        (0, "n0", dead_letter("n0", seq, "oversized", &payload, t))
    };
    proxy.cut();
    // Hour 10 (sealed by the first entry of 11:02), then hour 11 keeps filling the spool.
    let batch: Vec<_> = (1..=2500).map(|s| entry(s, H10 + s as i64 * 1000)).collect();
    produce(&p, DLQ, &batch).await?;
    let batch: Vec<_> = (2501..=6000).map(|s| entry(s, H10 + HOUR + 2 * MIN + (s - 2500) as i64 * 100)).collect();
    produce(&p, DLQ, &batch).await?;
    wait_metric(port, "edgeflow_aggregator_consumption_paused", Duration::from_secs(60), |v| v == 1.0).await?;
    let consumed =
        scrape(port, "edgeflow_aggregator_records_consumed_total{stage=\"sink\",topic=\"raw-data-dlq\"}").await?;
    assert!(consumed < 6000.0, "paused before the end: {consumed}");
    let spool = scrape(port, "edgeflow_aggregator_spool_bytes").await?;
    assert!(spool >= 16.0 * 1024.0 * 1024.0, "{spool}");
    // Paused means paused: nothing more is read while S3 stays away.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later =
        scrape(port, "edgeflow_aggregator_records_consumed_total{stage=\"sink\",topic=\"raw-data-dlq\"}").await?;
    assert!(later - consumed < 1000.0, "at most what librdkafka had fetched: {consumed} -> {later}");

    proxy.heal();
    wait_metric(port, "edgeflow_aggregator_consumption_paused", Duration::from_secs(60), |v| v == 0.0).await?;
    let report = wait_verified(&env, 6000, Duration::from_secs(120)).await?;
    assert_eq!(report.rows.get("deadletter"), Some(&6000));
    check_manifests(&env).await?;
    agg.stop().await
}
