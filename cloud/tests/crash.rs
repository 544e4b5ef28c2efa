//! `kill -9` of the aggregator (the real binary, as a child process) mid-hour and mid-upload,
//! then restart: every record ends in S3 exactly once, every object under one key, listed by
//! one manifest.

mod common;

use std::time::Duration;

use anyhow::Result;
use common::*;
use edgeflow_testkit::ProxyMode;

const PARTITIONS: i32 = 4;
const DEVICES: usize = 12;

/// `per_node` readings for each of `nodes` nodes, spanning hours 10 to 12: a few rejected,
/// some out of order (and late by more than the allowed lateness). Returned per phase.
fn dataset(partitions: i32, nodes: usize, per_node: u64, phases: u64) -> Vec<Vec<(i32, String, Vec<u8>)>> {
    let step = (3 * HOUR) / per_node as i64;
    let mut out: Vec<Vec<(i32, String, Vec<u8>)>> = vec![Vec::new(); phases as usize];
    for i in 0..per_node {
        for k in 0..nodes {
            let d = (i as usize * 7 + k) % DEVICES;
            let device = format!("d{d}");
            let mut t = H10 + i as i64 * step + k as i64 * 100;
            if i % 50 == 49 {
                t -= 45_000;
            }
            let status = if i % 17 == 5 { "ERROR" } else { "OK" };
            let temperature = 15.0 + (i % 40) as f64 * 0.5 + k as f64;
            let value = raw(&device, t, temperature, 40.0 + (i % 9) as f64, status, &format!("n{k}"), i + 1);
            out[(i * phases / per_node) as usize].push(((d as i32) % partitions, device, value));
        }
    }
    out
}

async fn produce_phase(env: &Env, phase: &[(i32, String, Vec<u8>)]) -> Result<()> {
    produce_paced(env.bootstrap(), phase.to_vec(), Duration::ZERO).await
}

/// Produces in chunks of 250, pausing `pace` between chunks (a stream, not a burst).
async fn produce_paced(bootstrap: String, phase: Vec<(i32, String, Vec<u8>)>, pace: Duration) -> Result<()> {
    let p = producer(&bootstrap)?;
    let records: Vec<(i32, &str, Vec<u8>)> = phase.iter().map(|(p, k, v)| (*p, k.as_str(), v.clone())).collect();
    for chunk in records.chunks(250) {
        produce(&p, RAW, chunk).await?;
        tokio::time::sleep(pace).await;
    }
    Ok(())
}

const FLUSHING: [(&str, &str); 2] = [("process.idle_timeout", "\"2s\""), ("sink.idle_timeout", "\"2s\"")];

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_hour_and_restart_loses_and_doubles_nothing() -> Result<()> {
    init_logging();
    let env = Env::start(PARTITIONS).await?;
    let phases = dataset(PARTITIONS, 2, 6000, 3);

    let mut a = Proc::spawn(&env, "a1", "run", &FLUSHING)?;
    produce_phase(&env, &phases[0]).await?;
    // Mid-stream, after both stages committed checkpoints.
    a.wait_metric("edgeflow_aggregator_checkpoints_total{stage=\"process\"}", 4.0, Duration::from_secs(60)).await?;
    a.wait_metric("edgeflow_aggregator_checkpoints_total{stage=\"sink\"}", 4.0, Duration::from_secs(60)).await?;
    a.child.kill9();

    wait_out_dead_member().await;
    // Phase 2 streams in while the second instance runs; it dies in the middle.
    let mut a = Proc::spawn(&env, "a2", "run", &FLUSHING)?;
    let stream = tokio::spawn(produce_paced(env.bootstrap(), phases[1].clone(), Duration::from_millis(100)));
    a.wait_metric(
        "edgeflow_aggregator_records_consumed_total{stage=\"process\",topic=\"raw-data\"}",
        1000.0,
        Duration::from_secs(60),
    )
    .await?;
    a.wait_metric("edgeflow_aggregator_checkpoints_total{stage=\"process\"}", 4.0, Duration::from_secs(60)).await?;
    a.wait_metric("edgeflow_aggregator_checkpoints_total{stage=\"sink\"}", 4.0, Duration::from_secs(60)).await?;
    a.child.kill9();
    assert!(!stream.is_finished(), "killed while records were still streaming in");
    stream.await??;
    let log = std::fs::read_to_string(&a.log)?;
    assert!(
        log.contains("state restored from checkpoint") && log.contains("sink state restored from checkpoint"),
        "{log}"
    );

    produce_phase(&env, &phases[2]).await?;
    wait_out_dead_member().await;
    let mut a = Proc::spawn(&env, "a3", "run", &FLUSHING)?;
    let report = wait_verified(&env, 12_000, Duration::from_secs(180)).await?;
    assert_eq!(report.nodes.len(), 2);
    assert!(report.aggregates.windows_checked > 0);
    check_manifests(&env).await?;
    let status = a.child.terminate(Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "graceful stop: {status:?}; log {}", a.log.display());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_mid_multipart_upload_and_restart_uploads_once() -> Result<()> {
    init_logging();
    let env = Env::start_with(1, true).await?;
    let proxy = env.s3_proxy.as_ref().expect("proxied S3");
    // 1,600 dead letters of 4 KiB of incompressible bytes: a ~6.5 MiB file, above the 5 MiB
    // multipart threshold.
    let mut entries: Vec<(i32, &str, Vec<u8>)> = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    for seq in 1..=1600u64 {
        let payload: Vec<u8> = (0..4096)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        entries.push((0, "n0", dead_letter("n0", seq, "oversized", &payload, H10 + seq as i64 * 1000)));
    }
    // Seals hour 10 of the dead-letter partition.
    entries.push((0, "n0", dead_letter("n0", 1601, "bad_json", b"x", H10 + HOUR + 2 * MIN)));
    let settings = [("sink.multipart_threshold", "\"5MiB\""), ("sink.row_group_rows", "500")];

    proxy.set_mode(ProxyMode::Blackhole);
    let mut a = Proc::spawn(&env, "b1", "sink", &settings)?;
    let p = producer(&env.bootstrap())?;
    produce(&p, DLQ, &entries).await?;
    // Every row written means the last one sealed hour 10 (sealing comes before routing): its
    // 6 MiB file is in the spool, handed to an upload that hangs.
    a.wait_metric("edgeflow_aggregator_rows_written_total{family=\"deadletter\"}", 1601.0, Duration::from_secs(60))
        .await?;
    a.wait_metric("edgeflow_aggregator_spool_bytes", 5.0 * 1024.0 * 1024.0, Duration::from_secs(10)).await?;
    a.child.kill9();
    assert!(env.keys().await?.is_empty(), "nothing reached S3 through the black hole");

    proxy.set_mode(ProxyMode::Pass);
    wait_out_dead_member().await;
    let mut a = Proc::spawn(&env, "b2", "sink", &settings)?;
    let manifest = env.manifest_key(H10, DLQ, 0);
    env.wait_for_keys(Duration::from_secs(120), "the hour's manifest", |k| k.contains(&manifest)).await?;
    let report = wait_verified(&env, 1600, Duration::from_secs(30)).await?;
    assert_eq!(report.rows.get("deadletter"), Some(&1600));
    check_manifests(&env).await?;
    // Multipart for real: the object has parts.
    let keys = env.keys().await?;
    let key = keys.iter().find(|k| k.ends_with(".parquet")).expect("the file");
    let head = env.s3.head_object().bucket(BUCKET).key(key).send().await?;
    assert!(head.e_tag().is_some_and(|t| t.contains('-')), "multipart ETag: {:?}", head.e_tag());
    assert!(head.content_length().is_some_and(|n| n > 5 * 1024 * 1024));
    a.child.kill9();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replay_after_uploads_finds_every_object_already_there() -> Result<()> {
    init_logging();
    let env = Env::start(2).await?;
    // The sink never checkpoints on its own here: after the kill, it replays everything.
    let settings = [("sink.checkpoint_interval", "\"1h\"")];
    let mut a = Proc::spawn(&env, "c1", "run", &settings)?;
    let phases = dataset(2, 1, 2000, 1);
    produce_phase(&env, &phases[0]).await?;
    // The data runs to 12:59, sealing hours 10 and 11 of both partitions.
    let sealed: Vec<String> = [H10, H10 + HOUR]
        .iter()
        .flat_map(|h| (0..2).map(move |p| (*h, p)))
        .map(|(h, p)| env.manifest_key(h, PROCESSED, p))
        .collect();
    env.wait_for_keys(Duration::from_secs(60), "hours 10 and 11", |k| sealed.iter().all(|m| k.contains(m))).await?;
    // Quiescent: no upload in flight when it dies.
    let mut before = env.keys().await?;
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = env.keys().await?;
        if now == before {
            break;
        }
        before = now;
    }
    a.child.kill9();
    wait_out_dead_member().await;

    let a = Proc::spawn(&env, "c2", "run", &settings)?;
    assert!(before.len() >= 8, "{before:#?}");
    let files = before.len() as f64;
    a.wait_metric("edgeflow_aggregator_uploads_already_present_total", files, Duration::from_secs(60)).await?;
    // Found ours by content: the replay encoded every object to the same bytes (same SHA-256).
    let text = a.metrics().await?;
    assert_eq!(metric(&text, "edgeflow_aggregator_uploads_reencoded_total"), Some(0.0), "same bytes on replay");
    assert_eq!(metric(&text, "edgeflow_aggregator_upload_conflicts_total"), Some(0.0));
    assert_eq!(env.keys().await?, before, "the replay rewrote the same keys, and nothing else");
    check_manifests(&env).await?;
    Ok(())
}
