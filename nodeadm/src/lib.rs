//! EKS Hybrid Nodes bootstrap for the edgeflow agent: registers the machine the agent runs on
//! with an EKS cluster through AWS's `nodeadm`, safely and idempotently.
//!
//! # Flow
//!
//! ```text
//! [bootstrap] --validate--> BootstrapSettings
//!     run(): read activation code (file / $CREDENTIALS_DIRECTORY / Parameter Store)
//!            refuse if a completed step's inputs changed (reset commands)
//!            preflight (read-only; any failure stops here)
//!            write NodeConfig (0600)
//!            nodeadm install <version> --credential-provider ssm|iam-ra   } each recorded in
//!            nodeadm init --config-source file:///…/nodeconfig.yaml      } state.json, skipped
//!            nodeadm debug --config-source file:///…/nodeconfig.yaml     } once done
//! ```
//!
//! # Invariants
//!
//! * Nothing on the host changes before every preflight check passed (or was skipped).
//! * The activation code is never logged, stored in clear outside the 0600 NodeConfig, or put in
//!   an error: nodeadm's output is redacted line by line ([`exec::Redactor`]), the state keeps a
//!   SHA-256 of it.
//! * A step that is done is never re-run with other inputs: a changed cluster, region, version
//!   or activation is refused with the reset commands ([`reset::reset_commands`]).
//! * nodeadm's exit code 0 is not trusted alone: `init` needs the install tracker before it runs
//!   and the SSM registration and kubelet kubeconfig after; an SSM registration this bootstrap did
//!   not make stops `init` (it would silently ignore the new activation).
//!
//! # Modules
//!
//! [`config`] (the TOML section), [`activation`] (id/code rules, Parameter Store),
//! [`preflight`] (checks and the [`preflight::Probe`] trait), [`nodeconfig`], [`state`],
//! [`exec`] (running nodeadm), [`bootstrap`] (one attempt), [`supervise`] (the daemon's retry
//! loop), [`phase`] (what the agent shows), [`error`].

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

pub mod activation;
pub mod bootstrap;
pub mod config;
pub mod error;
pub mod exec;
pub mod nodeconfig;
pub mod phase;
pub mod preflight;
pub mod reset;
pub mod state;
pub mod supervise;
mod yaml;

pub use activation::ParameterStore;
pub use bootstrap::{Mode, Outcome, Plan, run};
pub use config::{BootstrapConfig, BootstrapSettings, DEFAULT_CONFIG};
pub use error::BootstrapError;
pub use phase::{Phase, Stage};
pub use preflight::{CheckName, Probe, SystemProbe};
pub use state::Step;
pub use supervise::run_until_joined;

/// Where the bootstrap runs: the host's root, the agent's bootstrap directory, and the probes.
#[derive(Debug, Clone)]
pub struct Host {
    /// Host files (`/etc/os-release`, `/proc/swaps`, nodeadm's tracker and the SSM registration)
    /// are read under this root: `/` in production, a temporary directory in tests.
    pub root: PathBuf,
    /// Holds `state.json` and `nodeconfig.yaml` (`<data_dir>/bootstrap`).
    pub state_dir: PathBuf,
    /// User id, clock, interfaces and TCP.
    pub probe: Arc<dyn Probe>,
    /// Reads the activation code from Parameter Store; `None` builds one from the standard AWS
    /// configuration when needed.
    pub parameter_store: Option<ParameterStore>,
}

impl Host {
    /// The real host, with state in `<data_dir>/bootstrap`.
    pub fn system(data_dir: &Path) -> Self {
        Self {
            root: PathBuf::from("/"),
            state_dir: data_dir.join("bootstrap"),
            probe: Arc::new(SystemProbe::new("/")),
            parameter_store: None,
        }
    }
}

/// `path` (absolute, as on the host) under `root`.
pub fn host_path(root: &Path, path: &Path) -> PathBuf {
    let relative: PathBuf =
        path.components().filter(|c| !matches!(c, Component::RootDir | Component::Prefix(_))).collect();
    root.join(relative)
}
