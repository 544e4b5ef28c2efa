//! One of our daemons (agent or aggregator) as a child process, observed through its status
//! endpoint: `/healthz`, `/readyz` and `/metrics`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::process::Child;

/// A daemon started from a config file, with its status endpoint on `port`.
#[derive(Debug)]
pub struct Service {
    pub child: Child,
    /// Port of `/metrics`, `/healthz`, `/readyz`.
    pub port: u16,
    pub config: PathBuf,
    pub log: PathBuf,
}

impl Service {
    /// Runs `program args… --config config` with stdout and stderr appended to `<config>.log`,
    /// and waits for `/healthz`.
    pub fn start(program: &Path, args: &[&str], config: &Path, port: u16, env: &[(&str, &str)]) -> Result<Self> {
        let log = config.with_extension("log");
        let mut cmd = Command::new(program);
        cmd.args(args).arg("--config").arg(config);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info,librdkafka=warn");
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let name = program.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let child = Child::spawn(&name, cmd, Some(&log))?;
        let service = Service { child, port, config: config.to_owned(), log };
        service.wait_healthy(Duration::from_secs(30))?;
        Ok(service)
    }

    /// Waits until `/healthz` answers 200.
    pub fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if http_get(self.port, "/healthz").is_ok_and(|(code, _)| code == 200) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("{} did not become healthy; log tail:\n{}", self.child.name(), tail(&self.log_text(), 40))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Current metric values by full series name (`name{labels}`).
    pub fn metrics(&self) -> Result<HashMap<String, f64>> {
        let (_, body) = http_get(self.port, "/metrics")?;
        Ok(parse_metrics(&body))
    }

    /// One series' value (NaN if absent or unreachable).
    pub fn metric(&self, series: &str) -> f64 {
        self.metrics().ok().and_then(|m| m.get(series).copied()).unwrap_or(f64::NAN)
    }

    /// The sum of every series of a family whose name starts with `prefix`.
    pub fn metric_sum(&self, prefix: &str) -> f64 {
        self.metrics()
            .map(|m| m.iter().filter(|(k, _)| k.starts_with(prefix)).map(|(_, v)| v).sum())
            .unwrap_or(f64::NAN)
    }

    /// Waits until `series` satisfies `pred`; returns its value.
    pub fn wait_metric(&self, series: &str, timeout: Duration, pred: impl Fn(f64) -> bool) -> Result<f64> {
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.metric(series);
            if pred(v) {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!(
                    "{series} = {v} did not reach the expected value in {timeout:?}; log tail:\n{}",
                    tail(&self.log_text(), 40)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn kill9(&mut self) {
        self.child.kill9();
    }

    /// SIGTERM; the exit status if it exited within `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        self.child.terminate(timeout)
    }
}

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A minimal HTTP/1.1 GET against 127.0.0.1: status code and body.
pub fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out.get(9..12).and_then(|c| c.parse().ok()).context("no HTTP status")?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    Ok((code, body))
}

/// Parses a Prometheus/OpenMetrics text exposition into `series -> value`.
pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_owned(), value.parse().ok()?))
        })
        .collect()
}
