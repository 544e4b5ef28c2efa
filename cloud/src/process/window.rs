//! The pure heart of `process`: dedup, filter and per-minute windows for one raw partition.
//!
//! [`Processor`] is handed each input of its partition in offset order (a record's bytes and
//! Kafka timestamp, or a tick's time) and returns what to emit. It reads no clock and does no
//! I/O, so the same inputs from the same [`WindowState`] always give the same outputs — the
//! property a replay from a checkpoint relies on (see the property tests below).
//!
//! For one input, in this order:
//! 1. **Decode** with [`RawRecord::parse`]. A value that is not a valid record becomes a
//!    `deadletter` output (reason from the contract), with `node_id`/`seq` when they can be read.
//! 2. **Dedup** on `(node_id, seq)`: `high[node]` is the largest `seq` seen; `seq <= high` is a
//!    duplicate, dropped without output. Exact, without a per-record set, because the agent keys
//!    by `device_id` with a deterministic partitioner and produces a node's records in `seq`
//!    order with an idempotent, gapless producer: the first copy of each of a node's records
//!    reaches a partition in increasing `seq` order, and any later copy (an agent resend after a
//!    crash) has a `seq` at or below what the partition already carried.
//! 3. **Filter**: `status != "OK"` → `rejected` (`status_not_ok`); else `temperature >
//!    temperature_max` → `rejected` (`temperature_above_max`); else `filtered`. Rejected readings
//!    do not enter windows.
//! 4. **Window** (filtered readings): the minute `[start, start + 60s)` holding the event time,
//!    per device and all-devices. If that window is already closed (its end is at or below the
//!    watermark) the record is *late*: it is emitted as two late corrections — a per-device and
//!    an all-devices delta with `late: true` — instead of being added.
//! 5. **Clock**: `max_event` = the largest event time seen (records and ticks); watermark =
//!    `max_event - allowed_lateness`. Every open window whose end is at or below the watermark
//!    closes, oldest first: one aggregate per device (in device order) to the own partition, and
//!    one all-devices partial to partition 0.

use std::borrow::Cow;
use std::collections::BTreeMap;

use edgeflow_contract::{Limits, RawRecord};
use serde::{Deserialize, Serialize};

use crate::processed::{AggregateOut, DeadLetterOut, FilterReason, Processed, ReadingOut, Source, Sums};

/// Length of a window.
pub const WINDOW_MS: i64 = 60_000;

/// The start of the window holding `t`.
pub fn window_start(t: i64) -> i64 {
    t.div_euclid(WINDOW_MS) * WINDOW_MS
}

/// The processing rules (from `[process]`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rules {
    /// Readings above this temperature are rejected.
    pub temperature_max: f64,
    /// How far the watermark trails the largest event time.
    pub allowed_lateness_ms: i64,
}

impl Default for Rules {
    fn default() -> Self {
        Self { temperature_max: 100.0, allowed_lateness_ms: 30_000 }
    }
}

/// Everything a replay needs to continue exactly: small (nodes, open windows), so it travels
/// whole in each checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    /// Largest `seq` seen per node.
    pub high: BTreeMap<String, u64>,
    /// Largest event time seen (records and ticks).
    pub max_event_ms: Option<i64>,
    /// Open windows by start.
    pub windows: BTreeMap<i64, OpenWindow>,
}

/// The accumulators of one open minute.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OpenWindow {
    pub devices: BTreeMap<String, Sums>,
    pub all: Sums,
}

impl WindowState {
    /// The watermark, once any event time has been seen.
    pub fn watermark(&self, rules: &Rules) -> Option<i64> {
        self.max_event_ms.map(|m| m.saturating_sub(rules.allowed_lateness_ms))
    }
}

/// Where an output goes on `processed-data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// The partition with the input partition's number.
    Own,
    /// Partition 0, where all-devices partials meet.
    AllDevices,
}

/// One output with its destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Emitted<'a> {
    pub dest: Dest,
    pub value: Processed<'a>,
}

/// What one input did, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Outcome {
    pub kind: OutcomeKind,
    /// The reading fell in a window already closed.
    pub late: bool,
    /// Per-device aggregates emitted by closing windows.
    pub device_windows: u32,
    /// All-devices partials emitted by closing windows.
    pub partial_windows: u32,
}

/// How an input was classified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutcomeKind {
    #[default]
    Tick,
    Filtered,
    Rejected(FilterReason),
    Duplicate,
    /// Not a valid record; the reason's name.
    DeadLetter(&'static str),
}

/// The dedup/filter/window state machine of one raw partition.
#[derive(Debug, Clone)]
pub struct Processor {
    partition: i32,
    rules: Rules,
    limits: Limits,
    state: WindowState,
}

/// The provenance fields of a value that failed validation, when they can still be read.
#[derive(Deserialize)]
struct LooseProvenance<'a> {
    #[serde(borrow, default)]
    node_id: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
}

impl Processor {
    /// A processor for raw partition `partition`, starting from `state`.
    pub fn new(partition: i32, rules: Rules, state: WindowState) -> Self {
        Self { partition, rules, limits: Limits::default(), state }
    }

    pub fn state(&self) -> &WindowState {
        &self.state
    }

    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// Number of open windows (a gauge).
    pub fn open_windows(&self) -> usize {
        self.state.windows.len()
    }

    /// Applies one raw-data record at `offset`; `kafka_timestamp_ms` is the broker's timestamp
    /// (used only as a dead letter's time).
    pub fn record<'a>(
        &mut self,
        offset: i64,
        value: &'a [u8],
        kafka_timestamp_ms: Option<i64>,
        out: &mut Vec<Emitted<'a>>,
    ) -> Outcome {
        let source = Source { partition: self.partition, offset };
        let record = match RawRecord::parse(value, &self.limits) {
            Ok(r) => r,
            Err(rejection) => {
                let loose: Option<LooseProvenance<'a>> = serde_json::from_slice(value).ok();
                let (node_id, seq) = loose.map(|l| (l.node_id, l.seq)).unwrap_or((None, None));
                if let (Some(node), Some(seq)) = (&node_id, seq)
                    && self.is_duplicate(node, seq)
                {
                    return Outcome { kind: OutcomeKind::Duplicate, ..Outcome::default() };
                }
                out.push(Emitted {
                    dest: Dest::Own,
                    value: Processed::DeadLetter(DeadLetterOut {
                        source,
                        reason: Cow::Borrowed(rejection.reason.as_str()),
                        detail: Cow::Owned(rejection.detail),
                        node_id,
                        seq: seq.filter(|s| i64::try_from(*s).is_ok()),
                        received_at_ms: kafka_timestamp_ms.unwrap_or(0),
                        payload: Cow::Borrowed(value),
                    }),
                });
                return Outcome { kind: OutcomeKind::DeadLetter(rejection.reason.as_str()), ..Outcome::default() };
            }
        };
        let node = &record.provenance.node_id;
        let seq = record.provenance.seq;
        if self.is_duplicate(node, seq) {
            return Outcome { kind: OutcomeKind::Duplicate, ..Outcome::default() };
        }
        if i64::try_from(seq).is_err() {
            // Parquet (and most engines) store the sequence as a signed 64-bit integer.
            out.push(Emitted {
                dest: Dest::Own,
                value: Processed::DeadLetter(DeadLetterOut {
                    source,
                    reason: Cow::Borrowed(SEQ_OUT_OF_RANGE),
                    detail: Cow::Owned(format!("seq {seq} exceeds the signed 64-bit range")),
                    node_id: Some(record.provenance.node_id),
                    seq: None,
                    received_at_ms: kafka_timestamp_ms.unwrap_or(0),
                    payload: Cow::Borrowed(value),
                }),
            });
            return Outcome { kind: OutcomeKind::DeadLetter(SEQ_OUT_OF_RANGE), ..Outcome::default() };
        }

        let r = record.reading;
        let reason = if r.status != "OK" {
            Some(FilterReason::StatusNotOk)
        } else if r.temperature > self.rules.temperature_max {
            Some(FilterReason::TemperatureAboveMax)
        } else {
            None
        };
        let (t, temperature, humidity) = (r.event_time_ms, r.temperature, r.humidity);
        let device = r.device_id.clone();
        out.push(Emitted {
            dest: Dest::Own,
            value: Processed::Reading(ReadingOut {
                source,
                reason,
                device_id: r.device_id,
                timestamp: r.timestamp,
                event_time_ms: t,
                temperature,
                humidity,
                status: r.status,
                node_id: record.provenance.node_id,
                seq,
            }),
        });
        let mut outcome =
            Outcome { kind: reason.map_or(OutcomeKind::Filtered, OutcomeKind::Rejected), ..Outcome::default() };
        if reason.is_none() {
            let start = window_start(t);
            let closed = self.state.watermark(&self.rules).is_some_and(|w| start.saturating_add(WINDOW_MS) <= w);
            let sums = Sums::of(temperature, humidity);
            if closed {
                outcome.late = true;
                out.push(Emitted {
                    dest: Dest::Own,
                    value: Processed::Aggregate(AggregateOut {
                        source,
                        device_id: Some(device),
                        window_start_ms: start,
                        sums,
                        late: true,
                    }),
                });
                out.push(Emitted {
                    dest: Dest::AllDevices,
                    value: Processed::Aggregate(AggregateOut {
                        source,
                        device_id: None,
                        window_start_ms: start,
                        sums,
                        late: true,
                    }),
                });
            } else {
                let window = self.state.windows.entry(start).or_default();
                match window.devices.get_mut(device.as_ref()) {
                    Some(acc) => acc.add(temperature, humidity),
                    None => {
                        window.devices.insert(device.into_owned(), sums);
                    }
                }
                window.all.merge(&sums);
            }
        }
        self.advance(source, t, out, &mut outcome);
        outcome
    }

    /// Applies a tick at `offset`: the clock advances to `time_ms` as if a record had that
    /// event time.
    pub fn tick<'a>(&mut self, offset: i64, time_ms: i64, out: &mut Vec<Emitted<'a>>) -> Outcome {
        let mut outcome = Outcome::default();
        self.advance(Source { partition: self.partition, offset }, time_ms, out, &mut outcome);
        outcome
    }

    fn is_duplicate(&mut self, node: &str, seq: u64) -> bool {
        match self.state.high.get_mut(node) {
            Some(high) if seq <= *high => true,
            Some(high) => {
                *high = seq;
                false
            }
            None => {
                self.state.high.insert(node.to_owned(), seq);
                false
            }
        }
    }

    fn advance<'a>(&mut self, source: Source, t: i64, out: &mut Vec<Emitted<'a>>, outcome: &mut Outcome) {
        if self.state.max_event_ms.is_some_and(|m| m >= t) {
            return;
        }
        self.state.max_event_ms = Some(t);
        let watermark = t.saturating_sub(self.rules.allowed_lateness_ms);
        while let Some(entry) = self.state.windows.first_entry() {
            let start = *entry.key();
            if start.saturating_add(WINDOW_MS) > watermark {
                break;
            }
            let window = entry.remove();
            for (device, sums) in window.devices {
                outcome.device_windows += 1;
                out.push(Emitted {
                    dest: Dest::Own,
                    value: Processed::Aggregate(AggregateOut {
                        source,
                        device_id: Some(Cow::Owned(device)),
                        window_start_ms: start,
                        sums,
                        late: false,
                    }),
                });
            }
            if window.all.count > 0 {
                outcome.partial_windows += 1;
                out.push(Emitted {
                    dest: Dest::AllDevices,
                    value: Processed::Aggregate(AggregateOut {
                        source,
                        device_id: None,
                        window_start_ms: start,
                        sums: window.all,
                        late: false,
                    }),
                });
            }
        }
    }
}

/// Dead-letter reason for a `seq` beyond the signed 64-bit range.
pub const SEQ_OUT_OF_RANGE: &str = "seq_out_of_range";

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_735_207_200_000; // 2024-12-26T10:00:00Z

    fn raw(device: &str, t: i64, temperature: f64, status: &str, node: &str, seq: u64) -> Vec<u8> {
        let ts = chrono::DateTime::from_timestamp_millis(t)
            .expect("valid time")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        format!(
            r#"{{"device_id":"{device}","timestamp":"{ts}","temperature":{temperature},"humidity":50,"status":"{status}","node_id":"{node}","seq":{seq}}}"#
        )
        .into_bytes()
    }

    fn rules() -> Rules {
        Rules { temperature_max: 100.0, allowed_lateness_ms: 10_000 }
    }

    fn aggregates(out: &[Emitted<'_>]) -> Vec<(Option<String>, i64, u64, f64, bool)> {
        out.iter()
            .filter_map(|e| match &e.value {
                Processed::Aggregate(a) => Some((
                    a.device_id.as_deref().map(str::to_owned),
                    a.window_start_ms,
                    a.sums.count,
                    a.sums.temperature_sum,
                    a.late,
                )),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn windows_close_when_the_watermark_passes_their_end() {
        let mut p = Processor::new(3, rules(), WindowState::default());
        let inputs = [
            raw("a", T0 + 1_000, 10.0, "OK", "n", 1),
            raw("b", T0 + 2_000, 20.0, "OK", "n", 2),
            raw("a", T0 + 30_000, 30.0, "OK", "n", 3),
        ];
        let mut out = Vec::new();
        for (i, v) in inputs.iter().enumerate() {
            p.record(i as i64, v, None, &mut out);
        }
        assert!(aggregates(&out).is_empty());
        // 10:01:09.999 - 10s lateness = 10:00:59.999: not yet.
        out.clear();
        let v = raw("c", T0 + 69_999, 40.0, "OK", "n", 4);
        p.record(3, &v, None, &mut out);
        assert!(aggregates(&out).is_empty());
        // 10:01:10 - 10s = 10:01:00: the first minute closes.
        out.clear();
        let v = raw("c", T0 + 70_000, 50.0, "OK", "n", 5);
        let outcome = p.record(4, &v, None, &mut out);
        assert_eq!(outcome.device_windows, 2);
        assert_eq!(outcome.partial_windows, 1);
        assert_eq!(
            aggregates(&out),
            vec![
                (Some("a".into()), T0, 2, 40.0, false),
                (Some("b".into()), T0, 1, 20.0, false),
                (None, T0, 3, 60.0, false)
            ]
        );
        assert!(out.iter().all(|e| e.value.source() == Source { partition: 3, offset: 4 }));
        assert_eq!(out.last().map(|e| e.dest), Some(Dest::AllDevices));
    }

    #[test]
    fn duplicates_are_dropped_and_late_records_become_corrections() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        let mut out = Vec::new();
        let a1 = raw("a", T0 + 5_000, 10.0, "OK", "n", 1);
        p.record(0, &a1, None, &mut out);
        let a2 = raw("a", T0 + 75_000, 11.0, "OK", "n", 2);
        p.record(1, &a2, None, &mut out);
        out.clear();
        // The agent resent seq 1 after a crash: dropped.
        assert_eq!(p.record(2, &a1, None, &mut out).kind, OutcomeKind::Duplicate);
        assert!(out.is_empty());
        // A new record for the closed minute: late, corrected, still emitted as a reading.
        let late = raw("b", T0 + 59_000, 12.0, "OK", "n", 3);
        let outcome = p.record(3, &late, None, &mut out);
        assert!(outcome.late);
        assert_eq!(out.len(), 3);
        assert!(matches!(&out[0].value, Processed::Reading(r) if r.seq == 3 && r.reason.is_none()));
        assert_eq!(aggregates(&out), vec![(Some("b".into()), T0, 1, 12.0, true), (None, T0, 1, 12.0, true)]);
        assert_eq!(out[2].dest, Dest::AllDevices);
    }

    #[test]
    fn out_of_order_records_within_lateness_join_their_window() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        let mut out = Vec::new();
        let values: Vec<Vec<u8>> = [(T0 + 61_000, 1), (T0 + 59_000, 2), (T0 + 65_000, 3), (T0 + 2_000, 4)]
            .into_iter()
            .enumerate()
            .map(|(i, (t, seq))| raw("a", t, 10.0 + i as f64, "OK", "n", seq))
            .collect();
        for (i, v) in values.iter().enumerate() {
            p.record(i as i64, v, None, &mut out);
        }
        assert!(aggregates(&out).is_empty(), "nothing closed before 10:01:10");
        out.clear();
        p.tick(9, T0 + 130_000, &mut out);
        assert_eq!(
            aggregates(&out),
            vec![
                (Some("a".into()), T0, 2, 11.0 + 13.0, false),
                (None, T0, 2, 24.0, false),
                (Some("a".into()), T0 + 60_000, 2, 10.0 + 12.0, false),
                (None, T0 + 60_000, 2, 22.0, false),
            ]
        );
    }

    #[test]
    fn filter_rejects_by_reason_and_keeps_them_out_of_windows() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        let mut out = Vec::new();
        let bad_status = raw("a", T0, 10.0, "ERROR", "n", 1);
        let hot = raw("a", T0, 100.5, "OK", "n", 2);
        let edge = raw("a", T0, 100.0, "OK", "n", 3);
        assert_eq!(p.record(0, &bad_status, None, &mut out).kind, OutcomeKind::Rejected(FilterReason::StatusNotOk));
        assert_eq!(p.record(1, &hot, None, &mut out).kind, OutcomeKind::Rejected(FilterReason::TemperatureAboveMax));
        assert_eq!(p.record(2, &edge, None, &mut out).kind, OutcomeKind::Filtered);
        out.clear();
        p.tick(3, T0 + 200_000, &mut out);
        assert_eq!(aggregates(&out), vec![(Some("a".into()), T0, 1, 100.0, false), (None, T0, 1, 100.0, false)]);
    }

    #[test]
    fn bad_records_become_dead_letters_with_what_can_be_read() {
        let mut p = Processor::new(1, rules(), WindowState::default());
        let mut out = Vec::new();
        let o = p.record(0, b"\xff not json", Some(T0), &mut out);
        assert_eq!(o.kind, OutcomeKind::DeadLetter("not_utf8"));
        let wrong = br#"{"device_id":"a","timestamp":"2024-12-26T10:00:00Z","temperature":"hot","humidity":1,"status":"OK","node_id":"n","seq":7}"#;
        assert_eq!(p.record(1, wrong, Some(T0), &mut out).kind, OutcomeKind::DeadLetter("wrong_type"));
        // The same bad record resent by the agent is a duplicate like any other.
        assert_eq!(p.record(2, wrong, Some(T0), &mut out).kind, OutcomeKind::Duplicate);
        let huge_seq = raw("a", T0, 1.0, "OK", "n", u64::MAX);
        assert_eq!(p.record(3, &huge_seq, Some(T0), &mut out).kind, OutcomeKind::DeadLetter(SEQ_OUT_OF_RANGE));
        assert_eq!(out.len(), 3);
        match &out[1].value {
            Processed::DeadLetter(d) => {
                assert_eq!((d.node_id.as_deref(), d.seq, d.received_at_ms), (Some("n"), Some(7), T0));
                assert_eq!(d.payload.as_ref(), wrong);
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
        assert_eq!(p.state().max_event_ms, None, "bad records never move the clock");
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::{BTreeMap, BTreeSet};

        #[derive(Debug, Clone)]
        enum In {
            Rec { device: u8, node: u8, seq: u64, dt: i64, temperature: f64, ok: bool },
            Bad,
            Tick(i64),
        }

        fn input() -> impl Strategy<Value = In> {
            prop_oneof![
                8 => (0u8..4, 0u8..2, 0u64..40, -90_000i64..90_000, -20.0f64..120.0, proptest::bool::weighted(0.9))
                    .prop_map(|(device, node, seq, dt, temperature, ok)| In::Rec { device, node, seq, dt, temperature, ok }),
                1 => Just(In::Bad),
                1 => (0i64..200_000).prop_map(In::Tick),
            ]
        }

        /// Builds the byte values of a scenario whose event times drift forward.
        fn values(inputs: &[In]) -> Vec<Option<Vec<u8>>> {
            let mut now = T0;
            inputs
                .iter()
                .map(|i| match i {
                    In::Rec { device, node, seq, dt, temperature, ok } => {
                        now += 7_000;
                        let status = if *ok { "OK" } else { "FAIL" };
                        Some(raw(
                            &format!("d{device}"),
                            now + dt,
                            (temperature * 10.0).round() / 10.0,
                            status,
                            &format!("n{node}"),
                            *seq,
                        ))
                    }
                    In::Bad => Some(b"{\"oops\":".to_vec()),
                    In::Tick(_) => None,
                })
                .collect()
        }

        fn run(p: &mut Processor, inputs: &[In], values: &[Option<Vec<u8>>], from: usize) -> Vec<(i64, Vec<u8>)> {
            let mut all = Vec::new();
            for (i, (input, value)) in inputs.iter().zip(values).enumerate().skip(from) {
                let mut out = Vec::new();
                match (input, value) {
                    (In::Tick(dt), _) => {
                        p.tick(i as i64, T0 + 7_000 * i as i64 + dt, &mut out);
                    }
                    (_, Some(v)) => {
                        p.record(i as i64, v, Some(T0), &mut out);
                    }
                    _ => unreachable!("records always have a value"),
                }
                all.extend(out.iter().map(|e| (if e.dest == Dest::Own { 1 } else { 0 }, e.value.to_json())));
            }
            all
        }

        proptest! {
            /// Restoring the state taken before any input (through its JSON form, as a
            /// checkpoint does) and replaying from there gives byte-identical outputs.
            #[test]
            fn replay_from_any_checkpoint_yields_identical_outputs(
                inputs in proptest::collection::vec(input(), 1..120),
                cut in any::<proptest::sample::Index>(),
            ) {
                let values = values(&inputs);
                let k = cut.index(inputs.len());
                let mut full = Processor::new(4, rules(), WindowState::default());
                let head = run(&mut full, &inputs[..k], &values[..k], 0);
                let checkpoint = serde_json::to_vec(full.state()).expect("state encodes");
                let tail = run(&mut full, &inputs, &values, k);

                let state: WindowState = serde_json::from_slice(&checkpoint).expect("state decodes");
                let mut restored = Processor::new(4, rules(), state);
                let replayed = run(&mut restored, &inputs, &values, k);
                prop_assert_eq!(replayed, tail);
                prop_assert_eq!(restored.state(), full.state());
                let _ = head;
            }

            /// Each (node, seq) is emitted at most once, and once everything is closed the
            /// aggregates (on-time plus late corrections) equal the sums of the filtered readings.
            #[test]
            fn aggregates_add_up_and_nothing_is_emitted_twice(inputs in proptest::collection::vec(input(), 1..150)) {
                let values = values(&inputs);
                let mut p = Processor::new(0, rules(), WindowState::default());
                let mut out = Vec::new();
                for (i, (input, value)) in inputs.iter().zip(&values).enumerate() {
                    match (input, value) {
                        (In::Tick(dt), _) => { p.tick(i as i64, T0 + 7_000 * i as i64 + dt, &mut out); }
                        (_, Some(v)) => { p.record(i as i64, v, Some(T0), &mut out); }
                        _ => unreachable!(),
                    }
                }
                p.tick(inputs.len() as i64, i64::MAX / 2, &mut out);
                prop_assert!(p.state().windows.is_empty());

                let mut seen = BTreeSet::new();
                let mut expected: BTreeMap<(Option<String>, i64), (u64, f64)> = BTreeMap::new();
                let mut got: BTreeMap<(Option<String>, i64), (u64, f64)> = BTreeMap::new();
                for e in &out {
                    match &e.value {
                        Processed::Reading(r) => {
                            prop_assert!(seen.insert((r.node_id.to_string(), r.seq)), "emitted twice");
                            if r.reason.is_none() {
                                for key in [Some(r.device_id.to_string()), None] {
                                    let x = expected.entry((key, window_start(r.event_time_ms))).or_default();
                                    x.0 += 1;
                                    x.1 += r.temperature;
                                }
                            }
                        }
                        Processed::Aggregate(a) => {
                            let x = got.entry((a.device_id.as_deref().map(str::to_owned), a.window_start_ms)).or_default();
                            x.0 += a.sums.count;
                            x.1 += a.sums.temperature_sum;
                        }
                        Processed::DeadLetter(_) => {}
                    }
                }
                prop_assert_eq!(expected.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
                for (k, (count, sum)) in &expected {
                    let (gc, gs) = got[k];
                    prop_assert_eq!(*count, gc);
                    prop_assert!((sum - gs).abs() <= 1e-9 * sum.abs().max(1.0), "{:?}: {} vs {}", k, sum, gs);
                }
            }
        }
    }
}
