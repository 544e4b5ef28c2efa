//! What every scenario does at its end: wait for the devices, let the pipeline settle, and judge.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::oracle::{self, PipelineVerdict, Published};
use crate::stack::{BUCKET, PREFIX, Stack};

/// Whether to run scenarios at full length (`E2E_FULL=1`) rather than scaled down for CI.
pub fn full() -> bool {
    std::env::var("E2E_FULL").is_ok_and(|v| v == "1" || v == "true")
}

/// `ci` seconds normally, `full` seconds with `E2E_FULL=1`.
pub fn secs(ci: u64, full_length: u64) -> Duration {
    Duration::from_secs(if full() { full_length } else { ci })
}

/// Where scenarios write reports (timelines for BENCHMARKS.md): `E2E_REPORT_DIR`, else
/// `target/e2e` of the workspace.
pub fn report_dir() -> PathBuf {
    std::env::var_os("E2E_REPORT_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/e2e"))
}

/// Waits for the publishers, then polls S3 until the oracle is satisfied (or `settle` passes),
/// then checks the product's own `verify` agrees. Returns the verdict; fails the test if it is
/// not clean.
pub async fn finish(
    stack: &Stack,
    publishers: Vec<(tokio::task::JoinHandle<Result<edgeflow_agent::simulate::Report>>, PathBuf)>,
    settle: Duration,
) -> Result<PipelineVerdict> {
    let mut published: Vec<Published> = Vec::new();
    for (task, log) in publishers {
        task.await.context("publisher task")??;
        published.extend(oracle::read_published(&log)?);
    }
    let started = Instant::now();
    stack.wait_agents_drained(settle)?;
    stack.let_dead_letter_hours_pass().await?;
    let s3 = stack.s3();
    let mut last_print = Instant::now();
    let last = loop {
        let lake = crate::lake::read(&s3, BUCKET, PREFIX).await?;
        let verdict = oracle::check_pipeline(&published, &lake);
        if verdict.clean() {
            break verdict;
        }
        let last = verdict;
        if started.elapsed() > settle {
            bail!(
                "the pipeline did not settle in {settle:?}: {}\n{}\n{}\n{}",
                last.summary(),
                last.malformed_examples.join("\n"),
                trace(stack, &last),
                stack.logs()
            );
        }
        if last_print.elapsed() > Duration::from_secs(10) {
            eprintln!("  waiting for S3: {} ({} objects)", last.summary(), lake.objects);
            last_print = Instant::now();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    eprintln!("oracle: {} in {} objects after {:.0}s", last.summary(), last.objects, started.elapsed().as_secs_f64());
    let verify = stack.verify()?;
    if verify["ok"] != serde_json::Value::Bool(true) {
        bail!("edgeflow-aggregator verify disagrees with the oracle: {verify:#}");
    }
    eprintln!(
        "verify: ok; {} records in {} objects, {} missing, {} duplicates, {} windows checked",
        verify["totals"]["records"],
        verify["objects"],
        verify["totals"]["missing"],
        verify["totals"]["duplicates"],
        verify["aggregates"]["windows_checked"]
    );
    Ok(last)
}

/// Where the first missing readings got to: for each, the raw-data and processed-data
/// offsets holding it (none: lost before Kafka, or by the broker).
fn trace(stack: &Stack, verdict: &PipelineVerdict) -> String {
    let Ok(tail) = crate::kafka::Tail::start(&stack.tansu.bootstrap(), &["raw-data", "processed-data"]) else {
        return "(cannot read Kafka to trace the missing readings)".into();
    };
    std::thread::sleep(Duration::from_secs(15));
    let (raw, processed) = (tail.snapshot("raw-data"), tail.snapshot("processed-data"));
    let find = |seen: &crate::kafka::Seen, device: &str, ts: &str| -> Vec<String> {
        seen.messages
            .iter()
            .filter(|(_, _, v)| {
                let text = String::from_utf8_lossy(v);
                text.contains(device) && text.contains(ts)
            })
            .map(|(p, o, v)| format!("{p}@{o}: {}", String::from_utf8_lossy(v).chars().take(160).collect::<String>()))
            .collect()
    };
    let mut out = format!(
        "missing readings traced ({} raw-data and {} processed-data records read):\n",
        raw.messages.len(),
        processed.messages.len()
    );
    for (device, ts) in &verdict.missing_examples {
        out.push_str(&format!(
            "  {device} {ts}: raw-data {:?}; processed-data {:?}\n",
            find(&raw, device, ts),
            find(&processed, device, ts)
        ));
    }
    out
}
