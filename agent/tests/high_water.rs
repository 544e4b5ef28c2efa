//! `high_water` markers against real mosquitto and tansu: written on a schedule and at a clean
//! stop, forwarded to raw-data-dlq in `seq` order, each above every `seq` assigned before it.

mod common;

use std::time::Duration;

use common::*;
use edgeflow_contract::{DeadLetter, MarkerKind};
use edgeflow_testkit::free_port;

/// Everything in raw-data-dlq, once `done` says enough arrived (or `timeout`).
fn dead_letters(
    bootstrap: &str,
    timeout: Duration,
    mut done: impl FnMut(&[DeadLetter<'_>]) -> bool,
) -> anyhow::Result<Vec<DeadLetter<'static>>> {
    let parse = |msgs: &[kafka::Consumed]| -> Vec<DeadLetter<'static>> {
        msgs.iter().filter_map(|m| DeadLetter::parse(&m.value).ok()).map(DeadLetter::into_owned).collect()
    };
    let msgs = kafka::consume_until(bootstrap, DLQ, timeout, |msgs| done(&parse(msgs)))?;
    Ok(parse(&msgs))
}

fn is_high_water(d: &DeadLetter<'_>) -> bool {
    d.marker() == Some(MarkerKind::HighWater)
}

/// The `high_water` markers in raw-data-dlq, once `done` says enough arrived (or `timeout`).
fn high_water_markers(
    bootstrap: &str,
    timeout: Duration,
    mut done: impl FnMut(&[DeadLetter<'_>]) -> bool,
) -> anyhow::Result<Vec<DeadLetter<'static>>> {
    let all = dead_letters(bootstrap, timeout, |all| {
        let only: Vec<DeadLetter<'_>> = all.iter().filter(|d| is_high_water(d)).cloned().collect();
        done(&only)
    })?;
    Ok(all.into_iter().filter(is_high_water).collect())
}

/// The `seq`s below `below` (from the node's `buffer_created` marker on) that are in neither
/// topic: what `verify` would call missing below a marker at `below`.
fn missing_below(below: u64, got: &[Got], dlq: &[DeadLetter<'_>]) -> Vec<u64> {
    let first = dlq.iter().find(|d| d.marker() == Some(MarkerKind::BufferCreated)).expect("buffer_created").seq;
    let present: std::collections::HashSet<u64> = got.iter().map(|g| g.seq).chain(dlq.iter().map(|d| d.seq)).collect();
    (first..below).filter(|s| !present.contains(s)).collect()
}

/// A clean stop (SIGTERM) writes a marker above every reading's `seq` and delivers it before
/// the agent exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_delivers_a_high_water_marker_above_every_reading() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("hw", &env.config("node-hw", port, ""))?;
    let mut agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    let published = publish(&env, 5, 500.0, 2.0, 0.0, 21).await?;
    let acked: Vec<&Published> = published.iter().filter(|p| p.acked).collect();
    assert!(acked.len() > 500, "{}", acked.len());
    let status = agent.terminate(Duration::from_secs(20)).expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}\n{}", agent.log_text());

    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(60))?;
    assert_eq!(got.len(), acked.len());
    let newest = got.iter().map(|g| g.seq).max().expect("records");
    let markers = high_water_markers(&env.tansu.bootstrap(), Duration::from_secs(20), |m| !m.is_empty())?;
    let m = markers.last().expect("the agent delivered a high_water marker at its stop");
    assert!(m.seq > newest, "marker {} is not above the newest reading {newest}", m.seq);
    assert_eq!((m.node_id.as_ref(), m.source.as_ref()), ("node-hw", "edgeflow-agent"));
    assert_eq!(m.detail, format!("complete through seq {}", m.seq - 1));
    assert!(m.payload.is_empty());
    let log = agent.log_text();
    assert!(log.contains("high_water"), "the stop does not mention its marker:\n{log}");
    Ok(())
}

/// With `high_water_interval = "1s"`, markers arrive every second while the agent runs, idle or
/// not, each above the readings assigned before it; they are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn markers_arrive_on_schedule_while_running() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let extra = "[buffer]\nhigh_water_interval = \"1s\"\n";
    let config = env.write_config("hws", &env.config("node-hws", port, extra))?;
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    let published = publish(&env, 5, 300.0, 3.0, 0.0, 22).await?;
    let acked = published.iter().filter(|p| p.acked).count();
    let got = read_raw(&env.tansu.bootstrap(), acked, Duration::from_secs(60))?;
    assert_eq!(got.len(), acked);
    let newest = got.iter().map(|g| g.seq).max().expect("records");
    // Idle from here on: markers keep coming, the newest above every reading.
    let markers = high_water_markers(&env.tansu.bootstrap(), Duration::from_secs(30), |m| {
        m.iter().filter(|d| d.seq > newest).count() >= 2
    })?;
    assert!(markers.len() >= 4, "{} markers", markers.len());
    assert!(markers.windows(2).all(|w| w[0].seq < w[1].seq), "markers arrive in seq order");
    assert!(markers.iter().filter(|m| m.seq > newest).count() >= 2, "idle: no marker after the readings");
    // Some readings fall between two markers: they are written while records flow.
    assert!(got.iter().any(|g| g.seq < markers.last().expect("some").seq && g.seq > markers[0].seq));
    let gaps: Vec<i64> = markers.windows(2).map(|w| w[1].received_at_ms - w[0].received_at_ms).collect();
    assert!(gaps.iter().all(|&g| (700..5_000).contains(&g)), "about one a second: {gaps:?}");
    let counted = agent.metric("edgeflow_agent_high_water_markers_total");
    assert!(counted >= markers.len() as f64, "{counted} counted, {} delivered", markers.len());
    Ok(())
}

/// The tail story: a node whose Kafka goes away and which then dies keeps, in raw-data-dlq, a
/// newest marker written before the cut: everything below it arrived (complete through M-1 at
/// T, T before the cut), while the readings it took during the cut are not covered by it. Once
/// it is back, a newer marker covers them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_newest_delivered_marker_proves_the_tail_and_stops_when_the_node_does() -> anyhow::Result<()> {
    let env = Env::start(true).await?;
    let proxy = env.proxy.as_ref().expect("proxy");
    let port = free_port();
    let extra = "[buffer]\nhigh_water_interval = \"1s\"\n";
    let config = env.write_config("tail", &env.config("node-tail", port, extra))?;
    let mut agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    let bootstrap = env.tansu.bootstrap();

    let before = publish(&env, 5, 300.0, 2.0, 0.0, 31).await?;
    let before: Vec<&Published> = before.iter().filter(|p| p.acked).collect();
    let got = read_raw(&bootstrap, before.len(), Duration::from_secs(60))?;
    let newest_before = got.iter().map(|g| g.seq).max().expect("records");
    high_water_markers(&bootstrap, Duration::from_secs(30), |m| m.iter().any(|d| d.seq > newest_before))?;

    proxy.cut();
    let cut_ms = chrono::Utc::now().timestamp_millis();
    let during = publish(&env, 5, 300.0, 2.0, 0.0, 32).await?;
    let during: Vec<&Published> = during.iter().filter(|p| p.acked).collect();
    let n = (before.len() + during.len()) as f64;
    agent.wait_metric("edgeflow_agent_records_committed_total", Duration::from_secs(30), |v| v >= n)?;
    // Markers keep being written into the buffer meanwhile; they cannot leave.
    let written = agent.metric("edgeflow_agent_high_water_markers_total");
    agent.wait_metric("edgeflow_agent_high_water_markers_total", Duration::from_secs(10), |v| v >= written + 2.0)?;
    agent.kill9();
    proxy.heal();

    // What Kafka has from the dead node: the readings before the cut, and a newest marker
    // written before it, below which nothing is missing.
    let got = read_raw(&bootstrap, before.len(), Duration::from_secs(60))?;
    assert_eq!(got.len(), before.len(), "nothing taken during the cut left the buffer");
    let dlq = dead_letters(&bootstrap, Duration::from_secs(10), |all| {
        all.iter().any(|d| is_high_water(d) && d.seq > newest_before)
    })?;
    let newest = dlq.iter().filter(|d| is_high_water(d)).max_by_key(|d| d.seq).expect("a marker");
    assert!(newest.seq > newest_before && newest.received_at_ms < cut_ms, "{newest:?} (cut at {cut_ms})");
    assert_eq!(missing_below(newest.seq, &got, &dlq), Vec::<u64>::new(), "complete through {}", newest.seq - 1);

    // Back: the buffered readings and markers go out, and a newer marker covers them.
    let agent = start_agent(&config, port)?;
    let all: Vec<&Published> = before.iter().chain(&during).copied().collect();
    let got = read_raw(&bootstrap, all.len(), Duration::from_secs(60))?;
    assert_eq!(check_complete(&all, &got), 0);
    let newest_reading = got.iter().map(|g| g.seq).max().expect("records");
    let dlq = dead_letters(&bootstrap, Duration::from_secs(30), |all| {
        all.iter().any(|d| is_high_water(d) && d.seq > newest_reading)
    })?;
    let newest = dlq.iter().filter(|d| is_high_water(d)).max_by_key(|d| d.seq).expect("a marker");
    assert!(newest.seq > newest_reading, "no marker above the readings taken during the cut");
    assert_eq!(missing_below(newest.seq, &got, &dlq), Vec::<u64>::new());
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    Ok(())
}
