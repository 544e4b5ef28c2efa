//! The README's first command keeps working: a short demo run through a network cut ends with
//! a clean verdict over S3 and leaves a copy of the bucket on disk.

use std::process::Command;

#[test]
fn the_demo_runs_through_a_network_cut_and_ends_clean() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(env!("CARGO_BIN_EXE_edgeflow-demo"))
        .args(["--duration", "12", "--rate", "200", "--devices", "10", "--bad-fraction", "0.1"])
        .arg("--dir")
        .arg(dir.path())
        .output()
        .expect("the demo runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("network cut") && stdout.contains("network healed"), "{stdout}");
    assert!(stdout.contains("verdict: 0 missing, 0 duplicate\n"), "{stdout}");
    // The simulator's log, the agent's buffer and the copy of the bucket are where the demo says.
    assert!(dir.path().join("published.jsonl").exists());
    assert!(dir.path().join("agent/buffer.redb").exists());
    let mut families = std::collections::BTreeSet::new();
    let mut manifests = 0;
    for entry in walk(&dir.path().join("s3/telemetry")) {
        let name = entry.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_owned();
        if name.ends_with(".parquet") {
            families.insert(name.split('_').next().unwrap_or_default().to_owned());
        } else if name.contains("manifest") {
            manifests += 1;
        }
    }
    assert_eq!(
        families.into_iter().collect::<Vec<_>>(),
        ["aggregated", "deadletter", "filtered", "rejected"],
        "{stdout}"
    );
    assert!(manifests >= 2, "the hours crossed and the dead letters' hour each have a manifest: {manifests}\n{stdout}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}
