//! Proof under fire: the whole pipeline, as separate processes against real mosquitto, tansu and
//! moto, under load and under faults. Every scenario ends with the oracle's verdict "0 missing,
//! 0 duplicate" over what reached S3 (and `edgeflow-aggregator verify` agreeing).
//!
//! Durations are scaled down for CI; `E2E_FULL=1` runs them at full length (the reference load
//! for 10 minutes, outages for minutes).

use std::io::Write;
use std::time::{Duration, Instant};

use edgeflow_e2e::scenario::{finish, report_dir, secs};
use edgeflow_e2e::stack::{Load, SESSION_TIMEOUT, Stack, offset_before_hour_boundary};
use edgeflow_testkit::{Service, TansuStorage};

fn load(devices: u32, rate: f64, duration: Duration, bad_fraction: f64, seed: u64, offset: chrono::Duration) -> Load {
    Load { devices, rate, duration, bad_fraction, seed, clock_offset: offset }
}

/// An hour that ended a while ago, so the run can seal it once idle; `lead` before its end.
fn past(lead_secs: i64) -> chrono::Duration {
    offset_before_hour_boundary(chrono::Duration::seconds(lead_secs))
}

const SETTLE: Duration = Duration::from_secs(240);

/// 1. Reference load: 500 msg/s from 100 devices across 2 agents (CI: 60 s; full: 10 min),
/// with a timeline of throughput, lag and resources for the performance report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_load_500_msgs_per_second_from_100_devices_on_2_agents() -> anyhow::Result<()> {
    let duration = secs(60, 600);
    let mut stack = Stack::start(TansuStorage::Memory).await?;
    stack.start_aggregator("one")?;
    for node in ["node-a", "node-b"] {
        stack.start_agent(node, "")?;
    }
    let offset = past(20);
    let publishers = vec![
        stack.publisher("node-a", load(50, 250.0, duration, 0.02, 1, offset)),
        stack.publisher("node-b", load(50, 250.0, duration, 0.02, 2, offset)),
    ];

    // Sample the pipeline every second while the devices publish, and until S3 has it all.
    std::fs::create_dir_all(report_dir())?;
    let path = report_dir().join(if edgeflow_e2e::scenario::full() {
        "reference-load-full.jsonl"
    } else {
        "reference-load.jsonl"
    });
    let mut timeline = std::io::BufWriter::new(std::fs::File::create(&path)?);
    let start = Instant::now();
    let mut peak_lag = 0.0f64;
    while start.elapsed() < duration + Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let sample = sample(&stack, start.elapsed());
        peak_lag = peak_lag.max(sample["aggregator"]["lag_process"].as_f64().unwrap_or(0.0));
        serde_json::to_writer(&mut timeline, &sample)?;
        timeline.write_all(b"\n")?;
    }
    timeline.flush()?;
    let verdict = finish(&stack, publishers, SETTLE).await?;
    let forwarded: f64 =
        stack.agents.values().map(|a| a.metric("edgeflow_agent_records_forwarded_total{kind=\"record\"}")).sum();
    eprintln!(
        "reference load: {} readings + {} dead letters through 2 agents in {:?}; {:.0} msg/s into Kafka; peak process lag {peak_lag}; timeline {}",
        verdict.valid.delivered_once + verdict.anomalies.delivered_once,
        verdict.malformed.delivered_once,
        duration,
        forwarded / duration.as_secs_f64(),
        path.display()
    );
    let summary = serde_json::json!({
        "devices": 100,
        "rate": 500.0,
        "bad_fraction": 0.02,
        "duration_s": duration.as_secs_f64(),
        "verdict": verdict.summary(),
        "clean": verdict.clean(),
    });
    std::fs::write(path.with_extension("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    assert!(verdict.clean());
    Ok(())
}

/// One timeline sample: throughput counters, lag, buffer depth, resources of every process.
fn sample(stack: &Stack, t: Duration) -> serde_json::Value {
    let mut agents = serde_json::Map::new();
    for (name, a) in &stack.agents {
        let m = a.metrics().unwrap_or_default();
        let g = |k: &str| m.get(k).copied().unwrap_or(0.0);
        agents.insert(
            name.clone(),
            serde_json::json!({
                "received": g("edgeflow_agent_mqtt_messages_received_total"),
                "forwarded": g("edgeflow_agent_records_forwarded_total{kind=\"record\"}") + g("edgeflow_agent_records_forwarded_total{kind=\"dead_letter\"}"),
                "buffered": g("edgeflow_agent_buffer_records"),
                "rss_bytes": resources(a).0,
                "cpu_seconds": resources(a).1,
            }),
        );
    }
    let agg = stack.aggregators.values().next();
    let aggregator = agg.map(|a| {
        let sum = |p: &str| a.metric_sum(p);
        serde_json::json!({
            "consumed_process": sum("edgeflow_aggregator_records_consumed_total{stage=\"process\""),
            "consumed_sink": sum("edgeflow_aggregator_records_consumed_total{stage=\"sink\""),
            "lag_process": sum("edgeflow_aggregator_consumer_lag_records{stage=\"process\""),
            "lag_sink": sum("edgeflow_aggregator_consumer_lag_records{stage=\"sink\""),
            "rows_written": sum("edgeflow_aggregator_rows_written_total"),
            "files_uploaded": sum("edgeflow_aggregator_files_uploaded_total"),
            "rss_bytes": resources(a).0,
            "cpu_seconds": resources(a).1,
        })
    });
    serde_json::json!({ "t": t.as_secs_f64(), "agents": agents, "aggregator": aggregator })
}

/// Resident memory (bytes) and CPU time (seconds) of a process, from /proc.
fn resources(s: &Service) -> (u64, f64) {
    let Some(pid) = s.child.pid() else { return (0, 0.0) };
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|t| {
            t.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
        * 1024;
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            let after = t.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .unwrap_or(0.0);
    (rss, ticks / 100.0)
}

/// 2. The edge cut off from Kafka while devices keep publishing, then back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_cut_off_from_kafka_then_back() -> anyhow::Result<()> {
    let (before, outage, after) = (secs(10, 30), secs(25, 180), secs(10, 30));
    let mut stack = Stack::start(TansuStorage::Memory).await?;
    stack.start_aggregator("one")?;
    stack.start_agent("edge", "")?;
    let publishers = vec![stack.publisher("edge", load(20, 300.0, before + outage + after, 0.02, 3, past(60)))];
    tokio::time::sleep(before).await;
    stack.kafka_proxy.cut();
    tokio::time::sleep(outage).await;
    let agent = &stack.agents["edge"];
    let buffered = agent.metric("edgeflow_agent_buffer_records");
    assert!(buffered > 1000.0, "records wait in the agent's buffer during the outage: {buffered}");
    stack.kafka_proxy.heal();
    let verdict = finish(&stack, publishers, SETTLE).await?;
    eprintln!("edge cut off for {outage:?} with {buffered} records buffered: {}", verdict.summary());
    Ok(())
}

/// 3. The aggregator cut off from S3 across an hour boundary, then back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregator_cut_off_from_s3_across_an_hour_boundary_then_back() -> anyhow::Result<()> {
    // Readings start 20 s before an hour boundary; S3 is away from t=5 s until well after the
    // hour before the boundary is sealed (boundary + 10 s grace).
    let (total, cut_at, heal_at) = (secs(50, 300), Duration::from_secs(5), secs(45, 240));
    let mut stack = Stack::start(TansuStorage::Memory).await?;
    stack.start_aggregator("one")?;
    stack.start_agent("edge", "")?;
    let publishers = vec![stack.publisher("edge", load(20, 300.0, total, 0.02, 4, past(20)))];
    tokio::time::sleep(cut_at).await;
    stack.s3_proxy.cut();
    tokio::time::sleep(heal_at - cut_at).await;
    let agg = &stack.aggregators["one"];
    let errors = agg.metric("edgeflow_aggregator_upload_errors_total");
    assert!(errors >= 1.0, "the sealed hour's uploads failed while S3 was away: {errors}");
    stack.s3_proxy.heal();
    let verdict = finish(&stack, publishers, SETTLE).await?;
    eprintln!(
        "S3 away for {:?} across an hour boundary ({errors} failed uploads retried): {}",
        heal_at - cut_at,
        verdict.summary()
    );
    Ok(())
}

/// 4. kill -9 of an agent, of the aggregator and of the Kafka broker, at random moments, repeatedly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_agents_aggregator_and_broker_at_random_moments() -> anyhow::Result<()> {
    let total = secs(70, 300);
    let mut stack = Stack::start(TansuStorage::Sqlite).await?;
    stack.start_aggregator("one")?;
    for node in ["node-a", "node-b"] {
        stack.start_agent(node, "")?;
    }
    let offset = past(60);
    let publishers = vec![
        stack.publisher("node-a", load(20, 200.0, total, 0.02, 5, offset)),
        stack.publisher("node-b", load(20, 200.0, total, 0.02, 6, offset)),
    ];
    let mut rng = fastrand::Rng::with_seed(7);
    let start = Instant::now();
    let mut kills = Vec::new();
    while start.elapsed() + Duration::from_secs(15) < total {
        tokio::time::sleep(Duration::from_millis(rng.u64(2000..6000))).await;
        match rng.u8(0..3) {
            0 => {
                let node = if rng.bool() { "node-a" } else { "node-b" };
                stack.start_agent(node, "")?; // kills the running one first
                kills.push(format!("agent {node}"));
            }
            1 => {
                stack.aggregators.get_mut("one").expect("aggregator").kill9();
                // tansu 0.6 does not rebalance a group whose dead member is expired while a new
                // one joins: start the replacement once the session has timed out.
                tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
                stack.start_aggregator("one")?;
                kills.push("aggregator".into());
            }
            _ => {
                stack.tansu.kill9();
                tokio::time::sleep(Duration::from_millis(500)).await;
                stack.tansu.restart()?;
                kills.push("broker".into());
            }
        }
    }
    let verdict = finish(&stack, publishers, SETTLE).await?;
    eprintln!("kill -9 of {}: {}", kills.join(", "), verdict.summary());
    assert!(kills.len() >= 4);
    Ok(())
}

/// 5. Rebalance: a second aggregator joins mid-stream, then the first leaves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_a_second_aggregator_joins_then_one_leaves() -> anyhow::Result<()> {
    let total = secs(50, 300);
    let mut stack = Stack::start(TansuStorage::Memory).await?;
    stack.start_aggregator("first")?;
    stack.start_agent("edge", "")?;
    let publishers = vec![stack.publisher("edge", load(30, 400.0, total, 0.02, 8, past(30)))];
    tokio::time::sleep(total / 4).await;
    stack.start_aggregator("second")?;
    stack.aggregators["second"].wait_metric(
        "edgeflow_aggregator_assigned_partitions{stage=\"process\"}",
        Duration::from_secs(30),
        |v| v >= 1.0,
    )?;
    tokio::time::sleep(total / 4).await;
    let status = stack.aggregators.get_mut("first").expect("first").terminate(Duration::from_secs(60));
    assert!(status.is_some_and(|s| s.success()), "the first aggregator leaves cleanly");
    stack.aggregators.remove("first");
    let verdict = finish(&stack, publishers, SETTLE).await?;
    eprintln!("rebalanced twice mid-stream: {}", verdict.summary());
    Ok(())
}

/// 6. Hostile input at 10% of traffic: malformed, oversized, wrong-typed and non-UTF-8 payloads,
/// NaN/Infinity, timestamps far in the past and future; all accounted for in the dead letters.
/// And a third of the way in, the node is cloned (a host imaged from it, buffer included): a
/// second agent with its `node_id`, continuing from the same `seq`, writes beside it. Every
/// reading of both is in S3 once (each run has its own epoch), and the aggregator reports the
/// two writers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_at_ten_percent_is_dead_lettered_and_accounted_for() -> anyhow::Result<()> {
    let total = secs(30, 300);
    let mut stack = Stack::start(TansuStorage::Memory).await?;
    stack.start_aggregator("one")?;
    stack.start_agent("edge", "")?;
    // bad_fraction 0.2: half anomalies (kept as rejected records), half malformed (10%).
    let mut publishers = vec![stack.publisher("edge", load(20, 300.0, total, 0.2, 9, past(60)))];
    tokio::time::sleep(total / 3).await;
    stack.start_clone("twin", "edge")?;
    publishers.push(stack.publisher("twin", load(10, 150.0, total / 3, 0.2, 19, past(60))));
    let verdict = finish(&stack, publishers, SETTLE).await?;
    let conflicts = stack.aggregators["one"].metric("edgeflow_aggregator_node_writer_conflicts_total");
    assert!(conflicts >= 1.0, "two writers of node edge were not reported: {conflicts}");
    let report = stack.verify()?;
    let edge = report["nodes"].as_array().and_then(|n| n.iter().find(|n| n["node_id"] == "edge")).cloned();
    let lineages = edge.as_ref().and_then(|n| n["lineages"].as_u64()).unwrap_or(0);
    assert!(lineages >= 2, "verify checks the clone as a lineage of its own: {edge:?}");
    let share = verdict.malformed.acknowledged as f64
        / (verdict.malformed.acknowledged + verdict.valid.acknowledged + verdict.anomalies.acknowledged) as f64;
    assert!((0.07..0.13).contains(&share), "about 10% malformed: {share}");
    assert_eq!(verdict.malformed.delivered_once, verdict.malformed.acknowledged);
    eprintln!("hostile input ({:.1}% malformed): {}", share * 100.0, verdict.summary());
    Ok(())
}

/// 7. The disk under the agent's data directory fills up (a 4 MiB tmpfs) while Kafka is away.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_under_the_agents_data_dir() -> anyhow::Result<()> {
    let total = secs(25, 120);
    let mut stack = Stack::start(TansuStorage::Memory).await?;
    stack.start_aggregator("one")?;
    let data_dir = stack.dir.path().join("small-disk");
    start_agent_on_small_disk(&mut stack, "edge", &data_dir)?;
    stack.kafka_proxy.cut();
    let publishers = vec![stack.publisher("edge", load(20, 1500.0, total, 0.02, 10, past(60)))];
    let agent = &stack.agents["edge"];
    agent.wait_metric("edgeflow_agent_buffer_commit_errors_total", total + Duration::from_secs(10), |v| v >= 1.0)?;
    assert!(agent.log_text().contains("No space left on device"));
    stack.kafka_proxy.heal();
    let verdict = finish(&stack, publishers, SETTLE).await?;
    eprintln!("disk full while Kafka was away: {}", verdict.summary());
    Ok(())
}

/// Starts `node`'s agent with its data directory on a 4 MiB tmpfs in a private mount namespace.
fn start_agent_on_small_disk(stack: &mut Stack, node: &str, data_dir: &std::path::Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(data_dir)?;
    // Write the agent's configuration through the stack, then run it under `unshare`.
    stack.start_agent(node, "")?;
    let mut old = stack.agents.remove(node).expect("just started");
    old.kill9();
    let config = old.config.clone();
    let text = std::fs::read_to_string(&config)?;
    let default_dir = text.lines().find(|l| l.starts_with("data_dir")).unwrap_or_default().to_owned();
    std::fs::write(&config, text.replace(&default_dir, &format!("data_dir = \"{}\"", data_dir.display())))?;
    let mut cmd = edgeflow_testkit::on_small_disk(data_dir, "4m", &edgeflow_e2e::stack::binary("edgeflow-agent")?);
    cmd.arg("run").arg("--config").arg(&config).env("RUST_LOG", "info");
    let log = config.with_extension("log");
    let child = edgeflow_testkit::Child::spawn("edgeflow-agent (small disk)", cmd, Some(&log))?;
    let service = Service { child, port: old.port, config, log };
    service.wait_healthy(Duration::from_secs(30))?;
    stack.agents.insert(node.to_owned(), service);
    Ok(())
}
