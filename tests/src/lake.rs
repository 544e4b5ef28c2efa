//! Reads what the pipeline wrote to S3: every Parquet object under the prefix, by family.
//!
//! Independent of the aggregator's code on purpose (only the documented column names are
//! shared), so the oracle does not inherit a bug of the thing it judges.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

/// A row of the `filtered` or `rejected` family.
#[derive(Debug, Clone, PartialEq)]
pub struct ReadingRow {
    pub device_id: String,
    pub timestamp_ms: i64,
    pub temperature: f64,
    pub humidity: f64,
    pub status: String,
    pub node_id: String,
    /// The agent run (`None` from files or agents older than epochs).
    pub epoch: Option<String>,
    pub seq: i64,
    /// `rejected` only.
    pub reason: Option<String>,
}

/// A row of the `deadletter` family.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadRow {
    pub node_id: Option<String>,
    pub epoch: Option<String>,
    pub seq: Option<i64>,
    pub reason: String,
    pub payload: Vec<u8>,
}

/// A row of the `aggregated` family.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregateRow {
    pub window_start_ms: i64,
    /// `None` on the all-devices row.
    pub device_id: Option<String>,
    pub temperature_avg: f64,
    pub temperature_min: f64,
    pub temperature_max: f64,
    pub humidity_avg: f64,
    pub count: i64,
}

/// Everything under the prefix.
#[derive(Debug, Clone, Default)]
pub struct Lake {
    pub objects: usize,
    pub bytes: u64,
    pub filtered: Vec<ReadingRow>,
    pub rejected: Vec<ReadingRow>,
    pub deadletter: Vec<DeadRow>,
    pub aggregated: Vec<AggregateRow>,
    /// Object keys by family, for reports.
    pub keys: BTreeMap<String, Vec<String>>,
}

/// An S3 client for a local S3 API server (path-style, static test credentials).
pub fn client(endpoint: &str) -> aws_sdk_s3::Client {
    use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
    let conf = aws_sdk_s3::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new("e2e", "e2e", None, None, "e2e"))
        .build();
    aws_sdk_s3::Client::from_conf(conf)
}

/// Every key under `prefix/`.
pub async fn list(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut token = None;
    loop {
        let page = s3
            .list_objects_v2()
            .bucket(bucket)
            .prefix(format!("{prefix}/"))
            .set_continuation_token(token.take())
            .send()
            .await
            .context("listing the bucket")?;
        keys.extend(page.contents().iter().filter_map(|o| o.key()).map(str::to_owned));
        match page.next_continuation_token() {
            Some(t) => token = Some(t.to_owned()),
            None => return Ok(keys),
        }
    }
}

async fn get(s3: &aws_sdk_s3::Client, bucket: &str, key: &str) -> Result<bytes::Bytes> {
    let out = s3.get_object().bucket(bucket).key(key).send().await.with_context(|| format!("getting {key}"))?;
    Ok(out.body.collect().await.with_context(|| format!("reading {key}"))?.into_bytes())
}

/// Copies every object under `prefix/` to `dir/<key>` (the same layout as the bucket); returns
/// how many.
pub async fn mirror(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str, dir: &std::path::Path) -> Result<usize> {
    let keys = list(s3, bucket, prefix).await?;
    for key in &keys {
        let path = dir.join(key);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, get(s3, bucket, key).await?).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(keys.len())
}

/// Lists and reads every `.parquet` object under `prefix`.
pub async fn read(s3: &aws_sdk_s3::Client, bucket: &str, prefix: &str) -> Result<Lake> {
    let mut lake = Lake::default();
    for key in list(s3, bucket, prefix).await? {
        if !key.ends_with(".parquet") {
            continue;
        }
        let name = key.rsplit('/').next().unwrap_or(&key);
        let family = name.split('_').next().unwrap_or_default().to_owned();
        let body = get(s3, bucket, &key).await?;
        lake.objects += 1;
        lake.bytes += body.len() as u64;
        let reader = ParquetRecordBatchReaderBuilder::try_new(body)?.build()?;
        for batch in reader {
            let batch = batch?;
            match family.as_str() {
                "filtered" => lake.filtered.extend(readings(&batch, false)?),
                "rejected" => lake.rejected.extend(readings(&batch, true)?),
                "deadletter" => lake.deadletter.extend(dead(&batch)?),
                "aggregated" => lake.aggregated.extend(aggregates(&batch)?),
                other => anyhow::bail!("unknown family `{other}` in {key}"),
            }
        }
        lake.keys.entry(family).or_default().push(key);
    }
    Ok(lake)
}

fn col<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a dyn Array> {
    batch.column_by_name(name).map(|c| c.as_ref()).with_context(|| format!("column {name} missing"))
}

fn strings(batch: &RecordBatch, name: &str) -> Result<Vec<Option<String>>> {
    let c = col(batch, name)?;
    let a = c.as_string_opt::<i32>().with_context(|| format!("{name} is not UTF-8"))?;
    Ok((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i).to_owned())).collect())
}

/// The optional `Epoch` column (absent from files written before it).
fn epochs(batch: &RecordBatch) -> Result<Vec<Option<String>>> {
    if batch.column_by_name("Epoch").is_none() {
        return Ok(vec![None; batch.num_rows()]);
    }
    strings(batch, "Epoch")
}

fn floats(batch: &RecordBatch, name: &str) -> Result<Vec<f64>> {
    let c = col(batch, name)?;
    let a = c.as_primitive_opt::<Float64Type>().with_context(|| format!("{name} is not a double"))?;
    Ok(a.values().to_vec())
}

fn ints(batch: &RecordBatch, name: &str) -> Result<Vec<Option<i64>>> {
    let c = col(batch, name)?;
    let a = c.as_primitive_opt::<Int64Type>().with_context(|| format!("{name} is not an int64"))?;
    Ok((0..a.len()).map(|i| a.is_valid(i).then(|| a.value(i))).collect())
}

fn timestamps(batch: &RecordBatch, name: &str) -> Result<Vec<i64>> {
    let c = col(batch, name)?;
    let a = c
        .as_primitive_opt::<TimestampMillisecondType>()
        .with_context(|| format!("{name} is not a millisecond timestamp"))?;
    Ok(a.values().to_vec())
}

fn readings(batch: &RecordBatch, rejected: bool) -> Result<Vec<ReadingRow>> {
    let (device, ts, t, h) = (
        strings(batch, "DeviceId")?,
        timestamps(batch, "Timestamp")?,
        floats(batch, "Temperature")?,
        floats(batch, "Humidity")?,
    );
    let (status, node, seq) = (strings(batch, "Status")?, strings(batch, "NodeId")?, ints(batch, "Seq")?);
    let reason = if rejected { strings(batch, "Reason")? } else { vec![None; batch.num_rows()] };
    let epoch = epochs(batch)?;
    Ok((0..batch.num_rows())
        .map(|i| ReadingRow {
            device_id: device[i].clone().unwrap_or_default(),
            timestamp_ms: ts[i],
            temperature: t[i],
            humidity: h[i],
            status: status[i].clone().unwrap_or_default(),
            node_id: node[i].clone().unwrap_or_default(),
            epoch: epoch[i].clone(),
            seq: seq[i].unwrap_or(-1),
            reason: reason[i].clone(),
        })
        .collect())
}

fn dead(batch: &RecordBatch) -> Result<Vec<DeadRow>> {
    let (node, seq, reason) = (strings(batch, "NodeId")?, ints(batch, "Seq")?, strings(batch, "Reason")?);
    let c = col(batch, "Payload")?;
    let payload = c.as_binary_opt::<i32>().context("Payload is not binary")?;
    let epoch = epochs(batch)?;
    Ok((0..batch.num_rows())
        .map(|i| DeadRow {
            node_id: node[i].clone(),
            epoch: epoch[i].clone(),
            seq: seq[i],
            reason: reason[i].clone().unwrap_or_default(),
            payload: payload.value(i).to_vec(),
        })
        .collect())
}

fn aggregates(batch: &RecordBatch) -> Result<Vec<AggregateRow>> {
    let (ts, device) = (timestamps(batch, "Timestamp")?, strings(batch, "DeviceId")?);
    let (t, tmin, tmax, h) = (
        floats(batch, "Temperature")?,
        floats(batch, "TemperatureMin")?,
        floats(batch, "TemperatureMax")?,
        floats(batch, "Humidity")?,
    );
    let count = ints(batch, "Count")?;
    Ok((0..batch.num_rows())
        .map(|i| AggregateRow {
            window_start_ms: ts[i],
            device_id: device[i].clone(),
            temperature_avg: t[i],
            temperature_min: tmin[i],
            temperature_max: tmax[i],
            humidity_avg: h[i],
            count: count[i].unwrap_or(0),
        })
        .collect())
}
