//! Real servers for tests: mosquitto, tansu and moto.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use tempfile::TempDir;

use crate::process::{Child, find_binary, free_port, wait_for_port};

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Debian's mosquitto on `127.0.0.1`, with persistence in a temporary directory.
///
/// The configuration lifts the per-client limits (`max_inflight_messages`, `max_queued_messages`)
/// that would otherwise make the broker drop QoS 1 messages queued for a slow or absent
/// persistent session — the settings the README recommends to operators.
#[derive(Debug)]
pub struct Mosquitto {
    pub port: u16,
    dir: TempDir,
    extra: String,
    child: Child,
}

impl Mosquitto {
    pub fn start() -> Result<Self> {
        Self::start_with("")
    }

    /// Starts with extra configuration lines appended.
    pub fn start_with(extra: &str) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("mosquitto").tempdir()?;
        let port = free_port();
        let child = Self::spawn(dir.path(), port, extra)?;
        Ok(Self { port, dir, extra: extra.to_owned(), child })
    }

    fn spawn(dir: &Path, port: u16, extra: &str) -> Result<Child> {
        let conf = dir.join("mosquitto.conf");
        // Started as root, mosquitto drops to the `mosquitto` user, which cannot read the test's
        // private directory (persistence, keys): keep the current user.
        let user =
            Command::new("id").arg("-un").output().ok().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
        std::fs::write(
            &conf,
            format!(
                "user {}\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\n\
                 max_inflight_messages 0\nmax_queued_messages 10000000\nmax_queued_bytes 0\n\
                 log_dest file {}/mosquitto.log\n{extra}\n",
                user.filter(|u| !u.is_empty()).unwrap_or_else(|| "root".into()),
                dir.display(),
                dir.display()
            ),
        )?;
        let bin = find_binary("mosquitto", "EDGEFLOW_MOSQUITTO", &["/usr/sbin/mosquitto"])?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c").arg(&conf);
        let child = Child::spawn("mosquitto", cmd, Some(&dir.join("stdout.log")))?;
        wait_for_port(port, START_TIMEOUT).context("mosquitto did not start")?;
        Ok(child)
    }

    /// `mqtt://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// SIGKILL (persistence since the last save is lost, as in a real crash).
    pub fn kill9(&mut self) {
        self.child.kill9();
    }

    /// Graceful stop (mosquitto saves its persistence file on SIGTERM).
    pub fn stop(&mut self) {
        self.child.terminate(Duration::from_secs(10));
    }

    /// Starts again on the same port and persistence directory.
    pub fn restart(&mut self) -> Result<()> {
        self.child.kill9();
        self.child = Self::spawn(self.dir.path(), self.port, &self.extra)?;
        Ok(())
    }
}

/// Where tansu keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TansuStorage {
    /// `memory://` — fast, lost on kill.
    Memory,
    /// `sqlite://` in the fixture's directory — survives `kill -9`.
    Sqlite,
}

/// A real Kafka-protocol broker (`tansu`) on `127.0.0.1`.
#[derive(Debug)]
pub struct Tansu {
    /// The port tansu listens on.
    pub listen_port: u16,
    /// The port it advertises to clients (the same, or a proxy's).
    pub advertised_port: u16,
    storage: TansuStorage,
    dir: TempDir,
    child: Child,
}

impl Tansu {
    pub fn start(storage: TansuStorage) -> Result<Self> {
        let port = free_port();
        Self::start_advertising(storage, port, port)
    }

    /// Listens on `listen_port` but advertises `advertised_port`: put a [`crate::FaultProxy`]
    /// from the advertised port to the listen port and every client goes through it.
    pub fn start_advertising(storage: TansuStorage, listen_port: u16, advertised_port: u16) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("tansu").tempdir()?;
        let child = Self::spawn(dir.path(), &storage, listen_port, advertised_port)?;
        Ok(Self { listen_port, advertised_port, storage, dir, child })
    }

    fn spawn(dir: &Path, storage: &TansuStorage, listen: u16, advertised: u16) -> Result<Child> {
        let bin = find_binary("tansu", "EDGEFLOW_TANSU", &[])?;
        let engine = match storage {
            TansuStorage::Memory => "memory://tansu/".to_owned(),
            // Relative to the working directory, which is the fixture's directory.
            TansuStorage::Sqlite => "sqlite://tansu.db".to_owned(),
        };
        let mut cmd = Command::new(bin);
        cmd.current_dir(dir)
            .arg("broker")
            .arg("--listener-url")
            .arg(format!("tcp://127.0.0.1:{listen}"))
            .arg("--advertised-listener-url")
            .arg(format!("tcp://127.0.0.1:{advertised}"))
            .arg("--storage-engine")
            .arg(engine)
            .env("RUST_LOG", "warn");
        let child = Child::spawn("tansu", cmd, Some(&dir.join("tansu.log")))?;
        wait_for_port(listen, START_TIMEOUT).context("tansu did not start")?;
        Ok(child)
    }

    /// The bootstrap address clients use (`127.0.0.1:ADVERTISED`).
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.advertised_port)
    }

    pub fn kill9(&mut self) {
        self.child.kill9();
    }

    /// Starts again on the same ports and storage (sqlite keeps its data; memory does not).
    pub fn restart(&mut self) -> Result<()> {
        self.child.kill9();
        self.child = Self::spawn(self.dir.path(), &self.storage, self.listen_port, self.advertised_port)?;
        Ok(())
    }

    /// The broker's log file, for diagnosing a failing test.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tansu.log")
    }
}

/// An S3 API server (`moto_server`) on `127.0.0.1`.
#[derive(Debug)]
pub struct Moto {
    pub port: u16,
    _dir: TempDir,
    child: Child,
}

impl Moto {
    pub fn start() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("moto").tempdir()?;
        let port = free_port();
        let bin = find_binary("moto_server", "EDGEFLOW_MOTO", &[])?;
        let mut cmd = Command::new(bin);
        cmd.arg("-H").arg("127.0.0.1").arg("-p").arg(port.to_string());
        let child = Child::spawn("moto_server", cmd, Some(&dir.path().join("moto.log")))?;
        wait_for_port(port, START_TIMEOUT).context("moto_server did not start")?;
        Ok(Self { port, _dir: dir, child })
    }

    /// `http://127.0.0.1:PORT`
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn kill9(&mut self) {
        self.child.kill9();
    }
}
