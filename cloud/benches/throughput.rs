//! Throughput benchmark (not a timed test): a pre-filled `raw-data` replayed through `process`
//! and then `sink` (the release binary, against real tansu and moto on this machine), with a
//! consume-only baseline in the same run, and the Parquet encoder alone.
//!
//! `cargo bench -p edgeflow-aggregator --bench throughput`
//! (`EDGEFLOW_BENCH_RECORDS=…` sets the backlog, default 1,000,000).
//!
//! Reported per stage: wall-clock records/s, records per CPU-second of the aggregator process
//! (its user+system time: what one core sustains), the ratio to the consume-only baseline, and
//! the peak resident memory (VmHWM).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use edgeflow_aggregator::sink::parquet::{ReadingRow, SpoolFile, writer_properties};
use edgeflow_aggregator::sink::state::Family;
use edgeflow_contract::{Provenance, RawRecord, Reading};
use edgeflow_testkit::{Child, Moto, Tansu, TansuStorage, free_port, kafka, wait_for_port};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

const PARTITIONS: i32 = 4;
const H10: i64 = 1_735_207_200_000;

fn main() -> Result<()> {
    let n: u64 = std::env::var("EDGEFLOW_BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(bench(n))
}

async fn bench(n: u64) -> Result<()> {
    println!(
        "edgeflow-aggregator throughput, {n} records, {} CPUs",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let encode = encode_rate(1_000_000)?;

    let tansu = Tansu::start(TansuStorage::Memory)?;
    let moto = Moto::start()?;
    let bootstrap = tansu.bootstrap();
    kafka::create_topics(&bootstrap, &[("raw-data", PARTITIONS), ("processed-data", PARTITIONS), ("raw-data-dlq", 1)])
        .await?;
    create_bucket(&moto.endpoint()).await?;
    let started = Instant::now();
    prefill(&bootstrap, n)?;
    println!("pre-filled raw-data in {:.1}s", started.elapsed().as_secs_f64());

    let baseline = consume_only(&bootstrap, "raw-data", n)?;
    let dir = tempfile::tempdir()?;
    let process = run_stage("process", &bootstrap, &moto.endpoint(), dir.path(), n, "raw-data")?;
    let processed = process.produced;
    let sink_baseline = consume_only(&bootstrap, "processed-data", processed)?;
    let sink = run_stage("sink", &bootstrap, &moto.endpoint(), dir.path(), processed, "processed-data")?;

    println!();
    println!("| measure | records | wall rate | per CPU-second | vs consume-only | peak RSS |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!("| consume-only raw-data (rdkafka BaseConsumer) | {n} | {:.0}/s | | 1.00 | |", baseline);
    println!(
        "| process (dedup, filter, windows, produce) | {n} | {:.0}/s | {:.0}/s | {:.2} | {:.0} MiB |",
        process.wall_rate,
        process.cpu_rate,
        process.wall_rate / baseline,
        process.peak_rss_mib
    );
    println!("| consume-only processed-data | {processed} | {:.0}/s | | 1.00 | |", sink_baseline);
    println!(
        "| sink (decode, dedup, Parquet, spool) | {processed} | {:.0}/s | {:.0}/s | {:.2} | {:.0} MiB |",
        sink.wall_rate,
        sink.cpu_rate,
        sink.wall_rate / sink_baseline,
        sink.peak_rss_mib
    );
    println!("| Parquet encode (filtered rows, zstd, in memory + file) | 1000000 | {:.0} rows/s | | | |", encode);

    // For BENCHMARKS.md (scripts/bench).
    let stage = |r: &StageResult, base: f64| {
        serde_json::json!({
            "wall_records_per_sec": r.wall_rate,
            "records_per_cpu_second": r.cpu_rate,
            "ratio_to_consume_only": r.wall_rate / base,
            "peak_rss_mib": r.peak_rss_mib,
        })
    };
    let out = serde_json::json!({
        "records": n,
        "processed_records": processed,
        "cores": std::thread::available_parallelism().map_or(0, |p| p.get()),
        "baseline_consume_raw_per_sec": baseline,
        "baseline_consume_processed_per_sec": sink_baseline,
        "process": stage(&process, baseline),
        "sink": stage(&sink, sink_baseline),
        "parquet_encode_rows_per_sec": encode,
    });
    let target = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&target)?;
    std::fs::write(target.join("aggregator.json"), serde_json::to_string_pretty(&out)?)?;
    Ok(())
}

/// The raw-data backlog: 200 devices on 4 nodes, one reading per device every 10 s.
fn prefill(bootstrap: &str, n: u64) -> Result<()> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "20")
        .set("compression.type", "lz4")
        .set("queue.buffering.max.messages", "500000")
        .create()?;
    let mut buf = Vec::with_capacity(256);
    let mut seqs = [0u64; 4];
    for i in 0..n {
        let d = i % 200;
        let node = (d % 4) as usize;
        seqs[node] += 1;
        let t = H10 + (i / 200) as i64 * 10_000 + d as i64 * 7;
        let ts = chrono::DateTime::from_timestamp_millis(t)
            .context("time")?
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let device = format!("device-{d:03}");
        let status = if i % 97 == 0 { "FAULT" } else { "OK" };
        let reading = Reading {
            device_id: device.as_str().into(),
            timestamp: ts.as_str().into(),
            temperature: 15.0 + (i % 200) as f64 * 0.25,
            humidity: 30.0 + (i % 50) as f64,
            status: status.into(),
            event_time_ms: t,
        };
        buf.clear();
        RawRecord {
            reading,
            provenance: Provenance { node_id: format!("pve-{node}").into(), epoch: None, seq: seqs[node] },
        }
        .write_json(&mut buf);
        let partition = (d % PARTITIONS as u64) as i32;
        loop {
            match producer.send(
                BaseRecord::<str, [u8]>::to("raw-data").partition(partition).key(device.as_str()).payload(&buf[..]),
            ) {
                Ok(()) => break,
                Err((_, _)) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
    producer.flush(Duration::from_secs(120))?;
    Ok(())
}

/// Reads `count` records of `topic` from the beginning with a plain consumer: the ceiling.
fn consume_only(bootstrap: &str, topic: &str, count: u64) -> Result<f64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("baseline-{topic}"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut seen = 0u64;
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while seen < count {
        if Instant::now() > deadline {
            bail!("baseline read {seen} of {count}");
        }
        if let Some(Ok(_)) = consumer.poll(Duration::from_millis(100)) {
            first.get_or_insert_with(Instant::now);
            seen += 1;
        }
    }
    let secs = first.map_or(1.0, |f| f.elapsed().as_secs_f64());
    std::thread::spawn(move || drop(consumer));
    Ok(count as f64 / secs)
}

struct StageResult {
    wall_rate: f64,
    cpu_rate: f64,
    peak_rss_mib: f64,
    /// processed-data values produced (for the process stage).
    produced: u64,
}

/// Runs one stage (`process` or `sink`) of the release binary until it consumed `count`
/// records of `topic`.
fn run_stage(stage: &str, bootstrap: &str, s3: &str, dir: &Path, count: u64, topic: &str) -> Result<StageResult> {
    let command = stage;
    let config = &dir.join(format!("{stage}.toml"));
    let port = free_port();
    std::fs::write(
        config,
        format!(
            "[kafka]\nbrokers = \"{bootstrap}\"\ngroup_id = \"bench\"\n[process]\nidle_timeout = \"1h\"\n\
             [sink]\nspool_dir = \"{}\"\nidle_timeout = \"1h\"\n\
             [s3]\nbucket = \"bench\"\ndeployment_id = \"bench\"\nregion = \"us-east-1\"\nendpoint_url = \"{s3}\"\nforce_path_style = true\n\
             [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            dir.join("spool").display()
        ),
    )?;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeflow-aggregator"));
    cmd.arg(command)
        .arg("--config")
        .arg(config)
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env("RUST_LOG", "warn");
    let mut child = Child::spawn(command, cmd, Some(&dir.join(format!("{command}.log"))))?;
    wait_for_port(port, Duration::from_secs(60))?;
    let pid = child.pid().context("running")?;
    let series = format!("edgeflow_aggregator_records_consumed_total{{stage=\"{stage}\",topic=\"{topic}\"}}");
    let mut start: Option<(Instant, f64)> = None;
    let deadline = Instant::now() + Duration::from_secs(1200);
    let (end, end_cpu) = loop {
        let text = scrape(port)?;
        let consumed = value(&text, &series).unwrap_or(0.0);
        if consumed > 0.0 && start.is_none() {
            start = Some((Instant::now(), cpu_seconds(pid)?));
        }
        if consumed >= count as f64 {
            break (Instant::now(), cpu_seconds(pid)?);
        }
        if Instant::now() > deadline {
            bail!("{command} consumed {consumed} of {count}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (t0, cpu0) = start.context("never started")?;
    let produced = ["filtered", "rejected", "aggregate", "deadletter"]
        .iter()
        .map(|k| {
            value(
                &scrape(port).unwrap_or_default(),
                &format!("edgeflow_aggregator_processed_produced_total{{kind=\"{k}\"}}"),
            )
            .unwrap_or(0.0)
        })
        .sum::<f64>() as u64;
    let peak = peak_rss_mib(pid)?;
    child.terminate(Duration::from_secs(60));
    let wall = end.duration_since(t0).as_secs_f64();
    Ok(StageResult {
        wall_rate: count as f64 / wall,
        cpu_rate: count as f64 / (end_cpu - cpu0).max(1e-9),
        peak_rss_mib: peak,
        produced,
    })
}

fn scrape(port: u16) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.trim().parse().ok()))
}

/// User + system CPU seconds of a process (clock ticks are 100 Hz on Linux).
fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: f64 = fields.get(11).context("utime")?.parse()?;
    let stime: f64 = fields.get(12).context("stime")?.parse()?;
    Ok((utime + stime) / 100.0)
}

fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmHWM")?;
    Ok(kb / 1024.0)
}

/// Rows per second through the Parquet writer (filtered family, default settings).
fn encode_rate(rows: i64) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bench.parquet");
    let devices: Vec<String> = (0..200).map(|d| format!("device-{d:03}")).collect();
    let started = Instant::now();
    let mut f = SpoolFile::new(Family::Filtered, path, 65_536, writer_properties(65_536));
    for i in 0..rows {
        f.push_reading(&ReadingRow {
            device_id: &devices[(i % 200) as usize],
            event_time_ms: H10 + i * 50,
            temperature: 15.0 + (i % 200) as f64 * 0.25,
            humidity: 30.0 + (i % 50) as f64,
            status: "OK",
            node_id: "pve-1",
            epoch: Some("9f3c0a6e51d2b874"),
            seq: i,
            reason: None,
        })?;
    }
    let done = f.finish()?;
    let secs = started.elapsed().as_secs_f64();
    println!(
        "Parquet encode: {} rows in {secs:.2}s, {:.1} MiB ({:.1} bytes/row)",
        done.rows,
        done.bytes as f64 / 1048576.0,
        done.bytes as f64 / rows as f64
    );
    Ok(rows as f64 / secs)
}

async fn create_bucket(endpoint: &str) -> Result<()> {
    let config = aws_sdk_s3::config::Builder::new()
        .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
        .region(aws_sdk_s3::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_s3::config::Credentials::new("test", "test", None, None, "bench"))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .build();
    aws_sdk_s3::Client::from_conf(config).create_bucket().bucket("bench").send().await?;
    Ok(())
}
