//! Host checks run before anything is changed.
//!
//! Each check has a stable snake_case name (used by `skip_checks`), a result, a one-line detail
//! and, when it fails, a remedy an operator can act on. The checks read host files under a
//! configurable root (`/` in production, a temporary directory in tests) and ask everything else
//! (user id, clock, interfaces, TCP) through the [`Probe`] trait, so tests can fake the host.
//!
//! A failed check stops the bootstrap before the NodeConfig or the state file is written and
//! before nodeadm runs. Failures that can clear up by themselves (clock not yet synchronised,
//! endpoints unreachable, interface not up yet, activation code not delivered yet) are
//! retryable; the rest need an operator.

use std::fmt;
use std::io::BufRead as _;
use std::net::{IpAddr, Ipv4Addr, TcpStream, ToSocketAddrs as _};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use edgeflow_runtime::config::Secret;

use crate::activation::{ActivationError, check_activation_code, check_activation_id};
use crate::config::{BootstrapSettings, CredentialProvider, CredentialSettings};
use crate::host_path;
use crate::reset::reset_commands;

/// nodeadm's SSM registration file.
pub const SSM_REGISTRATION: &str = "/var/lib/amazon/ssm/registration";
/// nodeadm's install tracker; `init` silently does nothing without it.
pub const NODEADM_TRACKER: &str = "/opt/nodeadm/tracker";
/// Kubelet's kubeconfig written by `nodeadm init`.
pub const KUBELET_KUBECONFIG: &str = "/var/lib/kubelet/kubeconfig";
/// Kubelet's client certificates.
pub const KUBELET_PKI: &str = "/var/lib/kubelet/pki";

/// The name of a preflight check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CheckName {
    /// The agent runs as root (nodeadm requires it).
    Root,
    /// `nodeadm_path` is an executable file.
    NodeadmBinary,
    /// The OS is one EKS Hybrid Nodes supports.
    SupportedOs,
    /// No partition swap (nodeadm can only turn off swap files).
    Swap,
    /// The clock is synchronised.
    TimeSync,
    /// The node IP is inside the remote node networks and on an interface.
    NodeIp,
    /// The endpoints nodeadm and the node need answer on TCP 443.
    Endpoints,
    /// No SSM registration or kubelet state left by an earlier registration.
    PreviousRegistration,
    /// The activation id and code (or IAM Roles Anywhere files) are in the formats nodeadm needs.
    Credentials,
}

impl CheckName {
    /// Every check, in the order they run.
    pub const ALL: [CheckName; 9] = [
        Self::Root,
        Self::NodeadmBinary,
        Self::SupportedOs,
        Self::Swap,
        Self::TimeSync,
        Self::NodeIp,
        Self::Endpoints,
        Self::PreviousRegistration,
        Self::Credentials,
    ];

    /// The stable name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::NodeadmBinary => "nodeadm_binary",
            Self::SupportedOs => "supported_os",
            Self::Swap => "swap",
            Self::TimeSync => "time_sync",
            Self::NodeIp => "node_ip",
            Self::Endpoints => "endpoints",
            Self::PreviousRegistration => "previous_registration",
            Self::Credentials => "credentials",
        }
    }

    /// Parses a stable name.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == name)
    }
}

impl fmt::Display for CheckName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A check's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckStatus {
    /// It passed.
    Passed,
    /// It failed; the bootstrap stops.
    Failed,
    /// `skip_checks` named it.
    Skipped,
}

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    /// Which check.
    pub name: CheckName,
    /// Its result.
    pub status: CheckStatus,
    /// What was found, in one line.
    pub detail: String,
    /// What to do about a failure.
    pub remedy: Option<String>,
    /// Whether the failure may clear up without an operator (so the daemon retries).
    pub retryable: bool,
}

impl CheckResult {
    fn pass(name: CheckName, detail: impl Into<String>) -> Self {
        Self { name, status: CheckStatus::Passed, detail: detail.into(), remedy: None, retryable: false }
    }

    fn fail(name: CheckName, detail: impl Into<String>, remedy: impl Into<String>, retryable: bool) -> Self {
        Self { name, status: CheckStatus::Failed, detail: detail.into(), remedy: Some(remedy.into()), retryable }
    }

    fn skipped(name: CheckName) -> Self {
        Self {
            name,
            status: CheckStatus::Skipped,
            detail: "skipped (bootstrap.skip_checks)".into(),
            remedy: None,
            retryable: false,
        }
    }
}

/// Every check's outcome, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PreflightReport {
    /// The results.
    pub results: Vec<CheckResult>,
}

impl PreflightReport {
    /// Whether no check failed.
    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The failed checks.
    pub fn failures(&self) -> impl Iterator<Item = &CheckResult> {
        self.results.iter().filter(|r| r.status == CheckStatus::Failed)
    }

    /// Whether every failure may clear up by itself.
    pub fn retryable(&self) -> bool {
        self.failures().all(|r| r.retryable)
    }

    /// The result of one check.
    pub fn get(&self, name: CheckName) -> Option<&CheckResult> {
        self.results.iter().find(|r| r.name == name)
    }

    /// `name: detail` of each failure, joined with `; `.
    pub fn summary(&self) -> String {
        self.failures().map(|r| format!("{}: {}", r.name, r.detail)).collect::<Vec<_>>().join("; ")
    }
}

impl fmt::Display for PreflightReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for r in &self.results {
            let mark = match r.status {
                CheckStatus::Passed => "[ok]  ",
                CheckStatus::Failed => "[FAIL]",
                CheckStatus::Skipped => "[skip]",
            };
            writeln!(f, "{mark} {}: {}", r.name, r.detail)?;
            if let Some(remedy) = &r.remedy {
                for line in remedy.lines() {
                    writeln!(f, "       {line}")?;
                }
            }
        }
        Ok(())
    }
}

/// What the checks ask the host, behind a trait so tests can fake it.
pub trait Probe: Send + Sync + fmt::Debug {
    /// The process's effective user id.
    fn effective_uid(&self) -> u32;
    /// Whether the system clock is synchronised (NTP); `Err` when it cannot be told.
    fn time_synchronized(&self) -> Result<bool, String>;
    /// The IPv4 addresses on the host's interfaces.
    fn interface_addresses(&self) -> Result<Vec<IpAddr>, String>;
    /// Opens (and closes) a TCP connection to `host:port` within `timeout`.
    fn connect(&self, host: &str, port: u16, timeout: Duration) -> Result<(), String>;
}

/// The real host: `geteuid`, `timedatectl`/`chronyc`, `/proc/net/fib_trie`, TCP.
#[derive(Debug, Clone)]
pub struct SystemProbe {
    root: PathBuf,
}

impl SystemProbe {
    /// Reads `/proc` under `root`.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }
}

impl Probe for SystemProbe {
    fn effective_uid(&self) -> u32 {
        rustix::process::geteuid().as_raw()
    }

    fn time_synchronized(&self) -> Result<bool, String> {
        // systemd's view covers timesyncd, chrony and ntpd alike; chronyc is the fallback on
        // hosts without systemd's timedated.
        if let Ok(out) =
            std::process::Command::new("timedatectl").args(["show", "-p", "NTPSynchronized", "--value"]).output()
            && out.status.success()
        {
            return Ok(String::from_utf8_lossy(&out.stdout).trim() == "yes");
        }
        if let Ok(out) = std::process::Command::new("chronyc").arg("tracking").output()
            && out.status.success()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            return Ok(text.lines().any(|l| l.starts_with("Leap status") && l.trim_end().ends_with("Normal")));
        }
        Err("neither `timedatectl show` nor `chronyc tracking` answered".into())
    }

    fn interface_addresses(&self) -> Result<Vec<IpAddr>, String> {
        let path = host_path(&self.root, Path::new("/proc/net/fib_trie"));
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Ok(parse_fib_trie(&text).into_iter().map(IpAddr::V4).collect())
    }

    fn connect(&self, host: &str, port: u16, timeout: Duration) -> Result<(), String> {
        let addrs: Vec<_> = (host, port).to_socket_addrs().map_err(|e| format!("cannot resolve: {e}"))?.collect();
        let mut last = String::from("no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, timeout) {
                Ok(_) => return Ok(()),
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        Err(last)
    }
}

/// Local IPv4 addresses from `/proc/net/fib_trie`: each `|-- a.b.c.d` leaf followed by a
/// `/32 host LOCAL` line, loopback excluded.
pub fn parse_fib_trie(text: &str) -> Vec<Ipv4Addr> {
    let mut found = Vec::new();
    let mut last: Option<Ipv4Addr> = None;
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(addr) = trimmed.strip_prefix("|-- ") {
            last = addr.parse().ok();
        } else if trimmed.starts_with("/32 host LOCAL")
            && let Some(ip) = last
            && !ip.is_loopback()
            && !found.contains(&ip)
        {
            found.push(ip);
        }
    }
    found
}

/// What the checks look at.
#[derive(Debug)]
pub struct PreflightInput<'a> {
    /// The settings.
    pub settings: &'a BootstrapSettings,
    /// Host files are read under this root.
    pub root: &'a Path,
    /// The agent's bootstrap directory (for the reset commands).
    pub state_dir: &'a Path,
    /// The host probe.
    pub probe: &'a dyn Probe,
    /// The activation code as read, for SSM.
    pub activation_code: Option<&'a Result<Secret, ActivationError>>,
    /// Whether a registration found on the host is this bootstrap's own (an interrupted or failed
    /// `init` with the same identity), not a leftover.
    pub registration_is_ours: bool,
}

/// Runs every check not skipped. Blocking: it reads files and opens TCP connections (run it on a
/// blocking thread).
pub fn run(input: &PreflightInput<'_>) -> PreflightReport {
    let results = CheckName::ALL
        .into_iter()
        .map(|name| {
            if input.settings.skip_checks.skips(name) {
                return CheckResult::skipped(name);
            }
            match name {
                CheckName::Root => check_root(input),
                CheckName::NodeadmBinary => check_nodeadm_binary(input),
                CheckName::SupportedOs => check_supported_os(input),
                CheckName::Swap => check_swap(input),
                CheckName::TimeSync => check_time_sync(input),
                CheckName::NodeIp => check_node_ip(input),
                CheckName::Endpoints => check_endpoints(input),
                CheckName::PreviousRegistration => check_previous_registration(input),
                CheckName::Credentials => check_credentials(input),
            }
        })
        .collect();
    PreflightReport { results }
}

fn check_root(input: &PreflightInput<'_>) -> CheckResult {
    match input.probe.effective_uid() {
        0 => CheckResult::pass(CheckName::Root, "running as root"),
        uid => CheckResult::fail(
            CheckName::Root,
            format!("running as uid {uid}; nodeadm installs packages and registers the host, so it must run as root"),
            "run edgeflow-agent as root (the packaged systemd unit does), e.g. `sudo edgeflow-agent bootstrap --config …`",
            false,
        ),
    }
}

fn check_nodeadm_binary(input: &PreflightInput<'_>) -> CheckResult {
    let path = &input.settings.nodeadm_path;
    let remedy = format!(
        "install the hybrid-nodes nodeadm: curl -OL https://hybrid-assets.eks.amazonaws.com/releases/latest/bin/linux/amd64/nodeadm \
         && sudo install -m 0755 nodeadm {} (arm64: …/linux/arm64/nodeadm), or set bootstrap.nodeadm_path",
        path.display()
    );
    match std::fs::metadata(path) {
        Ok(meta) if meta.is_file() && meta.permissions().mode() & 0o111 != 0 => {
            CheckResult::pass(CheckName::NodeadmBinary, format!("{} is executable", path.display()))
        }
        Ok(_) => CheckResult::fail(
            CheckName::NodeadmBinary,
            format!("{} is not an executable file", path.display()),
            remedy,
            false,
        ),
        Err(e) => CheckResult::fail(CheckName::NodeadmBinary, format!("{}: {e}", path.display()), remedy, false),
    }
}

/// The OS versions EKS Hybrid Nodes validates: Ubuntu 20.04/22.04/24.04, RHEL 8/9, Amazon Linux
/// 2023 (Bottlerocket joins without nodeadm).
fn supported(id: &str, version: &str) -> bool {
    match id {
        "ubuntu" => matches!(version, "20.04" | "22.04" | "24.04"),
        "rhel" => matches!(version.split('.').next(), Some("8" | "9")),
        "amzn" => version == "2023",
        _ => false,
    }
}

/// `KEY=value` pairs of an os-release file, quotes removed.
pub fn parse_os_release(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|line| line.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches(['"', '\'']).to_owned()))
        .collect()
}

fn check_supported_os(input: &PreflightInput<'_>) -> CheckResult {
    let remedy = "run the node on Ubuntu 20.04/22.04/24.04, RHEL 8/9 or Amazon Linux 2023 (the versions EKS Hybrid Nodes \
                  supports), or add \"supported_os\" to bootstrap.skip_checks to try anyway";
    let path = host_path(input.root, Path::new("/etc/os-release"));
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) => {
            return CheckResult::fail(
                CheckName::SupportedOs,
                format!("cannot read {}: {e}", path.display()),
                remedy,
                false,
            );
        }
    };
    let fields = parse_os_release(&text);
    let get = |key: &str| fields.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()).unwrap_or_default();
    let (id, version) = (get("ID"), get("VERSION_ID"));
    let pretty = match get("PRETTY_NAME") {
        "" => format!("{id} {version}"),
        p => p.to_owned(),
    };
    if supported(id, version) {
        CheckResult::pass(CheckName::SupportedOs, format!("{pretty} is supported"))
    } else {
        CheckResult::fail(
            CheckName::SupportedOs,
            format!("{pretty} (ID={id}, VERSION_ID={version}) is not an OS EKS Hybrid Nodes supports"),
            remedy,
            false,
        )
    }
}

fn check_swap(input: &PreflightInput<'_>) -> CheckResult {
    let path = host_path(input.root, Path::new("/proc/swaps"));
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return CheckResult::pass(CheckName::Swap, "no swap"),
        Err(e) => {
            return CheckResult::fail(
                CheckName::Swap,
                format!("cannot read {}: {e}", path.display()),
                "check /proc is mounted",
                false,
            );
        }
    };
    // Filename  Type  Size  Used  Priority; the first line is the header.
    let (mut partitions, mut files) = (Vec::new(), 0);
    for line in std::io::BufReader::new(file).lines().map_while(Result::ok).skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.get(1) {
            Some(&"partition") => partitions.push(fields[0].to_owned()),
            Some(_) => files += 1,
            None => {}
        }
    }
    if partitions.is_empty() {
        let detail =
            if files == 0 { "no swap".to_owned() } else { format!("{files} swap file(s); nodeadm turns them off") };
        return CheckResult::pass(CheckName::Swap, detail);
    }
    CheckResult::fail(
        CheckName::Swap,
        format!("partition swap is on ({}); nodeadm init can only turn off swap files", partitions.join(", ")),
        format!("sudo swapoff {} and remove the swap entries from /etc/fstab", partitions.join(" ")),
        false,
    )
}

fn check_time_sync(input: &PreflightInput<'_>) -> CheckResult {
    let remedy = "enable NTP (`sudo timedatectl set-ntp true`, or chrony) and make sure an NTP server is reachable; \
                  SSM and STS reject requests from a skewed clock";
    match input.probe.time_synchronized() {
        Ok(true) => CheckResult::pass(CheckName::TimeSync, "the clock is synchronised"),
        Ok(false) => CheckResult::fail(CheckName::TimeSync, "the clock is not synchronised", remedy, true),
        Err(e) => CheckResult::fail(
            CheckName::TimeSync,
            format!("cannot tell whether the clock is synchronised: {e}"),
            remedy,
            true,
        ),
    }
}

fn check_node_ip(input: &PreflightInput<'_>) -> CheckResult {
    let settings = input.settings;
    let cidrs = settings.remote_node_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    let addresses: Vec<Ipv4Addr> = match input.probe.interface_addresses() {
        Ok(list) => list
            .into_iter()
            .filter_map(|a| match a {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect(),
        Err(e) => {
            return CheckResult::fail(
                CheckName::NodeIp,
                format!("cannot list interface addresses: {e}"),
                "check /proc is mounted",
                true,
            );
        }
    };
    let shown = addresses.iter().map(ToString::to_string).collect::<Vec<_>>().join(", ");
    match settings.node_ip {
        Some(ip) if !settings.remote_node_cidrs.iter().any(|n| n.contains(&ip)) => CheckResult::fail(
            CheckName::NodeIp,
            format!("node_ip {ip} is outside the remote node networks ({cidrs})"),
            "set bootstrap.node_ip to this node's address inside the cluster's remote node networks",
            false,
        ),
        Some(ip) if !addresses.contains(&ip) => CheckResult::fail(
            CheckName::NodeIp,
            format!("node_ip {ip} is not on any interface (found: {shown})"),
            "set bootstrap.node_ip to one of this host's addresses, or bring the interface up",
            true,
        ),
        Some(ip) => CheckResult::pass(CheckName::NodeIp, format!("{ip} is on an interface and inside {cidrs}")),
        None => match addresses.iter().find(|a| settings.remote_node_cidrs.iter().any(|n| n.contains(*a))) {
            Some(ip) => CheckResult::pass(
                CheckName::NodeIp,
                format!("{ip} is inside {cidrs}; kubelet chooses the node IP, set bootstrap.node_ip to pin it"),
            ),
            None => CheckResult::fail(
                CheckName::NodeIp,
                format!("no interface address ({shown}) is inside the remote node networks ({cidrs})"),
                "give the node an address in the cluster's remote node networks, or fix bootstrap.remote_node_cidrs",
                true,
            ),
        },
    }
}

/// The endpoints nodeadm and the node's credential provider need, with why.
pub fn endpoints(settings: &BootstrapSettings) -> Vec<(String, &'static str)> {
    let region = &settings.region;
    let suffix = if region.starts_with("cn-") { "amazonaws.com.cn" } else { "amazonaws.com" };
    let mut list = vec![
        ("hybrid-assets.eks.amazonaws.com".to_owned(), "nodeadm artifacts (install)"),
        (format!("eks.{region}.{suffix}"), "EKS API (DescribeCluster)"),
        (format!("sts.{region}.{suffix}"), "STS (node authentication)"),
        (format!("api.ecr.{region}.{suffix}"), "ECR (image credential provider)"),
    ];
    match settings.credential_provider() {
        CredentialProvider::Ssm => {
            list.push((format!("ssm.{region}.{suffix}"), "SSM (registration, credentials)"));
            list.push((format!("amazon-ssm-{region}.s3.{region}.{suffix}"), "SSM agent downloads"));
            // `nodeadm install` without --region fetches the SSM installer from us-west-2.
            if region != "us-west-2" && suffix == "amazonaws.com" {
                list.push(("amazon-ssm-us-west-2.s3.us-west-2.amazonaws.com".to_owned(), "SSM installer (install)"));
            }
        }
        CredentialProvider::IamRa => {
            list.push((format!("rolesanywhere.{region}.{suffix}"), "IAM Roles Anywhere (credentials)"));
            list.push(("rolesanywhere.amazonaws.com".to_owned(), "IAM Roles Anywhere signing helper download"));
        }
    }
    list
}

fn check_endpoints(input: &PreflightInput<'_>) -> CheckResult {
    let list = endpoints(input.settings);
    let timeout = input.settings.timeouts.connect;
    let probe = input.probe;
    // One thread per endpoint: DNS resolution blocks, and a blackholed endpoint costs `timeout`.
    let failures: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = list
            .iter()
            .map(|(host, why)| {
                scope.spawn(move || probe.connect(host, 443, timeout).err().map(|e| format!("{host}:443 ({why}): {e}")))
            })
            .collect();
        handles
            .into_iter()
            .filter_map(|h| h.join().unwrap_or_else(|_| Some("the check thread panicked".into())))
            .collect()
    });
    if failures.is_empty() {
        return CheckResult::pass(CheckName::Endpoints, format!("{} endpoints answer on TCP 443", list.len()));
    }
    CheckResult::fail(
        CheckName::Endpoints,
        format!("unreachable: {}", failures.join("; ")),
        "allow outbound HTTPS from the node to these hosts (firewall, proxy, VPC endpoints with private DNS), \
         or add \"endpoints\" to bootstrap.skip_checks if the paths are known to work",
        true,
    )
}

fn check_previous_registration(input: &PreflightInput<'_>) -> CheckResult {
    let registration = host_path(input.root, Path::new(SSM_REGISTRATION));
    let kubeconfig = host_path(input.root, Path::new(KUBELET_KUBECONFIG));
    let pki = host_path(input.root, Path::new(KUBELET_PKI));
    let mut found = Vec::new();
    if registration.exists() {
        let id =
            read_registration(&registration).map(|(id, region)| format!(" ({id} in {region})")).unwrap_or_default();
        found.push(format!("SSM registration {SSM_REGISTRATION}{id}"));
    }
    if kubeconfig.exists() {
        found.push(format!("kubelet kubeconfig {KUBELET_KUBECONFIG}"));
    }
    if std::fs::read_dir(&pki).is_ok_and(|mut d| d.next().is_some()) {
        found.push(format!("kubelet certificates in {KUBELET_PKI}"));
    }
    if found.is_empty() {
        return CheckResult::pass(CheckName::PreviousRegistration, "no earlier registration");
    }
    if input.registration_is_ours {
        return CheckResult::pass(
            CheckName::PreviousRegistration,
            format!("{} left by this bootstrap's earlier attempt; init resumes with it", found.join(", ")),
        );
    }
    CheckResult::fail(
        CheckName::PreviousRegistration,
        format!(
            "{} from an earlier registration; nodeadm init would keep it and ignore the new activation",
            found.join(", ")
        ),
        reset_commands(input.state_dir),
        false,
    )
}

/// `ManagedInstanceID` and `Region` of nodeadm's SSM registration file.
pub fn read_registration(path: &Path) -> Option<(String, String)> {
    let value: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    Some((value.get("ManagedInstanceID")?.as_str()?.to_owned(), value.get("Region")?.as_str()?.to_owned()))
}

fn check_credentials(input: &PreflightInput<'_>) -> CheckResult {
    match &input.settings.credentials {
        CredentialSettings::Ssm { activation_id, code } => {
            if let Err(problem) = check_activation_id(activation_id) {
                return CheckResult::fail(
                    CheckName::Credentials,
                    format!("activation id {problem}"),
                    "copy ActivationId from `aws ssm create-activation` into bootstrap.ssm.activation_id",
                    false,
                );
            }
            match input.activation_code {
                Some(Ok(secret)) => match check_activation_code(secret) {
                    Ok(()) => CheckResult::pass(
                        CheckName::Credentials,
                        format!("activation {activation_id}, code from {code}"),
                    ),
                    Err(problem) => CheckResult::fail(
                        CheckName::Credentials,
                        problem,
                        format!("put the ActivationCode from `aws ssm create-activation` in {code}"),
                        false,
                    ),
                },
                Some(Err(error)) => CheckResult::fail(
                    CheckName::Credentials,
                    error.to_string(),
                    format!("deliver the activation code to {code} (see docs/bootstrap.md); the daemon retries"),
                    true,
                ),
                None => CheckResult::fail(
                    CheckName::Credentials,
                    "no activation code was read",
                    "report this as a bug",
                    false,
                ),
            }
        }
        CredentialSettings::IamRolesAnywhere(ra) => {
            for (path, what) in [(&ra.certificate_path, "certificate"), (&ra.private_key_path, "private key")] {
                if !host_path(input.root, path).is_file() {
                    return CheckResult::fail(
                        CheckName::Credentials,
                        format!("IAM Roles Anywhere {what} {} not found", path.display()),
                        format!("install the node's {what} at {} (nodeadm reads it there)", path.display()),
                        true,
                    );
                }
            }
            CheckResult::pass(
                CheckName::Credentials,
                format!("IAM Roles Anywhere node {} has its certificate and key", ra.node_name),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fib_trie_yields_local_addresses() {
        let text = "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     +-- 10.80.0.0/16 2 0 2\n\
                    \x20       |-- 10.80.0.0\n           /16 link UNICAST\n        |-- 10.80.0.5\n           /32 host LOCAL\n\
                    \x20    +-- 127.0.0.0/8 2 0 2\n        |-- 127.0.0.1\n           /32 host LOCAL\n\
                    Local:\n        |-- 10.80.0.5\n           /32 host LOCAL\n";
        assert_eq!(parse_fib_trie(text), vec![Ipv4Addr::new(10, 80, 0, 5)]);
    }

    #[test]
    fn the_real_probe_answers() {
        let probe = SystemProbe::new("/");
        let _ = probe.effective_uid();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = listener.local_addr().expect("addr").port();
        assert!(probe.connect("127.0.0.1", port, Duration::from_secs(2)).is_ok());
        drop(listener);
        assert!(probe.connect("127.0.0.1", port, Duration::from_secs(2)).is_err());
        assert!(probe.connect("nonexistent.invalid", 443, Duration::from_secs(2)).is_err());
        // Every Linux host has /proc/net/fib_trie.
        assert!(probe.interface_addresses().is_ok());
    }

    #[test]
    fn os_versions() {
        assert!(supported("ubuntu", "22.04"));
        assert!(supported("rhel", "9.4"));
        assert!(supported("amzn", "2023"));
        assert!(!supported("ubuntu", "18.04"));
        assert!(!supported("debian", "12"));
        assert!(!supported("amzn", "2"));
    }
}
