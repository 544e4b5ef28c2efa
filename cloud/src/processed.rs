//! The `processed-data` message value, written by `process` and read by `sink` (and by anyone
//! else who wants the processed stream: it is plain JSON with a `kind` tag).
//!
//! ```json
//! {"kind":"filtered","source_partition":2,"source_offset":1041,"device_id":"d7",
//!  "timestamp":"2024-12-26T10:00:00Z","event_time_ms":1735207200000,"temperature":72.5,
//!  "humidity":55.2,"status":"OK","node_id":"pve-1","epoch":"9f3c0a6e51d2b874","seq":1735207200000001}
//! {"kind":"rejected", …same fields…, "reason":"temperature_above_max"}
//! {"kind":"aggregate","source_partition":2,"source_offset":1077,"device_id":"d7",
//!  "window_start_ms":1735207200000,"count":12,"temperature_sum":870.0,"temperature_min":71.0,
//!  "temperature_max":74.5,"humidity_sum":662.4,"late":false}
//! {"kind":"deadletter","source_partition":2,"source_offset":1090,"reason":"bad_json",
//!  "detail":"…","node_id":"pve-1","epoch":"9f3c0a6e51d2b874","seq":1735207200000042,"received_at_ms":1735207201234,
//!  "payload":"eyJkZXZp…"}
//! ```
//!
//! * Every value names the raw-data offset whose processing emitted it (`source_partition`,
//!   `source_offset`): that, with the kind, is the identity the sink deduplicates on when a
//!   replay of `process` emits it again.
//! * An aggregate with `device_id: null` is an *all-devices partial*: raw partition
//!   `source_partition`'s share of the all-devices window. Partials all go to processed-data
//!   partition 0, where one sink merges them.
//! * `late: true` marks a *late correction*: the delta one late record adds to a window that
//!   was already emitted. Summing every row of a (device, window) gives the exact totals.
//! * Aggregates carry sums, not averages, so merging rows is exact; averages are derived when
//!   the Parquet row is written.
//! * `payload` is base64 (a dead letter's bytes may not be UTF-8); `received_at_ms` is the
//!   raw record's Kafka timestamp, the only clock a bad record has.

use std::borrow::Cow;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

/// The four kinds of `processed-data` values.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A reading that passed the filter.
    #[default]
    Filtered,
    /// A reading the filter removed (with `reason`).
    Rejected,
    /// A per-minute aggregate (per device, or an all-devices partial when `device_id` is null).
    Aggregate,
    /// A raw-data value that is not a valid record.
    Deadletter,
}

impl Kind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Filtered => "filtered",
            Self::Rejected => "rejected",
            Self::Aggregate => "aggregate",
            Self::Deadletter => "deadletter",
        }
    }
}

/// Why the filter removed a reading. The string form is the metric label and the `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FilterReason {
    /// `status != "OK"`.
    StatusNotOk,
    /// `temperature > temperature_max`.
    TemperatureAboveMax,
}

impl FilterReason {
    pub const ALL: [FilterReason; 2] = [Self::StatusNotOk, Self::TemperatureAboveMax];

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::StatusNotOk => "status_not_ok",
            Self::TemperatureAboveMax => "temperature_above_max",
        }
    }
}

/// Exact per-window sums (the default is the empty accumulator). Merging two accumulators is associative and commutative for count,
/// min and max; float sums are exact to the last bit only in the same order, which is why
/// `verify` compares sums with a relative tolerance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Sums {
    pub count: u64,
    pub temperature_sum: f64,
    pub temperature_min: f64,
    pub temperature_max: f64,
    pub humidity_sum: f64,
}

impl Sums {
    /// The sums of a single reading.
    pub fn of(temperature: f64, humidity: f64) -> Self {
        Self {
            count: 1,
            temperature_sum: temperature,
            temperature_min: temperature,
            temperature_max: temperature,
            humidity_sum: humidity,
        }
    }

    /// Adds one reading.
    pub fn add(&mut self, temperature: f64, humidity: f64) {
        self.merge(&Self::of(temperature, humidity));
    }

    /// Merges another accumulator into this one.
    pub fn merge(&mut self, other: &Sums) {
        if self.count == 0 {
            *self = *other;
            return;
        }
        if other.count == 0 {
            return;
        }
        self.count += other.count;
        self.temperature_sum += other.temperature_sum;
        self.temperature_min = self.temperature_min.min(other.temperature_min);
        self.temperature_max = self.temperature_max.max(other.temperature_max);
        self.humidity_sum += other.humidity_sum;
    }
}

/// A processed-data value, borrowing its strings from the JSON where it can.
#[derive(Debug, Clone, PartialEq)]
pub enum Processed<'a> {
    /// A filtered or rejected reading.
    Reading(ReadingOut<'a>),
    /// A window aggregate, an all-devices partial, or a late correction of either.
    Aggregate(AggregateOut<'a>),
    /// A raw-data value that is not a valid record.
    DeadLetter(DeadLetterOut<'a>),
}

/// Where a processed value came from: the raw-data offset whose processing emitted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Source {
    pub partition: i32,
    pub offset: i64,
}

/// A reading on its way out of `process`.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingOut<'a> {
    pub source: Source,
    /// `None` for a filtered reading, the filter's reason for a rejected one.
    pub reason: Option<FilterReason>,
    pub device_id: Cow<'a, str>,
    /// The timestamp exactly as the device wrote it.
    pub timestamp: Cow<'a, str>,
    pub event_time_ms: i64,
    pub temperature: f64,
    pub humidity: f64,
    pub status: Cow<'a, str>,
    pub node_id: Cow<'a, str>,
    /// The agent run that committed the record; `None` from agents older than epochs.
    pub epoch: Option<Cow<'a, str>>,
    pub seq: u64,
}

/// A per-minute aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateOut<'a> {
    pub source: Source,
    /// `None` for an all-devices partial.
    pub device_id: Option<Cow<'a, str>>,
    pub window_start_ms: i64,
    pub sums: Sums,
    /// A late correction (a delta for a window already emitted).
    pub late: bool,
}

/// A raw-data value that could not be processed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterOut<'a> {
    pub source: Source,
    /// A [`edgeflow_contract::RejectReason`] name, or `seq_out_of_range`.
    pub reason: Cow<'a, str>,
    pub detail: Cow<'a, str>,
    pub node_id: Option<Cow<'a, str>>,
    pub epoch: Option<Cow<'a, str>>,
    pub seq: Option<u64>,
    /// The raw record's Kafka timestamp (milliseconds), 0 when the broker gave none.
    pub received_at_ms: i64,
    /// The raw value, or its first bytes when it was larger than a dead letter may carry.
    pub payload: Cow<'a, [u8]>,
    /// The raw value's size in bytes (larger than `payload` when that is a prefix).
    pub payload_size: u64,
}

impl Processed<'_> {
    /// The kind tag.
    pub fn kind(&self) -> Kind {
        match self {
            Self::Reading(r) if r.reason.is_some() => Kind::Rejected,
            Self::Reading(_) => Kind::Filtered,
            Self::Aggregate(_) => Kind::Aggregate,
            Self::DeadLetter(_) => Kind::Deadletter,
        }
    }

    /// Where it came from.
    pub fn source(&self) -> Source {
        match self {
            Self::Reading(r) => r.source,
            Self::Aggregate(a) => a.source,
            Self::DeadLetter(d) => d.source,
        }
    }

    /// Appends the JSON encoding to `out`.
    pub fn write_json(&self, out: &mut Vec<u8>) {
        let mut wire = Wire {
            kind: self.kind(),
            source_partition: self.source().partition,
            source_offset: self.source().offset,
            ..Wire::default()
        };
        let encoded_payload;
        match self {
            Self::Reading(r) => {
                wire.device_id = Some(Cow::Borrowed(&r.device_id));
                wire.timestamp = Some(Cow::Borrowed(&r.timestamp));
                wire.event_time_ms = Some(r.event_time_ms);
                wire.temperature = Some(r.temperature);
                wire.humidity = Some(r.humidity);
                wire.status = Some(Cow::Borrowed(&r.status));
                wire.node_id = Some(Cow::Borrowed(&r.node_id));
                wire.epoch = r.epoch.as_deref().map(Cow::Borrowed);
                wire.seq = Some(r.seq);
                wire.reason = r.reason.map(|f| Cow::Borrowed(f.as_str()));
            }
            Self::Aggregate(a) => {
                wire.device_id = a.device_id.as_deref().map(Cow::Borrowed);
                wire.window_start_ms = Some(a.window_start_ms);
                wire.count = Some(a.sums.count);
                wire.temperature_sum = Some(a.sums.temperature_sum);
                wire.temperature_min = Some(a.sums.temperature_min);
                wire.temperature_max = Some(a.sums.temperature_max);
                wire.humidity_sum = Some(a.sums.humidity_sum);
                wire.late = Some(a.late);
            }
            Self::DeadLetter(d) => {
                wire.reason = Some(Cow::Borrowed(&d.reason));
                wire.detail = Some(Cow::Borrowed(&d.detail));
                wire.node_id = d.node_id.as_deref().map(Cow::Borrowed);
                wire.epoch = d.epoch.as_deref().map(Cow::Borrowed);
                wire.seq = d.seq;
                wire.received_at_ms = Some(d.received_at_ms);
                encoded_payload = STANDARD.encode(&d.payload);
                wire.payload = Some(Cow::Borrowed(&encoded_payload));
                wire.payload_size = (d.payload_size != d.payload.len() as u64).then_some(d.payload_size);
            }
        }
        // Strings, integers and finite floats serialise into memory infallibly; every float
        // here comes from a validated reading (finite) or sums of them.
        serde_json::to_writer(out, &wire).expect("serialising a processed value into memory is infallible");
    }

    /// The JSON encoding.
    pub fn to_json(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        self.write_json(&mut out);
        out
    }
}

/// Why a processed-data value could not be decoded (someone else wrote to the topic, or a
/// future version did).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("processed-data value is not valid: {0}")]
pub struct DecodeError(pub String);

impl<'a> Processed<'a> {
    /// Parses a processed-data value.
    pub fn parse(value: &'a [u8]) -> Result<Self, DecodeError> {
        let w: Wire<'a> = serde_json::from_slice(value).map_err(|e| DecodeError(e.to_string()))?;
        let source = Source { partition: w.source_partition, offset: w.source_offset };
        let missing = |f: &str| DecodeError(format!("`{}` value without `{f}`", w.kind.as_str()));
        Ok(match w.kind {
            Kind::Filtered | Kind::Rejected => {
                let reason = match (w.kind, w.reason.as_deref()) {
                    (Kind::Filtered, _) => None,
                    (_, Some("status_not_ok")) => Some(FilterReason::StatusNotOk),
                    (_, Some("temperature_above_max")) => Some(FilterReason::TemperatureAboveMax),
                    (_, other) => return Err(DecodeError(format!("unknown filter reason {other:?}"))),
                };
                Processed::Reading(ReadingOut {
                    source,
                    reason,
                    device_id: w.device_id.ok_or_else(|| missing("device_id"))?,
                    timestamp: w.timestamp.ok_or_else(|| missing("timestamp"))?,
                    event_time_ms: w.event_time_ms.ok_or_else(|| missing("event_time_ms"))?,
                    temperature: w.temperature.ok_or_else(|| missing("temperature"))?,
                    humidity: w.humidity.ok_or_else(|| missing("humidity"))?,
                    status: w.status.ok_or_else(|| missing("status"))?,
                    node_id: w.node_id.ok_or_else(|| missing("node_id"))?,
                    epoch: w.epoch,
                    seq: w.seq.ok_or_else(|| missing("seq"))?,
                })
            }
            Kind::Aggregate => Processed::Aggregate(AggregateOut {
                source,
                device_id: w.device_id,
                window_start_ms: w.window_start_ms.ok_or_else(|| missing("window_start_ms"))?,
                sums: Sums {
                    count: w.count.ok_or_else(|| missing("count"))?,
                    temperature_sum: w.temperature_sum.ok_or_else(|| missing("temperature_sum"))?,
                    temperature_min: w.temperature_min.ok_or_else(|| missing("temperature_min"))?,
                    temperature_max: w.temperature_max.ok_or_else(|| missing("temperature_max"))?,
                    humidity_sum: w.humidity_sum.ok_or_else(|| missing("humidity_sum"))?,
                },
                late: w.late.unwrap_or(false),
            }),
            Kind::Deadletter => {
                let payload = match w.payload {
                    Some(text) => STANDARD.decode(text.as_bytes()).map_err(|e| DecodeError(format!("payload: {e}")))?,
                    None => Vec::new(),
                };
                Processed::DeadLetter(DeadLetterOut {
                    source,
                    reason: w.reason.ok_or_else(|| missing("reason"))?,
                    detail: w.detail.unwrap_or_default(),
                    node_id: w.node_id,
                    epoch: w.epoch,
                    seq: w.seq,
                    received_at_ms: w.received_at_ms.unwrap_or(0),
                    payload_size: w.payload_size.unwrap_or(payload.len() as u64),
                    payload: Cow::Owned(payload),
                })
            }
        })
    }
}

/// The flat wire form: one struct for every kind, absent fields omitted. A flat struct (rather
/// than a serde-tagged enum) keeps decoding single-pass and lets strings borrow.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Wire<'a> {
    kind: Kind,
    source_partition: i32,
    source_offset: i64,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    device_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    timestamp: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    event_time_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    humidity: Option<f64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    status: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    node_id: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    epoch: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    reason: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    window_start_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    count: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature_sum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature_min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    temperature_max: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    humidity_sum: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    late: Option<bool>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    detail: Option<Cow<'a, str>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    received_at_ms: Option<i64>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    payload: Option<Cow<'a, str>>,
    /// A dead letter's original size, when its payload is a prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    payload_size: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(reason: Option<FilterReason>) -> Processed<'static> {
        Processed::Reading(ReadingOut {
            source: Source { partition: 2, offset: 1041 },
            reason,
            device_id: "d7".into(),
            timestamp: "2024-12-26T10:00:00Z".into(),
            event_time_ms: 1_735_207_200_000,
            temperature: 72.5,
            humidity: 55.2,
            status: "OK".into(),
            node_id: "pve-1".into(),
            epoch: Some("9f3c0a6e51d2b874".into()),
            seq: 1_735_207_200_000_001,
        })
    }

    #[test]
    fn every_kind_round_trips() {
        let values = [
            reading(None),
            reading(Some(FilterReason::TemperatureAboveMax)),
            Processed::Aggregate(AggregateOut {
                source: Source { partition: 2, offset: 1077 },
                device_id: Some("d7".into()),
                window_start_ms: 1_735_207_200_000,
                sums: Sums {
                    count: 12,
                    temperature_sum: 870.0,
                    temperature_min: 71.0,
                    temperature_max: 74.5,
                    humidity_sum: 662.4,
                },
                late: false,
            }),
            Processed::Aggregate(AggregateOut {
                source: Source { partition: 0, offset: 9 },
                device_id: None,
                window_start_ms: 60_000,
                sums: Sums::of(0.1, 0.2),
                late: true,
            }),
            Processed::DeadLetter(DeadLetterOut {
                source: Source { partition: 1, offset: 5 },
                reason: "bad_json".into(),
                detail: "expected value at line 1".into(),
                node_id: None,
                epoch: None,
                seq: None,
                received_at_ms: 1_735_207_201_234,
                payload: Cow::Owned(vec![0xff, b'{']),
                payload_size: 2,
            }),
            // A prefix of a larger value.
            Processed::DeadLetter(DeadLetterOut {
                source: Source { partition: 1, offset: 6 },
                reason: "oversized".into(),
                detail: "payload truncated".into(),
                node_id: Some("n".into()),
                epoch: Some("e1".into()),
                seq: Some(3),
                received_at_ms: 1,
                payload: Cow::Owned(vec![b'{'; 4]),
                payload_size: 1_000_000,
            }),
        ];
        for v in values {
            let json = v.to_json();
            assert_eq!(Processed::parse(&json).expect("round trip"), v, "{}", String::from_utf8_lossy(&json));
        }
    }

    #[test]
    fn wire_form_is_readable_json() {
        let json = String::from_utf8(reading(Some(FilterReason::StatusNotOk)).to_json()).expect("utf8");
        assert_eq!(
            json,
            r#"{"kind":"rejected","source_partition":2,"source_offset":1041,"device_id":"d7","timestamp":"2024-12-26T10:00:00Z","event_time_ms":1735207200000,"temperature":72.5,"humidity":55.2,"status":"OK","node_id":"pve-1","epoch":"9f3c0a6e51d2b874","seq":1735207200000001,"reason":"status_not_ok"}"#
        );
    }

    #[test]
    fn foreign_values_are_errors_not_panics() {
        for bad in [
            &b"not json"[..],
            b"{}",
            br#"{"kind":"filtered","source_partition":0,"source_offset":1}"#,
            br#"{"kind":"weird","source_partition":0,"source_offset":1}"#,
        ] {
            assert!(Processed::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn sums_merge_exactly() {
        let mut a = Sums::of(10.0, 50.0);
        a.add(20.0, 40.0);
        let mut b =
            Sums { count: 0, temperature_sum: 0.0, temperature_min: 0.0, temperature_max: 0.0, humidity_sum: 0.0 };
        b.merge(&a);
        b.merge(&Sums::of(-5.0, 1.0));
        assert_eq!(
            b,
            Sums { count: 3, temperature_sum: 25.0, temperature_min: -5.0, temperature_max: 20.0, humidity_sum: 91.0 }
        );
    }
}
