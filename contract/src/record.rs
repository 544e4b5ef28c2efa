//! The `raw-data` message value: a reading plus its provenance.
//!
//! The agent writes the reading's five original fields exactly as received (strings verbatim,
//! numbers in their shortest round-trip form) and adds `node_id` and `seq`:
//! `{"device_id":"device123","timestamp":"2024-12-26T10:00:00Z","temperature":72.5,
//! "humidity":55.2,"status":"OK","node_id":"pve-1","seq":1735207200000001}`.
//! The Kafka key is `device_id`, so a device's records stay in one partition, in order.
//!
//! `(node_id, seq)` identifies a record end to end. `seq` is assigned by the agent's buffer in
//! the same durable commit as the record, strictly increasing per node across restarts; every
//! accepted record and every dead letter takes one, so a gap in what reaches S3 is a loss.

use std::borrow::Cow;

use serde::Serialize;

use crate::reading::{parse_fields, string_field, u64_field};
use crate::{Limits, Reading, RejectReason, Rejection};

/// Where a record entered the pipeline.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Provenance<'a> {
    /// The agent's node identity (unique per Proxmox node).
    pub node_id: Cow<'a, str>,
    /// The agent's per-node sequence number.
    pub seq: u64,
}

/// A reading as it travels on `raw-data`.
#[derive(Debug, Clone, PartialEq)]
pub struct RawRecord<'a> {
    pub reading: Reading<'a>,
    pub provenance: Provenance<'a>,
}

#[derive(Serialize)]
struct WireWithoutSeq<'a> {
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
        Self::write_json_until_seq(&self.reading, &self.provenance.node_id, out);
        Self::finish_json(self.provenance.seq, out);
    }

    /// Appends the encoding up to `"seq":` (without the number). With [`RawRecord::finish_json`]
    /// this lets the agent encode a reading before its `seq` is known and append the number
    /// inside the buffer's commit, without encoding twice.
    pub fn write_json_until_seq(reading: &Reading<'_>, node_id: &str, out: &mut Vec<u8>) {
        let wire = WireWithoutSeq {
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
        out.extend_from_slice(b",\"seq\":");
    }

    /// Completes an encoding started by [`RawRecord::write_json_until_seq`].
    pub fn finish_json(seq: u64, out: &mut Vec<u8>) {
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
        let seq = u64_field("seq", fields.seq).ok()?;
        Some(Provenance { node_id, seq })
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
        let seq = u64_field("seq", fields.seq)?;
        Ok(RawRecord { reading, provenance: Provenance { node_id, seq } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TimeBounds;

    #[test]
    fn round_trips_with_original_fields_and_provenance() {
        let payload = br#"{"device_id":"device123","timestamp":"2024-12-26T10:00:00+00:00","temperature":72.5,"humidity":55.2,"status":"OK","fw":"x"}"#;
        let reading = Reading::parse(payload, &Limits::default(), &TimeBounds::unbounded()).expect("valid");
        let record = RawRecord { reading, provenance: Provenance { node_id: "pve-1".into(), seq: 42 } };
        let json = record.to_json();
        assert_eq!(
            std::str::from_utf8(&json).expect("utf8"),
            r#"{"device_id":"device123","timestamp":"2024-12-26T10:00:00+00:00","temperature":72.5,"humidity":55.2,"status":"OK","node_id":"pve-1","seq":42}"#
        );
        let back = RawRecord::parse(&json, &Limits::default()).expect("valid raw record");
        assert_eq!(back, record);
    }

    #[test]
    fn split_encoding_equals_whole_encoding() {
        let reading = Reading::parse(
            br#"{"device_id":"d\"q","timestamp":"2024-12-26T10:00:00Z","temperature":-0.5,"humidity":1e-7,"status":"OK"}"#,
            &Limits::default(),
            &TimeBounds::unbounded(),
        )
        .expect("valid");
        for seq in [0, 7, 10, 1_735_207_200_000_001, u64::MAX] {
            let whole =
                RawRecord { reading: reading.clone(), provenance: Provenance { node_id: "n".into(), seq } }.to_json();
            let mut split = Vec::new();
            RawRecord::write_json_until_seq(&reading, "n", &mut split);
            RawRecord::finish_json(seq, &mut split);
            assert_eq!(String::from_utf8_lossy(&split), String::from_utf8_lossy(&whole));
            let back = RawRecord::parse(&split, &Limits::default()).expect("parses");
            assert_eq!(back.provenance.seq, seq);
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
