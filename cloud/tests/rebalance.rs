//! Two aggregators in one consumer group: a second instance joins mid-stream (the partitions
//! are split between them), then the first leaves (the second takes everything over). Every
//! record ends in S3 exactly once.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;

const PARTITIONS: i32 = 4;

/// Readings of 8 devices (two per partition) from 3 nodes, 20 s apart, from 10:00 on.
fn stream(per_node: u64) -> Vec<(i32, String, Vec<u8>)> {
    let mut out = Vec::new();
    for i in 0..per_node {
        for k in 0..3u64 {
            let d = ((i + k) % 8) as i32;
            let device = format!("d{d}");
            let t = H10 + i as i64 * 20_000 + k as i64 * 10;
            let status = if i % 23 == 3 { "FAULT" } else { "OK" };
            out.push((
                d % PARTITIONS,
                device.clone(),
                raw(&device, t, 10.0 + (i % 30) as f64, 55.0, status, &format!("n{k}"), i + 1),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_aggregator_joins_then_the_first_leaves() -> Result<()> {
    init_logging();
    let env = Env::start(PARTITIONS).await?;
    let flushing = [("process.idle_timeout", "\"2s\""), ("sink.idle_timeout", "\"2s\"")];
    let mut a = Proc::spawn(&env, "a", "run", &flushing)?;
    let data = stream(1500);
    let total = data.len() as u64;
    let bootstrap = env.bootstrap();
    let producer_task = tokio::spawn(async move {
        let p = producer(&bootstrap)?;
        for chunk in data.chunks(150) {
            let records: Vec<(i32, &str, Vec<u8>)> =
                chunk.iter().map(|(p, k, v)| (*p, k.as_str(), v.clone())).collect();
            produce(&p, RAW, &records).await?;
            // A stream rather than a burst, so that the rebalances happen mid-stream.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        anyhow::Ok(())
    });

    a.wait_metric(
        "edgeflow_aggregator_records_consumed_total{stage=\"process\",topic=\"raw-data\"}",
        500.0,
        Duration::from_secs(60),
    )
    .await?;
    let b = Proc::spawn(&env, "b", "run", &flushing)?;
    // The group rebalanced: b owns some raw and some processed partitions, and works.
    b.wait_metric("edgeflow_aggregator_assigned_partitions{stage=\"process\"}", 1.0, Duration::from_secs(60)).await?;
    b.wait_metric("edgeflow_aggregator_assigned_partitions{stage=\"sink\"}", 1.0, Duration::from_secs(60)).await?;
    b.wait_metric(
        "edgeflow_aggregator_records_consumed_total{stage=\"process\",topic=\"raw-data\"}",
        100.0,
        Duration::from_secs(60),
    )
    .await?;
    let a_text = a.metrics().await?;
    let a_owns = metric(&a_text, "edgeflow_aggregator_assigned_partitions{stage=\"process\"}").unwrap_or(0.0);
    assert!(a_owns >= 1.0 && a_owns < PARTITIONS as f64, "a kept part of raw-data: {a_owns}");
    assert!(!producer_task.is_finished(), "still streaming when b joined");

    // a leaves (SIGTERM: it drains, checkpoints and leaves the group); b takes over.
    let status = a.child.terminate(Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "a stopped cleanly: {status:?}");
    b.wait_metric(
        "edgeflow_aggregator_assigned_partitions{stage=\"process\"}",
        PARTITIONS as f64,
        Duration::from_secs(60),
    )
    .await?;
    producer_task.await??;

    let report = wait_verified(&env, total, Duration::from_secs(180)).await?;
    assert_eq!(report.nodes.len(), 3);
    check_manifests(&env).await?;
    let log = std::fs::read_to_string(&b.log)?;
    assert!(log.contains("state restored from checkpoint"), "b resumed a's partitions from their checkpoints");
    Ok(())
}
