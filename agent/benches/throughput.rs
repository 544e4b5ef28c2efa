//! Agent throughput, latency and memory against real servers, with a baseline in the same run.
//!
//! `cargo bench -p edgeflow-agent --bench throughput` (env `BENCH_MESSAGES`, default 200000)
//!
//! 1. **Baseline**: a persistent-session backlog of N QoS 1 messages in mosquitto, drained by
//!    `mosquitto_sub -q 1` (the C client: the ceiling for one MQTT subscriber on this machine).
//! 2. **Agent**: the same backlog drained by `edgeflow-agent` with durable group commits and
//!    forwarded to tansu; timed until Kafka has acknowledged all N (`records_forwarded_total`),
//!    and separately until all are committed to the buffer.
//! 3. **Steady load**: 500 msg/s for 20 s from the simulator while the agent runs; end-to-end
//!    latency from the device's publish (the payload timestamp) to the record being readable in
//!    Kafka, the agent's own receipt→ack histogram, and the agent's peak RSS.
//!
//! Results go to stdout and to `target/bench/agent.json` (BENCHMARKS.md is built from it).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use edgeflow_testkit::{Child, Mosquitto, Tansu, TansuStorage, free_port, kafka, wait_for_port};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;

fn main() -> anyhow::Result<()> {
    let n: usize = std::env::var("BENCH_MESSAGES").ok().and_then(|v| v.parse().ok()).unwrap_or(200_000);
    // `BENCH_PHASES=steady` skips the backlog drains (for iterating on latency and memory).
    let drain = std::env::var("BENCH_PHASES").map_or(true, |p| p.contains("drain"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mosquitto = Mosquitto::start()?;
    let tansu = Tansu::start(TansuStorage::Memory)?;
    rt.block_on(kafka::create_topics(&tansu.bootstrap(), &[("raw-data", 3), ("raw-data-dlq", 1)]))?;
    let dir = tempfile::tempdir()?;
    let backlog = dir.path().join("backlog.txt");
    write_backlog(&backlog, n)?;
    println!("machine: {} cores, {}", num_cores(), cpu_model());
    println!("backlog: {n} QoS 1 messages of ~130 bytes, persistent session, mosquitto {}", mosquitto_version());

    // 1. Baseline: mosquitto_sub.
    let base_rate = if !drain {
        f64::NAN
    } else {
        subscribe_once(mosquitto.port, "bench-baseline")?;
        preload(mosquitto.port, &backlog)?;
        let start = Instant::now();
        let status = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &mosquitto.port.to_string(), "-q", "1", "-c", "-i", "bench-baseline"])
            .args(["-t", "devices/+/telemetry", "-C", &n.to_string(), "-V", "mqttv5"])
            .stdout(Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "mosquitto_sub failed");
        n as f64 / start.elapsed().as_secs_f64()
    };
    println!("baseline mosquitto_sub -q 1 drain:   {base_rate:>9.0} msg/s");

    // 2. The agent draining the same backlog.
    let metrics_port = free_port();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "node_id = \"bench\"\ndata_dir = \"{}\"\n[mqtt]\nurl = \"{}\"\nclient_id = \"bench-agent\"\nreceive_maximum = 16384\n\
             [kafka]\nbrokers = \"{}\"\nmax_in_flight = 50000\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            dir.path().join("data").display(),
            mosquitto.url(),
            tansu.bootstrap()
        ),
    )?;
    let agent_bin = env!("CARGO_BIN_EXE_edgeflow-agent");
    let (mut commit_rate, mut forward_rate, mut commits) = (f64::NAN, f64::NAN, f64::NAN);
    if drain {
        // First start creates the session and subscription; stop, then fill the backlog.
        {
            let mut agent = start_agent(agent_bin, &config, metrics_port, dir.path())?;
            wait_metric(metrics_port, "edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;
            std::thread::sleep(Duration::from_millis(500));
            anyhow::ensure!(
                agent.terminate(Duration::from_secs(30)).is_some_and(|s| s.success()),
                "the agent did not stop cleanly"
            );
        }
        preload(mosquitto.port, &backlog)?;
        let start = Instant::now();
        let mut agent = start_agent(agent_bin, &config, metrics_port, dir.path())?;
        let committed_at =
            wait_metric(metrics_port, "edgeflow_agent_records_committed_total", Duration::from_secs(300), |v| {
                v >= n as f64
            })?;
        commit_rate = n as f64 / (committed_at - start).as_secs_f64();
        let forwarded_at = wait_metric(
            metrics_port,
            "edgeflow_agent_records_forwarded_total{kind=\"record\"}",
            Duration::from_secs(300),
            |v| v >= n as f64,
        )?;
        forward_rate = n as f64 / (forwarded_at - start).as_secs_f64();
        let m = scrape(metrics_port)?;
        commits = m.get("edgeflow_agent_buffer_commit_duration_seconds_count").copied().unwrap_or(0.0);
        println!(
            "agent MQTT -> redb (durable commits): {commit_rate:>9.0} msg/s  ({:.2} of baseline, {:.0} records per commit)",
            commit_rate / base_rate,
            n as f64 / commits.max(1.0)
        );
        println!(
            "agent MQTT -> redb -> Kafka acked:    {forward_rate:>9.0} msg/s  ({:.2} of baseline)",
            forward_rate / base_rate
        );
        let left = scrape(metrics_port)?.get("edgeflow_agent_buffer_records").copied().unwrap_or(f64::NAN);
        let drained_at =
            wait_metric(metrics_port, "edgeflow_agent_buffer_records", Duration::from_secs(120), |v| v == 0.0)?;
        println!(
            "  (when Kafka had acknowledged all: {left} entries awaited deletion; buffer empty {:.1}s later)",
            (drained_at - forwarded_at).as_secs_f64()
        );
        // Memory is measured on a fresh process below, not on one that just drained a backlog.
        anyhow::ensure!(
            agent.terminate(Duration::from_secs(30)).is_some_and(|s| s.success()),
            "the agent did not stop cleanly"
        );
    }

    let mut agent = start_agent(agent_bin, &config, metrics_port, dir.path())?;
    wait_metric(metrics_port, "edgeflow_agent_mqtt_connected", Duration::from_secs(10), |v| v == 1.0)?;

    // 3. Steady load at 500 msg/s: latency and memory.
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", tansu.bootstrap())
        .set("group.id", "bench-latency")
        .set("auto.offset.reset", "latest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "5")
        .create()?;
    consumer.subscribe(&["raw-data"])?;
    // Let the consumer join before traffic starts.
    let join_deadline = Instant::now() + Duration::from_secs(15);
    while consumer.assignment()?.count() == 0 && Instant::now() < join_deadline {
        consumer.poll(Duration::from_millis(100));
    }
    let before = scrape(metrics_port)?;
    let pid = agent.pid_of();
    let sim = Command::new(agent_bin)
        .args([
            "simulate",
            "--mqtt",
            &mosquitto.url(),
            "--devices",
            "100",
            "--rate",
            "500",
            "--duration",
            "20",
            "--device-prefix",
            "steady",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let mut sim = Child::adopt("simulate", sim);
    let mut latencies = Vec::new();
    let mut peak_rss = 0u64;
    let end = Instant::now() + Duration::from_secs(24);
    while Instant::now() < end {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(50)) {
            let now = chrono::Utc::now();
            if let Some(ts) =
                m.payload().and_then(|p| serde_json::from_slice::<serde_json::Value>(p).ok()).and_then(|v| {
                    v.get("timestamp")
                        .and_then(|t| t.as_str())
                        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                })
            {
                latencies.push((now - ts.with_timezone(&chrono::Utc)).num_microseconds().unwrap_or(0) as f64 / 1000.0);
            }
        }
        if let Some(pid) = pid {
            peak_rss = peak_rss.max(rss_kib(pid));
        }
    }
    sim.kill9();
    let resent =
        scrape(metrics_port)?.get("edgeflow_agent_records_forwarded_total{kind=\"record\"}").copied().unwrap_or(0.0);
    if resent > 11_000.0 {
        // Not a figure to report: the agent received messages it had already acknowledged.
        let received = scrape(metrics_port)?.get("edgeflow_agent_mqtt_messages_received_total").copied();
        let log = std::fs::read_to_string(dir.path().join("agent.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        anyhow::bail!(
            "the steady phase forwarded {resent} records ({received:?} MQTT messages received): more than the \
             simulator sent; agent log tail:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    let after = scrape(metrics_port)?;
    let agent_p99 = histogram_quantile(&before, &after, "edgeflow_agent_record_latency_seconds", 0.99) * 1000.0;
    println!(
        "steady 500 msg/s: {} records; publish -> readable in Kafka p50 {:.1} ms, p99 {:.1} ms; agent receipt -> Kafka ack p99 <= {:.1} ms",
        latencies.len(),
        pct(0.5),
        pct(0.99),
        agent_p99
    );
    println!("agent peak RSS at 500 msg/s: {:.1} MiB", peak_rss as f64 / 1024.0);
    agent.terminate(Duration::from_secs(10));

    let out = serde_json::json!({
        "messages": n,
        "cores": num_cores(),
        "cpu": cpu_model(),
        "baseline_mosquitto_sub_msgs_per_sec": base_rate,
        "agent_commit_msgs_per_sec": commit_rate,
        "agent_forward_msgs_per_sec": forward_rate,
        "agent_forward_ratio_to_baseline": forward_rate / base_rate,
        "records_per_commit": n as f64 / commits.max(1.0),
        "steady_rate": 500,
        "steady_records": latencies.len(),
        "latency_publish_to_kafka_p50_ms": pct(0.5),
        "latency_publish_to_kafka_p99_ms": pct(0.99),
        "agent_receipt_to_ack_p99_ms_upper_bound": agent_p99,
        "agent_peak_rss_mib": peak_rss as f64 / 1024.0,
    });
    let target = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&target)?;
    std::fs::write(target.join("agent.json"), serde_json::to_string_pretty(&out)?)?;
    Ok(())
}

struct AgentProc {
    child: Child,
}

impl AgentProc {
    fn terminate(&mut self, t: Duration) -> Option<std::process::ExitStatus> {
        let status = self.child.terminate(t);
        self.child.kill9();
        status
    }
    fn pid_of(&self) -> Option<u32> {
        self.child.pid()
    }
}

fn start_agent(bin: &str, config: &std::path::Path, port: u16, dir: &std::path::Path) -> anyhow::Result<AgentProc> {
    let mut cmd = Command::new(bin);
    // `BENCH_AGENT_LOG=info` for a closer look (the log is `<dir>/agent.log`, kept with BENCH_KEEP=1).
    let level = std::env::var("BENCH_AGENT_LOG").unwrap_or_else(|_| "warn".into());
    cmd.arg("run").arg("--config").arg(config).env("RUST_LOG", level);
    let child = Child::spawn("edgeflow-agent", cmd, Some(&dir.join("agent.log")))?;
    wait_for_port(port, Duration::from_secs(20))?;
    Ok(AgentProc { child })
}

fn write_backlog(path: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let base = chrono::Utc::now() - chrono::Duration::minutes(10);
    for i in 0..n {
        let ts = (base + chrono::Duration::microseconds(i as i64)).to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        writeln!(
            f,
            r#"{{"device_id": "bench{:04}", "timestamp": "{ts}", "temperature": {}.5, "humidity": 55.2, "status": "OK"}}"#,
            i % 1000,
            60 + i % 30
        )?;
    }
    Ok(())
}

fn subscribe_once(port: u16, client_id: &str) -> anyhow::Result<()> {
    let status = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-q", "1", "-c", "-i", client_id, "-V", "mqttv5"])
        .args(["-x", "604800", "-t", "devices/+/telemetry", "-W", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    // -W 1 exits with a timeout status after one second: that is the point.
    let _ = status;
    Ok(())
}

fn preload(port: u16, backlog: &std::path::Path) -> anyhow::Result<()> {
    // One mosquitto_pub per device topic would be slow; publish all lines to per-device topics
    // through a small pipe of mosquitto_pub -l processes (one per 10 devices).
    let text = std::fs::read_to_string(backlog)?;
    let mut groups: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
    for line in text.lines() {
        let dev = &line[16..24];
        groups.entry(dev.to_owned()).or_default().push(line);
    }
    let mut children = Vec::new();
    for (dev, lines) in groups {
        let mut c = Command::new("mosquitto_pub")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-q",
                "1",
                "-t",
                &format!("devices/{dev}/telemetry"),
                "-l",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?;
        let mut stdin = c.stdin.take().expect("piped");
        for l in lines {
            writeln!(stdin, "{l}")?;
        }
        drop(stdin);
        children.push(c);
        if children.len() >= 50 {
            for mut c in children.drain(..) {
                c.wait()?;
            }
        }
    }
    for mut c in children {
        c.wait()?;
    }
    Ok(())
}

fn scrape(port: u16) -> anyhow::Result<std::collections::HashMap<String, f64>> {
    use std::io::Read;
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port))?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(k, v)| Some((k.to_owned(), v.parse().ok()?))))
        .collect())
}

fn wait_metric(port: u16, series: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> anyhow::Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(m) = scrape(port)
            && m.get(series).is_some_and(|v| pred(*v))
        {
            return Ok(Instant::now());
        }
        anyhow::ensure!(Instant::now() < deadline, "{series} did not reach its target in {timeout:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Upper bound of the quantile from the difference of two histogram scrapes.
fn histogram_quantile(
    before: &std::collections::HashMap<String, f64>,
    after: &std::collections::HashMap<String, f64>,
    name: &str,
    q: f64,
) -> f64 {
    let mut buckets: Vec<(f64, f64)> = after
        .iter()
        .filter_map(|(k, v)| {
            let le = k.strip_prefix(&format!("{name}_bucket{{le=\""))?.strip_suffix("\"}")?;
            let le: f64 = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, v - before.get(k).copied().unwrap_or(0.0)))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets.iter().find(|(_, c)| *c >= total * q).map(|b| b.0).unwrap_or(f64::NAN)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn num_cores() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("model name")).map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn mosquitto_version() -> String {
    Command::new("mosquitto")
        .arg("-h")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("").replace("mosquitto version ", ""))
        .unwrap_or_default()
}
