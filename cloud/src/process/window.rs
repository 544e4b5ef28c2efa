//! The pure heart of `process`: dedup, filter and per-minute windows for one raw partition.
//!
//! [`Processor`] is handed each input of its partition in offset order (a record's bytes and
//! Kafka timestamp, or a tick's time) and returns what to emit. It reads no clock and does no
//! I/O, so the same inputs from the same [`WindowState`] always give the same outputs — the
//! property a replay from a checkpoint relies on (see the property tests below).
//!
//! For one input, in this order:
//! 1. **Decode** with [`RawRecord::parse`]. A value that is not a valid record becomes a
//!    `deadletter` output (reason from the contract). The provenance it claims is not trusted:
//!    it is quoted in the dead letter's detail, and the dead letter has no `node_id`/`seq`.
//!    A well-formed record is refused — a dead letter *with* its `node_id` (and `seq`) — when a
//!    number is out of range (`number_out_of_range`), its `seq` is beyond the signed 64-bit
//!    range (`seq_out_of_range`, no `seq`) or its event time lies more than `max_future_skew`
//!    ahead of its broker timestamp (`timestamp_out_of_range`).
//!    A dead letter carries at most [`DEADLETTER_PAYLOAD_MAX`] bytes of the value (and its size),
//!    so it always fits a Kafka message. **Nothing refused changes the state** (high-waters,
//!    clock, windows): one forged value cannot hide the records that follow it.
//! 2. **Dedup** on `(node_id, epoch, seq)`: per node and epoch (the agent run that committed the
//!    record), the largest `seq` taken. Exact, without a per-record set, because the agent keys
//!    by `device_id` with a deterministic partitioner and produces a node's records in `seq`
//!    order with an idempotent, gapless producer: the first copy of each record of an epoch
//!    reaches a partition in increasing `seq` order, and any later copy (a re-send after a crash
//!    or a failed delivery) has a `seq` at or below what the partition already carried — and the
//!    agent marks it with the [`RESEND_HEADER`] header, because it knows what it may have sent
//!    before. So a record at or below its epoch's high-water is
//!    * marked: a **duplicate**, dropped without output (counted);
//!    * not marked: a **regression** — a producer reusing `seq`s of an epoch with other content
//!      (a forged or buggy writer, a process rolled back in memory). It is a dead letter
//!      `seq_regression` with its node and epoch (no `seq`: the one it claims is taken), never a
//!      silent drop; an alert watches the counter.
//!
//!    A new epoch has no high-water, so a restored or copied buffer, a second agent with the
//!    same `node_id` or a new buffer whose clock-based `seq` starts below an old one loses
//!    nothing. When an epoch that another one had superseded on a partition takes a record
//!    again, two agents are writing as one node: the records flow, and the conflict is counted
//!    and logged. Records of agents older than epochs (`epoch: None`) keep the per-node
//!    high-water of before (`high`), where any copy at or below it is a duplicate.
//! 3. **Filter**: `status != "OK"` → `rejected` (`status_not_ok`); else `temperature >
//!    temperature_max` → `rejected` (`temperature_above_max`); else `filtered`. Rejected readings
//!    do not enter windows.
//! 4. **Window** (filtered readings): the minute `[start, start + 60s)` holding the event time,
//!    per device and all-devices. If that window is already closed (its end is at or below the
//!    watermark) the record is *late*: it is emitted as two late corrections — a per-device and
//!    an all-devices delta with `late: true` — instead of being added.
//! 5. **Clock**: `max_event` = the largest event time seen (records and ticks; a tick counts as
//!    at most its broker timestamp); watermark =
//!    `max_event - allowed_lateness`. Every open window whose end is at or below the watermark
//!    closes, oldest first: one aggregate per device (in device order) to the own partition, and
//!    one all-devices partial to partition 0.

use std::borrow::Cow;
use std::collections::BTreeMap;

use edgeflow_contract::{Limits, Provenance, RawRecord, RejectReason};
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
    /// How far ahead of its broker timestamp a record's event time may be; a record further
    /// ahead is a dead letter. (A tick never moves the clock past its broker timestamp.)
    pub max_future_skew_ms: i64,
}

impl Default for Rules {
    fn default() -> Self {
        Self { temperature_max: 100.0, allowed_lateness_ms: 30_000, max_future_skew_ms: 15 * 60_000 }
    }
}

/// Everything a replay needs to continue exactly: small (nodes, epochs, open windows), so it
/// travels whole in each checkpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WindowState {
    /// Largest `seq` seen per node, for records without an epoch (agents older than epochs).
    pub high: BTreeMap<String, u64>,
    /// Per node, the dedup state of its epochs (absent from checkpoints of older versions).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub epochs: BTreeMap<String, NodeEpochs>,
    /// Largest event time seen (records and ticks).
    pub max_event_ms: Option<i64>,
    /// Open windows by start.
    pub windows: BTreeMap<i64, OpenWindow>,
}

/// Most epochs remembered per node and partition; beyond it the one that advanced longest ago is
/// forgotten. An agent run takes one epoch, and re-sends come only from the runs whose entries
/// are still in its buffer, so this covers 64 restarts between two deliveries.
pub const MAX_EPOCHS_PER_NODE: usize = 64;

/// A node's epochs on one partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeEpochs {
    /// The epoch of the newest record taken.
    pub current: String,
    /// Per epoch: the largest `seq` taken and the raw offset of that record (for eviction).
    pub high: BTreeMap<String, EpochHigh>,
}

/// An epoch's high-water: `[seq, offset]` in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochHigh(pub u64, pub i64);

/// How dedup classified a valid record.
enum Dedup {
    /// New: taken; `conflict` when it shows two writers of its node.
    Take {
        conflict: bool,
    },
    Duplicate,
    /// At or below `high` of its epoch without the re-send mark.
    Regression {
        high: u64,
    },
}

/// Two agents writing as one node: seen on a partition when an epoch that another had
/// superseded takes a record again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterConflict {
    pub node_id: String,
    /// The epoch that took the record, and the one it took over from.
    pub epoch: String,
    pub other: String,
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
    /// The record showed two agents writing as one node ([`Processor::take_conflict`]).
    pub writer_conflict: bool,
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
    /// The newest writer conflict, for the caller to report (not state: replay finds it again).
    conflict: Option<WriterConflict>,
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
        Self { partition, rules, limits: Limits::default(), state, conflict: None }
    }

    /// The newest writer conflict since the last call.
    pub fn take_conflict(&mut self) -> Option<WriterConflict> {
        self.conflict.take()
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
    /// (a dead letter's time, and the bound on how far ahead an event time may be); `resend`
    /// whether it carries the agent's [`RESEND_HEADER`] mark.
    ///
    /// Only a valid record touches the state: a value that does not parse, a `seq` beyond the
    /// signed 64-bit range or an event time too far ahead of the broker's timestamp becomes a
    /// dead letter and changes neither the dedup high-waters nor the clock, so one forged record
    /// cannot hide the records that follow it.
    pub fn record<'a>(
        &mut self,
        offset: i64,
        value: &'a [u8],
        kafka_timestamp_ms: Option<i64>,
        resend: bool,
        out: &mut Vec<Emitted<'a>>,
    ) -> Outcome {
        let source = Source { partition: self.partition, offset };
        let received_at_ms = kafka_timestamp_ms.unwrap_or(0);
        let record = match RawRecord::parse(value, &self.limits) {
            Ok(r) => r,
            Err(rejection) => {
                let reason = rejection.reason.as_str();
                if let Some(p) = RawRecord::refused_provenance(value, &rejection, &self.limits) {
                    // A well-formed record a rule refuses (a number out of range): provenance.
                    let (node, seq) = (Some(p.node_id), Some(p.seq));
                    out.push(dead_letter(
                        source,
                        reason,
                        rejection.detail,
                        (node, p.epoch, seq),
                        received_at_ms,
                        value,
                    ));
                    return Outcome { kind: OutcomeKind::DeadLetter(reason), ..Outcome::default() };
                }
                // What an invalid value claims as provenance is not provenance: it goes into the
                // detail for the operator, never into the dead letter's node/seq (which `verify`
                // counts) nor into the dedup state.
                let mut detail = rejection.detail;
                let loose: Option<LooseProvenance<'a>> = if value.len() <= self.limits.max_payload_bytes {
                    serde_json::from_slice(value).ok()
                } else {
                    None
                };
                if let Some(LooseProvenance { node_id, seq }) = loose
                    && (node_id.is_some() || seq.is_some())
                {
                    let node =
                        node_id.as_deref().map(|n| n.chars().take(self.limits.max_device_id_bytes).collect::<String>());
                    detail.push_str(&format!(" (claims node_id {node:?}, seq {seq:?})"));
                }
                out.push(dead_letter(source, reason, detail, (None, None, None), received_at_ms, value));
                return Outcome { kind: OutcomeKind::DeadLetter(reason), ..Outcome::default() };
            }
        };
        let seq = record.provenance.seq;
        let t = record.reading.event_time_ms;
        let refused = if i64::try_from(seq).is_err() {
            // Parquet (and most engines) store the sequence as a signed 64-bit integer.
            Some((SEQ_OUT_OF_RANGE, format!("seq {seq} exceeds the signed 64-bit range")))
        } else if let Some(ts) = kafka_timestamp_ms
            && t > ts.saturating_add(self.rules.max_future_skew_ms)
        {
            Some((
                RejectReason::TimestampOutOfRange.as_str(),
                format!(
                    "timestamp is {}s ahead of the broker's timestamp (at most {}s allowed)",
                    (t - ts) / 1000,
                    self.rules.max_future_skew_ms / 1000
                ),
            ))
        } else {
            None
        };
        if let Some((reason, detail)) = refused {
            let Provenance { node_id, epoch, .. } = record.provenance;
            out.push(dead_letter(source, reason, detail, (Some(node_id), epoch, Some(seq)), received_at_ms, value));
            return Outcome { kind: OutcomeKind::DeadLetter(reason), ..Outcome::default() };
        }
        let writer_conflict = match self.dedup(&record.provenance, resend, offset) {
            Dedup::Take { conflict } => conflict,
            Dedup::Duplicate => return Outcome { kind: OutcomeKind::Duplicate, ..Outcome::default() },
            Dedup::Regression { high } => {
                let Provenance { node_id, epoch, .. } = record.provenance;
                let detail = format!(
                    "seq {seq} is at or below {high}, the highest seq of epoch {} of node {node_id:?} on this partition, and is not marked as a re-send",
                    epoch.as_deref().unwrap_or("-")
                );
                out.push(dead_letter(
                    source,
                    SEQ_REGRESSION,
                    detail,
                    (Some(node_id), epoch, None),
                    received_at_ms,
                    value,
                ));
                return Outcome { kind: OutcomeKind::DeadLetter(SEQ_REGRESSION), ..Outcome::default() };
            }
        };

        let r = record.reading;
        let reason = if r.status != "OK" {
            Some(FilterReason::StatusNotOk)
        } else if r.temperature > self.rules.temperature_max {
            Some(FilterReason::TemperatureAboveMax)
        } else {
            None
        };
        let (temperature, humidity) = (r.temperature, r.humidity);
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
                epoch: record.provenance.epoch,
                seq,
            }),
        });
        let mut outcome = Outcome {
            kind: reason.map_or(OutcomeKind::Filtered, OutcomeKind::Rejected),
            writer_conflict,
            ..Outcome::default()
        };
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
    /// event time, but never past the tick's broker timestamp. A tick is written with the wall
    /// clock of its writer, which also stamps it, so the bound costs a real tick nothing and
    /// keeps a forged one from moving the clock ahead of the broker's time.
    pub fn tick<'a>(
        &mut self,
        offset: i64,
        time_ms: i64,
        kafka_timestamp_ms: Option<i64>,
        out: &mut Vec<Emitted<'a>>,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let time_ms = kafka_timestamp_ms.map_or(time_ms, |ts| time_ms.min(ts));
        self.advance(Source { partition: self.partition, offset }, time_ms, out, &mut outcome);
        outcome
    }

    /// Classifies a valid record and, when it is taken, raises its epoch's high-water.
    fn dedup(&mut self, p: &Provenance<'_>, resend: bool, offset: i64) -> Dedup {
        let (node, seq) = (p.node_id.as_ref(), p.seq);
        let Some(epoch) = p.epoch.as_deref() else {
            // An agent older than epochs: any copy at or below the node's high-water is one.
            return match self.state.high.get_mut(node) {
                Some(high) if seq <= *high => Dedup::Duplicate,
                Some(high) => {
                    *high = seq;
                    Dedup::Take { conflict: false }
                }
                None => {
                    self.state.high.insert(node.to_owned(), seq);
                    Dedup::Take { conflict: false }
                }
            };
        };
        let Some(n) = self.state.epochs.get_mut(node) else {
            let n = NodeEpochs {
                current: epoch.to_owned(),
                high: BTreeMap::from([(epoch.to_owned(), EpochHigh(seq, offset))]),
            };
            self.state.epochs.insert(node.to_owned(), n);
            return Dedup::Take { conflict: false };
        };
        let known = match n.high.get_mut(epoch) {
            Some(h) if seq <= h.0 => {
                return if resend { Dedup::Duplicate } else { Dedup::Regression { high: h.0 } };
            }
            Some(h) => {
                *h = EpochHigh(seq, offset);
                true
            }
            None => {
                n.high.insert(epoch.to_owned(), EpochHigh(seq, offset));
                if n.high.len() > MAX_EPOCHS_PER_NODE {
                    let oldest = n
                        .high
                        .iter()
                        .filter(|(e, _)| e.as_str() != epoch && **e != n.current)
                        .min_by_key(|(_, h)| h.1)
                        .map(|(e, _)| e.clone());
                    if let Some(oldest) = oldest {
                        n.high.remove(&oldest);
                    }
                }
                false
            }
        };
        if n.current == epoch {
            return Dedup::Take { conflict: false };
        }
        // A new epoch takes over (an agent restart); a known one taking a record again after
        // another took over means two writers of one node.
        let other = std::mem::replace(&mut n.current, epoch.to_owned());
        if !known {
            return Dedup::Take { conflict: false };
        }
        self.conflict = Some(WriterConflict { node_id: node.to_owned(), epoch: epoch.to_owned(), other });
        Dedup::Take { conflict: true }
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

/// The dead-letter reason of a record at or below its epoch's high-water that is not marked as a
/// re-send (see the module doc).
pub const SEQ_REGRESSION: &str = "seq_regression";

pub use edgeflow_contract::RESEND_HEADER;

/// The most of a refused value a dead letter carries: every valid record is smaller
/// ([`Limits::max_payload_bytes`]), and a dead letter must fit a Kafka message whatever the
/// producer of the raw value sent (a value near the broker's limit would otherwise make a dead
/// letter larger than the limit, which Kafka refuses, and the stage could not get past it).
pub const DEADLETTER_PAYLOAD_MAX: usize = 16 * 1024;

/// A dead letter for a refused raw value, its payload copy bounded by [`DEADLETTER_PAYLOAD_MAX`].
fn dead_letter<'a>(
    source: Source,
    reason: &'static str,
    mut detail: String,
    (node_id, epoch, seq): (Option<Cow<'a, str>>, Option<Cow<'a, str>>, Option<u64>),
    received_at_ms: i64,
    value: &'a [u8],
) -> Emitted<'a> {
    let payload = if value.len() > DEADLETTER_PAYLOAD_MAX {
        detail
            .push_str(&format!(" (payload truncated to its first {DEADLETTER_PAYLOAD_MAX} of {} bytes)", value.len()));
        &value[..DEADLETTER_PAYLOAD_MAX]
    } else {
        value
    };
    Emitted {
        dest: Dest::Own,
        value: Processed::DeadLetter(DeadLetterOut {
            source,
            reason: Cow::Borrowed(reason),
            detail: Cow::Owned(detail),
            node_id,
            epoch,
            seq: seq.filter(|s| i64::try_from(*s).is_ok()),
            received_at_ms,
            payload: Cow::Borrowed(payload),
            payload_size: value.len() as u64,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_735_207_200_000; // 2024-12-26T10:00:00Z

    fn raw(device: &str, t: i64, temperature: f64, status: &str, node: &str, seq: u64) -> Vec<u8> {
        raw_in(device, t, temperature, status, node, None, seq)
    }

    /// A raw record of `epoch` (`None`: an agent older than epochs).
    fn raw_in(
        device: &str,
        t: i64,
        temperature: f64,
        status: &str,
        node: &str,
        epoch: Option<&str>,
        seq: u64,
    ) -> Vec<u8> {
        let ts = chrono::DateTime::from_timestamp_millis(t)
            .expect("valid time")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let epoch = epoch.map(|e| format!(r#""epoch":"{e}","#)).unwrap_or_default();
        format!(
            r#"{{"device_id":"{device}","timestamp":"{ts}","temperature":{temperature},"humidity":50,"status":"{status}","node_id":"{node}",{epoch}"seq":{seq}}}"#
        )
        .into_bytes()
    }

    /// Issue 10, class 7: a node's new buffer (a clock behind, a restored copy, a second agent
    /// with its name) starts below the old high-water. Keyed on (node, seq), its records were
    /// all dropped as duplicates; per epoch they flow.
    #[test]
    fn a_new_epoch_below_the_old_high_water_loses_nothing() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        for seq in 1_000..1_005 {
            let v = raw_in("a", T0, 10.0, "OK", "n", Some("old"), seq);
            assert_eq!(p.record(seq as i64, &v, Some(T0), false, &mut Vec::new()).kind, OutcomeKind::Filtered);
        }
        for seq in 10..15 {
            let v = raw_in("a", T0, 10.0, "OK", "n", Some("new"), seq);
            let o = p.record(2_000 + seq as i64, &v, Some(T0), false, &mut Vec::new());
            assert_eq!((o.kind, o.writer_conflict), (OutcomeKind::Filtered, false), "seq {seq}");
        }
        let n = &p.state().epochs["n"];
        assert_eq!((n.current.as_str(), n.high["old"].0, n.high["new"].0), ("new", 1_004, 14));
    }

    /// A copy at or below its epoch's high-water is a duplicate only when the agent marked it
    /// as a possible re-send; unmarked it is a regression: a dead letter, loud, state unchanged.
    #[test]
    fn a_marked_copy_is_a_duplicate_and_an_unmarked_one_a_regression() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        for seq in 1..=3 {
            p.record(seq, &raw_in("a", T0, 10.0, "OK", "n", Some("e"), seq as u64), Some(T0), false, &mut Vec::new());
        }
        let before = p.state().clone();
        let resent = raw_in("a", T0, 10.0, "OK", "n", Some("e"), 2);
        assert_eq!(p.record(4, &resent, Some(T0), true, &mut Vec::new()).kind, OutcomeKind::Duplicate);
        let other = raw_in("a", T0, 99.0, "OK", "n", Some("e"), 3);
        let mut out = Vec::new();
        assert_eq!(p.record(5, &other, Some(T0), false, &mut out).kind, OutcomeKind::DeadLetter(SEQ_REGRESSION));
        let Processed::DeadLetter(d) = &out[0].value else { panic!("expected a dead letter") };
        assert_eq!((d.node_id.as_deref(), d.epoch.as_deref(), d.seq), (Some("n"), Some("e"), None));
        assert!(d.detail.contains("seq 3") && d.detail.contains("not marked"), "{}", d.detail);
        assert_eq!(p.state(), &before);
        // A marked record above the high-water is new (its first delivery was lost): taken.
        let later = raw_in("a", T0, 10.0, "OK", "n", Some("e"), 4);
        assert_eq!(p.record(6, &later, Some(T0), true, &mut Vec::new()).kind, OutcomeKind::Filtered);
        // Records of agents older than epochs keep the old rule: any copy is a duplicate.
        p.record(7, &raw("a", T0, 10.0, "OK", "old", 9), Some(T0), false, &mut Vec::new());
        assert_eq!(
            p.record(8, &raw("a", T0, 11.0, "OK", "old", 9), Some(T0), false, &mut Vec::new()).kind,
            OutcomeKind::Duplicate
        );
    }

    /// Two agents configured with one node_id: both flow, and the interleaving is reported;
    /// a restart (a new epoch taking over for good) is not.
    #[test]
    fn interleaved_epochs_of_one_node_are_a_writer_conflict() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        let mut conflicts = Vec::new();
        let seqs = [("a", 100), ("a", 101), ("b", 100), ("a", 102), ("b", 101), ("c", 200), ("c", 201)];
        for (i, (epoch, seq)) in seqs.into_iter().enumerate() {
            let o = p.record(
                i as i64,
                &raw_in("d", T0, 1.0, "OK", "n", Some(epoch), seq),
                Some(T0),
                false,
                &mut Vec::new(),
            );
            assert_eq!(o.kind, OutcomeKind::Filtered);
            conflicts.push(o.writer_conflict);
        }
        assert_eq!(conflicts, [false, false, false, true, true, false, false]);
        let c = p.take_conflict().expect("a conflict");
        assert_eq!((c.node_id.as_str(), c.epoch.as_str(), c.other.as_str()), ("n", "b", "a"));
    }

    /// A node's epochs are bounded: the one that advanced longest ago is forgotten.
    #[test]
    fn epochs_per_node_are_bounded() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        for i in 0..(MAX_EPOCHS_PER_NODE as i64 + 10) {
            p.record(i, &raw_in("d", T0, 1.0, "OK", "n", Some(&format!("e{i}")), 5), Some(T0), false, &mut Vec::new());
        }
        let n = &p.state().epochs["n"];
        assert_eq!(n.high.len(), MAX_EPOCHS_PER_NODE);
        assert!(!n.high.contains_key("e0") && n.high.contains_key(&format!("e{}", MAX_EPOCHS_PER_NODE + 9)));
    }

    /// A checkpoint written before epochs (`high` only) still restores.
    #[test]
    fn a_checkpoint_of_the_previous_version_restores() {
        let old = br#"{"high":{"pve-1":1735207200000042},"max_event_ms":1735207200000,"windows":{}}"#;
        let state: WindowState = serde_json::from_slice(old).expect("old checkpoint parses");
        assert_eq!((state.high["pve-1"], state.epochs.len()), (1_735_207_200_000_042, 0));
        assert_eq!(serde_json::to_vec(&state).expect("encodes"), old.to_vec(), "and writes the same form back");
    }

    fn rules() -> Rules {
        Rules { temperature_max: 100.0, allowed_lateness_ms: 10_000, max_future_skew_ms: 15 * 60_000 }
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
            p.record(i as i64, v, None, false, &mut out);
        }
        assert!(aggregates(&out).is_empty());
        // 10:01:09.999 - 10s lateness = 10:00:59.999: not yet.
        out.clear();
        let v = raw("c", T0 + 69_999, 40.0, "OK", "n", 4);
        p.record(3, &v, None, false, &mut out);
        assert!(aggregates(&out).is_empty());
        // 10:01:10 - 10s = 10:01:00: the first minute closes.
        out.clear();
        let v = raw("c", T0 + 70_000, 50.0, "OK", "n", 5);
        let outcome = p.record(4, &v, None, false, &mut out);
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
        p.record(0, &a1, None, false, &mut out);
        let a2 = raw("a", T0 + 75_000, 11.0, "OK", "n", 2);
        p.record(1, &a2, None, false, &mut out);
        out.clear();
        // The agent resent seq 1 after a crash: dropped.
        assert_eq!(p.record(2, &a1, None, false, &mut out).kind, OutcomeKind::Duplicate);
        assert!(out.is_empty());
        // A new record for the closed minute: late, corrected, still emitted as a reading.
        let late = raw("b", T0 + 59_000, 12.0, "OK", "n", 3);
        let outcome = p.record(3, &late, None, false, &mut out);
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
            p.record(i as i64, v, None, false, &mut out);
        }
        assert!(aggregates(&out).is_empty(), "nothing closed before 10:01:10");
        out.clear();
        p.tick(9, T0 + 130_000, None, &mut out);
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
        assert_eq!(
            p.record(0, &bad_status, None, false, &mut out).kind,
            OutcomeKind::Rejected(FilterReason::StatusNotOk)
        );
        assert_eq!(
            p.record(1, &hot, None, false, &mut out).kind,
            OutcomeKind::Rejected(FilterReason::TemperatureAboveMax)
        );
        assert_eq!(p.record(2, &edge, None, false, &mut out).kind, OutcomeKind::Filtered);
        out.clear();
        p.tick(3, T0 + 200_000, None, &mut out);
        assert_eq!(aggregates(&out), vec![(Some("a".into()), T0, 1, 100.0, false), (None, T0, 1, 100.0, false)]);
    }

    #[test]
    fn bad_records_become_dead_letters_with_what_can_be_read() {
        let mut p = Processor::new(1, rules(), WindowState::default());
        let mut out = Vec::new();
        let o = p.record(0, b"\xff not json", Some(T0), false, &mut out);
        assert_eq!(o.kind, OutcomeKind::DeadLetter("not_utf8"));
        let wrong = br#"{"device_id":"a","timestamp":"2024-12-26T10:00:00Z","temperature":"hot","humidity":1,"status":"OK","node_id":"n","seq":7}"#;
        assert_eq!(p.record(1, wrong, Some(T0), false, &mut out).kind, OutcomeKind::DeadLetter("wrong_type"));
        // The same bad value again is kept again: what an invalid value claims is never trusted
        // (the sink keeps each copy under its own offset).
        assert_eq!(p.record(2, wrong, Some(T0), false, &mut out).kind, OutcomeKind::DeadLetter("wrong_type"));
        let huge_seq = raw("a", T0, 1.0, "OK", "n", u64::MAX);
        assert_eq!(p.record(3, &huge_seq, Some(T0), false, &mut out).kind, OutcomeKind::DeadLetter(SEQ_OUT_OF_RANGE));
        assert_eq!(out.len(), 4);
        match &out[1].value {
            Processed::DeadLetter(d) => {
                assert_eq!((d.node_id.as_deref(), d.seq, d.received_at_ms), (None, None, T0));
                assert!(d.detail.ends_with(r#"(claims node_id Some("n"), seq Some(7))"#), "{}", d.detail);
                assert_eq!(d.payload.as_ref(), wrong);
            }
            other => panic!("expected a dead letter, got {other:?}"),
        }
        match &out[3].value {
            Processed::DeadLetter(d) => assert_eq!((d.node_id.as_deref(), d.seq), (Some("n"), None)),
            other => panic!("expected a dead letter, got {other:?}"),
        }
        assert_eq!(p.state().max_event_ms, None, "bad records never move the clock");
    }

    /// Issue 10, class 1: a forged record (a `seq` beyond i64, or an invalid value claiming a
    /// huge `seq`) raised the node's high-water and every later record of that node was dropped
    /// as a duplicate.
    #[test]
    fn nothing_invalid_moves_dedup_or_window_state() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        let mut out = Vec::new();
        let first = raw("a", T0 + 1_000, 10.0, "OK", "n", 1);
        p.record(0, &first, Some(T0), false, &mut out);
        let before = p.state().clone();
        let forged_seq = raw("a", T0 + 2_000, 10.0, "OK", "n", u64::MAX);
        let forged_loose = format!(
            r#"{{"device_id":"a","timestamp":"2024-12-26T10:00:03Z","temperature":10,"status":"OK","node_id":"n","seq":{}}}"#,
            i64::MAX
        );
        let far_future = raw("a", T0 + 86_400_000, 10.0, "OK", "n", 2);
        let huge = br#"{"device_id":"a","timestamp":"2024-12-26T10:00:04Z","temperature":10,"humidity":1.7e308,"status":"OK","node_id":"n","seq":3}"#;
        let kinds: Vec<OutcomeKind> = [&forged_seq[..], forged_loose.as_bytes(), &far_future, huge]
            .iter()
            .enumerate()
            .map(|(i, v)| p.record(1 + i as i64, v, Some(T0), false, &mut out).kind)
            .collect();
        assert_eq!(
            kinds,
            vec![
                OutcomeKind::DeadLetter(SEQ_OUT_OF_RANGE),
                OutcomeKind::DeadLetter("missing_field"),
                OutcomeKind::DeadLetter("timestamp_out_of_range"),
                OutcomeKind::DeadLetter("number_out_of_range"),
            ]
        );
        assert_eq!(p.state(), &before, "dead letters leave the state as it was");
        // The node's next records flow.
        out.clear();
        let next = raw("a", T0 + 5_000, 11.0, "OK", "n", 2);
        assert_eq!(p.record(5, &next, Some(T0), false, &mut out).kind, OutcomeKind::Filtered);
        let next = raw("a", T0 + 6_000, 12.0, "OK", "n", 3);
        assert_eq!(p.record(6, &next, Some(T0), false, &mut out).kind, OutcomeKind::Filtered);
        assert_eq!(p.state().high.get("n"), Some(&3));
    }

    /// Issue 10, class 5: a forged tick far in the future moved the partition's clock for good.
    #[test]
    fn a_tick_moves_the_clock_at_most_to_its_broker_time() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        let mut out = Vec::new();
        p.tick(0, T0 + 365 * 86_400_000, Some(T0), &mut out);
        assert_eq!(p.state().max_event_ms, Some(T0));
        // A reading at its broker time still joins its open minute.
        let v = raw("a", T0 + 1_000, 10.0, "OK", "n", 1);
        let o = p.record(1, &v, Some(T0 + 1_000), false, &mut out);
        assert!(!o.late);
        assert_eq!(p.open_windows(), 1);
    }

    /// Issue 10, class 4: the dead letter of a value near Kafka's message limit copied it whole
    /// (base64 on the wire), so Kafka refused it and `process` could not get past it.
    #[test]
    fn a_dead_letter_carries_a_bounded_prefix_of_a_huge_value() {
        let mut p = Processor::new(0, rules(), WindowState::default());
        let mut out = Vec::new();
        let value = vec![b'x'; 1_000_000];
        assert_eq!(p.record(0, &value, Some(T0), false, &mut out).kind, OutcomeKind::DeadLetter("oversized"));
        let Processed::DeadLetter(d) = &out[0].value else { panic!("expected a dead letter") };
        assert_eq!((d.payload.len(), d.payload_size), (DEADLETTER_PAYLOAD_MAX, 1_000_000));
        assert!(d.detail.contains("truncated") && d.detail.contains("1000000"), "{}", d.detail);
        let mut wire = Vec::new();
        out[0].value.write_json(&mut wire);
        assert!(wire.len() < 32 * 1024, "the dead letter is {} bytes", wire.len());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;
        use std::collections::{BTreeMap, BTreeSet};

        #[derive(Debug, Clone)]
        enum In {
            Rec {
                device: u8,
                node: u8,
                /// 0: an agent older than epochs; else epoch `e<n>`.
                epoch: u8,
                resend: bool,
                seq: u64,
                dt: i64,
                temperature: f64,
                ok: bool,
            },
            Bad,
            Tick(i64),
            /// A hostile value: forged provenance, extreme numbers or times (see `hostile`).
            Hostile(u8, u64),
        }

        /// Values a forged or broken producer may write to raw-data.
        fn hostile(kind: u8, x: u64, now: i64) -> Vec<u8> {
            let node = format!("n{}", x % 2);
            match kind % 6 {
                0 => raw("d0", now, 20.0, "OK", &node, u64::MAX - (x >> 1)),
                1 => format!(r#"{{"node_id":"{node}","seq":{}}}"#, x.saturating_add(1 << 62)).into_bytes(),
                2 => raw("d1", now + 86_400_000 * (1 + x as i64 % 1000), 20.0, "OK", &node, x),
                3 => format!(
                    r#"{{"device_id":"d2","timestamp":"2024-12-26T10:00:00Z","temperature":1.7e308,"humidity":-1.7e308,"status":"OK","node_id":"{node}","seq":{x}}}"#
                )
                .into_bytes(),
                4 => vec![b'{'; 17 * 1024 + (x % 4096) as usize],
                _ => format!(
                    r#"{{"device_id":"d3","timestamp":"+275760-09-13T00:00:00Z","temperature":1,"humidity":1,"status":"OK","node_id":"{node}","seq":{x}}}"#
                )
                .into_bytes(),
            }
        }

        fn input() -> impl Strategy<Value = In> {
            prop_oneof![
                8 => ((0u8..4, 0u8..2, 0u8..3, any::<bool>()), 0u64..40, -90_000i64..90_000, -20.0f64..120.0, proptest::bool::weighted(0.9))
                    .prop_map(|((device, node, epoch, resend), seq, dt, temperature, ok)| In::Rec { device, node, epoch, resend, seq, dt, temperature, ok }),
                1 => Just(In::Bad),
                1 => (0i64..200_000).prop_map(In::Tick),
            ]
        }

        fn with_hostile() -> impl Strategy<Value = In> {
            prop_oneof![
                4 => input(),
                1 => (any::<u8>(), any::<u64>()).prop_map(|(k, x)| In::Hostile(k, x)),
            ]
        }

        /// Builds the byte values of a scenario whose event times drift forward.
        fn values(inputs: &[In]) -> Vec<Option<Vec<u8>>> {
            let mut now = T0;
            inputs
                .iter()
                .map(|i| match i {
                    In::Rec { device, node, epoch, seq, dt, temperature, ok, .. } => {
                        now += 7_000;
                        let status = if *ok { "OK" } else { "FAIL" };
                        let epoch = (*epoch > 0).then(|| format!("e{epoch}"));
                        Some(raw_in(
                            &format!("d{device}"),
                            now + dt,
                            (temperature * 10.0).round() / 10.0,
                            status,
                            &format!("n{node}"),
                            epoch.as_deref(),
                            *seq,
                        ))
                    }
                    In::Bad => Some(b"{\"oops\":".to_vec()),
                    In::Hostile(kind, x) => Some(hostile(*kind, *x, now)),
                    In::Tick(_) => None,
                })
                .collect()
        }

        /// The broker's timestamp of input `i`: at or after every event time the scenario drew
        /// so far (they drift 7 s per record), as an agent's produce time is.
        fn broker_time(i: usize) -> i64 {
            T0 + 7_000 * i as i64
        }

        fn resend(input: &In) -> bool {
            matches!(input, In::Rec { resend: true, .. })
        }

        fn run(p: &mut Processor, inputs: &[In], values: &[Option<Vec<u8>>], from: usize) -> Vec<(i64, Vec<u8>)> {
            let mut all = Vec::new();
            for (i, (input, value)) in inputs.iter().zip(values).enumerate().skip(from) {
                let mut out = Vec::new();
                match (input, value) {
                    (In::Tick(dt), _) => {
                        p.tick(i as i64, T0 + 7_000 * i as i64 + dt, None, &mut out);
                    }
                    (_, Some(v)) => {
                        p.record(i as i64, v, Some(broker_time(i)), resend(input), &mut out);
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

            /// Hostile values interleaved anywhere change nothing: the outputs other than dead
            /// letters, and the state, are those of the same scenario without them (issue 10).
            #[test]
            fn hostile_values_change_no_state_and_no_output(inputs in proptest::collection::vec(with_hostile(), 1..150)) {
                let values = values(&inputs);
                let mut with = Processor::new(2, rules(), WindowState::default());
                let all = run(&mut with, &inputs, &values, 0);
                // The same scenario with every hostile input replaced by nothing at the same
                // offset (offsets are identities in the outputs, so they must not shift).
                let mut without = Processor::new(2, rules(), WindowState::default());
                let mut clean = Vec::new();
                for (i, input) in inputs.iter().enumerate() {
                    if matches!(input, In::Hostile(..)) {
                        continue;
                    }
                    clean.extend(run(&mut without, &inputs[..=i], &values[..=i], i));
                }
                prop_assert_eq!(with.state(), without.state());
                let kept: Vec<_> = all.into_iter().filter(|(_, v)| !v.starts_with(br#"{"kind":"deadletter""#)).collect();
                let clean: Vec<_> = clean.into_iter().filter(|(_, v)| !v.starts_with(br#"{"kind":"deadletter""#)).collect();
                prop_assert_eq!(kept, clean);
                let checkpoint = serde_json::to_vec(with.state()).expect("state encodes");
                let back: WindowState = serde_json::from_slice(&checkpoint).expect("a checkpoint always parses back");
                prop_assert_eq!(&back, with.state());
            }

            /// Each (node, epoch, seq) is emitted at most once, and once everything is closed the
            /// aggregates (on-time plus late corrections) equal the sums of the filtered readings.
            #[test]
            fn aggregates_add_up_and_nothing_is_emitted_twice(inputs in proptest::collection::vec(input(), 1..150)) {
                let values = values(&inputs);
                let mut p = Processor::new(0, rules(), WindowState::default());
                let mut out = Vec::new();
                for (i, (input, value)) in inputs.iter().zip(&values).enumerate() {
                    match (input, value) {
                        (In::Tick(dt), _) => { p.tick(i as i64, T0 + 7_000 * i as i64 + dt, None, &mut out); }
                        (_, Some(v)) => { p.record(i as i64, v, Some(broker_time(i)), resend(input), &mut out); }
                        _ => unreachable!(),
                    }
                }
                p.tick(inputs.len() as i64, i64::MAX / 2, None, &mut out);
                prop_assert!(p.state().windows.is_empty());

                let mut seen = BTreeSet::new();
                let mut expected: BTreeMap<(Option<String>, i64), (u64, f64)> = BTreeMap::new();
                let mut got: BTreeMap<(Option<String>, i64), (u64, f64)> = BTreeMap::new();
                for e in &out {
                    match &e.value {
                        Processed::Reading(r) => {
                            prop_assert!(seen.insert((r.node_id.to_string(), r.epoch.as_deref().map(str::to_owned), r.seq)), "emitted twice");
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
