//! `edgeflow-agent bootstrap --dry-run` on this host: preflight runs, the NodeConfig is printed
//! with the activation code masked, and nothing is written.

#![allow(clippy::unwrap_used)]

use std::process::Command;

const CODE: &str = "Zq3kT0pWm9xYv2Lr8NsA1bC";

#[test]
fn dry_run_prints_the_plan_masks_the_code_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let code_file = dir.path().join("ssm-activation-code");
    std::fs::write(&code_file, CODE).unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"
node_id = "pve-node-1"
data_dir = "{}"
[kafka]
brokers = "127.0.0.1:9092"
[bootstrap]
enabled = true
cluster_name = "edge-1"
region = "eu-west-1"
kubernetes_version = "1.31"
nodeadm_path = "{}"
remote_node_cidrs = ["10.0.0.0/8"]
skip_checks = ["endpoints"]
[bootstrap.ssm]
activation_id = "0b3c1b2e-9d0f-4a51-8c1e-3f2a4b5c6d7e"
activation_code_file = "{}"
"#,
            data.display(),
            dir.path().join("no-nodeadm").display(),
            code_file.display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeflow-agent"))
        .args(["bootstrap", "--dry-run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    // nodeadm is not installed here, so the preflight fails and the exit code says so.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains("[FAIL] nodeadm_binary"), "{stdout}");
    assert!(stdout.contains("[skip] endpoints"), "{stdout}");
    assert!(stdout.contains("activationCode: \"***\""), "{stdout}");
    assert!(stdout.contains("install 1.31 --credential-provider ssm"), "{stdout}");
    assert!(!stdout.contains(CODE) && !stderr.contains(CODE), "the code leaked");
    assert!(!data.join("bootstrap").exists(), "a dry run writes nothing");

    // Disabled: said plainly.
    let disabled = std::fs::read_to_string(&config).unwrap().replace("enabled = true", "enabled = false");
    std::fs::write(&config, disabled).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edgeflow-agent"))
        .args(["bootstrap", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("disabled"));
}

#[test]
fn default_config_has_a_disabled_bootstrap_section() {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeflow-agent")).arg("default-config").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("[bootstrap]\n") && text.contains("enabled = false"), "{text}");
}
