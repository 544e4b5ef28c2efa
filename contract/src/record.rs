//! The `raw-data` message value: a reading plus its provenance.
//!
//! The agent writes the reading's five original fields exactly as received (strings verbatim,
//! numbers in their shortest round-trip form) and adds `node_id`, `epoch` and `seq`:
//! `{"device_id":"device123","timestamp":"2024-12-26T10:00:00Z","temperature":72.5,
//! "humidity":55.2,"status":"OK","node_id":"pve-1","epoch":"9f3c0a6e51d2b874","seq":1735207200000001}`.
//! The Kafka key is `device_id`, so a device's records stay in one partition, in order.
//!
//! `(node_id, epoch, seq)` identifies a record end to end. `seq` is assigned by the agent's
//! buffer in the same durable commit as the record, strictly increasing per node across
//! restarts; every accepted record and every dead letter takes one, so a gap in what reaches S3
//! is a loss. The `epoch` names the agent run that committed the record: a random id drawn each
//! time the buffer is opened. A restored or copied buffer file, a second agent configured with
//! the same `node_id` or a new buffer whose clock-based `seq` starts below an old one therefore
//! never reuse an identity downstream has seen: their records carry another epoch. Records of
//! agents older than the epoch have none (`epoch: None`).

use std::borrow::Cow;

use serde::Serialize;

use crate::reading::{parse_fields, string_field, u64_field};
use crate::{Limits, Reading, RejectReason, Rejection};

/// Where a record entered the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Provenance<'a> {
    /// The agent's node identity (unique per Proxmox node).
    pub node_id: Cow<'a, str>,
    /// The agent run that committed the record ([`is_valid_epoch`]); `None` from older agents.
    pub epoch: Option<Cow<'a, str>>,
    /// The agent's per-node sequence number.
    pub seq: u64,
}

/// The Kafka header the agent sets (value `1`) on an entry it may have handed to Kafka before
/// (committed by an earlier run, or sent again after a failed delivery). Downstream drops a
/// record at or below its epoch's high-water as a duplicate only when it carries this mark;
/// unmarked, it is a regression of the producer's `seq` and is dead-lettered.
pub const RESEND_HEADER: &str = "edgeflow-resend";

/// Longest accepted `epoch`.
pub const MAX_EPOCH_BYTES: usize = 32;

/// Whether `epoch` is a well-formed epoch: 1..=[`MAX_EPOCH_BYTES`] ASCII letters, digits, `-`
/// or `_` (the agent writes 16 lowercase hex digits).
pub fn is_valid_epoch(epoch: &str) -> bool {
    (1..=MAX_EPOCH_BYTES).contains(&epoch.len())
        && epoch.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// A reading as it travels on `raw-data`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord<'a> {
    pub reading: Reading<'a>,
    pub provenance: Provenance<'a>,
}

#[derive(Serialize)]
struct WireHead<'a> {
    device_id: &'a str,
    timestamp: &'a str,
    temperature: f64,
    humidity: f64,
    status: &'a str,
    node_id: &'a str,
}

impl<'a> RawRecord<'a> {
    /// Appends the JSON encoding to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        Self::write_json_head(&self.reading, &self.provenance.node_id, out);
        Self::finish_json(self.provenance.epoch.as_deref(), self.provenance.seq, out);
    }

    /// Appends the encoding up to the buffer's part of the provenance (`epoch` and `seq`). With
    /// [`RawRecord::finish_json`] this lets the agent encode a reading before its `seq` is known
    /// and append the rest inside the buffer's commit, without encoding twice.
    pub fn write_json_head(reading: &Reading<'_>, node_id: &str, out: &mut Vec<u8>) {
        let wire = WireHead {
            device_id: &reading.device_id,
            timestamp: &reading.timestamp,
            temperature: reading.temperature,
            humidity: reading.humidity,
            status: &reading.status,
            node_id,
        };
        // Writing plain strings and finite floats into a Vec cannot fail.
        serde_json::to_writer(&mut *out, &wire).expect("serialising a RawRecord into memory is infallible");
        out.pop(); // the closing brace
        out.push(b',');
    }

    /// Completes an encoding started by [`RawRecord::write_json_head`]. `epoch` must satisfy
    /// [`is_valid_epoch`] (it is written without escaping).
    pub fn finish_json(epoch: Option<&str>, seq: u64, out: &mut Vec<u8>) {
        if let Some(epoch) = epoch {
            debug_assert!(is_valid_epoch(epoch), "epoch {epoch:?}");
            out.extend_from_slice(b"\"epoch\":\"");
            out.extend_from_slice(epoch.as_bytes());
            out.extend_from_slice(b"\",");
        }
        out.extend_from_slice(b"\"seq\":");
        let mut digits = [0u8; 20];
        let mut n = seq;
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        out.extend_from_slice(&digits[i..]);
        out.push(b'}');
    }

    /// The JSON encoding.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        self.write_json(&mut out);
        out
    }

    /// The provenance of a value that [`RawRecord::parse`] refused only because a number is out
    /// of range ([`RejectReason::NumberOutOfRange`]): a well-formed record whose reading a rule
    /// refuses, so its `(node_id, seq)` is as good as any record's. `None` for anything else.
    pub fn refused_provenance(value: &'a [u8], rejection: &Rejection, limits: &Limits) -> Option<Provenance<'a>> {
        if rejection.reason != RejectReason::NumberOutOfRange {
            return None;
        }
        let fields = parse_fields(value, limits).ok()?;
        let node_id = string_field("node_id", fields.node_id).ok()?;
        if node_id.is_empty() || node_id.len() > limits.max_device_id_bytes {
            return None;
        }
        let epoch = epoch_field(fields.epoch).ok()?;
        let seq = u64_field("seq", fields.seq).ok()?;
        Some(Provenance { node_id, epoch, seq })
    }

    /// Parses and re-validates a `raw-data` value (without time bounds: consumers have no
    /// business second-guessing the agent's clock, and must stay deterministic on replay).
    pub fn parse(value: &'a [u8], limits: &Limits) -> Result<Self, Rejection> {
        let fields = parse_fields(value, limits)?;
        let reading = fields.reading(limits)?;
        let node_id = string_field("node_id", fields.node_id)?;
        if node_id.is_empty() || node_id.len() > limits.max_device_id_bytes {
            return Err(Rejection {
                reason: RejectReason::FieldTooLong,
                detail: format!("node_id must be 1..={} bytes", limits.max_device_id_bytes),
            });
        }
        let epoch = epoch_field(fields.epoch)?;
        let seq = u64_field("seq", fields.seq)?;
        Ok(RawRecord { reading, provenance: Provenance { node_id, epoch, seq } })
    }
}

/// The optional `epoch`: absent (an older agent) or a valid epoch.
fn epoch_field<'a>(raw: Option<&'a serde_json::value::RawValue>) -> Result<Option<Cow<'a, str>>, Rejection> {
    let Some(raw) = raw else { return Ok(None) };
    let epoch = string_field("epoch", Some(raw))?;
    if !is_valid_epoch(&epoch) {
        return Err(Rejection {
            reason: RejectReason::FieldTooLong,
            detail: format!("epoch must be 1..={MAX_EPOCH_BYTES} ASCII letters, digits, '-' or '_'"),
        });
    }
    Ok(Some(epoch))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TimeBounds;

    #[test]
    fn round_trips_with_original_fields_and_provenance() {
        let payload = br#"{"device_id":"device123","timestamp":"2024-12-26T10:00:00+00:00","temperature":72.5,"humidity":55.2,"status":"OK","fw":"x"}"#;
        let reading = Reading::parse(payload, &Limits::default(), &TimeBounds::unbounded()).expect("valid");
        let record = RawRecord {
            reading,
            provenance: Provenance { node_id: "pve-1".into(), epoch: Some("9f3c0a6e51d2b874".into()), seq: 42 },
        };
        let json = record.to_json();
        assert_eq!(
            std::str::from_utf8(&json).expect("utf8"),
            r#"{"device_id":"device123","timestamp":"2024-12-26T10:00:00+00:00","temperature":72.5,"humidity":55.2,"status":"OK","node_id":"pve-1","epoch":"9f3c0a6e51d2b874","seq":42}"#
        );
        let back = RawRecord::parse(&json, &Limits::default()).expect("valid raw record");
        assert_eq!(back, record);
    }

    #[test]
    fn a_record_of_an_older_agent_has_no_epoch_and_a_bad_epoch_is_refused() {
        let limits = Limits::default();
        let old = br#"{"device_id":"d","timestamp":"2024-12-26T10:00:00Z","temperature":1.5,"humidity":2.5,"status":"OK","node_id":"n","seq":5}"#;
        let back = RawRecord::parse(old, &limits).expect("valid");
        assert_eq!((back.provenance.epoch.clone(), back.provenance.seq), (None, 5));
        assert_eq!(back.to_json(), old.to_vec(), "re-encodes as it came");
        let long = format!("\"{}\"", "x".repeat(33));
        for bad in [r#""""#, r#""a b""#, r#""ééé""#, "7", long.as_str()] {
            let value = format!(
                r#"{{"device_id":"d","timestamp":"2024-12-26T10:00:00Z","temperature":1,"humidity":2,"status":"OK","node_id":"n","epoch":{bad},"seq":5}}"#
            );
            assert!(RawRecord::parse(value.as_bytes(), &limits).is_err(), "{value}");
        }
        assert!(is_valid_epoch("9f3c0a6e51d2b874") && is_valid_epoch(&"x".repeat(32)));
    }

    #[test]
    fn split_encoding_equals_whole_encoding() {
        let reading = Reading::parse(
            br#"{"device_id":"d\"q","timestamp":"2024-12-26T10:00:00Z","temperature":-0.5,"humidity":1e-7,"status":"OK"}"#,
            &Limits::default(),
            &TimeBounds::unbounded(),
        )
        .expect("valid");
        let cases =
            [(0, None), (7, Some("e")), (10, None), (1_735_207_200_000_001, Some("0123abcd")), (u64::MAX, None)];
        for (seq, epoch) in cases {
            let provenance = Provenance { node_id: "n".into(), epoch: epoch.map(Into::into), seq };
            let whole = RawRecord { reading: reading.clone(), provenance }.to_json();
            let mut split = Vec::new();
            RawRecord::write_json_head(&reading, "n", &mut split);
            RawRecord::finish_json(epoch, seq, &mut split);
            assert_eq!(String::from_utf8_lossy(&split), String::from_utf8_lossy(&whole));
            let back = RawRecord::parse(&split, &Limits::default()).expect("parses");
            assert_eq!((back.provenance.seq, back.provenance.epoch.as_deref()), (seq, epoch));
        }
    }

    #[test]
    fn only_a_record_refused_by_a_range_rule_keeps_its_provenance() {
        let limits = Limits::default();
        let huge = br#"{"device_id":"d","timestamp":"2024-12-26T10:00:00Z","temperature":1,"humidity":1e300,"status":"OK","node_id":"n","seq":9}"#;
        let err = RawRecord::parse(huge, &limits).expect_err("out of range");
        assert_eq!(err.reason, RejectReason::NumberOutOfRange);
        let p = RawRecord::refused_provenance(huge, &err, &limits).expect("provenance");
        assert_eq!((p.node_id.as_ref(), p.seq), ("n", 9));
        let missing =
            br#"{"device_id":"d","timestamp":"2024-12-26T10:00:00Z","humidity":1,"status":"OK","node_id":"n","seq":9}"#;
        let err = RawRecord::parse(missing, &limits).expect_err("missing");
        assert_eq!(RawRecord::refused_provenance(missing, &err, &limits), None);
    }

    #[test]
    fn provenance_is_required_on_raw_data() {
        let payload = br#"{"device_id":"d","timestamp":"2024-12-26T10:00:00Z","temperature":1,"humidity":2,"status":"OK","node_id":"n"}"#;
        let err = RawRecord::parse(payload, &Limits::default()).expect_err("seq missing");
        assert_eq!(err.reason, RejectReason::MissingField);
        let payload = br#"{"device_id":"d","timestamp":"2024-12-26T10:00:00Z","temperature":1,"humidity":2,"status":"OK","node_id":"n","seq":-1}"#;
        assert_eq!(
            RawRecord::parse(payload, &Limits::default()).expect_err("negative").reason,
            RejectReason::WrongType
        );
    }
}
