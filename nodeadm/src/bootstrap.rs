//! One bootstrap attempt: read the activation, refuse a changed bootstrap, check the host, write
//! the NodeConfig, then run the steps that are not done yet.
//!
//! Order matters for "change nothing before it is safe": everything up to and including the
//! preflight only reads. The NodeConfig and the state file are written only after every check
//! passed, and each step is recorded `running` before nodeadm starts, so a crash mid-step is seen
//! as a failure and resumed.

use std::fmt;
use std::path::{Path, PathBuf};

use edgeflow_runtime::config::Secret;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::activation::{self, ActivationError};
use crate::config::{BootstrapSettings, CredentialProvider, CredentialSettings};
use crate::error::BootstrapError;
use crate::exec::{self, Redactor, RunError};
use crate::nodeconfig::{NodeConfig, write_private_file};
use crate::phase::Phase;
use crate::preflight::{self, KUBELET_KUBECONFIG, NODEADM_TRACKER, PreflightInput, PreflightReport, SSM_REGISTRATION};
use crate::reset::reset_commands;
use crate::state::{Identity, State, StateFile, Step, StepStatus};
use crate::{Host, host_path};

/// Apply the bootstrap, or only show what it would do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Run preflight and the steps.
    Apply,
    /// Run preflight, then print the NodeConfig (secrets masked) and the commands; change nothing.
    DryRun,
}

/// How a bootstrap attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The steps listed ran and the node is registered.
    Joined {
        /// The steps this attempt ran (earlier attempts ran the others).
        ran: Vec<Step>,
    },
    /// Every step was already done with this configuration; nothing ran.
    AlreadyJoined,
    /// A dry run: what an apply would do.
    DryRun(Plan),
}

/// What an apply would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The preflight checks.
    pub preflight: PreflightReport,
    /// Where the NodeConfig would be written.
    pub nodeconfig_path: PathBuf,
    /// The NodeConfig, activation code masked.
    pub nodeconfig: String,
    /// The commands that would run, in order.
    pub commands: Vec<String>,
    /// Steps already done (they would not run again).
    pub done: Vec<Step>,
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "Preflight:")?;
        write!(f, "{}", self.preflight)?;
        writeln!(f, "\nNodeConfig ({}, mode 0600; activation code masked):", self.nodeconfig_path.display())?;
        write!(f, "{}", self.nodeconfig)?;
        if !self.done.is_empty() {
            let done: Vec<&str> = self.done.iter().map(|s| s.as_str()).collect();
            writeln!(f, "\nAlready done: {}", done.join(", "))?;
        }
        writeln!(f, "\nCommands:")?;
        for command in &self.commands {
            writeln!(f, "  {command}")?;
        }
        if !self.preflight.passed() {
            writeln!(f, "\nPreflight failed: an apply would stop before changing anything.")?;
        }
        Ok(())
    }
}

/// Runs one bootstrap attempt, publishing its phase on `phase`.
pub async fn run(
    settings: &BootstrapSettings,
    host: &Host,
    mode: Mode,
    phase: &watch::Sender<Phase>,
    cancel: &CancellationToken,
) -> Result<Outcome, BootstrapError> {
    let result = attempt(settings, host, mode, phase, cancel).await;
    match &result {
        Ok(Outcome::Joined { .. } | Outcome::AlreadyJoined) => {
            phase.send_replace(Phase::Joined);
        }
        Ok(Outcome::DryRun(_)) | Err(BootstrapError::Cancelled) => {}
        Err(error) => {
            let reason = error.to_string().lines().next().unwrap_or_default().to_owned();
            phase.send_replace(Phase::Failed { stage: error.stage(), retryable: error.is_retryable(), reason });
        }
    }
    result
}

async fn attempt(
    settings: &BootstrapSettings,
    host: &Host,
    mode: Mode,
    phase: &watch::Sender<Phase>,
    cancel: &CancellationToken,
) -> Result<Outcome, BootstrapError> {
    phase.send_replace(Phase::Preflight);
    let state_dir = std::path::absolute(&host.state_dir)
        .map_err(|source| BootstrapError::WriteNodeConfig { path: host.state_dir.clone(), source })?;
    let state_file = StateFile::in_dir(&state_dir);
    let mut state = state_file.load()?;

    let code: Option<Result<Secret, ActivationError>> = match &settings.credentials {
        CredentialSettings::Ssm { code, .. } => {
            Some(activation::read_code(code, &settings.region, host.parameter_store.as_ref()).await)
        }
        CredentialSettings::IamRolesAnywhere(_) => None,
    };
    let known_code = match &code {
        Some(Ok(secret)) => Some(secret.clone()),
        _ => None,
    };
    let credentials_known = settings.credential_provider() == CredentialProvider::IamRa || known_code.is_some();
    let nodeconfig = NodeConfig::new(settings, known_code);
    let identity = Identity::new(settings, &nodeconfig);

    // A node that completed every step stays as it is, even once its single-use activation
    // code has been removed; but not if it is now configured for another cluster or activation.
    if let Some(recorded) = joined_identity(&state) {
        let changes = recorded.changes_known(&identity, credentials_known);
        if changes.is_empty() {
            tracing::info!(cluster = %settings.cluster_name, "The node already joined the cluster; nothing to do.");
            return Ok(Outcome::AlreadyJoined);
        }
        return Err(BootstrapError::Changed { step: Step::Init, changes, reset: reset_commands(&state_dir) });
    }
    if credentials_known && let Some((step, changes)) = state.conflicts(&identity).into_iter().next() {
        return Err(BootstrapError::Changed { step, changes, reset: reset_commands(&state_dir) });
    }
    if credentials_known {
        nodeconfig.validate(&host.root)?;
    }

    let registration_is_ours = credentials_known && state.init_attempted_with(&identity);
    let (report, code) = run_preflight(settings, host, &state_dir, code, registration_is_ours).await;
    for result in &report.results {
        tracing::info!(check = result.name.as_str(), status = ?result.status, "Preflight: {}.", result.detail);
    }

    let nodeconfig_path = state_dir.join("nodeconfig.yaml");
    if mode == Mode::DryRun {
        let done: Vec<Step> =
            Step::ALL.into_iter().filter(|s| credentials_known && state.is_done(*s, &identity)).collect();
        let commands = Step::ALL
            .into_iter()
            .filter(|s| !done.contains(s))
            .map(|s| {
                format!("{} {}", settings.nodeadm_path.display(), step_args(s, settings, &nodeconfig_path).join(" "))
            })
            .collect();
        return Ok(Outcome::DryRun(Plan {
            preflight: report,
            nodeconfig_path,
            nodeconfig: nodeconfig.to_masked_yaml(),
            commands,
            done,
        }));
    }
    if !report.passed() {
        return Err(BootstrapError::Preflight { report });
    }
    if let Some(Err(error)) = code {
        // Only reachable with the `credentials` check skipped, which reports it otherwise.
        return Err(BootstrapError::Activation(error));
    }

    write_nodeconfig(&nodeconfig_path, &nodeconfig)?;
    let redactor = Redactor::new(nodeconfig.secret().map(Secret::expose));
    let mut ran = Vec::new();
    for step in Step::ALL {
        if state.is_done(step, &identity) {
            continue;
        }
        if step == Step::Init {
            guard_init(settings, host, &state_dir, &mut state, &state_file, &identity)?;
        }
        phase.send_replace(Phase::running(step));
        state.record(step, &identity, StepStatus::Running, None);
        state_file.save(&state)?;
        tracing::info!(step = step.as_str(), "Running nodeadm {step}.");
        match run_step(step, settings, host, &nodeconfig_path, &redactor, cancel).await {
            Ok(()) => {
                state.record(step, &identity, StepStatus::Done, None);
                state_file.save(&state)?;
                tracing::info!(step = step.as_str(), "nodeadm {step} completed.");
                ran.push(step);
            }
            Err(error) => {
                if matches!(error, BootstrapError::SilentNoOp { .. }) && step != Step::Install {
                    // The install is not really there: do it again next time.
                    state.forget(Step::Install);
                }
                state.record(step, &identity, StepStatus::Failed, Some(error.to_string()));
                state_file.save(&state)?;
                return Err(error);
            }
        }
    }
    tracing::info!(cluster = %settings.cluster_name, "The node joined the cluster.");
    Ok(Outcome::Joined { ran })
}

/// The recorded identity when every step is done.
fn joined_identity(state: &State) -> Option<&Identity> {
    let all_done = Step::ALL.iter().all(|s| state.steps.get(s).is_some_and(|r| r.status == StepStatus::Done));
    if all_done { state.identity.as_ref() } else { None }
}

async fn run_preflight(
    settings: &BootstrapSettings,
    host: &Host,
    state_dir: &Path,
    code: Option<Result<Secret, ActivationError>>,
    registration_is_ours: bool,
) -> (PreflightReport, Option<Result<Secret, ActivationError>>) {
    let settings = settings.clone();
    let host = host.clone();
    let state_dir = state_dir.to_owned();
    // The checks block (files, DNS, TCP connects): keep them off the runtime's workers.
    let handle = tokio::task::spawn_blocking(move || {
        let report = preflight::run(&PreflightInput {
            settings: &settings,
            root: &host.root,
            state_dir: &state_dir,
            probe: host.probe.as_ref(),
            activation_code: code.as_ref(),
            registration_is_ours,
        });
        (report, code)
    });
    handle.await.unwrap_or_else(|panic| {
        // A panicking check is a bug; report it as a failed check rather than crash the agent.
        let report = PreflightReport {
            results: vec![preflight::CheckResult {
                name: preflight::CheckName::Root,
                status: preflight::CheckStatus::Failed,
                detail: format!("a preflight check panicked: {panic}"),
                remedy: Some("report this as a bug; add the check to bootstrap.skip_checks meanwhile".into()),
                retryable: false,
            }],
        };
        (report, None)
    })
}

fn write_nodeconfig(path: &Path, nodeconfig: &NodeConfig) -> Result<(), BootstrapError> {
    let yaml = nodeconfig.to_yaml();
    if std::fs::read(path).is_ok_and(|old| old == yaml.as_bytes()) {
        return Ok(());
    }
    write_private_file(path, yaml.as_bytes())
        .map_err(|source| BootstrapError::WriteNodeConfig { path: path.to_owned(), source })?;
    tracing::info!(path = %path.display(), "Wrote the NodeConfig.");
    Ok(())
}

/// nodeadm's silent no-ops, caught before `init`: without a completed install `init` exits 0
/// doing nothing; with an SSM registration it did not make, `init` skips registration and the
/// new activation is ignored.
fn guard_init(
    settings: &BootstrapSettings,
    host: &Host,
    state_dir: &Path,
    state: &mut State,
    state_file: &StateFile,
    identity: &Identity,
) -> Result<(), BootstrapError> {
    let tracker = host_path(&host.root, Path::new(NODEADM_TRACKER));
    if !tracker.exists() {
        state.forget(Step::Install);
        state_file.save(state)?;
        return Err(BootstrapError::SilentNoOp {
            step: Step::Init,
            detail: format!(
                "{NODEADM_TRACKER} is missing, so `nodeadm install` has not completed and `nodeadm init` would exit 0 \
                 without doing anything; the install runs again on the next attempt"
            ),
        });
    }
    if settings.credential_provider() == CredentialProvider::Ssm {
        let registration = host_path(&host.root, Path::new(SSM_REGISTRATION));
        if registration.exists() {
            let found = preflight::read_registration(&registration);
            let ours = state.init_attempted_with(identity);
            let region_matches = found.as_ref().is_none_or(|(_, region)| region == &settings.region);
            if !ours || !region_matches {
                let what = found.map(|(id, region)| format!(" for {id} in {region}")).unwrap_or_default();
                return Err(BootstrapError::StaleRegistration {
                    detail: format!(
                        "an SSM registration{what} that this bootstrap did not make exists at {SSM_REGISTRATION}"
                    ),
                    reset: reset_commands(state_dir),
                });
            }
        }
    }
    Ok(())
}

fn step_args(step: Step, settings: &BootstrapSettings, nodeconfig_path: &Path) -> Vec<String> {
    let source = format!("file://{}", nodeconfig_path.display());
    match step {
        Step::Install => vec![
            "install".into(),
            settings.kubernetes_version.clone(),
            "--credential-provider".into(),
            settings.credential_provider().as_str().into(),
        ],
        Step::Init => vec!["init".into(), "--config-source".into(), source],
        Step::Verify => vec!["debug".into(), "--config-source".into(), source],
    }
}

/// Output that names a cause no retry can fix.
const PERMANENT_MARKERS: [&str; 4] =
    ["ActivationExpired", "InvalidActivation", "activation expired", "invalid SSM activation"];

async fn run_step(
    step: Step,
    settings: &BootstrapSettings,
    host: &Host,
    nodeconfig_path: &Path,
    redactor: &Redactor,
    cancel: &CancellationToken,
) -> Result<(), BootstrapError> {
    let timeout = match step {
        Step::Install => settings.timeouts.install,
        Step::Init => settings.timeouts.init,
        Step::Verify => settings.timeouts.verify,
    };
    let args = step_args(step, settings, nodeconfig_path);
    let finished =
        exec::run(&settings.nodeadm_path, &args, step, timeout, redactor, cancel).await.map_err(|e| match e {
            RunError::Spawn(source) => BootstrapError::Spawn { step, path: settings.nodeadm_path.clone(), source },
            RunError::TimedOut { tail } => BootstrapError::TimedOut { step, after: timeout, tail },
            RunError::Cancelled => BootstrapError::Cancelled,
        })?;
    let code = finished.status.code();
    if !finished.status.success() {
        if step == Step::Verify && code == Some(1) {
            return Err(BootstrapError::VerifyFailed { tail: finished.tail });
        }
        let permanent = finished.tail.iter().any(|l| PERMANENT_MARKERS.iter().any(|m| l.contains(m)));
        let exit = match code {
            Some(c) => format!("exit code {c}"),
            None => finished.status.to_string(),
        };
        return Err(BootstrapError::StepFailed { step, exit, tail: finished.tail, permanent });
    }
    // Exit 0 is not proof: check that nodeadm left what it leaves when it did its job.
    let missing = |path: &str| (!host_path(&host.root, Path::new(path)).exists()).then(|| path.to_owned());
    let absent: Vec<String> = match step {
        Step::Install => missing(NODEADM_TRACKER).into_iter().collect(),
        Step::Init => {
            let mut list: Vec<String> = missing(NODEADM_TRACKER).into_iter().collect();
            if settings.credential_provider() == CredentialProvider::Ssm {
                list.extend(missing(SSM_REGISTRATION));
            }
            list.extend(missing(KUBELET_KUBECONFIG));
            list
        }
        Step::Verify => Vec::new(),
    };
    if !absent.is_empty() {
        return Err(BootstrapError::SilentNoOp {
            step,
            detail: format!("{} missing afterwards", absent.join(" and ")),
        });
    }
    Ok(())
}
