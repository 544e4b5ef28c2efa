//! `high_water` markers against real mosquitto and tansu: written on a schedule and at a clean
//! stop, forwarded to raw-data-dlq in `seq` order, each above every `seq` assigned before it.

mod common;

use std::time::Duration;

use common::*;
use edgeflow_contract::{DeadLetter, MarkerKind};
use edgeflow_testkit::free_port;

/// The `high_water` markers in raw-data-dlq, once `done` says enough arrived (or `timeout`).
fn high_water_markers(
    bootstrap: &str,
    timeout: Duration,
    mut done: impl FnMut(&[DeadLetter<'_>]) -> bool,
) -> anyhow::Result<Vec<DeadLetter<'static>>> {
    let parse = |msgs: &[kafka::Consumed]| -> Vec<DeadLetter<'static>> {
        msgs.iter()
            .filter_map(|m| DeadLetter::parse(&m.value).ok())
            .filter(|d| d.marker() == Some(MarkerKind::HighWater))
            .map(|d| DeadLetter {
                node_id: d.node_id.into_owned().into(),
                seq: d.seq,
                reason: d.reason.into_owned().into(),
                detail: d.detail.into_owned().into(),
                source: d.source.into_owned().into(),
                received_at_ms: d.received_at_ms,
                payload_size: d.payload_size,
                truncated: d.truncated,
                payload: d.payload,
            })
            .collect()
    };
    let msgs = kafka::consume_until(bootstrap, DLQ, timeout, |msgs| done(&parse(msgs)))?;
    Ok(parse(&msgs))
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
