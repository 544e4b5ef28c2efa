//! The agent against real mosquitto and tansu: exact counts, order, hostile input, shutdown.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use edgeflow_contract::MarkerKind;
use edgeflow_testkit::free_port;

/// Every acknowledged valid reading reaches raw-data exactly once, with its original fields,
/// the node's provenance, in per-device order; the buffer drains to empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_record_reaches_kafka_exactly_once_in_order() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("a", &env.config("node-a", port, ""))?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    let published = publish(&env, 20, 2000.0, 3.0, 0.0, 1).await?;
    let acked: Vec<&Published> = published.iter().filter(|p| p.acked).collect();
    assert!(acked.len() >= 5000, "simulator published only {}", acked.len());

    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(60))?;
    assert_eq!(got.len(), acked.len(), "exactly the acknowledged records, no more, no less");

    // Each reading once, with the same fields.
    let mut by_key: HashMap<(String, String), &Got> = HashMap::new();
    for g in &got {
        assert_eq!(g.node_id, "node-a");
        assert_eq!(g.key, g.device_id, "Kafka key is device_id");
        assert!(by_key.insert((g.device_id.clone(), g.timestamp.clone()), g).is_none(), "duplicate {g:?}");
    }
    for p in &acked {
        let v: serde_json::Value = serde_json::from_str(&p.payload)?;
        let key = natural_key(&p.payload).expect("valid payload");
        let g = by_key.get(&key).unwrap_or_else(|| panic!("acknowledged reading missing: {}", p.payload));
        assert_eq!(g.temperature, v["temperature"].as_f64().expect("number"));
        assert_eq!(g.humidity, v["humidity"].as_f64().expect("number"));
        assert_eq!(g.status, v["status"].as_str().expect("string"));
    }
    // (node, seq) unique; per device, one partition and increasing seq and timestamp.
    let seqs: HashSet<u64> = got.iter().map(|g| g.seq).collect();
    assert_eq!(seqs.len(), got.len());
    let mut per_device: HashMap<&str, Vec<&Got>> = HashMap::new();
    for g in &got {
        per_device.entry(&g.device_id).or_default().push(g);
    }
    for records in per_device.values_mut() {
        records.sort_by_key(|g| g.offset);
        assert!(records.windows(2).all(|w| w[0].partition == w[1].partition));
        assert!(records.windows(2).all(|w| w[0].seq < w[1].seq && w[0].timestamp < w[1].timestamp));
    }

    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(20), |v| v <= 1.0)?;
    let m = agent.metrics()?;
    assert_eq!(m["edgeflow_agent_records_committed_total"], acked.len() as f64);
    assert_eq!(m["edgeflow_agent_records_forwarded_total{kind=\"record\"}"], acked.len() as f64);
    assert_eq!(m["edgeflow_agent_records_duplicate_total"], 0.0);
    Ok(())
}

/// Malformed, oversized, wrong-typed, non-UTF-8 payloads and out-of-range timestamps are
/// acknowledged, dead-lettered with their reason, counted, and the stream goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_payloads_are_dead_lettered_counted_and_the_stream_goes_on() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("h", &env.config("node-h", port, ""))?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    let published = publish(&env, 10, 1000.0, 2.0, 0.3, 2).await?;
    let acked: Vec<&Published> = published.iter().filter(|p| p.acked).collect();
    let malformed = acked.iter().filter(|p| p.class == Class::Malformed).count();
    let records = acked.len() - malformed;
    assert!(malformed > 50, "{malformed}");

    let got = read_raw(&env.tansu.bootstrap(), records, Duration::from_secs(60))?;
    assert_eq!(got.len(), records, "valid records and anomalies go to raw-data");
    // The new buffer's marker is the first dead letter; high_water markers may come in between
    // (on schedule): markers, not refused payloads.
    let dlq = read_dlq(&env.tansu.bootstrap(), malformed + 1, Duration::from_secs(60))?;
    let high_water = dlq.iter().filter(|d| d.marker() == Some(MarkerKind::HighWater)).count();
    assert_eq!(dlq.len() - high_water, malformed + 1);
    assert_eq!(dlq.iter().filter(|d| d.marker() == Some(MarkerKind::BufferCreated)).count(), 1);
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for d in dlq.iter().filter(|d| d.marker().is_none()) {
        *reasons.entry(d.reason.to_string()).or_default() += 1;
        assert_eq!(d.node_id, "node-h");
        assert!(d.source.starts_with("devices/"));
        assert!(d.payload_size as usize >= d.payload.len());
    }
    for reason in ["bad_json", "wrong_type", "missing_field", "not_utf8", "oversized", "timestamp_out_of_range"] {
        assert!(reasons.get(reason).copied().unwrap_or(0) > 0, "no {reason} in {reasons:?}");
    }
    // Every seq taken once across both topics.
    let mut seqs: Vec<u64> = got.iter().map(|g| g.seq).chain(dlq.iter().map(|d| d.seq)).collect();
    seqs.sort_unstable();
    assert!(seqs.windows(2).all(|w| w[0] + 1 == w[1]), "seq is gap-free and unique across records and dead letters");

    let m = agent.metrics()?;
    let rejected: f64 =
        m.iter().filter(|(k, _)| k.starts_with("edgeflow_agent_records_rejected_total")).map(|(_, v)| v).sum();
    assert_eq!(rejected, malformed as f64);
    for (reason, n) in &reasons {
        assert_eq!(m[&format!("edgeflow_agent_records_rejected_total{{reason=\"{reason}\"}}")], *n as f64);
    }
    assert_eq!(http_get(port, "/healthz")?.0, 200, "agent alive");
    Ok(())
}

/// A reading delivered twice (a device retry, or the broker redelivering after a crash between
/// commit and PUBACK) is stored once and acknowledged both times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_reading_twice_gets_one_seq() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("r", &env.config("node-r", port, ""))?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    let now = chrono::Utc::now().to_rfc3339();
    let payload = format!(
        r#"{{"device_id": "twice", "timestamp": "{now}", "temperature": 70.5, "humidity": 50, "status": "OK"}}"#
    );
    let other = payload.replace("70.5", "71.5");
    for p in [&payload, &payload, &other] {
        let status = std::process::Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &env.mosquitto.port.to_string(),
                "-q",
                "1",
                "-t",
                "devices/twice/telemetry",
                "-m",
                p,
            ])
            .status()?;
        assert!(status.success());
    }
    let got = read_raw(&env.tansu.bootstrap(), 2, Duration::from_secs(20))?;
    assert_eq!(got.len(), 2, "the repeat is not stored; a different reading with the same timestamp is");
    assert_ne!(got[0].seq, got[1].seq);
    agent.wait_metric("edgeflow_agent_records_duplicate_total", Duration::from_secs(5), |v| v == 1.0)?;
    assert_eq!(agent.metric("edgeflow_agent_mqtt_messages_received_total"), 3.0);
    Ok(())
}

/// A device sends reading A, then B with the same `device_id` and `timestamp` but another
/// payload, then A again (its retransmission): A is stored once, B once, whatever came in
/// between the two copies of A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeat_after_another_reading_with_the_same_key_gets_no_second_seq() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("aba", &env.config("node-aba", port, ""))?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    let now = chrono::Utc::now().to_rfc3339();
    let a =
        format!(r#"{{"device_id": "aba", "timestamp": "{now}", "temperature": 70.5, "humidity": 50, "status": "OK"}}"#);
    let b = a.replace("70.5", "71.5");
    let later = chrono::Utc::now() + chrono::Duration::seconds(1);
    let c = a.replace(&now, &later.to_rfc3339());
    for p in [&a, &b, &a, &c] {
        mosquitto_pub(env.mosquitto.port, "devices/aba/telemetry", p)?;
    }
    agent.wait_metric("edgeflow_agent_mqtt_messages_received_total", Duration::from_secs(10), |v| v == 4.0)?;
    let got = read_raw(&env.tansu.bootstrap(), 3, Duration::from_secs(20))?;
    let temps: Vec<f64> = got.iter().map(|g| g.temperature).collect();
    assert_eq!(got.len(), 3, "A, B and C once each, A's repeat not stored: {temps:?}");
    assert_eq!(temps, vec![70.5, 71.5, 70.5], "in order: A, B, C");
    agent.wait_metric("edgeflow_agent_records_duplicate_total", Duration::from_secs(5), |v| v == 1.0)?;
    Ok(())
}

/// Publishes one QoS 1 message with `mosquitto_pub` (returns once the broker acknowledged it).
fn mosquitto_pub(port: u16, topic: &str, payload: &str) -> anyhow::Result<()> {
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-t", topic, "-m", payload])
        .status()?;
    anyhow::ensure!(status.success(), "mosquitto_pub failed: {status}");
    Ok(())
}

/// The same guarantees over MQTT 3.1.1 (the broker sets the in-flight window).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_3_1_1_delivers_exactly_once_and_survives_a_kill() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let text = env.config("node-v4", port, "").replace("[mqtt]\n", "[mqtt]\nprotocol = \"3.1.1\"\n");
    let config = env.write_config("v4", &text)?;
    let mut agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    let first = publish(&env, 10, 1000.0, 2.0, 0.1, 11).await?;
    agent.kill9();
    // Published while the agent is down: the broker keeps them for the persistent session.
    let second = publish(&env, 10, 1000.0, 1.0, 0.0, 12).await?;
    let agent = start_agent(&config, port)?;
    let acked: Vec<&Published> =
        first.iter().chain(&second).filter(|p| p.acked && p.class != Class::Malformed).collect();
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(60), |v| v == 0.0)?;
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(60))?;
    let keys: HashSet<(String, String)> = got.iter().map(|g| (g.device_id.clone(), g.timestamp.clone())).collect();
    for p in &acked {
        assert!(keys.contains(&natural_key(&p.payload).expect("valid")), "lost: {}", p.payload);
    }
    let seqs: HashSet<u64> = got.iter().map(|g| g.seq).collect();
    assert_eq!(seqs.len(), keys.len(), "no reading has two seqs");
    Ok(())
}
