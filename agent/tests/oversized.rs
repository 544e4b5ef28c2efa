//! Poison pills against real mosquitto and tansu: payloads larger than the agent accepts, over
//! MQTT 5 and 3.1.1, and a dead letter larger than Kafka accepts. Each is dead-lettered with its
//! reason, the readings around it flow, and the MQTT session stays up.

mod common;

use std::time::Duration;

use common::*;
use edgeflow_testkit::free_port;

/// Publishes one QoS 1 message from a file with `mosquitto_pub` (returns once the broker
/// acknowledged it). A file, because a megabyte does not fit in one command-line argument.
fn publish_file(env: &Env, name: &str, topic: &str, payload: &[u8], protocol: &str) -> anyhow::Result<()> {
    let path = env.dir.path().join(format!("{name}.payload"));
    std::fs::write(&path, payload)?;
    let status = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &env.mosquitto.port.to_string(), "-q", "1", "-V", protocol, "-t", topic])
        .arg("-f")
        .arg(&path)
        .status()?;
    anyhow::ensure!(status.success(), "mosquitto_pub failed: {status}");
    Ok(())
}

fn reading(device: &str, i: u32) -> Vec<u8> {
    let ts = (chrono::Utc::now() + chrono::Duration::milliseconds(i64::from(i))).to_rfc3339();
    format!(r#"{{"device_id": "{device}", "timestamp": "{ts}", "temperature": {i}.5, "humidity": 50, "status": "OK"}}"#)
        .into_bytes()
}

/// Valid readings with a 64 KiB and a 1 MiB payload between them: both become `oversized`
/// dead letters (the default `records.max_payload_bytes` is 16 KiB), the readings all arrive,
/// and the agent never loses its MQTT connection over them.
async fn oversized_payloads_are_dead_lettered(protocol: &str) -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let node = format!("node-big-{}", protocol.replace('.', ""));
    let text = env.config(&node, port, "").replace("[mqtt]\n", &format!("[mqtt]\nprotocol = \"{protocol}\"\n"));
    let config = env.write_config("big", &text)?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    let pub_protocol = if protocol == "5" { "mqttv5" } else { "mqttv311" };
    let topic = "devices/big/telemetry";
    let sizes = [64 * 1024, 1024 * 1024];
    publish_file(&env, "r0", topic, &reading("big", 0), pub_protocol)?;
    for (i, size) in sizes.iter().enumerate() {
        publish_file(&env, &format!("big{i}"), topic, &vec![b'x'; *size], pub_protocol)?;
        publish_file(&env, &format!("r{}", i + 1), topic, &reading("big", i as u32 + 1), pub_protocol)?;
    }

    let got = read_raw(&env.tansu.bootstrap(), 3, Duration::from_secs(30))?;
    assert_eq!(got.len(), 3, "every valid reading arrives: {got:?}");
    // The buffer_created marker, then the two oversized payloads.
    let dlq = read_dlq(&env.tansu.bootstrap(), 1 + sizes.len(), Duration::from_secs(30))?;
    let oversized: Vec<_> = dlq.iter().filter(|d| d.reason == "oversized").collect();
    let reasons: Vec<(&str, u64)> = dlq.iter().map(|d| (d.reason.as_ref(), d.payload_size)).collect();
    assert_eq!(oversized.len(), sizes.len(), "both oversized payloads are dead letters: {reasons:?}");
    for (d, size) in oversized.iter().zip(sizes) {
        assert_eq!(d.payload_size, size as u64);
        assert!(d.truncated && d.payload.len() < size && d.payload.iter().all(|&b| b == b'x'));
        assert_eq!(d.source, topic);
    }
    assert_eq!(agent.metric("edgeflow_agent_records_rejected_total{reason=\"oversized\"}"), 2.0);
    assert_eq!(agent.metric("edgeflow_agent_mqtt_connection_errors_total"), 0.0, "the session never dropped");
    assert_eq!(agent.metric("edgeflow_agent_mqtt_connected"), 1.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_are_dead_lettered_over_mqtt_5() -> anyhow::Result<()> {
    oversized_payloads_are_dead_lettered("5").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_payloads_are_dead_lettered_over_mqtt_3_1_1() -> anyhow::Result<()> {
    oversized_payloads_are_dead_lettered("3.1.1").await
}

/// With `records.max_payload_bytes` raised to 16 MiB, a refused 2 MiB payload would make a
/// dead letter larger than the producer's `message.max.bytes`: Kafka refuses it, and the
/// forwarder, which sends in `seq` order, would retry it forever with everything behind it
/// stuck. Its payload copy is cut to fit instead, and the stream behind it flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_too_large_for_kafka_is_truncated_and_the_stream_flows() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let text = env
        .config("node-pill", port, "[records]\nmax_payload_bytes = \"16MiB\"\n")
        .replace("[mqtt]\n", "[mqtt]\nmax_packet_size = \"32MiB\"\n");
    let config = env.write_config("pill", &text)?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    let topic = "devices/pill/telemetry";
    let pill: Vec<u8> = std::iter::once(b'{').chain(std::iter::repeat_n(b'y', 2 * 1024 * 1024)).collect();
    publish_file(&env, "a", topic, &reading("pill", 0), "mqttv5")?;
    publish_file(&env, "pill", topic, &pill, "mqttv5")?;
    publish_file(&env, "b", topic, &reading("pill", 1), "mqttv5")?;

    let got = read_raw(&env.tansu.bootstrap(), 2, Duration::from_secs(30))?;
    assert_eq!(got.len(), 2, "the reading behind the dead letter arrives: {got:?}");
    let dlq = read_dlq(&env.tansu.bootstrap(), 2, Duration::from_secs(30))?;
    let d = dlq.iter().find(|d| d.reason == "bad_json").expect("the refused payload is a dead letter");
    assert_eq!(d.payload_size, pill.len() as u64);
    assert!(d.truncated, "the copy says it was cut");
    assert!(d.payload.len() < pill.len() && pill.starts_with(&d.payload), "a prefix of the payload is kept");
    assert!(d.detail.contains("sha256"), "the detail carries the hash of the whole payload: {}", d.detail);
    // Nothing stuck in the buffer, and the cut is counted.
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(10), |v| v == 0.0)?;
    assert_eq!(agent.metric("edgeflow_agent_dead_letters_truncated_total"), 1.0);
    Ok(())
}
