//! `edgeflow-agent simulate`: devices publishing the reference JSON over MQTT.
//!
//! Each device publishes QoS 1 to `<prefix>/<device>/telemetry` at an even share of the total
//! rate. Timestamps carry microseconds so every reading of a device is distinct. With
//! `--bad-fraction F`, a fraction F of messages is bad: half of them *anomalies* (valid records
//! the aggregator filters out: status not OK, or temperature above 100) and half *malformed*
//! payloads the agent must dead-letter (bad JSON, wrong types, NaN, missing fields, non-UTF-8,
//! oversized, timestamps far in the past or future).
//!
//! `--log FILE` writes one JSON line per message (device, class, payload, acknowledged) so a
//! test can compare what was published and acknowledged with what reached the end.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use edgeflow_runtime::CancellationToken;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde::Serialize;

/// What kind of message the simulator sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Class {
    Valid,
    Anomaly,
    Malformed,
}

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct Simulation {
    pub mqtt_host: String,
    pub mqtt_port: u16,
    pub devices: u32,
    /// Messages per second, all devices together.
    pub rate: f64,
    pub duration: Duration,
    pub bad_fraction: f64,
    pub topic_prefix: String,
    /// Device names are `<device_prefix>NNNNN`.
    pub device_prefix: String,
    pub seed: u64,
    /// Added to the wall clock for the readings' timestamps (negative: in the past). Lets a run
    /// place its readings in an hour that has already ended, or across an hour boundary.
    pub clock_offset: chrono::Duration,
    pub log: Option<PathBuf>,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

/// What the simulator did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub published: u64,
    pub acknowledged: u64,
    pub valid: u64,
    pub anomalies: u64,
    pub malformed: u64,
}

/// One line of the simulator's `--log`: a message and whether the broker acknowledged it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LogEntry {
    /// Position in publishing order.
    pub n: u64,
    pub device: String,
    pub class: Class,
    /// The payload as text (lossy for non-UTF-8 payloads).
    pub payload: String,
    /// The exact payload bytes, base64.
    pub payload_base64: String,
    /// Whether the broker acknowledged the PUBLISH (QoS 1).
    pub acked: bool,
}

impl LogEntry {
    /// The exact payload bytes.
    pub fn bytes(&self) -> Vec<u8> {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD
            .decode(&self.payload_base64)
            .unwrap_or_else(|_| self.payload.as_bytes().to_vec())
    }

    /// `(device_id, timestamp)` of a reading (valid or anomaly); `None` for malformed payloads.
    pub fn natural_key(&self) -> Option<(String, String)> {
        let v: serde_json::Value = serde_json::from_str(&self.payload).ok()?;
        Some((v.get("device_id")?.as_str()?.to_owned(), v.get("timestamp")?.as_str()?.to_owned()))
    }

    /// Reads a log file.
    pub fn read_all(path: &std::path::Path) -> anyhow::Result<Vec<LogEntry>> {
        use anyhow::Context as _;
        std::fs::read_to_string(path)?.lines().map(|l| serde_json::from_str(l).context("simulator log line")).collect()
    }
}

/// Builds one message. Pure apart from the random generator.
pub fn message(
    rng: &mut fastrand::Rng,
    device: &str,
    now: chrono::DateTime<chrono::Utc>,
    bad_fraction: f64,
    n: u64,
) -> (Class, Vec<u8>) {
    let ts = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let temperature = (60.0 + rng.f64() * 30.0 * 100.0).round() / 100.0;
    let humidity = (30.0 + rng.f64() * 40.0 * 100.0).round() / 100.0;
    let reading = |t: f64, status: &str| {
        format!(r#"{{"device_id": "{device}", "timestamp": "{ts}", "temperature": {t}, "humidity": {humidity}, "status": "{status}"}}"#)
            .into_bytes()
    };
    if rng.f64() >= bad_fraction {
        return (Class::Valid, reading(temperature, "OK"));
    }
    if rng.bool() {
        return if rng.bool() {
            (Class::Anomaly, reading(temperature, "ERROR"))
        } else {
            (Class::Anomaly, reading(100.5 + rng.f64() * 20.0, "OK"))
        };
    }
    let far_past = (now - chrono::Duration::days(3650)).to_rfc3339();
    let far_future = (now + chrono::Duration::days(3650)).to_rfc3339();
    let bad: Vec<u8> = match rng.u8(0..9) {
        0 => format!("not json {n}").into_bytes(),
        1 => format!(r#"{{"device_id": "{device}", "timestamp": "{ts}", "temperature": "hot", "humidity": 1, "status": "OK", "n": {n}}}"#).into_bytes(),
        2 => format!(r#"{{"device_id": "{device}", "timestamp": "{ts}", "temperature": NaN, "humidity": 1, "status": "OK", "n": {n}}}"#).into_bytes(),
        3 => format!(r#"{{"device_id": "{device}", "timestamp": "{ts}", "n": {n}}}"#).into_bytes(),
        4 => {
            let mut v = format!("{{\"n\": {n}, \"x\": \"").into_bytes();
            v.extend_from_slice(&[0xff, 0xfe, 0xfd]);
            v.extend_from_slice(b"\"}");
            v
        }
        5 => format!(r#"{{"n": {n}, "pad": "{}"}}"#, "x".repeat(64 * 1024)).into_bytes(),
        6 => format!(r#"{{"device_id": "{device}", "timestamp": "{far_past}", "temperature": 1, "humidity": 1, "status": "OK", "n": {n}}}"#).into_bytes(),
        7 => format!(r#"{{"device_id": "{device}", "timestamp": "{far_future}", "temperature": 1, "humidity": 1, "status": "OK", "n": {n}}}"#).into_bytes(),
        _ => format!(r#"{{"device_id": "{device}", "timestamp": "{ts}", "temperature": 1e999, "humidity": 1, "status": "OK", "n": {n}}}"#).into_bytes(),
    };
    (Class::Malformed, bad)
}

/// Runs the simulation until its duration ends or `shutdown`; waits briefly for the last
/// acknowledgements.
pub async fn run(sim: Simulation, shutdown: CancellationToken) -> anyhow::Result<Report> {
    // A client id of its own: two connections with one id take the session from each other,
    // and the broker drops what was in flight on the one it disconnects.
    static INSTANCE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let instance = INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let client_id = format!("edgeflow-simulator-{}-{instance}", std::process::id());
    let mut opts = MqttOptions::new(client_id, sim.mqtt_host.clone(), sim.mqtt_port);
    opts.set_keep_alive(Duration::from_secs(30)).set_clean_start(true).set_max_packet_size(Some(1 << 20));
    let (client, mut eventloop) = AsyncClient::new(opts, 10_000);
    // The event loop runs on its own task: `poll` must not be cancelled mid-write.
    let (events_tx, events) = flume::unbounded();
    let poller = tokio::spawn(async move {
        loop {
            let event = eventloop.poll().await;
            let failed = event.is_err();
            let done = matches!(event, Ok(Event::Outgoing(Outgoing::Disconnect)));
            if events_tx.send(event).is_err() || done {
                return;
            }
            if failed {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    let mut log = match &sim.log {
        Some(p) => Some(std::io::BufWriter::new(std::fs::File::create(p)?)),
        None => None,
    };
    let devices: Vec<String> = (0..sim.devices.max(1)).map(|i| format!("{}{i:05}", sim.device_prefix)).collect();
    let mut rng = fastrand::Rng::with_seed(sim.seed);
    let mut report = Report::default();
    // Outgoing publishes get their packet id in order; PUBACKs come back by packet id.
    let mut sent: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    let mut pending: HashMap<u16, u64> = HashMap::new();
    let mut collided: Option<(u16, u64)> = None;
    let mut acked: Vec<bool> = Vec::new();
    let mut lines: Vec<(String, Class, Vec<u8>)> = Vec::new();

    let start = Instant::now();
    let end = start + sim.duration;
    let per_tick = Duration::from_millis(10);
    let mut next_tick = start;
    let mut budget = 0.0f64;
    let mut last_progress = start;
    let mut connected = false;
    let mut draining_since: Option<Instant> = None;

    loop {
        let now = Instant::now();
        let publishing = now < end && !shutdown.is_cancelled();
        if !publishing && draining_since.is_none() {
            draining_since = Some(now);
        }
        if let Some(t) = draining_since
            && (report.acknowledged >= report.published || t.elapsed() > Duration::from_secs(10))
        {
            break;
        }
        if publishing && connected && now >= next_tick {
            budget += sim.rate * (now - next_tick + per_tick).as_secs_f64().min(1.0);
            next_tick = now + per_tick;
            while budget >= 1.0 {
                budget -= 1.0;
                let n = report.published;
                let device = &devices[(n % devices.len() as u64) as usize];
                let (class, payload) =
                    message(&mut rng, device, chrono::Utc::now() + sim.clock_offset, sim.bad_fraction, n);
                let topic = format!("{}/{device}/telemetry", sim.topic_prefix);
                if client.try_publish(topic, QoS::AtLeastOnce, false, payload.clone()).is_err() {
                    // The request queue is full: we are ahead of the broker; try next tick.
                    budget = 0.0;
                    break;
                }
                match class {
                    Class::Valid => report.valid += 1,
                    Class::Anomaly => report.anomalies += 1,
                    Class::Malformed => report.malformed += 1,
                }
                sent.push_back(n);
                acked.push(false);
                if log.is_some() {
                    lines.push((device.clone(), class, payload));
                }
                report.published += 1;
            }
        }
        if sim.progress && last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            eprintln!(
                "simulate: {:>6.1}s published {} acknowledged {} ({} anomalies, {} malformed)",
                start.elapsed().as_secs_f64(),
                report.published,
                report.acknowledged,
                report.anomalies,
                report.malformed
            );
        }
        let wait =
            if publishing { next_tick.saturating_duration_since(Instant::now()) } else { Duration::from_millis(50) };
        let event = tokio::select! {
            e = events.recv_async() => match e {
                Ok(e) => e,
                Err(_) => break,
            },
            _ = tokio::time::sleep(wait.max(Duration::from_millis(1))) => continue,
        };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => connected = true,
            // rumqttc numbers publishes as it takes them from the request queue. A retransmission
            // after a reconnect repeats a packet id that is still pending. A publish whose packet
            // id is still in flight (the broker acked out of order) is held back with `AwaitAck`
            // and sent — `Publish` with that id — once its predecessor's PUBACK arrives; if the
            // connection drops first, rumqttc forgets it, and it stays unacknowledged here.
            Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                // An occupied entry is a retransmission of a message already attributed.
                if let std::collections::hash_map::Entry::Vacant(slot) = pending.entry(pkid) {
                    if let Some((_, n)) = collided.take_if(|(c, _)| *c == pkid) {
                        slot.insert(n);
                    } else if let Some(n) = sent.pop_front() {
                        slot.insert(n);
                    }
                }
            }
            Ok(Event::Outgoing(Outgoing::AwaitAck(pkid))) => {
                if let Some(n) = sent.pop_front() {
                    collided = Some((pkid, n));
                }
            }
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                if let Some(n) = pending.remove(&ack.pkid) {
                    acked[n as usize] = true;
                    report.acknowledged += 1;
                }
            }
            Ok(_) => {}
            Err(error) => {
                connected = false;
                collided = None;
                tracing::warn!(%error, "simulator lost the MQTT connection; reconnecting");
            }
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_secs(1), poller).await;
    if let Some(w) = log.as_mut() {
        use std::io::Write;
        for (n, (device, class, payload)) in lines.iter().enumerate() {
            let line = LogEntry {
                n: n as u64,
                device: device.clone(),
                class: *class,
                payload: String::from_utf8_lossy(payload).into_owned(),
                payload_base64: base64::Engine::encode(&base64::engine::general_purpose::STANDARD, payload),
                acked: acked[n],
            };
            serde_json::to_writer(&mut *w, &line)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeflow_contract::{Limits, Reading, TimeBounds};

    #[test]
    fn classes_match_what_the_agent_decides() {
        let mut rng = fastrand::Rng::with_seed(7);
        let now = chrono::Utc::now();
        let bounds = TimeBounds {
            now_ms: now.timestamp_millis(),
            max_past_ms: Some(7 * 86_400_000),
            max_future_ms: Some(600_000),
        };
        let mut seen = [0; 3];
        for n in 0..2000 {
            let (class, payload) = message(&mut rng, "dev00001", now, 0.5, n);
            let parsed = Reading::parse(&payload, &Limits::default(), &bounds);
            match class {
                Class::Valid => {
                    let r = parsed.expect("valid is valid");
                    assert!(r.status == "OK" && r.temperature <= 100.0);
                    seen[0] += 1;
                }
                Class::Anomaly => {
                    let r = parsed.expect("an anomaly is a valid record");
                    assert!(r.status != "OK" || r.temperature > 100.0);
                    seen[1] += 1;
                }
                Class::Malformed => {
                    assert!(parsed.is_err(), "{}", String::from_utf8_lossy(&payload));
                    seen[2] += 1;
                }
            }
        }
        assert!(seen.iter().all(|&c| c > 300), "{seen:?}");
    }
}
