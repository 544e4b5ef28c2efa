//! The daemon's retry loop: attempt the bootstrap until the node joined, waiting with backoff
//! after a retryable failure, stopping at a fatal one or at shutdown.
//!
//! The agent runs this in its own task: telemetry never waits for it.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::Host;
use crate::bootstrap::{Mode, Outcome, run};
use crate::config::BootstrapSettings;
use crate::error::BootstrapError;
use crate::phase::Phase;

/// Runs the bootstrap until it succeeds, fails fatally, or `shutdown` is cancelled
/// (then `Err(BootstrapError::Cancelled)`). Each failure is logged once; the phase shows the
/// last one while the loop waits.
pub async fn run_until_joined(
    settings: &BootstrapSettings,
    host: &Host,
    phase: &watch::Sender<Phase>,
    shutdown: &CancellationToken,
) -> Result<Outcome, BootstrapError> {
    let mut attempt: u32 = 0;
    loop {
        attempt += 1;
        match run(settings, host, Mode::Apply, phase, shutdown).await {
            Ok(outcome) => return Ok(outcome),
            Err(BootstrapError::Cancelled) => return Err(BootstrapError::Cancelled),
            Err(error) if error.is_retryable() => {
                let delay = settings.backoff.delay(attempt);
                tracing::warn!(%error, attempt, retry_in = ?delay, "The bootstrap failed; it will be retried.");
                tokio::select! {
                    biased;
                    () = shutdown.cancelled() => return Err(BootstrapError::Cancelled),
                    () = tokio::time::sleep(delay) => {}
                }
            }
            Err(error) => {
                tracing::error!(%error, attempt, "The bootstrap failed and needs an operator; it will not be retried.");
                return Err(error);
            }
        }
    }
}
