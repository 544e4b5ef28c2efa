//! Parquet schemas of the four families, and the spool file a bucket is written into.
//!
//! The schemas are plain Parquet that any engine reads without our code: UTC millisecond
//! `TIMESTAMP`s (not strings), `INT64` sequence numbers, `DOUBLE` measurements, zstd pages,
//! dictionary-encoded strings.
//!
//! | family | columns |
//! |---|---|
//! | `aggregated` | `Timestamp` (window start), `DeviceId` (null on the all-devices row), `Temperature` (avg), `TemperatureMin`, `TemperatureMax`, `Humidity` (avg), `Count`, `Late`, `TemperatureSum`, `HumiditySum` |
//! | `filtered` | `DeviceId`, `Timestamp`, `Temperature`, `Humidity`, `Status`, `NodeId`, `Seq`, `Epoch` |
//! | `rejected` | the same plus `Reason`, then `Epoch` |
//! | `deadletter` | `NodeId`, `Seq`, `Reason`, `Payload` (binary), `ReceivedAt`, `Detail`, `Source`, `PayloadSize`, `Truncated`, `Epoch` |
//!
//! `Epoch` (nullable, always the last column) is the agent run that committed the record: a
//! record is `(NodeId, Epoch, Seq)`. It is null for records of agents older than epochs and in
//! files written before it existed, which simply lack the column (an optional column added at
//! the end, which every engine reads as null).
//!
//! An aggregated file has one row per (device, minute): every aggregate of a bucket with the
//! same key is merged before writing (sums and counts add, min/max fold), so the all-devices
//! partials of every raw partition become one row. `Late` is true when a late correction
//! contributed to the row. `TemperatureSum`/`HumiditySum` make rows of different files
//! (a main file and a late one) exactly additive.
//!
//! [`SpoolFile`] keeps at most `row_group_rows` rows in memory (column builders), then writes a
//! row group to the file: memory stays bounded whatever the hour's size. Aggregates are the
//! exception — they are merged in memory (one entry per device and minute of the hour).

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use arrow_array::builder::{
    BinaryBuilder, BooleanBuilder, Float64Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder,
};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::processed::Sums;
use crate::sink::state::Family;

fn ts() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

static AGGREGATED: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("Timestamp", ts(), false),
        Field::new("DeviceId", DataType::Utf8, true),
        Field::new("Temperature", DataType::Float64, false),
        Field::new("TemperatureMin", DataType::Float64, false),
        Field::new("TemperatureMax", DataType::Float64, false),
        Field::new("Humidity", DataType::Float64, false),
        Field::new("Count", DataType::Int64, false),
        Field::new("Late", DataType::Boolean, false),
        Field::new("TemperatureSum", DataType::Float64, false),
        Field::new("HumiditySum", DataType::Float64, false),
    ]))
});

fn reading_fields() -> Vec<Field> {
    vec![
        Field::new("DeviceId", DataType::Utf8, false),
        Field::new("Timestamp", ts(), false),
        Field::new("Temperature", DataType::Float64, false),
        Field::new("Humidity", DataType::Float64, false),
        Field::new("Status", DataType::Utf8, false),
        Field::new("NodeId", DataType::Utf8, false),
        Field::new("Seq", DataType::Int64, false),
    ]
}

fn epoch_field() -> Field {
    Field::new("Epoch", DataType::Utf8, true)
}

static FILTERED: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = reading_fields();
    fields.push(epoch_field());
    Arc::new(Schema::new(fields))
});

static REJECTED: LazyLock<SchemaRef> = LazyLock::new(|| {
    let mut fields = reading_fields();
    fields.push(Field::new("Reason", DataType::Utf8, false));
    fields.push(epoch_field());
    Arc::new(Schema::new(fields))
});

static DEADLETTER: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("NodeId", DataType::Utf8, true),
        Field::new("Seq", DataType::Int64, true),
        Field::new("Reason", DataType::Utf8, false),
        Field::new("Payload", DataType::Binary, false),
        Field::new("ReceivedAt", ts(), false),
        Field::new("Detail", DataType::Utf8, false),
        Field::new("Source", DataType::Utf8, false),
        Field::new("PayloadSize", DataType::Int64, false),
        Field::new("Truncated", DataType::Boolean, false),
        epoch_field(),
    ]))
});

/// The Arrow schema of a family's files.
pub fn schema(family: Family) -> SchemaRef {
    match family {
        Family::Aggregated => AGGREGATED.clone(),
        Family::Filtered => FILTERED.clone(),
        Family::Rejected => REJECTED.clone(),
        Family::Deadletter => DEADLETTER.clone(),
    }
}

/// Writer properties: zstd, bounded row groups, our name in `created_by`.
pub fn writer_properties(row_group_rows: usize) -> WriterProperties {
    WriterProperties::builder()
        // Level 1 is the fast end of zstd; ratios on telemetry are already far above snappy's.
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(row_group_rows))
        .set_created_by(format!("edgeflow-aggregator {}", env!("CARGO_PKG_VERSION")))
        .build()
}

/// A reading row (filtered or rejected).
#[derive(Debug, Clone, Copy)]
pub struct ReadingRow<'a> {
    pub device_id: &'a str,
    pub event_time_ms: i64,
    pub temperature: f64,
    pub humidity: f64,
    pub status: &'a str,
    pub node_id: &'a str,
    pub epoch: Option<&'a str>,
    pub seq: i64,
    /// Set for rejected readings.
    pub reason: Option<&'a str>,
}

/// A dead-letter row.
#[derive(Debug, Clone, Copy)]
pub struct DeadLetterRow<'a> {
    pub node_id: Option<&'a str>,
    pub epoch: Option<&'a str>,
    pub seq: Option<i64>,
    pub reason: &'a str,
    pub payload: &'a [u8],
    pub received_at_ms: i64,
    pub detail: &'a str,
    /// Where it came from: the agent's MQTT topic, or `raw-data/<partition>@<offset>`.
    pub source: &'a str,
    pub payload_size: i64,
    pub truncated: bool,
}

/// Why spooling failed (the local disk: full, read-only, removed).
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// Creating or writing the spool file failed.
    #[error("spool file {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// The Parquet writer failed (wraps an I/O error in practice).
    #[error("spool file {path}: {source}")]
    Parquet { path: PathBuf, source: parquet::errors::ParquetError },
}

#[derive(Debug)]
struct ReadingColumns {
    device: StringBuilder,
    timestamp: TimestampMillisecondBuilder,
    temperature: Float64Builder,
    humidity: Float64Builder,
    status: StringBuilder,
    node: StringBuilder,
    seq: Int64Builder,
    reason: Option<StringBuilder>,
    epoch: StringBuilder,
}

#[derive(Debug)]
struct DeadLetterColumns {
    node: StringBuilder,
    seq: Int64Builder,
    reason: StringBuilder,
    payload: BinaryBuilder,
    received_at: TimestampMillisecondBuilder,
    detail: StringBuilder,
    source: StringBuilder,
    payload_size: Int64Builder,
    truncated: BooleanBuilder,
    epoch: StringBuilder,
}

fn utc_builder() -> TimestampMillisecondBuilder {
    TimestampMillisecondBuilder::new().with_timezone("UTC")
}

#[derive(Debug)]
enum Columns {
    Readings(Box<ReadingColumns>),
    DeadLetters(Box<DeadLetterColumns>),
    /// (window start, device or `None` for all-devices) → (sums, late).
    Aggregates(BTreeMap<(i64, Option<String>), (Sums, bool)>),
}

impl Columns {
    fn new(family: Family) -> Self {
        match family {
            Family::Filtered | Family::Rejected => Self::Readings(Box::new(ReadingColumns {
                device: StringBuilder::new(),
                timestamp: utc_builder(),
                temperature: Float64Builder::new(),
                humidity: Float64Builder::new(),
                status: StringBuilder::new(),
                node: StringBuilder::new(),
                seq: Int64Builder::new(),
                reason: (family == Family::Rejected).then(StringBuilder::new),
                epoch: StringBuilder::new(),
            })),
            Family::Deadletter => Self::DeadLetters(Box::new(DeadLetterColumns {
                node: StringBuilder::new(),
                seq: Int64Builder::new(),
                reason: StringBuilder::new(),
                payload: BinaryBuilder::new(),
                received_at: utc_builder(),
                detail: StringBuilder::new(),
                source: StringBuilder::new(),
                payload_size: Int64Builder::new(),
                truncated: BooleanBuilder::new(),
                epoch: StringBuilder::new(),
            })),
            Family::Aggregated => Self::Aggregates(BTreeMap::new()),
        }
    }

    /// Takes the buffered rows as a batch (empties the builders).
    fn take_batch(&mut self, schema: SchemaRef) -> Result<RecordBatch, arrow_schema::ArrowError> {
        let columns: Vec<ArrayRef> = match self {
            Self::Readings(c) => {
                let mut v: Vec<ArrayRef> = vec![
                    Arc::new(c.device.finish()),
                    Arc::new(c.timestamp.finish()),
                    Arc::new(c.temperature.finish()),
                    Arc::new(c.humidity.finish()),
                    Arc::new(c.status.finish()),
                    Arc::new(c.node.finish()),
                    Arc::new(c.seq.finish()),
                ];
                if let Some(reason) = &mut c.reason {
                    v.push(Arc::new(reason.finish()));
                }
                v.push(Arc::new(c.epoch.finish()));
                v
            }
            Self::DeadLetters(c) => vec![
                Arc::new(c.node.finish()),
                Arc::new(c.seq.finish()),
                Arc::new(c.reason.finish()),
                Arc::new(c.payload.finish()),
                Arc::new(c.received_at.finish()),
                Arc::new(c.detail.finish()),
                Arc::new(c.source.finish()),
                Arc::new(c.payload_size.finish()),
                Arc::new(c.truncated.finish()),
                Arc::new(c.epoch.finish()),
            ],
            Self::Aggregates(map) => return aggregate_batch(std::mem::take(map).into_iter(), schema),
        };
        RecordBatch::try_new(schema, columns)
    }
}

/// Builds an aggregated batch from merged rows.
fn aggregate_batch(
    rows: impl ExactSizeIterator<Item = ((i64, Option<String>), (Sums, bool))>,
    schema: SchemaRef,
) -> Result<RecordBatch, arrow_schema::ArrowError> {
    let n = rows.len();
    let mut timestamp = utc_builder();
    let mut device = StringBuilder::with_capacity(n, n * 16);
    let (mut avg, mut min, mut max, mut hum) = (
        Float64Builder::with_capacity(n),
        Float64Builder::with_capacity(n),
        Float64Builder::with_capacity(n),
        Float64Builder::with_capacity(n),
    );
    let mut count = Int64Builder::with_capacity(n);
    let mut late = BooleanBuilder::with_capacity(n);
    let (mut tsum, mut hsum) = (Float64Builder::with_capacity(n), Float64Builder::with_capacity(n));
    for ((window, dev), (s, is_late)) in rows {
        timestamp.append_value(window);
        device.append_option(dev);
        let c = s.count.max(1) as f64;
        avg.append_value(s.temperature_sum / c);
        min.append_value(s.temperature_min);
        max.append_value(s.temperature_max);
        hum.append_value(s.humidity_sum / c);
        count.append_value(i64::try_from(s.count).unwrap_or(i64::MAX));
        late.append_value(is_late);
        tsum.append_value(s.temperature_sum);
        hsum.append_value(s.humidity_sum);
    }
    let columns: Vec<ArrayRef> = vec![
        Arc::new(timestamp.finish()),
        Arc::new(device.finish()),
        Arc::new(avg.finish()),
        Arc::new(min.finish()),
        Arc::new(max.finish()),
        Arc::new(hum.finish()),
        Arc::new(count.finish()),
        Arc::new(late.finish()),
        Arc::new(tsum.finish()),
        Arc::new(hsum.finish()),
    ];
    RecordBatch::try_new(schema, columns)
}

/// A finished spool file, ready to upload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finished {
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
}

/// The Parquet file of one open bucket.
#[derive(Debug)]
pub struct SpoolFile {
    family: Family,
    path: PathBuf,
    row_group_rows: usize,
    props: WriterProperties,
    writer: Option<ArrowWriter<File>>,
    columns: Columns,
    buffered: usize,
    rows: u64,
}

impl SpoolFile {
    /// A spool file at `path` (created at the first row group).
    pub fn new(family: Family, path: PathBuf, row_group_rows: usize, props: WriterProperties) -> Self {
        Self { family, path, row_group_rows, props, writer: None, columns: Columns::new(family), buffered: 0, rows: 0 }
    }

    pub fn family(&self) -> Family {
        self.family
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes written to disk so far (row groups already flushed).
    pub fn bytes_on_disk(&self) -> u64 {
        self.writer.as_ref().map_or(0, |w| w.bytes_written() as u64)
    }

    /// Rows appended (for aggregates: contributions, before merging).
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Appends a reading (filtered or rejected family).
    pub fn push_reading(&mut self, r: &ReadingRow<'_>) -> Result<(), SpoolError> {
        if let Columns::Readings(c) = &mut self.columns {
            c.device.append_value(r.device_id);
            c.timestamp.append_value(r.event_time_ms);
            c.temperature.append_value(r.temperature);
            c.humidity.append_value(r.humidity);
            c.status.append_value(r.status);
            c.node.append_value(r.node_id);
            c.seq.append_value(r.seq);
            if let Some(reason) = &mut c.reason {
                reason.append_value(r.reason.unwrap_or(""));
            }
            c.epoch.append_option(r.epoch);
            self.appended()?;
        }
        Ok(())
    }

    /// Appends a dead letter (deadletter family).
    pub fn push_deadletter(&mut self, d: &DeadLetterRow<'_>) -> Result<(), SpoolError> {
        if let Columns::DeadLetters(c) = &mut self.columns {
            c.node.append_option(d.node_id);
            c.seq.append_option(d.seq);
            c.reason.append_value(d.reason);
            c.payload.append_value(d.payload);
            c.received_at.append_value(d.received_at_ms);
            c.detail.append_value(d.detail);
            c.source.append_value(d.source);
            c.payload_size.append_value(d.payload_size);
            c.truncated.append_value(d.truncated);
            c.epoch.append_option(d.epoch);
            self.appended()?;
        }
        Ok(())
    }

    /// Merges an aggregate (aggregated family).
    pub fn push_aggregate(&mut self, device_id: Option<&str>, window_start_ms: i64, sums: &Sums, late: bool) {
        if let Columns::Aggregates(map) = &mut self.columns {
            let entry = map.entry((window_start_ms, device_id.map(str::to_owned))).or_insert((Sums::default(), false));
            entry.0.merge(sums);
            entry.1 |= late;
            self.rows += 1;
        }
    }

    fn appended(&mut self) -> Result<(), SpoolError> {
        self.rows += 1;
        self.buffered += 1;
        if self.buffered >= self.row_group_rows { self.write_row_group() } else { Ok(()) }
    }

    fn writer(&mut self) -> Result<&mut ArrowWriter<File>, SpoolError> {
        if self.writer.is_none() {
            let file = File::create(&self.path).map_err(|source| SpoolError::Io { path: self.path.clone(), source })?;
            let writer = ArrowWriter::try_new(file, schema(self.family), Some(self.props.clone()))
                .map_err(|source| SpoolError::Parquet { path: self.path.clone(), source })?;
            self.writer = Some(writer);
        }
        // Set just above when it was `None`.
        Ok(self.writer.as_mut().expect("writer was just created"))
    }

    /// Writes the buffered rows as one row group.
    fn write_row_group(&mut self) -> Result<(), SpoolError> {
        let batch = self
            .columns
            .take_batch(schema(self.family))
            .map_err(|e| SpoolError::Parquet { path: self.path.clone(), source: e.into() })?;
        self.buffered = 0;
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let path = self.path.clone();
        let rows = self.row_group_rows;
        let writer = self.writer()?;
        // Aggregates arrive as one batch at the end; slice it into bounded row groups.
        let mut start = 0;
        while start < batch.num_rows() {
            let len = rows.min(batch.num_rows() - start);
            writer
                .write(&batch.slice(start, len))
                .map_err(|source| SpoolError::Parquet { path: path.clone(), source })?;
            writer.flush().map_err(|source| SpoolError::Parquet { path: path.clone(), source })?;
            start += len;
        }
        Ok(())
    }

    /// Writes what is buffered and the footer; the file is complete.
    pub fn finish(mut self) -> Result<Finished, SpoolError> {
        self.write_row_group()?;
        let rows = match &self.columns {
            Columns::Aggregates(_) => {
                self.writer.as_ref().map_or(0, |w| w.flushed_row_groups().iter().map(|g| g.num_rows() as u64).sum())
            }
            _ => self.rows,
        };
        let path = self.path.clone();
        let writer = match self.writer.take() {
            Some(w) => w,
            None => {
                // No rows at all (cannot happen for a bucket, which opens with a row); still
                // produce a valid, empty file.
                self.writer()?;
                self.writer.take().expect("writer was just created")
            }
        };
        let file = writer.into_inner().map_err(|source| SpoolError::Parquet { path: path.clone(), source })?;
        file.sync_all().map_err(|source| SpoolError::Io { path: path.clone(), source })?;
        let bytes = file.metadata().map_err(|source| SpoolError::Io { path: path.clone(), source })?.len();
        Ok(Finished { path, rows, bytes })
    }

    /// Abandons the file (a revoked partition), deleting what was written.
    pub fn discard(self) {
        if self.writer.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::Array;
    use arrow_array::cast::AsArray;
    use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
    use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

    /// Reads a whole file as one batch (the reader fills a batch across row groups).
    fn read(path: &Path) -> (RecordBatch, usize) {
        let file = File::open(path).expect("open");
        let builder = ParquetRecordBatchReaderBuilder::try_new(file).expect("parquet").with_batch_size(1 << 20);
        let groups = builder.metadata().num_row_groups();
        let mut batches: Vec<RecordBatch> = builder.build().expect("reader").map(|b| b.expect("batch")).collect();
        assert_eq!(batches.len(), 1);
        (batches.remove(0), groups)
    }

    #[test]
    fn readings_spill_in_bounded_row_groups_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f.parquet");
        let mut f = SpoolFile::new(Family::Rejected, path.clone(), 3, writer_properties(3));
        for i in 0..7 {
            f.push_reading(&ReadingRow {
                device_id: "d1",
                event_time_ms: 1_000 + i,
                temperature: 101.5,
                humidity: 40.0,
                status: "OK",
                node_id: "n",
                epoch: (i % 2 == 0).then_some("9f3c0a6e51d2b874"),
                seq: i,
                reason: Some("temperature_above_max"),
            })
            .expect("push");
            if i == 3 {
                assert!(f.bytes_on_disk() > 0, "a full row group is on disk");
            }
        }
        let done = f.finish().expect("finish");
        assert_eq!(done.rows, 7);
        let (b, groups) = read(&path);
        assert_eq!(groups, 3);
        assert_eq!(
            b.schema().fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>(),
            ["DeviceId", "Timestamp", "Temperature", "Humidity", "Status", "NodeId", "Seq", "Reason", "Epoch"]
        );
        assert_eq!(b.schema().field(1).data_type(), &ts());
        let seqs: Vec<i64> = b.column(6).as_primitive::<Int64Type>().values().to_vec();
        assert_eq!(seqs, (0..7).collect::<Vec<_>>());
        let times: Vec<i64> = b.column(1).as_primitive::<TimestampMillisecondType>().values().to_vec();
        assert_eq!(times[6], 1_006);
        assert_eq!(b.column(7).as_string::<i32>().value(0), "temperature_above_max");
        let epochs = b.column(8).as_string::<i32>();
        assert_eq!((epochs.value(0), epochs.is_null(1)), ("9f3c0a6e51d2b874", true));
    }

    #[test]
    fn aggregates_merge_to_one_row_per_device_and_minute() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("a.parquet");
        let mut f = SpoolFile::new(Family::Aggregated, path.clone(), 2, writer_properties(2));
        let s = |t: f64| Sums::of(t, 50.0);
        f.push_aggregate(Some("d1"), 60_000, &s(10.0), false);
        f.push_aggregate(None, 60_000, &s(10.0), false);
        f.push_aggregate(None, 60_000, &s(30.0), false);
        f.push_aggregate(Some("d1"), 60_000, &s(20.0), true);
        f.push_aggregate(Some("d2"), 0, &s(5.0), false);
        let done = f.finish().expect("finish");
        assert_eq!(done.rows, 3);
        let (b, groups) = read(&path);
        assert_eq!(groups, 2);
        let device = b.column(1).as_string::<i32>();
        assert_eq!((device.value(0), device.is_null(1), device.value(2)), ("d2", true, "d1"));
        let avg = b.column(2).as_primitive::<Float64Type>();
        assert_eq!(avg.values().to_vec(), vec![5.0, 20.0, 15.0]);
        let count = b.column(6).as_primitive::<Int64Type>();
        assert_eq!(count.values().to_vec(), vec![1, 2, 2]);
        let late = b.column(7).as_boolean();
        assert_eq!((late.value(0), late.value(1), late.value(2)), (false, false, true));
        assert_eq!(b.column(8).as_primitive::<Float64Type>().values().to_vec(), vec![5.0, 40.0, 30.0]);
    }

    #[test]
    fn deadletters_keep_binary_payloads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("d.parquet");
        let mut f = SpoolFile::new(Family::Deadletter, path.clone(), 100, writer_properties(100));
        f.push_deadletter(&DeadLetterRow {
            node_id: None,
            epoch: None,
            seq: None,
            reason: "bad_json",
            payload: &[0xff, 0x00, b'{'],
            received_at_ms: 5,
            detail: "x",
            source: "raw-data/0@7",
            payload_size: 3,
            truncated: false,
        })
        .expect("push");
        f.finish().expect("finish");
        let (b, _) = read(&path);
        assert!(b.column(0).is_null(0) && b.column(1).is_null(0));
        assert_eq!(b.column(3).as_binary::<i32>().value(0), &[0xff, 0x00, b'{']);
    }
}
