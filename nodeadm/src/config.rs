//! The `[bootstrap]` section of the agent's configuration, and its validation into
//! [`BootstrapSettings`].
//!
//! Validation is syntactic and offline: it never reads the activation code (that happens at run
//! time, so a code delivered later by cloud-init or a fixed file is picked up on the next retry).

use std::net::Ipv4Addr;
use std::path::PathBuf;

use edgeflow_runtime::config::{Duration, Invalid};
use ipnet::Ipv4Net;
use serde::Deserialize;

use crate::activation::{self, ActivationCodeSource};
use crate::preflight::CheckName;

/// The commented default `[bootstrap]` block, appended by the agent to its default config.
/// `enabled = false`: a node nobody configured does nothing.
pub const DEFAULT_CONFIG: &str = r#"# EKS Hybrid Nodes bootstrap: registers this machine with an EKS cluster through nodeadm.
# See docs/bootstrap.md for how to create an activation and hand it to the node.
[bootstrap]
# Off by default: an unconfigured node never runs nodeadm.
enabled = false
# Name of the EKS cluster to join.
cluster_name = ""
# AWS region of the cluster, e.g. "eu-west-1".
region = ""
# Kubernetes version to install, major.minor; must match the cluster's, e.g. "1.31".
kubernetes_version = ""
# "ssm" (SSM hybrid activation, fill [bootstrap.ssm]) or "iam-ra" (IAM Roles Anywhere, fill [bootstrap.iam_ra]).
credential_provider = "ssm"
# The hybrid-nodes nodeadm binary.
nodeadm_path = "/usr/local/bin/nodeadm"
# The node's IPv4 address as the cluster will see it (kubelet --node-ip). Empty: kubelet picks one.
node_ip = ""
# The cluster's remote node networks (RFC 1918 IPv4 CIDRs); the node IP must be inside one.
remote_node_cidrs = []
# Extra kubelet flags, e.g. ["--node-labels=site=plant-1"]. --hostname-override is rejected by nodeadm.
kubelet_flags = []
# Preflight checks to skip, by name, or "all". Names: root, nodeadm_binary, supported_os, swap,
# time_sync, node_ip, endpoints, previous_registration, credentials.
skip_checks = []
# Time limits for `nodeadm install`, `nodeadm init` and `nodeadm debug`.
install_timeout = "30m"
init_timeout = "15m"
verify_timeout = "5m"
# Time limit for each TCP connection of the endpoint reachability check.
connect_timeout = "5s"
# The daemon retries a failed bootstrap after this delay, doubling up to retry_max_backoff.
retry_initial_backoff = "30s"
retry_max_backoff = "30m"

[bootstrap.ssm]
# Activation id from `aws ssm create-activation` (a lowercase UUID).
activation_id = ""
# File holding the activation code. A relative name is looked up in systemd's
# $CREDENTIALS_DIRECTORY first (LoadCredential=ssm-activation-code:/etc/edgeflow/ssm-activation-code).
activation_code_file = "ssm-activation-code"
# Or: an SSM Parameter Store name (SecureString) holding the code, where bootstrap credentials exist.
# activation_code_parameter = "/edgeflow/nodes/plant-1/activation-code"

# [bootstrap.iam_ra]
# trust_anchor_arn = "arn:aws:rolesanywhere:eu-west-1:111122223333:trust-anchor/…"
# profile_arn = "arn:aws:rolesanywhere:eu-west-1:111122223333:profile/…"
# role_arn = "arn:aws:iam::111122223333:role/EKSHybridNodesRole"
# node_name = "plant-1-node-1"
# certificate_path = "/etc/iam/pki/server.pem"
# private_key_path = "/etc/iam/pki/server.key"
"#;

/// Default `nodeadm_path`.
pub const DEFAULT_NODEADM_PATH: &str = "/usr/local/bin/nodeadm";
/// Default `install_timeout` (nodeadm's own install timeout is 20 minutes).
pub const DEFAULT_INSTALL_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Default `init_timeout`.
pub const DEFAULT_INIT_TIMEOUT: Duration = Duration::from_secs(15 * 60);
/// Default `verify_timeout`.
pub const DEFAULT_VERIFY_TIMEOUT: Duration = Duration::from_secs(5 * 60);
/// Default `connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `retry_initial_backoff`.
pub const DEFAULT_RETRY_INITIAL_BACKOFF: Duration = Duration::from_secs(30);
/// Default `retry_max_backoff`.
pub const DEFAULT_RETRY_MAX_BACKOFF: Duration = Duration::from_secs(30 * 60);
/// Default `[bootstrap.ssm] activation_code_file`: the systemd credential name.
pub const DEFAULT_ACTIVATION_CODE_FILE: &str = "ssm-activation-code";

/// `[bootstrap]` as written in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BootstrapConfig {
    /// Run the bootstrap at all. Off by default.
    pub enabled: bool,
    /// Name of the EKS cluster to join (NodeConfig `spec.cluster.name`).
    pub cluster_name: String,
    /// AWS region of the cluster (NodeConfig `spec.cluster.region`).
    pub region: String,
    /// Kubernetes version for `nodeadm install`, `major.minor[.patch]`.
    pub kubernetes_version: String,
    /// Which credential provider nodeadm installs and configures.
    pub credential_provider: CredentialProvider,
    /// Path of the hybrid-nodes `nodeadm` binary.
    pub nodeadm_path: PathBuf,
    /// The node's IPv4 address (becomes kubelet `--node-ip=`); empty lets kubelet choose.
    pub node_ip: String,
    /// The cluster's remote node networks; the node IP must be inside one of them.
    pub remote_node_cidrs: Vec<String>,
    /// Extra kubelet flags (NodeConfig `spec.kubelet.flags`).
    pub kubelet_flags: Vec<String>,
    /// Preflight checks to skip: a list of names, or `"all"`.
    pub skip_checks: SkipChecksConfig,
    /// Time limit for `nodeadm install`.
    pub install_timeout: Duration,
    /// Time limit for `nodeadm init`.
    pub init_timeout: Duration,
    /// Time limit for `nodeadm debug`.
    pub verify_timeout: Duration,
    /// Time limit of each TCP connection in the `endpoints` check.
    pub connect_timeout: Duration,
    /// First delay before the daemon retries a failed bootstrap.
    pub retry_initial_backoff: Duration,
    /// Longest delay between two retries.
    pub retry_max_backoff: Duration,
    /// `[bootstrap.ssm]`: the SSM hybrid activation, for `credential_provider = "ssm"`.
    pub ssm: Option<SsmConfig>,
    /// `[bootstrap.iam_ra]`: IAM Roles Anywhere, for `credential_provider = "iam-ra"`.
    pub iam_ra: Option<IamRaConfig>,
}

impl Default for BootstrapConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            cluster_name: String::new(),
            region: String::new(),
            kubernetes_version: String::new(),
            credential_provider: CredentialProvider::Ssm,
            nodeadm_path: PathBuf::from(DEFAULT_NODEADM_PATH),
            node_ip: String::new(),
            remote_node_cidrs: Vec::new(),
            kubelet_flags: Vec::new(),
            skip_checks: SkipChecksConfig::default(),
            install_timeout: DEFAULT_INSTALL_TIMEOUT,
            init_timeout: DEFAULT_INIT_TIMEOUT,
            verify_timeout: DEFAULT_VERIFY_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            retry_initial_backoff: DEFAULT_RETRY_INITIAL_BACKOFF,
            retry_max_backoff: DEFAULT_RETRY_MAX_BACKOFF,
            ssm: None,
            iam_ra: None,
        }
    }
}

/// `[bootstrap.ssm]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SsmConfig {
    /// Activation id from `aws ssm create-activation` (a lowercase UUID). Not secret.
    #[serde(default)]
    pub activation_id: String,
    /// File holding the activation code; relative names are looked up in
    /// `$CREDENTIALS_DIRECTORY` (systemd `LoadCredential=`) first.
    #[serde(default)]
    pub activation_code_file: Option<PathBuf>,
    /// SSM Parameter Store name holding the code (read with decryption), instead of a file.
    #[serde(default)]
    pub activation_code_parameter: Option<String>,
    /// Endpoint URL for the Parameter Store client only (a VPC endpoint, or a local server in tests).
    #[serde(default)]
    pub endpoint_url: Option<String>,
}

/// `[bootstrap.iam_ra]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IamRaConfig {
    /// ARN of the IAM Roles Anywhere trust anchor.
    pub trust_anchor_arn: String,
    /// ARN of the IAM Roles Anywhere profile.
    pub profile_arn: String,
    /// ARN of the Hybrid Nodes IAM role.
    pub role_arn: String,
    /// Name the node takes in the cluster (at most 64 characters; must match the certificate's CN).
    pub node_name: String,
    /// Path of the node's certificate.
    pub certificate_path: PathBuf,
    /// Path of the certificate's private key.
    pub private_key_path: PathBuf,
}

/// The credential provider nodeadm installs (`--credential-provider`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
pub enum CredentialProvider {
    /// AWS Systems Manager hybrid activation.
    #[serde(rename = "ssm")]
    Ssm,
    /// AWS IAM Roles Anywhere.
    #[serde(rename = "iam-ra")]
    IamRa,
}

impl CredentialProvider {
    /// The value nodeadm expects after `--credential-provider`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ssm => "ssm",
            Self::IamRa => "iam-ra",
        }
    }
}

impl std::fmt::Display for CredentialProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `skip_checks` as written: `"all"` or a list of check names.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SkipChecksConfig {
    /// A single word; only `"all"` is valid.
    Word(String),
    /// Check names.
    List(Vec<String>),
}

impl Default for SkipChecksConfig {
    fn default() -> Self {
        Self::List(Vec::new())
    }
}

/// Which preflight checks to skip.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SkipChecks {
    /// Run every check.
    #[default]
    None,
    /// Skip the named checks.
    Some(Vec<CheckName>),
    /// Skip every check.
    All,
}

impl SkipChecks {
    /// Whether `check` is skipped.
    pub fn skips(&self, check: CheckName) -> bool {
        match self {
            Self::None => false,
            Self::Some(names) => names.contains(&check),
            Self::All => true,
        }
    }
}

/// Validated `[bootstrap]`, with real types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapSettings {
    /// EKS cluster name.
    pub cluster_name: String,
    /// AWS region.
    pub region: String,
    /// Kubernetes version for `nodeadm install`.
    pub kubernetes_version: String,
    /// Credentials and their provider.
    pub credentials: CredentialSettings,
    /// The nodeadm binary.
    pub nodeadm_path: PathBuf,
    /// The node's IP, if pinned.
    pub node_ip: Option<Ipv4Addr>,
    /// Remote node networks.
    pub remote_node_cidrs: Vec<Ipv4Net>,
    /// Extra kubelet flags (without `--node-ip`, which comes from `node_ip`).
    pub kubelet_flags: Vec<String>,
    /// Skipped preflight checks.
    pub skip_checks: SkipChecks,
    /// Step and check time limits.
    pub timeouts: Timeouts,
    /// Retry delays for the daemon.
    pub backoff: Backoff,
}

impl BootstrapSettings {
    /// The credential provider.
    pub fn credential_provider(&self) -> CredentialProvider {
        match self.credentials {
            CredentialSettings::Ssm { .. } => CredentialProvider::Ssm,
            CredentialSettings::IamRolesAnywhere(_) => CredentialProvider::IamRa,
        }
    }
}

/// Time limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// `nodeadm install`.
    pub install: std::time::Duration,
    /// `nodeadm init`.
    pub init: std::time::Duration,
    /// `nodeadm debug`.
    pub verify: std::time::Duration,
    /// Each TCP connection of the `endpoints` check.
    pub connect: std::time::Duration,
}

/// Retry delays: `initial`, doubling up to `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// First delay.
    pub initial: std::time::Duration,
    /// Longest delay.
    pub max: std::time::Duration,
}

impl Backoff {
    /// The delay before retry number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> std::time::Duration {
        let factor = 2u32.saturating_pow(attempt.saturating_sub(1).min(20));
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// How the node gets its AWS credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSettings {
    /// SSM hybrid activation.
    Ssm {
        /// The activation id (lowercase UUID).
        activation_id: String,
        /// Where the activation code comes from.
        code: ActivationCodeSource,
    },
    /// IAM Roles Anywhere.
    IamRolesAnywhere(IamRaSettings),
}

/// Validated `[bootstrap.iam_ra]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IamRaSettings {
    /// Trust anchor ARN.
    pub trust_anchor_arn: String,
    /// Profile ARN.
    pub profile_arn: String,
    /// Role ARN.
    pub role_arn: String,
    /// Node name.
    pub node_name: String,
    /// Certificate path on the host.
    pub certificate_path: PathBuf,
    /// Private key path on the host.
    pub private_key_path: PathBuf,
}

impl BootstrapConfig {
    /// Checks every field; `Ok(None)` when the bootstrap is disabled (then nothing else is
    /// checked, so an untouched default section is valid).
    pub fn validate(&self) -> Result<Option<BootstrapSettings>, Invalid> {
        if !self.enabled {
            return Ok(None);
        }
        let cluster_name = validate_cluster_name(&self.cluster_name)?;
        let region = validate_region(&self.region)?;
        let kubernetes_version = validate_kubernetes_version(&self.kubernetes_version)?;
        let credentials = self.validate_credentials()?;
        if !self.nodeadm_path.is_absolute() {
            return Err(Invalid::new(
                "bootstrap.nodeadm_path",
                "must be an absolute path, e.g. \"/usr/local/bin/nodeadm\"",
            ));
        }
        let node_ip = match self.node_ip.trim() {
            "" => None,
            text => Some(text.parse::<Ipv4Addr>().map_err(|_| {
                Invalid::new(
                    "bootstrap.node_ip",
                    format!("`{text}` is not an IPv4 address (hybrid nodes are IPv4 only)"),
                )
            })?),
        };
        let remote_node_cidrs = validate_cidrs(&self.remote_node_cidrs)?;
        if let Some(ip) = node_ip
            && !remote_node_cidrs.iter().any(|net| net.contains(&ip))
        {
            return Err(Invalid::new(
                "bootstrap.node_ip",
                format!("{ip} is not inside any of remote_node_cidrs ({})", list(&remote_node_cidrs)),
            ));
        }
        let kubelet_flags = validate_kubelet_flags(&self.kubelet_flags)?;
        let skip_checks = validate_skip_checks(&self.skip_checks)?;
        let timeouts = Timeouts {
            install: positive("bootstrap.install_timeout", self.install_timeout)?,
            init: positive("bootstrap.init_timeout", self.init_timeout)?,
            verify: positive("bootstrap.verify_timeout", self.verify_timeout)?,
            connect: positive("bootstrap.connect_timeout", self.connect_timeout)?,
        };
        let backoff = Backoff {
            initial: positive("bootstrap.retry_initial_backoff", self.retry_initial_backoff)?,
            max: positive("bootstrap.retry_max_backoff", self.retry_max_backoff)?,
        };
        if backoff.max < backoff.initial {
            return Err(Invalid::new("bootstrap.retry_max_backoff", "must not be shorter than retry_initial_backoff"));
        }
        Ok(Some(BootstrapSettings {
            cluster_name,
            region,
            kubernetes_version,
            credentials,
            nodeadm_path: self.nodeadm_path.clone(),
            node_ip,
            remote_node_cidrs,
            kubelet_flags,
            skip_checks,
            timeouts,
            backoff,
        }))
    }

    fn validate_credentials(&self) -> Result<CredentialSettings, Invalid> {
        match self.credential_provider {
            CredentialProvider::Ssm => {
                if self.iam_ra.is_some() {
                    return Err(Invalid::new(
                        "bootstrap.iam_ra",
                        "is set but credential_provider is \"ssm\"; nodeadm takes exactly one of SSM or IAM Roles Anywhere",
                    ));
                }
                let ssm = self.ssm.as_ref().ok_or_else(|| {
                    Invalid::new(
                        "bootstrap.ssm",
                        "is required when credential_provider = \"ssm\" (activation_id and the code's source)",
                    )
                })?;
                activation::check_activation_id(&ssm.activation_id)
                    .map_err(|problem| Invalid::new("bootstrap.ssm.activation_id", problem))?;
                let code = match (&ssm.activation_code_file, &ssm.activation_code_parameter) {
                    (Some(_), Some(_)) => {
                        return Err(Invalid::new(
                            "bootstrap.ssm.activation_code_parameter",
                            "set either activation_code_file or activation_code_parameter, not both",
                        ));
                    }
                    (Some(file), None) if file.as_os_str().is_empty() => {
                        return Err(Invalid::new("bootstrap.ssm.activation_code_file", "must not be empty"));
                    }
                    (Some(file), None) => ActivationCodeSource::File(file.clone()),
                    (None, Some(name)) => {
                        activation::check_parameter_name(name)
                            .map_err(|problem| Invalid::new("bootstrap.ssm.activation_code_parameter", problem))?;
                        ActivationCodeSource::Parameter {
                            name: name.clone(),
                            endpoint_url: validate_endpoint_url(ssm.endpoint_url.as_deref())?,
                        }
                    }
                    (None, None) => ActivationCodeSource::File(PathBuf::from(DEFAULT_ACTIVATION_CODE_FILE)),
                };
                if ssm.endpoint_url.is_some() && !matches!(code, ActivationCodeSource::Parameter { .. }) {
                    return Err(Invalid::new(
                        "bootstrap.ssm.endpoint_url",
                        "is only used to read activation_code_parameter; remove it or set the parameter",
                    ));
                }
                Ok(CredentialSettings::Ssm { activation_id: ssm.activation_id.clone(), code })
            }
            CredentialProvider::IamRa => {
                if self.ssm.is_some() {
                    return Err(Invalid::new(
                        "bootstrap.ssm",
                        "is set but credential_provider is \"iam-ra\"; nodeadm takes exactly one of SSM or IAM Roles Anywhere",
                    ));
                }
                let ra = self.iam_ra.as_ref().ok_or_else(|| {
                    Invalid::new("bootstrap.iam_ra", "is required when credential_provider = \"iam-ra\"")
                })?;
                check_arn("bootstrap.iam_ra.trust_anchor_arn", &ra.trust_anchor_arn, "rolesanywhere", "trust-anchor/")?;
                check_arn("bootstrap.iam_ra.profile_arn", &ra.profile_arn, "rolesanywhere", "profile/")?;
                check_arn("bootstrap.iam_ra.role_arn", &ra.role_arn, "iam", "role/")?;
                if ra.node_name.is_empty() {
                    return Err(Invalid::new("bootstrap.iam_ra.node_name", "must not be empty (nodeadm requires it)"));
                }
                if ra.node_name.len() > 64 {
                    return Err(Invalid::new(
                        "bootstrap.iam_ra.node_name",
                        "must be at most 64 characters (nodeadm's limit)",
                    ));
                }
                for (field, path) in [
                    ("bootstrap.iam_ra.certificate_path", &ra.certificate_path),
                    ("bootstrap.iam_ra.private_key_path", &ra.private_key_path),
                ] {
                    if !path.is_absolute() {
                        return Err(Invalid::new(field, "must be an absolute path"));
                    }
                }
                Ok(CredentialSettings::IamRolesAnywhere(IamRaSettings {
                    trust_anchor_arn: ra.trust_anchor_arn.clone(),
                    profile_arn: ra.profile_arn.clone(),
                    role_arn: ra.role_arn.clone(),
                    node_name: ra.node_name.clone(),
                    certificate_path: ra.certificate_path.clone(),
                    private_key_path: ra.private_key_path.clone(),
                }))
            }
        }
    }
}

fn list(nets: &[Ipv4Net]) -> String {
    nets.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ")
}

fn positive(field: &str, d: Duration) -> Result<std::time::Duration, Invalid> {
    if d.get().is_zero() {
        return Err(Invalid::new(field, "must be longer than zero"));
    }
    Ok(d.get())
}

/// EKS cluster names: 1–100 characters, letters, digits, `-` and `_`, starting with a letter or digit.
fn validate_cluster_name(name: &str) -> Result<String, Invalid> {
    let field = "bootstrap.cluster_name";
    if name.is_empty() {
        return Err(Invalid::new(field, "is required when the bootstrap is enabled"));
    }
    let valid_chars = name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    let valid_start = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if name.len() > 100 || !valid_chars || !valid_start {
        return Err(Invalid::new(
            field,
            format!(
                "`{name}` is not an EKS cluster name (1–100 letters, digits, `-`, `_`, starting with a letter or digit)"
            ),
        ));
    }
    Ok(name.to_owned())
}

/// AWS region names like `eu-west-1`, `us-gov-west-1`, `cn-north-1`.
fn validate_region(region: &str) -> Result<String, Invalid> {
    let field = "bootstrap.region";
    if region.is_empty() {
        return Err(Invalid::new(field, "is required when the bootstrap is enabled"));
    }
    let parts: Vec<&str> = region.split('-').collect();
    let valid = parts.len() >= 3
        && parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()))
        && parts.last().is_some_and(|p| p.chars().all(|c| c.is_ascii_digit()));
    if !valid {
        return Err(Invalid::new(field, format!("`{region}` is not an AWS region like \"eu-west-1\"")));
    }
    Ok(region.to_owned())
}

/// `major.minor[.patch]`, as `nodeadm install` takes it (the minor is what selects artifacts).
fn validate_kubernetes_version(version: &str) -> Result<String, Invalid> {
    let field = "bootstrap.kubernetes_version";
    if version.is_empty() {
        return Err(Invalid::new(
            field,
            "is required when the bootstrap is enabled (the cluster's version, e.g. \"1.31\")",
        ));
    }
    let parts: Vec<&str> = version.split('.').collect();
    let numeric = parts.iter().all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    if !(2..=3).contains(&parts.len()) || !numeric {
        return Err(Invalid::new(field, format!("`{version}` is not a Kubernetes version like \"1.31\"")));
    }
    Ok(version.to_owned())
}

/// Remote node networks: IPv4 CIDRs inside RFC 1918, as EKS requires for hybrid nodes.
fn validate_cidrs(cidrs: &[String]) -> Result<Vec<Ipv4Net>, Invalid> {
    let field = "bootstrap.remote_node_cidrs";
    if cidrs.is_empty() {
        return Err(Invalid::new(field, "must list the cluster's remote node networks, e.g. [\"10.80.0.0/16\"]"));
    }
    let private: [Ipv4Net; 3] = [
        Ipv4Net::new_assert(Ipv4Addr::new(10, 0, 0, 0), 8),
        Ipv4Net::new_assert(Ipv4Addr::new(172, 16, 0, 0), 12),
        Ipv4Net::new_assert(Ipv4Addr::new(192, 168, 0, 0), 16),
    ];
    cidrs
        .iter()
        .map(|text| {
            let net: Ipv4Net = text
                .trim()
                .parse()
                .map_err(|_| Invalid::new(field, format!("`{text}` is not an IPv4 CIDR like \"10.80.0.0/16\"")))?;
            if !private.iter().any(|p| p.contains(&net)) {
                return Err(Invalid::new(
                    field,
                    format!("{net} is outside RFC 1918 (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16), which EKS requires for hybrid nodes"),
                ));
            }
            Ok(net)
        })
        .collect()
}

/// Kubelet flags as nodeadm takes them. `--hostname-override` is rejected by nodeadm for hybrid
/// nodes; `--node-ip` comes from `node_ip` so it is validated against the CIDRs.
fn validate_kubelet_flags(flags: &[String]) -> Result<Vec<String>, Invalid> {
    let field = "bootstrap.kubelet_flags";
    for flag in flags {
        if !flag.starts_with("--") || flag.len() < 3 {
            return Err(Invalid::new(field, format!("`{flag}` is not a kubelet flag like \"--node-labels=a=b\"")));
        }
        let name = flag[2..].split('=').next().unwrap_or_default();
        if name == "hostname-override" {
            return Err(Invalid::new(
                field,
                "nodeadm rejects --hostname-override for hybrid nodes (the node name comes from the SSM managed \
                 instance id or the IAM Roles Anywhere node_name); to pin the node's address set `node_ip`, \
                 which is passed to kubelet as --node-ip=",
            ));
        }
        if name == "node-ip" {
            return Err(Invalid::new(
                field,
                "set `node_ip` instead of --node-ip (it becomes --node-ip= and is checked against remote_node_cidrs)",
            ));
        }
    }
    Ok(flags.to_vec())
}

fn validate_skip_checks(skip: &SkipChecksConfig) -> Result<SkipChecks, Invalid> {
    let field = "bootstrap.skip_checks";
    let names: Vec<&str> = match skip {
        SkipChecksConfig::Word(word) if word == "all" => return Ok(SkipChecks::All),
        SkipChecksConfig::Word(word) => {
            return Err(Invalid::new(field, format!("`{word}` is neither \"all\" nor a list of check names")));
        }
        SkipChecksConfig::List(names) => names.iter().map(String::as_str).collect(),
    };
    if names.contains(&"all") {
        return Ok(SkipChecks::All);
    }
    if names.is_empty() {
        return Ok(SkipChecks::None);
    }
    let checks = names
        .iter()
        .map(|name| {
            CheckName::from_name(name).ok_or_else(|| {
                Invalid::new(
                    field,
                    format!(
                        "`{name}` is not a check; known checks: {}",
                        CheckName::ALL.map(CheckName::as_str).join(", ")
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(SkipChecks::Some(checks))
}

fn validate_endpoint_url(url: Option<&str>) -> Result<Option<String>, Invalid> {
    match url {
        None => Ok(None),
        Some(u) if u.starts_with("https://") || u.starts_with("http://") => Ok(Some(u.to_owned())),
        Some(u) => Err(Invalid::new("bootstrap.ssm.endpoint_url", format!("`{u}` is not an http(s) URL"))),
    }
}

/// `arn:<partition>:<service>:<region>:<account>:<resource>` with the expected service and
/// resource prefix.
fn check_arn(field: &str, arn: &str, service: &str, resource_prefix: &str) -> Result<(), Invalid> {
    let parts: Vec<&str> = arn.splitn(6, ':').collect();
    let valid = parts.len() == 6
        && parts[0] == "arn"
        && parts[1].starts_with("aws")
        && parts[2] == service
        && parts[4].len() == 12
        && parts[4].chars().all(|c| c.is_ascii_digit())
        && parts[5].starts_with(resource_prefix)
        && parts[5].len() > resource_prefix.len();
    if !valid {
        return Err(Invalid::new(
            field,
            format!("`{arn}` is not an ARN like arn:aws:{service}:…:111122223333:{resource_prefix}…"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct File {
        #[serde(default)]
        bootstrap: BootstrapConfig,
    }

    fn parse(text: &str) -> BootstrapConfig {
        edgeflow_runtime::config::parse::<File>(text).expect("parses").bootstrap
    }

    const ENABLED: &str = r#"
[bootstrap]
enabled = true
cluster_name = "edge-1"
region = "eu-west-1"
kubernetes_version = "1.31"
node_ip = "10.80.0.5"
remote_node_cidrs = ["10.80.0.0/16"]
kubelet_flags = ["--node-labels=site=plant-1"]
skip_checks = ["endpoints"]
[bootstrap.ssm]
activation_id = "0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e"
activation_code_file = "/etc/edgeflow/ssm-activation-code"
"#;

    #[test]
    fn default_block_parses_and_is_disabled() {
        let config = parse(DEFAULT_CONFIG);
        assert!(!config.enabled);
        assert_eq!(config.validate(), Ok(None));
        // Every field of the default block has the named default's value.
        let defaults = BootstrapConfig {
            ssm: Some(SsmConfig {
                activation_id: String::new(),
                activation_code_file: Some(PathBuf::from(DEFAULT_ACTIVATION_CODE_FILE)),
                activation_code_parameter: None,
                endpoint_url: None,
            }),
            ..BootstrapConfig::default()
        };
        assert_eq!(config, defaults);
        // A missing section is the same as a disabled one.
        assert_eq!(parse("").validate(), Ok(None));
    }

    #[test]
    fn valid_section_becomes_typed_settings() {
        let settings = parse(ENABLED).validate().expect("valid").expect("enabled");
        assert_eq!(settings.node_ip, Some(Ipv4Addr::new(10, 80, 0, 5)));
        assert_eq!(settings.remote_node_cidrs, vec!["10.80.0.0/16".parse::<Ipv4Net>().expect("cidr")]);
        assert_eq!(settings.skip_checks, SkipChecks::Some(vec![CheckName::Endpoints]));
        assert_eq!(settings.timeouts.install, std::time::Duration::from_secs(1800));
        assert_eq!(settings.credential_provider(), CredentialProvider::Ssm);
        assert!(matches!(
            settings.credentials,
            CredentialSettings::Ssm { code: ActivationCodeSource::File(ref p), .. } if p.ends_with("ssm-activation-code")
        ));
    }

    fn error_for(edit: impl FnOnce(&mut BootstrapConfig)) -> Invalid {
        let mut config = parse(ENABLED);
        edit(&mut config);
        config.validate().expect_err("invalid")
    }

    #[test]
    fn errors_name_the_field() {
        type Edit = Box<dyn FnOnce(&mut BootstrapConfig)>;
        let cases: Vec<(&str, Edit)> = vec![
            ("bootstrap.cluster_name", Box::new(|c| c.cluster_name = "-bad name".into())),
            ("bootstrap.region", Box::new(|c| c.region = "Europe".into())),
            ("bootstrap.kubernetes_version", Box::new(|c| c.kubernetes_version = "latest".into())),
            ("bootstrap.node_ip", Box::new(|c| c.node_ip = "fe80::1".into())),
            ("bootstrap.node_ip", Box::new(|c| c.node_ip = "10.81.0.5".into())),
            ("bootstrap.remote_node_cidrs", Box::new(|c| c.remote_node_cidrs = vec!["8.8.8.0/24".into()])),
            ("bootstrap.remote_node_cidrs", Box::new(|c| c.remote_node_cidrs = vec![])),
            ("bootstrap.kubelet_flags", Box::new(|c| c.kubelet_flags = vec!["--hostname-override=x".into()])),
            ("bootstrap.kubelet_flags", Box::new(|c| c.kubelet_flags = vec!["--node-ip=10.80.0.9".into()])),
            ("bootstrap.skip_checks", Box::new(|c| c.skip_checks = SkipChecksConfig::List(vec!["swapp".into()]))),
            ("bootstrap.skip_checks", Box::new(|c| c.skip_checks = SkipChecksConfig::Word("some".into()))),
            ("bootstrap.nodeadm_path", Box::new(|c| c.nodeadm_path = "nodeadm".into())),
            ("bootstrap.init_timeout", Box::new(|c| c.init_timeout = Duration::from_secs(0))),
            ("bootstrap.ssm", Box::new(|c| c.credential_provider = CredentialProvider::IamRa)),
            (
                "bootstrap.ssm.activation_id",
                Box::new(|c| {
                    c.ssm.as_mut().expect("ssm").activation_id = "0B3C1B2E-9D0F-4A51-8C1E-3F2A4B5C6D7E".into()
                }),
            ),
            (
                "bootstrap.ssm.activation_code_parameter",
                Box::new(|c| c.ssm.as_mut().expect("ssm").activation_code_parameter = Some("/x".into())),
            ),
            ("bootstrap.ssm", Box::new(|c| c.ssm = None)),
        ];
        for (field, edit) in cases {
            let err = error_for(edit);
            assert_eq!(err.field, field, "{err}");
        }
        let err = error_for(|c| c.kubelet_flags = vec!["--hostname-override=edge".into()]);
        assert!(err.problem.contains("--node-ip="), "{err}");
    }

    #[test]
    fn skip_checks_accepts_all_as_word_or_list() {
        let mut config = parse(ENABLED);
        config.skip_checks = SkipChecksConfig::Word("all".into());
        assert_eq!(config.validate().expect("valid").expect("enabled").skip_checks, SkipChecks::All);
        config.skip_checks = SkipChecksConfig::List(vec!["all".into()]);
        assert_eq!(config.validate().expect("valid").expect("enabled").skip_checks, SkipChecks::All);
        let parsed = parse("[bootstrap]\nskip_checks = \"all\"\n");
        assert_eq!(parsed.skip_checks, SkipChecksConfig::Word("all".into()));
    }

    #[test]
    fn iam_roles_anywhere_section_validates() {
        let text = r#"
[bootstrap]
enabled = true
cluster_name = "edge-1"
region = "eu-west-1"
kubernetes_version = "1.31"
credential_provider = "iam-ra"
remote_node_cidrs = ["192.168.10.0/24"]
[bootstrap.iam_ra]
trust_anchor_arn = "arn:aws:rolesanywhere:eu-west-1:111122223333:trust-anchor/abc"
profile_arn = "arn:aws:rolesanywhere:eu-west-1:111122223333:profile/def"
role_arn = "arn:aws:iam::111122223333:role/EKSHybridNodesRole"
node_name = "plant-1"
certificate_path = "/etc/iam/pki/server.pem"
private_key_path = "/etc/iam/pki/server.key"
"#;
        let settings = parse(text).validate().expect("valid").expect("enabled");
        assert_eq!(settings.credential_provider(), CredentialProvider::IamRa);
        let mut bad = parse(text);
        bad.iam_ra.as_mut().expect("iam_ra").role_arn = "arn:aws:iam::1:role/x".into();
        assert_eq!(bad.validate().expect_err("bad arn").field, "bootstrap.iam_ra.role_arn");
        let mut long = parse(text);
        long.iam_ra.as_mut().expect("iam_ra").node_name = "n".repeat(65);
        assert_eq!(long.validate().expect_err("long").field, "bootstrap.iam_ra.node_name");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = edgeflow_runtime::config::parse::<File>("[bootstrap]\nclustername = \"x\"\n").expect_err("unknown");
        assert!(err.contains("clustername"), "{err}");
        let err =
            edgeflow_runtime::config::parse::<File>("[bootstrap.ssm]\nactivation_code = \"x\"\n").expect_err("unknown");
        assert!(err.contains("activation_code"), "{err}");
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let b = Backoff { initial: std::time::Duration::from_secs(30), max: std::time::Duration::from_secs(100) };
        assert_eq!(b.delay(1).as_secs(), 30);
        assert_eq!(b.delay(2).as_secs(), 60);
        assert_eq!(b.delay(3).as_secs(), 100);
        assert_eq!(b.delay(u32::MAX).as_secs(), 100);
    }
}
