//! `edgeflow-aggregator`: parse the command line, set up logging and signals, call the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use edgeflow_aggregator::config::{Config, DEFAULT_TOML};
use edgeflow_aggregator::metrics::{Metrics, Stage};
use edgeflow_aggregator::{Settings, Stages, s3, verify};
use edgeflow_runtime::logging::{self, Target};
use edgeflow_runtime::{CancellationToken, shutdown};

#[derive(Debug, Parser)]
#[command(
    name = "edgeflow-aggregator",
    version,
    about = "raw-data → per-minute windows → processed-data → hourly Parquet in S3"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run stage `process` (raw-data → processed-data).
    Process(ConfigArg),
    /// Run stage `sink` (processed-data and raw-data-dlq → Parquet in S3).
    Sink(ConfigArg),
    /// Run both stages in one process.
    Run(ConfigArg),
    /// Check a configuration file and exit.
    Validate(ConfigArg),
    /// Print the commented default configuration.
    DefaultConfig,
    /// Read every Parquet object under the prefix and report missing and duplicate records,
    /// each node's proven tail and aggregate mismatches (exit status 1 if anything is wrong).
    Verify {
        #[command(flatten)]
        config: ConfigArg,
        /// Print the report as JSON (stable; see docs/aggregator.md).
        #[arg(long)]
        json: bool,
        /// A node whose newest high-water marker lags the newest of all nodes by more than this
        /// (e.g. "15m") is stale: its agent or its records stopped. Not judged when absent.
        #[arg(long, value_parser = humantime::parse_duration)]
        max_marker_age: Option<std::time::Duration>,
        /// A node that must have records in S3 (repeatable).
        #[arg(long = "expect-node", value_name = "NODE_ID")]
        expect_nodes: Vec<String>,
    },
    /// Print the OpenMetrics exposition of a fresh instance (every metric at zero).
    Metrics,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// The TOML configuration file.
    #[arg(long, short, env = "EDGEFLOW_AGGREGATOR_CONFIG")]
    config: PathBuf,
}

fn load(path: &Path) -> anyhow::Result<Settings> {
    let config: Config = edgeflow_runtime::config::load(path)?;
    Ok(config.validate()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::DefaultConfig => {
            print!("{DEFAULT_TOML}");
            ExitCode::SUCCESS
        }
        Command::Metrics => {
            let defaults = Config::default();
            let k = &defaults.kafka;
            print!(
                "{}",
                Metrics::fresh_exposition(&[
                    (Stage::process, &k.raw_topic),
                    (Stage::sink, &k.processed_topic),
                    (Stage::sink, &k.dlq_topic)
                ])
            );
            ExitCode::SUCCESS
        }
        Command::Validate(arg) => match load(&arg.config) {
            Ok(_) => {
                println!("{}: valid", arg.config.display());
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("{error:#}");
                ExitCode::from(2)
            }
        },
        Command::Process(arg) => serve(&arg.config, Stages::Process),
        Command::Sink(arg) => serve(&arg.config, Stages::Sink),
        Command::Run(arg) => serve(&arg.config, Stages::Both),
        Command::Verify { config, json, max_marker_age, expect_nodes } => {
            logging::init("warn", Target::Stderr);
            let expect = verify::Expectations {
                max_marker_age_ms: max_marker_age.map(|d| d.as_millis().min(i64::MAX as u128) as i64),
                nodes: expect_nodes,
            };
            match runtime().and_then(|rt| rt.block_on(verify_command(&config.config, json, &expect))) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(error) => {
                    eprintln!("verify: {error:#}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().enable_all().build().context("cannot start the async runtime")
}

fn serve(config: &Path, stages: Stages) -> ExitCode {
    logging::init("info,rdkafka=warn,aws_config=warn", Target::Auto);
    let settings = match load(config) {
        Ok(s) => s,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "invalid configuration");
            return ExitCode::from(2);
        }
    };
    let result = runtime().and_then(|rt| {
        rt.block_on(async {
            let token = CancellationToken::new();
            shutdown::cancel_on_signals(token.clone()).context("cannot install signal handlers")?;
            edgeflow_aggregator::run(settings, stages, token).await.map_err(anyhow::Error::from)
        })
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "edgeflow-aggregator stopped");
            ExitCode::FAILURE
        }
    }
}

async fn verify_command(config: &Path, json: bool, expect: &verify::Expectations) -> anyhow::Result<bool> {
    let settings = load(config)?;
    let client = s3::S3::new(&settings.s3).await;
    let report = verify::verify_with(&client, &settings.s3.prefix, expect).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.render());
    }
    Ok(report.ok)
}
