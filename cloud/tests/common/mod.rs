//! Shared fixtures of the aggregator's integration tests: a real tansu and a real moto on
//! 127.0.0.1, topics, a bucket, configuration, record builders and S3/Parquet readers.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float64Type, Int64Type, TimestampMillisecondType};
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
use edgeflow_aggregator::config::{Config, Settings, StaticCredentials};
use edgeflow_contract::{DeadLetter, Provenance, RawRecord, Reading};
use edgeflow_runtime::config::Secret;
use edgeflow_testkit::{FaultProxy, Moto, Tansu, TansuStorage, kafka};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tempfile::TempDir;

pub const BUCKET: &str = "edgeflow-test";
pub const PREFIX: &str = "telemetry";
/// The `[s3] deployment_id` of the tests' aggregators.
pub const DEPLOYMENT: &str = "test-site";
pub const RAW: &str = "raw-data";
pub const PROCESSED: &str = "processed-data";
pub const DLQ: &str = "raw-data-dlq";

/// 2024-12-26T10:00:00Z: hour 10 of the test data.
pub const H10: i64 = 1_735_207_200_000;
pub const MIN: i64 = 60_000;

/// The consumers' session timeout in these tests.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// After a `kill -9`, waits until the broker must have expired the dead member.
///
/// tansu 0.6 does not rebalance a group whose dead leader is expired while a new member is
/// joining: the newcomer gets an empty assignment and heartbeats succeed forever. A replacement
/// is therefore started only once the session timeout has passed; tansu lists no group
/// membership (DescribeGroups returns nothing), so there is no event to wait for instead.
pub async fn wait_out_dead_member() {
    tokio::time::sleep(SESSION_TIMEOUT + Duration::from_secs(2)).await;
}
pub const HOUR: i64 = 3_600_000;

/// Real servers, topics and a bucket.
pub struct Env {
    pub tansu: Tansu,
    pub moto: Moto,
    /// Present when S3 is reached through a fault proxy.
    pub s3_proxy: Option<FaultProxy>,
    pub s3: aws_sdk_s3::Client,
    pub partitions: i32,
    pub dir: TempDir,
}

impl Env {
    /// Starts tansu (in memory) and moto, creates the
    /// topics with `partitions` partitions (one for the DLQ) and the bucket.
    pub async fn start(partitions: i32) -> Result<Self> {
        Self::start_with(partitions, false).await
    }

    /// Like [`Env::start`], with S3 behind a [`FaultProxy`] when `proxy_s3`.
    pub async fn start_with(partitions: i32, proxy_s3: bool) -> Result<Self> {
        let tansu = Tansu::start(TansuStorage::Memory)?;
        let moto = Moto::start()?;
        let s3_proxy = if proxy_s3 { Some(FaultProxy::start(0, moto.port)?) } else { None };
        kafka::create_topics(&tansu.bootstrap(), &[(RAW, partitions), (PROCESSED, partitions), (DLQ, 1)]).await?;
        let s3 = client(&moto.endpoint());
        let mut attempt = 0;
        loop {
            match s3.create_bucket().bucket(BUCKET).send().await {
                Ok(_) => break,
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    tracing::debug!(error = ?e, "moto not ready");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e).context("creating the bucket"),
            }
        }
        // EDGEFLOW_TEST_KEEP=1 keeps configurations, spools and the aggregators' logs.
        let keep = std::env::var_os("EDGEFLOW_TEST_KEEP").is_some();
        let dir = tempfile::Builder::new().prefix("aggregator-test").disable_cleanup(keep).tempdir()?;
        if keep {
            eprintln!("test files kept in {}", dir.path().display());
        }
        Ok(Self { tansu, moto, s3_proxy, s3, partitions, dir })
    }

    pub fn bootstrap(&self) -> String {
        self.tansu.bootstrap()
    }

    /// The endpoint the aggregator uses (the proxy's when there is one).
    pub fn s3_endpoint(&self) -> String {
        match &self.s3_proxy {
            Some(p) => format!("http://127.0.0.1:{}", p.port),
            None => self.moto.endpoint(),
        }
    }

    /// Configuration TOML for an aggregator instance named `name` (own spool directory).
    /// `extra` is appended inside `[sink]`-free sections by the caller through `overrides`.
    pub fn config_toml(&self, name: &str, overrides: &[(&str, &str)]) -> String {
        let spool = self.spool_dir(name);
        let mut sections: Vec<(&str, Vec<(String, String)>)> = vec![
            ("kafka", vec![("brokers".into(), q(&self.bootstrap())), ("group_id".into(), q("agg"))]),
            ("kafka.properties", vec![("\"session.timeout.ms\"".into(), q(&SESSION_TIMEOUT.as_millis().to_string()))]),
            (
                "process",
                vec![
                    ("allowed_lateness".into(), q("5s")),
                    ("checkpoint_interval".into(), q("300ms")),
                    ("idle_timeout".into(), q("1h")),
                ],
            ),
            (
                "sink",
                vec![
                    ("spool_dir".into(), q(&spool.display().to_string())),
                    ("seal_grace".into(), q("1m")),
                    ("idle_timeout".into(), q("1h")),
                    ("row_group_rows".into(), "1000".into()),
                    ("checkpoint_interval".into(), q("300ms")),
                ],
            ),
            (
                "s3",
                vec![
                    ("bucket".into(), q(BUCKET)),
                    ("prefix".into(), q(PREFIX)),
                    ("deployment_id".into(), q(DEPLOYMENT)),
                    ("region".into(), q("us-east-1")),
                    ("endpoint_url".into(), q(&self.s3_endpoint())),
                    ("force_path_style".into(), "true".into()),
                ],
            ),
            ("metrics", vec![("listen".into(), q("127.0.0.1:0"))]),
        ];
        for (key, value) in overrides {
            let (section, field) = key.split_once('.').expect("override keys are section.field");
            let entries = &mut sections.iter_mut().find(|(s, _)| *s == section).expect("known section").1;
            entries.retain(|(f, _)| f != field);
            entries.push((field.to_owned(), (*value).to_owned()));
        }
        let mut out = String::new();
        for (section, entries) in sections {
            out.push_str(&format!("[{section}]\n"));
            for (k, v) in entries {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }

    /// Validated settings for an in-process instance (static test credentials).
    pub fn settings(&self, name: &str, overrides: &[(&str, &str)]) -> Result<Settings> {
        let text = self.config_toml(name, overrides);
        let config = Config::parse(&text).map_err(anyhow::Error::msg)?;
        let mut settings = config.validate()?;
        settings.s3.credentials =
            Some(StaticCredentials { access_key_id: "test".into(), secret_access_key: Secret::new("test") });
        Ok(settings)
    }

    /// Writes the configuration of a child-process instance; returns its path.
    pub fn config_file(&self, name: &str, overrides: &[(&str, &str)]) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, self.config_toml(name, overrides))?;
        Ok(path)
    }

    pub fn spool_dir(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("spool-{name}"))
    }

    /// Every key under the prefix but the sink's own start-up probe (`…/_edgeflow/…`): the
    /// data files and manifests.
    pub async fn keys(&self) -> Result<Vec<String>> {
        Ok(list(&self.s3, PREFIX).await?.into_iter().filter(|k| !k.contains("/_edgeflow/")).collect())
    }

    /// Waits until `done(keys)` holds.
    pub async fn wait_for_keys(
        &self,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&[String]) -> bool,
    ) -> Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let keys = self.keys().await?;
            if done(&keys) {
                return Ok(keys);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}; keys: {keys:#?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Reads a Parquet object whole.
    pub async fn parquet(&self, key: &str) -> Result<RecordBatch> {
        read_parquet(&self.s3, key).await
    }

    /// The key of an hour's manifest for processed-data partition `p` (or the DLQ topic).
    pub fn manifest_key(&self, hour_ms: i64, topic: &str, p: i32) -> String {
        self.manifest_key_of(DEPLOYMENT, hour_ms, topic, p)
    }

    /// [`Env::manifest_key`] of deployment `deployment`.
    pub fn manifest_key_of(&self, deployment: &str, hour_ms: i64, topic: &str, p: i32) -> String {
        let t = chrono::DateTime::from_timestamp_millis(hour_ms).expect("valid");
        format!("{}/_manifest_{}_{topic}-{p}.json", dir_of(deployment, hour_ms), t.format("%Y%m%dT%HZ"))
    }

    /// The key of the Parquet file of `family`, hour, input partition and first offset.
    pub fn data_key(&self, family: &str, hour_ms: i64, topic: &str, p: i32, first_offset: i64) -> String {
        let t = chrono::DateTime::from_timestamp_millis(hour_ms).expect("valid");
        format!(
            "{}/{family}_{}_{topic}-{p}_{first_offset}.parquet",
            dir_of(DEPLOYMENT, hour_ms),
            t.format("%Y%m%dT%HZ")
        )
    }
}

/// The directory of an hour's objects.
fn dir_of(deployment: &str, hour_ms: i64) -> String {
    let t = chrono::DateTime::from_timestamp_millis(hour_ms).expect("valid");
    format!("{PREFIX}/{deployment}/{}", t.format("%Y/%m/%d"))
}

fn q(s: &str) -> String {
    format!("{s:?}")
}

/// An S3 client for moto with static test credentials.
pub fn client(endpoint: &str) -> aws_sdk_s3::Client {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .credentials_provider(Credentials::new("test", "test", None, None, "test"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config)
}

pub async fn list(s3: &aws_sdk_s3::Client, prefix: &str) -> Result<Vec<String>> {
    let mut keys = Vec::new();
    let mut pages = s3.list_objects_v2().bucket(BUCKET).prefix(prefix).into_paginator().send();
    while let Some(page) = pages.next().await {
        for o in page?.contents() {
            keys.extend(o.key().map(str::to_owned));
        }
    }
    keys.sort();
    Ok(keys)
}

pub async fn read_parquet(s3: &aws_sdk_s3::Client, key: &str) -> Result<RecordBatch> {
    let body = s3.get_object().bucket(BUCKET).key(key).send().await?.body.collect().await?.into_bytes();
    let mut batches: Vec<RecordBatch> =
        ParquetRecordBatchReaderBuilder::try_new(body)?.with_batch_size(1 << 22).build()?.collect::<Result<_, _>>()?;
    match batches.len() {
        1 => Ok(batches.remove(0)),
        n => bail!("{key}: expected one batch, got {n}"),
    }
}

/// RFC 3339 of a millisecond timestamp.
pub fn rfc3339(t: i64) -> String {
    chrono::DateTime::from_timestamp_millis(t).expect("valid time").to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// A raw-data value as the agent writes it.
pub fn raw(device: &str, t: i64, temperature: f64, humidity: f64, status: &str, node: &str, seq: u64) -> Vec<u8> {
    let ts = rfc3339(t);
    let reading = Reading {
        device_id: device.into(),
        timestamp: ts.as_str().into(),
        temperature,
        humidity,
        status: status.into(),
        event_time_ms: t,
    };
    RawRecord { reading, provenance: Provenance { node_id: node.into(), epoch: None, seq } }.to_json()
}

/// A raw-data value of agent run `epoch`.
#[allow(clippy::too_many_arguments)]
pub fn raw_in(device: &str, t: i64, temperature: f64, humidity: f64, node: &str, epoch: &str, seq: u64) -> Vec<u8> {
    let ts = rfc3339(t);
    let reading = Reading {
        device_id: device.into(),
        timestamp: ts.as_str().into(),
        temperature,
        humidity,
        status: "OK".into(),
        event_time_ms: t,
    };
    RawRecord { reading, provenance: Provenance { node_id: node.into(), epoch: Some(epoch.into()), seq } }.to_json()
}

/// A raw-data-dlq value as the agent writes it.
pub fn dead_letter(node: &str, seq: u64, reason: &str, payload: &[u8], received_at_ms: i64) -> Vec<u8> {
    DeadLetter {
        node_id: node.into(),
        epoch: None,
        seq,
        reason: reason.into(),
        detail: "test".into(),
        source: "devices/x/telemetry".into(),
        received_at_ms,
        payload_size: payload.len() as u64,
        truncated: false,
        payload: payload.to_vec(),
    }
    .to_json()
}

/// A producer like the agent's: idempotent, acks=all.
pub fn producer(bootstrap: &str) -> Result<FutureProducer> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()?)
}

/// Produces `(partition, key, value)` in order, waiting for each delivery.
pub async fn produce(p: &FutureProducer, topic: &str, records: &[(i32, &str, Vec<u8>)]) -> Result<()> {
    let mut pending = Vec::new();
    for (partition, key, value) in records {
        let fut = p
            .send_result(FutureRecord::to(topic).partition(*partition).key(*key).payload(value))
            .map_err(|(e, _)| anyhow::anyhow!("enqueue: {e}"))?;
        pending.push(fut);
    }
    for f in pending {
        f.await.context("delivery canceled")?.map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    Ok(())
}

/// Runs the aggregator in-process until the returned handle is stopped.
pub struct Running {
    pub token: edgeflow_runtime::CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), edgeflow_aggregator::RunError>>,
}

impl Running {
    pub fn start(settings: Settings, stages: edgeflow_aggregator::Stages) -> Self {
        let token = edgeflow_runtime::CancellationToken::new();
        let task = tokio::spawn(edgeflow_aggregator::run(settings, stages, token.clone()));
        Self { token, task }
    }

    /// Stops (as on SIGTERM) and returns the run's result.
    pub async fn stop(self) -> Result<()> {
        self.token.cancel();
        match tokio::time::timeout(Duration::from_secs(60), self.task).await {
            Ok(Ok(r)) => r.map_err(anyhow::Error::from),
            Ok(Err(e)) => bail!("aggregator task panicked: {e}"),
            Err(_) => bail!("aggregator did not stop within 60s"),
        }
    }
}

/// Logs to the test's output (captured by the harness) once per process.
pub fn init_logging() {
    edgeflow_runtime::logging::init("info,edgeflow_aggregator=debug", edgeflow_runtime::logging::Target::Stderr);
}

/// The aggregator binary, for tests that kill it.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_edgeflow-aggregator")
}

/// A path's display, for commands.
pub fn display(p: &Path) -> String {
    p.display().to_string()
}

/// Produces `(partition, key, value, broker timestamp)` in order (the timestamp stands for the
/// agent's receive time, which is a dead letter's hour).
pub async fn produce_at(p: &FutureProducer, topic: &str, records: &[(i32, &str, Vec<u8>, i64)]) -> Result<()> {
    for (partition, key, value, ts) in records {
        p.send(
            FutureRecord::to(topic).partition(*partition).key(*key).payload(value).timestamp(*ts),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| anyhow::anyhow!("delivery: {e}"))?;
    }
    Ok(())
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    let status = out.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((status, body))
}

/// The value of a sample line `name{labels} value` in an OpenMetrics exposition.
pub fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|l| {
        l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
    })
}

/// The aggregator binary running as a child process (for `kill -9`).
pub struct Proc {
    pub child: edgeflow_testkit::Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Proc {
    /// Starts `edgeflow-aggregator <command> --config …` with test credentials in its
    /// environment (the default AWS chain reads them).
    pub fn spawn(env: &Env, name: &str, command: &str, overrides: &[(&str, &str)]) -> Result<Self> {
        let port = edgeflow_testkit::free_port();
        let listen = format!("\"127.0.0.1:{port}\"");
        let mut all: Vec<(&str, &str)> = overrides.to_vec();
        all.push(("metrics.listen", &listen));
        let config = env.config_file(name, &all)?;
        let log = env.dir.path().join(format!("{name}.log"));
        let mut cmd = std::process::Command::new(binary());
        cmd.arg(command)
            .arg("--config")
            .arg(&config)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_EC2_METADATA_DISABLED", "true")
            .env("RUST_LOG", "info,edgeflow_aggregator=debug");
        let child = edgeflow_testkit::Child::spawn(name, cmd, Some(&log))?;
        edgeflow_testkit::wait_for_port(port, Duration::from_secs(60))
            .with_context(|| format!("{name} did not start; see {}", log.display()))?;
        Ok(Self { child, port, log })
    }

    /// Scrapes `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        Ok(http_get(self.port, "/metrics").await?.1)
    }

    /// Waits until a metric reaches `at_least`.
    pub async fn wait_metric(&self, series: &str, at_least: f64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.metrics().await.unwrap_or_default();
            if metric(&text, series).is_some_and(|v| v >= at_least) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{series} did not reach {at_least} within {timeout:?}; log: {}", self.log.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Runs `verify` until it reports `expected` records with nothing missing or duplicated and
/// every aggregate matching (the pipeline is eventually complete), or the timeout passes.
pub async fn wait_verified(env: &Env, expected: u64, timeout: Duration) -> Result<edgeflow_aggregator::verify::Report> {
    let s3 = edgeflow_aggregator::s3::S3::new(&env.settings("verify", &[])?.s3).await;
    let deadline = Instant::now() + timeout;
    loop {
        let report = edgeflow_aggregator::verify::verify(&s3, PREFIX).await?;
        if report.ok && report.totals.records == expected {
            return Ok(report);
        }
        if Instant::now() > deadline {
            bail!("not complete after {timeout:?} (expected {expected} records):\n{}", report.render());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Checks that every Parquet object is listed by exactly one manifest and every listed file
/// exists: no orphan left by a crashed run.
pub async fn check_manifests(env: &Env) -> Result<()> {
    let keys = env.keys().await?;
    let mut listed: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
    for key in keys.iter().filter(|k| k.contains("/_manifest_")) {
        let body = env.s3.get_object().bucket(BUCKET).key(key).send().await?.body.collect().await?.into_bytes();
        let m: serde_json::Value = serde_json::from_slice(&body)?;
        for f in m["files"].as_array().context("files")? {
            *listed.entry(f["key"].as_str().context("key")?.to_owned()).or_default() += 1;
        }
    }
    let objects: Vec<&String> = keys.iter().filter(|k| k.ends_with(".parquet")).collect();
    for o in &objects {
        let n = listed.get(*o).copied().unwrap_or(0);
        if n != 1 {
            bail!("{o} is listed by {n} manifests");
        }
    }
    for l in listed.keys() {
        if !keys.contains(l) {
            bail!("manifest lists {l}, which is not in S3");
        }
    }
    Ok(())
}

/// Minute `m`, second `s` of hour 10.
pub fn at(m: i64, s: i64) -> i64 {
    H10 + m * MIN + s * 1000
}

// Column readers for the Parquet the sink writes.

pub fn strings(b: &RecordBatch, name: &str) -> Vec<Option<String>> {
    let c = b.column_by_name(name).unwrap_or_else(|| panic!("column {name}"));
    let a = c.as_string::<i32>();
    (0..a.len()).map(|i| (!a.is_null(i)).then(|| a.value(i).to_owned())).collect()
}

pub fn ints(b: &RecordBatch, name: &str) -> Vec<i64> {
    b.column_by_name(name).unwrap_or_else(|| panic!("column {name}")).as_primitive::<Int64Type>().values().to_vec()
}

pub fn floats(b: &RecordBatch, name: &str) -> Vec<f64> {
    b.column_by_name(name).unwrap_or_else(|| panic!("column {name}")).as_primitive::<Float64Type>().values().to_vec()
}

pub fn times(b: &RecordBatch, name: &str) -> Vec<i64> {
    let c = b.column_by_name(name).unwrap_or_else(|| panic!("column {name}"));
    assert_eq!(
        c.data_type(),
        &DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())),
        "{name} is a UTC millisecond timestamp"
    );
    c.as_primitive::<TimestampMillisecondType>().values().to_vec()
}

pub fn bools(b: &RecordBatch, name: &str) -> Vec<bool> {
    let a = b.column_by_name(name).unwrap_or_else(|| panic!("column {name}")).as_boolean().clone();
    (0..a.len()).map(|i| a.value(i)).collect()
}

pub fn key_of(keys: &[String], family: &str, topic_partition: &str) -> String {
    let mut matching: Vec<&String> =
        keys.iter().filter(|k| k.contains(&format!("/{family}_20241226T10Z_{topic_partition}_"))).collect();
    assert_eq!(matching.len(), 1, "one {family} file for {topic_partition} in hour 10: {keys:#?}");
    matching.remove(0).clone()
}
