//! What can go wrong in a bootstrap, split into retryable (the daemon tries again with backoff)
//! and fatal (an operator must act; the message says how).

use std::path::PathBuf;
use std::time::Duration;

use crate::activation::ActivationError;
use crate::nodeconfig::NodeConfigError;
use crate::phase::Stage;
use crate::preflight::PreflightReport;
use crate::state::{StateError, Step};

/// Why a bootstrap did not complete. Messages never contain the activation code.
#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    /// The activation code could not be read (file not delivered yet, parameter missing or
    /// unreachable). Retryable.
    #[error("cannot read the SSM activation code: {0}")]
    Activation(#[from] ActivationError),
    /// The NodeConfig breaks one of nodeadm's rules. Fatal: the configuration must change.
    #[error("nodeadm would reject the NodeConfig: {0}")]
    NodeConfig(#[from] NodeConfigError),
    /// One or more preflight checks failed; nothing was changed. Retryable when every failure
    /// may clear up by itself.
    #[error("preflight failed, nothing was changed: {}\n{report}", report.summary())]
    Preflight {
        /// Every check's result.
        report: PreflightReport,
    },
    /// The node was bootstrapped with another cluster, region, Kubernetes version or activation.
    /// Re-running nodeadm would half-apply the change, so the bootstrap refuses. Fatal.
    #[error("the bootstrap configuration changed since {step} completed ({}); refusing to half-apply it — {reset}", changes.join("; "))]
    Changed {
        /// The completed step whose inputs changed.
        step: Step,
        /// What changed, without secrets.
        changes: Vec<String>,
        /// The reset procedure.
        reset: String,
    },
    /// An SSM registration not made by this bootstrap exists: `nodeadm init` would skip
    /// registration and silently ignore the new activation. Fatal.
    #[error("{detail}; nodeadm init would keep it and ignore the new activation — {reset}")]
    StaleRegistration {
        /// What was found.
        detail: String,
        /// The reset procedure.
        reset: String,
    },
    /// nodeadm exited 0 without doing its job (init without a completed install, install
    /// without its tracker, init without registering). Retryable: the install runs again.
    #[error("nodeadm {step} exited 0 but did nothing: {detail}")]
    SilentNoOp {
        /// The step.
        step: Step,
        /// What is missing.
        detail: String,
    },
    /// A nodeadm step exited non-zero. Retryable unless its output names a permanent cause
    /// (an expired or invalid activation).
    #[error("nodeadm {step} failed ({exit}){}: {}", if *permanent { ", and retrying will not help" } else { "" }, tail.join(" | "))]
    StepFailed {
        /// The step.
        step: Step,
        /// The exit status.
        exit: String,
        /// Its last output lines, redacted.
        tail: Vec<String>,
        /// Whether the output names a cause retrying cannot fix.
        permanent: bool,
    },
    /// `nodeadm debug` found a failed check (exit 1). Retryable: the node may not be Ready yet
    /// (for example until a CNI is installed).
    #[error("nodeadm debug reported failed checks: {}", tail.join(" | "))]
    VerifyFailed {
        /// Its last output lines, redacted.
        tail: Vec<String>,
    },
    /// A step ran past its time limit and was killed. Retryable.
    #[error("nodeadm {step} did not finish within {after:?} and was stopped: {}", tail.join(" | "))]
    TimedOut {
        /// The step.
        step: Step,
        /// The limit.
        after: Duration,
        /// Its last output lines, redacted.
        tail: Vec<String>,
    },
    /// nodeadm could not be started. Fatal.
    #[error("cannot run {path} for {step}: {source}")]
    Spawn {
        /// The step.
        step: Step,
        /// The binary.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The state file could not be read or written. Fatal.
    #[error(transparent)]
    State(#[from] StateError),
    /// The NodeConfig could not be written. Fatal.
    #[error("cannot write the NodeConfig {path}: {source}")]
    WriteNodeConfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Shutdown was requested; a running step was stopped and runs again next time.
    #[error("the bootstrap was interrupted by shutdown")]
    Cancelled,
}

impl BootstrapError {
    /// Whether retrying later may succeed without an operator.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Activation(_)
            | Self::SilentNoOp { .. }
            | Self::VerifyFailed { .. }
            | Self::TimedOut { .. }
            | Self::Cancelled => true,
            Self::Preflight { report } => report.retryable(),
            Self::StepFailed { permanent, .. } => !permanent,
            Self::NodeConfig(_)
            | Self::Changed { .. }
            | Self::StaleRegistration { .. }
            | Self::Spawn { .. }
            | Self::State(_)
            | Self::WriteNodeConfig { .. } => false,
        }
    }

    /// Where it happened.
    pub fn stage(&self) -> Stage {
        match self {
            Self::Activation(_)
            | Self::NodeConfig(_)
            | Self::Preflight { .. }
            | Self::Changed { .. }
            | Self::State(_)
            | Self::WriteNodeConfig { .. }
            | Self::Cancelled => Stage::Preflight,
            Self::StaleRegistration { .. } => Stage::Init,
            Self::SilentNoOp { step, .. }
            | Self::StepFailed { step, .. }
            | Self::TimedOut { step, .. }
            | Self::Spawn { step, .. } => Stage::from(*step),
            Self::VerifyFailed { .. } => Stage::Verify,
        }
    }
}
