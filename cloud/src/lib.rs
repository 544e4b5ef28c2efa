//! `edgeflow-aggregator`: the cloud half of edgeflow, on EKS next to the edge Kafka cluster.
//!
//! ```text
//! raw-data ──process──▶ processed-data ──sink──▶ Parquet in S3 (interface endpoint)
//!                                   raw-data-dlq ──┘
//! ```
//!
//! * [`process`]: dedup on `(node_id, seq)`, the filter, per-minute windows per device and
//!   across devices, late corrections; raw partition `p` → processed partition `p`.
//! * [`sink`]: hourly Parquet files per family and partition, create-only under deterministic
//!   keys, manifests, a bounded spool, retries through S3 outages.
//! * [`verify`]: reads S3 back and reports missing and duplicate records and aggregate
//!   mismatches — the oracle of the end-to-end tests.
//!
//! Exactly-once rests on deterministic replay from checkpoints (control records in each input
//! partition, see [`control`]) and idempotent outputs; the stage modules explain why. Windowing
//! and sealing are pure state machines ([`process::window`], [`sink::state`]) that never read a
//! clock: time enters only through the log.
//!
//! `main.rs` parses the command line and calls [`run`]; tests call the same function.

pub mod config;
pub mod control;
pub mod kafka;
pub mod metrics;
pub mod process;
pub mod processed;
pub mod s3;
pub mod sink;
pub mod verify;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use edgeflow_runtime::status::{self, Check, Status};
use edgeflow_runtime::{CancellationToken, systemd};
use prometheus_client::registry::Registry;
use tokio::task::JoinSet;

pub use config::{Config, Settings};
use kafka::KafkaHealth;
use metrics::{Metrics, Stage};
use process::{ProcessError, ProcessStage};
use s3::S3;
use sink::upload::S3Health;
use sink::{SinkError, SinkStage};

/// Which stages a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stages {
    /// `raw-data` → `processed-data`.
    Process,
    /// `processed-data` + `raw-data-dlq` → S3.
    Sink,
    /// Both, in one process.
    Both,
}

impl Stages {
    fn process(self) -> bool {
        matches!(self, Self::Process | Self::Both)
    }

    fn sink(self) -> bool {
        matches!(self, Self::Sink | Self::Both)
    }
}

/// Why [`run`] stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The status endpoint could not listen.
    #[error("cannot listen on {addr} for /metrics: {source}")]
    Listen { addr: std::net::SocketAddr, source: std::io::Error },
    /// The process stage failed.
    #[error("process stage: {0}")]
    Process(#[from] ProcessError),
    /// The sink stage failed.
    #[error("sink stage: {0}")]
    Sink(#[from] SinkError),
}

/// Readiness and liveness of a running aggregator.
#[derive(Debug)]
struct AggregatorStatus {
    kafka: Arc<KafkaHealth>,
    s3: Option<Arc<S3Health>>,
}

/// How long S3 may fail before the instance reports not ready.
const S3_GRACE_MS: i64 = 60_000;

impl Status for AggregatorStatus {
    fn live(&self) -> bool {
        true
    }

    fn ready(&self) -> Vec<Check> {
        let now = kafka::now_ms();
        let stats_age = now - self.kafka.last_stats_ms.load(Ordering::Relaxed);
        let kafka_ok = self.kafka.up.load(Ordering::Relaxed) && stats_age < 30_000;
        let mut checks =
            vec![Check::new("kafka", kafka_ok, if kafka_ok { "a broker is up" } else { "no broker reachable" })];
        match self.kafka.halted() {
            None => checks.push(Check::new("checkpoints", true, "every assigned partition's state was read")),
            Some(halted) => checks.push(Check::new("checkpoints", false, format!("halted: {halted}"))),
        }
        if let Some(s3) = &self.s3 {
            let failing = s3.failing_since_ms.load(Ordering::Relaxed);
            let ever_ok = s3.last_ok_ms.load(Ordering::Relaxed) > 0;
            let ok = ever_ok && (failing == 0 || now - failing < S3_GRACE_MS);
            let detail = match (ever_ok, failing) {
                (false, _) => "bucket not reached yet".to_owned(),
                (true, 0) => "bucket reachable, uploads succeeding".to_owned(),
                (true, since) => format!("requests failing for {}s", (now - since) / 1000),
            };
            checks.push(Check::new("s3", ok, detail));
        }
        checks
    }
}

/// Runs the chosen stages until `shutdown` is cancelled (then drains and returns `Ok`) or a
/// stage fails (then stops the others and returns its error).
pub async fn run(settings: Settings, stages: Stages, shutdown: CancellationToken) -> Result<(), RunError> {
    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    let k = &settings.kafka;
    if stages.process() {
        metrics.topic(Stage::process, &k.raw_topic);
    }
    if stages.sink() {
        metrics.topic(Stage::sink, &k.processed_topic);
        metrics.topic(Stage::sink, &k.dlq_topic);
    }
    let kafka_health = Arc::new(KafkaHealth::default());
    let s3_health = stages.sink().then(|| Arc::new(S3Health::default()));
    let listener = status::bind(settings.metrics_listen)
        .await
        .map_err(|source| RunError::Listen { addr: settings.metrics_listen, source })?;
    let status: Arc<dyn Status> = Arc::new(AggregatorStatus { kafka: kafka_health.clone(), s3: s3_health.clone() });
    let server_token = CancellationToken::new();
    let server = tokio::spawn(status::serve(listener, Arc::new(registry), status, server_token.clone()));

    let stage_token = shutdown.child_token();
    let mut tasks: JoinSet<Result<(), RunError>> = JoinSet::new();
    let built = build(&settings, stages, &metrics, &kafka_health, s3_health.as_ref(), &stage_token, &mut tasks).await;
    if let Err(error) = built {
        stage_token.cancel();
        while tasks.join_next().await.is_some() {}
        server_token.cancel();
        let _ = server.await;
        return Err(error);
    }
    systemd::ready("consuming");
    tracing::info!(listen = %settings.metrics_listen, ?stages, "edgeflow-aggregator running");

    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        let outcome = joined.unwrap_or_else(|e| {
            tracing::error!(error = %e, "a stage task panicked");
            Ok(())
        });
        if let Err(error) = outcome {
            tracing::error!(%error, "a stage failed; stopping the others");
            stage_token.cancel();
            if result.is_ok() {
                result = Err(error);
            }
        }
    }
    systemd::stopping();
    server_token.cancel();
    let _ = server.await;
    result
}

async fn build(
    settings: &Settings,
    stages: Stages,
    metrics: &Metrics,
    kafka_health: &Arc<KafkaHealth>,
    s3_health: Option<&Arc<S3Health>>,
    token: &CancellationToken,
    tasks: &mut JoinSet<Result<(), RunError>>,
) -> Result<(), RunError> {
    if stages.process() {
        let (s, m, h) = (settings.clone(), metrics.clone(), kafka_health.clone());
        let stage = tokio::task::spawn_blocking(move || ProcessStage::new(&s, m, h))
            .await
            .map_err(|e| RunError::Process(ProcessError::Delivery(format!("start-up task failed: {e}"))))??;
        let t = token.clone();
        tasks.spawn(async move { stage.run(t).await.map_err(RunError::from) });
    }
    if let (true, Some(s3_health)) = (stages.sink(), s3_health) {
        let s3 = S3::new(&settings.s3).await;
        spawn_probe(s3.clone(), s3_health.clone(), token.clone());
        let (s, m, kh, sh, client) = (settings.clone(), metrics.clone(), kafka_health.clone(), s3_health.clone(), s3);
        let stage =
            tokio::task::spawn_blocking(move || SinkStage::new(&s, client, m, kh, sh)).await.map_err(|e| {
                RunError::Sink(SinkError::SpoolDir {
                    path: "start-up task".into(),
                    source: std::io::Error::other(e.to_string()),
                })
            })??;
        let t = token.clone();
        tasks.spawn(async move { stage.run(t).await.map_err(RunError::from) });
    }
    Ok(())
}

/// Checks the bucket every 15 seconds, for readiness.
fn spawn_probe(s3: S3, health: Arc<S3Health>, token: CancellationToken) {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(15));
        loop {
            tokio::select! {
                _ = token.cancelled() => return,
                _ = every.tick() => {}
            }
            let result = tokio::select! {
                _ = token.cancelled() => return,
                r = s3.probe() => r,
            };
            if let Err(error) = &result {
                tracing::warn!(%error, "S3 bucket check failed");
            }
            health.probed(result.is_ok());
        }
    });
}
