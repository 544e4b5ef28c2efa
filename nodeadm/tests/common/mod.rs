//! A fake host for the bootstrap tests: a temporary root with the files nodeadm and the checks
//! look at, the `nodeadm-stub` behind a wrapper script that sets its behaviour, a fake probe,
//! and captured logs.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use edgeflow_nodeadm::{BootstrapConfig, BootstrapError, BootstrapSettings, Host, Mode, Outcome, Phase, Probe};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

/// A well-formed activation code (23 characters), distinctive enough to grep for.
pub const CODE: &str = "Zq3kT0pWm9xYv2Lr8NsA1bC";
/// A well-formed activation id.
pub const ACTIVATION_ID: &str = "0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e";
/// The stub's managed instance id.
pub const INSTANCE_ID: &str = "mi-0123456789abcdef0";

/// A host the checks pass on.
#[derive(Debug, Clone)]
pub struct FakeProbe {
    pub uid: u32,
    pub synced: Result<bool, String>,
    pub addresses: Vec<IpAddr>,
    /// Hosts whose TCP connect fails.
    pub unreachable: Vec<String>,
    /// Every host:port asked for.
    pub asked: Arc<Mutex<Vec<String>>>,
}

impl Default for FakeProbe {
    fn default() -> Self {
        Self {
            uid: 0,
            synced: Ok(true),
            addresses: vec!["10.80.0.5".parse().unwrap(), "172.17.0.1".parse().unwrap()],
            unreachable: Vec::new(),
            asked: Arc::default(),
        }
    }
}

impl Probe for FakeProbe {
    fn effective_uid(&self) -> u32 {
        self.uid
    }
    fn time_synchronized(&self) -> Result<bool, String> {
        self.synced.clone()
    }
    fn interface_addresses(&self) -> Result<Vec<IpAddr>, String> {
        Ok(self.addresses.clone())
    }
    fn connect(&self, host: &str, port: u16, _timeout: Duration) -> Result<(), String> {
        self.asked.lock().unwrap().push(format!("{host}:{port}"));
        if self.unreachable.iter().any(|h| h == host) { Err("connection timed out".into()) } else { Ok(()) }
    }
}

/// One fake node.
#[derive(Debug)]
pub struct Node {
    pub dir: TempDir,
    pub root: PathBuf,
    pub data: PathBuf,
    pub code_file: PathBuf,
    pub args_log: PathBuf,
    pub wrapper: PathBuf,
    pub probe: FakeProbe,
}

pub const OS_RELEASE_UBUNTU: &str =
    "PRETTY_NAME=\"Ubuntu 22.04.4 LTS\"\nNAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\nID=ubuntu\nID_LIKE=debian\n";

impl Node {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new().prefix("nodeadm-test").tempdir().unwrap();
        let root = dir.path().join("root");
        let data = dir.path().join("data");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::create_dir_all(root.join("proc")).unwrap();
        std::fs::create_dir_all(&data).unwrap();
        std::fs::write(root.join("etc/os-release"), OS_RELEASE_UBUNTU).unwrap();
        std::fs::write(root.join("proc/swaps"), "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n").unwrap();
        let code_file = dir.path().join("ssm-activation-code");
        std::fs::write(&code_file, format!("{CODE}\n")).unwrap();
        let node = Self {
            args_log: dir.path().join("nodeadm-args.jsonl"),
            wrapper: dir.path().join("nodeadm"),
            dir,
            root,
            data,
            code_file,
            probe: FakeProbe::default(),
        };
        node.stub(&[]);
        node
    }

    /// (Re)writes the `nodeadm` wrapper with the stub's behaviour, e.g. `[("FAIL", "init")]`.
    pub fn stub(&self, behaviour: &[(&str, &str)]) {
        let mut script = String::from("#!/bin/sh\n");
        script.push_str(&format!("export NODEADM_STUB_ROOT='{}'\n", self.root.display()));
        script.push_str(&format!("export NODEADM_STUB_ARGS_LOG='{}'\n", self.args_log.display()));
        for (key, value) in behaviour {
            script.push_str(&format!("export NODEADM_STUB_{key}='{value}'\n"));
        }
        script.push_str(&format!("exec '{}' \"$@\"\n", env!("CARGO_BIN_EXE_nodeadm-stub")));
        let tmp = self.wrapper.with_extension("tmp");
        let mut file = std::fs::File::create(&tmp).unwrap();
        file.write_all(script.as_bytes()).unwrap();
        file.sync_all().unwrap();
        drop(file);
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::rename(&tmp, &self.wrapper).unwrap();
    }

    /// The lines every test configuration starts with: the cluster and this node's nodeadm.
    fn cluster_lines(&self) -> String {
        format!(
            "\n[bootstrap]\nenabled = true\ncluster_name = \"edge-1\"\nregion = \"eu-west-1\"\n\
             kubernetes_version = \"1.31\"\nnodeadm_path = \"{}\"\nremote_node_cidrs = [\"10.80.0.0/16\"]\n",
            self.wrapper.display()
        )
    }

    /// The `[bootstrap]` section for this node, with `extra` lines appended to `[bootstrap]`.
    pub fn config_text(&self, extra: &str) -> String {
        format!(
            r#"{}node_ip = "10.80.0.5"
kubelet_flags = ["--node-labels=site=plant-1"]
{extra}
[bootstrap.ssm]
activation_id = "{ACTIVATION_ID}"
activation_code_file = "{}"
"#,
            self.cluster_lines(),
            self.code_file.display()
        )
    }

    /// The `[bootstrap]` section for this node with IAM Roles Anywhere credentials.
    pub fn iam_ra_config_text(&self) -> String {
        format!(
            r#"{}credential_provider = "iam-ra"
[bootstrap.iam_ra]
trust_anchor_arn = "arn:aws:rolesanywhere:eu-west-1:111122223333:trust-anchor/a"
profile_arn = "arn:aws:rolesanywhere:eu-west-1:111122223333:profile/b"
role_arn = "arn:aws:iam::111122223333:role/EKSHybridNodesRole"
node_name = "plant-1"
certificate_path = "/etc/iam/pki/server.pem"
private_key_path = "/etc/iam/pki/server.key"
"#,
            self.cluster_lines()
        )
    }

    pub fn config(&self, extra: &str) -> BootstrapConfig {
        parse_section(&self.config_text(extra))
    }

    pub fn settings(&self) -> BootstrapSettings {
        self.settings_with("")
    }

    pub fn settings_with(&self, extra: &str) -> BootstrapSettings {
        self.config(extra).validate().unwrap().unwrap()
    }

    pub fn host(&self) -> Host {
        Host {
            root: self.root.clone(),
            state_dir: self.data.join("bootstrap"),
            probe: Arc::new(self.probe.clone()),
            parameter_store: None,
        }
    }

    /// Runs one attempt; returns its result and the last phase published.
    pub async fn run(&self, settings: &BootstrapSettings) -> (Result<Outcome, BootstrapError>, Phase) {
        self.run_on(settings, &self.host(), Mode::Apply).await
    }

    pub async fn run_on(
        &self,
        settings: &BootstrapSettings,
        host: &Host,
        mode: Mode,
    ) -> (Result<Outcome, BootstrapError>, Phase) {
        let (tx, rx) = edgeflow_nodeadm::phase::channel(Phase::Pending);
        let result = edgeflow_nodeadm::run(settings, host, mode, &tx, &CancellationToken::new()).await;
        let phase = rx.borrow().clone();
        (result, phase)
    }

    /// Each nodeadm invocation's arguments, in order.
    pub fn invocations(&self) -> Vec<Vec<String>> {
        match std::fs::read_to_string(&self.args_log) {
            Ok(text) => text.lines().map(|l| serde_json::from_str(l).unwrap()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// The subcommands run so far.
    pub fn subcommands(&self) -> Vec<String> {
        self.invocations().into_iter().map(|a| a[0].clone()).collect()
    }

    pub fn nodeconfig_path(&self) -> PathBuf {
        self.data.join("bootstrap/nodeconfig.yaml")
    }

    pub fn state_path(&self) -> PathBuf {
        self.data.join("bootstrap/state.json")
    }

    pub fn host_file(&self, path: &str) -> PathBuf {
        edgeflow_nodeadm::host_path(&self.root, Path::new(path))
    }

    /// Every file under the root and the data dir, with its content, to compare before/after.
    pub fn snapshot(&self) -> Vec<(PathBuf, Vec<u8>)> {
        let mut files = Vec::new();
        walk(self.dir.path(), &mut files);
        files.retain(|(p, _)| p != &self.args_log);
        files
    }
}

fn walk(dir: &Path, out: &mut Vec<(PathBuf, Vec<u8>)>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            walk(&path, out);
        } else {
            let content = std::fs::read(&path).unwrap();
            out.push((path, content));
        }
    }
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    bootstrap: BootstrapConfig,
}

pub fn parse_section(text: &str) -> BootstrapConfig {
    let file: File = toml::from_str(text).unwrap();
    file.bootstrap
}

/// Log lines captured from `tracing` on this thread.
#[derive(Clone, Default)]
pub struct Logs(Arc<Mutex<Vec<u8>>>);

impl Logs {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

pub struct LogWriter(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
    type Writer = LogWriter;
    fn make_writer(&'a self) -> LogWriter {
        LogWriter(self.0.clone())
    }
}

/// Captures every event on this thread until the guard drops (use a current-thread runtime).
pub fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(logs.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::TRACE)
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}
