//! Each run of the agent has an epoch of its own (issue 10, class 7), against real mosquitto
//! and tansu: a restored copy of the buffer continues from an old `seq` without reusing an
//! identity, and what an earlier run may have sent is marked as a re-send.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use common::*;
use edgeflow_testkit::free_port;

fn acked(published: &[Published]) -> Vec<&Published> {
    published.iter().filter(|p| p.acked && p.class != Class::Malformed).collect()
}

/// Readings of one run: published, then forwarded, then the agent stopped cleanly.
async fn one_run(env: &Env, config: &std::path::Path, port: u16, seed: u64) -> anyhow::Result<Vec<Published>> {
    let mut agent = start_agent(config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    let published = publish(env, 5, 200.0, 1.0, 0.0, seed).await?;
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(30), |v| v == 0.0)?;
    let status = agent.terminate(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "a clean stop");
    Ok(published)
}

/// A buffer restored from a copy (a backup, a VM snapshot, a cloned host) continues from the
/// `seq` it held, which a later run already used. Keyed on `(node_id, seq)` the readings of the
/// two runs collide, and the aggregator dropped the restored run's as duplicates; with an
/// epoch per run no identity is used by two readings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_buffer_reuses_no_identity_and_loses_nothing() -> anyhow::Result<()> {
    let env = Env::start(false).await?;
    let port = free_port();
    let config = env.write_config("r", &env.config("node-r", port, ""))?;
    let buffer = edgeflow_agent::buffer::path_in(&env.dir.path().join("node-r"));
    let mut published = one_run(&env, &config, port, 1).await?;
    let copy = env.dir.path().join("buffer-copy.redb");
    std::fs::copy(&buffer, &copy)?;
    published.extend(one_run(&env, &config, port, 2).await?);
    std::fs::copy(&copy, &buffer)?;
    published.extend(one_run(&env, &config, port, 3).await?);

    let acked = acked(&published);
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(60))?;
    let copies = check_complete(&acked, &got);
    assert_eq!((got.len(), copies), (acked.len(), 0), "every reading once");
    let epochs: HashSet<&str> = got.iter().filter_map(|g| g.epoch.as_deref()).collect();
    assert!(got.iter().all(|g| g.epoch.is_some()), "every record carries its run's epoch");
    assert_eq!(epochs.len(), 3, "three runs, three epochs: {epochs:?}");
    let mut by_identity: HashMap<(&str, Option<&str>, u64), (&str, &str)> = HashMap::new();
    let mut by_seq: HashMap<(&str, u64), (&str, &str)> = HashMap::new();
    let mut seq_collisions = 0;
    for g in &got {
        let reading = (g.device_id.as_str(), g.timestamp.as_str());
        let previous = by_identity.insert((&g.node_id, g.epoch.as_deref(), g.seq), reading);
        assert!(previous.is_none_or(|p| p == reading), "two readings share {:?}/{}: {previous:?}", g.epoch, g.seq);
        if by_seq.insert((&g.node_id, g.seq), reading).is_some_and(|p| p != reading) {
            seq_collisions += 1;
        }
    }
    // What made the defect: the restored run reassigned the seqs of the run after the copy.
    assert!(seq_collisions > 0, "the restored run continued from the copy's seq");
    Ok(())
}

/// Entries an earlier run committed (and may have handed to Kafka) are sent with the
/// `edgeflow-resend` header; entries of the current run, sent for the first time, are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_an_earlier_run_may_have_sent_is_marked_as_a_resend() -> anyhow::Result<()> {
    let env = Env::start(true).await?;
    let proxy = env.proxy.as_ref().expect("proxy");
    let port = free_port();
    let config = env.write_config("m", &env.config("node-m", port, ""))?;
    let mut agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
    proxy.cut();
    let mut published = publish(&env, 5, 200.0, 1.0, 0.0, 7).await?;
    let held = acked(&published).len();
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(10), |v| v >= held as f64)?;
    let first_run_next = agent.metric("edgeflow_agent_buffer_next_seq") as u64;
    agent.kill9();
    proxy.heal();
    let agent = start_agent(&config, port)?;
    agent.wait_metric("edgeflow_agent_buffer_records", Duration::from_secs(60), |v| v == 0.0)?;
    published.extend(publish(&env, 5, 200.0, 1.0, 0.0, 8).await?);
    let acked = acked(&published);
    let got = read_raw(&env.tansu.bootstrap(), acked.len(), Duration::from_secs(60))?;
    assert_eq!(check_complete(&acked, &got), 0);
    let (earlier, fresh): (Vec<&Got>, Vec<&Got>) = got.iter().partition(|g| g.seq < first_run_next);
    assert_eq!(earlier.len(), held, "the first run's readings, sent by the second");
    assert!(earlier.iter().all(|g| g.resend), "committed by an earlier run: marked");
    assert!(!fresh.is_empty() && fresh.iter().all(|g| !g.resend), "sent for the first time: not marked");
    let first: HashSet<_> = earlier.iter().map(|g| g.epoch.clone()).collect();
    let second: HashSet<_> = fresh.iter().map(|g| g.epoch.clone()).collect();
    assert!(first.len() == 1 && second.len() == 1 && first != second, "{first:?} then {second:?}");
    Ok(())
}
