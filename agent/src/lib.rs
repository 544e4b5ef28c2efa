//! edgeflow-agent: MQTT telemetry into a durable redb buffer, forwarded to Kafka.
//!
//! ```text
//!  MQTT broker ──▶ ingest ──Append──▶ buffer thread (redb, group commit) ──Read──▶ forward ──▶ Kafka
//!      ▲                                   │                   ▲                      │
//!      └──────── PUBACK after commit ◀─────┘                   └──── Delivered(seq) ◀──┘
//! ```
//!
//! * [`ingest`] — MQTT QoS 1 with a persistent session and manual acks; validates each payload
//!   into a record or a dead letter.
//! * [`buffer`] — the durable buffer and its ack protocol (module docs hold the design).
//! * [`forward`] — Kafka delivery with an idempotent producer; deletes after the delivery report.
//! * [`saturation`] — node CPU, memory, disk and network.
//! * [`status`] — `/metrics`, `/healthz`, `/readyz`.
//! * `bootstrap` — EKS Hybrid Nodes registration through `edgeflow-nodeadm`, in its own task:
//!   telemetry never waits for it.
//!
//! [`run`] wires them up and runs until the shutdown token is cancelled; `main.rs` and the tests
//! call the same function.

mod bootstrap;
pub mod buffer;
pub mod config;
pub mod forward;
pub mod ingest;
pub mod inspect;
pub mod metrics;
pub mod saturation;
pub mod simulate;
mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use edgeflow_runtime::{CancellationToken, systemd};
use prometheus_client::registry::Registry;

use crate::buffer::{Store, StoreError, StoreOptions, ThreadOptions};
pub use crate::config::{Config, Settings};
use crate::metrics::Metrics;

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The data directory cannot be created or written.
    #[error("data directory {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
    /// The buffer cannot be opened (locked by another agent, damaged, foreign).
    #[error(transparent)]
    Buffer(#[from] StoreError),
    /// The status endpoint cannot listen on the configured address.
    #[error("cannot listen on {addr} for metrics: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    /// librdkafka refused the producer configuration.
    #[error("Kafka producer configuration is invalid: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
    /// A stage stopped on its own (for example the buffer thread after a damaged read).
    #[error("{0}")]
    Stage(String),
}

/// What a running agent exposes to its caller (tests, the demo).
#[derive(Debug, Clone)]
pub struct Running {
    /// The status endpoint's address (useful when configured with port 0).
    pub status_addr: SocketAddr,
    pub metrics: Metrics,
}

/// Runs the agent until `shutdown` is cancelled, then stops gracefully within
/// `settings.shutdown_timeout`.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), RunError> {
    run_with(settings, shutdown, |_| {}).await
}

/// Like [`run`], calling `started` once the agent is up (with its actual status address).
pub async fn run_with(
    settings: Settings,
    shutdown: CancellationToken,
    started: impl FnOnce(Running),
) -> Result<(), RunError> {
    std::fs::create_dir_all(&settings.data_dir)
        .map_err(|source| RunError::DataDir { path: settings.data_dir.display().to_string(), source })?;

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    metrics.buffer_quota_bytes.set(settings.buffer.max_bytes as i64);

    let store_opts = StoreOptions {
        max_bytes: settings.buffer.max_bytes,
        when_full: settings.buffer.when_full,
        dedup_horizon: settings.buffer.dedup_horizon,
        cache_bytes: settings.buffer.cache_bytes,
    };
    let path = buffer::path_in(&settings.data_dir);
    let (store, opened) = Store::open(&path, &settings.node_id, store_opts, buffer::now_ms())?;
    if let Some(first) = opened.created {
        tracing::warn!(path = %path.display(), first_seq = first, "created a new buffer (first start, or the old one was lost); seq starts a new range");
    }
    if let Some(prev) = &opened.previous_node_id {
        tracing::warn!(previous = %prev, current = %settings.node_id, "the buffer was written under another node_id; buffered entries keep the old one");
    }
    let stats = store.stats();
    tracing::info!(path = %path.display(), entries = stats.count, bytes = stats.bytes, next_seq = stats.next_seq, epoch = store.epoch(), "buffer opened");

    let listener = edgeflow_runtime::status::bind(settings.metrics.listen)
        .await
        .map_err(|source| RunError::Listen { addr: settings.metrics.listen, source })?;
    let status_addr =
        listener.local_addr().map_err(|source| RunError::Listen { addr: settings.metrics.listen, source })?;
    forward::check_settings(&settings.kafka)?;

    // Stages.
    let session = ingest::Session::new(&settings.mqtt);
    let acker = session.acker();
    let shared = Arc::new(buffer::Shared::default());
    let (tail_tx, tail_rx) = flume::bounded(buffer::TAIL_CAPACITY);
    let (buffer_tx, buffer_thread) = buffer::spawn(
        store,
        ThreadOptions {
            max_batch: settings.buffer.max_batch,
            high_water_interval: settings.buffer.high_water_interval,
        },
        metrics.clone(),
        shared.clone(),
        tail_tx,
        move |acks| acker.ack(acks),
    )
    .map_err(RunError::Thread)?;

    let ingest_status = Arc::new(ingest::IngestStatus::default());
    let kafka_status = Arc::new(forward::KafkaStatus::default());
    // Ingest stops first; the forwarder after the final high_water marker is committed.
    let stages = CancellationToken::new();
    let forward_stop = CancellationToken::new();
    let flush_through = Arc::new(std::sync::OnceLock::new());
    let marker_tx = buffer_tx.clone();
    let background = CancellationToken::new();

    let ingest_task = tokio::spawn(ingest::run(
        session,
        ingest::Ingest {
            node_id: settings.node_id.clone(),
            rules: settings.rules.clone(),
            buffer: buffer_tx.clone(),
            metrics: metrics.clone(),
            status: ingest_status.clone(),
            reconnect_max: settings.mqtt.reconnect_max,
        },
        stages.clone(),
        settings.shutdown_timeout,
    ));
    let mut forward_task = tokio::spawn(forward::run(
        forward::Forward {
            settings: settings.kafka.clone(),
            client_id: format!("edgeflow-agent-{}", settings.node_id),
            buffer: buffer_tx,
            shared: shared.clone(),
            tail: tail_rx,
            metrics: metrics.clone(),
            status: kafka_status.clone(),
            flush_through: flush_through.clone(),
        },
        forward_stop.clone(),
        settings.shutdown_timeout,
    ));
    tokio::spawn(saturation::run(metrics.clone(), settings.metrics.saturation_interval, background.clone()));

    let bootstrap_phase = bootstrap::spawn(
        settings.bootstrap.clone(),
        &settings.data_dir,
        metrics.clone(),
        shutdown.clone(),
        background.clone(),
    );
    let agent_status = Arc::new(status::AgentStatus {
        bootstrap: bootstrap_phase,
        ingest: ingest_status,
        kafka: kafka_status,
        buffer: shared.clone(),
        metrics: metrics.clone(),
        quota: settings.buffer.max_bytes,
    });
    tokio::spawn(edgeflow_runtime::status::serve(
        listener,
        Arc::new(registry),
        agent_status.clone(),
        background.clone(),
    ));
    {
        let s = agent_status.clone();
        systemd::spawn_watchdog(Arc::new(move || s.alive()), background.clone());
    }
    systemd::ready(&format!("forwarding as node {}", settings.node_id));
    tracing::info!(node_id = %settings.node_id, status = %status_addr, "edgeflow-agent started");
    started(Running { status_addr, metrics: metrics.clone() });

    // Run until asked to stop, or until the forwarder ends on its own (a fatal Kafka error).
    let early = tokio::select! {
        _ = shutdown.cancelled() => None,
        r = &mut forward_task => Some(r),
    };
    let unexpected = early.is_some();
    systemd::stopping();
    tracing::info!("stopping: no new messages; committing and delivering what is in flight");
    stages.cancel();
    let deadline = settings.shutdown_timeout + Duration::from_secs(2);
    let stop = async {
        let _ = ingest_task.await;
        // Nothing more is assigned: a marker above every seq of this run, committed before the
        // forwarder's final flush so it goes out now if Kafka is up (else at the next start).
        let (tx, rx) = tokio::sync::oneshot::channel();
        if marker_tx.send_async(buffer::Command::HighWater(tx)).await.is_ok() {
            match tokio::time::timeout(Duration::from_secs(2), rx).await {
                Ok(Ok(seq)) => {
                    tracing::info!(seq, "high_water marker written: complete through seq {}", seq.saturating_sub(1));
                    let _ = flush_through.set(seq);
                }
                _ => tracing::warn!(
                    "the high_water marker of this stop was not committed within 2s (the buffer is full or failing); it goes out later if it is written"
                ),
            }
        }
        drop(marker_tx);
        forward_stop.cancel();
        let forwarded = match early {
            Some(r) => r,
            None => forward_task.await,
        };
        // The buffer thread ends once ingest and forward have dropped their senders.
        let buffer = tokio::task::spawn_blocking(move || buffer_thread.join()).await;
        if !matches!(buffer, Ok(Ok(()))) {
            return Err(RunError::Stage(
                "the buffer thread failed (see the error above); restarting checks the buffer".into(),
            ));
        }
        match forwarded {
            Ok(Ok(())) if unexpected => Err(RunError::Stage("the forwarder stopped unexpectedly".into())),
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(RunError::Kafka(e)),
            Err(join) => Err(RunError::Stage(format!("the forwarder failed: {join}"))),
        }
    };
    let result = match tokio::time::timeout(deadline, stop).await {
        Ok(r) => r,
        Err(_) => {
            tracing::warn!("graceful stop took too long; exiting (buffered data is safe and resumes at start)");
            Ok(())
        }
    };
    forward_stop.cancel();
    background.cancel();
    let stats = shared.stats();
    tracing::info!(entries = stats.count, next_seq = stats.next_seq, "edgeflow-agent stopped");
    result
}
