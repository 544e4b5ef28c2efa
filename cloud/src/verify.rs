//! `verify`: reads every Parquet object under the prefix and proves (or disproves) that every
//! record is there exactly once and that the aggregates add up.
//!
//! Per node, from the `filtered`, `rejected` and `deadletter` families (every `seq` an agent
//! assigned lands in exactly one of them): records present, smallest and largest `seq`, the
//! missing ranges between them, and duplicates. A dead letter with reason `buffer_created`
//! (the agent started a new buffer) starts a new range: the gap before it is not counted as
//! missing. Numbers before a node's first `seq` in S3 cannot be known here; the end-to-end
//! tests compare against what the devices sent.
//!
//! A record is `(node, epoch, seq)` (the `Epoch` column; null in older files and from older
//! agents). A duplicate is the same `(epoch, seq)` twice. The `seq`s of one buffer continue
//! across the runs (epochs) that wrote it, so the node's epochs are put in *lineages*: ordered
//! by their first `seq`, an epoch continues the lineage whose last `seq` is the closest below
//! its own first, and gaps are looked for across each lineage's `seq`s. An epoch whose range
//! overlaps every lineage's starts a new one: a restored or copied buffer, or a second agent
//! with the same `node_id` (`lineages` > 1 says so); each is checked on its own, so one
//! writer's records cannot hide another's gaps. `regressions` counts the `seq_regression` dead
//! letters of `process` (a producer reusing an epoch's `seq`s): kept and shown, not missing.
//!
//! The tail: records that never arrived leave no gap between records that did. Agents therefore
//! write a durable `high_water` marker ([`MarkerKind::HighWater`]) on a schedule and at
//! shutdown; it takes a `seq` like any entry, so every `seq` of the buffer below it was assigned
//! before it. With it in S3, the gap check covers the node's newest records too, and the report
//! says "complete through seq N at T" (`high_water_seq`, `high_water_at`, `complete`). Records
//! after the newest marker are counted as not yet proven (`after_high_water`). With
//! [`Expectations`], a node whose newest marker lags the newest of all nodes by more than
//! `max_marker_age` is *stale* (its agent stopped writing, or its records stopped arriving), and a
//! node expected but absent from S3 is reported; both fail the verdict.
//!
//! Aggregates: the per-minute windows are recomputed from the filtered readings, per device
//! and across all devices, and compared with the `aggregated` rows of the same (device,
//! minute) summed over every file (main and late rows): counts and min/max exactly, sums with a
//! relative tolerance of 1e-9 (float addition depends on order).
//!
//! The JSON form (`--json`) is stable; `docs/aggregator.md` documents it. The exit status is 0
//! when nothing is missing, duplicated or mismatched, 1 otherwise.

use std::collections::{BTreeMap, BTreeSet};

use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch};
use edgeflow_contract::MarkerKind;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde::Serialize;

use crate::process::window::{SEQ_REGRESSION, window_start};
use crate::processed::Sums;
use crate::s3::{S3, S3Error};
use crate::sink::state::Family;

/// Most individual duplicates, missing ranges and mismatches listed per report (counts are
/// always complete).
pub const LIST_LIMIT: usize = 100;

/// The verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Report {
    /// No record missing, none duplicated, every aggregate matches, every object readable.
    pub ok: bool,
    pub bucket: String,
    pub prefix: String,
    /// Parquet objects read.
    pub objects: usize,
    /// Manifests seen.
    pub manifests: usize,
    /// Rows per family.
    pub rows: BTreeMap<String, u64>,
    pub totals: Totals,
    pub nodes: Vec<NodeReport>,
    pub aggregates: AggregateCheck,
    /// Dead letters without `(node_id, seq)` (unparseable raw records, foreign values).
    pub unattributed_deadletters: u64,
    /// Objects that could not be read or lack a column.
    pub errors: Vec<String>,
}

/// Sums over nodes.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Totals {
    pub records: u64,
    pub missing: u64,
    pub duplicates: u64,
    /// `seq_regression` dead letters (not a loss: the records are kept with their reason).
    pub regressions: u64,
    /// Nodes whose newest `high_water` marker is too old (see [`Expectations`]).
    pub stale_nodes: u64,
    /// Expected nodes with nothing in S3.
    pub absent_nodes: Vec<String>,
}

/// What `verify` is told beyond what S3 holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Expectations {
    /// A node whose newest `high_water` marker is older than the newest marker of any node by
    /// more than this is stale (`None`: not judged).
    pub max_marker_age_ms: Option<i64>,
    /// Nodes that must appear in S3.
    pub nodes: Vec<String>,
}

/// One node's accounting.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct NodeReport {
    pub node_id: String,
    /// Distinct `seq`s present.
    pub records: u64,
    pub filtered: u64,
    pub rejected: u64,
    pub deadletter: u64,
    pub min_seq: i64,
    pub max_seq: i64,
    /// `buffer_created` markers (each starts a new range).
    pub buffers: u64,
    /// Distinct epochs (agent runs) seen; records of agents older than epochs count as one.
    pub epochs: u64,
    /// Lineages of epochs (see the module doc): more than one means a restored or copied
    /// buffer, or two agents with this `node_id`.
    pub lineages: u64,
    /// Records `process` refused as `seq_regression` (their `seq` reused within an epoch).
    pub regressions: u64,
    /// Missing `seq`s, as inclusive `[first, last]` ranges (at most [`LIST_LIMIT`]).
    pub missing: Vec<[i64; 2]>,
    pub missing_count: u64,
    /// `seq`s present more than once (at most [`LIST_LIMIT`]).
    pub duplicates: Vec<i64>,
    /// Extra copies in total.
    pub duplicate_count: u64,
    /// The `seq` of the newest `high_water` marker (every `seq` below it was assigned before it).
    pub high_water_seq: Option<i64>,
    /// When that marker was written (RFC 3339).
    pub high_water_at: Option<String>,
    /// A marker is there and nothing below it is missing: complete through `high_water_seq - 1`.
    pub complete: bool,
    /// Records with a `seq` above the newest marker (present, but the tail after them unproven).
    pub after_high_water: u64,
    /// The newest marker lags the newest of all nodes by more than the allowed age.
    pub stale: bool,
}

/// The aggregate check.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct AggregateCheck {
    /// (device or all-devices, minute) windows compared.
    pub windows_checked: u64,
    pub mismatch_count: u64,
    /// At most [`LIST_LIMIT`].
    pub mismatches: Vec<Mismatch>,
}

/// One window whose aggregate does not match its readings.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Mismatch {
    /// `null` for the all-devices window.
    pub device_id: Option<String>,
    /// RFC 3339 start of the minute.
    pub window_start: String,
    /// Recomputed from the filtered readings (`null`: no readings).
    pub expected: Option<WindowValues>,
    /// From the aggregated rows (`null`: no row).
    pub found: Option<WindowValues>,
}

/// Window values as compared.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct WindowValues {
    pub count: u64,
    pub temperature_sum: f64,
    pub temperature_min: f64,
    pub temperature_max: f64,
    pub humidity_sum: f64,
}

impl From<Sums> for WindowValues {
    fn from(s: Sums) -> Self {
        Self {
            count: s.count,
            temperature_sum: s.temperature_sum,
            temperature_min: s.temperature_min,
            temperature_max: s.temperature_max,
            humidity_sum: s.humidity_sum,
        }
    }
}

/// Accumulates rows, then judges.
#[derive(Debug, Default)]
pub struct Collector {
    objects: usize,
    manifests: usize,
    rows: BTreeMap<String, u64>,
    /// node → its rows with provenance.
    seqs: BTreeMap<String, NodeRows>,
    /// node → seqs of `buffer_created` markers.
    markers: BTreeMap<String, BTreeSet<i64>>,
    /// node → (time, seq, epoch index) of each epoch's newest `high_water` marker.
    high_water: BTreeMap<String, BTreeMap<u32, (i64, i64)>>,
    /// node → `seq_regression` dead letters.
    regressions: BTreeMap<String, u64>,
    unattributed: u64,
    expected: BTreeMap<(Option<String>, i64), Sums>,
    found: BTreeMap<(Option<String>, i64), Sums>,
    errors: Vec<String>,
}

/// One node's rows: `(epoch index, seq, family)`, with the epochs interned.
#[derive(Debug, Default)]
struct NodeRows {
    epochs: Vec<Option<String>>,
    rows: Vec<(u32, i64, Family)>,
}

impl NodeRows {
    fn epoch(&mut self, epoch: Option<&str>) -> u32 {
        match self.epochs.iter().rposition(|e| e.as_deref() == epoch) {
            Some(i) => i as u32,
            None => {
                self.epochs.push(epoch.map(str::to_owned));
                (self.epochs.len() - 1) as u32
            }
        }
    }
}

/// The `Epoch` column, absent from files written before it existed.
fn epoch_column(b: &RecordBatch) -> Result<Option<&arrow_array::StringArray>, String> {
    match b.column_by_name("Epoch") {
        None => Ok(None),
        Some(c) => c.as_string_opt::<i32>().map(Some).ok_or_else(|| "column Epoch is not a string".to_owned()),
    }
}

fn epoch_at(epochs: Option<&arrow_array::StringArray>, i: usize) -> Option<&str> {
    epochs.filter(|e| !e.is_null(i)).map(|e| e.value(i))
}

/// Splits a node's epochs into lineages (see the module doc): indices into `ranges`
/// (`(min seq, max seq)` per epoch), each lineage in `seq` order.
fn lineages(ranges: &[(i64, i64)]) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..ranges.len()).collect();
    order.sort_by_key(|&e| ranges[e]);
    let mut lines: Vec<(i64, Vec<usize>)> = Vec::new();
    for e in order {
        let (first, last) = ranges[e];
        let continues = lines.iter_mut().filter(|(max, _)| *max < first).max_by_key(|(max, _)| *max);
        match continues {
            Some((max, line)) => {
                *max = last;
                line.push(e);
            }
            None => lines.push((last, vec![e])),
        }
    }
    lines.into_iter().map(|(_, line)| line).collect()
}

fn int_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a arrow_array::Int64Array, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| format!("column {name} missing or not INT64"))
}

fn float_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a arrow_array::Float64Array, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<Float64Type>())
        .ok_or_else(|| format!("column {name} missing or not DOUBLE"))
}

fn ts_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a arrow_array::TimestampMillisecondArray, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<TimestampMillisecondType>())
        .ok_or_else(|| format!("column {name} missing or not TIMESTAMP(MILLIS)"))
}

fn str_column<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a arrow_array::StringArray, String> {
    b.column_by_name(name)
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| format!("column {name} missing or not a string"))
}

impl Collector {
    /// Counts a manifest.
    pub fn manifest(&mut self) {
        self.manifests += 1;
    }

    /// Reads one Parquet object of `family`.
    pub fn object(&mut self, key: &str, family: Family, bytes: bytes::Bytes) {
        self.objects += 1;
        if let Err(e) = self.read(family, bytes) {
            self.errors.push(format!("{key}: {e}"));
        }
    }

    fn read(&mut self, family: Family, bytes: bytes::Bytes) -> Result<(), String> {
        let reader =
            ParquetRecordBatchReaderBuilder::try_new(bytes).and_then(|b| b.build()).map_err(|e| e.to_string())?;
        for batch in reader {
            let b = batch.map_err(|e| e.to_string())?;
            *self.rows.entry(family.as_str().to_owned()).or_default() += b.num_rows() as u64;
            match family {
                Family::Filtered | Family::Rejected => {
                    let (node, seq) = (str_column(&b, "NodeId")?, int_column(&b, "Seq")?);
                    let epochs = epoch_column(&b)?;
                    for i in 0..b.num_rows() {
                        let n = self.node(node.value(i));
                        let e = n.epoch(epoch_at(epochs, i));
                        n.rows.push((e, seq.value(i), family));
                    }
                    if family == Family::Filtered {
                        let (device, ts) = (str_column(&b, "DeviceId")?, ts_column(&b, "Timestamp")?);
                        let (t, h) = (float_column(&b, "Temperature")?, float_column(&b, "Humidity")?);
                        for i in 0..b.num_rows() {
                            let w = window_start(ts.value(i));
                            for key in [(Some(device.value(i).to_owned()), w), (None, w)] {
                                self.expected.entry(key).or_default().merge(&Sums::of(t.value(i), h.value(i)));
                            }
                        }
                    }
                }
                Family::Deadletter => {
                    let (node, seq, reason) =
                        (str_column(&b, "NodeId")?, int_column(&b, "Seq")?, str_column(&b, "Reason")?);
                    let received = ts_column(&b, "ReceivedAt")?;
                    let epochs = epoch_column(&b)?;
                    for i in 0..b.num_rows() {
                        if !node.is_null(i) && seq.is_null(i) && reason.value(i) == SEQ_REGRESSION {
                            *self.regressions.entry(node.value(i).to_owned()).or_default() += 1;
                            continue;
                        }
                        if node.is_null(i) || seq.is_null(i) {
                            self.unattributed += 1;
                            continue;
                        }
                        let name = node.value(i);
                        let n = self.node(name);
                        let e = n.epoch(epoch_at(epochs, i));
                        n.rows.push((e, seq.value(i), family));
                        match MarkerKind::from_name(reason.value(i)) {
                            Some(MarkerKind::BufferCreated) => {
                                self.markers.entry(name.to_owned()).or_default().insert(seq.value(i));
                            }
                            Some(MarkerKind::HighWater) => {
                                let mark = (received.value(i), seq.value(i));
                                let per_epoch = self.high_water.entry(name.to_owned()).or_default();
                                let newest = per_epoch.entry(e).or_insert(mark);
                                *newest = (*newest).max(mark);
                            }
                            None => {}
                        }
                    }
                }
                Family::Aggregated => {
                    let (ts, device, count) =
                        (ts_column(&b, "Timestamp")?, str_column(&b, "DeviceId")?, int_column(&b, "Count")?);
                    let (tsum, tmin, tmax, hsum) = (
                        float_column(&b, "TemperatureSum")?,
                        float_column(&b, "TemperatureMin")?,
                        float_column(&b, "TemperatureMax")?,
                        float_column(&b, "HumiditySum")?,
                    );
                    for i in 0..b.num_rows() {
                        let d = (!device.is_null(i)).then(|| device.value(i).to_owned());
                        let s = Sums {
                            count: u64::try_from(count.value(i)).unwrap_or(0),
                            temperature_sum: tsum.value(i),
                            temperature_min: tmin.value(i),
                            temperature_max: tmax.value(i),
                            humidity_sum: hsum.value(i),
                        };
                        self.found.entry((d, ts.value(i))).or_default().merge(&s);
                    }
                }
            }
        }
        Ok(())
    }

    fn node(&mut self, node: &str) -> &mut NodeRows {
        if !self.seqs.contains_key(node) {
            self.seqs.insert(node.to_owned(), NodeRows::default());
        }
        self.seqs.get_mut(node).expect("just inserted")
    }

    /// Judges what was collected.
    pub fn report(self, bucket: &str, prefix: &str) -> Report {
        self.report_with(bucket, prefix, &Expectations::default())
    }

    /// Judges what was collected against `expect`.
    pub fn report_with(self, bucket: &str, prefix: &str, expect: &Expectations) -> Report {
        let mut nodes = Vec::new();
        let mut totals = Totals::default();
        let newest_marker_ms = self.high_water.values().flat_map(|m| m.values()).map(|(t, _)| *t).max();
        for node in &expect.nodes {
            if !self.seqs.contains_key(node) && !self.regressions.contains_key(node) {
                totals.absent_nodes.push(node.clone());
            }
        }
        let mut seqs = self.seqs;
        for (node, count) in &self.regressions {
            seqs.entry(node.clone()).or_default();
            totals.regressions += count;
        }
        for (node_id, NodeRows { epochs, mut rows }) in seqs {
            rows.sort_unstable_by_key(|(e, s, _)| (*e, *s));
            let markers = self.markers.get(&node_id);
            let mut n = NodeReport { node_id: node_id.clone(), ..NodeReport::default() };
            n.regressions = self.regressions.get(&node_id).copied().unwrap_or(0);
            n.min_seq = rows.iter().map(|r| r.1).min().unwrap_or(0);
            n.max_seq = rows.iter().map(|r| r.1).max().unwrap_or(0);
            n.buffers = markers.map_or(0, |m| m.len() as u64);
            n.epochs = epochs.len() as u64;
            // Each epoch's rows are contiguous in `rows` (sorted by epoch, then seq).
            let mut spans: Vec<std::ops::Range<usize>> = Vec::with_capacity(epochs.len());
            let mut at = 0;
            for e in 0..epochs.len() as u32 {
                let len = rows[at..].iter().take_while(|r| r.0 == e).count();
                spans.push(at..at + len);
                at += len;
            }
            let ranges: Vec<(i64, i64)> = spans
                .iter()
                .map(|r| (rows.get(r.start).map_or(0, |x| x.1), rows.get(r.end.wrapping_sub(1)).map_or(0, |x| x.1)))
                .collect();
            let lines = lineages(&ranges);
            n.lineages = lines.len() as u64;
            let marks = self.high_water.get(&node_id);
            // The node's newest marker (by time) is its report's high-water.
            let newest = marks.and_then(|m| m.iter().max_by_key(|(_, mark)| **mark)).map(|(e, mark)| (*e, *mark));
            let mut missing_below_high_water = false;
            for line in &lines {
                // This lineage's newest marker bounds what it proves.
                let line_hw =
                    marks.and_then(|m| line.iter().filter_map(|e| m.get(&(*e as u32))).max()).map(|(_, s)| *s);
                let mut seqs: Vec<(i64, Family)> =
                    line.iter().flat_map(|&e| rows[spans[e].clone()].iter().map(|r| (r.1, r.2))).collect();
                seqs.sort_by_key(|r| r.0);
                let mut prev: Option<i64> = None;
                for (seq, family) in &seqs {
                    match family {
                        Family::Filtered => n.filtered += 1,
                        Family::Rejected => n.rejected += 1,
                        Family::Deadletter => n.deadletter += 1,
                        Family::Aggregated => {}
                    }
                    match prev {
                        // Within a lineage a `seq` belongs to one epoch; the same epoch twice is
                        // a copy (epochs of one lineage never overlap).
                        Some(p) if p == *seq => {
                            n.duplicate_count += 1;
                            if n.duplicates.last() != Some(seq) && n.duplicates.len() < LIST_LIMIT {
                                n.duplicates.push(*seq);
                            }
                            continue;
                        }
                        Some(p) if *seq > p + 1 && !markers.is_some_and(|m| m.contains(seq)) => {
                            n.missing_count += (*seq - p - 1) as u64;
                            missing_below_high_water |= line_hw.is_some_and(|hw| p + 1 < hw);
                            if n.missing.len() < LIST_LIMIT {
                                n.missing.push([p + 1, seq - 1]);
                            }
                        }
                        _ => {}
                    }
                    n.records += 1;
                    if line_hw.is_some_and(|hw| *seq > hw) {
                        n.after_high_water += 1;
                    }
                    prev = Some(*seq);
                }
            }
            if let Some((_, (at, hw))) = newest {
                n.high_water_seq = Some(hw);
                n.high_water_at = chrono::DateTime::from_timestamp_millis(at)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
                // The gap check above covers everything up to each marker, itself a row.
                n.complete = !missing_below_high_water;
                n.stale = matches!((expect.max_marker_age_ms, newest_marker_ms), (Some(age), Some(newest)) if newest - at > age);
            } else {
                // No marker at all: nothing proves the tail; stale when markers are expected.
                n.stale = expect.max_marker_age_ms.is_some() && newest_marker_ms.is_some();
            }
            totals.stale_nodes += u64::from(n.stale);
            totals.records += n.records;
            totals.missing += n.missing_count;
            totals.duplicates += n.duplicate_count;
            nodes.push(n);
        }

        let mut aggregates = AggregateCheck::default();
        let keys: BTreeSet<&(Option<String>, i64)> = self.expected.keys().chain(self.found.keys()).collect();
        for key in keys {
            aggregates.windows_checked += 1;
            let (e, f) = (self.expected.get(key), self.found.get(key));
            if !matches!((e, f), (Some(e), Some(f)) if same(e, f)) {
                aggregates.mismatch_count += 1;
                if aggregates.mismatches.len() < LIST_LIMIT {
                    aggregates.mismatches.push(Mismatch {
                        device_id: key.0.clone(),
                        window_start: chrono::DateTime::from_timestamp_millis(key.1)
                            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                            .unwrap_or_default(),
                        expected: e.copied().map(Into::into),
                        found: f.copied().map(Into::into),
                    });
                }
            }
        }
        let ok = totals.missing == 0
            && totals.duplicates == 0
            && totals.stale_nodes == 0
            && totals.absent_nodes.is_empty()
            && aggregates.mismatch_count == 0
            && self.errors.is_empty();
        Report {
            ok,
            bucket: bucket.to_owned(),
            prefix: prefix.to_owned(),
            objects: self.objects,
            manifests: self.manifests,
            rows: self.rows,
            totals,
            nodes,
            aggregates,
            unattributed_deadletters: self.unattributed,
            errors: self.errors,
        }
    }
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0)
}

fn same(e: &Sums, f: &Sums) -> bool {
    e.count == f.count
        && e.temperature_min == f.temperature_min
        && e.temperature_max == f.temperature_max
        && close(e.temperature_sum, f.temperature_sum)
        && close(e.humidity_sum, f.humidity_sum)
}

/// The family of a Parquet object, from its file name (`<family>_…`).
pub fn family_of(key: &str) -> Option<Family> {
    let name = key.rsplit('/').next()?;
    let family = name.split('_').next()?;
    name.ends_with(".parquet").then_some(())?;
    Family::from_name(family)
}

/// Lists and reads everything under `prefix` and judges it.
pub async fn verify(s3: &S3, prefix: &str) -> Result<Report, S3Error> {
    verify_with(s3, prefix, &Expectations::default()).await
}

/// [`verify`] against [`Expectations`].
pub async fn verify_with(s3: &S3, prefix: &str, expect: &Expectations) -> Result<Report, S3Error> {
    let list_prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
    let keys = s3.list(&list_prefix).await?;
    let mut c = Collector::default();
    for (key, _) in keys {
        let name = key.rsplit('/').next().unwrap_or("");
        if name.starts_with("_manifest_") {
            c.manifest();
            continue;
        }
        // Files and folders starting with `_` are not data (the convention engines follow too):
        // the sink's `_edgeflow/` probe, manifests.
        if key.strip_prefix(&list_prefix).unwrap_or(&key).split('/').any(|part| part.starts_with('_')) {
            continue;
        }
        let Some(family) = family_of(&key) else { continue };
        let bytes = s3.get(&key).await?;
        c.object(&key, family, bytes);
    }
    Ok(c.report_with(s3.bucket(), prefix, expect))
}

impl Report {
    /// A human summary.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "s3://{}/{}: {} Parquet objects, {} manifests",
            self.bucket, self.prefix, self.objects, self.manifests
        );
        let rows: Vec<String> = self.rows.iter().map(|(f, n)| format!("{f} {n}")).collect();
        let _ = writeln!(out, "rows: {}", rows.join(", "));
        let _ = writeln!(
            out,
            "{:<24} {:>10} {:>10} {:>9} {:>10} {:>9} {:>10}",
            "node", "records", "filtered", "rejected", "deadletter", "missing", "duplicate"
        );
        for n in &self.nodes {
            let _ = writeln!(
                out,
                "{:<24} {:>10} {:>10} {:>9} {:>10} {:>9} {:>10}",
                n.node_id, n.records, n.filtered, n.rejected, n.deadletter, n.missing_count, n.duplicate_count
            );
            for [a, b] in &n.missing {
                let _ = writeln!(out, "    missing seq {a}..={b}");
            }
            if !n.duplicates.is_empty() {
                let _ = writeln!(out, "    duplicated seq {:?}", n.duplicates);
            }
            match (n.high_water_seq, &n.high_water_at) {
                (Some(hw), Some(at)) if n.complete => {
                    let _ = writeln!(out, "    complete through seq {} at {at}", hw - 1);
                }
                (Some(hw), Some(at)) => {
                    let _ = writeln!(out, "    NOT complete below its high-water marker (seq {hw} at {at})");
                }
                _ => {
                    let _ = writeln!(out, "    no high-water marker: the newest records cannot be proven");
                }
            }
            if n.after_high_water > 0 {
                let _ =
                    writeln!(out, "    {} records after the newest marker (tail not yet proven)", n.after_high_water);
            }
            if n.lineages > 1 {
                let _ = writeln!(
                    out,
                    "    {} epochs in {} lineages: a restored or copied buffer, or two agents with this node_id",
                    n.epochs, n.lineages
                );
            }
            if n.regressions > 0 {
                let _ = writeln!(out, "    {} records dead-lettered as seq_regression (a seq reused)", n.regressions);
            }
            if n.stale {
                let _ = writeln!(
                    out,
                    "    STALE: its markers stopped (older than the allowed age behind the newest node's)"
                );
            }
        }
        for node in &self.totals.absent_nodes {
            let _ = writeln!(out, "expected node {node}: nothing in S3");
        }
        let _ = writeln!(
            out,
            "aggregates: {} windows checked, {} mismatched",
            self.aggregates.windows_checked, self.aggregates.mismatch_count
        );
        for m in &self.aggregates.mismatches {
            let _ = writeln!(
                out,
                "    {} {}: expected {:?}, found {:?}",
                m.device_id.as_deref().unwrap_or("(all devices)"),
                m.window_start,
                m.expected,
                m.found
            );
        }
        if self.unattributed_deadletters > 0 {
            let _ = writeln!(out, "dead letters without node/seq: {}", self.unattributed_deadletters);
        }
        for e in &self.errors {
            let _ = writeln!(out, "error: {e}");
        }
        let _ = writeln!(
            out,
            "verdict: {} ({} records, {} missing, {} duplicate, {} stale nodes, {} absent nodes)",
            if self.ok { "OK" } else { "FAILED" },
            self.totals.records,
            self.totals.missing,
            self.totals.duplicates,
            self.totals.stale_nodes,
            self.totals.absent_nodes.len()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sink::parquet::{DeadLetterRow, ReadingRow, SpoolFile, writer_properties};

    const T: i64 = 1_735_207_200_000;

    fn file(dir: &std::path::Path, family: Family, fill: impl FnOnce(&mut SpoolFile)) -> bytes::Bytes {
        let path = dir.join(format!("{}.parquet", family.as_str()));
        let mut f = SpoolFile::new(family, path.clone(), 1000, writer_properties(1000));
        fill(&mut f);
        f.finish().expect("finish");
        bytes::Bytes::from(std::fs::read(path).expect("read"))
    }

    fn reading<'a>(node: &'a str, seq: i64, device: &'a str, t: i64, temperature: f64) -> ReadingRow<'a> {
        ReadingRow {
            device_id: device,
            event_time_ms: t,
            temperature,
            humidity: 50.0,
            status: "OK",
            node_id: node,
            epoch: None,
            seq,
            reason: None,
        }
    }

    fn dead(node: &str, seq: i64, reason: &str) -> DeadLetterRow<'static> {
        let node: &'static str = Box::leak(node.to_owned().into_boxed_str());
        let reason: &'static str = Box::leak(reason.to_owned().into_boxed_str());
        DeadLetterRow {
            node_id: Some(node),
            epoch: None,
            seq: Some(seq),
            reason,
            payload: b"x",
            received_at_ms: T,
            detail: "",
            source: "s",
            payload_size: 1,
            truncated: false,
        }
    }

    #[test]
    fn finds_gaps_duplicates_and_respects_buffer_markers() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Collector::default();
        c.object(
            "f",
            Family::Filtered,
            file(dir.path(), Family::Filtered, |f| {
                for seq in [1, 2, 3, 5, 5, 20] {
                    f.push_reading(&reading("n1", seq, "d", T, 10.0)).expect("push");
                }
            }),
        );
        c.object(
            "d",
            Family::Deadletter,
            file(dir.path(), Family::Deadletter, |f| {
                f.push_deadletter(&dead("n1", 4, "bad_json")).expect("push");
                f.push_deadletter(&dead("n1", 10, "buffer_created")).expect("push");
                f.push_deadletter(&dead("n1", 11, "bad_json")).expect("push");
            }),
        );
        let r = c.report("b", "p");
        assert!(!r.ok);
        let n = &r.nodes[0];
        assert_eq!((n.records, n.filtered, n.deadletter, n.buffers), (8, 6, 3, 1));
        assert_eq!(n.duplicates, vec![5]);
        assert_eq!(n.duplicate_count, 1);
        assert_eq!(n.missing, vec![[12, 19]], "6..=9 precede a buffer_created marker");
        assert_eq!(n.missing_count, 8);
        assert_eq!((n.min_seq, n.max_seq), (1, 20));
    }

    /// Issue 10, class 7: a restored buffer (or a second agent with the node's name) reuses
    /// `seq`s under a new epoch. Per node alone, its records looked like duplicates of the
    /// first writer's and hid its gaps; per epoch and lineage, each writer is checked.
    #[test]
    fn epochs_that_overlap_are_checked_as_lineages_of_their_own() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Collector::default();
        c.object(
            "f",
            Family::Filtered,
            file(dir.path(), Family::Filtered, |f| {
                // Run a: 1..=5; run b continues the same buffer: 6..=8.
                for (seq, epoch) in (1..=5).map(|s| (s, "a")).chain((6..=8).map(|s| (s, "b"))) {
                    f.push_reading(&ReadingRow { epoch: Some(epoch), ..reading("n", seq, "d", T, 1.0) }).expect("push");
                }
                // Run c, a restored copy: 4..=9 again, with 7 lost and 9 twice.
                for seq in [4, 5, 6, 8, 9, 9] {
                    f.push_reading(&ReadingRow { epoch: Some("c"), ..reading("n", seq, "d", T, 1.0) }).expect("push");
                }
            }),
        );
        c.object(
            "d",
            Family::Deadletter,
            file(dir.path(), Family::Deadletter, |f| {
                f.push_deadletter(&DeadLetterRow { epoch: Some("b"), ..high_water("n", 9, T) }).expect("push");
                let regression = DeadLetterRow { epoch: Some("b"), seq: None, ..dead("n", 0, SEQ_REGRESSION) };
                f.push_deadletter(&regression).expect("push");
            }),
        );
        let r = c.report("b", "p");
        let n = &r.nodes[0];
        assert_eq!((n.epochs, n.lineages, n.regressions), (3, 2, 1));
        assert_eq!((n.records, n.duplicates.clone(), n.missing.clone()), (14, vec![9], vec![[7, 7]]));
        assert!(n.complete, "lineage a-b is complete through its marker");
        assert_eq!((r.totals.missing, r.totals.duplicates, r.totals.regressions), (1, 1, 1));
        assert!(!r.ok);
        assert_eq!(r.unattributed_deadletters, 0, "a regression is the node's, not unattributed");
    }

    #[test]
    fn lineages_chain_epochs_that_follow_each_other() {
        assert_eq!(lineages(&[(1, 5), (6, 8), (4, 9)]), vec![vec![0, 1], vec![2]]);
        assert_eq!(lineages(&[(10, 20), (1, 5), (21, 30), (6, 9)]), vec![vec![1, 3, 0, 2]]);
        assert_eq!(lineages(&[]), Vec::<Vec<usize>>::new());
    }

    fn high_water(node: &str, seq: i64, at: i64) -> DeadLetterRow<'static> {
        DeadLetterRow { received_at_ms: at, ..dead(node, seq, MarkerKind::HighWater.as_str()) }
    }

    /// Issue 10: the newest records of a node that never arrived left no gap, and `verify`
    /// passed; a node that stopped was not noticed.
    #[test]
    fn high_water_markers_prove_the_tail_and_expose_what_stopped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let collect = || {
            let mut c = Collector::default();
            c.object(
                "f",
                Family::Filtered,
                file(dir.path(), Family::Filtered, |f| {
                    for seq in 1..=5 {
                        f.push_reading(&reading("short", seq, "d", T, 10.0)).expect("push");
                    }
                    for seq in [1, 2, 3, 5, 6] {
                        f.push_reading(&reading("whole", seq, "d", T, 10.0)).expect("push");
                    }
                    f.push_reading(&reading("quiet", 1, "d", T, 10.0)).expect("push");
                }),
            );
            c.object(
                "d",
                Family::Deadletter,
                file(dir.path(), Family::Deadletter, |f| {
                    // `short` assigned 6 and 7 before its marker 8: they never arrived.
                    f.push_deadletter(&high_water("short", 8, T + 60_000)).expect("push");
                    f.push_deadletter(&high_water("whole", 2, T)).expect("push");
                    f.push_deadletter(&high_water("whole", 4, T + 60_000)).expect("push");
                    f.push_deadletter(&high_water("quiet", 2, T - 600_000)).expect("push");
                }),
            );
            c
        };
        let r = collect().report("b", "p");
        assert!(!r.ok, "records of `short` stop short of its marker");
        let node = |name: &str| r.nodes.iter().find(|n| n.node_id == name).expect("node").clone();
        let short = node("short");
        assert_eq!((short.missing.clone(), short.complete, short.high_water_seq), (vec![[6, 7]], false, Some(8)));
        let whole = node("whole");
        assert_eq!((whole.missing_count, whole.complete, whole.high_water_seq), (0, true, Some(4)));
        assert_eq!(whole.high_water_at.as_deref(), Some("2024-12-26T10:01:00.000Z"));
        assert_eq!(whole.after_high_water, 2, "5 and 6 came after the newest marker");
        assert!(r.render().contains("complete through seq 3 at 2024-12-26T10:01:00.000Z"), "{}", r.render());
        assert_eq!(r.totals.stale_nodes, 0, "staleness is judged only when asked");

        let expect = Expectations { max_marker_age_ms: Some(120_000), nodes: vec!["whole".into(), "gone".into()] };
        let r = collect().report_with("b", "p", &expect);
        let stale: Vec<&str> = r.nodes.iter().filter(|n| n.stale).map(|n| n.node_id.as_str()).collect();
        assert_eq!(stale, vec!["quiet"], "its newest marker is 11 minutes behind the newest");
        assert_eq!(r.totals.absent_nodes, vec!["gone".to_owned()]);
        assert!(r.render().contains("expected node gone: nothing in S3"));
    }

    #[test]
    fn aggregates_are_checked_against_recomputed_windows() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Collector::default();
        c.object(
            "f",
            Family::Filtered,
            file(dir.path(), Family::Filtered, |f| {
                f.push_reading(&reading("n", 1, "a", T + 1_000, 10.0)).expect("push");
                f.push_reading(&reading("n", 2, "a", T + 2_000, 20.0)).expect("push");
                f.push_reading(&reading("n", 3, "b", T + 3_000, 30.0)).expect("push");
            }),
        );
        let good = file(dir.path(), Family::Aggregated, |f| {
            let mut a = Sums::of(10.0, 50.0);
            a.add(20.0, 50.0);
            f.push_aggregate(Some("a"), T, &a, false);
            f.push_aggregate(Some("b"), T, &Sums::of(30.0, 50.0), false);
            // The all-devices row split into a main and a late part.
            f.push_aggregate(None, T, &a, false);
        });
        c.object("a", Family::Aggregated, good);
        let dir2 = tempfile::tempdir().expect("tempdir");
        c.object(
            "late",
            Family::Aggregated,
            file(dir2.path(), Family::Aggregated, |f| f.push_aggregate(None, T, &Sums::of(30.0, 50.0), true)),
        );
        let r = c.report("b", "p");
        assert_eq!(r.aggregates.windows_checked, 3);
        assert_eq!(r.aggregates.mismatch_count, 0, "{:?}", r.aggregates.mismatches);
        assert!(r.ok);
        assert!(r.render().contains("verdict: OK"));
    }

    #[test]
    fn a_wrong_aggregate_is_a_mismatch() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = Collector::default();
        c.object(
            "f",
            Family::Filtered,
            file(dir.path(), Family::Filtered, |f| f.push_reading(&reading("n", 1, "a", T, 10.0)).expect("push")),
        );
        let dir2 = tempfile::tempdir().expect("tempdir");
        c.object(
            "a",
            Family::Aggregated,
            file(dir2.path(), Family::Aggregated, |f| {
                f.push_aggregate(Some("a"), T, &Sums::of(11.0, 50.0), false);
            }),
        );
        let r = c.report("b", "p");
        assert!(!r.ok);
        assert_eq!(r.aggregates.mismatch_count, 2, "device row wrong, all-devices row missing");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["aggregates"]["mismatches"][0]["device_id"], serde_json::Value::Null);
        assert_eq!(json["aggregates"]["mismatches"][0]["found"], serde_json::Value::Null);
    }

    #[test]
    fn families_come_from_file_names() {
        assert_eq!(family_of("p/2024/12/26/filtered_20241226T10Z_processed-data-0_5.parquet"), Some(Family::Filtered));
        assert_eq!(family_of("p/2024/12/26/_manifest_20241226T10Z_processed-data-0.json"), None);
        assert_eq!(family_of("p/other.parquet"), None);
    }
}
