//! What the bootstrap has done on this node, kept in `<data_dir>/bootstrap/state.json`.
//!
//! Each step (`install`, `init`, `verify`) records its status and a digest of its inputs:
//!
//! * `install`: the Kubernetes version and the credential provider;
//! * `init` and `verify`: those, plus the cluster, the region, the credentials (activation id
//!   and a SHA-256 of the code, or the IAM Roles Anywhere identity) and the NodeConfig.
//!
//! A step is skipped when it is `done` with the same inputs. A `done` step whose inputs changed
//! is never re-run over the old one: nodeadm would half-apply it (a re-run `init` keeps the old
//! SSM registration), so the bootstrap refuses and prints the reset commands. A step that failed
//! (or was interrupted: `running`) is run again.
//!
//! No secret is stored: the activation code appears only as a SHA-256 digest. The file is
//! written atomically (temporary file, fsync, rename), mode 0600.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use crate::config::{BootstrapSettings, CredentialProvider};
use crate::nodeconfig::{NodeConfig, NodeCredentials, write_private_file};

/// Format version of the state file.
pub const STATE_VERSION: u32 = 1;

/// A bootstrap step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `nodeadm install`.
    Install,
    /// `nodeadm init`.
    Init,
    /// `nodeadm debug`.
    Verify,
}

impl Step {
    /// All steps in order.
    pub const ALL: [Step; 3] = [Step::Install, Step::Init, Step::Verify];

    /// Stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Install => "install",
            Self::Init => "init",
            Self::Verify => "verify",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepStatus {
    /// Started and not finished: the agent stopped or crashed meanwhile. Treated as failed.
    Running,
    /// Failed; runs again next time.
    Failed,
    /// Succeeded with the recorded inputs.
    Done,
}

/// One step's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepRecord {
    /// How it ended.
    pub status: StepStatus,
    /// Digest of the step's inputs (see the module doc).
    pub inputs: String,
    /// Unix time of the last change.
    pub at: u64,
    /// Runs so far.
    pub attempts: u32,
    /// Why it failed, redacted, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The node's identity as the bootstrap saw it, in clear except for the activation code, so a
/// refusal can say what changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// EKS cluster.
    pub cluster_name: String,
    /// AWS region.
    pub region: String,
    /// Kubernetes version.
    pub kubernetes_version: String,
    /// Credential provider.
    pub credential_provider: CredentialProvider,
    /// SSM activation id, or the IAM Roles Anywhere role and node name.
    pub credential_id: String,
    /// SHA-256 of the activation code (hex), empty for IAM Roles Anywhere.
    pub credential_secret_sha256: String,
    /// SHA-256 of the NodeConfig as written.
    pub nodeconfig_sha256: String,
}

impl Identity {
    /// The identity of a bootstrap with these settings and this NodeConfig.
    pub fn new(settings: &BootstrapSettings, nodeconfig: &NodeConfig) -> Self {
        let (credential_id, credential_secret_sha256) = match &nodeconfig.credentials {
            NodeCredentials::Ssm { activation_id, activation_code } => {
                (activation_id.clone(), sha256_hex(activation_code.expose().as_bytes()))
            }
            NodeCredentials::IamRolesAnywhere(ra) => {
                (format!("{} {} {} {}", ra.trust_anchor_arn, ra.profile_arn, ra.role_arn, ra.node_name), String::new())
            }
        };
        Self {
            cluster_name: settings.cluster_name.clone(),
            region: settings.region.clone(),
            kubernetes_version: settings.kubernetes_version.clone(),
            credential_provider: settings.credential_provider(),
            credential_id,
            credential_secret_sha256,
            nodeconfig_sha256: sha256_hex(nodeconfig.to_yaml().as_bytes()),
        }
    }

    /// Digest of what `step` depends on.
    pub fn inputs(&self, step: Step) -> String {
        let install = format!(
            "kubernetes_version={}\ncredential_provider={}\n",
            self.kubernetes_version, self.credential_provider
        );
        let text = match step {
            Step::Install => install,
            Step::Init | Step::Verify => format!(
                "{install}cluster_name={}\nregion={}\ncredential_id={}\ncredential_secret_sha256={}\nnodeconfig_sha256={}\n",
                self.cluster_name,
                self.region,
                self.credential_id,
                self.credential_secret_sha256,
                self.nodeconfig_sha256
            ),
        };
        sha256_hex(text.as_bytes())
    }

    /// What differs between `self` (recorded) and `now`, as short phrases without secrets.
    pub fn changes(&self, now: &Identity, step: Step) -> Vec<String> {
        let mut changes = Vec::new();
        let mut field = |name: &str, old: &str, new: &str| {
            if old != new {
                changes.push(format!("{name} changed from `{old}` to `{new}`"));
            }
        };
        field("kubernetes_version", &self.kubernetes_version, &now.kubernetes_version);
        field("credential_provider", self.credential_provider.as_str(), now.credential_provider.as_str());
        if step != Step::Install {
            field("cluster_name", &self.cluster_name, &now.cluster_name);
            field("region", &self.region, &now.region);
            field("credentials", &self.credential_id, &now.credential_id);
            if self.credential_secret_sha256 != now.credential_secret_sha256 {
                changes.push("the activation code changed".into());
            }
            if changes.is_empty() && self.nodeconfig_sha256 != now.nodeconfig_sha256 {
                changes.push("the NodeConfig changed (node_ip or kubelet_flags)".into());
            }
        }
        changes
    }
}

impl Identity {
    /// What differs from `now` for a joined node. Without the credentials (`credentials_known`
    /// false: the single-use activation code was removed after joining) only the fields in
    /// clear are compared.
    pub fn changes_known(&self, now: &Identity, credentials_known: bool) -> Vec<String> {
        if credentials_known {
            return self.changes(now, Step::Init);
        }
        let partial = Identity {
            credential_secret_sha256: self.credential_secret_sha256.clone(),
            nodeconfig_sha256: self.nodeconfig_sha256.clone(),
            ..now.clone()
        };
        self.changes(&partial, Step::Init)
    }
}

/// The state file's content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The identity of the last run.
    pub identity: Option<Identity>,
    /// Each step's record.
    pub steps: BTreeMap<Step, StepRecord>,
}

impl Default for State {
    fn default() -> Self {
        Self { version: STATE_VERSION, identity: None, steps: BTreeMap::new() }
    }
}

impl State {
    /// Whether `step` is done with these inputs.
    pub fn is_done(&self, step: Step, identity: &Identity) -> bool {
        self.steps.get(&step).is_some_and(|r| r.status == StepStatus::Done && r.inputs == identity.inputs(step))
    }

    /// Whether `init` ran (done, failed or interrupted) with this identity: then an SSM
    /// registration or kubelet state on the host is ours, not a leftover.
    pub fn init_attempted_with(&self, identity: &Identity) -> bool {
        self.steps.get(&Step::Init).is_some_and(|r| r.inputs == identity.inputs(Step::Init))
    }

    /// Steps that are done with inputs other than `identity`'s, with what changed.
    pub fn conflicts(&self, identity: &Identity) -> Vec<(Step, Vec<String>)> {
        let Some(recorded) = &self.identity else { return Vec::new() };
        Step::ALL
            .into_iter()
            .filter(|step| {
                self.steps.get(step).is_some_and(|r| r.status == StepStatus::Done && r.inputs != identity.inputs(*step))
            })
            .map(|step| {
                let mut changes = recorded.changes(identity, step);
                if changes.is_empty() {
                    changes.push("the bootstrap inputs changed".into());
                }
                (step, changes)
            })
            .collect()
    }

    /// Records a step's new status.
    pub fn record(&mut self, step: Step, identity: &Identity, status: StepStatus, error: Option<String>) {
        let attempts = match (self.steps.get(&step), status) {
            (Some(previous), StepStatus::Running) => previous.attempts + 1,
            (Some(previous), _) => previous.attempts,
            (None, StepStatus::Running) => 1,
            (None, _) => 0,
        };
        self.identity = Some(identity.clone());
        self.steps.insert(step, StepRecord { status, inputs: identity.inputs(step), at: unix_now(), attempts, error });
    }

    /// Forgets a step (its result is no longer true on the host).
    pub fn forget(&mut self, step: Step) {
        self.steps.remove(&step);
    }
}

/// Why the state file could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading or writing failed.
    #[error("cannot access bootstrap state {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The file is not a state file this version understands.
    #[error("bootstrap state {path} is unreadable ({message}); remove it to start over")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
}

/// The state file on disk.
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    /// `dir/state.json`.
    pub fn in_dir(dir: &Path) -> Self {
        Self { path: dir.join("state.json") }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads it; a missing file is an empty state.
    pub fn load(&self) -> Result<State, StateError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(State::default()),
            Err(source) => return Err(StateError::Io { path: self.path.clone(), source }),
        };
        let state: State = serde_json::from_slice(&bytes)
            .map_err(|e| StateError::Corrupt { path: self.path.clone(), message: e.to_string() })?;
        if state.version != STATE_VERSION {
            return Err(StateError::Corrupt {
                path: self.path.clone(),
                message: format!("version {} is not {STATE_VERSION}", state.version),
            });
        }
        Ok(state)
    }

    /// Writes it atomically.
    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let mut bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| StateError::Io { path: self.path.clone(), source: std::io::Error::other(e) })?;
        bytes.push(b'\n');
        write_private_file(&self.path, &bytes).map_err(|source| StateError::Io { path: self.path.clone(), source })
    }
}

/// Lowercase hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(code_sha: &str, version: &str) -> Identity {
        Identity {
            cluster_name: "edge-1".into(),
            region: "eu-west-1".into(),
            kubernetes_version: version.into(),
            credential_provider: CredentialProvider::Ssm,
            credential_id: "0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e".into(),
            credential_secret_sha256: code_sha.into(),
            nodeconfig_sha256: format!("nc-{code_sha}"),
        }
    }

    #[test]
    fn round_trips_and_detects_changes_per_step() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = StateFile::in_dir(dir.path());
        assert_eq!(file.load().expect("missing is empty"), State::default());
        let old = identity("aaa", "1.31");
        let mut state = State::default();
        state.record(Step::Install, &old, StepStatus::Running, None);
        state.record(Step::Install, &old, StepStatus::Done, None);
        state.record(Step::Init, &old, StepStatus::Running, None);
        state.record(Step::Init, &old, StepStatus::Failed, Some("exit 1".into()));
        file.save(&state).expect("save");
        let loaded = file.load().expect("load");
        assert_eq!(loaded, state);
        assert_eq!(loaded.steps[&Step::Init].attempts, 1);

        // A new activation code: install is still valid, init failed so it may run again.
        let new_code = identity("bbb", "1.31");
        assert!(loaded.is_done(Step::Install, &new_code));
        assert!(loaded.conflicts(&new_code).is_empty());
        assert!(!loaded.init_attempted_with(&new_code));
        assert!(loaded.init_attempted_with(&old));

        // Once init is done, a new code is a conflict that names what changed without the secret.
        let mut joined = loaded.clone();
        joined.record(Step::Init, &old, StepStatus::Done, None);
        let conflicts = joined.conflicts(&new_code);
        assert_eq!(conflicts.len(), 1);
        assert_eq!(conflicts[0].0, Step::Init);
        assert_eq!(conflicts[0].1, vec!["the activation code changed".to_owned()]);

        // A new Kubernetes version conflicts with the done install.
        let upgraded = identity("aaa", "1.32");
        let conflicts = joined.conflicts(&upgraded);
        assert!(conflicts.iter().any(|(s, c)| *s == Step::Install && c[0].contains("1.31")), "{conflicts:?}");
        let text = std::fs::read_to_string(file.path()).expect("read");
        assert!(!text.contains("Zq3k"), "no secret in {text}");
    }

    #[test]
    fn corrupt_state_is_reported() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("state.json"), "{not json").expect("write");
        let err = StateFile::in_dir(dir.path()).load().expect_err("corrupt");
        assert!(matches!(err, StateError::Corrupt { .. }), "{err}");
    }
}
