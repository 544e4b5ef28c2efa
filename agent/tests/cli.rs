//! The command line: validate, default-config, metrics, buffer inspect/verify/export.

mod common;

use std::process::Command;

fn agent(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_edgeflow-agent")).args(args).output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn default_config_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, text, _) = agent(&["default-config"]);
    assert_eq!(code, 0);
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, text).expect("write");
    let (code, out, err) = agent(&["validate", "--config", path.to_str().expect("utf8")]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("valid"));
}

#[test]
fn invalid_configs_name_the_field_and_never_print_secrets() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("pw"), "hunter2-secret").expect("write");
    let pw = dir.path().join("pw");
    let cases = [
        ("[kafka]\nbrokers = \"k:9092\"\ncolour = \"red\"\n", "colour"),
        ("[mqtt]\nurl = \"ftp://broker\"\n[kafka]\nbrokers = \"k:9092\"\n", "mqtt.url"),
        ("[kafka]\nbrokers = \"k:9092\"\n[buffer]\nmax_bytes = \"12 parsecs\"\n", "max_bytes"),
        ("[kafka]\nbrokers = \"k:9092\"\n[buffer]\nmax_bytes = \"10KiB\"\n", "buffer.max_bytes"),
        ("[mqtt]\nurl = \"mqtt://b\"\n", "kafka"),
        ("this is not toml", "invalid"),
    ];
    for (text, field) in cases {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, format!("node_id = \"n\"\n{text}")).expect("write");
        let (code, out, err) = agent(&["validate", "--config", path.to_str().expect("utf8")]);
        assert_eq!(code, 2, "{text}: {out}{err}");
        assert!(err.contains(field), "{text}: expected `{field}` in: {err}");
    }
    // A config that reads a secret and fails later never shows the secret.
    let path = dir.path().join("secret.toml");
    std::fs::write(
        &path,
        format!("node_id = \"n\"\n[mqtt]\nusername = \"u\"\npassword_file = \"{}\"\nreceive_maximum = 0\n[kafka]\nbrokers = \"k:9092\"\n", pw.display()),
    )
    .expect("write");
    let (code, out, err) = agent(&["validate", "--config", path.to_str().expect("utf8")]);
    assert_eq!(code, 2);
    assert!(err.contains("mqtt.receive_maximum"), "{err}");
    assert!(!out.contains("hunter2") && !err.contains("hunter2"));
    // A missing file is an error too.
    let (code, _, err) = agent(&["validate", "--config", "/nonexistent/agent.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/agent.toml"), "{err}");
}

/// `validate` refuses settings that would void the delivery guarantee (exit 2, naming the key)
/// and accepts MQTT 3.1.1 with the horizon it sizes itself.
#[test]
fn validate_refuses_settings_that_void_the_guarantee() {
    let dir = tempfile::tempdir().expect("tempdir");
    let base = "node_id = \"n\"\n[kafka]\nbrokers = \"k:9092\"\n";
    let v311 = "node_id = \"n\"\n[mqtt]\nprotocol = \"3.1.1\"\n[kafka]\nbrokers = \"k:9092\"\n";
    let cases = [
        (
            format!("{base}[kafka.properties]\n\"message.timeout.ms\" = \"30000\"\n"),
            2,
            "kafka.properties.message.timeout.ms",
        ),
        (
            format!("{base}[kafka.properties]\n\"delivery.timeout.ms\" = \"30000\"\n"),
            2,
            "kafka.properties.delivery.timeout.ms",
        ),
        (format!("{base}[kafka.properties]\n\"max.in.flight\" = \"50\"\n"), 2, "kafka.properties.max.in.flight"),
        (format!("{v311}[buffer]\ndedup_horizon = 32768\n"), 2, "buffer.dedup_horizon"),
        (v311.to_owned(), 0, "valid"),
    ];
    for (text, want, needle) in cases {
        let path = dir.path().join("c.toml");
        std::fs::write(&path, &text).expect("write");
        let (code, out, err) = agent(&["validate", "--config", path.to_str().expect("utf8")]);
        assert_eq!(code, want, "{text}: {out}{err}");
        assert!(out.contains(needle) || err.contains(needle), "{text}: expected `{needle}` in: {out}{err}");
    }
}

#[test]
fn metrics_lists_every_series_family() {
    let (code, out, _) = agent(&["metrics"]);
    assert_eq!(code, 0);
    for name in [
        "edgeflow_agent_records_committed_total",
        "edgeflow_agent_records_rejected_total{reason=\"bad_json\"}",
        "edgeflow_agent_buffer_oldest_record_age_seconds",
        "edgeflow_agent_record_latency_seconds_bucket",
        "edgeflow_node_cpu_utilization_ratio",
    ] {
        assert!(out.contains(name), "{name} missing");
    }
}

#[test]
fn buffer_commands_inspect_verify_export_and_refuse_damage() {
    use edgeflow_agent::buffer::{Append, Store, StoreOptions, WhenFull};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).expect("mkdir");
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!("node_id = \"n\"\ndata_dir = \"{}\"\n[kafka]\nbrokers = \"k:9092\"\n", data.display()),
    )
    .expect("write");
    let opts =
        StoreOptions { max_bytes: 1 << 20, when_full: WhenFull::Block, dedup_horizon: 100, cache_bytes: 1 << 20 };
    {
        let (mut store, _) =
            Store::open(&edgeflow_agent::buffer::path_in(&data), "n", opts, 1_700_000_000_000).expect("open");
        let appends: Vec<Append> = (0..3)
            .map(|i| Append::Record {
                natural_hash: 100 + i,
                payload_hash: 100 + i,
                device_id: b"d".to_vec(),
                json_head: format!("{{\"device_id\":\"d\",\"i\":{i},").into_bytes(),
                received_ms: 1_700_000_000_000,
            })
            .collect();
        store.apply(&[], &appends).expect("commit");
    }
    let c = config.to_str().expect("utf8");
    let (code, out, err) = agent(&["buffer", "inspect", "--config", c, "--json"]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).expect("json");
    assert_eq!(summary["entries"], 4, "three records and the buffer_created marker");
    assert_eq!(summary["node_id"], "n");
    let (code, out, err) = agent(&["buffer", "verify", "--config", c]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("4 entries"));
    let (code, out, _) = agent(&["buffer", "export", "--config", c]);
    assert_eq!(code, 0);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).expect("json line")).collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["kind"], "dead_letter");
    assert_eq!(lines[1]["value"]["i"], 0);
    assert!(lines.windows(2).all(|w| w[0]["seq"].as_u64() < w[1]["seq"].as_u64()));

    // Damage the file: the commands report it and do not crash.
    let path = edgeflow_agent::buffer::path_in(&data);
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    let end = (mid + 4096).min(bytes.len());
    for b in &mut bytes[mid..end] {
        *b ^= 0x5a;
    }
    std::fs::write(&path, &bytes).expect("write");
    for cmd in ["inspect", "verify", "export"] {
        let (code, _, err) = agent(&["buffer", cmd, "--config", c]);
        assert!(code != 0 || cmd == "inspect", "{cmd} accepted a damaged file");
        assert!(!err.contains("panicked"), "{cmd} panicked: {err}");
    }
    // A foreign file.
    std::fs::write(&path, b"not a buffer").expect("write");
    let (code, _, err) = agent(&["buffer", "verify", "--config", c]);
    assert_eq!(code, 1);
    assert!(err.contains("buffer"), "{err}");
    assert!(!err.contains("panicked"));
}
