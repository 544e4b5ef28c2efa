//! The EKS Hybrid Nodes bootstrap inside the daemon: its own task, retried with backoff, never
//! in telemetry's way (MQTT → buffer → Kafka starts and runs whatever the bootstrap does). Its
//! phase goes to `edgeflow_agent_bootstrap_*` and, as information only, to `/readyz`.

use std::path::Path;

use edgeflow_nodeadm::{BootstrapSettings, Host, Phase};
use edgeflow_runtime::CancellationToken;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Starts the bootstrap (when enabled) and the task that mirrors its phase into the metrics.
/// `shutdown` stops a running nodeadm step; `background` ends the mirroring.
pub(crate) fn spawn(
    settings: Option<BootstrapSettings>,
    data_dir: &Path,
    metrics: Metrics,
    shutdown: CancellationToken,
    background: CancellationToken,
) -> watch::Receiver<Phase> {
    let initial = if settings.is_some() { Phase::Pending } else { Phase::Disabled };
    metrics.set_bootstrap_phase(&initial);
    let (tx, mut rx) = edgeflow_nodeadm::phase::channel(initial);
    let status = rx.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                changed = rx.changed() => if changed.is_err() { break },
                () = background.cancelled() => break,
            }
            let phase = rx.borrow_and_update().clone();
            metrics.set_bootstrap_phase(&phase);
            match &phase {
                Phase::Joined => {
                    metrics.bootstrap_attempts.inc();
                }
                Phase::Failed { .. } => {
                    metrics.bootstrap_attempts.inc();
                    metrics.bootstrap_failures.inc();
                }
                _ => {}
            }
        }
    });
    if let Some(settings) = settings {
        let host = Host::system(data_dir);
        tokio::spawn(async move {
            match edgeflow_nodeadm::run_until_joined(&settings, &host, &tx, &shutdown).await {
                Ok(_) => tracing::info!(cluster = %settings.cluster_name, "This node is registered with EKS."),
                Err(edgeflow_nodeadm::BootstrapError::Cancelled) => {}
                // Already logged by the retry loop; the phase shows it.
                Err(_) => {}
            }
        });
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_disabled_bootstrap_shows_in_metrics_and_status() {
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = Metrics::register(&mut registry);
        let background = CancellationToken::new();
        let rx = spawn(None, Path::new("/nonexistent"), metrics, CancellationToken::new(), background.clone());
        assert_eq!(*rx.borrow(), Phase::Disabled);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
        assert!(text.contains("edgeflow_agent_bootstrap_phase{phase=\"disabled\"} 1"), "{text}");
        assert!(text.contains("edgeflow_agent_bootstrap_phase{phase=\"joined\"} 0"), "{text}");
        background.cancel();
    }
}
