//! systemd service notifications (`Type=notify`).
//!
//! All calls are no-ops when the process was not started by systemd (`NOTIFY_SOCKET` unset).

use std::sync::Arc;
use std::time::Duration;

use sd_notify::NotifyState;
use tokio_util::sync::CancellationToken;

/// Tells systemd the service is up (`READY=1`), with a status line.
pub fn ready(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping (`STOPPING=1`).
pub fn stopping() {
    let _ = sd_notify::notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Updates the status line shown by `systemctl status`.
pub fn status(status: &str) {
    let _ = sd_notify::notify(&[NotifyState::Status(status)]);
}

/// Asks systemd for more time to stop (each call extends the stop timeout by `by`).
pub fn extend_timeout(by: Duration) {
    let usec = u32::try_from(by.as_micros()).unwrap_or(u32::MAX);
    let _ = sd_notify::notify(&[NotifyState::ExtendTimeoutUsec(usec)]);
}

/// Pings the systemd watchdog at half its interval for as long as `alive()` says the process is
/// making progress. A wedged process stops pinging and systemd restarts it. Returns at once when
/// the watchdog is not enabled.
pub fn spawn_watchdog(alive: Arc<dyn Fn() -> bool + Send + Sync>, shutdown: CancellationToken) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let period = interval / 2;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    if alive() {
                        let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                    } else {
                        tracing::warn!("a pipeline stage stopped making progress; withholding the watchdog ping");
                    }
                }
            }
        }
    });
}
