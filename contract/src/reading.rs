//! The device reading and its validation.
//!
//! Devices publish JSON like
//! `{"device_id": "device123", "timestamp": "2024-12-26T10:00:00Z", "temperature": 72.5,
//! "humidity": 55.2, "status": "OK"}`.
//!
//! Validation is strict about what the pipeline relies on and lenient about the rest:
//! * the payload is bounded in size, is UTF-8 and is a JSON object;
//! * the five fields are present exactly once, with the right JSON types;
//! * numbers are finite (JSON cannot spell NaN; `1e400` overflows and is refused);
//! * `timestamp` is RFC 3339 and, when [`TimeBounds`] are given, not too far from "now";
//! * `device_id` is non-empty, bounded and free of control characters (it becomes a Kafka key
//!   and a Parquet column); strings are bounded.
//!
//! Fields the schema does not name are ignored: a firmware that adds a field keeps working.
//! Parsing borrows from the payload wherever the JSON has no escapes, so the hot path allocates
//! nothing but the output.

use std::borrow::Cow;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;

/// Why a payload was refused. The string form is the metric label and the dead-letter reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RejectReason {
    /// Larger than [`Limits::max_payload_bytes`].
    Oversized,
    /// Not valid UTF-8, so not JSON.
    NotUtf8,
    /// Not well-formed JSON.
    BadJson,
    /// Well-formed JSON, but not an object.
    NotAnObject,
    /// A required field is absent.
    MissingField,
    /// A required field has the wrong JSON type (including `null`).
    WrongType,
    /// A required field appears more than once.
    DuplicateField,
    /// A number overflows to infinity.
    NonFiniteNumber,
    /// A finite number whose magnitude exceeds [`MAX_ABS_NUMBER`].
    NumberOutOfRange,
    /// `timestamp` is not RFC 3339.
    BadTimestamp,
    /// `timestamp` is further in the past or future than the configured bounds allow.
    TimestampOutOfRange,
    /// `device_id` is empty, too long or contains control characters.
    BadDeviceId,
    /// A string field is longer than its bound.
    FieldTooLong,
    /// `device_id` differs from the device named by the MQTT topic it came on (an agent
    /// setting; the topic binds a broker identity to a device).
    DeviceTopicMismatch,
}

impl RejectReason {
    /// Every reason, for pre-registering metric label values.
    pub const ALL: [RejectReason; 14] = [
        Self::Oversized,
        Self::NotUtf8,
        Self::BadJson,
        Self::NotAnObject,
        Self::MissingField,
        Self::WrongType,
        Self::DuplicateField,
        Self::NonFiniteNumber,
        Self::NumberOutOfRange,
        Self::BadTimestamp,
        Self::TimestampOutOfRange,
        Self::BadDeviceId,
        Self::FieldTooLong,
        Self::DeviceTopicMismatch,
    ];

    /// Stable snake_case name used in metrics labels and dead letters.
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Oversized => "oversized",
            Self::NotUtf8 => "not_utf8",
            Self::BadJson => "bad_json",
            Self::NotAnObject => "not_an_object",
            Self::MissingField => "missing_field",
            Self::WrongType => "wrong_type",
            Self::DuplicateField => "duplicate_field",
            Self::NonFiniteNumber => "non_finite_number",
            Self::NumberOutOfRange => "number_out_of_range",
            Self::BadTimestamp => "bad_timestamp",
            Self::TimestampOutOfRange => "timestamp_out_of_range",
            Self::BadDeviceId => "bad_device_id",
            Self::FieldTooLong => "field_too_long",
            Self::DeviceTopicMismatch => "device_topic_mismatch",
        }
    }

    /// Inverse of [`RejectReason::as_str`].
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A refused payload: the reason, and a short human detail (never the payload itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: RejectReason,
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Self {
        Self { reason, detail: detail.into() }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

impl std::error::Error for Rejection {}

/// The largest magnitude accepted for `temperature` and `humidity`.
///
/// Every quantity a telemetry device reports lies far inside it, and it keeps the aggregator's
/// arithmetic finite: a window's sum of up to 2^53 readings stays below 1e28, far from
/// `f64::MAX`. Without it, two readings near `f64::MAX` overflow a window's sum to infinity,
/// which JSON cannot carry (a checkpoint holding it would not parse back).
pub const MAX_ABS_NUMBER: f64 = 1e12;

/// Size bounds applied to every payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted payload, in bytes.
    pub max_payload_bytes: usize,
    /// Longest accepted `device_id`, in bytes.
    pub max_device_id_bytes: usize,
    /// Longest accepted `status` and `timestamp` strings, in bytes.
    pub max_string_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self { max_payload_bytes: 16 * 1024, max_device_id_bytes: 128, max_string_bytes: 64 }
    }
}

/// How far an event time may lie from the receiver's clock. `None` disables a side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeBounds {
    /// Receiver's clock, milliseconds since the Unix epoch.
    pub now_ms: i64,
    /// Largest accepted distance into the past, in milliseconds.
    pub max_past_ms: Option<i64>,
    /// Largest accepted distance into the future, in milliseconds.
    pub max_future_ms: Option<i64>,
}

impl TimeBounds {
    /// No bound on either side (the aggregator re-validates without a clock).
    pub const fn unbounded() -> Self {
        Self { now_ms: 0, max_past_ms: None, max_future_ms: None }
    }

    fn check(&self, event_ms: i64) -> Result<(), Rejection> {
        if let Some(past) = self.max_past_ms
            && event_ms < self.now_ms.saturating_sub(past)
        {
            return Err(Rejection::new(
                RejectReason::TimestampOutOfRange,
                format!("timestamp is more than {}s in the past", past / 1000),
            ));
        }
        if let Some(future) = self.max_future_ms
            && event_ms > self.now_ms.saturating_add(future)
        {
            return Err(Rejection::new(
                RejectReason::TimestampOutOfRange,
                format!("timestamp is more than {}s in the future", future / 1000),
            ));
        }
        Ok(())
    }
}

/// A validated device reading. String fields borrow from the payload when they can.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading<'a> {
    pub device_id: Cow<'a, str>,
    /// The timestamp exactly as the device wrote it.
    pub timestamp: Cow<'a, str>,
    pub temperature: f64,
    pub humidity: f64,
    pub status: Cow<'a, str>,
    /// `timestamp` parsed: milliseconds since the Unix epoch, UTC.
    pub event_time_ms: i64,
}

impl<'a> Reading<'a> {
    /// Parses and validates a device payload.
    pub fn parse(payload: &'a [u8], limits: &Limits, time: &TimeBounds) -> Result<Self, Rejection> {
        let fields = parse_fields(payload, limits)?;
        let reading = fields.reading(limits)?;
        time.check(reading.event_time_ms)?;
        Ok(reading)
    }

    /// Copies borrowed fields so the reading outlives its payload.
    pub fn into_owned(self) -> Reading<'static> {
        Reading {
            device_id: Cow::Owned(self.device_id.into_owned()),
            timestamp: Cow::Owned(self.timestamp.into_owned()),
            temperature: self.temperature,
            humidity: self.humidity,
            status: Cow::Owned(self.status.into_owned()),
            event_time_ms: self.event_time_ms,
        }
    }
}

/// The JSON object's fields of interest, still unparsed. Shared by [`Reading::parse`] and
/// [`crate::RawRecord::parse`], which also needs the provenance fields.
#[derive(Default)]
pub(crate) struct Fields<'a> {
    pub(crate) device_id: Option<&'a RawValue>,
    pub(crate) timestamp: Option<&'a RawValue>,
    pub(crate) temperature: Option<&'a RawValue>,
    pub(crate) humidity: Option<&'a RawValue>,
    pub(crate) status: Option<&'a RawValue>,
    pub(crate) node_id: Option<&'a RawValue>,
    pub(crate) epoch: Option<&'a RawValue>,
    pub(crate) seq: Option<&'a RawValue>,
    duplicate: Option<&'static str>,
}

pub(crate) fn parse_fields<'a>(payload: &'a [u8], limits: &Limits) -> Result<Fields<'a>, Rejection> {
    if payload.len() > limits.max_payload_bytes {
        return Err(Rejection::new(
            RejectReason::Oversized,
            format!("payload is {} bytes, limit {}", payload.len(), limits.max_payload_bytes),
        ));
    }
    let text = std::str::from_utf8(payload)
        .map_err(|e| Rejection::new(RejectReason::NotUtf8, format!("invalid UTF-8 at byte {}", e.valid_up_to())))?;
    let first = text.trim_start_matches([' ', '\t', '\n', '\r']).as_bytes().first().copied();
    if first != Some(b'{') {
        return Err(match serde_json::from_str::<IgnoredAny>(text) {
            Ok(_) => Rejection::new(RejectReason::NotAnObject, "JSON value is not an object"),
            Err(e) => Rejection::new(RejectReason::BadJson, e.to_string()),
        });
    }
    let fields: Fields<'a> =
        serde_json::from_str(text).map_err(|e| Rejection::new(RejectReason::BadJson, e.to_string()))?;
    if let Some(name) = fields.duplicate {
        return Err(Rejection::new(RejectReason::DuplicateField, format!("field `{name}` appears more than once")));
    }
    Ok(fields)
}

impl<'a> Fields<'a> {
    pub(crate) fn reading(&self, limits: &Limits) -> Result<Reading<'a>, Rejection> {
        let device_id = string_field("device_id", self.device_id)?;
        if device_id.is_empty()
            || device_id.len() > limits.max_device_id_bytes
            || device_id.chars().any(char::is_control)
        {
            return Err(Rejection::new(
                RejectReason::BadDeviceId,
                format!("device_id must be 1..={} bytes without control characters", limits.max_device_id_bytes),
            ));
        }
        let timestamp = bounded_string_field("timestamp", self.timestamp, limits.max_string_bytes)?;
        let event_time_ms = chrono::DateTime::parse_from_rfc3339(&timestamp)
            .map_err(|e| Rejection::new(RejectReason::BadTimestamp, format!("timestamp is not RFC 3339: {e}")))?
            .timestamp_millis();
        let temperature = number_field("temperature", self.temperature)?;
        let humidity = number_field("humidity", self.humidity)?;
        let status = bounded_string_field("status", self.status, limits.max_string_bytes)?;
        Ok(Reading { device_id, timestamp, temperature, humidity, status, event_time_ms })
    }
}

/// A string that borrows from the input when it has no escapes.
#[derive(Deserialize)]
struct BorrowedStr<'a>(#[serde(borrow)] Cow<'a, str>);

fn required<'a>(name: &'static str, raw: Option<&'a RawValue>) -> Result<&'a RawValue, Rejection> {
    raw.ok_or_else(|| Rejection::new(RejectReason::MissingField, format!("field `{name}` is missing")))
}

fn json_type(raw: &RawValue) -> &'static str {
    match raw.get().as_bytes().first() {
        Some(b'"') => "string",
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b't' | b'f') => "boolean",
        Some(b'n') => "null",
        _ => "number",
    }
}

pub(crate) fn string_field<'a>(name: &'static str, raw: Option<&'a RawValue>) -> Result<Cow<'a, str>, Rejection> {
    let raw = required(name, raw)?;
    serde_json::from_str::<BorrowedStr<'a>>(raw.get()).map(|s| s.0).map_err(|_| {
        Rejection::new(RejectReason::WrongType, format!("field `{name}` must be a string, found {}", json_type(raw)))
    })
}

fn bounded_string_field<'a>(
    name: &'static str,
    raw: Option<&'a RawValue>,
    max: usize,
) -> Result<Cow<'a, str>, Rejection> {
    let value = string_field(name, raw)?;
    if value.len() > max {
        return Err(Rejection::new(
            RejectReason::FieldTooLong,
            format!("field `{name}` is {} bytes, limit {max}", value.len()),
        ));
    }
    Ok(value)
}

fn number_field(name: &'static str, raw: Option<&RawValue>) -> Result<f64, Rejection> {
    let raw = required(name, raw)?;
    if json_type(raw) != "number" {
        return Err(Rejection::new(
            RejectReason::WrongType,
            format!("field `{name}` must be a number, found {}", json_type(raw)),
        ));
    }
    match serde_json::from_str::<f64>(raw.get()) {
        Ok(v) if v.is_finite() && v.abs() <= MAX_ABS_NUMBER => Ok(v),
        Ok(v) if v.is_finite() => Err(Rejection::new(
            RejectReason::NumberOutOfRange,
            format!("field `{name}` is outside ±{MAX_ABS_NUMBER:e}"),
        )),
        _ => Err(Rejection::new(RejectReason::NonFiniteNumber, format!("field `{name}` is not a finite number"))),
    }
}

pub(crate) fn u64_field(name: &'static str, raw: Option<&RawValue>) -> Result<u64, Rejection> {
    let raw = required(name, raw)?;
    serde_json::from_str::<u64>(raw.get())
        .map_err(|_| Rejection::new(RejectReason::WrongType, format!("field `{name}` must be an unsigned integer")))
}

impl<'de: 'a, 'a> Deserialize<'de> for Fields<'a> {
    fn deserialize<D: de::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct FieldsVisitor<'a>(std::marker::PhantomData<&'a ()>);

        impl<'de: 'a, 'a> Visitor<'de> for FieldsVisitor<'a> {
            type Value = Fields<'a>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a telemetry JSON object")
            }

            fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Fields<'a>, M::Error> {
                let mut fields = Fields::default();
                while let Some(key) = map.next_key::<BorrowedStr<'de>>()? {
                    let (name, slot): (&'static str, &mut Option<&'a RawValue>) = match key.0.as_ref() {
                        "device_id" => ("device_id", &mut fields.device_id),
                        "timestamp" => ("timestamp", &mut fields.timestamp),
                        "temperature" => ("temperature", &mut fields.temperature),
                        "humidity" => ("humidity", &mut fields.humidity),
                        "status" => ("status", &mut fields.status),
                        "node_id" => ("node_id", &mut fields.node_id),
                        "epoch" => ("epoch", &mut fields.epoch),
                        "seq" => ("seq", &mut fields.seq),
                        _ => {
                            map.next_value::<IgnoredAny>()?;
                            continue;
                        }
                    };
                    let value: &'de RawValue = map.next_value()?;
                    if slot.replace(value).is_some() && fields.duplicate.is_none() {
                        fields.duplicate = Some(name);
                    }
                }
                Ok(fields)
            }
        }

        deserializer.deserialize_map(FieldsVisitor(std::marker::PhantomData))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFERENCE: &str = r#"{"device_id": "device123", "timestamp": "2024-12-26T10:00:00Z", "temperature": 72.5, "humidity": 55.2, "status": "OK"}"#;

    fn parse(payload: &str) -> Result<Reading<'_>, Rejection> {
        Reading::parse(payload.as_bytes(), &Limits::default(), &TimeBounds::unbounded())
    }

    fn reason(payload: &str) -> RejectReason {
        parse(payload).expect_err("payload should be refused").reason
    }

    #[test]
    fn reference_payload_parses_and_borrows() {
        let r = parse(REFERENCE).expect("reference payload is valid");
        assert_eq!(r.device_id, "device123");
        assert!(matches!(r.device_id, Cow::Borrowed(_)));
        assert_eq!(r.timestamp, "2024-12-26T10:00:00Z");
        assert_eq!(r.temperature, 72.5);
        assert_eq!(r.humidity, 55.2);
        assert_eq!(r.status, "OK");
        assert_eq!(r.event_time_ms, 1_735_207_200_000);
    }

    #[test]
    fn offsets_and_fractions_are_normalised_to_utc_millis() {
        let r = parse(r#"{"device_id":"d","timestamp":"2024-12-26T11:00:00.250+01:00","temperature":1,"humidity":2,"status":"OK"}"#)
            .expect("valid");
        assert_eq!(r.event_time_ms, 1_735_207_200_250);
        assert_eq!(r.temperature, 1.0);
    }

    #[test]
    fn unknown_fields_are_ignored_and_escapes_are_decoded() {
        let r = parse(r#"{"fw":"1.2","device_id":"dev\u0041","timestamp":"2024-12-26T10:00:00Z","temperature":-3.5,"humidity":0,"status":"OK","extra":[1,{"a":null}]}"#)
            .expect("valid");
        assert_eq!(r.device_id, "devA");
        assert!(matches!(r.device_id, Cow::Owned(_)));
    }

    #[test]
    fn each_defect_has_its_reason() {
        let ok = |f: &str, v: &str| REFERENCE.replace(f, v);
        assert_eq!(reason(""), RejectReason::BadJson);
        assert_eq!(reason("{\"device_id\":"), RejectReason::BadJson);
        assert_eq!(reason("[1,2]"), RejectReason::NotAnObject);
        assert_eq!(reason("42"), RejectReason::NotAnObject);
        assert_eq!(reason(r#"{"device_id":"d"}"#), RejectReason::MissingField);
        assert_eq!(reason(&ok("72.5", "\"72.5\"")), RejectReason::WrongType);
        assert_eq!(reason(&ok("72.5", "null")), RejectReason::WrongType);
        assert_eq!(reason(&ok("\"device123\"", "7")), RejectReason::WrongType);
        assert_eq!(reason(&ok("72.5", "1e400")), RejectReason::NonFiniteNumber);
        assert_eq!(reason(&ok("72.5", "NaN")), RejectReason::BadJson);
        assert_eq!(reason(&ok("55.2", "1.7e308")), RejectReason::NumberOutOfRange);
        assert_eq!(reason(&ok("72.5", "-1.000001e12")), RejectReason::NumberOutOfRange);
        assert_eq!(parse(&ok("72.5", "-1e12")).map(|r| r.temperature), Ok(-1e12));
        assert_eq!(reason(&ok("2024-12-26T10:00:00Z", "yesterday")), RejectReason::BadTimestamp);
        assert_eq!(reason(&ok("2024-12-26T10:00:00Z", "2024-13-26T10:00:00Z")), RejectReason::BadTimestamp);
        assert_eq!(reason(&ok("\"device123\"", "\"\"")), RejectReason::BadDeviceId);
        assert_eq!(reason(&ok("\"device123\"", "\"a\\nb\"")), RejectReason::BadDeviceId);
        assert_eq!(reason(&ok("\"OK\"", &format!("\"{}\"", "x".repeat(65)))), RejectReason::FieldTooLong);
        assert_eq!(
            reason(
                r#"{"device_id":"a","device_id":"b","timestamp":"2024-12-26T10:00:00Z","temperature":1,"humidity":2,"status":"OK"}"#
            ),
            RejectReason::DuplicateField
        );
    }

    #[test]
    fn non_utf8_and_oversized_are_refused_before_parsing() {
        let bad = [b'{', 0xff, 0xfe, b'}'];
        let r = Reading::parse(&bad, &Limits::default(), &TimeBounds::unbounded()).expect_err("refused");
        assert_eq!(r.reason, RejectReason::NotUtf8);
        let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(20_000));
        assert_eq!(reason(&big), RejectReason::Oversized);
    }

    #[test]
    fn time_bounds_apply_on_both_sides() {
        let now = 1_735_207_200_000;
        let bounds = TimeBounds { now_ms: now, max_past_ms: Some(60_000), max_future_ms: Some(1_000) };
        let at = |ts: &str| REFERENCE.replace("2024-12-26T10:00:00Z", ts);
        let check = |p: String| Reading::parse(p.as_bytes(), &Limits::default(), &bounds).map(|r| r.event_time_ms);
        assert_eq!(check(at("2024-12-26T10:00:00Z")), Ok(now));
        assert_eq!(check(at("2024-12-26T09:59:00Z")), Ok(now - 60_000));
        assert_eq!(check(at("2024-12-26T09:58:59Z")).map_err(|e| e.reason), Err(RejectReason::TimestampOutOfRange));
        assert_eq!(check(at("2024-12-26T10:00:02Z")).map_err(|e| e.reason), Err(RejectReason::TimestampOutOfRange));
    }

    #[test]
    fn reason_names_round_trip() {
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::from_name(r.as_str()), Some(r));
        }
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// No input makes the parser panic; every outcome is a reading or a typed rejection.
            #[test]
            fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
                let _ = Reading::parse(&bytes, &Limits::default(), &TimeBounds::unbounded());
            }

            /// Any finite reading survives a serialise/parse round trip exactly.
            #[test]
            fn finite_numbers_round_trip(
                t in (proptest::num::f64::NORMAL | proptest::num::f64::ZERO).prop_filter("in range", |t| t.abs() <= MAX_ABS_NUMBER),
                h in -1e6f64..1e6,
            ) {
                let payload = serde_json::json!({
                    "device_id": "d", "timestamp": "2024-12-26T10:00:00Z",
                    "temperature": t, "humidity": h, "status": "OK"
                }).to_string();
                let r = Reading::parse(payload.as_bytes(), &Limits::default(), &TimeBounds::unbounded()).expect("valid");
                prop_assert_eq!(r.temperature.to_bits(), t.to_bits());
                prop_assert_eq!(r.humidity.to_bits(), h.to_bits());
            }
        }
    }
}
