//! Stage `ingest`: MQTT (QoS 1, persistent session, manual acks) into the buffer.
//!
//! # Acknowledgements and connection epochs
//!
//! Every PUBLISH becomes an [`Append`] sent to the buffer thread together with an [`AckToken`]
//! (packet id, QoS, connection epoch). The PUBACK is sent by [`Acker::ack`] after the group
//! commit that holds the message — never before.
//!
//! Packet ids are per connection: after a reconnect the broker redelivers unacknowledged
//! messages under the same ids and then reuses ids for new messages. An acknowledgement for a
//! message received on an earlier connection must therefore never be sent on a later one, or it
//! could acknowledge a different, uncommitted message. Each connection gets an *epoch*; the
//! acker sends only tokens of the current epoch, under a lock the poller also takes when it
//! moves to a new epoch, and the poller then purges any acknowledgement that slipped into
//! rumqttc's request queue (`EventLoop::clean`). Tokens of old epochs are dropped: their
//! messages are committed, the broker redelivers them, and the buffer recognises the
//! redelivery.
//!
//! A PUBACK is never dropped. rumqttc's request queue is bounded, and a broker sending a backlog
//! as fast as it can (mosquitto does not always hold itself to our Receive Maximum) fills it
//! with acknowledgements faster than the event loop writes them. What does not fit waits in
//! [`PendingAcks`], in order, and the poller moves it into the request queue between events.
//! A lost PUBACK would not lose data, but the broker would send the message again after the
//! next reconnect, and a reading older than the redelivery horizon would get a second `seq`.
//!
//! The poller is never cancelled mid-`poll` (that could cut an outgoing packet in half);
//! shutdown stops accepting new messages, waits for the buffer to commit what it has, lets the
//! acknowledgements go out, then sends DISCONNECT through the same queue.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub mod client;
pub mod dead_letter;

use edgeflow_contract::{Limits, RawRecord, Reading, RejectReason, Rejection, TimeBounds};
use edgeflow_runtime::CancellationToken;
use xxhash_rust::xxh3::xxh3_64;

use client::{Client, Event, EventLoop};
pub use client::{Protocol, Qos};

use crate::buffer::{Append, Command, Outcome};
use crate::config::MqttSettings;
use crate::metrics::Metrics;

/// Identifies an MQTT message to acknowledge once committed.
#[derive(Debug, Clone, Copy)]
pub struct AckToken {
    pub pkid: u16,
    pub qos: Qos,
    pub epoch: u64,
}

/// Validation rules applied to each payload.
#[derive(Debug, Clone)]
pub struct Rules {
    pub limits: Limits,
    pub max_past_ms: Option<i64>,
    pub max_future_ms: Option<i64>,
    /// The topic level naming the device, when readings are bound to their topic.
    pub device_topic_level: Option<usize>,
}

/// Turns one MQTT message into a buffer append: a record if valid, a dead letter otherwise.
/// Pure: the caller passes the time of receipt.
pub fn classify(topic: &str, payload: &[u8], dup: bool, received_ms: i64, node_id: &str, rules: &Rules) -> Append {
    let bounds = TimeBounds { now_ms: received_ms, max_past_ms: rules.max_past_ms, max_future_ms: rules.max_future_ms };
    let payload_hash = xxh3_64(payload);
    let parsed = Reading::parse(payload, &rules.limits, &bounds).and_then(|reading| match rules.device_topic_level {
        Some(level) if topic.split('/').nth(level) != Some(reading.device_id.as_ref()) => Err(Rejection {
            reason: RejectReason::DeviceTopicMismatch,
            detail: format!("device_id is not the device named by level {level} of the topic"),
        }),
        _ => Ok(reading),
    });
    match parsed {
        Ok(reading) => {
            let mut natural = Vec::with_capacity(reading.device_id.len() + reading.timestamp.len() + 1);
            natural.extend_from_slice(reading.device_id.as_bytes());
            natural.push(0);
            natural.extend_from_slice(reading.timestamp.as_bytes());
            let mut json = Vec::with_capacity(payload.len() + node_id.len() + 48);
            RawRecord::write_json_head(&reading, node_id, &mut json);
            Append::Record {
                natural_hash: xxh3_64(&natural),
                payload_hash,
                device_id: reading.device_id.as_bytes().to_vec(),
                json_head: json,
                received_ms,
            }
        }
        Err(rejection) => {
            // Domain-separated from record keys: a dead letter's identity is its topic and bytes.
            let mut natural = Vec::with_capacity(topic.len() + 10);
            natural.extend_from_slice(b"\xffdlq\0");
            natural.extend_from_slice(topic.as_bytes());
            natural.extend_from_slice(&payload_hash.to_le_bytes());
            Append::DeadLetter {
                natural_hash: xxh3_64(&natural),
                payload_hash,
                check_duplicate: dup,
                draft: dead_letter::draft(topic, payload, rejection, rules.limits.max_payload_bytes),
                received_ms,
            }
        }
    }
}

/// MQTT connection state, shared with the status endpoint.
#[derive(Debug, Default)]
pub struct IngestStatus {
    pub connected: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl IngestStatus {
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = e;
    }
}

/// Sends PUBACKs for committed messages of the current connection epoch.
#[derive(Clone)]
pub struct Acker {
    client: Client,
    epoch: Arc<Mutex<u64>>,
    pending: Arc<PendingAcks>,
}

impl std::fmt::Debug for Acker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Acker").finish_non_exhaustive()
    }
}

impl Acker {
    /// Acknowledges committed messages (called on the buffer thread after each commit).
    pub fn ack(&self, committed: Vec<(AckToken, Outcome)>) {
        let epoch = self.epoch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let tokens = committed.into_iter().map(|(t, _)| t).filter(|t| t.epoch == *epoch && t.qos != Qos::AtMostOnce);
        self.pending.send(&self.client, tokens);
    }
}

/// PUBACKs that did not fit into rumqttc's request queue yet, oldest first.
#[derive(Debug, Default)]
pub struct PendingAcks {
    queue: Mutex<VecDeque<AckToken>>,
    /// The queue's length, so the poller skips the lock on every event while nothing waits
    /// (almost always). Written under the lock.
    waiting: AtomicUsize,
}

impl PendingAcks {
    /// Queues a PUBACK for each token in rumqttc's request queue; what does not fit (or would
    /// overtake an earlier one that did not) waits here.
    fn send(&self, client: &Client, tokens: impl Iterator<Item = AckToken>) {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for token in tokens {
            if !queue.is_empty() || client.try_ack(token.pkid, token.qos).is_err() {
                queue.push_back(token);
            }
        }
        self.waiting.store(queue.len(), Ordering::Release);
    }

    /// Moves waiting PUBACKs of `epoch` into rumqttc's request queue while it has room; drops
    /// those of earlier connections. If it is full, rumqttc's event loop has requests to write
    /// and returns to the poller soon, which calls this again.
    fn flush(&self, client: &Client, epoch: u64) {
        if self.len() == 0 {
            return;
        }
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        while let Some(token) = queue.front() {
            if token.epoch == epoch && client.try_ack(token.pkid, token.qos).is_err() {
                break;
            }
            queue.pop_front();
        }
        self.waiting.store(queue.len(), Ordering::Release);
    }

    /// Forgets every waiting PUBACK (the connection they belong to is gone).
    fn clear(&self) {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clear();
        self.waiting.store(0, Ordering::Release);
    }

    fn len(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

/// A configured MQTT session, not yet running.
pub struct Session {
    client: Client,
    eventloop: EventLoop,
    epoch: Arc<Mutex<u64>>,
    pending: Arc<PendingAcks>,
    topics: Vec<String>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("topics", &self.topics).finish_non_exhaustive()
    }
}

impl Session {
    /// Builds the client. No connection is attempted until [`run`] polls it.
    pub fn new(settings: &MqttSettings) -> Self {
        let (client, eventloop) = client::new(settings);
        Session {
            client,
            eventloop,
            epoch: Arc::new(Mutex::new(0)),
            pending: Arc::default(),
            topics: settings.topics.clone(),
        }
    }

    /// The acknowledger for the buffer thread.
    pub fn acker(&self) -> Acker {
        Acker { client: self.client.clone(), epoch: self.epoch.clone(), pending: self.pending.clone() }
    }
}

/// Everything [`run`] needs besides the session.
#[derive(Debug)]
pub struct Ingest {
    pub node_id: String,
    pub rules: Rules,
    pub buffer: flume::Sender<Command<AckToken>>,
    pub metrics: Metrics,
    pub status: Arc<IngestStatus>,
    pub reconnect_max: Duration,
}

/// Polls the MQTT session until `shutdown`, then drains and disconnects (within `drain_timeout`).
pub async fn run(session: Session, ingest: Ingest, shutdown: CancellationToken, drain_timeout: Duration) {
    let Session { client, mut eventloop, epoch, pending, topics } = session;
    let accepting = Arc::new(AtomicBool::new(true));
    let finished = CancellationToken::new();

    // On shutdown: stop accepting, wait until the buffer has committed (and so acknowledged)
    // everything accepted, then disconnect through the request queue, behind the PUBACKs.
    let drainer = {
        let (accepting, client, buffer, finished, pending) =
            (accepting.clone(), client.clone(), ingest.buffer.clone(), finished.clone(), pending.clone());
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            accepting.store(false, Ordering::SeqCst);
            let deadline = tokio::time::Instant::now() + drain_timeout;
            let (tx, rx) = tokio::sync::oneshot::channel();
            if buffer.send_async(Command::Barrier(tx)).await.is_ok() {
                let _ = tokio::time::timeout_at(deadline, rx).await;
            }
            // The DISCONNECT goes behind every PUBACK: wait for those still waiting to be
            // queued, and for room in the request queue.
            while (pending.len() > 0 || client.try_disconnect().is_err()) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            // If the broker is unreachable, the poller would never see the DISCONNECT go out.
            tokio::time::sleep(Duration::from_secs(2)).await;
            finished.cancel();
        })
    };

    let mut backoff = Duration::from_millis(200);
    let mut current_epoch = 0u64;
    let mut ever_connected = false;
    loop {
        pending.flush(&client, current_epoch);
        let event = tokio::select! {
            // Only after the drain: the DISCONNECT is then out or the broker is gone.
            _ = finished.cancelled() => break,
            event = eventloop.poll() => event,
        };
        match event {
            Ok(Event::Publish { topic, payload, pkid, qos, dup }) => {
                ingest.metrics.mqtt_messages_received.inc();
                if !accepting.load(Ordering::SeqCst) {
                    // Not acknowledged: the broker redelivers it after restart.
                    continue;
                }
                let received_ms = crate::buffer::now_ms();
                let topic = String::from_utf8_lossy(&topic);
                let append = classify(&topic, &payload, dup, received_ms, &ingest.node_id, &ingest.rules);
                if let Append::DeadLetter { draft, .. } = &append {
                    ingest.metrics.rejected(&draft.reason);
                    if draft.truncated {
                        ingest.metrics.dead_letters_truncated.inc();
                    }
                }
                let token = AckToken { pkid, qos, epoch: current_epoch };
                if ingest.buffer.send_async(Command::Append(append, token)).await.is_err() {
                    tracing::warn!("buffer thread is gone; stopping ingest");
                    break;
                }
            }
            Ok(Event::ConnAck { accepted, code, session_present }) => {
                if !accepted {
                    tracing::error!(code, "MQTT broker refused the connection; check credentials and client id");
                    continue;
                }
                backoff = Duration::from_millis(200);
                ingest.status.connected.store(true, Ordering::Relaxed);
                ingest.status.set_error(None);
                ingest.metrics.mqtt_connected.set(1);
                if ever_connected && !session_present {
                    tracing::warn!(
                        "MQTT broker did not keep our session; messages queued for us while disconnected may be lost at the broker (check its persistence and session expiry)"
                    );
                } else {
                    tracing::info!(session_present, "connected to the MQTT broker");
                }
                ever_connected = true;
                if let Err(error) = client.try_subscribe(&topics) {
                    tracing::error!(%error, "could not queue the subscription");
                }
            }
            Ok(Event::SubAck) => tracing::debug!("subscribed"),
            Ok(Event::BrokerDisconnect(reason)) => tracing::warn!(reason, "MQTT broker sent DISCONNECT"),
            Ok(Event::Disconnected) => {
                tracing::info!("disconnected from the MQTT broker");
                break;
            }
            Ok(Event::Other) => {}
            Err(error) => {
                // rumqttc has already dropped the connection. Move to a new epoch and purge any
                // acknowledgement of the old connection still queued.
                {
                    let mut e = epoch.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    *e += 1;
                    current_epoch = *e;
                    eventloop.clean();
                    pending.clear();
                }
                let was_connected = ingest.status.connected.swap(false, Ordering::Relaxed);
                ingest.metrics.mqtt_connected.set(0);
                ingest.metrics.mqtt_connection_errors.inc();
                ingest.status.set_error(Some(error.to_string()));
                if !accepting.load(Ordering::SeqCst) {
                    break;
                }
                if let client::PollError::PacketTooLarge { size, max } = error {
                    tracing::error!(
                        size,
                        max,
                        "the MQTT broker sent a packet larger than mqtt.max_packet_size; it will send it again on every reconnect: set mqtt.max_packet_size to at least the broker's message_size_limit (the default takes any MQTT packet)"
                    );
                } else if was_connected {
                    tracing::warn!(%error, "lost the MQTT connection; reconnecting");
                } else {
                    tracing::warn!(%error, retry_in = ?backoff, "cannot connect to the MQTT broker");
                }
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = finished.cancelled() => break,
                }
                backoff = (backoff * 2).min(ingest.reconnect_max);
            }
        }
    }
    ingest.status.connected.store(false, Ordering::Relaxed);
    ingest.metrics.mqtt_connected.set(0);
    drainer.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            limits: Limits::default(),
            max_past_ms: Some(86_400_000),
            max_future_ms: Some(60_000),
            device_topic_level: None,
        }
    }

    const NOW: i64 = 1_735_207_200_000;

    #[test]
    fn valid_payload_becomes_a_record_keyed_by_device() {
        let payload = br#"{"device_id": "device123", "timestamp": "2024-12-26T10:00:00Z", "temperature": 72.5, "humidity": 55.2, "status": "OK"}"#;
        let a = classify("devices/device123/telemetry", payload, false, NOW, "pve-1", &rules());
        let Append::Record { device_id, json_head, natural_hash, received_ms, .. } = a else {
            panic!("expected a record")
        };
        assert_eq!(device_id, b"device123");
        assert_eq!(received_ms, NOW);
        let mut json = json_head;
        RawRecord::finish_json(None, 9, &mut json);
        let r = RawRecord::parse(&json, &Limits::default()).expect("valid raw record");
        assert_eq!((r.provenance.node_id.as_ref(), r.provenance.seq, r.reading.temperature), ("pve-1", 9, 72.5));
        // The natural key ignores formatting: the same reading re-serialised has the same key.
        let again = br#"{"status":"OK","humidity":55.2,"temperature":72.5,"timestamp":"2024-12-26T10:00:00Z","device_id":"device123"}"#;
        let Append::Record { natural_hash: n2, payload_hash: p2, .. } =
            classify("devices/device123/telemetry", again, false, NOW, "pve-1", &rules())
        else {
            panic!("expected a record")
        };
        assert_eq!(natural_hash, n2);
        assert_ne!(p2, xxh3_64(payload));
    }

    /// Issue 10: with `records.device_topic_level`, a device (a broker login pinned to its own
    /// topic) cannot report readings as another device.
    #[test]
    fn a_reading_can_be_bound_to_the_device_its_topic_names() {
        let payload = br#"{"device_id": "device123", "timestamp": "2024-12-26T10:00:00Z", "temperature": 72.5, "humidity": 55.2, "status": "OK"}"#;
        let bound = Rules { device_topic_level: Some(1), ..rules() };
        assert!(matches!(
            classify("devices/device123/telemetry", payload, false, NOW, "n", &bound),
            Append::Record { .. }
        ));
        for topic in ["devices/device999/telemetry", "devices", "device123/x"] {
            let Append::DeadLetter { draft, .. } = classify(topic, payload, false, NOW, "n", &bound) else {
                panic!("{topic}: expected a dead letter")
            };
            assert_eq!(draft.reason, "device_topic_mismatch", "{topic}");
        }
        // Unset, the topic is not checked.
        assert!(matches!(
            classify("devices/other/telemetry", payload, false, NOW, "n", &rules()),
            Append::Record { .. }
        ));
    }

    /// The largest dead letter any payload and topic can make, with `records.max_payload_bytes`
    /// at its 16 MiB maximum, still fits one Kafka message of the producer's
    /// `message.max.bytes` (librdkafka's default, 1,000,000 bytes): otherwise Kafka refuses it
    /// and the forwarder, sending in `seq` order, is stuck behind it for good.
    #[test]
    fn the_largest_dead_letter_fits_one_kafka_message() {
        let limit = dead_letter::MESSAGE_MAX_BYTES;
        let rules = Rules { limits: Limits { max_payload_bytes: 16 << 20, ..Limits::default() }, ..rules() };
        // Control characters take six bytes each in JSON, in the payload's detail and topic too.
        let topic = "\u{1}".repeat(65_535);
        let node_id = "n".repeat(128);
        for payload in [vec![1u8; 16 << 20], vec![0xff; 16 << 20], vec![b'x'; 64 << 20]] {
            let Append::DeadLetter { draft, .. } = classify(&topic, &payload, false, NOW, &node_id, &rules) else {
                panic!("expected a dead letter")
            };
            let dl = edgeflow_contract::DeadLetter {
                node_id: node_id.as_str().into(),
                epoch: None,
                seq: u64::MAX,
                reason: draft.reason.as_str().into(),
                detail: draft.detail.as_str().into(),
                source: draft.source.as_str().into(),
                received_at_ms: i64::MIN,
                payload_size: draft.payload_size,
                truncated: draft.truncated,
                payload: draft.payload.clone(),
            };
            let value = dl.to_json().len();
            assert!(value <= dead_letter::DEAD_LETTER_MAX_BYTES, "{value} bytes over the dead-letter bound");
            let size = value + node_id.len();
            assert!(size <= limit, "a {}-byte dead letter ({}) exceeds {limit}", size, draft.reason);
            assert!(draft.truncated && draft.payload_size == payload.len() as u64);
            assert!(payload.starts_with(&draft.payload), "the copy is a prefix");
        }
    }

    #[test]
    fn hostile_payloads_become_dead_letters_with_reason() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"not json".to_vec(), "bad_json"),
            (vec![0xff, 0xfe, 0x00], "not_utf8"),
            (br#"{"device_id":"d","timestamp":"2024-12-26T10:00:00Z","temperature":"hot","humidity":1,"status":"OK"}"#.to_vec(), "wrong_type"),
            (br#"{"device_id":"d","timestamp":"1999-12-26T10:00:00Z","temperature":1,"humidity":1,"status":"OK"}"#.to_vec(), "timestamp_out_of_range"),
            (br#"{"device_id":"d","timestamp":"2030-12-26T10:00:00Z","temperature":1,"humidity":1,"status":"OK"}"#.to_vec(), "timestamp_out_of_range"),
            (vec![b'x'; 100_000], "oversized"),
        ];
        for (payload, reason) in cases {
            let a = classify("devices/d/telemetry", &payload, true, NOW, "pve-1", &rules());
            let Append::DeadLetter { draft, check_duplicate, .. } = a else {
                panic!("expected a dead letter for {reason}")
            };
            assert_eq!(draft.reason, reason);
            assert!(check_duplicate, "a DUP redelivery is checked against the horizon");
            assert_eq!(draft.payload_size, payload.len() as u64);
            assert_eq!(draft.truncated, payload.len() > Limits::default().max_payload_bytes);
            assert!(draft.payload.len() <= Limits::default().max_payload_bytes);
            assert_eq!(draft.source, "devices/d/telemetry");
        }
    }
}
