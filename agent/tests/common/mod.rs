//! Harness for the agent's tests: real mosquitto and tansu, the agent as a child process.
#![allow(dead_code)]

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use edgeflow_contract::{DeadLetter, Limits, MarkerKind, RawRecord};
#[allow(unused_imports)] // not every test binary uses every helper
pub use edgeflow_testkit::{FaultProxy, Mosquitto, Service, Tansu, TansuStorage, free_port, http_get, kafka};

pub const RAW: &str = "raw-data";
pub const DLQ: &str = "raw-data-dlq";

/// mosquitto + tansu (optionally behind a fault proxy) + a data directory.
pub struct Env {
    pub mosquitto: Mosquitto,
    pub tansu: Tansu,
    pub proxy: Option<FaultProxy>,
    pub dir: tempfile::TempDir,
}

impl Env {
    pub async fn start(with_proxy: bool) -> Result<Self> {
        let mosquitto = Mosquitto::start()?;
        let (tansu, proxy) = if with_proxy {
            let listen = free_port();
            let proxy = FaultProxy::start(0, listen)?;
            (Tansu::start_advertising(TansuStorage::Memory, listen, proxy.port)?, Some(proxy))
        } else {
            (Tansu::start(TansuStorage::Memory)?, None)
        };
        kafka::create_topics(&tansu.bootstrap(), &[(RAW, 3), (DLQ, 1)]).await?;
        let dir = tempfile::Builder::new().prefix("agent-test").tempdir()?;
        Ok(Env { mosquitto, tansu, proxy, dir })
    }

    /// A config for an agent of this environment; `extra` is appended (sections may repeat
    /// keys only if not already present: pass whole extra sections).
    pub fn config(&self, node_id: &str, metrics_port: u16, extra: &str) -> String {
        format!(
            "node_id = \"{node_id}\"\ndata_dir = \"{}\"\nshutdown_timeout = \"10s\"\n\
             [mqtt]\nurl = \"{}\"\nkeep_alive = \"5s\"\nreconnect_backoff_max = \"1s\"\n\
             [kafka]\nbrokers = \"{}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n{extra}",
            self.dir.path().join(node_id).display(),
            self.mosquitto.url(),
            self.tansu.bootstrap(),
        )
    }

    pub fn write_config(&self, name: &str, text: &str) -> Result<PathBuf> {
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// The agent binary as a child process.
pub type Agent = Service;

/// Starts `edgeflow-agent run --config <config>` and waits until it is healthy.
pub fn start_agent(config: &Path, metrics_port: u16) -> Result<Agent> {
    Service::start(Path::new(env!("CARGO_BIN_EXE_edgeflow-agent")), &["run"], config, metrics_port, &[])
}

/// Publishes with the simulator and returns its log lines (class, payload, acked).
pub async fn publish(env: &Env, devices: u32, rate: f64, secs: f64, bad: f64, seed: u64) -> Result<Vec<Published>> {
    let name = format!("s{seed}");
    let sim = edgeflow_agent::simulate::Simulation {
        bad_fraction: bad,
        ..simulation(env, &name, devices, rate, Duration::from_secs_f64(secs), seed)
    };
    let log = sim.log.clone().expect("a log");
    edgeflow_agent::simulate::run(sim, edgeflow_runtime::CancellationToken::new()).await?;
    read_published(&log)
}

#[allow(unused_imports)] // not every test binary uses both
pub use edgeflow_agent::simulate::{Class, LogEntry as Published};

pub fn read_published(path: &Path) -> Result<Vec<Published>> {
    Published::read_all(path)
}

/// Starts the simulator in the background for `secs`, logging to `<dir>/<name>.jsonl`.
pub fn spawn_publisher(
    env: &Env,
    name: &str,
    devices: u32,
    rate: f64,
    secs: u64,
    seed: u64,
) -> tokio::task::JoinHandle<Result<edgeflow_agent::simulate::Report>> {
    let sim = simulation(env, name, devices, rate, Duration::from_secs(secs), seed);
    tokio::spawn(edgeflow_agent::simulate::run(sim, edgeflow_runtime::CancellationToken::new()))
}

/// Starts the simulator in the background until `stop` is cancelled (at most ten minutes).
#[allow(dead_code)] // not every test binary uses it
pub fn spawn_publisher_until(
    env: &Env,
    name: &str,
    devices: u32,
    rate: f64,
    seed: u64,
    stop: edgeflow_runtime::CancellationToken,
) -> tokio::task::JoinHandle<Result<edgeflow_agent::simulate::Report>> {
    let sim = simulation(env, name, devices, rate, Duration::from_secs(600), seed);
    tokio::spawn(edgeflow_agent::simulate::run(sim, stop))
}

fn simulation(
    env: &Env,
    name: &str,
    devices: u32,
    rate: f64,
    duration: Duration,
    seed: u64,
) -> edgeflow_agent::simulate::Simulation {
    edgeflow_agent::simulate::Simulation {
        mqtt_host: "127.0.0.1".into(),
        mqtt_port: env.mosquitto.port,
        devices,
        rate,
        duration,
        bad_fraction: 0.0,
        topic_prefix: "devices".into(),
        device_prefix: format!("{name}-dev"),
        seed,
        clock_offset: chrono::Duration::zero(),
        log: Some(env.dir.path().join(format!("{name}.jsonl"))),
        progress: false,
    }
}

/// A record read back from raw-data.
#[derive(Debug, Clone)]
pub struct Got {
    pub partition: i32,
    pub offset: i64,
    pub key: String,
    pub node_id: String,
    pub epoch: Option<String>,
    pub seq: u64,
    /// Carries the `edgeflow-resend` header (the agent may have sent it before).
    pub resend: bool,
    pub device_id: String,
    pub timestamp: String,
    pub temperature: f64,
    pub humidity: f64,
    pub status: String,
}

/// Reads raw-data until `count` records (then `settle` more for extras).
pub fn read_raw(bootstrap: &str, count: usize, timeout: Duration) -> Result<Vec<Got>> {
    let msgs = kafka::consume_count(bootstrap, RAW, count, timeout, Duration::from_secs(2))?;
    msgs.iter()
        .map(|m| {
            let r = RawRecord::parse(&m.value, &Limits::default())
                .map_err(|e| anyhow::anyhow!("raw-data holds an invalid record: {e}"))?;
            Ok(Got {
                partition: m.partition,
                offset: m.offset,
                key: String::from_utf8_lossy(m.key.as_deref().unwrap_or_default()).into_owned(),
                node_id: r.provenance.node_id.into_owned(),
                epoch: r.provenance.epoch.map(Cow::into_owned),
                seq: r.provenance.seq,
                resend: m.headers.iter().any(|(k, _)| k == edgeflow_contract::RESEND_HEADER),
                device_id: r.reading.device_id.into_owned(),
                timestamp: r.reading.timestamp.into_owned(),
                temperature: r.reading.temperature,
                humidity: r.reading.humidity,
                status: r.reading.status.into_owned(),
            })
        })
        .collect()
}

/// Whether a raw-data-dlq value is a `high_water` marker (the agent writes them on a schedule and
/// at a clean stop, so how many there are depends on timing).
pub fn is_high_water(value: &[u8]) -> bool {
    DeadLetter::parse(value).is_ok_and(|d| d.marker() == Some(MarkerKind::HighWater))
}

/// Reads raw-data-dlq until `count` dead letters besides `high_water` markers (then 2 s more for
/// extras). Returns everything read, markers included, in order.
pub fn read_dlq(bootstrap: &str, count: usize, timeout: Duration) -> Result<Vec<DeadLetter<'static>>> {
    let settle = Duration::from_secs(2);
    let mut reached: Option<std::time::Instant> = None;
    let msgs = kafka::consume_until(bootstrap, DLQ, timeout + settle, |msgs| {
        if reached.is_none() && msgs.iter().filter(|m| !is_high_water(&m.value)).count() >= count {
            reached = Some(std::time::Instant::now());
        }
        reached.is_some_and(|t| t.elapsed() >= settle)
    })?;
    msgs.iter()
        .map(|m| {
            let d = DeadLetter::parse(&m.value).context("dead letter")?;
            Ok(d.into_owned())
        })
        .collect()
}

/// The (device, timestamp) natural key of a published valid payload.
pub fn natural_key(payload: &str) -> Option<(String, String)> {
    let v: serde_json::Value = serde_json::from_str(payload).ok()?;
    Some((v.get("device_id")?.as_str()?.to_owned(), v.get("timestamp")?.as_str()?.to_owned()))
}

/// Checks that every acknowledged reading is in `got`, that no reading has two identities
/// `(epoch, seq)` and no identity two readings, and that per device and epoch the records are
/// in order. Returns the number of extra copies (the same identity again).
pub fn check_complete(acked: &[&Published], got: &[Got]) -> usize {
    let mut id_of: HashMap<(String, String), (Option<String>, u64)> = HashMap::new();
    let mut copies = 0;
    for g in got {
        let id = (g.epoch.clone(), g.seq);
        match id_of.insert((g.device_id.clone(), g.timestamp.clone()), id.clone()) {
            Some(prev) if prev != id => {
                panic!("reading {}/{} has two identities: {prev:?} and {id:?}", g.device_id, g.timestamp)
            }
            Some(_) => copies += 1,
            None => {}
        }
    }
    for p in acked {
        let key = natural_key(&p.payload).expect("valid payload");
        assert!(id_of.contains_key(&key), "acknowledged reading lost: {}", p.payload);
    }
    let distinct: HashSet<(Option<&str>, u64)> = got.iter().map(|g| (g.epoch.as_deref(), g.seq)).collect();
    assert_eq!(distinct.len(), id_of.len(), "an identity was given to two readings");
    // Per device: one partition, and per epoch first copies in increasing seq order.
    let mut per_device: HashMap<&str, Vec<&Got>> = HashMap::new();
    for g in got {
        per_device.entry(&g.device_id).or_default().push(g);
    }
    for records in per_device.values_mut() {
        records.sort_by_key(|g| g.offset);
        assert!(records.windows(2).all(|w| w[0].partition == w[1].partition), "a device moved partition");
        let mut high: HashMap<Option<&str>, u64> = HashMap::new();
        let mut seen: HashSet<(Option<&str>, u64)> = HashSet::new();
        for g in records.iter() {
            let id = (g.epoch.as_deref(), g.seq);
            let h = high.entry(id.0).or_default();
            if g.seq > *h {
                *h = g.seq;
            } else {
                // A copy re-sent after a crash: never a reading seen for the first time.
                assert!(seen.contains(&id), "{}/{} first seen below its epoch's high-water", g.device_id, g.seq);
            }
            seen.insert(id);
        }
    }
    copies
}
