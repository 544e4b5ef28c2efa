//! Disk full under the agent's data directory: a real ENOSPC from a small tmpfs.

mod common;

use std::time::Duration;

use common::*;
use edgeflow_testkit::{Child, free_port, on_small_disk};

/// Runs the agent with its data directory on a 4 MiB tmpfs in a private mount namespace.
fn start_on_small_disk(config: &std::path::Path, data_dir: &std::path::Path, port: u16) -> anyhow::Result<Agent> {
    std::fs::create_dir_all(data_dir)?;
    let mut cmd = on_small_disk(data_dir, "4m", std::path::Path::new(env!("CARGO_BIN_EXE_edgeflow-agent")));
    cmd.arg("run").arg("--config").arg(config).env("RUST_LOG", "info");
    let log = config.with_extension("log");
    let child = Child::spawn("edgeflow-agent (small disk)", cmd, Some(&log))?;
    let agent = Agent { child, port, config: config.to_owned(), log };
    agent.wait_healthy(Duration::from_secs(20))?;
    Ok(agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_holds_acknowledgements_and_recovers_when_kafka_drains_the_buffer() -> anyhow::Result<()> {
    let env = Env::start(true).await?;
    let proxy = env.proxy.as_ref().expect("proxy");
    let port = free_port();
    let data_dir = env.dir.path().join("small");
    let text = env
        .config("node-disk", port, "[buffer]\nmax_bytes = \"1GiB\"\n")
        .replace(
            &format!("data_dir = \"{}\"", env.dir.path().join("node-disk").display()),
            &format!("data_dir = \"{}\"", data_dir.display()),
        )
        .replace("[kafka]\n", "[kafka]\nmax_in_flight = 500\n");
    let config = env.write_config("disk", &text)?;
    let agent = start_on_small_disk(&config, &data_dir, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    // Kafka away: devices publish until the buffer has filled the disk, and a little longer, so
    // the broker holds what did not fit. (Publishing for a fixed time would fill 4 MiB or not
    // depending on how fast this machine is at the moment.)
    proxy.cut();
    let stop = edgeflow_runtime::CancellationToken::new();
    let publisher = spawn_publisher_until(&env, "disk", 20, 3000.0, 21, stop.clone());
    let errors = "edgeflow_agent_buffer_commit_errors_total";
    let full = tokio::task::block_in_place(|| agent.wait_metric(errors, Duration::from_secs(120), |v| v >= 1.0));
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.cancel();
    let report = publisher.await??;
    full?;
    let published = read_published(&env.dir.path().join("disk.jsonl"))?;
    assert_eq!(published.len() as u64, report.published);
    let acked: Vec<&Published> = published.iter().filter(|p| p.acked).collect();
    eprintln!("published {} ({} acknowledged by the broker) until the disk was full", report.published, acked.len());
    let (code, body) = http_get(port, "/readyz")?;
    assert_eq!(code, 503);
    // Either the failed commit is being retried, or the buffer holds appends back to keep room
    // for the deletions that will free space.
    assert!(body.contains("[-] buffer: not writable") || body.contains("[-] buffer: disk full"), "{body}");
    assert_eq!(http_get(port, "/healthz")?.0, 200, "a full disk is not a wedged process");
    let committed = agent.metric("edgeflow_agent_records_committed_total");
    assert!(committed < acked.len() as f64, "the broker must be holding what did not fit");
    assert!(agent.log_text().contains("buffer commit failed"), "the operator is told");

    // Kafka back: the forwarder drains what was committed, deletions free space, and the
    // messages the broker held are committed and delivered.
    proxy.heal();
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(120))?;
    let copies = check_complete(&acked, &got);
    assert_eq!((got.len() - copies), acked.len());
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(30), |v| v == 0.0)?;
    let (code, _) = http_get(port, "/readyz")?;
    assert_eq!(code, 200, "writable again");
    let log = agent.log_text();
    assert!(log.contains("No space left on device"), "the failure was a real ENOSPC:\n{log}");
    assert!(log.contains("buffer writable again"), "{log}");
    eprintln!("{}", log.lines().filter(|l| l.contains("buffer")).take(6).collect::<Vec<_>>().join("\n"));
    Ok(())
}
