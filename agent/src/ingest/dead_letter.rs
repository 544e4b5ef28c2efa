//! The bound on a dead letter: every one fits one Kafka message.
//!
//! The forwarder sends the buffer in `seq` order and deletes an entry only after Kafka took it,
//! so an entry Kafka refuses for its size would be retried forever with every entry behind it
//! stuck. Records are small by construction (their fields are bounded by
//! [`edgeflow_contract::Limits`]); a dead letter carries a copy of an arbitrary payload, its
//! topic and a detail, so each of those is bounded here:
//!
//! * the payload copy keeps at most [`PAYLOAD_COPY_MAX_BYTES`] (and at most
//!   `records.max_payload_bytes`); a cut copy says so (`truncated`), keeps the original length
//!   (`payload_size`), and its `detail` ends with the SHA-256 of the whole payload, so a copy
//!   held elsewhere can be matched;
//! * the source (the MQTT topic) and the detail are cut to [`TEXT_MAX_BYTES`] each.
//!
//! With every field at its bound and escaped at its worst (six bytes per control character),
//! the JSON value stays under [`DEAD_LETTER_MAX_BYTES`], a quarter of the producer's
//! `message.max.bytes` ([`MESSAGE_MAX_BYTES`], which the forwarder sets and `validate` keeps
//! above the bound).

use edgeflow_contract::{DeadLetter, Rejection};
use sha2::{Digest as _, Sha256};

use crate::buffer::DeadLetterDraft;

/// The producer's `message.max.bytes`: the largest Kafka message (key and value) the agent
/// sends. librdkafka's default, set explicitly by the forwarder.
pub const MESSAGE_MAX_BYTES: usize = 1_000_000;

/// The largest dead letter value (its JSON). Well under Kafka's default `max.message.bytes`
/// (1 MiB) so that a DLQ topic at the broker's default takes every dead letter.
pub const DEAD_LETTER_MAX_BYTES: usize = 256 * 1024;

/// The longest source (topic) and detail a dead letter carries.
pub const TEXT_MAX_BYTES: usize = 1024;

/// Room for everything but the payload: `node_id` (<= 128 bytes), `reason`, two numbers, the
/// field names, and source and detail at [`TEXT_MAX_BYTES`] escaped six bytes per byte, plus the
/// truncation note.
const ENVELOPE_MAX_BYTES: usize = 16 * 1024;

/// The longest payload copy: base64 turns 3 bytes into 4.
pub const PAYLOAD_COPY_MAX_BYTES: usize = (DEAD_LETTER_MAX_BYTES - ENVELOPE_MAX_BYTES) / 4 * 3;

/// The draft of the dead letter for a refused `payload` received on `topic`, within the bound.
/// `max_copy` is `records.max_payload_bytes`.
pub fn draft(topic: &str, payload: &[u8], rejection: Rejection, max_copy: usize) -> DeadLetterDraft {
    let keep = payload.len().min(max_copy).min(PAYLOAD_COPY_MAX_BYTES);
    let truncated = keep < payload.len();
    let mut detail = cut(&rejection.detail, TEXT_MAX_BYTES).to_owned();
    if truncated {
        detail.push_str(&truncation_note(keep, payload));
    }
    DeadLetterDraft {
        reason: rejection.reason.as_str().to_owned(),
        detail,
        source: cut(topic, TEXT_MAX_BYTES).to_owned(),
        payload: payload[..keep].to_vec(),
        payload_size: payload.len() as u64,
        truncated,
    }
}

/// Brings a dead letter encoded earlier (by an agent without this bound, still in the buffer)
/// within [`DEAD_LETTER_MAX_BYTES`]. `None` if it already fits or is not a dead letter.
pub fn shrink(value: &[u8]) -> Option<Vec<u8>> {
    if value.len() <= DEAD_LETTER_MAX_BYTES {
        return None;
    }
    let dl = DeadLetter::parse(value).ok()?;
    let keep = dl.payload.len().min(PAYLOAD_COPY_MAX_BYTES);
    let mut detail = cut(&dl.detail, TEXT_MAX_BYTES).to_owned();
    if keep < dl.payload.len() {
        // The hash of the copy the entry held: the original payload is gone by now.
        detail.push_str(&truncation_note(keep, &dl.payload));
    }
    let bounded = DeadLetter {
        node_id: dl.node_id.clone(),
        epoch: dl.epoch.clone(),
        seq: dl.seq,
        reason: dl.reason.clone(),
        detail: detail.into(),
        source: cut(&dl.source, TEXT_MAX_BYTES).into(),
        received_at_ms: dl.received_at_ms,
        payload_size: dl.payload_size,
        truncated: dl.truncated || keep < dl.payload.len(),
        payload: dl.payload[..keep].to_vec(),
    };
    Some(bounded.to_json())
}

fn truncation_note(keep: usize, whole: &[u8]) -> String {
    let hash: String = Sha256::digest(whole).iter().map(|b| format!("{b:02x}")).collect();
    format!("; payload copy cut to its first {keep} of {} bytes; sha256 of the whole: {hash}", whole.len())
}

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_keeps_whole_characters() {
        assert_eq!(cut("héllo", 2), "h");
        assert_eq!(cut("héllo", 3), "hé");
        assert_eq!(cut("abc", 10), "abc");
    }

    #[test]
    fn an_oversized_dead_letter_from_an_older_agent_is_brought_within_the_bound() {
        let big = DeadLetter {
            node_id: "pve-1".into(),
            epoch: None,
            seq: 7,
            reason: "bad_json".into(),
            detail: "x".repeat(10_000).into(),
            source: "devices/d/telemetry".into(),
            received_at_ms: 1,
            payload_size: 3 << 20,
            truncated: false,
            payload: vec![b'{'; 3 << 20],
        };
        let json = big.to_json();
        let shrunk = shrink(&json).expect("too large: shrunk");
        assert!(shrunk.len() <= DEAD_LETTER_MAX_BYTES, "{}", shrunk.len());
        let dl = DeadLetter::parse(&shrunk).expect("a dead letter");
        assert_eq!((dl.seq, dl.payload_size, dl.truncated), (7, 3 << 20, true));
        assert_eq!(dl.payload.len(), PAYLOAD_COPY_MAX_BYTES);
        assert!(dl.detail.contains("sha256"));
        // One that fits is left alone.
        assert_eq!(shrink(&DeadLetter { payload: vec![1; 10], detail: "d".into(), ..big }.to_json()), None);
    }
}
