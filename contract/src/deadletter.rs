//! The `raw-data-dlq` message value: a payload the agent refused, kept with its reason.
//!
//! A refused payload is acknowledged to the device's broker (so it cannot block the stream),
//! takes a `seq` like any record, and travels to the dead-letter topic as a JSON envelope.
//! The payload is carried base64-encoded because it may not be UTF-8; payloads beyond the
//! agent's bound are truncated (`truncated: true`, `payload_size` keeps the original length).
//!
//! Besides refused payloads the agent writes *markers* on this topic, with `reason` naming the
//! marker ([`MarkerKind`]): they explain a `seq` that carries no reading, so the completeness
//! check can account for every `seq` an agent assigned.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A dead letter as it travels on `raw-data-dlq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter<'a> {
    /// The agent's node identity.
    #[serde(borrow)]
    pub node_id: Cow<'a, str>,
    /// The agent run that wrote it (see [`crate::record`]); absent from older agents.
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<Cow<'a, str>>,
    /// The `seq` this dead letter took in the node's sequence.
    pub seq: u64,
    /// A [`crate::RejectReason`] name, or a [`MarkerKind`] name.
    #[serde(borrow)]
    pub reason: Cow<'a, str>,
    /// A short human explanation (never secret, never the payload).
    #[serde(borrow)]
    pub detail: Cow<'a, str>,
    /// Where the payload came from (the MQTT topic).
    #[serde(borrow)]
    pub source: Cow<'a, str>,
    /// When the agent received it, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Length of the original payload in bytes.
    pub payload_size: u64,
    /// Whether `payload` was cut to the agent's bound.
    pub truncated: bool,
    /// The payload bytes (base64 in JSON).
    #[serde(serialize_with = "b64_ser", deserialize_with = "b64_de")]
    pub payload: Vec<u8>,
}

/// Dead-letter entries that are not refused payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MarkerKind {
    /// The agent created a new buffer (first start, or its data was lost). Its `seq` starts a
    /// new range; a gap just before it is not a loss the pipeline could have prevented.
    BufferCreated,
    /// A durable high-water mark, written on a schedule and at shutdown: every `seq` of this
    /// buffer below the marker's own was assigned before it, so once the marker is in S3 the
    /// node is provably complete up to `seq - 1` at `received_at_ms` (when it was written), and
    /// anything of that range not in S3 is missing — including the newest records of a node
    /// that stopped.
    HighWater,
}

impl MarkerKind {
    /// Every marker kind.
    pub const ALL: [MarkerKind; 2] = [Self::BufferCreated, Self::HighWater];

    /// The `reason` string of the marker.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::BufferCreated => "buffer_created",
            Self::HighWater => "high_water",
        }
    }

    /// Inverse of [`MarkerKind::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == name)
    }
}

impl DeadLetter<'_> {
    /// The JSON encoding.
    pub fn to_json(&self) -> Vec<u8> {
        // Strings, integers and a byte vector serialise into memory infallibly.
        serde_json::to_vec(self).expect("serialising a DeadLetter into memory is infallible")
    }

    /// Whether this entry is a marker rather than a refused payload.
    pub fn marker(&self) -> Option<MarkerKind> {
        MarkerKind::from_name(&self.reason)
    }
}

impl<'a> DeadLetter<'a> {
    /// Copies borrowed strings so the dead letter outlives the value it was parsed from.
    pub fn into_owned(self) -> DeadLetter<'static> {
        DeadLetter {
            node_id: Cow::Owned(self.node_id.into_owned()),
            epoch: self.epoch.map(|e| Cow::Owned(e.into_owned())),
            seq: self.seq,
            reason: Cow::Owned(self.reason.into_owned()),
            detail: Cow::Owned(self.detail.into_owned()),
            source: Cow::Owned(self.source.into_owned()),
            received_at_ms: self.received_at_ms,
            payload_size: self.payload_size,
            truncated: self.truncated,
            payload: self.payload,
        }
    }

    /// Parses a `raw-data-dlq` value.
    pub fn parse(value: &'a [u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(value)
    }
}

fn b64_ser<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&STANDARD.encode(bytes))
}

fn b64_de<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = Cow::<'de, str>::deserialize(d)?;
    STANDARD.decode(text.as_bytes()).map_err(serde::de::Error::custom)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binary_payload_round_trips() {
        let dl = DeadLetter {
            node_id: "pve-1".into(),
            epoch: Some("9f3c0a6e51d2b874".into()),
            seq: 7,
            reason: "not_utf8".into(),
            detail: "invalid UTF-8 at byte 1".into(),
            source: "devices/d1/telemetry".into(),
            received_at_ms: 1_735_207_200_000,
            payload_size: 3,
            truncated: false,
            payload: vec![b'{', 0xff, 0x00],
        };
        let json = dl.to_json();
        let text = std::str::from_utf8(&json).expect("envelope is UTF-8");
        assert!(text.contains(r#""payload":"e/8A""#), "{text}");
        assert_eq!(DeadLetter::parse(&json).expect("parses"), dl);
        assert_eq!(dl.marker(), None);
    }

    #[test]
    fn markers_are_recognised() {
        assert_eq!(MarkerKind::from_name(MarkerKind::BufferCreated.as_str()), Some(MarkerKind::BufferCreated));
        assert_eq!(MarkerKind::from_name("bad_json"), None);
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Whatever a writer of raw-data-dlq sends, parsing never panics.
            #[test]
            fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = DeadLetter::parse(&bytes);
            }

            /// Every envelope round-trips, whatever its strings and payload.
            #[test]
            fn envelopes_round_trip(node in ".{0,40}", reason in ".{0,20}", seq in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..64)) {
                let dl = DeadLetter {
                    node_id: node.into(), epoch: None, seq, reason: reason.into(), detail: "d".into(), source: "s".into(),
                    received_at_ms: 1, payload_size: payload.len() as u64, truncated: false, payload,
                };
                let json = dl.to_json();
                prop_assert_eq!(DeadLetter::parse(&json).expect("parses"), dl);
            }
        }
    }
}
