//! The oracle: what devices published and the broker acknowledged, against what came out.
//!
//! A published message is identified by its payload: valid readings and anomalies by their
//! natural key `(device_id, timestamp)` (the simulator gives every reading a distinct
//! microsecond timestamp), malformed payloads by their bytes. Every acknowledged message must
//! come out exactly once — readings as records carrying `(node_id, epoch, seq)`, malformed payloads as
//! dead letters — with its fields unchanged, and nothing may come out that was not published.

use std::collections::HashMap;

use edgeflow_contract::{DeadLetter, Limits, RawRecord};
use serde::Serialize;

pub use edgeflow_agent::simulate::{Class, LogEntry as Published};

/// Reads a simulator log.
pub fn read_published(path: &std::path::Path) -> anyhow::Result<Vec<Published>> {
    Published::read_all(path)
}

/// Counts for one class of message.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Row {
    pub published: usize,
    pub acknowledged: usize,
    pub delivered_once: usize,
    pub duplicated: usize,
    pub missing: usize,
    pub altered: usize,
}

/// The verdict over `raw-data` and `raw-data-dlq`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct EdgeVerdict {
    pub readings: Row,
    pub malformed: Row,
    /// Records or dead letters nobody published.
    pub unknown: usize,
    /// `(node_id, epoch, seq)` identities carried by two different readings.
    pub seq_conflicts: usize,
    /// Kafka copies with an identity already seen (re-sent after a crash; the aggregator drops them).
    pub resent_copies: usize,
}

impl EdgeVerdict {
    /// Nothing acknowledged missing, nothing doubled, nothing altered, nothing unknown.
    pub fn clean(&self) -> bool {
        let ok = |r: &Row| r.missing == 0 && r.duplicated == 0 && r.altered == 0;
        ok(&self.readings) && ok(&self.malformed) && self.unknown == 0 && self.seq_conflicts == 0
    }
}

/// Compares the simulator's log with the values read from `raw-data` and `raw-data-dlq`.
/// Copies re-sent by an agent (same `(node_id, epoch, seq)`) count once; markers are ignored.
pub fn check_edge(published: &[Published], raw: &[Vec<u8>], dlq: &[Vec<u8>]) -> EdgeVerdict {
    let mut v = EdgeVerdict::default();
    let limits = Limits::default();
    // Readings out of Kafka, by natural key, keeping one copy per (node, epoch, seq).
    let mut seen_seq: HashMap<(String, Option<String>, u64), (String, String)> = HashMap::new();
    let mut out: HashMap<(String, String), (usize, serde_json::Value)> = HashMap::new();
    for value in raw {
        let Ok(r) = RawRecord::parse(value, &limits) else {
            v.unknown += 1;
            continue;
        };
        let p = &r.provenance;
        let id = (p.node_id.to_string(), p.epoch.as_deref().map(str::to_owned), p.seq);
        let key = (r.reading.device_id.to_string(), r.reading.timestamp.to_string());
        match seen_seq.get(&id) {
            Some(k) if *k == key => {
                v.resent_copies += 1;
                continue;
            }
            Some(_) => {
                v.seq_conflicts += 1;
                continue;
            }
            None => {
                seen_seq.insert(id, key.clone());
            }
        }
        let fields = serde_json::json!({
            "temperature": r.reading.temperature, "humidity": r.reading.humidity, "status": r.reading.status,
        });
        out.entry(key).or_insert((0, fields)).0 += 1;
    }
    let mut dead: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut dead_ids: std::collections::HashSet<(String, Option<String>, u64)> = Default::default();
    for value in dlq {
        let Ok(d) = DeadLetter::parse(value) else {
            v.unknown += 1;
            continue;
        };
        if d.marker().is_some() {
            continue;
        }
        if !dead_ids.insert((d.node_id.to_string(), d.epoch.as_deref().map(str::to_owned), d.seq)) {
            v.resent_copies += 1;
            continue;
        }
        *dead.entry(d.payload).or_default() += 1;
    }

    for p in published {
        let row = if p.class == Class::Malformed { &mut v.malformed } else { &mut v.readings };
        row.published += 1;
        if !p.acked {
            continue;
        }
        row.acknowledged += 1;
        if p.class == Class::Malformed {
            // Dead letters keep the payload (truncated beyond the agent's bound).
            let bytes = p.bytes();
            let bytes = bytes.as_slice();
            // The same bytes first (a short dead letter is also a prefix of longer payloads).
            let key = match dead.get(bytes).is_some_and(|n| *n > 0) {
                true => Some(bytes.to_vec()),
                false => dead
                    .iter()
                    .find(|(k, n)| **n > 0 && k.len() < bytes.len() && bytes.starts_with(k))
                    .map(|(k, _)| k.clone()),
            };
            let found = key.and_then(|k| dead.get_mut(&k)).map(|n| {
                *n -= 1;
                *n
            });
            match found {
                Some(_) => v.malformed.delivered_once += 1,
                None => v.malformed.missing += 1,
            }
            continue;
        }
        let Ok(sent) = serde_json::from_str::<serde_json::Value>(&p.payload) else {
            v.readings.missing += 1;
            continue;
        };
        let key = (
            sent["device_id"].as_str().unwrap_or_default().to_owned(),
            sent["timestamp"].as_str().unwrap_or_default().to_owned(),
        );
        match out.remove(&key) {
            None => v.readings.missing += 1,
            Some((n, got)) => {
                if n > 1 {
                    v.readings.duplicated += 1;
                } else {
                    v.readings.delivered_once += 1;
                }
                let same = got["temperature"].as_f64() == sent["temperature"].as_f64()
                    && got["humidity"].as_f64() == sent["humidity"].as_f64()
                    && got["status"] == sent["status"];
                if !same {
                    v.readings.altered += 1;
                }
            }
        }
    }
    // Readings that came out but were never acknowledged as published are unknown only if they
    // were not published at all (a message the broker took but whose PUBACK the publisher never
    // saw may legitimately arrive).
    let published_keys: std::collections::HashSet<(String, String)> = published
        .iter()
        .filter(|p| p.class != Class::Malformed)
        .filter_map(|p| serde_json::from_str::<serde_json::Value>(&p.payload).ok())
        .map(|s| {
            (
                s["device_id"].as_str().unwrap_or_default().to_owned(),
                s["timestamp"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    v.unknown += out.keys().filter(|k| !published_keys.contains(*k)).count();
    v
}

/// The verdict over what reached S3.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PipelineVerdict {
    /// Valid readings: expected in the `filtered` family.
    pub valid: Row,
    /// Anomalies (status not OK, temperature over the limit): expected in `rejected`.
    pub anomalies: Row,
    /// Malformed payloads: expected in `deadletter`.
    pub malformed: Row,
    /// Rows in S3 that nobody published.
    pub unknown: usize,
    /// `(node_id, epoch, seq)` present more than once across `filtered`, `rejected` and `deadletter`.
    pub seq_duplicates: usize,
    /// (device or all-devices, minute) windows compared with the readings in S3.
    pub windows_checked: usize,
    pub window_mismatches: usize,
    /// Parquet objects read.
    pub objects: usize,
    /// `(device_id, timestamp)` of the first missing readings, for diagnosis.
    pub missing_examples: Vec<(String, String)>,
    /// The first acknowledged malformed payloads without a dead letter, and dead letters nobody
    /// published (reason, node, payload), quoted, for diagnosis.
    pub malformed_examples: Vec<String>,
}

impl PipelineVerdict {
    pub fn missing(&self) -> usize {
        self.valid.missing + self.anomalies.missing + self.malformed.missing
    }

    pub fn duplicated(&self) -> usize {
        self.valid.duplicated + self.anomalies.duplicated + self.malformed.duplicated + self.seq_duplicates
    }

    /// Every acknowledged message exactly once, unaltered, in its family; nothing unknown; the
    /// aggregates equal the values recomputed from the delivered readings.
    pub fn clean(&self) -> bool {
        let altered = self.valid.altered + self.anomalies.altered + self.malformed.altered;
        self.missing() == 0
            && self.duplicated() == 0
            && altered == 0
            && self.unknown == 0
            && self.window_mismatches == 0
            && self.valid.acknowledged + self.anomalies.acknowledged > 0
    }

    /// One line, for logs and progress; classes with a problem are detailed.
    pub fn summary(&self) -> String {
        let mut detail = String::new();
        for (name, r) in [("valid", &self.valid), ("anomalies", &self.anomalies), ("malformed", &self.malformed)] {
            if r.missing + r.duplicated + r.altered > 0 {
                detail.push_str(&format!(
                    "; {name}: {} missing, {} duplicated, {} altered",
                    r.missing, r.duplicated, r.altered
                ));
            }
        }
        if self.seq_duplicates > 0 {
            detail.push_str(&format!("; {} (node_id, seq) repeated", self.seq_duplicates));
        }
        format!("{}{detail}", self.summary_line())
    }

    fn summary_line(&self) -> String {
        format!(
            "{} missing, {} duplicate ({} valid, {} anomalies, {} malformed delivered once; {} unknown; {} of {} windows mismatched)",
            self.missing(),
            self.duplicated(),
            self.valid.delivered_once,
            self.anomalies.delivered_once,
            self.malformed.delivered_once,
            self.unknown,
            self.window_mismatches,
            self.windows_checked
        )
    }
}

/// Compares everything the devices published (every node's simulator log) with S3.
pub fn check_pipeline(published: &[Published], lake: &crate::lake::Lake) -> PipelineVerdict {
    use std::collections::{BTreeMap, HashMap, HashSet};
    let mut v = PipelineVerdict { objects: lake.objects, ..PipelineVerdict::default() };

    // (node, epoch, seq) unique across the three record families.
    let mut ids: HashSet<(String, Option<String>, i64)> = HashSet::new();
    let mut id_dups = 0;
    for r in lake.filtered.iter().chain(&lake.rejected) {
        if !ids.insert((r.node_id.clone(), r.epoch.clone(), r.seq)) {
            id_dups += 1;
        }
    }
    for d in &lake.deadletter {
        if let (Some(n), Some(s)) = (&d.node_id, d.seq)
            && !ids.insert((n.clone(), d.epoch.clone(), s))
        {
            id_dups += 1;
        }
    }
    v.seq_duplicates = id_dups;

    // Readings in S3 by (device, millisecond), with their family.
    let mut rows: HashMap<(String, i64), Vec<(&crate::lake::ReadingRow, bool)>> = HashMap::new();
    for r in &lake.filtered {
        rows.entry((r.device_id.clone(), r.timestamp_ms)).or_default().push((r, false));
    }
    for r in &lake.rejected {
        rows.entry((r.device_id.clone(), r.timestamp_ms)).or_default().push((r, true));
    }
    let mut dead: Vec<(&[u8], bool)> = lake
        .deadletter
        .iter()
        .filter(|d| edgeflow_contract::MarkerKind::from_name(&d.reason).is_none())
        .map(|d| (d.payload.as_slice(), false))
        .collect();

    let mut published_keys: HashSet<(String, i64)> = HashSet::new();
    let mut used: HashMap<(String, i64), Vec<bool>> = HashMap::new();
    for p in published {
        let row = match p.class {
            Class::Valid => &mut v.valid,
            Class::Anomaly => &mut v.anomalies,
            Class::Malformed => &mut v.malformed,
        };
        row.published += 1;
        if p.class == Class::Malformed {
            if !p.acked {
                continue;
            }
            row.acknowledged += 1;
            let bytes = p.bytes();
            // The same bytes first: a short dead letter (`{`) is also a prefix of longer payloads,
            // and taking it for one of them would leave its own payload without a match.
            let exact = dead.iter().position(|(d, used)| !used && *d == bytes.as_slice());
            let prefix = || dead.iter().position(|(d, used)| !used && d.len() < bytes.len() && bytes.starts_with(d));
            match exact.or_else(prefix).as_ref() {
                Some(&i) => {
                    dead[i].1 = true;
                    row.delivered_once += 1;
                }
                None => {
                    row.missing += 1;
                    if v.malformed_examples.len() < 10 {
                        let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(120)]).into_owned();
                        v.malformed_examples.push(format!("no dead letter for {shown:?} ({} bytes)", bytes.len()));
                    }
                }
            }
            continue;
        }
        let Ok(sent) = serde_json::from_str::<serde_json::Value>(&p.payload) else { continue };
        let ts = sent["timestamp"].as_str().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok());
        let key = (sent["device_id"].as_str().unwrap_or_default().to_owned(), ts.map_or(0, |t| t.timestamp_millis()));
        published_keys.insert(key.clone());
        if p.acked {
            row.acknowledged += 1;
        }
        // A device can publish twice within one millisecond (S3 keeps milliseconds): match
        // the row with the same values first, then any row of the key not matched yet.
        let found = rows.get(&key).map(Vec::as_slice).unwrap_or_default();
        let taken = used.entry(key).or_insert_with(|| vec![false; found.len()]);
        let same = |(r, in_rejected): &(&crate::lake::ReadingRow, bool)| {
            Some(r.temperature) == sent["temperature"].as_f64()
                && Some(r.humidity) == sent["humidity"].as_f64()
                && Some(r.status.as_str()) == sent["status"].as_str()
                && *in_rejected == (p.class == Class::Anomaly)
        };
        let exact = (0..found.len()).find(|&i| !taken[i] && same(&found[i]));
        let other = (0..found.len()).find(|&i| !taken[i]);
        match (exact, other) {
            (Some(i), _) => {
                taken[i] = true;
                row.delivered_once += usize::from(p.acked);
            }
            (None, Some(i)) => {
                taken[i] = true;
                row.delivered_once += usize::from(p.acked);
                row.altered += usize::from(p.acked);
            }
            // An unacknowledged message may or may not have arrived.
            (None, None) => {
                row.missing += usize::from(p.acked);
                if p.acked && v.missing_examples.len() < 20 {
                    let text = |k: &str| sent[k].as_str().unwrap_or_default().to_owned();
                    v.missing_examples.push((text("device_id"), text("timestamp")));
                }
            }
        }
    }
    // Rows left over under a published key are second copies.
    for (key, taken) in &used {
        for (i, t) in taken.iter().enumerate() {
            if !t {
                let in_rejected = rows[key][i].1;
                if in_rejected { v.anomalies.duplicated += 1 } else { v.valid.duplicated += 1 }
            }
        }
    }
    v.unknown =
        rows.keys().filter(|k| !published_keys.contains(*k)).count() + dead.iter().filter(|(_, used)| !used).count();
    let rows_of_dead = lake.deadletter.iter().filter(|d| edgeflow_contract::MarkerKind::from_name(&d.reason).is_none());
    for (d, (_, used)) in rows_of_dead.zip(&dead) {
        if !used && v.malformed_examples.len() < 20 {
            let shown = String::from_utf8_lossy(&d.payload[..d.payload.len().min(120)]).into_owned();
            v.malformed_examples.push(format!(
                "dead letter nobody published: {} {:?}/{:?}/{:?}: {shown:?}",
                d.reason, d.node_id, d.epoch, d.seq
            ));
        }
    }

    // Aggregates: recompute per (device, minute) and per minute across devices from the
    // filtered readings in S3, and compare with the aggregated rows summed over every file.
    #[derive(Default, Clone, Copy)]
    struct W {
        count: i64,
        t_sum: f64,
        t_min: f64,
        t_max: f64,
        h_sum: f64,
    }
    fn add(w: &mut W, count: i64, t_sum: f64, t_min: f64, t_max: f64, h_sum: f64) {
        if w.count == 0 {
            w.t_min = t_min;
            w.t_max = t_max;
        } else {
            w.t_min = w.t_min.min(t_min);
            w.t_max = w.t_max.max(t_max);
        }
        w.count += count;
        w.t_sum += t_sum;
        w.h_sum += h_sum;
    }
    let minute = |ms: i64| ms.div_euclid(60_000) * 60_000;
    let mut expected: BTreeMap<(Option<String>, i64), W> = BTreeMap::new();
    for r in &lake.filtered {
        let m = minute(r.timestamp_ms);
        for device in [Some(r.device_id.clone()), None] {
            add(expected.entry((device, m)).or_default(), 1, r.temperature, r.temperature, r.temperature, r.humidity);
        }
    }
    let mut found: BTreeMap<(Option<String>, i64), W> = BTreeMap::new();
    for a in &lake.aggregated {
        let n = a.count as f64;
        add(
            found.entry((a.device_id.clone(), a.window_start_ms)).or_default(),
            a.count,
            a.temperature_avg * n,
            a.temperature_min,
            a.temperature_max,
            a.humidity_avg * n,
        );
    }
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
    let keys: HashSet<&(Option<String>, i64)> = expected.keys().chain(found.keys()).collect();
    v.windows_checked = keys.len();
    for k in keys {
        let (e, f) = (expected.get(k), found.get(k));
        let ok = match (e, f) {
            (Some(e), Some(f)) => {
                e.count == f.count
                    && close(e.t_sum, f.t_sum)
                    && close(e.h_sum, f.h_sum)
                    && e.t_min == f.t_min
                    && e.t_max == f.t_max
            }
            _ => false,
        };
        if !ok {
            v.window_mismatches += 1;
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use edgeflow_contract::{Provenance, Reading, TimeBounds};

    fn record(payload: &str, seq: u64) -> Vec<u8> {
        let r = Reading::parse(payload.as_bytes(), &Limits::default(), &TimeBounds::unbounded()).expect("valid");
        RawRecord { reading: r, provenance: Provenance { node_id: "n".into(), epoch: None, seq } }.to_json()
    }

    fn published(n: u64, class: Class, payload: &str) -> Published {
        use base64::Engine as _;
        Published {
            n,
            device: "d".into(),
            class,
            payload: payload.into(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(payload),
            acked: true,
        }
    }

    const A: &str =
        r#"{"device_id":"d","timestamp":"2024-01-01T00:00:00Z","temperature":1,"humidity":2,"status":"OK"}"#;
    const B: &str =
        r#"{"device_id":"d","timestamp":"2024-01-01T00:00:01Z","temperature":1,"humidity":2,"status":"OK"}"#;

    #[test]
    fn a_clean_run_is_clean_and_resent_copies_are_tolerated() {
        let p = vec![published(0, Class::Valid, A), published(1, Class::Valid, B)];
        let v = check_edge(&p, &[record(A, 1), record(B, 2), record(B, 2)], &[]);
        assert!(v.clean(), "{v:?}");
        assert_eq!((v.readings.delivered_once, v.resent_copies), (2, 1));
    }

    #[test]
    fn the_oracle_catches_loss_duplication_alteration_and_strangers() {
        let p = vec![published(0, Class::Valid, A), published(1, Class::Valid, B)];
        let lost = check_edge(&p, &[record(A, 1)], &[]);
        assert_eq!(lost.readings.missing, 1);
        assert!(!lost.clean());
        let doubled = check_edge(&p, &[record(A, 1), record(B, 2), record(B, 3)], &[]);
        assert_eq!(doubled.readings.duplicated, 1);
        assert!(!doubled.clean());
        let altered =
            check_edge(&p, &[record(A, 1), record(&B.replace("\"temperature\":1", "\"temperature\":9"), 2)], &[]);
        assert_eq!(altered.readings.altered, 1);
        let stranger = check_edge(&p[..1], &[record(A, 1), record(B, 2)], &[]);
        assert_eq!(stranger.unknown, 1);
        let conflict = check_edge(&p, &[record(A, 1), record(B, 1)], &[]);
        assert_eq!(conflict.seq_conflicts, 1);
    }

    fn row(payload: &str, seq: i64) -> crate::lake::ReadingRow {
        let v: serde_json::Value = serde_json::from_str(payload).expect("json");
        let ts = chrono::DateTime::parse_from_rfc3339(v["timestamp"].as_str().expect("ts")).expect("rfc3339");
        crate::lake::ReadingRow {
            device_id: "d".into(),
            timestamp_ms: ts.timestamp_millis(),
            temperature: v["temperature"].as_f64().expect("t"),
            humidity: v["humidity"].as_f64().expect("h"),
            status: "OK".into(),
            node_id: "n".into(),
            epoch: None,
            seq,
            reason: None,
        }
    }

    #[test]
    fn two_readings_in_one_millisecond_are_two_readings_and_a_second_copy_is_a_duplicate() {
        // S3 keeps milliseconds: these two differ only in microseconds and temperature.
        let c =
            r#"{"device_id":"d","timestamp":"2024-01-01T00:00:00.000100Z","temperature":1,"humidity":2,"status":"OK"}"#;
        let d =
            r#"{"device_id":"d","timestamp":"2024-01-01T00:00:00.000900Z","temperature":5,"humidity":2,"status":"OK"}"#;
        let p = vec![published(0, Class::Valid, c), published(1, Class::Valid, d)];
        // In S3 in the other order.
        let lake = crate::lake::Lake { filtered: vec![row(d, 2), row(c, 1)], ..Default::default() };
        let v = check_pipeline(&p, &lake);
        assert_eq!(
            (v.valid.delivered_once, v.valid.duplicated, v.valid.altered, v.valid.missing),
            (2, 0, 0, 0),
            "{v:?}"
        );
        let lake = crate::lake::Lake { filtered: vec![row(d, 2), row(c, 1), row(c, 3)], ..Default::default() };
        let v = check_pipeline(&p, &lake);
        assert_eq!(v.valid.duplicated, 1, "{v:?}");
        assert!(!v.clean());
        let lake = crate::lake::Lake { filtered: vec![row(c, 1)], ..Default::default() };
        let v = check_pipeline(&p, &lake);
        assert_eq!(v.missing(), 1, "{v:?}");
    }
}
