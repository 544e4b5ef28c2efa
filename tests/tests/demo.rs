//! The README's first command keeps working: a short demo run ends with a clean verdict.

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
    assert!(stdout.contains("verdict: 0 missing, 0 duplicate"), "{stdout}");
    // The simulator's log and the agent's buffer are where the demo says.
    assert!(dir.path().join("published.jsonl").exists());
    assert!(dir.path().join("agent/buffer.redb").exists());
}
