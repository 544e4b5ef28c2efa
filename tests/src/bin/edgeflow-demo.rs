//! `edgeflow-demo`: the whole pipeline on this machine in one command.
//!
//! Starts an MQTT broker (mosquitto), Kafka (librdkafka's in-process mock cluster, or a real
//! tansu broker with `--real`), a local S3 API server (moto), the agent and the aggregator (in
//! this process, the same code as the daemons), and simulated devices; shows live progress;
//! makes Kafka unreachable once and heals it; and ends with the oracle's verdict comparing what
//! the devices published with every Parquet object in S3, and a copy of the bucket on disk.
//!
//! The devices' clock is set back so their readings fall in an hour that ended a while ago and
//! the run crosses one hour boundary: both hours seal within the demo instead of at the top of
//! the next real hour.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edgeflow_agent::metrics::KindLabel;
use edgeflow_e2e::kafka::{Backend, Tail};
use edgeflow_e2e::{lake, oracle};
use edgeflow_runtime::CancellationToken;
use edgeflow_testkit::{Mosquitto, Moto, TansuStorage, free_port, http_get, parse_metrics};

const BUCKET: &str = "edgeflow-demo";
const PREFIX: &str = "telemetry";

#[derive(Parser, Debug)]
#[command(name = "edgeflow-demo", about = "Run the edgeflow pipeline locally with simulated devices and a network cut")]
struct Args {
    /// Seconds the devices publish for.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Number of simulated devices.
    #[arg(long, default_value_t = 50)]
    devices: u32,
    /// Messages per second, all devices together.
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Fraction of bad messages (half anomalies, half malformed payloads).
    #[arg(long, default_value_t = 0.05)]
    bad_fraction: f64,
    /// Use a real Kafka-protocol broker (tansu) instead of the in-process mock cluster.
    #[arg(long)]
    real: bool,
    /// Keep the run's files (buffer, spool, logs, the copy of the bucket) in this directory.
    #[arg(long)]
    dir: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    edgeflow_runtime::logging::init("warn", edgeflow_runtime::logging::Target::Stderr);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let verdict = rt.block_on(demo(args))?;
    std::process::exit(if verdict { 0 } else { 1 });
}

async fn demo(args: Args) -> anyhow::Result<bool> {
    let temp = tempfile::Builder::new().prefix("edgeflow-demo").tempdir()?;
    let dir = args.dir.clone().unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    say("starting an MQTT broker (mosquitto)");
    let mosquitto = Mosquitto::start().context("starting mosquitto (scripts/setup installs it)")?;
    let kafka = if args.real {
        say("starting a Kafka-protocol broker (tansu) behind a fault proxy");
        Backend::tansu(TansuStorage::Memory).await?
    } else {
        say("starting Kafka (librdkafka's in-process mock cluster, 3 brokers)");
        Backend::mock(3)?
    };
    say("starting an S3 API server (moto)");
    let moto = Moto::start().context("starting moto (scripts/setup installs it)")?;
    let s3 = lake::client(&moto.endpoint());
    create_bucket(&s3).await?;

    // The agent, as `edgeflow-agent run` would run it.
    let stop = CancellationToken::new();
    let agent_config = format!(
        "node_id = \"demo-node\"\ndata_dir = \"{}\"\nshutdown_timeout = \"10s\"\n\
         [mqtt]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:0\"\n",
        dir.join("agent").display(),
        mosquitto.url(),
        kafka.bootstrap()
    );
    let settings = edgeflow_runtime::config::parse::<edgeflow_agent::Config>(&agent_config)
        .map_err(anyhow::Error::msg)?
        .validate()?;
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let agent = tokio::spawn(edgeflow_agent::run_with(settings, stop.clone(), move |r| {
        let _ = started_tx.send(r);
    }));
    let running = started_rx.await.context("the agent did not start")?;
    say(&format!("agent running (metrics on http://{}/metrics)", running.status_addr));

    // The aggregator, both stages, as `edgeflow-aggregator run` would run them. Its idle timeout
    // outlasts the Kafka outage, so an hour is not sealed while its records wait at the edge.
    let cut = (args.duration * 4 / 10, args.duration * 6 / 10);
    let idle = (cut.1 - cut.0 + 10).max(15);
    let aggregator_port = free_port();
    let aggregator_config = format!(
        "[kafka]\nbrokers = \"{}\"\ngroup_id = \"demo\"\n\
         [process]\nallowed_lateness = \"5s\"\ncheckpoint_interval = \"2s\"\nidle_timeout = \"{idle}s\"\n\
         [sink]\nspool_dir = \"{}\"\nseal_grace = \"10s\"\nidle_timeout = \"{idle}s\"\ncheckpoint_interval = \"2s\"\n\
         [s3]\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\ndeployment_id = \"demo\"\nregion = \"us-east-1\"\nendpoint_url = \"{}\"\nforce_path_style = true\n\
         [metrics]\nlisten = \"127.0.0.1:{aggregator_port}\"\n",
        kafka.bootstrap(),
        dir.join("spool").display(),
        moto.endpoint(),
    );
    let mut aggregator_settings = edgeflow_runtime::config::parse::<edgeflow_aggregator::Config>(&aggregator_config)
        .map_err(anyhow::Error::msg)?
        .validate()?;
    aggregator_settings.s3.credentials = Some(edgeflow_aggregator::config::StaticCredentials {
        access_key_id: "demo".into(),
        secret_access_key: edgeflow_runtime::config::Secret::new("demo"),
    });
    let aggregator =
        tokio::spawn(edgeflow_aggregator::run(aggregator_settings, edgeflow_aggregator::Stages::Both, stop.clone()));
    say(&format!("aggregator running (metrics on http://127.0.0.1:{aggregator_port}/metrics)"));
    let tail = Tail::start(&kafka.bootstrap(), &["raw-data", "raw-data-dlq"])?;

    let log = dir.join("published.jsonl");
    let sim = edgeflow_agent::simulate::Simulation {
        mqtt_host: "127.0.0.1".into(),
        mqtt_port: mosquitto.port,
        devices: args.devices,
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        bad_fraction: args.bad_fraction,
        topic_prefix: "devices".into(),
        device_prefix: "device".into(),
        seed: 42,
        clock_offset: edgeflow_e2e::stack::offset_before_hour_boundary(chrono::Duration::seconds(
            (args.duration / 2) as i64,
        )),
        log: Some(log.clone()),
        progress: false,
    };
    say(&format!(
        "{} devices publishing {} msg/s for {}s ({}% bad), their clock set back to cross an hour boundary; \
         Kafka is unreachable from {}s to {}s",
        args.devices,
        args.rate,
        args.duration,
        args.bad_fraction * 100.0,
        cut.0,
        cut.1
    ));
    let simulation = tokio::spawn(edgeflow_agent::simulate::run(sim, CancellationToken::new()));

    let m = &running.metrics;
    let forwarded = |kind: &str| m.records_forwarded.get_or_create(&KindLabel { kind: kind.into() }).get();
    let tty = std::io::stdout().is_terminal();
    let start = Instant::now();
    let progress = |link: &str| {
        let a = aggregator_metrics(aggregator_port);
        let sum = |prefix: &str| a.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum::<f64>();
        format!(
            "{:>4}s  received {:>6}  buffered {:>6}  forwarded {:>6}  dead letters and markers {:>4}  in Kafka {:>6}  windows {:>5}  files in S3 {:>3}  link {link}",
            start.elapsed().as_secs(),
            m.mqtt_messages_received.get(),
            m.buffer_records.get(),
            forwarded("record"),
            forwarded("dead_letter"),
            tail.count("raw-data"),
            sum("edgeflow_aggregator_processed_produced_total{kind=\"aggregate\"}"),
            sum("edgeflow_aggregator_files_uploaded_total"),
        )
    };
    let show = |status: String| -> anyhow::Result<()> {
        if tty {
            print!("\r{status}\x1b[K");
            std::io::stdout().flush()?;
        } else {
            println!("{status}");
        }
        Ok(())
    };

    // Devices publish; Kafka goes away and comes back.
    let (mut is_cut, mut healed) = (false, false);
    let mut last_change = Instant::now();
    let mut last_total = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = start.elapsed().as_secs();
        if !is_cut && t >= cut.0 {
            kafka.cut()?;
            is_cut = true;
            line(
                tty,
                "--- network cut: Kafka is unreachable; the agent keeps acknowledging devices into its buffer ---",
            );
        }
        if is_cut && !healed && t >= cut.1 {
            kafka.heal()?;
            healed = true;
            line(tty, "--- network healed: the buffer drains in order while devices keep publishing ---");
        }
        let total = tail.count("raw-data") + tail.count("raw-data-dlq");
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        }
        show(progress(if is_cut && !healed { "CUT" } else { "up" }))?;
        let devices_done = simulation.is_finished();
        if devices_done && m.buffer_records.get() == 0 && last_change.elapsed() > Duration::from_secs(3) {
            break;
        }
        if devices_done && start.elapsed() > Duration::from_secs(args.duration + 120) {
            line(tty, "giving up waiting for the agent to drain its buffer");
            break;
        }
    }
    let report = simulation.await??;
    line(
        tty,
        &format!(
            "--- devices done; the aggregator seals the last hour after {idle}s idle. Dead letters are filed under \
             the hour the agent received them (now): the demo moves their clock 2 h ahead so that hour seals too ---"
        ),
    );
    edgeflow_e2e::kafka::let_dead_letter_hours_pass(&kafka.bootstrap()).await?;

    // Read S3 until every acknowledged message is there (or give up).
    let published = oracle::read_published(&log)?;
    let deadline = Instant::now() + Duration::from_secs(idle + 120);
    let verdict = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        show(progress("up"))?;
        let lake = lake::read(&s3, BUCKET, PREFIX).await?;
        let verdict = oracle::check_pipeline(&published, &lake);
        if verdict.clean() || Instant::now() > deadline {
            break (verdict, lake);
        }
    };
    if tty {
        println!();
    }
    stop.cancel();
    let _ = agent.await?;
    let _ = aggregator.await?;
    let (v, lake) = verdict;
    let copy = dir.join("s3");
    let copied = lake::mirror(&s3, BUCKET, PREFIX, &copy).await?;

    println!();
    println!(
        "{:<34}{:>11}{:>14}{:>18}{:>12}{:>9}{:>9}",
        "", "published", "acknowledged", "in S3 once", "duplicated", "missing", "altered"
    );
    for (name, r) in [
        ("valid readings -> filtered", &v.valid),
        ("anomalies -> rejected", &v.anomalies),
        ("malformed -> deadletter", &v.malformed),
    ] {
        println!(
            "{name:<34}{:>11}{:>14}{:>18}{:>12}{:>9}{:>9}",
            r.published, r.acknowledged, r.delivered_once, r.duplicated, r.missing, r.altered
        );
    }
    println!(
        "devices: {} published; minute windows: {} recomputed from the readings in S3, {} differ; rows nobody published: {}",
        report.published, v.windows_checked, v.window_mismatches, v.unknown
    );
    println!(
        "verdict: {} missing, {} duplicate{}",
        v.missing(),
        v.duplicated(),
        if v.clean() { "" } else { "  <-- FAILED" }
    );
    let families: Vec<String> = lake.keys.iter().map(|(f, k)| format!("{} {f}", k.len())).collect();
    println!(
        "S3: {} Parquet objects ({}), {} KiB, in s3://{BUCKET}/{PREFIX}/ on the local S3 server (stopped now)",
        lake.objects,
        families.join(", "),
        lake.bytes / 1024
    );
    println!("copied ({copied} objects, with the hour manifests) to {}", copy.join(PREFIX).display());
    println!(
        "files: {} (published.jsonl: what the devices sent; agent/: the buffer; spool/: the sink's state)",
        dir.display()
    );
    if args.dir.is_none() {
        // Keep the directory so the user can look at the files.
        let _ = temp.keep();
    }
    drop(mosquitto);
    Ok(v.clean())
}

async fn create_bucket(s3: &aws_sdk_s3::Client) -> anyhow::Result<()> {
    let mut attempt = 0;
    loop {
        match s3.create_bucket().bucket(BUCKET).send().await {
            Ok(_) => return Ok(()),
            Err(e) if attempt > 50 => return Err(e).context("creating the demo bucket"),
            Err(_) => attempt += 1,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn aggregator_metrics(port: u16) -> HashMap<String, f64> {
    http_get(port, "/metrics").map(|(_, body)| parse_metrics(&body)).unwrap_or_default()
}

fn say(msg: &str) {
    println!("demo: {msg}");
}

fn line(tty: bool, msg: &str) {
    if tty {
        println!("\r{msg}\x1b[K");
    } else {
        println!("{msg}");
    }
}
