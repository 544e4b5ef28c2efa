//! What the packaged systemd units rely on: `run --no-bootstrap` (the unprivileged daemon leaves
//! the EKS bootstrap to `edgeflow-bootstrap.service`) and `is-configured` (their
//! `ExecCondition=`, so that an unconfigured node starts nothing).

#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use edgeflow_testkit::{Child, free_port};

const CODE: &str = "Zq3kT0pWm9xYv2Lr8NsA1bC";

fn agent(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeflow-agent")).args(args).output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// A config with the bootstrap enabled and every preflight check skipped, so that an in-process
/// bootstrap reaches `nodeadm install` at once; `nodeadm` is a script that leaves a marker.
struct BootstrapEnabled {
    dir: tempfile::TempDir,
    config: PathBuf,
    marker: PathBuf,
    metrics_port: u16,
}

impl BootstrapEnabled {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("nodeadm-ran");
        let nodeadm = dir.path().join("nodeadm");
        std::fs::write(&nodeadm, format!("#!/bin/sh\necho \"$@\" >> '{}'\nexit 1\n", marker.display())).unwrap();
        std::fs::set_permissions(&nodeadm, std::fs::Permissions::from_mode(0o755)).unwrap();
        let code_file = dir.path().join("ssm-activation-code");
        std::fs::write(&code_file, CODE).unwrap();
        let metrics_port = free_port();
        let config = dir.path().join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"
node_id = "pve-node-1"
data_dir = "{data}"
shutdown_timeout = "1s"
[mqtt]
url = "mqtt://127.0.0.1:{closed}"
[kafka]
brokers = "127.0.0.1:{closed}"
[metrics]
listen = "127.0.0.1:{metrics_port}"
[bootstrap]
enabled = true
cluster_name = "edge-1"
region = "eu-west-1"
kubernetes_version = "1.31"
nodeadm_path = "{nodeadm}"
remote_node_cidrs = ["10.0.0.0/8"]
skip_checks = "all"
[bootstrap.ssm]
activation_id = "0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e"
activation_code_file = "{code}"
"#,
                data = dir.path().join("data").display(),
                closed = free_port(),
                nodeadm = nodeadm.display(),
                code = code_file.display(),
            ),
        )
        .unwrap();
        Self { dir, config, marker, metrics_port }
    }

    fn run(&self, extra: &[&str], log: &Path) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_edgeflow-agent"));
        cmd.arg("run").arg("--config").arg(&self.config).args(extra).env("RUST_LOG", "info,librdkafka=off");
        Child::spawn("edgeflow-agent", cmd, Some(log)).unwrap()
    }

    /// The status endpoint's exposition, once the agent serves it.
    fn metrics(&self) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, body)) = common::http_get(self.metrics_port, "/metrics") {
                return body;
            }
            assert!(Instant::now() < deadline, "the agent never served /metrics");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn no_bootstrap_leaves_the_bootstrap_to_its_unit() {
    let env = BootstrapEnabled::new();
    let log = env.dir.path().join("no-bootstrap.log");
    let child = env.run(&["--no-bootstrap"], &log);
    let metrics = env.metrics();
    drop(child);
    // The bootstrap task never started: a started one shows `pending` at once and writes its
    // state directory before it runs nodeadm.
    assert!(metrics.contains("edgeflow_agent_bootstrap_phase{phase=\"disabled\"} 1"), "{metrics}");
    assert!(!env.dir.path().join("data/bootstrap").exists());
    assert!(!env.marker.exists(), "nodeadm ran");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("left to edgeflow-bootstrap.service"), "{text}");

    // The same configuration without the switch does bootstrap in-process: the test above
    // would have seen it.
    let child = env.run(&[], &env.dir.path().join("in-process.log"));
    let deadline = Instant::now() + Duration::from_secs(20);
    while !env.marker.exists() {
        assert!(Instant::now() < deadline, "the in-process bootstrap never ran nodeadm");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(child);
    let ran = std::fs::read_to_string(&env.marker).unwrap();
    assert!(ran.starts_with("install 1.31 --credential-provider ssm"), "{ran}");
}

#[test]
fn is_configured_tells_a_pristine_node_from_a_configured_one() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let config = path.to_str().unwrap();
    let default = Command::new(env!("CARGO_BIN_EXE_edgeflow-agent")).arg("default-config").output().unwrap().stdout;

    // Missing, or byte for byte the packaged default: not configured (1 = systemd skips the unit).
    let (code, err) = agent(&["is-configured", "--config", config]);
    assert_eq!(code, 1, "{err}");
    std::fs::write(&path, &default).unwrap();
    let (code, err) = agent(&["is-configured", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("default configuration"), "{err}");
    let (code, err) = agent(&["is-configured", "--bootstrap", "--config", config]);
    assert_eq!(code, 1);
    assert!(err.contains("not enabled"), "{err}");

    // Any edit configures the agent; the bootstrap needs `enabled = true`.
    let edited = String::from_utf8(default).unwrap().replace("# node_id = \"pve-node-1\"", "node_id = \"pve-7\"");
    std::fs::write(&path, &edited).unwrap();
    assert_eq!(agent(&["is-configured", "--config", config]).0, 0);
    assert_eq!(agent(&["is-configured", "--bootstrap", "--config", config]).0, 1);
    std::fs::write(&path, edited.replace("enabled = false", "enabled = true")).unwrap();
    assert_eq!(agent(&["is-configured", "--bootstrap", "--config", config]).0, 0);

    // A file that does not parse lets the unit start, so that it fails loudly instead of
    // being skipped quietly.
    std::fs::write(&path, "[bootstrap\n").unwrap();
    assert_eq!(agent(&["is-configured", "--bootstrap", "--config", config]).0, 0);
    assert_eq!(agent(&["is-configured", "--config", config]).0, 0);
}
