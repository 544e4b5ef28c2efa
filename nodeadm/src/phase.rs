//! The bootstrap's phase, published on a `tokio::sync::watch` channel so the agent can show it
//! in metrics and `/readyz` without waiting for it.

use tokio::sync::watch;

use crate::state::Step;

/// Where a failure happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Reading the activation, checking the host, the configuration and the state.
    Preflight,
    /// `nodeadm install`.
    Install,
    /// `nodeadm init`.
    Init,
    /// `nodeadm debug`.
    Verify,
}

impl Stage {
    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Preflight => "preflight",
            Self::Install => "install",
            Self::Init => "init",
            Self::Verify => "verify",
        }
    }
}

impl From<Step> for Stage {
    fn from(step: Step) -> Self {
        match step {
            Step::Install => Self::Install,
            Step::Init => Self::Init,
            Step::Verify => Self::Verify,
        }
    }
}

/// What the bootstrap is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// `[bootstrap] enabled = false`: nothing to do.
    Disabled,
    /// Enabled, not started yet.
    Pending,
    /// Reading the activation and checking the host.
    Preflight,
    /// `nodeadm install` is running.
    Installing,
    /// `nodeadm init` is running.
    Initializing,
    /// `nodeadm debug` is running.
    Verifying,
    /// Every step completed; the node is registered with the cluster.
    Joined,
    /// The last attempt failed.
    Failed {
        /// Where.
        stage: Stage,
        /// Whether the daemon retries by itself.
        retryable: bool,
        /// One line, without secrets.
        reason: String,
    },
}

impl Phase {
    /// Every phase's stable name, for metrics (one gauge series per name).
    pub const NAMES: [&'static str; 8] =
        ["disabled", "pending", "preflight", "installing", "initializing", "verifying", "joined", "failed"];

    /// The stable name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::Pending => "pending",
            Self::Preflight => "preflight",
            Self::Installing => "installing",
            Self::Initializing => "initializing",
            Self::Verifying => "verifying",
            Self::Joined => "joined",
            Self::Failed { .. } => "failed",
        }
    }

    /// The phase in which `step` runs.
    pub fn running(step: Step) -> Self {
        match step {
            Step::Install => Self::Installing,
            Step::Init => Self::Initializing,
            Step::Verify => Self::Verifying,
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Failed { stage, retryable, reason } => {
                let next = if *retryable { "will retry" } else { "needs an operator" };
                write!(f, "failed in {} ({next}): {reason}", stage.as_str())
            }
            other => f.write_str(other.name()),
        }
    }
}

/// A phase channel starting at `initial`.
pub fn channel(initial: Phase) -> (watch::Sender<Phase>, watch::Receiver<Phase>) {
    watch::channel(initial)
}
