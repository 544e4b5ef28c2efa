//! The command line: `default-config`, `validate`, `metrics`, and `verify --json` against a
//! real S3 server, run as the built binary.

mod common;

use std::process::{Command, Output};

use anyhow::Result;
use common::*;
use edgeflow_aggregator::processed::Sums;
use edgeflow_aggregator::sink::parquet::{ReadingRow, SpoolFile, writer_properties};
use edgeflow_aggregator::sink::state::Family;
use edgeflow_testkit::Moto;

fn aggregator(args: &[&str]) -> Output {
    Command::new(binary())
        .args(args)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .expect("the binary runs")
}

#[test]
fn default_config_validates_and_bad_values_name_their_field() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = aggregator(&["default-config"]);
    assert!(out.status.success());
    let path = dir.path().join("default.toml");
    std::fs::write(&path, &out.stdout)?;
    let out = aggregator(&["validate", "--config", &display(&path)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[s3]\nbucket = \"Not_A_Bucket\"\n")?;
    let out = aggregator(&["validate", "--config", &display(&bad)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("s3.bucket"), "{}", String::from_utf8_lossy(&out.stderr));

    std::fs::write(&bad, "[sink]\nspool = \"/tmp\"\n")?;
    let out = aggregator(&["validate", "--config", &display(&bad)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("spool"), "unknown key named");
    Ok(())
}

#[test]
fn metrics_prints_every_series_at_zero() {
    let out = aggregator(&["metrics"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf8");
    for name in [
        "edgeflow_aggregator_records_consumed_total{stage=\"process\",topic=\"raw-data\"} 0",
        "edgeflow_aggregator_records_consumed_total{stage=\"sink\",topic=\"raw-data-dlq\"} 0",
        "edgeflow_aggregator_late_records_total 0",
        "edgeflow_aggregator_windows_emitted_total{scope=\"all\"} 0",
        "edgeflow_aggregator_upload_errors_total 0",
        "edgeflow_aggregator_upload_duration_seconds_bucket{le=\"+Inf\"} 0",
    ] {
        assert!(text.contains(name), "missing {name}");
    }
    assert!(text.ends_with("# EOF\n"));
}

/// Writes a Parquet object of `family` built by `fill`.
async fn put(s3: &aws_sdk_s3::Client, key: &str, family: Family, fill: impl FnOnce(&mut SpoolFile)) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("f.parquet");
    let mut f = SpoolFile::new(family, path.clone(), 100, writer_properties(100));
    fill(&mut f);
    f.finish()?;
    s3.put_object().bucket(BUCKET).key(key).body(std::fs::read(path)?.into()).send().await?;
    Ok(())
}

fn reading(seq: i64, t: i64, temperature: f64) -> ReadingRow<'static> {
    ReadingRow {
        device_id: "d1",
        event_time_ms: t,
        temperature,
        humidity: 40.0,
        status: "OK",
        node_id: "pve-1",
        epoch: None,
        seq,
        reason: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn verify_json_reports_missing_duplicates_and_mismatches() -> Result<()> {
    let moto = Moto::start()?;
    let s3 = client(&moto.endpoint());
    s3.create_bucket().bucket(BUCKET).send().await?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("a.toml");
    std::fs::write(
        &config,
        format!(
            "[s3]\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\ndeployment_id = \"{DEPLOYMENT}\"\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nforce_path_style = true\n",
            moto.endpoint()
        ),
    )?;
    let day = format!("{PREFIX}/2024/12/26");
    put(&s3, &format!("{day}/filtered_20241226T10Z_processed-data-0_0.parquet"), Family::Filtered, |f| {
        for (seq, t) in [(1, H10), (2, H10 + 1000), (3, H10 + 2000)] {
            f.push_reading(&reading(seq, t, 20.0)).expect("push");
        }
    })
    .await?;
    // Keys from before `[s3] deployment_id` and keys under it are read alike; the sink's
    // start-up probe (`_edgeflow/`) is not data.
    let new_day = format!("{PREFIX}/{DEPLOYMENT}/2024/12/26");
    s3.put_object()
        .bucket(BUCKET)
        .key(format!("{PREFIX}/{DEPLOYMENT}/_edgeflow/create-only-probe"))
        .body(b"probe".to_vec().into())
        .send()
        .await?;
    put(&s3, &format!("{new_day}/aggregated_20241226T10Z_processed-data-0_5.parquet"), Family::Aggregated, |f| {
        let mut s = Sums::of(20.0, 40.0);
        s.add(20.0, 40.0);
        s.add(20.0, 40.0);
        f.push_aggregate(Some("d1"), H10, &s, false);
        f.push_aggregate(None, H10, &s, false);
    })
    .await?;
    let out = aggregator(&["verify", "--config", &display(&config), "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["ok"], true);
    assert_eq!(report["objects"], 2);
    assert_eq!(
        report["totals"],
        serde_json::json!({"records": 3, "missing": 0, "duplicates": 0, "regressions": 0, "stale_nodes": 0, "absent_nodes": []})
    );
    assert_eq!(report["nodes"][0]["node_id"], "pve-1");
    assert_eq!(report["nodes"][0]["high_water_seq"], serde_json::Value::Null);
    assert_eq!(report["aggregates"]["windows_checked"], 2);
    // A node that is expected and has nothing in S3 fails the verdict.
    let out = aggregator(&["verify", "--config", &display(&config), "--json", "--expect-node", "pve-9"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["totals"]["absent_nodes"], serde_json::json!(["pve-9"]));

    // A second file repeats seq 3 and skips 4..=5: a duplicate, a gap, and aggregates off.
    put(&s3, &format!("{day}/filtered_20241226T11Z_processed-data-0_9.parquet"), Family::Filtered, |f| {
        f.push_reading(&reading(3, H10 + HOUR, 21.0)).expect("push");
        f.push_reading(&reading(6, H10 + HOUR + 1000, 22.0)).expect("push");
    })
    .await?;
    let out = aggregator(&["verify", "--config", &display(&config), "--json"]);
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(report["ok"], false);
    assert_eq!(report["nodes"][0]["missing"], serde_json::json!([[4, 5]]));
    assert_eq!(report["nodes"][0]["duplicates"], serde_json::json!([3]));
    assert_eq!(report["aggregates"]["mismatch_count"], 2, "hour 11 readings have no aggregates");
    let human = aggregator(&["verify", "--config", &display(&config)]);
    assert!(
        String::from_utf8_lossy(&human.stdout)
            .contains("verdict: FAILED (4 records, 2 missing, 1 duplicate, 0 stale nodes, 0 absent nodes)")
    );
    Ok(())
}
