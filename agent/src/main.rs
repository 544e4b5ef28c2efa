//! `edgeflow-agent`: parse the command line, set up logging and signals, call the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use edgeflow_agent::config::{Config, DEFAULT_CONFIG};
use edgeflow_runtime::CancellationToken;
use edgeflow_runtime::logging::{self, Target};

#[derive(Parser, Debug)]
#[command(name = "edgeflow-agent", version, about = "Durable MQTT → Kafka forwarding for edgeflow edge nodes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, short, default_value = "/etc/edgeflow/agent.toml")]
        config: PathBuf,
        /// Never run the [bootstrap] section in this process: it is left to a separate, privileged
        /// unit (the packaged edgeflow-bootstrap.service). The packaged daemon runs unprivileged
        /// and passes this.
        #[arg(long)]
        no_bootstrap: bool,
    },
    /// Check a configuration file: exit 0 if valid, 2 with the field and the problem if not.
    Validate {
        #[arg(long, short, default_value = "/etc/edgeflow/agent.toml")]
        config: PathBuf,
    },
    /// Register this node with EKS as a hybrid node through nodeadm ([bootstrap] section), once.
    Bootstrap {
        #[arg(long, short, default_value = "/etc/edgeflow/agent.toml")]
        config: PathBuf,
        /// Run the preflight checks and print the NodeConfig (activation code masked) and the
        /// nodeadm commands; change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// For systemd's ExecCondition=: exit 0 if this node is configured, 1 if it is not.
    ///
    /// The agent counts as configured once its file differs in any byte from `default-config`
    /// (the file the package installs); with --bootstrap, once [bootstrap] enabled = true (an
    /// unreadable or invalid file also exits 0, so that the service reports the problem).
    IsConfigured {
        #[arg(long, short, default_value = "/etc/edgeflow/agent.toml")]
        config: PathBuf,
        /// Check the [bootstrap] section instead of the file as a whole.
        #[arg(long)]
        bootstrap: bool,
    },
    /// Print the commented default configuration.
    DefaultConfig,
    /// Print every metric the agent exports (the exposition of a fresh registry).
    Metrics,
    /// Publish simulated device telemetry over MQTT.
    Simulate(Sim),
    /// Look into the buffer file (the agent must be stopped).
    Buffer {
        #[command(subcommand)]
        action: BufferAction,
    },
}

#[derive(Subcommand, Debug)]
enum BufferAction {
    /// Show depth, size, seq range and oldest age.
    Inspect {
        #[arg(long, short, default_value = "/etc/edgeflow/agent.toml")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check integrity: every entry readable, counters consistent.
    Verify {
        #[arg(long, short, default_value = "/etc/edgeflow/agent.toml")]
        config: PathBuf,
    },
    /// Print every buffered entry as a JSON line.
    Export {
        #[arg(long, short, default_value = "/etc/edgeflow/agent.toml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, no_bootstrap } => {
            logging::init("info", Target::Auto);
            report(run(&config, no_bootstrap))
        }
        Command::Validate { config } => {
            let result = Config::load(&config).map_err(anyhow::Error::from).and_then(|c| {
                c.validate().map_err(anyhow::Error::from)?;
                Ok(())
            });
            match result {
                Ok(()) => {
                    println!("{}: valid", config.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Bootstrap { config, dry_run } => {
            logging::init("info", Target::Stderr);
            bootstrap(&config, dry_run)
        }
        Command::IsConfigured { config, bootstrap } => is_configured(&config, bootstrap),
        Command::DefaultConfig => {
            print!("{}", *DEFAULT_CONFIG);
            ExitCode::SUCCESS
        }
        Command::Metrics => {
            print!("{}", edgeflow_agent::metrics::describe());
            ExitCode::SUCCESS
        }
        Command::Simulate(sim) => {
            logging::init("warn", Target::Stderr);
            report(simulate(sim))
        }
        Command::Buffer { action } => report(buffer(action)),
    }
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context("starting the runtime")
}

fn settings(config: &Path) -> anyhow::Result<edgeflow_agent::Settings> {
    let c = Config::load(config)?;
    Ok(c.validate()?)
}

fn run(config: &Path, no_bootstrap: bool) -> anyhow::Result<()> {
    let mut settings = settings(config)?;
    if no_bootstrap && settings.bootstrap.take().is_some() {
        tracing::info!("The [bootstrap] section is left to edgeflow-bootstrap.service (--no-bootstrap).");
    }
    let rt = runtime()?;
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        edgeflow_runtime::shutdown::cancel_on_signals(shutdown.clone()).context("installing signal handlers")?;
        edgeflow_agent::run(settings, shutdown).await?;
        Ok(())
    })
}

/// `edgeflow-agent is-configured`: see the subcommand's doc. Exit codes 1..=254 make systemd skip
/// the unit without marking it failed; 0 lets it start.
fn is_configured(config: &Path, bootstrap: bool) -> ExitCode {
    const NOT_CONFIGURED: ExitCode = ExitCode::FAILURE;
    let text = match std::fs::read_to_string(config) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("{} does not exist: this node is not configured", config.display());
            return NOT_CONFIGURED;
        }
        // Unreadable: let the service start and say why.
        Err(_) => return ExitCode::SUCCESS,
    };
    if bootstrap {
        let enabled = Config::load(config).map_or(true, |c| c.bootstrap.enabled);
        if !enabled {
            eprintln!("[bootstrap] is not enabled in {}: nothing to do", config.display());
            return NOT_CONFIGURED;
        }
    } else if text == *DEFAULT_CONFIG {
        eprintln!(
            "{} is the default configuration: this node is not configured yet (edit it, then start the service)",
            config.display()
        );
        return NOT_CONFIGURED;
    }
    ExitCode::SUCCESS
}

/// `edgeflow-agent bootstrap`: one attempt, in the foreground. Exit 0 when the node joined (or
/// the dry run's preflight passed), 1 when it failed and a retry may succeed, 2 for an invalid or
/// disabled configuration, 3 when an operator must act (systemd's RestartPreventExitStatus=).
fn bootstrap(config: &Path, dry_run: bool) -> ExitCode {
    let settings = match settings(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let Some(bootstrap) = settings.bootstrap else {
        eprintln!("error: the bootstrap is disabled in {}: set [bootstrap] enabled = true", config.display());
        return ExitCode::from(2);
    };
    let host = edgeflow_nodeadm::Host::system(&settings.data_dir);
    let mode = if dry_run { edgeflow_nodeadm::Mode::DryRun } else { edgeflow_nodeadm::Mode::Apply };
    let result = runtime().and_then(|rt| {
        rt.block_on(async move {
            let shutdown = CancellationToken::new();
            edgeflow_runtime::shutdown::cancel_on_signals(shutdown.clone()).context("installing signal handlers")?;
            let (phase, _) = edgeflow_nodeadm::phase::channel(edgeflow_nodeadm::Phase::Pending);
            Ok(edgeflow_nodeadm::run(&bootstrap, &host, mode, &phase, &shutdown).await)
        })
    });
    match result {
        Ok(Ok(edgeflow_nodeadm::Outcome::DryRun(plan))) => {
            print!("{plan}");
            if plan.preflight.passed() { ExitCode::SUCCESS } else { ExitCode::FAILURE }
        }
        Ok(Ok(edgeflow_nodeadm::Outcome::AlreadyJoined)) => {
            println!("already joined: every step is done with this configuration; nothing to do");
            ExitCode::SUCCESS
        }
        Ok(Ok(edgeflow_nodeadm::Outcome::Joined { ran })) => {
            let ran: Vec<&str> = ran.iter().map(|s| s.as_str()).collect();
            println!("joined: ran {}", ran.join(", "));
            ExitCode::SUCCESS
        }
        Ok(Err(e)) if e.is_retryable() => {
            eprintln!("error: {e}\n(retrying later may succeed)");
            ExitCode::FAILURE
        }
        Ok(Err(e)) => {
            eprintln!("error: {e}\n(an operator must act)");
            ExitCode::from(3)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The `simulate` arguments.
#[derive(clap::Args, Debug)]
struct Sim {
    /// Broker URL (mqtt://host:port).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    mqtt: String,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: u32,
    /// Messages per second, all devices together.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Seconds to publish for.
    #[arg(long, default_value_t = 60.0)]
    duration: f64,
    /// Fraction of bad messages (half anomalies, half malformed).
    #[arg(long, default_value_t = 0.0)]
    bad_fraction: f64,
    /// Topics are <prefix>/<device>/telemetry.
    #[arg(long, default_value = "devices")]
    topic_prefix: String,
    /// Device names are <device-prefix>NNNNN.
    #[arg(long, default_value = "device")]
    device_prefix: String,
    /// Random seed (the same seed publishes the same sequence of classes and values).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds added to the clock for the readings' timestamps (negative: in the past).
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    clock_offset: i64,
    /// Write every message, with whether the broker acknowledged it, as JSON lines.
    #[arg(long)]
    log: Option<PathBuf>,
}

fn simulate(args: Sim) -> anyhow::Result<()> {
    let Sim { mqtt, devices, rate, duration, bad_fraction, topic_prefix, device_prefix, seed, clock_offset, log } =
        args;
    let url = url::Url::parse(&mqtt).with_context(|| format!("--mqtt `{mqtt}` is not a URL"))?;
    anyhow::ensure!(matches!(url.scheme(), "mqtt" | "tcp"), "--mqtt must be mqtt://host:port");
    anyhow::ensure!((0.0..=1.0).contains(&bad_fraction), "--bad-fraction must be between 0 and 1");
    anyhow::ensure!(rate > 0.0 && duration > 0.0, "--rate and --duration must be positive");
    let sim = edgeflow_agent::simulate::Simulation {
        mqtt_host: url.host_str().context("--mqtt has no host")?.to_owned(),
        mqtt_port: url.port().unwrap_or(1883),
        devices,
        rate,
        duration: Duration::from_secs_f64(duration),
        bad_fraction,
        topic_prefix,
        device_prefix,
        seed,
        clock_offset: chrono::Duration::seconds(clock_offset),
        log,
        progress: true,
    };
    let rt = runtime()?;
    let report = rt.block_on(async move {
        let shutdown = CancellationToken::new();
        edgeflow_runtime::shutdown::cancel_on_signals(shutdown.clone())?;
        edgeflow_agent::simulate::run(sim, shutdown).await
    })?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

fn buffer(action: BufferAction) -> anyhow::Result<()> {
    let path_of = |config: &Path| -> anyhow::Result<PathBuf> {
        let c = Config::load(config)?;
        Ok(edgeflow_agent::buffer::path_in(&c.data_dir))
    };
    match action {
        BufferAction::Inspect { config, json } => {
            let s = edgeflow_agent::inspect::inspect(&path_of(&config)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("buffer      {}", s.path);
                println!("node_id     {}", s.node_id);
                println!("entries     {}", s.entries);
                println!("bytes       {} (file {})", s.bytes, s.file_bytes);
                println!("seq         {} .. next {}", s.first_seq.map_or("-".into(), |s| s.to_string()), s.next_seq);
                println!("oldest age  {}", s.oldest_age_seconds.map_or("-".into(), |a| format!("{a:.1}s")));
                println!("dedup       {} recent records remembered", s.dedup_entries);
            }
            Ok(())
        }
        BufferAction::Verify { config } => {
            let n = edgeflow_agent::inspect::verify(&path_of(&config)?)?;
            println!("ok: {n} entries checked, counters consistent");
            Ok(())
        }
        BufferAction::Export { config } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let n = edgeflow_agent::inspect::export(&path_of(&config)?, &mut out)?;
            use std::io::Write;
            out.flush()?;
            eprintln!("{n} entries exported");
            Ok(())
        }
    }
}
