//! The agent under faults, against real mosquitto and tansu: Kafka unreachable, kill -9,
//! buffer full under both policies, graceful stop.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use edgeflow_testkit::free_port;

fn acked(published: &[Published]) -> Vec<&Published> {
    published.iter().filter(|p| p.acked && p.class != Class::Malformed).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_unreachable_then_back_everything_arrives_once_in_order() -> anyhow::Result<()> {
    let env = Env::start(true).await?;
    let proxy = env.proxy.as_ref().expect("proxy");
    let port = free_port();
    let config = env.write_config("k", &env.config("node-k", port, ""))?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    proxy.cut();
    let published = publish(&env, 10, 1000.0, 3.0, 0.0, 3).await?;
    let acked = acked(&published);
    // Everything waits in the buffer; readiness says why.
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(10), |v| v >= acked.len() as f64)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = http_get(port, "/readyz")?;
        if code == 503 && body.contains("[-] kafka") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "readiness never reported Kafka down: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(agent.metric("edgeflow_agent_records_forwarded_total{kind=\"record\"}"), 0.0);

    proxy.heal();
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(90))?;
    let copies = check_complete(&acked, &got);
    assert_eq!(copies, 0, "an outage alone causes no duplicate");
    assert_eq!(got.len(), acked.len());
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(30), |v| v == 0.0)?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_stream_loses_nothing_and_never_gives_a_reading_two_seqs() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("c", &env.config("node-c", port, ""))?;
    let mut agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    let publisher = spawn_publisher(&env, "crash", 20, 1500.0, 8, 4);
    let mut seqs_before = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        seqs_before.push(agent.metric("edgeflow_agent_buffer_next_seq"));
        agent.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        agent = start_agent(&config, port)?;
        // seq continues across restarts.
        let next = agent.metric("edgeflow_agent_buffer_next_seq");
        assert!(next >= *seqs_before.last().expect("one"), "seq went back: {next} < {seqs_before:?}");
    }
    publisher.await??;
    let published = read_published(&env.dir.path().join("crash.jsonl"))?;
    let acked = acked(&published);
    assert!(acked.len() > 8000, "{}", acked.len());

    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(60), |v| v == 0.0)?;
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(90))?;
    let copies = check_complete(&acked, &got);
    eprintln!("{} acknowledged, {} in Kafka, {copies} re-sent copies", acked.len(), got.len());
    Ok(())
}

fn small_buffer(policy: &str) -> String {
    format!(
        "[buffer]\nmax_bytes = \"1MiB\"\nwhen_full = \"{policy}\"\ndedup_horizon = 8192\n\
         [records]\nmax_payload_bytes = \"1KiB\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_full_with_block_holds_acks_and_loses_nothing() -> anyhow::Result<()> {
    let env = Env::start(true).await?;
    let proxy = env.proxy.as_ref().expect("proxy");
    let port = free_port();
    let extra = format!("{}[kafka.properties]\n\"linger.ms\" = \"1\"\n", small_buffer("block"));
    let config = env.write_config(
        "b",
        &env.config("node-b", port, &extra).replace("[kafka]\n", "[kafka]\nmax_in_flight = 200\n"),
    )?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    proxy.cut();
    // ~250 bytes per entry: 12,000 messages are about three times the quota.
    let published = publish(&env, 10, 3000.0, 4.0, 0.0, 5).await?;
    let acked = acked(&published);
    agent.wait_metric("edgeflow_agent_buffer_blocked", Duration::from_secs(20), |v| v == 1.0)?;
    let m = agent.metrics()?;
    assert!(
        m["edgeflow_agent_buffer_bytes"] <= 1024.0 * 1024.0,
        "quota exceeded: {}",
        m["edgeflow_agent_buffer_bytes"]
    );
    assert!(m["edgeflow_agent_records_committed_total"] < acked.len() as f64, "the broker must be holding the rest");
    assert_eq!(m["edgeflow_agent_records_dropped_total"], 0.0);
    let (code, body) = http_get(port, "/readyz")?;
    assert!(code == 503 && body.contains("[-] buffer: full"), "{body}");

    proxy.heal();
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(120))?;
    let copies = check_complete(&acked, &got);
    assert_eq!((got.len(), copies), (acked.len(), 0));
    assert_eq!(agent.metric("edgeflow_agent_buffer_blocked"), 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffer_full_with_drop_oldest_drops_the_oldest_and_counts_them() -> anyhow::Result<()> {
    let env = Env::start(true).await?;
    let proxy = env.proxy.as_ref().expect("proxy");
    let port = free_port();
    let config = env.write_config(
        "d",
        &env.config("node-d", port, &small_buffer("drop_oldest")).replace("[kafka]\n", "[kafka]\nmax_in_flight = 50\n"),
    )?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    proxy.cut();
    let published = publish(&env, 10, 3000.0, 4.0, 0.0, 6).await?;
    let acked = acked(&published);
    let committed = agent
        .wait_metric("edgeflow_agent_records_committed_total", Duration::from_secs(20), |v| v >= acked.len() as f64)?;
    assert_eq!(committed, acked.len() as f64, "drop_oldest keeps acknowledging");
    let dropped = agent.metric("edgeflow_agent_records_dropped_total");
    assert!(dropped > 0.0);
    assert!(agent.metric("edgeflow_agent_buffer_bytes") <= 1024.0 * 1024.0);

    proxy.heal();
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(60), |v| v == 0.0)?;
    let expected_min = acked.len() - dropped as usize;
    let got = read_raw(&env.tansu.bootstrap(), expected_min, Duration::from_secs(60))?;
    // Entries already handed to Kafka (at most max_in_flight) may still arrive after being
    // dropped from the buffer; nothing else dropped does.
    assert!(got.len() >= expected_min && got.len() <= expected_min + 50, "{} vs {expected_min}", got.len());
    let delivered: HashSet<u64> = got.iter().map(|g| g.seq).collect();
    assert_eq!(delivered.len(), got.len(), "no duplicates");
    // What was dropped is the oldest: every delivered seq after the first gap is contiguous.
    let mut seqs: Vec<u64> = delivered.into_iter().collect();
    seqs.sort_unstable();
    let newest = *seqs.last().expect("some");
    let tail_start = newest + 1 - expected_min as u64;
    assert!(seqs.iter().filter(|&&s| s >= tail_start).count() == expected_min, "the newest records all survived");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_promptly_and_nothing_is_lost_or_doubled() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("t", &env.config("node-t", port, ""))?;
    let mut agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    let publisher = spawn_publisher(&env, "term", 10, 1000.0, 4, 7);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let started = std::time::Instant::now();
    let status = agent.terminate(Duration::from_secs(15)).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", agent.log_text());
    assert!(started.elapsed() < Duration::from_secs(12));
    let log = agent.log_text();
    assert!(log.contains("stopping") && log.contains("edgeflow-agent stopped"), "{log}");

    let agent = start_agent(&config, port)?;
    publisher.await??;
    let published = read_published(&env.dir.path().join("term.jsonl"))?;
    let acked = acked(&published);
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(60), |v| v == 0.0)?;
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(60))?;
    let copies = check_complete(&acked, &got);
    assert_eq!((got.len(), copies), (acked.len(), 0), "a graceful stop re-sends nothing");
    Ok(())
}

/// A backlog queued at the broker while the agent was stopped arrives as fast as the broker can
/// send it. Every message must be acknowledged once committed — none of its PUBACKs may be lost
/// on the way out — or the broker sends it again after the next restart, and a reading older
/// than the redelivery horizon would get a second seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_drained_at_full_speed_is_all_acknowledged_and_never_redelivered() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("q", &env.config("node-q", port, ""))?;
    // The first start creates the persistent session; then the backlog builds up at the broker.
    let mut agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    assert!(agent.terminate(Duration::from_secs(15)).is_some_and(|s| s.success()));
    let published = publish(&env, 50, 30_000.0, 4.0, 0.0, 8).await?;
    let acked = acked(&published);
    assert!(acked.len() > 40_000, "a backlog of {} is too small to prove anything", acked.len());

    let mut agent = start_agent(&config, port)?;
    let n = acked.len() as f64;
    agent
        .wait_metric("edgeflow_agent_records_forwarded_total{kind=\"record\"}", Duration::from_secs(120), |v| v >= n)?;
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(30), |v| v == 0.0)?;
    let received = agent.metric("edgeflow_agent_mqtt_messages_received_total");
    assert!(agent.terminate(Duration::from_secs(15)).is_some_and(|s| s.success()), "{}", agent.log_text());

    // Restarted: the broker has nothing left to send.
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let again = agent.metric("edgeflow_agent_mqtt_messages_received_total");
    assert_eq!(again, 0.0, "the broker redelivered {again} of {received} messages: their PUBACKs were lost");
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(60))?;
    let copies = check_complete(&acked, &got);
    assert_eq!((got.len(), copies), (acked.len(), 0));
    Ok(())
}
