//! The whole pipeline as separate processes against real servers on 127.0.0.1.
//!
//! ```text
//! simulators ─MQTT─▶ mosquitto ─▶ agent(s) ─┐                      ┌─▶ aggregator(s) ─▶ s3 proxy ─▶ moto
//!                                           └─▶ kafka proxy ─▶ tansu ◀─┘
//! ```
//!
//! tansu advertises the Kafka proxy's port, so every client (agents and aggregators) reaches it
//! through the proxy, and cutting the proxy cuts Kafka off; the S3 proxy does the same between
//! the aggregators and moto. Each agent subscribes to its own topic prefix (`<node>/devices/+/
//! telemetry`), as devices on different Proxmox nodes would publish to their own node.
//! Configurations use short lateness, grace and idle timeouts so hours seal within a test.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use edgeflow_runtime::CancellationToken;
use edgeflow_testkit::{FaultProxy, Mosquitto, Moto, Service, Tansu, TansuStorage, free_port};
use tempfile::TempDir;

pub const BUCKET: &str = "edgeflow-e2e";
pub const PREFIX: &str = "telemetry";

/// Environment of the aggregator processes (moto accepts any key).
pub const AWS_ENV: &[(&str, &str)] = &[
    ("AWS_ACCESS_KEY_ID", "e2e"),
    ("AWS_SECRET_ACCESS_KEY", "e2e"),
    ("AWS_REGION", "us-east-1"),
    ("AWS_EC2_METADATA_DISABLED", "true"),
];

/// The consumer session timeout the aggregators use (how long a dead member is waited for).
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(6);

/// Finds one of the workspace's binaries next to the running test executable.
pub fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().and_then(Path::parent).context("test executable has no target directory")?;
    let path = dir.join(name);
    if !path.is_file() {
        bail!(
            "{} is missing: build the workspace first (`cargo build --workspace`; scripts/test does)",
            path.display()
        );
    }
    Ok(path)
}

/// Servers, proxies and the processes of one run.
pub struct Stack {
    pub dir: TempDir,
    pub mosquitto: Mosquitto,
    pub tansu: Tansu,
    pub kafka_proxy: FaultProxy,
    pub moto: Moto,
    pub s3_proxy: FaultProxy,
    pub agents: BTreeMap<String, Service>,
    pub aggregators: BTreeMap<String, Service>,
    agent_bin: PathBuf,
    aggregator_bin: PathBuf,
}

impl std::fmt::Debug for Stack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stack").field("dir", &self.dir.path()).finish_non_exhaustive()
    }
}

impl Stack {
    /// Starts mosquitto, tansu (behind the Kafka proxy) with the topics, and moto (behind the S3
    /// proxy) with the bucket.
    pub async fn start(storage: TansuStorage) -> Result<Self> {
        // `E2E_KEEP=1` keeps the run's directory (configurations, logs, buffers, simulator logs).
        let keep = std::env::var("E2E_KEEP").is_ok_and(|v| v == "1");
        let dir = tempfile::Builder::new().prefix("edgeflow-e2e").disable_cleanup(keep).tempdir()?;
        if keep {
            eprintln!("run directory (kept): {}", dir.path().display());
        }
        let mosquitto = Mosquitto::start()?;
        let listen = free_port();
        let kafka_proxy = FaultProxy::start(0, listen)?;
        let tansu = Tansu::start_advertising(storage, listen, kafka_proxy.port)?;
        edgeflow_testkit::kafka::create_topics(&tansu.bootstrap(), crate::kafka::TOPICS).await?;
        let moto = Moto::start()?;
        let s3_proxy = FaultProxy::start(0, moto.port)?;
        let stack = Stack {
            dir,
            mosquitto,
            tansu,
            kafka_proxy,
            moto,
            s3_proxy,
            agents: BTreeMap::new(),
            aggregators: BTreeMap::new(),
            agent_bin: binary("edgeflow-agent")?,
            aggregator_bin: binary("edgeflow-aggregator")?,
        };
        let s3 = stack.s3();
        let mut attempt = 0;
        while let Err(e) = s3.create_bucket().bucket(BUCKET).send().await {
            attempt += 1;
            if attempt > 50 {
                return Err(e).context("creating the bucket");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(stack)
    }

    /// An S3 client straight to moto (not through the proxy): the oracle's view.
    pub fn s3(&self) -> aws_sdk_s3::Client {
        crate::lake::client(&self.moto.endpoint())
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts (or restarts) the agent of `node`; `extra` is appended to its configuration.
    pub fn start_agent(&mut self, node: &str, extra: &str) -> Result<()> {
        self.start_agent_as(node, node, extra)
    }

    /// Starts (or restarts) agent `name` (devices `name/devices/+/telemetry`, data directory
    /// `agent-<name>`) configured with `node_id`.
    pub fn start_agent_as(&mut self, name: &str, node_id: &str, extra: &str) -> Result<()> {
        let config = self.path(&format!("agent-{name}.toml"));
        let (data_dir, mqtt, kafka) =
            (self.path(&format!("agent-{name}")), self.mosquitto.url(), self.tansu.bootstrap());
        let text = |port: u16| {
            format!(
                "node_id = \"{node_id}\"\ndata_dir = \"{}\"\nshutdown_timeout = \"10s\"\n\
                 [mqtt]\nurl = \"{mqtt}\"\nclient_id = \"edgeflow-agent-{name}\"\n\
                 topics = [\"{name}/devices/+/telemetry\"]\nkeep_alive = \"5s\"\n\
                 reconnect_backoff_max = \"1s\"\n[kafka]\nbrokers = \"{kafka}\"\n[metrics]\nlisten = \"127.0.0.1:{port}\"\n{extra}",
                data_dir.display(),
            )
        };
        let port = restart_port(&mut self.agents, name, &config, text)?;
        let service = Service::start(&self.agent_bin, &["run"], &config, port, &[])?;
        self.agents.insert(name.to_owned(), service);
        Ok(())
    }

    /// Clones node `of` as a host imaged from it would be: stops its agent, copies its data
    /// directory (buffer included) to agent `name`, restarts it, and starts `name` with the same
    /// `node_id` — two live writers of one node, continuing from the same `seq`. (Each agent has
    /// its own MQTT client id, as each host has its own broker: two clients with one id on one
    /// broker take the session from each other.)
    pub fn start_clone(&mut self, name: &str, of: &str) -> Result<()> {
        let agent = self.agents.get_mut(of).with_context(|| format!("no agent {of}"))?;
        agent.terminate(Duration::from_secs(20)).with_context(|| format!("agent {of} did not stop"))?;
        let (from, to) = (self.path(&format!("agent-{of}")), self.path(&format!("agent-{name}")));
        std::fs::create_dir_all(&to)?;
        for entry in std::fs::read_dir(&from)? {
            let entry = entry?;
            if entry.file_type()?.is_file() {
                std::fs::copy(entry.path(), to.join(entry.file_name()))?;
            }
        }
        self.start_agent(of, "")?;
        self.start_agent_as(name, of, "")
    }

    /// Stops agent `name` gracefully (it forwards what it holds first) and forgets it.
    pub fn stop_agent(&mut self, name: &str) -> Result<()> {
        let mut agent = self.agents.remove(name).with_context(|| format!("no agent {name}"))?;
        agent.terminate(Duration::from_secs(30)).with_context(|| format!("agent {name} did not stop"))?;
        Ok(())
    }

    /// Starts (or restarts) aggregator `name` running both stages.
    pub fn start_aggregator(&mut self, name: &str) -> Result<()> {
        let config = self.path(&format!("aggregator-{name}.toml"));
        let (kafka, spool, s3_port) = (self.tansu.bootstrap(), self.path(&format!("spool-{name}")), self.s3_proxy.port);
        let text = |port: u16| {
            format!(
                "[kafka]\nbrokers = \"{kafka}\"\ngroup_id = \"e2e\"\n\
                 [kafka.properties]\n\"session.timeout.ms\" = \"{}\"\n\"heartbeat.interval.ms\" = \"1000\"\n\
                 [process]\nallowed_lateness = \"5s\"\ncheckpoint_interval = \"2s\"\nidle_timeout = \"8s\"\n\
                 [sink]\nspool_dir = \"{}\"\nseal_grace = \"10s\"\nidle_timeout = \"8s\"\ncheckpoint_interval = \"2s\"\n\
                 [s3]\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\ndeployment_id = \"e2e\"\nregion = \"us-east-1\"\n\
                 endpoint_url = \"http://127.0.0.1:{s3_port}\"\nforce_path_style = true\n\
                 [metrics]\nlisten = \"127.0.0.1:{port}\"\n",
                SESSION_TIMEOUT.as_millis(),
                spool.display(),
            )
        };
        let port = restart_port(&mut self.aggregators, name, &config, text)?;
        let service = Service::start(&self.aggregator_bin, &["run"], &config, port, AWS_ENV)?;
        self.aggregators.insert(name.to_owned(), service);
        Ok(())
    }

    /// Devices of `node` publishing in the background; their log is `publisher(..).1`.
    pub fn publisher(
        &self,
        node: &str,
        load: Load,
    ) -> (tokio::task::JoinHandle<Result<edgeflow_agent::simulate::Report>>, PathBuf) {
        let log = self.path(&format!("published-{node}-{}.jsonl", load.seed));
        let sim = edgeflow_agent::simulate::Simulation {
            mqtt_host: "127.0.0.1".into(),
            mqtt_port: self.mosquitto.port,
            devices: load.devices,
            rate: load.rate,
            duration: load.duration,
            bad_fraction: load.bad_fraction,
            topic_prefix: format!("{node}/devices"),
            device_prefix: format!("{node}-dev"),
            seed: load.seed,
            clock_offset: load.clock_offset,
            log: Some(log.clone()),
            progress: false,
        };
        (tokio::spawn(edgeflow_agent::simulate::run(sim, CancellationToken::new())), log)
    }

    /// Runs `edgeflow-aggregator verify --json` (against moto directly) and parses its report.
    pub fn verify(&self) -> Result<serde_json::Value> {
        let config = self.path("verify.toml");
        std::fs::write(
            &config,
            format!(
                "[kafka]\nbrokers = \"127.0.0.1:9\"\n[s3]\nbucket = \"{BUCKET}\"\nprefix = \"{PREFIX}\"\ndeployment_id = \"e2e\"\nregion = \"us-east-1\"\n\
                 endpoint_url = \"{}\"\nforce_path_style = true\n",
                self.moto.endpoint()
            ),
        )?;
        let mut cmd = std::process::Command::new(&self.aggregator_bin);
        cmd.arg("verify").arg("--config").arg(&config).arg("--json");
        for (k, v) in AWS_ENV {
            cmd.env(k, v);
        }
        let out = cmd.output()?;
        serde_json::from_slice(&out.stdout)
            .with_context(|| format!("verify printed no JSON: {}", String::from_utf8_lossy(&out.stderr)))
    }

    /// Lets two hours pass for the dead letters: appends a tick to every partition of
    /// `raw-data-dlq`, as the aggregator's own idle ticks would once the hour had passed.
    ///
    /// Dead letters are filed under the hour the agent received them — the current hour, which
    /// a test cannot wait out. Readings are placed in past hours with the simulator's clock
    /// offset instead. Call once every agent has forwarded everything, so no dead letter of
    /// the current hour arrives after the tick (it would be filed as late, correctly, but its
    /// late file would wait for the next hour boundary).
    pub async fn let_dead_letter_hours_pass(&self) -> Result<()> {
        crate::kafka::let_dead_letter_hours_pass(&self.tansu.bootstrap()).await
    }

    /// Waits until every agent has forwarded everything it buffered.
    pub fn wait_agents_drained(&self, timeout: Duration) -> Result<()> {
        for agent in self.agents.values() {
            agent.wait_metric("edgeflow_agent_buffer_records", timeout, |v| v == 0.0)?;
        }
        Ok(())
    }

    /// Everything the processes logged, for a failing test's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for (name, s) in self.agents.iter().chain(&self.aggregators) {
            out.push_str(&format!("--- {name} ---\n{}\n", edgeflow_testkit::service::tail(&s.log_text(), 30)));
        }
        out
    }
}

/// The status port for (re)starting process `name`: a running one is killed with SIGKILL and
/// its port and configuration reused; a new one gets a free port and `config` written from
/// `text(port)`.
fn restart_port(
    running: &mut BTreeMap<String, Service>,
    name: &str,
    config: &Path,
    text: impl FnOnce(u16) -> String,
) -> Result<u16> {
    if let Some(mut old) = running.remove(name) {
        old.kill9();
        return Ok(old.port);
    }
    let port = free_port();
    std::fs::write(config, text(port))?;
    Ok(port)
}

/// What one node's devices publish.
#[derive(Debug, Clone)]
pub struct Load {
    pub devices: u32,
    pub rate: f64,
    pub duration: Duration,
    pub bad_fraction: f64,
    pub seed: u64,
    pub clock_offset: chrono::Duration,
}

/// A clock offset that puts a run's readings in an hour that ended over an hour ago, starting
/// `before_boundary` before the next hour boundary: a run of a few minutes then crosses exactly
/// one boundary, and every hour it touches can be sealed once the run is idle.
pub fn offset_before_hour_boundary(before_boundary: chrono::Duration) -> chrono::Duration {
    use chrono::{DurationRound, Utc};
    let now = Utc::now();
    let hour = chrono::Duration::hours(1);
    let boundary = now.duration_trunc(hour).unwrap_or(now) - hour;
    (boundary - before_boundary) - now
}
