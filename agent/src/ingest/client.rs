//! One interface over rumqttc's MQTT 5 and MQTT 3.1.1 clients.
//!
//! The ingest logic (epochs, acks after commit, classification) is the same for both
//! protocols; only the packet types differ. MQTT 5 is the default: it lets the agent ask the
//! broker for a large in-flight window (Receive Maximum) and a session that outlives a
//! disconnect (Session Expiry). With 3.1.1 the window is the broker's setting (mosquitto:
//! `max_inflight_messages`) and the session is kept by `clean_session = false`.

use bytes::Bytes;

use crate::config::MqttSettings;

/// MQTT protocol version spoken to the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum Protocol {
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

/// Quality of service of a received message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qos {
    AtMostOnce,
    AtLeastOnce,
    ExactlyOnce,
}

/// A protocol-independent event of the session.
#[derive(Debug)]
pub enum Event {
    Publish {
        topic: Bytes,
        payload: Bytes,
        pkid: u16,
        qos: Qos,
        dup: bool,
    },
    ConnAck {
        accepted: bool,
        code: String,
        session_present: bool,
    },
    SubAck,
    /// The broker sent DISCONNECT (MQTT 5) with this reason.
    BrokerDisconnect(String),
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

/// Why polling the session failed. rumqttc has dropped the connection either way; the next
/// poll reconnects.
#[derive(Debug, thiserror::Error)]
pub enum PollError {
    /// The broker sent a packet over `mqtt.max_packet_size`. rumqttc refuses it before reading
    /// it, so it cannot be dead-lettered, and the broker sends it again after the reconnect.
    #[error("the broker sent a packet of {size} bytes, more than mqtt.max_packet_size ({max} bytes)")]
    PacketTooLarge { size: usize, max: u64 },
    /// Any other connection or protocol failure.
    #[error("{0}")]
    Connection(String),
}

impl From<rumqttc::v5::ConnectionError> for PollError {
    fn from(e: rumqttc::v5::ConnectionError) -> Self {
        use rumqttc::v5::mqttbytes::Error as E;
        use rumqttc::v5::{ConnectionError as C, StateError as S};
        match e {
            C::MqttState(S::Deserialization(E::PayloadSizeLimitExceeded { pkt_size, max })) => {
                PollError::PacketTooLarge { size: pkt_size, max: u64::from(max) }
            }
            C::MqttState(S::IncomingPacketTooLarge { pkt_size, max }) => {
                PollError::PacketTooLarge { size: pkt_size, max: max as u64 }
            }
            other => PollError::Connection(other.to_string()),
        }
    }
}

impl PollError {
    fn v4(e: rumqttc::ConnectionError, max: usize) -> Self {
        use rumqttc::{ConnectionError as C, Error as E, StateError as S};
        match e {
            C::MqttState(S::Deserialization(E::PayloadSizeLimitExceeded(size))) => {
                PollError::PacketTooLarge { size, max: max as u64 }
            }
            other => PollError::Connection(other.to_string()),
        }
    }
}

/// The client half: queues requests to the event loop.
#[derive(Clone, Debug)]
pub enum Client {
    V5(rumqttc::v5::AsyncClient),
    V311(rumqttc::AsyncClient),
}

/// The event-loop half: owns the connection.
#[allow(missing_debug_implementations)] // rumqttc's event loops are not Debug
pub enum EventLoop {
    V5(Box<rumqttc::v5::EventLoop>),
    /// With its incoming packet limit, for [`PollError::PacketTooLarge`].
    V311(Box<rumqttc::EventLoop>, usize),
}

/// Builds a client and its event loop. No connection is attempted until the loop is polled.
pub fn new(s: &MqttSettings) -> (Client, EventLoop) {
    // Room for one PUBACK per message the broker may have in flight, plus control packets, so
    // queuing an acknowledgement never waits on the poller.
    let capacity = usize::from(s.receive_maximum) * 2 + 64;
    let tls = s.tls.clone().map(rumqttc::Transport::tls_with_config);
    match s.protocol {
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
            o.set_keep_alive(s.keep_alive)
                .set_clean_start(false)
                .set_session_expiry_interval(Some(s.session_expiry_secs))
                .set_receive_maximum(Some(s.receive_maximum))
                // Advertised as Maximum Packet Size: the broker silently drops anything larger,
                // so this is what the broker itself accepts (default MQTT's maximum, see
                // config); an oversized payload then reaches us and becomes a dead letter.
                .set_max_packet_size(Some(s.max_packet_size))
                .set_manual_acks(true)
                .set_connection_timeout(s.connect_timeout_secs);
            if let Some(user) = &s.username {
                o.set_credentials(user.clone(), s.password.as_ref().map(|p| p.expose().to_owned()).unwrap_or_default());
            }
            if let Some(t) = tls {
                o.set_transport(t);
            }
            let (c, l) = rumqttc::v5::AsyncClient::new(o, capacity);
            (Client::V5(c), EventLoop::V5(Box::new(l)))
        }
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(s.client_id.clone(), s.host.clone(), s.port);
            o.set_keep_alive(s.keep_alive)
                .set_clean_session(false)
                // Incoming: what the broker may send (default MQTT's maximum, see config).
                .set_max_packet_size(s.max_packet_size as usize, 64 * 1024)
                .set_manual_acks(true);
            if let Some(user) = &s.username {
                o.set_credentials(user.clone(), s.password.as_ref().map(|p| p.expose().to_owned()).unwrap_or_default());
            }
            if let Some(t) = tls {
                o.set_transport(t);
            }
            let (c, mut l) = rumqttc::AsyncClient::new(o, capacity);
            let mut net = rumqttc::NetworkOptions::new();
            net.set_connection_timeout(s.connect_timeout_secs);
            l.set_network_options(net);
            (Client::V311(c), EventLoop::V311(Box::new(l), s.max_packet_size as usize))
        }
    }
}

impl Client {
    /// Queues a PUBACK (QoS 1) for packet `pkid`.
    pub fn try_ack(&self, pkid: u16, qos: Qos) -> Result<(), String> {
        match self {
            Client::V5(c) => {
                let mut p = rumqttc::v5::mqttbytes::v5::Publish::new("", v5_qos(qos), Vec::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
            Client::V311(c) => {
                let mut p = rumqttc::Publish::new("", v4_qos(qos), Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).map_err(|e| e.to_string())
            }
        }
    }

    /// Queues a SUBSCRIBE (QoS 1) to `topics`.
    pub fn try_subscribe(&self, topics: &[String]) -> Result<(), String> {
        match self {
            Client::V5(c) => c
                .try_subscribe_many(topics.iter().map(|t| {
                    rumqttc::v5::mqttbytes::v5::Filter::new(t.clone(), rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                }))
                .map_err(|e| e.to_string()),
            Client::V311(c) => c
                .try_subscribe_many(
                    topics.iter().map(|t| rumqttc::SubscribeFilter::new(t.clone(), rumqttc::QoS::AtLeastOnce)),
                )
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT behind everything already queued.
    pub fn try_disconnect(&self) -> Result<(), String> {
        match self {
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V311(c) => c.try_disconnect().map_err(|e| e.to_string()),
        }
    }
}

impl EventLoop {
    /// The next event; reconnects when polled after an error. Must not be cancelled mid-way
    /// while connected (a write could be cut in half).
    pub async fn poll(&mut self) -> Result<Event, PollError> {
        use rumqttc::v5::mqttbytes::v5::{ConnectReturnCode as C5, Packet as P5};
        use rumqttc::{ConnectReturnCode as C4, Packet as P4};
        match self {
            EventLoop::V5(l) => match l.poll().await.map_err(PollError::from)? {
                rumqttc::v5::Event::Incoming(P5::Publish(p)) => Ok(Event::Publish {
                    topic: p.topic,
                    payload: p.payload,
                    pkid: p.pkid,
                    qos: from_v5(p.qos),
                    dup: p.dup,
                }),
                rumqttc::v5::Event::Incoming(P5::ConnAck(a)) => Ok(Event::ConnAck {
                    accepted: a.code == C5::Success,
                    code: format!("{:?}", a.code),
                    session_present: a.session_present,
                }),
                rumqttc::v5::Event::Incoming(P5::SubAck(_)) => Ok(Event::SubAck),
                rumqttc::v5::Event::Incoming(P5::Disconnect(d)) => {
                    Ok(Event::BrokerDisconnect(format!("{:?}", d.reason_code)))
                }
                rumqttc::v5::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(Event::Disconnected),
                _ => Ok(Event::Other),
            },
            EventLoop::V311(l, max) => match l.poll().await.map_err(|e| PollError::v4(e, *max))? {
                rumqttc::Event::Incoming(P4::Publish(p)) => Ok(Event::Publish {
                    topic: Bytes::from(p.topic.into_bytes()),
                    payload: p.payload,
                    pkid: p.pkid,
                    qos: from_v4(p.qos),
                    dup: p.dup,
                }),
                rumqttc::Event::Incoming(P4::ConnAck(a)) => Ok(Event::ConnAck {
                    accepted: a.code == C4::Success,
                    code: format!("{:?}", a.code),
                    session_present: a.session_present,
                }),
                rumqttc::Event::Incoming(P4::SubAck(_)) => Ok(Event::SubAck),
                rumqttc::Event::Outgoing(rumqttc::Outgoing::Disconnect) => Ok(Event::Disconnected),
                _ => Ok(Event::Other),
            },
        }
    }

    /// Drops the connection state and any acknowledgement still queued (see `ingest`).
    pub fn clean(&mut self) {
        match self {
            EventLoop::V5(l) => l.clean(),
            EventLoop::V311(l, _) => l.clean(),
        }
    }
}

fn from_v5(q: rumqttc::v5::mqttbytes::QoS) -> Qos {
    match q {
        rumqttc::v5::mqttbytes::QoS::AtMostOnce => Qos::AtMostOnce,
        rumqttc::v5::mqttbytes::QoS::AtLeastOnce => Qos::AtLeastOnce,
        rumqttc::v5::mqttbytes::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

fn from_v4(q: rumqttc::QoS) -> Qos {
    match q {
        rumqttc::QoS::AtMostOnce => Qos::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => Qos::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => Qos::ExactlyOnce,
    }
}

fn v5_qos(q: Qos) -> rumqttc::v5::mqttbytes::QoS {
    match q {
        Qos::AtMostOnce => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        Qos::ExactlyOnce => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

fn v4_qos(q: Qos) -> rumqttc::QoS {
    match q {
        Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
        Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
        Qos::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
    }
}
