//! `edgeflow-demo`: the whole pipeline on this machine in one command.
//!
//! Starts an MQTT broker (mosquitto), Kafka (librdkafka's in-process mock cluster, or a real
//! tansu broker with `--real`), the agent, and simulated devices; shows live progress; cuts the
//! agent off from Kafka once and heals it; and ends with the oracle's verdict comparing what the
//! devices published with what came out.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use edgeflow_agent::metrics::KindLabel;
use edgeflow_e2e::kafka::{Backend, Tail};
use edgeflow_e2e::oracle;
use edgeflow_runtime::CancellationToken;
use edgeflow_testkit::{Mosquitto, TansuStorage, free_port};

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
    /// Keep the run's files (buffer, logs) in this directory.
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

    let metrics_port = free_port();
    let config = format!(
        "node_id = \"demo-node\"\ndata_dir = \"{}\"\nshutdown_timeout = \"10s\"\n\
         [mqtt]\nurl = \"{}\"\n[kafka]\nbrokers = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
        dir.join("agent").display(),
        mosquitto.url(),
        kafka.bootstrap()
    );
    let settings =
        edgeflow_runtime::config::parse::<edgeflow_agent::Config>(&config).map_err(anyhow::Error::msg)?.validate()?;
    let stop = CancellationToken::new();
    let (started_tx, started_rx) = tokio::sync::oneshot::channel();
    let agent = tokio::spawn(edgeflow_agent::run_with(settings, stop.clone(), move |r| {
        let _ = started_tx.send(r);
    }));
    let running = started_rx.await.context("the agent did not start")?;
    say(&format!("agent running (metrics on http://{}/metrics)", running.status_addr));
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
        clock_offset: chrono::Duration::zero(),
        log: Some(log.clone()),
        progress: false,
    };
    say(&format!(
        "{} devices publishing {} msg/s for {}s ({}% bad); the Kafka link is cut from {}s to {}s",
        args.devices,
        args.rate,
        args.duration,
        args.bad_fraction * 100.0,
        args.duration * 4 / 10,
        args.duration * 6 / 10
    ));
    let simulation = tokio::spawn(edgeflow_agent::simulate::run(sim, CancellationToken::new()));

    let m = &running.metrics;
    let forwarded = |kind: &str| m.records_forwarded.get_or_create(&KindLabel { kind: kind.into() }).get();
    let start = Instant::now();
    let (cut_at, heal_at) = (args.duration * 4 / 10, args.duration * 6 / 10);
    let mut cut = false;
    let mut healed = false;
    let tty = std::io::stdout().is_terminal();
    let mut last_change = Instant::now();
    let mut last_total = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let t = start.elapsed().as_secs();
        if !cut && t >= cut_at {
            kafka.cut()?;
            cut = true;
            line(tty, "--- network cut: the agent cannot reach Kafka; records wait in its buffer ---");
        }
        if cut && !healed && t >= heal_at {
            kafka.heal()?;
            healed = true;
            line(tty, "--- network healed: the buffer drains in order while devices keep publishing ---");
        }
        let total = tail.count("raw-data") + tail.count("raw-data-dlq");
        if total != last_total {
            last_total = total;
            last_change = Instant::now();
        }
        let status = format!(
            "{:>4}s  received {:>6}  buffered {:>6}  forwarded {:>6}  dead letters {:>4}  in Kafka {:>6}  link {}",
            t,
            m.mqtt_messages_received.get(),
            m.buffer_records.get(),
            forwarded("record"),
            forwarded("dead_letter"),
            tail.count("raw-data"),
            if cut && !healed { "CUT" } else { "up" },
        );
        if tty {
            print!("\r{status}\x1b[K");
            std::io::stdout().flush()?;
        } else {
            println!("{status}");
        }
        let devices_done = simulation.is_finished();
        let drained = m.buffer_records.get() == 0;
        if devices_done && drained && last_change.elapsed() > Duration::from_secs(3) {
            break;
        }
        if devices_done && start.elapsed() > Duration::from_secs(args.duration + 120) {
            line(tty, "giving up waiting for the pipeline to drain");
            break;
        }
    }
    if tty {
        println!();
    }
    let report = simulation.await??;
    stop.cancel();
    let _ = agent.await?;

    let published = oracle::read_published(&log)?;
    let raw: Vec<Vec<u8>> = tail.snapshot("raw-data").messages.into_iter().map(|m| m.2).collect();
    let dlq: Vec<Vec<u8>> = tail.snapshot("raw-data-dlq").messages.into_iter().map(|m| m.2).collect();
    let v = oracle::check_edge(&published, &raw, &dlq);
    println!();
    println!(
        "{:<28}{:>11}{:>14}{:>18}{:>12}{:>9}{:>9}",
        "", "published", "acknowledged", "out exactly once", "duplicated", "missing", "altered"
    );
    for (name, r) in [("readings -> raw-data", &v.readings), ("malformed -> raw-data-dlq", &v.malformed)] {
        println!(
            "{name:<28}{:>11}{:>14}{:>18}{:>12}{:>9}{:>9}",
            r.published, r.acknowledged, r.delivered_once, r.duplicated, r.missing, r.altered
        );
    }
    println!(
        "devices: {} published ({} anomalies kept as records, {} malformed); {} copies re-sent by the agent were recognised by (node_id, seq)",
        report.published, report.anomalies, report.malformed, v.resent_copies
    );
    let missing = v.readings.missing + v.malformed.missing;
    let duplicate = v.readings.duplicated + v.malformed.duplicated;
    println!("verdict: {missing} missing, {duplicate} duplicate{}", if v.clean() { "" } else { "  <-- FAILED" });
    println!("files: {}", dir.display());
    if args.dir.is_none() {
        // Keep the directory so the user can look at the buffer and the log.
        let _ = temp.keep();
    }
    drop(mosquitto);
    Ok(v.clean())
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
